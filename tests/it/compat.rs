//! Compatibility with agents of the previous protocol version (issue 20, part 4): the
//! frames `falaj-common` committed under `common/tests/data/golden/protocol-v1/` are
//! what an agent of protocol version 1 sends, byte for byte. They are replayed here,
//! over real QUIC and mutual TLS, against a running control plane of this build, which
//! must decode each and answer it as it answers today's agent: the enrollment request,
//! then a whole session (hello, metric windows, audit lines, a renewal, a report).
//!
//! The version itself is the ALPN name (`falaj-agent/1`, `falaj-enroll/1`), with no
//! negotiation beyond it: a client offering only other versions, or none, is refused in
//! the handshake; one offering several gets the control plane's. When the protocol moves to version 2, the control plane is meant to keep
//! accepting `/1` with these files, or this test records the deliberate break.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use crate::fleet::{Control, eventually};
use falaj_agent::enroll::{self, EnrollOptions};
use falaj_agent::identity::IdentityFiles;
use falaj_common::protocol::io::read_frame;
use falaj_common::protocol::{ALPN_AGENT, ControlMessage, EnrollResponse, SERVER_NAME};
use rustls::pki_types::CertificateDer;

const LIMIT: Duration = Duration::from_secs(30);

/// The committed items of a hex file under `protocol-v1/`, by label (see
/// `common/tests/it/golden/mod.rs` for the format).
fn golden(file: &str) -> Vec<(String, Vec<u8>)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("common/tests/data/golden/protocol-v1")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut items: Vec<(String, Vec<u8>)> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if let Some(label) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            items.push((label.to_owned(), Vec::new()));
        } else {
            let item = items.last_mut().expect("bytes follow a label");
            item.1.extend(hex_bytes(line));
        }
    }
    items
}

fn hex_bytes(line: &str) -> Vec<u8> {
    let digit = |c: u8| char::from(c).to_digit(16).expect("a hex digit") as u8;
    line.as_bytes().chunks(2).map(|pair| digit(pair[0]) << 4 | digit(pair[1])).collect()
}

/// The frame labelled `label` in `file`.
fn frame(file: &str, label: &str) -> Vec<u8> {
    golden(file)
        .into_iter()
        .find(|(l, _)| l == label)
        .unwrap_or_else(|| panic!("{file} has no [{label}]"))
        .1
}

/// A control plane and an agent identity enrolled with it (by this build's agent: the
/// identity is what makes a session possible; what is sent in it comes from the files).
async fn enrolled(work: &Path) -> (Control, PathBuf) {
    let control = Control::start(&work.join("control")).await;
    let dir = work.join("agent");
    let options = EnrollOptions {
        control_plane: control.quic.to_string(),
        token: control.token("default").await,
        hostname: "v1-agent".into(),
        region: None,
    };
    enroll::enroll(&dir, &options, SystemTime::now()).await.unwrap();
    (control, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_v1_agent_enrolls_and_holds_a_session() {
    let work = tempfile::tempdir().unwrap();
    let (control, dir) = enrolled(work.path()).await;
    let endpoint = enroll::client_endpoint(control.quic).unwrap();

    // The committed enrollment request names a token of another control plane: it must
    // be read and refused for that, not as a frame that does not decode.
    let config = falaj_agent::identity::enroll_config(control.shared.ca.fingerprint()).unwrap();
    let conn = endpoint.connect_with(config, control.quic, SERVER_NAME).unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame("enroll-request.hex", "EnrollRequest")).await.unwrap();
    send.finish().unwrap();
    let answer = tokio::time::timeout(LIMIT, read_frame::<EnrollResponse>(&mut recv)).await;
    match answer.unwrap().unwrap() {
        Some(EnrollResponse::Refused(reason)) => {
            assert!(reason.contains("another control plane"), "{reason}");
        }
        other => panic!("expected a refusal of the token, got {other:?}"),
    }
    conn.close(0u32.into(), b"done");

    // A session: every message of the committed file but the empty report, in order.
    let config = IdentityFiles::new(&dir).session_config().unwrap();
    let conn = endpoint.connect_with(config, control.quic, SERVER_NAME).unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let frames: Vec<(String, Vec<u8>)> = golden("agent-messages.hex")
        .into_iter()
        .filter(|(label, _)| label != "Report (empty)")
        .collect();
    let labels: Vec<&str> = frames.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(labels, ["Hello", "Windows", "Audit", "Renew", "Report"]);
    for (_, bytes) in &frames {
        send.write_all(bytes).await.unwrap();
    }

    // Each is answered as today's agent's: windows acknowledged, audit lines stored, the
    // renewal's (invalid) CSR refused as a renewal.
    let (mut acked, mut audited, mut renewal) = (None, None, None);
    while acked.is_none() || audited.is_none() || renewal.is_none() {
        let message = tokio::time::timeout(LIMIT, read_frame::<ControlMessage>(&mut recv))
            .await
            .expect("the control plane answers within 30 s")
            .unwrap()
            .expect("the session stays open");
        match message {
            ControlMessage::Ack { seqs } => acked = Some(seqs),
            ControlMessage::AuditAck { seq } => audited = Some(seq),
            ControlMessage::Refused(reason) => renewal = Some(reason),
            ControlMessage::Desired(_) | ControlMessage::TrustRoots(_) => {}
            ControlMessage::Renewed { .. } => panic!("a certificate for a CSR that is not one"),
        }
    }
    assert_eq!(acked, Some(vec![1, 2]));
    assert_eq!(audited, Some(3));
    let renewal = renewal.unwrap();
    assert!(renewal.starts_with("renewal refused"), "{renewal}");
    // Both windows are of a version the hello reported holding, opened in the past: stored.
    assert_eq!(control.shared.ingest.stored.load(Ordering::Relaxed), 2);
    assert_eq!(control.shared.ingest.rejected.load(Ordering::Relaxed), 0);

    // The report (after the hello) is the agent's state in the fleet view.
    eventually(LIMIT, "the fleet shows the v1 agent's report", || async {
        let agents = control.client.agents().await.unwrap();
        agents.iter().any(|a| a.agent_version == "0.9.0" && a.applied_version == Some(5))
    })
    .await;
    let agents = control.client.agents().await.unwrap();
    let agent = &agents[0];
    assert_eq!(agent.held.len(), 2, "{:?}", agent.held);
    assert!(agent.ready);
    assert_eq!(agent.engines[0].name, "tract-cpu");
    assert_eq!(agent.trust_version, 1);
    assert_eq!(agent.errors, ["fetch of fault@3 failed: connection lost (é)"]);
    conn.close(0u32.into(), b"done");
    control.stop().await;
}

/// A client of the control plane's CA offering `alpn` (no certificate: the version is
/// settled in the handshake, before any certificate matters).
fn offering(ca: &CertificateDer<'static>, alpn: &[&[u8]]) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(crypto))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_version_is_the_alpn_and_others_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let control = Control::start(&work.path().join("control")).await;
    let ca = control.shared.ca.cert_der().clone();
    let endpoint = enroll::client_endpoint(control.quic).unwrap();
    let connect = |alpn: &[&[u8]]| {
        endpoint.connect_with(offering(&ca, alpn), control.quic, SERVER_NAME).unwrap()
    };

    // An older or newer version alone, or none (QUIC requires one): no application
    // protocol in common, the handshake fails with TLS alert 120.
    let offers: [&[&[u8]]; 4] =
        [&[], &[b"falaj-agent/0"], &[b"falaj-agent/2"], &[b"falaj-enroll/2", b"falaj-agent/3"]];
    for alpn in offers {
        let refused = tokio::time::timeout(LIMIT, connect(alpn)).await.unwrap();
        match refused {
            Err(quinn::ConnectionError::ConnectionClosed(close)) => {
                assert_eq!(close.error_code, quinn::TransportErrorCode::crypto(120), "{close}");
            }
            other => panic!("offering {alpn:?}: expected a refused handshake, got {other:?}"),
        }
    }

    // A later agent offering a newer version first and this one after gets this one.
    let conn = tokio::time::timeout(LIMIT, connect(&[b"falaj-agent/2", ALPN_AGENT]))
        .await
        .unwrap()
        .unwrap();
    let data = conn.handshake_data().unwrap();
    let data = data.downcast::<quinn::crypto::rustls::HandshakeData>().unwrap();
    assert_eq!(data.protocol.as_deref(), Some(ALPN_AGENT));
    conn.close(0u32.into(), b"done");

    control.stop().await;
}
