//! `falaj-agent`: a thin shell over [`falaj_agent::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    falaj_shell::daemon::log_to_stderr("info");
    match falaj_agent::cli::Cli::try_parse() {
        Ok(cli) => falaj_agent::cli::run(cli),
        Err(err) => falaj_shell::exit::clap_exit(&err),
    }
}
