//! A dense layer: `MatMul` of float32 rows by a constant `[K, N]` weight matrix, with
//! the bias (`Add`) and the activation that follow fused in by [`super::fold`], as
//! scikit-learn's MLPs and most exported fully-connected layers are made.
//!
//! tract packs both operands per call and chooses its kernel by shape; for the narrow
//! layers of tabular networks (tens of columns) that cost more than the products. Here
//! the weights are packed once at load, in panels of `16 · NV` columns, and each tile of
//! `MR` rows by one panel is a run of multiply-adds over `K` (each row's value broadcast
//! against the panel's vectors), kept in vector registers, then biased, activated and
//! stored.

use tract_onnx::tract_hir::internal::*;

use super::activation::Activation;
use super::fma;
use crate::expand::Kernel;

/// Rows per tile.
const MR: usize = 6;

/// `y = act(x · W + b)` for every row `x` of the input's last axis.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    k: usize,
    n: usize,
    /// Vectors of 16 columns per panel: 2 for layers wider than 16 columns, else 1.
    nv: usize,
    /// Per panel, per `k`, the panel's `16 · nv` weights (zero past column `n`).
    packed: Vec<f32>,
    /// The bias, zero past column `n`, padded to whole panels.
    bias: Vec<f32>,
    activation: Activation,
    /// The least rank of the output: a fused bias of shape `[1, n]` makes a vector's
    /// output `[1, n]`, as the `Add` did.
    rank: usize,
}

impl Dense {
    /// From `weights` `[k, n]` (row-major), a bias of `n` values or none (empty), and
    /// the activation.
    pub fn new(
        weights: &[f32],
        (k, n): (usize, usize),
        bias: &[f32],
        activation: Activation,
    ) -> Self {
        let nv = if n > 16 { 2 } else { 1 };
        let width = 16 * nv;
        let panels = n.div_ceil(width);
        let mut packed = vec![0.0f32; panels * k * width];
        for kk in 0..k {
            for j in 0..n {
                let (p, c) = (j / width, j % width);
                packed[(p * k + kk) * width + c] = weights[kk * n + j];
            }
        }
        let mut padded = vec![0.0f32; panels * width];
        padded[..bias.len().min(n)].copy_from_slice(&bias[..bias.len().min(n)]);
        Self { k, n, nv, packed, bias: padded, activation, rank: 1 }
    }

    /// The same layer, its output of rank `rank` at least (leading axes of 1 added).
    #[must_use]
    pub fn at_least_rank(self, rank: usize) -> Self {
        Self { rank, ..self }
    }

    /// The output shape for an input shape `[.., k]` (a 1-D input is one row).
    fn output_shape<D: Clone>(&self, input: &[D], n: D, one: D) -> TVec<D> {
        let mut shape: TVec<D> = input.iter().cloned().collect();
        if let Some(last) = shape.last_mut() {
            *last = n;
        }
        while shape.len() < self.rank {
            shape.insert(0, one.clone());
        }
        shape
    }
}

/// One tile: `R` rows, given step by step (`packed`: per step of the `depth`, the `R`
/// rows' values), by the panel `panel` (`16 · NV` wide, `depth` rows), biased, activated
/// and written to `out` (rows `stride` apart, the first `cols` columns).
///
/// Every operand of the loop over the depth comes from exact chunks, so that it has no
/// bounds checks, and the sums stay in vector registers.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn tile<const R: usize, const NV: usize>(
    packed: &[f32],
    panel: &[f32],
    bias: &[f32],
    activation: Activation,
    (out, stride, cols): (&mut [f32], usize, usize),
) {
    let mut acc = [[[0.0f32; 16]; NV]; R];
    for row in &mut acc {
        for (v, sums) in row.iter_mut().enumerate() {
            sums.copy_from_slice(&bias[16 * v..16 * v + 16]);
        }
    }
    for (weights, values) in panel.chunks_exact(16 * NV).zip(packed.chunks_exact(R)) {
        let mut lanes = [[0.0f32; 16]; NV];
        for (v, lane) in lanes.iter_mut().enumerate() {
            lane.copy_from_slice(&weights[16 * v..16 * v + 16]);
        }
        for row in 0..R {
            for v in 0..NV {
                acc[row][v] = fma(acc[row][v], values[row], &lanes[v]);
            }
        }
    }
    for (row, sums) in acc.iter_mut().enumerate() {
        let line = &mut out[row * stride..][..cols];
        for (v, s) in sums.iter_mut().enumerate() {
            // Whole vectors through the activation, then the columns that exist. ReLU
            // as a select (NaN kept, as `Activation::apply` keeps it), which compiles to
            // a compare and a masked move per vector rather than a branch per value.
            if activation == Activation::Relu {
                for x in s.iter_mut() {
                    *x = if *x < 0.0 { 0.0 } else { *x };
                }
            } else {
                activation.apply(s);
            }
            let start = 16 * v;
            if start < cols {
                let end = cols.min(start + 16);
                line[start..end].copy_from_slice(&s[..end - start]);
            }
        }
    }
}

/// Tiles of rows per group: a group's rows are laid out once, then each panel of
/// weights goes through all of the group's tiles while it is in L1 (a layer's weights
/// can be megabytes: an output layer over thousands of classes).
const GROUP: usize = 8;

/// The rows of `input` through the panels of `16 · NV` columns: per group of up to
/// `GROUP` tiles of `MR` rows (the last tile of the input shorter), the group's values
/// laid out step by step, then every panel through every tile of the group.
#[inline(always)]
fn panels<const NV: usize>(op: &Dense, input: &[f32], rows: usize, out: &mut [f32]) {
    let (depth, width, n) = (op.k, 16 * NV, op.n);
    let mut packed = vec![0.0f32; depth * MR * GROUP];
    let mut row = 0;
    while row < rows {
        let group = (rows - row).min(MR * GROUP);
        for (t, tile_rows) in input[row * depth..][..group * depth].chunks(MR * depth).enumerate() {
            let r = tile_rows.len() / depth;
            let packed = &mut packed[t * MR * depth..][..r * depth];
            for (i, line) in tile_rows.chunks_exact(depth).enumerate() {
                for (step, &v) in line.iter().enumerate() {
                    packed[step * r + i] = v;
                }
            }
        }
        let panels = op.packed.chunks_exact(depth * width).zip(op.bias.chunks_exact(width));
        for (p, (panel, bias)) in panels.enumerate() {
            let first = p * width;
            for t in 0..group.div_ceil(MR) {
                let r = MR.min(group - t * MR);
                let values = &packed[t * MR * depth..][..r * depth];
                let target = (&mut out[(row + t * MR) * n + first..], n, width.min(n - first));
                match r {
                    MR => tile::<MR, NV>(values, panel, bias, op.activation, target),
                    5 => tile::<5, NV>(values, panel, bias, op.activation, target),
                    4 => tile::<4, NV>(values, panel, bias, op.activation, target),
                    3 => tile::<3, NV>(values, panel, bias, op.activation, target),
                    2 => tile::<2, NV>(values, panel, bias, op.activation, target),
                    _ => tile::<1, NV>(values, panel, bias, op.activation, target),
                }
            }
        }
        row += group;
    }
}

/// Every row of `input` through the layer, into `out`.
#[multiversion::multiversion(targets(
    "x86_64+avx+avx2+avx512f+fma",
    "x86_64+avx+avx2+fma",
    "aarch64+neon"
))]
fn run(op: &Dense, input: &[f32], rows: usize, out: &mut [f32]) {
    if op.k == 0 {
        // No products: the bias, activated.
        for line in out.chunks_exact_mut(op.n) {
            line.copy_from_slice(&op.bias[..op.n]);
            op.activation.apply(line);
        }
        return;
    }
    match op.nv {
        1 => panels::<1>(op, input, rows, out),
        _ => panels::<2>(op, input, rows, out),
    }
}

impl Kernel for Dense {
    fn name(&self) -> &'static str {
        "MatMul"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let input = &inputs[0];
        if input.datum_type() != f32::datum_type() {
            bail!("MatMul: a {:?} input against float32 weights", input.datum_type());
        }
        let shape = input.shape();
        if shape.last() != Some(&self.k) {
            bail!("MatMul: an input of shape {shape:?} against weights of {} rows", self.k);
        }
        let rows = shape[..shape.len() - 1].iter().product::<usize>();
        let x = input.try_as_plain_ram()?.as_slice::<f32>()?;
        // Computed in the output tensor itself: no copy of a layer's output per call.
        let mut out = super::to_fill(&self.output_shape(shape, self.n, 1))?;
        if self.n > 0 {
            let mut view = out.try_as_plain_ram_mut()?;
            run(self, x, rows, view.as_slice_mut::<f32>()?);
        }
        Ok(tvec![out])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let input = &inputs[0].shape;
        if input.rank() == 0 {
            bail!("MatMul: a scalar input");
        }
        if let Ok(k) = input[input.rank() - 1].to_usize()
            && k != self.k
        {
            bail!("MatMul: an input of {k} columns against weights of {} rows", self.k);
        }
        Ok(tvec![f32::fact(self.output_shape(input, self.n.to_dim(), 1.to_dim()))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layer computed one product at a time, in f64.
    fn reference(
        input: &[f32],
        weights: &[f32],
        (depth, width): (usize, usize),
        bias: &[f32],
        act: Activation,
    ) -> Vec<f32> {
        let rows = input.len().checked_div(depth).unwrap_or(0);
        let mut out = Vec::new();
        for r in 0..rows {
            let mut row: Vec<f32> = (0..width)
                .map(|j| {
                    let shift = f64::from(bias.get(j).copied().unwrap_or(0.0));
                    let dot: f64 = (0..depth)
                        .map(|d| {
                            f64::from(input[r * depth + d]) * f64::from(weights[d * width + j])
                        })
                        .sum();
                    (dot + shift) as f32
                })
                .collect();
            act.apply(&mut row);
            out.extend(row);
        }
        out
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32 * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn eval(op: &Dense, shape: &[usize], x: &[f32]) -> TractResult<Tensor> {
        let input = Tensor::from_shape(shape, x)?.into_tvalue();
        Ok(op.eval(&[input])?.remove(0))
    }

    #[test]
    fn every_shape_and_activation_matches_the_definition() {
        let acts = [
            Activation::Identity,
            Activation::Relu,
            Activation::Clip { lo: -0.5, hi: 0.5 },
            Activation::Gated { alpha: 1.0, beta: 3.0, lo: 0.0, hi: 6.0, scale: 1.0 / 6.0 },
        ];
        // Widths of one vector, one partial vector, two panels and a partial one; rows
        // below, at and past a tile; depths of 1 and odd ones.
        for (k, n) in [(1, 1), (20, 64), (64, 32), (32, 3), (7, 17), (5, 33), (3, 16), (16, 100)] {
            for rows in [1, 5, 6, 7, 13, 47, 48, 49, 64, 100] {
                for (i, &act) in acts.iter().enumerate() {
                    let w = values(k * n, 1 + i as u32);
                    let bias = if i % 2 == 0 { values(n, 9) } else { Vec::new() };
                    let x = values(rows * k, 3);
                    let op = Dense::new(&w, (k, n), &bias, act);
                    let got = eval(&op, &[rows, k], &x).unwrap();
                    assert_eq!(got.shape(), &[rows, n]);
                    let want = reference(&x, &w, (k, n), &bias, act);
                    let got = got.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
                    for (g, e) in got.iter().zip(&want) {
                        assert!(
                            (g - e).abs() <= 1e-5 * e.abs().max(1.0),
                            "{k}×{n}, {rows} rows, {act:?}: {g} against {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn leading_axes_are_rows_and_a_vector_is_one() {
        let (k, n) = (4, 5);
        let w = values(k * n, 2);
        let op = Dense::new(&w, (k, n), &[], Activation::Identity);
        let x = values(2 * 3 * k, 4);
        let got = eval(&op, &[2, 3, k], &x).unwrap();
        assert_eq!(got.shape(), &[2, 3, n]);
        let flat = eval(&op, &[6, k], &x).unwrap();
        assert_eq!(got.into_shape(&[6, n]).unwrap(), flat);
        let one = eval(&op, &[k], &x[..k]).unwrap();
        assert_eq!(one.shape(), &[n]);
        let empty = eval(&op, &[0, k], &[]).unwrap();
        assert_eq!(empty.shape(), &[0, n]);
        let two = op.at_least_rank(2);
        assert_eq!(eval(&two, &[k], &x[..k]).unwrap().shape(), &[1, n]);
        assert_eq!(eval(&two, &[2, 3, k], &x).unwrap().shape(), &[2, 3, n]);
    }

    #[test]
    fn nan_and_infinities_propagate_as_in_a_product() {
        let op = Dense::new(&[1.0, 2.0, 3.0, 4.0], (2, 2), &[0.5, 0.5], Activation::Relu);
        let got = eval(&op, &[2, 2], &[f32::NAN, 1.0, f32::INFINITY, 1.0]).unwrap();
        let got = got.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        // NaN stays NaN through the ReLU, as in ONNX Runtime.
        assert!(got[..2].iter().all(|v| v.is_nan()), "{got:?}");
        assert_eq!(got[2..], [f32::INFINITY, f32::INFINITY]);
        let id = Dense::new(&[1.0, 2.0, 3.0, 4.0], (2, 2), &[], Activation::Identity);
        let got = eval(&id, &[1, 2], &[f32::NAN, 1.0]).unwrap();
        assert!(
            got.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().iter().all(|v| v.is_nan())
        );
    }

    #[test]
    fn wrong_inputs_are_errors_naming_the_shapes() {
        let op = Dense::new(&[1.0; 6], (3, 2), &[], Activation::Identity);
        let err = eval(&op, &[2, 4], &[0.0; 8]).unwrap_err().to_string();
        assert!(err.contains("[2, 4]") && err.contains("3 rows"), "{err}");
        let ints = tensor2(&[[1i64, 2, 3]]).into_tvalue();
        assert!(op.eval(&[ints]).unwrap_err().to_string().contains("I64"));
        let fact = f32::fact([2, 5]);
        assert!(op.facts(&[&fact]).is_err());
        let fact = f32::fact([SymbolScope::default().sym("N").to_dim(), 3.to_dim()]);
        assert!(op.facts(&[&fact]).is_ok());
    }
}
