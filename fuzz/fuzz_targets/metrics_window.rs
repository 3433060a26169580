//! Any bytes as a metric window: decoded, checked, rolled up and scored for drift.
//!
//! The body, `falaj_common::fuzzing::targets::metrics_window`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_common::fuzzing::targets::metrics_window(data);
});
