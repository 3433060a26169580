//! Fine-tuning a model's head on the GPU: [`GpuHeadKernel`], the
//! [`HeadKernel`] of `falaj_common::finetune` in two WGSL kernels (`shaders/finetune.wgsl`).
//!
//! The features and targets go up once; the parameters, Adam's moments, the per-batch
//! gradients and the per-row losses stay on the device. An epoch is recorded in a few
//! submissions (two dispatches per optimiser step: the rows' logits, losses and gradients,
//! then every parameter's gradient over the batch and its update) and read back once, for
//! its losses. The arithmetic is the CPU kernel's, operation for operation; only the order
//! of float sums differs.

use std::sync::Arc;

use falaj_common::finetune::{
    ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, Dense, Examples, HeadKernel, Hyperparameters, Objective,
    Optimizer, Sums,
};
use wgpu::util::DeviceExt as _;

use crate::plan::read_back;
use crate::{Gpu, GpuError};

const SOURCE: &str = include_str!("shaders/finetune.wgsl");

/// Threads of `update` per workgroup share this many parameters.
const PARAMS_PER_GROUP: usize = 64;
/// Rows an evaluation dispatch covers at most (and the least the gradient scratch holds).
const EVAL_ROWS: usize = 4096;
/// Optimiser steps recorded per submission: the step blocks' buffer holds this many.
const STEPS_PER_SUBMIT: usize = 1024;
/// Bytes of a step block as the shader reads it (`Step` in the WGSL).
const STEP_BYTES: u64 = 32;
/// Workgroups along one dispatch dimension, at most (WebGPU's default limit).
const MAX_GROUPS: usize = 65_535;

/// Trains a head on a GPU: the same loop ([`falaj_common::finetune::fit`]) and arithmetic
/// as [`falaj_common::finetune::CpuKernel`], on the device.
#[derive(Debug)]
pub struct GpuHeadKernel {
    gpu: Arc<Gpu>,
    hp: Hyperparameters,
    objective: Objective,
    inputs: usize,
    outputs: usize,
    rows: usize,
    forward: wgpu::ComputePipeline,
    update: wgpu::ComputePipeline,
    layout: wgpu::BindGroupLayout,
    /// Bytes between step blocks: the block rounded up to the device's uniform alignment.
    stride: u64,
    buffers: Buffers,
    per_row: PerRow,
}

/// The buffers made once.
#[derive(Debug)]
struct Buffers {
    /// The head's shape, the objective, the optimiser and its constants (`Shape`).
    shape: wgpu::Buffer,
    /// [`STEPS_PER_SUBMIT`] step blocks, `stride` apart.
    steps: wgpu::Buffer,
    features: wgpu::Buffer,
    targets: wgpu::Buffer,
    /// `[W | b]`.
    params: wgpu::Buffer,
    /// Adam's `[m | v]`.
    moments: wgpu::Buffer,
    params_staging: wgpu::Buffer,
}

/// The buffers sized by the number of row indices a pass takes, and the bind group over
/// all of them; made again when a pass takes more rows than they hold.
#[derive(Debug)]
struct PerRow {
    capacity: usize,
    /// Rows of `dz`: the most rows one dispatch covers.
    scratch_rows: usize,
    order: wgpu::Buffer,
    row_out: wgpu::Buffer,
    staging: wgpu::Buffer,
    bind_group: wgpu::BindGroup,
}

/// One dispatch's block: a batch (or evaluation chunk) of the pass's rows.
#[derive(Debug, Clone, Copy)]
struct Step {
    start: usize,
    len: usize,
    evaluate: bool,
    scale: f32,
    c1: f32,
    c2: f32,
}

impl Step {
    fn words(self) -> [u32; 8] {
        [
            self.start as u32,
            self.len as u32,
            u32::from(self.evaluate),
            0,
            self.scale.to_bits(),
            self.c1.to_bits(),
            self.c2.to_bits(),
            0,
        ]
    }
}

/// Workgroups for `n` of them, folded into two dimensions past 65535.
fn groups(n: usize) -> [u32; 3] {
    if n <= MAX_GROUPS {
        [n as u32, 1, 1]
    } else {
        [MAX_GROUPS as u32, n.div_ceil(MAX_GROUPS) as u32, 1]
    }
}

/// Bytes of `floats` 4-byte values; never 0 (a binding must not be empty).
fn bytes_of(floats: usize) -> u64 {
    4 * floats.max(1) as u64
}

/// Refuses a buffer the device cannot bind, naming it, its size and the limit.
fn check_size(limits: &wgpu::Limits, what: String, bytes: u64) -> Result<(), GpuError> {
    let limit = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
    if bytes > limit {
        return Err(GpuError::TooLarge { what, bytes, limit });
    }
    Ok(())
}

fn layout_entry(
    binding: u32,
    ty: wgpu::BufferBindingType,
    dynamic: bool,
) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: dynamic, min_binding_size: None },
        count: None,
    }
}

impl GpuHeadKernel {
    /// A kernel training `start` on `examples` on `gpu`: uploads the features, the targets
    /// and the head (`[W | b]`, as the CPU kernel lays them out) and zeroes Adam's moments.
    /// Hyperparameters that fail [`Hyperparameters::check`], examples that fail
    /// [`Examples::check`] and a head whose weights do not match its shape are
    /// [`GpuError::Input`]; a buffer past the device's limits is [`GpuError::TooLarge`].
    pub fn new(
        gpu: Arc<Gpu>,
        examples: Examples<'_>,
        start: &Dense,
        hp: &Hyperparameters,
    ) -> Result<Self, GpuError> {
        hp.check().map_err(GpuError::Input)?;
        if start.inputs == 0
            || start.outputs == 0
            || start.weights.len() != start.inputs * start.outputs
            || start.bias.len() != start.outputs
        {
            return Err(GpuError::Input(format!(
                "a head of {} inputs and {} outputs cannot have {} weights and {} biases",
                start.inputs,
                start.outputs,
                start.weights.len(),
                start.bias.len()
            )));
        }
        examples.check(start).map_err(GpuError::Input)?;
        let (inputs, outputs, rows) = (start.inputs, start.outputs, examples.rows());
        let count = inputs * outputs + outputs;
        let limits = gpu.device.limits();
        for (what, floats) in [
            (format!("the features ({rows} rows of {inputs})"), examples.features.len()),
            (format!("the targets ({rows} rows)"), examples.targets.len()),
            (format!("Adam's moments (2 × {count} parameters)"), 2 * count),
        ] {
            check_size(&limits, what, bytes_of(floats))?;
        }
        let stride =
            STEP_BYTES.next_multiple_of(u64::from(limits.min_uniform_buffer_offset_alignment));
        let device = &gpu.device;
        let made = gpu.checked(|| {
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("finetune"),
                source: wgpu::ShaderSource::Wgsl(SOURCE.into()),
            });
            let uniform = wgpu::BufferBindingType::Uniform;
            let storage = |read_only| wgpu::BufferBindingType::Storage { read_only };
            let mut entries = vec![layout_entry(0, uniform, false), layout_entry(1, uniform, true)];
            entries.extend((2..=4).map(|b| layout_entry(b, storage(true), false)));
            entries.extend((5..=8).map(|b| layout_entry(b, storage(false), false)));
            let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("finetune"),
                entries: &entries,
            });
            let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("finetune"),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            let pipeline = |entry: &str| {
                device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: wgpu::PipelineCompilationOptions::default(),
                    cache: None,
                })
            };
            let (forward, update) = (pipeline("forward"), pipeline("update"));
            let buffers = Buffers::new(device, examples, start, hp, stride);
            Ok((layout, forward, update, buffers))
        })?;
        let (layout, forward, update, buffers) = made;
        let per_row = PerRow::new(&gpu, &layout, &buffers, rows, hp.batch_size as usize, outputs)?;
        Ok(Self {
            gpu,
            hp: hp.clone(),
            objective: examples.objective,
            inputs,
            outputs,
            rows,
            forward,
            update,
            layout,
            stride,
            buffers,
            per_row,
        })
    }

    /// Refuses row indices past the examples (the shader would read other memory).
    fn check_rows(&self, rows: &[u32]) -> Result<(), GpuError> {
        match rows.iter().position(|&r| r as usize >= self.rows) {
            Some(i) => Err(GpuError::Input(format!(
                "row index {} (entry {i}) is past the {} examples",
                rows[i], self.rows
            ))),
            None => Ok(()),
        }
    }

    /// Makes the per-row buffers hold at least `len` row indices.
    fn reserve(&mut self, len: usize) -> Result<(), GpuError> {
        if len > self.per_row.capacity {
            self.per_row = PerRow::new(
                &self.gpu,
                &self.layout,
                &self.buffers,
                len,
                self.hp.batch_size as usize,
                self.outputs,
            )?;
        }
        Ok(())
    }

    /// Runs `steps` over `order` (the optimiser's update after each forward pass unless
    /// they evaluate), in submissions of [`STEPS_PER_SUBMIT`], and reads back each
    /// position's `[loss, correct]`.
    fn run(&mut self, order: &[u32], steps: &[Step]) -> Result<Vec<f32>, GpuError> {
        self.reserve(order.len())?;
        let gpu = &*self.gpu;
        let per_row = &self.per_row;
        let update_groups =
            groups((self.inputs * self.outputs + self.outputs).div_ceil(PARAMS_PER_GROUP));
        gpu.checked(|| {
            gpu.queue.write_buffer(&per_row.order, 0, bytemuck::cast_slice(order));
            let stride = self.stride as usize;
            for chunk in steps.chunks(STEPS_PER_SUBMIT) {
                let mut blocks = vec![0u8; stride * chunk.len()];
                for (block, step) in blocks.chunks_exact_mut(stride).zip(chunk) {
                    block[..STEP_BYTES as usize]
                        .copy_from_slice(bytemuck::cast_slice(&step.words()));
                }
                gpu.queue.write_buffer(&self.buffers.steps, 0, &blocks);
                let mut encoder =
                    gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
                {
                    let mut pass =
                        encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
                    for (i, step) in chunk.iter().enumerate() {
                        pass.set_bind_group(0, &per_row.bind_group, &[(i * stride) as u32]);
                        pass.set_pipeline(&self.forward);
                        let [x, y, z] = groups(step.len);
                        pass.dispatch_workgroups(x, y, z);
                        if !step.evaluate {
                            pass.set_pipeline(&self.update);
                            let [x, y, z] = update_groups;
                            pass.dispatch_workgroups(x, y, z);
                        }
                    }
                }
                gpu.queue.submit([encoder.finish()]);
            }
            let mut encoder =
                gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
            encoder.copy_buffer_to_buffer(
                &per_row.row_out,
                0,
                &per_row.staging,
                0,
                8 * order.len() as u64,
            );
            gpu.queue.submit([encoder.finish()]);
            Ok(())
        })?;
        Ok(read_back(gpu, &per_row.staging, &[2 * order.len()])?.swap_remove(0))
    }
}

impl Buffers {
    fn new(
        device: &wgpu::Device,
        examples: Examples<'_>,
        start: &Dense,
        hp: &Hyperparameters,
        stride: u64,
    ) -> Self {
        let init = |label: &str, contents: &[u8], usage: wgpu::BufferUsages| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage,
            })
        };
        let storage = wgpu::BufferUsages::STORAGE;
        let params: Vec<f32> = start.weights.iter().chain(&start.bias).copied().collect();
        let shape = [
            start.inputs as u32,
            start.outputs as u32,
            u32::from(examples.objective == Objective::MeanSquaredError),
            u32::from(hp.optimizer == Optimizer::Adam),
            hp.learning_rate.to_bits(),
            hp.l2.to_bits(),
            ADAM_BETA1.to_bits(),
            ADAM_BETA2.to_bits(),
            (1.0 - ADAM_BETA1).to_bits(),
            (1.0 - ADAM_BETA2).to_bits(),
            ADAM_EPSILON.to_bits(),
            0,
        ];
        Self {
            shape: init("shape", bytemuck::cast_slice(&shape), wgpu::BufferUsages::UNIFORM),
            steps: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("steps"),
                size: stride * STEPS_PER_SUBMIT as u64,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            features: init("features", bytemuck::cast_slice(examples.features), storage),
            targets: init("targets", bytemuck::cast_slice(examples.targets), storage),
            params: init(
                "params",
                bytemuck::cast_slice(&params),
                storage | wgpu::BufferUsages::COPY_SRC,
            ),
            moments: init("moments", bytemuck::cast_slice(&vec![0f32; 2 * params.len()]), storage),
            params_staging: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params staging"),
                size: bytes_of(params.len()),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        }
    }
}

impl PerRow {
    /// Buffers for passes of up to `capacity` rows, with the gradient scratch for batches of
    /// `batch_size` and evaluation chunks.
    fn new(
        gpu: &Gpu,
        layout: &wgpu::BindGroupLayout,
        buffers: &Buffers,
        capacity: usize,
        batch_size: usize,
        outputs: usize,
    ) -> Result<Self, GpuError> {
        let scratch_rows = batch_size.max(EVAL_ROWS).min(capacity).max(1);
        let limits = gpu.device.limits();
        for (what, floats) in [
            (format!("the row indices ({capacity})"), capacity),
            (format!("the per-row losses (2 × {capacity})"), 2 * capacity),
            (
                format!("the batch gradients ({scratch_rows} rows × {outputs} outputs)"),
                scratch_rows * outputs,
            ),
        ] {
            check_size(&limits, what, bytes_of(floats))?;
        }
        gpu.checked(|| {
            let device = &gpu.device;
            let buffer = |label: &str, floats: usize, usage: wgpu::BufferUsages| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: bytes_of(floats),
                    usage,
                    mapped_at_creation: false,
                })
            };
            let storage = wgpu::BufferUsages::STORAGE;
            let order = buffer("order", capacity, storage | wgpu::BufferUsages::COPY_DST);
            let dz = buffer("dz", scratch_rows * outputs, storage);
            let row_out = buffer("row_out", 2 * capacity, storage | wgpu::BufferUsages::COPY_SRC);
            let staging = buffer(
                "row_out staging",
                2 * capacity,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            );
            let step = wgpu::BufferBinding {
                buffer: &buffers.steps,
                offset: 0,
                size: std::num::NonZeroU64::new(STEP_BYTES),
            };
            let bound = [
                buffers.shape.as_entire_binding(),
                wgpu::BindingResource::Buffer(step),
                buffers.features.as_entire_binding(),
                buffers.targets.as_entire_binding(),
                order.as_entire_binding(),
                buffers.params.as_entire_binding(),
                buffers.moments.as_entire_binding(),
                dz.as_entire_binding(),
                row_out.as_entire_binding(),
            ];
            let entries: Vec<wgpu::BindGroupEntry<'_>> = bound
                .into_iter()
                .enumerate()
                .map(|(i, resource)| wgpu::BindGroupEntry { binding: i as u32, resource })
                .collect();
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("finetune"),
                layout,
                entries: &entries,
            });
            Ok(Self { capacity, scratch_rows, order, row_out, staging, bind_group })
        })
    }
}

impl HeadKernel for GpuHeadKernel {
    type Error = GpuError;

    fn name(&self) -> &'static str {
        "gpu"
    }

    fn epoch(&mut self, order: &[u32], first_step: u32) -> Result<f64, GpuError> {
        self.check_rows(order)?;
        if order.is_empty() {
            return Ok(0.0);
        }
        let batch = self.hp.batch_size as usize;
        let adam = self.hp.optimizer == Optimizer::Adam;
        let steps: Vec<Step> = order
            .chunks(batch)
            .enumerate()
            .map(|(i, rows)| {
                // As the CPU kernel computes them, so both see the same bits.
                let t = first_step.wrapping_add(i as u32) as i32;
                let (c1, c2) = if adam {
                    (1.0 - ADAM_BETA1.powi(t), 1.0 - ADAM_BETA2.powi(t))
                } else {
                    (1.0, 1.0)
                };
                let scale = 1.0 / rows.len() as f32;
                Step { start: i * batch, len: rows.len(), evaluate: false, scale, c1, c2 }
            })
            .collect();
        let out = self.run(order, &steps)?;
        // Summed per batch then over the batches, as the CPU kernel does.
        let loss: f64 = out
            .chunks(2 * batch)
            .map(|batch| batch.iter().step_by(2).map(|&l| f64::from(l)).sum::<f64>())
            .sum();
        Ok(loss / order.len() as f64)
    }

    fn evaluate(&mut self, rows: &[u32]) -> Result<Sums, GpuError> {
        self.check_rows(rows)?;
        let mut sums = Sums { rows: rows.len() as u64, ..Sums::default() };
        if rows.is_empty() {
            return Ok(sums);
        }
        self.reserve(rows.len())?;
        let chunk = self.per_row.scratch_rows;
        let steps: Vec<Step> = (0..rows.len())
            .step_by(chunk)
            .map(|start| Step {
                start,
                len: chunk.min(rows.len() - start),
                evaluate: true,
                scale: 1.0,
                c1: 1.0,
                c2: 1.0,
            })
            .collect();
        let out = self.run(rows, &steps)?;
        for row in out.chunks_exact(2) {
            sums.loss += f64::from(row[0]);
            if self.objective == Objective::CrossEntropy && row[1] > 0.5 {
                sums.correct += 1;
            }
        }
        Ok(sums)
    }

    fn head(&mut self) -> Result<Dense, GpuError> {
        let gpu = &*self.gpu;
        let count = self.inputs * self.outputs + self.outputs;
        gpu.checked(|| {
            let mut encoder =
                gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
            encoder.copy_buffer_to_buffer(
                &self.buffers.params,
                0,
                &self.buffers.params_staging,
                0,
                bytes_of(count),
            );
            gpu.queue.submit([encoder.finish()]);
            Ok(())
        })?;
        let mut weights = read_back(gpu, &self.buffers.params_staging, &[count])?.swap_remove(0);
        let bias = weights.split_off(self.inputs * self.outputs);
        Ok(Dense { inputs: self.inputs, outputs: self.outputs, weights, bias })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels must be valid WGSL; naga checks them without a device.
    #[test]
    fn the_finetune_shader_parses_and_validates() {
        let module = naga::front::wgsl::parse_str(SOURCE)
            .unwrap_or_else(|e| panic!("{}", e.emit_to_string(SOURCE)));
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{e:?}"));
        for entry in ["forward", "update"] {
            assert!(module.entry_points.iter().any(|e| e.name == entry), "{entry}");
        }
    }

    #[test]
    fn dispatches_fold_past_the_dimension_limit_and_cover_every_group() {
        assert_eq!(groups(1), [1, 1, 1]);
        assert_eq!(groups(65_535), [65_535, 1, 1]);
        assert_eq!(groups(65_536), [65_535, 2, 1]);
        let [x, y, _] = groups(1_000_000);
        assert!(u64::from(x) * u64::from(y) >= 1_000_000);
    }

    #[test]
    fn a_buffer_past_the_limits_is_refused_with_its_size_and_the_limit() {
        let limits = wgpu::Limits::default();
        let limit = limits.max_storage_buffer_binding_size;
        assert!(check_size(&limits, "small".into(), limit).is_ok());
        let err =
            check_size(&limits, "the features (1000000 rows of 256)".into(), 1 << 30).unwrap_err();
        assert!(matches!(err, GpuError::TooLarge { bytes: 1_073_741_824, .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("1000000 rows of 256") && text.contains(&limit.to_string()),
            "{text}"
        );
    }

    #[test]
    fn a_step_block_is_what_the_shader_reads() {
        let step = Step { start: 512, len: 7, evaluate: true, scale: 0.5, c1: 0.1, c2: 0.25 };
        let words = step.words();
        assert_eq!(size_of_val(&words) as u64, STEP_BYTES);
        assert_eq!(words[..3], [512, 7, 1]);
        assert_eq!(words[4], 0.5f32.to_bits());
        assert_eq!(words[6], 0.25f32.to_bits());
    }
}
