//! What the GPU tests share: the adapter (lavapipe where there is no GPU), and the record of
//! a test that found a part missing, which the harness reports as an ignored test.

use std::cell::RefCell;
use std::sync::Arc;

use falaj_gpu::{Gpu, GpuOptions};
use libtest_mimic::{Completion, Failed, Trial};

thread_local! {
    /// Why the test running on this thread skipped itself, if it did.
    static SKIPPED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records that the running test cannot run here, and why; the test then returns. With
/// `require` set in the environment it fails instead (CI installs every part and sets it).
pub fn skip(require: &str, why: &str) {
    assert!(std::env::var_os(require).is_none(), "{require} is set but {why}");
    SKIPPED.with(|s| *s.borrow_mut() = Some(why.to_owned()));
}

/// A test of the harness: run on the trial's thread, ignored (with the reason) when it
/// called [`skip`], failed when it panicked (libtest-mimic catches the panic).
pub fn trial(name: &str, test: fn()) -> Trial {
    Trial::ignorable_test(name, move || -> Result<Completion, Failed> {
        SKIPPED.with(|s| s.borrow_mut().take());
        test();
        Ok(match SKIPPED.with(|s| s.borrow_mut().take()) {
            Some(why) => Completion::ignored_with(why),
            None => Completion::Completed,
        })
    })
}

/// The machine's GPU, a software one accepted. Without any, the test is skipped (reported
/// as ignored, with the reason), unless `FALAJ_REQUIRE_GPU=1` (CI installs lavapipe and sets
/// it).
pub fn open_gpu() -> Option<Arc<Gpu>> {
    match Gpu::open(GpuOptions { allow_software: true }) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            skip("FALAJ_REQUIRE_GPU", &format!("{e} (install mesa-vulkan-drivers)"));
            None
        }
    }
}
