//! Building bundles from ONNX models, and inspecting bundle files.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use falaj_common::bundle::{
    self, BuildError, BundleBuilder, Content, FeatureInput, Header, Manifest, ModelFormat,
    ModelSpec, Policy, RuntimeHint, VerifyError,
};
use falaj_common::keys::SignatureEntry;
use falaj_common::onnx::{LoadOptions, OnnxError, OnnxModel};
use falaj_common::tensor::{InputShape, TensorSpec};
use falaj_common::time::Timestamp;
use falaj_common::trust::TrustRoot;
use thiserror::Error;

use crate::files;
use crate::keys::{self, KeysError};
use crate::reference::{self, ReferenceError};
use crate::vault::{UnsealFrom, Vault};

/// The name of the model file inside a model bundle.
pub const MODEL_FILE: &str = "model.onnx";
/// The default lifetime of a bundle.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why a bundle could not be built.
#[derive(Debug, Error)]
pub enum BundleError {
    /// A file could not be read or written.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        source: std::io::Error,
    },
    /// The keys directory is unusable.
    #[error(transparent)]
    Keys(#[from] KeysError),
    /// tract cannot load the model, so no agent could serve it.
    #[error("model {path}: {source}")]
    Model {
        /// The model file.
        path: PathBuf,
        /// Why.
        source: OnnxError,
    },
    /// The reference data could not be profiled.
    #[error("{path}: {source}")]
    Reference {
        /// The CSV file.
        path: PathBuf,
        /// Why.
        source: ReferenceError,
    },
    /// The bundle could not be assembled.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The model cannot take the named features as its input.
    #[error("model {path}: {message}")]
    FeatureInput {
        /// The model file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The keys directory (trust root and signing keys).
    pub keys: PathBuf,
    /// The ONNX model.
    pub model: PathBuf,
    /// The model's name.
    pub name: String,
    pub version: u64,
    /// Reference data (CSV), profiled into the bundle.
    pub reference: Option<PathBuf>,
    /// Which engine agents should use.
    pub runtime: RuntimeHint,
    /// How long the bundle may be imported.
    pub lifetime: Duration,
    /// Where to write the bundle.
    pub out: PathBuf,
    /// The feature view the model's input is assembled from, for requests by entity.
    pub features: Option<FeatureInput>,
    /// Input shapes to plan the model for, by input name (recorded in the manifest).
    pub shapes: BTreeMap<String, InputShape>,
}

/// Builds, signs and writes a model bundle. Returns its manifest. Sealed keys are opened
/// with systemd's `falaj-keys` credential; see [`build_unsealing`].
pub fn build(options: &BuildOptions, now: SystemTime) -> Result<Manifest, BundleError> {
    build_unsealing(options, None, now)
}

/// [`build`], opening sealed signing keys with the secret from `unseal`.
pub fn build_unsealing(
    options: &BuildOptions,
    unseal: Option<&UnsealFrom>,
    now: SystemTime,
) -> Result<Manifest, BundleError> {
    let trust = keys::load_trust(&options.keys, now)?;
    let vault = Vault::open_from(&options.keys, unseal).map_err(KeysError::from)?;
    let signers = keys::load_signing_keys(&vault, &trust)?;
    let model_bytes = fs::read(&options.model).map_err(|source| BundleError::Io {
        op: "reading model",
        path: options.model.clone(),
        source,
    })?;
    let load = LoadOptions { shapes: options.shapes.clone(), ..LoadOptions::default() };
    let model = OnnxModel::load_with(&model_bytes, &load)
        .map_err(|source| BundleError::Model { path: options.model.clone(), source })?;
    let reference = options
        .reference
        .as_ref()
        .map(|path| {
            let file = fs::File::open(path).map_err(|source| BundleError::Io {
                op: "reading reference",
                path: path.clone(),
                source,
            })?;
            reference::profile_default(&model, std::io::BufReader::new(file))
                .map_err(|source| BundleError::Reference { path: path.clone(), source })
        })
        .transpose()?;
    if let Some(input) = &options.features {
        input.fits(model.signature()).map_err(|message| BundleError::FeatureInput {
            path: options.model.clone(),
            message,
        })?;
    }
    let created = Timestamp::from_system(now);
    let content = Content::Model(ModelSpec {
        file: MODEL_FILE.into(),
        format: ModelFormat::Onnx,
        runtime: options.runtime,
        signature: model.signature().clone(),
        reference,
        features: options.features.clone(),
        lineage: None,
        shapes: options.shapes.clone(),
    });
    let signer_refs: Vec<_> = signers.iter().collect();
    let (manifest, bytes) = BundleBuilder::new(
        &options.name,
        options.version,
        trust.region(),
        created,
        created.saturating_add(options.lifetime),
        content,
    )
    .file(MODEL_FILE, model_bytes)
    .build(&signer_refs)?;
    files::write_atomic(&options.out, &bytes, 0o644).map_err(|source| BundleError::Io {
        op: "writing bundle",
        path: options.out.clone(),
        source,
    })?;
    Ok(manifest)
}

/// What `inspect` found.
#[derive(Debug)]
pub struct Inspection {
    /// The bundle file's size.
    pub size: u64,
    /// The manifest (not necessarily authentic: see `verified`).
    pub manifest: Manifest,
    pub signatures: Vec<SignatureEntry>,
    /// The verdict against a trust root, if one was given.
    pub verified: Option<Result<u64, VerifyError>>,
}

/// Reads a bundle's manifest and, given a trust root, verifies the whole bundle.
pub fn inspect(
    path: &Path,
    trust: Option<&TrustRoot>,
    now: SystemTime,
) -> Result<Inspection, BundleError> {
    let bytes = fs::read(path).map_err(|source| BundleError::Io {
        op: "reading",
        path: path.to_owned(),
        source,
    })?;
    let unreadable = |e: String| BundleError::Io {
        op: "reading",
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    };
    let header = Header::parse(&bytes).map_err(|e| unreadable(e.to_string()))?;
    let manifest_end = bundle::HEADER_LEN + header.manifest_len as usize;
    let sigs_end = manifest_end + header.signatures_len as usize;
    let (Some(manifest_bytes), Some(sig_bytes)) =
        (bytes.get(bundle::HEADER_LEN..manifest_end), bytes.get(manifest_end..sigs_end))
    else {
        return Err(unreadable("the file is truncated".into()));
    };
    let manifest: Manifest =
        serde_json::from_slice(manifest_bytes).map_err(|e| unreadable(format!("manifest: {e}")))?;
    let signatures: Vec<SignatureEntry> =
        serde_json::from_slice(sig_bytes).map_err(|e| unreadable(format!("signatures: {e}")))?;
    let verified = trust.map(|trust| {
        bundle::verify(&bytes, trust, &Policy::new(trust.region(), now)).map(|_| trust.version())
    });
    Ok(Inspection { size: bytes.len() as u64, manifest, signatures, verified })
}

fn shape(spec: &TensorSpec) -> String {
    let dims: Vec<String> = spec.shape.iter().map(ToString::to_string).collect();
    format!("{} {} [{}]", spec.name, spec.datatype, dims.join(", "))
}

impl Inspection {
    /// A human-readable report.
    pub fn report(&self, path: &Path) -> String {
        let m = &self.manifest;
        let mut out = String::new();
        let mut line = |k: &str, v: String| {
            let _ = writeln!(out, "{k:<11} {v}");
        };
        line("bundle", format!("{} ({} bytes)", path.display(), self.size));
        line("kind", m.content.kind().to_string());
        line("name", m.name.clone());
        line("version", m.version.to_string());
        line("region", m.region.clone());
        line("created", m.created.to_string());
        line("expires", m.expires.to_string());
        for f in &m.files {
            line("file", format!("{}  {} bytes  sha256 {}", f.name, f.size, f.sha256));
        }
        if let Some(model) = m.model() {
            line("format", format!("{:?}", model.format).to_lowercase());
            line("runtime", model.runtime.to_string());
            for i in &model.signature.inputs {
                line("input", shape(i));
            }
            for o in &model.signature.outputs {
                line("output", shape(o));
            }
            match &model.reference {
                Some(r) => line(
                    "reference",
                    format!(
                        "{} rows; {} input and {} output column profiles",
                        r.rows,
                        r.inputs.len(),
                        r.outputs.len()
                    ),
                ),
                None => line("reference", "none".into()),
            }
        }
        for s in &self.signatures {
            line("signature", format!("key {}", s.keyid));
        }
        line(
            "verified",
            match &self.verified {
                None => "not checked (pass --trust ROOT_JSON to verify)".into(),
                Some(Ok(version)) => format!("yes, against trust root version {version}"),
                Some(Err(e)) => format!("NO: {e}"),
            },
        );
        out
    }
}
