//! The control plane's signing keys and trust root, kept in a directory:
//!
//! ```text
//! KEYS_DIR/            0700
//!   seal.json          present once `keys seal` has run: the wrapped master key (see `vault`)
//!   root.json          the signed trust root (its newest version), given to agents
//!   root.N.json        every version of the trust root, kept for agents to catch up
//!   root-ID.key        root role private keys (PKCS#8), 0600
//!   signing-ID.key     bundle-signing private keys (PKCS#8), 0600
//!   retired/           keys a rotation removed from the trust root, 0700
//!   ca.pem, ca.key     the TLS certificate authority for agents (see `ca`)
//! ```
//!
//! Private key files are read and written through a [`Vault`]: sealed under the
//! directory's master key when it is sealed, else plain.
//!
//! Root keys sign the trust root only and belong offline once it is made; signing keys
//! sign bundles. `ID` is the first 12 hex digits of the key id.
//!
//! Rotation is TUF's: version n+1 is signed by a threshold of version n's root keys and of
//! its own ([`rotate`]); agents follow the chain version by version
//! ([`TrustRoot::follow`]), so one offline through several rotations catches up.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use falaj_common::keys::{KeyError, KeyId, PublicKey, SigningKey};
use falaj_common::time::Timestamp;
use falaj_common::trust::{RootSpec, TrustError, TrustRoot};
use ring::rand::SystemRandom;
use thiserror::Error;

use crate::files;
use crate::vault::{Secret, Vault, VaultError};

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
        source: std::io::Error,
    },
    /// The directory already holds a trust root.
    #[error("{0} already holds a trust root; refusing to overwrite keys")]
    Exists(PathBuf),
    /// A key file is not a valid key.
    #[error("key file {path}: {source}")]
    BadKey { path: PathBuf, source: KeyError },
    /// The trust root is refused.
    #[error("trust root {path}: {source}")]
    Trust { path: PathBuf, source: TrustError },
    /// Too few signing keys are present to meet the threshold.
    #[error("{dir} holds {found} of the trust root's signing keys; {threshold} are needed to sign")]
    TooFewSigningKeys {
        dir: PathBuf,
        /// Keys found.
        found: usize,
        /// Keys needed.
        threshold: u32,
    },
    /// Too few root keys are present to sign the next version of the trust root.
    #[error(
        "{dir} holds {found} of the trust root's root keys; {threshold} are needed to sign its \
         successor"
    )]
    TooFewRootKeys {
        dir: PathBuf,
        /// Keys found.
        found: usize,
        /// Keys needed.
        threshold: u32,
    },
    /// Bad parameters for `keys init`.
    #[error("{0}")]
    Invalid(String),
    /// A sealed key file could not be opened, or the directory is sealed.
    #[error(transparent)]
    Vault(#[from] VaultError),
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
    /// Where the root keys go, if not beside the others: a directory the operator
    /// carries offline, so the daemon's host never holds them (`--offline-root`).
    pub root_dir: Option<PathBuf>,
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
            root_dir: None,
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
    let root_dir = options.root_dir.as_deref().unwrap_or(dir);
    if root_dir != dir {
        files::create_private_dir(root_dir).map_err(|source| KeysError::Io {
            op: "creating directory",
            path: root_dir.to_owned(),
            source,
        })?;
    }
    let rng = SystemRandom::new();
    let root_keys = generate(&Vault::open(root_dir, None)?, "root", options.root_keys, &rng)?;
    let signing_keys = generate(&Vault::open(dir, None)?, "signing", options.signing_keys, &rng)?;
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
    publish(dir, &trust)?;
    Ok(trust)
}

/// The file of one version of the trust root.
pub fn version_file(dir: &Path, version: u64) -> PathBuf {
    dir.join(format!("root.{version}.json"))
}

/// Writes `trust` as `root.N.json`, then as `root.json`: a rotation cut short leaves the
/// previous version in force.
fn publish(dir: &Path, trust: &TrustRoot) -> Result<(), KeysError> {
    let bytes = trust.to_json();
    for path in [version_file(dir, trust.version()), dir.join(ROOT_FILE)] {
        files::write_atomic(&path, &bytes, 0o644).map_err(|source| KeysError::Io {
            op: "writing",
            path,
            source,
        })?;
    }
    Ok(())
}

/// What a rotation changes; `None` keeps what the current root has.
#[derive(Debug, Clone, Default)]
pub struct RotateOptions {
    /// New root keys to make (the current root keys are retired), or `None` to keep them.
    pub root_keys: Option<usize>,
    /// Root signatures the new root needs.
    pub root_threshold: Option<u32>,
    /// New signing keys to make (the current ones are retired), or `None` to keep them.
    pub signing_keys: Option<usize>,
    /// Signatures each bundle needs under the new root.
    pub signing_threshold: Option<u32>,
    /// Lifetime of the new root, from now.
    pub lifetime: Option<Duration>,
    /// Where the root keys are (and new ones go), if not in the keys directory.
    pub root_dir: Option<PathBuf>,
}

/// What a rotation did.
#[derive(Debug)]
pub struct Rotation {
    /// The new root, in force.
    pub trust: TrustRoot,
    /// Key files moved to `retired/`.
    pub retired: Vec<PathBuf>,
}

/// Writes the next version of the trust root in `dir` (`keys rotate-root` and
/// `rotate-signing`): new keys where `options` asks for them, signed by every current root
/// key found in `dir` (at least the current threshold) and by its own root keys. Keys the
/// new root no longer lists move to `dir/retired/`. The current root may have expired.
/// `secret` opens the directories that are sealed (new keys are sealed there too).
pub fn rotate(
    dir: &Path,
    options: &RotateOptions,
    secret: Option<&Secret>,
    now: SystemTime,
) -> Result<Rotation, KeysError> {
    let current = load_trust_unexpired(dir)?;
    let keys_vault = Vault::open(dir, secret)?;
    // Agents catch up through every version: keep the current one's file (directories
    // made before versions were kept hold only root.json).
    let current_file = version_file(dir, current.version());
    if !current_file.exists() {
        files::write_atomic(&current_file, &current.to_json(), 0o644).map_err(|source| {
            KeysError::Io { op: "writing", path: current_file.clone(), source }
        })?;
    }
    let root_dir = options.root_dir.as_deref().unwrap_or(dir);
    let root_vault = Vault::open(root_dir, secret)?;
    let old_root = load_keys(&root_vault, "root", &current.metadata().roles.root.keyids)?;
    let root_threshold = current.metadata().roles.root.threshold;
    if old_root.len() < root_threshold as usize {
        return Err(KeysError::TooFewRootKeys {
            dir: root_dir.to_owned(),
            found: old_root.len(),
            threshold: root_threshold,
        });
    }
    let rng = SystemRandom::new();
    let new_root = match options.root_keys {
        Some(count) => Some(generate(&root_vault, "root", count, &rng)?),
        None if old_root.len() == current.metadata().roles.root.keyids.len() => None,
        None => {
            return Err(KeysError::Invalid(format!(
                "{} holds {} of the trust root's {} root keys: all are needed to keep them \
                 (or make new ones with --root-keys)",
                root_dir.display(),
                old_root.len(),
                current.metadata().roles.root.keyids.len()
            )));
        }
    };
    let signing: Vec<PublicKey> = match options.signing_keys {
        Some(count) => {
            generate(&keys_vault, "signing", count, &rng)?.iter().map(SigningKey::public).collect()
        }
        None => {
            current.signing_role().keyids.iter().filter_map(|id| current.key(id).copied()).collect()
        }
    };
    // New root keys sign beside the old ones; kept ones sign once.
    let (root_keys, cosigners): (&[SigningKey], &[SigningKey]) = match &new_root {
        Some(new) => (new, &old_root),
        None => (&old_root, &[]),
    };
    let next_path = version_file(dir, current.version() + 1);
    let count = |keys: usize| u32::try_from(keys).unwrap_or(u32::MAX);
    let trust = RootSpec {
        version: current.version() + 1,
        region: current.region(),
        expires: Timestamp::from_system(now)
            .saturating_add(options.lifetime.unwrap_or(falaj_common::trust::DEFAULT_ROOT_LIFETIME)),
        root_keys,
        root_threshold: options
            .root_threshold
            .unwrap_or(root_threshold.min(count(root_keys.len()))),
        signing_keys: &signing,
        signing_threshold: options
            .signing_threshold
            .unwrap_or(current.signing_role().threshold.min(count(signing.len()))),
    }
    .sign(cosigners)
    .map_err(|source| KeysError::Trust { path: next_path.clone(), source })?;
    // Checked as an agent will check it before anything is written.
    current
        .follow(&[trust.to_json()], now)
        .map_err(|source| KeysError::Trust { path: next_path, source })?;
    publish(dir, &trust)?;
    let mut retired = retire(dir, &trust)?;
    if root_dir != dir {
        retired.extend(retire(root_dir, &trust)?);
    }
    Ok(Rotation { trust, retired })
}

/// Moves the key files of `dir` that `trust` no longer lists to `dir/retired/`.
fn retire(dir: &Path, trust: &TrustRoot) -> Result<Vec<PathBuf>, KeysError> {
    let retired_dir = dir.join("retired");
    let mut moved = Vec::new();
    let listed: Vec<String> = trust.metadata().keys.keys().map(KeyId::short).collect();
    for (path, short) in key_file_names(dir)? {
        if listed.contains(&short) {
            continue;
        }
        files::create_private_dir(&retired_dir).map_err(|source| KeysError::Io {
            op: "creating directory",
            path: retired_dir.clone(),
            source,
        })?;
        let to = retired_dir.join(path.file_name().unwrap_or_default());
        fs::rename(&path, &to).map_err(|source| KeysError::Io { op: "retiring", path, source })?;
        moved.push(to);
    }
    if !moved.is_empty() {
        for synced in [dir, &retired_dir] {
            files::sync_dir(synced).map_err(|source| KeysError::Io {
                op: "syncing directory",
                path: synced.to_owned(),
                source,
            })?;
        }
    }
    Ok(moved)
}

fn generate(
    vault: &Vault,
    role: &str,
    count: usize,
    rng: &SystemRandom,
) -> Result<Vec<SigningKey>, KeysError> {
    if count == 0 {
        return Err(KeysError::Invalid(format!("at least one {role} key is needed")));
    }
    (0..count)
        .map(|_| {
            let (key, pkcs8) = SigningKey::generate(rng)
                .map_err(|source| KeysError::BadKey { path: vault.dir().to_owned(), source })?;
            vault.write(&format!("{role}-{}.key", key.public().id().short()), &pkcs8)?;
            Ok(key)
        })
        .collect()
}

/// The short ids ([`KeyId::short`]) of the private keys `dir` holds (root and signing,
/// retired ones aside), read from the file names: sealed or not, no key is opened.
pub fn private_key_ids(dir: &Path) -> Result<Vec<String>, KeysError> {
    Ok(key_file_names(dir)?.into_iter().map(|(_, short)| short).collect())
}

/// Every version of the trust root kept in `dir`, oldest first.
pub fn versions(dir: &Path) -> Result<Vec<TrustRoot>, KeysError> {
    let current = load_trust_unexpired(dir)?;
    let mut roots = Vec::new();
    for version in 1..current.version() {
        let path = version_file(dir, version);
        match fs::read(&path) {
            Ok(bytes) => roots.push(
                TrustRoot::from_json_unexpired(&bytes)
                    .map_err(|source| KeysError::Trust { path, source })?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(KeysError::Io { op: "reading", path, source }),
        }
    }
    roots.push(current);
    Ok(roots)
}

/// The chain an agent holding version `held` needs to reach the newest root: every
/// later version, in order, as JSON.
pub fn chain_after(dir: &Path, held: u64) -> Result<Vec<String>, KeysError> {
    Ok(versions(dir)?
        .into_iter()
        .filter(|r| r.version() > held)
        .map(|r| String::from_utf8_lossy(&r.to_json()).into_owned())
        .collect())
}

/// Reads and verifies `dir/root.json` at `now`.
pub fn load_trust(dir: &Path, now: SystemTime) -> Result<TrustRoot, KeysError> {
    let trust = load_trust_unexpired(dir)?;
    trust
        .check_expiry(now)
        .map_err(|source| KeysError::Trust { path: dir.join(ROOT_FILE), source })?;
    Ok(trust)
}

/// Reads and verifies `dir/root.json`, expired or not.
pub fn load_trust_unexpired(dir: &Path) -> Result<TrustRoot, KeysError> {
    let path = dir.join(ROOT_FILE);
    let bytes = fs::read(&path).map_err(|source| KeysError::Io {
        op: "reading",
        path: path.clone(),
        source,
    })?;
    TrustRoot::from_json_unexpired(&bytes).map_err(|source| KeysError::Trust { path, source })
}

/// Every `root-*.key` and `signing-*.key` file directly in `dir`, with the short key id
/// its name holds.
fn key_file_names(dir: &Path) -> Result<Vec<(PathBuf, String)>, KeysError> {
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
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let short = name
            .strip_suffix(".key")
            .and_then(|n| n.strip_prefix("root-").or_else(|| n.strip_prefix("signing-")));
        if let Some(short) = short {
            keys.push((path.clone(), short.to_owned()));
        }
    }
    Ok(keys)
}

/// Every `root-*.key` and `signing-*.key` file directly in the vault's directory, with
/// its key.
fn key_files(vault: &Vault) -> Result<Vec<(PathBuf, SigningKey)>, KeysError> {
    let mut keys = Vec::new();
    for (path, _) in key_file_names(vault.dir())? {
        let pkcs8 = vault.read_path(&path)?;
        let key = SigningKey::from_pkcs8(&pkcs8)
            .map_err(|source| KeysError::BadKey { path: path.clone(), source })?;
        keys.push((path, key));
    }
    Ok(keys)
}

/// The `role` keys in the vault's directory whose ids are in `ids`, by id.
fn load_keys(vault: &Vault, role: &str, ids: &[KeyId]) -> Result<Vec<SigningKey>, KeysError> {
    let prefix = format!("{role}-");
    let mut keys: Vec<SigningKey> = key_files(vault)?
        .into_iter()
        .filter(|(path, key)| {
            path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix))
                && ids.contains(&key.public().id())
        })
        .map(|(_, key)| key)
        .collect();
    keys.sort_by_key(|k| k.public().id());
    keys.dedup_by_key(|k| k.public().id());
    Ok(keys)
}

/// The signing keys in the vault's directory that the trust root lists; enough to meet
/// its threshold.
pub fn load_signing_keys(vault: &Vault, trust: &TrustRoot) -> Result<Vec<SigningKey>, KeysError> {
    let keys = load_keys(vault, "signing", &trust.signing_role().keyids)?;
    let threshold = trust.signing_role().threshold;
    if keys.len() < threshold as usize {
        return Err(KeysError::TooFewSigningKeys {
            dir: vault.dir().to_owned(),
            found: keys.len(),
            threshold,
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        Timestamp::from_unix(1_800_000_000).to_system()
    }

    fn files(dir: &Path, prefix: &str) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(prefix))
            .count()
    }

    #[test]
    fn rotations_make_a_chain_agents_can_follow_and_retire_the_old_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let v1 = init(&dir, &InitOptions::new("eu-west-1"), now()).unwrap();
        let old_signing = load_signing_keys(&Vault::open(&dir, None).unwrap(), &v1)
            .unwrap()
            .remove(0)
            .public()
            .id();

        let root = RotateOptions { root_keys: Some(2), ..RotateOptions::default() };
        let v2 = rotate(&dir, &root, None, now()).unwrap();
        assert_eq!(v2.trust.version(), 2);
        assert_eq!(v2.trust.metadata().roles.root.keyids.len(), 2);
        assert_eq!(v2.retired.len(), 1, "the old root key");
        let signing = RotateOptions { signing_keys: Some(1), ..RotateOptions::default() };
        let v3 = rotate(&dir, &signing, None, now()).unwrap().trust;
        let root_ids = |t: &TrustRoot| {
            let mut ids = t.metadata().roles.root.keyids.clone();
            ids.sort();
            ids
        };
        assert_eq!(root_ids(&v3), root_ids(&v2.trust), "root keys kept");

        // An agent that trusts version 1 follows the chain the directory keeps.
        let chain = chain_after(&dir, 1).unwrap();
        assert_eq!(chain.len(), 2);
        let reached = v1.follow(&chain, now()).unwrap();
        assert_eq!(reached.last().unwrap().version(), 3);
        assert_eq!(load_trust(&dir, now()).unwrap().version(), 3);
        assert_eq!(versions(&dir).unwrap().len(), 3);

        // The daemon now signs with the new key only; the old one is retired.
        let keys = load_signing_keys(&Vault::open(&dir, None).unwrap(), &v3).unwrap();
        assert_eq!(keys.len(), 1);
        assert_ne!(keys[0].public().id(), old_signing);
        assert_eq!(files(&dir, "root-"), 2);
        assert_eq!(files(&dir, "signing-"), 1);
        assert_eq!(files(&dir.join("retired"), ""), 2);
    }

    #[test]
    fn a_rotation_without_enough_root_keys_is_refused_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        init(&dir, &InitOptions::new("eu-west-1"), now()).unwrap();
        // The root key is offline.
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().unwrap().to_string_lossy().starts_with("root-") {
                fs::remove_file(path).unwrap();
            }
        }
        let before = fs::read(dir.join(ROOT_FILE)).unwrap();
        let options = RotateOptions { signing_keys: Some(1), ..RotateOptions::default() };
        let err = rotate(&dir, &options, None, now()).unwrap_err();
        assert!(matches!(err, KeysError::TooFewRootKeys { found: 0, threshold: 1, .. }), "{err}");
        assert!(err.to_string().contains("needed to sign its successor"), "{err}");
        assert_eq!(fs::read(dir.join(ROOT_FILE)).unwrap(), before);
        assert!(!version_file(&dir, 2).exists());
        assert_eq!(files(&dir, "signing-"), 1, "no key was made");
    }

    #[test]
    fn offline_root_keys_never_touch_the_keys_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, offline) = (tmp.path().join("keys"), tmp.path().join("usb"));
        let options =
            InitOptions { root_dir: Some(offline.clone()), ..InitOptions::new("eu-west-1") };
        init(&dir, &options, now()).unwrap();
        assert_eq!(files(&dir, "root-"), 0);
        assert_eq!(files(&offline, "root-"), 1);

        // Without the offline keys a rotation is refused; with them it works, and the new
        // root keys go where the old ones were.
        let signing = RotateOptions { signing_keys: Some(1), ..RotateOptions::default() };
        let err = rotate(&dir, &signing, None, now()).unwrap_err();
        assert!(matches!(err, KeysError::TooFewRootKeys { found: 0, .. }), "{err}");
        let root = RotateOptions {
            root_keys: Some(1),
            root_dir: Some(offline.clone()),
            ..RotateOptions::default()
        };
        let v2 = rotate(&dir, &root, None, now()).unwrap();
        assert_eq!(v2.trust.version(), 2);
        assert_eq!(files(&dir, "root-"), 0);
        assert_eq!(files(&offline, "root-"), 1, "the new key; the old one is retired");
        assert_eq!(files(&offline.join("retired"), "root-"), 1);
    }

    #[test]
    fn an_expired_root_can_still_be_rotated() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let options =
            InitOptions { lifetime: Duration::from_secs(60), ..InitOptions::new("eu-west-1") };
        init(&dir, &options, now()).unwrap();
        let later = now() + Duration::from_secs(3600);
        assert!(matches!(load_trust(&dir, later), Err(KeysError::Trust { .. })));
        let renewed = RotateOptions::default();
        let v2 = rotate(&dir, &renewed, None, later).unwrap();
        assert!(v2.retired.is_empty(), "same keys, new expiry");
        assert_eq!(load_trust(&dir, later).unwrap().version(), 2);
    }
}
