//! The sample model: a pump-fault classifier trained on the synthetic sensor dataset of
//! [`falaj_common::sample`], written as ONNX with its reference and hold-out data.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use falaj_common::onnx::mlp_classifier;
use falaj_common::sample::{self, CLASSES, FEATURE_COUNT, FEATURES};
use falaj_common::train::{self, TrainConfig, TrainReport};

use crate::files;

/// The model's input tensor name.
pub const INPUT: &str = "sensors";

/// What to make.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Training rows (a further quarter is drawn for the hold-out set).
    pub rows: usize,
    /// Seed for data and training.
    pub seed: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self { rows: 20_000, seed: 7 }
    }
}

/// What was made.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The ONNX model.
    pub model: PathBuf,
    /// Reference data: the training features, CSV.
    pub reference: PathBuf,
    /// Hold-out rows with their labels, CSV.
    pub holdout: PathBuf,
    /// Accuracy on the hold-out rows.
    pub holdout_accuracy: f64,
    /// Share of the hold-out rows in the most common class (the accuracy to beat).
    pub majority_share: f64,
    /// How training went.
    pub report: TrainReport,
}

/// Trains the sample model and writes `model.onnx`, `reference.csv` and `holdout.csv`
/// into `dir`.
pub fn write(dir: &Path, options: &SampleOptions) -> std::io::Result<Sample> {
    let holdout_rows = options.rows / 4;
    let mut data = sample::generate(options.rows + holdout_rows, options.seed, &[]);
    let holdout = data.split_off(holdout_rows);
    let config = TrainConfig { seed: options.seed, ..TrainConfig::default() };
    let (mlp, report) = train::train_classifier(
        &data.features,
        FEATURE_COUNT,
        &data.labels,
        CLASSES.len(),
        &config,
    );
    let holdout_accuracy = mlp.accuracy(&holdout.features, &holdout.labels);
    let majority = (0..CLASSES.len() as u32)
        .map(|c| holdout.labels.iter().filter(|&&l| l == c).count())
        .max()
        .unwrap_or(0);

    std::fs::create_dir_all(dir)?;
    let model = dir.join("model.onnx");
    files::write_atomic(&model, &mlp_classifier(&mlp, INPUT, "falaj sample"), 0o644)?;
    let reference = dir.join("reference.csv");
    let reference_rows = data.len().min(5_000);
    files::write_atomic(
        &reference,
        sample::csv(&data.features[..reference_rows * FEATURE_COUNT], None).as_bytes(),
        0o644,
    )?;
    let holdout_path = dir.join("holdout.csv");
    files::write_atomic(
        &holdout_path,
        sample::csv(&holdout.features, Some(&holdout.labels)).as_bytes(),
        0o644,
    )?;
    Ok(Sample {
        model,
        reference,
        holdout: holdout_path,
        holdout_accuracy,
        majority_share: majority as f64 / holdout.len().max(1) as f64,
        report,
    })
}

/// The sample feature view: the sensor readings per pump, its site, and the technician on
/// duty (personal data, hashed before it leaves the control plane).
pub const PUMP_VIEW: &str = r#"
name = "pump-sensors"
description = "Hourly sensor readings per pump"
timestamp = "event_time"
entity = { name = "pump_id", type = "string" }

[[features]]
name = "site"
type = "category"
values = ["plant-a", "plant-b"]
description = "Where the pump runs"
owner = "operations"

[[features]]
name = "technician"
type = "string"
nullable = true
pii = true
pii_policy = "hash"
description = "Technician on duty"
owner = "operations"
"#;

/// The sample view's declaration: [`PUMP_VIEW`] with one f32 feature per sensor.
pub fn pump_view() -> String {
    let mut view = PUMP_VIEW.to_owned();
    for name in FEATURES {
        let _ = write!(
            view,
            "\n[[features]]\nname = \"{name}\"\ntype = \"f32\"\ndescription = \"Sensor reading ({name})\"\nowner = \"reliability\"\n"
        );
    }
    view
}

/// The id of pump `i` of the sample data.
pub fn pump_id(i: usize) -> String {
    format!("pump-{i:06}")
}

/// Writes `readings` hourly rows for each of `pumps` pumps to a CSV file fitting
/// [`pump_view`], starting at `start` (µs since the epoch), drawn from `seed`.
pub fn write_pump_readings(
    path: &Path,
    pumps: usize,
    readings: usize,
    start: i64,
    seed: u64,
) -> std::io::Result<()> {
    use std::io::Write as _;
    let data = sample::generate(pumps * readings, seed, &[]);
    let file = std::fs::File::create(path)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    writeln!(out, "pump_id,event_time,site,technician,{}", FEATURES.join(","))?;
    let mut line = String::new();
    for r in 0..readings {
        let time = falaj_common::features::value::format_time(start + r as i64 * 3_600_000_000);
        for p in 0..pumps {
            line.clear();
            let site = if p % 3 == 0 { "plant-b" } else { "plant-a" };
            let technician = ["amal", "bilal", "chen", ""][(p + r) % 4];
            let _ = write!(line, "{},{time},{site},{technician}", pump_id(p));
            for v in data.row(r * pumps + p) {
                let _ = write!(line, ",{v}");
            }
            writeln!(out, "{line}")?;
        }
    }
    out.into_inner().map_err(std::io::IntoInnerError::into_error)?.sync_all()
}
