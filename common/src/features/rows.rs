//! Schema enforcement for ingested files: the header matched to a view, each row checked
//! against every rule, and the report of what was wrong.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::value::{self, Cell, Key, Rule, Value};
use super::view::FeatureView;

/// How many row errors a report lists; the rest are only counted.
pub const MAX_REPORTED: usize = 20;

/// Why a file's columns do not fit a view.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeaderError {
    /// A column the view needs is absent.
    #[error("column {0:?} is missing")]
    Missing(String),
    /// A column the view does not declare.
    #[error("column {0:?} is not in the view")]
    Unknown(String),
    /// A column appears twice.
    #[error("column {0:?} appears twice")]
    Duplicate(String),
}

/// A checked row: key, event time (µs since the epoch), values in the view's feature order.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The entity.
    pub key: Key,
    /// When the values were true.
    pub time: i64,
    /// One value per feature of the view.
    pub values: Vec<Value>,
}

/// One broken rule in one row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowError {
    /// The data row, from 1 (the header is not counted).
    pub row: u64,
    /// The column.
    pub column: String,
    /// The value as found, shortened.
    pub value: String,
    /// The rule, in words.
    pub rule: String,
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "row {}, column {}: {} {}", self.row, self.column, self.value, self.rule)
    }
}

/// The first errors of a refused file and how many there were.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Rows read.
    pub rows: u64,
    /// Rows with at least one error.
    pub bad_rows: u64,
    /// Errors in all.
    pub errors: u64,
    /// The first [`MAX_REPORTED`] errors.
    pub first: Vec<RowError>,
}

impl Report {
    /// Records the errors of one row.
    pub fn add(&mut self, errors: Vec<RowError>) {
        if errors.is_empty() {
            return;
        }
        self.bad_rows += 1;
        self.errors += errors.len() as u64;
        let room = MAX_REPORTED.saturating_sub(self.first.len());
        self.first.extend(errors.into_iter().take(room));
    }
}

/// Where each of a view's columns sits in a file.
#[derive(Debug, Clone)]
pub struct RowSchema {
    view: FeatureView,
    key: usize,
    time: usize,
    /// Per feature, its column in the file (absent: a nullable feature left out).
    features: Vec<Option<usize>>,
    columns: Vec<String>,
}

impl RowSchema {
    /// Matches a file's header to `view`: every column known and once, the key, the event
    /// time and every non-nullable feature present.
    pub fn new(view: &FeatureView, header: &[&str]) -> Result<Self, HeaderError> {
        for (i, name) in header.iter().enumerate() {
            if header[..i].contains(name) {
                return Err(HeaderError::Duplicate((*name).to_owned()));
            }
            let known = *name == view.entity.name
                || *name == view.timestamp
                || view.feature(name).is_some();
            if !known {
                return Err(HeaderError::Unknown((*name).to_owned()));
            }
        }
        let find = |name: &str| header.iter().position(|h| *h == name);
        let needed = |name: &str| find(name).ok_or_else(|| HeaderError::Missing(name.to_owned()));
        let key = needed(&view.entity.name)?;
        let time = needed(&view.timestamp)?;
        let features = view
            .features
            .iter()
            .map(|f| match find(&f.name) {
                None if !f.nullable => Err(HeaderError::Missing(f.name.clone())),
                found => Ok(found),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            view: view.clone(),
            key,
            time,
            features,
            columns: header.iter().map(|&h| h.to_owned()).collect(),
        })
    }

    /// The view.
    pub fn view(&self) -> &FeatureView {
        &self.view
    }

    /// Checks row number `row` (from 1); `cells` are in the header's order. Returns the
    /// row, or every rule it breaks.
    pub fn check(&self, row: u64, cells: &[Cell<'_>]) -> Result<Row, Vec<RowError>> {
        let mut errors = Vec::new();
        let cell = |i: usize| cells.get(i).copied().unwrap_or(Cell::Null);
        let mut fail = |i: usize, rule: Rule| {
            errors.push(RowError {
                row,
                column: self.columns[i].clone(),
                value: cell(i).to_string(),
                rule: rule.to_string(),
            });
        };
        let key = value::accept_key(self.view.entity.kind, cell(self.key))
            .map_err(|r| fail(self.key, r))
            .ok();
        let time = value::accept_time(cell(self.time)).map_err(|r| fail(self.time, r)).ok();
        let mut values = Vec::with_capacity(self.features.len());
        for (feature, column) in self.view.features.iter().zip(&self.features) {
            let found = column.map_or(Cell::Null, cell);
            match value::accept(&feature.kind, feature.nullable, found) {
                Ok(v) => values.push(v),
                Err(rule) => fail(column.unwrap_or(self.key), rule),
            }
        }
        match (key, time) {
            (Some(key), Some(time)) if errors.is_empty() => Ok(Row { key, time, values }),
            _ => Err(errors),
        }
    }
}
