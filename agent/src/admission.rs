//! Admission of requests with a body: a request takes a slot before its body is read, and
//! keeps it until it is answered, so the bodies buffered and decoded at once are bounded by
//! the slots (sized from `workers`), not by the clients connected.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// How many slots are taken and awaited, and the most ever taken at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotGauge {
    /// Requests holding a slot (reading, decoding or running).
    pub admitted: usize,
    /// Requests waiting for one.
    pub waiting: usize,
    /// The most requests that held a slot at once since the server started.
    pub peak: usize,
}

/// The request slots of one server.
#[derive(Debug)]
pub struct RequestSlots {
    semaphore: Arc<Semaphore>,
    size: usize,
    gauge: watch::Sender<SlotGauge>,
}

/// A taken slot, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    gauge: watch::Sender<SlotGauge>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        update(&self.gauge, |g| g.admitted -= 1);
    }
}

/// Changes the gauge, waking its followers only when it has any: a watch's `send_modify`
/// wakes (`notify_waiters`, about 1 µs) even with no receiver, four times a request, and
/// only tests follow the gauge. A receiver that subscribes later reads the value as it is.
fn update(gauge: &watch::Sender<SlotGauge>, change: impl FnOnce(&mut SlotGauge)) {
    gauge.send_if_modified(|g| {
        change(g);
        gauge.receiver_count() > 0
    });
}

/// A request counted as waiting.
struct Waiting<'a>(&'a watch::Sender<SlotGauge>);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        update(self.0, |g| g.waiting -= 1);
    }
}

/// No slot was freed within the wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    /// The slots there are.
    pub slots: usize,
    /// How long the request waited.
    pub waited: Duration,
}

impl RequestSlots {
    /// `size` slots (at least one).
    pub fn new(size: usize) -> Self {
        let size = size.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            semaphore: Arc::new(Semaphore::new(size)),
            size,
            gauge: watch::channel(SlotGauge::default()).0,
        }
    }

    /// The number of slots.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Takes a slot, waiting at most `wait` (first come, first served).
    pub async fn take(&self, wait: Duration) -> Result<Slot, Busy> {
        update(&self.gauge, |g| g.waiting += 1);
        // Counted out however the wait ends, the caller's future dropped included.
        let waiting = Waiting(&self.gauge);
        let taken = tokio::time::timeout(wait, Arc::clone(&self.semaphore).acquire_owned()).await;
        drop(waiting);
        match taken {
            Ok(Ok(permit)) => {
                update(&self.gauge, |g| {
                    g.admitted += 1;
                    g.peak = g.peak.max(g.admitted);
                });
                Ok(Slot { _permit: permit, gauge: self.gauge.clone() })
            }
            // The semaphore is never closed; a closed one is as good as a busy one.
            Ok(Err(_)) | Err(_) => Err(Busy { slots: self.size, waited: wait }),
        }
    }

    /// Follows the gauge.
    pub fn gauge(&self) -> watch::Receiver<SlotGauge> {
        self.gauge.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_bound_the_admitted_and_the_rest_wait_then_give_up() {
        let slots = RequestSlots::new(2);
        let a = slots.take(Duration::from_secs(1)).await.unwrap();
        let _b = slots.take(Duration::from_secs(1)).await.unwrap();
        let busy = slots.take(Duration::from_millis(10)).await.unwrap_err();
        assert_eq!(busy, Busy { slots: 2, waited: Duration::from_millis(10) });
        assert_eq!(*slots.gauge().borrow(), SlotGauge { admitted: 2, waiting: 0, peak: 2 });
        drop(a);
        let _c = slots.take(Duration::from_secs(1)).await.unwrap();
        assert_eq!(*slots.gauge().borrow(), SlotGauge { admitted: 2, waiting: 0, peak: 2 });
    }
}
