//! The feature store: `/features` (every view with its counts, as
//! `GET /v1/features/views` lists them) and `/features/{name}` (schema with owners, PII
//! tags and policies, versions and revisions, ingest history, snapshots built), from the
//! same services as the JSON routes.

use axum::Extension;
use axum::extract::{Path, State};
use falaj_common::features::FeatureView;
use maud::{Markup, html};

use crate::admin::Api;
use crate::console::gate::Ctx;
use crate::console::layout::{PageResult, empty, page, time};
use crate::features::api::{ViewDetail, ViewSummary, view_detail, views};

/// `GET /features`.
pub(crate) async fn list(State(api): State<Api>, Extension(ctx): Extension<Ctx>) -> PageResult {
    let views = views(&api).await?;
    Ok(render_list(&ctx, &views))
}

fn render_list(ctx: &Ctx, views: &[ViewSummary]) -> Markup {
    let body = html! {
        @if views.is_empty() {
            (empty("No feature view is declared.", &html! {
                "Declare one in TOML and apply it with " code { "falaj-control features apply VIEW.toml" }
                ", then ingest files with " code { "falaj-control features ingest" } "."
            }))
        } @else {
            div.table { table {
                thead { tr { th { "View" } th { "Version" } th { "Entity" } th.num { "Features" } th.num { "Rows" } th.num { "Entities" } th { "Applied" } } }
                tbody { @for v in views { tr {
                    td { a href={ "/features/" (v.name) } { (v.name) } }
                    td { (v.version) "." (v.revision) }
                    td { (v.entity.name) }
                    td.num { (v.features) }
                    td.num { (v.rows) }
                    td.num { (v.entities) }
                    td { (time(v.applied_at)) }
                } } }
            } }
        }
    };
    page(ctx, "Feature store", "/features", Some(30), &body)
}

/// `GET /features/{name}`.
pub(crate) async fn show(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    Path(name): Path<String>,
) -> PageResult {
    let detail = view_detail(&api, name.clone()).await?;
    Ok(render_show(&ctx, &name, &detail))
}

fn schema(view: &FeatureView) -> Markup {
    html! {
        div.table { table {
            thead { tr { th { "Feature" } th { "Type" } th { "Nullable" } th { "Owner" } th { "PII" } th { "Policy" } th { "Description" } } }
            tbody { @for f in &view.features { tr {
                td { code { (f.name) } }
                td { (f.kind) }
                td { @if f.nullable { "yes" } @else { "no" } }
                td { (f.owner) }
                td { @if f.pii { strong { "personal data" } } @else { "no" } }
                td { (f.pii_policy.map_or_else(String::new, |p| p.to_string())) }
                td { (f.description) }
            } } }
        } }
    }
}

fn render_show(ctx: &Ctx, name: &str, d: &ViewDetail) -> Markup {
    let view = &d.current.view;
    let body = html! {
        dl.facts {
            dt { "Version" } dd { (d.current.version) "." (d.current.revision) }
            dt { "Rows" } dd { (d.rows) }
            dt { "Entities" } dd { (d.entities) }
        }
        p { (view.description) }
        p.muted { "Entity key " code { (view.entity.name) } "; event time in " code { (view.timestamp) } "." }
        h2 { "Schema" }
        (schema(view))
        h2 { "Versions and revisions" }
        div.table { table {
            thead { tr { th { "Version" } th { "Applied" } th { "Changes" } } }
            tbody { @for h in d.history.iter().rev() { tr {
                td { (h.version) "." (h.revision) }
                td { (time(h.applied_at)) }
                td { (h.changes.join("; ")) }
            } } }
        } }
        h2 { "Ingests" }
        @if d.ingests.is_empty() {
            (empty("Nothing ingested yet.", &html! { code { "falaj-control features ingest " (name) " FILE.csv" } " adds rows (a file with a bad row is refused whole)." }))
        } @else {
            div.table { table {
                thead { tr { th { "#" } th { "Time" } th { "Source" } th { "Format" } th.num { "Rows" } } }
                tbody { @for i in &d.ingests { tr {
                    td { (i.id) } td { (time(i.at)) } td { (i.source) }
                    td { (i.format) } td.num { (i.rows) }
                } } }
            } }
        }
        h2 { "Snapshots" }
        @if d.snapshots.is_empty() {
            (empty("No snapshot built.", &html! { code { "falaj-control features snapshot " (name) } " builds a signed bundle of the latest values for agents." }))
        } @else {
            div.table { table {
                thead { tr { th { "Bundle version" } th { "View version" } th { "Built" } th { "As of" } th { "Scope" } th.num { "Entities" } th { "Pseudonymised" } } }
                tbody { @for s in &d.snapshots { tr {
                    td { a href="/models" { (name) "@" (s.version) } }
                    td { (s.view_version) }
                    td { (time(s.built_at)) }
                    td { (time(s.as_of)) }
                    td { (s.scope) }
                    td.num { (s.entities) }
                    td { (s.pseudonymised.join(", ")) }
                } } }
            } }
        }
    };
    page(ctx, &format!("Feature view {name}"), "/features", Some(30), &body)
}
