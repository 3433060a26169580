//! Encryption at rest after a sync: an agent takes two versions of a model from a real
//! control plane over QUIC (the second as a delta, its unchanged chunks read back out of
//! the first version's sealed file), and afterwards no 64-byte window of either model's
//! bytes is in any file under the agent's data directory (SQLite and its WAL included).
//! Nor while a sync's import runs: an agent process stopped (aborted at a crash point)
//! with the import staged holds no such window either. A sealed file tampered with on the
//! agent's disk is refused at load and reported to the control plane; a managed one is
//! fetched again and serves.

use crate::fleet;
use crate::support;

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet::{Control, RunningAgent, eventually, layered_model};
use support::{Process, s};

const WINDOW: usize = 64;

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { out.extend(files(&path)) } else { out.push(path) }
    }
    out
}

/// Whether a window carries information: runs of zeros and other patterns of a few byte
/// values (a zero bias, padding) are in any SQLite page and prove nothing.
fn informative(window: &[u8]) -> bool {
    let mut seen = [false; 256];
    window.iter().filter(|&&b| !std::mem::replace(&mut seen[usize::from(b)], true)).count() >= 16
}

/// The files under `dir` holding some informative 64-byte window of one of `secrets`
/// (the windows sorted once and binary-searched: hashing millions of them is slow in a
/// debug build).
fn holding_a_window(dir: &Path, secrets: &[Vec<u8>]) -> Vec<PathBuf> {
    let mut windows: Vec<&[u8]> =
        secrets.iter().flat_map(|s| s.windows(WINDOW)).filter(|w| informative(w)).collect();
    windows.sort_unstable();
    files(dir)
        .into_iter()
        .filter(|path| {
            let bytes = std::fs::read(path).unwrap_or_default();
            bytes.windows(WINDOW).any(|w| windows.binary_search(&w).is_ok())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_window_of_the_weights_is_on_the_agents_disk_after_a_sync() {
    let work = tempfile::tempdir().unwrap();
    let control = Control::start(&work.path().join("control")).await;
    let v1 = layered_model(&work.path().join("v1.onnx"), 1, 1);
    control.push_model(&v1, "layered", 1).await;
    control.client.deploy("edge", "layered", 1).await.unwrap();
    let agent = control.agent(work.path(), "agent", "edge").await;
    eventually(Duration::from_secs(120), "version 1 is served", || async {
        agent.infer_layered().await == Some("1".into())
    })
    .await;
    let v2 = layered_model(&work.path().join("v2.onnx"), 1, 2);
    control.push_model(&v2, "layered", 2).await;
    control.client.deploy("edge", "layered", 2).await.unwrap();
    eventually(Duration::from_secs(120), "version 2 is served", || async {
        agent.infer_layered().await == Some("2".into())
    })
    .await;
    let models = [std::fs::read(&v1).unwrap(), std::fs::read(&v2).unwrap()];
    let windows = models.iter().flat_map(|m| m.windows(WINDOW)).filter(|w| informative(w));
    assert!(windows.count() > 1_000_000, "the models' weights are searched for");
    // The search finds the weights where they lie in plaintext: the models' own files.
    let everywhere = holding_a_window(work.path(), &models);
    assert!(everywhere.len() >= 2, "the search finds the models' own files: {everywhere:?}");
    let found = holding_a_window(&agent.dir, &models);
    assert!(found.is_empty(), "plaintext weights on the agent's disk in {found:?}");
    let searched: Vec<String> = files(&agent.dir)
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_str()?.to_owned()))
        .collect();
    assert!(searched.iter().any(|f| f == "agent.db"), "{searched:?}");
    assert!(searched.iter().any(|f| f.ends_with(".sealed")), "{searched:?}");
    agent.stop().await;
    control.stop().await;
}

/// `falaj agent serve` on `dir` with `point` armed: waits for the abort there.
fn serve_until(dir: &Path, point: &str) {
    let armed = format!("{point}=return");
    let args = ["agent", "serve", "--data-dir", s(dir), "--http", "127.0.0.1:0"];
    let mut agent = Process::start_with_env(&args, &[("FAILPOINTS", &armed)]);
    let status = tokio::task::block_in_place(|| agent.wait_exit(Duration::from_secs(120)));
    assert_eq!(status.signal(), Some(6), "{point}: the agent did not stop there ({status})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_window_of_the_weights_is_on_the_agents_disk_while_a_sync_imports() {
    let work = tempfile::tempdir().unwrap();
    let control = Control::start(&work.path().join("control")).await;
    let dir = work.path().join("agent");
    let token = control.token("edge").await;
    let quic = control.quic.to_string();
    let args =
        ["agent", "enroll", "--control-plane", &quic, "--token", &token, "--data-dir", s(&dir)];
    let out = support::falaj_async(args.iter().map(|a| (*a).to_owned()).collect()).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Version 1 installed and active (the agent stopped right after), then version 2, a
    // delta reusing most of version 1's chunks, stopped with its import staged: the
    // chunk files and the staging file are all there.
    let v1 = layered_model(&work.path().join("v1.onnx"), 1, 1);
    control.push_model(&v1, "layered", 1).await;
    control.client.deploy("edge", "layered", 1).await.unwrap();
    serve_until(&dir, "sync-activated");
    let v2 = layered_model(&work.path().join("v2.onnx"), 1, 2);
    control.push_model(&v2, "layered", 2).await;
    control.client.deploy("edge", "layered", 2).await.unwrap();
    serve_until(&dir, "import-staged");

    let staged: Vec<PathBuf> =
        files(&dir.join("staging")).into_iter().filter(|p| p.is_file()).collect();
    assert!(!staged.is_empty(), "the import's staging file is there");
    assert!(!files(&dir.join("chunks")).is_empty(), "the transfer's chunk files are there");
    let models = [std::fs::read(&v1).unwrap(), std::fs::read(&v2).unwrap()];
    let everywhere = holding_a_window(work.path(), &models);
    assert!(everywhere.len() >= 2, "the search finds the models' own files: {everywhere:?}");
    let found = holding_a_window(&dir, &models);
    assert!(found.is_empty(), "plaintext weights on the agent's disk mid-import in {found:?}");
    control.stop().await;
}

/// Flips one bit in the middle of `path`, as someone with the disk might.
fn tamper(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tampered_file_is_refused_reported_and_a_managed_one_fetched_again() {
    const MODEL: &str = "sensor-fault";
    let work = tempfile::tempdir().unwrap();
    let control = Control::start(&work.path().join("control")).await;
    control.push_sample(work.path(), MODEL, 1).await;
    control.client.deploy("edge", MODEL, 1).await.unwrap();
    let agent = control.agent(work.path(), "agent", "edge").await;
    eventually(Duration::from_secs(60), "version 1 is served", || async {
        agent.infer(MODEL).await.as_deref() == Ok("1")
    })
    .await;
    let (dir, id) = (agent.dir.clone(), agent.identity.agent_id.clone());
    agent.stop().await;
    // Beside the managed model, one imported by hand, which nothing can fetch again.
    let imported = control.push_sample(work.path(), "imported", 1).await;
    let args = ["agent", "import", s(&imported), "--data-dir", s(&dir)];
    let out = support::falaj_async(args.iter().map(|a| (*a).to_owned()).collect()).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let bundles = dir.join("bundles");
    tamper(&bundles.join(MODEL).join("1.sealed"));
    tamper(&bundles.join("imported").join("1.sealed"));
    let agent = RunningAgent::start(&dir).await;
    // The managed version is refused at load, reported, fetched again and served; the
    // imported one stays refused and reported.
    eventually(Duration::from_secs(60), "both failures are in the fleet view", || async {
        let fleet = control.client.agents().await.unwrap();
        let Some(view) = fleet.iter().find(|a| a.id == id) else { return false };
        let has = |prefix: &str, then: &str| {
            view.errors.iter().any(|e| {
                e.starts_with(prefix) && e.contains("failed authentication") && e.contains(then)
            })
        };
        has(&format!("{MODEL}@1: the installed file did not open"), "fetched again")
            && has("imported@1 failed to load", "")
    })
    .await;
    eventually(Duration::from_secs(60), "the fetched copy serves", || async {
        agent.infer(MODEL).await.as_deref() == Ok("1")
    })
    .await;
    let refused = agent.infer("imported").await.unwrap_err();
    assert!(refused.contains("failed authentication"), "{refused}");
    agent.stop().await;
    control.stop().await;
}
