//! Timing GEMM tiles: one matrix product dispatched repeatedly with a chosen tile, for
//! [`Gpu::large_tile`]'s choice at the first model load and for the benchmarks.

use std::sync::Arc;

use wgpu::util::DeviceExt as _;

use crate::kernels::{ActKey, GemmInput, Kernel, Tile, gemm_params as gp};
use crate::{Gpu, GpuError};

use crate::plan::read_back;

impl Gpu {
    /// Multiplies row-major `a` (m × k) by `b` (k × n) with the given tile, for benchmarks
    /// and tile timing: `runs` dispatches in one submission after a warm-up. Returns the
    /// product and the seconds each dispatch took on average.
    pub fn matmul_benchmark(
        &self,
        a: &[f32],
        b: &[f32],
        (m, n, k): (usize, usize, usize),
        tile: Tile,
        runs: u32,
    ) -> Result<(Vec<f32>, f64), GpuError> {
        let gpu = self;
        let upload = |data: &[f32]| {
            Arc::new(gpu.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("operand"),
                contents: bytemuck::cast_slice(data),
                usage: wgpu::BufferUsages::STORAGE,
            }))
        };
        let out = Arc::new(gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("product"),
            size: 4 * (m * n) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        }));
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size: 4 * (m * n) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut p = vec![0u32; gp::LEN];
        p[gp::M] = m as u32;
        p[gp::N] = n as u32;
        p[gp::K] = k as u32;
        p[gp::BATCH_DIMS..gp::BATCH_DIMS + 4].copy_from_slice(&[1; 4]);
        p[gp::A_STRIDES] = k as u32;
        p[gp::A_STRIDES + 1] = 1;
        p[gp::B_STRIDES] = n as u32;
        p[gp::B_STRIDES + 1] = 1;
        p[gp::ALPHA] = 1f32.to_bits();
        let kernel = Kernel::Gemm(tile, GemmInput::Matrices, ActKey::new(None));
        let pipeline = gpu.pipelines.get(&gpu.device, &kernel);
        let params = upload(bytemuck::cast_slice(&p));
        let (a, b, empty) = (upload(a), upload(b), upload(&[0.0; 4]));
        let buffers = [&params, &a, &b, &empty, &out];
        let entries: Vec<wgpu::BindGroupEntry<'_>> = buffers
            .iter()
            .enumerate()
            .map(|(i, buffer)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: buffer.as_entire_binding(),
            })
            .collect();
        let bind_group = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let groups = [n.div_ceil(tile.bn as usize) as u32, m.div_ceil(tile.bm as usize) as u32, 1];
        let submit = |count: u32| -> Result<f64, GpuError> {
            let mut encoder =
                gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                for _ in 0..count {
                    pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                }
            }
            let start = std::time::Instant::now();
            gpu.queue.submit([encoder.finish()]);
            gpu.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| GpuError::Device(e.to_string()))?;
            Ok(start.elapsed().as_secs_f64() / f64::from(count))
        };
        submit(1)?;
        let seconds = submit(runs.max(1))?;
        let mut encoder =
            gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
        encoder.copy_buffer_to_buffer(&out, 0, &staging, 0, 4 * (m * n) as u64);
        gpu.queue.submit([encoder.finish()]);
        let values = read_back(gpu, &staging, &[m * n])?.swap_remove(0);
        Ok((values, seconds))
    }
}
