//! The endpoint's HTTP/2 server: hyper's HTTP/2 connections over the accepted sockets (or
//! the TLS accept loop's streams), each call routed by its path to the inference or the
//! health service, and the connections asked to finish (GOAWAY) at shutdown.
//!
//! tonic's own server (`tonic::transport::Server`) put a stack in front of every call: an
//! axum router matching the path, a boxed service clone, connection info stored in the
//! request's extensions, a tracing span, its own timeout layer and error recovery. On the
//! sample model at batch 1 that stack was about 3 µs of the server's time a call against
//! REST (a `perf` profile of `benches/grpc.rs`); here a call is one path comparison, the
//! deadline ([`super::deadline`]) and the generated service, or for ModelInfer, the hot
//! path, the service's method with the call's message framed by hand ([`super::unary`]).
//!
//! **A connection's calls run in the connection's own task.** hyper's HTTP/2 server hands
//! each call (an `H2Stream` future: the service's future, then the response piped to h2)
//! to its executor; with tokio's, that is a task per call, so a call cost a spawn, and
//! its answer a wake across tasks (the call's task wrote into h2's buffers, then woke the
//! connection's task to flush them), where hyper's HTTP/1.1 server (REST) reads, runs and
//! writes in the connection's one task. Here the executor ([`Inline`]) only queues the
//! future; the connection's task ([`drive`]) moves it into a `FuturesUnordered` and polls
//! the calls alongside the connection, polling the connection again after a call ended so
//! that its answer is flushed in the same turn, in one write. Inference itself still runs
//! on the blocking pool, so calls multiplexed on one connection still run in parallel;
//! only their (short) protocol work shares the connection's task. Streams
//! (ModelStreamInfer) keep their own task for their messages (`service`).
//!
//! Serving calls on the `h2` crate directly (flow control by hand as well) would take
//! hyper's layer off the unary path too; this keeps every service (health, streaming, the
//! deadline and over-limit wrappers) as it is.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::stream::FuturesUnordered;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt as _};
use tonic::codegen::{BoxFuture, http};

use super::proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use super::service::Inference;
use super::{CONNECTION_WINDOW, STREAM_WINDOW, deadline, over_limit, unary, wait_down};

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
    /// The service ModelInfer calls are served by ([`super::unary`]).
    pub(super) unary: std::sync::Arc<Inference>,
    pub(super) inference: GrpcInferenceServiceServer<Inference>,
    pub(super) health: H,
    /// `[http] max_body_bytes`, named in the over-limit message.
    pub(super) limit: usize,
}

type Answer = http::Response<tonic::body::Body>;

impl<H, B> tower::Service<http::Request<B>> for Routes<H>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin + Send + 'static,
    B::Error: std::fmt::Display,
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
        if unary::takes(&request) {
            let (inference, limit) = (std::sync::Arc::clone(&self.unary), self.limit);
            let answer = async move { Ok(unary::model_infer(&inference, request, limit).await) };
            return Routed { inner: Box::pin(answer), limit: None, trailers: false };
        }
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

/// A call's future as hyper hands it to the executor.
type Call = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor of one connection: it queues the calls hyper starts, for the connection's
/// own task to poll ([`drive`]). hyper only starts calls while that task polls the
/// connection, so the queue is drained right after, without a wake.
#[derive(Clone, Default)]
struct Inline {
    queue: std::sync::Arc<std::sync::Mutex<Vec<Call>>>,
}

impl<F> hyper::rt::Executor<F> for Inline
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, call: F) {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Box::pin(call));
    }
}

impl Inline {
    /// Moves the queued calls into `calls`; true when there were any.
    fn drain_into(&self, calls: &mut FuturesUnordered<Call>) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let started = !queue.is_empty();
        calls.extend(queue.drain(..));
        started
    }
}

/// Polls a connection and its calls in one task: the connection (which reads new calls
/// and flushes what calls wrote), then its calls, again until no call was started and
/// none ended. Ready when the connection is; calls still pending then have
/// lost their stream and are dropped.
fn drive<C>(
    mut connection: Pin<&mut C>,
    executor: &Inline,
    calls: &mut FuturesUnordered<Call>,
    cx: &mut Context<'_>,
) -> Poll<C::Output>
where
    C: Future,
{
    use futures_util::StreamExt as _;
    loop {
        if let Poll::Ready(ended) = connection.as_mut().poll(cx) {
            return Poll::Ready(ended);
        }
        let mut progressed = executor.drain_into(calls);
        while let Poll::Ready(Some(())) = calls.poll_next_unpin(cx) {
            progressed = true;
        }
        // A call may start another (hyper's upgrades do): queued, it is polled next turn.
        if !executor.drain_into(calls) && !progressed {
            return Poll::Pending;
        }
    }
}

/// Settings of every connection, with the connection's executor.
fn builder(executor: Inline) -> hyper::server::conn::http2::Builder<Inline> {
    let mut builder = hyper::server::conn::http2::Builder::new(executor);
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
        let executor = Inline::default();
        let connection =
            builder(executor.clone()).serve_connection(TokioIo::new(io), service.clone());
        let (open, mut down) = (open.clone(), down.clone());
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let mut calls = FuturesUnordered::new();
            let mut stopping = std::pin::pin!(wait_down(&mut down));
            let mut asked = false;
            let served = std::future::poll_fn(|cx| {
                if !asked && stopping.as_mut().poll(cx).is_ready() {
                    connection.as_mut().graceful_shutdown();
                    asked = true;
                }
                drive(connection.as_mut(), &executor, &mut calls, cx)
            })
            .await;
            if let Err(err) = served {
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
