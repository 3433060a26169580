//! `falaj-control audit ...`: the latest entries, an export to a file, and the offline
//! verification of an export against the audit key's public half.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use falaj_common::audit::{self, Entry};
use falaj_common::keys::PublicKey;
use falaj_common::text::printable;
use falaj_common::time::Timestamp;

use super::AuditQuery;
use crate::cli::{ApiArgs, Failure, online};

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Show the latest audit entries.
    List(ListArgs),
    /// Write the whole audit log (entries and signed checkpoints) to a file.
    Export(ExportArgs),
    /// Verify an export offline against the audit key: exits 65 naming the first entry
    /// or checkpoint that does not hold.
    Verify(VerifyArgs),
}

/// Arguments of `audit list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Entries of the last DURATION.
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Only this actor (`user:alice`, `token:ci`, `admin-token`, `agent:ID`, `system`).
    #[arg(long)]
    actor: Option<String>,
    /// Only actions starting with this (`rollout`, `deploy`).
    #[arg(long)]
    action: Option<String>,
    /// The latest this many.
    #[arg(long, default_value_t = 50)]
    limit: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `audit export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The file to write (JSON lines).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The export (JSON lines).
    file: PathBuf,
    /// The audit key's public half (`keys/audit.pub` of the control plane).
    #[arg(long)]
    key: PathBuf,
}

/// Runs an `audit` command.
pub fn run(command: AuditCommand) -> Result<(), Failure> {
    match command {
        AuditCommand::List(args) => {
            let query = AuditQuery {
                since: args.since.map(|d| {
                    Timestamp::from_system(
                        SystemTime::now().checked_sub(d).unwrap_or(SystemTime::UNIX_EPOCH),
                    )
                }),
                actor: args.actor,
                action: args.action,
                limit: Some(args.limit),
            };
            online(&args.api, |c| async move {
                let entries = c.audit(&query).await?;
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&entries).unwrap_or_default());
                } else {
                    print!("{}", render(&entries));
                }
                Ok(())
            })
        }
        AuditCommand::Export(args) => online(&args.api, |c| async move {
            let text = c.audit_export().await?;
            crate::files::write_atomic(&args.out, text.as_bytes(), 0o600).map_err(|source| {
                crate::client::ClientError::File { path: args.out.display().to_string(), source }
            })?;
            println!("wrote {} lines to {}", text.lines().count(), args.out.display());
            Ok(())
        }),
        AuditCommand::Verify(args) => verify(&args),
    }
}

fn verify(args: &VerifyArgs) -> Result<(), Failure> {
    let key: PublicKey = super::key::read_public(&args.key).map_err(Failure::config)?;
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| Failure::other(anyhow::anyhow!("reading {}: {e}", args.file.display())))?;
    match audit::verify(text.lines(), &[key]) {
        Ok(v) => {
            println!("{}: {v} against audit key {}", args.file.display(), key.id().short());
            Ok(())
        }
        Err(e) => {
            Err(Failure::refused(anyhow::anyhow!("{} does not verify: {e}", args.file.display())))
        }
    }
}

/// Entries as `audit list` prints them.
pub fn render(entries: &[Entry]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>6} {:<20} {:<24} {:<16} {:<22} {:<8} TARGET",
        "SEQ", "AT", "ACTOR", "SOURCE", "ACTION", "OUTCOME"
    );
    for e in entries {
        let _ = writeln!(
            out,
            "{:>6} {:<20} {:<24} {:<16} {:<22} {:<8} {}",
            e.seq,
            e.at.to_string(),
            printable(&e.actor),
            printable(e.source.as_deref().unwrap_or("-")),
            printable(&e.action),
            super::outcome_name(e.outcome),
            printable(&e.target)
        );
    }
    out
}
