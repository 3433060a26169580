//! ModelInfer, the endpoint's hot path, framed by hand: the call's one message read from
//! the body (its 5-byte prefix checked against `[http] max_body_bytes` before the rest is
//! read), decoded with prost straight from the received bytes, served by the same
//! [`GrpcInferenceService::model_infer`] as tonic's route, and answered as one body of one
//! data frame and the trailers, which hyper hands to h2 in one turn.
//!
//! tonic's unary path copies the message into its own buffer before decoding it and
//! encodes the answer through a stream of frames; a call taking this path answers the
//! same bytes, statuses and messages (an over-limit message is RESOURCE_EXHAUSTED here
//! directly). A compressed call (`grpc-encoding` other than `identity`) goes to tonic.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use http_body::{Body, Frame};
use prost::Message as _;
use tonic::Status;
use tonic::codegen::http;

use super::proto::ModelInferRequest;
use super::proto::grpc_inference_service_server::GrpcInferenceService as _;
use super::service::Inference;

/// The path of the calls this module serves.
pub(super) const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// The gRPC message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// Whether `request` takes this path: a ModelInfer call whose messages are not compressed.
pub(super) fn takes<B>(request: &http::Request<B>) -> bool {
    request.uri().path() == MODEL_INFER
        && request.headers().get("grpc-encoding").is_none_or(|e| e == "identity")
}

/// Serves one ModelInfer call; every outcome is an answer (a refusal in its trailers).
pub(super) async fn model_infer<B>(
    inference: &Inference,
    request: http::Request<B>,
    limit: usize,
) -> http::Response<tonic::body::Body>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let (parts, body) = request.into_parts();
    let served = async {
        let message = read_message(body, limit).await?;
        let message = ModelInferRequest::decode(message)
            .map_err(|e| Status::internal(format!("failed to decode the message: {e}")))?;
        let metadata = tonic::metadata::MetadataMap::from_headers(parts.headers);
        let request = tonic::Request::from_parts(metadata, parts.extensions, message);
        inference.model_infer(request).await
    };
    match served.await {
        Ok(response) => answer(&response.into_inner()),
        Err(status) => status.into_http(),
    }
}

/// The call's one message, without its prefix.
async fn read_message<B>(mut body: B, limit: usize) -> Result<Bytes, Status>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    use http_body_util::BodyExt as _;
    // Most calls arrive in one data frame, kept as it came; the rest are gathered here.
    let mut first: Option<Bytes> = None;
    let mut gathered = BytesMut::new();
    let mut length: Option<usize> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::internal(format!("reading the call failed: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        match first.take() {
            None if gathered.is_empty() => first = Some(data),
            Some(earlier) => {
                gathered.reserve(earlier.len() + data.len());
                gathered.put(earlier);
                gathered.put(data);
            }
            None => gathered.put(data),
        }
        let have: &[u8] = first.as_deref().unwrap_or(&gathered);
        if length.is_none() && have.len() >= PREFIX {
            if have[0] != 0 {
                // As tonic and grpc-go: a compressed message needs a `grpc-encoding`.
                return Err(Status::internal("a compressed message without grpc-encoding"));
            }
            let n = u32::from_be_bytes([have[1], have[2], have[3], have[4]]) as usize;
            if n > limit {
                return Err(super::status(crate::server::ApiError::TooLarge(limit)));
            }
            length = Some(n);
        }
        if length.is_some_and(|n| have.len() > PREFIX + n) {
            return Err(Status::internal("a unary call carries one message"));
        }
    }
    let mut all = first.unwrap_or_else(|| gathered.freeze());
    match length {
        Some(n) if all.len() == PREFIX + n => {
            all.advance(PREFIX);
            Ok(all)
        }
        _ => Err(Status::internal("the call ended before its message was complete")),
    }
}

/// The answer to a served call: headers, the message as one data frame, the trailers.
fn answer(message: &impl prost::Message) -> http::Response<tonic::body::Body> {
    let length = message.encoded_len();
    let mut data = BytesMut::with_capacity(PREFIX + length);
    data.put_u8(0);
    // A message over 4 GiB cannot be framed; the limits keep answers far below.
    data.put_u32(u32::try_from(length).unwrap_or(u32::MAX));
    message.encode(&mut data).unwrap_or_else(|_| unreachable!("the buffer was reserved"));
    let mut trailers = http::HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    let body = Unary { data: Some(data.freeze()), trailers: Some(trailers) };
    let mut response = http::Response::new(tonic::body::Body::new(body));
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    response
}

/// A body of one data frame and the trailers.
struct Unary {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl Body for Unary {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        Poll::Ready(match (this.data.take(), this.trailers.take()) {
            (Some(data), trailers) => {
                this.trailers = trailers;
                Some(Ok(Frame::data(data)))
            }
            (None, Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            (None, None) => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}
