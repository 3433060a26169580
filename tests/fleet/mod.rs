//! An in-process fleet on loopback: a control plane and agents, each with real QUIC,
//! real TLS, real SQLite files and a real HTTP inference API on port 0.

#![allow(dead_code)] // each test file uses a different part

pub mod faults;
mod layered;
pub mod soak;
mod wait;

pub use crate::database::postgres_for;
pub use wait::eventually;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use falaj_agent::daemon::Agent;
use falaj_agent::enroll::{self, EnrollOptions};
use falaj_agent::reporting::{ReportConfig, Reporter};
use falaj_agent::server::ServeConfig as AgentServe;
use falaj_agent::store::Identity;
use falaj_agent::sync::SyncConfig;
use falaj_common::bundle::RuntimeHint;
use falaj_control::blobs::BlobStore;
use falaj_control::bundle::{self, BuildOptions};
use falaj_control::client::AdminClient;
use falaj_control::daemon::{ControlPlane, ServeConfig};
use falaj_control::state::Shared;
use serde_json::Value;

pub const REGION: &str = "eu-west-1";

/// A running control plane.
pub struct Control {
    pub dir: PathBuf,
    pub quic: SocketAddr,
    pub client: AdminClient,
    pub shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn config(dir: &Path, quic: SocketAddr) -> ServeConfig {
    let mut config = ServeConfig::new(dir);
    config.quic = quic;
    config.admin = "127.0.0.1:0".parse().unwrap();
    config.region = Some(REGION.into());
    config.policy.heartbeat = Duration::from_millis(200);
    config.database = postgres_for(dir).map(falaj_control::sql::PgOptions::new);
    config
}

/// The database of the control plane of `dir` (stopped or running), as [`config`] names
/// it: SQLite in the directory, or its database in the PostgreSQL pass.
pub async fn open_db(dir: &Path) -> falaj_control::db::Db {
    let dir = dir.to_owned();
    // PostgreSQL's synchronous client blocks on a runtime of its own.
    tokio::task::spawn_blocking(move || match postgres_for(&dir) {
        Some(url) => falaj_control::db::Db::open_postgres(&falaj_control::sql::PgOptions::new(url)),
        None => falaj_control::db::Db::open(&dir.join(falaj_control::db::DB_FILE)),
    })
    .await
    .unwrap()
    .unwrap()
}

impl Control {
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(config(dir, "127.0.0.1:0".parse().unwrap()), None).await
    }

    pub async fn start_with(config: ServeConfig, blobs: Option<Arc<dyn BlobStore>>) -> Self {
        let dir = config.data_dir.clone();
        // A control plane restarted on the same port in this process may find the port
        // still held for a while by the last one's endpoint (connections draining, tasks
        // of other tests loading the machine): retry until it is free.
        let deadline = Instant::now() + Duration::from_secs(30);
        let cp = loop {
            let started = match &blobs {
                Some(blobs) => {
                    ControlPlane::start_with_blobs(config.clone(), Arc::clone(blobs)).await
                }
                None => ControlPlane::start(config.clone()).await,
            };
            match started {
                Ok(cp) => break cp,
                Err(falaj_control::daemon::ServeError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AddrInUse
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("starting the control plane: {e}"),
            }
        };
        let client = AdminClient::new(&format!("http://{}", cp.admin_addr()), cp.admin_token());
        let quic = cp.quic_addr();
        let shared = cp.shared();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            cp.run(async { drop(rx.await) }).await.unwrap();
        });
        Self { dir, quic, client, shared, stop: Some(tx), task: Some(task) }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    /// Builds the sample model as `name@version` with this control plane's keys and
    /// pushes it; returns the bundle file.
    pub async fn push_sample(&self, work: &Path, name: &str, version: u64) -> PathBuf {
        let model = sample_model(work);
        let copy = work.join(format!("{name}-{version}.onnx"));
        std::fs::copy(&model, &copy).unwrap();
        self.push_model_with(&copy, name, version, Some(model.with_file_name("reference.csv")))
            .await
    }

    /// Enrolls an agent in `work/NAME` into `group` and starts it.
    pub async fn agent(&self, work: &Path, name: &str, group: &str) -> RunningAgent {
        RunningAgent::enroll(&work.join(name), self.quic, &self.token(group).await).await
    }

    pub async fn token(&self, group: &str) -> String {
        self.client.create_token(group, 600).await.unwrap().token
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
    }
}

/// The sample model (trained once per work directory).
pub fn sample_model(work: &Path) -> PathBuf {
    let dir = work.join("sample");
    if !dir.join("model.onnx").exists() {
        falaj_control::sample::write(
            &dir,
            &falaj_control::sample::SampleOptions { rows: 2000, seed: 1 },
        )
        .unwrap();
    }
    dir.join("model.onnx")
}

/// A running agent.
pub struct RunningAgent {
    pub dir: PathBuf,
    pub http: SocketAddr,
    pub identity: Identity,
    /// Closes and delivers metric windows.
    pub reporter: Arc<Reporter>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn sync_config() -> SyncConfig {
    SyncConfig {
        heartbeat: Duration::from_millis(200),
        max_backoff: Duration::from_millis(500),
        parallel_fetches: 4,
        report: Some(ReportConfig { window: Duration::from_millis(200), outbox_cap: 100_000 }),
        site_data: None,
    }
}

impl RunningAgent {
    /// Enrolls an agent in `dir` with `token` and starts it.
    pub async fn enroll(dir: &Path, control: SocketAddr, token: &str) -> Self {
        let options = EnrollOptions {
            control_plane: control.to_string(),
            token: token.into(),
            hostname: "test-host".into(),
            region: None,
        };
        enroll::enroll(dir, &options, SystemTime::now()).await.unwrap();
        Self::start(dir).await
    }

    /// Starts an agent already set up in `dir`.
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, sync_config()).await
    }

    /// Starts an agent already set up in `dir`, with these session settings.
    pub async fn start_with(dir: &Path, sync: SyncConfig) -> Self {
        let serve = AgentServe {
            http: "127.0.0.1:0".parse().unwrap(),
            poll_interval: Duration::from_millis(50),
            ..AgentServe::default()
        };
        let agent = Agent::start(dir.to_owned(), serve, sync).await.unwrap();
        let identity = agent.identity().unwrap().clone();
        let reporter = agent.reporter().expect("measuring is on");
        let http = agent.local_addr();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            agent.run(async { drop(rx.await) }).await.unwrap();
        });
        Self { dir: dir.to_owned(), http, identity, reporter, stop: Some(tx), task: Some(task) }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// The active version of `model` as the inference API reports it.
    pub async fn active_version(&self, model: &str) -> Option<String> {
        let response = reqwest::get(self.url(&format!("/v2/models/{model}"))).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let meta: Value = response.json().await.ok()?;
        meta["parameters"]["active_version"].as_str().map(str::to_owned)
    }

    /// An inference with one sample row; returns the version that answered.
    pub async fn infer(&self, model: &str) -> Result<String, String> {
        let body = serde_json::json!({"inputs": [{"name": "sensors", "shape": [1, 8], "datatype": "FP32",
            "data": [65.0, 3.0, 6.0, 12.0, 1500.0, 50.0, 400.0, 70.0]}]});
        let response = reqwest::Client::new()
            .post(self.url(&format!("/v2/models/{model}/infer")))
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body: Value = response.json().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(body.to_string());
        }
        Ok(body["model_version"].as_str().unwrap_or_default().to_owned())
    }
}

impl RunningAgent {
    /// An inference on the layered test model; the version that answered.
    pub async fn infer_layered(&self) -> Option<String> {
        let body = serde_json::json!({"inputs": [{"name": "sensors", "shape": [1, 256], "datatype": "FP32", "data": vec![0.5f32; 256]}]});
        let response = reqwest::Client::new()
            .post(self.url("/v2/models/layered/infer"))
            .json(&body)
            .send()
            .await
            .ok()?;
        let body: Value = response.json().await.ok()?;
        body["model_version"].as_str().map(str::to_owned)
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
    }
}

/// A model of about `mib` MiB: `[N, 256]` → Gemm (big) → Relu → Gemm (head, 10 outputs).
/// `head_seed` changes only the head's weights, as a fine-tune of the last layer would.
pub fn layered_model(path: &Path, mib: usize, head_seed: u64) -> PathBuf {
    layered_model_with(path, mib, 1, head_seed)
}

/// [`layered_model`] with the body's weights seeded too.
pub fn layered_model_with(path: &Path, mib: usize, body_seed: u64, head_seed: u64) -> PathBuf {
    use falaj_common::random::SeededRng;
    let hidden = mib * 1024 * 1024 / 4 / 256;
    let mut body = SeededRng::new(body_seed);
    let mut head = SeededRng::new(head_seed);
    let w1: Vec<f32> = (0..256 * hidden).map(|_| body.normal(0.0, 0.05) as f32).collect();
    let w2: Vec<f32> = (0..hidden * 10).map(|_| head.normal(0.0, 0.05) as f32).collect();
    std::fs::write(path, layered::layered_graph("layered", &w1, &w2)).unwrap();
    path.to_owned()
}

impl Control {
    /// Builds `model` as `name@version` with this control plane's keys and pushes it.
    pub async fn push_model(&self, model: &Path, name: &str, version: u64) -> PathBuf {
        self.push_model_with(model, name, version, None).await
    }

    /// [`Self::push_model`] with a reference CSV for the bundle's data profile.
    pub async fn push_model_with(
        &self,
        model: &Path,
        name: &str,
        version: u64,
        reference: Option<PathBuf>,
    ) -> PathBuf {
        let out = model.with_file_name(format!("{name}-{version}.falaj"));
        let options = BuildOptions {
            keys: self.dir.join("keys"),
            model: model.to_owned(),
            name: name.into(),
            version,
            reference,
            runtime: RuntimeHint::Auto,
            lifetime: bundle::DEFAULT_LIFETIME,
            out: out.clone(),
            features: None,
            shapes: std::collections::BTreeMap::new(),
        };
        bundle::build(&options, SystemTime::now()).unwrap();
        self.client.push_bundle(&out).await.unwrap();
        out
    }
}
