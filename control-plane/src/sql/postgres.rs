//! The PostgreSQL side of [`crate::sql`]: a small pool of synchronous `postgres` clients
//! (each query runs on tokio's blocking pool, as SQLite's do, so the query code is the same
//! for both), TLS to the database through rustls, and versioned migrations.
//!
//! The URL is libpq's (`postgres://user:password@host:port/db?sslmode=require`). `sslmode`
//! is `disable`, `prefer` (the default: TLS when the server offers it) or `require`;
//! `verify-ca` and `verify-full` are taken as `require`, because whenever TLS is used the
//! server's certificate and name are verified (stricter than libpq's `require`), against
//! the CA file named by `sslrootcert` or else the system's roots.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use postgres::types::ToSql;
use postgres::{Client, Statement};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{Param, SqlError};

/// The advisory lock held while migrating, so that replicas starting together migrate once.
const MIGRATION_LOCK: i64 = super::locks::MIGRATIONS;

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// libpq's URL (see the module's documentation for `sslmode` and `sslrootcert`).
    pub url: String,
    /// The most connections open at once.
    pub pool_size: usize,
    /// A file holding the password (its first line), read at connection set-up, so that
    /// the URL in a readable configuration file need not carry it.
    pub password_file: Option<PathBuf>,
}

impl PgOptions {
    /// `url` with the default pool (8 connections) and no password file.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), pool_size: 8, password_file: None }
    }
}

/// The server's message for a database error, else the client's error and its cause.
pub(crate) fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return match db.detail() {
            Some(detail) => format!("{}: {} ({detail})", db.severity(), db.message()),
            None => format!("{}: {}", db.severity(), db.message()),
        };
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// A pool of connections to one database.
pub(crate) struct Pool {
    target: String,
    config: postgres::Config,
    tls: MakeRustlsConnect,
    max: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
    /// Ids of the events this process recorded through the pool ([`PgSession::note_own_event`]),
    /// so its event poll can tell them from other replicas' ([`Pool::own_events`]).
    own_events: Mutex<BTreeSet<i64>>,
}

struct PoolState {
    idle: Vec<PgConn>,
    open: usize,
}

/// A client and the statements it has prepared.
struct PgConn {
    client: Client,
    statements: HashMap<String, Statement>,
}

impl PgConn {
    fn statement(&mut self, sql: &str) -> Result<Statement, SqlError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The configuration holds the password, and the TLS set-up says nothing useful.
        f.debug_struct("Pool")
            .field("target", &self.target)
            .field("max", &self.max)
            .finish_non_exhaustive()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let idle =
            std::mem::take(&mut self.state.get_mut().unwrap_or_else(PoisonError::into_inner).idle);
        // The daemon drops its last `Db` within the runtime.
        if !idle.is_empty() {
            close(idle, "the pool's idle connections");
        }
    }
}

/// Drops `connections` (PostgreSQL clients, or what holds them), which closes them: on a
/// thread of its own when called within a tokio runtime, where the synchronous client's
/// close (which blocks on a runtime of its own) is refused. Where that thread cannot
/// start, the server notices the closed sockets and frees what they held.
pub(crate) fn close<T: Send + 'static>(connections: T, what: &str) {
    if tokio::runtime::Handle::try_current().is_err() {
        drop(connections);
        return;
    }
    let closing =
        std::thread::Builder::new().name("falaj-pg-close".into()).spawn(move || drop(connections));
    if let Err(e) = closing {
        tracing::warn!(error = %e, what, "PostgreSQL connections left to the server to close");
    }
}

impl Pool {
    /// Parses `options` and prepares TLS; connects nothing yet.
    pub(crate) fn new(options: &PgOptions) -> Result<Self, SqlError> {
        let (url, root) = split_url(&options.url);
        let mut config: postgres::Config =
            url.parse().map_err(|e: postgres::Error| SqlError::Connect(describe(&e)))?;
        if let Some(file) = &options.password_file {
            let text = std::fs::read_to_string(file).map_err(|e| {
                SqlError::Connect(format!("reading the password file {}: {e}", file.display()))
            })?;
            config.password(text.lines().next().unwrap_or_default());
        }
        let target = target(&config);
        let tls = tls(&config, root.as_ref()).map_err(SqlError::Connect)?;
        Ok(Self {
            target,
            config,
            tls,
            max: options.pool_size.max(1),
            state: Mutex::new(PoolState { idle: Vec::new(), open: 0 }),
            freed: Condvar::new(),
            own_events: Mutex::default(),
        })
    }

    /// Which of `ids` (events read back from the database) this process recorded, and
    /// forgets every id up to `upto`: the poll never reads those again.
    pub(crate) fn own_events(&self, ids: &[i64], upto: i64) -> BTreeSet<i64> {
        let mut own = self.own_events.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = ids.iter().copied().filter(|id| own.contains(id)).collect();
        *own = own.split_off(&(upto.saturating_add(1)));
        mine
    }

    /// The database as errors name it: `postgres://host:port/db`, never the password.
    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    /// A connection for one [`crate::db::Db::run`], waiting while all are in use.
    pub(crate) fn session(self: &Arc<Self>) -> Result<PgSession, SqlError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(conn) = state.idle.pop() {
                if conn.client.is_closed() {
                    state.open -= 1;
                    continue;
                }
                return Ok(self.wrap(conn));
            }
            if state.open < self.max {
                state.open += 1;
                drop(state);
                return match self.config.connect(self.tls.clone()) {
                    Ok(client) => Ok(self.wrap(PgConn { client, statements: HashMap::new() })),
                    Err(e) => {
                        self.release(None);
                        Err(SqlError::Connect(describe(&e)))
                    }
                };
            }
            state = self.freed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// A connection of its own, outside the pool and its limit: for a session-level lock
    /// held for as long as the connection lives ([`crate::lease`]).
    pub(crate) fn connect_own(&self) -> Result<Client, SqlError> {
        self.config.connect(self.tls.clone()).map_err(|e| SqlError::Connect(describe(&e)))
    }

    fn wrap(self: &Arc<Self>, conn: PgConn) -> PgSession {
        PgSession { conn: RefCell::new(Some(conn)), depth: Cell::new(0), pool: Arc::clone(self) }
    }

    /// Takes back a connection (`None`: it was closed or is unusable).
    fn release(&self, conn: Option<PgConn>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match conn {
            Some(conn) => state.idle.push(conn),
            None => state.open -= 1,
        }
        self.freed.notify_one();
    }
}

/// One connection taken from the pool, for one thread, given back when dropped.
pub struct PgSession {
    conn: RefCell<Option<PgConn>>,
    /// Transactions open: 0 outside one, 1 in one, more in savepoints.
    pub(super) depth: Cell<u32>,
    pool: Arc<Pool>,
}

impl PgSession {
    /// Notes that event `id` was recorded in this session: by this process, whichever way
    /// its transaction ends (an id rolled back is never read back).
    pub(crate) fn note_own_event(&self, id: i64) {
        self.pool.own_events.lock().unwrap_or_else(PoisonError::into_inner).insert(id);
    }

    fn with<R>(&self, f: impl FnOnce(&mut PgConn) -> Result<R, SqlError>) -> Result<R, SqlError> {
        let mut conn = self.conn.borrow_mut();
        let conn = conn.as_mut().expect("a session holds its connection until dropped");
        let out = f(conn);
        if out.is_err() {
            // A statement prepared before a schema change may fail; prepare afresh.
            conn.statements.clear();
        }
        out
    }

    pub(super) fn execute(&self, sql: &str, params: &[&dyn Param]) -> Result<u64, SqlError> {
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.to_postgres()).collect();
        self.with(|c| {
            let s = c.statement(sql)?;
            Ok(c.client.execute(&s, &params)?)
        })
    }

    pub(super) fn query(
        &self,
        sql: &str,
        params: &[&dyn Param],
    ) -> Result<Vec<postgres::Row>, SqlError> {
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.to_postgres()).collect();
        self.with(|c| {
            let s = c.statement(sql)?;
            Ok(c.client.query(&s, &params)?)
        })
    }

    pub(super) fn batch(&self, sql: &str) -> Result<(), SqlError> {
        self.with(|c| Ok(c.client.batch_execute(sql)?))
    }

    /// Runs `f` in one transaction: committed if it returns `Ok`, else rolled back.
    pub(crate) fn in_transaction<R>(
        &self,
        f: impl FnOnce(&Self) -> Result<R, SqlError>,
    ) -> Result<R, SqlError> {
        self.batch("BEGIN")?;
        self.depth.set(1);
        let out = f(self);
        let end = if out.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = self.batch(end);
        self.depth.set(0);
        let out = out?;
        ended.map(|()| out)
    }
}

impl Drop for PgSession {
    fn drop(&mut self) {
        let mut conn = self.conn.borrow_mut().take();
        // A transaction left open (a panic inside it) is not handed to the next user.
        if self.depth.get() > 0
            && let Some(c) = &mut conn
            && c.client.batch_execute("ROLLBACK").is_err()
        {
            conn = None;
        }
        self.pool.release(conn.filter(|c| !c.client.is_closed()));
    }
}

/// The URL without `sslrootcert` (which `postgres` does not know) and with `verify-ca` and
/// `verify-full` as `require`; and the CA file named, if any.
fn split_url(url: &str) -> (String, Option<PathBuf>) {
    let Some((base, query)) = url.split_once('?') else { return (url.to_owned(), None) };
    let (mut kept, mut root) = (Vec::new(), None);
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("sslrootcert", path)) => root = Some(PathBuf::from(path)),
            Some(("sslmode", "verify-ca" | "verify-full")) => kept.push("sslmode=require"),
            _ => kept.push(pair),
        }
    }
    if kept.is_empty() {
        (base.to_owned(), root)
    } else {
        (format!("{base}?{}", kept.join("&")), root)
    }
}

/// `url` without its password, query or anything after the host and database, for an
/// error about a URL that did not parse.
pub(crate) fn redacted(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "postgres (not a URL)".to_owned();
    };
    let rest = rest.split('?').next().unwrap_or_default();
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{rest}")
}

fn target(config: &postgres::Config) -> String {
    use postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            };
            match config.get_ports().get(i).or(config.get_ports().first()) {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect();
    format!("postgres://{}/{}", hosts.join(","), config.get_dbname().unwrap_or_default())
}

/// Rustls (with ring) trusting `root`'s certificates, or the system's.
fn tls(config: &postgres::Config, root: Option<&PathBuf>) -> Result<MakeRustlsConnect, String> {
    let mut roots = rustls::RootCertStore::empty();
    let disabled = matches!(config.get_ssl_mode(), postgres::config::SslMode::Disable);
    match root {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("sslrootcert {}: no certificate", path.display()));
            }
        }
        None if disabled => {}
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(client))
}

/// Why the schema could not be brought up to date.
#[derive(Debug)]
pub(crate) enum MigrateError {
    /// A query failed.
    Sql(SqlError),
    /// The database's schema is newer than this build's.
    TooNew { found: u32, supported: u32 },
}

impl From<SqlError> for MigrateError {
    fn from(e: SqlError) -> Self {
        Self::Sql(e)
    }
}

impl From<postgres::Error> for MigrateError {
    fn from(e: postgres::Error) -> Self {
        Self::Sql(e.into())
    }
}

/// Applies the migrations the database lacks, each in its own transaction: `migrations[i]`
/// takes `schema_version` from `i` to `i + 1`. A newer schema is refused, untouched.
pub(crate) fn migrate(pool: &Arc<Pool>, migrations: &[&str]) -> Result<(), MigrateError> {
    let session = pool.session()?;
    let supported = migrations.len() as u32;
    loop {
        let done = session.in_transaction(|s| {
            s.execute("SELECT pg_advisory_xact_lock($1)", super::params![MIGRATION_LOCK])?;
            s.batch(
                "CREATE TABLE IF NOT EXISTS schema_version (
                    one     BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
                    version BIGINT NOT NULL
                );
                INSERT INTO schema_version (version) VALUES (0) ON CONFLICT (one) DO NOTHING;",
            )?;
            let found: i64 = s.query("SELECT version FROM schema_version", &[])?[0].try_get(0)?;
            let found = u32::try_from(found).unwrap_or(u32::MAX);
            if found >= supported {
                return Ok(Some(found));
            }
            s.batch(migrations[found as usize])?;
            s.execute(
                "UPDATE schema_version SET version = $1",
                super::params![i64::from(found) + 1],
            )?;
            Ok(None)
        })?;
        match done {
            Some(found) if found > supported => {
                return Err(MigrateError::TooNew { found, supported });
            }
            Some(_) => return Ok(()),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_loses_what_postgres_does_not_know_and_never_shows_its_password() {
        let (url, root) = split_url(
            "postgres://u:secret@db.example:5433/falaj?sslmode=verify-full&sslrootcert=/etc/ca.pem",
        );
        assert_eq!(url, "postgres://u:secret@db.example:5433/falaj?sslmode=require");
        assert_eq!(root, Some(PathBuf::from("/etc/ca.pem")));
        let config: postgres::Config = url.parse().unwrap();
        assert_eq!(target(&config), "postgres://db.example:5433/falaj");
        assert_eq!(split_url("postgres://h/db").0, "postgres://h/db");
        assert_eq!(redacted("postgres://u:secret@h:1/db?x=y"), "postgres://h:1/db");
    }
}
