//! Translation between the gRPC messages and the protocol's decoded form
//! ([`oip::InferRequest`] in, [`Answer`] out). Pure; the checks and messages are those of
//! the REST decoder wherever the two bindings carry the same thing.

use falaj_common::tensor::{DataType, TensorData, TensorSpec};

use super::proto::infer_parameter::ParameterChoice;
use super::proto::model_infer_request::InferInputTensor;
use super::proto::model_infer_response::InferOutputTensor;
use super::proto::model_metadata_response::TensorMetadata;
use super::proto::{InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse};
use crate::oip::{self, NamedTensor, ProtocolError, RequestedOutput};
use crate::server::Answer;

fn bad(message: impl Into<String>) -> ProtocolError {
    ProtocolError(message.into())
}

/// Whether a response to `request` sends its outputs raw: unless every input came as typed
/// `contents`, as Triton answers (and its client reads) raw.
pub(crate) fn wants_raw(request: &ModelInferRequest) -> bool {
    !request.raw_input_contents.is_empty()
        || request.inputs.is_empty()
        || request.inputs.iter().any(|i| i.contents.is_none())
}

/// Decodes a ModelInferRequest (its model name and version are the caller's).
pub(crate) fn request(request: ModelInferRequest) -> Result<oip::InferRequest, ProtocolError> {
    let raw = request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(bad(format!(
            "raw_input_contents has {} entries for {} inputs; give one per input",
            raw.len(),
            request.inputs.len()
        )));
    }
    let mut raw = raw.into_iter();
    let inputs = request
        .inputs
        .into_iter()
        .map(|input| {
            let bytes = raw.next();
            decode_input(input, bytes.as_deref())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let parameter = |key: &str| text_parameter(&request.parameters, key);
    let entity_ids = parameter("entity_ids")?
        .map(|ids| ids.split(',').filter(|id| !id.is_empty()).map(str::to_owned).collect());
    let (entity_ids, routing_key) =
        oip::entities(parameter("entity_id")?, entity_ids, parameter("routing_key")?)?;
    let outputs = if request.outputs.is_empty() {
        None
    } else {
        Some(
            request
                .outputs
                .into_iter()
                .map(|o| {
                    for extension in ["classification", "shared_memory_region"] {
                        if o.parameters.contains_key(extension) {
                            return Err(bad(format!(
                                "output {:?}: the {} extension is not supported",
                                o.name,
                                extension.replace('_', " ")
                            )));
                        }
                    }
                    Ok(RequestedOutput { name: o.name, binary: false })
                })
                .collect::<Result<Vec<_>, _>>()?,
        )
    };
    Ok(oip::InferRequest {
        id: Some(request.id).filter(|id| !id.is_empty()),
        inputs,
        outputs,
        binary_by_default: false,
        entity_ids,
        routing_key,
    })
}

/// A parameter that names entities or a routing key: a string or an integer, as text.
fn text_parameter(
    parameters: &std::collections::HashMap<String, InferParameter>,
    key: &str,
) -> Result<Option<String>, ProtocolError> {
    match parameters.get(key).and_then(|p| p.parameter_choice.as_ref()) {
        None => Ok(None),
        Some(ParameterChoice::StringParam(s)) => Ok(Some(s.clone())),
        Some(ParameterChoice::Int64Param(i)) => Ok(Some(i.to_string())),
        Some(ParameterChoice::Uint64Param(u)) => Ok(Some(u.to_string())),
        Some(other) => Err(bad(format!(
            "parameters.{key}: {other:?} is not an entity id or routing key (a string or an integer)"
        ))),
    }
}

fn decode_input(input: InferInputTensor, raw: Option<&[u8]>) -> Result<NamedTensor, ProtocolError> {
    let name = input.name;
    if input.parameters.contains_key("shared_memory_region") {
        return Err(bad(format!("input {name:?}: the shared memory extension is not supported")));
    }
    let (datatype, shape, count) = oip::input_layout(&name, &input.datatype, &input.shape)?;
    let data = match (raw, input.contents) {
        (Some(_), Some(_)) => {
            return Err(bad(format!(
                "input {name:?} has both contents and raw_input_contents; give one"
            )));
        }
        (Some(bytes), None) => oip::decode_binary(datatype, bytes, count).map_err(|e| {
            bad(format!("input {name:?}: {}", e.replace("binary_data_size", "raw_input_contents")))
        })?,
        (None, Some(contents)) => {
            typed(datatype, contents).map_err(|e| bad(format!("input {name:?}: {e}")))?
        }
        (None, None) => return Err(bad(format!("input {name:?} has no data"))),
    };
    if data.len() != count {
        return Err(bad(format!(
            "input {name:?}: {} elements given for shape {shape:?} ({count} elements)",
            data.len()
        )));
    }
    Ok(NamedTensor { name, tensor: falaj_common::tensor::Tensor { shape, data } })
}

/// Narrows each element, naming the first that does not fit.
fn narrow<S: Copy + std::fmt::Display, T: TryFrom<S>>(
    values: Vec<S>,
    datatype: DataType,
) -> Result<Vec<T>, String> {
    values
        .into_iter()
        .map(|v| {
            T::try_from(v).map_err(|_| format!("contents: {v} is not a valid {datatype} value"))
        })
        .collect()
}

/// The elements of a typed `contents`, from the field of the input's datatype.
fn typed(datatype: DataType, c: InferTensorContents) -> Result<TensorData, String> {
    Ok(match datatype {
        DataType::Bool => TensorData::Bool(c.bool_contents),
        DataType::Int8 => TensorData::Int8(narrow(c.int_contents, datatype)?),
        DataType::Int16 => TensorData::Int16(narrow(c.int_contents, datatype)?),
        DataType::Int32 => TensorData::Int32(c.int_contents),
        DataType::Int64 => TensorData::Int64(c.int64_contents),
        DataType::Uint8 => TensorData::Uint8(narrow(c.uint_contents, datatype)?),
        DataType::Uint16 => TensorData::Uint16(narrow(c.uint_contents, datatype)?),
        DataType::Uint32 => TensorData::Uint32(c.uint_contents),
        DataType::Uint64 => TensorData::Uint64(c.uint64_contents),
        DataType::Fp32 => TensorData::Fp32(c.fp32_contents),
        DataType::Fp64 => TensorData::Fp64(c.fp64_contents),
        DataType::Bytes => TensorData::Bytes(c.bytes_contents),
        DataType::Fp16 => {
            return Err("FP16 has no typed contents; send it in raw_input_contents".into());
        }
    })
}

/// The typed `contents` of an output; `None` for FP16, which only travels raw.
fn contents(data: &TensorData) -> Option<InferTensorContents> {
    let mut c = InferTensorContents::default();
    match data {
        TensorData::Bool(v) => c.bool_contents.clone_from(v),
        TensorData::Int8(v) => c.int_contents = v.iter().map(|&x| i32::from(x)).collect(),
        TensorData::Int16(v) => c.int_contents = v.iter().map(|&x| i32::from(x)).collect(),
        TensorData::Int32(v) => c.int_contents.clone_from(v),
        TensorData::Int64(v) => c.int64_contents.clone_from(v),
        TensorData::Uint8(v) => c.uint_contents = v.iter().map(|&x| u32::from(x)).collect(),
        TensorData::Uint16(v) => c.uint_contents = v.iter().map(|&x| u32::from(x)).collect(),
        TensorData::Uint32(v) => c.uint_contents.clone_from(v),
        TensorData::Uint64(v) => c.uint64_contents.clone_from(v),
        TensorData::Fp32(v) => c.fp32_contents.clone_from(v),
        TensorData::Fp64(v) => c.fp64_contents.clone_from(v),
        TensorData::Bytes(v) => c.bytes_contents.clone_from(v),
        TensorData::Fp16(_) => return None,
    }
    Some(c)
}

/// Encodes an answer: outputs raw when `raw` or when one of them is FP16 (a response is
/// either all raw or all typed), typed otherwise; entities named by the request are echoed
/// in `parameters.entity_ids`, comma-separated.
pub(crate) fn response(answer: &Answer<'_>, raw: bool) -> ModelInferResponse {
    let raw = raw || answer.outputs.iter().any(|o| matches!(o.tensor.data, TensorData::Fp16(_)));
    let mut response = ModelInferResponse {
        model_name: answer.name.to_owned(),
        model_version: answer.version.to_string(),
        id: answer.id.unwrap_or_default().to_owned(),
        ..ModelInferResponse::default()
    };
    if let Some(ids) = answer.entity_ids {
        response.parameters.insert(
            "entity_ids".to_owned(),
            InferParameter { parameter_choice: Some(ParameterChoice::StringParam(ids.join(","))) },
        );
    }
    for output in &answer.outputs {
        let data = &output.tensor.data;
        let contents = if raw {
            let mut bytes = Vec::new();
            oip::encode_binary(data, &mut bytes);
            response.raw_output_contents.push(bytes.into());
            None
        } else {
            contents(data)
        };
        response.outputs.push(InferOutputTensor {
            name: output.name.to_owned(),
            datatype: data.datatype().name().to_owned(),
            shape: output.tensor.shape.iter().map(|&d| d as i64).collect(),
            parameters: std::collections::HashMap::new(),
            contents,
        });
    }
    response
}

/// A signature's tensors as ModelMetadata lists them (-1 for a variable dimension).
pub(crate) fn tensors(specs: &[TensorSpec]) -> Vec<TensorMetadata> {
    specs
        .iter()
        .map(|t| TensorMetadata {
            name: t.name.clone(),
            datatype: t.datatype.name().to_owned(),
            shape: t.protocol_shape(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oip::OutputToSend;
    use falaj_common::tensor::Tensor;

    fn input(
        name: &str,
        datatype: &str,
        shape: &[i64],
        c: Option<InferTensorContents>,
    ) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            parameters: std::collections::HashMap::new(),
            contents: c,
        }
    }

    fn one(r: ModelInferRequest) -> Result<TensorData, String> {
        request(r).map(|r| r.inputs[0].tensor.data.clone()).map_err(|e| e.0)
    }

    #[test]
    fn raw_and_typed_contents_decode_alike() {
        let cases = [
            TensorData::Bool(vec![true, false]),
            TensorData::Int8(vec![-128, 127]),
            TensorData::Int16(vec![-300, 300]),
            TensorData::Int32(vec![-1, 7]),
            TensorData::Int64(vec![i64::MIN, 2]),
            TensorData::Uint8(vec![255, 0]),
            TensorData::Uint16(vec![65535, 1]),
            TensorData::Uint32(vec![u32::MAX, 1]),
            TensorData::Uint64(vec![u64::MAX, 0]),
            TensorData::Fp32(vec![0.5, -2.0]),
            TensorData::Fp64(vec![0.1, -2.0]),
            TensorData::Bytes(vec![b"plan-b".to_vec(), Vec::new()]),
        ];
        for data in cases {
            let dt = data.datatype().name();
            let typed = ModelInferRequest {
                inputs: vec![input("x", dt, &[2], contents(&data))],
                ..Default::default()
            };
            assert_eq!(one(typed).unwrap(), data, "{dt} typed");
            let mut bytes = Vec::new();
            oip::encode_binary(&data, &mut bytes);
            let raw = ModelInferRequest {
                inputs: vec![input("x", dt, &[2], None)],
                raw_input_contents: vec![bytes.into()],
                ..Default::default()
            };
            assert_eq!(one(raw).unwrap(), data, "{dt} raw");
        }
        let half = TensorData::Fp16(vec![half::f16::from_f32(0.25)]);
        let mut bytes = Vec::new();
        oip::encode_binary(&half, &mut bytes);
        let raw = ModelInferRequest {
            inputs: vec![input("h", "FP16", &[1], None)],
            raw_input_contents: vec![bytes.into()],
            ..Default::default()
        };
        assert_eq!(one(raw).unwrap(), half);
    }

    #[test]
    fn malformed_requests_name_their_problem() {
        let check = |r: ModelInferRequest, needle: &str| {
            let err = one(r).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        };
        let fp32 =
            |v: Vec<f32>| Some(InferTensorContents { fp32_contents: v, ..Default::default() });
        check(
            ModelInferRequest {
                inputs: vec![input("x", "FP32", &[3], fp32(vec![1.0]))],
                ..Default::default()
            },
            "1 elements given for shape [3] (3 elements)",
        );
        check(
            ModelInferRequest {
                inputs: vec![input("x", "FP32", &[-1], fp32(vec![1.0]))],
                ..Default::default()
            },
            "negative",
        );
        check(
            ModelInferRequest {
                inputs: vec![input("x", "FP32", &[0, 4], fp32(vec![]))],
                ..Default::default()
            },
            "holds no elements",
        );
        check(
            ModelInferRequest {
                inputs: vec![input("x", "BF16", &[1], None)],
                ..Default::default()
            },
            "datatype \"BF16\" is not supported",
        );
        check(
            ModelInferRequest {
                inputs: vec![input("x", "FP32", &[1], None)],
                ..Default::default()
            },
            "has no data",
        );
        check(
            ModelInferRequest {
                inputs: vec![input(
                    "x",
                    "INT8",
                    &[1],
                    Some(InferTensorContents { int_contents: vec![300], ..Default::default() }),
                )],
                ..Default::default()
            },
            "300 is not a valid INT8 value",
        );
        check(
            ModelInferRequest {
                inputs: vec![input("x", "FP16", &[1], fp32(vec![1.0]))],
                ..Default::default()
            },
            "raw_input_contents",
        );
        check(
            ModelInferRequest {
                inputs: vec![input("x", "FP32", &[2], None)],
                raw_input_contents: vec![vec![0; 4].into()],
                ..Default::default()
            },
            "raw_input_contents is 4 bytes; 2 FP32 elements need 8",
        );
        check(
            ModelInferRequest {
                inputs: vec![input("x", "FP32", &[1], None), input("y", "FP32", &[1], None)],
                raw_input_contents: vec![vec![0; 4].into()],
                ..Default::default()
            },
            "raw_input_contents has 1 entries for 2 inputs",
        );
        check(
            ModelInferRequest {
                inputs: vec![input("x", "FP32", &[1], fp32(vec![1.0]))],
                raw_input_contents: vec![vec![0; 4].into()],
                ..Default::default()
            },
            "both contents and raw_input_contents",
        );
        let mut parameters = std::collections::HashMap::new();
        parameters.insert(
            "entity_id".to_owned(),
            InferParameter { parameter_choice: Some(ParameterChoice::BoolParam(true)) },
        );
        check(ModelInferRequest { parameters, ..Default::default() }, "a string or an integer");
    }

    #[test]
    fn entities_come_from_parameters() {
        let param = |s: ParameterChoice| InferParameter { parameter_choice: Some(s) };
        let mut parameters = std::collections::HashMap::new();
        parameters
            .insert("entity_ids".to_owned(), param(ParameterChoice::StringParam("a,b".into())));
        let r = request(ModelInferRequest { parameters, ..Default::default() }).unwrap();
        assert_eq!(r.entity_ids, Some(vec!["a".to_owned(), "b".to_owned()]));
        assert_eq!(r.routing_key.as_deref(), Some("a"));
        let mut parameters = std::collections::HashMap::new();
        parameters.insert("entity_id".to_owned(), param(ParameterChoice::Int64Param(-7)));
        parameters
            .insert("routing_key".to_owned(), param(ParameterChoice::StringParam("u".into())));
        let r = request(ModelInferRequest { parameters, ..Default::default() }).unwrap();
        assert_eq!(r.entity_ids, Some(vec!["-7".to_owned()]));
        assert_eq!(r.routing_key.as_deref(), Some("u"));
    }

    #[test]
    fn responses_are_raw_or_typed_and_half_floats_always_raw() {
        let probs = Tensor { shape: vec![1, 2], data: TensorData::Fp32(vec![0.25, 0.75]) };
        let half =
            Tensor { shape: vec![1], data: TensorData::Fp16(vec![half::f16::from_f32(0.5)]) };
        let answer =
            |outputs| Answer { name: "m", version: 3, id: Some("r"), entity_ids: None, outputs };
        let typed = response(
            &answer(vec![OutputToSend { name: "p", tensor: &probs, binary: false }]),
            false,
        );
        assert!(typed.raw_output_contents.is_empty());
        assert_eq!(typed.outputs[0].contents.as_ref().unwrap().fp32_contents, vec![0.25, 0.75]);
        assert_eq!((typed.model_version.as_str(), typed.id.as_str()), ("3", "r"));
        let mixed = response(
            &answer(vec![
                OutputToSend { name: "p", tensor: &probs, binary: false },
                OutputToSend { name: "h", tensor: &half, binary: false },
            ]),
            false,
        );
        assert_eq!(
            mixed.raw_output_contents,
            vec![vec![0, 0, 0x80, 0x3e, 0, 0, 0x40, 0x3f], vec![0x00, 0x38]]
                .into_iter()
                .map(bytes::Bytes::from)
                .collect::<Vec<_>>()
        );
        assert!(mixed.outputs.iter().all(|o| o.contents.is_none()));
        assert_eq!(mixed.outputs[1].datatype, "FP16");
        assert_eq!(mixed.outputs[0].shape, vec![1, 2]);
    }
}
