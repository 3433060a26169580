//! gRPC against REST with binary tensors, on one agent in one run: the sample model (8
//! features, a small MLP) and a larger one (a CNN over 3×32×32 images, 12 KiB a row), at
//! batch 1 and 64, one client at a time with one kept-alive connection. Two pairs of
//! clients: the usual ones (reqwest for REST, tonic's `Channel` for gRPC) and bare ones
//! (hyper's HTTP/1.1 connection, h2's HTTP/2 connection with the message encoded once), so
//! that the bare pair measures the servers. The modes run in rounds, each round starting
//! with the next mode, and each figure is the median round, so drift on a shared machine
//! lands on all of them. A gRPC row's last column is the median (and range) of its rounds'
//! p50 over the p50 of its pair's REST round in the same round, so that drift between
//! rounds cancels (target: at most 1.0).
//!
//! `cargo bench --bench grpc -- [--seconds N] [--rounds R]`; prints a Markdown table for
//! BENCHMARKS.md. `--only rest|rest-bare|grpc|bare`, `--model NAME` and `--batch N` run
//! one case of one mode, for a profiler (`perf record`).

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

use inference::{Run, Subject, arg, image_model, inputs, install, median, rest_body};

async fn rest(http: SocketAddr, subject: &Subject, batch: usize, seconds: f64) -> Result<Run> {
    let (header, body) = rest_body(subject, batch);
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

/// REST with binary tensors over hyper's bare HTTP/1.1 connection: the same request as
/// [`rest`] without reqwest's URL parsing and pool, as lean as the bare gRPC client.
async fn rest_bare(http: SocketAddr, subject: &Subject, batch: usize, seconds: f64) -> Result<Run> {
    use http_body_util::BodyExt as _;
    let (header, body) = rest_body(subject, batch);
    let tcp = tokio::net::TcpStream::connect(http).await?;
    tcp.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let uri: hyper::Uri = format!("/v2/models/{}/infer", subject.name).parse()?;
    // The headers made once, as the gRPC client's are: what a call costs the client is
    // then the protocol's, not the parsing of header names written as text.
    let mut headers = hyper::HeaderMap::new();
    headers.insert(hyper::header::HOST, http.to_string().try_into()?);
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(
        hyper::header::HeaderName::from_static("inference-header-content-length"),
        header.len().into(),
    );
    let (stop, started) = (Instant::now() + Duration::from_secs_f64(seconds), Instant::now());
    let mut latencies = Vec::new();
    while Instant::now() < stop {
        let t0 = Instant::now();
        let mut request =
            hyper::Request::post(uri.clone()).body(http_body_util::Full::new(body.clone()))?;
        *request.headers_mut() = headers.clone();
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        anyhow::ensure!(response.status().is_success(), "REST answered {}", response.status());
        std::hint::black_box(response.into_body().collect().await?.to_bytes());
        latencies.push(t0.elapsed());
    }
    Ok(Run { latencies, wall: started.elapsed() })
}

/// How the gRPC client reaches the server.
#[derive(Clone, Copy)]
enum Client {
    /// The generated client over tonic's `Channel`, as a tonic user would connect.
    Channel,
    /// A bare HTTP/2 connection (h2) sending the request message encoded once, reading
    /// the answer's bytes and checking its `grpc-status` without decoding it: what the
    /// bare REST client does with its body, so the pair measures the servers.
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
        Client::Bare => bare_calls(addr, subject, batch, seconds).await,
    }
}

/// The ModelInfer request of `batch` rows, raw contents.
fn infer_request(subject: &Subject, batch: usize) -> ModelInferRequest {
    let mut shape = vec![batch as i64];
    shape.extend(&subject.row);
    ModelInferRequest {
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
    }
}

/// ModelInfer calls over h2's bare HTTP/2 connection for `seconds` (see [`Client::Bare`]).
/// h2 directly rather than hyper's client, which wrote a request's HEADERS and DATA
/// frames in two writes (so the server often read and woke twice a call, strace); this
/// client writes a call once, as the bare HTTP/1.1 client does.
async fn bare_calls(
    addr: SocketAddr,
    subject: &Subject,
    batch: usize,
    seconds: f64,
) -> Result<Run> {
    use prost::Message as _;
    let message = infer_request(subject, batch).encode_to_vec();
    // A gRPC message: not compressed, its length, the message.
    let mut framed = vec![0u8];
    framed.extend(u32::try_from(message.len())?.to_be_bytes());
    framed.extend(message);
    let framed = bytes::Bytes::from(framed);
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (mut client, connection) = h2::client::Builder::new()
        .initial_window_size(falaj_agent::grpc::STREAM_WINDOW)
        .initial_connection_window_size(falaj_agent::grpc::CONNECTION_WINDOW)
        .handshake::<_, bytes::Bytes>(tcp)
        .await?;
    tokio::spawn(connection);
    let uri: hyper::Uri =
        format!("http://{addr}/inference.GRPCInferenceService/ModelInfer").parse()?;
    let mut headers = hyper::HeaderMap::new();
    let value = hyper::header::HeaderValue::from_static;
    headers.insert(hyper::header::CONTENT_TYPE, value("application/grpc"));
    headers.insert(hyper::header::TE, value("trailers"));
    let grpc_status = hyper::header::HeaderName::from_static("grpc-status");
    let (stop, started) = (Instant::now() + Duration::from_secs_f64(seconds), Instant::now());
    let mut latencies = Vec::new();
    while Instant::now() < stop {
        let t0 = Instant::now();
        let mut request = hyper::Request::post(uri.clone()).body(())?;
        *request.headers_mut() = headers.clone();
        client = client.ready().await?;
        let (response, mut stream) = client.send_request(request, false)?;
        stream.send_data(framed.clone(), true)?;
        let mut body = response.await?.into_body();
        let mut answer = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            body.flow_control().release_capacity(chunk.len())?;
            answer.push(chunk);
        }
        let trailers = body.trailers().await?;
        let status = trailers.as_ref().and_then(|t| t.get(&grpc_status));
        anyhow::ensure!(
            status.is_some_and(|s| s == "0"),
            "ModelInfer answered grpc-status {status:?}"
        );
        std::hint::black_box(answer);
        latencies.push(t0.elapsed());
    }
    Ok(Run { latencies, wall: started.elapsed() })
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
    let request = infer_request(subject, batch);
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

/// What one round measures.
#[derive(Clone, Copy)]
enum Mode {
    /// reqwest, as a REST user would connect.
    Rest,
    /// hyper's bare HTTP/1.1 connection.
    RestBare,
    Grpc(Client),
}

impl Mode {
    const ALL: [Mode; 4] =
        [Mode::Rest, Mode::RestBare, Mode::Grpc(Client::Channel), Mode::Grpc(Client::Bare)];

    /// The REST mode a mode's p50 is compared with: the bare clients with each other,
    /// the usual clients (reqwest, tonic's `Channel`) with each other.
    fn anchor(self) -> Mode {
        match self {
            Mode::Rest | Mode::Grpc(Client::Channel) => Mode::Rest,
            Mode::RestBare | Mode::Grpc(Client::Bare) => Mode::RestBare,
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Mode::Rest => "rest",
            Mode::RestBare => "rest-bare",
            Mode::Grpc(Client::Channel) => "grpc",
            Mode::Grpc(Client::Bare) => "bare",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Rest => "REST, binary tensors",
            Mode::RestBare => "REST, binary, bare HTTP/1.1 client",
            Mode::Grpc(Client::Channel) => "gRPC, raw contents",
            Mode::Grpc(Client::Bare) => "gRPC, raw, bare HTTP/2 client",
        }
    }

    async fn run(
        self,
        (http, grpc_addr): (SocketAddr, SocketAddr),
        subject: &Subject,
        batch: usize,
        seconds: f64,
    ) -> Result<Run> {
        match self {
            Mode::Rest => rest(http, subject, batch, seconds).await,
            Mode::RestBare => rest_bare(http, subject, batch, seconds).await,
            Mode::Grpc(how) => grpc(grpc_addr, how, subject, batch, seconds).await,
        }
    }
}

/// The table's lines of one case: each mode's median round, and a gRPC mode's ratios to
/// its pair's REST mode, round by round.
fn table_lines(name: &str, batch: usize, modes: &[Mode], runs: Vec<Vec<Run>>) -> Vec<String> {
    let ratios: Vec<Option<Vec<f64>>> =
        modes.iter().map(|mode| paired(modes, &runs, *mode)).collect();
    let runs: Vec<Run> = runs.into_iter().map(median).collect();
    let mut lines = Vec::new();
    for ((mode, run), ratios) in modes.iter().zip(&runs).zip(&ratios) {
        let ratio = ratios.as_deref().map_or(String::new(), |r| {
            format!("{:.2} ({:.2}–{:.2})", r[r.len() / 2], r[0], r[r.len() - 1])
        });
        lines.push(format!(
            "| {name} | {batch} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {ratio} |",
            mode.label(),
            run.latencies.len(),
            run.p(0.5),
            run.p(0.99),
            run.throughput(),
            run.throughput() * batch as f64,
        ));
    }
    lines
}

/// The rounds' ratios of `mode`'s p50 to its anchor's p50 in the same round, sorted (each
/// round's pair ran seconds apart, so drift of the machine between rounds cancels); `None`
/// for a REST mode or when its anchor did not run.
fn paired(modes: &[Mode], runs: &[Vec<Run>], mode: Mode) -> Option<Vec<f64>> {
    let find = |m: Mode| modes.iter().position(|x| x.flag() == m.flag());
    let (i, anchor) = (find(mode)?, find(mode.anchor())?);
    if i == anchor {
        return None;
    }
    let mut ratios: Vec<f64> =
        runs[i].iter().zip(&runs[anchor]).map(|(run, rest)| run.p(0.5) / rest.p(0.5)).collect();
    ratios.sort_by(f64::total_cmp);
    Some(ratios)
}

/// The text after `name` in `args`.
fn text_arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn main() -> Result<()> {
    // The daemon's log setup: without a subscriber, h2's and tonic's trace-level spans were
    // built on every call (about 1.5 µs a call in a profile), which no agent does.
    falaj_shell::daemon::log_to_stderr("info");
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
    // `--only MODE --model NAME --batch N` runs one mode of one case (for a profiler).
    let only = text_arg(&args, "--only");
    let only_model = text_arg(&args, "--model");
    let only_batch = text_arg(&args, "--batch").map(|b| b.parse::<usize>()).transpose()?;
    let modes: Vec<Mode> =
        Mode::ALL.into_iter().filter(|m| only.as_deref().is_none_or(|o| o == m.flag())).collect();
    anyhow::ensure!(!modes.is_empty(), "--only takes rest, rest-bare, grpc or bare");
    let table = std::thread::spawn(move || -> Result<Vec<String>> {
        let client = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        client.block_on(async move {
            let mut lines = Vec::new();
            for subject in &subjects {
                if only_model.as_deref().is_some_and(|m| m != subject.name) {
                    continue;
                }
                for batch in [1usize, 64] {
                    if only_batch.is_some_and(|b| b != batch) {
                        continue;
                    }
                    let addrs = (http, grpc_addr);
                    for &mode in &modes {
                        mode.run(addrs, subject, batch, 0.3).await?; // warm up
                    }
                    let mut runs: Vec<Vec<Run>> = modes.iter().map(|_| Vec::new()).collect();
                    for round in 0..rounds.max(1) {
                        // Each round starts with the next mode, so none is always first.
                        for k in 0..modes.len() {
                            let i = (round + k) % modes.len();
                            runs[i].push(modes[i].run(addrs, subject, batch, seconds).await?);
                        }
                    }
                    lines.extend(table_lines(subject.name, batch, &modes, runs));
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
         alternating rounds of {seconds} s each; p50 / REST: the median (and range) of the \
         rounds' ratios, each gRPC round against the REST round of its pair in the same round"
    );
    println!();
    println!(
        "| model | batch | transport | requests | p50 µs | p99 µs | req/s | rows/s | p50 / REST, by round |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for line in table {
        println!("{line}");
    }
    Ok(())
}
