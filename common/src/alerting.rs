//! Alert rules and their evaluation: what a rule measures on a rollup of metric windows,
//! and which alerts fire or resolve when the measurements change.
//!
//! A rule watches one model (optionally one group of agents) over a trailing window. Each
//! evaluation turns the rollup of every version seen in that window into observations,
//! one per subject: `model@version` for rate, error and latency metrics, and
//! `model@version/column` for drift scores, one per profiled input or output column (or
//! only the rule's `column`). A subject above the threshold fires; a firing subject
//! observed at or below it resolves. A subject without enough data is not observed, so
//! its state stands: a quiet agent neither fires nor resolves an alert.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::metrics::Rollup;
use crate::profile::DataProfile;
use crate::time::human_duration;

/// What a rule measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertMetric {
    /// Population Stability Index of a column against the reference profile.
    Psi,
    /// Kolmogorov–Smirnov statistic of a column against the reference profile.
    Ks,
    /// Jensen–Shannon distance of a column against the reference profile.
    Js,
    /// Failed requests over all requests.
    ErrorRate,
    /// The 99th percentile of latency, in milliseconds.
    P99LatencyMs,
    /// Requests per second across the agents.
    RequestRate,
}

impl AlertMetric {
    /// Whether this is a drift score (observed per column).
    pub fn is_drift(self) -> bool {
        matches!(self, Self::Psi | Self::Ks | Self::Js)
    }
}

/// Which columns a drift rule scores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftScope {
    /// Input features and predictions.
    #[default]
    All,
    /// Input features only.
    Inputs,
    /// Predictions (the model's outputs) only.
    Predictions,
}

/// An alert rule, as written in the control plane's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertRule {
    /// Unique name, used in events and notifications.
    pub name: String,
    /// The model watched.
    pub model: String,
    /// What is measured.
    pub metric: AlertMetric,
    /// For drift metrics: only this column (an input feature or an output); all if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    /// For drift metrics: inputs, predictions or both.
    #[serde(default)]
    pub scope: DriftScope,
    /// Only agents of this group; all if absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Fires above this value.
    pub threshold: f64,
    /// The trailing window the rollup covers.
    #[serde(with = "human_duration")]
    pub window: Duration,
    /// Fewest requests (rows, for drift) in the window for a version to be observed.
    #[serde(default = "default_min_count")]
    pub min_count: u64,
    /// What to run when the rule fires, to start retraining.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrain: Option<RetrainHook>,
}

fn default_min_count() -> u64 {
    100
}

/// A retraining hook: called with the alert when a rule fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RetrainHook {
    /// POST the alert as JSON to this URL.
    Webhook(String),
    /// Run this program with these arguments, the alert as JSON on its standard input.
    Command(Vec<String>),
}

/// One version's rollup over the rule's window.
#[derive(Debug, Clone, Copy)]
pub struct VersionWindow<'a> {
    /// The version.
    pub version: u64,
    /// Its windows, merged.
    pub rollup: &'a Rollup,
    /// Seconds from the first window's start to the last one's end.
    pub span_seconds: u64,
    /// The bundle's reference profile, if it has one.
    pub reference: Option<&'a DataProfile>,
}

/// A measured value of one subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// `model@version` or `model@version/column`.
    pub subject: String,
    /// The version.
    pub version: u64,
    /// The column, for drift metrics.
    pub column: Option<String>,
    /// The value.
    pub value: f64,
}

impl AlertRule {
    /// The observations of one version, or none where the data is too thin.
    pub fn observe(&self, w: &VersionWindow<'_>) -> Vec<Observation> {
        let r = &w.rollup.counts;
        let subject = format!("{}@{}", self.model, w.version);
        let whole = |value: f64| {
            vec![Observation { subject: subject.clone(), version: w.version, column: None, value }]
        };
        match self.metric {
            AlertMetric::ErrorRate if r.requests >= self.min_count => {
                whole(r.errors as f64 / r.requests as f64)
            }
            AlertMetric::P99LatencyMs if r.latency.count() >= self.min_count => {
                r.latency.quantile(0.99).map(|micros| whole(micros / 1000.0)).unwrap_or_default()
            }
            AlertMetric::RequestRate => whole(r.requests as f64 / w.span_seconds.max(1) as f64),
            AlertMetric::Psi | AlertMetric::Ks | AlertMetric::Js if r.rows >= self.min_count => {
                let Some(reference) = w.reference else { return Vec::new() };
                let drift = w.rollup.drift(reference);
                let inputs =
                    if self.scope == DriftScope::Predictions { &[][..] } else { &drift.inputs };
                let outputs =
                    if self.scope == DriftScope::Inputs { &[][..] } else { &drift.outputs };
                inputs
                    .iter()
                    .chain(outputs)
                    .filter(|d| self.column.as_ref().is_none_or(|c| *c == d.column))
                    .map(|d| Observation {
                        subject: format!("{subject}/{}", d.column),
                        version: w.version,
                        column: Some(d.column.clone()),
                        value: match self.metric {
                            AlertMetric::Psi => d.scores.psi,
                            AlertMetric::Ks => d.scores.ks,
                            _ => d.scores.js,
                        },
                    })
                    .collect()
            }
            _ => Vec::new(),
        }
    }
}

/// A change of an alert's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// What changed.
    pub observation: Observation,
    /// True when it fired, false when it resolved.
    pub firing: bool,
}

/// The transitions from `firing` (subjects firing now, with their last values) given
/// this evaluation's `observations` against `threshold`.
pub fn transitions(
    firing: &BTreeMap<String, f64>,
    observations: &[Observation],
    threshold: f64,
) -> Vec<Transition> {
    observations
        .iter()
        .filter_map(|o| {
            let above = o.value > threshold;
            (above != firing.contains_key(&o.subject))
                .then(|| Transition { observation: o.clone(), firing: above })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Counts, MetricsWindow};
    use crate::profile::ColumnProfile;
    use crate::sketch::LatencySketch;
    use crate::time::Timestamp;

    fn rule(metric: AlertMetric) -> AlertRule {
        AlertRule {
            name: "r".into(),
            model: "m".into(),
            metric,
            column: None,
            scope: DriftScope::All,
            group: None,
            threshold: 0.2,
            window: Duration::from_secs(60),
            min_count: 10,
            retrain: None,
        }
    }

    fn rollup(requests: u64, errors: u64, inputs: Vec<Vec<u64>>) -> Rollup {
        let mut latency = LatencySketch::default();
        (0..requests - errors).for_each(|i| latency.record(1000.0 + i as f64));
        let mut r = Rollup::default();
        r.add(&MetricsWindow {
            model: "m".into(),
            version: 2,
            start: Timestamp::from_unix(0),
            seconds: 10,
            counts: Counts {
                requests,
                errors,
                latency,
                rows: requests,
                inputs,
                ..Counts::default()
            },
        });
        r
    }

    #[test]
    fn rates_and_latency_are_observed_per_version_with_enough_data() {
        let r = rollup(40, 10, vec![]);
        let w = VersionWindow { version: 2, rollup: &r, span_seconds: 20, reference: None };
        let errors = rule(AlertMetric::ErrorRate).observe(&w);
        assert_eq!(errors.len(), 1);
        assert_eq!((errors[0].subject.as_str(), errors[0].value), ("m@2", 0.25));
        assert!((rule(AlertMetric::RequestRate).observe(&w)[0].value - 2.0).abs() < 1e-12);
        let p99 = rule(AlertMetric::P99LatencyMs).observe(&w)[0].value;
        assert!((p99 - 1.029).abs() < 0.03, "{p99}");
        let thin = rollup(5, 1, vec![]);
        let w = VersionWindow { version: 2, rollup: &thin, span_seconds: 20, reference: None };
        assert!(rule(AlertMetric::ErrorRate).observe(&w).is_empty(), "under min_count");
    }

    #[test]
    fn drift_is_observed_per_column_or_for_the_one_named() {
        let values: Vec<f64> = (0..100).map(f64::from).collect();
        let reference = DataProfile {
            rows: 100,
            inputs: vec![
                ColumnProfile::of("x", 0, "a", &values, 4),
                ColumnProfile::of("x", 1, "b", &values, 4),
            ],
            outputs: vec![],
        };
        let r = rollup(100, 0, vec![vec![25, 25, 25, 25], vec![0, 0, 0, 100]]);
        let w =
            VersionWindow { version: 2, rollup: &r, span_seconds: 10, reference: Some(&reference) };
        let all = rule(AlertMetric::Psi).observe(&w);
        let subjects: Vec<_> = all.iter().map(|o| o.subject.as_str()).collect();
        assert_eq!(subjects, ["m@2/a", "m@2/b"]);
        assert!(all[0].value < 1e-9 && all[1].value > 1.0, "{all:?}");
        let only_a = AlertRule { column: Some("a".into()), ..rule(AlertMetric::Ks) }.observe(&w);
        assert_eq!(only_a.len(), 1);
        let predictions = AlertRule { scope: DriftScope::Predictions, ..rule(AlertMetric::Psi) };
        assert!(predictions.observe(&w).is_empty(), "the reference has no outputs");
        let none = VersionWindow { reference: None, ..w };
        assert!(rule(AlertMetric::Js).observe(&none).is_empty(), "no reference, no drift");
    }

    #[test]
    fn transitions_fire_above_and_resolve_at_or_below_the_threshold() {
        let o = |subject: &str, value| Observation {
            subject: subject.into(),
            version: 1,
            column: None,
            value,
        };
        let firing = BTreeMap::from([("b".to_owned(), 0.9), ("c".to_owned(), 0.9)]);
        let t = transitions(&firing, &[o("a", 0.5), o("b", 0.2), o("c", 0.7), o("d", 0.1)], 0.2);
        let got: Vec<_> = t.iter().map(|t| (t.observation.subject.as_str(), t.firing)).collect();
        assert_eq!(got, [("a", true), ("b", false)]);
    }
}
