//! Test support: a site (an agent store with its own keys), test models written as ONNX,
//! and an in-process server on 127.0.0.1:0.

#![allow(dead_code)] // each test file uses a different part

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use falaj_agent::import::{self, ImportError, ImportOptions, ImportOutcome};
use falaj_agent::server::{ServeConfig, Server};
use falaj_agent::store::Store;
use falaj_common::bundle::{BundleBuilder, Content, ModelFormat, ModelSpec, RuntimeHint};
use falaj_common::keys::SigningKey;
use falaj_common::onnx::{Attr, GraphBuilder, OnnxModel, mlp_classifier};
use falaj_common::random::SeededRng;
use falaj_common::sample::{self, FEATURE_COUNT};
use falaj_common::tensor::{DataType, Dim};
use falaj_common::time::Timestamp;
use falaj_common::train::{TrainConfig, train_classifier};
use falaj_common::trust::{RootSpec, TrustRoot};
use ring::rand::SystemRandom;

pub const REGION: &str = "test-1";

/// An agent data directory with the keys that sign its bundles.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub signer: SigningKey,
    pub trust: TrustRoot,
}

pub fn now() -> SystemTime {
    SystemTime::now()
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The files under `dir` that hold some 64-byte window of `secret` carrying information
/// (16 distinct byte values or more: runs of zeros and padding are in any SQLite page and
/// prove nothing). The search for plaintext that encryption at rest must leave none of.
pub fn holding_a_window(dir: &Path, secret: &[u8]) -> Vec<PathBuf> {
    const WINDOW: usize = 64;
    let informative = |w: &&[u8]| w.iter().copied().collect::<HashSet<u8>>().len() >= 16;
    let windows: HashSet<&[u8]> = secret.windows(WINDOW).filter(informative).collect();
    assert!(!windows.is_empty(), "nothing informative to search for");
    files_under(dir)
        .into_iter()
        .filter(|path| {
            let bytes = std::fs::read(path).unwrap_or_default();
            bytes.windows(WINDOW).any(|w| windows.contains(w))
        })
        .collect()
}

impl Site {
    pub fn new() -> Self {
        let rng = SystemRandom::new();
        let root = SigningKey::generate(&rng).unwrap().0;
        let signer = SigningKey::generate(&rng).unwrap().0;
        let trust = RootSpec {
            version: 1,
            region: REGION,
            expires: Timestamp::from_system(now()).saturating_add(Duration::from_secs(3600 * 24)),
            root_keys: &[root],
            root_threshold: 1,
            signing_keys: &[signer.public()],
            signing_threshold: 1,
        }
        .sign(&[])
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        Store::init(&dir.path().join("agent"), REGION, &trust.to_json(), now()).unwrap();
        Self { dir, signer, trust }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    pub fn store(&self) -> Store {
        Store::open(&self.data_dir()).unwrap()
    }

    /// A signed model bundle for this site.
    pub fn bundle(&self, name: &str, version: u64, model: &[u8]) -> Vec<u8> {
        signed_bundle(name, version, model, REGION, &self.signer, Duration::from_secs(3600))
    }

    /// Writes `bytes` to a file in the site's temp dir and imports it.
    pub fn import_bytes(
        &self,
        bytes: &[u8],
        options: &ImportOptions,
    ) -> Result<ImportOutcome, ImportError> {
        let path = self.dir.path().join(format!("upload-{}.falaj", rand_suffix()));
        std::fs::write(&path, bytes).unwrap();
        let mut store = self.store();
        import::import_file(&mut store, &path, options, &mut |_, _| {})
    }

    pub fn install(&self, name: &str, version: u64, model: &[u8]) {
        let outcome = self
            .import_bytes(&self.bundle(name, version, model), &ImportOptions::new(now()))
            .unwrap();
        assert!(matches!(outcome, ImportOutcome::Installed { .. }), "{outcome:?}");
    }
}

/// A signed model bundle for any region, signed by any key.
pub fn signed_bundle(
    name: &str,
    version: u64,
    model: &[u8],
    region: &str,
    signer: &SigningKey,
    lifetime: Duration,
) -> Vec<u8> {
    let signature = OnnxModel::load(model).unwrap().signature().clone();
    let created = Timestamp::from_system(now());
    BundleBuilder::new(
        name,
        version,
        region,
        created,
        created.saturating_add(lifetime),
        Content::Model(ModelSpec {
            file: "model.onnx".into(),
            format: ModelFormat::Onnx,
            runtime: RuntimeHint::Auto,
            signature,
            reference: None,
            features: None,
            lineage: None,
            shapes: std::collections::BTreeMap::new(),
        }),
    )
    .file("model.onnx", model.to_vec())
    .build(&[signer])
    .unwrap()
    .1
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A small classifier over the sample sensor data (8 features, 3 classes).
pub fn classifier() -> Vec<u8> {
    let data = sample::generate(600, 1, &[]);
    let config = TrainConfig { max_epochs: 2, hidden: vec![8], ..TrainConfig::default() };
    let (mlp, _) = train_classifier(&data.features, FEATURE_COUNT, &data.labels, 3, &config);
    mlp_classifier(&mlp, "sensors", "test")
}

/// One input of each common type, each mapped to an output of the same type.
pub fn datatypes_model() -> Vec<u8> {
    let n = || Dim::Symbol("N".into());
    let mut g = GraphBuilder::new("datatypes");
    g.input("f64", DataType::Fp64, &[n(), Dim::Fixed(2)])
        .input("i32", DataType::Int32, &[n()])
        .input("i64", DataType::Int64, &[n()])
        .input("flag", DataType::Bool, &[n()])
        .node("Add", &["f64", "f64"], &["f64_twice"], vec![])
        .node("Add", &["i32", "i32"], &["i32_twice"], vec![])
        .node("Neg", &["i64"], &["i64_negated"], vec![])
        .node("Not", &["flag"], &["not_flag"], vec![])
        .output("f64_twice", DataType::Fp64, &[n(), Dim::Fixed(2)])
        .output("i32_twice", DataType::Int32, &[n()])
        .output("i64_negated", DataType::Int64, &[n()])
        .output("not_flag", DataType::Bool, &[n()]);
    g.encode("test")
}

/// A small CNN with symbolic batch, height and width: [N, 3, H, W] -> logits [N, 2].
pub fn image_model() -> Vec<u8> {
    let mut rng = SeededRng::new(9);
    let mut weights = |n: usize| (0..n).map(|_| rng.normal(0.0, 0.5) as f32).collect::<Vec<_>>();
    let sym = |s: &str| Dim::Symbol(s.into());
    let mut g = GraphBuilder::new("tiny_cnn");
    g.input("image", DataType::Fp32, &[sym("N"), Dim::Fixed(3), sym("H"), sym("W")])
        .weights("conv.weight", &[4, 3, 3, 3], &weights(108))
        .weights("conv.bias", &[4], &weights(4))
        .node(
            "Conv",
            &["image", "conv.weight", "conv.bias"],
            &["conv"],
            vec![Attr::Ints("pads", vec![1, 1, 1, 1])],
        )
        .node("Relu", &["conv"], &["relu"], vec![])
        .node("GlobalAveragePool", &["relu"], &["pool"], vec![])
        .node("Flatten", &["pool"], &["flat"], vec![Attr::Int("axis", 1)])
        .weights("fc.weight", &[2, 4], &weights(8))
        .weights("fc.bias", &[2], &weights(2))
        .node("Gemm", &["flat", "fc.weight", "fc.bias"], &["logits"], vec![Attr::Int("transB", 1)])
        .output("logits", DataType::Fp32, &[sym("N"), Dim::Fixed(2)]);
    g.encode("test")
}

/// A running in-process server; stops when dropped.
pub struct Running {
    pub addr: SocketAddr,
    /// The server's registry, to wait on its reloads.
    pub registry: std::sync::Arc<falaj_agent::models::Registry>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
    }
}

pub async fn serve(site: &Site, config: ServeConfig) -> Running {
    let server = Server::bind(site.data_dir(), config).await.unwrap();
    let addr = server.local_addr();
    let registry = server.registry();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        server.run(async { drop(rx.await) }).await.unwrap();
    });
    Running { addr, registry, stop: Some(tx), task: Some(task) }
}

impl Running {
    /// Waits until a reload leaves a catalog for which `done` holds (checked at once, then
    /// after each reload); fails after 30 s naming `what`.
    pub async fn reloaded(&self, what: &str, done: impl Fn(&falaj_agent::models::Catalog) -> bool) {
        let mut reloads = self.registry.reloads();
        let waited = tokio::time::timeout(
            Duration::from_secs(30),
            reloads.wait_for(|_| done(&self.registry.catalog())),
        );
        assert!(matches!(waited.await, Ok(Ok(_))), "no reload brought {what}");
    }
}

pub fn test_config() -> ServeConfig {
    ServeConfig {
        http: "127.0.0.1:0".parse().unwrap(),
        poll_interval: Duration::from_millis(50),
        ..ServeConfig::default()
    }
}
