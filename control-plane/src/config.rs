//! The control plane's configuration file, `/etc/falaj/control.toml` when installed from a
//! package. Every key is optional and documented in the shipped file
//! (`packaging/control-plane/control.toml`, which a test parses); unknown keys are refused;
//! each error names its key. Command-line flags of `serve` override the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use falaj_common::time::human_duration;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::daemon::ServeConfig;

/// Where a package installs the configuration.
pub const DEFAULT_PATH: &str = "/etc/falaj/control.toml";
/// Where a package keeps the control plane's state.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/falaj-control";

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("configuration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Not valid TOML of the expected shape (an unknown key, a wrong type).
    #[error("configuration {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with the key and line.
        message: String,
    },
    /// A value is out of range.
    #[error("configuration {path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, dotted.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

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
}

/// `[quic]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicConfig {
    /// UDP address agents connect to.
    pub listen: SocketAddr,
    /// Extra DNS names or IP addresses for the TLS certificate.
    pub server_names: Vec<String>,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// TCP address of the admin API.
    pub listen: SocketAddr,
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
        }
    }
}

fn defaults() -> ServeConfig {
    ServeConfig::new(Path::new(DEFAULT_DATA_DIR))
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self { listen: defaults().quic, server_names: Vec::new() }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: defaults().admin }
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
        Self { max_bytes: defaults().max_bundle_bytes }
    }
}

fn within<T: PartialOrd + Copy + std::fmt::Debug>(
    path: &Path,
    key: &'static str,
    value: T,
    low: T,
    high: T,
) -> Result<(), ConfigError> {
    if value < low || value > high {
        return Err(ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message: format!("must be between {low:?} and {high:?}, got {value:?}"),
        });
    }
    Ok(())
}

impl ControlConfig {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and checks `text` (read from `path`).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim().to_owned(),
        })?;
        config.check(path)?;
        Ok(config)
    }

    /// Checks every value.
    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
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
        within(path, "bundles.max_bytes", self.bundles.max_bytes, 1 << 20, 1 << 40)?;
        Ok(())
    }

    /// The daemon's settings.
    pub fn serve(&self) -> ServeConfig {
        let mut serve = ServeConfig::new(&self.data_dir);
        serve.quic = self.quic.listen;
        serve.admin = self.admin.listen;
        serve.region.clone_from(&self.region);
        serve.server_names.extend(self.quic.server_names.iter().cloned());
        serve.policy.desired_ttl = self.policy.desired_ttl;
        serve.policy.cert_ttl = self.policy.cert_ttl;
        serve.policy.heartbeat = self.policy.heartbeat;
        serve.max_bundle_bytes = self.bundles.max_bytes;
        serve
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
        check("[admn]\n", "unknown field `admn`");
    }
}
