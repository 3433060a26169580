//! The inference APIs over TLS with authentication, as real clients see them: curl over
//! HTTPS (401 without a key, 403 for a model outside the key's scope, 200 within it; health
//! open; mutual TLS with and without a client certificate), tonic's gRPC client over TLS
//! (UNAUTHENTICATED, PERMISSION_DENIED, and the same with client certificates), keys made
//! and revoked by `falaj-agent apikey` in another process taking effect at the next request,
//! a certificate replaced on SIGHUP, and settings that must not start. Certificates are made
//! here with rcgen.

use crate::support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use falaj_agent::apikeys::AuthMode;
use falaj_agent::grpc::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use falaj_agent::grpc::proto::model_infer_request::InferInputTensor;
use falaj_agent::grpc::proto::{
    InferTensorContents, ModelInferRequest, ModelMetadataRequest, RepositoryIndexRequest,
    ServerLiveRequest, ServerMetadataRequest,
};
use falaj_agent::server::ServeConfig;
use falaj_shell::tls::TlsFiles;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
use support::{Site, classifier, serve, test_config};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const AGENT: &str = env!("CARGO_BIN_EXE_falaj-agent");

/// A CA and a certificate it signed, as PEM files in a directory.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Writes `NAME-ca.pem`, and `NAME.pem` / `NAME.key` for a server on 127.0.0.1 and
    /// localhost (or, with `client`, a client certificate).
    fn make(dir: &Path, name: &str, client: bool) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} CA"));
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = if client {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            p
        } else {
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap()
        };
        leaf.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(format!("{name}-ca.pem")), ca_cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        Self { dir: dir.to_owned() }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn s(&self, file: &str) -> String {
        self.path(file).to_str().unwrap().to_owned()
    }
}

/// `curl -s ARGS URL`: the HTTP status (0 when the connection or TLS fails) and the body.
fn curl(url: &str, args: &[&str]) -> (u32, String) {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "30", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// curl trusting `ca`, with `key` as a bearer token if given.
fn curl_key(url: &str, ca: &str, key: Option<&str>, extra: &[&str]) -> (u32, String) {
    let auth = key.map(|k| format!("Authorization: Bearer {k}"));
    let mut args = vec!["--cacert", ca];
    if let Some(auth) = &auth {
        args.extend(["-H", auth]);
    }
    args.extend(extra);
    curl(url, &args)
}

const INFER: &str = r#"{"inputs": [{"name": "sensors", "shape": [1, 8], "datatype": "FP32",
    "data": [65.0, 3.0, 6.0, 12.0, 1500.0, 50.0, 400.0, 70.0]}]}"#;

fn post_json() -> Vec<&'static str> {
    vec!["-X", "POST", "-H", "Content-Type: application/json", "-d", INFER]
}

/// `falaj-agent apikey ARGS --data-dir DIR`; returns stdout (the secret, for create).
fn apikey(site: &Site, args: &[&str]) -> String {
    let out = Command::new(AGENT)
        .arg("apikey")
        .args(args)
        .arg("--data-dir")
        .arg(site.data_dir())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "apikey {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn site() -> Site {
    let site = Site::new();
    site.install("sensor", 1, &classifier());
    site.install("other", 1, &classifier());
    site
}

fn error_of(body: &str) -> String {
    let value: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    value["error"].as_str().unwrap_or_else(|| panic!("no error in {body}")).to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_api_keys_as_curl_sees_them() {
    let site = site();
    let pki = Pki::make(&site.dir.path().join("tls"), "server", false);
    let ops = apikey(&site, &["create", "--name", "ops"]);
    let app = apikey(&site, &["create", "--name", "app", "--models", "sensor"]);
    let old = apikey(&site, &["create", "--name", "old", "--expires-in", "0s"]);
    let metered = apikey(&site, &["create", "--name", "metered", "--rate", "2/h"]);
    assert!(ops.starts_with("falaj_") && app.starts_with("falaj_"), "{ops} {app}");
    let listed = apikey(&site, &["list"]);
    assert!(listed.contains("app") && listed.contains("sensor"), "{listed}");
    assert!(listed.lines().any(|l| l.starts_with("metered ") && l.contains(" 2/h ")), "{listed}");
    assert!(listed.lines().any(|l| l.starts_with("old ") && l.contains("expired")), "{listed}");
    assert!(!listed.contains(&ops), "list never shows a secret: {listed}");

    let config = ServeConfig {
        tls: Some(TlsFiles {
            certificate: pki.path("server.pem"),
            key: pki.path("server.key"),
            client_ca: None,
        }),
        auth: Some(AuthMode::ApiKey),
        ..test_config()
    };
    let running = serve(&site, config).await;
    let base = format!("https://127.0.0.1:{}", running.addr.port());
    let ca = pki.s("server-ca.pem");
    let infer = |model: &str, key: Option<&str>| {
        curl_key(&format!("{base}/v2/models/{model}/infer"), &ca, key, &post_json())
    };

    // Health is open; everything else needs a key.
    assert_eq!(curl_key(&format!("{base}/v2/health/live"), &ca, None, &[]).0, 200);
    assert_eq!(curl_key(&format!("{base}/v2/health/ready"), &ca, None, &[]).0, 200);
    let (status, body) = infer("sensor", None);
    assert_eq!(status, 401, "{body}");
    assert!(error_of(&body).contains("Authorization: Bearer"), "{body}");
    let head = curl_key(&format!("{base}/v2"), &ca, None, &["-D", "-", "-o", "/dev/null"]).1;
    assert!(head.to_lowercase().contains("www-authenticate: bearer"), "{head}");
    let (status, body) = infer("sensor", Some("falaj_0000"));
    assert_eq!((status, error_of(&body)), (401, "unknown API key".to_owned()));
    let (status, body) = infer("sensor", Some(&old));
    assert_eq!(status, 401);
    assert!(error_of(&body).contains("API key old expired at"), "{body}");

    // A key scoped to one model: 200 there, 403 elsewhere and on what spans models.
    let (status, body) = infer("sensor", Some(&app));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"model_name\":\"sensor\""), "{body}");
    let (status, body) = infer("other", Some(&app));
    assert_eq!(status, 403, "{body}");
    assert!(error_of(&body).contains("may not call model \"other\""), "{body}");
    assert_eq!(curl_key(&format!("{base}/v2/models/other"), &ca, Some(&app), &[]).0, 403);
    assert_eq!(curl_key(&format!("{base}/v2/models/sensor/ready"), &ca, Some(&app), &[]).0, 200);
    assert_eq!(curl_key(&format!("{base}/v1/features"), &ca, Some(&app), &[]).0, 403);
    assert_eq!(curl_key(&format!("{base}/v1/features"), &ca, Some(&ops), &[]).0, 200);
    // Server metadata and /metrics: any valid key.
    assert_eq!(curl_key(&format!("{base}/v2"), &ca, Some(&app), &[]).0, 200);
    assert_eq!(curl_key(&format!("{base}/metrics"), &ca, None, &[]).0, 401);
    let (status, metrics) = curl_key(&format!("{base}/metrics"), &ca, Some(&app), &[]);
    assert_eq!(status, 200);
    assert!(metrics.contains("sensor"), "{metrics}");
    assert_eq!(infer("other", Some(&ops)).0, 200);

    // A key held to two requests an hour, both at once: the third is refused 429 with
    // when to come back (in half an hour), and other keys are not held back by it.
    assert_eq!(infer("sensor", Some(&metered)).0, 200);
    assert_eq!(infer("other", Some(&metered)).0, 200);
    let mut with_head = vec!["-D", "-"];
    with_head.extend(post_json());
    let url = format!("{base}/v2/models/sensor/infer");
    let (status, text) = curl_key(&url, &ca, Some(&metered), &with_head);
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("API key metered is over its rate of 2/h"), "{text}");
    let retry_after: u64 = text
        .lines()
        .find_map(|l| l.to_lowercase().strip_prefix("retry-after:").map(|v| v.trim().parse()))
        .expect("a Retry-After header")
        .unwrap();
    assert!((29 * 60..=30 * 60).contains(&retry_after), "{text}");
    assert_eq!(infer("sensor", Some(&ops)).0, 200);
    // Each key's requests by outcome.
    let metrics = curl_key(&format!("{base}/metrics"), &ca, Some(&ops), &[]).1;
    let count = |key: &str, outcome: &str| -> f64 {
        let labels =
            format!("falaj_api_key_requests_total{{key=\"{key}\",outcome=\"{outcome}\"}} ");
        let line = metrics.lines().find_map(|l| l.strip_prefix(&labels));
        line.unwrap_or_else(|| panic!("{labels} in {metrics}")).parse().unwrap()
    };
    assert_eq!((count("metered", "admitted"), count("metered", "throttled")), (2.0, 1.0));
    assert_eq!((count("app", "forbidden"), count("app", "throttled")), (3.0, 0.0));

    // TLS only: plain HTTP on the port is no answer, and an untrusted CA fails.
    let plain = format!("http://127.0.0.1:{}/v2/health/live", running.addr.port());
    assert_ne!(curl(&plain, &[]).0, 200);
    let stranger = Pki::make(&site.dir.path().join("tls"), "stranger", false);
    assert_eq!(
        curl_key(&format!("{base}/v2/health/live"), &stranger.s("stranger-ca.pem"), None, &[]).0,
        0
    );

    // Revoked from another process: refused at the next request, no restart.
    let revoked = apikey(&site, &["revoke", "app"]);
    assert!(revoked.contains("revoked API key app"), "{revoked}");
    let (status, body) = infer("sensor", Some(&app));
    assert_eq!(status, 401);
    assert!(error_of(&body).contains("API key app was revoked at"), "{body}");
    assert_eq!(infer("sensor", Some(&ops)).0, 200);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_certificate_from_the_client_ca() {
    let site = site();
    let tls = site.dir.path().join("tls");
    let server = Pki::make(&tls, "server", false);
    let client = Pki::make(&tls, "client", true);
    let intruder = Pki::make(&tls, "intruder", true);
    let config = ServeConfig {
        tls: Some(TlsFiles {
            certificate: server.path("server.pem"),
            key: server.path("server.key"),
            client_ca: Some(client.path("client-ca.pem")),
        }),
        auth: Some(AuthMode::Mtls),
        grpc: Some("127.0.0.1:0".parse().unwrap()),
        ..test_config()
    };
    let server_bound = falaj_agent::server::Server::bind(site.data_dir(), config).await.unwrap();
    let (http, grpc) = (server_bound.local_addr(), server_bound.grpc_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server_bound.run(async { drop(stopped.await) }));

    let url = format!("https://127.0.0.1:{}/v2/models/sensor/infer", http.port());
    let ca = server.s("server-ca.pem");
    let with = |pki: &Pki, name: &str| {
        let (cert, key) = (pki.s(&format!("{name}.pem")), pki.s(&format!("{name}.key")));
        let mut args =
            vec!["--cacert".to_owned(), ca.clone(), "--cert".into(), cert, "--key".into(), key];
        args.extend(post_json().into_iter().map(str::to_owned));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&url, &args)
    };
    let (status, body) = with(&client, "client");
    assert_eq!(status, 200, "{body}");
    let mut no_cert = vec!["--cacert", ca.as_str()];
    no_cert.extend(post_json());
    assert_eq!(curl(&url, &no_cert).0, 0, "no client certificate: the handshake fails");
    assert_eq!(with(&intruder, "intruder").0, 0, "a certificate from another CA");

    // gRPC: the same client CA.
    let server_ca = std::fs::read_to_string(server.path("server-ca.pem")).unwrap();
    let identity = Identity::from_pem(
        std::fs::read(client.path("client.pem")).unwrap(),
        std::fs::read(client.path("client.key")).unwrap(),
    );
    let mut good = grpc_client(grpc, &server_ca, Some(identity)).await.unwrap();
    let answer = good.model_infer(infer_request("sensor")).await.unwrap().into_inner();
    assert_eq!(answer.model_name, "sensor");
    let refused = match grpc_client(grpc, &server_ca, None).await {
        Err(_) => true,
        Ok(mut c) => c.model_infer(infer_request("sensor")).await.is_err(),
    };
    assert!(refused, "a gRPC client without a certificate is refused");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// The generated client over TLS trusting `ca_pem`, with a client identity if given.
async fn grpc_client(
    addr: SocketAddr,
    ca_pem: &str,
    identity: Option<Identity>,
) -> Result<GrpcInferenceServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(identity) = identity {
        tls = tls.identity(identity);
    }
    let channel = Channel::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(GrpcInferenceServiceClient::new(channel))
}

fn infer_request(model: &str) -> ModelInferRequest {
    ModelInferRequest {
        model_name: model.into(),
        inputs: vec![InferInputTensor {
            name: "sensors".into(),
            datatype: "FP32".into(),
            shape: vec![1, 8],
            parameters: std::collections::HashMap::new(),
            contents: Some(InferTensorContents {
                fp32_contents: vec![65.0, 3.0, 6.0, 12.0, 1500.0, 50.0, 400.0, 70.0],
                ..Default::default()
            }),
        }],
        ..Default::default()
    }
}

/// A call's status code and message (`Ok` and empty when it succeeded).
fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match result {
        Ok(_) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_owned()),
    }
}

/// `message` with `key` as its `authorization` metadata.
fn keyed<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_with_api_keys() {
    let site = site();
    let pki = Pki::make(&site.dir.path().join("tls"), "server", false);
    let ops = apikey(&site, &["create", "--name", "ops"]);
    let app = apikey(&site, &["create", "--name", "app", "--models", "sensor"]);
    let metered = apikey(&site, &["create", "--name", "metered", "--rate", "1/h"]);
    let config = ServeConfig {
        tls: Some(TlsFiles {
            certificate: pki.path("server.pem"),
            key: pki.path("server.key"),
            client_ca: None,
        }),
        auth: Some(AuthMode::ApiKey),
        grpc: Some("127.0.0.1:0".parse().unwrap()),
        ..test_config()
    };
    let server = falaj_agent::server::Server::bind(site.data_dir(), config).await.unwrap();
    let grpc = server.grpc_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async { drop(stopped.await) }));
    let ca = std::fs::read_to_string(pki.path("server-ca.pem")).unwrap();
    let mut client = grpc_client(grpc, &ca, None).await.unwrap();

    // Liveness is open.
    assert!(client.server_live(ServerLiveRequest {}).await.unwrap().into_inner().live);
    let (c, m) = code(client.model_infer(keyed(infer_request("sensor"), None)).await);
    assert_eq!(c, Code::Unauthenticated, "{m}");
    let (c, _) = code(client.model_infer(keyed(infer_request("sensor"), Some("falaj_x"))).await);
    assert_eq!(c, Code::Unauthenticated);
    let answer = client.model_infer(keyed(infer_request("sensor"), Some(&app))).await.unwrap();
    assert_eq!(answer.into_inner().model_name, "sensor");
    let (c, m) = code(client.model_infer(keyed(infer_request("other"), Some(&app))).await);
    assert_eq!(c, Code::PermissionDenied);
    assert!(m.contains("may not call model \"other\""), "{m}");
    let meta = ModelMetadataRequest { name: "other".into(), version: String::new() };
    assert_eq!(
        code(client.model_metadata(keyed(meta, Some(&app))).await).0,
        Code::PermissionDenied
    );
    assert_eq!(
        code(client.server_metadata(keyed(ServerMetadataRequest {}, None)).await).0,
        Code::Unauthenticated
    );
    assert_eq!(
        code(client.server_metadata(keyed(ServerMetadataRequest {}, Some(&app))).await).0,
        Code::Ok
    );
    let index = || RepositoryIndexRequest { repository_name: String::new(), ready: false };
    assert_eq!(
        code(client.repository_index(keyed(index(), Some(&app))).await).0,
        Code::PermissionDenied
    );
    assert_eq!(code(client.repository_index(keyed(index(), Some(&ops))).await).0, Code::Ok);

    // A key over its rate (one call an hour): RESOURCE_EXHAUSTED, saying so.
    let infer_metered = || keyed(infer_request("sensor"), Some(&metered));
    assert_eq!(code(client.model_infer(infer_metered()).await).0, Code::Ok);
    let (c, m) = code(client.model_infer(infer_metered()).await);
    assert_eq!(c, Code::ResourceExhausted, "{m}");
    assert!(m.contains("API key metered is over its rate of 1/h"), "{m}");

    // A stream opens with a valid key; each message is held to its scope.
    let messages = tokio_stream::iter(vec![infer_request("sensor"), infer_request("other")]);
    let mut replies =
        client.model_stream_infer(keyed(messages, Some(&app))).await.unwrap().into_inner();
    let first = replies.message().await.unwrap().unwrap();
    assert!(first.error_message.is_empty(), "{}", first.error_message);
    let second = replies.message().await.unwrap().unwrap();
    assert!(
        second.error_message.contains("may not call model \"other\""),
        "{}",
        second.error_message
    );
    let unkeyed = tokio_stream::iter(vec![infer_request("sensor")]);
    assert_eq!(
        code(client.model_stream_infer(keyed(unkeyed, None)).await).0,
        Code::Unauthenticated
    );

    // Revoked by another process: refused at the next call.
    apikey(&site, &["revoke", "app"]);
    let (c, m) = code(client.model_infer(keyed(infer_request("sensor"), Some(&app))).await);
    assert_eq!(c, Code::Unauthenticated);
    assert!(m.contains("revoked"), "{m}");
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

/// `falaj-agent ARGS...` with its stdout and stderr lines arriving on a channel; killed on
/// drop.
struct Agent {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Agent {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(AGENT)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Self { child, lines, seen: Vec::new() }
    }

    /// Waits (up to two minutes) for a line holding `needle`.
    fn wait_for(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(120)) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!("no line with {needle:?} ({e}):\n{}", self.seen.join("\n")),
            }
        }
    }

    /// The `https://ADDR` of the line holding `needle`.
    fn wait_for_addr(&mut self, needle: &str) -> SocketAddr {
        let line = self.wait_for(needle);
        let at = line.find("https://").unwrap_or_else(|| panic!("no https:// in {line}"));
        line[at + "https://".len()..].trim().parse().unwrap()
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args([name, &pid]).status().unwrap().success());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_daemon_takes_a_new_certificate_on_sighup_and_refuses_unsafe_settings() {
    let site = site();
    let tls = site.dir.path().join("tls");
    let first = Pki::make(&tls, "first", false);
    std::fs::copy(first.path("first.pem"), tls.join("agent.pem")).unwrap();
    std::fs::copy(first.path("first.key"), tls.join("agent.key")).unwrap();
    let config = site.dir.path().join("agent.toml");
    let write = |http: &str| {
        let text = format!(
            "data_dir = \"{}\"\n[http]\n{http}\n[grpc]\nlisten = \"127.0.0.1:0\"\n",
            site.data_dir().display()
        );
        std::fs::write(&config, text).unwrap();
    };
    let config_arg = config.to_str().unwrap();
    let exits = |needle: &str| {
        let out = Command::new(AGENT).args(["serve", "--config", config_arg]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{stderr}");
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
    };
    // Unauthenticated off loopback, unless said so; TLS files that do not load.
    write("listen = \"0.0.0.0:0\"");
    exits("is not a loopback address and no authentication is configured");
    write(&format!(
        "listen = \"127.0.0.1:0\"\ntls_certificate = \"{}\"\ntls_key = \"{}\"\nauth = \"api_key\"",
        tls.join("agent.pem").display(),
        tls.join("missing.key").display()
    ));
    exits("missing.key");

    write(&format!(
        "listen = \"127.0.0.1:0\"\ntls_certificate = \"{}\"\ntls_key = \"{}\"\nauth = \"api_key\"",
        tls.join("agent.pem").display(),
        tls.join("agent.key").display()
    ));
    let key = apikey(&site, &["create", "--name", "ops"]);
    let mut agent = Agent::start(&["serve", "--config", config_arg]);
    let http = agent.wait_for_addr("serving the Open Inference Protocol on");
    let grpc = agent.wait_for_addr("over gRPC on");
    let url = format!("https://127.0.0.1:{}/v2/models/sensor/infer", http.port());
    let first_ca = first.s("first-ca.pem");
    assert_eq!(curl_key(&url, &first_ca, Some(&key), &post_json()).0, 200);

    // A certificate from another CA, taken on SIGHUP by both endpoints.
    let second = Pki::make(&tls, "second", false);
    std::fs::copy(second.path("second.pem"), tls.join("agent.pem")).unwrap();
    std::fs::copy(second.path("second.key"), tls.join("agent.key")).unwrap();
    agent.signal("-HUP");
    agent.wait_for("reloaded the inference API's TLS certificate");
    let second_ca = second.s("second-ca.pem");
    assert_eq!(curl_key(&url, &second_ca, Some(&key), &post_json()).0, 200, "the new one");
    assert_eq!(curl_key(&url, &first_ca, Some(&key), &post_json()).0, 0, "the old CA fails");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let pem = std::fs::read_to_string(second.path("second-ca.pem")).unwrap();
        let mut client = grpc_client(grpc, &pem, None).await.unwrap();
        let answer = client.model_infer(keyed(infer_request("sensor"), Some(&key))).await;
        assert_eq!(answer.unwrap().into_inner().model_name, "sensor");
        let old = std::fs::read_to_string(first.path("first-ca.pem")).unwrap();
        let refused = match grpc_client(grpc, &old, None).await {
            Err(_) => true,
            Ok(mut c) => c.model_infer(keyed(infer_request("sensor"), Some(&key))).await.is_err(),
        };
        assert!(refused, "gRPC serves the new certificate too");
    });

    // Files that do not load on SIGHUP: logged, and the certificate in use stays.
    std::fs::write(tls.join("agent.key"), "not a key").unwrap();
    agent.signal("-HUP");
    agent.wait_for("TLS reload failed");
    assert_eq!(curl_key(&url, &second_ca, Some(&key), &post_json()).0, 200);
    agent.signal("-TERM");
    assert!(agent.child.wait().unwrap().success());
}
