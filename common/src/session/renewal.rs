//! When the agent asks for a new certificate: once less than a third of its lifetime is
//! left, with at most one request outstanding and an unanswered one asked again after
//! [`super::Config::renew_retry`].

use std::time::{Duration, SystemTime};

use crate::time::Timestamp;

/// The certificate in use: when it became and stops being valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before.
    pub not_before: Timestamp,
    /// Not valid after.
    pub not_after: Timestamp,
}

impl Validity {
    /// Whether the certificate is due for renewal at `wall`: less than a third of its
    /// lifetime left (or already expired, or a clock so far ahead it looks so).
    pub fn due(&self, wall: SystemTime) -> bool {
        let lifetime = self.not_after.unix().saturating_sub(self.not_before.unix());
        let now = Timestamp::from_system(wall).unix();
        now.saturating_add(lifetime / 3) >= self.not_after.unix()
    }

    /// When renewal falls due.
    pub fn due_at(&self) -> Timestamp {
        let lifetime = self.not_after.unix().saturating_sub(self.not_before.unix());
        Timestamp::from_unix(self.not_after.unix().saturating_sub(lifetime / 3))
    }
}

/// The renewal schedule.
#[derive(Debug, Clone, Default)]
pub struct Renewal {
    validity: Option<Validity>,
    /// When the outstanding request was made (session time).
    outstanding: Option<Duration>,
}

impl Renewal {
    /// The certificate now in use (`None`: unreadable, so nothing is renewed).
    pub fn set_validity(&mut self, validity: Option<Validity>) {
        self.validity = validity;
    }

    /// The certificate now in use.
    pub fn validity(&self) -> Option<Validity> {
        self.validity
    }

    /// Whether to ask now; if so the request counts as outstanding from `elapsed`.
    pub fn poll(&mut self, elapsed: Duration, wall: SystemTime, retry: Duration) -> bool {
        let Some(validity) = self.validity else { return false };
        if !validity.due(wall) {
            return false;
        }
        if self.outstanding.is_some_and(|at| elapsed.saturating_sub(at) < retry) {
            return false;
        }
        self.outstanding = Some(elapsed);
        true
    }

    /// The control plane answered (a certificate or a refusal): the next heartbeat may
    /// ask again if still due.
    pub fn answered(&mut self) {
        self.outstanding = None;
    }

    /// Whether a request is outstanding.
    pub fn outstanding(&self) -> bool {
        self.outstanding.is_some()
    }
}
