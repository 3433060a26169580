//! Replicas killed in the middle of work (issue 21): two control-plane replicas on one
//! PostgreSQL and three agents, all of them connected to the first replica, which also
//! holds the region's lease. The second replica starts on an address that the agents
//! were enrolled with but found dead, so none of them is on it until the first dies.
//!
//! - **During a transfer**: a bundle of 24 MiB is deployed through the second replica
//!   while one of its chunks in the shared blobs directory is a named pipe with no
//!   writer, so the first replica's read of it blocks and every agent's transfer stops
//!   part way, with its fetch stream open. Once each agent holds every chunk before that
//!   one, the first replica is killed (SIGKILL) and the real chunk put back: every agent
//!   fails over, fetches only what it did not hold (its `falaj_transfer_bytes_total` counts
//!   the rest of the bundle, no more), installs and serves the model with the outputs
//!   computed here from its weights, and leaves no chunk file behind.
//! - **During a rollout**: a canary (30 %, 60 %, 100 % every 5 s) is started through the
//!   first replica, which judges it; it is killed while every agent runs a step before
//!   the last. The second takes the lease, judges the steps that follow and promotes the
//!   candidate once the agents' windows reach it; every agent converges on the candidate
//!   alone.
//! - **With a webhook notification pending**: a notification in the outbox (as a
//!   replica records one with its alert event or rollback), refused by its webhook when
//!   the lease holder sends it; that replica is killed, and the second, taking the lease,
//!   delivers it under the same delivery id, once.
//!
//! The first two check that every request is counted once in the windows the two replicas stored
//! and that no desired-state version is reused: every document either replica writes is
//! logged by a trigger the test adds to the database (the control plane keeps only each
//! agent's latest), and each agent's versions strictly rise across the replicas, the
//! agents ending on the last written.

use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use falaj_common::chunking::Recipe;
use serde_json::{Value, json};

use crate::replicas::{
    MODEL, Region, every_agent_runs, every_request_is_counted_once, lease, served_requests,
};
use crate::support::{self, ControlProcess, Process, enroll_and_serve, ok, push_sample, s};
use crate::wait::eventually;

/// The big model's name.
const BIG: &str = "layered";
/// About how big it is.
const BIG_MIB: usize = 24;
/// The big model's input: one row of 256 features, all 0.5.
const BIG_INPUT: f32 = 0.5;

type Agents = Vec<(Process, SocketAddr)>;

/// A loopback UDP port held where nothing answers, for the second replica to start on
/// later: an agent that tries it first finds it dead and settles on the first replica.
fn hold_port() -> (UdpSocket, String) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = socket.local_addr().unwrap().to_string();
    (socket, address)
}

/// The region's first replica (which takes the lease, being alone), the desired-document
/// log, and three agents of group `edge` enrolled with its address and `second`'s (held,
/// dead), all connected to it and serving `MODEL@1`, 20 requests served by each.
async fn first_replica_and_fleet(region: &Region, second: &str) -> (ControlProcess, Agents) {
    let a = region.replica("a", "127.0.0.1:0", None);
    log_desired_documents(region).await;
    push_sample(&a, region.path(), MODEL, 1);
    a.ok(&["control", "deploy", &format!("{MODEL}@1"), "--group", "edge"]);
    let list = format!("{},{second}", a.quic);
    let agents: Agents = (0..3)
        .map(|i| enroll_and_serve(&a, &region.path().join(format!("agent-{i}")), &list))
        .collect();
    for (_, http) in &agents {
        let http = *http;
        eventually(Duration::from_secs(60), "version 1 is served", || async move {
            support::infer(http, MODEL).await == Some(1)
        })
        .await;
        for _ in 0..20 {
            assert_eq!(support::infer(http, MODEL).await, Some(1));
        }
    }
    eventually(Duration::from_secs(30), "the first replica holds the lease", || async {
        lease(&a).await == 1
    })
    .await;
    assert_eq!(connected(&a).await, 3, "every agent is on the first replica");
    (a, agents)
}

/// The agents with a live session on `replica`.
async fn connected(replica: &ControlProcess) -> i64 {
    support::prometheus_sum(&format!("{}/metrics", replica.url), "falaj_agents_connected").await
        as i64
}

/// The sum of `metric` on the agent at `http`.
async fn agent_metric(http: SocketAddr, metric: &str) -> i64 {
    support::prometheus_sum(&format!("http://{http}/metrics"), metric).await as i64
}

/// Adds a log of every desired-state document written (agent, version), in the order
/// written, to the region's database: a table in a schema of the test's own and a trigger
/// on the control plane's `desired`, which keeps only each agent's latest. Writes for one
/// agent hold its row locked (`db::desired_for_update`), so its rows log in commit order.
async fn log_desired_documents(region: &Region) {
    region
        .query(|client| {
            client
                .batch_execute(
                    "CREATE SCHEMA falaj_test;
                     CREATE TABLE falaj_test.desired_log (
                         id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                         agent_id TEXT NOT NULL,
                         version BIGINT NOT NULL);
                     CREATE FUNCTION falaj_test.log_desired() RETURNS trigger
                     LANGUAGE plpgsql AS $$
                     BEGIN
                         INSERT INTO falaj_test.desired_log (agent_id, version)
                         VALUES (NEW.agent_id, NEW.version);
                         RETURN NEW;
                     END $$;
                     CREATE TRIGGER falaj_test_log AFTER INSERT OR UPDATE ON desired
                     FOR EACH ROW EXECUTE FUNCTION falaj_test.log_desired();",
                )
                .unwrap();
        })
        .await;
}

/// Each agent's desired-state versions as written, in order, with the log's id of each.
async fn desired_documents(region: &Region) -> BTreeMap<String, Vec<(i64, i64)>> {
    let rows = region
        .query(|client| {
            client
                .query("SELECT id, agent_id, version FROM falaj_test.desired_log ORDER BY id", &[])
                .unwrap()
                .iter()
                .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1), r.get::<_, i64>(2)))
                .collect::<Vec<_>>()
        })
        .await;
    let mut by_agent: BTreeMap<String, Vec<(i64, i64)>> = BTreeMap::new();
    for (id, agent, version) in rows {
        by_agent.entry(agent).or_default().push((id, version));
    }
    by_agent
}

/// The log's last id: what was written before now.
async fn desired_log_mark(region: &Region) -> i64 {
    region
        .query(|client| {
            client
                .query_one("SELECT COALESCE(MAX(id), 0) FROM falaj_test.desired_log", &[])
                .unwrap()
                .get(0)
        })
        .await
}

/// No desired-state version was reused: each agent's versions strictly rise in the order
/// the replicas wrote them, every agent had documents from the first replica (written
/// before `mark`), with `after_mark` each had some from the second too, and the agents
/// applied the last written (`applied`, each agent's `falaj_desired_state_version`, as
/// a multiset: which agent is which is not known here).
fn versions_never_reused(
    written: &BTreeMap<String, Vec<(i64, i64)>>,
    mark: i64,
    after_mark: bool,
    applied: &[i64],
) {
    assert_eq!(written.len(), 3, "documents of three agents: {written:?}");
    for (agent, documents) in written {
        let versions: Vec<i64> = documents.iter().map(|(_, v)| *v).collect();
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "{agent}'s versions do not strictly rise: {versions:?}"
        );
        assert!(documents.iter().any(|(id, _)| *id <= mark), "{agent}: none before the kill");
        if after_mark {
            assert!(
                documents.iter().any(|(id, _)| *id > mark),
                "{agent}: none from the second replica: {documents:?}"
            );
        }
    }
    let mut last: Vec<i64> = written.values().filter_map(|d| d.last()).map(|(_, v)| *v).collect();
    last.sort_unstable();
    let mut applied = applied.to_vec();
    applied.sort_unstable();
    assert_eq!(applied, last, "the agents applied the last documents written");
}

/// The agents' applied desired-state versions.
async fn applied_versions(agents: &Agents) -> Vec<i64> {
    let mut versions = Vec::new();
    for (_, http) in agents {
        versions.push(agent_metric(*http, "falaj_desired_state_version").await);
    }
    versions
}

/// Writes the layered model ([`crate::layered`]) of about `BIG_MIB` MiB to `path` and
/// returns its outputs for the input of [`BIG_INPUT`]s, computed here from its weights.
fn big_model(path: &Path) -> Vec<f32> {
    use falaj_common::random::SeededRng;
    let hidden = BIG_MIB * 1024 * 1024 / 4 / 256;
    let mut rng = SeededRng::new(21);
    let w1: Vec<f32> = (0..256 * hidden).map(|_| rng.normal(0.0, 0.05) as f32).collect();
    let w2: Vec<f32> = (0..hidden * 10).map(|_| rng.normal(0.0, 0.05) as f32).collect();
    std::fs::write(path, crate::layered::layered_graph(BIG, &w1, &w2)).unwrap();
    let relu: Vec<f64> = w1
        .chunks(256)
        .map(|row| row.iter().map(|w| f64::from(*w) * f64::from(BIG_INPUT)).sum::<f64>().max(0.0))
        .collect();
    w2.chunks(hidden)
        .map(|row| row.iter().zip(&relu).map(|(w, r)| f64::from(*w) * r).sum::<f64>() as f32)
        .collect()
}

/// The version of the big model that answered at `http` and its outputs, if it did.
async fn infer_big(http: SocketAddr) -> Option<(u64, Vec<f32>)> {
    let body = json!({"inputs": [{"name": "sensors", "shape": [1, 256], "datatype": "FP32",
        "data": vec![BIG_INPUT; 256]}]});
    let response = reqwest::Client::new()
        .post(format!("http://{http}/v2/models/{BIG}/infer"))
        .json(&body)
        .send()
        .await
        .ok()?;
    let body: Value = response.json().await.ok()?;
    let version = body["model_version"].as_str()?.parse().ok()?;
    let data = body["outputs"][0]["data"].as_array()?;
    Some((version, data.iter().filter_map(|v| v.as_f64().map(|v| v as f32)).collect()))
}

/// The chunk files an agent holds (names: their SHA-256), whole ones only.
fn chunk_files(agent_dir: &Path) -> HashSet<String> {
    std::fs::read_dir(agent_dir.join("chunks"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str().map(str::to_owned))
                .filter(|name| name.len() == 64 && !name.contains('.'))
                .collect()
        })
        .unwrap_or_default()
}

/// Builds the big model into `BIG@1` with `replica`'s keys and pushes it through it;
/// returns the bundle and the model's expected outputs.
fn push_big(replica: &ControlProcess, work: &Path) -> (PathBuf, Vec<f32>) {
    let model = work.join("big.onnx");
    let expected = big_model(&model);
    let bundle = work.join(format!("{BIG}-1.falaj"));
    ok(&[
        "control",
        "bundle",
        "build",
        "--keys",
        s(&replica.data.join("keys")),
        "--model",
        s(&model),
        "--name",
        BIG,
        "--version",
        "1",
        "--out",
        s(&bundle),
    ]);
    let pushed = replica.ok(&["control", "bundle", "push", s(&bundle)]);
    assert!(pushed.contains(&format!("registered {BIG}@1")), "{pushed}");
    (bundle, expected)
}

/// A chunk in the middle of a bundle (one that occurs once in it) made a named pipe in
/// the shared blobs directory, which nobody writes: a replica that reads it waits for
/// ever, and so does the agent's fetch stream it was asked on. Agents fetch chunks in
/// recipe order, in batches on parallel streams, so every chunk before it arrives.
struct Gate {
    /// The blob's place in the shared directory, and where its real file waits.
    blob: PathBuf,
    kept: PathBuf,
    /// The chunks before it (hex), and their bytes, each distinct chunk once.
    before: HashSet<String>,
    before_bytes: i64,
}

impl Gate {
    fn close(recipe: &Recipe, blobs: &Path, work: &Path) -> Self {
        let hex: Vec<String> = recipe.chunks.iter().map(|c| c.sha256.to_string()).collect();
        let once = |sha: &String| hex.iter().filter(|h| *h == sha).count() == 1;
        let position =
            (hex.len() / 2..hex.len()).find(|&i| once(&hex[i])).expect("a chunk that occurs once");
        let mut before = HashSet::new();
        let mut before_bytes = 0;
        for (sha, chunk) in hex.iter().zip(&recipe.chunks).take(position) {
            if before.insert(sha.clone()) {
                before_bytes += i64::from(chunk.size);
            }
        }
        assert!(before.len() >= 10, "{} chunks before the gate", before.len());
        let blob = blobs.join(&hex[position][..2]).join(&hex[position]);
        let kept = work.join("gated-chunk");
        std::fs::rename(&blob, &kept).unwrap();
        rustix::fs::mkfifoat(rustix::fs::CWD, &blob, rustix::fs::Mode::from_raw_mode(0o644))
            .unwrap();
        Self { blob, kept, before, before_bytes }
    }

    /// Puts the real chunk back in place of the pipe. A read already waiting on the pipe
    /// stays waiting.
    fn open(&self) {
        std::fs::rename(&self.kept, &self.blob).unwrap();
    }
}

pub async fn a_replica_killed_during_a_transfer_leaves_agents_to_resume_it_on_the_other() {
    let Some(region) = Region::start("").await else { return };
    let work = region.path().to_owned();
    let (held, second) = hold_port();
    let (a, agents) = first_replica_and_fleet(&region, &second).await;
    drop(held);
    let b = region.replica("b", &second, Some(&a));
    assert_eq!(b.quic, second);

    let (bundle, expected) = push_big(&a, &work);
    let bytes = std::fs::read(&bundle).unwrap();
    let size = bytes.len() as i64;
    let gate = Gate::close(&Recipe::of(&bytes), &region.blobs(), &work);
    drop(bytes);

    let mut fetched_before = Vec::new();
    for (_, http) in &agents {
        fetched_before.push(agent_metric(*http, "falaj_transfer_bytes_total").await);
    }
    // Deployed through the second replica; the agents on the first get it from there.
    b.ok(&["control", "deploy", &format!("{BIG}@1"), "--group", "edge"]);
    for i in 0..agents.len() {
        let dir = work.join(format!("agent-{i}"));
        eventually(Duration::from_secs(60), "the chunks before the gate arrive", || {
            let held = chunk_files(&dir);
            let arrived = gate.before.iter().all(|c| held.contains(c));
            async move { arrived }
        })
        .await;
    }
    for (_, http) in &agents {
        assert_eq!(infer_big(*http).await, None, "mid-transfer, nothing serves {BIG}");
    }
    assert_eq!(connected(&a).await, 3, "the agents are still on the first replica");
    let mark = desired_log_mark(&region).await;

    // The first replica dies with every transfer half done; its read of the pipe dies
    // with it. The real chunk goes back before any agent can ask the second replica:
    // they notice the loss only at their connection's idle timeout.
    drop(a);
    gate.open();

    for (i, (_, http)) in agents.iter().enumerate() {
        let http = *http;
        eventually(Duration::from_secs(90), "the big model serves after the failover", || async {
            infer_big(http).await.is_some()
        })
        .await;
        let (version, outputs) = infer_big(http).await.unwrap();
        assert_eq!(version, 1);
        assert_eq!(outputs.len(), expected.len());
        for (got, want) in outputs.iter().zip(&expected) {
            assert!(
                (got - want).abs() <= 1e-3 * want.abs().max(1.0),
                "{outputs:?} != {expected:?}"
            );
        }
        // Resumed, not started again: what the agent fetched for this install is the
        // part of the bundle it did not hold when the first replica died.
        let fetched = agent_metric(http, "falaj_transfer_bytes_total").await - fetched_before[i];
        let held = gate.before_bytes;
        println!("agent-{i}: fetched {fetched} of {size} bytes after the failover, held {held}");
        assert!(
            fetched > 0 && fetched <= size - held,
            "agent-{i} fetched {fetched} bytes of {size} after holding {held}"
        );
        let left = chunk_files(&work.join(format!("agent-{i}")));
        assert!(left.is_empty(), "agent-{i} kept {} chunk files", left.len());
    }
    eventually(Duration::from_secs(10), "every agent is on the second replica", || async {
        connected(&b).await == 3
    })
    .await;
    every_agent_runs(&b, &format!("{BIG}@1")).await;

    let served = served_requests(&agents, MODEL, 1).await;
    assert!(served >= 60, "{served}");
    every_request_is_counted_once(&region, MODEL, 1, served).await;
    let written = desired_documents(&region).await;
    versions_never_reused(&written, mark, false, &applied_versions(&agents).await);

    for (agent, _) in agents {
        assert_eq!(agent.terminate(), Some(0));
    }
    assert_eq!(b.terminate(), Some(0));
    drop(region);
}

/// The requests to `MODEL` the test made, by the version that answered: once the
/// baseline is removed after the promotion, the agents' counters of it go with it.
#[derive(Clone, Default)]
struct Tally(Arc<Mutex<BTreeMap<u64, i64>>>);

impl Tally {
    /// One request to the agent at `http`, counted under the version that answered.
    async fn infer(&self, http: SocketAddr) -> Option<u64> {
        let version = support::infer(http, MODEL).await;
        if let Some(v) = version {
            *self.0.lock().unwrap().entry(v).or_default() += 1;
        }
        version
    }

    fn get(&self, version: u64) -> i64 {
        self.0.lock().unwrap().get(&version).copied().unwrap_or_default()
    }
}

/// Requests to `MODEL` on every agent, a round every 20 ms, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(agents: &Agents, tally: &Tally) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let https: Vec<SocketAddr> = agents.iter().map(|(_, http)| *http).collect();
        let (flag, tally) = (Arc::clone(&stop), tally.clone());
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(20));
            while !flag.load(Ordering::Relaxed) {
                every.tick().await;
                for http in &https {
                    tally.infer(*http).await;
                }
            }
        });
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
    }
}

/// The latest rollout of `MODEL` in `edge`, as `replica` shows it.
fn rollout_status(replica: &ControlProcess) -> Value {
    let text = replica.ok(&["control", "rollout", "status", MODEL, "--group", "edge", "--json"]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Starts a canary of `MODEL@2` in `edge` through `replica`: 30 %, 60 %, then 100 %,
/// every 5 s, promoted once the last step has begun and the candidate's error rate over
/// at least 20 requests is below 0.2.
fn start_canary(replica: &ControlProcess) {
    replica.ok(&[
        "control",
        "rollout",
        "start",
        &format!("{MODEL}@2"),
        "--group",
        "edge",
        "--strategy",
        "canary",
        "--steps",
        "30,60,100",
        "--step-interval",
        "5s",
        "--guard",
        "error_rate<0.2",
        "--min-requests",
        "20",
    ]);
}

/// The candidate's share (percent) on the agent at `http`, while it runs a rollout of
/// `MODEL`.
async fn share(http: SocketAddr) -> Option<u64> {
    let text = reqwest::get(format!("http://{http}/metrics")).await.ok()?.text().await.ok()?;
    text.lines()
        .find(|l| {
            l.starts_with("falaj_rollout_share_percent{")
                && l.contains(&format!("model=\"{MODEL}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|percent| percent as u64)
}

pub async fn a_replica_killed_during_a_rollout_leaves_the_other_to_finish_it() {
    let Some(region) = Region::start("[rollouts]\nevaluate_every = \"300ms\"\n").await else {
        return;
    };
    let (held, second) = hold_port();
    let (a, agents) = first_replica_and_fleet(&region, &second).await;
    push_sample(&a, region.path(), MODEL, 2);
    drop(held);
    let b = region.replica("b", &second, Some(&a));
    assert_eq!(b.quic, second);

    // Every request from here on is counted by the version that answered it.
    let served_before = served_requests(&agents, MODEL, 1).await;
    assert!(served_before >= 60, "{served_before}");
    let tally = Tally::default();
    let load = Load::start(&agents, &tally);
    start_canary(&a);
    for (_, http) in &agents {
        let http = *http;
        eventually(Duration::from_secs(30), "the agent runs the canary", || async move {
            matches!(share(http).await, Some(30 | 60))
        })
        .await;
    }
    // Mid-rollout on the replica that judges it: a step before the last in force.
    let status = rollout_status(&a);
    assert_eq!(status["state"], "running", "{status}");
    let step = status["step"].as_u64().expect("a step in force");
    assert!(step < 2, "{status}");
    let applied_before = applied_versions(&agents).await;
    let mark = desired_log_mark(&region).await;

    drop(a);

    // The second replica takes the lease and carries the rollout on: its steps advance
    // and, once the agents' windows reach it, it promotes the candidate.
    eventually(Duration::from_secs(30), "the second replica takes the lease", || async {
        lease(&b).await == 1
    })
    .await;
    let mut steps = vec![step];
    eventually(Duration::from_secs(90), "the second replica promotes the canary", || {
        let status = rollout_status(&b);
        if let Some(step) = status["step"].as_u64()
            && steps.last() != Some(&step)
        {
            steps.push(step);
        }
        let promoted = status["state"] == "promoted";
        async move { promoted }
    })
    .await;
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "steps seen: {steps:?}");
    for (_, http) in &agents {
        let http = *http;
        eventually(Duration::from_secs(30), "the agent serves the candidate alone", || {
            let tally = tally.clone();
            async move { share(http).await.is_none() && tally.infer(http).await == Some(2) }
        })
        .await;
        for _ in 0..20 {
            assert_eq!(tally.infer(http).await, Some(2));
        }
    }
    load.stop().await;
    eventually(Duration::from_secs(10), "every agent is on the second replica", || async {
        connected(&b).await == 3
    })
    .await;
    every_agent_runs(&b, &format!("{MODEL}@2")).await;

    // The candidate's counters stay: they agree with the test's count of its answers.
    assert_eq!(served_requests(&agents, MODEL, 2).await, tally.get(2));
    assert!(tally.get(1) > 0 && tally.get(2) >= 60, "{:?}", tally.0.lock().unwrap());
    every_request_is_counted_once(&region, MODEL, 1, served_before + tally.get(1)).await;
    every_request_is_counted_once(&region, MODEL, 2, tally.get(2)).await;
    let applied = applied_versions(&agents).await;
    let mut before = applied_before.clone();
    before.sort_unstable();
    let mut after = applied.clone();
    after.sort_unstable();
    assert!(before.iter().zip(&after).all(|(b, a)| b < a), "{applied_before:?} then {applied:?}");
    let written = desired_documents(&region).await;
    println!("documents written (log id, version), the kill after {mark}: {written:?}");
    versions_never_reused(&written, mark, true, &applied);

    for (agent, _) in agents {
        assert_eq!(agent.terminate(), Some(0));
    }
    assert_eq!(b.terminate(), Some(0));
    drop(region);
}

/// The pending notification's delivery id, as a replica would draw it.
const DELIVERY: &str = "0123456789abcdef0123456789abcdef";

/// A webhook receiver answering 503 until `accept` is set; each request's delivery header
/// and whether it was taken arrive on the channel.
async fn webhook(
    accept: Arc<AtomicBool>,
) -> (String, tokio::sync::mpsc::UnboundedReceiver<(String, bool)>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let hook = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| async move {
            let delivery = headers.get("falaj-delivery").and_then(|v| v.to_str().ok());
            let taken = accept.load(Ordering::SeqCst);
            let _ = tx.send((delivery.unwrap_or("").to_owned(), taken));
            if taken {
                axum::http::StatusCode::OK
            } else {
                axum::http::StatusCode::SERVICE_UNAVAILABLE
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await });
    (url, rx)
}

pub async fn a_replica_killed_with_a_notification_pending_leaves_it_to_the_other() {
    let accept = Arc::new(AtomicBool::new(false));
    let (url, mut heard) = webhook(Arc::clone(&accept)).await;
    let Some(region) = Region::start(&format!("[alerts]\nwebhooks = [\"{url}\"]\n")).await else {
        return;
    };
    let a = region.replica("a", "127.0.0.1:0", None);
    eventually(Duration::from_secs(30), "the first replica takes the lease", || async {
        lease(&a).await == 1
    })
    .await;
    let b = region.replica("b", "127.0.0.1:0", Some(&a));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let now = i64::try_from(now.as_secs()).unwrap();
    let inserted = region
        .query(move |c| {
            c.execute(
                "INSERT INTO outbox (delivery, url, body, what, recorded_at, attempts, next_at)
                 VALUES ($1, $2, $3, 'a test notification', $4, 0, $4)",
                &[&DELIVERY, &url, &b"{\"kind\":\"test\"}".to_vec(), &now],
            )
            .unwrap()
        })
        .await;
    assert_eq!(inserted, 1);
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(60), heard.recv())
            .await
            .expect("the webhook is called")
            .unwrap()
    };

    // The lease holder sends it, and is refused.
    assert_eq!(next().await, (DELIVERY.to_owned(), false));
    assert_eq!(lease(&b).await, 0);
    drop(a);
    accept.store(true, Ordering::SeqCst);

    // The second replica takes the lease and delivers it (after any refusal the first
    // made before it died).
    let mut after = next().await;
    while !after.1 {
        assert_eq!(after.0, DELIVERY);
        after = next().await;
    }
    assert_eq!(after.0, DELIVERY);
    assert_eq!(lease(&b).await, 1);
    eventually(Duration::from_secs(30), "the outbox is empty", || async {
        region
            .query(|c| c.query_one("SELECT COUNT(*) FROM outbox", &[]).unwrap().get::<_, i64>(0))
            .await
            == 0
    })
    .await;
    let delivered = format!("{}/metrics", b.url);
    let delivered =
        support::prometheus_sum(&delivered, "falaj_webhook_notifications_delivered_total");
    assert_eq!(delivered.await as i64, 1);
    assert!(heard.try_recv().is_err(), "sent again after it was taken");
}
