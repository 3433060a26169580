//! The admin API: JSON over HTTP under `/v1`. Every route declares the permission it
//! needs ([`routes`]); a bearer token (a user's session, an API token, or the bootstrap
//! admin token) says who calls, and its role whether it may ([`crate::auth`]). The CLI
//! uses it; the admin console ([`crate::console`], under `/`) calls the same services. Errors are `{"error": {"code", "message"}}`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use falaj_common::audit::Outcome;
use falaj_common::enrollment::EnrollmentToken;
use falaj_common::metrics::VersionSummary;
use falaj_common::names;
use falaj_common::protocol::EngineReport;
use falaj_common::time::Timestamp;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::alerts::AlertEvent;
use crate::auth::{Access, Permission as P, Routes};
use crate::db::{self, AgentRow, BundleRow, TokenRow};
use crate::exporter::{Exporter, Stored};
use crate::monitoring::{self, MetricsQuery};
use crate::push;
use crate::state::Shared;

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

/// What `GET /v1/status` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    /// The control plane's region.
    pub region: String,
    /// Its software version.
    pub version: String,
    /// The agents' CA certificate's SHA-256 fingerprint.
    pub ca_sha256: String,
    /// Agents enrolled (revoked ones included).
    pub agents: u64,
    /// Agents with a session open now.
    pub connected: u64,
    /// Bundles registered.
    pub bundles: u64,
}

async fn status(State(api): State<Api>) -> ApiResult<Response> {
    let (agents, bundles) = api.shared.db.call(|c| Ok((db::agents(c)?, db::bundles(c)?))).await?;
    let connected =
        api.shared.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len();
    Ok(json_response(
        StatusCode::OK,
        &StatusView {
            region: api.shared.region.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ca_sha256: api.shared.ca.fingerprint().to_string(),
            agents: agents.len() as u64,
            connected: connected as u64,
            bundles: bundles.len() as u64,
        },
    ))
}

/// A bundle as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BundleView {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// File size.
    pub size: u64,
    /// Chunks.
    pub chunks: u64,
    /// Manifest hash.
    pub manifest_sha256: String,
    /// When pushed.
    pub pushed_at: String,
}

impl From<&BundleRow> for BundleView {
    fn from(b: &BundleRow) -> Self {
        Self {
            name: b.name.clone(),
            version: b.version,
            size: b.size,
            chunks: b.chunks,
            manifest_sha256: b.manifest_sha256.to_string(),
            pushed_at: b.pushed_at.to_string(),
        }
    }
}

async fn list_bundles(State(api): State<Api>) -> ApiResult<Response> {
    let bundles = api.shared.db.call(|c| db::bundles(c)).await?;
    Ok(json_response(StatusCode::OK, &bundles.iter().map(BundleView::from).collect::<Vec<_>>()))
}

async fn push_bundle(State(api): State<Api>, body: Body) -> ApiResult<Response> {
    // Nothing of the body is trusted until verified.
    let staged = stage(&api, body, "push-", "bundle").await?;
    let (row, new_chunks, created) = register(&api, staged.path()).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok(json_response(status, &PushedView { bundle: BundleView::from(&row), new_chunks, created }))
}

/// What `POST /v1/bundles` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PushedView {
    /// The bundle registered.
    pub bundle: BundleView,
    /// Chunks the control plane did not hold before.
    pub new_chunks: u64,
    /// Whether it was new (false: the same bundle was already registered).
    pub created: bool,
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

/// Verifies, chunks and records the bundle file at `path` (a push, or a snapshot the
/// control plane built): the row, the chunks that were new, and whether it was new.
pub(crate) async fn register(
    api: &Api,
    path: &std::path::Path,
) -> ApiResult<(BundleRow, u64, bool)> {
    let shared = Arc::clone(&api.shared);
    let path = path.to_owned();
    let pushed = tokio::task::spawn_blocking(move || {
        push::push_file(
            &path,
            &shared.trust,
            &shared.region,
            shared.blobs.as_ref(),
            SystemTime::now(),
        )
    })
    .await
    .map_err(ApiError::internal)?;
    let pushed = match pushed {
        Ok(pushed) => pushed,
        Err(push::PushError::Refused(e)) => {
            // A refused bundle is a security event: who tried to push what, and why not.
            let (at, reason) = (Timestamp::from_system(SystemTime::now()), e.to_string());
            let details = json!({ "reason": reason });
            api.shared
                .db
                .call(move |c| {
                    crate::audit::record(c, at, "push", "bundle", Outcome::Refused, details)
                })
                .await?;
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "refused", e.to_string()));
        }
        Err(e @ push::PushError::Io { .. }) => return Err(ApiError::internal(e)),
    };
    let row = pushed.row.clone();
    let existing = {
        let row = row.clone();
        let reference = pushed.manifest.model().and_then(|m| m.reference.clone());
        api.shared
            .db
            .call(move |c| {
                let tx = c.transaction()?;
                let existing = db::bundle(&tx, &row.name, row.version)?;
                if existing.is_none() {
                    db::insert_bundle(&tx, &row)?;
                    if let Some(profile) = reference.as_ref() {
                        monitoring::set_reference(&tx, &row.name, row.version, profile)?;
                    }
                }
                tx.commit()?;
                Ok(existing)
            })
            .await?
    };
    let created = match existing {
        Some(e) if e.manifest_sha256 != row.manifest_sha256 => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "{}@{} is already registered with different content",
                    row.name, row.version
                ),
            ));
        }
        Some(_) => false,
        None => true,
    };
    tracing::info!(name = %row.name, version = row.version, size = row.size, new_chunks = pushed.new_chunks, "bundle registered");
    Ok((row, pushed.new_chunks, created))
}

#[derive(Debug, Deserialize)]
struct CreateToken {
    group: String,
    ttl_seconds: u64,
}

/// A new enrollment token, shown once: what `POST /v1/tokens` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewEnrollmentToken {
    /// The token as `falaj-agent enroll --token` takes it.
    pub token: String,
    /// Its public id.
    pub id: String,
    /// The group agents enrolled with it join.
    pub group: String,
    /// The region.
    pub region: String,
    /// When it expires.
    pub expires: String,
}

async fn create_token(
    State(api): State<Api>,
    body: axum::Json<CreateToken>,
) -> ApiResult<Response> {
    let created = enrollment_token(&api, &body.group, body.ttl_seconds).await?;
    Ok(json_response(StatusCode::CREATED, &created))
}

/// Creates a one-time enrollment token for `group`, valid `ttl_seconds` (the API's and
/// the console's service).
pub(crate) async fn enrollment_token(
    api: &Api,
    group: &str,
    ttl_seconds: u64,
) -> ApiResult<NewEnrollmentToken> {
    names::check_model_name(group).map_err(|e| ApiError::bad_request(format!("group: {e}")))?;
    if ttl_seconds == 0 || ttl_seconds > 30 * 24 * 3600 {
        return Err(ApiError::bad_request("ttl_seconds must be between 1 and 2592000 (30 days)"));
    }
    let (id, secret) = (crate::secrets::random::<16>(), crate::secrets::random::<32>());
    let now = Timestamp::from_system(SystemTime::now());
    let token = EnrollmentToken {
        id,
        secret,
        region: api.shared.region.clone(),
        group: group.to_owned(),
        ca_sha256: api.shared.ca.fingerprint(),
        expires: now.saturating_add(Duration::from_secs(ttl_seconds)),
    };
    let row = TokenRow {
        id: token.id_hex(),
        group: token.group.clone(),
        region: token.region.clone(),
        expires: token.expires,
    };
    let secret_sha = token.secret_sha256();
    api.shared.db.call(move |c| db::insert_token(c, &row, secret_sha, now)).await?;
    Ok(NewEnrollmentToken {
        token: token.to_string(),
        id: token.id_hex(),
        group: token.group,
        region: token.region,
        expires: token.expires.to_string(),
    })
}

/// An agent as the fleet view shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentView {
    /// Id.
    pub id: String,
    /// Host name.
    pub hostname: String,
    /// Group.
    pub group: String,
    /// Region.
    pub region: String,
    /// `connected`, `offline` or `revoked`.
    pub status: String,
    /// Last report.
    pub last_seen: Option<String>,
    /// Software version.
    pub agent_version: String,
    /// Version of the last desired-state document it applied.
    pub applied_version: Option<u64>,
    /// Held bundles as `name@version`.
    pub held: Vec<String>,
    /// Active bundles as `name@version`.
    pub active: Vec<String>,
    /// Reconciliation errors.
    pub errors: Vec<String>,
    /// Whether every active model is loaded and serving, as last reported.
    pub ready: bool,
    /// The engines it can serve on, as last reported.
    #[serde(default)]
    pub engines: Vec<EngineReport>,
    /// The engine serving each loaded active version, by `name@version`.
    #[serde(default)]
    pub serving: BTreeMap<String, String>,
    /// The trust-root version it verifies against (0 before its first report).
    #[serde(default)]
    pub trust_version: u64,
}

fn agent_view(row: AgentRow, connected: bool, now: Timestamp, heartbeat: Duration) -> AgentView {
    // Three missed reports make an agent offline; timestamps have whole seconds, so the
    // window is rounded up to at least two of them.
    let window = (heartbeat * 3).max(Duration::from_secs(2)) + Duration::from_millis(999);
    let fresh = row.last_seen.is_some_and(|t| t.saturating_add(window) > now);
    let status = if row.revoked_at.is_some() {
        "revoked"
    } else if connected && fresh {
        "connected"
    } else {
        "offline"
    };
    let actual = row.actual.unwrap_or_default();
    AgentView {
        id: row.id,
        hostname: row.hostname,
        group: row.group,
        region: row.region,
        status: status.into(),
        last_seen: row.last_seen.map(|t| t.to_string()),
        agent_version: row.agent_version,
        applied_version: actual.desired_version,
        held: actual.bundles.iter().map(|b| format!("{}@{}", b.name, b.version)).collect(),
        active: actual
            .bundles
            .iter()
            .filter(|b| b.active)
            .map(|b| format!("{}@{}", b.name, b.version))
            .collect(),
        serving: actual
            .bundles
            .iter()
            .filter(|b| b.active)
            .filter_map(|b| Some((format!("{}@{}", b.name, b.version), b.engine.clone()?)))
            .collect(),
        errors: actual.errors,
        ready: actual.ready,
        engines: actual.engines,
        trust_version: actual.trust_version,
    }
}

async fn list_agents(State(api): State<Api>) -> ApiResult<Response> {
    Ok(json_response(StatusCode::OK, &agent_views(&api).await?))
}

/// Every agent as the fleet view shows it (the API's and the console's service).
pub(crate) async fn agent_views(api: &Api) -> ApiResult<Vec<AgentView>> {
    api.shared.flush_seen().await?;
    let rows = api.shared.db.call(|c| db::agents(c)).await?;
    let now = Timestamp::from_system(SystemTime::now());
    Ok(rows
        .into_iter()
        .map(|row| {
            let connected = api.shared.connected(&row.id);
            agent_view(row, connected, now, api.shared.policy.heartbeat)
        })
        .collect())
}

async fn revoke_agent(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<Response> {
    let now = Timestamp::from_system(SystemTime::now());
    let agent = id.clone();
    if !api.shared.db.call(move |c| db::revoke(c, &agent, now)).await? {
        return Err(ApiError::not_found(format!("no agent {id:?}")));
    }
    api.shared.disconnect(&id, crate::quic::CLOSE_REFUSED, "agent revoked");
    tracing::warn!(agent = %id, "agent revoked");
    Ok(json_response(StatusCode::OK, &RevokedView { id, revoked: true }))
}

/// What `POST /v1/agents/{id}/revoke` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokedView {
    /// The agent.
    pub id: String,
    /// Always true: a refusal is an error.
    pub revoked: bool,
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
    deploy_version(&api, &group, &name, body.version).await?;
    Ok(json_response(StatusCode::OK, &DeploymentView { group, name, version: body.version }))
}

/// A model deployed to a group: what `PUT /v1/groups/{group}/deployments/{name}`
/// answers, and each item of `GET /v1/deployments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentView {
    /// The group.
    pub group: String,
    /// The model.
    pub name: String,
    /// The version the group runs.
    pub version: u64,
}

/// Makes `name@version` the version group `group` runs and pushes the new desired state
/// (refused while a rollout of it is under way); the API's and the console's service.
pub(crate) async fn deploy_version(
    api: &Api,
    group: &str,
    name: &str,
    version: u64,
) -> ApiResult<()> {
    names::check_model_name(group).map_err(|e| ApiError::bad_request(format!("group: {e}")))?;
    let now = SystemTime::now();
    let (g, n) = (group.to_owned(), name.to_owned());
    let deployed = api
        .shared
        .db
        .call(move |c| {
            let tx = c.transaction()?;
            if db::bundle(&tx, &n, version)?.is_none() {
                return Ok(Err(ApiError::not_found(format!(
                    "no bundle {n}@{version}; push it first"
                ))));
            }
            if let Some(r) = crate::rollouts::under_way(&tx, &g, &n)? {
                return Ok(Err(rollout_under_way(&r)));
            }
            db::deploy(&tx, &g, &n, version, Timestamp::from_system(now))?;
            tx.commit()?;
            Ok(Ok(()))
        })
        .await?;
    deployed?;
    api.shared.push_desired(Some(group), now).await?;
    tracing::info!(%group, %name, version, "deployed");
    Ok(())
}

async fn undeploy(
    State(api): State<Api>,
    Path((group, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let now = SystemTime::now();
    let (g, n) = (group.clone(), name.clone());
    let undeployed = api
        .shared
        .db
        .call(move |c| {
            let tx = c.transaction()?;
            if let Some(r) = crate::rollouts::under_way(&tx, &g, &n)? {
                return Ok(Err(rollout_under_way(&r)));
            }
            if !db::undeploy(&tx, &g, &n, Timestamp::from_system(now))? {
                return Ok(Err(ApiError::not_found(format!("{n} is not deployed to group {g}"))));
            }
            tx.commit()?;
            Ok(Ok(()))
        })
        .await?;
    undeployed?;
    api.shared.push_desired(Some(&group), now).await?;
    tracing::info!(%group, %name, "undeployed");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The refusal of a deployment change while a rollout of the model is under way.
fn rollout_under_way(r: &crate::rollouts::Rollout) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "rollout_under_way",
        format!(
            "rollout {} of {} in group {} is {}: promote or abort it first",
            r.id,
            r.model,
            r.group,
            r.state.name()
        ),
    )
}

async fn list_deployments(State(api): State<Api>) -> ApiResult<Response> {
    let rows = api.shared.db.call(|c| db::all_deployments(c)).await?;
    let views: Vec<_> = rows
        .into_iter()
        .map(|(group, name, version)| DeploymentView { group, name, version })
        .collect();
    Ok(json_response(StatusCode::OK, &views))
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
    /// The model.
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
    let versions = api.shared.db.call(move |c| monitoring::summaries(c, &query)).await?;
    Ok(json_response(StatusCode::OK, &MetricsView { model, since: view_since, versions }))
}

#[derive(Debug, Deserialize)]
struct AlertsParams {
    limit: Option<u64>,
}

/// An alert firing now.
#[derive(Debug, Serialize, Deserialize)]
pub struct FiringView {
    /// The rule.
    pub rule: String,
    /// What it is about.
    pub subject: String,
    /// Since when.
    pub since: Timestamp,
    /// The value that fired it.
    pub value: f64,
}

/// What `GET /v1/alerts` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct AlertsView {
    /// Alerts firing now.
    pub firing: Vec<FiringView>,
    /// The latest events, newest first.
    pub events: Vec<AlertEvent>,
}

async fn alerts(State(api): State<Api>, Query(params): Query<AlertsParams>) -> ApiResult<Response> {
    let limit = params.limit.unwrap_or(50).clamp(1, 10_000);
    let (firing, events) = api
        .shared
        .db
        .call(move |c| Ok((crate::alerts::firing(c)?, crate::alerts::events(c, limit)?)))
        .await?;
    let firing = firing
        .into_iter()
        .map(|(rule, subject, since, value)| FiringView { rule, subject, since, value })
        .collect();
    Ok(json_response(StatusCode::OK, &AlertsView { firing, events }))
}

/// The Prometheus exposition. Unauthenticated, like most exporters: it carries counts,
/// not secrets, and the admin listener stays on loopback.
async fn prometheus(State(api): State<Api>) -> ApiResult<Response> {
    api.shared.flush_seen().await?;
    let stored = api
        .shared
        .db
        .call(|c| {
            let agents = db::agents(c)?;
            Ok(Stored {
                agents: agents.iter().filter(|a| a.revoked_at.is_none()).count() as u64,
                agents_with_errors: agents
                    .iter()
                    .filter(|a| {
                        a.revoked_at.is_none()
                            && a.actual.as_ref().is_some_and(|s| !s.errors.is_empty())
                    })
                    .count() as u64,
                alerts_firing: crate::alerts::firing(c)?.len() as u64,
                rollouts: crate::rollouts::latest_each(c)?,
            })
        })
        .await?;
    let text =
        falaj_common::exposition::render(Exporter { shared: Arc::clone(&api.shared), stored });
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}
