//! Golden files pin the on-disk and on-wire formats: a manifest's canonical JSON, a signed
//! trust root and a signed bundle, made from fixed keys and times; and every protocol
//! message either side sends, desired-state documents, metric windows and feature snapshot
//! payloads, as the fuzz seeds make them (fixed seeds, keys and times). The committed
//! wire files must still decode, to the same bytes: what an agent of the release that
//! wrote them sends, this build reads. If one of these tests
//! fails, a format changed: bump its version and keep reading the old one, or, for a
//! deliberate change before any release, regenerate with `FALAJ_BLESS=1 cargo test -p
//! falaj-common --test golden`.

use std::path::PathBuf;

use falaj_common::bundle::{
    self, BundleBuilder, Content, Manifest, ModelFormat, ModelSpec, Policy, RuntimeHint,
};
use falaj_common::desired::DesiredState;
use falaj_common::fuzzing::seeds;
use falaj_common::keys::SigningKey;
use falaj_common::metrics::MetricsWindow;
use falaj_common::profile::ColumnProfile;
use falaj_common::profile::DataProfile;
use falaj_common::protocol::{self, AgentMessage, ControlMessage};
use falaj_common::random::SeededRng;
use falaj_common::tensor::{DataType, Dim, Signature, TensorSpec};
use falaj_common::time::Timestamp;
use falaj_common::trust::{RootSpec, TrustRoot};

const CREATED: u64 = 1_796_000_000; // 2026-11-30
const EXPIRES: u64 = 4_102_444_800; // 2100-01-01

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name)
}

/// Compares `bytes` with the golden file, or rewrites it under `FALAJ_BLESS=1`.
fn check(name: &str, bytes: &[u8]) {
    let path = golden(name);
    if std::env::var_os("FALAJ_BLESS").is_some() {
        std::fs::write(&path, bytes).unwrap();
        return;
    }
    let expected = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(expected == bytes, "{name} changed; see this file's header");
}

fn fixture() -> (TrustRoot, SigningKey) {
    let root = SigningKey::from_seed(&[1; 32]);
    let signer = SigningKey::from_seed(&[2; 32]);
    let trust = RootSpec {
        version: 1,
        region: "eu-west-1",
        expires: Timestamp::from_unix(EXPIRES),
        root_keys: &[root],
        root_threshold: 1,
        signing_keys: &[signer.public()],
        signing_threshold: 1,
    }
    .sign(&[])
    .unwrap();
    (trust, signer)
}

fn content() -> Content {
    let n = || Dim::Symbol("N".into());
    let values: Vec<f64> = (0..100).map(f64::from).collect();
    Content::Model(ModelSpec {
        file: "model.onnx".into(),
        format: ModelFormat::Onnx,
        runtime: RuntimeHint::Auto,
        signature: Signature {
            inputs: vec![TensorSpec {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![n(), Dim::Fixed(2)],
            }],
            outputs: vec![TensorSpec {
                name: "y".into(),
                datatype: DataType::Int64,
                shape: vec![n(), Dim::Any],
            }],
        },
        reference: Some(DataProfile {
            rows: 100,
            inputs: vec![ColumnProfile::of("x", 0, "feature_a", &values, 4)],
            outputs: vec![ColumnProfile::of("y", 0, "y", &[0.0, 1.0, 1.0], 10)],
        }),
        features: None,
        lineage: None,
        shapes: std::collections::BTreeMap::new(),
    })
}

fn bundle_bytes(signer: &SigningKey) -> (Manifest, Vec<u8>) {
    BundleBuilder::new(
        "golden",
        7,
        "eu-west-1",
        Timestamp::from_unix(CREATED),
        Timestamp::from_unix(EXPIRES),
        content(),
    )
    .file("model.onnx", b"model bytes".to_vec())
    .file("assets/labels.txt", b"a\nb\n".to_vec())
    .build(&[signer])
    .unwrap()
}

#[test]
fn formats_are_pinned() {
    let (trust, signer) = fixture();
    check("root-v1.json", &trust.to_json());
    let (manifest, bytes) = bundle_bytes(&signer);
    check("manifest-v1.json", &manifest.to_bytes());
    check("bundle-v1.falaj", &bytes);
}

#[test]
fn committed_v1_files_still_verify() {
    let root = std::fs::read(golden("root-v1.json")).unwrap();
    let now = Timestamp::from_unix(CREATED + 60).to_system();
    let trust = TrustRoot::from_json(&root, now).unwrap();
    let bytes = std::fs::read(golden("bundle-v1.falaj")).unwrap();
    let verified = bundle::verify(&bytes, &trust, &Policy::new("eu-west-1", now)).unwrap();
    assert_eq!(verified.manifest.name, "golden");
    assert_eq!(verified.manifest.version, 7);
    assert_eq!(verified.file("assets/labels.txt"), Some(&b"a\nb\n"[..]));
    assert_eq!(verified.manifest.content, content());
}

/// `items` as one file: each with its 4-byte big-endian length first.
fn framed(items: &[Vec<u8>]) -> Vec<u8> {
    items.iter().flat_map(|i| (i.len() as u32).to_be_bytes().into_iter().chain(i.clone())).collect()
}

/// The items of a [`framed`] file.
fn unframed(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut items = Vec::new();
    while let Some((len, rest)) = bytes.split_first_chunk::<4>() {
        let (item, rest) = rest.split_at(u32::from_be_bytes(*len) as usize);
        items.push(item.to_vec());
        bytes = rest;
    }
    items
}

fn agent_messages() -> Vec<Vec<u8>> {
    let mut rng = SeededRng::new(7);
    seeds::agent_messages(&mut rng).iter().map(|m| protocol::encode(m)[4..].to_vec()).collect()
}

fn control_messages() -> Vec<Vec<u8>> {
    let mut rng = SeededRng::new(7);
    seeds::control_messages(&mut rng).iter().map(|m| protocol::encode(m)[4..].to_vec()).collect()
}

#[test]
fn wire_formats_are_pinned() {
    check("agent-messages-v1.bin", &framed(&agent_messages()));
    check("control-messages-v1.bin", &framed(&control_messages()));
    check("enrollment-and-fetch-v1.bin", &framed(&seeds::other_messages(&mut SeededRng::new(7))));
    check("desired-v1.bin", &framed(&seeds::desired_documents()));
    check("metrics-windows-v1.bin", &framed(&seeds::metrics_windows()));
    check("snapshot-payloads-v1.bin", &framed(&seeds::snapshot_payloads()));
}

/// Decodes every committed item as `T` and requires that it encodes back to the same bytes.
fn round_trips<T>(name: &str, decode: impl Fn(&[u8]) -> T, encode: impl Fn(&T) -> Vec<u8>) {
    let items = unframed(&std::fs::read(golden(name)).unwrap());
    assert!(!items.is_empty(), "{name} holds nothing");
    for (i, item) in items.iter().enumerate() {
        assert!(encode(&decode(item)) == *item, "{name}: item {i} does not round-trip");
    }
}

#[test]
fn committed_wire_files_still_decode_to_the_same_bytes() {
    let body = |frame: Vec<u8>| frame[4..].to_vec();
    round_trips(
        "agent-messages-v1.bin",
        |b| protocol::decode::<AgentMessage>(b).unwrap(),
        |m| body(protocol::encode(m)),
    );
    round_trips(
        "control-messages-v1.bin",
        |b| protocol::decode::<ControlMessage>(b).unwrap(),
        |m| body(protocol::encode(m)),
    );
    round_trips(
        "desired-v1.bin",
        |b| serde_json::from_slice::<DesiredState>(b).unwrap(),
        |d| serde_json::to_vec(d).unwrap(),
    );
    round_trips(
        "metrics-windows-v1.bin",
        |b| postcard::from_bytes::<MetricsWindow>(b).unwrap(),
        |w| postcard::to_stdvec(w).unwrap(),
    );
}
