//! The agent's side of the control plane connection: dial out, keep one long-lived QUIC
//! session, verify each desired-state document, reconcile, report, renew the certificate,
//! and on any failure keep serving what is installed and retry with exponential backoff
//! and jitter.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use falaj_common::desired::{DesiredState, Expectation, SignedDesired};
use falaj_common::finetune::JobReport;
use falaj_common::protocol::io::{read_frame, write_frame};
use falaj_common::protocol::{ActualState, AgentMessage, ControlMessage, SERVER_NAME};
use falaj_common::random::SeededRng;
use falaj_common::reconcile::{self, Action};
use falaj_common::time::Timestamp;
use falaj_gpu::GpuOptions;
use thiserror::Error;
use tokio::sync::{Notify, mpsc, watch};

use crate::finetune;
use crate::identity::{IdentityFiles, KeyRequest};
use crate::metrics::AgentStats;
use crate::models::{Registry, VersionState};
use crate::reporting::{ReportConfig, Reporter};
use crate::store::{Identity, Store, StoreError};
use crate::transfer::Fetcher;

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
    errors: Mutex<VecDeque<String>>,
    applied: Mutex<Option<u64>>,
    registry: Option<Arc<Registry>>,
    stats: Arc<AgentStats>,
    reporter: Option<Arc<Reporter>>,
    renewing: Mutex<Option<Instant>>,
    /// Wakes the job runner when a document brings jobs.
    jobs_wake: Notify,
    /// The ids of the jobs the applied document orders: what reports cover.
    jobs: Mutex<Vec<String>>,
}

/// The site data directory inside the data directory, when none is configured.
pub const SITE_DATA: &str = "site-data";

/// How long an unacknowledged batch of windows waits before it is sent again.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

const MAX_ERRORS: usize = 8;

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
            errors: Mutex::new(VecDeque::new()),
            applied: Mutex::new(None),
            registry: None,
            stats: Arc::default(),
            reporter: None,
            renewing: Mutex::new(None),
            jobs_wake: Notify::new(),
            jobs: Mutex::new(Vec::new()),
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

    fn note_error(&self, message: String) {
        tracing::warn!(error = %message, "reconciliation problem");
        let mut errors = self.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        errors.push_back(message);
        while errors.len() > MAX_ERRORS {
            errors.pop_front();
        }
        self.stats.reconcile_errors.store(errors.len() as u64, Ordering::Relaxed);
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

    async fn actual_state(&self) -> ActualState {
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
        let ids = self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let jobs = self.with_store(move |s| s.job_reports(&ids)).await.unwrap_or_default();
        ActualState {
            desired_version: *self
                .applied
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            bundles,
            errors: self
                .errors
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .cloned()
                .collect(),
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

    /// Runs until `shutdown` turns true: sessions, and backoff between them, and the
    /// closing of metric windows, whose last one is closed on the way out.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let windows = self.reporter.clone().map(|r| tokio::spawn(r.run(shutdown.clone())));
        let jobs = tokio::spawn(Arc::clone(&self).jobs_loop(shutdown.clone()));
        Arc::clone(&self).sessions(shutdown).await;
        if let Some(windows) = windows {
            let _ = windows.await;
        }
        // A job still training is left to the process's end; the next start marks it
        // interrupted.
        jobs.abort();
    }

    /// Runs the fine-tune jobs documents order, one at a time, each on the blocking pool,
    /// as they arrive; the models they derive are picked up by a reload.
    async fn jobs_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        match self.with_store(|s| s.fail_interrupted_jobs(SystemTime::now())).await {
            Ok(ids) if !ids.is_empty() => {
                tracing::warn!(?ids, "fine-tune jobs interrupted by the last stop are failed");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reading interrupted fine-tune jobs"),
        }
        loop {
            match self.with_store(|s| s.start_next_job(SystemTime::now())).await {
                Ok(Some(job)) => {
                    tracing::info!(job = %job.id, model = %job.job.model, "fine-tune job started");
                    let id = job.id.clone();
                    let (dir, gpu) = (self.data_dir.clone(), self.gpu_options());
                    let site = self.site_data();
                    let ran = tokio::task::spawn_blocking(move || {
                        finetune::run_ordered(&dir, &site, &job, gpu)
                    })
                    .await;
                    let report = ran.unwrap_or_else(|e| {
                        JobReport::failed(&id, format!("the job's task failed: {e}"))
                    });
                    let stored =
                        self.with_store(move |s| s.finish_job(&report, SystemTime::now())).await;
                    if let Err(e) = stored {
                        tracing::warn!(error = %e, "recording a fine-tune job's end");
                    }
                    self.reload.notify_one();
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "reading the next fine-tune job"),
            }
            tokio::select! {
                () = self.jobs_wake.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Where ordered fine-tune jobs may read their data.
    pub fn site_data(&self) -> PathBuf {
        self.config.site_data.clone().unwrap_or_else(|| self.data_dir.join(SITE_DATA))
    }

    fn gpu_options(&self) -> GpuOptions {
        self.registry.as_ref().map(|r| r.engines().gpu_options()).unwrap_or_default()
    }

    async fn sessions(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut rng = SeededRng::new(
            Timestamp::from_system(SystemTime::now()).unix() ^ u64::from(std::process::id()),
        );
        let mut failures = 0u32;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let outcome = tokio::select! {
                outcome = Arc::clone(&self).session(&mut failures) => outcome,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            self.stats.connected.store(false, Ordering::Relaxed);
            match outcome {
                Ok(()) => return,
                Err(err) => {
                    let err = with_clock(&err.to_string(), SystemTime::now());
                    tracing::warn!(control_plane = %self.identity.control_plane, error = %err, "control plane session ended");
                }
            }
            failures = failures.saturating_add(1);
            // Exponential backoff with full jitter: uniform in [0, min(max, 0.5 s * 2^n)].
            let ceiling = Duration::from_millis(500)
                .saturating_mul(1 << failures.min(16))
                .min(self.config.max_backoff);
            let wait = ceiling.mul_f64(rng.uniform());
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    async fn connect(&self) -> Result<quinn::Connection, SyncError> {
        let conn_err = |e: &dyn std::fmt::Display| SyncError::Connection(e.to_string());
        let address = &self.identity.control_plane;
        let remote: SocketAddr = tokio::net::lookup_host(address)
            .await
            .map_err(|e| conn_err(&e))?
            .next()
            .ok_or_else(|| SyncError::Connection(format!("{address} does not resolve")))?;
        let config = self.files.session_config().map_err(|e| conn_err(&e))?;
        let endpoint = crate::enroll::client_endpoint(remote).map_err(|e| conn_err(&e))?;
        let connecting =
            endpoint.connect_with(config, remote, SERVER_NAME).map_err(|e| conn_err(&e))?;
        tokio::time::timeout(Duration::from_secs(15), connecting)
            .await
            .map_err(|_| SyncError::Connection(format!("connecting to {address} timed out")))?
            .map_err(|e| conn_err(&e))
    }

    /// Connects, says hello and waits for the control plane's first message: the session
    /// is up only then, since with TLS 1.3 a refused client certificate shows no earlier.
    async fn open_session(
        &self,
    ) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream, ControlMessage), SyncError>
    {
        let conn = self.connect().await?;
        // A refused peer shows as a lost stream; the close reason says why.
        let failed = |e: &dyn std::fmt::Display| {
            conn.close_reason().map_or_else(
                || SyncError::Connection(e.to_string()),
                |r| SyncError::Closed(r.to_string()),
            )
        };
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(&e))?;
        write_frame(&mut send, &AgentMessage::Hello(self.actual_state().await))
            .await
            .map_err(|e| failed(&e))?;
        let first =
            tokio::time::timeout(Duration::from_secs(15), read_frame::<ControlMessage>(&mut recv))
                .await;
        match first {
            Ok(Ok(Some(message))) => Ok((conn, send, recv, message)),
            Ok(Err(e)) => Err(failed(&e)),
            Ok(Ok(None)) | Err(_) => Err(failed(&"no answer from the control plane")),
        }
    }

    /// Opens a session and hands back a [`Fetcher`] on it, for tools that drive transfers
    /// themselves (the fan-out benchmark). The session stays open while the value lives.
    pub async fn open_fetcher(&self) -> Result<OpenSession, SyncError> {
        let (connection, send, recv, first) = self.open_session().await?;
        let fetcher = Fetcher {
            connection,
            store: Arc::clone(&self.store),
            data_dir: self.data_dir.clone(),
            parallel: self.config.parallel_fetches,
        };
        Ok(OpenSession { fetcher, first, _send: send, _recv: recv })
    }

    /// Checks that a session with the control plane can be opened (and closes it).
    pub async fn probe(&self) -> Result<(), SyncError> {
        let (conn, ..) = self.open_session().await?;
        conn.close(0u32.into(), b"probe");
        Ok(())
    }

    async fn session(self: Arc<Self>, failures: &mut u32) -> Result<(), SyncError> {
        let (conn, mut send, mut recv, first) = self.open_session().await?;
        let conn_err = |e: &dyn std::fmt::Display| SyncError::Connection(e.to_string());
        tracing::info!(control_plane = %self.identity.control_plane, agent = %self.identity.agent_id, "connected to the control plane");
        *failures = 0;

        let (docs_tx, docs_rx) = watch::channel::<Option<(DesiredState, Vec<u8>)>>(None);
        let (report_tx, mut report_rx) = mpsc::channel::<()>(4);
        let fetcher = Fetcher {
            connection: conn.clone(),
            store: Arc::clone(&self.store),
            data_dir: self.data_dir.clone(),
            parallel: self.config.parallel_fetches,
        };
        let reconciler =
            tokio::spawn(Arc::clone(&self).reconcile_loop(fetcher, docs_rx, report_tx));
        self.stats.connected.store(true, Ordering::Relaxed);
        let mut heartbeat = tokio::time::interval(self.config.heartbeat);
        heartbeat.tick().await;
        // The batch of windows sent and not yet acknowledged, and when it was sent.
        let mut in_flight: Option<(Vec<u64>, Instant)> = None;
        if let Some(reporter) = &self.reporter {
            reporter.pending().notify_one();
        }
        // Likewise for the audit chain (sent at each heartbeat while none is in flight):
        // the last entry sent and when.
        let mut audit_in_flight: Option<(u64, Instant)> = None;
        let mut pending_message = Some(first);
        let outcome = loop {
            let message = if let Some(m) = pending_message.take() {
                Some(m)
            } else {
                // In this order: a rollback is reported before the windows that show it,
                // so the control plane hears the agent's verdict first.
                tokio::select! {
                    biased;
                    frame = read_frame::<ControlMessage>(&mut recv) => match frame {
                        Ok(Some(ControlMessage::Ack { seqs })) => {
                            self.acknowledged(&seqs, &mut in_flight).await;
                            None
                        }
                        Ok(Some(ControlMessage::AuditAck { seq })) => {
                            if let Err(e) = self.with_store(move |s| s.audit_shipped(seq)).await {
                                tracing::error!(error = %e, "recording the audit entries shipped failed");
                            }
                            audit_in_flight = match self.send_audit(&mut send).await {
                                Ok(batch) => batch,
                                Err(e) => break Err(e),
                            };
                            None
                        }
                        Ok(Some(m)) => Some(m),
                        Ok(None) => break Err(SyncError::Closed("session stream closed".into())),
                        Err(e) => break Err(conn.close_reason().map_or_else(|| conn_err(&e), |r| SyncError::Closed(r.to_string()))),
                    },
                    () = rolled_back(self.reporter.as_deref()) => {
                        if let Err(e) = write_frame(&mut send, &AgentMessage::Report(self.actual_state().await)).await {
                            break Err(conn_err(&e));
                        }
                        None
                    }
                    () = pending(self.reporter.as_deref()), if in_flight.is_none() => {
                        match self.send_windows(&mut send).await {
                            Ok(batch) => in_flight = batch.map(|seqs| (seqs, Instant::now())),
                            Err(e) => break Err(e),
                        }
                        None
                    }
                    Some(()) = report_rx.recv() => {
                        if let Err(e) = write_frame(&mut send, &AgentMessage::Report(self.actual_state().await)).await {
                            break Err(conn_err(&e));
                        }
                        None
                    }
                    _ = heartbeat.tick() => {
                        if let Err(e) = write_frame(&mut send, &AgentMessage::Report(self.actual_state().await)).await {
                            break Err(conn_err(&e));
                        }
                        if in_flight.as_ref().is_some_and(|(_, at)| at.elapsed() > ACK_TIMEOUT)
                            && let Some(reporter) = &self.reporter
                        {
                            tracing::warn!("metric windows not acknowledged in time: sending them again");
                            in_flight = None;
                            reporter.pending().notify_one();
                        }
                        if audit_in_flight.is_none_or(|(_, at)| at.elapsed() > ACK_TIMEOUT) {
                            audit_in_flight = match self.send_audit(&mut send).await {
                                Ok(batch) => batch,
                                Err(e) => break Err(e),
                            };
                        }
                        if let Some(renew) = self.renewal_request()
                            && let Err(e) = send_renewal(&mut send, &renew).await {
                                break Err(conn_err(&e));
                            }
                        None
                    }
                }
            };
            if let Some(message) = message {
                self.on_message(message, &docs_tx).await;
            }
        };
        reconciler.abort();
        outcome
    }

    /// Sends the oldest windows waiting, if any; returns their sequence numbers.
    async fn send_windows(
        &self,
        send: &mut quinn::SendStream,
    ) -> Result<Option<Vec<u64>>, SyncError> {
        let Some(reporter) = self.reporter.clone() else { return Ok(None) };
        let batch = tokio::task::spawn_blocking(move || reporter.batch())
            .await
            .map_err(|e| StoreError::Region(format!("outbox task failed: {e}")))??;
        if batch.is_empty() {
            return Ok(None);
        }
        let seqs: Vec<u64> = batch.iter().map(|w| w.seq).collect();
        tracing::debug!(windows = seqs.len(), first = seqs[0], "sending metric windows");
        write_frame(send, &AgentMessage::Windows(batch))
            .await
            .map_err(|e| SyncError::Connection(e.to_string()))?;
        crate::crash_point("outbox-sent");
        Ok(Some(seqs))
    }

    /// Sends the audit entries the control plane has not acknowledged, at most one batch;
    /// returns the last one sent and when.
    async fn send_audit(
        &self,
        send: &mut quinn::SendStream,
    ) -> Result<Option<(u64, Instant)>, SyncError> {
        let batch = self
            .with_store(|s| s.audit_unshipped(falaj_common::protocol::MAX_AUDIT_PER_BATCH))
            .await?;
        let Some(&(last, _)) = batch.last() else { return Ok(None) };
        let lines = batch.into_iter().map(|(_, line)| line).collect();
        write_frame(send, &AgentMessage::Audit(lines))
            .await
            .map_err(|e| SyncError::Connection(e.to_string()))?;
        Ok(Some((last, Instant::now())))
    }

    /// The control plane stored these windows: delete them and send the next batch.
    async fn acknowledged(&self, seqs: &[u64], in_flight: &mut Option<(Vec<u64>, Instant)>) {
        let Some(reporter) = self.reporter.clone() else { return };
        if in_flight.as_ref().is_some_and(|(sent, _)| sent.as_slice() == seqs) {
            *in_flight = None;
        }
        let acked = seqs.to_vec();
        crate::crash_point("outbox-acknowledged");
        let deleted = tokio::task::spawn_blocking(move || reporter.acknowledged(&acked)).await;
        match deleted {
            Ok(Ok(())) => crate::crash_point("outbox-removed"),
            Ok(Err(e)) => tracing::error!(error = %e, "deleting acknowledged windows failed"),
            Err(e) => tracing::error!(error = %e, "deleting acknowledged windows failed"),
        }
        if let Some(reporter) = &self.reporter {
            reporter.pending().notify_one();
        }
    }

    /// A renewal request once less than a third of the certificate's lifetime is left.
    /// At most one renewal is outstanding; an unanswered one is retried after a minute.
    fn renewal_request(&self) -> Option<AgentMessage> {
        let (not_before, not_after) = self.files.validity().ok()?;
        let now = Timestamp::from_system(SystemTime::now());
        let lifetime = not_after.unix().saturating_sub(not_before.unix());
        if now.unix().saturating_add(lifetime / 3) < not_after.unix() {
            return None;
        }
        let mut pending = self.renewing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.is_some_and(|at| at.elapsed() < Duration::from_secs(60)) {
            return None;
        }
        *pending = Some(Instant::now());
        drop(pending);
        let request = KeyRequest::generate().ok()?;
        self.files.store_pending(&request).ok()?;
        crate::crash_point("renew-key-written");
        tracing::info!(expires = %not_after, "renewing the agent certificate");
        Some(AgentMessage::Renew { csr_der: request.csr_der })
    }

    async fn on_message(
        &self,
        message: ControlMessage,
        docs: &watch::Sender<Option<(DesiredState, Vec<u8>)>>,
    ) {
        match message {
            ControlMessage::Desired(signed) => match self.verify(signed).await {
                Ok(Some(accepted)) => {
                    tracing::info!(
                        version = accepted.0.version,
                        bundles = accepted.0.bundles.len(),
                        "desired state accepted"
                    );
                    let _ = docs.send(Some(accepted));
                }
                Ok(None) => {}
                Err(reason) => self.note_error(format!("desired state refused: {reason}")),
            },
            ControlMessage::Renewed { certificate_der, expires } => {
                *self.renewing.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
                crate::crash_point("renew-answered");
                match self.files.install_renewed(&certificate_der) {
                    Ok(()) => {
                        crate::crash_point("renew-installed");
                        tracing::info!(%expires, "certificate renewed; used from the next connection");
                    }
                    Err(e) => {
                        self.note_error(format!("installing the renewed certificate failed: {e}"));
                    }
                }
            }
            ControlMessage::Refused(reason) => {
                self.note_error(format!("the control plane refused a request: {reason}"));
            }
            ControlMessage::TrustRoots(roots) => {
                match self.with_store(move |s| s.update_trust(&roots, SystemTime::now())).await {
                    Ok(taken) if taken.is_empty() => {}
                    Ok(taken) => tracing::info!(versions = ?taken, "took new trust root versions"),
                    Err(e) => self.note_error(format!("new trust root refused: {e}")),
                }
            }
            ControlMessage::Ack { .. } | ControlMessage::AuditAck { .. } => {}
        }
    }

    /// Verifies a document against the pinned trust root, this agent, its region and the
    /// last version accepted; records it. `Ok(None)` for a re-send of the accepted version.
    async fn verify(
        &self,
        signed: SignedDesired,
    ) -> Result<Option<(DesiredState, Vec<u8>)>, String> {
        let identity = self.identity.clone();
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || {
            let mut store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let trust = store.trust_root().map_err(|e| e.to_string())?;
            let accepted = store.accepted_desired().map_err(|e| e.to_string())?;
            let expect = Expectation {
                agent: &identity.agent_id,
                region: store.region(),
                accepted,
                now: SystemTime::now(),
            };
            match signed.verify(&trust, &expect) {
                Ok(doc) => {
                    store
                        .accept_desired(doc.version, &signed.document, SystemTime::now())
                        .map_err(|e| e.to_string())?;
                    Ok(Some((doc, signed.document)))
                }
                // The very document accepted last, sent again after a reconnect: applied
                // again (reconciliation is idempotent). Any other document with that
                // version is refused like every stale one.
                Err(falaj_common::desired::DesiredError::Stale { version, accepted })
                    if version == accepted
                        && store.accepted_document().ok().flatten().as_deref()
                            == Some(signed.document.as_slice()) =>
                {
                    let doc = serde_json::from_slice::<DesiredState>(&signed.document)
                        .map_err(|e| e.to_string())?;
                    Ok(Some((doc, signed.document)))
                }
                Err(e) => Err(e.to_string()),
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Applies each newly accepted document in turn (the latest wins), then asks for a report.
    async fn reconcile_loop(
        self: Arc<Self>,
        fetcher: Fetcher,
        mut docs: watch::Receiver<Option<(DesiredState, Vec<u8>)>>,
        reports: mpsc::Sender<()>,
    ) {
        while docs.changed().await.is_ok() {
            let Some((doc, _)) = docs.borrow_and_update().clone() else { continue };
            if self.apply(&fetcher, &doc).await {
                *self.applied.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(doc.version);
                self.stats.applied_version.store(doc.version, Ordering::Relaxed);
            }
            // Rollouts take effect whether or not every install succeeded: a candidate not
            // loaded leaves its requests with the baseline.
            let rollouts = doc.rollouts.clone();
            if let Err(e) = self.with_store(move |s| s.set_rollouts(&rollouts)).await {
                self.note_error(format!("recording rollouts: {e}"));
            }
            *self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                doc.jobs.iter().map(|j| j.id.clone()).collect();
            let jobs = doc.jobs.clone();
            match self.with_store(move |s| s.enqueue_jobs(&jobs, SystemTime::now())).await {
                Ok(0) => {}
                Ok(_) => self.jobs_wake.notify_one(),
                Err(e) => self.note_error(format!("recording fine-tune jobs: {e}")),
            }
            self.reload.notify_one();
            let _ = reports.send(()).await;
        }
    }

    /// Plans and runs the actions for `doc`; true when everything succeeded.
    async fn apply(&self, fetcher: &Fetcher, doc: &DesiredState) -> bool {
        let held = match self.with_store(|s| s.held()).await {
            Ok(held) => held,
            Err(e) => {
                self.note_error(format!("reading the installed bundles: {e}"));
                return false;
            }
        };
        let plan = reconcile::plan(doc, &held);
        let mut ok = plan.problems.is_empty();
        for problem in plan.problems {
            self.note_error(problem);
        }
        for action in plan.actions {
            let now = SystemTime::now();
            let result = match &action {
                Action::Install(want) => match fetcher.install(want, now).await {
                    Ok(stats) => {
                        crate::crash_point("sync-installed");
                        self.stats.transfer_bytes.fetch_add(stats.fetched_bytes, Ordering::Relaxed);
                        tracing::info!(model = %want.name, version = want.version, chunks = stats.chunks, fetched = stats.fetched, fetched_bytes = stats.fetched_bytes, reused = stats.reused, damaged = stats.damaged, "bundle installed");
                        Ok(())
                    }
                    Err(e) => Err(format!("installing {}@{}: {e}", want.name, want.version)),
                },
                Action::Activate { name, version } => {
                    let (n, v) = (name.clone(), *version);
                    match self.with_store(move |s| s.activate(&n, v, now)).await {
                        Ok(true) => {
                            crate::crash_point("sync-activated");
                            tracing::info!(model = %name, version, "activated");
                            self.reload.notify_one();
                            Ok(())
                        }
                        Ok(false) => Err(format!("activating {name}@{version}: not installed")),
                        Err(e) => Err(format!("activating {name}@{version}: {e}")),
                    }
                }
                Action::Remove { name, version } => {
                    let (n, v) = (name.clone(), *version);
                    match self.with_store(move |s| s.remove(&n, v, now)).await {
                        Ok(_) => {
                            tracing::info!(model = %name, version, "removed");
                            Ok(())
                        }
                        Err(e) => Err(format!("removing {name}@{version}: {e}")),
                    }
                }
            };
            if let Err(problem) = result {
                ok = false;
                self.note_error(problem);
                // Installs may fail on a dropped connection; later actions depend on them.
                if matches!(action, Action::Install(_)) {
                    break;
                }
            }
        }
        if ok {
            self.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
            self.stats.reconcile_errors.store(0, Ordering::Relaxed);
        }
        ok
    }
}

/// Sends a renewal request.
async fn send_renewal(
    send: &mut quinn::SendStream,
    renew: &AgentMessage,
) -> Result<(), falaj_common::protocol::io::FrameIoError> {
    write_frame(send, renew).await?;
    crate::crash_point("renew-requested");
    Ok(())
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

/// Completes when `reporter` rolled a rollout back; never without one.
async fn rolled_back(reporter: Option<&Reporter>) {
    match reporter {
        Some(r) => r.rolled_back().notified().await,
        None => std::future::pending().await,
    }
}

/// Completes when `reporter` has windows to send; never without one.
async fn pending(reporter: Option<&Reporter>) {
    match reporter {
        Some(r) => r.pending().notified().await,
        None => std::future::pending().await,
    }
}
