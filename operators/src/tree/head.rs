//! What turns a forest's aggregated scores into the operator's outputs: base values,
//! averaging, the post-transform, and for classifiers the label and the binary layouts,
//! with ONNX Runtime's rules for the cases the ONNX specification leaves open (two
//! classes with weights on one, one or two base values).

use super::forest::{Aggregate, Scores};
use crate::post::{Post, Second, binary_pair};

/// A regressor's (or TreeEnsemble's) head.
#[derive(Clone, Debug, PartialEq)]
pub struct Regression {
    /// `base_values`, added per target (or, one value for one target).
    pub base: Vec<f32>,
    pub post: Post,
    /// How trees combine (averaging divides by `trees`).
    pub aggregate: Aggregate,
    /// Trees in the forest.
    pub trees: usize,
}

impl Regression {
    /// Final scores, `rows × targets`.
    pub fn finish(&self, scores: Scores) -> Vec<f32> {
        let Scores { mut values, has, targets } = scores;
        let n = self.trees as f32;
        if targets == 1 {
            let origin = if self.base.len() == 1 { self.base[0] } else { 0.0 };
            for (v, has) in values.iter_mut().zip(&has) {
                *v = match self.aggregate {
                    Aggregate::Sum => *v + origin,
                    Aggregate::Average => *v / n + origin,
                    Aggregate::Min | Aggregate::Max if *has => *v + origin,
                    Aggregate::Min | Aggregate::Max => origin,
                };
                if self.post == Post::Probit {
                    *v = crate::post::probit(*v);
                }
            }
            return values;
        }
        let base = (self.base.len() == targets).then_some(&self.base);
        for (row, has) in values.chunks_mut(targets).zip(has.chunks(targets)) {
            for (t, v) in row.iter_mut().enumerate() {
                let b = base.map_or(0.0, |b| b[t]);
                *v = match self.aggregate {
                    Aggregate::Sum => *v + b,
                    Aggregate::Average => *v / n + b,
                    Aggregate::Min | Aggregate::Max if has[t] => *v + b,
                    Aggregate::Min | Aggregate::Max => b,
                };
            }
            self.post.apply(row);
        }
        values
    }
}

/// A classifier's head.
#[derive(Clone, Debug, PartialEq)]
pub struct Classification {
    /// `base_values`.
    pub base: Vec<f32>,
    pub post: Post,
    /// Classes (labels declared).
    pub classes: usize,
    /// Two classes, and leaves weigh only one of them.
    pub binary_case: bool,
    /// No leaf weight is negative (scores are then probabilities).
    pub all_positive: bool,
}

/// A row's label: a class index, or for the two-class case ONNX Runtime's literal 0 or 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Label {
    /// Index into the class labels.
    Class(usize),
    /// The value 0 or 1 itself (an index into string labels).
    Literal(i64),
}

impl Classification {
    /// Final labels and scores (`rows × classes`).
    pub fn finish(&self, scores: Scores) -> (Vec<Label>, Vec<f32>) {
        let Scores { mut values, mut has, targets } = scores;
        let rows = values.len() / targets.max(1);
        let mut labels = Vec::with_capacity(rows);
        if self.classes > 2 {
            for (row, has) in values.chunks_mut(targets).zip(has.chunks_mut(targets)) {
                for (k, &b) in self.base.iter().enumerate().take(targets) {
                    row[k] = if has[k] { row[k] + b } else { b };
                    has[k] = true;
                }
                labels.push(Label::Class(argmax_scored(row, has)));
                self.post.apply(row);
            }
            return (labels, values);
        }
        let mut out = vec![0.0; rows * 2];
        for ((row, has), z) in values.chunks(2).zip(has.chunks(2)).zip(out.chunks_mut(2)) {
            let (label, pair) = self.binary(row, has);
            labels.push(label);
            z.copy_from_slice(&pair);
        }
        (labels, out)
    }

    fn binary(&self, row: &[f32], has: &[bool]) -> (Label, [f32; 2]) {
        let (mut s0, mut s1) = (row[0], row[1]);
        let (has0, mut has1) = (has[0], has[1]);
        let mut second = Second::None;
        let mut kept_second = true;
        match self.base.len() {
            2 if has1 => {
                s1 += self.base[1];
                s0 = -s1;
                has1 = true;
            }
            2 => {
                s1 += self.base[1];
                s0 += self.base[0];
            }
            1 => {
                s0 += self.base[0];
                kept_second = has1;
            }
            0 => {
                second = Second::Negate;
                kept_second = has1;
            }
            _ => kept_second = has1,
        }
        let (p1, h1) = if kept_second && has1 { (s1, true) } else { (0.0, false) };
        let pos_weight = if h1 {
            p1
        } else if has0 {
            s0
        } else {
            0.0
        };
        let label = if self.binary_case {
            let (positive, kind) = if self.all_positive {
                (pos_weight > 0.5, Second::Complement)
            } else {
                (pos_weight > 0.0, Second::Negate)
            };
            second = kind;
            Label::Class(usize::from(positive))
        } else {
            Label::Literal(i64::from(pos_weight > 0.0))
        };
        let pair = if kept_second {
            let mut both = [s0, s1];
            self.post.apply(&mut both);
            both
        } else {
            binary_pair(s0, self.post, second)
        };
        (label, pair)
    }
}

/// The first greatest score among those a tree gave (0 when none was).
fn argmax_scored(row: &[f32], has: &[bool]) -> usize {
    let mut best: Option<(usize, f32)> = None;
    for (k, (&v, &h)) in row.iter().zip(has).enumerate() {
        if h && best.is_none_or(|(_, b)| v > b) {
            best = Some((k, v));
        }
    }
    best.map_or(0, |(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(values: Vec<f32>, has: Vec<bool>, targets: usize) -> Scores {
        Scores { values, has, targets }
    }

    #[test]
    fn regression_adds_bases_averages_and_transforms() {
        let head = Regression {
            base: vec![1.0],
            post: Post::None,
            aggregate: Aggregate::Average,
            trees: 4,
        };
        assert_eq!(head.finish(scores(vec![8.0, 4.0], vec![true; 2], 1)), vec![3.0, 2.0]);
        let head = Regression {
            base: vec![0.5, 0.0],
            post: Post::Softmax,
            aggregate: Aggregate::Sum,
            trees: 1,
        };
        let out = head.finish(scores(vec![0.5, 1.0], vec![true; 2], 2));
        assert!((out[0] - 0.5).abs() < 1e-6 && (out[1] - 0.5).abs() < 1e-6);
        let head =
            Regression { base: vec![2.0], post: Post::None, aggregate: Aggregate::Min, trees: 1 };
        assert_eq!(head.finish(scores(vec![f32::INFINITY], vec![false], 1)), vec![2.0]);
    }

    #[test]
    fn multiclass_takes_the_highest_scored_class() {
        let head = Classification {
            base: vec![0.0, 0.0, 5.0],
            post: Post::None,
            classes: 3,
            binary_case: false,
            all_positive: true,
        };
        let (labels, z) = head.finish(scores(
            vec![1.0, 2.0, 0.0, 3.0, 1.0, 0.0],
            vec![true, true, false, true, true, false],
            3,
        ));
        assert_eq!(labels, vec![Label::Class(2), Label::Class(2)]);
        assert_eq!(z, vec![1.0, 2.0, 5.0, 3.0, 1.0, 5.0]);
    }

    #[test]
    fn binary_margins_and_probabilities() {
        // Gradient boosting: one margin on class 0, one base value, logistic.
        let head = Classification {
            base: vec![0.5],
            post: Post::Logistic,
            classes: 2,
            binary_case: true,
            all_positive: false,
        };
        let (labels, z) =
            head.finish(scores(vec![1.0, 0.0, -2.0, 0.0], vec![true, false, true, false], 2));
        assert_eq!(labels, vec![Label::Class(1), Label::Class(0)]);
        let p = crate::post::logistic(1.5);
        assert!((z[1] - p).abs() < 1e-6 && (z[0] - (1.0 - p)).abs() < 1e-6);
        // A forest voting probabilities for class 1 only.
        let head = Classification {
            base: vec![],
            post: Post::None,
            classes: 2,
            binary_case: true,
            all_positive: true,
        };
        let (labels, z) = head.finish(scores(vec![0.0, 0.7], vec![false, true], 2));
        assert_eq!(labels, vec![Label::Class(1)]);
        assert_eq!(z, vec![0.0, 0.7], "both columns as scored");
        // Both classes weighted: ONNX Runtime's literal 0/1 label.
        let head = Classification {
            base: vec![],
            post: Post::None,
            classes: 2,
            binary_case: false,
            all_positive: true,
        };
        let (labels, z) = head.finish(scores(vec![0.4, 0.6], vec![true, true], 2));
        assert_eq!(labels, vec![Label::Literal(1)]);
        assert_eq!(z, vec![0.4, 0.6]);
    }
}
