//! Building and signing bundles.

use std::collections::BTreeSet;

use thiserror::Error;

use super::container::{Header, MAX_MANIFEST_BYTES, MAX_SIGNATURES_BYTES};
use super::manifest::{Content, FileEntry, MANIFEST_FORMAT, Manifest};
use crate::keys::{Context, Sha256, SignatureEntry, SigningKey};
use crate::names::{self, NameError};
use crate::time::Timestamp;

/// Why a bundle could not be built.
#[derive(Debug, Error)]
pub enum BuildError {
    /// A bad name, region or payload path.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Version 0.
    #[error("version must be at least 1")]
    ZeroVersion,
    /// Two payload files share a name.
    #[error("payload file {0:?} is added twice")]
    DuplicateFile(String),
    /// The model (or snapshot) file is not among the payload files.
    #[error("content file {0:?} is not among the payload files")]
    MissingModelFile(String),
    /// The expiry is not after the creation time.
    #[error("expiry {expires} is not after creation {created}")]
    ExpiryBeforeCreation {
        /// Creation time.
        created: Timestamp,
        /// Expiry.
        expires: Timestamp,
    },
    /// A section outgrows the container's limits.
    #[error("{what} would be {size} bytes, more than the {limit} allowed")]
    TooLarge {
        /// The section.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: u32,
    },
    /// No signing key was given.
    #[error("a bundle needs at least one signing key")]
    NoKeys,
}

/// Collects a manifest's fields and payload files, then signs and encodes the bundle.
#[derive(Debug)]
pub struct BundleBuilder {
    manifest: Manifest,
    payloads: Vec<Vec<u8>>,
}

impl BundleBuilder {
    /// Starts a bundle; `content` names its model file, to be added with [`Self::file`].
    pub fn new(
        name: &str,
        version: u64,
        region: &str,
        created: Timestamp,
        expires: Timestamp,
        content: Content,
    ) -> Self {
        Self {
            manifest: Manifest {
                format: MANIFEST_FORMAT,
                name: name.to_owned(),
                version,
                region: region.to_owned(),
                created,
                expires,
                files: Vec::new(),
                content,
            },
            payloads: Vec::new(),
        }
    }

    /// Adds a payload file.
    #[must_use]
    pub fn file(mut self, name: &str, bytes: Vec<u8>) -> Self {
        self.manifest.files.push(FileEntry {
            name: name.to_owned(),
            size: bytes.len() as u64,
            sha256: Sha256::of(&bytes),
        });
        self.payloads.push(bytes);
        self
    }

    /// The manifest as it stands.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn check(&self) -> Result<(), BuildError> {
        let m = &self.manifest;
        names::check_model_name(&m.name)?;
        names::check_region(&m.region)?;
        if m.version == 0 {
            return Err(BuildError::ZeroVersion);
        }
        if m.expires <= m.created {
            return Err(BuildError::ExpiryBeforeCreation {
                created: m.created,
                expires: m.expires,
            });
        }
        let mut seen = BTreeSet::new();
        for file in &m.files {
            names::check_payload_path(&file.name)?;
            if !seen.insert(&file.name) {
                return Err(BuildError::DuplicateFile(file.name.clone()));
            }
        }
        let file = m.content.file();
        if seen.contains(&file.to_owned()) {
            Ok(())
        } else {
            Err(BuildError::MissingModelFile(file.to_owned()))
        }
    }

    /// Signs the manifest with every key in `keys` and encodes the bundle.
    pub fn build(self, keys: &[&SigningKey]) -> Result<(Manifest, Vec<u8>), BuildError> {
        self.check()?;
        if keys.is_empty() {
            return Err(BuildError::NoKeys);
        }
        let manifest_bytes = self.manifest.to_bytes();
        let signatures: Vec<_> = keys
            .iter()
            .map(|k| SignatureEntry::sign(k, Context::BundleManifest, &manifest_bytes))
            .collect();
        let signature_bytes = serde_json::to_vec(&signatures).expect("signatures serialise");
        let bytes = encode(&manifest_bytes, &signature_bytes, &self.payloads)?;
        Ok((self.manifest, bytes))
    }

    /// Encodes the bundle with no signature: for a model an agent derives on site, which
    /// it stores and trusts because it made it. Verification refuses such a bundle, so it
    /// can never pass for one the control plane signed.
    pub fn build_unsigned(self) -> Result<(Manifest, Vec<u8>), BuildError> {
        self.check()?;
        let bytes = encode(&self.manifest.to_bytes(), b"[]", &self.payloads)?;
        Ok((self.manifest, bytes))
    }
}

/// Lays out a container from its sections.
pub(super) fn encode(
    manifest: &[u8],
    signatures: &[u8],
    payloads: &[Vec<u8>],
) -> Result<Vec<u8>, BuildError> {
    let len = |what, bytes: &[u8], limit: u32| {
        u32::try_from(bytes.len()).ok().filter(|&n| n <= limit).ok_or(BuildError::TooLarge {
            what,
            size: bytes.len(),
            limit,
        })
    };
    let header = Header {
        manifest_len: len("manifest", manifest, MAX_MANIFEST_BYTES)?,
        signatures_len: len("signatures", signatures, MAX_SIGNATURES_BYTES)?,
    };
    let total = header.payload_offset() as usize + payloads.iter().map(Vec::len).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(manifest);
    out.extend_from_slice(signatures);
    for payload in payloads {
        out.extend_from_slice(payload);
    }
    Ok(out)
}
