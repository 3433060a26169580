//! The driver's loop: it owns the session machine, performs each action it yields
//! (dialling, writing frames, store reads and writes, spawning the reader, apply and job
//! tasks) and turns socket reads, task ends, outbox and rollback signals and timer
//! expiries ([`Session::poll_timeout`]) back into events.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use falaj_common::protocol::io::{read_frame, write_frame};
use falaj_common::protocol::{AgentMessage, ControlMessage};
use falaj_common::session::{self, Action, Event, Now, Session};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Known, Opened, SyncError, Syncer, has_names, resolve_all, with_clock};
use crate::identity::KeyRequest;
use crate::reporting::Reporter;

/// An open session: its connection, the stream to write on, and the tasks reading the
/// other stream and applying a document. Dropping it stops both tasks.
struct Live {
    generation: u64,
    conn: quinn::Connection,
    send: quinn::SendStream,
    reader: JoinHandle<()>,
    apply: Option<JoinHandle<()>>,
}

impl Drop for Live {
    fn drop(&mut self) {
        self.reader.abort();
        if let Some(apply) = &self.apply {
            apply.abort();
        }
    }
}

/// What the driver's tasks hand back to its loop.
enum Done {
    /// A connection attempt ended.
    Connected { generation: u64, session: Result<Opened, SyncError> },
    /// The reader read a frame, or the session ended.
    Frame { generation: u64, frame: Result<ControlMessage, SyncError> },
    /// An apply task's progress or end.
    Apply { generation: u64, event: Event },
    /// A job ended.
    Job(Event),
    /// The enrolled names resolved again to these addresses.
    Resolved(Vec<String>),
}

/// Why the loop woke.
enum Wake {
    Stop,
    Done(Done),
    Event(Event),
    Timer,
}

impl Syncer {
    /// The loop: performs what the machine yields, then waits for the next event (a
    /// frame, a task's end, windows waiting, a rollback, a timer or shutdown).
    pub(super) async fn drive(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(restored) = self.restored(&mut shutdown).await else { return };
        let epoch = Instant::now();
        let now = move || Now { elapsed: epoch.elapsed(), wall: SystemTime::now() };
        let config = session::Config {
            heartbeat: self.config.heartbeat,
            max_backoff: self.config.max_backoff,
            ..session::Config::default()
        };
        let mut machine = Session::new(config, restored);
        let (tx, mut rx) = mpsc::unbounded_channel::<Done>();
        let mut driver = Driver {
            syncer: Arc::clone(&self),
            tx,
            live: None,
            generation: 0,
            connecting: None,
            resolving: None,
            job: None,
            queued: VecDeque::new(),
        };
        loop {
            while let Some(action) = machine.poll() {
                if let Some(event) = driver.perform(action, &machine).await {
                    driver.queued.push_back(event);
                }
                while let Some(event) = driver.queued.pop_front() {
                    machine.handle(event, now());
                }
            }
            self.stats.connected.store(machine.established(), Ordering::Relaxed);
            self.stats.reconcile_errors.store(machine.errors().len() as u64, Ordering::Relaxed);
            if let Some(applied) = machine.applied() {
                self.stats.applied_version.store(applied, Ordering::Relaxed);
            }
            let deadline = machine.poll_timeout().map(|t| epoch + t);
            // In this order: frames first, and a rollback is reported before the windows
            // that show it, so the control plane hears the agent's verdict first.
            let woke = tokio::select! {
                biased;
                _ = shutdown.wait_for(|s| *s) => Wake::Stop,
                Some(done) = rx.recv() => Wake::Done(done),
                () = rolled_back(self.reporter.as_deref()) => Wake::Event(Event::RolledBack),
                () = pending(self.reporter.as_deref()) => Wake::Event(Event::WindowsWaiting),
                () = sleep_until(deadline) => Wake::Timer,
            };
            let event = match woke {
                Wake::Stop => break,
                Wake::Done(done) => driver.done(done).await,
                Wake::Event(event) => Some(event),
                Wake::Timer => {
                    machine.handle_timeout(now());
                    None
                }
            };
            if let Some(event) = event {
                machine.handle(event, now());
            }
            while let Some(event) = driver.queued.pop_front() {
                machine.handle(event, now());
            }
        }
        // A job still training is left to the process's end; the next start marks it
        // interrupted.
        if let Some(job) = driver.job.take() {
            job.abort();
        }
        if let Some(connecting) = driver.connecting.take() {
            connecting.abort();
        }
        if let Some(resolving) = driver.resolving.take() {
            resolving.abort();
        }
        self.stats.connected.store(false, Ordering::Relaxed);
    }
}

/// The driver's side of the loop: the open session, the tasks running, and events
/// that its actions produced, to hand to the machine next.
struct Driver {
    syncer: Arc<Syncer>,
    tx: mpsc::UnboundedSender<Done>,
    live: Option<Live>,
    generation: u64,
    connecting: Option<JoinHandle<()>>,
    resolving: Option<JoinHandle<()>>,
    job: Option<JoinHandle<()>>,
    queued: VecDeque<Event>,
}

impl Driver {
    /// A task's result as an event; `None` when it belongs to a session gone.
    async fn done(&mut self, done: Done) -> Option<Event> {
        let current = |generation| self.live.as_ref().is_some_and(|l| l.generation == generation);
        match done {
            Done::Connected { generation, session } if generation == self.generation => {
                self.connecting = None;
                match session {
                    Ok(opened) => {
                        let (conn, send, recv, first) = *opened;
                        let this = &self.syncer;
                        tracing::info!(control_plane = %conn.remote_address(), agent = %this.identity.agent_id, "connected to the control plane");
                        let reader = tokio::spawn(read_frames(
                            conn.clone(),
                            recv,
                            self.tx.clone(),
                            generation,
                        ));
                        self.live = Some(Live { generation, conn, send, reader, apply: None });
                        let first = self.event_for(first).await;
                        self.queued.push_back(first);
                        Some(Event::Connected)
                    }
                    Err(e) => Some(Event::Lost(e.to_string())),
                }
            }
            Done::Frame { generation, frame } if current(generation) => match frame {
                Ok(message) => Some(self.event_for(message).await),
                Err(e) => Some(Event::Lost(e.to_string())),
            },
            Done::Apply { generation, event } if current(generation) => Some(event),
            Done::Job(event) => {
                self.job = None;
                Some(event)
            }
            Done::Resolved(addresses) => {
                self.resolving = None;
                Some(Event::Addresses(addresses))
            }
            Done::Connected { .. } | Done::Frame { .. } | Done::Apply { .. } => None,
        }
    }

    /// A message from the control plane as the machine's event; a document comes with
    /// the trust root the store pins now.
    async fn event_for(&self, message: ControlMessage) -> Event {
        match message {
            ControlMessage::Desired(signed) => {
                let trust = self.syncer.with_store(|s| s.trust_root()).await;
                Event::Desired { signed, trust: trust.map_err(|e| e.to_string()) }
            }
            ControlMessage::Renewed { certificate_der, expires } => {
                Event::Renewed { certificate_der, expires }
            }
            ControlMessage::Refused(reason) => Event::Refused(reason),
            ControlMessage::TrustRoots(roots) => Event::TrustRoots(roots),
            ControlMessage::Ack { seqs } => Event::Ack(seqs),
            ControlMessage::AuditAck { seq } => Event::AuditAck(seq),
        }
    }

    /// Writes `message` on the session; the event that the session was lost if that fails.
    async fn write(&mut self, message: &AgentMessage) -> Result<(), Event> {
        let Some(live) = &mut self.live else {
            return Err(Event::Lost("no session to write on".into()));
        };
        write_frame(&mut live.send, message).await.map_err(|e| Event::Lost(e.to_string()))
    }

    /// Performs `action`; returns the event it results in, if any.
    async fn perform(&mut self, action: Action, machine: &Session) -> Option<Event> {
        let this = Arc::clone(&self.syncer);
        match action {
            Action::Connect { address, timeout } => {
                self.generation += 1;
                let (generation, tx, known) =
                    (self.generation, self.tx.clone(), Known::of(machine));
                tracing::debug!(control_plane = %address, "connecting to the control plane");
                self.connecting = Some(tokio::spawn(async move {
                    let session = this.open_session(&known, &address, timeout).await;
                    let _ = tx.send(Done::Connected { generation, session });
                }));
                None
            }
            Action::Disconnected { reason, wait } => {
                self.live = None;
                let error = with_clock(&reason, SystemTime::now());
                tracing::warn!(error = %error, retry_in = ?wait, next = %machine.address(), "control plane session ended");
                None
            }
            Action::Resolve => {
                let entries = this.identity.control_planes();
                if has_names(&entries) && self.resolving.is_none() {
                    let tx = self.tx.clone();
                    self.resolving = Some(tokio::spawn(async move {
                        let _ = tx.send(Done::Resolved(resolve_all(&entries).await));
                    }));
                }
                None
            }
            Action::Record { doc, document } => {
                let version = doc.version;
                let recorded = this
                    .with_store(move |s| s.accept_desired(version, &document, SystemTime::now()))
                    .await;
                Some(match recorded {
                    Ok(()) => {
                        tracing::info!(
                            version,
                            bundles = doc.bundles.len(),
                            "desired state accepted"
                        );
                        Event::Recorded
                    }
                    Err(e) => Event::RecordFailed(e.to_string()),
                })
            }
            Action::Apply(doc) => {
                let live = self.live.as_mut()?;
                let (generation, tx) = (live.generation, self.tx.clone());
                let send = move |event| {
                    let _ = tx.send(Done::Apply { generation, event });
                };
                let fetcher = this.fetcher(live.conn.clone());
                live.apply = Some(tokio::spawn(this.apply(fetcher, doc, send)));
                None
            }
            Action::SendReport => {
                let state = this.actual_state(&Known::of(machine)).await;
                self.write(&AgentMessage::Report(state)).await.err()
            }
            Action::SendWindows { resend } => Some(self.send_windows(resend).await),
            Action::DeleteWindows(seqs) => {
                this.delete_windows(seqs).await;
                None
            }
            Action::SendAudit => Some(self.send_audit().await),
            Action::AuditShipped(seq) => {
                if let Err(e) = this.with_store(move |s| s.audit_shipped(seq)).await {
                    tracing::error!(error = %e, "recording the audit entries shipped failed");
                }
                None
            }
            Action::Renew => self.renew().await,
            Action::InstallCertificate { certificate_der, expires } => {
                Some(this.install_certificate(&certificate_der, expires))
            }
            Action::UpdateTrust(roots) => this.update_trust(roots).await,
            Action::Problem(problem) => {
                tracing::warn!(error = %problem, "reconciliation problem");
                None
            }
            Action::RecoverJobs => Some(this.recover_jobs().await),
            Action::StartNextJob => Some(self.start_job().await),
        }
    }

    /// Sends the oldest windows waiting, if any.
    async fn send_windows(&mut self, resend: bool) -> Event {
        let Some(reporter) = self.syncer.reporter.clone() else { return Event::WindowsSent(None) };
        if resend {
            tracing::warn!("metric windows not acknowledged in time: sending them again");
        }
        let batch = match tokio::task::spawn_blocking(move || reporter.batch()).await {
            Ok(Ok(batch)) => batch,
            Ok(Err(e)) => return Event::Lost(e.to_string()),
            Err(e) => return Event::Lost(format!("outbox task failed: {e}")),
        };
        if batch.is_empty() {
            return Event::WindowsSent(None);
        }
        let seqs: Vec<u64> = batch.iter().map(|w| w.seq).collect();
        tracing::debug!(windows = seqs.len(), first = seqs[0], "sending metric windows");
        if let Err(lost) = self.write(&AgentMessage::Windows(batch)).await {
            return lost;
        }
        crate::crash_point("outbox-sent");
        Event::WindowsSent(Some(seqs))
    }

    /// Sends the audit entries the control plane has not acknowledged, at most one batch.
    async fn send_audit(&mut self) -> Event {
        let limit = falaj_common::protocol::MAX_AUDIT_PER_BATCH;
        let batch = match self.syncer.with_store(move |s| s.audit_unshipped(limit)).await {
            Ok(batch) => batch,
            Err(e) => return Event::Lost(e.to_string()),
        };
        let Some(&(last, _)) = batch.last() else { return Event::AuditSent(None) };
        let lines = batch.into_iter().map(|(_, line)| line).collect();
        match self.write(&AgentMessage::Audit(lines)).await {
            Ok(()) => Event::AuditSent(Some(last)),
            Err(gone) => gone,
        }
    }

    /// Makes a key pair, keeps it pending and asks for a certificate for it.
    async fn renew(&mut self) -> Option<Event> {
        let files = &self.syncer.files;
        let request = KeyRequest::generate().ok()?;
        files.store_pending(&request).ok()?;
        crate::crash_point("renew-key-written");
        let expires = files.validity().ok().map(|(_, not_after)| not_after);
        tracing::info!(expires = ?expires, "renewing the agent certificate");
        if let Err(lost) = self.write(&AgentMessage::Renew { csr_der: request.csr_der }).await {
            return Some(lost);
        }
        crate::crash_point("renew-requested");
        None
    }

    /// Starts the oldest pending job on the blocking pool, if any.
    async fn start_job(&mut self) -> Event {
        let this = Arc::clone(&self.syncer);
        let job = match this.with_store(|s| s.start_next_job(SystemTime::now())).await {
            Ok(Some(job)) => job,
            Ok(None) => return Event::JobStarted(None),
            Err(e) => {
                tracing::warn!(error = %e, "reading the next fine-tune job");
                return Event::JobStarted(None);
            }
        };
        tracing::info!(job = %job.id, model = %job.job.model, "fine-tune job started");
        let id = job.id.clone();
        let tx = self.tx.clone();
        self.job = Some(tokio::spawn(async move {
            let id = this.run_job(job).await;
            let _ = tx.send(Done::Job(Event::JobFinished(id)));
        }));
        Event::JobStarted(Some(id))
    }
}

/// Reads the session stream until it ends, handing each frame to the loop.
async fn read_frames(
    conn: quinn::Connection,
    mut recv: quinn::RecvStream,
    tx: mpsc::UnboundedSender<Done>,
    generation: u64,
) {
    loop {
        let frame = match read_frame::<ControlMessage>(&mut recv).await {
            Ok(Some(message)) => Ok(message),
            Ok(None) => Err(SyncError::Closed("session stream closed".into())),
            Err(e) => Err(conn.close_reason().map_or_else(
                || SyncError::Connection(e.to_string()),
                |r| SyncError::Closed(r.to_string()),
            )),
        };
        let end = frame.is_err();
        if tx.send(Done::Frame { generation, frame }).is_err() || end {
            return;
        }
    }
}

/// Completes at `deadline`; never without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
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
