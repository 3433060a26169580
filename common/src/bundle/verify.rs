//! Bundle verification: a pure function over bytes, one typed error per failure.
//!
//! The order of checks is chosen so that untrusted bytes are parsed as little as
//! possible before they are authenticated: header limits, then signatures over the raw
//! manifest bytes, then the manifest's JSON, then its rules (names, paths, region, expiry,
//! size), then the payload's hashes.

use std::collections::BTreeSet;
use std::time::SystemTime;

use thiserror::Error;

use super::container::{HEADER_LEN, Header};
use super::manifest::{Content, MANIFEST_FORMAT, Manifest};
use crate::features::view::is_column_name;
use crate::keys::{Context, KeyId, Sha256, SignatureEntry};
use crate::names::{self, NameError};
use crate::time::Timestamp;
use crate::trust::{SignatureError, TrustRoot};

/// Why a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    /// The file does not start with the bundle magic.
    #[error("not a Falaj bundle (bad magic bytes)")]
    NotABundle,
    /// A version this build does not read.
    #[error("unsupported {what} version {version}")]
    UnsupportedVersion {
        /// "container" or "manifest".
        what: &'static str,
        /// The version found.
        version: u32,
    },
    /// The file ends before a section does.
    #[error("bundle is truncated: {section} needs {expected} bytes, {got} present")]
    Truncated {
        /// The section cut short.
        section: &'static str,
        /// Bytes the section needs.
        expected: u64,
        /// Bytes present.
        got: u64,
    },
    /// Bytes follow the last payload file.
    #[error("bundle has {extra} bytes after its last payload file")]
    TrailingData {
        /// How many.
        extra: u64,
    },
    /// A section or the whole bundle is larger than allowed.
    #[error("{what} is {size} bytes, more than the {limit} allowed")]
    Oversized {
        /// What is too large.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The signatures section is not a JSON array of signatures.
    #[error("signatures section is malformed: {0}")]
    MalformedSignatures(String),
    /// A signature names a key that is not a signing key of the trust root.
    #[error("signed by key {keyid}, which is not a signing key of the trust root")]
    UnknownKey {
        /// The key.
        keyid: KeyId,
    },
    /// A signing key's signature does not match the manifest.
    #[error("signature by key {keyid} does not match the manifest")]
    BadSignature {
        /// The key.
        keyid: KeyId,
    },
    /// Too few distinct signing keys signed.
    #[error("{valid} valid signature(s), the trust root requires {threshold}")]
    ThresholdNotMet {
        /// Distinct valid signatures.
        valid: usize,
        /// Required.
        threshold: u32,
    },
    /// The (authentic) manifest is not valid JSON of the expected shape.
    #[error("manifest is malformed: {0}")]
    MalformedManifest(String),
    /// The manifest breaks a rule not covered by a more specific error.
    #[error("manifest is invalid: {0}")]
    InvalidManifest(String),
    /// A payload file name is absolute, climbs out of its directory, or is otherwise odd.
    #[error("payload file name {0:?} is not a safe relative path")]
    UnsafePath(String),
    /// The bundle has expired.
    #[error("bundle expired at {expires} (now {now})")]
    Expired {
        /// Its expiry.
        expires: Timestamp,
        /// The time of the check.
        now: Timestamp,
    },
    /// The bundle is for another region.
    #[error("bundle is for region {bundle:?}, this site is in {expected:?}")]
    WrongRegion {
        /// The bundle's region.
        bundle: String,
        /// The site's region.
        expected: String,
    },
    /// A payload file's bytes do not match its SHA-256.
    #[error(
        "payload file {file:?} does not match its SHA-256 (manifest {expected}, content {actual})"
    )]
    PayloadHashMismatch {
        /// The file.
        file: String,
        /// The manifest's hash.
        expected: Sha256,
        /// The content's hash.
        actual: Sha256,
    },
}

/// What the verifier checks against, beyond the trust root.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The time of the check.
    pub now: SystemTime,
    /// The region of the site.
    pub region: String,
    /// The largest bundle (whole file) accepted.
    pub max_bundle_bytes: u64,
}

impl Policy {
    /// The default size limit: 8 GiB.
    pub const DEFAULT_MAX_BUNDLE_BYTES: u64 = 8 << 30;

    /// A policy for `region` at `now` with the default size limit.
    pub fn new(region: impl Into<String>, now: SystemTime) -> Self {
        Self { now, region: region.into(), max_bundle_bytes: Self::DEFAULT_MAX_BUNDLE_BYTES }
    }
}

/// Checks the signatures section against the manifest bytes: every signature must be by a
/// signing key of the root and valid, and distinct valid keys must meet the threshold.
fn check_signatures(
    manifest: &[u8],
    signatures: &[u8],
    trust: &TrustRoot,
) -> Result<(), VerifyError> {
    let entries: Vec<SignatureEntry> = serde_json::from_slice(signatures)
        .map_err(|e| VerifyError::MalformedSignatures(e.to_string()))?;
    trust.check_signing(Context::BundleManifest, manifest, &entries).map_err(|e| match e {
        SignatureError::UnknownKey { keyid } => VerifyError::UnknownKey { keyid },
        SignatureError::BadSignature { keyid } => VerifyError::BadSignature { keyid },
        SignatureError::ThresholdNotMet { valid, threshold } => {
            VerifyError::ThresholdNotMet { valid, threshold }
        }
    })
}

fn name_error(err: NameError) -> VerifyError {
    match err {
        NameError::UnsafePath(path) => VerifyError::UnsafePath(path),
        other => VerifyError::InvalidManifest(other.to_string()),
    }
}

/// Checks an authentic manifest's own rules and the policy.
fn check_manifest(manifest: &Manifest, header: Header, policy: &Policy) -> Result<(), VerifyError> {
    if manifest.format != MANIFEST_FORMAT {
        return Err(VerifyError::UnsupportedVersion { what: "manifest", version: manifest.format });
    }
    names::check_model_name(&manifest.name).map_err(name_error)?;
    names::check_region(&manifest.region).map_err(name_error)?;
    if manifest.version == 0 {
        return Err(VerifyError::InvalidManifest("version must be at least 1".into()));
    }
    let mut seen = BTreeSet::new();
    for file in &manifest.files {
        names::check_payload_path(&file.name).map_err(name_error)?;
        if !seen.insert(file.name.as_str()) {
            return Err(VerifyError::InvalidManifest(format!(
                "file {:?} is listed twice",
                file.name
            )));
        }
    }
    let content_file = manifest.content.file();
    if !seen.contains(content_file) {
        return Err(VerifyError::InvalidManifest(format!(
            "{} file {content_file:?} is not among the payload files",
            manifest.content.kind()
        )));
    }
    match &manifest.content {
        Content::Model(model) => {
            if model.signature.inputs.is_empty() || model.signature.outputs.is_empty() {
                return Err(VerifyError::InvalidManifest(
                    "a model needs at least one input and one output".into(),
                ));
            }
            if let Some(input) = &model.features {
                names::check_model_name(&input.view).map_err(name_error)?;
                if input.names.is_empty() || !input.names.iter().all(|n| is_column_name(n)) {
                    return Err(VerifyError::InvalidManifest(
                        "a model's feature input needs feature names".into(),
                    ));
                }
            }
        }
        Content::Features(snapshot) => {
            names::check_model_name(&snapshot.view).map_err(name_error)?;
            let columns = std::iter::once(&snapshot.entity.name)
                .chain(snapshot.features.iter().map(|f| &f.name));
            if snapshot.features.is_empty() || !columns.clone().all(|n| is_column_name(n)) {
                return Err(VerifyError::InvalidManifest(
                    "a snapshot needs features with column names".into(),
                ));
            }
        }
    }
    if manifest.region != policy.region {
        return Err(VerifyError::WrongRegion {
            bundle: manifest.region.clone(),
            expected: policy.region.clone(),
        });
    }
    let now = Timestamp::from_system(policy.now);
    if now >= manifest.expires {
        return Err(VerifyError::Expired { expires: manifest.expires, now });
    }
    let total = manifest
        .payload_size()
        .and_then(|p| p.checked_add(header.payload_offset()))
        .unwrap_or(u64::MAX);
    if total > policy.max_bundle_bytes {
        return Err(VerifyError::Oversized {
            what: "bundle",
            size: total,
            limit: policy.max_bundle_bytes,
        });
    }
    Ok(())
}

/// Verifies the manifest and signatures sections (everything but the payload bytes):
/// the first step of a streaming import. `manifest` and `signatures` are the sections as
/// delimited by `header`.
pub fn verify_manifest(
    header: Header,
    manifest: &[u8],
    signatures: &[u8],
    trust: &TrustRoot,
    policy: &Policy,
) -> Result<Manifest, VerifyError> {
    check_signatures(manifest, signatures, trust)?;
    let parsed: Manifest = serde_json::from_slice(manifest)
        .map_err(|e| VerifyError::MalformedManifest(e.to_string()))?;
    check_manifest(&parsed, header, policy)?;
    Ok(parsed)
}

/// Incremental check of the payload section against a verified manifest: feed the bytes
/// after the signatures section in any pieces, then call [`PayloadCheck::finish`].
pub struct PayloadCheck<'m> {
    manifest: &'m Manifest,
    file: usize,
    in_file: u64,
    hasher: ring::digest::Context,
    extra: u64,
}

impl std::fmt::Debug for PayloadCheck<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadCheck")
            .field("file", &self.file)
            .field("in_file", &self.in_file)
            .finish()
    }
}

impl<'m> PayloadCheck<'m> {
    /// Starts checking the payload of `manifest`.
    pub fn new(manifest: &'m Manifest) -> Self {
        Self {
            manifest,
            file: 0,
            in_file: 0,
            hasher: ring::digest::Context::new(&ring::digest::SHA256),
            extra: 0,
        }
    }

    /// The index of the file the next byte belongs to and the offset within it, so that
    /// a caller writing files out knows where a piece goes. `None` past the last file.
    pub fn position(&self) -> Option<(usize, u64)> {
        (self.file < self.manifest.files.len()).then_some((self.file, self.in_file))
    }

    /// Feeds the next bytes; fails at the first file whose hash does not match.
    pub fn update(&mut self, mut bytes: &[u8]) -> Result<(), VerifyError> {
        while !bytes.is_empty() {
            let Some(entry) = self.manifest.files.get(self.file) else {
                self.extra += bytes.len() as u64;
                return Ok(());
            };
            let want = entry.size - self.in_file;
            let take = usize::try_from(want).unwrap_or(usize::MAX).min(bytes.len());
            self.hasher.update(&bytes[..take]);
            self.in_file += take as u64;
            bytes = &bytes[take..];
            if self.in_file == entry.size {
                self.close_file()?;
            }
        }
        Ok(())
    }

    fn close_file(&mut self) -> Result<(), VerifyError> {
        let entry = &self.manifest.files[self.file];
        let hasher =
            std::mem::replace(&mut self.hasher, ring::digest::Context::new(&ring::digest::SHA256));
        let actual = Sha256::from_digest(&hasher.finish());
        if actual != entry.sha256 {
            return Err(VerifyError::PayloadHashMismatch {
                file: entry.name.clone(),
                expected: entry.sha256,
                actual,
            });
        }
        self.file += 1;
        self.in_file = 0;
        Ok(())
    }

    /// Ends the payload: every file complete and matching, nothing after the last.
    pub fn finish(mut self) -> Result<(), VerifyError> {
        // `update` closes a file when its last byte arrives; empty files at the very end
        // never see a byte, so close them here.
        while self.manifest.files.get(self.file).is_some_and(|f| f.size == 0) {
            self.close_file()?;
        }
        if self.file < self.manifest.files.len() {
            let sizes = self.manifest.files.iter().map(|f| f.size);
            let done: u64 = sizes.clone().take(self.file).sum();
            return Err(VerifyError::Truncated {
                section: "payload",
                expected: sizes.sum(),
                got: done + self.in_file,
            });
        }
        if self.extra > 0 {
            return Err(VerifyError::TrailingData { extra: self.extra });
        }
        Ok(())
    }
}

/// A bundle verified in memory: its manifest and each payload file's bytes.
#[derive(Debug)]
pub struct VerifiedBundle<'a> {
    /// The manifest.
    pub manifest: Manifest,
    /// The manifest's raw (signed) bytes.
    pub manifest_bytes: &'a [u8],
    files: Vec<&'a [u8]>,
}

impl<'a> VerifiedBundle<'a> {
    /// The bytes of the payload file `name`.
    pub fn file(&self, name: &str) -> Option<&'a [u8]> {
        let index = self.manifest.files.iter().position(|f| f.name == name)?;
        Some(self.files[index])
    }

    /// The model file's bytes, for a model bundle.
    pub fn model_bytes(&self) -> Option<&'a [u8]> {
        self.file(&self.manifest.model()?.file)
    }
}

fn section<'a>(
    bytes: &'a [u8],
    start: u64,
    len: u64,
    name: &'static str,
) -> Result<&'a [u8], VerifyError> {
    let available = (bytes.len() as u64).saturating_sub(start);
    if available < len {
        return Err(VerifyError::Truncated { section: name, expected: len, got: available });
    }
    Ok(&bytes[start as usize..(start + len) as usize])
}

/// Verifies a whole bundle held in memory against `trust` and `policy`.
pub fn verify<'a>(
    bytes: &'a [u8],
    trust: &TrustRoot,
    policy: &Policy,
) -> Result<VerifiedBundle<'a>, VerifyError> {
    if bytes.len() as u64 > policy.max_bundle_bytes {
        return Err(VerifyError::Oversized {
            what: "bundle",
            size: bytes.len() as u64,
            limit: policy.max_bundle_bytes,
        });
    }
    let header = Header::parse(bytes)?;
    let manifest_bytes =
        section(bytes, HEADER_LEN as u64, u64::from(header.manifest_len), "manifest")?;
    let signatures = section(
        bytes,
        HEADER_LEN as u64 + u64::from(header.manifest_len),
        u64::from(header.signatures_len),
        "signatures",
    )?;
    let manifest = verify_manifest(header, manifest_bytes, signatures, trust, policy)?;
    let payload = &bytes[header.payload_offset() as usize..];
    let mut check = PayloadCheck::new(&manifest);
    check.update(payload)?;
    check.finish()?;
    let mut files = Vec::with_capacity(manifest.files.len());
    let mut at = 0usize;
    for file in &manifest.files {
        files.push(&payload[at..at + file.size as usize]);
        at += file.size as usize;
    }
    Ok(VerifiedBundle { manifest, manifest_bytes, files })
}
