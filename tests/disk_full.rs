//! A disk that fills during an import (issue 17): the agent's `import` runs with a limit
//! on the size of any file it writes (`ulimit -f`, SIGXFSZ ignored, so a write past it
//! fails as it would on a full disk), with a bundle larger than the limit. The import
//! fails with an error naming what it was writing; the store keeps the version it had,
//! active and loadable, with nothing left behind; once space returns the import runs.

mod fleet;
mod support;

use std::process::Command;

use support::{FALAJ, init_agent, ok, s, sample_bundle};

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
