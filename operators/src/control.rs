//! If, folded at load when its condition is known then (a constant, or computed from
//! shapes that are concrete), so that only the branch taken is analysed and typed; the
//! other may well not type for these shapes, which is why exporters put the If there.
//!
//! A condition known only at run time (an input's value) keeps both branches, each
//! planned once at load; a branch that cannot be typed for the model's shapes is kept
//! out, and a request that would take it is refused with the reason.

use std::sync::Arc;

use tract_onnx::model::{ParseResult, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::expand::Built;

/// The inference-time If.
#[derive(Debug, Clone)]
pub struct If {
    then_body: InferenceModel,
    then_inputs: Vec<usize>,
    else_body: InferenceModel,
    else_inputs: Vec<usize>,
    /// Why a branch could not be analysed, when the condition was not known.
    then_failed: Option<String>,
    else_failed: Option<String>,
}

impl PartialEq for If {
    fn eq(&self, _: &Self) -> bool {
        false
    }
}

impl Eq for If {}

/// If: both branches parsed, the outer values they read become inputs after the
/// condition.
pub fn parse(ctx: &ParsingContext, node: &NodeProto) -> Built {
    let ParseResult { model: then_body, unresolved_inputs: then_names, .. } =
        ctx.parse_graph(node.get_attr("then_branch")?)?;
    let ParseResult { model: else_body, unresolved_inputs: else_names, .. } =
        ctx.parse_graph(node.get_attr("else_branch")?)?;
    let mut outer: Vec<String> = then_names.iter().chain(&else_names).cloned().collect();
    outer.sort();
    outer.dedup();
    let position = |names: &[String]| -> Vec<usize> {
        names.iter().map(|n| outer.iter().position(|o| o == n).map_or(0, |p| p + 1)).collect()
    };
    let op = If {
        then_inputs: position(&then_names),
        else_inputs: position(&else_names),
        then_body,
        else_body,
        then_failed: None,
        else_failed: None,
    };
    if op.then_body.outputs.len() != op.else_body.outputs.len() {
        return node.bail("the branches have different numbers of outputs");
    }
    Ok((Box::new(op), outer))
}

impl Op for If {
    fn name(&self) -> StaticName {
        "If".into()
    }

    not_a_typed_op!();
}

impl EvalOp for If {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let cond = inputs[0].cast_to_scalar::<bool>()?;
        let (body, mapping) = if cond {
            (&self.then_body, &self.then_inputs)
        } else {
            (&self.else_body, &self.else_inputs)
        };
        let inputs: TVec<TValue> = mapping.iter().map(|&i| inputs[i].clone()).collect();
        body.clone().into_runnable()?.run(inputs)
    }
}

impl If {
    /// Unifies a body's inputs with the outer facts they read.
    fn unify_inputs(
        body: &mut InferenceModel,
        mapping: &[usize],
        outer: &mut [InferenceFact],
    ) -> TractResult<bool> {
        let mut changed = false;
        for (i, &o) in mapping.iter().enumerate() {
            changed |= body.input_fact_mut(i)?.unify_with_mut(&mut outer[o])?;
        }
        Ok(changed)
    }

    fn unify_outputs(
        body: &mut InferenceModel,
        outputs: &mut [InferenceFact],
    ) -> TractResult<bool> {
        let mut changed = false;
        for (i, out) in outputs.iter_mut().enumerate() {
            changed |= body.output_fact_mut(i)?.unify_with_mut(out)?;
        }
        Ok(changed)
    }
}

impl InferenceOp for If {
    fn infer_facts(
        &mut self,
        inputs: TVec<&InferenceFact>,
        outputs: TVec<&InferenceFact>,
        observed: TVec<&InferenceFact>,
    ) -> TractResult<(TVec<InferenceFact>, TVec<InferenceFact>, TVec<InferenceFact>)> {
        let mut inputs: TVec<InferenceFact> = inputs.into_iter().cloned().collect();
        let mut outputs: TVec<InferenceFact> = outputs.into_iter().cloned().collect();
        inputs[0].datum_type.unify_with(&bool::datum_type().into())?;
        loop {
            let mut changed = false;
            let known =
                inputs[0].value.concretize().map(|v| v.cast_to_scalar::<bool>()).transpose()?;
            if let Some(cond) = known {
                // Only the branch taken: the other may not type for these shapes.
                let (body, mapping) = if cond {
                    (&mut self.then_body, &self.then_inputs)
                } else {
                    (&mut self.else_body, &self.else_inputs)
                };
                changed |= Self::unify_inputs(body, mapping, &mut inputs)?;
                changed |= Self::unify_outputs(body, &mut outputs)?;
                changed |= body.analyse(false)?;
            } else {
                for (body, mapping, failed) in [
                    (&mut self.then_body, &self.then_inputs, &mut self.then_failed),
                    (&mut self.else_body, &self.else_inputs, &mut self.else_failed),
                ] {
                    if failed.is_some() {
                        continue;
                    }
                    let step = Self::unify_inputs(body, mapping, &mut inputs)
                        .and_then(|a| Ok(a | Self::unify_outputs(body, &mut outputs)?))
                        .and_then(|a| Ok(a | body.analyse(false)?));
                    match step {
                        Ok(c) => changed |= c,
                        Err(e) => *failed = Some(format!("{e:#}")),
                    }
                }
                if let (Some(t), Some(e)) = (&self.then_failed, &self.else_failed) {
                    bail!("neither branch can be analysed: then: {t}; else: {e}");
                }
            }
            if !changed {
                return Ok((inputs, outputs, observed.into_iter().cloned().collect()));
            }
        }
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(self.then_body.outputs.len())
    }

    fn to_typed(
        &self,
        source: &InferenceModel,
        node: &InferenceNode,
        target: &mut TypedModel,
        mapping: &HashMap<OutletId, OutletId>,
    ) -> TractResult<TVec<OutletId>> {
        let inputs: TVec<OutletId> = node.inputs.iter().map(|o| mapping[o]).collect();
        let cond = source.outlet_fact(node.inputs[0])?.value.concretize();
        if let Some(cond) = cond {
            let (body, body_inputs) = if cond.cast_to_scalar::<bool>()? {
                (&self.then_body, &self.then_inputs)
            } else {
                (&self.else_body, &self.else_inputs)
            };
            let typed = typed_body(body, body_inputs, &inputs, target)?;
            return inline(&node.name, &typed, body_inputs, &inputs, target);
        }
        let plan = |body: &InferenceModel,
                    mapping: &[usize],
                    failed: &Option<String>|
         -> TractResult<Branch> {
            if let Some(reason) = failed {
                return Ok(Branch::Unavailable(reason.clone()));
            }
            let typed =
                typed_body(body, mapping, &inputs, target).and_then(TypedModel::into_optimized);
            Ok(match typed {
                Ok(typed) => {
                    let facts = (0..typed.outputs.len())
                        .map(|i| typed.output_fact(i).cloned())
                        .collect::<TractResult<_>>()?;
                    Branch::Plan(Box::new(Planned {
                        plan: typed.into_runnable()?,
                        mapping: mapping.to_vec(),
                        facts,
                    }))
                }
                Err(e) => Branch::Unavailable(format!("{e:#}")),
            })
        };
        let op = Branches {
            then_branch: plan(&self.then_body, &self.then_inputs, &self.then_failed)?,
            else_branch: plan(&self.else_body, &self.else_inputs, &self.else_failed)?,
        };
        if let (Branch::Unavailable(t), Branch::Unavailable(e)) = (&op.then_branch, &op.else_branch)
        {
            bail!("neither branch can be planned: then: {t}; else: {e}");
        }
        target.wire_node(&node.name, op, &inputs)
    }

    as_op!();
}

/// A branch typed with the facts its outer inputs have in `target`.
fn typed_body(
    body: &InferenceModel,
    mapping: &[usize],
    inputs: &[OutletId],
    target: &TypedModel,
) -> TractResult<TypedModel> {
    let mut body = body.clone();
    for (i, &o) in mapping.iter().enumerate() {
        let fact = target.outlet_fact(inputs[o])?.clone();
        body.set_input_fact(i, InferenceFact::from(fact))?;
    }
    body.into_typed()
}

/// Wires a typed branch's nodes into `target` in place of the If.
fn inline(
    prefix: &str,
    body: &TypedModel,
    mapping: &[usize],
    inputs: &[OutletId],
    target: &mut TypedModel,
) -> TractResult<TVec<OutletId>> {
    let mut wired: HashMap<OutletId, OutletId> = HashMap::default();
    for (outlet, &o) in body.input_outlets()?.iter().zip(mapping) {
        wired.insert(*outlet, inputs[o]);
    }
    for id in body.eval_order()? {
        let node = body.node(id);
        if node.op_is::<tract_core::ops::source::TypedSource>() {
            continue;
        }
        let node_inputs: TVec<OutletId> = node.inputs.iter().map(|o| wired[o]).collect();
        let outs =
            target.wire_node(format!("{prefix}.{}", node.name), node.op.clone(), &node_inputs)?;
        for (slot, outlet) in outs.into_iter().enumerate() {
            wired.insert(OutletId::new(id, slot), outlet);
        }
    }
    Ok(body.output_outlets()?.iter().map(|o| wired[o]).collect())
}

/// One branch of a run-time If: its plan, or why there is none.
#[derive(Debug, Clone)]
enum Branch {
    Plan(Box<Planned>),
    Unavailable(String),
}

#[derive(Debug, Clone)]
struct Planned {
    plan: Arc<TypedRunnableModel>,
    mapping: Vec<usize>,
    facts: TVec<TypedFact>,
}

/// An If whose condition is known only at run time, each branch planned once.
#[derive(Debug, Clone)]
pub struct Branches {
    then_branch: Branch,
    else_branch: Branch,
}

impl PartialEq for Branches {
    fn eq(&self, _: &Self) -> bool {
        false
    }
}

impl Eq for Branches {}

impl Op for Branches {
    fn name(&self) -> StaticName {
        "If".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Branches {
    op_out_of_plan!();

    fn eval(&self, _: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let cond = inputs[0].cast_to_scalar::<bool>()?;
        match if cond { &self.then_branch } else { &self.else_branch } {
            Branch::Plan(p) => {
                let (plan, mapping) = (&p.plan, &p.mapping);
                plan.run(mapping.iter().map(|&i| inputs[i].clone()).collect())
            }
            Branch::Unavailable(reason) => {
                bail!(
                    "the model's {} branch cannot run for these input shapes: {reason}",
                    if cond { "then" } else { "else" }
                )
            }
        }
    }
}

impl TypedOp for Branches {
    fn output_facts(&self, _: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let facts = |b: &Branch| match b {
            Branch::Plan(p) => Some(p.facts.clone()),
            Branch::Unavailable(_) => None,
        };
        match (facts(&self.then_branch), facts(&self.else_branch)) {
            (Some(a), Some(b)) => {
                // The branches may differ in sizes; only types and ranks must agree.
                a.iter()
                    .zip(&b)
                    .map(|(x, y)| {
                        if x.datum_type != y.datum_type || x.rank() != y.rank() {
                            bail!("the branches give {x:?} and {y:?}");
                        }
                        if x.shape == y.shape {
                            Ok(x.without_value())
                        } else {
                            Ok(unknown_sizes(x))
                        }
                    })
                    .collect()
            }
            (Some(a), None) | (None, Some(a)) => {
                Ok(a.iter().map(TypedFact::without_value).collect())
            }
            (None, None) => bail!("neither branch has a plan"),
        }
    }

    as_op!();
}

/// A fact of the same type and rank whose sizes are left open.
fn unknown_sizes(fact: &TypedFact) -> TypedFact {
    let scope = SymbolScope::default();
    let dims: TVec<TDim> =
        (0..fact.rank()).map(|i| TDim::Sym(scope.sym(&format!("falaj_if_{i}")))).collect();
    fact.datum_type.fact(dims)
}
