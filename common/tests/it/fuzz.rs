//! Stable fuzzing of `common`'s decoders of outside bytes: each target of
//! `falaj_common::fuzzing::targets` (the bodies the cargo-fuzz binaries in `fuzz/` run)
//! gets its seeds (the committed corpus in `fuzz/seeds/TARGET/`, the golden files, and
//! valid encodings made by the project's own code) and a fixed number of seeded mutants.
//! No input may panic, hold more than a bounded number of bytes at once, or break a round
//! trip. `FALAJ_FUZZ_ITERATIONS=N` runs N mutants per target instead (a longer run on a
//! bench), `FALAJ_FUZZ_SEED=S` other mutants; `FALAJ_BLESS=1` rewrites the generated
//! seeds (`gen-*`) of the committed corpus.

use std::path::PathBuf;

use falaj_common::fuzzing::{Campaign, seeds, targets};
use falaj_common::protocol::{self, AgentMessage, ControlMessage};
use falaj_common::random::SeededRng;

fn peak(run: &mut dyn FnMut()) -> u64 {
    allocation_counter::measure(run).bytes_max
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A campaign over the committed corpus of `name` and the `generated` seeds
/// (`Campaign::committed`), its memory measured.
fn campaign(
    name: &str,
    iterations: u64,
    generated: &[Vec<u8>],
    body: fn(&[u8]) -> bool,
) -> Campaign {
    Campaign::new(name, iterations)
        .committed(&root().join("fuzz/seeds").join(name), generated, body)
        .memory(peak, 32 << 20)
}

fn golden(name: &str) -> Vec<u8> {
    std::fs::read(root().join("common/tests/data/golden").join(name)).unwrap()
}

#[test]
fn bundle_verify() {
    let bundle = golden("bundle-v1.falaj");
    assert!(targets::bundle_verify(&bundle), "the golden bundle verifies");
    campaign("bundle_verify", 20000, &[bundle], targets::bundle_verify)
        .seed(golden("manifest-v1.json"))
        .run(targets::bundle_verify);
}

#[test]
fn bundle_resigned() {
    let bundle = golden("bundle-v1.falaj");
    campaign("bundle_resigned", 3000, &[bundle], targets::bundle_resigned)
        .corpus(&root().join("fuzz/seeds/bundle_verify"))
        .run(targets::bundle_resigned);
}

#[test]
fn trust_root() {
    let generated = [golden("root-v1.json"), targets::trust().to_json()];
    campaign("trust_root", 10000, &generated, targets::trust_root).run(targets::trust_root);
}

#[test]
fn feature_view() {
    campaign("feature_view", 20000, &seeds::feature_texts(), targets::feature_view)
        .run(targets::feature_view);
}

#[test]
fn protocol_frames() {
    campaign("protocol_frames", 20000, &seeds::protocol_frames(), targets::protocol_frames)
        .run(targets::protocol_frames);
}

#[test]
fn generated_protocol_messages_decode_to_themselves() {
    let mut rng = SeededRng::new(11);
    for _ in 0..40 {
        for message in seeds::agent_messages(&mut rng) {
            let frame = protocol::encode(&message);
            assert_eq!(protocol::frame_len(frame[..4].try_into().unwrap()), Ok(frame.len() - 4));
            assert_eq!(protocol::decode::<AgentMessage>(&frame[4..]), Ok(message));
        }
        for message in seeds::control_messages(&mut rng) {
            let frame = protocol::encode(&message);
            assert_eq!(protocol::decode::<ControlMessage>(&frame[4..]), Ok(message));
        }
        let window = seeds::window(&mut rng);
        let bytes = postcard::to_stdvec(&window).unwrap();
        assert_eq!(
            postcard::from_bytes::<falaj_common::metrics::MetricsWindow>(&bytes),
            Ok(window)
        );
    }
}

#[test]
fn desired_state() {
    campaign("desired_state", 1500, &seeds::desired_documents(), targets::desired_state)
        .run(targets::desired_state);
}

#[test]
fn metrics_window() {
    campaign("metrics_window", 20000, &seeds::metrics_windows(), targets::metrics_window)
        .run(targets::metrics_window);
}

#[test]
fn audit_chain() {
    campaign("audit_chain", 2000, &seeds::audit_exports(), targets::audit_chain)
        .run(targets::audit_chain);
}

#[test]
fn recipe() {
    campaign("recipe", 20000, &seeds::recipes(), targets::recipe).run(targets::recipe);
}

#[test]
fn sealed_file() {
    let generated: Vec<Vec<u8>> = vec![vec![], vec![7; 16], (0..=255).collect()];
    campaign("sealed_file", 5000, &generated, targets::sealed_file).run(targets::sealed_file);
}

#[test]
fn enrollment_token() {
    campaign("enrollment_token", 20000, &seeds::enrollment_tokens(), targets::enrollment_token)
        .run(targets::enrollment_token);
}

#[test]
fn rollout_terms() {
    campaign("rollout_terms", 20000, &seeds::rollout_terms(), targets::rollout_terms)
        .run(targets::rollout_terms);
}

#[test]
fn snapshot_payload() {
    campaign("snapshot_payload", 20000, &seeds::snapshot_payloads(), targets::snapshot_payload)
        .run(targets::snapshot_payload);
}

#[test]
fn finetune_inputs() {
    let mut generated = seeds::job_files();
    generated.extend(seeds::onnx_models());
    campaign("finetune_inputs", 10000, &generated, targets::finetune_inputs)
        .run(targets::finetune_inputs);
}

#[test]
fn onnx_model() {
    // tract plans and runs each model that loads: the slowest target by far.
    campaign("onnx_model", 300, &seeds::onnx_models(), targets::onnx_model)
        .memory(peak, 256 << 20)
        .run(targets::onnx_model);
}
