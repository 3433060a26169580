//! The feature store's shared rules: feature views declared in TOML and how they may change,
//! the checks every ingested row must pass, which entities a snapshot carries (filters),
//! what happens to personal data (pseudonymised or dropped), what a snapshot bundle's
//! manifest says, and (feature `snapshots`) the row-major payload and the online table
//! agents look entities up in.
//!
//! The control plane and the agents both read snapshots through this module, so an entity's
//! features are the same values in training exports, snapshots and model inputs.

pub mod filter;
pub mod pii;
pub mod rows;
pub mod snapshot;
#[cfg(feature = "snapshots")]
pub mod table;
#[cfg(test)]
mod tests;
pub mod value;
pub mod view;

pub use filter::{Filter, FilterError};
pub use pii::{Keyring, PiiError, Pseudonymiser, Treatment, companion_name};
pub use rows::{HeaderError, Report, Row, RowError, RowSchema};
pub use snapshot::{SnapshotFeature, SnapshotFormat, SnapshotSpec};
#[cfg(feature = "snapshots")]
pub use table::{AssembleError, Lookup, OnlineTable, SnapshotError, SnapshotWriter};
pub use value::{Cell, Key, Rule, Value};
pub use view::{Change, Entity, Feature, FeatureType, FeatureView, KeyType, PiiPolicy, ViewError};
