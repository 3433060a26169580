//! Any bytes as a desired-state document (signed here, so its rules are reached).
//!
//! The body, `falaj_common::fuzzing::targets::desired_state`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_common::fuzzing::targets::desired_state(data);
});
