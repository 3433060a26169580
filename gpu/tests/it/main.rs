//! The GPU engine's integration tests, in one binary with its own harness (libtest-mimic):
//! every test needs a Vulkan adapter (lavapipe where there is no GPU), and the conformance
//! test a Python with the `onnx` package. Where one is missing the test is reported as
//! ignored, with the reason, not as passed; with `FALAJ_REQUIRE_GPU` (or
//! `FALAJ_REQUIRE_INTEROP`) set it fails instead. The harness takes libtest's arguments
//! (filters, `--list`, `--ignored`), so `cargo test` and `cargo nextest` run it as usual.

mod conformance;
mod finetune;
mod parity;
mod support;

/// The trials of the named test functions, each named `module::function`.
macro_rules! trials {
    ($($module:ident :: { $($test:ident),* $(,)? }),* $(,)?) => {
        vec![$($(support::trial(
            concat!(stringify!($module), "::", stringify!($test)),
            $module::$test,
        )),*),*]
    };
}

fn main() {
    let arguments = libtest_mimic::Arguments::from_args();
    let trials = trials![
        conformance::{onnx_node_tests_pass_or_are_refused_as_listed},
        finetune::{
            cross_entropy_with_adam_matches_the_cpu,
            cross_entropy_with_sgd_matches_the_cpu,
            squared_error_with_adam_matches_the_cpu,
            squared_error_with_sgd_matches_the_cpu,
            evaluation_over_many_chunks_matches_the_cpu,
            evaluation_of_a_tiny_head_gives_the_hand_computed_sums,
            one_sgd_step_moves_the_weights_as_worked_out_by_hand,
            bad_input_is_an_error_not_a_panic,
        },
        parity::{
            sample_classifier_agrees_with_tract,
            residual_cnn_agrees_with_tract,
            batch_norm_folds_into_a_scaled_gemm,
            concurrent_requests_run_as_one_batch_with_their_own_answers,
            models_without_a_batch_axis_are_not_batched_and_unknown_operators_are_refused,
        },
    ];
    libtest_mimic::run(&arguments, trials).exit();
}
