//! Valid inputs for the fuzz targets of [`super::targets`], made by the project's own
//! encoders: seeds that start the mutator deep inside each format, and values whose round
//! trip the stable tests check. Seeded: the same call gives the same bytes.

use serde_json::json;

use super::targets::{AGENT, NOW, REGION, signing_key, trust};
use crate::audit::{Chain, Checkpoint, GENESIS, Outcome};
use crate::chunking::Recipe;
use crate::desired::{DesiredBundle, DesiredState};
use crate::enrollment::EnrollmentToken;
use crate::finetune::{DesiredJob, Job, JobReport, JobState};
use crate::keys::Sha256;
use crate::metrics::{Counts, Feedback, MetricsWindow, Shadow};
use crate::protocol::{
    self, ActualState, AgentMessage, ChunkHeader, ControlMessage, EngineReport, EnrollRequest,
    EnrollResponse, Enrollment, FetchRequest, HeldBundle, SequencedWindow,
};
use crate::random::SeededRng;
use crate::rollout::{RolloutReport, RolloutSpec, Share, Step, Strategy};
use crate::sketch::LatencySketch;
use crate::time::Timestamp;

/// Text that stretches decoders: empty, non-ASCII, control characters, quotes.
fn text(rng: &mut SeededRng) -> String {
    const PIECES: [&str; 8] = ["fault", "", "é\u{1f600}", "\u{1b}[31m", "\"q\"", "a\nb", "x", "0"];
    (0..rng.below(4)).map(|_| PIECES[rng.below(PIECES.len())]).collect()
}

fn number(rng: &mut SeededRng) -> u64 {
    [0, 1, 7, 255, 1 << 20, u64::from(u32::MAX), u64::MAX][rng.below(7)]
}

fn hash(rng: &mut SeededRng) -> Sha256 {
    Sha256([rng.below(256) as u8; 32])
}

/// A metric window with random counts (one input and one output histogram, as the fixed
/// reference profile has); `valid` keeps it within what `check` accepts.
pub fn window(rng: &mut SeededRng) -> MetricsWindow {
    let mut latency = LatencySketch::default();
    for _ in 0..rng.below(50) {
        latency.record(rng.range(1.0, 1e7));
    }
    let histogram = |rng: &mut SeededRng, bins: usize| (0..bins).map(|_| number(rng)).collect();
    MetricsWindow {
        model: ["fault", "pumps", "a-b.c_d"][rng.below(3)].to_owned(),
        version: number(rng),
        start: Timestamp::from_unix(NOW - rng.below(100_000) as u64),
        seconds: [1, 60, 86_400][rng.below(3)],
        counts: Counts {
            requests: number(rng),
            errors: number(rng),
            latency,
            rows: number(rng),
            inputs: vec![histogram(rng, 6)],
            outputs: vec![histogram(rng, 12)],
            dropped_windows: number(rng),
            dropped_requests: number(rng),
            feedback: Feedback {
                labelled: number(rng),
                correct: 1,
                abs_error: rng.range(0.0, 9.0),
            },
            shadow: Shadow { compared: number(rng), agreed: 0, dropped: 3 },
        },
    }
}

/// Metric windows as agents encode them (postcard).
pub fn metrics_windows() -> Vec<Vec<u8>> {
    let mut rng = SeededRng::new(1);
    (0..8).map(|_| postcard::to_stdvec(&window(&mut rng)).expect("encodes")).collect()
}

const JOB: &str = "model = \"pumps\"\nengine = \"cpu\"\n[data]\nfile = \"site.csv\"\n\
                   label = \"label\"\nfeatures = [\"a\", \"b\"]\n[hyperparameters]\n\
                   max_epochs = 5\n[gate]\nmin_improvement = 0.01\n";

/// Fine-tune job files (TOML).
pub fn job_files() -> Vec<Vec<u8>> {
    vec![
        JOB.as_bytes().to_vec(),
        b"model = \"fault\"\nversion = 2\n[data]\nfile = \"d.parquet\"\nlabel = \"y\"\n\
          entity = \"pump_id\"\n"
            .to_vec(),
    ]
}

fn rollout() -> RolloutSpec {
    let step = |at, percent| Step {
        at: Timestamp::from_unix(at),
        share: Share::from_percent(percent).expect("a valid share"),
    };
    RolloutSpec {
        id: "ro-1".into(),
        model: "fault".into(),
        baseline: 2,
        candidate: 3,
        strategy: Strategy::Canary,
        steps: vec![step(NOW, 5.0), step(NOW + 600, 50.0)],
        mirror: Share::NONE,
        guards: ["error_rate<0.02", "p99_ms<=baseline*1.5"]
            .iter()
            .map(|g| g.parse().expect("a valid guard"))
            .collect(),
        min_requests: 100,
    }
}

/// A valid document for the fixed agent, version `version`, with bundles, a job and a
/// rollout.
pub fn desired(version: u64) -> DesiredState {
    let bundle = |version, activate| DesiredBundle {
        name: "fault".into(),
        version,
        manifest_sha256: Sha256([1; 32]),
        bundle_sha256: Sha256([2; 32]),
        size: 1000,
        recipe_sha256: Sha256([3; 32]),
        activate,
    };
    DesiredState {
        agent: AGENT.into(),
        region: REGION.into(),
        version,
        issued: Timestamp::from_unix(NOW - 60),
        expires: Timestamp::from_unix(NOW + 3600),
        bundles: vec![bundle(2, true), bundle(3, false)],
        jobs: vec![DesiredJob {
            id: "tune-1".into(),
            job: Job::from_toml(JOB).expect("a valid job"),
            share_weights: true,
        }],
        rollouts: vec![rollout()],
    }
}

/// Desired-state documents (JSON, as signed).
pub fn desired_documents() -> Vec<Vec<u8>> {
    let mut plain = desired(2);
    plain.jobs.clear();
    plain.rollouts.clear();
    [desired(5), plain].iter().map(|d| serde_json::to_vec(d).expect("encodes")).collect()
}

fn actual(rng: &mut SeededRng) -> ActualState {
    ActualState {
        desired_version: Some(number(rng)),
        bundles: vec![HeldBundle {
            name: text(rng),
            version: number(rng),
            manifest_sha256: hash(rng),
            active: true,
            managed: rng.below(2) == 0,
            engine: Some("tract-cpu".into()),
        }],
        errors: vec![text(rng)],
        ready: rng.below(2) == 0,
        agent_version: "0.1.0".into(),
        jobs: vec![
            JobReport::failed("tune-1", text(rng)),
            JobReport::state("t", JobState::Running),
        ],
        rollouts: vec![RolloutReport {
            id: "ro-1".into(),
            step: Some(1),
            rolled_back: false,
            reason: None,
            at: Some(Timestamp::from_unix(NOW)),
        }],
        engines: vec![EngineReport { name: "tract-cpu".into(), device: text(rng) }],
        trust_version: number(rng),
    }
}

/// Messages agents send, with random fields.
pub fn agent_messages(rng: &mut SeededRng) -> Vec<AgentMessage> {
    vec![
        AgentMessage::Hello(actual(rng)),
        AgentMessage::Report(ActualState::default()),
        AgentMessage::Renew { csr_der: text(rng).into_bytes() },
        AgentMessage::Windows(vec![SequencedWindow { seq: number(rng), window: window(rng) }]),
        AgentMessage::Audit(audit_lines().into_iter().take(3).collect()),
    ]
}

/// Messages the control plane sends, with random fields.
pub fn control_messages(rng: &mut SeededRng) -> Vec<ControlMessage> {
    vec![
        ControlMessage::Desired(desired(5).sign(&[&signing_key()])),
        ControlMessage::Renewed {
            certificate_der: text(rng).into_bytes(),
            expires: Timestamp::from_unix(NOW + number(rng) % 1_000_000),
        },
        ControlMessage::Refused(text(rng)),
        ControlMessage::Ack { seqs: vec![number(rng), 2, 3] },
        ControlMessage::AuditAck { seq: number(rng) },
        ControlMessage::TrustRoots(vec![String::from_utf8_lossy(&trust().to_json()).into_owned()]),
    ]
}

/// The enrollment exchange and fetch messages, with random fields.
pub fn other_messages(rng: &mut SeededRng) -> Vec<Vec<u8>> {
    let body = |frame: Vec<u8>| frame[4..].to_vec();
    let token = text(rng);
    vec![
        body(protocol::encode(&EnrollRequest {
            token,
            csr_der: vec![0x30, 0x82, 1, 2],
            hostname: text(rng),
            agent_version: "0.1.0".into(),
        })),
        body(protocol::encode(&EnrollResponse::Enrolled(Enrollment {
            agent_id: AGENT.into(),
            region: REGION.into(),
            group: "edge".into(),
            certificate_der: vec![0x30; 8],
            certificate_expires: Timestamp::from_unix(NOW),
            ca_der: vec![0x30; 8],
            trust_root: trust().to_json(),
        }))),
        body(protocol::encode(&EnrollResponse::Refused(text(rng)))),
        body(protocol::encode(&FetchRequest { hashes: vec![hash(rng), hash(rng)] })),
        body(protocol::encode(&ChunkHeader { sha256: hash(rng), size: Some(5) })),
        body(protocol::encode(&ChunkHeader { sha256: hash(rng), size: None })),
    ]
}

/// Frame bodies of every message type (no length prefix).
pub fn protocol_frames() -> Vec<Vec<u8>> {
    let mut rng = SeededRng::new(2);
    let body = |frame: Vec<u8>| frame[4..].to_vec();
    let mut out: Vec<Vec<u8>> =
        agent_messages(&mut rng).iter().map(|m| body(protocol::encode(m))).collect();
    out.extend(control_messages(&mut rng).iter().map(|m| body(protocol::encode(m))));
    out.extend(other_messages(&mut rng));
    out
}

/// An audit export of 6 entries, checkpoints after the fourth and the last, signed with
/// the fixed signing key.
pub fn audit_lines() -> Vec<String> {
    let key = signing_key();
    let mut chain = Chain::at(0, GENESIS);
    let mut lines = Vec::new();
    for i in 1..=6u64 {
        let details = json!({"version": i, "note": "é", "nested": {"list": [1, null, "x"]}});
        let source = (i % 2 == 0).then_some("127.0.0.1");
        let outcome = [Outcome::Success, Outcome::Failure, Outcome::Refused][i as usize % 3];
        let at = Timestamp::from_unix(NOW + i);
        let (_, line) =
            chain.append(at, "user:alice", source, "deploy", "fault@1 to edge", outcome, details);
        lines.push(line);
        if i == 4 || i == 6 {
            lines
                .push(Checkpoint::sign(i, chain.head, Timestamp::from_unix(NOW + 99), &key).line());
        }
    }
    lines
}

/// Audit exports: the whole chain, and one that starts at an anchor.
pub fn audit_exports() -> Vec<Vec<u8>> {
    let lines = audit_lines();
    vec![lines.join("\n").into_bytes(), lines[4..].join("\n").into_bytes()]
}

/// Chunk recipes of a few files.
pub fn recipes() -> Vec<Vec<u8>> {
    let mut rng = SeededRng::new(3);
    [0usize, 10, 300_000]
        .iter()
        .map(|&n| {
            let bytes: Vec<u8> = (0..n).map(|_| rng.below(256) as u8).collect();
            Recipe::of(&bytes).encode()
        })
        .collect()
}

/// Enrollment tokens as text.
pub fn enrollment_tokens() -> Vec<Vec<u8>> {
    let token = EnrollmentToken {
        id: [7; 16],
        secret: [9; 32],
        region: REGION.into(),
        group: "edge".into(),
        ca_sha256: Sha256([3; 32]),
        expires: Timestamp::from_unix(NOW),
    };
    vec![token.to_string().into_bytes()]
}

/// Guards, shares and a rollout's JSON.
pub fn rollout_terms() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = [
        "error_rate<0.02",
        "p99_ms <= baseline*1.5",
        "accuracy >= baseline - 0.02",
        "agreement>0.9",
        "5",
        " 12.5% ",
        "100",
    ]
    .iter()
    .map(|t| t.as_bytes().to_vec())
    .collect();
    out.push(serde_json::to_vec(&rollout()).expect("encodes"));
    out
}

/// Feature view declarations and filters over the fixed view.
pub fn feature_texts() -> Vec<Vec<u8>> {
    [
        super::targets::VIEW,
        "mode == \"auto\" and temperature > 0.5",
        "pump_id in (\"p-1\", \"p-2\")",
        "temperature <= -3e2 and mode != \"manual\"",
    ]
    .iter()
    .map(|t| t.as_bytes().to_vec())
    .collect()
}

/// Snapshot payloads of the fixed view: the entity count byte, then the payload.
#[cfg(feature = "snapshots")]
pub fn snapshot_payloads() -> Vec<Vec<u8>> {
    use crate::features::{Key, SnapshotWriter, Treatment, Value};
    let view = super::targets::view();
    let payload = |rows: &[(&str, Value, Value)]| {
        let treatments = vec![Treatment::Raw; view.features.len()];
        let spec = super::targets::snapshot_spec().clone();
        let mut writer =
            SnapshotWriter::new(view, spec, treatments, None, Vec::new()).expect("writes");
        for (i, (key, t, mode)) in rows.iter().enumerate() {
            let values = vec![t.clone(), mode.clone()];
            writer.push(Key::Str((*key).into()), i as i64, values).expect("in order");
        }
        let (spec, mut bytes) = writer.finish();
        bytes.insert(0, spec.entities as u8);
        bytes
    };
    let auto = || Value::Str("auto".into());
    vec![
        payload(&[]),
        payload(&[("pump-1", Value::F32(21.5), auto())]),
        payload(&[
            ("pump-1", Value::Null, Value::Str("manual".into())),
            ("pump-2", Value::F32(-1.0), auto()),
            ("pump-3", Value::F32(f32::MAX), auto()),
        ]),
    ]
}

/// Small models made by the project's own writers.
#[cfg(feature = "onnx")]
pub fn onnx_models() -> Vec<Vec<u8>> {
    use crate::onnx::zoo;
    vec![zoo::mlp(&[2, 3], 1), zoo::mlp(&[4, 8, 3], 2), zoo::mlp(&[1, 1], 3)]
}
