//! Reading node attributes: lists given as floats or as tensors, class labels, and the
//! errors that name the node and the attribute.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

/// A float list given either as `name` (floats) or as `tensor_name` (a float or double
/// tensor, as converters write for LightGBM and for ai.onnx.ml opset 3).
pub fn floats(
    ctx: &ParsingContext,
    node: &NodeProto,
    name: &str,
    tensor_name: &str,
) -> TractResult<Option<Vec<f32>>> {
    if let Some(v) = node.get_attr_opt_vec::<f32>(name)? {
        return Ok(Some(v));
    }
    tensor(ctx, node, tensor_name)?.map(|t| f32_values(node, tensor_name, &t)).transpose()
}

/// A tensor attribute, decoded.
pub fn tensor(ctx: &ParsingContext, node: &NodeProto, name: &str) -> TractResult<Option<Tensor>> {
    let Some(proto) = node.get_attr_opt::<&tract_onnx::pb::TensorProto>(name)? else {
        return Ok(None);
    };
    tract_onnx::tensor::load_tensor(&*ctx.framework.provider, proto, None)
        .with_context(|| format!("Node {} ({}): attribute {name}", node.name, node.op_type))
        .map(Some)
}

/// A numeric tensor's values as float32.
pub fn f32_values(node: &NodeProto, name: &str, t: &Tensor) -> TractResult<Vec<f32>> {
    let cast = t.cast_to::<f32>().with_context(|| {
        format!("Node {} ({}): attribute {name} is not numeric", node.name, node.op_type)
    })?;
    Ok(cast.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
}

/// A required attribute's list, of the expected length.
pub fn exact<T>(node: &NodeProto, name: &str, v: Vec<T>, len: usize) -> TractResult<Vec<T>> {
    node.expect_attr(name, v.len() == len, || format!("{len} values, got {}", v.len()))?;
    Ok(v)
}

/// Class labels: integers or strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Labels {
    /// `classlabels_int64s` / `classlabels_ints`.
    Ints(Vec<i64>),
    /// `classlabels_strings`.
    Strings(Vec<String>),
}

impl Labels {
    /// Reads whichever of the two attributes is set; one must be.
    pub fn read(node: &NodeProto, ints: &str, strings: &str) -> TractResult<Self> {
        let i = node.get_attr_opt_vec::<i64>(ints)?;
        let s = node.get_attr_opt_vec::<String>(strings)?;
        match (i, s) {
            (Some(i), None) => Ok(Self::Ints(i)),
            (None, Some(s)) => Ok(Self::Strings(s)),
            (Some(_), Some(_)) => node.bail(&format!("both {ints} and {strings} are set")),
            (None, None) => node.bail(&format!("neither {ints} nor {strings} is set")),
        }
    }

    /// How many labels.
    pub fn len(&self) -> usize {
        match self {
            Self::Ints(v) => v.len(),
            Self::Strings(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type of the label output.
    pub fn datum_type(&self) -> DatumType {
        match self {
            Self::Ints(_) => i64::datum_type(),
            Self::Strings(_) => String::datum_type(),
        }
    }

    /// A 1-D tensor of the labels picked per row; `pick` gives an index into the labels,
    /// or for integer labels a literal value (`Err`).
    pub fn tensor(&self, picks: impl Iterator<Item = Result<usize, i64>>) -> TractResult<Tensor> {
        Ok(match self {
            Self::Ints(v) => {
                let out: Vec<i64> = picks
                    .map(|p| p.map_or_else(|lit| lit, |i| v.get(i).copied().unwrap_or(0)))
                    .collect();
                tensor1(&out)
            }
            Self::Strings(v) => {
                let out: Vec<String> = picks
                    .map(|p| {
                        let i = p.unwrap_or_else(|lit| lit as usize);
                        v.get(i).cloned().unwrap_or_default()
                    })
                    .collect();
                tensor1(&out)
            }
        })
    }
}
