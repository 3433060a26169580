//! The agent's state on disk: one SQLite database and the installed bundle files.
//!
//! ```text
//! DATA_DIR/            0700
//!   agent.db           SQLite (WAL): settings, trust root, installed bundles, active versions, events
//!   device.key         the device key (0600), unless a systemd credential provides it
//!   bundles/NAME/V.sealed  each installed bundle as verified, sealed at rest (see [`at_rest`])
//!   staging/           imports in progress, sealed as written (same file system, so
//!                      install is a rename)
//! ```
//!
//! Invariants: a row in `bundles` exists only for a file that was fully verified and
//! fsynced before the row's transaction committed; `active` only names installed rows.
//! Files without a row (an import that died between rename and commit) are swept on open.
//! Every bundle file is sealed under its own data key, which its row holds wrapped by the
//! device key; plaintext files an older agent wrote are sealed on open.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use falaj_common::bundle::{self, BundleKind, Header, Manifest, PayloadCheck, VerifyError};
use falaj_common::keys::Sha256;
use falaj_common::names;
use falaj_common::time::Timestamp;
use falaj_common::trust::{TrustError, TrustRoot};
use falaj_shell::sqlite::OpenError;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use thiserror::Error;

pub mod at_rest;
pub mod audit;
mod derived;
mod managed;
mod outbox;
mod rollouts;
mod trust;

pub use at_rest::{ChunkSealer, KeySource, KeyStatus, Sealed, Staging};
pub use derived::Overlay;
pub use managed::{ChunkSource, Identity};
pub use rollouts::StoredRollout;

/// Database file name inside the data directory.
pub const DB_FILE: &str = "agent.db";

/// Schema migrations, applied in order; the schema version is `PRAGMA user_version`.
const MIGRATIONS: &[&str] = &[
    // 1: initial schema.
    "CREATE TABLE settings (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) STRICT;
    CREATE TABLE trust_roots (
        version      INTEGER PRIMARY KEY,
        document     BLOB NOT NULL,
        installed_at INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE bundles (
        name            TEXT NOT NULL,
        version         INTEGER NOT NULL,
        kind            TEXT NOT NULL,
        manifest        BLOB NOT NULL,
        manifest_sha256 TEXT NOT NULL,
        path            TEXT NOT NULL,
        size            INTEGER NOT NULL,
        installed_at    INTEGER NOT NULL,
        PRIMARY KEY (name, version)
    ) STRICT;
    CREATE TABLE active (
        name         TEXT PRIMARY KEY,
        version      INTEGER NOT NULL,
        activated_at INTEGER NOT NULL,
        FOREIGN KEY (name, version) REFERENCES bundles (name, version)
    ) STRICT;
    CREATE TABLE events (
        id      INTEGER PRIMARY KEY,
        at      INTEGER NOT NULL,
        kind    TEXT NOT NULL,
        name    TEXT,
        version INTEGER,
        detail  TEXT NOT NULL
    ) STRICT;",
    // 2: control-plane management: managed bundles, chunk index, identity, desired state.
    "ALTER TABLE bundles ADD COLUMN managed INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE chunk_index (
        sha256  TEXT NOT NULL,
        name    TEXT NOT NULL,
        version INTEGER NOT NULL,
        offset  INTEGER NOT NULL,
        size    INTEGER NOT NULL,
        PRIMARY KEY (name, version, offset),
        FOREIGN KEY (name, version) REFERENCES bundles (name, version) ON DELETE CASCADE
    ) STRICT;
    CREATE INDEX chunk_index_sha256 ON chunk_index (sha256);
    CREATE TABLE identity (
        id            INTEGER PRIMARY KEY CHECK (id = 1),
        agent_id      TEXT NOT NULL,
        grp           TEXT NOT NULL,
        control_plane TEXT NOT NULL,
        enrolled_at   INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE desired (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        version     INTEGER NOT NULL,
        document    BLOB NOT NULL,
        accepted_at INTEGER NOT NULL
    ) STRICT;",
    // 3: the metrics outbox.
    "CREATE TABLE outbox (
        seq              INTEGER PRIMARY KEY,
        requests         INTEGER NOT NULL,
        dropped_windows  INTEGER NOT NULL,
        dropped_requests INTEGER NOT NULL,
        window           BLOB NOT NULL,
        created_at       INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE outbox_state (
        id               INTEGER PRIMARY KEY CHECK (id = 1),
        next_seq         INTEGER NOT NULL,
        dropped_windows  INTEGER NOT NULL,
        dropped_requests INTEGER NOT NULL
    ) STRICT;
    INSERT INTO outbox_state (id, next_seq, dropped_windows, dropped_requests) VALUES (1, 1, 0, 0);",
    // 4: derived models (fine-tuned on site) serving in place of their parents, and the
    // fine-tune jobs the control plane ordered.
    "CREATE TABLE overlays (
        name         TEXT PRIMARY KEY,
        derived      TEXT NOT NULL,
        version      INTEGER NOT NULL,
        activated_at INTEGER NOT NULL,
        FOREIGN KEY (derived, version) REFERENCES bundles (name, version) ON DELETE CASCADE
    ) STRICT;
    CREATE TABLE jobs (
        id         TEXT PRIMARY KEY,
        spec       TEXT NOT NULL,
        state      TEXT NOT NULL,
        report     TEXT,
        updated_at INTEGER NOT NULL
    ) STRICT;",
    // 5: the rollouts of the accepted document, each with what its variants served so far
    // and, once a guard failed here, when and why the agent rolled it back.
    "CREATE TABLE rollouts (
        id             TEXT PRIMARY KEY,
        spec           TEXT NOT NULL,
        baseline       BLOB NOT NULL,
        candidate      BLOB NOT NULL,
        rolled_back_at INTEGER,
        reason         TEXT
    ) STRICT;",
    // 6: the agent's audit log: a hash chain of its security events (each line exactly
    // as hashed) and the checkpoints its audit key signed.
    "CREATE TABLE audit (
        seq    INTEGER PRIMARY KEY,
        at     INTEGER NOT NULL,
        action TEXT NOT NULL,
        line   TEXT NOT NULL,
        hash   TEXT NOT NULL
    ) STRICT;
    CREATE TABLE audit_checkpoints (
        seq  INTEGER PRIMARY KEY,
        line TEXT NOT NULL
    ) STRICT;",
    // 7: encryption at rest: each bundle file's data key, wrapped by the device key that
    // `key_id` names (NULL for a plaintext file an older agent wrote, sealed on open).
    // Rotation re-wraps these rows in one transaction; the files are not rewritten.
    "ALTER TABLE bundles ADD COLUMN data_key BLOB;
    ALTER TABLE bundles ADD COLUMN key_id TEXT;",
    // 8: API keys of the inference APIs (`crate::apikeys`): only each secret's SHA-256;
    // `models` is a JSON list of model names, NULL for every model.
    "CREATE TABLE api_keys (
        name          TEXT PRIMARY KEY,
        secret_sha256 BLOB NOT NULL UNIQUE,
        models        TEXT,
        created_at    INTEGER NOT NULL,
        expires_at    INTEGER,
        revoked_at    INTEGER
    ) STRICT;",
    // 9: the rate an API key's requests may not exceed (`apikeys::Rate` as text, `100/s`;
    // NULL: none).
    "ALTER TABLE api_keys ADD COLUMN rate TEXT;",
];

/// Errors of the agent's store.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        source: io::Error,
    },
    /// SQLite failed.
    #[error("agent database {path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        source: rusqlite::Error,
    },
    /// No agent was initialised in this directory.
    #[error("{0} is not an initialised agent data directory (run `falaj-agent init` first)")]
    NotInitialised(PathBuf),
    /// `init` on a directory that already holds an agent.
    #[error("{0} already holds an initialised agent")]
    AlreadyInitialised(PathBuf),
    /// The database was written by a newer agent.
    #[error(
        "agent database {path} has schema version {found}; this agent supports up to {supported}"
    )]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: u32,
        /// The newest this build knows.
        supported: u32,
    },
    /// The trust root is refused.
    #[error("trust root: {0}")]
    Trust(#[from] TrustError),
    /// The region given to `init` is not a valid name, or differs from the trust root's.
    #[error("{0}")]
    Region(String),
    /// The device key is missing, malformed, or not the one the bundles are sealed under.
    #[error("device key: {0}")]
    DeviceKey(String),
    /// The device key file can be read by others than its owner.
    #[error(
        "device key file {path} has mode {mode:04o}; it must be readable by its owner only (chmod 600)"
    )]
    KeyFileMode {
        /// The key file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// What the store's rules refuse (a second model of the same derived name, say).
    #[error("{0}")]
    Refused(String),
    /// An installed bundle file no longer matches what was verified at import.
    #[error("installed bundle {name}@{version} ({path}) is damaged: {problem}")]
    Damaged {
        name: String,
        version: u64,
        /// Its file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One installed bundle.
#[derive(Debug, Clone)]
pub struct Installed {
    /// The verified manifest.
    pub manifest: Manifest,
    /// SHA-256 of the manifest bytes (the bundle's identity).
    pub manifest_sha256: Sha256,
    /// The bundle file.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
    /// When it was installed.
    pub installed_at: Timestamp,
    /// Whether it is the active version of its name.
    pub active: bool,
    /// Whether the control plane manages it (installed from desired state).
    pub managed: bool,
}

/// One installed version of a name, as the version rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstalledVersion {
    pub version: u64,
    /// SHA-256 of its manifest bytes.
    pub manifest_sha256: Sha256,
    /// What it carries.
    pub kind: BundleKind,
}

/// How an install treats the new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstallMode {
    /// Make it the active version of its name.
    pub activate: bool,
    /// The control plane manages it (it may remove it); otherwise an operator imported it.
    pub managed: bool,
}

/// The agent's store, opened on a data directory.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    db_path: PathBuf,
    conn: Connection,
    region: String,
    device: std::sync::Arc<falaj_common::at_rest::DeviceKey>,
    key_source: KeySource,
}

fn io_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> StoreError + 'p {
    move |source| StoreError::Io { op, path: path.to_owned(), source }
}

/// Creates `dir` (and parents) with mode 0700 if it does not exist.
fn create_private_dir(dir: &Path) -> Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io_err("creating directory", dir))
}

/// Makes a rename or file creation inside `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err("syncing directory", dir))
}

impl Store {
    /// Initialises an agent in `dir` for `region`, pinning the trust root in `trust_json`.
    pub fn init(dir: &Path, region: &str, trust_json: &[u8], now: SystemTime) -> Result<Self> {
        names::check_region(region).map_err(|e| StoreError::Region(e.to_string()))?;
        let trust = TrustRoot::from_json(trust_json, now)?;
        if trust.region() != region {
            return Err(StoreError::Region(format!(
                "the trust root is for region {:?}, not {region:?}",
                trust.region()
            )));
        }
        create_private_dir(dir)?;
        at_rest::load_device_key(dir, true)?;
        let db_path = dir.join(DB_FILE);
        // A database without a region is what an init interrupted before its commit
        // leaves: it is made again, not refused.
        let mut conn = open_db(&db_path)?;
        let db = |source| StoreError::Db { path: db_path.clone(), source };
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
        let made: Option<String> = tx
            .query_row("SELECT value FROM settings WHERE key = 'region'", [], |r| r.get(0))
            .optional()
            .map_err(db)?;
        if made.is_some() {
            return Err(StoreError::AlreadyInitialised(dir.to_owned()));
        }
        let at = Timestamp::from_system(now).unix() as i64;
        tx.execute("INSERT INTO settings (key, value) VALUES ('region', ?1)", [region])
            .map_err(db)?;
        tx.execute(
            "INSERT INTO trust_roots (version, document, installed_at) VALUES (?1, ?2, ?3)",
            params![trust.version() as i64, trust.to_json(), at],
        )
        .map_err(db)?;
        let detail = format!("region {region}, trust root version {}", trust.version());
        audit::event(&tx, at, "init", None, &detail).map_err(db)?;
        tx.commit().map_err(db)?;
        Self::open(dir)
    }

    /// Opens the agent in `dir`, applying pending migrations and sweeping files that an
    /// interrupted import left behind.
    pub fn open(dir: &Path) -> Result<Self> {
        let db_path = dir.join(DB_FILE);
        if !db_path.is_file() {
            return Err(StoreError::NotInitialised(dir.to_owned()));
        }
        let conn = open_db(&db_path)?;
        let region: Option<String> = conn
            .query_row("SELECT value FROM settings WHERE key = 'region'", [], |r| r.get(0))
            .optional()
            .map_err(|source| StoreError::Db { path: db_path.clone(), source })?;
        let region = region.ok_or_else(|| StoreError::NotInitialised(dir.to_owned()))?;
        let sealed = Self::any_sealed(&conn)
            .map_err(|source| StoreError::Db { path: db_path.clone(), source })?;
        let (device, key_source) = at_rest::load_device_key(dir, !sealed)?;
        let device = std::sync::Arc::new(device);
        let mut store = Self { dir: dir.to_owned(), db_path, conn, region, device, key_source };
        store.sweep()?;
        store.check_device_key()?;
        store.seal_plaintext(SystemTime::now())?;
        Ok(store)
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        |source| StoreError::Db { path: self.db_path.clone(), source }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The agent's region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Where imports stage their files.
    pub fn staging_dir(&self) -> PathBuf {
        self.dir.join("staging")
    }

    /// Where a bundle is installed (relative to the data directory).
    pub fn bundle_path(name: &str, version: u64) -> PathBuf {
        Path::new("bundles").join(name).join(format!("{version}.sealed"))
    }

    /// The pinned trust root (newest version). Its expiry is not checked here.
    pub fn trust_root(&self) -> Result<TrustRoot> {
        let doc: Vec<u8> = self
            .conn
            .query_row("SELECT document FROM trust_roots ORDER BY version DESC LIMIT 1", [], |r| {
                r.get(0)
            })
            .map_err(self.db())?;
        Ok(TrustRoot::from_json_unexpired(&doc)?)
    }

    /// A number that changes whenever another connection commits to the database, so a
    /// server can notice imports made by another process.
    pub fn data_version(&self) -> Result<u64> {
        self.conn
            .pragma_query_value(None, "data_version", |r| r.get::<_, i64>(0))
            .map(|v| v as u64)
            .map_err(self.db())
    }

    /// Every installed bundle, by name then version.
    pub fn installed(&self) -> Result<Vec<Installed>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT b.name, b.version, b.manifest, b.manifest_sha256, b.path, b.size, b.installed_at,
                        a.version IS NOT NULL, b.managed
                 FROM bundles b LEFT JOIN active a ON a.name = b.name AND a.version = b.version
                 ORDER BY b.name, b.version",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, bool>(7)?,
                    r.get::<_, bool>(8)?,
                ))
            })
            .map_err(self.db())?;
        let mut out = Vec::new();
        for row in rows {
            let (name, version, manifest, sha, path, size, at, active, managed) =
                row.map_err(self.db())?;
            let damaged = |problem: String| StoreError::Damaged {
                name: name.clone(),
                version: version as u64,
                path: self.dir.join(&path),
                problem,
            };
            let manifest: Manifest = serde_json::from_slice(&manifest)
                .map_err(|e| damaged(format!("stored manifest does not parse: {e}")))?;
            let manifest_sha256 =
                sha.parse().map_err(|e| damaged(format!("stored manifest hash: {e}")))?;
            out.push(Installed {
                manifest,
                manifest_sha256,
                path: self.dir.join(path),
                size: size as u64,
                installed_at: Timestamp::from_unix(at as u64),
                active,
                managed,
            });
        }
        Ok(out)
    }

    /// The installed versions of `name`, with their manifest hashes and kinds.
    pub fn versions(&self, name: &str) -> Result<Vec<InstalledVersion>> {
        versions_of(&self.conn, &self.db_path, name)
    }

    /// Installs a verified, sealed, fsynced staged file as `manifest`'s bundle and, if `mode`
    /// says so, makes it the active version, in one transaction. `check` sees the installed versions of the name
    /// inside the transaction (under the write lock, so two concurrent imports cannot both
    /// pass it) and refuses with an error or skips with `Ok(false)`. Returns whether the
    /// bundle was installed.
    pub fn install<E: From<StoreError>>(
        &mut self,
        staged: Sealed,
        manifest: &Manifest,
        manifest_bytes: &[u8],
        mode: InstallMode,
        now: SystemTime,
        check: impl FnOnce(&[InstalledVersion]) -> Result<bool, E>,
    ) -> Result<bool, E> {
        self.install_with(staged, manifest, manifest_bytes, mode, now, check, |_, _| Ok(()))
    }

    /// [`Self::install`], with `also` run inside the same transaction after the bundle's
    /// rows are written (given the transaction and the install time).
    #[allow(clippy::too_many_arguments)]
    fn install_with<E: From<StoreError>>(
        &mut self,
        staged: Sealed,
        manifest: &Manifest,
        manifest_bytes: &[u8],
        mode: InstallMode,
        now: SystemTime,
        check: impl FnOnce(&[InstalledVersion]) -> Result<bool, E>,
        also: impl FnOnce(&Connection, i64) -> rusqlite::Result<()>,
    ) -> Result<bool, E> {
        let relative = Self::bundle_path(&manifest.name, manifest.version);
        let target = self.dir.join(&relative);
        let parent = target.parent().expect("bundle paths have a parent").to_owned();
        create_private_dir(&parent)?;
        let size = staged.size;
        let identity = at_rest::identity(
            &manifest.name,
            manifest.version,
            &Sha256::of(manifest_bytes).to_string(),
        );
        if staged.identity != identity {
            return Err(StoreError::Refused(format!(
                "the staged file was sealed for another bundle than {}@{}",
                manifest.name, manifest.version
            ))
            .into());
        }
        let wrapped = self.wrap(&staged)?;
        let key_id = self.device.id().to_string();
        let at = Timestamp::from_system(now).unix() as i64;
        let db_path = self.db_path.clone();
        let db = |source| StoreError::Db { path: db_path.clone(), source };

        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db)?;
        let existing = versions_of(&tx, &self.db_path, &manifest.name)?;
        if !check(&existing)? {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO bundles (name, version, kind, manifest, manifest_sha256, path, size, installed_at, managed, data_key, key_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                manifest.name,
                manifest.version as i64,
                manifest.content.kind().to_string(),
                manifest_bytes,
                Sha256::of(manifest_bytes).to_string(),
                relative.to_string_lossy(),
                size as i64,
                at,
                mode.managed,
                wrapped,
                key_id
            ],
        )
        .map_err(db)?;
        if mode.activate {
            managed::set_active(&tx, &manifest.name, manifest.version, at).map_err(db)?;
        }
        also(&tx, at).map_err(db)?;
        let detail = format!("{size} bytes{}", if mode.activate { ", activated" } else { "" });
        audit::event(&tx, at, "install", Some((&manifest.name, manifest.version)), &detail)
            .map_err(db)?;
        // The file goes in place before the commit: if the commit fails, the row does not
        // exist and the next open sweeps the file; a row never points at a missing file.
        staged.file.persist(&target).map_err(|e| StoreError::Io {
            op: "installing bundle at",
            path: target.clone(),
            source: e.error,
        })?;
        sync_dir(&parent)?;
        crate::crash_point("install-file-in-place");
        tx.commit().map_err(db)?;
        Ok(true)
    }

    /// Reads an installed bundle, opens it (a segment that fails authentication makes it
    /// [`StoreError::Damaged`]) and checks it still matches what was verified at import:
    /// the manifest bytes hash to the recorded value and every payload file to its hash.
    /// Returns the bytes of the file its content names (the model, or the snapshot), a
    /// view into the bundle read once.
    pub fn read_content(&self, installed: &Installed) -> Result<bytes::Bytes> {
        let m = &installed.manifest;
        let damaged = |problem: String| StoreError::Damaged {
            name: m.name.clone(),
            version: m.version,
            path: installed.path.clone(),
            problem,
        };
        let bytes = bytes::Bytes::from(self.read_bundle_file(
            &m.name,
            m.version,
            &installed.path,
            damaged,
        )?);
        Self::content_of(installed, &bytes)
    }

    /// An installed bundle as it was verified (the sealed file opened), without the checks
    /// of [`Self::read_content`].
    pub fn open_bundle(&self, installed: &Installed) -> Result<Vec<u8>> {
        let m = &installed.manifest;
        self.read_bundle_file(&m.name, m.version, &installed.path, |problem| StoreError::Damaged {
            name: m.name.clone(),
            version: m.version,
            path: installed.path.clone(),
            problem,
        })
    }

    /// The checks of [`Self::read_content`] on a bundle's plaintext already in memory (the
    /// at-rest benchmark times them on a plaintext file, as its anchor).
    pub fn content_of(installed: &Installed, bytes: &bytes::Bytes) -> Result<bytes::Bytes> {
        let m = &installed.manifest;
        let damaged = |problem: String| StoreError::Damaged {
            name: m.name.clone(),
            version: m.version,
            path: installed.path.clone(),
            problem,
        };
        let header = Header::parse(bytes).map_err(|e| damaged(e.to_string()))?;
        let manifest_end = bundle::HEADER_LEN + header.manifest_len as usize;
        let manifest_bytes = bytes
            .get(bundle::HEADER_LEN..manifest_end)
            .ok_or_else(|| damaged("truncated manifest".into()))?;
        if Sha256::of(manifest_bytes) != installed.manifest_sha256 {
            return Err(damaged("manifest differs from the one verified at import".into()));
        }
        let payload = bytes
            .get(header.payload_offset() as usize..)
            .ok_or_else(|| damaged("truncated before the payload".into()))?;
        let mut check = PayloadCheck::new(m);
        check
            .update(payload)
            .and_then(|()| check.finish())
            .map_err(|e: VerifyError| damaged(e.to_string()))?;
        let wanted = m.content.file();
        let mut at = header.payload_offset() as usize;
        for file in &m.files {
            let end = at + file.size as usize;
            if file.name == wanted {
                return Ok(bytes.slice(at..end));
            }
            at = end;
        }
        Err(damaged(format!("{} file {wanted:?} missing", m.content.kind())))
    }

    /// Removes staged files and bundle files that no row refers to: leftovers of imports
    /// interrupted by a crash. Bundle files are listed and removed under the store's write
    /// lock, which an install holds from putting its file in place to committing its row:
    /// a file found without a row then is a leftover, however long its import took.
    fn sweep(&mut self) -> Result<()> {
        let staging = self.staging_dir();
        if staging.is_dir() {
            for entry in fs::read_dir(&staging).map_err(io_err("listing", &staging))? {
                let path = entry.map_err(io_err("listing", &staging))?.path();
                // Another process may be importing right now; only old files are leftovers.
                if is_older_than(&path, Duration::from_secs(24 * 3600)) {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let dir = self.dir.clone();
        self.write_tx(|tx| {
            let known: std::collections::BTreeSet<PathBuf> = {
                let mut stmt = tx.prepare("SELECT path FROM bundles")?;
                let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
                rows.map(|r| r.map(|p| dir.join(p))).collect::<Result<_, _>>()?
            };
            let Ok(names) = fs::read_dir(dir.join("bundles")) else { return Ok(()) };
            for name in names.flatten() {
                let Ok(files) = fs::read_dir(name.path()) else { continue };
                for path in files.flatten().map(|f| f.path()) {
                    if !known.contains(&path) {
                        tracing::warn!(path = %path.display(), "removing bundle file left by an interrupted import");
                        let _ = fs::remove_file(&path);
                    }
                }
            }
            Ok(())
        })
    }

    /// Records an event in the agent's log.
    pub fn record_event(&self, now: SystemTime, kind: &str, detail: &str) -> Result<()> {
        let tx = self.conn.unchecked_transaction().map_err(self.db())?;
        let at = Timestamp::from_system(now).unix() as i64;
        audit::event(&tx, at, kind, None, detail).map_err(self.db())?;
        tx.commit().map_err(self.db())
    }
}

fn versions_of(conn: &Connection, db_path: &Path, name: &str) -> Result<Vec<InstalledVersion>> {
    let db = |source| StoreError::Db { path: db_path.to_owned(), source };
    let mut stmt = conn
        .prepare(
            "SELECT version, manifest_sha256, kind FROM bundles WHERE name = ?1 ORDER BY version",
        )
        .map_err(db)?;
    let rows = stmt
        .query_map([name], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?))
        })
        .map_err(db)?;
    let mut out = Vec::new();
    for row in rows {
        let (version, sha, kind) = row.map_err(db)?;
        let damaged = |problem: String| StoreError::Damaged {
            name: name.to_owned(),
            version: version as u64,
            path: db_path.to_owned(),
            problem,
        };
        let manifest_sha256 =
            sha.parse().map_err(|e| damaged(format!("stored manifest hash: {e}")))?;
        let kind = match kind.as_str() {
            "model" => BundleKind::Model,
            "features" => BundleKind::Features,
            other => return Err(damaged(format!("stored bundle kind {other:?} is unknown"))),
        };
        out.push(InstalledVersion { version: version as u64, manifest_sha256, kind });
    }
    Ok(out)
}

fn is_older_than(path: &Path, age: Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|elapsed| elapsed > age)
}

/// Opens the agent's database at `path` ([`falaj_shell::sqlite::open`] with the store's
/// migrations).
pub(crate) fn open_db(path: &Path) -> Result<Connection> {
    // The database holds the trust root and the bundles' manifests: owner only.
    falaj_shell::sqlite::open(path, MIGRATIONS).map_err(|e| match e {
        OpenError::Sqlite { path, source } => StoreError::Db { path, source },
        OpenError::Permissions { path, source } => {
            io_err("restricting permissions of", &path)(source)
        }
        OpenError::TooNew { path, found, supported } => {
            StoreError::SchemaTooNew { path, found, supported }
        }
    })
}

/// Reads exactly `len` bytes of `reader`; used to read a bundle's sections.
pub(crate) fn read_exact_vec(reader: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    reader.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh store in a temporary directory.
    pub(crate) fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let key = falaj_common::keys::SigningKey::from_seed(&[1; 32]);
        let trust = falaj_common::trust::RootSpec {
            version: 1,
            region: "r",
            expires: Timestamp::from_unix(4_000_000_000),
            root_keys: &[key],
            root_threshold: 1,
            signing_keys: &[falaj_common::keys::SigningKey::from_seed(&[2; 32]).public()],
            signing_threshold: 1,
        }
        .sign(&[])
        .unwrap();
        let store =
            Store::init(&dir.path().join("a"), "r", &trust.to_json(), SystemTime::now()).unwrap();
        (dir, store)
    }

    #[test]
    fn the_sweep_waits_for_an_install_in_progress_however_old_its_file() {
        let (_dir, mut store) = store();
        // Another process installs: its file, staged long ago, is in place; its row is
        // written but not committed yet.
        let mut other = open_db(&store.db_path).unwrap();
        let tx = other.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
        let relative = Store::bundle_path("slow", 1);
        tx.execute(
            "INSERT INTO bundles (name, version, kind, manifest, manifest_sha256, path, size, installed_at, managed)
             VALUES ('slow', 1, 'model', x'00', '', ?1, 1, 0, 0)",
            [relative.to_string_lossy()],
        )
        .unwrap();
        let file = store.dir().join(&relative);
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        let staged = File::create(&file).unwrap();
        staged.set_modified(SystemTime::now() - Duration::from_secs(3600)).unwrap();
        let leftover = store.dir().join(Store::bundle_path("slow", 9));
        File::create(&leftover).unwrap();

        let (done_tx, done) = std::sync::mpsc::channel();
        let sweeper = std::thread::spawn(move || {
            let swept = store.sweep();
            done_tx.send(()).unwrap();
            swept
        });
        // The sweep cannot finish while the install holds the write lock.
        let finished_early = done.recv_timeout(Duration::from_millis(300)).is_ok();
        tx.commit().unwrap();
        sweeper.join().unwrap().unwrap();
        assert!(!finished_early, "the sweep ran during an install");
        assert!(file.exists(), "the installed bundle's file was kept");
        assert!(!leftover.exists(), "a file no row names was swept");
    }
}
