//! The `falaj-agent` command line: `init` (air-gapped) or `enroll` (with a control
//! plane), `import`, `serve`, `apikey`, `list`, `finetune` and `bench`.
//!
//! Exit codes ([`falaj_shell::exit`]): 0 success, 1 failure, 64 usage error, 65 a refused
//! bundle, 78 bad configuration (so that systemd does not restart-loop on it).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};

use crate::config::{self, AgentConfig};
use crate::daemon::Agent;
use crate::enroll::{self, EnrollError, EnrollOptions};
use crate::import::{self, ImportError, ImportOptions, ImportOutcome};
use crate::store::{Store, StoreError};
use falaj_common::config::Checked as _;
use falaj_shell::daemon::{self as systemd, shutdown_signal};

pub use falaj_shell::exit::{EXIT_CONFIG, EXIT_REFUSED, EXIT_USAGE, Failure};

/// Falaj agent: serves signed models locally over the Open Inference Protocol.
#[derive(Debug, Parser)]
#[command(name = "falaj-agent", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The agent's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Initialise an agent with a trust root (for air-gapped sites).
    Init(InitArgs),
    /// Enroll with a control plane using a one-time token.
    Enroll(EnrollArgs),
    /// Verify and install a bundle file.
    Import(ImportArgs),
    /// Serve every installed model over HTTP (Open Inference Protocol v2).
    Serve(ServeArgs),
    /// API keys of the inference APIs (with `[http] auth = "api_key"`): create, list,
    /// revoke.
    #[command(subcommand)]
    Apikey(crate::apikeys::cli::ApiKeyCommand),
    /// List installed bundles (models and feature snapshots) and their versions.
    List(DataDir),
    /// Remove an installed version (not the active one, nor one the control plane
    /// manages) to reclaim its space.
    Remove(RemoveArgs),
    /// Retrain a model's head on the site's labelled data into a derived model, which
    /// replaces it only if it beats it on held-out rows.
    Finetune(crate::finetune::cli::FinetuneArgs),
    /// Measure a model's in-process latency and throughput at chosen batch sizes.
    Bench(crate::bench::BenchArgs),
    /// Check a configuration file without starting anything.
    CheckConfig(CheckConfigArgs),
    /// The agent's audit log of local security events: export it, verify an export.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The trust root this agent verifies bundles against.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// The device key that seals installed bundles at rest: status, rotation.
    #[command(subcommand)]
    Keys(crate::keys_cli::KeysCommand),
}

/// `trust` subcommands.
#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Take newer versions of the trust root from files (air-gapped sites; connected
    /// agents take them from the control plane): `root.N.json` files as `falaj-control
    /// keys rotate-root` writes them, in any order, each verified against the one before.
    Update(TrustUpdateArgs),
    /// Show the versions of the trust root this agent holds.
    Show(DataDir),
}

/// Arguments of `trust update`.
#[derive(Debug, Args)]
pub struct TrustUpdateArgs {
    /// The trust root files.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    #[command(flatten)]
    data: DataDir,
}

/// Arguments of `remove`.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The version to remove, as NAME@VERSION.
    target: String,
    #[command(flatten)]
    data: DataDir,
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Write the audit log, with a checkpoint signed by the agent's audit key, to a file;
    /// the key's public half is `audit.pub` in the data directory.
    Export(AuditExportArgs),
    /// Verify an export offline against an audit key's public half: exits 65 naming the
    /// first entry or checkpoint that does not hold.
    Verify(AuditVerifyArgs),
}

/// Arguments of `audit export`.
#[derive(Debug, Args)]
pub struct AuditExportArgs {
    /// The file to write (JSON lines).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    data: DataDir,
}

/// Arguments of `audit verify`.
#[derive(Debug, Args)]
pub struct AuditVerifyArgs {
    file: PathBuf,
    /// The public key file (`audit.pub`).
    #[arg(long)]
    key: PathBuf,
}

/// Where the agent keeps its state: `--data-dir`, else the configuration file's
/// `data_dir`, else `/var/lib/falaj-agent`.
#[derive(Debug, Clone, Args)]
pub struct DataDir {
    /// The agent's data directory (a relative path is taken from the current directory,
    /// the same for every command).
    #[arg(long, env = "FALAJ_AGENT_DATA_DIR", value_parser = falaj_shell::config::absolute_path)]
    pub data_dir: Option<PathBuf>,
    /// The configuration file (default: /etc/falaj/agent.toml if it exists).
    #[arg(long, env = "FALAJ_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
}

impl DataDir {
    /// The configuration: the file given, else the default file if it exists, else the
    /// built-in defaults.
    pub fn config(&self) -> Result<AgentConfig, Failure> {
        falaj_shell::config::load_or_default(
            self.config.as_deref(),
            Path::new(config::DEFAULT_PATH),
        )
        .map_err(Failure::config)
    }

    /// The data directory.
    pub fn resolve(&self) -> Result<PathBuf, Failure> {
        match &self.data_dir {
            Some(dir) => Ok(dir.clone()),
            None => Ok(self.config()?.data_dir),
        }
    }
}

/// Arguments of `init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    data: DataDir,
    /// The region this site is in; bundles for other regions are refused.
    #[arg(long)]
    region: String,
    /// The trust root (`root.json`) whose keys sign the bundles this agent accepts.
    #[arg(long)]
    trust: PathBuf,
}

/// Arguments of `enroll`.
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// The control plane's QUIC address (`host:port`), or the addresses of its replicas
    /// separated by commas (`a:7443,b:7443`); a name with several records counts as
    /// several. The agent starts at a random one and moves on to the next when one fails.
    #[arg(long)]
    control_plane: String,
    /// The enrollment token (`falaj-control token create`).
    #[arg(long, env = "FALAJ_ENROLL_TOKEN", hide_env_values = true)]
    token: String,
    #[command(flatten)]
    data: DataDir,
    /// The region this agent must be in (refuses a token for another).
    #[arg(long)]
    region: Option<String>,
    /// The name shown in the fleet view (default: the host name).
    #[arg(long)]
    name: Option<String>,
}

/// Arguments of `import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The bundle file (`.falaj`).
    file: PathBuf,
    #[command(flatten)]
    data: DataDir,
    /// Install a version older than one already installed (a deliberate rollback).
    #[arg(long)]
    allow_downgrade: bool,
}

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    data: DataDir,
    /// Address to listen on [config: http.listen, default 127.0.0.1:8000].
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Address of the gRPC endpoint [config: grpc.listen, default off].
    #[arg(long)]
    grpc: Option<SocketAddr>,
    /// Largest request body accepted, in bytes [config: http.max_body_bytes].
    #[arg(long)]
    max_body_bytes: Option<u64>,
    /// Inferences run at once [config: http.workers, default one per core].
    #[arg(long)]
    workers: Option<usize>,
    /// How often to look for newly imported bundles [config: models.poll_interval].
    #[arg(long, value_parser = humantime::parse_duration)]
    poll_interval: Option<Duration>,
    /// How often an enrolled agent reports [config: control_plane.heartbeat].
    #[arg(long, value_parser = humantime::parse_duration)]
    heartbeat: Option<Duration>,
}

/// Arguments of `check-config`.
#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The configuration file.
    #[arg(long, env = "FALAJ_AGENT_CONFIG", default_value = config::DEFAULT_PATH)]
    config: PathBuf,
}

pub(crate) fn store_failure(err: StoreError) -> Failure {
    match err {
        StoreError::NotInitialised(_)
        | StoreError::AlreadyInitialised(_)
        | StoreError::SchemaTooNew { .. }
        | StoreError::Region(_)
        | StoreError::Trust(_)
        | StoreError::DeviceKey(_)
        | StoreError::KeyFileMode { .. } => Failure::Config(err.into()),
        other => Failure::Other(other.into()),
    }
}

/// Runs a parsed command line; prints errors and returns the exit code.
pub fn run(cli: Cli) -> ExitCode {
    #[cfg(feature = "failpoints")]
    let _crash_points = fail::FailScenario::setup();
    let result = match cli.command {
        Command::Init(args) => init(&args),
        Command::Enroll(args) => enroll(&args),
        Command::Import(args) => import(&args),
        Command::Serve(args) => serve(&args),
        Command::Apikey(command) => crate::apikeys::cli::run(&command),
        Command::List(args) => args.resolve().and_then(|dir| list(&dir)),
        Command::Remove(args) => remove(&args),
        Command::Trust(TrustCommand::Update(args)) => trust_update(&args),
        Command::Trust(TrustCommand::Show(args)) => args.resolve().and_then(|dir| trust_show(&dir)),
        Command::Finetune(args) => crate::finetune::cli::run(&args),
        Command::Bench(args) => crate::bench::run(&args),
        Command::CheckConfig(args) => check_config(&args.config),
        Command::Audit(AuditCommand::Export(args)) => {
            args.data.resolve().and_then(|dir| audit_export(&dir, &args.out))
        }
        Command::Audit(AuditCommand::Verify(args)) => audit_verify(&args),
        Command::Keys(command) => crate::keys_cli::run(&command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report("falaj-agent"),
    }
}

fn init(args: &InitArgs) -> Result<(), Failure> {
    let trust = std::fs::read(&args.trust).map_err(|e| {
        Failure::Config(anyhow::anyhow!("reading trust root {}: {e}", args.trust.display()))
    })?;
    let data_dir = args.data.resolve()?;
    let store =
        Store::init(&data_dir, &args.region, &trust, SystemTime::now()).map_err(store_failure)?;
    let root = store.trust_root().map_err(store_failure)?;
    println!(
        "initialised agent in {} for region {} (trust root version {}, {} signing key(s), threshold {})",
        data_dir.display(),
        store.region(),
        root.version(),
        root.signing_role().keyids.len(),
        root.signing_role().threshold
    );
    Ok(())
}

fn enroll(args: &EnrollArgs) -> Result<(), Failure> {
    let hostname = args.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map_or_else(|_| "unknown".into(), |h| h.trim().to_owned())
    });
    let options = EnrollOptions {
        control_plane: args.control_plane.clone(),
        token: args.token.clone(),
        hostname,
        region: args.region.clone(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(anyhow::anyhow!("starting the async runtime: {e}")))?;
    let identity = runtime
        .block_on(enroll::enroll(&args.data.resolve()?, &options, SystemTime::now()))
        .map_err(|e| match e {
            EnrollError::Connect { .. } | EnrollError::Identity(_) => Failure::Other(e.into()),
            EnrollError::Refused(_) => Failure::Refused(e.into()),
            EnrollError::Address(_) => Failure::Usage(e.into()),
            _ => Failure::Config(e.into()),
        })?;
    println!(
        "enrolled as {} in group {} with the control plane at {}",
        identity.agent_id,
        identity.group,
        identity.control_planes().join(", ")
    );
    Ok(())
}

fn import(args: &ImportArgs) -> Result<(), Failure> {
    let mut store = Store::open(&args.data.resolve()?).map_err(store_failure)?;
    let options = ImportOptions {
        allow_downgrade: args.allow_downgrade,
        ..ImportOptions::new(SystemTime::now())
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec})",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message(format!("verifying {}", args.file.display()));
        bar
    });
    let mut progress = |done: u64, total: u64| {
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
    };
    let outcome = import::import_file(&mut store, &args.file, &options, &mut progress);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match outcome {
        Ok(ImportOutcome::Installed { name, version, previous, size }) => {
            let was =
                previous.map_or_else(|| "first version".to_owned(), |p| format!("was version {p}"));
            println!(
                "installed {name} version {version} ({size} bytes) from {}; active ({was})",
                args.file.display()
            );
            Ok(())
        }
        Ok(ImportOutcome::AlreadyInstalled { name, version }) => {
            println!(
                "{name} version {version} is already installed from this very bundle; nothing to do"
            );
            Ok(())
        }
        Err(err @ (ImportError::Store(_) | ImportError::Read { .. })) => {
            Err(Failure::Other(err.into()))
        }
        Err(err) => Err(Failure::Refused(err.into())),
    }
}

fn serve(args: &ServeArgs) -> Result<(), Failure> {
    let mut file = args.data.config()?;
    if let Some(dir) = &args.data.data_dir {
        file.data_dir.clone_from(dir);
    }
    if let Some(http) = args.http {
        file.http.listen = http;
    }
    if let Some(grpc) = args.grpc {
        file.grpc.listen = Some(grpc);
    }
    if let Some(bytes) = args.max_body_bytes {
        file.http.max_body_bytes = bytes;
    }
    if let Some(workers) = args.workers {
        file.http.workers = workers;
    }
    if let Some(every) = args.poll_interval {
        file.models.poll_interval = every;
    }
    if let Some(every) = args.heartbeat {
        file.control_plane.heartbeat = every;
    }
    file.check(Path::new("the command line")).map_err(|e| Failure::Config(e.into()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Other(anyhow::anyhow!("starting the async runtime: {e}")))?;
    runtime.block_on(async move {
        let agent =
            Agent::start(file.data_dir.clone(), file.serve(), file.sync()).await.map_err(|e| {
                match e {
                    crate::server::ServeError::Store(e) => store_failure(e),
                    other => Failure::Config(other.into()),
                }
            })?;
        let scheme = if file.http.tls_certificate.is_some() { "https" } else { "http" };
        let stop = shutdown_signal();
        println!("serving the Open Inference Protocol on {scheme}://{}", agent.local_addr());
        if let Some(grpc) = agent.grpc_addr() {
            println!("serving the Open Inference Protocol over gRPC on {scheme}://{grpc}");
        }
        if let Some(identity) = agent.identity() {
            println!(
                "syncing with the control plane at {} as {}",
                identity.control_planes().join(", "),
                identity.agent_id
            );
        }
        systemd::ready();
        let served = agent
            .run(async {
                stop.await;
                systemd::stopping();
            })
            .await;
        served.map_err(|e| Failure::Other(e.into()))
    })
}

fn check_config(path: &Path) -> Result<(), Failure> {
    let config = AgentConfig::load(path).map_err(|e| Failure::Config(e.into()))?;
    println!("{}: OK", path.display());
    println!("data_dir          {}", config.data_dir.display());
    println!("http.listen       {}", config.http.listen);
    println!(
        "http.tls          {}",
        config.http.tls_certificate.as_ref().map_or("off".into(), |c| c.display().to_string())
    );
    println!("http.auth         {}", config.http.auth.unwrap_or(crate::apikeys::AuthMode::None));
    println!(
        "http.workers      {}",
        if config.http.workers == 0 {
            "one per core".to_owned()
        } else {
            config.http.workers.to_string()
        }
    );
    println!("heartbeat         {}", humantime::format_duration(config.control_plane.heartbeat));
    Ok(())
}

fn remove(args: &RemoveArgs) -> Result<(), Failure> {
    let (name, version) = args
        .target
        .split_once('@')
        .and_then(|(n, v)| Some((n, v.parse::<u64>().ok()?)))
        .ok_or_else(|| {
            Failure::Usage(anyhow::anyhow!("expected NAME@VERSION, got {:?}", args.target))
        })?;
    let dir = args.data.resolve()?;
    let mut store = Store::open(&dir).map_err(store_failure)?;
    store.remove_imported(name, version, SystemTime::now()).map_err(|e| match e {
        StoreError::Refused(_) => Failure::Config(e.into()),
        other => store_failure(other),
    })?;
    println!("removed {name}@{version}; a running agent stops serving it at its next reload");
    Ok(())
}

fn trust_update(args: &TrustUpdateArgs) -> Result<(), Failure> {
    let offered = args
        .files
        .iter()
        .map(|path| {
            std::fs::read(path).map_err(|e| {
                Failure::Config(anyhow::anyhow!("reading trust root {}: {e}", path.display()))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let dir = args.data.resolve()?;
    let mut store = Store::open(&dir).map_err(store_failure)?;
    let taken = store.update_trust(&offered, SystemTime::now()).map_err(|e| match e {
        StoreError::Trust(_) => Failure::Config(e.into()),
        other => store_failure(other),
    })?;
    let root = store.trust_root().map_err(store_failure)?;
    match taken.as_slice() {
        [] => println!("trust root version {} already held; nothing to take", root.version()),
        _ => println!(
            "took trust root version(s) {}; now at version {} (expires {})",
            taken.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
            root.version(),
            root.expires()
        ),
    }
    Ok(())
}

fn trust_show(data_dir: &Path) -> Result<(), Failure> {
    let store = Store::open(data_dir).map_err(store_failure)?;
    let root = store.trust_root().map_err(store_failure)?;
    let roles = &root.metadata().roles;
    let role = |r: &falaj_common::trust::Role| {
        let ids: Vec<String> = r.keyids.iter().map(falaj_common::keys::KeyId::short).collect();
        format!("{} of {}", r.threshold, ids.join(","))
    };
    println!(
        "trust root version {} for region {}, expires {}\nroot keys: {}\nsigning keys: {}",
        root.version(),
        root.region(),
        root.expires(),
        role(&roles.root),
        role(&roles.signing)
    );
    let now = falaj_common::time::Timestamp::from_system(SystemTime::now());
    if let Some(days) = falaj_common::time::expiry_warning(now, root.expires()) {
        println!(
            "WARNING: trust root version {} expires within {days} days: take its successor \
             (it comes from the control plane; air-gapped: falaj-agent trust update)",
            root.version()
        );
    }
    Ok(())
}

fn audit_export(data_dir: &Path, out: &Path) -> Result<(), Failure> {
    let mut store = Store::open(data_dir).map_err(store_failure)?;
    let key = store.audit_key().map_err(store_failure)?;
    let now = falaj_common::time::Timestamp::from_system(SystemTime::now());
    let lines = store.audit_export(&key, now).map_err(store_failure)?;
    let text = lines.join("\n") + "\n";
    falaj_shell::fs::write_atomic(out, text.as_bytes(), 0o600)
        .map_err(|e| Failure::Other(anyhow::anyhow!("writing {}: {e}", out.display())))?;
    println!(
        "wrote {} lines to {}; verify with `falaj-agent audit verify {} --key {}`",
        lines.len(),
        out.display(),
        out.display(),
        data_dir.join(crate::store::audit::PUBLIC_FILE).display()
    );
    Ok(())
}

fn audit_verify(args: &AuditVerifyArgs) -> Result<(), Failure> {
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map_err(|e| Failure::Other(anyhow::anyhow!("reading {}: {e}", path.display())))
    };
    let key: falaj_common::keys::PublicKey = read(&args.key)?.trim().parse().map_err(|e| {
        Failure::Config(anyhow::anyhow!("{} is not a public key: {e}", args.key.display()))
    })?;
    let text = read(&args.file)?;
    match falaj_common::audit::verify(text.lines(), &[key]) {
        Ok(v) => {
            println!("{}: {v} against audit key {}", args.file.display(), key.id().short());
            Ok(())
        }
        Err(e) => {
            Err(Failure::Refused(anyhow::anyhow!("{} does not verify: {e}", args.file.display())))
        }
    }
}

fn list(data_dir: &Path) -> Result<(), Failure> {
    let store = Store::open(data_dir).map_err(store_failure)?;
    let installed = store.installed().map_err(store_failure)?;
    if installed.is_empty() {
        println!("no bundles installed in {}", data_dir.display());
        return Ok(());
    }
    println!(
        "{:<24} {:>8} {:<7} {:<8} {:<8} {:>10} {:>12} {:<22} {:<22}",
        "NAME", "VERSION", "ACTIVE", "KIND", "RUNTIME", "ENTITIES", "BYTES", "INSTALLED", "EXPIRES"
    );
    for i in &installed {
        let runtime = i.manifest.model().map_or("-".to_owned(), |m| m.runtime.to_string());
        // The count the manifest declares; import checked the payload holds exactly that.
        let entities = i.manifest.snapshot().map_or("-".to_owned(), |s| s.entities.to_string());
        println!(
            "{:<24} {:>8} {:<7} {:<8} {:<8} {:>10} {:>12} {:<22} {:<22}",
            i.manifest.name,
            i.manifest.version,
            if i.active { "yes" } else { "" },
            i.manifest.content.kind().to_string(),
            runtime,
            entities,
            i.size,
            i.installed_at.to_string(),
            i.manifest.expires.to_string()
        );
    }
    let overlays = store.overlays().map_err(store_failure)?;
    for i in &installed {
        let Some(lineage) = i.manifest.model().and_then(|m| m.lineage.as_ref()) else { continue };
        let serving = overlays.iter().any(|o| o.derived == i.manifest.name);
        println!(
            "{}@{}: derived on this site from {}@{} (unsigned); {}",
            i.manifest.name,
            i.manifest.version,
            lineage.parent,
            lineage.parent_version,
            if serving {
                format!("serves requests for {}", lineage.parent)
            } else {
                format!("inactive: {}", lineage.gate.reason)
            }
        );
    }
    Ok(())
}
