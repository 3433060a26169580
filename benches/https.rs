//! HTTPS against HTTP on the agent's inference APIs, in one run: batch-1 inference on the
//! sample model (8 features) and a CNN (3×32×32 images, 12 KiB a row), one client at a
//! time with a kept-alive connection, over REST with binary tensors and over gRPC, each
//! plain (the anchor), over TLS, and over TLS with an API key checked on every request.
//! The modes run in alternating rounds (each round starting with the next mode) and each
//! figure is the median round (by p50), so drift on a shared machine lands on all of
//! them; the last columns are p50 and p99 as a ratio of the plain transport's.
//!
//! `cargo bench --bench https -- [--seconds N] [--rounds R]`; prints a Markdown table for
//! BENCHMARKS.md.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use bytes::Bytes;
use falaj_agent::apikeys::{ApiKeys, AuthMode, Scope};
use falaj_agent::grpc::proto::ModelInferRequest;
use falaj_agent::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use falaj_agent::grpc::proto::model_infer_request::InferInputTensor;
use falaj_agent::server::{ServeConfig, Server};
use falaj_agent::store::Store;
use falaj_control::keys::{self, InitOptions};
use falaj_control::sample::SampleOptions;
use falaj_shell::tls::TlsFiles;
use http_body_util::{BodyExt, Full};
use rustls::pki_types::pem::PemObject as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

#[path = "support/inference.rs"]
mod inference;

use inference::{Run, Subject, arg, image_model, inputs, install, median, rest_body};

/// A CA and a server certificate for 127.0.0.1 it signed: (CA PEM, files).
fn certificate(dir: &Path) -> Result<(String, TlsFiles)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate()?;
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    let cert = leaf.signed_by(&key, &issuer)?;
    let (certificate, key_file) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::write(&certificate, cert.pem())?;
    std::fs::write(&key_file, key.serialize_pem())?;
    Ok((ca_cert.pem(), TlsFiles { certificate, key: key_file, client_ca: None }))
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// One HTTP/1.1 client for both schemes (hyper's pooled client, as reqwest uses it),
/// trusting `ca`, keeping one connection alive.
fn http_client(ca: &str) -> Result<HttpClient> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build(connector))
}

async fn rest(
    client: &HttpClient,
    url: &str,
    key: Option<&str>,
    subject: &Subject,
    seconds: f64,
) -> Result<Run> {
    let (header, body) = rest_body(subject, 1);
    let started = Instant::now();
    let stop = started + Duration::from_secs_f64(seconds);
    let mut latencies = Vec::new();
    while Instant::now() < stop {
        let t0 = Instant::now();
        let mut request = hyper::Request::post(url)
            .header("Inference-Header-Content-Length", header.len())
            .header("Content-Type", "application/octet-stream");
        if let Some(key) = key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let response = client.request(request.body(Full::new(body.clone()))?).await?;
        anyhow::ensure!(response.status().is_success(), "{url}: {}", response.status());
        std::hint::black_box(response.into_body().collect().await?.to_bytes());
        latencies.push(t0.elapsed());
    }
    Ok(Run { latencies, wall: started.elapsed() })
}

async fn grpc(channel: Channel, key: Option<&str>, subject: &Subject, seconds: f64) -> Result<Run> {
    let mut client = GrpcInferenceServiceClient::new(channel);
    let mut shape = vec![1i64];
    shape.extend(&subject.row);
    let message = ModelInferRequest {
        model_name: subject.name.into(),
        inputs: vec![InferInputTensor {
            name: subject.input.into(),
            datatype: "FP32".into(),
            shape,
            parameters: HashMap::new(),
            contents: None,
        }],
        raw_input_contents: vec![inputs(subject, 1).into()],
        ..Default::default()
    };
    let bearer: Option<tonic::metadata::MetadataValue<_>> =
        key.map(|k| format!("Bearer {k}").parse()).transpose()?;
    let started = Instant::now();
    let stop = started + Duration::from_secs_f64(seconds);
    let mut latencies = Vec::new();
    while Instant::now() < stop {
        let t0 = Instant::now();
        let mut request = tonic::Request::new(message.clone());
        if let Some(bearer) = &bearer {
            request.metadata_mut().insert("authorization", bearer.clone());
        }
        std::hint::black_box(client.model_infer(request).await?.into_inner());
        latencies.push(t0.elapsed());
    }
    Ok(Run { latencies, wall: started.elapsed() })
}

/// One endpoint pair under test: its REST and gRPC addresses.
#[derive(Clone, Copy)]
struct Endpoints {
    http: SocketAddr,
    grpc: SocketAddr,
}

#[allow(clippy::too_many_lines)] // setup, the alternating rounds, the table: one story
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
    install(&agent, &keys_dir, &made.model, "sensor-fault", None)?;
    let cnn = dir.path().join("cnn.onnx");
    std::fs::write(&cnn, image_model())?;
    install(&agent, &keys_dir, &cnn, "cnn", None)?;
    let key = ApiKeys::open(&agent)?.create("bench", Scope::All, None, None, now)?.secret;
    let (ca, files) = certificate(dir.path())?;

    // Three agents over one store: plain, TLS, TLS with API keys.
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut servers = Vec::new();
    let mut endpoints = Vec::new();
    for (tls, auth) in
        [(None, None), (Some(files.clone()), None), (Some(files), Some(AuthMode::ApiKey))]
    {
        let config = ServeConfig {
            http: "127.0.0.1:0".parse()?,
            grpc: Some("127.0.0.1:0".parse()?),
            tls,
            auth,
            // Each mode's kept-alive connection idles while the others run their rounds;
            // the default 10 s head deadline would close it under the client.
            header_timeout: Duration::from_secs(600),
            ..ServeConfig::default()
        };
        let server = runtime.block_on(Server::bind(agent.clone(), config))?;
        endpoints.push(Endpoints {
            http: server.local_addr(),
            grpc: server.grpc_addr().context("gRPC bound")?,
        });
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        servers.push((stop_tx, runtime.spawn(server.run(async { drop(stop_rx.await) }))));
    }

    let subjects = [
        Subject { name: "sensor-fault", input: falaj_control::sample::INPUT, row: vec![8] },
        Subject { name: "cnn", input: "image", row: vec![3, 32, 32] },
    ];
    // The client runs on its own thread and runtime, as a separate process would.
    let table = std::thread::spawn(move || -> Result<Vec<String>> {
        let client = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        client.block_on(async move {
            let http = http_client(&ca)?;
            let grpc_tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca))
                .domain_name("localhost");
            let mut channels = Vec::new();
            for (i, e) in endpoints.iter().enumerate() {
                let channel = if i == 0 {
                    Channel::from_shared(format!("http://{}", e.grpc))?.connect().await?
                } else {
                    Channel::from_shared(format!("https://127.0.0.1:{}", e.grpc.port()))?
                        .tls_config(grpc_tls.clone())?
                        .connect()
                        .await?
                };
                channels.push(channel);
            }
            let modes = ["plain", "TLS", "TLS + API key"];
            let mut lines = Vec::new();
            for subject in &subjects {
                let urls: Vec<String> = endpoints
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        let scheme = if i == 0 { "http" } else { "https" };
                        format!(
                            "{scheme}://127.0.0.1:{}/v2/models/{}/infer",
                            e.http.port(),
                            subject.name
                        )
                    })
                    .collect();
                let keyed = |i: usize| (i == 2).then_some(key.as_str());
                for i in 0..3 {
                    rest(&http, &urls[i], keyed(i), subject, 0.3).await?; // warm up
                    grpc(channels[i].clone(), keyed(i), subject, 0.3).await?;
                }
                let mut runs: Vec<Vec<Run>> = (0..6).map(|_| Vec::new()).collect();
                for round in 0..rounds.max(1) {
                    // Each round starts with another mode, so none always runs first.
                    for i in (0..3).map(|i| (i + round) % 3) {
                        runs[i].push(rest(&http, &urls[i], keyed(i), subject, seconds).await?);
                        let g = grpc(channels[i].clone(), keyed(i), subject, seconds).await?;
                        runs[3 + i].push(g);
                    }
                }
                let runs: Vec<Run> = runs.into_iter().map(median).collect();
                for (t, transport) in ["REST, binary", "gRPC, raw"].iter().enumerate() {
                    let anchor = &runs[3 * t];
                    for (i, mode) in modes.iter().enumerate() {
                        let run = &runs[3 * t + i];
                        lines.push(format!(
                            "| {} | {transport} | {mode} | {} | {:.0} | {:.0} | {:.2} | {:.2} |",
                            subject.name,
                            run.latencies.len(),
                            run.p(0.5),
                            run.p(0.99),
                            run.p(0.5) / anchor.p(0.5),
                            run.p(0.99) / anchor.p(0.99),
                        ));
                    }
                }
            }
            Ok(lines)
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    for (stop, task) in servers {
        let _ = stop.send(());
        runtime.block_on(task)??;
    }

    println!(
        "HTTPS vs HTTP at batch 1, one client, kept-alive connection; median of {rounds} \
         alternating rounds of {seconds} s each"
    );
    println!();
    println!(
        "| model | transport | mode | requests | p50 µs | p99 µs | p50 / plain | p99 / plain |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for line in table {
        println!("{line}");
    }
    Ok(())
}
