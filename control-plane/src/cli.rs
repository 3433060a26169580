//! The `falaj-control` command line (offline part): `keys init`, `bundle build`,
//! `bundle inspect` and `sample`.
//!
//! Exit codes: 0 success, 1 failure, 64 usage error, 65 a bundle that fails
//! verification, 78 bad configuration or input.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use falaj_common::bundle::RuntimeHint;
use falaj_common::trust::TrustRoot;

use crate::bundle::{self, BuildOptions, BundleError};
use crate::keys::{self, InitOptions, KeysError};
use crate::sample::{self, SampleOptions};

/// Exit code for a usage error (`EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for a bundle that fails verification (`EX_DATAERR`).
pub const EXIT_REFUSED: u8 = 65;
/// Exit code for bad configuration or input (`EX_CONFIG`).
pub const EXIT_CONFIG: u8 = 78;

/// Falaj control plane: keys, bundles, and (later) the fleet.
#[derive(Debug, Parser)]
#[command(name = "falaj-control", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The control plane's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage signing keys and the trust root.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Build and inspect bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Train the sample model and write it with its reference and hold-out data.
    Sample(SampleArgs),
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create root and signing keys and the signed trust root `DIR/root.json`.
    Init(KeysInitArgs),
}

/// Arguments of `keys init`.
#[derive(Debug, Args)]
pub struct KeysInitArgs {
    /// Directory for the keys (created with mode 0700).
    #[arg(long)]
    dir: PathBuf,
    /// The control plane's region.
    #[arg(long)]
    region: String,
    /// Root keys to create.
    #[arg(long, default_value_t = 1)]
    root_keys: usize,
    /// Root signatures a trust root needs.
    #[arg(long, default_value_t = 1)]
    root_threshold: u32,
    /// Bundle-signing keys to create.
    #[arg(long, default_value_t = 1)]
    signing_keys: usize,
    /// Signatures each bundle needs.
    #[arg(long, default_value_t = 1)]
    signing_threshold: u32,
    /// Lifetime of the trust root (e.g. 2y, 180d).
    #[arg(long, default_value = "2y", value_parser = humantime::parse_duration)]
    expires_in: Duration,
}

/// `bundle` subcommands.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Build and sign a model bundle.
    Build(BuildArgs),
    /// Print a bundle's manifest and whether it verifies.
    Inspect(InspectArgs),
}

/// Arguments of `bundle build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The keys directory made by `keys init`.
    #[arg(long)]
    keys: PathBuf,
    /// The ONNX model.
    #[arg(long)]
    model: PathBuf,
    /// The model's name (lowercase letters, digits, '-', '_', '.').
    #[arg(long)]
    name: String,
    /// The version, from 1.
    #[arg(long)]
    version: u64,
    /// Reference data (CSV with one column per input feature), profiled for drift.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Which engine agents should use: cpu, gpu or auto.
    #[arg(long, default_value = "auto")]
    runtime: RuntimeHint,
    /// How long agents may import the bundle (e.g. 365d).
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    expires_in: Duration,
    /// Where to write the bundle.
    #[arg(long)]
    out: PathBuf,
}

/// Arguments of `bundle inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The bundle file.
    file: PathBuf,
    /// A trust root to verify against (`root.json`).
    #[arg(long)]
    trust: Option<PathBuf>,
    /// Print the manifest as JSON instead of a report.
    #[arg(long)]
    json: bool,
}

/// Arguments of `sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Directory to write model.onnx, reference.csv and holdout.csv into.
    #[arg(long)]
    out: PathBuf,
    /// Training rows.
    #[arg(long, default_value_t = SampleOptions::default().rows)]
    rows: usize,
    /// Seed for the data and the training.
    #[arg(long, default_value_t = SampleOptions::default().seed)]
    seed: u64,
}

/// A command's failure, with its exit code.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        Self { code, error: error.into() }
    }
}

fn keys_failure(err: KeysError) -> Failure {
    let code = match err {
        KeysError::Io { .. } => 1,
        _ => EXIT_CONFIG,
    };
    Failure::new(code, err)
}

fn bundle_failure(err: BundleError) -> Failure {
    match err {
        BundleError::Keys(e) => keys_failure(e),
        BundleError::Io { .. } => Failure::new(1, err),
        other => Failure::new(EXIT_CONFIG, other),
    }
}

/// Runs a parsed command line; prints errors and returns the exit code.
pub fn run(cli: Cli) -> ExitCode {
    let now = SystemTime::now();
    let result = match cli.command {
        Command::Keys(KeysCommand::Init(args)) => keys_init(&args, now),
        Command::Bundle(BundleCommand::Build(args)) => bundle_build(args, now),
        Command::Bundle(BundleCommand::Inspect(args)) => bundle_inspect(&args, now),
        Command::Sample(args) => sample(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("falaj-control: error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

fn keys_init(args: &KeysInitArgs, now: SystemTime) -> Result<(), Failure> {
    let options = InitOptions {
        region: args.region.clone(),
        root_keys: args.root_keys,
        root_threshold: args.root_threshold,
        signing_keys: args.signing_keys,
        signing_threshold: args.signing_threshold,
        lifetime: args.expires_in,
    };
    let trust = keys::init(&args.dir, &options, now).map_err(keys_failure)?;
    println!(
        "created {} root key(s) (threshold {}) and {} signing key(s) (threshold {}) in {}",
        args.root_keys,
        args.root_threshold,
        args.signing_keys,
        args.signing_threshold,
        args.dir.display()
    );
    println!(
        "trust root: {} (version {}, region {}, expires {})",
        args.dir.join(keys::ROOT_FILE).display(),
        trust.version(),
        trust.region(),
        trust.metadata().expires
    );
    println!("keep the root-*.key files offline; agents need only root.json");
    Ok(())
}

fn bundle_build(args: BuildArgs, now: SystemTime) -> Result<(), Failure> {
    let options = BuildOptions {
        keys: args.keys,
        model: args.model,
        name: args.name,
        version: args.version,
        reference: args.reference,
        runtime: args.runtime,
        lifetime: args.expires_in,
        out: args.out,
    };
    let manifest = bundle::build(&options, now).map_err(bundle_failure)?;
    let model = manifest.model().expect("built as a model bundle");
    println!(
        "built {} version {} for region {} -> {} (expires {})",
        manifest.name,
        manifest.version,
        manifest.region,
        options.out.display(),
        manifest.expires
    );
    let io: Vec<String> = model
        .signature
        .inputs
        .iter()
        .map(|t| format!("in {} {}", t.name, t.datatype))
        .chain(model.signature.outputs.iter().map(|t| format!("out {} {}", t.name, t.datatype)))
        .collect();
    println!("signature: {}", io.join(", "));
    if let Some(reference) = &model.reference {
        println!(
            "reference profile: {} rows, {} input columns, {} output columns",
            reference.rows,
            reference.inputs.len(),
            reference.outputs.len()
        );
    }
    Ok(())
}

fn bundle_inspect(args: &InspectArgs, now: SystemTime) -> Result<(), Failure> {
    let trust = args
        .trust
        .as_ref()
        .map(|path| {
            let bytes = std::fs::read(path).map_err(|e| {
                Failure::new(1, anyhow::anyhow!("reading trust root {}: {e}", path.display()))
            })?;
            TrustRoot::from_json(&bytes, now).map_err(|e| {
                Failure::new(EXIT_CONFIG, anyhow::anyhow!("trust root {}: {e}", path.display()))
            })
        })
        .transpose()?;
    let inspection = bundle::inspect(&args.file, trust.as_ref(), now).map_err(bundle_failure)?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&inspection.manifest).expect("manifests serialise")
        );
    } else {
        print!("{}", inspection.report(&args.file));
    }
    match inspection.verified {
        Some(Err(e)) => Err(Failure::new(
            EXIT_REFUSED,
            anyhow::anyhow!("{}: does not verify: {e}", args.file.display()),
        )),
        _ => Ok(()),
    }
}

fn sample(args: &SampleArgs) -> Result<(), Failure> {
    let options = SampleOptions { rows: args.rows, seed: args.seed };
    let made = sample::write(&args.out, &options).map_err(|e| {
        Failure::new(1, anyhow::anyhow!("writing the sample into {}: {e}", args.out.display()))
    })?;
    println!(
        "trained the sample pump-fault classifier on {} rows: hold-out accuracy {:.1}% (majority class {:.1}%), {} epochs",
        args.rows,
        made.holdout_accuracy * 100.0,
        made.majority_share * 100.0,
        made.report.epochs.len()
    );
    println!("model:     {}", made.model.display());
    println!("reference: {}", made.reference.display());
    println!("hold-out:  {}", made.holdout.display());
    Ok(())
}
