//! `Softmax` (opset 13) along an axis that is not the last: tract walks the axis element
//! by element; here the axis is reduced over contiguous inner vectors.

use tract_onnx::tract_hir::internal::*;

use crate::expand::Kernel;

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
}
