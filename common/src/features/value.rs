//! Typed feature values and the rules a cell of an ingested file must meet to become one.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::view::{FeatureType, KeyType};

/// One cell as a file reader found it: text from CSV, typed from Parquet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell<'a> {
    /// Empty (an empty CSV field, a Parquet null).
    Null,
    /// Text, to be parsed by the column's type.
    Text(&'a str),
    /// An integer column.
    Int(i64),
    /// A floating-point column.
    Float(f64),
    /// A boolean column.
    Bool(bool),
    /// A timestamp column, in microseconds since the Unix epoch.
    Micros(i64),
}

impl fmt::Display for Cell<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Null => f.write_str("(null)"),
            Self::Text(t) => {
                let cut: String = t.chars().take(64).collect();
                if cut.len() < t.len() { write!(f, "{cut:?}…") } else { write!(f, "{cut:?}") }
            }
            Self::Int(v) | Self::Micros(v) => write!(f, "{v}"),
            Self::Float(v) => write!(f, "{v}"),
            Self::Bool(v) => write!(f, "{v}"),
        }
    }
}

/// A feature value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// No value.
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer.
    I64(i64),
    /// A 32-bit float.
    F32(f32),
    /// A 64-bit float.
    F64(f64),
    /// Text (also categories and pseudonyms).
    Str(String),
}

impl Value {
    /// The value as an `f32` model input, if it is numeric or boolean.
    pub fn as_f32(&self) -> Option<f32> {
        match self {
            Self::F32(v) => Some(*v),
            Self::F64(v) => Some(*v as f32),
            Self::I64(v) => Some(*v as f32),
            Self::Bool(v) => Some(f32::from(u8::from(*v))),
            Self::Null | Self::Str(_) => None,
        }
    }

    /// The text a keyed hash covers: the same for equal values of one type.
    pub fn canonical_text(&self) -> String {
        match self {
            Self::Null => String::new(),
            Self::Bool(v) => v.to_string(),
            Self::I64(v) => v.to_string(),
            Self::F32(v) => v.to_string(),
            Self::F64(v) => v.to_string(),
            Self::Str(v) => v.clone(),
        }
    }

    /// Checks a declared default against the feature's type.
    pub fn from_default(kind: &FeatureType, default: &toml::Value) -> Result<Self, Rule> {
        let cell = match default {
            toml::Value::String(s) => Cell::Text(s),
            toml::Value::Integer(i) => Cell::Int(*i),
            toml::Value::Float(x) => Cell::Float(*x),
            toml::Value::Boolean(b) => Cell::Bool(*b),
            _ => return Err(Rule::Type(kind.to_string())),
        };
        accept(kind, false, cell)
    }
}

/// The rule a cell broke.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Rule {
    /// Empty where the column is not nullable.
    #[error("must not be null")]
    NotNull,
    /// Not of the column's type.
    #[error("must be {0}")]
    Type(String),
    /// NaN or infinite.
    #[error("must be finite")]
    NotFinite,
    /// Outside the type's range.
    #[error("out of range for {0}")]
    Range(String),
    /// Not among the category's values.
    #[error("must be one of the category's {0} values")]
    Category(usize),
    /// Not a timestamp.
    #[error("must be an RFC 3339 time such as 2026-11-26T13:00:00Z")]
    Timestamp,
}

/// Makes a value of type `kind` from `cell`, or says which rule it breaks.
pub fn accept(kind: &FeatureType, nullable: bool, cell: Cell<'_>) -> Result<Value, Rule> {
    let wrong = || Rule::Type(kind.to_string());
    match (kind, cell) {
        (_, Cell::Null) => {
            if nullable {
                Ok(Value::Null)
            } else {
                Err(Rule::NotNull)
            }
        }
        (FeatureType::F32, cell) => {
            let v = float(cell).ok_or_else(wrong)?;
            if !v.is_finite() {
                return Err(Rule::NotFinite);
            }
            if v.abs() > f64::from(f32::MAX) {
                return Err(Rule::Range("f32".into()));
            }
            Ok(Value::F32(v as f32))
        }
        (FeatureType::F64, cell) => {
            let v = float(cell).ok_or_else(wrong)?;
            if !v.is_finite() {
                return Err(Rule::NotFinite);
            }
            Ok(Value::F64(v))
        }
        (FeatureType::I64, Cell::Int(v)) => Ok(Value::I64(v)),
        (FeatureType::I64, Cell::Text(t)) => t.trim().parse().map(Value::I64).map_err(|_| wrong()),
        (FeatureType::Bool, Cell::Bool(v)) => Ok(Value::Bool(v)),
        (FeatureType::Bool, Cell::Text(t)) => match t.trim() {
            "true" | "True" | "TRUE" | "1" => Ok(Value::Bool(true)),
            "false" | "False" | "FALSE" | "0" => Ok(Value::Bool(false)),
            _ => Err(wrong()),
        },
        (FeatureType::String, Cell::Text(t)) => Ok(Value::Str(t.to_owned())),
        (FeatureType::Category { values }, Cell::Text(t)) => {
            if values.iter().any(|v| v == t) {
                Ok(Value::Str(t.to_owned()))
            } else {
                Err(Rule::Category(values.len()))
            }
        }
        _ => Err(wrong()),
    }
}

fn float(cell: Cell<'_>) -> Option<f64> {
    match cell {
        Cell::Float(v) => Some(v),
        Cell::Int(v) => Some(v as f64),
        Cell::Text(t) => t.trim().parse().ok(),
        _ => None,
    }
}

/// An entity key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Key {
    /// An integer key.
    Int(i64),
    /// A text key.
    Str(String),
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(v) => write!(f, "{v}"),
            Self::Str(v) => f.write_str(v),
        }
    }
}

/// Makes an entity key of type `kind` from `cell`; keys are never null.
pub fn accept_key(kind: KeyType, cell: Cell<'_>) -> Result<Key, Rule> {
    match (kind, cell) {
        (_, Cell::Null) => Err(Rule::NotNull),
        (KeyType::String, Cell::Text(t)) if !t.is_empty() => Ok(Key::Str(t.to_owned())),
        (KeyType::I64, Cell::Int(v)) => Ok(Key::Int(v)),
        (KeyType::I64, Cell::Text(t)) => {
            t.trim().parse().map(Key::Int).map_err(|_| Rule::Type("i64".into()))
        }
        (kind, _) => Err(Rule::Type(kind.to_string())),
    }
}

/// Parses a key given as text (a URL path segment, a request parameter).
pub fn parse_key(kind: KeyType, text: &str) -> Result<Key, Rule> {
    accept_key(kind, Cell::Text(text))
}

/// Reads an event time in microseconds since the epoch: RFC 3339 text (any offset) or a
/// timestamp column.
pub fn accept_time(cell: Cell<'_>) -> Result<i64, Rule> {
    match cell {
        Cell::Null => Err(Rule::NotNull),
        Cell::Micros(v) => Ok(v),
        Cell::Text(t) => parse_time(t).ok_or(Rule::Timestamp),
        _ => Err(Rule::Timestamp),
    }
}

/// Parses RFC 3339 text into microseconds since the epoch.
pub fn parse_time(text: &str) -> Option<i64> {
    let at =
        time::OffsetDateTime::parse(text.trim(), &time::format_description::well_known::Rfc3339)
            .ok()?;
    i64::try_from(at.unix_timestamp_nanos() / 1000).ok()
}

/// Writes microseconds since the epoch as RFC 3339 UTC.
pub fn format_time(micros: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| micros.to_string())
}
