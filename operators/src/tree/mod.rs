//! Tree ensembles: TreeEnsembleClassifier and TreeEnsembleRegressor (ai.onnx.ml opsets
//! 1-3) and TreeEnsemble (opset 5), read into one [`Spec`], compiled into a [`Forest`]
//! at load and evaluated by it; [`head`] turns the forest's sums into outputs.

pub mod forest;
pub mod head;
pub mod quickscorer;

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

use crate::attrs::{self, Labels, exact};
use crate::expand::{Built, Kernel, Out, Shape, as_f32_rows, expand, row_fact, rows_of};
use crate::post::Post;
use forest::{Aggregate, Cmp, Forest, Spec, SpecNode};
use head::{Classification, Label, Regression};

/// The forest and what turns its sums into outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct TreeOp {
    forest: Arc<Forest>,
    head: Head,
}

#[derive(Clone, Debug, PartialEq)]
enum Head {
    Regression(Regression),
    Classification(Classification, Labels),
}

impl Kernel for TreeOp {
    fn name(&self) -> &'static str {
        match self.head {
            Head::Regression(_) => "TreeEnsembleRegressor",
            Head::Classification(..) => "TreeEnsembleClassifier",
        }
    }

    fn eval(&self, inputs: &[TValue]) -> TractResult<TVec<Tensor>> {
        let (x, rows, columns) = as_f32_rows(&inputs[0])?;
        let need = self.forest.features();
        if columns < need {
            bail!("the input has {columns} features, the trees read feature {}", need - 1);
        }
        let scores = self.forest.eval(&x, rows, columns);
        Ok(match &self.head {
            Head::Regression(head) => {
                let y = head.finish(scores);
                tvec![Tensor::from_shape(&[rows, self.forest.targets()], &y)?]
            }
            Head::Classification(head, labels) => {
                let (picked, z) = head.finish(scores);
                let picks = picked.iter().map(|l| match *l {
                    Label::Class(i) => Ok(i),
                    Label::Literal(v) => Err(v),
                });
                let width = z.len() / rows.max(1);
                tvec![labels.tensor(picks)?, Tensor::from_shape(&[rows, width], &z)?]
            }
        })
    }

    fn facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(match &self.head {
            Head::Regression(_) => {
                tvec![row_fact(f32::datum_type(), inputs[0], self.forest.targets())]
            }
            Head::Classification(head, labels) => tvec![
                labels.datum_type().fact(tvec![rows_of(inputs[0])]),
                row_fact(f32::datum_type(), inputs[0], head.classes),
            ],
        })
    }
}

fn cmp(node: &NodeProto, mode: &str) -> TractResult<Option<Cmp>> {
    Ok(Some(match mode {
        "BRANCH_LEQ" => Cmp::Leq,
        "BRANCH_LT" => Cmp::Lt,
        "BRANCH_GTE" => Cmp::Gte,
        "BRANCH_GT" => Cmp::Gt,
        "BRANCH_EQ" => Cmp::Eq,
        "BRANCH_NEQ" => Cmp::Neq,
        "LEAF" => return Ok(None),
        other => return node.bail(&format!("unknown node mode {other:?}")),
    }))
}

fn aggregate(node: &NodeProto, name: &str) -> TractResult<Aggregate> {
    Ok(match name {
        "SUM" => Aggregate::Sum,
        "AVERAGE" => Aggregate::Average,
        "MIN" => Aggregate::Min,
        "MAX" => Aggregate::Max,
        other => return node.bail(&format!("unknown aggregate function {other:?}")),
    })
}

fn post(node: &NodeProto) -> TractResult<Post> {
    let name = node.get_attr_opt::<&str>("post_transform")?.unwrap_or("NONE");
    Post::parse(name).map_or_else(|| node.bail(&format!("unknown post_transform {name:?}")), Ok)
}

/// The legacy (opsets 1-3) layout: nodes by (tree id, node id), leaf weights in
/// parallel `class_*` or `target_*` lists.
fn legacy_spec(
    ctx: &ParsingContext,
    node: &NodeProto,
    prefix: &str,
    n_targets: usize,
    agg: Aggregate,
) -> TractResult<Spec> {
    let tree_ids = node.get_attr_vec::<i64>("nodes_treeids")?;
    let n = tree_ids.len();
    let node_ids = exact(node, "nodes_nodeids", node.get_attr_vec::<i64>("nodes_nodeids")?, n)?;
    let features =
        exact(node, "nodes_featureids", node.get_attr_vec::<i64>("nodes_featureids")?, n)?;
    let modes = exact(node, "nodes_modes", node.get_attr_vec::<String>("nodes_modes")?, n)?;
    let trues =
        exact(node, "nodes_truenodeids", node.get_attr_vec::<i64>("nodes_truenodeids")?, n)?;
    let falses =
        exact(node, "nodes_falsenodeids", node.get_attr_vec::<i64>("nodes_falsenodeids")?, n)?;
    let values = attrs::floats(ctx, node, "nodes_values", "nodes_values_as_tensor")?
        .map(|v| exact(node, "nodes_values", v, n))
        .transpose()?
        .unwrap_or_else(|| vec![0.0; n]);
    let missing =
        node.get_attr_opt_vec::<i64>("nodes_missing_value_tracks_true")?.unwrap_or_default();

    let mut index = HashMap::with_capacity(n);
    let mut roots = Vec::new();
    let mut last_tree = None;
    for (i, (&t, &id)) in tree_ids.iter().zip(&node_ids).enumerate() {
        if index.insert((t, id), i).is_some() {
            return node.bail(&format!("node {id} of tree {t} is declared twice"));
        }
        if last_tree != Some(t) && !roots.iter().any(|&(tree, _)| tree == t) {
            roots.push((t, i));
        }
        last_tree = Some(t);
    }
    let child = |i: usize, id: i64, which: &str| -> TractResult<usize> {
        index.get(&(tree_ids[i], id)).copied().map_or_else(
            || {
                node.bail(&format!(
                    "node {} of tree {} has {which} child {id}, which is not declared",
                    node_ids[i], tree_ids[i]
                ))
            },
            Ok,
        )
    };
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        nodes.push(match cmp(node, &modes[i])? {
            None => SpecNode::Leaf(Vec::new()),
            Some(cmp) => SpecNode::Branch {
                feature: usize::try_from(features[i])
                    .or_else(|_| node.bail("negative feature id"))?,
                cmp,
                value: values[i],
                members: Vec::new(),
                missing_true: missing.get(i).is_some_and(|&m| m == 1),
                on_true: child(i, trues[i], "true")?,
                on_false: child(i, falses[i], "false")?,
            },
        });
    }
    let leaf_trees = node.get_attr_vec::<i64>(&format!("{prefix}_treeids"))?;
    let m = leaf_trees.len();
    let leaf_nodes =
        exact(node, "leaf node ids", node.get_attr_vec::<i64>(&format!("{prefix}_nodeids"))?, m)?;
    let leaf_ids =
        exact(node, "leaf target ids", node.get_attr_vec::<i64>(&format!("{prefix}_ids"))?, m)?;
    let weights = attrs::floats(
        ctx,
        node,
        &format!("{prefix}_weights"),
        &format!("{prefix}_weights_as_tensor"),
    )?
    .map_or_else(|| node.bail("leaf weights are missing"), |w| exact(node, "leaf weights", w, m))?;
    // Weights listed in (tree, node) order, as ONNX Runtime sums them.
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by_key(|&j| (leaf_trees[j], leaf_nodes[j]));
    for j in order {
        let Some(&i) = index.get(&(leaf_trees[j], leaf_nodes[j])) else {
            return node.bail(&format!(
                "a weight names node {} of tree {}, which is not declared",
                leaf_nodes[j], leaf_trees[j]
            ));
        };
        let target = usize::try_from(leaf_ids[j]).or_else(|_| node.bail("negative target id"))?;
        // A weight on a branch is ignored, as ONNX Runtime does (old onnxmltools wrote some).
        if let SpecNode::Leaf(w) = &mut nodes[i] {
            w.push((target, weights[j]));
        }
    }
    Ok(Spec {
        nodes,
        roots: roots.into_iter().map(|(_, i)| i).collect(),
        n_targets,
        aggregate: agg,
    })
}

fn compile(node: &NodeProto, spec: &Spec) -> TractResult<Arc<Forest>> {
    Forest::compile(spec).map(Arc::new).or_else(|e| node.bail(&e.to_string()))
}

/// TreeEnsembleRegressor (ai.onnx.ml opsets 1-3).
pub fn regressor(ctx: &ParsingContext, node: &NodeProto) -> Built {
    let n_targets: usize = node.get_attr_opt("n_targets")?.unwrap_or(1);
    let agg = aggregate(node, node.get_attr_opt::<&str>("aggregate_function")?.unwrap_or("SUM"))?;
    let spec = legacy_spec(ctx, node, "target", n_targets, agg)?;
    let forest = compile(node, &spec)?;
    let base =
        attrs::floats(ctx, node, "base_values", "base_values_as_tensor")?.unwrap_or_default();
    let head = Regression { base, post: post(node)?, aggregate: agg, trees: forest.trees() };
    let op = TreeOp { forest, head: Head::Regression(head) };
    expand(op, vec![Out::new(f32::datum_type(), Shape::Rows(n_targets))])
}

/// TreeEnsembleClassifier (ai.onnx.ml opsets 1-3).
pub fn classifier(ctx: &ParsingContext, node: &NodeProto) -> Built {
    let labels = Labels::read(node, "classlabels_int64s", "classlabels_strings")?;
    node.expect(labels.len() >= 2, "at least two class labels")?;
    let spec = legacy_spec(ctx, node, "class", labels.len(), Aggregate::Sum)?;
    let weights =
        attrs::floats(ctx, node, "class_weights", "class_weights_as_tensor")?.unwrap_or_default();
    let weighted: std::collections::HashSet<i64> =
        node.get_attr_vec::<i64>("class_ids")?.into_iter().collect();
    let forest = compile(node, &spec)?;
    let head = Classification {
        base: attrs::floats(ctx, node, "base_values", "base_values_as_tensor")?.unwrap_or_default(),
        post: post(node)?,
        classes: labels.len(),
        binary_case: labels.len() == 2 && weighted.len() == 1,
        all_positive: weights.iter().all(|&w| w >= 0.0),
    };
    let outputs = vec![
        Out::new(labels.datum_type(), Shape::RowsOnly),
        Out::new(f32::datum_type(), Shape::Rows(labels.len())),
    ];
    let op = TreeOp { forest, head: Head::Classification(head, labels) };
    expand(op, outputs)
}

/// TreeEnsemble (ai.onnx.ml opset 5): nodes by index, leaves apart, modes and
/// thresholds as tensors, set membership.
pub fn ensemble(ctx: &ParsingContext, node: &NodeProto) -> Built {
    let ints = |name: &str| node.get_attr_vec::<i64>(name);
    let features = ints("nodes_featureids")?;
    let n = features.len();
    let splits = attrs::tensor(ctx, node, "nodes_splits")?
        .map_or_else(|| node.bail("nodes_splits is missing"), Ok)?;
    let splits = exact(node, "nodes_splits", attrs::f32_values(node, "nodes_splits", &splits)?, n)?;
    let modes = attrs::tensor(ctx, node, "nodes_modes")?
        .map_or_else(|| node.bail("nodes_modes is missing"), Ok)?;
    let modes: Vec<i64> = exact(
        node,
        "nodes_modes",
        modes.cast_to::<i64>()?.try_as_plain_ram()?.as_slice::<i64>()?.to_vec(),
        n,
    )?;
    let trues = exact(node, "nodes_truenodeids", ints("nodes_truenodeids")?, n)?;
    let falses = exact(node, "nodes_falsenodeids", ints("nodes_falsenodeids")?, n)?;
    let true_leaf = node.get_attr_opt_vec::<i64>("nodes_trueleafs")?.unwrap_or_else(|| vec![0; n]);
    let false_leaf =
        node.get_attr_opt_vec::<i64>("nodes_falseleafs")?.unwrap_or_else(|| vec![0; n]);
    let missing =
        node.get_attr_opt_vec::<i64>("nodes_missing_value_tracks_true")?.unwrap_or_default();
    let leaf_targets = ints("leaf_targetids")?;
    let leaf_weights = attrs::tensor(ctx, node, "leaf_weights")?
        .map_or_else(|| node.bail("leaf_weights is missing"), Ok)?;
    let leaf_weights = exact(
        node,
        "leaf_weights",
        attrs::f32_values(node, "leaf_weights", &leaf_weights)?,
        leaf_targets.len(),
    )?;
    let members = attrs::tensor(ctx, node, "membership_values")?
        .map(|t| attrs::f32_values(node, "membership_values", &t))
        .transpose()?
        .unwrap_or_default();
    let mut sets = members.split(|v| v.is_nan());
    let n_targets: usize = node.get_attr_opt("n_targets")?.unwrap_or(1);
    let agg = match node.get_attr_opt::<i64>("aggregate_function")?.unwrap_or(1) {
        0 => Aggregate::Average,
        1 => Aggregate::Sum,
        2 => Aggregate::Min,
        3 => Aggregate::Max,
        other => return node.bail(&format!("unknown aggregate_function {other}")),
    };
    let post_code = node.get_attr_opt::<i64>("post_transform")?.unwrap_or(0);
    let post = Post::from_code(post_code)
        .map_or_else(|| node.bail(&format!("unknown post_transform {post_code}")), Ok)?;

    // Leaves go after the branch nodes.
    let leaf =
        |i: i64| usize::try_from(i).map(|i| n + i).or_else(|_| node.bail("negative leaf index"));
    let branch = |i: i64| usize::try_from(i).or_else(|_| node.bail("negative node index"));
    let mut nodes = Vec::with_capacity(n + leaf_targets.len());
    for i in 0..n {
        let cmp = match modes[i] {
            0 => Cmp::Leq,
            1 => Cmp::Lt,
            2 => Cmp::Gte,
            3 => Cmp::Gt,
            4 => Cmp::Eq,
            5 => Cmp::Neq,
            6 => Cmp::Member,
            other => return node.bail(&format!("unknown node mode {other}")),
        };
        let members = if cmp == Cmp::Member {
            sets.next().map_or_else(
                || node.bail("fewer membership sets than MEMBER nodes"),
                |s| Ok(s.to_vec()),
            )?
        } else {
            Vec::new()
        };
        nodes.push(SpecNode::Branch {
            feature: usize::try_from(features[i]).or_else(|_| node.bail("negative feature id"))?,
            cmp,
            value: splits[i],
            members,
            missing_true: missing.get(i).is_some_and(|&m| m == 1),
            on_true: if true_leaf.get(i) == Some(&1) { leaf(trues[i])? } else { branch(trues[i])? },
            on_false: if false_leaf.get(i) == Some(&1) {
                leaf(falses[i])?
            } else {
                branch(falses[i])?
            },
        });
    }
    for (&t, &w) in leaf_targets.iter().zip(&leaf_weights) {
        nodes.push(SpecNode::Leaf(vec![(
            usize::try_from(t).or_else(|_| node.bail("negative target id"))?,
            w,
        )]));
    }
    // A root may be a leaf only when the tree is a single leaf; roots index branches.
    let roots = ints("tree_roots")?.into_iter().map(branch).collect::<TractResult<Vec<_>>>()?;
    let spec = Spec { nodes, roots, n_targets, aggregate: agg };
    let forest = compile(node, &spec)?;
    let head = Regression { base: Vec::new(), post, aggregate: agg, trees: forest.trees() };
    let op = TreeOp { forest, head: Head::Regression(head) };
    expand(op, vec![Out::new(f32::datum_type(), Shape::Rows(n_targets))])
}
