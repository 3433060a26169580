//! A replica's poll of the events table (PostgreSQL): which events appeared since the last
//! poll, and whether another replica recorded any of them, in which case this replica
//! sends its agents their documents again. Its own events it skips: it sent those when
//! it made each change (`db::event` notes their ids in the pool, [`Db::events_after`]).
//!
//! Event ids come from an identity column, taken when a row is inserted but visible when
//! its transaction commits, so a smaller id can appear after a larger one was read. The
//! ids missing below the newest read are watched as gaps for [`GAP_WAIT`] (a transaction
//! that records an event is short; an id rolled back never appears), so such an event
//! is still found, not skipped. The bookkeeping ([`EventPoll::take`]) does no I/O; time
//! comes in as an argument.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::db::{self, Db, DbError};

/// How long an id missing below the newest one read is watched for.
pub const GAP_WAIT: Duration = Duration::from_secs(60);

/// Missing ids further apart than this are not watched one by one: a jump of the
/// sequence (PostgreSQL skips ids it had cached when it restarts), not transactions in
/// flight.
const MAX_GAP: i64 = 1_000;

/// What one poll found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsSince {
    /// The newest event read so far.
    pub latest: i64,
    /// New events recorded by another replica (or process).
    pub others: usize,
    /// New events this process recorded.
    pub own: usize,
}

/// One replica's poll: the newest event read, and the ids below it not read yet.
#[derive(Debug, Default)]
pub struct EventPoll {
    seen: Option<i64>,
    gaps: BTreeMap<i64, Instant>,
}

impl EventPoll {
    /// The smallest id a poll must read from (exclusive): below the oldest gap watched,
    /// else the newest event read. `None` before the first poll.
    pub fn low(&self) -> Option<i64> {
        let seen = self.seen?;
        Some(self.gaps.keys().next().map_or(seen, |gap| gap - 1))
    }

    /// The newest event read, the starting point (`None` before it).
    pub fn start(&mut self, latest: i64) {
        self.seen = Some(latest);
        self.gaps.clear();
    }

    /// Takes the ids read after [`EventPoll::low`] (ascending, each with whether this
    /// process recorded it) at `now`: counts the new ones (past the newest read, or filling
    /// a gap), notes the ids missing among them as gaps, and forgets gaps older than
    /// [`GAP_WAIT`].
    pub fn take(&mut self, ids: &[(i64, bool)], now: Instant) -> EventsSince {
        let Some(mut seen) = self.seen else {
            let latest = ids.last().map_or(0, |(id, _)| *id);
            self.start(latest);
            return EventsSince { latest, others: 0, own: 0 };
        };
        let (mut others, mut own) = (0, 0);
        for &(id, mine) in ids {
            let new = if id > seen {
                if id - seen <= MAX_GAP {
                    for missing in seen + 1..id {
                        self.gaps.insert(missing, now);
                    }
                }
                seen = id;
                true
            } else {
                self.gaps.remove(&id).is_some()
            };
            if new {
                if mine { own += 1 } else { others += 1 }
            }
        }
        self.seen = Some(seen);
        self.gaps.retain(|_, since| now.saturating_duration_since(*since) < GAP_WAIT);
        EventsSince { latest: seen, others, own }
    }

    /// Reads the events since the last poll (the first poll only takes the newest as its
    /// starting point).
    pub async fn poll(&mut self, db: &Db, now: Instant) -> Result<EventsSince, DbError> {
        match self.low() {
            None => {
                let latest = db.run(|sql| db::latest_event(&sql)).await?;
                self.start(latest);
                Ok(EventsSince { latest, others: 0, own: 0 })
            }
            Some(low) => {
                let ids = db.events_after(low).await?;
                Ok(self.take(&ids, now))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_committed_after_a_newer_one_is_found_and_counted_once() {
        let t0 = Instant::now();
        let mut poll = EventPoll::default();
        poll.start(10);
        assert_eq!(poll.low(), Some(10));
        // 12 (another's) and 14 (ours) committed; 11 and 13 not yet.
        let found = poll.take(&[(12, false), (14, true)], t0);
        assert_eq!(found, EventsSince { latest: 14, others: 1, own: 1 });
        assert_eq!(poll.low(), Some(10));
        // 11 commits (another's); 12 and 14 come back with it and count no more.
        let found = poll.take(&[(11, false), (12, false), (14, true)], t0 + GAP_WAIT / 2);
        assert_eq!(found, EventsSince { latest: 14, others: 1, own: 0 });
        assert_eq!(poll.low(), Some(12));
        // 13 never commits (rolled back): watched for GAP_WAIT, then forgotten.
        let found = poll.take(&[(14, true)], t0 + GAP_WAIT);
        assert_eq!(found, EventsSince { latest: 14, others: 0, own: 0 });
        assert_eq!(poll.low(), Some(14));
        // A jump of the sequence is not watched id by id.
        let found = poll.take(&[(14 + MAX_GAP + 1, false)], t0 + GAP_WAIT);
        assert_eq!(found, EventsSince { latest: 14 + MAX_GAP + 1, others: 1, own: 0 });
        assert_eq!(poll.low(), Some(14 + MAX_GAP + 1));
    }

    #[test]
    fn the_first_poll_only_takes_its_starting_point() {
        let mut poll = EventPoll::default();
        assert_eq!(poll.low(), None);
        let found = poll.take(&[(3, false), (5, false)], Instant::now());
        assert_eq!(found, EventsSince { latest: 5, others: 0, own: 0 });
        assert_eq!(poll.low(), Some(5));
    }
}
