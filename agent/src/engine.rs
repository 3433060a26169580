//! Inference engines behind one interface, and the choice between them.
//!
//! tract serves every model on the CPU. The wgpu engine serves float32 models on a GPU
//! when the agent's `[engine] runtime` and the bundle's runtime hint ask for one, a GPU
//! adapter exists, and every operator of the model has a kernel. Otherwise the model
//! falls back to tract with one log line naming the reason and a count in
//! `falaj_gpu_fallbacks_total`: a model is never refused, and never answered wrongly,
//! for want of a GPU.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use falaj_common::bundle::{ModelSpec, RuntimeHint};
use falaj_common::onnx::{LoadOptions, OnnxError, OnnxModel, RunError};
use falaj_common::protocol::EngineReport;
use falaj_common::tensor::{DataType, Signature, Tensor, TensorData};
use falaj_common::time::human_duration;
use falaj_gpu::{BatchConfig, Batcher, Gpu, GpuModel, GpuOptions, Values};
use serde::{Deserialize, Serialize};

/// Something that runs a loaded model.
pub trait Engine: Send + Sync + fmt::Debug {
    /// The engine's name, as shown in model metadata (`tract-cpu`, `wgpu-gpu`).
    fn name(&self) -> &'static str;

    /// The model's signature as the engine sees it.
    fn signature(&self) -> &Signature;

    /// Runs the model on inputs in signature order; returns every output in signature
    /// order. Blocking: call it off the async runtime unless [`Engine::may_run_inline`].
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError>;

    /// Whether a cheap run may execute on the async worker that received the request. A
    /// GPU run waits on the device (and on its batch), so it never does.
    fn may_run_inline(&self) -> bool {
        true
    }
}

/// tract, on the CPU.
#[derive(Debug)]
pub struct TractEngine(OnnxModel);

impl TractEngine {
    /// The engine's name.
    pub const NAME: &'static str = "tract-cpu";
}

impl Engine for TractEngine {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn signature(&self) -> &Signature {
        self.0.signature()
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        self.0.run(inputs)
    }
}

/// WGSL kernels through wgpu, with dynamic batching where the model has a batch axis.
#[derive(Debug)]
pub struct GpuEngine {
    model: Arc<GpuModel>,
    batcher: Option<Batcher>,
    signature: Signature,
}

impl GpuEngine {
    /// The engine's name in metadata and metrics.
    pub const NAME: &'static str = "wgpu-gpu";

    fn to_values(index: usize, tensor: Tensor) -> Result<Values, RunError> {
        let shape: Vec<usize> = tensor.shape.iter().map(|&d| d as usize).collect();
        match tensor.data {
            TensorData::Fp32(values) if values.len() == shape.iter().product::<usize>() => {
                Ok((shape, values))
            }
            TensorData::Fp32(values) => {
                Err(RunError::InputSize { index, elements: values.len(), shape: tensor.shape })
            }
            other => Err(RunError::Execution(format!(
                "input {index}: the GPU engine takes FP32, not {}",
                other.datatype().name()
            ))),
        }
    }

    /// Casts a float output to the type the signature declares (ArgMax's INT64, say).
    fn to_tensor((shape, values): Values, datatype: DataType) -> Result<Tensor, RunError> {
        let data = match datatype {
            DataType::Fp32 => TensorData::Fp32(values),
            DataType::Fp64 => TensorData::Fp64(values.into_iter().map(f64::from).collect()),
            DataType::Int64 => TensorData::Int64(values.into_iter().map(|v| v as i64).collect()),
            DataType::Int32 => TensorData::Int32(values.into_iter().map(|v| v as i32).collect()),
            DataType::Bool => TensorData::Bool(values.into_iter().map(|v| v != 0.0).collect()),
            other => {
                return Err(RunError::Execution(format!(
                    "the GPU engine cannot produce {}",
                    other.name()
                )));
            }
        };
        Ok(Tensor { shape: shape.into_iter().map(|d| d as u64).collect(), data })
    }
}

impl Engine for GpuEngine {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        if inputs.len() != self.signature.inputs.len() {
            return Err(RunError::InputCount {
                expected: self.signature.inputs.len(),
                got: inputs.len(),
            });
        }
        let values: Vec<Values> = inputs
            .into_iter()
            .enumerate()
            .map(|(i, t)| Self::to_values(i, t))
            .collect::<Result<_, _>>()?;
        let outputs = if let Some(batcher) = &self.batcher {
            batcher.run(values)
        } else {
            let refs: Vec<(&[usize], &[f32])> =
                values.iter().map(|(s, d)| (s.as_slice(), d.as_slice())).collect();
            self.model.run(&refs)
        }
        .map_err(|e| RunError::Execution(e.to_string()))?;
        outputs
            .into_iter()
            .zip(&self.signature.outputs)
            .map(|(values, spec)| Self::to_tensor(values, spec.datatype))
            .collect()
    }

    fn may_run_inline(&self) -> bool {
        false
    }
}

/// Where models run: `[engine] runtime` in the agent's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Runtime {
    /// Always tract on the CPU.
    Cpu,
    /// A GPU for every model it can run, whatever the bundle's hint.
    Gpu,
    /// The bundle's hint decides: `cpu` on the CPU, `gpu` and `auto` on a GPU if possible.
    #[default]
    Auto,
}

/// How models are given to engines: `[engine]` in the agent's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// `cpu` (always tract), `gpu` (a GPU for every model it can run) or `auto` (the
    /// bundle's runtime hint decides).
    pub runtime: Runtime,
    /// Accept a software Vulkan driver (lavapipe) as a GPU: for tests, never faster.
    pub allow_software_gpu: bool,
    /// How long a GPU request waits for others to batch with; 0 batches only requests
    /// that queued while the GPU was busy.
    #[serde(with = "human_duration")]
    pub batch_wait: Duration,
    /// Most rows in one GPU batch.
    pub max_batch: usize,
    /// Most plans kept per model planned per input shape (convolutional models, and
    /// models whose shapes tract cannot settle symbolically); the least recently used is
    /// dropped.
    pub plan_cache: usize,
    /// Threads one inference of a convolutional model may use for the rows of its batch
    /// (1: the thread that serves the request).
    pub threads: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let batch = BatchConfig::default();
        Self {
            runtime: Runtime::Auto,
            allow_software_gpu: false,
            batch_wait: batch.wait,
            max_batch: batch.max_rows,
            plan_cache: 8,
            threads: 1,
        }
    }
}

/// Chooses an engine per model version and holds the GPU, opened on first need.
#[derive(Debug, Default)]
pub struct Engines {
    config: EngineConfig,
    gpu: OnceLock<Option<Arc<Gpu>>>,
    fallbacks: AtomicU64,
}

impl Engines {
    /// Engines chosen by `config`.
    pub fn new(config: EngineConfig) -> Self {
        Self { config, gpu: OnceLock::new(), fallbacks: AtomicU64::new(0) }
    }

    /// How a GPU is opened for this agent (whether a software adapter may serve).
    pub fn gpu_options(&self) -> GpuOptions {
        GpuOptions { allow_software: self.config.allow_software_gpu }
    }

    /// Models that wanted a GPU and run on tract, since start.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks.load(Ordering::Relaxed)
    }

    /// The GPU, opened once; `None` (logged once) where there is none.
    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        self.gpu
            .get_or_init(|| {
                let options = GpuOptions { allow_software: self.config.allow_software_gpu };
                match Gpu::open(options) {
                    Ok(gpu) => Some(gpu),
                    Err(e) => {
                        tracing::info!(reason = %e, "no GPU: models are served on the CPU");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// The engines this agent can serve on, as it reports them to the control plane: the
    /// CPU always, and the GPU where the configuration lets models use one and it opens
    /// (opening it, once, if no model has yet). Blocking.
    pub fn available(&self) -> Vec<EngineReport> {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let mut engines = vec![EngineReport {
            name: TractEngine::NAME.into(),
            device: format!("{} CPU, {cores} cores", std::env::consts::ARCH),
        }];
        if self.config.runtime != Runtime::Cpu
            && let Some(gpu) = self.gpu()
        {
            let kind = if gpu.is_software() { " (software)" } else { "" };
            engines.push(EngineReport {
                name: GpuEngine::NAME.into(),
                device: format!("{}{kind}", gpu.name()),
            });
        }
        engines
    }

    fn wants_gpu(&self, hint: RuntimeHint) -> bool {
        match self.config.runtime {
            Runtime::Cpu => false,
            Runtime::Gpu => true,
            Runtime::Auto => hint != RuntimeHint::Cpu,
        }
    }

    /// Loads `model_bytes` on the engine the config and `spec`'s runtime hint choose.
    /// tract loads every model first: it checks the model and gives its signature, and
    /// serves it wherever the GPU cannot.
    pub fn load(
        &self,
        name: &str,
        version: u64,
        spec: &ModelSpec,
        model_bytes: &[u8],
    ) -> Result<Arc<dyn Engine>, OnnxError> {
        let options = LoadOptions {
            shapes: spec.shapes.clone(),
            plan_cache: NonZeroUsize::new(self.config.plan_cache).unwrap_or(NonZeroUsize::MIN),
            threads: NonZeroUsize::new(self.config.threads).unwrap_or(NonZeroUsize::MIN),
        };
        let cpu = OnnxModel::load_with(model_bytes, &options)?;
        if !self.wants_gpu(spec.runtime) {
            return Ok(Arc::new(TractEngine(cpu)));
        }
        let Some(gpu) = self.gpu() else {
            if spec.runtime == RuntimeHint::Gpu {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    model = name,
                    version,
                    "bundle asks for a GPU; there is none, serving on CPU"
                );
            }
            return Ok(Arc::new(TractEngine(cpu)));
        };
        let loaded = GpuModel::load(gpu.clone(), model_bytes).and_then(|model| {
            let model = Arc::new(model);
            let config =
                BatchConfig { wait: self.config.batch_wait, max_rows: self.config.max_batch };
            let batcher = Batcher::start(model.clone(), config)?;
            Ok(GpuEngine { model, batcher, signature: cpu.signature().clone() })
        });
        match loaded {
            Ok(engine) => Ok(Arc::new(engine)),
            Err(reason) => {
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(model = name, version, %reason, "GPU engine cannot run this model; serving on CPU (tract)");
                Ok(Arc::new(TractEngine(cpu)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_and_hint_choose_the_engine() {
        let engines = |runtime| Engines::new(EngineConfig { runtime, ..EngineConfig::default() });
        assert!(!engines(Runtime::Cpu).wants_gpu(RuntimeHint::Gpu));
        // Configured for the CPU, it reports only tract, without opening any GPU.
        let cpu = engines(Runtime::Cpu);
        let names: Vec<String> = cpu.available().into_iter().map(|e| e.name).collect();
        assert_eq!(names, [TractEngine::NAME]);
        assert!(cpu.gpu.get().is_none(), "the GPU was opened");
        assert!(engines(Runtime::Gpu).wants_gpu(RuntimeHint::Cpu));
        assert!(!engines(Runtime::Auto).wants_gpu(RuntimeHint::Cpu));
        assert!(engines(Runtime::Auto).wants_gpu(RuntimeHint::Auto));
        assert!(engines(Runtime::Auto).wants_gpu(RuntimeHint::Gpu));
    }

    #[test]
    fn gpu_outputs_take_the_declared_type() {
        let t = GpuEngine::to_tensor((vec![3], vec![2.0, 0.0, 1.0]), DataType::Int64).unwrap();
        assert_eq!(t.data, TensorData::Int64(vec![2, 0, 1]));
        assert_eq!(t.shape, vec![3]);
        assert!(GpuEngine::to_tensor((vec![1], vec![1.0]), DataType::Uint8).is_err());
        let err =
            GpuEngine::to_values(0, Tensor { shape: vec![2], data: TensorData::Fp32(vec![1.0]) });
        assert!(matches!(err, Err(RunError::InputSize { elements: 1, .. })));
    }
}
