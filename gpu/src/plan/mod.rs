//! A graph bound to concrete input shapes: every value's shape resolved, every buffer
//! allocated (intermediates share buffers once their values are dead), every dispatch's
//! parameters written and bind group made. Built once per input shape, run many times.//!
//! The lowering of each node is in `build`, the shape arithmetic in `shapes`.

mod build;
mod shapes;

use std::collections::HashMap;
use std::sync::Arc;

use crate::graph::Graph;
use crate::{Gpu, GpuError};

use build::Builder;
use shapes::elements;

/// One kernel dispatch.
#[derive(Debug)]
struct Step {
    pipeline: Arc<wgpu::ComputePipeline>,
    bind_group: wgpu::BindGroup,
    groups: [u32; 3],
}

/// A value during planning: its buffer (an index into the plan's buffers) and shape.
#[derive(Debug, Clone)]
struct Value {
    buffer: usize,
    shape: Vec<usize>,
}

/// The graph planned for one set of input shapes.
#[derive(Debug)]
pub(crate) struct Plan {
    steps: Vec<Step>,
    inputs: Vec<(Arc<wgpu::Buffer>, usize)>,
    outputs: Vec<(Arc<wgpu::Buffer>, Vec<usize>)>,
    staging: wgpu::Buffer,
}

impl Plan {
    /// Plans `graph` for inputs of `shapes`, reading constants from `constants`.
    pub(crate) fn build(
        gpu: &Gpu,
        graph: &Graph,
        constants: &HashMap<String, (Arc<wgpu::Buffer>, Vec<usize>)>,
        shapes: &[Vec<usize>],
    ) -> Result<Self, GpuError> {
        let empty = Arc::new(gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("empty"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        }));
        let mut b = Builder {
            gpu,
            buffers: Vec::new(),
            live: Vec::new(),
            pinned: Vec::new(),
            free: Vec::new(),
            values: HashMap::new(),
            steps: Vec::new(),
            empty,
        };
        for (name, (buffer, dims)) in constants {
            let index = b.add_buffer(buffer.clone(), true);
            b.define(name, index, dims.clone());
        }
        let mut inputs = Vec::new();
        for (input, shape) in graph.inputs.iter().zip(shapes) {
            let bytes = (4 * elements(shape) as u64).max(4);
            let buffer = Arc::new(gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&input.name),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }));
            let index = b.add_buffer(buffer.clone(), true);
            b.define(&input.name, index, shape.clone());
            inputs.push((buffer, elements(shape)));
        }
        // Where each value is last read, so its buffer can serve a later node.
        let mut last_use: HashMap<&str, usize> = HashMap::new();
        for (i, node) in graph.nodes.iter().enumerate() {
            for name in node.inputs.iter().flatten() {
                last_use.insert(name, i);
            }
        }
        for name in &graph.outputs {
            last_use.insert(name, usize::MAX);
        }
        for (i, node) in graph.nodes.iter().enumerate() {
            b.plan_node(node)
                .map_err(|problem| GpuError::Shape { node: node.name.clone(), problem })?;
            let dead: Vec<&String> = node
                .inputs
                .iter()
                .flatten()
                .filter(|n| last_use.get(n.as_str()) == Some(&i))
                .collect();
            for name in dead {
                b.release(name);
            }
            if !last_use.contains_key(node.output.as_str()) {
                b.release(&node.output); // computed but never read
            }
        }
        let mut outputs = Vec::new();
        let mut staging_size = 0;
        for name in &graph.outputs {
            let v = &b.values[name];
            staging_size += 4 * elements(&v.shape) as u64;
            outputs.push((b.buffers[v.buffer].clone(), v.shape.clone()));
        }
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size: staging_size.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Self { steps: b.steps, inputs, outputs, staging })
    }

    /// Runs the plan on `inputs` (one slice per graph input, of the planned sizes) and
    /// returns each output's values.
    pub(crate) fn run(&self, gpu: &Gpu, inputs: &[&[f32]]) -> Result<Vec<Vec<f32>>, GpuError> {
        for ((buffer, len), data) in self.inputs.iter().zip(inputs) {
            debug_assert_eq!(*len, data.len());
            if !data.is_empty() {
                gpu.queue.write_buffer(buffer, 0, bytemuck::cast_slice(data));
            }
        }
        let mut encoder =
            gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            for step in &self.steps {
                pass.set_pipeline(&step.pipeline);
                pass.set_bind_group(0, &step.bind_group, &[]);
                pass.dispatch_workgroups(step.groups[0], step.groups[1], step.groups[2]);
            }
        }
        let mut offset = 0;
        for (buffer, shape) in &self.outputs {
            let bytes = 4 * elements(shape) as u64;
            if bytes > 0 {
                encoder.copy_buffer_to_buffer(buffer, 0, &self.staging, offset, bytes);
            }
            offset += bytes;
        }
        gpu.queue.submit([encoder.finish()]);
        let lengths: Vec<usize> = self.outputs.iter().map(|(_, shape)| elements(shape)).collect();
        read_back(gpu, &self.staging, &lengths)
    }

    /// Each output's shape.
    pub(crate) fn output_shapes(&self) -> impl Iterator<Item = &[usize]> {
        self.outputs.iter().map(|(_, s)| s.as_slice())
    }
}

/// consecutive pieces of `lengths`.
pub(crate) fn read_back(
    gpu: &Gpu,
    staging: &wgpu::Buffer,
    lengths: &[usize],
) -> Result<Vec<Vec<f32>>, GpuError> {
    let device_error = |e: &dyn std::fmt::Display| GpuError::Device(e.to_string());
    let (sender, receiver) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |result| {
        let _ = sender.send(result);
    });
    gpu.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| device_error(&e))?;
    receiver.recv().map_err(|e| device_error(&e))?.map_err(|e| device_error(&e))?;
    let values = {
        let view = staging.get_mapped_range(..).map_err(|e| device_error(&e))?;
        let mut rest: &[f32] = bytemuck::cast_slice(&view);
        lengths
            .iter()
            .map(|&n| {
                let (head, tail) = rest.split_at(n);
                rest = tail;
                head.to_vec()
            })
            .collect()
    };
    staging.unmap();
    Ok(values)
}
