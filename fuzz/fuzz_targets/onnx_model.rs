//! Any bytes as a model for the CPU engine: decoded, typed, planned and, when it loads,
//! run on zeros of its signature. Each is refused or answered, never a crash or a hang.
//!
//! The body, `falaj_common::fuzzing::targets::onnx_model`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    // libfuzzer-sys aborts on every panic, even one the engine catches and refuses (as it
    // does tract's): report panics and let them unwind instead. One the engine does not
    // catch still aborts, at the fuzz target's `extern "C"` edge, and counts as a crash.
    init: std::panic::set_hook(Box::new(|info| eprintln!("{info}"))),
    |data: &[u8]| {
        falaj_common::fuzzing::targets::onnx_model(data);
    }
);
