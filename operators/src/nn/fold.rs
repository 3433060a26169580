//! A rewrite of an ONNX graph before tract parses it, so that what follows a
//! convolution costs no pass of its own at run time:
//!
//! - a `BatchNormalization` (inference form), or a `Mul`, `Add` or `Sub` by a constant
//!   that is the same for all pixels of a channel, applied to a 2-D `Conv`'s output, goes
//!   into the convolution's weights and bias (what ONNX Runtime's Conv+BN fusion does);
//! - then, on a convolution [`super::conv`] runs itself (depthwise or pointwise), the
//!   activation that follows (Relu, Clip, HardSigmoid, HardSwish, `y · HardSigmoid(y)`,
//!   PaddlePaddle's `y · Clip(y + 3, 0, 6) / 6`, SiLU's `y · Sigmoid(y)`) becomes two attributes of the `Conv`
//!   node ([`super::activation`]) and is applied in the convolution's output loop.
//!
//! A node is absorbed only when the convolution's output (and each intermediate of a
//! pattern) has no other consumer, is no graph output and is not read from inside a
//! subgraph; anything else is left as it is. Folded weights get new initializers, so a
//! weight tensor shared with another node is never changed under it.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::{AttributeProto, GraphProto, NodeProto, TensorProto};

use super::Taken;
use super::activation::{self, Activation};
use crate::Native;

/// ONNX's `TensorProto.DataType.FLOAT`.
const FLOAT: i32 = 1;

/// Folds what follows the convolutions of `graph` (not of its subgraphs) into them.
/// Returns how many nodes were absorbed.
pub fn fold_convolutions(graph: &mut GraphProto) -> usize {
    fold_convolutions_for(graph, Native::ALL)
}

/// [`fold_convolutions`] for a registration made with `native`: without native
/// convolutions, only the affine steps are folded (tract's convolution has no fused
/// activation).
pub fn fold_convolutions_for(graph: &mut GraphProto, native: Native) -> usize {
    let mut view = View::new(graph);
    view.fuse_activations = native.conv;
    let mut removed = vec![false; graph.node.len()];
    let mut rewrites = Vec::new();
    for i in 0..graph.node.len() {
        let node = &graph.node[i];
        if node.op_type != "Conv" || !matches!(node.domain.as_str(), "" | "ai.onnx") {
            continue;
        }
        if let Some(rewrite) = view.fold(graph, i, &mut removed) {
            rewrites.push(rewrite);
        }
    }
    for r in rewrites {
        let conv = &mut graph.node[r.node];
        let weights = format!("{}::falaj_weights", conv.output[0]);
        let bias = format!("{}::falaj_bias", conv.output[0]);
        conv.input.resize(3.max(conv.input.len()), String::new());
        conv.input[1].clone_from(&weights);
        conv.input[2].clone_from(&bias);
        conv.output[0] = r.output;
        push_activation(conv, r.activation);
        let c = r.bias.len() as i64;
        graph.initializer.push(float_tensor(weights, r.dims, r.weights));
        graph.initializer.push(float_tensor(bias, vec![c], r.bias));
    }
    let mut index = 0;
    graph.node.retain(|_| {
        index += 1;
        !removed[index - 1]
    });
    removed.iter().filter(|&&r| r).count()
}

/// Folds the `Add` of a constant bias and the activation that follow each `MatMul` by
/// constant 2-D float32 weights (of `graph`, not of its subgraphs) into it, as a third
/// input and the activation's attributes, for [`super::dense`] to run. Returns how many
/// nodes were absorbed.
pub fn fold_matmuls(graph: &mut GraphProto) -> usize {
    let view = View::new(graph);
    let mut removed = vec![false; graph.node.len()];
    let mut rewrites = Vec::new();
    for i in 0..graph.node.len() {
        let node = &graph.node[i];
        if node.op_type != "MatMul"
            || !matches!(node.domain.as_str(), "" | "ai.onnx")
            || node.input.len() != 2
            || node.output.len() != 1
        {
            continue;
        }
        let Some((dims, _)) = view.constant(graph, &node.input[1]) else { continue };
        let &[_, n] = dims.as_slice() else { continue };
        let mut output = node.output[0].clone();
        let mut bias = None;
        if let Some(next) = view.only_consumer(&output, &removed)
            && let Some(b) = view.bias(graph, &graph.node[next], &output, n)
        {
            bias = Some(b);
            removed[next] = true;
            output.clone_from(&graph.node[next].output[0]);
        }
        let mut activation = Activation::Identity;
        if let Some((act, out, nodes)) = view.activation(graph, &output, &removed) {
            activation = act;
            output = out;
            for n in nodes {
                removed[n] = true;
            }
        }
        if bias.is_some() || activation != Activation::Identity {
            rewrites.push((i, bias, output, activation));
        }
    }
    for (i, bias, output, activation) in rewrites {
        let node = &mut graph.node[i];
        if let Some((dims, values)) = bias {
            let name = format!("{output}::falaj_bias");
            node.input.push(name.clone());
            graph.initializer.push(float_tensor(name, dims, values));
        }
        node.output[0] = output;
        push_activation(node, activation);
    }
    let mut index = 0;
    graph.node.retain(|_| {
        index += 1;
        !removed[index - 1]
    });
    removed.iter().filter(|&&r| r).count()
}

/// Writes `activation` as the attributes [`Activation::of_node`] reads.
fn push_activation(node: &mut NodeProto, activation: Activation) {
    if let Some((kind, params)) = activation.to_attributes() {
        node.attribute.push(AttributeProto {
            name: activation::KIND.into(),
            r#type: AttributeType::String as i32,
            s: kind.as_bytes().to_vec(),
            ..AttributeProto::default()
        });
        node.attribute.push(AttributeProto {
            name: activation::PARAMS.into(),
            r#type: AttributeType::Floats as i32,
            floats: params,
            ..AttributeProto::default()
        });
    }
}

fn float_tensor(name: String, dims: Vec<i64>, data: Vec<f32>) -> TensorProto {
    TensorProto { name, dims, data_type: FLOAT, float_data: data, ..TensorProto::default() }
}

/// A convolution's new weights, bias, output and activation.
struct Rewrite {
    node: usize,
    dims: Vec<i64>,
    weights: Vec<f32>,
    bias: Vec<f32>,
    output: String,
    activation: Activation,
}

/// Where a graph's constants and consumers are.
struct View {
    initializers: HashMap<String, usize>,
    constant_nodes: HashMap<String, usize>,
    consumers: HashMap<String, Vec<usize>>,
    /// Graph outputs and names read inside subgraphs: never absorbed.
    kept: HashSet<String>,
    /// Whether activations go into the convolutions this crate runs.
    fuse_activations: bool,
}

impl View {
    fn new(graph: &GraphProto) -> Self {
        let initializers =
            graph.initializer.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let mut constant_nodes = HashMap::new();
        let mut consumers: HashMap<String, Vec<usize>> = HashMap::new();
        let mut kept: HashSet<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        for (i, node) in graph.node.iter().enumerate() {
            if node.op_type == "Constant"
                && let Some(out) = node.output.first()
            {
                constant_nodes.insert(out.clone(), i);
            }
            for input in node.input.iter().filter(|n| !n.is_empty()) {
                consumers.entry(input.clone()).or_default().push(i);
            }
            for a in &node.attribute {
                for g in a.g.iter().chain(&a.graphs) {
                    subgraph_names(g, &mut kept);
                }
            }
        }
        Self { initializers, constant_nodes, consumers, kept, fuse_activations: true }
    }

    /// A float constant's dimensions and values.
    fn constant(&self, graph: &GraphProto, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        let t = if let Some(&i) = self.initializers.get(name) {
            &graph.initializer[i]
        } else {
            let node = &graph.node[*self.constant_nodes.get(name)?];
            node.attribute.iter().find(|a| a.name == "value")?.t.as_ref()?
        };
        floats(t)
    }

    fn scalar(&self, graph: &GraphProto, name: &str) -> Option<f32> {
        match self.constant(graph, name)? {
            (dims, v) if v.len() == 1 && dims.len() <= 4 => Some(v[0]),
            _ => None,
        }
    }

    /// The live consumers of `name`, or `None` when it must be kept as it is.
    fn consumers<'a>(&'a self, name: &str, removed: &'a [bool]) -> Option<Vec<usize>> {
        if self.kept.contains(name) {
            return None;
        }
        Some(
            self.consumers
                .get(name)
                .into_iter()
                .flatten()
                .copied()
                .filter(|&i| !removed[i])
                .collect(),
        )
    }

    /// The single consumer of `name`, if it has exactly one and may be absorbed.
    fn only_consumer(&self, name: &str, removed: &[bool]) -> Option<usize> {
        match self.consumers(name, removed)?.as_slice() {
            &[one] => Some(one),
            _ => None,
        }
    }

    fn fold(&mut self, graph: &GraphProto, conv: usize, removed: &mut [bool]) -> Option<Rewrite> {
        let node = &graph.node[conv];
        let (dims, mut weights) = self.constant(graph, node.input.get(1)?)?;
        let &[c, ..] = dims.as_slice() else { return None };
        if dims.len() != 4 || node.output.len() != 1 {
            return None;
        }
        let mut bias = match node.input.get(2).filter(|b| !b.is_empty()) {
            Some(name) => match self.constant(graph, name)? {
                (_, b) if b.len() == c => b,
                _ => return None,
            },
            None => vec![0.0; c],
        };
        let mut output = node.output[0].clone();
        let mut absorbed = false;
        while let Some(next) = self.only_consumer(&output, removed) {
            let Some((scale, shift)) = self.affine(graph, &graph.node[next], &output, c) else {
                break;
            };
            let per_channel = weights.len() / c;
            for (ch, (w, b)) in weights.chunks_mut(per_channel).zip(&mut bias).enumerate() {
                for w in w.iter_mut() {
                    *w *= scale[ch];
                }
                *b = *b * scale[ch] + shift[ch];
            }
            removed[next] = true;
            output.clone_from(&graph.node[next].output[0]);
            absorbed = true;
        }
        let mut activation = Activation::Identity;
        if self.fuse_activations
            && Taken::of(node, &dims).is_some()
            && let Some((act, out, nodes)) = self.activation(graph, &output, removed)
        {
            activation = act;
            output = out;
            for n in nodes {
                removed[n] = true;
            }
            absorbed = true;
        }
        absorbed.then(|| Rewrite {
            node: conv,
            dims: dims.iter().map(|&d| d as i64).collect(),
            weights,
            bias,
            output,
            activation,
        })
    }

    /// The bias `node` adds to `y`, a `[rows.., n]` product: its dimensions (`[n]` or
    /// `[1, n]`, the rank the sum takes at least) and `n` values, a single value
    /// repeated.
    fn bias(
        &self,
        graph: &GraphProto,
        node: &NodeProto,
        y: &str,
        n: usize,
    ) -> Option<(Vec<i64>, Vec<f32>)> {
        if node.op_type != "Add"
            || !matches!(node.domain.as_str(), "" | "ai.onnx")
            || node.output.len() != 1
        {
            return None;
        }
        let name = match node.input.as_slice() {
            [a, b] if a == y && b != y => b,
            [a, b] if b == y && a != y => a,
            _ => return None,
        };
        let (dims, values) = self.constant(graph, name)?;
        if dims.len() > 2 || dims.iter().rev().skip(1).any(|&d| d != 1) {
            return None;
        }
        let values = match values.len() {
            1 => vec![values[0]; n],
            len if len == n => values,
            _ => return None,
        };
        let dims = if dims.len() == 2 { vec![1, n as i64] } else { vec![n as i64] };
        Some((dims, values))
    }

    /// `node` as `scale · y + shift` per channel, when it is an affine map of `y` that
    /// is the same over each channel's pixels.
    fn affine(
        &self,
        graph: &GraphProto,
        node: &NodeProto,
        y: &str,
        c: usize,
    ) -> Option<(Vec<f32>, Vec<f32>)> {
        if node.output.len() != 1 || !matches!(node.domain.as_str(), "" | "ai.onnx") {
            return None;
        }
        let other = |node: &NodeProto| -> Option<Vec<f32>> {
            let name = match node.input.as_slice() {
                [a, b] if a == y && b != y => b,
                [a, b] if b == y && a != y && node.op_type != "Sub" => a,
                _ => return None,
            };
            let (dims, v) = self.constant(graph, name)?;
            per_channel(&dims, v, c)
        };
        match node.op_type.as_str() {
            "Mul" => Some((other(node)?, vec![0.0; c])),
            "Add" => Some((vec![1.0; c], other(node)?)),
            "Sub" => Some((vec![1.0; c], other(node)?.into_iter().map(|v| -v).collect())),
            "BatchNormalization" => {
                let training = node.attribute.iter().any(|a| {
                    (a.name == "training_mode" && a.i != 0) || (a.name == "spatial" && a.i == 0)
                });
                if training || node.input.len() != 5 || node.input[0] != y {
                    return None;
                }
                let epsilon =
                    node.attribute.iter().find(|a| a.name == "epsilon").map_or(1e-5, |a| a.f);
                let param = |i: usize| -> Option<Vec<f32>> {
                    let (_, v) = self.constant(graph, &node.input[i])?;
                    (v.len() == c).then_some(v)
                };
                let (gamma, beta, mean, var) = (param(1)?, param(2)?, param(3)?, param(4)?);
                let scale: Vec<f32> =
                    gamma.iter().zip(&var).map(|(g, v)| g / (v + epsilon).sqrt()).collect();
                let shift = beta.iter().zip(&mean).zip(&scale).map(|((b, m), s)| b - m * s);
                Some((scale.clone(), shift.collect()))
            }
            _ => None,
        }
    }

    /// The activation applied to `y`: what it is, the name of its result, and the
    /// nodes it is made of.
    fn activation(
        &self,
        graph: &GraphProto,
        y: &str,
        removed: &[bool],
    ) -> Option<(Activation, String, Vec<usize>)> {
        let nodes = &graph.node;
        let std = |i: usize| matches!(nodes[i].domain.as_str(), "" | "ai.onnx");
        let consumers = self.consumers(y, removed)?;
        let attr = |n: &NodeProto, name: &str, default: f32| {
            n.attribute.iter().find(|a| a.name == name).map_or(default, |a| a.f)
        };
        if let &[only] = consumers.as_slice() {
            let n = &nodes[only];
            if !std(only) || n.input.first().is_none_or(|i| i != y) || n.output.len() != 1 {
                return None;
            }
            let act = match n.op_type.as_str() {
                "Relu" => Activation::Relu,
                "Clip" => {
                    let (lo, hi) = self.clip_bounds(graph, n)?;
                    Activation::Clip { lo, hi }
                }
                "HardSigmoid" => Activation::HardSigmoid {
                    alpha: attr(n, "alpha", 0.2),
                    beta: attr(n, "beta", 0.5),
                },
                "HardSwish" => {
                    Activation::Gated { alpha: 1.0 / 6.0, beta: 0.5, lo: 0.0, hi: 1.0, scale: 1.0 }
                }
                _ => return None,
            };
            return Some((act, n.output[0].clone(), vec![only]));
        }
        let &[first, second] = consumers.as_slice() else { return None };
        if !std(first) || !std(second) {
            return None;
        }
        // The multiplication `y · gate(y)`, and the node computing the gate.
        let (mul, gate) =
            if nodes[first].op_type == "Mul" { (first, second) } else { (second, first) };
        let mul_node = &nodes[mul];
        if mul_node.op_type != "Mul" || mul_node.input.len() != 2 {
            return None;
        }
        let takes = |n: &NodeProto, a: &str, b: &str| {
            (n.input[0] == a && n.input[1] == b) || (n.input[0] == b && n.input[1] == a)
        };
        let g = &nodes[gate];
        match g.op_type.as_str() {
            // y · HardSigmoid(y), and y · Sigmoid(y) (SiLU)
            "HardSigmoid" | "Sigmoid" if g.input.first().is_some_and(|i| i == y) => {
                if self.only_consumer(&g.output[0], removed)? != mul
                    || !takes(mul_node, y, &g.output[0])
                {
                    return None;
                }
                let (alpha, beta) = (attr(g, "alpha", 0.2), attr(g, "beta", 0.5));
                let act = match g.op_type.as_str() {
                    "Sigmoid" => Activation::Silu,
                    _ => Activation::Gated { alpha, beta, lo: 0.0, hi: 1.0, scale: 1.0 },
                };
                Some((act, mul_node.output[0].clone(), vec![gate, mul]))
            }
            // y · Clip(y + k, lo, hi) [/ d]
            "Add" if g.input.len() == 2 && g.input.iter().any(|i| i == y) => {
                let k = g.input.iter().find(|i| *i != y)?;
                let beta = self.scalar(graph, k)?;
                let clip = self.only_consumer(&g.output[0], removed)?;
                let clip_node = &nodes[clip];
                if clip_node.op_type != "Clip" || !std(clip) || clip_node.input[0] != g.output[0] {
                    return None;
                }
                let (lo, hi) = self.clip_bounds(graph, clip_node)?;
                if self.only_consumer(&clip_node.output[0], removed)? != mul
                    || !takes(mul_node, y, &clip_node.output[0])
                {
                    return None;
                }
                let mut scale = 1.0;
                let mut out = mul_node.output[0].clone();
                let mut absorbed = vec![gate, clip, mul];
                if let Some(next) = self.only_consumer(&out, removed)
                    && std(next)
                    && let n = &nodes[next]
                    && n.input.len() == 2
                    && n.input[0] == out
                    && let Some(d) = self.scalar(graph, &n.input[1])
                {
                    let divisor = match n.op_type.as_str() {
                        "Div" if d != 0.0 => Some(1.0 / d),
                        "Mul" => Some(d),
                        _ => None,
                    };
                    if let Some(d) = divisor {
                        scale = d;
                        out.clone_from(&n.output[0]);
                        absorbed.push(next);
                    }
                }
                let act = Activation::Gated { alpha: 1.0, beta, lo, hi, scale };
                Some((act, out, absorbed))
            }
            _ => None,
        }
    }

    /// A Clip's bounds: from its inputs (opset 11 on) or its attributes (before).
    fn clip_bounds(&self, graph: &GraphProto, n: &NodeProto) -> Option<(f32, f32)> {
        if n.input.len() > 1 {
            let bound = |i: usize, default: f32| match n.input.get(i).filter(|s| !s.is_empty()) {
                Some(name) => self.scalar(graph, name),
                None => Some(default),
            };
            return Some((bound(1, f32::NEG_INFINITY)?, bound(2, f32::INFINITY)?));
        }
        let attr = |name: &str, default: f32| {
            n.attribute.iter().find(|a| a.name == name).map_or(default, |a| a.f)
        };
        Some((attr("min", f32::MIN), attr("max", f32::MAX)))
    }
}

/// Every name read by nodes of `graph` and its own subgraphs.
fn subgraph_names(graph: &GraphProto, names: &mut HashSet<String>) {
    for node in &graph.node {
        names.extend(node.input.iter().cloned());
        for a in &node.attribute {
            for g in a.g.iter().chain(&a.graphs) {
                subgraph_names(g, names);
            }
        }
    }
}

/// A constant's values per channel of an NCHW tensor: one value for all, or one per
/// channel shaped `[C, 1, 1]` (leading ones allowed); `None` for any other broadcast.
fn per_channel(dims: &[usize], values: Vec<f32>, c: usize) -> Option<Vec<f32>> {
    if dims.len() > 4 {
        return None;
    }
    if values.len() == 1 {
        return Some(vec![values[0]; c]);
    }
    let rank = dims.len();
    let channel_axis = rank.checked_sub(3)?;
    let fits =
        dims.iter().enumerate().all(|(i, &d)| if i == channel_axis { d == c } else { d == 1 });
    (fits && values.len() == c).then_some(values)
}

/// A float tensor's dimensions and values, when they are held inline.
fn floats(t: &TensorProto) -> Option<(Vec<usize>, Vec<f32>)> {
    if t.data_type != FLOAT || !t.external_data.is_empty() {
        return None;
    }
    let dims: Vec<usize> =
        t.dims.iter().map(|&d| usize::try_from(d).ok()).collect::<Option<_>>()?;
    let n: usize = dims.iter().product();
    let values = if t.raw_data.is_empty() {
        t.float_data.clone()
    } else {
        t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    };
    (values.len() == n).then_some((dims, values))
}

#[cfg(test)]
mod tests {
    use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
    use tract_onnx::pb::{
        ModelProto, OperatorSetIdProto, TensorShapeProto, TypeProto, ValueInfoProto, type_proto,
    };
    use tract_onnx::prelude::*;

    use super::*;

    const C: usize = 4;
    const SHAPE: [usize; 4] = [1, C, 5, 6];

    fn value(name: &str, dims: &[usize]) -> ValueInfoProto {
        let dim = dims
            .iter()
            .map(|&d| Dimension {
                value: Some(dimension::Value::DimValue(d as i64)),
                ..Dimension::default()
            })
            .collect();
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: FLOAT,
                    shape: Some(TensorShapeProto { dim }),
                })),
                ..TypeProto::default()
            }),
            ..ValueInfoProto::default()
        }
    }

    fn node(op: &str, inputs: &[&str], output: &str, attrs: Vec<AttributeProto>) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            name: output.into(),
            input: inputs.iter().map(|s| (*s).to_owned()).collect(),
            output: vec![output.into()],
            attribute: attrs,
            ..NodeProto::default()
        }
    }

    fn ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints: v.to_vec(),
            ..AttributeProto::default()
        }
    }

    fn int(name: &str, i: i64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Int as i32,
            i,
            ..AttributeProto::default()
        }
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7 + seed * 13) % 11) as f32 * 0.2 - 1.0).collect()
    }

    /// A graph over `x` `[1, 4, 5, 6]`: `nodes`, with weights `w` of `dims` and the
    /// batch-norm and constant tensors every test may use.
    fn model(nodes: Vec<NodeProto>, w_dims: &[usize], outputs: &[&str]) -> ModelProto {
        let n: usize = w_dims.iter().product();
        let t = |name: &str, dims: &[usize], v: Vec<f32>| {
            float_tensor(name.into(), dims.iter().map(|&d| d as i64).collect(), v)
        };
        let initializer = vec![
            t("w", w_dims, values(n, 1)),
            t("b", &[C], values(C, 2)),
            t("gamma", &[C], values(C, 3).iter().map(|v| v + 1.5).collect()),
            t("beta", &[C], values(C, 4)),
            t("mean", &[C], values(C, 5)),
            t("var", &[C], values(C, 6).iter().map(|v| v + 1.2).collect()),
            t("k", &[C, 1, 1], values(C, 7)),
            t("row", &[1, C], values(C, 8)),
            t("three", &[], vec![3.0]),
            t("zero", &[], vec![0.0]),
            t("six", &[], vec![6.0]),
        ];
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 13 }],
            graph: Some(GraphProto {
                node: nodes,
                initializer,
                input: vec![value("x", &SHAPE)],
                output: outputs
                    .iter()
                    .map(|o| ValueInfoProto { name: (*o).into(), ..ValueInfoProto::default() })
                    .collect(),
                ..GraphProto::default()
            }),
            ..ModelProto::default()
        }
    }

    fn run(proto: &ModelProto) -> Vec<Vec<f32>> {
        let mut onnx = onnx();
        crate::register(&mut onnx.op_register);
        let plan = onnx
            .model_for_proto_model(proto)
            .unwrap()
            .with_input_fact(0, f32::fact(SHAPE).into())
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let x = Tensor::from_shape(&SHAPE, &values(SHAPE.iter().product(), 9)).unwrap();
        let outputs = plan.run(tvec![x.into()]).unwrap();
        outputs
            .iter()
            .map(|o| o.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec())
            .collect()
    }

    /// Folds `proto`, checks that `left` operators remain (Constant-free graphs), and
    /// that the folded graph computes what the original does.
    fn check(proto: &ModelProto, left: &[&str]) {
        let mut folded = proto.clone();
        fold_convolutions(folded.graph.as_mut().unwrap());
        fold_matmuls(folded.graph.as_mut().unwrap());
        let ops: Vec<&str> =
            folded.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, left);
        let (want, got) = (run(proto), run(&folded));
        assert_eq!(want.len(), got.len());
        for (w, g) in want.iter().zip(&got) {
            assert_eq!(w.len(), g.len());
            for (a, b) in w.iter().zip(g) {
                assert!((a - b).abs() <= 1e-4 * a.abs().max(1.0), "{ops:?}: {w:?} against {g:?}");
            }
        }
    }

    fn depthwise(inputs: &[&str]) -> NodeProto {
        let attrs = vec![int("group", C as i64), ints("pads", &[1, 1, 1, 1])];
        node("Conv", inputs, "y", attrs)
    }

    fn bn(input: &str, output: &str) -> NodeProto {
        node("BatchNormalization", &[input, "gamma", "beta", "mean", "var"], output, vec![])
    }

    #[test]
    fn batch_norm_and_paddle_hard_swish_fold_into_a_depthwise_convolution() {
        let nodes = vec![
            depthwise(&["x", "w", "b"]),
            bn("y", "n"),
            node("Add", &["n", "three"], "a", vec![]),
            node("Clip", &["a", "zero", "six"], "c", vec![]),
            node("Mul", &["n", "c"], "m", vec![]),
            node("Div", &["m", "six"], "out", vec![]),
        ];
        check(&model(nodes, &[C, 1, 3, 3], &["out"]), &["Conv"]);
    }

    #[test]
    fn scales_shifts_and_activations_fold_into_a_pointwise_convolution() {
        for act in ["Relu", "HardSigmoid", "HardSwish"] {
            let nodes = vec![
                node("Conv", &["x", "w"], "y", vec![]),
                node("Mul", &["k", "y"], "s", vec![]),
                node("Add", &["s", "three"], "t", vec![]),
                node("Sub", &["t", "k"], "u", vec![]),
                node(act, &["u"], "out", vec![]),
            ];
            check(&model(nodes, &[C, C, 1, 1], &["out"]), &["Conv"]);
        }
        // y · HardSigmoid(y), and Clip's bounds as inputs.
        let nodes = vec![
            node("Conv", &["x", "w", "b"], "y", vec![]),
            node("HardSigmoid", &["y"], "h", vec![]),
            node("Mul", &["h", "y"], "g", vec![]),
        ];
        check(&model(nodes, &[C, C, 1, 1], &["g"]), &["Conv"]);
        let nodes = vec![
            node("Conv", &["x", "w", "b"], "y", vec![]),
            node("Clip", &["y", "zero", "six"], "out", vec![]),
        ];
        check(&model(nodes, &[C, C, 1, 1], &["out"]), &["Conv"]);
    }

    #[test]
    fn a_convolution_tract_runs_takes_the_batch_norm_but_not_the_activation() {
        // Two groups: neither depthwise nor one group, so tract's.
        let attrs = vec![ints("pads", &[1, 1, 1, 1]), int("group", 2)];
        let nodes = vec![
            node("Conv", &["x", "w"], "y", attrs),
            bn("y", "n"),
            node("Relu", &["n"], "out", vec![]),
        ];
        check(&model(nodes, &[C, C / 2, 3, 3], &["out"]), &["Conv", "Relu"]);
    }

    #[test]
    fn batch_norm_and_activation_fold_into_a_regular_convolution() {
        let nodes = vec![
            node("Conv", &["x", "w"], "y", vec![ints("pads", &[1, 1, 1, 1])]),
            bn("y", "n"),
            node("Relu", &["n"], "out", vec![]),
        ];
        check(&model(nodes, &[C, C, 3, 3], &["out"]), &["Conv"]);
        // SiLU, as YOLOv8 exports it: y · Sigmoid(y), either order of the product.
        for (a, b) in [("y", "s"), ("s", "y")] {
            let nodes = vec![
                node("Conv", &["x", "w", "b"], "y", vec![ints("pads", &[1, 1, 1, 1])]),
                node("Sigmoid", &["y"], "s", vec![]),
                node("Mul", &[a, b], "out", vec![]),
            ];
            check(&model(nodes, &[C, C, 3, 3], &["out"]), &["Conv"]);
        }
    }

    #[test]
    fn nothing_folds_into_a_convolution_whose_output_is_read_elsewhere() {
        // The batch norm's input is also added to its output.
        let nodes = vec![
            depthwise(&["x", "w", "b"]),
            bn("y", "n"),
            node("Add", &["y", "n"], "out", vec![]),
        ];
        check(&model(nodes, &[C, 1, 3, 3], &["out"]), &["Conv", "BatchNormalization", "Add"]);
        // The convolution's output is a graph output.
        let nodes = vec![depthwise(&["x", "w", "b"]), node("Relu", &["y"], "out", vec![])];
        check(&model(nodes, &[C, 1, 3, 3], &["y", "out"]), &["Conv", "Relu"]);
        // A gate whose intermediate is read elsewhere, and a Mul by a tensor that varies
        // over pixels, stay.
        let nodes = vec![
            depthwise(&["x", "w", "b"]),
            node("Add", &["y", "three"], "a", vec![]),
            node("Clip", &["a", "zero", "six"], "c", vec![]),
            node("Mul", &["y", "c"], "m", vec![]),
            node("Mul", &["m", "x"], "out", vec![]),
        ];
        check(&model(nodes, &[C, 1, 3, 3], &["out", "a"]), &["Conv", "Add", "Clip", "Mul", "Mul"]);
    }

    #[test]
    fn a_bias_and_an_activation_fold_into_a_product_by_constant_weights() {
        // x [1, 4, 5, 6] · w [6, 4]: the bias as [C], [1, C] or one value, either side.
        for (bias, act) in [("b", "Relu"), ("row", "HardSwish"), ("three", "Relu")] {
            let nodes = vec![
                node("MatMul", &["x", "w"], "y", vec![]),
                node("Add", &[bias, "y"], "a", vec![]),
                node(act, &["a"], "out", vec![]),
            ];
            check(&model(nodes, &[6, C], &["out"]), &["MatMul"]);
        }
        // The bias alone, the activation alone.
        let nodes =
            vec![node("MatMul", &["x", "w"], "y", vec![]), node("Add", &["y", "b"], "out", vec![])];
        check(&model(nodes, &[6, C], &["out"]), &["MatMul"]);
        let nodes = vec![
            node("MatMul", &["x", "w"], "y", vec![]),
            node("Clip", &["y", "zero", "six"], "out", vec![]),
        ];
        check(&model(nodes, &[6, C], &["out"]), &["MatMul"]);
    }

    #[test]
    fn nothing_folds_into_a_product_that_is_read_elsewhere_or_not_by_constants() {
        // A bias that varies along another axis ([C, 1, 1]) stays an Add.
        let nodes =
            vec![node("MatMul", &["x", "w"], "y", vec![]), node("Add", &["y", "k"], "out", vec![])];
        check(&model(nodes, &[6, 6], &["out"]), &["MatMul", "Add"]);
        // The product is also a graph output.
        let nodes =
            vec![node("MatMul", &["x", "w"], "y", vec![]), node("Relu", &["y"], "out", vec![])];
        check(&model(nodes, &[6, C], &["y", "out"]), &["MatMul", "Relu"]);
        // Weights that are not constant (x · xᵀ-like: x by itself is not 2-D constant).
        let mut g = model(vec![], &[6, C], &["out"]);
        let graph = g.graph.as_mut().unwrap();
        graph.node = vec![
            node("Transpose", &["x"], "t", vec![ints("perm", &[0, 1, 3, 2])]),
            node("MatMul", &["x", "t"], "y", vec![]),
            node("Relu", &["y"], "out", vec![]),
        ];
        check(&g, &["Transpose", "MatMul", "Relu"]);
    }
}
