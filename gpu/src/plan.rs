//! A graph bound to concrete input shapes: every value's shape resolved, every buffer
//! allocated (intermediates share buffers once their values are dead), every dispatch's
//! parameters written and bind group made. Built once per input shape, run many times.

use std::collections::HashMap;
use std::sync::Arc;

use wgpu::util::DeviceExt as _;

use crate::graph::{Graph, Node, Op, Padding, PoolKind, ViewKind, Window};
use crate::kernels::{ActKey, GemmInput, Kernel, Tile, arith_key, gemm_params as gp};
use crate::{Gpu, GpuError};

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

fn elements(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// numpy broadcasting of two shapes.
fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
            let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
            match (da, db) {
                (x, y) if x == y => Some(x),
                (1, y) => Some(y),
                (x, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

/// Strides for reading `shape` as if broadcast to `out` (0 on broadcast axes), padded on
/// the left to `out`'s rank.
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let strides = contiguous_strides(shape);
    let pad = out.len() - shape.len();
    (0..out.len())
        .map(|i| if i < pad || shape[i - pad] == 1 { 0 } else { strides[i - pad] })
        .collect()
}

/// Pads a list on the left to six entries with `fill`.
fn six(values: &[usize], fill: usize) -> Result<Vec<u32>, String> {
    if values.len() > 6 {
        return Err(format!("rank {} (at most 6)", values.len()));
    }
    let mut out = vec![fill; 6 - values.len()];
    out.extend_from_slice(values);
    out.into_iter().map(|v| u32::try_from(v).map_err(|_| "a size over 2^32".to_owned())).collect()
}

fn axis(axis: i64, rank: usize) -> Option<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    usize::try_from(a).ok().filter(|&a| a < rank)
}

/// Output size and begin/end pads of one spatial axis.
fn spatial(input: usize, window: &Window, i: usize) -> Option<(usize, usize, usize)> {
    if input == 0 {
        return None; // an empty axis: no window fits
    }
    let spatial = window.kernel.len();
    let effective = (window.kernel[i] - 1) * window.dilations[i] + 1;
    let stride = window.strides[i];
    let (begin, end) = match &window.padding {
        Padding::Explicit(pads) => (pads[i], pads[i + spatial]),
        Padding::Valid => (0, 0),
        Padding::Same { upper } => {
            let out = input.div_ceil(stride);
            let total = ((out - 1) * stride + effective).saturating_sub(input);
            let small = total / 2;
            if *upper { (small, total - small) } else { (total - small, small) }
        }
    };
    let span = (input + begin + end).checked_sub(effective)?;
    let mut out = if window.ceil_mode { span.div_ceil(stride) + 1 } else { span / stride + 1 };
    // A last window that would start in the end padding is dropped (as ONNX and PyTorch do).
    if window.ceil_mode && (out - 1) * stride >= input + begin {
        out -= 1;
    }
    Some((out, begin, end))
}

/// Builds plans: tracks values, hands out buffers and records dispatches.
struct Builder<'a> {
    gpu: &'a Gpu,
    buffers: Vec<Arc<wgpu::Buffer>>,
    live: Vec<usize>,
    pinned: Vec<bool>,
    free: Vec<usize>,
    values: HashMap<String, Value>,
    steps: Vec<Step>,
    empty: Arc<wgpu::Buffer>,
}

impl Builder<'_> {
    fn add_buffer(&mut self, buffer: Arc<wgpu::Buffer>, pinned: bool) -> usize {
        self.buffers.push(buffer);
        self.live.push(0);
        self.pinned.push(pinned);
        self.buffers.len() - 1
    }

    /// A buffer of at least `bytes` for a node's output: a dead one if one is large enough.
    fn output(&mut self, bytes: u64) -> usize {
        let bytes = bytes.max(4);
        let best = self
            .free
            .iter()
            .enumerate()
            .filter(|&(_, &b)| self.buffers[b].size() >= bytes)
            .min_by_key(|&(_, &b)| self.buffers[b].size())
            .map(|(i, _)| i);
        if let Some(i) = best {
            return self.free.swap_remove(i);
        }
        let buffer = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("value"),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        self.add_buffer(Arc::new(buffer), false)
    }

    fn define(&mut self, name: &str, buffer: usize, shape: Vec<usize>) {
        self.live[buffer] += 1;
        self.values.insert(name.to_owned(), Value { buffer, shape });
    }

    fn release(&mut self, name: &str) {
        if let Some(v) = self.values.get(name) {
            let b = v.buffer;
            self.live[b] -= 1;
            if self.live[b] == 0 && !self.pinned[b] {
                self.free.push(b);
            }
        }
    }

    fn value(&self, node: &Node, index: usize) -> Result<&Value, String> {
        node.inputs
            .get(index)
            .and_then(Option::as_deref)
            .and_then(|name| self.values.get(name))
            .ok_or_else(|| format!("input {index} is missing"))
    }

    fn dispatch(&mut self, kernel: &Kernel, params: &[u32], buffers: &[usize], groups: [u32; 3]) {
        let refs: Vec<Arc<wgpu::Buffer>> =
            buffers.iter().map(|&b| self.buffers[b].clone()).collect();
        self.dispatch_buffers(kernel, params, &refs, groups);
    }

    fn dispatch_buffers(
        &mut self,
        kernel: &Kernel,
        params: &[u32],
        buffers: &[Arc<wgpu::Buffer>],
        groups: [u32; 3],
    ) {
        if groups.contains(&0) {
            return;
        }
        let pipeline = self.gpu.pipelines.get(&self.gpu.device, kernel);
        let params = self.gpu.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: bytemuck::cast_slice(params),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let mut entries =
            vec![wgpu::BindGroupEntry { binding: 0, resource: params.as_entire_binding() }];
        for (i, b) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: b.as_entire_binding(),
            });
        }
        let bind_group = self.gpu.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        self.steps.push(Step { pipeline, bind_group, groups });
    }

    /// Workgroups for `n` invocations of 256, folded into two dimensions past 65535.
    fn linear_groups(n: usize) -> [u32; 3] {
        let groups = n.div_ceil(256) as u32;
        if groups <= 65_535 { [groups, 1, 1] } else { [65_535, groups.div_ceil(65_535), 1] }
    }

    fn plan_node(&mut self, node: &Node) -> Result<(), String> {
        let act = ActKey::new(node.activation);
        let x = self.value(node, 0)?.clone();
        match &node.op {
            Op::View(kind) => {
                let shape = view_shape(kind, &x.shape)?;
                if elements(&shape) != elements(&x.shape) {
                    return Err(format!("cannot view {:?} as {shape:?}", x.shape));
                }
                self.define(&node.output, x.buffer, shape);
            }
            Op::Activation(a) => {
                let out = self.output(4 * elements(&x.shape) as u64);
                let n = elements(&x.shape);
                self.dispatch(
                    &Kernel::Unary(ActKey::new(Some(*a))),
                    &[n as u32],
                    &[x.buffer, out],
                    Self::linear_groups(n),
                );
                self.define(&node.output, out, x.shape);
            }
            Op::Arith(op) => {
                let y = self.value(node, 1)?.clone();
                let shape = broadcast(&x.shape, &y.shape).ok_or_else(|| {
                    format!("shapes {:?} and {:?} do not broadcast", x.shape, y.shape)
                })?;
                let n = elements(&shape);
                let mut params = vec![n as u32];
                params.extend(six(&shape, 1)?);
                params.extend(six(&broadcast_strides(&x.shape, &shape), 0)?);
                params.extend(six(&broadcast_strides(&y.shape, &shape), 0)?);
                let out = self.output(4 * n as u64);
                self.dispatch(
                    &Kernel::Arith(arith_key(*op), act),
                    &params,
                    &[x.buffer, y.buffer, out],
                    Self::linear_groups(n),
                );
                self.define(&node.output, out, shape);
            }
            Op::Softmax { axis: a, log, legacy } => self.softmax(node, &x, *a, *log, *legacy)?,
            Op::ArgMax { axis: a, keepdims, last } => {
                self.argmax(node, &x, *a, *keepdims, *last)?;
            }
            Op::Transpose(perm) => self.transpose(node, &x, perm.as_deref())?,
            Op::Concat(a) => self.concat(node, &x, *a)?,
            Op::MatMul => self.matmul(node, &x, act)?,
            Op::Gemm { alpha, beta, trans_a, trans_b } => {
                self.gemm(node, &x, (*alpha, *beta, *trans_a, *trans_b), act)?;
            }
            Op::Conv { window, groups } => self.conv(node, &x, window, *groups, act)?,
            Op::Pool(kind, window) => {
                let code = match kind {
                    PoolKind::Max => 0,
                    PoolKind::Average { count_include_pad: false } => 1,
                    PoolKind::Average { count_include_pad: true } => 2,
                };
                self.pool(node, &x, window, code)?;
            }
            Op::GlobalAveragePool => self.global_average_pool(node, &x)?,
            Op::BatchNorm { epsilon } => self.batch_norm(node, &x, *epsilon, act)?,
        }
        Ok(())
    }

    fn softmax(
        &mut self,
        node: &Node,
        x: &Value,
        a: i64,
        log: bool,
        legacy: bool,
    ) -> Result<(), String> {
        let rank = x.shape.len();
        let a = axis(a, rank).ok_or("axis out of range")?;
        let outer: usize = x.shape[..a].iter().product();
        let (len, inner) = if legacy {
            (x.shape[a..].iter().product(), 1)
        } else {
            (x.shape[a], x.shape[a + 1..].iter().product())
        };
        let rows = outer * inner;
        let out = self.output(4 * elements(&x.shape) as u64);
        let params = [rows as u32, len as u32, inner as u32];
        self.dispatch(&Kernel::Softmax(log), &params, &[x.buffer, out], Self::linear_groups(rows));
        self.define(&node.output, out, x.shape.clone());
        Ok(())
    }

    fn argmax(
        &mut self,
        node: &Node,
        x: &Value,
        a: i64,
        keepdims: bool,
        last: bool,
    ) -> Result<(), String> {
        let a = axis(a, x.shape.len()).ok_or("axis out of range")?;
        if x.shape[a] == 0 {
            return Err("ArgMax over an empty axis".into());
        }
        let outer: usize = x.shape[..a].iter().product();
        let inner: usize = x.shape[a + 1..].iter().product();
        let mut shape = x.shape.clone();
        if keepdims {
            shape[a] = 1;
        } else {
            shape.remove(a);
        }
        let rows = outer * inner;
        let out = self.output(4 * rows as u64);
        let params = [rows as u32, x.shape[a] as u32, inner as u32, u32::from(last)];
        self.dispatch(&Kernel::ArgMax, &params, &[x.buffer, out], Self::linear_groups(rows));
        self.define(&node.output, out, shape);
        Ok(())
    }

    fn transpose(&mut self, node: &Node, x: &Value, perm: Option<&[usize]>) -> Result<(), String> {
        let rank = x.shape.len();
        let perm = perm.map_or_else(|| (0..rank).rev().collect(), <[usize]>::to_vec);
        let mut seen = vec![false; rank];
        if perm.len() != rank
            || perm.iter().any(|&p| p >= rank || std::mem::replace(&mut seen[p], true))
        {
            return Err(format!("perm {perm:?} for rank {rank}"));
        }
        let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
        let strides = contiguous_strides(&x.shape);
        let src: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
        let out = self.output(4 * elements(&shape) as u64);
        self.copy(x.buffer, out, &shape, &src, &contiguous_strides(&shape), 0)?;
        self.define(&node.output, out, shape);
        Ok(())
    }

    fn concat(&mut self, node: &Node, x: &Value, a: i64) -> Result<(), String> {
        let parts: Vec<Value> = (0..node.inputs.len())
            .map(|i| self.value(node, i).cloned())
            .collect::<Result<_, _>>()?;
        let rank = x.shape.len();
        let a = axis(a, rank).ok_or("axis out of range")?;
        let mut shape = x.shape.clone();
        shape[a] = 0;
        for part in &parts {
            let same = part.shape.len() == rank
                && (0..rank).all(|i| i == a || part.shape[i] == x.shape[i]);
            if !same {
                return Err(format!("cannot concatenate {:?} with {:?}", x.shape, part.shape));
            }
            shape[a] += part.shape[a];
        }
        let out = self.output(4 * elements(&shape) as u64);
        let dst = contiguous_strides(&shape);
        let mut offset = 0;
        for part in &parts {
            let src = contiguous_strides(&part.shape);
            self.copy(part.buffer, out, &part.shape, &src, &dst, offset * dst[a])?;
            offset += part.shape[a];
        }
        self.define(&node.output, out, shape);
        Ok(())
    }

    fn global_average_pool(&mut self, node: &Node, x: &Value) -> Result<(), String> {
        let spatial = x.shape.len().saturating_sub(2);
        if !(1..=2).contains(&spatial) {
            return Err(format!("input of rank {} (one or two spatial axes)", x.shape.len()));
        }
        let window = Window {
            kernel: x.shape[2..].to_vec(),
            strides: vec![1; spatial],
            dilations: vec![1; spatial],
            padding: Padding::Valid,
            ceil_mode: false,
        };
        self.pool(node, x, &window, 1)
    }

    fn batch_norm(
        &mut self,
        node: &Node,
        x: &Value,
        epsilon: f32,
        act: ActKey,
    ) -> Result<(), String> {
        if x.shape.len() < 2 {
            return Err(format!("input of rank {}", x.shape.len()));
        }
        let c = x.shape[1];
        let stats: Vec<Value> =
            (1..5).map(|i| self.value(node, i).cloned()).collect::<Result<_, _>>()?;
        if stats.iter().any(|s| elements(&s.shape) != c) {
            return Err(format!("statistics of another length than {c} channels"));
        }
        let n = elements(&x.shape);
        let inner: usize = x.shape[2..].iter().product();
        let out = self.output(4 * n as u64);
        let mut buffers = vec![x.buffer];
        buffers.extend(stats.iter().map(|s| s.buffer));
        buffers.push(out);
        let params = [n as u32, c as u32, inner as u32, epsilon.to_bits()];
        self.dispatch(&Kernel::BatchNorm(act), &params, &buffers, Self::linear_groups(n));
        self.define(&node.output, out, x.shape.clone());
        Ok(())
    }

    fn copy(
        &mut self,
        src: usize,
        dst: usize,
        shape: &[usize],
        src_strides: &[usize],
        dst_strides: &[usize],
        offset: usize,
    ) -> Result<(), String> {
        let n = elements(shape);
        let mut params = vec![n as u32, offset as u32];
        params.extend(six(shape, 1)?);
        params.extend(six(src_strides, 0)?);
        params.extend(six(dst_strides, 0)?);
        self.dispatch(&Kernel::Copy, &params, &[src, dst], Self::linear_groups(n));
        Ok(())
    }

    fn pool(&mut self, node: &Node, x: &Value, window: &Window, kind: u32) -> Result<(), String> {
        let (planes, h, w, window) = spatial_view(&x.shape, window)?;
        let (oh, pt, pb) = spatial(h, &window, 0).ok_or("window larger than its input")?;
        let (ow, pl, pr) = spatial(w, &window, 1).ok_or("window larger than its input")?;
        let total = planes * oh * ow;
        let params = [
            total,
            h,
            w,
            oh,
            ow,
            window.kernel[0],
            window.kernel[1],
            window.strides[0],
            window.strides[1],
            pt,
            pl,
            pb,
            pr,
            window.dilations[0],
            window.dilations[1],
            kind as usize,
        ];
        let out = self.output(4 * total as u64);
        let params: Vec<u32> = params.iter().map(|&v| v as u32).collect();
        self.dispatch(&Kernel::Pool, &params, &[x.buffer, out], Self::linear_groups(total));
        let mut shape = x.shape[..2].to_vec();
        if x.shape.len() == 3 {
            shape.push(ow);
        } else {
            shape.extend([oh, ow]);
        }
        self.define(&node.output, out, shape);
        Ok(())
    }

    fn gemm_dispatch(
        &mut self,
        input: GemmInput,
        act: ActKey,
        p: &[u32],
        buffers: &[Arc<wgpu::Buffer>; 4],
        batch: usize,
    ) {
        let (m, n) = (p[gp::M] as usize, p[gp::N] as usize);
        let tiles = |t: Tile| m.div_ceil(t.bm as usize) * n.div_ceil(t.bn as usize) * batch;
        // Large tiles only when they still give the GPU plenty of workgroups.
        let large = self.gpu.large_tile();
        let tile = if tiles(large) >= 256 { large } else { Tile::SMALL };
        let groups = [
            n.div_ceil(tile.bn as usize) as u32,
            m.div_ceil(tile.bm as usize) as u32,
            batch as u32,
        ];
        self.dispatch_buffers(&Kernel::Gemm(tile, input, act), p, buffers, groups);
    }

    #[allow(clippy::too_many_arguments)]
    fn product(
        &mut self,
        node: &Node,
        a: &Value,
        b: &Value,
        (m, n, k): (usize, usize, usize),
        (a_strides, b_strides): ([usize; 2], [usize; 2]),
        batch: (&[usize], &[usize], &[usize]),
        bias: Option<(&Value, [usize; 2], &[usize], f32)>,
        alpha: f32,
        act: ActKey,
        out_shape: Vec<usize>,
    ) -> Result<(), String> {
        let (batch_dims, a_batch, b_batch) = batch;
        if batch_dims.len() > 4 {
            return Err("more than four batch dimensions".into());
        }
        let pad4 = |v: &[usize], fill: usize| -> Vec<u32> {
            let mut out = vec![fill as u32; 4 - v.len()];
            out.extend(v.iter().map(|&x| x as u32));
            out
        };
        let mut p = vec![0u32; gp::LEN];
        p[gp::M] = m as u32;
        p[gp::N] = n as u32;
        p[gp::K] = k as u32;
        p[gp::BATCH_DIMS..gp::BATCH_DIMS + 4].copy_from_slice(&pad4(batch_dims, 1));
        p[gp::A_BATCH..gp::A_BATCH + 4].copy_from_slice(&pad4(a_batch, 0));
        p[gp::B_BATCH..gp::B_BATCH + 4].copy_from_slice(&pad4(b_batch, 0));
        p[gp::A_STRIDES] = a_strides[0] as u32;
        p[gp::A_STRIDES + 1] = a_strides[1] as u32;
        p[gp::B_STRIDES] = b_strides[0] as u32;
        p[gp::B_STRIDES + 1] = b_strides[1] as u32;
        p[gp::ALPHA] = alpha.to_bits();
        let c_buffer = match bias {
            Some((c, strides, c_batch, beta)) => {
                p[gp::C_BATCH..gp::C_BATCH + 4].copy_from_slice(&pad4(c_batch, 0));
                p[gp::C_STRIDES] = strides[0] as u32;
                p[gp::C_STRIDES + 1] = strides[1] as u32;
                p[gp::HAS_BIAS] = 1;
                p[gp::BETA] = beta.to_bits();
                self.buffers[c.buffer].clone()
            }
            None => self.empty.clone(),
        };
        let batch: usize = batch_dims.iter().product();
        let out = self.output(4 * elements(&out_shape) as u64);
        let buffers = [
            self.buffers[a.buffer].clone(),
            self.buffers[b.buffer].clone(),
            c_buffer,
            self.buffers[out].clone(),
        ];
        self.gemm_dispatch(GemmInput::Matrices, act, &p, &buffers, batch);
        self.define(&node.output, out, out_shape);
        Ok(())
    }

    fn matmul(&mut self, node: &Node, a: &Value, act: ActKey) -> Result<(), String> {
        let b = self.value(node, 1)?.clone();
        let (ra, rb) = (a.shape.len(), b.shape.len());
        if ra == 0 || rb == 0 {
            return Err("scalar operand".into());
        }
        // numpy: a vector operand is promoted to a matrix, and the added axis removed.
        let a_shape = if ra == 1 { vec![1, a.shape[0]] } else { a.shape.clone() };
        let b_shape = if rb == 1 { vec![b.shape[0], 1] } else { b.shape.clone() };
        let (m, k) = (a_shape[a_shape.len() - 2], a_shape[a_shape.len() - 1]);
        let (k2, n) = (b_shape[b_shape.len() - 2], b_shape[b_shape.len() - 1]);
        if k != k2 {
            return Err(format!("cannot multiply {:?} by {:?}", a.shape, b.shape));
        }
        let a_batch = &a_shape[..a_shape.len() - 2];
        let b_batch = &b_shape[..b_shape.len() - 2];
        let batch = broadcast(a_batch, b_batch).ok_or("batch dimensions do not broadcast")?;
        let a_bs = batch_strides(a_batch, &batch, m * k);
        let b_bs = batch_strides(b_batch, &batch, k * n);
        let mut shape = batch.clone();
        if ra > 1 {
            shape.push(m);
        }
        if rb > 1 {
            shape.push(n);
        }
        self.product(
            node,
            a,
            &b,
            (m, n, k),
            ([k, 1], [n, 1]),
            (&batch, &a_bs, &b_bs),
            None,
            1.0,
            act,
            shape,
        )
    }

    fn gemm(
        &mut self,
        node: &Node,
        a: &Value,
        (alpha, beta, trans_a, trans_b): (f32, f32, bool, bool),
        act: ActKey,
    ) -> Result<(), String> {
        let b = self.value(node, 1)?.clone();
        let (&[ar, ac], &[br, bc]) = (&a.shape[..], &b.shape[..]) else {
            return Err(format!("Gemm needs matrices, not {:?} and {:?}", a.shape, b.shape));
        };
        let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
        let (k2, n) = if trans_b { (bc, br) } else { (br, bc) };
        if k != k2 {
            return Err(format!("cannot multiply {:?} by {:?}", a.shape, b.shape));
        }
        let a_strides = if trans_a { [1, ac] } else { [ac, 1] };
        let b_strides = if trans_b { [1, bc] } else { [bc, 1] };
        let c = match node.inputs.get(2).and_then(Option::as_deref) {
            Some(name) => Some(self.values.get(name).cloned().ok_or("bias missing")?),
            None => None,
        };
        let bias = match &c {
            Some(c) if c.shape.len() <= 2 => {
                if broadcast(&c.shape, &[m, n]).as_deref() != Some(&[m, n][..]) {
                    return Err(format!("bias {:?} does not broadcast to [{m}, {n}]", c.shape));
                }
                let s = broadcast_strides(&c.shape, &[m, n]);
                Some((c, [s[0], s[1]], &[][..], beta))
            }
            Some(c) => return Err(format!("bias of rank {}", c.shape.len())),
            None => None,
        };
        self.product(
            node,
            a,
            &b,
            (m, n, k),
            (a_strides, b_strides),
            (&[], &[], &[]),
            bias,
            alpha,
            act,
            vec![m, n],
        )
    }

    fn conv(
        &mut self,
        node: &Node,
        x: &Value,
        window: &Window,
        groups: usize,
        act: ActKey,
    ) -> Result<(), String> {
        let w = self.value(node, 1)?.clone();
        let mut window = window.clone();
        if window.kernel.is_empty() {
            window.kernel = w.shape.get(2..).map(<[usize]>::to_vec).unwrap_or_default();
        }
        if x.shape.len() < 3 || w.shape.len() != x.shape.len() || w.shape[2..] != window.kernel[..]
        {
            return Err(format!(
                "weights {:?} for input {:?} and kernel {:?}",
                w.shape, x.shape, window.kernel
            ));
        }
        let (_, h, wd, window) = spatial_view(&x.shape, &window)?;
        let images = x.shape[0];
        let (c_in, c_out) = (x.shape[1], w.shape[0]);
        if c_in % groups != 0 || c_out % groups != 0 || w.shape[1] * groups != c_in {
            return Err(format!(
                "{c_in} input and {c_out} output channels in {groups} groups, weights {:?}",
                w.shape
            ));
        }
        let (kh, kw) = (window.kernel[0], window.kernel[1]);
        let (oh, pt, _) = spatial(h, &window, 0).ok_or("kernel larger than its input")?;
        let (ow, pl, _) = spatial(wd, &window, 1).ok_or("kernel larger than its input")?;
        let (icg, ocg) = (c_in / groups, c_out / groups);
        let bias = match node.inputs.get(2).and_then(Option::as_deref) {
            Some(name) => {
                let b = self.values.get(name).ok_or("bias missing")?;
                if elements(&b.shape) != c_out {
                    return Err(format!("bias {:?} for {c_out} channels", b.shape));
                }
                Some(self.buffers[b.buffer].clone())
            }
            None => None,
        };
        let has_bias = u32::from(bias.is_some());
        let bias = bias.unwrap_or_else(|| self.empty.clone());
        let mut shape = vec![images, c_out];
        if x.shape.len() == 3 {
            shape.push(ow);
        } else {
            shape.extend([oh, ow]);
        }
        let out = self.output(4 * elements(&shape) as u64);
        let (s, d) = (&window.strides, &window.dilations);
        let geometry =
            [c_in, h, wd, oh, ow, kh, kw, s[0], s[1], pt, pl, d[0], d[1], c_out, icg, ocg]
                .map(|v| v as u32);
        if ocg < 16 {
            // Too few output channels per group to fill a GEMM tile's rows: one invocation
            // per output instead.
            let total = elements(&shape);
            let mut p = vec![total as u32];
            p.extend(geometry);
            p.push(has_bias);
            let buffers = [
                self.buffers[x.buffer].clone(),
                self.buffers[w.buffer].clone(),
                bias,
                self.buffers[out].clone(),
            ];
            self.dispatch_buffers(
                &Kernel::ConvDirect(act),
                &p,
                &buffers,
                Self::linear_groups(total),
            );
            self.define(&node.output, out, shape);
            return Ok(());
        }
        let mut p = vec![0u32; gp::LEN];
        p[gp::M] = ocg as u32;
        p[gp::N] = (images * oh * ow) as u32;
        p[gp::K] = (icg * kh * kw) as u32;
        p[gp::BATCH_DIMS..gp::BATCH_DIMS + 4].copy_from_slice(&[1, 1, 1, groups as u32]);
        p[gp::CONV..gp::CONV + geometry.len()].copy_from_slice(&geometry);
        p[gp::HAS_BIAS] = has_bias;
        let buffers = [
            self.buffers[w.buffer].clone(),
            self.buffers[x.buffer].clone(),
            bias,
            self.buffers[out].clone(),
        ];
        self.gemm_dispatch(GemmInput::Convolution, act, &p, &buffers, groups);
        self.define(&node.output, out, shape);
        Ok(())
    }
}

/// Per-dimension batch strides of an operand broadcast to `batch`.
fn batch_strides(operand: &[usize], batch: &[usize], matrix: usize) -> Vec<usize> {
    broadcast_strides(operand, batch).into_iter().map(|s| s * matrix).collect::<Vec<_>>()
}

/// A 1-D or 2-D window input seen as (images × channels, H, W), with 1-D as H = 1.
fn spatial_view(shape: &[usize], window: &Window) -> Result<(usize, usize, usize, Window), String> {
    match (shape.len(), window.kernel.len()) {
        (4, 2) => Ok((shape[0] * shape[1], shape[2], shape[3], window.clone())),
        (3, 1) => {
            let padding = match &window.padding {
                Padding::Explicit(p) => Padding::Explicit(vec![0, p[0], 0, p[1]]),
                other => other.clone(),
            };
            Ok((
                shape[0] * shape[1],
                1,
                shape[2],
                Window {
                    kernel: vec![1, window.kernel[0]],
                    strides: vec![1, window.strides[0]],
                    dilations: vec![1, window.dilations[0]],
                    padding,
                    ceil_mode: window.ceil_mode,
                },
            ))
        }
        (rank, spatial) => Err(format!("input of rank {rank} for a {spatial}-D window")),
    }
}

fn view_shape(kind: &ViewKind, input: &[usize]) -> Result<Vec<usize>, String> {
    let rank = input.len();
    Ok(match kind {
        ViewKind::Identity => input.to_vec(),
        ViewKind::Flatten(a) => {
            let a = if *a < 0 { *a + rank as i64 } else { *a };
            let a = usize::try_from(a).ok().filter(|&a| a <= rank).ok_or("axis out of range")?;
            vec![input[..a].iter().product(), input[a..].iter().product()]
        }
        ViewKind::Reshape { shape, allowzero } => {
            let mut out = Vec::with_capacity(shape.len());
            let mut infer = None;
            for (i, &d) in shape.iter().enumerate() {
                match d {
                    -1 if infer.is_none() => {
                        infer = Some(i);
                        out.push(1);
                    }
                    0 if !allowzero => out.push(*input.get(i).ok_or("0 past the input's rank")?),
                    d if d >= 0 => out.push(d as usize),
                    _ => return Err(format!("target shape {shape:?}")),
                }
            }
            if let Some(i) = infer {
                let known: usize = out.iter().product();
                if known == 0 || !elements(input).is_multiple_of(known) {
                    return Err(format!("cannot infer -1 in {shape:?} from {input:?}"));
                }
                out[i] = elements(input) / known;
            }
            out
        }
        ViewKind::Squeeze(axes) => match axes {
            None => input.iter().copied().filter(|&d| d != 1).collect(),
            Some(axes) => {
                let axes: Vec<usize> = axes
                    .iter()
                    .map(|&a| axis(a, rank))
                    .collect::<Option<_>>()
                    .ok_or("axis out of range")?;
                if axes.iter().any(|&a| input[a] != 1) {
                    return Err(format!("squeezing an axis of size other than 1 in {input:?}"));
                }
                input
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !axes.contains(i))
                    .map(|(_, &d)| d)
                    .collect()
            }
        },
        ViewKind::Unsqueeze(axes) => {
            let out_rank = rank + axes.len();
            let axes: Vec<usize> = axes
                .iter()
                .map(|&a| axis(a, out_rank))
                .collect::<Option<_>>()
                .ok_or("axis out of range")?;
            let mut rest = input.iter();
            (0..out_rank)
                .map(|i| if axes.contains(&i) { Some(1) } else { rest.next().copied() })
                .collect::<Option<_>>()
                .ok_or("repeated axes")?
        }
    })
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

/// Maps `staging` after the work queued so far and copies its floats out, split into
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast(&[2, 3, 4], &[4]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast(&[2, 1, 4], &[3, 1]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast(&[2, 3], &[4]), None);
        assert_eq!(broadcast_strides(&[3, 1], &[2, 3, 4]), vec![0, 1, 0]);
    }

    #[test]
    fn spatial_sizes_follow_the_onnx_formulas() {
        let w = |padding, ceil_mode| Window {
            kernel: vec![3],
            strides: vec![2],
            dilations: vec![1],
            padding,
            ceil_mode,
        };
        assert_eq!(spatial(32, &w(Padding::Explicit(vec![1, 1]), false), 0), Some((16, 1, 1)));
        assert_eq!(spatial(32, &w(Padding::Same { upper: true }, false), 0), Some((16, 0, 1)));
        assert_eq!(spatial(32, &w(Padding::Same { upper: false }, false), 0), Some((16, 1, 0)));
        assert_eq!(spatial(32, &w(Padding::Valid, false), 0), Some((15, 0, 0)));
        assert_eq!(spatial(4, &w(Padding::Valid, true), 0), Some((2, 0, 0)));
        assert_eq!(spatial(2, &w(Padding::Valid, false), 0), None);
        assert_eq!(spatial(0, &w(Padding::Same { upper: true }, false), 0), None, "empty axis");
    }

    #[test]
    fn views_resolve_their_shapes() {
        let reshape = |shape: &[i64]| ViewKind::Reshape { shape: shape.to_vec(), allowzero: false };
        assert_eq!(view_shape(&reshape(&[0, -1]), &[2, 3, 4]).unwrap(), vec![2, 12]);
        assert!(view_shape(&reshape(&[5, -1]), &[2, 3, 4]).is_err());
        assert_eq!(view_shape(&ViewKind::Flatten(0), &[2, 3]).unwrap(), vec![1, 6]);
        assert_eq!(view_shape(&ViewKind::Squeeze(Some(vec![-1])), &[2, 1]).unwrap(), vec![2]);
        assert_eq!(
            view_shape(&ViewKind::Unsqueeze(vec![0, 3]), &[2, 3]).unwrap(),
            vec![1, 2, 3, 1]
        );
    }
}
