//! The builder behind [`Plan::build`](super::Plan::build): each graph node lowered to its
//! kernel dispatches, values tracked to their last use so that dead buffers are reused.

use std::collections::HashMap;
use std::sync::Arc;

use wgpu::util::DeviceExt as _;

use crate::Gpu;
use crate::graph::{Node, Op, Padding, PoolKind, Window};
use crate::kernels::{ActKey, GemmInput, Kernel, Tile, arith_key, gemm_params as gp};

use super::shapes::{
    axis, batch_strides, broadcast, broadcast_strides, contiguous_strides, elements, six, spatial,
    spatial_view, view_shape,
};
use super::{Step, Value};

/// Builds plans: tracks values, hands out buffers and records dispatches.
pub(super) struct Builder<'a> {
    pub(super) gpu: &'a Gpu,
    pub(super) buffers: Vec<Arc<wgpu::Buffer>>,
    pub(super) live: Vec<usize>,
    pub(super) pinned: Vec<bool>,
    pub(super) free: Vec<usize>,
    pub(super) values: HashMap<String, Value>,
    pub(super) steps: Vec<Step>,
    pub(super) empty: Arc<wgpu::Buffer>,
}

impl Builder<'_> {
    pub(super) fn add_buffer(&mut self, buffer: Arc<wgpu::Buffer>, pinned: bool) -> usize {
        self.buffers.push(buffer);
        self.live.push(0);
        self.pinned.push(pinned);
        self.buffers.len() - 1
    }

    /// A buffer of at least `bytes` for a node's output: a dead one if one is large enough.
    pub(super) fn output(&mut self, bytes: u64) -> usize {
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

    pub(super) fn define(&mut self, name: &str, buffer: usize, shape: Vec<usize>) {
        self.live[buffer] += 1;
        self.values.insert(name.to_owned(), Value { buffer, shape });
    }

    pub(super) fn release(&mut self, name: &str) {
        if let Some(v) = self.values.get(name) {
            let b = v.buffer;
            self.live[b] -= 1;
            if self.live[b] == 0 && !self.pinned[b] {
                self.free.push(b);
            }
        }
    }

    pub(super) fn value(&self, node: &Node, index: usize) -> Result<&Value, String> {
        node.inputs
            .get(index)
            .and_then(Option::as_deref)
            .and_then(|name| self.values.get(name))
            .ok_or_else(|| format!("input {index} is missing"))
    }

    pub(super) fn dispatch(
        &mut self,
        kernel: &Kernel,
        params: &[u32],
        buffers: &[usize],
        groups: [u32; 3],
    ) {
        let refs: Vec<Arc<wgpu::Buffer>> =
            buffers.iter().map(|&b| self.buffers[b].clone()).collect();
        self.dispatch_buffers(kernel, params, &refs, groups);
    }

    pub(super) fn dispatch_buffers(
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
    pub(super) fn linear_groups(n: usize) -> [u32; 3] {
        let groups = n.div_ceil(256) as u32;
        if groups <= 65_535 { [groups, 1, 1] } else { [65_535, groups.div_ceil(65_535), 1] }
    }

    pub(super) fn plan_node(&mut self, node: &Node) -> Result<(), String> {
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

    pub(super) fn softmax(
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

    pub(super) fn argmax(
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

    pub(super) fn transpose(
        &mut self,
        node: &Node,
        x: &Value,
        perm: Option<&[usize]>,
    ) -> Result<(), String> {
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

    pub(super) fn concat(&mut self, node: &Node, x: &Value, a: i64) -> Result<(), String> {
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

    pub(super) fn global_average_pool(&mut self, node: &Node, x: &Value) -> Result<(), String> {
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

    pub(super) fn batch_norm(
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

    pub(super) fn copy(
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

    pub(super) fn pool(
        &mut self,
        node: &Node,
        x: &Value,
        window: &Window,
        kind: u32,
    ) -> Result<(), String> {
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

    pub(super) fn gemm_dispatch(
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
    pub(super) fn product(
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

    pub(super) fn matmul(&mut self, node: &Node, a: &Value, act: ActKey) -> Result<(), String> {
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

    pub(super) fn gemm(
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

    pub(super) fn conv(
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
