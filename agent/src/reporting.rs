//! Metric windows from measurement to delivery. Every window (10 s by default) the counters
//! of each served version are closed into a [`MetricsWindow`] and appended to the outbox
//! in the agent's SQLite. The control-plane session sends what waits there, one batch in
//! flight, and a batch leaves the outbox only when the control plane acknowledges it,
//! after its own commit. Outages, restarts of either side and lost acknowledgements
//! therefore cost nothing: the control plane stores each (agent, sequence) once.
//!
//! A window that cannot be written (the disk full, or read-only) is kept in memory and
//! written before newer ones at the next close, so a disk that fills and frees again
//! loses no count; at most [`MAX_UNWRITTEN`] are kept, and what is dropped past that is
//! carried, counted, by the next window written.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use falaj_common::metrics::MetricsWindow;
use falaj_common::protocol::{MAX_WINDOWS_PER_BATCH, SequencedWindow};
use falaj_common::time::Timestamp;
use tokio::sync::{Notify, watch};

use crate::metrics::{AgentStats, ModelMetrics};
use crate::models::{Catalog, Registry, VersionState};
use crate::store::{Store, StoreError};

/// Most closed windows kept in memory while the outbox cannot be written.
pub const MAX_UNWRITTEN: usize = 1024;

/// How windows are made and kept.
#[derive(Debug, Clone, Copy)]
pub struct ReportConfig {
    /// Length of a metric window.
    pub window: Duration,
    /// Most windows the outbox keeps; past it the oldest are dropped (and counted).
    pub outbox_cap: usize,
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self { window: Duration::from_secs(10), outbox_cap: 100_000 }
    }
}

/// Closes windows into the outbox and hands them to the session.
#[derive(Debug)]
pub struct Reporter {
    store: Arc<Mutex<Store>>,
    registry: Arc<Registry>,
    stats: Arc<AgentStats>,
    config: ReportConfig,
    /// The versions measured at the last close: one unloaded since still gets its last
    /// window closed.
    measured: Mutex<Vec<Arc<ModelMetrics>>>,
    /// Closed windows the outbox could not take yet, oldest first.
    unwritten: Mutex<VecDeque<MetricsWindow>>,
    pending: Notify,
    rolled_back: Notify,
}

impl Reporter {
    /// A reporter for the versions `registry` serves, keeping its outbox in `store`.
    pub fn new(
        store: Arc<Mutex<Store>>,
        registry: Arc<Registry>,
        stats: Arc<AgentStats>,
        config: ReportConfig,
    ) -> Self {
        Self {
            store,
            registry,
            stats,
            config,
            measured: Mutex::new(Vec::new()),
            unwritten: Mutex::new(VecDeque::new()),
            pending: Notify::new(),
            rolled_back: Notify::new(),
        }
    }

    /// Signalled when windows may be waiting to be sent.
    pub fn pending(&self) -> &Notify {
        &self.pending
    }

    /// Signalled when a guard failed and a rollout was rolled back here: the control plane
    /// should hear of it at once.
    pub fn rolled_back(&self) -> &Notify {
        &self.rolled_back
    }

    fn lock_store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Closes the current window of every measured version and appends those that saw
    /// traffic to the outbox, then judges each rollout's guards on them; returns how many
    /// windows were appended. Blocking.
    pub fn close_windows(&self, now: SystemTime) -> Result<usize, StoreError> {
        let catalog = self.registry.catalog();
        let current: Vec<Arc<ModelMetrics>> = catalog
            .models
            .values()
            .flat_map(|m| m.versions.values())
            .filter_map(|v| match v {
                VersionState::Ready(v) => Some(Arc::clone(&v.metrics)),
                VersionState::Failed { .. } => None,
            })
            .collect();
        let previous = std::mem::replace(
            &mut *self.measured.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            current.clone(),
        );
        let gone = previous.into_iter().filter(|p| !current.iter().any(|c| Arc::ptr_eq(p, c)));
        let windows: Vec<MetricsWindow> =
            current.iter().cloned().chain(gone).filter_map(|m| m.close(now)).collect();
        self.judge(&catalog, &windows, now)?;
        let mut unwritten =
            self.unwritten.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        unwritten.extend(windows);
        if unwritten.is_empty() {
            return Ok(0);
        }
        let count = unwritten.len();
        let mut store = self.lock_store();
        let mut evicted = 0;
        while let Some(window) = unwritten.front() {
            tracing::debug!(model = %window.model, version = window.version, requests = window.counts.requests, "metric window closed");
            match store.outbox_push(window.clone(), self.config.outbox_cap, now) {
                Ok((_, dropped)) => {
                    evicted += dropped;
                    unwritten.pop_front();
                }
                Err(e) => {
                    keep_at_most(&mut unwritten, MAX_UNWRITTEN, &self.stats);
                    return Err(e);
                }
            }
        }
        drop(unwritten);
        self.update_depth(&store)?;
        drop(store);
        crate::crash_point("outbox-written");
        if evicted > 0 {
            self.stats.dropped_windows.fetch_add(evicted, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                evicted,
                cap = self.config.outbox_cap,
                "metrics outbox full: dropped the oldest windows (counted and reported)"
            );
        }
        self.pending.notify_one();
        Ok(count)
    }

    /// Windows closed and not yet written to the outbox.
    pub fn unwritten(&self) -> usize {
        self.unwritten.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Adds `windows` to the rollouts of their models and judges their guards; stores the
    /// figures and any rollback, and signals a rollback. Judged at every window, with or
    /// without traffic, so that an offline agent still rolls back on its own.
    fn judge(
        &self,
        catalog: &Catalog,
        windows: &[MetricsWindow],
        now: SystemTime,
    ) -> Result<(), StoreError> {
        let at = Timestamp::from_system(now);
        for live in catalog.rollouts.values() {
            let reference =
                |version| match catalog.models.get(&live.spec.model)?.versions.get(&version)? {
                    VersionState::Ready(v) => v.manifest.model()?.reference.as_ref(),
                    VersionState::Failed { .. } => None,
                };
            let observed = live.observe(windows, reference, at);
            if let Some(reason) = &observed.rolled_back {
                tracing::warn!(rollout = %live.spec.id, model = %live.spec.model, candidate = live.spec.candidate, %reason, "guard failed: rolled back to the baseline");
            }
            if observed.changed || observed.rolled_back.is_some() {
                let (baseline, candidate, rolled_back) = live.stored();
                let rolled_back = rolled_back.as_ref().map(|(at, reason)| (*at, reason.as_str()));
                self.lock_store().update_rollout(
                    &live.spec.id,
                    &baseline,
                    &candidate,
                    rolled_back,
                )?;
            }
            if observed.rolled_back.is_some() {
                self.rolled_back.notify_one();
            }
        }
        Ok(())
    }

    fn update_depth(&self, store: &Store) -> Result<(), StoreError> {
        let (windows, requests) = store.outbox_depth()?;
        self.stats.outbox_depth.store(windows, std::sync::atomic::Ordering::Relaxed);
        self.stats.outbox_requests.store(requests, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The oldest windows waiting, at most one batch. A stored window that no longer
    /// decodes is dropped from the outbox with an error logged. Blocking.
    pub fn batch(&self) -> Result<Vec<SequencedWindow>, StoreError> {
        let mut store = self.lock_store();
        let mut batch = Vec::new();
        let mut undecodable = Vec::new();
        for (seq, bytes) in store.outbox_peek(MAX_WINDOWS_PER_BATCH)? {
            match postcard::from_bytes::<MetricsWindow>(&bytes) {
                Ok(window) => batch.push(SequencedWindow { seq, window }),
                Err(e) => {
                    tracing::error!(seq, error = %e, "dropping an outbox window that does not decode");
                    undecodable.push(seq);
                }
            }
        }
        if !undecodable.is_empty() {
            store.outbox_ack(&undecodable)?;
            self.stats
                .dropped_windows
                .fetch_add(undecodable.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.update_depth(&store)?;
        }
        Ok(batch)
    }

    /// Deletes windows the control plane has stored. Blocking.
    pub fn acknowledged(&self, seqs: &[u64]) -> Result<(), StoreError> {
        let mut store = self.lock_store();
        store.outbox_ack(seqs)?;
        self.update_depth(&store)?;
        self.stats
            .delivered_windows
            .fetch_add(seqs.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Closes a window every [`ReportConfig::window`] until `shutdown` turns true, then
    /// closes the last one, so that a clean stop loses nothing.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // What a previous run left in the outbox shows on /metrics from the start.
        let this = Arc::clone(&self);
        let depth =
            tokio::task::spawn_blocking(move || this.update_depth(&this.lock_store())).await;
        if let Ok(Err(e)) = depth {
            tracing::error!(error = %e, "reading the metrics outbox failed");
        }
        let mut ticks = tokio::time::interval(self.config.window);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            let stopping = tokio::select! {
                _ = ticks.tick() => false,
                _ = shutdown.wait_for(|s| *s) => true,
            };
            let this = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || this.close_windows(SystemTime::now())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "writing metric windows to the outbox failed");
                }
                Err(e) => tracing::error!(error = %e, "closing metric windows failed"),
            }
            if stopping {
                return;
            }
        }
    }
}

/// Drops the oldest of `windows` past `limit`; the next one kept carries what they counted
/// (as the outbox's own eviction does), so the control plane still hears of them.
fn keep_at_most(windows: &mut VecDeque<MetricsWindow>, limit: usize, stats: &AgentStats) {
    let limit = limit.max(1);
    while windows.len() > limit {
        let Some(old) = windows.pop_front() else { break };
        let next = windows.front_mut().expect("more than the limit are kept");
        let counts = &mut next.counts;
        counts.dropped_windows =
            counts.dropped_windows.saturating_add(1).saturating_add(old.counts.dropped_windows);
        counts.dropped_requests = counts
            .dropped_requests
            .saturating_add(old.counts.requests)
            .saturating_add(old.counts.dropped_requests);
        stats.dropped_windows.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}
