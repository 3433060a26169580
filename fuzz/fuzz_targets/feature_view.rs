//! Any text as a feature view declaration, then as a snapshot filter over a fixed view.
//!
//! The body, `falaj_common::fuzzing::targets::feature_view`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_common::fuzzing::targets::feature_view(data);
});
