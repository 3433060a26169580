//! Importing a bundle file: verify everything, then install atomically.
//!
//! The file is streamed: the header and manifest are read and verified first (signatures,
//! region, expiry, size), then the payload is copied to a staging file while every byte
//! is hashed and sealed (encrypted at rest, under a fresh data key: the store's
//! [`crate::store::at_rest`]). Only when every check has passed and the content loads (a model with tract,
//! its signature matching the manifest; a feature snapshot as an online table matching its
//! manifest) does the staged file move into place, in the same SQLite transaction that
//! records it. A refused bundle leaves the installed state untouched.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use falaj_common::bundle::{
    self, BundleKind, Content, Header, Manifest, PayloadCheck, Policy, VerifyError,
};
use falaj_common::features::OnlineTable;
use falaj_common::keys::Sha256;
use falaj_common::onnx::{LoadOptions, OnnxError, OnnxModel};
use thiserror::Error;

use crate::store::{self, InstallMode, InstalledVersion, Store, StoreError};

/// Size of the pieces the payload is copied in.
const PIECE: usize = 1 << 20;

/// How to import.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Install a version older than one already installed (a deliberate rollback).
    pub allow_downgrade: bool,
    /// The time the bundle's and trust root's expiry are checked against.
    pub now: SystemTime,
    /// The largest bundle accepted.
    pub max_bundle_bytes: u64,
    /// Whether the new version becomes active, and who manages it.
    pub mode: InstallMode,
}

impl ImportOptions {
    /// Defaults at `now`: no downgrade, the format's default size limit.
    pub fn new(now: SystemTime) -> Self {
        Self {
            allow_downgrade: false,
            now,
            max_bundle_bytes: Policy::DEFAULT_MAX_BUNDLE_BYTES,
            mode: InstallMode { activate: true, managed: false },
        }
    }
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportOutcome {
    /// The bundle was installed and activated.
    Installed {
        name: String,
        /// The version installed.
        version: u64,
        /// The version that was active before, if any.
        previous: Option<u64>,
        /// Bytes installed.
        size: u64,
    },
    /// This exact bundle was already installed; nothing changed.
    AlreadyInstalled {
        name: String,
        /// Its version.
        version: u64,
    },
}

/// Why an import was refused or failed.
#[derive(Debug, Error)]
pub enum ImportError {
    /// Reading the bundle file failed.
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// The bundle failed verification.
    #[error("{path}: refused: {source}")]
    Refused {
        path: PathBuf,
        /// Why.
        source: VerifyError,
    },
    /// The pinned trust root has expired, so no new bundle can be accepted.
    #[error("refused: {0} (install a newer trust root)")]
    TrustExpired(falaj_common::trust::TrustError),
    /// The bundle's version is not newer than one installed.
    #[error(
        "refused: {name} version {version} is not newer than installed version {latest} (use --allow-downgrade for a deliberate rollback)"
    )]
    NotNewer {
        name: String,
        /// The version offered.
        version: u64,
        /// The newest installed.
        latest: u64,
    },
    /// A different bundle with the same name and version is installed.
    #[error(
        "refused: {name} version {version} is already installed with different content (manifest {installed}, offered {offered})"
    )]
    Conflict {
        name: String,
        version: u64,
        /// The installed manifest's hash.
        installed: Sha256,
        /// The offered manifest's hash.
        offered: Sha256,
    },
    /// The model does not load, or its I/O differs from what the manifest declares.
    #[error("refused: {name} version {version}: {problem}")]
    BadModel {
        name: String,
        version: u64,
        /// What is wrong.
        problem: String,
    },
    /// The feature snapshot's payload does not load as the table its manifest describes.
    #[error("refused: feature snapshot {name} version {version}: {problem}")]
    BadSnapshot {
        name: String,
        /// The snapshot's version.
        version: u64,
        /// What is wrong.
        problem: String,
    },
    /// Installed versions of the name carry another kind of content.
    #[error(
        "refused: {name} version {version} is a {offered} bundle, but the installed versions of {name} are {installed} bundles (a name holds one kind)"
    )]
    KindChange {
        name: String,
        /// The version offered.
        version: u64,
        /// The kind offered.
        offered: BundleKind,
        /// The kind installed.
        installed: BundleKind,
    },
    /// The agent's store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ImportError {
    /// Whether the bundle itself was refused (as opposed to a local failure).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, Self::Read { .. } | Self::Store(_))
    }
}

/// Whether `manifest` may be installed next to `existing` versions of its name:
/// `Ok(true)` to install, `Ok(false)` if this exact bundle is already there.
fn check_version(
    manifest: &Manifest,
    manifest_sha: Sha256,
    existing: &[InstalledVersion],
    allow_downgrade: bool,
) -> Result<bool, ImportError> {
    let offered = manifest.content.kind();
    if let Some(other) = existing.iter().find(|v| v.kind != offered) {
        return Err(ImportError::KindChange {
            name: manifest.name.clone(),
            version: manifest.version,
            offered,
            installed: other.kind,
        });
    }
    if let Some(installed) = existing.iter().find(|v| v.version == manifest.version) {
        if installed.manifest_sha256 == manifest_sha {
            return Ok(false);
        }
        return Err(ImportError::Conflict {
            name: manifest.name.clone(),
            version: manifest.version,
            installed: installed.manifest_sha256,
            offered: manifest_sha,
        });
    }
    let latest = existing.iter().map(|v| v.version).max();
    match latest {
        Some(latest) if latest > manifest.version && !allow_downgrade => {
            Err(ImportError::NotNewer {
                name: manifest.name.clone(),
                version: manifest.version,
                latest,
            })
        }
        _ => Ok(true),
    }
}

/// The header and the two small sections that precede the payload.
struct Head {
    header: Header,
    bytes: Vec<u8>,
    manifest: Vec<u8>,
    signatures: Vec<u8>,
}

/// Reads the header, manifest and signatures sections (bounded by the header's limits).
fn read_head(reader: &mut impl Read, total: u64) -> Result<Head, VerifyError> {
    let truncated = |section: &'static str, expected: u64| VerifyError::Truncated {
        section,
        expected,
        got: total.min(expected),
    };
    let bytes = store::read_exact_vec(reader, bundle::HEADER_LEN)
        .map_err(|_| truncated("header", bundle::HEADER_LEN as u64))?;
    let header = Header::parse(&bytes)?;
    let manifest = store::read_exact_vec(reader, header.manifest_len as usize)
        .map_err(|_| truncated("manifest", u64::from(header.manifest_len)))?;
    let signatures = store::read_exact_vec(reader, header.signatures_len as usize)
        .map_err(|_| truncated("signatures", u64::from(header.signatures_len)))?;
    Ok(Head { header, bytes, manifest, signatures })
}

/// A bundle copied (sealed) to the staging directory and verified to its last byte.
struct Staged {
    file: store::Sealed,
    content_bytes: Vec<u8>,
    size: u64,
}

/// Copies the bundle into a staging file, hashing every payload byte on the way and
/// keeping the bytes of the file its content names (the model or the snapshot) in memory;
/// the staging file is sealed as it is written and fsynced before it is returned.
fn stage(
    store: &Store,
    path: &Path,
    reader: &mut impl Read,
    head: &Head,
    manifest: &Manifest,
    total: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Staged, ImportError> {
    let staging = store.staging_dir();
    let staging_err =
        |source| StoreError::Io { op: "writing staged bundle in", path: staging.clone(), source };
    let mut file = store.stage(manifest, &head.manifest, "import-")?;
    for section in [&head.bytes, &head.manifest, &head.signatures] {
        file.write_all(section).map_err(staging_err)?;
    }
    let content_file = manifest.content.file();
    let mut content_bytes = Vec::new();
    let mut check = PayloadCheck::new(manifest);
    let mut buf = vec![0u8; PIECE];
    let mut size = head.header.payload_offset();
    progress(size, total);
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|source| ImportError::Read { path: path.to_owned(), source })?;
        if n == 0 {
            break;
        }
        collect_content_bytes(manifest, content_file, &check, &buf[..n], &mut content_bytes);
        check
            .update(&buf[..n])
            .map_err(|source| ImportError::Refused { path: path.to_owned(), source })?;
        file.write_all(&buf[..n]).map_err(staging_err)?;
        size += n as u64;
        progress(size, total);
    }
    check.finish().map_err(|source| ImportError::Refused { path: path.to_owned(), source })?;
    let file = file.finish().map_err(staging_err)?;
    Ok(Staged { file, content_bytes, size })
}

/// The content must load here: a model with the inputs the manifest declares (and, if its
/// input comes from a feature view, of the shape that needs), or a snapshot as the table its
/// manifest describes.
fn check_content(manifest: &Manifest, content_bytes: &[u8]) -> Result<(), ImportError> {
    let (name, version) = (&manifest.name, manifest.version);
    match &manifest.content {
        Content::Model(spec) => {
            let bad_model =
                |problem: String| ImportError::BadModel { name: name.clone(), version, problem };
            let load = LoadOptions { shapes: spec.shapes.clone(), ..LoadOptions::default() };
            let model = OnnxModel::load_with(content_bytes, &load)
                .map_err(|e: OnnxError| bad_model(e.to_string()))?;
            if model.signature().inputs != spec.signature.inputs {
                return Err(bad_model(format!(
                    "the model's inputs {:?} differ from the manifest's {:?}",
                    model.signature().inputs,
                    spec.signature.inputs
                )));
            }
            if let Some(input) = &spec.features {
                input.fits(model.signature()).map_err(bad_model)?;
            }
            Ok(())
        }
        Content::Features(spec) => {
            let bad =
                |problem: String| ImportError::BadSnapshot { name: name.clone(), version, problem };
            if spec.view != manifest.name {
                return Err(bad(format!(
                    "the bundle is named {:?} but carries view {:?}; a snapshot bundle is named after its view",
                    manifest.name, spec.view
                )));
            }
            OnlineTable::load(spec.clone(), content_bytes).map(drop).map_err(|e| bad(e.to_string()))
        }
    }
}

/// Imports the bundle at `path` into `store`. `progress` is called with bytes done and
/// the total as the payload is copied.
pub fn import_file(
    store: &mut Store,
    path: &Path,
    options: &ImportOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ImportOutcome, ImportError> {
    let read_err = |source| ImportError::Read { path: path.to_owned(), source };
    let file = File::open(path).map_err(read_err)?;
    let total = file.metadata().map_err(read_err)?.len();
    let mut reader = BufReader::with_capacity(PIECE, file);
    import_reader(store, path, &mut reader, total, options, progress)
}

/// Imports the `total` bytes of a bundle read from `reader`, named `path` in errors (a
/// sync streams its chunks through here, so the assembled bundle never lies on disk). The
/// bundle is verified to its last byte, `reader`'s end included, before it is installed.
pub fn import_reader(
    store: &mut Store,
    path: &Path,
    reader: &mut impl Read,
    total: u64,
    options: &ImportOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ImportOutcome, ImportError> {
    let refused = |source| ImportError::Refused { path: path.to_owned(), source };
    if total > options.max_bundle_bytes {
        return Err(refused(VerifyError::Oversized {
            what: "bundle",
            size: total,
            limit: options.max_bundle_bytes,
        }));
    }
    let head = read_head(reader, total).map_err(refused)?;

    let trust = store.trust_root()?;
    trust.check_expiry(options.now).map_err(ImportError::TrustExpired)?;
    let policy = Policy {
        now: options.now,
        region: store.region().to_owned(),
        max_bundle_bytes: options.max_bundle_bytes,
    };
    let manifest =
        bundle::verify_manifest(head.header, &head.manifest, &head.signatures, &trust, &policy)
            .map_err(refused)?;
    let manifest_sha = Sha256::of(&head.manifest);

    // Fail fast on the version rule; it is checked again under the write lock. A bundle
    // that is already installed is still verified to the last byte before saying so.
    let existing = store.versions(&manifest.name)?;
    check_version(&manifest, manifest_sha, &existing, options.allow_downgrade)?;

    let staged = stage(store, path, reader, &head, &manifest, total, progress)?;
    crate::crash_point("import-staged");
    let Staged { file: staged_file, content_bytes, size: staged_size } = staged;
    check_content(&manifest, &content_bytes)?;

    let previous = store
        .installed()?
        .into_iter()
        .find(|i| i.active && i.manifest.name == manifest.name)
        .map(|i| i.manifest.version);
    let installed = store.install(
        staged_file,
        &manifest,
        &head.manifest,
        options.mode,
        options.now,
        |existing| check_version(&manifest, manifest_sha, existing, options.allow_downgrade),
    )?;
    let (name, version) = (manifest.name, manifest.version);
    if !installed {
        return Ok(ImportOutcome::AlreadyInstalled { name, version });
    }
    Ok(ImportOutcome::Installed { name, version, previous, size: staged_size })
}

/// Appends the part of `piece` that belongs to the content file to `out`. `check` tells
/// where in the payload `piece` starts.
fn collect_content_bytes(
    manifest: &Manifest,
    content_file: &str,
    check: &PayloadCheck<'_>,
    mut piece: &[u8],
    out: &mut Vec<u8>,
) {
    let Some((mut index, mut offset)) = check.position() else { return };
    while !piece.is_empty() && index < manifest.files.len() {
        let entry = &manifest.files[index];
        let take = usize::try_from(entry.size - offset).unwrap_or(usize::MAX).min(piece.len());
        if entry.name == content_file {
            out.extend_from_slice(&piece[..take]);
        }
        piece = &piece[take..];
        index += 1;
        offset = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use falaj_common::bundle::{Content, ModelFormat, ModelSpec, RuntimeHint};
    use falaj_common::tensor::Signature;
    use falaj_common::time::Timestamp;

    fn manifest(version: u64) -> Manifest {
        Manifest {
            format: 1,
            name: "m".into(),
            version,
            region: "r".into(),
            created: Timestamp::from_unix(0),
            expires: Timestamp::from_unix(1),
            files: vec![],
            content: Content::Model(ModelSpec {
                file: "model.onnx".into(),
                format: ModelFormat::Onnx,
                runtime: RuntimeHint::Auto,
                signature: Signature { inputs: vec![], outputs: vec![] },
                reference: None,
                features: None,
                lineage: None,
                shapes: std::collections::BTreeMap::new(),
            }),
        }
    }

    fn held(version: u64, manifest_sha256: Sha256) -> InstalledVersion {
        InstalledVersion { version, manifest_sha256, kind: BundleKind::Model }
    }

    #[test]
    fn version_rule() {
        let (a, b) = (Sha256([1; 32]), Sha256([2; 32]));
        let existing = [held(1, a), held(3, a)];
        assert!(check_version(&manifest(4), b, &existing, false).unwrap());
        assert!(!check_version(&manifest(3), a, &existing, false).unwrap());
        assert!(matches!(
            check_version(&manifest(3), b, &existing, true),
            Err(ImportError::Conflict { version: 3, .. })
        ));
        assert!(matches!(
            check_version(&manifest(2), b, &existing, false),
            Err(ImportError::NotNewer { version: 2, latest: 3, .. })
        ));
        assert!(check_version(&manifest(2), b, &existing, true).unwrap());
        assert!(check_version(&manifest(1), b, &[], false).unwrap());
    }

    #[test]
    fn a_name_keeps_its_kind() {
        let a = Sha256([1; 32]);
        let snapshot =
            InstalledVersion { version: 1, manifest_sha256: a, kind: BundleKind::Features };
        assert!(matches!(
            check_version(&manifest(2), a, &[snapshot], true),
            Err(ImportError::KindChange {
                offered: BundleKind::Model,
                installed: BundleKind::Features,
                ..
            })
        ));
    }
}
