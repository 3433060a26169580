//! `falaj-control finetune ...`: order a fine-tune job for an agent from a job file (the
//! same TOML an air-gapped site's `falaj-agent finetune --job` takes), list jobs, show one
//! with its loss curve and the figures before and after.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use falaj_common::finetune::Job;
use falaj_common::finetune::Metrics;
use falaj_common::text::printable;
use serde_json::json;

use super::JobRow;
use crate::cli::{ApiArgs, Failure, online};

/// `finetune` subcommands.
#[derive(Debug, Subcommand)]
pub enum FinetuneCommand {
    /// Order a job for an agent; it travels in the agent's desired state.
    Order(OrderArgs),
    /// List the jobs, newest first.
    List(ApiArgs),
    /// Show a job: the order, where it stands, and the agent's report.
    Show(ShowArgs),
}

/// Arguments of `finetune order`.
#[derive(Debug, Args)]
pub struct OrderArgs {
    /// The agent that runs it, where the data is.
    #[arg(long)]
    agent: String,
    /// The job file (TOML): model, data on the agent, hyperparameters, gate.
    #[arg(long)]
    job: PathBuf,
    /// The job's id (default: ft-N).
    #[arg(long)]
    id: Option<String>,
    /// Let the trained head's weights leave the site in the agent's report.
    #[arg(long)]
    share_weights: bool,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `finetune show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The job's id.
    id: String,
    #[command(flatten)]
    api: ApiArgs,
}

/// Runs a `finetune` command.
pub fn run(command: FinetuneCommand) -> Result<(), Failure> {
    match command {
        FinetuneCommand::Order(args) => {
            let text = std::fs::read_to_string(&args.job).map_err(|e| {
                Failure::other(anyhow::anyhow!("reading {}: {e}", args.job.display()))
            })?;
            let job = Job::from_toml(&text)
                .map_err(|e| Failure::usage(anyhow::anyhow!("{}: {e}", args.job.display())))?;
            let order = json!({
                "agent": args.agent, "id": args.id, "share_weights": args.share_weights, "job": job,
            });
            online(&args.api, |c| async move {
                let placed = c.order_finetune(&order).await?;
                println!(
                    "ordered {} for agent {}: fine-tune {}",
                    placed.id, placed.agent, placed.order.job.model
                );
                Ok(())
            })
        }
        FinetuneCommand::List(api) => online(&api, |c| async move {
            print!("{}", render_jobs(&c.finetune_jobs().await?));
            Ok(())
        }),
        FinetuneCommand::Show(args) => online(&args.api, |c| async move {
            print!("{}", render_job(&c.finetune_job(&args.id).await?));
            Ok(())
        }),
    }
}

fn metrics(m: &Metrics) -> String {
    match m.accuracy {
        Some(a) => format!("accuracy {a:.4}, loss {:.6}", m.loss),
        None => format!("mean squared error {:.6}", m.loss),
    }
}

/// The table of `finetune list`.
pub fn render_jobs(jobs: &[JobRow]) -> String {
    let mut out =
        format!("{:<16} {:<24} {:<24} {:<10} {}\n", "JOB", "AGENT", "MODEL", "STATE", "UPDATED");
    for j in jobs {
        let _ = writeln!(
            out,
            "{:<16} {:<24} {:<24} {:<10} {}",
            printable(&j.id),
            printable(&j.agent),
            printable(&j.order.job.model),
            printable(&j.state),
            j.updated_at
        );
    }
    out
}

/// A job as `finetune show` prints it. The agent's words are escaped ([`printable`]):
/// they reach an operator's terminal.
pub fn render_job(job: &JobRow) -> String {
    let mut out = String::new();
    let order = &job.order;
    let _ = writeln!(
        out,
        "job {} for agent {}: {} ({})",
        printable(&job.id),
        printable(&job.agent),
        printable(&order.job.model),
        printable(&job.state)
    );
    let _ = writeln!(
        out,
        "  data {} (label {}), weights {}",
        printable(&order.job.data.file.display().to_string()),
        printable(&order.job.data.label),
        if order.share_weights { "may leave the site" } else { "stay on the site" }
    );
    let Some(report) = &job.report else { return out };
    if let Some(detail) = &report.detail {
        let _ = writeln!(out, "  {}", printable(detail));
    }
    if let Some(lineage) = &report.lineage {
        let _ = writeln!(
            out,
            "  {}: {} -> {}: {}",
            printable(&lineage.parent),
            metrics(&lineage.before),
            printable(report.derived.as_deref().unwrap_or("?")),
            metrics(&lineage.after)
        );
        let _ = writeln!(
            out,
            "  {} rows trained, {} held out, on the {}; epoch {} kept",
            lineage.train_rows,
            lineage.held_out_rows,
            printable(&lineage.engine),
            lineage.best_epoch
        );
        let _ = writeln!(out, "  {:>5}  {:>12}  {:>12}", "EPOCH", "TRAIN LOSS", "HELD-OUT");
        for e in &lineage.epochs {
            let _ = writeln!(
                out,
                "  {:>5}  {:>12.6}  {:>12.6}",
                e.epoch, e.train_loss, e.validation.loss
            );
        }
    }
    if let Some(w) = &report.weights {
        let _ = writeln!(out, "  head weights received: {} x {}", w.outputs, w.inputs);
    }
    out
}

#[cfg(test)]
// expect-test writes its snapshots as `r#"..."#` whether or not they need the hashes.
#[allow(clippy::needless_raw_string_hashes)]
mod tests {
    use super::*;

    // Snapshots: bless a deliberate change with
    // `UPDATE_EXPECT=1 cargo test -p falaj-control --lib finetune::cli` and review the diff.

    fn job(id: &str, state: &str, report: &serde_json::Value) -> JobRow {
        serde_json::from_value(json!({
            "id": id, "agent": "3f9a1c2e7b4d", "state": state, "report": report.clone(),
            "order": {"id": id, "share_weights": false,
                      "job": {"model": "pumps", "data": {"file": "/srv/site.csv", "label": "label"}}},
            "created_at": "2026-12-04T09:00:00Z", "updated_at": "2026-12-04T09:05:00Z",
        }))
        .unwrap()
    }

    #[test]
    fn jobs_table_and_a_failed_job() {
        let failed = job(
            "tune-7",
            "failed",
            &json!({"id": "tune-7", "state": "failed", "derived": null, "lineage": null,
                   "weights": null, "detail": "no column \"label\"\u{1b}[2J in /srv/site.csv"}),
        );
        let ordered = job("tune-8", "ordered", &serde_json::Value::Null);
        expect_test::expect![[r#"
            JOB              AGENT                    MODEL                    STATE      UPDATED
            tune-8           3f9a1c2e7b4d             pumps                    ordered    2026-12-04T09:05:00Z
            tune-7           3f9a1c2e7b4d             pumps                    failed     2026-12-04T09:05:00Z
        "#]].assert_eq(&render_jobs(&[ordered.clone(), failed.clone()]));
        expect_test::expect![[r#"
            job tune-7 for agent 3f9a1c2e7b4d: pumps (failed)
              data /srv/site.csv (label label), weights stay on the site
              no column "label"\u{1b}[2J in /srv/site.csv
        "#]]
        .assert_eq(&render_job(&failed));
        expect_test::expect![[r#"
            job tune-8 for agent 3f9a1c2e7b4d: pumps (ordered)
              data /srv/site.csv (label label), weights stay on the site
        "#]]
        .assert_eq(&render_job(&ordered));
    }
}
