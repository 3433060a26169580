//! The offline store: `features.db` beside `control.db`, holding every revision of every
//! feature view and, per view version, one table of ingested rows keyed by (entity, event
//! time), so the latest value per entity and point-in-time lookups are index scans.
//!
//! A compatible change to a view is a new revision of the same version (new nullable
//! features become new columns); a breaking change is a new version with a table of its
//! own, so rows ingested under one definition are never read under another.

use std::fmt::Write as _;

use falaj_common::features::view::{self, Change, FeatureType, FeatureView, KeyType};
use falaj_common::time::Timestamp;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};

/// Database file name inside the data directory.
pub const FEATURES_DB_FILE: &str = "features.db";

/// The offline store's schema history.
pub const MIGRATIONS: &[&str] = &[
    // 1: view revisions, ingests and snapshots; each view version's rows live in a table
    // of their own, `fv_NAME_VERSION`, made when the version is.
    "CREATE TABLE view_revisions (
        name       TEXT NOT NULL,
        version    INTEGER NOT NULL,
        revision   INTEGER NOT NULL,
        applied_at INTEGER NOT NULL,
        definition TEXT NOT NULL,
        changes    TEXT NOT NULL,
        PRIMARY KEY (name, version, revision)
    ) STRICT;
    CREATE TABLE ingests (
        id      INTEGER PRIMARY KEY,
        view    TEXT NOT NULL,
        version INTEGER NOT NULL,
        at      INTEGER NOT NULL,
        source  TEXT NOT NULL,
        format  TEXT NOT NULL,
        rows    INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE snapshots (
        view         TEXT NOT NULL,
        version      INTEGER NOT NULL,
        view_version INTEGER NOT NULL,
        built_at     INTEGER NOT NULL,
        as_of        INTEGER NOT NULL,
        scope        TEXT NOT NULL,
        entities     INTEGER NOT NULL,
        features     TEXT NOT NULL,
        PRIMARY KEY (view, version)
    ) STRICT;",
    // 2: versions of the region's PII key (`pii_keys`), the newest current, older ones
    // carried beside it until their overlap ends.
    "CREATE TABLE pii_keys (
        version       INTEGER PRIMARY KEY,
        created       INTEGER NOT NULL,
        overlap_until INTEGER
    ) STRICT;",
];

/// A view as stored: its definition at one revision of one version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredView {
    pub view: FeatureView,
    /// Its version: bumped by breaking changes.
    pub version: u64,
    /// Its revision within the version: bumped by compatible changes.
    pub revision: u64,
    /// When it was applied.
    pub applied_at: Timestamp,
    /// What changed from the revision before.
    pub changes: Vec<String>,
}

impl StoredView {
    /// The SQL name of the table of this version's rows (quoted; view names are
    /// `[a-z0-9._-]` so nothing needs escaping).
    pub fn table(&self) -> String {
        table(&self.view.name, self.version)
    }
}

fn table(name: &str, version: u64) -> String {
    format!("\"fv_{name}_{version}\"")
}

fn sql_type(kind: &FeatureType) -> &'static str {
    match kind {
        FeatureType::F32 | FeatureType::F64 => "REAL",
        FeatureType::I64 | FeatureType::Bool => "INTEGER",
        FeatureType::String | FeatureType::Category { .. } => "TEXT",
    }
}

fn decode(text: &str) -> rusqlite::Result<FeatureView> {
    serde_json::from_str(text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn stored(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredView> {
    let changes: String = row.get(4)?;
    Ok(StoredView {
        view: decode(&row.get::<_, String>(0)?)?,
        version: row.get::<_, i64>(1)? as u64,
        revision: row.get::<_, i64>(2)? as u64,
        applied_at: crate::db::from_ts(row.get(3)?),
        changes: serde_json::from_str(&changes).unwrap_or_default(),
    })
}

const SELECT: &str =
    "SELECT definition, version, revision, applied_at, changes FROM view_revisions";

/// The latest revision of the latest version of `name`.
pub fn current(conn: &Connection, name: &str) -> rusqlite::Result<Option<StoredView>> {
    conn.query_row(
        &format!("{SELECT} WHERE name = ?1 ORDER BY version DESC, revision DESC LIMIT 1"),
        [name],
        stored,
    )
    .optional()
}

/// The latest revision of version `version` of `name`.
pub fn at_version(
    conn: &Connection,
    name: &str,
    version: u64,
) -> rusqlite::Result<Option<StoredView>> {
    conn.query_row(
        &format!("{SELECT} WHERE name = ?1 AND version = ?2 ORDER BY revision DESC LIMIT 1"),
        params![name, version as i64],
        stored,
    )
    .optional()
}

/// Every revision of `name`, oldest first.
pub fn history(conn: &Connection, name: &str) -> rusqlite::Result<Vec<StoredView>> {
    let mut stmt = conn.prepare(&format!("{SELECT} WHERE name = ?1 ORDER BY version, revision"))?;
    stmt.query_map([name], stored)?.collect()
}

/// The current revision of every view, by name.
pub fn list(conn: &Connection) -> rusqlite::Result<Vec<StoredView>> {
    let mut stmt = conn.prepare(&format!(
        "{SELECT} AS r WHERE revision = (SELECT max(revision) FROM view_revisions
             WHERE name = r.name AND version = r.version)
         AND version = (SELECT max(version) FROM view_revisions WHERE name = r.name)
         ORDER BY name"
    ))?;
    stmt.query_map([], stored)?.collect()
}

/// Rows and distinct entities stored for a view version.
pub fn counts(conn: &Connection, stored: &StoredView) -> rusqlite::Result<(u64, u64)> {
    let t = stored.table();
    let count = |sql: String| conn.query_row(&sql, [], |r| r.get::<_, i64>(0));
    let rows = count(format!("SELECT count(*) FROM {t}"))?;
    let entities = count(format!("SELECT count(DISTINCT entity) FROM {t}"))?;
    Ok((rows as u64, entities as u64))
}

/// What applying a declaration did: what `PUT /v1/features/views` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Applied {
    /// The view as now stored.
    pub stored: StoredView,
    /// `created`, `unchanged`, `compatible` (new revision) or `breaking` (new version).
    pub outcome: String,
}

/// Registers `view`, or updates it: a compatible change makes a new revision (adding the
/// columns of new features), a breaking one a new version with a new table. One
/// transaction.
pub fn apply(
    conn: &mut Connection,
    view: &FeatureView,
    now: Timestamp,
) -> rusqlite::Result<Applied> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let previous = current(&tx, &view.name)?;
    let (version, revision, changes, outcome) = match &previous {
        None => (1, 1, vec!["created".to_owned()], "created"),
        Some(old) => match view::compare(&old.view, view) {
            Change::Same => {
                return Ok(Applied { stored: old.clone(), outcome: "unchanged".into() });
            }
            Change::Compatible(changes) => (old.version, old.revision + 1, changes, "compatible"),
            Change::Breaking(changes) => (old.version + 1, 1, changes, "breaking"),
        },
    };
    let stored = StoredView { view: view.clone(), version, revision, applied_at: now, changes };
    if revision == 1 {
        create_table(&tx, &stored)?;
    } else if let Some(old) = &previous {
        for feature in view.features.iter().filter(|f| old.view.feature(&f.name).is_none()) {
            tx.execute_batch(&format!(
                "ALTER TABLE {} ADD COLUMN \"{}\" {}",
                stored.table(),
                feature.name,
                sql_type(&feature.kind)
            ))?;
        }
    }
    tx.execute(
        "INSERT INTO view_revisions (name, version, revision, applied_at, definition, changes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            view.name,
            version as i64,
            revision as i64,
            crate::db::ts(now),
            serde_json::to_string(view).expect("views serialise"),
            serde_json::to_string(&stored.changes).expect("strings serialise"),
        ],
    )?;
    tx.commit()?;
    Ok(Applied { stored, outcome: outcome.into() })
}

fn create_table(conn: &Connection, stored: &StoredView) -> rusqlite::Result<()> {
    let key = match stored.view.entity.kind {
        KeyType::String => "TEXT",
        KeyType::I64 => "INTEGER",
    };
    let mut columns = String::new();
    for f in &stored.view.features {
        let _ = write!(columns, ", \"{}\" {}", f.name, sql_type(&f.kind));
    }
    conn.execute_batch(&format!(
        "CREATE TABLE {} (
            entity     {key} NOT NULL,
            event_time INTEGER NOT NULL,
            ingest     INTEGER NOT NULL{columns},
            PRIMARY KEY (entity, event_time)
        ) STRICT, WITHOUT ROWID",
        stored.table()
    ))
}

/// The feature columns of a stored view, quoted, in the view's order.
pub fn feature_columns(view: &FeatureView) -> String {
    view.features.iter().map(|f| format!("\"{}\"", f.name)).collect::<Vec<_>>().join(", ")
}

/// Reads a stored value back as the view's type.
pub fn read_value(
    row: &rusqlite::Row<'_>,
    index: usize,
    kind: &FeatureType,
) -> rusqlite::Result<falaj_common::features::Value> {
    use falaj_common::features::Value;
    use rusqlite::types::ValueRef;
    Ok(match (row.get_ref(index)?, kind) {
        (ValueRef::Null | ValueRef::Blob(_), _) => Value::Null,
        (ValueRef::Real(v), FeatureType::F32) => Value::F32(v as f32),
        (ValueRef::Real(v), _) => Value::F64(v),
        (ValueRef::Integer(v), FeatureType::Bool) => Value::Bool(v != 0),
        (ValueRef::Integer(v), _) => Value::I64(v),
        (ValueRef::Text(t), _) => Value::Str(String::from_utf8_lossy(t).into_owned()),
    })
}

/// Reads a stored entity key.
pub fn read_key(
    row: &rusqlite::Row<'_>,
    index: usize,
) -> rusqlite::Result<falaj_common::features::Key> {
    use falaj_common::features::Key;
    use rusqlite::types::ValueRef;
    Ok(match row.get_ref(index)? {
        ValueRef::Integer(v) => Key::Int(v),
        other => {
            Key::Str(String::from_utf8_lossy(other.as_bytes().unwrap_or_default()).into_owned())
        }
    })
}

/// A value as SQLite stores it.
pub fn sql_value(value: &falaj_common::features::Value) -> rusqlite::types::Value {
    use falaj_common::features::Value;
    use rusqlite::types::Value as Sql;
    match value {
        Value::Null => Sql::Null,
        Value::Bool(v) => Sql::Integer(i64::from(*v)),
        Value::I64(v) => Sql::Integer(*v),
        Value::F32(v) => Sql::Real(f64::from(*v)),
        Value::F64(v) => Sql::Real(*v),
        Value::Str(v) => Sql::Text(v.clone()),
    }
}

/// A key as SQLite stores it.
pub fn sql_key(key: &falaj_common::features::Key) -> rusqlite::types::Value {
    use falaj_common::features::Key;
    match key {
        Key::Int(v) => rusqlite::types::Value::Integer(*v),
        Key::Str(v) => rusqlite::types::Value::Text(v.clone()),
    }
}
