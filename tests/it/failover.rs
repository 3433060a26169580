//! Agents with several control-plane addresses (issue 21, part 3), as real processes on
//! loopback: an agent enrolled with a dead address first enrolls and installs through the
//! live one; an agent whose control plane moves from one address of its list to the other
//! (same data directory, so the same region CA and trust root) follows it and receives
//! the next deployment.

use crate::fleet;
use crate::support;

use std::net::UdpSocket;
use std::path::Path;
use std::time::Duration;

use support::{ControlProcess, Process, fails, ok, s};

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

/// Builds the sample model as `MODEL@version` with `control`'s keys and pushes it.
fn push(control: &ControlProcess, work: &Path, version: u64) {
    let sample = work.join("sample");
    if !sample.join("model.onnx").exists() {
        ok(&["control", "sample", "--out", s(&sample), "--rows", "2000"]);
    }
    let out = work.join(format!("{MODEL}-{version}.falaj"));
    ok(&[
        "control",
        "bundle",
        "build",
        "--keys",
        s(&control.data.join("keys")),
        "--model",
        s(&sample.join("model.onnx")),
        "--name",
        MODEL,
        "--version",
        &version.to_string(),
        "--out",
        s(&out),
    ]);
    let pushed = control.ok(&["control", "bundle", "push", s(&out)]);
    assert!(pushed.contains(&format!("registered {MODEL}@{version}")), "{pushed}");
}

/// Enrolls an agent in `dir` with `addresses` and starts it; returns it and its HTTP address.
fn enroll_and_serve(
    control: &ControlProcess,
    dir: &Path,
    addresses: &str,
) -> (Process, std::net::SocketAddr) {
    let token = control.ok(&["control", "token", "create", "--group", "edge", "--ttl", "10m"]);
    let enrolled = ok(&[
        "agent",
        "enroll",
        "--control-plane",
        addresses,
        "--token",
        token.trim(),
        "--data-dir",
        s(dir),
    ]);
    let shown = addresses.replace(',', ", ");
    assert!(enrolled.contains(&format!("with the control plane at {shown}")), "{enrolled}");
    let mut agent = Process::start(&[
        "agent",
        "serve",
        "--data-dir",
        s(dir),
        "--http",
        "127.0.0.1:0",
        "--heartbeat",
        "500ms",
    ]);
    let http = agent.wait_for_addr("serving the Open Inference Protocol");
    let line = agent.wait_for("syncing with the control plane at");
    assert!(line.contains(&shown), "the stored list: {line}");
    (agent, http)
}

async fn serves(http: std::net::SocketAddr, version: u64) -> bool {
    support::infer(http, MODEL).await == Some(version)
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
    push(&control, work.path(), 1);
    control.ok(&["control", "deploy", &format!("{MODEL}@1"), "--group", "edge"]);
    let (_dead, dead) = black_hole();
    // Enrollment tries the addresses in the order given: the dead one first.
    let list = format!("{dead},{}", control.quic);
    let (agent, http) = enroll_and_serve(&control, &work.path().join("agent"), &list);
    fleet::eventually(Duration::from_secs(120), "version 1 is served", || serves(http, 1)).await;

    let fleet_view = control.ok(&["control", "agents"]);
    assert!(
        fleet_view.lines().any(|l| l.contains("connected") && l.contains(&format!("{MODEL}@1"))),
        "{fleet_view}"
    );
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
        push(&first, work.path(), version);
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

    let fleet_view = moved.ok(&["control", "agents"]);
    assert!(
        fleet_view.lines().any(|l| l.contains("connected") && l.contains(&format!("{MODEL}@2"))),
        "{fleet_view}"
    );
    assert_eq!(agent.terminate(), Some(0));
    assert_eq!(moved.terminate(), Some(0));
}
