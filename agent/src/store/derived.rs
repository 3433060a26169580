//! Derived models: versions an agent made itself by fine-tuning a model's head on site
//! data. Each is an ordinary, unmanaged bundle under its own name (`PARENT.ftN`, at the
//! parent's version) whose manifest carries its lineage and no signature; the `overlays`
//! table names the derived model that serves requests for its parent's name, while the
//! parent's version is the one active (a new parent version ends the overlay). The `jobs`
//! table holds the fine-tune jobs a control plane ordered: each id runs once.

use std::time::SystemTime;

use falaj_common::bundle::Manifest;
use falaj_common::finetune::{DesiredJob, JobReport, JobState};
use falaj_common::time::Timestamp;
use rusqlite::{OptionalExtension, params};

use super::{InstallMode, Result, Store, StoreError};

/// A derived model serving in place of its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// The parent's name: requests for it without a version go to `derived`.
    pub name: String,
    /// The derived model's name.
    pub derived: String,
    /// Its version: the parent version it was derived from.
    pub version: u64,
}

impl Store {
    /// The name for the next model derived from `parent`: `PARENT.ftN`, one above any
    /// held, or `None` when that would outgrow a model name.
    pub fn next_derived_name(&self, parent: &str) -> Result<Option<String>> {
        let prefix = format!("{parent}.ft");
        let mut stmt = self.conn.prepare("SELECT DISTINCT name FROM bundles").map_err(self.db())?;
        let names = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(self.db())?;
        let mut highest = 0u64;
        for name in names {
            let name = name.map_err(self.db())?;
            if let Some(n) = name.strip_prefix(&prefix).and_then(|n| n.parse::<u64>().ok()) {
                highest = highest.max(n);
            }
        }
        let name = format!("{prefix}{}", highest + 1);
        Ok(falaj_common::names::check_model_name(&name).is_ok().then_some(name))
    }

    /// Installs a derived model (a verified, sealed, fsynced staged bundle of its own name, never
    /// installed before) as the active version of its name and, with `overlay`, as what
    /// serves its parent's name; in one transaction, with an event.
    pub fn install_derived(
        &mut self,
        staged: super::Sealed,
        manifest: &Manifest,
        manifest_bytes: &[u8],
        overlay: bool,
        now: SystemTime,
    ) -> Result<()> {
        let lineage = manifest.model().and_then(|m| m.lineage.as_ref());
        let Some(lineage) = lineage else {
            return Err(StoreError::Refused(format!(
                "{}@{} has no lineage: only derived models install this way",
                manifest.name, manifest.version
            )));
        };
        let (parent, name, version) =
            (lineage.parent.clone(), manifest.name.clone(), manifest.version);
        let detail = format!("derived from {parent}@{version}; {}", lineage.gate.reason);
        self.install_with(
            staged,
            manifest,
            manifest_bytes,
            InstallMode { activate: true, managed: false },
            now,
            |existing| {
                if existing.is_empty() {
                    Ok(true)
                } else {
                    Err(StoreError::Refused(format!("a model named {name:?} is already installed")))
                }
            },
            |tx, at| {
                if overlay {
                    tx.execute(
                        "INSERT INTO overlays (name, derived, version, activated_at) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (name) DO UPDATE SET derived = excluded.derived,
                             version = excluded.version, activated_at = excluded.activated_at",
                        params![parent, manifest.name, version as i64, at],
                    )?;
                }
                super::audit::event(tx, at, "finetune", Some((&manifest.name, version)), &detail)
            },
        )
        .map(drop)
    }

    /// Every overlay.
    pub fn overlays(&self) -> Result<Vec<Overlay>> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, derived, version FROM overlays ORDER BY name")
            .map_err(self.db())?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Overlay {
                    name: r.get(0)?,
                    derived: r.get(1)?,
                    version: r.get::<_, i64>(2)? as u64,
                })
            })
            .map_err(self.db())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.db())
    }

    /// Records the jobs of a document not seen before as pending; returns how many.
    pub fn enqueue_jobs(&self, jobs: &[DesiredJob], now: SystemTime) -> Result<usize> {
        let at = Timestamp::from_system(now).unix() as i64;
        let mut added = 0;
        for job in jobs {
            let spec = serde_json::to_string(job).expect("jobs serialise");
            added += self
                .conn
                .execute(
                    "INSERT INTO jobs (id, spec, state, updated_at) VALUES (?1, ?2, 'pending', ?3)
                     ON CONFLICT (id) DO NOTHING",
                    params![job.id, spec, at],
                )
                .map_err(self.db())?;
        }
        Ok(added)
    }

    /// The oldest pending job, marked running.
    pub fn start_next_job(&self, now: SystemTime) -> Result<Option<DesiredJob>> {
        let found: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT id, spec FROM jobs WHERE state = 'pending' ORDER BY rowid LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.db())?;
        let Some((id, spec)) = found else { return Ok(None) };
        let job: DesiredJob = serde_json::from_str(&spec).map_err(|e| StoreError::Damaged {
            name: id.clone(),
            version: 0,
            path: self.db_path.clone(),
            problem: format!("stored job does not parse: {e}"),
        })?;
        self.conn
            .execute(
                "UPDATE jobs SET state = 'running', updated_at = ?2 WHERE id = ?1",
                params![id, Timestamp::from_system(now).unix() as i64],
            )
            .map_err(self.db())?;
        Ok(Some(job))
    }

    /// Records how a job ended: its report, and the state the report gives.
    pub fn finish_job(&self, report: &JobReport, now: SystemTime) -> Result<()> {
        let json = serde_json::to_string(report).expect("reports serialise");
        self.conn
            .execute(
                "UPDATE jobs SET state = ?2, report = ?3, updated_at = ?4 WHERE id = ?1",
                params![
                    report.id,
                    report.state.name(),
                    json,
                    Timestamp::from_system(now).unix() as i64
                ],
            )
            .map(drop)
            .map_err(self.db())
    }

    /// Marks jobs left running by a stopped agent as failed; returns their ids.
    pub fn fail_interrupted_jobs(&self, now: SystemTime) -> Result<Vec<String>> {
        let mut stmt =
            self.conn.prepare("SELECT id FROM jobs WHERE state = 'running'").map_err(self.db())?;
        let ids: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .map_err(self.db())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.db())?;
        for id in &ids {
            let interrupted = "interrupted: the agent stopped while it ran".to_owned();
            self.finish_job(&JobReport::failed(id, interrupted), now)?;
        }
        Ok(ids)
    }

    /// What the agent reports of each job among `ids` that it knows.
    pub fn job_reports(&self, ids: &[String]) -> Result<Vec<JobReport>> {
        let mut out = Vec::new();
        for id in ids {
            let row: Option<(String, Option<String>)> = self
                .conn
                .query_row("SELECT state, report FROM jobs WHERE id = ?1", [id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .map_err(self.db())?;
            let Some((state, report)) = row else { continue };
            let damaged = |problem: String| StoreError::Damaged {
                name: id.clone(),
                version: 0,
                path: self.db_path.clone(),
                problem,
            };
            out.push(match report {
                Some(json) => serde_json::from_str(&json)
                    .map_err(|e| damaged(format!("stored job report does not parse: {e}")))?,
                None => JobReport::state(
                    id,
                    JobState::parse(&state)
                        .ok_or_else(|| damaged(format!("stored job state {state:?} is unknown")))?,
                ),
            });
        }
        Ok(out)
    }
}
