//! The GPU head trainer against the CPU one: the same examples, start and hyperparameters
//! through `fit` on each, for both objectives and both optimisers, must end with the same
//! weights and the same loss curve up to float32 summation order; and `evaluate` on a tiny
//! head gives the sums worked out by hand.

use crate::support;

use falaj_common::finetune::{
    CpuKernel, Dense, Examples, HeadKernel, Hyperparameters, Objective, Optimizer, Outcome, Sums,
    fit,
};
use falaj_common::random::SeededRng;
use falaj_gpu::{GpuError, GpuHeadKernel};
use support::open_gpu;

/// Rows whose targets a random linear teacher gives (its arg-max for classifiers, its
/// outputs plus noise for regressors), and a random start that is far from it.
fn task(
    rows: usize,
    inputs: usize,
    outputs: usize,
    objective: Objective,
    seed: u64,
) -> (Vec<f32>, Vec<f32>, Dense) {
    let mut rng = SeededRng::new(seed);
    let mut normal = |std: f64| rng.normal(0.0, std) as f32;
    let teacher: Vec<f32> = (0..inputs * outputs).map(|_| normal(1.0)).collect();
    let features: Vec<f32> = (0..rows * inputs).map(|_| normal(1.0)).collect();
    let mut targets = Vec::new();
    for x in features.chunks_exact(inputs) {
        let z: Vec<f32> = teacher
            .chunks_exact(inputs)
            .map(|w| w.iter().zip(x).map(|(w, x)| w * x).sum())
            .collect();
        match objective {
            Objective::CrossEntropy => {
                let best = (0..outputs).fold(0, |b, o| if z[o] > z[b] { o } else { b });
                targets.push(best as f32);
            }
            Objective::MeanSquaredError => targets.extend(z.iter().map(|z| z + normal(0.1))),
        }
    }
    let start = Dense {
        inputs,
        outputs,
        weights: (0..inputs * outputs).map(|_| normal(0.3)).collect(),
        bias: (0..outputs).map(|_| normal(0.3)).collect(),
    };
    (features, targets, start)
}

/// The largest of `|a - b| / (1e-4 + 1e-3 |a|)`: at most 1 when every pair is within the
/// tolerance.
fn worst(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold((0f32, 0f32), |(ratio, abs), (a, b)| {
        let d = (a - b).abs();
        (ratio.max(d / (1e-4 + 1e-3 * a.abs())), abs.max(d))
    })
}

fn close(a: f64, b: f64, relative: f64) -> bool {
    (a - b).abs() <= relative * a.abs().max(1e-6)
}

/// One objective and optimiser: `fit` on both kernels, then every figure compared.
fn check_parity(objective: Objective, optimizer: Optimizer, batch_size: u32, learning_rate: f32) {
    let Some(gpu) = open_gpu() else { return };
    let (inputs, outputs, rows) = (24, 5, 1_000);
    let (features, targets, start) = task(rows, inputs, outputs, objective, 11);
    let examples = Examples { features: &features, width: inputs, targets: &targets, objective };
    let hp = Hyperparameters {
        optimizer,
        learning_rate,
        batch_size,
        max_epochs: 6,
        patience: 6,
        l2: 1e-3,
        validation_fraction: 0.2,
        seed: 7,
    };
    let what = format!("{objective:?}, {optimizer:?}, batch {batch_size}");
    // 800 training rows: a short last batch unless the batch size divides 800.
    let mut cpu = CpuKernel::new(examples, &start, &hp);
    let want: Outcome = fit(&mut cpu, rows, objective, &hp, |_| ()).unwrap();
    let mut kernel = GpuHeadKernel::new(gpu, examples, &start, &hp).unwrap();
    assert_eq!(kernel.name(), "gpu");
    let got: Outcome = fit(&mut kernel, rows, objective, &hp, |_| ()).unwrap();

    assert_eq!((got.train_rows, got.held_out_rows), (800, 200), "{what}");
    assert_eq!(got.epochs.len(), want.epochs.len(), "{what}: epochs run");
    assert!(
        want.epochs.last().unwrap().train_loss < want.epochs[0].train_loss * 0.9,
        "{what}: the CPU run should learn something for the comparison to mean anything"
    );
    // The kernels' current weights (the last epoch's), then the head each kept.
    let (cpu_head, gpu_head) = (cpu.head().unwrap(), kernel.head().unwrap());
    let (ratio_w, abs_w) = worst(&cpu_head.weights, &gpu_head.weights);
    let (ratio_b, abs_b) = worst(&cpu_head.bias, &gpu_head.bias);
    eprintln!(
        "{what}: largest weight difference {abs_w:.2e}, bias {abs_b:.2e} \
         (share of the tolerance used: {:.1e})",
        ratio_w.max(ratio_b)
    );
    assert!(ratio_w <= 1.0 && ratio_b <= 1.0, "{what}: weights {abs_w:e}, bias {abs_b:e}");
    assert_eq!(got.best_epoch, want.best_epoch, "{what}");
    let (ratio, _) = worst(&want.head.weights, &got.head.weights);
    assert!(ratio <= 1.0, "{what}: the kept heads differ");

    let close_metrics = |a: &falaj_common::finetune::Metrics,
                         b: &falaj_common::finetune::Metrics| {
        close(a.loss, b.loss, 1e-4)
            && match (a.accuracy, b.accuracy) {
                // At most one held-out row classified differently (a logit near a tie).
                (Some(a), Some(b)) => (a - b).abs() * 200.0 <= 1.0 + 1e-9,
                (a, b) => a == b,
            }
    };
    assert!(close_metrics(&want.before, &got.before), "{what}: {:?} {:?}", want.before, got.before);
    assert!(close_metrics(&want.after, &got.after), "{what}: {:?} {:?}", want.after, got.after);
    let mut worst_loss = 0f64;
    for (w, g) in want.epochs.iter().zip(&got.epochs) {
        assert_eq!(w.epoch, g.epoch);
        worst_loss = worst_loss.max((w.train_loss - g.train_loss).abs() / w.train_loss);
        assert!(close(w.train_loss, g.train_loss, 1e-4), "{what}: epoch {} {w:?} {g:?}", w.epoch);
        assert!(
            close_metrics(&w.validation, &g.validation),
            "{what}: epoch {} {w:?} {g:?}",
            w.epoch
        );
    }
    eprintln!("{what}: largest relative train-loss difference {worst_loss:.2e}");
}

pub fn cross_entropy_with_adam_matches_the_cpu() {
    check_parity(Objective::CrossEntropy, Optimizer::Adam, 64, 0.01);
}

pub fn cross_entropy_with_sgd_matches_the_cpu() {
    check_parity(Objective::CrossEntropy, Optimizer::Sgd, 50, 0.1);
}

pub fn squared_error_with_adam_matches_the_cpu() {
    check_parity(Objective::MeanSquaredError, Optimizer::Adam, 37, 0.01);
}

pub fn squared_error_with_sgd_matches_the_cpu() {
    check_parity(Objective::MeanSquaredError, Optimizer::Sgd, 128, 0.02);
}

/// More rows than one evaluation dispatch covers (4096), in a shuffled order with repeats.
pub fn evaluation_over_many_chunks_matches_the_cpu() {
    let Some(gpu) = open_gpu() else { return };
    let (features, targets, start) = task(10_000, 16, 7, Objective::CrossEntropy, 3);
    let examples = Examples {
        features: &features,
        width: 16,
        targets: &targets,
        objective: Objective::CrossEntropy,
    };
    let hp = Hyperparameters::default();
    let mut rng = SeededRng::new(4);
    let rows: Vec<u32> = (0..12_345).map(|_| rng.below(10_000) as u32).collect();
    let want = CpuKernel::new(examples, &start, &hp).evaluate(&rows).unwrap();
    let got = GpuHeadKernel::new(gpu, examples, &start, &hp).unwrap().evaluate(&rows).unwrap();
    assert_eq!(got.rows, 12_345);
    assert!(close(want.loss, got.loss, 1e-5), "{want:?} {got:?}");
    assert!(want.correct.abs_diff(got.correct) <= 1, "{want:?} {got:?}");
    assert!(got.correct > 1_000 && got.correct < 11_000, "{got:?}");
}

/// A 2-input, 3-class head on three rows, the sums worked out by hand; the second row's
/// logits tie for the top, and the first of them is not its label.
pub fn evaluation_of_a_tiny_head_gives_the_hand_computed_sums() {
    let Some(gpu) = open_gpu() else { return };
    let head = Dense {
        inputs: 2,
        outputs: 3,
        weights: vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0],
        bias: vec![0.0, 0.0, -1.0],
    };
    let features = [0.0, 0.0, 1.0, 1.0, 3.0, -1.0];
    let targets = [0.0, 2.0, 0.0];
    // Logits: [0, 0, -1], [1, 1, 1] and [3, -1, 1].
    let e = std::f64::consts::E;
    let losses = [(2.0 + 1.0 / e).ln(), (3.0 * e).ln() - 1.0, (e.powi(3) + 1.0 / e + e).ln() - 3.0];
    let examples = Examples {
        features: &features,
        width: 2,
        targets: &targets,
        objective: Objective::CrossEntropy,
    };
    let mut kernel =
        GpuHeadKernel::new(gpu.clone(), examples, &head, &Hyperparameters::default()).unwrap();
    let check = |got: Sums, rows: &[usize], correct: u64| {
        let loss: f64 = rows.iter().map(|&r| losses[r]).sum();
        assert_eq!((got.rows, got.correct), (rows.len() as u64, correct), "{got:?}");
        assert!((got.loss - loss).abs() < 1e-5, "{got:?}, want loss {loss}");
    };
    check(kernel.evaluate(&[0, 1, 2]).unwrap(), &[0, 1, 2], 2);
    check(kernel.evaluate(&[2, 2, 1]).unwrap(), &[2, 2, 1], 2);
    check(kernel.evaluate(&[1]).unwrap(), &[1], 0);
    assert_eq!(kernel.evaluate(&[]).unwrap(), Sums::default());
    assert_eq!(kernel.head().unwrap(), head, "the head reads back as uploaded");

    // Squared error: logits [1.5, 2] against [1, 1], and [0.5, -2] against [0, 0].
    let head =
        Dense { inputs: 2, outputs: 2, weights: vec![1.0, 0.0, 0.0, 2.0], bias: vec![0.5, 0.0] };
    let features = [1.0, 1.0, 0.0, -1.0];
    let targets = [1.0, 1.0, 0.0, 0.0];
    let examples = Examples {
        features: &features,
        width: 2,
        targets: &targets,
        objective: Objective::MeanSquaredError,
    };
    let mut kernel = GpuHeadKernel::new(gpu, examples, &head, &Hyperparameters::default()).unwrap();
    let got = kernel.evaluate(&[0, 1]).unwrap();
    assert_eq!((got.rows, got.correct), (2, 0));
    assert!((got.loss - (0.625 + 2.125)).abs() < 1e-6, "{got:?}");
}

/// One SGD step on one row, worked out by hand: `W -= lr (dz ⊗ x + l2 W)`, `b -= lr dz`.
pub fn one_sgd_step_moves_the_weights_as_worked_out_by_hand() {
    let Some(gpu) = open_gpu() else { return };
    let head =
        Dense { inputs: 2, outputs: 2, weights: vec![1.0, 0.0, 0.0, 2.0], bias: vec![0.5, 0.0] };
    let features = [1.0, 1.0, 0.0, -1.0];
    let targets = [1.0, 1.0, 0.0, 0.0];
    let examples = Examples {
        features: &features,
        width: 2,
        targets: &targets,
        objective: Objective::MeanSquaredError,
    };
    let hp = Hyperparameters {
        optimizer: Optimizer::Sgd,
        learning_rate: 0.1,
        batch_size: 2,
        l2: 0.5,
        ..Hyperparameters::default()
    };
    let mut kernel = GpuHeadKernel::new(gpu, examples, &head, &hp).unwrap();
    let loss = kernel.epoch(&[0, 1], 1).unwrap();
    // The mean of the rows' losses, 0.625 and 2.125.
    assert!((loss - 1.375).abs() < 1e-6, "{loss}");
    // dz = (z - t) per output (2 e / 2 outputs): row 0 [0.5, 1], row 1 [0.5, -2]; the mean
    // over the batch of dz ⊗ x is [[0.25, 0], [0.5, 1.5]] and of dz [0.5, -0.5].
    let gradient = [0.25 + 0.5 * 1.0, 0.0, 0.5, 1.5 + 0.5 * 2.0];
    let got = kernel.head().unwrap();
    for ((w, g), start) in got.weights.iter().zip(gradient).zip(&head.weights) {
        assert!((w - (start - 0.1 * g)).abs() < 1e-6, "{:?}", got.weights);
    }
    assert!((got.bias[0] - 0.45).abs() < 1e-6 && (got.bias[1] - 0.05).abs() < 1e-6, "{got:?}");
}

pub fn bad_input_is_an_error_not_a_panic() {
    let Some(gpu) = open_gpu() else { return };
    let head = Dense { inputs: 2, outputs: 2, weights: vec![1.0; 4], bias: vec![0.0; 2] };
    let features = [1.0, 1.0, 0.0, -1.0];
    let labels = [1.0, 0.0];
    let examples = Examples {
        features: &features,
        width: 2,
        targets: &labels,
        objective: Objective::CrossEntropy,
    };
    let hp = Hyperparameters::default();
    let short = Dense { weights: vec![1.0; 3], ..head.clone() };
    let err = GpuHeadKernel::new(gpu.clone(), examples, &short, &hp).unwrap_err();
    assert!(matches!(err, GpuError::Input(_)), "{err}");
    let bad_labels = [1.0, 2.0];
    let bad = Examples { targets: &bad_labels, ..examples };
    let err = GpuHeadKernel::new(gpu.clone(), bad, &head, &hp).unwrap_err();
    assert!(err.to_string().contains("row 2"), "{err}");
    let err = GpuHeadKernel::new(
        gpu.clone(),
        examples,
        &head,
        &Hyperparameters { batch_size: 0, ..hp.clone() },
    )
    .unwrap_err();
    assert!(err.to_string().contains("batch_size"), "{err}");
    let mut kernel = GpuHeadKernel::new(gpu, examples, &head, &hp).unwrap();
    let err = kernel.epoch(&[0, 2], 1).unwrap_err();
    assert!(err.to_string().contains("row index 2"), "{err}");
    let err = kernel.evaluate(&[5]).unwrap_err();
    assert!(matches!(err, GpuError::Input(_)), "{err}");
    assert_eq!(kernel.head().unwrap(), head, "a refused pass leaves the weights alone");
}
