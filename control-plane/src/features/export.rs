//! Point-in-time correct training export: each label row (entity, time, labels) joined to
//! the entity's latest feature values at or before the label's own time, never after, as
//! Feast's historical retrieval does. A naive join on the latest values would hand a model
//! facts from after the moment it is asked to predict. On PostgreSQL an export holds the
//! view's lock shared ([`store::lock_view`]), so every label is joined to the same rows.
//!
//! On SQLite each label is one point query (in process, an index seek). On PostgreSQL,
//! where each query is a round trip, labels go [`LOOKUP_BATCH`] at a time as two arrays
//! (keys and times) into one query, `unnest ... WITH ORDINALITY` joined `LATERAL` to the
//! same point query, and come back in the file's order: the same answers, a round trip per
//! batch instead of per label.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float32Builder, Float64Builder, Int64Builder, StringBuilder,
};
use arrow_array::{ArrayRef, RecordBatch, TimestampMicrosecondArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use falaj_common::features::value::{self, format_time};
use falaj_common::features::{Cell, FeatureType, Key, KeyType, Report, RowError, Value};
use parquet::arrow::ArrowWriter;
use serde::Serialize;
use thiserror::Error;

use super::snapshot::point_query;
use super::store::{self, StoredView};
use crate::sql::{Array, AsSql, Backend, OptionalExt, Sql, SqlError, params};
use falaj_tables::{self as source, Format, ReadError, RowSink, SourceError};

/// Rows per Parquet batch written.
const BATCH_ROWS: usize = 8192;

/// Labels looked up in one query on PostgreSQL.
pub const LOOKUP_BATCH: usize = 2048;

/// Why an export was not made.
#[derive(Debug, Error)]
pub enum ExportError {
    /// No view of that name.
    #[error("no feature view {0:?}")]
    UnknownView(String),
    /// The labels file could not be read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The labels file's columns are not (entity, time, labels…).
    #[error("labels {file}: {message}")]
    Header {
        file: String,
        /// What is wrong.
        message: String,
    },
    /// Label rows with a bad entity id or time.
    #[error("labels {file}: {} of {} rows are invalid (first: {})", report.bad_rows, report.rows, report.first.first().map(RowError::to_string).unwrap_or_default())]
    Rows { file: String, report: Report },
    /// Writing the output failed.
    #[error("writing {path}: {message}")]
    Output {
        /// The output file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The offline store failed.
    #[error("offline store: {0}")]
    Store(#[from] SqlError),
}

/// What an export wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Exported {
    /// Label rows written.
    pub rows: u64,
    /// Of those, rows that found feature values at or before their time.
    pub matched: u64,
    /// The view version read.
    pub version: u64,
}

/// The column in the output holding the time of the feature row joined.
pub const FEATURE_TIME: &str = "feature_time";

/// Joins the labels at `labels` (named `file` in errors) to view `view` point in time, and
/// writes the result to `out` as `format`.
pub fn export<C: AsSql + ?Sized>(
    conn: &C,
    view: &str,
    labels: &Path,
    file: &str,
    out: &Path,
    format: Format,
) -> Result<Exported, ExportError> {
    let sql = conn.sql();
    // The lock (PostgreSQL) and the lookups in one transaction, so they see one state.
    let tx = sql.transaction()?;
    store::lock_view(&tx, view, false)?;
    let stored =
        store::current(&*tx, view)?.ok_or_else(|| ExportError::UnknownView(view.to_owned()))?;
    let labels_format = Format::detect(labels)?;
    // First pass: check every row and learn which label columns are numeric.
    let mut scan =
        Scan { stored: &stored, layout: None, numeric: Vec::new(), report: Report::default() };
    match source::read(labels, labels_format, &mut scan) {
        Err(ReadError::Source(e)) => return Err(e.into()),
        Err(ReadError::Sink(message)) => {
            return Err(ExportError::Header { file: file.to_owned(), message });
        }
        Ok(_) if scan.report.bad_rows > 0 => {
            return Err(ExportError::Rows { file: file.to_owned(), report: scan.report });
        }
        Ok(_) => {}
    }
    let layout = scan.layout.expect("the header was read");
    let label_kinds: Vec<FeatureType> = scan
        .numeric
        .iter()
        .map(|&n| if n { FeatureType::F64 } else { FeatureType::String })
        .collect();
    let output = Output::create(out, format, &stored, &layout, &label_kinds)?;
    let lookup = match tx.backend() {
        Backend::Sqlite => point_query(&stored, Backend::Sqlite),
        Backend::Postgres => batch_query(&stored),
    };
    let mut join = Join {
        stored: &stored,
        layout: &layout,
        label_kinds: &label_kinds,
        sql: *tx,
        lookup,
        pending: Vec::new(),
        output,
        rows: 0,
        matched: 0,
    };
    match source::read(labels, labels_format, &mut join) {
        Err(ReadError::Source(e)) => return Err(e.into()),
        Err(ReadError::Sink(e)) => return Err(e),
        Ok(_) => {}
    }
    join.flush()?;
    let (rows, matched) = (join.rows, join.matched);
    join.output.finish(out)?;
    tx.commit()?;
    Ok(Exported { rows, matched, version: stored.version })
}

/// Where the entity, the time and the labels are in the labels file.
struct Layout {
    key: usize,
    time: usize,
    labels: Vec<(usize, String)>,
    time_name: String,
}

struct Scan<'a> {
    stored: &'a StoredView,
    layout: Option<Layout>,
    numeric: Vec<bool>,
    report: Report,
}

impl RowSink for Scan<'_> {
    type Error = String;

    fn header(&mut self, names: &[&str]) -> Result<(), String> {
        let view = &self.stored.view;
        let find = |name: &str| {
            names
                .iter()
                .position(|n| *n == name)
                .ok_or_else(|| format!("column {name:?} is missing"))
        };
        let key = find(&view.entity.name)?;
        let time = find(&view.timestamp)?;
        let mut labels = Vec::new();
        for (i, name) in names.iter().enumerate().filter(|(i, _)| *i != key && *i != time) {
            if view.feature(name).is_some() || *name == FEATURE_TIME {
                return Err(format!("label column {name:?} has the name of a feature column"));
            }
            labels.push((i, (*name).to_owned()));
        }
        if labels.is_empty() {
            return Err("there is no label column".to_owned());
        }
        self.numeric = vec![true; labels.len()];
        self.layout = Some(Layout { key, time, labels, time_name: view.timestamp.clone() });
        Ok(())
    }

    fn row(&mut self, number: u64, cells: &[Cell<'_>]) -> Result<(), String> {
        let layout = self.layout.as_ref().expect("the header comes first");
        self.report.rows = number;
        let cell = |i: usize| cells.get(i).copied().unwrap_or(Cell::Null);
        let mut errors = Vec::new();
        let mut fail = |i: usize, name: &str, rule: value::Rule| {
            errors.push(RowError {
                row: number,
                column: name.to_owned(),
                value: cell(i).to_string(),
                rule: rule.to_string(),
            });
        };
        if let Err(rule) = value::accept_key(self.stored.view.entity.kind, cell(layout.key)) {
            fail(layout.key, &self.stored.view.entity.name, rule);
        }
        if let Err(rule) = value::accept_time(cell(layout.time)) {
            fail(layout.time, &layout.time_name, rule);
        }
        self.report.add(errors);
        for ((i, _), numeric) in layout.labels.iter().zip(&mut self.numeric) {
            *numeric &= label(cell(*i), &FeatureType::F64) != Value::Null || cell(*i) == Cell::Null;
        }
        Ok(())
    }
}

/// A label cell as `kind` (`F64` or `String`); null when it is not one.
fn label(cell: Cell<'_>, kind: &FeatureType) -> Value {
    match (kind, cell) {
        (_, Cell::Null) => Value::Null,
        (FeatureType::F64, cell) => {
            value::accept(&FeatureType::F64, true, cell).unwrap_or(Value::Null)
        }
        (_, Cell::Text(t)) => Value::Str(t.to_owned()),
        (_, other) => Value::Str(other.to_string()),
    }
}

/// The point query of [`point_query`] for a batch of labels on PostgreSQL: `$1` the keys,
/// `$2` the times, each answer with its label's place in the batch (from 1) first, then
/// the feature row's time and its values, as `point_query`'s columns from the second on.
/// Labels that find no row have no answer.
fn batch_query(stored: &StoredView) -> String {
    let keys = match stored.view.entity.kind {
        KeyType::I64 => "BIGINT[]",
        KeyType::String => "TEXT[]",
    };
    format!(
        "SELECT l.n, f.* FROM unnest($1::{keys}, $2::BIGINT[]) WITH ORDINALITY AS l(k, t, n)
         CROSS JOIN LATERAL (
             SELECT event_time, {} FROM {} WHERE entity = l.k AND event_time <= l.t
             ORDER BY event_time DESC LIMIT 1
         ) AS f",
        store::feature_columns(&stored.view),
        stored.table(Backend::Postgres)
    )
}

/// A label row waiting for its batch's lookup (PostgreSQL).
struct Pending {
    key: Key,
    time: i64,
    labels: Vec<Value>,
}

struct Join<'a> {
    stored: &'a StoredView,
    layout: &'a Layout,
    label_kinds: &'a [FeatureType],
    sql: Sql<'a>,
    /// [`point_query`] on SQLite, [`batch_query`] on PostgreSQL.
    lookup: String,
    /// On PostgreSQL, the labels read since the last batch was looked up.
    pending: Vec<Pending>,
    output: Output,
    rows: u64,
    matched: u64,
}

impl Join<'_> {
    /// Writes `row`'s output: its labels and the feature row found (time and values), or
    /// nulls.
    fn write(&mut self, row: Pending, found: Option<(i64, Vec<Value>)>) -> Result<(), ExportError> {
        let features = &self.stored.view.features;
        self.rows += 1;
        self.matched += u64::from(found.is_some());
        let (feature_time, values) = match found {
            Some((t, v)) => (Some(t), v),
            None => (None, vec![Value::Null; features.len()]),
        };
        let Pending { key, time, labels } = row;
        self.output.push(OutRow { key, time, labels, feature_time, values })
    }

    /// Looks up the pending labels in one query and writes them, in the file's order.
    fn flush(&mut self) -> Result<(), ExportError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let times = Array(pending.iter().map(|p| p.time).collect::<Vec<i64>>());
        let stored = self.stored;
        let read = |row: &crate::sql::Row<'_>| {
            Ok((row.get::<i64>(0)?, row.get::<i64>(1)?, store::row_values(stored, row)?))
        };
        // The keys as their column's type: every one is, having passed `accept_key`.
        let mismatch = || SqlError::Conversion {
            column: 0,
            message: "a label's key is not of the view's entity type".to_owned(),
        };
        let answers = match self.stored.view.entity.kind {
            KeyType::I64 => {
                let keys = pending
                    .iter()
                    .map(|p| if let Key::Int(k) = p.key { Ok(k) } else { Err(mismatch()) })
                    .collect::<Result<Vec<i64>, _>>()?;
                self.sql.query_map(&self.lookup, params![Array(keys), times], read)?
            }
            KeyType::String => {
                let keys = pending
                    .iter()
                    .map(|p| match &p.key {
                        Key::Str(k) => Ok(k.clone()),
                        Key::Int(_) => Err(mismatch()),
                    })
                    .collect::<Result<Vec<String>, _>>()?;
                self.sql.query_map(&self.lookup, params![Array(keys), times], read)?
            }
        };
        let mut found: Vec<Option<(i64, Vec<Value>)>> = vec![None; pending.len()];
        for (n, time, values) in answers {
            let slot = usize::try_from(n - 1).ok().and_then(|i| found.get_mut(i));
            let slot = slot.ok_or_else(|| SqlError::Conversion {
                column: 0,
                message: format!("no label {n} in the batch"),
            })?;
            *slot = Some((time, values));
        }
        for (row, found) in pending.into_iter().zip(found) {
            self.write(row, found)?;
        }
        Ok(())
    }
}

impl RowSink for Join<'_> {
    type Error = ExportError;

    fn header(&mut self, _: &[&str]) -> Result<(), ExportError> {
        Ok(())
    }

    fn row(&mut self, _: u64, cells: &[Cell<'_>]) -> Result<(), ExportError> {
        let cell = |i: usize| cells.get(i).copied().unwrap_or(Cell::Null);
        // Both were checked by the first pass.
        let (Ok(key), Ok(time)) = (
            value::accept_key(self.stored.view.entity.kind, cell(self.layout.key)),
            value::accept_time(cell(self.layout.time)),
        ) else {
            return Ok(());
        };
        let labels = self
            .layout
            .labels
            .iter()
            .zip(self.label_kinds)
            .map(|((i, _), k)| label(cell(*i), k))
            .collect();
        let row = Pending { key, time, labels };
        if self.sql.backend() == Backend::Postgres {
            self.pending.push(row);
            if self.pending.len() >= LOOKUP_BATCH {
                self.flush()?;
            }
            return Ok(());
        }
        let bound = store::sql_key(&row.key);
        let found = self
            .sql
            .query_row(&self.lookup, &[bound.param(), &row.time], |r| {
                Ok((r.get::<i64>(1)?, store::row_values(self.stored, r)?))
            })
            .optional()?;
        self.write(row, found)
    }
}

struct OutRow {
    key: Key,
    time: i64,
    labels: Vec<Value>,
    feature_time: Option<i64>,
    values: Vec<Value>,
}

enum Output {
    Csv(csv::Writer<BufWriter<File>>, PathBuf),
    Parquet {
        writer: ArrowWriter<File>,
        schema: SchemaRef,
        kinds: Vec<FeatureType>,
        key: KeyType,
        rows: Vec<OutRow>,
        path: PathBuf,
    },
}

impl Output {
    fn create(
        path: &Path,
        format: Format,
        stored: &StoredView,
        layout: &Layout,
        label_kinds: &[FeatureType],
    ) -> Result<Self, ExportError> {
        let failed = |e: &dyn std::fmt::Display| ExportError::Output {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let file = File::create(path).map_err(|e| failed(&e))?;
        let view = &stored.view;
        let mut names = vec![view.entity.name.clone(), layout.time_name.clone()];
        names.extend(layout.labels.iter().map(|(_, n)| n.clone()));
        names.push(FEATURE_TIME.to_owned());
        names.extend(view.features.iter().map(|f| f.name.clone()));
        match format {
            Format::Csv => {
                let mut writer = csv::Writer::from_writer(BufWriter::new(file));
                writer.write_record(&names).map_err(|e| failed(&e))?;
                Ok(Self::Csv(writer, path.to_owned()))
            }
            Format::Parquet => {
                let key = match view.entity.kind {
                    KeyType::String => DataType::Utf8,
                    KeyType::I64 => DataType::Int64,
                };
                let mut fields = vec![
                    Field::new(&names[0], key, false),
                    Field::new(&names[1], time_type(), false),
                ];
                let mut kinds = label_kinds.to_vec();
                kinds.extend(view.features.iter().map(|f| f.kind.clone()));
                for (name, kind) in layout.labels.iter().map(|(_, n)| n).zip(label_kinds) {
                    fields.push(Field::new(name, data_type(kind), true));
                }
                fields.push(Field::new(FEATURE_TIME, time_type(), true));
                for f in &view.features {
                    fields.push(Field::new(&f.name, data_type(&f.kind), true));
                }
                let schema: SchemaRef = Arc::new(Schema::new(fields));
                let writer =
                    ArrowWriter::try_new(file, schema.clone(), None).map_err(|e| failed(&e))?;
                Ok(Self::Parquet {
                    writer,
                    schema,
                    kinds,
                    key: view.entity.kind,
                    rows: Vec::new(),
                    path: path.to_owned(),
                })
            }
        }
    }

    fn push(&mut self, row: OutRow) -> Result<(), ExportError> {
        match self {
            Self::Csv(writer, path) => {
                let text = |v: &Value| match v {
                    Value::Null => String::new(),
                    other => other.canonical_text(),
                };
                let mut record = vec![row.key.to_string(), format_time(row.time)];
                record.extend(row.labels.iter().map(text));
                record.push(row.feature_time.map(format_time).unwrap_or_default());
                record.extend(row.values.iter().map(text));
                writer
                    .write_record(&record)
                    .map_err(|e| ExportError::Output { path: path.clone(), message: e.to_string() })
            }
            Self::Parquet { rows, .. } => {
                rows.push(row);
                if rows.len() == BATCH_ROWS {
                    self.flush()?;
                }
                Ok(())
            }
        }
    }

    fn flush(&mut self) -> Result<(), ExportError> {
        let Self::Parquet { writer, schema, kinds, key, rows, path } = self else { return Ok(()) };
        if rows.is_empty() {
            return Ok(());
        }
        let labels = rows[0].labels.len();
        let mut columns = vec![
            key_column(*key, rows.iter().map(|r| &r.key)),
            time_column(rows.iter().map(|r| Some(r.time))),
        ];
        for (i, kind) in kinds[..labels].iter().enumerate() {
            columns.push(column(kind, rows.iter().map(|r| &r.labels[i])));
        }
        columns.push(time_column(rows.iter().map(|r| r.feature_time)));
        for (i, kind) in kinds[labels..].iter().enumerate() {
            columns.push(column(kind, rows.iter().map(|r| &r.values[i])));
        }
        let failed = |e: &dyn std::fmt::Display| ExportError::Output {
            path: path.clone(),
            message: e.to_string(),
        };
        let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|e| failed(&e))?;
        writer.write(&batch).map_err(|e| failed(&e))?;
        rows.clear();
        Ok(())
    }

    fn finish(mut self, out: &Path) -> Result<(), ExportError> {
        self.flush()?;
        let failed = |e: &dyn std::fmt::Display| ExportError::Output {
            path: out.to_owned(),
            message: e.to_string(),
        };
        let file = match self {
            Self::Csv(writer, _) => {
                writer.into_inner().map_err(|e| failed(&e))?.into_inner().map_err(|e| failed(&e))?
            }
            Self::Parquet { writer, .. } => writer.into_inner().map_err(|e| failed(&e))?,
        };
        file.sync_all().map_err(|e| failed(&e))?;
        Ok(())
    }
}

/// An Arrow array of entity keys of type `kind`.
fn key_column<'a>(kind: KeyType, keys: impl Iterator<Item = &'a Key>) -> ArrayRef {
    match kind {
        KeyType::String => {
            let mut b = StringBuilder::new();
            keys.for_each(|k| b.append_value(k.to_string()));
            Arc::new(b.finish())
        }
        KeyType::I64 => {
            let mut b = Int64Builder::new();
            keys.for_each(|k| match k {
                Key::Int(v) => b.append_value(*v),
                Key::Str(_) => b.append_null(),
            });
            Arc::new(b.finish())
        }
    }
}

/// An Arrow array of UTC timestamps (µs since the epoch).
fn time_column(times: impl Iterator<Item = Option<i64>>) -> ArrayRef {
    Arc::new(times.collect::<TimestampMicrosecondArray>().with_timezone("UTC"))
}

/// The Arrow type of a feature type.
fn data_type(kind: &FeatureType) -> DataType {
    match kind {
        FeatureType::F32 => DataType::Float32,
        FeatureType::F64 => DataType::Float64,
        FeatureType::I64 => DataType::Int64,
        FeatureType::Bool => DataType::Boolean,
        FeatureType::String | FeatureType::Category { .. } => DataType::Utf8,
    }
}

/// The Arrow type of UTC timestamps in µs.
fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// An Arrow array of `kind` holding `values` (a value of another type becomes null).
fn column<'a>(kind: &FeatureType, values: impl Iterator<Item = &'a Value>) -> ArrayRef {
    match kind {
        FeatureType::F32 => {
            let mut b = Float32Builder::new();
            values.for_each(|v| b.append_option(v.as_f32()));
            Arc::new(b.finish())
        }
        FeatureType::F64 => {
            let mut b = Float64Builder::new();
            values.for_each(|v| {
                b.append_option(match v {
                    Value::F64(x) => Some(*x),
                    _ => None,
                });
            });
            Arc::new(b.finish())
        }
        FeatureType::I64 => {
            let mut b = Int64Builder::new();
            values.for_each(|v| {
                b.append_option(match v {
                    Value::I64(x) => Some(*x),
                    _ => None,
                });
            });
            Arc::new(b.finish())
        }
        FeatureType::Bool => {
            let mut b = BooleanBuilder::new();
            values.for_each(|v| {
                b.append_option(match v {
                    Value::Bool(x) => Some(*x),
                    _ => None,
                });
            });
            Arc::new(b.finish())
        }
        FeatureType::String | FeatureType::Category { .. } => {
            let mut b = StringBuilder::new();
            values.for_each(|v| {
                b.append_option(match v {
                    Value::Str(x) => Some(x.as_str()),
                    _ => None,
                });
            });
            Arc::new(b.finish())
        }
    }
}
