//! The control plane's Prometheus endpoint, `/metrics` on the admin listener: fleet-wide
//! request figures per model version (from the metric windows stored since start), agents
//! connected, enrolled and with reconciliation errors, windows ingested, bytes sent, and
//! alerts firing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use falaj_common::exposition;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::state::Shared;

/// Figures read from the database at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stored {
    /// Agents enrolled and not revoked.
    pub agents: u64,
    /// Agents whose last report carries reconciliation errors.
    pub agents_with_errors: u64,
    /// Alerts firing.
    pub alerts_firing: u64,
}

/// The collector: live figures from `shared`, stored ones from `stored`.
#[derive(Debug)]
pub struct Exporter {
    /// Daemon state.
    pub shared: Arc<Shared>,
    /// Read from the database just before.
    pub stored: Stored,
}

impl Collector for Exporter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let i = &self.shared.ingest;
        exposition::encode_versions(&mut encoder, "reported by agents", &i.versions())?;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let connected =
            self.shared.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len();
        exposition::encode_scalars(
            &mut encoder,
            &[
                ("falaj_agents_connected", "Agents with a live session", false, connected as u64),
                (
                    "falaj_agents_enrolled",
                    "Agents enrolled and not revoked",
                    false,
                    self.stored.agents,
                ),
                (
                    "falaj_agents_reconcile_errors",
                    "Agents whose last report has reconciliation errors",
                    false,
                    self.stored.agents_with_errors,
                ),
                ("falaj_metric_windows_stored", "Metric windows stored", true, load(&i.stored)),
                (
                    "falaj_metric_windows_duplicate",
                    "Metric windows received again and skipped",
                    true,
                    load(&i.duplicates),
                ),
                (
                    "falaj_metric_windows_rejected",
                    "Metric windows refused as implausible",
                    true,
                    load(&i.rejected),
                ),
                (
                    "falaj_metric_windows_dropped_by_agents",
                    "Metric windows agents dropped from full outboxes",
                    true,
                    load(&i.dropped),
                ),
                (
                    "falaj_transfer_bytes",
                    "Bytes of bundle chunks and recipes sent to agents",
                    true,
                    load(&i.transfer_bytes),
                ),
                ("falaj_alerts_firing", "Alerts firing", false, self.stored.alerts_firing),
            ],
        )
    }
}
