//! The container's fixed header and its encoding.

use super::verify::VerifyError;

/// The first eight bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"\x89FLJ\r\n\x1a\n";
/// The container version this build reads and writes.
pub(crate) const CONTAINER_VERSION: u32 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 20;
/// Largest manifest accepted (a reference profile can be sizeable).
pub const MAX_MANIFEST_BYTES: u32 = 4 * 1024 * 1024;
/// Largest signatures section accepted.
pub const MAX_SIGNATURES_BYTES: u32 = 64 * 1024;

/// The parsed fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Length of the manifest section.
    pub manifest_len: u32,
    /// Length of the signatures section.
    pub signatures_len: u32,
}

impl Header {
    /// Parses the header from the first bytes of a bundle; `bytes` may be longer.
    pub fn parse(bytes: &[u8]) -> Result<Self, VerifyError> {
        let Some(header) = bytes.get(..HEADER_LEN) else {
            return Err(VerifyError::Truncated {
                section: "header",
                expected: HEADER_LEN as u64,
                got: bytes.len() as u64,
            });
        };
        if header[..8] != MAGIC {
            return Err(VerifyError::NotABundle);
        }
        let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        let version = word(8);
        if version != CONTAINER_VERSION {
            return Err(VerifyError::UnsupportedVersion { what: "container", version });
        }
        let parsed = Self { manifest_len: word(12), signatures_len: word(16) };
        if parsed.manifest_len > MAX_MANIFEST_BYTES {
            return Err(VerifyError::Oversized {
                what: "manifest",
                size: u64::from(parsed.manifest_len),
                limit: u64::from(MAX_MANIFEST_BYTES),
            });
        }
        if parsed.signatures_len > MAX_SIGNATURES_BYTES {
            return Err(VerifyError::Oversized {
                what: "signatures",
                size: u64::from(parsed.signatures_len),
                limit: u64::from(MAX_SIGNATURES_BYTES),
            });
        }
        Ok(parsed)
    }

    /// Where the payload starts.
    pub fn payload_offset(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.manifest_len) + u64::from(self.signatures_len)
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&CONTAINER_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.manifest_len.to_le_bytes());
        out[16..20].copy_from_slice(&self.signatures_len.to_le_bytes());
        out
    }
}
