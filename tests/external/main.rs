//! The root package's tests that need parts from outside Rust, in one binary with its own
//! harness (libtest-mimic, [`harness`]): a Python with ONNX Runtime and the packages of
//! `tests/interop/requirements.txt` (`corpus`, `interop`, `onnx_ml`) and a Vulkan adapter
//! (lavapipe where there is no GPU) for `gpu_serving`, PostgreSQL's server programs for
//! `replicas`, `replica_kills` and `postgres_pass`. Where a part is missing the test is
//! reported as ignored, with the reason, not as passed; with `FALAJ_REQUIRE_INTEROP`,
//! `FALAJ_REQUIRE_GPU` or `FALAJ_REQUIRE_POSTGRES` set it fails instead. The harness takes
//! libtest's arguments (filters, `--list`, `--ignored`), so `cargo test` and `cargo nextest`
//! run it as usual.

#[path = "../fleet/database.rs"]
mod database;
#[path = "../fleet/layered.rs"]
mod layered;
#[path = "../support/mod.rs"]
mod support;

mod corpus;
mod gpu_serving;
mod harness;
mod interop;
mod onnx_ml;
// The storage tests' PostgreSQL cluster, for `replicas`, `replica_kills` and `postgres_pass`.
#[path = "../../control-plane/tests/storage/postgres.rs"]
#[expect(dead_code, reason = "the storage tests' harness: these tests need no TLS to the database")]
mod postgres;
mod postgres_pass;
mod replica_kills;
mod replicas;
#[path = "../fleet/wait.rs"]
mod wait;

fn main() {
    let arguments = libtest_mimic::Arguments::from_args();
    let trials = vec![
        harness::trial_async(
            "corpus::every_corpus_model_bundles_serves_and_matches_onnx_runtime",
            corpus::every_corpus_model_bundles_serves_and_matches_onnx_runtime,
        ),
        harness::trial_async(
            "gpu_serving::gpu_bundle_runs_on_the_gpu_engine_and_on_tract_without_one",
            gpu_serving::gpu_bundle_runs_on_the_gpu_engine_and_on_tract_without_one,
        ),
        harness::trial(
            "interop::skl2onnx_model_served_to_tritons_client_matches_onnx_runtime",
            interop::skl2onnx_model_served_to_tritons_client_matches_onnx_runtime,
        ),
        harness::trial(
            "interop::tritons_clients_over_tls_with_api_keys",
            interop::tritons_clients_over_tls_with_api_keys,
        ),
        harness::trial(
            "onnx_ml::onnx_node_tests_of_the_added_operators_pass",
            onnx_ml::onnx_node_tests_of_the_added_operators_pass,
        ),
        harness::trial(
            "onnx_ml::the_readme_lists_every_supported_operator_and_no_other",
            onnx_ml::the_readme_lists_every_supported_operator_and_no_other,
        ),
        harness::trial(
            "postgres_pass::the_fleet_tests_pass_with_the_control_plane_on_postgresql",
            postgres_pass::the_fleet_tests_pass_with_the_control_plane_on_postgresql,
        ),
        harness::trial_async(
            "replicas::two_replicas_on_one_postgres_serve_one_fleet_and_survive_the_loss_of_one",
            replicas::two_replicas_on_one_postgres_serve_one_fleet_and_survive_the_loss_of_one,
        ),
        harness::trial_async(
            "replica_kills::a_replica_killed_during_a_transfer_leaves_agents_to_resume_it_on_the_other",
            replica_kills::a_replica_killed_during_a_transfer_leaves_agents_to_resume_it_on_the_other,
        ),
        harness::trial_async(
            "replica_kills::a_replica_killed_during_a_rollout_leaves_the_other_to_finish_it",
            replica_kills::a_replica_killed_during_a_rollout_leaves_the_other_to_finish_it,
        ),
        harness::trial_async(
            "replica_kills::a_replica_killed_with_a_notification_pending_leaves_it_to_the_other",
            replica_kills::a_replica_killed_with_a_notification_pending_leaves_it_to_the_other,
        ),
    ];
    libtest_mimic::run(&arguments, trials).exit();
}
