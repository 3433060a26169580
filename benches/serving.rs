//! Serving benchmark: the sample model called in-process (tract, as the agent's engine)
//! and served over HTTP by the agent (Open Inference Protocol, JSON and binary tensors),
//! at 1 and 2 concurrent clients, beside ONNX Runtime (Python, one thread) on the same
//! model and inputs. Then the cost of measuring: the same server with metrics on and off
//! in alternating rounds, and the recording calls of the hot path on their own.
//!
//! `cargo bench --bench serving -- [--seconds N]`; prints a Markdown table for
//! BENCHMARKS.md. The anchor needs Python with onnxruntime (`FALAJ_PYTHON` or `python3`).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use falaj_agent::import::{self, ImportOptions};
use falaj_agent::metrics::ModelMetrics;
use falaj_agent::server::{ServeConfig, Server};
use falaj_agent::store::Store;
use falaj_common::bundle::RuntimeHint;
use falaj_common::onnx::OnnxModel;
use falaj_common::sample::{self, FEATURE_COUNT};
use falaj_common::tensor::{Tensor, TensorData};
use falaj_control::bundle::{self, BuildOptions};
use falaj_control::keys::{self, InitOptions};
use falaj_control::sample::{INPUT, SampleOptions};

/// Distinct input rows cycled through by every mode.
const ROWS: usize = 256;

struct Stats {
    mode: String,
    clients: usize,
    requests: usize,
    p50_us: f64,
    p99_us: f64,
    throughput: f64,
}

fn stats(mode: &str, clients: usize, mut latencies: Vec<Duration>, wall: Duration) -> Stats {
    latencies.sort_unstable();
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    Stats {
        mode: mode.to_owned(),
        clients,
        requests: latencies.len(),
        p50_us: pick(0.50),
        p99_us: pick(0.99),
        throughput: latencies.len() as f64 / wall.as_secs_f64(),
    }
}

fn in_process(
    model: &Arc<OnnxModel>,
    rows: &Arc<Vec<Vec<f32>>>,
    clients: usize,
    seconds: f64,
) -> Stats {
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (model, rows) = (Arc::clone(model), Arc::clone(rows));
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut k = c;
                loop {
                    let x = rows[k % rows.len()].clone();
                    let t0 = Instant::now();
                    let input =
                        Tensor { shape: vec![1, FEATURE_COUNT as u64], data: TensorData::Fp32(x) };
                    let out = model.run(vec![input]).expect("the model runs");
                    latencies.push(t0.elapsed());
                    std::hint::black_box(out);
                    k += clients;
                    if Instant::now() > stop {
                        return latencies;
                    }
                }
            })
        })
        .collect();
    let latencies = threads.into_iter().flat_map(|t| t.join().expect("thread")).collect();
    stats("in-process (tract)", clients, latencies, started.elapsed())
}

/// The floor under any HTTP figure here: a 200-byte TCP round trip on loopback between
/// two threads, no HTTP, no model.
fn tcp_floor(seconds: f64) -> Result<Stats> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut socket, _) = listener.accept()?;
        socket.set_nodelay(true)?;
        let mut buf = [0u8; 200];
        while socket.read_exact(&mut buf).is_ok() {
            socket.write_all(&buf)?;
        }
        Ok(())
    });
    let mut socket = std::net::TcpStream::connect(addr)?;
    socket.set_nodelay(true)?;
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut buf = [7u8; 200];
    while Instant::now() < stop {
        let t0 = Instant::now();
        socket.write_all(&buf)?;
        socket.read_exact(&mut buf)?;
        latencies.push(t0.elapsed());
    }
    drop(socket);
    echo.join().map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    Ok(stats("loopback TCP round trip (floor)", 1, latencies, started.elapsed()))
}

fn request_body(x: &[f32], binary: bool) -> (Vec<u8>, Option<usize>) {
    if binary {
        let header = serde_json::json!({
            "inputs": [{"name": INPUT, "shape": [1, FEATURE_COUNT], "datatype": "FP32",
                        "parameters": {"binary_data_size": FEATURE_COUNT * 4}}],
            "parameters": {"binary_data_output": true},
        })
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend(x.iter().flat_map(|v| v.to_le_bytes()));
        (body, Some(header.len()))
    } else {
        let body = serde_json::json!({
            "inputs": [{"name": INPUT, "shape": [1, FEATURE_COUNT], "datatype": "FP32", "data": x}],
        });
        (body.to_string().into_bytes(), None)
    }
}

/// `clients` callers, each on its own thread with its own runtime and keep-alive
/// connection (as separate client processes would be), for `seconds`.
fn over_http(
    url: &str,
    rows: &[Vec<f32>],
    clients: usize,
    seconds: f64,
    binary: bool,
) -> Result<Stats> {
    let bodies: Arc<Vec<_>> = Arc::new(rows.iter().map(|x| request_body(x, binary)).collect());
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (bodies, url) = (Arc::clone(&bodies), url.to_owned());
            std::thread::spawn(move || -> Result<Vec<Duration>> {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                runtime.block_on(async move {
                    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
                    let mut latencies = Vec::new();
                    let mut k = c;
                    loop {
                        let (body, json_len) = &bodies[k % bodies.len()];
                        let t0 = Instant::now();
                        let mut request = client.post(&url).body(body.clone());
                        request = match json_len {
                            Some(n) => request.header("Inference-Header-Content-Length", *n),
                            None => request.header("Content-Type", "application/json"),
                        };
                        let response = request.send().await?.error_for_status()?;
                        let bytes = response.bytes().await?;
                        latencies.push(t0.elapsed());
                        std::hint::black_box(bytes);
                        k += clients;
                        if Instant::now() > stop {
                            return Ok(latencies);
                        }
                    }
                })
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for thread in threads {
        latencies.extend(thread.join().map_err(|_| anyhow::anyhow!("client thread panicked"))??);
    }
    let mode = if binary { "HTTP, binary tensors" } else { "HTTP, JSON" };
    Ok(stats(mode, clients, latencies, started.elapsed()))
}

fn onnx_runtime(model: &Path, inputs: &Path, seconds: f64) -> Result<Vec<Stats>> {
    let python = std::env::var("FALAJ_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/ort_anchor.py");
    let out = std::process::Command::new(&python)
        .arg(script)
        .arg(model)
        .arg(inputs)
        .arg(ROWS.to_string())
        .arg(FEATURE_COUNT.to_string())
        .arg(seconds.to_string())
        .output()
        .with_context(|| format!("running {python}"))?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mode =
        format!("ONNX Runtime {} (Python, 1 thread)", json["onnxruntime"].as_str().unwrap_or("?"));
    Ok(json["results"]
        .as_array()
        .context("no results")?
        .iter()
        .map(|r| Stats {
            mode: mode.clone(),
            clients: r["clients"].as_u64().unwrap_or(0) as usize,
            requests: r["requests"].as_u64().unwrap_or(0) as usize,
            p50_us: r["p50_us"].as_f64().unwrap_or(f64::NAN),
            p99_us: r["p99_us"].as_f64().unwrap_or(f64::NAN),
            throughput: r["throughput_rps"].as_f64().unwrap_or(f64::NAN),
        })
        .collect())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(5.0), |s| s.parse::<f64>())
        .context("--seconds takes a number")?;
    let dir = tempfile::tempdir()?;
    let now = SystemTime::now();
    let made = falaj_control::sample::write(&dir.path().join("sample"), &SampleOptions::default())?;
    let keys_dir = dir.path().join("keys");
    keys::init(&keys_dir, &InitOptions::new("bench-1"), now)?;
    let bundle_path = dir.path().join("sensor-fault.falaj");
    bundle::build(
        &BuildOptions {
            keys: keys_dir.clone(),
            model: made.model.clone(),
            name: "sensor-fault".into(),
            version: 1,
            reference: Some(made.reference.clone()),
            runtime: RuntimeHint::Cpu,
            lifetime: bundle::DEFAULT_LIFETIME,
            out: bundle_path.clone(),
            features: None,
            shapes: std::collections::BTreeMap::new(),
        },
        now,
    )?;
    let agent = dir.path().join("agent");
    let trust = std::fs::read(keys_dir.join("root.json"))?;
    let mut store = Store::init(&agent, "bench-1", &trust, now)?;
    import::import_file(&mut store, &bundle_path, &ImportOptions::new(now), &mut |_, _| {})?;
    drop(store);

    let data = sample::generate(ROWS, 1234, &[]);
    let rows: Arc<Vec<Vec<f32>>> =
        Arc::new(data.features.chunks(FEATURE_COUNT).map(<[f32]>::to_vec).collect());
    let inputs = dir.path().join("inputs.f32");
    std::fs::write(
        &inputs,
        data.features.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
    )?;

    let mut results = Vec::new();
    let model = Arc::new(OnnxModel::load(&std::fs::read(&made.model)?)?);
    in_process(&model, &rows, 1, 0.5); // warm up
    for clients in [1, 2] {
        results.push(in_process(&model, &rows, clients, seconds));
    }

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let server = runtime.block_on(Server::bind(
        agent.clone(),
        ServeConfig { http: "127.0.0.1:0".parse()?, ..ServeConfig::default() },
    ))?;
    let url = format!("http://{}/v2/models/sensor-fault/infer", server.local_addr());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = runtime.spawn(server.run(async { drop(stop_rx.await) }));
    over_http(&url, &rows, 1, 0.5, false)?; // warm up
    let mut http_results = vec![tcp_floor(seconds)?];
    for binary in [false, true] {
        for clients in [1, 2] {
            http_results.push(over_http(&url, &rows, clients, seconds, binary)?);
        }
    }
    let _ = stop_tx.send(());
    runtime.block_on(serving)??;
    results.extend(http_results);
    let overhead = metrics_overhead(&runtime, &agent, &rows, seconds)?;
    let recording = record_cost(&model, &made.reference)?;
    match onnx_runtime(&made.model, &inputs, seconds) {
        Ok(anchor) => results.extend(anchor),
        Err(err) => eprintln!("ONNX Runtime anchor skipped: {err:#}"),
    }

    print_tables(seconds, &results, &overhead, &recording);
    Ok(())
}

fn print_tables(
    seconds: f64,
    results: &[Stats],
    overhead: &[Overhead],
    recording: &[(usize, f64)],
) {
    println!(
        "Sample model (MLP 8-32-16-3, softmax + arg-max), one row per request, {seconds} s per line"
    );
    println!();
    println!("| mode | clients | requests | p50 µs | p99 µs | throughput req/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in results {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.0} |",
            r.mode, r.clients, r.requests, r.p50_us, r.p99_us, r.throughput
        );
    }
    println!();
    println!(
        "Metrics on versus off, HTTP with binary tensors, {ROUNDS} alternating rounds of {seconds} s (medians of the rounds)"
    );
    println!();
    println!("| clients | throughput on | throughput off | on / off | p99 µs on | p99 µs off |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for o in overhead {
        println!(
            "| {} | {:.0} | {:.0} | {:.3} | {:.1} | {:.1} |",
            o.clients,
            o.on.throughput,
            o.off.throughput,
            o.on.throughput / o.off.throughput,
            o.on.p99_us,
            o.off.p99_us
        );
    }
    println!();
    println!(
        "Recording one request (inputs binned over 8 reference columns, outputs over 4, latency, counters):"
    );
    println!();
    println!("| threads | ns per request, each thread | allocations |");
    println!("|---:|---:|---:|");
    for (threads, ns) in recording {
        println!("| {threads} | {ns:.0} | 0 (agent/tests/it/hot_path.rs) |");
    }
}

/// Alternating rounds per metrics setting.
const ROUNDS: usize = 3;

struct Overhead {
    clients: usize,
    on: Stats,
    off: Stats,
}

/// The median round by throughput.
fn median(mut rounds: Vec<Stats>) -> Stats {
    rounds.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
    rounds.swap_remove(rounds.len() / 2)
}

/// Two servers on the same models, one measuring and one not, driven in turn.
fn metrics_overhead(
    runtime: &tokio::runtime::Runtime,
    agent: &Path,
    rows: &[Vec<f32>],
    seconds: f64,
) -> Result<Vec<Overhead>> {
    let mut urls = Vec::new();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for metrics in [true, false] {
        let config =
            ServeConfig { http: "127.0.0.1:0".parse()?, metrics, ..ServeConfig::default() };
        let server = runtime.block_on(Server::bind(agent.to_owned(), config))?;
        urls.push(format!("http://{}/v2/models/sensor-fault/infer", server.local_addr()));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop_tx);
        tasks.push(runtime.spawn(server.run(async { drop(stop_rx.await) })));
    }
    for url in &urls {
        over_http(url, rows, 1, 0.5, true)?; // warm up
    }
    let mut out = Vec::new();
    for clients in [1, 2] {
        let (mut on, mut off) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            on.push(over_http(&urls[0], rows, clients, seconds, true)?);
            off.push(over_http(&urls[1], rows, clients, seconds, true)?);
        }
        out.push(Overhead { clients, on: median(on), off: median(off) });
    }
    for stop in stops {
        let _ = stop.send(());
    }
    for task in tasks {
        runtime.block_on(task)??;
    }
    Ok(out)
}

/// Nanoseconds per recorded request, on 1 and 2 threads sharing one version's counters.
fn record_cost(model: &OnnxModel, reference_csv: &Path) -> Result<Vec<(usize, f64)>> {
    let reference =
        falaj_control::reference::profile_default(model, std::fs::File::open(reference_csv)?)?;
    let metrics = Arc::new(ModelMetrics::new(
        "sensor-fault",
        1,
        model.signature(),
        Some(&reference),
        SystemTime::now(),
    ));
    let data = sample::generate(1, 77, &[]).features;
    let input = Tensor { shape: vec![1, FEATURE_COUNT as u64], data: TensorData::Fp32(data) };
    let outputs = model.run(vec![input.clone()])?;
    let calls: u32 = 2_000_000;
    let mut out = Vec::new();
    for threads in [1, 2] {
        let started = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..threads {
                let (metrics, input, outputs) = (&metrics, &input, &outputs);
                scope.spawn(move || {
                    for _ in 0..calls {
                        metrics.record_inputs(std::slice::from_ref(input));
                        metrics.record(Duration::from_micros(40), Some(outputs));
                    }
                });
            }
        });
        out.push((threads, started.elapsed().as_secs_f64() * 1e9 / f64::from(calls)));
    }
    Ok(out)
}
