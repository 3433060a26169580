//! One SQL facade over the control plane's two databases, SQLite (rusqlite, the default)
//! and PostgreSQL (the synchronous `postgres` client, [`postgres`]), so that a query is
//! written once and runs on either.
//!
//! It reads like rusqlite on purpose, so that porting a query site is mechanical:
//! [`Sql::execute`], [`Sql::query_row`] (with [`OptionalExt::optional`]),
//! [`Sql::query_map`] (collected), [`Sql::transaction`] with [`Tx::commit`] (rolled back on
//! drop), typed parameters through [`params!`] and typed column reads through
//! [`Row::get`]. Placeholders are written once, PostgreSQL's way (`$1`..`$n`), and
//! rewritten to `?1`..`?n` for SQLite. Values are those both sides hold alike: `i64`
//! (`INTEGER` / `BIGINT`), `String` and `&str` (`TEXT`), `Vec<u8>` and `&[u8]` (`BLOB` /
//! `BYTEA`), `f64` (`REAL` / `DOUBLE PRECISION`), and `Option` of each for `NULL`.
//!
//! Code that takes `&C` where `C: AsSql` runs on a rusqlite `Connection` or `Transaction`
//! (returning `rusqlite::Error`, so modules not yet ported call it as before) and on an
//! [`Sql`] (returning [`SqlError`]).
//!
//! Transactions: on PostgreSQL every [`crate::db::Db::run`] is one transaction (committed
//! when the closure returns `Ok`), and [`Sql::transaction`] inside it is a savepoint. On
//! SQLite statements outside [`Sql::transaction`] commit one by one, as before; code that
//! needs several statements to commit together says so with [`Sql::transaction`], which
//! holds on both.

pub mod copy;
pub mod locks;
pub mod postgres;
pub(crate) mod schema;

use std::borrow::Cow;
use std::cell::Cell;

use thiserror::Error;

pub use self::postgres::{PgOptions, PgSession};

/// Errors of a query on either database.
#[derive(Debug, Error)]
pub enum SqlError {
    /// SQLite failed.
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed (the server's message, when it sent one).
    #[error("{}", postgres::describe(.0))]
    Postgres(#[from] ::postgres::Error),
    /// `query_row` found no row ([`OptionalExt::optional`] turns it into `None`).
    #[error("query returned no rows")]
    NoRows,
    /// A column's value could not be read as the type asked for.
    #[error("column {column}: {message}")]
    Conversion {
        /// Its index.
        column: usize,
        /// What was wrong.
        message: String,
    },
    /// A value could not be encoded for storage.
    #[error("encoding {what}: {message}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// What was wrong.
        message: String,
    },
    /// The code asked for runs on SQLite only, for now.
    #[error("{0} is not yet ported to PostgreSQL (issue 21): use SQLite")]
    NotPorted(&'static str),
    /// No connection to PostgreSQL could be had (the pool, TLS set-up).
    #[error("PostgreSQL connection: {0}")]
    Connect(String),
}

/// How modules not yet ported see a facade error: as the rusqlite error they return.
impl From<SqlError> for rusqlite::Error {
    fn from(e: SqlError) -> Self {
        match e {
            SqlError::Sqlite(e) => e,
            SqlError::NoRows => rusqlite::Error::QueryReturnedNoRows,
            SqlError::Conversion { column, message } => rusqlite::Error::FromSqlConversionFailure(
                column,
                rusqlite::types::Type::Text,
                message.into(),
            ),
            other => rusqlite::Error::ToSqlConversionFailure(Box::new(other)),
        }
    }
}

/// `query_row(..).optional()`, as rusqlite's `OptionalExtension`.
pub trait OptionalExt<T> {
    /// `Ok(None)` instead of [`SqlError::NoRows`].
    fn optional(self) -> Result<Option<T>, SqlError>;
}

impl<T> OptionalExt<T> for Result<T, SqlError> {
    fn optional(self) -> Result<Option<T>, SqlError> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(SqlError::NoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Which database a [`Sql`] talks to, for the few statements that differ (row locks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite through rusqlite.
    Sqlite,
    /// PostgreSQL through `postgres`.
    Postgres,
}

/// A parameter both databases can bind.
pub trait Param {
    /// As rusqlite binds it.
    fn to_sqlite(&self) -> &dyn rusqlite::ToSql;
    /// As `postgres` binds it.
    fn to_postgres(&self) -> &(dyn ::postgres::types::ToSql + Sync);
}

impl<T: rusqlite::ToSql + ::postgres::types::ToSql + Sync> Param for T {
    fn to_sqlite(&self) -> &dyn rusqlite::ToSql {
        self
    }
    fn to_postgres(&self) -> &(dyn ::postgres::types::ToSql + Sync) {
        self
    }
}

/// An array parameter (`$1::BIGINT[]`), for the statements that run on PostgreSQL only,
/// where one statement over arrays (`unnest`) replaces a round trip per row. SQLite has no
/// arrays: binding one there is an error.
#[derive(Debug, Clone, Default)]
pub struct Array<T>(pub Vec<T>);

impl<T: ::postgres::types::ToSql + Sync> ::postgres::types::ToSql for Array<T> {
    fn to_sql(
        &self,
        ty: &::postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<::postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.0.to_sql(ty, out)
    }

    fn accepts(ty: &::postgres::types::Type) -> bool {
        <Vec<T> as ::postgres::types::ToSql>::accepts(ty)
    }

    ::postgres::types::to_sql_checked!();
}

impl<T> rusqlite::ToSql for Array<T> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Err(rusqlite::Error::ToSqlConversionFailure("an array binds on PostgreSQL only".into()))
    }
}

/// The parameters of a statement, `$1` first: `params![id, ts(now)]`.
#[macro_export]
macro_rules! params {
    () => { &[] as &[&dyn $crate::sql::Param] };
    ($($p:expr),+ $(,)?) => { &[$(&$p as &dyn $crate::sql::Param),+] as &[&dyn $crate::sql::Param] };
}
pub use crate::params;

/// A column type both databases can read.
pub trait Value: rusqlite::types::FromSql + for<'a> ::postgres::types::FromSql<'a> {}
impl<T: rusqlite::types::FromSql + for<'a> ::postgres::types::FromSql<'a>> Value for T {}

/// One row of a result.
pub enum Row<'r> {
    /// From SQLite.
    Sqlite(&'r rusqlite::Row<'r>),
    /// From PostgreSQL.
    Postgres(&'r ::postgres::Row),
}

impl Row<'_> {
    /// Column `idx` (from 0) as a `T`.
    pub fn get<T: Value>(&self, idx: usize) -> Result<T, SqlError> {
        match self {
            Row::Sqlite(r) => Ok(r.get(idx)?),
            Row::Postgres(r) => r
                .try_get(idx)
                .map_err(|e| SqlError::Conversion { column: idx, message: e.to_string() }),
        }
    }
}

/// A connection to either database, for the length of one [`crate::db::Db::run`] (or over
/// a rusqlite connection, for modules not yet ported). Cheap to copy.
#[derive(Clone, Copy)]
pub struct Sql<'c> {
    inner: Inner<'c>,
}

#[derive(Clone, Copy)]
enum Inner<'c> {
    Sqlite(&'c rusqlite::Connection),
    Postgres(&'c PgSession),
}

impl<'c> Sql<'c> {
    /// Over a rusqlite connection (or transaction: it derefs to one).
    pub fn sqlite(conn: &'c rusqlite::Connection) -> Self {
        Self { inner: Inner::Sqlite(conn) }
    }

    pub(crate) fn postgres(session: &'c PgSession) -> Self {
        Self { inner: Inner::Postgres(session) }
    }

    /// Notes that event `id` was recorded by this process, so that its event poll skips
    /// it (`Db::events_after`); nothing on SQLite, where no other replica writes.
    pub(crate) fn note_own_event(&self, id: i64) {
        if let Inner::Postgres(session) = self.inner {
            session.note_own_event(id);
        }
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        match self.inner {
            Inner::Sqlite(_) => Backend::Sqlite,
            Inner::Postgres(_) => Backend::Postgres,
        }
    }

    /// The rusqlite connection, on SQLite: how ported code calls a module not yet ported
    /// (which then fails on PostgreSQL with [`SqlError::NotPorted`]).
    pub fn as_sqlite(&self) -> Option<&'c rusqlite::Connection> {
        match self.inner {
            Inner::Sqlite(c) => Some(c),
            Inner::Postgres(_) => None,
        }
    }

    /// `" FOR UPDATE"` on PostgreSQL, where a read that decides a write must lock its rows
    /// against other connections; nothing on SQLite, which has no row locks (its one
    /// connection is serialised by [`crate::db::Db`], and a write transaction locks the
    /// whole database).
    pub fn for_update(&self) -> &'static str {
        match self.inner {
            Inner::Sqlite(_) => "",
            Inner::Postgres(_) => " FOR UPDATE",
        }
    }

    /// Runs a statement; returns the number of rows changed.
    pub fn execute(&self, sql: &str, params: &[&dyn Param]) -> Result<usize, SqlError> {
        match self.inner {
            Inner::Sqlite(c) => {
                let params: Vec<&dyn rusqlite::ToSql> =
                    params.iter().map(|p| p.to_sqlite()).collect();
                Ok(c.prepare_cached(&to_sqlite(sql))?.execute(&*params)?)
            }
            Inner::Postgres(s) => s.execute(sql, params).map(|n| n as usize),
        }
    }

    /// Runs statements without parameters, separated by `;`.
    pub fn execute_batch(&self, sql: &str) -> Result<(), SqlError> {
        match self.inner {
            Inner::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Inner::Postgres(s) => s.batch(sql),
        }
    }

    /// The first row of a query through `f`, or [`SqlError::NoRows`].
    pub fn query_row<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        mut f: impl FnMut(&Row<'_>) -> Result<T, SqlError>,
    ) -> Result<T, SqlError> {
        let mut first = None;
        self.each(sql, params, &mut |row| {
            first = Some(f(row)?);
            Ok(false)
        })?;
        first.ok_or(SqlError::NoRows)
    }

    /// Every row of a query through `f`.
    pub fn query_map<T>(
        &self,
        sql: &str,
        params: &[&dyn Param],
        mut f: impl FnMut(&Row<'_>) -> Result<T, SqlError>,
    ) -> Result<Vec<T>, SqlError> {
        let mut out = Vec::new();
        self.each(sql, params, &mut |row| {
            out.push(f(row)?);
            Ok(true)
        })?;
        Ok(out)
    }

    /// Calls `f` on each row while it returns `true`.
    fn each(
        &self,
        sql: &str,
        params: &[&dyn Param],
        f: &mut dyn FnMut(&Row<'_>) -> Result<bool, SqlError>,
    ) -> Result<(), SqlError> {
        match self.inner {
            Inner::Sqlite(c) => {
                let params: Vec<&dyn rusqlite::ToSql> =
                    params.iter().map(|p| p.to_sqlite()).collect();
                let mut stmt = c.prepare_cached(&to_sqlite(sql))?;
                let mut rows = stmt.query(&*params)?;
                while let Some(r) = rows.next()? {
                    if !f(&Row::Sqlite(r))? {
                        break;
                    }
                }
                Ok(())
            }
            Inner::Postgres(s) => {
                for r in s.query(sql, params)? {
                    if !f(&Row::Postgres(&r))? {
                        break;
                    }
                }
                Ok(())
            }
        }
    }

    /// Starts a transaction (a savepoint inside one), rolled back unless committed.
    pub fn transaction(&self) -> Result<Tx<'c>, SqlError> {
        self.begin(false)
    }

    /// A transaction that takes SQLite's write lock at once (`BEGIN IMMEDIATE`), for a read
    /// that decides a write; on PostgreSQL the same as [`Sql::transaction`], where such reads
    /// lock their rows instead ([`Sql::for_update`]).
    pub fn transaction_immediate(&self) -> Result<Tx<'c>, SqlError> {
        self.begin(true)
    }

    fn begin(&self, immediate: bool) -> Result<Tx<'c>, SqlError> {
        let savepoint = match self.inner {
            Inner::Sqlite(c) => {
                if c.is_autocommit() {
                    c.execute_batch(if immediate { "BEGIN IMMEDIATE" } else { "BEGIN DEFERRED" })?;
                    None
                } else {
                    Some(SAVEPOINTS.with(|n| n.replace(n.get() + 1)))
                }
            }
            Inner::Postgres(s) => {
                if s.depth.get() == 0 {
                    s.batch("BEGIN")?;
                    s.depth.set(1);
                    None
                } else {
                    let depth = s.depth.get();
                    s.depth.set(depth + 1);
                    Some(u64::from(depth))
                }
            }
        };
        if let Some(n) = savepoint {
            self.execute_batch(&format!("SAVEPOINT falaj_{n}"))?;
        }
        Ok(Tx { sql: *self, savepoint, done: false })
    }
}

thread_local! {
    /// Names for SQLite savepoints (unique on the thread; only their nesting matters).
    static SAVEPOINTS: Cell<u64> = const { Cell::new(0) };
}

/// A transaction or savepoint: [`Tx::commit`] it, or it rolls back when dropped.
pub struct Tx<'c> {
    sql: Sql<'c>,
    savepoint: Option<u64>,
    done: bool,
}

impl Tx<'_> {
    /// Commits (releases the savepoint).
    pub fn commit(mut self) -> Result<(), SqlError> {
        self.done = true;
        self.end(true)
    }

    /// Rolls back, reporting a failure to do so (dropping rolls back silently).
    pub fn rollback(mut self) -> Result<(), SqlError> {
        self.done = true;
        self.end(false)
    }

    fn end(&self, commit: bool) -> Result<(), SqlError> {
        let statement: Cow<'static, str> = match (self.savepoint, commit) {
            (None, true) => "COMMIT".into(),
            (None, false) => "ROLLBACK".into(),
            (Some(n), true) => format!("RELEASE falaj_{n}").into(),
            (Some(n), false) => format!("ROLLBACK TO falaj_{n}; RELEASE falaj_{n}").into(),
        };
        if let Inner::Postgres(s) = self.sql.inner {
            s.depth.set(s.depth.get().saturating_sub(1));
        }
        self.sql.execute_batch(&statement)
    }
}

impl<'c> std::ops::Deref for Tx<'c> {
    type Target = Sql<'c>;
    fn deref(&self) -> &Sql<'c> {
        &self.sql
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if !self.done
            && let Err(e) = self.end(false)
        {
            tracing::warn!(error = %e, "rolling back a transaction failed");
        }
    }
}

/// What ported code takes: a rusqlite connection or transaction (errors as
/// `rusqlite::Error`, for callers not yet ported) or a [`Sql`] (errors as [`SqlError`]).
pub trait AsSql {
    /// The error its callers expect.
    type Error: From<SqlError>;
    /// The facade over it.
    fn sql(&self) -> Sql<'_>;
}

impl AsSql for rusqlite::Connection {
    type Error = rusqlite::Error;
    fn sql(&self) -> Sql<'_> {
        Sql::sqlite(self)
    }
}

impl AsSql for rusqlite::Transaction<'_> {
    type Error = rusqlite::Error;
    fn sql(&self) -> Sql<'_> {
        Sql::sqlite(self)
    }
}

impl AsSql for rusqlite::Savepoint<'_> {
    type Error = rusqlite::Error;
    fn sql(&self) -> Sql<'_> {
        Sql::sqlite(self)
    }
}

impl AsSql for Sql<'_> {
    type Error = SqlError;
    fn sql(&self) -> Sql<'_> {
        *self
    }
}

impl AsSql for Tx<'_> {
    type Error = SqlError;
    fn sql(&self) -> Sql<'_> {
        self.sql
    }
}

/// `$1`..`$n` as SQLite's `?1`..`?n`; quoted text, quoted names and comments are left as
/// they are.
pub fn to_sqlite(sql: &str) -> Cow<'_, str> {
    if !sql.contains('$') {
        return Cow::Borrowed(sql);
    }
    let bytes = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let (mut i, mut quote, mut comment) = (0, None::<u8>, false);
    while i < bytes.len() {
        let c = bytes[i];
        match (quote, comment) {
            (Some(q), _) if c == q => quote = None,
            (None, true) if c == b'\n' => comment = false,
            // Inside quotes or a comment.
            (Some(_), _) | (None, true) => {}
            (None, false) => match c {
                b'\'' | b'"' => quote = Some(c),
                b'-' if bytes.get(i + 1) == Some(&b'-') => comment = true,
                b'$' if bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => {
                    out.push('?');
                    i += 1;
                    continue;
                }
                _ => {}
            },
        }
        // Whole characters: only ASCII bytes are looked at above.
        let len = sql[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&sql[i..i + len]);
        i += len;
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_sqlites_outside_quotes_and_comments() {
        let check = |from: &str, to: &str| assert_eq!(to_sqlite(from), to, "{from}");
        check("SELECT 1", "SELECT 1");
        check(
            "SELECT a FROM t WHERE b = $1 AND c = $12",
            "SELECT a FROM t WHERE b = ?1 AND c = ?12",
        );
        check("SELECT '$1', \"$2\", $3 -- $4\n, $5", "SELECT '$1', \"$2\", ?3 -- $4\n, ?5");
        check("SELECT 'é$1', $2, 'it''s $3'", "SELECT 'é$1', ?2, 'it''s $3'");
        check("SELECT $ || $a", "SELECT $ || $a");
    }

    #[test]
    fn a_facade_error_reaches_unported_callers_as_the_rusqlite_error() {
        let e: rusqlite::Error = SqlError::NoRows.into();
        assert!(matches!(e, rusqlite::Error::QueryReturnedNoRows));
        let e: rusqlite::Error = SqlError::NotPorted("alerts").into();
        assert!(e.to_string().contains("alerts is not yet ported"), "{e}");
    }
}
