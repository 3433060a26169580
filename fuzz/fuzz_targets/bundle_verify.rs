//! Any bytes as a bundle, verified against the golden trust root.
//!
//! The body, `falaj_common::fuzzing::targets::bundle_verify`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_common::fuzzing::targets::bundle_verify(data);
});
