//! The waker a connection's task polls its connection and calls with: a wake that comes
//! while the task is in its turn (h2 waking the connection when one of its calls queues
//! an answer) is noted and served by polling again within the turn, instead of going to
//! the runtime, which schedules a task that woke itself as a yield and tells a parked
//! worker about it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Wake, Waker};

/// The most rounds a turn polls again for its own wakes before it yields to the runtime.
pub(super) const AGAIN: usize = 4;

/// One connection's turns ([`Turn::enter`], [`Turn::leave`]) and the waker to poll with.
pub(super) struct Turn {
    shared: Arc<Shared>,
    waker: Waker,
}

struct Shared {
    inside: AtomicBool,
    woken: AtomicBool,
    /// The task's own waker, as of its last turn.
    task: Mutex<Option<Waker>>,
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    // Noted first, then the turn checked: a turn that ends after the note sees it when it
    // leaves, one that ended before it is woken here.
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if !self.inside.load(Ordering::SeqCst) {
            let task = self.task.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if let Some(task) = task {
                task.wake();
            }
        }
    }
}

impl Turn {
    pub(super) fn new() -> Self {
        let shared = Arc::new(Shared {
            inside: AtomicBool::new(false),
            woken: AtomicBool::new(false),
            task: Mutex::new(None),
        });
        Turn { waker: Waker::from(Arc::clone(&shared)), shared }
    }

    /// Starts a turn of the task polled with `cx`; poll with [`Turn::waker`] until
    /// [`Turn::leave`].
    pub(super) fn enter(&self, cx: &Context<'_>) {
        {
            let mut task = self.shared.task.lock().unwrap_or_else(PoisonError::into_inner);
            if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        self.shared.woken.store(false, Ordering::SeqCst);
        self.shared.inside.store(true, Ordering::SeqCst);
    }

    /// Ends the turn: `true` when a wake came during it, and the turn goes on (poll again).
    pub(super) fn leave(&self) -> bool {
        self.shared.inside.store(false, Ordering::SeqCst);
        if self.shared.woken.swap(false, Ordering::SeqCst) {
            self.shared.inside.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }

    /// Ends the turn and has the runtime poll the task again: for a turn woken in every
    /// round ([`AGAIN`]), as when the runtime's cooperative budget is spent (its resources
    /// then answer pending and wake the task, until the runtime polls it anew).
    pub(super) fn yield_now(&self, cx: &Context<'_>) {
        self.shared.inside.store(false, Ordering::SeqCst);
        self.shared.woken.store(false, Ordering::SeqCst);
        cx.waker().wake_by_ref();
    }

    /// The waker to poll with during a turn.
    pub(super) fn waker(&self) -> &Waker {
        &self.waker
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// The task's waker: counts its wakes.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_wake_in_the_turn_is_served_in_it_and_one_after_goes_to_the_task() {
        let task = Arc::new(Task::default());
        let waker = Waker::from(Arc::clone(&task));
        let turn = Turn::new();
        turn.enter(&Context::from_waker(&waker));
        turn.waker().wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 0, "not sent to the runtime");
        assert!(turn.leave(), "the turn polls again");
        assert!(!turn.leave(), "and then ends");
        turn.waker().wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "outside a turn the task is woken");
        turn.enter(&Context::from_waker(&waker));
        assert!(!turn.leave(), "a wake before the turn began does not extend it");
    }

    #[test]
    fn a_turn_that_yields_has_the_runtime_poll_it_again() {
        let task = Arc::new(Task::default());
        let waker = Waker::from(Arc::clone(&task));
        let turn = Turn::new();
        let cx = Context::from_waker(&waker);
        turn.enter(&cx);
        turn.waker().wake_by_ref();
        turn.yield_now(&cx);
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        turn.waker().wake_by_ref();
        assert_eq!(task.0.load(Ordering::SeqCst), 2, "out of the turn once it yielded");
    }
}
