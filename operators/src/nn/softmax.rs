//! `Softmax` (opset 13): along an axis that is not the last, tract walks the axis element
//! by element; here the axis is reduced over contiguous inner vectors. Along the last
//! axis, short rows (a classifier's few classes) are done row by row in one loop, where
//! tract dispatches each row to its vector kernel; long rows stay with that kernel.

use tract_onnx::tract_hir::internal::*;

use crate::expand::{Kernel, Node};

/// Rows along the last axis up to this long are done here, longer ones by tract.
const SHORT_ROW: usize = 64;

/// Opset 13's Softmax: wired as [`AxisSoftmax`], or as tract's own operator for long
/// (or unsized) rows along the last axis.
#[derive(Clone, Debug)]
pub struct Softmax13 {
    pub(crate) axis: i64,
}

impl Expansion for Softmax13 {
    fn name(&self) -> StaticName {
        "Softmax".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.equals(&outputs[0].shape, &inputs[0].shape)
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let fact = model.outlet_fact(inputs[0])?.clone();
        let rank = fact.rank() as i64;
        let axis = if self.axis < 0 { self.axis + rank } else { self.axis };
        if !(0..rank).contains(&axis) {
            bail!("Softmax: axis {} of a rank {rank} input", self.axis);
        }
        let axis = axis as usize;
        let short = fact.shape[axis].to_usize().is_ok_and(|len| len <= SHORT_ROW);
        if fact.datum_type == f32::datum_type() && (axis + 1 < fact.rank() || short) {
            return model.wire_node(prefix, Node(AxisSoftmax { axis: self.axis }), inputs);
        }
        let tract = tract_core::ops::nn::Softmax::new(
            tvec![axis],
            None,
            tract_core::ops::nn::SoftmaxKind::Softmax,
        );
        model.wire_node(prefix, tract, inputs)
    }
}

/// Softmax along a middle axis: `outer × axis × inner`, inner contiguous.
#[derive(Clone, Debug, PartialEq)]
pub struct AxisSoftmax {
    pub(crate) axis: i64,
}

impl Kernel for AxisSoftmax {
    fn name(&self) -> &'static str {
        "Softmax"
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let x = &inputs[0];
        let rank = x.rank() as i64;
        let axis = if self.axis < 0 { self.axis + rank } else { self.axis };
        if !(0..rank).contains(&axis) {
            bail!("axis {} of a rank {rank} input", self.axis);
        }
        let axis = axis as usize;
        let shape = x.shape();
        let (len, inner) = (shape[axis], shape[axis + 1..].iter().product::<usize>());
        if inner == 1 {
            let mut y = x.cast_to::<f32>()?.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
            for row in y.chunks_exact_mut(len.max(1)) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for v in row.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                for v in row.iter_mut() {
                    *v /= sum;
                }
            }
            return Ok(tvec![Tensor::from_shape(shape, &y)?]);
        }
        let mut y = x.cast_to::<f32>()?.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        let mut max = vec![0.0f32; inner];
        let mut sum = vec![0.0f32; inner];
        for block in y.chunks_mut((len * inner).max(1)) {
            max.fill(f32::NEG_INFINITY);
            for row in block.chunks(inner) {
                for (m, &v) in max.iter_mut().zip(row) {
                    *m = m.max(v);
                }
            }
            sum.fill(0.0);
            for row in block.chunks_mut(inner) {
                for ((v, m), s) in row.iter_mut().zip(&max).zip(sum.iter_mut()) {
                    *v = (*v - m).exp();
                    *s += *v;
                }
            }
            for row in block.chunks_mut(inner) {
                for (v, s) in row.iter_mut().zip(&sum) {
                    *v /= s;
                }
            }
        }
        Ok(tvec![Tensor::from_shape(shape, &y)?])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec![f32::fact(inputs[0].shape.clone())])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_along_a_middle_axis() {
        let x = Tensor::from_shape(
            &[2, 3, 2],
            &[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0],
        )
        .unwrap();
        let y = AxisSoftmax { axis: 1 }.eval(&[x.into_tvalue()]).unwrap().remove(0);
        let y = y.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        let e = |v: f32| v.exp();
        let first = e(1.0) / (e(1.0) + e(3.0) + e(5.0));
        assert!((y[0] - first).abs() < 1e-6, "{y:?}");
        for (i, j) in [(0, 2), (1, 3)] {
            let column: f32 = [y[i], y[j], y[j + 2]].iter().sum();
            assert!((column - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn softmax_along_the_last_axis_short_and_long_rows() {
        for len in [1, 3, 17, SHORT_ROW, 300] {
            let values: Vec<f32> = (0..2 * len).map(|i| (i % 7) as f32 - 3.0).collect();
            let x = Tensor::from_shape(&[2, len], &values).unwrap();
            for axis in [-1, 1] {
                let y = AxisSoftmax { axis }.eval(&[x.clone().into_tvalue()]).unwrap().remove(0);
                assert_eq!(y.shape(), &[2, len]);
                let y = y.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
                for (row, xs) in y.chunks(len).zip(values.chunks(len)) {
                    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let sum: f64 = xs.iter().map(|&v| f64::from(v - max).exp()).sum();
                    for (got, &v) in row.iter().zip(xs) {
                        let want = (f64::from(v - max).exp() / sum) as f32;
                        assert!((got - want).abs() < 1e-6, "{len}: {got} against {want}");
                    }
                }
            }
        }
        // NaN spreads to its row only; -inf is a zero.
        let x = tensor2(&[[f32::NAN, 1.0], [f32::NEG_INFINITY, 0.0]]);
        let y = AxisSoftmax { axis: -1 }.eval(&[x.into_tvalue()]).unwrap().remove(0);
        let y = y.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec();
        assert!(y[0].is_nan() && y[1].is_nan());
        assert_eq!(y[2..], [0.0, 1.0]);
    }
}
