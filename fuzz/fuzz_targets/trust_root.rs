//! Any bytes as `root.json`; an accepted root re-encodes to one accepted alike.
//!
//! The body, `falaj_common::fuzzing::targets::trust_root`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_common::fuzzing::targets::trust_root(data);
});
