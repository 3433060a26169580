//! Control-plane ingest of metric windows: how many windows per second the store takes
//! (one SQLite transaction per batch, synchronous = FULL, as the QUIC session stores
//! them), for the batch sizes agents send (1 in steady state, up to 256 catching up after
//! an outage), and how long the rollup behind `falaj-control metrics` takes over them.
//! Then the group commit the daemon's window queue makes (`monitoring::insert_deliveries`:
//! one window from each of many agents in one transaction) on SQLite and on PostgreSQL
//! (Debian's, a cluster of its own in a temporary directory, default durability), for
//! the store's own share of the scale-out benchmark's window ingest.
//!
//! `cargo bench --bench monitoring -- [--windows N] [--agents N]`; prints Markdown tables
//! for BENCHMARKS.md.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use falaj_common::keys::Sha256;
use falaj_common::metrics::{Counts, MetricsWindow};
use falaj_common::protocol::SequencedWindow;
use falaj_common::sample::{self, FEATURE_COUNT};
use falaj_common::sketch::LatencySketch;
use falaj_common::time::Timestamp;
use falaj_control::db::{self, Db, NewAgent, TokenRow};
use falaj_control::monitoring::{self, Delivery, MetricsQuery};
use falaj_control::sql::{PgOptions, SqlError};

#[path = "../control-plane/tests/storage/postgres.rs"]
#[expect(dead_code, reason = "the storage tests' harness: the bench uses one cluster")]
mod postgres;

const AGENTS: usize = 100;

/// A window as the sample model's agents send it: 8 input columns and 4 output columns of
/// 10 bins, a latency sketch of a few dozen buckets.
fn window(start: u64, seed: u64) -> MetricsWindow {
    let data = sample::generate(50, seed, &[]);
    let mut latency = LatencySketch::default();
    for (i, v) in data.features.iter().enumerate().take(200) {
        latency.record(40.0 + f64::from(*v).abs() * (i % 7) as f64);
    }
    let bins = |k: usize| (0..10).map(|b| ((b * 7 + k * 3 + seed as usize) % 13) as u64).collect();
    MetricsWindow {
        model: "sensor-fault".into(),
        version: 1,
        start: Timestamp::from_unix(start),
        seconds: 10,
        counts: Counts {
            requests: 200,
            errors: 1,
            latency,
            rows: 200,
            inputs: (0..FEATURE_COUNT).map(bins).collect(),
            outputs: (0..4).map(bins).collect(),
            dropped_windows: 0,
            dropped_requests: 0,
            ..Counts::default()
        },
    }
}

/// Enrolls `count` agents, on either database.
fn enroll_agents(db: &Db, count: usize, now: Timestamp) -> Result<Vec<String>> {
    let ids: Vec<String> = (0..count).map(|i| format!("agent-{i:05}")).collect();
    let outcomes = db.run_sync(|mut sql| {
        let mut outcomes = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            let secret = Sha256::of(id.as_bytes());
            let token = TokenRow {
                id: format!("t{i}"),
                group: "site".into(),
                region: "bench-1".into(),
                expires: now.saturating_add(Duration::from_secs(3600)),
            };
            db::insert_token(&sql, &token, secret, now)?;
            let agent = NewAgent {
                id: id.clone(),
                hostname: id.clone(),
                agent_version: "bench".into(),
                serial: format!("s{i}"),
                cert_expires: now.saturating_add(Duration::from_secs(86_400)),
            };
            let token_use = db::TokenUse {
                token_id: token.id.clone(),
                secret_sha256: secret,
                csr_sha256: Sha256::of(id.as_bytes()),
            };
            outcomes.push(db::enroll(&mut sql, &token_use, "bench-1", &agent, now)?);
        }
        Ok::<_, SqlError>(outcomes)
    })?;
    for outcome in outcomes {
        outcome.map_err(|e| anyhow::anyhow!("enrolling a bench agent: {e}"))?;
    }
    Ok(ids)
}

/// Stores one window from each of `agents` in groups of `group` agents, as the window
/// queue does under load, until each agent sent `rounds`; returns windows a second and the
/// p50 and p99 of a group's time, ms.
fn group_commits(
    db: &Db,
    agents: &[String],
    group: usize,
    rounds: u64,
    templates: &[MetricsWindow],
    now: Timestamp,
) -> Result<(f64, f64, f64)> {
    let held = monitoring::Held::from([("sensor-fault".to_owned(), 1)]);
    let mut latencies = Vec::new();
    let started = Instant::now();
    let mut sent = 0;
    let first = db.run_sync(|sql| monitoring::stored(&sql))?.0 / agents.len() as u64;
    for round in first + 1..=first + rounds {
        for (g, chunk) in agents.chunks(group).enumerate() {
            let deliveries: Vec<Delivery> = chunk
                .iter()
                .enumerate()
                .map(|(i, agent)| Delivery {
                    agent: agent.clone(),
                    held: held.clone(),
                    windows: vec![SequencedWindow {
                        seq: round,
                        window: templates[(g + i) % templates.len()].clone(),
                    }],
                })
                .collect();
            let t0 = Instant::now();
            let ingested =
                db.run_sync(|sql| monitoring::insert_deliveries(&sql, &deliveries, now))?;
            latencies.push(t0.elapsed());
            anyhow::ensure!(
                ingested.iter().all(|i| i.stored.len() == 1),
                "every window is new and stored"
            );
            sent += chunk.len();
        }
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    Ok((sent as f64 / elapsed.as_secs_f64(), pick(0.5), pick(0.99)))
}

/// The group-commit table: one window from each agent, in groups of 1 to 1,024 agents, on
/// SQLite and on PostgreSQL.
fn group_commit_table(agents: usize, templates: &[MetricsWindow], now: Timestamp) -> Result<()> {
    let bin = postgres::binaries().map_err(anyhow::Error::msg)?;
    let cluster = postgres::Cluster::start_durable(&bin).map_err(anyhow::Error::msg)?;
    println!();
    println!(
        "Group commit (`insert_deliveries`): one window from each of {agents} agents, 4 rounds (1 for groups of one)"
    );
    println!();
    println!("| database | agents a group | windows/s | ms per group (p50) | ms per group (p99) |");
    println!("|---|---:|---:|---:|---:|");
    for group in [1usize, 16, 128, 1024] {
        for backend in ["SQLite", "PostgreSQL"] {
            let dir = tempfile::tempdir()?;
            let db = match backend {
                "SQLite" => Db::open(&dir.path().join(db::DB_FILE))?,
                _ => Db::open_postgres(&PgOptions::new(cluster.database("")))?,
            };
            let ids = enroll_agents(&db, agents, now)?;
            // A database in use: a window from each agent already, and the planner's
            // statistics (plans PostgreSQL made for empty tables would scan them whole
            // as they grow).
            group_commits(&db, &ids, 1024, 1, templates, now)?;
            db.run_sync(|sql| sql.execute_batch("ANALYZE"))?;
            // Fewer rounds of one agent a group, which take a commit each.
            let rounds = if group == 1 { 1 } else { 4 };
            let (rate, p50, p99) = group_commits(&db, &ids, group, rounds, templates, now)?;
            println!("| {backend} | {group} | {rate:.0} | {p50:.2} | {p99:.2} |");
        }
    }
    Ok(())
}

/// The number after `flag` in `args`, else `default`.
fn number(args: &[String], flag: &str, default: usize) -> Result<usize> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(default), |s| s.parse())
        .with_context(|| format!("{flag} takes a number"))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let total = number(&args, "--windows", 20_000)?;
    let group_agents = number(&args, "--agents", 2_000)?;
    let now = Timestamp::from_system(SystemTime::now());
    let templates: Vec<MetricsWindow> = (0..64).map(|i| window(now.unix() - 1800, i)).collect();
    let bytes = postcard::to_stdvec(&templates[0])?.len();
    let held = monitoring::Held::from([("sensor-fault".to_owned(), 1)]);

    println!(
        "Metric windows of the sample model ({bytes} bytes each, postcard), {AGENTS} agents, {total} windows per line"
    );
    println!();
    println!("| batch | windows/s | ms per batch (p50) | ms per batch (p99) |");
    println!("|---:|---:|---:|---:|");
    let mut last = None;
    for batch in [1usize, 16, 256] {
        let dir = tempfile::tempdir()?;
        let db = Db::open(&dir.path().join(db::DB_FILE))?;
        let agents = enroll_agents(&db, AGENTS, now)?;
        let mut seq = vec![0u64; AGENTS];
        let mut latencies = Vec::new();
        let started = Instant::now();
        let mut sent = 0;
        let mut k = 0;
        while sent < total {
            let agent = k % AGENTS;
            let windows: Vec<SequencedWindow> = (0..batch)
                .map(|i| {
                    seq[agent] += 1;
                    SequencedWindow {
                        seq: seq[agent],
                        window: templates[(k + i) % templates.len()].clone(),
                    }
                })
                .collect();
            let id = agents[agent].clone();
            let held = held.clone();
            let t0 = Instant::now();
            let ingested =
                db.call_sync(move |c| monitoring::insert_windows(c, &id, &held, &windows, now))?;
            latencies.push(t0.elapsed());
            anyhow::ensure!(ingested.stored.len() == batch, "every window is new");
            sent += batch;
            k += 1;
        }
        let elapsed = started.elapsed();
        latencies.sort_unstable();
        let pick =
            |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
        println!(
            "| {batch} | {:.0} | {:.2} | {:.2} |",
            sent as f64 / elapsed.as_secs_f64(),
            pick(0.5),
            pick(0.99)
        );
        last = Some((dir, db, sent));
    }

    let (_dir, db, stored) = last.context("ran")?;
    let query = MetricsQuery {
        model: "sensor-fault".into(),
        version: None,
        group: Some("site".into()),
        agent: None,
        since: Timestamp::from_unix(now.unix() - 3600),
    };
    let started = Instant::now();
    let rollups = db.call_sync(move |c| monitoring::rollups(c, &query))?;
    let elapsed = started.elapsed();
    let merged = rollups.values().map(|v| v.rollup.windows).sum::<u64>();
    anyhow::ensure!(merged as usize == stored, "the rollup merges every window");
    println!();
    println!(
        "Rollup of {merged} windows (one model, group filter, the last hour): {:.0} ms, {:.0} windows/s",
        elapsed.as_secs_f64() * 1e3,
        merged as f64 / elapsed.as_secs_f64()
    );
    group_commit_table(group_agents, &templates, now)
}
