//! The control plane's Prometheus endpoint, `/metrics` on the admin listener: fleet-wide
//! request figures per model version (from the metric windows stored since start), agents
//! connected, enrolled and with reconciliation errors, windows ingested, bytes sent,
//! whether this replica holds the region's lease,
//! alerts firing, webhook notifications waiting and what the attempts to send them came
//! to, and the latest rollout of each model in each group: its state, the
//! candidate's share, and (from the last judgement) each variant's requests, shadow
//! agreement and drops, and each guard's value and whether it fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use falaj_common::exposition;
use falaj_common::rollout::Verdict;
use falaj_common::time::Timestamp;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use crate::rollouts::{Judgement, Rollout, RolloutState};
use crate::state::Shared;

/// Figures read from the database at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    /// Agents enrolled and not revoked.
    pub agents: u64,
    /// Agents whose last report carries reconciliation errors.
    pub agents_with_errors: u64,
    /// Alerts firing.
    pub alerts_firing: u64,
    /// Webhook notifications waiting, and when the oldest was recorded.
    pub notifications: (u64, Option<Timestamp>),
    /// The latest rollout of each (group, model).
    pub rollouts: Vec<Rollout>,
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
        let now = Timestamp::from_system(SystemTime::now());
        let left = |expires: Timestamp| expires.unix().saturating_sub(now.unix());
        let keyring = self.shared.keyring();
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
                (
                    "falaj_trust_root_expiry_seconds",
                    "Seconds until the trust root expires (0 once it has)",
                    false,
                    left(keyring.trust.expires()),
                ),
                (
                    "falaj_trust_root_version",
                    "The version of the trust root in force (a rotation is taken on SIGHUP)",
                    false,
                    keyring.trust.version(),
                ),
                (
                    "falaj_region_lease_held",
                    "1 while this replica holds the region's lease and does the region's work",
                    false,
                    load(&self.shared.region_lease),
                ),
                (
                    "falaj_ca_certificate_expiry_seconds",
                    "Seconds until the agents' certificate authority expires",
                    false,
                    left(self.shared.ca.expires()),
                ),
                (
                    "falaj_server_certificate_expiry_seconds",
                    "Seconds until the QUIC server certificate expires (it renews itself)",
                    false,
                    left(Timestamp::from_unix(load(&self.shared.server_cert_expires))),
                ),
            ],
        )?;
        encode_event_poll(&mut encoder, &self.shared)?;
        encode_outbox(&mut encoder, &self.shared, self.stored.notifications, now)?;
        let judged: Vec<Judgement> = {
            let judged =
                self.shared.judged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.stored
                .rollouts
                .iter()
                .filter_map(|r| judged.get(&(r.group.clone(), r.model.clone())))
                .filter(|j| self.stored.rollouts.iter().any(|r| r.id == j.rollout.id))
                .cloned()
                .collect()
        };
        encode_rollouts(&mut encoder, &self.stored.rollouts, &judged)
    }
}

fn labels(r: &Rollout) -> [(&'static str, String); 3] {
    [("rollout", r.id.clone()), ("group", r.group.clone()), ("model", r.model.clone())]
}

fn with(r: &Rollout, key: &'static str, value: String) -> [(&'static str, String); 4] {
    let [a, b, c] = labels(r);
    [a, b, c, (key, value)]
}

/// Writes the rollout families: state and share from `rollouts`, figures from `judged`.
fn encode_rollouts(
    encoder: &mut DescriptorEncoder<'_>,
    rollouts: &[Rollout],
    judged: &[Judgement],
) -> Result<(), std::fmt::Error> {
    let now = Timestamp::from_system(SystemTime::now());
    let mut family = encoder.encode_descriptor(
        "falaj_rollout_state",
        "The latest rollout of each model in each group: 1 for its state",
        None,
        MetricType::Gauge,
    )?;
    for r in rollouts {
        for state in RolloutState::ALL {
            let value = i64::from(r.state == state);
            family.encode_family(&with(r, "state", state.name().into()))?.encode_gauge(&value)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "falaj_rollout_share_percent",
        "The candidate's share of requests now, percent",
        None,
        MetricType::Gauge,
    )?;
    for r in rollouts {
        family.encode_family(&labels(r))?.encode_gauge(&r.share_at(now).percent())?;
    }
    let mut family = encoder.encode_descriptor(
        "falaj_rollout_requests",
        "Requests served by each variant since the rollout began, at the last judgement",
        None,
        MetricType::Counter,
    )?;
    for j in judged {
        for (variant, figures) in [("baseline", &j.baseline), ("candidate", &j.candidate)] {
            family
                .encode_family(&with(&j.rollout, "variant", variant.into()))?
                .encode_counter::<NoLabelSet, _, u64>(&figures.requests, None)?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "falaj_rollout_shadow_agreement",
        "Rows on which the candidate agreed with the baseline over rows compared",
        None,
        MetricType::Gauge,
    )?;
    for j in judged.iter().filter(|j| j.candidate.compared > 0) {
        let agreement = j.candidate.agreed as f64 / j.candidate.compared as f64;
        family.encode_family(&labels(&j.rollout))?.encode_gauge(&agreement)?;
    }
    let mut family = encoder.encode_descriptor(
        "falaj_rollout_shadow_dropped",
        "Mirrored requests agents dropped because the candidate's queue was full",
        None,
        MetricType::Counter,
    )?;
    for j in judged {
        family
            .encode_family(&labels(&j.rollout))?
            .encode_counter::<NoLabelSet, _, u64>(&j.candidate.shadow_dropped, None)?;
    }
    let mut family = encoder.encode_descriptor(
        "falaj_rollout_guard_value",
        "Each guard's value for the candidate at the last judgement",
        None,
        MetricType::Gauge,
    )?;
    for j in judged {
        for g in &j.guards {
            if let Some(value) = g.value {
                family
                    .encode_family(&with(&j.rollout, "guard", g.guard.to_string()))?
                    .encode_gauge(&value)?;
            }
        }
    }
    let mut family = encoder.encode_descriptor(
        "falaj_rollout_guard_failing",
        "1 when the guard failed at the last judgement",
        None,
        MetricType::Gauge,
    )?;
    for j in judged {
        for g in &j.guards {
            family
                .encode_family(&with(&j.rollout, "guard", g.guard.to_string()))?
                .encode_gauge(&i64::from(g.verdict == Verdict::Fails))?;
        }
    }
    Ok(())
}

/// The event poll's figures (PostgreSQL replicas): the newest event read, and how often
/// another replica's events made this one send its agents their documents.
fn encode_event_poll(encoder: &mut DescriptorEncoder, shared: &Shared) -> std::fmt::Result {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    exposition::encode_scalars(
        encoder,
        &[
            (
                "falaj_events_seen",
                "The newest event this replica's event poll has read (PostgreSQL only)",
                false,
                *shared.events_seen.borrow(),
            ),
            (
                "falaj_event_poll_pushes",
                "Times this replica sent its agents their documents again for events \
                     another replica recorded",
                true,
                load(&shared.event_pushes),
            ),
        ],
    )
}

/// The webhook outbox's figures: notifications waiting (`waiting`, the oldest recorded at
/// `oldest`), and what this replica's attempts to send them came to.
fn encode_outbox(
    encoder: &mut DescriptorEncoder,
    shared: &Shared,
    (waiting, oldest): (u64, Option<Timestamp>),
    now: Timestamp,
) -> std::fmt::Result {
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    exposition::encode_scalars(
        encoder,
        &[
            (
                "falaj_webhook_notifications_pending",
                "Webhook notifications recorded and not yet delivered or given up",
                false,
                waiting,
            ),
            (
                "falaj_webhook_oldest_pending_seconds",
                "Seconds since the oldest webhook notification waiting was recorded",
                false,
                oldest.map_or(0, |t| now.unix().saturating_sub(t.unix())),
            ),
            (
                "falaj_webhook_notifications_delivered",
                "Webhook notifications this replica delivered",
                true,
                *shared.outbox.delivered.borrow(),
            ),
            (
                "falaj_webhook_attempts_failed",
                "Attempts to send a webhook notification that failed (each retried or given up)",
                true,
                load(&shared.outbox.failed),
            ),
            (
                "falaj_webhook_notifications_given_up",
                "Webhook notifications this replica gave up, undelivered an hour after they were recorded",
                true,
                load(&shared.outbox.given_up),
            ),
        ],
    )
}
