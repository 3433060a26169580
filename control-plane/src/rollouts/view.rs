//! What `GET /v1/groups/{group}/rollouts/{model}` answers and `rollout status` prints: the
//! rollout, the step and share in force, each variant's figures, each guard's verdict, the
//! accuracy test of an A/B experiment, and where each agent of the group stands.

use falaj_common::rollout::{
    Figures, GuardResult, RolloutReport, Share, judge, two_proportion_p_value,
};
use falaj_common::time::Timestamp;
use serde::{Deserialize, Serialize};

use super::Rollout;
use crate::db;
use crate::sql::AsSql;

/// A rollout's status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutView {
    /// The rollout as stored.
    #[serde(flatten)]
    pub rollout: Rollout,
    /// When the figures were computed.
    pub at: Timestamp,
    /// The index of the step in force (none before the first, or once ended).
    pub step: Option<usize>,
    /// The candidate's share now.
    pub share: Share,
    /// Each variant's figures since the rollout began (until it ended).
    pub variants: Variants,
    /// Each guard judged on those figures.
    pub guard_results: Vec<GuardResult>,
    /// Two-sided p-value of a two-proportion z-test of the variants' accuracies, when both
    /// have labels of classes.
    pub accuracy_p_value: Option<f64>,
    /// The group's agents.
    pub agents: Vec<AgentRollout>,
}

/// The two variants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variants {
    /// The version serving before.
    pub baseline: VariantView,
    /// The version tried.
    pub candidate: VariantView,
}

/// One variant's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantView {
    pub version: u64,
    /// Requests, errors, latency, PSI, shadow comparisons and feedback.
    #[serde(flatten)]
    pub figures: Figures,
    /// Rows agreed over rows compared with the baseline (mirrored requests).
    pub agreement: Option<f64>,
    /// Labels predicted right over labels received, when the labels are classes.
    pub accuracy: Option<f64>,
    /// Mean absolute error against the labels, when they are values.
    pub mae: Option<f64>,
}

impl VariantView {
    fn of(version: u64, figures: Figures) -> Self {
        let ratio = |a: f64, b: u64| (b > 0).then(|| a / b as f64);
        let labelled = figures.labelled;
        let regression = figures.abs_error > 0.0;
        Self {
            version,
            agreement: ratio(figures.agreed as f64, figures.compared),
            accuracy: ratio(figures.correct as f64, labelled).filter(|_| !regression),
            mae: ratio(figures.abs_error, labelled).filter(|_| regression || figures.correct == 0),
            figures,
        }
    }
}

/// One agent of the group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRollout {
    pub id: String,
    /// Whether it has a live session.
    pub connected: bool,
    /// When it was last heard from.
    pub last_seen: Option<Timestamp>,
    /// The version of the last desired-state document it applied.
    pub applied_version: Option<u64>,
    /// Its account of this rollout (step, rolled back and why), if it reported one.
    pub report: Option<RolloutReport>,
}

/// The status of `rollout` at `now`, agents shown as not connected (the caller knows
/// the sessions).
pub fn build<C: AsSql + ?Sized>(
    conn: &C,
    rollout: Rollout,
    now: Timestamp,
) -> Result<RolloutView, C::Error> {
    let (baseline, candidate) = super::judge::measure(conn, &rollout)?;
    let guard_results = judge(&rollout.guards, rollout.min_requests, &baseline, &candidate);
    let classes = |f: &Figures| f.labelled > 0 && f.abs_error == 0.0;
    let accuracy_p_value = (classes(&baseline) && classes(&candidate))
        .then(|| {
            two_proportion_p_value(
                baseline.correct,
                baseline.labelled,
                candidate.correct,
                candidate.labelled,
            )
        })
        .flatten();
    let agents = db::agents(conn)?
        .into_iter()
        .filter(|a| a.group == rollout.group && a.revoked_at.is_none())
        .map(|a| {
            let actual = a.actual.unwrap_or_default();
            AgentRollout {
                report: actual.rollouts.into_iter().find(|r| r.id == rollout.id),
                applied_version: actual.desired_version,
                last_seen: a.last_seen,
                connected: false,
                id: a.id,
            }
        })
        .collect();
    let under_way = rollout.state.under_way();
    Ok(RolloutView {
        at: now,
        step: rollout.spec().step_at(now).filter(|_| under_way),
        share: rollout.share_at(now),
        variants: Variants {
            baseline: VariantView::of(rollout.baseline, baseline),
            candidate: VariantView::of(rollout.candidate, candidate),
        },
        guard_results,
        accuracy_p_value,
        agents,
        rollout,
    })
}
