//! The GPU engine against tract on the same models and inputs: the trained sample
//! classifier and a small residual CNN (BatchNormalization folded, activations fused,
//! a grouped convolution, a residual Add), and dynamic batching.

use crate::support;

use std::sync::Arc;

use falaj_common::onnx::{OnnxModel, mlp_classifier, zoo};
use falaj_common::random::SeededRng;
use falaj_common::sample::{self, FEATURE_COUNT};
use falaj_common::tensor::{Tensor, TensorData};
use falaj_common::train::{TrainConfig, train_classifier};
use falaj_gpu::{BatchConfig, Batcher, GpuModel, Values};
use support::open_gpu;

fn tract(model: &[u8], shape: &[usize], x: &[f32]) -> Vec<Tensor> {
    let input = Tensor {
        shape: shape.iter().map(|&d| d as u64).collect(),
        data: TensorData::Fp32(x.to_vec()),
    };
    OnnxModel::load(model).unwrap().run(vec![input]).unwrap()
}

fn floats(t: &Tensor) -> Vec<f32> {
    match &t.data {
        TensorData::Fp32(v) => v.clone(),
        TensorData::Int64(v) => v.iter().map(|&x| x as f32).collect(),
        other => panic!("{other:?}"),
    }
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "{what}: largest difference {worst}");
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SeededRng::new(seed);
    (0..len).map(|_| rng.normal(0.0, 1.0) as f32).collect()
}

pub fn sample_classifier_agrees_with_tract() {
    let Some(gpu) = open_gpu() else { return };
    let data = sample::generate(2_000, 3, &[]);
    let config = TrainConfig { max_epochs: 5, ..TrainConfig::default() };
    let (mlp, _) = train_classifier(&data.features, FEATURE_COUNT, &data.labels, 3, &config);
    let model = mlp_classifier(&mlp, "sensors", "test");
    let engine = GpuModel::load(gpu, &model).unwrap();
    for rows in [1, 37, 256] {
        let x = &data.features[..rows * FEATURE_COUNT];
        let want = tract(&model, &[rows, FEATURE_COUNT], x);
        let got = engine.run(&[(&[rows, FEATURE_COUNT], x)]).unwrap();
        assert_eq!(got[0].0, [rows, 3]);
        assert_close(&got[0].1, &floats(&want[0]), "probabilities");
        assert_eq!(got[1].0, [rows]);
        assert_eq!(got[1].1, floats(&want[1]), "labels");
    }
}

pub fn residual_cnn_agrees_with_tract() {
    let Some(gpu) = open_gpu() else { return };
    let model = zoo::cnn(10, 5);
    let engine = GpuModel::load(gpu, &model).unwrap();
    // Folding and fusion happened: no BatchNormalization or Relu node is left alone.
    let ops: Vec<String> = engine.graph().nodes.iter().map(|n| format!("{:?}", n.op)).collect();
    assert!(
        ops.iter().all(|op| !op.starts_with("BatchNorm") && !op.starts_with("Activation")),
        "{ops:?}"
    );
    let shape = [3, 3, 32, 32];
    let x = random(shape.iter().product(), 9);
    let got = engine.run(&[(&shape, &x)]).unwrap();
    assert_close(&got[0].1, &floats(&tract(&model, &shape, &x)[0]), "CNN probabilities");
}

/// Batch normalization after a Gemm with alpha, beta and a transposed B is folded into
/// the Gemm's weights and bias; the answers stay tract's.
pub fn batch_norm_folds_into_a_scaled_gemm() {
    use falaj_common::onnx::{Attr, GraphBuilder};
    use falaj_common::tensor::{DataType, Dim};
    let Some(gpu) = open_gpu() else { return };
    let (k, n) = (12, 5);
    let mut g = GraphBuilder::new("gemm_bn");
    g.input("x", DataType::Fp32, &[Dim::Symbol("N".into()), Dim::Fixed(k as u64)]);
    g.weights("w", &[n, k], &random(n * k, 1));
    g.weights("c", &[n], &random(n, 2));
    let positive: Vec<f32> = random(n, 3).iter().map(|v| v.abs() + 0.5).collect();
    g.weights("scale", &[n], &positive);
    g.weights("bias", &[n], &random(n, 4));
    g.weights("mean", &[n], &random(n, 5));
    g.weights("var", &[n], &positive);
    let attrs = vec![Attr::Int("transB", 1), Attr::Float("alpha", 0.5), Attr::Float("beta", 2.0)];
    g.node("Gemm", &["x", "w", "c"], &["y"], attrs);
    g.node("BatchNormalization", &["y", "scale", "bias", "mean", "var"], &["z"], vec![]);
    g.node("Sigmoid", &["z"], &["out"], vec![]);
    g.output("out", DataType::Fp32, &[Dim::Symbol("N".into()), Dim::Fixed(n as u64)]);
    let model = g.encode("test");
    let engine = GpuModel::load(gpu, &model).unwrap();
    let ops: Vec<String> = engine.graph().nodes.iter().map(|n| format!("{:?}", n.op)).collect();
    assert_eq!(ops.len(), 1, "one fused Gemm: {ops:?}");
    let x = random(7 * k, 6);
    let got = engine.run(&[(&[7, k], &x)]).unwrap();
    assert_close(&got[0].1, &floats(&tract(&model, &[7, k], &x)[0]), "Gemm + BN + Sigmoid");
}

pub fn concurrent_requests_run_as_one_batch_with_their_own_answers() {
    let Some(gpu) = open_gpu() else { return };
    let model = zoo::mlp(&[16, 64, 4], 2);
    let engine = Arc::new(GpuModel::load(gpu, &model).unwrap());
    // A long wait and room for exactly the eight requests: the batch closes when the
    // eighth arrives, whatever the threads' timing.
    let config = BatchConfig { wait: std::time::Duration::from_secs(30), max_rows: 8 };
    let batcher =
        Arc::new(Batcher::start(engine, config).unwrap().expect("the MLP has a batch axis"));
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let batcher = batcher.clone();
            std::thread::spawn(move || {
                let x = random(16, 100 + i);
                let out: Vec<Values> = batcher.run(vec![(vec![1, 16], x.clone())]).unwrap();
                (x, out)
            })
        })
        .collect();
    for t in threads {
        let (x, out) = t.join().unwrap();
        assert_eq!(out[0].0, [1, 4]);
        assert_close(&out[0].1, &floats(&tract(&model, &[1, 16], &x)[0]), "batched row");
    }
    assert_eq!(batcher.stats(), (1, 8), "one batch of eight rows");
}

pub fn models_without_a_batch_axis_are_not_batched_and_unknown_operators_are_refused() {
    let Some(gpu) = open_gpu() else { return };
    // A fixed batch of 2: stacking requests would change its shape.
    let mut g = falaj_common::onnx::GraphBuilder::new("fixed");
    let two = falaj_common::tensor::Dim::Fixed(2);
    g.input("x", falaj_common::tensor::DataType::Fp32, &[two.clone(), two.clone()]);
    g.node("Relu", &["x"], &["y"], vec![]);
    g.output("y", falaj_common::tensor::DataType::Fp32, &[two.clone(), two.clone()]);
    let engine = Arc::new(GpuModel::load(gpu.clone(), &g.encode("test")).unwrap());
    assert!(Batcher::start(engine, BatchConfig::default()).unwrap().is_none());

    let mut g = falaj_common::onnx::GraphBuilder::new("erf");
    g.input("x", falaj_common::tensor::DataType::Fp32, std::slice::from_ref(&two));
    g.node("Erf", &["x"], &["y"], vec![]);
    g.output("y", falaj_common::tensor::DataType::Fp32, &[two]);
    let err = GpuModel::load(gpu, &g.encode("test")).unwrap_err();
    assert!(err.to_string().contains("operator Erf"), "{err}");
}
