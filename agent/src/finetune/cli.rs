//! `falaj-agent finetune`: a fine-tune job from flags or from a job file, with a progress
//! bar on a terminal, a table of the epochs and the gate's decision.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::SystemTime;

use clap::Args;
use falaj_common::finetune::{EpochStats, Gate, Hyperparameters, Metrics, Optimizer};
use falaj_gpu::GpuOptions;

use super::{DataSource, FinetuneError, Job, Progress, TrainEngine};
use crate::cli::{DataDir, Failure};
use crate::store::Store;

/// Arguments of `finetune`.
#[derive(Debug, Args)]
pub struct FinetuneArgs {
    /// The model, as NAME or NAME@VERSION (default: the active version).
    #[arg(long, required_unless_present = "job", conflicts_with = "job")]
    model: Option<String>,
    /// The training data: a CSV (with a header) or Parquet file.
    #[arg(long, required_unless_present = "job", conflicts_with = "job")]
    data: Option<PathBuf>,
    /// The label column: a class index (classifiers) or the target (regressors).
    #[arg(long, required_unless_present = "job", conflicts_with = "job")]
    label: Option<String>,
    /// The feature columns, in the model's input order, comma-separated (default: the
    /// model's feature-view inputs, else every column but the label).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["job", "entity"])]
    features: Option<Vec<String>>,
    /// A column of entity ids: inputs are assembled from the agent's feature snapshot.
    #[arg(long, conflicts_with = "job")]
    entity: Option<String>,
    /// A job file (TOML) instead of the flags above: how air-gapped sites are given jobs.
    #[arg(long)]
    job: Option<PathBuf>,
    /// Where to train (default cpu; gpu needs a Vulkan adapter).
    #[arg(long, value_enum, conflicts_with = "job")]
    engine: Option<EngineArg>,
    /// SGD or Adam (default adam).
    #[arg(long, value_enum, conflicts_with = "job")]
    optimizer: Option<OptimizerArg>,
    /// The step size (default 0.01).
    #[arg(long, conflicts_with = "job")]
    learning_rate: Option<f32>,
    /// Rows per step (default 64).
    #[arg(long, conflicts_with = "job")]
    batch_size: Option<u32>,
    /// Most passes over the data (default 30).
    #[arg(long, conflicts_with = "job")]
    epochs: Option<u32>,
    /// Epochs without a better held-out loss before stopping (default 4).
    #[arg(long, conflicts_with = "job")]
    patience: Option<u32>,
    /// L2 penalty on the weights (default 1e-4).
    #[arg(long, conflicts_with = "job")]
    l2: Option<f32>,
    /// Share of rows held out for early stopping and the gate (default 0.2).
    #[arg(long, conflicts_with = "job")]
    validation_fraction: Option<f64>,
    /// Seeds the split and the shuffles (default 42).
    #[arg(long, conflicts_with = "job")]
    seed: Option<u64>,
    /// The improvement the gate requires: accuracy points (0.01 = one point) for
    /// classifiers, the share by which squared error falls for regressors (default 0.01).
    #[arg(long, conflicts_with = "job")]
    min_improvement: Option<f64>,
    #[command(flatten)]
    dir: DataDir,
}

/// `--engine`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum EngineArg {
    Cpu,
    Gpu,
}

/// `--optimizer`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OptimizerArg {
    Sgd,
    Adam,
}

impl FinetuneArgs {
    /// The job the flags (or the job file) describe.
    fn job(&self) -> Result<Job, FinetuneError> {
        if let Some(path) = &self.job {
            return super::load_job(path);
        }
        let model = self.model.clone().unwrap_or_default();
        let (model, version) = match model.split_once('@') {
            Some((name, v)) => {
                let v = v.parse().map_err(|_| {
                    FinetuneError::Job(format!("--model {model}: {v:?} is not a version number"))
                })?;
                (name.to_owned(), Some(v))
            }
            None => (model, None),
        };
        let d = Hyperparameters::default();
        Ok(Job {
            model,
            version,
            data: DataSource {
                file: self.data.clone().unwrap_or_default(),
                label: self.label.clone().unwrap_or_default(),
                features: self.features.clone(),
                entity: self.entity.clone(),
            },
            hyperparameters: Hyperparameters {
                optimizer: match self.optimizer {
                    Some(OptimizerArg::Sgd) => Optimizer::Sgd,
                    Some(OptimizerArg::Adam) => Optimizer::Adam,
                    None => d.optimizer,
                },
                learning_rate: self.learning_rate.unwrap_or(d.learning_rate),
                batch_size: self.batch_size.unwrap_or(d.batch_size),
                max_epochs: self.epochs.unwrap_or(d.max_epochs),
                patience: self.patience.unwrap_or(d.patience),
                l2: self.l2.unwrap_or(d.l2),
                validation_fraction: self.validation_fraction.unwrap_or(d.validation_fraction),
                seed: self.seed.unwrap_or(d.seed),
            },
            gate: Gate {
                min_improvement: self.min_improvement.unwrap_or(Gate::default().min_improvement),
            },
            engine: match self.engine {
                Some(EngineArg::Gpu) => TrainEngine::Gpu,
                Some(EngineArg::Cpu) | None => TrainEngine::Cpu,
            },
        })
    }
}

/// Prints each epoch as a table row; on a terminal, a progress bar over the epochs.
struct Report {
    bar: Option<indicatif::ProgressBar>,
    header_printed: bool,
}

impl Report {
    fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }
}

impl Progress for Report {
    fn stage(&mut self, stage: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(stage.to_owned());
        }
    }

    fn epoch(&mut self, stats: &EpochStats) {
        if !self.header_printed {
            self.header_printed = true;
            let accuracy = if stats.validation.accuracy.is_some() { "ACCURACY" } else { "" };
            let header =
                format!("{:>5}  {:>12}  {:>12}  {accuracy:>12}", "EPOCH", "TRAIN LOSS", "HELD-OUT");
            self.println(header.trim_end());
        }
        let accuracy = stats.validation.accuracy.map_or_else(String::new, |a| format!("{a:>12.4}"));
        let line = format!(
            "{:>5}  {:>12.6}  {:>12.6}  {accuracy}",
            stats.epoch, stats.train_loss, stats.validation.loss
        );
        self.println(line.trim_end());
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }
}

fn describe(m: &Metrics) -> String {
    match m.accuracy {
        Some(a) => format!("accuracy {a:.4}, loss {:.6}", m.loss),
        None => format!("mean squared error {:.6}", m.loss),
    }
}

/// Runs `falaj-agent finetune`.
pub fn run(args: &FinetuneArgs) -> Result<(), Failure> {
    let job = args.job().map_err(|e| Failure::Config(e.into()))?;
    let config = args.dir.config()?;
    let data_dir = args.dir.data_dir.clone().unwrap_or(config.data_dir);
    let gpu = GpuOptions { allow_software: config.engine.allow_software_gpu };
    let mut store = Store::open(&data_dir).map_err(crate::cli::store_failure)?;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(u64::from(job.hyperparameters.max_epochs));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] epoch {pos}/{len} {elapsed}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar
    });
    let mut report = Report { bar, header_printed: false };
    let finished = super::run(&mut store, &job, gpu, SystemTime::now(), &mut report);
    if let Some(bar) = &report.bar {
        bar.finish_and_clear();
    }
    let finished = finished.map_err(|e| match e {
        FinetuneError::Store(_) => Failure::Other(e.into()),
        FinetuneError::Job(_) => Failure::Config(e.into()),
        other => Failure::Refused(other.into()),
    })?;
    let lineage = &finished.lineage;
    println!(
        "trained {} rows ({} held out) on the {}; kept epoch {} of {}",
        lineage.train_rows,
        lineage.held_out_rows,
        lineage.engine,
        lineage.best_epoch,
        lineage.epochs.len()
    );
    println!("  {}@{}: {}", lineage.parent, lineage.parent_version, describe(&lineage.before));
    println!("  {}@{}: {}", finished.name, finished.version, describe(&lineage.after));
    if lineage.gate.activate {
        println!(
            "activated: {} now serves requests for {} ({})",
            finished.name, lineage.parent, lineage.gate.reason
        );
    } else {
        println!(
            "installed {} inactive: {}; it serves only when asked for by name",
            finished.name, lineage.gate.reason
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: FinetuneArgs,
    }

    /// The defaults `--help` names are the trainer's and the gate's.
    #[test]
    fn flags_left_out_take_the_documented_defaults() {
        let parsed =
            Wrapper::parse_from(["x", "--model", "pumps@3", "--data", "d.csv", "--label", "y"]);
        let job = parsed.args.job().unwrap();
        assert_eq!((job.model.as_str(), job.version), ("pumps", Some(3)));
        let h = &job.hyperparameters;
        assert_eq!(*h, Hyperparameters::default());
        assert_eq!(
            (h.optimizer, h.learning_rate, h.batch_size, h.max_epochs, h.patience, h.l2, h.seed),
            (Optimizer::Adam, 0.01, 64, 30, 4, 1e-4, 42)
        );
        assert!((h.validation_fraction - 0.2).abs() < 1e-12);
        assert!((job.gate.min_improvement - 0.01).abs() < 1e-12);
        assert_eq!(job.engine, TrainEngine::Cpu);
        let bad =
            Wrapper::parse_from(["x", "--model", "pumps@v3", "--data", "d.csv", "--label", "y"]);
        assert_eq!(
            bad.args.job().unwrap_err().to_string(),
            "fine-tune job: --model pumps@v3: \"v3\" is not a version number"
        );
    }
}
