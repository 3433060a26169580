//! Linear models and support-vector machines: LinearClassifier, LinearRegressor,
//! SVMClassifier and SVMRegressor, with ONNX Runtime's label and score layouts.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::tract_ndarray::linalg::general_mat_mul;
use tract_onnx::tract_hir::internal::tract_ndarray::{ArrayView2, ArrayViewMut2};
use tract_onnx::tract_hir::internal::*;

use crate::attrs::Labels;
use crate::expand::{Built, Kernel, Out, Shape, as_f32_rows, expand, row_fact, rows_of};
use crate::post::{Post, Second, binary_pair};

fn post(node: &NodeProto) -> TractResult<Post> {
    let name = node.get_attr_opt::<&str>("post_transform")?.unwrap_or("NONE");
    Post::parse(name).map_or_else(|| node.bail(&format!("unknown post_transform {name:?}")), Ok)
}

/// `x · wᵀ + b` for `rows` rows of `width` columns against `targets` weight rows: many
/// rows and targets through ndarray's matrix product (`matrixmultiply`'s packed sgemm,
/// its AVX2/AVX-512 kernels chosen at run time), a few by [`dot_rows`].
fn affine(
    x: &[f32],
    rows: usize,
    width: usize,
    weights: &[f32],
    targets: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut out = vec![0.0; rows * targets];
    affine_into(x, rows, width, weights, targets, bias, &mut out);
    out
}

/// [`affine`] into `out` (`rows × targets`, row-major), which it overwrites.
fn affine_into(
    x: &[f32],
    rows: usize,
    width: usize,
    weights: &[f32],
    targets: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let operands = (rows >= GEMM_ROWS && targets >= GEMM_TARGETS)
        .then(|| {
            let x = ArrayView2::from_shape((rows, width), x.get(..rows * width)?).ok()?;
            let w = ArrayView2::from_shape((targets, width), weights.get(..targets * width)?);
            Some((x, w.ok()?))
        })
        .flatten();
    match (operands, ArrayViewMut2::from_shape((rows, targets), &mut *out)) {
        (Some((x, w)), Ok(mut c)) => {
            general_mat_mul(1.0, &x, &w.t(), 0.0, &mut c);
            if let Some(bias) = bias {
                for out_row in out.chunks_mut(targets.max(1)) {
                    for (o, b) in out_row.iter_mut().zip(bias) {
                        *o += b;
                    }
                }
            }
        }
        _ if (1..=GROUPED_TARGETS).contains(&targets) => {
            dot_groups(x, width, weights, targets, bias, out);
        }
        _ => dot_rows(x, width, weights, targets, bias, out),
    }
}

/// Up to how many targets [`dot_groups`] takes: its groups of (row, target) sums hold at
/// most twelve partial sums.
const GROUPED_TARGETS: usize = 4;

/// [`dot_rows`] for 1 to [`GROUPED_TARGETS`] targets: the rows in groups whose
/// `rows × targets` sums are a multiple of four (four rows of one or three targets, two
/// of two, one of four), each sum folded to four lanes by [`quads`], then four sums at a
/// time finished together ([`reduce4`]: a transpose and two additions instead of four
/// separate reductions across lanes), in the output's order. The rows past the last
/// whole group go through [`dot_rows`].
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn dot_groups(
    x: &[f32],
    width: usize,
    weights: &[f32],
    targets: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    match targets {
        1 => grouped::<1, 4>(x, width, weights, bias, out),
        2 => grouped::<2, 2>(x, width, weights, bias, out),
        3 => grouped::<3, 4>(x, width, weights, bias, out),
        _ => grouped::<4, 1>(x, width, weights, bias, out),
    }
}

/// [`dot_groups`] for `T` targets in groups of `R` rows (`R × T` a multiple of four, at
/// most twelve).
#[allow(clippy::inline_always)] // inlined into each target's compilation of its caller
#[inline(always)]
fn grouped<const T: usize, const R: usize>(
    x: &[f32],
    width: usize,
    weights: &[f32],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let width = width.max(1);
    let Some(weights) = weights.get(..T * width) else { return };
    let w: [&[f32]; T] = std::array::from_fn(|t| &weights[t * width..(t + 1) * width]);
    let b: [f32; T] = std::array::from_fn(|t| bias.and_then(|b| b.get(t)).copied().unwrap_or(0.0));
    let x_groups = x.chunks_exact(R * width);
    let out_groups = out.chunks_exact_mut(R * T);
    let whole = x_groups.len().min(out_groups.len());
    for (rows, outs) in x_groups.zip(out_groups) {
        let rows: [&[f32]; R] = std::array::from_fn(|r| &rows[r * width..(r + 1) * width]);
        let quads = quads::<T, R>(&rows, &w, width);
        for g in 0..(R * T) / 4 {
            let sums =
                reduce4([quads[4 * g], quads[4 * g + 1], quads[4 * g + 2], quads[4 * g + 3]]);
            for j in 0..4 {
                outs[4 * g + j] = sums[j] + b[(4 * g + j) % T];
            }
        }
    }
    let done = whole * R;
    let x_rest = &x[(done * width).min(x.len())..];
    let out_start = (done * T).min(out.len());
    let out_rest = &mut out[out_start..];
    for (row, o) in x_rest.chunks_exact(width).zip(out_rest.chunks_exact_mut(T)) {
        let quads = quads::<T, 1>(&[row], &w, width);
        for t in 0..T {
            o[t] = reduce4([quads[t], [0.0; 4], [0.0; 4], [0.0; 4]])[0] + b[t];
        }
    }
}

/// The products of each of `R` rows with each of `T` weight rows (all `width` long),
/// summed into four lanes, in `(row, target)` order: eight running sums per pair over the
/// features eight at a time (the pairs innermost, so that every sum stays in a register
/// and each eight features of a row are loaded once), folded to four, then the remaining
/// four features, then the last one to three into the first lanes.
#[allow(clippy::inline_always)] // inlined into each target's compilation of its caller
#[inline(always)]
#[allow(clippy::needless_range_loop)] // constant counts, indexed so that they unroll
fn quads<const T: usize, const R: usize>(
    rows: &[&[f32]; R],
    w: &[&[f32]; T],
    width: usize,
) -> [[f32; 4]; 12] {
    let mut acc = [[[0.0f32; 8]; T]; R];
    let eights = width / 8;
    for c in 0..eights {
        let lanes: [[f32; 8]; T] = std::array::from_fn(|t| {
            let mut v = [0.0; 8];
            v.copy_from_slice(&w[t][8 * c..8 * c + 8]);
            v
        });
        for r in 0..R {
            let mut xs = [0.0f32; 8];
            xs.copy_from_slice(&rows[r][8 * c..8 * c + 8]);
            for t in 0..T {
                for j in 0..8 {
                    acc[r][t][j] = xs[j].mul_add(lanes[t][j], acc[r][t][j]);
                }
            }
        }
    }
    let mut out = [[0.0f32; 4]; 12];
    let start = 8 * eights;
    for r in 0..R {
        for t in 0..T {
            let a = &acc[r][t];
            let mut q = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
            let (xr, wr) = (&rows[r][start..], &w[t][start..]);
            let (qa, qb) = (xr.chunks_exact(4), wr.chunks_exact(4));
            let (ta, tb) = (qa.remainder(), qb.remainder());
            for (xq, wq) in qa.zip(qb) {
                for j in 0..4 {
                    q[j] = xq[j].mul_add(wq[j], q[j]);
                }
            }
            for (qj, (xv, wv)) in q.iter_mut().zip(ta.iter().zip(tb)) {
                *qj = xv.mul_add(*wv, *qj);
            }
            out[r * T + t] = q;
        }
    }
    out
}

/// The lane sums of four sums of [`quads`], `(q[0] + q[2]) + (q[1] + q[3])` each, computed
/// across the four at once.
#[allow(clippy::inline_always)] // inlined into each target's compilation of its caller
#[inline(always)]
fn reduce4(q: [[f32; 4]; 4]) -> [f32; 4] {
    let even: [f32; 4] = std::array::from_fn(|i| q[i][0] + q[i][2]);
    let odd: [f32; 4] = std::array::from_fn(|i| q[i][1] + q[i][3]);
    std::array::from_fn(|i| even[i] + odd[i])
}

/// From how many rows and targets [`affine`] packs its operands for a matrix product:
/// below, packing costs more than it saves (on the corpus's shapes, 1,024 rows of 20
/// features against 1–3 targets, the dot loop took half the product's time or less;
/// the two meet at about 8 targets).
const GEMM_ROWS: usize = 16;
const GEMM_TARGETS: usize = 8;

/// Every row of `x` (`width` wide) against every weight row, plus the target's bias,
/// into `out`, row by row.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn dot_rows(
    x: &[f32],
    width: usize,
    weights: &[f32],
    targets: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let width = width.max(1);
    if targets == 1 {
        // One target (a regressor, a binary classifier): no loop over targets per row,
        // a third less time on 1,024 rows of 20 features.
        let (w, b) = (
            &weights[..width.min(weights.len())],
            bias.and_then(|b| b.first()).copied().unwrap_or(0.0),
        );
        for (row, o) in x.chunks_exact(width).zip(out.iter_mut()) {
            *o = dot(row, w) + b;
        }
        return;
    }
    let rows = x.chunks_exact(width).zip(out.chunks_exact_mut(targets.max(1)));
    match bias {
        Some(bias) => {
            for (row, out_row) in rows {
                for ((o, w), b) in out_row.iter_mut().zip(weights.chunks_exact(width)).zip(bias) {
                    *o = dot(row, w) + b;
                }
            }
        }
        None => {
            for (row, out_row) in rows {
                for (o, w) in out_row.iter_mut().zip(weights.chunks_exact(width)) {
                    *o = dot(row, w);
                }
            }
        }
    }
}

/// `Σ term(aᵢ, bᵢ)` in eight running sums, then four, then the last few one by one, the
/// lanes added as a tree: it vectorises, and a row's sum takes a few shuffles rather
/// than a chain of eight scalar additions (half the time on short rows of 20 features).
/// Inlined into the functions compiled for each target (AVX2, AVX-512).
#[allow(clippy::inline_always)] // inlined into each target's compilation of its caller
#[inline(always)]
fn sum8(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += term(x[j], y[j]);
        }
    }
    let mut quad = [acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7]];
    let (qa, qb) = (ra.chunks_exact(4), rb.chunks_exact(4));
    let tail: f32 = qa.remainder().iter().zip(qb.remainder()).map(|(&x, &y)| term(x, y)).sum();
    for (x, y) in qa.zip(qb) {
        for j in 0..4 {
            quad[j] += term(x[j], y[j]);
        }
    }
    ((quad[0] + quad[2]) + (quad[1] + quad[3])) + tail
}

/// The dot product of two vectors, by [`sum8`].
#[allow(clippy::inline_always)] // inlined into each target's compilation of its caller
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    sum8(a, b, |x, y| x * y)
}

/// How many support vectors [`rbf_rows`] takes at once: one lane each, in four AVX-512
/// (eight AVX2) registers of running sums, so that four chains of additions overlap.
const LANES: usize = 64;

/// `vectors` (`count` rows of `width`) laid out for [`rbf_rows`]: in blocks of [`LANES`]
/// vectors, feature by feature, each feature's values of the block side by side; the
/// last block padded with zeros.
fn lane_blocks(vectors: &[f32], width: usize, count: usize) -> Vec<f32> {
    let blocks = count.div_ceil(LANES);
    let mut out = vec![0.0; blocks * width * LANES];
    for (v, vector) in vectors.chunks_exact(width.max(1)).take(count).enumerate() {
        let (block, lane) = (v / LANES, v % LANES);
        for (f, &value) in vector.iter().enumerate() {
            out[(block * width + f) * LANES + lane] = value;
        }
    }
    out
}

/// `exp(-gamma · |x - v|²)` for every row of `x` (`width` wide) against each of the
/// `count` vectors laid out by [`lane_blocks`]: a row's feature against [`LANES`]
/// vectors at a time (no sum across lanes), then the exponentials, all in vector
/// registers. Each distance sums its features in order, as ONNX Runtime's loop does.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn rbf_rows(x: &[f32], width: usize, lanes: &[f32], count: usize, gamma: f32) -> Vec<f32> {
    let width = width.max(1);
    let mut out = Vec::with_capacity(x.len() / width * count);
    for row in x.chunks_exact(width) {
        let mut left = count;
        for block in lanes.chunks_exact(width * LANES) {
            let mut acc = [0.0f32; LANES];
            for (&feature, column) in row.iter().zip(block.chunks_exact(LANES)) {
                for (a, &v) in acc.iter_mut().zip(column) {
                    let d = feature - v;
                    *a += d * d;
                }
            }
            let used = left.min(LANES);
            out.extend(acc[..used].iter().map(|&a| -gamma * a));
            left -= used;
        }
    }
    for v in &mut out {
        *v = exp(*v);
    }
    out
}

/// `e^x` so that a loop of it vectorises (libm's `expf` does not): `x = k·ln 2 + r`,
/// Cephes' degree-6 polynomial for `e^r` on |r| ≤ ln 2 / 2, and `2^k` put in the
/// exponent bits; the range checks at the end compile to selects. Within 3·10⁻⁷
/// relative of `expf` over the normal range; 0 below it, `+∞` above; NaN stays NaN.
#[allow(clippy::inline_always)] // inlined into each target's compilation of its caller
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(-87.0, 88.0);
    let power = (clamped * std::f32::consts::LOG2_E + 0.5).floor();
    let rest = clamped - power * LN2_HI - power * LN2_LO;
    let mut poly = 1.987_569_1e-4_f32;
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        poly = poly * rest + c;
    }
    let e_rest = poly * rest * rest + rest + 1.0;
    // `power` is in [-125, 127]: a normal power of two.
    let scale = f32::from_bits(((power as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else if x > 88.0 {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        e_rest * scale
    }
}

fn check_features(columns: usize, features: usize) -> TractResult<()> {
    if columns != features {
        bail!("the input has {columns} features, the model takes {features}");
    }
    Ok(())
}

/// LinearClassifier.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearClassifier {
    coefficients: Vec<f32>,
    intercepts: Vec<f32>,
    targets: usize,
    labels: Labels,
    post: Post,
}

impl LinearClassifier {
    /// Scores are `[1 - s, s]` for one score and two labels.
    fn second_class(&self) -> bool {
        self.targets == 1 && self.labels.len() == 2
    }

    fn width(&self) -> usize {
        if self.second_class() { 2 } else { self.targets }
    }
}

impl Kernel for LinearClassifier {
    fn name(&self) -> &'static str {
        "LinearClassifier"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let (x, rows, columns) = as_f32_rows(&inputs[0])?;
        let features = self.coefficients.len() / self.targets;
        check_features(columns, features)?;
        let b = (self.intercepts.len() == self.targets).then_some(self.intercepts.as_slice());
        // The scores are computed in the output tensor itself; a binary model's one
        // score per row becomes two columns afterwards.
        let mut out = Tensor::zero::<f32>(&[rows, self.targets])?;
        let mut view = out.try_as_plain_ram_mut()?;
        let scores = view.as_slice_mut::<f32>()?;
        affine_into(&x, rows, features, &self.coefficients, self.targets, b, scores);
        // The labels straight from the scores, before any post-transform changes them.
        let labels = if self.targets == 1 {
            let two = self.labels.len() == 2;
            self.labels.tensor(scores.iter().map(|&s| {
                let positive = s > 0.0;
                if two { Ok(usize::from(positive)) } else { Err(i64::from(positive)) }
            }))?
        } else {
            self.labels.tensor(scores.chunks_exact(self.targets).map(|row| Ok(first_max(row))))?
        };
        if self.second_class() {
            let pairs: Vec<f32> = scores
                .iter()
                .flat_map(|&s| binary_pair(s, self.post, Second::Complement))
                .collect();
            return Ok(tvec![labels, Tensor::from_shape(&[rows, 2], &pairs)?]);
        } else if self.targets == 1 {
            if self.post == Post::Probit {
                for s in scores.iter_mut() {
                    *s = crate::post::probit(*s);
                }
            }
        } else if self.post != Post::None {
            for row in scores.chunks_mut(self.targets) {
                self.post.apply(row);
            }
        }
        Ok(tvec![labels, out])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![
            self.labels.datum_type().fact(tvec![rows_of(inputs[0])]),
            row_fact(f32::datum_type(), inputs[0], self.width()),
        ])
    }
}

/// The first index of the greatest value (0 when the first is NaN), by selects rather
/// than branches: on scores of rows whose labels vary, a branch per comparison is
/// mispredicted often enough to cost as much as the row's dot products.
fn first_max(row: &[f32]) -> usize {
    let (mut best, mut top) = (0, row.first().copied().unwrap_or(0.0));
    for (j, &v) in row.iter().enumerate().skip(1) {
        let better = v > top;
        best = if better { j } else { best };
        top = if better { v } else { top };
    }
    best
}

/// LinearClassifier.
pub fn linear_classifier(_: &ParsingContext, node: &NodeProto) -> Built {
    let labels = Labels::read(node, "classlabels_ints", "classlabels_strings")?;
    let coefficients = node.get_attr_vec::<f32>("coefficients")?;
    let intercepts = node.get_attr_opt_vec::<f32>("intercepts")?.unwrap_or_default();
    let targets = if intercepts.is_empty() {
        if labels.len() == 2 && coefficients.len() % 2 == 1 { 1 } else { labels.len().max(1) }
    } else {
        intercepts.len()
    };
    node.expect_attr(
        "coefficients",
        !coefficients.is_empty() && coefficients.len() % targets == 0,
        || format!("a multiple of {targets} values, got {}", coefficients.len()),
    )?;
    if targets > 1 {
        node.expect_attr("classlabels", labels.len() == targets, || {
            format!("{targets} labels, one per score")
        })?;
    }
    let kernel = LinearClassifier { coefficients, intercepts, targets, post: post(node)?, labels };
    let outputs = vec![
        Out::new(kernel.labels.datum_type(), Shape::RowsOnly),
        Out::new(f32::datum_type(), Shape::Rows(kernel.width())),
    ];
    expand(kernel, outputs)
}

/// LinearRegressor.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearRegressor {
    coefficients: Vec<f32>,
    intercepts: Vec<f32>,
    targets: usize,
    post: Post,
}

impl Kernel for LinearRegressor {
    fn name(&self) -> &'static str {
        "LinearRegressor"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let (x, rows, columns) = as_f32_rows(&inputs[0])?;
        let features = self.coefficients.len() / self.targets;
        check_features(columns, features)?;
        let b = (self.intercepts.len() == self.targets).then_some(self.intercepts.as_slice());
        let mut out = Tensor::zero::<f32>(&[rows, self.targets])?;
        let mut view = out.try_as_plain_ram_mut()?;
        let y = view.as_slice_mut::<f32>()?;
        affine_into(&x, rows, features, &self.coefficients, self.targets, b, y);
        if self.targets > 1 {
            for row in y.chunks_mut(self.targets) {
                self.post.apply(row);
            }
        } else if self.post == Post::Probit {
            for v in y.iter_mut() {
                *v = crate::post::probit(*v);
            }
        }
        Ok(tvec![out])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![row_fact(f32::datum_type(), inputs[0], self.targets)])
    }
}

/// LinearRegressor.
pub fn linear_regressor(_: &ParsingContext, node: &NodeProto) -> Built {
    let targets: usize = node.get_attr_opt("targets")?.unwrap_or(1);
    node.expect_attr("targets", targets > 0, "at least one target")?;
    let coefficients = node.get_attr_vec::<f32>("coefficients")?;
    node.expect_attr(
        "coefficients",
        !coefficients.is_empty() && coefficients.len() % targets == 0,
        || format!("a multiple of {targets} values, got {}", coefficients.len()),
    )?;
    let intercepts = node.get_attr_opt_vec::<f32>("intercepts")?.unwrap_or_default();
    let kernel = LinearRegressor { coefficients, intercepts, targets, post: post(node)? };
    expand(kernel, vec![Out::new(f32::datum_type(), Shape::Rows(targets))])
}

/// A model's support vectors: as the model lists them, and for the RBF kernel also in
/// [`lane_blocks`].
#[derive(Clone, Debug, PartialEq)]
struct SupportVectors {
    rows: Vec<f32>,
    lanes: Vec<f32>,
    count: usize,
}

impl SupportVectors {
    fn new(rows: Vec<f32>, count: usize, kernel: SvmKernel) -> Self {
        let width = rows.len().checked_div(count).unwrap_or(0);
        let lanes = match kernel {
            SvmKernel::Rbf { .. } if count > 0 => lane_blocks(&rows, width, count),
            _ => Vec::new(),
        };
        Self { rows, lanes, count }
    }
}

/// An SVM kernel function.
#[derive(Clone, Copy, Debug, PartialEq)]
enum SvmKernel {
    Linear,
    Poly { gamma: f32, coef0: f32, degree: f32 },
    Rbf { gamma: f32 },
    Sigmoid { gamma: f32, coef0: f32 },
}

impl SvmKernel {
    fn read(node: &NodeProto) -> TractResult<Self> {
        let params = node.get_attr_opt_vec::<f32>("kernel_params")?.unwrap_or_default();
        let p = |i: usize| params.get(i).copied().unwrap_or(0.0);
        let (gamma, coef0, degree) = (p(0), p(1), p(2));
        Ok(match node.get_attr_opt::<&str>("kernel_type")?.unwrap_or("LINEAR") {
            "LINEAR" => Self::Linear,
            "POLY" => Self::Poly { gamma, coef0, degree },
            "RBF" => Self::Rbf { gamma },
            "SIGMOID" => Self::Sigmoid { gamma, coef0 },
            other => return node.bail(&format!("unknown kernel_type {other:?}")),
        })
    }

    /// [`Self::dot`] against a model's support vectors, with their [`lane_blocks`]
    /// made at load for the RBF kernel.
    fn support_dot(
        self,
        x: &[f32],
        rows: usize,
        width: usize,
        vectors: &SupportVectors,
    ) -> Vec<f32> {
        match self {
            Self::Rbf { gamma } => rbf_rows(x, width, &vectors.lanes, vectors.count, gamma),
            _ => self.dot(x, rows, width, &vectors.rows, vectors.count, 0.0),
        }
    }

    /// `k(x, v)` for every row of `x` against every row of `vectors`, plus `c` for the
    /// linear kernel.
    fn dot(
        self,
        x: &[f32],
        rows: usize,
        width: usize,
        vectors: &[f32],
        count: usize,
        constant: f32,
    ) -> Vec<f32> {
        let linear = || affine(x, rows, width, vectors, count, None).into_iter();
        match self {
            Self::Rbf { gamma } => {
                rbf_rows(x, width, &lane_blocks(vectors, width, count), count, gamma)
            }
            Self::Linear => linear().map(|v| v + constant).collect(),
            Self::Poly { gamma, coef0, degree } => linear()
                .map(|v| {
                    let base = gamma * v + coef0;
                    // Exact small powers, as ONNX Runtime computes them.
                    if (degree - 2.0).abs() < f32::EPSILON {
                        base * base
                    } else if (degree - 3.0).abs() < f32::EPSILON {
                        base * base * base
                    } else {
                        base.powf(degree)
                    }
                })
                .collect(),
            Self::Sigmoid { gamma, coef0 } => {
                linear().map(|v| (gamma * v + coef0).tanh()).collect()
            }
        }
    }
}

/// SVMClassifier: one-vs-one support vector classification (or a linear model when it
/// has no support vectors), with Platt-scaled probabilities when `prob_a`/`prob_b` are
/// given.
#[derive(Clone, Debug, PartialEq)]
pub struct SvmClassifier {
    kernel: SvmKernel,
    labels: Labels,
    vectors_per_class: Vec<usize>,
    support_vectors: SupportVectors,
    coefficients: Vec<f32>,
    rho: Vec<f32>,
    prob_a: Vec<f32>,
    prob_b: Vec<f32>,
    features: usize,
    post: Post,
    all_positive: bool,
}

impl SvmClassifier {
    fn classes(&self) -> usize {
        self.labels.len()
    }

    fn svc(&self) -> bool {
        !self.vectors_per_class.is_empty() && self.vectors_per_class.iter().sum::<usize>() > 0
    }

    fn width(&self) -> usize {
        let c = self.classes();
        match (self.svc(), self.prob_a.is_empty()) {
            (true, true) if c > 2 => c * (c - 1) / 2,
            (true, true) => 2,
            _ => c,
        }
    }

    /// One row's pairwise decision values and votes.
    fn pairwise(&self, kernels: &[f32], starts: &[usize]) -> (Vec<f32>, Vec<usize>) {
        let c = self.classes();
        let vectors: usize = self.vectors_per_class.iter().sum();
        let mut scores = Vec::with_capacity(c * (c - 1) / 2);
        let mut votes = vec![0; c];
        let mut k = 0;
        for i in 0..c {
            for j in i + 1..c {
                let (si, ni) = (starts[i], self.vectors_per_class[i]);
                let (sj, nj) = (starts[j], self.vectors_per_class[j]);
                let mut sum = 0.0f64;
                let row_j = &self.coefficients[vectors * (j - 1)..];
                for m in si..si + ni {
                    sum += f64::from(row_j[m]) * f64::from(kernels[m]);
                }
                let row_i = &self.coefficients[vectors * i..];
                for m in sj..sj + nj {
                    sum += f64::from(row_i[m]) * f64::from(kernels[m]);
                }
                sum += f64::from(self.rho[k]);
                k += 1;
                let s = sum as f32;
                scores.push(s);
                votes[if s > 0.0 { i } else { j }] += 1;
            }
        }
        (scores, votes)
    }

    /// Pairwise probabilities (Platt) coupled into class probabilities.
    fn probabilities(&self, pairwise: &[f32]) -> Vec<f32> {
        let c = self.classes();
        let mut r = vec![0.0; c * c];
        let mut k = 0;
        for i in 0..c {
            for j in i + 1..c {
                let p = (1.0
                    - crate::post::logistic(pairwise[k] * self.prob_a[k] + self.prob_b[k]))
                .clamp(1e-7, 1.0 - 1e-7);
                r[i * c + j] = p;
                r[j * c + i] = 1.0 - p;
                k += 1;
            }
        }
        couple(c, &r)
    }

    /// The label's index: by votes when there are (one-vs-one), else the best score.
    fn label(&self, scores: &[f32], votes: Option<&[usize]>, have_proba: bool) -> usize {
        let (maxclass, max_weight) = votes.map_or_else(
            || {
                let m = first_max(scores);
                (m, scores[m])
            },
            |v| (first_max_usize(v), 0.0),
        );
        if self.classes() != 2 {
            return maxclass;
        }
        // ONNX Runtime's choice for two classes.
        let positive = if self.all_positive { max_weight >= 0.5 } else { max_weight > 0.0 };
        if !have_proba && positive { 1 } else { maxclass }
    }
}

fn first_max_usize(v: &[usize]) -> usize {
    let mut best = 0;
    for (j, &x) in v.iter().enumerate().skip(1) {
        if x > v[best] {
            best = j;
        }
    }
    best
}

/// Class probabilities from pairwise ones (Wu, Lin and Weng's second method, as libsvm
/// and ONNX Runtime compute it).
fn couple(k: usize, r: &[f32]) -> Vec<f32> {
    let mut q = vec![0.0f32; k * k];
    let mut qp = vec![0.0f32; k];
    let mut p = vec![1.0 / k as f32; k];
    let eps = 0.005 / k as f32;
    for i in 0..k {
        for j in 0..i {
            q[i * k + i] += r[j * k + i] * r[j * k + i];
            q[i * k + j] = q[j * k + i];
        }
        for j in i + 1..k {
            q[i * k + i] += r[j * k + i] * r[j * k + i];
            q[i * k + j] = -r[j * k + i] * r[i * k + j];
        }
    }
    for _ in 0..100 {
        let mut pqp = 0.0;
        for i in 0..k {
            qp[i] = (0..k).map(|j| q[i * k + j] * p[j]).sum();
            pqp += p[i] * qp[i];
        }
        let max_error = qp.iter().map(|v| (v - pqp).abs()).fold(0.0, f32::max);
        if max_error < eps {
            break;
        }
        for i in 0..k {
            let diff = (-qp[i] + pqp) / q[i * k + i];
            p[i] += diff;
            pqp = (pqp + diff * (diff * q[i * k + i] + 2.0 * qp[i])) / (1.0 + diff) / (1.0 + diff);
            for j in 0..k {
                qp[j] = (qp[j] + diff * q[i * k + j]) / (1.0 + diff);
                p[j] /= 1.0 + diff;
            }
        }
    }
    p
}

impl Kernel for SvmClassifier {
    fn name(&self) -> &'static str {
        "SVMClassifier"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let (x, rows, columns) = as_f32_rows(&inputs[0])?;
        check_features(columns, self.features)?;
        let c = self.classes();
        let have_proba = !self.prob_a.is_empty();
        let width = self.width();
        let mut z = Vec::with_capacity(rows * width);
        let mut picks = Vec::with_capacity(rows);
        if self.svc() {
            let vectors: usize = self.vectors_per_class.iter().sum();
            let starts: Vec<usize> = self
                .vectors_per_class
                .iter()
                .scan(0, |acc, &n| {
                    let start = *acc;
                    *acc += n;
                    Some(start)
                })
                .collect();
            let kernels = self.kernel.support_dot(&x, rows, columns, &self.support_vectors);
            for k in kernels.chunks(vectors) {
                let (pairwise, votes) = self.pairwise(k, &starts);
                if have_proba {
                    let mut p = self.probabilities(&pairwise);
                    picks.push(Ok(self.label(&p, Some(&votes), true)));
                    self.post.apply(&mut p);
                    z.extend(p);
                } else {
                    picks.push(Ok(self.label(&pairwise, Some(&votes), false)));
                    if c <= 2 {
                        let second = if self.post == Post::None {
                            Second::Negate
                        } else {
                            Second::Complement
                        };
                        z.extend(binary_pair(pairwise[0], self.post, second));
                    } else {
                        let mut row = pairwise;
                        self.post.apply(&mut row);
                        z.extend(row);
                    }
                }
            }
        } else {
            let rho = self.rho.first().copied().unwrap_or(0.0);
            let scores = self.kernel.dot(&x, rows, columns, &self.coefficients, c, rho);
            for row in scores.chunks(c) {
                picks.push(Ok(self.label(row, None, have_proba)));
                let mut row = row.to_vec();
                self.post.apply(&mut row);
                z.extend(row);
            }
        }
        Ok(tvec![self.labels.tensor(picks.into_iter())?, Tensor::from_shape(&[rows, width], &z)?])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![
            self.labels.datum_type().fact(tvec![rows_of(inputs[0])]),
            row_fact(f32::datum_type(), inputs[0], self.width()),
        ])
    }
}

/// SVMClassifier.
pub fn svm_classifier(_: &ParsingContext, node: &NodeProto) -> Built {
    let labels = Labels::read(node, "classlabels_ints", "classlabels_strings")?;
    node.expect(labels.len() >= 2, "at least two class labels")?;
    let vectors_per_class =
        node.get_attr_opt_vec::<usize>("vectors_per_class")?.unwrap_or_default();
    let support_vectors = node.get_attr_opt_vec::<f32>("support_vectors")?.unwrap_or_default();
    let coefficients = node.get_attr_vec::<f32>("coefficients")?;
    let rho = node.get_attr_vec::<f32>("rho")?;
    let prob_a = node.get_attr_opt_vec::<f32>("prob_a")?.unwrap_or_default();
    let prob_b = node.get_attr_opt_vec::<f32>("prob_b")?.unwrap_or_default();
    node.expect(prob_a.len() == prob_b.len(), "prob_a and prob_b of the same length")?;
    let c = labels.len();
    let vectors: usize = vectors_per_class.iter().sum();
    let pairs = c * (c - 1) / 2;
    let features = if vectors > 0 {
        node.expect_attr("vectors_per_class", vectors_per_class.len() == c, "one count per class")?;
        node.expect_attr("support_vectors", support_vectors.len() % vectors == 0, "whole vectors")?;
        node.expect_attr("coefficients", coefficients.len() == (c - 1) * vectors, || {
            format!(
                "{} values ((classes - 1) x vectors), got {}",
                (c - 1) * vectors,
                coefficients.len()
            )
        })?;
        node.expect_attr("rho", rho.len() >= pairs, || {
            format!("{pairs} values, one per pair of classes")
        })?;
        if !prob_a.is_empty() {
            node.expect_attr("prob_a", prob_a.len() >= pairs, || format!("{pairs} values"))?;
        }
        support_vectors.len() / vectors
    } else {
        node.expect_attr("coefficients", coefficients.len() % c == 0, "a multiple of the classes")?;
        node.expect_attr("rho", !rho.is_empty(), "a value")?;
        coefficients.len() / c
    };
    let all_positive = coefficients.iter().all(|&v| v >= 0.0);
    let kernel = if vectors > 0 { SvmKernel::read(node)? } else { SvmKernel::Linear };
    let op = SvmClassifier {
        kernel,
        labels,
        vectors_per_class,
        support_vectors: SupportVectors::new(support_vectors, vectors, kernel),
        coefficients,
        rho,
        prob_a,
        prob_b,
        features,
        post: post(node)?,
        all_positive,
    };
    let outputs = vec![
        Out::new(op.labels.datum_type(), Shape::RowsOnly),
        Out::new(f32::datum_type(), Shape::Rows(op.width())),
    ];
    expand(op, outputs)
}

/// SVMRegressor.
#[derive(Clone, Debug, PartialEq)]
pub struct SvmRegressor {
    kernel: SvmKernel,
    support_vectors: SupportVectors,
    vectors: usize,
    coefficients: Vec<f32>,
    rho: f32,
    one_class: bool,
    features: usize,
}

impl Kernel for SvmRegressor {
    fn name(&self) -> &'static str {
        "SVMRegressor"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let (x, rows, columns) = as_f32_rows(&inputs[0])?;
        check_features(columns, self.features)?;
        let mut y = if self.vectors > 0 {
            let k = self.kernel.support_dot(&x, rows, columns, &self.support_vectors);
            affine(&k, rows, self.vectors, &self.coefficients, 1, Some(&[self.rho]))
        } else {
            self.kernel.dot(&x, rows, columns, &self.coefficients, 1, self.rho)
        };
        if self.one_class {
            for v in &mut y {
                *v = if *v > 0.0 { 1.0 } else { -1.0 };
            }
        }
        Ok(tvec![Tensor::from_shape(&[rows, 1], &y)?])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![row_fact(f32::datum_type(), inputs[0], 1)])
    }
}

/// SVMRegressor.
pub fn svm_regressor(_: &ParsingContext, node: &NodeProto) -> Built {
    let vectors: usize = node.get_attr_opt("n_supports")?.unwrap_or(0);
    let support_vectors = node.get_attr_opt_vec::<f32>("support_vectors")?.unwrap_or_default();
    let coefficients = node.get_attr_vec::<f32>("coefficients")?;
    let rho = node.get_attr_vec::<f32>("rho")?;
    node.expect_attr("rho", !rho.is_empty(), "a value")?;
    let features = if vectors > 0 {
        node.expect_attr("support_vectors", support_vectors.len() % vectors == 0, "whole vectors")?;
        node.expect_attr("coefficients", coefficients.len() == vectors, "one per support vector")?;
        support_vectors.len() / vectors
    } else {
        coefficients.len()
    };
    let kernel = if vectors > 0 { SvmKernel::read(node)? } else { SvmKernel::Linear };
    let op = SvmRegressor {
        kernel,
        support_vectors: SupportVectors::new(support_vectors, vectors, kernel),
        vectors,
        coefficients,
        rho: rho[0],
        one_class: node.get_attr_opt::<i64>("one_class")?.unwrap_or(0) != 0,
        features,
    };
    expand(op, vec![Out::new(f32::datum_type(), Shape::Rows(1))])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coupling_two_classes_gives_the_pairwise_probability() {
        let r = [0.0, 0.8, 0.2, 0.0];
        let p = couple(2, &r);
        assert!((p[0] - 0.8).abs() < 1e-3 && (p[1] - 0.2).abs() < 1e-3, "{p:?}");
        let r3 = [0.0, 0.5, 0.5, 0.5, 0.0, 0.5, 0.5, 0.5, 0.0];
        let p = couple(3, &r3);
        assert!(p.iter().all(|v| (v - 1.0 / 3.0).abs() < 1e-4), "{p:?}");
    }

    /// The matrix product (many rows and targets), the grouped dot loop (up to four
    /// targets) and the row-by-row one (a few more) agree with a plain sum, with and
    /// without a bias, for widths that leave every kind of remainder (none, four, a few,
    /// four and a few), row counts that leave part of a group and a single row.
    #[test]
    fn affine_by_either_path_is_the_plain_sum() {
        let value = |i: usize| ((i * 7919) % 23) as f32 / 7.0 - 1.5;
        for (width, targets) in [
            (13, 3),
            (20, 3),
            (20, 1),
            (8, 2),
            (11, 2),
            (11, 4),
            (4, 1),
            (3, 1),
            (1, 1),
            (6, 5),
            (29, GEMM_TARGETS),
        ] {
            let weights: Vec<f32> = (0..width * targets).map(|i| value(i + 5)).collect();
            let bias: Vec<f32> = (0..targets).map(|j| j as f32 * 0.75 - 1.0).collect();
            for rows in [1, 2, 3, 5, GEMM_ROWS - 1, GEMM_ROWS, 40] {
                let x: Vec<f32> = (0..rows * width).map(value).collect();
                for b in [Some(bias.as_slice()), None] {
                    let got = affine(&x, rows, width, &weights, targets, b);
                    for r in 0..rows {
                        for j in 0..targets {
                            let row = &x[r * width..(r + 1) * width];
                            let w = &weights[j * width..(j + 1) * width];
                            let plain: f32 = row.iter().zip(w).map(|(a, b)| a * b).sum();
                            let want = plain + b.map_or(0.0, |b| b[j]);
                            let g = got[r * targets + j];
                            assert!(
                                (g - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{rows}x{width} against {targets}: {g} {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The first greatest score wins; a NaN never does, and a NaN first score keeps the
    /// first label (as the comparisons of ONNX Runtime's loop give).
    #[test]
    fn first_max_takes_the_first_of_the_greatest() {
        for (row, want) in [
            (vec![1.0, 3.0, 3.0], 1),
            (vec![-1.0, -2.0, -3.0], 0),
            (vec![0.0, 1.0, f32::NAN, 2.0], 3),
            (vec![f32::NAN, 5.0, 6.0], 0),
            (vec![2.0, 2.0], 0),
            (vec![4.0], 0),
        ] {
            assert_eq!(first_max(&row), want, "{row:?}");
        }
    }

    /// A NaN feature makes its row's scores NaN and no other row's, by every path.
    #[test]
    fn a_nan_feature_spoils_only_its_row() {
        for targets in [1, 3, GEMM_TARGETS] {
            let width = 11;
            let weights = vec![0.5; width * targets];
            let mut x = vec![1.0; GEMM_ROWS * 2 * width];
            x[3 * width + 10] = f32::NAN;
            let got = affine(&x, GEMM_ROWS * 2, width, &weights, targets, None);
            for (r, row) in got.chunks(targets).enumerate() {
                assert!(row.iter().all(|v| v.is_nan() == (r == 3)), "row {r}: {row:?}");
            }
        }
    }

    #[test]
    #[allow(clippy::float_cmp)] // exact results at the ends of the range
    fn exp_agrees_with_libm_across_its_range() {
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (exp(x), x.exp());
            assert!(((got - want) / want).abs() < 3e-7, "exp({x}) = {got}, libm {want}");
            x += 0.013;
        }
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    /// The lane-blocked RBF kernel agrees with a plain sum of squared differences for
    /// vector counts below, at and past a block, one row or several, and a NaN feature
    /// spoils only its row.
    #[test]
    fn rbf_by_lanes_is_the_plain_kernel() {
        let value = |i: usize| ((i * 7919) % 23) as f32 / 7.0 - 1.5;
        let (width, gamma) = (7, 0.3);
        for count in [1, 5, LANES, LANES + 3, 2 * LANES + 1] {
            let vectors: Vec<f32> = (0..count * width).map(|i| value(i + 11)).collect();
            for rows in [1, 3] {
                let mut x: Vec<f32> = (0..rows * width).map(value).collect();
                if rows > 1 {
                    x[width + 2] = f32::NAN;
                }
                let got = SvmKernel::Rbf { gamma }.dot(&x, rows, width, &vectors, count, 0.0);
                assert_eq!(got.len(), rows * count);
                for r in 0..rows {
                    for v in 0..count {
                        let row = &x[r * width..(r + 1) * width];
                        let vector = &vectors[v * width..(v + 1) * width];
                        let d: f32 = row.iter().zip(vector).map(|(a, b)| (a - b) * (a - b)).sum();
                        let (g, want) = (got[r * count + v], (-gamma * d).exp());
                        if r == 1 {
                            assert!(g.is_nan(), "row {r} vector {v}: {g}");
                        } else {
                            assert!((g - want).abs() <= 1e-6 * (1.0 + want), "{g} {want}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn kernels() {
        let x = [1.0, 2.0];
        let v = [1.0, 0.0, 0.0, 1.0];
        assert_eq!(SvmKernel::Linear.dot(&x, 1, 2, &v, 2, 0.5), vec![1.5, 2.5]);
        let rbf = SvmKernel::Rbf { gamma: 0.5 }.dot(&x, 1, 2, &v, 2, 0.0);
        assert!(
            (rbf[0] - (-0.5f32 * 4.0).exp()).abs() < 1e-7
                && (rbf[1] - (-0.5f32 * 2.0).exp()).abs() < 1e-7
        );
        let poly =
            SvmKernel::Poly { gamma: 1.0, coef0: 1.0, degree: 2.0 }.dot(&x, 1, 2, &v, 2, 0.0);
        assert_eq!(poly, vec![4.0, 9.0]);
    }
}
