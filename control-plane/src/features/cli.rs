//! `falaj-control features ...`: the feature store's commands, all through the admin API.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::api::ViewDetail;
use crate::cli::{ApiArgs, Failure, online};
use falaj_common::time::Timestamp;
use falaj_tables::Format;

/// `features` subcommands.
#[derive(Debug, Subcommand)]
pub enum FeaturesCommand {
    /// Register a feature view from its TOML file, or update it (a breaking change makes
    /// a new version).
    Apply(FileArgs),
    /// List the feature views.
    List(ApiArgs),
    /// Show a view: its definition, history, ingests and snapshots.
    Show(ViewArgs),
    /// Ingest a CSV or Parquet file into a view: every row is checked, and one bad row
    /// refuses the whole file.
    Ingest(IngestArgs),
    /// Build a signed snapshot bundle of a view's latest values, to deploy like a model.
    Snapshot(SnapshotArgs),
    /// Join labels (entity, time, label) to the features as they were at each label's
    /// time, for training.
    Export(ExportArgs),
    /// Make a new version of the region's key for pseudonymising personal data; for the
    /// overlap, snapshots still carry each pseudonym under the previous version too, in
    /// a column `FEATURE__pii_vN`, so data from before stays joinable.
    RotatePiiKey(RotatePiiKeyArgs),
    /// List the versions of the PII key: current, in overlap (until when), retired.
    PiiKeys(ApiArgs),
}

/// Arguments of `features rotate-pii-key`.
#[derive(Debug, Args)]
pub struct RotatePiiKeyArgs {
    /// How long snapshots still carry pseudonyms under the previous version.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    overlap: Duration,
    #[command(flatten)]
    api: ApiArgs,
}

/// A file and the API.
#[derive(Debug, Args)]
pub struct FileArgs {
    file: PathBuf,
    #[command(flatten)]
    api: ApiArgs,
}

/// A view and the API.
#[derive(Debug, Args)]
pub struct ViewArgs {
    view: String,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `features ingest`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    view: String,
    /// The CSV (with a header) or Parquet file.
    file: PathBuf,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `features snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    view: String,
    /// Only the entities listed in this file (one id per line, or a CSV whose header names
    /// the entity column).
    #[arg(long)]
    entities: Option<PathBuf>,
    /// Only entities whose latest values pass this filter, e.g. `site == "plant-7" and
    /// load > 0.5`.
    #[arg(long)]
    filter: Option<String>,
    /// Values as they were at this time (RFC 3339; default now).
    #[arg(long)]
    as_of: Option<String>,
    /// For personal data the view gives no policy for: hash or drop.
    #[arg(long)]
    pii: Option<String>,
    /// How long agents may import the snapshot.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    expires_in: Duration,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `features export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    view: String,
    /// The labels: CSV or Parquet with the entity column, the view's timestamp column and
    /// label columns.
    #[arg(long)]
    labels: PathBuf,
    /// The output, `.parquet` or `.csv`.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    api: ApiArgs,
}

/// Runs a `features` command.
pub fn run(command: FeaturesCommand) -> Result<(), Failure> {
    match command {
        FeaturesCommand::Apply(args) => apply(&args),
        FeaturesCommand::List(api) => online(&api, |c| async move {
            println!(
                "{:<24} {:>7} {:>8} {:>8} {:>10} {:>10}  {:<20}",
                "VIEW", "VERSION", "REVISION", "FEATURES", "ROWS", "ENTITIES", "APPLIED"
            );
            for v in c.views().await? {
                println!(
                    "{:<24} {:>7} {:>8} {:>8} {:>10} {:>10}  {:<20}",
                    v.name,
                    v.version,
                    v.revision,
                    v.features,
                    v.rows,
                    v.entities,
                    v.applied_at.to_string()
                );
            }
            Ok(())
        }),
        FeaturesCommand::Show(args) => online(&args.api, |c| async move {
            print!("{}", render_view(&c.view(&args.view).await?));
            Ok(())
        }),
        FeaturesCommand::Ingest(args) => online(&args.api, |c| async move {
            match c.ingest(&args.view, &args.file).await {
                Ok(done) => {
                    println!(
                        "ingested {} rows into {}@{} (ingest {})",
                        done.rows, args.view, done.version, done.id
                    );
                    Ok(())
                }
                Err(e) => {
                    if let crate::client::ClientError::Api { details: Some(report), .. } = &e {
                        eprint!("{}", render_report(report));
                    }
                    Err(e)
                }
            }
        }),
        FeaturesCommand::Snapshot(args) => snapshot(args),
        FeaturesCommand::Export(args) => export(args),
        FeaturesCommand::RotatePiiKey(args) => online(&args.api, |c| async move {
            let rotated = c.rotate_pii_key(args.overlap.as_secs()).await?;
            println!(
                "PII key version {} is current ({}); snapshots carry version {}'s pseudonyms \
                 beside it until {}",
                rotated.version,
                rotated.file.display(),
                rotated.previous,
                rotated.overlap_until
            );
            Ok(())
        }),
        FeaturesCommand::PiiKeys(api) => online(&api, |c| async move {
            let now = Timestamp::from_system(std::time::SystemTime::now());
            print!("{}", render_pii_keys(&c.pii_keys().await?, now));
            Ok(())
        }),
    }
}

fn apply(args: &FileArgs) -> Result<(), Failure> {
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| Failure::other(anyhow::anyhow!("reading {}: {e}", args.file.display())))?;
    online(&args.api, |c| async move {
        let applied = c.apply_view(text).await?;
        let stored = &applied.stored;
        println!(
            "{} {}: version {}, revision {}",
            applied.outcome, stored.view.name, stored.version, stored.revision
        );
        for change in &stored.changes {
            println!("  {change}");
        }
        Ok(())
    })
}

fn snapshot(args: SnapshotArgs) -> Result<(), Failure> {
    let entities = args.entities.as_deref().map(read_entities).transpose()?;
    if let Some(p) = args.pii.as_deref().filter(|p| !matches!(*p, "hash" | "drop")) {
        return Err(Failure::usage(anyhow::anyhow!("--pii must be hash or drop, not {p:?}")));
    }
    let request = json!({
        "entities": entities,
        "filter": args.filter,
        "as_of": args.as_of,
        "pii": args.pii,
        "expires_in_seconds": args.expires_in.as_secs(),
    });
    online(&args.api, |c| async move {
        let built = c.snapshot(&args.view, &request).await?;
        let (b, s) = (&built.bundle, &built.snapshot);
        println!(
            "built {}@{}: {} entities ({}), as of {}, {} bytes, {} new chunks",
            b.name, b.version, s.entities, s.scope, s.as_of, b.size, built.new_chunks
        );
        if !s.pseudonymised.is_empty() {
            println!("pseudonymised: {:?}", s.pseudonymised);
        }
        println!("deploy it with: falaj-control deploy {}@{} --group GROUP", b.name, b.version);
        Ok(())
    })
}

fn export(args: ExportArgs) -> Result<(), Failure> {
    let format = Format::of_output(&args.out).map(Format::name).ok_or_else(|| {
        Failure::usage(anyhow::anyhow!(
            "--out must end in .parquet or .csv: {}",
            args.out.display()
        ))
    })?;
    online(&args.api, |c| async move {
        let (rows, matched) = c.export(&args.view, &args.labels, format, &args.out).await?;
        println!(
            "wrote {rows} rows to {} ({matched} with features at or before their time, {} without)",
            args.out.display(),
            rows - matched.min(rows)
        );
        Ok(())
    })
}

/// Entity ids from a file: one per line, or a CSV whose first line names the column
/// (the first column is taken).
fn read_entities(path: &Path) -> Result<Vec<String>, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::other(anyhow::anyhow!("reading {}: {e}", path.display())))?;
    let mut lines = text.lines().map(|l| l.split(',').next().unwrap_or_default().trim());
    let first = lines.next().unwrap_or_default();
    let mut ids: Vec<String> = lines.filter(|l| !l.is_empty()).map(str::to_owned).collect();
    // A header is a column name; an id on the first line is kept.
    if !falaj_common::features::view::is_column_name(first)
        || first.chars().all(|c| c.is_ascii_digit())
    {
        ids.insert(0, first.to_owned());
    }
    Ok(ids)
}

fn render_report(report: &Value) -> String {
    let mut out = format!(
        "{} of {} rows are invalid ({} errors); the first:\n",
        report["bad_rows"], report["rows"], report["errors"]
    );
    for e in report["first"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  row {:>8}  {:<20} {:<24} {}",
            e["row"],
            e["column"].as_str().unwrap_or("?"),
            e["value"].as_str().unwrap_or("?"),
            e["rule"].as_str().unwrap_or("?")
        );
    }
    out
}

fn render_view(shown: &ViewDetail) -> String {
    let current = &shown.current;
    let view = &current.view;
    let mut out = format!(
        "view {} version {} revision {} ({} rows, {} entities)\n{}\nentity: {} ({})  time: {}\n\n",
        view.name,
        current.version,
        current.revision,
        shown.rows,
        shown.entities,
        view.description,
        view.entity.name,
        view.entity.kind,
        view.timestamp,
    );
    let _ = writeln!(
        out,
        "{:<20} {:<9} {:<8} {:<5} {:<14} DESCRIPTION",
        "FEATURE", "TYPE", "NULLABLE", "PII", "OWNER"
    );
    for f in &view.features {
        let pii = match (f.pii, f.pii_policy) {
            (true, Some(policy)) => policy.to_string(),
            (true, None) => "yes".to_owned(),
            (false, _) => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<20} {:<9} {:<8} {:<5} {:<14} {}",
            f.name,
            f.kind.to_string(),
            if f.nullable { "yes" } else { "no" },
            pii,
            f.owner,
            f.description
        );
    }
    out += "\nhistory:\n";
    for h in &shown.history {
        let _ = writeln!(
            out,
            "  {}.{}  {}  {}",
            h.version,
            h.revision,
            h.applied_at,
            h.changes.join("; ")
        );
    }
    if !shown.ingests.is_empty() {
        let _ = writeln!(out, "\ningests (latest first):");
        for i in &shown.ingests {
            let _ = writeln!(
                out,
                "  #{:<5} {}  {:>10} rows  into v{}  from {} ({})",
                i.id, i.at, i.rows, i.version, i.source, i.format
            );
        }
    }
    if !shown.snapshots.is_empty() {
        let _ = writeln!(out, "\nsnapshots (latest first; what left the control plane):");
        for s in &shown.snapshots {
            let _ = writeln!(
                out,
                "  v{:<4} built {}  as of {}  {:>9} entities  view v{}  {}{}",
                s.version,
                s.built_at,
                s.as_of,
                s.entities,
                s.view_version,
                s.scope,
                if s.pseudonymised.is_empty() {
                    String::new()
                } else {
                    format!("  pseudonymised: {}", s.pseudonymised.join(", "))
                }
            );
        }
    }
    out
}

/// The table of `features pii-keys`.
pub fn render_pii_keys(versions: &[super::pii_keys::KeyVersion], now: Timestamp) -> String {
    let mut out = format!("{:<8} {:<22} STATE\n", "VERSION", "CREATED");
    for v in versions {
        let state = match v.overlap_until {
            None => "current".to_owned(),
            Some(until) if until > now => format!("in overlap until {until}"),
            Some(until) => format!("retired since {until}"),
        };
        let _ = writeln!(out, "{:<8} {:<22} {state}", v.version, v.created.to_string());
    }
    out
}
