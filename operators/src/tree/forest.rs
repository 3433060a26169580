//! A tree ensemble compiled for evaluation: every tree's nodes in one flat array, in
//! depth-first order from its root (the true branch first), 16 bytes a node, leaves that
//! loop on themselves, and the leaves' weights in side tables.
//!
//! Forests whose trees have at most 64 leaves and all test `x <= t` (or all `x < t`), as
//! boosted ensembles do, score batches by QuickScorer's row-blocked form
//! ([`super::quickscorer`]), with no walk at all. Other forests, and single rows of even
//! ones, walk several cursors through their trees in lockstep: eight trees of one row
//! when a batch has a single row, one tree for sixteen rows otherwise. A cursor's next
//! node depends only on its own last one, so the walks' memory loads overlap instead of
//! waiting on each other, and a leaf, whose children are itself under every comparison,
//! needs no test to stop on: a group simply takes as many steps as its deepest tree.
//! Trees are taken in blocks whose nodes fit in the L2 cache, a chunk of rows goes
//! through each tree before the next (its upper nodes stay in L1), and each row adds up
//! its trees in their order, so sums are those of a plain tree-by-tree walk.

use std::fmt;

use super::quickscorer::{BLOCK, QuickScorer, SHORT_BLOCK, Scratch, Test};

/// How a branch compares the feature with its threshold; NaN features compare false
/// (true for `Neq`) unless the node sends missing values to its true branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cmp {
    /// `x <= t`
    Leq,
    /// `x < t`
    Lt,
    /// `x >= t`
    Gte,
    /// `x > t`
    Gt,
    /// `x == t`
    Eq,
    /// `x != t`
    Neq,
    /// `x` is one of a set of values (TreeEnsemble, ai.onnx.ml opset 5).
    Member,
}

/// One node of a tree as the model declares it, children by index into [`Spec::nodes`].
#[derive(Clone, Debug, PartialEq)]
pub enum SpecNode {
    Branch {
        /// Input column compared.
        feature: usize,
        cmp: Cmp,
        /// The threshold (unused by `Member`).
        value: f32,
        /// The set, for `Member`.
        members: Vec<f32>,
        /// Whether a missing (NaN) feature takes the true branch.
        missing_true: bool,
        /// Child when the comparison holds.
        on_true: usize,
        /// Child otherwise.
        on_false: usize,
    },
    /// A leaf: what it adds to each target.
    Leaf(Vec<(usize, f32)>),
}

/// How the trees' contributions to one target combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Aggregate {
    Sum,
    /// The mean over all trees.
    Average,
    Min,
    Max,
}

/// An ensemble as declared: nodes, the root of each tree, the number of targets.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    /// Every node of every tree.
    pub nodes: Vec<SpecNode>,
    /// Index of each tree's root in `nodes`, in the order the trees are summed.
    pub roots: Vec<usize>,
    /// Targets (classes or regression outputs).
    pub n_targets: usize,
    /// How trees combine.
    pub aggregate: Aggregate,
}

/// Why an ensemble was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForestError {
    /// A child index outside the node list.
    #[error("tree {tree}: node {node} points to node {child}, which does not exist")]
    MissingChild {
        tree: usize,
        /// The node, as declared.
        node: usize,
        /// The child index.
        child: usize,
    },
    /// A node reached twice: a cycle, or nodes shared between branches.
    #[error("tree {tree}: node {node} is reached twice (a cycle or a shared subtree)")]
    Cycle { tree: usize, node: usize },
    /// A leaf weight for a target past `n_targets`.
    #[error("tree {tree}: a leaf adds to target {target}, but there are {n_targets}")]
    Target {
        tree: usize,
        /// The target id.
        target: usize,
        /// Targets declared.
        n_targets: usize,
    },
    /// No trees, or no targets.
    #[error("the ensemble has no {0}")]
    Empty(&'static str),
    /// More nodes than the flat layout indexes.
    #[error("{0} nodes is more than this engine takes")]
    TooLarge(usize),
}

/// A node of the flat layout. Leaves have a NaN threshold and both children pointing at
/// themselves, so stepping a leaf leaves the cursor where it is.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)]
struct Node {
    value: f32,
    /// The feature's column, with [`MISSING_TRUE`] set when NaN takes the true branch.
    feature: u32,
    on_true: u32,
    on_false: u32,
}

const MISSING_TRUE: u32 = 1 << 31;
const NO_LEAF: u32 = u32::MAX;
/// Cursors walked in lockstep: trees of one row, or rows of one tree in a refilling walk.
const LANES: usize = 8;
/// Rows of one tree walked in lockstep: sixteen cursors hide more of the loads' latency
/// than eight (about a fifth less time on scikit-learn's extra trees and forests).
const ROW_LANES: usize = 16;
/// Rows from which QuickScorer takes a block rather than rows one by one (a short block
/// repeats its last row).
const QUICK_BLOCK_ROWS: usize = 2;
/// Bytes of rows a lockstep walk takes through each tree before the next tree (from 8 to
/// 256 rows): the tree's upper nodes stay in L1 while they go through it.
const CHUNK_BYTES: usize = 16 * 1024;
/// Bytes of nodes per block of trees: most of a typical 512 KiB L2 cache.
const BLOCK_BYTES: usize = 384 * 1024;

/// What [`Forest::quick_block`] keeps from one block of `B` rows to the next.
#[derive(Default)]
struct QuickBlocks<const B: usize> {
    scratch: Scratch<B>,
    /// Per tree, each row's leaf position.
    out: Vec<[u32; B]>,
    /// Per row and target, the weights summed and whether any was.
    sums: Vec<f32>,
    touched: Vec<bool>,
}

/// The compiled ensemble.
#[derive(Clone, PartialEq)]
pub struct Forest {
    nodes: Vec<Node>,
    roots: Vec<u32>,
    depths: Vec<u32>,
    /// How rows reach their leaves: `walk` when `quick` does not serve the batch.
    walk: Walk,
    /// Whether the trees' depths are even enough for [`Walk::Lockstep`].
    even: bool,
    /// QuickScorer's tables, for trees of at most 64 leaves that all test `x <= t` (or
    /// all `x < t`): batches go through them, and single rows too unless trees are even.
    quick: Option<QuickScorer>,
    /// Comparison shared by every branch, or `None` when they differ (or use `Member`).
    uniform: Option<Cmp>,
    /// Per node: its comparison (mixed forests only).
    cmps: Vec<Cmp>,
    /// Per node: its member set as a range of `members` (mixed forests only).
    member_ranges: Vec<(u32, u32)>,
    members: Vec<f32>,
    any_missing_true: bool,
    /// Per node: index into `leaf_start` of its leaf, or [`NO_LEAF`].
    leaf_of: Vec<u32>,
    /// Leaf `l` adds `leaf_weight[leaf_start[l]..leaf_start[l + 1]]` to the targets beside.
    leaf_start: Vec<u32>,
    leaf_target: Vec<u32>,
    leaf_weight: Vec<f32>,
    /// Per node, when every leaf adds exactly one weight and all to the same target: that
    /// weight (the target is `single_target`).
    single: Option<Vec<f32>>,
    single_target: usize,
    /// Per QuickScorer leaf position, its one weight and that weight's target (when every
    /// leaf has one weight and trees are summed or averaged); else empty.
    quick_values: Vec<f32>,
    quick_targets: Vec<u32>,
    /// Whether every leaf names every target (so no target ever lacks a score).
    dense: bool,
    n_targets: usize,
    n_features: usize,
    aggregate: Aggregate,
}

impl fmt::Debug for Forest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forest")
            .field("trees", &self.roots.len())
            .field("nodes", &self.nodes.len())
            .field("targets", &self.n_targets)
            .field("features", &self.n_features)
            .field("uniform", &self.uniform)
            .field("aggregate", &self.aggregate)
            .finish_non_exhaustive()
    }
}

/// How a forest's rows walk to their leaves, chosen at compile time from its shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Walk {
    /// Trees of even depth: groups of cursors stepped together to the deepest leaf,
    /// with no test for the end.
    Lockstep,
    /// Uneven trees: each lane walks to its own leaf and takes the next walk.
    Refill,
}

/// Scores of one batch: `rows × targets` values and whether each was ever given one.
#[derive(Clone, Debug, PartialEq)]
pub struct Scores {
    /// Row-major values.
    pub values: Vec<f32>,
    /// Row-major: whether a tree (or a base value) scored this target for this row.
    pub has: Vec<bool>,
    /// Targets per row.
    pub targets: usize,
}

impl Forest {
    /// Compiles `spec`, checking every index.
    pub fn compile(spec: &Spec) -> Result<Self, ForestError> {
        if spec.roots.is_empty() {
            return Err(ForestError::Empty("trees"));
        }
        if spec.n_targets == 0 {
            return Err(ForestError::Empty("targets"));
        }
        if spec.nodes.len() >= (MISSING_TRUE as usize) {
            return Err(ForestError::TooLarge(spec.nodes.len()));
        }
        let out = Builder::build(spec)?;
        let uniform = out.uniform();
        let n_features = out.max_feature.map_or(0, |f| f + 1);
        let single_target = out.leaf_target.first().map_or(0, |&t| t as usize);
        let single = (out.leaf_start.windows(2).all(|w| w[1] - w[0] == 1)
            && out.leaf_target.iter().all(|&t| t as usize == single_target))
        .then(|| {
            out.leaf_of
                .iter()
                .map(|&l| {
                    if l == NO_LEAF {
                        0.0
                    } else {
                        out.leaf_weight[out.leaf_start[l as usize] as usize]
                    }
                })
                .collect()
        });
        let dense = out.leaf_start.windows(2).all(|w| {
            let mut targets: Vec<u32> = out.leaf_target[w[0] as usize..w[1] as usize].to_vec();
            targets.sort_unstable();
            targets.dedup();
            targets.len() == spec.n_targets
        });
        // Lockstep pays a group's deepest path for every cursor; when that is well over the
        // trees' mean leaf depth, refilling lanes wastes less.
        let group_steps: u32 = out
            .depths
            .chunks(LANES)
            .map(|g| g.iter().max().copied().unwrap_or(0) * g.len() as u32)
            .sum();
        let mean_paths: f64 = out.mean_leaf_depths.iter().sum();
        let even = f64::from(group_steps) <= 1.25 * mean_paths;
        let quick = match uniform {
            Some(cmp @ (Cmp::Leq | Cmp::Lt)) => quick_scorer(&out, n_features, cmp == Cmp::Lt),
            _ => None,
        };
        let walk = if even { Walk::Lockstep } else { Walk::Refill };
        let forest = Self {
            nodes: out.nodes,
            roots: out.roots,
            depths: out.depths,
            walk,
            even,
            quick: None,
            uniform,
            cmps: if uniform.is_some() { Vec::new() } else { out.cmps },
            member_ranges: if uniform.is_some() { Vec::new() } else { out.member_ranges },
            members: out.members,
            any_missing_true: out.any_missing_true,
            leaf_of: out.leaf_of,
            leaf_start: out.leaf_start,
            leaf_target: out.leaf_target,
            leaf_weight: out.leaf_weight,
            single,
            single_target,
            quick_values: Vec::new(),
            quick_targets: Vec::new(),
            dense,
            n_targets: spec.n_targets,
            n_features,
            aggregate: spec.aggregate,
        };
        Ok(forest.with_quick(quick))
    }

    /// This forest scored by `quick` (or not by QuickScorer, for `None`).
    fn with_quick(self, quick: Option<QuickScorer>) -> Self {
        let one_weight = self.leaf_start.windows(2).all(|w| w[1] - w[0] == 1);
        let (quick_values, quick_targets) = match (&quick, self.aggregate) {
            (Some(q), Aggregate::Sum | Aggregate::Average) if one_weight => (0..q.leaf_count()
                as u32)
                .map(|p| {
                    let at = self.leaf_start[self.leaf_of[q.leaf_node(p) as usize] as usize];
                    (self.leaf_weight[at as usize], self.leaf_target[at as usize])
                })
                .unzip(),
            _ => (Vec::new(), Vec::new()),
        };
        Self { quick, quick_values, quick_targets, ..self }
    }

    /// Trees in the ensemble.
    pub fn trees(&self) -> usize {
        self.roots.len()
    }

    /// Targets each row is scored on.
    pub fn targets(&self) -> usize {
        self.n_targets
    }

    /// Columns a row must have: one past the highest feature a branch reads.
    pub fn features(&self) -> usize {
        self.n_features
    }

    /// How trees combine.
    pub fn aggregate(&self) -> Aggregate {
        self.aggregate
    }

    /// Scores `rows` rows of `columns` features each (row-major `x`), aggregated over
    /// trees but before any base value or transform. `columns` must be at least
    /// [`Forest::features`].
    pub fn eval(&self, x: &[f32], rows: usize, columns: usize) -> Scores {
        assert!(columns >= self.n_features && x.len() == rows * columns);
        let mut scores = Scores {
            values: vec![self.initial(); rows * self.n_targets],
            has: vec![false; rows * self.n_targets],
            targets: self.n_targets,
        };
        match (self.uniform, self.any_missing_true) {
            (Some(Cmp::Leq), false) => self.run::<Leq, false>(x, rows, columns, &mut scores),
            (Some(Cmp::Leq), true) => self.run::<Leq, true>(x, rows, columns, &mut scores),
            (Some(Cmp::Lt), false) => self.run::<Lt, false>(x, rows, columns, &mut scores),
            (Some(Cmp::Lt), true) => self.run::<Lt, true>(x, rows, columns, &mut scores),
            (Some(Cmp::Gte), m) => self.run_dyn(x, rows, columns, &mut scores, Cmp::Gte, m),
            (Some(Cmp::Gt), m) => self.run_dyn(x, rows, columns, &mut scores, Cmp::Gt, m),
            (Some(Cmp::Eq), m) => self.run_dyn(x, rows, columns, &mut scores, Cmp::Eq, m),
            (Some(Cmp::Neq), m) => self.run_dyn(x, rows, columns, &mut scores, Cmp::Neq, m),
            (Some(Cmp::Member) | None, _) => self.run::<Mixed, true>(x, rows, columns, &mut scores),
        }
        scores
    }

    fn initial(&self) -> f32 {
        match self.aggregate {
            Aggregate::Sum | Aggregate::Average => 0.0,
            Aggregate::Min => f32::INFINITY,
            Aggregate::Max => f32::NEG_INFINITY,
        }
    }

    /// Uniform comparisons that are rare in practice run through the mixed kernel's
    /// per-node dispatch rather than a specialisation each.
    fn run_dyn(
        &self,
        x: &[f32],
        rows: usize,
        columns: usize,
        scores: &mut Scores,
        _: Cmp,
        _: bool,
    ) {
        self.run::<Mixed, true>(x, rows, columns, scores);
    }

    fn run<C: Compare, const MISSING: bool>(
        &self,
        x: &[f32],
        rows: usize,
        columns: usize,
        scores: &mut Scores,
    ) {
        if let Some(quick) = &self.quick
            && (rows > 1 || !self.even)
        {
            self.run_quick(quick, x, rows, columns, scores);
            return;
        }
        if self.walk == Walk::Refill {
            self.run_refill::<C, MISSING>(x, rows, columns, scores);
            return;
        }
        if rows == 1 {
            self.one_row::<C, MISSING>(x, scores);
            return;
        }
        self.lockstep::<C, MISSING>(x, rows, columns, scores);
    }

    /// Trees of even depth, batches: [`ROW_LANES`] rows at a time through one tree, each
    /// group of rows for as many steps as the tree's deepest leaf, a chunk of rows
    /// through each tree before the next.
    #[inline(never)] // apart from the other walks, its registers are its own (about 12% faster)
    fn lockstep<C: Compare, const MISSING: bool>(
        &self,
        x: &[f32],
        rows: usize,
        columns: usize,
        scores: &mut Scores,
    ) {
        let chunk_rows = (CHUNK_BYTES / (columns.max(1) * size_of::<f32>())).clamp(ROW_LANES, 256);
        for block in self.blocks() {
            for chunk in (0..rows).step_by(chunk_rows) {
                let end = rows.min(chunk + chunk_rows);
                // Every lane walks (a short group repeats its last row), so that the step
                // loop has a fixed count and unrolls; rows by their offsets in `x`.
                let groups: Vec<(usize, usize, [usize; ROW_LANES])> = (chunk..end)
                    .step_by(ROW_LANES)
                    .map(|first| {
                        let lanes = ROW_LANES.min(end - first);
                        let starts =
                            std::array::from_fn(|lane| (first + lane.min(lanes - 1)) * columns);
                        (first, lanes, starts)
                    })
                    .collect();
                for tree in block.clone() {
                    for &(first, lanes, starts) in &groups {
                        let mut cur = [self.roots[tree]; ROW_LANES];
                        for _ in 0..self.depths[tree] {
                            for (c, &start) in cur.iter_mut().zip(&starts) {
                                let node = self.nodes[*c as usize];
                                // Without missing-value flags the feature has no flag bit.
                                let feature = if MISSING {
                                    node.feature & !MISSING_TRUE
                                } else {
                                    node.feature
                                };
                                let v = x[start + feature as usize];
                                *c = self.decide::<C, MISSING>(*c, node, v);
                            }
                        }
                        for (lane, &leaf) in cur.iter().enumerate().take(lanes) {
                            self.add(leaf, first + lane, scores);
                        }
                    }
                }
            }
        }
    }

    /// QuickScorer: [`BLOCK`] rows at a time while more than [`SHORT_BLOCK`] are left,
    /// then a block of those, then a last row alone.
    fn run_quick(
        &self,
        quick: &QuickScorer,
        x: &[f32],
        rows: usize,
        columns: usize,
        scores: &mut Scores,
    ) {
        let mut first = 0;
        let mut blocks = QuickBlocks::<BLOCK>::default();
        while rows - first > SHORT_BLOCK {
            first += self.quick_block(quick, &mut blocks, x, (first, rows), columns, scores);
        }
        if rows - first >= QUICK_BLOCK_ROWS {
            let mut short = QuickBlocks::<SHORT_BLOCK>::default();
            first += self.quick_block(quick, &mut short, x, (first, rows), columns, scores);
        }
        if first < rows {
            let mut bits = vec![0u64; self.roots.len()];
            let mut leaves = vec![0u32; self.roots.len()];
            for r in first..rows {
                quick.leaves(&x[r * columns..(r + 1) * columns], &mut bits, &mut leaves);
                for &leaf in &leaves {
                    self.add(leaf, r, scores);
                }
            }
        }
    }

    /// One QuickScorer block of up to `B` rows from row `first` (of `rows`), their leaves'
    /// weights added to `scores`; returns the rows scored.
    fn quick_block<const B: usize>(
        &self,
        quick: &QuickScorer,
        blocks: &mut QuickBlocks<B>,
        x: &[f32],
        (first, rows): (usize, usize),
        columns: usize,
        scores: &mut Scores,
    ) -> usize {
        let lanes = B.min(rows - first);
        // A short block repeats its last row.
        let block: [&[f32]; B] = std::array::from_fn(|lane| {
            let r = first + lane.min(lanes - 1);
            &x[r * columns..(r + 1) * columns]
        });
        let QuickBlocks { scratch, out, sums, touched } = blocks;
        quick.block(&block, scratch, out);
        if self.quick_values.is_empty() {
            for lane in 0..lanes {
                for leaves in out.iter() {
                    self.add(quick.leaf_node(leaves[lane]), first + lane, scores);
                }
            }
        } else if self.single.is_some() {
            // Each row's trees summed in their order, as a plain walk sums them.
            let mut sums = [0.0f32; B];
            for leaves in out.iter() {
                for (s, &p) in sums.iter_mut().zip(leaves) {
                    *s += self.quick_values[p as usize];
                }
            }
            for (lane, &s) in sums.iter().enumerate().take(lanes) {
                let i = (first + lane) * self.n_targets + self.single_target;
                scores.values[i] += s;
                scores.has[i] = true;
            }
        } else {
            let n = self.n_targets;
            sums.clear();
            sums.resize(B * n, 0.0);
            touched.clear();
            touched.resize(B * n, false);
            for leaves in out.iter() {
                for (lane, &p) in leaves.iter().enumerate() {
                    let i = lane * n + self.quick_targets[p as usize] as usize;
                    sums[i] += self.quick_values[p as usize];
                    touched[i] = true;
                }
            }
            let rows_out = first * n..(first + lanes) * n;
            for (((v, h), &s), &t) in scores.values[rows_out.clone()]
                .iter_mut()
                .zip(&mut scores.has[rows_out])
                .zip(sums.iter())
                .zip(touched.iter())
            {
                if t {
                    *v += s;
                    *h = true;
                }
            }
        }
        lanes
    }

    fn one_row<C: Compare, const MISSING: bool>(&self, row: &[f32], scores: &mut Scores) {
        let trees = self.roots.len();
        for first in (0..trees).step_by(LANES) {
            let lanes = LANES.min(trees - first);
            let mut cur = [0u32; LANES];
            cur[..lanes].copy_from_slice(&self.roots[first..first + lanes]);
            let depth = self.depths[first..first + lanes].iter().copied().max().unwrap_or(0);
            for _ in 0..depth {
                for c in cur.iter_mut().take(lanes) {
                    *c = self.step::<C, MISSING>(*c, row);
                }
            }
            for &leaf in cur.iter().take(lanes) {
                self.add(leaf, 0, scores);
            }
        }
    }

    /// Trees of uneven depth: each cursor walks to its own leaf and its lane takes the
    /// next walk at once, so no lane idles behind a deeper tree.
    fn run_refill<C: Compare, const MISSING: bool>(
        &self,
        x: &[f32],
        rows: usize,
        columns: usize,
        scores: &mut Scores,
    ) {
        if rows == 1 {
            let mut leaves = vec![0u32; self.roots.len()];
            self.refill::<C, MISSING>(
                self.roots.len(),
                |t| (self.roots[t], x),
                |t, leaf| leaves[t] = leaf,
            );
            for leaf in leaves {
                self.add(leaf, 0, scores);
            }
            return;
        }
        for block in self.blocks() {
            for tree in block {
                let root = self.roots[tree];
                self.refill::<C, MISSING>(
                    rows,
                    |r| (root, &x[r * columns..(r + 1) * columns]),
                    |r, leaf| self.add(leaf, r, scores),
                );
            }
        }
    }

    /// Walks `items` walks (`start` gives each its root and row), [`LANES`] at a time, each
    /// to its leaf (a node that is its own child), handing each leaf to `done`.
    #[inline(always)]
    fn refill<'x, C: Compare, const MISSING: bool>(
        &self,
        items: usize,
        start: impl Fn(usize) -> (u32, &'x [f32]),
        mut done: impl FnMut(usize, u32),
    ) {
        const IDLE: usize = usize::MAX;
        let mut item = [IDLE; LANES];
        let mut cur = [0u32; LANES];
        let mut row: [&[f32]; LANES] = [&[]; LANES];
        let mut next = 0;
        for lane in 0..LANES.min(items) {
            item[lane] = next;
            (cur[lane], row[lane]) = start(next);
            next += 1;
        }
        let mut live = LANES.min(items);
        while live > 0 {
            for lane in 0..LANES {
                if item[lane] == IDLE {
                    continue;
                }
                let at = cur[lane];
                let node = self.nodes[at as usize];
                if node.on_true == at {
                    done(item[lane], at);
                    if next < items {
                        item[lane] = next;
                        (cur[lane], row[lane]) = start(next);
                        next += 1;
                    } else {
                        item[lane] = IDLE;
                        live -= 1;
                    }
                    continue;
                }
                cur[lane] = self.branch::<C, MISSING>(at, node, row[lane]);
            }
        }
    }

    /// Consecutive trees whose nodes fit in [`BLOCK_BYTES`] (at least one tree each).
    fn blocks(&self) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let per_node = size_of::<Node>();
        let mut start = 0;
        std::iter::from_fn(move || {
            if start == self.roots.len() {
                return None;
            }
            let mut end = start + 1;
            let base = self.roots[start] as usize;
            while end < self.roots.len()
                && (self.roots[end] as usize - base) * per_node < BLOCK_BYTES
            {
                end += 1;
            }
            let block = start..end;
            start = end;
            Some(block)
        })
    }

    #[inline]
    fn step<C: Compare, const MISSING: bool>(&self, at: u32, row: &[f32]) -> u32 {
        self.branch::<C, MISSING>(at, self.nodes[at as usize], row)
    }

    #[inline]
    fn branch<C: Compare, const MISSING: bool>(&self, at: u32, node: Node, row: &[f32]) -> u32 {
        self.decide::<C, MISSING>(at, node, row[(node.feature & !MISSING_TRUE) as usize])
    }

    /// The child of `node` (at `at`) that the feature's value `v` takes.
    #[inline]
    fn decide<C: Compare, const MISSING: bool>(&self, at: u32, node: Node, v: f32) -> u32 {
        let holds = C::holds(self, at, v, node.value)
            || (MISSING && v.is_nan() && node.feature & MISSING_TRUE != 0);
        if holds { node.on_true } else { node.on_false }
    }

    #[inline]
    fn add(&self, at: u32, row: usize, scores: &mut Scores) {
        let base = row * self.n_targets;
        if let (Some(single), Aggregate::Sum | Aggregate::Average) = (&self.single, self.aggregate)
        {
            let i = base + self.single_target;
            scores.values[i] += single[at as usize];
            scores.has[i] = true;
            return;
        }
        self.add_weights(at, base, scores);
    }

    /// [`Self::add`] for leaves of several weights or another aggregate: kept out of
    /// line, so that the walks inline the one-weight sum.
    #[inline(never)]
    fn add_weights(&self, at: u32, base: usize, scores: &mut Scores) {
        let leaf = self.leaf_of[at as usize] as usize;
        let (start, end) = (self.leaf_start[leaf] as usize, self.leaf_start[leaf + 1] as usize);
        for (&target, &w) in self.leaf_target[start..end].iter().zip(&self.leaf_weight[start..end])
        {
            let i = base + target as usize;
            let s = &mut scores.values[i];
            *s = match self.aggregate {
                Aggregate::Sum | Aggregate::Average => *s + w,
                Aggregate::Min => s.min(w),
                Aggregate::Max => s.max(w),
            };
            scores.has[i] = true;
        }
    }

    /// Whether every leaf scores every target (no target of any row can lack a score).
    pub fn dense(&self) -> bool {
        self.dense
    }
}

trait Compare {
    fn holds(forest: &Forest, at: u32, v: f32, t: f32) -> bool;
}

struct Leq;
impl Compare for Leq {
    #[inline]
    fn holds(_: &Forest, _: u32, v: f32, t: f32) -> bool {
        v <= t
    }
}

struct Lt;
impl Compare for Lt {
    #[inline]
    fn holds(_: &Forest, _: u32, v: f32, t: f32) -> bool {
        v < t
    }
}

struct Mixed;
impl Compare for Mixed {
    // BRANCH_EQ and BRANCH_NEQ are exact comparisons by definition.
    #[allow(clippy::float_cmp)]
    #[inline]
    fn holds(forest: &Forest, at: u32, v: f32, t: f32) -> bool {
        let cmp = forest.cmps.get(at as usize).copied().or(forest.uniform).unwrap_or(Cmp::Leq);
        match cmp {
            Cmp::Leq => v <= t,
            Cmp::Lt => v < t,
            Cmp::Gte => v >= t,
            Cmp::Gt => v > t,
            Cmp::Eq => v == t,
            // A leaf's NaN threshold makes `!=` hold; its true child is itself too.
            Cmp::Neq => v != t,
            Cmp::Member => {
                let (a, b) = forest.member_ranges[at as usize];
                forest.members[a as usize..b as usize].contains(&v)
            }
        }
    }
}

/// QuickScorer's tables, when every tree has at most 64 leaves.
fn quick_scorer(out: &Builder, features: usize, strict: bool) -> Option<QuickScorer> {
    let mut tests = Vec::new();
    let mut leaves_per_tree = Vec::with_capacity(out.roots.len());
    for (tree, &root) in out.roots.iter().enumerate() {
        let end = out.roots.get(tree + 1).map_or(out.nodes.len(), |&r| r as usize);
        let range = root as usize..end;
        // Leaves before each node of the tree: in this depth-first, true-first layout a
        // node's true subtree is the span from the node to its false child.
        let mut before = Vec::with_capacity(range.len() + 1);
        let mut leaves = Vec::new();
        for i in range.clone() {
            before.push(leaves.len() as u32);
            if out.leaf_of[i] != NO_LEAF {
                leaves.push(i as u32);
            }
        }
        before.push(leaves.len() as u32);
        if leaves.len() > QuickScorer::MAX_LEAVES {
            return None;
        }
        for i in range.clone() {
            if out.leaf_of[i] != NO_LEAF {
                continue;
            }
            let node = out.nodes[i];
            let local = |n: usize| before[n - range.start];
            tests.push(Test {
                tree: tree as u32,
                feature: node.feature & !MISSING_TRUE,
                threshold: node.value,
                missing_true: node.feature & MISSING_TRUE != 0,
                true_leaves: local(i + 1)..local(node.on_false as usize),
            });
        }
        leaves_per_tree.push(leaves);
    }
    QuickScorer::new(&tests, &leaves_per_tree, features, strict)
}

#[derive(Default)]
struct Builder {
    nodes: Vec<Node>,
    cmps: Vec<Cmp>,
    member_ranges: Vec<(u32, u32)>,
    members: Vec<f32>,
    roots: Vec<u32>,
    depths: Vec<u32>,
    leaf_of: Vec<u32>,
    leaf_start: Vec<u32>,
    leaf_target: Vec<u32>,
    leaf_weight: Vec<f32>,
    max_feature: Option<usize>,
    any_missing_true: bool,
    /// Per tree: the mean depth of its leaves.
    mean_leaf_depths: Vec<f64>,
}

impl Builder {
    /// Lays out every tree of `spec`.
    fn build(spec: &Spec) -> Result<Self, ForestError> {
        let mut out = Self::default();
        let mut seen = vec![false; spec.nodes.len()];
        for (tree, &root) in spec.roots.iter().enumerate() {
            out.tree(spec, tree, root, &mut seen)?;
        }
        Ok(out)
    }

    /// Lays out one tree depth-first from `root`, true branches first.
    fn tree(
        &mut self,
        spec: &Spec,
        tree: usize,
        root: usize,
        seen: &mut [bool],
    ) -> Result<(), ForestError> {
        if self.leaf_start.is_empty() {
            self.leaf_start.push(0);
        }
        let check = |node: usize, child: usize| {
            if child < spec.nodes.len() {
                Ok(child)
            } else {
                Err(ForestError::MissingChild { tree, node, child })
            }
        };
        check(root, root)?;
        // (declared node, compiled index of the parent and whether it is its true child)
        let mut stack = vec![(root, None::<(usize, bool)>, 0u32)];
        let first = self.nodes.len();
        let mut depth = 0;
        let (mut leaves, mut leaf_depths) = (0u32, 0u64);
        while let Some((declared, parent, level)) = stack.pop() {
            if std::mem::replace(&mut seen[declared], true) {
                return Err(ForestError::Cycle { tree, node: declared });
            }
            let at = self.nodes.len() as u32;
            if let Some((p, is_true)) = parent {
                if is_true {
                    self.nodes[p].on_true = at;
                } else {
                    self.nodes[p].on_false = at;
                }
            }
            depth = depth.max(level);
            match &spec.nodes[declared] {
                SpecNode::Branch {
                    feature,
                    cmp,
                    value,
                    members,
                    missing_true,
                    on_true,
                    on_false,
                } => {
                    let (t, f) = (check(declared, *on_true)?, check(declared, *on_false)?);
                    self.max_feature = Some(self.max_feature.map_or(*feature, |m| m.max(*feature)));
                    self.any_missing_true |= *missing_true;
                    let feature = u32::try_from(*feature)
                        .ok()
                        .filter(|f| f & MISSING_TRUE == 0)
                        .ok_or(ForestError::TooLarge(*feature))?;
                    let start = self.members.len() as u32;
                    self.members.extend(members);
                    self.member_ranges.push((start, self.members.len() as u32));
                    self.nodes.push(Node {
                        value: *value,
                        feature: feature | if *missing_true { MISSING_TRUE } else { 0 },
                        on_true: at,
                        on_false: at,
                    });
                    self.cmps.push(*cmp);
                    self.leaf_of.push(NO_LEAF);
                    // Popped last, laid out first: the true branch follows its parent.
                    stack.push((f, Some((at as usize, false)), level + 1));
                    stack.push((t, Some((at as usize, true)), level + 1));
                }
                SpecNode::Leaf(weights) => {
                    leaves += 1;
                    leaf_depths += u64::from(level);
                    for &(target, w) in weights {
                        if target >= spec.n_targets {
                            return Err(ForestError::Target {
                                tree,
                                target,
                                n_targets: spec.n_targets,
                            });
                        }
                        self.leaf_target.push(target as u32);
                        self.leaf_weight.push(w);
                    }
                    self.leaf_of.push(self.leaf_start.len() as u32 - 1);
                    self.leaf_start.push(self.leaf_weight.len() as u32);
                    self.nodes.push(Node {
                        value: f32::NAN,
                        feature: 0,
                        on_true: at,
                        on_false: at,
                    });
                    self.cmps.push(Cmp::Leq);
                    self.member_ranges.push((0, 0));
                }
            }
        }
        self.roots.push(first as u32);
        self.depths.push(depth);
        self.mean_leaf_depths.push(leaf_depths as f64 / f64::from(leaves.max(1)));
        Ok(())
    }

    fn uniform(&self) -> Option<Cmp> {
        let mut branches = self.cmps.iter().zip(&self.leaf_of).filter(|(_, l)| **l == NO_LEAF);
        let first = *branches.next().map_or(&Cmp::Leq, |(c, _)| c);
        (first != Cmp::Member && branches.all(|(c, _)| *c == first)).then_some(first)
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // the same arithmetic gives the same floats
mod tests {
    use super::*;

    fn branch(feature: usize, cmp: Cmp, value: f32, on_true: usize, on_false: usize) -> SpecNode {
        SpecNode::Branch {
            feature,
            cmp,
            value,
            members: vec![],
            missing_true: false,
            on_true,
            on_false,
        }
    }

    fn leaf(w: f32) -> SpecNode {
        SpecNode::Leaf(vec![(0, w)])
    }

    /// Two stumps on feature 0 and a deeper tree on feature 1.
    fn spec() -> Spec {
        Spec {
            nodes: vec![
                branch(0, Cmp::Leq, 0.5, 1, 2),
                leaf(1.0),
                leaf(2.0),
                branch(1, Cmp::Leq, 0.0, 4, 5),
                leaf(10.0),
                branch(0, Cmp::Leq, 2.0, 6, 7),
                leaf(20.0),
                leaf(30.0),
            ],
            roots: vec![0, 3],
            n_targets: 1,
            aggregate: Aggregate::Sum,
        }
    }

    fn naive(spec: &Spec, row: &[f32]) -> f32 {
        spec.roots
            .iter()
            .map(|&r| {
                let mut at = r;
                loop {
                    match &spec.nodes[at] {
                        SpecNode::Leaf(w) => break w[0].1,
                        SpecNode::Branch {
                            feature,
                            value,
                            on_true,
                            on_false,
                            missing_true,
                            ..
                        } => {
                            let v = row[*feature];
                            at = if v <= *value || (*missing_true && v.is_nan()) {
                                *on_true
                            } else {
                                *on_false
                            };
                        }
                    }
                }
            })
            .sum()
    }

    /// The forest compiled once per way of walking it: as compiled, each walk without
    /// QuickScorer, and with QuickScorer single rows taken by it and by the walk.
    fn every_walk(spec: &Spec) -> Vec<Forest> {
        let forest = Forest::compile(spec).unwrap();
        let mut all = vec![forest.clone()];
        for walk in [Walk::Lockstep, Walk::Refill] {
            all.push(Forest { walk, ..forest.clone() }.with_quick(None));
        }
        if forest.quick.is_some() {
            for even in [false, true] {
                all.push(Forest { even, ..forest.clone() });
            }
        }
        all
    }

    #[test]
    fn every_batch_size_scores_like_a_plain_walk_in_every_walk() {
        let spec = spec();
        let forest = Forest::compile(&spec).unwrap();
        assert_eq!((forest.trees(), forest.features(), forest.targets()), (2, 2, 1));
        assert_eq!(forest.walk, Walk::Refill, "a stump beside a deeper tree: uneven depths");
        assert!(forest.quick.is_some(), "and few leaves: QuickScorer");
        let rows: Vec<[f32; 2]> =
            (0..37).map(|i| [(i % 7) as f32 * 0.5, (i % 3) as f32 - 1.0]).collect();
        for forest in every_walk(&spec) {
            for n in [1, 2, 8, 9, 37] {
                let x: Vec<f32> = rows[..n].iter().flatten().copied().collect();
                let scores = forest.eval(&x, n, 2);
                for (i, row) in rows[..n].iter().enumerate() {
                    assert_eq!(
                        scores.values[i],
                        naive(&spec, row),
                        "row {i} of {n}, {:?}",
                        forest.walk
                    );
                    assert!(scores.has[i]);
                }
            }
        }
        // Two trees of one shape: even depths.
        let mut nodes = spec.nodes.clone();
        nodes.extend(spec.nodes[3..].iter().map(|n| match n {
            SpecNode::Branch { on_true, on_false, .. } => {
                let mut n = n.clone();
                if let SpecNode::Branch { on_true: t, on_false: f, .. } = &mut n {
                    (*t, *f) = (on_true + 5, on_false + 5);
                }
                n
            }
            SpecNode::Leaf(_) => n.clone(),
        }));
        let even = Spec { nodes, roots: vec![3, 8], ..spec.clone() };
        assert_eq!(Forest::compile(&even).unwrap().walk, Walk::Lockstep);
    }

    /// Scores as [`Forest::eval`] gives them, by walking each tree from its root.
    #[allow(clippy::float_cmp)] // BRANCH_EQ and BRANCH_NEQ are exact by definition
    fn naive_scores(spec: &Spec, rows: &[[f32; 4]]) -> Scores {
        let n = spec.n_targets;
        let initial = match spec.aggregate {
            Aggregate::Sum | Aggregate::Average => 0.0,
            Aggregate::Min => f32::INFINITY,
            Aggregate::Max => f32::NEG_INFINITY,
        };
        let mut scores = Scores {
            values: vec![initial; rows.len() * n],
            has: vec![false; rows.len() * n],
            targets: n,
        };
        for (r, row) in rows.iter().enumerate() {
            for &root in &spec.roots {
                let mut at = root;
                let weights = loop {
                    match &spec.nodes[at] {
                        SpecNode::Leaf(w) => break w,
                        SpecNode::Branch {
                            feature,
                            cmp,
                            value,
                            members,
                            missing_true,
                            on_true,
                            on_false,
                        } => {
                            let (v, t) = (row[*feature], *value);
                            let holds = match cmp {
                                Cmp::Leq => v <= t,
                                Cmp::Lt => v < t,
                                Cmp::Gte => v >= t,
                                Cmp::Gt => v > t,
                                Cmp::Eq => v == t,
                                Cmp::Neq => v != t,
                                Cmp::Member => members.contains(&v),
                            } || (*missing_true && v.is_nan());
                            at = if holds { *on_true } else { *on_false };
                        }
                    }
                };
                for &(target, w) in weights {
                    let s = &mut scores.values[r * n + target];
                    *s = match spec.aggregate {
                        Aggregate::Sum | Aggregate::Average => *s + w,
                        Aggregate::Min => s.min(w),
                        Aggregate::Max => s.max(w),
                    };
                    scores.has[r * n + target] = true;
                }
            }
        }
        scores
    }

    /// Random trees of random shapes, comparisons, targets and aggregates, with missing
    /// values and both flags: every walk agrees with the plain one at every batch size
    /// from 1 to 40 (every remainder of QuickScorer's blocks and the walks' lanes), with
    /// weights whose sums depend on their order. Some rounds have enough trees for
    /// QuickScorer to split them into several chunks, of one and of two leaf words a tree.
    #[test]
    fn random_forests_agree_with_a_plain_walk() {
        let mut rng = Lcg(7);
        for round in 0..60 {
            let cmp = [Cmp::Leq, Cmp::Lt, Cmp::Leq, Cmp::Gte, Cmp::Lt][round % 5];
            let (n_targets, weights): (usize, Leaves) = match round % 4 {
                0 => (1, |rng, _| vec![(0, weight(rng))]),
                // One class per tree in turn, as XGBoost's and LightGBM's classifiers.
                1 => (3, |rng, tree| vec![(tree % 3, weight(rng))]),
                // Two classes, weights on the second only.
                2 => (2, |rng, _| vec![(1, weight(rng))]),
                _ => (2, |rng, _| {
                    let first = (0, weight(rng));
                    if rng.below(3) == 0 { vec![first] } else { vec![first, (1, weight(rng))] }
                }),
            };
            let aggregate = match round % 7 {
                3 => Aggregate::Average,
                5 => Aggregate::Min,
                6 => Aggregate::Max,
                _ => Aggregate::Sum,
            };
            let (trees, max_depth) = match round % 10 {
                4 => (140, 7), // two words a tree (up to 128 leaves, 64 in QuickScorer)
                9 => (300, 5), // one word a tree, two chunks
                _ => (1 + rng.below(12), if round % 2 == 0 { 6 } else { 7 }),
            };
            let mut nodes = Vec::new();
            let mut roots = Vec::new();
            for tree in 0..trees {
                // Depths to 7: some trees past QuickScorer's 64 leaves, most within.
                let depth = 1 + rng.below(max_depth);
                let leaf = |rng: &mut Lcg| SpecNode::Leaf(weights(rng, tree));
                roots.push(random_tree(&mut nodes, &mut rng, cmp, &leaf, 0, depth));
            }
            let spec = Spec { nodes, roots, n_targets, aggregate };
            let rows: Vec<[f32; 4]> = (0..40)
                .map(|_| {
                    std::array::from_fn(|_| {
                        if rng.below(9) == 0 { f32::NAN } else { rng.below(20) as f32 / 4.0 }
                    })
                })
                .collect();
            let x: Vec<f32> = rows.iter().flatten().copied().collect();
            let expected = naive_scores(&spec, &rows);
            for forest in every_walk(&spec) {
                for n in 1..=rows.len() {
                    let scores = forest.eval(&x[..n * 4], n, 4);
                    let k = n * n_targets;
                    let what = format!(
                        "round {round}, {n} rows, {:?}, quick {}, even {}",
                        forest.walk,
                        forest.quick.is_some(),
                        forest.even
                    );
                    assert_eq!(scores.values, expected.values[..k], "{what}");
                    assert_eq!(scores.has, expected.has[..k], "{what}");
                }
            }
        }
    }

    /// A leaf's weights, from the tree's index.
    type Leaves = fn(&mut Lcg, usize) -> Vec<(usize, f32)>;

    /// A weight whose sums with others are rounded (so their order shows).
    fn weight(rng: &mut Lcg) -> f32 {
        rng.below(1000) as f32 / 7.0 - 50.0
    }

    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) as usize) % n
        }
    }

    /// A tree of at most `depth` levels below `level`, its branches comparing by `cmp`
    /// and its leaves made by `leaf`; returns its root's index.
    fn random_tree(
        nodes: &mut Vec<SpecNode>,
        rng: &mut Lcg,
        cmp: Cmp,
        leaf: &dyn Fn(&mut Lcg) -> SpecNode,
        level: usize,
        depth: usize,
    ) -> usize {
        let at = nodes.len();
        if level == depth || (level > 0 && rng.below(4) == 0) {
            nodes.push(leaf(rng));
            return at;
        }
        nodes.push(SpecNode::Leaf(vec![]));
        let on_true = random_tree(nodes, rng, cmp, leaf, level + 1, depth);
        let on_false = random_tree(nodes, rng, cmp, leaf, level + 1, depth);
        nodes[at] = SpecNode::Branch {
            feature: rng.below(4),
            cmp,
            value: rng.below(20) as f32 / 4.0,
            members: vec![],
            missing_true: rng.below(2) == 0,
            on_true,
            on_false,
        };
        at
    }

    #[test]
    fn missing_values_follow_their_flag() {
        let mut spec = spec();
        let x = [f32::NAN, 1.0];
        let plain = Forest::compile(&spec).unwrap().eval(&x, 1, 2).values[0];
        assert_eq!(plain, 2.0 + 30.0, "NaN <= t is false");
        if let SpecNode::Branch { missing_true, .. } = &mut spec.nodes[0] {
            *missing_true = true;
        }
        let tracked = Forest::compile(&spec).unwrap().eval(&x, 1, 2).values[0];
        assert_eq!(tracked, 1.0 + 30.0);
    }

    #[test]
    fn every_comparison_and_set_membership() {
        for (cmp, members, v, expected) in [
            (Cmp::Lt, vec![], 0.5, 2.0),
            (Cmp::Lt, vec![], 0.4, 1.0),
            (Cmp::Gte, vec![], 0.5, 1.0),
            (Cmp::Gt, vec![], 0.5, 2.0),
            (Cmp::Eq, vec![], 0.5, 1.0),
            (Cmp::Neq, vec![], 0.5, 2.0),
            (Cmp::Member, vec![3.0, 0.5], 0.5, 1.0),
            (Cmp::Member, vec![3.0], 0.5, 2.0),
        ] {
            let spec = Spec {
                nodes: vec![
                    SpecNode::Branch {
                        feature: 0,
                        cmp,
                        value: 0.5,
                        members,
                        missing_true: false,
                        on_true: 1,
                        on_false: 2,
                    },
                    leaf(1.0),
                    leaf(2.0),
                ],
                roots: vec![0],
                n_targets: 1,
                aggregate: Aggregate::Sum,
            };
            let forest = Forest::compile(&spec).unwrap();
            assert_eq!(forest.eval(&[v], 1, 1).values[0], expected, "{cmp:?} {v}");
            assert_eq!(forest.eval(&[v, v, v], 3, 1).values, vec![expected; 3], "{cmp:?} batch");
        }
    }

    #[test]
    fn min_max_average_and_sparse_targets() {
        let nodes = vec![
            branch(0, Cmp::Leq, 0.0, 1, 2),
            SpecNode::Leaf(vec![(0, 1.0), (1, 5.0)]),
            SpecNode::Leaf(vec![(1, 2.0)]),
            SpecNode::Leaf(vec![(0, 3.0), (1, -1.0)]),
        ];
        let spec =
            |aggregate| Spec { nodes: nodes.clone(), roots: vec![0, 3], n_targets: 2, aggregate };
        let x = [1.0]; // first tree: leaf 2 (target 1 only)
        let sum = Forest::compile(&spec(Aggregate::Sum)).unwrap();
        assert!(!sum.dense());
        let s = sum.eval(&x, 1, 1);
        assert_eq!(s.values, vec![3.0, 1.0]);
        assert_eq!(s.has, vec![true, true]);
        assert_eq!(
            Forest::compile(&spec(Aggregate::Min)).unwrap().eval(&x, 1, 1).values,
            vec![3.0, -1.0]
        );
        assert_eq!(
            Forest::compile(&spec(Aggregate::Max)).unwrap().eval(&x, 1, 1).values,
            vec![3.0, 2.0]
        );
        let only_first = Spec { roots: vec![0], ..spec(Aggregate::Sum) };
        let s = Forest::compile(&only_first).unwrap().eval(&[1.0, -1.0], 2, 1);
        assert_eq!(s.has, vec![false, true, true, true]);
    }

    #[test]
    fn bad_structures_are_refused() {
        let mut cyclic = spec();
        cyclic.nodes[0] = branch(0, Cmp::Leq, 0.5, 1, 0);
        assert_eq!(Forest::compile(&cyclic), Err(ForestError::Cycle { tree: 0, node: 0 }));
        let mut dangling = spec();
        dangling.nodes[3] = branch(1, Cmp::Leq, 0.0, 4, 99);
        assert_eq!(
            Forest::compile(&dangling),
            Err(ForestError::MissingChild { tree: 1, node: 3, child: 99 })
        );
        let mut target = spec();
        target.nodes[1] = SpecNode::Leaf(vec![(3, 1.0)]);
        assert!(matches!(Forest::compile(&target), Err(ForestError::Target { target: 3, .. })));
        let shared = Spec { roots: vec![0, 0], ..spec() };
        assert!(matches!(Forest::compile(&shared), Err(ForestError::Cycle { tree: 1, .. })));
        assert_eq!(
            Forest::compile(&Spec { roots: vec![], ..spec() }),
            Err(ForestError::Empty("trees"))
        );
    }
}
