//! Feature preparation: Scaler, Normalizer, Imputer, Binarizer, ArrayFeatureExtractor,
//! FeatureVectorizer.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;
use tract_onnx::tract_hir::ops::expandable;

use crate::expand::{Built, Kernel, Out, Shape, expand, gather};

/// The input as float32 values, whatever its numeric type, and its shape.
fn floats(input: &Tensor) -> TractResult<(Vec<f32>, TVec<usize>)> {
    let cast = input.cast_to::<f32>()?;
    Ok((cast.try_as_plain_ram()?.as_slice::<f32>()?.to_vec(), input.shape().into()))
}

/// The length of the axis a per-feature attribute runs along: the last of a 1-D input,
/// the second of any other.
fn stride(shape: &[usize]) -> usize {
    match shape.len() {
        0 => 1,
        1 => shape[0],
        _ => shape[1],
    }
}

/// Picks a per-feature value: one value for all, or one per feature.
fn per_feature(values: &[f32], i: usize) -> f32 {
    if values.len() == 1 { values[0] } else { values[i % values.len()] }
}

/// Scaler: `(x - offset) * scale`, per feature or for all.
#[derive(Clone, Debug, PartialEq)]
pub struct Scaler {
    offset: Vec<f32>,
    scale: Vec<f32>,
}

impl Kernel for Scaler {
    fn name(&self) -> &'static str {
        "Scaler"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let (mut x, shape) = floats(&inputs[0])?;
        let last = *shape.last().unwrap_or(&1);
        for (k, len) in [(&self.offset, self.offset.len()), (&self.scale, self.scale.len())] {
            if len > 1 && len != last {
                bail!("{} per-feature values for {last} features", k.len());
            }
        }
        for (i, v) in x.iter_mut().enumerate() {
            let f = i % last.max(1);
            let offset = if self.offset.is_empty() { 0.0 } else { per_feature(&self.offset, f) };
            let scale = if self.scale.is_empty() { 1.0 } else { per_feature(&self.scale, f) };
            *v = (*v - offset) * scale;
        }
        Ok(tvec![Tensor::from_shape(&shape, &x)?])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![f32::fact(inputs[0].shape.clone())])
    }
}

/// Scaler.
pub fn scaler(_: &ParsingContext, node: &NodeProto) -> Built {
    let offset = node.get_attr_opt_vec::<f32>("offset")?.unwrap_or_default();
    let scale = node.get_attr_opt_vec::<f32>("scale")?.unwrap_or_default();
    expand(Scaler { offset, scale }, vec![Out::new(f32::datum_type(), Shape::Like)])
}

/// Normalizer: each row divided by its maximum, L1 or L2 norm (rows of zeros unchanged).
#[derive(Clone, Debug, PartialEq)]
pub struct Normalizer {
    norm: Norm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Norm {
    Max,
    L1,
    L2,
}

impl Kernel for Normalizer {
    fn name(&self) -> &'static str {
        "Normalizer"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let (mut x, shape) = floats(&inputs[0])?;
        let stride = stride(&shape);
        // Along axis 1: elements `inner` apart, `inner` being the product of later axes.
        let inner: usize = if shape.len() > 1 { shape[2..].iter().product() } else { 1 };
        let block = stride * inner;
        if block == 0 {
            return Ok(tvec![Tensor::from_shape(&shape, &x)?]);
        }
        for chunk in x.chunks_mut(block) {
            for start in 0..inner {
                let idx = (0..stride).map(|s| start + s * inner);
                let norm = match self.norm {
                    Norm::Max => idx.clone().map(|i| chunk[i]).fold(f32::MIN, f32::max),
                    Norm::L1 => idx.clone().map(|i| chunk[i].abs()).sum(),
                    Norm::L2 => idx.clone().map(|i| chunk[i] * chunk[i]).sum(),
                };
                if norm == 0.0 {
                    continue;
                }
                for i in idx {
                    chunk[i] = match self.norm {
                        Norm::Max | Norm::L1 => chunk[i] / norm,
                        Norm::L2 => (chunk[i] * chunk[i] / norm).sqrt().copysign(chunk[i]),
                    };
                }
            }
        }
        Ok(tvec![Tensor::from_shape(&shape, &x)?])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![f32::fact(inputs[0].shape.clone())])
    }
}

/// Normalizer.
pub fn normalizer(_: &ParsingContext, node: &NodeProto) -> Built {
    let norm = match node.get_attr_opt::<&str>("norm")?.unwrap_or("MAX") {
        "MAX" => Norm::Max,
        "L1" => Norm::L1,
        "L2" => Norm::L2,
        other => return node.bail(&format!("unknown norm {other:?}")),
    };
    expand(Normalizer { norm }, vec![Out::new(f32::datum_type(), Shape::Like)])
}

/// Imputer: values equal to the replaced one (or NaN, when that is NaN) become the imputed
/// value of their feature.
#[derive(Clone, Debug, PartialEq)]
pub enum Imputer {
    /// Float inputs.
    Float {
        /// Imputed values, one for all or one per feature.
        imputed: Vec<f32>,
        /// The value that marks a missing entry.
        replaced: f32,
    },
    /// Integer inputs.
    Int {
        /// Imputed values.
        imputed: Vec<i64>,
        /// The value that marks a missing entry.
        replaced: i64,
    },
}

impl Kernel for Imputer {
    fn name(&self) -> &'static str {
        "Imputer"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let input = &inputs[0];
        let shape: TVec<usize> = input.shape().into();
        let stride = stride(&shape).max(1);
        match self {
            Self::Float { imputed, replaced } => {
                let (mut x, _) = floats(input)?;
                let per = imputed.len() == stride;
                for (i, v) in x.iter_mut().enumerate() {
                    // The value that marks a missing entry is matched exactly.
                    #[allow(clippy::float_cmp)]
                    if (v.is_nan() && replaced.is_nan()) || *v == *replaced {
                        *v = if per { imputed[i % stride] } else { imputed[0] };
                    }
                }
                Ok(tvec![Tensor::from_shape(&shape, &x)?])
            }
            Self::Int { imputed, replaced } => {
                let cast = input.cast_to::<i64>()?;
                let mut x = cast.try_as_plain_ram()?.as_slice::<i64>()?.to_vec();
                let per = imputed.len() == stride;
                for (i, v) in x.iter_mut().enumerate() {
                    if *v == *replaced {
                        *v = if per { imputed[i % stride] } else { imputed[0] };
                    }
                }
                Ok(tvec![Tensor::from_shape(&shape, &x)?])
            }
        }
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let dt = match self {
            Self::Float { .. } => f32::datum_type(),
            Self::Int { .. } => i64::datum_type(),
        };
        Ok(tvec![dt.fact(inputs[0].shape.clone())])
    }
}

/// Imputer.
pub fn imputer(_: &ParsingContext, node: &NodeProto) -> Built {
    let floats = node.get_attr_opt_vec::<f32>("imputed_value_floats")?.filter(|v| !v.is_empty());
    let ints = node.get_attr_opt_vec::<i64>("imputed_value_int64s")?.filter(|v| !v.is_empty());
    let (op, dt) = match (floats, ints) {
        (Some(imputed), None) => (
            Imputer::Float {
                imputed,
                replaced: node.get_attr_opt("replaced_value_float")?.unwrap_or(0.0),
            },
            f32::datum_type(),
        ),
        (None, Some(imputed)) => (
            Imputer::Int {
                imputed,
                replaced: node.get_attr_opt("replaced_value_int64")?.unwrap_or(0),
            },
            i64::datum_type(),
        ),
        _ => {
            return node
                .bail("exactly one of imputed_value_floats and imputed_value_int64s must be set");
        }
    };
    expand(op, vec![Out::new(dt, Shape::Like)])
}

/// Binarizer: 1 where `x > threshold`, else 0, in the input's type.
#[derive(Clone, Debug, PartialEq)]
pub struct Binarizer {
    threshold: f32,
}

impl Kernel for Binarizer {
    fn name(&self) -> &'static str {
        "Binarizer"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let (x, shape) = floats(&inputs[0])?;
        let y: Vec<f32> = x.iter().map(|&v| if v > self.threshold { 1.0 } else { 0.0 }).collect();
        Ok(tvec![Tensor::from_shape(&shape, &y)?.cast_to_dt(inputs[0].datum_type())?.into_owned()])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![inputs[0].datum_type.fact(inputs[0].shape.clone())])
    }
}

/// Binarizer. Its output keeps the input's type, which the rules cannot name up front.
pub fn binarizer(_: &ParsingContext, node: &NodeProto) -> Built {
    let threshold = node.get_attr_opt("threshold")?.unwrap_or(0.0);
    Ok((
        expandable::expand(InputType { kernel: Binarizer { threshold }, same_shape: true }),
        vec![],
    ))
}

/// An expansion whose single output has the first input's type, and its shape when
/// `same_shape` (else the typed operator works the shape out).
#[derive(Clone, Debug)]
struct InputType<K> {
    kernel: K,
    same_shape: bool,
}

impl<K: Kernel> Expansion for InputType<K> {
    fn name(&self) -> StaticName {
        self.kernel.name().into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        if self.same_shape { s.equals(&outputs[0].shape, &inputs[0].shape) } else { Ok(()) }
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, crate::expand::Node(self.kernel.clone()), inputs)
    }
}

/// ArrayFeatureExtractor: the given columns of the last axis (a 1-D input gives one row).
#[derive(Clone, Debug, PartialEq)]
pub struct ArrayFeatureExtractor;

impl Kernel for ArrayFeatureExtractor {
    fn name(&self) -> &'static str {
        "ArrayFeatureExtractor"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let x = &inputs[0];
        let indices = inputs[1].cast_to::<i64>()?;
        let indices = indices.try_as_plain_ram()?.as_slice::<i64>()?.to_vec();
        let Some(&last) = x.shape().last() else { bail!("the input has no axes") };
        if indices.is_empty() {
            bail!("no columns to extract");
        }
        let indices: Vec<usize> = indices
            .iter()
            .map(|&i| {
                usize::try_from(i)
                    .ok()
                    .filter(|&i| i < last)
                    .ok_or_else(|| format_err!("column {i} of {last}"))
            })
            .collect::<TractResult<_>>()?;
        let mut shape: TVec<usize> = x.shape().into();
        if shape.len() == 1 {
            shape = tvec![1, indices.len()];
        } else {
            *shape.last_mut().unwrap() = indices.len();
        }
        let rows = x.len() / last.max(1);
        let picks: Vec<usize> =
            (0..rows).flat_map(|r| indices.iter().map(move |&i| r * last + i)).collect();
        Ok(tvec![gather(x, &picks)?.into_shape(&shape)?])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let n = inputs[1].shape.volume();
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        if shape.len() == 1 {
            shape = tvec![1.to_dim(), n];
        } else if let Some(last) = shape.last_mut() {
            *last = n;
        }
        Ok(tvec![inputs[0].datum_type.fact(shape)])
    }
}

/// ArrayFeatureExtractor.
pub fn array_feature_extractor(_: &ParsingContext, _: &NodeProto) -> Built {
    Ok((expandable::expand(InputType { kernel: ArrayFeatureExtractor, same_shape: false }), vec![]))
}

/// FeatureVectorizer: inputs laid side by side, each cut or padded with zeros to its
/// declared width.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureVectorizer {
    widths: Vec<usize>,
}

impl Kernel for FeatureVectorizer {
    fn name(&self) -> &'static str {
        "FeatureVectorizer"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        if inputs.len() != self.widths.len() {
            bail!("{} inputs for {} declared widths", inputs.len(), self.widths.len());
        }
        let total: usize = self.widths.iter().sum();
        let rows = if inputs[0].rank() <= 1 { 1 } else { inputs[0].shape()[0] };
        let mut out = vec![0.0f32; rows * total];
        let mut offset = 0;
        for (input, &width) in inputs.iter().zip(&self.widths) {
            let (x, shape) = floats(input)?;
            let (r, cols) = match shape.len() {
                0 => (1, 1),
                1 => (1, shape[0]),
                _ => (shape[0], x.len() / shape[0].max(1)),
            };
            if r != rows {
                bail!("inputs have {rows} and {r} rows");
            }
            for row in 0..rows {
                let n = cols.min(width);
                out[row * total + offset..row * total + offset + n]
                    .copy_from_slice(&x[row * cols..row * cols + n]);
            }
            offset += width;
        }
        Ok(tvec![Tensor::from_shape(&[rows, total], &out)?])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![crate::expand::row_fact(f32::datum_type(), inputs[0], self.widths.iter().sum())])
    }
}

/// FeatureVectorizer.
pub fn feature_vectorizer(_: &ParsingContext, node: &NodeProto) -> Built {
    let widths = node.get_attr_opt_vec::<usize>("inputdimensions")?.unwrap_or_default();
    node.expect_attr("inputdimensions", widths.len() == node.input.len(), "one width per input")?;
    let total = widths.iter().sum();
    expand(FeatureVectorizer { widths }, vec![Out::new(f32::datum_type(), Shape::Rows(total))])
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // the same arithmetic gives the same floats
mod tests {
    use super::*;

    fn run<K: Kernel>(k: &K, inputs: Vec<Tensor>) -> Tensor {
        let inputs: Vec<TValue> = inputs.into_iter().map(IntoTValue::into_tvalue).collect();
        k.eval(&inputs).unwrap().remove(0)
    }

    #[test]
    fn scaling_normalising_imputing_binarising() {
        let x = tensor2(&[[1.0f32, 2.0], [3.0, -4.0]]);
        let y = run(&Scaler { offset: vec![1.0, 2.0], scale: vec![2.0] }, vec![x.clone()]);
        assert_eq!(y, tensor2(&[[0.0f32, 0.0], [4.0, -12.0]]));
        let l1 = run(&Normalizer { norm: Norm::L1 }, vec![x.clone()]);
        assert_eq!(l1, tensor2(&[[1.0f32 / 3.0, 2.0 / 3.0], [3.0 / 7.0, -4.0 / 7.0]]));
        let l2 = run(&Normalizer { norm: Norm::L2 }, vec![x.clone()]);
        assert_eq!(l2, tensor2(&[[1.0f32 / 5f32.sqrt(), 2.0 / 5f32.sqrt()], [0.6, -0.8]]));
        let max = run(&Normalizer { norm: Norm::Max }, vec![tensor2(&[[0.0f32, 0.0]])]);
        assert_eq!(max, tensor2(&[[0.0f32, 0.0]]), "a row of zeros stays");
        let missing = tensor2(&[[f32::NAN, 2.0], [3.0, f32::NAN]]);
        let imputed =
            run(&Imputer::Float { imputed: vec![7.0, 8.0], replaced: f32::NAN }, vec![missing]);
        assert_eq!(imputed, tensor2(&[[7.0f32, 2.0], [3.0, 8.0]]));
        let b = run(&Binarizer { threshold: 1.5 }, vec![x]);
        assert_eq!(b, tensor2(&[[0.0f32, 1.0], [1.0, 0.0]]));
    }

    #[test]
    fn extracting_and_vectorising_features() {
        let x = tensor2(&[
            ["a".to_string(), "b".into(), "c".into()],
            ["d".into(), "e".into(), "f".into()],
        ]);
        let y = run(&ArrayFeatureExtractor, vec![x, tensor1(&[2i64, 0])]);
        assert_eq!(y, tensor2(&[["c".to_string(), "a".into()], ["f".into(), "d".into()]]));
        let one = run(&ArrayFeatureExtractor, vec![tensor1(&[1.0f32, 2.0, 3.0]), tensor1(&[1i64])]);
        assert_eq!(one, tensor2(&[[2.0f32]]));
        let bad = ArrayFeatureExtractor
            .eval(&[tensor1(&[1.0f32]).into_tvalue(), tensor1(&[3i64]).into_tvalue()]);
        assert!(bad.unwrap_err().to_string().contains("column 3 of 1"));
        let v = FeatureVectorizer { widths: vec![1, 3] };
        let out =
            run(&v, vec![tensor2(&[[1i64, 9], [2, 9]]), tensor2(&[[0.5f32, 0.25], [0.75, 1.0]])]);
        assert_eq!(out, tensor2(&[[1.0f32, 0.5, 0.25, 0.0], [2.0, 0.75, 1.0, 0.0]]));
    }
}
