//! Fine-tune jobs: `/finetune` (every job, as `GET /v1/finetune` lists them) and
//! `/finetune/{id}` (the order, the data's hash, the hyperparameters, the loss curve as a
//! chart, the held-out figures before and after, and the gate's decision), reported by
//! the agent that trained (figures only; the data never leaves the site).

use axum::Extension;
use axum::extract::{Path, State};
use falaj_common::finetune::Lineage;
use maud::{Markup, html};

use crate::admin::{Api, ApiError};
use crate::auth::Permission as P;
use crate::console::charts::{self, Series};
use crate::console::gate::Ctx;
use crate::console::layout::{self, PageResult, badge, empty, num, page, time};
use crate::finetune::JobRow;

/// `GET /finetune`.
pub(crate) async fn list(State(api): State<Api>, Extension(ctx): Extension<Ctx>) -> PageResult {
    let jobs = api.shared.db.run(|sql| crate::finetune::list(&sql)).await?;
    let body = html! {
        @if jobs.is_empty() {
            (empty("No fine-tune job has been ordered.", &html! {
                @if ctx.may(P::OrderFinetune) {
                    "Order one for an agent with " code { "falaj-control finetune order --agent ID JOB.toml" } "; it trains on the site's own data."
                } @else { "An operator orders jobs; agents train on their own site's data." }
            }))
        } @else {
            div.table { table {
                thead { tr { th { "Job" } th { "Agent" } th { "Model" } th { "State" } th { "Derived model" } th { "Gate" } th { "Ordered" } } }
                tbody { @for j in &jobs { tr {
                    td { a href={ "/finetune/" (j.id) } { (j.id) } }
                    td { a href={ "/fleet/" (j.agent) } { code { (j.agent) } } }
                    td { (j.order.job.model) }
                    td { (badge(&j.state)) }
                    td { (j.report.as_ref().and_then(|r| r.derived.clone()).unwrap_or_default()) }
                    td { @match j.report.as_ref().and_then(|r| r.lineage.as_ref()) {
                        Some(l) => (badge(if l.gate.activate { "activated" } else { "kept parent" })),
                        None => span.muted { "–" },
                    } }
                    td { (time(j.created_at)) }
                } } }
            } }
        }
    };
    Ok(page(&ctx, "Fine-tune jobs", "/finetune", Some(15), &body))
}

/// `GET /finetune/{id}`.
pub(crate) async fn show(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<String>,
) -> PageResult {
    let wanted = id.clone();
    let Some(job) = api.shared.db.run(move |sql| crate::finetune::get(&sql, &wanted)).await? else {
        return Err(ApiError::not_found(format!("no fine-tune job {id:?}")).into());
    };
    Ok(render_show(&ctx, &job))
}

fn lineage(l: &Lineage) -> Markup {
    let curve = vec![
        Series {
            name: "training loss".into(),
            points: l.epochs.iter().map(|e| (f64::from(e.epoch), e.train_loss)).collect(),
        },
        Series {
            name: "held-out loss".into(),
            points: l.epochs.iter().map(|e| (f64::from(e.epoch), e.validation.loss)).collect(),
        },
    ];
    let h = &l.hyperparameters;
    html! {
        h2 { "Lineage" }
        dl.facts {
            dt { "Parent" } dd { (l.parent) "@" (l.parent_version) " " code { (l.parent_manifest_sha256) } }
            dt { "Training data (SHA-256)" } dd { code { (l.data_sha256) } }
            dt { "Rows" } dd { (l.train_rows) " trained, " (l.held_out_rows) " held out" }
            dt { "Engine" } dd { (l.engine) }
            dt { "Hyperparameters" } dd { (format!("{:?}", h.optimizer).to_lowercase()) ", learning rate " (h.learning_rate)
                ", batch " (h.batch_size) ", at most " (h.max_epochs) " epochs, patience " (h.patience) ", L2 " (h.l2) ", seed " (h.seed) }
            dt { "Held-out before" } dd { "loss " (num(Some(l.before.loss), 5)) ", accuracy " (num(l.before.accuracy, 4)) }
            dt { "Held-out after" } dd { "loss " (num(Some(l.after.loss), 5)) ", accuracy " (num(l.after.accuracy, 4)) " (epoch " (l.best_epoch) " kept)" }
            dt { "Gate" } dd { (badge(if l.gate.activate { "activated" } else { "kept parent" })) " " (l.gate.reason) }
        }
        div.charts {
            figure {
                @match charts::curve("Loss per epoch", &curve) {
                    Ok(svg) => (layout::svg(svg)),
                    Err(e) => p.muted { (e) },
                }
                figcaption { "Loss per epoch (x: epoch)" }
            }
        }
    }
}

fn render_show(ctx: &Ctx, j: &JobRow) -> Markup {
    let body = html! {
        dl.facts {
            dt { "State" } dd { (badge(&j.state)) }
            dt { "Agent" } dd { a href={ "/fleet/" (j.agent) } { code { (j.agent) } } }
            dt { "Model" } dd { (j.order.job.model) (j.order.job.version.map_or_else(String::new, |v| format!("@{v}"))) }
            dt { "Data on the agent" } dd { code { (j.order.job.data.file.display()) } ", label " code { (j.order.job.data.label) } }
            dt { "Weights may leave the site" } dd { @if j.order.share_weights { "yes" } @else { "no" } }
            dt { "Ordered" } dd { (time(j.created_at)) }
            dt { "Last change" } dd { (time(j.updated_at)) }
        }
        @match &j.report {
            None => (empty("The agent has not reported on this job yet.", &html! { "It picks the job up with its next desired-state document." })),
            Some(r) => {
                @if let Some(d) = &r.detail { p { (d) } }
                @if let Some(l) = &r.lineage { (lineage(l)) }
            }
        }
    };
    page(ctx, &format!("Fine-tune job {}", j.id), "/finetune", Some(15), &body)
}
