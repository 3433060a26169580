//! Feature snapshots: what a snapshot bundle's manifest says it carries (the view, its
//! version, the features as carried, the time and the scope).

use serde::{Deserialize, Serialize};

use super::pii::{Keyring, Treatment, companion_name};
use super::view::{Entity, FeatureType, FeatureView};
use crate::time::Timestamp;

/// The manifest content of a snapshot bundle: `{"features": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSpec {
    /// The payload file holding the rows.
    pub file: String,
    /// How the rows are encoded.
    pub format: SnapshotFormat,
    /// The view.
    pub view: String,
    /// The view's version.
    pub view_version: u64,
    /// The entity key.
    pub entity: Entity,
    /// The features carried, in column order.
    pub features: Vec<SnapshotFeature>,
    /// Values are the latest at or before this time.
    pub as_of: Timestamp,
    /// Entities carried.
    pub entities: u64,
    /// How the entities were chosen, as the operator gave it (`all` when not narrowed).
    pub scope: String,
}

/// The encoding of a snapshot payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotFormat {
    /// One postcard record per entity, in key order (`features::table`).
    #[serde(rename = "postcard-rows-1")]
    PostcardRows,
}

/// One feature as a snapshot carries it. (Flattening the type rules out refusing unknown
/// keys here; the manifest around it still refuses them.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotFeature {
    /// The name.
    pub name: String,
    /// The type carried (a pseudonymised feature is a string).
    #[serde(flatten)]
    pub kind: FeatureType,
    /// Whether it may be null.
    pub nullable: bool,
    /// Served in place of a missing value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<toml::Value>,
    /// Whether the values are keyed hashes of personal data.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pseudonymised: bool,
    /// The version of the region's key that made them, for a pseudonymised feature of a
    /// snapshot that names it (snapshots made before keys had versions do not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pii_key: Option<u32>,
}

impl SnapshotSpec {
    /// The spec of a snapshot of `view` with each feature treated as `treatments` says.
    pub fn new(
        view: &FeatureView,
        view_version: u64,
        treatments: &[Treatment],
        as_of: Timestamp,
        scope: &str,
    ) -> Self {
        let features = view
            .features
            .iter()
            .zip(treatments)
            .filter(|(_, t)| **t != Treatment::Drop)
            .map(|(f, t)| {
                let hashed = *t == Treatment::Hash;
                SnapshotFeature {
                    name: f.name.clone(),
                    kind: if hashed { FeatureType::String } else { f.kind.clone() },
                    nullable: f.nullable,
                    default: if hashed { None } else { f.default.clone() },
                    pseudonymised: hashed,
                    pii_key: None,
                }
            })
            .collect();
        Self {
            file: "features.rows".to_owned(),
            format: SnapshotFormat::PostcardRows,
            view: view.name.clone(),
            view_version,
            entity: view.entity.clone(),
            features,
            as_of,
            entities: 0,
            scope: scope.to_owned(),
        }
    }

    /// The spec with its pseudonymised features naming `keyring`'s current version, each
    /// followed by one column per older version still in its overlap
    /// ([`companion_name`]), in the order
    /// [`SnapshotWriter::with_keyring`](super::SnapshotWriter) writes them.
    #[must_use]
    pub fn with_keyring(mut self, keyring: &Keyring) -> Self {
        let mut features = Vec::with_capacity(self.features.len());
        for mut feature in self.features {
            if !feature.pseudonymised {
                features.push(feature);
                continue;
            }
            feature.pii_key = Some(keyring.current_version());
            let companions: Vec<SnapshotFeature> = keyring
                .overlapping_versions()
                .into_iter()
                .map(|version| SnapshotFeature {
                    name: companion_name(&feature.name, version),
                    pii_key: Some(version),
                    ..feature.clone()
                })
                .collect();
            features.push(feature);
            features.extend(companions);
        }
        self.features = features;
        self
    }

    /// The index of feature `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.features.iter().position(|f| f.name == name)
    }
}
