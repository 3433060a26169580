//! Encryption at rest of installed bundles (models, feature snapshots, derived models):
//! where the device key comes from, staging a bundle sealed as it is written, opening an
//! installed one (all of it, or the chunk a delta transfer reuses), sealing the plaintext
//! files an older agent left, and rotating the device key.
//!
//! The format and the cryptography are [`falaj_common::at_rest`]'s. Each bundle row holds
//! its file's data key, wrapped by the device key, and that key's id: rotation re-wraps
//! the rows in one transaction and rewrites no file. The device key is read from systemd's
//! credentials directory (`$CREDENTIALS_DIRECTORY/falaj-device-key`, from the unit's
//! `LoadCredentialEncrypted=`) when there is one, else from `DATA_DIR/device.key`, made at
//! `init` with mode 0600; a key file any other user could read is refused.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use falaj_common::at_rest::{self, DataKey, DeviceKey, KeyError, KeyId, Opener, Sealer};
use falaj_common::bundle::Manifest;
use falaj_common::keys::Sha256;
use falaj_common::time::Timestamp;
use ring::rand::SystemRandom;
use rusqlite::{OptionalExtension, params};

use super::{Result, Store, StoreError, io_err, sync_dir};

/// The device key file in the data directory, when no credential provides the key.
pub const KEY_FILE: &str = "device.key";
/// A new key file written before a rotation commits, renamed over [`KEY_FILE`] after.
const NEXT_KEY_FILE: &str = "device.key.next";
/// The name of the systemd credential holding the device key.
pub const CREDENTIAL: &str = "falaj-device-key";

/// Where the device key was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A systemd credential (`LoadCredential=` or `LoadCredentialEncrypted=`).
    Credential(PathBuf),
    /// The 0600 key file in the data directory.
    File(PathBuf),
}

impl std::fmt::Display for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Credential(path) => write!(f, "systemd credential {}", path.display()),
            Self::File(path) => write!(f, "key file {}", path.display()),
        }
    }
}

/// What `keys status` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// The device key's id.
    pub key_id: String,
    /// Where it was read from.
    pub source: KeySource,
    /// Bundle files sealed under it.
    pub sealed: u64,
    /// Bundle files in plaintext (none after an open; only while another process seals).
    pub plaintext: u64,
}

/// The identity a bundle file's segments and wrapped key are bound to.
pub(super) fn identity(name: &str, version: u64, manifest_sha256: &str) -> Vec<u8> {
    format!("falaj bundle {name}@{version} manifest {manifest_sha256}").into_bytes()
}

fn credential() -> Option<PathBuf> {
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
    let path = Path::new(&dir).join(CREDENTIAL);
    path.is_file().then_some(path)
}

fn key_error(source: &KeySource, problem: impl std::fmt::Display) -> StoreError {
    StoreError::DeviceKey(format!("{source}: {problem}"))
}

/// Reads a key file, refusing one whose mode lets others read it.
fn read_key_file(path: &Path) -> Result<DeviceKey> {
    let file = File::open(path).map_err(io_err("reading device key", path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            file.metadata().map_err(io_err("reading device key", path))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(StoreError::KeyFileMode { path: path.to_owned(), mode: mode & 0o7777 });
        }
    }
    let mut material = Vec::new();
    (&file).read_to_end(&mut material).map_err(io_err("reading device key", path))?;
    DeviceKey::from_material(&material).map_err(|e| key_error(&KeySource::File(path.into()), e))
}

/// Writes `key` to `path` (mode 0600, fsynced, then renamed into place; the directory
/// synced); with `clobber` false an existing file wins and is left as it is.
fn write_key_file(path: &Path, key: &DeviceKey, clobber: bool) -> Result<()> {
    let dir = path.parent().expect("key files are in the data directory");
    let mut builder = tempfile::Builder::new();
    builder.prefix(".device-key-");
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600));
    let mut temp = builder.tempfile_in(dir).map_err(io_err("writing device key in", dir))?;
    temp.write_all(key.to_hex().as_bytes()).map_err(io_err("writing device key", path))?;
    temp.as_file().sync_all().map_err(io_err("writing device key", path))?;
    let persisted = if clobber { temp.persist(path) } else { temp.persist_noclobber(path) };
    match persisted {
        Ok(_) => {}
        Err(e) if !clobber && e.error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(StoreError::Io {
                op: "writing device key",
                path: path.into(),
                source: e.error,
            });
        }
    }
    sync_dir(dir)
}

/// The device key: the credential's if the unit provides one, else the key file's, made
/// now if `create` and absent.
pub(super) fn load_device_key(dir: &Path, create: bool) -> Result<(DeviceKey, KeySource)> {
    if let Some(path) = credential() {
        let source = KeySource::Credential(path.clone());
        let material = fs::read(&path).map_err(io_err("reading device key credential", &path))?;
        let key = DeviceKey::from_material(&material).map_err(|e| key_error(&source, e))?;
        return Ok((key, source));
    }
    let path = dir.join(KEY_FILE);
    if !path.exists() {
        if !create {
            return Err(key_error(
                &KeySource::File(path),
                "missing, and installed bundles are sealed under a device key: restore the file, or provide the key as the systemd credential falaj-device-key",
            ));
        }
        let key = DeviceKey::generate(&SystemRandom::new())
            .map_err(|e| key_error(&KeySource::File(path.clone()), e))?;
        write_key_file(&path, &key, false)?;
    }
    Ok((read_key_file(&path)?, KeySource::File(path)))
}

/// Seals the chunks of a transfer in progress (the files in `DATA_DIR/chunks/`, kept until
/// their bundle installs so that a broken transfer resumes) under the device key. A chunk
/// file that no longer opens (the key was rotated since) counts as absent.
#[derive(Debug, Clone)]
pub struct ChunkSealer(Arc<DeviceKey>);

fn chunk_identity(sha256: &Sha256) -> Vec<u8> {
    format!("falaj transfer chunk {sha256}").into_bytes()
}

impl ChunkSealer {
    /// The sealed form of chunk `sha256`'s bytes.
    pub fn seal(&self, sha256: &Sha256, bytes: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.0.seal_blob(&chunk_identity(sha256), bytes, &SystemRandom::new())
    }

    /// The chunk's bytes, if `sealed` opens and they hash to `sha256`.
    pub fn open(&self, sha256: &Sha256, sealed: Vec<u8>) -> Option<Vec<u8>> {
        let bytes = self.0.open_blob(&chunk_identity(sha256), sealed).ok()?;
        (Sha256::of(&bytes) == *sha256).then_some(bytes)
    }
}

/// A bundle row's wrapped data key and key id (none for a plaintext file), and its
/// manifest hash.
type KeyRow = (Option<(Vec<u8>, String)>, String);

/// A bundle being staged: sealed under a fresh data key as it is written, so that no
/// plaintext of it reaches the disk.
#[derive(Debug)]
pub struct Staging {
    file: tempfile::NamedTempFile,
    sealer: Sealer,
    out: Vec<u8>,
    identity: Vec<u8>,
    size: u64,
}

/// A staged bundle, sealed and fsynced, ready for [`Store::install`].
#[derive(Debug)]
pub struct Sealed {
    pub(super) file: tempfile::NamedTempFile,
    pub(super) key: DataKey,
    pub(super) identity: Vec<u8>,
    /// The bundle's size (plaintext).
    pub size: u64,
}

impl Sealed {
    /// The staged file (sealed).
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

impl Write for Staging {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.sealer.push(data, &mut self.out);
        self.size += data.len() as u64;
        if self.out.len() >= at_rest::SEGMENT {
            self.file.write_all(&self.out)?;
            self.out.clear();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Staging {
    /// Seals the last segment and fsyncs the file.
    pub fn finish(self) -> io::Result<Sealed> {
        let Self { mut file, sealer, mut out, identity, size } = self;
        let key = sealer.finish(&mut out);
        file.write_all(&out)?;
        file.as_file().sync_all()?;
        Ok(Sealed { file, key, identity, size })
    }
}

impl Store {
    /// Starts staging the bundle whose manifest is `manifest_bytes` (prefix names the
    /// staged file: `import-`, `derived-`).
    pub fn stage(
        &self,
        manifest: &Manifest,
        manifest_bytes: &[u8],
        prefix: &str,
    ) -> Result<Staging> {
        let staging = self.staging_dir();
        fs::create_dir_all(&staging).map_err(io_err("creating", &staging))?;
        let file = tempfile::Builder::new()
            .prefix(prefix)
            .suffix(".sealed")
            .tempfile_in(&staging)
            .map_err(io_err("writing staged bundle in", &staging))?;
        let identity =
            identity(&manifest.name, manifest.version, &Sha256::of(manifest_bytes).to_string());
        let key =
            DataKey::generate(&SystemRandom::new()).map_err(|e| key_error(&self.key_source, e))?;
        let mut out = Vec::with_capacity(2 * at_rest::SEGMENT);
        let sealer = Sealer::new(key, &identity, &mut out);
        Ok(Staging { file, sealer, out, identity, size: 0 })
    }

    /// Wraps a staged bundle's data key under the device key, for its row.
    pub(super) fn wrap(&self, sealed: &Sealed) -> Result<Vec<u8>> {
        self.device
            .wrap(&sealed.key, &sealed.identity, &SystemRandom::new())
            .map_err(|e| key_error(&self.key_source, e))
    }

    /// What seals the chunk files of transfers in progress.
    pub fn chunk_sealer(&self) -> ChunkSealer {
        ChunkSealer(Arc::clone(&self.device))
    }

    /// The device key's id.
    pub fn device_key_id(&self) -> &KeyId {
        self.device.id()
    }

    /// Unwraps a row's data key. A row wrapped under another key id (a rotation by another
    /// process since this store opened) is tried with the key read again from its source.
    fn data_key(&self, wrapped: &[u8], key_id: &str, identity: &[u8]) -> Result<DataKey> {
        let reloaded;
        let device = if key_id == self.device.id().as_str() {
            &*self.device
        } else {
            reloaded = load_device_key(&self.dir, false)?.0;
            &reloaded
        };
        if key_id != device.id().as_str() {
            return Err(key_error(
                &self.key_source,
                format!(
                    "holds device key {}, but the bundle's data key is wrapped under {key_id}",
                    device.id()
                ),
            ));
        }
        device.unwrap(wrapped, identity).map_err(|e| key_error(&self.key_source, e))
    }

    /// A bundle row's wrapped key, key id and manifest hash; no key for a plaintext file.
    fn key_row(&self, name: &str, version: u64) -> Result<KeyRow> {
        let row: (Option<Vec<u8>>, Option<String>, String) = self
            .conn
            .query_row(
                "SELECT data_key, key_id, manifest_sha256 FROM bundles WHERE name = ?1 AND version = ?2",
                params![name, version as i64],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(self.db())?;
        Ok((row.0.zip(row.1), row.2))
    }

    /// The plaintext of an installed bundle file, read whole; `damaged` turns a failed
    /// authentication into the caller's error.
    pub(super) fn read_bundle_file(
        &self,
        name: &str,
        version: u64,
        path: &Path,
        damaged: impl Fn(String) -> StoreError,
    ) -> Result<Vec<u8>> {
        let raw = fs::read(path).map_err(io_err("reading bundle", path))?;
        let (key, sha) = self.key_row(name, version)?;
        let Some((wrapped, key_id)) = key else { return Ok(raw) };
        let identity = identity(name, version, &sha);
        let key = self.data_key(&wrapped, &key_id, &identity)?;
        at_rest::open(&key, &identity, raw).map_err(|e| damaged(e.to_string()))
    }

    /// The bytes of a chunk held in an installed bundle (for a delta transfer), opening
    /// only the segments it spans; `None` if no installed bundle holds it.
    pub fn read_chunk(&self, sha256: &Sha256) -> Result<Option<Vec<u8>>> {
        let found: Option<(String, i64, String, i64, i64)> = self
            .conn
            .query_row(
                "SELECT b.name, b.version, b.path, c.offset, c.size FROM chunk_index c
                 JOIN bundles b ON b.name = c.name AND b.version = c.version
                 WHERE c.sha256 = ?1 LIMIT 1",
                [sha256.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .map_err(self.db())?;
        let Some((name, version, path, offset, size)) = found else { return Ok(None) };
        let (version, offset, size) = (version as u64, offset as u64, size as u64);
        let path = self.dir.join(path);
        let read = io_err("reading bundle", &path);
        let mut file = File::open(&path).map_err(io_err("reading bundle", &path))?;
        let (key, sha) = self.key_row(&name, version)?;
        let Some((wrapped, key_id)) = key else {
            let mut buf = vec![0u8; size as usize];
            file.seek(SeekFrom::Start(offset))
                .and_then(|_| file.read_exact(&mut buf))
                .map_err(read)?;
            return Ok(Some(buf));
        };
        let damaged = |problem: String| StoreError::Damaged {
            name: name.clone(),
            version,
            path: path.clone(),
            problem,
        };
        let len = file.metadata().map_err(io_err("reading bundle", &path))?.len();
        let mut head = [0u8; at_rest::HEADER_LEN];
        file.read_exact(&mut head).map_err(io_err("reading bundle", &path))?;
        let identity = identity(&name, version, &sha);
        let key = self.data_key(&wrapped, &key_id, &identity)?;
        let opener =
            Opener::new(&key, &identity, &head, len).map_err(|e| damaged(e.to_string()))?;
        let range = offset..offset + size;
        let (_, at) = opener.segments_for(range.clone()).map_err(|e| damaged(e.to_string()))?;
        let mut sealed = vec![0u8; (at.end - at.start) as usize];
        file.seek(SeekFrom::Start(at.start))
            .and_then(|_| file.read_exact(&mut sealed))
            .map_err(io_err("reading bundle", &path))?;
        opener.open_range(range, sealed).map(Some).map_err(|e| damaged(e.to_string()))
    }

    /// Seals every bundle file an older agent wrote in plaintext: each is sealed into a
    /// new file, which replaces the old one in its row's transaction (a crash leaves either
    /// the old file and row, or the new ones; the next open sweeps the other file).
    pub(super) fn seal_plaintext(&mut self, now: SystemTime) -> Result<usize> {
        let rows: Vec<(String, i64, String, Vec<u8>)> = {
            let mut stmt = self
                .conn
                .prepare("SELECT name, version, path, manifest FROM bundles WHERE data_key IS NULL")
                .map_err(self.db())?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .map_err(self.db())?;
            rows.collect::<rusqlite::Result<_>>().map_err(self.db())?
        };
        let mut sealed_count = 0;
        for (name, version, old, manifest_bytes) in rows {
            let old_path = self.dir.join(&old);
            let manifest: Manifest =
                serde_json::from_slice(&manifest_bytes).map_err(|e| StoreError::Damaged {
                    name: name.clone(),
                    version: version as u64,
                    path: old_path.clone(),
                    problem: format!("stored manifest does not parse: {e}"),
                })?;
            let mut staging = self.stage(&manifest, &manifest_bytes, "seal-")?;
            let mut from = File::open(&old_path).map_err(io_err("reading bundle", &old_path))?;
            io::copy(&mut from, &mut staging).map_err(io_err("sealing bundle", &old_path))?;
            let sealed = staging.finish().map_err(io_err("sealing bundle", &old_path))?;
            let wrapped = self.wrap(&sealed)?;
            let key_id = self.device.id().to_string();
            let relative = Self::bundle_path(&name, version as u64);
            let target = self.dir.join(&relative);
            let at = Timestamp::from_system(now).unix() as i64;
            let db_path = self.db_path.clone();
            let db = |source| StoreError::Db { path: db_path.clone(), source };
            let tx = self
                .conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(db)?;
            let updated = tx
                .execute(
                    "UPDATE bundles SET path = ?1, data_key = ?2, key_id = ?3
                     WHERE name = ?4 AND version = ?5 AND data_key IS NULL",
                    params![relative.to_string_lossy(), wrapped, key_id, name, version],
                )
                .map_err(db)?;
            // Zero: another process sealed it meanwhile.
            let done = updated == 1;
            if done {
                let detail = "sealed at rest";
                super::audit::event(&tx, at, "seal", Some((&name, version as u64)), detail)
                    .map_err(db)?;
                // In place before the commit, as an install does.
                sealed.file.persist(&target).map_err(|e| StoreError::Io {
                    op: "installing sealed bundle at",
                    path: target.clone(),
                    source: e.error,
                })?;
                sync_dir(target.parent().expect("bundle paths have a parent"))?;
                tx.commit().map_err(db)?;
            }
            if done {
                if old_path != target {
                    let _ = fs::remove_file(&old_path);
                }
                tracing::info!(model = %name, version, "sealed a plaintext bundle file at rest");
                sealed_count += 1;
            }
        }
        Ok(sealed_count)
    }

    /// Finishes a rotation interrupted after its commit (the new key file is renamed into
    /// place) or drops one interrupted before it; then checks that every wrapped key is
    /// under the device key held.
    pub(super) fn check_device_key(&mut self) -> Result<()> {
        let next = self.dir.join(NEXT_KEY_FILE);
        if matches!(self.key_source, KeySource::File(_)) && next.exists() {
            let new = read_key_file(&next)?;
            if self.uses_key_id(new.id().as_str())? {
                let path = self.dir.join(KEY_FILE);
                fs::rename(&next, &path).map_err(io_err("installing device key", &path))?;
                sync_dir(&self.dir)?;
                self.device = Arc::new(new);
            } else {
                fs::remove_file(&next).map_err(io_err("removing", &next))?;
            }
        }
        let other: Option<String> = self
            .conn
            .query_row(
                "SELECT key_id FROM bundles WHERE key_id IS NOT NULL AND key_id != ?1 LIMIT 1",
                [self.device.id().as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())?;
        match other {
            None => Ok(()),
            Some(other) => Err(key_error(
                &self.key_source,
                format!(
                    "holds device key {}, but installed bundles are sealed under device key {other}",
                    self.device.id()
                ),
            )),
        }
    }

    fn uses_key_id(&self, id: &str) -> Result<bool> {
        self.conn
            .query_row("SELECT EXISTS (SELECT 1 FROM bundles WHERE key_id = ?1)", [id], |r| {
                r.get(0)
            })
            .map_err(self.db())
    }

    /// Whether any bundle is sealed (then a missing key file is an error, not made anew).
    pub(super) fn any_sealed(conn: &rusqlite::Connection) -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM bundles WHERE data_key IS NOT NULL)",
            [],
            |r| r.get(0),
        )
    }

    /// Where the device key comes from, and what it seals.
    pub fn key_status(&self) -> Result<KeyStatus> {
        let (sealed, plaintext): (i64, i64) = self
            .conn
            .query_row("SELECT COUNT(data_key), COUNT(*) - COUNT(data_key) FROM bundles", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(self.db())?;
        Ok(KeyStatus {
            key_id: self.device.id().to_string(),
            source: self.key_source.clone(),
            sealed: sealed as u64,
            plaintext: plaintext as u64,
        })
    }

    /// Re-wraps every data key under a new device key in one transaction; no bundle file
    /// is rewritten. With a key file, the new key is `new` or a random one, written to
    /// `device.key.next` before the transaction and renamed over `device.key` after it (an
    /// open finishes or drops an interrupted rotation). With a systemd credential, `new` is
    /// required and the operator replaces the credential. Returns the new key's id and how
    /// many keys were re-wrapped.
    pub fn rotate_device_key(
        &mut self,
        new: Option<DeviceKey>,
        now: SystemTime,
    ) -> Result<(KeyId, usize)> {
        let new = match (new, &self.key_source) {
            (Some(key), _) => key,
            (None, KeySource::File(_)) => DeviceKey::generate(&SystemRandom::new())
                .map_err(|e| key_error(&self.key_source, e))?,
            (None, source @ KeySource::Credential(_)) => {
                return Err(StoreError::Refused(format!(
                    "the device key comes from the {source}: make a new key, pass it with --new-key FILE, then replace the credential with it"
                )));
            }
        };
        if new.id() == self.device.id() {
            return Err(StoreError::Refused(format!(
                "the new device key is the one in use ({})",
                new.id()
            )));
        }
        let next = self.dir.join(NEXT_KEY_FILE);
        if matches!(self.key_source, KeySource::File(_)) {
            write_key_file(&next, &new, true)?;
        }
        let at = Timestamp::from_system(now).unix() as i64;
        let rng = SystemRandom::new();
        let (old_id, new_id) = (self.device.id().to_string(), new.id().to_string());
        let device = &self.device;
        let source = self.key_source.clone();
        let path = self.db_path.clone();
        let db = |e| StoreError::Db { path: path.clone(), source: e };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(db)?;
        let rows: Vec<(String, i64, String, Vec<u8>, String)> = {
            let mut stmt = tx
                .prepare(
                    "SELECT name, version, manifest_sha256, data_key, key_id FROM bundles
                     WHERE data_key IS NOT NULL",
                )
                .map_err(db)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
                .map_err(db)?;
            rows.collect::<rusqlite::Result<_>>().map_err(db)?
        };
        for (name, version, sha, wrapped, key_id) in &rows {
            if *key_id != old_id {
                return Err(key_error(
                    &source,
                    format!(
                        "{name}@{version} is wrapped under device key {key_id}, not the one held ({old_id})"
                    ),
                ));
            }
            let identity = identity(name, *version as u64, sha);
            let data = device.unwrap(wrapped, &identity).map_err(|e| key_error(&source, e))?;
            let rewrapped = new.wrap(&data, &identity, &rng).map_err(|e| key_error(&source, e))?;
            tx.execute(
                "UPDATE bundles SET data_key = ?1, key_id = ?2 WHERE name = ?3 AND version = ?4",
                params![rewrapped, new_id, name, version],
            )
            .map_err(db)?;
        }
        let detail =
            format!("device key {old_id} -> {new_id}, {} data keys re-wrapped", rows.len());
        super::audit::event(&tx, at, "rotate-device-key", None, &detail).map_err(db)?;
        crate::crash_point("rotate-device-key-before-commit");
        tx.commit().map_err(db)?;
        if matches!(self.key_source, KeySource::File(_)) {
            let path = self.dir.join(KEY_FILE);
            fs::rename(&next, &path).map_err(io_err("installing device key", &path))?;
            sync_dir(&self.dir)?;
        }
        let id = new.id().clone();
        self.device = Arc::new(new);
        Ok((id, rows.len()))
    }
}
