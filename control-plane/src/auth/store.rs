//! Users, sessions, API tokens and failed logins, on SQLite (migration 6 of
//! [`crate::db`]) or PostgreSQL through [`crate::sql`]. Secrets are kept only as SHA-256
//! (tokens) or Argon2id (passwords); every change appends its audit entry in the same
//! transaction, by the actor the caller runs as ([`crate::audit::acting`]).
//!
//! On PostgreSQL, where connections write at once, a change that reads before it writes
//! locks the row it read (`FOR UPDATE`: a user, a session, a token), a name taken twice at
//! once is settled by the primary key (`ON CONFLICT`), and failed and successful logins
//! take an advisory lock per user and per address, so that failures counted at once
//! start exactly one lockout, as SQLite's single writer makes them.

use std::time::Duration;

use falaj_common::audit::Outcome;
use falaj_common::keys::Sha256;
use falaj_common::time::Timestamp;
use serde_json::json;
use thiserror::Error;

use super::rules::{self, LoginPolicy, Role, SessionPolicy};
use super::{Principal, Via};
use crate::audit;
use crate::db::{from_ts, ts};
use crate::sql::{AsSql, Backend, OptionalExt, Row, Sql, SqlError, locks, params};

/// What a session token starts with.
pub const SESSION_PREFIX: &str = "falaj_s_";
/// What an API token starts with.
pub const TOKEN_PREFIX: &str = "falaj_t_";

/// A session or API token's secret is used at most this often before its `last_used`
/// is written again (a write per request would cost a disk sync each).
const TOUCH_EVERY: u64 = 60;

/// A change refused for what it names.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    /// No such user.
    #[error("no user {0:?}")]
    NoUser(String),
    /// The user exists already.
    #[error("user {0:?} already exists")]
    UserExists(String),
    /// No such API token (or it was revoked).
    #[error("no live API token {0:?}")]
    NoToken(String),
    /// A live API token has that name.
    #[error("an API token {0:?} is live; revoke it first or choose another name")]
    TokenExists(String),
    /// Someone other than its creator (or an admin) tried to revoke a token.
    #[error("API token {name:?} was created by {creator}; only it or an admin may revoke it")]
    NotYours {
        name: String,
        /// Who created it.
        creator: String,
    },
}

/// A new random secret with `prefix` (a session or API token) and its SHA-256.
pub fn new_secret(prefix: &str) -> (String, Sha256) {
    let secret = format!("{prefix}{}", crate::secrets::random_hex::<32>());
    let sha = Sha256::of(secret.as_bytes());
    (secret, sha)
}

/// Column `idx` of `r`, a role's name.
fn role(r: &Row<'_>, idx: usize) -> Result<Role, SqlError> {
    let text: String = r.get(idx)?;
    text.parse().map_err(|e: rules::UnknownRole| SqlError::Conversion {
        column: idx,
        message: e.to_string(),
    })
}

// ---- users ----

/// A user as listed (never the hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub name: String,
    pub role: Role,
    /// When added.
    pub created_at: Timestamp,
    /// When disabled, if it is.
    pub disabled_at: Option<Timestamp>,
    /// Live sessions (not ended; some may have expired since).
    pub sessions: u64,
}

/// Every user, by name (ordered by its bytes here, not by the database's collation).
pub fn users<C: AsSql + ?Sized>(conn: &C) -> Result<Vec<UserRow>, C::Error> {
    let mut users = conn.sql().query_map(
        r#"SELECT u.name, u.role, u.created_at, u.disabled_at,
                (SELECT COUNT(*) FROM sessions s WHERE s."user" = u.name AND s.revoked_at IS NULL)
         FROM users u"#,
        params![],
        |r| {
            Ok(UserRow {
                name: r.get(0)?,
                role: role(r, 1)?,
                created_at: from_ts(r.get(2)?),
                disabled_at: r.get::<Option<i64>>(3)?.map(from_ts),
                sessions: r.get::<i64>(4)?.max(0) as u64,
            })
        },
    )?;
    users.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(users)
}

/// What a login needs of a user: role, stored hash, whether disabled.
#[derive(Debug, Clone)]
pub struct Stored {
    pub role: Role,
    /// The PHC string.
    pub password: String,
    /// Whether the user is disabled.
    pub disabled: bool,
}

/// User `name`; with `lock`, its row stays locked until the transaction ends
/// (PostgreSQL), for a change decided by what was read.
fn stored(sql: &Sql<'_>, name: &str, lock: bool) -> Result<Option<Stored>, SqlError> {
    let for_update = if lock { sql.for_update() } else { "" };
    sql.query_row(
        &format!("SELECT role, password, disabled_at FROM users WHERE name = $1{for_update}"),
        params![name],
        |r| {
            Ok(Stored {
                role: role(r, 0)?,
                password: r.get(1)?,
                disabled: r.get::<Option<i64>>(2)?.is_some(),
            })
        },
    )
    .optional()
}

fn record(
    sql: &Sql<'_>,
    now: Timestamp,
    action: &str,
    target: &str,
    outcome: Outcome,
    details: serde_json::Value,
) -> Result<(), SqlError> {
    audit::record(sql, now, action, target, outcome, details).map(drop)
}

fn user_target(name: &str) -> String {
    format!("user:{name}")
}

/// Adds a user with the hash `password` (a PHC string). Of two adds of one name at once,
/// the primary key lets one through and the other is refused.
pub fn add_user<C: AsSql + ?Sized>(
    conn: &C,
    name: &str,
    role: Role,
    password: &str,
    now: Timestamp,
) -> Result<Result<(), Refusal>, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction_immediate()?;
    let added = tx.execute(
        "INSERT INTO users (name, role, password, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)
         ON CONFLICT (name) DO NOTHING",
        params![name, role.name(), password, ts(now)],
    )?;
    if added == 0 {
        return Ok(Err(Refusal::UserExists(name.to_owned())));
    }
    record(
        &tx,
        now,
        "user.add",
        &user_target(name),
        Outcome::Success,
        json!({"role": role.name()}),
    )?;
    tx.commit()?;
    Ok(Ok(()))
}

/// Ends every live session of `name`; how many.
fn end_sessions(sql: &Sql<'_>, name: &str, now: Timestamp) -> Result<usize, SqlError> {
    sql.execute(
        r#"UPDATE sessions SET revoked_at = $1 WHERE "user" = $2 AND revoked_at IS NULL"#,
        params![ts(now), name],
    )
}

/// Changes a user's role (its sessions carry the new one from their next request); the
/// role it had.
pub fn set_role<C: AsSql + ?Sized>(
    conn: &C,
    name: &str,
    role: Role,
    now: Timestamp,
) -> Result<Result<Role, Refusal>, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction_immediate()?;
    let Some(before) = stored(&tx, name, true)? else {
        return Ok(Err(Refusal::NoUser(name.to_owned())));
    };
    tx.execute(
        "UPDATE users SET role = $1, updated_at = $2 WHERE name = $3",
        params![role.name(), ts(now), name],
    )?;
    record(
        &tx,
        now,
        "user.set_role",
        &user_target(name),
        Outcome::Success,
        json!({"from": before.role.name(), "to": role.name()}),
    )?;
    tx.commit()?;
    Ok(Ok(before.role))
}

/// Disables (ending its sessions) or enables a user.
pub fn set_disabled<C: AsSql + ?Sized>(
    conn: &C,
    name: &str,
    disabled: bool,
    now: Timestamp,
) -> Result<Result<(), Refusal>, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction_immediate()?;
    if stored(&tx, name, true)?.is_none() {
        return Ok(Err(Refusal::NoUser(name.to_owned())));
    }
    let (action, details) = if disabled {
        tx.execute(
            "UPDATE users SET disabled_at = COALESCE(disabled_at, $1), updated_at = $1 WHERE name = $2",
            params![ts(now), name],
        )?;
        ("user.disable", json!({"sessions_ended": end_sessions(&tx, name, now)?}))
    } else {
        tx.execute(
            "UPDATE users SET disabled_at = NULL, updated_at = $1 WHERE name = $2",
            params![ts(now), name],
        )?;
        ("user.enable", json!({}))
    };
    record(&tx, now, action, &user_target(name), Outcome::Success, details)?;
    tx.commit()?;
    Ok(Ok(()))
}

/// Removes a user, its sessions, and the API tokens it created (revoked, so a later
/// user of the same name does not inherit them).
pub fn remove_user<C: AsSql + ?Sized>(
    conn: &C,
    name: &str,
    now: Timestamp,
) -> Result<Result<(), Refusal>, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction_immediate()?;
    if stored(&tx, name, true)?.is_none() {
        return Ok(Err(Refusal::NoUser(name.to_owned())));
    }
    let tokens = tx.execute(
        "UPDATE api_tokens SET revoked_at = $1 WHERE created_by = $2 AND revoked_at IS NULL",
        params![ts(now), user_target(name)],
    )?;
    let sessions = tx.execute(r#"DELETE FROM sessions WHERE "user" = $1"#, params![name])?;
    tx.execute("DELETE FROM users WHERE name = $1", params![name])?;
    record(
        &tx,
        now,
        "user.remove",
        &user_target(name),
        Outcome::Success,
        json!({"sessions_ended": sessions, "api_tokens_revoked": tokens}),
    )?;
    tx.commit()?;
    Ok(Ok(()))
}

/// Sets a new password hash and ends the user's sessions.
pub fn set_password<C: AsSql + ?Sized>(
    conn: &C,
    name: &str,
    password: &str,
    now: Timestamp,
) -> Result<Result<(), Refusal>, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction_immediate()?;
    if stored(&tx, name, true)?.is_none() {
        return Ok(Err(Refusal::NoUser(name.to_owned())));
    }
    tx.execute(
        "UPDATE users SET password = $1, updated_at = $2 WHERE name = $3",
        params![password, ts(now), name],
    )?;
    let ended = end_sessions(&tx, name, now)?;
    record(
        &tx,
        now,
        "user.reset_password",
        &user_target(name),
        Outcome::Success,
        json!({"sessions_ended": ended}),
    )?;
    tx.commit()?;
    Ok(Ok(()))
}

// ---- logins ----

/// A lockout in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lock {
    /// `user` or `address`.
    pub scope: &'static str,
    /// Until when.
    pub until: Timestamp,
}

fn failures_of(
    sql: &Sql<'_>,
    column: &str,
    value: &str,
    since: Timestamp,
) -> Result<Vec<Timestamp>, SqlError> {
    sql.query_map(
        &format!(r#"SELECT at FROM login_failures WHERE "{column}" = $1 AND at >= $2"#),
        params![value, ts(since)],
        |r| Ok(from_ts(r.get(0)?)),
    )
}

/// Takes the logins' locks of `user` and `address` until the transaction ends, on
/// PostgreSQL (the user's first, always, so that two takers never wait on each other);
/// nothing on SQLite, whose writer is one connection.
fn lock_logins(sql: &Sql<'_>, user: &str, address: Option<&str>) -> Result<(), SqlError> {
    if sql.backend() != Backend::Postgres {
        return Ok(());
    }
    sql.execute("SELECT pg_advisory_xact_lock($1)", params![locks::logins("user", user)])?;
    if let Some(address) = address {
        sql.execute(
            "SELECT pg_advisory_xact_lock($1)",
            params![locks::logins("address", address)],
        )?;
    }
    Ok(())
}

/// The lock on `user` or on `address` at `now`, if either is locked.
pub fn lock<C: AsSql + ?Sized>(
    conn: &C,
    user: &str,
    address: Option<&str>,
    policy: &LoginPolicy,
    now: Timestamp,
) -> Result<Option<Lock>, C::Error> {
    Ok(lock_at(&conn.sql(), user, address, policy, now)?)
}

fn lock_at(
    sql: &Sql<'_>,
    user: &str,
    address: Option<&str>,
    policy: &LoginPolicy,
    now: Timestamp,
) -> Result<Option<Lock>, SqlError> {
    let since = Timestamp::from_unix(now.unix().saturating_sub(policy.horizon().as_secs()));
    // A user's failures count from its last successful login on; an address's all do.
    let last_login: Option<i64> = sql.query_row(
        r#"SELECT MAX(created_at) FROM sessions WHERE "user" = $1"#,
        params![user],
        |r| r.get(0),
    )?;
    let user_since = last_login.map_or(since, |t| since.max(from_ts(t)));
    let by_user = failures_of(sql, "user", user, user_since)?;
    if let Some(until) =
        rules::locked_until(&by_user, policy.failures, policy.window, policy.lockout, now)
    {
        return Ok(Some(Lock { scope: "user", until }));
    }
    let Some(address) = address else { return Ok(None) };
    let by_address = failures_of(sql, "address", address, since)?;
    Ok(rules::locked_until(
        &by_address,
        policy.address_failures,
        policy.window,
        policy.lockout,
        now,
    )
    .map(|until| Lock { scope: "address", until }))
}

/// What a login attempt finds before the password is checked.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The user, if it exists.
    pub user: Option<Stored>,
    /// A lock in force.
    pub lock: Option<Lock>,
}

/// Reads what a login of `user` from `address` needs.
pub fn attempt<C: AsSql + ?Sized>(
    conn: &C,
    user: &str,
    address: Option<&str>,
    policy: &LoginPolicy,
    now: Timestamp,
) -> Result<Attempt, C::Error> {
    let sql = conn.sql();
    Ok(Attempt {
        user: stored(&sql, user, false)?,
        lock: lock_at(&sql, user, address, policy, now)?,
    })
}

/// Records a failed login (`counts`: whether it counts towards a lockout; a refusal
/// while locked does not, or a lock would never end) and, when it starts a lockout,
/// the lockout; the lock in force after it. Failures of one user or from one address
/// at once are counted one after the other, so exactly one of them starts a lockout.
pub fn login_failed<C: AsSql + ?Sized>(
    conn: &C,
    user: &str,
    address: Option<&str>,
    reason: &str,
    counts: bool,
    policy: &LoginPolicy,
    now: Timestamp,
) -> Result<Option<Lock>, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction_immediate()?;
    lock_logins(&tx, user, address)?;
    let before = lock_at(&tx, user, address, policy, now)?;
    if counts {
        tx.execute(
            r#"INSERT INTO login_failures (at, "user", address) VALUES ($1, $2, $3)"#,
            params![ts(now), user, address],
        )?;
        let forgotten = now.unix().saturating_sub(policy.horizon().as_secs());
        tx.execute("DELETE FROM login_failures WHERE at < $1", params![forgotten as i64])?;
    }
    record(
        &tx,
        now,
        "auth.login",
        &user_target(user),
        Outcome::Failure,
        json!({"reason": reason}),
    )?;
    let after = lock_at(&tx, user, address, policy, now)?;
    if let (None, Some(lock)) = (before, after) {
        let target = match lock.scope {
            "address" => format!("address:{}", address.unwrap_or_default()),
            _ => user_target(user),
        };
        record(
            &tx,
            now,
            "auth.lockout",
            &target,
            Outcome::Refused,
            json!({"until": lock.until, "window_seconds": policy.window.as_secs()}),
        )?;
    }
    tx.commit()?;
    Ok(after)
}

/// A session just opened: its secret (shown once) and public id.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// The bearer token.
    pub token: String,
    /// Its id (in audit entries).
    pub id: String,
}

/// Why a session was not opened after a correct password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotOpened {
    /// A lock started meanwhile.
    Locked(Lock),
    /// The user was removed or disabled, or its password changed, since the password
    /// was checked.
    Changed,
}

/// Opens a session for `user`, whose password was checked against the hash `checked`,
/// unless a lock started meanwhile or the user changed (removed, disabled, another
/// password): its row is locked, so that a removal or a disabling at once either comes
/// first and refuses the login or comes after and ends the session. The user's earlier
/// failures no longer count towards its lockout (they still count for the address).
pub fn login_succeeded<C: AsSql + ?Sized>(
    conn: &C,
    user: &str,
    checked: &str,
    address: Option<&str>,
    policy: &LoginPolicy,
    now: Timestamp,
) -> Result<Result<NewSession, NotOpened>, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction_immediate()?;
    lock_logins(&tx, user, address)?;
    if let Some(lock) = lock_at(&tx, user, address, policy, now)? {
        return Ok(Err(NotOpened::Locked(lock)));
    }
    match stored(&tx, user, true)? {
        Some(s) if !s.disabled && s.password == checked => {}
        _ => return Ok(Err(NotOpened::Changed)),
    }
    let (token, sha) = new_secret(SESSION_PREFIX);
    let id = crate::secrets::random_hex::<8>();
    tx.execute(
        r#"INSERT INTO sessions (id, token_sha256, "user", source, created_at, last_used) VALUES ($1, $2, $3, $4, $5, $5)"#,
        params![id, sha.to_string(), user, address, ts(now)],
    )?;
    record(&tx, now, "auth.login", &user_target(user), Outcome::Success, json!({"session": id}))?;
    tx.commit()?;
    Ok(Ok(NewSession { token, id }))
}

/// Ends session `id` (logout); false if it was not live (or another logout ended it
/// first).
pub fn end_session<C: AsSql + ?Sized>(
    conn: &C,
    id: &str,
    now: Timestamp,
) -> Result<bool, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction_immediate()?;
    let user: Option<String> = tx
        .query_row(
            &format!(
                r#"SELECT "user" FROM sessions WHERE id = $1 AND revoked_at IS NULL{}"#,
                tx.for_update()
            ),
            params![id],
            |r| r.get(0),
        )
        .optional()?;
    let Some(user) = user else { return Ok(false) };
    tx.execute("UPDATE sessions SET revoked_at = $1 WHERE id = $2", params![ts(now), id])?;
    record(&tx, now, "auth.logout", &user_target(&user), Outcome::Success, json!({"session": id}))?;
    tx.commit()?;
    Ok(true)
}

// ---- credentials ----

/// What a presented bearer token turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// A live credential.
    Valid(Principal),
    /// A credential that exists but is no longer good.
    Refused {
        /// Whose it is (`user:alice`, `token:ci`).
        actor: String,
        /// Why, for the caller and the audit log.
        reason: String,
    },
    /// Nothing known.
    Unknown,
}

/// Resolves a bearer token presented at `now` (sessions and API tokens; the admin token
/// is checked before, without the database).
pub fn resolve<C: AsSql + ?Sized>(
    conn: &C,
    presented: &str,
    sessions: &SessionPolicy,
    now: Timestamp,
) -> Result<Resolved, C::Error> {
    let sql = conn.sql();
    let sha = Sha256::of(presented.as_bytes()).to_string();
    if presented.starts_with(SESSION_PREFIX) {
        Ok(resolve_session(&sql, &sha, sessions, now)?)
    } else if presented.starts_with(TOKEN_PREFIX) {
        Ok(resolve_token(&sql, &sha, now)?)
    } else {
        Ok(Resolved::Unknown)
    }
}

/// Records a credential's use at `now` when its last one is older than [`TOUCH_EVERY`].
/// Never backwards: of two requests that touch it at once, the later time stays.
fn touch(sql: &Sql<'_>, table: &str, key: &str, last: Option<Timestamp>, now: Timestamp) {
    if last.is_none_or(|l| now.unix() >= l.unix() + TOUCH_EVERY) {
        // Best effort: a failed write of the last use must not refuse the request. In a
        // savepoint, so that on PostgreSQL the failure does not abort the transaction.
        let statement = format!(
            "UPDATE {table} SET last_used = $1
             WHERE token_sha256 = $2 AND (last_used IS NULL OR last_used < $1)"
        );
        let touched = sql.transaction().and_then(|tx| {
            tx.execute(&statement, params![ts(now), key])?;
            tx.commit()
        });
        if let Err(err) = touched {
            tracing::warn!(error = %err, table, "recording a credential's last use failed");
        }
    }
}

/// A session row with its user's role and status.
struct SessionLookup {
    id: String,
    user: String,
    created: Timestamp,
    last_used: Timestamp,
    revoked: Option<Timestamp>,
    role: Role,
    disabled: bool,
}

/// An API token's row.
struct TokenLookup {
    name: String,
    role: Role,
    creator: String,
    expires: Timestamp,
    last_used: Option<Timestamp>,
    revoked: Option<Timestamp>,
}

fn resolve_session(
    conn: &Sql<'_>,
    sha: &str,
    policy: &SessionPolicy,
    now: Timestamp,
) -> Result<Resolved, SqlError> {
    let row = conn
        .query_row(
            r#"SELECT s.id, s."user", s.created_at, s.last_used, s.revoked_at, u.role, u.disabled_at
             FROM sessions s JOIN users u ON u.name = s."user" WHERE s.token_sha256 = $1"#,
            params![sha],
            |r| {
                Ok(SessionLookup {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    created: from_ts(r.get(2)?),
                    last_used: from_ts(r.get(3)?),
                    revoked: r.get::<Option<i64>>(4)?.map(from_ts),
                    role: role(r, 5)?,
                    disabled: r.get::<Option<i64>>(6)?.is_some(),
                })
            },
        )
        .optional()?;
    let Some(SessionLookup { id, user, created, last_used, revoked, role, disabled }) = row else {
        return Ok(Resolved::Unknown);
    };
    let actor = user_target(&user);
    let refused = |reason: String| Ok(Resolved::Refused { actor: actor.clone(), reason });
    if disabled {
        return refused(format!("user {user} is disabled"));
    }
    if let Some(at) = revoked {
        return refused(format!(
            "the session was ended at {at} (logout, password reset or user disabled); log in again"
        ));
    }
    if let Err(expiry) = rules::session_live(policy, created, last_used, now) {
        return refused(expiry.to_string());
    }
    touch(conn, "sessions", sha, Some(last_used), now);
    Ok(Resolved::Valid(Principal { actor, role, via: Via::Session { id, user } }))
}

fn resolve_token(conn: &Sql<'_>, sha: &str, now: Timestamp) -> Result<Resolved, SqlError> {
    let row = conn
        .query_row(
            "SELECT name, role, created_by, expires_at, last_used, revoked_at FROM api_tokens
             WHERE token_sha256 = $1",
            params![sha],
            |r| {
                Ok(TokenLookup {
                    name: r.get(0)?,
                    role: role(r, 1)?,
                    creator: r.get(2)?,
                    expires: from_ts(r.get(3)?),
                    last_used: r.get::<Option<i64>>(4)?.map(from_ts),
                    revoked: r.get::<Option<i64>>(5)?.map(from_ts),
                })
            },
        )
        .optional()?;
    let Some(TokenLookup { name, role: token_role, creator, expires, last_used, revoked }) = row
    else {
        return Ok(Resolved::Unknown);
    };
    let actor = format!("token:{name}");
    let refused = |reason: String| Ok(Resolved::Refused { actor: actor.clone(), reason });
    if let Some(at) = revoked {
        return refused(format!("API token {name} was revoked at {at}"));
    }
    if let Err(expiry) = rules::token_live(expires, now) {
        return refused(expiry.to_string());
    }
    // Never more than its creator, then or now.
    if let Some(user) = creator.strip_prefix("user:") {
        match stored(conn, user, false)? {
            None => return refused(format!("API token {name}: its creator {user} was removed")),
            Some(s) if s.disabled => {
                return refused(format!("API token {name}: its creator {user} is disabled"));
            }
            Some(s) if !s.role.covers(token_role) => {
                return refused(format!(
                    "API token {name} has role {token_role}, above its creator {user}'s role {} now",
                    s.role
                ));
            }
            Some(_) => {}
        }
    }
    touch(conn, "api_tokens", sha, last_used, now);
    Ok(Resolved::Valid(Principal { actor, role: token_role, via: Via::ApiToken { name } }))
}

// ---- API tokens ----

/// An API token as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTokenRow {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Who created it (`user:alice`, `admin-token`).
    pub created_by: String,
    /// When.
    pub created_at: Timestamp,
    /// When it expires.
    pub expires_at: Timestamp,
    /// When it was last used (to the minute).
    pub last_used: Option<Timestamp>,
    /// When it was revoked.
    pub revoked_at: Option<Timestamp>,
}

/// Every API token, by name (ordered by its bytes here, not by the database's collation).
pub fn api_tokens<C: AsSql + ?Sized>(conn: &C) -> Result<Vec<ApiTokenRow>, C::Error> {
    let mut tokens = conn.sql().query_map(
        "SELECT name, role, created_by, created_at, expires_at, last_used, revoked_at
         FROM api_tokens",
        params![],
        |r| {
            Ok(ApiTokenRow {
                name: r.get(0)?,
                role: role(r, 1)?,
                created_by: r.get(2)?,
                created_at: from_ts(r.get(3)?),
                expires_at: from_ts(r.get(4)?),
                last_used: r.get::<Option<i64>>(5)?.map(from_ts),
                revoked_at: r.get::<Option<i64>>(6)?.map(from_ts),
            })
        },
    )?;
    tokens.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tokens)
}

/// Stores a new API token (its secret's hash) created by `creator` (an actor name);
/// the name of a revoked or expired token may be taken again (its row replaced). One
/// statement decides and writes, so that of two creations of one name at once one is
/// stored and the other refused. A user creating one has its row locked and must still
/// exist, so that its removal at once either comes first or revokes the new token.
pub fn create_api_token<C: AsSql + ?Sized>(
    conn: &C,
    name: &str,
    role: Role,
    creator: &str,
    secret: Sha256,
    ttl: Duration,
    now: Timestamp,
) -> Result<Result<Timestamp, Refusal>, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction_immediate()?;
    if let Some(user) = creator.strip_prefix("user:")
        && stored(&tx, user, true)?.is_none()
    {
        return Ok(Err(Refusal::NoUser(user.to_owned())));
    }
    let expires = now.saturating_add(ttl);
    let stored = tx.execute(
        "INSERT INTO api_tokens (name, token_sha256, role, created_by, created_at, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (name) DO UPDATE SET
             token_sha256 = excluded.token_sha256, role = excluded.role,
             created_by = excluded.created_by, created_at = excluded.created_at,
             expires_at = excluded.expires_at, last_used = NULL, revoked_at = NULL
         WHERE api_tokens.revoked_at IS NOT NULL OR api_tokens.expires_at <= $5",
        params![name, secret.to_string(), role.name(), creator, ts(now), ts(expires)],
    )?;
    if stored == 0 {
        return Ok(Err(Refusal::TokenExists(name.to_owned())));
    }
    record(
        &tx,
        now,
        "apitoken.create",
        &format!("token:{name}"),
        Outcome::Success,
        json!({"role": role.name(), "expires_at": expires}),
    )?;
    tx.commit()?;
    Ok(Ok(expires))
}

/// Revokes API token `name` for `by`: its creator, or an admin.
pub fn revoke_api_token<C: AsSql + ?Sized>(
    conn: &C,
    name: &str,
    by: &Principal,
    now: Timestamp,
) -> Result<Result<(), Refusal>, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction_immediate()?;
    let creator: Option<String> = tx
        .query_row(
            &format!(
                "SELECT created_by FROM api_tokens WHERE name = $1 AND revoked_at IS NULL{}",
                tx.for_update()
            ),
            params![name],
            |r| r.get(0),
        )
        .optional()?;
    let Some(creator) = creator else { return Ok(Err(Refusal::NoToken(name.to_owned()))) };
    if by.role != Role::Admin && creator != by.actor {
        return Ok(Err(Refusal::NotYours { name: name.to_owned(), creator }));
    }
    tx.execute("UPDATE api_tokens SET revoked_at = $1 WHERE name = $2", params![ts(now), name])?;
    record(&tx, now, "apitoken.revoke", &format!("token:{name}"), Outcome::Success, json!({}))?;
    tx.commit()?;
    Ok(Ok(()))
}
