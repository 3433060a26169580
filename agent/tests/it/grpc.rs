//! The gRPC binding of the Open Inference Protocol over real HTTP/2 on 127.0.0.1:0, with a
//! client generated from the same proto: answers equal to tract's (typed and raw), every
//! datatype, metadata, readiness, the repository index, health, streaming, errors with
//! their status codes and REST's messages, admission shared with REST, and metrics that a
//! REST and a gRPC client see alike.

use crate::support;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use falaj_agent::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use falaj_agent::grpc::proto::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use falaj_agent::grpc::proto::{
    InferTensorContents, ModelInferRequest, ModelMetadataRequest, ModelReadyRequest,
    RepositoryIndexRequest, ServerLiveRequest, ServerMetadataRequest, ServerReadyRequest,
};
use falaj_agent::server::{ServeConfig, Server};
use falaj_common::onnx::OnnxModel;
use falaj_common::tensor::{Tensor, TensorData};
use support::{Site, classifier, datatypes_model, test_config};
use tonic::Code;
use tonic::transport::Channel;

type Client = GrpcInferenceServiceClient<Channel>;

/// A running server with both endpoints; stops when `stop` is sent or it is dropped.
pub(crate) struct Both {
    http: SocketAddr,
    pub(crate) grpc: SocketAddr,
    pub(crate) slots: tokio::sync::watch::Receiver<falaj_agent::admission::SlotGauge>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Both {
    pub(crate) async fn start(site: &Site, config: ServeConfig) -> Self {
        let config = ServeConfig { grpc: Some("127.0.0.1:0".parse().unwrap()), ..config };
        let server = Server::bind(site.data_dir(), config).await.unwrap();
        let (http, grpc) = (server.local_addr(), server.grpc_addr().unwrap());
        let slots = server.request_slots();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            server.run(async { drop(rx.await) }).await.unwrap();
        });
        Self { http, grpc, slots, stop: Some(tx), task }
    }

    async fn client(&self) -> Client {
        connect(self.grpc).await
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        (&mut self.task).await.unwrap();
    }
}

/// The generated client (built without tonic's transport) over a channel to `addr`.
async fn connect(addr: SocketAddr) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    GrpcInferenceServiceClient::new(channel).max_decoding_message_size(usize::MAX)
}

/// Installs a model as `name` version 1 and damages its bundle, so it fails to load.
fn install_damaged(site: &Site, name: &str) {
    site.install(name, 1, &classifier());
    let installed = site.store().installed().unwrap();
    let path = &installed.iter().find(|i| i.manifest.name == name).unwrap().path;
    let mut bytes = std::fs::read(path).unwrap();
    let last = bytes.len() - 10;
    bytes[last] ^= 1;
    std::fs::write(path, bytes).unwrap();
}

pub(crate) fn rows(n: usize) -> Vec<f32> {
    falaj_common::sample::generate(n, 77, &[]).features
}

fn raw_fp32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn input(
    name: &str,
    datatype: &str,
    shape: &[i64],
    contents: Option<InferTensorContents>,
) -> InferInputTensor {
    InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
        parameters: HashMap::new(),
        contents,
    }
}

pub(crate) fn sensors_raw(model: &str, x: &[f32], n: i64) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![input("sensors", "FP32", &[n, 8], None)],
        raw_input_contents: vec![raw_fp32(x).into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn typed_and_raw_answers_equal_tract_called_directly() {
    let site = Site::new();
    let model_bytes = classifier();
    site.install("fault", 1, &model_bytes);
    let server = Both::start(&site, test_config()).await;
    let mut client = server.client().await;
    let x = rows(5);
    let direct = OnnxModel::load(&model_bytes)
        .unwrap()
        .run(vec![Tensor { shape: vec![5, 8], data: TensorData::Fp32(x.clone()) }])
        .unwrap();
    let TensorData::Fp32(probabilities) = &direct[0].data else { panic!() };
    let TensorData::Int64(labels) = &direct[1].data else { panic!() };

    let raw = client
        .model_infer(ModelInferRequest { id: "r1".into(), ..sensors_raw("fault", &x, 5) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((raw.id.as_str(), raw.model_version.as_str()), ("r1", "1"));
    assert_eq!(raw.outputs[0].name, "probabilities");
    assert_eq!(raw.outputs[0].shape, vec![5, 3]);
    assert_eq!(raw.raw_output_contents[0], raw_fp32(probabilities));
    let got_labels: Vec<i64> = raw.raw_output_contents[1]
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(&got_labels, labels);

    let typed = client
        .model_infer(ModelInferRequest {
            model_name: "fault".into(),
            model_version: "1".into(),
            inputs: vec![input(
                "sensors",
                "FP32",
                &[5, 8],
                Some(InferTensorContents { fp32_contents: x.clone(), ..Default::default() }),
            )],
            outputs: vec![InferRequestedOutputTensor {
                name: "label".into(),
                parameters: HashMap::new(),
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(typed.raw_output_contents.is_empty(), "typed requests are answered typed");
    assert_eq!(typed.outputs.len(), 1, "only the output asked for");
    assert_eq!(&typed.outputs[0].contents.as_ref().unwrap().int64_contents, labels);
    server.stop().await;
}

#[tokio::test]
async fn every_datatype_round_trips_typed_and_raw() {
    let site = Site::new();
    site.install("types", 1, &datatypes_model());
    let server = Both::start(&site, test_config()).await;
    let mut client = server.client().await;
    let typed = client
        .model_infer(ModelInferRequest {
            model_name: "types".into(),
            inputs: vec![
                input(
                    "f64",
                    "FP64",
                    &[2, 2],
                    Some(InferTensorContents {
                        fp64_contents: vec![0.1, -2.5, 1e300, 3.0],
                        ..Default::default()
                    }),
                ),
                input(
                    "i32",
                    "INT32",
                    &[2],
                    Some(InferTensorContents {
                        int_contents: vec![-7, 1_073_741_823],
                        ..Default::default()
                    }),
                ),
                input(
                    "i64",
                    "INT64",
                    &[2],
                    Some(InferTensorContents {
                        int64_contents: vec![3_000_000_000, -4],
                        ..Default::default()
                    }),
                ),
                input(
                    "flag",
                    "BOOL",
                    &[2],
                    Some(InferTensorContents {
                        bool_contents: vec![true, false],
                        ..Default::default()
                    }),
                ),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let by_name = |name: &str| typed.outputs.iter().find(|o| o.name == name).unwrap();
    let c = |name: &str| by_name(name).contents.clone().unwrap();
    assert_eq!(c("f64_twice").fp64_contents, vec![0.2, -5.0, 2e300, 6.0]);
    assert_eq!(by_name("f64_twice").datatype, "FP64");
    assert_eq!(c("i32_twice").int_contents, vec![-14, 2_147_483_646]);
    assert_eq!(c("i64_negated").int64_contents, vec![-3_000_000_000, 4]);
    assert_eq!(c("not_flag").bool_contents, vec![false, true]);

    let raw = client
        .model_infer(ModelInferRequest {
            model_name: "types".into(),
            inputs: vec![
                input("f64", "FP64", &[1, 2], None),
                input("i32", "INT32", &[1], None),
                input("i64", "INT64", &[1], None),
                input("flag", "BOOL", &[1], None),
            ],
            raw_input_contents: vec![
                [0.5f64.to_le_bytes(), 1.5f64.to_le_bytes()].concat(),
                21i32.to_le_bytes().to_vec(),
                9i64.to_le_bytes().to_vec(),
                vec![1],
            ]
            .into_iter()
            .map(Into::into)
            .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let position = |name: &str| raw.outputs.iter().position(|o| o.name == name).unwrap();
    let bytes = |name: &str| raw.raw_output_contents[position(name)].to_vec();
    assert_eq!(bytes("f64_twice"), [1.0f64.to_le_bytes(), 3.0f64.to_le_bytes()].concat());
    assert_eq!(bytes("i32_twice"), 42i32.to_le_bytes());
    assert_eq!(bytes("i64_negated"), (-9i64).to_le_bytes());
    assert_eq!(bytes("not_flag"), vec![0]);
    server.stop().await;
}

#[tokio::test]
async fn metadata_readiness_index_and_health() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    site.install("fault", 2, &classifier());
    install_damaged(&site, "broken");
    let server = Both::start(&site, test_config()).await;
    let mut client = server.client().await;
    assert!(client.server_live(ServerLiveRequest {}).await.unwrap().into_inner().live);
    assert!(
        !client.server_ready(ServerReadyRequest {}).await.unwrap().into_inner().ready,
        "an active version failed to load"
    );
    let meta = client.server_metadata(ServerMetadataRequest {}).await.unwrap().into_inner();
    assert_eq!(meta.name, "falaj-agent");
    let model = client
        .model_metadata(ModelMetadataRequest { name: "fault".into(), version: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(model.versions, vec!["1", "2"]);
    assert_eq!(model.platform, "onnx");
    assert_eq!(model.inputs[0].name, "sensors");
    assert_eq!(model.inputs[0].shape, vec![-1, 8]);
    assert_eq!(model.outputs.len(), 2);
    let ready = |name: &str, version: &str| ModelReadyRequest {
        name: name.into(),
        version: version.into(),
    };
    assert!(client.model_ready(ready("fault", "1")).await.unwrap().into_inner().ready);
    assert!(!client.model_ready(ready("broken", "")).await.unwrap().into_inner().ready);
    let err = client.model_ready(ready("nope", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");

    let index = client
        .repository_index(RepositoryIndexRequest { repository_name: String::new(), ready: false })
        .await
        .unwrap()
        .into_inner();
    let entries: Vec<_> = index
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.version.as_str(), m.state.as_str()))
        .collect();
    assert_eq!(
        entries,
        vec![("broken", "1", "UNAVAILABLE"), ("fault", "1", "READY"), ("fault", "2", "READY")]
    );
    assert!(!index.models[0].reason.is_empty(), "a failed version says why");
    let ready_only = client
        .repository_index(RepositoryIndexRequest { repository_name: String::new(), ready: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ready_only.models.len(), 2);

    let channel =
        Channel::from_shared(format!("http://{}", server.grpc)).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = |service: &str| tonic_health::pb::HealthCheckRequest { service: service.into() };
    let status = health.check(check("inference.GRPCInferenceService")).await.unwrap().into_inner();
    assert_eq!(status.status(), tonic_health::pb::health_check_response::ServingStatus::NotServing);
    server.stop().await;

    // Without the broken model the server is ready and says so to health checks.
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let server = Both::start(&site, test_config()).await;
    let mut client = server.client().await;
    assert!(client.server_ready(ServerReadyRequest {}).await.unwrap().into_inner().ready);
    let channel =
        Channel::from_shared(format!("http://{}", server.grpc)).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "inference.GRPCInferenceService"] {
        let status = health.check(check(service)).await.unwrap().into_inner();
        assert_eq!(
            status.status(),
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{service:?}"
        );
    }
    server.stop().await;
}

/// A REST request body with one `sensors` input.
fn rest_sensors<T: serde::Serialize>(shape: &[i64], datatype: &str, data: &T) -> serde_json::Value {
    serde_json::json!({"inputs": [{"name": "sensors", "shape": shape, "datatype": datatype, "data": data}]})
}

/// The REST answer to the same mistake, for its message.
async fn rest_error(http: SocketAddr, path: &str, body: serde_json::Value) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("http://{http}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    (status, body["error"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn errors_have_tritons_codes_and_rests_messages() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    install_damaged(&site, "broken");
    let config = ServeConfig { max_body_bytes: 64 << 10, ..test_config() };
    let server = Both::start(&site, config).await;
    let mut client = server.client().await;
    let x = rows(1);
    let cases: Vec<(ModelInferRequest, Code, &str, serde_json::Value)> = vec![
        (
            sensors_raw("nope", &x, 1),
            Code::NotFound,
            "/v2/models/nope/infer",
            rest_sensors(&[1, 8], "FP32", &x),
        ),
        (
            ModelInferRequest { model_version: "9".into(), ..sensors_raw("fault", &x, 1) },
            Code::NotFound,
            "/v2/models/fault/versions/9/infer",
            rest_sensors(&[1, 8], "FP32", &x),
        ),
        (
            sensors_raw("broken", &x, 1),
            Code::Unavailable,
            "/v2/models/broken/infer",
            rest_sensors(&[1, 8], "FP32", &x),
        ),
        (
            ModelInferRequest {
                model_name: "fault".into(),
                inputs: vec![input(
                    "sensors",
                    "FP32",
                    &[1, 7],
                    Some(InferTensorContents {
                        fp32_contents: x[..7].to_vec(),
                        ..Default::default()
                    }),
                )],
                ..Default::default()
            },
            Code::InvalidArgument,
            "/v2/models/fault/infer",
            rest_sensors(&[1, 7], "FP32", &&x[..7]),
        ),
        (
            ModelInferRequest {
                model_name: "fault".into(),
                inputs: vec![input(
                    "sensors",
                    "INT32",
                    &[1, 8],
                    Some(InferTensorContents { int_contents: vec![1; 8], ..Default::default() }),
                )],
                ..Default::default()
            },
            Code::InvalidArgument,
            "/v2/models/fault/infer",
            rest_sensors(&[1, 8], "INT32", &[1; 8]),
        ),
        (
            ModelInferRequest {
                model_name: "fault".into(),
                inputs: vec![input(
                    "sensors",
                    "FP32",
                    &[1, 8],
                    Some(InferTensorContents { fp32_contents: x.clone(), ..Default::default() }),
                )],
                outputs: vec![InferRequestedOutputTensor {
                    name: "nope".into(),
                    parameters: HashMap::new(),
                }],
                ..Default::default()
            },
            Code::InvalidArgument,
            "/v2/models/fault/infer",
            serde_json::json!({"inputs": [{"name": "sensors", "shape": [1, 8], "datatype": "FP32", "data": x}], "outputs": [{"name": "nope"}]}),
        ),
    ];
    for (request, code, path, rest_body) in cases {
        let err = client.model_infer(request).await.unwrap_err();
        let (rest_status, rest_message) = rest_error(server.http, path, rest_body).await;
        assert_eq!(err.code(), code, "{path}: {err:?}");
        assert_eq!(err.message(), rest_message, "{path}: the same message as REST ({rest_status})");
    }
    let err = client
        .model_infer(ModelInferRequest { model_version: "x".into(), ..sensors_raw("fault", &x, 1) })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), err.message()),
        (Code::NotFound, "model \"fault\" has no version \"x\"")
    );

    server.stop().await;
}

#[tokio::test]
async fn a_message_over_the_body_limit_is_resource_exhausted() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let config = ServeConfig { max_body_bytes: 64 << 10, ..test_config() };
    let server = Both::start(&site, config).await;
    let mut client = server.client().await;
    let big = rows(4096);
    let err = client.model_infer(sensors_raw("fault", &big, 4096)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(err.message(), "request exceeds the limit of 65536 bytes");
    // On a stream the refusal comes in the trailers, after an answer already sent.
    let requests = vec![sensors_raw("fault", &rows(1), 1), sensors_raw("fault", &big, 4096)];
    let mut replies =
        client.model_stream_infer(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let first = replies.message().await.unwrap().expect("the first message is answered");
    assert!(first.infer_response.is_some(), "{first:?}");
    let err = replies.message().await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(err.message(), "request exceeds the limit of 65536 bytes");
    server.stop().await;
}

/// A body whose DATA frames the test sends one at a time.
type Frames = http_body_util::StreamBody<
    tokio_stream::wrappers::ReceiverStream<
        Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>,
    >,
>;

/// Starts a ModelInfer call over hyper's bare HTTP/2 connection `sender`, its body fed by
/// the returned sender, and gives back the answer's `grpc-status`, `grpc-message` (headers
/// or trailers) and data once the answer has arrived.
async fn bare_infer(
    sender: &mut hyper::client::conn::http2::SendRequest<Frames>,
    addr: SocketAddr,
    frames: Vec<Vec<u8>>,
    end: bool,
) -> (String, String, bytes::Bytes) {
    use http_body_util::BodyExt as _;
    let (tx, rx) = tokio::sync::mpsc::channel(frames.len().max(1));
    for frame in frames {
        tx.send(Ok(http_body::Frame::data(frame.into()))).await.unwrap();
    }
    // Left open (the sender kept until the answer is read) unless `end`.
    let open = (!end).then_some(tx);
    let request = tonic::codegen::http::Request::post(format!(
        "http://{addr}/inference.GRPCInferenceService/ModelInfer"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let field = |headers: &tonic::codegen::http::HeaderMap, name: &str| {
        headers.get(name).map(|v| v.to_str().unwrap().replace("%20", " "))
    };
    let answer = if let Some(status) = field(&parts.headers, "grpc-status") {
        (status, field(&parts.headers, "grpc-message").unwrap_or_default(), bytes::Bytes::new())
    } else {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("trailers");
        let status = field(&trailers, "grpc-status").expect("grpc-status");
        (status, field(&trailers, "grpc-message").unwrap_or_default(), collected.to_bytes())
    };
    drop(open);
    answer
}

/// ModelInfer's message is framed by hand (`grpc/unary.rs`): one split over several DATA
/// frames, its 5-byte prefix among them, is put back together; a length over the limit is
/// refused RESOURCE_EXHAUSTED from the prefix, before the rest is sent; a compressed
/// message without `grpc-encoding`, a body cut short and a second message are INTERNAL
/// (as tonic answers them).
#[tokio::test]
async fn model_infer_messages_framed_by_hand() {
    use prost::Message as _;
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let config = ServeConfig { max_body_bytes: 64 << 10, ..test_config() };
    let server = Both::start(&site, config).await;
    let tcp = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let message = sensors_raw("fault", &rows(2), 2).encode_to_vec();
    let framed = |flag: u8, message: &[u8]| {
        let mut framed = vec![flag];
        framed.extend(u32::try_from(message.len()).unwrap().to_be_bytes());
        framed.extend(message);
        framed
    };
    let whole = framed(0, &message);
    let split = vec![whole[..3].to_vec(), whole[3..10].to_vec(), whole[10..].to_vec()];
    let (status, text, data) = bare_infer(&mut sender, server.grpc, split, true).await;
    assert_eq!((status.as_str(), text.as_str()), ("0", ""));
    assert_eq!(u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize, data.len() - 5);
    let answer = falaj_agent::grpc::proto::ModelInferResponse::decode(&data[5..]).unwrap();
    assert_eq!(answer.outputs.len(), 2);
    assert_eq!(answer.outputs[0].shape[0], 2);
    // The same call in one frame answers the same bytes.
    let (_, _, again) = bare_infer(&mut sender, server.grpc, vec![whole.clone()], true).await;
    assert_eq!(again, data);

    // 1 MiB announced, 5 bytes sent, the body left open: refused from the prefix.
    let prefix = vec![0, 0, 0x10, 0, 0];
    let (status, text, _) = bare_infer(&mut sender, server.grpc, vec![prefix], false).await;
    assert_eq!(status, "8", "{text}");
    assert_eq!(text, "request exceeds the limit of 65536 bytes");

    let compressed = vec![framed(1, &message)];
    let (status, text, _) = bare_infer(&mut sender, server.grpc, compressed, true).await;
    assert_eq!(status, (Code::Internal as i32).to_string(), "{text}");
    let cut = vec![whole[..whole.len() - 1].to_vec()];
    let (status, text, _) = bare_infer(&mut sender, server.grpc, cut, true).await;
    assert_eq!(status, (Code::Internal as i32).to_string(), "{text}");
    let two = vec![whole.clone(), whole.clone()];
    let (status, text, _) = bare_infer(&mut sender, server.grpc, two, true).await;
    assert_eq!(status, (Code::Internal as i32).to_string(), "{text}");
    // The connection still serves calls.
    let (status, _, _) = bare_infer(&mut sender, server.grpc, vec![whole], true).await;
    assert_eq!(status, "0");
    server.stop().await;
}

/// Takes both request slots of a one-worker server with two REST requests that announce
/// bodies they never send; the slots are free again when the sockets are dropped.
pub(crate) async fn hold_slots(server: &mut Both) -> Vec<std::net::TcpStream> {
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut socket = std::net::TcpStream::connect(server.http).unwrap();
        write!(
            socket,
            "POST /v2/models/fault/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{"
        )
        .unwrap();
        held.push(socket);
    }
    server.slots.wait_for(|g| g.admitted == 2).await.unwrap();
    held
}

#[tokio::test]
async fn grpc_waits_in_the_same_request_slots_as_rest() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let config =
        ServeConfig { workers: 1, queue_timeout: Duration::from_millis(100), ..test_config() };
    let mut server = Both::start(&site, config).await;
    let held = hold_slots(&mut server).await;
    let mut client = server.client().await;
    let err = client.model_infer(sensors_raw("fault", &rows(1), 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("request slots stayed taken"), "{err:?}");
    drop(held);
    server.slots.wait_for(|g| g.admitted == 0).await.unwrap();
    let ok = client.model_infer(sensors_raw("fault", &rows(1), 1)).await.unwrap().into_inner();
    assert_eq!(ok.outputs.len(), 2);
    server.stop().await;
}

/// The calls of one connection are polled in the connection's task: one waiting (for a
/// request slot) must not hold up the others on the same connection, and it is answered
/// when a slot frees.
#[tokio::test]
async fn calls_multiplexed_on_one_connection_do_not_wait_for_each_other() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let config =
        ServeConfig { workers: 1, queue_timeout: Duration::from_secs(60), ..test_config() };
    let mut server = Both::start(&site, config).await;
    let held = hold_slots(&mut server).await;
    // Clones of a channel share its one HTTP/2 connection.
    let client = server.client().await;
    let waiting = tokio::spawn({
        let mut client = client.clone();
        async move { client.model_infer(sensors_raw("fault", &rows(3), 3)).await }
    });
    server.slots.wait_for(|g| g.waiting == 1).await.unwrap();
    let mut other = client.clone();
    assert!(other.server_live(ServerLiveRequest {}).await.unwrap().into_inner().live);
    let ready = other
        .model_ready(ModelReadyRequest { name: "fault".into(), version: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert!(ready.ready);
    // A second inference call queues behind the first on the same connection.
    let second = tokio::spawn({
        let mut client = client.clone();
        async move { client.model_infer(sensors_raw("fault", &rows(1), 1)).await }
    });
    server.slots.wait_for(|g| g.waiting == 2).await.unwrap();
    assert!(!waiting.is_finished());
    drop(held);
    let first = waiting.await.unwrap().unwrap().into_inner();
    assert_eq!(first.outputs[0].shape[0], 3);
    let second = second.await.unwrap().unwrap().into_inner();
    assert_eq!(second.outputs[0].shape[0], 1);
    server.stop().await;
}

#[tokio::test]
async fn a_deadline_ends_a_call_waiting_for_a_slot_with_deadline_exceeded() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    // The queue would wait a minute; the client's deadline is what ends the wait.
    let config =
        ServeConfig { workers: 1, queue_timeout: Duration::from_secs(60), ..test_config() };
    let mut server = Both::start(&site, config).await;
    let held = hold_slots(&mut server).await;
    // The generated client over a bare HTTP/2 connection (hyper's): tonic's channel would
    // end a call past its `grpc-timeout` itself, as CANCELLED, before the server's answer
    // arrived; this one leaves the deadline to the server, as Triton's clients' servers do.
    let tcp = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let bare =
        tower::service_fn(move |request: tonic::codegen::http::Request<tonic::body::Body>| {
            let mut sender = sender.clone();
            async move { sender.send_request(request).await }
        });
    let origin = format!("http://{}", server.grpc).parse().unwrap();
    let mut client = GrpcInferenceServiceClient::with_origin(bare, origin);
    let mut request = tonic::Request::new(sensors_raw("fault", &rows(1), 1));
    request.set_timeout(Duration::from_millis(200));
    let err = client.model_infer(request).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("deadline (200ms) passed"), "{err:?}");
    // The server gave up the wait for a slot too.
    server.slots.wait_for(|g| g.waiting == 0).await.unwrap();
    drop(held);
    server.slots.wait_for(|g| g.admitted == 0).await.unwrap();
    // A deadline the call meets changes nothing.
    let mut request = tonic::Request::new(sensors_raw("fault", &rows(1), 1));
    request.set_timeout(Duration::from_secs(60));
    let ok = client.model_infer(request).await.unwrap().into_inner();
    assert_eq!(ok.outputs.len(), 2);
    server.stop().await;
}

#[tokio::test]
async fn a_stream_answers_in_order_and_survives_a_bad_request() {
    let site = Site::new();
    let model_bytes = classifier();
    site.install("fault", 1, &model_bytes);
    let server = Both::start(&site, test_config()).await;
    let mut client = server.client().await;
    let x = rows(3);
    let requests = vec![
        ModelInferRequest { id: "a".into(), ..sensors_raw("fault", &x[..8], 1) },
        ModelInferRequest { id: "b".into(), ..sensors_raw("nope", &x[..8], 1) },
        ModelInferRequest { id: "c".into(), ..sensors_raw("fault", &x, 3) },
    ];
    let mut replies =
        client.model_stream_infer(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let mut got = Vec::new();
    while let Some(reply) = replies.message().await.unwrap() {
        got.push(reply);
    }
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].infer_response.as_ref().unwrap().id, "a");
    assert_eq!(got[1].error_message, "unknown model \"nope\"");
    assert!(got[1].infer_response.is_none());
    let c = got[2].infer_response.as_ref().unwrap();
    assert_eq!((c.id.as_str(), c.outputs[0].shape.as_slice()), ("c", &[3i64, 3][..]));
    let direct = OnnxModel::load(&model_bytes)
        .unwrap()
        .run(vec![Tensor { shape: vec![3, 8], data: TensorData::Fp32(x.clone()) }])
        .unwrap();
    let TensorData::Fp32(p) = &direct[0].data else { panic!() };
    assert_eq!(c.raw_output_contents[0], raw_fp32(p));
    server.stop().await;
}

/// `falaj_inference_requests_total` of a model, from /metrics.
async fn requests_total(http: SocketAddr, model: &str) -> u64 {
    let text = reqwest::get(format!("http://{http}/metrics")).await.unwrap().text().await.unwrap();
    let prefix = format!("falaj_inference_requests_total{{model=\"{model}\",version=\"1\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse().unwrap())
}

/// Requests each client sends in the metrics test.
const EACH: usize = 40;

#[tokio::test]
async fn rest_and_grpc_clients_in_parallel_see_the_same_metrics() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let server = Both::start(&site, test_config()).await;
    let x = rows(2);
    let grpc = {
        let mut client = server.client().await;
        let x = x.clone();
        tokio::spawn(async move {
            for _ in 0..EACH {
                client.model_infer(sensors_raw("fault", &x, 2)).await.unwrap();
            }
        })
    };
    let rest = {
        let http = server.http;
        let x = x.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let body = serde_json::json!({"inputs": [{"name": "sensors", "shape": [2, 8], "datatype": "FP32", "data": x}]});
            for _ in 0..EACH {
                let r = client
                    .post(format!("http://{http}/v2/models/fault/infer"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        })
    };
    grpc.await.unwrap();
    rest.await.unwrap();
    // A refused gRPC request is counted as REST's are.
    let mut client = server.client().await;
    let bad = ModelInferRequest {
        model_name: "fault".into(),
        inputs: vec![input(
            "sensors",
            "FP32",
            &[1, 7],
            Some(InferTensorContents { fp32_contents: vec![0.0; 7], ..Default::default() }),
        )],
        ..Default::default()
    };
    assert_eq!(client.model_infer(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let total = requests_total(server.http, "fault").await;
    assert_eq!(total, 2 * EACH as u64 + 1, "every request of both clients is counted once");
    let text = reqwest::get(format!("http://{}/metrics", server.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("falaj_inference_errors_total{model=\"fault\",version=\"1\"} 1"),
        "{text}"
    );
    server.stop().await;
}
