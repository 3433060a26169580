//! Materialising a snapshot: the latest row at or before a time for each entity of a view
//! (all of them, a list, or those a filter keeps), personal data treated by policy, written
//! as the payload of a snapshot bundle. On PostgreSQL a build holds the view's lock
//! shared ([`store::lock_view`]), so it reads the rows as whole ingests left them, never
//! half of one still arriving.
//!
//! A snapshot's version is the next after the highest bundle of the view's name
//! ([`next_version`]), and its record must describe the bundle of that version, so from
//! choosing the version to registering the bundle one snapshot of a view is made at a
//! time: within a process under [`super::FeatureStore::building`], and across replicas on
//! one PostgreSQL database under the view's [`VersionLock`].

use std::io::Write;

use falaj_common::features::value::{self, Key};
use falaj_common::features::view::PiiPolicy;
use falaj_common::features::{
    Filter, FilterError, Keyring, PiiError, SnapshotError, SnapshotSpec, SnapshotWriter, Value, pii,
};
use falaj_common::time::Timestamp;
use thiserror::Error;

use super::store::{self, StoredView};
use crate::db::{Db, DbError};
use crate::sql::{AsSql, Backend, OptionalExt, Row, Sql, SqlError, params};

/// Held by the replica making a snapshot of a view, from choosing its version to
/// registering its bundle, so that two replicas on one PostgreSQL database never take one
/// version: a session-level advisory lock on a connection of its own (outside the pool,
/// so the build's queries go on beside it), freed when dropped, and by the server when
/// the process holding it dies. Nothing on SQLite, where one process owns the database
/// and [`super::FeatureStore::building`] makes its snapshots one at a time.
pub struct VersionLock {
    /// The connection holding the lock (PostgreSQL).
    held: Option<postgres::Client>,
}

impl std::fmt::Debug for VersionLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VersionLock").field("held", &self.held.is_some()).finish()
    }
}

impl VersionLock {
    /// Waits until no other connection holds view `view`'s snapshot lock, and takes it.
    /// Blocks: call it on the blocking pool.
    pub fn acquire(db: &Db, view: &str) -> Result<Self, LockError> {
        let Some(client) = db.own_postgres_connection() else {
            return Ok(Self { held: None });
        };
        let mut client = client?;
        let key = crate::sql::locks::feature_view("snapshot", view);
        client
            .execute("SELECT pg_advisory_lock($1)", &[&key])
            .map_err(|e| LockError::Lock { view: view.to_owned(), source: e.into() })?;
        Ok(Self { held: Some(client) })
    }

    /// Frees the lock now, closing its connection on this thread (blocks: not on the
    /// runtime's own threads, where dropping it closes it on a thread of its own).
    pub fn release(mut self) {
        drop(self.held.take());
    }
}

/// Why a snapshot's [`VersionLock`] could not be taken.
#[derive(Debug, Error)]
pub enum LockError {
    /// No connection of its own to the database.
    #[error(transparent)]
    Connect(#[from] DbError),
    /// The lock's query failed.
    #[error("the snapshot lock of view {view:?}: {source}")]
    Lock { view: String, source: SqlError },
}

impl Drop for VersionLock {
    /// Closes the connection, which frees the lock.
    fn drop(&mut self) {
        if let Some(client) = self.held.take() {
            crate::sql::postgres::close(client, "a snapshot's version lock");
        }
    }
}

/// A bundle of a view's name that is not one of its snapshots (a model pushed under that
/// name): a snapshot cannot take the name.
#[derive(Debug, Error)]
#[error(
    "bundle {view}@{version} is not a snapshot of view {view:?}: a snapshot's bundle takes the view's name"
)]
pub struct NotASnapshot {
    pub view: String,
    /// The bundle's version.
    pub version: u64,
}

/// The next snapshot version of view `view`, given the versions of the bundles of its
/// name and those its snapshot records hold ([`recorded`]): one past the highest bundle
/// (so a record whose bundle was never registered is taken again, and replaced).
pub fn next_version(view: &str, bundles: &[u64], recorded: &[u64]) -> Result<u64, NotASnapshot> {
    if let Some(&version) = bundles.iter().find(|v| !recorded.contains(v)) {
        return Err(NotASnapshot { view: view.to_owned(), version });
    }
    Ok(bundles.iter().max().map_or(1, |v| v + 1))
}

/// The versions of view `view`'s snapshot records.
pub fn recorded<C: AsSql + ?Sized>(conn: &C, view: &str) -> Result<Vec<u64>, C::Error> {
    Ok(conn.sql().query_map(
        "SELECT version FROM snapshots WHERE view = $1 ORDER BY version",
        params![view],
        |r| {
            u64::try_from(r.get::<i64>(0)?)
                .map_err(|e| SqlError::Conversion { column: 0, message: e.to_string() })
        },
    )?)
}

/// Which entities and values a snapshot carries.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// Only these entities (as text); `None`: every entity.
    pub entities: Option<Vec<String>>,
    /// Only entities whose latest row passes this filter.
    pub filter: Option<String>,
    /// Latest values at or before this time (µs since the epoch); `None`: now.
    pub as_of: Option<i64>,
    /// The policy for personal data the view gives none for.
    pub pii: Option<PiiPolicy>,
}

/// Why a snapshot was not made.
#[derive(Debug, Error)]
pub enum BuildError {
    /// No view of that name.
    #[error("no feature view {0:?}")]
    UnknownView(String),
    /// Personal data without a policy.
    #[error(transparent)]
    Pii(#[from] PiiError),
    /// A bad filter.
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// An entity id of the wrong type.
    #[error("entity {id:?}: {rule}")]
    Entity {
        id: String,
        /// The rule it breaks.
        rule: value::Rule,
    },
    /// Nothing to carry.
    #[error("the snapshot of view {0:?} would hold no entity")]
    Empty(String),
    /// Writing the payload failed.
    #[error(transparent)]
    Payload(#[from] SnapshotError),
    /// The offline store failed.
    #[error("offline store: {0}")]
    Store(#[from] SqlError),
}

/// Writes the snapshot of `view` into `out`; hashes personal data with `keyring` (each
/// pseudonym under its current version, and under older versions still in overlap).
/// Returns the manifest content (with the entity count) and the sink.
pub fn build<C: AsSql + ?Sized, W: Write>(
    conn: &C,
    view: &str,
    options: &SnapshotOptions,
    keyring: &Keyring,
    now: i64,
    out: W,
) -> Result<(SnapshotSpec, W), BuildError> {
    let sql = conn.sql();
    // The lock (PostgreSQL) and the reads in one transaction, so they see one state.
    let tx = sql.transaction()?;
    store::lock_view(&tx, view, false)?;
    let conn = &*tx;
    let stored =
        store::current(conn, view)?.ok_or_else(|| BuildError::UnknownView(view.to_owned()))?;
    let treatments = pii::plan(&stored.view, options.pii)?;
    let filter = options.filter.as_deref().map(|f| Filter::parse(&stored.view, f)).transpose()?;
    let as_of = options.as_of.unwrap_or(now);
    let mut scope = Vec::new();
    if let Some(entities) = &options.entities {
        scope.push(format!("{} listed entities", entities.len()));
    }
    if let Some(filter) = &options.filter {
        scope.push(format!("filter {filter}"));
    }
    let scope = if scope.is_empty() { "all".to_owned() } else { scope.join(", ") };
    let as_of_secs = Timestamp::from_unix(u64::try_from(as_of / 1_000_000).unwrap_or(0));
    let spec = SnapshotSpec::new(&stored.view, stored.version, &treatments, as_of_secs, &scope)
        .with_keyring(keyring);
    let mut writer = SnapshotWriter::with_keyring(&stored.view, spec, treatments, keyring, out)?;
    let mut emit = |key: Key, time: i64, values: Vec<Value>| -> Result<(), BuildError> {
        if filter.as_ref().is_none_or(|f| f.matches(&key, &values)) {
            writer.push(key, time, values)?;
        }
        Ok(())
    };
    match &options.entities {
        Some(ids) => listed(conn, &stored, ids, as_of, &mut emit)?,
        None => scan(conn, &stored, as_of, &mut emit)?,
    }
    let (spec, out) = writer.finish();
    tx.commit()?;
    if spec.entities == 0 {
        return Err(BuildError::Empty(view.to_owned()));
    }
    Ok((spec, out))
}

type Emit<'a> = dyn FnMut(Key, i64, Vec<Value>) -> Result<(), BuildError> + 'a;

/// Rows of a scan read at once on PostgreSQL, whose client holds a query's whole result:
/// the scan goes on after the last row of each page, so memory stays bounded by a page
/// (SQLite streams its rows, in one query).
const PAGE_ROWS: usize = 10_000;

/// Every entity: one pass over the table in key order, keeping each entity's last row
/// at or before `as_of`.
fn scan(
    conn: &Sql<'_>,
    stored: &StoredView,
    as_of: i64,
    emit: &mut Emit<'_>,
) -> Result<(), BuildError> {
    let select = format!(
        "SELECT entity, event_time, {} FROM {} WHERE event_time <= $1",
        store::feature_columns(&stored.view),
        stored.table(conn.backend())
    );
    let order = "ORDER BY entity, event_time";
    let page = match conn.backend() {
        Backend::Sqlite => None,
        Backend::Postgres => Some(PAGE_ROWS),
    };
    let (first, next) = match page {
        None => (format!("{select} {order}"), String::new()),
        Some(n) => (
            format!("{select} {order} LIMIT {n}"),
            format!("{select} AND (entity, event_time) > ($2, $3) {order} LIMIT {n}"),
        ),
    };
    let kind = stored.view.entity.kind;
    let mut pending: Option<(Key, i64, Vec<Value>)> = None;
    let mut failed = None;
    let mut after: Option<(store::Bound, i64)> = None;
    loop {
        let mut read = 0;
        // Rows are read as they come; `emit`'s own errors stop the reading and are kept.
        let mut each = |row: &Row<'_>| {
            read += 1;
            if failed.is_some() {
                return Ok(());
            }
            let key = store::read_key(row, 0, kind)?;
            if let Some(last) = pending.take_if(|(k, _, _)| *k != key)
                && let Err(e) = emit(last.0, last.1, last.2)
            {
                failed = Some(e);
                return Ok(());
            }
            pending = Some((key, row.get(1)?, store::row_values(stored, row)?));
            Ok(())
        };
        match &after {
            None => conn.query_map(&first, params![as_of], &mut each)?,
            Some((key, time)) => conn.query_map(&next, &[&as_of, key.param(), time], &mut each)?,
        };
        if let Some(e) = failed {
            return Err(e);
        }
        match (page, &pending) {
            (Some(n), Some((key, time, _))) if read == n => {
                after = Some((store::sql_key(key), *time));
            }
            _ => break,
        }
    }
    if let Some(last) = pending {
        emit(last.0, last.1, last.2)?;
    }
    Ok(())
}

/// Listed entities: one point lookup each, in key order; ids not stored are skipped.
fn listed(
    conn: &Sql<'_>,
    stored: &StoredView,
    ids: &[String],
    as_of: i64,
    emit: &mut Emit<'_>,
) -> Result<(), BuildError> {
    let mut keys = ids
        .iter()
        .map(|id| {
            value::parse_key(stored.view.entity.kind, id)
                .map_err(|rule| BuildError::Entity { id: id.clone(), rule })
        })
        .collect::<Result<Vec<_>, _>>()?;
    keys.sort();
    keys.dedup();
    let query = point_query(stored, conn.backend());
    for key in keys {
        let bound = store::sql_key(&key);
        let found = conn
            .query_row(&query, &[bound.param(), &as_of], |row| {
                Ok((row.get::<i64>(1)?, store::row_values(stored, row)?))
            })
            .optional()?;
        if let Some((time, values)) = found {
            emit(key, time, values)?;
        }
    }
    Ok(())
}

/// The query for one entity's latest row at or before a time on `backend`: `$1` the key,
/// `$2` the time.
pub fn point_query(stored: &StoredView, backend: Backend) -> String {
    format!(
        "SELECT entity, event_time, {} FROM {} WHERE entity = $1 AND event_time <= $2
         ORDER BY event_time DESC LIMIT 1",
        store::feature_columns(&stored.view),
        stored.table(backend)
    )
}

/// Records a snapshot bundle made from the offline store (replacing the record of a
/// version whose bundle was never registered).
pub fn record<C: AsSql + ?Sized>(
    conn: &C,
    spec: &SnapshotSpec,
    version: u64,
    now: Timestamp,
) -> Result<(), C::Error> {
    conn.sql().execute(
        "INSERT INTO snapshots (view, version, view_version, built_at, as_of, scope, entities, features)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (view, version) DO UPDATE SET view_version = excluded.view_version,
             built_at = excluded.built_at, as_of = excluded.as_of, scope = excluded.scope,
             entities = excluded.entities, features = excluded.features",
        params![
            spec.view,
            version as i64,
            spec.view_version as i64,
            crate::db::ts(now),
            crate::db::ts(spec.as_of),
            spec.scope,
            spec.entities as i64,
            serde_json::to_string(&spec.features).expect("features serialise"),
        ],
    )?;
    Ok(())
}
