//! The admin API: JSON over HTTP under `/v1`. Its handlers translate: a request in, a
//! call to a service ([`crate::service`]) or a query, the view type or the error out as
//! JSON (`{"error": {"code", "message"}}`). Every route declares the permission it needs
//! ([`routes`]); a bearer token (a user's session, an API token, or the bootstrap admin
//! token) says who calls, and its role whether it may ([`crate::auth`]). The CLI uses it
//! through [`crate::client`]; the admin console ([`crate::console`], under `/`) calls the
//! same services directly.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use falaj_common::metrics::VersionSummary;
use falaj_common::names;
use falaj_common::time::Timestamp;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::alerts::AlertEvent;
use crate::auth::{Access, Permission as P, Routes};
use crate::db;
use crate::exporter::{Exporter, Stored};
use crate::monitoring::{self, MetricsQuery};
use crate::service::resign::{self, ReSignRequest};
use crate::service::{ServiceError, bundles, deploy, fleet};
use crate::state::Shared;

pub use crate::service::bundles::{BundleView, PushedView};
pub use crate::service::deploy::DeploymentView;
pub use crate::service::fleet::{AgentView, NewEnrollmentToken, RevokedView, StatusView};
pub use crate::service::resign::ReSignedView;

/// The API's state: shared daemon state, the admin token, where pushes are staged.
#[derive(Debug, Clone)]
pub struct Api {
    /// Daemon state.
    pub shared: Arc<Shared>,
    /// The bootstrap admin token (`DATA_DIR/admin.token`): break-glass access as an admin.
    pub token: Arc<String>,
    /// How sessions live and when logins lock out.
    pub auth: crate::auth::AuthConfig,
    /// Directory for pushed bundles before they are verified.
    pub staging: Arc<std::path::PathBuf>,
    /// Largest bundle accepted.
    pub max_bundle_bytes: u64,
    /// Longest an upload may pause between two pieces of its body.
    pub body_timeout: Duration,
    /// The feature store.
    pub features: crate::features::FeatureStore,
    /// What the admin console shows of the daemon.
    pub console: Arc<crate::console::Site>,
}

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<serde_json::Value>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), details: None }
    }

    /// Adds structured details (a report) to the error body.
    pub(crate) fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// The status it answers with.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// What it tells the caller (a 5xx says only "internal error").
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn internal(err: impl std::fmt::Display) -> Self {
        tracing::error!(error = %err, "admin API internal error");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let Some(details) = self.details {
            body["error"]["details"] = details;
        }
        (self.status, [(header::CONTENT_TYPE, "application/json")], body.to_string())
            .into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(err: ServiceError) -> Self {
        match err {
            ServiceError::Invalid(message) => Self::bad_request(message),
            ServiceError::NotFound(message) => Self::not_found(message),
            ServiceError::Conflict { code, message } => {
                Self::new(StatusCode::CONFLICT, code, message)
            }
            ServiceError::Refused(message) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "refused", message)
            }
            ServiceError::Internal(message) => Self::internal(message),
        }
    }
}

impl From<db::DbError> for ApiError {
    fn from(err: db::DbError) -> Self {
        Self::internal(err)
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

pub(crate) fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(value).unwrap_or_default(),
    )
        .into_response()
}

/// Every route of the API and the access it requires, declared together: health, the
/// Prometheus exposition and login are public, every other route names the permission it
/// needs ([`crate::auth::rules`] says which roles hold it).
///
/// A module adds its routes as a `routes() -> Routes` function merged here, each with
/// its permission (`.get("/v1/audit", Permission::ReadAudit, handler)`).
pub fn routes() -> Routes {
    Routes::new()
        .get("/v1/health", Access::Public, health)
        .get("/metrics", Access::Public, prometheus)
        .get("/v1/status", P::ReadFleet, status)
        .post("/v1/bundles", P::ManageBundles, push_bundle)
        .get("/v1/bundles", P::ReadFleet, list_bundles)
        .post("/v1/bundles/re-sign", P::RotateKeys, re_sign_bundles)
        .post("/v1/tokens", P::CreateEnrollmentTokens, create_token)
        .get("/v1/agents", P::ReadFleet, list_agents)
        .post("/v1/agents/{id}/revoke", P::RevokeAgents, revoke_agent)
        .get("/v1/deployments", P::ReadFleet, list_deployments)
        .put("/v1/groups/{group}/deployments/{name}", P::Deploy, deploy)
        .delete("/v1/groups/{group}/deployments/{name}", P::Deploy, undeploy)
        .get("/v1/metrics", P::ReadFleet, metrics)
        .get("/v1/alerts", P::ReadFleet, alerts)
        .get("/v1/audit", P::ReadAudit, crate::audit::api::list)
        .get("/v1/audit/export", P::ReadAudit, crate::audit::api::export)
        .get("/v1/audit/key", P::ReadAudit, crate::audit::api::key)
        .get("/v1/agents/{id}/audit", P::ReadAudit, crate::audit::api::agent)
        .merge(crate::auth::api::routes())
        .merge(crate::features::api::routes())
        .merge(crate::finetune::api::routes())
        .merge(crate::rollouts::api::routes())
}

/// The API's router: [`routes`] behind the authentication and authorisation gate
/// ([`crate::auth::gate`]). Serve it with `into_make_service_with_connect_info::<SocketAddr>()`
/// so audit entries and login lockouts know the caller's address.
pub fn router(api: Api) -> Router {
    routes().finish(api.clone()).merge(crate::console::router(api))
}

async fn health() -> Response {
    json_response(StatusCode::OK, &json!({"status": "ok"}))
}

async fn status(State(api): State<Api>) -> ApiResult<Response> {
    Ok(json_response(StatusCode::OK, &fleet::status(&api.shared).await?))
}

async fn list_bundles(State(api): State<Api>) -> ApiResult<Response> {
    Ok(json_response(StatusCode::OK, &bundles::bundles(&api.shared).await?))
}

async fn push_bundle(State(api): State<Api>, body: Body) -> ApiResult<Response> {
    // Nothing of the body is trusted until verified.
    let staged = stage(&api, body, "push-", "bundle").await?;
    let (row, new_chunks, created) = bundles::register(&api.shared, staged.path()).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(json_response(status, &PushedView { bundle: BundleView::from(&row), new_chunks, created }))
}

async fn re_sign_bundles(
    State(api): State<Api>,
    body: axum::Json<ReSignRequest>,
) -> ApiResult<Response> {
    let views = resign::re_sign(&api.shared, &body, &api.staging).await?;
    Ok(json_response(StatusCode::OK, &views))
}

/// Streams a request body to a file in the staging directory (removed when dropped),
/// refusing bodies over the bundle size limit; `what` names it in errors.
pub(crate) async fn stage(
    api: &Api,
    mut body: Body,
    prefix: &str,
    what: &str,
) -> ApiResult<tempfile::NamedTempFile> {
    std::fs::create_dir_all(&*api.staging).map_err(ApiError::internal)?;
    let staged = tempfile::Builder::new()
        .prefix(prefix)
        .tempfile_in(&*api.staging)
        .map_err(ApiError::internal)?;
    let mut file = tokio::fs::File::from_std(staged.reopen().map_err(ApiError::internal)?);
    // A full disk is the operator's to fix, so the answer says which (nothing was kept:
    // the staged file goes when dropped).
    let write_error = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::StorageFull {
            tracing::error!(error = %e, dir = %api.staging.display(), "upload refused: the disk is full");
            ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "storage_full",
                format!(
                    "{what}: the control plane's staging directory {} is full ({e}): nothing was \
                     stored; free space on its data disk and send it again",
                    api.staging.display()
                ),
            )
        } else {
            ApiError::internal(e)
        }
    };
    let mut size = 0u64;
    let mut failed = None;
    loop {
        // A client that stops sending holds its connection and staged file no longer.
        let Ok(frame) = tokio::time::timeout(api.body_timeout, body.frame()).await else {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("{what}: nothing received for {:?}", api.body_timeout),
            ));
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        let Ok(bytes) = frame.into_data() else { continue };
        size += bytes.len() as u64;
        if size > api.max_bundle_bytes {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("{what} exceeds {} bytes", api.max_bundle_bytes),
            ));
        }
        if failed.is_none()
            && let Err(e) = file.write_all(&bytes).await
        {
            // The rest of the body is read and dropped, so that the client, still
            // sending, gets the answer rather than a broken pipe; what was staged goes
            // at once to give the space back.
            failed = Some(write_error(e));
            let _ = file.set_len(0).await;
        }
    }
    if let Some(failed) = failed {
        return Err(failed);
    }
    file.flush().await.map_err(write_error)?;
    file.sync_all().await.map_err(write_error)?;
    Ok(staged)
}

#[derive(Debug, Deserialize)]
struct CreateToken {
    group: String,
    ttl_seconds: u64,
}

async fn create_token(
    State(api): State<Api>,
    body: axum::Json<CreateToken>,
) -> ApiResult<Response> {
    let created = fleet::enrollment_token(&api.shared, &body.group, body.ttl_seconds).await?;
    Ok(json_response(StatusCode::CREATED, &created))
}

async fn list_agents(State(api): State<Api>) -> ApiResult<Response> {
    Ok(json_response(StatusCode::OK, &fleet::agent_views(&api.shared).await?))
}

async fn revoke_agent(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(json_response(StatusCode::OK, &fleet::revoke(&api.shared, &id).await?))
}

#[derive(Debug, Deserialize)]
struct Deploy {
    version: u64,
}

async fn deploy(
    State(api): State<Api>,
    Path((group, name)): Path<(String, String)>,
    body: axum::Json<Deploy>,
) -> ApiResult<Response> {
    deploy::deploy_version(&api.shared, &group, &name, body.version).await?;
    Ok(json_response(StatusCode::OK, &DeploymentView { group, name, version: body.version }))
}

async fn undeploy(
    State(api): State<Api>,
    Path((group, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    deploy::undeploy(&api.shared, &group, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_deployments(State(api): State<Api>) -> ApiResult<Response> {
    Ok(json_response(StatusCode::OK, &deploy::deployments(&api.shared).await?))
}

#[derive(Debug, Deserialize)]
struct MetricsParams {
    model: String,
    version: Option<u64>,
    group: Option<String>,
    agent: Option<String>,
    /// A duration like `15m` or `1h`: windows starting within it.
    since: Option<String>,
}

/// What `GET /v1/metrics` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct MetricsView {
    pub model: String,
    /// Windows starting at or after this time were rolled up.
    pub since: Timestamp,
    /// One summary per version seen.
    pub versions: Vec<VersionSummary>,
}

async fn metrics(
    State(api): State<Api>,
    Query(params): Query<MetricsParams>,
) -> ApiResult<Response> {
    names::check_model_name(&params.model)
        .map_err(|e| ApiError::bad_request(format!("model: {e}")))?;
    let since = humantime::parse_duration(params.since.as_deref().unwrap_or("1h"))
        .map_err(|e| ApiError::bad_request(format!("since: {e}")))?;
    let now = SystemTime::now();
    let query = MetricsQuery {
        since: Timestamp::from_system(now.checked_sub(since).unwrap_or(SystemTime::UNIX_EPOCH)),
        model: params.model,
        version: params.version,
        group: params.group,
        agent: params.agent,
    };
    let view_since = query.since;
    let model = query.model.clone();
    let versions = api.shared.db.run(move |sql| monitoring::summaries(&sql, &query)).await?;
    Ok(json_response(StatusCode::OK, &MetricsView { model, since: view_since, versions }))
}

#[derive(Debug, Deserialize)]
struct AlertsParams {
    limit: Option<u64>,
}

/// An alert firing now.
#[derive(Debug, Serialize, Deserialize)]
pub struct FiringView {
    pub rule: String,
    /// What it is about.
    pub subject: String,
    /// Since when.
    pub since: Timestamp,
    /// The value that fired it.
    pub value: f64,
}

/// A webhook notification not yet delivered ([`crate::outbox`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotificationView {
    /// What it tells: `alert RULE SUBJECT STATE` or `rollout ID rolled back`.
    pub what: String,
    /// Where it goes: the webhook's scheme, host and port only, as its path (or user
    /// part) often holds a token.
    pub to: String,
    /// When it was recorded.
    pub recorded: Timestamp,
    /// Attempts made, all failed.
    pub attempts: u32,
    /// When the next is due.
    pub next_at: Timestamp,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

impl From<crate::outbox::Pending> for NotificationView {
    fn from(p: crate::outbox::Pending) -> Self {
        let to = match p.url.parse::<axum::http::Uri>() {
            Ok(uri) => match (uri.scheme_str(), uri.authority()) {
                (Some(scheme), Some(authority)) => match authority.port_u16() {
                    Some(port) => format!("{scheme}://{}:{port}", authority.host()),
                    None => format!("{scheme}://{}", authority.host()),
                },
                _ => "(a URL without a host)".into(),
            },
            Err(_) => "(not a URL)".into(),
        };
        Self {
            what: p.what,
            to,
            recorded: p.recorded,
            attempts: p.attempts,
            next_at: p.next_at,
            last_error: p.last_error,
        }
    }
}

/// What `GET /v1/alerts` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct AlertsView {
    /// Alerts firing now.
    pub firing: Vec<FiringView>,
    /// The latest events, newest first.
    pub events: Vec<AlertEvent>,
    /// Webhook notifications waiting (alerts' and rollbacks'), the oldest first, at most
    /// as many as events asked for.
    #[serde(default)]
    pub notifications: Vec<NotificationView>,
}

async fn alerts(State(api): State<Api>, Query(params): Query<AlertsParams>) -> ApiResult<Response> {
    let limit = params.limit.unwrap_or(50).clamp(1, 10_000);
    let (firing, events, waiting) = api
        .shared
        .db
        .run(move |sql| {
            let waiting = crate::outbox::pending(&sql, usize::try_from(limit).unwrap_or(10_000))?;
            Ok((crate::alerts::firing(&sql)?, crate::alerts::events(&sql, limit)?, waiting))
        })
        .await?;
    let firing = firing
        .into_iter()
        .map(|(rule, subject, since, value)| FiringView { rule, subject, since, value })
        .collect();
    let notifications = waiting.into_iter().map(NotificationView::from).collect();
    Ok(json_response(StatusCode::OK, &AlertsView { firing, events, notifications }))
}

/// The Prometheus exposition. Unauthenticated, like most exporters: it carries counts,
/// not secrets, and the admin listener stays on loopback.
async fn prometheus(State(api): State<Api>) -> ApiResult<Response> {
    api.shared.flush_seen().await?;
    let stored = api
        .shared
        .db
        .run(|sql| {
            let agents = db::agents(&sql)?;
            Ok(Stored {
                agents: agents.iter().filter(|a| a.revoked_at.is_none()).count() as u64,
                agents_with_errors: agents
                    .iter()
                    .filter(|a| {
                        a.revoked_at.is_none()
                            && a.actual.as_ref().is_some_and(|s| !s.errors.is_empty())
                    })
                    .count() as u64,
                alerts_firing: crate::alerts::firing(&sql)?.len() as u64,
                notifications: crate::outbox::backlog(&sql)?,
                rollouts: crate::rollouts::latest_each(&sql)?,
            })
        })
        .await?;
    let text =
        falaj_common::exposition::render(Exporter { shared: Arc::clone(&api.shared), stored });
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}
