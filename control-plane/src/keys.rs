//! The control plane's signing keys and trust root, kept in a directory:
//!
//! ```text
//! KEYS_DIR/            0700
//!   root.json          the signed trust root, given to agents
//!   root-ID.key        root role private keys (PKCS#8), 0600
//!   signing-ID.key     bundle-signing private keys (PKCS#8), 0600
//!   ca.pem, ca.key     the TLS certificate authority for agents (see `ca`)
//! ```
//!
//! Root keys sign the trust root only and belong offline once it is made; signing keys
//! sign bundles. `ID` is the first 12 hex digits of the key id.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use falaj_common::keys::{KeyError, SigningKey};
use falaj_common::time::Timestamp;
use falaj_common::trust::{RootSpec, TrustError, TrustRoot};
use ring::rand::SystemRandom;
use thiserror::Error;

use crate::files;

/// The trust root's file name in a keys directory.
pub const ROOT_FILE: &str = "root.json";

/// Errors about keys.
#[derive(Debug, Error)]
pub enum KeysError {
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The directory already holds a trust root.
    #[error("{0} already holds a trust root; refusing to overwrite keys")]
    Exists(PathBuf),
    /// A key file is not a valid key.
    #[error("key file {path}: {source}")]
    BadKey {
        /// The file.
        path: PathBuf,
        /// The error.
        source: KeyError,
    },
    /// The trust root is refused.
    #[error("trust root {path}: {source}")]
    Trust {
        /// The file.
        path: PathBuf,
        /// The error.
        source: TrustError,
    },
    /// Too few signing keys are present to meet the threshold.
    #[error("{dir} holds {found} of the trust root's signing keys; {threshold} are needed to sign")]
    TooFewSigningKeys {
        /// The directory.
        dir: PathBuf,
        /// Keys found.
        found: usize,
        /// Keys needed.
        threshold: u32,
    },
    /// Bad parameters for `keys init`.
    #[error("{0}")]
    Invalid(String),
}

/// What `keys init` should make.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The control plane's region.
    pub region: String,
    /// Root keys to create.
    pub root_keys: usize,
    /// Root signatures required.
    pub root_threshold: u32,
    /// Signing keys to create.
    pub signing_keys: usize,
    /// Signing signatures required on each bundle.
    pub signing_threshold: u32,
    /// Lifetime of the trust root.
    pub lifetime: Duration,
}

impl InitOptions {
    /// One root key and one signing key, thresholds 1, the default lifetime.
    pub fn new(region: &str) -> Self {
        Self {
            region: region.to_owned(),
            root_keys: 1,
            root_threshold: 1,
            signing_keys: 1,
            signing_threshold: 1,
            lifetime: falaj_common::trust::DEFAULT_ROOT_LIFETIME,
        }
    }
}

/// Creates keys and a signed trust root in `dir`.
pub fn init(dir: &Path, options: &InitOptions, now: SystemTime) -> Result<TrustRoot, KeysError> {
    let root_path = dir.join(ROOT_FILE);
    if root_path.exists() {
        return Err(KeysError::Exists(dir.to_owned()));
    }
    if options.root_keys == 0 || options.signing_keys == 0 {
        return Err(KeysError::Invalid(
            "at least one root key and one signing key are needed".into(),
        ));
    }
    files::create_private_dir(dir).map_err(|source| KeysError::Io {
        op: "creating directory",
        path: dir.to_owned(),
        source,
    })?;
    let rng = SystemRandom::new();
    let generate = |role: &str, count: usize| -> Result<Vec<SigningKey>, KeysError> {
        (0..count)
            .map(|_| {
                let (key, pkcs8) = SigningKey::generate(&rng)
                    .map_err(|source| KeysError::BadKey { path: dir.to_owned(), source })?;
                let path = dir.join(format!("{role}-{}.key", key.public().id().short()));
                files::write_atomic(&path, &pkcs8, 0o600).map_err(|source| KeysError::Io {
                    op: "writing key",
                    path,
                    source,
                })?;
                Ok(key)
            })
            .collect()
    };
    let root_keys = generate("root", options.root_keys)?;
    let signing_keys = generate("signing", options.signing_keys)?;
    let publics: Vec<_> = signing_keys.iter().map(SigningKey::public).collect();
    let trust = RootSpec {
        version: 1,
        region: &options.region,
        expires: Timestamp::from_system(now).saturating_add(options.lifetime),
        root_keys: &root_keys,
        root_threshold: options.root_threshold,
        signing_keys: &publics,
        signing_threshold: options.signing_threshold,
    }
    .sign(&[])
    .map_err(|source| KeysError::Trust { path: root_path.clone(), source })?;
    files::write_atomic(&root_path, &trust.to_json(), 0o644).map_err(|source| KeysError::Io {
        op: "writing",
        path: root_path,
        source,
    })?;
    Ok(trust)
}

/// Reads and verifies `dir/root.json` at `now`.
pub fn load_trust(dir: &Path, now: SystemTime) -> Result<TrustRoot, KeysError> {
    let path = dir.join(ROOT_FILE);
    let bytes = fs::read(&path).map_err(|source| KeysError::Io {
        op: "reading",
        path: path.clone(),
        source,
    })?;
    TrustRoot::from_json(&bytes, now).map_err(|source| KeysError::Trust { path, source })
}

/// The signing keys in `dir` that the trust root lists; enough to meet its threshold.
pub fn load_signing_keys(dir: &Path, trust: &TrustRoot) -> Result<Vec<SigningKey>, KeysError> {
    let listing = fs::read_dir(dir).map_err(|source| KeysError::Io {
        op: "listing",
        path: dir.to_owned(),
        source,
    })?;
    let mut keys = Vec::new();
    for entry in listing {
        let path = entry
            .map_err(|source| KeysError::Io { op: "listing", path: dir.to_owned(), source })?
            .path();
        let is_signing =
            path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("signing-"))
                && path.extension().is_some_and(|e| e == "key");
        if !is_signing {
            continue;
        }
        let pkcs8 = fs::read(&path).map_err(|source| KeysError::Io {
            op: "reading",
            path: path.clone(),
            source,
        })?;
        let key = SigningKey::from_pkcs8(&pkcs8)
            .map_err(|source| KeysError::BadKey { path: path.clone(), source })?;
        if trust.signing_role().keyids.contains(&key.public().id()) {
            keys.push(key);
        }
    }
    keys.sort_by_key(|k| k.public().id());
    let threshold = trust.signing_role().threshold;
    if keys.len() < threshold as usize {
        return Err(KeysError::TooFewSigningKeys {
            dir: dir.to_owned(),
            found: keys.len(),
            threshold,
        });
    }
    Ok(keys)
}
