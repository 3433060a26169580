//! Group commit for metric windows. Each agent session hands its batch to the queue and
//! waits for the answer; one task stores everything queued in one transaction
//! ([`monitoring::insert_deliveries`]) while the batches that arrive meanwhile queue for the
//! next. One commit, and one sync to disk, then serves many agents: at 10,000 agents each
//! sending a window every 10 s, a transaction per batch would be a thousand commits a
//! second.
//!
//! On SQLite one transaction runs at a time (the database has one writer); on PostgreSQL a
//! few run at once, on connections of the pool. An agent has one batch in flight in a
//! session (it waits for the acknowledgement); a batch it sends again after reconnecting
//! may meet its first copy, in one transaction or in two at once, and is stored once all
//! the same: the insert skips a stored (agent, sequence), and on PostgreSQL its
//! `ON CONFLICT DO NOTHING` settles two transactions inserting the same one.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use falaj_common::time::Timestamp;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};

use crate::db::{Db, DbError};
use crate::monitoring::{self, Delivery, Ingested};
use crate::sql::Backend;

/// Most windows stored in one transaction: a transaction is cut there, so none grows
/// without bound while agents catch up after an outage (a batch holds at most
/// `MAX_WINDOWS_PER_BATCH`).
const MAX_GROUP_WINDOWS: usize = 2048;

/// Transactions at once on PostgreSQL (of the pool's connections). Two, not more: at
/// 10,000 agents four made the groups smaller and PostgreSQL's CPU a window 138 µs
/// against 77 (`benches/scale.rs`).
const POSTGRES_FLUSHES: usize = 2;

/// The answer to one batch: the batch back with what storing it did, or why it was not
/// stored (shared by every batch of the failed transaction).
pub type Stored = Result<(Delivery, Ingested), Arc<DbError>>;

#[derive(Debug)]
struct Pending {
    delivery: Delivery,
    reply: oneshot::Sender<Stored>,
}

/// The queue; [`WindowQueue::run`] is its storing task.
#[derive(Debug)]
pub struct WindowQueue {
    sender: mpsc::UnboundedSender<Pending>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Pending>>>,
}

impl Default for WindowQueue {
    fn default() -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        Self { sender, receiver: Mutex::new(Some(receiver)) }
    }
}

impl WindowQueue {
    /// Stores `delivery` with whatever else is queued; returns once its transaction ended,
    /// with the delivery back. An error means nothing of it was stored (the agent sends it
    /// again).
    pub async fn store(&self, delivery: Delivery) -> Stored {
        let stopped = || Arc::new(DbError::Task("the metric window queue stopped".into()));
        let (reply, answer) = oneshot::channel();
        self.sender.send(Pending { delivery, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Stores queued batches on `db` until `stop` changes. Runs once: a second call
    /// returns at once.
    pub async fn run(&self, db: Db, mut stop: watch::Receiver<bool>) {
        let taken = self.receiver.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(mut receiver) = taken else { return };
        let flushes = match db.backend() {
            Backend::Sqlite => 1,
            Backend::Postgres => POSTGRES_FLUSHES,
        };
        let slots = Arc::new(Semaphore::new(flushes));
        loop {
            let first = tokio::select! {
                _ = stop.changed() => return,
                next = receiver.recv() => match next {
                    Some(first) => first,
                    None => return,
                },
            };
            // While every slot is busy, more batches queue: the group grows.
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
            let mut windows = first.delivery.windows.len();
            let mut group = vec![first];
            while windows < MAX_GROUP_WINDOWS {
                let Ok(next) = receiver.try_recv() else { break };
                windows += next.delivery.windows.len();
                group.push(next);
            }
            let db = db.clone();
            tokio::spawn(async move {
                let _slot = slot;
                flush(&db, group).await;
            });
        }
    }
}

/// Stores `group` in one transaction and answers each batch.
async fn flush(db: &Db, group: Vec<Pending>) {
    let (deliveries, replies): (Vec<Delivery>, Vec<_>) =
        group.into_iter().map(|p| (p.delivery, p.reply)).unzip();
    let now = Timestamp::from_system(SystemTime::now());
    let stored = db
        .run(move |sql| {
            let ingested = monitoring::insert_deliveries(&sql, &deliveries, now)?;
            Ok((deliveries, ingested))
        })
        .await;
    match stored {
        Ok((deliveries, ingested)) => {
            for ((reply, delivery), ingested) in replies.into_iter().zip(deliveries).zip(ingested) {
                // A session that ended meanwhile no longer waits.
                let _ = reply.send(Ok((delivery, ingested)));
            }
        }
        Err(err) => {
            let err = Arc::new(err);
            for reply in replies {
                let _ = reply.send(Err(Arc::clone(&err)));
            }
        }
    }
}
