//! QuickScorer (Lucchese et al., SIGIR 2015): an ensemble of trees of at most 64 leaves
//! scored without walking any tree. Each tree keeps a 64-bit vector of the leaves a row
//! may still reach; every branch whose test is false for the row clears the leaves of its
//! true subtree, and the leaf reached is then the first bit left. Branches are grouped by
//! feature and sorted by threshold, so the false ones of a feature are a prefix of its
//! list: one scan per feature, stopping at the first true test, with no data-dependent
//! jumps from node to node. Missing values (NaN) take, for each branch, the direction its
//! flag says, from a list apart.
//!
//! Used for forests whose branches all test `x <= t` (or all `x < t`), the layout of
//! gradient-boosted ensembles (XGBoost, LightGBM, scikit-learn's boosters).

/// Branch tests by feature, sorted by threshold, with the leaves each clears when false.
#[derive(Clone, Debug, PartialEq)]
pub struct QuickScorer {
    /// Per feature: its tests are `thresholds[starts[f]..starts[f + 1]]`.
    starts: Vec<u32>,
    thresholds: Vec<f32>,
    trees: Vec<u32>,
    masks: Vec<u64>,
    /// Per feature: the tests a missing value makes false (`missing[missing_starts[f]..]`).
    missing_starts: Vec<u32>,
    missing: Vec<(u32, u64)>,
    /// Per tree: where its leaves start in `leaves`, in true-first order.
    tree_leaves: Vec<u32>,
    /// A leaf's node index in the flat layout.
    leaves: Vec<u32>,
    /// `x < t` tests (false when `t <= x`) rather than `x <= t` (false when `t < x`).
    strict: bool,
}

/// One branch, as the forest's layout gives it.
#[derive(Clone, Debug)]
pub struct Test {
    /// The tree.
    pub tree: u32,
    /// Feature read.
    pub feature: u32,
    /// Threshold.
    pub threshold: f32,
    /// Whether a missing value takes the true branch.
    pub missing_true: bool,
    /// The true subtree's leaves, as a range of the tree's leaf indices.
    pub true_leaves: std::ops::Range<u32>,
}

impl QuickScorer {
    /// The largest number of leaves a tree may have.
    pub const MAX_LEAVES: usize = 64;

    /// Builds the tables from every branch and, per tree, its leaves' nodes in true-first
    /// order.
    pub fn new(
        tests: &[Test],
        leaves_per_tree: &[Vec<u32>],
        features: usize,
        strict: bool,
    ) -> Self {
        let mut sorted: Vec<&Test> = tests.iter().collect();
        sorted.sort_by(|a, b| a.feature.cmp(&b.feature).then(a.threshold.total_cmp(&b.threshold)));
        let mask = |t: &Test| {
            let width = t.true_leaves.end - t.true_leaves.start;
            let bits =
                if width >= 64 { u64::MAX } else { ((1u64 << width) - 1) << t.true_leaves.start };
            !bits
        };
        let mut starts = vec![0u32; features + 1];
        let mut missing_starts = vec![0u32; features + 1];
        let (mut thresholds, mut trees, mut masks, mut missing) = (vec![], vec![], vec![], vec![]);
        let mut at = 0;
        for f in 0..features {
            starts[f] = thresholds.len() as u32;
            missing_starts[f] = missing.len() as u32;
            while at < sorted.len() && sorted[at].feature as usize == f {
                let t = sorted[at];
                thresholds.push(t.threshold);
                trees.push(t.tree);
                masks.push(mask(t));
                if !t.missing_true {
                    missing.push((t.tree, mask(t)));
                }
                at += 1;
            }
        }
        starts[features] = thresholds.len() as u32;
        missing_starts[features] = missing.len() as u32;
        let mut tree_leaves = Vec::with_capacity(leaves_per_tree.len() + 1);
        let mut leaves = Vec::new();
        for l in leaves_per_tree {
            tree_leaves.push(leaves.len() as u32);
            leaves.extend(l);
        }
        tree_leaves.push(leaves.len() as u32);
        Self {
            starts,
            thresholds,
            trees,
            masks,
            missing_starts,
            missing,
            tree_leaves,
            leaves,
            strict,
        }
    }

    /// The leaf (its node index) each tree gives `row`, in tree order, into `out`;
    /// `bits` is scratch of one word per tree.
    pub fn leaves(&self, row: &[f32], bits: &mut [u64], out: &mut [u32]) {
        bits.fill(u64::MAX);
        for (f, w) in self.starts.windows(2).enumerate() {
            let x = row[f];
            if x.is_nan() {
                let (a, b) = (self.missing_starts[f] as usize, self.missing_starts[f + 1] as usize);
                for &(tree, mask) in &self.missing[a..b] {
                    bits[tree as usize] &= mask;
                }
                continue;
            }
            let (a, b) = (w[0] as usize, w[1] as usize);
            let thresholds = &self.thresholds[a..b];
            // The false tests: thresholds below x (at or below, for `x < t` tests).
            let false_tests = if self.strict {
                thresholds.partition_point(|&t| t <= x)
            } else {
                thresholds.partition_point(|&t| t < x)
            };
            for (&tree, &mask) in
                self.trees[a..a + false_tests].iter().zip(&self.masks[a..a + false_tests])
            {
                bits[tree as usize] &= mask;
            }
        }
        for (tree, (o, &b)) in out.iter_mut().zip(bits.iter()).enumerate() {
            let first = self.tree_leaves[tree] + b.trailing_zeros();
            *o = self.leaves[first as usize];
        }
    }
}
