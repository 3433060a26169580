//! Any bytes as a bundle whose manifest is signed again before it is verified.
//!
//! The body, `falaj_common::fuzzing::targets::bundle_resigned`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_common::fuzzing::targets::bundle_resigned(data);
});
