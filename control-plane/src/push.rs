//! Registering a bundle with the control plane: verify it as an agent would, cut it into
//! content-defined chunks (sized for its kind, `ChunkParams`), store the chunks and the
//! recipe as blobs.
//!
//! The file is read twice, in bounded pieces, so a bundle of any size is handled in
//! bounded memory: once to verify, once to chunk.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use falaj_common::bundle::{self, Header, Manifest, PayloadCheck, Policy, VerifyError};
use falaj_common::chunking::{ChunkParams, ChunkRef, Recipe};
use falaj_common::keys::Sha256;
use falaj_common::time::Timestamp;
use falaj_common::trust::TrustRoot;
use thiserror::Error;

use crate::blobs::BlobStore;
use crate::db::BundleRow;

/// Why a push was refused or failed.
#[derive(Debug, Error)]
pub enum PushError {
    /// Reading the file or writing blobs failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        source: io::Error,
    },
    /// The bundle does not verify against this control plane's trust root.
    #[error("bundle refused: {0}")]
    Refused(#[from] VerifyError),
}

/// A verified, chunked bundle, ready to be recorded.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// Its row.
    pub row: BundleRow,
    /// Its manifest.
    pub manifest: Manifest,
    /// Chunks that were not already stored.
    pub new_chunks: u64,
}

fn read_section(
    reader: &mut impl Read,
    len: usize,
    section: &'static str,
    total: u64,
) -> Result<Vec<u8>, VerifyError> {
    let mut buf = vec![0u8; len];
    reader.read_exact(&mut buf).map_err(|_| VerifyError::Truncated {
        section,
        expected: len as u64,
        got: total.min(len as u64),
    })?;
    Ok(buf)
}

/// Verifies the bundle at `path` against `trust` for `region`, then stores its chunks
/// and recipe in `blobs`.
pub fn push_file(
    path: &Path,
    trust: &TrustRoot,
    region: &str,
    blobs: &dyn BlobStore,
    now: SystemTime,
) -> Result<Pushed, PushError> {
    let io_err = |op| move |source| PushError::Io { op, path: path.to_owned(), source };
    let file = File::open(path).map_err(io_err("reading"))?;
    let total = file.metadata().map_err(io_err("reading"))?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let head = read_section(&mut reader, bundle::HEADER_LEN, "header", total)?;
    let header = Header::parse(&head)?;
    let manifest_bytes =
        read_section(&mut reader, header.manifest_len as usize, "manifest", total)?;
    let signatures =
        read_section(&mut reader, header.signatures_len as usize, "signatures", total)?;
    let policy = Policy::new(region, now);
    let manifest = bundle::verify_manifest(header, &manifest_bytes, &signatures, trust, &policy)?;
    let mut check = PayloadCheck::new(&manifest);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf).map_err(io_err("reading"))?;
        if n == 0 {
            break;
        }
        check.update(&buf[..n])?;
    }
    check.finish()?;

    // Verified: now cut the whole file into chunks.
    let file = File::open(path).map_err(io_err("reading"))?;
    let mut whole = ring::digest::Context::new(&ring::digest::SHA256);
    let mut chunks = Vec::new();
    let mut new_chunks = 0;
    let params = ChunkParams::for_kind(manifest.content.kind());
    for chunk in
        fastcdc::v2020::StreamCDC::new(BufReader::new(file), params.min, params.avg, params.max)
    {
        let chunk = chunk.map_err(|e| PushError::Io {
            op: "chunking",
            path: path.to_owned(),
            source: e.into(),
        })?;
        whole.update(&chunk.data);
        let sha256 = Sha256::of(&chunk.data);
        if !blobs.has(&sha256) {
            blobs.put(&sha256, &chunk.data).map_err(io_err("storing a chunk of"))?;
            new_chunks += 1;
        }
        chunks.push(ChunkRef { sha256, size: chunk.length as u32 });
    }
    let recipe = Recipe { file_sha256: Sha256::from_digest(&whole.finish()), chunks };
    let encoded = recipe.encode();
    let recipe_sha256 = Sha256::of(&encoded);
    blobs.put(&recipe_sha256, &encoded).map_err(io_err("storing the recipe of"))?;
    let row = BundleRow {
        name: manifest.name.clone(),
        version: manifest.version,
        manifest_sha256: Sha256::of(&manifest_bytes),
        bundle_sha256: recipe.file_sha256,
        recipe_sha256,
        size: total,
        chunks: recipe.chunks.len() as u64,
        pushed_at: Timestamp::from_system(now),
    };
    Ok(Pushed { row, manifest, new_chunks })
}
