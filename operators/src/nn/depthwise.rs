//! Depthwise 2-D convolution (`Conv` with one input channel per group, float32, NCHW,
//! constant weights), with its bias and fused activation. tract runs it through a
//! generic zone scanner; here each plane is padded once and split by stride phase, so
//! that each tap of a run of output pixels is one vector multiply-add per sixteen.

use tract_onnx::tract_hir::internal::*;

use super::activation::Activation;
use super::{V, fma};
use crate::expand::Kernel;

/// A depthwise convolution: per channel, a `kh × kw` kernel over its own plane, then
/// the fused activation.
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
    activation: Activation,
}

/// How a convolution pads its input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pads {
    /// Top, left, bottom, right.
    Explicit([usize; 4]),
    /// `SAME_UPPER` (extra padding at the end) or `SAME_LOWER`.
    Same {
        /// Whether the odd pixel of padding goes at the end.
        upper: bool,
    },
}

impl DepthwiseConv {
    fn geometry(&self) -> Geometry {
        Geometry {
            channels: self.channels,
            kernel: self.kernel,
            strides: self.strides,
            dilations: self.dilations,
            pads: self.pads,
        }
    }

    fn axis(&self, axis: usize, input: usize) -> (usize, usize) {
        self.geometry().axis(axis, input)
    }

    fn axis_dim(&self, axis: usize, input: &TDim) -> TDim {
        self.geometry().axis_dim(axis, input)
    }
}

/// Outputs computed at once: eight vectors of sixteen, so that the multiply-adds of one
/// tap do not wait on the previous tap's (four vectors, four cycles of latency per tap,
/// kept the FMA units half idle).
const CHUNK: usize = 128;

/// One image, channel by channel: each plane copied once into a zero-padded buffer
/// split by phase of the strides (for strides of 2, four planes: even rows' even
/// columns, even rows' odd columns, ...), so that for every tap the inputs of all the
/// outputs, read row after row, are one contiguous line at a fixed offset. The outputs
/// are then computed as one line too, of whole phase rows (the few columns past the
/// output's width computed and dropped), a hundred and twenty-eight at a time with the sums in
/// registers over all taps, so that a plane of 7×7 outputs is five vectors and not
/// seven vectors under half full. Compiled for AVX-512 and AVX2 as well, chosen at run
/// time.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn image(
    op: &DepthwiseConv,
    x: &[f32],
    (h, w): (usize, usize),
    out: &mut [f32],
    (oh, ow): (usize, usize),
) {
    let phases = op.geometry().phases((h, w), (oh, ow));
    let (row, taps) = (phases.row, &phases.taps);
    let [kh, kw] = op.kernel;
    // The outputs as one line of whole phase rows.
    let line = oh * row;
    // The border stays zero; each channel rewrites the interior. The slack at the end
    // lets the last vectors read past the last row (their surplus outputs are dropped).
    let mut phased = vec![0.0f32; phases.channel() + row + CHUNK];
    let mut sums = vec![0.0f32; line.next_multiple_of(CHUNK)];
    for (c, (src_plane, out)) in
        x.chunks_exact(h * w).zip(out.chunks_exact_mut(oh * ow)).enumerate()
    {
        phases.fill(src_plane, &mut phased);
        let run = Run {
            phased: &phased,
            taps,
            weights: &op.weights[c * kh * kw..][..kh * kw],
            bias: op.bias.get(c).copied().unwrap_or(0.0),
            activation: op.activation,
        };
        let whole = line - line % CHUNK;
        for (q0, chunk) in (0..whole).step_by(CHUNK).zip(sums.chunks_exact_mut(CHUNK)) {
            run.vectors::<{ CHUNK / 16 }>(q0, chunk);
        }
        let rest = &mut sums[whole..];
        match (line - whole).div_ceil(16) {
            0 => {}
            1 => run.vectors::<1>(whole, rest),
            2 => run.vectors::<2>(whole, rest),
            3 => run.vectors::<3>(whole, rest),
            4 => run.vectors::<4>(whole, rest),
            5 => run.vectors::<5>(whole, rest),
            6 => run.vectors::<6>(whole, rest),
            7 => run.vectors::<7>(whole, rest),
            _ => run.vectors::<{ CHUNK / 16 }>(whole, rest),
        }
        rows_out(&sums, row, out, ow);
    }
}

/// The first `ow` values of each `row`-long line of `sums` into the rows of `out`, in
/// order. A row is written as whole vectors where they fit before the end of `out`: their
/// surplus lands on the rows after it, which are written next (a 14-wide row is one
/// vector, not three moves).
#[inline(always)]
fn rows_out(sums: &[f32], row: usize, out: &mut [f32], ow: usize) {
    let wide = ow.next_multiple_of(16);
    for (y, start) in (0..out.len()).step_by(ow).enumerate() {
        let from = &sums[y * row..];
        if start + wide <= out.len() && from.len() >= wide {
            copy(&from[..wide], &mut out[start..start + wide]);
        } else {
            copy(&from[..ow], &mut out[start..start + ow]);
        }
    }
}

/// One channel's padded phase planes and what to compute from them.
struct Run<'a> {
    phased: &'a [f32],
    /// Per tap, where its line starts in `phased`.
    taps: &'a [usize],
    weights: &'a [f32],
    bias: f32,
    activation: Activation,
}

impl Run<'_> {
    /// `N` vectors of outputs from `q0` of the line, activated, into `to`.
    #[inline(always)]
    fn vectors<const N: usize>(&self, q0: usize, to: &mut [f32]) {
        let mut acc = [[self.bias; 16]; N];
        for (&tap, &wt) in self.taps.iter().zip(self.weights) {
            let xs = &self.phased[tap + q0..][..N * 16];
            for (a, x) in acc.iter_mut().zip(xs.chunks_exact(16)) {
                *a = fma(*a, wt, x.try_into().expect("sixteen floats"));
            }
        }
        let acc = acc.as_flattened_mut();
        self.activation.apply(acc);
        copy(acc, to);
    }
}

/// `to.copy_from_slice(from)` in vectors of sixteen, then of eight and four: rows here
/// are short (a 14-wide row is three moves, not fourteen), and the library's copy is a
/// call whose cost was a sixth of a small plane's time.
#[inline(always)]
pub(crate) fn copy(from: &[f32], to: &mut [f32]) {
    let mut to = to.chunks_exact_mut(16);
    let mut from = from.chunks_exact(16);
    for (t, f) in to.by_ref().zip(from.by_ref()) {
        let v: V = f.try_into().expect("sixteen floats");
        t.copy_from_slice(&v);
    }
    let (mut to, mut from) = (to.into_remainder(), from.remainder());
    if to.len() >= 8 && from.len() >= 8 {
        let v: [f32; 8] = from[..8].try_into().expect("eight floats");
        to[..8].copy_from_slice(&v);
        (to, from) = (&mut to[8..], &from[8..]);
    }
    if to.len() >= 4 && from.len() >= 4 {
        let v: [f32; 4] = from[..4].try_into().expect("four floats");
        to[..4].copy_from_slice(&v);
        (to, from) = (&mut to[4..], &from[4..]);
    }
    for (t, f) in to.iter_mut().zip(from) {
        *t = *f;
    }
}

/// The even values of `src` into `evens` and the odd ones into `odds`, sixteen pairs at
/// a time (two vectors in, two out), then pair by pair.
#[inline(always)]
fn deinterleave(src: &[f32], evens: &mut [f32], odds: &mut [f32]) {
    let mut pairs = src.chunks_exact(32);
    let mut e = evens.chunks_exact_mut(16);
    let mut o = odds.chunks_exact_mut(16);
    for ((e, o), s) in e.by_ref().zip(o.by_ref()).zip(pairs.by_ref()) {
        let s: &[f32; 32] = s.try_into().expect("sixteen pairs");
        let (mut ev, mut od) = ([0.0f32; 16], [0.0f32; 16]);
        for j in 0..16 {
            ev[j] = s[2 * j];
            od[j] = s[2 * j + 1];
        }
        e.copy_from_slice(&ev);
        o.copy_from_slice(&od);
    }
    let (e, o) = (e.into_remainder(), o.into_remainder());
    for ((e, o), pair) in e.iter_mut().zip(o.iter_mut()).zip(pairs.remainder().chunks_exact(2)) {
        *e = pair[0];
        *o = pair[1];
    }
}

impl Kernel for DepthwiseConv {
    fn name(&self) -> &'static str {
        "DepthwiseConv"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let plane = |h, w| (self.axis(0, h).0, self.axis(1, w).0);
        super::per_image(inputs, self.channels, self.channels, plane, |i, hw, o, out_hw| {
            image(self, i, hw, o, out_hw);
        })
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

impl DepthwiseConv {
    /// From `weights` `[channels, kh, kw]`, an optional bias, and the geometry.
    pub fn new(
        weights: Vec<f32>,
        bias: Vec<f32>,
        geometry: Geometry,
        activation: Activation,
    ) -> Self {
        let Geometry { channels, kernel, strides, dilations, pads } = geometry;
        Self { weights, bias, channels, kernel, strides, dilations, pads, activation }
    }
}

/// The shape of a depthwise convolution, read from a `Conv` node's attributes and the
/// dimensions of its weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    /// Channels (one group each).
    pub channels: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Vertical and horizontal strides.
    pub strides: [usize; 2],
    /// Vertical and horizontal dilations.
    pub dilations: [usize; 2],
    /// Padding.
    pub pads: Pads,
}

impl Geometry {
    /// The geometry when `node` with weights of `dims` is a depthwise convolution this
    /// module runs.
    pub(crate) fn of(node: &tract_onnx::pb::NodeProto, dims: &[usize]) -> Option<Self> {
        let group: usize = node.get_attr_opt("group").ok()??;
        let &[channels, one, kh, kw] = dims else { return None };
        if group != channels || one != 1 || group < 2 {
            return None;
        }
        Self::read(node, channels, [kh, kw])
    }

    /// The strides, dilations and padding of a 2-D `Conv` node, for `channels` and a
    /// kernel of `kernel`.
    pub(crate) fn read(
        node: &tract_onnx::pb::NodeProto,
        channels: usize,
        kernel: [usize; 2],
    ) -> Option<Self> {
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
        if kernel.contains(&0) {
            return None;
        }
        Some(Self {
            channels,
            kernel,
            strides: pair("strides")?,
            dilations: pair("dilations")?,
            pads,
        })
    }

    /// Output size and leading padding of one spatial axis.
    pub(crate) fn axis(&self, axis: usize, input: usize) -> (usize, usize) {
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

    /// Output size of one spatial axis, for a symbolic input size.
    pub(crate) fn axis_dim(&self, axis: usize, input: &TDim) -> TDim {
        let span = (self.dilations[axis] * (self.kernel[axis] - 1) + 1) as i64;
        let stride = self.strides[axis] as u64;
        match self.pads {
            Pads::Explicit(p) => {
                (input.clone() + (p[axis] + p[axis + 2]) as i64 - span) / stride + 1
            }
            Pads::Same { .. } => input.clone().divceil(stride as usize),
        }
    }

    /// The stride-phase layout of this geometry's padded planes for an input of
    /// `(h, w)` and an output of `(oh, ow)`.
    pub(crate) fn phases(&self, (h, w): (usize, usize), (oh, ow): (usize, usize)) -> Phases {
        let ((_, pt), (_, pl)) = (self.axis(0, h), self.axis(1, w));
        let [kh, kw] = self.kernel;
        let [sh, sw] = self.strides;
        let [dh, dw] = self.dilations;
        // Padded extent: enough for every tap of every output.
        let ph = ((oh - 1) * sh + (kh - 1) * dh + 1).max(pt + h);
        let pw = ((ow - 1) * sw + (kw - 1) * dw + 1).max(pl + w);
        // A phase plane: the padded rows r, r + sh, ... by the columns c, c + sw, ...
        let row = pw.div_ceil(sw);
        let plane = ph.div_ceil(sh) * row;
        // Where each tap's line starts: the phase plane, row and column of the tap's
        // input for the first output.
        let taps = (0..kh)
            .flat_map(|ky| (0..kw).map(move |kx| (ky * dh, kx * dw)))
            .map(|(dy, dx)| ((dy % sh) * sw + dx % sw) * plane + (dy / sh) * row + dx / sw)
            .collect();
        Phases { pads: [pt, pl], strides: self.strides, row, plane, taps, input: [h, w] }
    }
}

/// How a channel's padded input is laid out in stride-phase planes: for every tap, the
/// inputs of all the outputs, row after row, are one contiguous line at a fixed offset,
/// `oy · row + ox` past the tap's start (columns past the output width read the next
/// row's inputs, and are dropped).
pub(crate) struct Phases {
    pads: [usize; 2],
    strides: [usize; 2],
    input: [usize; 2],
    /// Floats per row of a phase plane.
    pub(crate) row: usize,
    /// Floats per phase plane.
    pub(crate) plane: usize,
    /// Per tap (row-major over the kernel), where its line starts.
    pub(crate) taps: Vec<usize>,
}

impl Phases {
    /// Floats of one channel's phase planes.
    pub(crate) fn channel(&self) -> usize {
        self.strides[0] * self.strides[1] * self.plane
    }

    /// Copies the interior of one channel's plane `src` into its phase planes `dst`
    /// (the border is left as it is: zero once, for every channel).
    #[inline(always)]
    pub(crate) fn fill(&self, src: &[f32], dst: &mut [f32]) {
        let ([pt, pl], [sh, sw], [_, w]) = (self.pads, self.strides, self.input);
        let (row, plane) = (self.row, self.plane);
        for (y, src) in src.chunks_exact(w).enumerate() {
            let (py, px) = (y + pt, pl);
            let start = (py % sh) * sw * plane + (py / sh) * row;
            if sw == 1 {
                copy(src, &mut dst[start + px..][..w]);
            } else if sw == 2 {
                // Even padded columns into the first column phase, odd ones into the
                // second, pair by pair.
                let even = start + (px % 2) * plane + px / 2;
                let odd = start + ((px + 1) % 2) * plane + px.div_ceil(2);
                if w % 2 == 1 {
                    dst[even + w / 2] = src[w - 1];
                }
                let (evens, odds) = if even < odd {
                    let (a, b) = dst.split_at_mut(odd);
                    (&mut a[even..even + w / 2], &mut b[..w / 2])
                } else {
                    let (a, b) = dst.split_at_mut(even);
                    (&mut b[..w / 2], &mut a[odd..odd + w / 2])
                };
                deinterleave(src, evens, odds);
            } else {
                // Column phase q holds the padded columns q, q + sw, q + 2·sw, ...
                for q in 0..sw {
                    let first = px + (q + sw - px % sw) % sw;
                    if first >= px + w {
                        continue;
                    }
                    let to = &mut dst[start + q * plane + first / sw..];
                    for (d, &v) in to.iter_mut().zip(src[first - px..].iter().step_by(sw)) {
                        *d = v;
                    }
                }
            }
        }
    }
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
        // Planes narrower than a vector, and wider than a run of outputs; odd and even
        // padding before the stride-split columns; an activation or none.
        for ((h, w), activation) in [
            ((7, 9), Activation::Identity),
            ((7, 7), Activation::Relu),
            ((14, 14), Activation::HardSigmoid { alpha: 0.2, beta: 0.5 }),
            ((1, 1), Activation::Identity),
            ((9, 70), Activation::Identity),
            ((10, 135), Activation::Clip { lo: -2.0, hi: 3.0 }),
        ] {
            let c = 3;
            let x: Vec<f32> = (0..c * h * w).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
            for (kernel, strides, dilations, pads) in [
                ([3, 3], [1, 1], [1, 1], Pads::Explicit([1, 1, 1, 1])),
                ([3, 3], [2, 2], [1, 1], Pads::Explicit([1, 1, 1, 1])),
                ([3, 3], [2, 2], [1, 1], Pads::Explicit([0, 0, 1, 1])),
                ([5, 5], [2, 1], [1, 1], Pads::Explicit([2, 2, 2, 2])),
                ([3, 3], [1, 2], [2, 2], Pads::Explicit([0, 1, 2, 0])),
                ([3, 3], [3, 3], [1, 1], Pads::Explicit([1, 2, 1, 2])),
                ([3, 3], [2, 2], [1, 1], Pads::Same { upper: true }),
                ([2, 2], [1, 1], [1, 1], Pads::Same { upper: false }),
            ] {
                let weights: Vec<f32> =
                    (0..c * kernel[0] * kernel[1]).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
                let geometry = Geometry { channels: c, kernel, strides, dilations, pads };
                let op = DepthwiseConv::new(weights, vec![0.5, -1.0, 2.0], geometry, activation);
                let (mut expected, oh, ow) = naive(&op, &x, (c, h, w));
                activation.apply(&mut expected);
                let input = Tensor::from_shape(&[1, c, h, w], &x).unwrap().into_tvalue();
                let got = op.eval(&[input]).unwrap().remove(0);
                assert_eq!(got.shape(), &[1, c, oh, ow]);
                assert_eq!(
                    got.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap(),
                    expected.as_slice(),
                    "{h}x{w} {kernel:?} {strides:?} {dilations:?} {pads:?}"
                );
            }
        }
    }
}
