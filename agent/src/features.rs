//! The online feature store on the agent: the active snapshot of each feature view, looked
//! up by entity (`GET /v1/features/{view}/{entity}`) and assembled into a model's input
//! tensor when an inference request names entities instead of giving inputs.
//!
//! Snapshot bundles are installed, activated and removed like model bundles; the registry
//! ([`crate::models`]) loads each view's active snapshot into an [`OnlineTable`] and keeps it
//! in the same lock-free catalog as the models. Everything here reads that catalog and
//! takes no lock.

use std::sync::Arc;

use falaj_common::bundle::FeatureInput;
use falaj_common::features::value::format_time;
use falaj_common::features::{AssembleError, OnlineTable, Rule, SnapshotSpec, Value};
use falaj_common::keys::Sha256;
use falaj_common::tensor::{Tensor, TensorData};
use serde::Serialize;
use serde::ser::SerializeMap;
use thiserror::Error;

use crate::models::Catalog;
use crate::store::{Installed, Store};

/// The active snapshot of one view, as of one reload.
#[derive(Debug, Clone)]
pub struct ViewEntry {
    /// The snapshot bundle's version (its sequence number).
    pub version: u64,
    /// The bundle's manifest hash, so an unchanged snapshot is not loaded again.
    pub manifest_sha256: Sha256,
    /// The table, or why it could not be loaded.
    pub state: SnapshotState,
    /// Whether its file did not open (damaged or tampered with on disk): read again at
    /// every reload, and fetched again at the next sync when the control plane manages it.
    pub unreadable: bool,
}

/// Whether a snapshot is served.
#[derive(Debug, Clone)]
pub enum SnapshotState {
    /// Loaded: lookups are served from this table.
    Ready(Arc<OnlineTable>),
    /// Installed but damaged or unreadable; the reason. Not served.
    Failed(String),
}

/// Reads an installed snapshot bundle (checking it again against its hashes) and loads its
/// table. Blocking.
pub fn load(store: &Store, installed: &Installed) -> Result<OnlineTable, String> {
    load_telling(store, installed).map_err(|(reason, _)| reason)
}

/// [`load`], its error telling whether the file did not open (`true`: damaged or tampered
/// with on disk) rather than the table failing to load.
pub fn load_telling(store: &Store, installed: &Installed) -> Result<OnlineTable, (String, bool)> {
    let spec = installed
        .manifest
        .snapshot()
        .ok_or_else(|| ("not a feature snapshot bundle".to_owned(), false))?
        .clone();
    let payload = store.read_content(installed).map_err(|e| (e.to_string(), true))?;
    OnlineTable::load(spec, &payload).map_err(|e| (e.to_string(), false))
}

/// Why a lookup or an assembly was refused. Each variant is the client's doing or the
/// agent's state, never a bug.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FeatureError {
    /// `GET /v1/features/{view}/...` for a view the agent holds no snapshot of.
    #[error("unknown feature view {view:?}")]
    UnknownView { view: String },
    /// An inference by entity for a model whose view has no snapshot here.
    #[error("this agent holds no snapshot of feature view {view:?}, which model {model:?} reads")]
    NoSnapshot { model: String, view: String },
    /// The active snapshot is installed but could not be loaded.
    #[error("feature view {view:?} snapshot version {version} is not loaded: {reason}")]
    NotLoaded {
        view: String,
        /// The snapshot version.
        version: u64,
        /// Why.
        reason: String,
    },
    /// The entity is not in the snapshot, and some feature has no default.
    #[error("entity {entity:?} is not in the snapshot of feature view {view:?}")]
    NotHeld {
        view: String,
        /// The entity id.
        entity: String,
    },
    /// The entity id is not of the view's key type.
    #[error("entity id {entity:?} of feature view {view:?}: {rule}")]
    BadKey {
        view: String,
        /// The entity id.
        entity: String,
        /// The rule it breaks.
        rule: Rule,
    },
    /// The request named entities but the model's input does not come from a view.
    #[error(
        "model {model:?} does not take its input from a feature view; send inputs, not entity ids"
    )]
    NoFeatureInput { model: String },
    /// The request gave both inputs and entity ids.
    #[error("give either inputs or parameters.entity_id(s), not both")]
    InputsAndEntities,
    /// The snapshot is of another version of the view than the model was trained on.
    #[error(
        "model {model:?} was trained on feature view {view:?} version {trained}, but the snapshot held is of version {held} (training/serving skew)"
    )]
    Skew {
        model: String,
        view: String,
        /// The view version the model was trained on.
        trained: u64,
        /// The view version of the snapshot.
        held: u64,
    },
    /// A feature the model reads is not carried by the snapshot (dropped as personal data,
    /// say).
    #[error(
        "feature {feature:?} that model {model:?} reads is not in the snapshot of feature view {view:?}"
    )]
    MissingFeature { model: String, view: String, feature: String },
    /// A feature the model reads is text in the snapshot (a pseudonym, a category).
    #[error("feature {feature:?} of feature view {view:?} is text and cannot be a model input")]
    NotNumeric { view: String, feature: String },
    /// A feature is null for the entity and has no default.
    #[error(
        "feature {feature:?} of entity {entity:?} in feature view {view:?} is null and has no default"
    )]
    Null {
        view: String,
        /// The entity id.
        entity: String,
        feature: String,
    },
}

/// The table of `view`'s active snapshot, with its bundle version.
fn table<'c>(
    catalog: &'c Catalog,
    view: &str,
) -> Option<Result<(u64, &'c Arc<OnlineTable>), FeatureError>> {
    let entry = catalog.features.get(view)?;
    Some(match &entry.state {
        SnapshotState::Ready(table) => Ok((entry.version, table)),
        SnapshotState::Failed(reason) => Err(FeatureError::NotLoaded {
            view: view.to_owned(),
            version: entry.version,
            reason: reason.clone(),
        }),
    })
}

/// The body of `GET /v1/features`: every view held, with its active snapshot.
pub fn list(catalog: &Catalog) -> serde_json::Value {
    let views: Vec<serde_json::Value> = catalog
        .features
        .iter()
        .map(|(name, entry)| match &entry.state {
            SnapshotState::Ready(table) => {
                let spec = table.spec();
                serde_json::json!({
                    "name": name,
                    "view_version": spec.view_version,
                    "version": entry.version,
                    "entities": table.len(),
                    "as_of": spec.as_of,
                    "scope": spec.scope,
                    "entity": {"name": spec.entity.name, "type": spec.entity.kind.to_string()},
                    "features": spec.features.iter().map(|f| serde_json::json!({
                        "name": f.name,
                        "type": f.kind.to_string(),
                        "nullable": f.nullable,
                        "pseudonymised": f.pseudonymised,
                    })).collect::<Vec<_>>(),
                })
            }
            SnapshotState::Failed(reason) => serde_json::json!({
                "name": name,
                "version": entry.version,
                "error": reason,
            }),
        })
        .collect();
    serde_json::json!({ "views": views })
}

/// The body of `GET /v1/features/{view}/{entity}`.
#[derive(Debug, Serialize)]
struct LookupResponse<'a> {
    view: &'a str,
    view_version: u64,
    version: u64,
    entity: &'a str,
    event_time: Option<String>,
    defaulted: bool,
    features: Features<'a>,
}

/// Feature names with their values, as a JSON object in column order. (Serialised
/// directly, so an `f32` is written in its shortest exact form, not widened to `f64`.)
#[derive(Debug)]
struct Features<'a> {
    spec: &'a SnapshotSpec,
    values: &'a [Value],
}

impl Serialize for Features<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.values.len()))?;
        for (feature, value) in self.spec.features.iter().zip(self.values) {
            map.serialize_entry(&feature.name, value)?;
        }
        map.end()
    }
}

/// Looks `entity` up in `view`'s active snapshot; the JSON body of the answer.
pub fn lookup(catalog: &Catalog, view: &str, entity: &str) -> Result<Vec<u8>, FeatureError> {
    let (version, table) = table(catalog, view)
        .ok_or_else(|| FeatureError::UnknownView { view: view.to_owned() })??;
    let found = table
        .get(entity)
        .map_err(|rule| FeatureError::BadKey {
            view: view.to_owned(),
            entity: entity.to_owned(),
            rule,
        })?
        .ok_or_else(|| FeatureError::NotHeld {
            view: view.to_owned(),
            entity: entity.to_owned(),
        })?;
    let spec = table.spec();
    let response = LookupResponse {
        view,
        view_version: spec.view_version,
        version,
        entity,
        event_time: found.time.map(format_time),
        defaulted: found.time.is_none(),
        features: Features { spec, values: &found.values },
    };
    Ok(serde_json::to_vec(&response).expect("lookup responses always serialise"))
}

/// Builds the input tensor of model `model` (whose manifest says `input`) for `entities`:
/// shape `[entities, features]`, FP32, the features in `input.names` order, from the active
/// snapshot of `input.view`.
pub fn assemble(
    catalog: &Catalog,
    model: &str,
    input: &FeatureInput,
    entities: &[String],
) -> Result<Tensor, FeatureError> {
    let view = input.view.as_str();
    let (_, table) = table(catalog, view).ok_or_else(|| FeatureError::NoSnapshot {
        model: model.to_owned(),
        view: view.to_owned(),
    })??;
    let values = assemble_from(table, model, input, entities)?;
    Ok(Tensor {
        shape: vec![entities.len() as u64, input.names.len() as u64],
        data: TensorData::Fp32(values),
    })
}

/// The rows of [`assemble`] from `table`, a snapshot of `input.view`, row-major.
pub fn assemble_from(
    table: &OnlineTable,
    model: &str,
    input: &FeatureInput,
    entities: &[String],
) -> Result<Vec<f32>, FeatureError> {
    let view = input.view.as_str();
    let spec = table.spec();
    if spec.view_version != input.version {
        return Err(FeatureError::Skew {
            model: model.to_owned(),
            view: view.to_owned(),
            trained: input.version,
            held: spec.view_version,
        });
    }
    let positions = input
        .names
        .iter()
        .map(|name| {
            spec.position(name).ok_or_else(|| FeatureError::MissingFeature {
                model: model.to_owned(),
                view: view.to_owned(),
                feature: name.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut values = Vec::with_capacity(entities.len() * positions.len());
    for entity in entities {
        table.assemble(entity, &positions, &mut values).map_err(|e| match e {
            AssembleError::Key { key, rule } => {
                FeatureError::BadKey { view: view.to_owned(), entity: key, rule }
            }
            AssembleError::Missing { key, .. } => {
                FeatureError::NotHeld { view: view.to_owned(), entity: key }
            }
            AssembleError::Null { key, feature } => {
                FeatureError::Null { view: view.to_owned(), entity: key, feature }
            }
            AssembleError::NotNumeric { feature } => {
                FeatureError::NotNumeric { view: view.to_owned(), feature }
            }
        })?;
    }
    Ok(values)
}
