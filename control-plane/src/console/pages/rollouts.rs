//! Deployments and rollouts: `/rollouts?group=&model=` (the version each group runs,
//! the rollouts, newest first, and for operators the form that starts one),
//! `/rollouts/{group}/{model}` (the latest rollout's step, share, per-variant figures and
//! guards, charts of both variants and of each guard against its bound over time, and
//! the buttons an operator may press), and the three forms, which call the same services
//! as `PUT /v1/groups/{group}/deployments/{name}` (deploy a version to a group, as
//! `falaj-control deploy` does), `POST /v1/rollouts` and
//! `POST /v1/groups/{group}/rollouts/{model}/{action}`.

use std::time::SystemTime;

use axum::Extension;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use falaj_common::rollout::{Figures, Metric, Strategy, judge};
use falaj_common::time::Timestamp;
use maud::{Markup, html};
use serde::Deserialize;

use super::given;
use super::series::{self, Buckets};
use crate::admin::{Api, ApiError};
use crate::auth::Permission as P;
use crate::console::charts::{self, Series};
use crate::console::gate::Ctx;
use crate::console::layout::{self, PageError, PageResult, badge, csrf, empty, num, page, time};
use crate::db;
use crate::monitoring::{self, MetricsQuery};
use crate::rollouts::{Action, Rollout, RolloutView, StartRequest, api as service};
use crate::service::deploy::deploy_version;

/// Buckets in a rollout's charts.
const BUCKETS: usize = 30;

/// The list's filters.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RolloutFilter {
    /// Only this group.
    pub group: Option<String>,
    /// Only this model.
    pub model: Option<String>,
}

/// `GET /rollouts`.
pub(crate) async fn list(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    Query(filter): Query<RolloutFilter>,
) -> PageResult {
    list_with(&api, &ctx, &filter, None).await
}

async fn list_with(
    api: &Api,
    ctx: &Ctx,
    filter: &RolloutFilter,
    notice: Option<&str>,
) -> PageResult {
    let (g, m) = (
        given(filter.group.as_ref()).map(str::to_owned),
        given(filter.model.as_ref()).map(str::to_owned),
    );
    let (deployments, rollouts) = api
        .shared
        .db
        .run(move |sql| {
            let deployments: Vec<_> = db::all_deployments(&sql)?
                .into_iter()
                .filter(|(grp, name, _)| {
                    g.as_deref().is_none_or(|x| x == grp) && m.as_deref().is_none_or(|x| x == name)
                })
                .collect();
            Ok((deployments, crate::rollouts::list(&sql, g.as_deref(), m.as_deref())?))
        })
        .await?;
    Ok(render_list(ctx, &deployments, &rollouts, notice))
}

fn render_list(
    ctx: &Ctx,
    deployments: &[(String, String, u64)],
    rollouts: &[Rollout],
    notice: Option<&str>,
) -> Markup {
    let body = html! {
        @if let Some(n) = notice { (layout::notice(n)) }
        h2 { "Active version per group" }
        @if deployments.is_empty() {
            (empty("Nothing is deployed.", &html! {
                @if ctx.may(P::Deploy) { "Deploy a pushed bundle to a group with the form below or " }
                @else { "An operator deploys a pushed bundle to a group with " }
                code { "falaj-control deploy --group G NAME@VERSION" } "."
            }))
        } @else {
            div.table { table #deployments {
                thead { tr { th { "Group" } th { "Model" } th { "Version" } th { "Rollout" } } }
                tbody { @for (group, model, version) in deployments { tr {
                    td { a href={ "/fleet?group=" (group) } { (group) } }
                    td { (model) }
                    td.version { (version) }
                    td { a href={ "/rollouts/" (group) "/" (model) } { "latest rollout" } }
                } } }
            } }
        }
        h2 { "Rollouts" }
        @if rollouts.is_empty() {
            (empty("No rollout yet.", &html! {
                @if ctx.may(P::ManageRollouts) { "Start one with the form below: a canary, an A/B split or a shadow." }
                @else { "An operator starts rollouts of a new version against the deployed one." }
            }))
        } @else {
            div.table { table {
                thead { tr { th { "Rollout" } th { "Group" } th { "Model" } th { "Baseline → candidate" } th { "Strategy" } th { "State" } th { "Started" } th { "Reason" } } }
                tbody { @for r in rollouts { tr {
                    td { a href={ "/rollouts/" (r.group) "/" (r.model) } { (r.id) } }
                    td { (r.group) } td { (r.model) }
                    td { "v" (r.baseline) " → v" (r.candidate) }
                    td { (r.strategy.name()) }
                    td { (badge(r.state.name())) }
                    td { (time(r.created_at)) }
                    td { (r.reason.as_deref().unwrap_or("")) }
                } } }
            } }
        }
        @if ctx.may(P::Deploy) { (deploy_form(ctx)) }
        @if ctx.may(P::ManageRollouts) { (start_form(ctx)) }
    };
    page(ctx, "Deployments and rollouts", "/rollouts", Some(15), &body)
}

fn deploy_form(ctx: &Ctx) -> Markup {
    html! {
        h2 { "Deploy a version" }
        form.stack #deploy method="post" action="/deployments" {
            (csrf(ctx))
            label for="d-group" { "Group" }
            input #d-group name="group" required pattern="[a-z0-9][a-z0-9._-]*"
                title="lower-case letters, digits, '.', '_' and '-'";
            label for="d-model" { "Model" }
            input #d-model name="model" required;
            label for="d-version" { "Version (pushed already)" }
            input #d-version name="version" type="number" min="1" required;
            button type="submit" { "Deploy" }
        }
        p.hint { "Every agent of the group switches to this version at once; to try a version on a share of the traffic first, start a rollout below." }
    }
}

/// The deploy form as posted.
#[derive(Debug, Deserialize)]
pub(crate) struct DeployForm {
    group: String,
    model: String,
    version: String,
}

/// `POST /deployments`: the version deployed, then the list of that group and model.
pub(crate) async fn deploy(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    axum::Form(form): axum::Form<DeployForm>,
) -> Result<Response, PageError> {
    let (group, model) = (form.group.trim(), form.model.trim());
    let outcome = match number::<u64>("version", &form.version) {
        Err(message) => Err((StatusCode::UNPROCESSABLE_ENTITY, message)),
        Ok(None) => {
            Err((StatusCode::UNPROCESSABLE_ENTITY, "version: enter the version to deploy".into()))
        }
        Ok(Some(version)) => {
            match deploy_version(&api.shared, group, model, version).await.map_err(ApiError::from) {
                Ok(()) => Ok(()),
                Err(e) if e.status().is_client_error() => Err((e.status(), e.message().to_owned())),
                Err(e) => return Err(e.into()),
            }
        }
    };
    match outcome {
        Ok(()) => {
            let to = format!("/rollouts?group={}&model={}", urlencoding(group), urlencoding(model));
            Ok(Redirect::to(&to).into_response())
        }
        Err((status, message)) => {
            let page = list_with(&api, &ctx, &RolloutFilter::default(), Some(&message)).await?;
            Ok((status, page).into_response())
        }
    }
}

/// `text` as one query-string value.
fn urlencoding(text: &str) -> String {
    serde_urlencoded::to_string([("", text)]).unwrap_or_default().trim_start_matches('=').to_owned()
}

fn start_form(ctx: &Ctx) -> Markup {
    html! {
        h2 { "Start a rollout" }
        form.stack #start method="post" action="/rollouts" {
            (csrf(ctx))
            label for="r-group" { "Group" }
            input #r-group name="group" required;
            label for="r-model" { "Model" }
            input #r-model name="model" required;
            label for="r-candidate" { "Candidate version" }
            input #r-candidate name="candidate" type="number" min="1" required;
            label for="r-strategy" { "Strategy" }
            select #r-strategy name="strategy" {
                option value="canary" { "canary: steps of a growing share" }
                option value="ab" { "ab: a fixed split" }
                option value="shadow" { "shadow: mirrored, never answers" }
            }
            label for="r-steps" { "Canary steps, % (comma separated, last 100)" }
            input #r-steps name="steps" value="10,50,100";
            label for="r-interval" { "Seconds between canary steps" }
            input #r-interval name="step_interval_seconds" type="number" min="1" value="600";
            label for="r-split" { "A/B split, % to the candidate" }
            input #r-split name="split" type="number" min="0" max="100" step="any";
            label for="r-guards" { "Guards, one per line (error_rate<0.02, p99_ms<=baseline*1.5)" }
            textarea #r-guards name="guards" rows="3" { "error_rate<0.05" }
            label for="r-min" { "Observations before judging (default 200)" }
            input #r-min name="min_requests" type="number" min="1";
            button type="submit" { "Start rollout" }
        }
    }
}

/// The start form as posted (every field text, checked here with clear messages).
#[derive(Debug, Deserialize)]
pub(crate) struct StartForm {
    group: String,
    model: String,
    candidate: String,
    strategy: String,
    #[serde(default)]
    steps: String,
    #[serde(default)]
    step_interval_seconds: String,
    #[serde(default)]
    split: String,
    #[serde(default)]
    guards: String,
    #[serde(default)]
    min_requests: String,
}

fn number<T: std::str::FromStr>(field: &str, text: &str) -> Result<Option<T>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| format!("{field}: {text:?} is not a number"))
}

impl StartForm {
    /// The request `POST /v1/rollouts` would take, or what is wrong with the form.
    pub(crate) fn request(&self) -> Result<StartRequest, String> {
        let strategy = [Strategy::Canary, Strategy::Ab, Strategy::Shadow]
            .into_iter()
            .find(|s| s.name() == self.strategy.trim())
            .ok_or_else(|| format!("strategy {:?}: choose canary, ab or shadow", self.strategy))?;
        let candidate = number("candidate version", &self.candidate)?
            .ok_or("candidate version: enter the version to try")?;
        let steps = if strategy == Strategy::Canary {
            let parts = self.steps.split(',').map(str::trim).filter(|s| !s.is_empty());
            let steps = parts
                .map(|s| number::<f64>("canary steps", s).map(Option::unwrap_or_default))
                .collect::<Result<Vec<f64>, String>>()?;
            Some(steps).filter(|s| !s.is_empty())
        } else {
            None
        };
        Ok(StartRequest {
            group: self.group.trim().to_owned(),
            model: self.model.trim().to_owned(),
            candidate,
            strategy,
            steps,
            step_interval_seconds: number("seconds between steps", &self.step_interval_seconds)?
                .filter(|_| strategy == Strategy::Canary),
            split: number("split", &self.split)?.filter(|_| strategy == Strategy::Ab),
            mirror: None,
            guards: self
                .guards
                .lines()
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(String::from)
                .collect(),
            min_requests: number("observations before judging", &self.min_requests)?,
        })
    }
}

/// `POST /rollouts`.
pub(crate) async fn start(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    axum::Form(form): axum::Form<StartForm>,
) -> Result<Response, PageError> {
    let (status, message) = match form.request() {
        Err(message) => (StatusCode::UNPROCESSABLE_ENTITY, message),
        Ok(request) => match service::start_rollout(&api, &request).await {
            Ok(view) => return Ok(Redirect::to(&detail_url(&view.rollout)).into_response()),
            Err(e) if e.status().is_client_error() => (e.status(), e.message().to_owned()),
            Err(e) => return Err(e.into()),
        },
    };
    // The refusal above the form, with the list it belongs to.
    let page = list_with(&api, &ctx, &RolloutFilter::default(), Some(&message)).await?;
    Ok((status, page).into_response())
}

fn detail_url(r: &Rollout) -> String {
    format!("/rollouts/{}/{}", r.group, r.model)
}

/// `POST /rollouts/{group}/{model}/{action}`.
pub(crate) async fn act(
    State(api): State<Api>,
    Path((group, model, action)): Path<(String, String, String)>,
) -> Result<Response, PageError> {
    let Some(action) = Action::from_name(&action) else {
        return Err(ApiError::not_found(format!(
            "no rollout action {action:?}: promote, abort, pause or resume"
        ))
        .into());
    };
    let view = service::act_on(&api, group, model, action).await?;
    Ok(Redirect::to(&detail_url(&view.rollout)).into_response())
}

/// `GET /rollouts/{group}/{model}`.
pub(crate) async fn show(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    Path((group, model)): Path<(String, String)>,
) -> PageResult {
    let (g, m) = (group.clone(), model.clone());
    let Some(rollout) = api.shared.db.run(move |sql| crate::rollouts::latest(&sql, &g, &m)).await?
    else {
        return Err(ApiError::not_found(format!("no rollout of {model} in group {group}")).into());
    };
    let view = service::view(&api, rollout).await?;
    let r = view.rollout.clone();
    let now = Timestamp::from_system(SystemTime::now());
    let (buckets, references) = api
        .shared
        .db
        .run(move |sql| {
            let query = MetricsQuery {
                model: r.model.clone(),
                version: None,
                group: Some(r.group.clone()),
                agent: None,
                since: r.created_at,
            };
            let buckets = series::buckets(&sql, &query, r.ended_at.unwrap_or(now), BUCKETS)?;
            let references = (
                monitoring::reference(&sql, &r.model, r.baseline)?,
                monitoring::reference(&sql, &r.model, r.candidate)?,
            );
            Ok((buckets, references))
        })
        .await?;
    let base = bucket_figures(&buckets, view.rollout.baseline, references.0.as_ref());
    let cand = bucket_figures(&buckets, view.rollout.candidate, references.1.as_ref());
    let figures = (base.as_slice(), cand.as_slice());
    let quality = Quality {
        guards: guard_series(&view.rollout, &buckets, figures),
        agreement: variant_series(&view.rollout, &buckets, figures, Metric::Agreement),
        accuracy: variant_series(&view.rollout, &buckets, figures, Metric::Accuracy),
    };
    Ok(render_show(&ctx, &view, &buckets, &quality))
}

/// Each version's figures per bucket, as the judge computes them (PSI against `reference`).
fn bucket_figures(
    buckets: &Buckets,
    version: u64,
    reference: Option<&falaj_common::profile::DataProfile>,
) -> Vec<Figures> {
    buckets.versions.get(&version).map_or_else(
        || vec![Figures::default(); buckets.starts.len()],
        |slots| {
            let of = |s: &monitoring::VersionRollup| Figures::of(&s.rollup.counts, reference);
            slots.iter().map(|s| s.as_ref().map_or_else(Figures::default, of)).collect()
        },
    )
}

/// Each guard over time: the candidate's value and the bound it was held to, per bucket.
fn guard_series(
    r: &Rollout,
    buckets: &Buckets,
    (base, cand): (&[Figures], &[Figures]),
) -> Vec<(String, Vec<Series>)> {
    r.guards
        .iter()
        .map(|guard| {
            let mut value = Series {
                name: format!("v{} {}", r.candidate, guard.metric.name()),
                points: vec![],
            };
            let mut bound = Series { name: "bound".into(), points: vec![] };
            for ((start, b), c) in buckets.starts.iter().zip(base).zip(cand) {
                let x = (*start + buckets.step / 2) as f64;
                if let Some(result) = judge(std::slice::from_ref(guard), 0, b, c).first() {
                    value.points.extend(result.value.map(|v| (x, v)));
                    bound.points.extend(result.bound.map(|v| (x, v)));
                }
            }
            (guard.to_string(), vec![value, bound])
        })
        .collect()
}

/// `metric` of both variants per bucket (buckets without observations left out); empty
/// when neither variant has any.
fn variant_series(
    r: &Rollout,
    buckets: &Buckets,
    (base, cand): (&[Figures], &[Figures]),
    metric: Metric,
) -> Vec<Series> {
    let line = |name: String, figures: &[Figures]| Series {
        name,
        points: buckets
            .starts
            .iter()
            .zip(figures)
            .filter_map(|(start, f)| {
                let (value, observed) = f.value(metric);
                value.filter(|_| observed > 0).map(|v| ((*start + buckets.step / 2) as f64, v))
            })
            .collect(),
    };
    let lines = [
        line(format!("baseline v{}", r.baseline), base),
        line(format!("candidate v{}", r.candidate), cand),
    ];
    if lines.iter().all(|l| l.points.is_empty()) { Vec::new() } else { lines.to_vec() }
}

/// The charts of a rollout beyond traffic: each guard, and both variants' agreement and
/// accuracy when there are mirrored requests or labels.
struct Quality {
    guards: Vec<(String, Vec<Series>)>,
    agreement: Vec<Series>,
    accuracy: Vec<Series>,
}

fn chart(label: &str, svg: Result<String, charts::ChartError>) -> Markup {
    html! {
        figure {
            @match svg {
                Ok(svg) => (layout::svg(svg)),
                Err(e) => p.muted { (e) },
            }
            figcaption { (label) }
        }
    }
}

fn actions(ctx: &Ctx, view: &RolloutView) -> Markup {
    let r = &view.rollout;
    let allowed: Vec<Action> = match r.state {
        crate::rollouts::RolloutState::Running => {
            vec![Action::Promote, Action::Pause, Action::Abort]
        }
        crate::rollouts::RolloutState::Paused => {
            vec![Action::Promote, Action::Resume, Action::Abort]
        }
        _ => vec![],
    };
    html! {
        @if ctx.may(P::ManageRollouts) && !allowed.is_empty() {
            div.actions {
                @for a in allowed {
                    form method="post" action={ "/rollouts/" (r.group) "/" (r.model) "/" (a.name()) } {
                        (csrf(ctx))
                        @if a == Action::Abort {
                            button.danger type="submit" name="do" value=(a.name()) { "Abort" }
                        } @else {
                            button type="submit" name="do" value=(a.name()) {
                                (match a { Action::Promote => "Promote", Action::Pause => "Pause", _ => "Resume" })
                            }
                        }
                    }
                }
            }
        }
    }
}

/// How the page names a version: as the rollout's baseline or candidate.
fn variant_name(r: &Rollout, v: u64) -> String {
    if v == r.candidate {
        format!("candidate v{v}")
    } else if v == r.baseline {
        format!("baseline v{v}")
    } else {
        format!("v{v}")
    }
}

/// The charts: both variants' traffic, agreement and accuracy, and each guard, over the
/// rollout's time.
fn over_time(view: &RolloutView, buckets: &Buckets, quality: &Quality) -> Markup {
    let r = &view.rollout;
    // Only the rollout's two versions (other versions of the model may serve elsewhere).
    let both = Buckets {
        versions: buckets
            .versions
            .iter()
            .filter(|(v, _)| **v == r.baseline || **v == r.candidate)
            .map(|(v, slots)| (*v, slots.clone()))
            .collect(),
        ..buckets.clone()
    };
    let name = |v: u64| variant_name(r, v);
    let rate = both.lines(name, |s| Some(s.rate), true);
    let errors = both.lines(name, |s| (s.requests > 0).then_some(s.error_rate), false);
    let p99 = both.lines(name, |s| s.p99_ms, false);
    let span = buckets.span();
    html! {
        @if both.versions.is_empty() {
            (empty("No metric windows from this group since the rollout began.", &html! { "Charts fill in as agents report (every window, about a minute)." }))
        } @else {
            div.charts {
                (chart("Requests per second by variant", charts::lines("Requests per second by variant", &rate, None, span)))
                (chart("Error rate by variant", charts::lines("Error rate by variant", &errors, None, span)))
                (chart("p99 latency (ms) by variant", charts::lines("p99 latency by variant", &p99, None, span)))
                @if !quality.agreement.is_empty() {
                    (chart("Agreement with the baseline by variant", charts::lines("Agreement by variant", &quality.agreement, None, span)))
                }
                @if !quality.accuracy.is_empty() {
                    (chart("Accuracy on ground truth by variant", charts::lines("Accuracy by variant", &quality.accuracy, None, span)))
                }
                @for (guard, lines) in &quality.guards {
                    (chart(&format!("Guard {guard}: candidate against its bound"), charts::lines(&format!("Guard {guard}"), lines, None, span)))
                }
            }
        }
    }
}

fn agents_table(view: &RolloutView) -> Markup {
    html! {
        @if view.agents.is_empty() { p.muted { "No agent in this group." } }
        @else {
            div.table { table {
                thead { tr { th { "Agent" } th { "Session" } th { "Document" } th { "Its account" } } }
                tbody { @for a in &view.agents { tr {
                    td { a href={ "/fleet/" (a.id) } { code { (a.id) } } }
                    td { (badge(if a.connected { "connected" } else { "offline" })) }
                    td { (a.applied_version.map_or_else(|| "–".into(), |v| v.to_string())) }
                    td { @match &a.report {
                        Some(rep) if rep.rolled_back => { (badge("rolled_back")) " " (rep.reason.as_deref().unwrap_or("")) }
                        Some(rep) => { "step " (rep.step.map_or_else(|| "–".into(), |s| (s + 1).to_string())) }
                        None => span.muted { "not reported" },
                    } }
                } } }
            } }
        }
    }
}

fn render_show(ctx: &Ctx, view: &RolloutView, buckets: &Buckets, quality: &Quality) -> Markup {
    let r = &view.rollout;
    let variants = [&view.variants.baseline, &view.variants.candidate];
    let body = html! {
        dl.facts {
            dt { "Rollout" } dd { (r.id) " · " (r.strategy.name()) }
            dt { "State" } dd { (badge(r.state.name())) @if let Some(reason) = &r.reason { " " (reason) } }
            dt { "Group · model" } dd { (r.group) " · " (r.model) }
            dt { "Baseline → candidate" } dd { "v" (r.baseline) " → v" (r.candidate) }
            dt { "Step" } dd { (view.step.map_or_else(|| "none".into(), |s| format!("{} of {}", s + 1, r.plan.shares.len()))) }
            dt { "Candidate's share" } dd { (view.share) }
            dt { "Started" } dd { (time(r.created_at)) }
            dt { "Ended" } dd { (layout::time_or_dash(r.ended_at)) }
        }
        (actions(ctx, view))
        h2 { "Variants" }
        div.table { table {
            thead { tr { th { "Variant" } th.num { "Requests" } th.num { "Errors" } th.num { "Agreement" } th.num { "Accuracy" } th.num { "MAE" } } }
            tbody { @for v in variants { tr {
                td { (variant_name(r, v.version)) }
                td.num { (v.figures.requests) }
                td.num { (v.figures.errors) }
                td.num { (num(v.agreement, 3)) }
                td.num { (num(v.accuracy, 3)) }
                td.num { (num(v.mae, 3)) }
            } } }
        } }
        @if let Some(p) = view.accuracy_p_value { p.muted { "Accuracy difference p-value: " (num(Some(p), 4)) } }
        h2 { "Guards" }
        @if view.guard_results.is_empty() { p.muted { "No guard: the rollout advances on its schedule alone." } }
        @else {
            div.table { table {
                thead { tr { th { "Guard" } th.num { "Candidate" } th.num { "Bound" } th.num { "Observed" } th { "Verdict" } } }
                tbody { @for g in &view.guard_results { tr {
                    td { code { (g.guard) } }
                    td.num { (num(g.value, 4)) }
                    td.num { (num(g.bound, 4)) }
                    td.num { (g.observed) }
                    td { (badge(&format!("{:?}", g.verdict).to_lowercase())) }
                } } }
            } }
        }
        h2 { "Over time" }
        (over_time(view, buckets, quality))
        h2 { "Agents of the group" }
        (agents_table(view))
    };
    page(
        ctx,
        &format!("Rollout {} of {} in {}", r.id, r.model, r.group),
        "/rollouts",
        Some(10),
        &body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(strategy: &str, steps: &str, split: &str, candidate: &str) -> StartForm {
        StartForm {
            group: " plant ".into(),
            model: "sensor".into(),
            candidate: candidate.into(),
            strategy: strategy.into(),
            steps: steps.into(),
            step_interval_seconds: "60".into(),
            split: split.into(),
            guards: "error_rate<0.02\n\n p99_ms<40 ".into(),
            min_requests: String::new(),
        }
    }

    #[test]
    fn a_canary_form_becomes_the_apis_request() {
        let r = form("canary", "10, 50,100", "", "2").request().unwrap();
        assert_eq!((r.group.as_str(), r.candidate, r.strategy), ("plant", 2, Strategy::Canary));
        assert_eq!(r.steps, Some(vec![10.0, 50.0, 100.0]));
        assert_eq!(r.step_interval_seconds, Some(60));
        assert_eq!(r.split, None);
        assert_eq!(r.guards, vec!["error_rate<0.02", "p99_ms<40"]);
        assert_eq!(r.min_requests, None);
    }

    #[test]
    fn an_ab_form_keeps_only_its_split() {
        let r = form("ab", "10,100", "30", "3").request().unwrap();
        assert_eq!((r.steps, r.step_interval_seconds, r.split), (None, None, Some(30.0)));
    }

    #[test]
    fn bad_fields_are_named() {
        assert_eq!(
            form("blue", "", "", "2").request().unwrap_err(),
            "strategy \"blue\": choose canary, ab or shadow"
        );
        assert_eq!(
            form("canary", "", "", "two").request().unwrap_err(),
            "candidate version: \"two\" is not a number"
        );
        assert_eq!(
            form("canary", "", "", " ").request().unwrap_err(),
            "candidate version: enter the version to try"
        );
        assert_eq!(
            form("canary", "10,x", "", "2").request().unwrap_err(),
            "canary steps: \"x\" is not a number"
        );
    }
}
