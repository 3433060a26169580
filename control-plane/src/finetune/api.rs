//! The fine-tune routes, under `/v1/finetune`: order a job for an agent, list jobs, show
//! one with the agent's report.

use std::time::SystemTime;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use falaj_common::finetune::{DesiredJob, Job};
use falaj_common::names;
use falaj_common::time::Timestamp;
use serde::Deserialize;

use crate::admin::{Api, ApiError, ApiResult, json_response};
use crate::auth::{Permission as P, Routes};
use crate::db;

/// The routes, each with the permission it needs.
pub fn routes() -> Routes {
    Routes::new()
        .get("/v1/finetune", P::ReadFleet, list)
        .post("/v1/finetune", P::OrderFinetune, order)
        .get("/v1/finetune/{id}", P::ReadFleet, show)
}

/// The body of an order.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Order {
    /// The agent that runs it (with its data).
    agent: String,
    /// The job's id; default `ft-N`.
    #[serde(default)]
    id: Option<String>,
    /// Whether the trained head's weights may leave the site.
    #[serde(default)]
    share_weights: bool,
    /// What to do.
    job: Job,
}

async fn order(State(api): State<Api>, body: String) -> ApiResult<Response> {
    let order: Order = serde_json::from_str(&body).map_err(|e| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_job", e.to_string())
    })?;
    order
        .job
        .check()
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_job", e))?;
    if let Some(id) = &order.id {
        names::check_model_name(id).map_err(|e| ApiError::bad_request(format!("job id: {e}")))?;
    }
    let now = SystemTime::now();
    let at = Timestamp::from_system(now);
    let agent = order.agent.clone();
    let placed = api
        .shared
        .db
        .run(move |sql| {
            let tx = sql.transaction()?;
            let Some(row) = db::agent(&tx, &order.agent)? else { return Ok(Err(None)) };
            let id = match order.id {
                Some(id) => id,
                None => super::next_id(&tx)?,
            };
            let job = DesiredJob { id, job: order.job, share_weights: order.share_weights };
            if !super::order(&tx, &order.agent, &job, at)? {
                return Ok(Err(Some(job.id)));
            }
            tx.commit()?;
            Ok(Ok((row.group, job.id)))
        })
        .await?;
    let (group, id) = match placed {
        Ok(placed) => placed,
        Err(None) => return Err(ApiError::not_found(format!("no agent {agent:?}"))),
        Err(Some(id)) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "job_exists",
                format!("job {id} exists"),
            ));
        }
    };
    api.shared.push_desired(Some(&group), now).await?;
    tracing::info!(job = %id, %agent, "fine-tune job ordered");
    let row = api.shared.db.run(move |sql| super::get(&sql, &id)).await?;
    Ok(json_response(StatusCode::CREATED, &row))
}

async fn list(State(api): State<Api>) -> ApiResult<Response> {
    let rows = api.shared.db.run(|sql| super::list(&sql)).await?;
    Ok(json_response(StatusCode::OK, &rows))
}

async fn show(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<Response> {
    let wanted = id.clone();
    match api.shared.db.run(move |sql| super::get(&sql, &wanted)).await? {
        Some(row) => Ok(json_response(StatusCode::OK, &row)),
        None => Err(ApiError::not_found(format!("no fine-tune job {id:?}"))),
    }
}
