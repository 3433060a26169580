//! Opening a daemon's SQLite database: owner-only permissions, the pragmas both daemons
//! rely on, and versioned migrations.
//!
//! The schema version is `PRAGMA user_version`: `migrations[i]` takes it from `i` to
//! `i + 1`. The pending migrations run in one immediate transaction, so a crash leaves the
//! database at the version it had or at the newest, never between. A database whose version
//! is above `migrations.len()` was written by a newer build and is refused with
//! [`OpenError::TooNew`], naming the file and both versions, rather than used.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};
use thiserror::Error;

/// How long a statement waits on another connection's lock before failing with `SQLITE_BUSY`.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a database could not be opened.
#[derive(Debug, Error)]
pub enum OpenError {
    /// SQLite failed: opening the file, setting a pragma or running a migration.
    #[error("database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// The database file's permissions could not be restricted to its owner.
    #[error("restricting permissions of {path}: {source}")]
    Permissions {
        /// The database file.
        path: PathBuf,
        source: std::io::Error,
    },
    /// The database was written by a newer build.
    #[error("database {path} has schema version {found}; this build supports up to {supported}")]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },
}

/// Opens (creating if missing) the database at `path` and brings its schema up to
/// `migrations.len()`.
///
/// The file is made owner-only (mode 0600 on Unix, whatever the umask; SQLite gives its
/// `-wal` and `-shm` files the same mode). The connection has a [`BUSY_TIMEOUT`], the
/// write-ahead log (`journal_mode=WAL`), `synchronous=FULL` (a committed transaction
/// survives a power cut) and foreign keys enforced.
pub fn open(path: &Path, migrations: &[&str]) -> Result<Connection, OpenError> {
    let sqlite = |source| OpenError::Sqlite { path: path.to_owned(), source };
    let mut conn = Connection::open(path).map_err(sqlite)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| OpenError::Permissions { path: path.to_owned(), source })?;
    }
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(sqlite)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(sqlite)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(sqlite)?;
    migrate(&mut conn, path, migrations)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection, path: &Path, migrations: &[&str]) -> Result<(), OpenError> {
    let sqlite = |source| OpenError::Sqlite { path: path.to_owned(), source };
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(sqlite)?;
    let found: u32 = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(sqlite)?;
    let supported = u32::try_from(migrations.len()).unwrap_or(u32::MAX);
    if found > supported {
        return Err(OpenError::TooNew { path: path.to_owned(), found, supported });
    }
    for (version, sql) in (1..).zip(migrations).skip(found as usize) {
        tx.execute_batch(sql).map_err(sqlite)?;
        tx.pragma_update(None, "user_version", version).map_err(sqlite)?;
    }
    tx.commit().map_err(sqlite)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &[&str] = &["CREATE TABLE a (id INTEGER PRIMARY KEY);"];
    const V2: &[&str] = &[
        "CREATE TABLE a (id INTEGER PRIMARY KEY);",
        "CREATE TABLE b (a INTEGER NOT NULL REFERENCES a(id));",
    ];

    fn version(conn: &Connection) -> u32 {
        conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap()
    }

    #[test]
    fn opening_applies_the_pending_migrations_and_the_pragmas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        assert_eq!(version(&open(&path, V1).unwrap()), 1);
        let conn = open(&path, V2).unwrap();
        assert_eq!(version(&conn), 2);
        let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        // Foreign keys are enforced.
        assert!(conn.execute("INSERT INTO b (a) VALUES (7)", []).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Opening again changes nothing.
        assert_eq!(version(&open(&path, V2).unwrap()), 2);
    }

    #[test]
    fn a_database_from_a_newer_build_is_refused_with_both_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        drop(open(&path, V2).unwrap());
        let err = open(&path, V1).unwrap_err();
        assert!(matches!(err, OpenError::TooNew { found: 2, supported: 1, .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("schema version 2") && text.contains("up to 1"), "{text}");
    }

    #[test]
    fn a_failing_migration_leaves_the_database_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        drop(open(&path, V1).unwrap());
        let broken = &[V2[0], V2[1], "NOT SQL AT ALL;"];
        assert!(matches!(open(&path, broken), Err(OpenError::Sqlite { .. })));
        let conn = open(&path, V1).unwrap();
        assert_eq!(version(&conn), 1);
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'b'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(tables, 0);
    }
}
