//! `falaj-control serve`: the control plane daemon. One QUIC endpoint for agents, one HTTP
//! listener for the admin API, and the periodic tasks (report batching, document refresh,
//! alert rules, rollout judgement), all stopped together by the shutdown future.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use falaj_common::time::Timestamp;
use falaj_common::trust::TrustRoot;
use thiserror::Error;
use tokio::net::TcpListener;

use crate::alerts::AlertsConfig;
use crate::blobs::{BlobStore, FsBlobStore};
use crate::ca::{Ca, CaError};
use crate::db::{self, Db, DbError};
use crate::features::{self as feature_store, FeatureStore};
use crate::keyring::Keyring;
use crate::keys::{self, KeysError};
use crate::lease::Lease;
use crate::rollouts::RolloutsConfig;
use crate::state::{Policy, Shared};
use crate::vault::Vault;
use crate::{admin, files, monitoring, quic};
use falaj_shell::http::{self as http_serve, HttpLimits};
use falaj_shell::tls::{ReloadableTls, TlsFiles};

/// The admin token's file name in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The data directory (state, keys, blobs, admin token).
    pub data_dir: PathBuf,
    /// UDP address for agents (QUIC).
    pub quic: SocketAddr,
    /// TCP address for the admin API.
    pub admin: SocketAddr,
    /// The admin API's header deadline, connection cap and shutdown grace.
    pub admin_http: HttpLimits,
    /// Longest an upload to the admin API may pause (408 after it).
    pub admin_body_timeout: Duration,
    /// Also serve the admin API (and console) over HTTPS on this address with these files.
    pub admin_tls: Option<(SocketAddr, TlsFiles)>,
    /// The region, needed on first start to create keys.
    pub region: Option<String>,
    /// Extra names for the TLS certificate (besides the fixed one agents verify).
    pub server_names: Vec<String>,
    /// Lifetime of the QUIC server certificate; it is renewed with half of it left.
    pub server_cert_lifetime: Duration,
    /// Timings.
    pub policy: Policy,
    /// Largest bundle accepted by push.
    pub max_bundle_bytes: u64,
    /// How long metric windows are kept.
    pub metrics_retention: Duration,
    /// Alert rules and where alerts go (rollbacks go to the same webhooks).
    pub alerts: AlertsConfig,
    /// How rollouts are judged.
    pub rollouts: RolloutsConfig,
    /// When the audit log's checkpoints are signed.
    pub audit: crate::audit::AuditConfig,
    /// How users' sessions live and when logins lock out.
    pub auth: crate::auth::AuthConfig,
    /// Where the secret that opens sealed keys comes from (`--unseal-from`); without it,
    /// sealed keys are opened with systemd's `falaj-keys` credential when there is one.
    pub unseal: Option<crate::vault::UnsealFrom>,
    /// PostgreSQL, shared by the region's replicas; `None`: SQLite in `data_dir`.
    pub database: Option<crate::sql::PgOptions>,
    /// Where chunks and recipes are kept; `None`: `data_dir/blobs`.
    pub blobs_dir: Option<PathBuf>,
}

impl ServeConfig {
    /// Defaults for `data_dir`: QUIC on 127.0.0.1:7443, the admin API on 127.0.0.1:7080.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            quic: SocketAddr::from(([127, 0, 0, 1], 7443)),
            admin: SocketAddr::from(([127, 0, 0, 1], 7080)),
            admin_http: HttpLimits { max_connections: 256, ..HttpLimits::default() },
            admin_body_timeout: Duration::from_secs(60),
            admin_tls: None,
            region: None,
            server_names: vec!["localhost".into()],
            server_cert_lifetime: Duration::from_secs(365 * 86_400),
            policy: Policy::default(),
            max_bundle_bytes: falaj_common::bundle::Policy::DEFAULT_MAX_BUNDLE_BYTES,
            metrics_retention: Duration::from_secs(30 * 86_400),
            alerts: AlertsConfig::default(),
            rollouts: RolloutsConfig::default(),
            audit: crate::audit::AuditConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            unseal: None,
            database: None,
            blobs_dir: None,
        }
    }
}

/// Why the daemon could not start or stopped.
#[derive(Debug, Error)]
pub enum ServeError {
    /// A file or socket failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what (a path or an address).
        path: String,
        source: std::io::Error,
    },
    /// Keys are missing or unusable.
    #[error(transparent)]
    Keys(#[from] KeysError),
    /// The CA is unusable.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// Sealed keys could not be opened.
    #[error(transparent)]
    Vault(#[from] crate::vault::VaultError),
    /// The feature store could not be opened.
    #[error(transparent)]
    Features(#[from] feature_store::OpenError),
    /// The configuration is wrong.
    #[error("{0}")]
    Config(String),
}

/// A started control plane: keys loaded, sockets bound.
#[derive(Debug)]
pub struct ControlPlane {
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    admin: TcpListener,
    api: admin::Api,
    quic_addr: SocketAddr,
    admin_addr: SocketAddr,
    admin_http: HttpLimits,
    retention: Duration,
    alerts: AlertsConfig,
    rollouts: RolloutsConfig,
    audit: crate::audit::AuditConfig,
    server_names: Vec<String>,
    server_cert_lifetime: Duration,
    admin_tls: Option<(TcpListener, Arc<ReloadableTls>)>,
}

fn io(op: &'static str, path: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ServeError {
    move |source| ServeError::Io { op, path: path.to_string(), source }
}

/// The region's keys in `keys_dir`, made on the first start (`config.region` is needed
/// then); returns the trust root after checking it against `config`, and warns while
/// root keys are on this host.
fn open_keys(
    config: &ServeConfig,
    keys_dir: &Path,
    now: SystemTime,
) -> Result<TrustRoot, ServeError> {
    if !keys_dir.join(keys::ROOT_FILE).exists() {
        let region = config.region.clone().ok_or_else(|| {
            ServeError::Config(format!(
                "{} holds no keys: pass --region on the first start (or run `falaj-control keys init --dir {}`)",
                config.data_dir.display(),
                keys_dir.display()
            ))
        })?;
        keys::init(keys_dir, &keys::InitOptions::new(&region), now)?;
        tracing::info!(%region, dir = %keys_dir.display(), "created keys and trust root");
    }
    let trust = keys::load_trust(keys_dir, now)?;
    if let Some(region) = config.region.as_ref().filter(|r| *r != trust.region()) {
        return Err(ServeError::Config(format!(
            "--region {region} differs from the keys' region {}",
            trust.region()
        )));
    }
    warn_of_root_keys_here(keys_dir, &trust)?;
    Ok(trust)
}

/// Warns while root keys of `trust` lie in `keys_dir` (at start and after each rotation
/// taken): whoever takes the host could then replace the trust root.
fn warn_of_root_keys_here(keys_dir: &Path, trust: &TrustRoot) -> Result<(), KeysError> {
    if keys::private_key_ids(keys_dir)?
        .iter()
        .any(|short| trust.metadata().roles.root.keyids.iter().any(|id| id.short() == *short))
    {
        tracing::warn!(
            dir = %keys_dir.display(),
            "root keys are on the control plane's host: anyone who takes it can replace the \
             trust root; move them offline (`keys init --offline-root`, `keys rotate-root \
             --root-keys-dir`)"
        );
    }
    Ok(())
}

/// The admin token in `data_dir`, created (random, 0600) if missing.
fn admin_token(data_dir: &Path) -> Result<String, ServeError> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_owned()),
        Ok(_) => {
            return Err(ServeError::Config(format!(
                "{} is empty: remove it to have a new admin token made",
                path.display()
            )));
        }
        // Only a missing token is made anew: one that cannot be read (permissions, a
        // directory in its place) is an error, not a reason to replace the operator's.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("reading", path.display())(e)),
    }
    let token = crate::secrets::random_hex::<32>();
    files::write_atomic(&path, format!("{token}\n").as_bytes(), 0o600)
        .map_err(io("writing", path.display()))?;
    Ok(token)
}

impl ControlPlane {
    /// Loads (or on first start creates) keys and state, and binds both sockets.
    pub async fn start(config: ServeConfig) -> Result<Self, ServeError> {
        let dir = config.blobs_dir.clone().unwrap_or_else(|| config.data_dir.join("blobs"));
        let blobs =
            FsBlobStore::open(&dir).map_err(io("opening the blob store in", dir.display()))?;
        Self::start_with_blobs(config, Arc::new(blobs)).await
    }

    /// [`Self::start`] with a given blob store.
    pub async fn start_with_blobs(
        config: ServeConfig,
        blobs: Arc<dyn BlobStore>,
    ) -> Result<Self, ServeError> {
        let now = SystemTime::now();
        files::create_private_dir(&config.data_dir)
            .map_err(io("creating", config.data_dir.display()))?;
        let keys_dir = config.data_dir.join("keys");
        let trust = open_keys(&config, &keys_dir, now)?;
        let vault = Arc::new(Vault::open_from(&keys_dir, config.unseal.as_ref())?);
        if vault.is_sealed() {
            tracing::info!(dir = %keys_dir.display(), "opened the sealed keys");
        }
        let ca = Ca::load_or_create(&vault, trust.region(), now)?;
        let keyring = Keyring::load(&vault, now)?;
        let region = trust.region().to_owned();
        let (db, features) = open_database(&config, &vault, &region).await?;
        let token = admin_token(&config.data_dir)?;

        let (chain, key) =
            ca.server_identity(&config.server_names, config.server_cert_lifetime, now)?;
        let server_config = quic::server_config(chain, key, ca.cert_der())?;
        let server_cert_expires =
            Timestamp::from_system(now).saturating_add(config.server_cert_lifetime);
        let endpoint = quinn::Endpoint::server(server_config, config.quic)
            .map_err(io("binding QUIC on", config.quic))?;
        let quic_addr = endpoint.local_addr().map_err(io("binding QUIC on", config.quic))?;
        let admin_tls = match &config.admin_tls {
            Some((listen, files)) => {
                let tls = ReloadableTls::load(files.clone())
                    .map_err(|e| ServeError::Config(e.to_string()))?;
                let listener = TcpListener::bind(listen)
                    .await
                    .map_err(io("binding the admin API (HTTPS) on", listen))?;
                Some((listener, Arc::new(tls)))
            }
            None => None,
        };
        let admin = TcpListener::bind(config.admin)
            .await
            .map_err(io("binding the admin API on", config.admin))?;
        let admin_addr =
            admin.local_addr().map_err(io("binding the admin API on", config.admin))?;

        let audit_key = crate::audit::key::load_or_create(&vault)?;
        let shared = Arc::new(Shared::new(
            db,
            blobs,
            ca,
            (keyring, Arc::clone(&vault)),
            audit_key,
            config.policy.clone(),
        ));
        shared.server_cert_expires.store(server_cert_expires.unix(), Ordering::Relaxed);
        let api = admin::Api {
            shared: Arc::clone(&shared),
            token: Arc::new(token),
            auth: config.auth,
            staging: Arc::new(config.data_dir.join("staging")),
            max_bundle_bytes: config.max_bundle_bytes,
            body_timeout: config.admin_body_timeout,
            features,
            console: Arc::new(crate::console::Site {
                quic: quic_addr,
                alert_rules: config.alerts.rules.clone(),
            }),
        };
        Ok(Self {
            shared,
            endpoint,
            admin,
            api,
            quic_addr,
            admin_addr,
            admin_http: config.admin_http,
            retention: config.metrics_retention,
            alerts: config.alerts,
            rollouts: config.rollouts,
            audit: config.audit,
            server_names: config.server_names,
            server_cert_lifetime: config.server_cert_lifetime,
            admin_tls,
        })
    }

    /// Where the admin API serves HTTPS, if it does.
    pub fn admin_tls_addr(&self) -> Option<SocketAddr> {
        self.admin_tls.as_ref().and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// Where agents connect (UDP).
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// Where the admin API listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The state the daemon's tasks share (for tests that look inside or inject faults).
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// The admin API's bearer token.
    pub fn admin_token(&self) -> &str {
        &self.api.token
    }

    /// The admin API's state (for tests that build routers of their own).
    #[cfg(test)]
    pub(crate) fn api(&self) -> admin::Api {
        self.api.clone()
    }

    /// The CA certificate's SHA-256, as tokens carry it.
    pub fn ca_fingerprint(&self) -> falaj_common::keys::Sha256 {
        self.shared.ca.fingerprint()
    }

    /// Runs until `shutdown` completes, then closes every connection and stops.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let Self {
            shared,
            endpoint,
            admin,
            api,
            quic_addr,
            admin_addr,
            admin_http,
            retention,
            alerts,
            rollouts,
            audit,
            server_names,
            server_cert_lifetime,
            admin_tls,
        } = self;
        tracing::info!(%quic_addr, %admin_addr, region = %shared.region, "control plane serving");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let accept = tokio::spawn(quic::accept_loop(Arc::clone(&shared), endpoint.clone()));
        let periodic = tokio::spawn(periodic(Arc::clone(&shared), stop_rx.clone()));
        let windows = tokio::spawn({
            let (shared, stop) = (Arc::clone(&shared), stop_rx.clone());
            async move { shared.windows.run(shared.db.clone(), stop).await }
        });
        let region = region_work(&shared, &stop_rx, retention, alerts, rollouts, audit);
        let certificates = tokio::spawn(certificates(
            Arc::clone(&shared),
            endpoint.clone(),
            server_names,
            server_cert_lifetime,
            stop_rx.clone(),
        ));
        let mut admin_stop = stop_rx.clone();
        let admin_stop_tls = stop_rx.clone();
        let reloads = tokio::spawn(reload_on_hangup(
            Arc::clone(&shared),
            admin_tls.as_ref().map(|(_, tls)| Arc::clone(tls)),
        ));
        let admin_server = tokio::spawn(async move {
            // Requests carry the peer's address (`ConnectInfo`) for the gate: audit entries
            // and login lockouts.
            let stop = async move {
                let _ = admin_stop.wait_for(|stop| *stop).await;
            };
            let router = admin::router(api);
            let plain = http_serve::serve(admin, router.clone(), admin_http, stop);
            match admin_tls {
                Some((listener, tls)) => {
                    let mut tls_stop = admin_stop_tls;
                    let stop = async move {
                        let _ = tls_stop.wait_for(|stop| *stop).await;
                    };
                    let secure = http_serve::serve_tls(listener, router, admin_http, tls, stop);
                    tokio::join!(plain, secure);
                }
                None => plain.await,
            }
        });
        shutdown.await;
        tracing::info!("control plane shutting down");
        let _ = stop_tx.send(true);
        endpoint.close(quic::CLOSE_SHUTDOWN.into(), b"control plane shutting down");
        shared.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        let _ = accept.await;
        let _ = periodic.await;
        let _ = windows.await;
        for task in region {
            let _ = task.await;
        }
        let _ = certificates.await;
        reloads.abort();
        admin_server.await.map_err(|e| ServeError::Config(format!("admin task: {e}")))?;
        shared.flush_seen().await?;
        let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
        tracing::info!("control plane stopped");
        Ok(())
    }
}

/// On each SIGHUP (`systemctl reload`): takes a key rotation made in the keys directory
/// ([`Shared::reload_keys`]), and reads the admin API's TLS files again (a renewed
/// certificate). What does not load is logged and the keys or files in force stay.
async fn reload_on_hangup(shared: Arc<Shared>, tls: Option<Arc<ReloadableTls>>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else { return };
        while hangups.recv().await.is_some() {
            match shared.reload_keys(SystemTime::now()).await {
                Ok(Some(version)) => {
                    tracing::info!(version, "took trust root version {version}");
                    let keyring = shared.keyring();
                    let _ = warn_of_root_keys_here(shared.vault().dir(), &keyring.trust);
                }
                Ok(None) => tracing::info!(
                    version = shared.keyring().trust.version(),
                    "SIGHUP: the trust root in force is the newest"
                ),
                Err(err) => tracing::error!(
                    error = %err,
                    "the keys directory's trust root is refused; the keys in force stay"
                ),
            }
            let Some(tls) = &tls else {
                tracing::info!("SIGHUP: no TLS certificate to reload");
                continue;
            };
            let certificate = tls.files().certificate.display();
            match tls.reload() {
                Ok(()) => tracing::info!(%certificate, "reloaded the admin API's TLS certificate"),
                Err(err) => tracing::error!(
                    error = %err,
                    "TLS reload failed; the certificate in use stays"
                ),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (shared, tls);
}

/// Renews the QUIC server certificate in place when half its lifetime has passed, and
/// warns in the log as the trust root, the CA and the server certificate come within 90,
/// 30 and 7 days of expiry (once per band), until told to stop.
async fn certificates(
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    names: Vec<String>,
    lifetime: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(
        (lifetime / 10).clamp(Duration::from_millis(100), Duration::from_secs(3600)),
    );
    let mut warned: HashMap<&'static str, u64> = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let now = SystemTime::now();
        let at = Timestamp::from_system(now);
        let server = Timestamp::from_unix(shared.server_cert_expires.load(Ordering::Relaxed));
        if server.unix().saturating_sub(at.unix()) < lifetime.as_secs() / 2 {
            let renewed = shared
                .ca
                .server_identity(&names, lifetime, now)
                .and_then(|(chain, key)| quic::server_config(chain, key, shared.ca.cert_der()));
            match renewed {
                Ok(config) => {
                    endpoint.set_server_config(Some(config));
                    let expires = at.saturating_add(lifetime);
                    shared.server_cert_expires.store(expires.unix(), Ordering::Relaxed);
                    tracing::info!(%expires, "renewed the control plane's TLS certificate");
                }
                Err(err) => tracing::error!(error = %err, "renewing the TLS certificate failed"),
            }
        }
        let server = Timestamp::from_unix(shared.server_cert_expires.load(Ordering::Relaxed));
        for (what, expires) in [
            ("trust root", shared.keyring().trust.expires()),
            ("CA certificate", shared.ca.expires()),
            ("TLS server certificate", server),
        ] {
            let band = falaj_common::time::expiry_warning(at, expires);
            if let Some(days) = band.filter(|d| warned.get(what) != Some(d)) {
                tracing::warn!(what, %expires, days, "{what} expires within {days} days");
            }
            match band {
                Some(days) => warned.insert(what, days),
                None => warned.remove(what),
            };
        }
    }
}

/// How often a replica on PostgreSQL looks for events other replicas recorded (one indexed
/// read of the newest event's number).
const EVENT_POLL: Duration = Duration::from_secs(1);

/// Writes batched reports, refreshes documents nearing expiry and deletes metric windows
/// past `retention`, until told to stop.
async fn periodic(shared: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut flush = tokio::time::interval(shared.policy.heartbeat.max(Duration::from_millis(100)));
    let mut refresh =
        tokio::time::interval((shared.policy.desired_ttl / 8).max(Duration::from_millis(100)));
    // On PostgreSQL, the newest event this replica has seen: when another replica records
    // newer ones (a deployment, a rollout's step...), this one's agents get their
    // documents again within `EVENT_POLL`. Its own it skips: it sent those when it made
    // each change.
    let replicas = shared.db.backend() == crate::sql::Backend::Postgres;
    let mut events = tokio::time::interval(EVENT_POLL);
    let mut poll = crate::event_poll::EventPoll::default();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = flush.tick() => {
                if let Err(err) = shared.flush_seen().await {
                    tracing::error!(error = %err, "writing agent reports failed");
                }
            }
            _ = events.tick(), if replicas => {
                let found = poll.poll(&shared.db, std::time::Instant::now()).await;
                match found {
                    Ok(found) => {
                        if found.others > 0 {
                            shared.event_pushes.fetch_add(1, Ordering::Relaxed);
                        }
                        shared.events_seen.send_replace(found.latest.max(0) as u64);
                        if found.others > 0
                            && let Err(err) = shared.push_desired(None, SystemTime::now()).await
                        {
                            tracing::error!(error = %err, "sending changed desired state failed");
                        }
                    }
                    Err(err) => tracing::error!(error = %err, "reading the latest events failed"),
                }
            }
            _ = refresh.tick() => {
                if let Err(err) = shared.push_desired(None, SystemTime::now()).await {
                    tracing::error!(error = %err, "refreshing desired state failed");
                }
            }
        }
    }
}

/// Deletes metric windows past `retention` every ten minutes, until told to stop: the
/// region's work, run by the lease's holder.
async fn prune_windows(
    shared: Arc<Shared>,
    retention: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut prune = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = prune.tick() => {}
        }
        let before = Timestamp::from_system(
            SystemTime::now().checked_sub(retention).unwrap_or(SystemTime::UNIX_EPOCH),
        );
        match shared.db.run(move |sql| monitoring::prune(&sql, before)).await {
            Ok(0) => {}
            Ok(deleted) => {
                tracing::info!(deleted, %before, "deleted metric windows past retention");
            }
            Err(err) => tracing::error!(error = %err, "deleting old metric windows failed"),
        }
    }
}

/// Opens the control plane's database (SQLite in the data directory, or PostgreSQL) and
/// the feature store in it, and checks it belongs to the keys' region (recording the
/// region on the first start).
async fn open_database(
    config: &ServeConfig,
    vault: &Arc<Vault>,
    region: &str,
) -> Result<(Db, FeatureStore), ServeError> {
    let (db, features) = match &config.database {
        None => {
            let db = Db::open(&config.data_dir.join(db::DB_FILE))?;
            let features = FeatureStore::open(&config.data_dir, Arc::clone(vault), region)?;
            (db, features)
        }
        // The synchronous PostgreSQL client (and the migrations) run off the runtime.
        Some(options) => {
            let (options, dir, vault, region) =
                (options.clone(), config.data_dir.clone(), Arc::clone(vault), region.to_owned());
            tokio::task::spawn_blocking(move || -> Result<_, ServeError> {
                let db = Db::open_postgres(&options)?;
                let features = FeatureStore::open_postgres(db.clone(), &dir, vault, &region)?;
                Ok((db, features))
            })
            .await
            .map_err(|e| ServeError::Config(format!("opening the database: {e}")))??
        }
    };
    let stored = db
        .run({
            let region = region.to_owned();
            move |sql| {
                let tx = sql.transaction()?;
                let stored = db::setting(&*tx, "region")?;
                if stored.is_none() {
                    db::set_setting(&*tx, "region", &region)?;
                }
                tx.commit()?;
                Ok(stored)
            }
        })
        .await?;
    if stored.as_ref().is_some_and(|s| *s != region) {
        return Err(ServeError::Config(format!(
            "the database belongs to region {}, the keys to {region}",
            stored.unwrap_or_default()
        )));
    }
    Ok((db, features))
}

/// Keeps `Shared::region_lease` (`/metrics`) as the lease is taken and lost.
/// Starts the region's work, done by whichever replica holds the lease (always this one
/// on SQLite), each task while it does: pruning windows, judging rollouts, evaluating
/// alerts, sending webhook notifications, audit checkpoints. The tasks end with `stop`.
fn region_work(
    shared: &Arc<Shared>,
    stop: &tokio::sync::watch::Receiver<bool>,
    retention: Duration,
    alerts: AlertsConfig,
    rollouts: RolloutsConfig,
    audit: crate::audit::AuditConfig,
) -> Vec<tokio::task::JoinHandle<()>> {
    let lease = crate::lease::keep(&shared.db, LEASE_CHECK, stop.clone());
    tokio::spawn(show_lease(Arc::clone(shared), lease.watch()));
    let pruning = tokio::spawn(while_leading(lease.clone(), stop.clone(), {
        let shared = Arc::clone(shared);
        move |stop| prune_windows(Arc::clone(&shared), retention, stop)
    }));
    let judging = tokio::spawn(while_leading(lease.clone(), stop.clone(), {
        let (shared, webhooks) = (Arc::clone(shared), alerts.webhooks.clone());
        move |stop| {
            crate::rollouts::run(Arc::clone(&shared), rollouts.clone(), webhooks.clone(), stop)
        }
    }));
    let alerting = tokio::spawn(while_leading(lease.clone(), stop.clone(), {
        let shared = Arc::clone(shared);
        move |stop| crate::alerts::run(Arc::clone(&shared), alerts.clone(), stop)
    }));
    let sending = tokio::spawn(while_leading(lease.clone(), stop.clone(), {
        let shared = Arc::clone(shared);
        move |stop| crate::outbox::run(Arc::clone(&shared), stop)
    }));
    let checkpoints = tokio::spawn(while_leading(lease, stop.clone(), {
        let shared = Arc::clone(shared);
        move |stop| crate::audit::run(Arc::clone(&shared), audit.clone(), stop)
    }));
    vec![pruning, judging, alerting, sending, checkpoints]
}

async fn show_lease(shared: Arc<Shared>, mut held: tokio::sync::watch::Receiver<bool>) {
    loop {
        let now = u64::from(*held.borrow_and_update());
        shared.region_lease.store(now, Ordering::Relaxed);
        if held.changed().await.is_err() {
            shared.region_lease.store(0, Ordering::Relaxed);
            return;
        }
    }
}

/// How often a replica confirms or tries the region's lease ([`crate::lease`]): the time
/// another takes to take over the region's work from a replica that died.
const LEASE_CHECK: Duration = Duration::from_secs(2);

/// Runs the task `start` makes while this replica holds `lease`: started when the lease
/// is taken, told to stop (through the receiver it is given) when the lease is lost or
/// the daemon stops, and started afresh if the lease comes back.
async fn while_leading<F, T>(
    lease: Lease,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut start: F,
) where
    F: FnMut(tokio::sync::watch::Receiver<bool>) -> T,
    T: Future<Output = ()> + Send + 'static,
{
    let mut held = lease.watch();
    loop {
        tokio::select! {
            taken = held.wait_for(|held| *held) => if taken.is_err() { return },
            _ = stop.wait_for(|stop| *stop) => return,
        }
        let (end, ended) = tokio::sync::watch::channel(false);
        let mut task = tokio::spawn(start(ended));
        let finished = tokio::select! {
            _ = held.wait_for(|held| !*held) => false,
            _ = stop.wait_for(|stop| *stop) => false,
            _ = &mut task => true,
        };
        if finished {
            // The task ends on its own only when it has nothing to do (no alert rules).
            return;
        }
        end.send_replace(true);
        let _ = task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_admin_token_that_cannot_be_read_is_an_error_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let made = admin_token(dir.path()).unwrap();
        assert_eq!(admin_token(dir.path()).unwrap(), made, "read back, not replaced");
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let err = admin_token(dir.path()).unwrap_err().to_string();
        assert!(err.contains("admin.token"), "{err}");
        assert!(path.is_dir(), "nothing was written in its place");
        std::fs::remove_dir(&path).unwrap();
        std::fs::write(&path, "\n").unwrap();
        let err = admin_token(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is empty"), "{err}");
    }
}
