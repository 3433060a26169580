//! Progressive delivery's rules, shared by the control plane that plans a rollout and the
//! agents that route, judge and, when a guard fails, roll back on their own.
//!
//! A [`RolloutSpec`] travels in each agent's signed desired-state document: the model, its
//! baseline and candidate versions (both installed, the baseline active), the candidate's
//! share of requests as steps at absolute times (so an agent cut off from the control plane
//! keeps stepping), the share of requests also mirrored to the candidate, and the guards.
//!
//! Assignment is sticky: a request's routing key is hashed with the rollout's id into a
//! bucket of 10,000, and the candidate serves the buckets below its share, so a key keeps
//! its variant for the whole rollout and moves only from baseline to candidate as the
//! share grows. Guards ([`Guard`]) are judged over each variant's [`Counts`] since the
//! rollout began, on agents and on the control plane alike ([`judge`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

#[cfg(test)]
use crate::metrics::Feedback;
use crate::metrics::{Counts, Rollup};
use crate::names;
use crate::profile::DataProfile;
use crate::time::Timestamp;

/// Buckets a routing key falls into; a [`Share`] counts them.
pub const BUCKETS: u16 = 10_000;

/// Why a rollout, a share or a guard was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RolloutError {
    /// A share that is not a number from 0 to 100.
    #[error("share {0:?} is not a percentage from 0 to 100")]
    Share(String),
    /// A guard expression that does not parse.
    #[error("guard {text:?}: {problem}")]
    Guard {
        /// The expression.
        text: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A rollout that breaks a rule.
    #[error("rollout {id}: {problem}")]
    Invalid {
        /// The rollout.
        id: String,
        /// The rule broken.
        problem: String,
    },
}

/// A share of requests, in hundredths of a percent (0 to [`BUCKETS`]); written as a
/// percentage (`12.5`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Share(u16);

impl Share {
    /// No request.
    pub const NONE: Self = Self(0);
    /// Every request.
    pub const ALL: Self = Self(BUCKETS);

    /// The share of `percent` percent, if within 0 to 100 (to a hundredth).
    pub fn from_percent(percent: f64) -> Option<Self> {
        (0.0..=100.0).contains(&percent).then(|| Self((percent * 100.0).round() as u16))
    }

    /// As a percentage.
    pub fn percent(self) -> f64 {
        f64::from(self.0) / 100.0
    }

    /// Whether a key in `bucket` falls within this share.
    pub fn covers(self, bucket: u16) -> bool {
        bucket < self.0
    }
}

impl FromStr for Share {
    type Err = RolloutError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let number = text.trim().trim_end_matches('%');
        number
            .parse::<f64>()
            .ok()
            .and_then(Self::from_percent)
            .ok_or_else(|| RolloutError::Share(text.to_owned()))
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.percent())
    }
}

impl Serialize for Share {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.percent())
    }
}

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let percent = f64::deserialize(deserializer)?;
        Self::from_percent(percent).ok_or_else(|| {
            serde::de::Error::custom(format_args!("share {percent} is not within 0 to 100"))
        })
    }
}

/// How the candidate is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// A share that grows step by step; the last step promotes.
    Canary,
    /// A fixed split, held until a person promotes or aborts (an experiment).
    Ab,
    /// The candidate runs beside the baseline on mirrored requests; its answers are
    /// compared and discarded.
    Shadow,
}

impl Strategy {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Canary => "canary",
            Self::Ab => "ab",
            Self::Shadow => "shadow",
        }
    }
}

/// From `at` on, the candidate serves `share` of the requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// When the step begins.
    pub at: Timestamp,
    /// The candidate's share from then.
    pub share: Share,
}

/// A rollout as it travels in a desired-state document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// The rollout's id: part of every key's hash, so assignments differ between rollouts.
    pub id: String,
    /// The model.
    pub model: String,
    /// The version serving before the rollout (active).
    pub baseline: u64,
    /// The version tried (installed, not active).
    pub candidate: u64,
    /// How.
    pub strategy: Strategy,
    /// The candidate's share over time, in time order; before the first step, none.
    pub steps: Vec<Step>,
    /// The share of requests the baseline serves that also run on the candidate.
    pub mirror: Share,
    /// What the candidate must hold to.
    pub guards: Vec<Guard>,
    /// Requests (or, for feedback and agreement guards, labelled or compared rows) each
    /// variant needs before a guard is judged.
    pub min_requests: u64,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// Served by the candidate.
    pub candidate: bool,
    /// Served by the baseline and also run on the candidate, off the request path.
    pub mirrored: bool,
}

impl RolloutSpec {
    /// Checks the rollout's own rules: names, distinct versions, steps in time order and
    /// within 0–100 %, guards that the strategy can measure.
    pub fn check(&self) -> Result<(), RolloutError> {
        let invalid = |problem: String| RolloutError::Invalid { id: self.id.clone(), problem };
        names::check_model_name(&self.id).map_err(|e| invalid(format!("id: {e}")))?;
        names::check_model_name(&self.model).map_err(|e| invalid(e.to_string()))?;
        if self.baseline == self.candidate {
            return Err(invalid(format!(
                "the candidate {}@{} is the baseline",
                self.model, self.candidate
            )));
        }
        if self.steps.is_empty() {
            return Err(invalid("no steps".into()));
        }
        if self.steps.windows(2).any(|w| w[1].at < w[0].at) {
            return Err(invalid("steps are not in time order".into()));
        }
        if self.strategy == Strategy::Shadow && self.steps.iter().any(|s| s.share != Share::NONE) {
            return Err(invalid("a shadow rollout sends no request to the candidate".into()));
        }
        if self.strategy == Strategy::Shadow && self.mirror == Share::NONE {
            return Err(invalid("a shadow rollout mirrors no request".into()));
        }
        if self.mirror == Share::NONE && self.guards.iter().any(|g| g.metric == Metric::Agreement) {
            return Err(invalid(
                "an agreement guard needs mirrored requests: use --strategy shadow or --mirror"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The step in force at `now`, by index.
    pub fn step_at(&self, now: Timestamp) -> Option<usize> {
        self.steps.iter().rposition(|s| s.at <= now)
    }

    /// The candidate's share at `now`.
    pub fn share_at(&self, now: Timestamp) -> Share {
        self.step_at(now).map_or(Share::NONE, |i| self.steps[i].share)
    }

    /// Whether the last step has begun.
    pub fn at_last_step(&self, now: Timestamp) -> bool {
        self.step_at(now) == Some(self.steps.len() - 1)
    }

    /// Where a request with routing key `key` goes at candidate share `share`.
    pub fn assign(&self, key: &[u8], share: Share) -> Assignment {
        let (split, mirror) = buckets(&self.id, key);
        let candidate = share.covers(split);
        Assignment { candidate, mirrored: !candidate && self.mirror.covers(mirror) }
    }

    /// The variant of `version`, if it is one of this rollout's.
    pub fn variant(&self, version: u64) -> Option<Variant> {
        if version == self.baseline {
            Some(Variant::Baseline)
        } else if version == self.candidate {
            Some(Variant::Candidate)
        } else {
            None
        }
    }
}

/// One side of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// The version serving before.
    Baseline,
    /// The version tried.
    Candidate,
}

/// The key's two buckets for rollout `id`: one for the split, an independent one for
/// mirroring. SHA-256, so buckets are uniform whatever the keys look like, and stable
/// across processes, restarts and releases.
pub fn buckets(id: &str, key: &[u8]) -> (u16, u16) {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(id.as_bytes());
    ctx.update(&[0]);
    ctx.update(key);
    let digest = ctx.finish();
    let bytes = digest.as_ref();
    let word = |at: usize| {
        u64::from_le_bytes(bytes[at..at + 8].try_into().expect("a SHA-256 digest has 32 bytes"))
    };
    let bucket = |w: u64| (w % u64::from(BUCKETS)) as u16;
    (bucket(word(0)), bucket(word(8)))
}

/// What a guard measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    /// Failed requests over requests.
    ErrorRate,
    /// Median latency of successful requests, ms.
    P50Ms,
    /// 99th percentile latency, ms.
    P99Ms,
    /// The largest PSI of any profiled column against the version's reference profile.
    Psi,
    /// Mirrored rows on which the candidate agreed with the baseline, over rows compared.
    Agreement,
    /// Ground-truth labels matched by the prediction, over labels received (classifiers).
    Accuracy,
    /// Mean absolute error against ground-truth labels (regressors).
    Mae,
}

impl Metric {
    const ALL: [Self; 7] = [
        Self::ErrorRate,
        Self::P50Ms,
        Self::P99Ms,
        Self::Psi,
        Self::Agreement,
        Self::Accuracy,
        Self::Mae,
    ];

    /// Its name in guard expressions.
    pub fn name(self) -> &'static str {
        match self {
            Self::ErrorRate => "error_rate",
            Self::P50Ms => "p50_ms",
            Self::P99Ms => "p99_ms",
            Self::Psi => "psi",
            Self::Agreement => "agreement",
            Self::Accuracy => "accuracy",
            Self::Mae => "mae",
        }
    }
}

/// How a value is compared with its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl Comparison {
    fn symbol(self) -> &'static str {
        match self {
            Self::Lt => "<",
            Self::Le => "<=",
            Self::Gt => ">",
            Self::Ge => ">=",
        }
    }

    fn holds(self, value: f64, bound: f64) -> bool {
        match self {
            Self::Lt => value < bound,
            Self::Le => value <= bound,
            Self::Gt => value > bound,
            Self::Ge => value >= bound,
        }
    }
}

/// What a value is compared with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    /// A number.
    Fixed(f64),
    /// The baseline's value of the same metric, plus `offset`.
    BaselinePlus(f64),
    /// The baseline's value of the same metric, times `factor`.
    BaselineTimes(f64),
}

/// A condition the candidate must hold to: `error_rate<0.02`, `p99_ms<40`, `psi<0.25`,
/// `agreement>0.9`, `accuracy>=baseline-0.02`, `p99_ms<=baseline*1.5`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guard {
    /// The metric.
    pub metric: Metric,
    /// The comparison.
    pub comparison: Comparison,
    /// The bound.
    pub bound: Bound,
}

impl FromStr for Guard {
    type Err = RolloutError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |problem: String| RolloutError::Guard { text: text.to_owned(), problem };
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let at = compact
            .find(['<', '>'])
            .ok_or_else(|| fail("expected METRIC<BOUND, <=, > or >=".into()))?;
        let (name, rest) = compact.split_at(at);
        let metric = Metric::ALL.into_iter().find(|m| m.name() == name).ok_or_else(|| {
            let known: Vec<_> = Metric::ALL.iter().map(|m| m.name()).collect();
            fail(format!("unknown metric {name:?}; known: {}", known.join(", ")))
        })?;
        let (comparison, bound) = [
            ("<=", Comparison::Le),
            (">=", Comparison::Ge),
            ("<", Comparison::Lt),
            (">", Comparison::Gt),
        ]
        .into_iter()
        .find_map(|(symbol, c)| rest.strip_prefix(symbol).map(|b| (c, b)))
        .ok_or_else(|| fail("expected a comparison".into()))?;
        let number = |t: &str| {
            t.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| fail(format!("{t:?} is not a number")))
        };
        let bound = match bound.strip_prefix("baseline") {
            None => Bound::Fixed(number(bound)?),
            Some("") => Bound::BaselinePlus(0.0),
            Some(offset) if offset.starts_with(['+', '-']) => Bound::BaselinePlus(number(offset)?),
            Some(factor) => match factor.strip_prefix('*') {
                Some(f) => Bound::BaselineTimes(number(f)?),
                None => {
                    return Err(fail(format!(
                        "expected baseline+X, baseline-X or baseline*X, got baseline{factor}"
                    )));
                }
            },
        };
        Ok(Self { metric, comparison, bound })
    }
}

impl fmt::Display for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.metric.name(), self.comparison.symbol())?;
        match self.bound {
            Bound::Fixed(x) => write!(f, "{x}"),
            Bound::BaselinePlus(0.0) => write!(f, "baseline"),
            Bound::BaselinePlus(x) if x < 0.0 => write!(f, "baseline{x}"),
            Bound::BaselinePlus(x) => write!(f, "baseline+{x}"),
            Bound::BaselineTimes(x) => write!(f, "baseline*{x}"),
        }
    }
}

impl Serialize for Guard {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Guard {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?.parse().map_err(serde::de::Error::custom)
    }
}

/// One variant's figures over a rollout, from its counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Failed over all (0 without requests).
    pub error_rate: f64,
    /// Median latency, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, ms.
    pub p99_ms: Option<f64>,
    /// The largest PSI of a profiled column; `None` without a profile or data.
    pub psi: Option<f64>,
    /// Rows compared with the baseline (mirrored requests).
    pub compared: u64,
    /// Of those, rows where the two agreed.
    pub agreed: u64,
    /// Mirrored requests dropped because the candidate's queue was full.
    pub shadow_dropped: u64,
    /// Rows with ground truth.
    pub labelled: u64,
    /// Of those, rows predicted right (classifiers).
    pub correct: u64,
    /// Sum of absolute errors (regressors).
    pub abs_error: f64,
}

impl Figures {
    /// The figures of `counts`, PSI against `reference` when given.
    pub fn of(counts: &Counts, reference: Option<&DataProfile>) -> Self {
        let ms = |q| counts.latency.quantile(q).map(|micros| micros / 1000.0);
        let psi = reference.and_then(|r| {
            let drift = Rollup { windows: 1, counts: counts.clone() }.drift(r);
            drift.inputs.iter().chain(&drift.outputs).map(|c| c.scores.psi).reduce(f64::max)
        });
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        Self {
            requests: counts.requests,
            errors: counts.errors,
            error_rate: ratio(counts.errors, counts.requests),
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            psi,
            compared: counts.shadow.compared,
            agreed: counts.shadow.agreed,
            shadow_dropped: counts.shadow.dropped,
            labelled: counts.feedback.labelled,
            correct: counts.feedback.correct,
            abs_error: counts.feedback.abs_error,
        }
    }

    /// The value of `metric`, when there is one, and how many observations it rests on.
    pub fn value(&self, metric: Metric) -> (Option<f64>, u64) {
        let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
        match metric {
            Metric::ErrorRate => (ratio(self.errors, self.requests), self.requests),
            Metric::P50Ms => (self.p50_ms, self.requests),
            Metric::P99Ms => (self.p99_ms, self.requests),
            Metric::Psi => (self.psi, self.requests),
            Metric::Agreement => (ratio(self.agreed, self.compared), self.compared),
            Metric::Accuracy => (ratio(self.correct, self.labelled), self.labelled),
            Metric::Mae => {
                ((self.labelled > 0).then(|| self.abs_error / self.labelled as f64), self.labelled)
            }
        }
    }
}

/// A guard's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Not enough observations yet.
    Pending,
    /// Held.
    Holds,
    /// Failed: the candidate is rolled back.
    Fails,
}

/// One guard judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardResult {
    /// The guard.
    pub guard: Guard,
    /// The candidate's value.
    pub value: Option<f64>,
    /// The bound it was held to (the baseline's value applied for relative guards).
    pub bound: Option<f64>,
    /// Observations behind the candidate's value.
    pub observed: u64,
    /// The verdict.
    pub verdict: Verdict,
}

impl fmt::Display for GuardResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let num = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |x| format!("{x:.4}"));
        write!(
            f,
            "{} failed: {} {} {} (over {})",
            self.guard,
            num(self.value),
            match self.guard.comparison {
                Comparison::Lt => ">=",
                Comparison::Le => ">",
                Comparison::Gt => "<=",
                Comparison::Ge => "<",
            },
            num(self.bound),
            self.observed
        )
    }
}

/// Judges `guards` on the candidate's figures; relative bounds take the baseline's.
/// A guard is judged only once the candidate (and, for a relative bound, the baseline)
/// has `min` observations of what it measures.
pub fn judge(
    guards: &[Guard],
    min: u64,
    baseline: &Figures,
    candidate: &Figures,
) -> Vec<GuardResult> {
    guards
        .iter()
        .map(|&guard| {
            let (value, observed) = candidate.value(guard.metric);
            let bound = match guard.bound {
                Bound::Fixed(x) => Some(x),
                Bound::BaselinePlus(_) | Bound::BaselineTimes(_) => {
                    let (base, n) = baseline.value(guard.metric);
                    base.filter(|_| n >= min).map(|b| match guard.bound {
                        Bound::BaselineTimes(k) => b * k,
                        Bound::BaselinePlus(d) | Bound::Fixed(d) => b + d,
                    })
                }
            };
            let verdict = match (value, bound) {
                (Some(v), Some(b)) if observed >= min => {
                    if guard.comparison.holds(v, b) {
                        Verdict::Holds
                    } else {
                        Verdict::Fails
                    }
                }
                _ => Verdict::Pending,
            };
            GuardResult { guard, value, bound, observed, verdict }
        })
        .collect()
}

/// The first failed guard, as the reason of a rollback.
pub fn failure(results: &[GuardResult]) -> Option<String> {
    results.iter().find(|r| r.verdict == Verdict::Fails).map(ToString::to_string)
}

/// The two-sided p-value of a two-proportion z-test: whether `x1` of `n1` and `x2` of
/// `n2` differ by more than chance (pooled variance). `None` when either sample is empty
/// or the pooled proportion is 0 or 1.
pub fn two_proportion_p_value(x1: u64, n1: u64, x2: u64, n2: u64) -> Option<f64> {
    if n1 == 0 || n2 == 0 {
        return None;
    }
    let (n1f, n2f) = (n1 as f64, n2 as f64);
    let pooled = (x1 + x2) as f64 / (n1f + n2f);
    let variance = pooled * (1.0 - pooled) * (1.0 / n1f + 1.0 / n2f);
    if variance <= 0.0 {
        return None;
    }
    let z = (x1 as f64 / n1f - x2 as f64 / n2f) / variance.sqrt();
    Some(libm::erfc(z.abs() / std::f64::consts::SQRT_2))
}

/// An agent's account of one rollout in its document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutReport {
    /// The rollout.
    pub id: String,
    /// The step in force (none before the first).
    pub step: Option<usize>,
    /// Whether the agent rolled it back; then every request goes to the baseline.
    pub rolled_back: bool,
    /// Why, when rolled back.
    pub reason: Option<String>,
    /// When it rolled back.
    pub at: Option<Timestamp>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sketch::LatencySketch;

    fn spec(steps: &[(u64, f64)]) -> RolloutSpec {
        RolloutSpec {
            id: "ro-1".into(),
            model: "fault".into(),
            baseline: 1,
            candidate: 2,
            strategy: Strategy::Canary,
            steps: steps
                .iter()
                .map(|&(at, p)| Step {
                    at: Timestamp::from_unix(at),
                    share: Share::from_percent(p).unwrap(),
                })
                .collect(),
            mirror: Share::NONE,
            guards: vec![],
            min_requests: 10,
        }
    }

    #[test]
    fn shares_parse_as_percentages_and_refuse_the_rest() {
        assert_eq!("5".parse::<Share>().unwrap(), Share(500));
        assert_eq!(" 12.5% ".parse::<Share>().unwrap(), Share(1250));
        assert_eq!("100".parse::<Share>().unwrap(), Share::ALL);
        for bad in ["-1", "100.5", "half", "", "NaN"] {
            assert_eq!(bad.parse::<Share>(), Err(RolloutError::Share(bad.into())), "{bad}");
        }
        assert_eq!(serde_json::to_string(&Share(1250)).unwrap(), "12.5");
        assert!(serde_json::from_str::<Share>("101").is_err());
    }

    #[test]
    fn guards_parse_print_and_refuse_with_the_reason() {
        for text in [
            "error_rate<0.02",
            "p99_ms<40",
            "psi<0.25",
            "agreement>0.9",
            "accuracy>=baseline-0.02",
            "mae<=baseline+0.5",
            "p50_ms<baseline*1.5",
            "accuracy>=baseline",
        ] {
            let guard: Guard = text.parse().unwrap();
            assert_eq!(guard.to_string(), text);
            let json = serde_json::to_string(&guard).unwrap();
            assert_eq!(serde_json::from_str::<Guard>(&json).unwrap(), guard);
        }
        assert_eq!(
            " accuracy >= baseline - 0.02 ".parse::<Guard>().unwrap(),
            Guard {
                metric: Metric::Accuracy,
                comparison: Comparison::Ge,
                bound: Bound::BaselinePlus(-0.02)
            }
        );
        let refused = |text: &str| text.parse::<Guard>().unwrap_err().to_string();
        assert!(
            refused("latency<3").contains("unknown metric \"latency\""),
            "{}",
            refused("latency<3")
        );
        assert!(refused("error_rate=0.1").contains("expected METRIC<BOUND"));
        assert!(refused("error_rate<abc").contains("\"abc\" is not a number"));
        assert!(refused("error_rate<inf").contains("is not a number"));
        assert!(refused("accuracy>baseline/2").contains("baseline+X"));
    }

    #[test]
    fn steps_follow_the_clock_and_assignment_is_sticky_and_monotone() {
        let s = spec(&[(100, 5.0), (200, 25.0), (300, 100.0)]);
        assert_eq!(s.share_at(Timestamp::from_unix(99)), Share::NONE);
        assert_eq!(s.step_at(Timestamp::from_unix(100)), Some(0));
        assert_eq!(s.share_at(Timestamp::from_unix(250)), Share(2500));
        assert!(!s.at_last_step(Timestamp::from_unix(299)));
        assert!(s.at_last_step(Timestamp::from_unix(300)));
        // A key on the candidate at 5 % stays there at 25 % and 100 %; the share of keys
        // on the candidate follows the share.
        let keys: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
        let on = |share: f64| -> Vec<bool> {
            let share = Share::from_percent(share).unwrap();
            keys.iter().map(|k| s.assign(k.as_bytes(), share).candidate).collect()
        };
        let (five, quarter, all) = (on(5.0), on(25.0), on(100.0));
        assert!(five.iter().zip(&quarter).all(|(a, b)| !a || *b));
        assert!(all.iter().all(|&c| c));
        let count = |v: &[bool]| v.iter().filter(|&&c| c).count();
        assert!((400..600).contains(&count(&five)), "{}", count(&five));
        assert!((2300..2700).contains(&count(&quarter)), "{}", count(&quarter));
        assert_eq!(on(25.0), quarter, "the same key, the same variant");
        // Another rollout assigns the same keys differently.
        let other = RolloutSpec { id: "ro-2".into(), ..s.clone() };
        let moved = keys
            .iter()
            .filter(|k| {
                other.assign(k.as_bytes(), Share(2500)).candidate
                    != s.assign(k.as_bytes(), Share(2500)).candidate
            })
            .count();
        assert!(moved > 2000, "{moved}");
    }

    #[test]
    fn mirroring_covers_its_share_of_the_baseline_requests_only() {
        let mut s = spec(&[(0, 0.0)]);
        s.strategy = Strategy::Shadow;
        s.mirror = Share::from_percent(50.0).unwrap();
        let mirrored =
            (0..10_000u32).filter(|i| s.assign(&i.to_le_bytes(), Share::NONE).mirrored).count();
        assert!((4700..5300).contains(&mirrored), "{mirrored}");
        s.mirror = Share::ALL;
        assert!(!s.assign(b"k", Share::ALL).mirrored, "served by the candidate: not mirrored");
        assert!(s.assign(b"k", Share::NONE).mirrored);
    }

    #[test]
    fn rules_refuse_what_cannot_be_run() {
        let problem = |change: &dyn Fn(&mut RolloutSpec)| {
            let mut s = spec(&[(0, 5.0), (10, 100.0)]);
            change(&mut s);
            s.check().map_or_else(|e| e.to_string(), |()| String::new())
        };
        assert_eq!(problem(&|_| {}), "");
        assert!(problem(&|s| s.candidate = 1).contains("is the baseline"));
        assert!(problem(&|s| s.steps.clear()).contains("no steps"));
        assert!(problem(&|s| s.steps.reverse()).contains("time order"));
        assert!(problem(&|s| s.id = "Bad Id".into()).contains("id:"));
        assert!(
            problem(&|s| s.guards.push("agreement>0.9".parse().unwrap()))
                .contains("needs mirrored requests")
        );
        assert!(problem(&|s| s.strategy = Strategy::Shadow).contains("sends no request"));
    }

    fn counts(requests: u64, errors: u64, latency_micros: f64) -> Counts {
        let mut latency = LatencySketch::default();
        for _ in 0..requests - errors {
            latency.record(latency_micros);
        }
        Counts { requests, errors, latency, ..Counts::default() }
    }

    #[test]
    fn guards_wait_for_their_minimum_then_hold_or_fail() {
        let guards: Vec<Guard> = ["error_rate<0.02", "p99_ms<40", "accuracy>=baseline-0.02"]
            .iter()
            .map(|g| g.parse().unwrap())
            .collect();
        let mut base = counts(1000, 10, 20_000.0);
        base.feedback = Feedback { labelled: 500, correct: 450, abs_error: 0.0 };
        let baseline = Figures::of(&base, None);
        let verdicts = |c: &Counts| -> Vec<Verdict> {
            judge(&guards, 200, &baseline, &Figures::of(c, None))
                .iter()
                .map(|r| r.verdict)
                .collect()
        };
        let mut young = counts(150, 100, 90_000.0);
        young.feedback = Feedback { labelled: 10, correct: 0, abs_error: 0.0 };
        assert_eq!(verdicts(&young), [Verdict::Pending; 3]);
        let mut good = counts(400, 4, 30_000.0);
        good.feedback = Feedback { labelled: 300, correct: 265, abs_error: 0.0 };
        assert_eq!(verdicts(&good), [Verdict::Holds; 3]);
        let mut bad = counts(400, 40, 50_000.0);
        bad.feedback = Feedback { labelled: 300, correct: 255, abs_error: 0.0 };
        assert_eq!(verdicts(&bad), [Verdict::Fails; 3]);
        let results = judge(&guards, 200, &baseline, &Figures::of(&bad, None));
        assert_eq!(results[2].bound.map(|b| (b * 1e6).round()), Some(880_000.0));
        assert_eq!(
            failure(&results).unwrap(),
            "error_rate<0.02 failed: 0.1000 >= 0.0200 (over 400)"
        );
    }

    #[test]
    fn the_z_test_matches_scipy() {
        // Pooled z = 2.820915, p = 2 * scipy.stats.norm.sf(z) = 0.0047886936.
        let p = two_proportion_p_value(450, 500, 420, 500).unwrap();
        assert!((p - 0.004_788_693_6).abs() < 1e-9, "{p}");
        assert!((two_proportion_p_value(50, 100, 50, 100).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(two_proportion_p_value(0, 0, 1, 2), None);
        assert_eq!(two_proportion_p_value(5, 5, 7, 7), None);
    }
}
