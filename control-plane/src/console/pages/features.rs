//! The feature store: `/features` (every view with its counts, as
//! `GET /v1/features/views` lists them) and `/features/{name}` (schema with owners, PII
//! tags and policies, versions and revisions, ingest history, snapshots built), from the
//! same services as the JSON routes.

use axum::Extension;
use axum::extract::{Path, State};
use falaj_common::features::FeatureView;
use maud::{Markup, html};
use serde_json::Value;

use crate::admin::Api;
use crate::console::gate::Ctx;
use crate::console::layout::{PageResult, empty, page, time_text};
use crate::features::api::{view_detail, views};

/// `GET /features`.
pub(crate) async fn list(State(api): State<Api>, Extension(ctx): Extension<Ctx>) -> PageResult {
    let views = views(&api).await?;
    Ok(render_list(&ctx, &views))
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn render_list(ctx: &Ctx, views: &[Value]) -> Markup {
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
                    td { a href={ "/features/" (text(&v["name"])) } { (text(&v["name"])) } }
                    td { (text(&v["version"])) "." (text(&v["revision"])) }
                    td { (text(&v["entity"]["name"])) }
                    td.num { (text(&v["features"])) }
                    td.num { (text(&v["rows"])) }
                    td.num { (text(&v["entities"])) }
                    td { (time_text(v["applied_at"].as_str())) }
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
                td { (format!("{:?}", f.kind).to_lowercase()) }
                td { @if f.nullable { "yes" } @else { "no" } }
                td { (f.owner) }
                td { @if f.pii { strong { "personal data" } } @else { "no" } }
                td { (f.pii_policy.map_or_else(String::new, |p| format!("{p:?}").to_lowercase())) }
                td { (f.description) }
            } } }
        } }
    }
}

fn render_show(ctx: &Ctx, name: &str, d: &Value) -> Markup {
    let current: Option<FeatureView> = serde_json::from_value(d["current"]["view"].clone()).ok();
    let list = |key: &str| d[key].as_array().cloned().unwrap_or_default();
    let body = html! {
        dl.facts {
            dt { "Version" } dd { (text(&d["current"]["version"])) "." (text(&d["current"]["revision"])) }
            dt { "Rows" } dd { (text(&d["rows"])) }
            dt { "Entities" } dd { (text(&d["entities"])) }
        }
        @if let Some(view) = &current {
            p { (view.description) }
            p.muted { "Entity key " code { (view.entity.name) } "; event time in " code { (view.timestamp) } "." }
            h2 { "Schema" }
            (schema(view))
        }
        h2 { "Versions and revisions" }
        div.table { table {
            thead { tr { th { "Version" } th { "Applied" } th { "Changes" } } }
            tbody { @for h in list("history").iter().rev() { tr {
                td { (text(&h["version"])) "." (text(&h["revision"])) }
                td { (time_text(h["applied_at"].as_str())) }
                td { (h["changes"].as_array().map(|c| c.iter().map(text).collect::<Vec<_>>().join("; ")).unwrap_or_default()) }
            } } }
        } }
        h2 { "Ingests" }
        @if list("ingests").is_empty() {
            (empty("Nothing ingested yet.", &html! { code { "falaj-control features ingest " (name) " FILE.csv" } " adds rows (a file with a bad row is refused whole)." }))
        } @else {
            div.table { table {
                thead { tr { th { "#" } th { "Time" } th { "Source" } th { "Format" } th.num { "Rows" } } }
                tbody { @for i in list("ingests") { tr {
                    td { (text(&i["id"])) } td { (time_text(i["at"].as_str())) } td { (text(&i["source"])) }
                    td { (text(&i["format"])) } td.num { (text(&i["rows"])) }
                } } }
            } }
        }
        h2 { "Snapshots" }
        @if list("snapshots").is_empty() {
            (empty("No snapshot built.", &html! { code { "falaj-control features snapshot " (name) } " builds a signed bundle of the latest values for agents." }))
        } @else {
            div.table { table {
                thead { tr { th { "Bundle version" } th { "View version" } th { "Built" } th { "As of" } th { "Scope" } th.num { "Entities" } th { "Pseudonymised" } } }
                tbody { @for s in list("snapshots") { tr {
                    td { a href="/models" { (name) "@" (text(&s["version"])) } }
                    td { (text(&s["view_version"])) }
                    td { (time_text(s["built_at"].as_str())) }
                    td { (time_text(s["as_of"].as_str())) }
                    td { (text(&s["scope"])) }
                    td.num { (text(&s["entities"])) }
                    td { (s["pseudonymised"].as_array().map(|c| c.iter().map(text).collect::<Vec<_>>().join(", ")).unwrap_or_default()) }
                } } }
            } }
        }
    };
    page(ctx, &format!("Feature view {name}"), "/features", Some(30), &body)
}
