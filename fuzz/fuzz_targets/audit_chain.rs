//! Any text as an audit export, verified; each entry line round-trips.
//!
//! The body, `falaj_common::fuzzing::targets::audit_chain`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_common::fuzzing::targets::audit_chain(data);
});
