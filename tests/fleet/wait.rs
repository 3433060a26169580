//! Waiting on a condition another process or task brings about, with a deadline: shared by
//! the in-process fleet and `tests/external`, whose daemons run as processes.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` until it is true, or fails after `limit` with `what`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
