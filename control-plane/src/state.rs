//! What the daemon's tasks share: the database, blobs, keys (taken again after a
//! rotation), the CA, live agent sessions, and the issuing of desired-state documents.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use falaj_common::desired::{DesiredBundle, DesiredState, SignedDesired};
use falaj_common::finetune::DesiredJob;
use falaj_common::keys::{Sha256, SigningKey};
use falaj_common::protocol::{ActualState, ControlMessage};
use falaj_common::rollout::RolloutSpec;
use falaj_common::time::Timestamp;
use futures_util::StreamExt as _;
use tokio::sync::mpsc;

use crate::blobs::BlobStore;
use crate::ca::Ca;
use crate::db::{self, Db, DbError, IssuedDesired};
use crate::keyring::Keyring;
use crate::keys::KeysError;
use crate::monitoring::IngestStats;
use crate::vault::Vault;

/// How the daemon behaves.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Lifetime of a desired-state document; documents are reissued at half-life.
    pub desired_ttl: Duration,
    /// Lifetime of an agent certificate.
    pub cert_ttl: Duration,
    /// How often agents report; three missed reports mark an agent offline.
    pub heartbeat: Duration,
    /// Bounds on unauthenticated (enrollment) connections.
    pub enrollment: EnrollmentLimits,
    /// Bounds on QUIC handshakes in progress.
    pub handshakes: HandshakeLimits,
}

/// Bounds on QUIC handshakes in progress, which hold state before anyone is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Most handshakes in progress at once; more are refused. From half of it on, a
    /// client must first prove its address (a stateless retry), so that forged source
    /// addresses take no places.
    pub max_total: usize,
    /// Most handshakes in progress at once from one IP address.
    pub max_per_address: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        Self { max_total: 512, max_per_address: 32 }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            desired_ttl: Duration::from_secs(3600),
            cert_ttl: Duration::from_secs(30 * 24 * 3600),
            heartbeat: Duration::from_secs(10),
            enrollment: EnrollmentLimits::default(),
            handshakes: HandshakeLimits::default(),
        }
    }
}

/// Bounds on enrollment connections, which present no certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnrollmentLimits {
    /// Most enrollment connections open at once; more are closed at once.
    pub max_total: usize,
    /// Most enrollment connections open at once from one IP address.
    pub max_per_address: usize,
    /// How long a connection has to send its request, and then to take the answer.
    pub deadline: Duration,
}

impl Default for EnrollmentLimits {
    fn default() -> Self {
        Self { max_total: 64, max_per_address: 4, deadline: Duration::from_secs(10) }
    }
}

/// Places held at once, per IP address and in total; a place is given back when its
/// [`AddressSlot`] is dropped. IPv4-mapped IPv6 addresses count as their IPv4 address.
#[derive(Debug, Default)]
pub struct AddressGate {
    max_total: usize,
    max_per_address: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    /// Places refused because a limit was reached.
    pub refused: AtomicU64,
}

/// A place at an [`AddressGate`], given back when dropped.
#[derive(Debug)]
pub struct AddressSlot<'a> {
    gate: &'a AddressGate,
    address: IpAddr,
}

impl AddressGate {
    /// A gate of `max_total` places, `max_per_address` of them for one address.
    pub fn new(max_total: usize, max_per_address: usize) -> Self {
        Self { max_total, max_per_address, ..Self::default() }
    }

    /// A place for `address`, or `None` if a limit is reached.
    pub fn enter(&self, address: IpAddr) -> Option<AddressSlot<'_>> {
        let address = address.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, by_address) = &mut *open;
        let here = by_address.entry(address).or_insert(0);
        if *total >= self.max_total || *here >= self.max_per_address {
            if *here == 0 {
                by_address.remove(&address);
            }
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *here += 1;
        *total += 1;
        Some(AddressSlot { gate: self, address })
    }

    /// Places held now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0
    }
}

impl Drop for AddressSlot<'_> {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (total, by_address) = &mut *open;
        *total -= 1;
        if let Some(here) = by_address.get_mut(&self.address) {
            *here -= 1;
            if *here == 0 {
                by_address.remove(&self.address);
            }
        }
    }
}

/// Enrollment connections, which present no certificate: open ones counted in total and
/// per address, and the bytes their request frames hold.
#[derive(Debug, Default)]
pub struct EnrollmentGate {
    limits: EnrollmentLimits,
    /// The connections open.
    pub places: AddressGate,
    /// Bytes held in enrollment request frames being read (for tests and `/metrics`).
    pub buffered: AtomicU64,
    /// Enrollment connections closed at their deadline.
    pub timed_out: AtomicU64,
}

impl EnrollmentGate {
    /// A gate with these limits.
    pub fn new(limits: EnrollmentLimits) -> Self {
        Self {
            limits,
            places: AddressGate::new(limits.max_total, limits.max_per_address),
            ..Self::default()
        }
    }

    pub fn limits(&self) -> EnrollmentLimits {
        self.limits
    }

    /// A place for a connection from `address`, or `None` if a limit is reached.
    pub fn enter(&self, address: IpAddr) -> Option<AddressSlot<'_>> {
        self.places.enter(address)
    }
}

/// A live agent connection.
#[derive(Debug)]
pub struct Session {
    /// Distinguishes this connection from a later one of the same agent.
    pub serial: u64,
    /// The QUIC connection, to close it on revocation.
    pub connection: quinn::Connection,
    /// Messages to send on the session stream.
    pub tx: mpsc::Sender<ControlMessage>,
    /// The version of the last document sent.
    pub sent_version: Option<u64>,
}

/// Documents issued at once on PostgreSQL when many agents need one (a deployment's
/// fan-out): each takes a pooled connection for a few round trips.
const ISSUERS: usize = 4;

/// State shared by the daemon's tasks.
#[derive(Debug)]
pub struct Shared {
    pub db: Db,
    /// Chunks and recipes.
    pub blobs: Arc<dyn BlobStore>,
    /// The certificate authority.
    pub ca: Ca,
    /// The trust root in force, its chain and the signing keys: swapped whole when a
    /// rotation is taken (SIGHUP, [`Shared::reload_keys`]).
    keyring: ArcSwap<Keyring>,
    /// The keys directory, opened (unsealed) once at start: a reload reads it again.
    vault: Arc<Vault>,
    /// When the QUIC server certificate in use expires (Unix seconds); it is renewed
    /// in place before then.
    pub server_cert_expires: AtomicU64,
    /// Whether this replica holds the region's lease (1) or not (0), as the task keeping
    /// it last found ([`crate::lease`]; always 1 on SQLite once serving).
    pub region_lease: AtomicU64,
    /// On PostgreSQL, the newest event this replica's event poll has read (0 before its
    /// first read), for `/metrics`; sent after the poll has counted its push, so a
    /// receiver that sees an event read sees the push it made.
    pub events_seen: tokio::sync::watch::Sender<u64>,
    /// Times the event poll sent agents their documents again because another replica
    /// recorded events (a replica's own events never count: it sent them itself).
    pub event_pushes: AtomicU64,
    /// This control plane's region.
    pub region: String,
    /// Timings.
    pub policy: Policy,
    /// Live sessions by agent id.
    pub sessions: Mutex<HashMap<String, Session>>,
    /// Reports not yet written to the database: agent -> (time, state).
    pub seen: Mutex<HashMap<String, (Timestamp, Option<ActualState>)>>,
    /// Metric windows and transfers, for `/metrics`.
    pub ingest: IngestStats,
    /// Metric windows on their way to the database, stored in groups.
    pub windows: crate::window_queue::WindowQueue,
    /// The last judgement of each rollout's (group, model), for `/metrics`.
    pub judged: crate::rollouts::judge::Judged,
    /// The key that signs the audit log's checkpoints.
    pub audit_key: Arc<SigningKey>,
    /// Wakes the rollout judge at once: an agent reported a rollback.
    pub rollback_reported: tokio::sync::Notify,
    /// The webhook sender's wake-up and counts ([`crate::outbox`]).
    pub outbox: crate::outbox::Sender,
    /// Open enrollment connections and what they hold.
    pub enrollments: EnrollmentGate,
    /// QUIC handshakes in progress.
    pub handshakes: AddressGate,
    /// The bound on handshakes in progress from which clients must prove their address.
    pub retry_from: usize,
    next_session: AtomicU64,
}

/// Hash of a document's content (bundles, jobs, rollouts): a new document is issued when
/// it changes. A document without rollouts hashes as before rollouts existed.
fn content_sha256(
    bundles: &[DesiredBundle],
    jobs: &[DesiredJob],
    rollouts: &[RolloutSpec],
) -> Sha256 {
    let json = if rollouts.is_empty() {
        serde_json::to_vec(&(bundles, jobs))
    } else {
        serde_json::to_vec(&(bundles, jobs, rollouts))
    };
    Sha256::of(&json.expect("bundle, job and rollout lists serialise"))
}

impl Shared {
    /// Assembles the shared state; `keyring` was read from `vault`'s directory.
    pub fn new(
        db: Db,
        blobs: Arc<dyn BlobStore>,
        ca: Ca,
        (keyring, vault): (Keyring, Arc<Vault>),
        audit_key: SigningKey,
        policy: Policy,
    ) -> Self {
        Self {
            db,
            blobs,
            ca,
            region: keyring.trust.region().to_owned(),
            keyring: ArcSwap::from_pointee(keyring),
            vault,
            server_cert_expires: AtomicU64::new(0),
            region_lease: AtomicU64::new(0),
            events_seen: tokio::sync::watch::Sender::new(0),
            event_pushes: AtomicU64::new(0),
            audit_key: Arc::new(audit_key),
            enrollments: EnrollmentGate::new(policy.enrollment),
            handshakes: AddressGate::new(
                policy.handshakes.max_total,
                policy.handshakes.max_per_address,
            ),
            retry_from: policy.handshakes.max_total / 2,
            policy,
            sessions: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            ingest: IngestStats::default(),
            windows: crate::window_queue::WindowQueue::default(),
            judged: Mutex::default(),
            rollback_reported: tokio::sync::Notify::new(),
            outbox: crate::outbox::Sender::default(),
            next_session: AtomicU64::new(1),
        }
    }

    /// The trust root, chain and signing keys in force.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring.load_full()
    }

    /// The keys directory, opened at start.
    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// Takes a rotation made in the keys directory while running: if its trust root is
    /// newer and follows the one in force, it and its signing keys replace them, every
    /// connected agent is sent the chain, and documents signed under keys the new root no
    /// longer lists are issued again. Returns the version now in force when it changed.
    /// A directory that still holds the root in force changes nothing; one whose root
    /// does not follow it is refused and the keys in force stay.
    pub async fn reload_keys(&self, now: SystemTime) -> Result<Option<u64>, KeysError> {
        let current = self.keyring();
        let Some(next) = current.successor(&self.vault, now)? else { return Ok(None) };
        let version = next.trust.version();
        let chain = next.chain.clone();
        {
            // Swapped and announced under the sessions' lock: a document queued after
            // the chain is checked against the new keys (`send_if_newer`), one queued
            // before it was signed under the root the agent still holds.
            let sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            self.keyring.store(Arc::new(next));
            for (agent, session) in sessions.iter() {
                if session.tx.try_send(ControlMessage::TrustRoots(chain.clone())).is_err() {
                    tracing::warn!(%agent, "session queue full; the trust root follows at its next session");
                    session.connection.close(crate::quic::CLOSE_BUSY.into(), b"trust root changed");
                }
            }
        }
        if let Err(err) = self.push_desired(None, now).await {
            tracing::error!(error = %err, "issuing documents under the new keys failed");
        }
        Ok(Some(version))
    }

    /// Queues `message` on `agent`'s session, if it has one.
    pub async fn send(&self, agent: &str, message: ControlMessage) {
        let tx = self
            .sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(agent)
            .map(|s| s.tx.clone());
        if let Some(tx) = tx {
            let _ = tx.send(message).await;
        }
    }

    /// A number for a new session.
    pub fn session_serial(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// The current desired-state document for `agent_id`: the last one issued, or a new
    /// one (version + 1) if the group's deployments, the agent's jobs or the group's
    /// rollouts under way changed, or the last is past half-life. A rollout under way
    /// lists its baseline active and its candidate inactive, and travels as its spec.
    pub async fn desired_for(
        &self,
        agent_id: &str,
        now: SystemTime,
    ) -> Result<SignedDesired, DbError> {
        let (agent_id, region) = (agent_id.to_owned(), self.region.clone());
        let keyring = self.keyring();
        let ttl = self.policy.desired_ttl;
        self.db
            .run(move |sql| {
                let tx = sql.transaction()?;
                // The agent's row first, locked until the end on PostgreSQL (see
                // `db::desired_for_update`): replicas issue its documents one at a time.
                let previous = db::desired_for_update(&tx, &agent_id)?;
                let group = db::agent(&tx, &agent_id)?.map(|a| a.group).unwrap_or_default();
                let mut bundles: Vec<DesiredBundle> = db::deployments(&tx, &group)?
                    .into_iter()
                    .map(|b| DesiredBundle {
                        name: b.name,
                        version: b.version,
                        manifest_sha256: b.manifest_sha256,
                        bundle_sha256: b.bundle_sha256,
                        size: b.size,
                        recipe_sha256: b.recipe_sha256,
                        activate: true,
                    })
                    .collect();
                let jobs = crate::finetune::open_jobs(&tx, &agent_id)?;
                let mut rollouts = Vec::new();
                for r in crate::rollouts::all_under_way(&tx, Some(&group))? {
                    // Deployments of a model are frozen while its rollout is under way, so
                    // the group runs the baseline; anything else is skipped, not sent.
                    let runs_baseline =
                        bundles.iter().any(|b| b.name == r.model && b.version == r.baseline);
                    let candidate = db::bundle(&tx, &r.model, r.candidate)?;
                    let Some(c) = candidate.filter(|_| runs_baseline) else {
                        tracing::warn!(rollout = %r.id, group = %r.group, "rollout's versions do not match the deployment; not sent");
                        continue;
                    };
                    bundles.push(DesiredBundle {
                        name: c.name,
                        version: c.version,
                        manifest_sha256: c.manifest_sha256,
                        bundle_sha256: c.bundle_sha256,
                        size: c.size,
                        recipe_sha256: c.recipe_sha256,
                        activate: false,
                    });
                    rollouts.push(r.spec());
                }
                let content = content_sha256(&bundles, &jobs, &rollouts);
                let now = Timestamp::from_system(now);
                if let Some(p) = &previous {
                    let fresh = now.saturating_add(ttl / 2) < p.expires;
                    if p.content_sha256 == content
                        && fresh
                        && let Ok(signed) = postcard::from_bytes::<SignedDesired>(&p.signed)
                        && keyring.signed_now(&signed.document, &signed.signatures)
                    {
                        return Ok(signed);
                    }
                }
                let document = DesiredState {
                    agent: agent_id.clone(),
                    region,
                    version: previous.map_or(1, |p| p.version + 1),
                    issued: now,
                    expires: now.saturating_add(ttl),
                    bundles,
                    jobs,
                    rollouts,
                };
                let keys: Vec<&SigningKey> = keyring.signers.iter().collect();
                let signed = document.sign(&keys);
                let issued = IssuedDesired {
                    version: document.version,
                    content_sha256: content,
                    expires: document.expires,
                    signed: postcard::to_stdvec(&signed).expect("documents encode"),
                };
                db::put_desired(&tx, &agent_id, &issued)?;
                tx.commit()?;
                Ok(signed)
            })
            .await
    }

    /// Sends each connected agent of `group` (all agents if `None`) its current document,
    /// if it is newer than the last one sent.
    pub async fn push_desired(&self, group: Option<&str>, now: SystemTime) -> Result<(), DbError> {
        let agents: Vec<String> = match group {
            Some(group) => {
                let group = group.to_owned();
                self.db.run(move |sql| db::group_agents(&sql, &group)).await?
            }
            None => self
                .sessions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .keys()
                .cloned()
                .collect(),
        };
        // One document at a time on SQLite, whose one connection serialises them anyway;
        // a few at once on PostgreSQL, where each is several round trips.
        let at_once = match self.db.backend() {
            crate::sql::Backend::Sqlite => 1,
            crate::sql::Backend::Postgres => ISSUERS,
        };
        let mut issued = futures_util::stream::iter(agents)
            .map(|agent| async move {
                let connected = self
                    .sessions
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .contains_key(&agent);
                if connected {
                    let signed = self.desired_for(&agent, now).await?;
                    self.send_if_newer(&agent, signed);
                }
                Ok::<_, DbError>(())
            })
            .buffer_unordered(at_once);
        while let Some(done) = issued.next().await {
            done?;
        }
        Ok(())
    }

    /// Queues `signed` on `agent`'s session if it is newer than what that session got.
    pub fn send_if_newer(&self, agent: &str, signed: SignedDesired) {
        let version =
            serde_json::from_slice::<DesiredState>(&signed.document).map(|d| d.version).ok();
        let mut sessions = self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(session) = sessions.get_mut(agent)
            && version.is_some()
            && version > session.sent_version
            && self.keyring.load().signed_now(&signed.document, &signed.signatures)
        {
            if session.tx.try_send(ControlMessage::Desired(signed)).is_ok() {
                session.sent_version = version;
            } else {
                tracing::warn!(
                    agent,
                    "session queue full; the document follows at the next refresh"
                );
            }
        }
    }

    /// Notes a report (written to the database in batches).
    pub fn saw(&self, agent: &str, now: SystemTime, state: Option<ActualState>) {
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = seen.entry(agent.to_owned()).or_insert((Timestamp::from_system(now), None));
        entry.0 = Timestamp::from_system(now);
        if state.is_some() {
            entry.1 = state;
        }
    }

    /// Writes pending reports to the database.
    pub async fn flush_seen(&self) -> Result<(), DbError> {
        let pending: Vec<_> = {
            let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            seen.drain().map(|(id, (at, state))| (id, at, state)).collect()
        };
        if pending.is_empty() {
            return Ok(());
        }
        self.db.run(move |mut sql| db::record_seen(&mut sql, &pending)).await
    }

    /// Whether `agent` has a live session.
    pub fn connected(&self, agent: &str) -> bool {
        self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(agent)
    }

    /// Closes `agent`'s live session, if any.
    pub fn disconnect(&self, agent: &str, code: u32, reason: &str) {
        let session =
            self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(agent);
        if let Some(session) = session {
            session.connection.close(code.into(), reason.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_enrollment_gate_caps_each_address_and_the_total() {
        let limits =
            EnrollmentLimits { max_total: 3, max_per_address: 2, deadline: Duration::from_secs(1) };
        let gate = EnrollmentGate::new(limits);
        let (a, b, c): (IpAddr, IpAddr, IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        let a1 = gate.enter(a).unwrap();
        let _a2 = gate.enter(a).unwrap();
        assert!(gate.enter(a).is_none(), "a third from one address");
        // The same address written as IPv4-mapped IPv6 counts as the same address.
        assert!(gate.enter("::ffff:10.0.0.1".parse().unwrap()).is_none());
        let _b1 = gate.enter(b).unwrap();
        assert!(gate.enter(c).is_none(), "a fourth in all");
        drop(a1);
        assert_eq!(gate.places.open(), 2);
        let _c1 = gate.enter(c).unwrap();
        assert_eq!(gate.places.refused.load(Ordering::Relaxed), 3);
    }
}
