//! The feature store on the control plane: feature views and their history, the offline
//! store (SQLite's `features.db`, or tables in the control plane's PostgreSQL database),
//! validated ingest, snapshots for agents, point-in-time training exports, and the admin
//! API routes that drive them.

pub mod api;
pub mod batch;
pub mod cli;
pub mod export;
pub mod ingest;
pub mod pii_keys;
pub mod snapshot;
pub mod store;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use falaj_common::features::Keyring;
use falaj_common::time::Timestamp;

use crate::db::{Db, DbError};
use crate::vault::{Vault, VaultError};
use pii_keys::PiiKeys;

/// The offline store and the region's keys for pseudonymising personal data.
#[derive(Debug, Clone)]
pub struct FeatureStore {
    /// `features.db`, or the control plane's PostgreSQL database.
    pub db: Db,
    pii: Arc<ArcSwap<PiiKeys>>,
    keys: Arc<Vault>,
    region: Arc<str>,
    /// Held while a snapshot is built and registered: its version is the next free one,
    /// and its record (what was pseudonymised) must describe the bundle of that version.
    /// Across replicas on one PostgreSQL database, [`snapshot::VersionLock`] does the same.
    building: Arc<tokio::sync::Mutex<()>>,
}

/// Why the feature store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Db(#[from] DbError),
    /// The feature schema on PostgreSQL could not be brought up to date.
    #[error(transparent)]
    Migrate(#[from] store::MigrateError),
    /// The key file.
    #[error("PII key {path}: {source}")]
    Key { path: std::path::PathBuf, source: std::io::Error },
    /// The region's database records a key version in use whose file this replica lacks.
    #[error(
        "PII key {path} is missing: the region's database records version {version} in use; \
         copy the region's pii-*.key files into this replica's keys directory (INSTALL.md)"
    )]
    KeyMissing { path: std::path::PathBuf, version: u32 },
    /// A key file differs from the one the region recorded for its version: this replica
    /// would pseudonymise with a key other than the region's.
    #[error(
        "PII key {path} is not the region's version {version}: its fingerprint is {found}, \
         the region's database records {recorded}; copy the region's pii-*.key files into \
         this replica's keys directory (INSTALL.md) rather than pseudonymise with another key"
    )]
    KeyMismatch { path: std::path::PathBuf, version: u32, recorded: String, found: String },
    /// The key file is sealed and could not be opened.
    #[error(transparent)]
    Vault(#[from] VaultError),
}

/// The admin API's staging directory (under the data directory), where uploads wait.
const STAGING: &str = "staging";
/// The prefix of an uploaded ingest file in [`STAGING`].
pub(crate) const STAGED_INGEST: &str = "ingest-";

/// Removes uploaded ingest files a stopped process left in `staging`: an ingest killed
/// before its answer wrote nothing or committed everything, and its client sends the file
/// again. Only at open, before the admin API serves, so no live upload is taken.
fn sweep_staged_ingests(staging: &Path) {
    let Ok(entries) = std::fs::read_dir(staging) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(STAGED_INGEST) {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(file = %entry.path().display(), "removed an ingest upload left by the last stop");
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "removing an ingest upload left by the last stop");
                }
            }
        }
    }
}

impl FeatureStore {
    /// Opens `DATA/features.db` and the region's PII keys (`pii_keys`: 32 random bytes
    /// each, made on first use, mode 0600, sealed when the keys directory is; they never
    /// leave the control plane), and removes ingest uploads the last run left staged.
    pub fn open(data_dir: &Path, keys: Arc<Vault>, region: &str) -> Result<Self, OpenError> {
        let db = Db::open_with(&data_dir.join(store::FEATURES_DB_FILE), store::MIGRATIONS)?;
        Self::open_on(db, data_dir, keys, region)
    }

    /// The feature store in the control plane's PostgreSQL database `db` (its tables
    /// beside the control plane's, with their own schema history, brought up to date
    /// here); the PII keys and staged uploads as [`FeatureStore::open`]. Blocks: call it
    /// before the runtime starts or on the blocking pool.
    pub fn open_postgres(
        db: Db,
        data_dir: &Path,
        keys: Arc<Vault>,
        region: &str,
    ) -> Result<Self, OpenError> {
        store::migrate_postgres(&db)?;
        Self::open_on(db, data_dir, keys, region)
    }

    fn open_on(db: Db, data_dir: &Path, keys: Arc<Vault>, region: &str) -> Result<Self, OpenError> {
        let now = Timestamp::from_system(std::time::SystemTime::now());
        let pii = PiiKeys::open(&db, &keys, region, now)?;
        sweep_staged_ingests(&data_dir.join(STAGING));
        Ok(Self {
            db,
            pii: Arc::new(ArcSwap::from_pointee(pii)),
            keys,
            region: region.into(),
            building: Arc::default(),
        })
    }

    /// The keys to pseudonymise with at `now`: the current version and those in overlap,
    /// as the region's database records them. When another replica rotated the key since
    /// they were loaded, or an overlap ended, they are opened again first, which refuses a
    /// key file this replica lacks or holds different from the region's. Call it under
    /// [`FeatureStore::building`], as rotations here are.
    pub async fn keyring(&self, now: Timestamp) -> Result<Keyring, OpenError> {
        let (db, keys, region, loaded) = (
            self.db.clone(),
            Arc::clone(&self.keys),
            Arc::clone(&self.region),
            self.pii.load_full(),
        );
        let fresh = tokio::task::spawn_blocking(move || {
            if loaded.is_current(&db, now)? {
                return Ok(None);
            }
            PiiKeys::open(&db, &keys, &region, now).map(Some)
        })
        .await
        .map_err(|e| OpenError::Key {
            path: self.keys.dir().to_owned(),
            source: std::io::Error::other(e),
        })??;
        if let Some(fresh) = fresh {
            self.pii.store(Arc::new(fresh));
        }
        Ok(self.pii.load().keyring(now))
    }

    /// Makes a new version of the PII key current; the previous one stays in overlap for
    /// `overlap`. Waits for a snapshot being built, so each is made with one keyring.
    pub async fn rotate_pii_key(
        &self,
        overlap: Duration,
        now: Timestamp,
    ) -> Result<pii_keys::Rotated, OpenError> {
        let _building = self.building().await;
        let (db, keys, region) =
            (self.db.clone(), Arc::clone(&self.keys), Arc::clone(&self.region));
        let (rotated, loaded) = tokio::task::spawn_blocking(move || {
            pii_keys::rotate(&db, &keys, &region, overlap, now)
        })
        .await
        .map_err(|e| OpenError::Key {
            path: self.keys.dir().to_owned(),
            source: std::io::Error::other(e),
        })??;
        self.pii.store(Arc::new(loaded));
        Ok(rotated)
    }

    /// Waits for the right to build a snapshot; one is built at a time.
    pub async fn building(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.building.lock().await
    }
}
