//! Agents with several control-plane addresses (issue 21, part 3), on loopback: an agent
//! enrolled with a dead address first enrolls and installs through the live one; an agent
//! whose control plane moves from one address of its list to the other (same data
//! directory, so the same region CA and trust root) follows it and receives the next
//! deployment (both as real processes); and a host started on a copy of the region's keys
//! passes the agent's TLS check at an address it never saw, where a host on keys of its
//! own does not (real QUIC in this process).

use crate::fleet;
use crate::support;

use std::net::UdpSocket;
use std::path::Path;
use std::time::Duration;

use falaj_agent::enroll::{EnrollOptions, enroll};
use falaj_agent::sync::{SyncError, Syncer};
use fleet::Control;
use support::{ControlProcess, copy_dir, enroll_and_serve, fails, push_sample, s};

const MODEL: &str = "sensor-fault";

/// A UDP port on loopback where nothing answers: the socket is held (so nothing else
/// takes the port) and never read, as a replica that died without a trace.
fn black_hole() -> (UdpSocket, String) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let address = socket.local_addr().unwrap().to_string();
    (socket, address)
}

/// A loopback UDP port free now (bound, then released), for a control plane to come.
fn free_port() -> String {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

async fn serves(http: std::net::SocketAddr, version: u64) -> bool {
    support::infer(http, MODEL).await == Some(version)
}

/// Waits until the fleet view of `control` shows an agent connected, running `version`:
/// an agent serves a version before its report of it reaches the control plane.
async fn listed_running(control: &ControlProcess, version: u64) {
    let target = format!("{MODEL}@{version}");
    let what = format!("the fleet view shows an agent connected, running {target}");
    fleet::eventually(Duration::from_secs(30), &what, || async {
        control.agents_running(&target) == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_dead_address_first_enrolls_and_installs_through_the_live_one() {
    let work = tempfile::tempdir().unwrap();
    // A list that is not one is a usage error, before anything is made.
    let err = fails(
        &[
            "agent",
            "enroll",
            "--control-plane",
            "127.0.0.1:7443,,127.0.0.1:7444",
            "--token",
            "not-a-token",
            "--data-dir",
            s(&work.path().join("refused")),
        ],
        64,
    );
    assert!(err.contains("empty control-plane address"), "{err}");
    assert!(!work.path().join("refused").join("agent.db").exists());

    let control = ControlProcess::start(&work.path().join("control"), "127.0.0.1:0", &[]);
    push_sample(&control, work.path(), MODEL, 1);
    control.ok(&["control", "deploy", &format!("{MODEL}@1"), "--group", "edge"]);
    let (_dead, dead) = black_hole();
    // Enrollment tries the addresses in the order given: the dead one first.
    let list = format!("{dead},{}", control.quic);
    let (agent, http) = enroll_and_serve(&control, &work.path().join("agent"), &list);
    fleet::eventually(Duration::from_secs(120), "version 1 is served", || serves(http, 1)).await;

    listed_running(&control, 1).await;
    assert_eq!(agent.terminate(), Some(0));
    assert_eq!(control.terminate(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_follows_its_control_plane_to_the_other_address_of_its_list() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("control");
    let second = free_port();
    let first = ControlProcess::start(&data, "127.0.0.1:0", &["--heartbeat", "1s"]);
    for version in [1, 2] {
        push_sample(&first, work.path(), MODEL, version);
    }
    first.ok(&["control", "deploy", &format!("{MODEL}@1"), "--group", "edge"]);
    let list = format!("{},{second}", first.quic);
    let (agent, http) = enroll_and_serve(&first, &work.path().join("agent"), &list);
    fleet::eventually(Duration::from_secs(120), "version 1 is served", || serves(http, 1)).await;

    // The control plane stops at the first address and starts at the second, on the same
    // data directory: the same CA, trust root and database, a new server certificate.
    assert_eq!(first.terminate(), Some(0));
    let moved = ControlProcess::start(&data, &second, &["--heartbeat", "1s"]);
    assert_eq!(moved.quic, second);
    moved.ok(&["control", "deploy", &format!("{MODEL}@2"), "--group", "edge"]);
    // Nothing listens at the first address any more: only the second can bring version 2.
    fleet::eventually(Duration::from_secs(120), "version 2 is served", || serves(http, 2)).await;

    listed_running(&moved, 2).await;
    assert_eq!(agent.terminate(), Some(0));
    assert_eq!(moved.terminate(), Some(0));
}

/// What a session attempt with every address of the agent in `dir` ends with.
async fn probe(dir: &Path) -> Result<(), SyncError> {
    Syncer::open(dir.to_owned(), std::sync::Arc::default(), fleet::sync_config())
        .unwrap()
        .expect("enrolled")
        .probe()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_on_the_regions_keys_passes_tls_at_any_address_and_one_on_its_own_keys_does_not() {
    let work = tempfile::tempdir().unwrap();
    let first = Control::start(&work.path().join("first")).await;
    let second_addr: std::net::SocketAddr = free_port().parse().unwrap();
    let agent = work.path().join("agent");
    let options = EnrollOptions {
        control_plane: format!("{},{second_addr}", first.quic),
        token: first.token("edge").await,
        hostname: "test-host".into(),
        region: None,
    };
    let identity = enroll(&agent, &options, std::time::SystemTime::now()).await.unwrap();
    assert_eq!(identity.control_planes(), [first.quic.to_string(), second_addr.to_string()]);
    probe(&agent).await.unwrap();
    let keys = first.dir.join("keys");
    first.stop().await;

    // A second host given a copy of the region's keys directory (its CA among them) and a
    // data directory of its own: its certificate, made at its start, passes the agent's
    // check at the second address. Its database does not know the agent (sharing one is
    // the PostgreSQL part of issue 21), so it is that database, after the handshake, that
    // turns the agent away, not TLS.
    let second_dir = work.path().join("second");
    copy_dir(&keys, &second_dir.join("keys"));
    let second = Control::start_with(fleet::config(&second_dir, second_addr), None).await;
    let err = probe(&agent).await.unwrap_err();
    assert!(
        matches!(&err, SyncError::Closed(reason) if reason.contains("revoked or unknown")),
        "TLS passed, the agent is unknown there: {err}"
    );
    second.stop().await;

    // A host on keys of its own at the same address fails the handshake itself.
    let impostor =
        Control::start_with(fleet::config(&work.path().join("impostor"), second_addr), None).await;
    let err = probe(&agent).await.unwrap_err().to_string();
    assert!(err.to_lowercase().contains("certificate") || err.contains("issuer"), "{err}");
    impostor.stop().await;
}
