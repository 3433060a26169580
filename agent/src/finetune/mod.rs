//! Fine-tuning on the agent: a model's head retrained on the site's labelled data, which
//! never leaves the site, into a derived model.
//!
//! A job names the model (and version), the data (a CSV or Parquet file holding the
//! model's input features and a label column, or entity ids joined to the agent's feature
//! snapshot), the hyperparameters and the gate. The frozen backbone's features come from
//! the model cut at its head and run by tract; the head trains through
//! `falaj_common::finetune` on the CPU or the GPU; the result is the parent's ONNX with the
//! head's initializers replaced, checked to load, stored as an unsigned bundle
//! `PARENT.ftN` at the parent's version whose manifest records its lineage, and, when the
//! gate passes, set to serve requests for the parent's name ([`crate::store::Overlay`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use falaj_common::bundle::{BuildError, BundleBuilder, Content, Manifest};
use falaj_common::features::{Cell, OnlineTable};
use falaj_common::finetune::{
    self, CpuKernel, Dense, DesiredJob, EpochStats, Examples, HeadKernel, HeadWeights, JobReport,
    JobState, Lineage, Outcome,
};
pub use falaj_common::finetune::{DataSource, Job, TrainEngine};
use falaj_common::onnx::OnnxModel;
use falaj_common::onnx::head::{self, Head, HeadError};
use falaj_common::tensor::{Dim, Tensor, TensorData};
use falaj_common::time::Timestamp;
use falaj_gpu::{Gpu, GpuError, GpuHeadKernel, GpuOptions};
use falaj_tables::{Format, ReadError, RowSink, SourceError};
use thiserror::Error;

use crate::features;
use crate::store::{Installed, Sealed, Store, StoreError};

pub mod cli;

/// Rows per backbone run.
const BACKBONE_ROWS: usize = 4096;

/// Why a fine-tune failed; nothing is installed when it does.
#[derive(Debug, Error)]
pub enum FinetuneError {
    /// The job itself is wrong (a bad file, bad hyperparameters).
    #[error("fine-tune job: {0}")]
    Job(String),
    /// The model cannot be fine-tuned as asked.
    #[error("model {model}: {problem}")]
    Model {
        model: String,
        /// What is wrong.
        problem: String,
    },
    /// The model has no head that can be retrained.
    #[error("model {model}: {source}")]
    Head {
        model: String,
        /// Why.
        source: HeadError,
    },
    /// The data file cannot be read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The data does not fit the model.
    #[error("training data {path}: {problem}")]
    Data {
        path: PathBuf,
        /// What is wrong, with the row, column and value where it helps.
        problem: String,
        /// The same without anything read from the file (its header, its values): what a
        /// report to the control plane may carry.
        public: String,
    },
    /// The backbone could not compute the features.
    #[error("model {model}: computing the backbone's features: {problem}")]
    Backbone {
        model: String,
        /// What failed.
        problem: String,
    },
    /// The training device failed.
    #[error("training on the {engine}: {problem}")]
    Train {
        /// Where.
        engine: &'static str,
        /// What failed.
        problem: String,
    },
    /// The derived bundle could not be made.
    #[error("building the derived model: {0}")]
    Build(#[from] BuildError),
    /// The store failed or refused.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl FinetuneError {
    /// A data problem whose message holds nothing read from the file.
    fn data(path: &Path, problem: impl Into<String>) -> Self {
        let problem = problem.into();
        Self::Data { path: path.to_owned(), public: problem.clone(), problem }
    }

    /// What may leave the site in a job's report: never a value, a header or a message
    /// of the file's parser, so an order cannot read files through its report.
    pub fn reportable(&self) -> String {
        match self {
            Self::Data { path, public, .. } => {
                format!("training data {}: {public}", path.display())
            }
            Self::Source(SourceError::Io { path, source }) => {
                format!("reading {}: {}", path.display(), source.kind())
            }
            Self::Source(SourceError::Csv { path, .. }) => {
                format!("{}: not CSV of the expected shape", path.display())
            }
            Self::Source(SourceError::Parquet { path, .. }) => {
                format!("{}: not readable Parquet", path.display())
            }
            other => other.to_string(),
        }
    }
}

/// The data file of an ordered job, inside `site` (the site data directory): a relative
/// path is taken from there, and a path that leads out of it, by `..` or a symbolic link,
/// is refused with the same message whether or not it exists.
pub fn confine(file: &Path, site: &Path) -> Result<PathBuf, String> {
    let refused = || {
        format!(
            "the data file must be inside the site data directory {} ([finetune] site_data)",
            site.display()
        )
    };
    let joined = if file.is_absolute() { file.to_owned() } else { site.join(file) };
    if joined.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(refused());
    }
    let site_real = site.canonicalize().map_err(|_| refused())?;
    if !joined.starts_with(site) && !joined.starts_with(&site_real) {
        return Err(refused());
    }
    let real = joined.canonicalize().map_err(|e| {
        format!("data file {} in the site data directory: {}", file.display(), e.kind())
    })?;
    if real.starts_with(&site_real) { Ok(real) } else { Err(refused()) }
}

/// Reads a job file (TOML): how air-gapped sites are given jobs.
pub fn load_job(path: &Path) -> Result<Job, FinetuneError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| FinetuneError::Job(format!("reading {}: {e}", path.display())))?;
    Job::from_toml(&text).map_err(|e| FinetuneError::Job(format!("{}: {e}", path.display())))
}

/// What a job reports as it goes.
pub trait Progress {
    /// A new stage begins ("reading data", "training").
    fn stage(&mut self, stage: &str);
    /// An epoch ended.
    fn epoch(&mut self, stats: &EpochStats);
}

/// A progress sink that ignores everything.
#[derive(Debug, Default)]
pub struct Quiet;

impl Progress for Quiet {
    fn stage(&mut self, _: &str) {}
    fn epoch(&mut self, _: &EpochStats) {}
}

/// A finished fine-tune.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// The derived model's name.
    pub name: String,
    /// Its version (the parent's).
    pub version: u64,
    /// Where it came from, how it trained, what the gate decided.
    pub lineage: Lineage,
    /// The trained head.
    pub head: Dense,
}

/// Runs `job` against the agent's store: trains (a GPU job on the GPU `gpu` opens),
/// builds and installs the derived model, and activates it in place of its parent if the
/// gate passes. Blocking.
pub fn run(
    store: &mut Store,
    job: &Job,
    gpu: GpuOptions,
    now: SystemTime,
    progress: &mut dyn Progress,
) -> Result<Finished, FinetuneError> {
    job.check().map_err(FinetuneError::Job)?;
    let model_err = |problem: String| FinetuneError::Model { model: job.model.clone(), problem };
    // Read once: the parent and, for an entity column, the view's snapshot are among them.
    let installed = store.installed()?;
    let parent = parent(&installed, job)?;
    let spec = parent.manifest.model().ok_or_else(|| model_err("not a model bundle".into()))?;
    let bytes = store.read_content(parent)?;
    let head = head::find(&bytes)
        .map_err(|source| FinetuneError::Head { model: job.model.clone(), source })?;

    progress.stage("reading data");
    let width = input_width(parent).map_err(model_err)?;
    let (inputs, targets) = read_data(store, &installed, parent, &job.data, width)?;
    progress.stage("computing backbone features");
    let features = backbone_features(&bytes, &head, inputs, width)
        .map_err(|problem| FinetuneError::Backbone { model: job.model.clone(), problem })?;
    let examples = Examples {
        features: &features,
        width: head.inputs,
        targets: &targets,
        objective: head.objective,
    };
    let start = Dense {
        inputs: head.inputs,
        outputs: head.outputs,
        weights: head.weights.clone(),
        bias: head.bias.clone(),
    };
    examples.check(&start).map_err(|problem| FinetuneError::Data {
        path: job.data.file.clone(),
        problem,
        public: "the labels do not fit the model's outputs".into(),
    })?;

    progress.stage("training");
    let (outcome, engine) = train(job, gpu, examples, &start, progress)?;
    let gate = job.gate.judge(&outcome.before, &outcome.after);
    let lineage = Lineage {
        parent: parent.manifest.name.clone(),
        parent_version: parent.manifest.version,
        parent_manifest_sha256: parent.manifest_sha256,
        data_sha256: finetune::data_hash(&examples),
        train_rows: outcome.train_rows,
        held_out_rows: outcome.held_out_rows,
        objective: head.objective,
        hyperparameters: job.hyperparameters.clone(),
        engine: engine.to_owned(),
        before: outcome.before,
        after: outcome.after,
        best_epoch: outcome.best_epoch,
        epochs: outcome.epochs.clone(),
        gate,
    };

    progress.stage("installing the derived model");
    let onnx = derived_onnx(&bytes, &head, &outcome).map_err(model_err)?;
    let name = store
        .next_derived_name(&parent.manifest.name)?
        .ok_or_else(|| model_err("its name is too long to derive a model name from".into()))?;
    let manifest = derived_manifest(&parent.manifest, &name, lineage.clone(), now);
    let (manifest, bundle) = BundleBuilder::new(
        &manifest.name,
        manifest.version,
        &manifest.region,
        manifest.created,
        manifest.expires,
        manifest.content,
    )
    .file(spec.file.as_str(), onnx)
    .build_unsigned()?;
    let manifest_bytes = manifest.to_bytes();
    let staged = stage(store, &manifest, &manifest_bytes, &bundle)?;
    store.install_derived(staged, &manifest, &manifest_bytes, lineage.gate.activate, now)?;
    tracing::info!(
        model = %job.model,
        derived = %name,
        version = manifest.version,
        activated = lineage.gate.activate,
        reason = %lineage.gate.reason,
        "fine-tune finished"
    );
    Ok(Finished { name, version: manifest.version, lineage, head: outcome.head })
}

/// Runs a job the control plane ordered, on a store of its own (training can take
/// minutes; the agent's other work goes on), and says how it ended. Blocking.
pub fn run_ordered(
    data_dir: &Path,
    site_data: &Path,
    ordered: &DesiredJob,
    gpu: GpuOptions,
) -> JobReport {
    let failed = |detail: String| JobReport::failed(&ordered.id, detail);
    let mut store = match Store::open(data_dir) {
        Ok(store) => store,
        Err(e) => return failed(e.to_string()),
    };
    let mut job = ordered.job.clone();
    job.data.file = match confine(&job.data.file, site_data) {
        Ok(file) => file,
        Err(refused) => {
            tracing::warn!(job = %ordered.id, file = %ordered.job.data.file.display(), "a fine-tune job's data file is outside the site data directory");
            return failed(refused);
        }
    };
    let mut progress = Logged { job: &ordered.id };
    match run(&mut store, &job, gpu, SystemTime::now(), &mut progress) {
        Ok(finished) => JobReport {
            id: ordered.id.clone(),
            state: JobState::Succeeded,
            detail: Some(finished.lineage.gate.reason.clone()),
            derived: Some(finished.name),
            // The weights leave the site only when the job says they may.
            weights: ordered.share_weights.then_some(HeadWeights {
                inputs: finished.head.inputs as u32,
                outputs: finished.head.outputs as u32,
                weights: finished.head.weights,
                bias: finished.head.bias,
            }),
            lineage: Some(finished.lineage),
        },
        Err(e) => {
            tracing::warn!(job = %ordered.id, error = %e, "fine-tune job failed");
            failed(e.reportable())
        }
    }
}

/// Progress of an ordered job, to the log.
struct Logged<'a> {
    job: &'a str,
}

impl Progress for Logged<'_> {
    fn stage(&mut self, stage: &str) {
        tracing::info!(job = self.job, stage, "fine-tune job");
    }

    fn epoch(&mut self, stats: &EpochStats) {
        tracing::info!(
            job = self.job,
            epoch = stats.epoch,
            train_loss = stats.train_loss,
            held_out_loss = stats.validation.loss,
            "fine-tune epoch"
        );
    }
}

/// The installed model the job names: its version, else the active one. Derived models
/// are not fine-tuned again: their parent is.
fn parent<'a>(installed: &'a [Installed], job: &Job) -> Result<&'a Installed, FinetuneError> {
    let model_err = |problem: String| FinetuneError::Model { model: job.model.clone(), problem };
    let mut versions = installed.iter().filter(|i| i.manifest.name == job.model);
    let found = match job.version {
        Some(v) => versions.find(|i| i.manifest.version == v),
        None => versions.find(|i| i.active),
    };
    let found = found.ok_or_else(|| {
        model_err(match job.version {
            Some(v) => format!("version {v} is not installed"),
            None => "no version is installed and active".into(),
        })
    })?;
    match found.manifest.model() {
        None => Err(model_err("is a feature snapshot, not a model".into())),
        Some(m) if m.lineage.is_some() => {
            Err(model_err("is itself derived by fine-tuning; fine-tune its parent instead".into()))
        }
        Some(_) => Ok(found),
    }
}

/// The width of the model's one FP32 input `[rows, width]`.
fn input_width(parent: &Installed) -> Result<usize, String> {
    let spec = parent.manifest.model().ok_or("not a model bundle")?;
    match spec.signature.inputs.as_slice() {
        [input] => match input.shape.as_slice() {
            [_, Dim::Fixed(width)] if input.datatype == falaj_common::tensor::DataType::Fp32 => {
                Ok(*width as usize)
            }
            _ => Err(format!(
                "input {:?} is not FP32 [rows, features] with a fixed number of features",
                input.name
            )),
        },
        inputs => {
            Err(format!("it has {} inputs; only one-input models are fine-tuned", inputs.len()))
        }
    }
}

/// Reads the model's inputs and the targets from the data file: straight from feature
/// columns, or assembled from the snapshot for an entity column.
fn read_data(
    store: &Store,
    installed: &[Installed],
    parent: &Installed,
    source: &DataSource,
    width: usize,
) -> Result<(Vec<f32>, Vec<f32>), FinetuneError> {
    let path = &source.file;
    let data_err = |problem: String| FinetuneError::data(path, problem);
    let feature_input = parent.manifest.model().and_then(|m| m.features.as_ref());
    let mut sink = Collect {
        label: source.label.clone(),
        entity: source.entity.clone(),
        wanted: match (&source.entity, &source.features, feature_input) {
            (Some(_), Some(_), _) => {
                return Err(data_err("name either an entity column or feature columns".into()));
            }
            (Some(_), None, _) => Some(Vec::new()),
            (None, Some(names), _) => Some(names.clone()),
            (None, None, Some(input)) => Some(input.names.clone()),
            (None, None, None) => None,
        },
        width,
        ..Collect::default()
    };
    let format = Format::detect(path)?;
    match falaj_tables::read(path, format, &mut sink) {
        Ok(_) => {}
        Err(ReadError::Source(e)) => return Err(e.into()),
        Err(ReadError::Sink(problem)) => {
            return Err(FinetuneError::Data {
                path: path.clone(),
                problem: problem.full,
                public: problem.public,
            });
        }
    }
    if sink.targets.is_empty() {
        return Err(data_err("it holds no rows".into()));
    }
    if source.entity.is_none() {
        return Ok((sink.inputs, sink.targets));
    }
    let input = feature_input.ok_or_else(|| {
        data_err(format!(
            "entity column {:?} given, but model {} takes no input from a feature view",
            source.entity.as_deref().unwrap_or_default(),
            parent.manifest.name
        ))
    })?;
    let table = snapshot(store, installed, &input.view).map_err(data_err)?;
    let inputs = features::assemble_from(&table, &parent.manifest.name, input, &sink.entities)
        .map_err(|e| data_err(e.to_string()))?;
    Ok((inputs, sink.targets))
}

/// The agent's active snapshot of `view`, loaded.
fn snapshot(store: &Store, installed: &[Installed], view: &str) -> Result<OnlineTable, String> {
    let active = installed
        .iter()
        .find(|i| i.active && i.manifest.name == view && i.manifest.snapshot().is_some())
        .ok_or_else(|| format!("the agent holds no snapshot of feature view {view:?}"))?;
    features::load(store, active)
}

/// Gathers the inputs (or entity ids) and targets of a data file's rows.
#[derive(Debug, Default)]
struct Collect {
    label: String,
    entity: Option<String>,
    /// Feature columns by name; `None`: every column but the label.
    wanted: Option<Vec<String>>,
    width: usize,
    /// Resolved at the header: the label's, the entity's, and each feature's position.
    label_at: usize,
    entity_at: Option<usize>,
    feature_at: Vec<usize>,
    names: Vec<String>,
    inputs: Vec<f32>,
    targets: Vec<f32>,
    entities: Vec<String>,
}

/// A problem with the data file's rows: in full for the site, and without what was read
/// from the file for a report.
#[derive(Debug)]
struct DataProblem {
    full: String,
    public: String,
}

impl From<String> for DataProblem {
    fn from(full: String) -> Self {
        Self { public: full.clone(), full }
    }
}

impl RowSink for Collect {
    type Error = DataProblem;

    fn header(&mut self, names: &[&str]) -> Result<(), DataProblem> {
        let find = |name: &str| {
            names.iter().position(|n| *n == name).ok_or_else(|| DataProblem {
                full: format!("no column {name:?} (the columns are {})", names.join(", ")),
                public: format!("no column {name:?}"),
            })
        };
        self.label_at = find(&self.label)?;
        self.entity_at = self.entity.as_deref().map(find).transpose()?;
        self.feature_at = match &self.wanted {
            Some(wanted) => wanted.iter().map(|n| find(n)).collect::<Result<_, _>>()?,
            None => (0..names.len()).filter(|&i| i != self.label_at).collect(),
        };
        if self.entity_at.is_none() && self.feature_at.len() != self.width {
            return Err(format!(
                "{} feature columns, but the model takes {} features per row",
                self.feature_at.len(),
                self.width
            )
            .into());
        }
        self.names = names.iter().map(|&n| n.to_owned()).collect();
        Ok(())
    }

    fn row(&mut self, number: u64, cells: &[Cell<'_>]) -> Result<(), DataProblem> {
        let number_at = |at: usize| -> Result<f32, DataProblem> {
            let value = match cells.get(at) {
                Some(Cell::Float(v)) => Some(*v as f32),
                Some(Cell::Int(v)) => Some(*v as f32),
                Some(Cell::Text(t)) => t.trim().parse::<f32>().ok(),
                _ => None,
            };
            value.filter(|v| v.is_finite()).ok_or_else(|| {
                let cell =
                    cells.get(at).map_or_else(|| "(missing)".to_owned(), ToString::to_string);
                DataProblem {
                    full: format!(
                        "row {number}, column {:?}: {cell} is not a finite number",
                        self.names[at]
                    ),
                    public: format!("row {number}, column {}: not a finite number", at + 1),
                }
            })
        };
        self.targets.push(number_at(self.label_at)?);
        match self.entity_at {
            Some(at) => self.entities.push(match cells.get(at) {
                Some(Cell::Text(t)) => (*t).to_owned(),
                Some(Cell::Int(i)) => i.to_string(),
                other => {
                    return Err(DataProblem {
                        full: format!(
                            "row {number}, column {:?}: {} is not an entity id",
                            self.names[at],
                            other.map_or_else(|| "(missing)".to_owned(), ToString::to_string)
                        ),
                        public: format!("row {number}, column {}: not an entity id", at + 1),
                    });
                }
            }),
            None => {
                for &at in &self.feature_at {
                    let v = number_at(at)?;
                    self.inputs.push(v);
                }
            }
        }
        Ok(())
    }
}

/// The features the head reads for each row of `inputs`: the inputs themselves, or the
/// model cut at its head run by tract over chunks of rows.
fn backbone_features(
    bytes: &[u8],
    head: &Head,
    inputs: Vec<f32>,
    width: usize,
) -> Result<Vec<f32>, String> {
    let Some(cut) = head::backbone(bytes, head).map_err(|e| e.to_string())? else {
        return Ok(inputs);
    };
    let model = OnnxModel::load(&cut).map_err(|e| e.to_string())?;
    let rows = inputs.len() / width;
    let mut out = Vec::with_capacity(rows * head.inputs);
    for chunk in inputs.chunks(BACKBONE_ROWS * width) {
        let n = chunk.len() / width;
        let tensor =
            Tensor { shape: vec![n as u64, width as u64], data: TensorData::Fp32(chunk.to_vec()) };
        let result = model.run(vec![tensor]).map_err(|e| e.to_string())?;
        match result.into_iter().next().map(|t| t.data) {
            Some(TensorData::Fp32(values)) if values.len() == n * head.inputs => {
                out.extend_from_slice(&values);
            }
            other => {
                return Err(format!(
                    "tensor {:?} is not {} FP32 values per row: {other:?}",
                    head.input, head.inputs
                ));
            }
        }
    }
    Ok(out)
}

/// Trains on the job's engine.
fn train(
    job: &Job,
    gpu: GpuOptions,
    examples: Examples<'_>,
    start: &Dense,
    progress: &mut dyn Progress,
) -> Result<(Outcome, &'static str), FinetuneError> {
    let hp = &job.hyperparameters;
    let rows = examples.rows();
    let objective = examples.objective;
    match job.engine {
        TrainEngine::Cpu => {
            let mut kernel = CpuKernel::new(examples, start, hp);
            let outcome = finetune::fit(&mut kernel, rows, objective, hp, |e| progress.epoch(e))
                .unwrap_or_else(|never| match never {});
            Ok((outcome, kernel.name()))
        }
        TrainEngine::Gpu => {
            let failed =
                |e: GpuError| FinetuneError::Train { engine: "gpu", problem: e.to_string() };
            let device = Gpu::open(gpu).map_err(failed)?;
            let mut kernel = GpuHeadKernel::new(device, examples, start, hp).map_err(failed)?;
            let outcome = finetune::fit(&mut kernel, rows, objective, hp, |e| progress.epoch(e))
                .map_err(failed)?;
            Ok((outcome, kernel.name()))
        }
    }
}

/// The parent's ONNX with the trained head, checked to load with tract and to keep the
/// parent's signature.
fn derived_onnx(bytes: &[u8], head: &Head, outcome: &Outcome) -> Result<Vec<u8>, String> {
    let onnx = head::replace(bytes, head, &outcome.head.weights, &outcome.head.bias)
        .map_err(|e| e.to_string())?;
    let derived =
        OnnxModel::load(&onnx).map_err(|e| format!("the derived model does not load: {e}"))?;
    let parent = OnnxModel::load(bytes).map_err(|e| e.to_string())?;
    if derived.signature() != parent.signature() {
        return Err("the derived model's signature differs from its parent's".into());
    }
    Ok(onnx)
}

/// The derived model's manifest: the parent's, renamed, with its lineage; it expires
/// with its parent.
fn derived_manifest(parent: &Manifest, name: &str, lineage: Lineage, now: SystemTime) -> Manifest {
    let mut manifest = parent.clone();
    name.clone_into(&mut manifest.name);
    manifest.created = Timestamp::from_system(now);
    manifest.files.clear();
    if let Content::Model(spec) = &mut manifest.content {
        spec.lineage = Some(Box::new(lineage));
    }
    manifest
}

/// Writes a bundle to a sealed, fsynced staging file.
fn stage(
    store: &Store,
    manifest: &Manifest,
    manifest_bytes: &[u8],
    bundle: &[u8],
) -> Result<Sealed, StoreError> {
    let staging = store.staging_dir();
    let io =
        |source| StoreError::Io { op: "staging derived bundle in", path: staging.clone(), source };
    let mut file = store.stage(manifest, manifest_bytes, "derived-")?;
    file.write_all(bundle).map_err(io)?;
    file.finish().map_err(io)
}
