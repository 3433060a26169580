//! The command line's clap definitions: every command and its arguments.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use falaj_common::bundle::RuntimeHint;

use crate::config;
use crate::sample::SampleOptions;
use crate::vault::UnsealFrom;

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
    /// Bring the databases to this version's schema, or copy a stopped SQLite control
    /// plane into an empty PostgreSQL database (--from-sqlite DIR --to URL).
    Migrate(MigrateArgs),
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
    pub(crate) model: String,
    /// Only this version.
    #[arg(long)]
    pub(crate) version: Option<u64>,
    /// Only agents of this group.
    #[arg(long)]
    pub(crate) group: Option<String>,
    /// Only this agent.
    #[arg(long)]
    pub(crate) agent: Option<String>,
    /// How far back: windows starting within this duration.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub(crate) since: Duration,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}

/// Arguments of `alerts`.
#[derive(Debug, Args)]
pub struct AlertsArgs {
    /// How many of the latest events to show.
    #[arg(long, default_value_t = 20)]
    pub(crate) limit: u64,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}

/// Where the running control plane's admin API is, and the credentials for it: the
/// token given, else the session `falaj-control login` stored for that URL, else the
/// admin token in DATA_DIR/admin.token.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The admin API's URL.
    #[arg(long, env = "FALAJ_CONTROL_PLANE", default_value = "http://127.0.0.1:7080")]
    pub(crate) control_plane: String,
    /// A bearer token: an API token, a session, or the admin token (default: the stored
    /// session for this URL, else DATA_DIR/admin.token).
    #[arg(long, env = "FALAJ_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// The control plane's data directory, to read the admin token from (a relative path
    /// is taken from the current directory, as by `serve`).
    #[arg(
        long,
        env = "FALAJ_CONTROL_DATA_DIR",
        default_value = "/var/lib/falaj-control",
        value_parser = falaj_shell::config::absolute_path
    )]
    pub(crate) data_dir: PathBuf,
    /// For an `https://` URL: the CA certificate(s), PEM, its certificate must chain to
    /// (default: the system's root certificates).
    #[arg(long, env = "FALAJ_CONTROL_PLANE_CA")]
    pub(crate) ca_cert: Option<PathBuf>,
}

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The configuration file (default: /etc/falaj/control.toml if it exists).
    #[arg(long, env = "FALAJ_CONTROL_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// The data directory (state, keys, blobs, admin token) [config: data_dir]; a relative
    /// path is taken from the current directory.
    #[arg(long, env = "FALAJ_CONTROL_DATA_DIR", value_parser = falaj_shell::config::absolute_path)]
    pub(crate) data_dir: Option<PathBuf>,
    /// UDP address for agents (QUIC) [config: quic.listen].
    #[arg(long)]
    pub(crate) quic: Option<std::net::SocketAddr>,
    /// TCP address for the admin API [config: admin.listen].
    #[arg(long)]
    pub(crate) admin: Option<std::net::SocketAddr>,
    /// The region; needed on the first start, when keys are created [config: region].
    #[arg(long)]
    pub(crate) region: Option<String>,
    /// Extra DNS names or IP addresses for the TLS certificate [config: quic.server_names].
    #[arg(long = "server-name")]
    pub(crate) server_names: Vec<String>,
    /// Lifetime of desired-state documents [config: policy.desired_ttl].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) desired_ttl: Option<Duration>,
    /// Lifetime of agent certificates [config: policy.cert_ttl].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) cert_ttl: Option<Duration>,
    /// How often agents report [config: policy.heartbeat].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) heartbeat: Option<Duration>,
    /// Where the secret that opens sealed keys comes from: stdin (its first line, e.g.
    /// from `systemd-ask-password`), credential (systemd's `falaj-keys`, from
    /// `LoadCredentialEncrypted=`) or file:PATH [default: the credential when the unit
    /// provides it].
    #[arg(long)]
    pub(crate) unseal_from: Option<UnsealFrom>,
    /// PostgreSQL shared by the region's replicas (postgres://...) instead of SQLite in the
    /// data directory [config: database.url].
    #[arg(long, env = "FALAJ_CONTROL_DATABASE", hide_env_values = true)]
    pub(crate) database: Option<String>,
}

/// Arguments of `migrate`: one of `--data-dir`, `--database`, or `--from-sqlite` with `--to`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// A data directory whose SQLite databases to bring to this version's schema.
    #[arg(long, value_parser = falaj_shell::config::absolute_path)]
    pub(crate) data_dir: Option<PathBuf>,
    /// A PostgreSQL database (postgres://user@host:port/db?sslmode=...) to bring to this
    /// version's schema.
    #[arg(long)]
    pub(crate) database: Option<String>,
    /// The data directory of a stopped SQLite control plane to copy into --to.
    #[arg(long, value_parser = falaj_shell::config::absolute_path, requires = "to")]
    pub(crate) from_sqlite: Option<PathBuf>,
    /// The empty PostgreSQL database to copy --from-sqlite into.
    #[arg(long, requires = "from_sqlite")]
    pub(crate) to: Option<String>,
}

/// Arguments of `check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The configuration file.
    #[arg(long, env = "FALAJ_CONTROL_CONFIG", default_value = config::DEFAULT_PATH)]
    pub(crate) config: PathBuf,
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
    pub(crate) group: String,
    /// How long the token may be used.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub(crate) ttl: Duration,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
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
    pub(crate) agent: String,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}

/// Arguments of `deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// What to deploy, as NAME@VERSION.
    pub(crate) target: String,
    #[arg(long)]
    pub(crate) group: String,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}

/// Arguments of `undeploy`.
#[derive(Debug, Args)]
pub struct UndeployArgs {
    pub(crate) name: String,
    #[arg(long)]
    pub(crate) group: String,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
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
    pub(crate) keys: PathBuf,
    /// Where the secret comes from: stdin (its first line), credential (systemd's
    /// `falaj-keys`) or file:PATH. With --rekey, the current secret.
    #[arg(long, default_value = "stdin")]
    pub(crate) unseal_from: UnsealFrom,
    /// Change the secret of a sealed directory: the master key is wrapped anew under the
    /// secret from here (stdin: the line after the current secret's).
    #[arg(long, value_name = "SOURCE")]
    pub(crate) rekey: Option<UnsealFrom>,
}

/// The keys directory of a `keys` command.
#[derive(Debug, Args)]
pub struct KeysDirArgs {
    /// The keys directory made by `keys init`.
    #[arg(long, alias = "dir")]
    pub(crate) keys: PathBuf,
    /// Where the root keys are, when kept offline (`keys init --offline-root DIR`).
    #[arg(long)]
    pub(crate) root_keys_dir: Option<PathBuf>,
    /// Where the secret of sealed keys comes from: stdin, credential or file:PATH
    /// [default: systemd's `falaj-keys` credential when there is one].
    #[arg(long)]
    pub(crate) unseal_from: Option<UnsealFrom>,
}

/// Arguments of `keys rotate-root`.
#[derive(Debug, Args)]
pub struct RotateRootArgs {
    #[command(flatten)]
    pub(crate) dir: KeysDirArgs,
    /// New root keys to make [default: as many as the current root has].
    #[arg(long, conflicts_with = "keep_keys")]
    pub(crate) root_keys: Option<usize>,
    /// Root signatures the new root needs [default: unchanged, at most the key count].
    #[arg(long)]
    pub(crate) root_threshold: Option<u32>,
    /// Keep the current root keys: only the expiry (and threshold) change.
    #[arg(long)]
    pub(crate) keep_keys: bool,
    /// Lifetime of the new root, from now (e.g. 2y, 180d).
    #[arg(long, default_value = "2y", value_parser = humantime::parse_duration)]
    pub(crate) expires_in: Duration,
}

/// Arguments of `keys rotate-signing`.
#[derive(Debug, Args)]
pub struct RotateSigningArgs {
    #[command(flatten)]
    pub(crate) dir: KeysDirArgs,
    /// New signing keys to make [default: as many as the current root lists].
    #[arg(long)]
    pub(crate) signing_keys: Option<usize>,
    /// Signatures each bundle needs [default: unchanged, at most the key count].
    #[arg(long)]
    pub(crate) signing_threshold: Option<u32>,
    /// Lifetime of the new root, from now (e.g. 2y, 180d).
    #[arg(long, default_value = "2y", value_parser = humantime::parse_duration)]
    pub(crate) expires_in: Duration,
}

/// Arguments of `keys init`.
#[derive(Debug, Args)]
pub struct KeysInitArgs {
    /// Directory for the keys (created with mode 0700).
    #[arg(long)]
    pub(crate) dir: PathBuf,
    /// The control plane's region.
    #[arg(long)]
    pub(crate) region: String,
    /// Root keys to create.
    #[arg(long, default_value_t = 1)]
    pub(crate) root_keys: usize,
    /// Root signatures a trust root needs.
    #[arg(long, default_value_t = 1)]
    pub(crate) root_threshold: u32,
    /// Bundle-signing keys to create.
    #[arg(long, default_value_t = 1)]
    pub(crate) signing_keys: usize,
    /// Signatures each bundle needs.
    #[arg(long, default_value_t = 1)]
    pub(crate) signing_threshold: u32,
    /// Lifetime of the trust root (e.g. 2y, 180d).
    #[arg(long, default_value = "2y", value_parser = humantime::parse_duration)]
    pub(crate) expires_in: Duration,
    /// Write the root keys to this directory instead (removable media the operator
    /// carries), so that the control plane's host never holds them.
    #[arg(long)]
    pub(crate) offline_root: Option<PathBuf>,
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
    /// After a signing-key rotation, sign registered bundles again with the keys in force
    /// (those a retired key signed; their manifests and what agents hold are unchanged).
    ReSign(ReSignArgs),
}

/// Arguments of `bundle re-sign`.
#[derive(Debug, Args)]
pub struct ReSignArgs {
    /// The bundle, NAME@VERSION.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub(crate) bundle: Option<String>,
    /// Every registered bundle.
    #[arg(long)]
    pub(crate) all: bool,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}

/// Arguments of `bundle push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The bundle file.
    pub(crate) file: PathBuf,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}

/// Arguments of `bundle build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The keys directory made by `keys init`.
    #[arg(long)]
    pub(crate) keys: PathBuf,
    /// The ONNX model.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// The model's name (lowercase letters, digits, '-', '_', '.').
    #[arg(long)]
    pub(crate) name: String,
    /// The version, from 1.
    #[arg(long)]
    pub(crate) version: u64,
    /// Reference data (CSV with one column per input feature), profiled for drift.
    #[arg(long)]
    pub(crate) reference: Option<PathBuf>,
    /// Which engine agents should use: cpu, gpu or auto.
    #[arg(long, default_value = "auto")]
    pub(crate) runtime: RuntimeHint,
    /// How long agents may import the bundle (e.g. 365d).
    #[arg(long, default_value = "365d", value_parser = humantime::parse_duration)]
    pub(crate) expires_in: Duration,
    /// Where to write the bundle.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// The feature view (VIEW@VERSION) the model's input is assembled from, so requests
    /// may name an entity instead of giving inputs.
    #[arg(long, requires = "features")]
    pub(crate) feature_view: Option<String>,
    /// The features of that view, in the order of the input's last axis (comma-separated).
    #[arg(long, requires = "feature_view")]
    pub(crate) features: Option<String>,
    /// The shape to plan an input for, NAME=d0,d1,... (repeatable): a number pins that
    /// axis, min..max (or min..) lets it vary. Needed for models whose shapes the engine
    /// cannot settle symbolically; the model is checked to load with it.
    #[arg(long = "input-shape", value_name = "NAME=SHAPE")]
    pub(crate) input_shapes: Vec<String>,
    /// Where the secret of sealed keys comes from: stdin, credential or file:PATH
    /// [default: systemd's `falaj-keys` credential when there is one].
    #[arg(long)]
    pub(crate) unseal_from: Option<UnsealFrom>,
}

/// Arguments of `bundle inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The bundle file.
    pub(crate) file: PathBuf,
    /// A trust root to verify against (`root.json`).
    #[arg(long)]
    pub(crate) trust: Option<PathBuf>,
    /// Print the manifest as JSON instead of a report.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Arguments of `sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Directory to write model.onnx, reference.csv and holdout.csv into.
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Training rows.
    #[arg(long, default_value_t = SampleOptions::default().rows)]
    pub(crate) rows: usize,
    /// Seed for the data and the training.
    #[arg(long, default_value_t = SampleOptions::default().seed)]
    pub(crate) seed: u64,
}
