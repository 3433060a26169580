//! `/models`: every registered bundle by model (as `GET /v1/bundles` lists them), the
//! groups each version is deployed to, and its reference profile's summary (what drift
//! is measured against).

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::State;
use falaj_common::profile::DataProfile;
use maud::{Markup, html};

use crate::admin::Api;
use crate::auth::Permission as P;
use crate::console::gate::Ctx;
use crate::console::layout::{PageResult, empty, page, size, time};
use crate::db::{self, BundleRow};
use crate::monitoring;

/// One version as the page shows it.
#[derive(Debug, Clone)]
pub struct ModelVersion {
    /// The bundle.
    pub bundle: BundleRow,
    /// Groups it is deployed to.
    pub groups: Vec<String>,
    /// Its reference profile.
    pub reference: Option<DataProfile>,
}

/// `GET /models`.
pub(crate) async fn list(State(api): State<Api>, Extension(ctx): Extension<Ctx>) -> PageResult {
    let versions = api
        .shared
        .db
        .call(|c| {
            let deployments = db::all_deployments(c)?;
            db::bundles(c)?
                .into_iter()
                .map(|bundle| {
                    let groups = deployments
                        .iter()
                        .filter(|(_, n, v)| *n == bundle.name && *v == bundle.version)
                        .map(|(g, _, _)| g.clone())
                        .collect();
                    let reference = monitoring::reference(c, &bundle.name, bundle.version)?;
                    Ok(ModelVersion { bundle, groups, reference })
                })
                .collect::<rusqlite::Result<Vec<_>>>()
        })
        .await?;
    Ok(render(&ctx, &versions))
}

fn render(ctx: &Ctx, versions: &[ModelVersion]) -> Markup {
    let mut by_model: BTreeMap<&str, Vec<&ModelVersion>> = BTreeMap::new();
    for v in versions {
        by_model.entry(v.bundle.name.as_str()).or_default().push(v);
    }
    let body = html! {
        @if by_model.is_empty() {
            (empty("No bundle is registered.", &html! {
                @if ctx.may(P::ManageBundles) {
                    "Build and sign one with " code { "falaj-control bundle build" } ", then push it with "
                    code { "falaj-control push FILE" } "."
                } @else {
                    "An operator pushes signed bundles with " code { "falaj-control push" } "."
                }
            }))
        }
        @for (model, versions) in &by_model {
            h2 { (model) }
            p { a href={ "/monitoring?model=" (model) } { "Metrics" } " · " a href={ "/rollouts?model=" (model) } { "Rollouts" } }
            div.table { table {
                thead { tr {
                    th { "Version" } th.num { "Size" } th.num { "Chunks" } th { "Signed manifest (SHA-256)" }
                    th { "Pushed" } th { "Deployed to" } th { "Reference profile" }
                } }
                tbody { @for v in versions.iter().rev() { tr {
                    td { (v.bundle.version) }
                    td.num { (size(v.bundle.size)) }
                    td.num { (v.bundle.chunks) }
                    td { code title="verified against the trust root's signing keys when pushed" { (v.bundle.manifest_sha256) } }
                    td { (time(v.bundle.pushed_at)) }
                    td { @if v.groups.is_empty() { span.muted { "no group" } } @else { (v.groups.join(", ")) } }
                    td { @match &v.reference {
                        Some(p) => { (p.rows) " rows; " (p.inputs.len()) " inputs, " (p.outputs.len()) " outputs" }
                        None => span.muted { "none (no drift scores)" },
                    } }
                } } }
            } }
        }
        p.hint { "Every bundle here passed verification when pushed: its manifest signed by the trust root's signing keys, every file matching its hash, its region and expiry checked." }
    };
    page(ctx, "Models", "/models", None, &body)
}
