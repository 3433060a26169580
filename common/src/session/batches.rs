//! What the agent has sent and the control plane has not acknowledged: one batch of
//! metric windows and one batch of audit lines at a time.
//!
//! Windows leave the agent's outbox only when an acknowledgement names them, after the
//! control plane's commit; the control plane stores each (agent, sequence) once. So a lost
//! acknowledgement costs a re-send (after [`super::Config::ack_timeout`], or on the next
//! session), a duplicated or late one deletes what is already stored, and no window is
//! lost or counted twice, in any order the acknowledgements arrive.

use std::time::Duration;

/// The batch of metric windows in flight and whether more may wait in the outbox.
#[derive(Debug, Clone, Default)]
pub struct Windows {
    /// Sequence numbers sent and not yet acknowledged, and when they were sent.
    in_flight: Option<(Vec<u64>, Duration)>,
    /// The outbox may hold windows not sent.
    waiting: bool,
}

impl Windows {
    /// The outbox may hold windows to send.
    pub fn wake(&mut self) {
        self.waiting = true;
    }

    /// Whether to read the outbox and send a batch now: something may wait and nothing
    /// is in flight. Clears the wake-up.
    pub fn poll_send(&mut self) -> bool {
        if self.waiting && self.in_flight.is_none() {
            self.waiting = false;
            return true;
        }
        false
    }

    /// A batch was sent (`None`: the outbox was empty).
    pub fn sent(&mut self, seqs: Option<Vec<u64>>, elapsed: Duration) {
        self.in_flight = seqs.filter(|s| !s.is_empty()).map(|s| (s, elapsed));
    }

    /// The control plane stored `seqs`. The batch in flight is done only if these are
    /// exactly its windows (an older batch's late acknowledgement is not this one's);
    /// the windows named may be deleted either way, and the outbox read again.
    pub fn acknowledged(&mut self, seqs: &[u64]) {
        if self.in_flight.as_ref().is_some_and(|(sent, _)| sent.as_slice() == seqs) {
            self.in_flight = None;
        }
        self.waiting = true;
    }

    /// Gives up on a batch unacknowledged for longer than `timeout`; true if one was.
    pub fn expire(&mut self, elapsed: Duration, timeout: Duration) -> bool {
        if self.in_flight.as_ref().is_some_and(|(_, at)| elapsed.saturating_sub(*at) > timeout) {
            self.in_flight = None;
            self.waiting = true;
            return true;
        }
        false
    }

    /// The sequence numbers in flight.
    pub fn in_flight(&self) -> Option<&[u64]> {
        self.in_flight.as_ref().map(|(s, _)| s.as_slice())
    }

    /// A new session: nothing is in flight on it, and the outbox is read at once.
    pub fn reset(&mut self) {
        self.in_flight = None;
        self.waiting = true;
    }
}

/// The batch of audit lines in flight: the last entry sent, and when.
#[derive(Debug, Clone, Default)]
pub struct Audit {
    in_flight: Option<(u64, Duration)>,
}

impl Audit {
    /// Whether a heartbeat should send the unshipped lines: none in flight, or the batch
    /// in flight went unacknowledged for longer than `timeout`.
    pub fn due(&self, elapsed: Duration, timeout: Duration) -> bool {
        self.in_flight.is_none_or(|(_, at)| elapsed.saturating_sub(at) > timeout)
    }

    /// A batch ending at `last` was sent (`None`: nothing to send).
    pub fn sent(&mut self, last: Option<u64>, elapsed: Duration) {
        self.in_flight = last.map(|l| (l, elapsed));
    }

    /// The last entry in flight.
    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight.map(|(l, _)| l)
    }

    /// A new session: nothing in flight.
    pub fn reset(&mut self) {
        self.in_flight = None;
    }
}
