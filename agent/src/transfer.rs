//! Fetching a bundle in content-defined chunks: only chunks held nowhere on this agent are
//! asked for, each is checked against its SHA-256 as it arrives (a bad one is discarded and
//! fetched again), and each is kept as a file until the bundle is installed, so a transfer
//! broken at any point resumes where it stopped, across restarts of either side. Chunk
//! files are sealed under the device key ([`ChunkSealer`]); the bundle is never assembled
//! on disk: the import reads it chunk by chunk from those files (each opened in memory)
//! and seals it as it stages.
//!
//! The bundle goes through the ordinary import path, which verifies signatures and every
//! payload hash before anything is installed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use falaj_common::chunking::{ChunkRef, MAX_CHUNK, Recipe};
use falaj_common::desired::DesiredBundle;
use falaj_common::keys::Sha256;
use falaj_common::protocol::io::{read_frame, write_frame};
use falaj_common::protocol::{ChunkHeader, FetchRequest};
use thiserror::Error;

use crate::import::{self, ImportError, ImportOptions};
use crate::store::{ChunkSealer, InstallMode, Store, StoreError};

/// Chunks per fetch stream.
const BATCH: usize = 32;
/// Rounds of fetching before giving up on chunks that keep failing.
const ROUNDS: usize = 3;

/// Why a bundle could not be fetched or installed.
#[derive(Debug, Error)]
pub enum TransferError {
    /// The connection failed; the transfer resumes on the next one.
    #[error("connection: {0}")]
    Connection(String),
    /// Chunks the control plane does not have or keeps sending damaged.
    #[error("{count} chunk(s) of {name}@{version} could not be fetched intact (first {first})")]
    Chunks {
        /// Model.
        name: String,
        /// Version.
        version: u64,
        /// How many.
        count: usize,
        /// The first of them.
        first: Sha256,
    },
    /// The recipe is damaged or lies.
    #[error("{0}")]
    Recipe(String),
    /// The assembled file does not match the desired state.
    #[error("assembled {name}@{version} does not match the desired state: {problem}")]
    Assembly {
        /// Model.
        name: String,
        /// Version.
        version: u64,
        /// What differs.
        problem: String,
    },
    /// The bundle was refused by verification.
    #[error(transparent)]
    Import(#[from] ImportError),
    /// Local storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A local file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Counts of one transfer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransferStats {
    /// Chunks in the bundle.
    pub chunks: usize,
    /// Chunks fetched over the network.
    pub fetched: usize,
    /// Bytes fetched over the network.
    pub fetched_bytes: u64,
    /// Chunks found locally (in installed bundles or left by an interrupted transfer).
    pub reused: usize,
    /// Chunks that arrived damaged and were fetched again.
    pub damaged: usize,
}

/// Fetches and installs bundles from one control plane connection.
#[derive(Debug, Clone)]
pub struct Fetcher {
    /// The session's connection.
    pub connection: quinn::Connection,
    /// The agent's store.
    pub store: Arc<Mutex<Store>>,
    /// The agent's data directory.
    pub data_dir: PathBuf,
    /// Fetch streams run at once.
    pub parallel: usize,
}

fn io_err<'p>(
    op: &'static str,
    path: &'p Path,
) -> impl FnOnce(std::io::Error) -> TransferError + 'p {
    move |source| TransferError::Io { op, path: path.to_owned(), source }
}

impl Fetcher {
    fn chunk_dir(&self) -> PathBuf {
        self.data_dir.join("chunks")
    }

    fn chunk_path(&self, sha: &Sha256) -> PathBuf {
        self.chunk_dir().join(sha.to_string())
    }

    async fn store<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, TransferError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || {
            let mut store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut store)
        })
        .await
        .map_err(|e| TransferError::Connection(format!("store task: {e}")))?
        .map_err(TransferError::Store)
    }

    /// Fetches the recipe and every chunk of `want` not held locally into chunk files
    /// (nothing is assembled or installed). Returns the recipe and what moved.
    pub async fn download(
        &self,
        want: &DesiredBundle,
    ) -> Result<(Recipe, TransferStats), TransferError> {
        tokio::fs::create_dir_all(self.chunk_dir())
            .await
            .map_err(io_err("creating", &self.chunk_dir()))?;
        let mut stats = TransferStats::default();
        let sealer = self.store(|s| Ok(s.chunk_sealer())).await?;
        let recipe_path = self.chunk_path(&want.recipe_sha256);
        let held = tokio::fs::read(&recipe_path).await.ok();
        let recipe_bytes =
            if let Some(bytes) = held.and_then(|b| sealer.open(&want.recipe_sha256, b)) {
                bytes
            } else {
                let recipe = [ChunkRef { sha256: want.recipe_sha256, size: 0 }];
                self.fetch(&recipe, &mut stats, want, &sealer).await?;
                let stored =
                    tokio::fs::read(&recipe_path).await.map_err(io_err("reading", &recipe_path))?;
                sealer.open(&want.recipe_sha256, stored).ok_or_else(|| {
                    TransferError::Recipe(format!("{} does not open", recipe_path.display()))
                })?
            };
        let recipe = Recipe::decode(&recipe_bytes, want.recipe_sha256)
            .map_err(|e| TransferError::Recipe(e.to_string()))?;
        if recipe.file_sha256 != want.bundle_sha256 || recipe.size() != want.size {
            return Err(TransferError::Recipe(format!(
                "the recipe of {}@{} describes another file than the desired state",
                want.name, want.version
            )));
        }
        stats.chunks = recipe.chunks.len();

        // What is held locally already: chunk files, or chunks inside installed bundles.
        let mut missing = Vec::new();
        let mut seen = HashSet::new();
        for chunk in &recipe.chunks {
            if !seen.insert(chunk.sha256) {
                continue;
            }
            let file = self.chunk_path(&chunk.sha256);
            let sha = chunk.sha256;
            let installed = self.store(move |s| s.find_chunk(&sha)).await?;
            if tokio::fs::try_exists(&file).await.unwrap_or(false) || installed.is_some() {
                stats.reused += 1;
            } else {
                missing.push(*chunk);
            }
        }
        self.fetch(&missing, &mut stats, want, &sealer).await?;
        Ok((recipe, stats))
    }

    /// Fetches, verifies and installs `want` (not activated). Returns what it moved.
    pub async fn install(
        &self,
        want: &DesiredBundle,
        now: SystemTime,
    ) -> Result<TransferStats, TransferError> {
        let (recipe, stats) = self.download(want).await?;
        crate::crash_point("sync-downloaded");

        // Check every chunk and the whole file on the blocking pool; chunks reused from
        // installed bundles are copied out as sealed chunk files, so that the import can
        // stream the bundle from chunk files alone.
        let (fetcher, recipe_for_check) = (self.clone(), recipe.clone());
        let whole = tokio::task::spawn_blocking(move || fetcher.prepare(&recipe_for_check))
            .await
            .map_err(|e| TransferError::Connection(format!("assembly task: {e}")))??;
        let (name, version) = (want.name.clone(), want.version);
        let check = |ok: bool, problem: &str| {
            if ok {
                Ok(())
            } else {
                Err(TransferError::Assembly {
                    name: name.clone(),
                    version,
                    problem: problem.into(),
                })
            }
        };
        check(whole == want.bundle_sha256, "file hash")?;

        let options = ImportOptions {
            allow_downgrade: true,
            mode: InstallMode { activate: false, managed: true },
            ..ImportOptions::new(now)
        };
        let offsets: Vec<(Sha256, u64, u32)> = recipe
            .chunks
            .iter()
            .scan(0u64, |at, c| {
                let item = (c.sha256, *at, c.size);
                *at += u64::from(c.size);
                Some(item)
            })
            .collect();
        let total = recipe.size();
        let label = self.chunk_dir().join(format!("{}@{}", want.name, want.version));
        let mut reader = ChunkReader {
            chunks: recipe.chunks.iter().map(|c| (c.sha256, self.chunk_path(&c.sha256))).collect(),
            next: 0,
            current: Vec::new(),
            at: 0,
            whole: ring::digest::Context::new(&ring::digest::SHA256),
            want: want.bundle_sha256,
            sealer: self.store(|s| Ok(s.chunk_sealer())).await?,
        };
        let (name, version) = (want.name.clone(), want.version);
        self.store(move |s| {
            let outcome =
                import::import_reader(s, &label, &mut reader, total, &options, &mut |_, _| {});
            match outcome {
                Ok(_) => s.index_chunks(&name, version, &offsets).map(|()| Ok(())),
                Err(ImportError::Store(e)) => Err(e),
                Err(other) => Ok(Err(other)),
            }
        })
        .await??;
        for chunk in recipe.chunks.iter().map(|c| c.sha256).chain([want.recipe_sha256]) {
            let _ = tokio::fs::remove_file(self.chunk_path(&chunk)).await;
        }
        Ok(stats)
    }

    /// Fetches `chunks` into chunk files, retrying damaged and failed ones.
    async fn fetch(
        &self,
        chunks: &[ChunkRef],
        stats: &mut TransferStats,
        want: &DesiredBundle,
        sealer: &ChunkSealer,
    ) -> Result<(), TransferError> {
        let mut pending: Vec<Sha256> = chunks.iter().map(|c| c.sha256).collect();
        for _ in 0..ROUNDS {
            if pending.is_empty() {
                return Ok(());
            }
            let mut tasks = tokio::task::JoinSet::new();
            let mut batches =
                pending.chunks(BATCH).map(<[Sha256]>::to_vec).collect::<Vec<_>>().into_iter();
            let mut failed = Vec::new();
            loop {
                while tasks.len() < self.parallel.max(1) {
                    let Some(batch) = batches.next() else { break };
                    let (this, sealer) = (self.clone(), sealer.clone());
                    tasks.spawn(async move { this.fetch_batch(batch, &sealer).await });
                }
                let Some(done) = tasks.join_next().await else { break };
                let outcome =
                    done.map_err(|e| TransferError::Connection(format!("fetch task: {e}")))?;
                match outcome {
                    Ok(batch) => {
                        stats.fetched += batch.fetched;
                        stats.fetched_bytes += batch.bytes;
                        stats.damaged += batch.damaged.len();
                        failed.extend(batch.damaged);
                        failed.extend(batch.absent);
                    }
                    Err(err) => {
                        tasks.abort_all();
                        return Err(err);
                    }
                }
            }
            if !failed.is_empty() {
                tracing::warn!(count = failed.len(), model = %want.name, version = want.version, "chunks arrived damaged or absent; fetching them again");
            }
            pending = failed;
        }
        match pending.first() {
            None => Ok(()),
            Some(first) => Err(TransferError::Chunks {
                name: want.name.clone(),
                version: want.version,
                count: pending.len(),
                first: *first,
            }),
        }
    }

    /// One fetch stream: asks for `hashes`, writes each intact chunk to its file, sealed.
    async fn fetch_batch(
        &self,
        hashes: Vec<Sha256>,
        sealer: &ChunkSealer,
    ) -> Result<BatchOutcome, TransferError> {
        let conn_err = |e: &dyn std::fmt::Display| TransferError::Connection(e.to_string());
        let (mut send, mut recv) = self.connection.open_bi().await.map_err(|e| conn_err(&e))?;
        write_frame(&mut send, &FetchRequest { hashes: hashes.clone() })
            .await
            .map_err(|e| conn_err(&e))?;
        send.finish().map_err(|e| conn_err(&e))?;
        let mut outcome = BatchOutcome::default();
        for expected in hashes {
            let header = read_frame::<ChunkHeader>(&mut recv)
                .await
                .map_err(|e| conn_err(&e))?
                .ok_or_else(|| TransferError::Connection("fetch stream ended early".into()))?;
            if header.sha256 != expected {
                return Err(TransferError::Connection(format!(
                    "asked for chunk {expected}, got {}",
                    header.sha256
                )));
            }
            let Some(size) = header.size else {
                outcome.absent.push(expected);
                continue;
            };
            if size as usize > MAX_CHUNK.max(falaj_common::protocol::MAX_FRAME) {
                return Err(TransferError::Connection(format!(
                    "chunk {expected} announced as {size} bytes"
                )));
            }
            let mut bytes = vec![0u8; size as usize];
            recv.read_exact(&mut bytes).await.map_err(|e| conn_err(&e))?;
            if Sha256::of(&bytes) != expected {
                outcome.damaged.push(expected);
                continue;
            }
            let path = self.chunk_path(&expected);
            let temp = path.with_extension("part");
            let chunk_file = sealer
                .seal(&expected, &bytes)
                .map_err(|e| TransferError::Store(StoreError::DeviceKey(e.to_string())))?;
            tokio::fs::write(&temp, &chunk_file).await.map_err(io_err("writing", &temp))?;
            tokio::fs::rename(&temp, &path).await.map_err(io_err("writing", &path))?;
            outcome.fetched += 1;
            outcome.bytes += u64::from(size);
        }
        Ok(outcome)
    }

    /// Opens every chunk of `recipe` in order, checking each against its hash, and returns
    /// the hash of the whole file. A chunk held only inside an installed bundle is written
    /// out as a sealed chunk file (removed with the others once the bundle is installed).
    /// Nothing is written in plaintext.
    fn prepare(&self, recipe: &Recipe) -> Result<Sha256, TransferError> {
        let mut whole = ring::digest::Context::new(&ring::digest::SHA256);
        let sealer = {
            let store = self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            store.chunk_sealer()
        };
        for chunk in &recipe.chunks {
            let file = self.chunk_path(&chunk.sha256);
            let from_file = std::fs::read(&file).ok().and_then(|b| sealer.open(&chunk.sha256, b));
            let buf = if let Some(bytes) = from_file {
                bytes
            } else {
                // A chunk of an installed bundle, opened from its sealed segments.
                let found = {
                    let store =
                        self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    store.read_chunk(&chunk.sha256)?
                };
                let Some(bytes) = found else {
                    // A chunk file that does not open (sealed under a device key since
                    // rotated, or damaged) goes, so that the next attempt fetches it.
                    let _ = std::fs::remove_file(&file);
                    return Err(TransferError::Recipe(format!(
                        "chunk {} vanished before assembly",
                        chunk.sha256
                    )));
                };
                if Sha256::of(&bytes) != chunk.sha256 {
                    return Err(TransferError::Recipe(format!(
                        "chunk {} in an installed bundle is damaged",
                        chunk.sha256
                    )));
                }
                let chunk_file = sealer
                    .seal(&chunk.sha256, &bytes)
                    .map_err(|e| TransferError::Store(StoreError::DeviceKey(e.to_string())))?;
                let temp = file.with_extension("part");
                std::fs::write(&temp, &chunk_file).map_err(io_err("writing", &temp))?;
                std::fs::rename(&temp, &file).map_err(io_err("renaming", &temp))?;
                bytes
            };
            whole.update(&buf);
        }
        Ok(Sha256::from_digest(&whole.finish()))
    }
}

/// The bundle a recipe describes, read chunk by chunk from its sealed chunk files: each is
/// opened in memory and checked against its hash, and the end is reported only when the
/// whole file matches the desired state. The import reads it straight into its (sealed)
/// staging file, so no plaintext copy of the bundle is written.
struct ChunkReader {
    /// Each chunk's hash and file, in order.
    chunks: Vec<(Sha256, PathBuf)>,
    /// The next chunk to open.
    next: usize,
    /// The chunk being read, and how far.
    current: Vec<u8>,
    at: usize,
    /// The hash of what was read so far, and what it must come to.
    whole: ring::digest::Context,
    want: Sha256,
    sealer: ChunkSealer,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::{Error, ErrorKind};
        while self.at == self.current.len() {
            let Some((sha, file)) = self.chunks.get(self.next) else {
                let whole = Sha256::from_digest(&self.whole.clone().finish());
                if whole != self.want {
                    return Err(Error::new(
                        ErrorKind::InvalidData,
                        format!("the chunks come to {whole}, not {}", self.want),
                    ));
                }
                return Ok(0);
            };
            let sealed = std::fs::read(file)?;
            let Some(bytes) = self.sealer.open(sha, sealed) else {
                // Checked a moment ago; gone bad since: fetch it again next time.
                let _ = std::fs::remove_file(file);
                return Err(Error::new(
                    ErrorKind::InvalidData,
                    format!("chunk file {} does not open", file.display()),
                ));
            };
            self.whole.update(&bytes);
            self.current = bytes;
            self.at = 0;
            self.next += 1;
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// What one fetch stream brought.
#[derive(Debug, Default)]
struct BatchOutcome {
    fetched: usize,
    bytes: u64,
    damaged: Vec<Sha256>,
    absent: Vec<Sha256>,
}
