//! `falaj-control finetune ...`: order a fine-tune job for an agent from a job file (the
//! same TOML an air-gapped site's `falaj-agent finetune --job` takes), list jobs, show one
//! with its loss curve and the figures before and after.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use falaj_common::finetune::Job;
use serde_json::{Value, json};

use crate::cli::{ApiArgs, EXIT_USAGE, Failure, online};

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
                Failure::new(1, anyhow::anyhow!("reading {}: {e}", args.job.display()))
            })?;
            let job = Job::from_toml(&text).map_err(|e| {
                Failure::new(EXIT_USAGE, anyhow::anyhow!("{}: {e}", args.job.display()))
            })?;
            let order = json!({
                "agent": args.agent, "id": args.id, "share_weights": args.share_weights, "job": job,
            });
            online(&args.api, |c| async move {
                let placed = c.order_finetune(&order).await?;
                println!(
                    "ordered {} for agent {}: fine-tune {}",
                    placed["id"].as_str().unwrap_or("?"),
                    placed["agent"].as_str().unwrap_or("?"),
                    placed["order"]["job"]["model"].as_str().unwrap_or("?")
                );
                Ok(())
            })
        }
        FinetuneCommand::List(api) => online(&api, |c| async move {
            println!(
                "{:<16} {:<24} {:<24} {:<10} {:<20}",
                "JOB", "AGENT", "MODEL", "STATE", "UPDATED"
            );
            for j in c.finetune_jobs().await? {
                println!(
                    "{:<16} {:<24} {:<24} {:<10} {:<20}",
                    j["id"].as_str().unwrap_or("?"),
                    j["agent"].as_str().unwrap_or("?"),
                    j["order"]["job"]["model"].as_str().unwrap_or("?"),
                    j["state"].as_str().unwrap_or("?"),
                    j["updated_at"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }),
        FinetuneCommand::Show(args) => online(&args.api, |c| async move {
            print!("{}", render_job(&c.finetune_job(&args.id).await?));
            Ok(())
        }),
    }
}

fn metrics(m: &Value) -> String {
    match m["accuracy"].as_f64() {
        Some(a) => format!("accuracy {a:.4}, loss {:.6}", m["loss"].as_f64().unwrap_or(f64::NAN)),
        None => format!("mean squared error {:.6}", m["loss"].as_f64().unwrap_or(f64::NAN)),
    }
}

/// A job as `finetune show` prints it.
pub fn render_job(job: &Value) -> String {
    let mut out = String::new();
    let order = &job["order"];
    let _ = writeln!(
        out,
        "job {} for agent {}: {} ({})",
        job["id"].as_str().unwrap_or("?"),
        job["agent"].as_str().unwrap_or("?"),
        order["job"]["model"].as_str().unwrap_or("?"),
        job["state"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        out,
        "  data {} (label {}), weights {}",
        order["job"]["data"]["file"].as_str().unwrap_or("?"),
        order["job"]["data"]["label"].as_str().unwrap_or("?"),
        if order["share_weights"].as_bool() == Some(true) {
            "may leave the site"
        } else {
            "stay on the site"
        }
    );
    let report = &job["report"];
    if let Some(detail) = report["detail"].as_str() {
        // The agent's words, escaped: they reach an operator's terminal.
        let _ = writeln!(out, "  {}", falaj_common::text::printable(detail));
    }
    let lineage = &report["lineage"];
    if lineage.is_object() {
        let _ = writeln!(
            out,
            "  {}: {} -> {}: {}",
            lineage["parent"].as_str().unwrap_or("?"),
            metrics(&lineage["before"]),
            report["derived"].as_str().unwrap_or("?"),
            metrics(&lineage["after"])
        );
        let _ = writeln!(
            out,
            "  {} rows trained, {} held out, on the {}; epoch {} kept",
            lineage["train_rows"],
            lineage["held_out_rows"],
            lineage["engine"].as_str().unwrap_or("?"),
            lineage["best_epoch"]
        );
        let _ = writeln!(out, "  {:>5}  {:>12}  {:>12}", "EPOCH", "TRAIN LOSS", "HELD-OUT");
        for e in lineage["epochs"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {:>5}  {:>12.6}  {:>12.6}",
                e["epoch"],
                e["train_loss"].as_f64().unwrap_or(f64::NAN),
                e["validation"]["loss"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    if let Some(w) = report["weights"].as_object() {
        let _ = writeln!(out, "  head weights received: {} x {}", w["outputs"], w["inputs"]);
    }
    out
}
