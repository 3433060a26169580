//! Audit benchmark: what the audit log costs an admin request, and how fast an export
//! verifies.
//!
//! - Append: `audit::record` inside an open transaction of the control plane's own
//!   database file (the entry rides on the request's commit), in µs per entry, beside the
//!   p50 of an admin request that records one (`POST /v1/tokens` to a control plane
//!   running in process, over HTTP, with its commit).
//! - Verification: an export of 1,000,000 entries (a checkpoint every 1,000) verified as
//!   `falaj-control audit verify` does, in entries per second.
//!
//! `cargo bench --bench audit -- [--entries N] [--requests N]`; prints Markdown for
//! BENCHMARKS.md.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use falaj_common::audit::{Chain, Checkpoint, GENESIS, Outcome};
use falaj_common::keys::SigningKey;
use falaj_common::time::Timestamp;
use falaj_control::client::AdminClient;
use falaj_control::daemon::{ControlPlane, ServeConfig};
use falaj_control::db::Db;

fn arg(args: &[String], name: &str, default: usize) -> Result<usize> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(default), |s| s.parse::<usize>())
        .with_context(|| format!("{name} takes a number"))
}

/// µs per entry appended inside one open transaction.
fn append_micros(db: &Db, entries: usize) -> Result<f64> {
    let at = Timestamp::from_system(SystemTime::now());
    let started = Instant::now();
    db.call_sync(|c| {
        let tx = c.transaction()?;
        for i in 0..entries {
            let details = serde_json::json!({"group": "edge", "version": i});
            falaj_control::audit::record(&tx, at, "deploy", "edge", Outcome::Success, details)?;
        }
        tx.commit()
    })?;
    Ok(started.elapsed().as_secs_f64() * 1e6 / entries as f64)
}

/// p50 and p99 of `POST /v1/tokens` (one transaction: the token, its event, its entry).
async fn request_micros(requests: usize) -> Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let mut config = ServeConfig::new(&dir.path().join("control"));
    config.quic = "127.0.0.1:0".parse()?;
    config.admin = "127.0.0.1:0".parse()?;
    config.region = Some("bench-1".into());
    let control = ControlPlane::start(config).await?;
    let client =
        AdminClient::new(&format!("http://{}", control.admin_addr()), control.admin_token());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(control.run(async { drop(stop_rx.await) }));
    let mut latencies = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        client.create_token("edge", 600).await?;
        latencies.push(started.elapsed());
    }
    let _ = stop_tx.send(());
    running.await??;
    latencies.sort_unstable();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    Ok((pick(0.5), pick(0.99)))
}

/// An export of `entries` entries with a checkpoint every 1,000 and at the end.
fn export(entries: usize, key: &SigningKey) -> String {
    let mut chain = Chain::at(0, GENESIS);
    let mut text = String::with_capacity(entries * 320);
    for i in 1..=entries {
        let details =
            serde_json::json!({"group": "edge", "model": "sensor-fault", "version": i % 7});
        let at = Timestamp::from_unix(1_800_000_000 + i as u64);
        let (_, line) = chain.append(
            at,
            "user:alice",
            Some("10.1.2.3:50211"),
            "deploy",
            "edge",
            Outcome::Success,
            details,
        );
        text.push_str(&line);
        text.push('\n');
        if i % 1000 == 0 || i == entries {
            text.push_str(&Checkpoint::sign(chain.seq, chain.head, at, key).line());
            text.push('\n');
        }
    }
    text
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let entries = arg(&args, "--entries", 1_000_000)?;
    let requests = arg(&args, "--requests", 500)?;

    let dir = tempfile::tempdir()?;
    let db = Db::open(&dir.path().join("control.db"))?;
    append_micros(&db, 1000)?; // warm up
    let append = append_micros(&db, 20_000)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (p50, p99) = runtime.block_on(request_micros(requests))?;

    let key = SigningKey::from_seed(&[5; 32]);
    let text = export(entries, &key);
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let verified = falaj_common::audit::verify(text.lines(), &[key.public()])
            .map_err(|e| anyhow::anyhow!("the export does not verify: {e}"))?;
        best = best.min(started.elapsed());
        anyhow::ensure!(
            verified.entries == entries as u64,
            "verified {} entries",
            verified.entries
        );
    }

    println!("| | figure |");
    println!("|---|---:|");
    println!("| audit append, inside the request's transaction | {append:.1} µs |");
    println!("| `POST /v1/tokens` over HTTP, p50 ({requests} requests) | {p50:.0} µs |");
    println!("| `POST /v1/tokens` over HTTP, p99 | {p99:.0} µs |");
    println!("| append as a share of the request (p50) | {:.2} % |", append / p50 * 100.0);
    println!(
        "| verification of {entries} entries ({:.0} MB, a checkpoint per 1,000) | {:.2} s, {:.0} entries/s |",
        text.len() as f64 / 1e6,
        best.as_secs_f64(),
        entries as f64 / best.as_secs_f64()
    );
    Ok(())
}
