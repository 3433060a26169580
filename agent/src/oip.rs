//! The Open Inference Protocol v2 (KServe v2, Triton) REST messages, with the binary
//! tensor data extension. Pure: bytes in, typed values out, and back.
//!
//! A request body is JSON, or, when the `Inference-Header-Content-Length: N` header is
//! present, N bytes of JSON followed by the raw tensors of the inputs that declare
//! `"parameters": {"binary_data_size": B}`, in input order, little endian. Outputs are sent
//! raw in the same way when asked for (`"binary_data": true` on the output, or
//! `"binary_data_output": true` on the request).
//!
//! JSON has no NaN: `null` in the data of a floating-point input is a missing value (NaN),
//! as scikit-learn pipelines expect missing values; other types refuse it.
//!
//! Falaj's extension: a request to a model whose input comes from a feature view may name
//! entities (`"parameters": {"entity_id": "pump-7"}` or `{"entity_ids": [...]}`, strings or
//! integers) and give no inputs; the server assembles the input from the online store.
//!
//! The checks both transports make (shapes, raw tensor bytes, entity parameters) are
//! `pub(crate)` here so that the gRPC binding ([`crate::grpc`]) refuses the same requests
//! with the same messages.

use std::fmt;

use falaj_common::tensor::{DataType, Tensor, TensorData, element_count};
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use thiserror::Error;

/// The header that splits a body into JSON and binary parts.
pub const HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

/// A request the client got wrong; the message says how.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct ProtocolError(pub String);

fn bad(msg: impl Into<String>) -> ProtocolError {
    ProtocolError(msg.into())
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Parameters>,
    #[serde(default, borrow)]
    inputs: Vec<RawInput<'a>>,
    #[serde(default)]
    outputs: Option<Vec<RawOutput>>,
}

#[derive(Deserialize)]
struct RawInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Parameters>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Parameters>,
}

/// The parameters Falaj acts on; others are accepted and ignored, as the protocol allows.
#[derive(Deserialize, Default)]
struct Parameters {
    binary_data_size: Option<u64>,
    binary_data: Option<bool>,
    binary_data_output: Option<bool>,
    shared_memory_region: Option<de::IgnoredAny>,
    classification: Option<de::IgnoredAny>,
    entity_id: Option<EntityId>,
    entity_ids: Option<Vec<EntityId>>,
    routing_key: Option<EntityId>,
}

/// An entity id as a request gives it: a string or an integer, kept as text.
struct EntityId(String);

impl<'de> Deserialize<'de> for EntityId {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdVisitor;
        impl Visitor<'_> for IdVisitor {
            type Value = EntityId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an entity id or routing key (a string or an integer)")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<EntityId, E> {
                Ok(EntityId(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<EntityId, E> {
                Ok(EntityId(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<EntityId, E> {
                Ok(EntityId(v.to_string()))
            }
        }
        deserializer.deserialize_any(IdVisitor)
    }
}

/// One input of a decoded request.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// The input's name.
    pub name: String,
    /// Its value.
    pub tensor: Tensor,
}

/// An output the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestedOutput {
    /// The output's name.
    pub name: String,
    /// Whether to send it raw.
    pub binary: bool,
}

/// A decoded inference request.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The client's request id, echoed back.
    pub id: Option<String>,
    /// The inputs, in the request's order.
    pub inputs: Vec<NamedTensor>,
    /// The outputs asked for; `None` means all of them.
    pub outputs: Option<Vec<RequestedOutput>>,
    /// Whether outputs not listed explicitly are sent raw.
    pub binary_by_default: bool,
    /// The entities whose features make the input (`parameters.entity_id` or
    /// `parameters.entity_ids`), as text; `None` when the request names none.
    pub entity_ids: Option<Vec<String>>,
    /// What keeps a client on one variant of a rollout: `parameters.routing_key`, else
    /// the (first) entity id.
    pub routing_key: Option<String>,
}

/// Decodes a request body. `json_len` is the value of `Inference-Header-Content-Length`.
pub fn decode_request(body: &[u8], json_len: Option<usize>) -> Result<InferRequest, ProtocolError> {
    let (json, mut binary) = match json_len {
        Some(n) if n > body.len() => {
            return Err(bad(format!(
                "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                body.len()
            )));
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let raw: RawRequest<'_> =
        serde_json::from_slice(json).map_err(|e| bad(format!("request JSON is malformed: {e}")))?;
    let inputs = raw
        .inputs
        .into_iter()
        .map(|input| decode_input(input, &mut binary))
        .collect::<Result<Vec<_>, _>>()?;
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} bytes of binary data are not claimed by any input",
            binary.len()
        )));
    }
    let parameters = raw.parameters.unwrap_or_default();
    let binary_by_default = parameters.binary_data_output.unwrap_or(false);
    let (entity_ids, routing_key) = entities(
        parameters.entity_id.map(|id| id.0),
        parameters.entity_ids.map(|ids| ids.into_iter().map(|id| id.0).collect()),
        parameters.routing_key.map(|k| k.0),
    )?;
    let outputs = raw
        .outputs
        .map(|outputs| {
            outputs
                .into_iter()
                .map(|o| requested_output(o, binary_by_default))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    Ok(InferRequest { id: raw.id, inputs, outputs, binary_by_default, entity_ids, routing_key })
}

/// The entities a request names (`entity_id` or `entity_ids`, not both, not an empty list)
/// and its routing key (`routing_key`, else the first entity).
pub(crate) fn entities(
    entity_id: Option<String>,
    entity_ids: Option<Vec<String>>,
    routing_key: Option<String>,
) -> Result<(Option<Vec<String>>, Option<String>), ProtocolError> {
    let entity_ids = match (entity_id, entity_ids) {
        (Some(_), Some(_)) => {
            return Err(bad("give parameters.entity_id or parameters.entity_ids, not both"));
        }
        (Some(id), None) => Some(vec![id]),
        (None, Some(ids)) if ids.is_empty() => {
            return Err(bad("parameters.entity_ids is empty"));
        }
        (None, Some(ids)) => Some(ids),
        (None, None) => None,
    };
    let routing_key =
        routing_key.or_else(|| entity_ids.as_ref().and_then(|ids| ids.first().cloned()));
    Ok((entity_ids, routing_key))
}

/// An input's datatype, shape and element count, checked: a known datatype, no negative
/// dimension, at least one element.
pub(crate) fn input_layout(
    name: &str,
    datatype: &str,
    shape: &[i64],
) -> Result<(DataType, Vec<u64>, usize), ProtocolError> {
    let datatype = DataType::from_name(datatype)
        .ok_or_else(|| bad(format!("input {name:?}: datatype {datatype:?} is not supported")))?;
    let shape: Vec<u64> =
        shape.iter().map(|&d| u64::try_from(d)).collect::<Result<_, _>>().map_err(|_| {
            bad(format!("input {name:?}: shape {shape:?} has a negative dimension"))
        })?;
    let count = element_count(&shape)
        .ok_or_else(|| bad(format!("input {name:?}: shape {shape:?} is too large")))?;
    // As Triton: no empty batches. A shape with a zero (`[0, 3, 1e9, 1e9]`) would reach the
    // engine with no rows and sizes no real input could have; it is refused here.
    if count == 0 {
        return Err(bad(format!(
            "input {name:?}: shape {shape:?} holds no elements; a request carries at least one row"
        )));
    }
    Ok((datatype, shape, count))
}

/// Decodes one input, taking its binary data (if any) from the front of `binary`.
fn decode_input(input: RawInput<'_>, binary: &mut &[u8]) -> Result<NamedTensor, ProtocolError> {
    let name = input.name;
    let params = input.parameters.unwrap_or_default();
    if params.shared_memory_region.is_some() {
        return Err(bad(format!("input {name:?}: the shared memory extension is not supported")));
    }
    let (datatype, shape, count) = input_layout(&name, &input.datatype, &input.shape)?;
    let data = match (params.binary_data_size, input.data) {
        (Some(_), Some(_)) => {
            return Err(bad(format!("input {name:?} has both JSON data and binary_data_size")));
        }
        (Some(size), None) => {
            let size = usize::try_from(size).unwrap_or(usize::MAX);
            if size > binary.len() {
                return Err(bad(format!(
                    "input {name:?}: binary_data_size {size} exceeds the {} binary bytes left",
                    binary.len()
                )));
            }
            let (bytes, rest) = binary.split_at(size);
            *binary = rest;
            decode_binary(datatype, bytes, count)
                .map_err(|e| bad(format!("input {name:?}: {e}")))?
        }
        (None, Some(raw)) => {
            decode_json(datatype, raw, count).map_err(|e| bad(format!("input {name:?}: {e}")))?
        }
        (None, None) => return Err(bad(format!("input {name:?} has no data"))),
    };
    if data.len() != count {
        return Err(bad(format!(
            "input {name:?}: {} elements given for shape {shape:?} ({count} elements)",
            data.len()
        )));
    }
    Ok(NamedTensor { name, tensor: Tensor { shape, data } })
}

fn requested_output(
    output: RawOutput,
    binary_by_default: bool,
) -> Result<RequestedOutput, ProtocolError> {
    let params = output.parameters.unwrap_or_default();
    if params.classification.is_some() {
        return Err(bad(format!(
            "output {:?}: the classification extension is not supported",
            output.name
        )));
    }
    if params.shared_memory_region.is_some() {
        return Err(bad(format!(
            "output {:?}: the shared memory extension is not supported",
            output.name
        )));
    }
    Ok(RequestedOutput {
        binary: params.binary_data.unwrap_or(binary_by_default),
        name: output.name,
    })
}

/// A JSON value convertible to an element of one type.
trait Element: Sized {
    fn from_bool(_: bool) -> Option<Self> {
        None
    }
    fn from_i64(v: i64) -> Option<Self>;
    fn from_u64(v: u64) -> Option<Self>;
    fn from_f64(_: f64) -> Option<Self> {
        None
    }
    fn from_le(bytes: &[u8]) -> Option<Self>;
    fn from_str(_: &str) -> Option<Self> {
        None
    }
    /// JSON `null`: a missing value, which only floating-point types hold (as NaN).
    fn missing() -> Option<Self> {
        None
    }
}

macro_rules! int_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            fn from_i64(v: i64) -> Option<Self> { <$t>::try_from(v).ok() }
            fn from_u64(v: u64) -> Option<Self> { <$t>::try_from(v).ok() }
            fn from_le(bytes: &[u8]) -> Option<Self> { Some(<$t>::from_le_bytes(bytes.try_into().ok()?)) }
        }
    )*};
}
int_element!(u8, u16, u32, u64, i8, i16, i32, i64);

impl Element for bool {
    fn from_bool(v: bool) -> Option<Self> {
        Some(v)
    }
    fn from_i64(_: i64) -> Option<Self> {
        None
    }
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_le(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [0] => Some(false),
            [1] => Some(true),
            _ => None,
        }
    }
}

macro_rules! float_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            fn from_i64(v: i64) -> Option<Self> { Some(v as $t) }
            fn from_u64(v: u64) -> Option<Self> { Some(v as $t) }
            fn from_f64(v: f64) -> Option<Self> { Some(v as $t) }
            fn missing() -> Option<Self> { Some(<$t>::NAN) }
            fn from_le(bytes: &[u8]) -> Option<Self> { Some(<$t>::from_le_bytes(bytes.try_into().ok()?)) }
        }
    )*};
}
float_element!(f32, f64);

impl Element for half::f16 {
    fn from_i64(v: i64) -> Option<Self> {
        Some(Self::from_f64(v as f64))
    }
    fn from_u64(v: u64) -> Option<Self> {
        Some(Self::from_f64(v as f64))
    }
    fn from_f64(v: f64) -> Option<Self> {
        Some(Self::from_f64(v))
    }
    fn from_le(bytes: &[u8]) -> Option<Self> {
        Some(Self::from_le_bytes(bytes.try_into().ok()?))
    }
    fn missing() -> Option<Self> {
        Some(Self::NAN)
    }
}

/// A `BYTES` element: a JSON string (as its UTF-8 bytes).
impl Element for Vec<u8> {
    fn from_i64(_: i64) -> Option<Self> {
        None
    }
    fn from_u64(_: u64) -> Option<Self> {
        None
    }
    fn from_le(bytes: &[u8]) -> Option<Self> {
        Some(bytes.to_vec())
    }
    fn from_str(v: &str) -> Option<Self> {
        Some(v.as_bytes().to_vec())
    }
}

/// Flattens nested JSON arrays of `T` into one vector, refusing values of the wrong kind.
struct Flatten<'v, T> {
    out: &'v mut Vec<T>,
    datatype: DataType,
    depth: usize,
}

const MAX_DEPTH: usize = 64;

impl<'de, T: Element> DeserializeSeed<'de> for Flatten<'_, T> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de, T: Element> Visitor<'de> for Flatten<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} values, in arrays nested any way", self.datatype)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(de::Error::custom("data is nested too deeply"));
        }
        if let Some(hint) = seq.size_hint() {
            self.out.reserve(hint);
        }
        while seq
            .next_element_seed(Flatten {
                out: &mut *self.out,
                datatype: self.datatype,
                depth: self.depth + 1,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.push(T::from_bool(v), &v)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.push(T::from_i64(v), &v)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.push(T::from_u64(v), &v)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        self.push(T::from_f64(v), &v)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.push(T::from_str(v), &format_args!("{v:?}"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.push(T::missing(), &"null")
    }
}

impl<T> Flatten<'_, T> {
    fn push<E: de::Error>(self, value: Option<T>, raw: &dyn fmt::Display) -> Result<(), E> {
        let value = value.ok_or_else(|| {
            E::custom(format_args!("{raw} is not a valid {} value", self.datatype))
        })?;
        self.out.push(value);
        Ok(())
    }
}

fn flatten<T: Element>(raw: &RawValue, datatype: DataType, count: usize) -> Result<Vec<T>, String> {
    let json = raw.get();
    // Every element takes at least a byte of the JSON: reserving for the declared shape
    // alone let `"shape": [16777216], "data": []` reserve 400 MB (found by fuzzing).
    let mut out = Vec::with_capacity(count.min(json.len()));
    if flatten_numbers(json, &mut out).is_some() {
        return Ok(out);
    }
    // Anything else (strings, booleans, `null`, a value the type cannot hold) takes serde's
    // path, which also words the errors.
    out.clear();
    let mut de = serde_json::Deserializer::from_str(json);
    Flatten { out: &mut out, datatype, depth: 0 }
        .deserialize(&mut de)
        .map_err(|e| format!("data: {e}"))?;
    Ok(out)
}

/// The fast path of [`flatten`] for data made only of numbers and arrays, the usual
/// request: numbers are parsed straight from the text by `fast-float2`, about a quarter
/// faster than through serde's visitor on long float arrays (an image of 150,528 floats of
/// 16–17 digits: 4.0 ms there, 3.0 here).
///
/// `json` was already checked as well-formed JSON when the request was parsed (it is a
/// [`RawValue`]), so this only has to tell tokens apart, and a JSON number is the longest
/// number `fast-float2` reads where it starts. The values are those serde's path gives, bit
/// for bit: integers through `from_i64`/`from_u64`, other numbers correctly rounded to
/// `f64` (as serde_json's `float_roundtrip` does) through `from_f64`.
///
/// `None` when it meets anything else, a number out of range for 64-bit integers, a value
/// `T` refuses or nesting deeper than the serde path allows: the caller then takes that path.
fn flatten_numbers<T: Element>(json: &str, out: &mut Vec<T>) -> Option<()> {
    let bytes = json.as_bytes();
    let mut depth = 0;
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        match byte {
            b' ' | b'\t' | b'\n' | b'\r' | b',' => at += 1,
            b'[' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                depth += 1;
                at += 1;
            }
            b']' => {
                depth = depth.checked_sub(1)?;
                at += 1;
            }
            b'-' | b'0'..=b'9' => {
                let (number, len) = fast_float2::parse_partial::<f64, _>(&bytes[at..]).ok()?;
                let token = &json[at..at + len];
                let value = if token.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) {
                    T::from_f64(number)
                } else if byte == b'-' {
                    match token.parse().ok()? {
                        // serde_json reads `-0` as a float, negative zero.
                        0 => T::from_f64(-0.0),
                        negative => T::from_i64(negative),
                    }
                } else {
                    T::from_u64(token.parse().ok()?)
                };
                out.push(value?);
                at += len;
            }
            _ => return None,
        }
    }
    Some(())
}

fn decode_json(datatype: DataType, json: &RawValue, count: usize) -> Result<TensorData, String> {
    Ok(match datatype {
        DataType::Bool => TensorData::Bool(flatten(json, datatype, count)?),
        DataType::Uint8 => TensorData::Uint8(flatten(json, datatype, count)?),
        DataType::Uint16 => TensorData::Uint16(flatten(json, datatype, count)?),
        DataType::Uint32 => TensorData::Uint32(flatten(json, datatype, count)?),
        DataType::Uint64 => TensorData::Uint64(flatten(json, datatype, count)?),
        DataType::Int8 => TensorData::Int8(flatten(json, datatype, count)?),
        DataType::Int16 => TensorData::Int16(flatten(json, datatype, count)?),
        DataType::Int32 => TensorData::Int32(flatten(json, datatype, count)?),
        DataType::Int64 => TensorData::Int64(flatten(json, datatype, count)?),
        DataType::Fp16 => TensorData::Fp16(flatten(json, datatype, count)?),
        DataType::Fp32 => TensorData::Fp32(flatten(json, datatype, count)?),
        DataType::Fp64 => TensorData::Fp64(flatten(json, datatype, count)?),
        DataType::Bytes => TensorData::Bytes(flatten(json, datatype, count)?),
    })
}

fn from_le_all<T: Element>(
    bytes: &[u8],
    size: usize,
    datatype: DataType,
) -> Result<Vec<T>, String> {
    bytes
        .chunks_exact(size)
        .enumerate()
        .map(|(i, b)| {
            T::from_le(b)
                .ok_or_else(|| format!("binary element {i} is not a valid {datatype} value"))
        })
        .collect()
}

/// `BYTES` in the binary extension: each element a 4-byte little-endian length, then
/// that many bytes.
fn decode_strings(mut bytes: &[u8], count: usize) -> Result<TensorData, String> {
    let mut out = Vec::with_capacity(count.min(bytes.len() / 4));
    while !bytes.is_empty() {
        let Some((len, rest)) = bytes.split_first_chunk::<4>() else {
            return Err(format!("binary BYTES element {} has a truncated length", out.len()));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > rest.len() {
            return Err(format!(
                "binary BYTES element {} declares {len} bytes, {} are left",
                out.len(),
                rest.len()
            ));
        }
        let (element, rest) = rest.split_at(len);
        out.push(element.to_vec());
        bytes = rest;
    }
    Ok(TensorData::Bytes(out))
}

/// Decodes `count` elements of `datatype` from their raw bytes (little endian; `BYTES` as
/// length-prefixed strings), as the binary extension and gRPC's raw contents carry them.
pub(crate) fn decode_binary(
    datatype: DataType,
    bytes: &[u8],
    count: usize,
) -> Result<TensorData, String> {
    let Some(size) = datatype.size() else { return decode_strings(bytes, count) };
    if Some(bytes.len()) != count.checked_mul(size) {
        return Err(format!(
            "binary_data_size is {} bytes; {count} {datatype} elements need {}",
            bytes.len(),
            count.saturating_mul(size)
        ));
    }
    Ok(match datatype {
        DataType::Bool => TensorData::Bool(from_le_all(bytes, size, datatype)?),
        DataType::Uint8 => TensorData::Uint8(bytes.to_vec()),
        DataType::Uint16 => TensorData::Uint16(from_le_all(bytes, size, datatype)?),
        DataType::Uint32 => TensorData::Uint32(from_le_all(bytes, size, datatype)?),
        DataType::Uint64 => TensorData::Uint64(from_le_all(bytes, size, datatype)?),
        DataType::Int8 => TensorData::Int8(bytes.iter().map(|&b| b as i8).collect()),
        DataType::Int16 => TensorData::Int16(from_le_all(bytes, size, datatype)?),
        DataType::Int32 => TensorData::Int32(from_le_all(bytes, size, datatype)?),
        DataType::Int64 => TensorData::Int64(from_le_all(bytes, size, datatype)?),
        DataType::Fp16 => TensorData::Fp16(from_le_all(bytes, size, datatype)?),
        DataType::Fp32 => TensorData::Fp32(from_le_all(bytes, size, datatype)?),
        DataType::Fp64 => TensorData::Fp64(from_le_all(bytes, size, datatype)?),
        DataType::Bytes => unreachable!("BYTES has no fixed size"),
    })
}

/// Appends a tensor's elements, little endian, as the binary extension sends them.
pub(crate) fn encode_binary(data: &TensorData, out: &mut Vec<u8>) {
    match data {
        TensorData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        TensorData::Uint8(v) => out.extend_from_slice(v),
        TensorData::Int8(v) => out.extend(v.iter().map(|&b| b as u8)),
        TensorData::Uint16(v) => extend_le(out, v, |x| x.to_le_bytes()),
        TensorData::Uint32(v) => extend_le(out, v, |x| x.to_le_bytes()),
        TensorData::Uint64(v) => extend_le(out, v, |x| x.to_le_bytes()),
        TensorData::Int16(v) => extend_le(out, v, |x| x.to_le_bytes()),
        TensorData::Int32(v) => extend_le(out, v, |x| x.to_le_bytes()),
        TensorData::Int64(v) => extend_le(out, v, |x| x.to_le_bytes()),
        TensorData::Fp16(v) => extend_le(out, v, |x| x.to_le_bytes()),
        TensorData::Fp32(v) => extend_le(out, v, |x| x.to_le_bytes()),
        TensorData::Fp64(v) => extend_le(out, v, |x| x.to_le_bytes()),
        TensorData::Bytes(v) => {
            out.reserve(v.iter().map(|b| 4 + b.len()).sum());
            for b in v {
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
        }
    }
}

/// Appends `values` as `N` bytes each: sized once and written in place, rather than grown
/// element by element (a batch's output reallocated its buffer about ten times).
fn extend_le<T, const N: usize>(out: &mut Vec<u8>, values: &[T], bytes: impl Fn(&T) -> [u8; N]) {
    let start = out.len();
    out.resize(start + values.len() * N, 0);
    for (to, value) in out[start..].chunks_exact_mut(N).zip(values) {
        to.copy_from_slice(&bytes(value));
    }
}

/// Serialises the elements as a flat JSON array.
struct JsonData<'a>(&'a TensorData);

impl Serialize for JsonData<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            TensorData::Fp16(v) => serializer.collect_seq(v.iter().map(|x| x.to_f32())),
            // JSON has no byte strings: each element as text (invalid UTF-8 replaced);
            // the binary extension carries bytes exactly.
            TensorData::Bytes(v) => {
                serializer.collect_seq(v.iter().map(|b| String::from_utf8_lossy(b)))
            }
            TensorData::Bool(v) => v.serialize(serializer),
            TensorData::Uint8(v) => v.serialize(serializer),
            TensorData::Uint16(v) => v.serialize(serializer),
            TensorData::Uint32(v) => v.serialize(serializer),
            TensorData::Uint64(v) => v.serialize(serializer),
            TensorData::Int8(v) => v.serialize(serializer),
            TensorData::Int16(v) => v.serialize(serializer),
            TensorData::Int32(v) => v.serialize(serializer),
            TensorData::Int64(v) => v.serialize(serializer),
            TensorData::Fp32(v) => v.serialize(serializer),
            TensorData::Fp64(v) => v.serialize(serializer),
        }
    }
}

#[derive(Serialize)]
struct ResponseOutput<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [u64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<JsonData<'a>>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

#[derive(Serialize)]
struct Response<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<ResponseParameters<'a>>,
    outputs: Vec<ResponseOutput<'a>>,
}

#[derive(Serialize)]
struct ResponseParameters<'a> {
    entity_ids: &'a [String],
}

/// One output to send.
#[derive(Debug)]
pub struct OutputToSend<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its value.
    pub tensor: &'a Tensor,
    /// Whether to send it raw.
    pub binary: bool,
}

/// An encoded response body.
#[derive(Debug)]
pub struct EncodedResponse {
    pub body: Vec<u8>,
    /// With binary outputs: the length of the JSON part, for `Inference-Header-Content-Length`.
    pub json_len: Option<usize>,
}

/// Encodes an inference response; `entity_ids`, when the request named entities, are
/// echoed in its `parameters`.
pub fn encode_response(
    model_name: &str,
    model_version: u64,
    id: Option<&str>,
    entity_ids: Option<&[String]>,
    outputs: &[OutputToSend<'_>],
) -> EncodedResponse {
    let any_binary = outputs.iter().any(|o| o.binary);
    let mut binary = Vec::new();
    let outputs = outputs
        .iter()
        .map(|o| {
            let (parameters, data) = if o.binary {
                let before = binary.len();
                encode_binary(&o.tensor.data, &mut binary);
                (Some(BinarySize { binary_data_size: binary.len() - before }), None)
            } else {
                (None, Some(JsonData(&o.tensor.data)))
            };
            ResponseOutput {
                name: o.name,
                datatype: o.tensor.data.datatype().name(),
                shape: &o.tensor.shape,
                parameters,
                data,
            }
        })
        .collect();
    let response = Response {
        model_name,
        model_version: model_version.to_string(),
        id,
        parameters: entity_ids.map(|entity_ids| ResponseParameters { entity_ids }),
        outputs,
    };
    let mut body = serde_json::to_vec(&response).expect("responses always serialise");
    if any_binary {
        let json_len = body.len();
        body.extend_from_slice(&binary);
        EncodedResponse { body, json_len: Some(json_len) }
    } else {
        EncodedResponse { body, json_len: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(req: &InferRequest) -> &Tensor {
        &req.inputs[0].tensor
    }

    #[test]
    fn json_data_may_be_flat_or_nested() {
        let flat =
            r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3.5,4]}]}"#;
        let nested =
            r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3.5,4]]}]}"#;
        for body in [flat, nested] {
            let req = decode_request(body.as_bytes(), None).unwrap();
            assert_eq!(one(&req).data, TensorData::Fp32(vec![1.0, 2.0, 3.5, 4.0]));
            assert_eq!(one(&req).shape, vec![2, 2]);
        }
    }

    /// The numbers' fast path gives serde's values bit for bit, and leaves to serde what it
    /// does not take (with serde's wording of the error).
    #[test]
    fn numbers_parse_as_serde_parses_them() {
        fn serde_path<T: Element>(json: &str, datatype: DataType) -> Result<Vec<T>, String> {
            let mut out = Vec::new();
            let mut de = serde_json::Deserializer::from_str(json);
            Flatten { out: &mut out, datatype, depth: 0 }
                .deserialize(&mut de)
                .map(|()| out)
                .map_err(|e| format!("data: {e}"))
        }
        fn both<T: Element + fmt::Debug + PartialEq>(
            json: &str,
            datatype: DataType,
        ) -> (Result<Vec<T>, String>, bool) {
            let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
            let fast = flatten_numbers(raw.get(), &mut Vec::<T>::new()).is_some();
            let got = flatten(&raw, datatype, 16);
            assert_eq!(got, serde_path(json, datatype), "{json}");
            (got, fast)
        }
        let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
        let tricky = "[0.9449049234390259, -0, -0.0, 1e-45, 3.4028235677973366e38, 1E+2, \
            -7, 18446744073709551615, 2.2250738585072011e-308, 1.00000005960464477550, \
            [[0.1], [-1e-7]], 123456789012345678901.5]";
        let (got, fast) = both::<f32>(tricky, DataType::Fp32);
        assert!(fast, "the fast path takes plain numbers");
        let serde = serde_path::<f32>(tricky, DataType::Fp32).unwrap();
        assert_eq!(bits(got.unwrap()), bits(serde));
        let (got, _) = both::<f64>(tricky, DataType::Fp64);
        assert_eq!(got.unwrap().len(), 13);
        assert_eq!(
            both::<i64>("[-9223372036854775808, 5]", DataType::Int64).0.unwrap()[0],
            i64::MIN
        );
        // Left to serde: what the fast path does not read, or a value the type refuses.
        assert!(!both::<f32>(r#"[1, "2"]"#, DataType::Fp32).1);
        assert!(!both::<f32>("[-9223372036854775809]", DataType::Fp32).1);
        assert!(!both::<f64>("[123456789012345678901234567890]", DataType::Fp64).1);
        assert!(!both::<i32>("[1.5]", DataType::Int32).1);
        assert!(!both::<bool>("[true]", DataType::Bool).1);
        let (got, fast) = both::<u8>("[1, 300]", DataType::Uint8);
        assert!(!fast);
        assert!(got.unwrap_err().contains("300 is not a valid UINT8 value"));
        let deep = format!("{}1{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let (got, fast) = both::<f32>(&deep, DataType::Fp32);
        assert!(!fast);
        assert!(got.unwrap_err().contains("nested too deeply"));
    }

    #[test]
    fn null_is_a_missing_float() {
        let body = r#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,null,2]}]}"#;
        let req = decode_request(body.as_bytes(), None).unwrap();
        let TensorData::Fp32(v) = &one(&req).data else { panic!("FP32") };
        assert!(v[1].is_nan(), "{v:?}");
        assert_eq!((v[0].to_bits(), v[2].to_bits()), (1.0f32.to_bits(), 2.0f32.to_bits()));
    }

    #[test]
    fn every_datatype_decodes_from_json_and_binary() {
        let cases: &[(&str, &str, TensorData)] = &[
            ("BOOL", "[true,false]", TensorData::Bool(vec![true, false])),
            ("INT32", "[-1,7]", TensorData::Int32(vec![-1, 7])),
            ("INT64", "[-9007199254740993,2]", TensorData::Int64(vec![-9_007_199_254_740_993, 2])),
            ("UINT8", "[255,0]", TensorData::Uint8(vec![255, 0])),
            ("INT8", "[-128,127]", TensorData::Int8(vec![-128, 127])),
            ("UINT64", "[18446744073709551615,0]", TensorData::Uint64(vec![u64::MAX, 0])),
            ("FP64", "[0.1,-2]", TensorData::Fp64(vec![0.1, -2.0])),
            ("FP32", "[0.5,1e-3]", TensorData::Fp32(vec![0.5, 1e-3])),
            ("INT16", "[-300,300]", TensorData::Int16(vec![-300, 300])),
            ("UINT16", "[65535,1]", TensorData::Uint16(vec![65535, 1])),
            ("UINT32", "[4294967295,1]", TensorData::Uint32(vec![u32::MAX, 1])),
            (
                "FP16",
                "[0.5,-2]",
                TensorData::Fp16(vec![half::f16::from_f32(0.5), half::f16::from_f32(-2.0)]),
            ),
            ("BYTES", r#"["plan-b",""]"#, TensorData::Bytes(vec![b"plan-b".to_vec(), Vec::new()])),
        ];
        for (dt, json, expected) in cases {
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":[2],"datatype":"{dt}","data":{json}}}]}}"#
            );
            let req = decode_request(body.as_bytes(), None).unwrap();
            assert_eq!(&one(&req).data, expected, "{dt} json");

            let mut raw = Vec::new();
            encode_binary(expected, &mut raw);
            let header = format!(
                r#"{{"inputs":[{{"name":"x","shape":[2],"datatype":"{dt}","parameters":{{"binary_data_size":{}}}}}]}}"#,
                raw.len()
            );
            let mut body = header.clone().into_bytes();
            body.extend_from_slice(&raw);
            let req = decode_request(&body, Some(header.len())).unwrap();
            assert_eq!(&one(&req).data, expected, "{dt} binary");
        }
    }

    #[test]
    fn empty_inputs_are_refused_whatever_their_other_sizes() {
        for shape in ["[0, 8]", "[0, 3, 1000000000, 1000000000]", "[2, 0]"] {
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":{shape},"datatype":"FP32","data":[]}}]}}"#
            );
            let err = decode_request(body.as_bytes(), None).unwrap_err();
            assert!(err.0.contains("holds no elements"), "{shape}: {}", err.0);
        }
        let huge = r#"{"inputs":[{"name":"x","shape":[0, 99999999999, 99999999999, 99999999999],"datatype":"FP32","data":[]}]}"#;
        assert!(decode_request(huge.as_bytes(), None).is_err());
    }

    #[test]
    fn entity_ids_are_strings_or_integers() {
        let ids = |body: &str| decode_request(body.as_bytes(), None).map(|r| r.entity_ids);
        assert_eq!(ids(r#"{"inputs":[]}"#).unwrap(), None);
        assert_eq!(ids(r#"{"parameters":{"entity_id":"p-1"}}"#).unwrap(), Some(vec!["p-1".into()]));
        let key = |body: &str| decode_request(body.as_bytes(), None).unwrap().routing_key;
        assert_eq!(key(r#"{"parameters":{"entity_ids":["a",2]}}"#).as_deref(), Some("a"));
        assert_eq!(
            key(r#"{"parameters":{"entity_id":3,"routing_key":"u-9"}}"#).as_deref(),
            Some("u-9")
        );
        assert_eq!(key(r#"{"parameters":{"routing_key":17}}"#).as_deref(), Some("17"));
        assert_eq!(key(r#"{"inputs":[]}"#), None);
        assert_eq!(ids(r#"{"parameters":{"entity_id":-7}}"#).unwrap(), Some(vec!["-7".into()]));
        assert_eq!(
            ids(r#"{"inputs":[],"parameters":{"entity_ids":["a",2]}}"#).unwrap(),
            Some(vec!["a".into(), "2".into()])
        );
        let err = ids(r#"{"parameters":{"entity_id":1.5}}"#).unwrap_err();
        assert!(err.0.contains("(a string or an integer)"), "{err}");
        let err = ids(r#"{"parameters":{"entity_ids":[]}}"#).unwrap_err();
        assert!(err.0.contains("empty"), "{err}");
        let err = ids(r#"{"parameters":{"entity_id":"a","entity_ids":["b"]}}"#).unwrap_err();
        assert!(err.0.contains("not both"), "{err}");
    }

    #[test]
    fn malformed_requests_name_their_problem() {
        let check = |body: &str, needle: &str| {
            let err = decode_request(body.as_bytes(), None).unwrap_err();
            assert!(err.0.contains(needle), "{body}: {err}");
        };
        check("{", "malformed");
        check(
            r#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#,
            "2 elements given",
        );
        check(
            r#"{"inputs":[{"name":"x","shape":[2],"datatype":"INT32","data":[1,2.5]}]}"#,
            "2.5 is not a valid INT32",
        );
        check(
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[300]}]}"#,
            "300 is not a valid INT8",
        );
        check(
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BOOL","data":[1]}]}"#,
            "not a valid BOOL",
        );
        check(
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":["a"]}]}"#,
            "\"a\" is not a valid FP32 value",
        );
        check(
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":[7]}]}"#,
            "7 is not a valid BYTES value",
        );
        check(
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[null]}]}"#,
            "null is not a valid INT64 value",
        );
        let truncated = br#"{"inputs":[{"name":"s","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":6}}]}"#;
        let mut body = truncated.to_vec();
        body.extend_from_slice(&[9, 0, 0, 0, b'a', b'b']);
        let err = decode_request(&body, Some(truncated.len())).unwrap_err();
        assert!(err.0.contains("declares 9 bytes, 2 are left"), "{err}");
        check(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BF16","data":[1]}]}"#, "BF16");
        check(r#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[1]}]}"#, "negative");
        check(r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#, "no data");
        check(
            r#"{"inputs":[{"name":"x","shape":[4294967296,4294967296],"datatype":"FP32","data":[]}]}"#,
            "too large",
        );
        let deep = format!(
            r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32","data":{}1{}}}]}}"#,
            "[".repeat(100),
            "]".repeat(100)
        );
        check(&deep, "nested too deeply");
        check(
            r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}],"outputs":[{"name":"y","parameters":{"classification":2}}]}"#,
            "classification",
        );
    }

    #[test]
    fn binary_encoding_appends_after_what_the_buffer_holds() {
        let mut out = b"head".to_vec();
        encode_binary(&TensorData::Fp32(vec![1.5, -2.0]), &mut out);
        encode_binary(&TensorData::Int64(vec![-3]), &mut out);
        encode_binary(&TensorData::Bytes(vec![b"ab".to_vec()]), &mut out);
        let mut expected = b"head".to_vec();
        expected.extend(1.5f32.to_le_bytes());
        expected.extend((-2.0f32).to_le_bytes());
        expected.extend((-3i64).to_le_bytes());
        expected.extend(2u32.to_le_bytes());
        expected.extend(b"ab");
        assert_eq!(out, expected);
    }

    #[test]
    fn binary_sizes_are_checked() {
        let header = r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = header.as_bytes().to_vec();
        body.extend_from_slice(&[0; 4]);
        let err = decode_request(&body, Some(header.len())).unwrap_err();
        assert!(err.0.contains("exceeds"), "{err}");
        body.extend_from_slice(&[0; 8]);
        let err = decode_request(&body, Some(header.len())).unwrap_err();
        assert!(err.0.contains("4 bytes of binary data are not claimed"), "{err}");
        let err = decode_request(header.as_bytes(), Some(header.len() + 1)).unwrap_err();
        assert!(err.0.contains("Inference-Header-Content-Length"), "{err}");
        let bools = r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BOOL","parameters":{"binary_data_size":1}}]}"#;
        let mut body = bools.as_bytes().to_vec();
        body.push(7);
        let err = decode_request(&body, Some(bools.len())).unwrap_err();
        assert!(err.0.contains("not a valid BOOL"), "{err}");
    }

    #[test]
    fn outputs_choose_binary_per_output_or_by_default() {
        let body = r#"{"inputs":[],"parameters":{"binary_data_output":true},"outputs":[{"name":"a"},{"name":"b","parameters":{"binary_data":false}}]}"#;
        let req = decode_request(body.as_bytes(), None).unwrap();
        assert_eq!(
            req.outputs.unwrap(),
            vec![
                RequestedOutput { name: "a".into(), binary: true },
                RequestedOutput { name: "b".into(), binary: false }
            ]
        );
    }

    #[test]
    fn responses_mix_json_and_binary_outputs() {
        let probs = Tensor { shape: vec![1, 2], data: TensorData::Fp32(vec![0.25, 0.75]) };
        let label = Tensor { shape: vec![1], data: TensorData::Int64(vec![1]) };
        let json = encode_response(
            "m",
            3,
            Some("req-1"),
            None,
            &[
                OutputToSend { name: "p", tensor: &probs, binary: false },
                OutputToSend { name: "l", tensor: &label, binary: false },
            ],
        );
        assert_eq!(json.json_len, None);
        assert_eq!(
            String::from_utf8(json.body).unwrap(),
            r#"{"model_name":"m","model_version":"3","id":"req-1","outputs":[{"name":"p","datatype":"FP32","shape":[1,2],"data":[0.25,0.75]},{"name":"l","datatype":"INT64","shape":[1],"data":[1]}]}"#
        );
        let mixed = encode_response(
            "m",
            3,
            None,
            Some(&["pump-7".to_owned()]),
            &[
                OutputToSend { name: "p", tensor: &probs, binary: true },
                OutputToSend { name: "l", tensor: &label, binary: false },
            ],
        );
        let n = mixed.json_len.unwrap();
        let header: serde_json::Value = serde_json::from_slice(&mixed.body[..n]).unwrap();
        assert_eq!(header["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(header["parameters"]["entity_ids"][0], "pump-7");
        assert_eq!(&mixed.body[n..], &[0, 0, 0x80, 0x3e, 0, 0, 0x40, 0x3f]);
    }

    #[test]
    fn strings_and_half_floats_in_responses() {
        let labels =
            Tensor { shape: vec![2], data: TensorData::Bytes(vec![b"pro".to_vec(), vec![0xff]]) };
        let half =
            Tensor { shape: vec![1], data: TensorData::Fp16(vec![half::f16::from_f32(0.25)]) };
        let json = encode_response(
            "m",
            1,
            None,
            None,
            &[
                OutputToSend { name: "l", tensor: &labels, binary: false },
                OutputToSend { name: "h", tensor: &half, binary: false },
            ],
        );
        let body: serde_json::Value = serde_json::from_slice(&json.body).unwrap();
        assert_eq!(body["outputs"][0]["datatype"], "BYTES");
        assert_eq!(body["outputs"][0]["data"], serde_json::json!(["pro", "\u{fffd}"]));
        assert_eq!(body["outputs"][1]["data"], serde_json::json!([0.25]));
        let binary = encode_response(
            "m",
            1,
            None,
            None,
            &[OutputToSend { name: "l", tensor: &labels, binary: true }],
        );
        let n = binary.json_len.unwrap();
        assert_eq!(&binary.body[n..], &[3, 0, 0, 0, b'p', b'r', b'o', 1, 0, 0, 0, 0xff]);
        let header = br#"{"inputs":[{"name":"l","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":12}}]}"#;
        let mut round = header.to_vec();
        round.extend_from_slice(&binary.body[n..]);
        assert_eq!(one(&decode_request(&round, Some(header.len())).unwrap()).data, labels.data);
    }
}
