//! The parts of the store that a control plane drives: activation and removal of
//! versions, the index of chunks inside installed bundles (for delta transfers), the
//! agent's enrolled identity and the last desired-state document accepted.

use std::path::PathBuf;
use std::time::SystemTime;

use falaj_common::keys::Sha256;
use falaj_common::protocol::HeldBundle;
use falaj_common::time::Timestamp;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{Result, Store, StoreError};

/// Makes `version` the active version of `name`.
pub(super) fn set_active(
    conn: &Connection,
    name: &str,
    version: u64,
    at: i64,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO active (name, version, activated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (name) DO UPDATE SET version = excluded.version, activated_at = excluded.activated_at",
        params![name, version as i64, at],
    )
    .map(drop)
}

/// Where a chunk's bytes can be read locally: a slice of an installed bundle file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSource {
    /// The bundle file.
    pub path: PathBuf,
    /// Offset of the chunk in it.
    pub offset: u64,
    /// The chunk's length.
    pub size: u32,
}

/// The agent's enrolled identity (its key and certificates are files beside the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The id the control plane gave it.
    pub agent_id: String,
    /// Its group.
    pub group: String,
    /// The control plane's QUIC addresses as given at enrollment: `host:port`, several
    /// (one per replica) separated by commas. A store written by an agent that knew one
    /// address holds that one, which reads as a list of one.
    pub control_plane: String,
}

impl Identity {
    /// The control plane's addresses, in the enrolled order (each `host:port`; a name may
    /// stand for several). Text that is not a list is handed on as one address, whose
    /// dialling then fails and says why.
    pub fn control_planes(&self) -> Vec<String> {
        falaj_common::session::addresses::parse_list(&self.control_plane)
            .unwrap_or_else(|_| vec![self.control_plane.clone()])
    }
}

impl Store {
    pub(super) fn write_tx<R>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<R>,
    ) -> Result<R> {
        let path = self.db_path.clone();
        let db = |source| StoreError::Db { path: path.clone(), source };
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
        let out = f(&tx).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(out)
    }

    /// Makes `version` of `name` the active one; false if it is not installed.
    pub fn activate(&mut self, name: &str, version: u64, now: SystemTime) -> Result<bool> {
        let at = Timestamp::from_system(now).unix() as i64;
        self.write_tx(|tx| {
            let exists: i64 = tx.query_row(
                "SELECT COUNT(*) FROM bundles WHERE name = ?1 AND version = ?2",
                params![name, version as i64],
                |r| r.get(0),
            )?;
            if exists == 0 {
                return Ok(false);
            }
            set_active(tx, name, version, at)?;
            super::audit::event(tx, at, "activate", Some((name, version)), "")?;
            Ok(true)
        })
    }

    /// Removes a version an operator installed by hand (`falaj-agent remove`), so that
    /// air-gapped sites can reclaim space: refused for the active version, which serves,
    /// and for versions the control plane manages, which it would install again.
    pub fn remove_imported(&mut self, name: &str, version: u64, now: SystemTime) -> Result<()> {
        let held = self.held()?;
        let Some(bundle) = held.iter().find(|h| h.name == name && h.version == version) else {
            return Err(StoreError::Refused(format!("{name}@{version} is not installed")));
        };
        if bundle.active {
            return Err(StoreError::Refused(format!(
                "{name}@{version} is the active version of {name}: import or activate another version first"
            )));
        }
        if bundle.managed {
            return Err(StoreError::Refused(format!(
                "{name}@{version} is managed by the control plane: undeploy it there"
            )));
        }
        self.remove(name, version, now).map(drop)
    }

    /// Removes the versions an operator imported by hand that no longer serve, keeping the
    /// newest `keep` of each model besides its active one (`[models] keep_inactive`).
    /// Versions the control plane manages follow its deployments and are left alone, as
    /// are versions a derived model stands in for. Returns what was removed.
    pub fn prune_imported(&mut self, keep: usize, now: SystemTime) -> Result<Vec<(String, u64)>> {
        let overlaid: std::collections::BTreeSet<(String, u64)> =
            self.overlays()?.into_iter().map(|o| (o.name, o.version)).collect();
        let mut inactive = std::collections::BTreeMap::<String, Vec<u64>>::new();
        for h in self.held()? {
            if !h.active && !h.managed && !overlaid.contains(&(h.name.clone(), h.version)) {
                inactive.entry(h.name).or_default().push(h.version);
            }
        }
        let mut removed = Vec::new();
        for (name, mut versions) in inactive {
            versions.sort_unstable_by(|a, b| b.cmp(a));
            for &version in versions.iter().skip(keep) {
                if self.remove(&name, version, now)? {
                    removed.push((name.clone(), version));
                }
            }
        }
        Ok(removed)
    }

    /// Removes `version` of `name` (and its activation); the file is deleted after the
    /// transaction commits. False if it was not installed.
    pub fn remove(&mut self, name: &str, version: u64, now: SystemTime) -> Result<bool> {
        let at = Timestamp::from_system(now).unix() as i64;
        let path: Option<String> = self.write_tx(|tx| {
            let path: Option<String> = tx
                .query_row(
                    "SELECT path FROM bundles WHERE name = ?1 AND version = ?2",
                    params![name, version as i64],
                    |r| r.get(0),
                )
                .optional()?;
            if path.is_some() {
                tx.execute(
                    "DELETE FROM active WHERE name = ?1 AND version = ?2",
                    params![name, version as i64],
                )?;
                tx.execute(
                    "DELETE FROM bundles WHERE name = ?1 AND version = ?2",
                    params![name, version as i64],
                )?;
                super::audit::event(tx, at, "remove", Some((name, version)), "")?;
            }
            Ok(path)
        })?;
        let Some(path) = path else { return Ok(false) };
        let path = self.dir.join(path);
        if let Err(err) = std::fs::remove_file(&path) {
            // The row is gone; the next open sweeps the file.
            tracing::warn!(path = %path.display(), error = %err, "could not delete a removed bundle");
        }
        Ok(true)
    }

    /// Records where each chunk of an installed bundle lies in its file.
    pub fn index_chunks(
        &mut self,
        name: &str,
        version: u64,
        chunks: &[(Sha256, u64, u32)],
    ) -> Result<()> {
        self.write_tx(|tx| {
            let mut stmt = tx.prepare(
                "INSERT OR REPLACE INTO chunk_index (sha256, name, version, offset, size) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for (sha, offset, size) in chunks {
                stmt.execute(params![sha.to_string(), name, version as i64, *offset as i64, i64::from(*size)])?;
            }
            Ok(())
        })
    }

    /// Where a chunk can be read locally, if an installed bundle holds it.
    pub fn find_chunk(&self, sha256: &Sha256) -> Result<Option<ChunkSource>> {
        self.conn
            .query_row(
                "SELECT b.path, c.offset, c.size FROM chunk_index c
                 JOIN bundles b ON b.name = c.name AND b.version = c.version
                 WHERE c.sha256 = ?1 LIMIT 1",
                [sha256.to_string()],
                |r| {
                    Ok(ChunkSource {
                        path: self.dir.join(r.get::<_, String>(0)?),
                        offset: r.get::<_, i64>(1)? as u64,
                        size: r.get::<_, i64>(2)? as u32,
                    })
                },
            )
            .optional()
            .map_err(self.db())
    }

    /// The enrolled identity, if this agent is enrolled.
    pub fn identity(&self) -> Result<Option<Identity>> {
        self.conn
            .query_row("SELECT agent_id, grp, control_plane FROM identity WHERE id = 1", [], |r| {
                Ok(Identity { agent_id: r.get(0)?, group: r.get(1)?, control_plane: r.get(2)? })
            })
            .optional()
            .map_err(self.db())
    }

    /// Records the enrolled identity.
    pub fn set_identity(&mut self, identity: &Identity, now: SystemTime) -> Result<()> {
        let at = Timestamp::from_system(now).unix() as i64;
        self.write_tx(|tx| {
            tx.execute(
                "INSERT INTO identity (id, agent_id, grp, control_plane, enrolled_at) VALUES (1, ?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET agent_id = excluded.agent_id, grp = excluded.grp,
                     control_plane = excluded.control_plane, enrolled_at = excluded.enrolled_at",
                params![identity.agent_id, identity.group, identity.control_plane, at],
            )?;
            let detail = format!("agent {} in group {}", identity.agent_id, identity.group);
            super::audit::event(tx, at, "enroll", None, &detail)?;
            Ok(())
        })
    }

    /// The version of the last desired-state document accepted.
    pub fn accepted_desired(&self) -> Result<Option<u64>> {
        self.conn
            .query_row("SELECT version FROM desired WHERE id = 1", [], |r| r.get::<_, i64>(0))
            .optional()
            .map(|v| v.map(|v| v as u64))
            .map_err(self.db())
    }

    /// The exact bytes of the last document accepted.
    pub fn accepted_document(&self) -> Result<Option<Vec<u8>>> {
        self.conn
            .query_row("SELECT document FROM desired WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(self.db())
    }

    /// Records an accepted document; versions only increase.
    pub fn accept_desired(&mut self, version: u64, document: &[u8], now: SystemTime) -> Result<()> {
        let at = Timestamp::from_system(now).unix() as i64;
        self.write_tx(|tx| {
            tx.execute(
                "INSERT INTO desired (id, version, document, accepted_at) VALUES (1, ?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version, document = excluded.document,
                     accepted_at = excluded.accepted_at
                 WHERE excluded.version > desired.version",
                params![version as i64, document, at],
            )
            .map(drop)
        })
    }

    /// What this agent holds, as it reports it.
    pub fn held(&self) -> Result<Vec<HeldBundle>> {
        Ok(self
            .installed()?
            .into_iter()
            .map(|i| HeldBundle {
                name: i.manifest.name,
                version: i.manifest.version,
                manifest_sha256: i.manifest_sha256,
                active: i.active,
                managed: i.managed,
                engine: None,
            })
            .collect())
    }
}
