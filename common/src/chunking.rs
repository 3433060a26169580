//! Content-defined chunking of bundle files, and the recipe that lists a file's chunks.
//!
//! Both sides cut files with FastCDC (2020) and the same parameters, so a chunk is named by
//! its SHA-256 wherever it appears: a new version that changes a small part of a model
//! (a fine-tuned head) shares most chunks with the version before, and an agent fetches
//! only the chunks it does not hold.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::bundle::BundleKind;
use crate::keys::Sha256;

/// Smallest chunk, except a file's last.
pub const MIN_CHUNK: usize = 64 * 1024;
/// Typical chunk.
pub const AVG_CHUNK: usize = 256 * 1024;
/// Largest chunk.
pub const MAX_CHUNK: usize = 1024 * 1024;

/// FastCDC's smallest, typical and largest chunk for one kind of bundle. The recipe lists
/// each chunk's size, so agents never need to know which parameters cut a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    /// Smallest chunk, except a file's last.
    pub min: usize,
    /// Typical chunk.
    pub avg: usize,
    /// Largest chunk.
    pub max: usize,
}

impl ChunkParams {
    /// Models: a new version changes whole tensors (a fine-tuned head), so large chunks
    /// lose little and keep recipes short.
    pub const MODELS: Self = Self { min: MIN_CHUNK, avg: AVG_CHUNK, max: MAX_CHUNK };
    /// Feature snapshots: a new snapshot changes scattered rows, and every chunk holding a
    /// changed row moves, so chunks are small (a million entities make about 6,000).
    pub const SNAPSHOTS: Self = Self { min: 4 * 1024, avg: 16 * 1024, max: 64 * 1024 };

    /// The parameters for a bundle of `kind`.
    pub fn for_kind(kind: BundleKind) -> Self {
        match kind {
            BundleKind::Model => Self::MODELS,
            BundleKind::Features => Self::SNAPSHOTS,
        }
    }
}

/// One chunk of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// The chunk's SHA-256.
    pub sha256: Sha256,
    /// Its length.
    pub size: u32,
}

/// A file as an ordered list of chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    /// SHA-256 of the whole file.
    pub file_sha256: Sha256,
    /// The chunks, in file order.
    pub chunks: Vec<ChunkRef>,
}

/// Why a recipe was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecipeError {
    /// The bytes do not decode as a recipe.
    #[error("recipe does not decode: {0}")]
    Malformed(String),
    /// The recipe's bytes do not hash to the expected value.
    #[error("recipe hash {actual} differs from the expected {expected}")]
    HashMismatch {
        /// What the desired state names.
        expected: Sha256,
        /// What arrived.
        actual: Sha256,
    },
    /// A chunk is larger than any chunker output.
    #[error("recipe lists a chunk of {0} bytes, more than {MAX_CHUNK}")]
    ChunkTooLarge(u32),
}

impl Recipe {
    /// Chunks `bytes` held in memory (the shells stream large files through
    /// `fastcdc::v2020::StreamCDC` with [`MIN_CHUNK`], [`AVG_CHUNK`], [`MAX_CHUNK`]).
    pub fn of(bytes: &[u8]) -> Self {
        let chunks = fastcdc::v2020::FastCDC::new(bytes, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
            .map(|c| ChunkRef {
                sha256: Sha256::of(&bytes[c.offset..c.offset + c.length]),
                size: c.length as u32,
            })
            .collect();
        Self { file_sha256: Sha256::of(bytes), chunks }
    }

    /// The file's size.
    pub fn size(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.size)).sum()
    }

    /// The recipe's encoding, as sent and hashed.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("recipes always encode")
    }

    /// Decodes a recipe and checks it against the hash the desired state names.
    pub fn decode(bytes: &[u8], expected: Sha256) -> Result<Self, RecipeError> {
        let actual = Sha256::of(bytes);
        if actual != expected {
            return Err(RecipeError::HashMismatch { expected, actual });
        }
        let recipe: Self =
            postcard::from_bytes(bytes).map_err(|e| RecipeError::Malformed(e.to_string()))?;
        if let Some(big) = recipe.chunks.iter().find(|c| c.size as usize > MAX_CHUNK) {
            return Err(RecipeError::ChunkTooLarge(big.size));
        }
        Ok(recipe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::SeededRng;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = SeededRng::new(seed);
        (0..len).map(|_| rng.below(256) as u8).collect()
    }

    #[test]
    fn chunks_cover_the_file_in_order() {
        let bytes = noise(3 << 20, 1);
        let recipe = Recipe::of(&bytes);
        assert_eq!(recipe.size(), bytes.len() as u64);
        assert!(recipe.chunks.len() > 4, "{}", recipe.chunks.len());
        let mut at = 0;
        for c in &recipe.chunks {
            assert!(c.size as usize <= MAX_CHUNK);
            assert_eq!(Sha256::of(&bytes[at..at + c.size as usize]), c.sha256);
            at += c.size as usize;
        }
    }

    #[test]
    fn a_change_near_the_end_keeps_most_chunks() {
        let old = noise(4 << 20, 2);
        let mut new = old.clone();
        // A "fine-tuned head": the last 100 KiB rewritten, and the header grows by 3 bytes.
        for b in &mut new[(4 << 20) - 100 * 1024..] {
            *b ^= 0x5a;
        }
        new.splice(10..10, [1, 2, 3]);
        let (a, b) = (Recipe::of(&old), Recipe::of(&new));
        let held: std::collections::HashSet<_> = a.chunks.iter().map(|c| c.sha256).collect();
        let moved: u64 =
            b.chunks.iter().filter(|c| !held.contains(&c.sha256)).map(|c| u64::from(c.size)).sum();
        assert!(moved < b.size() / 3, "moved {moved} of {}", b.size());
    }

    #[test]
    fn recipes_round_trip_and_are_checked() {
        let recipe = Recipe::of(&noise(300_000, 3));
        let bytes = recipe.encode();
        let sha = Sha256::of(&bytes);
        assert_eq!(Recipe::decode(&bytes, sha).unwrap(), recipe);
        let mut bad = bytes.clone();
        bad[5] ^= 1;
        assert!(matches!(Recipe::decode(&bad, sha), Err(RecipeError::HashMismatch { .. })));
        assert!(matches!(
            Recipe::decode(&[0xff; 3], Sha256::of(&[0xff; 3])),
            Err(RecipeError::Malformed(_))
        ));
    }
}
