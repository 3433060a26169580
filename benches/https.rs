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
use falaj_agent::import::{self, ImportOptions};
use falaj_agent::server::{ServeConfig, Server};
use falaj_agent::store::Store;
use falaj_common::bundle::RuntimeHint;
use falaj_common::onnx::{Attr, GraphBuilder};
use falaj_common::random::SeededRng;
use falaj_common::tensor::{DataType, Dim};
use falaj_control::bundle::{self, BuildOptions};
use falaj_control::keys::{self, InitOptions};
use falaj_control::sample::SampleOptions;
use falaj_shell::tls::TlsFiles;
use http_body_util::{BodyExt, Full};
use rustls::pki_types::pem::PemObject as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

/// A model under test: its name, input and the shape of one row.
struct Subject {
    name: &'static str,
    input: &'static str,
    row: Vec<i64>,
}

impl Subject {
    fn row_len(&self) -> usize {
        self.row.iter().product::<i64>() as usize
    }
}

/// A CNN over [N, 3, 32, 32] images: conv 3→16, ReLU, conv 16→16, ReLU, pool, dense → 10
/// (the gRPC benchmark's).
fn image_model() -> Vec<u8> {
    let mut rng = SeededRng::new(5);
    let mut weights = |n: usize| (0..n).map(|_| rng.normal(0.0, 0.2) as f32).collect::<Vec<_>>();
    let n = || Dim::Symbol("N".into());
    let pads = || vec![Attr::Ints("pads", vec![1, 1, 1, 1])];
    let mut g = GraphBuilder::new("bench_cnn");
    g.input("image", DataType::Fp32, &[n(), Dim::Fixed(3), Dim::Fixed(32), Dim::Fixed(32)])
        .weights("c1.w", &[16, 3, 3, 3], &weights(432))
        .weights("c1.b", &[16], &weights(16))
        .node("Conv", &["image", "c1.w", "c1.b"], &["c1"], pads())
        .node("Relu", &["c1"], &["r1"], vec![])
        .weights("c2.w", &[16, 16, 3, 3], &weights(2304))
        .weights("c2.b", &[16], &weights(16))
        .node("Conv", &["r1", "c2.w", "c2.b"], &["c2"], pads())
        .node("Relu", &["c2"], &["r2"], vec![])
        .node("GlobalAveragePool", &["r2"], &["pool"], vec![])
        .node("Flatten", &["pool"], &["flat"], vec![Attr::Int("axis", 1)])
        .weights("fc.w", &[10, 16], &weights(160))
        .weights("fc.b", &[10], &weights(10))
        .node("Gemm", &["flat", "fc.w", "fc.b"], &["logits"], vec![Attr::Int("transB", 1)])
        .output("logits", DataType::Fp32, &[n(), Dim::Fixed(10)]);
    g.encode("bench")
}

fn install(agent: &Path, keys: &Path, model: &Path, name: &str) -> Result<()> {
    let now = SystemTime::now();
    let out = model.with_extension("falaj");
    bundle::build(
        &BuildOptions {
            keys: keys.to_owned(),
            model: model.to_owned(),
            name: name.into(),
            version: 1,
            reference: None,
            runtime: RuntimeHint::Cpu,
            lifetime: bundle::DEFAULT_LIFETIME,
            out: out.clone(),
            features: None,
            shapes: std::collections::BTreeMap::new(),
        },
        now,
    )?;
    let mut store = Store::open(agent)?;
    import::import_file(&mut store, &out, &ImportOptions::new(now), &mut |_, _| {})?;
    Ok(())
}

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

/// Latencies of one client for `seconds`.
struct Run {
    latencies: Vec<Duration>,
}

impl Run {
    fn p(&self, q: f64) -> f64 {
        let mut l = self.latencies.clone();
        l.sort_unstable();
        l[((l.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6
    }
}

fn inputs(subject: &Subject) -> Vec<u8> {
    let mut rng = SeededRng::new(1);
    (0..subject.row_len()).flat_map(|_| (rng.normal(0.0, 1.0) as f32).to_le_bytes()).collect()
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
    let raw = inputs(subject);
    let mut shape = vec![1i64];
    shape.extend(&subject.row);
    let header = serde_json::json!({
        "inputs": [{"name": subject.input, "shape": shape, "datatype": "FP32",
                    "parameters": {"binary_data_size": raw.len()}}],
        "parameters": {"binary_data_output": true},
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(&raw);
    let body = Bytes::from(body);
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
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
    Ok(Run { latencies })
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
        raw_input_contents: vec![inputs(subject)],
        ..Default::default()
    };
    let bearer: Option<tonic::metadata::MetadataValue<_>> =
        key.map(|k| format!("Bearer {k}").parse()).transpose()?;
    let stop = Instant::now() + Duration::from_secs_f64(seconds);
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
    Ok(Run { latencies })
}

/// The round whose p50 is the median of the rounds.
fn median(mut runs: Vec<Run>) -> Run {
    runs.sort_by(|a, b| a.p(0.5).total_cmp(&b.p(0.5)));
    runs.swap_remove(runs.len() / 2)
}

fn arg(args: &[String], name: &str, default: f64) -> Result<f64> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(Ok(default), |s| s.parse::<f64>())
        .with_context(|| format!("{name} takes a number"))
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
    install(&agent, &keys_dir, &made.model, "sensor-fault")?;
    let cnn = dir.path().join("cnn.onnx");
    std::fs::write(&cnn, image_model())?;
    install(&agent, &keys_dir, &cnn, "cnn")?;
    let key = ApiKeys::open(&agent)?.create("bench", Scope::All, None, now)?.secret;
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
