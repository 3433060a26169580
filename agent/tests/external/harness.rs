//! The harness of the tests that need parts from outside Rust (libtest-mimic): a test that
//! finds its part missing calls [`skip`] and returns, and is reported as ignored with the
//! reason instead of passed; with the part's `FALAJ_REQUIRE_*` variable set it fails.

use std::cell::RefCell;

use libtest_mimic::{Completion, Trial};

thread_local! {
    /// Why the test running on this thread skipped itself, if it did.
    static SKIPPED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records that the running test (or the part of it that needs what is missing) cannot
/// run here, and why; the test then returns. With `require` set in the environment (as
/// `.ci/run` sets them) it fails instead.
pub fn skip(require: &str, why: &str) {
    assert!(std::env::var_os(require).is_none(), "{require} is set but {why}");
    SKIPPED.with(|s| *s.borrow_mut() = Some(why.to_owned()));
}

/// Runs `test` on the trial's thread: ignored (with the reason) when it called [`skip`],
/// failed when it panicked (libtest-mimic catches the panic).
fn outcome(test: impl FnOnce()) -> Completion {
    SKIPPED.with(|s| s.borrow_mut().take());
    test();
    match SKIPPED.with(|s| s.borrow_mut().take()) {
        Some(why) => Completion::ignored_with(why),
        None => Completion::Completed,
    }
}

/// An async test, on a two-worker runtime whose main future is polled on the trial's
/// thread (where [`skip`] records).
pub fn trial_async<F: Future<Output = ()> + 'static>(name: &str, test: fn() -> F) -> Trial {
    Trial::ignorable_test(name, move || {
        Ok(outcome(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("the test's runtime starts")
                .block_on(test());
        }))
    })
}
