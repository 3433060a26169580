//! The admin console's two heaviest pages: the fleet page with 1,000 agents (rendered
//! from the agents as `GET /v1/agents` shows them) and the monitoring page over 30 days
//! of one-minute metric windows (read from SQLite through the monitoring service's
//! rollups, bucketed for the charts, drift against the reference, and rendered with its
//! SVG charts). Target: under 300 ms each.
//!
//! `cargo bench --bench console -- [--agents N]` (agents reporting over the 30 days,
//! default 1); prints a Markdown table for BENCHMARKS.md.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use falaj_common::keys::Sha256;
use falaj_common::metrics::{Counts, MetricsWindow};
use falaj_common::profile::{ColumnProfile, DataProfile};
use falaj_common::protocol::{EngineReport, SequencedWindow};
use falaj_common::sketch::LatencySketch;
use falaj_common::time::Timestamp;
use falaj_control::admin::AgentView;
use falaj_control::auth::{Principal, Role, Via};
use falaj_control::console::gate::Ctx;
use falaj_control::console::pages::fleet::{FleetFilter, render_list};
use falaj_control::console::pages::metrics::{self, MetricsFilter};
use falaj_control::db::{self, Db, NewAgent, TokenRow};
use falaj_control::monitoring;

const MODEL: &str = "sensor-fault";
const FEATURES: usize = 8;
const DAYS: u64 = 30;

fn ctx() -> Ctx {
    Ctx {
        principal: Principal {
            actor: "user:bench".into(),
            role: Role::Admin,
            via: Via::Session { id: "s".into(), user: "bench".into() },
        },
        csrf: "0".repeat(64),
        path: "/".into(),
    }
}

fn agents(n: usize, now: Timestamp) -> Vec<AgentView> {
    let statuses = ["connected", "offline", "revoked"];
    (0..n)
        .map(|i| AgentView {
            id: format!("agent-{i:012x}"),
            hostname: format!("pump-station-{i}"),
            group: format!("site-{}", i % 20),
            region: "eu-west-1".into(),
            status: statuses[i % 7 % 3].into(),
            last_seen: Some(Timestamp::from_unix(now.unix() - (i as u64 % 300)).to_string()),
            agent_version: "0.1.0".into(),
            applied_version: Some(40 + i as u64 % 5),
            held: vec![format!("{MODEL}@3"), format!("{MODEL}@4"), "pump-sensors@2".into()],
            active: vec![format!("{MODEL}@4"), "pump-sensors@2".into()],
            errors: if i % 50 == 0 { vec!["fetch: connection reset".into()] } else { vec![] },
            ready: i % 13 != 0,
            engines: vec![EngineReport {
                name: "tract-cpu".into(),
                device: "x86_64 CPU, 16 cores".into(),
            }],
            serving: [(format!("{MODEL}@4"), "tract-cpu".to_owned())].into(),
            trust_version: 1,
        })
        .collect()
}

fn values(k: usize) -> Vec<f64> {
    (0..1000u32).map(|i| f64::from(i % 97) * (k + 1) as f64).collect()
}

fn profile() -> DataProfile {
    let inputs = (0..FEATURES)
        .map(|k| ColumnProfile::of("sensors", k as u32, &format!("f{k}"), &values(k), 10))
        .collect();
    DataProfile { rows: 1000, inputs, outputs: vec![] }
}

fn window(start: u64, seed: u64, profile: &DataProfile) -> MetricsWindow {
    let mut latency = LatencySketch::default();
    for i in 0..120u32 {
        latency.record(500.0 + f64::from((i * 37 + seed as u32) % 400) * 10.0);
    }
    let inputs = profile
        .inputs
        .iter()
        .map(|c| (0..c.histogram.bin_count()).map(|b| ((b as u64 * 7 + seed) % 13) + 5).collect())
        .collect();
    MetricsWindow {
        model: MODEL.into(),
        version: 1,
        start: Timestamp::from_unix(start),
        seconds: 60,
        counts: Counts {
            requests: 120,
            errors: seed % 3,
            latency,
            rows: 120,
            inputs,
            ..Counts::default()
        },
    }
}

/// A database with `n` agents that each sent one window a minute for 30 days.
fn thirty_days(db: &Db, n: usize, now: Timestamp) -> Result<u64> {
    let profile = profile();
    let reference = profile.clone();
    db.call_sync(move |c| {
        let hash = |what: &str| Sha256::of(what.as_bytes());
        let bundle = db::BundleRow {
            name: MODEL.into(),
            version: 1,
            manifest_sha256: hash("manifest"),
            bundle_sha256: hash("bundle"),
            recipe_sha256: hash("recipe"),
            size: 9288,
            chunks: 1,
            pushed_at: now,
        };
        db::insert_bundle(c, &bundle)?;
        monitoring::set_reference(c, MODEL, 1, &reference)
    })?;
    let mut stored = 0;
    for a in 0..n {
        let id = format!("agent-{a}");
        let agent_id = id.clone();
        db.call_sync(move |c| {
            let secret = Sha256::of(agent_id.as_bytes());
            let expires = now.saturating_add(Duration::from_secs(86_400));
            let token = TokenRow {
                id: format!("t{a}"),
                group: "site".into(),
                region: "bench-1".into(),
                expires,
            };
            db::insert_token(c, &token, secret, now)?;
            let agent = NewAgent {
                id: agent_id.clone(),
                hostname: agent_id.clone(),
                agent_version: "bench".into(),
                serial: format!("s{a}"),
                cert_expires: expires,
            };
            let used =
                db::TokenUse { token_id: token.id, secret_sha256: secret, csr_sha256: secret };
            db::enroll(c, &used, "bench-1", &agent, now)?
                .map_err(|e| rusqlite::Error::InvalidParameterName(e.to_string()))?;
            Ok(())
        })?;
        let first = now.unix() - DAYS * 86_400;
        let minutes: Vec<u64> = (0..DAYS * 1440).collect();
        for chunk in minutes.chunks(256) {
            let batch: Vec<SequencedWindow> = chunk
                .iter()
                .map(|m| SequencedWindow {
                    seq: m + 1,
                    window: window(first + m * 60, *m, &profile),
                })
                .collect();
            let (id, held) = (id.clone(), monitoring::Held::from([(MODEL.to_owned(), 1)]));
            let at = Timestamp::from_unix(first + chunk[chunk.len() - 1] * 60);
            let ingested =
                db.call_sync(move |c| monitoring::insert_windows(c, &id, &held, &batch, at))?;
            stored += ingested.stored.len() as u64;
        }
    }
    Ok(stored)
}

fn percentiles(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort_unstable();
    let pick = |q: f64| times[((times.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    (pick(0.5), pick(0.95))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let reporting = args
        .iter()
        .position(|a| a == "--agents")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(1), |s| s.parse::<usize>())
        .context("--agents takes a number")?;
    let now = Timestamp::from_system(SystemTime::now());
    let ctx = ctx();

    let fleet = agents(1000, now);
    let filter = FleetFilter::default();
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..50 {
        let t0 = Instant::now();
        let html = render_list(&ctx, &fleet, &filter).into_string();
        times.push(t0.elapsed());
        bytes = html.len();
    }
    let (fleet_p50, fleet_p95) = percentiles(times);

    let dir = tempfile::tempdir()?;
    let db = Db::open(&dir.path().join(db::DB_FILE))?;
    let t0 = Instant::now();
    let stored = thirty_days(&db, reporting, now)?;
    let loaded = t0.elapsed();
    let filter = MetricsFilter {
        model: Some(MODEL.into()),
        since: Some("30d".into()),
        ..MetricsFilter::default()
    };
    let mut times = Vec::new();
    let mut rendering = Vec::new();
    let mut page = 0;
    for _ in 0..10 {
        let f = filter.clone();
        let t0 = Instant::now();
        let data = db.call_sync(move |c| {
            metrics::read(c, &f, None, Duration::from_secs(DAYS * 86_400), now)
        })?;
        let t1 = Instant::now();
        let html = metrics::render(&ctx, &filter, &data).into_string();
        times.push(t0.elapsed());
        rendering.push(t1.elapsed());
        page = html.len();
        anyhow::ensure!(html.contains("Drift of version 1"), "the page has its drift");
    }
    let (render_p50, _) = percentiles(rendering);
    let (metrics_p50, metrics_p95) = percentiles(times);
    // Where the page's time goes: the monitoring service's rollup of the whole span (what
    // `GET /v1/metrics?since=30d` does) on its own.
    let query = monitoring::MetricsQuery {
        model: MODEL.into(),
        version: None,
        group: None,
        agent: None,
        since: Timestamp::from_unix(now.unix() - DAYS * 86_400),
    };
    let t0 = Instant::now();
    db.call_sync(move |c| monitoring::rollups(c, &query))?;
    let rollup_ms = t0.elapsed().as_secs_f64() * 1e3;

    println!(
        "Console pages rendered in process (no HTTP), {stored} windows stored in {:.1} s",
        loaded.as_secs_f64()
    );
    println!();
    println!("| page | data | ms (p50) | ms (p95) | HTML bytes |");
    println!("|---|---|---:|---:|---:|");
    println!("| fleet | 1,000 agents | {fleet_p50:.1} | {fleet_p95:.1} | {bytes} |");
    println!(
        "| monitoring, 30 days | {stored} one-minute windows from {reporting} agent(s), {FEATURES} features | {metrics_p50:.0} | {metrics_p95:.0} | {page} |"
    );
    println!();
    println!(
        "Of the monitoring page, rendering (HTML and five SVG charts) takes {render_p50:.0} ms (p50); the same windows rolled up once by `monitoring::rollups` (the JSON API's path) take {rollup_ms:.0} ms."
    );
    Ok(())
}
