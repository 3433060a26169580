//! Encryption at rest: envelope encryption of files with AES-256-GCM (ring), free of I/O.
//!
//! Every file gets its own random **data key**. The file is sealed with it in a chunked
//! stream (the STREAM construction of age and Tink's streaming AEAD): the plaintext is cut
//! into segments of [`SEGMENT`] bytes, and segment `i` is sealed under the nonce
//! `0^3 ‖ i (u64, big-endian) ‖ last` where `last` is 1 for the final segment only. The
//! associated data of every segment is the file's header and its **identity** (what the
//! caller says the file is: its name, version and manifest digest), so that
//!
//! - a flipped bit anywhere fails that segment's tag;
//! - segments swapped or moved fail (the index is in the nonce);
//! - a file cut at a segment boundary fails (its new last segment was not sealed as last);
//! - a whole file put in another's place fails (another data key, another identity).
//!
//! The data key is then **wrapped** (AES-256-GCM, random nonce, the identity as associated
//! data) by the **device key**, which is named by a [`KeyId`] derived from it. Wrapped keys
//! are small and live beside the file's record, so rotating the device key re-wraps them
//! all without rewriting any file. Large files never need to be one buffer twice: a
//! [`Sealer`] takes the plaintext piece by piece, and [`Opener`] opens a whole sealed file
//! in place or any run of its segments (for random access).
//!
//! ```text
//! sealed file = "FALAJAR1" ‖ segment size (u32 LE) ‖ seal(seg 0) ‖ … ‖ seal(seg n-1)
//! seal(seg)   = ciphertext (segment size bytes, fewer in the last) ‖ tag (16 bytes)
//! wrapped key = nonce (12) ‖ AES-256-GCM(device key, data key) (32) ‖ tag (16)
//! ```
//!
//! An empty file is one empty final segment (16 bytes after the header).

use std::fmt;
use std::ops::Range;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::SecureRandom;
use thiserror::Error;

/// Length of a key (device or data), in bytes.
pub const KEY_LEN: usize = 32;
/// Plaintext bytes per segment of a sealed file.
pub const SEGMENT: usize = 1 << 20;
/// What a sealed file starts with.
pub const MAGIC: &[u8; 8] = b"FALAJAR1";
/// Length of a sealed file's header: the magic and the segment size.
pub const HEADER_LEN: usize = MAGIC.len() + 4;
/// Length of each segment's authentication tag.
pub const TAG_LEN: usize = 16;
/// Length of a wrapped data key.
pub const WRAPPED_LEN: usize = NONCE_LEN + KEY_LEN + TAG_LEN;

const WRAP_CONTEXT: &[u8] = b"falaj at-rest data key v1\0";
const BLOB_CONTEXT: &[u8] = b"falaj at-rest blob v1\0";
const ID_CONTEXT: &[u8] = b"falaj at-rest device key id v1\0";
/// Segment sizes a header may name: small ones exist for tests, large ones would make a
/// reader hold too much at once.
const SEGMENT_RANGE: std::ops::RangeInclusive<usize> = 16..=(16 << 20);

/// Why a key could not be made, read, wrapped or unwrapped.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    /// Key material of the wrong form.
    #[error("key material is {0} bytes; a key is {KEY_LEN} raw bytes or {hex} hex digits", hex = KEY_LEN * 2)]
    Material(usize),
    /// A wrapped key of the wrong length.
    #[error("a wrapped data key is {WRAPPED_LEN} bytes, this one is {0}")]
    WrappedLength(usize),
    /// The wrapped key does not open under this device key for this identity.
    #[error(
        "the wrapped data key does not open under device key {key_id}: another device key wrapped it, it belongs to another file, or it was altered"
    )]
    Unwrap {
        /// The device key tried.
        key_id: KeyId,
    },
    /// A sealed blob does not open under this device key for this identity.
    #[error(
        "the sealed data does not open under device key {key_id}: another device key sealed it, it belongs to something else, or it was altered"
    )]
    Blob {
        /// The device key tried.
        key_id: KeyId,
    },
    /// The system's random number generator failed.
    #[error("the random number generator failed")]
    Random,
}

/// Why a sealed file could not be opened.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OpenError {
    /// The file does not start with the header of a sealed file.
    #[error("not a sealed file (it does not start with {:?})", String::from_utf8_lossy(MAGIC))]
    NotSealed,
    /// The header names a segment size outside what readers accept.
    #[error("sealed file names a segment size of {0} bytes")]
    SegmentSize(u32),
    /// The length cannot be that of a sealed file: it was cut short.
    #[error("sealed file of {0} bytes is truncated (its last segment is shorter than a tag)")]
    Truncated(u64),
    /// A segment failed authentication.
    #[error(
        "segment {index} of the sealed file failed authentication (tampered with, truncated, reordered, or another file's)"
    )]
    Tampered {
        /// The segment.
        index: u64,
    },
    /// A range beyond the plaintext was asked for.
    #[error("bytes {start}..{end} are outside the file's {len} bytes")]
    OutOfRange {
        /// Start asked.
        start: u64,
        /// End asked.
        end: u64,
        /// The plaintext's length.
        len: u64,
    },
}

/// A short name for a device key (16 hex digits of a hash of it), stored beside each
/// wrapped key so that a wrong key is named, not just refused.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyId(String);

impl KeyId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

fn aead_key(bytes: &[u8; KEY_LEN]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("32 bytes is an AES-256 key"))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn random_key(rng: &dyn SecureRandom) -> Result<[u8; KEY_LEN], KeyError> {
    let mut bytes = [0u8; KEY_LEN];
    rng.fill(&mut bytes).map_err(|_| KeyError::Random)?;
    Ok(bytes)
}

/// The device key: it wraps every data key of one agent.
pub struct DeviceKey {
    bytes: [u8; KEY_LEN],
    key: LessSafeKey,
    id: KeyId,
}

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceKey({})", self.id)
    }
}

impl DeviceKey {
    /// A new random device key.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        Ok(Self::from_array(random_key(rng)?))
    }

    fn from_array(bytes: [u8; KEY_LEN]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, &[ID_CONTEXT, &bytes].concat());
        let id = hex(&digest.as_ref()[..8]);
        Self { key: aead_key(&bytes), bytes, id: KeyId(id) }
    }

    /// Reads key material: 32 raw bytes, or 64 hex digits with surrounding whitespace
    /// (what [`Self::to_hex`] writes).
    pub fn from_material(material: &[u8]) -> Result<Self, KeyError> {
        if let Ok(bytes) = <[u8; KEY_LEN]>::try_from(material) {
            return Ok(Self::from_array(bytes));
        }
        let text = material.trim_ascii();
        if text.len() == KEY_LEN * 2 {
            let mut bytes = [0u8; KEY_LEN];
            for (out, pair) in bytes.iter_mut().zip(text.chunks(2)) {
                let digits =
                    std::str::from_utf8(pair).map_err(|_| KeyError::Material(material.len()))?;
                *out = u8::from_str_radix(digits, 16)
                    .map_err(|_| KeyError::Material(material.len()))?;
            }
            return Ok(Self::from_array(bytes));
        }
        Err(KeyError::Material(material.len()))
    }

    /// The key as 64 hex digits and a newline, for a key file or a credential.
    pub fn to_hex(&self) -> String {
        let mut out = hex(&self.bytes);
        out.push('\n');
        out
    }

    /// The key's id.
    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// Wraps `data` for the file named by `identity`.
    pub fn wrap(
        &self,
        data: &DataKey,
        identity: &[u8],
        rng: &dyn SecureRandom,
    ) -> Result<Vec<u8>, KeyError> {
        self.seal_in(WRAP_CONTEXT, identity, &data.bytes, rng)
    }

    /// Unwraps the data key of the file named by `identity`.
    pub fn unwrap(&self, wrapped: &[u8], identity: &[u8]) -> Result<DataKey, KeyError> {
        if wrapped.len() != WRAPPED_LEN {
            return Err(KeyError::WrappedLength(wrapped.len()));
        }
        let opened = self
            .open_in(WRAP_CONTEXT, identity, wrapped.to_vec())
            .ok_or_else(|| KeyError::Unwrap { key_id: self.id.clone() })?;
        let bytes: [u8; KEY_LEN] = opened.as_slice().try_into().expect("32 bytes under the tag");
        Ok(DataKey { key: aead_key(&bytes), bytes })
    }

    /// Seals a small piece of data directly under the device key (AES-256-GCM, random
    /// nonce, `identity` as associated data): `nonce ‖ ciphertext ‖ tag`. For short-lived
    /// files such as the chunks of a transfer in progress, which a rotation may orphan
    /// (they are then fetched again), and for small secrets such as key files.
    pub fn seal_blob(
        &self,
        identity: &[u8],
        plaintext: &[u8],
        rng: &dyn SecureRandom,
    ) -> Result<Vec<u8>, KeyError> {
        self.seal_in(BLOB_CONTEXT, identity, plaintext, rng)
    }

    /// Opens what [`Self::seal_blob`] sealed for `identity`.
    pub fn open_blob(&self, identity: &[u8], sealed: Vec<u8>) -> Result<Vec<u8>, KeyError> {
        self.open_in(BLOB_CONTEXT, identity, sealed)
            .ok_or_else(|| KeyError::Blob { key_id: self.id.clone() })
    }

    /// `nonce ‖ ciphertext ‖ tag` of `plaintext`, with `context ‖ identity` as associated
    /// data, so a wrapped key and a blob can never stand in for each other.
    fn seal_in(
        &self,
        context: &[u8],
        identity: &[u8],
        plaintext: &[u8],
        rng: &dyn SecureRandom,
    ) -> Result<Vec<u8>, KeyError> {
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill(&mut nonce).map_err(|_| KeyError::Random)?;
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let aad = [context, identity].concat();
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut out[NONCE_LEN..],
            )
            .expect("a key or blob is far below AES-GCM's limit");
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// The plaintext of what [`Self::seal_in`] sealed under `context`, or `None` when it
    /// does not open (too short, altered, another key or identity).
    fn open_in(&self, context: &[u8], identity: &[u8], mut sealed: Vec<u8>) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().expect("length checked");
        let aad = [context, identity].concat();
        let len = self
            .key
            .open_within(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut sealed,
                NONCE_LEN..,
            )
            .ok()?
            .len();
        sealed.truncate(len);
        Some(sealed)
    }
}

/// The key that seals one file.
pub struct DataKey {
    bytes: [u8; KEY_LEN],
    key: LessSafeKey,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    /// A new random data key.
    pub fn generate(rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        let bytes = random_key(rng)?;
        Ok(Self { key: aead_key(&bytes), bytes })
    }
}

fn segment_nonce(index: u64, last: bool) -> Nonce {
    let mut nonce = [0u8; NONCE_LEN];
    nonce[3..11].copy_from_slice(&index.to_be_bytes());
    nonce[11] = u8::from(last);
    Nonce::assume_unique_for_key(nonce)
}

fn header(segment: usize) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..MAGIC.len()].copy_from_slice(MAGIC);
    out[MAGIC.len()..].copy_from_slice(&(segment as u32).to_le_bytes());
    out
}

/// Seals a file piece by piece: whole segments come out as soon as the next byte shows
/// they are not the last.
#[derive(Debug)]
pub struct Sealer {
    key: DataKey,
    aad: Vec<u8>,
    segment: usize,
    index: u64,
    pending: Vec<u8>,
}

impl Sealer {
    /// Starts sealing the file named by `identity` with [`SEGMENT`]-byte segments; the
    /// header is appended to `out`.
    pub fn new(key: DataKey, identity: &[u8], out: &mut Vec<u8>) -> Self {
        Self::with_segment(key, identity, SEGMENT, out)
    }

    /// [`Self::new`] with another segment size (within what readers accept; tests use
    /// small ones).
    ///
    /// # Panics
    /// If `segment` is outside 16 bytes to 16 MiB: a bug of the caller.
    pub fn with_segment(key: DataKey, identity: &[u8], segment: usize, out: &mut Vec<u8>) -> Self {
        assert!(SEGMENT_RANGE.contains(&segment), "segment size {segment} out of range");
        let header = header(segment);
        out.extend_from_slice(&header);
        let aad = [&header[..], identity].concat();
        Self { key, aad, segment, index: 0, pending: Vec::with_capacity(segment) }
    }

    fn seal(&mut self, last: bool, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.pending);
        let tag = self
            .key
            .key
            .seal_in_place_separate_tag(
                segment_nonce(self.index, last),
                Aad::from(&self.aad),
                &mut out[start..],
            )
            .expect("a segment is far below AES-GCM's limit");
        out.extend_from_slice(tag.as_ref());
        self.pending.clear();
        self.index += 1;
    }

    /// Takes the next plaintext bytes; appends every segment now known not to be the last.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        while !data.is_empty() {
            if self.pending.len() == self.segment {
                self.seal(false, out);
            }
            let take = (self.segment - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
    }

    /// Seals the last segment (empty only for an empty file); gives the key back, to be
    /// wrapped.
    pub fn finish(mut self, out: &mut Vec<u8>) -> DataKey {
        self.seal(true, out);
        self.key
    }
}

/// Seals all of `plaintext` at once.
pub fn seal(key: DataKey, identity: &[u8], plaintext: &[u8]) -> (Vec<u8>, DataKey) {
    let segments = plaintext.len() / SEGMENT + 1;
    let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + segments * TAG_LEN);
    let mut sealer = Sealer::new(key, identity, &mut out);
    sealer.push(plaintext, &mut out);
    let key = sealer.finish(&mut out);
    (out, key)
}

/// Opens a sealed file whose header and length are known: all of it at once, or any run
/// of its segments.
#[derive(Debug)]
pub struct Opener<'k> {
    key: &'k DataKey,
    aad: Vec<u8>,
    segment: usize,
    sealed_len: u64,
    segments: u64,
    plaintext_len: u64,
}

impl<'k> Opener<'k> {
    /// Reads the header (the first [`HEADER_LEN`] bytes, or more) of a sealed file of
    /// `sealed_len` bytes named by `identity`.
    pub fn new(
        key: &'k DataKey,
        identity: &[u8],
        head: &[u8],
        sealed_len: u64,
    ) -> Result<Self, OpenError> {
        let header = head.get(..HEADER_LEN).ok_or(OpenError::NotSealed)?;
        if &header[..MAGIC.len()] != MAGIC {
            return Err(OpenError::NotSealed);
        }
        let size = u32::from_le_bytes(header[MAGIC.len()..].try_into().expect("4 bytes"));
        if !SEGMENT_RANGE.contains(&(size as usize)) {
            return Err(OpenError::SegmentSize(size));
        }
        let segment = size as usize;
        let body = sealed_len.checked_sub(HEADER_LEN as u64).ok_or(OpenError::NotSealed)?;
        let whole = (segment + TAG_LEN) as u64;
        let (full, rest) = (body / whole, body % whole);
        let (segments, plaintext_len) = match rest {
            0 if full == 0 => return Err(OpenError::Truncated(sealed_len)),
            0 => (full, full * segment as u64),
            r if r < TAG_LEN as u64 => return Err(OpenError::Truncated(sealed_len)),
            r => (full + 1, full * segment as u64 + r - TAG_LEN as u64),
        };
        let aad = [header, identity].concat();
        Ok(Self { key, aad, segment, sealed_len, segments, plaintext_len })
    }

    /// The plaintext's length.
    pub fn plaintext_len(&self) -> u64 {
        self.plaintext_len
    }

    /// Where segment `index` lies in the sealed file.
    fn sealed_range(&self, index: u64) -> Range<u64> {
        let start = HEADER_LEN as u64 + index * (self.segment + TAG_LEN) as u64;
        start..(start + (self.segment + TAG_LEN) as u64).min(self.sealed_len)
    }

    /// The segments that hold plaintext bytes `range`, and where they lie in the sealed
    /// file; the plaintext of the first of them starts at `first * segment size`.
    pub fn segments_for(&self, range: Range<u64>) -> Result<(Range<u64>, Range<u64>), OpenError> {
        if range.start > range.end || range.end > self.plaintext_len {
            return Err(OpenError::OutOfRange {
                start: range.start,
                end: range.end,
                len: self.plaintext_len,
            });
        }
        let seg = self.segment as u64;
        let first = (range.start / seg).min(self.segments - 1);
        let last = if range.end == range.start { first } else { (range.end - 1) / seg };
        let last = last.min(self.segments - 1);
        let sealed = self.sealed_range(first).start..self.sealed_range(last).end;
        Ok((first..last + 1, sealed))
    }

    /// Opens plaintext bytes `range` given `sealed`, the sealed bytes of the segments
    /// [`Self::segments_for`] named for it.
    pub fn open_range(&self, range: Range<u64>, mut sealed: Vec<u8>) -> Result<Vec<u8>, OpenError> {
        let (segments, at) = self.segments_for(range.clone())?;
        if sealed.len() as u64 != at.end - at.start {
            return Err(OpenError::Truncated(self.sealed_len));
        }
        let base = at.start;
        let len = self.open_in_place(segments.clone(), &mut sealed, base)?;
        sealed.truncate(len);
        let skip = (range.start - segments.start * self.segment as u64) as usize;
        sealed.drain(..skip);
        sealed.truncate((range.end - range.start) as usize);
        Ok(sealed)
    }

    /// Opens the whole sealed file `sealed` (the header included) in place, returning
    /// its plaintext in the same allocation.
    pub fn open_all(&self, mut sealed: Vec<u8>) -> Result<Vec<u8>, OpenError> {
        if sealed.len() as u64 != self.sealed_len {
            return Err(OpenError::Truncated(sealed.len() as u64));
        }
        let len = self.open_in_place(0..self.segments, &mut sealed, 0)?;
        sealed.truncate(len);
        Ok(sealed)
    }

    /// Opens `segments`, held in `buf` (which starts at sealed offset `base`), moving each
    /// plaintext to the front; returns the plaintext's length.
    fn open_in_place(
        &self,
        segments: Range<u64>,
        buf: &mut [u8],
        base: u64,
    ) -> Result<usize, OpenError> {
        let mut plain_at = 0usize;
        for index in segments {
            let sealed = self.sealed_range(index);
            let (start, end) = ((sealed.start - base) as usize, (sealed.end - base) as usize);
            let last = index + 1 == self.segments;
            let opened = self
                .key
                .key
                .open_within(
                    segment_nonce(index, last),
                    Aad::from(&self.aad),
                    &mut buf[plain_at..end],
                    (start - plain_at)..,
                )
                .map_err(|_| OpenError::Tampered { index })?;
            plain_at += opened.len();
        }
        Ok(plain_at)
    }
}

/// Opens a whole sealed file at once.
pub fn open(key: &DataKey, identity: &[u8], sealed: Vec<u8>) -> Result<Vec<u8>, OpenError> {
    Opener::new(key, identity, &sealed, sealed.len() as u64)?.open_all(sealed)
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;

    use super::*;

    const ID: &[u8] = b"bundle m@1 sha";

    fn sealed_with(segment: usize, plaintext: &[u8]) -> (DataKey, Vec<u8>) {
        let key = DataKey::generate(&SystemRandom::new()).unwrap();
        let mut out = Vec::new();
        let mut sealer = Sealer::with_segment(key, ID, segment, &mut out);
        // Odd pieces, so that segment boundaries fall inside pushes.
        for piece in plaintext.chunks(7) {
            sealer.push(piece, &mut out);
        }
        let key = sealer.finish(&mut out);
        (key, out)
    }

    fn open_with(key: &DataKey, identity: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        open(key, identity, sealed.to_vec())
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn round_trips_at_every_length_around_segment_boundaries() {
        for len in [0, 1, 15, 16, 17, 31, 32, 33, 64, 100, 1000] {
            let plaintext = data(len);
            let (key, sealed) = sealed_with(16, &plaintext);
            let segments = len.div_ceil(16).max(1);
            assert_eq!(sealed.len(), HEADER_LEN + len + segments * TAG_LEN, "length {len}");
            assert_eq!(open_with(&key, ID, &sealed).unwrap(), plaintext, "length {len}");
        }
        let plaintext = data(3 * SEGMENT + 5);
        let key = DataKey::generate(&SystemRandom::new()).unwrap();
        let (sealed, key) = seal(key, ID, &plaintext);
        assert_eq!(open(&key, ID, sealed).unwrap(), plaintext);
    }

    #[test]
    fn an_empty_file_is_one_final_segment() {
        let (key, sealed) = sealed_with(16, b"");
        assert_eq!(sealed.len(), HEADER_LEN + TAG_LEN);
        assert_eq!(open_with(&key, ID, &sealed).unwrap(), b"");
        // A header alone is a cut file, not an empty one.
        assert_eq!(
            open_with(&key, ID, &sealed[..HEADER_LEN]),
            Err(OpenError::Truncated(HEADER_LEN as u64))
        );
    }

    #[test]
    fn truncation_is_detected_at_a_boundary_and_inside_a_segment() {
        let (key, sealed) = sealed_with(16, &data(48));
        let whole = 16 + TAG_LEN;
        // Cut after two whole segments: the second was not sealed as the last.
        let cut = &sealed[..HEADER_LEN + 2 * whole];
        assert_eq!(open_with(&key, ID, cut), Err(OpenError::Tampered { index: 1 }));
        // Cut inside the last segment.
        let cut = &sealed[..sealed.len() - 3];
        assert_eq!(open_with(&key, ID, cut), Err(OpenError::Tampered { index: 2 }));
        // Cut to less than a tag.
        let cut = &sealed[..HEADER_LEN + 2 * whole + 5];
        assert!(matches!(open_with(&key, ID, cut), Err(OpenError::Truncated(_))));
        // Extended with a segment's worth of bytes.
        let mut longer = sealed.clone();
        longer.extend_from_slice(&sealed[HEADER_LEN..HEADER_LEN + whole]);
        assert!(open_with(&key, ID, &longer).is_err());
    }

    #[test]
    fn reordered_segments_are_detected() {
        let (key, sealed) = sealed_with(16, &data(48));
        let whole = 16 + TAG_LEN;
        let mut swapped = sealed[..HEADER_LEN].to_vec();
        swapped.extend_from_slice(&sealed[HEADER_LEN + whole..HEADER_LEN + 2 * whole]);
        swapped.extend_from_slice(&sealed[HEADER_LEN..HEADER_LEN + whole]);
        swapped.extend_from_slice(&sealed[HEADER_LEN + 2 * whole..]);
        assert_eq!(open_with(&key, ID, &swapped), Err(OpenError::Tampered { index: 0 }));
    }

    #[test]
    fn every_flipped_bit_is_detected() {
        let (key, sealed) = sealed_with(16, &data(40));
        for byte in 0..sealed.len() {
            for bit in [0, 7] {
                let mut bad = sealed.clone();
                bad[byte] ^= 1 << bit;
                assert!(open_with(&key, ID, &bad).is_err(), "byte {byte} bit {bit}");
            }
        }
    }

    #[test]
    fn a_wrong_key_or_another_files_identity_is_refused() {
        let (key, sealed) = sealed_with(16, &data(40));
        let other = DataKey::generate(&SystemRandom::new()).unwrap();
        assert_eq!(open_with(&other, ID, &sealed), Err(OpenError::Tampered { index: 0 }));
        assert_eq!(
            open_with(&key, b"bundle m@2 sha", &sealed),
            Err(OpenError::Tampered { index: 0 })
        );
        assert_eq!(open_with(&key, ID, b"plain onnx bytes"), Err(OpenError::NotSealed));
    }

    #[test]
    fn swapped_files_and_their_keys_are_refused() {
        let rng = SystemRandom::new();
        let device = DeviceKey::generate(&rng).unwrap();
        let (a_id, b_id) = (b"bundle a@1".as_slice(), b"bundle b@1".as_slice());
        let (a_key, b_key) = (DataKey::generate(&rng).unwrap(), DataKey::generate(&rng).unwrap());
        let (a_wrapped, b_wrapped) =
            (device.wrap(&a_key, a_id, &rng).unwrap(), device.wrap(&b_key, b_id, &rng).unwrap());
        let (b_file, _) = seal(b_key, b_id, b"b's weights");
        // b's file where a's belongs: a's key does not open it.
        let a_key = device.unwrap(&a_wrapped, a_id).unwrap();
        assert!(open(&a_key, a_id, b_file.clone()).is_err());
        // b's file and b's wrapped key both moved to a's place: the key does not unwrap.
        assert_eq!(
            device.unwrap(&b_wrapped, a_id).unwrap_err(),
            KeyError::Unwrap { key_id: device.id().clone() }
        );
        let b_key = device.unwrap(&b_wrapped, b_id).unwrap();
        assert_eq!(open(&b_key, b_id, b_file).unwrap(), b"b's weights");
    }

    #[test]
    fn wrapping_round_trips_and_rotation_keeps_files_readable() {
        let rng = SystemRandom::new();
        let old = DeviceKey::generate(&rng).unwrap();
        let new = DeviceKey::generate(&rng).unwrap();
        assert_ne!(old.id(), new.id());
        let key = DataKey::generate(&rng).unwrap();
        let (file, key) = seal(key, ID, b"weights");
        let wrapped = old.wrap(&key, ID, &rng).unwrap();
        assert_eq!(wrapped.len(), WRAPPED_LEN);
        assert_eq!(
            new.unwrap(&wrapped, ID).unwrap_err(),
            KeyError::Unwrap { key_id: new.id().clone() }
        );
        let rewrapped = new.wrap(&old.unwrap(&wrapped, ID).unwrap(), ID, &rng).unwrap();
        let key = new.unwrap(&rewrapped, ID).unwrap();
        assert_eq!(open(&key, ID, file).unwrap(), b"weights");
        assert_eq!(old.unwrap(&wrapped[1..], ID).unwrap_err(), KeyError::WrappedLength(59));
    }

    #[test]
    fn blobs_round_trip_and_refuse_tampering_other_identities_and_keys() {
        let rng = SystemRandom::new();
        let key = DeviceKey::generate(&rng).unwrap();
        let sealed = key.seal_blob(b"chunk a", b"some weights", &rng).unwrap();
        assert_eq!(key.open_blob(b"chunk a", sealed.clone()).unwrap(), b"some weights");
        let refused = KeyError::Blob { key_id: key.id().clone() };
        assert_eq!(key.open_blob(b"chunk b", sealed.clone()).unwrap_err(), refused);
        for at in [0, NONCE_LEN, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[at] ^= 1;
            assert_eq!(key.open_blob(b"chunk a", bad).unwrap_err(), refused);
        }
        assert_eq!(key.open_blob(b"chunk a", sealed[..20].to_vec()).unwrap_err(), refused);
        let other = DeviceKey::generate(&rng).unwrap();
        assert!(other.open_blob(b"chunk a", sealed).is_err());
        let empty = key.seal_blob(b"e", b"", &rng).unwrap();
        assert_eq!(key.open_blob(b"e", empty).unwrap(), b"");
    }

    #[test]
    fn key_material_is_raw_or_hex_and_ids_are_stable() {
        let key = DeviceKey::generate(&SystemRandom::new()).unwrap();
        let again = DeviceKey::from_material(key.to_hex().as_bytes()).unwrap();
        assert_eq!(again.id(), key.id());
        assert_eq!(DeviceKey::from_material(&key.bytes).unwrap().id(), key.id());
        assert_eq!(key.id().as_str().len(), 16);
        assert_eq!(DeviceKey::from_material(b"short").unwrap_err(), KeyError::Material(5));
        let not_hex = "zz".repeat(KEY_LEN);
        assert!(DeviceKey::from_material(not_hex.as_bytes()).is_err());
    }

    #[test]
    fn ranges_open_only_the_segments_they_need() {
        let plaintext = data(100);
        let (key, sealed) = sealed_with(16, &plaintext);
        let opener = Opener::new(&key, ID, &sealed, sealed.len() as u64).unwrap();
        assert_eq!(opener.plaintext_len(), 100);
        for (start, end) in [
            (0, 0),
            (100, 100),
            (96, 96),
            (0, 100),
            (5, 6),
            (15, 17),
            (16, 32),
            (90, 100),
            (33, 97),
        ] {
            let (_, at) = opener.segments_for(start..end).unwrap();
            let part = sealed[at.start as usize..at.end as usize].to_vec();
            assert_eq!(
                opener.open_range(start..end, part).unwrap(),
                &plaintext[start as usize..end as usize],
                "{start}..{end}"
            );
        }
        assert!(matches!(opener.segments_for(90..101), Err(OpenError::OutOfRange { .. })));
        // A segment of the range tampered with is caught.
        let (_, at) = opener.segments_for(20..40).unwrap();
        let mut part = sealed[at.start as usize..at.end as usize].to_vec();
        part[40] ^= 1;
        assert!(matches!(opener.open_range(20..40, part), Err(OpenError::Tampered { .. })));
    }

    #[test]
    fn headers_naming_odd_segment_sizes_are_refused() {
        let (key, mut sealed) = sealed_with(16, &data(10));
        sealed[MAGIC.len()..HEADER_LEN].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(open_with(&key, ID, &sealed), Err(OpenError::SegmentSize(u32::MAX)));
        sealed[MAGIC.len()..HEADER_LEN].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(open_with(&key, ID, &sealed), Err(OpenError::SegmentSize(0)));
    }
}
