//! Loading an ONNX model into a tract plan, its signature, and running it.

use std::sync::Arc;

use prost::Message;
use thiserror::Error;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, IntoTensor, TDim, TValue,
    TVec, Tensor as TractTensor, TypedRunnableModel, tract_ndarray, tvec,
};
use tract_onnx::tract_hir::internal::Factoid;

use crate::for_each_tensor_data;
use crate::tensor::{DataType, Dim, Signature, Tensor, TensorData, TensorSpec};

/// Why a model could not be loaded.
#[derive(Debug, Error)]
pub enum OnnxError {
    /// The bytes are not an ONNX protobuf.
    #[error("not an ONNX model: {0}")]
    Decode(String),
    /// tract could not load, type or plan the graph (an unsupported operator, say).
    #[error("tract cannot load the model: {0}")]
    Load(String),
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
    /// tract failed while running (for example, sizes that the graph cannot combine).
    #[error("{0}")]
    Execution(String),
}

/// A model loaded, optimised and planned once; run it any number of times, from any
/// number of threads.
#[derive(Debug, Clone)]
pub struct OnnxModel {
    plan: Arc<TypedRunnableModel>,
    signature: Signature,
}

fn datum_type(dt: DataType) -> DatumType {
    match dt {
        DataType::Bool => DatumType::Bool,
        DataType::Uint8 => DatumType::U8,
        DataType::Uint16 => DatumType::U16,
        DataType::Uint32 => DatumType::U32,
        DataType::Uint64 => DatumType::U64,
        DataType::Int8 => DatumType::I8,
        DataType::Int16 => DatumType::I16,
        DataType::Int32 => DatumType::I32,
        DataType::Int64 => DatumType::I64,
        DataType::Fp32 => DatumType::F32,
        DataType::Fp64 => DatumType::F64,
    }
}

/// The element type the ONNX graph declares for output `name`, if it declares one.
fn declared_output_type(proto: &ModelProto, name: &str) -> Option<DatumType> {
    use tract_onnx::pb::type_proto::Value;
    let output = proto.graph.as_ref()?.output.iter().find(|o| o.name == name)?;
    let Some(Value::TensorType(t)) = output.r#type.as_ref()?.value.as_ref() else { return None };
    let dt = tract_onnx::pb::tensor_proto::DataType::try_from(t.elem_type).ok()?;
    DatumType::try_from(dt).ok()
}

fn datatype(dt: DatumType, tensor: &str) -> Result<DataType, OnnxError> {
    Ok(match dt {
        DatumType::Bool => DataType::Bool,
        DatumType::U8 => DataType::Uint8,
        DatumType::U16 => DataType::Uint16,
        DatumType::U32 => DataType::Uint32,
        DatumType::U64 => DataType::Uint64,
        DatumType::I8 => DataType::Int8,
        DatumType::I16 => DataType::Int16,
        DatumType::I32 => DataType::Int32,
        DatumType::I64 => DataType::Int64,
        DatumType::F32 => DataType::Fp32,
        DatumType::F64 => DataType::Fp64,
        other => {
            return Err(OnnxError::Unsupported {
                tensor: tensor.to_owned(),
                problem: format!("element type {other:?} is not supported"),
            });
        }
    })
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

/// Prefix of the symbols given to input dimensions the model leaves unnamed.
const UNNAMED_PREFIX: &str = "falaj_unnamed_";

fn load_error(err: &impl std::fmt::Display) -> OnnxError {
    OnnxError::Load(format!("{err:#}"))
}

impl OnnxModel {
    /// Loads a model from ONNX protobuf bytes: decodes, types, optimises and plans it.
    /// Dimensions the model leaves unnamed get a symbol of their own, so one plan serves
    /// every size.
    pub fn load(bytes: &[u8]) -> Result<Self, OnnxError> {
        let proto = ModelProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))?;
        if proto.graph.is_none() {
            return Err(OnnxError::Decode("the model has no graph".into()));
        }
        let onnx = tract_onnx::onnx();
        let mut model = onnx.model_for_proto_model(&proto).map_err(|e| load_error(&e))?;

        let input_count = model.input_outlets().map_err(|e| load_error(&e))?.len();
        let mut inputs = Vec::with_capacity(input_count);
        for i in 0..input_count {
            let outlet = model.input_outlets().map_err(|e| load_error(&e))?[i];
            let name = model.node(outlet.node).name.clone();
            let fact = model.input_fact(i).map_err(|e| load_error(&e))?.clone();
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
            let mut dims = Vec::new();
            let mut spec = Vec::new();
            for (axis, d) in fact.shape.dims().enumerate() {
                let tdim = d.concretize().unwrap_or_else(|| {
                    TDim::Sym(model.symbols.sym(&format!("{UNNAMED_PREFIX}{i}_{axis}")))
                });
                spec.push(dim(&tdim));
                dims.push(tdim);
            }
            model
                .set_input_fact(i, InferenceFact::dt_shape(dt, dims))
                .map_err(|e| load_error(&e))?;
            inputs.push(TensorSpec { datatype: datatype(dt, &name)?, name, shape: spec });
        }

        // Output facts are read after optimisation: before it, tract may still type an
        // output as a symbolic dimension (`TDim`) that a later cast makes concrete.
        let optimized = model
            .into_typed()
            .and_then(tract_onnx::prelude::TypedModel::into_optimized)
            .map_err(|e| load_error(&e))?;
        let mut outputs = Vec::new();
        for (i, outlet) in
            optimized.output_outlets().map_err(|e| load_error(&e))?.iter().enumerate()
        {
            let name = optimized
                .outlet_label(*outlet)
                .map_or_else(|| optimized.node(outlet.node).name.clone(), str::to_owned);
            let fact = optimized.output_fact(i).map_err(|e| load_error(&e))?;
            let shape = fact.shape.iter().map(dim).collect();
            // tract may carry an integer output as a symbolic dimension (`TDim`); the
            // graph's declaration is what clients expect, and `run` casts to it.
            let dt = declared_output_type(&proto, &name).unwrap_or(fact.datum_type);
            outputs.push(TensorSpec { datatype: datatype(dt, &name)?, name, shape });
        }
        let plan = optimized.into_runnable().map_err(|e| load_error(&e))?;
        Ok(Self { plan, signature: Signature { inputs, outputs } })
    }

    /// The model's inputs and outputs.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Runs the model on `inputs`, given in signature order; returns every output in
    /// signature order. Shapes must already fit the signature (see
    /// [`Signature::bind`]); symbolic sizes are resolved from them for this run.
    pub fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RunError> {
        if inputs.len() != self.signature.inputs.len() {
            return Err(RunError::InputCount {
                expected: self.signature.inputs.len(),
                got: inputs.len(),
            });
        }
        let mut values: TVec<TValue> = tvec![];
        for (index, input) in inputs.into_iter().enumerate() {
            values.push(to_tract(index, input)?.into());
        }
        let outputs = self.plan.run(values).map_err(|e| RunError::Execution(format!("{e:#}")))?;
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

fn to_tract(index: usize, tensor: Tensor) -> Result<TractTensor, RunError> {
    let elements = tensor.data.len();
    let size_error = || RunError::InputSize { index, elements, shape: tensor.shape.clone() };
    let shape: Vec<usize> = tensor
        .shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| size_error()))
        .collect::<Result<_, _>>()?;
    let shape = tract_ndarray::IxDyn(&shape);
    for_each_tensor_data!(tensor.data, v => {
        tract_ndarray::ArrayD::from_shape_vec(shape, v).map(IntoTensor::into_tensor)
    })
    .map_err(|_| RunError::InputSize { index, elements, shape: tensor.shape })
}

fn from_tract(value: &TractTensor) -> Result<Tensor, RunError> {
    let view = value.try_as_plain_ram().map_err(|e| RunError::Execution(format!("{e:#}")))?;
    let slice_error = |e: tract_onnx::prelude::TractError| RunError::Execution(format!("{e:#}"));
    let data = match value.datum_type() {
        DatumType::Bool => TensorData::Bool(view.as_slice().map_err(slice_error)?.to_vec()),
        DatumType::U8 => TensorData::Uint8(view.as_slice().map_err(slice_error)?.to_vec()),
        DatumType::U16 => TensorData::Uint16(view.as_slice().map_err(slice_error)?.to_vec()),
        DatumType::U32 => TensorData::Uint32(view.as_slice().map_err(slice_error)?.to_vec()),
        DatumType::U64 => TensorData::Uint64(view.as_slice().map_err(slice_error)?.to_vec()),
        DatumType::I8 => TensorData::Int8(view.as_slice().map_err(slice_error)?.to_vec()),
        DatumType::I16 => TensorData::Int16(view.as_slice().map_err(slice_error)?.to_vec()),
        DatumType::I32 => TensorData::Int32(view.as_slice().map_err(slice_error)?.to_vec()),
        DatumType::I64 => TensorData::Int64(view.as_slice().map_err(slice_error)?.to_vec()),
        DatumType::F32 => TensorData::Fp32(view.as_slice().map_err(slice_error)?.to_vec()),
        DatumType::F64 => TensorData::Fp64(view.as_slice().map_err(slice_error)?.to_vec()),
        other => return Err(RunError::Execution(format!("the model produced a {other:?} tensor"))),
    };
    Ok(Tensor { shape: value.shape().iter().map(|&d| d as u64).collect(), data })
}
