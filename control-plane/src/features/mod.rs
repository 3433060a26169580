//! The feature store on the control plane: feature views and their history, the offline
//! store in SQLite (`features.db`), validated ingest, snapshots for agents, point-in-time
//! training exports, and the admin API routes that drive them.

pub mod api;
pub mod cli;
pub mod export;
pub mod ingest;
pub mod snapshot;
pub mod store;

use std::path::Path;

use ring::rand::{SecureRandom, SystemRandom};

use crate::db::{Db, DbError};
use crate::vault::{Vault, VaultError};

/// The offline store and the region's key for pseudonymising personal data.
#[derive(Debug, Clone)]
pub struct FeatureStore {
    /// `features.db`.
    pub db: Db,
    pii_key: std::sync::Arc<Vec<u8>>,
    /// Held while a snapshot is built and registered: its version is the next free one,
    /// and its record (what was pseudonymised) must describe the bundle of that version.
    building: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// Why the feature store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The database.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The key file.
    #[error("PII key {path}: {source}")]
    Key {
        /// The file.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
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
    /// Opens `DATA/features.db` and the region's PII key `keys/pii-REGION.key` (32 random
    /// bytes, made on first use, mode 0600, sealed when the keys directory is; it never
    /// leaves the control plane), and removes ingest uploads the last run left staged.
    pub fn open(data_dir: &Path, keys: &Vault, region: &str) -> Result<Self, OpenError> {
        let db = Db::open_with(&data_dir.join(store::FEATURES_DB_FILE), store::MIGRATIONS)?;
        let name = format!("pii-{region}.key");
        let path = keys.dir().join(&name);
        let key_err = |source| OpenError::Key { path: path.clone(), source };
        let key = match keys.read(&name) {
            Ok(text) => hex::decode(text.trim_ascii())
                .map_err(|e| key_err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?,
            Err(VaultError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let mut key = vec![0u8; 32];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| key_err(std::io::Error::other("no system randomness")))?;
                keys.write(&name, hex::encode(&key).as_bytes())?;
                key
            }
            Err(e) => return Err(e.into()),
        };
        sweep_staged_ingests(&data_dir.join(STAGING));
        if key.len() < 32 {
            return Err(key_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the key must be at least 32 bytes (64 hex digits)",
            )));
        }
        Ok(Self { db, pii_key: std::sync::Arc::new(key), building: std::sync::Arc::default() })
    }

    /// The region's pseudonymisation key.
    pub fn pii_key(&self) -> &[u8] {
        &self.pii_key
    }

    /// Waits for the right to build a snapshot; one is built at a time.
    pub async fn building(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.building.lock().await
    }
}
