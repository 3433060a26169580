//! What the inference benchmarks (`grpc`, `https`) share: the models under test (the
//! sample model and a small CNN), installing them into an agent's store, generated
//! inputs, latency runs and their median, and number arguments.

use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use falaj_agent::import::{self, ImportOptions};
use falaj_agent::store::Store;
use falaj_common::bundle::RuntimeHint;
use falaj_common::onnx::{Attr, GraphBuilder};
use falaj_common::random::SeededRng;
use falaj_common::tensor::{DataType, Dim};
use falaj_control::bundle::{self, BuildOptions};

/// A model under test: its name, input and the shape of one row.
pub struct Subject {
    pub name: &'static str,
    pub input: &'static str,
    pub row: Vec<i64>,
}

impl Subject {
    pub fn row_len(&self) -> usize {
        self.row.iter().product::<i64>() as usize
    }
}

/// A CNN over [N, 3, 32, 32] images: conv 3→16, ReLU, conv 16→16, ReLU, pool, dense → 10.
pub fn image_model() -> Vec<u8> {
    let mut rng = SeededRng::new(5);
    let mut weights = |n: usize| (0..n).map(|_| rng.normal(0.0, 0.2) as f32).collect::<Vec<_>>();
    let n = || Dim::Symbol("N".into());
    let pads = || vec![Attr::Ints("pads", vec![1, 1, 1, 1])];
    let mut g = GraphBuilder::new("bench_cnn");
    g.input("image", DataType::Fp32, &[n(), Dim::Fixed(3), Dim::Fixed(32), Dim::Fixed(32)])
        .weights("c1.w", &[16, 3, 3, 3], &weights(432))
        .weights("c1.b", &[16], &weights(16))
        .node("Conv", &["image", "c1.w", "c1.b"], &["c1"], pads())
        .node("Relu", &["c1"], &["r1"], vec![])
        .weights("c2.w", &[16, 16, 3, 3], &weights(2304))
        .weights("c2.b", &[16], &weights(16))
        .node("Conv", &["r1", "c2.w", "c2.b"], &["c2"], pads())
        .node("Relu", &["c2"], &["r2"], vec![])
        .node("GlobalAveragePool", &["r2"], &["pool"], vec![])
        .node("Flatten", &["pool"], &["flat"], vec![Attr::Int("axis", 1)])
        .weights("fc.w", &[10, 16], &weights(160))
        .weights("fc.b", &[10], &weights(10))
        .node("Gemm", &["flat", "fc.w", "fc.b"], &["logits"], vec![Attr::Int("transB", 1)])
        .output("logits", DataType::Fp32, &[n(), Dim::Fixed(10)]);
    g.encode("bench")
}

/// Builds `model` as version 1 of `name`, signed with `keys` (with `reference` profiled
/// when given), and installs it into the agent in `agent`.
pub fn install(
    agent: &Path,
    keys: &Path,
    model: &Path,
    name: &str,
    reference: Option<&Path>,
) -> Result<()> {
    let now = SystemTime::now();
    let out = model.with_extension("falaj");
    bundle::build(
        &BuildOptions {
            keys: keys.to_owned(),
            model: model.to_owned(),
            name: name.into(),
            version: 1,
            reference: reference.map(Path::to_owned),
            runtime: RuntimeHint::Cpu,
            lifetime: bundle::DEFAULT_LIFETIME,
            out: out.clone(),
            features: None,
            shapes: std::collections::BTreeMap::new(),
        },
        now,
    )?;
    let mut store = Store::open(agent)?;
    import::import_file(&mut store, &out, &ImportOptions::new(now), &mut |_, _| {})?;
    Ok(())
}

/// `batch` rows of standard normal values for `subject`, as little-endian FP32 bytes.
pub fn inputs(subject: &Subject, batch: usize) -> Vec<u8> {
    let mut rng = SeededRng::new(batch as u64);
    (0..subject.row_len() * batch)
        .flat_map(|_| (rng.normal(0.0, 1.0) as f32).to_le_bytes())
        .collect()
}

/// The JSON header of a binary REST request and the whole body (header, then the tensor).
pub fn rest_body(subject: &Subject, batch: usize) -> (String, bytes::Bytes) {
    let raw = inputs(subject, batch);
    let mut shape = vec![batch as i64];
    shape.extend(&subject.row);
    let header = serde_json::json!({
        "inputs": [{"name": subject.input, "shape": shape, "datatype": "FP32",
                    "parameters": {"binary_data_size": raw.len()}}],
        "parameters": {"binary_data_output": true},
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(&raw);
    (header, bytes::Bytes::from(body))
}

/// Latencies of one client for a while, and how long it ran.
pub struct Run {
    pub latencies: Vec<Duration>,
    pub wall: Duration,
}

impl Run {
    /// The `q` quantile of the latencies, µs.
    pub fn p(&self, q: f64) -> f64 {
        let mut l = self.latencies.clone();
        l.sort_unstable();
        l[((l.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6
    }

    /// Requests a second.
    #[allow(dead_code)] // the https benchmark reports latency only
    pub fn throughput(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }
}

/// The round whose p50 is the median of the rounds.
pub fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.p(0.5).total_cmp(&b.p(0.5)));
    runs.swap_remove(runs.len() / 2)
}

/// The number after `name` in `args`, or `default`.
pub fn arg(args: &[String], name: &str, default: f64) -> Result<f64> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(default), |s| s.parse::<f64>())
        .with_context(|| format!("{name} takes a number"))
}
