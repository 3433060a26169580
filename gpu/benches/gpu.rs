//! GPU engine benchmark: the GEMM kernel's fp32 rate per tile shape, and MLP and CNN
//! inference throughput at batch 1, 64 and 1024 on the wgpu engine beside tract on the
//! same machine's CPU, with the two engines' answers compared. PyTorch's figures on the
//! same card come from `torch_anchor.py`, run in the same device call (`device.sh`).
//!
//! `cargo bench -p falaj-gpu --bench gpu`; `FALAJ_BENCH_QUICK=1` for small sizes (and a
//! software adapter accepted), to check the program where there is no GPU.

use std::time::{Duration, Instant};

use falaj_common::onnx::{OnnxModel, zoo};
use falaj_common::random::SeededRng;
use falaj_common::tensor::{Tensor, TensorData};
use falaj_gpu::{Gpu, GpuModel, GpuOptions, Tile};

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SeededRng::new(seed);
    (0..len).map(|_| rng.normal(0.0, 1.0) as f32).collect()
}

/// Median seconds of `f`, repeated for about `budget` (at least 3 and at most 200 times)
/// after one warm-up call.
fn median_seconds(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed() < budget && times.len() < 200) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn label(t: Tile) -> String {
    let order = if t.rows_first { "A rows first" } else { "A columns first" };
    let order = if t.prefetch { format!("{order}, prefetch") } else { order.to_owned() };
    format!("{}x{}, {}x{} per invocation, k {}, {order}", t.bm, t.bn, t.tm, t.tn, t.bk)
}

fn gemm(gpu: &Gpu, sizes: &[usize]) {
    // Let the GPU raise its clocks before anything is timed.
    let warm = random(2048 * 2048, 9);
    let _ = gpu.matmul_benchmark(&warm, &warm, (2048, 2048, 2048), Tile::LARGE, 50);
    println!("\nTile the engine chose for large products on this GPU: {}", label(gpu.large_tile()));
    println!(
        "\n| GEMM fp32 (n × n × n) | tile | ms | TFLOP/s | max rel. error (64 entries vs f64) |"
    );
    println!("|---|---|---|---|---|");
    for &n in sizes {
        let (a, b) = (random(n * n, 1), random(n * n, 2));
        let mut rng = SeededRng::new(3);
        let probes: Vec<(usize, usize)> = (0..64).map(|_| (rng.below(n), rng.below(n))).collect();
        for tile in Tile::CANDIDATES {
            let label = label(tile);
            let (c, seconds) = match gpu.matmul_benchmark(&a, &b, (n, n, n), tile, 10) {
                Ok(r) => r,
                Err(e) => {
                    println!("| {n} | {label} | failed: {e} | | |");
                    continue;
                }
            };
            let worst = probes
                .iter()
                .map(|&(i, j)| {
                    let exact: f64 =
                        (0..n).map(|k| f64::from(a[i * n + k]) * f64::from(b[k * n + j])).sum();
                    let scale: f64 = (0..n)
                        .map(|k| (f64::from(a[i * n + k]) * f64::from(b[k * n + j])).abs())
                        .sum();
                    (f64::from(c[i * n + j]) - exact).abs() / scale.max(1e-30)
                })
                .fold(0.0, f64::max);
            let tflops = 2.0 * (n as f64).powi(3) / seconds / 1e12;
            println!("| {n} | {label} | {:.3} | {tflops:.2} | {worst:.1e} |", seconds * 1e3);
        }
    }
}

fn models(gpu: &std::sync::Arc<Gpu>, batches: &[usize], budget: Duration) {
    println!(
        "\n| model | batch | wgpu ms | wgpu rows/s | tract ms | tract rows/s | wgpu / tract | max abs. difference |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mlp_widths = [256, 1024, 1024, 10];
    let cases: [(&str, Vec<u8>, Vec<usize>); 2] = [
        ("MLP 256-1024-1024-10", zoo::mlp(&mlp_widths, 1), vec![256]),
        ("CNN 3x32x32 (zoo::cnn)", zoo::cnn(10, 1), vec![3, 32, 32]),
    ];
    for (name, bytes, row) in cases {
        let engine = GpuModel::load(gpu.clone(), &bytes).expect("the GPU engine loads the model");
        let tract = OnnxModel::load(&bytes).expect("tract loads the model");
        for &batch in batches {
            let shape: Vec<usize> = std::iter::once(batch).chain(row.iter().copied()).collect();
            let x = random(shape.iter().product(), batch as u64);
            let input = || Tensor {
                shape: shape.iter().map(|&d| d as u64).collect(),
                data: TensorData::Fp32(x.clone()),
            };
            let mut gpu_out = Vec::new();
            let wgpu_s = median_seconds(budget, || {
                gpu_out = engine.run(&[(&shape, &x)]).unwrap().swap_remove(0).1;
            });
            let mut cpu_out = Vec::new();
            let tract_s = median_seconds(budget, || {
                let out = tract.run(vec![input()]).unwrap();
                if let TensorData::Fp32(v) = &out[0].data {
                    cpu_out.clone_from(v);
                }
            });
            let diff =
                gpu_out.iter().zip(&cpu_out).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            println!(
                "| {name} | {batch} | {:.3} | {:.0} | {:.3} | {:.0} | {:.2} | {diff:.1e} |",
                wgpu_s * 1e3,
                batch as f64 / wgpu_s,
                tract_s * 1e3,
                batch as f64 / tract_s,
                tract_s / wgpu_s
            );
        }
    }
}

fn main() {
    let quick = std::env::var_os("FALAJ_BENCH_QUICK").is_some();
    let gpu = match Gpu::open(GpuOptions { allow_software: quick }) {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("no GPU to benchmark: {e}");
            std::process::exit(2);
        }
    };
    println!("adapter: {}", gpu.name());
    if quick {
        gemm(&gpu, &[256]);
        models(&gpu, &[1, 8], Duration::from_millis(200));
    } else {
        gemm(&gpu, &[4096, 8192]);
        models(&gpu, &[1, 64, 1024], Duration::from_secs(2));
    }
}
