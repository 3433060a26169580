//! The agent's local HTTP server: the Open Inference Protocol v2 REST API over the
//! registry, online feature lookups (`/v1/features`), and the task that reloads models and
//! snapshots when the store changes.
//!
//! The request handling that does not depend on the transport (admission, version selection
//! and rollout routing, entity inputs, running, metrics, drift and feedback recording) is
//! here too, as `pub(crate)` functions the gRPC endpoint ([`crate::grpc`]) calls as well.
//!
//! With `[http] tls_certificate` both endpoints serve TLS only (the same reloadable
//! certificate); every request but health checks passes the gate (`apikeys`) of `[http] auth`
//! (API keys, or mutual TLS checked in the handshake).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use falaj_common::time::Timestamp;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};

use crate::admission::{RequestSlots, Slot, SlotGauge};
use crate::apikeys::{Access, ApiKeyError, AuthMode, Denied, Gate};
use crate::engine::{EngineConfig, Engines};
use crate::features::{self, FeatureError};
use crate::feedback::{self, Predictions};
use crate::metrics::AgentStats;
use crate::models::{Catalog, LoadedVersion, Registry, VersionState};
use crate::oip::{self, OutputToSend};
use crate::rollout::{RandomKeys, Shadow, ShadowJob};
use crate::store::{Store, StoreError};
use falaj_shell::http::{self as http_serve, HttpLimits};
use falaj_shell::tls::{ReloadableTls, TlsError, TlsFiles};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where to listen.
    pub http: SocketAddr,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: usize,
    /// Longest time a client may take to send its request body (408 after), and longest a
    /// request waits for a request slot before its body is read (503 after).
    pub body_timeout: Duration,
    /// Longest time a client may take to send a request head; its connection is closed
    /// after it.
    pub header_timeout: Duration,
    /// Longest a request waits for a request slot before its body is read (503 after).
    pub queue_timeout: Duration,
    /// Connections open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// How long requests in flight at shutdown may take to finish.
    pub shutdown_grace: Duration,
    /// Inferences run at once; more wait their turn. Defaults to the number of cores.
    /// Requests with a body are admitted [`SLOTS_PER_WORKER`] per worker before their body
    /// is read, so buffered bodies are bounded by workers, not by clients.
    pub workers: usize,
    /// How often to look for bundles imported by another process.
    pub poll_interval: Duration,
    /// Inactive versions kept of each model imported by hand (`[models] keep_inactive`).
    pub keep_inactive: usize,
    /// Whether requests are measured (metric windows, Prometheus counters).
    pub metrics: bool,
    /// Which engine serves each model.
    pub engine: EngineConfig,
    /// Mirrored requests waiting for the candidate; past it they are dropped (counted).
    pub shadow_queue: usize,
    /// How long what an identified request was answered is kept for its feedback.
    pub feedback_horizon: Duration,
    /// Most answers kept for feedback; the oldest go first.
    pub feedback_capacity: usize,
    /// Where the gRPC endpoint listens (`[grpc] listen`); `None`, the default, serves
    /// REST only. Its messages are limited to `max_body_bytes`.
    pub grpc: Option<SocketAddr>,
    /// TLS for both endpoints (`[http] tls_certificate`, `tls_key`, `client_ca`); `None`
    /// serves plain HTTP and h2c.
    pub tls: Option<TlsFiles>,
    /// How clients authenticate (`[http] auth`); `None` is no authentication, refused on
    /// an address that is not loopback.
    pub auth: Option<AuthMode>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            http: SocketAddr::from(([127, 0, 0, 1], 8000)),
            max_body_bytes: 64 << 20,
            body_timeout: Duration::from_secs(30),
            header_timeout: HttpLimits::default().header_timeout,
            queue_timeout: Duration::from_secs(5),
            max_connections: HttpLimits::default().max_connections,
            shutdown_grace: HttpLimits::default().grace,
            workers: std::thread::available_parallelism().map_or(2, usize::from),
            poll_interval: Duration::from_secs(1),
            keep_inactive: 2,
            metrics: true,
            engine: EngineConfig::default(),
            shadow_queue: 256,
            feedback_horizon: Duration::from_secs(24 * 3600),
            feedback_capacity: 100_000,
            grpc: None,
            tls: None,
            auth: None,
        }
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Binding or serving on the socket failed.
    #[error("HTTP server on {addr}: {source}")]
    Http { addr: SocketAddr, source: std::io::Error },
    /// Binding or serving the gRPC endpoint failed.
    #[error("gRPC server on {addr}: {message}")]
    Grpc {
        addr: SocketAddr,
        /// What failed.
        message: String,
    },
    /// A blocking task failed.
    #[error("internal task failed: {0}")]
    Task(String),
    /// The TLS files do not load.
    #[error("inference API: {0}")]
    Tls(#[from] TlsError),
    /// The authentication settings do not hold together (or leave a non-loopback address
    /// unauthenticated without `auth = "none"`).
    #[error("inference API authentication: {0}")]
    Auth(String),
    /// The API keys could not be read.
    #[error(transparent)]
    ApiKeys(#[from] ApiKeyError),
}

/// Request slots per worker: one request decoding while another runs.
pub const SLOTS_PER_WORKER: usize = 2;

/// What every request handler shares, whichever transport it came by.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) registry: Arc<Registry>,
    permits: Arc<Semaphore>,
    slots: Arc<RequestSlots>,
    pub(crate) config: Arc<ServeConfig>,
    stats: Arc<AgentStats>,
    shadow: Shadow,
    predictions: Arc<Predictions>,
    keys: Arc<RandomKeys>,
    /// What each request is checked against (`[http] auth`).
    pub(crate) gate: Arc<Gate>,
}

/// A server whose socket is bound and whose models are loaded, ready to run.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    grpc: Option<(TcpListener, SocketAddr)>,
    tls: Option<Arc<ReloadableTls>>,
    store: Arc<Mutex<Store>>,
    state: AppState,
    reload: Arc<Notify>,
}

impl Server {
    /// Opens the store in `data_dir`, loads every installed model and binds the socket.
    pub async fn bind(data_dir: PathBuf, config: ServeConfig) -> Result<Self, ServeError> {
        let listen: Vec<SocketAddr> = std::iter::once(config.http).chain(config.grpc).collect();
        let client_ca = config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
        crate::apikeys::check_settings(&listen, config.auth, config.tls.is_some(), client_ca)
            .map_err(ServeError::Auth)?;
        let tls = config.tls.clone().map(ReloadableTls::load).transpose()?.map(Arc::new);
        let gate = match config.auth {
            Some(mode @ AuthMode::ApiKey) => {
                let dir = data_dir.clone();
                tokio::task::spawn_blocking(move || Gate::new(mode, &dir))
                    .await
                    .map_err(|e| ServeError::Task(e.to_string()))??
            }
            Some(mode) => Gate::new(mode, &data_dir)?,
            None => Gate::open(),
        };
        if config.auth == Some(AuthMode::ApiKey)
            && config.tls.is_none()
            && let Some(addr) = listen.iter().find(|a| !a.ip().is_loopback())
        {
            tracing::warn!(
                %addr,
                "API keys are required but travel in clear text: set [http] tls_certificate and tls_key"
            );
        }
        if config.auth == Some(AuthMode::None)
            && let Some(addr) = listen.iter().find(|a| !a.ip().is_loopback())
        {
            tracing::warn!(
                %addr,
                "serving the inference API WITHOUT AUTHENTICATION (auth = \"none\") on an address that is not loopback"
            );
        }
        let registry = Arc::new(Registry::with_engines(Engines::new(config.engine.clone())));
        let (store, summary) = {
            let registry = Arc::clone(&registry);
            tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
                let store = Store::open(&data_dir)?;
                let summary = registry.reload(&store)?;
                Ok((store, summary))
            })
            .await
            .map_err(|e| ServeError::Task(e.to_string()))??
        };
        tracing::info!(
            loaded = summary.loaded.len(),
            failed = summary.failed.len(),
            "models loaded"
        );
        let listener = TcpListener::bind(config.http)
            .await
            .map_err(|source| ServeError::Http { addr: config.http, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ServeError::Http { addr: config.http, source })?;
        let grpc = match config.grpc {
            None => None,
            Some(want) => {
                let listener = TcpListener::bind(want)
                    .await
                    .map_err(|e| ServeError::Grpc { addr: want, message: e.to_string() })?;
                let addr = listener
                    .local_addr()
                    .map_err(|e| ServeError::Grpc { addr: want, message: e.to_string() })?;
                Some((listener, addr))
            }
        };
        let permits = Arc::new(Semaphore::new(config.workers.max(1)));
        let slots = Arc::new(RequestSlots::new(config.workers.max(1) * SLOTS_PER_WORKER));
        let state = AppState {
            registry,
            shadow: Shadow::start(config.shadow_queue, Arc::clone(&permits)),
            predictions: Arc::new(Predictions::new(
                config.feedback_horizon,
                config.feedback_capacity,
            )),
            keys: Arc::new(RandomKeys::new()),
            gate: Arc::new(gate),
            permits,
            slots,
            config: Arc::new(config),
            stats: Arc::new(AgentStats::default()),
        };
        Ok(Self {
            listener,
            addr,
            grpc,
            tls,
            store: Arc::new(Mutex::new(store)),
            state,
            reload: Arc::new(Notify::new()),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the gRPC endpoint listens on, when `[grpc] listen` is set.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc.as_ref().map(|(_, addr)| *addr)
    }

    /// The endpoints' TLS configuration, when they serve TLS: [`ReloadableTls::reload`]
    /// takes new certificate files for the connections made from then on.
    pub fn tls(&self) -> Option<Arc<ReloadableTls>> {
        self.tls.clone()
    }

    /// Notify this to reload the models at once (after an install in this process).
    pub fn reloader(&self) -> Arc<Notify> {
        Arc::clone(&self.reload)
    }

    /// Agent-wide figures shown on `/metrics`.
    pub fn stats(&self) -> Arc<AgentStats> {
        Arc::clone(&self.state.stats)
    }

    /// How many requests hold a request slot, wait for one, and the most that held one.
    pub fn request_slots(&self) -> watch::Receiver<SlotGauge> {
        self.state.slots.gauge()
    }

    /// The registry of served models.
    pub fn registry(&self) -> Arc<Registry> {
        Arc::clone(&self.state.registry)
    }

    /// The routes over this server's registry, to call in process without the socket
    /// (benchmarks); the store watcher runs only in [`Server::run`].
    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    /// Serves until `shutdown` completes, then drops idle and half-sent connections and
    /// finishes the requests in flight (for at most the configured grace).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let watcher = tokio::spawn(watch_store(
            Arc::clone(&self.store),
            Arc::clone(&self.state.registry),
            Watch {
                every: self.state.config.poll_interval,
                keep_inactive: self.state.config.keep_inactive,
            },
            Arc::clone(&self.reload),
            stop_rx,
        ));
        tracing::info!(addr = %self.addr, tls = self.tls.is_some(), auth = ?self.state.gate.mode(), "serving the Open Inference Protocol");
        let config = Arc::clone(&self.state.config);
        let limits = HttpLimits {
            header_timeout: config.header_timeout,
            max_connections: config.max_connections,
            grace: config.shutdown_grace,
        };
        // One shutdown for both endpoints.
        let (down_tx, down_rx) = watch::channel(false);
        let grpc = self.grpc.map(|(listener, addr)| {
            tracing::info!(%addr, "serving the Open Inference Protocol over gRPC");
            tokio::spawn(crate::grpc::serve(
                listener,
                self.state.clone(),
                self.tls.clone(),
                down_rx.clone(),
            ))
        });
        let mut down = down_rx;
        let stopped = async move {
            let _ = down.wait_for(|d| *d).await;
        };
        tokio::spawn(async move {
            shutdown.await;
            let _ = down_tx.send(true);
        });
        match self.tls {
            Some(tls) => {
                http_serve::serve_tls(self.listener, router(self.state), limits, tls, stopped)
                    .await;
            }
            None => http_serve::serve(self.listener, router(self.state), limits, stopped).await,
        }
        let grpc_result = match grpc {
            Some(task) => task.await.map_err(|e| ServeError::Task(e.to_string()))?,
            None => Ok(()),
        };
        let _ = stop_tx.send(true);
        let _ = watcher.await;
        grpc_result?;
        tracing::info!("server stopped");
        Ok(())
    }
}

/// How the store is watched.
#[derive(Debug, Clone, Copy)]
struct Watch {
    /// How often to look.
    every: Duration,
    /// Inactive imported versions kept per model.
    keep_inactive: usize,
}

/// Reloads the registry when another process commits to the store (an import), when
/// `reload` is notified, or on SIGHUP, until `stop` turns true; before each reload,
/// imported versions beyond the retention are removed.
async fn watch_store(
    store: Arc<Mutex<Store>>,
    registry: Arc<Registry>,
    watch: Watch,
    reload: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(watch.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut seen = None;
    loop {
        #[cfg(unix)]
        let hup = async {
            match hangup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup = std::future::pending::<Option<()>>();
        let forced = tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => false,
            _ = hup => true,
            () = reload.notified() => true,
        };
        let store = Arc::clone(&store);
        let registry = Arc::clone(&registry);
        let result = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let mut store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let version = store.data_version()?;
            if !forced && seen == Some(version) {
                return Ok((version, None));
            }
            // Its own writes leave the store's data version as it is.
            let removed = store.prune_imported(watch.keep_inactive, SystemTime::now())?;
            if !removed.is_empty() {
                tracing::info!(
                    ?removed,
                    keep = watch.keep_inactive,
                    "removed inactive imported versions"
                );
            }
            Ok((version, Some(registry.reload(&store)?)))
        })
        .await;
        match result {
            Ok(Ok((version, summary))) => {
                if let Some(summary) =
                    summary.filter(|s| seen.is_some() || forced || !s.loaded.is_empty())
                {
                    tracing::info!(
                        loaded = ?summary.loaded,
                        failed = ?summary.failed,
                        dropped = ?summary.dropped,
                        "models reloaded"
                    );
                }
                seen = Some(version);
            }
            Ok(Err(err)) => tracing::error!(error = %err, "reloading models failed"),
            Err(err) => tracing::error!(error = %err, "reload task failed"),
        }
    }
}

/// The routes: health checks open to all, everything else behind the gate.
fn router(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route("/v2/models/{name}/versions/{version}", get(version_metadata))
        .route("/v2/models/{name}/ready", get(model_ready))
        .route("/v2/models/{name}/versions/{version}/ready", get(version_ready))
        .route("/v2/models/{name}/infer", post(model_infer))
        .route("/v2/models/{name}/versions/{version}/infer", post(version_infer))
        .route("/v2/models/{name}/feedback", post(feedback))
        .route("/v1/features", get(feature_views))
        .route("/v1/features/{view}/{entity}", get(feature_lookup))
        .route("/metrics", get(prometheus))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .merge(guarded)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::Internal("a handler panicked".into()).into_response()
        }))
        .with_state(state)
}

/// Lets a request through the gate: a model's routes need a key for that model, feature
/// lookups one for every model, the rest (server metadata, `/metrics`) any valid key.
async fn authorize(
    State(state): State<AppState>,
    params: axum::extract::RawPathParams,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let model = params.iter().find(|(key, _)| *key == "name").map(|(_, value)| value);
    let access = match model {
        Some(model) => Access::Model(model),
        None if request.uri().path().starts_with("/v1/features") => Access::EveryModel,
        None => Access::AnyKey,
    };
    let authorization = request.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    match state.gate.check(authorization, access) {
        Ok(()) => next.run(request).await,
        Err(denied) => ApiError::from(denied).into_response(),
    }
}

/// An error response, shaped as the protocol's `{"error": "..."}` over REST; the gRPC
/// endpoint maps each to a status code with the same message.
#[derive(Debug)]
pub(crate) enum ApiError {
    BadRequest(String),
    NotFound(String),
    MethodNotAllowed(String),
    Conflict(String),
    Unprocessable(String),
    Timeout(String),
    TooLarge(usize),
    UnsupportedMediaType(String),
    Unavailable(String),
    /// Every request slot stayed taken (503 over REST, RESOURCE_EXHAUSTED over gRPC).
    Busy(String),
    /// No valid credentials (401 over REST, UNAUTHENTICATED over gRPC).
    Unauthenticated(String),
    /// Valid credentials that do not cover the request (403, PERMISSION_DENIED).
    Forbidden(String),
    /// A key over its rate (429 with `Retry-After` over REST, RESOURCE_EXHAUSTED over gRPC).
    Throttled {
        message: String,
        retry_after: Duration,
    },
    Internal(String),
}

impl From<Denied> for ApiError {
    fn from(denied: Denied) -> Self {
        match denied {
            Denied::Unauthenticated(m) => Self::Unauthenticated(m),
            Denied::Forbidden(m) => Self::Forbidden(m),
            Denied::Throttled { message, retry_after } => Self::Throttled { message, retry_after },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, m),
            Self::MethodNotAllowed(m) => (StatusCode::METHOD_NOT_ALLOWED, m),
            Self::Conflict(m) => (StatusCode::CONFLICT, m),
            Self::Unprocessable(m) => (StatusCode::UNPROCESSABLE_ENTITY, m),
            Self::Timeout(m) => (StatusCode::REQUEST_TIMEOUT, m),
            Self::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds the limit of {limit} bytes"),
            ),
            Self::UnsupportedMediaType(m) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, m),
            Self::Unavailable(m) | Self::Busy(m) => (StatusCode::SERVICE_UNAVAILABLE, m),
            Self::Unauthenticated(m) => {
                let body = serde_json::json!({ "error": m }).to_string();
                let headers = [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::WWW_AUTHENTICATE, "Bearer"),
                ];
                return (StatusCode::UNAUTHORIZED, headers, body).into_response();
            }
            Self::Forbidden(m) => (StatusCode::FORBIDDEN, m),
            Self::Throttled { message, retry_after } => {
                let body = serde_json::json!({ "error": message }).to_string();
                // Whole seconds (RFC 9110), rounded up: a client that waits that long is
                // admitted.
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                let headers = [
                    (header::CONTENT_TYPE, "application/json".to_owned()),
                    (header::RETRY_AFTER, seconds.to_string()),
                ];
                return (StatusCode::TOO_MANY_REQUESTS, headers, body).into_response();
            }
            Self::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal error".to_owned())
            }
        };
        let body = serde_json::json!({ "error": message });
        (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
    }
}

impl From<FeatureError> for ApiError {
    fn from(e: FeatureError) -> Self {
        let message = e.to_string();
        match e {
            FeatureError::UnknownView { .. } | FeatureError::NotHeld { .. } => {
                Self::NotFound(message)
            }
            FeatureError::BadKey { .. }
            | FeatureError::NoFeatureInput { .. }
            | FeatureError::InputsAndEntities => Self::BadRequest(message),
            FeatureError::NoSnapshot { .. }
            | FeatureError::Skew { .. }
            | FeatureError::MissingFeature { .. }
            | FeatureError::NotNumeric { .. } => Self::Conflict(message),
            FeatureError::Null { .. } => Self::Unprocessable(message),
            FeatureError::NotLoaded { .. } => Self::Unavailable(message),
        }
    }
}

fn json(value: &serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], value.to_string()).into_response()
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no such endpoint: {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

async fn prometheus(State(state): State<AppState>) -> Response {
    let text = falaj_common::exposition::render(crate::metrics::Exporter {
        registry: Arc::clone(&state.registry),
        stats: Arc::clone(&state.stats),
        api_keys: state.gate.counts(),
    });
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// The server's name in its metadata, over REST and gRPC.
pub(crate) const SERVER_NAME: &str = "falaj-agent";

async fn server_metadata() -> Response {
    json(&serde_json::json!({
        "name": SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(state): State<AppState>) -> Result<StatusCode, ApiError> {
    if state.registry.catalog().ready() {
        Ok(StatusCode::OK)
    } else {
        Err(ApiError::Unavailable("not ready: some active model versions are not loaded".into()))
    }
}

async fn feature_views(State(state): State<AppState>) -> Response {
    json(&features::list(&state.registry.catalog()))
}

async fn feature_lookup(
    State(state): State<AppState>,
    Path((view, entity)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let body = features::lookup(&state.registry.catalog(), &view, &entity)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// A version as a request names it (in a path or a message).
pub(crate) fn parse_version(text: &str, name: &str) -> Result<u64, ApiError> {
    text.parse().map_err(|_| ApiError::NotFound(format!("model {name:?} has no version {text:?}")))
}

/// Finds a version: the given one, or the active one.
pub(crate) fn lookup(
    catalog: &Catalog,
    name: &str,
    version: Option<u64>,
) -> Result<(u64, VersionState), ApiError> {
    let entry = catalog
        .models
        .get(name)
        .ok_or_else(|| ApiError::NotFound(format!("unknown model {name:?}")))?;
    let Some(version) = version.or(entry.active) else {
        return Err(ApiError::NotFound(format!("model {name:?} has no active version")));
    };
    let state = entry
        .versions
        .get(&version)
        .ok_or_else(|| ApiError::NotFound(format!("model {name:?} has no version {version}")))?;
    Ok((version, state.clone()))
}

fn loaded(name: &str, version: u64, state: VersionState) -> Result<Arc<LoadedVersion>, ApiError> {
    match state {
        VersionState::Ready(v) => Ok(v),
        VersionState::Failed { reason, .. } => Err(ApiError::Unavailable(format!(
            "model {name:?} version {version} is not loaded: {reason}"
        ))),
    }
}

/// What a model's metadata describes: the loaded version asked for (or the active one)
/// and the versions listed (the one asked for, or all).
pub(crate) fn described(
    catalog: &Catalog,
    name: &str,
    version: Option<u64>,
) -> Result<(Arc<LoadedVersion>, Vec<String>), ApiError> {
    let (v, found) = lookup(catalog, name, version)?;
    let model = loaded(name, v, found)?;
    let versions = match version {
        Some(v) => vec![v.to_string()],
        None => catalog.models[name].versions.keys().map(u64::to_string).collect(),
    };
    Ok((model, versions))
}

/// The model part of a loaded version's manifest.
pub(crate) fn model_spec(
    model: &LoadedVersion,
) -> Result<&falaj_common::bundle::ModelSpec, ApiError> {
    model.manifest.model().ok_or_else(|| ApiError::Internal("not a model".into()))
}

fn metadata(state: &AppState, name: &str, version: Option<u64>) -> Result<Response, ApiError> {
    let catalog = state.registry.catalog();
    let (model, versions) = described(&catalog, name, version)?;
    let entry = &catalog.models[name];
    let spec = model_spec(&model)?;
    let tensors = |specs: &[falaj_common::tensor::TensorSpec]| {
        specs
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "datatype": t.datatype.name(), "shape": t.protocol_shape()}))
            .collect::<Vec<_>>()
    };
    Ok(json(&serde_json::json!({
        "name": name,
        "versions": versions,
        "platform": "onnx",
        "inputs": tensors(&spec.signature.inputs),
        "outputs": tensors(&spec.signature.outputs),
        "parameters": {
            "active_version": entry.active.map(|v| v.to_string()),
            "engine": model.engine.name(),
            "engines": entry
                .versions
                .iter()
                .filter(|(v, _)| version.is_none_or(|only| only == **v))
                .map(|(v, state)| {
                    let engine = match state {
                        VersionState::Ready(loaded) => loaded.engine.name(),
                        VersionState::Failed { .. } => "unavailable",
                    };
                    (v.to_string(), serde_json::Value::from(engine))
                })
                .collect::<serde_json::Map<_, _>>(),
            "runtime_hint": spec.runtime.to_string(),
            // The derived model that answers requests naming no version, if one does.
            "served_by": match catalog.serving(name) {
                (derived, Some(_)) => Some(derived),
                _ => None,
            },
            "derived_from": spec.lineage.as_ref().map(|l| format!("{}@{}", l.parent, l.parent_version)),
        },
    })))
}

async fn model_metadata(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    metadata(&state, &name, None)
}

async fn version_metadata(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    metadata(&state, &name, Some(parse_version(&version, &name)?))
}

/// Whether a version (the given one, or the active one) is ready: `Err` with why not.
pub(crate) fn model_readiness(
    state: &AppState,
    name: &str,
    version: Option<u64>,
) -> Result<Result<(), String>, ApiError> {
    let (v, found) = lookup(&state.registry.catalog(), name, version)?;
    Ok(match found {
        VersionState::Ready(_) => Ok(()),
        VersionState::Failed { reason, .. } => {
            Err(format!("model {name:?} version {v} is not ready: {reason}"))
        }
    })
}

fn readiness(state: &AppState, name: &str, version: Option<u64>) -> Result<StatusCode, ApiError> {
    model_readiness(state, name, version)?.map(|()| StatusCode::OK).map_err(ApiError::BadRequest)
}

async fn model_ready(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    readiness(&state, &name, None)
}

async fn version_ready(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    readiness(&state, &name, Some(parse_version(&version, &name)?))
}

async fn model_infer(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    infer(state, name, None, headers, body).await
}

async fn version_infer(
    State(state): State<AppState>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let version = parse_version(&version, &name)?;
    infer(state, name, Some(version), headers, body).await
}

/// Takes a request slot before the body is read: 503 when none is freed within the queue
/// timeout.
async fn admit(state: &AppState) -> Result<Slot, ApiError> {
    state.slots.take(state.config.queue_timeout).await.map_err(|busy| {
        tracing::debug!(slots = busy.slots, "no request slot freed in time");
        ApiError::Busy(format!(
            "the agent is busy: all {} request slots stayed taken for {:?}; retry later",
            busy.slots, busy.waited
        ))
    })
}

/// Reads the body within the size limit and the time limit.
async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<bytes::Bytes, ApiError> {
    let limit = state.config.max_body_bytes;
    if let Some(encoding) =
        headers.get(header::CONTENT_ENCODING).filter(|e| e.as_bytes() != b"identity")
    {
        return Err(ApiError::UnsupportedMediaType(format!(
            "Content-Encoding {} is not supported; send the body uncompressed",
            String::from_utf8_lossy(encoding.as_bytes())
        )));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge(limit));
    }
    let timeout = state.config.body_timeout;
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Err(_) => {
            Err(ApiError::Timeout(format!("the request body did not arrive within {timeout:?}")))
        }
        Ok(Err(err)) if err.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::TooLarge(limit))
        }
        Ok(Err(err)) => {
            Err(ApiError::BadRequest(format!("reading the request body failed: {err}")))
        }
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

/// Runs the model where it costs least: a run expected to take less than
/// [`INLINE_BUDGET`] runs on the async worker that received the request (a hand-off to
/// another thread would cost more than the run); longer or not yet measured runs go to the
/// blocking pool, at most `workers` at once.
async fn run_model(
    state: &AppState,
    model: &Arc<LoadedVersion>,
    inputs: Vec<falaj_common::tensor::Tensor>,
    rows: u64,
) -> Result<Result<Vec<falaj_common::tensor::Tensor>, falaj_common::onnx::RunError>, ApiError> {
    if model.engine.may_run_inline() && model.cost.estimate(rows).is_some_and(|d| d < INLINE_BUDGET)
    {
        let started = Instant::now();
        let outputs = model.engine.run(inputs);
        model.cost.record(rows, started.elapsed());
        return Ok(outputs);
    }
    let permit = Arc::clone(&state.permits)
        .acquire_owned()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let model = Arc::clone(model);
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let started = Instant::now();
        let outputs = model.engine.run(inputs);
        model.cost.record(rows, started.elapsed());
        outputs
    })
    .await
    .map_err(|e| ApiError::Internal(format!("inference task failed: {e}")))
}

/// The inputs of a mirrored request in the candidate's order; `None`, counted as a failed
/// request of the candidate, when its signature does not take them.
fn mirrored_inputs(
    signature: &falaj_common::tensor::Signature,
    inputs: &[falaj_common::tensor::Tensor],
    candidate: Arc<LoadedVersion>,
) -> Option<(Arc<LoadedVersion>, Vec<falaj_common::tensor::Tensor>)> {
    let given: Vec<_> = signature
        .inputs
        .iter()
        .zip(inputs)
        .map(|(spec, t)| falaj_common::tensor::GivenInput {
            name: &spec.name,
            datatype: t.data.datatype(),
            shape: &t.shape,
        })
        .collect();
    match candidate.engine.signature().bind(&given) {
        Ok((order, _)) => {
            let mut ordered = vec![None; inputs.len()];
            for (tensor, index) in inputs.iter().zip(order) {
                ordered[index] = Some(tensor.clone());
            }
            let ordered = ordered.into_iter().collect::<Option<Vec<_>>>()?;
            Some((candidate, ordered))
        }
        Err(e) => {
            tracing::debug!(model = %candidate.manifest.name, version = candidate.manifest.version, error = %e, "a mirrored request does not fit the candidate");
            candidate.metrics.record_refused();
            None
        }
    }
}

/// Longest expected run that is done on the async worker itself.
pub(crate) const INLINE_BUDGET: Duration = Duration::from_micros(100);

/// `POST /v2/models/{name}/feedback`: ground truth for earlier requests of `name`, by
/// their ids, joined to the version and answer that served each.
async fn feedback(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !state.registry.catalog().models.contains_key(&name) {
        return Err(ApiError::NotFound(format!("unknown model {name:?}")));
    }
    let _slot = admit(&state).await?;
    let body = read_body(&state, &headers, body).await?;
    let items = match serde_json::from_slice::<feedback::Body>(&body) {
        Ok(feedback::Body::One(item)) => vec![item],
        Ok(feedback::Body::Many(items)) => items,
        Err(e) => {
            return Err(ApiError::BadRequest(format!(
                "feedback must be {{\"id\": REQUEST_ID, \"label\": LABEL}} or a list of them (a label is a number, a string, a boolean, or a list of them, one per row): {e}"
            )));
        }
    };
    let joined = state
        .predictions
        .join(&name, &items, Instant::now())
        .map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    let catalog = state.registry.catalog();
    for (model, version, feedback) in &joined.versions {
        if let Some(VersionState::Ready(v)) =
            catalog.models.get(model).and_then(|m| m.versions.get(version))
        {
            v.metrics.record_feedback(feedback);
        }
    }
    state.stats.feedback_joined.fetch_add(joined.joined, std::sync::atomic::Ordering::Relaxed);
    state.stats.feedback_unknown.fetch_add(joined.unknown, std::sync::atomic::Ordering::Relaxed);
    Ok(json(&serde_json::json!({ "joined": joined.joined, "unknown": joined.unknown })))
}

/// The header that keys a client to one variant of a rollout when the request's
/// parameters name no `routing_key` or entity.
pub const ROUTING_KEY_HEADER: &str = "x-falaj-routing-key";

async fn infer(
    state: AppState,
    name: String,
    version: Option<u64>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Held until the answer is built: what is buffered, decoded and run at once is bounded
    // by the slots.
    let _slot = admit_inference(&state, &name).await?;
    let body = read_body(&state, &headers, body).await;
    let started = Instant::now();
    let request = body.and_then(|body| decode(&headers, &body));
    let header_key = headers.get(ROUTING_KEY_HEADER).and_then(|v| v.to_str().ok());
    let encoded = serve_inference(&state, name, version, request, header_key, started, |a| {
        oip::encode_response(a.name, a.version, a.id, a.entity_ids, &a.outputs)
    })
    .await?;
    let mut response = Response::new(Body::from(encoded.body));
    let response_headers = response.headers_mut();
    match encoded.json_len {
        Some(n) => {
            response_headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            response_headers.insert(oip::HEADER_CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            response_headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
    }
    Ok(response)
}

/// Admits an inference request to `name`: NOT_FOUND for a model the agent does not hold,
/// else a request slot (waited for at most the queue timeout). The slot is held until the
/// answer is built.
pub(crate) async fn admit_inference(state: &AppState, name: &str) -> Result<Slot, ApiError> {
    if !state.registry.catalog().models.contains_key(name) {
        return Err(ApiError::NotFound(format!("unknown model {name:?}")));
    }
    admit(state).await
}

/// What an inference answered, for the transport to encode.
pub(crate) struct Answer<'a> {
    /// The model (a derived model's name when one serves the request).
    pub(crate) name: &'a str,
    /// The version that served it.
    pub(crate) version: u64,
    /// The client's request id.
    pub(crate) id: Option<&'a str>,
    /// The entities the request named, echoed.
    pub(crate) entity_ids: Option<&'a [String]>,
    /// The outputs asked for, in order.
    pub(crate) outputs: Vec<OutputToSend<'a>>,
}

/// Serves a decoded (or refused) inference request to `name`, whatever its transport:
/// chooses the version (the one named; else the rollout variant of its routing key, or of
/// `header_key`; else the active one), runs it, and has `encode` build the answer; records
/// a refusal against the version that would have served it.
pub(crate) async fn serve_inference<R>(
    state: &AppState,
    name: String,
    version: Option<u64>,
    request: Result<oip::InferRequest, ApiError>,
    header_key: Option<&str>,
    started: Instant,
    encode: impl FnOnce(Answer<'_>) -> R,
) -> Result<R, ApiError> {
    let catalog = state.registry.catalog();
    let target = target(state, &catalog, name, version, request.as_ref().ok(), header_key);
    let (version, found) = lookup(&catalog, &target.name, target.version)?;
    let model = loaded(&target.name, version, found)?;
    drop(catalog);
    let answered = match request {
        Ok(request) => {
            infer_loaded(
                state,
                &target.name,
                version,
                &model,
                request,
                target.mirror,
                started,
                encode,
            )
            .await
        }
        Err(e) => Err(e),
    };
    if answered.is_err() && state.config.metrics {
        model.metrics.record_refused();
    }
    answered
}

fn decode(headers: &HeaderMap, body: &[u8]) -> Result<oip::InferRequest, ApiError> {
    let json_len = match headers.get(oip::HEADER_CONTENT_LENGTH) {
        None => None,
        Some(v) => {
            Some(v.to_str().ok().and_then(|v| v.parse::<usize>().ok()).ok_or_else(|| {
                ApiError::BadRequest("Inference-Header-Content-Length is not a number".into())
            })?)
        }
    };
    oip::decode_request(body, json_len).map_err(|e| ApiError::BadRequest(e.0))
}

/// The model version that serves a request, and the candidate that also runs it when it
/// is mirrored.
struct Target {
    name: String,
    version: Option<u64>,
    mirror: Option<Arc<LoadedVersion>>,
}

/// Which version serves a request: the one it names; else, during a rollout, the variant
/// its routing key falls to (the baseline while the candidate is not loaded); else a
/// derived model overlaying the name, or the active version.
fn target(
    state: &AppState,
    catalog: &Catalog,
    name: String,
    version: Option<u64>,
    request: Option<&oip::InferRequest>,
    header_key: Option<&str>,
) -> Target {
    if version.is_some() {
        return Target { name, version, mirror: None };
    }
    if let Some(live) = catalog.rollouts.get(&name) {
        let random;
        let key = if let Some(key) = request.and_then(|r| r.routing_key.as_deref()).or(header_key) {
            key.as_bytes()
        } else {
            random = state.keys.next();
            &random[..]
        };
        let assignment = live.route(key, Timestamp::from_system(SystemTime::now()));
        let candidate =
            catalog.models.get(&name).and_then(|m| match m.versions.get(&live.spec.candidate) {
                Some(VersionState::Ready(v)) => Some(Arc::clone(v)),
                _ => None,
            });
        return match candidate {
            Some(_) if assignment.candidate => {
                Target { name, version: Some(live.spec.candidate), mirror: None }
            }
            candidate => Target {
                name,
                version: Some(live.spec.baseline),
                mirror: candidate.filter(|_| assignment.mirrored),
            },
        };
    }
    match catalog.serving(&name) {
        (derived, Some(v)) => Target { name: derived.to_owned(), version: Some(v), mirror: None },
        _ => Target { name, version: None, mirror: None },
    }
}

/// The input of a request that names entities: the model's features of each, from the
/// active snapshot of the model's view.
fn entity_input(
    state: &AppState,
    name: &str,
    model: &LoadedVersion,
    request: &oip::InferRequest,
    entities: &[String],
) -> Result<oip::NamedTensor, ApiError> {
    let input = model
        .manifest
        .model()
        .and_then(|m| m.features.as_ref())
        .ok_or_else(|| FeatureError::NoFeatureInput { model: name.to_owned() })?;
    if !request.inputs.is_empty() {
        return Err(FeatureError::InputsAndEntities.into());
    }
    let tensor = features::assemble(&state.registry.catalog(), name, input, entities)?;
    let spec = model.engine.signature().inputs.first().ok_or_else(|| {
        ApiError::Internal(format!("model {name:?} with a feature input has no input"))
    })?;
    Ok(oip::NamedTensor { name: spec.name.clone(), tensor })
}

/// Serves one request to a loaded version; records its inputs, outputs and latency, what
/// it answered (for feedback), and hands a mirrored request to the shadow queue.
#[allow(clippy::too_many_arguments)] // each is one part of the request; a struct would only rename them
async fn infer_loaded<R>(
    state: &AppState,
    name: &str,
    version: u64,
    model: &Arc<LoadedVersion>,
    mut request: oip::InferRequest,
    mirror: Option<Arc<LoadedVersion>>,
    started: Instant,
    encode: impl FnOnce(Answer<'_>) -> R,
) -> Result<R, ApiError> {
    let entities = request.entity_ids.take();
    if let Some(entities) = &entities {
        let input = entity_input(state, name, model, &request, entities)?;
        request.inputs.push(input);
    }

    let signature = model.engine.signature();
    let given: Vec<_> = request
        .inputs
        .iter()
        .map(|i| falaj_common::tensor::GivenInput {
            name: &i.name,
            datatype: i.tensor.data.datatype(),
            shape: &i.tensor.shape,
        })
        .collect();
    let (order, _symbols) =
        signature.bind(&given).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let wanted: Vec<(usize, bool)> = match &request.outputs {
        None => (0..signature.outputs.len()).map(|i| (i, request.binary_by_default)).collect(),
        Some(outputs) => outputs
            .iter()
            .map(|o| {
                signature
                    .outputs
                    .iter()
                    .position(|s| s.name == o.name)
                    .map(|i| (i, o.binary))
                    .ok_or_else(|| ApiError::BadRequest(format!("unknown output {:?}", o.name)))
            })
            .collect::<Result<_, _>>()?,
    };
    let mut inputs: Vec<Option<falaj_common::tensor::Tensor>> = vec![None; order.len()];
    for (input, index) in request.inputs.into_iter().zip(order) {
        inputs[index] = Some(input.tensor);
    }
    let inputs: Vec<_> =
        inputs.into_iter().map(|t| t.expect("bind checked every input is given once")).collect();
    let mirrored = mirror.and_then(|candidate| mirrored_inputs(signature, &inputs, candidate));

    let rows = inputs.first().and_then(|t| t.shape.first().copied()).unwrap_or(1);
    if state.config.metrics {
        model.metrics.record_inputs(&inputs);
    }
    let outputs = run_model(state, model, inputs, rows).await?.map_err(|e| {
        tracing::warn!(model = %name, version, error = %e, "inference failed");
        ApiError::BadRequest(format!("inference failed: {e}"))
    })?;

    let to_send: Vec<OutputToSend<'_>> = wanted
        .iter()
        .map(|&(i, binary)| OutputToSend {
            name: &signature.outputs[i].name,
            tensor: &outputs[i],
            binary,
        })
        .collect();
    let encoded = encode(Answer {
        name,
        version,
        id: request.id.as_deref(),
        entity_ids: entities.as_deref(),
        outputs: to_send,
    });
    if state.config.metrics {
        model.metrics.record(started.elapsed(), Some(&outputs));
        if let Some(id) = &request.id
            && let Some(answers) = falaj_common::outcomes::answers(&outputs)
        {
            state.predictions.record(id, name, version, answers, Instant::now());
        }
    }
    if let Some((candidate, inputs)) = mirrored {
        let baseline =
            signature.outputs.iter().map(|s| s.name.clone()).zip(outputs.iter().cloned()).collect();
        state.shadow.submit(ShadowJob { candidate, inputs, baseline });
    }
    tracing::debug!(model = %name, version, micros = started.elapsed().as_micros() as u64, "inference");
    Ok(encoded)
}
