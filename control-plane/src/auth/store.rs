//! Users, sessions, API tokens and failed logins in SQLite (migration 6 of
//! [`crate::db`]). Secrets are kept only as SHA-256 (tokens) or Argon2id (passwords);
//! every change appends its audit entry in the same transaction, by the actor the caller
//! runs as ([`crate::audit::acting`]).

use std::time::Duration;

use falaj_common::audit::Outcome;
use falaj_common::keys::Sha256;
use falaj_common::time::Timestamp;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde_json::json;
use thiserror::Error;

use super::rules::{self, LoginPolicy, Role, SessionPolicy};
use super::{Principal, Via};
use crate::audit;
use crate::db::{from_ts, ts};

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

fn role(text: &str) -> rusqlite::Result<Role> {
    text.parse().map_err(|e: rules::UnknownRole| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
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

/// Every user, by name.
pub fn users(conn: &Connection) -> rusqlite::Result<Vec<UserRow>> {
    let mut stmt = conn.prepare(
        "SELECT u.name, u.role, u.created_at, u.disabled_at,
                (SELECT COUNT(*) FROM sessions s WHERE s.user = u.name AND s.revoked_at IS NULL)
         FROM users u ORDER BY u.name",
    )?;
    stmt.query_map([], |r| {
        Ok(UserRow {
            name: r.get(0)?,
            role: role(&r.get::<_, String>(1)?)?,
            created_at: from_ts(r.get(2)?),
            disabled_at: r.get::<_, Option<i64>>(3)?.map(from_ts),
            sessions: r.get::<_, i64>(4)? as u64,
        })
    })?
    .collect()
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

fn stored(conn: &Connection, name: &str) -> rusqlite::Result<Option<Stored>> {
    conn.query_row("SELECT role, password, disabled_at FROM users WHERE name = ?1", [name], |r| {
        Ok(Stored {
            role: role(&r.get::<_, String>(0)?)?,
            password: r.get(1)?,
            disabled: r.get::<_, Option<i64>>(2)?.is_some(),
        })
    })
    .optional()
}

fn record(
    conn: &Connection,
    now: Timestamp,
    action: &str,
    target: &str,
    outcome: Outcome,
    details: serde_json::Value,
) -> rusqlite::Result<()> {
    audit::record(conn, now, action, target, outcome, details).map(drop)
}

fn user_target(name: &str) -> String {
    format!("user:{name}")
}

/// Adds a user with the hash `password` (a PHC string).
pub fn add_user(
    conn: &mut Connection,
    name: &str,
    role: Role,
    password: &str,
    now: Timestamp,
) -> rusqlite::Result<Result<(), Refusal>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if stored(&tx, name)?.is_some() {
        return Ok(Err(Refusal::UserExists(name.to_owned())));
    }
    tx.execute(
        "INSERT INTO users (name, role, password, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?4)",
        params![name, role.name(), password, ts(now)],
    )?;
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
fn end_sessions(conn: &Connection, name: &str, now: Timestamp) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE sessions SET revoked_at = ?1 WHERE user = ?2 AND revoked_at IS NULL",
        params![ts(now), name],
    )
}

/// Changes a user's role (its sessions carry the new one from their next request); the
/// role it had.
pub fn set_role(
    conn: &mut Connection,
    name: &str,
    role: Role,
    now: Timestamp,
) -> rusqlite::Result<Result<Role, Refusal>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(before) = stored(&tx, name)? else {
        return Ok(Err(Refusal::NoUser(name.to_owned())));
    };
    tx.execute(
        "UPDATE users SET role = ?1, updated_at = ?2 WHERE name = ?3",
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
pub fn set_disabled(
    conn: &mut Connection,
    name: &str,
    disabled: bool,
    now: Timestamp,
) -> rusqlite::Result<Result<(), Refusal>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if stored(&tx, name)?.is_none() {
        return Ok(Err(Refusal::NoUser(name.to_owned())));
    }
    let (action, details) = if disabled {
        tx.execute(
            "UPDATE users SET disabled_at = COALESCE(disabled_at, ?1), updated_at = ?1 WHERE name = ?2",
            params![ts(now), name],
        )?;
        ("user.disable", json!({"sessions_ended": end_sessions(&tx, name, now)?}))
    } else {
        tx.execute(
            "UPDATE users SET disabled_at = NULL, updated_at = ?1 WHERE name = ?2",
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
pub fn remove_user(
    conn: &mut Connection,
    name: &str,
    now: Timestamp,
) -> rusqlite::Result<Result<(), Refusal>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if stored(&tx, name)?.is_none() {
        return Ok(Err(Refusal::NoUser(name.to_owned())));
    }
    let tokens = tx.execute(
        "UPDATE api_tokens SET revoked_at = ?1 WHERE created_by = ?2 AND revoked_at IS NULL",
        params![ts(now), user_target(name)],
    )?;
    let sessions = tx.execute("DELETE FROM sessions WHERE user = ?1", [name])?;
    tx.execute("DELETE FROM users WHERE name = ?1", [name])?;
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
pub fn set_password(
    conn: &mut Connection,
    name: &str,
    password: &str,
    now: Timestamp,
) -> rusqlite::Result<Result<(), Refusal>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if stored(&tx, name)?.is_none() {
        return Ok(Err(Refusal::NoUser(name.to_owned())));
    }
    tx.execute(
        "UPDATE users SET password = ?1, updated_at = ?2 WHERE name = ?3",
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
    conn: &Connection,
    column: &str,
    value: &str,
    since: Timestamp,
) -> rusqlite::Result<Vec<Timestamp>> {
    let mut stmt =
        conn.prepare(&format!("SELECT at FROM login_failures WHERE {column} = ?1 AND at >= ?2"))?;
    stmt.query_map(params![value, ts(since)], |r| Ok(from_ts(r.get(0)?)))?.collect()
}

/// The lock on `user` or on `address` at `now`, if either is locked.
pub fn lock(
    conn: &Connection,
    user: &str,
    address: Option<&str>,
    policy: &LoginPolicy,
    now: Timestamp,
) -> rusqlite::Result<Option<Lock>> {
    let since = Timestamp::from_unix(now.unix().saturating_sub(policy.horizon().as_secs()));
    // A user's failures count from its last successful login on; an address's all do.
    let last_login: Option<i64> =
        conn.query_row("SELECT MAX(created_at) FROM sessions WHERE user = ?1", [user], |r| {
            r.get(0)
        })?;
    let user_since = last_login.map_or(since, |t| since.max(from_ts(t)));
    let by_user = failures_of(conn, "user", user, user_since)?;
    if let Some(until) =
        rules::locked_until(&by_user, policy.failures, policy.window, policy.lockout, now)
    {
        return Ok(Some(Lock { scope: "user", until }));
    }
    let Some(address) = address else { return Ok(None) };
    let by_address = failures_of(conn, "address", address, since)?;
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
pub fn attempt(
    conn: &Connection,
    user: &str,
    address: Option<&str>,
    policy: &LoginPolicy,
    now: Timestamp,
) -> rusqlite::Result<Attempt> {
    Ok(Attempt { user: stored(conn, user)?, lock: lock(conn, user, address, policy, now)? })
}

/// Records a failed login (`counts`: whether it counts towards a lockout; a refusal
/// while locked does not, or a lock would never end) and, when it starts a lockout,
/// the lockout; the lock in force after it.
pub fn login_failed(
    conn: &mut Connection,
    user: &str,
    address: Option<&str>,
    reason: &str,
    counts: bool,
    policy: &LoginPolicy,
    now: Timestamp,
) -> rusqlite::Result<Option<Lock>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let before = lock(&tx, user, address, policy, now)?;
    if counts {
        tx.execute(
            "INSERT INTO login_failures (at, user, address) VALUES (?1, ?2, ?3)",
            params![ts(now), user, address],
        )?;
        let forgotten = now.unix().saturating_sub(policy.horizon().as_secs());
        tx.execute("DELETE FROM login_failures WHERE at < ?1", [forgotten as i64])?;
    }
    record(
        &tx,
        now,
        "auth.login",
        &user_target(user),
        Outcome::Failure,
        json!({"reason": reason}),
    )?;
    let after = lock(&tx, user, address, policy, now)?;
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

/// Opens a session for `user` after a correct password, unless a lock started
/// meanwhile. The user's earlier failures no longer count towards its lockout (they
/// still count for the address).
pub fn login_succeeded(
    conn: &mut Connection,
    user: &str,
    address: Option<&str>,
    policy: &LoginPolicy,
    now: Timestamp,
) -> rusqlite::Result<Result<NewSession, Lock>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(lock) = lock(&tx, user, address, policy, now)? {
        return Ok(Err(lock));
    }
    let (token, sha) = new_secret(SESSION_PREFIX);
    let id = crate::secrets::random_hex::<8>();
    tx.execute(
        "INSERT INTO sessions (id, token_sha256, user, source, created_at, last_used) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
        params![id, sha.to_string(), user, address, ts(now)],
    )?;
    record(&tx, now, "auth.login", &user_target(user), Outcome::Success, json!({"session": id}))?;
    tx.commit()?;
    Ok(Ok(NewSession { token, id }))
}

/// Ends session `id` (logout); false if it was not live.
pub fn end_session(conn: &mut Connection, id: &str, now: Timestamp) -> rusqlite::Result<bool> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let user: Option<String> = tx
        .query_row("SELECT user FROM sessions WHERE id = ?1 AND revoked_at IS NULL", [id], |r| {
            r.get(0)
        })
        .optional()?;
    let Some(user) = user else { return Ok(false) };
    tx.execute("UPDATE sessions SET revoked_at = ?1 WHERE id = ?2", params![ts(now), id])?;
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
pub fn resolve(
    conn: &Connection,
    presented: &str,
    sessions: &SessionPolicy,
    now: Timestamp,
) -> rusqlite::Result<Resolved> {
    let sha = Sha256::of(presented.as_bytes()).to_string();
    if presented.starts_with(SESSION_PREFIX) {
        resolve_session(conn, &sha, sessions, now)
    } else if presented.starts_with(TOKEN_PREFIX) {
        resolve_token(conn, &sha, now)
    } else {
        Ok(Resolved::Unknown)
    }
}

fn touch(conn: &Connection, table: &str, key: &str, last: Option<Timestamp>, now: Timestamp) {
    if last.is_none_or(|l| now.unix() >= l.unix() + TOUCH_EVERY) {
        // Best effort: a failed write of the last use must not refuse the request.
        let sql = format!("UPDATE {table} SET last_used = ?1 WHERE token_sha256 = ?2");
        if let Err(err) = conn.execute(&sql, params![ts(now), key]) {
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
    conn: &Connection,
    sha: &str,
    policy: &SessionPolicy,
    now: Timestamp,
) -> rusqlite::Result<Resolved> {
    let row = conn
        .query_row(
            "SELECT s.id, s.user, s.created_at, s.last_used, s.revoked_at, u.role, u.disabled_at
             FROM sessions s JOIN users u ON u.name = s.user WHERE s.token_sha256 = ?1",
            [sha],
            |r| {
                Ok(SessionLookup {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    created: from_ts(r.get(2)?),
                    last_used: from_ts(r.get(3)?),
                    revoked: r.get::<_, Option<i64>>(4)?.map(from_ts),
                    role: role(&r.get::<_, String>(5)?)?,
                    disabled: r.get::<_, Option<i64>>(6)?.is_some(),
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

fn resolve_token(conn: &Connection, sha: &str, now: Timestamp) -> rusqlite::Result<Resolved> {
    let row = conn
        .query_row(
            "SELECT name, role, created_by, expires_at, last_used, revoked_at FROM api_tokens
             WHERE token_sha256 = ?1",
            [sha],
            |r| {
                Ok(TokenLookup {
                    name: r.get(0)?,
                    role: role(&r.get::<_, String>(1)?)?,
                    creator: r.get(2)?,
                    expires: from_ts(r.get(3)?),
                    last_used: r.get::<_, Option<i64>>(4)?.map(from_ts),
                    revoked: r.get::<_, Option<i64>>(5)?.map(from_ts),
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
        match stored(conn, user)? {
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

/// Every API token, by name.
pub fn api_tokens(conn: &Connection) -> rusqlite::Result<Vec<ApiTokenRow>> {
    let mut stmt = conn.prepare(
        "SELECT name, role, created_by, created_at, expires_at, last_used, revoked_at
         FROM api_tokens ORDER BY name",
    )?;
    stmt.query_map([], |r| {
        Ok(ApiTokenRow {
            name: r.get(0)?,
            role: role(&r.get::<_, String>(1)?)?,
            created_by: r.get(2)?,
            created_at: from_ts(r.get(3)?),
            expires_at: from_ts(r.get(4)?),
            last_used: r.get::<_, Option<i64>>(5)?.map(from_ts),
            revoked_at: r.get::<_, Option<i64>>(6)?.map(from_ts),
        })
    })?
    .collect()
}

/// Stores a new API token (its secret's hash) created by `creator` (an actor name);
/// the name of a revoked or expired token may be taken again.
pub fn create_api_token(
    conn: &mut Connection,
    name: &str,
    role: Role,
    creator: &str,
    secret: Sha256,
    ttl: Duration,
    now: Timestamp,
) -> rusqlite::Result<Result<Timestamp, Refusal>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let live: Option<i64> = tx
        .query_row(
            "SELECT expires_at FROM api_tokens WHERE name = ?1 AND revoked_at IS NULL AND expires_at > ?2",
            params![name, ts(now)],
            |r| r.get(0),
        )
        .optional()?;
    if live.is_some() {
        return Ok(Err(Refusal::TokenExists(name.to_owned())));
    }
    tx.execute("DELETE FROM api_tokens WHERE name = ?1", [name])?;
    let expires = now.saturating_add(ttl);
    tx.execute(
        "INSERT INTO api_tokens (name, token_sha256, role, created_by, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![name, secret.to_string(), role.name(), creator, ts(now), ts(expires)],
    )?;
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
pub fn revoke_api_token(
    conn: &mut Connection,
    name: &str,
    by: &Principal,
    now: Timestamp,
) -> rusqlite::Result<Result<(), Refusal>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let creator: Option<String> = tx
        .query_row(
            "SELECT created_by FROM api_tokens WHERE name = ?1 AND revoked_at IS NULL",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    let Some(creator) = creator else { return Ok(Err(Refusal::NoToken(name.to_owned()))) };
    if by.role != Role::Admin && creator != by.actor {
        return Ok(Err(Refusal::NotYours { name: name.to_owned(), creator }));
    }
    tx.execute("UPDATE api_tokens SET revoked_at = ?1 WHERE name = ?2", params![ts(now), name])?;
    record(&tx, now, "apitoken.revoke", &format!("token:{name}"), Outcome::Success, json!({}))?;
    tx.commit()?;
    Ok(Ok(()))
}
