//! Rollouts of a model in a group: a canary whose share grows step by step, an A/B split
//! held until a person decides, or a shadow that runs the candidate on mirrored requests.
//! Each is stored in the control plane's database (SQLite or PostgreSQL, through
//! [`crate::sql`]) with its plan and the steps as issued (absolute times, so agents cut off
//! from the control plane keep stepping), travels in every group agent's desired-state
//! document while it is under way, and ends promoted, rolled back or aborted. Every change
//! of state is an event. Rows are ordered by `seq` (their order of creation), not by
//! SQLite's `rowid`; a step is decided with the rollout's row locked ([`act`]) and starts
//! are one at a time ([`lock_starts`]), so replicas on one PostgreSQL step a rollout once.
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
use serde::{Deserialize, Serialize};
use serde_json::json;
use thiserror::Error;

use plan::spec_problem;

use crate::db::{self, from_ts, ts};
use crate::sql::{AsSql, Backend, OptionalExt, Row, Sql, SqlError, params};

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

fn parse<T: serde::de::DeserializeOwned>(json: &str, column: usize) -> Result<T, SqlError> {
    serde_json::from_str(json).map_err(|e| SqlError::Conversion { column, message: e.to_string() })
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("rollout parts serialise")
}

const COLUMNS: &str = "id, grp, model, baseline, candidate, strategy, plan, steps, mirror, guards,
    min_requests, state, reason, created_at, updated_at, ended_at";

fn row(r: &Row<'_>) -> Result<Rollout, SqlError> {
    let bad = |column: usize, message: String| SqlError::Conversion { column, message };
    let strategy: String = r.get(5)?;
    let state: String = r.get(11)?;
    let mirror: f64 = r.get(8)?;
    Ok(Rollout {
        id: r.get(0)?,
        group: r.get(1)?,
        model: r.get(2)?,
        baseline: r.get::<i64>(3)? as u64,
        candidate: r.get::<i64>(4)? as u64,
        strategy: [Strategy::Canary, Strategy::Ab, Strategy::Shadow]
            .into_iter()
            .find(|s| s.name() == strategy)
            .ok_or_else(|| bad(5, format!("strategy {strategy}")))?,
        plan: parse(&r.get::<String>(6)?, 6)?,
        steps: parse(&r.get::<String>(7)?, 7)?,
        mirror: Share::from_percent(mirror).ok_or_else(|| bad(8, format!("mirror {mirror}")))?,
        guards: parse(&r.get::<String>(9)?, 9)?,
        min_requests: r.get::<i64>(10)? as u64,
        state: RolloutState::from_name(&state).ok_or_else(|| bad(11, format!("state {state}")))?,
        reason: r.get(12)?,
        created_at: from_ts(r.get(13)?),
        updated_at: from_ts(r.get(14)?),
        ended_at: r.get::<Option<i64>>(15)?.map(from_ts),
    })
}

/// Rollouts by group, then model, compared byte by byte (as SQLite orders text; a
/// PostgreSQL database's collation may not).
fn by_group_and_model(mut rollouts: Vec<Rollout>) -> Vec<Rollout> {
    rollouts.sort_by(|a, b| (&a.group, &a.model).cmp(&(&b.group, &b.model)));
    rollouts
}

/// One rollout.
pub fn get<C: AsSql + ?Sized>(conn: &C, id: &str) -> Result<Option<Rollout>, C::Error> {
    Ok(conn
        .sql()
        .query_row(&format!("SELECT {COLUMNS} FROM rollouts WHERE id = $1"), params![id], row)
        .optional()?)
}

/// [`get`] for a step about to be decided: on PostgreSQL the rollout's row stays locked
/// until the transaction ends, so that two replicas stepping it at once step it one
/// after the other (the second sees what the first did); on SQLite the caller's
/// transaction takes the write lock ([`Sql::transaction_immediate`]).
fn get_for_update(sql: &Sql<'_>, id: &str) -> Result<Option<Rollout>, SqlError> {
    sql.query_row(
        &format!("SELECT {COLUMNS} FROM rollouts WHERE id = $1{}", sql.for_update()),
        params![id],
        row,
    )
    .optional()
}

/// The latest rollout of `model` in `group`, whatever its state (latest by creation, then
/// by `seq`, the order rows were stored in).
pub fn latest<C: AsSql + ?Sized>(
    conn: &C,
    group: &str,
    model: &str,
) -> Result<Option<Rollout>, C::Error> {
    let sql = conn.sql();
    Ok(latest_with(&sql, group, model, "")?)
}

fn latest_with(
    sql: &Sql<'_>,
    group: &str,
    model: &str,
    lock: &str,
) -> Result<Option<Rollout>, SqlError> {
    sql.query_row(
        &format!(
            "SELECT {COLUMNS} FROM rollouts WHERE grp = $1 AND model = $2
             ORDER BY created_at DESC, seq DESC LIMIT 1{lock}"
        ),
        params![group, model],
        row,
    )
    .optional()
}

/// The rollout of `model` under way in `group`, if any.
pub fn under_way<C: AsSql + ?Sized>(
    conn: &C,
    group: &str,
    model: &str,
) -> Result<Option<Rollout>, C::Error> {
    Ok(conn
        .sql()
        .query_row(
            &format!(
                "SELECT {COLUMNS} FROM rollouts
                 WHERE grp = $1 AND model = $2 AND state IN ('running', 'paused')"
            ),
            params![group, model],
            row,
        )
        .optional()?)
}

/// The rollouts under way in `group` (every group if `None`), by group and model.
pub fn all_under_way<C: AsSql + ?Sized>(
    conn: &C,
    group: Option<&str>,
) -> Result<Vec<Rollout>, C::Error> {
    let rollouts = conn.sql().query_map(
        &format!(
            "SELECT {COLUMNS} FROM rollouts
             WHERE state IN ('running', 'paused') AND (CAST($1 AS TEXT) IS NULL OR grp = $1)"
        ),
        params![group],
        row,
    )?;
    Ok(by_group_and_model(rollouts))
}

/// Rollouts newest first, of one group and one model when given.
pub fn list<C: AsSql + ?Sized>(
    conn: &C,
    group: Option<&str>,
    model: Option<&str>,
) -> Result<Vec<Rollout>, C::Error> {
    Ok(conn.sql().query_map(
        &format!(
            "SELECT {COLUMNS} FROM rollouts
             WHERE (CAST($1 AS TEXT) IS NULL OR grp = $1) AND (CAST($2 AS TEXT) IS NULL OR model = $2)
             ORDER BY created_at DESC, seq DESC"
        ),
        params![group, model],
        row,
    )?)
}

/// The latest rollout of each (group, model), by group and model.
pub fn latest_each<C: AsSql + ?Sized>(conn: &C) -> Result<Vec<Rollout>, C::Error> {
    let rollouts = conn.sql().query_map(
        &format!(
            "SELECT {COLUMNS} FROM rollouts r WHERE r.seq = (
                 SELECT l.seq FROM rollouts l WHERE l.grp = r.grp AND l.model = r.model
                 ORDER BY l.created_at DESC, l.seq DESC LIMIT 1)"
        ),
        params![],
        row,
    )?;
    Ok(by_group_and_model(rollouts))
}

/// The PostgreSQL advisory lock that makes starts of rollouts, and changes of the
/// deployments a rollout freezes, one at a time across connections (a start numbers the
/// rollout from what is stored, and reads the deployment it takes as its baseline).
/// SQLite's write lock does that there.
const ROLLOUTS_LOCK: i64 = crate::sql::locks::ROLLOUTS;

/// Takes `ROLLOUTS_LOCK` until the transaction ends, on PostgreSQL (every
/// [`crate::db::Db::run`] is one transaction there); nothing on SQLite. A deployment
/// change that checks for a rollout under way takes it before checking.
pub fn lock_starts<C: AsSql + ?Sized>(conn: &C) -> Result<(), C::Error> {
    let sql = conn.sql();
    if sql.backend() == Backend::Postgres {
        sql.execute("SELECT pg_advisory_xact_lock($1)", params![ROLLOUTS_LOCK])?;
    }
    Ok(())
}

/// An id for a new rollout, `ro-N` one above the rollouts held, and its `seq`, one above
/// the highest stored. Under [`lock_starts`].
fn next_id(sql: &Sql<'_>) -> Result<(String, i64), SqlError> {
    let (n, seq): (i64, i64) =
        sql.query_row("SELECT COUNT(*), COALESCE(MAX(seq), 0) FROM rollouts", params![], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let mut n = n + 1;
    loop {
        let id = format!("ro-{n}");
        if get(sql, &id)?.is_none() {
            return Ok((id, seq + 1));
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
/// On PostgreSQL starts are one at a time ([`lock_starts`]).
pub fn start<C: AsSql + ?Sized>(
    conn: &C,
    planned: &Planned,
    now: Timestamp,
) -> Result<Result<Rollout, StartError>, C::Error> {
    Ok(start_on(&conn.sql(), planned, now)?)
}

fn start_on(
    conn: &Sql<'_>,
    planned: &Planned,
    now: Timestamp,
) -> Result<Result<Rollout, StartError>, SqlError> {
    lock_starts(conn)?;
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
    let (id, seq) = next_id(conn)?;
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
        &format!("INSERT INTO rollouts ({COLUMNS}, seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14, NULL, $15)"),
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
            seq,
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
/// `now`. Call it inside a transaction (on SQLite an immediate one): on PostgreSQL the
/// rollout's row is locked while the action is decided, so that of two steps decided at
/// once (an operator's and the judgement's, on two replicas) the second sees the first.
pub fn act<C: AsSql + ?Sized>(
    conn: &C,
    group: &str,
    model: &str,
    action: Action,
    by: &str,
    now: Timestamp,
) -> Result<Result<Rollout, ActError>, C::Error> {
    Ok(act_on(&conn.sql(), group, model, action, by, now)?)
}

fn act_on(
    conn: &Sql<'_>,
    group: &str,
    model: &str,
    action: Action,
    by: &str,
    now: Timestamp,
) -> Result<Result<Rollout, ActError>, SqlError> {
    let Some(rollout) = latest_with(conn, group, model, conn.for_update())? else {
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
    conn: &Sql<'_>,
    rollout: &Rollout,
    by: &str,
    now: Timestamp,
) -> Result<Rollout, SqlError> {
    db::deploy(conn, &rollout.group, &rollout.model, rollout.candidate, now)?;
    transition(conn, rollout, RolloutState::Promoted, None, None, by, now)
}

/// Marks the rollout rolled back because of `reason`: the deployment stays the baseline.
pub(crate) fn roll_back(
    conn: &Sql<'_>,
    rollout: &Rollout,
    reason: &str,
    by: &str,
    now: Timestamp,
) -> Result<Rollout, SqlError> {
    transition(conn, rollout, RolloutState::RolledBack, Some(reason), None, by, now)
}

/// Moves `rollout` to `state` (with new steps, when given) and records the event.
fn transition(
    conn: &Sql<'_>,
    rollout: &Rollout,
    state: RolloutState,
    reason: Option<&str>,
    steps: Option<&[Step]>,
    by: &str,
    now: Timestamp,
) -> Result<Rollout, SqlError> {
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
        "UPDATE rollouts SET state = $2, reason = $3, steps = $4, updated_at = $5, ended_at = $6
         WHERE id = $1",
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
    use falaj_common::keys::Sha256;

    use super::*;
    use crate::db::{BundleRow, DB_FILE, Db};

    fn request(candidate: u64) -> StartRequest {
        StartRequest {
            group: "edge".into(),
            model: "fraud".into(),
            candidate,
            strategy: Strategy::Ab,
            steps: None,
            step_interval_seconds: None,
            split: None,
            mirror: None,
            guards: Vec::new(),
            min_requests: None,
        }
    }

    fn start_at(sql: Sql<'_>, candidate: u64, now: Timestamp) -> Result<Rollout, SqlError> {
        let tx = sql.transaction_immediate()?;
        let started = start(&*tx, &request(candidate).plan().unwrap(), now)?.unwrap();
        tx.commit()?;
        Ok(started)
    }

    /// A control plane upgraded from before `seq` keeps what "latest" meant: the rows it
    /// held are numbered by their `rowid`, and new ones come after them.
    #[test]
    fn an_upgraded_database_keeps_its_rollouts_in_the_order_they_were_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let t = Timestamp::from_unix(1_800_000_000);
        let db = Db::open(&path).unwrap();
        db.run_sync(|sql| {
            for version in 1..=3 {
                let hash = |what: &str| Sha256::of(format!("{what} {version}").as_bytes());
                let row = BundleRow {
                    name: "fraud".into(),
                    version,
                    manifest_sha256: hash("manifest"),
                    bundle_sha256: hash("bundle"),
                    recipe_sha256: hash("recipe"),
                    size: 1,
                    chunks: 1,
                    pushed_at: t,
                };
                db::insert_bundle(&sql, &row)?;
            }
            db::deploy(&sql, "edge", "fraud", 1, t)?;
            // Two rollouts in the same second, the first ended.
            start_at(sql, 2, t)?;
            act(&sql, "edge", "fraud", Action::Abort, OPERATOR, t)?.unwrap();
            start_at(sql, 3, t)?;
            // As a database before migration 10 held them, the first stored last (its
            // `rowid` above the second's): it was the latest then. (Nor had it the
            // outbox of migration 11.)
            sql.execute_batch(
                "DROP INDEX rollouts_by_seq; ALTER TABLE rollouts DROP COLUMN seq;
                 UPDATE rollouts SET rowid = 10 WHERE id = 'ro-1'; DROP TABLE outbox;
                 PRAGMA user_version = 9;",
            )
        })
        .unwrap();
        drop(db);

        let db = Db::open(&path).unwrap();
        let (numbered, first) = db
            .run_sync(|sql| {
                let numbered: Vec<(String, i64)> =
                    sql.query_map("SELECT id, seq FROM rollouts ORDER BY id", params![], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?;
                Ok((numbered, latest(&sql, "edge", "fraud")?.map(|r| r.id)))
            })
            .unwrap();
        assert_eq!(numbered, [("ro-1".to_owned(), 10), ("ro-2".to_owned(), 2)]);
        assert_eq!(first.as_deref(), Some("ro-1"));
        let (third, now_latest) = db
            .run_sync(|sql| {
                // The second ends (not through `act`, which takes the latest: the first).
                let second = get(&sql, "ro-2")?.unwrap();
                transition(&sql, &second, RolloutState::Aborted, None, None, OPERATOR, t)?;
                let third = start_at(sql, 2, t)?;
                Ok((third, latest(&sql, "edge", "fraud")?))
            })
            .unwrap();
        assert_eq!(third.id, "ro-3");
        assert_eq!(now_latest, Some(third));
    }
}
