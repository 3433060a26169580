//! `serve` (the daemon in the foreground) and `check-config`.

use std::path::Path;

use falaj_common::config::Checked as _;
use falaj_shell::daemon::{self as systemd, shutdown_signal};

use super::{Failure, ServeArgs};
use crate::config::{self, ControlConfig};
use crate::daemon::{ControlPlane, ServeConfig, ServeError};

pub(super) fn serve(args: ServeArgs) -> Result<(), Failure> {
    let mut file: ControlConfig = falaj_shell::config::load_or_default(
        args.config.as_deref(),
        Path::new(config::DEFAULT_PATH),
    )
    .map_err(Failure::config)?;
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
    if args.database.is_some() {
        file.database.url = args.database;
    }
    let unseal = args.unseal_from;
    file.check(Path::new("the command line")).map_err(Failure::config)?;
    let token_file = file.data_dir.join(crate::daemon::ADMIN_TOKEN_FILE);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::other(anyhow::anyhow!("starting the async runtime: {e}")))?;
    runtime.block_on(async move {
        let control = ControlPlane::start(ServeConfig { unseal, ..file.serve() }).await.map_err(
            |e| match e {
                ServeError::Io { .. } | ServeError::Db(_) => Failure::other(e),
                other => Failure::config(other),
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
        served.map_err(Failure::other)
    })
}

pub(super) fn check_config(path: &Path) -> Result<(), Failure> {
    let config = ControlConfig::load(path).map_err(Failure::config)?;
    println!("{}: OK", path.display());
    println!("data_dir      {}", config.data_dir.display());
    println!("region        {}", config.region.as_deref().unwrap_or("(from the keys)"));
    println!("quic.listen   {}", config.quic.listen);
    println!("admin.listen  {}", config.admin.listen);
    let database = config.database.url.as_deref().map_or_else(
        || format!("SQLite in {}", config.data_dir.display()),
        crate::sql::postgres::redacted,
    );
    println!("database      {database}");
    Ok(())
}
