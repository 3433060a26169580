//! Fine-tune jobs ordered from the control plane: each is for one agent, travels in that
//! agent's desired-state document until the agent reports it finished, and keeps the
//! agent's report (the figures before and after, the loss curve, the gate's decision and,
//! only when the order allowed it, the trained head's weights). Orders, ends and weights
//! received are events in `control.db`: what was asked of a site and what left it is on
//! record.

pub mod api;
pub mod cli;

use falaj_common::finetune::{DesiredJob, JobReport, JobState};
use falaj_common::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::db::{self, from_ts, ts};
use crate::sql::{AsSql, OptionalExt, Row, SqlError, params};

/// The state of a job the agent has not reported yet.
const ORDERED: &str = "ordered";

/// A job as the control plane holds it, and as `GET /v1/finetune[/{id}]` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRow {
    /// The job's id.
    pub id: String,
    /// The agent it is for.
    pub agent: String,
    pub order: DesiredJob,
    /// `ordered` until the agent reports, then the agent's state.
    pub state: String,
    /// The agent's last report.
    pub report: Option<JobReport>,
    /// When it was ordered.
    pub created_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
}

/// Records an order; false if its id is taken.
pub fn order<C: AsSql + ?Sized>(
    conn: &C,
    agent: &str,
    job: &DesiredJob,
    at: Timestamp,
) -> Result<bool, C::Error> {
    let sql = conn.sql();
    let spec = serde_json::to_string(job).expect("jobs serialise");
    let added = sql.execute(
        "INSERT INTO finetune_jobs (id, agent_id, spec, state, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (id) DO NOTHING",
        params![job.id, agent, spec, ORDERED, ts(at)],
    )?;
    if added == 1 {
        let detail = json!({
            "agent": agent, "model": job.job.model, "version": job.job.version,
            "data": job.job.data.file, "share_weights": job.share_weights,
        });
        db::event(&sql, at, "finetune.order", &job.id, &detail.to_string())?;
    }
    Ok(added == 1)
}

/// An id for a new job: `ft-N`, one above the jobs held.
pub fn next_id<C: AsSql + ?Sized>(conn: &C) -> Result<String, C::Error> {
    let n: i64 =
        conn.sql().query_row("SELECT COUNT(*) FROM finetune_jobs", params![], |r| r.get(0))?;
    let mut n = n + 1;
    loop {
        let id = format!("ft-{n}");
        if get(conn, &id)?.is_none() {
            return Ok(id);
        }
        n += 1;
    }
}

/// The jobs `agent`'s document carries: those it has not reported finished.
pub fn open_jobs<C: AsSql + ?Sized>(conn: &C, agent: &str) -> Result<Vec<DesiredJob>, C::Error> {
    let specs: Vec<String> = conn.sql().query_map(
        "SELECT spec FROM finetune_jobs WHERE agent_id = $1 AND state NOT IN ('succeeded', 'failed')
         ORDER BY created_at, id",
        params![agent],
        |r| r.get(0),
    )?;
    Ok(specs.iter().map(|s| parse(s, 0)).collect::<Result<_, _>>()?)
}

fn parse<T: serde::de::DeserializeOwned>(json: &str, column: usize) -> Result<T, SqlError> {
    serde_json::from_str(json).map_err(|e| SqlError::Conversion { column, message: e.to_string() })
}

/// Records what `agent` reported of its jobs: a job's first report of an end is an event,
/// and so are weights received. Weights the order did not allow are not kept. A finished
/// job's record no longer changes (on PostgreSQL the job's row is locked while deciding,
/// so two connections recording the same end record one event).
pub fn record_reports<C: AsSql + ?Sized>(
    conn: &C,
    agent: &str,
    reports: &[JobReport],
    at: Timestamp,
) -> Result<(), C::Error> {
    let sql = conn.sql();
    for report in reports {
        let Some(row) = sql
            .query_row(
                &format!("SELECT {COLUMNS} FROM finetune_jobs WHERE id = $1{}", sql.for_update()),
                params![report.id],
                row,
            )
            .optional()?
            .filter(|row| row.agent == agent)
        else {
            continue;
        };
        if matches!(row.state.as_str(), "succeeded" | "failed") {
            continue;
        }
        let mut report = report.clone();
        if !row.order.share_weights && report.weights.take().is_some() {
            tracing::warn!(job = %report.id, agent, "weights the order did not allow were dropped");
        }
        sql.execute(
            "UPDATE finetune_jobs SET state = $2, report = $3, updated_at = $4 WHERE id = $1",
            params![
                report.id,
                report.state.name(),
                serde_json::to_string(&report).expect("reports serialise"),
                ts(at)
            ],
        )?;
        if matches!(report.state, JobState::Succeeded | JobState::Failed) {
            let detail = json!({
                "agent": agent, "state": report.state.name(), "derived": report.derived,
                "detail": report.detail,
            });
            db::event(&sql, at, "finetune.finished", &report.id, &detail.to_string())?;
        }
        if let Some(w) = &report.weights {
            let detail = json!({
                "agent": agent, "derived": report.derived,
                "parameters": w.weights.len() + w.bias.len(),
            });
            db::event(&sql, at, "finetune.weights", &report.id, &detail.to_string())?;
        }
    }
    Ok(())
}

fn row(r: &Row<'_>) -> Result<JobRow, SqlError> {
    let report: Option<String> = r.get(4)?;
    Ok(JobRow {
        id: r.get(0)?,
        agent: r.get(1)?,
        order: parse(&r.get::<String>(2)?, 2)?,
        state: r.get(3)?,
        report: report.as_deref().map(|j| parse(j, 4)).transpose()?,
        created_at: from_ts(r.get(5)?),
        updated_at: from_ts(r.get(6)?),
    })
}

const COLUMNS: &str = "id, agent_id, spec, state, report, created_at, updated_at";

/// One job.
pub fn get<C: AsSql + ?Sized>(conn: &C, id: &str) -> Result<Option<JobRow>, C::Error> {
    Ok(conn
        .sql()
        .query_row(&format!("SELECT {COLUMNS} FROM finetune_jobs WHERE id = $1"), params![id], row)
        .optional()?)
}

/// Every job, newest first.
pub fn list<C: AsSql + ?Sized>(conn: &C) -> Result<Vec<JobRow>, C::Error> {
    Ok(conn.sql().query_map(
        &format!("SELECT {COLUMNS} FROM finetune_jobs ORDER BY created_at DESC, id"),
        params![],
        row,
    )?)
}
