//! `/monitoring?model=&version=&group=&since=&feature=`: one model's versions over a span
//! (the summaries `GET /v1/metrics` answers, from the same rollups), request rate, error
//! rate and latency percentiles over time, drift per feature ranked by PSI (with KS and
//! JS), and one feature's reference histogram beside what agents see now. And
//! `/alerts`: what fires now and the latest events, as `GET /v1/alerts` answers, and
//! the rules of the configuration.

use std::time::{Duration, SystemTime};

use axum::Extension;
use axum::extract::{Query, State};
use falaj_common::alerting::AlertRule;
use falaj_common::metrics::VersionSummary;
use falaj_common::profile::DataProfile;
use falaj_common::time::Timestamp;
use maud::{Markup, html};
use serde::Deserialize;

use super::given;
use super::series::{self, Buckets};
use crate::admin::{Api, ApiError};
use crate::alerts::AlertEvent;
use crate::console::charts::{self, Series};
use crate::console::gate::Ctx;
use crate::console::layout::{self, PageResult, badge, empty, num, page, time};
use crate::db;
use crate::monitoring::{self, MetricsQuery};
use crate::sql::AsSql;

/// Buckets in each chart.
const BUCKETS: usize = 48;
/// The spans offered.
const SPANS: [&str; 6] = ["15m", "1h", "6h", "24h", "7d", "30d"];

/// The page's query string.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MetricsFilter {
    /// The model (default: the first registered).
    pub model: Option<String>,
    /// Only this version's drift and histogram (default: the latest with data).
    pub version: Option<String>,
    /// Only agents of this group.
    pub group: Option<String>,
    /// The span: `15m`, `1h` (default), `6h`, `24h`, `7d`, `30d`.
    pub since: Option<String>,
    /// The feature whose histograms are compared (default: the one drifting most).
    pub feature: Option<String>,
}

/// What the page shows, read in one pass.
#[derive(Debug, Clone, Default)]
pub struct MetricsData {
    /// Models with bundles.
    pub models: Vec<String>,
    /// Groups with agents.
    pub groups: Vec<String>,
    /// The model shown.
    pub model: Option<String>,
    /// The span's buckets.
    pub buckets: Buckets,
    /// Each version's summary over the span.
    pub summaries: Vec<VersionSummary>,
    /// The version whose drift is shown, its reference and its counts per input bin.
    pub drift: Option<(u64, DataProfile, Vec<Vec<u64>>)>,
}

/// `GET /monitoring`.
pub(crate) async fn show(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    Query(filter): Query<MetricsFilter>,
) -> PageResult {
    let span = given(filter.since.as_ref()).unwrap_or("1h");
    let span = humantime::parse_duration(span)
        .map_err(|e| ApiError::bad_request(format!("since {span:?}: {e}")))?;
    if span > Duration::from_secs(90 * 86_400) {
        return Err(ApiError::bad_request("since: at most 90 days").into());
    }
    let version = match given(filter.version.as_ref()) {
        None => None,
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("version {v:?}: a version is a whole number"))
        })?),
    };
    let now = SystemTime::now();
    let f = filter.clone();
    let data = api
        .shared
        .db
        .run(move |sql| read(&sql, &f, version, span, Timestamp::from_system(now)))
        .await?;
    Ok(render(&ctx, &filter, &data))
}

/// Reads what the page shows: `span` back from `now`.
pub fn read<C: AsSql + ?Sized>(
    conn: &C,
    filter: &MetricsFilter,
    version: Option<u64>,
    span: Duration,
    now: Timestamp,
) -> Result<MetricsData, C::Error> {
    let mut models: Vec<String> = db::bundles(conn)?.into_iter().map(|b| b.name).collect();
    models.dedup();
    let mut groups: Vec<String> = db::agents(conn)?.into_iter().map(|a| a.group).collect();
    groups.sort();
    groups.dedup();
    let model = given(filter.model.as_ref()).map(str::to_owned).or_else(|| models.first().cloned());
    let Some(model) = model else {
        return Ok(MetricsData { models, groups, ..MetricsData::default() });
    };
    let since = Timestamp::from_unix(now.unix().saturating_sub(span.as_secs()));
    let query = MetricsQuery {
        model: model.clone(),
        version: None,
        group: given(filter.group.as_ref()).map(str::to_owned),
        agent: None,
        since,
    };
    let buckets = series::buckets(conn, &query, now, BUCKETS)?;
    let summaries = buckets.summaries(conn, &model)?;
    let merged = buckets.merged();
    let chosen = version.or_else(|| {
        merged
            .keys()
            .rev()
            .copied()
            .find(|v| summaries.iter().any(|s| s.version == *v && s.drift.is_some()))
    });
    let drift = match chosen {
        Some(v) => monitoring::reference(conn, &model, v)?.map(|reference| {
            let counts = merged.get(&v).map(|r| r.rollup.counts.inputs.clone()).unwrap_or_default();
            (v, reference, counts)
        }),
        None => None,
    };
    Ok(MetricsData { models, groups, model: Some(model), buckets, summaries, drift })
}

fn chart(label: &str, svg: Result<String, charts::ChartError>) -> Markup {
    html! {
        figure {
            @match svg { Ok(svg) => (layout::svg(svg)), Err(e) => p.muted { (e) } }
            figcaption { (label) }
        }
    }
}

fn filters(filter: &MetricsFilter, data: &MetricsData) -> Markup {
    let span = given(filter.since.as_ref()).unwrap_or("1h");
    let group = given(filter.group.as_ref());
    html! {
        form.filters method="get" action="/monitoring" {
            div { label for="m-model" { "Model" }
                select #m-model name="model" { @for m in &data.models { option value=(m) selected[data.model.as_deref() == Some(m)] { (m) } } } }
            div { label for="m-group" { "Group" }
                select #m-group name="group" { option value="" { "all groups" }
                    @for g in &data.groups { option value=(g) selected[group == Some(g.as_str())] { (g) } } } }
            div { label for="m-since" { "Span" }
                select #m-since name="since" { @for s in SPANS { option value=(s) selected[span == s] { "last " (s) } } } }
            div { label for="m-version" { "Drift of version" }
                input #m-version name="version" type="number" min="1" value=[filter.version.as_deref()] placeholder="latest"; }
            button type="submit" { "Show" }
        }
    }
}

fn summary_table(summaries: &[VersionSummary]) -> Markup {
    html! {
        div.table { table {
            thead { tr { th { "Version" } th.num { "Agents" } th.num { "Requests" } th.num { "Per second" } th.num { "Error rate" }
                th.num { "p50 ms" } th.num { "p95 ms" } th.num { "p99 ms" } th { "Most drift (PSI)" } } }
            tbody { @for s in summaries { tr {
                td { (s.version) } td.num { (s.agents) } td.num { (s.requests) } td.num { (num(Some(s.rate), 2)) }
                td.num { (num(Some(s.error_rate), 4)) } td.num { (num(s.p50_ms, 2)) } td.num { (num(s.p95_ms, 2)) } td.num { (num(s.p99_ms, 2)) }
                td { @match s.drift.as_ref().and_then(|d| d.top_inputs(1).first().map(|c| (c.column.clone(), c.scores.psi))) {
                    Some((c, psi)) => { (c) " " (num(Some(psi), 3)) }
                    None => span.muted { "no reference" },
                } }
            } } }
        } }
    }
}

fn drift_section(filter: &MetricsFilter, data: &MetricsData) -> Markup {
    let Some((version, reference, counts)) = &data.drift else {
        return empty(
            "No drift to show.",
            &html! { "Drift needs a version with a reference profile and metric windows in this span." },
        );
    };
    let summary = data.summaries.iter().find(|s| s.version == *version);
    let mut ranked: Vec<(String, f64, f64, f64)> = summary
        .and_then(|s| s.drift.as_ref())
        .map(|d| {
            d.inputs
                .iter()
                .map(|c| (c.column.clone(), c.scores.psi, c.scores.ks, c.scores.js))
                .collect()
        })
        .unwrap_or_default();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    let feature = given(filter.feature.as_ref())
        .map(str::to_owned)
        .or_else(|| ranked.first().map(|r| r.0.clone()));
    let index = feature.as_ref().and_then(|f| reference.inputs.iter().position(|c| &c.name == f));
    let bars: Vec<(String, f64)> = ranked.iter().map(|r| (r.0.clone(), r.1)).collect();
    let model = data.model.as_deref().unwrap_or_default();
    html! {
        h2 { "Drift of version " (version) " against its reference" }
        div.charts {
            (chart("PSI per input feature, most drift first", charts::ranked_bars("PSI per input feature", &bars)))
            @if let Some(i) = index {
                (chart(&format!("{}: reference beside the span", feature.as_deref().unwrap_or_default()),
                    charts::paired_histogram(&format!("Histogram of {}", feature.as_deref().unwrap_or_default()),
                        ("reference", "observed"),
                        &reference.inputs[i].histogram.all_counts(),
                        counts.get(i).map_or(&[][..], Vec::as_slice))))
            }
        }
        div.table { table {
            thead { tr { th { "Feature" } th.num { "PSI" } th.num { "KS" } th.num { "JS" } th { "" } } }
            tbody { @for (name, psi, ks, js) in &ranked { tr {
                td { (name) } td.num { (num(Some(*psi), 4)) } td.num { (num(Some(*ks), 4)) } td.num { (num(Some(*js), 4)) }
                td { a href={ "/monitoring?" (serde_urlencoded::to_string([("model", model), ("version", &version.to_string()),
                    ("since", given(filter.since.as_ref()).unwrap_or("1h")), ("feature", name)]).unwrap_or_default()) } { "histogram" } }
            } } }
        } }
    }
}

/// The metrics page.
pub fn render(ctx: &Ctx, filter: &MetricsFilter, data: &MetricsData) -> Markup {
    let name = |v: u64| format!("v{v}");
    let rate = data.buckets.lines(name, |s| Some(s.rate), true);
    let errors = data.buckets.lines(name, |s| (s.requests > 0).then_some(s.error_rate), false);
    let latency: Vec<Series> = data
        .buckets
        .versions
        .keys()
        .next_back()
        .map(|latest| {
            let only = Buckets {
                versions: data
                    .buckets
                    .versions
                    .iter()
                    .filter(|(v, _)| *v == latest)
                    .map(|(v, s)| (*v, s.clone()))
                    .collect(),
                ..data.buckets.clone()
            };
            let mut lines = Vec::new();
            for (q, f) in [("p50", 0), ("p95", 1), ("p99", 2)] {
                lines.extend(only.lines(
                    |v| format!("v{v} {q}"),
                    move |s| [s.p50_ms, s.p95_ms, s.p99_ms][f],
                    false,
                ));
            }
            lines
        })
        .unwrap_or_default();
    let body = html! {
        (filters(filter, data))
        @if data.model.is_none() {
            (empty("No model is registered.", &html! { "Push a bundle and deploy it; its agents' metric windows show here." }))
        } @else if data.summaries.is_empty() {
            (empty("No metric windows in this span.", &html! { "Agents report a window about every minute while they serve requests; try a longer span." }))
        } @else {
            (summary_table(&data.summaries))
            div.charts {
                (chart("Requests per second", charts::lines("Requests per second", &rate, None, data.buckets.span())))
                (chart("Error rate", charts::lines("Error rate", &errors, None, data.buckets.span())))
                (chart("Latency percentiles of the latest version (ms)", charts::lines("Latency percentiles", &latency, None, data.buckets.span())))
            }
            (drift_section(filter, data))
        }
    };
    let title =
        data.model.as_deref().map_or_else(|| "Metrics".to_owned(), |m| format!("Metrics of {m}"));
    page(ctx, &title, "/monitoring", Some(30), &body)
}

/// The alerts' query string.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AlertsFilter {
    /// How many events (default 50).
    pub limit: Option<u64>,
}

/// `GET /alerts`.
pub(crate) async fn alerts(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    Query(filter): Query<AlertsFilter>,
) -> PageResult {
    let limit = filter.limit.unwrap_or(50).clamp(1, 10_000);
    let (firing, events) = api
        .shared
        .db
        .run(move |sql| Ok((crate::alerts::firing(&sql)?, crate::alerts::events(&sql, limit)?)))
        .await?;
    Ok(render_alerts(&ctx, &firing, &events, &api.console.alert_rules))
}

fn render_alerts(
    ctx: &Ctx,
    firing: &[(String, String, Timestamp, f64)],
    events: &[AlertEvent],
    rules: &[AlertRule],
) -> Markup {
    let body = html! {
        h2 { "Firing now" }
        @if firing.is_empty() {
            p { (badge("resolved")) " Nothing is firing." }
        } @else {
            div.table { table {
                thead { tr { th { "Rule" } th { "Subject" } th { "Since" } th.num { "Value" } } }
                tbody { @for (rule, subject, since, value) in firing { tr {
                    td { (rule) } td { (subject) } td { (time(*since)) } td.num { (num(Some(*value), 4)) }
                } } }
            } }
        }
        h2 { "Rules" }
        @if rules.is_empty() {
            p.muted { "No rule is configured: add " code { "[[alerts.rules]]" } " to the control plane's configuration." }
        } @else {
            div.table { table {
                thead { tr { th { "Rule" } th { "Model" } th { "Metric" } th { "Column" } th { "Group" } th.num { "Fires above" } th { "Window" } th { "Retraining hook" } } }
                tbody { @for r in rules { tr {
                    td { (r.name) } td { (r.model) } td { (format!("{:?}", r.metric).to_lowercase()) }
                    td { (r.column.as_deref().unwrap_or("any")) } td { (r.group.as_deref().unwrap_or("all")) }
                    td.num { (num(Some(r.threshold), 4)) } td { (humantime::format_duration(r.window)) }
                    td { @if r.retrain.is_some() { "yes" } @else { "no" } }
                } } }
            } }
        }
        h2 { "History" }
        @if events.is_empty() {
            (empty("No alert has fired yet.", &html! {
                "Rules live in the control plane's configuration (" code { "[[alerts.rules]]" } "): drift, error rate, latency, request rate."
            }))
        } @else {
            div.table { table {
                thead { tr { th { "#" } th { "Time" } th { "Rule" } th { "Subject" } th { "State" } th { "Metric" } th.num { "Value" } th.num { "Threshold" } } }
                tbody { @for e in events { tr {
                    td { (e.id) } td { (time(e.at)) } td { (e.rule) } td { (e.subject) } td { (badge(&e.state)) }
                    td { (e.metric) } td.num { (num(Some(e.value), 4)) } td.num { (num(Some(e.threshold), 4)) }
                } } }
            } }
        }
    };
    page(ctx, "Alerts", "/alerts", Some(15), &body)
}
