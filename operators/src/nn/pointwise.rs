//! Pointwise (1×1, stride 1, unpadded, one group) convolution over NCHW images: per
//! image a matrix product `W[co, ci] · X[ci, pixels]`, with the bias and the fused
//! activation applied to each tile of outputs while it is still in registers.
//!
//! tract runs these as matrix products too, but packs its operands per call and leaves
//! any activation but ReLU to separate passes over the tensor. Here the weights are
//! packed once at load, `ROWS` output channels side by side, and each tile of
//! `ROWS × PIXELS` outputs is a run of multiply-adds over the input channels, written
//! so that the compiler keeps the tile in vector registers. Layers of many input
//! channels (the small planes of a network's last stages) are packed instead for
//! the tiles of `nn::columns`, with the output channels along the vectors; either way
//! the weights are kept once, packed.

use tract_onnx::tract_hir::internal::*;

use super::activation::Activation;
use super::columns::{self, Columns};
use super::depthwise::copy;
use super::{V, fma};
use crate::expand::Kernel;

/// Output channels per tile.
pub(super) const ROWS: usize = 6;
/// Pixels per tile: two 512-bit vectors (four 256-bit ones).
pub(super) const PIXELS: usize = 32;

/// A 1×1 convolution with its bias and activation.
#[derive(Clone, Debug, PartialEq)]
pub struct PointwiseConv {
    inputs: usize,
    outputs: usize,
    /// The weights, packed once for one of the two kernels (and not kept as given).
    weights: Packed,
    activation: Activation,
}

/// The weights of a 1×1 convolution, packed for the kernel that runs it.
#[derive(Clone, Debug, PartialEq)]
enum Packed {
    /// For this module's tiles of `ROWS` output channels by `PIXELS` pixels.
    Rows {
        /// Per block of `ROWS` output channels, per input channel, the block's weights.
        packed: Vec<[f32; ROWS]>,
        /// Per block, the bias of its channels (zero past the last).
        bias: Vec<[f32; ROWS]>,
    },
    /// For [`columns`]' tiles of pixels by 32 output channels.
    Columns(Columns),
}

/// From this many input channels, the product runs with the output channels along the
/// vectors ([`columns`]): its store per output value costs little against the
/// `inputs / 16` vector multiply-adds behind it, and its tiles fit planes of any size.
const COLUMNS_FROM: usize = 256;

impl PointwiseConv {
    /// From `weights` `[outputs, inputs]` (row-major) and an optional bias.
    pub fn new(
        weights: &[f32],
        (outputs, inputs): (usize, usize),
        bias: &[f32],
        activation: Activation,
    ) -> Self {
        let weights = if inputs >= COLUMNS_FROM {
            Packed::Columns(Columns::new(weights, (outputs, inputs), bias))
        } else {
            let blocks = outputs.div_ceil(ROWS);
            let mut packed = vec![[0.0f32; ROWS]; blocks * inputs];
            let mut packed_bias = vec![[0.0f32; ROWS]; blocks];
            for co in 0..outputs {
                let (block, r) = (co / ROWS, co % ROWS);
                for ci in 0..inputs {
                    packed[block * inputs + ci][r] = weights[co * inputs + ci];
                }
                packed_bias[block][r] = bias.get(co).copied().unwrap_or(0.0);
            }
            Packed::Rows { packed, bias: packed_bias }
        };
        Self { inputs, outputs, weights, activation }
    }
}

/// Below this many pixels, tiles would be mostly padding: each block of output channels
/// is a run of multiply-adds over the input channels, pixel by pixel.
const FEW: usize = 8;

/// Each pixel's outputs, a block of `ROWS` sums at a time, the input channels taken four
/// at a time into four sets of sums (one set's multiply-adds would each wait on the one
/// before), added at the end.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn few_pixels(
    op: &PointwiseConv,
    (packed, bias): (&[[f32; ROWS]], &[[f32; ROWS]]),
    x: &[f32],
    pixels: usize,
    out: &mut [f32],
) {
    let ci = op.inputs;
    let mut column = vec![0.0f32; ci];
    let whole = ci - ci % 4;
    for p in 0..pixels {
        for (k, c) in column.iter_mut().enumerate() {
            *c = x[k * pixels + p];
        }
        for (block, bias) in bias.iter().enumerate() {
            let weights = &packed[block * ci..][..ci];
            let mut acc = [*bias, [0.0; ROWS], [0.0; ROWS], [0.0; ROWS]];
            for (w, c) in weights[..whole].chunks_exact(4).zip(column[..whole].chunks_exact(4)) {
                for s in 0..4 {
                    for r in 0..ROWS {
                        acc[s][r] = w[s][r].mul_add(c[s], acc[s][r]);
                    }
                }
            }
            for (w, &c) in weights[whole..].iter().zip(&column[whole..]) {
                for r in 0..ROWS {
                    acc[0][r] = w[r].mul_add(c, acc[0][r]);
                }
            }
            let mut sums = acc[0];
            for r in 0..ROWS {
                sums[r] += (acc[1][r] + acc[2][r]) + acc[3][r];
            }
            op.activation.apply(&mut sums);
            for (r, &y) in sums.iter().enumerate().take(op.outputs - block * ROWS) {
                out[(block * ROWS + r) * pixels + p] = y;
            }
        }
    }
}

/// Vectors per tile row.
pub(super) const VECS: usize = PIXELS / 16;

/// One image: `x` `[inputs, pixels]` into `out` `[outputs, pixels]`, with the weights
/// packed in rows (`packed`, `bias`). Compiled for AVX-512 and AVX2 as well, chosen at
/// run time.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn image(
    op: &PointwiseConv,
    (packed, bias): (&[[f32; ROWS]], &[[f32; ROWS]]),
    x: &[f32],
    pixels: usize,
    out: &mut [f32],
) {
    let ci = op.inputs;
    if pixels < FEW || ci == 0 {
        return few_pixels(op, (packed, bias), x, pixels, out);
    }
    if ci <= DEPTH {
        return in_runs(op, (packed, bias), x, pixels, out);
    }
    // The input channels in blocks of up to `DEPTH`, so that a tile stays in L1 while it
    // goes through all blocks of output channels (512 channels of a 7×7 plane, a 64 KiB
    // tile, streamed from L2 once per block); a block's sums wait in `partial` for the
    // next block of channels. The blocks are of equal size (300 channels: three of 100).
    let depth = ci.div_ceil(ci.div_ceil(DEPTH));
    let mut tile = vec![[[0.0f32; 16]; VECS]; depth];
    let mut partial = vec![[[[0.0f32; 16]; VECS]; ROWS]; bias.len()];
    for p0 in (0..pixels).step_by(PIXELS) {
        let width = PIXELS.min(pixels - p0);
        for k0 in (0..ci).step_by(depth) {
            let k1 = ci.min(k0 + depth);
            let tile = &mut tile[..k1 - k0];
            // The tile, its channels contiguous.
            for (k, row) in (k0..k1).zip(tile.iter_mut()) {
                tile_line(&x[k * pixels + p0..], width, row);
            }
            let blocks = packed.chunks_exact(ci).zip(bias).zip(partial.iter_mut());
            for (block, ((weights, bias), sums)) in blocks.enumerate() {
                let weights = &weights[k0..k1];
                let acc = if k0 == 0 {
                    tile_product(weights, tile, bias)
                } else {
                    tile_accumulate(weights, tile, *sums)
                };
                if k1 < ci {
                    *sums = acc;
                    continue;
                }
                store(op, &acc, block, (p0, width), pixels, out);
            }
        }
    }
}

/// Bytes of input a run of tiles copies for [`in_runs`]: the run stays in a 32 KiB L1
/// data cache while every block of output channels goes through it.
const RUN_BYTES: usize = 32 * 1024;
/// Tiles per run at most: 256 pixels, a kilobyte of each channel's row.
const RUN_TILES: usize = 8;

/// [`image`] for at most [`DEPTH`] input channels (the large planes of a network's first
/// stages), a run of up to [`RUN_TILES`] tiles at a time: the run's inputs are copied
/// channel by channel (each a kilobyte read in order), then each block of output
/// channels goes through the run's tiles, writing a kilobyte of each of its rows in
/// order. Tile by tile instead, a tile of 16 input and 32 output channels reads 16 rows
/// and writes 32, 128 bytes of each: 48 streams of memory, more than the prefetchers
/// follow.
#[inline(always)]
fn in_runs(
    op: &PointwiseConv,
    (packed, bias): (&[[f32; ROWS]], &[[f32; ROWS]]),
    x: &[f32],
    pixels: usize,
    out: &mut [f32],
) {
    let ci = op.inputs;
    let tiles = (RUN_BYTES / (ci * PIXELS * size_of::<f32>())).clamp(1, RUN_TILES);
    // Tile `t`'s channel `k` at `run[t * ci + k]`.
    let mut run = vec![[[0.0f32; 16]; VECS]; tiles * ci];
    for r0 in (0..pixels).step_by(tiles * PIXELS) {
        let count = (pixels - r0).div_ceil(PIXELS).min(tiles);
        for k in 0..ci {
            let from = &x[k * pixels..][..pixels];
            for t in 0..count {
                let p0 = r0 + t * PIXELS;
                tile_line(&from[p0..], PIXELS.min(pixels - p0), &mut run[t * ci + k]);
            }
        }
        for (block, (weights, bias)) in packed.chunks_exact(ci).zip(bias).enumerate() {
            for t in 0..count {
                let acc = tile_product(weights, &run[t * ci..][..ci], bias);
                let p0 = r0 + t * PIXELS;
                store(op, &acc, block, (p0, PIXELS.min(pixels - p0)), pixels, out);
            }
        }
    }
}

/// One channel's line of a tile: `width` pixels from `from` (up to a tile's), zero past
/// them. A whole line is copied at a constant size (a copy of a variable size is a call).
#[inline(always)]
fn tile_line(from: &[f32], width: usize, line: &mut [V; VECS]) {
    let line = line.as_flattened_mut();
    if width == PIXELS {
        line.copy_from_slice(&from[..PIXELS]);
    } else {
        copy(&from[..width], &mut line[..width]);
        line[width..].fill(0.0);
    }
}

/// A product tile's rows, activated, into their output rows at pixel `p0` (`width` of
/// them, up to a tile's).
#[inline(always)]
fn store(
    op: &PointwiseConv,
    acc: &[[V; VECS]; ROWS],
    block: usize,
    (p0, width): (usize, usize),
    pixels: usize,
    out: &mut [f32],
) {
    for r in 0..ROWS.min(op.outputs - block * ROWS) {
        let line = tile_row(acc, r);
        let to = &mut out[(block * ROWS + r) * pixels + p0..];
        if width == PIXELS {
            op.activation.apply_to(&line, &mut to[..PIXELS]);
        } else {
            op.activation.apply_to(&line[..width], &mut to[..width]);
        }
    }
}

/// Input channels per block of the product: a tile, `DEPTH × PIXELS` floats (16 KiB),
/// stays in L1.
const DEPTH: usize = 128;

/// One tile: `bias + weights · tile`, over whole vectors so that the compiler keeps the
/// tile in registers (written as loops over floats, it did not).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
pub(super) fn tile_product(
    weights: &[[f32; ROWS]],
    tile: &[[V; VECS]],
    bias: &[f32; ROWS],
) -> [[V; VECS]; ROWS] {
    let mut a = [[[0.0f32; 16]; VECS]; ROWS];
    for r in 0..ROWS {
        a[r] = [[bias[r]; 16]; VECS];
    }
    tile_accumulate(weights, tile, a)
}

/// One tile: `a + weights · tile`, the sums `a` carried in registers (for products
/// whose input channels come in blocks).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
pub(super) fn tile_accumulate(
    weights: &[[f32; ROWS]],
    tile: &[[V; VECS]],
    mut a: [[V; VECS]; ROWS],
) -> [[V; VECS]; ROWS] {
    for (w, xs) in weights.iter().zip(tile) {
        for r in 0..ROWS {
            for v in 0..VECS {
                a[r][v] = fma(a[r][v], w[r], &xs[v]);
            }
        }
    }
    a
}

/// Row `r` of a product tile, copied out. The tile itself is only ever indexed by
/// constants, so that it stays in registers through the product (indexed by `r` and a
/// width, it lived on the stack, stored after every multiply-add).
#[inline(always)]
pub(super) fn tile_row(acc: &[[V; VECS]; ROWS], r: usize) -> [f32; PIXELS] {
    let mut line = [0.0f32; PIXELS];
    for (r2, a) in acc.iter().enumerate() {
        if r2 == r {
            line = *a.as_flattened().first_chunk().expect("a tile row");
        }
    }
    line
}

impl Kernel for PointwiseConv {
    fn name(&self) -> &'static str {
        "PointwiseConv"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        super::per_image(
            inputs,
            self.inputs,
            self.outputs,
            |h, w| (h, w),
            |i, (h, w), o, _| match &self.weights {
                Packed::Rows { packed, bias } => image(self, (packed, bias), i, h * w, o),
                Packed::Columns(c) => columns::image(c, self.activation, i, h * w, o),
            },
        )
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let s = &inputs[0].shape;
        if s.len() != 4 {
            bail!("expected an NCHW input, got {s:?}");
        }
        Ok(tvec![f32::fact(tvec![s[0].clone(), self.outputs.to_dim(), s[2].clone(), s[3].clone()])])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointwise_convolution_matches_its_definition() {
        // Channel and pixel counts around the tile sizes, an activation or none.
        for (ci, co, h, w, activation) in [
            (3, 5, 4, 9, Activation::Identity),
            // Fewer pixels than a tile's worth (`FEW`): each output a dot product.
            (37, 11, 1, 1, Activation::Relu),
            (40, 9, 2, 3, Activation::Identity),
            (16, 13, 7, 7, Activation::Relu),
            // More input channels than a block of them (`DEPTH`), and not a multiple.
            (300, 7, 5, 9, Activation::Relu),
            // Planes of more than one run of tiles (`in_runs`): 323 pixels, a run of eight
            // tiles then one of three, the last 3 pixels wide; 40 channels, runs of six.
            (16, 7, 17, 19, Activation::Relu),
            (40, 9, 15, 15, Activation::Identity),
            (8, 6, 1, 32, Activation::Clip { lo: -1.0, hi: 1.0 }),
            // Either side of `COLUMNS_FROM`, on planes of one pixel, of a few, 7×7 and
            // 14×14; input channels not a multiple of four (the one-pixel sums).
            (255, 13, 1, 1, Activation::Relu),
            (131, 20, 1, 3, Activation::Identity),
            (256, 40, 7, 7, Activation::Relu),
            (256, 33, 14, 14, Activation::Identity),
            (512, 35, 1, 1, Activation::HardSigmoid { alpha: 0.2, beta: 0.5 }),
            // No input channels: the bias, activated.
            (0, 5, 2, 2, Activation::Relu),
            (
                5,
                1,
                3,
                30,
                Activation::Gated { alpha: 1.0, beta: 3.0, lo: 0.0, hi: 6.0, scale: 1.0 / 6.0 },
            ),
        ] {
            let weights: Vec<f32> =
                (0..co * ci).map(|i| ((i * 13 % 7) as f32) * 0.25 - 0.75).collect();
            let bias: Vec<f32> = (0..co).map(|i| i as f32 * 0.5 - 1.0).collect();
            let x: Vec<f32> = (0..2 * ci * h * w).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
            let op = PointwiseConv::new(&weights, (co, ci), &bias, activation);
            let input = Tensor::from_shape(&[2, ci, h, w], &x).unwrap().into_tvalue();
            let got = op.eval(&[input]).unwrap().remove(0);
            assert_eq!(got.shape(), &[2, co, h, w]);
            let got = got.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
            let p = h * w;
            for n in 0..2 {
                for o in 0..co {
                    let mut row: Vec<f32> = (0..p)
                        .map(|j| {
                            bias[o]
                                + (0..ci)
                                    .map(|k| weights[o * ci + k] * x[n * ci * p + k * p + j])
                                    .sum::<f32>()
                        })
                        .collect();
                    activation.apply(&mut row);
                    let g = &got[n * co * p + o * p..][..p];
                    for (a, b) in g.iter().zip(&row) {
                        assert!(
                            (a - b).abs() < 1e-4 * b.abs().max(1.0),
                            "{ci} {co} {h} {w}: {g:?} against {row:?}"
                        );
                    }
                }
            }
        }
    }
}
