//! Any bytes as a chunk recipe.
//!
//! The body, `falaj_common::fuzzing::targets::recipe`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_common::fuzzing::targets::recipe(data);
});
