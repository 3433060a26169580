//! Standard operators where tract's kernels are slow for the vision models of the
//! corpus, taken over for exactly those cases and left to tract otherwise:
//!
//! - 2-D convolutions, float32, NCHW, with constant weights: depthwise ([`depthwise`]),
//!   pointwise, 1×1 ([`pointwise`]), and any other of one group ([`direct`]), each with
//!   its bias and the activation that follows it fused into its output loop
//!   ([`activation`]);
//! - `Softmax` (opset 13) along an axis that is not the last ([`mod@softmax`]);
//! - `MatMul` by constant 2-D float32 weights, with the bias and activation after it
//!   ([`dense`]), and `ArgMax`/`ArgMin` ([`argmax`]), for small networks on tabular rows.
//!
//! Before tract parses a graph, [`fold`] rewrites it: the BatchNormalization, Mul and
//! Add by constants that follow a convolution go into its weights and bias, and the
//! activation after a convolution this module runs goes into the `Conv` node as an
//! attribute, so that none of them costs a pass over the tensor at run time.

// The kernels' helpers are inlined into each target's compilation of the multiversioned
// function that calls them (AVX-512, AVX2); a call would lose the target's features.
#![allow(clippy::inline_always)]

use std::sync::OnceLock;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::expand::{Built, Out, Shape, expand};

pub mod activation;
pub mod argmax;
mod columns;
pub mod dense;
pub mod depthwise;
pub mod direct;
pub mod fold;
pub mod pointwise;
pub mod softmax;

use activation::Activation;
use depthwise::{DepthwiseConv, Geometry};
use direct::DirectConv;
use pointwise::PointwiseConv;

/// One 512-bit vector of floats (two 256-bit ones): the unit the kernels of this
/// module are written in, so that the compiler keeps their sums in vector registers.
pub(crate) type V = [f32; 16];

/// A 2-D convolution's evaluation around its kernel: the input checked as NCHW float32
/// with `channels` channels, each image's output planes (`outputs` channels of the size
/// `plane` gives for the input's height and width) filled by `image(input, (h, w), output,
/// (oh, ow))`, and the output tensor made. Empty planes give an empty output.
fn per_image(
    inputs: &[TValue],
    channels: usize,
    outputs: usize,
    plane: impl Fn(usize, usize) -> (usize, usize),
    mut image: impl FnMut(&[f32], (usize, usize), &mut [f32], (usize, usize)),
) -> TractResult<TVec<Tensor>> {
    let input = inputs[0].cast_to::<f32>()?;
    let &[batch, got, height, width] = input.shape() else {
        bail!("expected an NCHW input, got {:?}", input.shape())
    };
    if got != channels {
        bail!("the input has {got} channels, the kernel {channels}");
    }
    let (oh, ow) = plane(height, width);
    let x = input.try_as_plain_ram()?.as_slice::<f32>()?;
    // The kernels write into the output tensor itself (an array turned into a tensor
    // afterwards is copied once more: a pass over every convolution's output).
    let shape = [batch, outputs, oh, ow];
    let runs = oh * ow > 0 && height * width > 0 && outputs > 0;
    let mut tensor = if runs { to_fill(&shape)? } else { Tensor::zero::<f32>(&shape)? };
    let mut view = tensor.try_as_plain_ram_mut()?;
    let out = view.as_slice_mut::<f32>()?;
    if runs {
        // Indexed rather than chunked: a kernel of no input channels has empty images.
        let size = channels * height * width;
        for (n, o) in out.chunks_mut(outputs * oh * ow).enumerate() {
            image(&x[n * size..][..size], (height, width), o, (oh, ow));
        }
    }
    Ok(tvec![tensor])
}

/// A float tensor of `shape` for a kernel that writes every element of it: left
/// uninitialized, since zeroing it first was a twelfth of a MobileNet's call. In this
/// crate's tests it starts as NaN instead, so that an output a kernel leaves unwritten
/// fails the test that compares the kernel with its definition.
#[expect(
    unsafe_code,
    reason = "tract makes a tensor without zeroing it only through `unsafe`, as its own kernels do"
)]
fn to_fill(shape: &[usize]) -> TractResult<Tensor> {
    if cfg!(test) {
        let mut tensor = Tensor::zero::<f32>(shape)?;
        tensor.try_as_plain_ram_mut()?.as_slice_mut::<f32>()?.fill(f32::NAN);
        return Ok(tensor);
    }
    // SAFETY: every bit pattern is a valid f32, and the caller's kernel writes every
    // element before the tensor is read (its tests check each output, from NaN).
    unsafe { Tensor::uninitialized::<f32>(shape) }
}

/// `w · x + a`, lane by lane (one fused multiply-add instruction where the CPU has it).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
pub(crate) fn fma(a: V, w: f32, x: &V) -> V {
    let mut o = a;
    for j in 0..16 {
        o[j] = w.mul_add(x[j], a[j]);
    }
    o
}

/// A registered ONNX operator builder.
pub type Builder =
    fn(&ParsingContext, &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// tract's own builders, for the cases these operators leave to it.
pub(crate) static TRACT_CONV: OnceLock<Builder> = OnceLock::new();
pub(crate) static TRACT_SOFTMAX: OnceLock<Builder> = OnceLock::new();
pub(crate) static TRACT_MATMUL: OnceLock<Builder> = OnceLock::new();

fn delegate(builder: &OnceLock<Builder>, ctx: &ParsingContext, node: &NodeProto) -> Built {
    match builder.get() {
        Some(build) => build(ctx, node),
        None => node.bail("tract has no builder for this operator"),
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

/// Which of this module's convolutions runs a `Conv` node with weights of `dims`, if any.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Taken {
    Depthwise(Geometry),
    /// 1×1, stride 1, no padding, one group: `[outputs, inputs]`.
    Pointwise(usize, usize),
    /// Any other 2-D convolution of one group: the output channels and the geometry.
    Direct(usize, Geometry),
}

impl Taken {
    /// Which of this module's convolutions runs `node`, with weights of `dims`.
    pub(crate) fn of(node: &NodeProto, dims: &[usize]) -> Option<Self> {
        Self::any(node, dims)
    }

    fn of_simple(node: &NodeProto, dims: &[usize]) -> Option<Self> {
        if let Some(g) = Geometry::of(node, dims) {
            return Some(Self::Depthwise(g));
        }
        let &[outputs, inputs, 1, 1] = dims else { return None };
        let group: usize = node.get_attr_opt("group").ok().flatten().unwrap_or(1);
        let ones = |name: &str| {
            node.get_attr_opt_vec::<usize>(name)
                .ok()
                .is_some_and(|v| v.is_none_or(|v| v.iter().all(|&s| s == 1)))
        };
        let unpadded = node
            .get_attr_opt_vec::<usize>("pads")
            .ok()
            .is_some_and(|v| v.is_none_or(|v| v.iter().all(|&p| p == 0)));
        // With a 1×1 kernel at stride 1, every auto_pad mode pads nothing.
        let auto_pad_known = matches!(
            node.get_attr_opt::<&str>("auto_pad").ok().flatten().unwrap_or("NOTSET"),
            "NOTSET" | "VALID" | "SAME_UPPER" | "SAME_LOWER"
        );
        if group == 1 && ones("strides") && unpadded && auto_pad_known {
            return Some(Self::Pointwise(outputs, inputs));
        }
        None
    }

    /// [`Taken::of`], and for any other 2-D convolution of one group, [`Taken::Direct`].
    fn any(node: &NodeProto, dims: &[usize]) -> Option<Self> {
        if let Some(taken) = Self::of_simple(node, dims) {
            return Some(taken);
        }
        let &[outputs, inputs, kh, kw] = dims else { return None };
        let group: usize = node.get_attr_opt("group").ok().flatten().unwrap_or(1);
        if group != 1 || outputs == 0 || inputs == 0 {
            return None;
        }
        Some(Self::Direct(outputs, Geometry::read(node, inputs, [kh, kw])?))
    }
}

/// Conv: depthwise and pointwise here, anything else tract's.
pub fn conv(ctx: &ParsingContext, node: &NodeProto) -> Built {
    let activation = match Activation::of_node(node) {
        Ok(a) => a,
        Err(e) => return node.bail(&e),
    };
    // The weights and bias stay wired as inputs; the operator holds its own copy.
    let out = || vec![Out::new(f32::datum_type(), Shape::FromKernel)];
    match ours(ctx, node, activation) {
        Some(Ours::Depthwise(op)) => expand(op, out()),
        Some(Ours::Pointwise(op)) => expand(op, out()),
        Some(Ours::Direct(op)) => expand(op, out()),
        None if activation == Activation::Identity => delegate(&TRACT_CONV, ctx, node),
        None => node.bail("a fused activation on a convolution this engine does not run itself"),
    }
}

enum Ours {
    Depthwise(DepthwiseConv),
    Pointwise(PointwiseConv),
    Direct(DirectConv),
}

fn ours(ctx: &ParsingContext, node: &NodeProto, activation: Activation) -> Option<Ours> {
    let weights = initializer(ctx, node.input.get(1)?)?;
    let taken = Taken::of(node, weights.shape())?;
    let bias = match node.input.get(2).filter(|b| !b.is_empty()) {
        Some(name) => {
            initializer(ctx, name)?.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec()
        }
        None => Vec::new(),
    };
    let weights = weights.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec();
    Some(match taken {
        Taken::Depthwise(g) => Ours::Depthwise(DepthwiseConv::new(weights, bias, g, activation)),
        Taken::Pointwise(o, i) => {
            Ours::Pointwise(PointwiseConv::new(&weights, (o, i), &bias, activation))
        }
        Taken::Direct(o, g) => Ours::Direct(DirectConv::new(&weights, o, &bias, g, activation)),
    })
}

/// MatMul: by constant float32 `[K, N]` weights here ([`dense`], with the bias and
/// activation [`fold`] gave it), anything else tract's.
pub fn matmul(ctx: &ParsingContext, node: &NodeProto) -> Built {
    let activation = match Activation::of_node(node) {
        Ok(a) => a,
        Err(e) => return node.bail(&e),
    };
    let fused = activation != Activation::Identity || node.input.len() > 2;
    let weights = node.input.get(1).and_then(|w| initializer(ctx, w));
    match weights {
        Some(w) if w.rank() == 2 => {
            let (k, n) = (w.shape()[0], w.shape()[1]);
            // The bias fold wrote: `n` values, shaped `[n]` or `[1, n]`.
            let (bias, rank) = match node.input.get(2).filter(|b| !b.is_empty()) {
                Some(name) => match initializer(ctx, name) {
                    Some(b) if b.len() == n && b.rank() <= 2 => {
                        (b.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(), b.rank())
                    }
                    _ => return node.bail("a fused bias that is not n float32 constants"),
                },
                None => (Vec::new(), 1),
            };
            let weights = w.try_as_plain_ram()?;
            let op = dense::Dense::new(weights.as_slice::<f32>()?, (k, n), &bias, activation)
                .at_least_rank(rank);
            expand(op, vec![Out::new(f32::datum_type(), Shape::FromKernel)])
        }
        _ if fused => {
            node.bail("a fused bias or activation on a MatMul without constant 2-D float32 weights")
        }
        _ => delegate(&TRACT_MATMUL, ctx, node),
    }
}

/// Softmax: opset 13's along-an-axis semantics here ([`mod@softmax`], which hands long
/// rows of the last axis to tract's kernel); tract's for the flattening semantics of
/// older opsets.
pub fn softmax(ctx: &ParsingContext, node: &NodeProto) -> Built {
    let axis: i64 = node.get_attr_opt("axis").ok().flatten().unwrap_or(-1);
    if ctx.onnx_operator_set_version >= 13 {
        let op = softmax::Softmax13 { axis };
        return Ok((tract_onnx::tract_hir::ops::expandable::expand(op), vec![]));
    }
    delegate(&TRACT_SOFTMAX, ctx, node)
}
