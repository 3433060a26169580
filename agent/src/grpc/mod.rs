//! The Open Inference Protocol's gRPC binding (`inference.GRPCInferenceService` of KServe v2,
//! with Triton's ModelStreamInfer and the repository extension's RepositoryIndex), and
//! `grpc.health.v1`, served from the agent beside REST when `[grpc] listen` is set.
//!
//! A thin shell: requests are translated to the same [`oip::InferRequest`](crate::oip) the
//! REST side decodes and served by the same functions of [`crate::server`] (admission
//! through the same request slots, version selection, rollout routing, entity inputs,
//! metrics and drift), then translated back. Errors carry REST's messages with the status
//! codes Triton uses: INVALID_ARGUMENT for malformed requests, NOT_FOUND for unknown models
//! and versions, UNAVAILABLE for a version that is not loaded, RESOURCE_EXHAUSTED when every
//! request slot stays taken or a message exceeds `[http] max_body_bytes`.
//!
//! With `[http] tls_certificate` the endpoint serves TLS only (ALPN `h2`), from the same
//! reloadable certificate and client CA as REST; API keys come in the `authorization`
//! metadata (`Bearer KEY`) and are refused UNAUTHENTICATED or PERMISSION_DENIED with
//! REST's messages. ServerLive, ServerReady and `grpc.health.v1` stay open.
//!
//! The parts: `transport` serves the HTTP/2 connections (on h2 directly), each connection's
//! calls polled within the connection's own task, and routes a call by its path;
//! `coalesce` holds what h2 writes in a turn of that task for one write, and `turn` keeps
//! the wakes of a turn within it; `unary`
//! serves ModelInfer, the hot path, on its h2 stream, framing the messages by hand;
//! `exchange` carries every other call between its h2 stream and the generated services;
//! `service` is the generated service's implementation (everything but ModelInfer's own
//! path, ModelStreamInfer included, goes through tonic's generated code); `deadline` ends a
//! call past its `grpc-timeout`; `convert` translates the messages.

mod coalesce;
mod convert;
mod deadline;
mod exchange;
mod service;
mod transport;
mod turn;
mod unary;

use std::sync::Arc;

use falaj_shell::tls::ReloadableTls;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::Status;
use tonic::codegen::http;
use tonic_health::ServingStatus;

use crate::server::{ApiError, AppState, ServeError};

/// gRPC's own headers, named once: a header named by a string is parsed (its case checked,
/// the standard names searched) on every lookup and insert.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");
const GRPC_ENCODING: http::HeaderName = http::HeaderName::from_static("grpc-encoding");
const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// The messages and services generated from `agent/proto/grpc_predict_v2.proto` at build
/// time; the client is for tests and benchmarks.
#[allow(
    missing_docs,
    unused_qualifications,
    clippy::pedantic,
    clippy::default_trait_access,
    reason = "generated code"
)]
pub mod proto {
    tonic::include_proto!("inference");
}

/// The HTTP/2 flow-control window of each call, bytes (the server's; clients set their own).
pub const STREAM_WINDOW: u32 = 4 << 20;

/// The HTTP/2 flow-control window of each connection, bytes.
pub const CONNECTION_WINDOW: u32 = 8 << 20;

/// The largest frame a client may send (SETTINGS_MAX_FRAME_SIZE). h2's client (tonic's
/// too) writes each DATA frame in a write of its own, so at HTTP/2's default of 16 KiB a
/// 768 KiB message went out in 48 writes and came in as about as many reads (`strace -c`
/// of benches/grpc.rs, the CNN at batch 64; REST: two writes and three reads a call). A
/// frame is held whole before h2 passes it on, within the windows, which already let a
/// connection hold [`CONNECTION_WINDOW`] of unread data.
pub const MAX_FRAME: u32 = 1 << 20;

/// The service name health checks and reflection know the endpoint by.
pub const SERVICE_NAME: &str = "inference.GRPCInferenceService";

/// The status code and message of a refused request: REST's message, Triton's code.
pub(crate) fn status(error: ApiError) -> Status {
    match error {
        ApiError::BadRequest(m)
        | ApiError::Unprocessable(m)
        | ApiError::UnsupportedMediaType(m) => Status::invalid_argument(m),
        ApiError::NotFound(m) => Status::not_found(m),
        ApiError::MethodNotAllowed(m) => Status::unimplemented(m),
        ApiError::Conflict(m) => Status::failed_precondition(m),
        ApiError::Timeout(m) => Status::deadline_exceeded(m),
        ApiError::TooLarge(limit) => {
            Status::resource_exhausted(format!("request exceeds the limit of {limit} bytes"))
        }
        ApiError::Unavailable(m) => Status::unavailable(m),
        ApiError::Busy(m) | ApiError::Throttled { message: m, .. } => Status::resource_exhausted(m),
        ApiError::Unauthenticated(m) => Status::unauthenticated(m),
        ApiError::Forbidden(m) => Status::permission_denied(m),
        ApiError::Internal(detail) => {
            tracing::error!(error = %detail, "internal error");
            Status::internal("internal error")
        }
    }
}

/// Serves the endpoint on `listener` (over TLS when `tls` is given) until `down` turns
/// true; streams still open `shutdown_grace` later are dropped.
pub(crate) async fn serve(
    listener: TcpListener,
    state: AppState,
    tls: Option<Arc<ReloadableTls>>,
    mut down: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let addr = listener.local_addr().map_err(|e| ServeError::Grpc {
        addr: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        message: e.to_string(),
    })?;
    let limit = state.config.max_body_bytes;
    let grace = state.config.shutdown_grace;
    let handshake_limit = state.config.header_timeout;
    let (reporter, health) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(report_health(reporter, state.clone(), down.clone()));
    let unary = Arc::new(service::Inference { state });
    let inference = proto::grpc_inference_service_server::GrpcInferenceServiceServer::from_arc(
        Arc::clone(&unary),
    )
    .max_decoding_message_size(limit);
    let routes = transport::Routes { unary, inference, health, limit };
    let stop = down.clone();
    let served = async move {
        match tls {
            None => transport::serve(transport::plain_incoming(listener), routes, stop).await,
            Some(tls) => {
                let incoming = tls_incoming(listener, tls, handshake_limit, stop.clone());
                transport::serve(incoming, routes, stop).await;
            }
        }
    };
    tokio::select! {
        () = served => {}
        () = async { wait_down(&mut down).await; tokio::time::sleep(grace).await } => {
            tracing::warn!(%addr, ?grace, "gRPC calls still open after the shutdown grace were dropped");
        }
    }
    health_task.abort();
    Ok(())
}

/// tonic refuses a message over the decoding limit with OUT_OF_RANGE (in the headers of a
/// unary call, in the trailers of a stream's); gRPC's own servers (Triton's among them) say
/// RESOURCE_EXHAUSTED, and REST says 413 with the message given here. The body is only
/// watched when `trailers` (a stream), as that costs an allocation.
fn over_limit(
    response: http::Response<tonic::body::Body>,
    limit: usize,
    trailers: bool,
) -> http::Response<tonic::body::Body> {
    use http_body_util::BodyExt as _;
    let rewrite = move |headers: &mut http::HeaderMap| {
        let too_large = headers.get(&GRPC_STATUS).is_some_and(|s| s == "11")
            && headers.get(&GRPC_MESSAGE).is_some_and(|m| {
                m.to_str().is_ok_and(|m| m.replace("%20", " ").contains("message length too large"))
            });
        if too_large {
            headers.insert(GRPC_STATUS, http::HeaderValue::from_static("8"));
            let message = format!("request exceeds the limit of {limit} bytes");
            if let Ok(value) = http::HeaderValue::from_str(&message.replace(' ', "%20")) {
                headers.insert(GRPC_MESSAGE, value);
            }
        }
    };
    let (mut parts, body) = response.into_parts();
    rewrite(&mut parts.headers);
    if !trailers {
        return http::Response::from_parts(parts, body);
    }
    let body = body.map_frame(move |frame| match frame.into_trailers() {
        Ok(mut trailers) => {
            rewrite(&mut trailers);
            http_body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    });
    http::Response::from_parts(parts, tonic::body::Body::new(body))
}

/// The connections of `listener` after their TLS handshake, with the configuration in
/// force when each was accepted (so a reload applies to new connections) and ALPN `h2`,
/// which gRPC clients require. Handshakes run apart from the accept loop, each within
/// `limit`; one that fails or takes longer is dropped.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<ReloadableTls>,
    limit: std::time::Duration,
    mut down: watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut h2: Option<(Arc<rustls::ServerConfig>, Arc<rustls::ServerConfig>)> = None;
        loop {
            let (stream, peer) = tokio::select! {
                () = wait_down(&mut down) => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors or the like: wait rather than spin.
                        tracing::warn!(error = %err, "accepting a gRPC connection failed");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let current = Arc::clone(tls.acceptor().config());
            let config = match &h2 {
                Some((base, derived)) if Arc::ptr_eq(base, &current) => Arc::clone(derived),
                _ => {
                    let mut config = (*current).clone();
                    config.alpn_protocols = vec![b"h2".to_vec()];
                    let derived = Arc::new(config);
                    h2 = Some((current, Arc::clone(&derived)));
                    derived
                }
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(stream).await;
                    }
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, error = %err, "gRPC TLS handshake failed");
                    }
                    Err(_) => tracing::debug!(%peer, "gRPC TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn wait_down(down: &mut watch::Receiver<bool>) {
    let _ = down.wait_for(|d| *d).await;
}

/// Keeps `grpc.health.v1` in step with readiness: SERVING (for the server, "", and for the
/// inference service) while every active version is loaded, NOT_SERVING otherwise and
/// after shutdown begins.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    state: AppState,
    mut down: watch::Receiver<bool>,
) {
    let mut reloads = state.registry.reloads();
    loop {
        let serving = if *down.borrow() {
            ServingStatus::NotServing
        } else if state.registry.catalog().ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in ["", SERVICE_NAME] {
            reporter.set_service_status(name, serving).await;
        }
        tokio::select! {
            changed = reloads.changed() => if changed.is_err() { return },
            changed = down.changed() => if changed.is_err() { return },
        }
    }
}
