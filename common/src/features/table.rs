//! Snapshot payloads: the latest value per entity of one view as uncompressed Parquet
//! without dictionaries or statistics, rows sorted by entity key, so a snapshot of a slowly
//! changing table differs from the last one only where values changed and the transfer's
//! content-defined chunks move little; and the in-memory table an agent serves lookups from.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Float32Builder, Float64Builder, Int64Builder, StringBuilder,
};
use arrow_array::{Array, ArrayRef, RecordBatch, TimestampMicrosecondArray, cast::AsArray};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use thiserror::Error;

use super::pii::{Pseudonymiser, Treatment};
use super::snapshot::SnapshotSpec;
use super::value::{self, Key, Rule, Value};
use super::view::{FeatureType, FeatureView, KeyType};

/// Rows per Parquet row group and per record batch.
const BATCH_ROWS: usize = 65_536;

/// The Arrow schema of the payload: key, `event_time` (µs, UTC), then the features.
pub fn schema(spec: &SnapshotSpec) -> SchemaRef {
    let key = match spec.entity.kind {
        KeyType::String => DataType::Utf8,
        KeyType::I64 => DataType::Int64,
    };
    let mut fields =
        vec![Field::new(&spec.entity.name, key, false), Field::new(EVENT_TIME, time_type(), false)];
    fields
        .extend(spec.features.iter().map(|f| Field::new(&f.name, data_type(&f.kind), f.nullable)));
    Arc::new(Schema::new(fields))
}

/// The payload column holding each entity's event time.
pub const EVENT_TIME: &str = "event_time";

/// Why a snapshot could not be written or read.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The Parquet encoder or decoder failed.
    #[error("snapshot {view}: parquet: {source}")]
    Parquet {
        /// The view.
        view: String,
        /// The error.
        source: parquet::errors::ParquetError,
    },
    /// Arrow refused a batch (a bug in the caller, or a payload of another shape).
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

/// Streams rows (sorted by key, each key once) into the snapshot payload; memory holds one
/// batch.
pub struct SnapshotWriter<W: Write + Send> {
    spec: SnapshotSpec,
    schema: SchemaRef,
    treatments: Vec<Treatment>,
    names: Vec<String>,
    pseudonymiser: Option<Pseudonymiser>,
    writer: ArrowWriter<W>,
    pending: Vec<(Key, i64, Vec<Value>)>,
    last: Option<Key>,
}

impl<W: Write + Send> SnapshotWriter<W> {
    /// A writer of `spec`'s payload into `out`; rows come with every feature of `view`,
    /// treated as `treatments` says (hashed with `pseudonymiser`).
    pub fn new(
        view: &FeatureView,
        spec: SnapshotSpec,
        treatments: Vec<Treatment>,
        pseudonymiser: Option<Pseudonymiser>,
        out: W,
    ) -> Result<Self, SnapshotError> {
        let schema = schema(&spec);
        let props = WriterProperties::builder()
            .set_compression(Compression::UNCOMPRESSED)
            .set_dictionary_enabled(false)
            .set_statistics_enabled(EnabledStatistics::None)
            .set_max_row_group_row_count(Some(BATCH_ROWS))
            .build();
        let writer = ArrowWriter::try_new(out, schema.clone(), Some(props))
            .map_err(|source| SnapshotError::Parquet { view: spec.view.clone(), source })?;
        Ok(Self {
            spec,
            schema,
            treatments,
            names: view.features.iter().map(|f| f.name.clone()).collect(),
            pseudonymiser,
            writer,
            pending: Vec::with_capacity(BATCH_ROWS),
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
        self.last = Some(key.clone());
        let mut carried = Vec::with_capacity(self.spec.features.len());
        for ((value, treatment), feature) in
            values.into_iter().zip(&self.treatments).zip(&self.names)
        {
            match treatment {
                Treatment::Raw => carried.push(value),
                Treatment::Drop => {}
                Treatment::Hash => {
                    let p = self.pseudonymiser.as_ref().expect("a hash plan has a key");
                    carried.push(p.pseudonym(feature, &value));
                }
            }
        }
        self.pending.push((key, time, carried));
        if self.pending.len() == BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SnapshotError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.pending);
        let batch = to_batch(&self.spec, &self.schema, &rows)?;
        self.spec.entities += rows.len() as u64;
        self.writer.write(&batch).map_err(|source| self.parquet(source))
    }

    fn parquet(&self, source: parquet::errors::ParquetError) -> SnapshotError {
        SnapshotError::Parquet { view: self.spec.view.clone(), source }
    }

    /// Writes the footer; returns the spec with its entity count, and the sink.
    pub fn finish(mut self) -> Result<(SnapshotSpec, W), SnapshotError> {
        self.flush()?;
        let view = self.spec.view.clone();
        let out =
            self.writer.into_inner().map_err(|source| SnapshotError::Parquet { view, source })?;
        Ok((self.spec, out))
    }
}

fn to_batch(
    spec: &SnapshotSpec,
    schema: &SchemaRef,
    rows: &[(Key, i64, Vec<Value>)],
) -> Result<RecordBatch, SnapshotError> {
    let key = key_column(spec.entity.kind, rows.iter().map(|r| &r.0));
    let mut columns = vec![key, time_column(rows.iter().map(|r| Some(r.1)))];
    for (i, feature) in spec.features.iter().enumerate() {
        let values = rows.iter().map(|r| &r.2[i]);
        columns.push(column(&feature.kind, values));
    }
    RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| SnapshotError::Shape { view: spec.view.clone(), message: e.to_string() })
}

/// An Arrow array of entity keys of type `kind`.
pub fn key_column<'a>(kind: KeyType, keys: impl Iterator<Item = &'a Key>) -> ArrayRef {
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
pub fn time_column(times: impl Iterator<Item = Option<i64>>) -> ArrayRef {
    Arc::new(times.collect::<TimestampMicrosecondArray>().with_timezone("UTC"))
}

/// The Arrow type of a feature type.
pub fn data_type(kind: &FeatureType) -> DataType {
    match kind {
        FeatureType::F32 => DataType::Float32,
        FeatureType::F64 => DataType::Float64,
        FeatureType::I64 => DataType::Int64,
        FeatureType::Bool => DataType::Boolean,
        FeatureType::String | FeatureType::Category { .. } => DataType::Utf8,
    }
}

/// The Arrow type of UTC timestamps in µs.
pub fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// An Arrow array of `kind` holding `values` (a value of another type becomes null).
pub fn column<'a>(kind: &FeatureType, values: impl Iterator<Item = &'a Value>) -> ArrayRef {
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
    /// Reads a snapshot payload, checking its columns against `spec`.
    pub fn load(spec: SnapshotSpec, payload: bytes::Bytes) -> Result<Self, SnapshotError> {
        let view = spec.view.clone();
        let parquet = |source| SnapshotError::Parquet { view: view.clone(), source };
        let shape = |message: String| SnapshotError::Shape { view: view.clone(), message };
        let reader = ParquetRecordBatchReaderBuilder::try_new(payload)
            .map_err(parquet)?
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(parquet)?;
        let schema = schema(&spec);
        let mut batches = Vec::new();
        for batch in reader {
            let batch = batch.map_err(|e| shape(e.to_string()))?;
            if batch.schema().fields() != schema.fields() {
                return Err(shape(format!(
                    "payload columns {:?} differ from the manifest's",
                    batch.schema().fields().iter().map(|f| f.name()).collect::<Vec<_>>()
                )));
            }
            batches.push(batch);
        }
        let concat = |i: usize| -> Result<ArrayRef, SnapshotError> {
            let parts: Vec<&dyn Array> = batches.iter().map(|b| b.column(i).as_ref()).collect();
            if parts.is_empty() {
                return Ok(arrow_array::new_empty_array(schema.field(i).data_type()));
            }
            arrow_select::concat::concat(&parts).map_err(|e| shape(e.to_string()))
        };
        let keys = concat(0)?;
        let rows = keys.len();
        if rows > u32::MAX as usize || rows as u64 != spec.entities {
            return Err(shape(format!("{rows} rows, the manifest says {}", spec.entities)));
        }
        let index = match spec.entity.kind {
            KeyType::String => Index::Str(
                keys.as_string::<i32>()
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (Box::from(k.unwrap_or_default()), i as u32))
                    .collect(),
            ),
            KeyType::I64 => Index::Int(
                keys.as_primitive::<arrow_array::types::Int64Type>()
                    .values()
                    .iter()
                    .enumerate()
                    .map(|(i, k)| (*k, i as u32))
                    .collect(),
            ),
        };
        let distinct = match &index {
            Index::Str(m) => m.len(),
            Index::Int(m) => m.len(),
        };
        if distinct != rows {
            return Err(shape(format!("{} entities repeated", rows - distinct)));
        }
        let times = concat(1)?
            .as_primitive::<arrow_array::types::TimestampMicrosecondType>()
            .values()
            .to_vec();
        let columns = (0..spec.features.len()).map(|i| concat(i + 2)).collect::<Result<_, _>>()?;
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
