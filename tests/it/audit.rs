//! The audit log as processes: a control plane changed through its command line, the
//! log listed and exported, the export verified offline against the audit key, and every
//! kind of tampering with the file refused, naming the entry or checkpoint.

// One story from start to end reads better than the same steps spread over helpers.
#![allow(clippy::too_many_lines)]

use crate::fleet;
use crate::support;

use std::path::Path;
use std::time::Duration;

use falaj_common::audit::Checkpoint;
use falaj_common::keys::SigningKey;
use falaj_common::time::Timestamp;
use serde_json::Value;
use support::{ControlProcess, Process, fails, ok, s};

/// `audit verify FILE --key KEY`: Ok(stdout) or Err(stderr) with exit code 65.
fn verify(file: &Path, key: &Path) -> Result<String, String> {
    let out = support::falaj(&["control", "audit", "verify", s(file), "--key", s(key)]);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        assert_eq!(out.status.code(), Some(65), "{}", String::from_utf8_lossy(&out.stderr));
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn every_change_is_audited_and_every_tampering_is_found() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let data = work.join("control");
    let control = ControlProcess::start(&data, "127.0.0.1:0", &[]);
    let url = control.url.clone();
    let api = |args: &[&str]| control.ok(args);

    // Changes: a bundle pushed and deployed, an enrollment token; and a refused bundle.
    let bundle = support::sample_bundle(work, "eu-west-1", 1);
    // The bundle is signed by other keys than this control plane's: refused, and audited.
    let refused = support::falaj(&[
        "control",
        "bundle",
        "push",
        s(&bundle),
        "--control-plane",
        &url,
        "--data-dir",
        s(&data),
    ]);
    assert!(!refused.status.success());
    let keys = data.join("keys");
    let own = work.join("own.falaj");
    ok(&[
        "control",
        "bundle",
        "build",
        "--keys",
        s(&keys),
        "--model",
        s(&work.join("sample/model.onnx")),
        "--name",
        "sensor-fault",
        "--version",
        "1",
        "--out",
        s(&own),
    ]);
    api(&["control", "bundle", "push", s(&own)]);
    api(&["control", "deploy", "sensor-fault@1", "--group", "edge"]);
    api(&["control", "token", "create", "--group", "edge", "--ttl", "10m"]);

    let listed: Vec<Value> =
        serde_json::from_str(&api(&["control", "audit", "list", "--json"])).unwrap();
    let actions: Vec<(&str, &str)> = listed
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["outcome"].as_str().unwrap()))
        .collect();
    for wanted in [
        ("push", "refused"),
        ("push", "success"),
        ("deploy", "success"),
        ("token.create", "success"),
    ] {
        assert!(actions.contains(&wanted), "{wanted:?} not in {actions:?}");
    }
    let table = api(&["control", "audit", "list", "--action", "deploy"]);
    assert!(table.contains("sensor-fault@1") || table.contains("edge"), "{table}");
    assert_eq!(table.lines().count(), 2, "the header and the one deploy: {table}");

    // The export verifies offline against the published key.
    let export = work.join("audit.jsonl");
    api(&["control", "audit", "export", "--out", s(&export)]);
    let key = keys.join("audit.pub");
    let verified = verify(&export, &key).unwrap();
    assert!(verified.contains("entries") && verified.contains("verify"), "{verified}");
    let lines: Vec<String> =
        std::fs::read_to_string(&export).unwrap().lines().map(str::to_owned).collect();
    let entry_lines: Vec<usize> =
        (0..lines.len()).filter(|&i| !lines[i].starts_with("{\"checkpoint\"")).collect();
    assert!(entry_lines.len() >= 5, "{lines:?}");
    let write = |name: &str, lines: &[String]| {
        let path = work.join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path
    };

    // An entry's outcome rewritten: named by its line.
    let mut changed = lines.clone();
    let target = entry_lines[1];
    changed[target] = changed[target].replacen("\"success\"", "\"refused\"", 1);
    let err = verify(&write("changed.jsonl", &changed), &key).unwrap_err();
    assert!(err.contains(&format!("line {}: entry 2 was changed", target + 1)), "{err}");

    // A line removed, and two lines swapped.
    let mut removed = lines.clone();
    removed.remove(entry_lines[2]);
    let err = verify(&write("removed.jsonl", &removed), &key).unwrap_err();
    assert!(err.contains("entry 4 follows entry 2"), "{err}");
    let mut swapped = lines.clone();
    swapped.swap(entry_lines[1], entry_lines[2]);
    let err = verify(&write("swapped.jsonl", &swapped), &key).unwrap_err();
    assert!(err.contains("entry 3 follows entry 1"), "{err}");

    // The last checkpoint re-signed with another key, and the export checked with a key
    // that is not this control plane's.
    let forger = SigningKey::from_seed(&[9; 32]);
    let last: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    let (seq, head) = (
        last["checkpoint"]["seq"].as_u64().unwrap(),
        last["checkpoint"]["head"].as_str().unwrap().parse().unwrap(),
    );
    let mut resigned = lines.clone();
    *resigned.last_mut().unwrap() =
        Checkpoint::sign(seq, head, Timestamp::from_unix(1), &forger).line();
    let err = verify(&write("resigned.jsonl", &resigned), &key).unwrap_err();
    assert!(err.contains(&format!("the checkpoint of entry {seq} does not verify")), "{err}");
    let other_key = work.join("other.pub");
    std::fs::write(&other_key, format!("{}\n", forger.public())).unwrap();
    let err = verify(&export, &other_key).unwrap_err();
    assert!(err.contains("not the audit key given"), "{err}");

    // Truncated: the entries after the last checkpoint kept are not signed.
    let err = verify(&write("truncated.jsonl", &lines[..lines.len() - 1]), &key).unwrap_err();
    assert!(err.contains("not covered by a signed checkpoint"), "{err}");
    let missing =
        fails(&["control", "audit", "verify", s(&work.join("none.jsonl")), "--key", s(&key)], 1);
    assert!(missing.contains("none.jsonl"), "{missing}");

    assert_eq!(control.terminate(), Some(0));
}

#[test]
fn an_agents_own_log_exports_and_verifies_offline() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let bundle = support::sample_bundle(work, "eu-west-1", 1);
    let agent = work.join("agent");
    support::init_agent(&agent, "eu-west-1", &work.join("keys/root.json"));
    ok(&["agent", "import", s(&bundle), "--data-dir", s(&agent)]);
    let export = work.join("agent-audit.jsonl");
    let wrote = ok(&["agent", "audit", "export", "--out", s(&export), "--data-dir", s(&agent)]);
    assert!(wrote.contains("audit.pub"), "{wrote}");
    let key = agent.join("audit.pub");
    let out = ok(&["agent", "audit", "verify", s(&export), "--key", s(&key)]);
    assert!(out.contains("2 entries (1 to 2)"), "init and install: {out}");
    let text = std::fs::read_to_string(&export).unwrap();
    assert!(text.contains("\"action\":\"install\"") && text.contains("sensor-fault@1"), "{text}");
    // The install's size rewritten: the checkpoint no longer matches the last entry.
    let tampered = work.join("tampered.jsonl");
    std::fs::write(&tampered, text.replacen(" bytes", "0 bytes", 1)).unwrap();
    let err = fails(&["agent", "audit", "verify", s(&tampered), "--key", s(&key)], 65);
    assert!(err.contains("the checkpoint of entry 2 does not verify"), "{err}");
}

/// The agent's own chain (its export without checkpoints).
fn agent_entries(agent: &Path, work: &Path) -> Vec<String> {
    let export = work.join("agent-now.jsonl");
    ok(&["agent", "audit", "export", "--out", s(&export), "--data-dir", s(agent)]);
    std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("{\"checkpoint\""))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_chain_reaches_the_control_plane_intact_across_an_outage() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let data = work.join("control");
    let serve = |quic: &str| {
        let control = ControlProcess::start(&data, quic, &["--heartbeat", "1s"]);
        let (url, quic) = (control.url.clone(), control.quic.clone());
        (control, url, quic)
    };
    let (control, url, quic) = serve("127.0.0.1:0");
    let keys = data.join("keys");
    support::sample_bundle(work, "eu-west-1", 1); // the sample model, trained once
    let build = |version: &str| {
        let out = work.join(format!("own-{version}.falaj"));
        ok(&[
            "control",
            "bundle",
            "build",
            "--keys",
            s(&keys),
            "--model",
            s(&work.join("sample/model.onnx")),
            "--name",
            "sensor-fault",
            "--version",
            version,
            "--out",
            s(&out),
        ]);
        out
    };
    let api = |control: &ControlProcess, args: &[&str]| control.ok(args);
    api(&control, &["control", "bundle", "push", s(&build("1"))]);
    api(&control, &["control", "deploy", "sensor-fault@1", "--group", "edge"]);
    let token = api(&control, &["control", "token", "create", "--group", "edge", "--ttl", "10m"]);
    let agent = work.join("agent");
    let enrolled = ok(&[
        "agent",
        "enroll",
        "--control-plane",
        &quic,
        "--token",
        token.trim(),
        "--data-dir",
        s(&agent),
    ]);
    let agent_id =
        enrolled.split_whitespace().find(|w| w.starts_with("agent-")).unwrap().to_owned();
    let mut serving = Process::start(&[
        "agent",
        "serve",
        "--data-dir",
        s(&agent),
        "--http",
        "127.0.0.1:0",
        "--heartbeat",
        "300ms",
    ]);
    serving.wait_for_addr("serving the Open Inference Protocol");
    let admin_token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let stored = |url: String| {
        let token = admin_token.trim().to_owned();
        let id = agent_id.clone();
        async move {
            let response = reqwest::Client::new()
                .get(format!("{url}/v1/agents/{id}/audit"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            assert!(response.status().is_success(), "{:?}", response.status());
            response.text().await.unwrap().lines().map(str::to_owned).collect::<Vec<_>>()
        }
    };
    fleet::eventually(Duration::from_secs(60), "the agent's chain arrives", || async {
        stored(url.clone()).await.len() >= 3
    })
    .await;

    // The control plane goes away; the site installs a version by hand meanwhile.
    assert_eq!(control.terminate(), Some(0));
    ok(&["agent", "import", s(&build("2")), "--data-dir", s(&agent)]);
    let offline = agent_entries(&agent, work);
    assert!(offline.iter().any(|l| l.contains("sensor-fault@2")), "{offline:?}");

    // Back: the chain arrives whole, link by link, equal to the agent's own.
    let (control, url, _) = serve(&quic);
    fleet::eventually(Duration::from_secs(60), "the offline entries arrive", || async {
        let held = stored(url.clone()).await;
        held.len() >= offline.len() && held == agent_entries(&agent, work)[..held.len()]
    })
    .await;
    let held = stored(url.clone()).await;
    assert_eq!(held[..offline.len()], offline[..]);
    drop(serving);
    assert_eq!(control.terminate(), Some(0));
}
