//! One call's exchange over an h2 stream, for the calls the generated services answer
//! (everything but ModelInfer's own path, [`super::unary`]): the request's DATA frames as an
//! [`http_body::Body`] ([`Incoming`]), and the service's answer sent back ([`respond`]),
//! its body piped into the stream as the peer's flow-control window allows.
//!
//! This is what hyper's HTTP/2 server does between h2 and a service (`IncomingBody::h2`,
//! `H2Stream`, `PipeToSendStream`), with the same rules: received data's window is released
//! as the service takes it; an answer's next frame is only pulled once the data before it
//! has window to go out, so a stream whose client stops reading holds at most one frame; a
//! client's RST_STREAM while the service works ends the call (its future is dropped); a
//! request body reset with NO_ERROR or CANCEL reads as ended, and a body that fails resets
//! the stream with INTERNAL_ERROR.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http_body::{Body, Frame};
use tonic::codegen::http;

/// A request's body: its DATA frames, then its trailers.
pub(super) struct Incoming {
    recv: RecvStream,
    data_done: bool,
}

impl Incoming {
    pub(super) fn new(recv: RecvStream) -> Self {
        Incoming { recv, data_done: false }
    }
}

impl Body for Incoming {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The service has it: the peer may send as much again.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    return Poll::Ready(match e.reason() {
                        Some(Reason::NO_ERROR | Reason::CANCEL) => None,
                        _ => Some(Err(e)),
                    });
                }
                None => this.data_done = true,
            }
        }
        Poll::Ready(match ready!(this.recv.poll_trailers(cx)) {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// Waits for `served`, unless the client resets the stream first (`None`: the call is over,
/// and dropping `served` ends its work).
async fn unless_reset<T>(
    served: impl Future<Output = T>,
    respond: &mut SendResponse<Bytes>,
) -> Option<T> {
    let mut served = std::pin::pin!(served);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(done) = served.as_mut().poll(cx) {
            return Poll::Ready(Some(done));
        }
        match respond.poll_reset(cx) {
            Poll::Ready(reset) => {
                tracing::debug!(?reset, "a gRPC call's stream was reset before its answer");
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Sends the answer `answer` resolves to on `respond`: its headers, then its body's frames.
pub(super) async fn respond<F>(answer: F, mut respond: SendResponse<Bytes>)
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, Infallible>>,
{
    let Some(Ok(response)) = unless_reset(answer, &mut respond).await else { return };
    let (parts, body) = response.into_parts();
    let end = body.is_end_stream();
    let send = match respond.send_response(http::Response::from_parts(parts, ()), end) {
        Ok(send) => send,
        Err(err) => {
            tracing::debug!(error = %err, "a gRPC answer's headers could not be sent");
            return;
        }
    };
    if !end && let Err(err) = (Pipe { body, send, pending: None }).await {
        tracing::debug!(error = %err, "a gRPC answer's body could not be sent");
    }
}

/// An answer's body going into its stream.
struct Pipe {
    body: tonic::body::Body,
    send: SendStream<Bytes>,
    /// A data frame taken from the body, waiting for window to be sent; with whether it is
    /// the body's last.
    pending: Option<(Bytes, bool)>,
}

impl Future for Pipe {
    type Output = Result<(), h2::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            if let Poll::Ready(reason) = this.send.poll_reset(cx)? {
                return Poll::Ready(Err(reason.into()));
            }
            if let Some((data, end)) = this.pending.take() {
                while this.send.capacity() == 0 {
                    match this.send.poll_capacity(cx) {
                        Poll::Pending => {
                            this.pending = Some((data, end));
                            return Poll::Pending;
                        }
                        Poll::Ready(Some(Ok(0))) => {}
                        Poll::Ready(Some(Ok(_))) => break,
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                        Poll::Ready(None) => return Poll::Ready(Err(Reason::CANCEL.into())),
                    }
                }
                this.send.send_data(data, end)?;
                if end {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // The next frame is pulled before any window is claimed (hyper#4003: capacity
            // reserved for a body that has nothing yet can starve the connection's others).
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = this.body.is_end_stream();
                        if data.is_empty() {
                            this.send.send_data(data, end)?;
                            if end {
                                return Poll::Ready(Ok(()));
                            }
                        } else {
                            // A claim of one byte; h2 raises it to what is buffered.
                            this.send.reserve_capacity(1);
                            this.pending = Some((data, end));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.send.reserve_capacity(0);
                            this.send.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(status)) => {
                    tracing::debug!(%status, "a gRPC answer's body failed");
                    this.send.send_reset(Reason::INTERNAL_ERROR);
                    return Poll::Ready(Ok(()));
                }
                None => {
                    this.send.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}
