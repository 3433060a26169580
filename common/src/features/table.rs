//! Snapshot payloads and the table agents look entities up in.
//!
//! A payload is a header record (the view, the entity key's name, each feature's name and
//! type, checked against the manifest) and then the latest row of each entity, in key
//! order, each one postcard record (`key`, event time in µs, one tagged value per carried
//! feature), one after another:
//! row-major, so a changed entity changes the bytes of one place in the file and the
//! transfer's content-defined chunks around every unchanged entity stay the same. (A
//! column-major file such as Parquet scatters one entity over every column: with one
//! entity in ten thousand changed, three quarters of a Parquet snapshot's chunks changed;
//! BENCHMARKS.md.) The manifest (`SnapshotSpec`) says what the values are; the loader
//! checks every row against it.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float32Builder, Float64Builder, Int64Builder, StringBuilder,
};
use arrow_array::{Array, ArrayRef, cast::AsArray};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::pii::{Keyring, Pseudonymiser, Treatment};
use super::snapshot::SnapshotSpec;
use super::value::{self, Key, Rule, Value};
use super::view::{FeatureType, FeatureView, KeyType};

/// The first record of a payload: what its rows hold, checked against the manifest.
#[derive(Serialize, Deserialize, PartialEq)]
struct Header<'a> {
    view: &'a str,
    entity: &'a str,
    /// (name, type) per carried feature, in row order.
    #[serde(borrow)]
    features: Vec<(&'a str, String)>,
}

impl<'a> Header<'a> {
    fn of(spec: &'a SnapshotSpec) -> Self {
        Self {
            view: &spec.view,
            entity: &spec.entity.name,
            features: spec.features.iter().map(|f| (f.name.as_str(), f.kind.to_string())).collect(),
        }
    }
}

/// One row of a payload, as encoded (postcard; borrowed when decoded).
#[derive(Serialize, Deserialize)]
struct Record<'a> {
    #[serde(borrow)]
    key: RecordKey<'a>,
    time: i64,
    #[serde(borrow)]
    values: Vec<Field<'a>>,
}

/// An entity key as encoded; ordered as [`Key`] is, so rows can be checked for key order
/// while borrowed from the payload.
#[derive(Clone, Copy, PartialEq, PartialOrd, Serialize, Deserialize)]
enum RecordKey<'a> {
    Int(i64),
    Str(&'a str),
}

impl std::fmt::Display for RecordKey<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Int(v) => write!(f, "{v}"),
            Self::Str(s) => f.write_str(s),
        }
    }
}

/// A value as encoded: tagged, since postcard is not self-describing.
#[derive(Serialize, Deserialize)]
enum Field<'a> {
    Null,
    Bool(bool),
    I64(i64),
    F32(f32),
    F64(f64),
    Str(&'a str),
}

impl<'a> From<&'a Value> for Field<'a> {
    fn from(value: &'a Value) -> Self {
        match value {
            Value::Null => Self::Null,
            Value::Bool(v) => Self::Bool(*v),
            Value::I64(v) => Self::I64(*v),
            Value::F32(v) => Self::F32(*v),
            Value::F64(v) => Self::F64(*v),
            Value::Str(v) => Self::Str(v),
        }
    }
}

/// Why a snapshot could not be written or read.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// Writing the payload failed.
    #[error("snapshot {view}: writing: {message}")]
    Write {
        /// The view.
        view: String,
        /// What failed.
        message: String,
    },
    /// A payload that does not fit its manifest.
    #[error("snapshot {view}: {message}")]
    Shape {
        /// The view.
        view: String,
        /// What is wrong.
        message: String,
    },
    /// Rows out of key order or a key twice.
    #[error("snapshot {view}: entity {key} is out of order or repeated")]
    Order {
        /// The view.
        view: String,
        /// The key.
        key: String,
    },
}

/// Streams rows (sorted by key, each key once) into the snapshot payload.
pub struct SnapshotWriter<W: Write> {
    spec: SnapshotSpec,
    treatments: Vec<Treatment>,
    names: Vec<String>,
    /// The current key's pseudonymiser first, then those of older versions in overlap.
    pseudonymisers: Vec<Pseudonymiser>,
    out: W,
    last: Option<Key>,
}

impl<W: Write> SnapshotWriter<W> {
    /// A writer of `spec`'s payload into `out`; rows come with every feature of `view`,
    /// treated as `treatments` says (hashed with `pseudonymiser`).
    pub fn new(
        view: &FeatureView,
        spec: SnapshotSpec,
        treatments: Vec<Treatment>,
        pseudonymiser: Option<Pseudonymiser>,
        out: W,
    ) -> Result<Self, SnapshotError> {
        Self::start(view, spec, treatments, pseudonymiser.into_iter().collect(), out)
    }

    /// [`Self::new`] hashing with every version of `keyring`: the current one in the
    /// feature's column, older ones in overlap in their companion columns; `spec` is made
    /// with [`SnapshotSpec::with_keyring`] of the same keyring.
    pub fn with_keyring(
        view: &FeatureView,
        spec: SnapshotSpec,
        treatments: Vec<Treatment>,
        keyring: &Keyring,
        out: W,
    ) -> Result<Self, SnapshotError> {
        Self::start(view, spec, treatments, keyring.pseudonymisers().cloned().collect(), out)
    }

    fn start(
        view: &FeatureView,
        spec: SnapshotSpec,
        treatments: Vec<Treatment>,
        pseudonymisers: Vec<Pseudonymiser>,
        mut out: W,
    ) -> Result<Self, SnapshotError> {
        if treatments.contains(&Treatment::Hash) && pseudonymisers.is_empty() {
            return Err(SnapshotError::Write {
                view: spec.view.clone(),
                message: "personal data to pseudonymise and no key to do it with".into(),
            });
        }
        let carried: usize = treatments
            .iter()
            .map(|t| match t {
                Treatment::Raw => 1,
                Treatment::Drop => 0,
                Treatment::Hash => pseudonymisers.len(),
            })
            .sum();
        if carried != spec.features.len() {
            return Err(SnapshotError::Write {
                view: spec.view.clone(),
                message: format!(
                    "the spec lists {} features but the plan carries {carried}",
                    spec.features.len()
                ),
            });
        }
        postcard::to_io(&Header::of(&spec), &mut out).map_err(|e| SnapshotError::Write {
            view: spec.view.clone(),
            message: e.to_string(),
        })?;
        Ok(Self {
            spec,
            treatments,
            names: view.features.iter().map(|f| f.name.clone()).collect(),
            pseudonymisers,
            out,
            last: None,
        })
    }

    /// Adds one entity's latest row.
    pub fn push(&mut self, key: Key, time: i64, values: Vec<Value>) -> Result<(), SnapshotError> {
        if self.last.as_ref().is_some_and(|last| *last >= key) {
            return Err(SnapshotError::Order {
                view: self.spec.view.clone(),
                key: key.to_string(),
            });
        }
        let mut carried = Vec::with_capacity(self.spec.features.len());
        for ((value, treatment), feature) in
            values.into_iter().zip(&self.treatments).zip(&self.names)
        {
            match treatment {
                Treatment::Raw => carried.push(value),
                Treatment::Drop => {}
                Treatment::Hash => {
                    carried
                        .extend(self.pseudonymisers.iter().map(|p| p.pseudonym(feature, &value)));
                }
            }
        }
        let record = Record {
            key: match &key {
                Key::Int(v) => RecordKey::Int(*v),
                Key::Str(s) => RecordKey::Str(s),
            },
            time,
            values: carried.iter().map(Field::from).collect(),
        };
        postcard::to_io(&record, &mut self.out).map_err(|e| SnapshotError::Write {
            view: self.spec.view.clone(),
            message: e.to_string(),
        })?;
        self.spec.entities += 1;
        self.last = Some(key);
        Ok(())
    }

    /// Returns the spec with its entity count, and the sink.
    pub fn finish(self) -> (SnapshotSpec, W) {
        (self.spec, self.out)
    }
}

/// A column of a loaded snapshot while it is read.
enum ColumnBuilder {
    F32(Float32Builder),
    F64(Float64Builder),
    I64(Int64Builder),
    Bool(BooleanBuilder),
    Str(StringBuilder, Option<Vec<String>>),
}

impl ColumnBuilder {
    fn new(kind: &FeatureType, rows: usize) -> Self {
        match kind {
            FeatureType::F32 => Self::F32(Float32Builder::with_capacity(rows)),
            FeatureType::F64 => Self::F64(Float64Builder::with_capacity(rows)),
            FeatureType::I64 => Self::I64(Int64Builder::with_capacity(rows)),
            FeatureType::Bool => Self::Bool(BooleanBuilder::with_capacity(rows)),
            FeatureType::String => Self::Str(StringBuilder::with_capacity(rows, rows * 8), None),
            FeatureType::Category { values } => {
                Self::Str(StringBuilder::with_capacity(rows, rows * 8), Some(values.clone()))
            }
        }
    }

    /// Appends one value, refusing another type or a category value not declared.
    fn append(&mut self, field: &Field<'_>) -> Result<(), String> {
        match (self, field) {
            (Self::F32(b), Field::Null) => b.append_null(),
            (Self::F64(b), Field::Null) => b.append_null(),
            (Self::I64(b), Field::Null) => b.append_null(),
            (Self::Bool(b), Field::Null) => b.append_null(),
            (Self::Str(b, _), Field::Null) => b.append_null(),
            (Self::F32(b), Field::F32(v)) => b.append_value(*v),
            (Self::F64(b), Field::F64(v)) => b.append_value(*v),
            (Self::I64(b), Field::I64(v)) => b.append_value(*v),
            (Self::Bool(b), Field::Bool(v)) => b.append_value(*v),
            (Self::Str(b, None), Field::Str(v)) => b.append_value(v),
            (Self::Str(b, Some(values)), Field::Str(v)) => {
                if !values.iter().any(|c| c == v) {
                    return Err(format!("{v:?} is not a value of the category"));
                }
                b.append_value(v);
            }
            _ => return Err("a value of another type".to_owned()),
        }
        Ok(())
    }

    fn finish(self) -> ArrayRef {
        match self {
            Self::F32(mut b) => Arc::new(b.finish()),
            Self::F64(mut b) => Arc::new(b.finish()),
            Self::I64(mut b) => Arc::new(b.finish()),
            Self::Bool(mut b) => Arc::new(b.finish()),
            Self::Str(mut b, _) => Arc::new(b.finish()),
        }
    }
}

/// A loaded snapshot: every entity's row, indexed by key.
#[derive(Debug)]
pub struct OnlineTable {
    spec: SnapshotSpec,
    index: Index,
    times: Vec<i64>,
    columns: Vec<ArrayRef>,
    defaults: Vec<Option<Value>>,
}

#[derive(Debug)]
enum Index {
    Str(HashMap<Box<str>, u32>),
    Int(HashMap<i64, u32>),
}

/// One entity's row as looked up.
#[derive(Debug, Clone, PartialEq)]
pub struct Lookup {
    /// The event time of the row, µs since the epoch; `None` when the entity is missing and
    /// the values are the declared defaults.
    pub time: Option<i64>,
    /// One value per feature of the snapshot (null where missing and without default).
    pub values: Vec<Value>,
}

impl OnlineTable {
    /// Reads a snapshot payload, checking every row against `spec`: key order (so each
    /// entity once), the number of values, each value's type and nullability.
    pub fn load(spec: SnapshotSpec, payload: &[u8]) -> Result<Self, SnapshotError> {
        let view = spec.view.clone();
        let shape = |row: u64, message: String| SnapshotError::Shape {
            view: view.clone(),
            message: format!("row {row}: {message}"),
        };
        let rows = usize::try_from(spec.entities).unwrap_or(usize::MAX).min(payload.len());
        let mut columns: Vec<ColumnBuilder> =
            spec.features.iter().map(|f| ColumnBuilder::new(&f.kind, rows)).collect();
        let mut times = Vec::with_capacity(rows);
        let mut index = match spec.entity.kind {
            KeyType::String => Index::Str(HashMap::with_capacity(rows)),
            KeyType::I64 => Index::Int(HashMap::with_capacity(rows)),
        };
        let (header, mut rest): (Header<'_>, _) = postcard::take_from_bytes(payload)
            .map_err(|e| shape(0, format!("the header does not decode: {e}")))?;
        if header != Header::of(&spec) {
            return Err(SnapshotError::Shape {
                view: view.clone(),
                message: format!(
                    "the payload holds view {:?} keyed by {:?} with features {:?}, which differ from the manifest's",
                    header.view, header.entity, header.features
                ),
            });
        }
        let mut last: Option<RecordKey<'_>> = None;
        let mut row = 0u64;
        while !rest.is_empty() {
            row += 1;
            let (record, tail): (Record<'_>, _) =
                postcard::take_from_bytes(rest).map_err(|e| shape(row, e.to_string()))?;
            rest = tail;
            let key = record.key;
            if last.is_some_and(|l| l >= key) {
                return Err(shape(row, format!("entity {key} is out of order or repeated")));
            }
            if record.values.len() != columns.len() {
                return Err(shape(
                    row,
                    format!("{} values for {} features", record.values.len(), columns.len()),
                ));
            }
            for ((field, column), feature) in
                record.values.iter().zip(&mut columns).zip(&spec.features)
            {
                if matches!(field, Field::Null) && !feature.nullable {
                    return Err(shape(
                        row,
                        format!("{}: null, and it is not nullable", feature.name),
                    ));
                }
                column.append(field).map_err(|m| shape(row, format!("{}: {m}", feature.name)))?;
            }
            let at = u32::try_from(times.len()).map_err(|_| shape(row, "too many rows".into()))?;
            match (&mut index, key) {
                (Index::Str(m), RecordKey::Str(k)) => {
                    m.insert(k.into(), at);
                }
                (Index::Int(m), RecordKey::Int(k)) => {
                    m.insert(k, at);
                }
                _ => return Err(shape(row, format!("key {key} is not {}", spec.entity.kind))),
            }
            times.push(record.time);
            last = Some(key);
        }
        if row != spec.entities {
            return Err(SnapshotError::Shape {
                view,
                message: format!("{row} rows, the manifest says {}", spec.entities),
            });
        }
        let columns = columns.into_iter().map(ColumnBuilder::finish).collect();
        let defaults = spec
            .features
            .iter()
            .map(|f| f.default.as_ref().and_then(|d| Value::from_default(&f.kind, d).ok()))
            .collect();
        Ok(Self { spec, index, times, columns, defaults })
    }

    /// The snapshot's manifest content.
    pub fn spec(&self) -> &SnapshotSpec {
        &self.spec
    }

    /// Entities held.
    pub fn len(&self) -> usize {
        self.times.len()
    }

    /// Whether no entity is held.
    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    fn row(&self, key: &str) -> Result<Option<usize>, Rule> {
        let found = match &self.index {
            Index::Str(m) => m.get(key),
            Index::Int(m) => match value::parse_key(KeyType::I64, key)? {
                Key::Int(k) => m.get(&k),
                Key::Str(_) => None,
            },
        };
        Ok(found.map(|&r| r as usize))
    }

    /// The value of feature `feature` in row `row`, or the declared default when null.
    fn value(&self, row: usize, feature: usize) -> Value {
        let column = &self.columns[feature];
        if column.is_null(row) {
            return self.defaults[feature].clone().unwrap_or(Value::Null);
        }
        match self.spec.features[feature].kind {
            FeatureType::F32 => {
                Value::F32(column.as_primitive::<arrow_array::types::Float32Type>().value(row))
            }
            FeatureType::F64 => {
                Value::F64(column.as_primitive::<arrow_array::types::Float64Type>().value(row))
            }
            FeatureType::I64 => {
                Value::I64(column.as_primitive::<arrow_array::types::Int64Type>().value(row))
            }
            FeatureType::Bool => Value::Bool(column.as_boolean().value(row)),
            FeatureType::String | FeatureType::Category { .. } => {
                Value::Str(column.as_string::<i32>().value(row).to_owned())
            }
        }
    }

    /// Looks `key` (as text) up: its row with nulls replaced by defaults, or, for an entity
    /// not held, the defaults when every feature declares one. `Ok(None)`: not held.
    pub fn get(&self, key: &str) -> Result<Option<Lookup>, Rule> {
        if let Some(row) = self.row(key)? {
            let values = (0..self.columns.len()).map(|f| self.value(row, f)).collect();
            return Ok(Some(Lookup { time: Some(self.times[row]), values }));
        }
        let defaults: Option<Vec<Value>> = self.defaults.iter().cloned().collect();
        Ok(defaults.map(|values| Lookup { time: None, values }))
    }

    /// Writes the features at `positions` of entity `key` as model inputs into `out`.
    pub fn assemble(
        &self,
        key: &str,
        positions: &[usize],
        out: &mut Vec<f32>,
    ) -> Result<(), AssembleError> {
        let bad_key = |rule: Rule| AssembleError::Key { key: key.to_owned(), rule };
        let row = self.row(key).map_err(bad_key)?;
        for &feature in positions {
            let value = match row {
                Some(row) => self.value(row, feature),
                None => self.defaults[feature].clone().ok_or_else(|| AssembleError::Missing {
                    view: self.spec.view.clone(),
                    key: key.to_owned(),
                })?,
            };
            let name = &self.spec.features[feature].name;
            match value {
                Value::Null => {
                    return Err(AssembleError::Null { key: key.to_owned(), feature: name.clone() });
                }
                v => out.push(
                    v.as_f32()
                        .ok_or_else(|| AssembleError::NotNumeric { feature: name.clone() })?,
                ),
            }
        }
        Ok(())
    }
}

/// Why a model input could not be assembled from the online store.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AssembleError {
    /// The entity id is not of the key's type.
    #[error("entity id {key:?}: {rule}")]
    Key {
        /// The id.
        key: String,
        /// The rule.
        rule: Rule,
    },
    /// The entity is not in the snapshot and some feature has no default.
    #[error("entity {key:?} is not in the snapshot of view {view:?}")]
    Missing {
        /// The view.
        view: String,
        /// The id.
        key: String,
    },
    /// A feature is null for the entity and has no default.
    #[error("feature {feature:?} of entity {key:?} is null and has no default")]
    Null {
        /// The id.
        key: String,
        /// The feature.
        feature: String,
    },
    /// A text feature cannot feed a numeric tensor.
    #[error("feature {feature:?} is text and cannot be a model input")]
    NotNumeric {
        /// The feature.
        feature: String,
    },
}
