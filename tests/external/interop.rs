//! A model no one in the project wrote (scikit-learn, exported by skl2onnx with a symbolic
//! batch dimension) is bundled, imported and served, and Triton's unmodified Python client
//! gets the same outputs as ONNX Runtime within 1e-4, over HTTP (tritonclient.http) and
//! gRPC (tritonclient.grpc: raw and typed tensors, a stream, and errors with Triton's status
//! codes and REST's messages); and both clients over TLS with API keys (401/403 and
//! UNAUTHENTICATED/PERMISSION_DENIED with the same messages).
//!
//! Needs Python with the packages of `tests/interop/requirements.txt`; `.ci/run` installs
//! them and sets `FALAJ_PYTHON`. Without them the tests are reported as ignored with the
//! reason, unless `FALAJ_REQUIRE_INTEROP=1` (as in CI) makes that a failure.

use crate::support;

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
    crate::harness::skip("FALAJ_REQUIRE_INTEROP", &why);
    None
}

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/oip_interop.py")
}

/// Exports the scikit-learn model to `dir/work`, bundles it as `skl-mlp` version 1 and
/// imports it into an agent in `dir/agent`; returns (work, agent).
fn agent_with_the_model(python: &str, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let work = dir.join("work");
    let status = Command::new(python).arg(script()).args(["export", s(&work)]).status().unwrap();
    assert!(status.success(), "exporting the scikit-learn model failed");

    let keys = dir.join("keys");
    let agent = dir.join("agent");
    let bundle = dir.join("skl.falaj");
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
    (work, agent)
}

pub fn skl2onnx_model_served_to_tritons_client_matches_onnx_runtime() {
    let Some(python) = python() else { return };
    let script = script();
    let dir = tempfile::tempdir().unwrap();
    let (work, agent) = agent_with_the_model(&python, dir.path());
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

/// Writes a CA and a certificate it signed to `dir`: `{prefix}ca.pem`, `{name}.pem` and
/// `{name}.key`, for a server on 127.0.0.1 and localhost or (`client`) a TLS client.
fn certificate(dir: &Path, prefix: &str, name: &str, client: bool) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, format!("interop {prefix}CA"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = if client {
        CertificateParams::new(Vec::<String>::new()).unwrap()
    } else {
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap()
    };
    if client {
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("{prefix}ca.pem")), ca_cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
}

/// The address after `https://` in `line`.
fn https_addr(line: &str) -> String {
    let at = line.find("https://").unwrap_or_else(|| panic!("no https:// in {line}"));
    line[at + "https://".len()..].trim().to_owned()
}

/// Triton's HTTP and gRPC clients over TLS, with API keys in their headers: the same
/// outputs as ONNX Runtime, and the refusals with their status codes; then with client
/// certificates too (mutual TLS), and refused without one.
pub fn tritons_clients_over_tls_with_api_keys() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (work, agent) = agent_with_the_model(&python, dir.path());
    let tls = dir.path().join("tls");
    certificate(&tls, "", "server", false);
    certificate(&tls, "client-", "client", true);
    let key = ok(&[
        "agent",
        "apikey",
        "create",
        "--name",
        "app",
        "--models",
        "skl-mlp",
        "--data-dir",
        s(&agent),
    ]);
    let other = ok(&[
        "agent",
        "apikey",
        "create",
        "--name",
        "other",
        "--models",
        "another-model",
        "--data-dir",
        s(&agent),
    ]);
    let config = dir.path().join("agent.toml");
    let write_config = |client_ca: &str| {
        let text = format!(
            "data_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:0\"\ntls_certificate = \"{}\"\n\
             tls_key = \"{}\"\nauth = \"api_key\"\n{client_ca}\n[grpc]\nlisten = \"127.0.0.1:0\"\n",
            s(&agent),
            s(&tls.join("server.pem")),
            s(&tls.join("server.key"))
        );
        std::fs::write(&config, text).unwrap();
    };
    write_config("");
    let mut server = Process::start(&["agent", "serve", "--config", s(&config)]);
    let https = https_addr(&server.wait_for("serving the Open Inference Protocol on"));
    let grpc = https_addr(&server.wait_for("serving the Open Inference Protocol over gRPC"));
    let out = Command::new(&python)
        .arg(script())
        .args([
            "check-tls",
            &https,
            &grpc,
            s(&work),
            s(&tls.join("ca.pem")),
            key.trim(),
            other.trim(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "TLS interop check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let checks = summary["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 8, "2 outputs x 2 batch sizes x HTTPS and gRPC: {summary}");
    assert!(checks.iter().all(|c| c["max_abs_diff"].as_f64().unwrap() <= 1e-4), "{summary}");
    let errors = summary["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 3, "{summary}");
    assert!(errors[2]["message"].as_str().unwrap().contains("may not call model"), "{summary}");
    assert_eq!(server.terminate(), Some(0));

    // Mutual TLS as well: a certificate from the client CA and a key, both required.
    write_config(&format!("client_ca = \"{}\"", s(&tls.join("client-ca.pem"))));
    let mut server = Process::start(&["agent", "serve", "--config", s(&config)]);
    let https = https_addr(&server.wait_for("serving the Open Inference Protocol on"));
    let grpc = https_addr(&server.wait_for("serving the Open Inference Protocol over gRPC"));
    let out = Command::new(&python)
        .arg(script())
        .args(["check-mtls", &https, &grpc, s(&work), s(&tls.join("ca.pem"))])
        .args([s(&tls.join("client.pem")), s(&tls.join("client.key")), key.trim()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mutual TLS interop check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["checks"].as_array().unwrap().len(), 4, "{summary}");
    assert_eq!(summary["refused"].as_array().unwrap().len(), 2, "{summary}");
    assert_eq!(server.terminate(), Some(0));
}
