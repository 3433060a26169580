//! The region's lease: work done once per region (alert evaluation, rollout judging,
//! retention pruning, the reissue of documents) is done by the one replica holding it.
//!
//! On PostgreSQL the lease is a session-level advisory lock ([`LEASE_KEY`]) held on a
//! connection of the replica's own, outside its pool: it lasts exactly as long as that
//! connection. Every `every`, a holder checks its connection (`SELECT 1`) and a follower
//! tries the lock (`pg_try_advisory_lock`, which never waits). When a holder dies, its
//! connection closes with it (at once for a killed process, whose socket the kernel
//! closes; within the TCP keepalive the server sets for a host that vanished), PostgreSQL
//! frees the lock, and a follower takes it at its next try: within `every` after that.
//! A holder whose connection fails steps down at its next check, so two replicas may both
//! believe they hold the lease for at most `every`; the work it guards stays correct then,
//! because each step of it locks the rows it decides from. It then stands aside for
//! [`STAND_ASIDE`] checks before it tries the lock again, so that a replica whose
//! connection held takes the region's work over, rather than whichever of the two tries
//! first (the one whose connection just failed may be on a flapping network).
//!
//! On SQLite there is one control plane per database: it always holds the lease.

use std::time::Duration;

use tokio::sync::watch;

use crate::db::Db;

/// The advisory lock that is the lease ([`crate::sql::locks::LEASE`]).
pub const LEASE_KEY: i64 = crate::sql::locks::LEASE;

/// Checks a holder that lost the lease with its connection skips before trying the lock
/// again.
pub const STAND_ASIDE: u32 = 3;

/// Whether this replica holds the region's lease, as the task that keeps it last found.
#[derive(Debug, Clone)]
pub struct Lease {
    held: watch::Receiver<bool>,
    /// [`Lease::always`]'s sender, kept so that its receivers never see it closed.
    _always: Option<std::sync::Arc<watch::Sender<bool>>>,
}

impl Lease {
    /// A lease always held: one control plane on SQLite.
    pub fn always() -> Self {
        let (tx, held) = watch::channel(true);
        Self { held, _always: Some(std::sync::Arc::new(tx)) }
    }

    /// Whether the region's work is this replica's now.
    pub fn is_held(&self) -> bool {
        *self.held.borrow()
    }

    /// A receiver that changes when the lease is taken or lost (closed, after a last
    /// `false`, when the task keeping it stops).
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.held.clone()
    }
}

/// Starts keeping the lease of `db`'s region, checked every `every`, until `stop` turns
/// true (the connection, and with it the lock, closes then). On SQLite, [`Lease::always`].
pub fn keep(db: &Db, every: Duration, mut stop: watch::Receiver<bool>) -> Lease {
    if db.backend() == crate::sql::Backend::Sqlite {
        return Lease::always();
    }
    let (tx, held) = watch::channel(false);
    let db = db.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut holder = Holder { conn: None, held: false, aside: 0 };
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            if *stop.borrow() {
                break;
            }
            let db = db.clone();
            holder = match tokio::task::spawn_blocking(move || holder.step(&db)).await {
                Ok(holder) => holder,
                // The check panicked: its connection is gone with it, and so is the lock.
                Err(e) => {
                    tracing::error!(error = %e, "the region lease's check failed");
                    Holder { conn: None, held: false, aside: STAND_ASIDE }
                }
            };
            tx.send_if_modified(|held| std::mem::replace(held, holder.held) != holder.held);
        }
        tx.send_replace(false);
        // Its connection, and with it the lock, closes here ([`Holder`]'s drop).
        drop(holder);
    });
    Lease { held, _always: None }
}

/// The lease's connection and what it last found.
struct Holder {
    conn: Option<::postgres::Client>,
    held: bool,
    /// Checks left to skip before trying the lock again ([`STAND_ASIDE`]).
    aside: u32,
}

impl Drop for Holder {
    /// Closes the connection, also when the runtime itself shuts down with the task.
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            crate::sql::postgres::close(conn, "the region lease's connection");
        }
    }
}

impl Holder {
    /// One check: connects if needed, then confirms the lock (held) or tries it (not held).
    fn step(mut self, db: &Db) -> Self {
        if self.aside > 0 {
            return Self { conn: None, held: false, aside: self.aside - 1 };
        }
        let was = self.held;
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => match db.own_postgres_connection() {
                Some(Ok(conn)) => conn,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "the region lease cannot reach the database");
                    return Self { conn: None, held: false, aside: 0 };
                }
                None => return Self { conn: None, held: true, aside: 0 },
            },
        };
        let checked = if was {
            conn.simple_query("SELECT 1").map(|_| true)
        } else {
            conn.query_one("SELECT pg_try_advisory_lock($1)", &[&LEASE_KEY]).map(|r| r.get(0))
        };
        match checked {
            Ok(held) => {
                if held != was {
                    if held {
                        tracing::info!(
                            "took the region's lease: this replica does the region's work"
                        );
                    } else {
                        tracing::warn!("lost the region's lease");
                    }
                }
                Self { conn: Some(conn), held, aside: 0 }
            }
            Err(e) => {
                if was {
                    tracing::warn!(error = %e, "lost the region's lease with its connection");
                }
                Self { conn: None, held: false, aside: if was { STAND_ASIDE } else { 0 } }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn on_sqlite_the_lease_is_always_held() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("control.db")).unwrap();
        let (_stop, stopped) = watch::channel(false);
        let lease = keep(&db, Duration::from_millis(10), stopped);
        assert!(lease.is_held());
        assert!(*lease.watch().borrow());
    }
}
