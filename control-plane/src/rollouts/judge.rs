//! The control plane's judgement of rollouts under way, every `[rollouts] evaluate_every`:
//! an agent that reports the rollout rolled back rolls it back for the whole group; else
//! the guards are judged over the group's windows since the rollout began (one rollup per
//! variant) and a failing one rolls it back; else a canary whose last step has begun is
//! promoted once every guard holds. Each of these decisions is notified to the alert
//! webhooks (`rollout.rolled_back`, `rollout.promoted`): recorded in the outbox in the
//! decision's own transaction ([`crate::outbox`] sends it).
//!
//! The decision itself is [`falaj_common::rollout::judge`]'s, the same one agents make
//! over their own windows.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use falaj_common::rollout::{Figures, GuardResult, Strategy, Verdict, failure, judge};
use falaj_common::time::Timestamp;
use serde::{Deserialize, Serialize};

use super::{CONTROL_PLANE, Rollout, RolloutState, RolloutsConfig};
use crate::db::{self, DbError};
use crate::monitoring::{self, MetricsQuery};
use crate::outbox::{self, Webhooks};
use crate::sql::{AsSql, Sql, SqlError};
use crate::state::Shared;

/// A rollout judged: each variant's figures since it began and each guard's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// The rollout, after any change the judgement made.
    pub rollout: Rollout,
    /// The baseline's figures.
    pub baseline: Figures,
    /// The candidate's figures.
    pub candidate: Figures,
    /// Each guard judged.
    pub guards: Vec<GuardResult>,
    /// When.
    pub at: Timestamp,
}

/// A rollout the judgement ended: rolled back or promoted.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The rollout after the change (its state and reason).
    pub rollout: Rollout,
    /// Who decided: `agent ID` or `control plane`.
    pub by: String,
}

/// What a webhook receives when the judgement rolls a rollout back or promotes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// `rollout.rolled_back` or `rollout.promoted`.
    pub kind: String,
    /// The rollout's id.
    pub rollout: String,
    pub group: String,
    pub model: String,
    /// The version serving before (and again, after a rollback).
    pub baseline: u64,
    /// The version rolled back, or promoted.
    pub candidate: u64,
    pub strategy: Strategy,
    /// Why it was rolled back (empty for a promotion).
    pub reason: String,
    /// Who decided.
    pub by: String,
    /// When.
    pub at: Timestamp,
    /// The control plane's region.
    pub region: String,
}

impl Notification {
    /// The notification of a rollback or a promotion.
    pub fn of(change: &Change, region: &str) -> Self {
        let r = &change.rollout;
        let kind = match r.state {
            RolloutState::Promoted => "rollout.promoted",
            _ => "rollout.rolled_back",
        };
        Self {
            kind: kind.into(),
            rollout: r.id.clone(),
            group: r.group.clone(),
            model: r.model.clone(),
            baseline: r.baseline,
            candidate: r.candidate,
            strategy: r.strategy,
            reason: r.reason.clone().unwrap_or_default(),
            by: change.by.clone(),
            at: r.updated_at,
            region: region.to_owned(),
        }
    }
}

/// The baseline's and the candidate's figures over the group's windows that started
/// within the rollout (since it began; before it ended, when it has), PSI against each
/// version's reference profile.
pub fn measure<C: AsSql + ?Sized>(
    conn: &C,
    rollout: &Rollout,
) -> Result<(Figures, Figures), C::Error> {
    let query = MetricsQuery {
        model: rollout.model.clone(),
        version: None,
        group: Some(rollout.group.clone()),
        agent: None,
        since: rollout.created_at,
    };
    let rollups = monitoring::rollups_between(conn, &query, rollout.ended_at)?;
    let figures = |version: u64| -> Result<Figures, C::Error> {
        let Some(v) = rollups.get(&version) else { return Ok(Figures::default()) };
        let reference = monitoring::reference(conn, &rollout.model, version)?;
        Ok(Figures::of(&v.rollup.counts, reference.as_ref()))
    };
    Ok((figures(rollout.baseline)?, figures(rollout.candidate)?))
}

/// The first agent of the group (by id) that reports `rollout` rolled back, and its reason.
fn agent_rollback(sql: &Sql<'_>, rollout: &Rollout) -> Result<Option<(String, String)>, SqlError> {
    Ok(db::agents(sql)?
        .into_iter()
        .filter(|a| a.group == rollout.group && a.revoked_at.is_none())
        .find_map(|a| {
            let report =
                a.actual?.rollouts.into_iter().find(|r| r.id == rollout.id && r.rolled_back)?;
            let reason = report.reason.unwrap_or_else(|| "no reason given".into());
            Some((a.id, reason))
        }))
}

/// Judges one rollout under way at `now` and applies the decision, in one transaction
/// (a savepoint, inside one) with the notification of a rollback or promotion to
/// `webhooks`. The rollout's row is locked while it is judged (on PostgreSQL; SQLite's
/// immediate transaction takes the write lock), so that two replicas judging at once
/// decide one after the other and a rollout ends once.
pub fn judge_one<C: AsSql + ?Sized>(
    conn: &C,
    id: &str,
    webhooks: Webhooks<'_>,
    now: Timestamp,
) -> Result<Option<(Judgement, Option<Change>)>, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction_immediate()?;
    // Read again inside the transaction: a person may have acted since the list was read.
    let Some(rollout) = super::get_for_update(&tx, id)?.filter(|r| r.state.under_way()) else {
        return Ok(None);
    };
    let (baseline, candidate) = measure(&tx, &rollout)?;
    let guards = judge(&rollout.guards, rollout.min_requests, &baseline, &candidate);
    let change = if let Some((agent, reason)) = agent_rollback(&tx, &rollout)? {
        let by = format!("agent {agent}");
        let reason = format!("{by}: {reason}");
        Some(Change { rollout: super::roll_back(&tx, &rollout, &reason, &by, now)?, by })
    } else if let Some(failed) = failure(&guards) {
        let reason = format!("{CONTROL_PLANE}: {failed}");
        let rolled_back = super::roll_back(&tx, &rollout, &reason, CONTROL_PLANE, now)?;
        Some(Change { rollout: rolled_back, by: CONTROL_PLANE.into() })
    } else if rollout.state == RolloutState::Running
        && rollout.strategy == Strategy::Canary
        && rollout.spec().at_last_step(now)
        && guards.iter().all(|g| g.verdict == Verdict::Holds)
    {
        let promoted = super::promote(&tx, &rollout, CONTROL_PLANE, now)?;
        Some(Change { rollout: promoted, by: CONTROL_PLANE.into() })
    } else {
        None
    };
    if let Some(change) = &change {
        let body = serde_json::to_vec(&Notification::of(change, webhooks.region)).map_err(|e| {
            SqlError::Encode { what: "a rollout notification", message: e.to_string() }
        })?;
        let r = &change.rollout;
        let what = match r.state {
            RolloutState::Promoted => format!("rollout {} promoted", r.id),
            _ => format!("rollout {} rolled back", r.id),
        };
        outbox::enqueue(&tx, webhooks.urls.iter().map(String::as_str), &body, &what, now)?;
    }
    tx.commit()?;
    let rollout = change.as_ref().map_or(rollout, |c| c.rollout.clone());
    Ok(Some((Judgement { rollout, baseline, candidate, guards, at: now }, change)))
}

/// Judges every rollout under way at `now`, each in its own transaction (a savepoint
/// inside one: the daemon judges each through its own [`crate::db::Db::run`] instead, in
/// [`evaluate`]); returns the judgements and the rollouts it ended.
pub fn evaluate_all<C: AsSql + ?Sized>(
    conn: &C,
    webhooks: Webhooks<'_>,
    now: Timestamp,
) -> Result<(Vec<Judgement>, Vec<Change>), C::Error> {
    let ids: Vec<String> = super::all_under_way(conn, None)?.into_iter().map(|r| r.id).collect();
    let (mut judgements, mut changes) = (Vec::new(), Vec::new());
    for id in ids {
        if let Some((judgement, change)) = judge_one(conn, &id, webhooks, now)? {
            judgements.push(judgement);
            changes.extend(change);
        }
    }
    Ok((judgements, changes))
}

/// The last judgement of each (group, model), for `/metrics`.
pub type Judged = std::sync::Mutex<BTreeMap<(String, String), Judgement>>;

/// Writes pending agent reports, judges every rollout under way at `now` (recording
/// the notifications of the rollbacks and promotions it makes to `webhooks`), keeps the judgements for `/metrics`, and
/// sends the groups of rollouts it ended new documents.
pub async fn evaluate(
    shared: &Shared,
    webhooks: &[String],
    now: SystemTime,
) -> Result<Vec<Change>, DbError> {
    shared.flush_seen().await?;
    let at = Timestamp::from_system(now);
    let ids: Vec<String> = shared
        .db
        .run(|sql| Ok(super::all_under_way(&sql, None)?.into_iter().map(|r| r.id).collect()))
        .await?;
    let (mut judgements, mut changes) = (Vec::new(), Vec::new());
    for id in ids {
        let (urls, region) = (webhooks.to_vec(), shared.region.clone());
        let judged = shared
            .db
            .run(move |sql| judge_one(&sql, &id, Webhooks { urls: &urls, region: &region }, at))
            .await?;
        if let Some((judgement, change)) = judged {
            judgements.push(judgement);
            changes.extend(change);
        }
    }
    {
        let mut judged = shared.judged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for j in judgements {
            judged.insert((j.rollout.group.clone(), j.rollout.model.clone()), j);
        }
    }
    if !changes.is_empty() {
        shared.outbox.queued.notify_one();
    }
    for change in &changes {
        let r = &change.rollout;
        if r.state == RolloutState::RolledBack {
            tracing::warn!(
                rollout = %r.id, group = %r.group, model = %r.model, candidate = r.candidate,
                reason = r.reason.as_deref().unwrap_or(""), "rollout rolled back"
            );
        } else {
            tracing::info!(
                rollout = %r.id, group = %r.group, model = %r.model, candidate = r.candidate,
                state = r.state.name(), by = %change.by, "rollout ended"
            );
        }
        shared.push_desired(Some(&r.group), now).await?;
    }
    Ok(changes)
}

/// Judges rollouts every `config.evaluate_every`, recording each rollback's or promotion's
/// notification to `webhooks`, until `stop`.
pub async fn run(
    shared: Arc<Shared>,
    config: RolloutsConfig,
    webhooks: Vec<String>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(config.evaluate_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = ticks.tick() => {}
            () = shared.rollback_reported.notified() => {}
        }
        if let Err(err) = evaluate(&shared, &webhooks, SystemTime::now()).await {
            tracing::error!(error = %err, "judging rollouts failed");
        }
    }
}
