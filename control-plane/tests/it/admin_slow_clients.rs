//! Slow clients against the real admin API on 127.0.0.1:0, over raw TCP: a half-sent
//! header is cut at `[admin] header_timeout`, fifty of them do not hold up the daemon's
//! stop, connections past `[admin] max_connections` wait until one closes, and an upload
//! that stops sending is answered 408 at `[admin] body_timeout`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use falaj_control::daemon::{ControlPlane, ServeConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A generous bound for what must happen "at once" or "at the deadline".
const PROMPTLY: Duration = Duration::from_secs(10);

struct Daemon {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

async fn daemon(dir: &Path, configure: impl FnOnce(&mut ServeConfig)) -> Daemon {
    let mut config = ServeConfig::new(dir);
    config.quic = "127.0.0.1:0".parse().unwrap();
    config.admin = "127.0.0.1:0".parse().unwrap();
    config.region = Some("eu-west-1".into());
    configure(&mut config);
    let control = ControlPlane::start(config).await.unwrap();
    let addr = control.admin_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        control.run(async { drop(stopped.await) }).await.unwrap();
    });
    Daemon { addr, stop, task }
}

/// Reads until the peer closes (EOF or reset); fails if it is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration, what: &str) {
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        while let Ok(1..) = stream.read(&mut buf).await {}
    });
    assert!(read.await.is_ok(), "{what}: the connection is still open after {within:?}");
}

/// Sends a complete request and returns the response's status line.
async fn request(stream: &mut TcpStream, close: bool) -> String {
    let connection = if close { "close" } else { "keep-alive" };
    let request = format!("GET /v1/fleet HTTP/1.1\r\nHost: cp\r\nConnection: {connection}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    status_line(stream).await
}

/// Reads a response head (the admin API's refusals have small bodies, read with it or
/// left unread) and returns its status line.
async fn status_line(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed before a response");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned))
        .map_or(0, |n| n.trim().parse::<usize>().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.unwrap();
    head.lines().next().unwrap().to_owned()
}

const HALF_HEADER: &[u8] = b"GET /v1/fleet HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer ";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_header_is_cut_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let daemon =
        daemon(dir.path(), |c| c.admin_http.header_timeout = Duration::from_millis(300)).await;
    let mut slow = TcpStream::connect(daemon.addr).await.unwrap();
    slow.write_all(HALF_HEADER).await.unwrap();
    closed_within(&mut slow, PROMPTLY, "a client that sent half a header").await;
    daemon.stop.send(()).unwrap();
    daemon.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_half_headers_do_not_hold_up_the_stop() {
    let dir = tempfile::tempdir().unwrap();
    let daemon =
        daemon(dir.path(), |c| c.admin_http.header_timeout = Duration::from_secs(600)).await;
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(daemon.addr).await.unwrap();
        stream.write_all(HALF_HEADER).await.unwrap();
        slow.push(stream);
    }
    // Accepted in order: once a later connection is answered, the fifty are accepted.
    let mut later = TcpStream::connect(daemon.addr).await.unwrap();
    assert!(request(&mut later, true).await.starts_with("HTTP/1.1 "));

    daemon.stop.send(()).unwrap();
    let stopped = tokio::time::timeout(PROMPTLY, daemon.task).await;
    assert!(stopped.is_ok(), "the control plane did not stop within {PROMPTLY:?}");
    stopped.unwrap().unwrap();
    for (i, stream) in slow.iter_mut().enumerate() {
        closed_within(stream, PROMPTLY, &format!("half-header client {i} after the stop")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path(), |c| c.admin_http.max_connections = 2).await;
    let mut first = TcpStream::connect(daemon.addr).await.unwrap();
    let answered = request(&mut first, false).await;
    assert!(answered.starts_with("HTTP/1.1 "), "{answered}");
    let mut second = TcpStream::connect(daemon.addr).await.unwrap();
    request(&mut second, false).await;

    let mut third = TcpStream::connect(daemon.addr).await.unwrap();
    third
        .write_all(b"GET /v1/fleet HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut byte)).await;
    assert!(early.is_err(), "a connection past the cap was served: {early:?}");

    drop(first);
    let served = tokio::time::timeout(PROMPTLY, status_line(&mut third)).await;
    assert_eq!(served.expect("not served after a slot freed"), answered);
    daemon.stop.send(()).unwrap();
    daemon.task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_stops_is_answered_408_at_the_body_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon(dir.path(), |c| c.admin_body_timeout = Duration::from_millis(500)).await;
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let mut slow = TcpStream::connect(daemon.addr).await.unwrap();
    let head = format!(
        "POST /v1/bundles HTTP/1.1\r\nHost: cp\r\nAuthorization: Bearer {}\r\nContent-Length: 1000000\r\n\r\n",
        token.trim()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&[0u8; 1000]).await.unwrap();
    let answered = tokio::time::timeout(PROMPTLY, status_line(&mut slow)).await;
    let answered = answered.expect("a stalled upload was still waited for");
    assert!(answered.starts_with("HTTP/1.1 408"), "{answered}");
    let staged = std::fs::read_dir(dir.path().join("staging")).map_or(0, Iterator::count);
    assert_eq!(staged, 0, "the part staged is removed");
    daemon.stop.send(()).unwrap();
    daemon.task.await.unwrap();
}
