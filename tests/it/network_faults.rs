//! Agents behind a bad network (issue 17): every datagram between the agent and the
//! control plane goes through a proxy that drops 5% of them, sends 5% twice and delays
//! each by up to 10 ms (reordering them), and cuts the path entirely for two seconds in
//! the middle of a transfer. Enrollment, bundle transfers and metric windows still
//! complete, and every request served is counted exactly once.

use crate::fleet;
use crate::support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use falaj_control::sql::params;
use fleet::faults::{Faults, LossyProxy};
use fleet::{Control, RunningAgent, eventually};

const GROUP: &str = "edge";

/// Requests for version 2 the control plane has stored windows for.
async fn requests_counted(control: &Control) -> i64 {
    let sql = "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) FROM windows WHERE model = 'layered' AND version = 2";
    control.shared.db.run(move |s| s.query_row(sql, params![], |r| r.get(0))).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfers_and_windows_complete_over_a_lossy_network_and_count_once() {
    let work = tempfile::tempdir().unwrap();
    let control = Control::start(&work.path().join("control")).await;
    let faults = Faults { drop: 0.05, duplicate: 0.05, max_delay: Duration::from_millis(10) };
    let proxy = LossyProxy::start(control.quic, faults, 17).await;

    // 4 MiB models, so that a transfer spans thousands of datagrams.
    for version in [1, 2] {
        let model = fleet::layered_model_with(
            &work.path().join(format!("layered-{version}.onnx")),
            4,
            version,
            version,
        );
        control.push_model(&model, "layered", version).await;
    }
    control.client.deploy(GROUP, "layered", 1).await.unwrap();
    let token = control.token(GROUP).await;
    let agent = RunningAgent::enroll(&work.path().join("agent"), proxy.addr, &token).await;
    eventually(Duration::from_secs(120), "version 1 is served", || async {
        agent.infer_layered().await.as_deref() == Some("1")
    })
    .await;

    // Version 2, with the path cut for two seconds while it moves.
    control.client.deploy(GROUP, "layered", 2).await.unwrap();
    eventually(Duration::from_secs(60), "the transfer of version 2 has begun", || async {
        std::fs::read_dir(agent.dir.join("chunks")).is_ok_and(|d| d.count() > 1)
    })
    .await;
    proxy.cut(true);
    tokio::time::sleep(Duration::from_secs(2)).await; // the outage itself, not a wait for state
    proxy.cut(false);
    eventually(Duration::from_secs(120), "version 2 is served", || async {
        agent.infer_layered().await.as_deref() == Some("2")
    })
    .await;

    // Requests served are counted once, whatever the network repeated or lost.
    let served = 200u32;
    for _ in 0..served {
        assert_eq!(agent.infer_layered().await.as_deref(), Some("2"));
    }
    let reporter = std::sync::Arc::clone(&agent.reporter);
    tokio::task::spawn_blocking(move || reporter.close_windows(std::time::SystemTime::now()))
        .await
        .unwrap()
        .unwrap();
    let metrics = agent.url("/metrics");
    eventually(Duration::from_secs(60), "the windows are delivered", || async {
        support::prometheus_sum(&metrics, "falaj_outbox_windows").await == 0.0
    })
    .await;
    let total = support::prometheus_sum(
        &metrics,
        r#"falaj_inference_requests_total{model="layered",version="2"}"#,
    )
    .await;
    assert!(total >= f64::from(served), "{total} requests served");
    // Prometheus writes counters as floats; these hold whole numbers exactly.
    assert_eq!(requests_counted(&control).await, total as i64, "each request counted once");

    let counts = &proxy.counts;
    let (dropped, duplicated) =
        (counts.dropped.load(Ordering::Relaxed), counts.duplicated.load(Ordering::Relaxed));
    assert!(
        dropped > 100 && duplicated > 100,
        "the network was bad: {dropped} dropped, {duplicated} duplicated"
    );
    agent.stop().await;
    control.stop().await;
}
