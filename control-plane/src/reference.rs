//! Reference data profiles from a CSV file: histograms of each input feature, and of the
//! model's own predictions on the same rows, stored in the bundle for drift detection.
//!
//! The CSV has a header and one column per input feature, in input order: a model whose
//! inputs are `[batch, F1]`, `[batch, F2]`... takes `F1 + F2 + ...` columns. Empty cells
//! are missing values (allowed for floating-point inputs only).

use std::io::Read;

use falaj_common::onnx::OnnxModel;
use falaj_common::profile::{ColumnProfile, DEFAULT_BINS, DataProfile};
use falaj_common::tensor::{DataType, Dim, Tensor, TensorData};
use thiserror::Error;

/// Rows scored per model run.
const BATCH: usize = 1024;
/// Most rows read from a reference file.
pub const MAX_ROWS: usize = 1_000_000;
/// Outputs wider than this per row are not profiled (embeddings, images).
const MAX_OUTPUT_COLUMNS: usize = 64;

/// Why a reference profile could not be made.
#[derive(Debug, Error)]
pub enum ReferenceError {
    /// The model's inputs do not have a tabular layout.
    #[error("a reference CSV needs inputs shaped [batch, features]; {0}")]
    Layout(String),
    /// The CSV is malformed or does not fit the model.
    #[error("reference CSV, {0}")]
    Csv(String),
    /// The model failed on the reference rows.
    #[error("running the model on the reference rows failed: {0}")]
    Run(String),
}

struct InputColumns {
    name: String,
    datatype: DataType,
    width: usize,
}

fn layout(model: &OnnxModel) -> Result<Vec<InputColumns>, ReferenceError> {
    model
        .signature()
        .inputs
        .iter()
        .map(|input| {
            if !input.datatype.is_numeric() {
                return Err(ReferenceError::Layout(format!(
                    "input {:?} is {}; reference profiles cover numeric inputs only",
                    input.name, input.datatype
                )));
            }
            let width = match input.shape.as_slice() {
                [Dim::Symbol(_) | Dim::Any] => 1,
                [Dim::Symbol(_) | Dim::Any, Dim::Fixed(f)] => *f as usize,
                _ => {
                    return Err(ReferenceError::Layout(format!(
                        "input {:?} has shape [{}]",
                        input.name,
                        input.shape.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                    )));
                }
            };
            Ok(InputColumns { name: input.name.clone(), datatype: input.datatype, width })
        })
        .collect()
}

fn to_tensor(rows: usize, width: usize, values: &[f64], datatype: DataType) -> Tensor {
    let data = match datatype {
        DataType::Fp32 => TensorData::Fp32(values.iter().map(|&v| v as f32).collect()),
        DataType::Fp64 => TensorData::Fp64(values.to_vec()),
        DataType::Bool => TensorData::Bool(values.iter().map(|&v| v != 0.0).collect()),
        DataType::Uint8 => TensorData::Uint8(values.iter().map(|&v| v as u8).collect()),
        DataType::Uint16 => TensorData::Uint16(values.iter().map(|&v| v as u16).collect()),
        DataType::Uint32 => TensorData::Uint32(values.iter().map(|&v| v as u32).collect()),
        DataType::Uint64 => TensorData::Uint64(values.iter().map(|&v| v as u64).collect()),
        DataType::Int8 => TensorData::Int8(values.iter().map(|&v| v as i8).collect()),
        DataType::Int16 => TensorData::Int16(values.iter().map(|&v| v as i16).collect()),
        DataType::Int32 => TensorData::Int32(values.iter().map(|&v| v as i32).collect()),
        DataType::Int64 => TensorData::Int64(values.iter().map(|&v| v as i64).collect()),
        DataType::Fp16 => {
            TensorData::Fp16(values.iter().map(|&v| half::f16::from_f64(v)).collect())
        }
        DataType::Bytes => unreachable!("layout refuses BYTES inputs"),
    };
    let shape = if width == 1 { vec![rows as u64] } else { vec![rows as u64, width as u64] };
    Tensor { shape, data }
}

/// The reference rows, column by column.
struct Columns {
    headers: Vec<String>,
    values: Vec<Vec<f64>>,
    rows: usize,
}

/// Reads the CSV, checking that it has one numeric column per input feature.
fn read_columns(reader: impl Read, inputs: &[InputColumns]) -> Result<Columns, ReferenceError> {
    let total: usize = inputs.iter().map(|i| i.width).sum();
    let mut csv = csv::ReaderBuilder::new().has_headers(true).from_reader(reader);
    let headers: Vec<String> = csv
        .headers()
        .map_err(|e| ReferenceError::Csv(format!("header: {e}")))?
        .iter()
        .map(str::to_owned)
        .collect();
    if headers.len() != total {
        return Err(ReferenceError::Csv(format!(
            "has {} columns; the model's inputs take {total} ({})",
            headers.len(),
            inputs
                .iter()
                .map(|i| format!("{} × {}", i.name, i.width))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    // Each column's input, and whether that input may hold missing values (floats only).
    let owner: Vec<(usize, bool)> = inputs
        .iter()
        .enumerate()
        .flat_map(|(i, input)| {
            let float = matches!(input.datatype, DataType::Fp16 | DataType::Fp32 | DataType::Fp64);
            std::iter::repeat_n((i, float), input.width)
        })
        .collect();
    let mut values: Vec<Vec<f64>> = vec![Vec::new(); total];
    let mut record = csv::StringRecord::new();
    let mut rows = 0usize;
    while csv.read_record(&mut record).map_err(|e| ReferenceError::Csv(e.to_string()))? {
        rows += 1;
        if rows > MAX_ROWS {
            return Err(ReferenceError::Csv(format!(
                "has more than {MAX_ROWS} rows; sample it first"
            )));
        }
        for (c, cell) in record.iter().enumerate() {
            let cell = cell.trim();
            let value = if cell.is_empty() {
                if !owner[c].1 {
                    return Err(ReferenceError::Csv(format!(
                        "row {rows}, column {:?}: empty cell for integer input {:?}",
                        headers[c], inputs[owner[c].0].name
                    )));
                }
                f64::NAN
            } else {
                cell.parse::<f64>().map_err(|_| {
                    ReferenceError::Csv(format!(
                        "row {rows}, column {:?}: {cell:?} is not a number",
                        headers[c]
                    ))
                })?
            };
            values[c].push(value);
        }
    }
    if rows == 0 {
        return Err(ReferenceError::Csv("has no rows".into()));
    }
    Ok(Columns { headers, values, rows })
}

/// Runs the model over the rows in batches and profiles each output column.
fn profile_outputs(
    model: &OnnxModel,
    inputs: &[InputColumns],
    columns: &Columns,
    bins: usize,
) -> Result<Vec<ColumnProfile>, ReferenceError> {
    let outputs = &model.signature().outputs;
    let mut output_columns: Vec<Vec<Vec<f64>>> = vec![Vec::new(); outputs.len()];
    for start in (0..columns.rows).step_by(BATCH) {
        let n = BATCH.min(columns.rows - start);
        let mut first = 0;
        let batch: Vec<Tensor> = inputs
            .iter()
            .map(|input| {
                let mine = &columns.values[first..first + input.width];
                first += input.width;
                let values: Vec<f64> = (start..start + n)
                    .flat_map(|row| mine.iter().map(move |col| col[row]))
                    .collect();
                to_tensor(n, input.width, &values, input.datatype)
            })
            .collect();
        let results = model.run(batch).map_err(|e| ReferenceError::Run(e.to_string()))?;
        for (result, cols) in results.iter().zip(&mut output_columns) {
            let width = if result.shape.is_empty() { 1 } else { result.data.len() / n.max(1) };
            if width == 0 || width > MAX_OUTPUT_COLUMNS || result.data.len() != width * n {
                continue;
            }
            cols.resize(width, Vec::new());
            for (i, v) in result.data.to_f64().into_iter().enumerate() {
                cols[i % width].push(v);
            }
        }
    }
    let mut profiles = Vec::new();
    for (spec, cols) in outputs.iter().zip(&output_columns) {
        for (index, values) in cols.iter().enumerate() {
            let name =
                if cols.len() == 1 { spec.name.clone() } else { format!("{}[{index}]", spec.name) };
            profiles.push(ColumnProfile::of(&spec.name, index as u32, &name, values, bins));
        }
    }
    Ok(profiles)
}

/// Profiles the CSV read from `reader` and the model's predictions on it.
pub fn profile(
    model: &OnnxModel,
    reader: impl Read,
    bins: usize,
) -> Result<DataProfile, ReferenceError> {
    let inputs = layout(model)?;
    let columns = read_columns(reader, &inputs)?;
    let mut input_profiles = Vec::with_capacity(columns.values.len());
    let mut c = 0;
    for input in &inputs {
        for index in 0..input.width {
            let (name, values) = (&columns.headers[c], &columns.values[c]);
            input_profiles.push(ColumnProfile::of(&input.name, index as u32, name, values, bins));
            c += 1;
        }
    }
    let outputs = profile_outputs(model, &inputs, &columns, bins)?;
    Ok(DataProfile { rows: columns.rows as u64, inputs: input_profiles, outputs })
}

/// [`profile`] with the default number of bins.
pub fn profile_default(
    model: &OnnxModel,
    reader: impl Read,
) -> Result<DataProfile, ReferenceError> {
    profile(model, reader, DEFAULT_BINS)
}
