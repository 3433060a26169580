//! Feature store benchmark: a snapshot of 1,000,000 pumps (string keys `pump-000123`, nine
//! features: f32, f64, i64, bool and a category) written, loaded as an online table,
//! imported and served by an agent; then random lookups timed one by one:
//! `OnlineTable::get` alone, the whole `GET /v1/features/{view}/{entity}` route through
//! the agent's axum router in process (no socket), and the assembly of an 8-feature model
//! input (`OnlineTable::assemble`).
//!
//! `cargo bench -p falaj-agent --bench features -- [--entities N] [--lookups N]`; prints one
//! table (latencies in µs).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use axum::body::Body;
use axum::http::{Request, StatusCode};
use falaj_agent::features::SnapshotState;
use falaj_agent::import::{self, ImportOptions};
use falaj_agent::server::{ServeConfig, Server};
use falaj_agent::store::Store;
use falaj_common::bundle::{BundleBuilder, Content};
use falaj_common::features::{
    FeatureView, Key, OnlineTable, SnapshotSpec, SnapshotWriter, Value, pii,
};
use falaj_common::keys::SigningKey;
use falaj_common::random::SeededRng;
use falaj_common::time::Timestamp;
use falaj_common::trust::RootSpec;
use http_body_util::BodyExt;
use tower::ServiceExt;

const VIEW: &str = r#"
name = "pumps"
timestamp = "event_time"

[entity]
name = "pump_id"
type = "string"

[[features]]
name = "temperature"
type = "f32"
description = "Bearing temperature, degrees C"
owner = "bench"

[[features]]
name = "vibration"
type = "f32"
description = "RMS vibration, mm/s"
owner = "bench"

[[features]]
name = "current"
type = "f32"
description = "Motor current, A"
owner = "bench"

[[features]]
name = "pressure"
type = "f64"
description = "Outlet pressure, bar"
owner = "bench"

[[features]]
name = "hours"
type = "f64"
description = "Running hours since service"
owner = "bench"

[[features]]
name = "starts"
type = "i64"
description = "Motor starts in the hour"
owner = "bench"

[[features]]
name = "alarms"
type = "i64"
nullable = true
default = 0
description = "Alarms in the hour"
owner = "bench"

[[features]]
name = "running"
type = "bool"
description = "Running at the hour's end"
owner = "bench"

[[features]]
name = "mode"
type = "category"
values = ["auto", "manual", "off"]
description = "Control mode"
owner = "bench"
"#;

/// The eight numeric features a model reads, in input order.
const INPUT: [&str; 8] =
    ["temperature", "vibration", "current", "pressure", "hours", "starts", "alarms", "running"];

const REGION: &str = "bench-1";

fn key(i: usize) -> String {
    format!("pump-{i:06}")
}

/// Writes the snapshot payload of `entities` pumps with seeded values.
fn write_snapshot(view: &FeatureView, entities: usize) -> Result<(SnapshotSpec, Vec<u8>)> {
    let plan = pii::plan(view, None)?;
    let spec = SnapshotSpec::new(view, 1, &plan, Timestamp::from_system(SystemTime::now()), "all");
    let mut writer = SnapshotWriter::new(view, spec, plan, None, Vec::new())?;
    let mut rng = SeededRng::new(11);
    let modes = ["auto", "manual", "off"];
    for i in 0..entities {
        let values = vec![
            Value::F32(rng.normal(60.0, 8.0) as f32),
            Value::F32(rng.range(0.0, 12.0) as f32),
            Value::F32(rng.normal(40.0, 5.0) as f32),
            Value::F64(rng.normal(3.0, 0.4)),
            Value::F64(rng.range(0.0, 9000.0)),
            Value::I64(rng.below(20) as i64),
            if rng.below(10) == 0 { Value::Null } else { Value::I64(rng.below(3) as i64) },
            Value::Bool(rng.below(4) != 0),
            Value::Str(modes[rng.below(3)].to_owned()),
        ];
        writer.push(Key::Str(key(i)), 1_800_000_000_000_000 + i as i64, values)?;
    }
    Ok(writer.finish())
}

/// Resident set size of this process in bytes (Linux), if known.
fn rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

struct Row {
    what: &'static str,
    count: usize,
    p50: f64,
    p99: f64,
    p999: f64,
    mean: f64,
}

fn row(what: &'static str, mut times: Vec<Duration>) -> Row {
    times.sort_unstable();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let pick = |q: f64| us(times[((times.len() - 1) as f64 * q).round() as usize]);
    let mean = times.iter().map(|d| us(*d)).sum::<f64>() / times.len() as f64;
    Row { what, count: times.len(), p50: pick(0.50), p99: pick(0.99), p999: pick(0.999), mean }
}

/// A data directory initialised for `REGION` whose trust root names `signer`.
fn init_site(dir: &Path, signer: &SigningKey) -> Result<()> {
    let rng = ring::rand::SystemRandom::new();
    let root = SigningKey::generate(&rng).map_err(|e| anyhow::anyhow!("{e}"))?.0;
    let now = SystemTime::now();
    let trust = RootSpec {
        version: 1,
        region: REGION,
        expires: Timestamp::from_system(now).saturating_add(Duration::from_secs(86_400)),
        root_keys: &[root],
        root_threshold: 1,
        signing_keys: &[signer.public()],
        signing_threshold: 1,
    }
    .sign(&[])?;
    Store::init(dir, REGION, &trust.to_json(), now)?;
    Ok(())
}

fn parse_args() -> Result<(usize, usize)> {
    let (mut entities, mut lookups) = (1_000_000, 200_000);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--entities" => entities = args.next().context("--entities N")?.parse()?,
            "--lookups" => lookups = args.next().context("--lookups N")?.parse()?,
            "--bench" => {}
            other => bail!("unknown argument {other:?} (--entities N, --lookups N)"),
        }
    }
    Ok((entities, lookups))
}

#[allow(clippy::too_many_lines)] // one straight script, in the order it prints
fn main() -> Result<()> {
    let (entities, lookups) = parse_args()?;
    let view = FeatureView::from_toml(VIEW)?;

    let started = Instant::now();
    let (spec, payload) = write_snapshot(&view, entities)?;
    let write_time = started.elapsed();
    let payload_len = payload.len() as u64;

    // RSS growth is the table (plus what the decoder freed but the allocator kept).
    let before = rss();
    let started = Instant::now();
    let table = OnlineTable::load(spec.clone(), &payload)?;
    let load_time = started.elapsed();
    let table_rss = before.zip(rss()).map(|(b, a)| a.saturating_sub(b));
    drop(table);

    // The agent: a signed bundle imported (verified, checked by loading it) and served.
    let work = tempfile::tempdir()?;
    let data_dir = work.path().join("agent");
    let signer = SigningKey::generate(&ring::rand::SystemRandom::new())
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .0;
    init_site(&data_dir, &signer)?;
    let created = Timestamp::from_system(SystemTime::now());
    let file = spec.file.clone();
    let (_, bundle) = BundleBuilder::new(
        "pumps",
        1,
        REGION,
        created,
        created.saturating_add(Duration::from_secs(86_400)),
        Content::Features(spec),
    )
    .file(&file, payload)
    .build(&[&signer])?;
    let bundle_path = work.path().join("pumps-1.falaj");
    std::fs::write(&bundle_path, &bundle)?;
    drop(bundle);
    let started = Instant::now();
    let mut store = Store::open(&data_dir)?;
    import::import_file(
        &mut store,
        &bundle_path,
        &ImportOptions::new(SystemTime::now()),
        &mut |_, _| {},
    )?;
    drop(store);
    let import_time = started.elapsed();

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let config = ServeConfig { http: "127.0.0.1:0".parse()?, ..ServeConfig::default() };
    let started = Instant::now();
    let server = runtime.block_on(Server::bind(data_dir.clone(), config))?;
    let start_time = started.elapsed();
    let catalog = server.registry().catalog();
    let Some(SnapshotState::Ready(table)) = catalog.features.get("pumps").map(|e| e.state.clone())
    else {
        bail!("the agent did not load the snapshot");
    };
    drop(catalog);

    let mut rng = SeededRng::new(5);
    let keys: Vec<String> = (0..lookups).map(|_| key(rng.below(entities))).collect();

    // (a) OnlineTable::get.
    let mut times = Vec::with_capacity(lookups);
    let mut found = 0usize;
    for k in &keys {
        let started = Instant::now();
        let got = table.get(k);
        times.push(started.elapsed());
        found += usize::from(matches!(got, Ok(Some(_))));
    }
    if found != lookups {
        bail!("{} of {lookups} lookups missed", lookups - found);
    }
    let get_row = row("OnlineTable::get (9 features)", times);

    // (c) assemble the 8 numeric features into an input row.
    let positions: Vec<usize> =
        INPUT.iter().map(|n| table.spec().position(n).context("feature")).collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(INPUT.len());
    let mut times = Vec::with_capacity(lookups);
    for k in &keys {
        out.clear();
        let started = Instant::now();
        table.assemble(k, &positions, &mut out)?;
        times.push(started.elapsed());
    }
    let assemble_row = row("OnlineTable::assemble (8 f32)", times);

    // (b) the HTTP route through the router, in process.
    let router = server.router();
    let times = runtime.block_on(async {
        let mut times = Vec::with_capacity(lookups);
        for k in &keys {
            let request = Request::get(format!("/v1/features/pumps/{k}")).body(Body::empty())?;
            let started = Instant::now();
            let response = router.clone().oneshot(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            times.push(started.elapsed());
            if status != StatusCode::OK || body.is_empty() {
                bail!("GET /v1/features/pumps/{k}: {status}");
            }
        }
        Ok(times)
    })?;
    let http_row = row("GET /v1/features/{view}/{entity} (router)", times);
    drop(server);

    println!(
        "snapshot: {entities} entities, 9 features; payload {:.1} MiB (postcard rows)",
        mib(payload_len)
    );
    println!("write payload             {:>9.0} ms", write_time.as_secs_f64() * 1e3);
    println!(
        "OnlineTable::load         {:>9.0} ms   (RSS grew {})",
        load_time.as_secs_f64() * 1e3,
        table_rss.map_or("unknown".to_owned(), |b| format!("{:.1} MiB", mib(b)))
    );
    println!(
        "import (verify + load)    {:>9.0} ms   (bundle {:.1} MiB)",
        import_time.as_secs_f64() * 1e3,
        mib(std::fs::metadata(&bundle_path)?.len())
    );
    println!("agent start (load)        {:>9.0} ms", start_time.as_secs_f64() * 1e3);
    println!();
    println!(
        "| {:<42} | {:>8} | {:>8} | {:>8} | {:>8} | {:>8} |",
        "lookup of a random key", "n", "p50 µs", "p99 µs", "p999 µs", "mean µs"
    );
    println!("|{:-<44}|{:->10}|{:->10}|{:->10}|{:->10}|{:->10}|", "", "", "", "", "", "");
    for r in [get_row, http_row, assemble_row] {
        println!(
            "| {:<42} | {:>8} | {:>8.2} | {:>8.2} | {:>8.2} | {:>8.2} |",
            r.what, r.count, r.p50, r.p99, r.p999, r.mean
        );
    }
    Ok(())
}
