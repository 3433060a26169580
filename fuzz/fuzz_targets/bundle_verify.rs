//! Any bytes as a bundle: verification returns a verdict and never panics.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use falaj_common::bundle::{self, Policy};
use falaj_common::keys::SigningKey;
use falaj_common::time::Timestamp;
use falaj_common::trust::{RootSpec, TrustRoot};
use libfuzzer_sys::fuzz_target;

fn trust() -> &'static TrustRoot {
    static TRUST: OnceLock<TrustRoot> = OnceLock::new();
    TRUST.get_or_init(|| {
        RootSpec {
            version: 1,
            region: "eu-west-1",
            expires: Timestamp::from_unix(4_102_444_800),
            root_keys: &[SigningKey::from_seed(&[1; 32])],
            root_threshold: 1,
            signing_keys: &[SigningKey::from_seed(&[2; 32]).public()],
            signing_threshold: 1,
        }
        .sign(&[])
        .expect("fixed root")
    })
}

fuzz_target!(|data: &[u8]| {
    let policy = Policy::new("eu-west-1", UNIX_EPOCH + Duration::from_secs(1_800_000_000));
    let _ = bundle::verify(data, trust(), &policy);
});
