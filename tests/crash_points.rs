//! The agent killed at its crash points, then run again: what it had done is finished
//! or made again, never left half-way (issue 17): enrollment, and import and install (the
//! install path is the same for versions the control plane sends). The points abort the process, as a
//! power cut or SIGKILL stops it, where falaj-agent's `failpoints` feature (enabled for
//! the tests by the root package's dev-dependencies) puts them: `FAILPOINTS=NAME=return`.

mod fleet;
mod support;

use std::os::unix::process::ExitStatusExt as _;
use std::process::Command;
use std::time::Duration;

use support::{ControlProcess, FALAJ, Process, init_agent, ok, s, sample_bundle};

/// Runs `falaj ARGS...` with the crash point `point` armed; requires that it aborted.
fn crash_at(point: &str, args: &[&str]) {
    let out = Command::new(FALAJ)
        .args(args)
        .env("FAILPOINTS", format!("{point}=return"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("falaj runs");
    assert_eq!(
        out.status.signal(),
        Some(6),
        "falaj {args:?} did not stop at {point} ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn an_enrollment_killed_at_any_step_finishes_with_its_token() {
    let work = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(&work.path().join("control"), "127.0.0.1:0", &[]);
    let points = ["enroll-answered", "enroll-identity-written", "enroll-store-made"];
    for (done, point) in points.into_iter().enumerate() {
        let token = control.ok(&["control", "token", "create", "--group", "edge", "--ttl", "10m"]);
        let dir = work.path().join(point);
        let args = [
            "agent",
            "enroll",
            "--control-plane",
            &control.quic,
            "--token",
            token.trim(),
            "--data-dir",
            s(&dir),
        ];
        crash_at(point, &args);
        // The control plane answered and spent the token; the same agent asks again.
        let enrolled = ok(&args);
        assert!(enrolled.contains("in group edge"), "{point}: {enrolled}");
        let id = enrolled.split_whitespace().nth(2).unwrap().to_owned();
        let agents = control.ok(&["control", "agents"]);
        let rows: Vec<&str> = agents.lines().filter(|l| l.starts_with("agent-")).collect();
        assert_eq!(rows.len(), done + 1, "{point}: one agent per token:\n{agents}");
        assert!(rows.iter().any(|r| r.starts_with(&id)), "{point}: {id} listed:\n{agents}");

        // Its identity works: it connects.
        let _agent =
            Process::start(&["agent", "serve", "--data-dir", s(&dir), "--http", "127.0.0.1:0"]);
        fleet::eventually(Duration::from_secs(60), "the agent connects", || async {
            let agents = control.ok(&["control", "agents"]);
            agents.lines().any(|l| l.starts_with(&id) && l.contains("connected"))
        })
        .await;

        // Finished, the token enrolls no one else.
        let other = work.path().join(format!("{point}-other"));
        let err = support::fails(
            &[
                "agent",
                "enroll",
                "--control-plane",
                &control.quic,
                "--token",
                token.trim(),
                "--data-dir",
                s(&other),
            ],
            65,
        );
        assert!(err.contains("already used"), "{point}: {err}");
    }
}

#[test]
fn an_import_killed_at_any_step_leaves_the_last_version_serving() {
    let dir = tempfile::tempdir().unwrap();
    let first = sample_bundle(dir.path(), "eu-west-1", 1);
    let second = sample_bundle(dir.path(), "eu-west-1", 2);
    let agent = dir.path().join("agent");
    init_agent(&agent, "eu-west-1", &dir.path().join("keys/root.json"));
    ok(&["agent", "import", s(&first), "--data-dir", s(&agent)]);
    let versions = || {
        let list = ok(&["agent", "list", "--data-dir", s(&agent)]);
        list.lines()
            .filter(|l| l.starts_with("sensor-fault"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    for point in ["import-staged", "install-file-in-place"] {
        crash_at(point, &["agent", "import", s(&second), "--data-dir", s(&agent)]);
        // Version 1 alone, active; the second's file, in place without its row, is swept.
        let listed = versions();
        assert_eq!(listed.len(), 1, "{point}: {listed:?}");
        assert!(listed[0].contains(" 1 "), "{point}: {listed:?}");
        let files = std::fs::read_dir(agent.join("bundles/sensor-fault")).unwrap().count();
        assert_eq!(files, 1, "{point}: only version 1's file is left");
    }
    ok(&["agent", "import", s(&second), "--data-dir", s(&agent)]);
    let listed = versions();
    assert!(listed.iter().any(|l| l.contains(" 2 ")), "{listed:?}");
}
