//! Any bytes as a model for the CPU engine: decoded, its operators' attributes read (tree
//! ensembles compiled, encoders' tables built), typed and planned, and when it loads, run
//! on zeros of its signature. Each is refused or answered, never a crash or a hang
//! (tract's own panics are caught by the engine and turned into refusals).
#![no_main]

use falaj_common::onnx::OnnxModel;
use falaj_common::tensor::{DataType, Dim, Tensor, TensorData};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    // libfuzzer-sys aborts on every panic, even one the engine catches and refuses (as it
    // does tract's): report panics and let them unwind instead. One the engine does not
    // catch still aborts, at the fuzz target's `extern "C"` edge, and counts as a crash.
    init: std::panic::set_hook(Box::new(|info| eprintln!("{info}"))),
    |data: &[u8]| {
    let Ok(model) = OnnxModel::load(data) else { return };
    // Small inputs only: a signature of many axes would otherwise ask for more elements
    // than memory holds (or than a u64 counts).
    let inputs: Option<Vec<Tensor>> = model
        .signature()
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<u64> =
                spec.shape.iter().map(|d| if let Dim::Fixed(n) = d { (*n).min(8) } else { 2 }).collect();
            let n = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).filter(|&n| n <= 1 << 16)?;
            let n = n as usize;
            let data = match spec.datatype {
                DataType::Bytes => TensorData::Bytes(vec![b"a".to_vec(); n]),
                DataType::Int64 => TensorData::Int64(vec![0; n]),
                _ => TensorData::Fp32(vec![0.0; n]),
            };
            Some(Tensor { shape, data })
        })
        .collect();
    if let Some(inputs) = inputs {
        let _ = model.run(inputs);
    }
    }
);
