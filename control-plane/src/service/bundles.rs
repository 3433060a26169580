//! Bundles: verifying, chunking and registering one, and how the API shows them.

use std::sync::Arc;
use std::time::SystemTime;

use falaj_common::audit::Outcome;
use falaj_common::profile::DataProfile;
use falaj_common::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ServiceError, ServiceResult};
use crate::db::{self, BundleRow};
use crate::monitoring;
use crate::push;
use crate::sql::{AsSql, Backend, params};
use crate::state::Shared;

/// The PostgreSQL advisory lock held while a bundle is registered (see [`record`]).
const REGISTER_LOCK: i64 = crate::sql::locks::BUNDLE_REGISTER;

/// A bundle as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleView {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// File size.
    pub size: u64,
    /// Chunks.
    pub chunks: u64,
    /// Manifest hash.
    pub manifest_sha256: String,
    /// When pushed.
    pub pushed_at: String,
}

impl From<&BundleRow> for BundleView {
    fn from(b: &BundleRow) -> Self {
        Self {
            name: b.name.clone(),
            version: b.version,
            size: b.size,
            chunks: b.chunks,
            manifest_sha256: b.manifest_sha256.to_string(),
            pushed_at: b.pushed_at.to_string(),
        }
    }
}

/// What `POST /v1/bundles` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushedView {
    /// The bundle registered.
    pub bundle: BundleView,
    /// Chunks the control plane did not hold before.
    pub new_chunks: u64,
    /// Whether it was new (false: the same bundle was already registered).
    pub created: bool,
}

/// Every registered bundle.
pub(crate) async fn bundles(shared: &Shared) -> ServiceResult<Vec<BundleView>> {
    let rows = shared.db.run(|sql| db::bundles(&sql)).await?;
    Ok(rows.iter().map(BundleView::from).collect())
}

/// Registers `row` (its blobs stored) with its reference profile, unless a bundle of
/// that name and version is registered: then that one, and nothing is written. One
/// transaction; two registrations at once (replicas) register it once, the second waiting
/// for the first under an advisory lock on PostgreSQL (SQLite's write lock does that
/// there).
pub fn record<C: AsSql + ?Sized>(
    conn: &C,
    row: &BundleRow,
    reference: Option<&DataProfile>,
) -> Result<Option<BundleRow>, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction()?;
    if tx.backend() == Backend::Postgres {
        tx.execute("SELECT pg_advisory_xact_lock($1)", params![REGISTER_LOCK])?;
    }
    let existing = db::bundle(&tx, &row.name, row.version)?;
    if existing.is_none() {
        db::insert_bundle(&tx, row)?;
        if let Some(profile) = reference {
            monitoring::set_reference(&tx, &row.name, row.version, profile)?;
        }
    }
    tx.commit()?;
    Ok(existing)
}

/// Verifies, chunks and records the bundle file at `path` (a push, or a snapshot the
/// control plane built): the row, the chunks that were new, and whether it was new.
pub(crate) async fn register(
    shared: &Arc<Shared>,
    path: &std::path::Path,
) -> ServiceResult<(BundleRow, u64, bool)> {
    let state = Arc::clone(shared);
    let shared = Arc::clone(shared);
    let path = path.to_owned();
    let pushed = tokio::task::spawn_blocking(move || {
        push::push_file(
            &path,
            &shared.keyring().trust,
            &shared.region,
            shared.blobs.as_ref(),
            SystemTime::now(),
        )
    })
    .await
    .map_err(ServiceError::internal)?;
    let pushed = match pushed {
        Ok(pushed) => pushed,
        Err(push::PushError::Refused(e)) => {
            // A refused bundle is a security event: who tried to push what, and why not.
            let (at, reason) = (Timestamp::from_system(SystemTime::now()), e.to_string());
            let details = json!({ "reason": reason });
            state
                .db
                .run(move |sql| {
                    crate::audit::record(&sql, at, "push", "bundle", Outcome::Refused, details)
                })
                .await?;
            return Err(ServiceError::Refused(e.to_string()));
        }
        Err(e @ push::PushError::Io { .. }) => return Err(ServiceError::internal(e)),
    };
    let row = pushed.row.clone();
    let existing = {
        let row = row.clone();
        let reference = pushed.manifest.model().and_then(|m| m.reference.clone());
        state.db.run(move |sql| record(&sql, &row, reference.as_ref())).await?
    };
    let created = match existing {
        Some(e) if e.manifest_sha256 != row.manifest_sha256 => {
            return Err(ServiceError::Conflict {
                code: "conflict",
                message: format!(
                    "{}@{} is already registered with different content",
                    row.name, row.version
                ),
            });
        }
        Some(_) => false,
        None => true,
    };
    tracing::info!(name = %row.name, version = row.version, size = row.size, new_chunks = pushed.new_chunks, "bundle registered");
    Ok((row, pushed.new_chunks, created))
}
