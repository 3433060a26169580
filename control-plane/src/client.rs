//! A client of the admin API, for the CLI's commands that act on a running control plane.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use thiserror::Error;

use crate::admin::{AlertsView, MetricsView};

/// Why a call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The control plane could not be reached.
    #[error("cannot reach the control plane at {url}: {source}")]
    Unreachable {
        /// The API's base URL.
        url: String,
        /// The error.
        source: reqwest::Error,
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
    },
    /// A local file could not be read.
    #[error("reading {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// The admin API at a base URL, with a bearer token.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// A client for the API at `base` (`http://127.0.0.1:7080`).
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let unreachable = |source| ClientError::Unreachable { url: self.base.clone(), source };
        let response = request.bearer_auth(&self.token).send().await.map_err(unreachable)?;
        let status = response.status();
        if status == StatusCode::NO_CONTENT {
            return serde_json::from_value(Value::Null).map_err(|e| ClientError::Api {
                status: status.as_u16(),
                code: "decode".into(),
                message: e.to_string(),
            });
        }
        let body: Value = response.json().await.map_err(unreachable)?;
        if !status.is_success() {
            return Err(ClientError::Api {
                status: status.as_u16(),
                code: body["error"]["code"].as_str().unwrap_or("unknown").to_owned(),
                message: body["error"]["message"].as_str().unwrap_or("no message").to_owned(),
            });
        }
        serde_json::from_value(body).map_err(|e| ClientError::Api {
            status: status.as_u16(),
            code: "decode".into(),
            message: format!("unexpected response: {e}"),
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
    pub async fn status(&self) -> Result<Value, ClientError> {
        self.call(self.http.get(self.url("/v1/status"))).await
    }

    /// `POST /v1/bundles`, streaming the file.
    pub async fn push_bundle(&self, path: &Path) -> Result<Value, ClientError> {
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
    pub async fn bundles(&self) -> Result<Vec<Value>, ClientError> {
        self.call(self.http.get(self.url("/v1/bundles"))).await
    }

    /// `POST /v1/tokens`.
    pub async fn create_token(&self, group: &str, ttl_seconds: u64) -> Result<Value, ClientError> {
        self.call(
            self.http
                .post(self.url("/v1/tokens"))
                .json(&json!({"group": group, "ttl_seconds": ttl_seconds})),
        )
        .await
    }

    /// `GET /v1/agents`.
    pub async fn agents(&self) -> Result<Vec<Value>, ClientError> {
        self.call(self.http.get(self.url("/v1/agents"))).await
    }

    /// `POST /v1/agents/{id}/revoke`.
    pub async fn revoke(&self, agent: &str) -> Result<Value, ClientError> {
        self.call(self.http.post(self.url(&format!("/v1/agents/{agent}/revoke")))).await
    }

    /// `PUT /v1/groups/{group}/deployments/{name}`.
    pub async fn deploy(
        &self,
        group: &str,
        name: &str,
        version: u64,
    ) -> Result<Value, ClientError> {
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
        let url =
            reqwest::Url::parse_with_params(&self.url("/v1/metrics"), &params).map_err(|e| {
                ClientError::Api { status: 0, code: "url".into(), message: e.to_string() }
            })?;
        self.call(self.http.get(url)).await
    }

    /// `GET /v1/alerts`: alerts firing and the latest `limit` events.
    pub async fn alerts(&self, limit: u64) -> Result<AlertsView, ClientError> {
        self.call(self.http.get(self.url(&format!("/v1/alerts?limit={limit}")))).await
    }

    /// `GET /v1/deployments`.
    pub async fn deployments(&self) -> Result<Vec<Value>, ClientError> {
        self.call(self.http.get(self.url("/v1/deployments"))).await
    }
}
