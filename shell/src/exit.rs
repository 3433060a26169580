//! How a command of either daemon fails: one [`Failure`] type and one set of exit codes,
//! taken from BSD's `sysexits.h`, so that a script or systemd can tell a mistake in the
//! command line or the configuration (which retrying will not fix) from a failure that
//! may pass.
//!
//! | code | constant          | meaning                                          |
//! |------|-------------------|--------------------------------------------------|
//! | 0    |                   | success                                          |
//! | 1    | [`EXIT_FAILURE`]  | anything else (I/O, the network, a peer's error) |
//! | 64   | [`EXIT_USAGE`]    | a command line that says nothing meaningful      |
//! | 65   | [`EXIT_REFUSED`]  | refused input: a bundle or file that fails checks |
//! | 78   | [`EXIT_CONFIG`]   | bad configuration or setup                       |
//!
//! A unit file can name 64, 65 and 78 in `RestartPreventExitStatus=` so that systemd does
//! not restart-loop on a mistake.

use std::process::ExitCode;

/// Exit code for a failure that is none of the others.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for a usage error (`EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for refused input, such as a bundle that fails verification (`EX_DATAERR`).
pub const EXIT_REFUSED: u8 = 65;
/// Exit code for bad configuration or setup (`EX_CONFIG`).
pub const EXIT_CONFIG: u8 = 78;

/// A command's failure: the error, and by its variant the exit code it maps to.
#[derive(Debug)]
pub enum Failure {
    /// A command line that does not say something meaningful (exit 64).
    Usage(anyhow::Error),
    /// Configuration or setup (exit 78).
    Config(anyhow::Error),
    /// Refused input, such as a bundle that fails verification (exit 65).
    Refused(anyhow::Error),
    /// Anything else (exit 1).
    Other(anyhow::Error),
}

impl Failure {
    /// A usage error (exit 64).
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self::Usage(error.into())
    }

    /// A configuration error (exit 78).
    pub fn config(error: impl Into<anyhow::Error>) -> Self {
        Self::Config(error.into())
    }

    /// Refused input (exit 65).
    pub fn refused(error: impl Into<anyhow::Error>) -> Self {
        Self::Refused(error.into())
    }

    /// Any other failure (exit 1).
    pub fn other(error: impl Into<anyhow::Error>) -> Self {
        Self::Other(error.into())
    }

    /// The exit code, as a number.
    pub fn code(&self) -> u8 {
        match self {
            Self::Usage(_) => EXIT_USAGE,
            Self::Config(_) => EXIT_CONFIG,
            Self::Refused(_) => EXIT_REFUSED,
            Self::Other(_) => EXIT_FAILURE,
        }
    }

    /// The process exit code.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code())
    }

    pub fn error(&self) -> &anyhow::Error {
        match self {
            Self::Usage(e) | Self::Config(e) | Self::Refused(e) | Self::Other(e) => e,
        }
    }

    /// The error and its causes on one line, each cause once.
    pub fn message(&self) -> String {
        falaj_common::errors::describe(self.error().as_ref())
    }

    /// Prints `PROGRAM: error: MESSAGE` to standard error and returns the exit code: what
    /// a daemon's `main` does with a failed command.
    pub fn report(&self, program: &str) -> ExitCode {
        eprintln!("{program}: error: {}", self.message());
        self.exit_code()
    }
}

/// The exit code for a command line clap could not parse: 0 when it only printed help or
/// the version, [`EXIT_USAGE`] otherwise. Prints clap's message.
pub fn clap_exit(err: &clap::Error) -> ExitCode {
    let _ = err.print();
    if err.use_stderr() { ExitCode::from(EXIT_USAGE) } else { ExitCode::SUCCESS }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_sysexits_code() {
        assert_eq!(Failure::usage(anyhow::anyhow!("u")).code(), 64);
        assert_eq!(Failure::refused(anyhow::anyhow!("r")).code(), 65);
        assert_eq!(Failure::config(anyhow::anyhow!("c")).code(), 78);
        assert_eq!(Failure::other(anyhow::anyhow!("o")).code(), 1);
    }

    #[test]
    fn the_message_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let failure = Failure::config(anyhow::Error::new(io).context("reading /etc/falaj.toml"));
        assert_eq!(failure.message(), "reading /etc/falaj.toml: no such file");
    }
}
