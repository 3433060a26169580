//! The endpoint's HTTP/2 server, on the `h2` crate directly: each accepted socket (or TLS
//! stream) is one HTTP/2 connection whose calls are all served within the connection's own
//! task; a call is routed by its path to ModelInfer's own path ([`super::unary`]), the
//! health service, or the generated inference service; the connections are asked to finish
//! (GOAWAY) at shutdown.
//!
//! tonic's own server (`tonic::transport::Server`) put a stack in front of every call: an
//! axum router matching the path, a boxed service clone, connection info stored in the
//! request's extensions, a tracing span, its own timeout layer and error recovery. hyper's
//! HTTP/2 server, which served the endpoint next, hands each call to an executor (a task
//! per call with tokio's: a spawn, and a wake across tasks for the answer; an executor
//! that queued the calls for the connection's task took that off), wraps the h2 stream in
//! a request body and pipes a boxed answer body back through a state machine of its own,
//! and adds a `date` header to every answer (gRPC has no use for it; grpc-go's server
//! sends none, nor does this one). Here the connection's task ([`drive`]) accepts the h2
//! streams and polls their calls in a `FuturesUnordered` beside the connection, polling
//! the connection again after a call ended so that its answer is queued in the same turn;
//! what h2 wrote in the turn goes to the socket in one write when the turn ends
//! ([`super::coalesce`]: h2 alone wrote an answer of 256 bytes or more in two). The
//! connection and calls are polled with [`super::turn`]'s waker, so that h2 waking the
//! connection as a call queues its answer is served within the turn rather than by the
//! runtime (which took a self-wake for a yield and woke a parked worker, a `futex` a
//! call). ModelInfer ([`super::unary`]) reads its message from the stream and
//! queues HEADERS, DATA and trailers itself; every other call goes through
//! [`super::exchange`] (hyper's adaptors, rewritten with its rules) to the generated
//! services, wrapped as before in the deadline ([`super::deadline`]) and the over-limit
//! rewrite.
//!
//! Inference runs in the call's future, so on the connection's task when the run is short
//! (`server::INLINE_BUDGET`), else on the blocking pool: calls multiplexed on one
//! connection run in parallel unless they are short. Streams (ModelStreamInfer) keep a
//! task of their own for their messages (`service`).
//!
//! The connection's settings are hyper's defaults (200 concurrent streams, a 16 KiB header
//! list, 400 KiB of buffered answer a stream, 1024 streams reset for the client's errors)
//! with the endpoint's fixed flow-control windows and frames of up to [`MAX_FRAME`].

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use h2::RecvStream;
use h2::server::SendResponse;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt as _};
use tonic::codegen::{BoxFuture, http};

use super::exchange::{self, Incoming};
use super::proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use super::service::Inference;
use super::{
    CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW, coalesce, deadline, over_limit, turn, unary,
    wait_down,
};

/// The health service's path prefix.
const HEALTH: &str = "/grpc.health.v1.Health/";

/// The one method whose errors can come in trailers after a response began, so the only
/// one whose body is watched for tonic's over-limit status (a unary call refused for its
/// size is answered trailers-only, in the headers).
const STREAM_INFER: &str = "/inference.GRPCInferenceService/ModelStreamInfer";

/// Both services, routed by path; a path of neither is the inference service's
/// UNIMPLEMENTED, as tonic's router answers. ModelInfer's own path is taken before these
/// ([`start`]); a compressed ModelInfer call comes here.
#[derive(Clone)]
pub(super) struct Routes<H> {
    /// The service ModelInfer's own path serves calls with ([`super::unary`]).
    pub(super) unary: std::sync::Arc<Inference>,
    pub(super) inference: GrpcInferenceServiceServer<Inference>,
    pub(super) health: H,
    /// `[http] max_body_bytes`: ModelInfer's own limit, named in the over-limit message.
    pub(super) limit: usize,
}

type Answer = http::Response<tonic::body::Body>;

impl<H, B> tower::Service<http::Request<B>> for Routes<H>
where
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
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

/// A call's future, polled by its connection's task: ModelInfer's own (not boxed: the
/// set's node holds it), or any other.
#[allow(
    clippy::large_enum_variant,
    reason = "ModelInfer, the hot path, is held in the set's node without a box of its own"
)]
enum Call {
    Infer(unary::Call),
    Other(Pin<Box<dyn Future<Output = ()> + Send>>),
}

impl Future for Call {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut() {
            Call::Infer(call) => Pin::new(call).poll(cx),
            Call::Other(call) => call.as_mut().poll(cx),
        }
    }
}

/// Starts the call of an accepted stream.
fn start<H>(
    routes: &Routes<H>,
    service: &mut deadline::Deadline<Routes<H>>,
    request: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
) -> Call
where
    deadline::Deadline<Routes<H>>: tower::Service<
            http::Request<Incoming>,
            Response = Answer,
            Error = Infallible,
            Future = deadline::Answer<Routed>,
        >,
{
    use tower::Service as _;
    if unary::takes(&request) {
        let inference = std::sync::Arc::clone(&routes.unary);
        return Call::Infer(unary::Call::new(inference, request, respond, routes.limit));
    }
    let answer = service.call(request.map(Incoming::new));
    Call::Other(Box::pin(exchange::respond(answer, respond)))
}

/// Polls a connection and its calls in one task: the connection (which reads frames,
/// yields new calls and writes what calls queued), then its calls, again until no call was
/// started and none ended. Ready when the connection has closed; calls still pending then
/// have lost their stream and are dropped.
fn drive<IO, H>(
    connection: &mut h2::server::Connection<IO, Bytes>,
    routes: &Routes<H>,
    service: &mut deadline::Deadline<Routes<H>>,
    calls: &mut FuturesUnordered<Call>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), h2::Error>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    deadline::Deadline<Routes<H>>: tower::Service<
            http::Request<Incoming>,
            Response = Answer,
            Error = Infallible,
            Future = deadline::Answer<Routed>,
        >,
{
    use futures_util::StreamExt as _;
    loop {
        let mut progressed = false;
        loop {
            match connection.poll_accept(cx) {
                Poll::Ready(Some(Ok((request, respond)))) => {
                    calls.push(start(routes, service, request, respond));
                    progressed = true;
                }
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Err(err)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => break,
            }
        }
        while let Poll::Ready(Some(())) = calls.poll_next_unpin(cx) {
            progressed = true;
        }
        if !progressed {
            return Poll::Pending;
        }
    }
}

/// Settings of every connection: hyper's defaults, the endpoint's windows and frame size.
fn builder() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    // Fixed flow-control windows of a few MiB let a large message arrive without a round
    // trip per 64 KiB, without the adaptive window's BDP pings on every busy connection.
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(16 << 10)
        .max_concurrent_streams(200)
        .max_send_buffer_size(400 << 10)
        .max_local_error_reset_streams(Some(1024));
    builder
}

/// `done`, a poll of the connection, once what it wrote has been written; an error writing
/// it ends the connection. A connection that has ended wrote its last frames as it shut
/// down, so its end is not held up by a full socket.
fn flushed<T, IO: AsyncWrite + Unpin>(
    done: Poll<Result<T, h2::Error>>,
    flush: &coalesce::Flush<IO>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<T>> {
    match (flush.poll_flush(cx), done) {
        (_, Poll::Ready(done)) => Poll::Ready(done.map_err(io::Error::other)),
        (Poll::Ready(Err(err)), Poll::Pending) => Poll::Ready(Err(err)),
        (_, Poll::Pending) => Poll::Pending,
    }
}

/// Serves one connection until it closes; asked to finish (GOAWAY, then the calls in
/// flight) when `down` turns true.
async fn connection<IO, H>(
    io: IO,
    routes: Routes<H>,
    mut down: watch::Receiver<bool>,
) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    Routes<H>: Clone,
    deadline::Deadline<Routes<H>>: tower::Service<
            http::Request<Incoming>,
            Response = Answer,
            Error = Infallible,
            Future = deadline::Answer<Routed>,
        >,
{
    // What h2 writes in a turn of this task leaves in one write, after the turn.
    let (io, flush) = coalesce::pair(io);
    let mut handshake = std::pin::pin!(builder().handshake::<_, Bytes>(io));
    let handshake = std::future::poll_fn(|cx| flushed(handshake.as_mut().poll(cx), &flush, cx));
    let mut connection = tokio::select! {
        connection = handshake => connection?,
        () = wait_down(&mut down) => return Ok(()),
    };
    let mut service = deadline::Deadline::new(routes.clone());
    let mut calls = FuturesUnordered::new();
    let mut stopping = std::pin::pin!(wait_down(&mut down));
    let mut asked = false;
    let turn = turn::Turn::new();
    std::future::poll_fn(|cx| {
        if !asked && stopping.as_mut().poll(cx).is_ready() {
            connection.graceful_shutdown();
            asked = true;
        }
        turn.enter(cx);
        let mut inner = Context::from_waker(turn.waker());
        let mut rounds = 0;
        let done = loop {
            let done = drive(&mut connection, &routes, &mut service, &mut calls, &mut inner);
            if done.is_ready() || !turn.leave() {
                break done;
            }
            rounds += 1;
            if rounds == turn::AGAIN {
                turn.yield_now(cx);
                break Poll::Pending;
            }
        };
        flushed(done, &flush, cx)
    })
    .await
}

/// Serves every connection `incoming` yields with `routes` until `down` turns true, then
/// stops accepting, asks each open connection to finish its calls, and returns once all
/// have closed.
pub(super) async fn serve<I, IO, H>(incoming: I, routes: Routes<H>, mut down: watch::Receiver<bool>)
where
    I: Stream<Item = IO>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Routes<H>: Clone + Send + Sync + 'static,
    deadline::Deadline<Routes<H>>: tower::Service<
            http::Request<Incoming>,
            Response = Answer,
            Error = Infallible,
            Future = deadline::Answer<Routed>,
        > + Send,
{
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
        let (open, down, routes) = (open.clone(), down.clone(), routes.clone());
        tokio::spawn(async move {
            if let Err(err) = connection(io, routes, down).await {
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
