//! ModelInfer, the endpoint's hot path, served on its h2 stream directly: the call's one
//! message read from the stream's DATA frames (its 5-byte prefix checked against `[http]
//! max_body_bytes` before the rest is read, the window released as data arrives), decoded
//! with prost straight from the received bytes, served by the same method as tonic's route
//! ([`Inference::model_infer_call`]) within the call's `grpc-timeout`, and answered as
//! HEADERS, one DATA frame and the trailers, queued together so that the connection's task
//! writes them at once.
//!
//! tonic's unary path copies the message into its own buffer before decoding it and
//! encodes the answer through a stream of frames, and hyper's HTTP/2 server wraps the
//! stream in a request body and pipes a boxed answer body back; a call taking this path
//! answers the same bytes, statuses and messages (an over-limit message is
//! RESOURCE_EXHAUSTED here directly). A compressed call (`grpc-encoding` other than
//! `identity`) goes to tonic.
//!
//! The call is a future written by hand ([`Call`]), not an `async fn`: the service's future
//! is large (the whole inference path's state), and an `async fn` holding it, moved into
//! the connection's set of calls, copied it whole on every call (about 11,000 instructions
//! of `memcpy` a call on the sample model, callgrind); here it is made once the message is
//! in, in its own allocation, and the call around it stays small.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use h2::RecvStream;
use h2::server::SendResponse;
use prost::Message as _;
use tonic::Status;
use tonic::codegen::http;

use super::deadline;
use super::proto::{ModelInferRequest, ModelInferResponse};
use super::service::Inference;

/// The path of the calls this module serves.
pub(super) const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// The gRPC message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// Whether `request` takes this path: a ModelInfer call whose messages are not compressed.
pub(super) fn takes<B>(request: &http::Request<B>) -> bool {
    request.uri().path() == MODEL_INFER
        && request.headers().get(&super::GRPC_ENCODING).is_none_or(|e| e == "identity")
}

/// The service's answer to a decoded call.
type Served = Pin<Box<dyn Future<Output = Result<ModelInferResponse, Status>> + Send>>;

/// One ModelInfer call: reads its message, has it served, sends the answer. Every outcome
/// but a reset by the client is an answer (a refusal trailers-only); a reset ends the call,
/// its work dropped.
pub(super) struct Call {
    inference: Arc<Inference>,
    limit: usize,
    respond: SendResponse<Bytes>,
    /// The call's `grpc-timeout` and its timer, started with the call.
    deadline: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    stage: Stage,
}

#[allow(
    clippy::large_enum_variant,
    reason = "a call reads once; the stages replace each other in place"
)]
enum Stage {
    /// The message is arriving; the request's head is kept for the service.
    Reading {
        body: RecvStream,
        head: Option<http::request::Parts>,
        message: Message,
    },
    Serving(Served),
    Done,
}

impl Call {
    /// The call of `request`, answered on `respond`.
    pub(super) fn new(
        inference: Arc<Inference>,
        request: http::Request<RecvStream>,
        respond: SendResponse<Bytes>,
        limit: usize,
    ) -> Self {
        let deadline = deadline::of(request.headers())
            .map(|timeout| (timeout, Box::pin(tokio::time::sleep(timeout))));
        let (head, body) = request.into_parts();
        let stage = Stage::Reading { body, head: Some(head), message: Message::default() };
        Call { inference, limit, respond, deadline, stage }
    }

    /// Reads what has arrived of the message; the service's future once it is whole.
    fn read(&mut self, cx: &mut Context<'_>) -> Poll<Result<Served, Status>> {
        let Stage::Reading { body, head, message } = &mut self.stage else {
            unreachable!("only called while reading")
        };
        loop {
            match body.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let _ = body.flow_control().release_capacity(data.len());
                    message.push(data, self.limit)?;
                }
                Poll::Ready(Some(Err(e))) => {
                    return Poll::Ready(Err(Status::internal(format!(
                        "reading the call failed: {e}"
                    ))));
                }
                Poll::Ready(None) => break,
            }
        }
        let message = std::mem::take(message).finish()?;
        let message = ModelInferRequest::decode(message)
            .map_err(|e| Status::internal(format!("failed to decode the message: {e}")))?;
        let head = head.take().unwrap_or_else(|| unreachable!("taken once"));
        let metadata = tonic::metadata::MetadataMap::from_headers(head.headers);
        let request = tonic::Request::from_parts(metadata, head.extensions, message);
        let inference = Arc::clone(&self.inference);
        Poll::Ready(Ok(Box::pin(async move { inference.model_infer_call(request).await })))
    }

    /// The call's outcome, once there is one; `None` once the client reset the stream.
    fn outcome(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<ModelInferResponse, Status>>> {
        if let Stage::Reading { .. } = self.stage {
            match self.read(cx) {
                Poll::Ready(Ok(served)) => self.stage = Stage::Serving(served),
                Poll::Ready(Err(status)) => return Poll::Ready(Some(Err(status))),
                Poll::Pending => {}
            }
        }
        if let Stage::Serving(served) = &mut self.stage
            && let Poll::Ready(answered) = served.as_mut().poll(cx)
        {
            return Poll::Ready(Some(answered));
        }
        if let Some((timeout, sleep)) = &mut self.deadline
            && sleep.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Some(Err(deadline::exceeded(*timeout))));
        }
        match self.respond.poll_reset(cx) {
            Poll::Ready(reset) => {
                tracing::debug!(?reset, "a ModelInfer call's stream was reset before its answer");
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Future for Call {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Stage::Done = this.stage {
            return Poll::Ready(());
        }
        let outcome = std::task::ready!(this.outcome(cx));
        // The service's work (a slot, a run on the blocking pool) ends here, answered or not.
        this.stage = Stage::Done;
        let sent = match outcome {
            None => return Poll::Ready(()),
            Some(Ok(response)) => answer(&mut this.respond, &response),
            Some(Err(status)) => this.respond.send_response(status.into_http(), true).map(drop),
        };
        if let Err(err) = sent {
            tracing::debug!(error = %err, "a ModelInfer answer could not be sent");
        }
        Poll::Ready(())
    }
}

/// The call's one message as it arrives. Most calls arrive in one DATA frame, kept as it
/// came; the rest are gathered. What is held is bounded by the limit: a longer message is
/// refused from its prefix, a second one as soon as it starts.
#[derive(Default)]
struct Message {
    first: Option<Bytes>,
    gathered: BytesMut,
    /// The length its prefix announced, once read.
    length: Option<usize>,
}

impl Message {
    fn push(&mut self, data: Bytes, limit: usize) -> Result<(), Status> {
        match self.first.take() {
            None if self.gathered.is_empty() => self.first = Some(data),
            Some(earlier) => {
                self.gathered.reserve(earlier.len() + data.len());
                self.gathered.put(earlier);
                self.gathered.put(data);
            }
            None => self.gathered.put(data),
        }
        let have: &[u8] = self.first.as_deref().unwrap_or(&self.gathered);
        if self.length.is_none() && have.len() >= PREFIX {
            if have[0] != 0 {
                // As tonic and grpc-go: a compressed message needs a `grpc-encoding`.
                return Err(Status::internal("a compressed message without grpc-encoding"));
            }
            let n = u32::from_be_bytes([have[1], have[2], have[3], have[4]]) as usize;
            if n > limit {
                return Err(super::status(crate::server::ApiError::TooLarge(limit)));
            }
            self.length = Some(n);
        }
        if self.length.is_some_and(|n| have.len() > PREFIX + n) {
            return Err(Status::internal("a unary call carries one message"));
        }
        Ok(())
    }

    /// The message without its prefix, once the stream has ended.
    fn finish(self) -> Result<Bytes, Status> {
        let mut all = self.first.unwrap_or_else(|| self.gathered.freeze());
        match self.length {
            Some(n) if all.len() == PREFIX + n => {
                all.advance(PREFIX);
                Ok(all)
            }
            _ => Err(Status::internal("the call ended before its message was complete")),
        }
    }
}

/// Sends the answer to a served call: headers, the message as one data frame, the
/// trailers.
fn answer(
    respond: &mut SendResponse<Bytes>,
    message: &ModelInferResponse,
) -> Result<(), h2::Error> {
    let length = message.encoded_len();
    let mut data = BytesMut::with_capacity(PREFIX + length);
    data.put_u8(0);
    // A message over 4 GiB cannot be framed; the limits keep answers far below.
    data.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
    message.encode(&mut data).unwrap_or_else(|_| unreachable!("the buffer was reserved"));
    let mut head = http::Response::new(());
    head.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    let mut send = respond.send_response(head, false)?;
    send.send_data(data.freeze(), false)?;
    let mut trailers = http::HeaderMap::with_capacity(1);
    trailers.insert(super::GRPC_STATUS, http::HeaderValue::from_static("0"));
    send.send_trailers(trailers)
}
