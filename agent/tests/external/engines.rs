//! Engine choice in the server: on a machine with a Vulkan adapter (lavapipe in CI, allowed
//! here as a GPU), a float model whose operators all have GPU kernels is served by the wgpu
//! engine with tract's answers; a model with integer tensors and one with an operator the
//! GPU engine lacks are served by tract, each fallback counted in Prometheus.

use crate::support;

use falaj_agent::engine::EngineConfig;
use falaj_agent::server::ServeConfig;
use falaj_common::onnx::{GraphBuilder, OnnxModel};
use falaj_common::random::SeededRng;
use falaj_common::tensor::{DataType, Dim, Tensor, TensorData};
use serde_json::{Value, json};
use support::{Site, datatypes_model, image_model, serve, test_config};

fn erf_model() -> Vec<u8> {
    let n = || Dim::Symbol("N".into());
    let mut g = GraphBuilder::new("erf");
    g.input("x", DataType::Fp32, &[n(), Dim::Fixed(4)]).node("Erf", &["x"], &["y"], vec![]).output(
        "y",
        DataType::Fp32,
        &[n(), Dim::Fixed(4)],
    );
    g.encode("test")
}

async fn infer(client: &reqwest::Client, url: String, body: &Value) -> Value {
    client.post(url).json(body).send().await.unwrap().json().await.unwrap()
}

fn floats(output: &Value) -> Vec<f32> {
    output["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

async fn engine_of(client: &reqwest::Client, server: &support::Running, model: &str) -> String {
    let meta: Value = client
        .get(server.url(&format!("/v2/models/{model}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    meta["parameters"]["engines"]["1"].as_str().unwrap().to_owned()
}

pub async fn supported_models_run_on_the_gpu_and_the_rest_fall_back_to_tract() {
    let site = Site::new();
    site.install("vision", 1, &image_model());
    site.install("types", 1, &datatypes_model());
    site.install("erf", 1, &erf_model());
    let config = ServeConfig {
        engine: EngineConfig { allow_software_gpu: true, ..EngineConfig::default() },
        ..test_config()
    };
    let server = serve(&site, config).await;
    let client = reqwest::Client::new();

    let vision = engine_of(&client, &server, "vision").await;
    if vision != "wgpu-gpu" {
        crate::harness::skip(
            "FALAJ_REQUIRE_GPU",
            &format!(
                "vision runs on {vision}: no Vulkan adapter here (install mesa-vulkan-drivers)"
            ),
        );
        return;
    }
    // What the agent reports to the control plane: both engines, the GPU by its adapter.
    let engines = server.registry.engines().available();
    let names: Vec<&str> = engines.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["tract-cpu", "wgpu-gpu"], "{engines:?}");
    assert!(!engines[1].device.is_empty(), "{engines:?}");
    assert_eq!(engine_of(&client, &server, "types").await, "tract-cpu", "integer tensors");
    assert_eq!(engine_of(&client, &server, "erf").await, "tract-cpu", "no Erf kernel");

    // Symbolic batch, height and width, bound per request on the GPU as on tract.
    let shape = [2u64, 3, 5, 7];
    let mut rng = SeededRng::new(3);
    let x: Vec<f32> =
        (0..shape.iter().product::<u64>()).map(|_| rng.normal(0.0, 1.0) as f32).collect();
    let body =
        json!({"inputs": [{"name": "image", "shape": shape, "datatype": "FP32", "data": x}]});
    let response = infer(&client, server.url("/v2/models/vision/infer"), &body).await;
    let got = floats(&response["outputs"][0]);
    let direct = OnnxModel::load(&image_model())
        .unwrap()
        .run(vec![Tensor { shape: shape.to_vec(), data: TensorData::Fp32(x) }])
        .unwrap();
    let TensorData::Fp32(want) = &direct[0].data else { panic!() };
    assert_eq!(response["outputs"][0]["shape"], json!([2, 2]));
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4, "largest difference {worst}");

    // The fallen-back model still answers, through tract.
    let body = json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0.0, 0.5, -1.0, 2.0]}]});
    let response = infer(&client, server.url("/v2/models/erf/infer"), &body).await;
    let erf_half = response["outputs"][0]["data"][1].as_f64().unwrap();
    assert!((erf_half - 0.520_499_877_8).abs() < 1e-5, "{response}");

    let metrics = client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let value = |name: &str| {
        metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
    };
    assert_eq!(value("falaj_gpu_fallbacks_total"), Some(2.0), "{metrics}");
    assert_eq!(value("falaj_models_on_gpu"), Some(1.0));
    server.stop().await;
}
