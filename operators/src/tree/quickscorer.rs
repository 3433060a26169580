//! QuickScorer (Lucchese et al., SIGIR 2015): an ensemble of trees of at most 64 leaves
//! scored without walking any tree. Each tree keeps a 64-bit vector of the leaves a row
//! may still reach; every branch whose test is false for the row clears the leaves of its
//! true subtree, and the leaf reached is then the first bit left. Branches are grouped by
//! feature and sorted by threshold, so the false ones of a feature are a prefix of its
//! list: one scan per feature, stopping at the first true test, with no data-dependent
//! jumps from node to node. Missing values (NaN) take, for each branch, the direction its
//! flag says, from a list apart.
//!
//! Batches go through the row-blocked form (V-QuickScorer, Lucchese et al., SIGIR 2016):
//! [`BLOCK`] rows share one pass over the thresholds, each tree holding one leaf word per
//! row side by side, so that a test is one compare of a threshold against the block's
//! values and one masked AND of the tree's words, which the compiler turns into vector
//! instructions. A feature's scan stops at the block's largest value. The block scan
//! works on 32-bit words, sixteen to a 512-bit register: a tree of more than 32 leaves
//! keeps two (its leaves 0–31 and 32–63), and a test touches only the word its true
//! subtree lies in (both, listed twice, for a subtree across the middle), half the
//! memory traffic of one 64-bit word per tree.
//!
//! Used for forests whose branches all test `x <= t` (or all `x < t`), the layout of
//! gradient-boosted ensembles (XGBoost, LightGBM, scikit-learn's boosters).

/// Rows scored together by [`QuickScorer::block`]: [`BLOCK`] while more than
/// [`SHORT_BLOCK`] rows are left, then one block of those. Across a block the
/// per-test work (a threshold, a word index and a mask loaded, the compare broadcast) is
/// shared: blocks of 32 scored XGBoost's and LightGBM's ensembles 15–40 % faster than
/// blocks of 16; but a short block repeats its last row, and a block of 32 costs about
/// 1.3 times one of 16, which is what a batch of 2 to 16 rows then takes.
pub const BLOCK: usize = 32;
/// The block for the last rows of a batch, when 16 or fewer are left.
pub const SHORT_BLOCK: usize = 16;

/// Bytes of leaf words a block scan keeps hot: half of a 32 KiB L1 data cache.
const HOT_BYTES: usize = 16 * 1024;

/// Branch tests by feature, sorted by threshold, with the leaves each clears when false.
#[derive(Clone, Debug, PartialEq)]
pub struct QuickScorer {
    /// Columns read: tests are grouped by chunk of trees, then by feature.
    features: usize,
    /// Per group `g` (chunk `g / features`, feature `g % features`): its tests are
    /// `thresholds[starts[g]..starts[g + 1]]`.
    starts: Vec<u32>,
    thresholds: Vec<f32>,
    trees: Vec<u32>,
    masks: Vec<u64>,
    /// Per group: the tests a missing value makes false (`missing[missing_starts[g]..]`).
    missing_starts: Vec<u32>,
    missing: Vec<(u32, u64)>,
    /// The same tests, in the same groups, as the block scan takes them.
    block: BlockTests,
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

/// The tests on 32-bit leaf words: one word per tree when every tree has at most 32
/// leaves, else two (`halves`), a tree's word `2 × tree` holding its leaves 0–31 and
/// word `2 × tree + 1` its leaves 32–63. Each test is listed once per word its true
/// subtree touches, with that word's mask.
#[derive(Clone, Debug, PartialEq)]
struct BlockTests {
    halves: bool,
    starts: Vec<u32>,
    thresholds: Vec<f32>,
    words: Vec<u32>,
    masks: Vec<u32>,
    missing_starts: Vec<u32>,
    missing: Vec<(u32, u32)>,
}

impl BlockTests {
    fn new(halves: bool, groups: usize) -> Self {
        Self {
            halves,
            starts: Vec::with_capacity(groups + 1),
            thresholds: Vec::new(),
            words: Vec::new(),
            masks: Vec::new(),
            missing_starts: Vec::with_capacity(groups + 1),
            missing: Vec::new(),
        }
    }

    /// Tree `tree`'s words and their masks from its 64-bit `mask`, leaving out a word
    /// the mask does not touch.
    fn split(halves: bool, tree: u32, mask: u64) -> impl Iterator<Item = (u32, u32)> {
        let words: [(u32, u32); 2] = if halves {
            [(2 * tree, mask as u32), (2 * tree + 1, (mask >> 32) as u32)]
        } else {
            // A narrow tree's mask has every bit past its 32nd set: truncating drops only those.
            [(tree, mask as u32), (tree, u32::MAX)]
        };
        words.into_iter().filter(|&(_, m)| m != u32::MAX)
    }

    /// Starts the next group's lists (called once more after the last, it ends them).
    fn open(&mut self) {
        self.starts.push(self.thresholds.len() as u32);
        self.missing_starts.push(self.missing.len() as u32);
    }

    /// `test`, clearing the leaves `mask` leaves out, into the open group.
    fn push(&mut self, test: &Test, mask: u64) {
        for (word, m) in Self::split(self.halves, test.tree, mask) {
            self.thresholds.push(test.threshold);
            self.words.push(word);
            self.masks.push(m);
            if !test.missing_true {
                self.missing.push((word, m));
            }
        }
    }

    /// Words per tree.
    fn per_tree(&self) -> usize {
        if self.halves { 2 } else { 1 }
    }
}

/// Scratch for [`QuickScorer::block`]: the leaf words of every tree for one block of `B`
/// rows.
#[derive(Default)]
pub struct Scratch<const B: usize> {
    words: Vec<[u32; B]>,
    columns: Vec<[f32; B]>,
}

impl QuickScorer {
    /// The largest number of leaves a tree may have.
    pub const MAX_LEAVES: usize = 64;

    /// Builds the tables from every branch and, per tree, its leaves' nodes in true-first
    /// order; `None` when a threshold is NaN, or `-inf` under `x < t` (the block scan
    /// stands a missing value in as `-inf`, which must then fail no test).
    pub fn new(
        tests: &[Test],
        leaves_per_tree: &[Vec<u32>],
        features: usize,
        strict: bool,
    ) -> Option<Self> {
        if tests
            .iter()
            .any(|t| t.threshold.is_nan() || (strict && t.threshold == f32::NEG_INFINITY))
        {
            return None;
        }
        let narrow = leaves_per_tree.iter().all(|l| l.len() <= 32);
        // Trees in chunks whose leaf words for a block stay in the L1 cache while the
        // tests stream past; within a chunk, tests by feature, then threshold.
        let word = if narrow { 4 } else { 8 };
        let chunk = (HOT_BYTES / (BLOCK * word)).max(1);
        let chunks = leaves_per_tree.len().div_ceil(chunk).max(1);
        let group = |t: &Test| (t.tree as usize / chunk) * features + t.feature as usize;
        let mut sorted: Vec<&Test> = tests.iter().collect();
        sorted.sort_by(|a, b| group(a).cmp(&group(b)).then(a.threshold.total_cmp(&b.threshold)));
        let mask = |t: &Test| {
            let width = t.true_leaves.end - t.true_leaves.start;
            let bits =
                if width >= 64 { u64::MAX } else { ((1u64 << width) - 1) << t.true_leaves.start };
            !bits
        };
        let groups = chunks * features;
        let mut starts = vec![0u32; groups + 1];
        let mut missing_starts = vec![0u32; groups + 1];
        let (mut thresholds, mut trees, mut masks, mut missing) = (vec![], vec![], vec![], vec![]);
        let mut block = BlockTests::new(!narrow, groups);
        let mut at = 0;
        for g in 0..groups {
            starts[g] = thresholds.len() as u32;
            missing_starts[g] = missing.len() as u32;
            block.open();
            while at < sorted.len() && group(sorted[at]) == g {
                let t = sorted[at];
                thresholds.push(t.threshold);
                trees.push(t.tree);
                masks.push(mask(t));
                if !t.missing_true {
                    missing.push((t.tree, mask(t)));
                }
                block.push(t, mask(t));
                at += 1;
            }
        }
        starts[groups] = thresholds.len() as u32;
        missing_starts[groups] = missing.len() as u32;
        block.open();
        let mut tree_leaves = Vec::with_capacity(leaves_per_tree.len() + 1);
        let mut leaves = Vec::new();
        for l in leaves_per_tree {
            tree_leaves.push(leaves.len() as u32);
            leaves.extend(l);
        }
        tree_leaves.push(leaves.len() as u32);
        Some(Self {
            features,
            starts,
            thresholds,
            trees,
            masks,
            missing_starts,
            missing,
            block,
            tree_leaves,
            leaves,
            strict,
        })
    }

    /// Trees scored.
    pub fn trees(&self) -> usize {
        self.tree_leaves.len() - 1
    }

    /// Leaves of all trees: positions [`QuickScorer::block`] gives are below this.
    pub fn leaf_count(&self) -> usize {
        self.leaves.len()
    }

    /// The node index (in the forest's flat layout) of the leaf at `position`.
    pub fn leaf_node(&self, position: u32) -> u32 {
        self.leaves[position as usize]
    }

    /// Branch tests in all.
    pub fn tests(&self) -> usize {
        self.thresholds.len()
    }

    /// The leaf (its node index) each tree gives `row`, in tree order, into `out`;
    /// `bits` is scratch of one word per tree.
    pub fn leaves(&self, row: &[f32], bits: &mut [u64], out: &mut [u32]) {
        bits.fill(u64::MAX);
        for (g, w) in self.starts.windows(2).enumerate() {
            let x = row[g % self.features];
            if x.is_nan() {
                let (a, b) = (self.missing_starts[g] as usize, self.missing_starts[g + 1] as usize);
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

    /// For `B` rows at once ([`BLOCK`] or [`SHORT_BLOCK`]): `out[tree][lane]` is the
    /// position (see [`QuickScorer::leaf_node`]) of the leaf tree `tree` gives row
    /// `rows[lane]`. `out` is resized to one entry per tree.
    pub fn block<const B: usize>(
        &self,
        rows: &[&[f32]; B],
        scratch: &mut Scratch<B>,
        out: &mut Vec<[u32; B]>,
    ) {
        out.resize(self.trees(), [0; B]);
        if self.strict {
            block_kernel::<B, true>(self, rows, &mut scratch.words, &mut scratch.columns, out);
        } else {
            block_kernel::<B, false>(self, rows, &mut scratch.words, &mut scratch.columns, out);
        }
    }
}

/// The block scan, compiled for AVX-512 and AVX2 as well, chosen at run time.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
    "x86_64+avx2+fma"
))]
fn block_kernel<const B: usize, const STRICT: bool>(
    qs: &QuickScorer,
    rows: &[&[f32]; B],
    words: &mut Vec<[u32; B]>,
    columns: &mut Vec<[f32; B]>,
    out: &mut [[u32; B]],
) {
    scan::<B, STRICT>(qs, rows, words, columns, out);
}

/// The block scan, inlined into each target's compilation of [`block_kernel`].
#[allow(clippy::inline_always)]
#[inline(always)]
fn scan<const B: usize, const STRICT: bool>(
    qs: &QuickScorer,
    rows: &[&[f32]; B],
    words: &mut Vec<[u32; B]>,
    columns: &mut Vec<[f32; B]>,
    out: &mut [[u32; B]],
) {
    let tests = &qs.block;
    words.clear();
    words.resize(qs.trees() * tests.per_tree(), [u32::MAX; B]);
    // The block's columns, a missing value standing in as -inf: under either test, no
    // threshold is below it, and the missing list applies its tests apart.
    let features = qs.features;
    columns.resize(features, [0.0; B]);
    let mut any_missing = false;
    for (lane, row) in rows.iter().enumerate() {
        for (column, &v) in columns.iter_mut().zip(&row[..features]) {
            any_missing |= v.is_nan();
            column[lane] = if v.is_nan() { f32::NEG_INFINITY } else { v };
        }
    }
    for (g, w) in tests.starts.windows(2).enumerate() {
        let (a, b) = (w[0] as usize, w[1] as usize);
        let f = g % features;
        // A copy on the stack: the compiler then knows no store to `words` changes it.
        let xs: [f32; B] = columns[f];
        let top = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let thresholds = &tests.thresholds[a..b];
        let end = if STRICT {
            thresholds.partition_point(|&t| t <= top)
        } else {
            thresholds.partition_point(|&t| t < top)
        };
        for ((&t, &word), &mask) in
            thresholds[..end].iter().zip(&tests.words[a..a + end]).zip(&tests.masks[a..a + end])
        {
            let lanes = &mut words[word as usize];
            for (lane, &x) in lanes.iter_mut().zip(&xs) {
                let fails = if STRICT { t <= x } else { t < x };
                *lane &= if fails { mask } else { u32::MAX };
            }
        }
        if any_missing && xs.contains(&f32::NEG_INFINITY) {
            let (a, b) = (tests.missing_starts[g] as usize, tests.missing_starts[g + 1] as usize);
            for (lane, row) in rows.iter().enumerate() {
                if row[f].is_nan() {
                    for &(word, mask) in &tests.missing[a..b] {
                        words[word as usize][lane] &= mask;
                    }
                }
            }
        }
    }
    // The leaf reached is the first left, of the tree's one word or two.
    if tests.halves {
        for ((o, pair), &first) in out.iter_mut().zip(words.chunks_exact(2)).zip(&qs.tree_leaves) {
            for (lane, o) in o.iter_mut().enumerate() {
                let word = u64::from(pair[1][lane]) << 32 | u64::from(pair[0][lane]);
                *o = first + word.trailing_zeros();
            }
        }
    } else {
        for ((o, lanes), &first) in out.iter_mut().zip(words.iter()).zip(&qs.tree_leaves) {
            for (o, &word) in o.iter_mut().zip(lanes) {
                *o = first + word.trailing_zeros();
            }
        }
    }
}
