//! Rollouts on the agent: routing each request to the baseline or the candidate, running
//! mirrored requests on the candidate off the request path, and judging the guards over
//! each closed metric window, online or not. A failed guard sends every request back to
//! the baseline at once, is kept in the store with its reason (a restart does not undo
//! it) and is reported to the control plane, which rolls the rollout back for the group.
//!
//! The rules (assignment, steps, guards, agreement) are [`falaj_common::rollout`] and
//! [`falaj_common::outcomes`]; this module holds their state and runs them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use falaj_common::metrics::{Counts, MetricsWindow};
use falaj_common::outcomes;
use falaj_common::profile::DataProfile;
use falaj_common::rollout::{
    self, Assignment, Figures, GuardResult, RolloutReport, RolloutSpec, Variant,
};
use falaj_common::tensor::Tensor;
use falaj_common::time::Timestamp;
use tokio::sync::{Semaphore, mpsc};

use crate::models::LoadedVersion;
use crate::server::INLINE_BUDGET;
use crate::store::StoredRollout;

/// A rollout being served: its spec, and what its variants served and were judged on.
#[derive(Debug)]
pub struct LiveRollout {
    /// The rollout, as the accepted document gives it.
    pub spec: RolloutSpec,
    rolled_back: AtomicBool,
    judged: Mutex<Judged>,
}

#[derive(Debug, Default)]
struct Judged {
    baseline: Counts,
    candidate: Counts,
    results: Vec<GuardResult>,
    rolled_back: Option<(Timestamp, String)>,
}

/// What a judgement changed.
#[derive(Debug, Default, PartialEq)]
pub struct Observed {
    /// Whether windows of its variants were added (the figures must be stored).
    pub changed: bool,
    /// The reason, when this judgement rolled the rollout back.
    pub rolled_back: Option<String>,
}

impl LiveRollout {
    /// The rollout as the store holds it.
    pub fn from_stored(stored: StoredRollout) -> Self {
        Self {
            spec: stored.spec,
            rolled_back: AtomicBool::new(stored.rolled_back.is_some()),
            judged: Mutex::new(Judged {
                baseline: stored.baseline,
                candidate: stored.candidate,
                results: Vec::new(),
                rolled_back: stored.rolled_back,
            }),
        }
    }

    fn judged(&self) -> std::sync::MutexGuard<'_, Judged> {
        self.judged.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this agent rolled it back.
    pub fn rolled_back(&self) -> bool {
        self.rolled_back.load(Ordering::Relaxed)
    }

    /// Where a request with routing key `key` goes at `now`: everything to the baseline
    /// once rolled back.
    pub fn route(&self, key: &[u8], now: Timestamp) -> Assignment {
        if self.rolled_back() {
            return Assignment { candidate: false, mirrored: false };
        }
        self.spec.assign(key, self.spec.share_at(now))
    }

    /// Adds the closed `windows` of its two versions and judges the guards on everything
    /// served since the rollout began here; the first failure rolls it back.
    pub fn observe<'a>(
        &self,
        windows: &[MetricsWindow],
        reference: impl Fn(u64) -> Option<&'a DataProfile>,
        now: Timestamp,
    ) -> Observed {
        let mut judged = self.judged();
        let mut changed = false;
        for w in windows.iter().filter(|w| w.model == self.spec.model) {
            match self.spec.variant(w.version) {
                Some(Variant::Baseline) => judged.baseline.add(&w.counts),
                Some(Variant::Candidate) => judged.candidate.add(&w.counts),
                None => continue,
            }
            changed = true;
        }
        let baseline = Figures::of(&judged.baseline, reference(self.spec.baseline));
        let candidate = Figures::of(&judged.candidate, reference(self.spec.candidate));
        judged.results =
            rollout::judge(&self.spec.guards, self.spec.min_requests, &baseline, &candidate);
        let mut observed = Observed { changed, rolled_back: None };
        if judged.rolled_back.is_none()
            && let Some(reason) = rollout::failure(&judged.results)
        {
            judged.rolled_back = Some((now, reason.clone()));
            self.rolled_back.store(true, Ordering::Relaxed);
            observed.rolled_back = Some(reason);
        }
        observed
    }

    /// Its figures and rollback, to store.
    pub fn stored(&self) -> (Counts, Counts, Option<(Timestamp, String)>) {
        let judged = self.judged();
        (judged.baseline.clone(), judged.candidate.clone(), judged.rolled_back.clone())
    }

    /// The guards as last judged.
    pub fn results(&self) -> Vec<GuardResult> {
        self.judged().results.clone()
    }

    /// What the agent reports of it at `now`.
    pub fn report(&self, now: Timestamp) -> RolloutReport {
        let judged = self.judged();
        RolloutReport {
            id: self.spec.id.clone(),
            step: self.spec.step_at(now),
            rolled_back: judged.rolled_back.is_some(),
            reason: judged.rolled_back.as_ref().map(|(_, r)| r.clone()),
            at: judged.rolled_back.as_ref().map(|(at, _)| *at),
        }
    }
}

/// Routing keys for requests that name none: a random prefix chosen at start and a
/// counter, hashed with the rollout's id like any key, so such requests split at random.
#[derive(Debug)]
pub struct RandomKeys {
    prefix: [u8; 8],
    next: AtomicU64,
}

impl RandomKeys {
    /// Keys with a fresh random prefix.
    pub fn new() -> Self {
        let mut prefix = [0; 8];
        // Without an entropy source the keys are still distinct; only their prefix is fixed.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut prefix);
        Self { prefix, next: AtomicU64::new(0) }
    }

    /// The next key.
    pub fn next(&self) -> [u8; 16] {
        let mut key = [0; 16];
        key[..8].copy_from_slice(&self.prefix);
        key[8..].copy_from_slice(&self.next.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        key
    }
}

impl Default for RandomKeys {
    fn default() -> Self {
        Self::new()
    }
}

/// A mirrored request: the candidate runs it after the baseline answered.
#[derive(Debug)]
pub struct ShadowJob {
    pub candidate: Arc<LoadedVersion>,
    /// The request's inputs, in the candidate's signature order.
    pub inputs: Vec<Tensor>,
    /// The baseline's outputs, by name.
    pub baseline: Vec<(String, Tensor)>,
}

/// The bounded queue of mirrored requests and the task that runs them; a request that
/// finds it full is dropped and counted on the candidate.
#[derive(Debug, Clone)]
pub struct Shadow {
    tx: mpsc::Sender<ShadowJob>,
}

impl Shadow {
    /// A queue of `capacity` jobs, run one at a time by a task on the current runtime:
    /// where it waits, as the server runs requests, when a run is expected to be short,
    /// else on the blocking pool holding one of `permits` (the server's inference slots).
    /// The task ends when every handle is dropped.
    pub fn start(capacity: usize, permits: Arc<Semaphore>) -> Self {
        let (tx, mut rx) = mpsc::channel::<ShadowJob>(capacity.max(1));
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                let candidate = &job.candidate;
                let rows = job.inputs.first().and_then(|t| t.shape.first().copied()).unwrap_or(1);
                if candidate.engine.may_run_inline()
                    && candidate.cost.estimate(rows).is_some_and(|d| d < INLINE_BUDGET)
                {
                    run(job);
                    continue;
                }
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { return };
                let ran = tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    run(job);
                })
                .await;
                if let Err(e) = ran {
                    tracing::error!(error = %e, "shadow run failed");
                }
            }
        });
        Self { tx }
    }

    /// Queues `job`, or drops and counts it when the queue is full.
    pub fn submit(&self, job: ShadowJob) {
        if let Err(mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job)) =
            self.tx.try_send(job)
        {
            job.candidate.metrics.record_shadow_dropped();
        }
    }
}

/// Runs a mirrored request on the candidate, measures it as the candidate's own, and
/// compares its answers with the baseline's.
fn run(job: ShadowJob) {
    let ShadowJob { candidate, inputs, baseline } = job;
    candidate.metrics.record_inputs(&inputs);
    let rows = inputs.first().and_then(|t| t.shape.first().copied()).unwrap_or(1);
    let started = Instant::now();
    match candidate.engine.run(inputs) {
        Ok(outputs) => {
            candidate.cost.record(rows, started.elapsed());
            candidate.metrics.record(started.elapsed(), Some(&outputs));
            let names = &candidate.engine.signature().outputs;
            let theirs: Vec<(&str, &Tensor)> =
                names.iter().map(|s| s.name.as_str()).zip(&outputs).collect();
            let ours: Vec<(&str, &Tensor)> =
                baseline.iter().map(|(n, t)| (n.as_str(), t)).collect();
            let (compared, agreed) = outcomes::agreement(&ours, &theirs);
            candidate.metrics.record_shadow(compared, agreed);
        }
        Err(e) => {
            tracing::debug!(model = %candidate.manifest.name, version = candidate.manifest.version, error = %e, "shadow run failed");
            candidate.metrics.record(started.elapsed(), None);
        }
    }
}

#[cfg(test)]
mod tests {
    use falaj_common::rollout::{Share, Step, Strategy};

    use super::*;

    fn live(guard: &str) -> LiveRollout {
        LiveRollout::from_stored(StoredRollout {
            spec: RolloutSpec {
                id: "ro-1".into(),
                model: "fault".into(),
                baseline: 1,
                candidate: 2,
                strategy: Strategy::Canary,
                steps: vec![Step { at: Timestamp::from_unix(100), share: Share::ALL }],
                mirror: Share::NONE,
                guards: vec![guard.parse().unwrap()],
                min_requests: 10,
            },
            baseline: Counts::default(),
            candidate: Counts::default(),
            rolled_back: None,
        })
    }

    fn window(version: u64, requests: u64, errors: u64) -> MetricsWindow {
        MetricsWindow {
            model: "fault".into(),
            version,
            start: Timestamp::from_unix(100),
            seconds: 1,
            counts: Counts { requests, errors, ..Counts::default() },
        }
    }

    #[test]
    fn a_failed_guard_rolls_back_once_and_routes_everything_to_the_baseline() {
        let r = live("error_rate<0.2");
        let now = Timestamp::from_unix(150);
        assert!(r.route(b"k", now).candidate, "100 % to the candidate");
        let no_profile = |_| None;
        // Below the minimum: pending, however bad.
        let o = r.observe(&[window(2, 5, 5), window(7, 100, 100)], no_profile, now);
        assert_eq!(o, Observed { changed: true, rolled_back: None });
        let o = r.observe(&[window(1, 50, 0)], no_profile, now);
        assert_eq!(o.rolled_back, None);
        let o = r.observe(&[window(2, 10, 0)], no_profile, now);
        assert!(o.rolled_back.unwrap().starts_with("error_rate<0.2 failed: 0.3333"));
        assert!(r.rolled_back() && !r.route(b"k", now).candidate);
        let report = r.report(now);
        assert_eq!((report.step, report.rolled_back, report.at), (Some(0), true, Some(now)));
        // Later windows do not roll it back again.
        assert_eq!(r.observe(&[window(2, 10, 10)], no_profile, now).rolled_back, None);
        let (_, candidate, rolled_back) = r.stored();
        assert_eq!((candidate.requests, candidate.errors), (25, 15));
        assert_eq!(rolled_back.map(|(at, _)| at), Some(now));
    }

    #[test]
    fn random_keys_differ() {
        let keys = RandomKeys::new();
        assert_ne!(keys.next(), keys.next());
    }
}
