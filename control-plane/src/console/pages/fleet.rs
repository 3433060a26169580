//! The overview (`/`), the fleet (`/fleet?group=&status=`) and one agent
//! (`/fleet/{id}`): the agents as `GET /v1/agents` shows them (the same
//! `service::fleet::agent_views`), with their recent metrics and, for those who may read
//! it, their audit trail.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use axum::Extension;
use axum::extract::{Path, Query, State};
use falaj_common::metrics::VersionSummary;
use falaj_common::time::Timestamp;
use maud::{Markup, html};
use serde::Deserialize;

use super::given;
use crate::admin::{AgentView, Api, ApiError};
use crate::auth::Permission as P;
use crate::console::gate::Ctx;
use crate::console::layout::{self, PageResult, badge, empty, page, time_text};
use crate::db;
use crate::monitoring::{self, MetricsQuery};
use crate::service::fleet::agent_views;

/// The statuses an agent can have, in the order filters offer them.
const STATUSES: [&str; 3] = ["connected", "offline", "revoked"];

/// What the overview counts.
#[derive(Debug, Clone, Default)]
pub struct Overview {
    /// Agents by status, in the order connected, offline, revoked.
    pub agents: [usize; 3],
    /// Agents reporting errors.
    pub with_errors: usize,
    /// Bundles registered.
    pub bundles: usize,
    /// Rollouts under way.
    pub rollouts: usize,
    /// Alerts firing.
    pub alerts: usize,
    /// Feature views.
    pub views: usize,
}

/// `GET /`.
pub(crate) async fn overview(State(api): State<Api>, Extension(ctx): Extension<Ctx>) -> PageResult {
    let agents = agent_views(&api.shared).await?;
    let features = api.features.clone();
    let views = features.db.run(|sql| crate::features::store::list(&sql)).await?.len();
    let (bundles, rollouts, alerts) = api
        .shared
        .db
        .run(|sql| {
            Ok((
                db::bundles(&sql)?.len(),
                crate::rollouts::all_under_way(&sql, None)?.len(),
                crate::alerts::firing(&sql)?.len(),
            ))
        })
        .await?;
    let mut o = Overview { bundles, rollouts, alerts, views, ..Overview::default() };
    for a in &agents {
        if let Some(i) = STATUSES.iter().position(|s| *s == a.status) {
            o.agents[i] += 1;
        }
        o.with_errors += usize::from(!a.errors.is_empty());
    }
    Ok(render_overview(&ctx, &o, &api.shared.region))
}

/// The overview page.
pub fn render_overview(ctx: &Ctx, o: &Overview, region: &str) -> Markup {
    let card = |href: &str, label: &str, value: usize| {
        html! { div.card { a href=(href) { div.value { (value) } div { (label) } } } }
    };
    let body = html! {
        p.muted { "Region " strong { (region) } ". Counts refresh every 15 seconds." }
        div.cards {
            (card("/fleet?status=connected", "agents connected", o.agents[0]))
            (card("/fleet?status=offline", "agents offline", o.agents[1]))
            (card("/fleet?status=revoked", "agents revoked", o.agents[2]))
            (card("/fleet", "agents reporting errors", o.with_errors))
            (card("/models", "bundles", o.bundles))
            (card("/rollouts", "rollouts under way", o.rollouts))
            (card("/alerts", "alerts firing", o.alerts))
            (card("/features", "feature views", o.views))
        }
        @if o.agents.iter().sum::<usize>() == 0 {
            (empty("No agent has enrolled yet.", &html! {
                @if ctx.may(P::CreateEnrollmentTokens) {
                    a href="/tokens" { "Create an enrollment token" } " and run the "
                    code { "falaj-agent enroll" } " line it gives on the agent's host."
                } @else {
                    "An operator creates an enrollment token and enrolls agents with it."
                }
            }))
        }
    };
    page(ctx, "Overview", "/", Some(15), &body)
}

/// The fleet's filters (query string).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct FleetFilter {
    /// Only this group.
    pub group: Option<String>,
    /// Only this status (`connected`, `offline`, `revoked`).
    pub status: Option<String>,
}

/// `GET /fleet`.
pub(crate) async fn list(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    Query(filter): Query<FleetFilter>,
) -> PageResult {
    if let Some(status) = given(filter.status.as_ref())
        && !STATUSES.contains(&status)
    {
        return Err(ApiError::bad_request(format!(
            "status {status:?}: choose connected, offline or revoked"
        ))
        .into());
    }
    let agents = agent_views(&api.shared).await?;
    Ok(render_list(&ctx, &agents, &filter))
}

/// The fleet page: `agents` filtered by `filter`.
pub fn render_list(ctx: &Ctx, agents: &[AgentView], filter: &FleetFilter) -> Markup {
    let groups: BTreeSet<&str> = agents.iter().map(|a| a.group.as_str()).collect();
    let (group, status) = (given(filter.group.as_ref()), given(filter.status.as_ref()));
    let shown: Vec<&AgentView> = agents
        .iter()
        .filter(|a| group.is_none_or(|g| a.group == g) && status.is_none_or(|s| a.status == s))
        .collect();
    let body = html! {
        form.filters method="get" action="/fleet" {
            div {
                label for="group" { "Group" }
                select #group name="group" {
                    option value="" { "all groups" }
                    @for g in &groups {
                        option value=(g) selected[group == Some(*g)] { (g) }
                    }
                }
            }
            div {
                label for="status" { "Status" }
                select #status name="status" {
                    option value="" { "any status" }
                    @for s in STATUSES {
                        option value=(s) selected[status == Some(s)] { (s) }
                    }
                }
            }
            button type="submit" { "Filter" }
        }
        p.muted { (shown.len()) " of " (agents.len()) " agents" }
        @if shown.is_empty() {
            @if agents.is_empty() {
                (empty("No agent has enrolled yet.", &html! {
                    @if ctx.may(P::CreateEnrollmentTokens) {
                        a href="/tokens" { "Create an enrollment token" } " for a group, then run its "
                        code { "falaj-agent enroll" } " line on the agent's host."
                    } @else {
                        "An operator enrolls agents with a one-time token."
                    }
                }))
            } @else {
                (empty("No agent matches these filters.", &html! { a href="/fleet" { "Show every agent" } }))
            }
        } @else {
            div.table {
                table {
                    thead { tr {
                        th { "Agent" } th { "Host" } th { "Group" } th { "Region" } th { "Status" }
                        th { "Active" } th { "Held" } th { "Engines" } th { "Agent version" } th { "Last contact" } th { "Errors" }
                    } }
                    tbody {
                        @for a in &shown {
                            tr {
                                td { a href={ "/fleet/" (a.id) } { code { (a.id) } } }
                                td { (a.hostname) }
                                td { a href={ "/fleet?group=" (a.group) } { (a.group) } }
                                td { (a.region) }
                                td { (badge(&a.status)) @if !a.ready && a.status == "connected" { " " span.muted { "loading" } } }
                                td { (a.active.join(", ")) }
                                td { (a.held.join(", ")) }
                                td { (engines(a)) }
                                td { (a.agent_version) }
                                td { (time_text(a.last_seen.as_deref())) }
                                td { @if a.errors.is_empty() { span.muted { "none" } } @else { (a.errors.len()) } }
                            }
                        }
                    }
                }
            }
        }
    };
    page(ctx, "Fleet", "/fleet", Some(15), &body)
}

/// The engines an agent reported (`cpu`, `gpu`: the kind before the engine's name),
/// each with its device on hover; a dash before its first report.
fn engines(a: &AgentView) -> Markup {
    html! {
        @if a.engines.is_empty() { span.muted { "–" } }
        @for (i, e) in a.engines.iter().enumerate() {
            @if i > 0 { ", " }
            span title=(e.device) { (engine_kind(&e.name)) }
        }
    }
}

/// `cpu` for `tract-cpu`, `gpu` for `wgpu-gpu`: the part after the last `-`, or the name.
fn engine_kind(name: &str) -> &str {
    name.rsplit_once('-').map_or(name, |(_, kind)| kind)
}

/// `GET /fleet/{id}`.
pub(crate) async fn agent(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    Path(id): Path<String>,
) -> PageResult {
    let Some(view) = agent_views(&api.shared).await?.into_iter().find(|a| a.id == id) else {
        return Err(ApiError::not_found(format!("no agent {id:?}")).into());
    };
    let since = Timestamp::from_system(SystemTime::now() - Duration::from_secs(3600));
    let models: BTreeSet<String> = view
        .active
        .iter()
        .chain(&view.held)
        .filter_map(|b| b.split_once('@').map(|(n, _)| n.to_owned()))
        .collect();
    let (agent, audit_allowed) = (id.clone(), ctx.may(P::ReadAudit));
    let (metrics, trail) = api
        .shared
        .db
        .run(move |sql| {
            let mut metrics = Vec::new();
            for model in models {
                let q = MetricsQuery {
                    model: model.clone(),
                    version: None,
                    group: None,
                    agent: Some(agent.clone()),
                    since,
                };
                metrics.push((model, monitoring::summaries(&sql, &q)?));
            }
            let trail = if audit_allowed {
                let q = crate::audit::AuditQuery {
                    actor: Some(format!("agent:{agent}")),
                    limit: Some(20),
                    ..Default::default()
                };
                crate::audit::list(&sql, &q)?
            } else {
                Vec::new()
            };
            Ok((metrics, trail))
        })
        .await?;
    Ok(render_agent(&ctx, &view, &metrics, &trail))
}

fn render_agent(
    ctx: &Ctx,
    a: &AgentView,
    metrics: &[(String, Vec<VersionSummary>)],
    trail: &[falaj_common::audit::Entry],
) -> Markup {
    let body = html! {
        dl.facts {
            dt { "Status" } dd { (badge(&a.status)) }
            dt { "Host" } dd { (a.hostname) }
            dt { "Group" } dd { a href={ "/fleet?group=" (a.group) } { (a.group) } }
            dt { "Region" } dd { (a.region) }
            dt { "Agent version" } dd { (a.agent_version) }
            dt { "Document applied" } dd { (a.applied_version.map_or_else(|| "none yet".into(), |v| format!("version {v}"))) }
            dt { "Serving" } dd { @if a.ready { "every active model loaded" } @else { "not all active models loaded" } }
            dt { "Last contact" } dd { (time_text(a.last_seen.as_deref())) }
            dt { "Active" } dd { (a.active.join(", ")) }
            dt { "Held" } dd { (a.held.join(", ")) }
            dt { "Engines" } dd { (engines(a)) }
        }
        @if !a.engines.is_empty() {
            h2 { "Engines" }
            div.table { table {
                thead { tr { th { "Engine" } th { "Device" } th { "Serving" } } }
                tbody { @for e in &a.engines { tr {
                    td { code { (e.name) } }
                    td { (e.device) }
                    td { @let on: Vec<&str> = a.serving.iter().filter(|(_, n)| **n == e.name).map(|(b, _)| b.as_str()).collect();
                        @if on.is_empty() { span.muted { "nothing" } } @else { (on.join(", ")) } }
                } } }
            } }
        }
        h2 { "Errors" }
        @if a.errors.is_empty() { p.muted { "None reported." } }
        @else { ul { @for e in &a.errors { li { code { (e) } } } } }
        h2 { "Metrics, last hour" }
        @if metrics.iter().all(|(_, v)| v.is_empty()) {
            (empty("No metric windows from this agent in the last hour.", &html! {
                "Windows arrive once the agent serves requests; see " a href="/monitoring" { "Metrics" } " for longer spans."
            }))
        } @else {
            div.table { table {
                thead { tr { th { "Model" } th { "Version" } th.num { "Requests" } th.num { "Error rate" } th.num { "p50 ms" } th.num { "p99 ms" } } }
                tbody { @for (model, versions) in metrics { @for v in versions { tr {
                    td { a href={ "/monitoring?model=" (model) } { (model) } }
                    td { (v.version) }
                    td.num { (v.requests) }
                    td.num { (layout::num(Some(v.error_rate), 4)) }
                    td.num { (layout::num(v.p50_ms, 2)) }
                    td.num { (layout::num(v.p99_ms, 2)) }
                } } } }
            } }
        }
        @if ctx.may(P::ReadAudit) {
            h2 { "Security events" }
            @if trail.is_empty() { p.muted { "None recorded for this agent." } }
            @else {
                div.table { table {
                    thead { tr { th { "#" } th { "Time" } th { "Action" } th { "Target" } th { "Outcome" } } }
                    tbody { @for e in trail { tr {
                        td { (e.seq) } td { (layout::time(e.at)) } td { (e.action) } td { (e.target) }
                        td { (badge(crate::audit::outcome_name(e.outcome))) }
                    } } }
                } }
            }
        }
    };
    page(ctx, &format!("Agent {}", a.id), "/fleet", Some(15), &body)
}

#[cfg(test)]
mod tests {
    use super::engine_kind;

    #[test]
    fn engines_show_their_kind() {
        assert_eq!(engine_kind("tract-cpu"), "cpu");
        assert_eq!(engine_kind("wgpu-gpu"), "gpu");
        assert_eq!(engine_kind("onnx"), "onnx", "a name without a kind is shown whole");
    }
}
