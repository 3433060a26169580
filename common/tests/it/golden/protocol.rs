//! The QUIC protocol, pinned at its version (the `/1` of both ALPN names): every message
//! either side sends on a session, the enrollment exchange and the fetch stream's
//! messages, each as the whole frame that travels (length prefix included); the
//! desired-state documents (the signed JSON bytes, and the signed form as it travels and
//! is stored), metric windows and chunk recipes, under `protocol-v1/`.
//!
//! The agent side's files are also what the root package's compatibility test
//! (`tests/it/compat.rs`) replays, byte for byte, against a running control plane: they are
//! what an agent of this protocol version sends.

use std::fmt::Debug;

use falaj_common::chunking::Recipe;
use falaj_common::desired::{DesiredState, Expectation, SignedDesired};
use falaj_common::enrollment::EnrollmentToken;
use falaj_common::finetune::{JobReport, JobState};
use falaj_common::fuzzing::{seeds, targets};
use falaj_common::keys::Sha256;
use falaj_common::metrics::{Counts, Feedback, MetricsWindow, Shadow};
use falaj_common::protocol::{
    self, ALPN_AGENT, ALPN_ENROLL, ActualState, AgentMessage, ChunkHeader, ControlMessage,
    EngineReport, EnrollRequest, EnrollResponse, Enrollment, FetchRequest, FrameError, HeldBundle,
    SequencedWindow,
};
use falaj_common::random::SeededRng;
use falaj_common::rollout::RolloutReport;
use falaj_common::sketch::LatencySketch;
use falaj_common::time::Timestamp;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Item, check, check_items};

/// The protocol version these files are at: the directory's name and the ALPN's suffix.
const DIR: &str = "protocol-v1";
const NOW: u64 = targets::NOW;
/// When the windows of the files opened: 2026-11-30, in the past for any control plane
/// that replays them (one ahead of its clock refuses them).
const WINDOW_START: u64 = 1_796_000_000;

fn name(file: &str) -> String {
    format!("{DIR}/{file}")
}

fn held() -> HeldBundle {
    HeldBundle {
        name: "fault".into(),
        version: 2,
        manifest_sha256: Sha256([4; 32]),
        active: true,
        managed: true,
        engine: Some("tract-cpu".into()),
    }
}

/// The state the agent of the files reports: it holds `fault@2`, active.
pub fn actual() -> ActualState {
    ActualState {
        desired_version: Some(4),
        bundles: vec![held(), HeldBundle { version: 1, active: false, engine: None, ..held() }],
        errors: vec!["fetch of fault@3 failed: connection lost (é)".into()],
        ready: true,
        agent_version: "0.9.0".into(),
        jobs: vec![JobReport::state("tune-1", JobState::Running)],
        rollouts: vec![RolloutReport {
            id: "ro-1".into(),
            step: Some(1),
            rolled_back: false,
            reason: None,
            at: Some(Timestamp::from_unix(NOW)),
        }],
        engines: vec![EngineReport {
            name: "tract-cpu".into(),
            device: "x86_64, 8 threads".into(),
        }],
        trust_version: 1,
    }
}

/// A closed window of `fault@2`.
pub fn window(requests: u64) -> MetricsWindow {
    let mut latency = LatencySketch::default();
    for micros in [120.0, 950.0, 950.0, 15_000.0] {
        latency.record(micros);
    }
    MetricsWindow {
        model: "fault".into(),
        version: 2,
        start: Timestamp::from_unix(WINDOW_START),
        seconds: 60,
        counts: Counts {
            requests,
            errors: 1,
            latency,
            rows: requests * 2,
            inputs: vec![vec![0, 3, 5, 0]],
            outputs: vec![vec![6, 2]],
            dropped_windows: 0,
            dropped_requests: 0,
            feedback: Feedback { labelled: 2, correct: 1, abs_error: 0.5 },
            shadow: Shadow { compared: 4, agreed: 3, dropped: 0 },
        },
    }
}

/// Every message an agent sends on its session stream, in the order of a session.
pub fn agent_messages() -> Vec<(&'static str, AgentMessage)> {
    let windows = vec![
        SequencedWindow { seq: 1, window: window(8) },
        SequencedWindow { seq: 2, window: window(0) },
    ];
    vec![
        ("Hello", AgentMessage::Hello(actual())),
        ("Windows", AgentMessage::Windows(windows)),
        // The first three entries of a chain (no checkpoint among them).
        ("Audit", AgentMessage::Audit(seeds::audit_lines().into_iter().take(3).collect())),
        ("Renew", AgentMessage::Renew { csr_der: vec![0x30, 0x82, 0x01, 0x0a, 0x02, 0x01, 0x00] }),
        ("Report", AgentMessage::Report(ActualState { desired_version: Some(5), ..actual() })),
        ("Report (empty)", AgentMessage::Report(ActualState::default())),
    ]
}

/// Every message the control plane sends on a session stream.
pub fn control_messages() -> Vec<(&'static str, ControlMessage)> {
    let root = String::from_utf8(targets::trust().to_json()).expect("JSON is text");
    vec![
        ("TrustRoots", ControlMessage::TrustRoots(vec![root])),
        ("Desired", ControlMessage::Desired(signed_desired())),
        (
            "Renewed",
            ControlMessage::Renewed {
                certificate_der: vec![0x30, 0x82, 0x02, 0x10],
                expires: Timestamp::from_unix(NOW + 86_400),
            },
        ),
        ("Refused", ControlMessage::Refused("renewal refused: not a CSR".into())),
        ("Ack", ControlMessage::Ack { seqs: vec![1, 2] }),
        ("AuditAck", ControlMessage::AuditAck { seq: 3 }),
    ]
}

/// The enrollment token of the files.
pub fn token() -> EnrollmentToken {
    EnrollmentToken {
        id: [7; 16],
        secret: [9; 32],
        region: targets::REGION.into(),
        group: "edge".into(),
        ca_sha256: Sha256([3; 32]),
        expires: Timestamp::from_unix(NOW + 3600),
    }
}

fn enrollment_request() -> EnrollRequest {
    EnrollRequest {
        token: token().to_string(),
        csr_der: vec![0x30, 0x82, 0x01, 0x0b],
        hostname: "pump-station-7".into(),
        agent_version: "0.9.0".into(),
    }
}

fn enrollment_responses() -> Vec<(&'static str, EnrollResponse)> {
    let enrolled = Enrollment {
        agent_id: targets::AGENT.into(),
        region: targets::REGION.into(),
        group: "edge".into(),
        certificate_der: vec![0x30, 0x82, 0x02, 0x11],
        certificate_expires: Timestamp::from_unix(NOW + 86_400),
        ca_der: vec![0x30, 0x82, 0x01, 0x9c],
        trust_root: targets::trust().to_json(),
    };
    vec![
        ("Enrolled", EnrollResponse::Enrolled(enrolled)),
        ("Refused", EnrollResponse::Refused("the token has expired".into())),
    ]
}

/// The desired-state document of the files (bundles, a job and a rollout), and one
/// without the optional parts.
fn documents() -> Vec<(&'static str, DesiredState)> {
    let mut plain = seeds::desired(2);
    plain.jobs.clear();
    plain.rollouts.clear();
    vec![("desired.json", seeds::desired(5)), ("desired-plain.json", plain)]
}

fn signed_desired() -> SignedDesired {
    seeds::desired(5).sign(&[&targets::signing_key()])
}

/// Pins `values` as the frames in `file`, then decodes each committed frame (prefix and
/// body) and requires its value.
fn pin_frames<T>(file: &str, title: &str, values: &[(&str, T)])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let items: Vec<Item> =
        values.iter().map(|(label, value)| Item::new(*label, protocol::encode(value))).collect();
    let committed = check_items(&name(file), title, &items);
    for (item, (label, value)) in committed.iter().zip(values) {
        let (prefix, body) = item.bytes.split_first_chunk::<4>().expect("a frame has a prefix");
        assert_eq!(protocol::frame_len(*prefix), Ok(body.len()), "{file} [{label}]: its length");
        let decoded: T = protocol::decode(body)
            .unwrap_or_else(|e| panic!("{file} [{label}]: the committed frame: {e}"));
        assert_eq!(
            &decoded, value,
            "{file} [{label}]: the committed frame decodes to another value"
        );
    }
}

/// Pins `values` as postcard items in `file`; each committed item decodes to its value.
fn pin_postcard<T>(file: &str, title: &str, values: &[(&str, T)])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let items: Vec<Item> = values
        .iter()
        .map(|(label, value)| Item::new(*label, postcard::to_stdvec(value).unwrap()))
        .collect();
    let committed = check_items(&name(file), title, &items);
    for (item, (label, value)) in committed.iter().zip(values) {
        let decoded: T = postcard::from_bytes(&item.bytes)
            .unwrap_or_else(|e| panic!("{file} [{label}]: the committed item: {e}"));
        assert_eq!(&decoded, value, "{file} [{label}]: decodes to another value");
    }
}

#[test]
fn the_directory_is_named_by_the_alpn_version() {
    // Agents and the control plane agree on the protocol by ALPN alone: a change that
    // breaks these files needs new names (`/2`), and a `protocol-v2/` beside this one.
    assert_eq!(ALPN_AGENT, b"falaj-agent/1");
    assert_eq!(ALPN_ENROLL, b"falaj-enroll/1");
    assert!(DIR.ends_with(&String::from_utf8_lossy(ALPN_AGENT)["falaj-agent/".len()..]));
}

#[test]
fn agent_frames_are_pinned() {
    let title = "AgentMessage frames, agent to control plane on the session stream (ALPN falaj-agent/1):\n\
                 4-byte big-endian length, then postcard. Made by common/tests/it/golden/protocol.rs.";
    pin_frames("agent-messages.hex", title, &agent_messages());
}

#[test]
fn control_frames_are_pinned() {
    let title = "ControlMessage frames, control plane to agent on the session stream (ALPN falaj-agent/1):\n\
                 4-byte big-endian length, then postcard. Made by common/tests/it/golden/protocol.rs.";
    pin_frames("control-messages.hex", title, &control_messages());
}

#[test]
fn enrollment_and_fetch_frames_are_pinned() {
    let title = "Enrollment frames (ALPN falaj-enroll/1): the agent's request, then each answer.\n\
                 Made by common/tests/it/golden/protocol.rs.";
    pin_frames("enroll-request.hex", title, &[("EnrollRequest", enrollment_request())]);
    pin_frames("enroll-response.hex", title, &enrollment_responses());
    let title = "Fetch stream frames (ALPN falaj-agent/1): the agent's request, then a header per\n\
                 blob (its bytes follow raw). Made by common/tests/it/golden/protocol.rs.";
    let request = FetchRequest { hashes: vec![Sha256([5; 32]), Sha256([6; 32])] };
    pin_frames("fetch-request.hex", title, &[("FetchRequest", request)]);
    let headers = [
        ("ChunkHeader (held)", ChunkHeader { sha256: Sha256([5; 32]), size: Some(262_144) }),
        ("ChunkHeader (not held)", ChunkHeader { sha256: Sha256([6; 32]), size: None }),
    ];
    pin_frames("fetch-headers.hex", title, &headers);
}

#[test]
fn desired_documents_are_pinned_unsigned_and_signed() {
    for (file, document) in documents() {
        check(&name(file), &serde_json::to_vec(&document).unwrap());
        let committed = std::fs::read(super::path(&name(file))).unwrap();
        let decoded: DesiredState = serde_json::from_slice(&committed).unwrap();
        assert_eq!(decoded, document, "{file}");
    }
    let title = "A signed desired-state document as it travels in ControlMessage::Desired and is\n\
                 stored by the control plane: postcard of the JSON bytes and their signatures.";
    pin_postcard("desired-signed.hex", title, &[("SignedDesired", signed_desired())]);
    // The committed signed form still verifies under the fixed trust root.
    let item = &super::items(&name("desired-signed.hex"))[0];
    let signed: SignedDesired = postcard::from_bytes(&item.bytes).unwrap();
    let expect = Expectation {
        agent: targets::AGENT,
        region: targets::REGION,
        accepted: Some(4),
        now: Timestamp::from_unix(NOW).to_system(),
    };
    assert_eq!(signed.verify(targets::trust(), &expect).unwrap(), seeds::desired(5));
}

#[test]
fn metric_windows_and_recipes_are_pinned() {
    let title = "Metric windows as agents encode them (postcard), inside AgentMessage::Windows.";
    pin_postcard("metrics-windows.hex", title, &[("8 requests", window(8)), ("idle", window(0))]);
    let mut rng = SeededRng::new(3);
    let file: Vec<u8> = (0..1_200_000).map(|_| rng.below(256) as u8).collect();
    let recipe = Recipe::of(&file);
    assert!(recipe.chunks.len() > 1, "a recipe of several chunks");
    let title =
        "A chunk recipe as agents fetch it (postcard), named by its SHA-256 in desired state.";
    let committed =
        check_items(&name("recipe.hex"), title, &[Item::new("Recipe", recipe.encode())]);
    let bytes = &committed[0].bytes;
    assert_eq!(Recipe::decode(bytes, Sha256::of(bytes)).unwrap(), recipe);
}

/// What postcard does with a message of an older shape: it has no field names or
/// lengths, so a struct missing a trailing field (as an agent built before `engines` and
/// `trust_version` were added to its report would send it) does not decode, whatever
/// `#[serde(default)]` says. Adding a field to a protocol message is a format change.
#[test]
fn a_report_without_its_newer_fields_is_refused() {
    #[derive(Serialize)]
    enum OldAgentMessage {
        Hello(OldState),
    }
    #[derive(Serialize)]
    struct OldState {
        desired_version: Option<u64>,
        bundles: Vec<HeldBundle>,
        errors: Vec<String>,
        ready: bool,
        agent_version: String,
        jobs: Vec<JobReport>,
        rollouts: Vec<RolloutReport>,
    }
    let now = actual();
    let old = OldAgentMessage::Hello(OldState {
        desired_version: now.desired_version,
        bundles: now.bundles,
        errors: now.errors,
        ready: now.ready,
        agent_version: now.agent_version,
        jobs: now.jobs,
        rollouts: now.rollouts,
    });
    let frame = protocol::encode(&old);
    assert!(matches!(protocol::decode::<AgentMessage>(&frame[4..]), Err(FrameError::Malformed(_))));
}
