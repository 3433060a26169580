//! The layered model of the transfer tests: `[N, 256]` → Gemm (the body) → Relu → Gemm
//! (the head, 10 outputs), so that a new version with a new head changes only the last
//! part of the file. Shared by the in-process fleet and `tests/external`'s replica kills.

use falaj_common::onnx::{Attr, GraphBuilder};
use falaj_common::tensor::{DataType, Dim};

/// The model `name` as ONNX bytes: body weights `w1` (`hidden × 256`), head weights `w2`
/// (`10 × hidden`), zero biases; input `sensors`, output `logits`.
pub fn layered_graph(name: &str, w1: &[f32], w2: &[f32]) -> Vec<u8> {
    let hidden = w1.len() / 256;
    let n = || Dim::Symbol("N".into());
    let mut g = GraphBuilder::new(name);
    g.input("sensors", DataType::Fp32, &[n(), Dim::Fixed(256)])
        .weights("w1", &[hidden, 256], w1)
        .weights("b1", &[hidden], &vec![0.0; hidden])
        .node("Gemm", &["sensors", "w1", "b1"], &["h"], vec![Attr::Int("transB", 1)])
        .node("Relu", &["h"], &["r"], vec![])
        .weights("w2", &[10, hidden], w2)
        .weights("b2", &[10], &[0.0; 10])
        .node("Gemm", &["r", "w2", "b2"], &["logits"], vec![Attr::Int("transB", 1)])
        .output("logits", DataType::Fp32, &[n(), Dim::Fixed(10)]);
    g.encode("test")
}
