//! Reference data profiles: per-column histograms of the data a model was built for.
//!
//! A bundle may carry one, computed by the control plane from a reference dataset and the
//! model's own predictions on it. Agents later bin live traffic into the same bins, so that
//! drift is a comparison of two histograms with identical edges.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Default number of bins for a continuous column.
pub const DEFAULT_BINS: usize = 10;
/// A column with at most this many distinct integer values is profiled as categories.
pub const MAX_CATEGORIES: usize = 32;

/// Histograms of a model's inputs and outputs over a reference dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataProfile {
    /// Rows in the reference dataset.
    pub rows: u64,
    /// One profile per input feature.
    pub inputs: Vec<ColumnProfile>,
    /// One profile per output column (predictions on the reference rows).
    pub outputs: Vec<ColumnProfile>,
}

/// The profile of one column: one position along the last axis of a tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnProfile {
    /// The tensor (input or output) the column belongs to.
    pub tensor: String,
    /// The column's index along the tensor's last axis (0 for a 1-D tensor).
    pub index: u32,
    /// A human name (a CSV header, or `tensor[index]`).
    pub name: String,
    /// Summary statistics over the non-missing values.
    pub summary: Summary,
    /// The histogram.
    pub histogram: Histogram,
}

/// Summary statistics of a column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Summary {
    /// Non-missing values.
    pub count: u64,
    /// Missing values (NaN, empty cells).
    pub missing: u64,
    /// Smallest value (0 when `count` is 0).
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub std: f64,
}

/// A histogram with its own bins, so that live data can be binned identically.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Histogram {
    /// Continuous values: `counts[i]` holds values in `(edges[i-1], edges[i]]`, with the
    /// first bin open below and the last open above, so `counts.len() == edges.len() + 1`.
    Bins {
        /// Increasing inner edges, at the reference data's quantiles.
        edges: Vec<f64>,
        /// Counts per bin.
        counts: Vec<u64>,
    },
    /// Discrete values (class labels, flags): a count per value, the rest in `other`.
    Categories {
        /// The values seen, increasing.
        values: Vec<i64>,
        /// Counts per value.
        counts: Vec<u64>,
        /// Values not among `values`.
        other: u64,
    },
}

impl Histogram {
    /// The bin `value` falls into (`NaN` has no bin). For categories, the bin past the
    /// last value is `other`.
    pub fn bin(&self, value: f64) -> Option<usize> {
        if value.is_nan() {
            return None;
        }
        Some(match self {
            Self::Bins { edges, .. } => edges.partition_point(|&e| e < value),
            Self::Categories { values, .. } => {
                let exact = value.fract() == 0.0;
                exact
                    .then(|| values.binary_search(&(value as i64)).ok())
                    .flatten()
                    .unwrap_or(values.len())
            }
        })
    }

    /// Number of bins, counting `other` for categories.
    pub fn bin_count(&self) -> usize {
        match self {
            Self::Bins { counts, .. } => counts.len(),
            Self::Categories { counts, .. } => counts.len() + 1,
        }
    }

    /// The counts, with `other` last for categories.
    pub fn all_counts(&self) -> Vec<u64> {
        match self {
            Self::Bins { counts, .. } => counts.clone(),
            Self::Categories { counts, other, .. } => {
                counts.iter().copied().chain(std::iter::once(*other)).collect()
            }
        }
    }
}

impl Summary {
    fn of(values: &[f64], missing: u64) -> Self {
        let count = values.len() as u64;
        if values.is_empty() {
            return Self { count, missing, min: 0.0, max: 0.0, mean: 0.0, std: 0.0 };
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let (min, max) = values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        Self { count, missing, min, max, mean, std: var.sqrt() }
    }
}

impl ColumnProfile {
    /// Profiles one column. Integer-valued columns with few distinct values become
    /// categories; others get up to `bins` bins with edges at quantiles.
    pub fn of(tensor: &str, index: u32, name: &str, values: &[f64], bins: usize) -> Self {
        let mut present: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        let missing = (values.len() - present.len()) as u64;
        let summary = Summary::of(&present, missing);
        present.sort_by(f64::total_cmp);
        let histogram = categories(&present).unwrap_or_else(|| quantile_bins(&present, bins));
        Self { tensor: tensor.to_owned(), index, name: name.to_owned(), summary, histogram }
    }
}

fn categories(sorted: &[f64]) -> Option<Histogram> {
    let mut counts = BTreeMap::<i64, u64>::new();
    for &v in sorted {
        if v.fract() != 0.0 || v.abs() > 9.0e15 {
            return None;
        }
        *counts.entry(v as i64).or_default() += 1;
        if counts.len() > MAX_CATEGORIES {
            return None;
        }
    }
    Some(Histogram::Categories {
        values: counts.keys().copied().collect(),
        counts: counts.values().copied().collect(),
        other: 0,
    })
}

fn quantile_bins(sorted: &[f64], bins: usize) -> Histogram {
    let mut edges: Vec<f64> = Vec::with_capacity(bins.saturating_sub(1));
    if !sorted.is_empty() {
        for k in 1..bins.max(1) {
            let at = (k * (sorted.len() - 1)) / bins;
            let edge = sorted[at];
            if edges.last().is_none_or(|&last| edge > last) {
                edges.push(edge);
            }
        }
    }
    let mut counts = vec![0u64; edges.len() + 1];
    for &v in sorted {
        counts[edges.partition_point(|&e| e < v)] += 1;
    }
    Histogram::Bins { edges, counts }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_bins_split_evenly_and_bin_consistently() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let col = ColumnProfile::of("x", 0, "x", &values, 4);
        let Histogram::Bins { edges, counts } = &col.histogram else { panic!("{col:?}") };
        assert_eq!(edges, &[25.0, 50.0, 75.0]);
        assert_eq!(counts, &[25, 25, 25, 25]);
        assert_eq!(col.histogram.bin(25.0), Some(0));
        assert_eq!(col.histogram.bin(25.5), Some(1));
        assert_eq!(col.histogram.bin(-1e9), Some(0));
        assert_eq!(col.histogram.bin(1e9), Some(3));
        assert_eq!(col.histogram.bin(f64::NAN), None);
        assert_eq!(col.summary.count, 100);
        assert!((col.summary.mean - 50.5).abs() < 1e-12);
    }

    #[test]
    fn few_integer_values_become_categories() {
        let values = [0.0, 1.0, 1.0, 2.0, 2.0, 2.0, f64::NAN];
        let col = ColumnProfile::of("label", 0, "label", &values, 10);
        assert_eq!(
            col.histogram,
            Histogram::Categories { values: vec![0, 1, 2], counts: vec![1, 2, 3], other: 0 }
        );
        assert_eq!(col.summary.missing, 1);
        assert_eq!(col.histogram.bin(2.0), Some(2));
        assert_eq!(col.histogram.bin(7.0), Some(3));
        assert_eq!(col.histogram.bin(1.5), Some(3));
        assert_eq!(col.histogram.all_counts(), vec![1, 2, 3, 0]);
    }

    #[test]
    fn repeated_values_give_fewer_distinct_edges() {
        let mut values = vec![0.5; 90];
        values.extend((0..10).map(|i| 10.0 + f64::from(i) + 0.25));
        let col = ColumnProfile::of("x", 0, "x", &values, 10);
        let Histogram::Bins { edges, counts } = &col.histogram else { panic!() };
        assert!(edges.windows(2).all(|w| w[0] < w[1]), "{edges:?}");
        assert_eq!(counts.iter().sum::<u64>(), 100);
        assert_eq!(counts[0], 90);
    }

    #[test]
    fn empty_column_is_one_empty_bin() {
        let col = ColumnProfile::of("x", 0, "x", &[f64::NAN], 10);
        assert_eq!(
            col.histogram,
            Histogram::Categories { values: vec![], counts: vec![], other: 0 }
        );
        assert_eq!(col.summary.missing, 1);
    }
}
