//! Two standard operators where tract's kernels are slow for the vision models of the
//! corpus, taken over for exactly those cases and left to tract otherwise:
//!
//! - depthwise 2-D convolution (`Conv` with one input channel per group, float32, NCHW,
//!   constant weights): tract runs it through a generic zone scanner; here each output
//!   row is a sum of shifted input rows, which vectorises;
//! - `Softmax` (opset 13) along an axis that is not the last: tract walks the axis
//!   element by element; here the axis is reduced over contiguous inner vectors.

use std::sync::OnceLock;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::expand::{Built, Kernel, Out, Shape, expand};

/// A registered ONNX operator builder.
pub type Builder =
    fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract's own builders, for the cases these operators leave to it.
pub(crate) static TRACT_CONV: OnceLock<Builder> = OnceLock::new();
pub(crate) static TRACT_SOFTMAX: OnceLock<Builder> = OnceLock::new();

fn delegate(builder: &OnceLock<Builder>, ctx: &ParsingContext, node: &NodeProto) -> Built {
    match builder.get() {
        Some(build) => build(ctx, node),
        None => node.bail("tract has no builder for this operator"),
    }
}

/// A depthwise convolution: per channel, a `kh × kw` kernel over its own plane.
#[derive(Clone, Debug, PartialEq)]
pub struct DepthwiseConv {
    /// `[channels, kh, kw]`.
    weights: Vec<f32>,
    bias: Vec<f32>,
    channels: usize,
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    pads: Pads,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pads {
    /// top, left, bottom, right.
    Explicit([usize; 4]),
    /// `SAME_UPPER` (extra padding at the end) or `SAME_LOWER`.
    Same { upper: bool },
}

impl DepthwiseConv {
    /// Output size and leading padding of one spatial axis.
    fn axis(&self, axis: usize, input: usize) -> (usize, usize) {
        let span = self.dilations[axis] * (self.kernel[axis] - 1) + 1;
        let stride = self.strides[axis];
        match self.pads {
            Pads::Explicit(p) => {
                let total = input + p[axis] + p[axis + 2];
                (if total >= span { (total - span) / stride + 1 } else { 0 }, p[axis])
            }
            Pads::Same { upper } => {
                let out = input.div_ceil(stride);
                let total = ((out - 1) * stride + span).saturating_sub(input);
                (out, if upper { total / 2 } else { total.div_ceil(2) })
            }
        }
    }

    fn axis_dim(&self, axis: usize, input: &TDim) -> TDim {
        let span = (self.dilations[axis] * (self.kernel[axis] - 1) + 1) as i64;
        let stride = self.strides[axis] as u64;
        match self.pads {
            Pads::Explicit(p) => {
                (input.clone() + (p[axis] + p[axis + 2]) as i64 - span) / stride + 1
            }
            Pads::Same { .. } => input.clone().divceil(stride as usize),
        }
    }

    /// One image: channels in blocks of [`LANES`], each block laid out pixel-major with
    /// the block's channels side by side and zero padding around, so that every tap of
    /// every output pixel is one fused multiply-add across the block, with no bounds
    /// test (the layout ONNX Runtime's NCHWc kernels use).
    fn image(&self, x: &[f32], (h, w): (usize, usize), out: &mut [f32], (oh, ow): (usize, usize)) {
        let c = self.channels;
        let ((_, pt), (_, pl)) = (self.axis(0, h), self.axis(1, w));
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.strides;
        let [dh, dw] = self.dilations;
        // Padded extent: enough for every tap of every output.
        let ph = (oh - 1) * sh + (kh - 1) * dh + 1;
        let pw = (ow - 1) * sw + (kw - 1) * dw + 1;
        // The border stays zero; each block rewrites the interior (lanes past the last
        // channel keep the previous block's values, and their outputs are dropped).
        let mut packed = vec![[0.0f32; LANES]; ph.max(pt + h) * pw.max(pl + w)];
        let stride = pw.max(pl + w);
        for block in 0..c.div_ceil(LANES) {
            let lanes = LANES.min(c - block * LANES);
            let planes: Vec<&[f32]> =
                (0..lanes).map(|lane| &x[(block * LANES + lane) * h * w..][..h * w]).collect();
            for y in 0..h {
                let row = &mut packed[(y + pt) * stride + pl..][..w];
                for (xx, px) in row.iter_mut().enumerate() {
                    for (lane, plane) in planes.iter().enumerate() {
                        px[lane] = plane[y * w + xx];
                    }
                }
            }
            let mut weights = vec![[0.0f32; LANES]; kh * kw];
            let mut bias = [0.0f32; LANES];
            for lane in 0..lanes {
                let ch = block * LANES + lane;
                for (t, wt) in weights.iter_mut().enumerate() {
                    wt[lane] = self.weights[ch * kh * kw + t];
                }
                bias[lane] = self.bias.get(ch).copied().unwrap_or(0.0);
            }
            let mut acc_row = vec![[0.0f32; LANES]; ow];
            let taps = Taps {
                kernel: self.kernel,
                strides: self.strides,
                dilations: self.dilations,
                stride,
            };
            for oy in 0..oh {
                output_row(&packed, &weights, bias, &taps, oy, &mut acc_row);
                for lane in 0..lanes {
                    let ch = block * LANES + lane;
                    let row = &mut out[ch * oh * ow + oy * ow..][..ow];
                    for (o, a) in row.iter_mut().zip(&acc_row) {
                        *o = a[lane];
                    }
                }
            }
        }
    }
}

/// Channels per block: sixteen float32 fill a 512-bit vector (two 256-bit ones).
const LANES: usize = 16;

/// The geometry of a block's taps over its padded, pixel-major layout.
struct Taps {
    kernel: [usize; 2],
    strides: [usize; 2],
    dilations: [usize; 2],
    /// Pixels per padded row.
    stride: usize,
}

/// One output row of a channel block: per pixel, the bias plus every tap's weight times
/// the input under it, eight channels at once. Compiled for AVX-512 and AVX2 as well,
/// chosen at run time.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn output_row(
    packed: &[[f32; LANES]],
    weights: &[[f32; LANES]],
    bias: [f32; LANES],
    taps: &Taps,
    oy: usize,
    out: &mut [[f32; LANES]],
) {
    let [kh, kw] = taps.kernel;
    let [sh, sw] = taps.strides;
    let [dh, dw] = taps.dilations;
    for (ox, acc) in out.iter_mut().enumerate() {
        let mut a = bias;
        for ky in 0..kh {
            let base = (oy * sh + ky * dh) * taps.stride + ox * sw;
            for kx in 0..kw {
                let v = &packed[base + kx * dw];
                let wt = &weights[ky * kw + kx];
                for j in 0..LANES {
                    a[j] += wt[j] * v[j];
                }
            }
        }
        *acc = a;
    }
}

impl Kernel for DepthwiseConv {
    fn name(&self) -> &'static str {
        "DepthwiseConv"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let input = inputs[0].cast_to::<f32>()?;
        let &[batch, channels, height, width] = input.shape() else {
            bail!("expected an NCHW input, got {:?}", input.shape())
        };
        if channels != self.channels {
            bail!("the input has {channels} channels, the kernel {}", self.channels);
        }
        let (oh, ow) = (self.axis(0, height).0, self.axis(1, width).0);
        let pixels = input.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut out = vec![0.0f32; batch * channels * oh * ow];
        if oh > 0 && ow > 0 {
            let images =
                out.chunks_mut(channels * oh * ow).zip(pixels.chunks(channels * height * width));
            for (image_out, image_in) in images {
                self.image(image_in, (height, width), image_out, (oh, ow));
            }
        }
        let shape = vec![batch, channels, oh, ow];
        Ok(tvec![tract_ndarray::ArrayD::from_shape_vec(shape, out)?.into_tensor()])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let s = &inputs[0].shape;
        if s.len() != 4 {
            bail!("expected an NCHW input, got {s:?}");
        }
        let shape =
            tvec![s[0].clone(), s[1].clone(), self.axis_dim(0, &s[2]), self.axis_dim(1, &s[3])];
        Ok(tvec![f32::fact(shape)])
    }
}

/// The float32 value of a graph initializer or `Constant` node output (this graph's or
/// an enclosing one's).
fn initializer(ctx: &ParsingContext, name: &str) -> Option<Tensor> {
    let graphs = || ctx.model.graph.iter().chain(ctx.parent_graphs.iter().copied());
    let proto =
        graphs().flat_map(|g| g.initializer.iter()).find(|t| t.name == name).or_else(|| {
            graphs()
                .flat_map(|g| g.node.iter())
                .find(|n| n.op_type == "Constant" && n.output.first().is_some_and(|o| o == name))
                .and_then(|n| n.attribute.iter().find(|a| a.name == "value"))
                .and_then(|a| a.t.as_ref())
        })?;
    let t = tract_onnx::tensor::load_tensor(&*ctx.framework.provider, proto, None).ok()?;
    (t.datum_type() == f32::datum_type()).then_some(t)
}

/// Conv: the depthwise case here, anything else tract's.
pub fn conv(ctx: &ParsingContext, node: &NodeProto) -> Built {
    match depthwise(ctx, node) {
        // The weights and bias stay wired as inputs; the operator holds its own copy.
        Some(op) => expand(op, vec![Out::new(f32::datum_type(), Shape::FromKernel)]),
        None => delegate(&TRACT_CONV, ctx, node),
    }
}

fn depthwise(ctx: &ParsingContext, node: &NodeProto) -> Option<DepthwiseConv> {
    let group: usize = node.get_attr_opt("group").ok()??;
    let weights = initializer(ctx, node.input.get(1)?)?;
    let &[channels, one, kh, kw] = weights.shape() else { return None };
    if group != channels || one != 1 || group < 2 {
        return None;
    }
    let bias = match node.input.get(2).filter(|b| !b.is_empty()) {
        Some(name) => {
            initializer(ctx, name)?.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec()
        }
        None => Vec::new(),
    };
    let pair = |name: &str| -> Option<[usize; 2]> {
        match node.get_attr_opt_vec::<usize>(name).ok()? {
            None => Some([1, 1]),
            Some(v) if v.len() == 2 && v.iter().all(|&x| x > 0) => Some([v[0], v[1]]),
            Some(_) => None,
        }
    };
    let pads = match node.get_attr_opt::<&str>("auto_pad").ok()?.unwrap_or("NOTSET") {
        "NOTSET" => match node.get_attr_opt_vec::<usize>("pads").ok()? {
            None => Pads::Explicit([0; 4]),
            Some(p) if p.len() == 4 => Pads::Explicit([p[0], p[1], p[2], p[3]]),
            Some(_) => return None,
        },
        "VALID" => Pads::Explicit([0; 4]),
        "SAME_UPPER" => Pads::Same { upper: true },
        "SAME_LOWER" => Pads::Same { upper: false },
        _ => return None,
    };
    let weights = weights.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec();
    Some(DepthwiseConv {
        weights,
        bias,
        channels,
        kernel: [kh, kw],
        strides: pair("strides")?,
        dilations: pair("dilations")?,
        pads,
    })
}

/// Softmax along a middle axis: `outer × axis × inner`, inner contiguous.
#[derive(Clone, Debug, PartialEq)]
pub struct AxisSoftmax {
    axis: i64,
}

impl Kernel for AxisSoftmax {
    fn name(&self) -> &'static str {
        "Softmax"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let x = &inputs[0];
        let rank = x.rank() as i64;
        let axis = if self.axis < 0 { self.axis + rank } else { self.axis };
        if !(0..rank).contains(&axis) {
            bail!("axis {} of a rank {rank} input", self.axis);
        }
        let axis = axis as usize;
        let shape = x.shape();
        let (len, inner) = (shape[axis], shape[axis + 1..].iter().product::<usize>());
        let mut y = x.cast_to::<f32>()?.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        let mut max = vec![0.0f32; inner];
        let mut sum = vec![0.0f32; inner];
        for block in y.chunks_mut((len * inner).max(1)) {
            max.fill(f32::NEG_INFINITY);
            for row in block.chunks(inner) {
                for (m, &v) in max.iter_mut().zip(row) {
                    *m = m.max(v);
                }
            }
            sum.fill(0.0);
            for row in block.chunks_mut(inner) {
                for ((v, m), s) in row.iter_mut().zip(&max).zip(sum.iter_mut()) {
                    *v = (*v - m).exp();
                    *s += *v;
                }
            }
            for row in block.chunks_mut(inner) {
                for (v, s) in row.iter_mut().zip(&sum) {
                    *v /= s;
                }
            }
        }
        Ok(tvec![Tensor::from_shape(shape, &y)?])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![f32::fact(inputs[0].shape.clone())])
    }
}

/// Softmax: opset 13's along-an-axis semantics for axes before the last; tract's
/// otherwise (the last axis, and the flattening semantics of older opsets).
pub fn softmax(ctx: &ParsingContext, node: &NodeProto) -> Built {
    let axis: i64 = node.get_attr_opt("axis").ok().flatten().unwrap_or(-1);
    if ctx.onnx_operator_set_version >= 13 && axis != -1 {
        return expand(AxisSoftmax { axis }, vec![Out::new(f32::datum_type(), Shape::Like)]);
    }
    delegate(&TRACT_SOFTMAX, ctx, node)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition: each output a sum over the kernel of the padded input.
    fn naive(
        op: &DepthwiseConv,
        x: &[f32],
        (c, h, w): (usize, usize, usize),
    ) -> (Vec<f32>, usize, usize) {
        let ((oh, pt), (ow, pl)) = (op.axis(0, h), op.axis(1, w));
        let [kh, kw] = op.kernel;
        let mut out = vec![0.0; c * oh * ow];
        for ch in 0..c {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = op.bias.get(ch).copied().unwrap_or(0.0);
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * op.strides[0] + ky * op.dilations[0]) as i64 - pt as i64;
                            let ix = (ox * op.strides[1] + kx * op.dilations[1]) as i64 - pl as i64;
                            if (0..h as i64).contains(&iy) && (0..w as i64).contains(&ix) {
                                acc += op.weights[ch * kh * kw + ky * kw + kx]
                                    * x[ch * h * w + iy as usize * w + ix as usize];
                            }
                        }
                    }
                    out[ch * oh * ow + oy * ow + ox] = acc;
                }
            }
        }
        (out, oh, ow)
    }

    #[test]
    fn depthwise_convolution_matches_its_definition() {
        let (c, h, w) = (3, 7, 9);
        let x: Vec<f32> = (0..c * h * w).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
        for (kernel, strides, dilations, pads) in [
            ([3, 3], [1, 1], [1, 1], Pads::Explicit([1, 1, 1, 1])),
            ([3, 3], [2, 2], [1, 1], Pads::Explicit([1, 1, 1, 1])),
            ([5, 5], [2, 1], [1, 1], Pads::Explicit([2, 2, 2, 2])),
            ([3, 3], [1, 2], [2, 2], Pads::Explicit([0, 1, 2, 0])),
            ([3, 3], [2, 2], [1, 1], Pads::Same { upper: true }),
            ([2, 2], [1, 1], [1, 1], Pads::Same { upper: false }),
        ] {
            let weights: Vec<f32> =
                (0..c * kernel[0] * kernel[1]).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
            let op = DepthwiseConv {
                weights,
                bias: vec![0.5, -1.0, 2.0],
                channels: c,
                kernel,
                strides,
                dilations,
                pads,
            };
            let (expected, oh, ow) = naive(&op, &x, (c, h, w));
            let input = Tensor::from_shape(&[1, c, h, w], &x).unwrap().into_tvalue();
            let got = op.eval(&[input]).unwrap().remove(0);
            assert_eq!(got.shape(), &[1, c, oh, ow]);
            assert_eq!(
                got.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap(),
                expected.as_slice(),
                "{kernel:?} {strides:?} {dilations:?} {pads:?}"
            );
        }
    }

    #[test]
    fn softmax_along_a_middle_axis() {
        let x = Tensor::from_shape(
            &[2, 3, 2],
            &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0],
        )
        .unwrap();
        let y = AxisSoftmax { axis: 1 }.eval(&[x.into_tvalue()]).unwrap().remove(0);
        let y = y.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        let e = |v: f32| v.exp();
        let first = e(1.0) / (e(1.0) + e(3.0) + e(5.0));
        assert!((y[0] - first).abs() < 1e-6, "{y:?}");
        for (i, j) in [(0, 2), (1, 3)] {
            let column: f32 = [y[i], y[j], y[j + 2]].iter().sum();
            assert!((column - 1.0).abs() < 1e-6);
        }
    }
}
