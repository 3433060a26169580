//! Regular 2-D convolution (one group, a kernel larger than 1×1 or strided or padded,
//! float32, NCHW, constant weights), with its bias and fused activation, as a matrix
//! product whose columns are gathered as whole lines: each input channel is padded once
//! into stride-phase planes (`depthwise::Phases`), where every tap's inputs for a run of
//! outputs are contiguous, so a tile of 32 outputs takes one 32-float copy per input
//! channel and tap (im2col without a pass of its own), and the product is
//! [`pointwise`]'s 6×32 register tile over the weights packed at load.
//!
//! tract runs these through its lazy im2col, whose per-element gather inside the
//! product cost about as much as the product on the YOLO and PaddleOCR detectors.
//!
//! [`pointwise`]: super::pointwise

use tract_onnx::tract_hir::internal::*;

use super::activation::Activation;
use super::depthwise::{Geometry, Phases, copy};
use super::pointwise::{PIXELS, ROWS, VECS, tile_accumulate, tile_product, tile_row};
use crate::expand::Kernel;

/// A regular convolution with its bias and activation.
#[derive(Clone, Debug, PartialEq)]
pub struct DirectConv {
    inputs: usize,
    outputs: usize,
    geometry: Geometry,
    /// Per block of `ROWS` output channels, per input channel and tap, the block's
    /// weights.
    packed: Vec<[f32; ROWS]>,
    /// Per block, the bias of its channels (zero past the last).
    bias: Vec<[f32; ROWS]>,
    activation: Activation,
}

impl DirectConv {
    /// From `weights` `[outputs, inputs, kh, kw]` (row-major), an optional bias, and the
    /// geometry (its `channels` the input channels).
    pub fn new(
        weights: &[f32],
        outputs: usize,
        bias: &[f32],
        geometry: Geometry,
        activation: Activation,
    ) -> Self {
        let inputs = geometry.channels;
        let k = inputs * geometry.kernel[0] * geometry.kernel[1];
        let blocks = outputs.div_ceil(ROWS);
        let mut packed = vec![[0.0f32; ROWS]; blocks * k];
        let mut packed_bias = vec![[0.0f32; ROWS]; blocks];
        for co in 0..outputs {
            let (block, r) = (co / ROWS, co % ROWS);
            for j in 0..k {
                packed[block * k + j][r] = weights[co * k + j];
            }
            packed_bias[block][r] = bias.get(co).copied().unwrap_or(0.0);
        }
        Self { inputs, outputs, geometry, packed, bias: packed_bias, activation }
    }
}

/// One image: `x` `[inputs, h, w]` into `out` `[outputs, oh, ow]`. Compiled for AVX-512
/// and AVX2 as well, chosen at run time.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn image(
    op: &DirectConv,
    x: &[f32],
    (h, w): (usize, usize),
    out: &mut [f32],
    (oh, ow): (usize, usize),
) {
    let phases: Phases = op.geometry.phases((h, w), (oh, ow));
    let (row, channel) = (phases.row, phases.channel());
    let taps = &phases.taps;
    // Every channel's phase planes, then slack for the last tiles' reads past the last
    // row (their surplus outputs are dropped).
    let mut phased = vec![0.0f32; op.inputs * channel + row + PIXELS];
    for (src, dst) in x.chunks_exact(h * w).zip(phased.chunks_exact_mut(channel)) {
        phases.fill(src, dst);
    }
    // The outputs of each channel as one line of whole phase rows, `PIXELS` at a time;
    // each tile's finished rows go straight into the output's rows (the columns past
    // the output's width dropped), through `runs`: per output row the tile touches,
    // where its part starts in the tile and in the output plane, and its length.
    let line = oh * row;
    let k = op.inputs * taps.len();
    // The taps (input channel and kernel offset) in blocks of up to `TAPS`, so that the
    // tile's gathered lines stay in L1 while they go through every block of output
    // channels; a block's sums wait in `partial` for the next block of taps. The blocks
    // are of equal size: 333 taps are two blocks of 167, not 192 and 141.
    let depth = k.div_ceil(k.div_ceil(TAPS));
    let mut tile = vec![[[0.0f32; 16]; VECS]; depth];
    let mut partial = vec![[[[0.0f32; 16]; VECS]; ROWS]; op.bias.len()];
    let mut runs = Vec::with_capacity(PIXELS / row + 2);
    for q0 in (0..line).step_by(PIXELS) {
        runs.clear();
        let end = line.min(q0 + PIXELS);
        let mut q = q0;
        while q < end {
            let (oy, ox) = (q / row, q % row);
            if ox < ow {
                runs.push((q - q0, oy * ow + ox, (ow - ox).min(end - q)));
            }
            q = (oy + 1) * row;
        }
        for k0 in (0..k).step_by(depth) {
            let k1 = k.min(k0 + depth);
            let tile = &mut tile[..k1 - k0];
            for (j, t) in (k0..k1).zip(tile.iter_mut()) {
                let (c, tap) = (j / taps.len(), taps[j % taps.len()]);
                t.as_flattened_mut().copy_from_slice(&phased[c * channel + tap + q0..][..PIXELS]);
            }
            let blocks = op.packed.chunks_exact(k).zip(&op.bias).zip(partial.iter_mut());
            for (block, ((weights, bias), sums)) in blocks.enumerate() {
                let weights = &weights[k0..k1];
                let acc = if k0 == 0 {
                    tile_product(weights, tile, bias)
                } else {
                    tile_accumulate(weights, tile, *sums)
                };
                if k1 < k {
                    *sums = acc;
                    continue;
                }
                for r in 0..ROWS.min(op.outputs - block * ROWS) {
                    let mut values = tile_row(&acc, r);
                    op.activation.apply(&mut values);
                    let plane = &mut out[(block * ROWS + r) * oh * ow..][..oh * ow];
                    for &(from, to, len) in &runs {
                        copy(&values[from..][..len], &mut plane[to..][..len]);
                    }
                }
            }
        }
    }
}

/// Taps (input channel and kernel offset) per block of the product: a tile's gathered
/// lines, `TAPS × PIXELS` floats (24 KiB, half of a 48 KiB L1), stay in L1. Blocks of
/// 128 taps (16 KiB) measured 5–8 % slower on YOLOv8n's 64→64 3×3 convolutions on
/// 40×40 (576 taps: five blocks, each a pass of the partial sums, against three).
const TAPS: usize = 192;

impl Kernel for DirectConv {
    fn name(&self) -> &'static str {
        "DirectConv"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let plane = |h, w| (self.geometry.axis(0, h).0, self.geometry.axis(1, w).0);
        super::per_image(inputs, self.inputs, self.outputs, plane, |i, hw, o, out_hw| {
            image(self, i, hw, o, out_hw);
        })
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let s = &inputs[0].shape;
        if s.len() != 4 {
            bail!("expected an NCHW input, got {s:?}");
        }
        let shape = tvec![
            s[0].clone(),
            self.outputs.to_dim(),
            self.geometry.axis_dim(0, &s[2]),
            self.geometry.axis_dim(1, &s[3])
        ];
        Ok(tvec![f32::fact(shape)])
    }
}

#[cfg(test)]
mod tests {
    use super::super::depthwise::Pads;
    use super::*;

    #[test]
    fn direct_convolution_matches_its_definition() {
        // Planes narrower than a tile and wider; output channels around a block; strides,
        // dilations, explicit and automatic padding; an activation or none.
        for ((ci, co, h, w), activation) in [
            ((3, 16, 9, 11), Activation::Identity),
            ((5, 7, 20, 35), Activation::Relu),
            ((2, 13, 7, 7), Activation::Clip { lo: -2.0, hi: 3.0 }),
            // More taps than a block of them (`TAPS`), and not a multiple of it.
            ((37, 8, 6, 9), Activation::Relu),
        ] {
            let x: Vec<f32> = (0..2 * ci * h * w).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
            for (kernel, strides, dilations, pads) in [
                ([3, 3], [1, 1], [1, 1], Pads::Explicit([1, 1, 1, 1])),
                ([3, 3], [2, 2], [1, 1], Pads::Explicit([1, 1, 1, 1])),
                ([3, 3], [2, 2], [1, 1], Pads::Explicit([0, 0, 1, 1])),
                ([5, 5], [2, 1], [1, 1], Pads::Explicit([2, 2, 2, 2])),
                ([3, 3], [1, 2], [2, 2], Pads::Explicit([0, 1, 2, 0])),
                ([2, 2], [2, 2], [1, 1], Pads::Explicit([0, 0, 0, 0])),
                ([3, 1], [1, 1], [1, 1], Pads::Same { upper: true }),
                ([1, 1], [2, 2], [1, 1], Pads::Explicit([0, 0, 0, 0])),
            ] {
                let (kh, kw) = (kernel[0], kernel[1]);
                let weights: Vec<f32> =
                    (0..co * ci * kh * kw).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
                let bias: Vec<f32> = (0..co).map(|i| i as f32 * 0.5 - 2.0).collect();
                let geometry = Geometry { channels: ci, kernel, strides, dilations, pads };
                let op = DirectConv::new(&weights, co, &bias, geometry, activation);
                let (oh, pt) = geometry.axis(0, h);
                let (ow, pl) = geometry.axis(1, w);
                let mut expected = vec![0.0f32; 2 * co * oh * ow];
                for n in 0..2 {
                    for o in 0..co {
                        for oy in 0..oh {
                            for ox in 0..ow {
                                let mut acc = bias[o];
                                for c in 0..ci {
                                    for ky in 0..kh {
                                        for kx in 0..kw {
                                            let iy = (oy * strides[0] + ky * dilations[0]) as i64
                                                - pt as i64;
                                            let ix = (ox * strides[1] + kx * dilations[1]) as i64
                                                - pl as i64;
                                            if (0..h as i64).contains(&iy)
                                                && (0..w as i64).contains(&ix)
                                            {
                                                acc += weights[((o * ci + c) * kh + ky) * kw + kx]
                                                    * x[((n * ci + c) * h + iy as usize) * w
                                                        + ix as usize];
                                            }
                                        }
                                    }
                                }
                                expected[((n * co + o) * oh + oy) * ow + ox] = acc;
                            }
                        }
                    }
                }
                activation.apply(&mut expected);
                let input = Tensor::from_shape(&[2, ci, h, w], &x).unwrap().into_tvalue();
                let got = op.eval(&[input]).unwrap().remove(0);
                assert_eq!(got.shape(), &[2, co, oh, ow]);
                let got = got.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                        "{ci}->{co} {h}x{w} {kernel:?} {strides:?} {dilations:?} {pads:?} at {i}: {g} against {e}"
                    );
                }
            }
        }
    }
}
