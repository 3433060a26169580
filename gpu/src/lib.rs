//! ONNX inference on GPUs through wgpu: WGSL compute kernels for the operators of MLPs
//! and CNNs, planned once per input shape, with weights uploaded once and buffers reused
//! between runs, and dynamic batching of requests that arrive together.
//!
//! A model that uses anything the kernels do not implement is refused at load with the
//! node and the reason ([`GpuError::Unsupported`]); the agent then serves it with tract.
//! Sites run NVIDIA, AMD and Intel GPUs, which is why this is wgpu (Vulkan) and not CUDA.
//!
//! It also fine-tunes a model's head on the GPU: [`GpuHeadKernel`] is the
//! `falaj_common::finetune::HeadKernel` the trainer's loop drives there.

#![warn(unreachable_pub)]
// Matrix code names its operands as the mathematics does: a, b, m, n, k.
#![allow(clippy::many_single_char_names)]

mod batch;
pub mod graph;
mod kernels;
mod plan;
mod tiles;
mod train;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use prost::Message as _;
use thiserror::Error;
use tract_onnx::pb::ModelProto;
use wgpu::util::DeviceExt as _;

pub use batch::{BatchConfig, Batcher};
pub use kernels::Tile;
pub use train::GpuHeadKernel;

use crate::graph::{Graph, InputDim};
use crate::kernels::Pipelines;
use crate::plan::Plan;

/// Why the GPU engine cannot load or run a model.
#[derive(Debug, Error)]
pub enum GpuError {
    /// No usable GPU adapter (none at all, or only a software one when those are refused).
    #[error("no GPU: {0}")]
    NoAdapter(String),
    /// The model uses something the kernels do not implement.
    #[error("{node}: {problem} is not supported by the GPU engine")]
    Unsupported {
        /// The node (or tensor) concerned.
        node: String,
        /// What it uses.
        problem: String,
    },
    /// An input decides shapes (a Reshape's target, Squeeze's axes) and must be a constant.
    #[error("{node}: input {input:?} must be a constant for the GPU engine")]
    NeedsConstant { node: String, input: String },
    /// Shapes that the graph cannot combine.
    #[error("{node}: {problem}")]
    Shape {
        node: String,
        /// What does not fit.
        problem: String,
    },
    /// Inputs of the wrong count or size.
    #[error("{0}")]
    Input(String),
    /// The device failed.
    #[error("GPU device error: {0}")]
    Device(String),
    /// A buffer larger than the device can bind.
    #[error("{what} take {bytes} bytes, more than this GPU binds in one buffer ({limit} bytes)")]
    TooLarge {
        /// What the buffer holds.
        what: String,
        /// Its size.
        bytes: u64,
        /// The device's limit (the smaller of its largest buffer and storage binding).
        limit: u64,
    },
}

/// How to choose an adapter.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuOptions {
    /// Accept a software rasteriser (lavapipe) as the GPU. It is correct but slower than
    /// tract on the same CPU, so production refuses it; tests on machines without a GPU
    /// accept it.
    pub allow_software: bool,
}

/// A GPU device: its queue, what it is, and the kernels compiled for it. Open it once per
/// process and share it between models.
#[derive(Debug)]
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    pipelines: Pipelines,
    large_tile: OnceLock<Tile>,
}

/// The window-system surface extensions that wgpu enables whenever the Vulkan driver offers
/// them.
const WINDOW_SYSTEMS: [&std::ffi::CStr; 3] =
    [c"VK_KHR_xlib_surface", c"VK_KHR_xcb_surface", c"VK_KHR_wayland_surface"];

/// A Vulkan instance for computing only: wgpu's, less the window-system surface extensions.
///
/// With `VK_KHR_wayland_surface` enabled, Mesa's device-select layer (an implicit layer that
/// mesa-vulkan-drivers installs) connects to a Wayland display while listing adapters, to
/// prefer the one showing it; on a headless machine libwayland then prints `error:
/// XDG_RUNTIME_DIR is invalid or not set in the environment.` once per instance. The engine
/// never presents to a window, so it asks for none of those extensions and nothing probes
/// for a display.
#[expect(
    unsafe_code,
    reason = "wgpu creates an instance with chosen extensions only through its HAL"
)]
fn compute_instance() -> Result<wgpu::Instance, GpuError> {
    use wgpu::hal::vulkan;
    let settings = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    let descriptor = wgpu::hal::InstanceDescriptor {
        name: "falaj",
        flags: settings.flags,
        memory_budget_thresholds: settings.memory_budget_thresholds,
        backend_options: settings.backend_options,
        telemetry: None,
        display: None,
    };
    let without_window_systems: Box<vulkan::CreateInstanceCallback> = Box::new(|args| {
        args.extensions.retain(|name| !WINDOW_SYSTEMS.contains(name));
    });
    // SAFETY: the callback only leaves out extensions for creating surfaces from Xlib, XCB
    // and Wayland windows, which this crate never creates; wgpu-hal checks that an extension
    // was enabled (`shared.extensions`) before any use of it, so without them creating such
    // a surface is an error, and nothing else depends on them.
    let hal =
        unsafe { vulkan::Instance::init_with_callback(&descriptor, Some(without_window_systems)) }
            .map_err(|e| GpuError::NoAdapter(format!("no Vulkan instance: {e}")))?;
    // SAFETY: `hal` is a Vulkan instance just created by wgpu-hal's Vulkan backend, and
    // nothing else holds it: wgpu owns it from here.
    Ok(unsafe { wgpu::Instance::from_hal::<wgpu::hal::api::Vulkan>(hal) })
}

impl Gpu {
    /// Opens the first high-performance Vulkan adapter, or says why there is none.
    pub fn open(options: GpuOptions) -> Result<Arc<Self>, GpuError> {
        let instance = compute_instance()?;
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| GpuError::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        if info.device_type == wgpu::DeviceType::Cpu && !options.allow_software {
            return Err(GpuError::NoAdapter(format!(
                "{} is a software renderer, slower than the CPU engine",
                info.name
            )));
        }
        let supported = adapter.limits();
        let limits = wgpu::Limits {
            max_storage_buffer_binding_size: supported.max_storage_buffer_binding_size,
            max_buffer_size: supported.max_buffer_size,
            max_storage_buffers_per_shader_stage: supported
                .max_storage_buffers_per_shader_stage
                .min(8),
            ..wgpu::Limits::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("falaj"),
            required_limits: limits,
            ..Default::default()
        }))
        .map_err(|e| GpuError::Device(e.to_string()))?;
        // wgpu's default for an error outside an error scope is to panic; every call that can
        // fail runs inside `checked`, so anything left is logged.
        device.on_uncaptured_error(Arc::new(|e: wgpu::Error| {
            tracing::error!(error = %e, "GPU error outside a checked operation");
        }));
        tracing::info!(adapter = %info.name, backend = ?info.backend, kind = ?info.device_type, driver = %info.driver_info, "GPU opened");
        Ok(Arc::new(Self {
            device,
            queue,
            info,
            pipelines: Pipelines::default(),
            large_tile: OnceLock::new(),
        }))
    }

    /// Runs `f` with the device's validation and out-of-memory errors captured, so that a
    /// model too large for the GPU's limits, say, is an error and not a panic.
    fn checked<T>(&self, f: impl FnOnce() -> Result<T, GpuError>) -> Result<T, GpuError> {
        let memory = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let result = f();
        let invalid = pollster::block_on(validation.pop());
        let exhausted = pollster::block_on(memory.pop());
        match invalid.or(exhausted) {
            Some(e) => Err(GpuError::Device(e.to_string())),
            None => result,
        }
    }

    /// The adapter's name (for example `NVIDIA H100 80GB HBM3`).
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Whether the adapter is a software renderer.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The GEMM tile for large products on this GPU: each of [`Tile::CANDIDATES`] is timed
    /// when the first GEMM is planned (the first model load), three rounds on a 3072³
    /// product (about half a second on an H100), and the one with the best time kept (a GPU
    /// still raising its clocks only slows a candidate down, so the best of the rounds is
    /// the fair figure). A software adapter keeps [`Tile::LARGE`]: timing would take
    /// minutes.
    pub fn large_tile(&self) -> Tile {
        *self.large_tile.get_or_init(|| {
            if self.is_software() {
                return Tile::LARGE;
            }
            let n = 3072;
            let a: Vec<f32> = (0..n * n).map(|i| (i % 13) as f32 - 6.0).collect();
            let mut best = vec![f64::INFINITY; Tile::CANDIDATES.len()];
            for _round in 0..3 {
                for (tile, best) in Tile::CANDIDATES.iter().zip(&mut best) {
                    if let Ok((_, seconds)) = self.matmul_benchmark(&a, &a, (n, n, n), *tile, 3) {
                        *best = best.min(seconds);
                    }
                }
            }
            let (seconds, tile) = best
                .into_iter()
                .zip(Tile::CANDIDATES)
                .filter(|(s, _)| s.is_finite())
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .unwrap_or((f64::INFINITY, Tile::LARGE));
            tracing::info!(
                ?tile,
                tflops = 2.0 * (n as f64).powi(3) / seconds.max(1e-12) / 1e12,
                "GEMM tile chosen for this GPU"
            );
            tile
        })
    }
}

/// Plans kept per model; a new input shape past this many evicts the oldest.
const MAX_PLANS: usize = 16;

/// A model loaded on a GPU: its graph, its weights on the device, and its plans.
#[derive(Debug)]
pub struct GpuModel {
    gpu: Arc<Gpu>,
    graph: Graph,
    constants: HashMap<String, (Arc<wgpu::Buffer>, Vec<usize>)>,
    plans: Mutex<VecDeque<(InputShapes, Arc<Mutex<Plan>>)>>,
}

/// The shape of each graph input, the key of a plan.
type InputShapes = Vec<Vec<usize>>;

/// A tensor going in or coming out: shape and float32 values.
pub type Values = (Vec<usize>, Vec<f32>);

impl GpuModel {
    /// Reads an ONNX model, uploads its weights and plans it for batch size 1 (every free
    /// dimension 1), so that an operator or shape the kernels cannot run is refused here
    /// and not at the first request.
    pub fn load(gpu: Arc<Gpu>, onnx: &[u8]) -> Result<Self, GpuError> {
        let proto = ModelProto::decode(onnx).map_err(|e| GpuError::Unsupported {
            node: "model".into(),
            problem: format!("undecodable protobuf ({e})"),
        })?;
        let graph = Graph::from_onnx(&proto)?;
        let used: std::collections::HashSet<&str> = graph
            .nodes
            .iter()
            .flat_map(|n| n.inputs.iter().flatten())
            .map(String::as_str)
            .chain(graph.outputs.iter().map(String::as_str))
            .collect();
        let upload = || {
            graph
                .constants
                .iter()
                .filter(|(name, _)| used.contains(name.as_str()))
                .map(|(name, c)| {
                    let bytes: &[u8] =
                        if c.values.is_empty() { &[0; 4] } else { bytemuck::cast_slice(&c.values) };
                    let buffer = gpu.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some(name),
                        contents: bytes,
                        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                    });
                    (name.clone(), (Arc::new(buffer), c.dims.clone()))
                })
                .collect()
        };
        let constants = gpu.checked(|| Ok(upload()))?;
        let model = Self { gpu, graph, constants, plans: Mutex::new(VecDeque::new()) };
        let ones: Vec<Vec<usize>> = model
            .graph
            .inputs
            .iter()
            .map(|i| {
                i.dims
                    .iter()
                    .map(|d| match d {
                        InputDim::Fixed(n) => *n,
                        InputDim::Free => 1,
                    })
                    .collect()
            })
            .collect();
        model.plan(&ones)?;
        Ok(model)
    }

    /// The device it runs on.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The graph as planned (after folding and fusion).
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    fn plan(&self, shapes: &[Vec<usize>]) -> Result<Arc<Mutex<Plan>>, GpuError> {
        let mut plans = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, plan)) = plans.iter().find(|(s, _)| s.as_slice() == shapes) {
            return Ok(plan.clone());
        }
        let plan = Arc::new(Mutex::new(
            self.gpu.checked(|| Plan::build(&self.gpu, &self.graph, &self.constants, shapes))?,
        ));
        if plans.len() == MAX_PLANS {
            plans.pop_front();
        }
        plans.push_back((shapes.to_vec(), plan.clone()));
        Ok(plan)
    }

    /// Runs the model on `inputs`, one per graph input in order; returns every output.
    pub fn run(&self, inputs: &[(&[usize], &[f32])]) -> Result<Vec<Values>, GpuError> {
        if inputs.len() != self.graph.inputs.len() {
            return Err(GpuError::Input(format!(
                "the model takes {} inputs, {} given",
                self.graph.inputs.len(),
                inputs.len()
            )));
        }
        for ((shape, data), input) in inputs.iter().zip(&self.graph.inputs) {
            let fits = shape.len() == input.dims.len()
                && shape
                    .iter()
                    .zip(&input.dims)
                    .all(|(&s, d)| matches!(d, InputDim::Free) || *d == InputDim::Fixed(s));
            if !fits || shape.iter().product::<usize>() != data.len() {
                return Err(GpuError::Input(format!(
                    "input {:?}: {} values of shape {shape:?} do not fit {:?}",
                    input.name,
                    data.len(),
                    input.dims
                )));
            }
        }
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|(s, _)| s.to_vec()).collect();
        let plan = self.plan(&shapes)?;
        let plan = plan.lock().unwrap_or_else(PoisonError::into_inner);
        let data: Vec<&[f32]> = inputs.iter().map(|(_, d)| *d).collect();
        let values = self.gpu.checked(|| plan.run(&self.gpu, &data))?;
        Ok(plan.output_shapes().map(<[usize]>::to_vec).zip(values).collect())
    }
}
