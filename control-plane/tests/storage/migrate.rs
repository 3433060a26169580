//! `falaj-control migrate --from-sqlite DIR --to URL` (`falaj_control::sql::copy`): a SQLite
//! control plane filled through the real module functions is copied into an empty
//! PostgreSQL database and reads the same there; a second copy, and a value PostgreSQL
//! cannot hold, are refused with the target left as it was.

use std::path::Path;
use std::process::Command;

use falaj_common::features::FeatureView;
use falaj_control::features::{ingest, store};

use falaj_control::audit;
use falaj_control::db::{self, Db};
use falaj_control::monitoring;
use falaj_control::sql::copy::{CopyError, copy_databases};
use falaj_control::sql::{PgOptions, Sql, SqlError, params};

use crate::postgres::Cluster;
use crate::{at, bundle, count, enrolled, held, issued, profile, window};

/// Tables every filled control plane has rows in, after [`fill`].
const FILLED: &[&str] = &[
    "tokens",
    "agents",
    "certificates",
    "bundles",
    "deployments",
    "desired",
    "events",
    "windows",
    "audit",
];

/// Agents, bundles, deployments, a desired document, metric windows, settings and the
/// audit entries and events these record.
fn fill(sql: Sql<'_>) -> Result<(), SqlError> {
    enrolled(sql, "t1", "a")?;
    enrolled(sql, "t2", "b")?;
    for b in [bundle("fraud", 1), bundle("fraud", 2), bundle("churn", 7)] {
        db::insert_bundle(&sql, &b)?;
    }
    db::deploy(&sql, "edge", "fraud", 2, at(10))?;
    db::deploy(&sql, "edge", "churn", 7, at(11))?;
    db::put_desired(&sql, "a", &issued(3))?;
    db::set_setting(&sql, "region", "eu-west-1")?;
    monitoring::set_reference(&sql, "fraud", 2, &profile())?;
    let held = held(&[("fraud", 2), ("churn", 7)]);
    let batch: Vec<_> = (1..=300).map(|s| window(s, "fraud", 2, at(1000 + 60 * s), s)).collect();
    monitoring::insert_windows(&sql, "a", &held, &batch, at(40_000))?;
    Ok(())
}

/// A SQLite control plane filled by [`fill`], in `dir`.
fn filled_sqlite(dir: &Path) -> Db {
    let db = Db::open(&dir.join(db::DB_FILE)).unwrap();
    db.run_sync(fill).unwrap();
    db
}

/// Rows of every table [`FILLED`] names.
fn counts(db: &Db) -> Vec<i64> {
    FILLED.iter().map(|t| count(db, t)).collect()
}

pub(crate) fn a_sqlite_control_plane_copies_into_postgres(cluster: &Cluster) {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = filled_sqlite(dir.path());
    let pg = Db::open_postgres(&PgOptions::new(cluster.database(""))).unwrap();

    let copied = copy_databases(&[(&sqlite, None)], &pg).unwrap();
    let source_counts = counts(&sqlite);
    assert!(source_counts.iter().all(|&n| n > 0), "{source_counts:?}");
    assert_eq!(counts(&pg), source_counts);
    for t in FILLED {
        let reported = copied.iter().find(|c| c.table == *t).unwrap();
        assert_eq!(reported.rows as i64, count(&sqlite, t), "{t}");
    }
    // Agents before the certificates that name them, bundles before deployments.
    let position = |t: &str| copied.iter().position(|c| c.table == t).unwrap();
    assert!(position("agents") < position("certificates"));
    assert!(position("bundles") < position("deployments"));

    // The ported functions read the same on both.
    let read = |db: &Db| {
        db.run_sync(|sql| {
            Ok((
                db::bundles(&sql)?,
                db::all_deployments(&sql)?,
                db::desired(&sql, "a")?.map(|d| (d.version, d.signed)),
                db::setting(&sql, "region")?,
                monitoring::stored(&sql)?,
                audit::head(&sql)?,
            ))
        })
        .unwrap()
    };
    let (before, after) = (read(&sqlite), read(&pg));
    assert_eq!(before.0, after.0);
    assert_eq!(before.1, after.1);
    assert_eq!(before.2, after.2);
    assert_eq!(before.3, after.3);
    assert_eq!(before.4, after.4);
    assert_eq!((before.5.seq, before.5.head), (after.5.seq, after.5.head));

    // New rows on PostgreSQL continue after the copied ones: the audit chain from its
    // copied head, the events' identity column past the highest copied id.
    let events = count(&pg, "events");
    pg.run_sync(|sql| db::deploy(&sql, "core", "fraud", 1, at(20))).unwrap();
    assert_eq!(count(&pg, "events"), events + 1);
    let head = pg.run_sync(|sql| audit::head(&sql)).unwrap();
    assert_eq!(head.seq, after.5.seq + 1);

    // A second copy into the same database is refused, and changes nothing there.
    let before = counts(&pg);
    let err = copy_databases(&[(&sqlite, None)], &pg).unwrap_err();
    assert!(matches!(err, CopyError::NotEmpty { .. }), "{err}");
    assert!(err.to_string().contains("migrate into an empty database"), "{err}");
    assert_eq!(counts(&pg), before);
}

pub(crate) fn a_value_postgres_cannot_hold_refuses_the_whole_copy(cluster: &Cluster) {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = filled_sqlite(dir.path());
    // A hostname that is not UTF-8 (SQLite's TEXT does not check), as a damaged or
    // hand-edited database may hold.
    sqlite
        .run_sync(|sql| {
            sql.execute(
                "UPDATE agents SET hostname = CAST(x'ff00fe' AS TEXT) WHERE id = 'b'",
                params![],
            )
        })
        .unwrap();
    let pg = Db::open_postgres(&PgOptions::new(cluster.database(""))).unwrap();
    let err = copy_databases(&[(&sqlite, None)], &pg).unwrap_err();
    let CopyError::Value { table, column, .. } = &err else { panic!("{err}") };
    assert_eq!((table.as_str(), column.as_str()), ("agents", "hostname"));
    assert!(err.to_string().contains("UTF-8"), "{err}");
    // Nothing was committed, not even the tables copied before agents.
    assert!(counts(&pg).iter().all(|&n| n == 0), "{:?}", counts(&pg));
    assert_eq!(count(&pg, "settings"), 0);
}

/// A feature view of one entity and one number, named `name`.
fn view(name: &str, kind: &str) -> FeatureView {
    FeatureView::from_toml(&format!(
        "name = {name:?}\ntimestamp = \"t\"\nentity = {{ name = \"pump\", type = \"string\" }}\n\n\
         [[features]]\nname = \"temperature\"\ntype = {kind:?}\ndescription = \"C\"\nowner = \"ops\"\n"
    ))
    .unwrap()
}

/// `features.db` in `dir` with two views, one named past PostgreSQL's 63-byte table names
/// and in two versions, and rows in each.
fn fill_features(dir: &Path) -> Db {
    let db = Db::open_with(&dir.join(store::FEATURES_DB_FILE), store::MIGRATIONS).unwrap();
    let long = format!("a{}", "-b".repeat(31) + "c");
    let rows = dir.join("rows.csv");
    std::fs::write(
        &rows,
        "pump,t,temperature\np1,2026-01-01T00:00:00Z,1.5\np2,2026-01-01T00:01:00Z,2.5\n",
    )
    .unwrap();
    for (name, kind) in [("pumps", "f64"), (long.as_str(), "f32"), (long.as_str(), "f64")] {
        db.run_sync(|sql| store::apply(&sql, &view(name, kind), at(0))).unwrap();
        db.run_sync(|sql| Ok(ingest::ingest(&sql, name, &rows, "rows.csv", at(1))))
            .unwrap()
            .unwrap();
    }
    db
}

/// Each view's current version and its (rows, entities), as `db` holds them.
fn feature_counts(db: &Db) -> Vec<(String, u64, (u64, u64))> {
    db.run_sync(|sql| {
        let mut out = Vec::new();
        for stored in store::list(&sql)? {
            let counts = store::counts(&sql, &stored)?;
            out.push((stored.view.name.clone(), stored.version, counts));
        }
        Ok(out)
    })
    .unwrap()
}

pub(crate) fn the_migrate_command_copies_and_then_refuses(cluster: &Cluster) {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = filled_sqlite(dir.path());
    let rows: i64 = counts(&sqlite).iter().sum::<i64>() + count(&sqlite, "settings");
    drop(sqlite);
    let features = feature_counts(&fill_features(dir.path()));
    assert_eq!(features.len(), 2, "{features:?}");
    let url = cluster.database("");
    let migrate = || {
        Command::new(env!("CARGO_BIN_EXE_falaj-control"))
            .args(["migrate", "--from-sqlite"])
            .arg(dir.path())
            .args(["--to", &url])
            .output()
            .unwrap()
    };
    let first = migrate();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{stdout}{}", String::from_utf8_lossy(&first.stderr));
    assert!(stdout.lines().any(|l| l.starts_with("windows") && l.contains(" 300 ")), "{stdout}");
    let total: i64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("copied ")?.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no total in {stdout}"));
    assert!(total >= rows, "{total} < {rows}: {stdout}");
    assert!(stdout.contains("every table's count and digest match"), "{stdout}");
    // The feature store came along: its views, versions and rows read the same there.
    let pg = Db::open_postgres(&PgOptions::new(url.clone())).unwrap();
    assert_eq!(feature_counts(&pg), features);

    let second = migrate();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("already holds data"), "{stderr}");
    // The URL is shown without its user and parameters.
    assert!(stdout.contains("into postgres://127.0.0.1:"), "{stdout}");
    assert!(!stdout.contains("postgres@") && !stdout.contains("sslmode"), "{stdout}");
}
