//! The agent's configuration file, `/etc/falaj/agent.toml` when installed from a package.
//!
//! Every key is optional and documented in the shipped file (`packaging/agent/agent.toml`,
//! which a test parses); unknown keys are refused; values are checked before anything
//! starts, and each error names its key. Command-line flags override the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use falaj_common::config::{self, Checked, within};
use falaj_common::time::human_duration;
use falaj_shell::tls::TlsFiles;
use serde::{Deserialize, Serialize};

pub use falaj_common::config::ConfigError;

use crate::apikeys::AuthMode;
use crate::engine::EngineConfig;
use crate::reporting::ReportConfig;
use crate::server::ServeConfig;
use crate::sync::SyncConfig;

/// Where a package installs the configuration.
pub const DEFAULT_PATH: &str = "/etc/falaj/agent.toml";
/// Where a package keeps the agent's state.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/falaj-agent";

/// The agent's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Where the agent keeps models, state and identity.
    pub data_dir: PathBuf,
    /// The local inference API.
    pub http: HttpConfig,
    /// The inference API's gRPC binding.
    pub grpc: GrpcConfig,
    /// Loading models.
    pub models: ModelsConfig,
    /// The connection to the control plane (for an enrolled agent).
    pub control_plane: ControlPlaneConfig,
    /// Measuring requests and reporting them.
    pub metrics: MetricsConfig,
    /// Which engine serves each model.
    pub engine: EngineConfig,
    /// Rollouts the control plane runs on this agent.
    pub rollouts: RolloutsConfig,
    /// Ground truth joined to earlier answers.
    pub feedback: FeedbackConfig,
    /// Fine-tune jobs ordered by the control plane.
    pub finetune: FinetuneConfig,
}

/// `[finetune]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneConfig {
    /// The only directory an ordered job may read its data from (default:
    /// `DATA_DIR/site-data`).
    pub site_data: Option<PathBuf>,
}

/// `[rollouts]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutsConfig {
    /// Mirrored requests waiting for the candidate; past it they are dropped (counted).
    pub shadow_queue: usize,
}

impl Default for RolloutsConfig {
    fn default() -> Self {
        Self { shadow_queue: ServeConfig::default().shadow_queue }
    }
}

/// `[feedback]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedbackConfig {
    /// How long the answer to an identified request is kept for its ground truth.
    #[serde(with = "human_duration")]
    pub horizon: Duration,
    /// Most answers kept; the oldest go first.
    pub capacity: usize,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        let serve = ServeConfig::default();
        Self { horizon: serve.feedback_horizon, capacity: serve.feedback_capacity }
    }
}

/// `[http]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address of the inference API.
    pub listen: SocketAddr,
    /// Largest request body, in bytes.
    pub max_body_bytes: u64,
    /// Longest a client may take to send a request body.
    #[serde(with = "human_duration")]
    pub body_timeout: Duration,
    /// Longest a client may take to send a request head; the connection is closed after it.
    #[serde(with = "human_duration")]
    pub header_timeout: Duration,
    /// Longest a request waits for a request slot before its body is read (503 after).
    #[serde(with = "human_duration")]
    pub queue_timeout: Duration,
    /// Connections open at once; past it, new ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// Inferences run at once on the blocking pool; 0 means one per CPU core.
    pub workers: usize,
    /// The inference API's TLS certificate chain (PEM); with `tls_key`, REST and gRPC are
    /// served over TLS only, and SIGHUP reads both files again.
    pub tls_certificate: Option<PathBuf>,
    /// The private key of `tls_certificate` (PEM).
    pub tls_key: Option<PathBuf>,
    /// With TLS, the CA (PEM) whose certificates clients must present (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// How clients authenticate: `none`, `api_key` or `mtls`. Unset means none, allowed
    /// on loopback addresses only.
    pub auth: Option<AuthMode>,
}

/// `[grpc]`: the Open Inference Protocol's gRPC binding. Off unless `listen` is set; it
/// shares `[http]`'s limits (`max_body_bytes` per message, `workers` and `queue_timeout`
/// through the same request slots).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpcConfig {
    /// Address of the gRPC endpoint, for example `127.0.0.1:8001` (Triton's port); unset,
    /// the default, serves REST only.
    pub listen: Option<SocketAddr>,
}

/// `[models]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// How often to look for bundles imported by `falaj-agent import`.
    #[serde(with = "human_duration")]
    pub poll_interval: Duration,
    /// Inactive versions kept of each model imported by hand, besides its active one;
    /// older ones are removed (versions the control plane manages follow its deployments).
    pub keep_inactive: usize,
}

/// `[control_plane]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// How often to report to the control plane.
    #[serde(with = "human_duration")]
    pub heartbeat: Duration,
    /// Longest wait between reconnection attempts.
    #[serde(with = "human_duration")]
    pub max_backoff: Duration,
    /// Chunk fetch streams run at once during a transfer.
    pub parallel_fetches: usize,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Whether requests are measured and reported.
    pub enabled: bool,
    /// Length of a metric window.
    #[serde(with = "human_duration")]
    pub window: Duration,
    /// Most windows kept while the control plane is unreachable.
    pub outbox_cap: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        let report = ReportConfig::default();
        Self { enabled: true, window: report.window, outbox_cap: report.outbox_cap }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            http: HttpConfig::default(),
            grpc: GrpcConfig::default(),
            models: ModelsConfig::default(),
            control_plane: ControlPlaneConfig::default(),
            metrics: MetricsConfig::default(),
            engine: EngineConfig::default(),
            rollouts: RolloutsConfig::default(),
            feedback: FeedbackConfig::default(),
            finetune: FinetuneConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        let serve = ServeConfig::default();
        Self {
            listen: serve.http,
            max_body_bytes: serve.max_body_bytes as u64,
            body_timeout: serve.body_timeout,
            header_timeout: serve.header_timeout,
            queue_timeout: serve.queue_timeout,
            max_connections: serve.max_connections,
            workers: 0,
            tls_certificate: None,
            tls_key: None,
            client_ca: None,
            auth: None,
        }
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        let serve = ServeConfig::default();
        Self { poll_interval: serve.poll_interval, keep_inactive: serve.keep_inactive }
    }
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        let sync = SyncConfig::default();
        Self {
            heartbeat: sync.heartbeat,
            max_backoff: sync.max_backoff,
            parallel_fetches: sync.parallel_fetches,
        }
    }
}

impl AgentConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        falaj_shell::config::load(path)
    }

    /// Parses and checks `text` (read from `path`).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        config::parse(text, path)
    }

    /// The inference server's settings.
    pub fn serve(&self) -> ServeConfig {
        let mut serve = ServeConfig {
            http: self.http.listen,
            max_body_bytes: usize::try_from(self.http.max_body_bytes).unwrap_or(usize::MAX),
            body_timeout: self.http.body_timeout,
            header_timeout: self.http.header_timeout,
            queue_timeout: self.http.queue_timeout,
            max_connections: self.http.max_connections,
            poll_interval: self.models.poll_interval,
            keep_inactive: self.models.keep_inactive,
            metrics: self.metrics.enabled,
            engine: self.engine.clone(),
            shadow_queue: self.rollouts.shadow_queue,
            feedback_horizon: self.feedback.horizon,
            feedback_capacity: self.feedback.capacity,
            grpc: self.grpc.listen,
            tls: match (&self.http.tls_certificate, &self.http.tls_key) {
                (Some(certificate), Some(key)) => Some(TlsFiles {
                    certificate: certificate.clone(),
                    key: key.clone(),
                    client_ca: self.http.client_ca.clone(),
                }),
                _ => None,
            },
            auth: self.http.auth,
            ..ServeConfig::default()
        };
        if self.http.workers > 0 {
            serve.workers = self.http.workers;
        }
        serve
    }

    /// The control-plane session's settings.
    pub fn sync(&self) -> SyncConfig {
        SyncConfig {
            heartbeat: self.control_plane.heartbeat,
            max_backoff: self.control_plane.max_backoff,
            parallel_fetches: self.control_plane.parallel_fetches,
            report: self.metrics.enabled.then_some(ReportConfig {
                window: self.metrics.window,
                outbox_cap: self.metrics.outbox_cap,
            }),
            site_data: self.finetune.site_data.clone(),
        }
    }
}

impl Checked for AgentConfig {
    /// Checks every value's range.
    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        if !self.data_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                key: "data_dir",
                message: format!("must be an absolute path, got {}", self.data_dir.display()),
            });
        }
        within(path, "http.max_body_bytes", self.http.max_body_bytes, 1024, 4 << 30)?;
        within(
            path,
            "http.body_timeout",
            self.http.body_timeout,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        within(
            path,
            "http.header_timeout",
            self.http.header_timeout,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        within(
            path,
            "http.queue_timeout",
            self.http.queue_timeout,
            Duration::from_millis(10),
            Duration::from_secs(3600),
        )?;
        within(path, "http.max_connections", self.http.max_connections, 1, 1_000_000)?;
        within(path, "http.workers", self.http.workers, 0, 4096)?;
        self.check_auth(path)?;
        within(path, "models.keep_inactive", self.models.keep_inactive, 0, 1000)?;
        within(
            path,
            "models.poll_interval",
            self.models.poll_interval,
            Duration::from_millis(10),
            Duration::from_secs(3600),
        )?;
        within(
            path,
            "control_plane.heartbeat",
            self.control_plane.heartbeat,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        within(
            path,
            "control_plane.max_backoff",
            self.control_plane.max_backoff,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        )?;
        within(path, "control_plane.parallel_fetches", self.control_plane.parallel_fetches, 1, 64)?;
        within(
            path,
            "metrics.window",
            self.metrics.window,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        within(path, "metrics.outbox_cap", self.metrics.outbox_cap, 1, 100_000_000)?;
        within(path, "rollouts.shadow_queue", self.rollouts.shadow_queue, 1, 1_000_000)?;
        within(
            path,
            "feedback.horizon",
            self.feedback.horizon,
            Duration::from_secs(1),
            Duration::from_secs(30 * 86_400),
        )?;
        within(path, "feedback.capacity", self.feedback.capacity, 1, 100_000_000)?;
        within(
            path,
            "engine.batch_wait",
            self.engine.batch_wait,
            Duration::ZERO,
            Duration::from_secs(1),
        )?;
        within(path, "engine.max_batch", self.engine.max_batch, 1, 65_536)?;
        within(path, "engine.plan_cache", self.engine.plan_cache, 1, 1024)?;
        within(path, "engine.threads", self.engine.threads, 1, 256)?;
        Ok(())
    }
}

impl AgentConfig {
    /// TLS files go together, and nothing is served unauthenticated off loopback unless
    /// `auth = "none"` says so.
    fn check_auth(&self, path: &Path) -> Result<(), ConfigError> {
        let http = &self.http;
        if http.tls_certificate.is_some() != http.tls_key.is_some() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                key: "http.tls_certificate",
                message: "tls_certificate and tls_key go together".into(),
            });
        }
        let listen: Vec<SocketAddr> =
            std::iter::once(http.listen).chain(self.grpc.listen).collect();
        crate::apikeys::check_settings(
            &listen,
            http.auth,
            http.tls_certificate.is_some(),
            http.client_ca.is_some(),
        )
        .map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            key: "http.auth",
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/agent/agent.toml")
    }

    #[test]
    fn the_shipped_file_parses_to_the_defaults() {
        let config = AgentConfig::load(&shipped()).unwrap();
        assert_eq!(config, AgentConfig::default());
    }

    #[test]
    fn the_shipped_file_documents_every_key() {
        let text = std::fs::read_to_string(shipped()).unwrap();
        let defaults = toml::to_string(&AgentConfig::default()).unwrap();
        for line in defaults.lines().filter(|l| l.contains(" = ")) {
            let key = line.split(" = ").next().unwrap();
            assert!(
                text.contains(&format!("# {key} = ")) || text.contains(&format!("{key} = ")),
                "{key} is not in the shipped file"
            );
        }
    }

    #[test]
    fn grpc_is_off_unless_listen_is_set() {
        let path = Path::new("agent.toml");
        assert_eq!(AgentConfig::default().serve().grpc, None);
        let on = AgentConfig::parse("[grpc]\nlisten = \"127.0.0.1:8001\"\n", path).unwrap();
        assert_eq!(on.serve().grpc, Some("127.0.0.1:8001".parse().unwrap()));
        let err = AgentConfig::parse("[grpc]\nport = 8001\n", path).unwrap_err().to_string();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn tls_and_auth_reach_the_server_and_hold_together() {
        let path = Path::new("agent.toml");
        let text = "[http]\nlisten = \"0.0.0.0:8000\"\ntls_certificate = \"/c.pem\"\n\
                    tls_key = \"/k.pem\"\nclient_ca = \"/ca.pem\"\nauth = \"mtls\"\n";
        let serve = AgentConfig::parse(text, path).unwrap().serve();
        let tls = serve.tls.unwrap();
        assert_eq!(tls.client_ca, Some(PathBuf::from("/ca.pem")));
        assert_eq!(serve.auth, Some(AuthMode::Mtls));
        let check = |text: &str, needle: &str| {
            let err = AgentConfig::parse(text, path).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        };
        check("[http]\nlisten = \"0.0.0.0:8000\"\n", "http.auth: 0.0.0.0:8000 is not a loopback");
        check("[grpc]\nlisten = \"10.0.0.1:8001\"\n", "http.auth: 10.0.0.1:8001 is not a loopback");
        check("[http]\ntls_key = \"/k.pem\"\n", "tls_certificate and tls_key go together");
        check("[http]\nclient_ca = \"/ca.pem\"\nauth = \"mtls\"\n", "client_ca needs");
        check("[http]\nauth = \"password\"\n", "unknown variant `password`");
        let open = "[http]\nlisten = \"0.0.0.0:8000\"\nauth = \"none\"\n";
        assert_eq!(AgentConfig::parse(open, path).unwrap().serve().auth, Some(AuthMode::None));
    }

    #[test]
    fn errors_name_the_key() {
        let path = Path::new("agent.toml");
        let check = |text: &str, needle: &str| {
            let err = AgentConfig::parse(text, path).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        };
        check("[http]\nlisten = \"nowhere\"\n", "listen");
        check("[http]\nmax_body_bytes = 12\n", "http.max_body_bytes: must be between 1024");
        check("[http]\nheader_timeout = \"10ms\"\n", "http.header_timeout: must be between");
        check("[http]\nheader_timeout = \"2h\"\n", "http.header_timeout: must be between");
        check("[http]\nqueue_timeout = \"1ms\"\n", "http.queue_timeout: must be between");
        check("[http]\nmax_connections = 0\n", "http.max_connections: must be between 1");
        check("[htp]\n", "unknown field `htp`");
        check("[http]\nlisen = \"127.0.0.1:1\"\n", "unknown field `lisen`");
        check("[control_plane]\nheartbeat = \"often\"\n", "\"often\" is not a duration");
        check("data_dir = \"relative\"\n", "data_dir: must be an absolute path");
        check("[control_plane]\nparallel_fetches = 0\n", "control_plane.parallel_fetches");
        check("[metrics]\nwindow = \"1ms\"\n", "metrics.window: must be between");
        check("[metrics]\noutbox_cap = 0\n", "metrics.outbox_cap");
        check("[rollouts]\nshadow_queue = 0\n", "rollouts.shadow_queue");
        check("[feedback]\nhorizon = \"0s\"\n", "feedback.horizon");
        check("[engine]\nruntime = \"tpu\"\n", "unknown variant `tpu`");
        check("[engine]\nbatch_wait = \"2s\"\n", "engine.batch_wait: must be between");
        check("[engine]\nmax_batch = 0\n", "engine.max_batch");
        check("[engine]\nplan_cache = 0\n", "engine.plan_cache");
        check("[engine]\nthreads = 0\n", "engine.threads");
    }

    #[test]
    fn values_reach_the_server_and_sync_settings() {
        let text = "[http]\nlisten = \"0.0.0.0:9000\"\nworkers = 3\nauth = \"none\"\n[control_plane]\nheartbeat = \"2s\"\n";
        let config = AgentConfig::parse(text, Path::new("x")).unwrap();
        assert_eq!(config.serve().http, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.serve().workers, 3);
        let limits = AgentConfig::parse(
            "[http]\nheader_timeout = \"2s\"\nmax_connections = 7\n",
            Path::new("x"),
        )
        .unwrap()
        .serve();
        assert_eq!((limits.header_timeout, limits.max_connections), (Duration::from_secs(2), 7));
        assert_eq!(config.sync().heartbeat, Duration::from_secs(2));
        let off = AgentConfig::parse("[metrics]\nenabled = false\n", Path::new("x")).unwrap();
        assert!(!off.serve().metrics && off.sync().report.is_none());
        let short =
            AgentConfig::parse("[metrics]\nwindow = \"2s\"\noutbox_cap = 9\n", Path::new("x"))
                .unwrap();
        let report = short.sync().report.unwrap();
        assert_eq!((report.window, report.outbox_cap), (Duration::from_secs(2), 9));
        let gpu = AgentConfig::parse(
            "[engine]\nruntime = \"gpu\"\nbatch_wait = \"2ms\"\nmax_batch = 64\n",
            Path::new("x"),
        )
        .unwrap();
        let engine = gpu.serve().engine;
        assert_eq!(engine.runtime, crate::engine::Runtime::Gpu);
        assert_eq!((engine.batch_wait, engine.max_batch), (Duration::from_millis(2), 64));
    }
}
