//! Deadlines: a call whose `grpc-timeout` passes before it is answered ends with
//! DEADLINE_EXCEEDED, as Triton (and gRPC's own servers) answer, where tonic's server would
//! say CANCELLED ("Timeout expired").
//!
//! The wrapper's timer starts in `call`, when the call's headers have arrived. Dropping the
//! inner future ends the call's work (a wait for a request slot, the decoding). ModelInfer's
//! own path ([`super::unary`]) reads the same header with [`of`] and answers [`exceeded`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Status;
use tonic::codegen::http;

/// Ends a call past its `grpc-timeout` with DEADLINE_EXCEEDED.
#[derive(Debug, Clone)]
pub(crate) struct Deadline<S> {
    inner: S,
}

impl<S> Deadline<S> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: S) -> Self {
        Deadline { inner }
    }
}

impl<S, B> tower::Service<http::Request<B>> for Deadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Unpin,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Answer<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let timeout = of(request.headers());
        let sleep = timeout.map(|t| (t, Box::pin(tokio::time::sleep(t))));
        Answer { inner: self.inner.call(request), sleep }
    }
}

/// The answer of the wrapped service, or DEADLINE_EXCEEDED once the deadline passes. The
/// timer is only allocated for a call that has a deadline.
pub(crate) struct Answer<F> {
    inner: F,
    sleep: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
}

impl<F, E> Future for Answer<F>
where
    F: Future<Output = Result<http::Response<tonic::body::Body>, E>> + Unpin,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if let ready @ Poll::Ready(_) = Pin::new(&mut this.inner).poll(cx) {
            return ready;
        }
        if let Some((timeout, sleep)) = &mut this.sleep
            && sleep.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Ok(exceeded(*timeout).into_http()));
        }
        Poll::Pending
    }
}

/// The deadline a call's `grpc-timeout` header sets, if any (and well formed).
pub(super) fn of(headers: &http::HeaderMap) -> Option<Duration> {
    headers.get(&super::GRPC_TIMEOUT).and_then(|v| parse(v.as_bytes()))
}

/// The status of a call whose deadline `timeout` passed before its answer.
pub(super) fn exceeded(timeout: Duration) -> Status {
    Status::deadline_exceeded(format!("the call's deadline ({timeout:?}) passed before its answer"))
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
