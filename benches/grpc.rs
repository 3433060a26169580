//! gRPC against REST with binary tensors, on one agent in one run: the sample model (8
//! features, a small MLP) and a larger one (a CNN over 3×32×32 images, 12 KiB a row), at
//! batch 1 and 64, one client at a time with a kept-alive connection. REST binary is the
//! anchor; each gRPC row gives its p50 as a ratio of REST's (target: at most 1.0). The two
//! transports run in alternating rounds and each figure is the median round, so drift on a
//! shared machine lands on both.
//!
//! `cargo bench --bench grpc -- [--seconds N] [--rounds R]`; prints a Markdown table for
//! BENCHMARKS.md.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use falaj_agent::grpc::proto::ModelInferRequest;
use falaj_agent::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use falaj_agent::grpc::proto::model_infer_request::InferInputTensor;
use falaj_agent::server::{ServeConfig, Server};
use falaj_agent::store::Store;
use falaj_control::keys::{self, InitOptions};
use falaj_control::sample::SampleOptions;

#[path = "support/inference.rs"]
mod inference;

use inference::{Run, Subject, arg, image_model, inputs, install, median};

async fn rest(http: SocketAddr, subject: &Subject, batch: usize, seconds: f64) -> Result<Run> {
    let raw = inputs(subject, batch);
    let mut shape = vec![batch as i64];
    shape.extend(&subject.row);
    let header = serde_json::json!({
        "inputs": [{"name": subject.input, "shape": shape, "datatype": "FP32",
                    "parameters": {"binary_data_size": raw.len()}}],
        "parameters": {"binary_data_output": true},
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(&raw);
    let body = bytes::Bytes::from(body);
    let url = format!("http://{http}/v2/models/{}/infer", subject.name);
    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build()?;
    let (stop, started) = (Instant::now() + Duration::from_secs_f64(seconds), Instant::now());
    let mut latencies = Vec::new();
    while Instant::now() < stop {
        let t0 = Instant::now();
        let response = client
            .post(&url)
            .header("Inference-Header-Content-Length", header.len())
            .body(body.clone())
            .send()
            .await?
            .error_for_status()?;
        std::hint::black_box(response.bytes().await?);
        latencies.push(t0.elapsed());
    }
    Ok(Run { latencies, wall: started.elapsed() })
}

/// How the gRPC client reaches the server.
#[derive(Clone, Copy)]
enum Client {
    /// tonic's `Channel`, as a tonic user would connect.
    Channel,
    /// The same generated client over hyper's bare HTTP/2 connection: no `Channel` (whose
    /// buffer hands every call to a background task), to tell its cost from the rest.
    Bare,
}

async fn grpc(
    addr: SocketAddr,
    how: Client,
    subject: &Subject,
    batch: usize,
    seconds: f64,
) -> Result<Run> {
    match how {
        Client::Channel => {
            // A well-configured client: TCP_NODELAY (tonic's default, set here to say so)
            // and the server's fixed flow-control windows, so a 768 KiB request is not held
            // back by HTTP/2's 64 KiB default window, and no adaptive-window BDP pings.
            let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
                .tcp_nodelay(true)
                .initial_stream_window_size(falaj_agent::grpc::STREAM_WINDOW)
                .initial_connection_window_size(falaj_agent::grpc::CONNECTION_WINDOW)
                .connect()
                .await?;
            calls(GrpcInferenceServiceClient::new(channel), subject, batch, seconds).await
        }
        Client::Bare => {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let (sender, connection) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .initial_stream_window_size(falaj_agent::grpc::STREAM_WINDOW)
                    .initial_connection_window_size(falaj_agent::grpc::CONNECTION_WINDOW)
                    .handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await?;
            tokio::spawn(connection);
            let bare = Bare(sender);
            let origin = format!("http://{addr}").parse()?;
            calls(GrpcInferenceServiceClient::with_origin(bare, origin), subject, batch, seconds)
                .await
        }
    }
}

/// hyper's HTTP/2 connection as the service the generated client calls.
#[derive(Clone)]
struct Bare(hyper::client::conn::http2::SendRequest<tonic::body::Body>);

type Answer = tonic::codegen::http::Response<hyper::body::Incoming>;

impl tonic::codegen::Service<tonic::codegen::http::Request<tonic::body::Body>> for Bare {
    type Response = Answer;
    type Error = hyper::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Answer, hyper::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), hyper::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.0.send_request(request))
    }
}

/// ModelInfer calls one after another on `client` for `seconds`.
async fn calls<T>(
    client: GrpcInferenceServiceClient<T>,
    subject: &Subject,
    batch: usize,
    seconds: f64,
) -> Result<Run>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut client =
        client.max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
    let mut shape = vec![batch as i64];
    shape.extend(&subject.row);
    let request = ModelInferRequest {
        model_name: subject.name.into(),
        inputs: vec![InferInputTensor {
            name: subject.input.into(),
            datatype: "FP32".into(),
            shape,
            parameters: HashMap::new(),
            contents: None,
        }],
        raw_input_contents: vec![inputs(subject, batch).into()],
        ..Default::default()
    };
    let (stop, started) = (Instant::now() + Duration::from_secs_f64(seconds), Instant::now());
    let mut latencies = Vec::new();
    while Instant::now() < stop {
        let t0 = Instant::now();
        let response = client.model_infer(request.clone()).await?;
        std::hint::black_box(response.into_inner());
        latencies.push(t0.elapsed());
    }
    Ok(Run { latencies, wall: started.elapsed() })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let seconds = arg(&args, "--seconds", 2.0)?;
    let rounds = arg(&args, "--rounds", 3.0)? as usize;
    let dir = tempfile::tempdir()?;
    let now = SystemTime::now();
    let made = falaj_control::sample::write(&dir.path().join("sample"), &SampleOptions::default())?;
    let keys_dir = dir.path().join("keys");
    keys::init(&keys_dir, &InitOptions::new("bench-1"), now)?;
    let agent = dir.path().join("agent");
    Store::init(&agent, "bench-1", &std::fs::read(keys_dir.join("root.json"))?, now)?;
    install(&agent, &keys_dir, &made.model, "sensor-fault", Some(&made.reference))?;
    let cnn = dir.path().join("cnn.onnx");
    std::fs::write(&cnn, image_model())?;
    install(&agent, &keys_dir, &cnn, "cnn", None)?;

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let server = runtime.block_on(Server::bind(
        agent,
        ServeConfig {
            http: "127.0.0.1:0".parse()?,
            grpc: Some("127.0.0.1:0".parse()?),
            ..ServeConfig::default()
        },
    ))?;
    let (http, grpc_addr) = (server.local_addr(), server.grpc_addr().context("gRPC bound")?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = runtime.spawn(server.run(async { drop(stop_rx.await) }));

    // The client runs on its own thread and runtime, as a separate process would.
    let subjects = [
        Subject { name: "sensor-fault", input: falaj_control::sample::INPUT, row: vec![8] },
        Subject { name: "cnn", input: "image", row: vec![3, 32, 32] },
    ];
    let table = std::thread::spawn(move || -> Result<Vec<String>> {
        let client = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        client.block_on(async move {
            let mut lines = Vec::new();
            for subject in &subjects {
                for batch in [1usize, 64] {
                    rest(http, subject, batch, 0.3).await?; // warm up
                    grpc(grpc_addr, Client::Channel, subject, batch, 0.3).await?;
                    grpc(grpc_addr, Client::Bare, subject, batch, 0.3).await?;
                    let (mut r, mut g, mut b) = (Vec::new(), Vec::new(), Vec::new());
                    for _ in 0..rounds.max(1) {
                        r.push(rest(http, subject, batch, seconds).await?);
                        g.push(grpc(grpc_addr, Client::Channel, subject, batch, seconds).await?);
                        b.push(grpc(grpc_addr, Client::Bare, subject, batch, seconds).await?);
                    }
                    let (r, g, b) = (median(r), median(g), median(b));
                    for (mode, run) in [
                        ("REST, binary tensors", &r),
                        ("gRPC, raw contents", &g),
                        ("gRPC, raw, bare HTTP/2 client", &b),
                    ] {
                        lines.push(format!(
                            "| {} | {batch} | {mode} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
                            subject.name,
                            run.latencies.len(),
                            run.p(0.5),
                            run.p(0.99),
                            run.throughput(),
                            run.throughput() * batch as f64,
                            run.p(0.5) / r.p(0.5),
                        ));
                    }
                }
            }
            Ok(lines)
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let _ = stop_tx.send(());
    runtime.block_on(serving)??;

    println!(
        "gRPC vs REST (binary tensors), one client, kept-alive connection; median of {rounds} \
         alternating rounds of {seconds} s each"
    );
    println!();
    println!(
        "| model | batch | transport | requests | p50 µs | p99 µs | req/s | rows/s | p50 / REST |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for line in table {
        println!("{line}");
    }
    Ok(())
}
