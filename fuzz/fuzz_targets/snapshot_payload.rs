//! Any bytes as a snapshot payload loaded against a fixed manifest.
//!
//! The body, `falaj_common::fuzzing::targets::snapshot_payload`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_common::fuzzing::targets::snapshot_payload(data);
});
