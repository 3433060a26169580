//! Metric windows: what an agent measured for one model version over a fixed span of time.
//! Aggregates only (counts, a latency sketch, histograms over the reference profile's
//! bins), never a raw input. A boundary type: agents store them in their outbox and send
//! them to the control plane, which merges them.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::drift::{self, DriftScores};
use crate::profile::{ColumnProfile, DataProfile};
use crate::sketch::LatencySketch;
use crate::time::Timestamp;

/// Most histogram columns (inputs or outputs) a window may carry.
pub const MAX_COLUMNS: usize = 4096;
/// Most bins per histogram column.
pub const MAX_BINS: usize = 4096;
/// Longest window, in seconds.
pub const MAX_WINDOW_SECONDS: u32 = 86_400;

/// A window that cannot be right, refused where it enters the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("metric window of {model:?} version {version}: {problem}")]
pub struct InvalidWindow {
    /// The model it claims.
    pub model: String,
    /// The version it claims.
    pub version: u64,
    /// What is wrong.
    pub problem: String,
}

/// Ground truth received for a version's predictions (`POST .../feedback`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Feedback {
    /// Rows whose label arrived and was joined to the prediction.
    pub labelled: u64,
    /// Of those, rows predicted right (classifiers).
    pub correct: u64,
    /// Sum of absolute errors (regressors).
    pub abs_error: f64,
}

impl Feedback {
    /// Adds `other`.
    pub fn add(&mut self, other: &Self) {
        self.labelled = self.labelled.saturating_add(other.labelled);
        self.correct = self.correct.saturating_add(other.correct);
        self.abs_error += other.abs_error;
    }
}

/// A candidate's runs on mirrored requests (shadow traffic), compared with the baseline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shadow {
    /// Rows compared.
    pub compared: u64,
    /// Of those, rows where the candidate agreed with the baseline.
    pub agreed: u64,
    /// Mirrored requests dropped because the candidate's queue was full.
    pub dropped: u64,
}

impl Shadow {
    /// Adds `other`.
    pub fn add(&mut self, other: &Self) {
        self.compared = self.compared.saturating_add(other.compared);
        self.agreed = self.agreed.saturating_add(other.agreed);
        self.dropped = self.dropped.saturating_add(other.dropped);
    }
}

/// What was measured: a window's counts, or several windows' counts added up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Inference requests.
    pub requests: u64,
    /// Requests that failed (refused input, failed inference).
    pub errors: u64,
    /// Latency of successful requests.
    pub latency: LatencySketch,
    /// Batch rows whose features were binned.
    pub rows: u64,
    /// For each input column of the reference profile: counts per bin.
    pub inputs: Vec<Vec<u64>>,
    /// For each output column of the reference profile: counts per bin.
    pub outputs: Vec<Vec<u64>>,
    /// Windows dropped from a full outbox (and not counted above).
    pub dropped_windows: u64,
    /// Requests counted in those dropped windows.
    pub dropped_requests: u64,
    /// Ground truth joined to this version's predictions.
    pub feedback: Feedback,
    /// This version's runs on mirrored requests.
    pub shadow: Shadow,
}

impl Counts {
    /// Adds `other`: totals, the merged sketch, histograms bin by bin (a histogram of
    /// another shape than the first one seen is left out). Sums saturate: counts come
    /// from agents, and two of `u64::MAX` must not wrap (or panic in a debug build).
    pub fn add(&mut self, other: &Self) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.latency.merge(&other.latency);
        self.rows = self.rows.saturating_add(other.rows);
        add_histograms(&mut self.inputs, &other.inputs);
        add_histograms(&mut self.outputs, &other.outputs);
        self.dropped_windows = self.dropped_windows.saturating_add(other.dropped_windows);
        self.dropped_requests = self.dropped_requests.saturating_add(other.dropped_requests);
        self.feedback.add(&other.feedback);
        self.shadow.add(&other.shadow);
    }
}

/// One model version's measurements over one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsWindow {
    /// The model.
    pub model: String,
    /// Its version.
    pub version: u64,
    /// When the window opened.
    pub start: Timestamp,
    /// Its length in seconds.
    pub seconds: u32,
    /// What was measured in it. Its drop counts are the windows the agent's outbox
    /// dropped since the previous window it kept.
    pub counts: Counts,
}

/// Windows merged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollup {
    /// Windows merged.
    pub windows: u64,
    /// Their counts, added up.
    pub counts: Counts,
}

impl MetricsWindow {
    /// Checks what an agent sent: a valid model name, a sensible length, latency buckets
    /// that exist, histograms within bounds. (Errors, latencies and rows are not held to
    /// the request count: the agent's counters are separate atomics, so a request may
    /// land in one window and its latency in the next; only the sums are exact.)
    pub fn check(&self) -> Result<(), InvalidWindow> {
        let problem = if let Err(e) = crate::names::check_model_name(&self.model) {
            Some(e.to_string())
        } else if self.seconds == 0 || self.seconds > MAX_WINDOW_SECONDS {
            Some(format!("length {} s is not within 1 to {MAX_WINDOW_SECONDS} s", self.seconds))
        } else if self
            .counts
            .latency
            .buckets
            .iter()
            .any(|&(b, _)| usize::from(b) >= crate::sketch::BUCKETS)
        {
            Some("a latency bucket out of range".to_owned())
        } else if [&self.counts.inputs, &self.counts.outputs]
            .iter()
            .any(|h| h.len() > MAX_COLUMNS || h.iter().any(|c| c.len() > MAX_BINS))
        {
            Some(format!("histograms over {MAX_COLUMNS} columns or {MAX_BINS} bins"))
        } else {
            None
        };
        problem.map_or(Ok(()), |problem| {
            Err(InvalidWindow { model: self.model.clone(), version: self.version, problem })
        })
    }
}

/// One column's drift against the reference profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnDrift {
    /// The profiled column's name.
    pub column: String,
    /// Its scores.
    pub scores: DriftScores,
}

/// Drift of a rollup's input and output columns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    /// Input columns, in profile order.
    pub inputs: Vec<ColumnDrift>,
    /// Output columns (the prediction distribution), in profile order.
    pub outputs: Vec<ColumnDrift>,
}

impl Drift {
    /// The `n` input columns drifting most, by PSI.
    pub fn top_inputs(&self, n: usize) -> Vec<&ColumnDrift> {
        let mut columns: Vec<&ColumnDrift> = self.inputs.iter().collect();
        columns.sort_by(|a, b| b.scores.psi.total_cmp(&a.scores.psi));
        columns.truncate(n);
        columns
    }
}

/// One version's rollup as `falaj-control metrics` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionSummary {
    /// The version.
    pub version: u64,
    /// Agents that reported it.
    pub agents: u64,
    /// Windows merged.
    pub windows: u64,
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Input rows (a request may carry a batch).
    pub rows: u64,
    /// Seconds from the first window's start to the last one's end.
    pub span_seconds: u64,
    /// Requests per second over the span.
    pub rate: f64,
    /// Errors over requests (0 without requests).
    pub error_rate: f64,
    /// Latency quantiles of successful requests, in milliseconds.
    pub p50_ms: Option<f64>,
    /// 95th percentile.
    pub p95_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// Windows agents dropped from full outboxes.
    pub dropped_windows: u64,
    /// Requests counted in those.
    pub dropped_requests: u64,
    /// Drift against the bundle's reference profile; `None` without one.
    pub drift: Option<Drift>,
}

fn add_histograms(into: &mut Vec<Vec<u64>>, from: &[Vec<u64>]) {
    if into.is_empty() {
        into.clone_from(&from.to_vec());
        return;
    }
    for (a, b) in into.iter_mut().zip(from) {
        if a.len() == b.len() {
            a.iter_mut().zip(b).for_each(|(x, y)| *x = x.saturating_add(*y));
        }
    }
}

impl Rollup {
    /// Adds one window.
    pub fn add(&mut self, w: &MetricsWindow) {
        self.windows += 1;
        self.counts.add(&w.counts);
    }

    /// The summary of this rollup of `version`, reported by `agents` over `span_seconds`.
    pub fn summary(
        &self,
        version: u64,
        agents: u64,
        span_seconds: u64,
        reference: Option<&DataProfile>,
    ) -> VersionSummary {
        let c = &self.counts;
        let ms = |q| c.latency.quantile(q).map(|micros| micros / 1000.0);
        VersionSummary {
            version,
            agents,
            windows: self.windows,
            requests: c.requests,
            errors: c.errors,
            rows: c.rows,
            span_seconds,
            rate: c.requests as f64 / span_seconds.max(1) as f64,
            error_rate: if c.requests == 0 { 0.0 } else { c.errors as f64 / c.requests as f64 },
            p50_ms: ms(0.5),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            dropped_windows: c.dropped_windows,
            dropped_requests: c.dropped_requests,
            drift: reference.map(|r| self.drift(r)),
        }
    }

    /// Drift of each input and output column against `reference`. Columns without data
    /// are left out.
    pub fn drift(&self, reference: &DataProfile) -> Drift {
        let score = |columns: &[ColumnProfile], observed: &[Vec<u64>]| {
            columns
                .iter()
                .zip(observed)
                .filter_map(|(c, o)| {
                    Some(ColumnDrift {
                        column: c.name.clone(),
                        scores: drift::scores(&c.histogram.all_counts(), o)?,
                    })
                })
                .collect()
        };
        Drift {
            inputs: score(&reference.inputs, &self.counts.inputs),
            outputs: score(&reference.outputs, &self.counts.outputs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(requests: u64, latency: f64, bins: Vec<u64>) -> MetricsWindow {
        let mut sketch = LatencySketch::default();
        for _ in 0..requests {
            sketch.record(latency);
        }
        MetricsWindow {
            model: "m".into(),
            version: 1,
            start: Timestamp::from_unix(0),
            seconds: 10,
            counts: Counts {
                requests,
                errors: 1,
                latency: sketch,
                rows: requests,
                inputs: vec![bins],
                outputs: vec![],
                dropped_windows: 2,
                dropped_requests: 7,
                feedback: Feedback { labelled: 4, correct: 3, abs_error: 0.5 },
                shadow: Shadow { compared: 6, agreed: 5, dropped: 1 },
            },
        }
    }

    #[test]
    fn rollups_add_counts_sketches_and_histograms() {
        let mut r = Rollup::default();
        r.add(&window(3, 100.0, vec![1, 2, 0]));
        r.add(&window(5, 1000.0, vec![0, 4, 1]));
        let c = &r.counts;
        assert_eq!((r.windows, c.requests, c.errors, c.rows), (2, 8, 2, 8));
        assert_eq!(c.inputs, vec![vec![1, 6, 1]]);
        assert_eq!(c.latency.count(), 8);
        assert_eq!((c.dropped_windows, c.dropped_requests), (4, 14));
        assert_eq!(c.feedback, Feedback { labelled: 8, correct: 6, abs_error: 1.0 });
        assert_eq!(c.shadow, Shadow { compared: 12, agreed: 10, dropped: 2 });
    }

    #[test]
    fn drift_is_scored_per_column_against_the_reference() {
        let values: Vec<f64> = (0..1000).map(f64::from).collect();
        let reference = DataProfile {
            rows: 1000,
            inputs: vec![
                ColumnProfile::of("x", 0, "a", &values, 10),
                ColumnProfile::of("x", 1, "b", &values, 10),
            ],
            outputs: vec![],
        };
        let bin = |c: &ColumnProfile, shift: f64| {
            let mut counts = vec![0; c.histogram.bin_count()];
            for v in &values {
                counts[c.histogram.bin(v + shift).unwrap()] += 1;
            }
            counts
        };
        let mut w = window(1000, 100.0, vec![]);
        w.counts.inputs = vec![bin(&reference.inputs[0], 0.0), bin(&reference.inputs[1], 300.0)];
        let mut r = Rollup::default();
        r.add(&w);
        let drift = r.drift(&reference);
        let names: Vec<_> = drift.inputs.iter().map(|d| d.column.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(drift.inputs[0].scores.psi < 1e-9, "{drift:?}");
        assert!(drift.inputs[1].scores.psi > 0.25 && drift.inputs[1].scores.ks > 0.29, "{drift:?}");
        assert_eq!(drift.top_inputs(1)[0].column, "b");
        let summary = r.summary(3, 2, 100, Some(&reference));
        assert_eq!((summary.rate, summary.error_rate), (10.0, 0.001));
        assert!((summary.p99_ms.unwrap() - 0.1).abs() < 0.002, "{summary:?}");
        assert_eq!(summary.drift, Some(drift));
    }

    #[test]
    fn implausible_windows_are_refused_with_the_reason() {
        assert_eq!(window(3, 100.0, vec![1, 2]).check(), Ok(()));
        let refused = |w: MetricsWindow, needle: &str| {
            let e = w.check().unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("version 1:"), "{e}");
        };
        refused(MetricsWindow { model: "Bad Name".into(), ..window(1, 1.0, vec![]) }, "Bad Name");
        refused(MetricsWindow { seconds: 0, ..window(1, 1.0, vec![]) }, "length 0 s");
        let mut w = window(1, 1.0, vec![]);
        w.counts.latency.buckets.push((u16::MAX, 1));
        refused(w, "latency bucket");
        refused(window(1, 1.0, vec![0; MAX_BINS + 1]), "histograms over");
    }

    #[test]
    fn windows_round_trip_through_postcard() {
        let w = window(3, 250.0, vec![4, 5, 6]);
        let bytes = postcard::to_stdvec(&w).unwrap();
        assert_eq!(postcard::from_bytes::<MetricsWindow>(&bytes).unwrap(), w);
    }
}
