//! Hostile clients on the control plane's QUIC port (issue 17, finding 1): enrollment
//! connections, which need no certificate, that announce large frames and send part of
//! them, then hold on with keep-alives. The server must hold little for them, close them
//! at the enrollment deadline, refuse more than its per-address cap, and still enroll a
//! well-behaved agent afterwards.

use crate::fleet;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use falaj_agent::enroll::{self, EnrollOptions};
use falaj_common::enrollment::EnrollmentToken;
use falaj_common::protocol::{ALPN_ENROLL, MAX_ENROLL_FRAME, SERVER_NAME};
use falaj_control::quic::{CLOSE_BUSY, CLOSE_TIMEOUT};
use falaj_control::state::{EnrollmentLimits, HandshakeLimits};
use fleet::{Control, eventually};

const HOSTILE: usize = 20;

/// An enrollment client that keeps its connections alive on its own (every 200 ms), so
/// only the server's deadline can end them.
fn hostile_config(token: &str) -> quinn::ClientConfig {
    let token: EnrollmentToken = token.parse().unwrap();
    let mut config = falaj_agent::identity::enroll_config(token.ca_sha256).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(200)));
    config.transport_config(Arc::new(transport));
    config
}

fn application_code(err: &quinn::ConnectionError) -> Option<u32> {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => {
            Some(u32::try_from(close.error_code.into_inner()).unwrap())
        }
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_enrollment_connections_are_bounded_closed_and_capped() {
    let work = tempfile::tempdir().unwrap();
    let mut config = fleet::config(&work.path().join("control"), "127.0.0.1:0".parse().unwrap());
    config.policy.enrollment = EnrollmentLimits {
        max_total: 64,
        max_per_address: HOSTILE,
        deadline: Duration::from_secs(5),
    };
    let control = Control::start_with(config, None).await;
    let gate = &control.shared.enrollments;
    let token = control.token("default").await;
    let client = enroll::client_endpoint(control.quic).unwrap();
    let client_config = hostile_config(&token);

    // Half announce 15 MiB (over the enrollment limit) and start sending it; half announce
    // a frame within the limit and send half of it. None sends more.
    let mut connections = Vec::new();
    let mut writers = Vec::new();
    for i in 0..HOSTILE {
        let conn = client
            .connect_with(client_config.clone(), control.quic, SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        assert_eq!(
            conn.handshake_data()
                .unwrap()
                .downcast::<quinn::crypto::rustls::HandshakeData>()
                .unwrap()
                .protocol
                .as_deref(),
            Some(ALPN_ENROLL)
        );
        let (mut send, recv) = conn.open_bi().await.unwrap();
        let (announced, payload) =
            if i % 2 == 0 { (15usize << 20, 1usize << 20) } else { (MAX_ENROLL_FRAME, 30_000) };
        let mut bytes = (announced as u32).to_be_bytes().to_vec();
        bytes.resize(4 + payload, 0x5a);
        // Flow control may hold part of it back: the write runs on its own.
        writers.push(tokio::spawn(async move {
            let _ = send.write_all(&bytes).await;
            (send, recv)
        }));
        connections.push(conn);
    }
    // Their deadline (5 s) is far longer than opening them takes.
    eventually(Duration::from_secs(5), "every hostile connection is counted", || async {
        gate.places.open() == HOSTILE
    })
    .await;
    // What the server holds for their frames: at most one enrollment frame each, never
    // the 15 MiB announced (before the fix, 15 MiB each were allocated at once).
    let held = gate.buffered.load(Ordering::Relaxed);
    assert!(held <= (HOSTILE * 2 * MAX_ENROLL_FRAME) as u64, "{held} bytes held");

    // Beyond the per-address cap, a new enrollment connection is closed at once.
    {
        let extra = client
            .connect_with(client_config.clone(), control.quic, SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let err = tokio::time::timeout(Duration::from_secs(10), extra.closed()).await.unwrap();
        assert_eq!(application_code(&err), Some(CLOSE_BUSY), "{err}");
        assert!(gate.places.refused.load(Ordering::Relaxed) >= 1);
    }

    // Every hostile connection is closed by the server at its deadline, though the client
    // keeps it alive: the ones that stalled inside a frame with CLOSE_TIMEOUT, the ones
    // refused for their announced size after their answer went untaken.
    for (i, conn) in connections.iter().enumerate() {
        let err = tokio::time::timeout(Duration::from_secs(20), conn.closed())
            .await
            .unwrap_or_else(|_| panic!("hostile connection {i} is still open"));
        let code = application_code(&err);
        assert!(code.is_some(), "connection {i}: {err}");
        if i % 2 == 1 {
            assert_eq!(code, Some(CLOSE_TIMEOUT), "connection {i}: {err}");
        }
    }
    for writer in writers {
        drop(writer.await.unwrap());
    }
    eventually(Duration::from_secs(10), "the gate is empty again", || async {
        gate.places.open() == 0 && gate.buffered.load(Ordering::Relaxed) == 0
    })
    .await;
    assert!(gate.timed_out.load(Ordering::Relaxed) >= (HOSTILE / 2) as u64);

    // A well-behaved agent still enrolls.
    let options = EnrollOptions {
        control_plane: control.quic.to_string(),
        token,
        hostname: "well-behaved".into(),
        region: None,
    };
    let identity =
        enroll::enroll(&work.path().join("agent"), &options, SystemTime::now()).await.unwrap();
    assert_eq!(identity.group, "default");
    control.stop().await;
}

/// The first datagram of a QUIC handshake (the client's Initial, with its TLS
/// ClientHello) for `server`, made by quinn-proto: a client that says it and no more.
fn initial_datagram(server: std::net::SocketAddr, config: quinn::ClientConfig) -> Vec<u8> {
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        true,
        None,
    );
    let now = std::time::Instant::now();
    let (_, mut conn) = endpoint.connect(now, config, server, SERVER_NAME).unwrap();
    let mut buf = Vec::new();
    let transmit = conn.poll_transmit(now, 1, &mut buf).expect("an Initial to send");
    buf.truncate(transmit.size);
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_handshakes_from_one_address_holds_only_its_share() {
    let work = tempfile::tempdir().unwrap();
    let mut config = fleet::config(&work.path().join("control"), "127.0.0.1:0".parse().unwrap());
    config.policy.handshakes = HandshakeLimits { max_total: 64, max_per_address: 4 };
    let control = Control::start_with(config, None).await;
    let handshakes = &control.shared.handshakes;
    let token = control.token("default").await;
    let client_config = hostile_config(&token);

    // Forty clients from one address (each its own port) begin a handshake and go quiet.
    let mut sockets = Vec::new();
    for _ in 0..40 {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        socket
            .send_to(&initial_datagram(control.quic, client_config.clone()), control.quic)
            .await
            .unwrap();
        sockets.push(socket);
    }
    eventually(Duration::from_secs(30), "every Initial is answered or refused", || async {
        handshakes.refused.load(Ordering::Relaxed) >= 36
    })
    .await;
    assert_eq!(handshakes.open(), 4, "the address's share of handshakes in progress");
    assert_eq!(handshakes.refused.load(Ordering::Relaxed), 36);
    control.stop().await;
}
