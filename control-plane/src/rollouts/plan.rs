//! Starting a rollout, before the database is asked anything: the body of
//! `POST /v1/rollouts` (which `rollout start` builds), each strategy's defaults and
//! options, shares and guards parsed, canary steps that increase to 100, and the rollout
//! rules of [`RolloutSpec::check`]. What the database decides (the baseline, a rollout
//! already under way) is [`super::start`]'s.

use std::time::Duration;

use falaj_common::names;
use falaj_common::rollout::{Guard, RolloutError, RolloutSpec, Share, Step, Strategy};
use falaj_common::time::Timestamp;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::RolloutState;

/// The canary steps when none are given, in percent.
pub const DEFAULT_STEPS: [f64; 4] = [5.0, 25.0, 50.0, 100.0];
/// The time between canary steps when none is given.
pub const DEFAULT_STEP_INTERVAL: Duration = Duration::from_secs(600);
/// The A/B split when none is given, in percent.
pub const DEFAULT_SPLIT: f64 = 50.0;
/// The share of requests a shadow rollout mirrors when none is given, in percent.
pub const DEFAULT_SHADOW_MIRROR: f64 = 100.0;
/// Observations each variant needs before a guard is judged, when not given.
pub const DEFAULT_MIN_REQUESTS: u64 = 200;

/// What was asked for: every step's share and the time between steps. The issued steps
/// are the plan's first shares with times; a pause cuts them, a resume re-times the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The candidate's share at each step.
    pub shares: Vec<Share>,
    /// Seconds between steps (canary; 0 for one-step strategies).
    pub step_interval_seconds: u64,
}

/// The body of `POST /v1/rollouts`, which the CLI builds from its arguments. Shares are
/// percentages (0 to 100), guards are expressions (`error_rate<0.02`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub group: String,
    pub model: String,
    /// The version to try; the baseline is the group's deployed version.
    pub candidate: u64,
    /// `canary`, `ab` or `shadow`.
    pub strategy: Strategy,
    /// Canary: the candidate's share at each step, increasing, the last 100 (promotion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<f64>>,
    /// Canary: seconds between steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_interval_seconds: Option<u64>,
    /// A/B: the candidate's share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<f64>,
    /// Share of requests also run on the candidate (shadow: default 100; others: 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<f64>,
    /// Guard expressions.
    #[serde(default)]
    pub guards: Vec<String>,
    /// Observations each variant needs before a guard is judged (default 200).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_requests: Option<u64>,
}

/// A start request checked on its own (before the database is asked anything).
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub group: String,
    pub model: String,
    /// The candidate version.
    pub candidate: u64,
    /// How.
    pub strategy: Strategy,
    pub plan: Plan,
    /// The mirrored share.
    pub mirror: Share,
    pub guards: Vec<Guard>,
    /// Observations before judgement.
    pub min_requests: u64,
}

impl Planned {
    /// The steps issued at start: step `i` at `now + i * interval`.
    pub fn steps(&self, now: Timestamp) -> Vec<Step> {
        let interval = self.plan.step_interval_seconds;
        (0u64..)
            .zip(&self.plan.shares)
            .map(|(i, &share)| Step {
                at: now.saturating_add(Duration::from_secs(i.saturating_mul(interval))),
                share,
            })
            .collect()
    }

    pub(crate) fn spec(&self, id: &str, baseline: u64, now: Timestamp) -> RolloutSpec {
        RolloutSpec {
            id: id.to_owned(),
            model: self.model.clone(),
            baseline,
            candidate: self.candidate,
            strategy: self.strategy,
            steps: self.steps(now),
            mirror: self.mirror,
            guards: self.guards.clone(),
            min_requests: self.min_requests,
        }
    }
}

/// Why a rollout was not started. Nothing is stored when one is refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum StartError {
    /// A share outside 0 to 100.
    #[error("{0}")]
    Share(RolloutError),
    /// A guard that does not parse.
    #[error("{0}")]
    Guard(RolloutError),
    /// Options that do not fit the strategy or each other.
    #[error("{0}")]
    Invalid(String),
    /// The candidate was never pushed.
    #[error("no bundle {model}@{version}; push it first")]
    NoBundle { model: String, version: u64 },
    /// The group does not run the model, so there is no baseline.
    #[error("{model} is not deployed to group {group}: deploy a baseline first")]
    NoDeployment { group: String, model: String },
    /// The candidate is what the group runs.
    #[error("{model}@{version} is already what group {group} runs (the baseline)")]
    CandidateIsBaseline { group: String, model: String, version: u64 },
    /// Another rollout of the model is under way in the group.
    #[error("rollout {id} of {model} in group {group} is {state}; promote or abort it first", state = state.name())]
    Exists {
        /// The rollout under way.
        id: String,
        group: String,
        model: String,
        /// Its state.
        state: RolloutState,
    },
}

fn share(percent: f64) -> Result<Share, StartError> {
    Share::from_percent(percent)
        .ok_or_else(|| StartError::Share(RolloutError::Share(format!("{percent}"))))
}

impl StartRequest {
    /// Checks everything that needs no database: names, shares, steps, guards, what the
    /// strategy allows, and the rollout rules of [`RolloutSpec::check`].
    pub fn plan(&self) -> Result<Planned, StartError> {
        let invalid = |m: String| Err(StartError::Invalid(m));
        names::check_model_name(&self.group)
            .map_err(|e| StartError::Invalid(format!("group: {e}")))?;
        names::check_model_name(&self.model).map_err(|e| StartError::Invalid(e.to_string()))?;
        let guards = self
            .guards
            .iter()
            .map(|g| g.parse::<Guard>().map_err(StartError::Guard))
            .collect::<Result<Vec<_>, _>>()?;
        let canary_only = [
            (self.steps.is_some(), "steps apply to canary rollouts"),
            (self.step_interval_seconds.is_some(), "a step interval applies to canary rollouts"),
        ];
        let ab_only = [(self.split.is_some(), "a split applies to ab rollouts")];
        let misplaced = match self.strategy {
            Strategy::Canary => ab_only.iter().find(|(set, _)| *set),
            Strategy::Ab => canary_only.iter().find(|(set, _)| *set),
            Strategy::Shadow => canary_only.iter().chain(&ab_only).find(|(set, _)| *set),
        };
        if let Some((_, problem)) = misplaced {
            return invalid(format!("{problem}, not {}", self.strategy.name()));
        }
        let plan = match self.strategy {
            Strategy::Canary => {
                let asked = self.steps.as_deref().unwrap_or(&DEFAULT_STEPS);
                let shares = asked.iter().map(|&p| share(p)).collect::<Result<Vec<_>, _>>()?;
                if shares.is_empty() {
                    return invalid("a canary needs at least one step".into());
                }
                if shares.windows(2).any(|w| w[1] <= w[0]) {
                    return invalid(format!(
                        "canary steps must increase strictly: {}",
                        percents(&shares)
                    ));
                }
                if shares.last() != Some(&Share::ALL) {
                    return invalid(format!(
                        "the last canary step must be 100 (promotion): {}",
                        percents(&shares)
                    ));
                }
                let interval =
                    self.step_interval_seconds.unwrap_or(DEFAULT_STEP_INTERVAL.as_secs());
                if interval == 0 {
                    return invalid("the step interval must be at least 1 second".into());
                }
                Plan { shares, step_interval_seconds: interval }
            }
            Strategy::Ab => Plan {
                shares: vec![share(self.split.unwrap_or(DEFAULT_SPLIT))?],
                step_interval_seconds: 0,
            },
            Strategy::Shadow => Plan { shares: vec![Share::NONE], step_interval_seconds: 0 },
        };
        let default_mirror =
            if self.strategy == Strategy::Shadow { DEFAULT_SHADOW_MIRROR } else { 0.0 };
        let planned = Planned {
            group: self.group.clone(),
            model: self.model.clone(),
            candidate: self.candidate,
            strategy: self.strategy,
            plan,
            mirror: share(self.mirror.unwrap_or(default_mirror))?,
            guards,
            min_requests: self.min_requests.unwrap_or(DEFAULT_MIN_REQUESTS),
        };
        // The spec's own rules, with a baseline that differs from the candidate: the
        // database supplies the real one, and the start checks again.
        planned
            .spec("ro-0", self.candidate.wrapping_add(1), Timestamp::from_unix(0))
            .check()
            .map_err(spec_problem)?;
        Ok(planned)
    }
}

pub(crate) fn spec_problem(e: RolloutError) -> StartError {
    match e {
        RolloutError::Invalid { problem, .. } => StartError::Invalid(problem),
        RolloutError::Guard { .. } => StartError::Guard(e),
        RolloutError::Share(_) => StartError::Share(e),
    }
}

fn percents(shares: &[Share]) -> String {
    shares.iter().map(|s| s.percent().to_string()).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(strategy: Strategy) -> StartRequest {
        StartRequest {
            group: "plant-a".into(),
            model: "pumps".into(),
            candidate: 2,
            strategy,
            steps: None,
            step_interval_seconds: None,
            split: None,
            mirror: None,
            guards: vec!["error_rate<0.02".into()],
            min_requests: None,
        }
    }

    fn refused(change: impl FnOnce(&mut StartRequest), strategy: Strategy) -> String {
        let mut r = request(strategy);
        change(&mut r);
        r.plan().unwrap_err().to_string()
    }

    #[test]
    fn plans_take_the_defaults_of_each_strategy() {
        let canary = request(Strategy::Canary).plan().unwrap();
        assert_eq!(percents(&canary.plan.shares), "5,25,50,100");
        assert_eq!(canary.plan.step_interval_seconds, 600);
        assert_eq!((canary.mirror, canary.min_requests), (Share::NONE, 200));
        let steps = canary.steps(Timestamp::from_unix(1000));
        let times: Vec<u64> = steps.iter().map(|s| s.at.unix()).collect();
        assert_eq!(times, [1000, 1600, 2200, 2800]);
        let ab = request(Strategy::Ab).plan().unwrap();
        assert_eq!((percents(&ab.plan.shares).as_str(), ab.plan.step_interval_seconds), ("50", 0));
        let shadow = request(Strategy::Shadow).plan().unwrap();
        assert_eq!((shadow.plan.shares.clone(), shadow.mirror), (vec![Share::NONE], Share::ALL));
    }

    #[test]
    fn plans_refuse_with_the_problem_named() {
        use Strategy::{Ab, Canary, Shadow};
        type Change = Box<dyn FnOnce(&mut StartRequest)>;
        let cases: [(Change, Strategy, &str); 10] = [
            (Box::new(|r| r.guards.push("latency<3".into())), Canary, "unknown metric \"latency\""),
            (
                Box::new(|r| r.steps = Some(vec![5.0, 120.0])),
                Canary,
                "share \"120\" is not a percentage",
            ),
            (Box::new(|r| r.split = Some(-1.0)), Ab, "share \"-1\" is not a percentage"),
            (
                Box::new(|r| r.steps = Some(vec![25.0, 5.0, 100.0])),
                Canary,
                "must increase strictly: 25,5,100",
            ),
            (Box::new(|r| r.steps = Some(vec![5.0, 50.0])), Canary, "last canary step must be 100"),
            (
                Box::new(|r| r.steps = Some(vec![50.0, 100.0])),
                Ab,
                "steps apply to canary rollouts, not ab",
            ),
            (
                Box::new(|r| r.split = Some(10.0)),
                Shadow,
                "a split applies to ab rollouts, not shadow",
            ),
            (
                Box::new(|r| r.split = Some(10.0)),
                Canary,
                "a split applies to ab rollouts, not canary",
            ),
            (
                Box::new(|r| r.guards.push("agreement>0.9".into())),
                Canary,
                "an agreement guard needs mirrored requests",
            ),
            (Box::new(|r| r.group = "Plant A".into()), Canary, "group: "),
        ];
        for (change, strategy, needle) in cases {
            let message = refused(change, strategy);
            assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        }
        let mut mirrored = request(Canary);
        mirrored.guards.push("agreement>0.9".into());
        mirrored.mirror = Some(10.0);
        assert!(mirrored.plan().is_ok());
    }
}
