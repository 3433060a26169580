//! Disks that fill or turn read-only (issue 17). An import runs with a limit on the size
//! of any file it writes (`ulimit -f`, SIGXFSZ ignored, so a write past it fails as it
//! would on a full disk). A feature ingest and the agent's metric windows run on a small
//! tmpfs filled to the last bytes, and the agent and the control plane start on a data
//! directory remounted read-only (support::disk). Each fails with an error naming the
//! file and the cause, loses and corrupts nothing, and works once space or write access
//! returns.

use crate::fleet;
use crate::support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use fleet::{Control, eventually};
use support::disk::SmallDisk;
use support::{ControlProcess, FALAJ, Process, active, infer, init_agent, ok, s, sample_bundle};

#[test]
fn an_import_that_fills_the_disk_fails_cleanly_and_runs_once_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let first = sample_bundle(dir.path(), "eu-west-1", 1);
    let agent = dir.path().join("agent");
    init_agent(&agent, "eu-west-1", &dir.path().join("keys/root.json"));
    ok(&["agent", "import", s(&first), "--data-dir", s(&agent)]);

    // A 4 MiB version 2 of the same model name.
    let model = fleet::layered_model(&dir.path().join("big.onnx"), 4, 1);
    let big = dir.path().join("sensor-fault-2.falaj");
    ok(&[
        "control",
        "bundle",
        "build",
        "--keys",
        s(&dir.path().join("keys")),
        "--model",
        s(&model),
        "--name",
        "sensor-fault",
        "--version",
        "2",
        "--out",
        s(&big),
    ]);
    assert!(std::fs::metadata(&big).unwrap().len() > 2 << 20);

    // Files may grow to 1 MiB.
    let out = Command::new("sh")
        .args([
            "-c",
            r#"trap "" XFSZ; ulimit -f 1024; exec "$0" "$@""#,
            FALAJ,
            "agent",
            "import",
            s(&big),
            "--data-dir",
            s(&agent),
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the import cannot have succeeded: {stderr}");
    assert!(stderr.contains("staged bundle") && stderr.contains("File too large"), "{stderr}");

    let list = ok(&["agent", "list", "--data-dir", s(&agent)]);
    let versions: Vec<&str> = list.lines().filter(|l| l.starts_with("sensor-fault")).collect();
    assert_eq!(versions.len(), 1, "{list}");
    assert!(versions[0].contains(" 1 "), "{list}");
    let staging = std::fs::read_dir(agent.join("staging")).map_or(0, Iterator::count);
    assert_eq!(staging, 0, "the staged part is removed");
    let bundles = std::fs::read_dir(agent.join("bundles/sensor-fault")).unwrap().count();
    assert_eq!(bundles, 1, "only version 1's file");

    ok(&["agent", "import", s(&big), "--data-dir", s(&agent)]);
    let list = ok(&["agent", "list", "--data-dir", s(&agent)]);
    assert!(list.lines().any(|l| l.starts_with("sensor-fault") && l.contains(" 2 ")), "{list}");
}

#[test]
fn an_ingest_that_fills_the_disk_fails_naming_the_store_and_runs_once_space_returns() {
    const ROWS: i64 = 6000;
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("control");
    let disk = SmallDisk::mount(&data, 32);
    let view = work.path().join("pump-sensors.toml");
    std::fs::write(&view, falaj_control::sample::pump_view()).unwrap();
    let readings = work.path().join("readings.csv");
    falaj_control::sample::write_pump_readings(&readings, 2000, 3, 1_790_000_000_000_000, 5)
        .unwrap();
    let stored = || {
        let db = rusqlite::Connection::open(data.join("features.db")).unwrap();
        let count = |sql: &str| db.query_row(sql, [], |r| r.get::<_, String>(0)).unwrap();
        let rows = count("SELECT CAST(COUNT(*) AS TEXT) FROM \"fv_pump-sensors_1\"");
        let ingests = count("SELECT CAST(COUNT(*) AS TEXT) FROM ingests");
        (
            rows.parse::<i64>().unwrap(),
            ingests.parse::<i64>().unwrap(),
            count("PRAGMA integrity_check"),
        )
    };
    let control = ControlProcess::start_on_sqlite(&data, "127.0.0.1:0", &[]);
    control.ok(&["control", "features", "apply", s(&view)]);

    // No room for the upload itself: refused while staging, naming the directory.
    let size = std::fs::metadata(&readings).unwrap().len();
    let ingest = ["control", "features", "ingest", "pump-sensors", s(&readings)];
    disk.fill(size / 2);
    let err = control.fails(&ingest, 1);
    assert!(err.contains("staging directory") && err.contains("is full"), "{err}");
    assert_eq!(stored(), (0, 0, "ok".into()), "nothing written, nothing damaged");
    let staged = std::fs::read_dir(data.join("staging")).map_or(0, Iterator::count);
    assert_eq!(staged, 0, "the partial upload is removed");
    disk.free();

    // Room for the upload to be staged, not for its rows.
    disk.fill(size + 128 * 1024);
    let err = control.fails(&ingest, 1);
    assert!(err.contains("features.db is full") && err.contains("nothing was ingested"), "{err}");
    assert_eq!(stored(), (0, 0, "ok".into()), "nothing written, nothing damaged");
    let staged = std::fs::read_dir(data.join("staging")).map_or(0, Iterator::count);
    assert_eq!(staged, 0, "the upload is removed");

    disk.free();
    let out = control.ok(&ingest);
    assert!(out.contains(&format!("ingested {ROWS} rows")), "{out}");
    assert_eq!(stored(), (ROWS, 1, "ok".into()));
    // Stopped (a SIGTERM before its handler is set ends it at once: fine here).
    control.terminate();
    drop(disk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn windows_closed_while_the_disk_is_full_are_delivered_once_space_returns() {
    const MODEL: &str = "sensor-fault";
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let control = Control::start(&work.join("control")).await;
    let disk = SmallDisk::mount(&work.join("agent"), 16);
    let dir = disk.dir.clone();
    let token = control.token("edge").await;
    let quic = control.quic.to_string();
    let enroll =
        ["agent", "enroll", "--control-plane", &quic, "--token", &token, "--data-dir", s(&dir)];
    let out = support::falaj_async(enroll.iter().map(|a| (*a).to_owned()).collect()).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    control.push_sample(work, MODEL, 1).await;
    control.client.deploy("edge", MODEL, 1).await.unwrap();
    let config = work.join("agent.toml");
    std::fs::write(&config, "[metrics]\nwindow = \"200ms\"\n").unwrap();
    let serve =
        ["agent", "serve", "--data-dir", s(&dir), "--http", "127.0.0.1:0", "--config", s(&config)];

    // Installed and serving, then stopped: its database is whole, its WAL gone.
    let mut agent = Process::start(&serve);
    let http = agent.wait_for_addr("serving the Open Inference Protocol");
    eventually(Duration::from_secs(90), "version 1 serves", || async {
        infer(http, MODEL).await == Some(1)
    })
    .await;
    assert_eq!(tokio::task::block_in_place(|| agent.terminate()), Some(0));

    // Room to open the database, little more: windows soon find the disk full.
    disk.fill(160 * 1024);
    let mut agent = Process::start_logging(&serve, &[]);
    let http = agent.wait_for_addr("serving the Open Inference Protocol");
    eventually(Duration::from_secs(60), "version 1 serves", || async {
        active(http, MODEL).await == Some(1)
    })
    .await;
    let (stop, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let traffic = tokio::spawn({
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        async move {
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(infer(http, MODEL).await, Some(1), "serving goes on on a full disk");
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let failed = tokio::task::block_in_place(|| {
        agent.wait_for("writing metric windows to the outbox failed")
    });
    assert!(failed.contains("agent.db") && failed.contains("full"), "{failed}");
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    // And the one inference that showed version 1 serving before the disk filled.
    let sent = sent.load(Ordering::Relaxed) + 1;

    // Space returns: the windows kept meanwhile are written and delivered, each once.
    disk.free();
    let counted = || async {
        let view = control.client.metrics(MODEL, None, None, None, Duration::from_secs(3600));
        let view = view.await.ok()?;
        view.versions.into_iter().find(|v| v.version == 1).map(|v| v.requests)
    };
    eventually(Duration::from_secs(60), "every request is counted", || async {
        counted().await.unwrap_or(0) >= sent
    })
    .await;
    eventually(Duration::from_secs(60), "the outbox is empty", || async {
        let text = reqwest::get(format!("http://{http}/metrics")).await.unwrap();
        text.text().await.unwrap().lines().any(|l| l == "falaj_outbox_windows 0")
    })
    .await;
    assert_eq!(counted().await, Some(sent), "counted once, none lost");
    assert_eq!(tokio::task::block_in_place(|| agent.terminate()), Some(0));
    control.stop().await;
    drop(disk);
}

#[test]
fn a_read_only_data_directory_is_refused_naming_the_file_and_works_once_writable() {
    let work = tempfile::tempdir().unwrap();
    let first = sample_bundle(work.path(), "eu-west-1", 1);
    let second = sample_bundle(work.path(), "eu-west-1", 2);
    let agent_disk = SmallDisk::mount(&work.path().join("agent"), 16);
    let agent = agent_disk.dir.clone();
    init_agent(&agent, "eu-west-1", &work.path().join("keys/root.json"));
    ok(&["agent", "import", s(&first), "--data-dir", s(&agent)]);
    let control_disk = SmallDisk::mount(&work.path().join("control"), 32);
    let control = ControlProcess::start_on_sqlite(&control_disk.dir, "127.0.0.1:0", &[]);
    // Stopped (a SIGTERM before its handler is set ends it at once: fine here).
    control.terminate();

    agent_disk.read_only(true);
    control_disk.read_only(true);
    let http = ["--http", "127.0.0.1:0"];
    for args in [
        vec!["agent", "import", s(&second), "--data-dir", s(&agent)],
        vec!["agent", "list", "--data-dir", s(&agent)],
        [&["agent", "serve", "--data-dir", s(&agent)][..], &http[..]].concat(),
    ] {
        let err = support::fails(&args, 1);
        assert!(
            err.contains("agent.db") && err.contains("Read-only file system"),
            "{args:?}: {err}"
        );
    }
    let serve = ["control", "serve", "--data-dir", s(&control_disk.dir), "--admin", "127.0.0.1:0"];
    let out = support::falaj(&[&serve[..], &["--quic", "127.0.0.1:0"]].concat());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(s(&control_disk.dir)) && err.contains("Read-only file system"), "{err}");

    // Writable again: what was there is intact and everything runs.
    agent_disk.read_only(false);
    control_disk.read_only(false);
    let list = ok(&["agent", "list", "--data-dir", s(&agent)]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("sensor-fault") && l.contains(" 1 ") && l.contains("yes")),
        "{list}"
    );
    ok(&["agent", "import", s(&second), "--data-dir", s(&agent)]);
    let list = ok(&["agent", "list", "--data-dir", s(&agent)]);
    assert!(list.lines().any(|l| l.starts_with("sensor-fault") && l.contains(" 2 ")), "{list}");
    let control = ControlProcess::start_on_sqlite(&control_disk.dir, "127.0.0.1:0", &[]);
    // Stopped (a SIGTERM before its handler is set ends it at once: fine here).
    control.terminate();
}
