//! ONNX's own backend node tests for every operator the GPU engine implements, run on
//! whatever Vulkan adapter the machine has (lavapipe in CI).
//!
//! Each case either passes (outputs within float32 tolerance of ONNX's expected ones) or
//! is refused at load, in which case the agent serves the model with tract; a refused case
//! must be in [`SKIPPED`] with its reason, so the list stays exact. A wrong answer fails.
//! Inputs that decide shapes (a Reshape's target, Squeeze's axes) are baked into the model
//! as initializers, as exported models carry them: the engine plans shapes at load.

use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use falaj_gpu::graph::{OPERATORS, TensorValues, decode};
use falaj_gpu::{GpuError, GpuModel};
use prost::Message as _;
use support::open_gpu;
use tract_onnx::pb::{ModelProto, TensorProto};

/// Cases the GPU engine refuses, and why. tract serves these models.
const SKIPPED: &[(&str, &str)] = &[
    ("test_add_int16", INTEGERS),
    ("test_add_int8", INTEGERS),
    ("test_add_uint16", INTEGERS),
    ("test_add_uint32", INTEGERS),
    ("test_add_uint64", INTEGERS),
    ("test_add_uint8", INTEGERS),
    ("test_averagepool_3d_default", THREE_D),
    ("test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_False", THREE_D),
    ("test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_True", THREE_D),
    ("test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_False", THREE_D),
    ("test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_True", THREE_D),
    ("test_averagepool_3d_dilations_small", THREE_D),
    ("test_batchnorm_epsilon_training_mode", TRAINING),
    ("test_batchnorm_example_training_mode", TRAINING),
    ("test_clip_default_int8_inbounds_expanded", INTEGERS),
    ("test_div_int16", INTEGERS),
    ("test_div_int32_trunc", INTEGERS),
    ("test_div_int8", INTEGERS),
    ("test_div_uint16", INTEGERS),
    ("test_div_uint32", INTEGERS),
    ("test_div_uint64", INTEGERS),
    ("test_div_uint8", INTEGERS),
    ("test_maxpool_2d_uint8", INTEGERS),
    ("test_maxpool_3d_default", THREE_D),
    ("test_maxpool_3d_dilations", THREE_D),
    ("test_maxpool_3d_dilations_use_ref_impl", THREE_D),
    ("test_maxpool_3d_dilations_use_ref_impl_large", THREE_D),
    ("test_maxpool_with_argmax_2d_precomputed_pads", INDICES),
    ("test_maxpool_with_argmax_2d_precomputed_strides", INDICES),
    ("test_mul_int16", INTEGERS),
    ("test_mul_int8", INTEGERS),
    ("test_mul_uint16", INTEGERS),
    ("test_mul_uint32", INTEGERS),
    ("test_mul_uint64", INTEGERS),
    ("test_mul_uint8", INTEGERS),
    ("test_sub_int16", INTEGERS),
    ("test_sub_int8", INTEGERS),
    ("test_sub_uint16", INTEGERS),
    ("test_sub_uint32", INTEGERS),
    ("test_sub_uint64", INTEGERS),
    ("test_sub_uint8", INTEGERS),
];

const INTEGERS: &str = "integer tensors: the GPU engine computes float32 (models are float)";
const THREE_D: &str = "3-D windows: the kernels cover 1-D and 2-D (images, signals)";
const TRAINING: &str = "training-mode batch normalization (running statistics as outputs)";
const INDICES: &str = "MaxPool's second output (indices of the maxima)";

/// Cases whose expected values ONNX gives rounded, and the relative tolerance they need.
const ROUNDED: &[(&str, f32)] = &[("test_averagepool_2d_ceil_last_window_starts_on_pad", 1e-3)];

/// Absolute and relative tolerance of a float32 result.
const ATOL: f32 = 1e-5;
const RTOL: f32 = 1e-4;

enum Outcome {
    Passed,
    Refused(String),
    Wrong(String),
}

fn read_tensor(path: &Path) -> TensorProto {
    TensorProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap()
}

/// Loads the case's model, baking shape-deciding inputs into initializers as the engine
/// asks for them; returns the model and the inputs still fed at run time.
fn load(
    gpu: &std::sync::Arc<falaj_gpu::Gpu>,
    mut model: ModelProto,
    mut inputs: Vec<TensorProto>,
) -> Result<(GpuModel, Vec<TensorProto>), GpuError> {
    loop {
        match GpuModel::load(gpu.clone(), &model.encode_to_vec()) {
            Err(GpuError::NeedsConstant { input, .. }) => {
                let graph = model.graph.as_mut().unwrap();
                let Some(i) = graph.input.iter().position(|v| v.name == input) else {
                    return Err(GpuError::NeedsConstant { node: "case".into(), input });
                };
                graph.input.remove(i);
                let mut tensor = inputs.remove(i);
                tensor.name = input;
                graph.initializer.push(tensor);
            }
            other => return other.map(|m| (m, inputs)),
        }
    }
}

fn run_case(gpu: &std::sync::Arc<falaj_gpu::Gpu>, dir: &Path, rtol: f32) -> Outcome {
    let model =
        ModelProto::decode(std::fs::read(dir.join("model.onnx")).unwrap().as_slice()).unwrap();
    let data = dir.join("test_data_set_0");
    let count =
        |kind: &str| (0..64).take_while(|i| data.join(format!("{kind}_{i}.pb")).exists()).count();
    let inputs: Vec<TensorProto> =
        (0..count("input")).map(|i| read_tensor(&data.join(format!("input_{i}.pb")))).collect();
    let expected: Vec<TensorProto> =
        (0..count("output")).map(|i| read_tensor(&data.join(format!("output_{i}.pb")))).collect();
    let (engine, inputs) = match load(gpu, model, inputs) {
        Ok(loaded) => loaded,
        Err(e) => return Outcome::Refused(e.to_string()),
    };
    let mut feeds = Vec::new();
    for t in &inputs {
        match decode(t) {
            Ok((dims, TensorValues::F32(v))) => feeds.push((dims, v)),
            other => {
                return Outcome::Wrong(format!("the engine accepted a non-float input: {other:?}"));
            }
        }
    }
    let refs: Vec<(&[usize], &[f32])> =
        feeds.iter().map(|(d, v)| (d.as_slice(), v.as_slice())).collect();
    let outputs = match engine.run(&refs) {
        Ok(o) => o,
        Err(e) => return Outcome::Wrong(format!("run failed after a successful load: {e}")),
    };
    for (i, ((shape, got), want)) in outputs.iter().zip(&expected).enumerate() {
        let (dims, values) = decode(want).unwrap();
        let want: Vec<f32> = match values {
            TensorValues::F32(v) => v,
            TensorValues::I64(v) => v.iter().map(|&x| x as f32).collect(),
            TensorValues::Other(t) => return Outcome::Wrong(format!("output {i} is {t}")),
        };
        if *shape != dims {
            return Outcome::Wrong(format!("output {i}: shape {shape:?}, expected {dims:?}"));
        }
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            let within = (g - w).abs() <= ATOL + rtol * w.abs(); // false for NaN
            if !within {
                return Outcome::Wrong(format!("output {i}[{j}]: {g}, expected {w}"));
            }
        }
    }
    Outcome::Passed
}

pub fn onnx_node_tests_pass_or_are_refused_as_listed() {
    let Some(gpu) = open_gpu() else { return };
    let Some(python) = python() else { return };
    let cases = tempfile::tempdir().unwrap();
    // Where it was built, else relative to the repository root (a binary carried to a
    // GPU machine runs there).
    let script = [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/onnx_node/generate.py"),
        PathBuf::from("gpu/tests/onnx_node/generate.py"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("gpu/tests/onnx_node/generate.py");
    let generated = std::process::Command::new(&python)
        .arg(script)
        .arg(cases.path())
        .args(OPERATORS)
        .output()
        .unwrap();
    assert!(generated.status.success(), "{}", String::from_utf8_lossy(&generated.stderr));

    let mut dirs: Vec<_> =
        std::fs::read_dir(cases.path()).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    assert!(dirs.len() > 100, "only {} cases generated", dirs.len());
    let skipped: BTreeMap<&str, &str> = SKIPPED.iter().copied().collect();
    let (mut passed, mut refused, mut problems) = (Vec::new(), Vec::new(), Vec::new());
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_str().unwrap().to_owned();
        let rtol = ROUNDED.iter().find(|(n, _)| *n == name).map_or(RTOL, |(_, r)| *r);
        match run_case(&gpu, dir, rtol) {
            Outcome::Passed if skipped.contains_key(name.as_str()) => {
                problems.push(format!("{name}: passes but is listed as skipped"));
            }
            Outcome::Passed => passed.push(name),
            Outcome::Refused(_) if skipped.contains_key(name.as_str()) => refused.push(name),
            Outcome::Refused(why) => problems.push(format!("{name}: refused, not listed: {why}")),
            Outcome::Wrong(why) => problems.push(format!("{name}: WRONG: {why}")),
        }
    }
    for name in skipped.keys() {
        if !dirs.iter().any(|d| d.ends_with(name)) {
            problems.push(format!("{name}: listed as skipped but not generated"));
        }
    }
    println!("{} ONNX node cases passed on {}: {}", passed.len(), gpu.name(), passed.join(" "));
    println!("{} refused as listed", refused.len());
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
}

/// The Python with the `onnx` package (FALAJ_PYTHON), as for the interop test; without it
/// the test is skipped (reported as ignored), unless `FALAJ_REQUIRE_INTEROP` is set.
pub fn python() -> Option<PathBuf> {
    let python = std::env::var_os("FALAJ_PYTHON").map(PathBuf::from);
    if python.is_none() {
        support::skip(
            "FALAJ_REQUIRE_INTEROP",
            "FALAJ_PYTHON is not set (a Python with the onnx package)",
        );
    }
    python
}
