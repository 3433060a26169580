//! `falaj`: the umbrella binary. `falaj demo` brings up a whole working system locally;
//! `falaj agent ...` and `falaj control ...` are the agent's and the control plane's
//! command lines, the same as `falaj-agent` and `falaj-control`.

mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Falaj: signed ML models delivered to the edge and served there.
#[derive(Debug, Parser)]
#[command(name = "falaj", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole system locally: keys, the sample model, a bundle, an agent serving it.
    Demo(demo::DemoArgs),
    /// The agent's commands (as `falaj-agent`).
    Agent(falaj_agent::cli::Cli),
    /// The control plane's commands (as `falaj-control`).
    Control(falaj_control::cli::Cli),
}

fn main() -> ExitCode {
    falaj_shell::daemon::log_to_stderr("warn");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return falaj_shell::exit::clap_exit(&err),
    };
    match cli.command {
        Command::Demo(args) => match demo::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("falaj demo: error: {}", falaj_common::errors::describe(err.as_ref()));
                ExitCode::FAILURE
            }
        },
        Command::Agent(cli) => falaj_agent::cli::run(cli),
        Command::Control(cli) => falaj_control::cli::run(cli),
    }
}
