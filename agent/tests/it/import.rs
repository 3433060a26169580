//! Importing bundles: what is installed, and every refusal leaving the state untouched.

use crate::support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use falaj_agent::import::{ImportError, ImportOptions, ImportOutcome};
use falaj_common::bundle::{HEADER_LEN, Header, VerifyError};
use falaj_common::keys::SigningKey;
use ring::rand::SystemRandom;
use support::{REGION, Site, classifier, now};

/// Installed rows (name, version, active) and every file under the data directory with
/// its content.
type Snapshot = (Vec<(String, u64, bool)>, BTreeMap<String, Vec<u8>>);

/// Everything an import could change: the rows and every file under the data dir
/// (with content), except the database files, whose bytes change on every open.
fn snapshot(site: &Site) -> Snapshot {
    let rows = site
        .store()
        .installed()
        .unwrap()
        .into_iter()
        .map(|i| (i.manifest.name, i.manifest.version, i.active))
        .collect();
    let mut files = BTreeMap::new();
    walk(&site.data_dir(), &site.data_dir(), &mut files);
    (rows, files)
}

fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            walk(&path, root, out);
        } else if !rel.starts_with("agent.db") {
            out.insert(rel, std::fs::read(&path).unwrap());
        }
    }
}

fn assert_refused_untouched(site: &Site, bytes: &[u8], options: &ImportOptions) -> ImportError {
    let before = snapshot(site);
    let err = site.import_bytes(bytes, options).unwrap_err();
    assert_eq!(snapshot(site), before, "refused import changed state: {err}");
    assert!(err.is_refusal(), "{err}");
    err
}

fn verify_error(err: ImportError) -> VerifyError {
    match err {
        ImportError::Refused { source, .. } => source,
        other => panic!("expected a verification refusal, got {other}"),
    }
}

#[test]
fn installs_activates_and_is_idempotent() {
    let site = Site::new();
    let bundle = site.bundle("fault", 1, &classifier());
    let outcome = site.import_bytes(&bundle, &ImportOptions::new(now())).unwrap();
    assert_eq!(
        outcome,
        ImportOutcome::Installed {
            name: "fault".into(),
            version: 1,
            previous: None,
            size: bundle.len() as u64
        }
    );
    let installed = site.store().installed().unwrap();
    assert_eq!(installed.len(), 1);
    assert!(installed[0].active);
    // Installed sealed at rest; it opens to the bundle byte for byte.
    let sealed = std::fs::read(&installed[0].path).unwrap();
    assert!(sealed.starts_with(falaj_common::at_rest::MAGIC), "installed sealed");
    let store = site.store();
    let key = falaj_common::at_rest::HEADER_LEN;
    assert_eq!(sealed.len(), key + bundle.len() + falaj_common::at_rest::TAG_LEN);
    assert_eq!(&store.read_content(&installed[0]).unwrap()[..], &classifier()[..]);
    drop(store);

    let again = site.import_bytes(&bundle, &ImportOptions::new(now())).unwrap();
    assert_eq!(again, ImportOutcome::AlreadyInstalled { name: "fault".into(), version: 1 });
    assert_eq!(site.store().installed().unwrap().len(), 1);

    let v2 = site.bundle("fault", 2, &classifier());
    let outcome = site.import_bytes(&v2, &ImportOptions::new(now())).unwrap();
    assert!(
        matches!(outcome, ImportOutcome::Installed { version: 2, previous: Some(1), .. }),
        "{outcome:?}"
    );
    let active: Vec<_> =
        site.store().installed().unwrap().iter().map(|i| (i.manifest.version, i.active)).collect();
    assert_eq!(active, vec![(1, false), (2, true)], "every version kept, the new one active");
    let staging = site.data_dir().join("staging");
    assert_eq!(std::fs::read_dir(staging).unwrap().count(), 0, "no staged leftovers");
}

#[test]
fn every_tampered_section_is_refused_and_changes_nothing() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let bundle = site.bundle("fault", 2, &classifier());
    let header = Header::parse(&bundle).unwrap();
    let manifest_at = HEADER_LEN;
    let sigs_at = manifest_at + header.manifest_len as usize;
    let payload_at = header.payload_offset() as usize;
    let options = ImportOptions::new(now());
    let flip = |at: usize| {
        let mut b = bundle.clone();
        b[at] ^= 0x20;
        verify_error(assert_refused_untouched(&site, &b, &options))
    };
    assert_eq!(flip(1), VerifyError::NotABundle);
    assert!(matches!(flip(9), VerifyError::UnsupportedVersion { .. }));
    assert!(matches!(flip(manifest_at + 30), VerifyError::BadSignature { .. }));
    assert!(matches!(flip(sigs_at), VerifyError::MalformedSignatures(_)));
    assert!(matches!(flip(payload_at + 100), VerifyError::PayloadHashMismatch { .. }));
    assert!(matches!(flip(bundle.len() - 1), VerifyError::PayloadHashMismatch { .. }));
    for len in [10, sigs_at - 5, payload_at + 50, bundle.len() - 1] {
        let err = verify_error(assert_refused_untouched(&site, &bundle[..len], &options));
        assert!(matches!(err, VerifyError::Truncated { .. }), "length {len}: {err}");
    }
    let mut longer = bundle.clone();
    longer.push(0);
    assert_eq!(
        verify_error(assert_refused_untouched(&site, &longer, &options)),
        VerifyError::TrailingData { extra: 1 }
    );
    // The untampered bundle still goes in afterwards.
    assert!(matches!(
        site.import_bytes(&bundle, &options).unwrap(),
        ImportOutcome::Installed { version: 2, .. }
    ));
}

#[test]
fn keys_regions_and_expiry_are_enforced() {
    let site = Site::new();
    let model = classifier();
    let options = ImportOptions::new(now());
    let stranger = SigningKey::generate(&SystemRandom::new()).unwrap().0;
    let unsigned =
        support::signed_bundle("fault", 1, &model, REGION, &stranger, Duration::from_secs(60));
    assert!(matches!(
        verify_error(assert_refused_untouched(&site, &unsigned, &options)),
        VerifyError::UnknownKey { .. }
    ));

    let elsewhere = support::signed_bundle(
        "fault",
        1,
        &model,
        "other-region",
        &site.signer,
        Duration::from_secs(60),
    );
    assert_eq!(
        verify_error(assert_refused_untouched(&site, &elsewhere, &options)),
        VerifyError::WrongRegion { bundle: "other-region".into(), expected: REGION.into() }
    );

    let short =
        support::signed_bundle("fault", 1, &model, REGION, &site.signer, Duration::from_secs(60));
    let later = ImportOptions::new(now() + Duration::from_secs(120));
    assert!(matches!(
        verify_error(assert_refused_untouched(&site, &short, &later)),
        VerifyError::Expired { .. }
    ));

    let much_later = ImportOptions::new(now() + Duration::from_secs(3 * 24 * 3600));
    let err = assert_refused_untouched(&site, &site.bundle("fault", 1, &model), &much_later);
    assert!(matches!(err, ImportError::TrustExpired(_)), "{err}");

    let mut tiny = ImportOptions::new(now());
    tiny.max_bundle_bytes = 100;
    let err =
        verify_error(assert_refused_untouched(&site, &site.bundle("fault", 1, &model), &tiny));
    assert!(matches!(err, VerifyError::Oversized { .. }), "{err}");
}

#[test]
fn versions_only_move_forward_unless_downgrade_is_allowed() {
    let site = Site::new();
    let model = classifier();
    site.install("fault", 3, &model);
    let old = site.bundle("fault", 2, &model);
    let err = assert_refused_untouched(&site, &old, &ImportOptions::new(now()));
    assert!(matches!(err, ImportError::NotNewer { version: 2, latest: 3, .. }), "{err}");

    let other_three = site.bundle("fault", 3, &support::image_model());
    let err = assert_refused_untouched(
        &site,
        &other_three,
        &ImportOptions { allow_downgrade: true, ..ImportOptions::new(now()) },
    );
    assert!(matches!(err, ImportError::Conflict { version: 3, .. }), "{err}");

    let rollback = ImportOptions { allow_downgrade: true, ..ImportOptions::new(now()) };
    let outcome = site.import_bytes(&old, &rollback).unwrap();
    assert!(
        matches!(outcome, ImportOutcome::Installed { version: 2, previous: Some(3), .. }),
        "{outcome:?}"
    );
    let active: Vec<_> = site
        .store()
        .installed()
        .unwrap()
        .iter()
        .filter(|i| i.active)
        .map(|i| i.manifest.version)
        .collect();
    assert_eq!(active, vec![2]);
}

#[test]
fn a_signed_model_that_does_not_load_is_refused() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    // A properly signed bundle whose model file is not ONNX: build it from a real model's
    // manifest, then swap the payload and re-sign, as a careless publisher might.
    let model = classifier();
    let signature = falaj_common::onnx::OnnxModel::load(&model).unwrap().signature().clone();
    let created = falaj_common::time::Timestamp::from_system(now());
    let garbage = falaj_common::bundle::BundleBuilder::new(
        "fault",
        2,
        REGION,
        created,
        created.saturating_add(Duration::from_secs(60)),
        falaj_common::bundle::Content::Model(falaj_common::bundle::ModelSpec {
            file: "model.onnx".into(),
            format: falaj_common::bundle::ModelFormat::Onnx,
            runtime: falaj_common::bundle::RuntimeHint::Auto,
            signature,
            reference: None,
            features: None,
            lineage: None,
            shapes: BTreeMap::new(),
        }),
    )
    .file("model.onnx", b"\x08\x07this is not a model".to_vec())
    .build(&[&site.signer])
    .unwrap()
    .1;
    let err = assert_refused_untouched(&site, &garbage, &ImportOptions::new(now()));
    assert!(matches!(err, ImportError::BadModel { version: 2, .. }), "{err}");
}

#[test]
fn an_uninitialised_directory_is_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = falaj_agent::store::Store::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("not an initialised agent"), "{err}");
    let site = Site::new();
    let err =
        falaj_agent::store::Store::init(&site.data_dir(), REGION, &site.trust.to_json(), now())
            .unwrap_err();
    assert!(err.to_string().contains("already holds"), "{err}");
    let err = falaj_agent::store::Store::init(
        &dir.path().join("x"),
        "elsewhere",
        &site.trust.to_json(),
        now(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("trust root is for region"), "{err}");
}

/// A trust root within days of its end (the test site's lasts one day) is warned of where
/// an air-gapped site's operator looks: `trust show` and the agent's `/metrics`.
#[tokio::test]
async fn a_trust_root_near_its_end_is_warned_of() {
    let site = Site::new();
    let shown = std::process::Command::new(env!("CARGO_BIN_EXE_falaj-agent"))
        .args(["trust", "show", "--data-dir"])
        .arg(site.data_dir())
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(shown.contains("WARNING: trust root version 1 expires within 7 days"), "{shown}");

    let server = support::serve(&site, support::test_config()).await;
    let metrics = reqwest::get(server.url("/metrics")).await.unwrap().text().await.unwrap();
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    assert_eq!(value("falaj_trust_root_version"), 1);
    let left = value("falaj_trust_root_expiry_seconds");
    assert!(left > 0 && left <= 86_400, "{left}");
    server.stop().await;
}
