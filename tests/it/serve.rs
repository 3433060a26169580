//! The agent as a process: build, import, serve on 127.0.0.1:0, infer over HTTP with
//! answers equal to tract called directly, a new version imported while serving, and a
//! clean exit on SIGTERM.

use crate::support;

use std::time::{Duration, Instant};

use falaj_common::onnx::OnnxModel;
use falaj_common::sample::{self, FEATURE_COUNT};
use falaj_common::tensor::{Tensor, TensorData};
use serde_json::{Value, json};
use support::{Process, init_agent, ok, s, sample_bundle};

async fn infer(client: &reqwest::Client, url: &str, body: &Value) -> Value {
    client.post(url).json(body).send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn serves_imports_live_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = sample_bundle(dir.path(), "eu-west-1", 1);
    let root = dir.path().join("keys/root.json");
    let agent = dir.path().join("agent");
    init_agent(&agent, "eu-west-1", &root);
    ok(&["agent", "import", s(&bundle), "--data-dir", s(&agent)]);

    let mut server = Process::start(&[
        "agent",
        "serve",
        "--data-dir",
        s(&agent),
        "--http",
        "127.0.0.1:0",
        "--poll-interval",
        "100ms",
    ]);
    let addr = server.wait_for_addr("serving the Open Inference Protocol");
    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://{addr}{path}");

    let rows = 16;
    let x = sample::generate(rows, 99, &[]).features;
    let body = json!({"inputs": [{"name": "sensors", "shape": [rows, FEATURE_COUNT], "datatype": "FP32", "data": x}]});
    let response = infer(&client, &url("/v2/models/sensor-fault/infer"), &body).await;
    let model = std::fs::read(dir.path().join("sample/model.onnx")).unwrap();
    let direct = OnnxModel::load(&model)
        .unwrap()
        .run(vec![Tensor {
            shape: vec![rows as u64, FEATURE_COUNT as u64],
            data: TensorData::Fp32(x),
        }])
        .unwrap();
    let TensorData::Fp32(expected) = &direct[0].data else { panic!() };
    let got: Vec<f32> = response["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(response["outputs"][0]["name"], "probabilities");
    assert_eq!(&got, expected, "served answers equal tract's");
    assert_eq!(response["model_version"], "1");

    // Version 2 imported by another process while the server runs.
    let v2 = sample_bundle(dir.path(), "eu-west-1", 2);
    ok(&["agent", "import", s(&v2), "--data-dir", s(&agent)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.get(url("/v2/models/sensor-fault/versions/2/ready")).send().await.unwrap().status()
        != 200
    {
        assert!(Instant::now() < deadline, "version 2 never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let response = infer(&client, &url("/v2/models/sensor-fault/infer"), &body).await;
    assert_eq!(response["model_version"], "2", "the new version is active");
    let meta: Value =
        client.get(url("/v2/models/sensor-fault")).send().await.unwrap().json().await.unwrap();
    assert_eq!(meta["versions"], json!(["1", "2"]));

    // Two more: the oldest inactive version goes (`[models] keep_inactive`, 2 by default),
    // its file with it.
    for version in [3, 4] {
        let bundle = sample_bundle(dir.path(), "eu-west-1", version);
        ok(&["agent", "import", s(&bundle), "--data-dir", s(&agent)]);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let meta: Value =
            client.get(url("/v2/models/sensor-fault")).send().await.unwrap().json().await.unwrap();
        if meta["versions"] == json!(["2", "3", "4"]) {
            break;
        }
        assert!(Instant::now() < deadline, "version 1 was never removed: {meta}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = client.get(url("/v2/models/sensor-fault/versions/1/ready")).send().await.unwrap();
    assert_eq!(status.status(), 404);
    let files = std::fs::read_dir(agent.join("bundles/sensor-fault")).unwrap().count();
    assert_eq!(files, 3, "the removed version's file is gone");

    assert_eq!(server.terminate(), Some(0), "SIGTERM is a clean shutdown");
}

#[tokio::test]
async fn the_demo_serves_and_answers() {
    let dir = tempfile::tempdir().unwrap();
    let mut demo = Process::start(&["demo", "--dir", s(dir.path())]);
    let addr = demo.wait_for_addr("inference API on");
    demo.wait_for("Serving until Ctrl-C");
    assert!(demo.seen.iter().any(|l| l.contains("hold-out accuracy")), "{:?}", demo.seen);
    assert!(demo.seen.iter().any(|l| l.contains("predicted right")), "{:?}", demo.seen);
    assert!(demo.seen.iter().any(|l| l.contains("held-out accuracy")), "{:?}", demo.seen);
    // The mislabelled canary is rolled back by an agent's own guard; the retrained one is
    // promoted.
    assert!(
        demo.seen.iter().any(|l| l.contains("rolled back    agent agent-")
            && l.contains("accuracy>=baseline-0.05 failed")),
        "{:?}",
        demo.seen
    );
    assert!(
        demo.seen.iter().any(|l| l.contains("promoted       every guard held")),
        "{:?}",
        demo.seen
    );
    let meta: Value = reqwest::get(format!("http://{addr}/v2/models/sensor-fault"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["inputs"][0]["shape"], json!([-1, 8]));
    // The console's pages have data, the API tokens' included.
    let try_line = demo.seen.iter().find(|l| l.contains("falaj control agents")).unwrap().clone();
    let words: Vec<&str> = try_line.split_whitespace().collect();
    let after = |flag: &str| words[words.iter().position(|w| *w == flag).unwrap() + 1];
    let tokens: Value = reqwest::Client::new()
        .get(format!("{}/v1/apitokens", after("--control-plane")))
        .bearer_auth(after("--token"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(tokens.as_array().unwrap().iter().any(|t| t["name"] == "demo-ci"), "{tokens}");
    assert_eq!(demo.terminate(), Some(0));
}

/// The agent speaks systemd's notify protocol: READY=1 once serving, WATCHDOG=1 at half
/// the watchdog interval, STOPPING=1 on SIGTERM — received here on a real notify socket.
#[cfg(unix)]
#[tokio::test]
async fn systemd_hears_ready_watchdog_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let bundle = sample_bundle(dir.path(), "eu-west-1", 1);
    let agent = dir.path().join("agent");
    init_agent(&agent, "eu-west-1", &dir.path().join("keys/root.json"));
    ok(&["agent", "import", s(&bundle), "--data-dir", s(&agent)]);
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut server = Process::start_with_env(
        &["agent", "serve", "--data-dir", s(&agent), "--http", "127.0.0.1:0"],
        &[("NOTIFY_SOCKET", s(&socket_path)), ("WATCHDOG_USEC", "200000")],
    );
    server.wait_for_addr("serving the Open Inference Protocol");
    let mut heard = Vec::new();
    let mut buf = [0u8; 256];
    while !(heard.iter().any(|m: &String| m.contains("READY=1"))
        && heard.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        let n = socket.recv(&mut buf).expect("a notification before the timeout");
        heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let code = server.terminate();
    assert_eq!(code, Some(0));
    // Everything the process sent before it exited is queued on the socket already.
    socket.set_nonblocking(true).unwrap();
    let mut stopping = false;
    while let Ok(n) = socket.recv(&mut buf) {
        stopping |= String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1");
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM; heard {heard:?}");
}
