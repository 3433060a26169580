//! Fine-tuning throughput: a 256 → 10 head (cross-entropy, Adam, batch 256) trained on
//! synthetic seeded features by the CPU kernel and by the GPU kernel in the same run, in
//! examples per second; the epochs are timed alone (no held-out evaluation), after the
//! upload, and the last epoch's training losses of the two are printed to show they agree.
//!
//! `cargo bench -p falaj-gpu --bench finetune -- [--rows N] [--epochs E] [--engine cpu|gpu|both]`
//! (or `FALAJ_FINETUNE_ROWS`, `FALAJ_FINETUNE_EPOCHS`); 1,000,000 rows and 3 epochs by
//! default. A software adapter (lavapipe) is accepted and named in the table.

use std::process::ExitCode;
use std::time::Instant;

use falaj_common::finetune::{
    CpuKernel, Dense, Examples, HeadKernel, Hyperparameters, Objective, Optimizer,
};
use falaj_common::random::SeededRng;
use falaj_gpu::{Gpu, GpuHeadKernel, GpuOptions};

const INPUTS: usize = 256;
const OUTPUTS: usize = 10;

struct Args {
    rows: usize,
    epochs: u32,
    cpu: bool,
    gpu: bool,
}

fn parse() -> Result<Args, String> {
    let env = |name: &str| std::env::var(name).ok();
    let mut rows = env("FALAJ_FINETUNE_ROWS").unwrap_or_else(|| "1000000".into());
    let mut epochs = env("FALAJ_FINETUNE_EPOCHS").unwrap_or_else(|| "3".into());
    let mut engine = "both".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--rows" => rows = value()?,
            "--epochs" => epochs = value()?,
            "--engine" => engine = value()?,
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let rows: usize = rows.parse().map_err(|e| format!("rows {rows:?}: {e}"))?;
    let epochs: u32 = epochs.parse().map_err(|e| format!("epochs {epochs:?}: {e}"))?;
    if rows < 2 || epochs == 0 {
        return Err("at least 2 rows and 1 epoch".into());
    }
    let (cpu, gpu) = match engine.as_str() {
        "cpu" => (true, false),
        "gpu" => (false, true),
        "both" => (true, true),
        other => return Err(format!("engine {other:?}: cpu, gpu or both")),
    };
    Ok(Args { rows, epochs, cpu, gpu })
}

/// Features uniform in ±1.7 (about unit variance), labels the arg-max of a random linear
/// teacher, and a random start.
fn data(rows: usize) -> (Vec<f32>, Vec<f32>, Dense) {
    let mut rng = SeededRng::new(1);
    let teacher: Vec<f32> = (0..INPUTS * OUTPUTS).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    let features: Vec<f32> = (0..rows * INPUTS).map(|_| rng.range(-1.7, 1.7) as f32).collect();
    let labels = features
        .chunks_exact(INPUTS)
        .map(|x| {
            let z = teacher.chunks_exact(INPUTS).map(|w| w.iter().zip(x).map(|(w, x)| w * x).sum());
            z.enumerate()
                .fold((0, f32::NEG_INFINITY), |b, (o, z)| if z > b.1 { (o, z) } else { b })
                .0 as f32
        })
        .collect();
    let start = Dense {
        inputs: INPUTS,
        outputs: OUTPUTS,
        weights: (0..INPUTS * OUTPUTS).map(|_| rng.range(-0.05, 0.05) as f32).collect(),
        bias: vec![0.0; OUTPUTS],
    };
    (features, labels, start)
}

/// Seconds per epoch and the last epoch's mean training loss.
fn time<K: HeadKernel>(
    kernel: &mut K,
    rows: usize,
    epochs: u32,
    hp: &Hyperparameters,
) -> Result<(f64, f64), K::Error> {
    let mut order: Vec<u32> = (0..rows as u32).collect();
    let mut rng = SeededRng::new(2);
    let steps = rows.div_ceil(hp.batch_size as usize) as u32;
    let mut loss = 0.0;
    let mut seconds = 0.0;
    for epoch in 0..epochs {
        rng.shuffle(&mut order);
        let start = Instant::now();
        loss = kernel.epoch(&order, epoch * steps + 1)?;
        seconds += start.elapsed().as_secs_f64();
    }
    Ok((seconds / f64::from(epochs), loss))
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("usage: finetune [--rows N] [--epochs E] [--engine cpu|gpu|both]: {e}");
            return ExitCode::from(64);
        }
    };
    let made = Instant::now();
    let (features, labels, start) = data(args.rows);
    eprintln!(
        "{} rows of {INPUTS} features made in {:.1} s",
        args.rows,
        made.elapsed().as_secs_f64()
    );
    let examples = Examples {
        features: &features,
        width: INPUTS,
        targets: &labels,
        objective: Objective::CrossEntropy,
    };
    let hp = Hyperparameters {
        optimizer: Optimizer::Adam,
        learning_rate: 1e-3,
        batch_size: 256,
        max_epochs: args.epochs,
        ..Hyperparameters::default()
    };
    println!(
        "\nHead {INPUTS} → {OUTPUTS}, cross-entropy, Adam, batch {}, {} rows, {} epochs\n",
        hp.batch_size, args.rows, args.epochs
    );
    println!(
        "| engine | adapter | rows | epochs | s/epoch | examples/s | vs CPU | last train loss |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let row = |engine: &str, adapter: &str, (seconds, loss): (f64, f64), cpu: Option<f64>| {
        let ratio = cpu.map_or_else(|| "1.00".to_owned(), |c| format!("{:.2}", c / seconds));
        println!(
            "| {engine} | {adapter} | {} | {} | {seconds:.3} | {:.0} | {ratio} | {loss:.6} |",
            args.rows,
            args.epochs,
            args.rows as f64 / seconds,
        );
    };
    let mut cpu_seconds = None;
    if args.cpu {
        let mut kernel = CpuKernel::new(examples, &start, &hp);
        let Ok(result) = time(&mut kernel, args.rows, args.epochs, &hp);
        row("cpu", "one thread", result, None);
        cpu_seconds = Some(result.0);
    }
    if args.gpu {
        let gpu = match Gpu::open(GpuOptions { allow_software: true }) {
            Ok(gpu) => gpu,
            Err(e) => {
                eprintln!("no GPU to benchmark: {e}");
                return ExitCode::from(2);
            }
        };
        let adapter =
            format!("{}{}", gpu.name(), if gpu.is_software() { " (software)" } else { "" });
        let upload = Instant::now();
        let result = GpuHeadKernel::new(gpu, examples, &start, &hp).and_then(|mut kernel| {
            eprintln!("uploaded in {:.2} s", upload.elapsed().as_secs_f64());
            time(&mut kernel, args.rows, args.epochs, &hp)
        });
        match result {
            Ok(result) => row("gpu", &adapter, result, cpu_seconds),
            Err(e) => {
                eprintln!("the GPU kernel failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
