//! Serves an axum router over HTTP/1.1 to clients that may be slow or hostile: a deadline
//! on each request head, a cap on open connections, and a shutdown that drops at once what
//! has no request in flight and gives requests in flight a bounded grace.
//!
//! `axum::serve` exposes none of these (it runs hyper without a timer), hence this loop on
//! hyper directly; both daemons serve their HTTP APIs with it, in plain HTTP or over TLS
//! ([`serve_tls`]; the handshake counts against the head's deadline).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tower_service::Service;

use crate::tls::ReloadableTls;

/// How a request reached the server, in every request's extensions: a console marks its
/// cookies `Secure` when it is [`Scheme::Https`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

/// A connection's byte stream, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The limits of one HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Longest a client may take to send a request head, from the moment the connection
    /// waits for one (a fresh connection, or a kept-alive one between requests); the
    /// connection is closed after it.
    pub header_timeout: Duration,
    /// Connections open at once. Past it, new connections wait in the kernel's accept queue
    /// (they are accepted when one closes), so a flood costs the kernel backlog, not memory.
    pub max_connections: usize,
    /// How long requests in flight at shutdown may take to finish before their connections
    /// are dropped.
    pub grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_connections: 1024,
            grace: Duration::from_secs(30),
        }
    }
}

/// Where the server is in its stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// Connections with no request begun are dropped; the others finish what they serve.
    Draining,
    /// The grace is over: every connection is dropped.
    Closing,
}

/// Serves `router` on `listener` within `limits` until `shutdown` completes, then stops
/// accepting, drops idle and half-sent connections at once, lets requests in flight finish
/// for at most `limits.grace`, and returns. Requests carry the peer's address as
/// [`ConnectInfo`] of a `SocketAddr`; accepted sockets have `TCP_NODELAY` set (responses
/// are written whole; Nagle's algorithm would only delay them).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(listener, router, limits, None, shutdown).await;
}

/// [`serve`] over TLS with `tls`'s configuration at the time each connection is
/// accepted (so [`ReloadableTls::reload`] applies to new connections). A client must
/// finish its handshake within the head's deadline.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Arc<ReloadableTls>,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(listener, router, limits, Some(tls), shutdown).await;
}

async fn serve_with(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Option<Arc<ReloadableTls>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let slots = Arc::new(Semaphore::new(max));
    let (phase_tx, phase_rx) = watch::channel(Phase::Serving);
    tokio::pin!(shutdown);
    loop {
        // A slot first: past the cap, connections stay in the kernel's queue, unaccepted.
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) if is_connection_error(&err) => continue,
                Err(err) => {
                    // Out of file descriptors or the like: wait rather than spin.
                    tracing::warn!(error = %err, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "could not set TCP_NODELAY");
        }
        let begun = Arc::new(AtomicBool::new(false));
        let scheme = if tls.is_some() { Scheme::Https } else { Scheme::Http };
        let service = {
            let begun = Arc::clone(&begun);
            let router = router.clone();
            hyper::service::service_fn(move |mut request: Request<Incoming>| {
                begun.store(true, Ordering::Relaxed);
                request.extensions_mut().insert(ConnectInfo(peer));
                request.extensions_mut().insert(scheme);
                router.clone().call(request)
            })
        };
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        let builder = builder.clone();
        let mut phase = phase_rx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let io: Box<dyn Io> = match acceptor {
                None => Box::new(stream),
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(limits.header_timeout, acceptor.accept(stream));
                    tokio::select! {
                        done = handshake => match done {
                            Ok(Ok(stream)) => Box::new(stream),
                            Ok(Err(err)) => {
                                tracing::debug!(%peer, error = %err, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        },
                        () = reached(&mut phase, Phase::Draining) => return,
                    }
                }
            };
            let connection = builder.serve_connection(TokioIo::new(io), service);
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = reached(&mut phase, Phase::Draining) => {
                    // Hyper's own graceful stop waits for a fresh connection's first request
                    // however slowly it comes: drop such a connection instead.
                    if !begun.load(Ordering::Relaxed) {
                        return;
                    }
                    connection.as_mut().graceful_shutdown();
                    tokio::select! {
                        ended = connection.as_mut() => ended,
                        () = reached(&mut phase, Phase::Closing) => return,
                    }
                }
            };
            if let Err(err) = ended {
                tracing::debug!(%peer, error = %err, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = phase_tx.send(Phase::Draining);
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.grace, slots.acquire_many(all)).await.is_err() {
        tracing::warn!(grace = ?limits.grace, "requests still in flight after the grace period are dropped");
        let _ = phase_tx.send(Phase::Closing);
        let _ = slots.acquire_many(all).await;
    }
}

/// Waits until the server's phase is `at` or later (or the server is gone).
async fn reached(phase: &mut watch::Receiver<Phase>, at: Phase) {
    let _ = phase.wait_for(|p| *p >= at).await;
}

/// Errors of one connection that leave the listener working.
fn is_connection_error(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
