//! Any text as an enrollment token.
//!
//! The body, `falaj_common::fuzzing::targets::enrollment_token`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_common::fuzzing::targets::enrollment_token(data);
});
