//! The control plane's configuration file, `/etc/falaj/control.toml` when installed from a
//! package. Every key is optional and documented in the shipped file
//! (`packaging/control-plane/control.toml`, which a test parses); unknown keys are refused;
//! each error names its key. Command-line flags of `serve` override the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use falaj_common::alerting::{DriftScope, RetrainHook};
use falaj_common::config::{self, Checked, within};
use falaj_common::time::human_duration;
use serde::{Deserialize, Serialize};

pub use falaj_common::config::ConfigError;

use crate::alerts::AlertsConfig;
use crate::daemon::ServeConfig;
use crate::rollouts::RolloutsConfig;

/// Where a package installs the configuration.
pub const DEFAULT_PATH: &str = "/etc/falaj/control.toml";
/// Where a package keeps the control plane's state.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/falaj-control";

/// The control plane's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Where the control plane keeps its state, keys and blobs.
    pub data_dir: PathBuf,
    /// The region; needed on the first start, when keys are created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// The QUIC endpoint for agents.
    pub quic: QuicConfig,
    /// The admin API.
    pub admin: AdminConfig,
    /// Lifetimes and timings.
    pub policy: PolicyConfig,
    /// Bundles.
    pub bundles: BundlesConfig,
    /// Metric windows from agents.
    pub metrics: MetricsConfig,
    /// Alert rules and where alerts go.
    pub alerts: AlertsConfig,
    /// How rollouts are judged.
    pub rollouts: RolloutsConfig,
    /// When the audit log's checkpoints are signed.
    pub audit: crate::audit::AuditConfig,
    /// Where the control plane's state lives: SQLite in the data directory, or PostgreSQL.
    pub database: DatabaseConfig,
}

/// `[database]`: SQLite in the data directory (no `url`, the default) or PostgreSQL, which
/// any number of replicas of one region share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// libpq's URL, `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?sslmode=...&sslrootcert=...]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The most connections one replica opens at once.
    pub pool_size: usize,
    /// A file (readable by the service only) whose first line is the database password,
    /// so that the URL here need not carry it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self { url: None, pool_size: 16, password_file: None }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// How long metric windows are kept.
    #[serde(with = "human_duration")]
    pub retention: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { retention: defaults().metrics_retention }
    }
}

/// `[quic]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicConfig {
    /// UDP address agents connect to.
    pub listen: SocketAddr,
    /// Extra DNS names or IP addresses for the TLS certificate.
    pub server_names: Vec<String>,
    /// Most enrollment connections (no certificate yet) open at once.
    pub max_enrollments: usize,
    /// Most enrollment connections open at once from one IP address.
    pub max_enrollments_per_address: usize,
    /// How long an enrollment connection has to send its request (and again to take the
    /// answer) before it is closed.
    #[serde(with = "human_duration")]
    pub enrollment_deadline: Duration,
    /// Lifetime of the TLS certificate agents see; renewed in place with half of it left.
    #[serde(with = "human_duration")]
    pub certificate_lifetime: Duration,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// TCP address of the admin API.
    pub listen: SocketAddr,
    /// A session unused this long ends (`falaj-control login` again).
    #[serde(with = "human_duration")]
    pub session_idle: Duration,
    /// A session ends this long after login, however much it is used.
    #[serde(with = "human_duration")]
    pub session_max: Duration,
    /// Failed logins of one user within `lockout` that lock the user out for `lockout`.
    pub login_failures: u32,
    /// Failed logins from one address within `lockout` that lock the address out.
    pub login_failures_per_address: u32,
    /// The window failed logins are counted in, and how long a lockout lasts.
    #[serde(with = "human_duration")]
    pub lockout: Duration,
    /// Longest a client may take to send a request head; the connection is closed after it.
    #[serde(with = "human_duration")]
    pub header_timeout: Duration,
    /// Longest a client may pause while sending a request body (an upload); the request
    /// is answered 408 after it.
    #[serde(with = "human_duration")]
    pub body_timeout: Duration,
    /// Connections open at once; past it, new ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// TCP address of the admin API and console over HTTPS, beside `listen` (which stays
    /// plain HTTP for the host's own CLI; keep it on loopback). With `tls_certificate` and
    /// `tls_key`.
    pub tls_listen: Option<SocketAddr>,
    /// The HTTPS certificate chain (PEM, leaf first); read again on SIGHUP.
    pub tls_certificate: Option<PathBuf>,
    /// The certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
}

/// `[policy]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Lifetime of desired-state documents.
    #[serde(with = "human_duration")]
    pub desired_ttl: Duration,
    /// Lifetime of agent certificates.
    #[serde(with = "human_duration")]
    pub cert_ttl: Duration,
    /// How often agents report; three missed reports mark one offline.
    #[serde(with = "human_duration")]
    pub heartbeat: Duration,
}

/// `[bundles]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BundlesConfig {
    /// Largest bundle accepted by push, in bytes.
    pub max_bytes: u64,
    /// Where bundle chunks and recipes are kept (default: `DATA_DIR/blobs`); replicas of
    /// one region share one directory (a network file system), since any of them serves
    /// any agent's fetch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blobs_dir: Option<PathBuf>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            region: None,
            quic: QuicConfig::default(),
            admin: AdminConfig::default(),
            policy: PolicyConfig::default(),
            bundles: BundlesConfig::default(),
            metrics: MetricsConfig::default(),
            alerts: AlertsConfig::default(),
            rollouts: RolloutsConfig::default(),
            audit: crate::audit::AuditConfig::default(),
            database: DatabaseConfig::default(),
        }
    }
}

fn defaults() -> ServeConfig {
    ServeConfig::new(Path::new(DEFAULT_DATA_DIR))
}

impl Default for QuicConfig {
    fn default() -> Self {
        let enrollment = defaults().policy.enrollment;
        Self {
            listen: defaults().quic,
            server_names: Vec::new(),
            max_enrollments: enrollment.max_total,
            max_enrollments_per_address: enrollment.max_per_address,
            enrollment_deadline: enrollment.deadline,
            certificate_lifetime: defaults().server_cert_lifetime,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        let auth = defaults().auth;
        Self {
            listen: defaults().admin,
            session_idle: auth.sessions.idle,
            session_max: auth.sessions.max,
            login_failures: auth.logins.failures,
            login_failures_per_address: auth.logins.address_failures,
            lockout: auth.logins.lockout,
            header_timeout: defaults().admin_http.header_timeout,
            body_timeout: defaults().admin_body_timeout,
            max_connections: defaults().admin_http.max_connections,
            tls_listen: None,
            tls_certificate: None,
            tls_key: None,
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        let p = defaults().policy;
        Self { desired_ttl: p.desired_ttl, cert_ttl: p.cert_ttl, heartbeat: p.heartbeat }
    }
}

impl Default for BundlesConfig {
    fn default() -> Self {
        Self { max_bytes: defaults().max_bundle_bytes, blobs_dir: None }
    }
}

impl ControlConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        falaj_shell::config::load(path)
    }

    /// Parses and checks `text` (read from `path`).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        config::parse(text, path)
    }

    fn check_admin(&self, path: &Path) -> Result<(), ConfigError> {
        let admin = &self.admin;
        within(
            path,
            "admin.session_idle",
            admin.session_idle,
            Duration::from_secs(60),
            Duration::from_secs(30 * 86_400),
        )?;
        within(
            path,
            "admin.session_max",
            admin.session_max,
            admin.session_idle.max(Duration::from_secs(60)),
            Duration::from_secs(90 * 86_400),
        )?;
        within(path, "admin.login_failures", admin.login_failures, 1, 1000)?;
        within(
            path,
            "admin.login_failures_per_address",
            admin.login_failures_per_address,
            1,
            100_000,
        )?;
        within(
            path,
            "admin.header_timeout",
            admin.header_timeout,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        within(
            path,
            "admin.body_timeout",
            admin.body_timeout,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        within(path, "admin.max_connections", admin.max_connections, 1, 100_000)?;
        let tls =
            [admin.tls_listen.is_some(), admin.tls_certificate.is_some(), admin.tls_key.is_some()];
        if tls.contains(&true) && tls.contains(&false) {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                key: "admin.tls_listen",
                message: "tls_listen, tls_certificate and tls_key go together".into(),
            });
        }
        within(
            path,
            "admin.lockout",
            admin.lockout,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        )
    }

    fn check_alerts(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid =
            |key, message: String| ConfigError::Invalid { path: path.to_owned(), key, message };
        let alerts = &self.alerts;
        within(
            path,
            "alerts.evaluate_every",
            alerts.evaluate_every,
            Duration::from_millis(100),
            Duration::from_secs(86_400),
        )?;
        let url = |key, url: &str| match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
            _ => Err(invalid(key, format!("{url:?} is not an http:// or https:// URL"))),
        };
        for webhook in &alerts.webhooks {
            url("alerts.webhooks", webhook)?;
        }
        let mut names = std::collections::BTreeSet::new();
        for rule in &alerts.rules {
            let problem = |message: String| {
                invalid("alerts.rules", format!("rule {:?}: {message}", rule.name))
            };
            if rule.name.is_empty() || !names.insert(rule.name.as_str()) {
                return Err(problem("rule names must be present and unique".into()));
            }
            falaj_common::names::check_model_name(&rule.model)
                .map_err(|e| problem(e.to_string()))?;
            if !rule.threshold.is_finite() || rule.threshold < 0.0 {
                return Err(problem(format!(
                    "threshold {} must be a number at least 0",
                    rule.threshold
                )));
            }
            if rule.window < Duration::from_secs(1)
                || rule.window > Duration::from_secs(30 * 86_400)
            {
                return Err(problem("window must be between 1s and 30days".into()));
            }
            if (rule.column.is_some() || rule.scope != DriftScope::All) && !rule.metric.is_drift() {
                return Err(problem(
                    "column and scope apply to drift metrics (psi, ks, js) only".into(),
                ));
            }
            match &rule.retrain {
                Some(RetrainHook::Webhook(u)) => url("alerts.rules", u)?,
                Some(RetrainHook::Command(argv))
                    if argv.first().is_none_or(|p| !Path::new(p).is_absolute()) =>
                {
                    return Err(problem(
                        "retrain command must start with an absolute program path".into(),
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The daemon's settings.
    pub fn serve(&self) -> ServeConfig {
        let mut serve = ServeConfig::new(&self.data_dir);
        serve.quic = self.quic.listen;
        serve.admin = self.admin.listen;
        serve.auth.sessions.idle = self.admin.session_idle;
        serve.auth.sessions.max = self.admin.session_max;
        serve.auth.logins.failures = self.admin.login_failures;
        serve.auth.logins.address_failures = self.admin.login_failures_per_address;
        serve.auth.logins.window = self.admin.lockout;
        serve.auth.logins.lockout = self.admin.lockout;
        serve.admin_http.header_timeout = self.admin.header_timeout;
        serve.admin_body_timeout = self.admin.body_timeout;
        serve.admin_http.max_connections = self.admin.max_connections;
        if let (Some(listen), Some(certificate), Some(key)) =
            (self.admin.tls_listen, &self.admin.tls_certificate, &self.admin.tls_key)
        {
            let files = falaj_shell::tls::TlsFiles {
                certificate: certificate.clone(),
                key: key.clone(),
                client_ca: None,
            };
            serve.admin_tls = Some((listen, files));
        }
        serve.region.clone_from(&self.region);
        serve.server_names.extend(self.quic.server_names.iter().cloned());
        serve.server_cert_lifetime = self.quic.certificate_lifetime;
        serve.policy.desired_ttl = self.policy.desired_ttl;
        serve.policy.cert_ttl = self.policy.cert_ttl;
        serve.policy.heartbeat = self.policy.heartbeat;
        serve.policy.enrollment = crate::state::EnrollmentLimits {
            max_total: self.quic.max_enrollments,
            max_per_address: self.quic.max_enrollments_per_address,
            deadline: self.quic.enrollment_deadline,
        };
        serve.max_bundle_bytes = self.bundles.max_bytes;
        serve.blobs_dir.clone_from(&self.bundles.blobs_dir);
        serve.metrics_retention = self.metrics.retention;
        serve.alerts = self.alerts.clone();
        serve.rollouts = self.rollouts.clone();
        serve.audit = self.audit.clone();
        serve.database = self.database.url.as_ref().map(|url| crate::sql::PgOptions {
            url: url.clone(),
            pool_size: self.database.pool_size,
            password_file: self.database.password_file.clone(),
        });
        serve
    }
}

impl ControlConfig {
    /// Checks `[bundles] blobs_dir` and `[database]`.
    fn check_storage(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid =
            |key, message: String| ConfigError::Invalid { path: path.to_owned(), key, message };
        if let Some(dir) = &self.bundles.blobs_dir
            && !dir.is_absolute()
        {
            return Err(invalid(
                "bundles.blobs_dir",
                format!("must be an absolute path, got {}", dir.display()),
            ));
        }
        if let Some(url) = &self.database.url
            && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database.url",
                format!("must be a postgres:// URL, got {}", crate::sql::postgres::redacted(url)),
            ));
        }
        if !(1..=1024).contains(&self.database.pool_size) {
            return Err(invalid(
                "database.pool_size",
                format!("must be between 1 and 1024, got {}", self.database.pool_size),
            ));
        }
        Ok(())
    }
}

impl Checked for ControlConfig {
    /// Checks every value.
    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid =
            |key, message: String| ConfigError::Invalid { path: path.to_owned(), key, message };
        if !self.data_dir.is_absolute() {
            return Err(invalid(
                "data_dir",
                format!("must be an absolute path, got {}", self.data_dir.display()),
            ));
        }
        if let Some(region) = &self.region {
            falaj_common::names::check_region(region)
                .map_err(|e| invalid("region", e.to_string()))?;
        }
        self.check_storage(path)?;
        within(
            path,
            "policy.desired_ttl",
            self.policy.desired_ttl,
            Duration::from_secs(60),
            Duration::from_secs(30 * 86_400),
        )?;
        within(
            path,
            "policy.cert_ttl",
            self.policy.cert_ttl,
            Duration::from_secs(3600),
            Duration::from_secs(3 * 365 * 86_400),
        )?;
        within(
            path,
            "policy.heartbeat",
            self.policy.heartbeat,
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
        within(path, "quic.max_enrollments", self.quic.max_enrollments, 1, 100_000)?;
        within(
            path,
            "quic.max_enrollments_per_address",
            self.quic.max_enrollments_per_address,
            1,
            self.quic.max_enrollments,
        )?;
        within(
            path,
            "quic.enrollment_deadline",
            self.quic.enrollment_deadline,
            Duration::from_secs(1),
            Duration::from_secs(120),
        )?;
        within(
            path,
            "quic.certificate_lifetime",
            self.quic.certificate_lifetime,
            Duration::from_secs(3600),
            Duration::from_secs(5 * 365 * 86_400),
        )?;
        self.check_admin(path)?;
        within(path, "bundles.max_bytes", self.bundles.max_bytes, 1 << 20, 1 << 40)?;
        within(
            path,
            "metrics.retention",
            self.metrics.retention,
            Duration::from_secs(3600),
            Duration::from_secs(10 * 365 * 86_400),
        )?;
        within(
            path,
            "rollouts.evaluate_every",
            self.rollouts.evaluate_every,
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        within(
            path,
            "audit.checkpoint_every",
            self.audit.checkpoint_every,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        )?;
        within(path, "audit.checkpoint_entries", self.audit.checkpoint_entries, 1, 100_000_000)?;
        if !self.audit.retention.is_zero() {
            within(
                path,
                "audit.retention",
                self.audit.retention,
                Duration::from_secs(86_400),
                Duration::from_secs(100 * 365 * 86_400),
            )?;
        }
        self.check_alerts(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/control-plane/control.toml")
    }

    #[test]
    fn the_shipped_file_parses_to_the_defaults_and_documents_every_key() {
        assert_eq!(ControlConfig::load(&shipped()).unwrap(), ControlConfig::default());
        let text = std::fs::read_to_string(shipped()).unwrap();
        let all = ControlConfig { region: Some("r".into()), ..ControlConfig::default() };
        for line in toml::to_string(&all).unwrap().lines().filter(|l| l.contains(" = ")) {
            let key = line.split(" = ").next().unwrap();
            assert!(text.contains(&format!("# {key} = ")), "{key} is not in the shipped file");
        }
    }

    #[test]
    fn errors_name_the_key() {
        let check = |text: &str, needle: &str| {
            let err =
                ControlConfig::parse(text, Path::new("control.toml")).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        };
        check("region = \"Bad Region\"\n", "region: region");
        check("[policy]\ncert_ttl = \"1s\"\n", "policy.cert_ttl: must be between");
        check("[quic]\nlisten = 7443\n", "listen");
        check("[quic]\nmax_enrollments = 0\n", "quic.max_enrollments: must be between");
        check(
            "[quic]\nmax_enrollments = 8\nmax_enrollments_per_address = 9\n",
            "quic.max_enrollments_per_address: must be between 1 and 8",
        );
        check("[quic]\nenrollment_deadline = \"0s\"\n", "quic.enrollment_deadline: must be");
        check("[quic]\nenrollment_deadline = \"1h\"\n", "quic.enrollment_deadline: must be");
        check("[admn]\n", "unknown field `admn`");
        check(
            "[database]\nurl = \"mysql://u:secret@h/db\"\n",
            "database.url: must be a postgres:// URL",
        );
        check("[database]\npool_size = 0\n", "database.pool_size: must be between 1 and 1024");
        let err =
            ControlConfig::parse("[database]\nurl = \"mysql://u:secret@h/db\"\n", Path::new("c"))
                .unwrap_err()
                .to_string();
        assert!(!err.contains("secret"), "{err}");
        check("[metrics]\nretention = \"1s\"\n", "metrics.retention: must be between");
        check(
            "[alerts]\nwebhooks = [\"ftp://x\"]\n",
            "alerts.webhooks: \"ftp://x\" is not an http",
        );
        let rule = "[[alerts.rules]]\nname = \"d\"\nmodel = \"pump\"\nmetric = \"psi\"\nthreshold = 0.2\nwindow = \"5m\"\n";
        check(&format!("{rule}{rule}"), "rule \"d\": rule names must be present and unique");
        check(&rule.replace("psi", "psy"), "unknown variant `psy`");
        check(&rule.replace("0.2", "-1.0"), "threshold -1 must be a number at least 0");
        check(
            &format!("{rule}retrain = {{ command = [\"retrain.sh\"] }}\n"),
            "absolute program path",
        );
        check(
            &rule.replace("psi", "error_rate").replace("window", "column = \"x\"\nwindow"),
            "drift metrics",
        );
        check(
            "[rollouts]\nevaluate_every = \"10ms\"\n",
            "rollouts.evaluate_every: must be between",
        );
        check("[rollouts]\nevery = \"5s\"\n", "unknown field `every`");
        check("[audit]\ncheckpoint_entries = 0\n", "audit.checkpoint_entries");
        check("[admin]\nsession_idle = \"1s\"\n", "admin.session_idle: must be between");
        check(
            "[admin]\nsession_idle = \"2h\"\nsession_max = \"1h\"\n",
            "admin.session_max: must be between",
        );
        check("[admin]\nlogin_failures = 0\n", "admin.login_failures: must be between");
        check("[admin]\nheader_timeout = \"1ms\"\n", "admin.header_timeout: must be between");
        check("[admin]\nmax_connections = 0\n", "admin.max_connections: must be between 1");
        let admin = ControlConfig::parse(
            "[admin]\nsession_idle = \"30m\"\nlogin_failures = 3\nlockout = \"1h\"\n",
            Path::new("x"),
        )
        .unwrap()
        .serve()
        .auth;
        assert_eq!(admin.sessions.idle, Duration::from_secs(1800));
        assert_eq!(admin.logins.failures, 3);
        assert_eq!(admin.logins.window, Duration::from_secs(3600));
        assert_eq!(admin.logins.lockout, Duration::from_secs(3600));
        let rollouts =
            ControlConfig::parse("[rollouts]\nevaluate_every = \"2s\"\n", Path::new("x")).unwrap();
        assert_eq!(rollouts.serve().rollouts.evaluate_every, Duration::from_secs(2));
        let parsed = ControlConfig::parse(rule, Path::new("control.toml")).unwrap();
        assert_eq!(parsed.alerts.rules[0].min_count, 100);
        assert_eq!(parsed.serve().alerts.rules.len(), 1);
    }
}
