//! Any bytes as `root.json`: accepted or refused, never a panic.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use falaj_common::trust::TrustRoot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = TrustRoot::from_json(data, UNIX_EPOCH + Duration::from_secs(1_800_000_000));
});
