//! The whole system as processes, driven by its command lines: a control plane, an
//! enrolled agent, deployments, the fleet view, an agent killed in the middle of an
//! install, revocation, and clean shutdowns.

// One story from start to end reads better than the same steps spread over helpers.
#![allow(clippy::too_many_lines)]

use crate::fleet;
use crate::support;

use std::time::Duration;

use serde_json::Value;
use support::{Process, fails, ok, s};

fn admin_url(line: &str) -> String {
    let start = line.find("http://").unwrap();
    line[start..].split_whitespace().next().unwrap().to_owned()
}

async fn infer_version(
    http: std::net::SocketAddr,
    model: &str,
    width: usize,
) -> Result<String, String> {
    let body = serde_json::json!({"inputs": [{"name": "sensors", "shape": [1, width], "datatype": "FP32", "data": vec![0.5f32; width]}]});
    let response = reqwest::Client::new()
        .post(format!("http://{http}/v2/models/{model}/infer"))
        .json(&body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(body["model_version"].as_str().unwrap_or_default().into())
    } else {
        Err(body.to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_fleet_survives_an_agent_killed_mid_install() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("control");
    let mut control = Process::start(&[
        "control",
        "serve",
        "--data-dir",
        s(&data),
        "--quic",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--region",
        "eu-west-1",
        "--heartbeat",
        "1s",
    ]);
    let url = admin_url(&control.wait_for("admin API on"));
    let quic = control.wait_for("agents connect to").split_whitespace().nth(3).unwrap().to_owned();
    let api = |args: &[&str]| -> Vec<String> {
        let mut full: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        full.extend(["--control-plane".into(), url.clone(), "--data-dir".into(), s(&data).into()]);
        full
    };
    let run = |args: Vec<String>| ok(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // Two versions of a 24 MiB model that differ all through (a long transfer).
    let keys = data.join("keys");
    for (version, seed) in [(1, 1), (2, 2)] {
        let model = fleet::layered_model_with(
            &work.path().join(format!("m{version}.onnx")),
            24,
            seed,
            seed,
        );
        let out = work.path().join(format!("layered-{version}.falaj"));
        ok(&[
            "control",
            "bundle",
            "build",
            "--keys",
            s(&keys),
            "--model",
            s(&model),
            "--name",
            "layered",
            "--version",
            &version.to_string(),
            "--out",
            s(&out),
        ]);
        let pushed = run(api(&["control", "bundle", "push", s(&out)]));
        assert!(pushed.contains(&format!("registered layered@{version}")), "{pushed}");
    }
    run(api(&["control", "deploy", "layered@1", "--group", "edge"]));
    let token = run(api(&["control", "token", "create", "--group", "edge", "--ttl", "10m"]))
        .trim()
        .to_owned();

    let agent_dir = work.path().join("agent");
    let enrolled = ok(&[
        "agent",
        "enroll",
        "--control-plane",
        &quic,
        "--token",
        &token,
        "--data-dir",
        s(&agent_dir),
    ]);
    assert!(enrolled.contains("in group edge"), "{enrolled}");
    let serve_args = [
        "agent",
        "serve",
        "--data-dir",
        s(&agent_dir),
        "--http",
        "127.0.0.1:0",
        "--heartbeat",
        "500ms",
    ];
    let mut agent = Process::start(&serve_args);
    let http = agent.wait_for_addr("serving the Open Inference Protocol");
    fleet::eventually(Duration::from_secs(180), "version 1 is served", || async {
        infer_version(http, "layered", 256).await.as_deref() == Ok("1")
    })
    .await;

    // Version 2 starts moving; the agent dies (SIGKILL) while it does.
    run(api(&["control", "deploy", "layered@2", "--group", "edge"]));
    fleet::eventually(Duration::from_secs(60), "the transfer of version 2 has begun", || async {
        std::fs::read_dir(agent_dir.join("chunks")).is_ok_and(|d| d.count() > 2)
    })
    .await;
    drop(agent);

    let mut agent = Process::start(&serve_args);
    let http = agent.wait_for_addr("serving the Open Inference Protocol");
    let first = infer_version(http, "layered", 256).await;
    assert!(
        matches!(first.as_deref(), Ok("1" | "2")),
        "after the crash it serves the old or the new version: {first:?}"
    );
    fleet::eventually(Duration::from_secs(180), "version 2 is served", || async {
        let answer = infer_version(http, "layered", 256).await;
        assert!(answer.is_ok(), "never a broken model: {answer:?}");
        answer.as_deref() == Ok("2")
    })
    .await;

    // The agent serves version 2 before its report of it reaches the control plane.
    fleet::eventually(Duration::from_secs(30), "the fleet view shows layered@2", || async {
        run(api(&["control", "agents"])).contains("layered@2")
    })
    .await;
    let fleet_view = run(api(&["control", "agents"]));
    let line = fleet_view
        .lines()
        .find(|l| l.starts_with("agent-"))
        .unwrap_or_else(|| panic!("{fleet_view}"));
    assert!(
        line.contains("edge") && line.contains("connected") && line.contains("layered@2"),
        "{fleet_view}"
    );
    // The engines it serves on, as it reported them: the CPU at least.
    assert!(line.contains(" tract-cpu"), "{fleet_view}");
    let agent_id = line.split_whitespace().next().unwrap().to_owned();

    run(api(&["control", "agent", "revoke", &agent_id]));
    let fleet_view = run(api(&["control", "agents"]));
    assert!(fleet_view.contains("revoked"), "{fleet_view}");
    let unknown = api(&["control", "deploy", "nothing@9", "--group", "edge"]);
    let err = fails(&unknown.iter().map(String::as_str).collect::<Vec<_>>(), 78);
    assert!(err.contains("no bundle nothing@9"), "{err}");

    assert_eq!(agent.terminate(), Some(0));
    assert_eq!(control.terminate(), Some(0));
}
