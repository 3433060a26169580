//! The wait between connection attempts: exponential backoff with full jitter, drawn from
//! a seeded generator so that a test (or a fleet reproducing an incident) sees the same
//! waits for the same seed. It grows per failed *round* over the control plane's
//! addresses (`addresses.rs`); within a round the next address waits only a short jitter.

use std::time::Duration;

use crate::random::SeededRng;

/// How long the first wait may be at most, before doubling.
pub const BASE: Duration = Duration::from_millis(500);

/// Consecutive failed rounds and the jitter source.
#[derive(Debug, Clone)]
pub struct Backoff {
    max: Duration,
    failures: u32,
    rng: SeededRng,
}

impl Backoff {
    /// No failure yet; waits never exceed `max`.
    pub fn new(max: Duration, seed: u64) -> Self {
        Self { max, failures: 0, rng: SeededRng::new(seed) }
    }

    /// The ceiling of the wait after `failures` consecutive failures:
    /// `min(max, BASE * 2^failures)` (the exponent capped at 16).
    pub fn ceiling(&self, failures: u32) -> Duration {
        BASE.saturating_mul(1 << failures.min(16)).min(self.max)
    }

    /// Counts a failed round and draws the wait before the next attempt, uniform in
    /// `[0, ceiling]`.
    pub fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.ceiling(self.failures).mul_f64(self.rng.uniform())
    }

    /// The wait before trying the next address of a round that is not over: uniform in
    /// `[0, ceiling(0)]` (at most [`BASE`]), so that agents leaving a dead replica do not
    /// all arrive at the next one at once. Counts nothing.
    pub fn quick(&mut self) -> Duration {
        self.ceiling(0).mul_f64(self.rng.uniform())
    }

    /// A session came up: the next failure waits as little as the first.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failed rounds since the last session that came up.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}
