//! A control plane's start (`ControlPlane::start`) on either database, where what it
//! checks lies in the database: a replica whose PII key files are not the region's (one
//! missing, or another key under the right name) does not start, naming the file, and
//! changes nothing; the files that made the record (one SQLite control plane restarted, or
//! a second replica with a copy of the keys directory) start as before.

use std::path::Path;

use falaj_control::daemon::{ControlPlane, ServeConfig, ServeError};
use falaj_control::db::Db;
use falaj_control::features::pii_keys;
use falaj_control::features::{OpenError, store};
use falaj_control::sql::{PgOptions, params};

use crate::REGION;
use crate::postgres::Cluster;

/// Starts a control plane on `data`, with PostgreSQL at `url` or SQLite in `data`, and
/// stops it before it serves: the start, or its refusal, is what is checked.
fn start(data: &Path, url: Option<&str>) -> Result<(), ServeError> {
    let mut config = ServeConfig::new(data);
    config.quic = "127.0.0.1:0".parse().unwrap();
    config.admin = "127.0.0.1:0".parse().unwrap();
    config.region = Some(REGION.into());
    config.database = url.map(PgOptions::new);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async move { ControlPlane::start(config).await.map(drop) })
}

/// Copies directory `from` (a keys directory) to `to`.
pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// The PII key versions recorded, with their fingerprints.
fn recorded(db: &Db) -> Vec<(i64, Option<String>)> {
    db.run_sync(|sql| {
        sql.query_map(
            "SELECT version, fingerprint FROM pii_keys ORDER BY version",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    })
    .unwrap()
}

/// `cluster`: the replicas share one of its databases; `None`: SQLite, one control plane
/// whose files are changed between two of its starts.
pub(crate) fn a_control_plane_on_other_pii_key_files_does_not_start(cluster: Option<&Cluster>) {
    let dir = tempfile::tempdir().unwrap();
    let url = cluster.map(|c| c.database(""));
    let first = dir.path().join("first");
    start(&first, url.as_deref()).unwrap();
    let db = match &url {
        Some(url) => Db::open_postgres(&PgOptions::new(url)).unwrap(),
        None => Db::open_with(&first.join(store::FEATURES_DB_FILE), store::MIGRATIONS).unwrap(),
    };
    let made = recorded(&db);
    assert_eq!(made.len(), 1, "{made:?}");
    assert!(made[0].1.is_some(), "{made:?}");
    // The keys that made the record start again: the first control plane restarted, and
    // on PostgreSQL a second replica given a copy of the keys directory.
    let other = match url {
        Some(_) => dir.path().join("second"),
        None => first.clone(),
    };
    if other != first {
        copy_dir(&first.join("keys"), &other.join("keys"));
    }
    start(&other, url.as_deref()).unwrap();
    // Another key under the right name: refused, naming the file.
    let file = other.join("keys").join(pii_keys::file_name(REGION, 1));
    std::fs::write(&file, hex::encode([5u8; 32])).unwrap();
    let err = start(&other, url.as_deref()).unwrap_err();
    assert!(
        matches!(&err, ServeError::Features(OpenError::KeyMismatch { path, version: 1, .. })
            if *path == file),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains(&*file.to_string_lossy()) && text.contains("is not the region's"),
        "{text}"
    );
    // No file at all: refused, naming it, and none is made in its place.
    std::fs::remove_file(&file).unwrap();
    let err = start(&other, url.as_deref()).unwrap_err();
    assert!(
        matches!(&err, ServeError::Features(OpenError::KeyMissing { path, version: 1 })
            if *path == file),
        "{err:?}"
    );
    assert!(!file.exists());
    // Neither refusal changed what the region recorded.
    assert_eq!(recorded(&db), made);
}
