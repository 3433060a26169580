//! The agent's side of its control-plane session as a state machine that does no I/O,
//! after quinn-proto's `Connection`: the driver hands in what happened as an [`Event`]
//! with the time ([`Session::handle`]), performs the [`Action`]s the machine then yields
//! ([`Session::poll`]), feeds their results back as events, and calls
//! [`Session::handle_timeout`] when [`Session::poll_timeout`] says.
//!
//! The machine decides; the driver performs. It decides when to connect, to which of the
//! control plane's addresses (one per replica: a seeded-random one first, the next one
//! after a failure; `addresses.rs`) and how long to back off (exponential per failed
//! round over the addresses, full jitter from a seed), when to report, which desired-state
//! documents are accepted and which is applied next, when to send metric windows and audit
//! lines and what their acknowledgements settle, when to ask for a new certificate, and
//! when to take the next fine-tune job. The driver opens connections, reads and writes
//! frames, reads and writes the store, installs bundles and runs jobs.
//!
//! Time comes in as [`Now`]: a monotonic `elapsed` for every timer, and the wall clock
//! for the two rules that are about calendar time (document expiry, certificate
//! lifetime). Tests step it in microseconds of their own time (`tests.rs`).

pub mod addresses;
pub mod backoff;
pub mod batches;
pub mod documents;
pub mod jobs;
pub mod renewal;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use crate::desired::{DesiredState, SignedDesired};
use crate::time::Timestamp;
use crate::trust::TrustRoot;

use self::addresses::Addresses;
use self::backoff::Backoff;
use self::batches::{Audit, Windows};
use self::documents::{Documents, Verdict};
use self::jobs::Jobs;
use self::renewal::Renewal;
pub use self::renewal::Validity;

/// Most problems kept for reports; older ones are dropped.
pub const MAX_ERRORS: usize = 8;

/// The machine's timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// How often to report while connected (and check acknowledgements and renewal).
    pub heartbeat: Duration,
    /// The longest wait between connection attempts.
    pub max_backoff: Duration,
    /// How long a batch of windows or audit lines waits for its acknowledgement before
    /// it is sent again.
    pub ack_timeout: Duration,
    /// How long an unanswered renewal request waits before it is asked again.
    pub renew_retry: Duration,
    /// How long one connection attempt may take when there is one address.
    pub connect_timeout: Duration,
    /// How long one connection attempt may take when there are several addresses: what
    /// a dead (silent) replica costs before the next one is tried.
    pub failover_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(10),
            max_backoff: Duration::from_secs(60),
            ack_timeout: Duration::from_secs(30),
            renew_retry: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(15),
            failover_timeout: Duration::from_secs(5),
        }
    }
}

/// The time of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time since the driver's start: every timer runs on it.
    pub elapsed: Duration,
    /// The wall clock, for document expiry and certificate lifetime.
    pub wall: SystemTime,
}

impl Now {
    /// `self` moved on by `by` on both clocks.
    #[must_use]
    pub fn after(self, by: Duration) -> Self {
        Self { elapsed: self.elapsed + by, wall: self.wall + by }
    }
}

/// What the driver read from its store when it starts the machine.
#[derive(Debug, Clone)]
pub struct Restored {
    /// This agent's id.
    pub agent: String,
    /// Its region.
    pub region: String,
    /// The last document accepted: its version and exact bytes.
    pub accepted: Option<(u64, Vec<u8>)>,
    /// The certificate in use (`None`: unreadable, nothing is renewed).
    pub certificate: Option<Validity>,
    /// The control plane's addresses (`host:port`), one per replica; names already
    /// resolved by the driver where it could.
    pub addresses: Vec<String>,
    /// Seed of the backoff jitter and of the first address chosen.
    pub seed: u64,
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// An attempt is under way ([`Action::Connect`] was yielded).
    Connecting,
    /// The session is up; the next heartbeat is due at `heartbeat` (elapsed time).
    Established {
        /// When the next heartbeat is due.
        heartbeat: Duration,
    },
    /// Waiting until `until` (elapsed time) before the next attempt.
    BackingOff {
        /// When the next attempt starts.
        until: Duration,
    },
}

/// What happened, as the driver tells it.
#[derive(Debug, Clone)]
pub enum Event {
    /// The session is up: hello sent and the control plane's first message read.
    Connected,
    /// The addresses to dial are now these ([`Action::Resolve`]).
    Addresses(Vec<String>),
    /// The attempt failed or the session ended, with the reason.
    Lost(String),
    /// A desired-state document arrived; `trust` is the trust root it must verify
    /// against (or why none could be read).
    Desired {
        /// The document.
        signed: SignedDesired,
        /// The pinned trust root.
        trust: Result<TrustRoot, String>,
    },
    /// [`Action::Record`] is done: the document is durably the accepted one.
    Recorded,
    /// [`Action::Record`] failed, with the reason.
    RecordFailed(String),
    /// The control plane sent a renewed certificate.
    Renewed {
        /// The certificate (DER).
        certificate_der: Vec<u8>,
        /// When it expires.
        expires: Timestamp,
    },
    /// The certificate in use is now this one (at start, and after an install).
    Certificate(Option<Validity>),
    /// The control plane refused a request, with the reason.
    Refused(String),
    /// The control plane sent the region's trust root versions.
    TrustRoots(Vec<String>),
    /// The control plane stored these windows.
    Ack(Vec<u64>),
    /// The control plane stored the audit chain up to this entry.
    AuditAck(u64),
    /// Windows may wait in the outbox.
    WindowsWaiting,
    /// [`Action::SendWindows`] sent these (`None`: the outbox was empty).
    WindowsSent(Option<Vec<u64>>),
    /// [`Action::SendAudit`] sent up to this entry (`None`: nothing to send).
    AuditSent(Option<u64>),
    /// A rollout was rolled back here: the control plane should hear at once.
    RolledBack,
    /// Something the driver did failed and belongs in reports.
    Problem(String),
    /// [`Action::Apply`] finished: `ok` when every install, activation and removal
    /// succeeded (their problems came as [`Event::Problem`]s before); `new_jobs` jobs of
    /// the document were queued for the first time; `problems` arose after those steps
    /// (recording the rollouts or the jobs).
    Applied {
        /// Every install, activation and removal succeeded.
        ok: bool,
        /// Jobs queued for the first time.
        new_jobs: usize,
        /// Problems recording the document's rollouts or jobs.
        problems: Vec<String>,
    },
    /// [`Action::RecoverJobs`] is done.
    JobsRecovered,
    /// [`Action::StartNextJob`] started this job (`None`: none was pending).
    JobStarted(Option<String>),
    /// The job ended and its report is stored.
    JobFinished(String),
}

/// What the driver should do, in the order yielded.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Connect to `address` within `timeout`, send hello, read the first message;
    /// answer [`Event::Connected`] (then the message) or [`Event::Lost`].
    Connect {
        /// The address to dial (`host:port`).
        address: String,
        /// How long the handshake may take.
        timeout: Duration,
    },
    /// A round over every address failed: resolve the enrolled names again, in the
    /// background, and answer [`Event::Addresses`] if the list changed.
    Resolve,
    /// The session ended or the attempt failed; the next one starts after `wait`, on
    /// [`Session::address`].
    Disconnected {
        /// Why.
        reason: String,
        /// The backoff drawn.
        wait: Duration,
    },
    /// Record `document` as the accepted one; answer [`Event::Recorded`] or
    /// [`Event::RecordFailed`].
    Record {
        /// The verified document.
        doc: DesiredState,
        /// Its exact bytes.
        document: Vec<u8>,
    },
    /// Reconcile to `doc` (install, activate, remove; record its rollouts and jobs),
    /// in the background; answer [`Event::Applied`].
    Apply(DesiredState),
    /// Send a report of the actual state.
    SendReport,
    /// Read the oldest windows of the outbox and send them; answer
    /// [`Event::WindowsSent`]. `resend`: the last batch went unacknowledged.
    SendWindows {
        /// The last batch timed out.
        resend: bool,
    },
    /// Delete these acknowledged windows from the outbox.
    DeleteWindows(Vec<u64>),
    /// Send the audit lines not yet shipped; answer [`Event::AuditSent`].
    SendAudit,
    /// Record the audit chain as shipped up to this entry.
    AuditShipped(u64),
    /// Make a key pair, keep it pending, and send a renewal request.
    Renew,
    /// Install the renewed certificate; answer [`Event::Certificate`] or
    /// [`Event::Problem`].
    InstallCertificate {
        /// The certificate (DER).
        certificate_der: Vec<u8>,
        /// When it expires.
        expires: Timestamp,
    },
    /// Take the trust root versions that follow the one held.
    UpdateTrust(Vec<String>),
    /// A problem was noted (it is in [`Session::errors`]); log it.
    Problem(String),
    /// Mark jobs a previous process left running as failed; answer
    /// [`Event::JobsRecovered`].
    RecoverJobs,
    /// Start the oldest pending job, if any; answer [`Event::JobStarted`], and
    /// [`Event::JobFinished`] when it ends.
    StartNextJob,
}

/// The agent's session with its control plane, across connections.
#[derive(Debug)]
pub struct Session {
    config: Config,
    state: State,
    addresses: Addresses,
    backoff: Backoff,
    renewal: Renewal,
    windows: Windows,
    resend: bool,
    audit: Audit,
    documents: Documents,
    jobs: Jobs,
    applied: Option<u64>,
    errors: VecDeque<String>,
    actions: VecDeque<Action>,
}

impl Session {
    /// A session that starts by recovering interrupted jobs and connecting.
    pub fn new(config: Config, restored: Restored) -> Self {
        let mut renewal = Renewal::default();
        renewal.set_validity(restored.certificate);
        Self {
            config,
            state: State::Connecting,
            addresses: Addresses::new(restored.addresses, restored.seed),
            backoff: Backoff::new(config.max_backoff, restored.seed),
            renewal,
            windows: Windows::default(),
            resend: false,
            audit: Audit::default(),
            documents: Documents::new(restored.agent, restored.region, restored.accepted),
            jobs: Jobs::default(),
            applied: None,
            errors: VecDeque::new(),
            actions: VecDeque::from([Action::RecoverJobs]),
        }
        .connecting()
    }

    /// `self` with an attempt on the current address yielded.
    fn connecting(mut self) -> Self {
        self.connect();
        self
    }

    /// Yields an attempt on the current address.
    fn connect(&mut self) {
        self.state = State::Connecting;
        let timeout = if self.addresses.list().len() > 1 {
            self.config.failover_timeout.min(self.config.connect_timeout)
        } else {
            self.config.connect_timeout
        };
        let address = self.addresses.current().to_owned();
        self.actions.push_back(Action::Connect { address, timeout });
    }

    /// The next action to perform.
    pub fn poll(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Session::handle_timeout`] must next be called (elapsed time).
    pub fn poll_timeout(&self) -> Option<Duration> {
        match self.state {
            State::Connecting => None,
            State::Established { heartbeat } => Some(heartbeat),
            State::BackingOff { until } => Some(until),
        }
    }

    /// Where the connection stands.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the session is up.
    pub fn established(&self) -> bool {
        matches!(self.state, State::Established { .. })
    }

    /// The version of the last document applied in full, as reports say.
    pub fn applied(&self) -> Option<u64> {
        self.applied
    }

    /// The version of the last document accepted.
    pub fn accepted(&self) -> Option<u64> {
        self.documents.accepted()
    }

    /// The problems reports carry, oldest first (cleared by a document applied in full).
    pub fn errors(&self) -> impl ExactSizeIterator<Item = &String> {
        self.errors.iter()
    }

    /// The jobs of the applied document: what reports cover.
    pub fn jobs(&self) -> &[String] {
        self.jobs.ordered()
    }

    /// The job running, if any.
    pub fn running_job(&self) -> Option<&str> {
        self.jobs.running()
    }

    /// Consecutive failed rounds over the addresses since the last session that came up
    /// (with one address, failed attempts).
    pub fn failures(&self) -> u32 {
        self.backoff.failures()
    }

    /// The address dialled now, or the one the session is up on (or the next to dial).
    pub fn address(&self) -> &str {
        self.addresses.current()
    }

    /// Every address, in the enrolled order.
    pub fn addresses(&self) -> &[String] {
        self.addresses.list()
    }

    /// The metric windows in flight.
    pub fn windows_in_flight(&self) -> Option<&[u64]> {
        self.windows.in_flight()
    }

    /// Whether a renewal request is outstanding.
    pub fn renewing(&self) -> bool {
        self.renewal.outstanding()
    }

    /// Timers that have come due by `now`.
    pub fn handle_timeout(&mut self, now: Now) {
        match self.state {
            State::BackingOff { until } if now.elapsed >= until => self.connect(),
            State::Established { heartbeat } if now.elapsed >= heartbeat => {
                let mut next = heartbeat + self.config.heartbeat;
                if next <= now.elapsed {
                    next = now.elapsed + self.config.heartbeat;
                }
                self.state = State::Established { heartbeat: next };
                self.heartbeat(now);
            }
            _ => {}
        }
        self.drive();
    }

    /// What a heartbeat does, in this order: report; give up on a batch of windows
    /// unacknowledged too long; send audit lines; ask for a certificate if due.
    fn heartbeat(&mut self, now: Now) {
        self.actions.push_back(Action::SendReport);
        if self.windows.expire(now.elapsed, self.config.ack_timeout) {
            self.resend = true;
        }
        if self.audit.due(now.elapsed, self.config.ack_timeout) {
            self.actions.push_back(Action::SendAudit);
        }
        if self.renewal.poll(now.elapsed, now.wall, self.config.renew_retry) {
            self.actions.push_back(Action::Renew);
        }
    }

    /// Handles `event`, which happened at `now`.
    pub fn handle(&mut self, event: Event, now: Now) {
        match event {
            Event::Connected => {
                self.backoff.reset();
                self.addresses.connected();
                self.windows.reset();
                self.audit.reset();
                self.state = State::Established { heartbeat: now.elapsed + self.config.heartbeat };
            }
            Event::Lost(reason) => {
                if matches!(self.state, State::BackingOff { .. }) {
                    return;
                }
                // The next address; a longer wait only once every address failed.
                let round = self.addresses.failed();
                let wait = if round { self.backoff.failed() } else { self.backoff.quick() };
                self.state = State::BackingOff { until: now.elapsed + wait };
                self.documents.reset();
                self.windows.reset();
                self.audit.reset();
                self.actions.push_back(Action::Disconnected { reason, wait });
                if round {
                    self.actions.push_back(Action::Resolve);
                }
            }
            Event::Addresses(list) => self.addresses.replace(list),
            Event::Desired { signed, trust } => {
                if self.documents.recording() {
                    self.documents.hold(signed, trust);
                } else {
                    self.judge(&signed, trust.as_ref().map_err(String::as_str), now);
                }
            }
            Event::Recorded => {
                if let Some(doc) = self.documents.recorded(true) {
                    self.apply(doc);
                }
                self.judge_held(now);
            }
            Event::RecordFailed(reason) => {
                self.documents.recorded(false);
                self.note(format!("desired state refused: {reason}"));
                self.judge_held(now);
            }
            Event::Renewed { certificate_der, expires } => {
                self.renewal.answered();
                self.actions.push_back(Action::InstallCertificate { certificate_der, expires });
            }
            Event::Certificate(validity) => self.renewal.set_validity(validity),
            Event::Refused(reason) => {
                self.note(format!("the control plane refused a request: {reason}"));
            }
            Event::TrustRoots(roots) => self.actions.push_back(Action::UpdateTrust(roots)),
            Event::Ack(seqs) => {
                self.windows.acknowledged(&seqs);
                self.actions.push_back(Action::DeleteWindows(seqs));
            }
            Event::AuditAck(seq) => {
                self.actions.push_back(Action::AuditShipped(seq));
                self.actions.push_back(Action::SendAudit);
            }
            Event::WindowsWaiting => self.windows.wake(),
            Event::WindowsSent(seqs) => self.windows.sent(seqs, now.elapsed),
            Event::AuditSent(last) => self.audit.sent(last, now.elapsed),
            Event::RolledBack => {
                if self.established() {
                    self.actions.push_back(Action::SendReport);
                }
            }
            Event::Problem(problem) => self.note(problem),
            Event::Applied { ok, new_jobs, problems } => self.applied_one(ok, new_jobs, problems),
            Event::JobsRecovered => self.jobs.recovered(),
            Event::JobStarted(id) => self.jobs.started(id),
            Event::JobFinished(id) => self.jobs.finished(&id),
        }
        self.drive();
    }

    /// Yields what has become possible: a batch of windows, the next job.
    fn drive(&mut self) {
        if self.established() && self.windows.poll_send() {
            let resend = std::mem::take(&mut self.resend);
            self.actions.push_back(Action::SendWindows { resend });
        }
        if self.jobs.poll_start() {
            self.actions.push_back(Action::StartNextJob);
        }
    }

    fn judge(&mut self, signed: &SignedDesired, trust: Result<&TrustRoot, &str>, now: Now) {
        match self.documents.judge(signed, trust, now.wall) {
            Verdict::Record(doc, document) => {
                self.actions.push_back(Action::Record { doc, document });
            }
            Verdict::Again(doc) => self.apply(doc),
            Verdict::Refused(reason) => self.note(format!("desired state refused: {reason}")),
        }
    }

    fn judge_held(&mut self, now: Now) {
        while let Some((signed, trust)) = self.documents.take_held() {
            self.judge(&signed, trust.as_ref().map_err(String::as_str), now);
        }
    }

    /// Applies `doc` now, or after the one being applied; only on a live session (the
    /// next one starts with the current document anyway).
    fn apply(&mut self, doc: DesiredState) {
        if !self.established() {
            return;
        }
        if let Some(doc) = self.documents.queue(doc) {
            self.actions.push_back(Action::Apply(doc));
        }
    }

    fn applied_one(&mut self, ok: bool, new_jobs: usize, problems: Vec<String>) {
        let (done, next) = self.documents.applied();
        let Some(done) = done else { return };
        if ok {
            self.applied = Some(done.version);
            self.errors.clear();
        }
        for problem in problems {
            self.note(problem);
        }
        self.jobs.set_ordered(done.jobs.iter().map(|j| j.id.clone()).collect());
        if new_jobs > 0 {
            self.jobs.wake();
        }
        self.actions.push_back(Action::SendReport);
        if let Some(next) = next {
            self.actions.push_back(Action::Apply(next));
        }
    }

    fn note(&mut self, problem: String) {
        self.errors.push_back(problem.clone());
        while self.errors.len() > MAX_ERRORS {
            self.errors.pop_front();
        }
        self.actions.push_back(Action::Problem(problem));
    }
}
