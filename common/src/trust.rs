//! The trust root: TUF-style root metadata that pins which keys may sign bundles.
//!
//! `root.json` is `{"signed": RootMetadata, "signatures": [...]}`. The signatures cover
//! the canonical JSON of `signed` (the struct's own field order, keys sorted, no spaces)
//! under [`Context::TrustRoot`]. A trust root must carry enough valid signatures of its
//! own `root` role to meet that role's threshold; a new version replaces an old one only
//! when both the old and the new root role sign it (see [`TrustRoot::update`]).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::keys::{Context, KeyId, PublicKey, SignatureEntry, SigningKey};
use crate::names::{self, NameError};
use crate::time::Timestamp;

/// The only `spec_version` this build understands.
pub const SPEC_VERSION: u32 = 1;
/// Largest `root.json` accepted.
pub const MAX_ROOT_BYTES: usize = 256 * 1024;

/// A public key as listed in the root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// Always `ed25519`.
    pub keytype: String,
    /// The raw public key.
    pub public: PublicKey,
}

/// A role: the keys that may sign for it and how many of them must.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// The keys of the role.
    pub keyids: Vec<KeyId>,
    /// How many distinct keys of the role must sign.
    pub threshold: u32,
}

/// The roles a trust root defines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Roles {
    /// Signs trust roots (and their successors).
    pub root: Role,
    /// Signs bundle manifests.
    pub signing: Role,
}

/// The signed part of `root.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootMetadata {
    /// Always `root`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The metadata format, [`SPEC_VERSION`].
    pub spec_version: u32,
    /// Increases by one with each new root.
    pub version: u64,
    /// The region whose control plane this root belongs to.
    pub region: String,
    /// After this the root is no longer accepted for new bundles.
    pub expires: Timestamp,
    /// Every key of every role.
    pub keys: BTreeMap<KeyId, KeyEntry>,
    /// The roles.
    pub roles: Roles,
}

/// `root.json` as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootDocument {
    /// What is signed.
    pub signed: RootMetadata,
    /// Signatures over the canonical JSON of `signed`.
    pub signatures: Vec<SignatureEntry>,
}

/// Why a trust root was refused.
#[derive(Debug, Error)]
pub enum TrustError {
    /// Larger than [`MAX_ROOT_BYTES`].
    #[error("trust root is {size} bytes, more than the {MAX_ROOT_BYTES} allowed")]
    Oversized {
        /// Its size.
        size: usize,
    },
    /// Not valid JSON of the expected shape.
    #[error("trust root is malformed: {0}")]
    Malformed(String),
    /// A field breaks a rule (unknown role key, zero threshold...).
    #[error("trust root is invalid: {0}")]
    Invalid(String),
    /// A bad region name.
    #[error("trust root: {0}")]
    Region(#[from] NameError),
    /// Too few valid signatures of the root role.
    #[error(
        "trust root version {version}: {valid} valid root signature(s), threshold is {threshold}"
    )]
    ThresholdNotMet {
        /// The root's version.
        version: u64,
        /// Distinct valid signatures found.
        valid: usize,
        /// Signatures needed.
        threshold: u32,
    },
    /// The root has expired.
    #[error("trust root version {version} expired at {expires}")]
    Expired {
        /// The root's version.
        version: u64,
        /// When it expired.
        expires: Timestamp,
    },
    /// A successor root does not follow the current one.
    #[error(
        "trust root version {got} cannot follow version {current}: versions must increase by one"
    )]
    NotSuccessor {
        /// The version held.
        current: u64,
        /// The version offered.
        got: u64,
    },
    /// A successor root is not signed by a threshold of its predecessor's root keys.
    #[error(
        "trust root version {version} is signed by {valid} of version {previous}'s root keys, \
         {threshold} are needed"
    )]
    NotSignedByPrevious {
        /// The successor's version.
        version: u64,
        /// The version it would follow.
        previous: u64,
        /// Distinct valid signatures by the previous root's keys.
        valid: usize,
        /// Signatures the previous root requires.
        threshold: u32,
    },
    /// A successor root is for another region.
    #[error("trust root is for region {got:?}, this one is for {expected:?}")]
    WrongRegion {
        /// The region held.
        expected: String,
        /// The region offered.
        got: String,
    },
}

/// Canonical bytes of the signed part: the bytes every root signature covers.
pub fn canonical_bytes(signed: &RootMetadata) -> Vec<u8> {
    serde_json::to_vec(signed).expect("root metadata always serialises")
}

impl Role {
    fn check(&self, name: &str, keys: &BTreeMap<KeyId, KeyEntry>) -> Result<(), TrustError> {
        let distinct: BTreeSet<_> = self.keyids.iter().collect();
        if distinct.len() != self.keyids.len() {
            return Err(TrustError::Invalid(format!("role {name} lists a key twice")));
        }
        if let Some(missing) = self.keyids.iter().find(|id| !keys.contains_key(id)) {
            return Err(TrustError::Invalid(format!(
                "role {name} names key {missing} which is not listed"
            )));
        }
        if self.threshold == 0 || self.threshold as usize > self.keyids.len() {
            return Err(TrustError::Invalid(format!(
                "role {name} has threshold {} with {} key(s)",
                self.threshold,
                self.keyids.len()
            )));
        }
        Ok(())
    }

    /// The distinct keys of this role whose signature over `msg` is valid.
    fn valid_signers(
        &self,
        keys: &BTreeMap<KeyId, KeyEntry>,
        context: Context,
        msg: &[u8],
        signatures: &[SignatureEntry],
    ) -> BTreeSet<KeyId> {
        signatures
            .iter()
            .filter(|s| self.keyids.contains(&s.keyid))
            .filter(|s| keys.get(&s.keyid).is_some_and(|k| k.public.verify(context, msg, &s.sig)))
            .map(|s| s.keyid)
            .collect()
    }
}

/// Why signatures by the signing role were refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignatureError {
    /// A signature names a key that is not a signing key of the trust root.
    #[error("signed by key {keyid}, which is not a signing key of the trust root")]
    UnknownKey {
        /// The key.
        keyid: KeyId,
    },
    /// A signing key's signature does not match the document.
    #[error("signature by key {keyid} does not match")]
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
}

/// A verified trust root: its signatures met the root threshold when it was read.
#[derive(Debug, Clone)]
pub struct TrustRoot {
    document: RootDocument,
}

impl TrustRoot {
    /// Reads and verifies `root.json`: shape, roles, self-signature at threshold and
    /// expiry against `now`.
    pub fn from_json(bytes: &[u8], now: SystemTime) -> Result<Self, TrustError> {
        let root = Self::from_json_unexpired(bytes)?;
        root.check_expiry(now)?;
        Ok(root)
    }

    /// Like [`Self::from_json`] without the expiry check: for a root already pinned,
    /// whose expiry matters when new bundles arrive, not when stored ones are served.
    pub fn from_json_unexpired(bytes: &[u8]) -> Result<Self, TrustError> {
        if bytes.len() > MAX_ROOT_BYTES {
            return Err(TrustError::Oversized { size: bytes.len() });
        }
        let document: RootDocument =
            serde_json::from_slice(bytes).map_err(|e| TrustError::Malformed(e.to_string()))?;
        let signed = &document.signed;
        if signed.kind != "root" {
            return Err(TrustError::Invalid(format!(
                "type is {:?}, expected \"root\"",
                signed.kind
            )));
        }
        if signed.spec_version != SPEC_VERSION {
            return Err(TrustError::Invalid(format!(
                "spec_version {} is not supported (this build reads {SPEC_VERSION})",
                signed.spec_version
            )));
        }
        names::check_region(&signed.region)?;
        for (id, key) in &signed.keys {
            if key.keytype != "ed25519" {
                return Err(TrustError::Invalid(format!("key {id} has keytype {:?}", key.keytype)));
            }
            if key.public.id() != *id {
                return Err(TrustError::Invalid(format!(
                    "key {id} is listed under another key's id"
                )));
            }
        }
        signed.roles.root.check("root", &signed.keys)?;
        signed.roles.signing.check("signing", &signed.keys)?;
        let root = Self { document };
        root.check_signed_by(&root.document.signed.roles.root, &root.document.signed.keys)?;
        Ok(root)
    }

    fn check_signed_by(
        &self,
        role: &Role,
        keys: &BTreeMap<KeyId, KeyEntry>,
    ) -> Result<(), TrustError> {
        let msg = canonical_bytes(&self.document.signed);
        let valid = role.valid_signers(keys, Context::TrustRoot, &msg, &self.document.signatures);
        if valid.len() < role.threshold as usize {
            return Err(TrustError::ThresholdNotMet {
                version: self.version(),
                valid: valid.len(),
                threshold: role.threshold,
            });
        }
        Ok(())
    }

    /// Fails if the root has expired at `now`.
    pub fn check_expiry(&self, now: SystemTime) -> Result<(), TrustError> {
        let expires = self.document.signed.expires;
        if Timestamp::from_system(now) >= expires {
            return Err(TrustError::Expired { version: self.version(), expires });
        }
        Ok(())
    }

    /// Verifies `bytes` as the successor of this root (TUF root rotation) and that it has
    /// not expired at `now`.
    pub fn update(&self, bytes: &[u8], now: SystemTime) -> Result<Self, TrustError> {
        let next = self.successor(bytes)?;
        next.check_expiry(now)?;
        Ok(next)
    }

    /// Verifies `chain` as this root's successors, in order (TUF root rotation): each is
    /// the next version of the one before, for the same region, signed at threshold by the
    /// previous root's root keys *and* by its own. Roots in the middle may have expired (an
    /// agent offline through several rotations catches up); the last may not at `now`.
    /// Returns every successor, oldest first, to be kept in that order.
    pub fn follow<B: AsRef<[u8]>>(
        &self,
        chain: &[B],
        now: SystemTime,
    ) -> Result<Vec<TrustRoot>, TrustError> {
        let mut roots: Vec<TrustRoot> = Vec::with_capacity(chain.len());
        for bytes in chain {
            let next = roots.last().unwrap_or(self).successor(bytes.as_ref())?;
            roots.push(next);
        }
        if let Some(last) = roots.last() {
            last.check_expiry(now)?;
        }
        Ok(roots)
    }

    /// `bytes` as this root's next version, its expiry unchecked.
    fn successor(&self, bytes: &[u8]) -> Result<Self, TrustError> {
        let next = Self::from_json_unexpired(bytes)?;
        if next.version() != self.version() + 1 {
            return Err(TrustError::NotSuccessor { current: self.version(), got: next.version() });
        }
        if next.region() != self.region() {
            return Err(TrustError::WrongRegion {
                expected: self.region().to_owned(),
                got: next.region().to_owned(),
            });
        }
        let previous = &self.document.signed;
        let msg = canonical_bytes(&next.document.signed);
        let valid = previous.roles.root.valid_signers(
            &previous.keys,
            Context::TrustRoot,
            &msg,
            &next.document.signatures,
        );
        if valid.len() < previous.roles.root.threshold as usize {
            return Err(TrustError::NotSignedByPrevious {
                version: next.version(),
                previous: self.version(),
                valid: valid.len(),
                threshold: previous.roles.root.threshold,
            });
        }
        Ok(next)
    }

    /// When this root expires.
    pub fn expires(&self) -> Timestamp {
        self.document.signed.expires
    }

    /// The metadata.
    pub fn metadata(&self) -> &RootMetadata {
        &self.document.signed
    }

    /// The root's version.
    pub fn version(&self) -> u64 {
        self.document.signed.version
    }

    /// The root's region.
    pub fn region(&self) -> &str {
        &self.document.signed.region
    }

    /// Checks signatures of the signing role over `msg`: every signature must be by a
    /// signing key of this root and valid, and distinct valid keys must meet the threshold.
    pub fn check_signing(
        &self,
        context: Context,
        msg: &[u8],
        signatures: &[SignatureEntry],
    ) -> Result<(), SignatureError> {
        let role = self.signing_role();
        let mut valid = BTreeSet::new();
        for entry in signatures {
            let key = role
                .keyids
                .contains(&entry.keyid)
                .then(|| self.key(&entry.keyid))
                .flatten()
                .ok_or(SignatureError::UnknownKey { keyid: entry.keyid })?;
            if !key.verify(context, msg, &entry.sig) {
                return Err(SignatureError::BadSignature { keyid: entry.keyid });
            }
            valid.insert(entry.keyid);
        }
        if valid.len() < role.threshold as usize {
            return Err(SignatureError::ThresholdNotMet {
                valid: valid.len(),
                threshold: role.threshold,
            });
        }
        Ok(())
    }

    /// The role that signs bundles.
    pub fn signing_role(&self) -> &Role {
        &self.document.signed.roles.signing
    }

    /// The public key with this id, if the root lists it.
    pub fn key(&self, id: &KeyId) -> Option<&PublicKey> {
        self.document.signed.keys.get(id).map(|k| &k.public)
    }

    /// The document as pretty JSON, to be written to `root.json`.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(&self.document).expect("root document always serialises")
    }
}

/// What a new trust root should contain.
#[derive(Debug)]
pub struct RootSpec<'a> {
    /// Its version (1 for a new root).
    pub version: u64,
    /// Its region.
    pub region: &'a str,
    /// Its expiry.
    pub expires: Timestamp,
    /// The root role's keys; all of them sign the document.
    pub root_keys: &'a [SigningKey],
    /// How many root keys must sign.
    pub root_threshold: u32,
    /// The public keys of the bundle-signing role.
    pub signing_keys: &'a [PublicKey],
    /// How many signing keys must sign a bundle.
    pub signing_threshold: u32,
}

impl RootSpec<'_> {
    /// Builds and signs the root with every root key; checks it as an agent would.
    pub fn sign(&self, extra_signers: &[SigningKey]) -> Result<TrustRoot, TrustError> {
        names::check_region(self.region)?;
        let entry =
            |public: PublicKey| (public.id(), KeyEntry { keytype: "ed25519".into(), public });
        let root_ids: Vec<_> = self.root_keys.iter().map(|k| k.public().id()).collect();
        let signing_ids: Vec<_> = self.signing_keys.iter().map(PublicKey::id).collect();
        let signed = RootMetadata {
            kind: "root".into(),
            spec_version: SPEC_VERSION,
            version: self.version,
            region: self.region.to_owned(),
            expires: self.expires,
            keys: self
                .root_keys
                .iter()
                .map(SigningKey::public)
                .chain(self.signing_keys.iter().copied())
                .map(entry)
                .collect(),
            roles: Roles {
                root: Role { keyids: root_ids, threshold: self.root_threshold },
                signing: Role { keyids: signing_ids, threshold: self.signing_threshold },
            },
        };
        let msg = canonical_bytes(&signed);
        let signatures = self
            .root_keys
            .iter()
            .chain(extra_signers)
            .map(|k| SignatureEntry::sign(k, Context::TrustRoot, &msg))
            .collect();
        let bytes = serde_json::to_vec(&RootDocument { signed, signatures })
            .expect("root document always serialises");
        TrustRoot::from_json_unexpired(&bytes)
    }
}

/// The default lifetime of a new trust root.
pub const DEFAULT_ROOT_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::tests::key;

    const NOW: u64 = 1_800_000_000;

    fn now() -> SystemTime {
        Timestamp::from_unix(NOW).to_system()
    }

    fn spec<'a>(root_keys: &'a [SigningKey], signing: &'a [PublicKey]) -> RootSpec<'a> {
        RootSpec {
            version: 1,
            region: "eu-west-1",
            expires: Timestamp::from_unix(NOW + 1000),
            root_keys,
            root_threshold: 2,
            signing_keys: signing,
            signing_threshold: 1,
        }
    }

    #[test]
    fn signed_root_round_trips() {
        let roots = [key(), key()];
        let signing = [key().public()];
        let root = spec(&roots, &signing).sign(&[]).unwrap();
        let again = TrustRoot::from_json(&root.to_json(), now()).unwrap();
        assert_eq!(again.metadata(), root.metadata());
        assert_eq!(again.signing_role().keyids, vec![signing[0].id()]);
    }

    #[test]
    fn refuses_below_threshold_tampered_and_expired() {
        let roots = [key(), key()];
        let signing = [key().public()];
        let root = spec(&roots, &signing).sign(&[]).unwrap();
        let mut doc: RootDocument = serde_json::from_slice(&root.to_json()).unwrap();

        let mut one_sig = doc.clone();
        one_sig.signatures.truncate(1);
        let err = TrustRoot::from_json(&serde_json::to_vec(&one_sig).unwrap(), now()).unwrap_err();
        assert!(matches!(err, TrustError::ThresholdNotMet { valid: 1, threshold: 2, .. }), "{err}");

        let mut dup = doc.clone();
        dup.signatures[1] = dup.signatures[0].clone();
        let err = TrustRoot::from_json(&serde_json::to_vec(&dup).unwrap(), now()).unwrap_err();
        assert!(matches!(err, TrustError::ThresholdNotMet { valid: 1, .. }), "{err}");

        doc.signed.expires = Timestamp::from_unix(NOW + 10_000);
        let err = TrustRoot::from_json(&serde_json::to_vec(&doc).unwrap(), now()).unwrap_err();
        assert!(matches!(err, TrustError::ThresholdNotMet { valid: 0, .. }), "{err}");

        let later = Timestamp::from_unix(NOW + 1000).to_system();
        let err = TrustRoot::from_json(&root.to_json(), later).unwrap_err();
        assert!(matches!(err, TrustError::Expired { .. }), "{err}");
    }

    #[test]
    fn refuses_malformed_and_inconsistent_roots() {
        let roots = [key(), key()];
        let signing = [key().public()];
        let mut bad = spec(&roots, &signing);
        bad.signing_threshold = 2;
        assert!(matches!(bad.sign(&[]), Err(TrustError::Invalid(_))));
        assert!(matches!(TrustRoot::from_json(b"{", now()), Err(TrustError::Malformed(_))));
        let huge = vec![b' '; MAX_ROOT_BYTES + 1];
        assert!(matches!(TrustRoot::from_json(&huge, now()), Err(TrustError::Oversized { .. })));
    }

    #[test]
    fn rotation_needs_old_and_new_root_keys() {
        let old_keys = [key(), key()];
        let new_keys = [key(), key()];
        let signing = [key().public()];
        let current = spec(&old_keys, &signing).sign(&[]).unwrap();

        let mut next_spec = spec(&new_keys, &signing);
        next_spec.version = 2;
        let only_new = next_spec.sign(&[]).unwrap();
        let err = current.update(&only_new.to_json(), now()).unwrap_err();
        assert!(matches!(err, TrustError::NotSignedByPrevious { valid: 0, .. }), "{err}");

        let cross_signed = next_spec.sign(&old_keys).unwrap();
        let next = current.update(&cross_signed.to_json(), now()).unwrap();
        assert_eq!(next.version(), 2);

        next_spec.version = 3;
        let skipped = next_spec.sign(&old_keys).unwrap();
        let err = current.update(&skipped.to_json(), now()).unwrap_err();
        assert!(matches!(err, TrustError::NotSuccessor { current: 1, got: 3 }), "{err}");
    }
}
