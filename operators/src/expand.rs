//! How an operator of this crate enters tract's graph: a [`Kernel`] (what it computes and
//! the facts of its outputs) run as one typed tract operator ([`Node`]) per ONNX node,
//! behind an inference-time [`Expansion`] whose rules say each output's type and shape.

use tract_onnx::tract_hir::internal::*;

/// What an operator computes.
pub trait Kernel: std::fmt::Debug + Clone + PartialEq + Send + Sync + 'static {
    /// The ONNX operator's name.
    fn name(&self) -> &'static str;

    /// Outputs for `inputs`.
    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>>;

    /// Output facts for input facts.
    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>>;
}

/// A [`Kernel`] as a typed tract operator.
#[derive(Clone, Debug, PartialEq)]
pub struct Node<K>(pub K);

// Kernels hold floats; tract compares operators only to merge identical nodes.
impl<K: Kernel> Eq for Node<K> {}

impl<K: Kernel> Op for Node<K> {
    fn name(&self) -> StaticName {
        self.0.name().into()
    }

    op_as_typed_op!();
}

impl<K: Kernel> EvalOp for Node<K> {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        Ok(self.0.eval(&inputs)?.into_iter().map(IntoTValue::into_tvalue).collect())
    }
}

impl<K: Kernel> TypedOp for Node<K> {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        self.0.facts(inputs)
    }

    as_op!();
}

/// An output's shape, in terms of the node's first input.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    /// `[rows, k]`: rows from the first input (1 when it has rank 1).
    Rows(usize),
    /// `[rows]`.
    RowsOnly,
    /// The first input's shape.
    Like,
    /// The first input's shape with `k` appended.
    Append(usize),
    /// Not known before the types are (the typed operator works it out).
    Free,
    /// What the kernel's facts give for the first input's shape (as float32).
    FromKernel,
}

/// An output: its element type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Out {
    /// Element type.
    pub dt: DatumType,
    /// Shape.
    pub shape: Shape,
}

impl Out {
    /// An output of type `dt` shaped `shape`.
    pub fn new(dt: DatumType, shape: Shape) -> Self {
        Self { dt, shape }
    }
}

/// A kernel wired as one node with `outputs`.
#[derive(Clone, Debug)]
pub struct Expand<K> {
    pub kernel: K,
    /// Its outputs.
    pub outputs: Vec<Out>,
}

/// The result an ONNX operator builder returns to tract's loader.
pub type Built = TractResult<(Box<dyn InferenceOp>, Vec<String>)>;

/// `kernel` as the boxed inference operator tract's ONNX loader expects.
pub fn expand<K: Kernel>(kernel: K, outputs: Vec<Out>) -> Built {
    Ok((tract_onnx::tract_hir::ops::expandable::expand(Expand { kernel, outputs }), vec![]))
}

impl<K: Kernel> Expansion for Expand<K> {
    fn name(&self) -> StaticName {
        self.kernel.name().into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(self.outputs.len())
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, self.outputs.len())?;
        if inputs.is_empty() {
            bail!("{} takes at least one input", self.kernel.name());
        }
        for (proxy, out) in outputs.iter().zip(&self.outputs) {
            s.equals(&proxy.datum_type, out.dt)?;
            match &out.shape {
                Shape::Rows(k) => {
                    s.equals(&proxy.rank, 2)?;
                    s.equals(&proxy.shape[1], k.to_dim())?;
                    rows(s, &inputs[0], proxy)?;
                }
                Shape::RowsOnly => {
                    s.equals(&proxy.rank, 1)?;
                    rows(s, &inputs[0], proxy)?;
                }
                Shape::Like => s.equals(&proxy.shape, &inputs[0].shape)?,
                Shape::Free => {}
                Shape::FromKernel => {
                    let kernel = self.kernel.clone();
                    s.given(&inputs[0].shape, move |s, shape| {
                        let fact = f32::fact(shape.iter().cloned().collect::<TVec<_>>());
                        let out = kernel.facts(&[&fact])?;
                        s.equals(&proxy.shape, out[0].shape.to_tvec())
                    })?;
                }
                Shape::Append(k) => {
                    let k = k.to_dim();
                    s.given(&inputs[0].shape, move |s, shape| {
                        let mut shape = shape.clone();
                        shape.push(k.clone());
                        s.equals(&proxy.shape, shape)
                    })?;
                }
            }
        }
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, Node(self.kernel.clone()), inputs)
    }
}

fn rows<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    input: &'p TensorProxy,
    output: &'p TensorProxy,
) -> InferenceResult {
    s.given(&input.rank, move |s, rank| {
        if rank == 1 {
            s.equals(&output.shape[0], 1.to_dim())
        } else {
            s.equals(&output.shape[0], &input.shape[0])
        }
    })
}

/// The rows of a `[rows, ..]` (or a 1-D, one-row) input fact.
pub fn rows_of(fact: &TypedFact) -> TDim {
    if fact.rank() == 1 { 1.to_dim() } else { fact.shape[0].clone() }
}

/// Facts of shape `[rows, k]` for the given input fact.
pub fn row_fact(dt: DatumType, input: &TypedFact, k: usize) -> TypedFact {
    dt.fact(tvec![rows_of(input), k.to_dim()])
}

/// An input as `rows × columns` float32 values (a 1-D input is one row), whatever its
/// numeric type.
pub fn as_f32_rows(input: &Tensor) -> TractResult<(Cow<'_, [f32]>, usize, usize)> {
    let (rows, columns) = match input.rank() {
        1 => (1, input.shape()[0]),
        2 => (input.shape()[0], input.shape()[1]),
        r => bail!("expected a [rows, features] input, got rank {r} ({:?})", input.shape()),
    };
    let values = if input.datum_type() == f32::datum_type() {
        Cow::Borrowed(input.try_as_plain_ram()?.as_slice::<f32>()?)
    } else {
        let cast = input.cast_to::<f32>()?;
        Cow::Owned(cast.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
    };
    Ok((values, rows, columns))
}

/// The flat elements `picks` of `t`, as a 1-D tensor of its type.
pub fn gather(t: &Tensor, picks: &[usize]) -> TractResult<Tensor> {
    fn typed<T: Datum>(t: &Tensor, picks: &[usize]) -> TractResult<Tensor> {
        let values = t.try_as_plain_ram()?.as_slice::<T>()?;
        let out: Vec<T> = picks.iter().map(|&i| values[i].clone()).collect();
        Ok(tensor1(&out))
    }
    dispatch_datum!(typed(t.datum_type())(t, picks))
}
