//! Any bytes as a model for the CPU engine: decoded, its operators' attributes read (tree
//! ensembles compiled, encoders' tables built), typed and planned, and when it loads, run
//! on zeros of its signature. Each is refused or answered, never a crash or a hang
//! (tract's own panics are caught by the engine and turned into refusals).
#![no_main]

use falaj_common::onnx::OnnxModel;
use falaj_common::tensor::{DataType, Dim, Tensor, TensorData};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(model) = OnnxModel::load(data) else { return };
    let inputs: Vec<Tensor> = model
        .signature()
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<u64> =
                spec.shape.iter().map(|d| if let Dim::Fixed(n) = d { (*n).min(8) } else { 2 }).collect();
            let n = shape.iter().product::<u64>() as usize;
            let data = match spec.datatype {
                DataType::Bytes => TensorData::Bytes(vec![b"a".to_vec(); n]),
                DataType::Int64 => TensorData::Int64(vec![0; n]),
                _ => TensorData::Fp32(vec![0.0; n]),
            };
            Tensor { shape, data }
        })
        .collect();
    let _ = model.run(inputs);
});
