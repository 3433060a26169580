//! `falaj demo`: keys, the sample model, a signed bundle, an agent that imports and
//! serves it, a few requests over HTTP, then serving until Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};
use falaj_agent::import::{self, ImportOptions, ImportOutcome};
use falaj_agent::server::{ServeConfig, Server};
use falaj_agent::store::Store;
use falaj_common::bundle::RuntimeHint;
use falaj_common::sample::{CLASSES, FEATURES};
use falaj_control::bundle::{self, BuildOptions};
use falaj_control::keys::{self, InitOptions};
use falaj_control::sample::{self, INPUT, SampleOptions};
use serde_json::{Value, json};

/// The demo's model name and region.
const MODEL: &str = "sensor-fault";
const REGION: &str = "local-1";

/// Arguments of `falaj demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo's keys, bundle and agent (default: a fresh temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Address for the agent's inference API.
    #[arg(long, default_value = "127.0.0.1:0")]
    http: SocketAddr,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let temp;
    let dir: &Path = if let Some(dir) = &args.dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        dir
    } else {
        temp = tempfile::Builder::new()
            .prefix("falaj-demo-")
            .tempdir()
            .context("creating a temporary directory")?;
        temp.path()
    };
    println!("Falaj demo in {}", dir.display());
    let now = SystemTime::now();

    let keys_dir = dir.join("keys");
    let trust = match keys::load_trust(&keys_dir, now) {
        Ok(trust) => trust,
        Err(_) => keys::init(&keys_dir, &InitOptions::new(REGION), now).context("creating keys")?,
    };
    println!(
        "  1. keys     trust root v{} for region {} ({})",
        trust.version(),
        trust.region(),
        keys_dir.join("root.json").display()
    );

    let made = sample::write(&dir.join("sample"), &SampleOptions::default())
        .context("training the sample model")?;
    println!(
        "  2. model    trained a pump-fault classifier: hold-out accuracy {:.1}% (majority class {:.1}%)",
        made.holdout_accuracy * 100.0,
        made.majority_share * 100.0
    );

    let agent_dir = dir.join("agent");
    let mut store = match Store::open(&agent_dir) {
        Ok(store) => store,
        Err(_) => Store::init(&agent_dir, trust.region(), &trust.to_json(), now)
            .context("initialising the agent")?,
    };
    let version = store.versions(MODEL)?.last().map_or(1, |(v, _)| v + 1);
    let bundle_path = dir.join(format!("{MODEL}-{version}.falaj"));
    let options = BuildOptions {
        keys: keys_dir,
        model: made.model.clone(),
        name: MODEL.into(),
        version,
        reference: Some(made.reference.clone()),
        runtime: RuntimeHint::Auto,
        lifetime: bundle::DEFAULT_LIFETIME,
        out: bundle_path.clone(),
    };
    bundle::build(&options, now).context("building the bundle")?;
    let size = std::fs::metadata(&bundle_path).map_or(0, |m| m.len());
    println!(
        "  3. bundle   signed {MODEL} v{version} with its reference profile ({size} bytes, {})",
        bundle_path.display()
    );

    let outcome =
        import::import_file(&mut store, &bundle_path, &ImportOptions::new(now), &mut |_, _| {})
            .context("importing the bundle")?;
    let ImportOutcome::Installed { .. } = outcome else {
        anyhow::bail!("the bundle was unexpectedly installed already")
    };
    drop(store);
    println!("  4. agent    verified and installed {MODEL} v{version} ({})", agent_dir.display());

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(serve_and_show(agent_dir, args.http, &made.holdout))
}

async fn serve_and_show(agent_dir: PathBuf, http: SocketAddr, holdout: &Path) -> Result<()> {
    let server = Server::bind(agent_dir, ServeConfig { http, ..ServeConfig::default() }).await?;
    let addr = server.local_addr();
    let serving = tokio::spawn(server.run(falaj_agent::cli::shutdown_signal()));
    let base = format!("http://{addr}");
    println!("  5. serving  Open Inference Protocol on {base}");
    println!();

    let rows = read_holdout(holdout, 6)?;
    let client = reqwest::Client::new();
    let url = format!("{base}/v2/models/{MODEL}/infer");
    println!(
        "  {:>7} {:>7} {:>6}   {:<9} {:<24} {:<9} {:>9}",
        "temp°C", "vib", "bar", "predicted", "p(normal/degraded/fault)", "actual", "latency"
    );
    for (features, label) in &rows {
        let body = json!({"inputs": [{"name": INPUT, "shape": [1, FEATURES.len()], "datatype": "FP32", "data": features}]});
        let started = Instant::now();
        let response: Value =
            client.post(&url).json(&body).send().await?.error_for_status()?.json().await?;
        let latency = started.elapsed();
        let probabilities = output(&response, "probabilities")?;
        let predicted = output(&response, "label")?.first().copied().unwrap_or(-1.0) as usize;
        println!(
            "  {:>7.1} {:>7.2} {:>6.2}   {:<9} {:<24} {:<9} {:>6.2} ms",
            features[0],
            features[1],
            features[2],
            CLASSES.get(predicted).unwrap_or(&"?"),
            probabilities.iter().map(|p| format!("{p:.2}")).collect::<Vec<_>>().join(" / "),
            CLASSES.get(*label).unwrap_or(&"?"),
            latency.as_secs_f64() * 1e3
        );
    }

    let batch = read_holdout(holdout, 256)?;
    let flat: Vec<f32> = batch.iter().flat_map(|(f, _)| f.iter().copied()).collect();
    let body = json!({"inputs": [{"name": INPUT, "shape": [batch.len(), FEATURES.len()], "datatype": "FP32", "data": flat}]});
    let started = Instant::now();
    let response: Value =
        client.post(&url).json(&body).send().await?.error_for_status()?.json().await?;
    let latency = started.elapsed();
    let labels = output(&response, "label")?;
    let right = labels.iter().zip(&batch).filter(|(p, (_, l))| **p as usize == *l).count();
    println!();
    println!(
        "  one request with {} rows: {:.2} ms, {right}/{} predicted right",
        batch.len(),
        latency.as_secs_f64() * 1e3,
        batch.len()
    );
    println!();
    println!("Try it:");
    println!("  curl -s {base}/v2/models/{MODEL}");
    let example = rows.first().map(|(f, _)| f.clone()).unwrap_or_default();
    println!(
        "  curl -s -X POST {url} -H 'Content-Type: application/json' -d '{}'",
        json!({"inputs": [{"name": INPUT, "shape": [1, FEATURES.len()], "datatype": "FP32", "data": example}]})
    );
    println!("Serving until Ctrl-C.");
    serving.await??;
    Ok(())
}

fn output(response: &Value, name: &str) -> Result<Vec<f64>> {
    let outputs = response["outputs"].as_array().context("response has no outputs")?;
    let found = outputs
        .iter()
        .find(|o| o["name"] == name)
        .with_context(|| format!("response lacks output {name}"))?;
    Ok(found["data"]
        .as_array()
        .context("output has no data")?
        .iter()
        .filter_map(Value::as_f64)
        .collect())
}

fn read_holdout(path: &Path, rows: usize) -> Result<Vec<(Vec<f32>, usize)>> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::with_capacity(rows);
    for record in reader.records().take(rows) {
        let record = record?;
        let values: Vec<f32> = record.iter().map(str::parse).collect::<Result<_, _>>()?;
        let (label, features) = values.split_last().context("empty row")?;
        out.push((features.to_vec(), *label as usize));
    }
    Ok(out)
}
