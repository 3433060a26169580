//! `ArgMax` and `ArgMin` (opsets 1-13): the index of the largest (smallest) element along
//! an axis, as one pass over contiguous memory. tract builds each output element from
//! an ndarray view of its lane, which at a classifier's `[rows, classes]` costs more
//! than the rest of a small network.
//!
//! Ties go to the first index (the last with `select_last_index`); NaN never wins, and a
//! lane of NaN (or of values no greater than the type's least) gives 0, as tract's
//! reduction gives.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::expand::{Built, Kernel, Out, Shape, expand};

/// The index of the extreme element along `axis`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArgExtreme {
    /// ArgMax (else ArgMin).
    max: bool,
    axis: i64,
    keep_dims: bool,
    last: bool,
}

impl ArgExtreme {
    /// The axis, resolved against `rank`.
    fn axis(&self, rank: usize) -> TractResult<usize> {
        let axis = if self.axis < 0 { self.axis + rank as i64 } else { self.axis };
        if !(0..rank as i64).contains(&axis) {
            bail!("{}: axis {} of a rank {rank} input", self.name(), self.axis);
        }
        Ok(axis as usize)
    }

    fn output_shape<D: Clone>(&self, shape: &[D], axis: usize, one: D) -> TVec<D> {
        let mut out: TVec<D> = shape.iter().cloned().collect();
        if self.keep_dims {
            out[axis] = one;
        } else {
            out.remove(axis);
        }
        out
    }
}

/// The extreme's index of each lane of `values`, `outer × len × inner` (inner
/// contiguous), lanes in `outer × inner` order.
fn extreme<T: Datum + PartialOrd + Copy + tract_num_traits::Bounded>(
    values: &[T],
    (outer, len, inner): (usize, usize, usize),
    max: bool,
    last: bool,
) -> Vec<i64> {
    let start = if max { T::min_value() } else { T::max_value() };
    let better = |v: T, best: T| if max { v > best } else { v < best };
    let mut out = Vec::with_capacity(outer * inner);
    for block in values.chunks_exact((len * inner).max(1)).take(outer) {
        if inner == 1 {
            // A classifier's rows: each lane is contiguous.
            for lane in block.chunks_exact(len.max(1)) {
                let mut best = (0usize, start);
                for (i, &v) in lane.iter().enumerate() {
                    #[allow(clippy::float_cmp)]
                    if better(v, best.1) || (last && v == best.1) {
                        best = (i, v);
                    }
                }
                out.push(best.0 as i64);
            }
            continue;
        }
        let mut best = vec![(0usize, start); inner];
        for (i, row) in block.chunks_exact(inner).enumerate() {
            for (b, &v) in best.iter_mut().zip(row) {
                #[allow(clippy::float_cmp)]
                if better(v, b.1) || (last && v == b.1) {
                    *b = (i, v);
                }
            }
        }
        out.extend(best.iter().map(|b| b.0 as i64));
    }
    out
}

/// [`extreme`] of a tensor of type `T`.
fn typed<T: Datum + PartialOrd + Copy + tract_num_traits::Bounded>(
    input: &Tensor,
    dims: (usize, usize, usize),
    max: bool,
    last: bool,
) -> TractResult<Vec<i64>> {
    Ok(extreme(input.try_as_plain_ram()?.as_slice::<T>()?, dims, max, last))
}

impl Kernel for ArgExtreme {
    fn name(&self) -> &'static str {
        if self.max { "ArgMax" } else { "ArgMin" }
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let input = &inputs[0];
        let shape = input.shape();
        let axis = self.axis(shape.len())?;
        let dims = (
            shape[..axis].iter().product::<usize>(),
            shape[axis],
            shape[axis + 1..].iter().product::<usize>(),
        );
        if dims.1 == 0 && dims.0 * dims.2 > 0 {
            bail!("{}: an empty axis {axis} in shape {shape:?}", self.name());
        }
        let out = dispatch_numbers!(typed(input.datum_type())(input, dims, self.max, self.last))?;
        Ok(tvec![Tensor::from_shape(&self.output_shape(shape, axis, 1), &out)?])
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = inputs[0].shape.to_tvec();
        let axis = self.axis(shape.len())?;
        Ok(tvec![i64::fact(self.output_shape(&shape, axis, 1.to_dim()))])
    }
}

/// ArgMax and ArgMin.
pub fn arg_extreme(_: &ParsingContext, node: &NodeProto) -> Built {
    let op = ArgExtreme {
        max: node.op_type == "ArgMax",
        axis: node.get_attr_opt("axis")?.unwrap_or(0),
        keep_dims: node.get_attr_opt::<i64>("keepdims")?.unwrap_or(1) != 0,
        last: node.get_attr_opt::<i64>("select_last_index")?.unwrap_or(0) != 0,
    };
    expand(op, vec![Out::new(i64::datum_type(), Shape::FromKernel)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(op: &ArgExtreme, input: Tensor) -> TractResult<Tensor> {
        Ok(op.eval(&[input.into_tvalue()])?.remove(0))
    }

    fn op(max: bool, axis: i64, keep_dims: bool, last: bool) -> ArgExtreme {
        ArgExtreme { max, axis, keep_dims, last }
    }

    #[test]
    fn every_axis_keepdims_and_tie_rule() {
        let x = tensor2(&[[1.0f32, 3.0, 3.0], [-1.0, -5.0, -5.0]]);
        assert_eq!(run(&op(true, -1, true, false), x.clone()).unwrap(), tensor2(&[[1i64], [0]]));
        assert_eq!(run(&op(true, 1, false, true), x.clone()).unwrap(), tensor1(&[2i64, 0]));
        assert_eq!(run(&op(false, 1, false, false), x.clone()).unwrap(), tensor1(&[0i64, 1]));
        assert_eq!(run(&op(false, 1, false, true), x.clone()).unwrap(), tensor1(&[0i64, 2]));
        assert_eq!(run(&op(true, 0, true, false), x.clone()).unwrap(), tensor2(&[[0i64, 0, 0]]));
        assert_eq!(run(&op(false, -2, false, false), x).unwrap(), tensor1(&[1i64, 1, 1]));
        // A middle axis of a rank-3 tensor, and integers.
        let x = tensor3(&[[[1i64, 9], [5, 2], [5, 9]]]);
        assert_eq!(run(&op(true, 1, false, false), x.clone()).unwrap(), tensor2(&[[1i64, 0]]));
        assert_eq!(run(&op(true, 1, true, true), x).unwrap(), tensor3(&[[[2i64, 2]]]));
    }

    #[test]
    fn nan_never_wins_and_odd_shapes_work() {
        let x = tensor2(&[[f32::NAN, 2.0, f32::NAN], [f32::NAN, f32::NAN, f32::NAN]]);
        assert_eq!(run(&op(true, 1, false, false), x.clone()).unwrap(), tensor1(&[1i64, 0]));
        assert_eq!(run(&op(false, 1, false, false), x).unwrap(), tensor1(&[1i64, 0]));
        // One row, one class; a vector.
        assert_eq!(
            run(&op(true, 1, true, false), tensor2(&[[4.0f32]])).unwrap(),
            tensor2(&[[0i64]])
        );
        assert_eq!(
            run(&op(true, 0, false, false), tensor1(&[1.0f64, 7.0])).unwrap(),
            tensor0(1i64)
        );
        // No rows: no output rows.
        let empty = Tensor::zero::<f32>(&[0, 3]).unwrap();
        assert_eq!(run(&op(true, 1, true, false), empty).unwrap().shape(), &[0, 1]);
    }

    #[test]
    fn a_bad_axis_is_an_error_naming_it() {
        let err = run(&op(true, 2, true, false), tensor2(&[[1.0f32]])).unwrap_err().to_string();
        assert!(err.contains("ArgMax") && err.contains("axis 2"), "{err}");
        let fact = f32::fact([2, 3]);
        assert!(op(false, -3, true, false).facts(&[&fact]).is_err());
        assert_eq!(op(true, -1, false, false).facts(&[&fact]).unwrap()[0], i64::fact([2]));
    }
}
