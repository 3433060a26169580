//! Ed25519 keys and signatures through ring, with domain separation.
//!
//! Every signature covers a [`Context`] tag followed by the message, so a signature made
//! for one kind of document (a bundle manifest) can never be replayed as another (a trust
//! root, a desired-state document), even though the same key may sign both.

use std::fmt;
use std::str::FromStr;

use ring::rand::SecureRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// What a signature is for; its tag is prefixed to the signed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// The manifest of a `.falaj` bundle.
    BundleManifest,
    /// The `signed` part of a trust root document.
    TrustRoot,
    /// A desired-state document for one agent.
    DesiredState,
    /// A checkpoint of an audit log's hash chain.
    AuditCheckpoint,
}

impl Context {
    fn tag(self) -> &'static [u8] {
        match self {
            Self::BundleManifest => b"falaj bundle manifest v1\0",
            Self::TrustRoot => b"falaj trust root v1\0",
            Self::DesiredState => b"falaj desired state v1\0",
            Self::AuditCheckpoint => b"falaj audit checkpoint v1\0",
        }
    }

    fn message(self, msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.tag().len() + msg.len());
        out.extend_from_slice(self.tag());
        out.extend_from_slice(msg);
        out
    }
}

/// Errors in key material read from outside.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The PKCS#8 document is not an Ed25519 private key.
    #[error("not an Ed25519 PKCS#8 private key: {0}")]
    Pkcs8(ring::error::KeyRejected),
    /// The random source failed while generating a key.
    #[error("the system random source failed")]
    Random,
    /// Text that should be hex of a given length is not.
    #[error("expected {expected} hex-encoded bytes, got {got:?}")]
    Hex {
        /// The byte length expected.
        expected: usize,
        /// The text received (truncated for display).
        got: String,
    },
}

fn decode_hex<const N: usize>(text: &str) -> Result<[u8; N], KeyError> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| KeyError::Hex { expected: N, got: text.chars().take(80).collect() })?;
    Ok(out)
}

macro_rules! hex_newtype {
    ($name:ident, $len:expr, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub [u8; $len]);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($name))
            }
        }

        impl FromStr for $name {
            type Err = KeyError;
            fn from_str(text: &str) -> Result<Self, KeyError> {
                decode_hex(text).map(Self)
            }
        }

        /// Hex in human-readable formats (JSON), raw bytes in binary ones (postcard).
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    serializer.collect_str(self)
                } else {
                    serializer.serialize_bytes(&self.0)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                if deserializer.is_human_readable() {
                    let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                    text.parse().map_err(serde::de::Error::custom)
                } else {
                    let bytes = serde_bytes::ByteBuf::deserialize(deserializer)?;
                    let array = <[u8; $len]>::try_from(bytes.as_slice()).map_err(|_| {
                        serde::de::Error::invalid_length(bytes.len(), &stringify!($len))
                    })?;
                    Ok(Self(array))
                }
            }
        }
    };
}

hex_newtype!(KeyId, 32, "A key's identifier: the SHA-256 of its raw public key.");
hex_newtype!(PublicKey, PUBLIC_KEY_LEN, "A raw Ed25519 public key.");
hex_newtype!(Signature, SIGNATURE_LEN, "A raw Ed25519 signature.");
hex_newtype!(Sha256, 32, "A SHA-256 digest.");

impl Sha256 {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_digest(&ring::digest::digest(&ring::digest::SHA256, bytes))
    }

    /// Converts a finished ring SHA-256 digest.
    pub fn from_digest(digest: &ring::digest::Digest) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }

    /// The first 12 hex digits, for display.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl KeyId {
    /// The first 12 hex digits, for display and file names.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl PublicKey {
    /// The key's identifier.
    pub fn id(&self) -> KeyId {
        KeyId(Sha256::of(&self.0).0)
    }

    /// Whether `signature` is this key's signature of `msg` in `context`.
    pub fn verify(&self, context: Context, msg: &[u8], signature: &Signature) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&context.message(msg), &signature.0)
            .is_ok()
    }
}

/// An Ed25519 private key, held in memory.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.public().id())
    }
}

impl SigningKey {
    /// Generates a key; returns it with its PKCS#8 (v2) encoding, which is what is stored.
    pub fn generate(rng: &dyn SecureRandom) -> Result<(Self, Vec<u8>), KeyError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(rng).map_err(|_| KeyError::Random)?;
        let key = Self::from_pkcs8(pkcs8.as_ref())?;
        Ok((key, pkcs8.as_ref().to_vec()))
    }

    /// The key whose private seed is `seed`: for deterministic fixtures, never for keys
    /// that protect anything.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32 bytes are a seed");
        Self { pair }
    }

    /// Reads a key from its PKCS#8 encoding.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, KeyError> {
        Ed25519KeyPair::from_pkcs8(pkcs8).map(|pair| Self { pair }).map_err(KeyError::Pkcs8)
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        let mut out = [0u8; PUBLIC_KEY_LEN];
        out.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(out)
    }

    /// Signs `msg` for `context`.
    pub fn sign(&self, context: Context, msg: &[u8]) -> Signature {
        let sig = self.pair.sign(&context.message(msg));
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(sig.as_ref());
        Signature(out)
    }
}

/// One signature as it is stored beside a signed document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    /// The signing key's identifier.
    pub keyid: KeyId,
    /// The signature.
    pub sig: Signature,
}

impl SignatureEntry {
    /// Signs `msg` for `context` with `key`.
    pub fn sign(key: &SigningKey, context: Context, msg: &[u8]) -> Self {
        Self { keyid: key.public().id(), sig: key.sign(context, msg) }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    /// A fresh random key, for tests.
    pub(crate) fn key() -> SigningKey {
        SigningKey::generate(&SystemRandom::new()).unwrap().0
    }

    #[test]
    fn signatures_are_bound_to_their_context() {
        let key = key();
        let sig = key.sign(Context::BundleManifest, b"hello");
        assert!(key.public().verify(Context::BundleManifest, b"hello", &sig));
        assert!(!key.public().verify(Context::TrustRoot, b"hello", &sig));
        assert!(!key.public().verify(Context::BundleManifest, b"hellO", &sig));
    }

    #[test]
    fn pkcs8_round_trip_keeps_the_key() {
        let (key, pkcs8) = SigningKey::generate(&SystemRandom::new()).unwrap();
        let again = SigningKey::from_pkcs8(&pkcs8).unwrap();
        assert_eq!(key.public(), again.public());
        assert!(SigningKey::from_pkcs8(&pkcs8[1..]).is_err());
    }

    #[test]
    fn hex_forms_are_checked() {
        let id = key().public().id();
        assert_eq!(id.to_string().parse::<KeyId>().unwrap(), id);
        assert!("abcd".parse::<KeyId>().is_err());
        assert!(serde_json::from_str::<Signature>("\"zz\"").is_err());
    }
}
