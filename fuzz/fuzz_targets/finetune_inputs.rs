//! What fine-tuning reads from outside: any bytes as an ONNX model whose head is sought
//! (and cut at, and rewritten), and any text as a job file. Each is used or refused with
//! an error, never a panic or a hang.
#![no_main]

use falaj_common::finetune::Job;
use falaj_common::onnx::head;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(found) = head::find(data) {
        let _ = head::backbone(data, &found);
        let _ = head::replace(data, &found, &found.weights, &found.bias);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Job::from_toml(text);
    }
});
