//! `falaj-agent`: a thin shell over [`falaj_agent::cli`].

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
    match falaj_agent::cli::Cli::try_parse() {
        Ok(cli) => falaj_agent::cli::run(cli),
        Err(err) => falaj_shell::exit::clap_exit(&err),
    }
}
