//! Slow and hostile HTTP clients against the real server on 127.0.0.1:0, over raw TCP: a
//! half-sent header is cut at the deadline, fifty of them do not hold up a stop (while a
//! request in flight is finished), connections past the cap wait, and request bodies are
//! admitted a bounded number at a time (503 when no slot frees in time).

use crate::support;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use falaj_agent::admission::SlotGauge;
use falaj_agent::server::{ServeConfig, Server};
use serde_json::json;
use support::{Site, classifier, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// A generous bound for what must happen "at once" or "at the deadline".
const PROMPTLY: Duration = Duration::from_secs(10);

struct Running {
    addr: SocketAddr,
    slots: watch::Receiver<SlotGauge>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

async fn start(site: &Site, config: ServeConfig) -> Running {
    let server = Server::bind(site.data_dir(), config).await.unwrap();
    let (addr, slots) = (server.local_addr(), server.request_slots());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server.run(async { drop(stopped.await) }).await.unwrap();
    });
    Running { addr, slots, stop, task }
}

/// Reads until the peer closes (EOF or reset); fails if it is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    });
    assert!(read.await.is_ok(), "{what}: the connection is still open after {within:?}");
    got
}

/// Reads one response head and returns its status line.
async fn status_line(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed before a response");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    head.lines().next().unwrap().to_owned()
}

const HALF_HEADER: &[u8] = b"GET /v2/health/live HTTP/1.1\r\nHost: agent\r\nX-Slow: ";

async fn half_header(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(HALF_HEADER).await.unwrap();
    stream
}

/// Sends a complete `GET /v2/health/live` and waits for its `200`.
async fn live(stream: &mut TcpStream, close: bool) {
    let connection = if close { "close" } else { "keep-alive" };
    let request =
        format!("GET /v2/health/live HTTP/1.1\r\nHost: agent\r\nConnection: {connection}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(status_line(stream).await, "HTTP/1.1 200 OK");
}

fn infer_body(rows: usize) -> Vec<u8> {
    let x = falaj_common::sample::generate(rows, 7, &[]).features;
    json!({"inputs": [{"name": "sensors", "shape": [rows, 8], "datatype": "FP32", "data": x}]})
        .to_string()
        .into_bytes()
}

fn infer_head(len: usize) -> String {
    format!(
        "POST /v2/models/fault/infer HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_header_is_cut_at_the_deadline() {
    let site = Site::new();
    let server =
        start(&site, ServeConfig { header_timeout: Duration::from_millis(300), ..test_config() })
            .await;
    let mut slow = half_header(server.addr).await;
    closed_within(&mut slow, PROMPTLY, "a client that sent half a header").await;

    // A kept-alive connection that starts a second head and stalls is cut the same way.
    let mut kept = TcpStream::connect(server.addr).await.unwrap();
    live(&mut kept, false).await;
    kept.write_all(HALF_HEADER).await.unwrap();
    closed_within(&mut kept, PROMPTLY, "a kept-alive client stalled mid-header").await;
    server.stop.send(()).unwrap();
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_half_headers_do_not_hold_up_a_stop_and_a_request_in_flight_finishes() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    // The header deadline is far beyond the bound below: only the stop may close them.
    let mut server =
        start(&site, ServeConfig { header_timeout: Duration::from_secs(600), ..test_config() })
            .await;
    let mut slow = Vec::new();
    for _ in 0..50 {
        slow.push(half_header(server.addr).await);
    }
    // Accepted in order: once a later connection is answered, the fifty are accepted.
    let mut later = TcpStream::connect(server.addr).await.unwrap();
    live(&mut later, true).await;

    // A request in flight: its head and half its body are in.
    let body = infer_body(4);
    let mut in_flight = TcpStream::connect(server.addr).await.unwrap();
    in_flight.write_all(infer_head(body.len()).as_bytes()).await.unwrap();
    let (first, rest) = body.split_at(body.len() / 2);
    in_flight.write_all(first).await.unwrap();
    let admitted = server.slots.wait_for(|g| g.admitted == 1);
    assert!(tokio::time::timeout(PROMPTLY, admitted).await.is_ok(), "never admitted");

    server.stop.send(()).unwrap();
    for (i, stream) in slow.iter_mut().enumerate() {
        closed_within(stream, PROMPTLY, &format!("half-header client {i} after the stop")).await;
    }
    in_flight.write_all(rest).await.unwrap();
    assert_eq!(status_line(&mut in_flight).await, "HTTP/1.1 200 OK", "the request in flight");
    let stopped = tokio::time::timeout(PROMPTLY, server.task).await;
    assert!(stopped.is_ok(), "the server did not stop within {PROMPTLY:?}");
    stopped.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_until_one_closes() {
    let site = Site::new();
    let server = start(
        &site,
        ServeConfig {
            max_connections: 2,
            header_timeout: Duration::from_secs(600),
            ..test_config()
        },
    )
    .await;
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    live(&mut first, false).await;
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    live(&mut second, false).await;

    // The third connects (the kernel queues it) but is not served while two are open.
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    third
        .write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut byte)).await;
    assert!(early.is_err(), "a connection past the cap was served: {early:?}");

    drop(first);
    let answered = tokio::time::timeout(PROMPTLY, status_line(&mut third)).await;
    assert_eq!(answered.expect("not served after a slot freed"), "HTTP/1.1 200 OK");
    server.stop.send(()).unwrap();
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_read_and_decoded_at_once_are_bounded_by_the_slots() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let server = start(&site, ServeConfig { workers: 1, ..test_config() }).await;
    let body = infer_body(2000);
    let client = reqwest::Client::new();
    let url = format!("http://{}/v2/models/fault/infer", server.addr);
    let requests = (0..24).map(|_| {
        let request = client.post(&url).header("content-type", "application/json");
        request.body(body.clone()).send()
    });
    for response in futures_join(requests).await {
        assert_eq!(response.unwrap().status(), 200);
    }
    let gauge = *server.slots.borrow();
    assert!(gauge.peak >= 1 && gauge.peak <= 2, "one worker, two slots: {gauge:?}");
    assert_eq!((gauge.admitted, gauge.waiting), (0, 0), "every slot is given back");
    server.stop.send(()).unwrap();
    server.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_finds_no_slot_in_time_gets_503() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    // Holders keep their slots until the body deadline (3 s); waiters give up after the
    // queue timeout (1 s): the two outcomes are two seconds apart whatever the load.
    let (body_timeout, queue_timeout) = (Duration::from_secs(3), Duration::from_secs(1));
    let config = ServeConfig { workers: 1, body_timeout, queue_timeout, ..test_config() };
    let mut server = start(&site, config).await;
    // Two slots taken by clients that stall mid-body, two more such clients queued behind
    // them. Each is sent once the one before holds its slot, or waits: a request counts
    // as waiting just before it asks for a slot, so a later one could otherwise take the
    // slot first.
    let mut stalled = Vec::new();
    for queued in [1, 2, 3, 4] {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(infer_head(1000).as_bytes()).await.unwrap();
        stream.write_all(b"{\"inputs\":").await.unwrap();
        stalled.push(stream);
        let wanted =
            |g: &SlotGauge| (g.admitted, g.waiting) == (queued.min(2), queued.saturating_sub(2));
        let seen = tokio::time::timeout(PROMPTLY, server.slots.wait_for(wanted)).await;
        assert!(seen.is_ok(), "request {queued} never reached the slots");
    }
    let response = reqwest::Client::new()
        .post(format!("http://{}/v2/models/fault/infer", server.addr))
        .header("content-type", "application/json")
        .body(infer_body(4))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let message = response.json::<serde_json::Value>().await.unwrap()["error"].to_string();
    assert!(message.contains("busy") && message.contains("2 request slots"), "{message}");
    // The queued ones were turned away the same way; the holders are cut by the body
    // deadline (408).
    let expected = [
        "408 Request Timeout",
        "408 Request Timeout",
        "503 Service Unavailable",
        "503 Service Unavailable",
    ];
    for (mut stream, status) in stalled.into_iter().zip(expected) {
        assert_eq!(status_line(&mut stream).await, format!("HTTP/1.1 {status}"));
    }
    server.stop.send(()).unwrap();
    server.task.await.unwrap();
}

/// Runs the futures at once and returns their outputs in order.
async fn futures_join<F: Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut outputs = Vec::new();
    for task in tasks {
        outputs.push(task.await.unwrap());
    }
    outputs
}
