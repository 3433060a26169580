//! Any text as a rollout guard, a share and a rollout's JSON.
//!
//! The body, `falaj_common::fuzzing::targets::rollout_terms`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_common::fuzzing::targets::rollout_terms(data);
});
