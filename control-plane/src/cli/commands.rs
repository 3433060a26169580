//! Dispatch, and the commands that act on a running control plane through its admin API.

use std::collections::BTreeMap;
use std::future::Future;
use std::process::ExitCode;
use std::time::SystemTime;

use super::render::{
    render_agents, render_alerts, render_bundles, render_metrics_marked, render_pushed,
    render_re_signed, render_token_header,
};
use super::{
    AgentCommand, ApiArgs, BundleCommand, Cli, Command, DeployArgs, Failure, PushArgs, TokenCommand,
};
use crate::client::{AdminClient, ClientError};

impl ApiArgs {
    pub(crate) fn client(&self) -> Result<AdminClient, Failure> {
        let token = if let Some(token) = &self.token {
            token.clone()
        } else if let Some(token) = crate::auth::cli::session_token_for(&self.control_plane)? {
            token
        } else {
            let path = self.data_dir.join(crate::daemon::ADMIN_TOKEN_FILE);
            std::fs::read_to_string(&path).map(|t| t.trim().to_owned()).map_err(|e| {
                Failure::config(anyhow::anyhow!(
                        "no credentials: pass --token or FALAJ_TOKEN, log in (falaj-control login), or make {} readable ({e})",
                        path.display()
                    ),
                )
            })?
        };
        match &self.ca_cert {
            None => Ok(AdminClient::new(&self.control_plane, &token)),
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    Failure::config(anyhow::anyhow!(
                        "reading the CA certificate {}: {e}",
                        path.display()
                    ))
                })?;
                AdminClient::with_ca(&self.control_plane, &token, &pem).map_err(Failure::config)
            }
        }
    }
}

/// Runs a parsed command line; prints errors and returns the exit code.
pub fn run(cli: Cli) -> ExitCode {
    let now = SystemTime::now();
    let result = match cli.command {
        Command::Keys(command) => super::keys::keys(command, now),
        Command::Bundle(BundleCommand::Build(args)) => super::bundle::bundle_build(args, now),
        Command::Bundle(BundleCommand::Inspect(args)) => super::bundle::bundle_inspect(&args, now),
        Command::Sample(args) => super::bundle::sample(&args),
        Command::Serve(args) => super::serve::serve(args),
        Command::CheckConfig(args) => super::serve::check_config(&args.config),
        Command::Migrate(args) => super::migrate::migrate(args),
        Command::Bundle(BundleCommand::Push(args)) => bundle_push(&args),
        Command::Bundle(BundleCommand::List(api)) => online(&api, |c| async move {
            print!("{}", render_bundles(&c.bundles().await?));
            Ok(())
        }),
        Command::Bundle(BundleCommand::ReSign(args)) => online(&args.api, |c| async move {
            print!("{}", render_re_signed(&c.re_sign(args.bundle.as_deref()).await?));
            Ok(())
        }),
        Command::Token(TokenCommand::Create(args)) => online(&args.api, |c| async move {
            let token = c.create_token(&args.group, args.ttl.as_secs().max(1)).await?;
            eprint!("{}", render_token_header(&token));
            println!("{}", token.token);
            Ok(())
        }),
        Command::Agents(api) => online(&api, |c| async move {
            print!("{}", render_agents(&c.agents().await?));
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
        Err(failure) => failure.report("falaj-control"),
    }
}

fn bundle_push(args: &PushArgs) -> Result<(), Failure> {
    online(&args.api, |c| async move {
        print!("{}", render_pushed(&c.push_bundle(&args.file).await?));
        Ok(())
    })
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
        .map_err(|e| Failure::other(anyhow::anyhow!("starting the async runtime: {e}")))?;
    runtime.block_on(f(client)).map_err(|e| match &e {
        ClientError::Api { status: 400..=499, .. } => Failure::config(e),
        _ => Failure::other(e),
    })
}

fn deploy(args: DeployArgs) -> Result<(), Failure> {
    let (name, version) = args
        .target
        .split_once('@')
        .and_then(|(n, v)| Some((n.to_owned(), v.parse::<u64>().ok()?)))
        .ok_or_else(|| {
            Failure::usage(anyhow::anyhow!("expected NAME@VERSION, got {:?}", args.target))
        })?;
    online(&args.api, |c| async move {
        c.deploy(&args.group, &name, version).await?;
        println!("deployed {name}@{version} to group {}", args.group);
        Ok(())
    })
}
