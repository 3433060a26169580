//! Rollout benchmark: what progressive delivery costs a request.
//!
//! - Routing, in process: a canary's assignment of a routing key (SHA-256 of the rollout
//!   id and the key, the step at the current time), in ns per request, beside the p50 of
//!   an HTTP request to the agent in the same run.
//! - Shadowing: the agent serving the sample model with every request mirrored to a
//!   candidate (a second sample model) against the same agent without a rollout, in
//!   alternating rounds; client p50 and p99 of both, and how many mirrored requests the
//!   candidate ran and dropped.
//!
//! `cargo bench --bench rollouts -- [--seconds N]`; prints Markdown for BENCHMARKS.md.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use falaj_agent::import::{self, ImportOptions};
use falaj_agent::rollout::LiveRollout;
use falaj_agent::server::{ServeConfig, Server};
use falaj_agent::store::{InstallMode, Store, StoredRollout};
use falaj_common::bundle::RuntimeHint;
use falaj_common::metrics::Counts;
use falaj_common::rollout::{RolloutSpec, Share, Step, Strategy};
use falaj_common::sample::{self, FEATURE_COUNT};
use falaj_common::time::Timestamp;
use falaj_control::bundle::{self, BuildOptions};
use falaj_control::keys::{self, InitOptions};
use falaj_control::sample::{INPUT, SampleOptions};

const MODEL: &str = "sensor-fault";
/// Alternating rounds of each server.
const ROUNDS: usize = 5;

fn spec(strategy: Strategy, share: f64, mirror: f64) -> RolloutSpec {
    RolloutSpec {
        id: "ro-bench".into(),
        model: MODEL.into(),
        baseline: 1,
        candidate: 2,
        strategy,
        steps: vec![Step {
            at: Timestamp::from_unix(0),
            share: Share::from_percent(share).expect("a share"),
        }],
        mirror: Share::from_percent(mirror).expect("a share"),
        guards: vec!["error_rate<0.5".parse().expect("a guard")],
        min_requests: 200,
    }
}

/// Nanoseconds per routing decision (key hashed with the rollout id, step looked up at the
/// current time), over `n` distinct keys.
fn routing_ns(n: usize) -> f64 {
    let live = LiveRollout::from_stored(StoredRollout {
        spec: spec(Strategy::Canary, 30.0, 0.0),
        baseline: Counts::default(),
        candidate: Counts::default(),
        rolled_back: None,
    });
    let keys: Vec<String> = (0..n).map(|i| format!("customer-{i:08}")).collect();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        let mut candidate = 0usize;
        for key in &keys {
            let now = Timestamp::from_system(SystemTime::now());
            candidate += usize::from(live.route(key.as_bytes(), now).candidate);
        }
        std::hint::black_box(candidate);
        best = best.min(started.elapsed().as_secs_f64() * 1e9 / n as f64);
    }
    best
}

fn build(keys: &Path, model: &Path, reference: &Path, version: u64, out: &Path) -> Result<()> {
    bundle::build(
        &BuildOptions {
            keys: keys.to_owned(),
            model: model.to_owned(),
            name: MODEL.into(),
            version,
            reference: Some(reference.to_owned()),
            runtime: RuntimeHint::Cpu,
            lifetime: bundle::DEFAULT_LIFETIME,
            out: out.to_owned(),
            features: None,
            shapes: std::collections::BTreeMap::new(),
        },
        SystemTime::now(),
    )?;
    Ok(())
}

struct Latency {
    requests: usize,
    p50_us: f64,
    p99_us: f64,
}

/// One client sending single-row JSON requests for `seconds`.
async fn client(url: &str, bodies: &[String], seconds: f64) -> Result<Vec<Duration>> {
    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let mut latencies = Vec::new();
    for body in bodies.iter().cycle() {
        let t0 = Instant::now();
        let response = client
            .post(url)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await?
            .error_for_status()?;
        std::hint::black_box(response.bytes().await?);
        latencies.push(t0.elapsed());
        if Instant::now() > stop {
            break;
        }
    }
    Ok(latencies)
}

fn summary(mut latencies: Vec<Duration>) -> Latency {
    latencies.sort_unstable();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    Latency { requests: latencies.len(), p50_us: pick(0.5), p99_us: pick(0.99) }
}

/// `clients` concurrent clients for `seconds`, each on a thread of its own (apart from
/// the server's runtime); every latency.
fn load(url: &str, bodies: &[String], seconds: f64, clients: usize) -> Result<Vec<Duration>> {
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let mut bodies = bodies.to_vec();
            bodies.rotate_left(c);
            let url = url.to_owned();
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(client(&url, &bodies, seconds))
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for thread in threads {
        latencies.extend(thread.join().map_err(|_| anyhow::anyhow!("a client panicked"))??);
    }
    Ok(latencies)
}

/// The candidate's mirrored runs, read from the agent's Prometheus text.
async fn shadow_figures(base: &str) -> Result<(f64, f64)> {
    let text = reqwest::get(format!("{base}/metrics")).await?.text().await?;
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains("version=\"2\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((value("falaj_shadow_compared_rows_total"), value("falaj_shadow_dropped_total")))
}

/// Two agent data directories holding the sample model as version 1: one without a
/// rollout, one also holding a second sample model as version 2 with a shadow rollout
/// mirroring every request to it.
fn prepare(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let now = SystemTime::now();
    let keys_dir = dir.join("keys");
    keys::init(&keys_dir, &InitOptions::new("bench-1"), now)?;
    let mut bundles = Vec::new();
    for (version, seed) in [(1, 7), (2, 11)] {
        let made = falaj_control::sample::write(
            &dir.join(format!("sample-{version}")),
            &SampleOptions { seed, ..SampleOptions::default() },
        )?;
        let out = dir.join(format!("{MODEL}-{version}.falaj"));
        build(&keys_dir, &made.model, &made.reference, version, &out)?;
        bundles.push(out);
    }
    let trust = std::fs::read(keys_dir.join("root.json"))?;
    // One agent without a rollout, one mirroring every request to version 2.
    let mut agents = Vec::new();
    for shadow in [false, true] {
        let agent = dir.join(if shadow { "shadow" } else { "plain" });
        let mut store = Store::init(&agent, "bench-1", &trust, now)?;
        import::import_file(&mut store, &bundles[0], &ImportOptions::new(now), &mut |_, _| {})?;
        if shadow {
            let mut options = ImportOptions::new(now);
            options.mode = InstallMode { activate: false, managed: false };
            import::import_file(&mut store, &bundles[1], &options, &mut |_, _| {})?;
            store.set_rollouts(&[spec(Strategy::Shadow, 0.0, 100.0)])?;
        }
        agents.push(agent);
    }

    Ok(agents)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(2.0), |s| s.parse::<f64>())
        .context("--seconds takes a number")?;
    let dir = tempfile::tempdir()?;
    let agents = prepare(dir.path())?;

    let data = sample::generate(256, 1234, &[]);
    let bodies: Vec<String> = data
        .features
        .chunks(FEATURE_COUNT)
        .map(|x| {
            serde_json::json!({"inputs": [{"name": INPUT, "shape": [1, FEATURE_COUNT], "datatype": "FP32", "data": x}]})
                .to_string()
        })
        .collect();

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut bases = Vec::new();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for agent in &agents {
        let config = ServeConfig { http: "127.0.0.1:0".parse()?, ..ServeConfig::default() };
        let server = runtime.block_on(Server::bind(agent.clone(), config))?;
        bases.push(format!("http://{}", server.local_addr()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop_tx);
        tasks.push(runtime.spawn(server.run(async { drop(stop_rx.await) })));
    }
    let urls: Vec<String> = bases.iter().map(|b| format!("{b}/v2/models/{MODEL}/infer")).collect();
    let mut rows = Vec::new();
    for url in &urls {
        load(url, &bodies, 0.5, 1)?; // warm up
    }
    for clients in [1, 2] {
        let (mut plain, mut shadowed) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            plain.extend(load(&urls[0], &bodies, seconds, clients)?);
            shadowed.extend(load(&urls[1], &bodies, seconds, clients)?);
        }
        rows.push((clients, summary(plain), summary(shadowed)));
    }
    let (compared, dropped) = runtime.block_on(shadow_figures(&bases[1]))?;
    for stop in stops {
        let _ = stop.send(());
    }
    for task in tasks {
        runtime.block_on(task)??;
    }
    let routing = routing_ns(100_000);

    println!(
        "Rollouts: {ROUNDS} alternating rounds of {seconds} s per server and client count, single-row JSON requests of the sample model."
    );
    println!();
    println!("| | ns / request | share of an HTTP request (p50, 1 client) |");
    println!("|---|---:|---:|");
    println!(
        "| routing (canary at 30 %, key hashed with the rollout id) | {routing:.0} | {:.3} % |",
        routing / (rows[0].1.p50_us * 1e3) * 100.0
    );
    println!();
    println!("| clients | server | requests | p50 µs | p99 µs | p99 against no rollout |");
    println!("|---:|---|---:|---:|---:|---:|");
    for (clients, plain, shadowed) in &rows {
        for (name, l) in [("no rollout", plain), ("shadow, 100 % mirrored", shadowed)] {
            println!(
                "| {clients} | {name} | {} | {:.0} | {:.0} | {:+.1} % |",
                l.requests,
                l.p50_us,
                l.p99_us,
                (l.p99_us / plain.p99_us - 1.0) * 100.0
            );
        }
    }
    println!();
    let mirrored: usize = rows.iter().map(|(_, _, s)| s.requests).sum();
    println!(
        "The candidate compared {compared:.0} rows (warm-up included) and dropped {dropped:.0} of the {mirrored} mirrored requests timed."
    );
    Ok(())
}
