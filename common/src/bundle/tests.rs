//! Every way a bundle can be refused, one test each, plus the streaming check.

use std::time::SystemTime;

use super::build::encode;
use super::*;
use crate::keys::tests::key;
use crate::keys::{Context, SignatureEntry, SigningKey};
use crate::tensor::{DataType, Dim, Signature, TensorSpec};
use crate::time::Timestamp;
use crate::trust::{RootSpec, TrustRoot};

const NOW: u64 = 1_800_000_000;
const REGION: &str = "eu-west-1";

fn now() -> SystemTime {
    Timestamp::from_unix(NOW).to_system()
}

struct Fixture {
    trust: TrustRoot,
    root: SigningKey,
    signers: Vec<SigningKey>,
}

impl Fixture {
    fn new(signers: usize, threshold: u32) -> Self {
        let mut root = vec![key()];
        let signers: Vec<_> = (0..signers).map(|_| key()).collect();
        let publics: Vec<_> = signers.iter().map(SigningKey::public).collect();
        let trust = RootSpec {
            version: 1,
            region: REGION,
            expires: Timestamp::from_unix(NOW + 100_000),
            root_keys: &root,
            root_threshold: 1,
            signing_keys: &publics,
            signing_threshold: threshold,
        }
        .sign(&[])
        .unwrap();
        Self { trust, root: root.remove(0), signers }
    }

    fn policy() -> Policy {
        Policy::new(REGION, now())
    }

    fn check(&self, bytes: &[u8]) -> Result<Manifest, VerifyError> {
        verify(bytes, &self.trust, &Self::policy()).map(|b| b.manifest)
    }
}

fn model_content() -> Content {
    let spec = |name: &str| TensorSpec {
        name: name.into(),
        datatype: DataType::Fp32,
        shape: vec![Dim::Symbol("N".into()), Dim::Fixed(4)],
    };
    Content::Model(ModelSpec {
        file: "model.onnx".into(),
        format: ModelFormat::Onnx,
        runtime: RuntimeHint::Auto,
        signature: Signature { inputs: vec![spec("x")], outputs: vec![spec("y")] },
        reference: None,
        features: None,
        lineage: None,
        shapes: std::collections::BTreeMap::new(),
    })
}

fn builder() -> BundleBuilder {
    BundleBuilder::new(
        "sensor-fault",
        3,
        REGION,
        Timestamp::from_unix(NOW - 10),
        Timestamp::from_unix(NOW + 3600),
        model_content(),
    )
    .file("model.onnx", b"pretend onnx bytes".to_vec())
    .file("extra/labels.txt", b"normal\ndegraded\nfault\n".to_vec())
}

fn signed(f: &Fixture) -> Vec<u8> {
    builder().build(&[&f.signers[0]]).unwrap().1
}

/// Signs `manifest` as given (bypassing the builder's checks) and encodes it.
fn raw_bundle(manifest: &Manifest, payloads: &[Vec<u8>], signer: &SigningKey) -> Vec<u8> {
    let bytes = manifest.to_bytes();
    let sigs = vec![SignatureEntry::sign(signer, Context::BundleManifest, &bytes)];
    encode(&bytes, &serde_json::to_vec(&sigs).unwrap(), payloads).unwrap()
}

fn sections(bytes: &[u8]) -> (usize, usize, usize) {
    let h = Header::parse(bytes).unwrap();
    let manifest = HEADER_LEN;
    let sigs = manifest + h.manifest_len as usize;
    (manifest, sigs, h.payload_offset() as usize)
}

#[test]
fn a_signed_bundle_verifies_and_exposes_its_files() {
    let f = Fixture::new(1, 1);
    let bytes = signed(&f);
    let bundle = verify(&bytes, &f.trust, &Fixture::policy()).unwrap();
    assert_eq!(bundle.manifest.name, "sensor-fault");
    assert_eq!(bundle.manifest.version, 3);
    assert_eq!(bundle.model_bytes(), Some(&b"pretend onnx bytes"[..]));
    assert_eq!(bundle.file("extra/labels.txt").map(<[u8]>::len), Some(22));
    assert_eq!(bundle.manifest.content.kind().to_string(), "model");
}

#[test]
fn flipping_any_byte_of_any_section_is_refused_with_that_sections_error() {
    let f = Fixture::new(1, 1);
    let bytes = signed(&f);
    let (manifest, sigs, payload) = sections(&bytes);
    let flip = |at: usize| {
        let mut b = bytes.clone();
        b[at] ^= 0x01;
        f.check(&b).unwrap_err()
    };
    assert_eq!(flip(0), VerifyError::NotABundle);
    assert!(matches!(flip(8), VerifyError::UnsupportedVersion { what: "container", version: 0 }));
    // Manifest length off by one: the signatures no longer line up with the manifest.
    assert!(matches!(
        flip(12),
        VerifyError::MalformedSignatures(_) | VerifyError::Truncated { .. }
    ));
    for at in [manifest, manifest + 40, sigs - 1] {
        let err = flip(at);
        assert!(matches!(err, VerifyError::BadSignature { .. }), "manifest byte {at}: {err}");
    }
    // A byte of the signature value itself (inside its hex) or of its JSON structure.
    let sig_hex =
        sigs + String::from_utf8_lossy(&bytes[sigs..payload]).find("\"sig\":\"").unwrap() + 7;
    assert!(matches!(
        flip(sig_hex + 3),
        VerifyError::BadSignature { .. } | VerifyError::MalformedSignatures(_)
    ));
    assert!(matches!(flip(sigs), VerifyError::MalformedSignatures(_)));
    for at in [payload, payload + 5, bytes.len() - 1] {
        let err = flip(at);
        assert!(matches!(err, VerifyError::PayloadHashMismatch { .. }), "payload byte {at}: {err}");
    }
    let err = flip(bytes.len() - 1);
    assert!(
        matches!(&err, VerifyError::PayloadHashMismatch { file, .. } if file == "extra/labels.txt"),
        "{err}"
    );
}

#[test]
fn truncation_anywhere_is_refused_as_truncated() {
    let f = Fixture::new(1, 1);
    let bytes = signed(&f);
    let (manifest, sigs, payload) = sections(&bytes);
    for len in
        [0, 7, HEADER_LEN - 1, manifest + 10, sigs + 3, payload, payload + 4, bytes.len() - 1]
    {
        let err = f.check(&bytes[..len]).unwrap_err();
        let expected_section = match len {
            l if l < HEADER_LEN => "header",
            l if l < sigs => "manifest",
            l if l < payload => "signatures",
            _ => "payload",
        };
        assert!(
            matches!(err, VerifyError::Truncated { section, .. } if section == expected_section),
            "length {len}: {err}"
        );
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(b"junk");
    assert_eq!(f.check(&longer).unwrap_err(), VerifyError::TrailingData { extra: 4 });
}

#[test]
fn a_key_outside_the_trust_root_is_unknown() {
    let f = Fixture::new(1, 1);
    let stranger = key();
    let bytes = builder().build(&[&stranger]).unwrap().1;
    assert_eq!(
        f.check(&bytes).unwrap_err(),
        VerifyError::UnknownKey { keyid: stranger.public().id() }
    );
    // A root key is listed in the trust root, but only signing keys may sign bundles.
    let by_root = builder().build(&[&f.root]).unwrap().1;
    assert_eq!(
        f.check(&by_root).unwrap_err(),
        VerifyError::UnknownKey { keyid: f.root.public().id() }
    );
}

#[test]
fn a_signature_over_other_bytes_is_bad() {
    let f = Fixture::new(1, 1);
    let bytes = signed(&f);
    let other = builder().file("more.bin", vec![1]).build(&[&f.signers[0]]).unwrap().1;
    // Graft the other bundle's signatures onto this one (same length: same key, same JSON shape).
    let (_, sigs, payload) = sections(&bytes);
    let (_, other_sigs, other_payload) = sections(&other);
    let mut grafted = bytes.clone();
    grafted[sigs..payload].copy_from_slice(&other[other_sigs..other_payload]);
    assert_eq!(
        f.check(&grafted).unwrap_err(),
        VerifyError::BadSignature { keyid: f.signers[0].public().id() }
    );
}

#[test]
fn below_threshold_is_refused_and_at_threshold_accepted() {
    let f = Fixture::new(3, 2);
    let one = builder().build(&[&f.signers[0]]).unwrap().1;
    assert_eq!(f.check(&one).unwrap_err(), VerifyError::ThresholdNotMet { valid: 1, threshold: 2 });
    let same_twice = builder().build(&[&f.signers[0], &f.signers[0]]).unwrap().1;
    assert_eq!(
        f.check(&same_twice).unwrap_err(),
        VerifyError::ThresholdNotMet { valid: 1, threshold: 2 }
    );
    let two = builder().build(&[&f.signers[0], &f.signers[2]]).unwrap().1;
    assert!(f.check(&two).is_ok());
}

#[test]
fn an_unsigned_bundle_is_well_formed_but_never_verifies() {
    let f = Fixture::new(1, 1);
    let (manifest, bytes) = builder().build_unsigned().unwrap();
    let (_, signatures, payload) = sections(&bytes);
    assert_eq!(&bytes[signatures..payload], b"[]", "an empty signature list");
    assert_eq!(
        f.check(&bytes).unwrap_err(),
        VerifyError::ThresholdNotMet { valid: 0, threshold: 1 }
    );
    assert_eq!(manifest, builder().manifest().clone());
}

#[test]
fn expired_and_wrong_region_are_refused() {
    let f = Fixture::new(1, 1);
    let bytes = signed(&f);
    let mut late = Fixture::policy();
    late.now = Timestamp::from_unix(NOW + 3600).to_system();
    let err = verify(&bytes, &f.trust, &late).unwrap_err();
    assert!(matches!(err, VerifyError::Expired { .. }), "{err}");
    let elsewhere = Policy::new("us-east-1", now());
    assert_eq!(
        verify(&bytes, &f.trust, &elsewhere).unwrap_err(),
        VerifyError::WrongRegion { bundle: REGION.into(), expected: "us-east-1".into() }
    );
}

#[test]
fn oversized_bundles_and_sections_are_refused() {
    let f = Fixture::new(1, 1);
    let bytes = signed(&f);
    let mut small = Fixture::policy();
    small.max_bundle_bytes = bytes.len() as u64 - 1;
    let err = verify(&bytes, &f.trust, &small).unwrap_err();
    assert!(matches!(err, VerifyError::Oversized { what: "bundle", .. }), "{err}");
    let mut huge_manifest = bytes.clone();
    huge_manifest[12..16].copy_from_slice(&(MAX_MANIFEST_BYTES + 1).to_le_bytes());
    let err = f.check(&huge_manifest).unwrap_err();
    assert!(matches!(err, VerifyError::Oversized { what: "manifest", .. }), "{err}");
    // The declared payload, not only the bytes present, counts against the limit.
    let mut manifest = builder().manifest().clone();
    manifest.files[0].size = u64::MAX / 2;
    let lying = raw_bundle(&manifest, &[], &f.signers[0]);
    let err = f.check(&lying).unwrap_err();
    assert!(matches!(err, VerifyError::Oversized { what: "bundle", .. }), "{err}");
}

#[test]
fn traversal_and_odd_file_names_are_refused_even_when_signed() {
    let f = Fixture::new(1, 1);
    for name in ["../../etc/cron.d/x", "/etc/passwd", "a/../../b", "a\\..\\b", "", "ok/./x"] {
        let mut manifest = builder().manifest().clone();
        manifest.files[1].name = name.into();
        let bytes =
            raw_bundle(&manifest, &[b"pretend onnx bytes".to_vec(), b"x".to_vec()], &f.signers[0]);
        assert_eq!(f.check(&bytes).unwrap_err(), VerifyError::UnsafePath(name.into()), "{name:?}");
    }
    let mut twice = builder().manifest().clone();
    twice.files[1].name = "model.onnx".into();
    let err = f.check(&raw_bundle(&twice, &[], &f.signers[0])).unwrap_err();
    assert!(matches!(err, VerifyError::InvalidManifest(_)), "{err}");
}

#[test]
fn authentic_but_malformed_manifests_are_refused() {
    let f = Fixture::new(1, 1);
    let manifest = b"{\"format\":1}";
    let sigs = vec![SignatureEntry::sign(&f.signers[0], Context::BundleManifest, manifest)];
    let bytes = encode(manifest, &serde_json::to_vec(&sigs).unwrap(), &[]).unwrap();
    assert!(matches!(f.check(&bytes).unwrap_err(), VerifyError::MalformedManifest(_)));

    let mut future = builder().manifest().clone();
    future.format = 2;
    let err = f.check(&raw_bundle(&future, &[], &f.signers[0])).unwrap_err();
    assert_eq!(err, VerifyError::UnsupportedVersion { what: "manifest", version: 2 });
}

#[test]
fn a_trust_root_signature_is_not_a_bundle_signature() {
    let f = Fixture::new(1, 1);
    let manifest = builder().manifest().to_bytes();
    let sigs = vec![SignatureEntry::sign(&f.signers[0], Context::TrustRoot, &manifest)];
    let bytes = encode(&manifest, &serde_json::to_vec(&sigs).unwrap(), &[]).unwrap();
    assert!(matches!(f.check(&bytes).unwrap_err(), VerifyError::BadSignature { .. }));
}

#[test]
fn streaming_check_agrees_with_whole_check_for_any_piece_size() {
    let f = Fixture::new(1, 1);
    let bytes = signed(&f);
    let (manifest_at, sigs_at, payload_at) = sections(&bytes);
    let header = Header::parse(&bytes).unwrap();
    let manifest = verify_manifest(
        header,
        &bytes[manifest_at..sigs_at],
        &bytes[sigs_at..payload_at],
        &f.trust,
        &Fixture::policy(),
    )
    .unwrap();
    for piece in [1, 3, 7, 64] {
        let mut check = PayloadCheck::new(&manifest);
        for chunk in bytes[payload_at..].chunks(piece) {
            check.update(chunk).unwrap();
        }
        check.finish().unwrap();

        let mut short = PayloadCheck::new(&manifest);
        for chunk in bytes[payload_at..bytes.len() - 2].chunks(piece) {
            short.update(chunk).unwrap();
        }
        assert!(matches!(short.finish(), Err(VerifyError::Truncated { section: "payload", .. })));
    }
}

#[test]
fn builder_refuses_what_the_verifier_would() {
    let missing = BundleBuilder::new(
        "m",
        1,
        REGION,
        Timestamp::from_unix(NOW),
        Timestamp::from_unix(NOW + 1),
        model_content(),
    );
    let k = key();
    assert!(matches!(missing.build(&[&k]), Err(BuildError::MissingModelFile(_))));
    let bad_name = BundleBuilder::new(
        "Bad Name",
        1,
        REGION,
        Timestamp::from_unix(NOW),
        Timestamp::from_unix(NOW + 1),
        model_content(),
    )
    .file("model.onnx", vec![]);
    assert!(matches!(bad_name.build(&[&k]), Err(BuildError::Name(_))));
    assert!(matches!(builder().build(&[]), Err(BuildError::NoKeys)));
}

#[test]
fn empty_payload_files_are_fine() {
    let f = Fixture::new(1, 1);
    let bytes = builder().file("empty", vec![]).build(&[&f.signers[0]]).unwrap().1;
    let bundle = verify(&bytes, &f.trust, &Fixture::policy()).unwrap();
    assert_eq!(bundle.file("empty"), Some(&[][..]));
}

mod feature_input {
    use crate::bundle::FeatureInput;
    use crate::tensor::{DataType, Dim, Signature, TensorSpec};

    fn signature(datatype: DataType, shape: &[Dim]) -> Signature {
        let spec = |name: &str| TensorSpec { name: name.into(), datatype, shape: shape.to_vec() };
        Signature { inputs: vec![spec("x")], outputs: vec![spec("y")] }
    }

    #[test]
    fn a_feature_input_needs_one_fp32_matrix_of_its_width() {
        let input =
            FeatureInput { view: "pumps".into(), version: 1, names: vec!["a".into(), "b".into()] };
        let n = || Dim::Symbol("N".into());
        let check = |s: Signature| input.fits(&s);
        assert_eq!(check(signature(DataType::Fp32, &[n(), Dim::Fixed(2)])), Ok(()));
        assert_eq!(check(signature(DataType::Fp32, &[n(), Dim::Any])), Ok(()));
        let err = check(signature(DataType::Fp32, &[n(), Dim::Fixed(3)])).unwrap_err();
        assert!(err.contains("3 columns") && err.contains("2 features"), "{err}");
        let err = check(signature(DataType::Int64, &[n(), Dim::Fixed(2)])).unwrap_err();
        assert!(err.contains("INT64"), "{err}");
        let err = check(signature(DataType::Fp32, &[Dim::Fixed(2)])).unwrap_err();
        assert!(err.contains("rank 1"), "{err}");
        let mut two = signature(DataType::Fp32, &[n(), Dim::Fixed(2)]);
        two.inputs.push(two.inputs[0].clone());
        assert!(check(two).unwrap_err().contains("exactly one input"));
    }
}
