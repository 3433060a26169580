//! The metrics outbox: closed windows wait here, in the agent's SQLite, until the control
//! plane acknowledges them. Each gets the next per-agent sequence number; the control plane
//! stores each (agent, sequence) once, so delivery may repeat without double counting.
//!
//! The outbox is capped: a window pushed into a full outbox first evicts the oldest, and
//! what was evicted (windows and the requests they counted, including what they themselves
//! carried) is added to a persistent counter that the next window kept carries to the
//! control plane. Nothing is lost silently: received + carried = everything measured.

use std::time::SystemTime;

use falaj_common::metrics::MetricsWindow;
use falaj_common::time::Timestamp;
use rusqlite::{OptionalExtension, params};

use super::{Result, Store};

impl Store {
    /// Appends a window; returns its sequence number and how many windows were evicted.
    pub fn outbox_push(
        &mut self,
        mut window: MetricsWindow,
        cap: usize,
        now: SystemTime,
    ) -> Result<(u64, u64)> {
        let at = Timestamp::from_system(now).unix() as i64;
        self.write_tx(|tx| {
            let depth: i64 = tx.query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?;
            let excess = (depth + 1 - cap.max(1) as i64).max(0);
            let mut evicted = 0u64;
            if excess > 0 {
                let (windows, requests): (i64, i64) = tx.query_row(
                    "SELECT COUNT(*) + COALESCE(SUM(dropped_windows), 0), COALESCE(SUM(requests + dropped_requests), 0)
                     FROM (SELECT * FROM outbox ORDER BY seq LIMIT ?1)",
                    [excess],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                tx.execute("DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?1)", [excess])?;
                tx.execute(
                    "UPDATE outbox_state SET dropped_windows = dropped_windows + ?1, dropped_requests = dropped_requests + ?2",
                    params![windows, requests],
                )?;
                evicted = excess as u64;
            }
            let (seq, dropped_windows, dropped_requests): (i64, i64, i64) = tx.query_row(
                "SELECT next_seq, dropped_windows, dropped_requests FROM outbox_state WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            // Added to what the window already carries (windows the reporter dropped
            // while the outbox could not be written).
            window.counts.dropped_windows = window.counts.dropped_windows.saturating_add(dropped_windows as u64);
            window.counts.dropped_requests = window.counts.dropped_requests.saturating_add(dropped_requests as u64);
            let bytes = postcard::to_stdvec(&window).expect("windows always encode");
            tx.execute(
                "INSERT INTO outbox (seq, requests, dropped_windows, dropped_requests, window, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    seq,
                    window.counts.requests as i64,
                    window.counts.dropped_windows as i64,
                    window.counts.dropped_requests as i64,
                    bytes,
                    at
                ],
            )?;
            tx.execute(
                "UPDATE outbox_state SET next_seq = next_seq + 1, dropped_windows = 0, dropped_requests = 0",
                [],
            )?;
            Ok((seq as u64, evicted))
        })
    }

    /// The oldest `limit` windows, encoded, with their sequence numbers.
    pub fn outbox_peek(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, window FROM outbox ORDER BY seq LIMIT ?1")
            .map_err(self.db())?;
        let rows = stmt
            .query_map([limit as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(self.db())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.db())
    }

    /// Deletes acknowledged windows.
    pub fn outbox_ack(&mut self, seqs: &[u64]) -> Result<()> {
        self.write_tx(|tx| {
            let mut stmt = tx.prepare("DELETE FROM outbox WHERE seq = ?1")?;
            for seq in seqs {
                stmt.execute([*seq as i64])?;
            }
            Ok(())
        })
    }

    /// Windows waiting, and the requests they count.
    pub fn outbox_depth(&self) -> Result<(u64, u64)> {
        self.conn
            .query_row("SELECT COUNT(*), COALESCE(SUM(requests), 0) FROM outbox", [], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .map_err(self.db())
    }

    /// Evicted windows and requests not yet carried by a kept window.
    pub fn outbox_pending_drops(&self) -> Result<(u64, u64)> {
        self.conn
            .query_row(
                "SELECT dropped_windows, dropped_requests FROM outbox_state WHERE id = 1",
                [],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
            )
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(self.db())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::store;
    use falaj_common::metrics::Counts;
    use falaj_common::sketch::LatencySketch;

    fn window(requests: u64) -> MetricsWindow {
        MetricsWindow {
            model: "m".into(),
            version: 1,
            start: Timestamp::from_unix(0),
            seconds: 1,
            counts: Counts {
                requests,
                errors: 0,
                latency: LatencySketch::default(),
                rows: 0,
                inputs: vec![],
                outputs: vec![],
                dropped_windows: 0,
                dropped_requests: 0,
                ..Counts::default()
            },
        }
    }

    #[test]
    fn sequence_numbers_grow_and_acks_delete() {
        let (_dir, mut store) = store();
        for r in 1..=3 {
            store.outbox_push(window(r), 10, SystemTime::now()).unwrap();
        }
        let peek = store.outbox_peek(10).unwrap();
        assert_eq!(peek.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3]);
        store.outbox_ack(&[1, 2]).unwrap();
        assert_eq!(store.outbox_depth().unwrap(), (1, 3));
        let (seq, _) = store.outbox_push(window(4), 10, SystemTime::now()).unwrap();
        assert_eq!(seq, 4, "sequence numbers are never reused");
    }

    #[test]
    fn a_full_outbox_evicts_the_oldest_and_counts_exactly() {
        let (_dir, mut store) = store();
        let mut pushed = 0;
        for r in 1..=10u64 {
            store.outbox_push(window(r), 3, SystemTime::now()).unwrap();
            pushed += r;
        }
        assert_eq!(store.outbox_depth().unwrap(), (3, 8 + 9 + 10));
        // What is kept, plus what the kept windows carry as dropped, is everything.
        let kept: Vec<MetricsWindow> = store
            .outbox_peek(10)
            .unwrap()
            .into_iter()
            .map(|(_, b)| postcard::from_bytes(&b).unwrap())
            .collect();
        let received: u64 = kept.iter().map(|w| w.counts.requests).sum();
        let carried: u64 = kept.iter().map(|w| w.counts.dropped_requests).sum();
        let (_, pending) = store.outbox_pending_drops().unwrap();
        assert_eq!(received + carried + pending, pushed);
        let dropped_windows: u64 = kept.iter().map(|w| w.counts.dropped_windows).sum();
        assert_eq!(dropped_windows + store.outbox_pending_drops().unwrap().0, 7);
    }
}
