//! Any bytes as a QUIC protocol frame: its length prefix, and its body as every message type.
//!
//! The body, `falaj_common::fuzzing::targets::protocol_frames`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_common::fuzzing::targets::protocol_frames(data);
});
