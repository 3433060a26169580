//! The `.falaj` bundle format, version 1: one file holding a signed manifest and the
//! payload files it describes.
//!
//! ```text
//! offset  size  field
//! 0       8     magic  89 46 4C 4A 0D 0A 1A 0A  ("\x89FLJ\r\n\x1a\n")
//! 8       4     container version, u32 little endian (= 1)
//! 12      4     manifest length M, u32 LE (at most MAX_MANIFEST_BYTES)
//! 16      4     signatures length S, u32 LE (at most MAX_SIGNATURES_BYTES)
//! 20      M     manifest: JSON (`Manifest`), the exact bytes that are signed
//! 20+M    S     signatures: JSON array of {"keyid", "sig"}
//! 20+M+S  ...   payload files, concatenated in the manifest's `files` order,
//!               each exactly its declared `size`; then the end of the file
//! ```
//!
//! The magic's high byte and CR LF catch files mangled by text-mode transfers. Signatures
//! cover the manifest bytes under [`crate::keys::Context::BundleManifest`]; the manifest
//! pins every payload file by SHA-256 and size, so one signature check over a few KiB
//! covers the whole file. See [`verify`] for the rules a bundle must pass.

mod build;
mod container;
mod manifest;
mod verify;

pub use build::{BuildError, BundleBuilder};
pub use container::{HEADER_LEN, Header, MAGIC, MAX_MANIFEST_BYTES, MAX_SIGNATURES_BYTES};
pub use manifest::{
    BundleKind, Content, FeatureInput, FileEntry, MANIFEST_FORMAT, Manifest, ModelFormat,
    ModelSpec, RuntimeHint,
};
pub use verify::{PayloadCheck, Policy, VerifiedBundle, VerifyError, verify, verify_manifest};

#[cfg(test)]
mod tests;
