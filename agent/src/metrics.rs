//! Measuring what the agent serves, without locks or allocation on the request path.
//!
//! Each loaded model version has a [`ModelMetrics`]: atomic counters for requests and
//! errors, a latency sketch (one atomic per bucket of [`falaj_common::sketch`]), and, where
//! the bundle carries a reference profile, atomic counts per bin of each profiled input and
//! output column. Every window (10 s by default) they are swapped to zero into a
//! [`MetricsWindow`] for the outbox; closed windows also add up into cumulative totals
//! for the Prometheus exposition ([`Exporter`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use falaj_common::exposition::{self, VersionFigures};
use falaj_common::metrics::{Counts, Feedback, MetricsWindow, Shadow};
use falaj_common::profile::{ColumnProfile, DataProfile, Histogram};
use falaj_common::sketch::{self, LatencySketch};
use falaj_common::tensor::{Signature, Tensor, TensorData};
use falaj_common::time::Timestamp;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::engine::GpuEngine;
use crate::models::{Catalog, Registry, VersionState};
use crate::rollout::LiveRollout;

/// Bin counts of one profiled column.
#[derive(Debug)]
struct ColumnCounts {
    /// The tensor's index in the signature's inputs (or outputs).
    tensor: usize,
    /// The column's index along the tensor's last axis.
    column: usize,
    histogram: Histogram,
    counts: Box<[AtomicU64]>,
}

fn zeros(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

fn take(counters: &[AtomicU64]) -> Vec<u64> {
    counters.iter().map(|c| c.swap(0, Ordering::Relaxed)).collect()
}

impl ColumnCounts {
    fn new(profile: &ColumnProfile, tensors: &[falaj_common::tensor::TensorSpec]) -> Option<Self> {
        let tensor = tensors.iter().position(|t| t.name == profile.tensor)?;
        let histogram = profile.histogram.clone();
        Some(Self {
            tensor,
            column: profile.index as usize,
            counts: zeros(histogram.bin_count()),
            histogram,
        })
    }

    /// Bins this column's value in each row of `tensor`.
    fn record(&self, tensor: &Tensor) {
        let rows = tensor.shape.first().copied().unwrap_or(1).max(1) as usize;
        let width = tensor.data.len() / rows;
        if width == 0 || self.column >= width {
            return;
        }
        for row in 0..rows {
            if let Some(bin) = self.histogram.bin(value_at(&tensor.data, row * width + self.column))
            {
                self.counts[bin].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One element as `f64` (booleans as 0 and 1), without allocating.
fn value_at(data: &TensorData, i: usize) -> f64 {
    match data {
        TensorData::Bool(v) => v.get(i).map_or(f64::NAN, |&b| f64::from(u8::from(b))),
        TensorData::Uint8(v) => v.get(i).map_or(f64::NAN, |&x| f64::from(x)),
        TensorData::Uint16(v) => v.get(i).map_or(f64::NAN, |&x| f64::from(x)),
        TensorData::Uint32(v) => v.get(i).map_or(f64::NAN, |&x| f64::from(x)),
        TensorData::Uint64(v) => v.get(i).map_or(f64::NAN, |&x| x as f64),
        TensorData::Int8(v) => v.get(i).map_or(f64::NAN, |&x| f64::from(x)),
        TensorData::Int16(v) => v.get(i).map_or(f64::NAN, |&x| f64::from(x)),
        TensorData::Int32(v) => v.get(i).map_or(f64::NAN, |&x| f64::from(x)),
        TensorData::Int64(v) => v.get(i).map_or(f64::NAN, |&x| x as f64),
        TensorData::Fp32(v) => v.get(i).map_or(f64::NAN, |&x| f64::from(x)),
        TensorData::Fp64(v) => v.get(i).copied().unwrap_or(f64::NAN),
        TensorData::Fp16(v) => v.get(i).map_or(f64::NAN, |&x| f64::from(x)),
        TensorData::Bytes(_) => f64::NAN,
    }
}

/// Totals of closed windows, for Prometheus.
#[derive(Debug, Default)]
struct Totals {
    requests: u64,
    errors: u64,
    latency: LatencySketch,
    latency_sum_micros: f64,
    shadow: Shadow,
    feedback: Feedback,
}

/// What one model version measures.
#[derive(Debug)]
pub struct ModelMetrics {
    model: String,
    version: u64,
    requests: AtomicU64,
    errors: AtomicU64,
    latency: Box<[AtomicU64]>,
    latency_sum_micros: AtomicU64,
    rows: AtomicU64,
    inputs: Vec<ColumnCounts>,
    outputs: Vec<ColumnCounts>,
    window_start: AtomicU64,
    totals: Mutex<Totals>,
    /// This version's runs on mirrored requests, compared with the baseline.
    shadow_compared: AtomicU64,
    shadow_agreed: AtomicU64,
    shadow_dropped: AtomicU64,
    /// Ground truth joined to its predictions (not on the request path: a lock is fine).
    feedback: Mutex<Feedback>,
}

impl ModelMetrics {
    /// Counters for `model@version`, binning the columns of `reference` if given.
    pub fn new(
        model: &str,
        version: u64,
        signature: &Signature,
        reference: Option<&DataProfile>,
        now: SystemTime,
    ) -> Self {
        let columns = |profiles: &[ColumnProfile], tensors| {
            profiles.iter().filter_map(|p| ColumnCounts::new(p, tensors)).collect()
        };
        Self {
            model: model.to_owned(),
            version,
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: zeros(sketch::BUCKETS),
            latency_sum_micros: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            inputs: reference.map(|r| columns(&r.inputs, &signature.inputs)).unwrap_or_default(),
            outputs: reference.map(|r| columns(&r.outputs, &signature.outputs)).unwrap_or_default(),
            window_start: AtomicU64::new(Timestamp::from_system(now).unix()),
            totals: Mutex::new(Totals::default()),
            shadow_compared: AtomicU64::new(0),
            shadow_agreed: AtomicU64::new(0),
            shadow_dropped: AtomicU64::new(0),
            feedback: Mutex::new(Feedback::default()),
        }
    }

    /// Records a mirrored request's comparison: rows compared and rows agreed.
    pub fn record_shadow(&self, compared: u64, agreed: u64) {
        self.shadow_compared.fetch_add(compared, Ordering::Relaxed);
        self.shadow_agreed.fetch_add(agreed, Ordering::Relaxed);
    }

    /// Records a mirrored request dropped because the shadow queue was full.
    pub fn record_shadow_dropped(&self) {
        self.shadow_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Records ground truth joined to this version's predictions.
    pub fn record_feedback(&self, joined: &Feedback) {
        self.feedback.lock().unwrap_or_else(std::sync::PoisonError::into_inner).add(joined);
    }

    /// Shadow comparisons and feedback since start: closed windows and the open one.
    pub fn outcomes(&self) -> (Shadow, Feedback) {
        let totals = self.totals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut shadow, mut feedback) = (totals.shadow, totals.feedback);
        shadow.add(&Shadow {
            compared: self.shadow_compared.load(Ordering::Relaxed),
            agreed: self.shadow_agreed.load(Ordering::Relaxed),
            dropped: self.shadow_dropped.load(Ordering::Relaxed),
        });
        feedback.add(&self.feedback.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        (shadow, feedback)
    }

    /// Bins the inputs of a request about to run (inputs in signature order).
    pub fn record_inputs(&self, inputs: &[Tensor]) {
        for column in &self.inputs {
            if let Some(tensor) = inputs.get(column.tensor) {
                column.record(tensor);
            }
        }
        let rows = inputs.first().and_then(|t| t.shape.first().copied()).unwrap_or(1);
        self.rows.fetch_add(rows, Ordering::Relaxed);
    }

    /// Records a finished request: its latency and outputs, or its failure.
    pub fn record(&self, latency: Duration, outputs: Option<&[Tensor]>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let Some(outputs) = outputs else {
            self.errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let micros = latency.as_secs_f64() * 1e6;
        self.latency[sketch::bucket(micros)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(micros as u64, Ordering::Relaxed);
        for column in &self.outputs {
            if let Some(tensor) = outputs.get(column.tensor) {
                column.record(tensor);
            }
        }
    }

    /// Records a request refused before it ran (bad input).
    pub fn record_refused(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Closes the current window: its counts are taken (and added to the totals) and a new
    /// window starts at `now`. `None` if nothing happened in it.
    pub fn close(&self, now: SystemTime) -> Option<MetricsWindow> {
        let now = Timestamp::from_system(now).unix();
        let start = self.window_start.swap(now, Ordering::Relaxed);
        let requests = self.requests.swap(0, Ordering::Relaxed);
        let errors = self.errors.swap(0, Ordering::Relaxed);
        let latency = LatencySketch::from_counts(&take(&self.latency));
        let latency_sum = self.latency_sum_micros.swap(0, Ordering::Relaxed);
        let rows = self.rows.swap(0, Ordering::Relaxed);
        let inputs: Vec<Vec<u64>> = self.inputs.iter().map(|c| take(&c.counts)).collect();
        let outputs: Vec<Vec<u64>> = self.outputs.iter().map(|c| take(&c.counts)).collect();
        let shadow = Shadow {
            compared: self.shadow_compared.swap(0, Ordering::Relaxed),
            agreed: self.shadow_agreed.swap(0, Ordering::Relaxed),
            dropped: self.shadow_dropped.swap(0, Ordering::Relaxed),
        };
        let feedback = std::mem::take(
            &mut *self.feedback.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        {
            let mut totals = self.totals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            totals.requests += requests;
            totals.errors += errors;
            totals.latency.merge(&latency);
            totals.latency_sum_micros += latency_sum as f64;
            totals.shadow.add(&shadow);
            totals.feedback.add(&feedback);
        }
        if requests == 0 && rows == 0 && shadow == Shadow::default() && feedback.labelled == 0 {
            return None;
        }
        Some(MetricsWindow {
            model: self.model.clone(),
            version: self.version,
            start: Timestamp::from_unix(start),
            seconds: u32::try_from(now.saturating_sub(start)).unwrap_or(u32::MAX).max(1),
            counts: Counts {
                requests,
                errors,
                latency,
                rows,
                inputs,
                outputs,
                dropped_windows: 0,
                dropped_requests: 0,
                feedback,
                shadow,
            },
        })
    }

    /// Cumulative figures: closed windows and the open one.
    fn cumulative(&self) -> VersionFigures {
        let totals = self.totals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let open: Vec<u64> = self.latency.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let mut latency = totals.latency.clone();
        latency.merge(&LatencySketch::from_counts(&open));
        VersionFigures {
            model: self.model.clone(),
            version: self.version,
            requests: totals.requests + self.requests.load(Ordering::Relaxed),
            errors: totals.errors + self.errors.load(Ordering::Relaxed),
            latency,
            latency_sum_seconds: (totals.latency_sum_micros
                + self.latency_sum_micros.load(Ordering::Relaxed) as f64)
                / 1e6,
        }
    }
}

/// Agent-wide figures the syncer and the outbox keep.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// Windows waiting in the outbox.
    pub outbox_depth: AtomicU64,
    /// Requests counted in the windows waiting.
    pub outbox_requests: AtomicU64,
    /// Windows dropped from a full outbox, since start.
    pub dropped_windows: AtomicU64,
    /// Windows acknowledged by the control plane, since start.
    pub delivered_windows: AtomicU64,
    /// Bytes fetched from the control plane, since start.
    pub transfer_bytes: AtomicU64,
    /// Version of the last desired-state document applied (0: none).
    pub applied_version: AtomicU64,
    /// Reconciliation problems outstanding.
    pub reconcile_errors: AtomicU64,
    /// Whether a control-plane session is up.
    pub connected: AtomicBool,
    /// Feedback requests joined to a kept answer, since start.
    pub feedback_joined: AtomicU64,
    /// Feedback for ids with no kept answer (unknown, expired, another model's).
    pub feedback_unknown: AtomicU64,
}

/// The Prometheus collector: per model version and agent-wide figures, read at scrape time.
#[derive(Debug)]
pub struct Exporter {
    /// The served models.
    pub registry: Arc<Registry>,
    /// Agent-wide figures.
    pub stats: Arc<AgentStats>,
    /// Each API key's requests by outcome (`apikeys`; none without API keys).
    pub(crate) api_keys: Vec<(String, crate::apikeys::Counts)>,
}

impl Collector for Exporter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let catalog = self.registry.catalog();
        let figures: Vec<VersionFigures> = catalog
            .models
            .values()
            .flat_map(|m| m.versions.values())
            .filter_map(|v| match v {
                VersionState::Ready(v) => Some(v.metrics.cumulative()),
                VersionState::Failed { .. } => None,
            })
            .collect();
        exposition::encode_versions(&mut encoder, "measured by the agent", &figures)?;
        encode_outcomes(&mut encoder, &catalog, &self.stats)?;
        encode_trust(&mut encoder, &catalog)?;
        encode_api_keys(&mut encoder, &self.api_keys)?;
        let s = &self.stats;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        exposition::encode_scalars(
            &mut encoder,
            &[
                (
                    "falaj_models_ready",
                    "1 when every active model version is loaded",
                    false,
                    u64::from(catalog.ready()),
                ),

                (
                    "falaj_models_on_gpu",
                    "Model versions served by the GPU engine",
                    false,
                    catalog
                        .models
                        .values()
                        .flat_map(|m| m.versions.values())
                        .filter(|v| matches!(v, VersionState::Ready(v) if v.engine.name() == GpuEngine::NAME))
                        .count() as u64,
                ),
                (
                    "falaj_gpu_fallbacks",
                    "Model versions that wanted a GPU and are served by tract instead",
                    true,
                    self.registry.engines().fallbacks(),
                ),
                (
                    "falaj_outbox_windows",
                    "Metric windows waiting to be delivered",
                    false,
                    load(&s.outbox_depth),
                ),
                (
                    "falaj_outbox_requests",
                    "Requests counted in the metric windows waiting",
                    false,
                    load(&s.outbox_requests),
                ),
                (
                    "falaj_outbox_dropped_windows",
                    "Metric windows dropped from a full outbox",
                    true,
                    load(&s.dropped_windows),
                ),
                (
                    "falaj_outbox_delivered_windows",
                    "Metric windows acknowledged by the control plane",
                    true,
                    load(&s.delivered_windows),
                ),
                (
                    "falaj_transfer_bytes",
                    "Bytes of bundle chunks fetched from the control plane",
                    true,
                    load(&s.transfer_bytes),
                ),
                (
                    "falaj_desired_state_version",
                    "Version of the last desired-state document applied",
                    false,
                    load(&s.applied_version),
                ),
                (
                    "falaj_reconcile_errors",
                    "Reconciliation problems outstanding",
                    false,
                    load(&s.reconcile_errors),
                ),
                (
                    "falaj_control_plane_connected",
                    "1 while a session with the control plane is up",
                    false,
                    u64::from(s.connected.load(Ordering::Relaxed)),
                ),
            ],
        )
    }
}

/// Writes the trust root's version and the seconds until it expires (an agent past it
/// refuses every bundle and document), as of the last reload.
fn encode_trust(encoder: &mut DescriptorEncoder, catalog: &Catalog) -> std::fmt::Result {
    let now = Timestamp::from_system(SystemTime::now());
    exposition::encode_scalars(
        encoder,
        &[
            (
                "falaj_trust_root_version",
                "The version of the trust root this agent verifies against",
                false,
                catalog.trust_root.map_or(0, |(version, _)| version),
            ),
            (
                "falaj_trust_root_expiry_seconds",
                "Seconds until the trust root held expires (0 once it has)",
                false,
                catalog
                    .trust_root
                    .map_or(0, |(_, expires)| expires.unix().saturating_sub(now.unix())),
            ),
        ],
    )
}

/// Writes each version's shadow comparisons and feedback, the feedback joined and not,
/// and each rollout's share, state and guards as last judged.
fn encode_outcomes(
    encoder: &mut DescriptorEncoder,
    catalog: &Catalog,
    stats: &AgentStats,
) -> std::fmt::Result {
    exposition::encode_scalars(
        encoder,
        &[
            (
                "falaj_feedback_joined",
                "Feedback requests joined to the answer they judge",
                true,
                stats.feedback_joined.load(Ordering::Relaxed),
            ),
            (
                "falaj_feedback_unknown_ids",
                "Feedback for request ids with no answer kept (unknown, expired, another model's)",
                true,
                stats.feedback_unknown.load(Ordering::Relaxed),
            ),
        ],
    )?;
    let mut outcomes = Vec::new();
    for (name, entry) in &catalog.models {
        for (version, state) in &entry.versions {
            if let VersionState::Ready(v) = state {
                let labels = vec![("model", name.clone()), ("version", version.to_string())];
                outcomes.push((labels, v.metrics.outcomes()));
            }
        }
    }
    let per_version = |pick: fn(&(Shadow, Feedback)) -> f64| -> Vec<exposition::Labelled> {
        outcomes.iter().map(|(labels, o)| (labels.clone(), pick(o))).collect()
    };
    for (name, help, pick) in [
        (
            "falaj_shadow_compared_rows",
            "Rows of mirrored requests compared with the baseline's answers",
            (|o| o.0.compared as f64) as fn(&(Shadow, Feedback)) -> f64,
        ),
        ("falaj_shadow_agreed_rows", "Of those, rows on which the two agreed", |o| {
            o.0.agreed as f64
        }),
        ("falaj_shadow_dropped", "Mirrored requests dropped: the shadow queue was full", |o| {
            o.0.dropped as f64
        }),
        (
            "falaj_feedback_labelled_rows",
            "Rows whose ground truth was joined to their answer",
            |o| o.1.labelled as f64,
        ),
        ("falaj_feedback_correct_rows", "Of those, rows answered right (classifiers)", |o| {
            o.1.correct as f64
        }),
        (
            "falaj_feedback_abs_error",
            "Sum of absolute errors against ground truth (regressors)",
            |o| o.1.abs_error,
        ),
    ] {
        exposition::encode_labelled(encoder, name, help, true, &per_version(pick))?;
    }
    let now = Timestamp::from_system(SystemTime::now());
    let rollout = |live: &LiveRollout| {
        vec![("rollout", live.spec.id.clone()), ("model", live.spec.model.clone())]
    };
    let (mut share, mut rolled_back, mut guard_value, mut guard_failing) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for live in catalog.rollouts.values() {
        let served = if live.rolled_back() { 0.0 } else { live.spec.share_at(now).percent() };
        share.push((rollout(live), served));
        rolled_back.push((rollout(live), f64::from(u8::from(live.rolled_back()))));
        for result in live.results() {
            let mut labels = rollout(live);
            labels.push(("guard", result.guard.to_string()));
            if let Some(value) = result.value {
                guard_value.push((labels.clone(), value));
            }
            let failing = result.verdict == falaj_common::rollout::Verdict::Fails;
            guard_failing.push((labels, f64::from(u8::from(failing))));
        }
    }
    for (name, help, rows) in [
        (
            "falaj_rollout_share_percent",
            "Percent of a rollout's requests the candidate serves now",
            share,
        ),
        ("falaj_rollout_rolled_back", "1 once this agent rolled the rollout back", rolled_back),
        ("falaj_rollout_guard_value", "A guard's value at the last judgement", guard_value),
        (
            "falaj_rollout_guard_failing",
            "1 when a guard failed at the last judgement",
            guard_failing,
        ),
    ] {
        exposition::encode_labelled(encoder, name, help, false, &rows)?;
    }
    Ok(())
}

/// Each API key's requests since start, by outcome: admitted, refused over the key's rate
/// (`throttled`), refused as not covered (`forbidden`).
fn encode_api_keys(
    encoder: &mut DescriptorEncoder,
    keys: &[(String, crate::apikeys::Counts)],
) -> std::fmt::Result {
    if keys.is_empty() {
        return Ok(());
    }
    let rows: Vec<exposition::Labelled> = keys
        .iter()
        .flat_map(|(key, c)| {
            [("admitted", c.admitted), ("throttled", c.throttled), ("forbidden", c.forbidden)].map(
                |(outcome, n)| (vec![("key", key.clone()), ("outcome", outcome.into())], n as f64),
            )
        })
        .collect();
    exposition::encode_labelled(
        encoder,
        "falaj_api_key_requests",
        "Requests presenting each API key, by outcome: admitted, throttled (over its rate), \
         forbidden (not covered)",
        true,
        &rows,
    )
}
