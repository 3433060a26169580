//! The fleet tests (`tests/it`) once more with every in-process control plane on
//! PostgreSQL (issue 21: both backends pass the same tests): the `it` binary of this build,
//! which `cargo test` builds before it runs any test, run with `FALAJ_TEST_POSTGRES`
//! naming a cluster made here, so that `tests/fleet`'s `config` gives each data directory
//! a database of its own on it.
//!
//! Needs PostgreSQL's server programs: without them the test is reported as ignored, and
//! with `FALAJ_REQUIRE_POSTGRES` set it fails.

use std::path::PathBuf;
use std::process::Command;

use crate::harness;
use crate::postgres;

/// The root package's `it-HASH` test binary beside this one (`target/*/deps`): the newest
/// of those whose tests include the fleet's processes (every crate's integration tests
/// are an `it` binary).
fn fleet_tests() -> Option<PathBuf> {
    let here = std::env::current_exe().ok()?;
    let deps = here.parent()?;
    let mut candidates: Vec<_> = std::fs::read_dir(deps)
        .ok()?
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("it-").is_some_and(|hash| hash.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    candidates.sort();
    candidates.into_iter().rev().map(|(_, path)| path).find(|path| {
        Command::new(path).args(["--list", "fleet_processes::"]).output().is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("fleet_processes::")
        })
    })
}

pub fn the_fleet_tests_pass_with_the_control_plane_on_postgresql() {
    let bin = match postgres::binaries() {
        Ok(bin) => bin,
        Err(why) => return harness::skip("FALAJ_REQUIRE_POSTGRES", &why),
    };
    let Some(it) = fleet_tests() else {
        return harness::skip(
            "FALAJ_REQUIRE_POSTGRES",
            "the fleet tests' binary (it-HASH) is not built beside this one",
        );
    };
    let cluster = postgres::Cluster::start(&bin).expect("the cluster starts");
    let status = Command::new(&it)
        .env("FALAJ_TEST_POSTGRES", cluster.server_url())
        .status()
        .expect("the fleet tests start");
    assert!(status.success(), "{} on PostgreSQL: {status}", it.display());
}
