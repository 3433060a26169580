//! `falaj-agent bench`: in-process latency and throughput of an installed model on the
//! engine that would serve it, at chosen batch sizes, on generated inputs of its
//! signature or on rows given as an Open Inference Protocol request (what Triton's
//! perf_analyzer gives its users, without the network).
//!
//! Each call is timed alone: inputs are prepared before the clock starts, so the figure
//! is the engine's, as a request on the server would pay it after decoding.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use falaj_common::bundle::ModelSpec;
use falaj_common::random::SeededRng as Rng;
use falaj_common::tensor::{DataType, Dim, Tensor, TensorData, TensorSpec};
use serde::Serialize;
use thiserror::Error;

use crate::engine::Engine;
use crate::oip::NamedTensor;

/// Why a batch size could not be measured.
#[derive(Debug, Error)]
pub enum BenchError {
    /// An input has an axis whose size nothing says.
    #[error(
        "input {input:?}: axis {axis} has no fixed size; give --input-data, or bundle the model with --input-shape"
    )]
    FreeAxis { input: String, axis: usize },
    /// The rows given do not fit the model.
    #[error("--input-data: {0}")]
    Pool(String),
    /// The model refused or failed on the inputs.
    #[error("batch {batch}: {reason}")]
    Run {
        /// The batch size.
        batch: usize,
        /// Why.
        reason: String,
    },
}

/// One batch size's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub model: String,
    /// Its version.
    pub version: u64,
    /// The engine that ran it.
    pub engine: String,
    /// Rows per call.
    pub batch: usize,
    /// Calls timed.
    pub calls: usize,
    /// Median latency of a call, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Rows per second over the timed calls.
    pub rows_per_s: f64,
}

/// Inputs for `batch` rows: the pool's rows taken in turn, or values drawn from `rng`.
/// An input's first axis is its batch axis when the signature leaves it free; inputs
/// without one (a recurrent state, a sample rate) are given as they are.
pub fn inputs(
    spec: &ModelSpec,
    signature: &[TensorSpec],
    pool: Option<&[NamedTensor]>,
    batch: usize,
    rng: &mut Rng,
) -> Result<Vec<Tensor>, BenchError> {
    signature
        .iter()
        .map(|input| {
            let batched = matches!(input.shape.first(), Some(Dim::Symbol(_) | Dim::Any));
            if let Some(pool) = pool {
                let given = pool
                    .iter()
                    .find(|t| t.name == input.name)
                    .ok_or_else(|| BenchError::Pool(format!("no input {:?}", input.name)))?;
                return Ok(if batched {
                    tile(&given.tensor, batch)?
                } else {
                    given.tensor.clone()
                });
            }
            let planned = spec.shapes.get(&input.name).map(falaj_common::tensor::InputShape::first);
            let shape = input
                .shape
                .iter()
                .enumerate()
                .map(|(axis, d)| match (d, &planned) {
                    (_, _) if axis == 0 && batched => Ok(batch as u64),
                    (Dim::Fixed(n), _) => Ok(*n),
                    (_, Some(p)) => Ok(p[axis]),
                    _ => Err(BenchError::FreeAxis { input: input.name.clone(), axis }),
                })
                .collect::<Result<Vec<u64>, _>>()?;
            let count = shape.iter().product::<u64>() as usize;
            Ok(Tensor { shape, data: generate(input.datatype, count, rng) })
        })
        .collect()
}

/// Rows of `pool` (its first axis) repeated in turn to make `batch` rows.
fn tile(pool: &Tensor, batch: usize) -> Result<Tensor, BenchError> {
    let rows =
        *pool.shape.first().ok_or_else(|| BenchError::Pool("a scalar cannot be tiled".into()))?
            as usize;
    if rows == 0 {
        return Err(BenchError::Pool("an input has no rows".into()));
    }
    let width = pool.data.len() / rows;
    let picks: Vec<usize> =
        (0..batch).flat_map(|r| (r % rows) * width..(r % rows + 1) * width).collect();
    let data = falaj_common::for_each_tensor_data!(&pool.data, v => {
        let out: Vec<_> = picks.iter().map(|&i| v[i]).collect();
        TensorData::from(out)
    }, bytes b => TensorData::Bytes(picks.iter().map(|&i| b[i].clone()).collect()));
    let mut shape = pool.shape.clone();
    shape[0] = batch as u64;
    Ok(Tensor { shape, data })
}

/// `count` values of `datatype`: floats uniform in [-1, 1), integers in [0, 10), byte
/// strings `"s0"` to `"s9"`.
fn generate(datatype: DataType, count: usize, rng: &mut Rng) -> TensorData {
    let mut f = || rng.range(-1.0, 1.0);
    let small = |v: f64| ((v + 1.0) * 5.0).floor();
    let floats: Vec<f64> = (0..count).map(|_| f()).collect();
    match datatype {
        DataType::Fp16 => {
            TensorData::Fp16(floats.iter().map(|&v| half::f16::from_f64(v)).collect())
        }
        DataType::Fp32 => TensorData::Fp32(floats.iter().map(|&v| v as f32).collect()),
        DataType::Fp64 => TensorData::Fp64(floats),
        DataType::Bool => TensorData::Bool(floats.iter().map(|&v| v > 0.0).collect()),
        DataType::Bytes => TensorData::Bytes(
            floats.iter().map(|&v| format!("s{}", small(v)).into_bytes()).collect(),
        ),
        DataType::Uint8 => TensorData::Uint8(floats.iter().map(|&v| small(v) as u8).collect()),
        DataType::Uint16 => TensorData::Uint16(floats.iter().map(|&v| small(v) as u16).collect()),
        DataType::Uint32 => TensorData::Uint32(floats.iter().map(|&v| small(v) as u32).collect()),
        DataType::Uint64 => TensorData::Uint64(floats.iter().map(|&v| small(v) as u64).collect()),
        DataType::Int8 => TensorData::Int8(floats.iter().map(|&v| small(v) as i8).collect()),
        DataType::Int16 => TensorData::Int16(floats.iter().map(|&v| small(v) as i16).collect()),
        DataType::Int32 => TensorData::Int32(floats.iter().map(|&v| small(v) as i32).collect()),
        DataType::Int64 => TensorData::Int64(floats.iter().map(|&v| small(v) as i64).collect()),
    }
}

/// Times `engine` on `inputs` for about `seconds` after a warm-up (at least three calls).
pub fn measure(
    engine: &Arc<dyn Engine>,
    inputs: &[Tensor],
    seconds: f64,
) -> Result<(usize, f64, f64, f64), String> {
    let warmup = Instant::now();
    let mut calls = 0;
    while calls < 3 || warmup.elapsed() < Duration::from_secs_f64((seconds / 10.0).min(1.0)) {
        engine.run(inputs.to_vec()).map_err(|e| e.to_string())?;
        calls += 1;
    }
    let mut times = Vec::new();
    let budget = Duration::from_secs_f64(seconds);
    let mut spent = Duration::ZERO;
    while times.len() < 3 || spent < budget {
        let batch = inputs.to_vec();
        let started = Instant::now();
        let out = engine.run(batch);
        let elapsed = started.elapsed();
        out.map_err(|e| e.to_string())?;
        times.push(elapsed);
        spent += elapsed;
    }
    times.sort_unstable();
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    let rows = inputs.first().and_then(|t| t.shape.first()).copied().unwrap_or(1) as f64;
    Ok((times.len(), pick(0.5), pick(0.99), rows * times.len() as f64 / spent.as_secs_f64()))
}

/// What `falaj-agent bench` reads: the data directory's model, its engine, the options.
#[derive(Debug)]
pub struct Target {
    /// The model's name.
    pub model: String,
    /// Its version.
    pub version: u64,
    /// Its manifest's model part.
    pub spec: ModelSpec,
    /// The loaded engine.
    pub engine: Arc<dyn Engine>,
    /// Rows given with `--input-data`.
    pub pool: Option<Vec<NamedTensor>>,
    /// The file they came from.
    pub pool_file: Option<PathBuf>,
}

impl Target {
    /// Measures one batch size.
    pub fn run(&self, batch: usize, seconds: f64, seed: u64) -> Result<Measurement, BenchError> {
        let mut rng = Rng::new(seed);
        let inputs = inputs(
            &self.spec,
            &self.engine.signature().inputs,
            self.pool.as_deref(),
            batch,
            &mut rng,
        )?;
        let (calls, p50_us, p99_us, rows_per_s) = measure(&self.engine, &inputs, seconds)
            .map_err(|reason| BenchError::Run { batch, reason })?;
        Ok(Measurement {
            model: self.model.clone(),
            version: self.version,
            engine: self.engine.name().to_owned(),
            batch,
            calls,
            p50_us,
            p99_us,
            rows_per_s,
        })
    }
}

/// Arguments of `bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The model, as NAME or NAME@VERSION (default: the active version).
    model: String,
    #[command(flatten)]
    data: crate::cli::DataDir,
    /// Batch sizes (rows per call), comma-separated.
    #[arg(long, default_value = "1,64", value_delimiter = ',')]
    batch: Vec<usize>,
    /// Seconds of timed calls per batch size.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// The engine: cpu (tract) or gpu (wgpu); default: what `serve` would choose.
    #[arg(long)]
    engine: Option<crate::engine::Runtime>,
    /// An Open Inference Protocol request (JSON) whose inputs hold rows to tile to each
    /// batch size, instead of generated values.
    #[arg(long)]
    input_data: Option<PathBuf>,
    /// Seed of the generated values.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// One JSON object per line per batch size.
    #[arg(long)]
    json: bool,
}

/// `falaj-agent bench`.
pub fn run(args: &BenchArgs) -> Result<(), crate::cli::Failure> {
    use crate::cli::Failure;
    let mut config = args.data.config()?;
    let data_dir = args.data.resolve()?;
    if let Some(runtime) = args.engine {
        config.engine.runtime = runtime;
    }
    let store = crate::store::Store::open(&data_dir).map_err(crate::cli::store_failure)?;
    let installed = store.installed().map_err(crate::cli::store_failure)?;
    let (name, version) = match args.model.split_once('@') {
        Some((n, v)) => {
            let v = v.parse::<u64>().map_err(|_| {
                Failure::Usage(anyhow::anyhow!("{:?}: {v:?} is not a version number", args.model))
            })?;
            (n, Some(v))
        }
        None => (args.model.as_str(), None),
    };
    let found = installed
        .iter()
        .filter(|i| i.manifest.name == name && i.manifest.model().is_some())
        .find(|i| version.map_or(i.active, |v| i.manifest.version == v))
        .ok_or_else(|| Failure::Other(anyhow::anyhow!("no model {} is installed", args.model)))?;
    let spec = found.manifest.model().expect("filtered to models").clone();
    let bytes = store.read_content(found).map_err(crate::cli::store_failure)?;
    let engines = crate::engine::Engines::new(config.engine.clone());
    let engine = engines
        .load(name, found.manifest.version, &spec, &bytes)
        .map_err(|e| Failure::Other(anyhow::anyhow!("loading {}: {e}", args.model)))?;
    if args.engine == Some(crate::engine::Runtime::Gpu)
        && engine.name() != crate::engine::GpuEngine::NAME
    {
        return Err(Failure::Other(anyhow::anyhow!(
            "--engine gpu: {} runs on {} here (no usable GPU, or an operator without a GPU kernel)",
            args.model,
            engine.name()
        )));
    }
    let pool = args
        .input_data
        .as_ref()
        .map(|path| {
            let body = std::fs::read(path)
                .map_err(|e| Failure::Other(anyhow::anyhow!("reading {}: {e}", path.display())))?;
            crate::oip::decode_request(&body, None).map(|r| r.inputs).map_err(|e| {
                Failure::Usage(anyhow::anyhow!("--input-data {}: {e}", path.display()))
            })
        })
        .transpose()?;
    let target = Target {
        model: name.to_owned(),
        version: found.manifest.version,
        spec,
        engine,
        pool,
        pool_file: args.input_data.clone(),
    };
    if !args.json {
        println!("{}@{} on {}", target.model, target.version, target.engine.name());
        println!(
            "{:>7} {:>9} {:>12} {:>12} {:>14}",
            "BATCH", "CALLS", "P50 µs", "P99 µs", "ROWS/S"
        );
    }
    for &batch in &args.batch {
        let m = target.run(batch, args.seconds, args.seed).map_err(|e| Failure::Other(e.into()))?;
        if args.json {
            println!("{}", serde_json::to_string(&m).expect("measurements serialise"));
        } else {
            println!(
                "{:>7} {:>9} {:>12.1} {:>12.1} {:>14.0}",
                m.batch, m.calls, m.p50_us, m.p99_us, m.rows_per_s
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use falaj_common::bundle::{ModelFormat, RuntimeHint};
    use falaj_common::tensor::Signature;

    fn spec(inputs: Vec<TensorSpec>) -> ModelSpec {
        ModelSpec {
            file: "model.onnx".into(),
            format: ModelFormat::Onnx,
            runtime: RuntimeHint::Cpu,
            signature: Signature { inputs, outputs: vec![] },
            reference: None,
            features: None,
            lineage: None,
            shapes: std::collections::BTreeMap::new(),
        }
    }

    fn input(name: &str, datatype: DataType, shape: Vec<Dim>) -> TensorSpec {
        TensorSpec { name: name.into(), datatype, shape }
    }

    #[test]
    fn generated_inputs_follow_the_signature() {
        let sig = vec![
            input("x", DataType::Fp32, vec![Dim::Any, Dim::Fixed(4)]),
            input("c", DataType::Bytes, vec![Dim::Symbol("N".into()), Dim::Fixed(1)]),
            input("state", DataType::Fp32, vec![Dim::Fixed(2), Dim::Fixed(3)]),
        ];
        let mut rng = Rng::new(1);
        let out = inputs(&spec(sig.clone()), &sig, None, 5, &mut rng).unwrap();
        assert_eq!(out[0].shape, vec![5, 4]);
        assert_eq!(out[1].shape, vec![5, 1]);
        assert_eq!(out[2].shape, vec![2, 3], "no batch axis: as declared");
        let TensorData::Fp32(v) = &out[0].data else { panic!() };
        assert!(v.iter().all(|x| (-1.0..1.0).contains(x)));
        let free = vec![input("img", DataType::Fp32, vec![Dim::Any, Dim::Any])];
        let err = inputs(&spec(free.clone()), &free, None, 1, &mut rng).unwrap_err();
        assert!(err.to_string().contains("axis 1 has no fixed size"), "{err}");
    }

    #[test]
    fn pools_are_tiled_to_the_batch() {
        let sig = vec![input("x", DataType::Int64, vec![Dim::Any, Dim::Fixed(2)])];
        let pool = vec![NamedTensor {
            name: "x".into(),
            tensor: Tensor { shape: vec![2, 2], data: TensorData::Int64(vec![1, 2, 3, 4]) },
        }];
        let out = inputs(&spec(sig.clone()), &sig, Some(&pool), 3, &mut Rng::new(0)).unwrap();
        assert_eq!(out[0].shape, vec![3, 2]);
        assert_eq!(out[0].data, TensorData::Int64(vec![1, 2, 3, 4, 1, 2]));
        let missing = vec![input("y", DataType::Int64, vec![Dim::Any])];
        assert!(
            inputs(&spec(missing.clone()), &missing, Some(&pool), 1, &mut Rng::new(0)).is_err()
        );
    }
}
