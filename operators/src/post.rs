//! The post-transforms the ONNX-ML classifiers and regressors share (`post_transform`),
//! and how a binary model's single score becomes two columns, computed as ONNX Runtime
//! computes them so that scores agree to rounding.

/// `post_transform`: applied to a row's scores once they are aggregated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Post {
    /// Scores as they are.
    None,
    /// Softmax over the row.
    Softmax,
    /// 1 / (1 + e^-x) per score.
    Logistic,
    /// Softmax over the row's non-zero scores; zeros stay zero.
    SoftmaxZero,
    /// The inverse of the normal distribution's CDF, per score.
    Probit,
}

impl Post {
    /// Parses the attribute's string form (TreeEnsembleClassifier, LinearClassifier, ...).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "NONE" => Self::None,
            "SOFTMAX" => Self::Softmax,
            "LOGISTIC" => Self::Logistic,
            "SOFTMAX_ZERO" => Self::SoftmaxZero,
            "PROBIT" => Self::Probit,
            _ => return None,
        })
    }

    /// Parses the integer form of TreeEnsemble (ai.onnx.ml opset 5).
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => Self::None,
            1 => Self::Softmax,
            2 => Self::Logistic,
            3 => Self::SoftmaxZero,
            4 => Self::Probit,
            _ => return None,
        })
    }

    /// Applies the transform to one row of two or more scores, in place.
    pub fn apply(self, row: &mut [f32]) {
        match self {
            Self::None => {}
            Self::Logistic => {
                for v in row {
                    *v = logistic(*v);
                }
            }
            Self::Probit => {
                for v in row {
                    *v = probit(*v);
                }
            }
            Self::Softmax => softmax(row),
            Self::SoftmaxZero => softmax_zero(row),
        }
    }
}

/// How a binary model's one score fills its two columns (ONNX Runtime's
/// `add_second_class`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Second {
    /// Only the one score (the second column stays 0).
    None,
    /// `[1 - s, s]`: weights are all positive, so `s` is a probability.
    Complement,
    /// `[-s, s]`, or `[σ(-s), σ(s)]` under `Logistic`: `s` is a margin.
    Negate,
}

/// Writes one binary score into two columns, as [`Second`] says.
pub fn binary_pair(score: f32, post: Post, second: Second) -> [f32; 2] {
    if post == Post::Probit {
        return [probit(score), 0.0];
    }
    match second {
        Second::None => [score, 0.0],
        Second::Complement => [1.0 - score, score],
        Second::Negate if post == Post::Logistic => [logistic(-score), logistic(score)],
        Second::Negate => [-score, score],
    }
}

/// ONNX Runtime's logistic, computed from |x| (so, like it, 0 for x below about -17).
pub fn logistic(x: f32) -> f32 {
    let v = 1.0 / (1.0 + (-x.abs()).exp());
    if x < 0.0 { 1.0 - v } else { v }
}

/// ONNX Runtime's probit: √2 · erfinv(2x − 1), with its erfinv approximation.
pub fn probit(x: f32) -> f32 {
    std::f32::consts::SQRT_2 * erf_inv(2.0 * x - 1.0)
}

fn erf_inv(x: f32) -> f32 {
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let x = (1.0 - x) * (1.0 + x);
    let log = x.ln();
    let v = 2.0 / (std::f32::consts::PI * 0.147) + 0.5 * log;
    let v2 = 1.0 / 0.147 * log;
    let v3 = -v + (v * v - v2).sqrt();
    sign * v3.sqrt()
}

/// Softmax with the maximum subtracted first.
pub fn softmax(row: &mut [f32]) {
    let max = row.iter().copied().fold(-f32::MAX, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in row {
        *v /= sum;
    }
}

/// Softmax over the scores that are not (nearly) zero; zeros stay zero.
pub fn softmax_zero(row: &mut [f32]) {
    let max = row.iter().copied().fold(-f32::MAX, f32::max);
    let exp_neg_max = (-max).exp();
    let mut sum = 0.0;
    for v in row.iter_mut() {
        if v.abs() > 1e-7 {
            *v = (*v - max).exp();
            sum += *v;
        } else {
            *v *= exp_neg_max;
        }
    }
    for v in row {
        *v /= sum;
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // the same arithmetic gives the same floats
mod tests {
    use super::*;

    #[test]
    fn transforms_match_their_definitions() {
        assert!((logistic(0.0) - 0.5).abs() < 1e-7);
        assert!((logistic(2.0) - 1.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-7);
        assert_eq!(logistic(-30.0), 0.0);
        assert!((logistic(-2.0) + logistic(2.0) - 1.0).abs() < 1e-7);
        let mut row = [1.0, 2.0, 3.0];
        softmax(&mut row);
        let e: Vec<f32> = [1.0f32, 2.0, 3.0].iter().map(|v| v.exp()).collect();
        let s: f32 = e.iter().sum();
        for (a, b) in row.iter().zip(&e) {
            assert!((a - b / s).abs() < 1e-6);
        }
        let mut zero = [0.0, 1.0, 1.0];
        softmax_zero(&mut zero);
        assert_eq!(zero[0], 0.0);
        assert!((zero[1] - 0.5).abs() < 1e-6);
        // erfinv's approximation is within 2e-3 of the true quantiles.
        assert!((probit(0.975) - 1.959_964).abs() < 2e-3);
        assert!(probit(0.5).abs() < 1e-6);
    }

    #[test]
    fn binary_scores_fill_two_columns() {
        assert_eq!(binary_pair(0.25, Post::None, Second::Complement), [0.75, 0.25]);
        assert_eq!(binary_pair(2.0, Post::None, Second::Negate), [-2.0, 2.0]);
        let [a, b] = binary_pair(2.0, Post::Logistic, Second::Negate);
        assert!((a - logistic(-2.0)).abs() < 1e-7 && (b - logistic(2.0)).abs() < 1e-7);
        assert_eq!(binary_pair(3.0, Post::None, Second::None), [3.0, 0.0]);
        assert_eq!(Post::parse("SOFTMAX"), Some(Post::Softmax));
        assert_eq!(Post::from_code(2), Some(Post::Logistic));
        assert_eq!(Post::parse("softmax"), None);
    }
}
