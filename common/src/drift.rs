//! Drift between a reference distribution and observed data, both as counts over the same
//! bins (the bins of a bundle's reference profile).
//!
//! - Population Stability Index: `Σ (o − r) ln(o / r)` over bin proportions, with
//!   proportions floored at [`EPSILON`] so empty bins do not make it infinite. Rules of
//!   thumb: under 0.1 stable, 0.1 to 0.25 moderate, above 0.25 significant.
//! - Kolmogorov–Smirnov statistic on the binned distributions: the largest distance between
//!   the two cumulative distributions over the bins, in `[0, 1]`.
//! - Jensen–Shannon distance with base-2 logarithms: the square root of the JS divergence,
//!   in `[0, 1]` (as `scipy.spatial.distance.jensenshannon(p, q, base=2)`).

use serde::{Deserialize, Serialize};

/// Floor on bin proportions in the PSI.
pub const EPSILON: f64 = 1e-4;

/// The three scores for one column.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DriftScores {
    /// Population Stability Index.
    pub psi: f64,
    /// Kolmogorov–Smirnov statistic on the bins.
    pub ks: f64,
    /// Jensen–Shannon distance (base 2).
    pub js: f64,
}

fn proportions(counts: &[u64]) -> Option<Vec<f64>> {
    let total: u64 = counts.iter().sum();
    (total > 0).then(|| counts.iter().map(|&c| c as f64 / total as f64).collect())
}

/// Scores `observed` against `reference` (counts over the same bins). `None` when the bins
/// differ in number or either side is empty.
pub fn scores(reference: &[u64], observed: &[u64]) -> Option<DriftScores> {
    if reference.len() != observed.len() {
        return None;
    }
    let p = proportions(reference)?;
    let q = proportions(observed)?;
    let psi = p
        .iter()
        .zip(&q)
        .map(|(&r, &o)| {
            let (r, o) = (r.max(EPSILON), o.max(EPSILON));
            (o - r) * (o / r).ln()
        })
        .sum();
    let (mut cp, mut cq, mut ks) = (0.0f64, 0.0f64, 0.0f64);
    for (&r, &o) in p.iter().zip(&q) {
        cp += r;
        cq += o;
        ks = ks.max((cp - cq).abs());
    }
    let kl = |a: &[f64], m: &[f64]| -> f64 {
        a.iter().zip(m).filter(|(x, _)| **x > 0.0).map(|(&x, &y)| x * (x / y).log2()).sum()
    };
    let m: Vec<f64> = p.iter().zip(&q).map(|(&a, &b)| f64::midpoint(a, b)).collect();
    let js = f64::midpoint(kl(&p, &m), kl(&q, &m)).max(0.0).sqrt();
    Some(DriftScores { psi, ks, js })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }

    #[test]
    fn hand_computed_case() {
        // p = [.1 .2 .3 .4], q = [.4 .3 .2 .1]:
        // PSI = .3 ln 4 + .1 ln 1.5 + .1 ln 1.5 + .3 ln 4 = 0.912869...; KS = |.1-.4 + .2-.3| = .4.
        let s = scores(&[10, 20, 30, 40], &[40, 30, 20, 10]).unwrap();
        close(s.psi, 0.6 * 4f64.ln() + 0.2 * 1.5f64.ln());
        close(s.ks, 0.4);
    }

    #[test]
    fn agrees_with_numpy_and_scipy() {
        // Numbers from numpy (PSI with the same floor, KS on cumulative sums) and
        // scipy.spatial.distance.jensenshannon(p, q, base=2), scipy 1.17.1 and numpy 2.4.6, on
        // the same counts.
        let s = scores(&[10, 20, 30, 40], &[40, 30, 20, 10]).unwrap();
        close(s.psi, 0.912_869_638_293_567_3);
        close(s.ks, 0.4);
        close(s.js, 0.391_868_160_647_155_2);
        let s = scores(&[5, 0, 15, 30, 50], &[7, 3, 12, 33, 45]).unwrap();
        close(s.psi, 0.192_094_178_441_092_03);
        close(s.ks, 0.05);
        close(s.js, 0.137_395_887_188_727_5);
    }

    #[test]
    fn identical_distributions_score_zero_and_mismatches_none() {
        let s = scores(&[3, 0, 7], &[30, 0, 70]).unwrap();
        close(s.psi, 0.0);
        close(s.ks, 0.0);
        close(s.js, 0.0);
        assert!(scores(&[1, 2], &[1, 2, 3]).is_none());
        assert!(scores(&[0, 0], &[1, 2]).is_none());
    }
}
