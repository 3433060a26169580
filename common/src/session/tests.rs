//! The session machine driven by a simulated driver and control plane on a simulated
//! clock, after quinn-proto's `tests/util.rs`: whole scenarios (a certificate's lifetime,
//! minutes of backoff, every fate of every acknowledgement) run in microseconds.

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use super::backoff::BASE;
use super::*;
use crate::desired::{DesiredBundle, DesiredState};
use crate::finetune::{DataSource, DesiredJob, Gate, Hyperparameters, Job, TrainEngine};
use crate::keys::tests::key;
use crate::keys::{Sha256, SigningKey};
use crate::trust::RootSpec;

const START: u64 = 1_800_000_000;
const HEARTBEAT: Duration = Duration::from_millis(200);

fn config() -> Config {
    Config { heartbeat: HEARTBEAT, max_backoff: Duration::from_secs(60), ..Config::default() }
}

fn restored(certificate: Option<Validity>) -> Restored {
    Restored {
        agent: "agent-1".into(),
        region: "eu-west-1".into(),
        accepted: None,
        certificate,
        addresses: vec!["control.test:7443".into()],
        seed: 7,
    }
}

fn connect(address: &str, timeout_s: u64) -> Action {
    Action::Connect { address: address.into(), timeout: Duration::from_secs(timeout_s) }
}

fn validity(from: u64, lifetime: u64) -> Validity {
    Validity {
        not_before: Timestamp::from_unix(from),
        not_after: Timestamp::from_unix(from + lifetime),
    }
}

/// What the control plane does with a batch of windows it stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Acknowledged at once.
    Ack,
    /// The acknowledgement is lost.
    Lose,
    /// Acknowledged twice.
    Duplicate,
    /// Acknowledged only after the next batch is sent.
    Late,
    /// The connection drops before the acknowledgement leaves.
    Disconnect,
}

/// The driver and the control plane, simulated: an outbox, the control plane's store of
/// windows, acknowledgements on their way, and a log of every action.
struct Sim {
    session: Session,
    now: Now,
    log: Vec<Action>,
    reachable: bool,
    record_fails: bool,
    outbox: BTreeSet<u64>,
    batch: usize,
    stored: BTreeSet<u64>,
    acks: VecDeque<Vec<u64>>,
    late: Vec<Vec<u64>>,
    fates: VecDeque<Fate>,
    drop_connection: bool,
    /// Addresses where nothing answers, whatever `reachable` says.
    dead: BTreeSet<String>,
}

impl Sim {
    fn new(config: Config, restored: Restored) -> Self {
        let now = Now { elapsed: Duration::ZERO, wall: Timestamp::from_unix(START).to_system() };
        let mut sim = Self {
            session: Session::new(config, restored),
            now,
            log: Vec::new(),
            reachable: true,
            record_fails: false,
            outbox: BTreeSet::new(),
            batch: 2,
            stored: BTreeSet::new(),
            acks: VecDeque::new(),
            late: Vec::new(),
            fates: VecDeque::new(),
            drop_connection: false,
            dead: BTreeSet::new(),
        };
        sim.perform();
        sim
    }

    fn handle(&mut self, event: Event) {
        self.session.handle(event, self.now);
        self.perform();
    }

    /// Moves the clock to the machine's next timer and fires it; false if it has none.
    fn advance(&mut self) -> bool {
        let Some(at) = self.session.poll_timeout() else { return false };
        self.now = self.now.after(at.saturating_sub(self.now.elapsed));
        self.session.handle_timeout(self.now);
        self.perform();
        true
    }

    /// Advances until `until` of simulated time has passed.
    fn run_for(&mut self, span: Duration) {
        let end = self.now.elapsed + span;
        while self.session.poll_timeout().is_some_and(|t| t <= end) {
            self.advance();
        }
        self.now = self.now.after(end.saturating_sub(self.now.elapsed));
    }

    /// Performs every action yielded, as a driver would, feeding back the results.
    fn perform(&mut self) {
        while let Some(action) = self.session.poll() {
            self.log.push(action.clone());
            let event = match action {
                Action::Connect { address, .. }
                    if self.reachable && !self.dead.contains(&address) =>
                {
                    Some(Event::Connected)
                }
                Action::Connect { .. } => Some(Event::Lost("unreachable".into())),
                Action::Record { .. } if self.record_fails => {
                    Some(Event::RecordFailed("disk full".into()))
                }
                Action::Record { .. } => Some(Event::Recorded),
                Action::SendWindows { .. } => Some(self.send_windows()),
                Action::DeleteWindows(seqs) => {
                    for seq in &seqs {
                        assert!(self.stored.contains(seq), "window {seq} deleted before stored");
                        self.outbox.remove(seq);
                    }
                    None
                }
                Action::SendAudit => Some(Event::AuditSent(None)),
                Action::RecoverJobs => Some(Event::JobsRecovered),
                _ => None,
            };
            if let Some(event) = event {
                self.session.handle(event, self.now);
            }
        }
    }

    fn send_windows(&mut self) -> Event {
        assert_eq!(self.session.windows_in_flight(), None, "one batch in flight at most");
        let batch: Vec<u64> = self.outbox.iter().copied().take(self.batch).collect();
        if batch.is_empty() {
            return Event::WindowsSent(None);
        }
        // The control plane commits, then acknowledges as fated.
        self.stored.extend(&batch);
        self.acks.extend(self.late.drain(..));
        match self.fates.pop_front().unwrap_or(Fate::Ack) {
            Fate::Ack => self.acks.push_back(batch.clone()),
            Fate::Lose => {}
            Fate::Duplicate => {
                self.acks.push_back(batch.clone());
                self.acks.push_back(batch.clone());
            }
            Fate::Late => self.late.push(batch.clone()),
            Fate::Disconnect => self.drop_connection = true,
        }
        Event::WindowsSent(Some(batch))
    }

    fn count(&self, wanted: impl Fn(&Action) -> bool) -> usize {
        self.log.iter().filter(|a| wanted(a)).count()
    }
}

#[test]
fn every_window_is_delivered_once_whatever_becomes_of_the_acknowledgements() {
    use Fate::*;
    let fates = [Ack, Lose, Duplicate, Late, Disconnect];
    let mut scenarios = 0;
    for a in fates {
        for b in fates {
            for c in fates {
                for d in fates {
                    check_delivery(&[a, b, c, d]);
                    scenarios += 1;
                }
            }
        }
    }
    assert_eq!(scenarios, 625);
}

/// Five windows, batches of two, the acknowledgements' fates in `script`: all five end up
/// stored, none is deleted before it is stored (checked at each deletion), at most one
/// batch is in flight (checked at each send), and the outbox ends empty.
fn check_delivery(script: &[Fate]) {
    let mut sim = Sim::new(config(), restored(None));
    sim.fates = script.iter().copied().collect();
    sim.outbox.extend(1..=5);
    sim.handle(Event::WindowsWaiting);
    for _ in 0..10_000 {
        if std::mem::take(&mut sim.drop_connection) {
            sim.acks.clear();
            sim.late.clear();
            sim.handle(Event::Lost("connection lost".into()));
        } else if let Some(ack) = sim.acks.pop_front() {
            sim.handle(Event::Ack(ack));
        } else if sim.outbox.is_empty() && sim.session.windows_in_flight().is_none() {
            break;
        } else {
            assert!(sim.advance(), "{script:?}: stalled with {:?} waiting", sim.outbox);
        }
    }
    assert!(sim.outbox.is_empty(), "{script:?}: left {:?}", sim.outbox);
    assert_eq!(sim.stored, (1..=5).collect(), "{script:?}");
    // A window not acknowledged is sent again only after the timeout or a new session.
    let resent = sim.count(|a| matches!(a, Action::SendWindows { resend: true }));
    let lost = script.iter().filter(|f| matches!(f, Fate::Lose | Fate::Late)).count();
    assert!(resent <= lost, "{script:?}: {resent} re-sends for {lost} lost acknowledgements");
}

#[test]
fn a_late_acknowledgement_of_an_older_batch_does_not_settle_the_newer_one() {
    let mut sim = Sim::new(config(), restored(None));
    sim.fates = [Fate::Late, Fate::Lose].into();
    sim.outbox.extend(1..=4);
    sim.handle(Event::WindowsWaiting);
    assert_eq!(sim.session.windows_in_flight(), Some(&[1, 2][..]));
    // No acknowledgement: after the timeout the same windows go again.
    sim.run_for(Duration::from_secs(31));
    assert_eq!(sim.count(|a| matches!(a, Action::SendWindows { resend: true })), 1);
    assert_eq!(sim.acks.len(), 1, "the late acknowledgement left with the re-send");
    sim.handle(Event::Ack(vec![1]));
    assert_eq!(sim.session.windows_in_flight(), Some(&[1, 2][..]), "[1] is not the batch [1, 2]");
    assert!(sim.outbox.contains(&2) && !sim.outbox.contains(&1), "but window 1 is deleted");
    let ack = sim.acks.pop_front().unwrap();
    sim.handle(Event::Ack(ack));
    assert_eq!(sim.session.windows_in_flight(), Some(&[3, 4][..]), "the next batch follows");
}

#[test]
fn backoff_grows_to_its_ceiling_with_jitter_and_resets_when_a_session_comes_up() {
    let mut sim = Sim::new(config(), restored(None));
    sim.handle(Event::Lost("reset by peer".into()));
    sim.reachable = false;
    for _ in 0..10 {
        sim.advance();
    }
    let waits: Vec<Duration> = sim
        .log
        .iter()
        .filter_map(|a| match a {
            Action::Disconnected { wait, .. } => Some(*wait),
            _ => None,
        })
        .collect();
    assert_eq!(waits.len(), 11);
    assert_eq!(sim.session.failures(), 11);
    for (n, wait) in waits.iter().enumerate() {
        let ceiling = BASE.saturating_mul(1 << (n + 1)).min(Duration::from_secs(60));
        assert!(*wait <= ceiling, "wait {n}: {wait:?} above {ceiling:?}");
    }
    assert!(waits[7..].iter().any(|w| *w > Duration::from_secs(8)), "grew: {waits:?}");
    assert!(waits.windows(2).any(|w| w[0] != w[1]), "jittered: {waits:?}");
    // The same seed draws the same waits.
    let mut again = Backoff::new(Duration::from_secs(60), 7);
    assert_eq!((0..11).map(|_| again.failed()).collect::<Vec<_>>(), waits);

    sim.reachable = true;
    sim.advance();
    assert!(sim.session.established());
    assert_eq!(sim.session.failures(), 0);
    sim.handle(Event::Lost("again".into()));
    let Some(Action::Disconnected { wait, .. }) =
        sim.log.iter().rev().find(|a| matches!(a, Action::Disconnected { .. }))
    else {
        panic!()
    };
    assert!(*wait <= Duration::from_secs(1), "a fresh failure waits at most 1 s: {wait:?}");
}

#[test]
fn a_certificate_is_renewed_in_the_last_third_of_its_lifetime_and_unanswered_asks_wait() {
    // The end-to-end test's 9-second certificate, in simulated time.
    let mut sim = Sim::new(config(), restored(Some(validity(START, 9))));
    let is_renew = |a: &Action| matches!(a, Action::Renew);
    sim.run_for(Duration::from_millis(5_900));
    assert_eq!(sim.count(is_renew), 0, "two thirds of the lifetime are left");
    sim.run_for(Duration::from_millis(400));
    assert_eq!(sim.count(is_renew), 1, "asked at the first heartbeat past 6 s");
    assert!(sim.session.renewing());
    // Unanswered: asked again only after the retry interval.
    sim.run_for(Duration::from_secs(59));
    assert_eq!(sim.count(is_renew), 1);
    sim.run_for(Duration::from_secs(2));
    assert_eq!(sim.count(is_renew), 2);
    // Answered: installed, and the new certificate is not renewed before its own time.
    sim.handle(Event::Renewed { certificate_der: vec![1], expires: Timestamp::from_unix(0) });
    assert!(matches!(sim.log.last(), Some(Action::InstallCertificate { .. })));
    let issued = Timestamp::from_system(sim.now.wall).unix();
    sim.handle(Event::Certificate(Some(validity(issued, 9))));
    // Issued at second 67 (the wall time truncated): due at 73, reached 5.7 s later.
    sim.run_for(Duration::from_millis(5_500));
    assert_eq!(sim.count(is_renew), 2);
    sim.run_for(Duration::from_millis(400));
    assert_eq!(sim.count(is_renew), 3);
}

#[test]
fn a_certificate_that_always_looks_spent_is_asked_for_at_most_once_a_heartbeat() {
    // An agent clock far ahead: every certificate looks expired on arrival.
    let mut sim = Sim::new(config(), restored(Some(validity(START - 100_000, 9))));
    for _ in 0..10 {
        sim.advance();
        if sim.session.renewing() {
            sim.handle(Event::Renewed {
                certificate_der: vec![],
                expires: Timestamp::from_unix(0),
            });
        }
    }
    assert_eq!(sim.count(|a| matches!(a, Action::Renew)), 10);
    assert_eq!(sim.count(|a| matches!(a, Action::SendReport)), 10);
}

#[test]
fn no_renewal_without_a_session_or_a_readable_certificate() {
    let mut sim = Sim::new(config(), restored(None));
    sim.run_for(Duration::from_secs(120));
    assert_eq!(sim.count(|a| matches!(a, Action::Renew)), 0);
    let mut sim = Sim::new(config(), restored(Some(validity(START - 100, 9))));
    sim.reachable = false;
    sim.handle(Event::Lost("down".into()));
    sim.run_for(Duration::from_secs(120));
    assert_eq!(sim.count(|a| matches!(a, Action::Renew)), 0, "renewal rides the session");
}

struct Signer {
    trust: TrustRoot,
    key: SigningKey,
}

impl Signer {
    fn new() -> Self {
        let root = [key()];
        let signing = key();
        let trust = RootSpec {
            version: 1,
            region: "eu-west-1",
            expires: Timestamp::from_unix(START + 100_000),
            root_keys: &root,
            root_threshold: 1,
            signing_keys: &[signing.public()],
            signing_threshold: 1,
        }
        .sign(&[])
        .unwrap();
        Self { trust, key: signing }
    }

    fn doc(version: u64, bundle: u8) -> DesiredState {
        DesiredState {
            agent: "agent-1".into(),
            region: "eu-west-1".into(),
            version,
            issued: Timestamp::from_unix(START),
            expires: Timestamp::from_unix(START + 3_600),
            bundles: vec![DesiredBundle {
                name: "fault".into(),
                version: u64::from(bundle),
                manifest_sha256: Sha256([bundle; 32]),
                bundle_sha256: Sha256([bundle; 32]),
                size: 10,
                recipe_sha256: Sha256([bundle; 32]),
                activate: true,
            }],
            jobs: vec![],
            rollouts: vec![],
        }
    }

    fn event(&self, doc: &DesiredState) -> Event {
        Event::Desired { signed: doc.sign(&[&self.key]), trust: Ok(self.trust.clone()) }
    }
}

fn applies(sim: &Sim) -> Vec<u64> {
    sim.log
        .iter()
        .filter_map(|a| match a {
            Action::Apply(doc) => Some(doc.version),
            _ => None,
        })
        .collect()
}

fn applied(ok: bool) -> Event {
    Event::Applied { ok, new_jobs: 0, problems: vec![] }
}

#[test]
fn documents_arriving_out_of_order_only_ever_raise_the_version_and_the_latest_wins() {
    let signer = Signer::new();
    let mut sim = Sim::new(config(), restored(None));
    sim.handle(signer.event(&Signer::doc(2, 1)));
    assert_eq!(sim.session.accepted(), Some(2));
    assert_eq!(applies(&sim), [2]);
    // While 2 is applied, 4 then 3 then 5 arrive: 3 is refused, 5 replaces 4.
    sim.handle(signer.event(&Signer::doc(4, 2)));
    sim.handle(signer.event(&Signer::doc(3, 3)));
    sim.handle(signer.event(&Signer::doc(5, 4)));
    assert_eq!(sim.session.accepted(), Some(5));
    let errors: Vec<_> = sim.session.errors().cloned().collect();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("version 3 is not newer than the accepted version 4"), "{errors:?}");
    assert_eq!(applies(&sim), [2], "one at a time");
    sim.handle(applied(true));
    assert_eq!(sim.session.applied(), Some(2));
    assert_eq!(sim.session.errors().len(), 0, "a document applied in full clears problems");
    assert_eq!(applies(&sim), [2, 5], "4 was overtaken");
    assert!(sim.log.contains(&Action::SendReport));
    sim.handle(applied(false));
    assert_eq!(sim.session.applied(), Some(2), "5 failed somewhere: not reported as applied");
    // The very bytes of 5 again (a new session's first message) are applied again; a
    // different document of version 5 is refused.
    sim.handle(signer.event(&Signer::doc(5, 4)));
    assert_eq!(applies(&sim), [2, 5, 5]);
    sim.handle(applied(true));
    sim.handle(signer.event(&Signer::doc(5, 9)));
    assert_eq!(applies(&sim), [2, 5, 5]);
    assert!(sim.session.errors().any(|e| e.contains("not newer")));
    assert_eq!(sim.count(|a| matches!(a, Action::Record { .. })), 3, "2, 4 and 5 recorded");
}

#[test]
fn refused_documents_change_nothing() {
    let signer = Signer::new();
    let mut sim = Sim::new(config(), restored(None));
    let check = |sim: &mut Sim, event: Event, why: &str| {
        sim.handle(event);
        assert_eq!(sim.session.accepted(), None);
        assert!(applies(sim).is_empty());
        let last = sim.session.errors().last().unwrap().clone();
        assert!(last.contains(why), "{last}");
    };
    let mut expired = Signer::doc(3, 1);
    expired.expires = Timestamp::from_unix(START);
    check(&mut sim, signer.event(&expired), "expired");
    let mut other = Signer::doc(3, 1);
    other.agent = "agent-2".into();
    check(&mut sim, signer.event(&other), "for agent");
    let forged = Event::Desired {
        signed: Signer::doc(3, 1).sign(&[&key()]),
        trust: Ok(signer.trust.clone()),
    };
    check(&mut sim, forged, "signature");
    let untrusted = Event::Desired {
        signed: Signer::doc(3, 1).sign(&[&signer.key]),
        trust: Err("no trust root".into()),
    };
    check(&mut sim, untrusted, "no trust root");
    // Not recorded, not accepted: the same document is taken once the store writes.
    sim.record_fails = true;
    check(&mut sim, signer.event(&Signer::doc(3, 1)), "disk full");
    sim.record_fails = false;
    sim.handle(signer.event(&Signer::doc(3, 1)));
    assert_eq!(sim.session.accepted(), Some(3));
    assert_eq!(applies(&sim), [3]);
}

#[test]
fn a_session_lost_during_an_apply_abandons_it_and_the_next_session_applies_again() {
    let signer = Signer::new();
    let mut sim = Sim::new(config(), restored(None));
    let doc = Signer::doc(2, 1);
    sim.handle(signer.event(&doc));
    sim.handle(Event::Lost("timed out".into()));
    sim.handle(applied(true));
    assert_eq!(sim.session.applied(), None, "an abandoned apply's end counts for nothing");
    sim.advance();
    assert!(sim.session.established());
    sim.handle(signer.event(&doc));
    assert_eq!(applies(&sim), [2, 2]);
    sim.handle(applied(true));
    assert_eq!(sim.session.applied(), Some(2));
}

#[test]
fn restored_acceptance_refuses_replays_after_a_restart() {
    let signer = Signer::new();
    let old = Signer::doc(4, 1);
    let mut restored = restored(None);
    restored.accepted = Some((4, serde_json::to_vec(&old).unwrap()));
    let mut sim = Sim::new(config(), restored);
    sim.handle(signer.event(&Signer::doc(3, 1)));
    assert!(applies(&sim).is_empty());
    sim.handle(signer.event(&old));
    assert_eq!(applies(&sim), [4], "the accepted document, sent again, is applied");
    assert_eq!(sim.count(|a| matches!(a, Action::Record { .. })), 0);
}

fn job(id: &str) -> DesiredJob {
    DesiredJob {
        id: id.into(),
        job: Job {
            model: "fault".into(),
            version: Some(1),
            data: DataSource {
                file: "/srv/labels.csv".into(),
                label: "label".into(),
                features: None,
                entity: None,
            },
            hyperparameters: Hyperparameters::default(),
            gate: Gate::default(),
            engine: TrainEngine::Cpu,
        },
        share_weights: false,
    }
}

#[test]
fn jobs_run_one_at_a_time_after_recovery_and_go_on_while_disconnected() {
    let signer = Signer::new();
    let starts = |sim: &Sim| sim.count(|a| matches!(a, Action::StartNextJob));
    let mut sim = Sim::new(config(), restored(None));
    assert_eq!(sim.log[..2], [Action::RecoverJobs, connect("control.test:7443", 15)]);
    // Recovery answered, the store had nothing pending.
    assert_eq!(starts(&sim), 1);
    sim.handle(Event::JobStarted(None));
    let mut doc = Signer::doc(2, 1);
    doc.jobs = vec![job("tune-1")];
    sim.handle(signer.event(&doc));
    sim.handle(Event::Applied { ok: true, new_jobs: 1, problems: vec![] });
    assert_eq!(sim.session.jobs(), ["tune-1"]);
    assert_eq!(starts(&sim), 2);
    sim.handle(Event::JobStarted(Some("tune-1".into())));
    // A second document queues another job while the first runs: it waits.
    let mut doc = Signer::doc(3, 1);
    doc.jobs = vec![job("tune-1"), job("tune-2")];
    sim.handle(signer.event(&doc));
    sim.handle(Event::Applied { ok: true, new_jobs: 1, problems: vec![] });
    assert_eq!(starts(&sim), 2, "one job at a time");
    // The connection drops; the first job ends while the agent is disconnected.
    sim.reachable = false;
    sim.handle(Event::Lost("down".into()));
    sim.handle(Event::JobFinished("tune-1".into()));
    assert!(!sim.session.established());
    assert_eq!(starts(&sim), 3, "the next job starts without a session");
    sim.handle(Event::JobStarted(Some("tune-2".into())));
    assert_eq!(sim.session.running_job(), Some("tune-2"));
    assert_eq!(sim.session.jobs(), ["tune-1", "tune-2"], "reports still cover both");
    sim.handle(Event::JobFinished("tune-2".into()));
    sim.handle(Event::JobStarted(None));
    assert_eq!(sim.session.running_job(), None);
}

#[test]
fn jobs_wait_for_the_recovery_of_interrupted_ones() {
    let mut session = Session::new(config(), restored(None));
    let now = Now { elapsed: Duration::ZERO, wall: Timestamp::from_unix(START).to_system() };
    assert_eq!(session.poll(), Some(Action::RecoverJobs));
    assert_eq!(session.poll(), Some(connect("control.test:7443", 15)));
    session.handle(Event::Applied { ok: true, new_jobs: 3, problems: vec![] }, now);
    session.handle(Event::JobFinished("x".into()), now);
    assert_eq!(session.poll(), None, "nothing starts before recovery");
    session.handle(Event::JobsRecovered, now);
    assert_eq!(session.poll(), Some(Action::StartNextJob));
}

#[test]
fn heartbeats_report_and_resend_audit_lines_and_a_rollback_is_reported_at_once() {
    let mut sim = Sim::new(config(), restored(None));
    sim.handle(Event::RolledBack);
    assert_eq!(sim.count(|a| matches!(a, Action::SendReport)), 1);
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.count(|a| matches!(a, Action::SendReport)), 6);
    // Audit lines go at every heartbeat while none are in flight; a batch in flight is
    // sent again only after the acknowledgement timeout, and an acknowledgement sends
    // the next at once.
    let audits = |sim: &Sim| sim.count(|a| matches!(a, Action::SendAudit));
    assert_eq!(audits(&sim), 5);
    sim.handle(Event::AuditSent(Some(9)));
    sim.run_for(Duration::from_secs(30));
    assert_eq!(audits(&sim), 5);
    sim.run_for(Duration::from_millis(300));
    assert_eq!(audits(&sim), 6, "sent again at the first heartbeat past 30 s");
    sim.handle(Event::AuditAck(9));
    assert_eq!(sim.log[sim.log.len() - 2..], [Action::AuditShipped(9), Action::SendAudit]);
    // Problems are kept for reports, the latest eight.
    for n in 0..10 {
        sim.handle(Event::Problem(format!("problem {n}")));
    }
    let errors: Vec<_> = sim.session.errors().cloned().collect();
    assert_eq!(errors.first().map(String::as_str), Some("problem 2"));
    assert_eq!(errors.len(), MAX_ERRORS);
}

#[test]
fn a_document_arriving_while_another_is_recorded_is_judged_after_it() {
    let signer = Signer::new();
    let now = Now { elapsed: Duration::ZERO, wall: Timestamp::from_unix(START).to_system() };
    let mut session = Session::new(config(), restored(None));
    while session.poll().is_some() {}
    session.handle(Event::Connected, now);
    while session.poll().is_some() {}
    session.handle(signer.event(&Signer::doc(2, 1)), now);
    assert!(matches!(session.poll(), Some(Action::Record { doc, .. }) if doc.version == 2));
    // Before the store answers, 3 arrives, then 2 again: both wait for the recording.
    session.handle(signer.event(&Signer::doc(3, 1)), now);
    session.handle(signer.event(&Signer::doc(2, 1)), now);
    assert_eq!(session.poll(), None);
    session.handle(Event::Recorded, now);
    assert!(matches!(session.poll(), Some(Action::Apply(doc)) if doc.version == 2));
    assert!(matches!(session.poll(), Some(Action::Record { doc, .. }) if doc.version == 3));
    // The held 2 waits for 3's recording too.
    assert_eq!(session.poll(), None);
    session.handle(Event::RecordFailed("disk full".into()), now);
    assert!(matches!(session.poll(), Some(Action::Problem(p)) if p.contains("disk full")));
    assert_eq!(session.accepted(), Some(2), "3 was not recorded: 2 stays accepted");
    // Then 2, the accepted bytes again, is applied again after the apply under way.
    assert_eq!(session.poll(), None);
    session.handle(Event::Applied { ok: true, new_jobs: 0, problems: vec![] }, now);
    assert_eq!(session.poll(), Some(Action::SendReport));
    assert!(matches!(session.poll(), Some(Action::Apply(doc)) if doc.version == 2));
}

/// A session on `addresses` with `seed`.
fn with_addresses(addresses: &[&str], seed: u64) -> Sim {
    let restored = Restored {
        addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
        seed,
        ..restored(None)
    };
    Sim::new(config(), restored)
}

/// The addresses dialled, in order, and the waits drawn after each failure.
fn dialled(sim: &Sim) -> (Vec<String>, Vec<Duration>) {
    let mut addresses = Vec::new();
    let mut waits = Vec::new();
    for action in &sim.log {
        match action {
            Action::Connect { address, .. } => addresses.push(address.clone()),
            Action::Disconnected { wait, .. } => waits.push(*wait),
            _ => {}
        }
    }
    (addresses, waits)
}

#[test]
fn a_dead_first_address_costs_one_quick_try_and_the_next_one_is_dialled() {
    // Whichever address the seed starts at, that one is dead.
    for seed in 0..20 {
        let mut sim = with_addresses(&["a:7443", "b:7443", "c:7443"], seed);
        let Some(Action::Connect { address, timeout }) = sim.log.get(1).cloned() else {
            panic!("{:?}", sim.log)
        };
        assert_eq!(timeout, Duration::from_secs(5), "several addresses: the failover timeout");
        let dead = address;
        sim.dead.insert(dead.clone());
        sim.handle(Event::Lost("handshake timed out".into()));
        let (_, waits) = dialled(&sim);
        assert_eq!(waits.len(), 1);
        assert!(waits[0] <= BASE, "seed {seed}: within a round at most {BASE:?}: {waits:?}");
        assert_eq!(sim.session.failures(), 0, "no round has failed");
        assert!(sim.advance());
        assert!(sim.session.established(), "seed {seed}: {:?}", sim.log);
        let (addresses, _) = dialled(&sim);
        assert_eq!(addresses.len(), 2);
        assert_ne!(addresses[1], dead, "the next address, not the dead one again");
        assert_eq!(sim.session.address(), addresses[1]);
        assert_eq!(sim.count(|a| matches!(a, Action::Resolve)), 0, "no round ended");
    }
}

#[test]
fn a_session_lost_moves_on_to_the_next_address() {
    let mut sim = with_addresses(&["a:7443", "b:7443"], 11);
    assert!(sim.session.established());
    let first = sim.session.address().to_owned();
    // The replica goes away: the next attempt goes to the other one, soon.
    sim.dead.insert(first.clone());
    sim.handle(Event::Lost("control plane shutting down".into()));
    assert!(sim.advance());
    assert!(sim.session.established());
    assert_ne!(sim.session.address(), first);
    let (addresses, waits) = dialled(&sim);
    assert_eq!(addresses.len(), 2);
    assert!(waits[0] <= BASE, "{waits:?}");
}

#[test]
fn all_addresses_dead_backoff_grows_per_round_up_to_its_ceiling() {
    let max = Duration::from_secs(60);
    let mut sim = with_addresses(&["a:7443", "b:7443", "c:7443"], 5);
    sim.reachable = false;
    sim.handle(Event::Lost("reset by peer".into()));
    for _ in 0..59 {
        assert!(sim.advance());
    }
    let (addresses, waits) = dialled(&sim);
    // The session that was up, then 59 attempts: 60 failures, 20 rounds.
    assert_eq!(addresses.len(), 60);
    assert_eq!(waits.len(), 60);
    assert_eq!(sim.session.failures(), 20, "20 rounds of 3 failed");
    assert_eq!(sim.count(|a| matches!(a, Action::Resolve)), 20, "names resolved once a round");
    // Each round tries every address once, in the list's order from where it started.
    for round in addresses.chunks(3) {
        let mut sorted = round.to_vec();
        sorted.sort();
        assert_eq!(sorted, ["a:7443", "b:7443", "c:7443"], "{addresses:?}");
    }
    for (n, wait) in waits.iter().enumerate() {
        // The first two failures of a round wait a quick jitter; the third, the round's
        // backoff, whose ceiling doubles per round up to max_backoff.
        let ceiling =
            if n % 3 == 2 { BASE.saturating_mul(1 << (n / 3 + 1).min(16)).min(max) } else { BASE };
        assert!(*wait <= ceiling, "wait {n}: {wait:?} above {ceiling:?}");
    }
    let round_waits: Vec<Duration> = waits.iter().skip(2).step_by(3).copied().collect();
    assert!(round_waits[10..].iter().any(|w| *w > Duration::from_secs(8)), "grew: {waits:?}");
    assert!(round_waits.iter().all(|w| *w <= max), "bounded: {round_waits:?}");
    assert!(waits.windows(2).any(|w| w[0] != w[1]), "jittered: {waits:?}");

    // One address back: the session comes up and the next failure is a quick one again.
    sim.reachable = true;
    sim.dead = ["a:7443", "c:7443"].iter().map(|a| (*a).to_owned()).collect();
    while !sim.session.established() {
        assert!(sim.advance());
    }
    assert_eq!(sim.session.address(), "b:7443");
    assert_eq!(sim.session.failures(), 0);
    sim.handle(Event::Lost("again".into()));
    let Some(Action::Disconnected { wait, .. }) =
        sim.log.iter().rev().find(|a| matches!(a, Action::Disconnected { .. }))
    else {
        panic!()
    };
    assert!(*wait <= BASE, "{wait:?}");
}

#[test]
fn agents_with_different_seeds_spread_over_the_addresses() {
    let replicas = ["a:7443", "b:7443", "c:7443"];
    let mut per_replica = [0usize; 3];
    for seed in 0..300 {
        let sim = with_addresses(&replicas, seed);
        assert!(sim.session.established());
        let at = replicas.iter().position(|r| *r == sim.session.address()).unwrap();
        per_replica[at] += 1;
    }
    // 300 draws over three: each gets far more than a few (expected 100 each).
    assert!(per_replica.iter().all(|n| *n >= 60), "{per_replica:?}");
    // The same seed, the same choice.
    assert_eq!(
        with_addresses(&replicas, 42).session.address(),
        with_addresses(&replicas, 42).session.address()
    );
}

#[test]
fn one_address_keeps_the_long_connect_timeout_and_new_lists_keep_the_current_address() {
    let sim = with_addresses(&["only:7443"], 1);
    assert_eq!(sim.log[1], connect("only:7443", 15));
    let mut sim = with_addresses(&["a:7443", "b:7443"], 9);
    let current = sim.session.address().to_owned();
    sim.handle(Event::Addresses(vec!["z:7443".into(), current.clone()]));
    assert_eq!(sim.session.address(), current);
    assert_eq!(sim.session.addresses(), ["z:7443".to_owned(), current]);
}
