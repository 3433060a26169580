//! What a model answered, row by row, compared with another version's answer (shadow
//! agreement) or with the ground truth that arrives later (feedback accuracy and error).
//!
//! A row's [`Answer`] is read from the outputs the way a person reads a classifier or a
//! regressor: the first output of labels (integers, strings, booleans) gives each row's
//! label; without one, the first floating-point output gives each row's arg-max when a row
//! has several columns (class scores), or its value when it has one (a regression).

use serde::{Deserialize, Serialize};

use crate::metrics::Feedback;
use crate::tensor::{Tensor, TensorData};

/// Relative tolerance within which two regression values agree.
pub const VALUE_TOLERANCE: f64 = 1e-3;

/// One row's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    /// A class: a label output's value, or the index of the highest score, as text.
    Label(String),
    /// A regression value.
    Value(f64),
}

/// Rows and columns per row of a tensor (a rank-1 tensor has one column per row).
fn rows_and_width(t: &Tensor) -> Option<(usize, usize)> {
    let rows = usize::try_from(*t.shape.first()?).ok()?;
    let width = t.data.len().checked_div(rows)?;
    Some((rows, width))
}

/// A number as label text: integers without a fraction, so `2`, `2.0` and `"2"` match.
fn number_text(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 9.0e15 { format!("{}", x as i64) } else { format!("{x}") }
}

fn is_label(data: &TensorData) -> bool {
    !matches!(data, TensorData::Fp16(_) | TensorData::Fp32(_) | TensorData::Fp64(_))
}

fn label_at(data: &TensorData, i: usize) -> String {
    match data {
        TensorData::Bool(v) => v[i].to_string(),
        TensorData::Bytes(v) => String::from_utf8_lossy(&v[i]).into_owned(),
        other => number_text(other.to_f64()[i]),
    }
}

/// Each row's answer in `outputs`, or `None` when no output says one (or the rows of the
/// output read are not whole).
pub fn answers(outputs: &[Tensor]) -> Option<Vec<Answer>> {
    if let Some(labels) = outputs.iter().find(|t| is_label(&t.data)) {
        let (rows, width) = rows_and_width(labels)?;
        return (width == 1)
            .then(|| (0..rows).map(|r| Answer::Label(label_at(&labels.data, r))).collect());
    }
    let scores = outputs.first()?;
    let (rows, width) = rows_and_width(scores)?;
    let values = scores.data.to_f64();
    Some(
        (0..rows)
            .map(|r| {
                let row = &values[r * width..(r + 1) * width];
                match width {
                    1 => Answer::Value(row[0]),
                    _ => Answer::Label(arg_max(row).to_string()),
                }
            })
            .collect(),
    )
}

/// The index of the highest value (the first of ties; NaN never wins).
fn arg_max(row: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] || row[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Whether two rows of one output agree: labels equal, scores with the same arg-max, a
/// single value within [`VALUE_TOLERANCE`] (relative; absolute below 1).
fn rows_agree(a: &TensorData, b: &TensorData, row: usize, width: usize) -> bool {
    let range = row * width..(row + 1) * width;
    if is_label(a) || is_label(b) {
        return range.clone().all(|i| label_at(a, i) == label_at(b, i));
    }
    let (x, y) = (a.to_f64(), b.to_f64());
    let (x, y) = (&x[range.clone()], &y[range]);
    if width == 1 {
        (x[0] - y[0]).abs() <= VALUE_TOLERANCE * x[0].abs().max(y[0].abs()).max(1.0)
    } else {
        arg_max(x) == arg_max(y)
    }
}

/// Rows compared and rows on which two versions agreed: a row agrees when it agrees in
/// every output both versions have (by name) with the same shape. Outputs of different
/// shapes are not compared; with no output in common nothing is.
pub fn agreement(baseline: &[(&str, &Tensor)], candidate: &[(&str, &Tensor)]) -> (u64, u64) {
    let pairs: Vec<(&Tensor, &Tensor)> = baseline
        .iter()
        .filter_map(|(name, a)| {
            let (_, b) = candidate.iter().find(|(n, _)| n == name)?;
            (a.shape == b.shape && a.data.len() == b.data.len()).then_some((*a, *b))
        })
        .collect();
    let Some(rows) = pairs.first().and_then(|(a, _)| rows_and_width(a)).map(|(r, _)| r) else {
        return (0, 0);
    };
    let agreed = (0..rows)
        .filter(|&row| {
            pairs.iter().all(|(a, b)| {
                rows_and_width(a)
                    .is_some_and(|(n, width)| n == rows && rows_agree(&a.data, &b.data, row, width))
            })
        })
        .count();
    (rows as u64, agreed as u64)
}

/// A ground-truth label as a client sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Label {
    /// A number: a class index or label, or a regression target.
    Number(f64),
    /// A class label.
    Text(String),
    /// A boolean class.
    Bool(bool),
}

/// Why a label could not be joined to an answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label {label} cannot be scored against a regression value")]
pub struct Unscorable {
    /// The label.
    pub label: String,
}

/// The feedback of `labels` on `answers`, row by row: a class is right or wrong, a value
/// is off by its absolute error.
pub fn score(answers: &[Answer], labels: &[Label]) -> Result<Feedback, Unscorable> {
    let mut feedback = Feedback::default();
    for (answer, label) in answers.iter().zip(labels) {
        feedback.labelled += 1;
        match (answer, label) {
            (Answer::Label(a), Label::Number(x)) => {
                feedback.correct += u64::from(*a == number_text(*x));
            }
            (Answer::Label(a), Label::Text(t)) => feedback.correct += u64::from(a == t),
            (Answer::Label(a), Label::Bool(b)) => {
                feedback.correct += u64::from(*a == b.to_string());
            }
            (Answer::Value(v), Label::Number(x)) => feedback.abs_error += (v - x).abs(),
            (Answer::Value(_), other) => {
                return Err(Unscorable { label: serde_json::to_string(other).unwrap_or_default() });
            }
        }
    }
    Ok(feedback)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[u64], data: impl Into<TensorData>) -> Tensor {
        Tensor { shape: shape.to_vec(), data: data.into() }
    }

    #[test]
    fn answers_come_from_labels_else_scores_else_values() {
        let labels = t(&[2], vec![3i64, 0]);
        let probs = t(&[2, 3], vec![0.1f32, 0.7, 0.2, 0.5, 0.2, 0.3]);
        assert_eq!(
            answers(&[probs.clone(), labels]).unwrap(),
            [Answer::Label("3".into()), Answer::Label("0".into())]
        );
        assert_eq!(
            answers(std::slice::from_ref(&probs)).unwrap(),
            [Answer::Label("1".into()), Answer::Label("0".into())]
        );
        let values = t(&[2, 1], vec![1.5f64, -2.0]);
        assert_eq!(answers(&[values]).unwrap(), [Answer::Value(1.5), Answer::Value(-2.0)]);
        let names = t(&[1], vec![b"cat".to_vec()]);
        assert_eq!(answers(&[names]).unwrap(), [Answer::Label("cat".into())]);
        assert_eq!(answers(&[]), None);
    }

    #[test]
    fn agreement_counts_rows_that_agree_in_every_common_output() {
        let probs_a = t(&[3, 2], vec![0.9f32, 0.1, 0.4, 0.6, 0.5, 0.5]);
        let probs_b = t(&[3, 2], vec![0.6f32, 0.4, 0.7, 0.3, 0.5, 0.5]);
        let label_a = t(&[3], vec![0i64, 1, 0]);
        let label_b = t(&[3], vec![0i64, 0, 1]);
        let a = [("probabilities", &probs_a), ("label", &label_a)];
        let b = [("label", &label_b), ("probabilities", &probs_b)];
        // Row 0 agrees everywhere; row 1 differs in both; row 2's scores tie the same way
        // but its labels differ.
        assert_eq!(agreement(&a, &b), (3, 1));
        assert_eq!(agreement(&a[..1], &b[1..]), (3, 2));
        let value_a = t(&[2, 1], vec![100.0f64, 0.5]);
        let value_b = t(&[2, 1], vec![100.05f64, 0.502]);
        assert_eq!(agreement(&[("y", &value_a)], &[("y", &value_b)]), (2, 1));
        assert_eq!(agreement(&[("y", &value_a)], &[("z", &value_b)]), (0, 0));
    }

    #[test]
    fn labels_score_classes_and_values() {
        let classes =
            [Answer::Label("2".into()), Answer::Label("cat".into()), Answer::Label("true".into())];
        let labels: Vec<Label> = serde_json::from_str(r#"[2.0, "dog", true]"#).unwrap();
        assert_eq!(
            score(&classes, &labels).unwrap(),
            Feedback { labelled: 3, correct: 2, abs_error: 0.0 }
        );
        let values = [Answer::Value(1.5), Answer::Value(-1.0)];
        let labels: Vec<Label> = serde_json::from_str("[1, 1]").unwrap();
        assert_eq!(
            score(&values, &labels).unwrap(),
            Feedback { labelled: 2, correct: 0, abs_error: 2.5 }
        );
        let err = score(&values, &[Label::Text("x".into())]).unwrap_err();
        assert_eq!(err.to_string(), "label \"x\" cannot be scored against a regression value");
    }
}
