//! Tensors as the rest of Falaj sees them: element types named as in the Open Inference
//! Protocol, shapes with symbolic dimensions, a model's I/O signature, and the check
//! that binds a request's concrete shapes to that signature.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// An element type, named as in the Open Inference Protocol (`FP32`, `INT64`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum DataType {
    /// One byte per element, 0 or 1.
    Bool,
    /// Unsigned 8-bit integer.
    Uint8,
    /// Unsigned 16-bit integer.
    Uint16,
    /// Unsigned 32-bit integer.
    Uint32,
    /// Unsigned 64-bit integer.
    Uint64,
    /// Signed 8-bit integer.
    Int8,
    /// Signed 16-bit integer.
    Int16,
    /// Signed 32-bit integer.
    Int32,
    /// Signed 64-bit integer.
    Int64,
    /// IEEE 754 half precision.
    Fp16,
    /// IEEE 754 single precision.
    Fp32,
    /// IEEE 754 double precision.
    Fp64,
    /// Byte strings (ONNX string tensors; UTF-8 when a model reads them).
    Bytes,
}

impl DataType {
    /// Every supported type.
    pub const ALL: [Self; 13] = [
        Self::Bool,
        Self::Uint8,
        Self::Uint16,
        Self::Uint32,
        Self::Uint64,
        Self::Int8,
        Self::Int16,
        Self::Int32,
        Self::Int64,
        Self::Fp16,
        Self::Fp32,
        Self::Fp64,
        Self::Bytes,
    ];

    /// The protocol's name for this type.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::Uint8 => "UINT8",
            Self::Uint16 => "UINT16",
            Self::Uint32 => "UINT32",
            Self::Uint64 => "UINT64",
            Self::Int8 => "INT8",
            Self::Int16 => "INT16",
            Self::Int32 => "INT32",
            Self::Int64 => "INT64",
            Self::Fp16 => "FP16",
            Self::Fp32 => "FP32",
            Self::Fp64 => "FP64",
            Self::Bytes => "BYTES",
        }
    }

    /// Parses a protocol type name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Bytes per element in the protocol's binary encoding (little endian); `None` for
    /// `BYTES`, whose elements each carry their own length.
    pub const fn size(self) -> Option<usize> {
        Some(match self {
            Self::Bool | Self::Uint8 | Self::Int8 => 1,
            Self::Uint16 | Self::Int16 | Self::Fp16 => 2,
            Self::Uint32 | Self::Int32 | Self::Fp32 => 4,
            Self::Uint64 | Self::Int64 | Self::Fp64 => 8,
            Self::Bytes => return None,
        })
    }

    /// Whether elements are numbers (everything but `BYTES`).
    pub const fn is_numeric(self) -> bool {
        !matches!(self, Self::Bytes)
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension of a declared shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    /// A fixed size.
    Fixed(u64),
    /// A named symbol (`N`, `batch`, `height`); every use of one name in a signature
    /// takes the same value in a given request.
    Symbol(String),
    /// An unnamed dimension of any size, independent of every other.
    Any,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(n) => write!(f, "{n}"),
            Self::Symbol(s) => f.write_str(s),
            Self::Any => f.write_str("?"),
        }
    }
}

/// In JSON a fixed dimension is a number, a symbol a string and an unnamed one `null`.
impl Serialize for Dim {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Fixed(n) => serializer.serialize_u64(*n),
            Self::Symbol(s) => serializer.serialize_str(s),
            Self::Any => serializer.serialize_none(),
        }
    }
}

impl<'de> Deserialize<'de> for Dim {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Fixed(u64),
            Symbol(String),
        }
        Ok(match Option::<Repr>::deserialize(deserializer)? {
            Some(Repr::Fixed(n)) => Self::Fixed(n),
            Some(Repr::Symbol(s)) if s.is_empty() => {
                return Err(serde::de::Error::custom("a symbolic dimension needs a name"));
            }
            Some(Repr::Symbol(s)) => Self::Symbol(s),
            None => Self::Any,
        })
    }
}

/// A named tensor of a model's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    /// The tensor's name in the model graph.
    pub name: String,
    /// Its element type.
    pub datatype: DataType,
    /// Its shape, possibly with symbolic dimensions.
    pub shape: Vec<Dim>,
}

impl TensorSpec {
    /// The shape with every non-fixed dimension as `-1`, as the protocol's metadata shows it.
    pub fn protocol_shape(&self) -> Vec<i64> {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => i64::try_from(*n).unwrap_or(i64::MAX),
                Dim::Symbol(_) | Dim::Any => -1,
            })
            .collect()
    }
}

/// A model's inputs and outputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// Inputs, in the model's order.
    pub inputs: Vec<TensorSpec>,
    /// Outputs, in the model's order.
    pub outputs: Vec<TensorSpec>,
}

/// A request's claim about one input: its name, type and concrete shape.
#[derive(Debug, Clone, Copy)]
pub struct GivenInput<'a> {
    /// The input's name.
    pub name: &'a str,
    /// The element type the request declares.
    pub datatype: DataType,
    /// The concrete shape the request declares.
    pub shape: &'a [u64],
}

/// Why a request's inputs do not fit a signature. Each is the client's mistake.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ShapeError {
    /// The request names an input the model does not have.
    #[error("unknown input {0:?}")]
    UnknownInput(String),
    /// The request gives an input twice.
    #[error("input {0:?} is given more than once")]
    DuplicateInput(String),
    /// The request lacks an input.
    #[error("missing input {0:?}")]
    MissingInput(String),
    /// The request's type for an input differs from the model's.
    #[error("input {input:?} has datatype {got}, the model expects {expected}")]
    Datatype {
        /// The input.
        input: String,
        /// The model's type.
        expected: DataType,
        /// The request's type.
        got: DataType,
    },
    /// The request's rank for an input differs from the model's.
    #[error("input {input:?} has shape {got:?} of rank {}, the model expects rank {expected}", got.len())]
    Rank {
        /// The input.
        input: String,
        /// The model's rank.
        expected: usize,
        /// The request's shape.
        got: Vec<u64>,
    },
    /// A fixed dimension differs.
    #[error("input {input:?} has size {got} on axis {axis}, the model expects {expected}")]
    Dim {
        /// The input.
        input: String,
        /// The axis.
        axis: usize,
        /// The model's size.
        expected: u64,
        /// The request's size.
        got: u64,
    },
    /// A symbol takes two different values in one request.
    #[error(
        "dimension {symbol:?} is {first} in one input and {second} in input {input:?} (axis {axis})"
    )]
    SymbolConflict {
        /// The symbol.
        symbol: String,
        /// The value it took first.
        first: u64,
        /// The other value.
        second: u64,
        /// Where the other value was seen.
        input: String,
        /// Its axis.
        axis: usize,
    },
}

impl Signature {
    /// Binds the request's inputs to this signature: every input given once, with the
    /// declared type and rank, fixed dimensions equal and each symbol taking one value.
    /// Returns each input's index in the signature, in the request's order, and the
    /// symbols' values.
    pub fn bind(
        &self,
        given: &[GivenInput<'_>],
    ) -> Result<(Vec<usize>, BTreeMap<String, u64>), ShapeError> {
        let mut order = Vec::with_capacity(given.len());
        let mut seen = vec![false; self.inputs.len()];
        let mut symbols = BTreeMap::new();
        for input in given {
            let index = self
                .inputs
                .iter()
                .position(|s| s.name == input.name)
                .ok_or_else(|| ShapeError::UnknownInput(input.name.to_owned()))?;
            if std::mem::replace(&mut seen[index], true) {
                return Err(ShapeError::DuplicateInput(input.name.to_owned()));
            }
            let spec = &self.inputs[index];
            if spec.datatype != input.datatype {
                return Err(ShapeError::Datatype {
                    input: spec.name.clone(),
                    expected: spec.datatype,
                    got: input.datatype,
                });
            }
            if spec.shape.len() != input.shape.len() {
                return Err(ShapeError::Rank {
                    input: spec.name.clone(),
                    expected: spec.shape.len(),
                    got: input.shape.to_vec(),
                });
            }
            for (axis, (dim, &got)) in spec.shape.iter().zip(input.shape).enumerate() {
                match dim {
                    Dim::Fixed(expected) if *expected != got => {
                        return Err(ShapeError::Dim {
                            input: spec.name.clone(),
                            axis,
                            expected: *expected,
                            got,
                        });
                    }
                    Dim::Symbol(symbol) => {
                        let first = *symbols.entry(symbol.clone()).or_insert(got);
                        if first != got {
                            return Err(ShapeError::SymbolConflict {
                                symbol: symbol.clone(),
                                first,
                                second: got,
                                input: spec.name.clone(),
                                axis,
                            });
                        }
                    }
                    Dim::Fixed(_) | Dim::Any => {}
                }
            }
            order.push(index);
        }
        if let Some(missing) = seen.iter().position(|s| !s) {
            return Err(ShapeError::MissingInput(self.inputs[missing].name.clone()));
        }
        Ok((order, symbols))
    }
}

/// The sizes one axis of an input may take when a model is planned per input shape: one
/// size, or a range (`min..max`, `min..` unbounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Extent {
    /// Exactly this size.
    Exactly(u64),
    /// Any size from `min` to `max` (inclusive; no upper bound when `None`).
    Range {
        /// The least size, which the plan made at load uses.
        min: u64,
        /// The greatest size, if any.
        max: Option<u64>,
    },
}

impl Extent {
    /// The size the first plan is made for.
    pub const fn first(self) -> u64 {
        match self {
            Self::Exactly(n) | Self::Range { min: n, .. } => n,
        }
    }

    /// Whether `size` is allowed.
    pub fn allows(self, size: u64) -> bool {
        match self {
            Self::Exactly(n) => size == n,
            Self::Range { min, max } => size >= min && max.is_none_or(|m| size <= m),
        }
    }
}

impl fmt::Display for Extent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exactly(n) => write!(f, "{n}"),
            Self::Range { min, max: None } => write!(f, "{min}.."),
            Self::Range { min, max: Some(max) } => write!(f, "{min}..{max}"),
        }
    }
}

/// The shape an input is planned for, as `bundle build --input-shape NAME=1..64,3,48,192`
/// gives it: a fixed size pins the axis (requests of another size are refused), a range
/// lets it vary (a plan per shape, cached), and the first plan is made for every axis's
/// least size.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InputShape(pub Vec<Extent>);

impl InputShape {
    /// The shape of the plan made at load.
    pub fn first(&self) -> Vec<u64> {
        self.0.iter().map(|e| e.first()).collect()
    }
}

impl fmt::Display for InputShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for InputShape {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let number = |t: &str| {
            t.trim()
                .parse::<u64>()
                .map_err(|_| format!("{t:?} is not a size (a number, min..max or min..)"))
        };
        let extents = s
            .split(',')
            .map(|part| match part.split_once("..") {
                None => number(part).map(Extent::Exactly),
                Some((min, "")) => Ok(Extent::Range { min: number(min)?, max: None }),
                Some((min, max)) => {
                    let (min, max) = (number(min)?, number(max)?);
                    if min > max {
                        return Err(format!("range {part:?} is empty"));
                    }
                    Ok(Extent::Range { min, max: Some(max) })
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        if s.trim().is_empty() {
            return Err("an empty shape".into());
        }
        Ok(Self(extents))
    }
}

impl Serialize for InputShape {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for InputShape {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A tensor's elements, flat, in row-major order.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)] // one variant per `DataType`, named alike
pub enum TensorData {
    Bool(Vec<bool>),
    Uint8(Vec<u8>),
    Uint16(Vec<u16>),
    Uint32(Vec<u32>),
    Uint64(Vec<u64>),
    Int8(Vec<i8>),
    Int16(Vec<i16>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Fp16(Vec<half::f16>),
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
    Bytes(Vec<Vec<u8>>),
}

/// Applies `$body` to the vector of numbers inside a `TensorData`, bound as `$v`, and
/// `$bytes_body` to the byte strings of `BYTES`, bound as `$b`.
#[macro_export]
macro_rules! for_each_tensor_data {
    ($data:expr, $v:ident => $body:expr, bytes $b:ident => $bytes_body:expr) => {
        match $data {
            $crate::tensor::TensorData::Bool($v) => $body,
            $crate::tensor::TensorData::Uint8($v) => $body,
            $crate::tensor::TensorData::Uint16($v) => $body,
            $crate::tensor::TensorData::Uint32($v) => $body,
            $crate::tensor::TensorData::Uint64($v) => $body,
            $crate::tensor::TensorData::Int8($v) => $body,
            $crate::tensor::TensorData::Int16($v) => $body,
            $crate::tensor::TensorData::Int32($v) => $body,
            $crate::tensor::TensorData::Int64($v) => $body,
            $crate::tensor::TensorData::Fp16($v) => $body,
            $crate::tensor::TensorData::Fp32($v) => $body,
            $crate::tensor::TensorData::Fp64($v) => $body,
            $crate::tensor::TensorData::Bytes($b) => $bytes_body,
        }
    };
}

macro_rules! from_vec {
    ($($t:ty => $variant:ident),*) => {$(
        impl From<Vec<$t>> for TensorData {
            fn from(v: Vec<$t>) -> Self {
                Self::$variant(v)
            }
        }
    )*};
}
from_vec!(
    bool => Bool, u8 => Uint8, u16 => Uint16, u32 => Uint32, u64 => Uint64, i8 => Int8,
    i16 => Int16, i32 => Int32, i64 => Int64, half::f16 => Fp16, f32 => Fp32, f64 => Fp64,
    Vec<u8> => Bytes
);

impl TensorData {
    /// The element type.
    pub const fn datatype(&self) -> DataType {
        match self {
            Self::Bool(_) => DataType::Bool,
            Self::Uint8(_) => DataType::Uint8,
            Self::Uint16(_) => DataType::Uint16,
            Self::Uint32(_) => DataType::Uint32,
            Self::Uint64(_) => DataType::Uint64,
            Self::Int8(_) => DataType::Int8,
            Self::Int16(_) => DataType::Int16,
            Self::Int32(_) => DataType::Int32,
            Self::Int64(_) => DataType::Int64,
            Self::Fp16(_) => DataType::Fp16,
            Self::Fp32(_) => DataType::Fp32,
            Self::Fp64(_) => DataType::Fp64,
            Self::Bytes(_) => DataType::Bytes,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        for_each_tensor_data!(self, v => v.len(), bytes b => b.len())
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every element widened to `f64` (booleans as 0 and 1, byte strings as NaN), for
    /// statistics.
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            Self::Bool(v) => v.iter().map(|&b| f64::from(u8::from(b))).collect(),
            Self::Uint8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::Uint16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::Uint32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::Uint64(v) => v.iter().map(|&x| x as f64).collect(),
            Self::Int8(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::Int16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::Int32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::Int64(v) => v.iter().map(|&x| x as f64).collect(),
            Self::Fp16(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::Fp32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            Self::Fp64(v) => v.clone(),
            Self::Bytes(v) => vec![f64::NAN; v.len()],
        }
    }
}

/// A tensor value: a shape and its elements.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The concrete shape.
    pub shape: Vec<u64>,
    /// The elements; their count is the product of `shape`.
    pub data: TensorData,
}

impl Tensor {
    /// The rows (first-axis slices) of a tensor of rank 1 or more, each with a first
    /// axis of 1.
    pub fn split_rows(&self) -> Vec<Tensor> {
        let rows = self.shape.first().copied().unwrap_or(0) as usize;
        let width = self.data.len().checked_div(rows).unwrap_or(0);
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = 1;
        }
        (0..rows)
            .map(|r| {
                let range = r * width..(r + 1) * width;
                let data = crate::for_each_tensor_data!(&self.data, v => TensorData::from(v[range].to_vec()),
                    bytes b => TensorData::Bytes(b[range].to_vec()));
                Tensor { shape: shape.clone(), data }
            })
            .collect()
    }

    /// Tensors of one type and shape stacked along their first axis; `None` when they
    /// differ (or there are none).
    pub fn stack_rows(parts: Vec<Tensor>) -> Option<Tensor> {
        let first = parts.first()?;
        let (datatype, tail) = (first.data.datatype(), first.shape.get(1..)?.to_vec());
        let mut rows = 0;
        for p in &parts {
            if p.data.datatype() != datatype || p.shape.get(1..)? != tail.as_slice() {
                return None;
            }
            rows += p.shape[0];
        }
        let mut shape = vec![rows];
        shape.extend(tail);
        let mut parts = parts.into_iter();
        let mut data = parts.next()?.data;
        for p in parts {
            match (&mut data, p.data) {
                (TensorData::Bytes(a), TensorData::Bytes(b)) => a.extend(b),
                (a, b) => append(a, b),
            }
        }
        Some(Tensor { shape, data })
    }
}

/// Appends `b` to `a`, both of the same numeric type.
fn append(a: &mut TensorData, b: TensorData) {
    macro_rules! pairs {
        ($($v:ident),*) => {
            match (a, b) {
                $((TensorData::$v(a), TensorData::$v(b)) => a.extend(b),)*
                _ => {}
            }
        };
    }
    pairs!(Bool, Uint8, Uint16, Uint32, Uint64, Int8, Int16, Int32, Int64, Fp16, Fp32, Fp64, Bytes);
}

/// The number of elements of `shape`, or `None` if it overflows `usize`.
pub fn element_count(shape: &[u64]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(usize::try_from(d).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, datatype: DataType, shape: Vec<Dim>) -> TensorSpec {
        TensorSpec { name: name.into(), datatype, shape }
    }

    fn image_signature() -> Signature {
        let n = || Dim::Symbol("N".into());
        Signature {
            inputs: vec![
                spec(
                    "image",
                    DataType::Fp32,
                    vec![n(), Dim::Fixed(3), Dim::Symbol("H".into()), Dim::Any],
                ),
                spec("mask", DataType::Bool, vec![n(), Dim::Symbol("H".into())]),
            ],
            outputs: vec![spec("logits", DataType::Fp32, vec![n(), Dim::Fixed(10)])],
        }
    }

    /// Input order and symbol values, or the error.
    type Expected<'a> = Result<(Vec<usize>, &'a [(&'a str, u64)]), ShapeError>;

    fn check(given: &[(&str, DataType, &[u64])], expected: Expected<'_>) {
        let given: Vec<_> = given
            .iter()
            .map(|&(name, datatype, shape)| GivenInput { name, datatype, shape })
            .collect();
        let got = image_signature().bind(&given);
        let expected = expected.map(|(order, syms)| {
            (order, syms.iter().map(|&(s, v)| (s.to_owned(), v)).collect::<BTreeMap<_, _>>())
        });
        assert_eq!(got, expected);
    }

    #[test]
    fn binds_symbols_and_checks_every_rule() {
        use DataType::{Bool, Fp32, Fp64};
        check(
            &[("mask", Bool, &[2, 5]), ("image", Fp32, &[2, 3, 5, 7])],
            Ok((vec![1, 0], &[("H", 5), ("N", 2)])),
        );
        check(
            &[("image", Fp32, &[2, 3, 5, 7]), ("mask", Bool, &[3, 5])],
            Err(ShapeError::SymbolConflict {
                symbol: "N".into(),
                first: 2,
                second: 3,
                input: "mask".into(),
                axis: 0,
            }),
        );
        check(
            &[("image", Fp32, &[2, 4, 5, 7])],
            Err(ShapeError::Dim { input: "image".into(), axis: 1, expected: 3, got: 4 }),
        );
        check(
            &[("image", Fp64, &[2, 3, 5, 7])],
            Err(ShapeError::Datatype { input: "image".into(), expected: Fp32, got: Fp64 }),
        );
        check(
            &[("image", Fp32, &[2, 3, 5])],
            Err(ShapeError::Rank { input: "image".into(), expected: 4, got: vec![2, 3, 5] }),
        );
        check(&[("image", Fp32, &[1, 3, 1, 1])], Err(ShapeError::MissingInput("mask".into())));
        check(&[("pixels", Fp32, &[1])], Err(ShapeError::UnknownInput("pixels".into())));
        check(
            &[("mask", Bool, &[1, 1]), ("mask", Bool, &[1, 1])],
            Err(ShapeError::DuplicateInput("mask".into())),
        );
    }

    #[test]
    fn dims_serialise_as_number_name_or_null() {
        let shape = vec![Dim::Symbol("N".into()), Dim::Fixed(8), Dim::Any];
        let json = serde_json::to_string(&shape).unwrap();
        assert_eq!(json, r#"["N",8,null]"#);
        assert_eq!(serde_json::from_str::<Vec<Dim>>(&json).unwrap(), shape);
        assert!(serde_json::from_str::<Vec<Dim>>(r#"[""]"#).is_err());
        assert!(serde_json::from_str::<Vec<Dim>>("[-1]").is_err());
    }

    #[test]
    fn datatype_names_round_trip() {
        for t in DataType::ALL {
            assert_eq!(DataType::from_name(t.name()), Some(t));
            assert_eq!(serde_json::to_string(&t).unwrap(), format!("\"{}\"", t.name()));
        }
        assert_eq!(DataType::from_name("BF16"), None);
        assert_eq!(DataType::Bytes.size(), None);
        assert_eq!(DataType::Fp16.size(), Some(2));
    }

    #[test]
    fn input_shapes_parse_and_print() {
        let shape: InputShape = "1..64,3, 48,32..".parse().unwrap();
        assert_eq!(
            shape.0,
            vec![
                Extent::Range { min: 1, max: Some(64) },
                Extent::Exactly(3),
                Extent::Exactly(48),
                Extent::Range { min: 32, max: None },
            ]
        );
        assert_eq!(shape.to_string(), "1..64,3,48,32..");
        assert_eq!(shape.first(), vec![1, 3, 48, 32]);
        assert!(shape.0[0].allows(64) && !shape.0[0].allows(65) && shape.0[3].allows(4096));
        assert_eq!(serde_json::to_string(&shape).unwrap(), r#""1..64,3,48,32..""#);
        for bad in ["", "3,x", "5..2", "1,,2", "-1"] {
            assert!(bad.parse::<InputShape>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rows_split_and_stack_back() {
        let t = Tensor { shape: vec![3, 2], data: TensorData::Int64(vec![1, 2, 3, 4, 5, 6]) };
        let rows = t.split_rows();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1], Tensor { shape: vec![1, 2], data: TensorData::Int64(vec![3, 4]) });
        assert_eq!(Tensor::stack_rows(rows), Some(t));
        let s =
            Tensor { shape: vec![2], data: TensorData::Bytes(vec![b"a".to_vec(), b"bc".to_vec()]) };
        assert_eq!(Tensor::stack_rows(s.split_rows()), Some(s));
        let mixed = vec![
            Tensor { shape: vec![1, 2], data: TensorData::Fp32(vec![0.0; 2]) },
            Tensor { shape: vec![1, 3], data: TensorData::Fp32(vec![0.0; 3]) },
        ];
        assert_eq!(Tensor::stack_rows(mixed), None);
        assert_eq!(Tensor::stack_rows(vec![]), None);
    }

    #[test]
    fn element_count_refuses_overflow() {
        assert_eq!(element_count(&[2, 3, 4]), Some(24));
        assert_eq!(element_count(&[]), Some(1));
        assert_eq!(element_count(&[u64::MAX, 2]), None);
    }
}
