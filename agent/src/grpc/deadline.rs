//! Deadlines: a call whose `grpc-timeout` passes before it is answered ends with
//! DEADLINE_EXCEEDED, as Triton (and gRPC's own servers) answer, where tonic's server would
//! say CANCELLED ("Timeout expired").
//!
//! The layer sits inside tonic's own timeout layer, which reads the same header: its timer
//! starts in `call`, before tonic's (tonic makes its timer after calling the service it
//! wraps), and tonic polls the service before its timer, so when both fire on the same
//! tick the call still ends here with DEADLINE_EXCEEDED. Dropping the inner future ends the
//! call's work (a wait for a request slot, the decoding) as tonic's timeout would.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Status;
use tonic::codegen::http;

/// Wraps a service in [`Deadline`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DeadlineLayer;

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline { inner }
    }
}

/// Ends a call past its `grpc-timeout` with DEADLINE_EXCEEDED.
#[derive(Debug, Clone)]
pub(crate) struct Deadline<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Answer<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let timeout = request.headers().get("grpc-timeout").and_then(|v| parse(v.as_bytes()));
        let sleep = timeout.map(|t| (t, Box::pin(tokio::time::sleep(t))));
        Answer { inner: Box::pin(self.inner.call(request)), sleep }
    }
}

/// The answer of the wrapped service, or DEADLINE_EXCEEDED once the deadline passes.
pub(crate) struct Answer<F> {
    inner: Pin<Box<F>>,
    sleep: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
}

impl<F, E> Future for Answer<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if let ready @ Poll::Ready(_) = this.inner.as_mut().poll(cx) {
            return ready;
        }
        if let Some((timeout, sleep)) = &mut this.sleep
            && sleep.as_mut().poll(cx).is_ready()
        {
            let message = format!("the call's deadline ({timeout:?}) passed before its answer");
            return Poll::Ready(Ok(Status::deadline_exceeded(message).into_http()));
        }
        Poll::Pending
    }
}

/// A `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n); `None` when
/// malformed, which tonic's layer ignores as well.
fn parse(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::parse;
    use std::time::Duration;

    #[test]
    fn grpc_timeout_values() {
        assert_eq!(parse(b"200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse(b"99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in [&b""[..], b"m", b"123456789m", b"12x", b"-1m", b"1.5S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
