//! The bundle format, pinned: a manifest's canonical JSON, a signed trust root and a
//! signed bundle, made from fixed keys and times; the committed bundle must still verify
//! under the committed root.

use falaj_common::bundle::{
    self, BundleBuilder, Content, Manifest, ModelFormat, ModelSpec, Policy, RuntimeHint,
};
use falaj_common::keys::SigningKey;
use falaj_common::profile::ColumnProfile;
use falaj_common::profile::DataProfile;
use falaj_common::tensor::{DataType, Dim, Signature, TensorSpec};
use falaj_common::time::Timestamp;
use falaj_common::trust::{RootSpec, TrustRoot};

use super::check;

const CREATED: u64 = 1_796_000_000; // 2026-11-30
const EXPIRES: u64 = 4_102_444_800; // 2100-01-01

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
    let root = std::fs::read(super::path("root-v1.json")).unwrap();
    let now = Timestamp::from_unix(CREATED + 60).to_system();
    let trust = TrustRoot::from_json(&root, now).unwrap();
    let bytes = std::fs::read(super::path("bundle-v1.falaj")).unwrap();
    let verified = bundle::verify(&bytes, &trust, &Policy::new("eu-west-1", now)).unwrap();
    assert_eq!(verified.manifest.name, "golden");
    assert_eq!(verified.manifest.version, 7);
    assert_eq!(verified.file("assets/labels.txt"), Some(&b"a\nb\n"[..]));
    assert_eq!(verified.manifest.content, content());
}
