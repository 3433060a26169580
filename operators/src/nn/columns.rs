//! The 1×1 convolution's product with the output channels along the vectors: a tile of
//! up to [`TILE`] pixels by [`LANES`] output channels, each input channel's value of a
//! pixel broadcast against two vectors of weights, the 24 sums in registers.
//!
//! [`super::pointwise`]'s own tile runs the other way (pixels along the vectors, 32 at a
//! time), which leaves most of a tile empty on the small planes of a network's last
//! stages: a 7×7 plane is 49 pixels, two 32-pixel tiles three quarters full, and a
//! plane of one pixel (the squeeze-and-excitation and classifier layers) a tile of one.
//! Here the tile's width is cut to the plane (49 pixels: five tiles of 10, 10, 10, 10
//! and 9), and the output channels, a multiple of 32 in most layers, fill the vectors.
//! The price is a store per output value (the tile's vectors run across output planes),
//! small against the `inputs / 16` multiply-adds behind each when inputs are many.

use super::activation::Activation;
use super::{V, fma};

/// Output channels per block: two vectors.
pub(super) const LANES: usize = 32;
/// Most pixels per tile: 24 sums of the 32 vector registers of AVX-512.
pub(super) const TILE: usize = 12;

/// A 1×1 convolution's weights packed for [`image`]: per block of [`LANES`] output
/// channels, per input channel, the block's weights (zero past the last channel).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Columns {
    pub(super) inputs: usize,
    pub(super) outputs: usize,
    packed: Vec<[V; 2]>,
    /// Per block, the bias of its channels (zero past the last).
    bias: Vec<[V; 2]>,
}

impl Columns {
    /// From `weights` `[outputs, inputs]` (row-major) and a bias (empty for none).
    pub(super) fn new(weights: &[f32], (outputs, inputs): (usize, usize), bias: &[f32]) -> Self {
        let blocks = outputs.div_ceil(LANES);
        let mut packed = vec![[[0.0f32; 16]; 2]; blocks * inputs];
        let mut packed_bias = vec![[[0.0f32; 16]; 2]; blocks];
        for co in 0..outputs {
            let (block, lane) = (co / LANES, co % LANES);
            for ci in 0..inputs {
                packed[block * inputs + ci][lane / 16][lane % 16] = weights[co * inputs + ci];
            }
            packed_bias[block][lane / 16][lane % 16] = bias.get(co).copied().unwrap_or(0.0);
        }
        Self { inputs, outputs, packed, bias: packed_bias }
    }
}

/// One image: `x` `[inputs, pixels]` into `out` `[outputs, pixels]`, in tiles of equal
/// width (at most one pixel apart). Each tile's inputs are laid out once, pixel values
/// side by side per input channel, then every block of output channels goes through
/// them (the tile, `inputs × TILE` floats, stays in L1; the weights stream from L2).
/// Compiled for AVX-512 and AVX2 as well, chosen at run time.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
pub(super) fn image(
    op: &Columns,
    activation: Activation,
    x: &[f32],
    pixels: usize,
    out: &mut [f32],
) {
    let ci = op.inputs;
    if pixels == 0 {
        return;
    }
    if ci == 0 {
        // No input channels: every output is its bias, activated.
        for (co, plane) in out.chunks_exact_mut(pixels).enumerate().take(op.outputs) {
            let mut b = [op.bias[co / LANES][co % LANES / 16][co % 16]];
            activation.apply(&mut b);
            plane.fill(b[0]);
        }
        return;
    }
    let tiles = pixels.div_ceil(widest());
    let mut tile = vec![[0.0f32; TILE]; ci];
    for t in 0..tiles {
        let (p0, p1) = (t * pixels / tiles, (t + 1) * pixels / tiles);
        for (k, row) in tile.iter_mut().enumerate() {
            // A whole row of the tile where the input has it (a copy of a constant size
            // is a few moves; of a variable size, a call), the surplus past `p1` unused.
            match x.get(k * pixels + p0..k * pixels + p0 + TILE) {
                Some(from) => row.copy_from_slice(from),
                None => {
                    for (d, s) in row.iter_mut().zip(&x[k * pixels + p0..k * pixels + p1]) {
                        *d = *s;
                    }
                }
            }
        }
        let to = Target { out: &mut *out, pixels, p0, outputs: op.outputs, activation };
        match p1 - p0 {
            1 => one_pixel(op, &tile, to),
            2 => product::<2>(op, &tile, to),
            3 => product::<3>(op, &tile, to),
            4 => product::<4>(op, &tile, to),
            5 => product::<5>(op, &tile, to),
            6 => product::<6>(op, &tile, to),
            7 => product::<7>(op, &tile, to),
            8 => product::<8>(op, &tile, to),
            9 => product::<9>(op, &tile, to),
            10 => product::<10>(op, &tile, to),
            11 => product::<11>(op, &tile, to),
            _ => product::<TILE>(op, &tile, to),
        }
    }
}

/// The widest tile whose sums fit this CPU's vector registers: [`TILE`] pixels (24
/// 512-bit sums) with AVX-512; 3 (12 pairs of 256-bit or 128-bit sums) where there are 16
/// 256-bit registers (AVX2) or 32 of 128 bits (NEON), since sums that spill to the stack
/// cost a store after every multiply-add.
fn widest() -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return TILE;
    }
    3
}

/// Where a tile's outputs go: `out` `[outputs, pixels]`, the tile's first pixel `p0`.
struct Target<'a> {
    out: &'a mut [f32],
    pixels: usize,
    p0: usize,
    outputs: usize,
    activation: Activation,
}

impl Target<'_> {
    /// Pixel `p` of the tile, its sums for the output channels of block `block`,
    /// activated and stored, one value per output plane.
    #[inline(always)]
    fn store(&mut self, block: usize, p: usize, sums: &[V; 2]) {
        let mut values = [0.0f32; LANES];
        self.activation.apply_to(sums.as_flattened(), &mut values);
        let first = block * LANES;
        let channels = LANES.min(self.outputs - first);
        let column = first * self.pixels + self.p0 + p;
        for (c, &v) in values[..channels].iter().enumerate() {
            self.out[column + c * self.pixels] = v;
        }
    }
}

/// Runs `$body` with `$i` bound to each of the constants 0 to 11 below `P`: the tile's
/// sums are only ever indexed by constants, so that they stay in registers (a loop over
/// 24 vectors is past what the compiler unrolls, and indexed by a variable they lived
/// on the stack, stored after every multiply-add).
macro_rules! each_pixel {
    ($p:ident, $i:ident => $body:block) => {
        each_pixel!(@ $p, $i, $body, 0 1 2 3 4 5 6 7 8 9 10 11)
    };
    (@ $p:ident, $i:ident, $body:block, $($n:literal)*) => {
        $(
            if $n < $p {
                let $i = $n;
                $body
            }
        )*
    };
}

/// One tile of `P` pixels (2 to [`TILE`]) through every block of output channels.
#[inline(always)]
fn product<const P: usize>(op: &Columns, tile: &[[f32; TILE]], mut to: Target<'_>) {
    let blocks = op.packed.chunks_exact(op.inputs).zip(&op.bias);
    for (block, (weights, bias)) in blocks.enumerate() {
        let mut acc = [*bias; TILE];
        for (w, xs) in weights.iter().zip(tile) {
            each_pixel!(P, p => {
                acc[p][0] = fma(acc[p][0], xs[p], &w[0]);
                acc[p][1] = fma(acc[p][1], xs[p], &w[1]);
            });
        }
        each_pixel!(P, p => {
            to.store(block, p, &acc[p]);
        });
    }
}

/// A tile of one pixel: the input channels taken four at a time into four sets of sums
/// (one set's multiply-adds would each wait on the one before), added at the end.
#[inline(always)]
fn one_pixel(op: &Columns, tile: &[[f32; TILE]], mut to: Target<'_>) {
    let blocks = op.packed.chunks_exact(op.inputs).zip(&op.bias);
    for (block, (weights, bias)) in blocks.enumerate() {
        let zero = [[0.0f32; 16]; 2];
        let mut acc = [*bias, zero, zero, zero];
        let (whole, rest) = weights.split_at(weights.len() - weights.len() % 4);
        let (tile_whole, tile_rest) = tile.split_at(whole.len());
        for (w, xs) in whole.chunks_exact(4).zip(tile_whole.chunks_exact(4)) {
            for s in 0..4 {
                acc[s][0] = fma(acc[s][0], xs[s][0], &w[s][0]);
                acc[s][1] = fma(acc[s][1], xs[s][0], &w[s][1]);
            }
        }
        for (w, xs) in rest.iter().zip(tile_rest) {
            acc[0][0] = fma(acc[0][0], xs[0], &w[0]);
            acc[0][1] = fma(acc[0][1], xs[0], &w[1]);
        }
        let mut sums = acc[0];
        for v in 0..2 {
            for j in 0..16 {
                sums[v][j] += (acc[1][v][j] + acc[2][v][j]) + acc[3][v][j];
            }
        }
        to.store(block, 0, &sums);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in [-1, 1) from a linear congruential sequence.
    fn random(len: usize, seed: &mut u64) -> Vec<f32> {
        (0..len)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((*seed >> 40) as f32) / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The definition, one output at a time, in f64.
    fn reference(
        w: &[f32],
        bias: &[f32],
        x: &[f32],
        (co, ci, pixels): (usize, usize, usize),
        activation: Activation,
    ) -> Vec<f32> {
        let mut out = vec![0.0f32; co * pixels];
        for o in 0..co {
            for p in 0..pixels {
                let dot: f64 =
                    (0..ci).map(|k| f64::from(w[o * ci + k]) * f64::from(x[k * pixels + p])).sum();
                out[o * pixels + p] = (dot + f64::from(bias.get(o).copied().unwrap_or(0.0))) as f32;
            }
        }
        activation.apply(&mut out);
        out
    }

    #[test]
    fn tiles_of_every_width_match_the_definition() {
        let mut seed = 7;
        let activations = [
            Activation::Identity,
            Activation::Relu,
            Activation::Gated { alpha: 1.0, beta: 3.0, lo: 0.0, hi: 6.0, scale: 1.0 / 6.0 },
        ];
        // Input channels: none, fewer than the one-pixel kernel's four sets, not a
        // multiple of four, many. Output channels around a block of 32. Pixels: one, a
        // tile or one either side, a 7×7 and a 14×14 plane, and sizes whose tiles are
        // of two widths.
        for ci in [0, 1, 3, 17, 256, 301] {
            for co in [1, 31, 32, 33, 70] {
                for pixels in [1, 2, 3, 4, 5, 11, 12, 13, 25, 49, 196] {
                    let activation = activations[(ci + co + pixels) % activations.len()];
                    let w = random(co * ci, &mut seed);
                    let bias = if co % 2 == 1 { random(co, &mut seed) } else { Vec::new() };
                    let x = random(ci * pixels, &mut seed);
                    let op = Columns::new(&w, (co, ci), &bias);
                    let mut got = vec![f32::NAN; co * pixels];
                    image(&op, activation, &x, pixels, &mut got);
                    let want = reference(&w, &bias, &x, (co, ci, pixels), activation);
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - e).abs() <= 1e-5 * e.abs().max(1.0) * (ci as f32).sqrt().max(1.0),
                            "{ci}->{co} on {pixels} pixels, {activation:?}, at {i}: {g} against {e}"
                        );
                    }
                }
            }
        }
    }
}
