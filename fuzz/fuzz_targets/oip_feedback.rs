//! Any bytes as a feedback body.
//!
//! The body, `falaj_agent::fuzzing::oip_feedback`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_agent::fuzzing::oip_feedback(data);
});
