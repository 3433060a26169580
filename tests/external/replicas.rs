//! Two control-plane replicas on one PostgreSQL (issue 21), as real processes: each
//! started with the same `[database] url` and `[bundles] blobs_dir`, the region's keys
//! directory copied to the second. A bundle pushed through one is deployed through the
//! other; three agents enrolled with both addresses (tokens from either) serve it; the
//! first replica is killed (SIGKILL), the second holds the region's lease (one of them did
//! before), and every request the agents served is counted once
//! in the metric windows both replicas stored; the next version is deployed through the
//! second, and every agent serves it, those of the dead replica having failed over, and
//! shows as connected with it in the live replica's fleet view. The audit chain both
//! replicas appended to exports as one and verifies.
//!
//! The region's setup ([`Region`]) and the checks on what the database stored are shared
//! with the kills during a transfer and a rollout (`replica_kills`).
//!
//! Needs PostgreSQL's server programs (Debian's `postgresql`): without them the test is
//! reported as ignored, and with `FALAJ_REQUIRE_POSTGRES` set it fails.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::harness;
use crate::postgres;
use crate::support::{self, ControlProcess, copy_dir, enroll_and_serve, push_sample, s};
use crate::wait::eventually;

pub const MODEL: &str = "sensor-fault";

/// A region on one PostgreSQL cluster of its own: the database's URL, a work directory
/// and the configuration every replica is started with (that database, one shared blobs
/// directory, `extra` TOML, a heartbeat of 1 s).
pub struct Region {
    /// The database's URL.
    pub url: String,
    /// Where replicas, agents and bundles keep their files.
    pub work: tempfile::TempDir,
    config: std::path::PathBuf,
    // Last: the cluster stops after everything above is gone.
    _cluster: postgres::Cluster,
}

impl Region {
    /// Starts the cluster and writes the replicas' configuration; `None` (the test
    /// skipped, see [`harness::skip`]) without PostgreSQL's server programs.
    pub async fn start(extra: &str) -> Option<Self> {
        let bin = match postgres::binaries() {
            Ok(bin) => bin,
            Err(why) => {
                harness::skip("FALAJ_REQUIRE_POSTGRES", &why);
                return None;
            }
        };
        // The cluster's own client blocks: off the runtime.
        let (cluster, url) = tokio::task::spawn_blocking(move || {
            let cluster = postgres::Cluster::start(&bin).expect("the cluster starts");
            let url = cluster.database("");
            (cluster, url)
        })
        .await
        .unwrap();
        let work = tempfile::tempdir().unwrap();
        let config = work.path().join("control.toml");
        let blobs = work.path().join("shared-blobs");
        std::fs::write(
            &config,
            format!(
                "[database]\nurl = \"{url}\"\n\n[bundles]\nblobs_dir = \"{}\"\n\n{extra}",
                blobs.display()
            ),
        )
        .unwrap();
        Some(Self { url, work, config, _cluster: cluster })
    }

    /// The work directory.
    pub fn path(&self) -> &Path {
        self.work.path()
    }

    /// The shared blobs directory.
    pub fn blobs(&self) -> std::path::PathBuf {
        self.path().join("shared-blobs")
    }

    /// Starts replica `name` (data directory `name` in the work directory) with agents on
    /// `quic`. The first makes the region's keys; every other is given a copy of those of
    /// `keys_of`, and a data directory of its own.
    pub fn replica(
        &self,
        name: &str,
        quic: &str,
        keys_of: Option<&ControlProcess>,
    ) -> ControlProcess {
        let data = self.path().join(name);
        if let Some(first) = keys_of {
            copy_dir(&first.data.join("keys"), &data.join("keys"));
        }
        ControlProcess::start(&data, quic, &["--config", s(&self.config), "--heartbeat", "1s"])
    }

    /// Runs `read` with a client of the region's database, off the runtime.
    pub async fn query<T: Send + 'static>(
        &self,
        read: impl FnOnce(&mut ::postgres::Client) -> T + Send + 'static,
    ) -> T {
        let url = self.url.clone();
        tokio::task::spawn_blocking(move || {
            let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
            read(&mut client)
        })
        .await
        .unwrap()
    }
}

/// 1 while `replica` holds the region's lease (its `/metrics`), else 0.
pub async fn lease(replica: &ControlProcess) -> i64 {
    support::prometheus_sum(&format!("{}/metrics", replica.url), "falaj_region_lease_held").await
        as i64
}

/// The requests at `model@version` the metric windows stored in the region's database
/// count.
async fn stored_requests(region: &Region, model: &'static str, version: i64) -> i64 {
    region
        .query(move |client| {
            client
                .query_one(
                    "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) FROM windows
                     WHERE model = $1 AND version = $2",
                    &[&model, &version],
                )
                .unwrap()
                .get(0)
        })
        .await
}

/// The requests at `model@version` the `agents` served, by their own counters.
pub async fn served_requests(
    agents: &[(support::Process, SocketAddr)],
    model: &str,
    version: i64,
) -> i64 {
    let metric =
        format!(r#"falaj_inference_requests_total{{model="{model}",version="{version}"}}"#);
    let mut served = 0;
    for (_, http) in agents {
        served += support::prometheus_sum(&format!("http://{http}/metrics"), &metric).await as i64;
    }
    served
}

/// Each of the `served` requests at `model@version` is counted once in the metric
/// windows stored in the region's database: those a replica stored before it died, and
/// those in flight or not yet sent then, which go to another.
pub async fn every_request_is_counted_once(
    region: &Region,
    model: &'static str,
    version: i64,
    served: i64,
) {
    let what = format!("the {served} requests served at {model}@{version} are stored, once");
    eventually(Duration::from_secs(60), &what, || async {
        stored_requests(region, model, version).await == served
    })
    .await;
}

/// The fleet view of `replica` comes to show three agents connected, running `target`.
/// An agent serves a version before its report of it reaches the control plane, so the
/// view is waited for, not read once.
pub async fn every_agent_runs(replica: &ControlProcess, target: &str) {
    let what = format!("the fleet view shows three agents connected, running {target}");
    eventually(Duration::from_secs(30), &what, || async { replica.agents_running(target) == 3 })
        .await;
}

pub async fn two_replicas_on_one_postgres_serve_one_fleet_and_survive_the_loss_of_one() {
    let Some(region) = Region::start("").await else { return };
    let work = region.path();
    let a = region.replica("a", "127.0.0.1:0", None);
    let b = region.replica("b", "127.0.0.1:0", Some(&a));

    // Pushed through one replica (its chunks in the shared directory), deployed through
    // the other.
    for version in [1, 2] {
        push_sample(&a, work, MODEL, version);
    }
    let bundles = b.ok(&["control", "bundle", "list"]);
    assert!(bundles.lines().filter(|l| l.starts_with(MODEL)).count() == 2, "{bundles}");
    b.ok(&["control", "deploy", &format!("{MODEL}@1"), "--group", "edge"]);

    let list = format!("{},{}", a.quic, b.quic);
    let agents: Vec<_> = (0..3)
        .map(|i| {
            let token_from = if i % 2 == 0 { &a } else { &b };
            enroll_and_serve(token_from, &work.join(format!("agent-{i}")), &list)
        })
        .collect();
    for (_, http) in &agents {
        let http = *http;
        eventually(Duration::from_secs(120), "version 1 is served", || async move {
            support::infer(http, MODEL).await == Some(1)
        })
        .await;
    }

    for (_, http) in &agents {
        for _ in 0..20 {
            assert_eq!(support::infer(*http, MODEL).await, Some(1));
        }
    }

    // One replica holds the region's lease (and does the region's work).
    eventually(Duration::from_secs(30), "one replica holds the lease", || async {
        lease(&a).await + lease(&b).await == 1
    })
    .await;

    // The first replica dies without a word.
    drop(a);
    let served = served_requests(&agents, MODEL, 1).await;
    assert!(served >= 60, "{served}");
    every_request_is_counted_once(&region, MODEL, 1, served).await;

    // The second holds the lease now, whichever held it before.
    eventually(Duration::from_secs(30), "the second replica takes the lease", || async {
        lease(&b).await == 1
    })
    .await;

    // The next version goes out through the second.
    b.ok(&["control", "deploy", &format!("{MODEL}@2"), "--group", "edge"]);
    for (_, http) in &agents {
        let http = *http;
        eventually(Duration::from_secs(120), "version 2 is served", || async move {
            support::infer(http, MODEL).await == Some(2)
        })
        .await;
    }
    every_agent_runs(&b, &format!("{MODEL}@2")).await;

    // One audit chain, appended to by both replicas, that verifies as one.
    let export = work.join("audit.jsonl");
    b.ok(&["control", "audit", "export", "--out", s(&export)]);
    let verified = support::ok(&[
        "control",
        "audit",
        "verify",
        s(&export),
        "--key",
        s(&b.data.join("keys").join("audit.pub")),
    ]);
    assert!(verified.contains("checkpoints verify"), "{verified}");
    let text = std::fs::read_to_string(&export).unwrap();
    assert!(text.matches("\"deploy\"").count() >= 2, "both deployments are in the chain");

    for (agent, _) in agents {
        assert_eq!(agent.terminate(), Some(0));
    }
    assert_eq!(b.terminate(), Some(0));
    drop(region);
}
