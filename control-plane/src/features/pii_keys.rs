//! The region's pseudonymisation keys by version, and their rotation
//! (`falaj-control features rotate-pii-key`).
//!
//! Each version is 32 random bytes in the keys directory (sealed when it is):
//! `pii-REGION.key` for version 1 (its name from before keys had versions), then
//! `pii-REGION.vN.key`. `features.db` records when each was made and, once a newer one
//! took over, until when it stays in overlap: snapshots built in that time carry each
//! pseudonym under both versions ([`Keyring`]). After the overlap a version is no longer
//! used; destroying its file makes its pseudonyms unlinkable to anything new.

use std::path::PathBuf;
use std::time::Duration;

use falaj_common::features::Keyring;
use falaj_common::time::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::OpenError;
use crate::db::{Db, from_ts, ts};
use crate::secrets::random;
use crate::vault::{Vault, VaultError};

/// One version of the key, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyVersion {
    /// The version, from 1.
    pub version: u32,
    /// When it was made.
    pub created: Timestamp,
    /// Until when snapshots still carry pseudonyms under it, once a newer one is current;
    /// `None` while it is current.
    pub overlap_until: Option<Timestamp>,
}

/// The loaded versions still in use: the current one and those in overlap.
struct Loaded {
    version: KeyVersion,
    secret: Zeroizing<Vec<u8>>,
}

/// The region's PII keys, loaded.
pub struct PiiKeys {
    region: String,
    versions: Vec<Loaded>,
}

impl std::fmt::Debug for PiiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let versions: Vec<u32> = self.versions.iter().map(|v| v.version.version).collect();
        write!(f, "PiiKeys({}, versions {versions:?})", self.region)
    }
}

/// The file of version `version` in the keys directory.
pub fn file_name(region: &str, version: u32) -> String {
    if version == 1 { format!("pii-{region}.key") } else { format!("pii-{region}.v{version}.key") }
}

fn versions(conn: &Connection) -> rusqlite::Result<Vec<KeyVersion>> {
    let mut statement =
        conn.prepare("SELECT version, created, overlap_until FROM pii_keys ORDER BY version DESC")?;
    let rows = statement.query_map([], |row| {
        Ok(KeyVersion {
            version: row.get(0)?,
            created: from_ts(row.get(1)?),
            overlap_until: row.get::<_, Option<i64>>(2)?.map(from_ts),
        })
    })?;
    rows.collect()
}

fn read_secret(keys: &Vault, name: &str) -> Result<Option<Zeroizing<Vec<u8>>>, OpenError> {
    let path = keys.dir().join(name);
    let text = match keys.read(name) {
        Ok(text) => text,
        Err(VaultError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let bytes = Zeroizing::new(hex::decode(text.trim_ascii()).map_err(|e| OpenError::Key {
        path: path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?);
    if bytes.len() < 32 {
        return Err(OpenError::Key {
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the key must be at least 32 bytes (64 hex digits)",
            ),
        });
    }
    Ok(Some(bytes))
}

fn missing(keys: &Vault, name: &str) -> OpenError {
    OpenError::Key {
        path: keys.dir().join(name),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "features.db records this PII key version but its file is gone",
        ),
    }
}

impl PiiKeys {
    /// Loads the versions in use at `now`; on the first open, makes version 1 (or adopts
    /// the key file made before keys had versions).
    pub fn open(db: &Db, keys: &Vault, region: &str, now: Timestamp) -> Result<Self, OpenError> {
        let mut recorded = db.call_sync(|c| versions(c))?;
        if recorded.is_empty() {
            let name = file_name(region, 1);
            if read_secret(keys, &name)?.is_none() {
                keys.write(&name, hex::encode(random::<32>()).as_bytes())?;
            }
            db.call_sync(|c| {
                c.execute(
                    "INSERT INTO pii_keys (version, created, overlap_until) VALUES (1, ?1, NULL)",
                    [ts(now)],
                )?;
                versions(c)
            })
            .map(|v| recorded = v)?;
        }
        let mut loaded = Vec::new();
        for (i, version) in recorded.into_iter().enumerate() {
            let in_use = i == 0 || version.overlap_until.is_some_and(|until| until > now);
            if !in_use {
                continue;
            }
            let name = file_name(region, version.version);
            let secret = read_secret(keys, &name)?.ok_or_else(|| missing(keys, &name))?;
            loaded.push(Loaded { version, secret });
        }
        Ok(Self { region: region.to_owned(), versions: loaded })
    }

    /// The keys to pseudonymise with at `now`: the current version and those whose
    /// overlap has not ended.
    pub fn keyring(&self, now: Timestamp) -> Keyring {
        let mut versions = self.versions.iter();
        let current = versions.next().expect("open loads the current version");
        versions
            .filter(|v| v.version.overlap_until.is_some_and(|until| until > now))
            .fold(Keyring::new(current.version.version, &current.secret), |ring, v| {
                ring.with_overlapping(v.version.version, &v.secret)
            })
    }

    /// The current version.
    pub fn current(&self) -> u32 {
        self.versions.first().map_or(1, |v| v.version.version)
    }
}

/// What a rotation did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rotated {
    /// The new current version.
    pub version: u32,
    /// Its file.
    pub file: PathBuf,
    /// The version it replaces, and until when that one's pseudonyms are still carried.
    pub previous: u32,
    /// End of the previous version's overlap.
    pub overlap_until: Timestamp,
}

/// Makes version n+1 current; version n stays in overlap for `overlap`. The key file is
/// written (atomically, sealed when the directory is) before the record that makes it
/// current, so a rotation cut short leaves the previous version in force.
pub fn rotate(
    db: &Db,
    keys: &Vault,
    region: &str,
    overlap: Duration,
    now: Timestamp,
) -> Result<(Rotated, PiiKeys), OpenError> {
    let previous = db
        .call_sync(|c| {
            c.query_row("SELECT MAX(version) FROM pii_keys", [], |r| r.get::<_, Option<u32>>(0))
                .optional()
        })?
        .flatten()
        .unwrap_or(1);
    let version = previous + 1;
    let name = file_name(region, version);
    let file = keys.write(&name, hex::encode(random::<32>()).as_bytes())?;
    let overlap_until = now.saturating_add(overlap);
    db.call_sync(|c| {
        let tx = c.transaction()?;
        tx.execute(
            "UPDATE pii_keys SET overlap_until = ?1 WHERE version = ?2",
            params![ts(overlap_until), previous],
        )?;
        tx.execute(
            "INSERT INTO pii_keys (version, created, overlap_until) VALUES (?1, ?2, NULL)",
            params![version, ts(now)],
        )?;
        tx.commit()
    })?;
    let loaded = PiiKeys::open(db, keys, region, now)?;
    Ok((Rotated { version, file, previous, overlap_until }, loaded))
}

/// Every version recorded, newest first.
pub fn list(conn: &Connection) -> rusqlite::Result<Vec<KeyVersion>> {
    versions(conn)
}
