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
//! Needs PostgreSQL's server programs (Debian's `postgresql`): without them the test is
//! reported as ignored, and with `FALAJ_REQUIRE_POSTGRES` set it fails.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::harness;
use crate::postgres;
use crate::support::{self, ControlProcess, copy_dir, enroll_and_serve, push_sample, s};
use crate::wait::eventually;

const MODEL: &str = "sensor-fault";

/// The requests at `version` the metric windows stored in the database at `url` count.
async fn stored_requests(url: String, version: i64) -> i64 {
    tokio::task::spawn_blocking(move || {
        let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        client
            .query_one(
                "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) FROM windows
                 WHERE model = $1 AND version = $2",
                &[&MODEL, &version],
            )
            .unwrap()
            .get(0)
    })
    .await
    .unwrap()
}

/// Every request the `agents` served at version 1 is counted once in the metric
/// windows stored at `url`: those the first replica stored, and those in flight or not yet
/// sent when it died, which go to the second.
async fn every_request_is_counted_once(agents: &[(support::Process, SocketAddr)], url: &str) {
    let metric = format!(r#"falaj_inference_requests_total{{model="{MODEL}",version="1"}}"#);
    let mut served = 0;
    for (_, http) in agents {
        served += support::prometheus_sum(&format!("http://{http}/metrics"), &metric).await as i64;
    }
    assert!(served >= 60, "{served}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stored = stored_requests(url.to_owned(), 1).await;
    while stored != served && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stored = stored_requests(url.to_owned(), 1).await;
    }
    assert_eq!(stored, served, "requests stored against requests served");
}

pub async fn two_replicas_on_one_postgres_serve_one_fleet_and_survive_the_loss_of_one() {
    let bin = match postgres::binaries() {
        Ok(bin) => bin,
        Err(why) => return harness::skip("FALAJ_REQUIRE_POSTGRES", &why),
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
            "[database]\nurl = \"{}\"\n\n[bundles]\nblobs_dir = \"{}\"\n",
            url.clone(),
            blobs.display()
        ),
    )
    .unwrap();
    let options = ["--config", s(&config), "--heartbeat", "1s"];
    let a = ControlProcess::start(&work.path().join("a"), "127.0.0.1:0", &options);
    // The second replica: a copy of the region's keys, a data directory of its own.
    copy_dir(&a.data.join("keys"), &work.path().join("b").join("keys"));
    let b = ControlProcess::start(&work.path().join("b"), "127.0.0.1:0", &options);

    // Pushed through one replica (its chunks in the shared directory), deployed through
    // the other.
    for version in [1, 2] {
        push_sample(&a, work.path(), MODEL, version);
    }
    let bundles = b.ok(&["control", "bundle", "list"]);
    assert!(bundles.lines().filter(|l| l.starts_with(MODEL)).count() == 2, "{bundles}");
    b.ok(&["control", "deploy", &format!("{MODEL}@1"), "--group", "edge"]);

    let list = format!("{},{}", a.quic, b.quic);
    let agents: Vec<_> = (0..3)
        .map(|i| {
            let token_from = if i % 2 == 0 { &a } else { &b };
            enroll_and_serve(token_from, &work.path().join(format!("agent-{i}")), &list)
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
    let lease = |url: String| async move {
        support::prometheus_sum(&format!("{url}/metrics"), "falaj_region_lease_held").await as i64
    };
    eventually(Duration::from_secs(30), "one replica holds the lease", || async {
        lease(a.url.clone()).await + lease(b.url.clone()).await == 1
    })
    .await;

    // The first replica dies without a word.
    drop(a);
    every_request_is_counted_once(&agents, &url).await;

    // The second holds the lease now, whichever held it before.
    eventually(Duration::from_secs(30), "the second replica takes the lease", || async {
        lease(b.url.clone()).await == 1
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
    let fleet = b.ok(&["control", "agents"]);
    let current = fleet
        .lines()
        .filter(|l| l.contains("connected") && l.contains(&format!("{MODEL}@2")))
        .count();
    assert_eq!(current, 3, "{fleet}");

    // One audit chain, appended to by both replicas, that verifies as one.
    let export = work.path().join("audit.jsonl");
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
    drop(cluster);
}
