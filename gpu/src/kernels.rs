//! WGSL sources for every kernel, specialised by text before compilation (the operation,
//! the fused activation, the GEMM tile), and the cache of compiled pipelines.
//!
//! The GEMM kernel serves MatMul, Gemm and Conv (as an implicit GEMM: the im2col matrix
//! is read in place, never materialised). Its inner loop is generated fully unrolled so
//! the accumulators stay in registers whatever the shader compiler does with loops.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use crate::graph::{Activation, Arith};

const COMMON: &str = include_str!("shaders/common.wgsl");
const ELEMENT_ENTRY: &str = include_str!("shaders/element.wgsl");

/// A kernel and its specialisation: one compiled pipeline each.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    /// Broadcasting arithmetic.
    Arith(ArithKey, ActKey),
    /// An activation alone.
    Unary(ActKey),
    /// Softmax (`true`: log-softmax).
    Softmax(bool),
    /// Index of the maximum.
    ArgMax,
    /// Strided copy.
    Copy,
    /// Pooling.
    Pool,
    /// Batch normalization.
    BatchNorm(ActKey),
    /// A convolution computed directly (few output channels per group).
    ConvDirect(ActKey),
    /// GEMM over strided matrices, or the implicit GEMM of a convolution.
    Gemm(Tile, GemmInput, ActKey),
}

/// [`Arith`] as a hashable key.
pub(crate) type ArithKey = u8;

/// An activation as a hashable key: the WGSL expression.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ActKey(String);

impl ActKey {
    /// The key for an optional fused activation.
    pub(crate) fn new(activation: Option<Activation>) -> Self {
        Self(match activation {
            None => "x".into(),
            Some(Activation::Relu) => "max(x, 0.0)".into(),
            Some(Activation::LeakyRelu(alpha)) => {
                format!("select(x * bitcast<f32>({}u), x, x >= 0.0)", alpha.to_bits())
            }
            Some(Activation::Sigmoid) => "1.0 / (1.0 + exp(-x))".into(),
            // tanh of a large |x| is NaN on some drivers (e^2x overflows); it is ±1 there.
            Some(Activation::Tanh) => "tanh(clamp(x, -20.0, 20.0))".into(),
        })
    }
}

/// The arithmetic operator's key.
pub(crate) fn arith_key(op: Arith) -> ArithKey {
    op as u8
}

/// Where the GEMM's B operand comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum GemmInput {
    /// Strided matrices (MatMul, Gemm).
    Matrices,
    /// A convolution's input, read as its im2col matrix.
    Convolution,
}

/// A GEMM tile: the workgroup computes `bm × bn` outputs stepping `bk` along K, each of its
/// 256 invocations `tm × tn` of them. Which is fastest depends on the GPU: [`Tile::CANDIDATES`]
/// are timed when a GPU opens and the fastest serves large products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tile {
    /// Rows per workgroup.
    pub bm: u32,
    /// Columns per workgroup.
    pub bn: u32,
    /// K step.
    pub bk: u32,
    /// Rows per invocation (a multiple of 4).
    pub tm: u32,
    /// Columns per invocation (a multiple of 4).
    pub tn: u32,
    /// Neighbouring invocations load neighbouring rows of A's tile (stores to workgroup
    /// memory without bank conflicts) rather than neighbouring columns (coalesced reads of
    /// a row-major A).
    pub rows_first: bool,
    /// Load the next tile from memory into registers before computing on this one.
    pub prefetch: bool,
}

impl Tile {
    /// For large products where no timing chose another: 64 × 128 outputs a workgroup,
    /// 4 × 8 an invocation (the fastest of the candidates on an H100, BENCHMARKS.md).
    pub const LARGE: Self =
        Self { bm: 64, bn: 128, bk: 8, tm: 4, tn: 8, rows_first: false, prefetch: false };
    /// 128 × 128 outputs a workgroup, 8 × 8 an invocation.
    const SQUARE: Self =
        Self { bm: 128, bn: 128, bk: 8, tm: 8, tn: 8, rows_first: false, prefetch: false };
    /// For small ones, where large tiles would leave the GPU idle: 64 × 64, 4 × 4.
    pub const SMALL: Self =
        Self { bm: 64, bn: 64, bk: 16, tm: 4, tn: 4, rows_first: false, prefetch: false };
    /// The shapes timed for large products when a GPU opens.
    pub const CANDIDATES: [Self; 8] = [
        Self::LARGE,
        Self { rows_first: true, ..Self::LARGE },
        Self { rows_first: true, prefetch: true, ..Self::LARGE },
        Self { bk: 16, ..Self::LARGE },
        Self::SQUARE,
        Self { rows_first: true, ..Self::SQUARE },
        Self { bk: 16, rows_first: true, prefetch: true, ..Self::SQUARE },
        Self::SMALL,
    ];

    /// Whether the tile's shape is one the generator supports.
    pub fn is_valid(self) -> bool {
        self.tm.is_multiple_of(4)
            && self.tn.is_multiple_of(4)
            && (self.bm / self.tm) * (self.bn / self.tn) == 256
            && (self.bm * self.bk).is_multiple_of(256)
            && (self.bn * self.bk).is_multiple_of(256)
    }
}

fn source(kernel: &Kernel) -> String {
    let (body, act) = match kernel {
        Kernel::Arith(op, act) => {
            let expr = ["x + y", "x - y", "x * y", "x / y"][usize::from(*op)];
            (include_str!("shaders/arith.wgsl").replace("OPERATION", expr), act)
        }
        Kernel::Unary(act) => (include_str!("shaders/unary.wgsl").to_owned(), act),
        Kernel::Softmax(log) => (
            include_str!("shaders/softmax.wgsl")
                .replace("LOG", if *log { "true" } else { "false" }),
            &ActKey::new(None),
        ),
        Kernel::ArgMax => (include_str!("shaders/argmax.wgsl").to_owned(), &ActKey::new(None)),
        Kernel::Copy => (include_str!("shaders/copy.wgsl").to_owned(), &ActKey::new(None)),
        Kernel::Pool => (include_str!("shaders/pool.wgsl").to_owned(), &ActKey::new(None)),
        Kernel::BatchNorm(act) => (include_str!("shaders/batchnorm.wgsl").to_owned(), act),
        Kernel::ConvDirect(act) => (include_str!("shaders/conv_direct.wgsl").to_owned(), act),
        Kernel::Gemm(tile, input, act) => (gemm_source(*tile, *input), act),
    };
    let entry = if matches!(kernel, Kernel::Gemm(..)) { "" } else { ELEMENT_ENTRY };
    format!("{}\n{body}\n{entry}", COMMON.replace("ACTIVATION", &act.0))
}

/// The GEMM parameter block (indices into `p`), shared with the plan builder.
pub(crate) mod gemm_params {
    /// M, N, K.
    pub(crate) const M: usize = 0;
    /// Columns.
    pub(crate) const N: usize = 1;
    /// Depth.
    pub(crate) const K: usize = 2;
    /// Output batch dimensions (4, innermost last).
    pub(crate) const BATCH_DIMS: usize = 3;
    /// A's strides per batch dimension.
    pub(crate) const A_BATCH: usize = 7;
    /// B's strides per batch dimension.
    pub(crate) const B_BATCH: usize = 11;
    /// The bias's strides per batch dimension.
    pub(crate) const C_BATCH: usize = 15;
    /// A's row and depth strides.
    pub(crate) const A_STRIDES: usize = 19;
    /// B's depth and column strides.
    pub(crate) const B_STRIDES: usize = 21;
    /// The bias's row and column strides.
    pub(crate) const C_STRIDES: usize = 23;
    /// 1 when there is a bias.
    pub(crate) const HAS_BIAS: usize = 25;
    /// alpha (f32 bits).
    pub(crate) const ALPHA: usize = 26;
    /// beta (f32 bits).
    pub(crate) const BETA: usize = 27;
    /// Convolution geometry: C_in, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, C_out, ICg, OCg.
    pub(crate) const CONV: usize = 28;
    /// Length of the block.
    pub(crate) const LEN: usize = CONV + 16;
}

const GEMM_MATRICES: &str = r"
fn load_a(z: u32, m: u32, k: u32) -> f32 {
    return a[offsets.x + m * p[19] + k * p[20]];
}
fn load_b(z: u32, k: u32, n: u32) -> f32 {
    return b[offsets.y + k * p[21] + n * p[22]];
}
fn store(z: u32, m: u32, n: u32, v: f32) {
    var r = pf(26u) * v;
    if (p[25] != 0u) {
        r += pf(27u) * c[offsets.z + m * p[23] + n * p[24]];
    }
    out[z * p[0] * p[1] + m * p[1] + n] = act(r);
}
";

// The convolution as a GEMM per group: rows are the group's output channels, columns the
// output positions of every image, depth the group's input channels times the kernel.
const GEMM_CONVOLUTION: &str = r"
fn load_a(z: u32, m: u32, k: u32) -> f32 {
    return a[(z * p[43] + m) * p[2] + k];
}
fn load_b(z: u32, k: u32, n: u32) -> f32 {
    let khw = p[33] * p[34];
    let ic = k / khw;
    let ky = (k % khw) / p[34];
    let kx = k % p[34];
    let ohw = p[31] * p[32];
    let image = n / ohw;
    let oy = (n % ohw) / p[32];
    let ox = n % p[32];
    let iy = i32(oy * p[35] + ky * p[39]) - i32(p[37]);
    let ix = i32(ox * p[36] + kx * p[40]) - i32(p[38]);
    if (iy < 0 || ix < 0 || iy >= i32(p[29]) || ix >= i32(p[30])) {
        return 0.0;
    }
    return b[((image * p[28] + z * p[42] + ic) * p[29] + u32(iy)) * p[30] + u32(ix)];
}
fn store(z: u32, m: u32, n: u32, v: f32) {
    let oc = z * p[43] + m;
    let ohw = p[31] * p[32];
    var r = v;
    if (p[25] != 0u) {
        r += c[oc];
    }
    out[((n / ohw) * p[41] + oc) * ohw + n % ohw] = act(r);
}
";

/// Text of the global loads (into registers `pa`, `pb`) of the tile at K offset `k`.
fn tile_loads(tile: Tile, k: &str) -> String {
    let Tile { bm, bn, bk, .. } = tile;
    let mut t = String::new();
    for i in 0..bm * bk / 256 {
        let (mm, kk) = if tile.rows_first {
            (format!("(lid + {}u) % {bm}u", i * 256), format!("(lid + {}u) / {bm}u", i * 256))
        } else {
            (format!("(lid + {}u) / {bk}u", i * 256), format!("(lid + {}u) % {bk}u", i * 256))
        };
        let _ = writeln!(
            t,
            "        am{i} = {mm}; ak{i} = {kk}; pa{i} = 0.0;\n        if (m0 + am{i} < m_size && {k} + ak{i} < k_size) {{ pa{i} = load_a(z, m0 + am{i}, {k} + ak{i}); }}"
        );
    }
    for i in 0..bn * bk / 256 {
        let _ = writeln!(
            t,
            "        bn{i} = (lid + {o}u) % {bn}u; bk{i} = (lid + {o}u) / {bn}u; pb{i} = 0.0;\n        if (n0 + bn{i} < n_size && {k} + bk{i} < k_size) {{ pb{i} = load_b(z, {k} + bk{i}, n0 + bn{i}); }}",
            o = i * 256
        );
    }
    t
}

/// Text of the stores of the loaded registers into workgroup memory.
fn tile_stores(tile: Tile) -> String {
    let Tile { bm, bn, bk, .. } = tile;
    let mut t = String::new();
    for i in 0..bm * bk / 256 {
        let _ = writeln!(t, "        tile_a[(ak{i} * {bm}u + am{i}) / 4u][am{i} % 4u] = pa{i};");
    }
    for i in 0..bn * bk / 256 {
        let _ = writeln!(t, "        tile_b[(bk{i} * {bn}u + bn{i}) / 4u][bn{i} % 4u] = pb{i};");
    }
    t
}

/// Text of one tile's arithmetic, the step along K unrolled: addresses fold to constants
/// and the workgroup-memory loads can be hoisted.
fn k_step(tile: Tile) -> String {
    let Tile { bm, bn, bk, tm, tn, .. } = tile;
    let (rt, ct, gm, gn) = (bm / tm, bn / tn, tm / 4, tn / 4);
    let mut s = String::new();
    for kk in 0..bk {
        s.push_str("        {\n");
        for g in 0..gm {
            let _ = writeln!(s, "            let a{g} = tile_a[{}u + tr];", kk * bm / 4 + g * rt);
        }
        for g in 0..gn {
            let _ = writeln!(s, "            let b{g} = tile_b[{}u + tc];", kk * bn / 4 + g * ct);
        }
        for g in 0..gm {
            for r in 0..4 {
                for h in 0..gn {
                    let acc = (g * 4 + r) * gn + h;
                    let _ = writeln!(
                        s,
                        "            acc{acc} = fma(vec4<f32>(a{g}[{r}]), b{h}, acc{acc});"
                    );
                }
            }
        }
        s.push_str("        }\n");
    }
    s
}

fn gemm_source(tile: Tile, input: GemmInput) -> String {
    let Tile { bm, bn, bk, tm, tn, .. } = tile;
    let (rt, ct) = (bm / tm, bn / tn); // invocations along rows and columns
    let (gm, gn) = (tm / 4, tn / 4); // vec4 groups per invocation
    let mut s = String::new();
    let _ = write!(
        s,
        r"
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> c: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> tile_a: array<vec4<f32>, {a_len}>;
var<workgroup> tile_b: array<vec4<f32>, {b_len}>;
var<private> offsets: vec3<u32>;
{loads}
@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{
    let z = wid.z;
    var rest = z;
    offsets = vec3<u32>(0u);
    for (var d = 4u; d > 0u; d--) {{
        let size = p[2u + d];
        let i = rest % size;
        rest = rest / size;
        offsets += i * vec3<u32>(p[6u + d], p[10u + d], p[14u + d]);
    }}
    let m_size = p[0];
    let n_size = p[1];
    let k_size = p[2];
    let m0 = wid.y * {bm}u;
    let n0 = wid.x * {bn}u;
    let tr = lid / {ct}u;
    let tc = lid % {ct}u;
",
        a_len = bk * bm / 4,
        b_len = bk * bn / 4,
        loads = match input {
            GemmInput::Matrices => GEMM_MATRICES,
            GemmInput::Convolution => GEMM_CONVOLUTION,
        },
    );
    for i in 0..tm * gn {
        let _ = writeln!(s, "    var acc{i} = vec4<f32>(0.0);");
    }
    let (a_per, b_per) = (bm * bk / 256, bn * bk / 256);
    let load = |k: &str| tile_loads(tile, k);
    let store = tile_stores(tile);
    for i in 0..a_per {
        let _ = writeln!(s, "    var pa{i} = 0.0;\n    var am{i} = 0u;\n    var ak{i} = 0u;");
    }
    for i in 0..b_per {
        let _ = writeln!(s, "    var pb{i} = 0.0;\n    var bn{i} = 0u;\n    var bk{i} = 0u;");
    }
    s.push_str(&load("0u"));
    s.push_str(&store);
    s.push_str("    workgroupBarrier();\n");
    let _ = writeln!(s, "    for (var k0 = 0u; k0 < k_size; k0 += {bk}u) {{");
    // With prefetch, the next tile's global loads are in flight during this tile's
    // arithmetic; without, they follow it.
    if tile.prefetch {
        s.push_str(&load(&format!("k0 + {bk}u")));
    }
    s.push_str(&k_step(tile));
    s.push_str("        workgroupBarrier();\n");
    if !tile.prefetch {
        s.push_str(&load(&format!("k0 + {bk}u")));
    }
    s.push_str(&store);
    s.push_str("        workgroupBarrier();\n    }\n");
    for g in 0..gm {
        for r in 0..4 {
            let _ = writeln!(s, "    let row{g}_{r} = m0 + {}u + tr * 4u + {r}u;", g * rt * 4);
        }
    }
    for h in 0..gn {
        let _ = writeln!(s, "    let col{h} = n0 + {}u + tc * 4u;", h * ct * 4);
    }
    for g in 0..gm {
        for r in 0..4 {
            let _ = writeln!(s, "    if (row{g}_{r} < m_size) {{");
            for h in 0..gn {
                let acc = (g * 4 + r) * gn + h;
                for e in 0..4 {
                    let _ = writeln!(
                        s,
                        "        if (col{h} + {e}u < n_size) {{ store(z, row{g}_{r}, col{h} + {e}u, acc{acc}[{e}]); }}"
                    );
                }
            }
            s.push_str("    }\n");
        }
    }
    s.push_str("}\n");
    s
}

/// Compiled pipelines, one per kernel specialisation, shared by every model on a device.
#[derive(Debug, Default)]
pub(crate) struct Pipelines {
    compiled: Mutex<HashMap<Kernel, Arc<wgpu::ComputePipeline>>>,
}

impl Pipelines {
    /// The pipeline for `kernel`, compiled on first use.
    pub(crate) fn get(&self, device: &wgpu::Device, kernel: &Kernel) -> Arc<wgpu::ComputePipeline> {
        let mut compiled = self.compiled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = compiled.get(kernel) {
            return p.clone();
        }
        let label = format!("{kernel:?}");
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&label),
            source: wgpu::ShaderSource::Wgsl(source(kernel).into()),
        });
        let pipeline = Arc::new(device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            cache: None,
        }));
        compiled.insert(kernel.clone(), pipeline.clone());
        pipeline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every specialisation must be valid WGSL; naga checks it without a device.
    #[test]
    fn every_kernel_source_parses_and_validates() {
        let acts = [
            None,
            Some(Activation::Relu),
            Some(Activation::LeakyRelu(0.1)),
            Some(Activation::Sigmoid),
            Some(Activation::Tanh),
        ];
        let mut kernels = vec![
            Kernel::Softmax(false),
            Kernel::Softmax(true),
            Kernel::ArgMax,
            Kernel::Copy,
            Kernel::Pool,
        ];
        for act in acts {
            let key = ActKey::new(act);
            kernels.push(Kernel::Unary(key.clone()));
            kernels.push(Kernel::BatchNorm(key.clone()));
            kernels.push(Kernel::ConvDirect(key.clone()));
            for op in [Arith::Add, Arith::Sub, Arith::Mul, Arith::Div] {
                kernels.push(Kernel::Arith(arith_key(op), key.clone()));
            }
            for tile in Tile::CANDIDATES {
                for input in [GemmInput::Matrices, GemmInput::Convolution] {
                    kernels.push(Kernel::Gemm(tile, input, key.clone()));
                }
            }
        }
        for kernel in kernels {
            let src = source(&kernel);
            let module = naga::front::wgsl::parse_str(&src)
                .unwrap_or_else(|e| panic!("{kernel:?}: {}", e.emit_to_string(&src)));
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::empty(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("{kernel:?}: {e:?}"));
        }
    }

    #[test]
    fn tiles_cover_256_invocations() {
        assert!(Tile::CANDIDATES.iter().all(|t| t.is_valid()));
        assert!(!Tile { bm: 64, bn: 64, tm: 8, tn: 8, ..Tile::SMALL }.is_valid());
    }
}
