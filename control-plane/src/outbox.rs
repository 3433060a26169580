//! Webhook notifications that outlive the process. Each is a row of `outbox`, written in
//! the transaction that records what it tells (an alert firing or resolving, a rollout
//! rolled back), so that a notification exists exactly when its event does. The region's
//! lease holder sends them ([`run`]): at once when they are recorded, then again on
//! [`falaj_common::delivery`]'s schedule until the receiver answers 2xx or an hour has
//! passed. A restart, or the lease moving to another replica, carries on with what is
//! pending.
//!
//! Delivery is at least once (a replica stopped between a receiver's answer and the
//! row's removal sends it again): every attempt of one notification carries the same
//! [`DELIVERY_HEADER`], for a receiver to tell a repeat.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use falaj_common::delivery;
use falaj_common::time::Timestamp;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;

use crate::db::{from_ts, ts};
use crate::sql::{AsSql, Sql, SqlError, params};
use crate::state::Shared;
use crate::webhook::WebhookClient;

/// The header naming a notification: the same on every attempt to send it.
pub const DELIVERY_HEADER: &str = "falaj-delivery";

/// How long one webhook call may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Notifications sent at once, at most.
const BATCH: usize = 32;

/// The longest wait between two looks at the outbox: a bound, should a notification be
/// recorded without the sender being woken (by another replica that has since lost the
/// lease).
const POLL: Duration = Duration::from_secs(10);

/// The sender's wake-up, and what its attempts came to since the start, for `/metrics`.
#[derive(Debug, Default)]
pub struct Sender {
    /// Notified when notifications are recorded, to send them at once.
    pub queued: Notify,
    /// Notifications a receiver took, sent once each has left the outbox (so a receiver
    /// that sees a count sees the rows gone).
    pub delivered: watch::Sender<u64>,
    /// Attempts that failed (each retried or given up).
    pub failed: AtomicU64,
    /// Notifications given up.
    pub given_up: AtomicU64,
}

/// Where the notifications a transaction records go, and the region they are from.
#[derive(Debug, Clone, Copy)]
pub struct Webhooks<'a> {
    /// The URLs every notification is POSTed to.
    pub urls: &'a [String],
    /// The control plane's region, which notifications name.
    pub region: &'a str,
}

/// A notification waiting to be sent to one URL.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// Its row.
    pub id: i64,
    /// Its [`DELIVERY_HEADER`]: 32 random hexadecimal digits.
    pub delivery: String,
    /// Where it goes.
    pub url: String,
    /// The JSON POSTed.
    pub body: Vec<u8>,
    /// What it is, for the log.
    pub what: String,
    /// When it was recorded.
    pub recorded: Timestamp,
    /// Attempts made so far, all failed.
    pub attempts: u32,
    /// When the next is due.
    pub next_at: Timestamp,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// Records `body` for each of `urls`, due at `now`, in `sql`'s transaction; `what` names
/// it in the log.
pub fn enqueue<'u>(
    sql: &Sql<'_>,
    urls: impl IntoIterator<Item = &'u str>,
    body: &[u8],
    what: &str,
    now: Timestamp,
) -> Result<(), SqlError> {
    for url in urls {
        sql.execute(
            "INSERT INTO outbox (delivery, url, body, what, recorded_at, attempts, next_at)
             VALUES ($1, $2, $3, $4, $5, 0, $5)",
            params![crate::secrets::random_hex::<16>(), url, body, what, ts(now)],
        )?;
    }
    Ok(())
}

/// The columns [`pending_rows`] reads, in its order.
const COLUMNS: &str = "id, delivery, url, body, what, recorded_at, attempts, next_at, last_error";

/// The rows of `outbox` that `filter` (a `WHERE` and `ORDER BY` over `params`) selects.
fn pending_rows(
    sql: &Sql<'_>,
    filter: &str,
    params: &[&dyn crate::sql::Param],
) -> Result<Vec<Pending>, SqlError> {
    sql.query_map(&format!("SELECT {COLUMNS} FROM outbox {filter}"), params, |r| {
        Ok(Pending {
            id: r.get(0)?,
            delivery: r.get(1)?,
            url: r.get(2)?,
            body: r.get(3)?,
            what: r.get(4)?,
            recorded: from_ts(r.get(5)?),
            attempts: r.get::<i64>(6)?.clamp(0, i64::from(u32::MAX)) as u32,
            next_at: from_ts(r.get(7)?),
            last_error: r.get(8)?,
        })
    })
}

/// Up to `limit` notifications due at `now`, the longest due first.
pub fn due<C: AsSql + ?Sized>(
    conn: &C,
    now: Timestamp,
    limit: usize,
) -> Result<Vec<Pending>, C::Error> {
    let limit = limit.min(i64::MAX as usize) as i64;
    Ok(pending_rows(
        &conn.sql(),
        "WHERE next_at <= $1 ORDER BY next_at, id LIMIT $2",
        params![ts(now), limit],
    )?)
}

/// The first `limit` notifications waiting, in the order they were recorded.
pub fn pending<C: AsSql + ?Sized>(conn: &C, limit: usize) -> Result<Vec<Pending>, C::Error> {
    let limit = limit.min(i64::MAX as usize) as i64;
    Ok(pending_rows(&conn.sql(), "ORDER BY id LIMIT $1", params![limit])?)
}

/// How many notifications are waiting, and when the oldest was recorded.
pub fn backlog<C: AsSql + ?Sized>(conn: &C) -> Result<(u64, Option<Timestamp>), C::Error> {
    let (count, oldest): (i64, Option<i64>) =
        conn.sql().query_row("SELECT COUNT(*), MIN(recorded_at) FROM outbox", params![], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    Ok((count.max(0) as u64, oldest.map(from_ts)))
}

/// When the next attempt is due, if any notification is waiting.
fn next_due<C: AsSql + ?Sized>(conn: &C) -> Result<Option<Timestamp>, C::Error> {
    let next: Option<i64> =
        conn.sql().query_row("SELECT MIN(next_at) FROM outbox", params![], |r| r.get(0))?;
    Ok(next.map(from_ts))
}

/// What became of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered 2xx: the notification is gone from the outbox.
    Delivered,
    /// It failed, and is tried again at this time.
    Retry(Timestamp),
    /// It failed, for the last time: the notification is gone from the outbox.
    GivenUp,
}

/// Records an attempt on `p` made at `now`: `error` is why it failed, `None` when the
/// receiver took it.
pub fn attempted<C: AsSql + ?Sized>(
    conn: &C,
    p: &Pending,
    error: Option<&str>,
    now: Timestamp,
) -> Result<Outcome, C::Error> {
    let sql = conn.sql();
    let Some(error) = error else {
        sql.execute("DELETE FROM outbox WHERE id = $1", params![p.id])?;
        return Ok(Outcome::Delivered);
    };
    let attempts = p.attempts.saturating_add(1);
    let Some(next) = delivery::next_attempt(p.recorded, attempts, now) else {
        sql.execute("DELETE FROM outbox WHERE id = $1", params![p.id])?;
        return Ok(Outcome::GivenUp);
    };
    sql.execute(
        "UPDATE outbox SET attempts = $2, next_at = $3, last_error = $4 WHERE id = $1",
        params![p.id, i64::from(attempts), ts(next), error],
    )?;
    Ok(Outcome::Retry(next))
}

/// Sends what is due, then waits for the next due or for [`Sender::queued`], until
/// `stop`. A notification being sent when `stop` comes stays in the outbox.
pub async fn run(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let client = WebhookClient::new(TIMEOUT);
    loop {
        let sent = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            sent = send_due(&shared, &client) => sent,
        };
        let wait = match sent {
            Some(BATCH) => continue,
            // The outbox could not be read or written: look again later, not at once (a
            // database refusing writes would otherwise have the same notification sent
            // again and again).
            None => POLL,
            Some(_) => match shared.db.run(|sql| next_due(&sql)).await {
                Ok(Some(next)) => {
                    let now = SystemTime::now();
                    next.to_system().duration_since(now).unwrap_or_default().min(POLL)
                }
                Ok(None) => POLL,
                Err(e) => {
                    tracing::error!(error = %e, "reading the webhook outbox failed");
                    POLL
                }
            },
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = shared.outbox.queued.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// One attempt at each notification due (at most [`BATCH`], all at once); how many were
/// due, `None` when the outbox could not be read or an attempt not recorded.
async fn send_due(shared: &Shared, client: &WebhookClient) -> Option<usize> {
    let now = Timestamp::from_system(SystemTime::now());
    let due = match shared.db.run(move |sql| due(&sql, now, BATCH)).await {
        Ok(due) => due,
        Err(e) => {
            tracing::error!(error = %e, "reading the webhook outbox failed");
            return None;
        }
    };
    let mut count = Some(due.len());
    let mut sends = JoinSet::new();
    for p in due {
        let client = client.clone();
        sends.spawn(async move {
            let result = client.post_json(&p.url, p.body.clone(), &p.delivery).await;
            let error = match result {
                Ok(status) if status.is_success() => None,
                Ok(status) => Some(format!("answered {status}")),
                Err(e) => Some(e),
            };
            (p, error)
        });
    }
    while let Some(joined) = sends.join_next().await {
        let Ok((p, error)) = joined else { continue };
        let now = Timestamp::from_system(SystemTime::now());
        let recorded = {
            let (p, error) = (p.clone(), error.clone());
            shared.db.run(move |sql| attempted(&sql, &p, error.as_deref(), now)).await
        };
        let (url, what, attempt) = (&p.url, &p.what, p.attempts + 1);
        let counts = &shared.outbox;
        match (recorded, error.as_deref().unwrap_or("")) {
            (Ok(Outcome::Delivered), _) => {
                counts.delivered.send_modify(|n| *n += 1);
                tracing::info!(%url, %what, attempt, "notification delivered");
            }
            (Ok(Outcome::Retry(next)), error) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%url, %what, attempt, error, retry_at = %next, "webhook failed");
            }
            (Ok(Outcome::GivenUp), error) => {
                counts.failed.fetch_add(1, Ordering::Relaxed);
                counts.given_up.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    %url, %what, attempt, error,
                    "notification given up: not delivered within an hour"
                );
            }
            (Err(e), _) => {
                tracing::error!(%url, %what, error = %e, "recording a webhook attempt failed");
                count = None;
            }
        }
    }
    count
}
