//! Fine-tune jobs as they are written: on an agent's command line, in a job file for an
//! air-gapped site, or in a control plane's desired-state document; and what an agent
//! reports of each.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Gate, Hyperparameters, Lineage};
use crate::names;

/// Where the training rows come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSource {
    /// A CSV (with a header) or Parquet file on the agent.
    pub file: PathBuf,
    /// The column holding the label: a class index for classifiers, the target value for
    /// regressors.
    pub label: String,
    /// The columns holding the model's input features, in input order. Default: the
    /// model's feature-view inputs, else every other column in file order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<Vec<String>>,
    /// A column of entity ids instead of features: each row's input is assembled from the
    /// agent's snapshot of the model's feature view, as inference by entity does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
}

/// Where the head trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainEngine {
    /// The CPU.
    #[default]
    Cpu,
    /// The GPU (through wgpu).
    Gpu,
}

/// A fine-tune job: from the command line, from a job file (air-gapped sites), or from
/// the control plane's desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Job {
    /// The model to fine-tune.
    pub model: String,
    /// Its version; default: the active one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The training data.
    pub data: DataSource,
    /// How to train.
    #[serde(default)]
    pub hyperparameters: Hyperparameters,
    /// When the result replaces its parent.
    #[serde(default)]
    pub gate: Gate,
    /// Where to train.
    #[serde(default)]
    pub engine: TrainEngine,
}

impl Job {
    /// Reads a job file (TOML), checked.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let job: Self = toml::from_str(text).map_err(|e| e.to_string().trim().to_owned())?;
        job.check()?;
        Ok(job)
    }

    /// Checks the names and the hyperparameters, naming the first problem.
    pub fn check(&self) -> Result<(), String> {
        names::check_model_name(&self.model).map_err(|e| e.to_string())?;
        if self.data.label.is_empty() {
            return Err("the data's label column is not named".into());
        }
        if self.data.entity.is_some() && self.data.features.is_some() {
            return Err("name either an entity column or feature columns, not both".into());
        }
        if !(self.gate.min_improvement.is_finite() && self.gate.min_improvement >= 0.0) {
            return Err(format!(
                "gate.min_improvement must be 0 or more, not {}",
                self.gate.min_improvement
            ));
        }
        self.hyperparameters.check()
    }
}

/// A job the control plane orders in an agent's desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredJob {
    /// The job's identifier, unique on the control plane; an agent runs each id once.
    pub id: String,
    /// What to do.
    pub job: Job,
    /// Whether the trained head's weights may leave the site in the agent's report;
    /// otherwise only figures do.
    #[serde(default)]
    pub share_weights: bool,
}

/// Where a job stands on its agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted, not started.
    Pending,
    /// Training.
    Running,
    /// Finished: a derived model is installed (active or not, as the gate decided).
    Succeeded,
    /// Refused or failed; the detail says why.
    Failed,
}

impl JobState {
    /// The state's name, as stored and shown.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    /// The state of a stored name.
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Pending, Self::Running, Self::Succeeded, Self::Failed]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

/// A trained head's weights, when the job allows them to leave the site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeadWeights {
    /// Features in.
    pub inputs: u32,
    /// Outputs.
    pub outputs: u32,
    /// `[outputs, inputs]`, row-major.
    pub weights: Vec<f32>,
    /// One per output.
    pub bias: Vec<f32>,
}

/// What an agent reports of a job (no field is skipped when empty: reports travel as
/// postcard, which is not self-describing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobReport {
    /// The job.
    pub id: String,
    /// Where it stands.
    pub state: JobState,
    /// Why it failed, or what the gate decided.
    pub detail: Option<String>,
    /// The derived model's name, once installed.
    pub derived: Option<String>,
    /// Its lineage: the figures before and after, the loss curve, the gate.
    pub lineage: Option<Lineage>,
    /// The trained head, only if the job allows it to leave the site.
    pub weights: Option<HeadWeights>,
}

impl JobReport {
    /// Where a job stands, before it has anything more to report.
    pub fn state(id: &str, state: JobState) -> Self {
        Self { id: id.to_owned(), state, detail: None, derived: None, lineage: None, weights: None }
    }

    /// A job that failed, and why.
    pub fn failed(id: &str, detail: String) -> Self {
        Self { detail: Some(detail), ..Self::state(id, JobState::Failed) }
    }
}
