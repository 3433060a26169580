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
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::db::{self, ts};

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
pub fn order(
    conn: &Connection,
    agent: &str,
    job: &DesiredJob,
    at: Timestamp,
) -> rusqlite::Result<bool> {
    let spec = serde_json::to_string(job).expect("jobs serialise");
    let added = conn.execute(
        "INSERT INTO finetune_jobs (id, agent_id, spec, state, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5) ON CONFLICT (id) DO NOTHING",
        params![job.id, agent, spec, ORDERED, ts(at)],
    )?;
    if added == 1 {
        let detail = json!({
            "agent": agent, "model": job.job.model, "version": job.job.version,
            "data": job.job.data.file, "share_weights": job.share_weights,
        });
        db::event(conn, at, "finetune.order", &job.id, &detail.to_string())?;
    }
    Ok(added == 1)
}

/// An id for a new job: `ft-N`, one above the jobs held.
pub fn next_id(conn: &Connection) -> rusqlite::Result<String> {
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM finetune_jobs", [], |r| r.get(0))?;
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
pub fn open_jobs(conn: &Connection, agent: &str) -> rusqlite::Result<Vec<DesiredJob>> {
    let mut stmt = conn.prepare(
        "SELECT spec FROM finetune_jobs WHERE agent_id = ?1 AND state NOT IN ('succeeded', 'failed')
         ORDER BY created_at, id",
    )?;
    let specs = stmt.query_map([agent], |r| r.get::<_, String>(0))?;
    specs.map(|spec| spec.and_then(|s| parse(&s))).collect()
}

fn parse<T: serde::de::DeserializeOwned>(json: &str) -> rusqlite::Result<T> {
    serde_json::from_str(json).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// Records what `agent` reported of its jobs: a job's first report of an end is an event,
/// and so are weights received. Weights the order did not allow are not kept. A finished
/// job's record no longer changes.
pub fn record_reports(
    conn: &Connection,
    agent: &str,
    reports: &[JobReport],
    at: Timestamp,
) -> rusqlite::Result<()> {
    for report in reports {
        let Some(row) = get(conn, &report.id)?.filter(|row| row.agent == agent) else { continue };
        if matches!(row.state.as_str(), "succeeded" | "failed") {
            continue;
        }
        let mut report = report.clone();
        if !row.order.share_weights && report.weights.take().is_some() {
            tracing::warn!(job = %report.id, agent, "weights the order did not allow were dropped");
        }
        conn.execute(
            "UPDATE finetune_jobs SET state = ?2, report = ?3, updated_at = ?4 WHERE id = ?1",
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
            db::event(conn, at, "finetune.finished", &report.id, &detail.to_string())?;
        }
        if let Some(w) = &report.weights {
            let detail = json!({
                "agent": agent, "derived": report.derived,
                "parameters": w.weights.len() + w.bias.len(),
            });
            db::event(conn, at, "finetune.weights", &report.id, &detail.to_string())?;
        }
    }
    Ok(())
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    let report: Option<String> = r.get(4)?;
    Ok(JobRow {
        id: r.get(0)?,
        agent: r.get(1)?,
        order: parse(&r.get::<_, String>(2)?)?,
        state: r.get(3)?,
        report: report.as_deref().map(parse).transpose()?,
        created_at: Timestamp::from_unix(r.get::<_, i64>(5)? as u64),
        updated_at: Timestamp::from_unix(r.get::<_, i64>(6)? as u64),
    })
}

const COLUMNS: &str = "id, agent_id, spec, state, report, created_at, updated_at";

/// One job.
pub fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<JobRow>> {
    conn.query_row(&format!("SELECT {COLUMNS} FROM finetune_jobs WHERE id = ?1"), [id], row)
        .optional()
}

/// Every job, newest first.
pub fn list(conn: &Connection) -> rusqlite::Result<Vec<JobRow>> {
    let mut stmt =
        conn.prepare(&format!("SELECT {COLUMNS} FROM finetune_jobs ORDER BY created_at DESC, id"))?;
    let rows = stmt.query_map([], row)?;
    rows.collect()
}
