//! A soak: agents enrolled into one control plane, each serving the sample model, take
//! requests at a fixed rate, spread over them, for a while; the process's memory, the
//! latency and the errors are sampled as it runs, and at the end every request served
//! must be counted once by the control plane. Run short by `tests/it/soak.rs` and in full
//! by `cargo bench --bench soak` (BENCHMARKS.md).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use falaj_agent::enroll::{self, EnrollOptions};
use falaj_agent::reporting::ReportConfig;
use falaj_agent::sync::SyncConfig;
use falaj_common::sample::{self, FEATURE_COUNT};

use super::{Control, RunningAgent, eventually};
use falaj_control::sql::params;

const GROUP: &str = "soak";
const MODEL: &str = "pump";

/// How hard and how long.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// Agents enrolled.
    pub agents: usize,
    /// Requests a second, over all agents.
    pub rate: u32,
    /// How long requests are sent.
    pub duration: Duration,
    /// Agents' metric windows and heartbeats.
    pub window: Duration,
    /// How often a sample is taken.
    pub every: Duration,
}

/// One sample, over the interval since the previous one.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Since requests began.
    pub at: Duration,
    /// The process's resident memory.
    pub rss_mib: f64,
    /// Requests answered in the interval.
    pub requests: u64,
    /// Of which failed.
    pub errors: u64,
    /// Their 99th percentile latency.
    pub p99_ms: f64,
}

/// What a soak measured.
#[derive(Debug, Clone)]
pub struct SoakReport {
    /// Resident memory once every agent served, before requests began.
    pub rss_start_mib: f64,
    /// One per interval.
    pub samples: Vec<Sample>,
    /// Requests sent.
    pub sent: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Requests the control plane counted in the windows it stored.
    pub counted: u64,
    /// Latency percentiles over the whole run.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// This process's resident memory, from `/proc/self/status`.
pub fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// Latencies (ms) and errors of the requests answered since the last take.
#[derive(Default)]
struct Tally {
    latencies: std::sync::Mutex<Vec<f64>>,
    errors: AtomicU64,
}

impl Tally {
    fn take(&self) -> (Vec<f64>, u64) {
        let mut latencies = std::mem::take(&mut *self.latencies.lock().unwrap());
        latencies.sort_by(f64::total_cmp);
        (latencies, self.errors.swap(0, Ordering::Relaxed))
    }
}

async fn start_agents(control: &Control, work: &Path, options: &SoakOptions) -> Vec<RunningAgent> {
    let sync = SyncConfig {
        heartbeat: options.window,
        report: Some(ReportConfig { window: options.window, outbox_cap: 100_000 }),
        ..super::sync_config()
    };
    let mut agents = Vec::with_capacity(options.agents);
    for i in 0..options.agents {
        let dir = work.join(format!("agent-{i}"));
        let enroll = EnrollOptions {
            control_plane: control.quic.to_string(),
            token: control.token(GROUP).await,
            hostname: format!("soak-{i}"),
            region: None,
        };
        enroll::enroll(&dir, &enroll, SystemTime::now()).await.unwrap();
        agents.push(RunningAgent::start_with(&dir, sync.clone()).await);
    }
    agents
}

/// Runs a soak in `work`.
pub async fn soak(work: &Path, options: &SoakOptions) -> SoakReport {
    let control = Control::start(&work.join("control")).await;
    control.push_sample(work, MODEL, 1).await;
    control.client.deploy(GROUP, MODEL, 1).await.unwrap();
    let agents = start_agents(&control, work, options).await;
    for agent in &agents {
        eventually(Duration::from_secs(300), "every agent serves the model", || async {
            agent.active_version(MODEL).await.as_deref() == Some("1")
        })
        .await;
    }
    let rss_start_mib = rss_mib();

    let rows = sample::generate(64, 11, &[]).features;
    let client = reqwest::Client::new();
    let urls: Vec<String> =
        agents.iter().map(|a| a.url(&format!("/v2/models/{MODEL}/infer"))).collect();
    let tally = Arc::new(Tally::default());
    let mut all = Vec::new();
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / options.rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (started, mut next_sample) = (Instant::now(), options.every);
    let mut sent = 0u64;
    let mut in_flight = tokio::task::JoinSet::new();
    while started.elapsed() < options.duration {
        tick.tick().await;
        let row = (sent as usize) % 64;
        let body = serde_json::json!({"inputs": [{"name": "sensors", "shape": [1, FEATURE_COUNT],
            "datatype": "FP32", "data": &rows[row * FEATURE_COUNT..(row + 1) * FEATURE_COUNT]}]});
        let (client, url, counts) =
            (client.clone(), urls[sent as usize % urls.len()].clone(), Arc::clone(&tally));
        in_flight.spawn(async move {
            let t0 = Instant::now();
            let ok =
                client.post(&url).json(&body).send().await.is_ok_and(|r| r.status().is_success());
            if !ok {
                counts.errors.fetch_add(1, Ordering::Relaxed);
            }
            counts.latencies.lock().unwrap().push(t0.elapsed().as_secs_f64() * 1e3);
        });
        sent += 1;
        while in_flight.try_join_next().is_some() {}
        if started.elapsed() >= next_sample {
            next_sample += options.every;
            let (latencies, errors) = tally.take();
            samples.push(Sample {
                at: started.elapsed(),
                rss_mib: rss_mib(),
                requests: latencies.len() as u64,
                errors,
                p99_ms: percentile(&latencies, 0.99),
            });
            all.extend(latencies);
        }
    }
    while in_flight.join_next().await.is_some() {}
    let (latencies, last_errors) = tally.take();
    all.extend(latencies);
    all.sort_by(f64::total_cmp);
    let errors = samples.iter().map(|s| s.errors).sum::<u64>() + last_errors;

    // Every window closed and delivered: the control plane counts what was served.
    for agent in &agents {
        let reporter = Arc::clone(&agent.reporter);
        tokio::task::spawn_blocking(move || reporter.close_windows(SystemTime::now()))
            .await
            .unwrap()
            .unwrap();
    }
    let sql = "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) FROM windows WHERE model = 'pump'";
    let counted = || async {
        let n: i64 = control
            .shared
            .db
            .run(move |s| s.query_row(sql, params![], |r| r.get(0)))
            .await
            .unwrap();
        n as u64
    };
    eventually(Duration::from_secs(120), "every window is delivered", || async {
        counted().await >= sent - errors
    })
    .await;
    let counted = counted().await;
    for agent in agents {
        agent.stop().await;
    }
    control.stop().await;
    SoakReport {
        rss_start_mib,
        samples,
        sent,
        errors,
        counted,
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
    }
}
