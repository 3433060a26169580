//! A bundle whose runtime hint is `gpu`, served by the agent as a process: by the wgpu
//! engine where a Vulkan adapter exists (lavapipe in CI), and by tract on a machine
//! without any Vulkan driver, through the same API with the same answers to 1e-4.

use crate::support;

use falaj_common::onnx::{OnnxModel, zoo};
use falaj_common::random::SeededRng;
use falaj_common::tensor::{Tensor, TensorData};
use serde_json::{Value, json};
use support::{Process, init_agent, ok, s};

const SHAPE: [usize; 4] = [4, 3, 32, 32];

struct Served {
    engine: String,
    probabilities: Vec<f32>,
    metrics: String,
}

/// Starts `falaj agent serve` with `env`, reads the model's engine, infers once, stops.
async fn serve_once(
    agent: &std::path::Path,
    config: &std::path::Path,
    x: &[f32],
    env: &[(&str, &str)],
) -> Served {
    let mut server = Process::start_with_env(
        &["agent", "serve", "--data-dir", s(agent), "--config", s(config), "--http", "127.0.0.1:0"],
        env,
    );
    let addr = server.wait_for_addr("serving the Open Inference Protocol");
    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://{addr}{path}");
    let meta: Value =
        client.get(url("/v2/models/vision")).send().await.unwrap().json().await.unwrap();
    let engine = meta["parameters"]["engines"]["1"].as_str().unwrap().to_owned();
    assert_eq!(meta["parameters"]["engine"], engine.as_str());
    assert_eq!(meta["parameters"]["runtime_hint"], "gpu");
    let body =
        json!({"inputs": [{"name": zoo::INPUT, "shape": SHAPE, "datatype": "FP32", "data": x}]});
    let request = client.post(url("/v2/models/vision/infer")).json(&body);
    let response: Value = request.send().await.unwrap().json().await.unwrap();
    let probabilities = response["outputs"][0]["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{response}"))
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let metrics = client.get(url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(server.terminate(), Some(0));
    Served { engine, probabilities, metrics }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "{what}: largest difference {worst}");
}

pub async fn gpu_bundle_runs_on_the_gpu_engine_and_on_tract_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    ok(&["control", "keys", "init", "--dir", s(&keys), "--region", "eu-west-1"]);
    let model_path = dir.path().join("cnn.onnx");
    let model = zoo::cnn(10, 3);
    std::fs::write(&model_path, &model).unwrap();
    let bundle = dir.path().join("vision-1.falaj");
    ok(&[
        "control",
        "bundle",
        "build",
        "--keys",
        s(&keys),
        "--model",
        s(&model_path),
        "--name",
        "vision",
        "--version",
        "1",
        "--runtime",
        "gpu",
        "--out",
        s(&bundle),
    ]);
    let agent = dir.path().join("agent");
    init_agent(&agent, "eu-west-1", &keys.join("root.json"));
    ok(&["agent", "import", s(&bundle), "--data-dir", s(&agent)]);
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, "[engine]\nallow_software_gpu = true\n").unwrap();

    let mut rng = SeededRng::new(4);
    let x: Vec<f32> = (0..SHAPE.iter().product()).map(|_| rng.normal(0.0, 1.0) as f32).collect();
    let direct = OnnxModel::load(&model)
        .unwrap()
        .run(vec![Tensor {
            shape: SHAPE.iter().map(|&d| d as u64).collect(),
            data: TensorData::Fp32(x.clone()),
        }])
        .unwrap();
    let TensorData::Fp32(expected) = &direct[0].data else { panic!() };

    // No Vulkan driver at all: the loader finds no ICD, so no adapter.
    let no_gpu = [
        ("VK_DRIVER_FILES", "/nonexistent/icd.json"),
        ("VK_ICD_FILENAMES", "/nonexistent/icd.json"),
    ];
    let cpu = serve_once(&agent, &config, &x, &no_gpu).await;
    assert_eq!(cpu.engine, "tract-cpu");
    assert_close(&cpu.probabilities, expected, "tract without a GPU");
    assert_eq!(
        metric(&cpu.metrics, "falaj_gpu_fallbacks_total"),
        Some(1.0),
        "counted as a fallback"
    );
    assert_eq!(metric(&cpu.metrics, "falaj_models_on_gpu"), Some(0.0));

    let gpu = serve_once(&agent, &config, &x, &[]).await;
    if gpu.engine != "wgpu-gpu" {
        crate::harness::skip(
            "FALAJ_REQUIRE_GPU",
            "the GPU half (the tract half passed): the agent found no Vulkan adapter (install mesa-vulkan-drivers)",
        );
        return;
    }
    assert_close(&gpu.probabilities, expected, "the wgpu engine");
    assert_eq!(metric(&gpu.metrics, "falaj_models_on_gpu"), Some(1.0));
    assert_eq!(metric(&gpu.metrics, "falaj_gpu_fallbacks_total"), Some(0.0));
}
