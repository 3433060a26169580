//! When a webhook notification is tried again: exponential backoff from one second,
//! doubling up to five minutes between attempts, until an hour has passed since the
//! notification was recorded. The control plane's outbox (`falaj_control::outbox`) keeps
//! each notification's attempts in its database and asks [`next_attempt`] when the next
//! one is due, so the schedule carries on across restarts and replicas.

use std::time::Duration;

use crate::time::Timestamp;

/// The wait after the first failed attempt.
pub const FIRST_WAIT: Duration = Duration::from_secs(1);

/// The longest wait between two attempts.
pub const MAX_WAIT: Duration = Duration::from_secs(5 * 60);

/// How long after it was recorded a notification is still tried.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(60 * 60);

/// The wait after `failures` failed attempts (at least one):
/// `min(MAX_WAIT, FIRST_WAIT * 2^(failures - 1))`.
pub fn wait(failures: u32) -> Duration {
    FIRST_WAIT.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(MAX_WAIT)
}

/// When a notification recorded at `recorded`, whose attempt number `failures` has just
/// failed at `now`, is tried next; `None` when that would be later than
/// [`GIVE_UP_AFTER`] from `recorded`: it is given up.
pub fn next_attempt(recorded: Timestamp, failures: u32, now: Timestamp) -> Option<Timestamp> {
    let next = now.saturating_add(wait(failures));
    (next <= recorded.saturating_add(GIVE_UP_AFTER)).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_from_a_second_up_to_five_minutes() {
        let waits: Vec<u64> = (1..=11).map(|f| wait(f).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(wait(u32::MAX), MAX_WAIT);
    }

    #[test]
    fn a_notification_is_tried_for_an_hour_then_given_up() {
        let recorded = Timestamp::from_unix(1_000_000);
        // Failing at once each time the schedule says: the attempts' times, until the end.
        let (mut now, mut failures, mut times) = (recorded, 0, Vec::new());
        loop {
            failures += 1;
            match next_attempt(recorded, failures, now) {
                Some(next) => {
                    assert!(next > now);
                    times.push(next.unix() - recorded.unix());
                    now = next;
                }
                None => break,
            }
        }
        assert_eq!(&times[..10], [1, 3, 7, 15, 31, 63, 127, 255, 511, 811]);
        let last = *times.last().unwrap();
        assert!(last <= GIVE_UP_AFTER.as_secs(), "{times:?}");
        assert!(last + MAX_WAIT.as_secs() > GIVE_UP_AFTER.as_secs(), "{times:?}");
        // One attempt at the recording and one per wait after it.
        assert_eq!(failures as usize, times.len() + 1);
    }

    #[test]
    fn a_late_failure_is_given_up_even_after_few_attempts() {
        let recorded = Timestamp::from_unix(1_000);
        let late = recorded.saturating_add(GIVE_UP_AFTER);
        assert_eq!(next_attempt(recorded, 1, late), None);
        let just_in_time = Timestamp::from_unix(late.unix() - 1);
        assert_eq!(next_attempt(recorded, 1, just_in_time), Some(late));
    }
}
