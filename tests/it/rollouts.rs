//! Progressive delivery as processes: a control plane and an agent started by their
//! command lines, rollouts driven by `falaj control rollout ...`, requests and feedback
//! over HTTP.
//!
//! - An A/B split of 10,000 distinct keys at 30 %, sticky across requests and across an
//!   agent killed with SIGKILL; ground truth joined by request id into per-variant
//!   accuracy; then a shadow rollout whose answers never reach clients and whose
//!   agreement figure is exact.
//! - A canary whose candidate fails its guard, rolled back by the agent while the
//!   control plane is down (and still after the agent is killed and restarted), which the
//!   control plane records when it returns; then a healthy canary that steps through its
//!   schedule while the control plane is down again, promoted once it returns.

// Stories from start to end read better than the same steps spread over helpers.
#![allow(clippy::too_many_lines)]

use crate::fleet;
use crate::support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use falaj_common::sample::{self, FEATURE_COUNT};
use falaj_control::sample::{INPUT, SampleOptions};
use serde_json::{Value, json};
use support::{ControlProcess, Process, ok, s};

const MODEL: &str = "fault";
const GROUP: &str = "edge";

/// A control plane process judging rollouts every 300 ms.
struct Control(ControlProcess);

impl std::ops::Deref for Control {
    type Target = ControlProcess;

    fn deref(&self) -> &ControlProcess {
        &self.0
    }
}

impl Control {
    fn start(data: &Path, quic: &str) -> Self {
        let config = data.with_extension("toml");
        std::fs::write(&config, "[rollouts]\nevaluate_every = \"300ms\"\n").unwrap();
        Self(ControlProcess::start(data, quic, &["--config", s(&config), "--heartbeat", "1s"]))
    }

    fn status(&self) -> Value {
        let text = self.ok(&["control", "rollout", "status", MODEL, "--group", GROUP, "--json"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// Builds `model` into a bundle of `MODEL@version` (with `reference` as its profile)
    /// and pushes it.
    fn push(&self, work: &Path, model: &Path, reference: Option<&Path>, version: u64) {
        let out = work.join(format!("{MODEL}-{version}.falaj"));
        let keys = self.data.join("keys");
        let version = version.to_string();
        let mut args = vec![
            "control",
            "bundle",
            "build",
            "--keys",
            s(&keys),
            "--model",
            s(model),
            "--name",
            MODEL,
            "--version",
            &version,
            "--out",
            s(&out),
        ];
        if let Some(reference) = reference {
            args.extend(["--reference", s(reference)]);
        }
        ok(&args);
        let pushed = self.ok(&["control", "bundle", "push", s(&out)]);
        assert!(pushed.contains(&format!("registered {MODEL}@{version}")), "{pushed}");
    }
}

/// Enrolls an agent in `GROUP` with a configuration of short windows and heartbeats.
fn enroll(control: &Control, work: &Path) -> (PathBuf, PathBuf) {
    let token = control.ok(&["control", "token", "create", "--group", GROUP, "--ttl", "10m"]);
    let dir = work.join("agent");
    let enrolled = ok(&[
        "agent",
        "enroll",
        "--control-plane",
        &control.quic,
        "--token",
        token.trim(),
        "--data-dir",
        s(&dir),
    ]);
    assert!(enrolled.contains(&format!("in group {GROUP}")), "{enrolled}");
    let config = work.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[metrics]\nwindow = \"300ms\"\n[control_plane]\nheartbeat = \"300ms\"\nmax_backoff = \"1s\"\n",
            s(&dir)
        ),
    )
    .unwrap();
    (dir, config)
}

/// `falaj agent serve` with `config`; its HTTP address.
fn serve(config: &Path) -> (Process, SocketAddr) {
    let mut agent =
        Process::start(&["agent", "serve", "--config", s(config), "--http", "127.0.0.1:0"]);
    let http = agent.wait_for_addr("serving the Open Inference Protocol");
    (agent, http)
}

/// The sample model trained with `seed`: its ONNX file and reference CSV.
fn sample_model(work: &Path, seed: u64) -> (PathBuf, PathBuf) {
    let made = falaj_control::sample::write(
        &work.join(format!("sample-{seed}")),
        &SampleOptions { rows: 4000, seed },
    )
    .unwrap();
    (made.model, made.reference)
}

fn request(row: &[f32], id: Option<&str>, key: Option<&str>) -> Value {
    let mut body = json!({"inputs": [{"name": INPUT, "shape": [1, FEATURE_COUNT], "datatype": "FP32", "data": row}]});
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    if let Some(key) = key {
        body["parameters"] = json!({"routing_key": key});
    }
    body
}

/// Posts `body` to `path`; the status and the JSON answer.
async fn post(
    client: &reqwest::Client,
    http: SocketAddr,
    path: &str,
    body: &Value,
) -> (u16, Value) {
    let response = client.post(format!("http://{http}{path}")).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The value of the first Prometheus sample named `name` whose labels contain `labels`.
async fn prometheus(http: SocketAddr, name: &str, labels: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{http}/metrics")).await.ok()?.text().await.ok()?;
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The predicted class of an answer.
fn label(answer: &Value) -> i64 {
    let outputs = answer["outputs"].as_array().unwrap();
    let label = outputs.iter().find(|o| o["name"] == "label").unwrap();
    label["data"][0].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ab_split_is_sticky_feedback_gives_accuracy_and_shadow_answers_stay_hidden() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let data = work.join("control");
    let control = Control::start(&data, "127.0.0.1:0");
    let (m1, r1) = sample_model(work, 7);
    let (m2, r2) = sample_model(work, 11);
    control.push(work, &m1, Some(&r1), 1);
    control.push(work, &m2, Some(&r2), 2);
    control.ok(&["control", "deploy", &format!("{MODEL}@1"), "--group", GROUP]);
    let (_, config) = enroll(&control, work);
    let (agent, http) = serve(&config);
    let client = reqwest::Client::new();
    let rows = std::sync::Arc::new(sample::generate(10_000, 99, &[]));
    let row = |i: usize| rows.features[i * FEATURE_COUNT..(i + 1) * FEATURE_COUNT].to_vec();
    fleet::eventually(Duration::from_secs(120), "version 1 is served", || async {
        post(&client, http, &format!("/v2/models/{MODEL}/infer"), &request(&row(0), None, None))
            .await
            .1["model_version"]
            == "1"
    })
    .await;

    // Refusals store nothing.
    let err = control.fails(
        &[
            "control",
            "rollout",
            "start",
            "fault@2",
            "--group",
            GROUP,
            "--strategy",
            "ab",
            "--guard",
            "latency<3",
        ],
        64,
    );
    assert!(err.contains("latency"), "{err}");
    let err = control.fails(
        &["control", "rollout", "start", "fault@9", "--group", GROUP, "--strategy", "ab"],
        78,
    );
    assert!(err.contains("fault@9"), "{err}");
    let listed = control.ok(&["control", "rollout", "list"]);
    assert!(!listed.contains("fault"), "nothing stored: {listed}");

    let started = control.ok(&[
        "control",
        "rollout",
        "start",
        "fault@2",
        "--group",
        GROUP,
        "--strategy",
        "ab",
        "--split",
        "30",
        "--guard",
        "error_rate<0.5",
        "--min-requests",
        "50",
    ]);
    assert!(started.contains("fault 1 -> 2"), "{started}");
    let second = control.fails(
        &["control", "rollout", "start", "fault@2", "--group", GROUP, "--strategy", "ab"],
        78,
    );
    assert!(second.contains("rollout"), "{second}");
    fleet::eventually(Duration::from_secs(60), "the agent splits traffic", || async {
        prometheus(http, "falaj_rollout_share_percent", "model=\"fault\"").await == Some(30.0)
    })
    .await;

    // 10,000 distinct keys, each request with an id; the truth of each row is known.
    let mut clients = tokio::task::JoinSet::new();
    for first in 0..8 {
        let (client, rows) = (client.clone(), std::sync::Arc::clone(&rows));
        clients.spawn(async move {
            let mut answers = Vec::new();
            for i in (first..10_000).step_by(8) {
                let row = &rows.features[i * FEATURE_COUNT..(i + 1) * FEATURE_COUNT];
                let body = request(row, Some(&format!("req-{i}")), Some(&format!("user-{i}")));
                let (status, answer) =
                    post(&client, http, &format!("/v2/models/{MODEL}/infer"), &body).await;
                assert_eq!(status, 200, "{answer}");
                answers.push((
                    i,
                    answer["model_version"].as_str().unwrap().to_owned(),
                    label(&answer),
                ));
            }
            answers
        });
    }
    let answers: Vec<(usize, String, i64)> =
        clients.join_all().await.into_iter().flatten().collect();
    let on_candidate = answers.iter().filter(|(_, v, _)| v == "2").count();
    assert!(
        (2800..=3200).contains(&on_candidate),
        "{on_candidate} of 10,000 keys on the candidate"
    );
    let version_of: HashMap<usize, String> =
        answers.iter().map(|(i, v, _)| (*i, v.clone())).collect();
    for i in 0..500 {
        let body = request(&row(i), None, Some(&format!("user-{i}")));
        let (_, answer) = post(&client, http, &format!("/v2/models/{MODEL}/infer"), &body).await;
        assert_eq!(answer["model_version"].as_str(), Some(version_of[&i].as_str()), "key user-{i}");
    }

    // Ground truth for every request, in batches; accuracy per variant as computed here.
    let mut expected = HashMap::<String, (u64, u64)>::new();
    for (i, version, predicted) in &answers {
        let e = expected.entry(version.clone()).or_default();
        e.0 += 1;
        e.1 += u64::from(*predicted == i64::from(rows.labels[*i]));
    }
    for chunk in answers.chunks(1000) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|(i, _, _)| json!({"id": format!("req-{i}"), "label": rows.labels[*i]}))
            .collect();
        let (status, joined) =
            post(&client, http, &format!("/v2/models/{MODEL}/feedback"), &json!(batch)).await;
        assert_eq!(
            (status, joined["joined"].as_u64()),
            (200, Some(chunk.len() as u64)),
            "{joined}"
        );
    }
    let (_, unknown) = post(
        &client,
        http,
        &format!("/v2/models/{MODEL}/feedback"),
        &json!({"id": "req-0", "label": 1}),
    )
    .await;
    assert_eq!((unknown["joined"].as_u64(), unknown["unknown"].as_u64()), (Some(0), Some(1)));
    fleet::eventually(Duration::from_secs(60), "the control plane has every label", || async {
        let status = control.status();
        status["variants"]["candidate"]["labelled"].as_u64().unwrap_or(0)
            + status["variants"]["baseline"]["labelled"].as_u64().unwrap_or(0)
            == 10_000
    })
    .await;
    let status = control.status();
    for (variant, version) in [("baseline", "1"), ("candidate", "2")] {
        let (labelled, correct) = expected[version];
        let v = &status["variants"][variant];
        assert_eq!(v["labelled"].as_u64(), Some(labelled), "{status}");
        assert_eq!(v["correct"].as_u64(), Some(correct), "{status}");
        assert_eq!(v["accuracy"].as_f64(), Some(correct as f64 / labelled as f64));
    }
    assert!(
        status["accuracy_p_value"].as_f64().is_some_and(|p| (0.0..=1.0).contains(&p)),
        "{status}"
    );
    let shown = control.ok(&["control", "rollout", "status", MODEL, "--group", GROUP]);
    assert!(shown.contains("ab") && shown.contains("p-value"), "{shown}");

    // SIGKILL mid-experiment: the same keys keep their variants after the restart.
    drop(agent);
    let (agent, http) = serve(&config);
    fleet::eventually(Duration::from_secs(60), "the restarted agent splits traffic", || async {
        prometheus(http, "falaj_rollout_share_percent", "model=\"fault\"").await == Some(30.0)
    })
    .await;
    for i in 0..500 {
        let body = request(&row(i), None, Some(&format!("user-{i}")));
        let (_, answer) = post(&client, http, &format!("/v2/models/{MODEL}/infer"), &body).await;
        assert_eq!(answer["model_version"].as_str(), Some(version_of[&i].as_str()), "key user-{i}");
    }
    control.ok(&["control", "rollout", "abort", MODEL, "--group", GROUP]);
    assert_eq!(control.status()["state"], "aborted");

    // Shadow: every request also runs on version 2; clients only ever see version 1.
    control.ok(&[
        "control",
        "rollout",
        "start",
        "fault@2",
        "--group",
        GROUP,
        "--strategy",
        "shadow",
        "--mirror",
        "100",
        "--guard",
        "agreement>0.5",
        "--min-requests",
        "20",
    ]);
    fleet::eventually(Duration::from_secs(60), "the agent mirrors requests", || async {
        control.status()["agents"][0]["report"]["id"].is_string()
    })
    .await;
    let compared_before =
        prometheus(http, "falaj_shadow_compared_rows_total", "version=\"2\"").await.unwrap_or(0.0);
    let (mut agreed, n) = (0u64, 400usize);
    for i in 0..n {
        let body = request(&row(i), None, None);
        let (_, answer) = post(&client, http, &format!("/v2/models/{MODEL}/infer"), &body).await;
        assert_eq!(answer["model_version"], "1", "a shadow answer reached the client");
        let (_, theirs) =
            post(&client, http, &format!("/v2/models/{MODEL}/versions/2/infer"), &body).await;
        agreed += u64::from(label(&answer) == label(&theirs));
    }
    fleet::eventually(
        Duration::from_secs(60),
        "the candidate ran every mirrored request",
        || async {
            prometheus(http, "falaj_shadow_compared_rows_total", "version=\"2\"").await
                == Some(compared_before + n as f64)
        },
    )
    .await;
    let agreed_rows = prometheus(http, "falaj_shadow_agreed_rows_total", "version=\"2\"").await;
    assert_eq!(agreed_rows, Some(agreed as f64));
    fleet::eventually(Duration::from_secs(60), "the control plane has the comparisons", || async {
        control.status()["variants"]["candidate"]["compared"].as_u64() == Some(n as u64)
    })
    .await;
    let status = control.status();
    assert_eq!(status["variants"]["candidate"]["agreed"].as_u64(), Some(agreed), "{status}");
    assert_eq!(
        status["variants"]["candidate"]["agreement"].as_f64(),
        Some(agreed as f64 / n as f64)
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_rolls_back_on_the_agent_offline_and_a_healthy_one_is_promoted() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let data = work.join("control");
    let control = Control::start(&data, "127.0.0.1:0");
    let (m1, r1) = sample_model(work, 7);
    // Version 2 names its input differently: every request routed to it fails.
    let broken = work.join("broken.onnx");
    std::fs::write(&broken, falaj_common::onnx::zoo::mlp(&[FEATURE_COUNT, 8, 3], 5)).unwrap();
    let (m3, r3) = sample_model(work, 11);
    control.push(work, &m1, Some(&r1), 1);
    control.push(work, &broken, None, 2);
    control.push(work, &m3, Some(&r3), 3);
    control.ok(&["control", "deploy", &format!("{MODEL}@1"), "--group", GROUP]);
    let (_, config) = enroll(&control, work);
    let (agent, http) = serve(&config);
    let client = reqwest::Client::new();
    let rows = sample::generate(100, 5, &[]);
    let row = |i: usize| &rows.features[(i % 100) * FEATURE_COUNT..(i % 100 + 1) * FEATURE_COUNT];
    let infer = |http: SocketAddr, i: usize| {
        let client = client.clone();
        async move {
            let body = request(row(i), None, Some(&format!("key-{i}")));
            post(&client, http, &format!("/v2/models/{MODEL}/infer"), &body).await
        }
    };
    fleet::eventually(Duration::from_secs(120), "version 1 is served", || async {
        infer(http, 0).await.1["model_version"] == "1"
    })
    .await;

    control.ok(&[
        "control",
        "rollout",
        "start",
        "fault@2",
        "--group",
        GROUP,
        "--strategy",
        "canary",
        "--steps",
        "50,100",
        "--step-interval",
        "1h",
        "--guard",
        "error_rate<0.2",
        "--min-requests",
        "20",
    ]);
    fleet::eventually(Duration::from_secs(60), "the candidate serves half", || async {
        prometheus(http, "falaj_rollout_share_percent", "model=\"fault\"").await == Some(50.0)
    })
    .await;
    let quic = control.quic.clone();
    assert_eq!(control.0.terminate(), Some(0));

    // The control plane is down; the candidate fails; the agent rolls back by itself.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut failed = 0;
    for i in 0.. {
        failed += usize::from(infer(http, i).await.0 != 200);
        if prometheus(http, "falaj_rollout_rolled_back", "model=\"fault\"").await == Some(1.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no rollback after {i} requests");
    }
    assert!(failed > 0, "requests did reach the broken candidate");
    for i in 0..100 {
        let (status, answer) = infer(http, i).await;
        assert_eq!((status, answer["model_version"].as_str()), (200, Some("1")), "{answer}");
    }
    // Killed and restarted, still offline: the rollback holds.
    drop(agent);
    let (agent, http) = serve(&config);
    fleet::eventually(Duration::from_secs(60), "the restarted agent serves", || async {
        prometheus(http, "falaj_rollout_rolled_back", "model=\"fault\"").await == Some(1.0)
    })
    .await;
    for i in 0..50 {
        let body = request(row(i), None, Some(&format!("key-{i}")));
        let (status, answer) =
            post(&client, http, &format!("/v2/models/{MODEL}/infer"), &body).await;
        assert_eq!((status, answer["model_version"].as_str()), (200, Some("1")), "{answer}");
    }

    // The control plane returns and records what the agent did.
    let control = Control::start(&data, &quic);
    fleet::eventually(
        Duration::from_secs(60),
        "the control plane knows of the rollback",
        || async { control.status()["state"] == "rolled_back" },
    )
    .await;
    let status = control.status();
    let reason = status["reason"].as_str().unwrap_or_default();
    // Whichever the control plane saw first, the agent's report or the windows it kept
    // while offline, the verdict is the agent's guard.
    assert!(reason.contains("error_rate<0.2 failed"), "{status}");

    // A healthy candidate steps through its schedule with the control plane down again,
    // and is promoted once it returns.
    control.ok(&[
        "control",
        "rollout",
        "start",
        "fault@3",
        "--group",
        GROUP,
        "--strategy",
        "canary",
        "--steps",
        "30,60,100",
        "--step-interval",
        "2s",
        "--guard",
        "error_rate<0.2",
        "--min-requests",
        "20",
    ]);
    fleet::eventually(Duration::from_secs(60), "the candidate serves 30 %", || async {
        prometheus(http, "falaj_rollout_share_percent", "model=\"fault\"").await == Some(30.0)
    })
    .await;
    assert_eq!(control.0.terminate(), Some(0));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut shares = vec![30.0];
    let mut on_candidate = 0;
    for i in 0.. {
        let (status, answer) = infer(http, i).await;
        assert_eq!(status, 200, "{answer}");
        on_candidate += usize::from(answer["model_version"] == "3");
        if let Some(share) =
            prometheus(http, "falaj_rollout_share_percent", "model=\"fault\"").await
            && shares.last() != Some(&share)
        {
            shares.push(share);
        }
        if shares.last() == Some(&100.0) && on_candidate >= 40 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "steps seen offline: {shares:?}");
    }
    assert_eq!(shares, [30.0, 60.0, 100.0], "every step, in order, offline");
    let control = Control::start(&data, &quic);
    fleet::eventually(Duration::from_secs(60), "the canary is promoted", || async {
        infer(http, 7).await;
        control.status()["state"] == "promoted"
    })
    .await;
    let deployments = control.ok(&["control", "rollout", "list"]);
    assert!(deployments.contains("promoted"), "{deployments}");
    fleet::eventually(Duration::from_secs(60), "version 3 serves everything", || async {
        infer(http, 1).await.1["model_version"] == "3"
    })
    .await;
    drop(agent);
}
