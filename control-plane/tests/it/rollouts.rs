//! Rollouts on the control plane, on real SQLite files: starting one (and every refusal,
//! which stores nothing), the documents agents get, pause and resume re-timing the steps,
//! promote and abort, deployments frozen while one is under way, and the judgement over
//! the group's windows and the agents' reports: rollbacks with their reason (and a
//! webhook, whose notification outlives a refusal and a restart), a canary promoted at
//! its last step only when every guard holds.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use falaj_common::desired::{DesiredState, Expectation};
use falaj_common::keys::Sha256;
use falaj_common::metrics::{Counts, Feedback, MetricsWindow};
use falaj_common::protocol::{ActualState, SequencedWindow};
use falaj_common::rollout::{RolloutReport, Share, Strategy};
use falaj_common::sketch::LatencySketch;
use falaj_common::time::Timestamp;
use falaj_control::client::{AdminClient, ClientError};
use falaj_control::daemon::{ControlPlane, ServeConfig, ServeError};
use falaj_control::db::{self, BundleRow, Db, NewAgent, TokenRow};
use falaj_control::monitoring;
use falaj_control::outbox::{self, Webhooks};
use falaj_control::rollouts::{self, Action, RolloutState, StartRequest};
use falaj_control::state::Shared;
use rusqlite::Connection;

const GROUP: &str = "plant-a";
const MODEL: &str = "pumps";
const REGION: &str = "eu-west-1";
const T0: u64 = 1_800_000_000;

fn at(offset: u64) -> Timestamp {
    Timestamp::from_unix(T0 + offset)
}

/// Three versions of the model registered, `agents` enrolled in the group, version 1
/// deployed there.
fn seed(conn: &mut Connection, agents: &[&str], now: Timestamp) -> rusqlite::Result<()> {
    for v in 1..=3u64 {
        let hash = |what: &str| Sha256::of(format!("{what} {v}").as_bytes());
        db::insert_bundle(
            conn,
            &BundleRow {
                name: MODEL.into(),
                version: v,
                manifest_sha256: hash("manifest"),
                bundle_sha256: hash("bundle"),
                recipe_sha256: hash("recipe"),
                size: 1000,
                chunks: 1,
                pushed_at: now,
            },
        )?;
    }
    for agent in agents {
        let (token, secret) = (format!("token-{agent}"), Sha256::of(agent.as_bytes()));
        let expires = now.saturating_add(Duration::from_secs(3600));
        let row =
            TokenRow { id: token.clone(), group: GROUP.into(), region: REGION.into(), expires };
        db::insert_token(conn, &row, secret, now)?;
        let new = NewAgent {
            id: (*agent).to_owned(),
            hostname: format!("{agent}.local"),
            agent_version: "test".into(),
            serial: format!("serial-{agent}"),
            cert_expires: expires,
        };
        let token = db::TokenUse { token_id: token, secret_sha256: secret, csr_sha256: secret };
        db::enroll(conn, &token, REGION, &new, now)?.expect("the token enrolls");
    }
    db::deploy(conn, GROUP, MODEL, 1, now)
}

/// A window of `version`: `requests`, `errors`, each success taking `ms`, and feedback.
fn window(
    version: u64,
    start: Timestamp,
    requests: u64,
    errors: u64,
    ms: f64,
    feedback: Feedback,
) -> MetricsWindow {
    let mut latency = LatencySketch::default();
    for _ in 0..requests - errors {
        latency.record(ms * 1000.0);
    }
    MetricsWindow {
        model: MODEL.into(),
        version,
        start,
        seconds: 10,
        counts: Counts { requests, errors, latency, feedback, ..Counts::default() },
    }
}

fn store(conn: &mut Connection, agent: &str, seq: u64, w: MetricsWindow) {
    // Received as it closed: the control plane's clock agrees with the agent's.
    let now = w.start;
    let held = monitoring::Held::from([(w.model.clone(), w.version)]);
    let ingested =
        monitoring::insert_windows(conn, agent, &held, &[SequencedWindow { seq, window: w }], now)
            .unwrap();
    assert_eq!(ingested.stored, [0]);
}

fn labels(labelled: u64, correct: u64) -> Feedback {
    Feedback { labelled, correct, abs_error: 0.0 }
}

fn request(strategy: Strategy, candidate: u64, guards: &[&str]) -> StartRequest {
    StartRequest {
        group: GROUP.into(),
        model: MODEL.into(),
        candidate,
        strategy,
        steps: None,
        step_interval_seconds: None,
        split: None,
        mirror: None,
        guards: guards.iter().map(|g| (*g).to_owned()).collect(),
        min_requests: Some(100),
    }
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Rows of the rollouts table and rollout events.
fn stored(conn: &Connection) -> (i64, i64) {
    (
        count(conn, "SELECT COUNT(*) FROM rollouts"),
        count(conn, "SELECT COUNT(*) FROM events WHERE kind LIKE 'rollout.%'"),
    )
}

/// A database file with the group seeded at T0.
fn database(dir: &Path, agents: &[&str]) -> Db {
    let db = Db::open(&dir.join("control.db")).unwrap();
    db.call_sync(|c| seed(c, agents, at(0))).unwrap();
    db
}

/// Starts a rollout at `now` through the same function the API uses.
fn start(db: &Db, request: &StartRequest, now: Timestamp) -> rollouts::Rollout {
    let planned = request.plan().unwrap();
    db.call_sync(|c| {
        let tx = c.transaction()?;
        let started = rollouts::start(&tx, &planned, now)?.unwrap();
        tx.commit()?;
        Ok(started)
    })
    .unwrap()
}

fn act(db: &Db, action: Action, now: Timestamp) -> rollouts::Rollout {
    db.call_sync(|c| rollouts::act(c, GROUP, MODEL, action, rollouts::OPERATOR, now))
        .unwrap()
        .unwrap()
}

fn times(r: &rollouts::Rollout) -> Vec<(u64, f64)> {
    r.steps.iter().map(|s| (s.at.unix() - T0, s.share.percent())).collect()
}

#[test]
fn pause_cuts_the_steps_and_resume_re_times_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let db = database(dir.path(), &["agent-a"]);
    let mut canary = request(Strategy::Canary, 2, &["error_rate<0.02"]);
    canary.step_interval_seconds = Some(600);
    let started = start(&db, &canary, at(0));
    assert_eq!(times(&started), [(0, 5.0), (600, 25.0), (1200, 50.0), (1800, 100.0)]);

    let paused = act(&db, Action::Pause, at(700));
    assert_eq!(paused.state, RolloutState::Paused);
    assert_eq!(times(&paused), [(0, 5.0), (600, 25.0)]);
    assert_eq!(paused.share_at(at(5000)), Share::from_percent(25.0).unwrap());
    let err = db
        .call_sync(|c| rollouts::act(c, GROUP, MODEL, Action::Pause, "me", at(800)))
        .unwrap()
        .unwrap_err();
    assert_eq!(err.to_string(), "rollout ro-1 is paused; it cannot pause");

    let resumed = act(&db, Action::Resume, at(5000));
    assert_eq!(resumed.state, RolloutState::Running);
    assert_eq!(times(&resumed), [(0, 5.0), (600, 25.0), (5600, 50.0), (6200, 100.0)]);
    let events: Vec<String> = db
        .call_sync(|c| {
            let mut stmt =
                c.prepare("SELECT kind FROM events WHERE subject = 'ro-1' ORDER BY id")?;
            stmt.query_map([], |r| r.get(0))?.collect()
        })
        .unwrap();
    assert_eq!(events, ["rollout.start", "rollout.pause", "rollout.resume"]);
}

#[test]
fn promote_deploys_the_candidate_and_abort_keeps_the_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let db = database(dir.path(), &["agent-a"]);
    start(&db, &request(Strategy::Ab, 2, &[]), at(0));
    let promoted = act(&db, Action::Promote, at(10));
    assert_eq!((promoted.state, promoted.ended_at), (RolloutState::Promoted, Some(at(10))));
    assert_eq!(db.call_sync(|c| db::deployment(c, GROUP, MODEL)).unwrap(), Some(2));

    let second = start(&db, &request(Strategy::Shadow, 3, &["agreement>0.9"]), at(20));
    assert_eq!((second.id.as_str(), second.baseline), ("ro-2", 2));
    let aborted = act(&db, Action::Abort, at(30));
    assert_eq!(aborted.state, RolloutState::Aborted);
    assert_eq!(db.call_sync(|c| db::deployment(c, GROUP, MODEL)).unwrap(), Some(2));
    let err = db
        .call_sync(|c| rollouts::act(c, GROUP, MODEL, Action::Resume, "me", at(40)))
        .unwrap()
        .unwrap_err();
    assert_eq!(err.to_string(), "rollout ro-2 is aborted; it cannot resume");
}

/// Where [`judge`] records its notifications.
const HOOK: &str = "https://hooks.example.com/rollouts";

/// The notifications waiting in `db`'s outbox: (URL, body).
fn notified(db: &Db) -> Vec<(String, serde_json::Value)> {
    let waiting = db.call_sync(|c| outbox::pending(c, 100)).unwrap();
    waiting.into_iter().map(|p| (p.url, serde_json::from_slice(&p.body).unwrap())).collect()
}

/// Judges at `offset` seconds after T0, recording notifications to [`HOOK`].
fn judge(db: &Db, offset: u64) -> Vec<rollouts::Change> {
    let urls = [HOOK.to_owned()];
    let webhooks = Webhooks { urls: &urls, region: REGION };
    db.call_sync(|c| rollouts::evaluate_all(c, webhooks, at(offset))).unwrap().1
}

fn state(db: &Db, id: &str) -> rollouts::Rollout {
    db.call_sync(|c| rollouts::get(c, id)).unwrap().unwrap()
}

#[test]
fn a_failing_guard_over_the_group_windows_rolls_back_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let db = database(dir.path(), &["agent-a", "agent-b"]);
    let r = start(&db, &request(Strategy::Canary, 2, &["error_rate<0.02", "p99_ms<40"]), at(0));
    db.call_sync(|c| {
        // Before the rollout began: not counted.
        store(
            c,
            "agent-a",
            1,
            window(2, Timestamp::from_unix(T0 - 60), 1000, 900, 5.0, labels(0, 0)),
        );
        store(c, "agent-a", 2, window(1, at(0), 900, 1, 5.0, labels(0, 0)));
        // Two agents' candidate windows: 20 errors in 250 requests, 8%.
        store(c, "agent-a", 3, window(2, at(10), 150, 12, 5.0, labels(0, 0)));
        store(c, "agent-b", 1, window(2, at(10), 100, 8, 5.0, labels(0, 0)));
        Ok(())
    })
    .unwrap();
    let changes = judge(&db, 30);
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].by, "control plane");
    let after = state(&db, &r.id);
    assert_eq!(after.state, RolloutState::RolledBack);
    assert_eq!(
        after.reason.as_deref(),
        Some("control plane: error_rate<0.02 failed: 0.0800 >= 0.0200 (over 250)")
    );
    assert_eq!(db.call_sync(|c| db::deployment(c, GROUP, MODEL)).unwrap(), Some(1));
    let detail: String = db
        .call_sync(|c| {
            c.query_row("SELECT detail FROM events WHERE kind = 'rollout.rollback'", [], |r| {
                r.get(0)
            })
        })
        .unwrap();
    let detail: serde_json::Value = serde_json::from_str(&detail).unwrap();
    assert_eq!(
        (detail["by"].as_str(), detail["candidate"].as_u64()),
        (Some("control plane"), Some(2))
    );
    assert!(judge(&db, 60).is_empty(), "a rollout ends once");
}

#[test]
fn an_agent_that_rolled_back_rolls_the_rollout_back_for_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let db = database(dir.path(), &["agent-a", "agent-b"]);
    let r = start(&db, &request(Strategy::Ab, 2, &["p99_ms<40"]), at(0));
    let report = |rolled_back: bool| ActualState {
        desired_version: Some(4),
        rollouts: vec![RolloutReport {
            id: r.id.clone(),
            step: Some(0),
            rolled_back,
            reason: rolled_back.then(|| "p99_ms<40 failed: 52.0000 >= 40.0000 (over 220)".into()),
            at: rolled_back.then(|| at(15)),
        }],
        ..ActualState::default()
    };
    let seen = vec![
        ("agent-a".to_owned(), at(16), Some(report(false))),
        ("agent-b".to_owned(), at(16), Some(report(true))),
    ];
    db.call_sync(move |c| db::record_seen(c, &seen)).unwrap();
    let changes = judge(&db, 20);
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].by, "agent agent-b");
    let after = state(&db, &r.id);
    assert_eq!(after.state, RolloutState::RolledBack);
    assert_eq!(
        after.reason.as_deref(),
        Some("agent agent-b: p99_ms<40 failed: 52.0000 >= 40.0000 (over 220)")
    );
    // The status shows each agent's account.
    let view = db.call_sync(|c| rollouts::view::build(c, after.clone(), at(30))).unwrap();
    let b = view.agents.iter().find(|a| a.id == "agent-b").unwrap();
    assert!(b.report.as_ref().unwrap().rolled_back);
    assert_eq!(b.applied_version, Some(4));
    assert_eq!((view.step, view.share), (None, Share::NONE));
}

#[test]
fn a_canary_is_promoted_at_its_last_step_only_when_every_guard_holds() {
    let dir = tempfile::tempdir().unwrap();
    let db = database(dir.path(), &["agent-a"]);
    let mut canary = request(Strategy::Canary, 2, &["error_rate<0.05", "accuracy>=baseline-0.05"]);
    canary.steps = Some(vec![10.0, 50.0, 100.0]);
    canary.step_interval_seconds = Some(60);
    let r = start(&db, &canary, at(0));
    db.call_sync(|c| {
        store(c, "agent-a", 1, window(1, at(0), 1000, 5, 5.0, labels(400, 360)));
        store(c, "agent-a", 2, window(2, at(10), 80, 1, 5.0, labels(80, 72)));
        Ok(())
    })
    .unwrap();
    // At the last step, but the candidate has 80 of the 100 requests needed: pending.
    assert!(judge(&db, 130).is_empty());
    let running = state(&db, &r.id);
    let view = db.call_sync(|c| rollouts::view::build(c, running, at(130))).unwrap();
    assert!(
        view.guard_results.iter().all(|g| g.verdict == falaj_common::rollout::Verdict::Pending)
    );
    assert_eq!((view.step, view.share), (Some(2), Share::ALL));

    db.call_sync(|c| {
        store(c, "agent-a", 3, window(2, at(20), 120, 2, 5.0, labels(120, 107)));
        Ok(())
    })
    .unwrap();
    // Every guard holds, but the last step has not begun.
    assert!(judge(&db, 100).is_empty());
    assert_eq!(state(&db, &r.id).state, RolloutState::Running);
    assert_eq!(notified(&db), []);
    let changes = judge(&db, 121);
    assert_eq!(changes.len(), 1);
    assert_eq!(state(&db, &r.id).state, RolloutState::Promoted);
    // The promotion's notification, recorded with it.
    let told = notified(&db);
    assert_eq!(told.len(), 1, "{told:?}");
    let (url, body) = &told[0];
    assert_eq!((url.as_str(), body["kind"].as_str()), (HOOK, Some("rollout.promoted")));
    assert_eq!(
        (body["rollout"].as_str(), body["candidate"].as_u64()),
        (Some(r.id.as_str()), Some(2))
    );
    assert_eq!((body["by"].as_str(), body["reason"].as_str()), (Some("control plane"), Some("")));
    assert_eq!(db.call_sync(|c| db::deployment(c, GROUP, MODEL)).unwrap(), Some(2));
    let promoted = state(&db, &r.id);
    let view = db.call_sync(|c| rollouts::view::build(c, promoted, at(200))).unwrap();
    assert_eq!(view.variants.candidate.figures.requests, 200);
    assert_eq!(view.variants.candidate.accuracy, Some(179.0 / 200.0));
    assert!(view.accuracy_p_value.is_some());
}

#[test]
fn an_ab_split_holding_its_guards_waits_for_a_person() {
    let dir = tempfile::tempdir().unwrap();
    let db = database(dir.path(), &["agent-a"]);
    let r = start(&db, &request(Strategy::Ab, 2, &["error_rate<0.05"]), at(0));
    db.call_sync(|c| {
        store(c, "agent-a", 1, window(1, at(0), 500, 0, 5.0, labels(0, 0)));
        store(c, "agent-a", 2, window(2, at(0), 500, 0, 5.0, labels(0, 0)));
        Ok(())
    })
    .unwrap();
    assert!(judge(&db, 100_000).is_empty());
    assert_eq!(state(&db, &r.id).state, RolloutState::Running);
}

// ---- through the daemon and its API ----

struct Daemon {
    shared: Arc<Shared>,
    client: AdminClient,
    admin: String,
    /// Dropped, it stops the control plane.
    stop: tokio::sync::oneshot::Sender<()>,
    running: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Daemon {
    /// Stops the control plane, as SIGTERM would, and waits until it has.
    async fn stop(self) {
        drop(self.stop);
        self.running.await.expect("the control plane's task").expect("it stops cleanly");
    }
}

async fn daemon(dir: &Path, configure: impl FnOnce(&mut ServeConfig)) -> Daemon {
    let mut config = ServeConfig::new(dir);
    config.quic = "127.0.0.1:0".parse().unwrap();
    config.admin = "127.0.0.1:0".parse().unwrap();
    config.region = Some(REGION.into());
    configure(&mut config);
    let control = ControlPlane::start(config).await.unwrap();
    let admin = format!("http://{}", control.admin_addr());
    let client = AdminClient::new(&admin, control.admin_token());
    let shared = control.shared();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(control.run(async { drop(stopped.await) }));
    Daemon { shared, client, admin, stop, running }
}

fn refused(result: Result<rollouts::RolloutView, ClientError>) -> (u16, String) {
    match result {
        Err(ClientError::Api { status, message, .. }) => (status, message),
        other => panic!("not refused: {other:?}"),
    }
}

async fn document(shared: &Shared, agent: &str) -> DesiredState {
    let now = SystemTime::now();
    let signed = shared.desired_for(agent, now).await.unwrap();
    let expect = Expectation { agent, region: REGION, accepted: None, now };
    signed.verify(&shared.keyring().trust, &expect).expect("agents accept the document")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_rollouts_reach_documents_and_refusals_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), |_| {}).await;
    let now = Timestamp::from_system(SystemTime::now());
    d.shared.db.call_sync(|c| seed(c, &["agent-a"], now)).unwrap();
    let before = document(&d.shared, "agent-a").await;
    assert_eq!(before.bundles.len(), 1);

    let counts = || d.shared.db.call_sync(|c| Ok(stored(c))).unwrap();
    let cases: Vec<(StartRequest, u16, &str)> = vec![
        (
            request(Strategy::Canary, 2, &["latency<40"]),
            422,
            "guard \"latency<40\": unknown metric",
        ),
        (
            StartRequest { steps: Some(vec![5.0, 120.0]), ..request(Strategy::Canary, 2, &[]) },
            422,
            "share \"120\" is not a percentage from 0 to 100",
        ),
        (request(Strategy::Canary, 9, &[]), 404, "no bundle pumps@9; push it first"),
        (
            StartRequest { group: "plant-b".into(), ..request(Strategy::Ab, 2, &[]) },
            409,
            "pumps is not deployed to group plant-b",
        ),
        (request(Strategy::Ab, 1, &[]), 409, "pumps@1 is already what group plant-a runs"),
    ];
    for (req, status, needle) in &cases {
        let (got, message) = refused(d.client.start_rollout(req).await);
        assert_eq!(got, *status, "{message}");
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        assert_eq!(counts(), (0, 0), "{needle}");
    }

    let mut canary = request(Strategy::Canary, 2, &["error_rate<0.02"]);
    canary.step_interval_seconds = Some(300);
    let view = d.client.start_rollout(&canary).await.unwrap();
    let r = &view.rollout;
    assert_eq!(
        (r.id.as_str(), r.baseline, r.candidate, r.state),
        ("ro-1", 1, 2, RolloutState::Running)
    );
    assert_eq!((view.step, view.share), (Some(0), Share::from_percent(5.0).unwrap()));
    assert_eq!(counts(), (1, 1));
    let (status, message) = refused(d.client.start_rollout(&request(Strategy::Ab, 3, &[])).await);
    assert_eq!(status, 409);
    assert_eq!(
        message,
        "rollout ro-1 of pumps in group plant-a is running; promote or abort it first"
    );
    assert_eq!(counts(), (1, 1));

    // The next document lists the baseline active, the candidate inactive, and the steps
    // at absolute times.
    let doc = document(&d.shared, "agent-a").await;
    assert!(doc.version > before.version);
    let listed: Vec<(u64, bool)> = doc.bundles.iter().map(|b| (b.version, b.activate)).collect();
    assert_eq!(listed, [(1, true), (2, false)]);
    assert_eq!(doc.rollouts.len(), 1);
    let spec = &doc.rollouts[0];
    assert_eq!((spec.id.as_str(), spec.baseline, spec.candidate), ("ro-1", 1, 2));
    let offsets: Vec<u64> = spec.steps.iter().map(|s| s.at.unix() - r.created_at.unix()).collect();
    assert_eq!(offsets, [0, 300, 600, 900]);
    assert_eq!(spec.guards, r.guards);
    assert_eq!(
        document(&d.shared, "agent-a").await.version,
        doc.version,
        "no change, no new document"
    );

    // Deployments of the model are frozen while it runs.
    for result in
        [d.client.deploy(GROUP, MODEL, 3).await.map(drop), d.client.undeploy(GROUP, MODEL).await]
    {
        let Err(ClientError::Api { status: 409, message, .. }) = result else {
            panic!("{result:?}")
        };
        assert_eq!(
            message,
            "rollout ro-1 of pumps in group plant-a is running: promote or abort it first"
        );
    }

    // Pausing changes the steps, so a new document; promoting ends the rollout.
    let paused = d.client.rollout_action(GROUP, MODEL, Action::Pause).await.unwrap();
    assert_eq!((paused.rollout.state, paused.rollout.steps.len()), (RolloutState::Paused, 1));
    let paused_doc = document(&d.shared, "agent-a").await;
    assert!(paused_doc.version > doc.version);
    assert_eq!(paused_doc.rollouts[0].steps.len(), 1);
    let (status, _) = refused(d.client.rollout_action(GROUP, MODEL, Action::Pause).await);
    assert_eq!(status, 409);
    let promoted = d.client.rollout_action(GROUP, MODEL, Action::Promote).await.unwrap();
    assert_eq!(promoted.rollout.state, RolloutState::Promoted);
    let done = document(&d.shared, "agent-a").await;
    let listed: Vec<(u64, bool)> = done.bundles.iter().map(|b| (b.version, b.activate)).collect();
    assert_eq!((listed, done.rollouts.len()), (vec![(2, true)], 0));
    let status = d.client.rollout(GROUP, MODEL).await.unwrap();
    assert_eq!(status.rollout.state, RolloutState::Promoted);
    let list = d.client.rollouts(Some(GROUP), None).await.unwrap();
    assert_eq!(list.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["ro-1"]);
    let (status, message) = refused(d.client.rollout("plant-b", MODEL).await);
    assert_eq!((status, message.as_str()), (404, "no rollout of pumps in group plant-b"));
}

/// Starts, through `d`, an A/B rollout guarded by `error_rate<0.02` in a group of one
/// agent, and stores windows where the candidate fails one request in ten: the next
/// judgement rolls it back.
async fn failing_rollout(d: &Daemon) {
    let now = Timestamp::from_system(SystemTime::now());
    d.shared.db.call_sync(|c| seed(c, &["agent-a"], now)).unwrap();
    let view =
        d.client.start_rollout(&request(Strategy::Ab, 2, &["error_rate<0.02"])).await.unwrap();
    let start = view.rollout.created_at;
    d.shared
        .db
        .call_sync(|c| {
            store(c, "agent-a", 1, window(1, start, 400, 0, 3.0, labels(0, 0)));
            store(c, "agent-a", 2, window(2, start, 400, 40, 3.0, labels(0, 0)));
            Ok(())
        })
        .unwrap();
}

/// A webhook receiver that answers 503 until `accept` is set, and reports every request:
/// its delivery header, whether it was taken, and its body.
async fn flaky_hook(
    accept: Arc<AtomicBool>,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<(String, bool, String)>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let hook = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| async move {
            let delivery = headers.get(outbox::DELIVERY_HEADER).and_then(|v| v.to_str().ok());
            let taken = accept.load(Ordering::SeqCst);
            let _ = tx.send((delivery.unwrap_or("").to_owned(), taken, body));
            if taken { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await });
    (url, rx)
}

/// A rollback's notification outlives a webhook that refuses it and the control plane's
/// restart: the control plane started again on the same data sends it, under the same
/// delivery id, until the webhook takes it, and then no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_notification_refused_until_a_restart_is_delivered_after_it() {
    let accept = Arc::new(AtomicBool::new(false));
    let (url, mut heard) = flaky_hook(Arc::clone(&accept)).await;
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(30), heard.recv())
            .await
            .expect("the webhook is called")
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let configure = |c: &mut ServeConfig| {
        c.alerts.webhooks = vec![url.clone()];
        c.rollouts.evaluate_every = Duration::from_millis(100);
    };
    let d = daemon(dir.path(), configure).await;
    failing_rollout(&d).await;

    // Refused, then refused again a second later, under one delivery id.
    let (delivery, taken, body) = next().await;
    assert!(!taken && delivery.len() == 32, "{delivery:?}");
    let again = next().await;
    assert_eq!(again, (delivery.clone(), false, body.clone()));
    // The first refusal was recorded before the second attempt was made; `alerts` shows
    // it waiting, and where it goes without the URL's path.
    let figures = metrics(&d.admin).await;
    assert_eq!(figures("falaj_webhook_notifications_pending"), Some(1.0));
    assert!(figures("falaj_webhook_attempts_failed_total") >= Some(1.0));
    let waiting = d.client.alerts(10).await.unwrap().notifications;
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    let to = url.trim_end_matches("/hook");
    assert_eq!(
        (waiting[0].what.as_str(), waiting[0].to.as_str()),
        ("rollout ro-1 rolled back", to)
    );
    assert!(waiting[0].attempts >= 1, "{waiting:?}");
    assert_eq!(waiting[0].last_error.as_deref(), Some("answered 503 Service Unavailable"));
    d.stop().await;

    accept.store(true, Ordering::SeqCst);
    let d = daemon(dir.path(), configure).await;
    let mut after = next().await;
    while !after.1 {
        // A refusal the first control plane did not get to record is made again.
        assert_eq!(after, (delivery.clone(), false, body.clone()));
        after = next().await;
    }
    assert_eq!(after, (delivery, true, body.clone()));
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (body["kind"].as_str(), body["rollout"].as_str()),
        (Some("rollout.rolled_back"), Some("ro-1"))
    );

    // Taken, it leaves the outbox and is not sent again.
    let mut delivered = d.shared.outbox.delivered.subscribe();
    tokio::time::timeout(Duration::from_secs(30), delivered.wait_for(|n| *n == 1))
        .await
        .expect("the delivery is recorded")
        .unwrap();
    assert_eq!(d.shared.db.run(|sql| outbox::pending(&sql, 100)).await.unwrap(), []);
    assert!(heard.try_recv().is_err(), "sent again after it was taken");
    let figures = metrics(&d.admin).await;
    assert_eq!(figures("falaj_webhook_notifications_pending"), Some(0.0));
    assert_eq!(figures("falaj_webhook_notifications_delivered_total"), Some(1.0));
    assert_eq!(figures("falaj_webhook_notifications_given_up_total"), Some(0.0));
    d.stop().await;
}

/// The control plane's `/metrics` at `admin`, as a lookup of unlabelled figures by name.
async fn metrics(admin: &str) -> impl Fn(&str) -> Option<f64> + use<> {
    let text = reqwest::get(format!("{admin}/metrics")).await.unwrap().text().await.unwrap();
    move |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_reaches_the_webhook_the_status_and_metrics() {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4);
    let hook = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(body).await;
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await });

    let dir = tempfile::tempdir().unwrap();
    let d = daemon(dir.path(), |c| {
        c.alerts.webhooks = vec![url];
        c.rollouts.evaluate_every = Duration::from_millis(100);
    })
    .await;
    failing_rollout(&d).await;

    let body = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.unwrap().unwrap();
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["kind"], "rollout.rolled_back");
    assert_eq!((body["rollout"].as_str(), body["group"].as_str()), (Some("ro-1"), Some(GROUP)));
    assert_eq!((body["baseline"].as_u64(), body["candidate"].as_u64()), (Some(1), Some(2)));
    assert_eq!(body["region"], REGION);
    let reason = "control plane: error_rate<0.02 failed: 0.1000 >= 0.0200 (over 400)";
    assert_eq!(body["reason"], reason);

    let status = d.client.rollout(GROUP, MODEL).await.unwrap();
    assert_eq!(
        (status.rollout.state, status.rollout.reason.as_deref()),
        (RolloutState::RolledBack, Some(reason))
    );
    assert_eq!(status.variants.candidate.figures.errors, 40);
    let doc = document(&d.shared, "agent-a").await;
    let listed: Vec<(u64, bool)> = doc.bundles.iter().map(|b| (b.version, b.activate)).collect();
    assert_eq!((listed, doc.rollouts.len()), (vec![(1, true)], 0));

    let text = reqwest::get(format!("{}/metrics", d.admin)).await.unwrap().text().await.unwrap();
    for line in [
        r#"falaj_rollout_state{rollout="ro-1",group="plant-a",model="pumps",state="rolled_back"} 1"#,
        r#"falaj_rollout_state{rollout="ro-1",group="plant-a",model="pumps",state="running"} 0"#,
        r#"falaj_rollout_share_percent{rollout="ro-1",group="plant-a",model="pumps"} 0.0"#,
        r#"falaj_rollout_requests_total{rollout="ro-1",group="plant-a",model="pumps",variant="candidate"} 400"#,
        r#"falaj_rollout_guard_failing{rollout="ro-1",group="plant-a",model="pumps",guard="error_rate<0.02"} 1"#,
        r#"falaj_rollout_guard_value{rollout="ro-1",group="plant-a",model="pumps",guard="error_rate<0.02"} 0.1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
    }
}
