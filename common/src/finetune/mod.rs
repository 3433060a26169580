//! Fine-tuning a model's head on site data: the frozen backbone's features in, a dense layer
//! (`y = W x + b`) trained by mini-batch SGD or Adam against cross-entropy (classifiers) or
//! mean squared error (regressors), with L2 on the weights and early stopping on a held-out
//! split, all seeded; then the gate that decides whether the result replaces its parent.
//!
//! The loop ([`fit`]: the split, the shuffles, evaluation, early stopping) is here once;
//! the arithmetic of an epoch sits behind [`HeadKernel`], implemented on the CPU
//! ([`CpuKernel`]) and on GPUs by `falaj-gpu`, so both train exactly the same way.

use serde::{Deserialize, Serialize};

use crate::keys::Sha256;
use crate::random::SeededRng;

mod cpu;
mod job;

/// The head: a dense layer `y = W x + b`, `W` as `[outputs, inputs]`, as the trainer of
/// the sample model has it.
pub use crate::train::Dense;
pub use cpu::CpuKernel;
pub use job::{DataSource, DesiredJob, HeadWeights, Job, JobReport, JobState, TrainEngine};

/// What the head is trained to minimise, which also says what its targets are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// A classifier: softmax cross-entropy; one target per row, the class index.
    CrossEntropy,
    /// A regressor: the mean over outputs of the squared error; one target per output.
    MeanSquaredError,
}

impl Objective {
    /// Targets per row for a head with `outputs` outputs.
    pub fn target_width(self, outputs: usize) -> usize {
        match self {
            Self::CrossEntropy => 1,
            Self::MeanSquaredError => outputs,
        }
    }
}

/// How each step moves the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// Plain stochastic gradient descent.
    Sgd,
    /// Adam (β₁ 0.9, β₂ 0.999, ε 1e-8).
    #[default]
    Adam,
}

/// Adam's constants, shared by every kernel.
pub const ADAM_BETA1: f32 = 0.9;
/// Adam's second-moment decay.
pub const ADAM_BETA2: f32 = 0.999;
/// Adam's denominator guard.
pub const ADAM_EPSILON: f32 = 1e-8;

/// The hyperparameters of a fine-tune; recorded in the result's lineage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Hyperparameters {
    /// SGD or Adam.
    pub optimizer: Optimizer,
    /// The step size.
    pub learning_rate: f32,
    /// Rows per step.
    pub batch_size: u32,
    /// Most passes over the training rows.
    pub max_epochs: u32,
    /// Stop after this many epochs without a lower held-out loss.
    pub patience: u32,
    /// L2 penalty on the weights (not the bias).
    pub l2: f32,
    /// Share of rows held out for early stopping and the gate.
    pub validation_fraction: f64,
    /// Seeds the split and the shuffles.
    pub seed: u64,
}

impl Default for Hyperparameters {
    fn default() -> Self {
        Self {
            optimizer: Optimizer::Adam,
            learning_rate: 0.01,
            batch_size: 64,
            max_epochs: 30,
            patience: 4,
            l2: 1e-4,
            validation_fraction: 0.2,
            seed: 42,
        }
    }
}

impl Hyperparameters {
    /// Checks every value is usable, naming the first that is not.
    pub fn check(&self) -> Result<(), String> {
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(format!("learning_rate must be above 0, not {}", self.learning_rate));
        }
        if !(self.l2.is_finite() && self.l2 >= 0.0) {
            return Err(format!("l2 must be 0 or more, not {}", self.l2));
        }
        if self.batch_size == 0 {
            return Err("batch_size must be at least 1".into());
        }
        if self.max_epochs == 0 {
            return Err("max_epochs must be at least 1".into());
        }
        if self.patience == 0 {
            return Err("patience must be at least 1".into());
        }
        if !(self.validation_fraction > 0.0 && self.validation_fraction < 1.0) {
            return Err(format!(
                "validation_fraction must be between 0 and 1, not {}",
                self.validation_fraction
            ));
        }
        Ok(())
    }
}

/// Training rows: the backbone's features and the targets, row-major.
#[derive(Debug, Clone, Copy)]
pub struct Examples<'a> {
    /// `rows * width` features.
    pub features: &'a [f32],
    /// Features per row: the head's inputs.
    pub width: usize,
    /// `rows * objective.target_width(outputs)` targets.
    pub targets: &'a [f32],
    /// What the targets are.
    pub objective: Objective,
}

impl Examples<'_> {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.features.len() / self.width.max(1)
    }

    /// Checks the examples fit `head` and hold usable numbers, naming the first row that
    /// does not.
    pub fn check(&self, head: &Dense) -> Result<(), String> {
        if self.width != head.inputs {
            return Err(format!(
                "the examples have {} features per row, the head takes {}",
                self.width, head.inputs
            ));
        }
        let rows = self.rows();
        let per_row = self.objective.target_width(head.outputs);
        if self.features.len() != rows * self.width || self.targets.len() != rows * per_row {
            return Err(format!(
                "{} features and {} targets do not make whole rows of {} and {per_row}",
                self.features.len(),
                self.targets.len(),
                self.width
            ));
        }
        if rows < 2 {
            return Err(format!("{rows} rows: at least 2 are needed, one to hold out"));
        }
        if let Some(i) = self.features.iter().position(|v| !v.is_finite()) {
            return Err(format!("row {}: a feature is {}", i / self.width + 1, self.features[i]));
        }
        for (row, targets) in self.targets.chunks_exact(per_row).enumerate() {
            let bad = match self.objective {
                Objective::CrossEntropy => {
                    let t = targets[0];
                    (t.fract() != 0.0 || !(0.0..head.outputs as f32).contains(&t))
                        .then(|| format!("label {t} is not a class index below {}", head.outputs))
                }
                Objective::MeanSquaredError => targets
                    .iter()
                    .find(|t| !t.is_finite())
                    .map(|t| format!("target {t} is not a finite number")),
            };
            if let Some(bad) = bad {
                return Err(format!("row {}: {bad}", row + 1));
            }
        }
        Ok(())
    }
}

/// Sums over a set of rows: what a kernel's evaluation returns.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sums {
    /// Rows seen.
    pub rows: u64,
    /// Their summed loss (cross-entropy, or mean squared error of each row).
    pub loss: f64,
    /// Rows whose arg-max output is their label (classifiers).
    pub correct: u64,
}

/// A head's held-out figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Mean loss.
    pub loss: f64,
    /// Share of rows classified right (classifiers only; `null` for regressors, never
    /// skipped: lineage also travels as postcard in agents' reports).
    pub accuracy: Option<f64>,
}

impl Metrics {
    /// The metrics of `sums` under `objective`.
    pub fn of(sums: Sums, objective: Objective) -> Self {
        let rows = sums.rows.max(1) as f64;
        Self {
            loss: sums.loss / rows,
            accuracy: (objective == Objective::CrossEntropy).then(|| sums.correct as f64 / rows),
        }
    }
}

/// One epoch's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochStats {
    /// The epoch, from 1.
    pub epoch: u32,
    /// Mean training loss over the epoch's steps.
    pub train_loss: f64,
    /// The held-out figures after it.
    pub validation: Metrics,
}

/// The arithmetic of training a head, on some device. A kernel is made with the examples,
/// the starting head and the hyperparameters; [`fit`] drives it.
pub trait HeadKernel {
    /// What can fail on the device.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Where it runs, for lineage and tables: `cpu`, `gpu`.
    fn name(&self) -> &'static str;

    /// One pass over `order` (row indices) in batches of the batch size, each an optimiser
    /// step; the first is step `first_step` (from 1: Adam corrects its moments by it).
    /// Returns the mean training loss of the pass's rows, each taken before its step.
    fn epoch(&mut self, order: &[u32], first_step: u32) -> Result<f64, Self::Error>;

    /// The loss (and correct count) summed over `rows` with the current weights.
    fn evaluate(&mut self, rows: &[u32]) -> Result<Sums, Self::Error>;

    /// The current weights.
    fn head(&mut self) -> Result<Dense, Self::Error>;
}

/// What a fine-tune did.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The head kept: the best epoch's, or the start's if no epoch beat it.
    pub head: Dense,
    /// The starting head on the held-out rows: the parent's figures.
    pub before: Metrics,
    /// The kept head on the held-out rows.
    pub after: Metrics,
    /// Every epoch run.
    pub epochs: Vec<EpochStats>,
    /// The epoch kept (0: the start).
    pub best_epoch: u32,
    /// Rows trained on.
    pub train_rows: u64,
    /// Rows held out.
    pub held_out_rows: u64,
}

/// Splits `rows` into (held-out, training) row indices, reproducibly from the seed: the
/// first draw of the seeded generator, so a kernel and the loop always agree on it.
pub fn split(rows: usize, hp: &Hyperparameters, rng: &mut SeededRng) -> (Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..rows as u32).collect();
    rng.shuffle(&mut order);
    let held = ((rows as f64 * hp.validation_fraction).round() as usize).clamp(1, rows - 1);
    let train = order.split_off(held);
    (order, train)
}

/// Trains through `kernel` on `rows` examples: a held-out split, then epochs of shuffled
/// mini-batches until `max_epochs` or `patience` epochs without a lower held-out loss.
/// `progress` sees each epoch as it ends. Deterministic for a seed on a given kernel.
pub fn fit<K: HeadKernel>(
    kernel: &mut K,
    rows: usize,
    objective: Objective,
    hp: &Hyperparameters,
    mut progress: impl FnMut(&EpochStats),
) -> Result<Outcome, K::Error> {
    let mut rng = SeededRng::new(hp.seed);
    let (held_out, mut training) = split(rows, hp, &mut rng);
    let before = Metrics::of(kernel.evaluate(&held_out)?, objective);
    let mut best = (before, kernel.head()?, 0);
    let mut epochs = Vec::new();
    let steps_per_epoch = training.len().div_ceil(hp.batch_size as usize) as u32;
    for epoch in 1..=hp.max_epochs {
        rng.shuffle(&mut training);
        let train_loss = kernel.epoch(&training, (epoch - 1) * steps_per_epoch + 1)?;
        let validation = Metrics::of(kernel.evaluate(&held_out)?, objective);
        let stats = EpochStats { epoch, train_loss, validation };
        progress(&stats);
        epochs.push(stats);
        if validation.loss < best.0.loss {
            best = (validation, kernel.head()?, epoch);
        } else if epoch - best.2 >= hp.patience {
            break;
        }
    }
    let (after, head, best_epoch) = best;
    Ok(Outcome {
        head,
        before,
        after,
        epochs,
        best_epoch,
        train_rows: training.len() as u64,
        held_out_rows: held_out.len() as u64,
    })
}

/// When a fine-tuned head replaces its parent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Gate {
    /// The least improvement on the held-out rows: accuracy points (0.01 = one point) for
    /// classifiers, the share by which the mean squared error falls for regressors.
    pub min_improvement: f64,
}

impl Default for Gate {
    fn default() -> Self {
        Self { min_improvement: 0.01 }
    }
}

/// The gate's decision, kept in the lineage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateDecision {
    /// Whether the fine-tuned head replaces its parent.
    pub activate: bool,
    /// The improvement measured (as [`Gate::min_improvement`] counts it).
    pub improvement: f64,
    /// The improvement required.
    pub required: f64,
    /// Why, in words.
    pub reason: String,
}

impl Gate {
    /// Compares the held-out figures before and after.
    pub fn judge(&self, before: &Metrics, after: &Metrics) -> GateDecision {
        let (improvement, what) = match (before.accuracy, after.accuracy) {
            (Some(b), Some(a)) => (a - b, format!("held-out accuracy {b:.4} -> {a:.4}")),
            _ => (
                if before.loss > 0.0 { (before.loss - after.loss) / before.loss } else { 0.0 },
                format!("held-out mean squared error {:.6} -> {:.6}", before.loss, after.loss),
            ),
        };
        let activate = improvement >= self.min_improvement && improvement > 0.0;
        let reason = if activate {
            format!(
                "{what}: improved by {improvement:.4}, at least {} required",
                self.min_improvement
            )
        } else {
            format!(
                "{what}: improved by {improvement:.4}, less than the {} required; the parent stays",
                self.min_improvement
            )
        };
        GateDecision { activate, improvement, required: self.min_improvement, reason }
    }
}

/// Where a derived model came from, recorded in its manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    /// The parent model's name.
    pub parent: String,
    /// The parent's version.
    pub parent_version: u64,
    /// SHA-256 of the parent bundle's manifest (its identity).
    pub parent_manifest_sha256: Sha256,
    /// SHA-256 of the training data as read (features and targets, in order).
    pub data_sha256: Sha256,
    /// Rows trained on.
    pub train_rows: u64,
    /// Rows held out.
    pub held_out_rows: u64,
    /// The loss trained against.
    pub objective: Objective,
    /// The hyperparameters.
    pub hyperparameters: Hyperparameters,
    /// Where it trained: `cpu` or `gpu`.
    pub engine: String,
    /// The parent's held-out figures.
    pub before: Metrics,
    /// The derived model's held-out figures.
    pub after: Metrics,
    /// The epoch kept.
    pub best_epoch: u32,
    /// Every epoch: the loss curve.
    pub epochs: Vec<EpochStats>,
    /// The gate's decision.
    pub gate: GateDecision,
}

/// A hash of training data: the features then the targets, as little-endian f32.
pub fn data_hash(examples: &Examples<'_>) -> Sha256 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for values in [examples.features, examples.targets] {
        for chunk in values.chunks(16 * 1024) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            ctx.update(&bytes);
        }
    }
    Sha256::from_digest(&ctx.finish())
}

#[cfg(test)]
mod tests;
