//! The Open Inference Protocol server over real HTTP on 127.0.0.1:0: answers equal to
//! tract's, every data type, symbolic sizes, versions, hot import, and every bad input.

use crate::support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use falaj_agent::server::ServeConfig;
use falaj_common::onnx::OnnxModel;
use falaj_common::tensor::{Tensor, TensorData};
use serde_json::{Value, json};
use support::{Site, classifier, datatypes_model, image_model, serve, test_config};

fn rows(n: usize) -> Vec<f32> {
    let data = falaj_common::sample::generate(n, 77, &[]);
    data.features
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let response = client.post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    let ct = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(ct, "application/json", "responses are JSON");
    (status, response.json().await.unwrap())
}

fn output<'a>(response: &'a Value, name: &str) -> &'a Value {
    response["outputs"].as_array().unwrap().iter().find(|o| o["name"] == name).unwrap()
}

#[tokio::test]
async fn answers_equal_tract_called_directly_in_json_and_binary() {
    let site = Site::new();
    let model_bytes = classifier();
    site.install("fault", 1, &model_bytes);
    let server = serve(&site, test_config()).await;
    let client = reqwest::Client::new();
    let x = rows(5);

    let direct = OnnxModel::load(&model_bytes)
        .unwrap()
        .run(vec![Tensor { shape: vec![5, 8], data: TensorData::Fp32(x.clone()) }])
        .unwrap();
    let TensorData::Fp32(probabilities) = &direct[0].data else { panic!() };
    let TensorData::Int64(labels) = &direct[1].data else { panic!() };

    let body = json!({"id": "r1", "inputs": [{"name": "sensors", "shape": [5, 8], "datatype": "FP32", "data": x}]});
    let (status, response) = post(&client, &server.url("/v2/models/fault/infer"), &body).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(response["id"], "r1");
    assert_eq!(response["model_version"], "1");
    let got: Vec<f32> = output(&response, "probabilities")["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(&got, probabilities, "JSON floats round-trip exactly");
    assert_eq!(output(&response, "probabilities")["shape"], json!([5, 3]));
    let got: Vec<i64> = output(&response, "label")["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(&got, labels);

    // Binary in and out (the binary tensor data extension).
    let header = json!({
        "inputs": [{"name": "sensors", "shape": [5, 8], "datatype": "FP32", "parameters": {"binary_data_size": 160}}],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": true}}],
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(x.iter().flat_map(|v| v.to_le_bytes()));
    let response = client
        .post(server.url("/v2/models/fault/versions/1/infer"))
        .header("Inference-Header-Content-Length", header.len())
        .header("Content-Type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let json_len: usize =
        response.headers()["inference-header-content-length"].to_str().unwrap().parse().unwrap();
    let bytes = response.bytes().await.unwrap();
    let head: Value = serde_json::from_slice(&bytes[..json_len]).unwrap();
    assert_eq!(head["outputs"].as_array().unwrap().len(), 1, "only the requested output");
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 60);
    let got: Vec<f32> =
        bytes[json_len..].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(&got, probabilities);
    server.stop().await;
}

#[tokio::test]
async fn every_datatype_round_trips() {
    let site = Site::new();
    site.install("types", 1, &datatypes_model());
    let server = serve(&site, test_config()).await;
    let client = reqwest::Client::new();
    let body = json!({"inputs": [
        {"name": "f64", "shape": [2, 2], "datatype": "FP64", "data": [[0.1, -2.5], [1e300, 3.0]]},
        {"name": "i32", "shape": [2], "datatype": "INT32", "data": [-7, 1_073_741_823]},
        {"name": "i64", "shape": [2], "datatype": "INT64", "data": [3_000_000_000i64, -4]},
        {"name": "flag", "shape": [2], "datatype": "BOOL", "data": [true, false]},
    ]});
    let (status, response) = post(&client, &server.url("/v2/models/types/infer"), &body).await;
    assert_eq!(status, 200, "{response}");
    assert_eq!(output(&response, "f64_twice")["data"], json!([0.2, -5.0, 2e300, 6.0]));
    assert_eq!(output(&response, "f64_twice")["datatype"], "FP64");
    assert_eq!(output(&response, "i32_twice")["data"], json!([-14, 2_147_483_646]));
    assert_eq!(output(&response, "i32_twice")["datatype"], "INT32");
    assert_eq!(output(&response, "i64_negated")["data"], json!([-3_000_000_000i64, 4]));
    assert_eq!(output(&response, "not_flag")["data"], json!([false, true]));
    assert_eq!(output(&response, "not_flag")["datatype"], "BOOL");
    server.stop().await;
}

#[tokio::test]
async fn batch_height_and_width_resolve_per_request() {
    let site = Site::new();
    let model_bytes = image_model();
    site.install("cnn", 1, &model_bytes);
    let server = serve(&site, test_config()).await;
    let client = reqwest::Client::new();
    let direct = OnnxModel::load(&model_bytes).unwrap();
    for (n, h, w) in [(1u64, 8u64, 8u64), (3, 5, 11), (2, 32, 4)] {
        let count = (n * 3 * h * w) as usize;
        let x: Vec<f32> = (0..count).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
        let body = json!({"inputs": [{"name": "image", "shape": [n, 3, h, w], "datatype": "FP32", "data": x}]});
        let (status, response) = post(&client, &server.url("/v2/models/cnn/infer"), &body).await;
        assert_eq!(status, 200, "{response}");
        assert_eq!(output(&response, "logits")["shape"], json!([n, 2]));
        let expected = direct
            .run(vec![Tensor { shape: vec![n, 3, h, w], data: TensorData::Fp32(x) }])
            .unwrap();
        let TensorData::Fp32(expected) = &expected[0].data else { panic!() };
        let got: Vec<f32> = output(&response, "logits")["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&got, expected, "{n}x3x{h}x{w}");
    }
    server.stop().await;
}

#[tokio::test]
async fn health_metadata_and_versions() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    site.install("fault", 2, &classifier());
    let server = serve(&site, test_config()).await;
    let client = reqwest::Client::new();
    let get = |path: &str| client.get(server.url(path)).send();
    assert_eq!(get("/v2/health/live").await.unwrap().status(), 200);
    assert_eq!(get("/v2/health/ready").await.unwrap().status(), 200);
    let meta: Value = get("/v2").await.unwrap().json().await.unwrap();
    assert_eq!(meta["extensions"], json!(["binary_tensor_data"]));
    let model: Value = get("/v2/models/fault").await.unwrap().json().await.unwrap();
    assert_eq!(model["versions"], json!(["1", "2"]));
    assert_eq!(model["inputs"], json!([{"name": "sensors", "datatype": "FP32", "shape": [-1, 8]}]));
    assert_eq!(model["parameters"]["active_version"], "2");
    assert_eq!(model["parameters"]["engine"], "tract-cpu");
    let v1: Value = get("/v2/models/fault/versions/1").await.unwrap().json().await.unwrap();
    assert_eq!(v1["versions"], json!(["1"]));
    assert_eq!(get("/v2/models/fault/ready").await.unwrap().status(), 200);
    assert_eq!(get("/v2/models/fault/versions/1/ready").await.unwrap().status(), 200);

    let x = rows(1);
    let body =
        json!({"inputs": [{"name": "sensors", "shape": [1, 8], "datatype": "FP32", "data": x}]});
    let (_, active) = post(&client, &server.url("/v2/models/fault/infer"), &body).await;
    assert_eq!(active["model_version"], "2");
    let (_, pinned) = post(&client, &server.url("/v2/models/fault/versions/1/infer"), &body).await;
    assert_eq!(pinned["model_version"], "1");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_imported_while_serving_is_served_without_restart() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let server = serve(&site, test_config()).await;
    let client = reqwest::Client::new();
    assert_eq!(client.get(server.url("/v2/models/cnn/ready")).send().await.unwrap().status(), 404);

    // Another store handle on the same directory, as `falaj-agent import` in another process.
    let site_ref = &site;
    tokio::task::block_in_place(|| site_ref.install("cnn", 1, &image_model()));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = client.get(server.url("/v2/models/cnn/ready")).send().await.unwrap().status();
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the imported model never became ready (last status {status})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test]
async fn a_damaged_installed_bundle_is_not_served() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let path = site.store().installed().unwrap()[0].path.clone();
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let server = serve(&site, test_config()).await;
    let client = reqwest::Client::new();
    assert_eq!(client.get(server.url("/v2/health/ready")).send().await.unwrap().status(), 503);
    let response = client.get(server.url("/v2/models/fault/ready")).send().await.unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"].as_str().unwrap().contains("damaged"), "{error}");
    let body = json!({"inputs": [{"name": "sensors", "shape": [1, 8], "datatype": "FP32", "data": rows(1)}]});
    let (status, _) = post(&client, &server.url("/v2/models/fault/infer"), &body).await;
    assert_eq!(status, 503);
    server.stop().await;
}

/// A server for the sample classifier with a 4 KiB body limit (keep the site alive).
async fn small_body_server() -> (Site, support::Running, reqwest::Client) {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let server = serve(&site, ServeConfig { max_body_bytes: 4096, ..test_config() }).await;
    (site, server, reqwest::Client::new())
}

fn input(name: &str, shape: &Value, datatype: &str, data: &Value) -> Value {
    json!({"name": name, "shape": shape, "datatype": datatype, "data": data})
}

#[tokio::test]
async fn bad_requests_get_protocol_errors_with_the_right_status() {
    let (_site, server, client) = small_body_server().await;
    let infer = server.url("/v2/models/fault/infer");
    let x = json!(rows(1));
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "wrong datatype",
            json!({"inputs": [input("sensors", &json!([1, 8]), "FP64", &x)]}),
            400,
            "datatype FP64",
        ),
        (
            "wrong width",
            json!({"inputs": [input("sensors", &json!([1, 7]), "FP32", &json!([1, 2, 3, 4, 5, 6, 7]))]}),
            400,
            "axis 1",
        ),
        ("wrong rank", json!({"inputs": [input("sensors", &json!([8]), "FP32", &x)]}), 400, "rank"),
        (
            "count mismatch",
            json!({"inputs": [input("sensors", &json!([2, 8]), "FP32", &x)]}),
            400,
            "8 elements given",
        ),
        (
            "unknown input",
            json!({"inputs": [input("pixels", &json!([1, 8]), "FP32", &x)]}),
            400,
            "unknown input",
        ),
        ("missing input", json!({"inputs": []}), 400, "missing input"),
        (
            "unknown output",
            json!({"inputs": [input("sensors", &json!([1, 8]), "FP32", &x)], "outputs": [{"name": "nope"}]}),
            400,
            "unknown output",
        ),
        ("not an object", json!([1, 2, 3]), 400, "malformed"),
        (
            "string data",
            json!({"inputs": [input("sensors", &json!([1, 1]), "FP32", &json!(["x"]))]}),
            400,
            "\"x\" is not a valid FP32 value",
        ),
    ];
    for (what, body, status, needle) in cases {
        let (got, response) = post(&client, &infer, &body).await;
        assert_eq!(got, status, "{what}: {response}");
        let message = response["error"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{what}: {message:?} lacks {needle:?}");
    }

    // The server is unharmed: a good request still works.
    let ok = json!({"inputs": [input("sensors", &json!([1, 8]), "FP32", &x)]});
    let (status, _) = post(&client, &infer, &ok).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn unknown_routes_oversized_and_unsupported_bodies_are_refused() {
    let (_site, server, client) = small_body_server().await;
    let infer = server.url("/v2/models/fault/infer");
    let x = json!(rows(1));
    let ok = json!({"inputs": [input("sensors", &json!([1, 8]), "FP32", &x)]});
    for (url, needle) in [
        (server.url("/v2/models/nope/infer"), "unknown model"),
        (server.url("/v2/models/fault/versions/9/infer"), "no version 9"),
        (server.url("/v2/models/fault/versions/latest/infer"), "no version \"latest\""),
        (server.url("/v2/nowhere"), "no such endpoint"),
    ] {
        let (status, response) = post(&client, &url, &ok).await;
        assert_eq!(status, 404, "{url}: {response}");
        assert!(response["error"].as_str().unwrap().contains(needle), "{url}: {response}");
    }

    let big = json!({"inputs": [input("sensors", &json!([1000, 8]), "FP32", &json!(vec![1.5f32; 8000]))]});
    let (status, response) = post(&client, &infer, &big).await;
    assert_eq!(status, 413, "{response}");
    // The same without a Content-Length: a chunked body is cut off at the limit too.
    let mut chunked =
        b"POST /v2/models/fault/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for piece in big.to_string().as_bytes().chunks(1000) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let reply = raw_exchange(server.addr, chunked).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");

    let response =
        client.post(&infer).header("Content-Encoding", "gzip").json(&ok).send().await.unwrap();
    assert_eq!(response.status(), 415);
    let response = client
        .post(&infer)
        .header("Inference-Header-Content-Length", "lots")
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let response = client.get(&infer).send().await.unwrap();
    assert_eq!(response.status(), 405);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"].as_str().unwrap().contains("not allowed"), "{error}");

    server.stop().await;
}

/// Sends raw bytes and reads the reply up to the end of its JSON body.
async fn raw_exchange(addr: std::net::SocketAddr, request: Vec<u8>) -> String {
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // The server may answer and close before every byte is written; that is fine.
        let _ = stream.write_all(&request);
        let mut reply = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    reply.extend_from_slice(&buf[..n]);
                    if reply.windows(4).any(|w| w == b"\r\n\r\n") && reply.ends_with(b"}") {
                        break;
                    }
                }
                Err(e) if reply.is_empty() => panic!("no reply from the server: {e}"),
                Err(_) => break,
            }
        }
        String::from_utf8_lossy(&reply).into_owned()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_client_that_stops_sending_gets_408_not_a_hung_connection() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let config = ServeConfig { body_timeout: Duration::from_millis(200), ..test_config() };
    let server = serve(&site, config).await;
    let request = b"POST /v2/models/fault/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"inputs\"";
    let reply = raw_exchange(server.addr, request.to_vec()).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("did not arrive"), "{reply}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_all_answered() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let server = serve(&site, test_config()).await;
    let client = reqwest::Client::new();
    let x = rows(3);
    let body =
        json!({"inputs": [{"name": "sensors", "shape": [3, 8], "datatype": "FP32", "data": x}]});
    let (_, first) = post(&client, &server.url("/v2/models/fault/infer"), &body).await;
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (client, url, body) =
                (client.clone(), server.url("/v2/models/fault/infer"), body.clone());
            tokio::spawn(async move { post(&client, &url, &body).await })
        })
        .collect();
    for task in tasks {
        let (status, response) = task.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(response["outputs"], first["outputs"], "same input, same answer");
    }
    server.stop().await;
}
