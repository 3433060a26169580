//! Reading tabular files (CSV with a header, or Parquet) a row at a time, as typed cells,
//! in bounded memory: one CSV record or one Parquet batch at a time. The control plane
//! ingests feature data and label files through it; agents read fine-tuning data.

#![warn(unreachable_pub)]

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt8Type, UInt16Type,
    UInt32Type,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use falaj_common::features::Cell;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::reader::ChunkReader;
use thiserror::Error;

#[cfg(feature = "fuzzing")]
pub mod fuzzing;

/// Rows per Parquet batch read.
const BATCH_ROWS: usize = 8192;

/// A tabular file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Comma-separated, with a header row.
    Csv,
    /// Apache Parquet.
    Parquet,
}

impl Format {
    /// The format of `path`, from its first bytes (Parquet files start with `PAR1`).
    pub fn detect(path: &Path) -> Result<Self, SourceError> {
        let mut magic = [0u8; 4];
        let mut file = File::open(path).map_err(|e| SourceError::io(path, e))?;
        let n = file.read(&mut magic).map_err(|e| SourceError::io(path, e))?;
        Ok(if n == 4 && &magic == b"PAR1" { Self::Parquet } else { Self::Csv })
    }

    /// The format named by an output file's extension.
    pub fn of_output(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()? {
            "csv" => Some(Self::Csv),
            "parquet" => Some(Self::Parquet),
            _ => None,
        }
    }

    /// `csv` or `parquet`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Parquet => "parquet",
        }
    }
}

/// Why a file could not be read.
#[derive(Debug, Error)]
pub enum SourceError {
    /// Opening or reading failed.
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// Not CSV of the expected shape (a row of another width, bad UTF-8).
    #[error("{path}: {message}")]
    Csv {
        path: PathBuf,
        /// What the CSV reader said, with the position.
        message: String,
    },
    /// Not readable Parquet.
    #[error("{path}: not readable Parquet: {message}")]
    Parquet {
        path: PathBuf,
        /// What the reader said.
        message: String,
    },
    /// A Parquet column of a type no feature can hold.
    #[error("{path}: column {column:?} has Parquet type {kind}, which no feature holds")]
    ColumnType {
        path: PathBuf,
        column: String,
        /// Its type.
        kind: String,
    },
}

impl SourceError {
    fn io(path: &Path, source: io::Error) -> Self {
        Self::Io { path: path.to_owned(), source }
    }
}

/// What consumes a file's rows.
pub trait RowSink {
    /// What the sink refuses with.
    type Error;
    /// The column names, before any row.
    fn header(&mut self, names: &[&str]) -> Result<(), Self::Error>;
    /// Row `number` (from 1), one cell per column.
    fn row(&mut self, number: u64, cells: &[Cell<'_>]) -> Result<(), Self::Error>;
}

/// A failure of the file or of the sink.
#[derive(Debug)]
pub enum ReadError<E> {
    Source(SourceError),
    /// The sink refused.
    Sink(E),
}

/// Feeds every row of `path` to `sink`; returns the number of rows.
pub fn read<S: RowSink>(
    path: &Path,
    format: Format,
    sink: &mut S,
) -> Result<u64, ReadError<S::Error>> {
    match format {
        Format::Csv => read_csv(path, sink),
        Format::Parquet => read_parquet(path, sink),
    }
}

/// Feeds every row of a file held in memory to `sink` (errors name `label` as the file);
/// returns the number of rows.
pub fn read_bytes<S: RowSink>(
    bytes: &[u8],
    label: &Path,
    format: Format,
    sink: &mut S,
) -> Result<u64, ReadError<S::Error>> {
    match format {
        Format::Csv => csv_rows(bytes, label, sink),
        Format::Parquet => parquet_rows(bytes::Bytes::copy_from_slice(bytes), label, sink),
    }
}

fn read_csv<S: RowSink>(path: &Path, sink: &mut S) -> Result<u64, ReadError<S::Error>> {
    let file = File::open(path).map_err(|e| ReadError::Source(SourceError::io(path, e)))?;
    csv_rows(io::BufReader::with_capacity(1 << 20, file), path, sink)
}

fn csv_rows<S: RowSink>(
    input: impl Read,
    path: &Path,
    sink: &mut S,
) -> Result<u64, ReadError<S::Error>> {
    let csv_error = |e: csv::Error| {
        ReadError::Source(if e.is_io_error() {
            match e.into_kind() {
                csv::ErrorKind::Io(source) => SourceError::io(path, source),
                _ => unreachable!("an I/O error's kind is Io"),
            }
        } else {
            SourceError::Csv { path: path.to_owned(), message: e.to_string() }
        })
    };
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(input);
    let header = reader.headers().map_err(csv_error)?.clone();
    let names: Vec<&str> = header.iter().map(str::trim).collect();
    sink.header(&names).map_err(ReadError::Sink)?;
    let mut record = csv::StringRecord::new();
    let mut spare = Vec::with_capacity(names.len());
    let mut number = 0;
    while reader.read_record(&mut record).map_err(csv_error)? {
        number += 1;
        let mut cells = recycle(spare);
        cells.extend(record.iter().map(|t| if t.is_empty() { Cell::Null } else { Cell::Text(t) }));
        sink.row(number, &cells).map_err(ReadError::Sink)?;
        spare = recycle(cells);
    }
    Ok(number)
}

fn read_parquet<S: RowSink>(path: &Path, sink: &mut S) -> Result<u64, ReadError<S::Error>> {
    let file = File::open(path).map_err(|e| ReadError::Source(SourceError::io(path, e)))?;
    parquet_rows(file, path, sink)
}

fn parquet_rows<S: RowSink>(
    file: impl ChunkReader + 'static,
    path: &Path,
    sink: &mut S,
) -> Result<u64, ReadError<S::Error>> {
    let parquet = |e: &dyn std::fmt::Display| {
        ReadError::Source(SourceError::Parquet { path: path.to_owned(), message: e.to_string() })
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| parquet(&e))?;
    let schema = builder.schema().clone();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    for field in schema.fields() {
        if !Column::supports(field.data_type()) {
            return Err(ReadError::Source(SourceError::ColumnType {
                path: path.to_owned(),
                column: field.name().clone(),
                kind: field.data_type().to_string(),
            }));
        }
    }
    sink.header(&names).map_err(ReadError::Sink)?;
    let reader = builder.with_batch_size(BATCH_ROWS).build().map_err(|e| parquet(&e))?;
    let mut number = 0;
    let mut spare = Vec::with_capacity(names.len());
    for batch in reader {
        let batch: RecordBatch = batch.map_err(|e| parquet(&e))?;
        let columns: Vec<Column<'_>> = batch.columns().iter().map(Column::new).collect();
        for row in 0..batch.num_rows() {
            number += 1;
            let mut cells = recycle(spare);
            cells.extend(columns.iter().map(|c| c.cell(row)));
            sink.row(number, &cells).map_err(ReadError::Sink)?;
            spare = recycle(cells);
        }
    }
    Ok(number)
}

/// An emptied row buffer, its allocation kept, for cells that borrow from the next
/// record (collecting an emptied vector reuses its allocation).
fn recycle<'b>(mut cells: Vec<Cell<'_>>) -> Vec<Cell<'b>> {
    cells.clear();
    cells.into_iter().map(|_| Cell::Null).collect()
}

/// A Parquet column, typed once per batch so each cell is one match.
enum Column<'a> {
    Text(&'a dyn Array, Box<dyn Fn(usize) -> &'a str + 'a>),
    Int(&'a dyn Array, Box<dyn Fn(usize) -> i64 + 'a>),
    Float(&'a dyn Array, Box<dyn Fn(usize) -> f64 + 'a>),
    Bool(&'a dyn Array, Box<dyn Fn(usize) -> bool + 'a>),
    Micros(&'a dyn Array, Box<dyn Fn(usize) -> i64 + 'a>),
}

impl<'a> Column<'a> {
    fn supports(kind: &DataType) -> bool {
        matches!(
            kind,
            DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Int8
                | DataType::Int16
                | DataType::Int32
                | DataType::Int64
                | DataType::UInt8
                | DataType::UInt16
                | DataType::UInt32
                | DataType::Float32
                | DataType::Float64
                | DataType::Boolean
                | DataType::Timestamp(_, _)
        ) || matches!(kind, DataType::Dictionary(_, v) if **v == DataType::Utf8)
    }

    fn new(array: &'a ArrayRef) -> Self {
        let a: &'a dyn Array = array.as_ref();
        match array.data_type() {
            DataType::Utf8 => {
                let v = a.as_string::<i32>();
                Self::Text(a, Box::new(|i| v.value(i)))
            }
            DataType::LargeUtf8 => {
                let v = a.as_string::<i64>();
                Self::Text(a, Box::new(|i| v.value(i)))
            }
            DataType::Dictionary(_, _) => {
                let dict = a.as_any_dictionary();
                let keys = dict.normalized_keys();
                let values = dict.values().as_string::<i32>();
                Self::Text(a, Box::new(move |i| values.value(keys[i])))
            }
            DataType::Int8 => int::<Int8Type>(a),
            DataType::Int16 => int::<Int16Type>(a),
            DataType::Int32 => int::<Int32Type>(a),
            DataType::Int64 => int::<Int64Type>(a),
            DataType::UInt8 => int::<UInt8Type>(a),
            DataType::UInt16 => int::<UInt16Type>(a),
            DataType::UInt32 => int::<UInt32Type>(a),
            DataType::Float32 => {
                let v = a.as_primitive::<Float32Type>();
                Self::Float(a, Box::new(|i| v.value(i).into()))
            }
            DataType::Float64 => {
                let v = a.as_primitive::<Float64Type>();
                Self::Float(a, Box::new(|i| v.value(i)))
            }
            DataType::Boolean => {
                let v = a.as_boolean();
                Self::Bool(a, Box::new(|i| v.value(i)))
            }
            DataType::Timestamp(TimeUnit::Second, _) => {
                let v = a.as_primitive::<TimestampSecondType>();
                Self::Micros(a, Box::new(|i| v.value(i).saturating_mul(1_000_000)))
            }
            DataType::Timestamp(TimeUnit::Millisecond, _) => {
                let v = a.as_primitive::<TimestampMillisecondType>();
                Self::Micros(a, Box::new(|i| v.value(i).saturating_mul(1000)))
            }
            DataType::Timestamp(TimeUnit::Microsecond, _) => {
                let v = a.as_primitive::<TimestampMicrosecondType>();
                Self::Micros(a, Box::new(|i| v.value(i)))
            }
            DataType::Timestamp(TimeUnit::Nanosecond, _) => {
                let v = a.as_primitive::<TimestampNanosecondType>();
                Self::Micros(a, Box::new(|i| v.value(i) / 1000))
            }
            // `supports` was checked for every column of the file's schema.
            other => unreachable!("unsupported column type {other}"),
        }
    }

    fn cell(&self, row: usize) -> Cell<'a> {
        let (Self::Text(array, _)
        | Self::Int(array, _)
        | Self::Float(array, _)
        | Self::Bool(array, _)
        | Self::Micros(array, _)) = self;
        if array.is_null(row) {
            return Cell::Null;
        }
        match self {
            Self::Text(_, f) => Cell::Text(f(row)),
            Self::Int(_, f) => Cell::Int(f(row)),
            Self::Float(_, f) => Cell::Float(f(row)),
            Self::Bool(_, f) => Cell::Bool(f(row)),
            Self::Micros(_, f) => Cell::Micros(f(row)),
        }
    }
}

fn int<T>(a: &dyn Array) -> Column<'_>
where
    T: arrow_array::types::ArrowPrimitiveType,
    T::Native: Into<i64>,
{
    let v = a.as_primitive::<T>();
    Column::Int(a, Box::new(|i| v.value(i).into()))
}
