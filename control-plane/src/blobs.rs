//! Content-addressed blob storage for bundle chunks and recipes.
//!
//! A small trait, so the daemon's tests can hand in a store that misbehaves (a corrupted
//! chunk in flight); [`FsBlobStore`] keeps blobs as files under `DATA_DIR/blobs/ab/abcd...`.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use falaj_common::keys::Sha256;

/// Where chunks and recipes live, by SHA-256.
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// Whether the blob is held.
    fn has(&self, sha256: &Sha256) -> bool;
    /// Stores a blob whose hash the caller has computed; storing it again is harmless.
    fn put(&self, sha256: &Sha256, bytes: &[u8]) -> io::Result<()>;
    /// The blob's bytes, or `None` if it is not held (or is damaged).
    fn get(&self, sha256: &Sha256) -> io::Result<Option<Bytes>>;
}

/// Blobs as files, checked against their hash the first time each is read.
#[derive(Debug)]
pub struct FsBlobStore {
    dir: PathBuf,
    verified: Mutex<HashSet<Sha256>>,
}

impl FsBlobStore {
    /// A store in `dir` (created if missing).
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_owned(), verified: Mutex::new(HashSet::new()) })
    }

    fn path(&self, sha256: &Sha256) -> PathBuf {
        let hex = sha256.to_string();
        self.dir.join(&hex[..2]).join(hex)
    }
}

impl BlobStore for FsBlobStore {
    fn has(&self, sha256: &Sha256) -> bool {
        self.path(sha256).is_file()
    }

    fn put(&self, sha256: &Sha256, bytes: &[u8]) -> io::Result<()> {
        let path = self.path(sha256);
        if path.is_file() {
            return Ok(());
        }
        let parent = path.parent().expect("blob paths have a parent");
        if !parent.is_dir() {
            fs::create_dir_all(parent)?;
            // The new directory's name is durable only once its own directory is synced.
            fs::File::open(&self.dir)?.sync_all()?;
        }
        // Durable before it is named, and its name durable (the directory synced after
        // the rename): a bundle row must never point at a lost blob.
        crate::files::write_atomic(&path, bytes, 0o644)
    }

    fn get(&self, sha256: &Sha256) -> io::Result<Option<Bytes>> {
        let path = self.path(sha256);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut verified = self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !verified.contains(sha256) {
            if Sha256::of(&bytes) != *sha256 {
                tracing::error!(path = %path.display(), "blob does not match its hash; treating it as missing");
                return Ok(None);
            }
            verified.insert(*sha256);
        }
        Ok(Some(Bytes::from(bytes)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_reads_and_refuses_damaged_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobStore::open(dir.path()).unwrap();
        let (a, b) = (b"chunk a".as_slice(), b"chunk b".as_slice());
        let (sa, sb) = (Sha256::of(a), Sha256::of(b));
        store.put(&sa, a).unwrap();
        store.put(&sa, a).unwrap();
        assert!(store.has(&sa) && !store.has(&sb));
        assert_eq!(store.get(&sa).unwrap().as_deref(), Some(a));
        assert_eq!(store.get(&sb).unwrap(), None);
        // Damage a blob on disk before it is first read: it reads as missing.
        store.put(&sb, b).unwrap();
        fs::write(store.path(&sb), b"chunk B").unwrap();
        assert_eq!(store.get(&sb).unwrap(), None);
    }
}
