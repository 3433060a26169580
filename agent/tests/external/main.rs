//! The agent's tests that need a Vulkan adapter (lavapipe where there is no GPU), in a
//! binary with its own harness (libtest-mimic, [`harness`]): without an adapter the test
//! is reported as ignored, with the reason, not as passed; with `FALAJ_REQUIRE_GPU` set it
//! fails instead. The harness takes libtest's arguments, so `cargo test` and `cargo
//! nextest` run it as usual.

#[path = "../support/mod.rs"]
mod support;

mod engines;
// The root package's harness, shared by path; its synchronous `trial` is not used here.
#[allow(dead_code)]
#[path = "../../../tests/external/harness.rs"]
mod harness;

fn main() {
    let arguments = libtest_mimic::Arguments::from_args();
    let trials = vec![harness::trial_async(
        "engines::supported_models_run_on_the_gpu_and_the_rest_fall_back_to_tract",
        engines::supported_models_run_on_the_gpu_and_the_rest_fall_back_to_tract,
    )];
    libtest_mimic::run(&arguments, trials).exit();
}
