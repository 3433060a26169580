//! Loading an ONNX model into tract plans, its signature, and running it.
//!
//! A model is planned once for every input size when tract can settle its shapes
//! symbolically. When it cannot (shape arithmetic on symbols that only works out for
//! some sizes, branches whose shapes differ), the shapes given at load
//! ([`LoadOptions::shapes`], from `bundle build --input-shape`) are tried with their
//! fixed sizes pinned and their ranges symbolic, and failing that the model is planned
//! per concrete input shape: the first plan at load, then one per new request shape, in
//! a bounded least-recently-used cache.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use prost::Message;
use thiserror::Error;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::{
    Framework, InferenceFact, InferenceModel, InferenceModelExt, IntoRunnable, TDim, TValue, TVec,
    TypedModel, TypedRunnableModel, tvec,
};
use tract_onnx::tract_hir::internal::Factoid;

use super::convert::{datatype, datum_type, declared_output_type, from_tract, to_tract};
use crate::tensor::{Dim, Extent, InputShape, Signature, Tensor, TensorSpec};

/// Why a model could not be loaded.
#[derive(Debug, Error)]
pub enum OnnxError {
    /// The bytes are not an ONNX protobuf.
    #[error("not an ONNX model: {0}")]
    Decode(String),
    /// tract could not load, type or plan the graph (an unsupported operator, say).
    #[error("tract cannot load the model: {0}")]
    Load(String),
    /// A node uses an operator the CPU engine does not have.
    #[error("node {node:?} uses operator {operator}, which the CPU engine does not support")]
    Operator {
        /// The node's name (or its first output's, when it has none).
        node: String,
        /// `domain:op_type` (the default domain as `ai.onnx`).
        operator: String,
    },
    /// An input or output has a type or shape Falaj cannot serve.
    #[error("{tensor:?}: {problem}")]
    Unsupported {
        /// The tensor.
        tensor: String,
        /// What is wrong with it.
        problem: String,
    },
}

/// Why a run failed.
#[derive(Debug, Error)]
pub enum RunError {
    /// An input's element count does not match its shape.
    #[error("input {index}: {elements} elements do not fill shape {shape:?}")]
    InputSize {
        /// The input's index in the signature.
        index: usize,
        /// Elements given.
        elements: usize,
        /// The shape.
        shape: Vec<u64>,
    },
    /// The wrong number of inputs.
    #[error("the model takes {expected} inputs, {got} given")]
    InputCount {
        /// Inputs the model takes.
        expected: usize,
        /// Inputs given.
        got: usize,
    },
    /// An input element the model cannot take (a byte string that is not UTF-8).
    #[error("input {index}: element {element} {problem}")]
    Element {
        /// The input's index in the signature.
        index: usize,
        /// The element's index.
        element: usize,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// An input's size on an axis is outside the range the model was planned for.
    #[error("input {input:?} has size {got} on axis {axis}; the model is planned for {allowed}")]
    Shape {
        /// The input's name.
        input: String,
        /// The axis.
        axis: usize,
        /// The size given.
        got: u64,
        /// What the model allows there (`1..64`, say).
        allowed: String,
    },
    /// tract could not plan the model for these input shapes.
    #[error("the model cannot be planned for input shapes {shapes:?}: {reason}")]
    Plan {
        /// The request's input shapes.
        shapes: Vec<Vec<u64>>,
        /// tract's reason.
        reason: String,
    },
    /// tract failed while running (for example, sizes that the graph cannot combine).
    #[error("{0}")]
    Execution(String),
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Shapes to plan inputs for, by input name (`bundle build --input-shape`).
    pub shapes: BTreeMap<String, InputShape>,
    /// Most plans kept for a model planned per input shape.
    pub plan_cache: NonZeroUsize,
    /// Threads one inference of a convolutional model may use for the rows of its batch.
    pub threads: NonZeroUsize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            shapes: BTreeMap::new(),
            plan_cache: NonZeroUsize::new(8).expect("8 is not zero"),
            threads: NonZeroUsize::MIN,
        }
    }
}

/// How a loaded model is planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planning {
    /// One plan for every input size.
    Symbolic,
    /// A plan per concrete input shape.
    PerShape,
}

impl fmt::Display for Planning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Symbolic => "one plan for all sizes",
            Self::PerShape => "a plan per input shape",
        })
    }
}

/// A model loaded, optimised and planned; run it any number of times, from any number
/// of threads.
#[derive(Clone)]
pub struct OnnxModel {
    plans: Plans,
    signature: Signature,
    /// Per input, in signature order: the sizes it was planned for, if given.
    shapes: Vec<Option<InputShape>>,
    /// Rows of a batch run one by one (on up to `threads` threads): a convolutional
    /// model whose every input and output has a free first axis. tract's kernels for
    /// one image beat its batched ones, whose per-channel broadcasts take a slow path.
    rows_apart: bool,
    threads: usize,
}

#[derive(Clone)]
enum Plans {
    One(Arc<TypedRunnableModel>),
    PerShape(Arc<ShapePlans>),
}

impl fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnnxModel")
            .field("signature", &self.signature)
            .field("planning", &self.planning())
            .finish_non_exhaustive()
    }
}

/// Plans made per concrete input shape, the least recently used dropped first.
struct ShapePlans {
    /// The model as declared; each plan sets its inputs' concrete shapes.
    base: InferenceModel,
    cache: Mutex<lru::LruCache<Vec<Vec<usize>>, Arc<TypedRunnableModel>>>,
}

/// Prefix of the symbols given to input dimensions the model leaves unnamed.
const UNNAMED_PREFIX: &str = "falaj_unnamed_";

pub(super) fn load_error(err: &impl fmt::Display) -> OnnxError {
    OnnxError::Load(format!("{err:#}"))
}

fn dim(d: &TDim) -> Dim {
    match d {
        TDim::Val(v) => u64::try_from(*v).map_or(Dim::Any, Dim::Fixed),
        TDim::Sym(s) => {
            let name = s.to_string();
            if name.starts_with(UNNAMED_PREFIX) { Dim::Any } else { Dim::Symbol(name) }
        }
        _ => Dim::Any,
    }
}

/// An input as the graph declares it: a fixed size, a named symbol or nothing per axis.
struct Declared {
    name: String,
    dt: tract_onnx::prelude::DatumType,
    dims: Vec<Option<Declare>>,
}

/// One declared axis. Symbols are kept by name: each parse of the graph has symbols of
/// its own, and one model's must not leak into another's.
#[derive(Clone)]
enum Declare {
    Size(i64),
    Named(String),
}

impl Declare {
    fn of(d: &TDim) -> Option<Self> {
        match d {
            TDim::Val(v) => Some(Self::Size(*v)),
            TDim::Sym(s) => Some(Self::Named(s.to_string())),
            _ => None,
        }
    }

    fn in_model(&self, model: &InferenceModel) -> TDim {
        match self {
            Self::Size(v) => TDim::Val(*v),
            Self::Named(name) => TDim::Sym(model.symbols.sym(name)),
        }
    }

    fn size(&self) -> Option<i64> {
        match self {
            Self::Size(v) => Some(*v),
            Self::Named(_) => None,
        }
    }
}

/// How one attempt sets the input facts.
#[derive(Clone, Copy)]
enum Facts<'a> {
    /// Unnamed axes get symbols of their own, or (`shared_batch`) the first axes of all
    /// inputs share one.
    Symbolic { shared_batch: bool },
    /// The given shapes' fixed sizes, symbols for their ranges.
    Pinned(&'a BTreeMap<String, InputShape>),
    /// Every axis concrete.
    Concrete(&'a [Vec<usize>]),
}

impl Declared {
    fn facts(&self, model: &InferenceModel, i: usize, how: Facts<'_>) -> Vec<TDim> {
        let free = |axis: usize, shared: bool| {
            let name = if shared && axis == 0 {
                format!("{UNNAMED_PREFIX}batch")
            } else {
                format!("{UNNAMED_PREFIX}{i}_{axis}")
            };
            TDim::Sym(model.symbols.sym(&name))
        };
        self.dims
            .iter()
            .enumerate()
            .map(|(axis, d)| match how {
                Facts::Concrete(shapes) => TDim::Val(shapes[i][axis] as i64),
                Facts::Pinned(shapes) => match shapes.get(&self.name).map(|s| s.0[axis]) {
                    Some(Extent::Exactly(n)) => TDim::Val(n as i64),
                    _ => d.as_ref().map_or_else(|| free(axis, false), |d| d.in_model(model)),
                },
                Facts::Symbolic { shared_batch } => {
                    d.as_ref().map_or_else(|| free(axis, shared_batch), |d| d.in_model(model))
                }
            })
            .collect()
    }
}

fn with_facts(
    base: &InferenceModel,
    declared: &[Declared],
    how: Facts<'_>,
) -> Result<InferenceModel, OnnxError> {
    let mut model = base.clone();
    for (i, input) in declared.iter().enumerate() {
        let dims = input.facts(&model, i, how);
        model
            .set_input_fact(i, InferenceFact::dt_shape(input.dt, dims))
            .map_err(|e| load_error(&e))?;
    }
    Ok(model)
}

fn optimise(model: InferenceModel) -> Result<TypedModel, OnnxError> {
    model.into_typed().and_then(TypedModel::into_optimized).map_err(|e| load_error(&e))
}

impl OnnxModel {
    /// Loads a model from ONNX protobuf bytes with default options: decodes, types,
    /// optimises and plans it. Dimensions the model leaves unnamed get a symbol of their
    /// own, so one plan serves every size.
    pub fn load(bytes: &[u8]) -> Result<Self, OnnxError> {
        Self::load_with(bytes, &LoadOptions::default())
    }

    /// Loads a model, planned for `options.shapes` when its shapes cannot be settled
    /// symbolically.
    pub fn load_with(bytes: &[u8], options: &LoadOptions) -> Result<Self, OnnxError> {
        // A model is outside input: a panic inside tract on a strange graph is a refusal,
        // not a crash.
        catch(|| Self::load_unguarded(bytes, options))
            .unwrap_or_else(|panic| Err(OnnxError::Load(panic)))
    }

    fn load_unguarded(bytes: &[u8], options: &LoadOptions) -> Result<Self, OnnxError> {
        let mut proto = ModelProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))?;
        if proto.graph.is_none() {
            return Err(OnnxError::Decode("the model has no graph".into()));
        }
        let mut onnx = tract_onnx::onnx();
        falaj_operators::register(&mut onnx.op_register);
        if let Some(graph) = &mut proto.graph {
            check_operators(graph, &onnx.op_register)?;
            // What follows a convolution (batch norms, scales, activations) goes into it,
            // and the bias and activation after a product by constant weights into that.
            falaj_operators::nn::fold::fold_convolutions(graph);
            falaj_operators::nn::fold::fold_matmuls(graph);
        }
        let base = onnx.model_for_proto_model(&proto).map_err(|e| load_error(&e))?;
        let declared = declared_inputs(&base)?;
        // Given shapes are planned without the graph's intermediate shape annotations,
        // whose symbols (exporters' `batch`, `height`) would not bind to the sizes given.
        let mut concrete_base = || {
            onnx.ignore_value_info = true;
            onnx.model_for_proto_model(&proto).map_err(|e| load_error(&e))
        };
        let shapes = check_shapes(&declared, &options.shapes)?;

        let mut attempts = vec![Facts::Symbolic { shared_batch: false }];
        if declared.iter().filter(|d| d.dims.first().is_some_and(Option::is_none)).count() > 1 {
            attempts.push(Facts::Symbolic { shared_batch: true });
        }
        if !options.shapes.is_empty() {
            attempts.push(Facts::Pinned(&options.shapes));
        }
        let mut first_error = None;
        let mut plain = None;
        let convolutional = proto.graph.as_ref().is_some_and(has_convolutions);
        for how in attempts {
            let model = match how {
                Facts::Symbolic { .. } => &base,
                _ => plain.get_or_insert(concrete_base()?),
            };
            match with_facts(model, &declared, how).and_then(optimise) {
                Ok(optimized) => {
                    let outputs = typed_outputs(&proto, &optimized)?;
                    let signature =
                        Signature { inputs: input_specs(&declared, &options.shapes)?, outputs };
                    if !convolutional {
                        let runnable = optimized.into_runnable().map_err(|e| load_error(&e))?;
                        return Ok(Self::new(
                            Plans::One(runnable),
                            signature,
                            shapes,
                            false,
                            options,
                        ));
                    }
                    // tract picks its fast convolutions (depthwise, direct, lazy im2col)
                    // only for concrete shapes: plan per shape, the symbolic plan having
                    // shown the model loads; the first plan now when its shape is known.
                    let base = match plain {
                        Some(plain) => plain,
                        None => concrete_base()?,
                    };
                    let per_shape = ShapePlans::new(base, options.plan_cache);
                    if let Some(first) = first_shapes(&declared, &options.shapes, false) {
                        let runnable = per_shape.make(&declared_facts(&declared, &first))?;
                        per_shape.insert(first, runnable);
                    }
                    let per_shape = Plans::PerShape(Arc::new(per_shape));
                    return Ok(Self::new(per_shape, signature, shapes, true, options));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let first_error = first_error.expect("at least one attempt was made");
        if options.shapes.is_empty() {
            return Err(hint(first_error, &base, &declared));
        }
        // Per shape: the first plan, for every axis's least size, made now.
        let first = first_shapes(&declared, &options.shapes, true).expect("every axis has a size");
        let base = match plain {
            Some(plain) => plain,
            None => concrete_base()?,
        };
        let optimized = with_facts(&base, &declared, Facts::Concrete(&first)).and_then(optimise)?;
        let outputs = declared_outputs(&proto, typed_outputs(&proto, &optimized)?);
        let runnable = optimized.into_runnable().map_err(|e| load_error(&e))?;
        let per_shape = ShapePlans::new(base, options.plan_cache);
        per_shape.insert(first, runnable);
        let signature = Signature { inputs: input_specs(&declared, &options.shapes)?, outputs };
        let per_shape = Plans::PerShape(Arc::new(per_shape));
        Ok(Self::new(per_shape, signature, shapes, convolutional, options))
    }

    fn new(
        plans: Plans,
        signature: Signature,
        shapes: Vec<Option<InputShape>>,
        convolutional: bool,
        options: &LoadOptions,
    ) -> Self {
        let free_first = |specs: &[TensorSpec]| {
            specs.iter().all(|t| matches!(t.shape.first(), Some(Dim::Symbol(_) | Dim::Any)))
        };
        let rows_apart = convolutional
            && !signature.inputs.is_empty()
            && free_first(&signature.inputs)
            && free_first(&signature.outputs);
        Self { plans, signature, shapes, rows_apart, threads: options.threads.get() }
    }

    /// The model's inputs and outputs.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// How the model is planned.
    pub fn planning(&self) -> Planning {
        match self.plans {
            Plans::One(_) => Planning::Symbolic,
            Plans::PerShape(_) => Planning::PerShape,
        }
    }

    /// Plans held (1 for a model planned once).
    pub fn plans(&self) -> usize {
        match &self.plans {
            Plans::One(_) => 1,
            Plans::PerShape(p) => p.cache.lock().map_or(0, |c| c.len()),
        }
    }

    /// Runs the model on `inputs`, given in signature order; returns every output in
    /// signature order. Shapes must already fit the signature (see
    /// [`Signature::bind`]); symbolic sizes are resolved from them for this run.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        catch(|| self.run_unguarded(inputs)).unwrap_or_else(|panic| Err(RunError::Execution(panic)))
    }

    fn run_unguarded(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        if inputs.len() != self.signature.inputs.len() {
            return Err(RunError::InputCount {
                expected: self.signature.inputs.len(),
                got: inputs.len(),
            });
        }
        for ((input, spec), shape) in inputs.iter().zip(&self.signature.inputs).zip(&self.shapes) {
            let Some(shape) = shape else { continue };
            for (axis, (&got, extent)) in input.shape.iter().zip(&shape.0).enumerate() {
                if !extent.allows(got) {
                    let allowed = extent.to_string();
                    return Err(RunError::Shape { input: spec.name.clone(), axis, got, allowed });
                }
            }
        }
        let rows = inputs.first().and_then(|t| t.shape.first().copied()).unwrap_or(1);
        if self.rows_apart && rows > 1 && inputs.iter().all(|t| t.shape.first() == Some(&rows)) {
            return self.run_rows(&inputs);
        }
        self.run_once(inputs)
    }

    /// A batch row by row, on up to `threads` threads, the outputs stacked back.
    fn run_rows(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, RunError> {
        let mut split: Vec<std::vec::IntoIter<Tensor>> =
            inputs.iter().map(|t| t.split_rows().into_iter()).collect();
        let rows: Vec<Vec<Tensor>> = (0..inputs[0].shape[0])
            .map(|_| {
                split.iter_mut().map(|s| s.next().expect("every input has the rows")).collect()
            })
            .collect();
        let chunk = rows.len().div_ceil(self.threads.max(1));
        let results: Vec<Result<Vec<Vec<Tensor>>, RunError>> = if chunk >= rows.len() {
            vec![rows.into_iter().map(|row| self.run_once(row)).collect()]
        } else {
            std::thread::scope(|scope| {
                let mut rows = rows.into_iter();
                let handles: Vec<_> = (0..rows.len().div_ceil(chunk))
                    .map(|_| {
                        let mine: Vec<Vec<Tensor>> = rows.by_ref().take(chunk).collect();
                        scope
                            .spawn(move || mine.into_iter().map(|row| self.run_once(row)).collect())
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(RunError::Execution("a row's run panicked".into()))
                        })
                    })
                    .collect()
            })
        };
        let mut per_output: Vec<Vec<Tensor>> = vec![Vec::new(); self.signature.outputs.len()];
        for part in results {
            for outputs in part? {
                for (o, t) in per_output.iter_mut().zip(outputs) {
                    o.push(t);
                }
            }
        }
        per_output
            .into_iter()
            .zip(&self.signature.outputs)
            .map(|(parts, spec)| {
                Tensor::stack_rows(parts).ok_or_else(|| {
                    RunError::Execution(format!(
                        "output {:?} has no common shape across the rows",
                        spec.name
                    ))
                })
            })
            .collect()
    }

    fn run_once(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        let plan = match &self.plans {
            Plans::One(plan) => Arc::clone(plan),
            Plans::PerShape(plans) => plans.plan(&inputs)?,
        };
        let mut values: TVec<TValue> = tvec![];
        for (index, input) in inputs.into_iter().enumerate() {
            values.push(to_tract(index, input)?.into());
        }
        let outputs = plan.run(values).map_err(|e| RunError::Execution(format!("{e:#}")))?;
        outputs
            .iter()
            .zip(&self.signature.outputs)
            .map(|(value, spec)| {
                let cast = value
                    .cast_to_dt(datum_type(spec.datatype))
                    .map_err(|e| RunError::Execution(format!("{e:#}")))?;
                from_tract(&cast)
            })
            .collect()
    }
}

impl ShapePlans {
    fn new(base: InferenceModel, capacity: NonZeroUsize) -> Self {
        Self { base, cache: Mutex::new(lru::LruCache::new(capacity)) }
    }

    fn insert(&self, shapes: Vec<Vec<usize>>, plan: Arc<TypedRunnableModel>) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.put(shapes, plan);
        }
    }

    /// A plan for inputs of these element types and concrete shapes.
    fn make(
        &self,
        inputs: &[(Option<tract_onnx::prelude::DatumType>, &[usize])],
    ) -> Result<Arc<TypedRunnableModel>, OnnxError> {
        let mut model = self.base.clone();
        for (i, (dt, shape)) in inputs.iter().enumerate() {
            let dims: Vec<TDim> = shape.iter().map(|&d| TDim::Val(d as i64)).collect();
            let dt = match dt {
                Some(dt) => *dt,
                None => model
                    .input_fact(i)
                    .map_err(|e| load_error(&e))?
                    .datum_type
                    .concretize()
                    .ok_or_else(|| OnnxError::Load(format!("input {i} has no element type")))?,
            };
            model
                .set_input_fact(i, InferenceFact::dt_shape(dt, dims))
                .map_err(|e| load_error(&e))?;
        }
        model
            .into_typed()
            .and_then(TypedModel::into_optimized)
            .and_then(TypedModel::into_runnable)
            .map_err(|e| load_error(&e))
    }

    /// The plan for these inputs' shapes, made now if it is not held.
    fn plan(&self, inputs: &[Tensor]) -> Result<Arc<TypedRunnableModel>, RunError> {
        let key: Vec<Vec<usize>> =
            inputs.iter().map(|t| t.shape.iter().map(|&d| d as usize).collect()).collect();
        if let Some(plan) = self.cache.lock().map_err(|_| poisoned())?.get(&key) {
            return Ok(Arc::clone(plan));
        }
        // Planned outside the lock: other shapes keep being served meanwhile.
        let wanted: Vec<(Option<tract_onnx::prelude::DatumType>, &[usize])> =
            key.iter().map(|s| (None, s.as_slice())).collect();
        let plan = self.make(&wanted).map_err(|e| RunError::Plan {
            shapes: inputs.iter().map(|t| t.shape.clone()).collect(),
            reason: match e {
                OnnxError::Load(reason) => reason,
                other => other.to_string(),
            },
        })?;
        self.insert(key, Arc::clone(&plan));
        Ok(plan)
    }
}

/// Whether a graph (or a subgraph) convolves.
fn has_convolutions(graph: &tract_onnx::pb::GraphProto) -> bool {
    graph.node.iter().any(|n| {
        matches!(n.op_type.as_str(), "Conv" | "ConvTranspose" | "ConvInteger" | "QLinearConv")
            || n.attribute.iter().any(|a| a.g.as_ref().is_some_and(has_convolutions))
    })
}

/// The shape of each input for the plan made at load: the given shapes' least sizes, the
/// declared sizes, and 1 for a free first axis (a batch) or, with `fill`, any free axis;
/// `None` when an axis has no size.
fn first_shapes(
    declared: &[Declared],
    shapes: &BTreeMap<String, InputShape>,
    fill: bool,
) -> Option<Vec<Vec<usize>>> {
    declared
        .iter()
        .map(|d| match shapes.get(&d.name) {
            Some(s) => Some(s.first().into_iter().map(|n| n as usize).collect()),
            None => d
                .dims
                .iter()
                .enumerate()
                .map(|(axis, x)| match x.as_ref().and_then(Declare::size) {
                    Some(n) => Some(n as usize),
                    None if fill || axis == 0 => Some(1),
                    None => None,
                })
                .collect(),
        })
        .collect()
}

fn declared_facts<'a>(
    declared: &[Declared],
    shapes: &'a [Vec<usize>],
) -> Vec<(Option<tract_onnx::prelude::DatumType>, &'a [usize])> {
    declared.iter().zip(shapes).map(|(d, s)| (Some(d.dt), s.as_slice())).collect()
}

/// The domains whose operators the engine may have: ONNX's own and ONNX-ML.
const DOMAINS: [&str; 3] = ["", "ai.onnx", "ai.onnx.ml"];

/// Refuses the first node (in subgraphs too) whose operator has no implementation.
fn check_operators(
    graph: &tract_onnx::pb::GraphProto,
    ops: &tract_onnx::model::OnnxOpRegister,
) -> Result<(), OnnxError> {
    for node in &graph.node {
        if !DOMAINS.contains(&node.domain.as_str()) || !ops.0.contains_key(&node.op_type) {
            let domain = if node.domain.is_empty() { "ai.onnx" } else { node.domain.as_str() };
            let name = if node.name.is_empty() {
                node.output.first().cloned().unwrap_or_default()
            } else {
                node.name.clone()
            };
            return Err(OnnxError::Operator {
                node: name,
                operator: format!("{domain}:{}", node.op_type),
            });
        }
        for attr in &node.attribute {
            if let Some(g) = &attr.g {
                check_operators(g, ops)?;
            }
            for g in &attr.graphs {
                check_operators(g, ops)?;
            }
        }
    }
    Ok(())
}

/// Every operator the CPU engine implements, as `domain:op_type`, sorted.
pub fn supported_operators() -> Vec<String> {
    let mut onnx = tract_onnx::onnx();
    falaj_operators::register(&mut onnx.op_register);
    let ml: std::collections::BTreeSet<&str> = falaj_operators::OPERATORS.iter().copied().collect();
    let mut out: Vec<String> = onnx
        .op_register
        .0
        .keys()
        .map(|op| {
            if ml.contains(op.as_str()) && op != "If" {
                format!("ai.onnx.ml:{op}")
            } else {
                format!("ai.onnx:{op}")
            }
        })
        .collect();
    out.sort();
    out
}

/// Runs `f`, turning a panic into its message.
fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        format!("tract panicked: {message}")
    })
}

fn poisoned() -> RunError {
    RunError::Execution("the plan cache's lock was poisoned by a panic".into())
}

fn declared_inputs(model: &InferenceModel) -> Result<Vec<Declared>, OnnxError> {
    let outlets = model.input_outlets().map_err(|e| load_error(&e))?.to_vec();
    let mut out = Vec::with_capacity(outlets.len());
    for (i, outlet) in outlets.into_iter().enumerate() {
        let name = model.node(outlet.node).name.clone();
        let fact = model.input_fact(i).map_err(|e| load_error(&e))?;
        let dt = fact.datum_type.concretize().ok_or_else(|| OnnxError::Unsupported {
            tensor: name.clone(),
            problem: "the model does not declare its element type".into(),
        })?;
        if fact.shape.is_open() {
            return Err(OnnxError::Unsupported {
                tensor: name,
                problem: "the model does not declare its rank".into(),
            });
        }
        let dims =
            fact.shape.dims().map(|d| d.concretize().and_then(|d| Declare::of(&d))).collect();
        out.push(Declared { name, dt, dims });
    }
    Ok(out)
}

/// The given shapes per input in declared order, each checked against the declaration.
fn check_shapes(
    declared: &[Declared],
    shapes: &BTreeMap<String, InputShape>,
) -> Result<Vec<Option<InputShape>>, OnnxError> {
    if let Some(unknown) = shapes.keys().find(|k| !declared.iter().any(|d| &d.name == *k)) {
        return Err(OnnxError::Unsupported {
            tensor: unknown.clone(),
            problem: "the model has no such input".into(),
        });
    }
    declared
        .iter()
        .map(|d| {
            let Some(shape) = shapes.get(&d.name) else { return Ok(None) };
            let bad = |problem: String| OnnxError::Unsupported { tensor: d.name.clone(), problem };
            if shape.0.len() != d.dims.len() {
                return Err(bad(format!(
                    "shape {shape} has rank {}, the model declares {}",
                    shape.0.len(),
                    d.dims.len()
                )));
            }
            for (axis, (extent, declared)) in shape.0.iter().zip(&d.dims).enumerate() {
                if let Some(Declare::Size(n)) = declared
                    && *extent != Extent::Exactly(*n as u64)
                {
                    return Err(bad(format!(
                        "shape {shape} gives {extent} on axis {axis}, the model declares {n}"
                    )));
                }
            }
            Ok(Some(shape.clone()))
        })
        .collect()
}

fn input_specs(
    declared: &[Declared],
    shapes: &BTreeMap<String, InputShape>,
) -> Result<Vec<TensorSpec>, OnnxError> {
    declared
        .iter()
        .map(|d| {
            let pinned = shapes.get(&d.name);
            let shape = d
                .dims
                .iter()
                .enumerate()
                .map(|(axis, x)| match (pinned.map(|s| s.0[axis]), x) {
                    (Some(Extent::Exactly(n)), _) => Dim::Fixed(n),
                    (_, Some(Declare::Size(n))) => u64::try_from(*n).map_or(Dim::Any, Dim::Fixed),
                    (_, Some(Declare::Named(s))) if !s.starts_with(UNNAMED_PREFIX) => {
                        Dim::Symbol(s.clone())
                    }
                    (_, Some(Declare::Named(_)) | None) => Dim::Any,
                })
                .collect();
            Ok(TensorSpec { datatype: datatype(d.dt, &d.name)?, name: d.name.clone(), shape })
        })
        .collect()
}

/// Outputs as the optimised model types them. Their facts are read after optimisation:
/// before it, tract may still type an output as a symbolic dimension (`TDim`) that a
/// later cast makes concrete.
fn typed_outputs(proto: &ModelProto, optimized: &TypedModel) -> Result<Vec<TensorSpec>, OnnxError> {
    let mut outputs = Vec::new();
    for (i, outlet) in optimized.output_outlets().map_err(|e| load_error(&e))?.iter().enumerate() {
        let name = optimized
            .outlet_label(*outlet)
            .map_or_else(|| optimized.node(outlet.node).name.clone(), str::to_owned);
        let fact = optimized.output_fact(i).map_err(|e| load_error(&e))?;
        let shape = fact.shape.iter().map(dim).collect();
        // tract may carry an integer output as a symbolic dimension (`TDim`); the graph's
        // declaration is what clients expect, and `run` casts to it.
        let dt = declared_output_type(proto, &name).unwrap_or(fact.datum_type);
        outputs.push(TensorSpec { datatype: datatype(dt, &name)?, name, shape });
    }
    Ok(outputs)
}

/// For a model planned per shape, outputs' shapes as the graph declares them (a plan's
/// concrete sizes hold for its shape only).
fn declared_outputs(proto: &ModelProto, typed: Vec<TensorSpec>) -> Vec<TensorSpec> {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value as D;
    use tract_onnx::pb::type_proto::Value;
    let declared = |name: &str| -> Option<Vec<Dim>> {
        let output = proto.graph.as_ref()?.output.iter().find(|o| o.name == name)?;
        let Some(Value::TensorType(t)) = output.r#type.as_ref()?.value.as_ref() else {
            return None;
        };
        let dims = t.shape.as_ref()?.dim.iter().map(|d| match &d.value {
            Some(D::DimValue(v)) if *v >= 0 => Dim::Fixed(*v as u64),
            Some(D::DimParam(p))
                if !p.is_empty() && p.chars().all(|c| c.is_alphanumeric() || c == '_') =>
            {
                Dim::Symbol(p.clone())
            }
            _ => Dim::Any,
        });
        Some(dims.collect())
    };
    typed
        .into_iter()
        .map(|mut spec| {
            spec.shape = declared(&spec.name)
                .filter(|d| d.len() == spec.shape.len())
                .unwrap_or_else(|| vec![Dim::Any; spec.shape.len()]);
            spec
        })
        .collect()
}

/// The load error, with the way out when the model loads once its shapes are concrete.
fn hint(error: OnnxError, base: &InferenceModel, declared: &[Declared]) -> OnnxError {
    let guess: Vec<Vec<usize>> = declared
        .iter()
        .map(|d| {
            d.dims
                .iter()
                .map(|x| x.as_ref().and_then(Declare::size).unwrap_or(1) as usize)
                .collect()
        })
        .collect();
    let concrete = with_facts(base, declared, Facts::Concrete(&guess)).and_then(optimise);
    match (error, concrete) {
        (OnnxError::Load(reason), Ok(_)) => OnnxError::Load(format!(
            "{reason} (the shapes cannot be settled symbolically, but the model loads for concrete \
             shapes: give the shapes to plan for with --input-shape NAME=d0,d1,... for each input, \
             ranges as min..max)"
        )),
        (error, _) => error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::{Attr, GraphBuilder};
    use crate::tensor::{DataType, TensorData};

    /// `y = concat([a, b], axis 1)` over `a: [A, 2]`, `b: [B, 2]`: the rows of A and B
    /// must agree, which tract cannot know of two symbols, so no symbolic plan exists.
    fn concat_model() -> Vec<u8> {
        let mut g = GraphBuilder::new("concat");
        g.input("a", DataType::Fp32, &[Dim::Symbol("A".into()), Dim::Fixed(2)]);
        g.input("b", DataType::Fp32, &[Dim::Symbol("B".into()), Dim::Fixed(2)]);
        g.node("Concat", &["a", "b"], &["y"], vec![Attr::Int("axis", 1)]);
        g.output("y", DataType::Fp32, &[Dim::Symbol("A".into()), Dim::Fixed(4)]);
        g.encode("test")
    }

    fn rows(n: u64, v: f32) -> Tensor {
        Tensor { shape: vec![n, 2], data: TensorData::Fp32(vec![v; n as usize * 2]) }
    }

    fn options(shapes: &[(&str, &str)], cache: usize) -> LoadOptions {
        LoadOptions {
            shapes: shapes.iter().map(|(n, s)| ((*n).to_owned(), s.parse().unwrap())).collect(),
            plan_cache: NonZeroUsize::new(cache).unwrap(),
            threads: NonZeroUsize::MIN,
        }
    }

    #[test]
    fn shapes_tract_cannot_settle_are_refused_with_the_way_out() {
        let err = OnnxModel::load(&concat_model()).unwrap_err();
        assert!(err.to_string().contains("--input-shape"), "{err}");
    }

    #[test]
    fn a_model_planned_per_shape_keeps_a_bounded_cache() {
        let opts = options(&[("a", "1..,2"), ("b", "1..,2")], 2);
        let model = OnnxModel::load_with(&concat_model(), &opts).unwrap();
        assert_eq!(model.planning(), Planning::PerShape);
        assert_eq!(model.plans(), 1, "the first plan is made at load");
        for n in [3, 5, 3, 7] {
            let out = model.run(vec![rows(n, 1.0), rows(n, 2.0)]).unwrap();
            assert_eq!(out[0].shape, vec![n, 4]);
            assert_eq!(out[0].data, TensorData::Fp32([1.0, 1.0, 2.0, 2.0].repeat(n as usize)));
            assert!(model.plans() <= 2, "the cache never holds more than its size");
        }
        assert_eq!(model.plans(), 2);
        // Shapes the graph cannot combine are the caller's mistake, named.
        let err = model.run(vec![rows(2, 1.0), rows(3, 1.0)]).unwrap_err();
        assert!(matches!(err, RunError::Plan { .. }), "{err}");
    }

    #[test]
    fn pinned_sizes_and_ranges_bound_requests() {
        let opts = options(&[("a", "1..4,2"), ("b", "1..4,2")], 4);
        let model = OnnxModel::load_with(&concat_model(), &opts).unwrap();
        let err = model.run(vec![rows(5, 1.0), rows(5, 1.0)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"input "a" has size 5 on axis 0; the model is planned for 1..4"#
        );
        // A pinned size is part of the signature: requests of another size fail binding.
        let pinned = options(&[("a", "3,2"), ("b", "3,2")], 4);
        let model = OnnxModel::load_with(&concat_model(), &pinned).unwrap();
        assert_eq!(model.signature().inputs[0].shape, vec![Dim::Fixed(3), Dim::Fixed(2)]);
        assert_eq!(model.run(vec![rows(3, 1.0), rows(3, 2.0)]).unwrap()[0].shape, vec![3, 4]);
        let bad = options(&[("a", "1..,3"), ("b", "1..,2")], 4);
        let err = OnnxModel::load_with(&concat_model(), &bad).unwrap_err();
        assert!(err.to_string().contains("gives 3 on axis 1, the model declares 2"), "{err}");
        let unknown = options(&[("c", "1")], 4);
        assert!(
            OnnxModel::load_with(&concat_model(), &unknown)
                .unwrap_err()
                .to_string()
                .contains("no such input")
        );
    }

    /// Half floats and byte strings cross the engine's edge both ways.
    #[test]
    fn half_floats_and_strings_in_and_out() {
        let mut g = GraphBuilder::new("edge");
        g.input("h", DataType::Fp16, &[Dim::Any]);
        g.input("s", DataType::Bytes, &[Dim::Any]);
        g.node("Add", &["h", "h"], &["twice"], vec![]);
        g.node("Identity", &["s"], &["same"], vec![]);
        g.output("twice", DataType::Fp16, &[Dim::Any]);
        g.output("same", DataType::Bytes, &[Dim::Any]);
        let model = OnnxModel::load(&g.encode("test")).unwrap();
        let types: Vec<DataType> = model.signature().outputs.iter().map(|o| o.datatype).collect();
        assert_eq!(types, [DataType::Fp16, DataType::Bytes]);
        let half =
            |v: &[f32]| TensorData::Fp16(v.iter().map(|&x| half::f16::from_f32(x)).collect());
        let strings = TensorData::Bytes(vec![b"pro".to_vec(), "plán".as_bytes().to_vec()]);
        let out = model
            .run(vec![
                Tensor { shape: vec![2], data: half(&[0.5, -1.5]) },
                Tensor { shape: vec![2], data: strings.clone() },
            ])
            .unwrap();
        assert_eq!(out[0].data, half(&[1.0, -3.0]));
        assert_eq!(out[1].data, strings);
        let err = model
            .run(vec![
                Tensor { shape: vec![1], data: half(&[0.0]) },
                Tensor { shape: vec![1], data: TensorData::Bytes(vec![vec![0xff, 0xfe]]) },
            ])
            .unwrap_err();
        assert_eq!(err.to_string(), "input 1: element 0 is not UTF-8");
    }

    #[test]
    fn operators_outside_the_set_name_their_node() {
        let mut g = GraphBuilder::new("bad");
        g.input("x", DataType::Fp32, &[Dim::Fixed(2)]);
        g.node("Relu", &["x"], &["r"], vec![]);
        g.node("NoSuchOperator", &["r"], &["y"], vec![]);
        g.output("y", DataType::Fp32, &[Dim::Fixed(2)]);
        let err = OnnxModel::load(&g.encode("test")).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"node "NoSuchOperator_1" uses operator ai.onnx:NoSuchOperator, which the CPU engine does not support"#
        );
        let ops = supported_operators();
        for op in
            ["ai.onnx:Conv", "ai.onnx:If", "ai.onnx.ml:TreeEnsembleClassifier", "ai.onnx.ml:ZipMap"]
        {
            assert!(ops.iter().any(|o| o == op), "{op} in {ops:?}");
        }
    }
}

#[cfg(test)]
mod convolutional {
    use super::*;
    use crate::onnx::zoo;
    use crate::tensor::TensorData;

    fn images(n: u64) -> Tensor {
        let len = n as usize * 3 * 32 * 32;
        Tensor {
            shape: vec![n, 3, 32, 32],
            data: TensorData::Fp32((0..len).map(|i| ((i * 7919 % 255) as f32) / 255.0).collect()),
        }
    }

    /// A batch runs row by row, on one thread or several: the same answers as each row
    /// alone, whose plan (batch 1) is made at load.
    #[test]
    fn batches_of_a_convolutional_model_run_row_by_row() {
        let bytes = zoo::cnn(5, 3);
        let one = OnnxModel::load(&bytes).unwrap();
        assert_eq!(one.planning(), Planning::PerShape);
        assert_eq!(one.plans(), 1);
        let two = LoadOptions { threads: NonZeroUsize::new(2).unwrap(), ..LoadOptions::default() };
        let threaded = OnnxModel::load_with(&bytes, &two).unwrap();
        let batch = images(5);
        let whole = one.run(vec![batch.clone()]).unwrap();
        assert_eq!(whole, threaded.run(vec![batch.clone()]).unwrap());
        let rows: Vec<Tensor> =
            batch.split_rows().into_iter().map(|r| one.run(vec![r]).unwrap().remove(0)).collect();
        assert_eq!(whole[0], Tensor::stack_rows(rows).unwrap());
        assert_eq!(whole[0].shape, vec![5, 5]);
        assert_eq!(one.plans(), 1, "rows reuse the batch-1 plan");
    }
}
