//! Rollouts of a model in a group: a canary whose share grows step by step, an A/B split
//! held until a person decides, or a shadow that runs the candidate on mirrored requests.
//! Each is stored in `control.db` with its plan and the steps as issued (absolute times, so
//! agents cut off from the control plane keep stepping), travels in every group agent's
//! desired-state document while it is under way, and ends promoted, rolled back or aborted.
//! Every change of state is an event.
//!
//! The rules of a rollout (shares, steps, guards, their judgement) are
//! [`falaj_common::rollout`]'s; this module stores rollouts and moves them between states,
//! [`judge`] decides rollbacks and promotions from the group's windows and the agents'
//! reports, [`view`] assembles what `rollout status` shows, [`api`] and [`cli`] are the
//! routes and commands.

pub mod api;
pub mod cli;
pub mod judge;
pub mod view;

use std::time::Duration;

use falaj_common::names;
use falaj_common::rollout::{Guard, RolloutError, RolloutSpec, Share, Step, Strategy};
use falaj_common::time::{Timestamp, human_duration};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::json;
use thiserror::Error;

use crate::db::{self, from_ts, ts};

pub use judge::{Change, Judgement, evaluate, evaluate_all, run};
pub use view::{AgentRollout, RolloutView, VariantView};

/// `[rollouts]` of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutsConfig {
    /// How often rollouts under way are judged over the group's windows and reports.
    #[serde(with = "human_duration")]
    pub evaluate_every: Duration,
}

impl Default for RolloutsConfig {
    fn default() -> Self {
        Self { evaluate_every: Duration::from_secs(5) }
    }
}

/// Who decided a change made through the admin API.
pub const OPERATOR: &str = "operator";
/// Who decided a change the control plane's own judgement made.
pub const CONTROL_PLANE: &str = "control plane";

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

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Under way: steps advance on schedule.
    Running,
    /// Under way, holding the share it had when paused.
    Paused,
    /// The candidate became the group's deployment.
    Promoted,
    /// A guard failed (on an agent or here): the baseline serves everything again.
    RolledBack,
    /// A person stopped it: the baseline stays.
    Aborted,
}

impl RolloutState {
    /// Every state, in the order `/metrics` lists them.
    pub const ALL: [Self; 5] =
        [Self::Running, Self::Paused, Self::Promoted, Self::RolledBack, Self::Aborted];

    /// Its name, as stored and shown.
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Promoted => "promoted",
            Self::RolledBack => "rolled_back",
            Self::Aborted => "aborted",
        }
    }

    /// Whether agents still carry it (running or paused).
    pub fn under_way(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }
}

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

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// `ro-N`.
    pub id: String,
    /// The group.
    pub group: String,
    /// The model.
    pub model: String,
    /// The version the group ran when it started.
    pub baseline: u64,
    /// The version tried.
    pub candidate: u64,
    /// How.
    pub strategy: Strategy,
    /// What was asked for.
    pub plan: Plan,
    /// The steps as issued to agents, with absolute times.
    pub steps: Vec<Step>,
    /// Share of the baseline's requests also run on the candidate.
    pub mirror: Share,
    /// What the candidate must hold to.
    pub guards: Vec<Guard>,
    /// Observations each variant needs before a guard is judged.
    pub min_requests: u64,
    /// Where it stands.
    pub state: RolloutState,
    /// Why it ended, when rolled back (or aborted with a reason).
    pub reason: Option<String>,
    /// When it started.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// When it ended.
    pub ended_at: Option<Timestamp>,
}

impl Rollout {
    /// The rollout as desired-state documents carry it.
    pub fn spec(&self) -> RolloutSpec {
        RolloutSpec {
            id: self.id.clone(),
            model: self.model.clone(),
            baseline: self.baseline,
            candidate: self.candidate,
            strategy: self.strategy,
            steps: self.steps.clone(),
            mirror: self.mirror,
            guards: self.guards.clone(),
            min_requests: self.min_requests,
        }
    }

    /// The candidate's share at `now` (none once it has ended: promoted, the candidate
    /// serves as the deployment, not as a share).
    pub fn share_at(&self, now: Timestamp) -> Share {
        if self.state.under_way() { self.spec().share_at(now) } else { Share::NONE }
    }
}

/// The body of `POST /v1/rollouts`, which the CLI builds from its arguments. Shares are
/// percentages (0 to 100), guards are expressions (`error_rate<0.02`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The group.
    pub group: String,
    /// The model.
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
    /// The group.
    pub group: String,
    /// The model.
    pub model: String,
    /// The candidate version.
    pub candidate: u64,
    /// How.
    pub strategy: Strategy,
    /// The plan.
    pub plan: Plan,
    /// The mirrored share.
    pub mirror: Share,
    /// The guards.
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

    fn spec(&self, id: &str, baseline: u64, now: Timestamp) -> RolloutSpec {
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
    NoBundle {
        /// The model.
        model: String,
        /// The version.
        version: u64,
    },
    /// The group does not run the model, so there is no baseline.
    #[error("{model} is not deployed to group {group}: deploy a baseline first")]
    NoDeployment {
        /// The group.
        group: String,
        /// The model.
        model: String,
    },
    /// The candidate is what the group runs.
    #[error("{model}@{version} is already what group {group} runs (the baseline)")]
    CandidateIsBaseline {
        /// The group.
        group: String,
        /// The model.
        model: String,
        /// The version.
        version: u64,
    },
    /// Another rollout of the model is under way in the group.
    #[error("rollout {id} of {model} in group {group} is {state}; promote or abort it first", state = state.name())]
    Exists {
        /// The rollout under way.
        id: String,
        /// The group.
        group: String,
        /// The model.
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

fn spec_problem(e: RolloutError) -> StartError {
    match e {
        RolloutError::Invalid { problem, .. } => StartError::Invalid(problem),
        RolloutError::Guard { .. } => StartError::Guard(e),
        RolloutError::Share(_) => StartError::Share(e),
    }
}

fn percents(shares: &[Share]) -> String {
    shares.iter().map(|s| s.percent().to_string()).collect::<Vec<_>>().join(",")
}

fn parse<T: serde::de::DeserializeOwned>(json: &str) -> rusqlite::Result<T> {
    serde_json::from_str(json).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("rollout parts serialise")
}

const COLUMNS: &str = "id, grp, model, baseline, candidate, strategy, plan, steps, mirror, guards,
    min_requests, state, reason, created_at, updated_at, ended_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Rollout> {
    let bad = |i: usize, what: String| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, what.into())
    };
    let strategy: String = r.get(5)?;
    let state: String = r.get(11)?;
    let mirror: f64 = r.get(8)?;
    Ok(Rollout {
        id: r.get(0)?,
        group: r.get(1)?,
        model: r.get(2)?,
        baseline: r.get::<_, i64>(3)? as u64,
        candidate: r.get::<_, i64>(4)? as u64,
        strategy: [Strategy::Canary, Strategy::Ab, Strategy::Shadow]
            .into_iter()
            .find(|s| s.name() == strategy)
            .ok_or_else(|| bad(5, format!("strategy {strategy}")))?,
        plan: parse(&r.get::<_, String>(6)?)?,
        steps: parse(&r.get::<_, String>(7)?)?,
        mirror: Share::from_percent(mirror).ok_or_else(|| bad(8, format!("mirror {mirror}")))?,
        guards: parse(&r.get::<_, String>(9)?)?,
        min_requests: r.get::<_, i64>(10)? as u64,
        state: RolloutState::from_name(&state).ok_or_else(|| bad(11, format!("state {state}")))?,
        reason: r.get(12)?,
        created_at: from_ts(r.get(13)?),
        updated_at: from_ts(r.get(14)?),
        ended_at: r.get::<_, Option<i64>>(15)?.map(from_ts),
    })
}

/// One rollout.
pub fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<Rollout>> {
    conn.query_row(&format!("SELECT {COLUMNS} FROM rollouts WHERE id = ?1"), [id], row).optional()
}

/// The latest rollout of `model` in `group`, whatever its state.
pub fn latest(conn: &Connection, group: &str, model: &str) -> rusqlite::Result<Option<Rollout>> {
    conn.query_row(
        &format!(
            "SELECT {COLUMNS} FROM rollouts WHERE grp = ?1 AND model = ?2
             ORDER BY created_at DESC, rowid DESC LIMIT 1"
        ),
        params![group, model],
        row,
    )
    .optional()
}

/// The rollout of `model` under way in `group`, if any.
pub fn under_way(conn: &Connection, group: &str, model: &str) -> rusqlite::Result<Option<Rollout>> {
    conn.query_row(
        &format!(
            "SELECT {COLUMNS} FROM rollouts
             WHERE grp = ?1 AND model = ?2 AND state IN ('running', 'paused')"
        ),
        params![group, model],
        row,
    )
    .optional()
}

/// The rollouts under way in `group` (every group if `None`), by model.
pub fn all_under_way(conn: &Connection, group: Option<&str>) -> rusqlite::Result<Vec<Rollout>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM rollouts
         WHERE state IN ('running', 'paused') AND (?1 IS NULL OR grp = ?1) ORDER BY grp, model"
    ))?;
    stmt.query_map([group], row)?.collect()
}

/// Rollouts newest first, of one group and one model when given.
pub fn list(
    conn: &Connection,
    group: Option<&str>,
    model: Option<&str>,
) -> rusqlite::Result<Vec<Rollout>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM rollouts WHERE (?1 IS NULL OR grp = ?1) AND (?2 IS NULL OR model = ?2)
         ORDER BY created_at DESC, rowid DESC"
    ))?;
    stmt.query_map(params![group, model], row)?.collect()
}

/// The latest rollout of each (group, model), by group and model.
pub fn latest_each(conn: &Connection) -> rusqlite::Result<Vec<Rollout>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM rollouts r WHERE r.rowid = (
             SELECT l.rowid FROM rollouts l WHERE l.grp = r.grp AND l.model = r.model
             ORDER BY l.created_at DESC, l.rowid DESC LIMIT 1)
         ORDER BY grp, model"
    ))?;
    stmt.query_map([], row)?.collect()
}

/// An id for a new rollout: `ro-N`, one above the rollouts held.
fn next_id(conn: &Connection) -> rusqlite::Result<String> {
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM rollouts", [], |r| r.get(0))?;
    let mut n = n + 1;
    loop {
        let id = format!("ro-{n}");
        if get(conn, &id)?.is_none() {
            return Ok(id);
        }
        n += 1;
    }
}

fn detail(r: &Rollout, by: &str) -> serde_json::Value {
    json!({
        "group": r.group, "model": r.model, "baseline": r.baseline, "candidate": r.candidate,
        "strategy": r.strategy, "state": r.state.name(), "reason": r.reason, "by": by,
    })
}

/// Starts a rollout of `planned` at `now`: the baseline is the group's deployed version.
/// Call it inside a transaction, committed only on `Ok(Ok(_))`: a refusal writes nothing.
pub fn start(
    conn: &Connection,
    planned: &Planned,
    now: Timestamp,
) -> rusqlite::Result<Result<Rollout, StartError>> {
    let (group, model, candidate) = (&planned.group, &planned.model, planned.candidate);
    if db::bundle(conn, model, candidate)?.is_none() {
        return Ok(Err(StartError::NoBundle { model: model.clone(), version: candidate }));
    }
    let Some(baseline) = db::deployment(conn, group, model)? else {
        return Ok(Err(StartError::NoDeployment { group: group.clone(), model: model.clone() }));
    };
    if let Some(r) = under_way(conn, group, model)? {
        return Ok(Err(StartError::Exists {
            id: r.id,
            group: group.clone(),
            model: model.clone(),
            state: r.state,
        }));
    }
    if baseline == candidate {
        return Ok(Err(StartError::CandidateIsBaseline {
            group: group.clone(),
            model: model.clone(),
            version: candidate,
        }));
    }
    let id = next_id(conn)?;
    let spec = planned.spec(&id, baseline, now);
    if let Err(e) = spec.check() {
        return Ok(Err(spec_problem(e)));
    }
    let rollout = Rollout {
        id,
        group: group.clone(),
        model: model.clone(),
        baseline,
        candidate,
        strategy: planned.strategy,
        plan: planned.plan.clone(),
        steps: spec.steps,
        mirror: planned.mirror,
        guards: planned.guards.clone(),
        min_requests: planned.min_requests,
        state: RolloutState::Running,
        reason: None,
        created_at: now,
        updated_at: now,
        ended_at: None,
    };
    conn.execute(
        &format!("INSERT INTO rollouts ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?14, NULL)"),
        params![
            rollout.id,
            rollout.group,
            rollout.model,
            rollout.baseline as i64,
            rollout.candidate as i64,
            rollout.strategy.name(),
            to_json(&rollout.plan),
            to_json(&rollout.steps),
            rollout.mirror.percent(),
            to_json(&rollout.guards),
            rollout.min_requests as i64,
            rollout.state.name(),
            rollout.reason,
            ts(now),
        ],
    )?;
    let mut detail = detail(&rollout, OPERATOR);
    detail["steps"] = json!(rollout.steps);
    detail["mirror"] = json!(rollout.mirror);
    detail["guards"] = json!(rollout.guards);
    detail["min_requests"] = json!(rollout.min_requests);
    db::event(conn, now, "rollout.start", &rollout.id, &detail.to_string())?;
    Ok(Ok(rollout))
}

/// What a person may do to a rollout under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The candidate becomes the group's deployment.
    Promote,
    /// Stop; the baseline stays.
    Abort,
    /// Hold the current share.
    Pause,
    /// Continue the remaining steps from now.
    Resume,
}

impl Action {
    /// Its name in routes and commands.
    pub fn name(self) -> &'static str {
        match self {
            Self::Promote => "promote",
            Self::Abort => "abort",
            Self::Pause => "pause",
            Self::Resume => "resume",
        }
    }

    /// The action named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Promote, Self::Abort, Self::Pause, Self::Resume]
            .into_iter()
            .find(|a| a.name() == name)
    }
}

/// Why an action was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ActError {
    /// The model never had a rollout in the group.
    #[error("no rollout of {model} in group {group}")]
    NoRollout {
        /// The group.
        group: String,
        /// The model.
        model: String,
    },
    /// The rollout's state does not allow it.
    #[error("rollout {id} is {state}; it cannot {action}", state = state.name(), action = action.name())]
    NotAllowed {
        /// The rollout.
        id: String,
        /// Its state.
        state: RolloutState,
        /// What was asked.
        action: Action,
    },
}

/// Applies `action` to the rollout of `model` under way in `group`, decided by `by`, at
/// `now`. Call it inside a transaction.
pub fn act(
    conn: &Connection,
    group: &str,
    model: &str,
    action: Action,
    by: &str,
    now: Timestamp,
) -> rusqlite::Result<Result<Rollout, ActError>> {
    let Some(rollout) = latest(conn, group, model)? else {
        return Ok(Err(ActError::NoRollout { group: group.into(), model: model.into() }));
    };
    let refused =
        || Err(ActError::NotAllowed { id: rollout.id.clone(), state: rollout.state, action });
    let done = match (action, rollout.state) {
        (Action::Promote, RolloutState::Running | RolloutState::Paused) => {
            promote(conn, &rollout, by, now)?
        }
        (Action::Abort, RolloutState::Running | RolloutState::Paused) => {
            transition(conn, &rollout, RolloutState::Aborted, None, None, by, now)?
        }
        (Action::Pause, RolloutState::Running) => {
            let mut reached: Vec<Step> =
                rollout.steps.iter().copied().filter(|s| s.at <= now).collect();
            if reached.is_empty() {
                reached.extend(rollout.steps.first().copied());
            }
            transition(conn, &rollout, RolloutState::Paused, None, Some(&reached), by, now)?
        }
        (Action::Resume, RolloutState::Paused) => {
            let issued = rollout.steps.len();
            let interval = rollout.plan.step_interval_seconds;
            let mut steps = rollout.steps.clone();
            steps.extend((1u64..).zip(rollout.plan.shares.iter().skip(issued)).map(
                |(k, &share)| Step {
                    at: now.saturating_add(Duration::from_secs(k.saturating_mul(interval))),
                    share,
                },
            ));
            transition(conn, &rollout, RolloutState::Running, None, Some(&steps), by, now)?
        }
        _ => return Ok(refused()),
    };
    Ok(Ok(done))
}

/// Makes the candidate the group's deployment and marks the rollout promoted.
pub(crate) fn promote(
    conn: &Connection,
    rollout: &Rollout,
    by: &str,
    now: Timestamp,
) -> rusqlite::Result<Rollout> {
    db::deploy(conn, &rollout.group, &rollout.model, rollout.candidate, now)?;
    transition(conn, rollout, RolloutState::Promoted, None, None, by, now)
}

/// Marks the rollout rolled back because of `reason`: the deployment stays the baseline.
pub(crate) fn roll_back(
    conn: &Connection,
    rollout: &Rollout,
    reason: &str,
    by: &str,
    now: Timestamp,
) -> rusqlite::Result<Rollout> {
    transition(conn, rollout, RolloutState::RolledBack, Some(reason), None, by, now)
}

/// Moves `rollout` to `state` (with new steps, when given) and records the event.
fn transition(
    conn: &Connection,
    rollout: &Rollout,
    state: RolloutState,
    reason: Option<&str>,
    steps: Option<&[Step]>,
    by: &str,
    now: Timestamp,
) -> rusqlite::Result<Rollout> {
    let mut next = rollout.clone();
    next.state = state;
    next.updated_at = now;
    if reason.is_some() {
        next.reason = reason.map(str::to_owned);
    }
    if let Some(steps) = steps {
        next.steps = steps.to_vec();
    }
    if !state.under_way() {
        next.ended_at = Some(now);
    }
    conn.execute(
        "UPDATE rollouts SET state = ?2, reason = ?3, steps = ?4, updated_at = ?5, ended_at = ?6
         WHERE id = ?1",
        params![
            next.id,
            state.name(),
            next.reason,
            to_json(&next.steps),
            ts(now),
            next.ended_at.map(ts)
        ],
    )?;
    let kind = match (rollout.state, state) {
        (_, RolloutState::Paused) => "rollout.pause",
        (RolloutState::Paused, RolloutState::Running) => "rollout.resume",
        (_, RolloutState::Running) => "rollout.start",
        (_, RolloutState::Promoted) => "rollout.promote",
        (_, RolloutState::RolledBack) => "rollout.rollback",
        (_, RolloutState::Aborted) => "rollout.abort",
    };
    let mut detail = detail(&next, by);
    if steps.is_some() {
        detail["steps"] = json!(next.steps);
    }
    db::event(conn, now, kind, &next.id, &detail.to_string())?;
    Ok(next)
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
