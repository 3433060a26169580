//! Trust-root rotation, as fixture directories (the way tough keeps `rotated-root` and
//! `expired-repository`): each case under `tests/data/rotation/` holds the root an agent
//! trusts (`trusted.json`), the roots it is offered in order (`offered-1.json`, ...), and
//! optionally a document signed by the signing role (`signed.json`); `verdict.txt` says
//! what must come of them. The verdicts are written here, by hand, beside the cases that
//! make them; the test reads the committed files, so a change to rotation's rules or its
//! messages shows as a failing case. Regenerate after a deliberate change with
//! `FALAJ_BLESS=1 cargo test -p falaj-common --test it rotation`.

use std::path::{Path, PathBuf};

use falaj_common::keys::{Context, SignatureEntry, SigningKey};
use falaj_common::time::Timestamp;
use falaj_common::trust::{RootSpec, TrustRoot};
use serde::{Deserialize, Serialize};

/// The verdicts are reached at this time (2027-01-15).
const NOW: u64 = 1_800_000_000;
const YEAR: u64 = 365 * 24 * 3600;
const REGION: &str = "eu-west-1";

fn key(seed: u8) -> SigningKey {
    SigningKey::from_seed(&[seed; 32])
}

/// A root: `version`, root keys and threshold, signing keys and threshold, expiry, and
/// the keys of the previous root that sign it beside its own.
struct Fixture {
    version: u64,
    region: &'static str,
    root_keys: Vec<u8>,
    root_threshold: u32,
    signing_keys: Vec<u8>,
    expires: u64,
    cosigners: Vec<u8>,
}

impl Fixture {
    fn new(version: u64, root_keys: &[u8], signing_keys: &[u8]) -> Self {
        Self {
            version,
            region: REGION,
            root_keys: root_keys.to_vec(),
            root_threshold: 1,
            signing_keys: signing_keys.to_vec(),
            expires: NOW + YEAR,
            cosigners: Vec::new(),
        }
    }

    fn signed_by(mut self, previous: &[u8]) -> Self {
        self.cosigners = previous.to_vec();
        self
    }

    fn json(&self) -> Vec<u8> {
        let keys = |seeds: &[u8]| seeds.iter().map(|s| key(*s)).collect::<Vec<_>>();
        let signing: Vec<_> = keys(&self.signing_keys).iter().map(SigningKey::public).collect();
        RootSpec {
            version: self.version,
            region: self.region,
            expires: Timestamp::from_unix(self.expires),
            root_keys: &keys(&self.root_keys),
            root_threshold: self.root_threshold,
            signing_keys: &signing,
            signing_threshold: 1,
        }
        .sign(&keys(&self.cosigners))
        .expect("fixture roots are well formed")
        .to_json()
    }
}

/// A document signed by the signing role, as a bundle manifest is.
#[derive(Serialize, Deserialize)]
struct Signed {
    message: String,
    signatures: Vec<SignatureEntry>,
}

struct Case {
    name: &'static str,
    trusted: Fixture,
    offered: Vec<Fixture>,
    /// Signing-key seeds that sign `signed.json`, if the case has one.
    signed_by: Option<u8>,
    verdict: &'static str,
}

fn cases() -> Vec<Case> {
    let v1 = || Fixture::new(1, &[1], &[10]);
    vec![
        Case {
            name: "good-chain",
            trusted: v1(),
            offered: vec![
                // New root keys, cross-signed by the old one.
                Fixture::new(2, &[2, 3], &[10]).signed_by(&[1]),
                // New signing keys, root keys unchanged.
                Fixture::new(3, &[2, 3], &[11]).signed_by(&[2, 3]),
            ],
            signed_by: Some(11),
            verdict: "trusted version 3\nsigned: accepted",
        },
        Case {
            name: "skipped-version",
            trusted: v1(),
            offered: vec![Fixture::new(3, &[2], &[10]).signed_by(&[1])],
            signed_by: None,
            verdict: "refused: trust root version 3 cannot follow version 1: versions must \
                      increase by one",
        },
        Case {
            name: "rollback",
            trusted: Fixture::new(2, &[2], &[10]),
            offered: vec![Fixture::new(1, &[1], &[10]).signed_by(&[2])],
            signed_by: None,
            verdict: "refused: trust root version 1 cannot follow version 2: versions must \
                      increase by one",
        },
        Case {
            name: "not-signed-by-previous",
            trusted: v1(),
            offered: vec![Fixture::new(2, &[2], &[10])],
            signed_by: None,
            verdict: "refused: trust root version 2 is signed by 0 of version 1's root keys, \
                      1 are needed",
        },
        Case {
            name: "below-previous-threshold",
            trusted: Fixture { root_threshold: 2, ..Fixture::new(1, &[1, 2, 3], &[10]) },
            offered: vec![Fixture::new(2, &[4], &[10]).signed_by(&[1])],
            signed_by: None,
            verdict: "refused: trust root version 2 is signed by 1 of version 1's root keys, \
                      2 are needed",
        },
        Case {
            name: "foreign-region",
            trusted: v1(),
            offered: vec![Fixture { region: "us-east-1", ..Fixture::new(2, &[1], &[10]) }],
            signed_by: None,
            verdict: "refused: trust root is for region \"us-east-1\", this one is for \
                      \"eu-west-1\"",
        },
        Case {
            name: "expired-middle",
            trusted: Fixture { expires: NOW - 2 * YEAR, ..v1() },
            offered: vec![
                Fixture { expires: NOW - YEAR, ..Fixture::new(2, &[2], &[10]).signed_by(&[1]) },
                Fixture::new(3, &[3], &[10]).signed_by(&[2]),
            ],
            signed_by: Some(10),
            verdict: "trusted version 3\nsigned: accepted",
        },
        Case {
            name: "expired-last",
            trusted: v1(),
            offered: vec![Fixture {
                expires: NOW - 3600,
                ..Fixture::new(2, &[2], &[10]).signed_by(&[1])
            }],
            signed_by: None,
            verdict: "refused: trust root version 2 expired at 2027-01-15T07:00:00Z",
        },
        Case {
            name: "removed-signing-key",
            trusted: v1(),
            offered: vec![Fixture::new(2, &[1], &[11]).signed_by(&[1])],
            signed_by: Some(10),
            verdict: "trusted version 2\nsigned: refused: signed by key {KEY10}, which is not \
                      a signing key of the trust root",
        },
    ]
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/rotation")
}

fn signed(seed: u8) -> Signed {
    let message = "a bundle's manifest".to_owned();
    let signatures =
        vec![SignatureEntry::sign(&key(seed), Context::BundleManifest, message.as_bytes())];
    Signed { message, signatures }
}

fn expected(case: &Case) -> String {
    case.verdict.replace("{KEY10}", &key(10).public().id().to_string())
}

fn write(case: &Case) {
    let at = dir().join(case.name);
    let _ = std::fs::remove_dir_all(&at);
    std::fs::create_dir_all(&at).unwrap();
    std::fs::write(at.join("trusted.json"), case.trusted.json()).unwrap();
    for (i, root) in case.offered.iter().enumerate() {
        std::fs::write(at.join(format!("offered-{}.json", i + 1)), root.json()).unwrap();
    }
    if let Some(seed) = case.signed_by {
        std::fs::write(at.join("signed.json"), serde_json::to_vec_pretty(&signed(seed)).unwrap())
            .unwrap();
    }
    std::fs::write(at.join("verdict.txt"), expected(case) + "\n").unwrap();
}

/// What an agent makes of a case directory: the root it ends up trusting, and whether
/// the signed document verifies under it.
fn verdict(at: &Path) -> String {
    let read = |name: &str| std::fs::read(at.join(name));
    let trusted = TrustRoot::from_json_unexpired(&read("trusted.json").unwrap()).unwrap();
    let offered: Vec<Vec<u8>> =
        (1..).map_while(|i| read(&format!("offered-{i}.json")).ok()).collect();
    let now = Timestamp::from_unix(NOW).to_system();
    let newest = match trusted.follow(&offered, now) {
        Ok(roots) => roots.into_iter().last().unwrap_or(trusted),
        Err(e) => return format!("refused: {e}"),
    };
    let mut out = format!("trusted version {}", newest.version());
    if let Ok(bytes) = read("signed.json") {
        let doc: Signed = serde_json::from_slice(&bytes).unwrap();
        let outcome = match newest.check_signing(
            Context::BundleManifest,
            doc.message.as_bytes(),
            &doc.signatures,
        ) {
            Ok(()) => "accepted".to_owned(),
            Err(e) => format!("refused: {e}"),
        };
        out = format!("{out}\nsigned: {outcome}");
    }
    out
}

#[test]
fn each_rotation_fixture_gets_its_verdict() {
    let cases = cases();
    if std::env::var_os("FALAJ_BLESS").is_some() {
        cases.iter().for_each(write);
    }
    for case in &cases {
        let at = dir().join(case.name);
        let want = std::fs::read_to_string(at.join("verdict.txt"))
            .unwrap_or_else(|e| panic!("{}: {e}", at.display()));
        assert_eq!(verdict(&at), want.trim_end(), "case {}", case.name);
        assert_eq!(want.trim_end(), expected(case), "case {}: verdict.txt is stale", case.name);
    }
    // The removed key's document verified under the root that still listed it.
    let removed = dir().join("removed-signing-key");
    let trusted =
        TrustRoot::from_json_unexpired(&std::fs::read(removed.join("trusted.json")).unwrap())
            .unwrap();
    let doc: Signed =
        serde_json::from_slice(&std::fs::read(removed.join("signed.json")).unwrap()).unwrap();
    trusted
        .check_signing(Context::BundleManifest, doc.message.as_bytes(), &doc.signatures)
        .unwrap();
}

/// The committed files are what this code makes: the rotation format is pinned, and
/// every fixture is reproducible from the cases above.
#[test]
fn rotation_fixtures_are_made_by_the_cases() {
    for case in cases() {
        let at = dir().join(case.name);
        let read = |name: &str| {
            std::fs::read(at.join(name)).unwrap_or_else(|e| panic!("{}/{name}: {e}", case.name))
        };
        assert!(read("trusted.json") == case.trusted.json(), "{}: trusted.json", case.name);
        for (i, root) in case.offered.iter().enumerate() {
            let name = format!("offered-{}.json", i + 1);
            assert!(read(&name) == root.json(), "{}: {name}", case.name);
        }
    }
}
