//! A model's head: the final dense layer (the last Gemm, or a MatMul followed by an Add of
//! a bias) whose result reaches every graph output through only output-shaping operators
//! (Softmax, LogSoftmax, Sigmoid, ArgMax, Identity). Fine-tuning retrains it on site data
//! with the rest of the model frozen: `backbone` is the model cut at the head's input, which
//! computes the features the head is trained on, and `replace` writes the same model with
//! new head weights, every other byte of the graph kept.

use std::collections::HashMap;

use prost::Message;
use thiserror::Error;
use tract_onnx::pb::{
    ModelProto, NodeProto, TensorProto, ValueInfoProto, attribute_proto, tensor_proto,
};

use crate::finetune::Objective;

/// Operators allowed between the head and a graph output.
const AFTER_HEAD: [&str; 5] = ["Softmax", "LogSoftmax", "Sigmoid", "ArgMax", "Identity"];
/// Of those, the ones that make the head a classifier's logits.
const CLASSIFIER: [&str; 3] = ["Softmax", "LogSoftmax", "ArgMax"];

/// The head of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// The tensor the head reads: the frozen backbone's features.
    pub input: String,
    /// The tensor the head writes: the logits (or the regression output).
    pub output: String,
    /// Features in.
    pub inputs: usize,
    /// Logits out.
    pub outputs: usize,
    /// The weights as `[outputs, inputs]`, row-major, whatever the stored layout.
    pub weights: Vec<f32>,
    /// The bias, `outputs` values (zeros if the model has none).
    pub bias: Vec<f32>,
    /// What it is trained against: cross-entropy when its outputs go through a Softmax,
    /// LogSoftmax or ArgMax (a classifier), else squared error (a regressor).
    pub objective: Objective,
    weight_name: String,
    /// Stored as `[outputs, inputs]` (Gemm with transB = 1) rather than `[inputs, outputs]`.
    stored_transposed: bool,
    bias_name: Option<String>,
}

/// Why a model has no head that can be retrained.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeadError {
    /// Not ONNX protobuf.
    #[error("not an ONNX model: {0}")]
    Decode(String),
    /// No dense layer feeds the outputs.
    #[error("the model has no final dense layer (Gemm, or MatMul + Add) feeding its outputs: {0}")]
    NoHead(String),
    /// The head is dense, but of a form this does not retrain.
    #[error("the final layer {node:?} cannot be retrained: {reason}")]
    Unsupported {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
}

/// Finds the head of the ONNX model in `bytes`.
pub fn find(bytes: &[u8]) -> Result<Head, HeadError> {
    let model = ModelProto::decode(bytes).map_err(|e| HeadError::Decode(e.to_string()))?;
    let graph = model.graph.as_ref().ok_or_else(|| HeadError::Decode("no graph".into()))?;
    let producers: HashMap<&str, &NodeProto> =
        graph.node.iter().flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n))).collect();
    let initializers: HashMap<&str, &TensorProto> =
        graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let (node, after) = head_node(graph, &producers)?;
    let unsupported = |reason: &str| HeadError::Unsupported {
        node: node.name.clone().if_empty(&node.output[0]),
        reason: reason.to_owned(),
    };
    if after.contains(&"Sigmoid") {
        // Independent probabilities (multi-label, binary with one logit) would need a
        // binary cross-entropy, which the trainer does not have.
        return Err(unsupported("its outputs go through a Sigmoid (binary or multi-label)"));
    }
    let objective = if after.iter().any(|op| CLASSIFIER.contains(op)) {
        Objective::CrossEntropy
    } else {
        Objective::MeanSquaredError
    };
    let weight_of = |name: &str| {
        initializers.get(name).copied().ok_or_else(|| unsupported("its weights are not constant"))
    };
    let (input, weight, stored_transposed, bias) = if node.op_type == "Gemm" {
        for (attr, want) in [("alpha", 1.0f32), ("beta", 1.0)] {
            // Exactly 1: any other scale is a different layer to retrain.
            if float_attr(node, attr).is_some_and(|v| v.to_bits() != want.to_bits()) {
                return Err(unsupported(&format!("{attr} is not 1")));
            }
        }
        if int_attr(node, "transA").unwrap_or(0) != 0 {
            return Err(unsupported("transA is set"));
        }
        let transposed = int_attr(node, "transB").unwrap_or(0) != 0;
        let bias = node.input.get(2).filter(|b| !b.is_empty());
        let [x, w, ..] = node.input.as_slice() else {
            return Err(unsupported("it has fewer than two inputs"));
        };
        (x.clone(), weight_of(w)?, transposed, bias.cloned())
    } else {
        // Add(MatMul(x, W), b), in either order of the Add's inputs.
        let (matmul, bias) = node
            .input
            .iter()
            .find_map(|a| {
                let producer = producers.get(a.as_str()).filter(|p| p.op_type == "MatMul")?;
                let other = node.input.iter().find(|b| *b != a)?;
                Some((*producer, other.clone()))
            })
            .ok_or_else(|| {
                HeadError::NoHead("the last Add does not add a bias to a MatMul".into())
            })?;
        let [x, w, ..] = matmul.input.as_slice() else {
            return Err(unsupported("its MatMul has fewer than two inputs"));
        };
        (x.clone(), weight_of(w)?, false, Some(bias))
    };
    let values = floats(weight).map_err(|r| unsupported(&r))?;
    let matrix = match weight.dims[..] {
        [a, b] => usize::try_from(a).ok().zip(usize::try_from(b).ok()),
        _ => None,
    };
    let Some((a, b)) = matrix.filter(|(a, b)| a.checked_mul(*b) == Some(values.len())) else {
        return Err(unsupported("its weights are not a matrix of their declared shape"));
    };
    let (outputs, inputs) = if stored_transposed { (a, b) } else { (b, a) };
    let weights = if stored_transposed { values } else { transpose(&values, inputs, outputs) };
    let bias_values = match &bias {
        Some(name) => {
            let tensor = weight_of(name)?;
            let values = floats(tensor).map_err(|r| unsupported(&r))?;
            if values.len() != outputs {
                return Err(unsupported("its bias is not one value per output"));
            }
            values
        }
        None => vec![0.0; outputs],
    };
    Ok(Head {
        input,
        output: node.output[0].clone(),
        inputs,
        outputs,
        weights,
        bias: bias_values,
        objective,
        weight_name: weight.name.clone(),
        stored_transposed,
        bias_name: bias,
    })
}

/// The one dense node every graph output comes from, and the operators between them.
fn head_node<'g>(
    graph: &'g tract_onnx::pb::GraphProto,
    producers: &HashMap<&str, &'g NodeProto>,
) -> Result<(&'g NodeProto, Vec<&'g str>), HeadError> {
    let mut found: Option<&NodeProto> = None;
    let mut after: Vec<&str> = Vec::new();
    for output in &graph.output {
        let mut tensor = output.name.as_str();
        // A well-formed graph has no cycles; a damaged one must not loop forever.
        let mut steps = 0..=graph.node.len();
        let head = loop {
            if steps.next().is_none() {
                return Err(HeadError::NoHead(format!("output {:?} is on a cycle", output.name)));
            }
            let Some(node) = producers.get(tensor) else {
                return Err(HeadError::NoHead(format!(
                    "output {:?} comes from no node",
                    output.name
                )));
            };
            match node.op_type.as_str() {
                "Gemm" | "Add" => break *node,
                op if AFTER_HEAD.contains(&op) => {
                    after.push(op);
                    tensor = node.input.first().ok_or_else(|| {
                        HeadError::NoHead(format!(
                            "a {op} node before {:?} has no input",
                            output.name
                        ))
                    })?;
                }
                op => {
                    return Err(HeadError::NoHead(format!(
                        "output {:?} comes from a {op} node",
                        output.name
                    )));
                }
            }
        };
        match found {
            Some(other) if !std::ptr::eq(other, head) => {
                return Err(HeadError::NoHead("the outputs come from different layers".into()));
            }
            _ => found = Some(head),
        }
    }
    let node = found.ok_or_else(|| HeadError::NoHead("the model has no outputs".into()))?;
    Ok((node, after))
}

/// The model in `bytes` with `head`'s weights replaced by `weights` (`[outputs, inputs]`)
/// and `bias`; a model without a bias keeps none, so `bias` must then be zeros.
pub fn replace(
    bytes: &[u8],
    head: &Head,
    weights: &[f32],
    bias: &[f32],
) -> Result<Vec<u8>, HeadError> {
    assert_eq!(weights.len(), head.inputs * head.outputs, "weights of the head's shape");
    assert_eq!(bias.len(), head.outputs, "one bias per output");
    let mut model = ModelProto::decode(bytes).map_err(|e| HeadError::Decode(e.to_string()))?;
    let graph = model.graph.as_mut().ok_or_else(|| HeadError::Decode("no graph".into()))?;
    let stored = if head.stored_transposed {
        weights.to_vec()
    } else {
        transpose(weights, head.outputs, head.inputs)
    };
    let mut replaced = 0;
    for tensor in &mut graph.initializer {
        let values = if tensor.name == head.weight_name {
            &stored
        } else if head.bias_name.as_deref() == Some(tensor.name.as_str()) {
            bias
        } else {
            continue;
        };
        tensor.float_data.clear();
        tensor.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        replaced += 1;
    }
    let expected = 1 + usize::from(head.bias_name.is_some());
    if replaced != expected {
        return Err(HeadError::NoHead("the head's initializers are not in this model".into()));
    }
    if head.bias_name.is_none() && bias.iter().any(|b| *b != 0.0) {
        return Err(HeadError::Unsupported {
            node: head.output.clone(),
            reason: "it has no bias to hold the trained one".into(),
        });
    }
    Ok(model.encode_to_vec())
}

/// The model in `bytes` cut at the head's input: its one output is the features the head
/// reads. `None` when the head reads a graph input directly (the features are the input).
pub fn backbone(bytes: &[u8], head: &Head) -> Result<Option<Vec<u8>>, HeadError> {
    let mut model = ModelProto::decode(bytes).map_err(|e| HeadError::Decode(e.to_string()))?;
    let graph = model.graph.as_mut().ok_or_else(|| HeadError::Decode("no graph".into()))?;
    if graph.input.iter().any(|i| i.name == head.input) {
        return Ok(None);
    }
    // No declared type: tract infers the features' type and shape from the graph.
    graph.output = vec![ValueInfoProto { name: head.input.clone(), ..ValueInfoProto::default() }];
    Ok(Some(model.encode_to_vec()))
}

fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

fn floats(tensor: &TensorProto) -> Result<Vec<f32>, String> {
    if tensor.data_type != tensor_proto::DataType::Float as i32 {
        return Err(format!("tensor {:?} is not float32", tensor.name));
    }
    if !tensor.float_data.is_empty() {
        return Ok(tensor.float_data.clone());
    }
    if !tensor.raw_data.len().is_multiple_of(4) {
        return Err(format!("tensor {:?} has a partial value", tensor.name));
    }
    Ok(tensor
        .raw_data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a tract_onnx::pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn int_attr(node: &NodeProto, name: &str) -> Option<i64> {
    attr(node, name).filter(|a| a.r#type == attribute_proto::AttributeType::Int as i32).map(|a| a.i)
}

fn float_attr(node: &NodeProto, name: &str) -> Option<f32> {
    attr(node, name)
        .filter(|a| a.r#type == attribute_proto::AttributeType::Float as i32)
        .map(|a| a.f)
}

trait IfEmpty {
    fn if_empty(self, other: &str) -> String;
}

impl IfEmpty for String {
    fn if_empty(self, other: &str) -> String {
        if self.is_empty() { other.to_owned() } else { self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::write::{Attr, GraphBuilder};
    use crate::onnx::{OnnxModel, zoo};
    use crate::tensor::{DataType, Dim, Tensor, TensorData};

    fn run(bytes: &[u8], x: Vec<f32>, width: u64) -> Vec<f32> {
        let model = OnnxModel::load(bytes).unwrap();
        let rows = x.len() as u64 / width;
        let out = model
            .run(vec![Tensor { shape: vec![rows, width], data: TensorData::Fp32(x) }])
            .unwrap();
        let TensorData::Fp32(v) = &out[0].data else { panic!("{:?}", out[0]) };
        v.clone()
    }

    #[test]
    fn the_last_gemm_of_an_mlp_is_its_head_and_can_be_replaced() {
        let bytes = zoo::mlp(&[8, 16, 3], 4);
        let head = find(&bytes).unwrap();
        assert_eq!((head.input.as_str(), head.output.as_str()), ("relu0", "dense1"));
        assert_eq!((head.inputs, head.outputs), (16, 3));
        assert_eq!(head.objective, Objective::CrossEntropy);
        // The backbone's features through the head give the model's own output.
        let x: Vec<f32> = (0..16).map(|i| i as f32 / 8.0 - 1.0).collect();
        let features = run(&backbone(&bytes, &head).unwrap().unwrap(), x.clone(), 8);
        assert_eq!(features.len(), 2 * 16);
        let mut logits: Vec<f32> = features
            .chunks_exact(16)
            .flat_map(|f| {
                head.weights
                    .chunks_exact(16)
                    .zip(&head.bias)
                    .map(move |(w, b)| b + w.iter().zip(f).map(|(w, f)| w * f).sum::<f32>())
            })
            .collect();
        for row in logits.chunks_exact_mut(3) {
            let sum: f32 = row.iter().map(|z| z.exp()).sum();
            for z in row.iter_mut() {
                *z = z.exp() / sum;
            }
        }
        for (got, want) in logits.iter().zip(run(&bytes, x, 8)) {
            assert!((got - want).abs() < 1e-5, "{logits:?} vs {want}");
        }
        // Zero weights and a bias: every row's probabilities are softmax(bias).
        let bias = [1.0, 2.0, 3.0];
        let replaced = replace(&bytes, &head, &[0.0; 48], &bias).unwrap();
        let p = run(&replaced, vec![0.5; 16], 8);
        let e: Vec<f64> = bias.iter().map(|b| f64::from(*b).exp()).collect();
        let sum: f64 = e.iter().sum();
        for (got, want) in p.iter().zip(e.iter().map(|v| v / sum)) {
            assert!((f64::from(*got) - want).abs() < 1e-6, "{p:?}");
        }
        // Found again in the new model, with the new values.
        let again = find(&replaced).unwrap();
        assert_eq!(again.bias, bias);
        assert!(again.weights.iter().all(|w| *w == 0.0));
        // Replacing with the original values gives the original bytes' behaviour.
        let same = replace(&bytes, &head, &head.weights, &head.bias).unwrap();
        assert_eq!(run(&same, vec![0.25; 16], 8), run(&bytes, vec![0.25; 16], 8));
    }

    #[test]
    fn a_matmul_plus_bias_head_is_found_in_its_stored_layout() {
        let n = || Dim::Symbol("N".into());
        let mut g = GraphBuilder::new("matmul_head");
        g.input("x", DataType::Fp32, &[n(), Dim::Fixed(2)]);
        // W stored [inputs, outputs] = [[1, 2, 3], [4, 5, 6]].
        g.weights("w", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        g.weights("b", &[3], &[0.5, 0.5, 0.5]);
        g.node("MatMul", &["x", "w"], &["xw"], vec![]);
        g.node("Add", &["b", "xw"], &["y"], vec![]);
        g.node("ArgMax", &["y"], &["label"], vec![Attr::Int("axis", 1), Attr::Int("keepdims", 0)]);
        g.output("y", DataType::Fp32, &[n(), Dim::Fixed(3)]);
        g.output("label", DataType::Int64, &[n()]);
        let bytes = g.encode("test");
        let head = find(&bytes).unwrap();
        assert_eq!((head.input.as_str(), head.inputs, head.outputs), ("x", 2, 3));
        assert_eq!(head.objective, Objective::CrossEntropy, "an ArgMax reads it");
        assert_eq!(backbone(&bytes, &head).unwrap(), None, "the head reads the input");
        // As [outputs, inputs].
        assert_eq!(head.weights, [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
        let replaced = replace(&bytes, &head, &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[0.0; 3]).unwrap();
        assert_eq!(run(&replaced, vec![2.0, 3.0], 2), [2.0, 3.0, 5.0]);
    }

    #[test]
    fn models_without_a_dense_head_are_refused_with_the_reason() {
        let n = || Dim::Symbol("N".into());
        let mut g = GraphBuilder::new("no_head");
        g.input("x", DataType::Fp32, &[n(), Dim::Fixed(2)]);
        g.node("Relu", &["x"], &["y"], vec![]);
        g.output("y", DataType::Fp32, &[n(), Dim::Fixed(2)]);
        let err = find(&g.encode("test")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the model has no final dense layer (Gemm, or MatMul + Add) feeding its outputs: output \"y\" comes from a Relu node"
        );
        assert!(matches!(find(b"not onnx"), Err(HeadError::Decode(_))));
        // A Gemm whose weights are an input, not a constant.
        let mut g = GraphBuilder::new("dynamic");
        g.input("x", DataType::Fp32, &[n(), Dim::Fixed(2)]);
        g.input("w", DataType::Fp32, &[Dim::Fixed(2), Dim::Fixed(2)]);
        g.node("Gemm", &["x", "w"], &["y"], vec![]);
        g.output("y", DataType::Fp32, &[n(), Dim::Fixed(2)]);
        let err = find(&g.encode("test")).unwrap_err();
        assert!(err.to_string().contains("its weights are not constant"), "{err}");
    }

    #[test]
    fn a_head_without_softmax_is_a_regressor_and_one_behind_a_sigmoid_is_refused() {
        let n = || Dim::Symbol("N".into());
        let graph = |after: Option<&str>| {
            let mut g = GraphBuilder::new("regressor");
            g.input("x", DataType::Fp32, &[n(), Dim::Fixed(2)]);
            g.weights("w", &[1, 2], &[0.5, -0.5]);
            g.weights("b", &[1], &[0.1]);
            g.node("Relu", &["x"], &["h"], vec![]);
            g.node("Gemm", &["h", "w", "b"], &["z"], vec![Attr::Int("transB", 1)]);
            let out = after.map_or("z", |op| {
                g.node(op, &["z"], &["y"], vec![]);
                "y"
            });
            g.output(out, DataType::Fp32, &[n(), Dim::Fixed(1)]);
            g.encode("test")
        };
        let head = find(&graph(None)).unwrap();
        assert_eq!((head.objective, head.input.as_str()), (Objective::MeanSquaredError, "h"));
        let cut = backbone(&graph(None), &head).unwrap().unwrap();
        assert_eq!(run(&cut, vec![-1.0, 2.0], 2), [0.0, 2.0], "the Relu's output");
        let err = find(&graph(Some("Sigmoid"))).unwrap_err();
        assert!(err.to_string().contains("go through a Sigmoid"), "{err}");
    }

    /// Damaged models (each byte flipped in turn, every truncation) are refused or read,
    /// never a panic or a hang; the fuzz target `finetune_inputs` goes further.
    #[test]
    fn damaged_models_are_refused_without_panics() {
        let bytes = zoo::mlp(&[4, 6, 3], 2);
        let mut refused = 0;
        let mut try_all = |damaged: &[u8]| match find(damaged) {
            Ok(head) => {
                let _ = backbone(damaged, &head);
                let _ = replace(damaged, &head, &head.weights, &head.bias);
            }
            Err(_) => refused += 1,
        };
        for at in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x5a;
            try_all(&flipped);
            try_all(&bytes[..at]);
        }
        assert!(refused > bytes.len(), "most damage is noticed: {refused} refusals");
        assert!(find(&bytes).is_ok());
    }

    #[test]
    fn the_residual_cnn_has_a_head_too() {
        let head = find(&zoo::cnn(10, 1)).unwrap();
        assert_eq!(head.outputs, 10);
        assert_eq!(head.weights.len(), head.inputs * 10);
    }
}
