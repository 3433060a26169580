//! The control plane's audit log: every state change and security event appended to a
//! hash chain ([`falaj_common::audit`]) in the same transaction as the change it records
//! (on SQLite or PostgreSQL, through [`crate::sql`]), with the actor that caused it, and
//! signed checkpoints of the chain's head.
//!
//! Who acts is carried implicitly: the admin API's authentication runs each request
//! inside [`acting`], [`crate::db::Db::run`] carries that actor onto the blocking thread
//! that runs the transaction, and [`record`] (called by [`crate::db::event`]) reads it.
//!
//! On PostgreSQL, where several connections (replicas) write at once, appending an entry,
//! signing a checkpoint and pruning take one advisory lock until their transaction ends,
//! so the chain grows one entry at a time and two checkpoints or prunes at once sign and
//! delete once; SQLite's single writer does the same there.
//! Work that no request caused (agents' sessions, periodic judgements) is `system` unless
//! it says otherwise.
//!
//! The audit key ([`key`]) signs a checkpoint of the head every `[audit] checkpoint_every`
//! or `checkpoint_entries` entries ([`run`]), and at every export, which is the chain's
//! lines with the checkpoints among them: what `falaj-control audit verify` checks
//! offline with the public key.

pub mod agents;
pub mod api;
pub mod cli;
pub mod key;

use std::cell::RefCell;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use falaj_common::audit::{Chain, Checkpoint, Entry, GENESIS, Outcome};
use falaj_common::keys::SigningKey;
use falaj_common::time::{Timestamp, human_duration};
use serde::{Deserialize, Serialize};

use crate::db::{sha, sha_at, ts};
use crate::sql::{self, AsSql, OptionalExt, Sql, SqlError};
use crate::state::Shared;

/// `[audit]` of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The longest time between checkpoints while entries are appended.
    #[serde(with = "human_duration")]
    pub checkpoint_every: Duration,
    /// Entries after which a checkpoint is signed sooner.
    pub checkpoint_entries: u64,
    /// How long entries are kept; `0s` keeps them forever. Pruning keeps a signed
    /// checkpoint of the last entry deleted as the chain's new anchor.
    #[serde(with = "human_duration")]
    pub retention: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_every: Duration::from_secs(300),
            checkpoint_entries: 1000,
            retention: Duration::ZERO,
        }
    }
}

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

/// Runs `f` on this thread with `actor` acting (how [`crate::db::Db::run`] carries a
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
pub fn head<C: AsSql + ?Sized>(conn: &C) -> Result<Chain, C::Error> {
    let last = conn
        .sql()
        .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", sql::params![], |r| {
            Ok((r.get::<i64>(0)?, sha_at(r, 1)?))
        })
        .optional()?;
    match last {
        None => Ok(Chain::at(0, GENESIS)),
        Some((seq, hash)) => Ok(Chain::at(seq as u64, hash)),
    }
}

/// The PostgreSQL advisory lock that makes appends to the chain one at a time across
/// connections (SQLite's one connection and write lock do that there).
const CHAIN_LOCK: i64 = sql::locks::AUDIT_CHAIN;

/// Takes [`CHAIN_LOCK`] until the transaction ends, on PostgreSQL (every `Db::run` is one
/// there); nothing on SQLite.
fn lock_chain(sql: &Sql<'_>) -> Result<(), SqlError> {
    if sql.backend() == sql::Backend::Postgres {
        sql.execute("SELECT pg_advisory_xact_lock($1)", sql::params![CHAIN_LOCK])?;
    }
    Ok(())
}

/// Appends an entry by the current actor, in the caller's transaction; returns its
/// sequence number.
pub fn record<C: AsSql + ?Sized>(
    conn: &C,
    at: Timestamp,
    action: &str,
    target: &str,
    outcome: Outcome,
    details: serde_json::Value,
) -> Result<u64, C::Error> {
    let conn = conn.sql();
    lock_chain(&conn)?;
    let actor = current();
    let mut chain = head(&conn)?;
    let (entry, line) =
        chain.append(at, &actor.name, actor.source.as_deref(), action, target, outcome, details);
    conn.execute(
        "INSERT INTO audit (seq, at, actor, action, target, outcome, line, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        sql::params![
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

/// The last checkpoint signed, if any.
pub fn last_checkpoint<C: AsSql + ?Sized>(conn: &C) -> Result<Option<Checkpoint>, C::Error> {
    let line: Option<String> = conn
        .sql()
        .query_row(
            "SELECT line FROM audit_checkpoints ORDER BY seq DESC LIMIT 1",
            sql::params![],
            |r| r.get(0),
        )
        .optional()?;
    Ok(line.map(|l| parse_checkpoint(&l)).transpose()?)
}

fn parse_checkpoint(line: &str) -> Result<Checkpoint, SqlError> {
    #[derive(Deserialize)]
    struct Line {
        checkpoint: Checkpoint,
    }
    serde_json::from_str::<Line>(line)
        .map(|l| l.checkpoint)
        .map_err(|e| SqlError::Conversion { column: 0, message: format!("a checkpoint: {e}") })
}

/// Signs a checkpoint of the head with `key` if the head moved since the last one;
/// returns it. On PostgreSQL the chain's lock is held from the head's read on, so that
/// the head does not move meanwhile and of two checkpoints at once the second finds
/// nothing new.
pub fn checkpoint<C: AsSql + ?Sized>(
    conn: &C,
    key: &SigningKey,
    at: Timestamp,
) -> Result<Option<Checkpoint>, C::Error> {
    let sql = conn.sql();
    lock_chain(&sql)?;
    let chain = head(&sql)?;
    let last = last_checkpoint(&sql)?.map_or(0, |c| c.seq);
    if chain.seq == 0 || chain.seq == last {
        return Ok(None);
    }
    let signed = Checkpoint::sign(chain.seq, chain.head, at, key);
    sql.execute(
        "INSERT INTO audit_checkpoints (seq, at, line) VALUES ($1, $2, $3)",
        sql::params![signed.seq as i64, ts(at), signed.line()],
    )?;
    Ok(Some(signed))
}

/// A query's rows of sequence number and line.
fn lines(sql: &Sql<'_>, query: &str) -> Result<Vec<(u64, String)>, SqlError> {
    sql.query_map(query, sql::params![], |r| Ok((r.get::<i64>(0)?.max(0) as u64, r.get(1)?)))
}

/// The export, itself recorded (`audit.export`): a fresh checkpoint of the head is
/// signed, then every entry's line with each checkpoint after the entry it covers,
/// preceded by the checkpoint of the last entry pruned (the anchor) when the chain no
/// longer starts at 1. On PostgreSQL the chain's lock, taken by the export's own entry,
/// holds until the lines are read, so they are one consistent chain.
pub fn export<C: AsSql + ?Sized>(
    conn: &C,
    key: &SigningKey,
    at: Timestamp,
) -> Result<Vec<String>, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction()?;
    record(&tx, at, "audit.export", "audit", Outcome::Success, serde_json::Value::Null)?;
    checkpoint(&tx, key, at)?;
    let checkpoints = lines(&tx, "SELECT seq, line FROM audit_checkpoints")?;
    let entries = lines(&tx, "SELECT seq, line FROM audit ORDER BY seq")?;
    tx.commit()?;
    Ok(falaj_common::audit::assemble(entries, checkpoints))
}

/// Deletes the entries recorded before `before`, keeping what remains verifiable: the
/// last entry deleted gets a signed checkpoint (unless it has one), kept as the anchor an
/// export starts with. Recorded as `audit.prune`; returns how many entries went. On
/// PostgreSQL the chain's lock is taken first, so two prunes at once (two replicas) are
/// one after the other: the second finds nothing left to delete.
pub fn prune<C: AsSql + ?Sized>(
    conn: &C,
    key: &SigningKey,
    before: Timestamp,
    now: Timestamp,
) -> Result<u64, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction()?;
    lock_chain(&tx)?;
    let last: Option<(i64, String)> = tx
        .query_row(
            "SELECT seq, hash FROM audit WHERE at < $1 ORDER BY seq DESC LIMIT 1",
            sql::params![ts(before)],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((last, hash)) = last else { return Ok(0) };
    let hash = sha(&hash)
        .map_err(|e| SqlError::Conversion { column: 1, message: format!("entry {last}: {e}") })?;
    let anchored: i64 = tx.query_row(
        "SELECT COUNT(*) FROM audit_checkpoints WHERE seq = $1",
        sql::params![last],
        |r| r.get(0),
    )?;
    if anchored == 0 {
        let anchor = Checkpoint::sign(last as u64, hash, now, key);
        tx.execute(
            "INSERT INTO audit_checkpoints (seq, at, line) VALUES ($1, $2, $3)",
            sql::params![last, ts(now), anchor.line()],
        )?;
    }
    let deleted = tx.execute("DELETE FROM audit WHERE seq <= $1", sql::params![last])? as u64;
    tx.execute("DELETE FROM audit_checkpoints WHERE seq < $1", sql::params![last])?;
    let details = serde_json::json!({ "before": before, "entries": deleted, "anchor": last });
    record(&tx, now, "audit.prune", "audit", Outcome::Success, details)?;
    tx.commit()?;
    Ok(deleted)
}

/// Which entries `audit list` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditQuery {
    /// Entries at or after this time.
    pub since: Option<Timestamp>,
    /// Only this actor (`user:alice`).
    pub actor: Option<String>,
    /// Only actions starting with this (`rollout` matches `rollout.start`).
    pub action: Option<String>,
    /// The latest this many (default 100).
    pub limit: Option<u64>,
}

/// The entries `query` selects, oldest first. The action's prefix is matched alike on
/// both databases: without regard to ASCII case (SQLite's `LIKE`, PostgreSQL's `ILIKE`),
/// `%` and `_` as wildcards, a backslash as itself (PostgreSQL's escape character is
/// turned off, SQLite has none).
pub fn list<C: AsSql + ?Sized>(conn: &C, query: &AuditQuery) -> Result<Vec<Entry>, C::Error> {
    let sql = conn.sql();
    let (like, escape) = match sql.backend() {
        sql::Backend::Sqlite => ("LIKE", ""),
        sql::Backend::Postgres => ("ILIKE", " ESCAPE ''"),
    };
    let lines = sql.query_map(
        &format!(
            "SELECT line FROM (
                 SELECT seq, line FROM audit
                 WHERE at >= $1 AND (CAST($2 AS TEXT) IS NULL OR actor = CAST($2 AS TEXT))
                     AND (CAST($3 AS TEXT) IS NULL OR action {like} CAST($3 AS TEXT) || '%'{escape})
                 ORDER BY seq DESC LIMIT $4
             ) AS latest ORDER BY seq"
        ),
        sql::params![
            query.since.map_or(0, ts),
            query.actor,
            query.action,
            query.limit.unwrap_or(100).min(100_000) as i64
        ],
        |r| r.get::<String>(0),
    )?;
    let entries = lines
        .iter()
        .map(|line| {
            serde_json::from_str(line).map_err(|e| SqlError::Conversion {
                column: 0,
                message: format!("an audit entry: {e}"),
            })
        })
        .collect::<Result<Vec<Entry>, SqlError>>()?;
    Ok(entries)
}

/// How often entries past retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Signs checkpoints until `stop` turns true: when `config.checkpoint_entries` entries
/// have been appended since the last one, or `config.checkpoint_every` has passed and
/// any has; and once more on the way out. Prunes entries past `config.retention` hourly.
pub async fn run(
    shared: Arc<Shared>,
    config: AuditConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1).min(config.checkpoint_every));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_signed = tokio::time::Instant::now();
    // The first pass prunes at once.
    let mut last_pruned = tokio::time::Instant::now()
        .checked_sub(PRUNE_EVERY)
        .unwrap_or_else(tokio::time::Instant::now);
    loop {
        let stopping = tokio::select! {
            _ = stop.wait_for(|s| *s) => true,
            _ = ticks.tick() => false,
        };
        let due = stopping || last_signed.elapsed() >= config.checkpoint_every;
        let (key, entries) = (Arc::clone(&shared.audit_key), config.checkpoint_entries);
        if !config.retention.is_zero() && (stopping || last_pruned.elapsed() >= PRUNE_EVERY) {
            last_pruned = tokio::time::Instant::now();
            let key = Arc::clone(&key);
            let now = SystemTime::now();
            let before = Timestamp::from_system(
                now.checked_sub(config.retention).unwrap_or(SystemTime::UNIX_EPOCH),
            );
            match shared
                .db
                .run(move |sql| prune(&sql, &key, before, Timestamp::from_system(now)))
                .await
            {
                Ok(0) => {}
                Ok(deleted) => {
                    tracing::info!(deleted, %before, "pruned audit entries past retention");
                }
                Err(err) => tracing::error!(error = %err, "pruning the audit log failed"),
            }
        }
        let signed = shared
            .db
            .run(move |sql| {
                let pending =
                    head(&sql)?.seq.saturating_sub(last_checkpoint(&sql)?.map_or(0, |c| c.seq));
                if pending == 0 || (!due && pending < entries) {
                    return Ok(None);
                }
                checkpoint(&sql, &key, Timestamp::from_system(SystemTime::now()))
            })
            .await;
        match signed {
            Ok(Some(cp)) => {
                last_signed = tokio::time::Instant::now();
                tracing::debug!(seq = cp.seq, "audit checkpoint signed");
            }
            Ok(None) => {}
            Err(err) => tracing::error!(error = %err, "signing an audit checkpoint failed"),
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use falaj_common::keys::SigningKey;

    use super::*;
    use crate::db::{self, Db, TokenRow};

    fn token(id: &str) -> TokenRow {
        TokenRow {
            id: id.into(),
            group: "edge".into(),
            region: "eu-west-1".into(),
            expires: Timestamp::from_unix(2_000_000_000),
        }
    }

    fn count(db: &Db, sql: &str) -> i64 {
        db.call_sync(|c| c.query_row(sql, [], |r| r.get(0))).unwrap()
    }

    #[test]
    fn a_change_and_its_entry_commit_together_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("control.db")).unwrap();
        let at = Timestamp::from_unix(1_800_000_000);
        // The process dies inside the transaction, after the change and its entry were
        // written but before the commit: neither is there afterwards.
        let crashed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            db.call_sync(|c| {
                let tx = c.transaction()?;
                db::insert_token(&tx, &token("t-1"), falaj_common::keys::Sha256([1; 32]), at)?;
                panic!("killed between the change and the commit");
                #[allow(unreachable_code)]
                tx.commit()
            })
        }));
        assert!(crashed.is_err());
        assert_eq!(count(&db, "SELECT COUNT(*) FROM tokens"), 0);
        assert_eq!(count(&db, "SELECT COUNT(*) FROM audit"), 0);
        // Committed, both are there, the entry by the actor of the thread.
        on_thread(Some(Actor::new("user:alice", Some("10.0.0.7".into()))), || {
            db.call_sync(|c| {
                let tx = c.transaction()?;
                db::insert_token(&tx, &token("t-2"), falaj_common::keys::Sha256([2; 32]), at)?;
                tx.commit()
            })
        })
        .unwrap();
        let entries = db.call_sync(|c| list(c, &AuditQuery::default())).unwrap();
        assert_eq!(entries.len(), 1);
        let e = &entries[0];
        assert_eq!(
            (e.seq, e.actor.as_str(), e.source.as_deref()),
            (1, "user:alice", Some("10.0.0.7"))
        );
        assert_eq!(
            (e.action.as_str(), e.target.as_str(), e.prev),
            ("token.create", "t-2", GENESIS)
        );
    }

    #[test]
    fn exports_verify_and_checkpoints_are_signed_only_when_the_head_moved() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("control.db")).unwrap();
        let key = SigningKey::from_seed(&[3; 32]);
        let at = Timestamp::from_unix(1_800_000_000);
        for i in 0..5 {
            db.call_sync(|c| db::event(c, at, "deploy", "edge", &format!("fault@{i}"))).unwrap();
        }
        let first = db.call_sync(|c| checkpoint(c, &key, at)).unwrap().unwrap();
        assert_eq!(first.seq, 5);
        assert_eq!(db.call_sync(|c| checkpoint(c, &key, at)).unwrap(), None, "nothing new");
        db.call_sync(|c| db::event(c, at, "undeploy", "edge", "fault")).unwrap();
        let lines = db.call_sync(|c| export(c, &key, at)).unwrap();
        // Five entries, their checkpoint, the undeploy, the export itself, its checkpoint.
        assert_eq!(lines.len(), 9, "{lines:#?}");
        let verified =
            falaj_common::audit::verify(lines.iter().map(String::as_str), &[key.public()]).unwrap();
        assert_eq!((verified.entries, verified.checkpoints, verified.last), (7, 2, Some(7)));
        let actions: Vec<String> = db
            .call_sync(|c| {
                list(c, &AuditQuery { action: Some("audit".into()), ..AuditQuery::default() })
            })
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert_eq!(actions, ["audit.export"]);

        // Entries before a time pruned: the rest still verifies, from its anchor.
        let later = Timestamp::from_unix(1_800_000_500);
        db.call_sync(|c| db::event(c, later, "deploy", "edge", "fault@9")).unwrap();
        assert_eq!(db.call_sync(|c| prune(c, &key, later, later)).unwrap(), 7);
        let lines = db.call_sync(|c| export(c, &key, later)).unwrap();
        assert!(lines[0].starts_with("{\"checkpoint\""), "the anchor first: {lines:#?}");
        let verified =
            falaj_common::audit::verify(lines.iter().map(String::as_str), &[key.public()]).unwrap();
        // The deploy, the prune, the export.
        assert_eq!((verified.first, verified.last), (Some(8), Some(10)));
    }
}
