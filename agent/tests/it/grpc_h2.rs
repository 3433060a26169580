//! The gRPC endpoint's HTTP/2 server (`grpc/transport.rs`, on h2 directly) against a bare h2
//! client: flow control both ways with a message larger than every window, a deadline that
//! passes while the message is still arriving, streams reset by the client while their call
//! reads or waits, many calls at once on one connection, and the frame size it allows.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use falaj_agent::grpc::proto::{ModelInferRequest, ModelInferResponse};
use falaj_agent::server::ServeConfig;
use prost::Message as _;
use tonic::codegen::http;

use crate::grpc::{Both, hold_slots, rows, sensors_raw};
use crate::support::{Site, classifier, test_config};

/// A hang guard, not a timing assertion: a call that would wait forever (a window never
/// released) fails the test instead of hanging it.
const GUARD: Duration = Duration::from_secs(120);

/// h2's client connection to `addr`, with `window` as its receive windows (stream and
/// connection).
async fn connect(addr: SocketAddr, window: u32) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .initial_connection_window_size(window)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// `message` as a gRPC message: not compressed, its length, its bytes.
fn framed(message: &ModelInferRequest) -> Bytes {
    let message = message.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend(u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend(message);
    framed.into()
}

/// Opens a ModelInfer call (with `grpc-timeout` when given); its body is sent on the
/// returned stream.
async fn open(
    client: &mut h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    timeout: Option<&str>,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let mut request =
        http::Request::post(format!("http://{addr}/inference.GRPCInferenceService/ModelInfer"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
    if let Some(timeout) = timeout {
        request = request.header("grpc-timeout", timeout);
    }
    let ready = client.clone().ready().await.unwrap();
    *client = ready;
    client.send_request(request.body(()).unwrap(), false).unwrap()
}

/// Sends `message` whole on a new stream; the rows of its answer, which must be a success.
async fn rows_answered(
    client: &mut h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
    timeout: Option<&str>,
    message: Bytes,
) -> i64 {
    let (response, mut body) = open(client, addr, timeout).await;
    body.send_data(message, true).unwrap();
    let (status, text, answer) = answer(response).await;
    assert_eq!(status, "0", "{text}");
    answer.unwrap().outputs[0].shape[0]
}

/// The answer's `grpc-status`, `grpc-message` and message (releasing the window as the
/// data is read).
async fn answer(
    response: h2::client::ResponseFuture,
) -> (String, String, Option<ModelInferResponse>) {
    let response = response.await.unwrap();
    let field = |headers: &http::HeaderMap, name: &str| {
        headers.get(name).map(|v| v.to_str().unwrap().replace("%20", " "))
    };
    if let Some(status) = field(response.headers(), "grpc-status") {
        return (status, field(response.headers(), "grpc-message").unwrap_or_default(), None);
    }
    let mut body = response.into_body();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    let status = field(&trailers, "grpc-status").expect("grpc-status");
    let message = field(&trailers, "grpc-message").unwrap_or_default();
    assert_eq!(u32::from_be_bytes(data[1..5].try_into().unwrap()) as usize, data.len() - 5);
    (status, message, Some(ModelInferResponse::decode(&data[5..]).unwrap()))
}

/// A call whose message (9.5 MiB) is larger than the server's stream window (4 MiB) and
/// connection window (8 MiB) arrives whole, as the server releases the window as it reads;
/// its answer (several MiB) reaches a client whose windows are 64 KiB, as the server sends
/// only what the client's window allows and resumes on its updates. A second call on the
/// same connection is then answered too (the windows were given back).
#[tokio::test]
async fn a_message_larger_than_every_window_goes_both_ways() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let server = Both::start(&site, test_config()).await;
    let mut client = connect(server.grpc, 64 << 10).await;
    let n = 320_000;
    let x = rows(1000).repeat(n / 1000);
    let message = framed(&sensors_raw("fault", &x, n as i64));
    assert!(message.len() > falaj_agent::grpc::CONNECTION_WINDOW as usize);
    for _ in 0..2 {
        let (response, mut body) = open(&mut client, server.grpc, None).await;
        body.send_data(message.clone(), true).unwrap();
        let (status, text, answer) = tokio::time::timeout(GUARD, answer(response)).await.unwrap();
        assert_eq!((status.as_str(), text.as_str()), ("0", ""));
        let answer = answer.unwrap();
        assert_eq!(answer.outputs[0].shape[0], n as i64);
        let raw: usize = answer.raw_output_contents.iter().map(Bytes::len).sum();
        assert!(raw > 64 << 10, "the answer ({raw} bytes) exceeds the client's window");
    }
    server.stop().await;
}

/// The server's first SETTINGS, read off the socket after a client's preface, let a client
/// send frames of up to [`MAX_FRAME`](falaj_agent::grpc::MAX_FRAME) (HTTP/2's default is
/// 16 KiB), so that a large message leaves a client's h2 in few writes.
#[tokio::test]
async fn the_server_lets_clients_send_large_frames() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let server = Both::start(&site, test_config()).await;
    let mut tcp = tokio::net::TcpStream::connect(server.grpc).await.unwrap();
    // The client's preface and an empty SETTINGS frame.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(GUARD, tcp.read_exact(&mut head)).await.unwrap().unwrap();
    assert_eq!((head[3], head[4]), (0x4, 0), "the server's first frame is its SETTINGS");
    let mut payload = vec![0u8; u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize];
    tcp.read_exact(&mut payload).await.unwrap();
    let settings: Vec<(u16, u32)> = payload
        .chunks_exact(6)
        .map(|p| (u16::from_be_bytes([p[0], p[1]]), u32::from_be_bytes([p[2], p[3], p[4], p[5]])))
        .collect();
    // SETTINGS_MAX_FRAME_SIZE is 0x5.
    let max_frame = settings.iter().find(|(id, _)| *id == 0x5).map(|&(_, v)| v);
    assert_eq!(max_frame, Some(falaj_agent::grpc::MAX_FRAME), "{settings:?}");
    // Larger than HTTP/2's default, whatever the constant is set to.
    assert!(max_frame.is_some_and(|v| v > 16 << 10), "{settings:?}");
    server.stop().await;
}

/// A deadline counts while the message is still arriving: a call that sends part of its
/// message and waits is answered DEADLINE_EXCEEDED, and the connection serves the next.
#[tokio::test]
async fn a_deadline_passes_while_the_message_is_still_arriving() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let server = Both::start(&site, test_config()).await;
    let mut client = connect(server.grpc, 1 << 20).await;
    let message = framed(&sensors_raw("fault", &rows(2), 2));
    let (response, mut body) = open(&mut client, server.grpc, Some("200m")).await;
    body.send_data(message.slice(..10), false).unwrap();
    let (status, text, _) = tokio::time::timeout(GUARD, answer(response)).await.unwrap();
    assert_eq!(status, (tonic::Code::DeadlineExceeded as i32).to_string(), "{text}");
    assert!(text.contains("deadline (200ms) passed"), "{text}");
    drop(body);
    assert_eq!(rows_answered(&mut client, server.grpc, Some("60S"), message).await, 2);
    server.stop().await;
}

/// A client that resets its stream ends the call on the server: one reset while it waits
/// for a request slot leaves the queue, one reset halfway through its message is dropped,
/// and the connection goes on serving calls.
#[tokio::test]
async fn a_stream_reset_by_the_client_ends_its_call() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    // Neither the queue nor the held requests' bodies time out during the test: only the
    // reset can end the wait.
    let config = ServeConfig {
        workers: 1,
        queue_timeout: Duration::from_secs(3600),
        body_timeout: Duration::from_secs(3600),
        ..test_config()
    };
    let mut server = Both::start(&site, config).await;
    let mut client = connect(server.grpc, 1 << 20).await;
    let message = framed(&sensors_raw("fault", &rows(3), 3));

    let held = hold_slots(&mut server).await;
    let (waiting, mut body) = open(&mut client, server.grpc, None).await;
    body.send_data(message.clone(), true).unwrap();
    server.slots.wait_for(|g| g.waiting == 1).await.unwrap();
    body.send_reset(h2::Reason::CANCEL);
    // The server dropped the call's wait for a slot.
    let left = tokio::time::timeout(GUARD, server.slots.wait_for(|g| g.waiting == 0)).await.is_ok();
    assert!(left, "the reset call still waits for a slot");
    assert_eq!(server.slots.borrow().admitted, 2, "the reset call was not served");
    assert!(waiting.await.is_err(), "a reset stream has no answer");
    drop(held);
    server.slots.wait_for(|g| g.admitted == 0).await.unwrap();

    let (halfway, mut body) = open(&mut client, server.grpc, None).await;
    body.send_data(message.slice(..message.len() / 2), false).unwrap();
    body.send_reset(h2::Reason::CANCEL);
    assert!(halfway.await.is_err(), "a reset stream has no answer");

    assert_eq!(rows_answered(&mut client, server.grpc, None, message).await, 3);
    server.stop().await;
}

/// Many calls open at once on one connection (150, under the 200 concurrent streams it
/// allows), their messages sent in an order other than their streams', each answered with
/// its own rows.
#[tokio::test]
async fn many_calls_at_once_on_one_connection_each_get_their_answer() {
    let site = Site::new();
    site.install("fault", 1, &classifier());
    let server = Both::start(&site, test_config()).await;
    let mut client = connect(server.grpc, 1 << 20).await;
    let mut calls = Vec::new();
    for i in 0..150_usize {
        let n = i % 17 + 1;
        let (response, body) = open(&mut client, server.grpc, None).await;
        calls.push((n, response, body, framed(&sensors_raw("fault", &rows(n), n as i64))));
    }
    let mut answers = Vec::new();
    for (n, response, mut body, message) in calls.into_iter().rev() {
        body.send_data(message, true).unwrap();
        answers.push((n, tokio::spawn(answer(response))));
    }
    for (n, answered) in answers {
        let (status, text, answer) = tokio::time::timeout(GUARD, answered).await.unwrap().unwrap();
        assert_eq!((status.as_str(), text.as_str()), ("0", ""));
        assert_eq!(answer.unwrap().outputs[0].shape[0], n as i64);
    }
    server.stop().await;
}
