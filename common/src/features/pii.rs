//! What a snapshot carries of each feature: personal data is pseudonymised with a keyed
//! hash (the region's key) or dropped, by policy, and a snapshot that would carry it raw is
//! refused.
//!
//! The region's key has versions ([`Keyring`]): after a rotation, snapshots hash with the
//! new version and, for a stated overlap, also carry each pseudonym under the versions
//! before it, in a column of its own ([`companion_name`]), so data pseudonymised before
//! the rotation can still be joined with data after it.

use ring::hmac;
use thiserror::Error;

use super::value::Value;
use super::view::{FeatureView, PiiPolicy};

/// Bytes of the HMAC-SHA256 kept in a pseudonym (128 bits).
const PSEUDONYM_BYTES: usize = 16;

/// What happens to one feature on its way into a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Carried as it is (not personal data).
    Raw,
    /// Replaced by its keyed hash.
    Hash,
    /// Left out.
    Drop,
}

/// Why a snapshot was refused for personal data.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PiiError {
    /// PII-tagged features without a policy, and none given for the snapshot.
    #[error(
        "view {view:?}: features {features:?} are personal data without a pii_policy; give one in the view or pass --pii hash|drop, raw personal data never leaves the region"
    )]
    NoPolicy {
        /// The view.
        view: String,
        /// The features.
        features: Vec<String>,
    },
}

/// Decides each feature's treatment: the view's policy, else `fallback`; PII without
/// either refuses the snapshot, naming every such feature.
pub fn plan(view: &FeatureView, fallback: Option<PiiPolicy>) -> Result<Vec<Treatment>, PiiError> {
    let mut unhandled = Vec::new();
    let plan = view
        .features
        .iter()
        .map(|f| match (f.pii, f.pii_policy.or(fallback)) {
            (false, _) => Treatment::Raw,
            (true, Some(PiiPolicy::Hash)) => Treatment::Hash,
            (true, Some(PiiPolicy::Drop)) => Treatment::Drop,
            (true, None) => {
                unhandled.push(f.name.clone());
                Treatment::Drop
            }
        })
        .collect();
    if unhandled.is_empty() {
        Ok(plan)
    } else {
        Err(PiiError::NoPolicy { view: view.name.clone(), features: unhandled })
    }
}

/// Keyed hashing of personal data with one region's key.
#[derive(Clone)]
pub struct Pseudonymiser {
    key: hmac::Key,
}

impl Pseudonymiser {
    /// A pseudonymiser with the region's secret key bytes.
    pub fn new(secret: &[u8]) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, secret) }
    }

    /// The pseudonym of `value` in feature `feature` (so equal values of different features
    /// do not share pseudonyms); null stays null.
    pub fn pseudonym(&self, feature: &str, value: &Value) -> Value {
        if *value == Value::Null {
            return Value::Null;
        }
        let mut context = hmac::Context::with_key(&self.key);
        context.update(feature.as_bytes());
        context.update(&[0]);
        context.update(value.canonical_text().as_bytes());
        let tag = context.sign();
        Value::Str(format!("p:{}", hex::encode(&tag.as_ref()[..PSEUDONYM_BYTES])))
    }
}

impl std::fmt::Debug for Pseudonymiser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymiser(..)")
    }
}

/// What marks a companion column's name; views may not use it in feature names.
pub const COMPANION_MARK: &str = "__pii_v";
/// The longest name of a personal-data feature: its companions' names (up to ten digits
/// of version after [`COMPANION_MARK`]) must still be column names.
pub const MAX_PII_NAME_LEN: usize = super::view::MAX_FEATURE_NAME_LEN - COMPANION_MARK.len() - 10;

/// The name of the column that carries feature `feature` pseudonymised with key version
/// `version`, beside the current one, during that version's overlap
/// (`technician__pii_v1`): a column name every agent accepts, and one no feature of a
/// view may have.
pub fn companion_name(feature: &str, version: u32) -> String {
    format!("{feature}{COMPANION_MARK}{version}")
}

/// The region's pseudonymisation keys: the current version, and older versions still in
/// their overlap, newest first.
#[derive(Debug, Clone)]
pub struct Keyring {
    current: (u32, Pseudonymiser),
    overlapping: Vec<(u32, Pseudonymiser)>,
}

impl Keyring {
    /// A keyring whose current key is version `version` with `secret`.
    pub fn new(version: u32, secret: &[u8]) -> Self {
        Self { current: (version, Pseudonymiser::new(secret)), overlapping: Vec::new() }
    }

    /// Adds an older version still in its overlap (give them newest first).
    #[must_use]
    pub fn with_overlapping(mut self, version: u32, secret: &[u8]) -> Self {
        self.overlapping.push((version, Pseudonymiser::new(secret)));
        self
    }

    /// The current version.
    pub fn current_version(&self) -> u32 {
        self.current.0
    }

    /// The older versions still in their overlap, newest first.
    pub fn overlapping_versions(&self) -> Vec<u32> {
        self.overlapping.iter().map(|(v, _)| *v).collect()
    }

    /// Every version's pseudonymiser, the current one first.
    pub fn pseudonymisers(&self) -> impl Iterator<Item = &Pseudonymiser> {
        std::iter::once(&self.current.1).chain(self.overlapping.iter().map(|(_, p)| p))
    }
}
