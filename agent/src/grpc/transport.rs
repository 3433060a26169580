//! The endpoint's HTTP/2 server: hyper's HTTP/2 connections over the accepted sockets (or
//! the TLS accept loop's streams), each call routed by its path to the inference or the
//! health service, and the connections asked to finish (GOAWAY) at shutdown.
//!
//! tonic's own server (`tonic::transport::Server`) put a stack in front of every call: an
//! axum router matching the path, a boxed service clone, connection info stored in the
//! request's extensions, a tracing span, its own timeout layer and error recovery. On the
//! sample model at batch 1 that stack was about 3 µs of the server's time a call against
//! REST (a `perf` profile of `benches/grpc.rs`); here a call is one path comparison, the
//! deadline ([`super::deadline`]) and the generated service.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt as _};
use tonic::codegen::{BoxFuture, http};

use super::proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use super::service::Inference;
use super::{CONNECTION_WINDOW, STREAM_WINDOW, deadline, over_limit, wait_down};

/// The health service's path prefix.
const HEALTH: &str = "/grpc.health.v1.Health/";

/// The one method whose errors can come in trailers after a response began, so the only
/// one whose body is watched for tonic's over-limit status (a unary call refused for its
/// size is answered trailers-only, in the headers).
const STREAM_INFER: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

/// Both services, routed by path; a path of neither is the inference service's
/// UNIMPLEMENTED, as tonic's router answers.
#[derive(Clone)]
pub(super) struct Routes<H> {
    pub(super) inference: GrpcInferenceServiceServer<Inference>,
    pub(super) health: H,
    /// `[http] max_body_bytes`, named in the over-limit message.
    pub(super) limit: usize,
}

type Answer = http::Response<tonic::body::Body>;

impl<H, B> tower::Service<http::Request<B>> for Routes<H>
where
    H: tower::Service<
            http::Request<B>,
            Response = Answer,
            Error = Infallible,
            Future = BoxFuture<Answer, Infallible>,
        >,
    GrpcInferenceServiceServer<Inference>: tower::Service<
            http::Request<B>,
            Response = Answer,
            Error = Infallible,
            Future = BoxFuture<Answer, Infallible>,
        >,
{
    type Response = Answer;
    type Error = Infallible;
    type Future = Routed;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    // The generated services are always ready (their `poll_ready` returns `Ready`), so
    // they are called without polling them first.
    fn call(&mut self, request: http::Request<B>) -> Routed {
        let path = request.uri().path();
        if path.starts_with(HEALTH) {
            return Routed { inner: self.health.call(request), limit: None, trailers: false };
        }
        let trailers = path == STREAM_INFER;
        Routed { inner: self.inference.call(request), limit: Some(self.limit), trailers }
    }
}

/// A routed call's answer; an inference call's over-limit status rewritten.
pub(super) struct Routed {
    inner: BoxFuture<Answer, Infallible>,
    limit: Option<usize>,
    trailers: bool,
}

impl Future for Routed {
    type Output = Result<Answer, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let answer = std::task::ready!(this.inner.as_mut().poll(cx));
        Poll::Ready(match (answer, this.limit) {
            (Ok(response), Some(limit)) => Ok(over_limit(response, limit, this.trailers)),
            (answer, _) => answer,
        })
    }
}

/// Settings of every connection.
fn builder() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    // Fixed flow-control windows of a few MiB let a large message arrive without a round
    // trip per 64 KiB, without the adaptive window's BDP pings on every busy connection.
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .adaptive_window(false);
    builder
}

/// Serves every connection `incoming` yields with `routes` until `down` turns true, then
/// stops accepting, asks each open connection to finish its calls, and returns once all
/// have closed.
pub(super) async fn serve<I, IO, H>(incoming: I, routes: Routes<H>, mut down: watch::Receiver<bool>)
where
    I: Stream<Item = IO>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Routes<H>: tower::Service<
            http::Request<hyper::body::Incoming>,
            Response = Answer,
            Error = Infallible,
            Future = Routed,
        > + Clone
        + Send
        + 'static,
{
    let builder = builder();
    let service = hyper_util::service::TowerToHyperService::new(deadline::Deadline::new(routes));
    // Each connection's task holds a sender; the receiver's `recv` ends when all are gone.
    let (open, mut closed) = mpsc::channel::<()>(1);
    let mut incoming = std::pin::pin!(incoming);
    loop {
        let io = tokio::select! {
            () = wait_down(&mut down) => break,
            io = incoming.next() => match io {
                Some(io) => io,
                None => break,
            },
        };
        let connection = builder.serve_connection(TokioIo::new(io), service.clone());
        let (open, mut down) = (open.clone(), down.clone());
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(err) = served {
                        tracing::debug!(error = %err, "gRPC connection ended");
                    }
                    return;
                }
                () = wait_down(&mut down) => connection.as_mut().graceful_shutdown(),
            }
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "gRPC connection ended");
            }
            drop(open);
        });
    }
    drop(open);
    let _ = closed.recv().await;
}

/// The accepted connections of `listener`, with TCP_NODELAY: without it a response
/// written in two segments waited for the client's delayed ACK (about 40 ms a call at
/// batch 64, benches/grpc.rs).
pub(super) fn plain_incoming(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = tokio::net::TcpStream> {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
        .then(|accepted| async move {
            match accepted {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    Some(stream)
                }
                Err(err) => {
                    // Out of file descriptors or the like: wait rather than spin.
                    tracing::warn!(error = %err, "accepting a gRPC connection failed");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    None
                }
            }
        })
        .filter_map(|stream| stream)
}
