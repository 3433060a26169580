//! The audit routes, under `/v1/audit`: the latest entries (filtered), the export
//! (JSON lines, ending with a checkpoint signed for it) and the audit key's public half;
//! and `/v1/agents/{id}/audit`, an agent's own chain as it shipped it.

use std::time::SystemTime;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use falaj_common::time::Timestamp;

use super::AuditQuery;
use crate::admin::{Api, ApiError, ApiResult, json_response};

/// `GET /v1/audit?since=&actor=&action=&limit=`: entries, oldest first.
pub async fn list(State(api): State<Api>, Query(query): Query<AuditQuery>) -> ApiResult<Response> {
    let entries = api.shared.db.run(move |sql| super::list(&sql, &query)).await?;
    Ok(json_response(StatusCode::OK, &entries))
}

/// `GET /v1/audit/export`: the whole chain as JSON lines, verifiable offline.
pub async fn export(State(api): State<Api>) -> ApiResult<Response> {
    let key = std::sync::Arc::clone(&api.shared.audit_key);
    let at = Timestamp::from_system(SystemTime::now());
    let lines = api.shared.db.run(move |sql| super::export(&sql, &key, at)).await?;
    let mut body = lines.join("\n");
    body.push('\n');
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// `GET /v1/audit/key`: the public key checkpoints are signed with (hex).
pub async fn key(State(api): State<Api>) -> Response {
    let key = api.shared.audit_key.public();
    json_response(
        StatusCode::OK,
        &serde_json::json!({"key": key.to_string(), "id": key.id().to_string()}),
    )
}

/// `GET /v1/agents/{id}/audit`: the agent's chain as stored (JSON lines, checked link by
/// link on arrival; the agent's own checkpoints are in its exports).
pub async fn agent(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<Response> {
    let agent = id.clone();
    let (known, lines) = api
        .shared
        .db
        .run(move |sql| {
            Ok((crate::db::agent(&sql, &agent)?.is_some(), super::agents::lines(&sql, &agent)?))
        })
        .await?;
    if !known {
        return Err(ApiError::not_found(format!("no agent {id:?}")));
    }
    let mut body = lines.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}
