//! The region's pseudonymisation keys by version, and their rotation
//! (`falaj-control features rotate-pii-key`).
//!
//! Each version is 32 random bytes in the keys directory (sealed when it is):
//! `pii-REGION.key` for version 1 (its name from before keys had versions), then
//! `pii-REGION.vN.key`. `features.db` records when each was made and, once a newer one
//! took over, until when it stays in overlap: snapshots built in that time carry each
//! pseudonym under both versions ([`Keyring`]). After the overlap a version is no longer
//! used; destroying its file makes its pseudonyms unlinkable to anything new.
//!
//! Making a version (the first, or by rotation) is one transaction that holds the key
//! versions' lock (SQLite's write lock, or an advisory lock on PostgreSQL) from reading
//! the newest version to recording the next, with its file written in between: two
//! rotations at once, from two processes or two replicas, make two versions one after the
//! other, never the same one twice.
//!
//! Every replica of a region must hold the same key files (they are copied like the rest
//! of the keys directory). So each version is recorded with its [`fingerprint`] (an HMAC
//! of a fixed text under the key, which does not reveal the key), by whoever made it, and
//! every open compares each file it loads against the record: a file missing or
//! different is refused ([`OpenError::KeyMissing`], [`OpenError::KeyMismatch`]), so a
//! replica never pseudonymises with keys other than the region's. A version recorded
//! before fingerprints were (feature schema 3) takes the fingerprint of the first file
//! opened for it. [`PiiKeys::is_current`] tells the store when another replica rotated,
//! so that it loads (and checks) the new version before using it.

use std::path::PathBuf;
use std::time::Duration;

use falaj_common::features::Keyring;
use falaj_common::time::Timestamp;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::OpenError;
use crate::db::{Db, from_ts, ts};
use crate::secrets::random;
use crate::sql::{AsSql, Backend, Sql, SqlError, Tx, params};
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

/// A version as recorded, with the fingerprint of its key (`None` if recorded before
/// fingerprints were).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Recorded {
    version: KeyVersion,
    fingerprint: Option<String>,
}

/// The loaded versions still in use: the current one and those in overlap.
struct Loaded {
    version: KeyVersion,
    fingerprint: String,
    secret: Zeroizing<Vec<u8>>,
}

/// The text whose HMAC under a key is its fingerprint.
const FINGERPRINT_TEXT: &[u8] = b"falaj pii key fingerprint v1";

/// A key's fingerprint: the first 16 bytes, in hex, of HMAC-SHA256 under the key of a
/// fixed text. Equal keys give equal fingerprints; the fingerprint tells nothing of the
/// key (nor of the pseudonyms made with it).
pub fn fingerprint(secret: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    hex::encode(&ring::hmac::sign(&key, FINGERPRINT_TEXT).as_ref()[..16])
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

fn recorded<C: AsSql + ?Sized>(conn: &C) -> Result<Vec<Recorded>, C::Error> {
    Ok(conn.sql().query_map(
        "SELECT version, created, overlap_until, fingerprint FROM pii_keys ORDER BY version DESC",
        params![],
        |row| {
            Ok(Recorded {
                version: KeyVersion {
                    version: u32::try_from(row.get::<i64>(0)?)
                        .map_err(|e| SqlError::Conversion { column: 0, message: e.to_string() })?,
                    created: from_ts(row.get(1)?),
                    overlap_until: row.get::<Option<i64>>(2)?.map(from_ts),
                },
                fingerprint: row.get(3)?,
            })
        },
    )?)
}

/// The recorded versions in use at `now`: the newest, and older ones still in overlap.
fn in_use(recorded: Vec<Recorded>, now: Timestamp) -> Vec<Recorded> {
    recorded
        .into_iter()
        .enumerate()
        .filter(|(i, r)| *i == 0 || r.version.overlap_until.is_some_and(|until| until > now))
        .map(|(_, r)| r)
        .collect()
}

/// The advisory lock that makes key versions one at a time on PostgreSQL.
const VERSIONS_LOCK: i64 = crate::sql::locks::PII_KEY_VERSIONS;

/// A transaction holding the key versions' lock: SQLite's write lock (`BEGIN IMMEDIATE`),
/// or on PostgreSQL an advisory lock until the end of the transaction.
fn locked<'c>(sql: &Sql<'c>) -> Result<Tx<'c>, SqlError> {
    let tx = sql.transaction_immediate()?;
    if tx.backend() == Backend::Postgres {
        tx.execute("SELECT pg_advisory_xact_lock($1)", params![VERSIONS_LOCK])?;
    }
    Ok(tx)
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

/// Version `version`'s key from its file, checked against the fingerprint recorded.
fn load(keys: &Vault, region: &str, recorded: &Recorded) -> Result<Loaded, OpenError> {
    let version = recorded.version.version;
    let name = file_name(region, version);
    let path = keys.dir().join(&name);
    let secret = read_secret(keys, &name)?
        .ok_or_else(|| OpenError::KeyMissing { path: path.clone(), version })?;
    let found = fingerprint(&secret);
    match &recorded.fingerprint {
        Some(expected) if *expected != found => {
            Err(OpenError::KeyMismatch { path, version, recorded: expected.clone(), found })
        }
        _ => Ok(Loaded { version: recorded.version.clone(), fingerprint: found, secret }),
    }
}

/// Records the fingerprints of `loaded` versions recorded without one (made before
/// fingerprints were); returns the versions as recorded afterwards, so that one recorded
/// meanwhile by another replica is compared like any other.
fn adopt(db: &Db, loaded: &[Loaded]) -> Result<Vec<Recorded>, OpenError> {
    let adopting: Vec<(i64, String)> =
        loaded.iter().map(|l| (i64::from(l.version.version), l.fingerprint.clone())).collect();
    Ok(db.run_sync(move |sql| {
        let tx = sql.transaction()?;
        for (version, fingerprint) in &adopting {
            tx.execute(
                "UPDATE pii_keys SET fingerprint = $1 WHERE version = $2 AND fingerprint IS NULL",
                params![fingerprint.as_str(), *version],
            )?;
        }
        let after = recorded(&tx)?;
        tx.commit()?;
        Ok(after)
    })?)
}

impl PiiKeys {
    /// Loads the versions in use at `now`, each file checked against the fingerprint the
    /// region recorded for it; on the first open, makes version 1 (or adopts the key file
    /// made before keys had versions).
    pub fn open(db: &Db, keys: &Vault, region: &str, now: Timestamp) -> Result<Self, OpenError> {
        let mut found = db.run_sync(|sql| recorded(&sql))?;
        if found.is_empty() {
            // Under the lock, so that two first opens make one version 1 with one file.
            found = db.run_sync(|sql| {
                let tx = locked(&sql)?;
                let found = recorded(&tx)?;
                if !found.is_empty() {
                    return Ok(Ok(found));
                }
                let name = file_name(region, 1);
                // The file made before keys had versions is adopted; else one is made.
                let made = match read_secret(keys, &name) {
                    Ok(Some(secret)) => fingerprint(&secret),
                    Ok(None) => {
                        let secret = Zeroizing::new(random::<32>());
                        if let Err(e) = keys.write(&name, hex::encode(secret.as_slice()).as_bytes())
                        {
                            return Ok(Err(e.into()));
                        }
                        fingerprint(secret.as_slice())
                    }
                    Err(e) => return Ok(Err(e)),
                };
                tx.execute(
                    "INSERT INTO pii_keys (version, created, overlap_until, fingerprint)
                     VALUES (1, $1, NULL, $2)",
                    params![ts(now), made.as_str()],
                )?;
                let made = recorded(&tx)?;
                tx.commit()?;
                Ok(Ok(made))
            })??;
        }
        let using = in_use(found, now);
        let loaded = using.iter().map(|r| load(keys, region, r)).collect::<Result<Vec<_>, _>>()?;
        if using.iter().all(|r| r.fingerprint.is_some()) {
            return Ok(Self { region: region.to_owned(), versions: loaded });
        }
        // Versions recorded before fingerprints were: this replica's files become the
        // record, unless another replica's were recorded first, which these must match.
        let after = in_use(adopt(db, &loaded)?, now);
        let loaded = after.iter().map(|r| load(keys, region, r)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { region: region.to_owned(), versions: loaded })
    }

    /// Whether these are still the versions the region uses at `now`, as recorded in
    /// `db` (one small read): false once another replica rotated the key, or an overlap
    /// ended, and the store should open them again ([`PiiKeys::open`], which checks the
    /// new files) before pseudonymising.
    pub fn is_current(&self, db: &Db, now: Timestamp) -> Result<bool, OpenError> {
        let using = in_use(db.run_sync(|sql| recorded(&sql))?, now);
        Ok(using.len() == self.versions.len()
            && using.iter().zip(&self.versions).all(|(r, l)| {
                r.version == l.version && r.fingerprint.as_deref() == Some(l.fingerprint.as_str())
            }))
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
    let overlap_until = now.saturating_add(overlap);
    let (version, previous, file) = db.run_sync(|sql| {
        let tx = locked(&sql)?;
        let previous: Option<i64> =
            tx.query_row("SELECT MAX(version) FROM pii_keys", params![], |r| r.get(0))?;
        let previous = match previous.map(u32::try_from) {
            None => 1,
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                return Err(SqlError::Conversion { column: 0, message: e.to_string() });
            }
        };
        let version = previous + 1;
        // Written while the lock is held: a rotation beside this one waits, then takes
        // the next version; one cut short left a file no record names, which the next
        // rotation overwrites.
        let secret = Zeroizing::new(random::<32>());
        let file = match keys
            .write(&file_name(region, version), hex::encode(secret.as_slice()).as_bytes())
        {
            Ok(file) => file,
            Err(e) => return Ok(Err(e)),
        };
        tx.execute(
            "UPDATE pii_keys SET overlap_until = $1 WHERE version = $2",
            params![ts(overlap_until), i64::from(previous)],
        )?;
        tx.execute(
            "INSERT INTO pii_keys (version, created, overlap_until, fingerprint)
             VALUES ($1, $2, NULL, $3)",
            params![i64::from(version), ts(now), fingerprint(secret.as_slice()).as_str()],
        )?;
        tx.commit()?;
        Ok(Ok((version, previous, file)))
    })??;
    let loaded = PiiKeys::open(db, keys, region, now)?;
    Ok((Rotated { version, file, previous, overlap_until }, loaded))
}

/// Every version recorded, newest first.
pub fn list<C: AsSql + ?Sized>(conn: &C) -> Result<Vec<KeyVersion>, C::Error> {
    Ok(recorded(conn)?.into_iter().map(|r| r.version).collect())
}
