//! Chunked transfers: delta between versions, resumption across a control plane restart,
//! corrupted chunks refetched, and fetches limited to what the agent's document names.

use crate::fleet;

use std::collections::HashSet;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use falaj_agent::sync::Syncer;
use falaj_common::desired::DesiredBundle;
use falaj_common::keys::Sha256;
use falaj_control::blobs::{BlobStore, FsBlobStore};
use fleet::{Control, RunningAgent, eventually, layered_model};

/// A blob store that records what it serves, can hold back reads after a number of them,
/// and can damage the first read of chosen blobs (a corrupted chunk in flight).
#[derive(Debug)]
struct TestBlobs {
    inner: FsBlobStore,
    served: Mutex<Vec<(Sha256, usize)>>,
    pause_after: Option<usize>,
    gate: (Mutex<bool>, Condvar),
    corrupt: Mutex<HashSet<Sha256>>,
}

impl TestBlobs {
    fn new(dir: &std::path::Path, pause_after: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            inner: FsBlobStore::open(&dir.join("blobs")).unwrap(),
            served: Mutex::default(),
            pause_after,
            gate: (Mutex::new(false), Condvar::new()),
            corrupt: Mutex::default(),
        })
    }

    fn release(&self) {
        *self.gate.0.lock().unwrap() = true;
        self.gate.1.notify_all();
    }

    fn served(&self) -> Vec<(Sha256, usize)> {
        self.served.lock().unwrap().clone()
    }
}

impl BlobStore for TestBlobs {
    fn has(&self, sha256: &Sha256) -> bool {
        self.inner.has(sha256)
    }

    fn put(&self, sha256: &Sha256, bytes: &[u8]) -> io::Result<()> {
        self.inner.put(sha256, bytes)
    }

    fn get(&self, sha256: &Sha256) -> io::Result<Option<Bytes>> {
        if let Some(limit) = self.pause_after
            && self.served.lock().unwrap().len() >= limit
        {
            let open = self.gate.1.wait_while(self.gate.0.lock().unwrap(), |open| !*open).unwrap();
            drop(open);
            return Ok(None);
        }
        let Some(bytes) = self.inner.get(sha256)? else { return Ok(None) };
        self.served.lock().unwrap().push((*sha256, bytes.len()));
        if self.corrupt.lock().unwrap().remove(sha256) {
            let mut damaged = bytes.to_vec();
            damaged[bytes.len() / 2] ^= 0xff;
            return Ok(Some(Bytes::from(damaged)));
        }
        Ok(Some(bytes))
    }
}

const MODEL: &str = "layered";

fn chunk_files(agent_dir: &std::path::Path) -> HashSet<Sha256> {
    std::fs::read_dir(agent_dir.join("chunks"))
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_head_moves_a_small_part_of_the_bundle() {
    let work = tempfile::tempdir().unwrap();
    let blobs = TestBlobs::new(&work.path().join("control"), None);
    let config = fleet::config(&work.path().join("control"), "127.0.0.1:0".parse().unwrap());
    let control = Control::start_with(config, Some(blobs.clone() as Arc<dyn BlobStore>)).await;
    let v1 = control.push_model(&layered_model(&work.path().join("v1.onnx"), 8, 1), MODEL, 1).await;
    control.client.deploy("edge", MODEL, 1).await.unwrap();
    let agent = control.agent(work.path(), "agent", "edge").await;
    eventually(Duration::from_secs(120), "version 1 is served", || async {
        agent.active_version(MODEL).await.as_deref() == Some("1")
    })
    .await;
    let first: usize = blobs.served().iter().map(|(_, n)| n).sum();
    let v1_size = std::fs::metadata(&v1).unwrap().len() as usize;
    assert!(first >= v1_size, "the first version moves whole: {first} of {v1_size}");

    let v2 = control.push_model(&layered_model(&work.path().join("v2.onnx"), 8, 2), MODEL, 2).await;
    control.client.deploy("edge", MODEL, 2).await.unwrap();
    eventually(Duration::from_secs(120), "version 2 is served", || async {
        agent.infer_layered().await == Some("2".into())
    })
    .await;
    let moved: usize = blobs.served().iter().map(|(_, n)| n).sum::<usize>() - first;
    let v2_size = std::fs::metadata(&v2).unwrap().len() as usize;
    println!(
        "delta: moved {moved} of {v2_size} bytes ({:.1}%)",
        moved as f64 * 100.0 / v2_size as f64
    );
    // What changed: the head (10 x hidden floats) and the manifest at the front. Content-
    // defined chunking bounds what moves to those bytes plus at most a chunk around each.
    let hidden = 8 * 1024 * 1024 / 4 / 256;
    let bound = hidden * 10 * 4 + 3 * falaj_common::chunking::MAX_CHUNK;
    assert!(moved <= bound, "a new head moved {moved} bytes, more than {bound}");
    assert!(moved * 4 < v2_size, "{moved} of {v2_size}");
    assert!(chunk_files(&agent.dir).is_empty(), "no chunk files left once installed");
    agent.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transfer_cut_by_a_control_plane_restart_resumes_without_refetching() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("control");
    let gated = TestBlobs::new(&dir, Some(10));
    let control = Control::start_with(
        fleet::config(&dir, "127.0.0.1:0".parse().unwrap()),
        Some(gated.clone() as Arc<dyn BlobStore>),
    )
    .await;
    let addr = control.quic;
    control.push_model(&layered_model(&work.path().join("v1.onnx"), 8, 1), MODEL, 1).await;
    control.client.deploy("edge", MODEL, 1).await.unwrap();
    let agent =
        RunningAgent::enroll(&work.path().join("agent"), addr, &control.token("edge").await).await;
    eventually(Duration::from_secs(60), "ten blobs are served", || async {
        gated.served().len() >= 10
    })
    .await;
    control.stop().await;
    gated.release();
    let stored = chunk_files(&agent.dir);
    assert!(
        !stored.is_empty() && stored.len() <= 10,
        "{} chunks stored before the cut",
        stored.len()
    );

    let fresh = TestBlobs::new(&dir, None);
    let control =
        Control::start_with(fleet::config(&dir, addr), Some(fresh.clone() as Arc<dyn BlobStore>))
            .await;
    eventually(Duration::from_secs(120), "version 1 is served after the restart", || async {
        agent.active_version(MODEL).await.as_deref() == Some("1")
    })
    .await;
    // The control plane reads the recipe itself, to know which chunks the agent may
    // fetch; what it sends again is what counts.
    let recipe = desired_bundle(&control, MODEL, 1).await.recipe_sha256;
    let refetched: Vec<_> = fresh
        .served()
        .into_iter()
        .filter(|(sha, _)| stored.contains(sha) && *sha != recipe)
        .collect();
    assert!(refetched.is_empty(), "chunks stored before the cut were fetched again: {refetched:?}");
    agent.stop().await;
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_damaged_in_flight_is_discarded_and_fetched_again() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("control");
    let blobs = TestBlobs::new(&dir, None);
    let control = Control::start_with(
        fleet::config(&dir, "127.0.0.1:0".parse().unwrap()),
        Some(blobs.clone() as Arc<dyn BlobStore>),
    )
    .await;
    let bundle =
        control.push_model(&layered_model(&work.path().join("v1.onnx"), 4, 1), MODEL, 1).await;
    let recipe = falaj_common::chunking::Recipe::of(&std::fs::read(&bundle).unwrap());
    let victim = recipe.chunks[recipe.chunks.len() / 2].sha256;
    blobs.corrupt.lock().unwrap().insert(victim);
    control.client.deploy("edge", MODEL, 1).await.unwrap();
    let agent = control.agent(work.path(), "agent", "edge").await;
    eventually(Duration::from_secs(120), "version 1 is served", || async {
        agent.active_version(MODEL).await.as_deref() == Some("1")
    })
    .await;
    let reads = blobs.served().iter().filter(|(sha, _)| *sha == victim).count();
    assert_eq!(reads, 2, "the damaged chunk was fetched exactly twice");
    agent.stop().await;
    control.stop().await;
}

/// The desired-state entry of `name@version` as the control plane registered it.
async fn desired_bundle(control: &Control, name: &str, version: u64) -> DesiredBundle {
    let name = name.to_owned();
    let row = control
        .shared
        .db
        .run(move |sql| falaj_control::db::bundle(&sql, &name, version))
        .await
        .unwrap()
        .unwrap();
    DesiredBundle {
        name: row.name,
        version: row.version,
        manifest_sha256: row.manifest_sha256,
        bundle_sha256: row.bundle_sha256,
        size: row.size,
        recipe_sha256: row.recipe_sha256,
        activate: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_fetches_only_what_its_desired_state_names() {
    let work = tempfile::tempdir().unwrap();
    let control = Control::start(&work.path().join("control")).await;
    control.push_model(&layered_model(&work.path().join("a.onnx"), 2, 1), MODEL, 1).await;
    control.push_model(&layered_model(&work.path().join("b.onnx"), 2, 2), "other", 1).await;
    control.client.deploy("edge", MODEL, 1).await.unwrap();
    let agent = control.agent(work.path(), "agent", "edge").await;
    eventually(Duration::from_secs(120), "version 1 is served", || async {
        agent.active_version(MODEL).await.as_deref() == Some("1")
    })
    .await;
    let dir = agent.dir.clone();
    agent.stop().await;

    // The agent's own session, driven by hand: a bundle of another group (never deployed
    // here) is not served, a bundle its document names is.
    let syncer = Syncer::open(dir, Arc::default(), fleet::sync_config()).unwrap().unwrap();
    let session = syncer.open_fetcher().await.unwrap();
    let other = desired_bundle(&control, "other", 1).await;
    let refused = session.fetcher.download(&other).await.unwrap_err().to_string();
    assert!(refused.contains("could not be fetched"), "{refused}");
    let own = desired_bundle(&control, MODEL, 1).await;
    session.fetcher.download(&own).await.unwrap();
    control.stop().await;
}
