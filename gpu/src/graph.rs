//! The ONNX graph as the GPU engine sees it: typed operators with their attributes
//! resolved, constants decoded, BatchNormalization folded into the Conv or Gemm before it
//! and activations fused into the node that produces their input.
//!
//! Everything here is pure; a graph that uses anything the kernels do not implement is
//! refused with [`GpuError::Unsupported`] naming the node, so the caller can serve the
//! model with tract instead.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{
    AttributeProto, ModelProto, NodeProto, TensorProto, tensor_proto,
    tensor_shape_proto::dimension, type_proto,
};

use crate::GpuError;

/// The ONNX operators the GPU engine implements (default domain).
pub const OPERATORS: &[&str] = &[
    "Add",
    "ArgMax",
    "AveragePool",
    "BatchNormalization",
    "Concat",
    "Constant",
    "Conv",
    "Div",
    "Flatten",
    "Gemm",
    "GlobalAveragePool",
    "Identity",
    "LeakyRelu",
    "LogSoftmax",
    "MatMul",
    "MaxPool",
    "Mul",
    "Relu",
    "Reshape",
    "Sigmoid",
    "Softmax",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
];

/// An element-wise function of one value, run alone or fused after another node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `x` when positive, else `alpha * x`.
    LeakyRelu(f32),
    /// `1 / (1 + e^-x)`.
    Sigmoid,
    /// Hyperbolic tangent.
    Tanh,
}

/// A broadcasting arithmetic operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arith {
    /// `a + b`.
    Add,
    /// `a - b`.
    Sub,
    /// `a * b`.
    Mul,
    /// `a / b`.
    Div,
}

/// How a convolution or pool pads its input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Padding {
    /// Explicit pads: begins then ends, one per spatial axis.
    Explicit(Vec<usize>),
    /// `SAME_UPPER` (extra padding at the end) or `SAME_LOWER` (at the start).
    Same {
        /// Whether the odd pad goes at the end.
        upper: bool,
    },
    /// `VALID`: no padding.
    Valid,
}

/// The window of a convolution or pool over one or two spatial axes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Kernel size per spatial axis (from the weights for Conv).
    pub kernel: Vec<usize>,
    /// Strides.
    pub strides: Vec<usize>,
    /// Dilations.
    pub dilations: Vec<usize>,
    /// Padding.
    pub padding: Padding,
    /// Round the output size up (pools).
    pub ceil_mode: bool,
}

/// A pool's reduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    /// Maximum.
    Max,
    /// Mean; `count_include_pad` decides whether padding counts in the divisor.
    Average {
        /// Divide by the full window, padding included.
        count_include_pad: bool,
    },
}

/// An operator the GPU engine runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `act(alpha · A·B + beta · C)`, A and B optionally transposed, C broadcast.
    Gemm {
        /// Scale of the product.
        alpha: f32,
        /// Scale of C.
        beta: f32,
        /// Transpose A.
        trans_a: bool,
        /// Transpose B.
        trans_b: bool,
    },
    /// numpy `matmul`, batched and broadcast.
    MatMul,
    /// Broadcasting arithmetic.
    Arith(Arith),
    /// An activation alone.
    Activation(Activation),
    /// Softmax or log-softmax over one axis (opset ≥ 13) or over the axes from `axis`
    /// on (`legacy`, opsets before 13).
    Softmax {
        /// The axis, possibly negative.
        axis: i64,
        /// Log-softmax.
        log: bool,
        /// Coerce to two dimensions at `axis`, as opsets before 13 did.
        legacy: bool,
    },
    /// The index of the first (or last) maximum along an axis (as a float; the engine casts it).
    ArgMax {
        /// The axis, possibly negative.
        axis: i64,
        /// Keep the reduced axis with size 1.
        keepdims: bool,
        /// Index of the last maximum instead of the first.
        last: bool,
    },
    /// A view with a new shape (Reshape, Flatten, Squeeze, Unsqueeze, Identity): no copy.
    View(ViewKind),
    /// Axis permutation; `None` reverses the axes.
    Transpose(Option<Vec<usize>>),
    /// Concatenation along an axis.
    Concat(i64),
    /// 1-D or 2-D convolution; inputs X, W and optionally a bias.
    Conv {
        /// The window (kernel size from W).
        window: Window,
        /// Channel groups.
        groups: usize,
    },
    /// 1-D or 2-D max or average pool.
    Pool(PoolKind, Window),
    /// Mean over all spatial positions per channel.
    GlobalAveragePool,
    /// Inference batch normalization over axis 1; inputs X, scale, bias, mean, var.
    BatchNorm {
        /// Added to the variance.
        epsilon: f32,
    },
}

/// How a view derives its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewKind {
    /// Reshape to a target with 0 (copy, unless `allowzero`) and -1 (infer).
    Reshape {
        /// The target shape.
        shape: Vec<i64>,
        /// 0 means a zero-sized axis instead of "copy the input's".
        allowzero: bool,
    },
    /// Two dimensions, split at the axis.
    Flatten(i64),
    /// Remove size-1 axes (all of them when `None`).
    Squeeze(Option<Vec<i64>>),
    /// Insert size-1 axes at these output positions.
    Unsqueeze(Vec<i64>),
    /// The same shape.
    Identity,
}

/// One node: an operator, its data inputs (by value name) and its single output.
#[derive(Debug, Clone)]
pub struct Node {
    /// The node's name in the model, for errors and logs.
    pub name: String,
    /// What it computes.
    pub op: Op,
    /// Input value names; `None` for an omitted optional input.
    pub inputs: Vec<Option<String>>,
    /// The output value's name.
    pub output: String,
    /// An activation applied to the output in the same kernel.
    pub activation: Option<Activation>,
}

/// A constant tensor from the model's initializers or Constant nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct Constant {
    /// Its shape.
    pub dims: Vec<usize>,
    /// Its values.
    pub values: Vec<f32>,
}

/// A declared input dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputDim {
    /// A fixed size.
    Fixed(usize),
    /// Named or unknown: bound per run.
    Free,
}

/// A graph input the caller supplies.
#[derive(Debug, Clone)]
pub struct Input {
    /// Its name.
    pub name: String,
    /// Its declared dimensions.
    pub dims: Vec<InputDim>,
}

/// A graph the kernels can run.
#[derive(Debug, Clone)]
pub struct Graph {
    /// The inputs the caller supplies, in order.
    pub inputs: Vec<Input>,
    /// The output value names, in order.
    pub outputs: Vec<String>,
    /// Nodes in an order where every input is computed before use.
    pub nodes: Vec<Node>,
    /// Constant values by name.
    pub constants: HashMap<String, Constant>,
}

fn unsupported(node: &NodeProto, problem: impl Into<String>) -> GpuError {
    GpuError::Unsupported { node: node_label(node), problem: problem.into() }
}

fn node_label(node: &NodeProto) -> String {
    if node.name.is_empty() {
        format!("{} -> {}", node.op_type, node.output.first().map_or("?", String::as_str))
    } else {
        format!("{} ({})", node.name, node.op_type)
    }
}

/// Attributes of one node, by name.
struct Attrs<'a>(&'a NodeProto);

impl Attrs<'_> {
    fn get(&self, name: &str) -> Option<&AttributeProto> {
        self.0.attribute.iter().find(|a| a.name == name)
    }
    fn int(&self, name: &str, default: i64) -> i64 {
        self.get(name).map_or(default, |a| a.i)
    }
    fn float(&self, name: &str, default: f32) -> f32 {
        self.get(name).map_or(default, |a| a.f)
    }
    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.get(name).map(|a| a.ints.clone())
    }
    fn string(&self, name: &str) -> Option<String> {
        self.get(name).map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
}

/// An integer list that must be known at load (a Reshape's shape, Squeeze's axes).
fn constant_ints(
    node: &NodeProto,
    index: usize,
    ints: &HashMap<String, Vec<i64>>,
) -> Result<Option<Vec<i64>>, GpuError> {
    match node.input.get(index).filter(|n| !n.is_empty()) {
        None => Ok(None),
        Some(name) => ints
            .get(name)
            .cloned()
            .map(Some)
            .ok_or_else(|| GpuError::NeedsConstant { node: node_label(node), input: name.clone() }),
    }
}

fn positive(node: &NodeProto, name: &str, values: Vec<i64>) -> Result<Vec<usize>, GpuError> {
    values
        .into_iter()
        .map(|v| usize::try_from(v).ok().filter(|&v| v > 0))
        .collect::<Option<_>>()
        .ok_or_else(|| unsupported(node, format!("{name} must be positive")))
}

fn window(node: &NodeProto, kernel: Vec<usize>) -> Result<Window, GpuError> {
    let a = Attrs(node);
    let spatial = kernel.len();
    if !(1..=2).contains(&spatial) {
        return Err(unsupported(node, format!("{spatial}-D windows (only 1-D and 2-D)")));
    }
    let strides = positive(node, "strides", a.ints("strides").unwrap_or(vec![1; spatial]))?;
    let dilations = positive(node, "dilations", a.ints("dilations").unwrap_or(vec![1; spatial]))?;
    let padding = match a.string("auto_pad").as_deref() {
        None | Some("NOTSET") => {
            let pads = a.ints("pads").unwrap_or(vec![0; 2 * spatial]);
            let pads = pads
                .into_iter()
                .map(|p| usize::try_from(p).ok())
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| unsupported(node, "negative pads"))?;
            Padding::Explicit(pads)
        }
        Some("SAME_UPPER") => Padding::Same { upper: true },
        Some("SAME_LOWER") => Padding::Same { upper: false },
        Some("VALID") => Padding::Valid,
        Some(other) => return Err(unsupported(node, format!("auto_pad {other}"))),
    };
    let window =
        Window { kernel, strides, dilations, padding, ceil_mode: a.int("ceil_mode", 0) != 0 };
    let lengths_ok = window.strides.len() == spatial
        && window.dilations.len() == spatial
        && !matches!(&window.padding, Padding::Explicit(p) if p.len() != 2 * spatial);
    if lengths_ok { Ok(window) } else { Err(unsupported(node, "attribute lengths disagree")) }
}

fn decode_tensor(t: &TensorProto) -> Result<(Vec<usize>, TensorValues), String> {
    use tensor_proto::DataType as T;
    let dims = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("negative dimension {d}")))
        .collect::<Result<Vec<_>, _>>()?;
    let count: usize = dims.iter().product();
    if t.data_location == Some(tensor_proto::DataLocation::External as i32) {
        return Err("external data".into());
    }
    let raw = |width: usize| -> Result<(), String> {
        if t.raw_data.len() == count * width {
            Ok(())
        } else {
            Err(format!("{} raw bytes for {count} elements", t.raw_data.len()))
        }
    };
    let values = match T::try_from(t.data_type).map_err(|_| "unknown element type")? {
        T::Float if t.raw_data.is_empty() => TensorValues::F32(t.float_data.clone()),
        T::Float => {
            raw(4)?;
            TensorValues::F32(
                t.raw_data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        }
        T::Int64 if t.raw_data.is_empty() => TensorValues::I64(t.int64_data.clone()),
        T::Int64 => {
            raw(8)?;
            TensorValues::I64(
                t.raw_data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            )
        }
        other => TensorValues::Other(format!("{other:?}")),
    };
    let len = match &values {
        TensorValues::F32(v) => v.len(),
        TensorValues::I64(v) => v.len(),
        TensorValues::Other(_) => count,
    };
    if len != count {
        return Err(format!("{len} values for shape {dims:?}"));
    }
    Ok((dims, values))
}

/// A decoded tensor's values.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorValues {
    /// float32.
    F32(Vec<f32>),
    /// int64.
    I64(Vec<i64>),
    /// Another element type, by name.
    Other(String),
}

/// Decodes an ONNX `TensorProto` (an initializer, or a test's input or output file).
pub fn decode(t: &TensorProto) -> Result<(Vec<usize>, TensorValues), GpuError> {
    decode_tensor(t).map_err(|problem| GpuError::Unsupported { node: t.name.clone(), problem })
}

fn opset(model: &ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(1, |o| o.version)
}

impl Graph {
    /// Reads `model` into a graph the kernels run, or says why it cannot.
    pub fn from_onnx(model: &ModelProto) -> Result<Self, GpuError> {
        let graph = model.graph.as_ref().ok_or_else(|| GpuError::Unsupported {
            node: "model".into(),
            problem: "no graph".into(),
        })?;
        let opset = opset(model);
        let mut constants = HashMap::new();
        let mut ints = HashMap::new();
        for t in &graph.initializer {
            match decode(t)? {
                (dims, TensorValues::F32(values)) => {
                    constants.insert(t.name.clone(), Constant { dims, values });
                }
                (_, TensorValues::I64(v)) => {
                    ints.insert(t.name.clone(), v);
                }
                (_, TensorValues::Other(ty)) => {
                    return Err(GpuError::Unsupported {
                        node: t.name.clone(),
                        problem: format!("{ty} initializers (float32 only)"),
                    });
                }
            }
        }
        let mut inputs = Vec::new();
        for input in &graph.input {
            if constants.contains_key(&input.name) || ints.contains_key(&input.name) {
                continue; // an initializer also listed as an input (older exporters)
            }
            let problem =
                |p: &str| GpuError::Unsupported { node: input.name.clone(), problem: p.to_owned() };
            let Some(type_proto::Value::TensorType(t)) =
                input.r#type.as_ref().and_then(|t| t.value.as_ref())
            else {
                return Err(problem("not a tensor"));
            };
            if t.elem_type == tensor_proto::DataType::Int64 as i32 {
                // Integer inputs are shapes or axes here: the plan needs them at load.
                return Err(GpuError::NeedsConstant {
                    node: "graph".into(),
                    input: input.name.clone(),
                });
            }
            if t.elem_type != tensor_proto::DataType::Float as i32 {
                return Err(problem("non-float32 input (the GPU engine computes float32)"));
            }
            let shape = t.shape.as_ref().ok_or_else(|| problem("no declared rank"))?;
            let dims = shape
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(dimension::Value::DimValue(v)) if v >= 0 => InputDim::Fixed(v as usize),
                    _ => InputDim::Free,
                })
                .collect();
            inputs.push(Input { name: input.name.clone(), dims });
        }

        let mut nodes = Vec::new();
        for node in &graph.node {
            if !(node.domain.is_empty() || node.domain == "ai.onnx") {
                return Err(unsupported(node, format!("operator domain {:?}", node.domain)));
            }
            if node.op_type == "Constant" {
                constant_node(node, &mut constants, &mut ints)?;
                continue;
            }
            if node.output.iter().filter(|o| !o.is_empty()).count() != 1 {
                return Err(unsupported(node, "more than one output"));
            }
            let op = parse_op(node, opset, &ints)?;
            // A view's other inputs (shape, axes) were read as constants above.
            let data_inputs = if matches!(op, Op::View(_)) { 1 } else { node.input.len() };
            nodes.push(Node {
                name: node_label(node),
                op,
                inputs: node.input[..data_inputs.min(node.input.len())]
                    .iter()
                    .map(|i| (!i.is_empty()).then(|| i.clone()))
                    .collect(),
                output: node.output.iter().find(|o| !o.is_empty()).cloned().unwrap_or_default(),
                activation: None,
            });
        }
        let outputs = graph.output.iter().map(|o| o.name.clone()).collect();
        let mut graph = Self { inputs, outputs, nodes, constants };
        graph.check_arity()?;
        graph.check_defined()?;
        graph.fold_batch_norms();
        graph.fuse_activations();
        Ok(graph)
    }

    /// How many consumers each value has, graph outputs counted.
    fn uses(&self) -> HashMap<&str, usize> {
        let mut uses: HashMap<&str, usize> = HashMap::new();
        for name in self.nodes.iter().flat_map(|n| n.inputs.iter().flatten()) {
            *uses.entry(name).or_default() += 1;
        }
        for name in &self.outputs {
            *uses.entry(name).or_default() += 1;
        }
        uses
    }

    fn check_arity(&self) -> Result<(), GpuError> {
        for node in &self.nodes {
            let present = |i: usize| node.inputs.get(i).is_some_and(Option::is_some);
            let (least, most) = match node.op {
                Op::Gemm { .. } | Op::Conv { .. } => (2, 3),
                Op::MatMul | Op::Arith(_) => (2, 2),
                Op::BatchNorm { .. } => (5, 5),
                Op::Concat(_) => (1, usize::MAX),
                _ => (1, 1),
            };
            if !(0..least).all(present) || node.inputs.len() > most {
                return Err(GpuError::Unsupported {
                    node: node.name.clone(),
                    problem: format!("expects {least} to {most} inputs"),
                });
            }
        }
        Ok(())
    }

    fn check_defined(&self) -> Result<(), GpuError> {
        let mut defined: HashSet<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
        defined.extend(self.constants.keys().map(String::as_str));
        for node in &self.nodes {
            if let Some(missing) =
                node.inputs.iter().flatten().find(|i| !defined.contains(i.as_str()))
            {
                return Err(GpuError::Unsupported {
                    node: node.name.clone(),
                    problem: format!(
                        "input {missing:?} is not computed before it (or is not a float32 constant)"
                    ),
                });
            }
            defined.insert(&node.output);
        }
        match self.outputs.iter().find(|o| !defined.contains(o.as_str())) {
            Some(missing) => Err(GpuError::Unsupported {
                node: "graph".into(),
                problem: format!("output {missing:?} is never computed"),
            }),
            None => Ok(()),
        }
    }

    /// Folds `BatchNormalization` with constant statistics into a Conv, or a Gemm whose
    /// bias broadcasts per column, that feeds only it.
    fn fold_batch_norms(&mut self) {
        let mut i = 0;
        while i < self.nodes.len() {
            if let Some(folded) = self.try_fold(i) {
                self.nodes[folded].output = self.nodes[i].output.clone();
                self.nodes.remove(i);
            } else {
                i += 1;
            }
        }
    }

    fn try_fold(&mut self, bn_index: usize) -> Option<usize> {
        let bn = &self.nodes[bn_index];
        let Op::BatchNorm { epsilon } = bn.op else { return None };
        let x = bn.inputs[0].as_deref()?;
        let stats: Vec<&Constant> = bn.inputs[1..5]
            .iter()
            .map(|n| n.as_deref().and_then(|n| self.constants.get(n)))
            .collect::<Option<_>>()?;
        let producer = self.nodes.iter().position(|n| n.output == x)?;
        if self.uses().get(x) != Some(&1) || self.nodes[producer].activation.is_some() {
            return None;
        }
        let channels = stats[0].values.len();
        if stats.iter().any(|s| s.values.len() != channels) {
            return None;
        }
        let (scale, shift): (Vec<f32>, Vec<f32>) = (0..channels)
            .map(|c| {
                let s = stats[0].values[c] / (stats[3].values[c] + epsilon).sqrt();
                (s, stats[1].values[c] - stats[2].values[c] * s)
            })
            .unzip();
        let node = &self.nodes[producer];
        let weight = self.constants.get(node.inputs[1].as_deref()?)?.clone();
        let bias = match node.inputs.get(2).cloned().flatten() {
            Some(name) => Some(self.constants.get(&name)?.clone()),
            None => None,
        };
        let (weight, bias) = match node.op.clone() {
            Op::Conv { .. } => {
                if weight.dims.first() != Some(&channels) {
                    return None;
                }
                let per = weight.values.len() / channels;
                let mut w = weight.values;
                for (c, chunk) in w.chunks_mut(per).enumerate() {
                    for v in chunk {
                        *v *= scale[c];
                    }
                }
                let b = bias.map_or(vec![0.0; channels], |b| b.values);
                if b.len() != channels {
                    return None;
                }
                let b = (0..channels).map(|c| b[c] * scale[c] + shift[c]).collect();
                (Constant { dims: weight.dims, values: w }, b)
            }
            Op::Gemm { alpha, beta, trans_a, trans_b } => {
                let [rows, cols] = weight.dims[..] else { return None };
                let n = if trans_b { rows } else { cols };
                if n != channels {
                    return None;
                }
                let mut w = weight.values;
                for (index, v) in w.iter_mut().enumerate() {
                    let column = if trans_b { index / cols } else { index % cols };
                    *v *= scale[column] * alpha;
                }
                let c = match bias {
                    None => vec![0.0; n],
                    Some(b) if b.values.len() == 1 => vec![b.values[0]; n],
                    Some(b) if b.values.len() == n && b.dims.last() == Some(&n) => b.values,
                    Some(_) => return None,
                };
                let b = (0..n).map(|j| (beta * c[j]) * scale[j] + shift[j]).collect();
                self.nodes[producer].op = Op::Gemm { alpha: 1.0, beta: 1.0, trans_a, trans_b };
                (Constant { dims: weight.dims, values: w }, b)
            }
            _ => return None,
        };
        let out = self.nodes[producer].output.clone();
        let (w_name, b_name) = (format!("{out}/folded_weight"), format!("{out}/folded_bias"));
        self.constants.insert(w_name.clone(), weight);
        self.constants.insert(b_name.clone(), Constant { dims: vec![channels], values: bias });
        let node = &mut self.nodes[producer];
        node.inputs = vec![node.inputs[0].clone(), Some(w_name), Some(b_name)];
        tracing::debug!(node = %node.name, "batch normalization folded");
        Some(producer)
    }

    /// Moves a lone activation into the Gemm, MatMul, Conv, arithmetic or batch-norm node
    /// before it when that node's output feeds nothing else.
    fn fuse_activations(&mut self) {
        let mut i = 0;
        while i < self.nodes.len() {
            let Op::Activation(act) = self.nodes[i].op else {
                i += 1;
                continue;
            };
            let Some(x) = self.nodes[i].inputs[0].clone() else {
                i += 1;
                continue;
            };
            let producer = self.nodes.iter().position(|n| n.output == x);
            let fusable = producer.is_some_and(|p| {
                let n = &self.nodes[p];
                n.activation.is_none()
                    && matches!(
                        n.op,
                        Op::Gemm { .. }
                            | Op::MatMul
                            | Op::Conv { .. }
                            | Op::Arith(_)
                            | Op::BatchNorm { .. }
                    )
            }) && self.uses().get(x.as_str()) == Some(&1);
            match producer {
                Some(p) if fusable => {
                    self.nodes[p].activation = Some(act);
                    let output = self.nodes[i].output.clone();
                    self.nodes[p].output = output;
                    self.nodes.remove(i);
                }
                _ => i += 1,
            }
        }
    }
}

fn constant_node(
    node: &NodeProto,
    constants: &mut HashMap<String, Constant>,
    ints: &mut HashMap<String, Vec<i64>>,
) -> Result<(), GpuError> {
    let a = Attrs(node);
    let name = node.output.first().cloned().unwrap_or_default();
    if let Some(t) = a.get("value").and_then(|v| v.t.as_ref()) {
        match decode(t)? {
            (dims, TensorValues::F32(values)) => {
                constants.insert(name, Constant { dims, values });
            }
            (_, TensorValues::I64(v)) => {
                ints.insert(name, v);
            }
            (_, TensorValues::Other(ty)) => {
                return Err(unsupported(node, format!("{ty} constant")));
            }
        }
    } else if let Some(f) = a.get("value_float") {
        constants.insert(name, Constant { dims: vec![], values: vec![f.f] });
    } else if let Some(v) = a.ints("value_ints") {
        ints.insert(name, v);
    } else if let Some(i) = a.get("value_int") {
        ints.insert(name, vec![i.i]);
    } else {
        return Err(unsupported(node, "constant kind"));
    }
    Ok(())
}

fn parse_op(
    node: &NodeProto,
    opset: i64,
    ints: &HashMap<String, Vec<i64>>,
) -> Result<Op, GpuError> {
    let a = Attrs(node);
    Ok(match node.op_type.as_str() {
        "Gemm" => Op::Gemm {
            alpha: a.float("alpha", 1.0),
            beta: a.float("beta", 1.0),
            trans_a: a.int("transA", 0) != 0,
            trans_b: a.int("transB", 0) != 0,
        },
        "MatMul" => Op::MatMul,
        "Add" => Op::Arith(Arith::Add),
        "Sub" => Op::Arith(Arith::Sub),
        "Mul" => Op::Arith(Arith::Mul),
        "Div" => Op::Arith(Arith::Div),
        "Relu" => Op::Activation(Activation::Relu),
        "LeakyRelu" => Op::Activation(Activation::LeakyRelu(a.float("alpha", 0.01))),
        "Sigmoid" => Op::Activation(Activation::Sigmoid),
        "Tanh" => Op::Activation(Activation::Tanh),
        "Softmax" | "LogSoftmax" => Op::Softmax {
            axis: a.int("axis", if opset >= 13 { -1 } else { 1 }),
            log: node.op_type == "LogSoftmax",
            legacy: opset < 13,
        },
        "ArgMax" => Op::ArgMax {
            axis: a.int("axis", 0),
            keepdims: a.int("keepdims", 1) != 0,
            last: a.int("select_last_index", 0) != 0,
        },
        "Identity" => Op::View(ViewKind::Identity),
        "Flatten" => Op::View(ViewKind::Flatten(a.int("axis", 1))),
        "Reshape" => Op::View(ViewKind::Reshape {
            shape: constant_ints(node, 1, ints)?.ok_or_else(|| unsupported(node, "no shape"))?,
            allowzero: a.int("allowzero", 0) != 0,
        }),
        "Squeeze" => Op::View(ViewKind::Squeeze(match a.ints("axes") {
            Some(axes) => Some(axes),
            None => constant_ints(node, 1, ints)?,
        })),
        "Unsqueeze" => Op::View(ViewKind::Unsqueeze(match a.ints("axes") {
            Some(axes) => axes,
            None => constant_ints(node, 1, ints)?.ok_or_else(|| unsupported(node, "no axes"))?,
        })),
        "Transpose" => Op::Transpose(
            a.ints("perm")
                .map(|p| p.into_iter().map(|v| usize::try_from(v).ok()).collect::<Option<Vec<_>>>())
                .map(|p| p.ok_or_else(|| unsupported(node, "negative perm")))
                .transpose()?,
        ),
        "Concat" => Op::Concat(a.get("axis").ok_or_else(|| unsupported(node, "no axis"))?.i),
        "Conv" => {
            // The kernel size comes from the weights at plan time; the attribute, when
            // present, fixes the window's rank.
            let rank = ["kernel_shape", "strides", "dilations"]
                .iter()
                .find_map(|name| a.ints(name).map(|v| v.len()))
                .or_else(|| a.ints("pads").map(|p| p.len() / 2))
                .unwrap_or(2);
            let kernel = match a.ints("kernel_shape") {
                Some(k) => positive(node, "kernel_shape", k)?,
                None => vec![1; rank],
            };
            let groups = usize::try_from(a.int("group", 1)).ok().filter(|&g| g > 0);
            let groups = groups.ok_or_else(|| unsupported(node, "group must be positive"))?;
            let mut window = window(node, kernel)?;
            if a.ints("kernel_shape").is_none() {
                window.kernel.clear(); // taken from the weights
            }
            Op::Conv { window, groups }
        }
        "MaxPool" | "AveragePool" => {
            let kernel = positive(
                node,
                "kernel_shape",
                a.ints("kernel_shape").ok_or_else(|| unsupported(node, "no kernel_shape"))?,
            )?;
            if node.op_type == "MaxPool" && a.int("storage_order", 0) != 0 {
                return Err(unsupported(node, "storage_order 1"));
            }
            let kind = if node.op_type == "MaxPool" {
                PoolKind::Max
            } else {
                PoolKind::Average { count_include_pad: a.int("count_include_pad", 0) != 0 }
            };
            Op::Pool(kind, window(node, kernel)?)
        }
        "GlobalAveragePool" => Op::GlobalAveragePool,
        "BatchNormalization" => {
            if a.int("training_mode", 0) != 0 {
                return Err(unsupported(node, "training mode"));
            }
            Op::BatchNorm { epsilon: a.float("epsilon", 1e-5) }
        }
        other => return Err(unsupported(node, format!("operator {other}"))),
    })
}
