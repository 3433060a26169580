//! `falaj-control`: a thin shell over [`falaj_control::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match falaj_control::cli::Cli::try_parse() {
        Ok(cli) => falaj_control::cli::run(cli),
        Err(err) => falaj_shell::exit::clap_exit(&err),
    }
}
