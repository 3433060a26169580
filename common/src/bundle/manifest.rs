//! The manifest: what a bundle is and what it holds. Its JSON is a signed boundary.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::features::SnapshotSpec;
use crate::finetune::Lineage;
use crate::keys::Sha256;
use crate::profile::DataProfile;
use crate::tensor::{DataType, Dim, InputShape, Signature};
use crate::time::Timestamp;

/// The manifest schema this build writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

/// The manifest of a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The manifest schema, [`MANIFEST_FORMAT`].
    pub format: u32,
    /// The model's (or feature view's) name.
    pub name: String,
    /// The version, from 1; versions of one name only ever increase.
    pub version: u64,
    /// The region the bundle may be installed in.
    pub region: String,
    /// When the bundle was built.
    pub created: Timestamp,
    /// After this the bundle is refused by import.
    pub expires: Timestamp,
    /// Every payload file, in the order they follow the manifest in the container.
    pub files: Vec<FileEntry>,
    /// What the bundle carries.
    pub content: Content,
}

/// One payload file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// A relative path (see [`crate::names::check_payload_path`]).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256.
    pub sha256: Sha256,
}

/// What a bundle carries, written as `{"model": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Content {
    /// A model to serve.
    Model(ModelSpec),
    /// A feature snapshot for online lookups.
    Features(SnapshotSpec),
}

/// The kind of a bundle, for display and for routing it to its installer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    /// A model.
    Model,
    /// A feature snapshot.
    Features,
}

impl fmt::Display for BundleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Model => "model",
            Self::Features => "features",
        })
    }
}

impl Content {
    /// The payload file the content names.
    pub fn file(&self) -> &str {
        match self {
            Self::Model(m) => &m.file,
            Self::Features(s) => &s.file,
        }
    }

    /// The bundle's kind.
    pub fn kind(&self) -> BundleKind {
        match self {
            Self::Model(_) => BundleKind::Model,
            Self::Features(_) => BundleKind::Features,
        }
    }
}

/// A model and how to serve it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The payload file holding the model.
    pub file: String,
    /// The model's format.
    pub format: ModelFormat,
    /// Which engine should serve it.
    pub runtime: RuntimeHint,
    /// Its inputs and outputs.
    pub signature: Signature,
    /// Histograms of reference data, for drift detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<DataProfile>,
    /// The feature view its input is assembled from, when requests may name an entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<FeatureInput>,
    /// Set on a model an agent derived by fine-tuning another: where it came from. Such a
    /// bundle is made on the agent and signed by no one; it never travels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<Box<Lineage>>,
    /// Input shapes to plan the model for (`bundle build --input-shape`), for models whose
    /// shapes the engine cannot settle symbolically; by input name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub shapes: BTreeMap<String, InputShape>,
}

/// Where a model's input comes from when a request names an entity: the features of one
/// view, in the order of the input tensor's last axis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureInput {
    /// The view.
    pub view: String,
    /// The view's version the model was trained on.
    pub version: u64,
    /// The features, in input order.
    pub names: Vec<String>,
}

impl FeatureInput {
    /// Checks that a model with `signature` can take this input: one FP32 input of rank 2
    /// whose last dimension (when fixed) is the number of features.
    pub fn fits(&self, signature: &Signature) -> Result<(), String> {
        let [tensor] = signature.inputs.as_slice() else {
            return Err(format!(
                "its input comes from feature view {:?}, so it must have exactly one input, not {}",
                self.view,
                signature.inputs.len()
            ));
        };
        let width = self.names.len() as u64;
        if tensor.datatype != DataType::Fp32 {
            return Err(format!(
                "input {:?} is {}, but inputs from feature view {:?} are FP32",
                tensor.name,
                tensor.datatype.name(),
                self.view
            ));
        }
        match tensor.shape.as_slice() {
            [_, Dim::Fixed(n)] if *n != width => Err(format!(
                "input {:?} has {n} columns, but feature view {:?} gives {width} features",
                tensor.name, self.view
            )),
            [_, _] => Ok(()),
            other => Err(format!(
                "input {:?} has rank {}, but an input from feature view {:?} is [rows, {width}]",
                tensor.name,
                other.len(),
                self.view
            )),
        }
    }
}

/// A model file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    /// ONNX protobuf.
    Onnx,
}

/// Which engine should serve a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeHint {
    /// On the CPU.
    Cpu,
    /// On a GPU.
    Gpu,
    /// A GPU when one can serve it, else the CPU.
    #[default]
    Auto,
}

impl fmt::Display for RuntimeHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Gpu => "gpu",
            Self::Auto => "auto",
        })
    }
}

impl std::str::FromStr for RuntimeHint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "gpu" => Ok(Self::Gpu),
            "auto" => Ok(Self::Auto),
            other => Err(format!("runtime must be cpu, gpu or auto, not {other:?}")),
        }
    }
}

impl Manifest {
    /// The model spec, for a model bundle.
    pub fn model(&self) -> Option<&ModelSpec> {
        match &self.content {
            Content::Model(m) => Some(m),
            Content::Features(_) => None,
        }
    }

    /// The snapshot spec, for a feature snapshot bundle.
    pub fn snapshot(&self) -> Option<&SnapshotSpec> {
        match &self.content {
            Content::Features(s) => Some(s),
            Content::Model(_) => None,
        }
    }

    /// The total size of the payload files, or `None` if it overflows.
    pub fn payload_size(&self) -> Option<u64> {
        self.files.iter().try_fold(0u64, |acc, f| acc.checked_add(f.size))
    }

    /// The manifest's canonical bytes: what is stored and signed.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest always serialises")
    }
}
