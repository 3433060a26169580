//! A model no one in the project wrote (scikit-learn, exported by skl2onnx with a symbolic
//! batch dimension) is bundled, imported and served, and Triton's unmodified Python client
//! gets the same outputs as ONNX Runtime within 1e-4, over HTTP (tritonclient.http) and
//! gRPC (tritonclient.grpc: raw and typed tensors, a stream, and errors with Triton's status
//! codes and REST's messages).
//!
//! Needs Python with the packages of `tests/interop/requirements.txt`; `.ci/run` installs
//! them and sets `FALAJ_PYTHON`. Without them the test says so loudly and passes, unless
//! `FALAJ_REQUIRE_INTEROP=1` (as in CI) makes that a failure.

mod support;

use std::path::Path;
use std::process::Command;

use support::{Process, init_agent, ok, s};

fn python() -> Option<String> {
    let python = std::env::var("FALAJ_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import onnxruntime, tritonclient.http, tritonclient.grpc, skl2onnx, sklearn"])
        .output();
    if probe.is_ok_and(|o| o.status.success()) {
        return Some(python);
    }
    let why = format!(
        "{python} lacks onnxruntime/tritonclient/skl2onnx/scikit-learn \
         (pip install -r tests/interop/requirements.txt, or set FALAJ_PYTHON)"
    );
    assert!(std::env::var_os("FALAJ_REQUIRE_INTEROP").is_none(), "interop test required but {why}");
    eprintln!("SKIPPING the interoperability test: {why}");
    None
}

#[test]
fn skl2onnx_model_served_to_tritons_client_matches_onnx_runtime() {
    let Some(python) = python() else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/oip_interop.py");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let status = Command::new(&python).arg(&script).args(["export", s(&work)]).status().unwrap();
    assert!(status.success(), "exporting the scikit-learn model failed");

    let keys = dir.path().join("keys");
    let agent = dir.path().join("agent");
    let bundle = dir.path().join("skl.falaj");
    ok(&["control", "keys", "init", "--dir", s(&keys), "--region", "eu-west-1"]);
    let built = ok(&[
        "control",
        "bundle",
        "build",
        "--keys",
        s(&keys),
        "--model",
        s(&work.join("model.onnx")),
        "--name",
        "skl-mlp",
        "--version",
        "1",
        "--out",
        s(&bundle),
    ]);
    assert!(built.contains("in input FP32"), "{built}");
    init_agent(&agent, "eu-west-1", &keys.join("root.json"));
    ok(&["agent", "import", s(&bundle), "--data-dir", s(&agent)]);
    let mut server = Process::start(&[
        "agent",
        "serve",
        "--data-dir",
        s(&agent),
        "--http",
        "127.0.0.1:0",
        "--grpc",
        "127.0.0.1:0",
    ]);
    let addr = server.wait_for_addr("serving the Open Inference Protocol on");
    let grpc = server.wait_for_addr("serving the Open Inference Protocol over gRPC");

    let out = Command::new(&python)
        .arg(&script)
        .args(["check", &addr.to_string(), s(&work)])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "interop check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let checks = summary["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 12, "2 outputs x 3 batch sizes x JSON and binary: {summary}");
    assert!(checks.iter().all(|c| c["max_abs_diff"].as_f64().unwrap() <= 1e-4), "{summary}");
    assert_eq!(summary["metadata_inputs"][0]["shape"], serde_json::json!([-1, 6]));

    let out = Command::new(&python)
        .arg(&script)
        .args(["check-grpc", &grpc.to_string(), &addr.to_string(), s(&work)])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gRPC interop check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let checks = summary["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 18, "2 outputs x 3 batch sizes x raw, typed and streamed: {summary}");
    assert!(checks.iter().all(|c| c["max_abs_diff"].as_f64().unwrap() <= 1e-4), "{summary}");
    assert_eq!(summary["metadata_inputs"][0]["shape"], serde_json::json!(["-1", "6"]));
    assert_eq!(summary["errors"].as_array().unwrap().len(), 4, "{summary}");
    assert_eq!(summary["index"][0]["state"], "READY", "{summary}");
    assert_eq!(server.terminate(), Some(0));
}
