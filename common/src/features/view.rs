//! Feature views as code: the TOML declaration, its checks, and whether a change to a view
//! keeps its stored data readable (the same version) or needs a new version.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::names::{self, NameError};

/// Longest feature or entity name, in bytes.
pub const MAX_FEATURE_NAME_LEN: usize = 64;
/// Most features in one view.
pub const MAX_FEATURES: usize = 1024;

/// A feature view: an entity key, an event time, and typed features, as declared in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureView {
    /// The view's name (the rules of model names).
    pub name: String,
    /// What the view holds.
    #[serde(default)]
    pub description: String,
    /// The entity the features describe.
    pub entity: Entity,
    /// The column of ingested files that holds each row's event time.
    pub timestamp: String,
    /// The features, in the order snapshots and exports carry them.
    pub features: Vec<Feature>,
}

/// The entity key of a view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entity {
    /// The key's column name.
    pub name: String,
    /// The key's type.
    #[serde(rename = "type")]
    pub kind: KeyType,
}

/// The type of an entity key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyType {
    /// Text.
    String,
    /// A 64-bit integer.
    I64,
}

/// One feature of a view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "FeatureRecord", into = "FeatureRecord")]
pub struct Feature {
    /// The feature's column name.
    pub name: String,
    /// Its type.
    pub kind: FeatureType,
    /// Whether a row may leave it empty.
    pub nullable: bool,
    /// What it means, with its unit.
    pub description: String,
    /// Who answers for it.
    pub owner: String,
    /// Whether it is personal data.
    pub pii: bool,
    /// What a snapshot does with it when it is personal data.
    pub pii_policy: Option<PiiPolicy>,
    /// Served in its place when an entity has no value for it (or is missing).
    pub default: Option<toml::Value>,
}

/// A feature as written: the type's tag and a category's values are sibling keys, which
/// serde's flattening cannot combine with refusing unknown keys.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeatureRecord {
    name: String,
    #[serde(rename = "type")]
    kind: TypeName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    values: Option<Vec<String>>,
    #[serde(default)]
    nullable: bool,
    description: String,
    owner: String,
    #[serde(default)]
    pii: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pii_policy: Option<PiiPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    default: Option<toml::Value>,
}

#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum TypeName {
    F32,
    F64,
    I64,
    Bool,
    String,
    Category,
}

impl TryFrom<FeatureRecord> for Feature {
    type Error = String;
    fn try_from(r: FeatureRecord) -> Result<Self, String> {
        let kind = match (r.kind, r.values) {
            (TypeName::Category, Some(values)) => FeatureType::Category { values },
            (TypeName::Category, None) => {
                return Err(format!("feature {}: a category needs `values`", r.name));
            }
            (_, Some(_)) => {
                return Err(format!("feature {}: only a category has `values`", r.name));
            }
            (TypeName::F32, None) => FeatureType::F32,
            (TypeName::F64, None) => FeatureType::F64,
            (TypeName::I64, None) => FeatureType::I64,
            (TypeName::Bool, None) => FeatureType::Bool,
            (TypeName::String, None) => FeatureType::String,
        };
        Ok(Self {
            name: r.name,
            kind,
            nullable: r.nullable,
            description: r.description,
            owner: r.owner,
            pii: r.pii,
            pii_policy: r.pii_policy,
            default: r.default,
        })
    }
}

impl From<Feature> for FeatureRecord {
    fn from(f: Feature) -> Self {
        let (kind, values) = match f.kind {
            FeatureType::F32 => (TypeName::F32, None),
            FeatureType::F64 => (TypeName::F64, None),
            FeatureType::I64 => (TypeName::I64, None),
            FeatureType::Bool => (TypeName::Bool, None),
            FeatureType::String => (TypeName::String, None),
            FeatureType::Category { values } => (TypeName::Category, Some(values)),
        };
        Self {
            name: f.name,
            kind,
            values,
            nullable: f.nullable,
            description: f.description,
            owner: f.owner,
            pii: f.pii,
            pii_policy: f.pii_policy,
            default: f.default,
        }
    }
}

/// The type of a feature, written `type = "f32"` or `type = "category", values = [...]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FeatureType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// 64-bit integer.
    I64,
    /// true or false.
    Bool,
    /// Any text.
    String,
    /// One of a fixed set of strings.
    Category {
        /// The allowed values.
        values: Vec<String>,
    },
}

impl fmt::Display for FeatureType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F64 => "f64",
            Self::I64 => "i64",
            Self::Bool => "bool",
            Self::String => "string",
            Self::Category { .. } => "category",
        })
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::String => "string",
            Self::I64 => "i64",
        })
    }
}

/// What leaves the control plane in place of a personal-data feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiPolicy {
    /// A keyed hash of the value (the region's key), so equal values still match.
    Hash,
    /// Nothing: the feature is left out.
    Drop,
}

impl fmt::Display for PiiPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Hash => "hash",
            Self::Drop => "drop",
        })
    }
}

impl std::str::FromStr for PiiPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hash" => Ok(Self::Hash),
            "drop" => Ok(Self::Drop),
            other => Err(format!("PII policy must be hash or drop, not {other:?}")),
        }
    }
}

/// Why a view declaration was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ViewError {
    /// Not TOML of the view's shape.
    #[error("feature view: {0}")]
    Parse(String),
    /// A bad view name.
    #[error("feature view: {0}")]
    Name(#[from] NameError),
    /// A column name outside `[a-z_][a-z0-9_]*`.
    #[error(
        "feature view {view:?}: column name {name:?} must be 1 to 64 of lowercase letters, digits and '_', not starting with a digit"
    )]
    ColumnName {
        /// The view.
        view: String,
        /// The name.
        name: String,
    },
    /// Two columns share a name.
    #[error("feature view {view:?}: column {name:?} is declared twice")]
    Duplicate {
        /// The view.
        view: String,
        /// The name.
        name: String,
    },
    /// No features, or too many.
    #[error("feature view {view:?}: must declare 1 to {MAX_FEATURES} features")]
    FeatureCount {
        /// The view.
        view: String,
    },
    /// A category without values, or with a value twice.
    #[error("feature view {view:?}: category {feature:?} needs distinct values, at least one")]
    Category {
        /// The view.
        view: String,
        /// The feature.
        feature: String,
    },
    /// A PII policy on a feature not tagged PII, or a default of the wrong type.
    #[error("feature view {view:?}: feature {feature:?}: {message}")]
    Feature {
        /// The view.
        view: String,
        /// The feature.
        feature: String,
        /// What is wrong.
        message: String,
    },
}

/// Checks a column name: `[a-z_][a-z0-9_]*`, 1 to 64 bytes (it becomes an SQL column, a
/// Parquet column and a JSON key).
pub fn is_column_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_FEATURE_NAME_LEN
        && !bytes[0].is_ascii_digit()
        && bytes.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
}

impl FeatureView {
    /// Parses and checks a TOML declaration.
    pub fn from_toml(text: &str) -> Result<Self, ViewError> {
        let view: Self =
            toml::from_str(text).map_err(|e| ViewError::Parse(e.to_string().trim().to_owned()))?;
        view.check()?;
        Ok(view)
    }

    /// Checks names, counts, categories, policies and defaults.
    pub fn check(&self) -> Result<(), ViewError> {
        names::check_model_name(&self.name)?;
        let view = || self.name.clone();
        if self.features.is_empty() || self.features.len() > MAX_FEATURES {
            return Err(ViewError::FeatureCount { view: view() });
        }
        let mut seen = BTreeSet::new();
        let columns = [&self.entity.name, &self.timestamp]
            .into_iter()
            .chain(self.features.iter().map(|f| &f.name));
        for name in columns {
            if !is_column_name(name) {
                return Err(ViewError::ColumnName { view: view(), name: name.clone() });
            }
            if !seen.insert(name) {
                return Err(ViewError::Duplicate { view: view(), name: name.clone() });
            }
        }
        for feature in &self.features {
            let bad = |message: &str| ViewError::Feature {
                view: view(),
                feature: feature.name.clone(),
                message: message.to_owned(),
            };
            if let FeatureType::Category { values } = &feature.kind {
                let distinct: BTreeSet<_> = values.iter().collect();
                if values.is_empty() || distinct.len() != values.len() {
                    return Err(ViewError::Category {
                        view: view(),
                        feature: feature.name.clone(),
                    });
                }
            }
            if feature.name.contains(super::pii::COMPANION_MARK) {
                return Err(bad(
                    "names containing \"__pii_v\" are kept for pseudonyms under older PII keys",
                ));
            }
            if feature.pii && feature.name.len() > super::pii::MAX_PII_NAME_LEN {
                return Err(bad(&format!(
                    "personal data needs a name of at most {} characters, to leave room for \
                     the columns of older PII key versions",
                    super::pii::MAX_PII_NAME_LEN
                )));
            }
            if feature.pii_policy.is_some() && !feature.pii {
                return Err(bad("pii_policy is set but pii is not"));
            }
            if let Some(default) = &feature.default {
                super::Value::from_default(&feature.kind, default)
                    .map_err(|rule| bad(&format!("default {default}: {rule}")))?;
            }
        }
        Ok(())
    }

    /// The feature called `name`.
    pub fn feature(&self, name: &str) -> Option<&Feature> {
        self.features.iter().find(|f| f.name == name)
    }
}

/// How a new declaration relates to the stored one of the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing differs.
    Same,
    /// Stored rows stay valid: descriptions, owners, PII tags and defaults, new nullable
    /// features, categories that gained values, a feature that became nullable.
    Compatible(Vec<String>),
    /// Stored rows would not fit: a new version with its own storage.
    Breaking(Vec<String>),
}

/// Compares the stored declaration `old` with `new`, listing every difference.
pub fn compare(old: &FeatureView, new: &FeatureView) -> Change {
    let mut compatible = Vec::new();
    let mut breaking = Vec::new();
    if old.entity != new.entity {
        breaking.push(format!(
            "entity {} {} became {} {}",
            old.entity.name, old.entity.kind, new.entity.name, new.entity.kind
        ));
    }
    if old.timestamp != new.timestamp {
        compatible.push(format!("timestamp column {} became {}", old.timestamp, new.timestamp));
    }
    if old.description != new.description {
        compatible.push("description changed".to_owned());
    }
    for was in &old.features {
        let Some(now) = new.feature(&was.name) else {
            breaking.push(format!("feature {} removed", was.name));
            continue;
        };
        compare_feature(was, now, &mut compatible, &mut breaking);
    }
    for now in new.features.iter().filter(|f| old.feature(&f.name).is_none()) {
        if now.nullable {
            compatible.push(format!("nullable feature {} added", now.name));
        } else {
            breaking.push(format!("feature {} added but not nullable", now.name));
        }
    }
    let old_order: Vec<_> = old.features.iter().map(|f| &f.name).collect();
    let kept: Vec<_> =
        new.features.iter().map(|f| &f.name).filter(|n| old_order.contains(n)).collect();
    if breaking.is_empty() && kept != old_order {
        compatible.push("features reordered".to_owned());
    }
    if !breaking.is_empty() {
        Change::Breaking(breaking)
    } else if compatible.is_empty() {
        Change::Same
    } else {
        Change::Compatible(compatible)
    }
}

fn compare_feature(
    was: &Feature,
    now: &Feature,
    compatible: &mut Vec<String>,
    breaking: &mut Vec<String>,
) {
    let name = &was.name;
    match (&was.kind, &now.kind) {
        (FeatureType::Category { values: old }, FeatureType::Category { values: new }) => {
            let removed: Vec<_> = old.iter().filter(|v| !new.contains(v)).collect();
            if !removed.is_empty() {
                breaking.push(format!("feature {name}: category values {removed:?} removed"));
            } else if old != new {
                compatible.push(format!("feature {name}: category values added"));
            }
        }
        (a, b) if a != b => breaking.push(format!("feature {name}: type {a} became {b}")),
        _ => {}
    }
    match (was.nullable, now.nullable) {
        (true, false) => breaking.push(format!("feature {name} is no longer nullable")),
        (false, true) => compatible.push(format!("feature {name} became nullable")),
        _ => {}
    }
    let metadata = [
        ("description", was.description != now.description),
        ("owner", was.owner != now.owner),
        ("pii", was.pii != now.pii || was.pii_policy != now.pii_policy),
        ("default", was.default != now.default),
    ];
    for (what, changed) in metadata {
        if changed {
            compatible.push(format!("feature {name}: {what} changed"));
        }
    }
}
