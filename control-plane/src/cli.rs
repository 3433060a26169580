//! The `falaj-control` command line. Offline: `keys init|rotate-root|rotate-signing|status`,
//! `bundle build`, `bundle inspect`, `sample`. The daemon: `serve`. Against a running control plane,
//! through its admin API: `bundle push|list`, `token create`, `agents`, `agent revoke`,
//! `deploy`, `undeploy`, `metrics`, `alerts`, `features ...`, `finetune ...`,
//! `rollout ...`, `audit ...`, and people and credentials: `user ...`, `login`, `logout`,
//! `whoami`, `apitoken ...`.
//!
//! Exit codes: 0 success, 1 failure, 64 usage error, 65 a bundle that fails
//! verification, 78 bad configuration or input.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use falaj_common::bundle::{FeatureInput, RuntimeHint};
use falaj_common::drift::DriftScores;
use falaj_common::metrics::ColumnDrift;
use falaj_common::tensor::InputShape;
use falaj_common::text::printable;
use falaj_common::time::Timestamp;
use falaj_common::trust::{Role, TrustRoot};

use crate::admin::{AlertsView, MetricsView};
use crate::bundle::{self, BuildOptions, BundleError};
use crate::client::{AdminClient, ClientError};
use crate::config::{self, ControlConfig};
use crate::daemon::{ControlPlane, ServeConfig, ServeError};
use crate::keys::{self, InitOptions, KeysError, RotateOptions};
use crate::sample::{self, SampleOptions};
use crate::vault::{self, Secret, UnsealFrom, VaultError};
use falaj_common::config::Checked as _;
use falaj_shell::daemon::{self as systemd, shutdown_signal};

/// Exit code for a usage error (`EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for a bundle that fails verification (`EX_DATAERR`).
pub const EXIT_REFUSED: u8 = 65;
/// Exit code for bad configuration or input (`EX_CONFIG`).
pub const EXIT_CONFIG: u8 = 78;

/// Falaj control plane: keys and trust roots, bundles, the fleet, rollouts, monitoring,
/// the feature store, fine-tuning, people and the audit log.
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
    /// Run the control plane daemon (QUIC for agents, HTTP admin API).
    Serve(ServeArgs),
    /// Check a configuration file without starting anything.
    CheckConfig(CheckConfigArgs),
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// List agents: group, status, held and active versions, errors.
    Agents(ApiArgs),
    /// Act on one agent.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Deploy NAME@VERSION to a group.
    Deploy(DeployArgs),
    /// Remove a model from a group.
    Undeploy(UndeployArgs),
    /// Show a model's traffic, errors, latency and drift, per version.
    Metrics(MetricsArgs),
    /// Show alerts firing and the latest alert events.
    Alerts(AlertsArgs),
    /// The feature store: views, ingest, snapshots for agents, training exports.
    #[command(subcommand)]
    Features(crate::features::cli::FeaturesCommand),
    /// Fine-tune jobs for agents: order one from a job file, list them, show one.
    #[command(subcommand)]
    Finetune(crate::finetune::cli::FinetuneCommand),
    /// The audit log: list entries, export it, verify an export offline.
    #[command(subcommand)]
    Audit(crate::audit::cli::AuditCommand),
    /// Rollouts of a new version: canary, A/B or shadow, with guards; status, promote,
    /// abort, pause, resume, list.
    #[command(subcommand)]
    Rollout(crate::rollouts::cli::RolloutCommand),
    /// Users and their roles (admins): add, list, set-role, disable, enable, remove,
    /// reset-password.
    #[command(subcommand)]
    User(crate::auth::cli::UserCommand),
    /// Log in as a user; the session is stored in ~/.config/falaj/session for the
    /// commands that follow.
    Login(crate::auth::cli::LoginArgs),
    /// End the stored session.
    Logout,
    /// Show who the credentials in use are, their role and permissions.
    Whoami(ApiArgs),
    /// API tokens for automation: create (shown once), list, revoke.
    #[command(subcommand)]
    Apitoken(crate::auth::cli::ApiTokenCommand),
}

/// Arguments of `metrics`.
#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// The model.
    model: String,
    /// Only this version.
    #[arg(long)]
    version: Option<u64>,
    /// Only agents of this group.
    #[arg(long)]
    group: Option<String>,
    /// Only this agent.
    #[arg(long)]
    agent: Option<String>,
    /// How far back: windows starting within this duration.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    since: Duration,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `alerts`.
#[derive(Debug, Args)]
pub struct AlertsArgs {
    /// How many of the latest events to show.
    #[arg(long, default_value_t = 20)]
    limit: u64,
    #[command(flatten)]
    api: ApiArgs,
}

/// Where the running control plane's admin API is, and the credentials for it: the
/// token given, else the session `falaj-control login` stored for that URL, else the
/// admin token in DATA_DIR/admin.token.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The admin API's URL.
    #[arg(long, env = "FALAJ_CONTROL_PLANE", default_value = "http://127.0.0.1:7080")]
    control_plane: String,
    /// A bearer token: an API token, a session, or the admin token (default: the stored
    /// session for this URL, else DATA_DIR/admin.token).
    #[arg(long, env = "FALAJ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The control plane's data directory, to read the admin token from.
    #[arg(long, env = "FALAJ_CONTROL_DATA_DIR", default_value = "/var/lib/falaj-control")]
    data_dir: PathBuf,
}

impl ApiArgs {
    pub(crate) fn client(&self) -> Result<AdminClient, Failure> {
        let token = if let Some(token) = &self.token {
            token.clone()
        } else if let Some(token) = crate::auth::cli::session_token_for(&self.control_plane)? {
            token
        } else {
            let path = self.data_dir.join(crate::daemon::ADMIN_TOKEN_FILE);
            std::fs::read_to_string(&path).map(|t| t.trim().to_owned()).map_err(|e| {
                Failure::new(
                    EXIT_CONFIG,
                    anyhow::anyhow!(
                        "no credentials: pass --token or FALAJ_TOKEN, log in (falaj-control login), or make {} readable ({e})",
                        path.display()
                    ),
                )
            })?
        };
        Ok(AdminClient::new(&self.control_plane, &token))
    }
}

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The configuration file (default: /etc/falaj/control.toml if it exists).
    #[arg(long, env = "FALAJ_CONTROL_CONFIG")]
    config: Option<PathBuf>,
    /// The data directory (state, keys, blobs, admin token) [config: data_dir].
    #[arg(long, env = "FALAJ_CONTROL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// UDP address for agents (QUIC) [config: quic.listen].
    #[arg(long)]
    quic: Option<std::net::SocketAddr>,
    /// TCP address for the admin API [config: admin.listen].
    #[arg(long)]
    admin: Option<std::net::SocketAddr>,
    /// The region; needed on the first start, when keys are created [config: region].
    #[arg(long)]
    region: Option<String>,
    /// Extra DNS names or IP addresses for the TLS certificate [config: quic.server_names].
    #[arg(long = "server-name")]
    server_names: Vec<String>,
    /// Lifetime of desired-state documents [config: policy.desired_ttl].
    #[arg(long, value_parser = humantime::parse_duration)]
    desired_ttl: Option<Duration>,
    /// Lifetime of agent certificates [config: policy.cert_ttl].
    #[arg(long, value_parser = humantime::parse_duration)]
    cert_ttl: Option<Duration>,
    /// How often agents report [config: policy.heartbeat].
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat: Option<Duration>,
    /// Where the secret that opens sealed keys comes from: stdin (its first line, e.g.
    /// from `systemd-ask-password`), credential (systemd's `falaj-keys`, from
    /// `LoadCredentialEncrypted=`) or file:PATH [default: the credential when the unit
    /// provides it].
    #[arg(long)]
    unseal_from: Option<UnsealFrom>,
}

/// Arguments of `check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The configuration file.
    #[arg(long, env = "FALAJ_CONTROL_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a one-time enrollment token for a group.
    Create(TokenCreateArgs),
}

/// Arguments of `token create`.
#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// The group the agent will join.
    #[arg(long)]
    group: String,
    /// How long the token may be used.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    #[command(flatten)]
    api: ApiArgs,
}

/// `agent` subcommands.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Revoke an agent: its connection is dropped and its certificate refused.
    Revoke(RevokeArgs),
}

/// Arguments of `agent revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The agent's id.
    agent: String,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// What to deploy, as NAME@VERSION.
    target: String,
    /// The group.
    #[arg(long)]
    group: String,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `undeploy`.
#[derive(Debug, Args)]
pub struct UndeployArgs {
    /// The model.
    name: String,
    /// The group.
    #[arg(long)]
    group: String,
    #[command(flatten)]
    api: ApiArgs,
}

/// `keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create root and signing keys and the signed trust root `DIR/root.json`.
    Init(KeysInitArgs),
    /// Write the trust root's next version with new root keys (or, with `--keep-keys`,
    /// the same ones and a new expiry), signed by the current root keys and the new ones.
    RotateRoot(RotateRootArgs),
    /// Write the trust root's next version with new bundle-signing keys; bundles signed by
    /// the old ones stop verifying on agents that take it.
    RotateSigning(RotateSigningArgs),
    /// Show every version of the trust root, its keys and thresholds, which private keys
    /// this directory holds, and what expires soon.
    Status(KeysDirArgs),
    /// Seal every private key of the directory under a secret (a passphrase or a systemd
    /// credential): from then on no key is in plaintext on disk, and `serve`, `bundle
    /// build` and rotations need the secret (`--unseal-from`).
    Seal(KeysSealArgs),
}

/// Arguments of `keys seal`.
#[derive(Debug, Args)]
pub struct KeysSealArgs {
    /// The keys directory (the daemon's is DATA_DIR/keys); stop the daemon first.
    #[arg(long, alias = "dir")]
    keys: PathBuf,
    /// Where the secret comes from: stdin (its first line), credential (systemd's
    /// `falaj-keys`) or file:PATH. With --rekey, the current secret.
    #[arg(long, default_value = "stdin")]
    unseal_from: UnsealFrom,
    /// Change the secret of a sealed directory: the master key is wrapped anew under the
    /// secret from here (stdin: the line after the current secret's).
    #[arg(long, value_name = "SOURCE")]
    rekey: Option<UnsealFrom>,
}

/// The keys directory of a `keys` command.
#[derive(Debug, Args)]
pub struct KeysDirArgs {
    /// The keys directory made by `keys init`.
    #[arg(long, alias = "dir")]
    keys: PathBuf,
    /// Where the root keys are, when kept offline (`keys init --offline-root DIR`).
    #[arg(long)]
    root_keys_dir: Option<PathBuf>,
    /// Where the secret of sealed keys comes from: stdin, credential or file:PATH
    /// [default: systemd's `falaj-keys` credential when there is one].
    #[arg(long)]
    unseal_from: Option<UnsealFrom>,
}

/// Arguments of `keys rotate-root`.
#[derive(Debug, Args)]
pub struct RotateRootArgs {
    #[command(flatten)]
    dir: KeysDirArgs,
    /// New root keys to make [default: as many as the current root has].
    #[arg(long, conflicts_with = "keep_keys")]
    root_keys: Option<usize>,
    /// Root signatures the new root needs [default: unchanged, at most the key count].
    #[arg(long)]
    root_threshold: Option<u32>,
    /// Keep the current root keys: only the expiry (and threshold) change.
    #[arg(long)]
    keep_keys: bool,
    /// Lifetime of the new root, from now (e.g. 2y, 180d).
    #[arg(long, default_value = "2y", value_parser = humantime::parse_duration)]
    expires_in: Duration,
}

/// Arguments of `keys rotate-signing`.
#[derive(Debug, Args)]
pub struct RotateSigningArgs {
    #[command(flatten)]
    dir: KeysDirArgs,
    /// New signing keys to make [default: as many as the current root lists].
    #[arg(long)]
    signing_keys: Option<usize>,
    /// Signatures each bundle needs [default: unchanged, at most the key count].
    #[arg(long)]
    signing_threshold: Option<u32>,
    /// Lifetime of the new root, from now (e.g. 2y, 180d).
    #[arg(long, default_value = "2y", value_parser = humantime::parse_duration)]
    expires_in: Duration,
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
    /// Write the root keys to this directory instead (removable media the operator
    /// carries), so that the control plane's host never holds them.
    #[arg(long)]
    offline_root: Option<PathBuf>,
}

/// `bundle` subcommands.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Build and sign a model bundle.
    Build(BuildArgs),
    /// Print a bundle's manifest and whether it verifies.
    Inspect(InspectArgs),
    /// Register a bundle with the running control plane.
    Push(PushArgs),
    /// List the bundles registered with the running control plane.
    List(ApiArgs),
}

/// Arguments of `bundle push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The bundle file.
    file: PathBuf,
    #[command(flatten)]
    api: ApiArgs,
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
    /// The feature view (VIEW@VERSION) the model's input is assembled from, so requests
    /// may name an entity instead of giving inputs.
    #[arg(long, requires = "features")]
    feature_view: Option<String>,
    /// The features of that view, in the order of the input's last axis (comma-separated).
    #[arg(long, requires = "feature_view")]
    features: Option<String>,
    /// The shape to plan an input for, NAME=d0,d1,... (repeatable): a number pins that
    /// axis, min..max (or min..) lets it vary. Needed for models whose shapes the engine
    /// cannot settle symbolically; the model is checked to load with it.
    #[arg(long = "input-shape", value_name = "NAME=SHAPE")]
    input_shapes: Vec<String>,
    /// Where the secret of sealed keys comes from: stdin, credential or file:PATH
    /// [default: systemd's `falaj-keys` credential when there is one].
    #[arg(long)]
    unseal_from: Option<UnsealFrom>,
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
    pub(crate) fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        Self { code, error: error.into() }
    }

    /// The exit code.
    pub fn code(&self) -> u8 {
        self.code
    }

    /// The error, on one line.
    pub fn message(&self) -> String {
        falaj_common::errors::describe(self.error.as_ref())
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
        Command::Keys(command) => keys(command, now),
        Command::Bundle(BundleCommand::Build(args)) => bundle_build(args, now),
        Command::Bundle(BundleCommand::Inspect(args)) => bundle_inspect(&args, now),
        Command::Sample(args) => sample(&args),
        Command::Serve(args) => serve(args),
        Command::CheckConfig(args) => check_config(&args.config),
        Command::Bundle(BundleCommand::Push(args)) => bundle_push(&args),
        Command::Bundle(BundleCommand::List(api)) => online(&api, |c| async move {
            println!(
                "{:<24} {:>8} {:>12} {:>7} {:<22}",
                "NAME", "VERSION", "BYTES", "CHUNKS", "PUSHED"
            );
            for b in c.bundles().await? {
                println!(
                    "{:<24} {:>8} {:>12} {:>7} {:<22}",
                    b["name"].as_str().unwrap_or("?"),
                    b["version"],
                    b["size"],
                    b["chunks"],
                    b["pushed_at"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }),
        Command::Token(TokenCommand::Create(args)) => online(&args.api, |c| async move {
            let token = c.create_token(&args.group, args.ttl.as_secs().max(1)).await?;
            eprintln!(
                "enrollment token for group {} in region {}, valid until {}:",
                token["group"].as_str().unwrap_or("?"),
                token["region"].as_str().unwrap_or("?"),
                token["expires"].as_str().unwrap_or("?")
            );
            println!("{}", token["token"].as_str().unwrap_or_default());
            Ok(())
        }),
        Command::Agents(api) => online(&api, |c| async move {
            print_agents(&c.agents().await?);
            Ok(())
        }),
        Command::Agent(AgentCommand::Revoke(args)) => online(&args.api, |c| async move {
            c.revoke(&args.agent).await?;
            println!(
                "revoked {}; its connection is closed and its certificate refused",
                args.agent
            );
            Ok(())
        }),
        Command::Deploy(args) => deploy(args),
        Command::Undeploy(args) => online(&args.api, |c| async move {
            c.undeploy(&args.group, &args.name).await?;
            println!("undeployed {} from group {}", args.name, args.group);
            Ok(())
        }),
        Command::Metrics(args) => online(&args.api, |c| async move {
            let view = c
                .metrics(
                    &args.model,
                    args.version,
                    args.group.as_deref(),
                    args.agent.as_deref(),
                    args.since,
                )
                .await?;
            // Mark the versions of the latest rollout whose two versions are both shown.
            let rollouts = c.rollouts(args.group.as_deref(), Some(&args.model)).await?;
            let shown = |v: u64| view.versions.iter().any(|s| s.version == v);
            let variants: BTreeMap<u64, &str> = rollouts
                .iter()
                .find(|r| shown(r.baseline) && shown(r.candidate))
                .map(|r| [(r.baseline, "baseline"), (r.candidate, "candidate")].into())
                .unwrap_or_default();
            print!("{}", render_metrics_marked(&view, &variants));
            Ok(())
        }),
        Command::Alerts(args) => online(&args.api, |c| async move {
            print!("{}", render_alerts(&c.alerts(args.limit).await?));
            Ok(())
        }),
        Command::Features(command) => crate::features::cli::run(command),
        Command::Finetune(command) => crate::finetune::cli::run(command),
        Command::Audit(command) => crate::audit::cli::run(command),
        Command::Rollout(command) => crate::rollouts::cli::run(command),
        Command::User(command) => crate::auth::cli::run_user(command),
        Command::Login(args) => crate::auth::cli::run_login(&args),
        Command::Logout => crate::auth::cli::run_logout(),
        Command::Whoami(api) => crate::auth::cli::run_whoami(&api),
        Command::Apitoken(command) => crate::auth::cli::run_api_token(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!(
                "falaj-control: error: {}",
                falaj_common::errors::describe(failure.error.as_ref())
            );
            ExitCode::from(failure.code)
        }
    }
}

fn bundle_push(args: &PushArgs) -> Result<(), Failure> {
    online(&args.api, |c| async move {
        let pushed = c.push_bundle(&args.file).await?;
        let b = &pushed["bundle"];
        let verb = if pushed["created"].as_bool() == Some(true) {
            "registered"
        } else {
            "already registered:"
        };
        println!(
            "{verb} {}@{} ({} bytes, {} chunks, {} new)",
            b["name"].as_str().unwrap_or("?"),
            b["version"],
            b["size"],
            b["chunks"],
            pushed["new_chunks"]
        );
        Ok(())
    })
}

fn keys_init(args: &KeysInitArgs, now: SystemTime) -> Result<(), Failure> {
    let options = InitOptions {
        region: args.region.clone(),
        root_keys: args.root_keys,
        root_threshold: args.root_threshold,
        signing_keys: args.signing_keys,
        signing_threshold: args.signing_threshold,
        lifetime: args.expires_in,
        root_dir: args.offline_root.clone(),
    };
    let trust = keys::init(&args.dir, &options, now).map_err(keys_failure)?;
    println!(
        "created {} root key(s) (threshold {}) in {} and {} signing key(s) (threshold {}) in {}",
        args.root_keys,
        args.root_threshold,
        args.offline_root.as_deref().unwrap_or(&args.dir).display(),
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
    if args.offline_root.is_none() {
        println!("keep the root-*.key files offline; agents need only root.json");
    }
    Ok(())
}

fn keys(command: KeysCommand, now: SystemTime) -> Result<(), Failure> {
    match command {
        KeysCommand::Init(args) => keys_init(&args, now),
        KeysCommand::RotateRoot(args) => keys_rotate_root(&args, now),
        KeysCommand::RotateSigning(args) => keys_rotate_signing(&args, now),
        KeysCommand::Status(args) => keys_status(&args, now),
        KeysCommand::Seal(args) => keys_seal(&args),
    }
}

fn keys_seal(args: &KeysSealArgs) -> Result<(), Failure> {
    let vault_failure = |e: VaultError| keys_failure(KeysError::Vault(e));
    keys::load_trust_unexpired(&args.keys).map_err(keys_failure)?;
    let secret = Secret::read(&args.unseal_from).map_err(vault_failure)?;
    if let Some(new) = &args.rekey {
        let new = Secret::read(new).map_err(vault_failure)?;
        vault::rekey(&args.keys, &secret, &new).map_err(vault_failure)?;
        println!("{}: the master key is wrapped under the new secret", args.keys.display());
        return Ok(());
    }
    let report = vault::seal(&args.keys, &secret).map_err(vault_failure)?;
    for path in &report.sealed {
        println!("sealed {}", path.display());
    }
    println!(
        "{}: {} key files sealed ({} were already); start the daemon with --unseal-from, or \
         give its unit the falaj-keys credential (INSTALL.md)",
        args.keys.display(),
        report.sealed.len(),
        report.already
    );
    Ok(())
}

/// The secret `from` names, read only when `dir` is sealed.
fn secret_for(dir: &Path, from: Option<&UnsealFrom>) -> Result<Option<Secret>, Failure> {
    let failure = |e: VaultError| keys_failure(KeysError::Vault(e));
    if !dir.join(vault::SEAL_FILE).exists() {
        return Ok(None);
    }
    match from {
        Some(from) => Secret::read(from).map(Some).map_err(failure),
        None => Secret::from_credential_if_any().map_err(failure),
    }
}

fn keys_rotate_root(args: &RotateRootArgs, now: SystemTime) -> Result<(), Failure> {
    let dir = &args.dir.keys;
    let current = keys::load_trust_unexpired(dir).map_err(keys_failure)?;
    let count = current.metadata().roles.root.keyids.len();
    let options = RotateOptions {
        root_dir: args.dir.root_keys_dir.clone(),
        root_keys: (!args.keep_keys).then_some(args.root_keys.unwrap_or(count)),
        root_threshold: args.root_threshold,
        lifetime: Some(args.expires_in),
        ..RotateOptions::default()
    };
    let secret = rotation_secret(&args.dir)?;
    report_rotation(dir, &keys::rotate(dir, &options, secret.as_ref(), now).map_err(keys_failure)?);
    Ok(())
}

/// The secret of a rotation's sealed directories (the keys directory or the root keys').
fn rotation_secret(args: &KeysDirArgs) -> Result<Option<Secret>, Failure> {
    match secret_for(&args.keys, args.unseal_from.as_ref())? {
        Some(secret) => Ok(Some(secret)),
        None => match &args.root_keys_dir {
            Some(root) => secret_for(root, args.unseal_from.as_ref()),
            None => Ok(None),
        },
    }
}

fn keys_rotate_signing(args: &RotateSigningArgs, now: SystemTime) -> Result<(), Failure> {
    let dir = &args.dir.keys;
    let current = keys::load_trust_unexpired(dir).map_err(keys_failure)?;
    let options = RotateOptions {
        root_dir: args.dir.root_keys_dir.clone(),
        signing_keys: Some(args.signing_keys.unwrap_or(current.signing_role().keyids.len())),
        signing_threshold: args.signing_threshold,
        lifetime: Some(args.expires_in),
        ..RotateOptions::default()
    };
    let secret = rotation_secret(&args.dir)?;
    report_rotation(dir, &keys::rotate(dir, &options, secret.as_ref(), now).map_err(keys_failure)?);
    Ok(())
}

fn report_rotation(dir: &Path, rotation: &keys::Rotation) {
    let trust = &rotation.trust;
    println!(
        "trust root version {} written to {} and {} (expires {})",
        trust.version(),
        keys::version_file(dir, trust.version()).display(),
        dir.join(keys::ROOT_FILE).display(),
        trust.expires()
    );
    for path in &rotation.retired {
        println!(
            "retired {} (no longer in the trust root; destroy it once agents follow)",
            path.display()
        );
    }
    println!(
        "restart the control plane to use it: connected agents take the new version as they \
         reconnect; air-gapped agents: falaj-agent trust update {}",
        keys::version_file(dir, trust.version()).display()
    );
}

fn keys_status(args: &KeysDirArgs, now: SystemTime) -> Result<(), Failure> {
    let versions = keys::versions(&args.keys).map_err(keys_failure)?;
    let mut held = keys::private_key_ids(&args.keys).map_err(keys_failure)?;
    if let Some(root_dir) = &args.root_keys_dir {
        held.extend(keys::private_key_ids(root_dir).map_err(keys_failure)?);
    }
    let now = Timestamp::from_system(now);
    print!("{}", render_keys_status(&versions, &held, now));
    if args.keys.join(vault::SEAL_FILE).exists() {
        println!("private keys are sealed ({})", args.keys.join(vault::SEAL_FILE).display());
    } else {
        println!("private keys are in plaintext files (mode 0600); seal them with `keys seal`");
    }
    // The CA is made on the daemon's first start; a directory from `keys init` alone has none.
    if args.keys.join(crate::ca::CA_CERT_FILE).exists() {
        let expires =
            crate::ca::Ca::expiry_in(&args.keys).map_err(|e| Failure::new(EXIT_CONFIG, e))?;
        println!("agents' CA certificate expires {expires}");
        if let Some(days) = falaj_common::time::expiry_warning(now, expires) {
            println!("WARNING: the agents' CA certificate expires within {days} days");
        }
    }
    Ok(())
}

/// The table of `keys status`: every version of the trust root, then warnings for what
/// expires within 90 days.
pub fn render_keys_status(versions: &[TrustRoot], held: &[String], now: Timestamp) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<22} {:<10} {:<34} SIGNING KEYS",
        "VERSION", "EXPIRES", "STATE", "ROOT KEYS"
    );
    let role = |role: &Role| {
        let ids: Vec<String> = role
            .keyids
            .iter()
            .map(|id| {
                format!("{}{}", id.short(), if held.contains(&id.short()) { "*" } else { "" })
            })
            .collect();
        format!("{} of {}", role.threshold, ids.join(","))
    };
    for (i, root) in versions.iter().enumerate() {
        let state = if i + 1 < versions.len() {
            "previous"
        } else if root.expires() <= now {
            "EXPIRED"
        } else {
            "current"
        };
        let roles = &root.metadata().roles;
        let _ = writeln!(
            out,
            "{:<8} {:<22} {:<10} {:<34} {}",
            root.version(),
            root.expires().to_string(),
            state,
            role(&roles.root),
            role(&roles.signing)
        );
    }
    let _ = writeln!(out, "(* = private key in this directory)");
    if let Some(current) = versions.last()
        && let Some(days) = falaj_common::time::expiry_warning(now, current.expires())
    {
        let _ = writeln!(
            out,
            "WARNING: trust root version {} expires within {days} days ({}): rotate it with \
                 `falaj-control keys rotate-root`",
            current.version(),
            current.expires()
        );
    }
    out
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
        features: feature_input(args.feature_view.as_deref(), args.features.as_deref())?,
        shapes: input_shapes(&args.input_shapes)?,
    };
    let manifest = bundle::build_unsealing(&options, args.unseal_from.as_ref(), now)
        .map_err(bundle_failure)?;
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
    for (input, shape) in &model.shapes {
        println!("planned for: {input} = {shape}");
    }
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

/// `--input-shape NAME=SHAPE` arguments, by input name.
fn input_shapes(args: &[String]) -> Result<BTreeMap<String, InputShape>, Failure> {
    let usage = |msg: String| Failure::new(EXIT_USAGE, anyhow::anyhow!(msg));
    let mut out = BTreeMap::new();
    for arg in args {
        let (name, shape) = arg
            .split_once('=')
            .ok_or_else(|| usage(format!("--input-shape must be NAME=d0,d1,..., not {arg:?}")))?;
        let shape = shape.parse().map_err(|e| usage(format!("--input-shape {arg:?}: {e}")))?;
        if out.insert(name.to_owned(), shape).is_some() {
            return Err(usage(format!("--input-shape names {name:?} twice")));
        }
    }
    Ok(out)
}

fn feature_input(view: Option<&str>, names: Option<&str>) -> Result<Option<FeatureInput>, Failure> {
    let (Some(view), Some(names)) = (view, names) else { return Ok(None) };
    let (view, version) = view
        .split_once('@')
        .and_then(|(v, n)| Some((v.to_owned(), n.parse().ok()?)))
        .ok_or_else(|| {
            Failure::new(
                EXIT_USAGE,
                anyhow::anyhow!("--feature-view must be VIEW@VERSION, not {view:?}"),
            )
        })?;
    let names = names.split(',').map(|n| n.trim().to_owned()).collect();
    Ok(Some(FeatureInput { view, version, names }))
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

/// Runs `f` against the admin API on a small runtime, mapping API errors to exit codes.
pub(crate) fn online<F, Fut>(api: &ApiArgs, f: F) -> Result<(), Failure>
where
    F: FnOnce(AdminClient) -> Fut,
    Fut: Future<Output = Result<(), ClientError>>,
{
    let client = api.client()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(1, anyhow::anyhow!("starting the async runtime: {e}")))?;
    runtime.block_on(f(client)).map_err(|e| {
        let code = match &e {
            ClientError::Api { status: 400..=499, .. } => EXIT_CONFIG,
            _ => 1,
        };
        Failure::new(code, e)
    })
}

fn deploy(args: DeployArgs) -> Result<(), Failure> {
    let (name, version) = args
        .target
        .split_once('@')
        .and_then(|(n, v)| Some((n.to_owned(), v.parse::<u64>().ok()?)))
        .ok_or_else(|| {
            Failure::new(
                EXIT_USAGE,
                anyhow::anyhow!("expected NAME@VERSION, got {:?}", args.target),
            )
        })?;
    online(&args.api, |c| async move {
        c.deploy(&args.group, &name, version).await?;
        println!("deployed {name}@{version} to group {}", args.group);
        Ok(())
    })
}

fn print_agents(agents: &[serde_json::Value]) {
    print!("{}", render_agents(agents));
}

/// The fleet table of `agents`. What agents report is printed escaped
/// ([`printable`]): a hostile agent cannot drive the terminal of whoever reads it.
pub fn render_agents(agents: &[serde_json::Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<12} {:<10} {:<10} {:<6} {:<18} {:<22} {:<24} {:<24} ERRORS",
        "AGENT", "GROUP", "REGION", "STATUS", "READY", "ENGINES", "LAST SEEN", "ACTIVE", "HELD"
    );
    let list = |v: &serde_json::Value| {
        let items: Vec<&str> =
            v.as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect()).unwrap_or_default();
        if items.is_empty() { "-".to_owned() } else { printable(&items.join(",")).into_owned() }
    };
    let text = |v: &serde_json::Value, missing: &'static str| {
        printable(v.as_str().unwrap_or(missing)).into_owned()
    };
    for a in agents {
        let engines: serde_json::Value =
            a["engines"].as_array().into_iter().flatten().map(|e| e["name"].clone()).collect();
        let _ = writeln!(
            out,
            "{:<20} {:<12} {:<10} {:<10} {:<6} {:<18} {:<22} {:<24} {:<24} {}",
            text(&a["id"], "?"),
            text(&a["group"], "?"),
            text(&a["region"], "?"),
            text(&a["status"], "?"),
            if a["ready"].as_bool() == Some(true) { "yes" } else { "no" },
            list(&engines),
            text(&a["last_seen"], "never"),
            list(&a["active"]),
            list(&a["held"]),
            list(&a["errors"]),
        );
    }
    out
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let config_error = |e: config::ConfigError| Failure::new(EXIT_CONFIG, e);
    let mut file = match &args.config {
        Some(path) => ControlConfig::load(path).map_err(config_error)?,
        None if Path::new(config::DEFAULT_PATH).exists() => {
            ControlConfig::load(Path::new(config::DEFAULT_PATH)).map_err(config_error)?
        }
        None => ControlConfig::default(),
    };
    if let Some(dir) = args.data_dir {
        file.data_dir = dir;
    }
    if let Some(quic) = args.quic {
        file.quic.listen = quic;
    }
    if let Some(admin) = args.admin {
        file.admin.listen = admin;
    }
    if args.region.is_some() {
        file.region = args.region;
    }
    file.quic.server_names.extend(args.server_names);
    if let Some(ttl) = args.desired_ttl {
        file.policy.desired_ttl = ttl;
    }
    if let Some(ttl) = args.cert_ttl {
        file.policy.cert_ttl = ttl;
    }
    if let Some(every) = args.heartbeat {
        file.policy.heartbeat = every;
    }
    let unseal = args.unseal_from;
    file.check(Path::new("the command line")).map_err(config_error)?;
    let token_file = file.data_dir.join(crate::daemon::ADMIN_TOKEN_FILE);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(1, anyhow::anyhow!("starting the async runtime: {e}")))?;
    runtime.block_on(async move {
        let control = ControlPlane::start(ServeConfig { unseal, ..file.serve() }).await.map_err(
            |e| match e {
                ServeError::Io { .. } | ServeError::Db(_) => Failure::new(1, e),
                other => Failure::new(EXIT_CONFIG, other),
            },
        )?;
        let stop = shutdown_signal();
        println!(
            "admin API on http://{} (token in {})",
            control.admin_addr(),
            token_file.display()
        );
        if let Some(addr) = control.admin_tls_addr() {
            println!("admin API and console over HTTPS on https://{addr}");
        }
        println!(
            "agents connect to {} (QUIC); CA sha256 {}",
            control.quic_addr(),
            control.ca_fingerprint()
        );
        systemd::ready();
        let served = control
            .run(async {
                stop.await;
                systemd::stopping();
            })
            .await;
        served.map_err(|e| Failure::new(1, e))
    })
}

fn check_config(path: &Path) -> Result<(), Failure> {
    let config = ControlConfig::load(path).map_err(|e| Failure::new(EXIT_CONFIG, e))?;
    println!("{}: OK", path.display());
    println!("data_dir      {}", config.data_dir.display());
    println!("region        {}", config.region.as_deref().unwrap_or("(from the keys)"));
    println!("quic.listen   {}", config.quic.listen);
    println!("admin.listen  {}", config.admin.listen);
    Ok(())
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

/// The table `falaj-control metrics` prints: one row per version (rate, error rate,
/// latency quantiles, the largest drift scores), then each version's top drifting
/// features and its prediction drift.
pub fn render_metrics(view: &MetricsView) -> String {
    render_metrics_marked(view, &BTreeMap::new())
}

/// [`render_metrics`] with a VARIANT column naming each version's part in a rollout
/// (`baseline`, `candidate`), when `variants` names any.
pub fn render_metrics_marked(view: &MetricsView, variants: &BTreeMap<u64, &str>) -> String {
    let mut out = format!("{} since {}\n", view.model, view.since);
    if view.versions.is_empty() {
        out.push_str("no metric windows in that range\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<8} {:>6} {:>10} {:>9} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7}{}",
        "VERSION",
        "AGENTS",
        "REQUESTS",
        "RATE/S",
        "ERRORS",
        "P50 ms",
        "P95 ms",
        "P99 ms",
        "PSI max",
        "KS max",
        "JS max",
        if variants.is_empty() { "" } else { " VARIANT" }
    );
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
    for v in &view.versions {
        let columns: Vec<_> =
            v.drift.iter().flat_map(|d| d.inputs.iter().chain(&d.outputs)).collect();
        let max = |pick: fn(&DriftScores) -> f64| {
            columns
                .iter()
                .map(|c| pick(&c.scores))
                .reduce(f64::max)
                .map_or_else(|| "-".to_owned(), |m| format!("{m:.3}"))
        };
        let variant = if variants.is_empty() {
            String::new()
        } else {
            format!(" {}", variants.get(&v.version).copied().unwrap_or("-"))
        };
        let _ = writeln!(
            out,
            "{:<8} {:>6} {:>10} {:>9.1} {:>6.2}% {:>8} {:>8} {:>8} {:>8} {:>7} {:>7}{variant}",
            v.version,
            v.agents,
            v.requests,
            v.rate,
            v.error_rate * 100.0,
            ms(v.p50_ms),
            ms(v.p95_ms),
            ms(v.p99_ms),
            max(|s| s.psi),
            max(|s| s.ks),
            max(|s| s.js),
        );
    }
    for v in &view.versions {
        let Some(drift) = &v.drift else {
            let _ = writeln!(
                out,
                "version {}: no reference profile in the bundle, so no drift",
                v.version
            );
            continue;
        };
        let scores = |c: &ColumnDrift| {
            format!(
                "{} (psi {:.3}, ks {:.3}, js {:.3})",
                c.column, c.scores.psi, c.scores.ks, c.scores.js
            )
        };
        let top: Vec<String> = drift.top_inputs(3).into_iter().map(scores).collect();
        if !top.is_empty() {
            let _ =
                writeln!(out, "version {} top drifting features: {}", v.version, top.join(", "));
        }
        let predictions: Vec<String> = drift.outputs.iter().map(scores).collect();
        if !predictions.is_empty() {
            let _ =
                writeln!(out, "version {} prediction drift: {}", v.version, predictions.join(", "));
        }
        if v.dropped_windows > 0 {
            let _ = writeln!(
                out,
                "version {}: agents dropped {} windows ({} requests) from full outboxes",
                v.version, v.dropped_windows, v.dropped_requests
            );
        }
    }
    out
}

/// What `falaj-control alerts` prints.
pub fn render_alerts(view: &AlertsView) -> String {
    let mut out = String::new();
    if view.firing.is_empty() {
        out.push_str("no alerts firing\n");
    } else {
        let _ = writeln!(out, "{:<20} {:<40} {:<22} {:>10}", "FIRING", "SUBJECT", "SINCE", "VALUE");
        for f in &view.firing {
            let _ = writeln!(
                out,
                "{:<20} {:<40} {:<22} {:>10.4}",
                f.rule,
                f.subject,
                f.since.to_string(),
                f.value
            );
        }
    }
    if !view.events.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<22} {:<9} {:<20} {:<40} {:<14} {:>10} {:>10}",
            "AT", "STATE", "RULE", "SUBJECT", "METRIC", "VALUE", "THRESHOLD"
        );
        for e in &view.events {
            let _ = writeln!(
                out,
                "{:<22} {:<9} {:<20} {:<40} {:<14} {:>10.4} {:>10.4}",
                e.at.to_string(),
                e.state,
                e.rule,
                e.subject,
                e.metric,
                e.value,
                e.threshold
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use falaj_common::metrics::Rollup;
    use falaj_common::time::Timestamp;

    use super::*;

    #[test]
    fn what_agents_report_cannot_drive_the_terminal() {
        let agents = serde_json::json!([{
            "id": "agent-1", "group": "edge", "region": "eu-west-1", "status": "connected",
            "ready": true, "last_seen": "2026-12-04T10:00:00Z", "active": ["fault@1"],
            "held": ["fault@1"], "errors": ["disk full\u{1b}[2J\u{1b}]0;pwned\u{7}"],
            "engines": [{"name": "tract-cpu\u{1b}[2J", "device": "x86_64 CPU, 2 cores"}],
        }]);
        let table = render_agents(agents.as_array().unwrap());
        assert!(!table.contains('\u{1b}') && !table.contains('\u{7}'), "{table:?}");
        assert!(table.contains("tract-cpu\\u{1b}[2J"), "{table}");
        assert!(table.contains("disk full\\u{1b}[2J"), "{table}");
    }

    #[test]
    fn metrics_mark_the_variants_of_a_rollout_and_only_then() {
        let summary = |v| Rollup::default().summary(v, 1, 60, None);
        let view = MetricsView {
            model: "pumps".into(),
            since: Timestamp::from_unix(1_800_000_000),
            versions: vec![summary(1), summary(2), summary(3)],
        };
        assert!(!render_metrics(&view).contains("VARIANT"));
        let marked = render_metrics_marked(&view, &[(1, "baseline"), (2, "candidate")].into());
        let lines: Vec<&str> = marked.lines().collect();
        assert!(lines[1].ends_with(" VARIANT"), "{marked}");
        assert!(lines[2].starts_with("1 ") && lines[2].ends_with(" baseline"), "{marked}");
        assert!(lines[3].starts_with("2 ") && lines[3].ends_with(" candidate"), "{marked}");
        assert!(lines[4].starts_with("3 ") && lines[4].ends_with(" -"), "{marked}");
    }
}
