//! The agent and the control plane killed at their crash points, then run again: what
//! they had done is finished or made again, never left half-way (issue 17): enrollment,
//! import and install, a version the control plane sends (downloaded, staged, in place,
//! installed, activated), certificate renewal (key kept, request sent, answer received,
//! identity written), metric-window delivery (written to the outbox, sent, acknowledged,
//! removed) and the control plane's feature ingest (file staged, rows written, committed).
//! The points abort the process, as a power cut or SIGKILL stops it, where the
//! `failpoints` features of falaj-agent and falaj-control (enabled for the tests by the
//! root package's dev-dependencies) put them: `FAILPOINTS=NAME=return`.

use crate::fleet;
use crate::support;

use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use falaj_agent::identity::IdentityFiles;
use falaj_agent::store::Store;
use fleet::{Control, eventually};
use support::{ControlProcess, FALAJ, Process, active, infer, init_agent, ok, s, sample_bundle};

/// How long an armed process may take to reach its point.
const TO_THE_POINT: Duration = Duration::from_secs(90);

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
        eventually(Duration::from_secs(60), "the agent connects", || async {
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

/// Requires that `status` is the abort of a crash point.
fn aborted(status: std::process::ExitStatus, point: &str) {
    assert_eq!(status.signal(), Some(6), "{point}: the process did not stop there ({status})");
}

/// Enrolls an agent in `dir` with `control`'s token for `group` through the CLI; returns
/// its id.
async fn enroll(control: &Control, dir: &Path, group: &str) -> String {
    let token = control.token(group).await;
    let quic = control.quic.to_string();
    let args =
        ["agent", "enroll", "--control-plane", &quic, "--token", &token, "--data-dir", s(dir)];
    let out = support::falaj_async(args.iter().map(|a| (*a).to_owned()).collect()).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    stdout.split_whitespace().nth(2).expect("enrolled as ID").to_owned()
}

/// `falaj agent serve` on `dir`, reporting every 200 ms, with `env` (the crash point armed).
fn serve(dir: &Path, config: Option<&Path>, env: &[(&str, &str)]) -> Process {
    let mut args = vec!["agent", "serve", "--data-dir", s(dir), "--http", "127.0.0.1:0"];
    args.extend(["--heartbeat", "200ms"]);
    if let Some(config) = config {
        args.extend(["--config", s(config)]);
    }
    Process::start_with_env(&args, env)
}

/// [`serve`] with `point` armed: waits for the abort there.
fn serve_until(dir: &Path, config: Option<&Path>, point: &str) {
    let armed = format!("{point}=return");
    let mut agent = serve(dir, config, &[("FAILPOINTS", &armed)]);
    aborted(tokio::task::block_in_place(|| agent.wait_exit(TO_THE_POINT)), point);
}

/// The active version in the agent's store, read as `falaj agent list` reads it.
fn active_in_store(dir: &Path, model: &str) -> Option<u64> {
    let store = Store::open(dir).expect("the store opens");
    let installed = store.installed().expect("the store reads");
    let files = std::fs::read_dir(dir.join("bundles").join(model)).map_or(0, Iterator::count);
    let rows = installed.iter().filter(|i| i.manifest.name == model).count();
    assert_eq!(files, rows, "one file per installed version of {model}, nothing left over");
    installed.iter().find(|i| i.manifest.name == model && i.active).map(|i| i.manifest.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_sent_and_killed_at_any_step_installs_and_activates_when_run_again() {
    const MODEL: &str = "sensor-fault";
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let control = Control::start(&work.join("control")).await;
    let dir = work.join("agent");
    enroll(&control, &dir, "edge").await;
    control.push_sample(work, MODEL, 1).await;
    control.client.deploy("edge", MODEL, 1).await.unwrap();
    let mut agent = serve(&dir, None, &[]);
    let http = agent.wait_for_addr("serving the Open Inference Protocol");
    eventually(Duration::from_secs(90), "version 1 serves", || async {
        infer(http, MODEL).await == Some(1)
    })
    .await;
    assert_eq!(tokio::task::block_in_place(|| agent.terminate()), Some(0));

    // Each point in the order a version goes through them: the chunks fetched, the file
    // assembled and staged (`import-staged`), in place without its row
    // (`install-file-in-place`), installed, then active.
    let points = [
        "sync-downloaded",
        "import-staged",
        "install-file-in-place",
        "sync-installed",
        "sync-activated",
    ];
    for (i, point) in points.into_iter().enumerate() {
        let version = i as u64 + 2;
        control.push_sample(work, MODEL, version).await;
        control.client.deploy("edge", MODEL, version).await.unwrap();
        serve_until(&dir, None, point);
        // The last version stays active (the new one only once switched to), its file
        // with it; no file is left without its row.
        let expect = if point == "sync-activated" { version } else { version - 1 };
        let found = tokio::task::block_in_place(|| active_in_store(&dir, MODEL));
        assert_eq!(found, Some(expect), "{point}: the active version after the kill");

        // Run again: it serves at once what is active, and converges to the new version.
        let mut agent = serve(&dir, None, &[]);
        let http = agent.wait_for_addr("serving the Open Inference Protocol");
        eventually(Duration::from_secs(60), "the active version loads", || async {
            active(http, MODEL).await.is_some()
        })
        .await;
        eventually(Duration::from_secs(90), "the new version serves", || async {
            infer(http, MODEL).await == Some(version)
        })
        .await;
        assert_eq!(tokio::task::block_in_place(|| agent.terminate()), Some(0), "{point}");
        let found = tokio::task::block_in_place(|| active_in_store(&dir, MODEL));
        assert_eq!(found, Some(version), "{point}");
    }
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewal_killed_at_any_step_keeps_the_identity_and_renews_when_run_again() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let mut config = fleet::config(&work.join("control"), "127.0.0.1:0".parse().unwrap());
    // Renewed about 19 s after issue, 11 s before the expiry.
    config.policy.cert_ttl = Duration::from_secs(30);
    let control = Control::start_with(config, None).await;
    let points = ["renew-key-written", "renew-requested", "renew-answered", "renew-installed"];
    let mut agents: Vec<(&str, PathBuf, String)> = Vec::new();
    for point in points {
        let dir = work.join(point);
        let id = enroll(&control, &dir, "edge").await;
        agents.push((point, dir, id));
    }
    // All four at once, each armed at its own point, so the wait for renewal is one wait.
    let mut armed: Vec<(&str, Process)> = agents
        .iter()
        .map(|(point, dir, _)| {
            let env = format!("{point}=return");
            (*point, serve(dir, None, &[("FAILPOINTS", &env)]))
        })
        .collect();
    let mut first = Vec::new();
    for ((point, process), (_, dir, _)) in armed.iter_mut().zip(&agents) {
        let files = IdentityFiles::new(dir);
        let (_, expiry) = files.validity().unwrap();
        first.push(expiry);
        aborted(tokio::task::block_in_place(|| process.wait_exit(TO_THE_POINT)), point);
        // The working identity is kept whatever step the renewal reached.
        let (_, now) = files.validity().expect("an identity after the kill");
        assert!(now >= expiry, "{point}: the identity went backwards");
        files.session_config().expect("the identity makes a session");
    }

    let running: Vec<Process> = agents.iter().map(|(_, dir, _)| serve(dir, None, &[])).collect();
    for (((_, dir, id), expiry), _) in agents.iter().zip(&first).zip(&running) {
        eventually(Duration::from_secs(60), "the agent connects again", || async {
            control.shared.connected(id)
        })
        .await;
        let files = IdentityFiles::new(dir);
        eventually(Duration::from_secs(60), "the certificate is renewed", || async {
            files.validity().is_ok_and(|(_, now)| now > *expiry)
        })
        .await;
    }
    for agent in running {
        assert_eq!(tokio::task::block_in_place(|| agent.terminate()), Some(0));
    }
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn windows_killed_at_any_step_of_delivery_are_counted_once() {
    const MODEL: &str = "sensor-fault";
    const REQUESTS: u64 = 7;
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let control = Control::start(&work.join("control")).await;
    let dir = work.join("agent");
    enroll(&control, &dir, "edge").await;
    control.push_sample(work, MODEL, 1).await;
    control.client.deploy("edge", MODEL, 1).await.unwrap();
    // Windows close only at a stop, so each run's requests are in one window.
    let config = work.join("agent.toml");
    std::fs::write(&config, "[metrics]\nwindow = \"1h\"\n").unwrap();
    let counted = || async {
        let view = control.client.metrics(MODEL, None, None, None, Duration::from_secs(3600));
        let view = view.await.ok()?;
        view.versions.into_iter().find(|v| v.version == 1).map(|v| v.requests)
    };

    let mut served = 0;
    for point in ["outbox-written", "outbox-sent", "outbox-acknowledged", "outbox-removed"] {
        let armed = format!("{point}=return");
        let mut agent = serve(&dir, Some(&config), &[("FAILPOINTS", &armed)]);
        let http = agent.wait_for_addr("serving the Open Inference Protocol");
        eventually(Duration::from_secs(90), "version 1 serves", || async {
            active(http, MODEL).await == Some(1)
        })
        .await;
        for _ in 0..REQUESTS {
            assert_eq!(infer(http, MODEL).await, Some(1), "{point}");
        }
        served += REQUESTS;
        // The stop closes the window into the outbox (`outbox-written` aborts there); a
        // stop that got through leaves it for the next run to send.
        let stopped = tokio::task::block_in_place(|| agent.terminate_status());
        if stopped.signal() != Some(6) {
            assert!(stopped.success(), "{point}: {stopped}");
            serve_until(&dir, Some(&config), point);
        }

        // Run again: whatever the step, the control plane counts each request once.
        let mut agent = serve(&dir, Some(&config), &[]);
        let http = agent.wait_for_addr("serving the Open Inference Protocol");
        eventually(Duration::from_secs(60), "every request is counted", || async {
            counted().await.unwrap_or(0) >= served
        })
        .await;
        eventually(Duration::from_secs(60), "the outbox is empty", || async {
            let text = reqwest::get(format!("http://{http}/metrics")).await.unwrap();
            let text = text.text().await.unwrap();
            text.lines().any(|l| l == "falaj_outbox_windows 0")
        })
        .await;
        assert_eq!(counted().await, Some(served), "{point}: counted once");
        assert_eq!(tokio::task::block_in_place(|| agent.terminate()), Some(0), "{point}");
    }
    control.stop().await;
}

#[test]
fn an_ingest_killed_at_any_step_leaves_each_row_once() {
    const ROWS: i64 = 200;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("control");
    let view = work.path().join("pump-sensors.toml");
    std::fs::write(&view, falaj_control::sample::pump_view()).unwrap();
    let stored = || {
        let db = rusqlite::Connection::open(data.join("features.db")).unwrap();
        let count = |sql: &str| db.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        (count("SELECT COUNT(*) FROM \"fv_pump-sensors_1\""), count("SELECT COUNT(*) FROM ingests"))
    };
    let staged = || std::fs::read_dir(data.join("staging")).map_or(0, Iterator::count);
    let control = ControlProcess::start_on_sqlite(&data, "127.0.0.1:0", &[]);
    control.ok(&["control", "features", "apply", s(&view)]);
    // Stopped (a SIGTERM before its handler is set ends it at once: fine here).
    control.terminate();

    let points =
        [("ingest-staged", false), ("ingest-rows-written", false), ("ingest-committed", true)];
    for (i, (point, committed)) in points.into_iter().enumerate() {
        // Readings of hours no earlier file had: 100 pumps, two hours each.
        let readings = work.path().join(format!("readings-{i}.csv"));
        let start = 1_790_000_000_000_000 + i as i64 * 10 * 3_600_000_000;
        falaj_control::sample::write_pump_readings(&readings, 100, 2, start, 3).unwrap();
        let ingest = ["control", "features", "ingest", "pump-sensors", s(&readings)];
        let (rows, ingests) = stored();

        let armed = format!("{point}=return");
        let mut control =
            ControlProcess::start_on_sqlite(&data, "127.0.0.1:0", &[("FAILPOINTS", &armed)]);
        let args = control.args(&ingest);
        let out = support::falaj(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!out.status.success(), "{point}: the ingest had no answer");
        aborted(control.process.wait_exit(TO_THE_POINT), point);
        // All of the file or none of it, and its record with it.
        let expect = if committed { (rows + ROWS, ingests + 1) } else { (rows, ingests) };
        assert_eq!(stored(), expect, "{point}: rows and ingests after the kill");
        assert_eq!(staged(), 1, "{point}: the upload is left staged");

        // Run again: the upload is removed, and the file sent again is stored once.
        let control = ControlProcess::start_on_sqlite(&data, "127.0.0.1:0", &[]);
        assert_eq!(staged(), 0, "{point}: the upload left staged is removed");
        let out = control.ok(&ingest);
        assert!(out.contains(&format!("ingested {ROWS} rows")), "{point}: {out}");
        assert_eq!(stored().0, rows + ROWS, "{point}: each row once");
        // Stopped (a SIGTERM before its handler is set ends it at once: fine here).
        control.terminate();
    }
}
