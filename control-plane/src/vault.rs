//! Private key files at rest: plain (mode 0600), or sealed under the keys directory's
//! master key once `falaj-control keys seal` has run.
//!
//! A sealed directory holds `seal.json`: a random 256-bit master key, wrapped with
//! AES-256-GCM under a key-encryption key derived with Argon2id from the operator's
//! secret (a passphrase typed at start, or a systemd credential). Every private key file
//! (`root-*`, `signing-*`, `audit-*`, `ca.key`, `pii-*`) keeps its name and holds
//! `{"sealed": ..., "blob": ...}`: the file's bytes sealed with
//! AES-256-GCM under the master key, the file's name as associated data, so a file copied
//! over another is refused. Changing the secret (`keys seal --rekey`) rewraps the master
//! key in `seal.json` alone: one atomic write.
//!
//! Plaintext keys exist only in memory ([`Zeroizing`] buffers, wiped on drop).

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use argon2::{Algorithm, Argon2, Params, Version};
use falaj_common::at_rest::DeviceKey;
use ring::rand::SystemRandom;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::files;
use crate::secrets::random;

/// The seal descriptor's file name in a keys directory.
pub const SEAL_FILE: &str = "seal.json";
/// The systemd credential `serve` reads the secret from when the unit provides it
/// (`LoadCredentialEncrypted=falaj-keys:...`).
pub const CREDENTIAL: &str = "falaj-keys";
/// The format tag of a sealed file.
const SEALED_FORMAT: &str = "falaj-aes-256-gcm-1";
/// Associated data of the wrapped master key.
const MASTER_AAD: &[u8] = b"falaj keys master key v1";
/// Argon2id cost: 64 MiB, three passes, one lane (RFC 9106's second recommended option).
const KDF_MEMORY_KIB: u32 = 64 * 1024;
const KDF_PASSES: u32 = 3;
/// The shortest secret accepted when sealing.
const MIN_SECRET_BYTES: usize = 12;

/// Errors of sealed key files.
#[derive(Debug, Error)]
pub enum VaultError {
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        source: std::io::Error,
    },
    /// The directory is sealed and no secret was given.
    #[error(
        "the keys in {0} are sealed: start with --unseal-from stdin (the passphrase on standard \
         input) or --unseal-from credential (systemd's `falaj-keys` credential)"
    )]
    Sealed(PathBuf),
    /// The secret does not open the directory's master key.
    #[error("the secret does not open {0} (a wrong passphrase or credential)")]
    WrongSecret(PathBuf),
    /// A sealed file or the seal descriptor is damaged, or was copied from elsewhere.
    #[error("{path}: {reason}")]
    Damaged {
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The secret could not be had.
    #[error("reading the secret from {source_name}: {reason}")]
    Secret {
        /// Where it was looked for.
        source_name: String,
        /// What went wrong.
        reason: String,
    },
    /// `keys seal` on a directory that is already sealed.
    #[error("{0} is already sealed (change its secret with `keys seal --rekey`)")]
    AlreadySealed(PathBuf),
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> VaultError {
    let path = path.to_owned();
    move |source| VaultError::Io { op, path, source }
}

/// Where the operator's secret comes from (`--unseal-from`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnsealFrom {
    /// The first line of standard input (`systemd-ask-password | falaj-control serve ...`).
    Stdin,
    /// systemd's credential `falaj-keys` in `$CREDENTIALS_DIRECTORY`.
    Credential,
    /// A file (for scripts and tests; keep it on a RAM disk).
    File(PathBuf),
}

impl std::str::FromStr for UnsealFrom {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "stdin" => Ok(Self::Stdin),
            "credential" => Ok(Self::Credential),
            _ => match text.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(path.into())),
                _ => Err(format!("{text:?}: expected stdin, credential or file:PATH")),
            },
        }
    }
}

/// The operator's secret, read once (standard input cannot be read twice).
pub struct Secret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// The secret `bytes` (surrounding whitespace and a final newline are not part of it).
    pub fn new(bytes: &[u8]) -> Self {
        Self(Zeroizing::new(bytes.trim_ascii().to_vec()))
    }

    /// Reads the secret from `from`.
    pub fn read(from: &UnsealFrom) -> Result<Self, VaultError> {
        let fail = |source_name: &str, reason: String| VaultError::Secret {
            source_name: source_name.to_owned(),
            reason,
        };
        let secret = match from {
            UnsealFrom::Stdin => {
                let line =
                    read_line_quietly().map_err(|e| fail("standard input", e.to_string()))?;
                Self::new(line.as_bytes())
            }
            UnsealFrom::Credential => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    fail(
                        "the systemd credential",
                        "CREDENTIALS_DIRECTORY is not set (the unit gives no credentials)".into(),
                    )
                })?;
                Self::read_file(&Path::new(&dir).join(CREDENTIAL))?
            }
            UnsealFrom::File(path) => Self::read_file(path)?,
        };
        if secret.0.is_empty() {
            return Err(fail(&from.describe(), "it is empty".into()));
        }
        Ok(secret)
    }

    /// The systemd credential, when the unit provides one.
    pub fn from_credential_if_any() -> Result<Option<Self>, VaultError> {
        match std::env::var_os("CREDENTIALS_DIRECTORY") {
            Some(dir) if Path::new(&dir).join(CREDENTIAL).exists() => {
                Self::read(&UnsealFrom::Credential).map(Some)
            }
            _ => Ok(None),
        }
    }

    fn read_file(path: &Path) -> Result<Self, VaultError> {
        let mut bytes = Zeroizing::new(Vec::new());
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(io("reading the secret from", path))?;
        Ok(Self::new(&bytes))
    }
}

impl UnsealFrom {
    fn describe(&self) -> String {
        match self {
            Self::Stdin => "standard input".into(),
            Self::Credential => format!("the systemd credential {CREDENTIAL}"),
            Self::File(path) => path.display().to_string(),
        }
    }
}

/// `seal.json`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Descriptor {
    version: u32,
    kdf: Kdf,
    master_key: Envelope,
}

/// Argon2id parameters.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Kdf {
    algorithm: String,
    memory_kib: u32,
    passes: u32,
    lanes: u32,
    salt: String,
}

/// One sealed value: AES-256-GCM through [`DeviceKey::seal_blob`]
/// (`nonce ‖ ciphertext ‖ tag`), in hex.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    sealed: String,
    blob: String,
}

impl Kdf {
    fn fresh() -> Self {
        Self {
            algorithm: "argon2id".into(),
            memory_kib: KDF_MEMORY_KIB,
            passes: KDF_PASSES,
            lanes: 1,
            salt: hex::encode(random::<16>()),
        }
    }

    /// The key-encryption key `secret` gives.
    fn derive(&self, secret: &Secret) -> Result<DeviceKey, String> {
        if self.algorithm != "argon2id" {
            return Err(format!("unknown key derivation {:?}", self.algorithm));
        }
        let salt = hex::decode(&self.salt).map_err(|e| format!("salt: {e}"))?;
        let params = Params::new(self.memory_kib, self.passes, self.lanes, Some(32))
            .map_err(|e| format!("key derivation parameters: {e}"))?;
        let mut kek = Zeroizing::new([0u8; 32]);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(&secret.0, &salt, kek.as_mut())
            .map_err(|e| format!("key derivation: {e}"))?;
        Ok(aes_key(kek.as_ref()))
    }
}

fn aes_key(bytes: &[u8]) -> DeviceKey {
    DeviceKey::from_material(bytes).expect("32 bytes are a key")
}

impl Envelope {
    fn seal(key: &DeviceKey, aad: &[u8], plaintext: &[u8]) -> Self {
        let blob = key
            .seal_blob(aad, plaintext, &SystemRandom::new())
            .expect("the system random source works");
        Self { sealed: SEALED_FORMAT.into(), blob: hex::encode(blob) }
    }

    /// The plaintext, or `None` when the tag does not match (wrong key, tampered, moved).
    fn open(&self, key: &DeviceKey, aad: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, String> {
        if self.sealed != SEALED_FORMAT {
            return Err(format!("unknown sealed format {:?}", self.sealed));
        }
        let blob = hex::decode(&self.blob).map_err(|e| format!("sealed bytes: {e}"))?;
        Ok(key.open_blob(aad, blob).ok().map(Zeroizing::new))
    }
}

/// Whether `bytes` are a sealed file (keys are PKCS#8 DER, PEM or hex: none starts so).
fn is_sealed(bytes: &[u8]) -> bool {
    bytes.trim_ascii_start().starts_with(b"{")
}

/// Whether `name` is a private key file of a keys directory.
pub fn is_private_key_file(name: &str) -> bool {
    let key = Path::new(name).extension().is_some_and(|e| e == "key");
    key && (name.starts_with("root-")
        || name.starts_with("signing-")
        || name.starts_with("audit-")
        || name.starts_with("pii-")
        || name == crate::ca::CA_KEY_FILE)
}

/// The first line of standard input. At a terminal it is asked for on standard error and
/// read without echo, the terminal's settings restored after, so a typed passphrase is
/// not shown; piped in (`systemd-ask-password | ...`), it is read as it comes.
fn read_line_quietly() -> std::io::Result<Zeroizing<String>> {
    use std::io::{IsTerminal as _, Write as _};
    let stdin = std::io::stdin();
    let mut line = Zeroizing::new(String::new());
    if !stdin.is_terminal() {
        stdin.lock().read_line(&mut line)?;
        return Ok(line);
    }
    // Echo off before the prompt: a line typed as soon as it shows is not echoed.
    let quiet = NoEcho::on(&stdin);
    eprint!("secret of the sealed keys (not shown): ");
    std::io::stderr().flush()?;
    let read = stdin.lock().read_line(&mut line);
    drop(quiet);
    eprintln!();
    read.map(|_| line)
}

/// Echo turned off on a terminal until dropped.
struct NoEcho {
    saved: Option<rustix::termios::Termios>,
}

impl NoEcho {
    fn on(stdin: &std::io::Stdin) -> Self {
        use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
        let saved = tcgetattr(stdin).ok();
        if let Some(saved) = &saved {
            let mut quiet = saved.clone();
            quiet.local_modes.remove(LocalModes::ECHO);
            if let Err(err) = tcsetattr(stdin, OptionalActions::Now, &quiet) {
                tracing::warn!(error = %err, "cannot turn the terminal's echo off");
            }
        }
        Self { saved }
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

/// Read and write access to one keys directory's private key files.
pub struct Vault {
    dir: PathBuf,
    master: Option<Arc<DeviceKey>>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vault({}, sealed: {})", self.dir.display(), self.master.is_some())
    }
}

impl Vault {
    /// The vault of `dir`: plain, or sealed and opened with `secret` (needed then).
    pub fn open(dir: &Path, secret: Option<&Secret>) -> Result<Self, VaultError> {
        let path = dir.join(SEAL_FILE);
        let master = match std::fs::read(&path) {
            Ok(bytes) => {
                let secret = secret.ok_or_else(|| VaultError::Sealed(dir.to_owned()))?;
                Some(Arc::new(open_master(&path, &bytes, secret)?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("reading", &path)(e)),
        };
        Ok(Self { dir: dir.to_owned(), master })
    }

    /// The vault of `dir`, opened with `from`'s secret if `dir` is sealed, or with the
    /// systemd credential when the unit provides one and `from` is not given.
    pub fn open_from(dir: &Path, from: Option<&UnsealFrom>) -> Result<Self, VaultError> {
        if !dir.join(SEAL_FILE).exists() {
            return Self::open(dir, None);
        }
        let secret = match from {
            Some(from) => Some(Secret::read(from)?),
            None => Secret::from_credential_if_any()?,
        };
        Self::open(dir, secret.as_ref())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the directory is sealed.
    pub fn is_sealed(&self) -> bool {
        self.master.is_some()
    }

    /// The bytes of the private key file `name` in the directory.
    pub fn read(&self, name: &str) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        self.read_path(&self.dir.join(name))
    }

    /// The bytes of the private key file at `path` (in the directory or one below it).
    pub fn read_path(&self, path: &Path) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let bytes = Zeroizing::new(std::fs::read(path).map_err(io("reading", path))?);
        if !is_sealed(&bytes) {
            if self.master.is_some() {
                tracing::warn!(
                    file = %path.display(),
                    "a private key lies unsealed in a sealed keys directory; run `falaj-control keys seal` again"
                );
            }
            return Ok(bytes);
        }
        let master = self.master.as_ref().ok_or_else(|| VaultError::Sealed(self.dir.clone()))?;
        let damaged = |reason: String| VaultError::Damaged { path: path.to_owned(), reason };
        let sealed: Envelope = serde_json::from_slice(&bytes)
            .map_err(|e| damaged(format!("not a sealed file: {e}")))?;
        sealed.open(master, file_aad(path).as_bytes()).map_err(damaged)?.ok_or_else(|| {
            damaged(
                "does not open under this directory's master key (altered, or copied from \
                 another file or directory)"
                    .into(),
            )
        })
    }

    /// Writes the private key file `name` atomically, sealed when the directory is.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<PathBuf, VaultError> {
        let path = self.dir.join(name);
        let sealed;
        let contents = match &self.master {
            Some(master) => {
                sealed = serde_json::to_vec(&Envelope::seal(master, name.as_bytes(), bytes))
                    .expect("a sealed value serialises");
                &sealed[..]
            }
            // Sealed by `keys seal` while this vault was open: refuse rather than write
            // a plaintext key beside sealed ones.
            None if self.dir.join(SEAL_FILE).exists() => {
                return Err(VaultError::Sealed(self.dir.clone()));
            }
            None => bytes,
        };
        files::write_atomic(&path, contents, 0o600).map_err(io("writing", &path))?;
        Ok(path)
    }
}

/// A sealed file's associated data: its name, so files cannot stand in for each other.
fn file_aad(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn open_master(path: &Path, bytes: &[u8], secret: &Secret) -> Result<DeviceKey, VaultError> {
    let damaged = |reason: String| VaultError::Damaged { path: path.to_owned(), reason };
    let descriptor: Descriptor = serde_json::from_slice(bytes)
        .map_err(|e| damaged(format!("not a seal descriptor: {e}")))?;
    if descriptor.version != 1 {
        return Err(damaged(format!("unknown seal version {}", descriptor.version)));
    }
    let kek = descriptor.kdf.derive(secret).map_err(damaged)?;
    let master = descriptor
        .master_key
        .open(&kek, MASTER_AAD)
        .map_err(damaged)?
        .ok_or_else(|| VaultError::WrongSecret(path.to_owned()))?;
    if master.len() != 32 {
        return Err(damaged("the master key is not 256 bits".into()));
    }
    Ok(aes_key(&master))
}

fn descriptor_for(master: &[u8], secret: &Secret) -> Result<Vec<u8>, String> {
    if secret.0.len() < MIN_SECRET_BYTES {
        return Err(format!("the secret must be at least {MIN_SECRET_BYTES} bytes"));
    }
    let kdf = Kdf::fresh();
    let kek = kdf.derive(secret)?;
    let descriptor =
        Descriptor { version: 1, kdf, master_key: Envelope::seal(&kek, MASTER_AAD, master) };
    Ok(serde_json::to_vec_pretty(&descriptor).expect("a descriptor serialises"))
}

/// What `keys seal` did.
#[derive(Debug, Default)]
pub struct SealReport {
    /// Files sealed by this run (a rerun after an interruption seals the rest).
    pub sealed: Vec<PathBuf>,
    /// Files that were sealed already.
    pub already: usize,
}

/// Seals every private key file of `dir` (and of `dir/retired/`) under a new master key
/// wrapped with `secret`; on a directory sealed before, with the same secret, seals the
/// files left plain by an interrupted run. Each file is replaced atomically, so an
/// interrupted run leaves every key readable.
pub fn seal(dir: &Path, secret: &Secret) -> Result<SealReport, VaultError> {
    let descriptor_path = dir.join(SEAL_FILE);
    let vault = if descriptor_path.exists() {
        Vault::open(dir, Some(secret))?
    } else {
        let master = Zeroizing::new(random::<32>());
        let descriptor = descriptor_for(master.as_ref(), secret).map_err(|reason| {
            VaultError::Secret { source_name: "the new secret".into(), reason }
        })?;
        files::write_atomic(&descriptor_path, &descriptor, 0o600)
            .map_err(io("writing", &descriptor_path))?;
        Vault { dir: dir.to_owned(), master: Some(Arc::new(aes_key(master.as_ref()))) }
    };
    let mut report = SealReport::default();
    for folder in [dir.to_owned(), dir.join("retired")] {
        let listing = match std::fs::read_dir(&folder) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io("listing", &folder)(e)),
        };
        let mut names: Vec<String> = Vec::new();
        for entry in listing {
            let name = entry.map_err(io("listing", &folder))?.file_name();
            let name = name.to_string_lossy().into_owned();
            if is_private_key_file(&name) {
                names.push(name);
            }
        }
        names.sort();
        let folder_vault = Vault { dir: folder.clone(), master: vault.master.clone() };
        for name in names {
            let path = folder.join(&name);
            let bytes = Zeroizing::new(std::fs::read(&path).map_err(io("reading", &path))?);
            if is_sealed(&bytes) {
                folder_vault.read(&name)?;
                report.already += 1;
                continue;
            }
            report.sealed.push(folder_vault.write(&name, &bytes)?);
        }
    }
    Ok(report)
}

/// Wraps `dir`'s master key under `new` instead of `old` (`keys seal --rekey`): one
/// atomic write of `seal.json`; the key files are untouched.
pub fn rekey(dir: &Path, old: &Secret, new: &Secret) -> Result<(), VaultError> {
    let path = dir.join(SEAL_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VaultError::Damaged {
                path,
                reason: "the directory is not sealed (run `keys seal` first)".into(),
            });
        }
        Err(e) => return Err(io("reading", &path)(e)),
    };
    let damaged = |reason: String| VaultError::Damaged { path: path.clone(), reason };
    let descriptor: Descriptor = serde_json::from_slice(&bytes)
        .map_err(|e| damaged(format!("not a seal descriptor: {e}")))?;
    let kek = descriptor.kdf.derive(old).map_err(damaged)?;
    let master = descriptor
        .master_key
        .open(&kek, MASTER_AAD)
        .map_err(damaged)?
        .ok_or_else(|| VaultError::WrongSecret(path.clone()))?;
    let rewrapped = descriptor_for(&master, new)
        .map_err(|reason| VaultError::Secret { source_name: "the new secret".into(), reason })?;
    files::write_atomic(&path, &rewrapped, 0o600).map_err(io("writing", &path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(text: &str) -> Secret {
        Secret::new(text.as_bytes())
    }

    fn keys_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("signing-aaaa.key"), b"\x30\x51signing key").unwrap();
        std::fs::write(dir.path().join("ca.key"), b"-----BEGIN PRIVATE KEY-----\nca").unwrap();
        std::fs::write(dir.path().join("pii-eu.key"), b"00112233").unwrap();
        std::fs::write(dir.path().join("root.json"), b"{\"public\": true}").unwrap();
        dir
    }

    #[test]
    fn sealing_leaves_no_key_in_the_clear_and_the_secret_opens_them() {
        let dir = keys_dir();
        let report = seal(dir.path(), &secret("correct horse battery")).unwrap();
        assert_eq!(report.sealed.len(), 3);
        for name in ["signing-aaaa.key", "ca.key", "pii-eu.key"] {
            let on_disk = std::fs::read(dir.path().join(name)).unwrap();
            assert!(is_sealed(&on_disk), "{name} is sealed");
        }
        let sealed = std::fs::read(dir.path().join("signing-aaaa.key")).unwrap();
        assert!(!sealed.windows(11).any(|w| w == b"signing key"));
        // The public trust root is not a key and stays as it was.
        assert_eq!(std::fs::read(dir.path().join("root.json")).unwrap(), b"{\"public\": true}");

        let vault = Vault::open(dir.path(), Some(&secret("correct horse battery"))).unwrap();
        assert_eq!(&vault.read("signing-aaaa.key").unwrap()[..], b"\x30\x51signing key");
        assert_eq!(&vault.read("pii-eu.key").unwrap()[..], b"00112233");

        // A second run finds nothing to do.
        let again = seal(dir.path(), &secret("correct horse battery")).unwrap();
        assert_eq!((again.sealed.len(), again.already), (0, 3));
    }

    #[test]
    fn a_sealed_directory_needs_the_right_secret() {
        let dir = keys_dir();
        seal(dir.path(), &secret("correct horse battery")).unwrap();
        assert!(matches!(Vault::open(dir.path(), None), Err(VaultError::Sealed(_))));
        assert!(matches!(
            Vault::open(dir.path(), Some(&secret("wrong horse battery"))),
            Err(VaultError::WrongSecret(_))
        ));
        // A rerun of `keys seal` with another secret is refused before anything changes.
        let before = std::fs::read(dir.path().join("ca.key")).unwrap();
        assert!(matches!(
            seal(dir.path(), &secret("wrong horse battery")),
            Err(VaultError::WrongSecret(_))
        ));
        assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), before);
    }

    #[test]
    fn a_sealed_file_copied_over_another_or_altered_is_refused() {
        let dir = keys_dir();
        let pass = secret("correct horse battery");
        seal(dir.path(), &pass).unwrap();
        let vault = Vault::open(dir.path(), Some(&pass)).unwrap();
        std::fs::copy(dir.path().join("ca.key"), dir.path().join("pii-eu.key")).unwrap();
        let err = vault.read("pii-eu.key").unwrap_err();
        assert!(err.to_string().contains("pii-eu.key"), "{err}");
        assert!(matches!(err, VaultError::Damaged { .. }));

        let path = dir.path().join("signing-aaaa.key");
        let mut sealed: Envelope = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let mut bytes = hex::decode(&sealed.blob).unwrap();
        bytes[20] ^= 1;
        sealed.blob = hex::encode(bytes);
        std::fs::write(&path, serde_json::to_vec(&sealed).unwrap()).unwrap();
        assert!(matches!(vault.read("signing-aaaa.key"), Err(VaultError::Damaged { .. })));
    }

    #[test]
    fn new_keys_in_a_sealed_directory_are_written_sealed() {
        let dir = keys_dir();
        let pass = secret("correct horse battery");
        // A vault opened before the directory was sealed refuses to write in the clear.
        let stale = Vault::open(dir.path(), None).unwrap();
        seal(dir.path(), &pass).unwrap();
        assert!(matches!(stale.write("audit-bbbb.key", b"audit"), Err(VaultError::Sealed(_))));
        assert!(!dir.path().join("audit-bbbb.key").exists());

        let vault = Vault::open(dir.path(), Some(&pass)).unwrap();
        vault.write("audit-bbbb.key", b"audit key bytes").unwrap();
        let on_disk = std::fs::read(dir.path().join("audit-bbbb.key")).unwrap();
        assert!(is_sealed(&on_disk));
        assert_eq!(&vault.read("audit-bbbb.key").unwrap()[..], b"audit key bytes");
    }

    #[test]
    fn rekeying_changes_only_the_descriptor() {
        let dir = keys_dir();
        let (old, new) = (secret("correct horse battery"), secret("a new secret entirely"));
        seal(dir.path(), &old).unwrap();
        let before = std::fs::read(dir.path().join("ca.key")).unwrap();
        assert!(matches!(rekey(dir.path(), &new, &old), Err(VaultError::WrongSecret(_))));
        rekey(dir.path(), &old, &new).unwrap();
        assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), before);
        assert!(matches!(Vault::open(dir.path(), Some(&old)), Err(VaultError::WrongSecret(_))));
        let vault = Vault::open(dir.path(), Some(&new)).unwrap();
        assert_eq!(&vault.read("pii-eu.key").unwrap()[..], b"00112233");
    }

    #[test]
    fn short_secrets_and_bad_sources_are_refused() {
        let dir = keys_dir();
        let err = seal(dir.path(), &secret("short")).unwrap_err();
        assert!(err.to_string().contains("at least 12 bytes"), "{err}");
        assert!(!dir.path().join(SEAL_FILE).exists());
        assert_eq!("stdin".parse(), Ok(UnsealFrom::Stdin));
        assert_eq!("file:/run/k".parse(), Ok(UnsealFrom::File("/run/k".into())));
        assert!("env".parse::<UnsealFrom>().is_err());
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"\n").unwrap();
        let err = Secret::read(&UnsealFrom::File(empty)).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
