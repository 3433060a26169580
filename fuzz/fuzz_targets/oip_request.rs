//! Any bytes as an inference request body, with and without a binary section.
//!
//! The body, `falaj_agent::fuzzing::oip_request`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_agent::fuzzing::oip_request(data);
});
