//! The CPU kernel: the head's forward pass, gradient and update in plain loops that the
//! compiler vectorises (eight running sums per dot product).

use std::convert::Infallible;

use super::{
    ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON, Dense, Examples, HeadKernel, Hyperparameters, Objective,
    Optimizer, Sums,
};

/// Trains a head on the CPU, one thread.
#[derive(Debug)]
pub struct CpuKernel<'a> {
    examples: Examples<'a>,
    hp: Hyperparameters,
    /// The weights then the bias: `outputs * inputs + outputs` parameters.
    params: Vec<f32>,
    /// Adam's first and second moments, per parameter.
    m: Vec<f32>,
    v: Vec<f32>,
    grad: Vec<f32>,
    logits: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

impl<'a> CpuKernel<'a> {
    /// A kernel training `start` on `examples`, which must pass [`Examples::check`].
    pub fn new(examples: Examples<'a>, start: &Dense, hp: &Hyperparameters) -> Self {
        let params: Vec<f32> = start.weights.iter().chain(&start.bias).copied().collect();
        let len = params.len();
        Self {
            examples,
            hp: hp.clone(),
            params,
            m: vec![0.0; len],
            v: vec![0.0; len],
            grad: vec![0.0; len],
            logits: vec![0.0; start.outputs],
            inputs: start.inputs,
            outputs: start.outputs,
        }
    }

    fn row(&self, r: u32) -> (&'a [f32], &'a [f32]) {
        let Examples { features, width, targets, objective } = self.examples;
        let per = objective.target_width(self.outputs);
        let r = r as usize;
        (&features[r * width..(r + 1) * width], &targets[r * per..(r + 1) * per])
    }

    /// The logits of `x` into `self.logits`.
    fn forward(&mut self, x: &[f32]) {
        let (weights, bias) = self.params.split_at(self.inputs * self.outputs);
        for ((z, w), b) in self.logits.iter_mut().zip(weights.chunks_exact(self.inputs)).zip(bias) {
            *z = b + dot(w, x);
        }
    }

    fn step(&mut self, batch: &[u32], step: u32) -> f64 {
        self.grad.fill(0.0);
        let mut loss = 0.0;
        let scale = 1.0 / batch.len() as f32;
        for &r in batch {
            let (x, target) = self.row(r);
            self.forward(x);
            // The logits become the loss's gradient with respect to them, over the batch.
            loss += loss_and_gradient(self.examples.objective, &mut self.logits, target);
            let (grad_w, grad_b) = self.grad.split_at_mut(self.inputs * self.outputs);
            for ((g_row, g_b), &d) in
                grad_w.chunks_exact_mut(self.inputs).zip(grad_b.iter_mut()).zip(&self.logits)
            {
                let d = d * scale;
                *g_b += d;
                for (g, x) in g_row.iter_mut().zip(x) {
                    *g += d * x;
                }
            }
        }
        let weights = self.inputs * self.outputs;
        for (g, p) in self.grad[..weights].iter_mut().zip(&self.params) {
            *g += self.hp.l2 * p;
        }
        let lr = self.hp.learning_rate;
        match self.hp.optimizer {
            Optimizer::Sgd => {
                for (p, g) in self.params.iter_mut().zip(&self.grad) {
                    *p -= lr * g;
                }
            }
            Optimizer::Adam => {
                let t = step as i32;
                let (c1, c2) = (1.0 - ADAM_BETA1.powi(t), 1.0 - ADAM_BETA2.powi(t));
                for (((p, g), m), v) in
                    self.params.iter_mut().zip(&self.grad).zip(&mut self.m).zip(&mut self.v)
                {
                    *m = ADAM_BETA1 * *m + (1.0 - ADAM_BETA1) * g;
                    *v = ADAM_BETA2 * *v + (1.0 - ADAM_BETA2) * g * g;
                    *p -= lr * (*m / c1) / ((*v / c2).sqrt() + ADAM_EPSILON);
                }
            }
        }
        loss
    }
}

impl HeadKernel for CpuKernel<'_> {
    type Error = Infallible;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn epoch(&mut self, order: &[u32], first_step: u32) -> Result<f64, Infallible> {
        let mut loss = 0.0;
        for (i, batch) in order.chunks(self.hp.batch_size as usize).enumerate() {
            loss += self.step(batch, first_step + i as u32);
        }
        Ok(loss / order.len().max(1) as f64)
    }

    fn evaluate(&mut self, rows: &[u32]) -> Result<Sums, Infallible> {
        let mut sums = Sums { rows: rows.len() as u64, ..Sums::default() };
        for &r in rows {
            let (x, target) = self.row(r);
            self.forward(x);
            if self.examples.objective == Objective::CrossEntropy
                && argmax(&self.logits) == target[0] as usize
            {
                sums.correct += 1;
            }
            sums.loss += loss_and_gradient(self.examples.objective, &mut self.logits, target);
        }
        Ok(sums)
    }

    fn head(&mut self) -> Result<Dense, Infallible> {
        let (weights, bias) = self.params.split_at(self.inputs * self.outputs);
        Ok(Dense {
            inputs: self.inputs,
            outputs: self.outputs,
            weights: weights.to_vec(),
            bias: bias.to_vec(),
        })
    }
}

/// The row's loss; `z` (the logits) is overwritten with the loss's gradient by them.
/// Cross-entropy: `logsumexp(z) - z[label]`, gradient `softmax(z) - onehot`. Squared
/// error: `mean((z - t)²)`, gradient `2 (z - t) / outputs`.
pub(crate) fn loss_and_gradient(objective: Objective, z: &mut [f32], target: &[f32]) -> f64 {
    match objective {
        Objective::CrossEntropy => {
            let label = target[0] as usize;
            let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let picked = z[label] - max;
            let mut sum = 0.0;
            for v in z.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            let loss = sum.ln() - picked;
            for v in z.iter_mut() {
                *v /= sum;
            }
            z[label] -= 1.0;
            f64::from(loss)
        }
        Objective::MeanSquaredError => {
            let n = z.len() as f32;
            let mut loss = 0.0;
            for (v, t) in z.iter_mut().zip(target) {
                let e = *v - t;
                loss += e * e;
                *v = 2.0 * e / n;
            }
            f64::from(loss / n)
        }
    }
}

/// The index of the largest value (the first, on ties).
pub(crate) fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// A dot product with eight running sums, so the loop vectorises.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_rest.iter().zip(b_rest).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}
