//! ONNX's own backend node tests for the operators the CPU engine adds to tract (the
//! ONNX-ML set of `falaj_operators::OPERATORS`, and If): each case's model runs on the
//! engine and must give the case's outputs (labels exactly, floats within 1e-5 + 1e-5·|x|).
//!
//! The cases come from the `onnx` Python package (`gpu/tests/onnx_node/generate.py`);
//! without it the test is reported as ignored with the reason, unless
//! `FALAJ_REQUIRE_INTEROP=1`.
//!
//! Also: the README's list of supported operators is the engine's.

use std::path::Path;
use std::process::Command;

use falaj_common::onnx::{OnnxModel, tensor_from_proto};
use falaj_common::tensor::{Tensor, TensorData};

fn cases(dir: &Path) -> Option<Vec<std::path::PathBuf>> {
    let python = std::env::var("FALAJ_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("gpu/tests/onnx_node/generate.py");
    let mut ops: Vec<&str> = falaj_operators::OPERATORS.to_vec();
    // Ops the cases use around the one under test.
    ops.extend(["Constant", "Identity", "Add"]);
    let status = Command::new(&python).arg(&script).arg(dir).args(&ops).status();
    if !status.is_ok_and(|s| s.success()) {
        let why = format!(
            "{python} could not write ONNX's node tests (pip install onnx, or set FALAJ_PYTHON)"
        );
        crate::harness::skip("FALAJ_REQUIRE_INTEROP", &why);
        return None;
    }
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("test_ai_onnx_ml_") || name.starts_with("test_if")
        })
        .collect();
    out.sort();
    Some(out)
}

fn read(dir: &Path, kind: &str) -> Vec<Tensor> {
    (0..)
        .map_while(|i| std::fs::read(dir.join(format!("test_data_set_0/{kind}_{i}.pb"))).ok())
        .map(|b| tensor_from_proto(&b).unwrap().1)
        .collect()
}

fn same(got: &Tensor, want: &Tensor) -> bool {
    if got.shape != want.shape {
        return false;
    }
    match (&got.data, &want.data) {
        (TensorData::Fp32(_) | TensorData::Fp64(_), _) => got
            .data
            .to_f64()
            .iter()
            .zip(want.data.to_f64())
            .all(|(a, b)| (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-5 + 1e-5 * b.abs()),
        (a, b) => a == b,
    }
}

pub fn onnx_node_tests_of_the_added_operators_pass() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cases) = cases(dir.path()) else { return };
    assert!(cases.len() >= 9, "only {} ONNX-ML and If cases were written", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        let model = match OnnxModel::load(&std::fs::read(case.join("model.onnx")).unwrap()) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{name}: load: {e}"));
                continue;
            }
        };
        match model.run(read(case, "input")) {
            Err(e) => failures.push(format!("{name}: run: {e}")),
            Ok(got) => {
                for (i, (g, w)) in got.iter().zip(read(case, "output")).enumerate() {
                    if !same(g, &w) {
                        failures.push(format!("{name}: output {i}: {g:?}, expected {w:?}"));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    eprintln!("{} ONNX node test cases passed", cases.len());
}

/// The operator lines of the README (`ai.onnx.ml: A, B` and `ai.onnx: C, D`), as
/// `domain:op` like `supported_operators()`.
fn readme_operators(readme: &str) -> Vec<String> {
    let mut out: Vec<String> = readme
        .lines()
        .filter_map(|line| {
            let (domain, ops) = line.strip_prefix("- `")?.split_once("`: ")?;
            domain.starts_with("ai.onnx").then(|| {
                ops.trim_end_matches('.')
                    .split(", ")
                    .map(|op| format!("{domain}:{}", op.trim()))
                    .collect::<Vec<_>>()
            })
        })
        .flatten()
        .collect();
    out.sort();
    out
}

pub fn the_readme_lists_every_supported_operator_and_no_other() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let supported = falaj_common::onnx::supported_operators();
    let listed = readme_operators(&readme);
    let lines: Vec<String> = ["ai.onnx.ml", "ai.onnx"]
        .iter()
        .map(|domain| {
            let ops: Vec<&str> =
                supported.iter().filter_map(|o| o.strip_prefix(&format!("{domain}:"))).collect();
            format!("- `{domain}`: {}.", ops.join(", "))
        })
        .collect();
    assert_eq!(listed, supported, "the README's list should read:\n{}", lines.join("\n"));
    assert!(listed.contains(&"ai.onnx.ml:TreeEnsembleRegressor".to_owned()), "{listed:?}");
}
