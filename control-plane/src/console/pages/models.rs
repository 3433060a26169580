//! `/models`: every registered bundle by model (as `GET /v1/bundles` lists them), the
//! groups each version is deployed to, its reference profile's summary (what drift is
//! measured against), and what its signed manifest says (built, expires, runtime hint,
//! the keys that signed it), read back from the stored chunks; and the lineage of the
//! models agents derived by fine-tuning (as their job reports give it: parent@version →
//! derived model, the training data's hash, held-out figures before and after, the gate).

use std::collections::BTreeMap;

use axum::Extension;
use axum::extract::State;
use falaj_common::bundle::{Content, HEADER_LEN, Header, Manifest};
use falaj_common::chunking::Recipe;
use falaj_common::keys::Sha256;
use falaj_common::profile::DataProfile;
use falaj_common::time::Timestamp;
use maud::{Markup, html};

use crate::admin::Api;
use crate::auth::Permission as P;
use crate::console::gate::Ctx;
use crate::console::layout::{PageResult, badge, empty, num, page, size, time};
use crate::db::{self, BundleRow};
use crate::finetune::JobRow;
use crate::monitoring;
use crate::sql::SqlError;

/// One version as the page shows it.
#[derive(Debug, Clone)]
pub struct ModelVersion {
    pub bundle: BundleRow,
    /// Groups it is deployed to.
    pub groups: Vec<String>,
    /// Its reference profile.
    pub reference: Option<DataProfile>,
    /// What its manifest says, when its first chunks can be read back.
    pub manifest: Option<ManifestFacts>,
}

/// What a bundle's signed manifest says, for the page.
#[derive(Debug, Clone)]
pub struct ManifestFacts {
    /// When it was built.
    pub created: Timestamp,
    /// When agents stop accepting it.
    pub expires: Timestamp,
    /// `model, runtime cpu` or `feature snapshot`.
    pub kind: String,
    /// The ids of the keys that signed it (their first 12 digits).
    pub signed_by: Vec<String>,
}

/// Reads the header, manifest and signatures of the bundle `recipe` describes back from
/// the blob store (the bundle was verified when pushed: this only reads what it says).
fn manifest_facts(blobs: &dyn crate::blobs::BlobStore, recipe: Sha256) -> Option<ManifestFacts> {
    let recipe = Recipe::decode(&blobs.get(&recipe).ok()??, recipe).ok()?;
    let mut bytes = Vec::new();
    let mut needed = HEADER_LEN;
    for chunk in &recipe.chunks {
        if bytes.len() >= needed {
            break;
        }
        bytes.extend_from_slice(&blobs.get(&chunk.sha256).ok()??);
        if let Ok(h) = Header::parse(&bytes) {
            needed = HEADER_LEN + h.manifest_len as usize + h.signatures_len as usize;
        }
    }
    let header = Header::parse(&bytes).ok()?;
    let manifest_end = HEADER_LEN + header.manifest_len as usize;
    let manifest: Manifest = serde_json::from_slice(bytes.get(HEADER_LEN..manifest_end)?).ok()?;
    let signatures: Vec<serde_json::Value> =
        serde_json::from_slice(bytes.get(manifest_end..needed)?).ok()?;
    let kind = match &manifest.content {
        Content::Model(m) => format!("model, runtime {:?}", m.runtime).to_lowercase(),
        Content::Features(_) => "feature snapshot".into(),
    };
    let key = |s: &serde_json::Value| s["keyid"].as_str().map(|k| k.chars().take(12).collect());
    Some(ManifestFacts {
        created: manifest.created,
        expires: manifest.expires,
        kind,
        signed_by: signatures.iter().filter_map(key).collect(),
    })
}

/// `GET /models`.
pub(crate) async fn list(State(api): State<Api>, Extension(ctx): Extension<Ctx>) -> PageResult {
    let (mut versions, jobs) = api
        .shared
        .db
        .run(|sql| {
            let deployments = db::all_deployments(&sql)?;
            let jobs = crate::finetune::list(&sql)?;
            let versions = db::bundles(&sql)?
                .into_iter()
                .map(|bundle| {
                    let groups = deployments
                        .iter()
                        .filter(|(_, n, v)| *n == bundle.name && *v == bundle.version)
                        .map(|(g, _, _)| g.clone())
                        .collect();
                    let reference = monitoring::reference(&sql, &bundle.name, bundle.version)?;
                    Ok(ModelVersion { bundle, groups, reference, manifest: None })
                })
                .collect::<Result<Vec<_>, SqlError>>()?;
            Ok((versions, jobs))
        })
        .await?;
    let shared = std::sync::Arc::clone(&api.shared);
    versions = tokio::task::spawn_blocking(move || {
        for v in &mut versions {
            v.manifest = manifest_facts(shared.blobs.as_ref(), v.bundle.recipe_sha256);
        }
        versions
    })
    .await
    .map_err(crate::admin::ApiError::internal)?;
    let now = Timestamp::from_system(std::time::SystemTime::now());
    Ok(render(&ctx, &versions, &derived(&jobs), now))
}

/// The jobs whose report carries a lineage, newest first.
fn derived(jobs: &[JobRow]) -> Vec<&JobRow> {
    let mut found: Vec<&JobRow> =
        jobs.iter().filter(|j| j.report.as_ref().is_some_and(|r| r.lineage.is_some())).collect();
    found.sort_by_key(|j| std::cmp::Reverse(j.updated_at));
    found
}

/// The lineage table: one row per derived model an agent reported.
fn render_lineage(ctx: &Ctx, derived: &[&JobRow]) -> Markup {
    html! {
        h2 #lineage { "Derived models (fine-tune lineage)" }
        @if derived.is_empty() {
            (empty("No agent has reported a derived model.", &html! {
                @if ctx.may(P::OrderFinetune) {
                    "Order a fine-tune job with " code { "falaj-control finetune order --agent ID JOB.toml" }
                    "; the agent trains on its own data and reports the lineage here."
                } @else { "An operator orders fine-tune jobs; the agents report what they derive." }
            }))
        } @else {
            div.table { table {
                thead { tr {
                    th { "Parent" } th { "Derived model" } th { "Agent" } th { "Training data (SHA-256)" }
                    th.num { "Rows trained / held out" } th { "Held-out before → after" } th { "Gate" } th { "Job" } th { "Reported" }
                } }
                tbody { @for j in derived {
                    @if let Some((r, l)) = j.report.as_ref().and_then(|r| Some((r, r.lineage.as_ref()?))) { tr {
                        td { (l.parent) "@" (l.parent_version) }
                        td { @match &r.derived { Some(d) => code { (d) }, None => span.muted { "not installed" } } }
                        td { a href={ "/fleet/" (j.agent) } { code { (j.agent) } } }
                        td { code title=(l.data_sha256) { (l.data_sha256.to_string().get(..16).unwrap_or_default()) "…" } }
                        td.num { (l.train_rows) " / " (l.held_out_rows) }
                        td { @match (l.before.accuracy, l.after.accuracy) {
                            (Some(b), Some(a)) => { "accuracy " (num(Some(b), 4)) " → " (num(Some(a), 4)) },
                            _ => { "loss " (num(Some(l.before.loss), 5)) " → " (num(Some(l.after.loss), 5)) },
                        } }
                        td title=(l.gate.reason) { (badge(if l.gate.activate { "activated" } else { "kept parent" })) }
                        td { a href={ "/finetune/" (j.id) } { (j.id) } }
                        td { (time(j.updated_at)) }
                    } }
                } }
            } }
        }
    }
}

fn render(ctx: &Ctx, versions: &[ModelVersion], derived: &[&JobRow], now: Timestamp) -> Markup {
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
                    th { "Version" } th.num { "Size" } th { "Kind" } th { "Built" } th { "Expires" }
                    th { "Signed by (key ids)" } th { "Manifest SHA-256" } th { "Pushed" }
                    th { "Deployed to" } th { "Reference profile" }
                } }
                tbody { @for v in versions.iter().rev() { tr {
                    td { (v.bundle.version) }
                    td.num { (size(v.bundle.size)) }
                    @match &v.manifest {
                        Some(m) => {
                            td { (m.kind) }
                            td { (time(m.created)) }
                            td { (time(m.expires)) @if m.expires <= now { " " (badge("expired")) } }
                            td { code { (m.signed_by.join(", ")) } }
                        }
                        None => { td colspan="4" { span.muted { "manifest not readable from the store" } } }
                    }
                    td { code title=(v.bundle.manifest_sha256) { (v.bundle.manifest_sha256.to_string().get(..16).unwrap_or_default()) "…" } }
                    td { (time(v.bundle.pushed_at)) }
                    td { @if v.groups.is_empty() { span.muted { "no group" } } @else { (v.groups.join(", ")) } }
                    td { @match &v.reference {
                        Some(p) => { (p.rows) " rows; " (p.inputs.len()) " inputs, " (p.outputs.len()) " outputs" }
                        None => span.muted { "none (no drift scores)" },
                    } }
                } } }
            } }
        }
        (render_lineage(ctx, derived))
        p.hint { "Every bundle here passed verification when pushed: its manifest signed by the trust root's signing keys, every file matching its hash, its region and expiry checked." }
    };
    page(ctx, "Models", "/models", Some(30), &body)
}
