//! The `falaj-control` command line. Offline: `keys init|rotate-root|rotate-signing|status`,
//! `bundle build`, `bundle inspect`, `sample`, `migrate`. The daemon: `serve`. Against a running control plane,
//! through its admin API: `bundle push|list`, `token create`, `agents`, `agent revoke`,
//! `deploy`, `undeploy`, `metrics`, `alerts`, `features ...`, `finetune ...`,
//! `rollout ...`, `audit ...`, and people and credentials: `user ...`, `login`, `logout`,
//! `whoami`, `apitoken ...`.
//!
//! Exit codes: 0 success, 1 failure, 64 usage error, 65 a bundle that fails
//! verification, 78 bad configuration or input.
//!
//! The clap definitions are in `args`, dispatch and the commands against the admin API
//! in `commands`, the offline commands in `keys`, `bundle`, `migrate` and `serve`, and what every
//! command prints in [`render`], which fetches nothing and is tested on its own.

mod args;
mod bundle;
mod commands;
mod keys;
mod migrate;
pub mod render;
mod serve;

pub use args::*;
pub(crate) use commands::online;
pub use commands::run;
pub use render::{
    render_agents, render_alerts, render_keys_status, render_metrics, render_metrics_marked,
};

pub use falaj_shell::exit::{EXIT_CONFIG, EXIT_REFUSED, EXIT_USAGE, Failure};
