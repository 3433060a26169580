//! The fuzz targets of the agent's decoders of outside bytes (feature `fuzzing`, test
//! support): inference request bodies (JSON, and JSON followed by binary tensors),
//! feedback bodies, and the configuration file. One body per target, called by the
//! cargo-fuzz binaries in `fuzz/` and by the stable campaigns in `tests/it/fuzz.rs`; each
//! panics only on a bug and returns whether the decoder accepted the input.

use std::path::Path;

use falaj_common::tensor::{DataType, TensorData};
use serde_json::{Value, json};

use crate::config::AgentConfig;
use crate::feedback;
use crate::oip::{self, InferRequest};

/// Encodes `request` as a client would, every input in the binary extension (exact for
/// every type, NaN included): the body, and the length of its JSON part.
pub fn encode_request(request: &InferRequest) -> (Vec<u8>, usize) {
    let mut binary = Vec::new();
    let inputs: Vec<Value> = request
        .inputs
        .iter()
        .map(|input| {
            let before = binary.len();
            oip::encode_binary(&input.tensor.data, &mut binary);
            json!({
                "name": input.name,
                "shape": input.tensor.shape,
                "datatype": input.tensor.data.datatype().name(),
                "parameters": {"binary_data_size": binary.len() - before},
            })
        })
        .collect();
    let mut parameters = json!({"binary_data_output": request.binary_by_default});
    if let Some(ids) = &request.entity_ids {
        parameters["entity_ids"] = json!(ids);
    }
    if let Some(key) = &request.routing_key {
        parameters["routing_key"] = json!(key);
    }
    let mut body = json!({"inputs": inputs, "parameters": parameters});
    if let Some(id) = &request.id {
        body["id"] = json!(id);
    }
    if let Some(outputs) = &request.outputs {
        let outputs: Vec<Value> = outputs
            .iter()
            .map(|o| json!({"name": o.name, "parameters": {"binary_data": o.binary}}))
            .collect();
        body["outputs"] = json!(outputs);
    }
    let mut bytes = serde_json::to_vec(&body).expect("requests serialise");
    let json_len = bytes.len();
    bytes.extend_from_slice(&binary);
    (bytes, json_len)
}

/// Each input's name, shape and type.
fn datatypes(r: &InferRequest) -> Vec<(&String, &Vec<u64>, DataType)> {
    r.inputs.iter().map(|i| (&i.name, &i.tensor.shape, i.tensor.data.datatype())).collect()
}

/// Whether two decoded requests are the same, NaN equal to NaN (compared as encoded).
fn same(a: &InferRequest, b: &InferRequest) -> bool {
    let bits = |r: &InferRequest| -> Vec<Vec<u8>> {
        r.inputs
            .iter()
            .map(|i| {
                let mut out = Vec::new();
                oip::encode_binary(&i.tensor.data, &mut out);
                out
            })
            .collect()
    };
    bits(a) == bits(b)
        && datatypes(a) == datatypes(b)
        && (&a.id, &a.outputs, a.binary_by_default, &a.entity_ids, &a.routing_key)
            == (&b.id, &b.outputs, b.binary_by_default, &b.entity_ids, &b.routing_key)
}

/// Decodes `body`; an accepted request, encoded again in binary form, decodes to the same
/// request.
fn round_trip(body: &[u8], json_len: Option<usize>) -> bool {
    let Ok(request) = oip::decode_request(body, json_len) else { return false };
    let (again, len) = encode_request(&request);
    match oip::decode_request(&again, Some(len)) {
        Ok(decoded) => assert!(same(&decoded, &request), "{request:?} re-decodes as {decoded:?}"),
        Err(e) => panic!("{request:?} was accepted, but its binary form is refused: {e}"),
    }
    true
}

/// Any bytes as an inference request body: all JSON, and (the first byte giving the
/// JSON part's length) JSON followed by binary tensors.
pub fn oip_request(data: &[u8]) -> bool {
    let plain = round_trip(data, None);
    let split = data
        .split_first()
        .is_some_and(|(&split, rest)| round_trip(rest, Some(usize::from(split).min(rest.len()))));
    plain || split
}

/// Any bytes as a feedback body (`POST /v2/models/{name}/feedback`).
pub fn oip_feedback(data: &[u8]) -> bool {
    serde_json::from_slice::<feedback::Body>(data).is_ok()
}

/// Any text as the agent's configuration file; one accepted yields its settings.
pub fn agent_config(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let Ok(config) = AgentConfig::parse(text, Path::new("agent.toml")) else { return false };
    let _ = (config.serve(), config.sync());
    true
}

/// A tensor's data of the given type, `n` elements, from `pick` (0..=255).
pub fn tensor_data(kind: usize, n: usize, mut pick: impl FnMut() -> u8) -> TensorData {
    let mut v = || pick();
    match kind % 6 {
        0 => TensorData::Fp32((0..n).map(|_| f32::from(v()) - 128.5).collect()),
        1 => TensorData::Int64((0..n).map(|_| i64::from(v()) << 40).collect()),
        2 => TensorData::Bool((0..n).map(|_| v() % 2 == 0).collect()),
        3 => TensorData::Bytes((0..n).map(|_| vec![v(); usize::from(v() % 5)]).collect()),
        4 => TensorData::Uint8((0..n).map(|_| v()).collect()),
        _ => TensorData::Fp64((0..n).map(|_| f64::from(v()) / 7.0).collect()),
    }
}
