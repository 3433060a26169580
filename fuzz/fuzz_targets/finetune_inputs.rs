//! Any bytes as an ONNX model whose head is found, cut at and rewritten, and as a
//! fine-tune job file.
//!
//! The body, `falaj_common::fuzzing::targets::finetune_inputs`, is the stable test's too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    falaj_common::fuzzing::targets::finetune_inputs(data);
});
