//! A small, deterministic trainer for multi-layer perceptron classifiers: dense layers
//! with ReLU, softmax cross-entropy, Adam, L2, and early stopping on a held-out split.
//!
//! It trains the sample model; the weights come out in the layout ONNX's `Gemm` with
//! `transB = 1` takes (`[outputs, inputs]`, row-major), with input standardisation folded
//! into the first layer so the model takes raw readings.

use crate::random::SeededRng;

/// A dense layer: `y = W x + b`, `W` stored `[outputs, inputs]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Dense {
    /// Input width.
    pub inputs: usize,
    /// Output width.
    pub outputs: usize,
    /// `outputs * inputs` weights.
    pub weights: Vec<f32>,
    /// `outputs` biases.
    pub bias: Vec<f32>,
}

impl Dense {
    fn init(inputs: usize, outputs: usize, rng: &mut SeededRng) -> Self {
        // He-uniform: keeps ReLU activations' variance steady through depth.
        let limit = (6.0 / inputs as f64).sqrt();
        Self {
            inputs,
            outputs,
            weights: (0..inputs * outputs).map(|_| rng.range(-limit, limit) as f32).collect(),
            bias: vec![0.0; outputs],
        }
    }

    /// `out[b, o] = bias[o] + sum_i x[b, i] * W[o, i]` for a batch of rows.
    fn forward(&self, x: &[f32], out: &mut Vec<f32>) {
        let rows = x.len() / self.inputs;
        out.clear();
        out.reserve(rows * self.outputs);
        for row in x.chunks_exact(self.inputs) {
            for (w, b) in self.weights.chunks_exact(self.inputs).zip(&self.bias) {
                out.push(b + w.iter().zip(row).map(|(w, x)| w * x).sum::<f32>());
            }
        }
    }
}

/// A multi-layer perceptron: dense layers with ReLU between them, logits out.
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp {
    /// The layers, input first.
    pub layers: Vec<Dense>,
}

impl Mlp {
    /// Logits for row-major inputs.
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        let mut acts = x.to_vec();
        let mut next = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            layer.forward(&acts, &mut next);
            if i + 1 < self.layers.len() {
                for v in &mut next {
                    *v = v.max(0.0);
                }
            }
            std::mem::swap(&mut acts, &mut next);
        }
        acts
    }

    /// The arg-max class of each row.
    pub fn predict(&self, x: &[f32]) -> Vec<u32> {
        let classes = self.layers.last().map_or(1, |l| l.outputs);
        self.logits(x).chunks_exact(classes).map(argmax).collect()
    }

    /// Share of rows predicted correctly.
    pub fn accuracy(&self, x: &[f32], labels: &[u32]) -> f64 {
        let predicted = self.predict(x);
        let right = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
        right as f64 / labels.len().max(1) as f64
    }

    /// Folds `x' = (x - mean) / std` into the first layer, so the network takes raw `x`.
    pub fn fold_standardisation(&mut self, mean: &[f32], std: &[f32]) {
        let Some(first) = self.layers.first_mut() else { return };
        for (w, b) in first.weights.chunks_exact_mut(first.inputs).zip(&mut first.bias) {
            for ((w, m), s) in w.iter_mut().zip(mean).zip(std) {
                *w /= s;
                *b -= *w * m;
            }
        }
    }
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best })
        .0 as u32
}

/// Hyperparameters.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Widths of the hidden layers.
    pub hidden: Vec<usize>,
    /// Adam's step size.
    pub learning_rate: f32,
    /// Rows per step.
    pub batch_size: usize,
    /// Most passes over the data.
    pub max_epochs: usize,
    /// Stop after this many epochs without a better validation loss.
    pub patience: usize,
    /// L2 penalty on weights.
    pub l2: f32,
    /// Share of rows held out for early stopping.
    pub validation_fraction: f64,
    /// Seeds initialisation, the split and shuffling.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            hidden: vec![32, 16],
            learning_rate: 0.005,
            batch_size: 64,
            max_epochs: 60,
            patience: 6,
            l2: 1e-4,
            validation_fraction: 0.15,
            seed: 42,
        }
    }
}

/// One epoch's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochStats {
    /// The epoch, from 1.
    pub epoch: usize,
    /// Mean training loss.
    pub train_loss: f64,
    /// Validation loss.
    pub validation_loss: f64,
    /// Validation accuracy.
    pub validation_accuracy: f64,
}

/// What training did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Every epoch run.
    pub epochs: Vec<EpochStats>,
    /// The epoch whose weights were kept.
    pub best_epoch: usize,
}

/// Adam's moment estimates for one parameter vector.
#[derive(Debug, Clone)]
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Moments {
    fn new(len: usize) -> Self {
        Self { m: vec![0.0; len], v: vec![0.0; len] }
    }

    fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32, t: i32) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        let (c1, c2) = (1.0 - B1.powi(t), 1.0 - B2.powi(t));
        for (((p, g), m), v) in params.iter_mut().zip(grads).zip(&mut self.m).zip(&mut self.v) {
            *m = B1 * *m + (1.0 - B1) * g;
            *v = B2 * *v + (1.0 - B2) * g * g;
            *p -= lr * (*m / c1) / ((*v / c2).sqrt() + 1e-8);
        }
    }
}

/// Mean cross-entropy of `logits` against `labels`; with `grad`, also its gradient.
fn cross_entropy(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    grad: Option<&mut Vec<f32>>,
) -> f64 {
    let rows = labels.len();
    let mut loss = 0.0f64;
    let mut g = grad;
    if let Some(g) = g.as_deref_mut() {
        g.clear();
    }
    for (row, &label) in logits.chunks_exact(classes).zip(labels) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
        loss += f64::from(sum.ln() + max - row[label as usize]);
        if let Some(g) = g.as_deref_mut() {
            for (c, v) in row.iter().enumerate() {
                let p = (v - max).exp() / sum;
                let target = if c == label as usize { 1.0 } else { 0.0 };
                g.push((p - target) / rows as f32);
            }
        }
    }
    loss / rows.max(1) as f64
}

/// Per-column mean and standard deviation (1 where a column is constant).
pub fn column_stats(x: &[f32], width: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = (x.len() / width).max(1) as f64;
    let mut mean = vec![0.0f64; width];
    let mut sq = vec![0.0f64; width];
    for row in x.chunks_exact(width) {
        for (i, &v) in row.iter().enumerate() {
            mean[i] += f64::from(v);
            sq[i] += f64::from(v) * f64::from(v);
        }
    }
    let mean: Vec<f64> = mean.iter().map(|s| s / rows).collect();
    let std = sq.iter().zip(&mean).map(|(s, m)| (s / rows - m * m).max(0.0).sqrt());
    let std = std.map(|s| if s > 1e-12 { s as f32 } else { 1.0 }).collect();
    (mean.iter().map(|&m| m as f32).collect(), std)
}

/// Trains a classifier on row-major `x` (`width` columns) and `labels` in `0..classes`.
/// Inputs are standardised for training and the standardisation folded into the result.
pub fn train_classifier(
    x: &[f32],
    width: usize,
    labels: &[u32],
    classes: usize,
    config: &TrainConfig,
) -> (Mlp, TrainReport) {
    let mut rng = SeededRng::new(config.seed);
    let (mean, std) = column_stats(x, width);
    let standard: Vec<f32> = x
        .chunks_exact(width)
        .flat_map(|r| r.iter().zip(&mean).zip(&std).map(|((v, m), s)| (v - m) / s))
        .collect();

    let mut order: Vec<usize> = (0..labels.len()).collect();
    rng.shuffle(&mut order);
    let held = ((labels.len() as f64 * config.validation_fraction) as usize).min(labels.len() / 2);
    let (val_idx, train_idx) = order.split_at(held);
    let gather = |idx: &[usize]| -> (Vec<f32>, Vec<u32>) {
        let xs = idx
            .iter()
            .flat_map(|&i| standard[i * width..(i + 1) * width].iter().copied())
            .collect();
        (xs, idx.iter().map(|&i| labels[i]).collect())
    };
    let (val_x, val_y) = gather(val_idx);
    let mut train_idx = train_idx.to_vec();

    let widths: Vec<usize> =
        std::iter::once(width).chain(config.hidden.iter().copied()).chain([classes]).collect();
    let mut mlp =
        Mlp { layers: widths.windows(2).map(|w| Dense::init(w[0], w[1], &mut rng)).collect() };
    let mut moments: Vec<(Moments, Moments)> = mlp
        .layers
        .iter()
        .map(|l| (Moments::new(l.weights.len()), Moments::new(l.bias.len())))
        .collect();

    let mut best = (f64::INFINITY, mlp.clone(), 0usize);
    let mut epochs = Vec::new();
    let mut step = 0i32;
    for epoch in 1..=config.max_epochs {
        rng.shuffle(&mut train_idx);
        let mut train_loss = 0.0;
        for batch in train_idx.chunks(config.batch_size.max(1)) {
            let (bx, by) = gather(batch);
            step += 1;
            train_loss += train_step(&mut mlp, &mut moments, &bx, &by, classes, config, step)
                * batch.len() as f64;
        }
        train_loss /= train_idx.len().max(1) as f64;
        let validation_loss = cross_entropy(&mlp.logits(&val_x), &val_y, classes, None);
        let validation_accuracy = mlp.accuracy(&val_x, &val_y);
        epochs.push(EpochStats { epoch, train_loss, validation_loss, validation_accuracy });
        if validation_loss < best.0 {
            best = (validation_loss, mlp.clone(), epoch);
        } else if epoch - best.2 >= config.patience {
            break;
        }
    }
    let (_, mut mlp, best_epoch) = best;
    mlp.fold_standardisation(&mean, &std);
    (mlp, TrainReport { epochs, best_epoch })
}

/// One Adam step on a batch; returns the batch's loss.
fn train_step(
    mlp: &mut Mlp,
    moments: &mut [(Moments, Moments)],
    x: &[f32],
    labels: &[u32],
    classes: usize,
    config: &TrainConfig,
    step: i32,
) -> f64 {
    // Forward, keeping every layer's input (post-ReLU activations).
    let mut inputs = vec![x.to_vec()];
    for (i, layer) in mlp.layers.iter().enumerate() {
        let mut out = Vec::new();
        layer.forward(inputs.last().expect("at least the input"), &mut out);
        if i + 1 < mlp.layers.len() {
            for v in &mut out {
                *v = v.max(0.0);
            }
        }
        inputs.push(out);
    }
    let logits = inputs.pop().expect("logits");
    let mut delta = Vec::new();
    let loss = cross_entropy(&logits, labels, classes, Some(&mut delta));

    // Backward, last layer first.
    for (i, layer) in mlp.layers.iter_mut().enumerate().rev() {
        let input = &inputs[i];
        let mut grad_w = vec![0.0f32; layer.weights.len()];
        let mut grad_b = vec![0.0f32; layer.outputs];
        let mut grad_in = vec![0.0f32; input.len()];
        for (d_row, (x_row, gi_row)) in delta
            .chunks_exact(layer.outputs)
            .zip(input.chunks_exact(layer.inputs).zip(grad_in.chunks_exact_mut(layer.inputs)))
        {
            for (o, &d) in d_row.iter().enumerate() {
                grad_b[o] += d;
                let w_row = &layer.weights[o * layer.inputs..(o + 1) * layer.inputs];
                let gw_row = &mut grad_w[o * layer.inputs..(o + 1) * layer.inputs];
                for k in 0..layer.inputs {
                    gw_row[k] += d * x_row[k];
                    gi_row[k] += d * w_row[k];
                }
            }
        }
        for (g, w) in grad_w.iter_mut().zip(&layer.weights) {
            *g += config.l2 * w;
        }
        // ReLU of the layer below: no gradient where its output was clamped at zero.
        for (g, &x) in grad_in.iter_mut().zip(input) {
            if x <= 0.0 {
                *g = 0.0;
            }
        }
        let (mw, mb) = &mut moments[i];
        mw.step(&mut layer.weights, &grad_w, config.learning_rate, step);
        mb.step(&mut layer.bias, &grad_b, config.learning_rate, step);
        delta = grad_in;
    }
    loss
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample::{self, FEATURE_COUNT};

    #[test]
    fn learns_the_sample_task_and_beats_a_linear_model() {
        let mut data = sample::generate(12_000, 11, &[]);
        let test = data.split_off(3_000);
        let config = TrainConfig { max_epochs: 25, ..TrainConfig::default() };
        let (mlp, report) =
            train_classifier(&data.features, FEATURE_COUNT, &data.labels, 3, &config);
        let accuracy = mlp.accuracy(&test.features, &test.labels);
        let linear_config = TrainConfig { hidden: vec![], ..config };
        let (linear, _) =
            train_classifier(&data.features, FEATURE_COUNT, &data.labels, 3, &linear_config);
        let linear_accuracy = linear.accuracy(&test.features, &test.labels);
        let majority = test.labels.iter().filter(|&&l| l == 0).count() as f64 / test.len() as f64;
        assert!(accuracy > 0.85, "accuracy {accuracy}");
        assert!(accuracy > linear_accuracy + 0.01, "mlp {accuracy} vs linear {linear_accuracy}");
        assert!(linear_accuracy > majority, "linear {linear_accuracy} vs majority {majority}");
        assert!(report.best_epoch >= 1 && report.best_epoch <= report.epochs.len());
    }

    #[test]
    fn training_is_deterministic() {
        let data = sample::generate(1_000, 2, &[]);
        let config = TrainConfig { max_epochs: 3, ..TrainConfig::default() };
        let a = train_classifier(&data.features, FEATURE_COUNT, &data.labels, 3, &config);
        let b = train_classifier(&data.features, FEATURE_COUNT, &data.labels, 3, &config);
        assert_eq!(a, b);
    }

    #[test]
    fn folding_standardisation_keeps_predictions() {
        let mut rng = SeededRng::new(4);
        let mut mlp = Mlp { layers: vec![Dense::init(3, 2, &mut rng)] };
        let (mean, std) = (vec![1.0, -2.0, 5.0], vec![2.0, 0.5, 10.0]);
        let raw = [3.0f32, 1.0, -5.0];
        let standard: Vec<f32> =
            raw.iter().zip(&mean).zip(&std).map(|((x, m), s)| (x - m) / s).collect();
        let before = mlp.logits(&standard);
        mlp.fold_standardisation(&mean, &std);
        let after = mlp.logits(&raw);
        for (a, b) in before.iter().zip(&after) {
            assert!((a - b).abs() < 1e-5, "{before:?} vs {after:?}");
        }
    }

    #[test]
    fn cross_entropy_matches_hand_computation() {
        // logits [0, ln 3] -> p = [0.25, 0.75]; label 1 -> loss = -ln 0.75.
        let mut grad = Vec::new();
        let loss = cross_entropy(&[0.0, 3f32.ln()], &[1], 2, Some(&mut grad));
        assert!((loss - -(0.75f64.ln())).abs() < 1e-6, "{loss}");
        assert!((grad[0] - 0.25).abs() < 1e-6 && (grad[1] + 0.25).abs() < 1e-6, "{grad:?}");
    }
}
