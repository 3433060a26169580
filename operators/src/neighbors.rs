//! k-nearest neighbours as skl2onnx exports them: the distances from every input row to
//! every training row, and the nearest of them, computed by blocked kernels instead of a
//! `Scan` that runs its body once per training row and a `TopK` that sorts every row.
//!
//! skl2onnx writes `cdist` as a `Scan` over the training set (a constant `[M, n]`) whose
//! body carries the input `X` (`[N, n]`) as its state and emits, per training row `y`,
//! `ReduceSumSquare(X - y, axes = [1], keepdims = 0)`: the scan output is `[M, N]`, then
//! transposed, square-rooted and given to `TopK` (k smallest along the training rows).
//! tract runs that body step by step (3000 steps for the corpus model, each a few tiny
//! tensor operations), which costs far more than the arithmetic, and its `TopK` sorts all
//! `M` values of every row. The `Scan` builder here recognises exactly that body and wires
//! [`SquaredDistances`] in its place; any other `Scan` goes to tract's builder unchanged.
//! When the distances only feed `Transpose`, `Sqrt` (optional) and `TopK` (smallest,
//! along the training rows, constant k), tract's decluttering replaces the four with one
//! [`NearestNeighbours`], which keeps the k best of each row as it goes.
//!
//! The nearest neighbours are picked on these distances, so a rounding difference can
//! change which neighbour is picked and the prediction with it. Each distance is
//! therefore computed as ONNX Runtime computes it: the differences rounded to float32,
//! squared, and summed feature by feature from the first, each step rounded (checked bit
//! for bit against ONNX Runtime 1.32 on the corpus model; a matrix product
//! `‖x‖² + ‖y‖² − 2x·y` would be faster still but rounds differently), and ties go to the
//! lower training row, as in ONNX Runtime's `TopK`. The speed comes from blocking
//! instead: sixteen training rows side by side in one vector, four input rows at a time
//! against each block.

use std::sync::OnceLock;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{GraphProto, NodeProto, type_proto};
use tract_onnx::tract_core::ops::array::Topk;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math::Sqrt;
use tract_onnx::tract_hir::internal::*;

use crate::expand::Built;
use crate::nn::Builder;

/// tract's own `Scan` builder, for every scan that is not a distance computation.
pub(crate) static TRACT_SCAN: OnceLock<Builder> = OnceLock::new();

/// Training rows per block: sixteen float32 fill a 512-bit vector.
const LANES: usize = 16;

/// Input rows per pass over a block: independent sums that keep the adder busy.
const TILE: usize = 4;

/// The reference rows, packed for the kernels.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference {
    /// Blocks of [`LANES`] rows: block `b`, feature `k` at `b * features + k`, one row
    /// per lane (lanes past the last row are zero).
    packed: Vec<[f32; LANES]>,
    rows: usize,
    features: usize,
}

impl Reference {
    /// The `rows × features` row-major `values`; `features` must not be 0.
    pub fn new(values: &[f32], rows: usize, features: usize) -> Self {
        assert!(features > 0 && values.len() == rows * features, "bad reference shape");
        let mut packed = vec![[0.0f32; LANES]; rows.div_ceil(LANES) * features];
        for (r, row) in values.chunks(features).enumerate() {
            let (block, lane) = (r / LANES, r % LANES);
            for (k, &v) in row.iter().enumerate() {
                packed[block * features + k][lane] = v;
            }
        }
        Self { packed, rows, features }
    }

    /// The input's values and rows, checked against the reference's width.
    fn queries<'t>(&self, x: &'t Tensor) -> TractResult<(&'t [f32], usize)> {
        let &[queries, features] = x.shape() else {
            bail!("expected a [rows, {}] input, got {:?}", self.features, x.shape())
        };
        if features != self.features {
            bail!("the input has {features} features, the reference rows {}", self.features);
        }
        Ok((x.try_as_plain_ram()?.as_slice::<f32>()?, queries))
    }

    /// The squared distances of the query rows `x` (at most [`TILE`], row-major) to every
    /// reference row: `out[t * rows + j]` for query `t` and reference row `j`.
    fn tile_rows(&self, x: &[f32], out: &mut [f32]) {
        let (f, rows) = (self.features, self.rows);
        let queries = x.len() / f;
        for (b, block) in self.packed.chunks(f).enumerate() {
            let lanes = LANES.min(rows - b * LANES);
            if queries == TILE {
                for (t, acc) in tile(block, x).iter().enumerate() {
                    out[t * rows + b * LANES..][..lanes].copy_from_slice(&acc[..lanes]);
                }
            } else {
                for (t, q) in x.chunks(f).enumerate() {
                    let acc = single(block, q);
                    out[t * rows + b * LANES..][..lanes].copy_from_slice(&acc[..lanes]);
                }
            }
        }
    }
}

/// The squared distances of [`TILE`] query rows (`x`, row-major) to one block of
/// reference rows, each summed in feature order.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn tile(block: &[[f32; LANES]], x: &[f32]) -> [[f32; LANES]; TILE] {
    let f = block.len();
    let (x0, rest) = x.split_at(f);
    let (x1, rest) = rest.split_at(f);
    let (x2, x3) = rest.split_at(f);
    let mut acc = [[0.0f32; LANES]; TILE];
    for (k, y) in block.iter().enumerate() {
        let xs = [x0[k], x1[k], x2[k], x3[k]];
        for (a, &xv) in acc.iter_mut().zip(&xs) {
            for j in 0..LANES {
                let d = xv - y[j];
                a[j] += d * d;
            }
        }
    }
    acc
}

/// [`tile`] for one query row.
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn single(block: &[[f32; LANES]], x: &[f32]) -> [f32; LANES] {
    let mut acc = [0.0f32; LANES];
    for (y, &xv) in block.iter().zip(x) {
        for j in 0..LANES {
            let d = xv - y[j];
            acc[j] += d * d;
        }
    }
    acc
}

/// Square roots in place (a loop that vectorises).
#[multiversion::multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma"))]
fn roots(values: &mut [f32]) {
    for v in values {
        *v = v.sqrt();
    }
}

/// Squared Euclidean distances between the rows of the input `X` (`[N, n]`) and the
/// reference rows (`[M, n]`), laid out `[M, N]` as skl2onnx's scan emits them.
#[derive(Clone, Debug, PartialEq)]
pub struct SquaredDistances(pub Reference);

// Holds floats; tract compares operators only to merge identical nodes.
impl Eq for SquaredDistances {}

impl Op for SquaredDistances {
    fn name(&self) -> StaticName {
        "SquaredDistances".into()
    }

    op_as_typed_op!();
}

impl EvalOp for SquaredDistances {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let r = &self.0;
        let (x, queries) = r.queries(&inputs[0])?;
        let mut out = vec![0.0f32; r.rows * queries];
        let mut scratch = vec![0.0f32; r.rows * TILE];
        for (q, chunk) in x.chunks(TILE * r.features).enumerate() {
            let n = chunk.len() / r.features;
            r.tile_rows(chunk, &mut scratch);
            for (t, distances) in scratch.chunks(r.rows.max(1)).take(n).enumerate() {
                for (j, &d) in distances.iter().enumerate() {
                    out[j * queries + q * TILE + t] = d;
                }
            }
        }
        Ok(tvec![Tensor::from_shape(&[r.rows, queries], &out)?.into_tvalue()])
    }
}

impl TypedOp for SquaredDistances {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        if x.rank() != 2 {
            bail!("expected a [rows, {}] input, got {:?}", self.0.features, x.shape);
        }
        Ok(tvec![f32::fact(tvec![self.0.rows.to_dim(), x.shape[0].clone()])])
    }

    fn declutter(
        &self,
        model: &TypedModel,
        node: &TypedNode,
    ) -> TractResult<Option<TypedModelPatch>> {
        let Some((topk, k, root)) = nearest_chain(model, node)? else { return Ok(None) };
        if k > self.0.rows {
            return Ok(None);
        }
        let op = NearestNeighbours { reference: self.0.clone(), k, root };
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, node.inputs[0])?;
        let outs = patch.wire_node(&topk.name, op, &[x])?;
        for (slot, &out) in outs.iter().enumerate() {
            patch.shunt_outside(model, OutletId::new(topk.id, slot), out)?;
        }
        Ok(Some(patch))
    }

    as_op!();
}

/// The only node reading `outlet`, if that outlet is not also a model output.
fn sole_reader(model: &TypedModel, outlet: OutletId) -> Option<&TypedNode> {
    let readers = &model.nodes()[outlet.node].outputs[outlet.slot].successors;
    match &readers[..] {
        [one] if !model.output_outlets().ok()?.contains(&outlet) => Some(model.node(one.node)),
        _ => None,
    }
}

/// Whether `distances` feeds only a swap of its two axes and optionally a square root (in
/// either order), then `TopK` of the smallest along the reference rows with a constant
/// k: that `TopK` node, k, and whether the root is taken.
fn nearest_chain<'m>(
    model: &'m TypedModel,
    distances: &TypedNode,
) -> TractResult<Option<(&'m TypedNode, usize, bool)>> {
    let (mut moved, mut root) = (false, false);
    let mut outlet = OutletId::new(distances.id, 0);
    loop {
        let Some(next) = sole_reader(model, outlet) else { return Ok(None) };
        if let Some(topk) = next.op_as::<Topk>() {
            let Some(k) = &model.outlet_fact(next.inputs[1])?.konst else { return Ok(None) };
            let k = k.cast_to::<i64>()?;
            let k = k.try_as_plain_ram()?.as_slice::<i64>()?;
            let ok = moved && topk.axis == 1 && !topk.largest && next.inputs[0] == outlet;
            return Ok(match k {
                &[k] if ok && k >= 0 => Some((next, k as usize, root)),
                _ => None,
            });
        }
        let swap = matches!(next.op_as::<AxisOp>(), Some(AxisOp::Move(0, 1) | AxisOp::Move(1, 0)));
        let sqrt = next.op_as::<ElementWiseOp>().is_some_and(|e| e.0.is::<Sqrt>());
        if (swap && !moved) || (sqrt && !root) {
            moved |= swap;
            root |= sqrt;
            outlet = OutletId::new(next.id, 0);
        } else {
            return Ok(None);
        }
    }
}

/// The k nearest reference rows of each input row, nearest first, ties to the lower
/// row: their distances (`[N, k]`, square-rooted or not) and rows (`[N, k]`, int64), as
/// `TopK` of the smallest gives them.
#[derive(Clone, Debug, PartialEq)]
pub struct NearestNeighbours {
    reference: Reference,
    k: usize,
    /// Whether the distances are square-rooted.
    root: bool,
}

// Holds floats; tract compares operators only to merge identical nodes.
impl Eq for NearestNeighbours {}

impl Op for NearestNeighbours {
    fn name(&self) -> StaticName {
        "NearestNeighbours".into()
    }

    op_as_typed_op!();
}

impl EvalOp for NearestNeighbours {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (r, k) = (&self.reference, self.k);
        let (x, queries) = r.queries(&inputs[0])?;
        let mut values = vec![0.0f32; queries * k];
        let mut rows = vec![0i64; queries * k];
        let mut scratch = vec![0.0f32; r.rows * TILE];
        let picks = values.chunks_mut(k.max(1)).zip(rows.chunks_mut(k.max(1)));
        let mut picks = picks.take(if k == 0 { 0 } else { queries });
        for chunk in x.chunks(TILE * r.features) {
            r.tile_rows(chunk, &mut scratch);
            for distances in scratch.chunks_mut(r.rows.max(1)).take(chunk.len() / r.features) {
                if self.root {
                    roots(distances);
                }
                if let Some((v, i)) = picks.next() {
                    smallest(distances, v, i);
                }
            }
        }
        Ok(tvec![
            Tensor::from_shape(&[queries, k], &values)?.into_tvalue(),
            Tensor::from_shape(&[queries, k], &rows)?.into_tvalue(),
        ])
    }
}

impl TypedOp for NearestNeighbours {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs[0];
        if x.rank() != 2 {
            bail!("expected a [rows, {}] input, got {:?}", self.reference.features, x.shape);
        }
        let shape = tvec![x.shape[0].clone(), self.k.to_dim()];
        Ok(tvec![f32::fact(shape.clone()), i64::fact(shape)])
    }

    as_op!();
}

/// Whether `a` comes before `b` among the smallest: NaN after every number (ONNX Runtime
/// leaves the order of NaN unspecified).
fn before(a: f32, b: f32) -> bool {
    a < b || (b.is_nan() && !a.is_nan())
}

/// The `values.len()` smallest of `distances` in order, ties to the lower index, into
/// `values` and `rows`: each candidate, taken in index order, goes after those not
/// after it.
fn smallest(distances: &[f32], values: &mut [f32], rows: &mut [i64]) {
    let k = values.len();
    if k > SORT_FROM {
        let mut order: Vec<usize> = (0..distances.len()).collect();
        order.sort_by(|&a, &b| {
            let (x, y) = (distances[a], distances[b]);
            if before(x, y) {
                std::cmp::Ordering::Less
            } else if before(y, x) {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        });
        for ((v, r), &j) in values.iter_mut().zip(rows.iter_mut()).zip(&order) {
            (*v, *r) = (distances[j], j as i64);
        }
        return;
    }
    let mut kept = 0;
    for (j, &d) in distances.iter().enumerate() {
        if kept == k && !before(d, values[k - 1]) {
            continue;
        }
        let mut at = kept.min(k - 1);
        while at > 0 && before(d, values[at - 1]) {
            values[at] = values[at - 1];
            rows[at] = rows[at - 1];
            at -= 1;
        }
        values[at] = d;
        rows[at] = j as i64;
        kept = (kept + 1).min(k);
    }
}

/// From which k [`smallest`] sorts every row instead of inserting into the k kept.
const SORT_FROM: usize = 64;

/// The `Scan` node in tract's inference model: its two outputs are the final state (the
/// input itself, which the body passes through unchanged) and the distances.
#[derive(Clone, Debug)]
struct ScanDistances(Reference);

impl Expansion for ScanDistances {
    fn name(&self) -> StaticName {
        "SquaredDistances".into()
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(2)
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 2)?;
        check_output_arity(outputs, 2)?;
        let (x, state, distances) = (&inputs[0], &outputs[0], &outputs[1]);
        s.equals(&x.datum_type, f32::datum_type())?;
        s.equals(&x.rank, 2)?;
        s.equals(&x.shape[1], self.0.features.to_dim())?;
        s.equals(&state.datum_type, f32::datum_type())?;
        s.equals(&state.shape, &x.shape)?;
        s.equals(&distances.datum_type, f32::datum_type())?;
        s.equals(&distances.rank, 2)?;
        s.equals(&distances.shape[0], self.0.rows.to_dim())?;
        s.equals(&distances.shape[1], &x.shape[0])?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        // The reference rows are held by the operator; their constant input is left
        // unused (and pruned by tract).
        let distances = model.wire_node(prefix, SquaredDistances(self.0.clone()), &inputs[..1])?[0];
        Ok(tvec![inputs[0], distances])
    }
}

/// Scan: skl2onnx's squared-distance scan here, any other tract's.
pub fn scan(ctx: &ParsingContext, node: &NodeProto) -> Built {
    match distances(ctx, node) {
        Some(op) => Ok((expand(ScanDistances(op)), vec![])),
        None => match TRACT_SCAN.get() {
            Some(build) => build(ctx, node),
            None => node.bail("tract has no builder for this operator"),
        },
    }
}

/// The operator for `node` if it is a scan of squared distances to a constant float32
/// matrix, else `None`.
fn distances(ctx: &ParsingContext, node: &NodeProto) -> Option<Reference> {
    // Opset 8's Scan has a batch axis and sequence lengths; skl2onnx targets 9 and later.
    if ctx.onnx_operator_set_version < 9 || node.input.len() != 2 || node.output.len() != 2 {
        return None;
    }
    if node.get_attr_opt::<i64>("num_scan_inputs").ok()?? != 1 {
        return None;
    }
    for name in
        ["scan_input_axes", "scan_input_directions", "scan_output_axes", "scan_output_directions"]
    {
        if node.get_attr_opt_vec::<i64>(name).ok()?.is_some_and(|v| v.iter().any(|&a| a != 0)) {
            return None;
        }
    }
    let body: &GraphProto = node.get_attr_opt("body").ok()??;
    if !is_squared_distance_body(ctx, body) {
        return None;
    }
    let reference = constant(ctx, &node.input[1])?;
    let &[rows, features] = reference.shape() else { return None };
    if features == 0 {
        return None;
    }
    let values = reference.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?;
    Some(Reference::new(values, rows, features))
}

/// Whether `body` is, up to `Identity` nodes, `state_out = state` and
/// `scan_out = ReduceSumSquare(state - row, axes = [1], keepdims = 0)` on float32, with no
/// other node.
fn is_squared_distance_body(ctx: &ParsingContext, body: &GraphProto) -> bool {
    let ([state, row], [state_out, scan_out]) = (&body.input[..], &body.output[..]) else {
        return false;
    };
    let float = |v: &tract_onnx::pb::ValueInfoProto| {
        matches!(
            v.r#type.as_ref().and_then(|t| t.value.as_ref()),
            Some(type_proto::Value::TensorType(t)) if t.elem_type == 1
        )
    };
    if !float(state) || !float(row) {
        return false;
    }
    let mut walk = Walk { body, used: vec![false; body.node.len()] };
    if walk.source(&state_out.name).0 != state.name {
        return false;
    }
    let Some(reduce) = walk.source(&scan_out.name).1 else { return false };
    if !standard(reduce, "ReduceSumSquare")
        || reduce.get_attr_opt::<i64>("keepdims").ok().flatten() != Some(0)
    {
        return false;
    }
    let axes = match (reduce.input.len(), reduce.get_attr_opt_vec::<i64>("axes")) {
        (1, Ok(Some(axes))) => Some(axes),
        (2, Ok(None)) => walk.constant(ctx, &reduce.input[1]),
        _ => None,
    };
    if axes.is_none_or(|axes| axes != [1] && axes != [-1]) {
        return false;
    }
    let Some(sub) = walk.source(&reduce.input[0]).1 else { return false };
    if !standard(sub, "Sub") || sub.input.len() != 2 {
        return false;
    }
    let a = walk.source(&sub.input[0]).0;
    let b = walk.source(&sub.input[1]).0;
    // (x − y)² and (y − x)² are the same float: negation is exact.
    let operands = [a.as_str(), b.as_str()];
    (operands == [&*state.name, &*row.name] || operands == [&*row.name, &*state.name])
        && walk.used.iter().all(|&u| u)
}

/// Whether `node` is the default domain's `op`.
fn standard(node: &NodeProto, op: &str) -> bool {
    node.op_type == op && (node.domain.is_empty() || node.domain == "ai.onnx")
}

/// A walk back through a scan body from its outputs, marking the nodes it passes.
struct Walk<'b> {
    body: &'b GraphProto,
    used: Vec<bool>,
}

impl<'b> Walk<'b> {
    /// The node that makes `name`.
    fn producer(&mut self, name: &str) -> Option<&'b NodeProto> {
        let (i, node) =
            self.body.node.iter().enumerate().find(|(_, n)| n.output.iter().any(|o| o == name))?;
        self.used[i] = true;
        Some(node)
    }

    /// `name` with the `Identity` nodes before it skipped, and the node that makes it
    /// (`None` for a graph input or initializer).
    fn source(&mut self, name: &str) -> (String, Option<&'b NodeProto>) {
        let mut name = name.to_owned();
        while let Some(n) = self.producer(&name) {
            if !standard(n, "Identity") || n.input.len() != 1 {
                return (name, Some(n));
            }
            name.clone_from(&n.input[0]);
        }
        (name, None)
    }

    /// The int64 values of `name`: a body initializer or a `Constant` node.
    fn constant(&mut self, ctx: &ParsingContext, name: &str) -> Option<Vec<i64>> {
        let proto = if let Some(t) = self.body.initializer.iter().find(|t| t.name == name) {
            t
        } else {
            let n = self.producer(name).filter(|n| standard(n, "Constant"))?;
            n.attribute.iter().find(|a| a.name == "value")?.t.as_ref()?
        };
        let t = tract_onnx::tensor::load_tensor(&*ctx.framework.provider, proto, None).ok()?;
        Some(t.cast_to::<i64>().ok()?.try_as_plain_ram().ok()?.as_slice::<i64>().ok()?.to_vec())
    }
}

/// The float32 value of `name` if it is a constant of the graph the node sits in or of
/// an enclosing one (an initializer that is not also a graph input, which a caller could
/// override, or a `Constant` node's output); innermost graph first.
fn constant(ctx: &ParsingContext, name: &str) -> Option<Tensor> {
    let mut graphs: Vec<&GraphProto> = ctx.parent_graphs.iter().rev().copied().collect();
    graphs.extend(ctx.model.graph.as_ref());
    for g in graphs {
        if g.input.iter().any(|i| i.name == name) {
            return None;
        }
        let proto = g.initializer.iter().find(|t| t.name == name).or_else(|| {
            g.node
                .iter()
                .find(|n| n.op_type == "Constant" && n.output.first().is_some_and(|o| o == name))
                .and_then(|n| n.attribute.iter().find(|a| a.name == "value"))
                .and_then(|a| a.t.as_ref())
        });
        if let Some(proto) = proto {
            let t = tract_onnx::tensor::load_tensor(&*ctx.framework.provider, proto, None).ok()?;
            return (t.datum_type() == f32::datum_type()).then_some(t);
        }
        if g.node.iter().any(|n| n.output.iter().any(|o| o == name)) {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use tract_onnx::pb::attribute_proto::AttributeType;
    use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
    use tract_onnx::pb::{
        AttributeProto, ModelProto, OperatorSetIdProto, TensorProto, TensorShapeProto, TypeProto,
        ValueInfoProto, tensor_proto,
    };

    use super::*;

    fn node(
        op: &str,
        inputs: &[&str],
        outputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            name: format!("{op}-{}", outputs[0]),
            input: inputs.iter().map(|&s| s.into()).collect(),
            output: outputs.iter().map(|&s| s.into()).collect(),
            attribute,
            ..NodeProto::default()
        }
    }

    fn ints(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Ints as i32,
            ints: v.to_vec(),
            ..AttributeProto::default()
        }
    }

    fn int(name: &str, v: i64) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: AttributeType::Int as i32,
            i: v,
            ..AttributeProto::default()
        }
    }

    /// A float32 value of shape `dims` (`None`: unknown).
    fn value(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
        typed_value(name, tensor_proto::DataType::Float, dims)
    }

    fn typed_value(name: &str, dt: tensor_proto::DataType, dims: &[Option<i64>]) -> ValueInfoProto {
        let dim = dims
            .iter()
            .map(|d| Dimension { value: d.map(dimension::Value::DimValue), ..Dimension::default() })
            .collect();
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: dt as i32,
                    shape: Some(TensorShapeProto { dim }),
                })),
                ..TypeProto::default()
            }),
            ..ValueInfoProto::default()
        }
    }

    /// skl2onnx's body, with `reduce` as its reduction and `axes` given as an attribute
    /// or (opset 18) a `Constant` input.
    fn body(reduce: &str, axes_as_input: bool, features: i64) -> GraphProto {
        let mut nodes = vec![node("Identity", &["next_in"], &["next_out"], vec![])];
        nodes.push(node("Sub", &["next_in", "next"], &["diff"], vec![]));
        if axes_as_input {
            let axes = TensorProto {
                dims: vec![1],
                data_type: tensor_proto::DataType::Int64 as i32,
                int64_data: vec![1],
                ..TensorProto::default()
            };
            let value = AttributeProto {
                name: "value".into(),
                r#type: AttributeType::Tensor as i32,
                t: Some(axes),
                ..AttributeProto::default()
            };
            nodes.push(node("Constant", &[], &["axes"], vec![value]));
            nodes.push(node(reduce, &["diff", "axes"], &["reduced"], vec![int("keepdims", 0)]));
        } else {
            let attrs = vec![ints("axes", &[1]), int("keepdims", 0)];
            nodes.push(node(reduce, &["diff"], &["reduced"], attrs));
        }
        nodes.push(node("Identity", &["reduced"], &["scan_out"], vec![]));
        GraphProto {
            name: "body".into(),
            node: nodes,
            input: vec![value("next_in", &[None, Some(features)]), value("next", &[None])],
            output: vec![value("next_out", &[None, Some(features)]), value("scan_out", &[None])],
            ..GraphProto::default()
        }
    }

    /// `Scan(X, reference)` with `body`, both outputs graph outputs.
    fn model(body: GraphProto, reference: &[f32], features: usize, opset: i64) -> ModelProto {
        let rows = reference.len() / features;
        let scan_body = AttributeProto {
            name: "body".into(),
            r#type: AttributeType::Graph as i32,
            g: Some(body),
            ..AttributeProto::default()
        };
        let scan = node(
            "Scan",
            &["X", "reference"],
            &["state", "distances"],
            vec![scan_body, int("num_scan_inputs", 1)],
        );
        let reference = TensorProto {
            name: "reference".into(),
            dims: vec![rows as i64, features as i64],
            data_type: tensor_proto::DataType::Float as i32,
            float_data: reference.to_vec(),
            ..TensorProto::default()
        };
        let graph = GraphProto {
            name: "knn".into(),
            node: vec![scan],
            initializer: vec![reference],
            input: vec![value("X", &[None, Some(features as i64)])],
            output: vec![
                value("state", &[None, Some(features as i64)]),
                value("distances", &[Some(rows as i64), None]),
            ],
            ..GraphProto::default()
        };
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto { domain: String::new(), version: opset }],
            graph: Some(graph),
            ..ModelProto::default()
        }
    }

    /// skl2onnx's k-NN head on `model`'s distances: `Transpose`, `Sqrt` (if `root`),
    /// `TopK(k, smallest)`; the outputs become the picks' distances and rows, and also the
    /// transposed distances if `expose`.
    fn with_top_k(mut model: ModelProto, k: i64, root: bool, expose: bool) -> ModelProto {
        let graph = model.graph.as_mut().unwrap();
        graph.node.push(node("Transpose", &["distances"], &["moved"], vec![ints("perm", &[1, 0])]));
        let mut last = "moved";
        if root {
            graph.node.push(node("Sqrt", &["moved"], &["rooted"], vec![]));
            last = "rooted";
        }
        graph.initializer.push(TensorProto {
            name: "k".into(),
            dims: vec![1],
            data_type: tensor_proto::DataType::Int64 as i32,
            int64_data: vec![k],
            ..TensorProto::default()
        });
        let topk = vec![int("largest", 0), int("sorted", 1)];
        graph.node.push(node("TopK", &[last, "k"], &["values", "indices"], topk));
        graph.output = vec![
            value("values", &[None, Some(k)]),
            typed_value("indices", tensor_proto::DataType::Int64, &[None, Some(k)]),
        ];
        if expose {
            graph.output.push(value(last, &[None, None]));
        }
        model
    }

    /// The model's typed operators and outputs on `x`, with this crate's operators
    /// registered or with tract's alone.
    fn run(model: &ModelProto, ours: bool, x: &Tensor) -> (Vec<String>, Vec<Tensor>) {
        let mut onnx = tract_onnx::onnx();
        if ours {
            crate::register(&mut onnx.op_register);
        }
        let typed = onnx
            .model_for_proto_model(model)
            .unwrap()
            .with_input_fact(0, f32::fact(x.shape()).into())
            .unwrap()
            .into_typed()
            .unwrap()
            .into_decluttered()
            .unwrap();
        let ops = typed.nodes().iter().map(|n| n.op.name().to_string()).collect();
        let outputs = typed.into_runnable().unwrap().run(tvec![x.clone().into_tvalue()]).unwrap();
        (ops, outputs.into_iter().map(IntoTensor::into_tensor).collect())
    }

    fn floats(t: &Tensor) -> Vec<f32> {
        t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    /// A deterministic spread of values, some of them repeated across rows.
    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + seed * 104_729) % 997) as f32 / 97.0 - 5.0).collect()
    }

    /// The definition, as ONNX Runtime evaluates it: per pair, the differences squared
    /// and summed in feature order.
    fn sequential(x: &[f32], reference: &[f32], features: usize) -> Vec<f32> {
        let queries = x.len() / features;
        let mut out = Vec::new();
        for y in reference.chunks(features) {
            for q in x.chunks(features).take(queries) {
                let mut acc = 0.0f32;
                for (a, b) in q.iter().zip(y) {
                    let d = a - b;
                    acc += d * d;
                }
                out.push(acc);
            }
        }
        out
    }

    #[test]
    fn kernel_sums_in_feature_order_for_every_block_and_tile_shape() {
        for (rows, features, queries) in [(1, 1, 1), (16, 3, 4), (37, 5, 7), (33, 20, 9), (0, 2, 3)]
        {
            let reference = data(rows * features, 1);
            let x = data(queries * features, 2);
            let op = SquaredDistances(Reference::new(&reference, rows, features));
            let input = Tensor::from_shape(&[queries, features], &x).unwrap().into_tvalue();
            let got = op.eval_out_of_plan(tvec![input]).unwrap().unwrap().remove(0);
            assert_eq!(got.shape(), &[rows, queries]);
            assert_eq!(floats(&got), sequential(&x, &reference, features), "{rows} {features}");
        }
    }

    #[test]
    fn skl2onnx_distance_scan_runs_natively_and_agrees_with_tracts_scan() {
        let features = 5;
        let reference = data(37 * features, 3);
        for axes_as_input in [false, true] {
            let opset = if axes_as_input { 18 } else { 17 };
            let model =
                model(body("ReduceSumSquare", axes_as_input, 5), &reference, features, opset);
            for queries in [1, 7] {
                let x =
                    Tensor::from_shape(&[queries, features], &data(queries * features, 4)).unwrap();
                let (ops, ours) = run(&model, true, &x);
                let (tract_ops, theirs) = run(&model, false, &x);
                assert!(ops.iter().any(|o| o == "SquaredDistances"), "{ops:?}");
                assert!(!ops.iter().any(|o| o.contains("Scan")), "{ops:?}");
                assert!(tract_ops.iter().any(|o| o.contains("Scan")), "{tract_ops:?}");
                assert_eq!(ours[0], x, "the state passes through");
                assert_eq!(ours[1].shape(), &[37, queries]);
                assert_eq!(ours[1].shape(), theirs[1].shape());
                let expected = sequential(&floats(&x), &reference, features);
                assert_eq!(floats(&ours[1]), expected);
                for (a, b) in floats(&ours[1]).iter().zip(floats(&theirs[1])) {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} against tract's {b}");
                }
            }
        }
    }

    #[test]
    fn any_other_scan_is_tracts() {
        let features = 4;
        let reference = data(9 * features, 5);
        // A sum of differences, not of their squares: same shape, another computation.
        let model = model(body("ReduceSum", false, 4), &reference, features, 11);
        let x = Tensor::from_shape(&[3, features], &data(3 * features, 6)).unwrap();
        let (ops, ours) = run(&model, true, &x);
        let (_, theirs) = run(&model, false, &x);
        assert!(ops.iter().any(|o| o.contains("Scan")), "{ops:?}");
        assert!(!ops.iter().any(|o| o == "SquaredDistances"), "{ops:?}");
        assert_eq!(ours, theirs);
        let sums: Vec<f32> = floats(&ours[1]);
        let (y0, x0) = (&reference[..features], &floats(&x)[..features]);
        let first: f32 = x0.iter().zip(y0).map(|(a, b)| a - b).sum();
        assert!((sums[0] - first).abs() < 1e-4, "{} against {first}", sums[0]);
    }

    /// The k-NN head by its definition: per query, the reference rows in order of their
    /// (rooted) distance, ties to the lower row, the first k.
    fn nearest(
        x: &[f32],
        reference: &[f32],
        features: usize,
        k: usize,
        root: bool,
    ) -> (Vec<f32>, Vec<i64>) {
        let d = sequential(x, reference, features);
        let (queries, rows) = (x.len() / features, reference.len() / features);
        let (mut values, mut picks) = (Vec::new(), Vec::new());
        for q in 0..queries {
            let mut row: Vec<(f32, usize)> = (0..rows)
                .map(|j| {
                    let v = d[j * queries + q];
                    (if root { v.sqrt() } else { v }, j)
                })
                .collect();
            row.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
            values.extend(row.iter().take(k).map(|p| p.0));
            picks.extend(row.iter().take(k).map(|p| p.1 as i64));
        }
        (values, picks)
    }

    /// 80 reference rows of 3 features, some repeated (exact ties).
    fn tied_reference() -> Vec<f32> {
        let features = 3;
        let mut reference = data(80 * features, 7);
        for (from, to) in [(3, 20), (3, 31), (5, 6), (70, 9)] {
            let row = reference[from * features..][..features].to_vec();
            reference[to * features..][..features].copy_from_slice(&row);
        }
        reference
    }

    #[test]
    fn k_nearest_head_becomes_one_operator_that_picks_as_topk_does() {
        let features = 3;
        let reference = tied_reference();
        for (k, root) in [(5, true), (1, false), (80, true), (70, false)] {
            let scan = model(body("ReduceSumSquare", false, 3), &reference, features, 17);
            let model = with_top_k(scan, k, root, false);
            for queries in [1, 6] {
                // The first query is a repeated reference row: two neighbours at 0.
                let mut x = data(queries * features, 8);
                x[..features].copy_from_slice(&reference[3 * features..][..features]);
                let (ops, ours) =
                    run(&model, true, &Tensor::from_shape(&[queries, features], &x).unwrap());
                let (_, theirs) =
                    run(&model, false, &Tensor::from_shape(&[queries, features], &x).unwrap());
                assert!(ops.iter().any(|o| o == "NearestNeighbours"), "{ops:?}");
                assert!(!ops.iter().any(|o| o == "Topk" || o.contains("Scan")), "{ops:?}");
                let (values, picks) = nearest(&x, &reference, features, k as usize, root);
                assert_eq!(ours[0].shape(), &[queries, k as usize]);
                assert_eq!(floats(&ours[0]), values, "k {k} root {root}");
                let got = ours[1].try_as_plain_ram().unwrap().as_slice::<i64>().unwrap().to_vec();
                assert_eq!(got, picks, "k {k} root {root}");
                let both = 2.min(k as usize);
                assert_eq!(&got[..both], &[3, 20][..both], "the two rows at 0");
                assert_eq!(ours[1], theirs[1], "tract's TopK picks the same rows");
            }
        }
    }

    #[test]
    fn distances_read_elsewhere_stay_apart_from_topk() {
        let features = 3;
        let reference = tied_reference();
        let scan = model(body("ReduceSumSquare", false, 3), &reference, features, 17);
        let model = with_top_k(scan, 4, true, true);
        let x = Tensor::from_shape(&[5, features], &data(5 * features, 9)).unwrap();
        let (ops, ours) = run(&model, true, &x);
        let (_, theirs) = run(&model, false, &x);
        assert!(ops.iter().any(|o| o == "SquaredDistances"), "{ops:?}");
        assert!(ops.iter().any(|o| o == "Topk"), "{ops:?}");
        assert_eq!(ours[1], theirs[1]);
        let (values, _) = nearest(&floats(&x), &reference, features, 4, true);
        assert_eq!(floats(&ours[0]), values);
    }

    #[test]
    fn smallest_puts_nan_last_and_ties_in_row_order() {
        let d = [3.0, f32::NAN, 1.0, 3.0, 0.5, 1.0];
        let (mut values, mut rows) = ([0.0; 6], [0i64; 6]);
        smallest(&d, &mut values[..4], &mut rows[..4]);
        assert_eq!((&values[..4], &rows[..4]), (&[0.5, 1.0, 1.0, 3.0][..], &[4, 2, 5, 0][..]));
        smallest(&d, &mut values, &mut rows);
        assert_eq!(rows, [4, 2, 5, 0, 3, 1]);
        assert!(values[5].is_nan());
        // Past SORT_FROM the rows are sorted instead: the same order.
        let long: Vec<f32> =
            (0..100).map(|i| if i % 17 == 5 { f32::NAN } else { (i * 37 % 23) as f32 }).collect();
        let (mut sorted_v, mut sorted_r) = (vec![0.0; 100], vec![0i64; 100]);
        smallest(&long, &mut sorted_v, &mut sorted_r);
        let (mut kept_v, mut kept_r) = (vec![0.0; SORT_FROM], vec![0i64; SORT_FROM]);
        smallest(&long, &mut kept_v, &mut kept_r);
        assert_eq!(sorted_r[..SORT_FROM], kept_r[..]);
        assert_eq!(sorted_v[..SORT_FROM], kept_v[..]);
        assert!(sorted_v[94..].iter().all(|v| v.is_nan()));
    }
}
