//! The rollout routes: `POST /v1/rollouts` (start), `GET /v1/rollouts` (list, newest
//! first), `GET /v1/groups/{group}/rollouts/{model}` (status of the latest) and
//! `POST /v1/groups/{group}/rollouts/{model}/{promote|abort|pause|resume}`. Every change
//! sends the group's connected agents their new documents at once.

use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use falaj_common::time::Timestamp;
use serde::Deserialize;

use super::{ActError, Action, OPERATOR, Rollout, RolloutView, StartError, StartRequest};
use crate::admin::{Api, ApiError, ApiResult, json_response};
use crate::auth::{Permission as P, Routes};
use crate::sql::Backend;

/// The routes, each with the permission it needs.
pub fn routes() -> Routes {
    Routes::new()
        .get("/v1/rollouts", P::ReadFleet, list)
        .post("/v1/rollouts", P::ManageRollouts, start)
        .get("/v1/groups/{group}/rollouts/{model}", P::ReadFleet, status)
        .post("/v1/groups/{group}/rollouts/{model}/{action}", P::ManageRollouts, act)
}

fn start_error(e: &StartError) -> ApiError {
    let (status, code) = match e {
        StartError::Share(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_share"),
        StartError::Guard(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_guard"),
        StartError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_rollout"),
        StartError::NoBundle { .. } => (StatusCode::NOT_FOUND, "not_found"),
        StartError::NoDeployment { .. } => (StatusCode::CONFLICT, "no_deployment"),
        StartError::CandidateIsBaseline { .. } => (StatusCode::CONFLICT, "candidate_is_baseline"),
        StartError::Exists { .. } => (StatusCode::CONFLICT, "rollout_exists"),
    };
    ApiError::new(status, code, e.to_string())
}

/// The status of `rollout` now, with each agent's session.
pub(crate) async fn view(api: &Api, rollout: Rollout) -> ApiResult<RolloutView> {
    api.shared.flush_seen().await?;
    let now = Timestamp::from_system(SystemTime::now());
    let mut view = api.shared.db.run(move |sql| super::view::build(&sql, rollout, now)).await?;
    // On PostgreSQL an agent may hold its session with another replica: one heard from
    // within three heartbeats counts as connected too, as in the fleet view.
    let replicas = api.shared.db.backend() == Backend::Postgres;
    let window =
        (api.shared.policy.heartbeat * 3).max(Duration::from_secs(2)) + Duration::from_millis(999);
    for agent in &mut view.agents {
        let elsewhere = replicas && agent.last_seen.is_some_and(|t| t.saturating_add(window) > now);
        agent.connected = api.shared.connected(&agent.id) || elsewhere;
    }
    Ok(view)
}

async fn start(State(api): State<Api>, body: String) -> ApiResult<Response> {
    let request: StartRequest = serde_json::from_str(&body).map_err(|e| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_rollout", e.to_string())
    })?;
    Ok(json_response(StatusCode::CREATED, &start_rollout(&api, &request).await?))
}

/// Starts the rollout `request` asks for and sends the group its documents (the API's
/// and the console's service); its status.
pub(crate) async fn start_rollout(api: &Api, request: &StartRequest) -> ApiResult<RolloutView> {
    let planned = request.plan().map_err(|e| start_error(&e))?;
    let now = SystemTime::now();
    let at = Timestamp::from_system(now);
    let started = api
        .shared
        .db
        .run(move |sql| {
            let tx = sql.transaction_immediate()?;
            let started = super::start(&tx, &planned, at)?;
            if started.is_ok() {
                tx.commit()?;
            }
            Ok(started)
        })
        .await?
        .map_err(|e| start_error(&e))?;
    tracing::info!(
        rollout = %started.id, group = %started.group, model = %started.model,
        baseline = started.baseline, candidate = started.candidate,
        strategy = started.strategy.name(), "rollout started"
    );
    api.shared.push_desired(Some(&started.group), now).await?;
    view(api, started).await
}

#[derive(Debug, Deserialize)]
struct ListParams {
    group: Option<String>,
    model: Option<String>,
}

async fn list(State(api): State<Api>, Query(params): Query<ListParams>) -> ApiResult<Response> {
    let rollouts = api
        .shared
        .db
        .run(move |sql| super::list(&sql, params.group.as_deref(), params.model.as_deref()))
        .await?;
    Ok(json_response(StatusCode::OK, &rollouts))
}

async fn status(
    State(api): State<Api>,
    Path((group, model)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (g, m) = (group.clone(), model.clone());
    let Some(rollout) = api.shared.db.run(move |sql| super::latest(&sql, &g, &m)).await? else {
        return Err(ApiError::not_found(format!("no rollout of {model} in group {group}")));
    };
    Ok(json_response(StatusCode::OK, &view(&api, rollout).await?))
}

async fn act(
    State(api): State<Api>,
    Path((group, model, action)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let Some(action) = Action::from_name(&action) else {
        return Err(ApiError::not_found(format!(
            "no rollout action {action:?}: promote, abort, pause or resume"
        )));
    };
    Ok(json_response(StatusCode::OK, &act_on(&api, group, model, action).await?))
}

/// Applies `action` to the rollout of `model` under way in `group` and sends the group
/// its documents (the API's and the console's service); the status after.
pub(crate) async fn act_on(
    api: &Api,
    group: String,
    model: String,
    action: Action,
) -> ApiResult<RolloutView> {
    let now = SystemTime::now();
    let at = Timestamp::from_system(now);
    let (g, m) = (group.clone(), model.clone());
    let done = api
        .shared
        .db
        .run(move |sql| {
            let tx = sql.transaction_immediate()?;
            let done = super::act(&tx, &g, &m, action, OPERATOR, at)?;
            if done.is_ok() {
                tx.commit()?;
            }
            Ok(done)
        })
        .await?
        .map_err(|e| match e {
            ActError::NoRollout { .. } => ApiError::not_found(e.to_string()),
            ActError::NotAllowed { .. } => {
                ApiError::new(StatusCode::CONFLICT, "not_allowed", e.to_string())
            }
        })?;
    tracing::info!(
        rollout = %done.id, %group, %model, action = action.name(), state = done.state.name(),
        "rollout changed by an operator"
    );
    api.shared.push_desired(Some(&group), now).await?;
    view(api, done).await
}
