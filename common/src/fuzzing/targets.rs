//! The fuzz targets of `common`'s decoders: one body per target, called by the cargo-fuzz
//! binaries in `fuzz/` and by the stable campaign in `common/tests/it/fuzz.rs`. Each takes any
//! bytes, panics only on a bug (a decoder's panic, or a broken round trip), and returns
//! whether the decoder accepted the input.
//!
//! Round-trip stability: where a type has an encoder, an accepted input is re-encoded and
//! decoded again, and the second encoding must equal the first (a fixpoint; comparing
//! encodings rather than values keeps NaN out of the way).

use std::fmt::Debug;
use std::sync::OnceLock;
use std::time::SystemTime;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::audit::{self, Entry};
use crate::bundle::{self, Policy};
use crate::chunking::Recipe;
use crate::desired::{DesiredState, Expectation};
use crate::enrollment::EnrollmentToken;
use crate::features::{FeatureView, Filter};
use crate::finetune::Job;
use crate::keys::{Sha256, SigningKey};
use crate::metrics::{MetricsWindow, Rollup};
use crate::profile::{ColumnProfile, DataProfile};
use crate::protocol::{
    self, AgentMessage, ChunkHeader, ControlMessage, EnrollRequest, EnrollResponse, FetchRequest,
};
use crate::rollout::{Guard, RolloutSpec, Share};
use crate::time::Timestamp;
use crate::trust::{RootSpec, TrustRoot};

/// The time every target checks expiry against (2027-01-15).
pub const NOW: u64 = 1_800_000_000;
/// The region of the fixed trust root.
pub const REGION: &str = "eu-west-1";
/// The agent desired-state documents are checked for.
pub const AGENT: &str = "agent-1";

/// The key that signs the fixed trust root (the golden files' root key).
pub fn root_key() -> SigningKey {
    SigningKey::from_seed(&[1; 32])
}

/// The key of the fixed trust root's signing role (the golden files' signer), which also
/// signs desired state and audit checkpoints here.
pub fn signing_key() -> SigningKey {
    SigningKey::from_seed(&[2; 32])
}

/// The fixed trust root: the golden files' (`common/tests/data/golden/root-v1.json`).
pub fn trust() -> &'static TrustRoot {
    static TRUST: OnceLock<TrustRoot> = OnceLock::new();
    TRUST.get_or_init(|| {
        RootSpec {
            version: 1,
            region: REGION,
            expires: Timestamp::from_unix(4_102_444_800),
            root_keys: &[root_key()],
            root_threshold: 1,
            signing_keys: &[signing_key().public()],
            signing_threshold: 1,
        }
        .sign(&[])
        .expect("fixed root")
    })
}

fn now() -> SystemTime {
    Timestamp::from_unix(NOW).to_system()
}

/// Decodes `bytes` as `T` with `decode`; when it is accepted, checks that its encoding
/// decodes to a value of the same encoding.
fn round_trip<T: Debug, E>(
    bytes: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, E>,
    encode: impl Fn(&T) -> Vec<u8>,
) -> Option<T> {
    let value = decode(bytes).ok()?;
    let first = encode(&value);
    let Ok(again) = decode(&first) else {
        panic!("{value:?} was accepted, but its encoding is refused");
    };
    assert!(encode(&again) == first, "{value:?} re-encodes to {again:?}");
    Some(value)
}

/// A protocol message body (postcard) round trip.
fn frame<T: Serialize + DeserializeOwned + Debug>(body: &[u8]) -> Option<T> {
    round_trip(body, protocol::decode::<T>, |v| protocol::encode(v)[4..].to_vec())
}

/// Any bytes as a `.falaj` bundle, verified against the golden trust root.
pub fn bundle_verify(data: &[u8]) -> bool {
    bundle::verify(data, trust(), &Policy::new(REGION, now())).is_ok()
}

/// Any bytes as a bundle whose manifest is signed again before it is verified: a mutant
/// of a signed bundle otherwise stops at its signature, and the manifest's rules, the
/// payload's files and hashes behind it are never reached. Inputs that are no container
/// are verified as they are.
pub fn bundle_resigned(data: &[u8]) -> bool {
    use crate::bundle::{HEADER_LEN, Header};
    use crate::keys::{Context, SignatureEntry};
    let Ok(header) = Header::parse(data) else { return bundle_verify(data) };
    let manifest_end = HEADER_LEN + header.manifest_len as usize;
    let payload_start = manifest_end + header.signatures_len as usize;
    let (Some(manifest), Some(payload)) =
        (data.get(HEADER_LEN..manifest_end), data.get(payload_start..))
    else {
        return bundle_verify(data);
    };
    let signatures = vec![SignatureEntry::sign(&signing_key(), Context::BundleManifest, manifest)];
    let signatures = serde_json::to_vec(&signatures).expect("signatures serialise");
    let header =
        Header { manifest_len: header.manifest_len, signatures_len: signatures.len() as u32 };
    let bundle = [&header.encode()[..], manifest, &signatures, payload].concat();
    bundle_verify(&bundle)
}

/// Any bytes as `root.json`; one accepted re-encodes to a root that is accepted alike.
pub fn trust_root(data: &[u8]) -> bool {
    round_trip(data, |b| TrustRoot::from_json(b, now()), TrustRoot::to_json).is_some()
}

/// The fixed feature view's declaration.
pub const VIEW: &str = r#"
name = "pumps"
timestamp = "event_time"
entity = { name = "pump_id", type = "string" }

[[features]]
name = "temperature"
type = "f32"
nullable = true
description = "d"
owner = "o"
default = 20.0

[[features]]
name = "mode"
type = "category"
values = ["auto", "manual"]
description = "d"
owner = "o"
"#;

/// The fixed feature view of the feature targets (`pumps`: an f32 and a category).
pub fn view() -> &'static FeatureView {
    static VIEW_: OnceLock<FeatureView> = OnceLock::new();
    VIEW_.get_or_init(|| FeatureView::from_toml(VIEW).expect("fixed view"))
}

/// Any text as a feature view declaration (TOML), then as a snapshot filter over the
/// fixed view.
pub fn feature_view(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let declared = FeatureView::from_toml(text).is_ok();
    let filtered = Filter::parse(view(), text).is_ok();
    declared || filtered
}

/// Any bytes as a protocol frame: its length prefix read against both limits, and its
/// body decoded as every message type either side reads. An accepted body re-encodes to
/// one that decodes the same.
pub fn protocol_frames(data: &[u8]) -> bool {
    if let Some(prefix) = data.first_chunk::<4>() {
        let _ = protocol::frame_len(*prefix);
        let _ = protocol::frame_len_within(*prefix, protocol::MAX_ENROLL_FRAME);
    }
    let mut accepted = false;
    if let Some(AgentMessage::Windows(windows)) = frame::<AgentMessage>(data) {
        accepted = true;
        for w in &windows {
            let _ = w.window.check();
        }
    } else {
        accepted |= frame::<AgentMessage>(data).is_some();
    }
    if let Some(ControlMessage::Desired(signed)) = frame::<ControlMessage>(data) {
        accepted = true;
        let expect = Expectation { agent: AGENT, region: REGION, accepted: None, now: now() };
        let _ = signed.verify(trust(), &expect);
    } else {
        accepted |= frame::<ControlMessage>(data).is_some();
    }
    accepted |= frame::<EnrollRequest>(data).is_some();
    match frame::<EnrollResponse>(data) {
        Some(EnrollResponse::Enrolled(e)) => {
            accepted = true;
            let _ = TrustRoot::from_json(&e.trust_root, now());
        }
        Some(EnrollResponse::Refused(_)) => accepted = true,
        None => {}
    }
    accepted |= frame::<FetchRequest>(data).is_some();
    accepted |= frame::<ChunkHeader>(data).is_some();
    accepted
}

/// Any bytes as a desired-state document's JSON, signed with the fixed signing key (so
/// that the rules behind the signature check are reached) and verified for the fixed
/// agent; an accepted document, signed again, verifies to the same document.
pub fn desired_state(data: &[u8]) -> bool {
    let key = signing_key();
    let signed = crate::desired::SignedDesired {
        document: data.to_vec(),
        signatures: vec![crate::keys::SignatureEntry::sign(
            &key,
            crate::keys::Context::DesiredState,
            data,
        )],
    };
    let expect = Expectation { agent: AGENT, region: REGION, accepted: Some(1), now: now() };
    let Ok(doc) = signed.verify(trust(), &expect) else {
        // The shells also read documents without verifying them (the version of a stored
        // one): the plain parse must not panic either.
        let _ = serde_json::from_slice::<DesiredState>(data);
        return false;
    };
    let again = doc.sign(&[&key]).verify(trust(), &expect);
    assert!(again.as_ref() == Ok(&doc), "{doc:?} signed again gives {again:?}");
    true
}

/// The reference profile metric windows are judged against: one input, one output.
fn reference() -> &'static DataProfile {
    static REFERENCE: OnceLock<DataProfile> = OnceLock::new();
    REFERENCE.get_or_init(|| {
        let values: Vec<f64> = (0..100).map(f64::from).collect();
        DataProfile {
            rows: 100,
            inputs: vec![ColumnProfile::of("x", 0, "feature_a", &values, 4)],
            outputs: vec![ColumnProfile::of("y", 0, "y", &[0.0, 1.0, 1.0], 10)],
        }
    })
}

/// Any bytes as a metric window (postcard), as the control plane stores and merges them:
/// decoded, checked, and, when it passes, rolled up, summarised and scored for drift.
pub fn metrics_window(data: &[u8]) -> bool {
    let encode = |w: &MetricsWindow| postcard::to_stdvec(w).expect("windows encode");
    let Some(window) = round_trip(data, |b| postcard::from_bytes::<MetricsWindow>(b), encode)
    else {
        return false;
    };
    if window.check().is_err() {
        return false;
    }
    let mut rollup = Rollup::default();
    rollup.add(&window);
    rollup.add(&window);
    let summary = rollup.summary(window.version, 1, u64::from(window.seconds), Some(reference()));
    let _ = summary.drift.map(|d| d.top_inputs(3).len());
    true
}

/// Any text as an audit export, verified against the fixed key; each line that is an
/// entry re-serialises to a line that parses to the same line.
pub fn audit_chain(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    for line in text.lines() {
        let _ = round_trip(
            line.as_bytes(),
            |b| serde_json::from_slice::<Entry>(b),
            |e| e.line().into_bytes(),
        );
    }
    audit::verify(text.lines(), &[signing_key().public()]).is_ok()
}

/// Any bytes as a chunk recipe (under its own hash, as a desired state names it).
pub fn recipe(data: &[u8]) -> bool {
    round_trip(data, |b| Recipe::decode(b, Sha256::of(b)), Recipe::encode).is_some()
}

/// Any text as an enrollment token; one accepted prints as text that parses the same.
pub fn enrollment_token(data: &[u8]) -> bool {
    let parse = |b: &[u8]| {
        std::str::from_utf8(b)
            .map_err(|e| e.to_string())?
            .parse::<EnrollmentToken>()
            .map_err(|e| e.to_string())
    };
    round_trip(data, parse, |t| t.to_string().into_bytes()).is_some()
}

/// Any text as what operators write of a rollout: a guard, a share, and a rollout's JSON
/// (checked). Guards and shares print as text that parses the same.
pub fn rollout_terms(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let guard = round_trip(
        data,
        |b| {
            std::str::from_utf8(b)
                .map_err(|e| e.to_string())?
                .parse::<Guard>()
                .map_err(|e| e.to_string())
        },
        |g| g.to_string().into_bytes(),
    );
    let share = round_trip(
        data,
        |b| {
            std::str::from_utf8(b)
                .map_err(|e| e.to_string())?
                .parse::<Share>()
                .map_err(|e| e.to_string())
        },
        |s| s.to_string().into_bytes(),
    );
    let spec = serde_json::from_str::<RolloutSpec>(text).is_ok_and(|s| s.check().is_ok());
    guard.is_some() || share.is_some() || spec
}

/// What fine-tuning reads from outside: any bytes as an ONNX model whose head is sought
/// (and cut at, and rewritten), and any text as a job file (TOML).
pub fn finetune_inputs(data: &[u8]) -> bool {
    let mut accepted = false;
    #[cfg(feature = "onnx")]
    if let Ok(found) = crate::onnx::head::find(data) {
        accepted = true;
        let _ = crate::onnx::head::backbone(data, &found);
        let _ = crate::onnx::head::replace(data, &found, &found.weights, &found.bias);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        accepted |= Job::from_toml(text).is_ok();
    }
    accepted
}

/// The snapshot manifest the payload target loads against (the fixed view, every feature
/// raw).
#[cfg(feature = "snapshots")]
pub fn snapshot_spec() -> &'static crate::features::SnapshotSpec {
    use crate::features::view::PiiPolicy;
    use crate::features::{SnapshotSpec, pii};
    static SPEC: OnceLock<SnapshotSpec> = OnceLock::new();
    SPEC.get_or_init(|| {
        let plan = pii::plan(view(), Some(PiiPolicy::Drop)).expect("no personal data");
        SnapshotSpec::new(view(), 1, &plan, Timestamp::from_unix(0), "all")
    })
}

/// Any bytes as a snapshot payload: the first byte is the manifest's entity count, the
/// rest the payload, loaded against the fixed manifest; a table that loads answers
/// lookups.
#[cfg(feature = "snapshots")]
pub fn snapshot_payload(data: &[u8]) -> bool {
    let Some((&count, payload)) = data.split_first() else { return false };
    let mut spec = snapshot_spec().clone();
    spec.entities = u64::from(count);
    let Ok(table) = crate::features::OnlineTable::load(spec, payload) else { return false };
    let _ = table.get("pump-1");
    let mut out = Vec::new();
    let _ = table.assemble("pump-1", &[0], &mut out);
    true
}

/// Any bytes as a model for the CPU engine: decoded, its operators' attributes read
/// (tree ensembles compiled, encoders' tables built), typed and planned, and when it
/// loads, run on zeros of its signature (small inputs only: a signature of many axes
/// would otherwise ask for more elements than memory holds). tract's own panics are
/// caught by the engine and turned into refusals.
#[cfg(feature = "onnx")]
pub fn onnx_model(data: &[u8]) -> bool {
    use crate::onnx::OnnxModel;
    use crate::tensor::{DataType, Dim, Tensor, TensorData};
    let Ok(model) = OnnxModel::load(data) else { return false };
    let inputs: Option<Vec<Tensor>> = model
        .signature()
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<u64> = spec
                .shape
                .iter()
                .map(|d| if let Dim::Fixed(n) = d { (*n).min(8) } else { 2 })
                .collect();
            let n = shape
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .filter(|&n| n <= 1 << 16)?;
            let n = n as usize;
            let data = match spec.datatype {
                DataType::Bytes => TensorData::Bytes(vec![b"a".to_vec(); n]),
                DataType::Int64 => TensorData::Int64(vec![0; n]),
                _ => TensorData::Fp32(vec![0.0; n]),
            };
            Some(Tensor { shape, data })
        })
        .collect();
    if let Some(inputs) = inputs {
        let _ = model.run(inputs);
    }
    true
}

/// Any bytes as a sealed file (`at_rest`): never a panic and always refused (no one sealed
/// them under this key); and as plaintext, sealed in 16-byte segments, which opens again
/// whole and over the range its first bytes name, and is refused with the bit its first
/// byte names flipped.
pub fn sealed_file(data: &[u8]) -> bool {
    use crate::at_rest::{self, DataKey, Opener, Sealer};
    const ID: &[u8] = b"fuzz";
    let key = DataKey::generate(&ring::rand::SystemRandom::new()).expect("the system RNG works");
    let mut sealed = Vec::new();
    let mut stream = Sealer::with_segment(key, ID, 16, &mut sealed);
    stream.push(data, &mut sealed);
    let key = stream.finish(&mut sealed);
    assert!(at_rest::open(&key, ID, data.to_vec()).is_err(), "bytes no one sealed opened");
    let opener = Opener::new(&key, ID, &sealed, sealed.len() as u64).expect("a sealed header");
    assert_eq!(opener.plaintext_len(), data.len() as u64);
    assert_eq!(opener.open_all(sealed.clone()).expect("opens"), data);
    let len = data.len() as u64;
    let (a, b) = match data {
        [x, y, ..] => (u64::from(*x) % (len + 1), u64::from(*y) % (len + 1)),
        _ => (0, len),
    };
    let range = a.min(b)..a.max(b);
    let (_, at) = opener.segments_for(range.clone()).expect("a range inside the file");
    let part = sealed[at.start as usize..at.end as usize].to_vec();
    let range_bytes = opener.open_range(range.clone(), part).expect("the range opens");
    assert_eq!(range_bytes, &data[range.start as usize..range.end as usize]);
    let at = usize::from(data.first().copied().unwrap_or(0)) * 7 % sealed.len();
    sealed[at] ^= 1 << (at % 8);
    assert!(at_rest::open(&key, ID, sealed).is_err(), "a flipped bit at {at} was not caught");
    true
}
