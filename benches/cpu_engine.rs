//! The CPU engine on the corpus (`tests/corpus/make_corpus.py`: real models no one in the
//! project wrote), beside ONNX Runtime, in one run:
//!
//! - in process: each model bundled and imported into an agent's store, then timed as
//!   `falaj-agent bench` times it (the engine `serve` would choose, each call alone,
//!   inputs ready), at the batch sizes its `meta.json` lists, on the rows of its
//!   `pool.json`; and ONNX Runtime (Python, one thread) on the same rows
//!   (`benches/ort_corpus.py`), model by model;
//! - with `--http`: the agent's server and MLServer running ONNX Runtime
//!   (`benches/mlserver`, one worker, one thread), each sent the same JSON requests by the
//!   same client, one at a time, at batch 1 and 64.
//!
//! `cargo bench --bench cpu_engine -- --corpus DIR [--seconds 3] [--only a,b] [--batches 1,64] [--http]`;
//! the anchor needs `FALAJ_PYTHON` (onnxruntime); `--http` needs `FALAJ_MLSERVER` (the
//! `mlserver` executable of a virtualenv made from `benches/mlserver/requirements.txt`).
//! Prints Markdown tables for BENCHMARKS.md, and JSON lines with `--json FILE`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use falaj_agent::bench::{self, Target};
use falaj_agent::engine::{EngineConfig, Engines, Runtime};
use falaj_agent::import::{self, ImportOptions};
use falaj_agent::oip::{self, NamedTensor};
use falaj_agent::server::{ServeConfig, Server};
use falaj_agent::store::Store;
use falaj_common::bundle::RuntimeHint;
use falaj_common::random::SeededRng;
use falaj_common::tensor::{Tensor, TensorData};
use falaj_control::bundle::{self as build, BuildOptions};
use falaj_control::keys::{self, InitOptions};
use serde_json::{Value, json};

const REGION: &str = "bench-1";

struct Args {
    corpus: PathBuf,
    seconds: f64,
    only: Option<Vec<String>>,
    batches: Option<Vec<usize>>,
    http: bool,
    json: Option<PathBuf>,
}

fn args() -> Result<Args> {
    let argv: Vec<String> = std::env::args().collect();
    let value =
        |flag: &str| argv.iter().position(|a| a == flag).and_then(|i| argv.get(i + 1)).cloned();
    Ok(Args {
        corpus: value("--corpus")
            .map(PathBuf::from)
            .context("--corpus DIR (tests/corpus/make_corpus.py DIR)")?,
        seconds: value("--seconds")
            .map_or(Ok(3.0), |s| s.parse())
            .context("--seconds takes a number")?,
        only: value("--only").map(|s| s.split(',').map(str::to_owned).collect()),
        batches: value("--batches")
            .map(|s| s.split(',').map(str::parse).collect::<Result<_, _>>())
            .transpose()
            .context("--batches takes sizes, comma-separated")?,
        http: argv.iter().any(|a| a == "--http"),
        json: value("--json").map(PathBuf::from),
    })
}

struct Model {
    name: String,
    dir: PathBuf,
    meta: Value,
}

impl Model {
    fn batches(&self) -> Vec<usize> {
        self.meta["batches"]
            .as_array()
            .map_or(vec![1], |b| b.iter().filter_map(Value::as_u64).map(|b| b as usize).collect())
    }

    /// The ONNX operators, short: `ai.onnx.ml:TreeEnsembleClassifier` as
    /// `TreeEnsembleClassifier`, the rest counted.
    fn operators(&self) -> String {
        let ops: Vec<&str> = self.meta["operators"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|o| o.rsplit(':').next().unwrap_or(o))
            .collect();
        if ops.len() <= 4 {
            ops.join(", ")
        } else {
            format!("{}, … ({} operators)", ops[..3].join(", "), ops.len())
        }
    }
}

/// Bundles and imports every model into a new agent store; returns the models.
fn install(corpus: &Path, dir: &Path, only: Option<&[String]>) -> Result<(PathBuf, Vec<Model>)> {
    let names: Vec<String> = serde_json::from_slice(&std::fs::read(corpus.join("index.json"))?)?;
    let now = SystemTime::now();
    let keys_dir = dir.join("keys");
    keys::init(&keys_dir, &InitOptions::new(REGION), now)?;
    let agent = dir.join("agent");
    let mut store = Store::init(&agent, REGION, &std::fs::read(keys_dir.join("root.json"))?, now)?;
    let mut models = Vec::new();
    for name in names {
        if only.is_some_and(|o| !o.contains(&name)) {
            continue;
        }
        let model_dir = corpus.join(&name);
        let meta: Value = serde_json::from_slice(&std::fs::read(model_dir.join("meta.json"))?)?;
        let shapes = meta["input_shape"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| {
                Ok((k.clone(), v.as_str().context("a shape")?.parse().map_err(anyhow::Error::msg)?))
            })
            .collect::<Result<_>>()?;
        let out = dir.join(format!("{name}.falaj"));
        build::build(
            &BuildOptions {
                keys: keys_dir.clone(),
                model: model_dir.join("model.onnx"),
                name: name.clone(),
                version: 1,
                reference: None,
                runtime: RuntimeHint::Cpu,
                lifetime: build::DEFAULT_LIFETIME,
                out: out.clone(),
                features: None,
                shapes,
            },
            now,
        )
        .with_context(|| format!("bundling {name}"))?;
        import::import_file(&mut store, &out, &ImportOptions::new(now), &mut |_, _| {})?;
        models.push(Model { name, dir: model_dir, meta });
    }
    Ok((agent, models))
}

fn pool(model: &Model) -> Result<Vec<NamedTensor>> {
    let body = std::fs::read(model.dir.join("pool.json"))?;
    Ok(oip::decode_request(&body, None).map_err(|e| anyhow::anyhow!("{}: {e}", model.name))?.inputs)
}

fn target(store: &Store, engines: &Engines, model: &Model) -> Result<Target> {
    let installed = store
        .installed()?
        .into_iter()
        .find(|i| i.manifest.name == model.name)
        .context("installed")?;
    let spec = installed.manifest.model().context("a model")?.clone();
    let engine = engines.load(&model.name, 1, &spec, &store.read_content(&installed)?)?;
    Ok(Target {
        model: model.name.clone(),
        version: 1,
        spec,
        engine,
        pool: Some(pool(model)?),
        pool_file: None,
    })
}

/// ONNX Runtime's p50 per batch size, from `benches/ort_corpus.py`.
fn onnx_runtime(model: &Model, batches: &[usize], seconds: f64) -> Result<Vec<(usize, f64)>> {
    let python = std::env::var("FALAJ_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/ort_corpus.py");
    let batches = batches.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
    let out = Command::new(&python)
        .arg(script)
        .arg(&model.dir)
        .args(["--batches", &batches, "--seconds", &seconds.to_string()])
        .output()
        .with_context(|| format!("running {python}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{}: {}",
        model.name,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)?;
            Ok((
                v["batch"].as_u64().context("batch")? as usize,
                v["p50_us"].as_f64().context("p50")?,
            ))
        })
        .collect()
}

/// A request body in JSON (NaN as `null`).
fn json_body(names: &[String], tensors: &[Tensor]) -> String {
    let inputs: Vec<Value> = names
        .iter()
        .zip(tensors)
        .map(|(name, t)| {
            let data = match &t.data {
                TensorData::Bytes(b) => json!(b.iter().map(|s| String::from_utf8_lossy(s)).collect::<Vec<_>>()),
                TensorData::Int64(v) => json!(v),
                TensorData::Int32(v) => json!(v),
                TensorData::Bool(v) => json!(v),
                d => json!(d.to_f64().iter().map(|x| if x.is_nan() { Value::Null } else { json!(x) }).collect::<Vec<_>>()),
            };
            json!({"name": name, "datatype": t.data.datatype().name(), "shape": t.shape, "data": data})
        })
        .collect();
    json!({ "inputs": inputs }).to_string()
}

/// One client, one request at a time, for `seconds`: the p50 in µs.
async fn http_p50(client: &reqwest::Client, url: &str, body: &str, seconds: f64) -> Result<f64> {
    let mut times = Vec::new();
    let warm = Instant::now();
    while times.len() < 3 || warm.elapsed().as_secs_f64() < (seconds / 10.0).min(1.0) {
        send(client, url, body).await?;
        times.push(Duration::ZERO);
    }
    times.clear();
    let started = Instant::now();
    while times.len() < 3 || started.elapsed().as_secs_f64() < seconds {
        let t0 = Instant::now();
        send(client, url, body).await?;
        times.push(t0.elapsed());
    }
    times.sort_unstable();
    Ok(times[(times.len() - 1) / 2].as_secs_f64() * 1e6)
}

async fn send(client: &reqwest::Client, url: &str, body: &str) -> Result<()> {
    let response = client
        .post(url)
        .header("Content-Type", "application/json")
        .body(body.to_owned())
        .send()
        .await?;
    let status = response.status();
    let bytes = response.bytes().await?;
    if !status.is_success() {
        bail!("{url}: {status}: {}", String::from_utf8_lossy(&bytes[..bytes.len().min(300)]));
    }
    std::hint::black_box(bytes);
    Ok(())
}

/// MLServer serving every model with ONNX Runtime, killed on drop.
struct MlServer {
    child: Child,
    port: u16,
}

impl Drop for MlServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn mlserver(dir: &Path, models: &[Model]) -> Result<MlServer> {
    let exe = std::env::var("FALAJ_MLSERVER")
        .context("--http needs FALAJ_MLSERVER (the mlserver executable)")?;
    let root = dir.join("mlserver");
    let (port, grpc) = (free_port()?, free_port()?);
    std::fs::create_dir_all(&root)?;
    let settings = json!({"debug": false, "parallel_workers": 0, "metrics_endpoint": null,
        "gzip_enabled": false, "host": "127.0.0.1", "http_port": port, "grpc_port": grpc});
    std::fs::write(root.join("settings.json"), settings.to_string())?;
    for m in models {
        let d = root.join(&m.name);
        std::fs::create_dir_all(&d)?;
        let uri = std::fs::canonicalize(m.dir.join("model.onnx"))?;
        let s = json!({"name": m.name, "implementation": "runtime.OnnxRuntimeModel", "parameters": {"uri": uri}});
        std::fs::write(d.join("model-settings.json"), s.to_string())?;
    }
    let child = Command::new(exe)
        .args(["start", &root.to_string_lossy()])
        .env("PYTHONPATH", Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/mlserver"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mlserver")?;
    let server = MlServer { child, port };
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = client.get(format!("http://127.0.0.1:{port}/v2/health/ready")).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            return Ok(server);
        }
        anyhow::ensure!(Instant::now() < deadline, "MLServer did not become ready in 120 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Row {
    model: String,
    operators: String,
    batch: usize,
    falaj_us: f64,
    anchor_us: f64,
    ratio: f64,
}

impl Row {
    fn json(&self, mode: &str) -> String {
        json!({"mode": mode, "model": self.model, "operators": self.operators, "batch": self.batch,
            "falaj_us": self.falaj_us, "anchor_us": self.anchor_us, "ratio": self.ratio})
        .to_string()
    }
}

fn main() -> Result<()> {
    let args = args()?;
    let dir = tempfile::tempdir()?;
    let (agent, models) = install(&args.corpus, dir.path(), args.only.as_deref())?;
    let store = Store::open(&agent)?;
    let engines = Engines::new(EngineConfig { runtime: Runtime::Cpu, ..EngineConfig::default() });
    let mut rows = Vec::new();
    for model in &models {
        let mut batches = model.batches();
        if let Some(only) = &args.batches {
            batches.retain(|b| only.contains(b));
        }
        let target = target(&store, &engines, model)?;
        let ours: Vec<(usize, f64)> = batches
            .iter()
            .map(|&b| Ok((b, target.run(b, args.seconds, 1)?.p50_us)))
            .collect::<Result<_>>()
            .with_context(|| model.name.clone())?;
        let theirs = onnx_runtime(model, &batches, args.seconds)?;
        for ((batch, f), (_, o)) in ours.into_iter().zip(theirs) {
            let row = Row {
                model: model.name.clone(),
                operators: model.operators(),
                batch,
                falaj_us: f,
                anchor_us: o,
                ratio: f / o,
            };
            eprintln!(
                "{} batch {batch}: {f:.1} µs, ONNX Runtime {o:.1} µs, ratio {:.2}",
                row.model, row.ratio
            );
            rows.push(row);
        }
    }
    println!("In process, p50 µs per call, ONNX Runtime 1 thread, {} s per figure\n", args.seconds);
    println!("| model | operators | batch | Falaj | ONNX Runtime | ratio |");
    println!("|---|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2} |",
            r.model, r.operators, r.batch, r.falaj_us, r.anchor_us, r.ratio
        );
    }
    let mut http_rows = Vec::new();
    if args.http {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        http_rows =
            runtime.block_on(http(&agent, dir.path(), &models, &store, &engines, args.seconds))?;
        println!(
            "\nOver HTTP, JSON, one client, p50 µs per request, {} s per figure\n",
            args.seconds
        );
        println!("| model | batch | Falaj | MLServer + ONNX Runtime | ratio |");
        println!("|---|---:|---:|---:|---:|");
        for r in &http_rows {
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.2} |",
                r.model, r.batch, r.falaj_us, r.anchor_us, r.ratio
            );
        }
    }
    if let Some(path) = &args.json {
        let lines: Vec<String> = rows
            .iter()
            .map(|r| r.json("in-process"))
            .chain(http_rows.iter().map(|r| r.json("http")))
            .collect();
        std::fs::write(path, lines.join("\n") + "\n")?;
    }
    Ok(())
}

async fn http(
    agent: &Path,
    dir: &Path,
    models: &[Model],
    store: &Store,
    engines: &Engines,
    seconds: f64,
) -> Result<Vec<Row>> {
    let config = ServeConfig {
        http: "127.0.0.1:0".parse()?,
        // An image batch of 64 in JSON is over 100 MB.
        max_body_bytes: 512 << 20,
        engine: EngineConfig { runtime: Runtime::Cpu, ..EngineConfig::default() },
        ..ServeConfig::default()
    };
    let server = Server::bind(agent.to_owned(), config).await?;
    let ours = format!("http://{}", server.local_addr());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.run(async { drop(stop_rx.await) }));
    let theirs = mlserver(dir, models).await?;
    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
    let mut rows = Vec::new();
    for model in models {
        let target = target(store, engines, model)?;
        let names: Vec<String> =
            target.engine.signature().inputs.iter().map(|i| i.name.clone()).collect();
        for batch in model.batches().into_iter().filter(|b| [1, 64].contains(b)) {
            let tensors = bench::inputs(
                &target.spec,
                &target.engine.signature().inputs,
                target.pool.as_deref(),
                batch,
                &mut SeededRng::new(1),
            )?;
            let body = json_body(&names, &tensors);
            let path = format!("/v2/models/{}/infer", model.name);
            let f = http_p50(&client, &format!("{ours}{path}"), &body, seconds).await?;
            let m = http_p50(
                &client,
                &format!("http://127.0.0.1:{}{path}", theirs.port),
                &body,
                seconds,
            )
            .await?;
            eprintln!("{} batch {batch} over HTTP: {f:.0} µs, MLServer {m:.0} µs", model.name);
            rows.push(Row {
                model: model.name.clone(),
                operators: model.operators(),
                batch,
                falaj_us: f,
                anchor_us: m,
                ratio: f / m,
            });
        }
    }
    drop(theirs);
    let _ = stop_tx.send(());
    serving.await??;
    Ok(rows)
}
