//! Any bytes as a file sealed at rest, and as plaintext sealed and opened again.
//!
//! The body, `falaj_common::fuzzing::targets::sealed_file`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_common::fuzzing::targets::sealed_file(data);
});
