//! The models being served: every installed version, loaded once and swapped in whole
//! when the store changes, so requests never wait on a lock; beside them, each feature
//! view's active snapshot ([`crate::features`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use falaj_common::bundle::Manifest;
use falaj_common::keys::Sha256;
use falaj_common::time::Timestamp;

use crate::engine::{Engine, Engines};
use crate::features::{self, SnapshotState, ViewEntry};
use crate::metrics::ModelMetrics;
use crate::rollout::LiveRollout;
use crate::store::{Installed, Store, StoreError};

/// One loaded model version.
#[derive(Debug)]
pub struct LoadedVersion {
    /// The bundle's manifest.
    pub manifest: Manifest,
    /// The manifest's hash, the bundle's identity.
    pub manifest_sha256: Sha256,
    /// The engine serving it.
    pub engine: Arc<dyn Engine>,
    /// What its runs have cost so far.
    pub cost: RunCost,
    /// What it serves, for the outbox and Prometheus.
    pub metrics: Arc<ModelMetrics>,
}

/// The observed cost of a model's runs per batch row (an exponentially weighted mean),
/// so the server can run cheap requests where they arrive and hand costly ones to the
/// blocking pool. Lock-free; concurrent updates may lose a sample, which is harmless.
///
/// The estimate that dispatch reads is the mean as it stood when it last moved by more
/// than a quarter, not the mean itself: the same run measures slower on the blocking pool
/// than on the worker (100–130 µs against 89–101 for a small CNN on a loaded machine), so
/// a model whose runs sit at the budget had a mean that crossed it back and forth, and
/// its calls went to one path or the other in stretches, their latency with them.
#[derive(Debug, Default)]
pub struct RunCost {
    nanos_per_row: AtomicU64,
    settled: AtomicU64,
}

impl RunCost {
    /// The expected duration of a run over `rows` rows, once a run has been seen.
    pub fn estimate(&self, rows: u64) -> Option<Duration> {
        match self.settled.load(Ordering::Relaxed) {
            0 => None,
            per_row => Some(Duration::from_nanos(per_row.saturating_mul(rows.max(1)))),
        }
    }

    /// Records a run over `rows` rows that took `elapsed`.
    pub fn record(&self, rows: u64, elapsed: Duration) {
        let sample =
            (elapsed.as_nanos() / u128::from(rows.max(1))).clamp(1, u128::from(u64::MAX)) as u64;
        let old = self.nanos_per_row.load(Ordering::Relaxed);
        let new = if old == 0 { sample } else { old - old / 8 + sample / 8 }.max(1);
        self.nanos_per_row.store(new, Ordering::Relaxed);
        let settled = self.settled.load(Ordering::Relaxed);
        if settled == 0 || new.abs_diff(settled) > settled / 4 {
            self.settled.store(new, Ordering::Relaxed);
        }
    }
}

/// A version's state.
#[derive(Debug, Clone)]
pub enum VersionState {
    /// Loaded and serving.
    Ready(Arc<LoadedVersion>),
    /// Installed but could not be loaded; the reason.
    Failed {
        /// The manifest's hash, so an unchanged failure is not retried on every reload.
        manifest_sha256: Sha256,
        /// Why it failed.
        reason: String,
        /// Whether its file did not open (damaged or tampered with on disk) rather than
        /// the model failing to load: such a version is read again at every reload, and a
        /// managed one is fetched again at the next sync.
        unreadable: bool,
    },
}

/// All versions of one model.
#[derive(Debug, Clone, Default)]
pub struct ModelEntry {
    /// The version requests without a version go to.
    pub active: Option<u64>,
    /// Every installed version.
    pub versions: BTreeMap<u64, VersionState>,
}

/// Every model and feature view, as of one reload.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Models by name.
    pub models: BTreeMap<String, ModelEntry>,
    /// Feature views by name, each with its active snapshot (inactive snapshot versions
    /// stay installed but are not loaded).
    pub features: BTreeMap<String, ViewEntry>,
    /// Derived models serving in place of their parents: parent name to the derived
    /// model's name and version ([`crate::store::Overlay`]).
    pub overlays: BTreeMap<String, (String, u64)>,
    /// Rollouts under way, by model name.
    pub rollouts: BTreeMap<String, Arc<LiveRollout>>,
    /// Whether the first load has completed.
    pub loaded: bool,
    /// The version of the trust root held and when it ends, as of the last reload.
    pub trust_root: Option<(u64, Timestamp)>,
}

impl Catalog {
    /// The model and version that serve requests for `name` that name no version: a
    /// derived model overlaying it while its parent version is the active one and it is
    /// loaded, else `name`'s active version (`None`).
    pub fn serving<'a>(&'a self, name: &'a str) -> (&'a str, Option<u64>) {
        let overlay = self.overlays.get(name).filter(|(derived, version)| {
            self.models.get(name).is_some_and(|m| m.active == Some(*version))
                && self.models.get(derived).is_some_and(|d| {
                    matches!(d.versions.get(version), Some(VersionState::Ready(_)))
                })
        });
        match overlay {
            Some((derived, version)) => (derived, Some(*version)),
            None => (name, None),
        }
    }

    /// Ready when loaded and every active version is serving (Triton's strict readiness),
    /// active snapshots included.
    pub fn ready(&self) -> bool {
        self.loaded
            && self.models.values().all(|m| {
                m.active.is_some_and(|v| matches!(m.versions.get(&v), Some(VersionState::Ready(_))))
            })
            && self.features.values().all(|v| matches!(v.state, SnapshotState::Ready(_)))
    }

    /// The model versions and active snapshots whose files did not open (damaged or
    /// tampered with on disk), with why.
    pub fn unreadable(&self) -> Vec<(String, u64, String)> {
        let models = self.models.iter().flat_map(|(name, entry)| {
            entry.versions.iter().filter_map(move |(version, state)| match state {
                VersionState::Failed { unreadable: true, reason, .. } => {
                    Some((name.clone(), *version, reason.clone()))
                }
                _ => None,
            })
        });
        let snapshots = self.features.iter().filter_map(|(name, entry)| match &entry.state {
            SnapshotState::Failed(reason) if entry.unreadable => {
                Some((name.clone(), entry.version, reason.clone()))
            }
            _ => None,
        });
        models.chain(snapshots).collect()
    }

    /// Every installed version (models, and active snapshots) that failed to load, as
    /// `NAME@VERSION failed to load: REASON`: reported to the control plane with the
    /// agent's state, so a file tampered with on disk shows in the fleet view even while
    /// the previous version keeps serving.
    pub fn load_failures(&self) -> Vec<String> {
        let models = self.models.iter().flat_map(|(name, entry)| {
            entry.versions.iter().filter_map(move |(version, state)| match state {
                VersionState::Failed { reason, .. } => Some((name, *version, reason)),
                VersionState::Ready(_) => None,
            })
        });
        let snapshots = self.features.iter().filter_map(|(name, entry)| match &entry.state {
            SnapshotState::Failed(reason) => Some((name, entry.version, reason)),
            SnapshotState::Ready(_) => None,
        });
        models
            .chain(snapshots)
            .map(|(name, version, reason)| format!("{name}@{version} failed to load: {reason}"))
            .collect()
    }
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// Versions newly loaded.
    pub loaded: Vec<(String, u64)>,
    /// Versions that failed to load.
    pub failed: Vec<(String, u64)>,
    /// Versions no longer installed.
    pub dropped: Vec<(String, u64)>,
}

/// The served models; cheap to read from any thread.
#[derive(Debug, Default)]
pub struct Registry {
    catalog: ArcSwap<Catalog>,
    engines: Engines,
    /// Counts catalogs swapped in, for whoever waits on a reload.
    reloads: tokio::sync::watch::Sender<u64>,
}

impl Registry {
    /// An empty registry (not ready until the first reload) that loads models on the
    /// engines' default choice.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry loading models on the engines `engines` chooses.
    pub fn with_engines(engines: Engines) -> Self {
        Self {
            catalog: ArcSwap::default(),
            engines,
            reloads: tokio::sync::watch::Sender::default(),
        }
    }

    /// The engine choice, and the GPU if one was opened.
    pub fn engines(&self) -> &Engines {
        &self.engines
    }

    /// Changes each time a reload swaps in a catalog: wait on it rather than poll.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.reloads.subscribe()
    }

    /// The current catalog.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog.load_full()
    }

    /// Brings the catalog in line with the store: loads new versions (reusing those
    /// already loaded), drops removed ones, and swaps the result in. Blocking.
    pub fn reload(&self, store: &Store) -> Result<ReloadSummary, StoreError> {
        let current = self.catalog();
        let overlays =
            store.overlays()?.into_iter().map(|o| (o.name, (o.derived, o.version))).collect();
        let rollouts = live_rollouts(store, &current)?;
        let trust_root = store.trust_root().ok().map(|root| (root.version(), root.expires()));
        if let Some((version, expires)) = trust_root {
            warn_of_expiry(version, expires, Timestamp::from_system(std::time::SystemTime::now()));
        }
        let mut next =
            Catalog { overlays, rollouts, loaded: true, trust_root, ..Catalog::default() };
        let mut summary = ReloadSummary::default();
        for installed in store.installed()? {
            let (name, version) = (installed.manifest.name.clone(), installed.manifest.version);
            if installed.manifest.snapshot().is_some() {
                if installed.active {
                    let entry = load_snapshot(store, &installed, &current, &mut summary);
                    next.features.insert(name, entry);
                }
                continue;
            }
            let previous = current.models.get(&name).and_then(|m| m.versions.get(&version));
            let state = match previous {
                Some(VersionState::Ready(v)) if v.manifest_sha256 == installed.manifest_sha256 => {
                    VersionState::Ready(Arc::clone(v))
                }
                Some(failed @ VersionState::Failed { manifest_sha256, unreadable: false, .. })
                    if *manifest_sha256 == installed.manifest_sha256 =>
                {
                    failed.clone()
                }
                _ => self.load_version(store, &installed, &mut summary),
            };
            let entry = next.models.entry(name).or_default();
            if installed.active {
                entry.active = Some(version);
            }
            entry.versions.insert(version, state);
        }
        keep_previous_serving(&mut next, &current);
        for (name, entry) in &current.models {
            for version in entry.versions.keys() {
                if !next.models.get(name).is_some_and(|m| m.versions.contains_key(version)) {
                    summary.dropped.push((name.clone(), *version));
                }
            }
        }
        for (name, entry) in &current.features {
            if next.features.get(name).is_none_or(|e| e.version != entry.version) {
                summary.dropped.push((name.clone(), entry.version));
            }
        }
        self.catalog.store(Arc::new(next));
        self.reloads.send_modify(|n| *n += 1);
        Ok(summary)
    }

    /// Reads, opens and loads one installed model version: ready, or failed with why.
    fn load_version(
        &self,
        store: &Store,
        installed: &Installed,
        summary: &mut ReloadSummary,
    ) -> VersionState {
        let (name, version) = (installed.manifest.name.clone(), installed.manifest.version);
        let started = Instant::now();
        // A file that does not open is not the model's fault: read again later.
        let read = store.read_content(installed);
        let unreadable = read.is_err();
        let loaded = read.map_err(|e| e.to_string()).and_then(|bytes| {
            let spec = installed.manifest.model().ok_or("not a model bundle")?;
            let engine =
                self.engines.load(&name, version, spec, &bytes).map_err(|e| e.to_string())?;
            if let Some(input) = &spec.features {
                input.fits(engine.signature())?;
            }
            Ok(engine)
        });
        match loaded {
            Ok(engine) => {
                tracing::info!(
                    model = %name,
                    version,
                    engine = engine.name(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "model loaded"
                );
                summary.loaded.push((name.clone(), version));
                VersionState::Ready(Arc::new(LoadedVersion {
                    manifest: installed.manifest.clone(),
                    manifest_sha256: installed.manifest_sha256,
                    metrics: Arc::new(ModelMetrics::new(
                        &name,
                        version,
                        engine.signature(),
                        installed.manifest.model().and_then(|m| m.reference.as_ref()),
                        std::time::SystemTime::now(),
                    )),
                    engine,
                    cost: RunCost::default(),
                }))
            }
            Err(reason) => {
                tracing::error!(model = %name, version, error = %reason, "model failed to load");
                summary.failed.push((name.clone(), version));
                VersionState::Failed {
                    manifest_sha256: installed.manifest_sha256,
                    reason,
                    unreadable,
                }
            }
        }
    }
}

/// Warns in the log while the trust root held is within 90, 30 or 7 days of its end (an
/// agent past it refuses every bundle and document): at each reload, so at start and
/// after each install.
fn warn_of_expiry(version: u64, expires: Timestamp, now: Timestamp) {
    if let Some(days) = falaj_common::time::expiry_warning(now, expires) {
        tracing::warn!(
            version,
            %expires,
            days,
            "trust root version {version} expires within {days} days: take its successor \
             (from the control plane, or `falaj-agent trust update` on an air-gapped site)"
        );
    }
}

/// Where a model's active version failed to load (a file tampered with on disk is refused
/// by its GCM tags, a damaged one by its hashes), the version that served it before keeps
/// serving requests that name no version, else the newest loaded version below it; the
/// failed version stays reported as such.
fn keep_previous_serving(next: &mut Catalog, current: &Catalog) {
    for (name, entry) in &mut next.models {
        let Some(active) = entry.active else { continue };
        if !matches!(entry.versions.get(&active), Some(VersionState::Failed { .. })) {
            continue;
        }
        let ready = |v: &u64| matches!(entry.versions.get(v), Some(VersionState::Ready(_)));
        let before = current.models.get(name).and_then(|m| m.active).filter(|v| ready(v));
        let fallback =
            before.or_else(|| entry.versions.range(..active).rev().map(|(v, _)| *v).find(ready));
        if let Some(serving) = fallback {
            tracing::warn!(
                model = %name,
                failed = active,
                serving,
                "the active version failed to load; the previous version keeps serving"
            );
            entry.active = Some(serving);
        }
    }
}

/// The store's rollouts by model: those unchanged since `current` keep their live state,
/// the others start from what the store holds.
fn live_rollouts(
    store: &Store,
    current: &Catalog,
) -> Result<BTreeMap<String, Arc<LiveRollout>>, StoreError> {
    Ok(store
        .rollouts()?
        .into_iter()
        .map(|stored| {
            let live = match current.rollouts.get(&stored.spec.model) {
                Some(live) if live.spec == stored.spec => Arc::clone(live),
                _ => Arc::new(LiveRollout::from_stored(stored.clone())),
            };
            (stored.spec.model, live)
        })
        .collect())
}

/// The entry of an active snapshot: the table already loaded (or refused) when the bundle
/// is the same (by manifest hash) and its file opened, else loaded now.
fn load_snapshot(
    store: &Store,
    installed: &Installed,
    current: &Catalog,
    summary: &mut ReloadSummary,
) -> ViewEntry {
    let (name, version) = (&installed.manifest.name, installed.manifest.version);
    let manifest_sha256 = installed.manifest_sha256;
    if let Some(previous) =
        current.features.get(name).filter(|p| p.manifest_sha256 == manifest_sha256 && !p.unreadable)
    {
        return previous.clone();
    }
    let started = Instant::now();
    let mut unreadable = false;
    let state = match features::load_telling(store, installed) {
        Ok(table) => {
            tracing::info!(
                view = %name,
                version,
                entities = table.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "feature snapshot loaded"
            );
            summary.loaded.push((name.clone(), version));
            SnapshotState::Ready(Arc::new(table))
        }
        Err((reason, did_not_open)) => {
            tracing::error!(view = %name, version, error = %reason, "feature snapshot failed to load");
            summary.failed.push((name.clone(), version));
            unreadable = did_not_open;
            SnapshotState::Failed(reason)
        }
    };
    ViewEntry { version, manifest_sha256, state, unreadable }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_cost_tracks_per_row_cost() {
        let cost = RunCost::default();
        assert_eq!(cost.estimate(10), None, "unknown until a run is seen");
        cost.record(10, Duration::from_micros(100));
        assert_eq!(cost.estimate(1), Some(Duration::from_micros(10)));
        assert_eq!(cost.estimate(100), Some(Duration::from_millis(1)));
        for _ in 0..100 {
            cost.record(1, Duration::from_micros(2));
        }
        let settled = cost.estimate(1).unwrap();
        assert!(settled < Duration::from_micros(3), "{settled:?}");
    }

    #[test]
    fn an_estimate_holds_while_the_mean_stays_within_a_quarter_of_it() {
        // Runs at 95 µs, then measured at 115–120 on the pool: the mean rises by a fifth,
        // and the estimate (and so the path) stays where it was.
        let cost = RunCost::default();
        cost.record(1, Duration::from_micros(95));
        for i in 0..200 {
            cost.record(1, Duration::from_micros(if i % 2 == 0 { 115 } else { 120 }));
        }
        assert_eq!(cost.estimate(1), Some(Duration::from_micros(95)));
        // Twice as slow: past a quarter, the estimate follows.
        for _ in 0..200 {
            cost.record(1, Duration::from_micros(190));
        }
        let moved = cost.estimate(1).unwrap();
        assert!(moved > Duration::from_micros(150), "{moved:?}");
    }
}
