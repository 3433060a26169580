//! The soak of issue 17: agents in this process, enrolled into a control plane over QUIC
//! on loopback, serving the sample model over HTTP, with requests at a fixed rate spread
//! over them; prints the process's memory, the requests, errors and p99 latency per
//! interval, then whether every request was counted once by the control plane.
//!
//! `cargo bench --bench soak -- [--agents 200] [--rate 500] [--minutes 10] [--window 10]`
//! (window and heartbeat in seconds); prints Markdown for BENCHMARKS.md.

#[path = "../tests/fleet/database.rs"]
mod database;
#[path = "../tests/fleet/mod.rs"]
mod fleet;

use std::time::Duration;

use fleet::soak::{SoakOptions, soak};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let options = SoakOptions {
        agents: arg(&args, "--agents", 200),
        rate: arg(&args, "--rate", 500),
        duration: Duration::from_secs(60 * arg(&args, "--minutes", 10)),
        window: Duration::from_secs(arg(&args, "--window", 10)),
        every: Duration::from_secs(60),
    };
    let work = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(soak(work.path(), &options));
    println!(
        "Soak: {} agents, {} requests/s for {} s; RSS {:.0} MiB once every agent served",
        options.agents,
        options.rate,
        options.duration.as_secs(),
        report.rss_start_mib
    );
    println!();
    println!("| minute | RSS (MiB) | requests | errors | p99 (ms) |");
    println!("|---:|---:|---:|---:|---:|");
    for s in &report.samples {
        println!(
            "| {:.0} | {:.0} | {} | {} | {:.1} |",
            s.at.as_secs_f64() / 60.0,
            s.rss_mib,
            s.requests,
            s.errors,
            s.p99_ms
        );
    }
    println!();
    println!(
        "Sent {}, errors {}, counted by the control plane {} ({}); p50 {:.2} ms, p99 {:.2} ms",
        report.sent,
        report.errors,
        report.counted,
        if report.counted == report.sent { "each once" } else { "MISMATCH" },
        report.p50_ms,
        report.p99_ms
    );
    anyhow::ensure!(
        report.counted == report.sent,
        "requests counted {} != sent {}",
        report.counted,
        report.sent
    );
    Ok(())
}
