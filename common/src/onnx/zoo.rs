//! Models with random weights for tests and benchmarks of the inference engines: an MLP
//! of any widths and a small residual CNN over 3 × 32 × 32 images. Seeded: the same seed
//! gives the same model.

use super::write::{Attr, GraphBuilder};
use crate::random::SeededRng;
use crate::tensor::{DataType, Dim};

/// The input's name in these models.
pub const INPUT: &str = "input";
/// The output's name: class probabilities.
pub const OUTPUT: &str = "probabilities";

fn batch() -> Dim {
    Dim::Symbol("N".into())
}

/// He-initialised weights for a layer with `fan_in` inputs.
fn he(rng: &mut SeededRng, count: usize, fan_in: usize) -> Vec<f32> {
    let std = (2.0 / fan_in as f64).sqrt();
    (0..count).map(|_| rng.normal(0.0, std) as f32).collect()
}

fn small(rng: &mut SeededRng, count: usize, std: f64) -> Vec<f32> {
    (0..count).map(|_| rng.normal(0.0, std) as f32).collect()
}

/// An MLP: `widths[0]` inputs, Gemm + Relu between hidden layers, softmax over the last
/// width.
pub fn mlp(widths: &[usize], seed: u64) -> Vec<u8> {
    assert!(widths.len() >= 2, "an MLP needs an input and an output width");
    let mut rng = SeededRng::new(seed);
    let mut g = GraphBuilder::new("random_mlp");
    g.input(INPUT, DataType::Fp32, &[batch(), Dim::Fixed(widths[0] as u64)]);
    let mut current = INPUT.to_owned();
    for (i, pair) in widths.windows(2).enumerate() {
        let (inputs, outputs) = (pair[0], pair[1]);
        let (w, b, out) =
            (format!("dense{i}.weight"), format!("dense{i}.bias"), format!("dense{i}"));
        g.weights(&w, &[outputs, inputs], &he(&mut rng, inputs * outputs, inputs));
        g.weights(&b, &[outputs], &small(&mut rng, outputs, 0.01));
        g.node("Gemm", &[&current, &w, &b], &[&out], vec![Attr::Int("transB", 1)]);
        current = out;
        if i + 2 < widths.len() {
            let relu = format!("relu{i}");
            g.node("Relu", &[&current], &[&relu], vec![]);
            current = relu;
        }
    }
    g.node("Softmax", &[&current], &[OUTPUT], vec![Attr::Int("axis", 1)]);
    g.output(OUTPUT, DataType::Fp32, &[batch(), Dim::Fixed(*widths.last().unwrap_or(&0) as u64)]);
    g.encode("falaj zoo")
}

struct Cnn<'a> {
    g: &'a mut GraphBuilder,
    rng: SeededRng,
    layer: usize,
}

impl Cnn<'_> {
    /// Conv (3 × 3 unless `kernel`) + BatchNormalization + an optional Relu.
    fn conv_bn(&mut self, x: &str, c_in: usize, c_out: usize, groups: usize, relu: bool) -> String {
        let i = self.layer;
        self.layer += 1;
        let (w, conv) = (format!("conv{i}.weight"), format!("conv{i}"));
        let fan_in = c_in / groups * 9;
        self.g.weights(
            &w,
            &[c_out, c_in / groups, 3, 3],
            &he(&mut self.rng, c_out * fan_in, fan_in),
        );
        self.g.node(
            "Conv",
            &[x, &w],
            &[&conv],
            vec![
                Attr::Ints("kernel_shape", vec![3, 3]),
                Attr::Ints("pads", vec![1, 1, 1, 1]),
                Attr::Int("group", groups as i64),
            ],
        );
        let names = ["scale", "bias", "mean", "var"].map(|p| format!("bn{i}.{p}"));
        let values = [
            (0..c_out).map(|_| self.rng.range(0.5, 1.5) as f32).collect::<Vec<_>>(),
            small(&mut self.rng, c_out, 0.1),
            small(&mut self.rng, c_out, 0.1),
            (0..c_out).map(|_| self.rng.range(0.5, 1.5) as f32).collect(),
        ];
        for (name, v) in names.iter().zip(&values) {
            self.g.weights(name, &[c_out], v);
        }
        let bn = format!("bn{i}");
        let inputs = [conv.as_str(), &names[0], &names[1], &names[2], &names[3]];
        self.g.node("BatchNormalization", &inputs, &[&bn], vec![Attr::Float("epsilon", 1e-5)]);
        if !relu {
            return bn;
        }
        let out = format!("relu{i}");
        self.g.node("Relu", &[&bn], &[&out], vec![]);
        out
    }

    fn max_pool(&mut self, x: &str) -> String {
        let out = format!("{x}.pool");
        let attrs = vec![Attr::Ints("kernel_shape", vec![2, 2]), Attr::Ints("strides", vec![2, 2])];
        self.g.node("MaxPool", &[x], &[&out], attrs);
        out
    }
}

/// A small residual CNN for 3 × 32 × 32 images: conv-BN-ReLU stages with max pools, a
/// depthwise (grouped) convolution, a residual Add, global average pooling, a Gemm head
/// and softmax. About 60 MFLOP per image.
pub fn cnn(classes: usize, seed: u64) -> Vec<u8> {
    let mut g = GraphBuilder::new("random_cnn");
    g.input(INPUT, DataType::Fp32, &[batch(), Dim::Fixed(3), Dim::Fixed(32), Dim::Fixed(32)]);
    let mut net = Cnn { g: &mut g, rng: SeededRng::new(seed), layer: 0 };
    let x = net.conv_bn(INPUT, 3, 32, 1, true);
    let x = net.conv_bn(&x, 32, 32, 1, true);
    let x = net.max_pool(&x); // 16 × 16
    let x = net.conv_bn(&x, 32, 64, 1, true);
    // A residual block: depthwise then pointwise-sized 3 × 3, added to its input.
    let y = net.conv_bn(&x, 64, 64, 64, true);
    let y = net.conv_bn(&y, 64, 64, 1, false);
    net.g.node("Add", &[&x, &y], &["residual"], vec![]);
    net.g.node("Relu", &["residual"], &["residual.relu"], vec![]);
    let x = net.max_pool("residual.relu"); // 8 × 8
    let x = net.conv_bn(&x, 64, 128, 1, true);
    let mut rng = net.rng;
    g.node("GlobalAveragePool", &[&x], &["gap"], vec![]);
    g.node("Flatten", &["gap"], &["features"], vec![Attr::Int("axis", 1)]);
    g.weights("head.weight", &[classes, 128], &he(&mut rng, classes * 128, 128));
    g.weights("head.bias", &[classes], &small(&mut rng, classes, 0.01));
    g.node(
        "Gemm",
        &["features", "head.weight", "head.bias"],
        &["logits"],
        vec![Attr::Int("transB", 1)],
    );
    g.node("Softmax", &["logits"], &[OUTPUT], vec![Attr::Int("axis", 1)]);
    g.output(OUTPUT, DataType::Fp32, &[batch(), Dim::Fixed(classes as u64)]);
    g.encode("falaj zoo")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::OnnxModel;
    use crate::tensor::{Tensor, TensorData};

    fn probabilities(model: &[u8], shape: Vec<u64>) -> Vec<f32> {
        let n: u64 = shape.iter().product();
        let x = (0..n).map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0).collect();
        let out = OnnxModel::load(model)
            .unwrap()
            .run(vec![Tensor { shape, data: TensorData::Fp32(x) }])
            .unwrap();
        let TensorData::Fp32(p) = &out[0].data else { panic!("{:?}", out[0]) };
        p.clone()
    }

    #[test]
    fn models_load_in_tract_and_give_distributions() {
        for (model, shape, classes) in
            [(mlp(&[16, 32, 5], 1), vec![4, 16], 5), (cnn(10, 1), vec![2, 3, 32, 32], 10)]
        {
            let p = probabilities(&model, shape);
            for row in p.chunks(classes) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{row:?}");
                // Random weights still separate the classes somewhat: not uniform.
                assert!(row.iter().any(|&v| (v - 1.0 / classes as f32).abs() > 1e-3), "{row:?}");
            }
        }
        assert_eq!(mlp(&[4, 3], 7), mlp(&[4, 3], 7), "seeded");
    }
}
