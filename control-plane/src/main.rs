//! `falaj-control`: a thin shell over [`falaj_control::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    falaj_shell::daemon::log_to_stderr("info");
    match falaj_control::cli::Cli::try_parse() {
        Ok(cli) => falaj_control::cli::run(cli),
        Err(err) => falaj_shell::exit::clap_exit(&err),
    }
}
