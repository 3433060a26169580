//! The synthetic dataset behind the sample model: pump sensor readings labelled
//! `normal`, `degraded` or `fault`.
//!
//! The label follows a hidden health score with non-linear terms (an interaction of heat
//! and vibration, a pressure band, an RPM threshold) plus noise, so a model has something
//! real to learn and cannot reach 100%. Two features (humidity, voltage) are distractors.
//! A [`Shift`] moves a feature's distribution, for drift and fine-tuning scenarios.

use std::fmt::Write as _;

use crate::random::SeededRng;

/// Feature names, in column order.
pub const FEATURES: [&str; 8] = [
    "temperature_c",
    "vibration_mm_s",
    "pressure_bar",
    "current_a",
    "rpm",
    "humidity_pct",
    "voltage_v",
    "acoustic_db",
];
/// Number of features.
pub const FEATURE_COUNT: usize = FEATURES.len();
/// Class names, by label.
pub const CLASSES: [&str; 3] = ["normal", "degraded", "fault"];

/// A sensor offset applied to generated readings: what a miscalibrated site sees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shift {
    /// Index into [`FEATURES`].
    pub feature: usize,
    /// Added to every reading of that feature (after the label is drawn).
    pub offset: f64,
}

/// Rows of readings and their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Row-major readings, `FEATURE_COUNT` per row.
    pub features: Vec<f32>,
    /// One label per row, an index into [`CLASSES`].
    pub labels: Vec<u32>,
}

impl Dataset {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Row `i`'s readings.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * FEATURE_COUNT..(i + 1) * FEATURE_COUNT]
    }

    /// Splits off the last `count` rows.
    #[must_use]
    pub fn split_off(&mut self, count: usize) -> Self {
        let at = self.len().saturating_sub(count);
        Self {
            features: self.features.split_off(at * FEATURE_COUNT),
            labels: self.labels.split_off(at),
        }
    }
}

/// Rows of readings as CSV with a header of [`FEATURES`] (and `label`, when labels are
/// given): what a site's data file looks like.
pub fn csv(features: &[f32], labels: Option<&[u32]>) -> String {
    let mut out = FEATURES.join(",");
    if labels.is_some() {
        out.push_str(",label");
    }
    out.push('\n');
    for (i, row) in features.chunks_exact(FEATURE_COUNT).enumerate() {
        let cells: Vec<String> = row.iter().map(|v| format!("{v}")).collect();
        out.push_str(&cells.join(","));
        if let Some(labels) = labels {
            let _ = write!(out, ",{}", labels[i]);
        }
        out.push('\n');
    }
    out
}

/// Draws `rows` readings with labels, reproducibly from `seed`, with optional shifts.
pub fn generate(rows: usize, seed: u64, shifts: &[Shift]) -> Dataset {
    let mut rng = SeededRng::new(seed);
    let mut features = Vec::with_capacity(rows * FEATURE_COUNT);
    let mut labels = Vec::with_capacity(rows);
    for _ in 0..rows {
        let temperature = rng.normal(65.0, 8.0);
        let vibration = rng.normal(3.0_f64.ln(), 0.35).exp();
        let pressure = rng.normal(6.0, 0.7);
        let current = rng.normal(12.0, 2.0);
        let rpm = rng.normal(1500.0, 150.0);
        let humidity = rng.range(20.0, 80.0);
        let voltage = rng.normal(400.0, 8.0);
        let acoustic = rng.normal(70.0 + 2.0 * (vibration - 3.0), 3.0);

        let heat = (temperature - 65.0) / 8.0;
        let shake = (vibration - 3.0) / 1.1;
        let score = 0.45 * heat
            + 0.9 * shake
            + 0.25 * (current - 12.0) / 2.0
            + 1.6 * ((pressure - 6.0).abs() - 0.9).max(0.0)
            + 0.6 * heat * shake
            + 0.012 * (rpm - 1680.0).max(0.0)
            + rng.normal(0.0, 0.3);
        labels.push(match score {
            s if s < 0.8 => 0,
            s if s < 2.0 => 1,
            _ => 2,
        });
        let mut row = [temperature, vibration, pressure, current, rpm, humidity, voltage, acoustic];
        for shift in shifts {
            row[shift.feature] += shift.offset;
        }
        features.extend(row.iter().map(|&v| v as f32));
    }
    Dataset { features, labels }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_all_present_and_unbalanced_like_real_faults() {
        let data = generate(20_000, 1, &[]);
        let mut counts = [0usize; 3];
        for &l in &data.labels {
            counts[l as usize] += 1;
        }
        let share = |c: usize| c as f64 / data.len() as f64;
        assert!(share(counts[0]) > 0.5, "{counts:?}");
        assert!(share(counts[1]) > 0.1, "{counts:?}");
        assert!(share(counts[2]) > 0.04 && share(counts[2]) < 0.25, "{counts:?}");
    }

    #[test]
    fn shifts_move_only_their_feature_and_keep_labels() {
        let base = generate(100, 5, &[]);
        let shifted = generate(100, 5, &[Shift { feature: 0, offset: 10.0 }]);
        assert_eq!(base.labels, shifted.labels);
        for i in 0..base.len() {
            assert!((shifted.row(i)[0] - base.row(i)[0] - 10.0).abs() < 1e-3);
            assert_eq!(shifted.row(i)[1..], base.row(i)[1..]);
        }
    }
}
