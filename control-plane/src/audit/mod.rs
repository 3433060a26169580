//! The control plane's audit log: every state change and security event appended to a
//! hash chain ([`falaj_common::audit`]) in the same SQLite transaction as the change it
//! records, with the actor that caused it, and signed checkpoints of the chain's head.
//!
//! Who acts is carried implicitly: the admin API's authentication runs each request
//! inside [`acting`], [`crate::db::Db::call`] carries that actor onto the blocking thread
//! that runs the transaction, and [`record`] (called by [`crate::db::event`]) reads it.
//! Work that no request caused (agents' sessions, periodic judgements) is `system` unless
//! it says otherwise.

use std::cell::RefCell;
use std::future::Future;

use falaj_common::audit::{Chain, GENESIS, Outcome};
use falaj_common::time::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};

use crate::db::{sha, ts};

/// Who caused an action, and from where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    /// `user:NAME`, `token:NAME`, `admin-token`, `agent:ID` or `system`.
    pub name: String,
    /// The peer's address, when the action came over the network.
    pub source: Option<String>,
}

impl Actor {
    /// The control plane itself.
    pub fn system() -> Self {
        Self { name: "system".into(), source: None }
    }

    /// A named actor (`user:alice`) at `source`.
    pub fn new(name: impl Into<String>, source: Option<String>) -> Self {
        Self { name: name.into(), source }
    }
}

tokio::task_local! {
    static ACTOR: Actor;
}

thread_local! {
    static ON_THREAD: RefCell<Option<Actor>> = const { RefCell::new(None) };
}

/// Runs `f` with `actor` as the one acting (for every event its transactions record).
pub async fn acting<F: Future>(actor: Actor, f: F) -> F::Output {
    ACTOR.scope(actor, f).await
}

/// The actor of the task running now, if one was set with [`acting`].
pub(crate) fn task_actor() -> Option<Actor> {
    ACTOR.try_with(Clone::clone).ok()
}

/// Runs `f` on this thread with `actor` acting (how [`crate::db::Db::call`] carries a
/// request's actor onto the blocking pool).
pub(crate) fn on_thread<R>(actor: Option<Actor>, f: impl FnOnce() -> R) -> R {
    let previous = ON_THREAD.with(|a| a.replace(actor));
    let out = f();
    ON_THREAD.with(|a| *a.borrow_mut() = previous);
    out
}

/// Who is acting here: the thread's actor, else the task's, else `system`.
pub fn current() -> Actor {
    ON_THREAD.with(|a| a.borrow().clone()).or_else(task_actor).unwrap_or_else(Actor::system)
}

/// The chain's last entry (its sequence number and hash), or the start.
pub fn head(conn: &Connection) -> rusqlite::Result<Chain> {
    let last: Option<(i64, String)> = conn
        .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    match last {
        None => Ok(Chain::at(0, GENESIS)),
        Some((seq, hash)) => Ok(Chain::at(seq as u64, sha(&hash)?)),
    }
}

/// Appends an entry by the current actor, in the caller's transaction; returns its
/// sequence number.
pub fn record(
    conn: &Connection,
    at: Timestamp,
    action: &str,
    target: &str,
    outcome: Outcome,
    details: serde_json::Value,
) -> rusqlite::Result<u64> {
    let actor = current();
    let mut chain = head(conn)?;
    let (entry, line) =
        chain.append(at, &actor.name, actor.source.as_deref(), action, target, outcome, details);
    conn.execute(
        "INSERT INTO audit (seq, at, actor, action, target, outcome, line, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            entry.seq as i64,
            ts(at),
            entry.actor,
            entry.action,
            entry.target,
            outcome_name(outcome),
            line,
            chain.head.to_string()
        ],
    )?;
    Ok(entry.seq)
}

/// An outcome's name, as stored.
pub fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Success => "success",
        Outcome::Failure => "failure",
        Outcome::Refused => "refused",
    }
}
