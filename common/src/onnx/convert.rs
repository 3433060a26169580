//! Tensors between Falaj and tract: element types both ways, values both ways (byte
//! strings as UTF-8 strings, half floats as they are), and ONNX `TensorProto` files.

use prost::Message;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::{DatumType, IntoTensor, Tensor as TractTensor, tract_ndarray};

use super::model::{OnnxError, RunError, load_error};
use crate::for_each_tensor_data;
use crate::tensor::{DataType, Tensor, TensorData};

pub(super) fn datum_type(dt: DataType) -> DatumType {
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
        DataType::Fp16 => DatumType::F16,
        DataType::Fp32 => DatumType::F32,
        DataType::Fp64 => DatumType::F64,
        DataType::Bytes => DatumType::String,
    }
}

/// The element type the ONNX graph declares for output `name`, if it declares one.
pub(super) fn declared_output_type(proto: &ModelProto, name: &str) -> Option<DatumType> {
    use tract_onnx::pb::type_proto::Value;
    let output = proto.graph.as_ref()?.output.iter().find(|o| o.name == name)?;
    let Some(Value::TensorType(t)) = output.r#type.as_ref()?.value.as_ref() else { return None };
    let dt = tract_onnx::pb::tensor_proto::DataType::try_from(t.elem_type).ok()?;
    DatumType::try_from(dt).ok()
}

pub(super) fn datatype(dt: DatumType, tensor: &str) -> Result<DataType, OnnxError> {
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
        DatumType::F16 => DataType::Fp16,
        DatumType::F32 => DataType::Fp32,
        DatumType::F64 => DataType::Fp64,
        DatumType::String => DataType::Bytes,
        other => {
            return Err(OnnxError::Unsupported {
                tensor: tensor.to_owned(),
                problem: format!("element type {other:?} is not supported"),
            });
        }
    })
}

/// Decodes an ONNX `TensorProto` (the files of ONNX's test data sets): its name and value.
pub fn tensor_from_proto(bytes: &[u8]) -> Result<(String, Tensor), OnnxError> {
    let proto =
        tract_onnx::pb::TensorProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))?;
    let tensor =
        tract_onnx::tensor::load_tensor(&tract_onnx::data_resolver::MmapDataResolver, &proto, None)
            .map_err(|e| load_error(&e))?;
    let value = from_tract(&tensor).map_err(|e| OnnxError::Decode(e.to_string()))?;
    Ok((proto.name, value))
}

pub(super) fn to_tract(index: usize, tensor: Tensor) -> Result<TractTensor, RunError> {
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
    }, bytes b => {
        let strings = b
            .into_iter()
            .enumerate()
            .map(|(element, s)| {
                String::from_utf8(s).map_err(|_| RunError::Element { index, element, problem: "is not UTF-8" })
            })
            .collect::<Result<Vec<String>, _>>()?;
        tract_ndarray::ArrayD::from_shape_vec(shape, strings).map(IntoTensor::into_tensor)
    })
    .map_err(|_| RunError::InputSize { index, elements, shape: tensor.shape })
}

pub(super) fn from_tract(value: &TractTensor) -> Result<Tensor, RunError> {
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
        DatumType::F16 => TensorData::Fp16(view.as_slice().map_err(slice_error)?.to_vec()),
        DatumType::F32 => TensorData::Fp32(view.as_slice().map_err(slice_error)?.to_vec()),
        DatumType::F64 => TensorData::Fp64(view.as_slice().map_err(slice_error)?.to_vec()),
        DatumType::String => TensorData::Bytes(
            view.as_slice::<String>()
                .map_err(slice_error)?
                .iter()
                .map(|s| s.clone().into_bytes())
                .collect(),
        ),
        other => return Err(RunError::Execution(format!("the model produced a {other:?} tensor"))),
    };
    Ok(Tensor { shape: value.shape().iter().map(|&d| d as u64).collect(), data })
}
