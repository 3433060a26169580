//! The agent's side of the control plane connection: the driver of
//! [`falaj_common::session::Session`]. The machine decides (when to connect and back off,
//! which document is accepted and applied, when to report, send windows and audit lines,
//! renew the certificate, start a fine-tune job); this driver performs: it dials, reads
//! and writes frames, reads and writes the store, installs bundles and runs jobs, and
//! feeds each outcome back as an event. One loop owns the machine, so nothing here is
//! shared behind a lock but the store. On any failure the agent keeps serving what is
//! installed and retries with exponential backoff and jitter, moving on to the next of
//! the control plane's addresses (its replicas, or the records of its name).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use falaj_common::protocol::io::{read_frame, write_frame};
use falaj_common::protocol::{ActualState, AgentMessage, ControlMessage, SERVER_NAME};
use falaj_common::session::{self, Restored, Session, Validity};
use falaj_common::time::Timestamp;
use falaj_gpu::GpuOptions;
use thiserror::Error;
use tokio::sync::{Notify, watch};

use crate::identity::IdentityFiles;
use crate::metrics::AgentStats;
use crate::models::{Registry, VersionState};
use crate::reporting::{ReportConfig, Reporter};
use crate::store::{Identity, Store, StoreError};
use crate::transfer::Fetcher;

mod apply;
mod driver;

/// How the agent talks to its control plane.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// How often to report (a heartbeat).
    pub heartbeat: Duration,
    /// The longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// Chunk fetch streams run at once.
    pub parallel_fetches: usize,
    /// Metric windows and their outbox; `None` when measuring is off.
    pub report: Option<ReportConfig>,
    /// The only directory ordered fine-tune jobs may read data from; `None`:
    /// `DATA_DIR/site-data`.
    pub site_data: Option<PathBuf>,
}

impl Default for SyncConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(10),
            max_backoff: Duration::from_secs(60),
            parallel_fetches: 8,
            report: Some(ReportConfig::default()),
            site_data: None,
        }
    }
}

/// Why a session ended.
#[derive(Debug, Error)]
pub enum SyncError {
    /// The connection could not be made or was lost.
    #[error("{0}")]
    Connection(String),
    /// The control plane closed the connection on purpose.
    #[error("the control plane closed the connection: {0}")]
    Closed(String),
    /// Local state failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The long-lived state of the agent's side of the connection.
#[derive(Debug)]
pub struct Syncer {
    data_dir: PathBuf,
    store: Arc<Mutex<Store>>,
    identity: Identity,
    files: IdentityFiles,
    reload: Arc<Notify>,
    config: SyncConfig,
    registry: Option<Arc<Registry>>,
    stats: Arc<AgentStats>,
    reporter: Option<Arc<Reporter>>,
}

/// The site data directory inside the data directory, when none is configured.
pub const SITE_DATA: &str = "site-data";

/// A session opened by [`Syncer::open_fetcher`].
#[derive(Debug)]
pub struct OpenSession {
    /// Fetches over the session's connection.
    pub fetcher: Fetcher,
    /// The control plane's first message (its desired-state document).
    pub first: ControlMessage,
    _send: quinn::SendStream,
    _recv: quinn::RecvStream,
}

/// What the machine knows that reports carry.
#[derive(Debug, Clone, Default)]
struct Known {
    applied: Option<u64>,
    errors: Vec<String>,
    jobs: Vec<String>,
}

impl Known {
    fn of(machine: &Session) -> Self {
        Self {
            applied: machine.applied(),
            errors: machine.errors().cloned().collect(),
            jobs: machine.jobs().to_vec(),
        }
    }
}

type Opened = Box<(quinn::Connection, quinn::SendStream, quinn::RecvStream, ControlMessage)>;

impl Syncer {
    /// A syncer for the enrolled agent in `data_dir`; `reload` is notified whenever the
    /// installed bundles change. `None` if the agent is not enrolled.
    pub fn open(
        data_dir: PathBuf,
        reload: Arc<Notify>,
        config: SyncConfig,
    ) -> Result<Option<Self>, StoreError> {
        let store = Store::open(&data_dir)?;
        let Some(identity) = store.identity()? else { return Ok(None) };
        Ok(Some(Self {
            files: IdentityFiles::new(&data_dir),
            data_dir,
            store: Arc::new(Mutex::new(store)),
            identity,
            reload,
            config,
            registry: None,
            stats: Arc::default(),
            reporter: None,
        }))
    }

    /// Reports the health of the models `registry` serves, keeps `stats` (shown on the
    /// server's `/metrics`) and, unless measuring is off, delivers their metric windows.
    #[must_use]
    pub fn with_server(mut self, registry: Arc<Registry>, stats: Arc<AgentStats>) -> Self {
        self.reporter = self.config.report.map(|config| {
            Arc::new(Reporter::new(
                Arc::clone(&self.store),
                Arc::clone(&registry),
                Arc::clone(&stats),
                config,
            ))
        });
        self.registry = Some(registry);
        self.stats = stats;
        self
    }

    /// What closes and delivers metric windows, when measuring is on.
    pub fn reporter(&self) -> Option<&Arc<Reporter>> {
        self.reporter.as_ref()
    }

    /// The enrolled identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Where ordered fine-tune jobs may read their data.
    pub fn site_data(&self) -> PathBuf {
        self.config.site_data.clone().unwrap_or_else(|| self.data_dir.join(SITE_DATA))
    }

    fn gpu_options(&self) -> GpuOptions {
        self.registry.as_ref().map(|r| r.engines().gpu_options()).unwrap_or_default()
    }

    async fn with_store<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || {
            f(&mut store.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
        })
        .await
        .map_err(|e| StoreError::Region(format!("store task failed: {e}")))?
    }

    async fn actual_state(&self, known: &Known) -> ActualState {
        let mut bundles = self.with_store(|s| s.held()).await.unwrap_or_default();
        let trust_version = self.with_store(|s| s.trust_version()).await.unwrap_or(0);
        let mut engines = Vec::new();
        if let Some(registry) = &self.registry {
            let catalog = registry.catalog();
            for held in &mut bundles {
                if let Some(VersionState::Ready(loaded)) =
                    catalog.models.get(&held.name).and_then(|m| m.versions.get(&held.version))
                {
                    held.engine = Some(loaded.engine.name().into());
                }
            }
            let registry = Arc::clone(registry);
            engines = tokio::task::spawn_blocking(move || registry.engines().available())
                .await
                .unwrap_or_default();
        }
        let ids = known.jobs.clone();
        let jobs = self.with_store(move |s| s.job_reports(&ids)).await.unwrap_or_default();
        let mut errors = known.errors.clone();
        if let Some(registry) = &self.registry {
            errors.extend(registry.catalog().load_failures());
        }
        ActualState {
            desired_version: known.applied,
            bundles,
            errors,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            ready: self.registry.as_ref().is_some_and(|r| r.catalog().ready()),
            jobs,
            rollouts: self.registry.as_ref().map_or_else(Vec::new, |r| {
                let now = Timestamp::from_system(SystemTime::now());
                r.catalog().rollouts.values().map(|live| live.report(now)).collect()
            }),
            engines,
            trust_version,
        }
    }

    /// Runs until `shutdown` turns true: sessions, and backoff between them, fine-tune
    /// jobs, and the closing of metric windows, whose last one is closed on the way out.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let windows = self.reporter.clone().map(|r| tokio::spawn(r.run(shutdown.clone())));
        Arc::clone(&self).drive(shutdown).await;
        if let Some(windows) = windows {
            let _ = windows.await;
        }
    }

    /// What the machine starts from: the accepted document and the certificate. The
    /// store is read until it answers (or shutdown): without the accepted version, a
    /// replayed document could not be told from a new one.
    async fn restored(&self, shutdown: &mut watch::Receiver<bool>) -> Option<Restored> {
        let addresses = resolve_all(&self.identity.control_planes()).await;
        loop {
            let read = self
                .with_store(|s| {
                    let accepted = match (s.accepted_desired()?, s.accepted_document()?) {
                        (Some(version), Some(document)) => Some((version, document)),
                        _ => None,
                    };
                    Ok((accepted, s.region().to_owned()))
                })
                .await;
            match read {
                Ok((accepted, region)) => {
                    return Some(Restored {
                        agent: self.identity.agent_id.clone(),
                        region,
                        accepted,
                        certificate: self.validity(),
                        addresses,
                        seed: Timestamp::from_system(SystemTime::now()).unix()
                            ^ u64::from(std::process::id()),
                    });
                }
                Err(e) => tracing::error!(error = %e, "reading the accepted desired state"),
            }
            tokio::select! {
                () = tokio::time::sleep(self.config.max_backoff) => {}
                _ = shutdown.wait_for(|s| *s) => return None,
            }
        }
    }

    fn validity(&self) -> Option<Validity> {
        let (not_before, not_after) = self.files.validity().ok()?;
        Some(Validity { not_before, not_after })
    }

    /// A QUIC connection to `address` within `timeout`. Whatever the address, the server
    /// must prove the name [`SERVER_NAME`] with a chain to the pinned CA: the region's
    /// CA, which issues every replica's certificate for that name.
    async fn connect(
        &self,
        address: &str,
        timeout: Duration,
    ) -> Result<quinn::Connection, SyncError> {
        let conn_err = |e: &dyn std::fmt::Display| SyncError::Connection(format!("{address}: {e}"));
        let remote: SocketAddr = tokio::net::lookup_host(address)
            .await
            .map_err(|e| conn_err(&e))?
            .next()
            .ok_or_else(|| SyncError::Connection(format!("{address} does not resolve")))?;
        let config = self.files.session_config().map_err(|e| conn_err(&e))?;
        let endpoint = crate::enroll::client_endpoint(remote).map_err(|e| conn_err(&e))?;
        let connecting =
            endpoint.connect_with(config, remote, SERVER_NAME).map_err(|e| conn_err(&e))?;
        tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| SyncError::Connection(format!("connecting to {address} timed out")))?
            .map_err(|e| conn_err(&e))
    }

    /// Connects to `address`, says hello and waits for the control plane's first message:
    /// the session is up only then, since with TLS 1.3 a refused client certificate shows
    /// no earlier.
    async fn open_session(
        &self,
        known: &Known,
        address: &str,
        timeout: Duration,
    ) -> Result<Opened, SyncError> {
        let conn = self.connect(address, timeout).await?;
        // A refused peer shows as a lost stream; the close reason says why.
        let failed = |e: &dyn std::fmt::Display| {
            conn.close_reason().map_or_else(
                || SyncError::Connection(e.to_string()),
                |r| SyncError::Closed(r.to_string()),
            )
        };
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(&e))?;
        write_frame(&mut send, &AgentMessage::Hello(self.actual_state(known).await))
            .await
            .map_err(|e| failed(&e))?;
        let first =
            tokio::time::timeout(Duration::from_secs(15), read_frame::<ControlMessage>(&mut recv))
                .await;
        match first {
            Ok(Ok(Some(message))) => Ok(Box::new((conn, send, recv, message))),
            Ok(Err(e)) => Err(failed(&e)),
            Ok(Ok(None)) | Err(_) => Err(failed(&"no answer from the control plane")),
        }
    }

    /// A session on the first of the control plane's addresses that opens one, in the
    /// enrolled order; the last failure if none does.
    async fn open_any(&self) -> Result<Opened, SyncError> {
        let addresses = resolve_all(&self.identity.control_planes()).await;
        let defaults = session::Config::default();
        let timeout =
            if addresses.len() > 1 { defaults.failover_timeout } else { defaults.connect_timeout };
        let mut failed = SyncError::Connection("no control-plane address".into());
        for address in &addresses {
            match self.open_session(&Known::default(), address, timeout).await {
                Ok(opened) => return Ok(opened),
                Err(e) => failed = e,
            }
        }
        Err(failed)
    }

    /// Opens a session and hands back a [`Fetcher`] on it, for tools that drive transfers
    /// themselves (the fan-out benchmark). The session stays open while the value lives.
    pub async fn open_fetcher(&self) -> Result<OpenSession, SyncError> {
        let (connection, send, recv, first) = *self.open_any().await?;
        let fetcher = self.fetcher(connection);
        Ok(OpenSession { fetcher, first, _send: send, _recv: recv })
    }

    /// Checks that a session with the control plane can be opened (and closes it).
    pub async fn probe(&self) -> Result<(), SyncError> {
        let (conn, ..) = *self.open_any().await?;
        conn.close(0u32.into(), b"probe");
        Ok(())
    }

    fn fetcher(&self, connection: quinn::Connection) -> Fetcher {
        Fetcher {
            connection,
            store: Arc::clone(&self.store),
            data_dir: self.data_dir.clone(),
            parallel: self.config.parallel_fetches,
        }
    }
}

/// `error`, with this agent's own time added when it says a certificate is not valid yet
/// or has expired: the control plane's certificate looks so mostly to an agent whose clock
/// is days off, and the operator reading the log should see which clock that is.
fn with_clock(error: &str, now: SystemTime) -> String {
    if error.contains("not valid yet") || error.contains("certificate expired") {
        format!(
            "{error} (this agent's clock reads {}: if it is wrong, set it right)",
            Timestamp::from_system(now)
        )
    } else {
        error.to_owned()
    }
}

/// How long resolving one name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// `entries` with each name replaced by every address it resolves to (so a name with
/// several records counts as several replicas), in order, each once. A name that does not
/// resolve now stays as it is: dialling it resolves it again, or fails and says why.
pub(crate) async fn resolve_all(entries: &[String]) -> Vec<String> {
    let mut addresses: Vec<String> = Vec::new();
    for entry in entries {
        let resolved: Vec<String> = if entry.parse::<SocketAddr>().is_ok() {
            vec![entry.clone()]
        } else {
            match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(entry)).await {
                Ok(Ok(found)) => found.map(|a| a.to_string()).collect(),
                Ok(Err(e)) => {
                    tracing::warn!(control_plane = %entry, error = %e, "resolving a control-plane address");
                    Vec::new()
                }
                Err(_) => {
                    tracing::warn!(control_plane = %entry, "resolving a control-plane address timed out");
                    Vec::new()
                }
            }
        };
        let resolved = if resolved.is_empty() { vec![entry.clone()] } else { resolved };
        for address in resolved {
            if !addresses.contains(&address) {
                addresses.push(address);
            }
        }
    }
    addresses
}

/// Whether any of `entries` is a name (not an address), so resolving again may change
/// the list.
fn has_names(entries: &[String]) -> bool {
    entries.iter().any(|e| e.parse::<SocketAddr>().is_err())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(control_plane: &str) -> Identity {
        Identity { agent_id: "a".into(), group: "g".into(), control_plane: control_plane.into() }
    }

    #[test]
    fn a_stored_address_is_a_list_of_one_and_a_stored_list_is_read_in_order() {
        // What an agent enrolled before lists were stored holds.
        assert_eq!(identity("10.0.0.1:7443").control_planes(), ["10.0.0.1:7443"]);
        assert_eq!(
            identity("cp-a.example:7443,cp-b.example:7443").control_planes(),
            ["cp-a.example:7443", "cp-b.example:7443"]
        );
        // Not a list: handed on as it is, so that dialling it says what is wrong.
        assert_eq!(identity("nonsense").control_planes(), ["nonsense"]);
    }

    #[tokio::test]
    async fn names_resolve_to_each_of_their_addresses_and_addresses_stay() {
        let entries = vec!["127.0.0.1:7443".to_owned(), "localhost:7444".to_owned()];
        let resolved = resolve_all(&entries).await;
        assert_eq!(resolved[0], "127.0.0.1:7443");
        let rest = &resolved[1..];
        assert!(!rest.is_empty(), "{resolved:?}");
        for address in rest {
            let address: SocketAddr = address.parse().unwrap();
            assert!(address.ip().is_loopback() && address.port() == 7444, "{resolved:?}");
        }
        assert!(has_names(&entries));
        assert!(!has_names(&entries[..1]));
        // An address listed twice is dialled once.
        let twice = vec!["127.0.0.1:1".to_owned(), "127.0.0.1:1".to_owned()];
        assert_eq!(resolve_all(&twice).await, ["127.0.0.1:1"]);
    }
}
