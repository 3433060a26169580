//! A short soak (issue 17): 8 agents, 40 requests a second for 20 seconds. Nothing fails,
//! and the control plane counts every request served exactly once. The full soak (200
//! agents, 500 requests a second, 10 minutes) is `cargo bench --bench soak`, with its
//! memory and latency over time in BENCHMARKS.md.

use crate::fleet;

use std::time::Duration;

use fleet::soak::{SoakOptions, soak};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_soak_fails_nothing_and_counts_every_request_once() {
    let work = tempfile::tempdir().unwrap();
    let options = SoakOptions {
        agents: 8,
        rate: 40,
        duration: Duration::from_secs(20),
        window: Duration::from_secs(1),
        every: Duration::from_secs(5),
    };
    let report = soak(work.path(), &options).await;
    assert!(report.sent >= 700, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
    assert_eq!(report.counted, report.sent, "{report:?}");
    assert_eq!(report.samples.len(), 4, "{report:?}");
}
