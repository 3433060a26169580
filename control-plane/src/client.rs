//! A client of the admin API, for the CLI's commands that act on a running control plane.
//!
//! Requests are built with reqwest and sent by hyper over [`hyper_rustls`] with ring, so
//! an `https://` URL works (the admin API's `[admin] tls_listen`) without a process-wide
//! rustls provider: the workspace's reqwest has no TLS of its own, and its rustls feature
//! without a provider would make every `reqwest::Client::new()` panic.

use crate::features::api::{SnapshotBuilt, ViewDetail, ViewSummary};
use crate::features::ingest::Ingested;
use crate::features::pii_keys::{KeyVersion, Rotated};
use crate::features::store::Applied;
use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use thiserror::Error;

use crate::admin::{
    AgentView, AlertsView, BundleView, DeploymentView, MetricsView, NewEnrollmentToken, PushedView,
    ReSignedView, RevokedView, StatusView,
};
use crate::auth::WhoAmI;
use crate::auth::api::{
    AddedUser, ApiTokenView, LoggedOut, LoginView, NewApiToken, PasswordReset, RoleChanged,
    TokenRevoked, UserDisabled, UserRemoved, UserView,
};
use crate::auth::rules::Role;
use crate::finetune::JobRow;
use crate::rollouts::{Action, Rollout, RolloutView, StartRequest};

/// Why a call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The control plane could not be reached.
    #[error("cannot reach the control plane at {url}: {source}")]
    Unreachable {
        /// The API's base URL.
        url: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The TLS settings for an `https://` URL could not be made.
    #[error("TLS for {url}: {message}")]
    Tls {
        /// The API's base URL.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The control plane answered with an error.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's error code.
        code: String,
        /// Its message.
        message: String,
        /// Structured details (an ingest's report of invalid rows).
        details: Option<Value>,
    },
    /// A local file could not be read.
    #[error("reading {path}: {source}")]
    File { path: String, source: std::io::Error },
}

/// The admin API at a base URL, with a bearer token.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    /// Builds requests (reqwest without TLS never sends one here).
    http: reqwest::Client,
    /// Sends them: HTTP, or HTTPS with rustls and ring.
    transport: Transport,
}

type Transport = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    reqwest::Body,
>;

/// The transport for `https://` (and `http://`) URLs: rustls with ring, trusting the CA
/// certificates of `ca_pem` when given, else the system's roots.
fn transport(base: &str, ca_pem: Option<&[u8]>) -> Result<Transport, ClientError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let tls_error = |message: String| ClientError::Tls { url: base.to_owned(), message };
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let tls = match ca_pem {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| tls_error(format!("the CA certificate file: {e}")))?;
                roots.add(cert).map_err(|e| tls_error(format!("a CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(tls_error("the CA certificate file holds no certificate".into()));
            }
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| tls_error(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            builder.with_tls_config(config)
        }
        None => match builder.with_provider_and_native_roots(std::sync::Arc::clone(&provider)) {
            Ok(builder) => builder,
            // Without system roots only a CA given with the URL can vouch for it; plain
            // HTTP still works.
            Err(_) => hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| tls_error(e.to_string()))?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
            ),
        },
    };
    let connector = tls.https_or_http().enable_http1().build();
    // The admin API closes a kept-alive connection idle for its header timeout (10 s): a
    // client taking such a connection from its pool just as it closes fails the request
    // unsent ("SendRequest"). Idle connections are dropped well before.
    Ok(hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(4))
        .build(connector))
}

impl AdminClient {
    /// A client for the API at `base` (`http://127.0.0.1:7080`, or `https://...` checked
    /// against the system's root certificates).
    pub fn new(base: &str, token: &str) -> Self {
        let base = base.trim_end_matches('/').to_owned();
        let transport = match transport(&base, None) {
            Ok(transport) => transport,
            Err(e) => unreachable!("TLS settings without a CA file are always made: {e}"),
        };
        Self { base, token: token.to_owned(), http: reqwest::Client::new(), transport }
    }

    /// A client for the API at `base` whose `https://` certificate must chain to one of
    /// the CA certificates in `ca_pem` (PEM) instead of the system's roots.
    pub fn with_ca(base: &str, token: &str, ca_pem: &[u8]) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_owned();
        let transport = transport(&base, Some(ca_pem))?;
        Ok(Self { base, token: token.to_owned(), http: reqwest::Client::new(), transport })
    }

    /// Sends `request` with the bearer token; the response, whatever its status.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let unreachable = |source: Box<dyn std::error::Error + Send + Sync>| {
            ClientError::Unreachable { url: self.base.clone(), source }
        };
        let request =
            request.bearer_auth(&self.token).build().map_err(|e| unreachable(e.into()))?;
        let request = axum::http::Request::try_from(request).map_err(|e| unreachable(e.into()))?;
        let response = self.transport.request(request).await.map_err(|e| unreachable(e.into()))?;
        Ok(reqwest::Response::from(response.map(reqwest::Body::wrap)))
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let response = self.send(request).await?;
        self.decode(response).await
    }

    async fn decode<T: DeserializeOwned>(
        &self,
        response: reqwest::Response,
    ) -> Result<T, ClientError> {
        let unreachable = |source: reqwest::Error| ClientError::Unreachable {
            url: self.base.clone(),
            source: source.into(),
        };
        let status = response.status();
        if status == StatusCode::NO_CONTENT {
            return serde_json::from_value(Value::Null).map_err(|e| ClientError::Api {
                status: status.as_u16(),
                code: "decode".into(),
                message: e.to_string(),
                details: None,
            });
        }
        let body: Value = response.json().await.map_err(unreachable)?;
        if !status.is_success() {
            return Err(ClientError::Api {
                status: status.as_u16(),
                code: body["error"]["code"].as_str().unwrap_or("unknown").to_owned(),
                message: body["error"]["message"].as_str().unwrap_or("no message").to_owned(),
                details: body["error"].get("details").cloned(),
            });
        }
        serde_json::from_value(body).map_err(|e| ClientError::Api {
            status: status.as_u16(),
            code: "decode".into(),
            message: format!("unexpected response: {e}"),
            details: None,
        })
    }

    /// The API's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<StatusView, ClientError> {
        self.call(self.http.get(self.url("/v1/status"))).await
    }

    /// `POST /v1/bundles`, streaming the file.
    pub async fn push_bundle(&self, path: &Path) -> Result<PushedView, ClientError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|source| ClientError::File { path: path.display().to_string(), source })?;
        let request = self
            .http
            .post(self.url("/v1/bundles"))
            .header("Content-Type", "application/octet-stream")
            .body(reqwest::Body::from(file));
        self.call(request).await
    }

    /// `GET /v1/bundles`.
    pub async fn bundles(&self) -> Result<Vec<BundleView>, ClientError> {
        self.call(self.http.get(self.url("/v1/bundles"))).await
    }

    /// `POST /v1/bundles/re-sign`: `bundle` (`NAME@VERSION`), or every bundle, signed
    /// again under the keys in force where a retired key had signed it.
    pub async fn re_sign(&self, bundle: Option<&str>) -> Result<Vec<ReSignedView>, ClientError> {
        let body = serde_json::json!({ "bundle": bundle });
        self.call(self.http.post(self.url("/v1/bundles/re-sign")).json(&body)).await
    }

    /// `POST /v1/tokens`.
    pub async fn create_token(
        &self,
        group: &str,
        ttl_seconds: u64,
    ) -> Result<NewEnrollmentToken, ClientError> {
        self.call(
            self.http
                .post(self.url("/v1/tokens"))
                .json(&json!({"group": group, "ttl_seconds": ttl_seconds})),
        )
        .await
    }

    /// `GET /v1/agents`.
    pub async fn agents(&self) -> Result<Vec<AgentView>, ClientError> {
        self.call(self.http.get(self.url("/v1/agents"))).await
    }

    /// `POST /v1/agents/{id}/revoke`.
    pub async fn revoke(&self, agent: &str) -> Result<RevokedView, ClientError> {
        self.call(self.http.post(self.url(&format!("/v1/agents/{agent}/revoke")))).await
    }

    /// `PUT /v1/groups/{group}/deployments/{name}`.
    pub async fn deploy(
        &self,
        group: &str,
        name: &str,
        version: u64,
    ) -> Result<DeploymentView, ClientError> {
        self.call(
            self.http
                .put(self.url(&format!("/v1/groups/{group}/deployments/{name}")))
                .json(&json!({"version": version})),
        )
        .await
    }

    /// `DELETE /v1/groups/{group}/deployments/{name}`.
    pub async fn undeploy(&self, group: &str, name: &str) -> Result<(), ClientError> {
        self.call::<Value>(
            self.http.delete(self.url(&format!("/v1/groups/{group}/deployments/{name}"))),
        )
        .await
        .map(drop)
    }

    /// `GET /v1/metrics`: per-version rollups of `model` over the last `since`.
    pub async fn metrics(
        &self,
        model: &str,
        version: Option<u64>,
        group: Option<&str>,
        agent: Option<&str>,
        since: Duration,
    ) -> Result<MetricsView, ClientError> {
        let mut params = vec![
            ("model", model.to_owned()),
            ("since", humantime::format_duration(since).to_string()),
        ];
        params.extend(version.map(|v| ("version", v.to_string())));
        params.extend(group.map(|g| ("group", g.to_owned())));
        params.extend(agent.map(|a| ("agent", a.to_owned())));
        self.call(self.http.get(self.url_with("/v1/metrics", &params)?)).await
    }

    /// `GET /v1/alerts`: alerts firing and the latest `limit` events.
    pub async fn alerts(&self, limit: u64) -> Result<AlertsView, ClientError> {
        self.call(self.http.get(self.url(&format!("/v1/alerts?limit={limit}")))).await
    }

    /// `GET /v1/audit`: audit entries, oldest first.
    pub async fn audit(
        &self,
        query: &crate::audit::AuditQuery,
    ) -> Result<Vec<falaj_common::audit::Entry>, ClientError> {
        let mut params = vec![("limit", query.limit.unwrap_or(100).to_string())];
        if let Some(since) = query.since {
            params.push(("since", since.to_string()));
        }
        if let Some(actor) = &query.actor {
            params.push(("actor", actor.clone()));
        }
        if let Some(action) = &query.action {
            params.push(("action", action.clone()));
        }
        self.call(self.http.get(self.url_with("/v1/audit", &params)?)).await
    }

    /// `GET /v1/audit/export`: the audit log's lines (entries and signed checkpoints).
    pub async fn audit_export(&self) -> Result<String, ClientError> {
        let unreachable = |source: reqwest::Error| ClientError::Unreachable {
            url: self.base.clone(),
            source: source.into(),
        };
        let response = self.send(self.http.get(self.url("/v1/audit/export"))).await?;
        if !response.status().is_success() {
            return Err(self.decode::<Value>(response).await.err().unwrap_or(ClientError::Api {
                status: 0,
                code: "decode".into(),
                message: "an error without a body".into(),
                details: None,
            }));
        }
        response.text().await.map_err(unreachable)
    }

    /// `PUT /v1/features/views`: registers or updates a view from its TOML text.
    pub async fn apply_view(&self, toml: String) -> Result<Applied, ClientError> {
        self.call(self.http.put(self.url("/v1/features/views")).body(toml)).await
    }

    /// `POST /v1/finetune`: orders a fine-tune job (`{agent, id?, share_weights, job}`).
    pub async fn order_finetune(&self, order: &Value) -> Result<JobRow, ClientError> {
        self.call(self.http.post(self.url("/v1/finetune")).json(order)).await
    }

    /// `GET /v1/finetune`, newest first.
    pub async fn finetune_jobs(&self) -> Result<Vec<JobRow>, ClientError> {
        self.call(self.http.get(self.url("/v1/finetune"))).await
    }

    /// `GET /v1/finetune/{id}`: the order and the agent's report.
    pub async fn finetune_job(&self, id: &str) -> Result<JobRow, ClientError> {
        self.call(self.http.get(self.url(&format!("/v1/finetune/{id}")))).await
    }

    /// `GET /v1/features/pii-keys`: every version of the region's PII key, newest first.
    pub async fn pii_keys(&self) -> Result<Vec<KeyVersion>, ClientError> {
        self.call(self.http.get(self.url("/v1/features/pii-keys"))).await
    }

    /// `POST /v1/features/pii-keys/rotate`: a new current version; the previous one's
    /// pseudonyms are still carried for `overlap_seconds`.
    pub async fn rotate_pii_key(&self, overlap_seconds: u64) -> Result<Rotated, ClientError> {
        let body = serde_json::json!({ "overlap_seconds": overlap_seconds });
        self.call(self.http.post(self.url("/v1/features/pii-keys/rotate")).json(&body)).await
    }

    /// `GET /v1/features/views`.
    pub async fn views(&self) -> Result<Vec<ViewSummary>, ClientError> {
        self.call(self.http.get(self.url("/v1/features/views"))).await
    }

    /// `GET /v1/features/views/{name}`: the view, its history, ingests and snapshots.
    pub async fn view(&self, name: &str) -> Result<ViewDetail, ClientError> {
        self.call(self.http.get(self.url(&format!("/v1/features/views/{name}")))).await
    }

    /// `path` on the API with the query `params`, escaped.
    fn url_with(&self, path: &str, params: &[(&str, String)]) -> Result<reqwest::Url, ClientError> {
        reqwest::Url::parse_with_params(&self.url(path), params).map_err(|e| ClientError::Api {
            status: 0,
            code: "url".into(),
            message: e.to_string(),
            details: None,
        })
    }

    /// POSTs the file at `path` to `api_path`, streaming it, its name in the query.
    async fn upload(
        &self,
        path: &Path,
        api_path: &str,
        mut params: Vec<(&str, String)>,
    ) -> Result<reqwest::Response, ClientError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|source| ClientError::File { path: path.display().to_string(), source })?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        params.push(("file", name));
        let url = self.url_with(api_path, &params)?;
        let request = self
            .http
            .post(url)
            .header("Content-Type", "application/octet-stream")
            .body(reqwest::Body::from(file));
        self.send(request).await
    }

    /// `POST /v1/features/views/{name}/ingest`, streaming the file.
    pub async fn ingest(&self, view: &str, path: &Path) -> Result<Ingested, ClientError> {
        let response =
            self.upload(path, &format!("/v1/features/views/{view}/ingest"), Vec::new()).await?;
        self.decode(response).await
    }

    /// `POST /v1/features/views/{name}/snapshots`.
    pub async fn snapshot(
        &self,
        view: &str,
        request: &Value,
    ) -> Result<SnapshotBuilt, ClientError> {
        self.call(
            self.http.post(self.url(&format!("/v1/features/views/{view}/snapshots"))).json(request),
        )
        .await
    }

    /// `POST /v1/features/views/{name}/export`: uploads the labels, writes the joined rows
    /// to `out` (atomically) and returns (rows, rows with features).
    pub async fn export(
        &self,
        view: &str,
        labels: &Path,
        format: &str,
        out: &Path,
    ) -> Result<(u64, u64), ClientError> {
        let mut response = self
            .upload(
                labels,
                &format!("/v1/features/views/{view}/export"),
                vec![("format", format.to_owned())],
            )
            .await?;
        if !response.status().is_success() {
            return Err(self.decode::<Value>(response).await.err().unwrap_or(ClientError::Api {
                status: 0,
                code: "decode".into(),
                message: "an error without a body".into(),
                details: None,
            }));
        }
        let header = |name: &str| {
            response.headers().get(name).and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(0)
        };
        let (rows, matched) = (header("x-falaj-rows"), header("x-falaj-matched"));
        let file_err = |source| ClientError::File { path: out.display().to_string(), source };
        let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let staged = tempfile::NamedTempFile::new_in(dir).map_err(file_err)?;
        let mut file = tokio::fs::File::from_std(staged.reopen().map_err(file_err)?);
        while let Some(chunk) = response.chunk().await.map_err(|source| {
            ClientError::Unreachable { url: self.base.clone(), source: source.into() }
        })? {
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await.map_err(file_err)?;
        }
        file.sync_all().await.map_err(file_err)?;
        staged.persist(out).map_err(|e| file_err(e.error))?;
        Ok((rows, matched))
    }

    /// `POST /v1/rollouts`: starts a rollout; its status.
    pub async fn start_rollout(&self, request: &StartRequest) -> Result<RolloutView, ClientError> {
        self.call(self.http.post(self.url("/v1/rollouts")).json(request)).await
    }

    /// `GET /v1/rollouts`, newest first, of one group and one model when given.
    pub async fn rollouts(
        &self,
        group: Option<&str>,
        model: Option<&str>,
    ) -> Result<Vec<Rollout>, ClientError> {
        let mut params = Vec::new();
        params.extend(group.map(|g| ("group", g.to_owned())));
        params.extend(model.map(|m| ("model", m.to_owned())));
        self.call(self.http.get(self.url_with("/v1/rollouts", &params)?)).await
    }

    /// `GET /v1/groups/{group}/rollouts/{model}`: the status of the latest rollout.
    pub async fn rollout(&self, group: &str, model: &str) -> Result<RolloutView, ClientError> {
        self.call(self.http.get(self.url(&format!("/v1/groups/{group}/rollouts/{model}")))).await
    }

    /// `POST /v1/groups/{group}/rollouts/{model}/{action}`; the status after it.
    pub async fn rollout_action(
        &self,
        group: &str,
        model: &str,
        action: Action,
    ) -> Result<RolloutView, ClientError> {
        let path = format!("/v1/groups/{group}/rollouts/{model}/{}", action.name());
        self.call(self.http.post(self.url(&path))).await
    }

    /// `GET /v1/deployments`.
    pub async fn deployments(&self) -> Result<Vec<DeploymentView>, ClientError> {
        self.call(self.http.get(self.url("/v1/deployments"))).await
    }

    // ---- people and credentials (crate::auth) ----

    /// `POST /v1/login`: a session for `user` (needs no token of its own).
    pub async fn login(&self, user: &str, password: &str) -> Result<LoginView, ClientError> {
        self.call(
            self.http
                .post(self.url("/v1/login"))
                .json(&json!({"user": user, "password": password})),
        )
        .await
    }

    /// `POST /v1/logout`: ends the session this client's token is.
    pub async fn logout(&self) -> Result<LoggedOut, ClientError> {
        self.call(self.http.post(self.url("/v1/logout"))).await
    }

    /// `GET /v1/whoami`.
    pub async fn whoami(&self) -> Result<WhoAmI, ClientError> {
        self.call(self.http.get(self.url("/v1/whoami"))).await
    }

    /// `GET /v1/users`.
    pub async fn users(&self) -> Result<Vec<UserView>, ClientError> {
        self.call(self.http.get(self.url("/v1/users"))).await
    }

    /// `POST /v1/users`: adds a user; without `password`, the answer carries a generated
    /// one (shown once).
    pub async fn add_user(
        &self,
        name: &str,
        role: Role,
        password: Option<&str>,
    ) -> Result<AddedUser, ClientError> {
        let body = json!({"name": name, "role": role.name(), "password": password});
        self.call(self.http.post(self.url("/v1/users")).json(&body)).await
    }

    /// `PUT /v1/users/{name}/role`.
    pub async fn set_role(&self, name: &str, role: Role) -> Result<RoleChanged, ClientError> {
        let url = self.url(&format!("/v1/users/{name}/role"));
        self.call(self.http.put(url).json(&json!({"role": role.name()}))).await
    }

    /// `POST /v1/users/{name}/disable` (or `enable`).
    pub async fn set_disabled(
        &self,
        name: &str,
        disabled: bool,
    ) -> Result<UserDisabled, ClientError> {
        let verb = if disabled { "disable" } else { "enable" };
        self.call(self.http.post(self.url(&format!("/v1/users/{name}/{verb}")))).await
    }

    /// `DELETE /v1/users/{name}`.
    pub async fn remove_user(&self, name: &str) -> Result<UserRemoved, ClientError> {
        self.call(self.http.delete(self.url(&format!("/v1/users/{name}")))).await
    }

    /// `POST /v1/users/{name}/password`: sets `password`, or a generated one returned.
    pub async fn reset_password(
        &self,
        name: &str,
        password: Option<&str>,
    ) -> Result<PasswordReset, ClientError> {
        let url = self.url(&format!("/v1/users/{name}/password"));
        self.call(self.http.post(url).json(&json!({"password": password}))).await
    }

    /// `GET /v1/apitokens`.
    pub async fn api_tokens(&self) -> Result<Vec<ApiTokenView>, ClientError> {
        self.call(self.http.get(self.url("/v1/apitokens"))).await
    }

    /// `POST /v1/apitokens`: the answer carries the token (shown once).
    pub async fn create_api_token(
        &self,
        name: &str,
        role: Role,
        ttl: Duration,
    ) -> Result<NewApiToken, ClientError> {
        let body = json!({"name": name, "role": role.name(), "ttl_seconds": ttl.as_secs()});
        self.call(self.http.post(self.url("/v1/apitokens")).json(&body)).await
    }

    /// `DELETE /v1/apitokens/{name}`.
    pub async fn revoke_api_token(&self, name: &str) -> Result<TokenRevoked, ClientError> {
        self.call(self.http.delete(self.url(&format!("/v1/apitokens/{name}")))).await
    }
}
