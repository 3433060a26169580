//! The control plane's state: tokens, agents and their certificates, bundles,
//! deployments, the desired-state documents issued, and an event log (metric windows,
//! alerts, fine-tune jobs and rollouts have their tables here too, and their functions in
//! their own modules). SQLite by default; PostgreSQL through the same queries
//! ([`crate::sql`]) for the functions ported to it.
//!
//! Every function here takes a connection and does one transaction; the daemon runs them
//! on the blocking pool through [`Db::run`] (either database) or [`Db::call`] (SQLite
//! only, for modules not yet ported), so async tasks never wait on a disk sync. The
//! functions here take any [`AsSql`]: a rusqlite connection (their error then a
//! `rusqlite::Error`, as modules not yet ported expect) or an [`Sql`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use falaj_common::audit::Outcome;
use falaj_common::keys::Sha256;
use falaj_common::protocol::ActualState;
use falaj_common::time::Timestamp;
use falaj_shell::sqlite::OpenError;
use rusqlite::Connection;
use thiserror::Error;

use crate::sql::postgres::{MigrateError, Pool};
use crate::sql::{AsSql, OptionalExt, PgOptions, Row, Sql, SqlError, params};

/// Database file name inside the data directory.
pub const DB_FILE: &str = "control.db";

const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
    CREATE TABLE tokens (
        id            TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        grp           TEXT NOT NULL,
        region        TEXT NOT NULL,
        created_at    INTEGER NOT NULL,
        expires_at    INTEGER NOT NULL,
        used_at       INTEGER,
        used_by       TEXT
    ) STRICT;
    CREATE TABLE agents (
        id            TEXT PRIMARY KEY,
        hostname      TEXT NOT NULL,
        grp           TEXT NOT NULL,
        region        TEXT NOT NULL,
        enrolled_at   INTEGER NOT NULL,
        last_seen     INTEGER,
        agent_version TEXT NOT NULL,
        actual        TEXT,
        revoked_at    INTEGER
    ) STRICT;
    CREATE TABLE certificates (
        serial     TEXT PRIMARY KEY,
        agent_id   TEXT NOT NULL REFERENCES agents (id),
        issued_at  INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE bundles (
        name            TEXT NOT NULL,
        version         INTEGER NOT NULL,
        manifest_sha256 TEXT NOT NULL,
        bundle_sha256   TEXT NOT NULL,
        recipe_sha256   TEXT NOT NULL,
        size            INTEGER NOT NULL,
        chunks          INTEGER NOT NULL,
        pushed_at       INTEGER NOT NULL,
        PRIMARY KEY (name, version)
    ) STRICT;
    CREATE TABLE deployments (
        grp        TEXT NOT NULL,
        name       TEXT NOT NULL,
        version    INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        PRIMARY KEY (grp, name),
        FOREIGN KEY (name, version) REFERENCES bundles (name, version)
    ) STRICT;
    CREATE TABLE desired (
        agent_id       TEXT PRIMARY KEY REFERENCES agents (id),
        version        INTEGER NOT NULL,
        content_sha256 TEXT NOT NULL,
        expires_at     INTEGER NOT NULL,
        signed         BLOB NOT NULL
    ) STRICT;
    CREATE TABLE events (
        id      INTEGER PRIMARY KEY,
        at      INTEGER NOT NULL,
        kind    TEXT NOT NULL,
        subject TEXT NOT NULL,
        detail  TEXT NOT NULL
    ) STRICT;",
    // 2: monitoring. Each agent's metric windows, stored once per (agent, sequence); the
    // reference profile of each pushed bundle; alerts firing, and their history.
    "ALTER TABLE bundles ADD COLUMN reference TEXT;
    CREATE TABLE windows (
        agent_id    TEXT NOT NULL REFERENCES agents (id),
        seq         INTEGER NOT NULL,
        model       TEXT NOT NULL,
        version     INTEGER NOT NULL,
        start       INTEGER NOT NULL,
        seconds     INTEGER NOT NULL,
        requests    INTEGER NOT NULL,
        errors      INTEGER NOT NULL,
        window      BLOB NOT NULL,
        received_at INTEGER NOT NULL,
        PRIMARY KEY (agent_id, seq)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX windows_by_model ON windows (model, start);
    CREATE INDEX windows_by_start ON windows (start);
    CREATE TABLE alerts_firing (
        rule    TEXT NOT NULL,
        subject TEXT NOT NULL,
        since   INTEGER NOT NULL,
        value   REAL NOT NULL,
        PRIMARY KEY (rule, subject)
    ) STRICT;
    CREATE TABLE alert_events (
        id        INTEGER PRIMARY KEY,
        at        INTEGER NOT NULL,
        rule      TEXT NOT NULL,
        subject   TEXT NOT NULL,
        state     TEXT NOT NULL CHECK (state IN ('firing', 'resolved')),
        metric    TEXT NOT NULL,
        value     REAL NOT NULL,
        threshold REAL NOT NULL
    ) STRICT;",
    // 3: fine-tune jobs ordered for agents, with the agents' reports.
    "CREATE TABLE finetune_jobs (
        id         TEXT PRIMARY KEY,
        agent_id   TEXT NOT NULL REFERENCES agents (id),
        spec       TEXT NOT NULL,
        state      TEXT NOT NULL,
        report     TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX finetune_jobs_by_agent ON finetune_jobs (agent_id, state);",
    // 4: rollouts (canary, A/B, shadow) of a model in a group: the plan, the steps as
    // issued to agents, the guards, and where each stands. At most one is under way per
    // (group, model), which the partial unique index enforces.
    "CREATE TABLE rollouts (
        id           TEXT PRIMARY KEY,
        grp          TEXT NOT NULL,
        model        TEXT NOT NULL,
        baseline     INTEGER NOT NULL,
        candidate    INTEGER NOT NULL,
        strategy     TEXT NOT NULL CHECK (strategy IN ('canary', 'ab', 'shadow')),
        plan         TEXT NOT NULL,
        steps        TEXT NOT NULL,
        mirror       REAL NOT NULL,
        guards       TEXT NOT NULL,
        min_requests INTEGER NOT NULL,
        state        TEXT NOT NULL
            CHECK (state IN ('running', 'paused', 'promoted', 'rolled_back', 'aborted')),
        reason       TEXT,
        created_at   INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL,
        ended_at     INTEGER,
        FOREIGN KEY (model, baseline) REFERENCES bundles (name, version),
        FOREIGN KEY (model, candidate) REFERENCES bundles (name, version)
    ) STRICT;
    CREATE INDEX rollouts_by_group ON rollouts (grp, model, state);
    CREATE UNIQUE INDEX rollouts_under_way ON rollouts (grp, model)
        WHERE state IN ('running', 'paused');",
    // 5: the audit log: a hash chain of entries (each line exactly as hashed) and the
    // signed checkpoints of its head.
    "CREATE TABLE audit (
        seq     INTEGER PRIMARY KEY,
        at      INTEGER NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        target  TEXT NOT NULL,
        outcome TEXT NOT NULL,
        line    TEXT NOT NULL,
        hash    TEXT NOT NULL
    ) STRICT;
    CREATE INDEX audit_by_at ON audit (at);
    CREATE TABLE audit_checkpoints (
        seq  INTEGER PRIMARY KEY,
        at   INTEGER NOT NULL,
        line TEXT NOT NULL
    ) STRICT;",
    // 6: people (crate::auth): users with their role and Argon2id hash (a PHC string),
    // their sessions and the API tokens for automation (both only as SHA-256 of the
    // secret), and failed logins, counted for lockouts.
    "CREATE TABLE users (
        name        TEXT PRIMARY KEY,
        role        TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer', 'auditor')),
        password    TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        disabled_at INTEGER
    ) STRICT;
    CREATE TABLE sessions (
        id           TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL UNIQUE,
        user         TEXT NOT NULL REFERENCES users (name) ON DELETE CASCADE,
        source       TEXT,
        created_at   INTEGER NOT NULL,
        last_used    INTEGER NOT NULL,
        revoked_at   INTEGER
    ) STRICT;
    CREATE INDEX sessions_by_user ON sessions (user);
    CREATE TABLE api_tokens (
        name         TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL UNIQUE,
        role         TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer', 'auditor')),
        created_by   TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        expires_at   INTEGER NOT NULL,
        last_used    INTEGER,
        revoked_at   INTEGER
    ) STRICT;
    CREATE TABLE login_failures (
        id      INTEGER PRIMARY KEY,
        at      INTEGER NOT NULL,
        user    TEXT NOT NULL,
        address TEXT
    ) STRICT;
    CREATE INDEX login_failures_by_user ON login_failures (user, at);
    CREATE INDEX login_failures_by_address ON login_failures (address, at);",
    // 7: each agent's own audit chain, as it ships it, checked on arrival.
    "CREATE TABLE agent_audit (
        agent_id    TEXT NOT NULL REFERENCES agents (id),
        seq         INTEGER NOT NULL,
        line        TEXT NOT NULL,
        hash        TEXT NOT NULL,
        received_at INTEGER NOT NULL,
        PRIMARY KEY (agent_id, seq)
    ) STRICT, WITHOUT ROWID;",
    // 8: windows by agent and version, for the per-agent cap on what is stored
    // (`monitoring::MAX_WINDOWS_PER_HOUR`).
    "CREATE INDEX windows_by_agent ON windows (agent_id, model, version, start);",
    // 9: the CSR each token enrolled, so that an agent interrupted after the answer can
    // ask again with the same request and finish (`enroll`).
    "ALTER TABLE tokens ADD COLUMN used_csr_sha256 TEXT;",
    // 10: rollouts in their order of creation (`seq`), which "latest" orders by on both
    // databases (PostgreSQL has no `rowid`); rows already stored keep their `rowid`'s
    // order. A new rollout's `seq` is one above the highest (`rollouts::start`).
    "ALTER TABLE rollouts ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
    UPDATE rollouts SET seq = rowid;
    CREATE UNIQUE INDEX rollouts_by_seq ON rollouts (seq);",
    // 11: webhook notifications not yet delivered (`outbox`), written in the transaction
    // that records what they tell and deleted once delivered or given up.
    "CREATE TABLE outbox (
        id          INTEGER PRIMARY KEY,
        delivery    TEXT NOT NULL,
        url         TEXT NOT NULL,
        body        BLOB NOT NULL,
        what        TEXT NOT NULL,
        recorded_at INTEGER NOT NULL,
        attempts    INTEGER NOT NULL,
        next_at     INTEGER NOT NULL,
        last_error  TEXT
    ) STRICT;
    CREATE INDEX outbox_by_next ON outbox (next_at);",
];

/// Errors of the control plane's database.
#[derive(Debug, Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("control-plane database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// A query through [`Db::run`] failed (on either database).
    #[error("control-plane database {target}: {source}")]
    Sql {
        /// The database file, or `postgres://host:port/db`.
        target: String,
        source: SqlError,
    },
    /// The database was written by a newer control plane.
    #[error(
        "control-plane database {path} has schema version {found}; this build supports up to {supported}"
    )]
    SchemaTooNew {
        /// The database file, or `postgres://host:port/db`.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// The newest known here.
        supported: u32,
    },
    /// Code not yet ported to the facade asked a PostgreSQL database for a rusqlite
    /// connection ([`Db::call`]).
    #[error(
        "control-plane database {target}: this part of the control plane runs on SQLite only; it is not yet ported to PostgreSQL (issue 21)"
    )]
    SqliteOnly {
        /// `postgres://host:port/db`.
        target: String,
    },
    /// The blocking task running the query failed.
    #[error("database task failed: {0}")]
    Task(String),
}

/// The database, shared by the daemon's tasks.
#[derive(Debug, Clone)]
pub struct Db {
    /// The database file, or `postgres://host:port/db` (never a password).
    path: PathBuf,
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    /// One connection, used by one thread at a time.
    Sqlite(Arc<Mutex<Connection>>),
    /// A pool of connections.
    Postgres(Arc<Pool>),
}

impl Db {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        Self::open_with(path, MIGRATIONS)
    }

    /// Opens the database at `path` with its own schema history: `migrations[i]` takes
    /// `PRAGMA user_version` from `i` to `i + 1`.
    pub fn open_with(path: &Path, migrations: &[&str]) -> Result<Self, DbError> {
        // Tokens, agents and documents: owner only.
        let conn = falaj_shell::sqlite::open(path, migrations).map_err(|e| match e {
            OpenError::Sqlite { path, source } => DbError::Sqlite { path, source },
            OpenError::Permissions { path, source } => DbError::Sqlite {
                source: rusqlite::Error::InvalidPath(
                    format!("{}: {source}", path.display()).into(),
                ),
                path,
            },
            OpenError::TooNew { path, found, supported } => {
                DbError::SchemaTooNew { path, found, supported }
            }
        })?;
        Ok(Self { path: path.to_owned(), backend: Backend::Sqlite(Arc::new(Mutex::new(conn))) })
    }

    /// Connects to PostgreSQL and brings its schema up to date (each migration in one
    /// transaction; a newer schema is refused). Blocks: call it before the runtime starts
    /// or on the blocking pool. Only the functions ported to [`crate::sql`] work on it:
    /// [`Db::call`] fails with [`DbError::SqliteOnly`].
    pub fn open_postgres(options: &PgOptions) -> Result<Self, DbError> {
        Self::open_postgres_with(options, crate::sql::schema::CONTROL)
    }

    /// [`Db::open_postgres`] with its own schema history: `migrations[i]` takes
    /// `schema_version` from `i` to `i + 1`.
    pub fn open_postgres_with(options: &PgOptions, migrations: &[&str]) -> Result<Self, DbError> {
        let pool = Pool::new(options).map_err(|source| DbError::Sql {
            target: crate::sql::postgres::redacted(&options.url),
            source,
        })?;
        let path = PathBuf::from(pool.target());
        let pool = Arc::new(pool);
        crate::sql::postgres::migrate(&pool, migrations).map_err(|e| match e {
            MigrateError::Sql(source) => DbError::Sql { target: pool.target().to_owned(), source },
            MigrateError::TooNew { found, supported } => {
                DbError::SchemaTooNew { path: path.clone(), found, supported }
            }
        })?;
        Ok(Self { path, backend: Backend::Postgres(pool) })
    }

    /// Which database this is.
    pub fn backend(&self) -> crate::sql::Backend {
        match self.backend {
            Backend::Sqlite(_) => crate::sql::Backend::Sqlite,
            Backend::Postgres(_) => crate::sql::Backend::Postgres,
        }
    }

    /// Runs `f` on either database, on the blocking pool, with the task's actor (for the
    /// audit entries it records). On PostgreSQL `f` is one transaction, committed when it
    /// returns `Ok`; on SQLite its statements commit as they run unless `f` opens a
    /// transaction ([`Sql::transaction`]).
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(Sql<'_>) -> Result<R, SqlError> + Send + 'static,
    ) -> Result<R, DbError> {
        let db = self.clone();
        let actor = crate::audit::task_actor();
        tokio::task::spawn_blocking(move || crate::audit::on_thread(actor, || db.run_sync(f)))
            .await
            .map_err(|e| DbError::Task(e.to_string()))?
    }

    /// [`Db::run`] on this thread (for start-up, the CLI and tests). Not from an async task:
    /// the PostgreSQL client runs its own small runtime, which tokio refuses inside another.
    pub fn run_sync<R>(
        &self,
        f: impl FnOnce(Sql<'_>) -> Result<R, SqlError>,
    ) -> Result<R, DbError> {
        let out = match &self.backend {
            Backend::Sqlite(conn) => {
                let conn = conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                f(Sql::sqlite(&conn))
            }
            Backend::Postgres(pool) => {
                pool.session().and_then(|session| session.in_transaction(|s| f(Sql::postgres(s))))
            }
        };
        out.map_err(|source| DbError::Sql { target: self.path.display().to_string(), source })
    }

    /// Runs `f` on the SQLite connection, on the blocking pool: for modules not yet ported
    /// to [`crate::sql`] ([`DbError::SqliteOnly`] on PostgreSQL).
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R> + Send + 'static,
    ) -> Result<R, DbError> {
        let conn = self.sqlite()?;
        let path = self.path.clone();
        // The request's actor goes along, for the events the transaction records.
        let actor = crate::audit::task_actor();
        tokio::task::spawn_blocking(move || {
            let mut conn = conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            crate::audit::on_thread(actor, || f(&mut conn))
                .map_err(|source| DbError::Sqlite { path, source })
        })
        .await
        .map_err(|e| DbError::Task(e.to_string()))?
    }

    /// Runs `f` on the SQLite connection on this thread (for start-up and CLI use);
    /// [`DbError::SqliteOnly`] on PostgreSQL.
    pub fn call_sync<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<R>,
    ) -> Result<R, DbError> {
        let conn = self.sqlite()?;
        let mut conn = conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut conn).map_err(|source| DbError::Sqlite { path: self.path.clone(), source })
    }

    /// The ids of the events after event `low`, ascending, each with whether this
    /// process recorded it (through this `Db`'s pool; on SQLite, where one process writes,
    /// every one) rather than another replica: for [`crate::event_poll`]. Own ids up to
    /// `low` are forgotten here: the poll never reads them again.
    pub async fn events_after(&self, low: i64) -> Result<Vec<(i64, bool)>, DbError> {
        let ids: Vec<i64> = self
            .run(move |sql| {
                sql.query_map(
                    "SELECT id FROM events WHERE id > $1 ORDER BY id",
                    params![low],
                    |r| r.get(0),
                )
            })
            .await?;
        // Read after the query: an event it returned was committed, so its id was noted
        // (at its insert) before.
        Ok(match &self.backend {
            Backend::Sqlite(_) => ids.into_iter().map(|id| (id, true)).collect(),
            Backend::Postgres(pool) => {
                let own = pool.own_events(&ids, low);
                ids.into_iter().map(|id| (id, own.contains(&id))).collect()
            }
        })
    }

    /// A PostgreSQL connection of its own, outside the pool, for a lock held as long as it
    /// lives ([`crate::lease`]); `None` on SQLite. Blocks: from the blocking pool.
    pub(crate) fn own_postgres_connection(&self) -> Option<Result<::postgres::Client, DbError>> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(pool) => Some(
                pool.connect_own()
                    .map_err(|source| DbError::Sql { target: pool.target().to_owned(), source }),
            ),
        }
    }

    fn sqlite(&self) -> Result<Arc<Mutex<Connection>>, DbError> {
        match &self.backend {
            Backend::Sqlite(conn) => Ok(Arc::clone(conn)),
            Backend::Postgres(_) => {
                Err(DbError::SqliteOnly { target: self.path.display().to_string() })
            }
        }
    }
}

pub(crate) fn ts(t: Timestamp) -> i64 {
    t.unix() as i64
}

pub(crate) fn from_ts(v: i64) -> Timestamp {
    Timestamp::from_unix(v.max(0) as u64)
}

pub(crate) fn sha(text: &str) -> rusqlite::Result<Sha256> {
    text.parse().map_err(|e: falaj_common::keys::KeyError| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// Column `idx` of `r`, a SHA-256 in hex.
pub(crate) fn sha_at(r: &Row<'_>, idx: usize) -> Result<Sha256, SqlError> {
    let text: String = r.get(idx)?;
    text.parse().map_err(|e: falaj_common::keys::KeyError| SqlError::Conversion {
        column: idx,
        message: e.to_string(),
    })
}

/// The newest event's id (0 before the first). Every change to what agents should hold
/// (deployments, rollouts, snapshots, fine-tune orders) records an event, so a replica
/// that sees this move knows something its agents may need changed.
pub fn latest_event<C: AsSql + ?Sized>(conn: &C) -> Result<i64, C::Error> {
    Ok(conn.sql().query_row("SELECT COALESCE(MAX(id), 0) FROM events", &[], |r| r.get(0))?)
}

/// Records an event.
pub fn event<C: AsSql + ?Sized>(
    conn: &C,
    at: Timestamp,
    kind: &str,
    subject: &str,
    detail: &str,
) -> Result<(), C::Error> {
    let sql = conn.sql();
    let id: i64 = sql.query_row(
        "INSERT INTO events (at, kind, subject, detail) VALUES ($1, $2, $3, $4) RETURNING id",
        params![ts(at), kind, subject, detail],
        |r| r.get(0),
    )?;
    sql.note_own_event(id);
    let details = serde_json::from_str(detail).unwrap_or_else(|_| serde_json::json!(detail));
    crate::audit::record(&sql, at, kind, subject, Outcome::Success, details)?;
    Ok(())
}

/// A setting's value.
pub fn setting<C: AsSql + ?Sized>(conn: &C, key: &str) -> Result<Option<String>, C::Error> {
    Ok(conn
        .sql()
        .query_row("SELECT value FROM settings WHERE key = $1", params![key], |r| r.get(0))
        .optional()?)
}

/// Sets a setting.
pub fn set_setting<C: AsSql + ?Sized>(conn: &C, key: &str, value: &str) -> Result<(), C::Error> {
    conn.sql().execute(
        "INSERT INTO settings (key, value) VALUES ($1, $2)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )?;
    Ok(())
}

// ---- tokens ----

/// A token as stored (its secret only as a hash).
#[derive(Debug, Clone)]
pub struct TokenRow {
    /// Public id.
    pub id: String,
    /// Group the agent joins.
    pub group: String,
    /// Region.
    pub region: String,
    /// Expiry.
    pub expires: Timestamp,
}

/// Stores a new token.
pub fn insert_token<C: AsSql + ?Sized>(
    conn: &C,
    token: &TokenRow,
    secret_sha256: Sha256,
    now: Timestamp,
) -> Result<(), C::Error> {
    conn.sql().execute(
        "INSERT INTO tokens (id, secret_sha256, grp, region, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6)",
        params![token.id, secret_sha256.to_string(), token.group, token.region, ts(now), ts(token.expires)],
    )?;
    let detail =
        serde_json::json!({"group": token.group, "region": token.region, "expires": token.expires});
    event(conn, now, "token.create", &token.id, &detail.to_string())
}

/// Why a token was refused at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenRefusal {
    /// No such token (or the secret does not match: the two are not told apart).
    #[error("unknown enrollment token")]
    Unknown,
    /// The token was already used.
    #[error("enrollment token was already used")]
    Used,
    /// The token has expired.
    #[error("enrollment token expired at {0}")]
    Expired(Timestamp),
    /// The token is for another region.
    #[error("enrollment token is for region {token:?}, this control plane serves {mine:?}")]
    WrongRegion {
        /// The token's region.
        token: String,
        /// This control plane's region.
        mine: String,
    },
}

/// A new agent, as enrollment records it.
#[derive(Debug, Clone)]
pub struct NewAgent {
    /// Its id.
    pub id: String,
    /// Its host name.
    pub hostname: String,
    /// Its software version.
    pub agent_version: String,
    /// The certificate issued.
    pub serial: String,
    /// When that certificate expires.
    pub cert_expires: Timestamp,
}

/// An enrollment request as the token store sees it.
#[derive(Debug, Clone)]
pub struct TokenUse {
    /// The token's id.
    pub token_id: String,
    /// The digest of the secret presented.
    pub secret_sha256: Sha256,
    /// The digest of the CSR presented.
    pub csr_sha256: Sha256,
}

/// The agent that `token` already enrolled with this very CSR, if it did and is not
/// revoked: an enrollment interrupted after its answer, asking again.
pub fn enrolled_by<C: AsSql + ?Sized>(
    conn: &C,
    token: &TokenUse,
) -> Result<Option<String>, C::Error> {
    Ok(conn
        .sql()
        .query_row(
            "SELECT t.used_by FROM tokens t JOIN agents a ON a.id = t.used_by
             WHERE t.id = $1 AND t.secret_sha256 = $2 AND t.used_csr_sha256 = $3 AND a.revoked_at IS NULL",
            params![token.token_id, token.secret_sha256.to_string(), token.csr_sha256.to_string()],
            |r| r.get(0),
        )
        .optional()?)
}

/// A token as enrollment reads it: (secret, group, region, expiry), and who used it with
/// which CSR.
type TokenUseRow = ((String, String, String, i64), (Option<String>, Option<String>));

/// Consumes `token` (checking secret, use, expiry and region) and records the agent, in
/// one transaction: a token enrolls exactly one agent. The agent it enrolled with the
/// same CSR (see [`enrolled_by`]) gets the new certificate instead, while the token has
/// not expired.
pub fn enroll<C: AsSql + ?Sized>(
    conn: &mut C,
    token: &TokenUse,
    region: &str,
    agent: &NewAgent,
    now: Timestamp,
) -> Result<Result<String, TokenRefusal>, C::Error> {
    let tx = conn.sql().transaction_immediate()?;
    // The token's row stays locked until the end (PostgreSQL), so that two enrollments
    // with one token are one after the other, as SQLite's write lock makes them.
    let row: Option<TokenUseRow> = tx
        .query_row(
            &format!(
                "SELECT secret_sha256, grp, region, expires_at, used_by, used_csr_sha256 FROM tokens WHERE id = $1{}",
                tx.for_update()
            ),
            params![token.token_id],
            |r| Ok(((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?), (r.get(4)?, r.get(5)?))),
        )
        .optional()?;
    let Some(((secret, group, token_region, expires), (used_by, used_csr))) = row else {
        return Ok(Err(TokenRefusal::Unknown));
    };
    // Both sides are digests of the secret, so this comparison's timing reveals nothing.
    if secret != token.secret_sha256.to_string() {
        return Ok(Err(TokenRefusal::Unknown));
    }
    let again = used_by.as_deref() == Some(agent.id.as_str())
        && used_csr == Some(token.csr_sha256.to_string());
    if used_by.is_some() && !again {
        return Ok(Err(TokenRefusal::Used));
    }
    if ts(now) >= expires {
        return Ok(Err(TokenRefusal::Expired(from_ts(expires))));
    }
    if token_region != region {
        return Ok(Err(TokenRefusal::WrongRegion { token: token_region, mine: region.to_owned() }));
    }
    if !again {
        tx.execute(
            "UPDATE tokens SET used_at = $1, used_by = $2, used_csr_sha256 = $3 WHERE id = $4",
            params![ts(now), agent.id, token.csr_sha256.to_string(), token.token_id],
        )?;
        tx.execute(
            "INSERT INTO agents (id, hostname, grp, region, enrolled_at, agent_version) VALUES ($1, $2, $3, $4, $5, $6)",
            params![agent.id, agent.hostname, group, region, ts(now), agent.agent_version],
        )?;
    }
    tx.execute(
        "INSERT INTO certificates (serial, agent_id, issued_at, expires_at) VALUES ($1, $2, $3, $4)",
        params![agent.serial, agent.id, ts(now), ts(agent.cert_expires)],
    )?;
    let (kind, detail) = if again {
        (
            "enroll-again",
            format!(
                "host {}, token {} (an interrupted enrollment)",
                agent.hostname, token.token_id
            ),
        )
    } else {
        ("enroll", format!("group {group}, host {}, token {}", agent.hostname, token.token_id))
    };
    event(&*tx, now, kind, &agent.id, &detail)?;
    tx.commit()?;
    Ok(Ok(group))
}

// ---- agents ----

/// An agent as the fleet view shows it.
#[derive(Debug, Clone)]
pub struct AgentRow {
    /// Its id.
    pub id: String,
    /// Host name.
    pub hostname: String,
    /// Group.
    pub group: String,
    /// Region.
    pub region: String,
    /// Enrollment time.
    pub enrolled_at: Timestamp,
    /// Last message received.
    pub last_seen: Option<Timestamp>,
    /// Software version.
    pub agent_version: String,
    /// Last reported state.
    pub actual: Option<ActualState>,
    /// When it was revoked.
    pub revoked_at: Option<Timestamp>,
}

fn agent_row(r: &Row<'_>) -> Result<AgentRow, SqlError> {
    let actual: Option<String> = r.get(7)?;
    Ok(AgentRow {
        id: r.get(0)?,
        hostname: r.get(1)?,
        group: r.get(2)?,
        region: r.get(3)?,
        enrolled_at: from_ts(r.get(4)?),
        last_seen: r.get::<Option<i64>>(5)?.map(from_ts),
        agent_version: r.get(6)?,
        actual: actual.and_then(|a| serde_json::from_str(&a).ok()),
        revoked_at: r.get::<Option<i64>>(8)?.map(from_ts),
    })
}

const AGENT_COLUMNS: &str =
    "id, hostname, grp, region, enrolled_at, last_seen, agent_version, actual, revoked_at";

/// One agent.
pub fn agent<C: AsSql + ?Sized>(conn: &C, id: &str) -> Result<Option<AgentRow>, C::Error> {
    Ok(conn
        .sql()
        .query_row(
            &format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1"),
            params![id],
            agent_row,
        )
        .optional()?)
}

/// Every agent, by group then id.
pub fn agents<C: AsSql + ?Sized>(conn: &C) -> Result<Vec<AgentRow>, C::Error> {
    Ok(conn.sql().query_map(
        &format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY grp, id"),
        params![],
        agent_row,
    )?)
}

/// The agents of a group (not revoked).
pub fn group_agents<C: AsSql + ?Sized>(conn: &C, group: &str) -> Result<Vec<String>, C::Error> {
    Ok(conn.sql().query_map(
        "SELECT id FROM agents WHERE grp = $1 AND revoked_at IS NULL ORDER BY id",
        params![group],
        |r| r.get(0),
    )?)
}

/// Whether `serial` is a certificate issued to `agent_id`, which is not revoked.
pub fn certificate_valid<C: AsSql + ?Sized>(
    conn: &C,
    agent_id: &str,
    serial: &str,
) -> Result<bool, C::Error> {
    let n: i64 = conn.sql().query_row(
        "SELECT COUNT(*) FROM certificates c JOIN agents a ON a.id = c.agent_id
         WHERE c.serial = $1 AND c.agent_id = $2 AND a.revoked_at IS NULL",
        params![serial, agent_id],
        |r| r.get(0),
    )?;
    Ok(n > 0)
}

/// Records a renewed certificate.
pub fn add_certificate<C: AsSql + ?Sized>(
    conn: &C,
    agent_id: &str,
    serial: &str,
    expires: Timestamp,
    now: Timestamp,
) -> Result<(), C::Error> {
    let sql = conn.sql();
    sql.execute(
        "INSERT INTO certificates (serial, agent_id, issued_at, expires_at) VALUES ($1, $2, $3, $4)",
        params![serial, agent_id, ts(now), ts(expires)],
    )?;
    event(&sql, now, "renew", agent_id, &format!("certificate {serial}, expires {expires}"))?;
    Ok(())
}

/// Revokes an agent; returns false if there is no such agent.
pub fn revoke<C: AsSql + ?Sized>(
    conn: &C,
    agent_id: &str,
    now: Timestamp,
) -> Result<bool, C::Error> {
    let sql = conn.sql();
    let n = sql.execute(
        "UPDATE agents SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2",
        params![ts(now), agent_id],
    )?;
    if n > 0 {
        event(&sql, now, "revoke", agent_id, "agent revoked")?;
    }
    Ok(n > 0)
}

/// Records what agents reported and when they were last seen, in one transaction, with
/// the fine-tune jobs' reports among them ([`crate::finetune::record_reports`]).
pub fn record_seen<C: AsSql + ?Sized>(
    conn: &mut C,
    seen: &[(String, Timestamp, Option<ActualState>)],
) -> Result<(), C::Error> {
    let tx = conn.sql().transaction()?;
    for (id, at, actual) in seen {
        match actual {
            Some(actual) => {
                crate::finetune::record_reports(&tx, id, &actual.jobs, *at)?;
                // A job's weights are kept with the job (when its order allowed them), not
                // again in the agent's last state.
                let json = if actual.jobs.iter().any(|j| j.weights.is_some()) {
                    let mut kept = actual.clone();
                    for job in &mut kept.jobs {
                        job.weights = None;
                    }
                    serde_json::to_string(&kept)
                } else {
                    serde_json::to_string(actual)
                };
                tx.execute(
                    "UPDATE agents SET last_seen = $1, actual = $2, agent_version = $3 WHERE id = $4",
                    params![
                        ts(*at),
                        json.unwrap_or_default(),
                        actual.agent_version,
                        id
                    ],
                )?
            }
            None => {
                tx.execute("UPDATE agents SET last_seen = $1 WHERE id = $2", params![ts(*at), id])?
            }
        };
    }
    Ok(tx.commit()?)
}

// ---- bundles and deployments ----

/// A registered bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleRow {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// Manifest hash.
    pub manifest_sha256: Sha256,
    /// Whole-file hash.
    pub bundle_sha256: Sha256,
    /// Recipe hash (the recipe is a blob).
    pub recipe_sha256: Sha256,
    /// File size.
    pub size: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// When it was pushed.
    pub pushed_at: Timestamp,
}

fn bundle_row(r: &Row<'_>) -> Result<BundleRow, SqlError> {
    Ok(BundleRow {
        name: r.get(0)?,
        version: r.get::<i64>(1)? as u64,
        manifest_sha256: sha_at(r, 2)?,
        bundle_sha256: sha_at(r, 3)?,
        recipe_sha256: sha_at(r, 4)?,
        size: r.get::<i64>(5)? as u64,
        chunks: r.get::<i64>(6)? as u64,
        pushed_at: from_ts(r.get(7)?),
    })
}

const BUNDLE_COLUMNS: &str = "b.name, b.version, b.manifest_sha256, b.bundle_sha256, b.recipe_sha256, b.size, b.chunks, b.pushed_at";

/// A bundle by name and version.
pub fn bundle<C: AsSql + ?Sized>(
    conn: &C,
    name: &str,
    version: u64,
) -> Result<Option<BundleRow>, C::Error> {
    Ok(conn
        .sql()
        .query_row(
            &format!("SELECT {BUNDLE_COLUMNS} FROM bundles b WHERE b.name = $1 AND b.version = $2"),
            params![name, version as i64],
            bundle_row,
        )
        .optional()?)
}

/// Every bundle.
pub fn bundles<C: AsSql + ?Sized>(conn: &C) -> Result<Vec<BundleRow>, C::Error> {
    Ok(conn.sql().query_map(
        &format!("SELECT {BUNDLE_COLUMNS} FROM bundles b ORDER BY b.name, b.version"),
        params![],
        bundle_row,
    )?)
}

/// Registers a bundle (its blobs already stored).
pub fn insert_bundle<C: AsSql + ?Sized>(conn: &C, b: &BundleRow) -> Result<(), C::Error> {
    let sql = conn.sql();
    sql.execute(
        "INSERT INTO bundles (name, version, manifest_sha256, bundle_sha256, recipe_sha256, size, chunks, pushed_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        params![
            b.name,
            b.version as i64,
            b.manifest_sha256.to_string(),
            b.bundle_sha256.to_string(),
            b.recipe_sha256.to_string(),
            b.size as i64,
            b.chunks as i64,
            ts(b.pushed_at)
        ],
    )?;
    event(
        &sql,
        b.pushed_at,
        "push",
        &format!("{}@{}", b.name, b.version),
        &format!("{} bytes, {} chunks", b.size, b.chunks),
    )?;
    Ok(())
}

/// Points `old`'s row at the re-signed file `new` (same name, version and manifest: the
/// signatures alone differ). The caller records it in the audit log, with the keys.
pub fn re_sign_bundle<C: AsSql + ?Sized>(
    conn: &C,
    old: &BundleRow,
    new: &BundleRow,
) -> Result<(), C::Error> {
    conn.sql().execute(
        "UPDATE bundles SET bundle_sha256 = $4, recipe_sha256 = $5, size = $6, chunks = $7
         WHERE name = $1 AND version = $2 AND manifest_sha256 = $3",
        params![
            old.name,
            old.version as i64,
            old.manifest_sha256.to_string(),
            new.bundle_sha256.to_string(),
            new.recipe_sha256.to_string(),
            new.size as i64,
            new.chunks as i64,
        ],
    )?;
    Ok(())
}

/// What a group should run: its deployed bundles.
pub fn deployments<C: AsSql + ?Sized>(conn: &C, group: &str) -> Result<Vec<BundleRow>, C::Error> {
    Ok(conn.sql().query_map(
        &format!(
            "SELECT {BUNDLE_COLUMNS} FROM deployments d JOIN bundles b ON b.name = d.name AND b.version = d.version
             WHERE d.grp = $1 ORDER BY b.name"
        ),
        params![group],
        bundle_row,
    )?)
}

/// Every deployment: (group, name, version).
pub fn all_deployments<C: AsSql + ?Sized>(
    conn: &C,
) -> Result<Vec<(String, String, u64)>, C::Error> {
    Ok(conn.sql().query_map(
        "SELECT grp, name, version FROM deployments ORDER BY grp, name",
        params![],
        |r| Ok((r.get(0)?, r.get(1)?, r.get::<i64>(2)? as u64)),
    )?)
}

/// The version `group` runs of `name`, if it is deployed there.
pub fn deployment<C: AsSql + ?Sized>(
    conn: &C,
    group: &str,
    name: &str,
) -> Result<Option<u64>, C::Error> {
    let version: Option<i64> = conn
        .sql()
        .query_row(
            "SELECT version FROM deployments WHERE grp = $1 AND name = $2",
            params![group, name],
            |r| r.get(0),
        )
        .optional()?;
    Ok(version.map(|v| v as u64))
}

/// Sets what `group` runs for `name`.
pub fn deploy<C: AsSql + ?Sized>(
    conn: &C,
    group: &str,
    name: &str,
    version: u64,
    now: Timestamp,
) -> Result<(), C::Error> {
    let sql = conn.sql();
    sql.execute(
        "INSERT INTO deployments (grp, name, version, updated_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (grp, name) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
        params![group, name, version as i64, ts(now)],
    )?;
    event(&sql, now, "deploy", group, &format!("{name}@{version}"))?;
    Ok(())
}

/// Removes `name` from `group`; returns false if it was not deployed there.
pub fn undeploy<C: AsSql + ?Sized>(
    conn: &C,
    group: &str,
    name: &str,
    now: Timestamp,
) -> Result<bool, C::Error> {
    let sql = conn.sql();
    let n =
        sql.execute("DELETE FROM deployments WHERE grp = $1 AND name = $2", params![group, name])?;
    if n > 0 {
        event(&sql, now, "undeploy", group, name)?;
    }
    Ok(n > 0)
}

// ---- desired state ----

/// The last desired-state document issued to an agent.
#[derive(Debug, Clone)]
pub struct IssuedDesired {
    /// Its version.
    pub version: u64,
    /// Hash of its content (the bundle list), to tell whether a new one is needed.
    pub content_sha256: Sha256,
    /// Its expiry.
    pub expires: Timestamp,
    /// The signed document, encoded.
    pub signed: Vec<u8>,
}

/// The last document issued to `agent_id`.
pub fn desired<C: AsSql + ?Sized>(
    conn: &C,
    agent_id: &str,
) -> Result<Option<IssuedDesired>, C::Error> {
    Ok(conn
        .sql()
        .query_row(
            "SELECT version, content_sha256, expires_at, signed FROM desired WHERE agent_id = $1",
            params![agent_id],
            issued_row,
        )
        .optional()?)
}

fn issued_row(r: &Row<'_>) -> Result<IssuedDesired, SqlError> {
    Ok(IssuedDesired {
        version: r.get::<i64>(0)? as u64,
        content_sha256: sha_at(r, 1)?,
        expires: from_ts(r.get(2)?),
        signed: r.get(3)?,
    })
}

/// [`desired`] for a transaction that will issue the next document: the agent's row is
/// locked until it ends (PostgreSQL; on SQLite the transaction must be
/// [`Sql::transaction_immediate`], or the one connection of [`Db`]), so that two writers
/// issue one after the other and versions stay strictly increasing per agent.
pub fn desired_for_update<C: AsSql + ?Sized>(
    conn: &C,
    agent_id: &str,
) -> Result<Option<IssuedDesired>, C::Error> {
    let sql = conn.sql();
    // The agent's row, not the document's, which may not exist yet.
    sql.query_map(
        &format!("SELECT id FROM agents WHERE id = $1{}", sql.for_update()),
        params![agent_id],
        |r| r.get::<String>(0),
    )?;
    desired(&sql, agent_id).map_err(C::Error::from)
}

/// Stores a newly issued document if its version is above the stored one; returns whether
/// it did.
pub fn put_desired<C: AsSql + ?Sized>(
    conn: &C,
    agent_id: &str,
    issued: &IssuedDesired,
) -> Result<bool, C::Error> {
    let n = conn.sql().execute(
        "INSERT INTO desired (agent_id, version, content_sha256, expires_at, signed) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (agent_id) DO UPDATE SET version = excluded.version, content_sha256 = excluded.content_sha256,
             expires_at = excluded.expires_at, signed = excluded.signed
         WHERE excluded.version > desired.version",
        params![agent_id, issued.version as i64, issued.content_sha256.to_string(), ts(issued.expires), issued.signed],
    )?;
    Ok(n > 0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records agent `id` as enrolled (in group `edge`), for tests of what agents send.
    pub(crate) fn add_agent(conn: &Connection, id: &str) -> rusqlite::Result<()> {
        conn.execute(
            "INSERT INTO agents (id, hostname, grp, region, enrolled_at, agent_version)
             VALUES (?1, 'host', 'edge', 'eu-west-1', 0, '0')",
            [id],
        )
        .map(drop)
    }
}
