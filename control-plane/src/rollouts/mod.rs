//! Rollouts of a model in a group: a canary whose share grows step by step, an A/B split
//! held until a person decides, or a shadow that runs the candidate on mirrored requests.
//! Each is stored in `control.db` with its plan and the steps as issued (absolute times, so
//! agents cut off from the control plane keep stepping), travels in every group agent's
//! desired-state document while it is under way, and ends promoted, rolled back or aborted.
//! Every change of state is an event.
//!
//! The rules of a rollout (shares, steps, guards, their judgement) are
//! [`falaj_common::rollout`]'s; this module stores rollouts and moves them between states,
//! [`plan`] checks a start request, [`judge`] decides rollbacks and promotions from the group's windows and the agents'
//! reports, [`view`] assembles what `rollout status` shows, [`api`] and [`cli`] are the
//! routes and commands.

pub mod api;
pub mod cli;
pub mod judge;
pub mod plan;
pub mod view;

use std::time::Duration;

use falaj_common::rollout::{Guard, RolloutSpec, Share, Step, Strategy};
use falaj_common::time::{Timestamp, human_duration};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::json;
use thiserror::Error;

use plan::spec_problem;

use crate::db::{self, from_ts, ts};

pub use judge::{Change, Judgement, evaluate, evaluate_all, run};
pub use plan::{Plan, Planned, StartError, StartRequest};
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

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// `ro-N`.
    pub id: String,
    pub group: String,
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
    NoRollout { group: String, model: String },
    /// The rollout's state does not allow it.
    #[error("rollout {id} is {state}; it cannot {action}", state = state.name(), action = action.name())]
    NotAllowed {
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
