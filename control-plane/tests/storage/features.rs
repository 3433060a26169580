//! The features module's storage on both databases (cases listed in [`CASES`], run by
//! `main` as `features::NAME::sqlite` and `features::NAME::postgres`, so that `-- features`
//! picks them): views and their versions, ingest (all or nothing, every type stored
//! exactly, the last row of a key and time kept), point-in-time snapshots and exports,
//! snapshot records, PII key versions, the feature schema; and the races SQLite's single
//! writer hid: two ingests into one view at once, a snapshot built while rows arrive,
//! snapshots made by two replicas at once, PII keys made and rotated by several at once,
//! and PII key files other than the region's (missing, different, or not yet copied after
//! another replica's rotation) refused.
//!
//! On SQLite the offline store is its own file (`features.db`, made here beside the test's
//! `control.db`); on PostgreSQL its tables go into the test's database, as
//! `FeatureStore::open_postgres` puts them into the control plane's.

// Stored values must come back exactly.
#![allow(clippy::float_cmp)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use falaj_common::features::value::parse_time;
use falaj_common::features::{FeatureView, Keyring, OnlineTable, Value};
use falaj_common::time::Timestamp;
use falaj_control::db::{self, Db};
use falaj_control::features::export;
use falaj_control::features::ingest::{self, IngestError};
use falaj_control::features::pii_keys::{self, PiiKeys};
use falaj_control::features::snapshot::{self, SnapshotOptions};
use falaj_control::features::store::{self, MigrateError};
use falaj_control::features::{FeatureStore, OpenError, batch};
use falaj_control::sql::{Backend, params};
use falaj_control::vault::Vault;
use falaj_tables::Format;

use crate::{Body, REGION, at, bundle};

/// A view keyed by integers (a column of BIGINT on PostgreSQL), one feature.
const METERS: &str = r#"
name = "meters"
timestamp = "event_time"
entity = { name = "meter", type = "i64" }

[[features]]
name = "kwh"
type = "f64"
description = "Energy"
owner = "ops"
"#;

/// This module's cases: each body runs once on SQLite and once on PostgreSQL.
pub(crate) const CASES: &[(&str, Body)] = &[
    (
        "features::feature_views_version_on_breaking_changes_and_list_by_name",
        feature_views_version_on_breaking_changes_and_list_by_name,
    ),
    (
        "features::an_ingest_stores_every_type_exactly_or_nothing_at_all",
        an_ingest_stores_every_type_exactly_or_nothing_at_all,
    ),
    (
        "features::snapshots_and_exports_never_see_values_from_after_their_time",
        snapshots_and_exports_never_see_values_from_after_their_time,
    ),
    (
        "features::a_snapshot_of_more_rows_than_a_page_holds_each_entity_once",
        a_snapshot_of_more_rows_than_a_page_holds_each_entity_once,
    ),
    (
        "features::an_export_of_more_labels_than_a_batch_answers_each_in_the_files_order",
        an_export_of_more_labels_than_a_batch_answers_each_in_the_files_order,
    ),
    (
        "features::an_ingest_keeps_the_last_row_of_a_key_and_time_within_a_batch_and_across",
        an_ingest_keeps_the_last_row_of_a_key_and_time_within_a_batch_and_across,
    ),
    (
        "features::two_ingests_into_one_view_at_once_both_land_one_after_the_other",
        two_ingests_into_one_view_at_once_both_land_one_after_the_other,
    ),
    (
        "features::a_snapshot_built_while_rows_arrive_sees_whole_ingests",
        a_snapshot_built_while_rows_arrive_sees_whole_ingests,
    ),
    (
        "features::snapshots_made_at_once_by_two_replicas_take_distinct_consecutive_versions",
        snapshots_made_at_once_by_two_replicas_take_distinct_consecutive_versions,
    ),
    (
        "features::pii_keys_made_and_rotated_at_once_take_one_version_each",
        pii_keys_made_and_rotated_at_once_take_one_version_each,
    ),
    (
        "features::pii_key_files_other_than_the_regions_are_refused",
        pii_key_files_other_than_the_regions_are_refused,
    ),
    (
        "features::a_replica_takes_another_ones_pii_key_rotation_only_with_its_file",
        a_replica_takes_another_ones_pii_key_rotation_only_with_its_file,
    ),
    (
        "features::the_feature_schema_is_the_same_on_both_and_migrates_once",
        the_feature_schema_is_the_same_on_both_and_migrates_once,
    ),
];

const VIEW: &str = r#"
name = "pumps"
timestamp = "event_time"
entity = { name = "pump_id", type = "string" }

[[features]]
name = "temperature"
type = "f32"
description = "Bearing temperature, degrees C"
owner = "reliability"

[[features]]
name = "pressure"
type = "f64"
nullable = true
description = "Outlet pressure"
owner = "reliability"

[[features]]
name = "starts"
type = "i64"
nullable = true
description = "Starts since installed"
owner = "ops"

[[features]]
name = "running"
type = "bool"
nullable = true
description = "Running"
owner = "ops"

[[features]]
name = "mode"
type = "category"
values = ["auto", "manual"]
description = "Control mode"
owner = "ops"

[[features]]
name = "operator"
type = "string"
nullable = true
description = "Operator on shift"
owner = "ops"
"#;

const HEADER: &str = "pump_id,event_time,temperature,pressure,starts,running,mode,operator";

/// The offline store of a test: `features.db` beside the test's files on SQLite, the
/// test's own database on PostgreSQL; and a directory for files (and PII keys).
struct Features {
    db: Db,
    dir: tempfile::TempDir,
}

impl Features {
    fn new(control: &Db) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = match control.backend() {
            Backend::Sqlite => {
                Db::open_with(&dir.path().join(store::FEATURES_DB_FILE), store::MIGRATIONS).unwrap()
            }
            Backend::Postgres => {
                store::migrate_postgres(control).unwrap();
                control.clone()
            }
        };
        Self { db, dir }
    }

    /// `Self::new` with the view `pumps` applied.
    fn with_pumps(control: &Db) -> Self {
        let f = Self::new(control);
        f.apply(VIEW);
        f
    }

    fn apply(&self, toml: &str) -> store::Applied {
        let view = FeatureView::from_toml(toml).unwrap();
        self.db.run_sync(|sql| store::apply(&sql, &view, at(0))).unwrap()
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn ingest(&self, view: &str, path: &Path) -> Result<ingest::Ingested, IngestError> {
        self.db.run_sync(|sql| Ok(ingest::ingest(&sql, view, path, "file.csv", at(1)))).unwrap()
    }

    fn current(&self, view: &str) -> store::StoredView {
        self.db.run_sync(|sql| store::current(&sql, view)).unwrap().unwrap()
    }

    fn counts(&self, view: &str) -> (u64, u64) {
        let stored = self.current(view);
        self.db.run_sync(|sql| store::counts(&sql, &stored)).unwrap()
    }

    fn snapshot(&self, view: &str, options: &SnapshotOptions) -> OnlineTable {
        let keyring = Keyring::new(1, &[7; 32]);
        let (spec, bytes) = self
            .db
            .run_sync(|sql| {
                Ok(snapshot::build(
                    &sql,
                    view,
                    options,
                    &keyring,
                    micros("2030-01-01T00:00:00Z"),
                    Vec::new(),
                ))
            })
            .unwrap()
            .unwrap();
        OnlineTable::load(spec, &bytes).unwrap()
    }
}

fn micros(t: &str) -> i64 {
    parse_time(t).unwrap()
}

fn feature_views_version_on_breaking_changes_and_list_by_name(db: &Db) {
    let f = Features::new(db);
    let created = f.apply(VIEW);
    assert_eq!((created.outcome.as_str(), created.stored.version), ("created", 1));
    assert_eq!(f.apply(VIEW).outcome, "unchanged");
    f.ingest("pumps", &f.file("a.csv", &format!("{HEADER}\np1,2026-01-01T00:00:00Z,1,,,,auto,\n")))
        .unwrap();
    let added = format!(
        "{VIEW}\n[[features]]\nname = \"vibration\"\ntype = \"f64\"\nnullable = true\ndescription = \"mm/s\"\nowner = \"ops\"\n"
    );
    let compatible = f.apply(&added);
    assert_eq!(
        (compatible.outcome.as_str(), compatible.stored.version, compatible.stored.revision),
        ("compatible", 1, 2)
    );
    assert_eq!(f.counts("pumps"), (1, 1), "a compatible change keeps the rows");
    // The new column takes rows at once.
    let with_vibration = format!("{HEADER},vibration\np2,2026-01-01T00:00:00Z,2,,,,manual,,0.25\n");
    f.ingest("pumps", &f.file("b.csv", &with_vibration)).unwrap();
    let retyped = added.replace("type = \"f32\"", "type = \"f64\"");
    let breaking = f.apply(&retyped);
    assert_eq!(
        (breaking.outcome.as_str(), breaking.stored.version, breaking.stored.revision),
        ("breaking", 2, 1)
    );
    assert_eq!(breaking.stored.changes, ["feature temperature: type f32 became f64"]);
    assert_eq!(f.counts("pumps"), (0, 0), "version 2 starts empty");
    let v1 = f.db.run_sync(|sql| store::at_version(&sql, "pumps", 1)).unwrap().unwrap();
    assert_eq!((v1.revision, f.db.run_sync(|sql| store::counts(&sql, &v1)).unwrap()), (2, (2, 2)));
    let history = f.db.run_sync(|sql| store::history(&sql, "pumps")).unwrap();
    let versions: Vec<_> = history.iter().map(|h| (h.version, h.revision)).collect();
    assert_eq!(versions, [(1, 1), (1, 2), (2, 1)]);
    assert_eq!(history[0].applied_at, at(0));

    // A name of 64 bytes: its tables stay apart across versions (PostgreSQL cuts names
    // past 63 bytes, so the store names such tables itself).
    let long = format!("a{}", "-b".repeat(31) + "c");
    assert_eq!(long.len(), 64);
    let long_view = VIEW.replace("\"pumps\"", &format!("{long:?}"));
    f.apply(&long_view);
    let one = format!("{HEADER}\np1,2026-01-01T00:00:00Z,1,,,,auto,\n");
    f.ingest(&long, &f.file("l.csv", &one)).unwrap();
    let long_v2 = f.apply(&long_view.replace("type = \"f32\"", "type = \"f64\""));
    assert_eq!(long_v2.stored.version, 2);
    assert_eq!(f.counts(&long), (0, 0));
    f.ingest(&long, &f.file("l2.csv", &one.replace(",1,", ",2,"))).unwrap();
    f.ingest(&long, &f.file("l3.csv", &one.replace("p1", "p2"))).unwrap();
    assert_eq!(f.counts(&long), (2, 2));
    let long_v1 = f.db.run_sync(|sql| store::at_version(&sql, &long, 1)).unwrap().unwrap();
    assert_eq!(f.db.run_sync(|sql| store::counts(&sql, &long_v1)).unwrap(), (1, 1));

    // Listed by name, byte by byte ('-' < '.' < '0' < 'a' < 'p'), whatever the locale.
    for name in ["z.1", "z-1", "z0"] {
        f.apply(&VIEW.replace("\"pumps\"", &format!("{name:?}")));
    }
    let names: Vec<_> =
        f.db.run_sync(|sql| store::list(&sql))
            .unwrap()
            .into_iter()
            .map(|s| (s.view.name, s.version, s.revision))
            .collect();
    assert_eq!(
        names,
        [
            (long.clone(), 2, 1),
            ("pumps".to_owned(), 2, 1),
            ("z-1".to_owned(), 1, 1),
            ("z.1".to_owned(), 1, 1),
            ("z0".to_owned(), 1, 1),
        ]
    );
}

fn an_ingest_stores_every_type_exactly_or_nothing_at_all(db: &Db) {
    let f = Features::with_pumps(db);
    let text = format!(
        "{HEADER}
p1,2026-01-01T00:00:00Z,49.5,3.141592653589793,9007199254740993,true,auto,ann
p1,2026-01-03T00:00:00.123456Z,-0.1,-2.5e-300,-9223372036854775808,false,manual,
p2,2026-01-02T00:00:00Z,1e30,,,,auto,\u{e9}l\u{e8}ve \u{1f600}
"
    );
    let first = f.ingest("pumps", &f.file("a.csv", &text)).unwrap();
    assert_eq!((first.rows, first.version), (3, 1));
    assert_eq!(f.counts("pumps"), (3, 2));
    let table = f.snapshot("pumps", &SnapshotOptions::default());
    let p1 = table.get("p1").unwrap().unwrap();
    assert_eq!(p1.time, Some(micros("2026-01-03T00:00:00.123456Z")));
    assert_eq!(
        p1.values,
        [
            Value::F32(-0.1),
            Value::F64(-2.5e-300),
            Value::I64(i64::MIN),
            Value::Bool(false),
            Value::Str("manual".into()),
            Value::Null,
        ]
    );
    let p2 = table.get("p2").unwrap().unwrap();
    assert_eq!(
        p2.values,
        [
            Value::F32(1e30),
            Value::Null,
            Value::Null,
            Value::Null,
            Value::Str("auto".into()),
            Value::Str("\u{e9}l\u{e8}ve \u{1f600}".into()),
        ]
    );
    // Jan 1's row, as of Jan 2: every type of the first row.
    let then =
        SnapshotOptions { as_of: Some(micros("2026-01-02T00:00:00Z")), ..Default::default() };
    let p1 = f.snapshot("pumps", &then).get("p1").unwrap().unwrap();
    assert_eq!(
        p1.values,
        [
            Value::F32(49.5),
            Value::F64(std::f64::consts::PI),
            Value::I64(9_007_199_254_740_993),
            Value::Bool(true),
            Value::Str("auto".into()),
            Value::Str("ann".into()),
        ]
    );

    // A row for an (entity, time) already stored replaces it, by the later ingest.
    let again = f
        .ingest(
            "pumps",
            &f.file("b.csv", &format!("{HEADER}\np2,2026-01-02T00:00:00Z,7,,,,manual,\n")),
        )
        .unwrap();
    assert!(again.id > first.id, "{} then {}", first.id, again.id);
    assert_eq!(f.counts("pumps"), (3, 2));
    let p2 = f.snapshot("pumps", &SnapshotOptions::default()).get("p2").unwrap().unwrap();
    assert_eq!((p2.values[0].clone(), p2.values[5].clone()), (Value::F32(7.0), Value::Null));

    // One bad row at the end: nothing of the file is kept, and no ingest is recorded.
    let mut bad = format!("{HEADER}\n");
    for i in 0..500 {
        let _ = writeln!(bad, "q{i},2026-02-01T00:00:00Z,{i}.5,,,,auto,");
    }
    bad += "q500,2026-02-01T00:00:00Z,hot,,,,auto,\n";
    let err = f.ingest("pumps", &f.file("bad.csv", &bad)).unwrap_err();
    let IngestError::Rows { report, .. } = &err else { panic!("{err}") };
    assert_eq!((report.rows, report.bad_rows), (501, 1));
    assert_eq!(f.counts("pumps"), (3, 2), "the refused file left rows behind");
    let err = f.ingest("pumps", &f.file("h.csv", "pump_id,event_time\np1,2026-01-01T00:00:00Z\n"));
    assert!(matches!(err, Err(IngestError::Header { .. })), "{err:?}");
    let err = f.ingest("nope", &f.file("n.csv", &text)).unwrap_err();
    assert!(matches!(err, IngestError::UnknownView(_)), "{err}");
    let ingests: Vec<(i64, i64)> =
        f.db.run_sync(|sql| {
            sql.query_map("SELECT id, rows FROM ingests ORDER BY id", params![], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
        })
        .unwrap();
    assert_eq!(ingests, [(first.id, 3), (again.id, 1)]);
}

fn snapshots_and_exports_never_see_values_from_after_their_time(db: &Db) {
    let f = Features::with_pumps(db);
    let history = format!(
        "{HEADER}
p1,2026-01-01T00:00:00Z,50,,,,auto,ann
p1,2026-01-03T00:00:00Z,70,,,,manual,bob
p2,2026-01-02T00:00:00Z,40,,,,auto,
p3,2026-01-05T00:00:00Z,90,,,,auto,cyd
"
    );
    f.ingest("pumps", &f.file("h.csv", &history)).unwrap();
    let jan2 =
        SnapshotOptions { as_of: Some(micros("2026-01-02T00:00:00Z")), ..Default::default() };
    let table = f.snapshot("pumps", &jan2);
    assert_eq!(table.spec().entities, 2, "p3 has no row by then");
    assert_eq!(table.get("p1").unwrap().unwrap().values[0], Value::F32(50.0));
    assert_eq!(table.get("p2").unwrap().unwrap().time, Some(micros("2026-01-02T00:00:00Z")));
    let listed = SnapshotOptions {
        entities: Some(vec!["p3".into(), "p1".into(), "p9".into(), "p1".into()]),
        ..Default::default()
    };
    let table = f.snapshot("pumps", &listed);
    assert_eq!(table.spec().entities, 2);
    assert_eq!(table.get("p1").unwrap().unwrap().values[0], Value::F32(70.0));
    assert!(table.get("p2").unwrap().is_none());
    let filtered =
        SnapshotOptions { filter: Some("temperature > 60".into()), ..Default::default() };
    let table = f.snapshot("pumps", &filtered);
    assert_eq!(table.spec().entities, 2, "p1 (70) and p3 (90)");

    // Labels joined to the latest values at or before their own time, never after.
    let labels = f.file(
        "labels.csv",
        "pump_id,event_time,failed\np1,2026-01-02T00:00:00Z,0\np1,2026-01-04T00:00:00Z,1\np3,2026-01-01T00:00:00Z,0\np2,2026-01-02T00:00:00Z,1\n",
    );
    let out = f.dir.path().join("train.csv");
    let exported = f
        .db
        .run_sync(|sql| Ok(export::export(&sql, "pumps", &labels, "labels.csv", &out, Format::Csv)))
        .unwrap()
        .unwrap();
    assert_eq!((exported.rows, exported.matched, exported.version), (4, 3, 1));
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "pump_id,event_time,failed,feature_time,temperature,pressure,starts,running,mode,operator",
            "p1,2026-01-02T00:00:00Z,0,2026-01-01T00:00:00Z,50,,,,auto,ann",
            "p1,2026-01-04T00:00:00Z,1,2026-01-03T00:00:00Z,70,,,,manual,bob",
            "p3,2026-01-01T00:00:00Z,0,,,,,,,",
            "p2,2026-01-02T00:00:00Z,1,2026-01-02T00:00:00Z,40,,,,auto,",
        ]
    );

    // A snapshot's record, and its replacement when the same version is built again.
    let keyring = Keyring::new(1, &[7; 32]);
    let (spec, _) =
        f.db.run_sync(|sql| Ok(snapshot::build(&sql, "pumps", &jan2, &keyring, 0, Vec::new())))
            .unwrap()
            .unwrap();
    f.db.run_sync(|sql| snapshot::record(&sql, &spec, 1, at(5))).unwrap();
    f.db.run_sync(|sql| snapshot::record(&sql, &spec, 2, at(6))).unwrap();
    f.db.run_sync(|sql| snapshot::record(&sql, &spec, 2, at(7))).unwrap();
    let records: Vec<(i64, i64, i64, String)> = f
        .db
        .run_sync(|sql| {
            sql.query_map(
                "SELECT version, built_at, entities, scope FROM snapshots WHERE view = $1 ORDER BY version",
                params!["pumps"],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
        })
        .unwrap();
    let t = |n| at(n).unix() as i64;
    assert_eq!(records, [(1, t(5), 2, "all".into()), (2, t(7), 2, "all".into())]);
}

fn a_snapshot_of_more_rows_than_a_page_holds_each_entity_once(db: &Db) {
    // 3,400 entities of three rows each: 10,200 rows, past PostgreSQL's page of 10,000
    // rows, which ends inside entity 3,333's rows.
    const ENTITIES: usize = 3_400;
    let f = Features::with_pumps(db);
    let mut text = format!("{HEADER}\n");
    for i in 0..ENTITIES {
        for day in 1..=3 {
            let _ = writeln!(text, "p{i:04},2026-01-0{day}T00:00:00Z,{},,,,auto,", i * 10 + day);
        }
    }
    assert_eq!(f.ingest("pumps", &f.file("many.csv", &text)).unwrap().rows, 10_200);
    for (as_of, day) in [(None, 3), (Some(micros("2026-01-02T12:00:00Z")), 2)] {
        let table = f.snapshot("pumps", &SnapshotOptions { as_of, ..Default::default() });
        assert_eq!(table.spec().entities, ENTITIES as u64);
        for i in [0, 3_332, 3_333, 3_334, ENTITIES - 1] {
            let row = table.get(&format!("p{i:04}")).unwrap().unwrap();
            assert_eq!(row.values[0], Value::F32((i * 10 + day) as f32), "p{i:04}");
        }
    }
}

/// A file giving each of `entities` pumps the temperature `value` at `time`, in
/// ascending or descending order of entity.
fn an_export_of_more_labels_than_a_batch_answers_each_in_the_files_order(db: &Db) {
    // 1,000 pumps of three daily readings; 5,000 labels (past two of PostgreSQL's batches
    // of `export::LOOKUP_BATCH`, the last one short) over 1,200 pumps, so some have no
    // rows, at times before the first reading, between readings, on one and after the
    // last; then meters keyed by integers.
    const PUMPS: usize = 1_000;
    const LABELS: usize = 5_000;
    const _: () =
        assert!(LABELS > 2 * export::LOOKUP_BATCH && !LABELS.is_multiple_of(export::LOOKUP_BATCH));
    let f = Features::with_pumps(db);
    let mut text = format!("{HEADER}\n");
    for i in 0..PUMPS {
        for day in 1..=3 {
            let _ = writeln!(text, "p{i:04},2026-01-0{day}T00:00:00Z,{},,,,auto,", i * 10 + day);
        }
    }
    f.ingest("pumps", &f.file("pumps.csv", &text)).unwrap();
    let mut labels = String::from("pump_id,event_time,failed\n");
    let mut expected = vec![
        "pump_id,event_time,failed,feature_time,temperature,pressure,starts,running,mode,operator"
            .to_owned(),
    ];
    let mut matched = 0;
    for n in 0..LABELS {
        let pump = (n * 7) % 1_200;
        let (time, day) = match n % 4 {
            0 => ("2025-12-31T00:00:00Z", None),
            1 => ("2026-01-01T12:00:00Z", Some(1)),
            2 => ("2026-01-02T00:00:00Z", Some(2)),
            _ => ("2026-01-09T00:00:00Z", Some(3)),
        };
        let _ = writeln!(labels, "p{pump:04},{time},{}", n % 2);
        expected.push(match day.filter(|_| pump < PUMPS) {
            Some(day) => {
                matched += 1;
                format!(
                    "p{pump:04},{time},{},2026-01-0{day}T00:00:00Z,{},,,,auto,",
                    n % 2,
                    pump * 10 + day
                )
            }
            None => format!("p{pump:04},{time},{},,,,,,,", n % 2),
        });
    }
    let labels = f.file("labels.csv", &labels);
    let export = |view: &str, labels: &Path, name: &str| {
        let out = f.dir.path().join(name);
        let done = f
            .db
            .run_sync(|sql| Ok(export::export(&sql, view, labels, "labels.csv", &out, Format::Csv)))
            .unwrap()
            .unwrap();
        (done, std::fs::read_to_string(&out).unwrap())
    };
    let (done, text) = export("pumps", &labels, "train.csv");
    assert_eq!((done.rows, done.matched), (LABELS as u64, matched));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), expected.len());
    for (n, (line, expected)) in lines.iter().zip(&expected).enumerate() {
        assert_eq!(line, expected, "line {n}");
    }

    // Integer keys.
    f.apply(METERS);
    let meters = "meter,event_time,kwh\n7,2026-01-01T00:00:00Z,1.5\n-9,2026-01-01T00:00:00Z,2\n7,2026-01-03T00:00:00Z,3.25\n";
    f.ingest("meters", &f.file("meters.csv", meters)).unwrap();
    let labels = f.file(
        "meter-labels.csv",
        "meter,event_time,bill\n7,2026-01-02T00:00:00Z,10\n-9,2026-01-05T00:00:00Z,20\n8,2026-01-05T00:00:00Z,30\n7,2026-01-04T00:00:00Z,40\n",
    );
    let (done, text) = export("meters", &labels, "meters.csv");
    assert_eq!((done.rows, done.matched), (4, 3));
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "meter,event_time,bill,feature_time,kwh",
            "7,2026-01-02T00:00:00Z,10,2026-01-01T00:00:00Z,1.5",
            "-9,2026-01-05T00:00:00Z,20,2026-01-01T00:00:00Z,2",
            "8,2026-01-05T00:00:00Z,30,,",
            "7,2026-01-04T00:00:00Z,40,2026-01-03T00:00:00Z,3.25",
        ]
    );
}

fn pumps_file(entities: usize, time: &str, value: u32, descending: bool) -> String {
    let mut text = format!("{HEADER}\n");
    let mut ids: Vec<usize> = (0..entities).collect();
    if descending {
        ids.reverse();
    }
    for i in ids {
        let _ = writeln!(text, "p{i:04},{time},{value},,,,auto,");
    }
    text
}

fn an_ingest_keeps_the_last_row_of_a_key_and_time_within_a_batch_and_across(db: &Db) {
    // More rows than PostgreSQL's ingest writes in one statement, so that they go in
    // several; SQLite writes them one by one, with the same outcome.
    let n = batch::ROWS + 100;
    let f = Features::with_pumps(db);
    let time = "2026-01-01T00:00:00Z";
    let mut text = pumps_file(n, time, 1, false);
    // p0001 again at once, in the same batch; p0000 again in the last batch; p0002 at
    // another time, a row of its own.
    for (id, at, value) in [
        ("p0001", time, 2),
        ("p0001", time, 3),
        ("p0000", time, 4),
        ("p0002", "2026-01-02T00:00:00Z", 5),
    ] {
        let _ = writeln!(text, "{id},{at},{value},,,,manual,");
    }
    let ingested = f.ingest("pumps", &f.file("dupes.csv", &text)).unwrap();
    assert_eq!(ingested.rows, n as u64 + 4);
    assert_eq!(f.counts("pumps"), (n as u64 + 1, n as u64));
    let stored = |id: &str, at: &str| -> (f64, String) {
        f.db.run_sync(|sql| {
            sql.query_row(
                "SELECT temperature, mode FROM \"fv_pumps_1\" WHERE entity = $1 AND event_time = $2",
                params![id, micros(at)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .unwrap()
    };
    assert_eq!(stored("p0000", time), (4.0, "manual".into()));
    assert_eq!(stored("p0001", time), (3.0, "manual".into()));
    assert_eq!(stored("p0002", time), (1.0, "auto".into()));
    assert_eq!(stored("p0002", "2026-01-02T00:00:00Z"), (5.0, "manual".into()));
    assert_eq!(stored(&format!("p{:04}", n - 1), time), (1.0, "auto".into()));
    // Again, whole: every row replaced by the same values, written by the second ingest.
    let again = f.ingest("pumps", &f.file("dupes.csv", &text)).unwrap();
    assert_eq!(f.counts("pumps"), (n as u64 + 1, n as u64));
    let ingests: Vec<i64> =
        f.db.run_sync(|sql| {
            sql.query_map("SELECT DISTINCT ingest FROM \"fv_pumps_1\"", params![], |r| r.get(0))
        })
        .unwrap();
    assert_eq!(ingests, [again.id]);
    assert_eq!(stored("p0001", time), (3.0, "manual".into()));

    // A bad row after a batch was written: nothing of the file stays.
    let mut bad = pumps_file(n, "2026-02-01T00:00:00Z", 9, false);
    bad.push_str("p0000,2026-02-01T00:00:00Z,9,,,,sideways,\n");
    let err = f.ingest("pumps", &f.file("bad.csv", &bad)).unwrap_err();
    assert!(matches!(err, IngestError::Rows { .. }), "{err}");
    assert_eq!(f.counts("pumps"), (n as u64 + 1, n as u64));

    // Integer keys too (a column of BIGINT on PostgreSQL).
    f.apply(METERS);
    let meters = "meter,event_time,kwh\n7,2026-01-01T00:00:00Z,1.5\n-9,2026-01-01T00:00:00Z,2\n7,2026-01-01T00:00:00Z,3.25\n";
    assert_eq!(f.ingest("meters", &f.file("meters.csv", meters)).unwrap().rows, 3);
    let rows: Vec<(i64, f64)> =
        f.db.run_sync(|sql| {
            sql.query_map(
                "SELECT entity, kwh FROM \"fv_meters_1\" ORDER BY entity",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .unwrap();
    assert_eq!(rows, [(-9, 2.0), (7, 3.25)]);
}

fn two_ingests_into_one_view_at_once_both_land_one_after_the_other(db: &Db) {
    const N: usize = 300;
    let f = Features::with_pumps(db);
    // The same rows in opposite orders: written at once, row by row, each would wait on
    // the other's rows (a deadlock on PostgreSQL without the view's lock).
    let up = f.file("up.csv", &pumps_file(N, "2026-01-01T00:00:00Z", 1, false));
    let down = f.file("down.csv", &pumps_file(N, "2026-01-01T00:00:00Z", 2, true));
    for _ in 0..3 {
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| f.ingest("pumps", &up));
            let b = s.spawn(|| f.ingest("pumps", &down));
            (a.join().unwrap().unwrap(), b.join().unwrap().unwrap())
        });
        assert_eq!((a.rows, b.rows), (N as u64, N as u64));
        assert_eq!(f.counts("pumps"), (N as u64, N as u64));
        // Every row is the later ingest's, whole.
        let last = if a.id > b.id { 1 } else { 2 };
        let rows: Vec<(i64, f64)> =
            f.db.run_sync(|sql| {
                sql.query_map("SELECT ingest, temperature FROM \"fv_pumps_1\"", params![], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
            })
            .unwrap();
        assert!(
            rows.iter().all(|&(id, t)| id == a.id.max(b.id) && t == f64::from(last)),
            "ingests {} and {}: {:?}",
            a.id,
            b.id,
            &rows[..5]
        );
    }
}

fn a_snapshot_built_while_rows_arrive_sees_whole_ingests(db: &Db) {
    const N: usize = 200;
    const ROUNDS: u32 = 12;
    let f = Features::with_pumps(db);
    f.ingest("pumps", &f.file("0.csv", &pumps_file(N, "2026-01-01T00:00:00Z", 0, false))).unwrap();
    let files: Vec<PathBuf> = (1..=ROUNDS)
        .map(|round| {
            let time = format!("2026-01-01T00:{round:02}:00Z");
            f.file(&format!("{round}.csv"), &pumps_file(N, &time, round, round % 2 == 0))
        })
        .collect();
    let ids: Vec<String> = (0..N).map(|i| format!("p{i:04}")).collect();
    let done = AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for file in &files {
                f.ingest("pumps", file).unwrap();
            }
            done.store(true, Ordering::Release);
        });
        // Snapshots keep being built until the last ingest is in (one more after it).
        let mut seen = BTreeSet::new();
        loop {
            let last = done.load(Ordering::Acquire);
            for options in [
                SnapshotOptions { entities: Some(ids.clone()), ..Default::default() },
                SnapshotOptions::default(),
            ] {
                let table = f.snapshot("pumps", &options);
                let values: BTreeSet<String> = ids
                    .iter()
                    .map(|id| format!("{:?}", table.get(id).unwrap().unwrap().values[0]))
                    .collect();
                assert_eq!(values.len(), 1, "a snapshot saw part of an ingest: {values:?}");
                seen.extend(values);
            }
            if last {
                break;
            }
        }
        writer.join().unwrap();
        seen
    });
    assert!(seen.contains(&format!("{:?}", Value::F32(ROUNDS as f32))), "{seen:?}");
}

fn snapshots_made_at_once_by_two_replicas_take_distinct_consecutive_versions(db: &Db) {
    const EACH: u64 = 6;
    let f = Features::with_pumps(db);
    f.ingest("pumps", &f.file("rows.csv", &pumps_file(20, "2026-01-01T00:00:00Z", 1, false)))
        .unwrap();
    let (keyring, later) = (Keyring::new(1, &[7; 32]), micros("2030-01-01T00:00:00Z"));
    // A replica making snapshots as the admin API does: under the view's version lock,
    // the version from the bundles and records, the build, its record, its bundle. Each
    // replica's snapshots have a scope of their own, so a record tells whose it is.
    let replica = |entities: Option<Vec<String>>| {
        let options = SnapshotOptions { entities, ..Default::default() };
        let mut taken = Vec::new();
        for _ in 0..EACH {
            let lock = snapshot::VersionLock::acquire(&f.db, "pumps").unwrap();
            let bundles: Vec<u64> = db
                .run_sync(|sql| db::bundles(&sql))
                .unwrap()
                .into_iter()
                .filter(|b| b.name == "pumps")
                .map(|b| b.version)
                .collect();
            let recorded = f.db.run_sync(|sql| snapshot::recorded(&sql, "pumps")).unwrap();
            let version = snapshot::next_version("pumps", &bundles, &recorded).unwrap();
            let (spec, _) =
                f.db.run_sync(|sql| {
                    Ok(snapshot::build(&sql, "pumps", &options, &keyring, later, Vec::new()))
                })
                .unwrap()
                .unwrap();
            f.db.run_sync(|sql| snapshot::record(&sql, &spec, version, at(version))).unwrap();
            db.run_sync(|sql| db::insert_bundle(&sql, &bundle("pumps", version))).unwrap();
            lock.release();
            taken.push((version, spec.scope));
        }
        taken
    };
    let listed = Some(vec!["p0001".to_owned(), "p0002".to_owned()]);
    let mut taken = match db.backend() {
        // Two replicas at once, each on connections of its own.
        Backend::Postgres => {
            let barrier = std::sync::Barrier::new(2);
            let run = |entities: Option<Vec<String>>| {
                barrier.wait();
                replica(entities)
            };
            std::thread::scope(|s| {
                let (a, b) = (s.spawn(|| run(None)), s.spawn(|| run(listed.clone())));
                [a.join().unwrap(), b.join().unwrap()].concat()
            })
        }
        // One process owns a SQLite store, and `FeatureStore::building` makes its
        // snapshots one at a time: one after the other here.
        Backend::Sqlite => [replica(None), replica(listed.clone())].concat(),
    };
    taken.sort();
    let versions: Vec<u64> = taken.iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, (1..=2 * EACH).collect::<Vec<_>>(), "{taken:?}");
    // Each record is the snapshot of the replica that took its version.
    let records: Vec<(u64, String)> =
        f.db.run_sync(|sql| {
            sql.query_map(
                "SELECT version, scope FROM snapshots WHERE view = $1 ORDER BY version",
                params!["pumps"],
                |r| Ok((r.get::<i64>(0)? as u64, r.get(1)?)),
            )
        })
        .unwrap();
    assert_eq!(records, taken);
    // A bundle of the view's name that is not a snapshot of it is refused.
    let err = snapshot::next_version("pumps", &[1, 2, 3], &[1, 3]).unwrap_err();
    assert_eq!(err.version, 2, "{err}");
}

fn pii_keys_made_and_rotated_at_once_take_one_version_each(db: &Db) {
    let f = Features::new(db);
    let keys = f.dir.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let vault = Vault::open(&keys, None).unwrap();
    // Four replicas opening the store for the first time at once: one version 1.
    let current: Vec<u32> = std::thread::scope(|s| {
        let opens: Vec<_> = (0..4)
            .map(|_| s.spawn(|| PiiKeys::open(&f.db, &vault, REGION, at(0)).map(|k| k.current())))
            .collect();
        opens.into_iter().map(|o| o.join().unwrap().unwrap()).collect()
    });
    assert_eq!(current, [1, 1, 1, 1]);
    let secret = std::fs::read(keys.join(pii_keys::file_name(REGION, 1))).unwrap();
    // Four rotations at once: versions 2 to 5, one each, each with its own file.
    let overlap = Duration::from_secs(3600);
    let mut rotated: Vec<(u32, u32)> = std::thread::scope(|s| {
        let rotations: Vec<_> = (0..4)
            .map(|_| s.spawn(|| pii_keys::rotate(&f.db, &vault, REGION, overlap, at(10))))
            .collect();
        rotations
            .into_iter()
            .map(|r| {
                let (rotated, _) = r.join().unwrap().unwrap();
                assert!(rotated.file.is_file(), "{}", rotated.file.display());
                (rotated.previous, rotated.version)
            })
            .collect()
    });
    rotated.sort_unstable();
    assert_eq!(rotated, [(1, 2), (2, 3), (3, 4), (4, 5)]);
    let versions = f.db.run_sync(|sql| pii_keys::list(&sql)).unwrap();
    let listed: Vec<_> = versions.iter().map(|v| (v.version, v.overlap_until)).collect();
    let until = Some(at(10).saturating_add(overlap));
    assert_eq!(listed, [(5, None), (4, until), (3, until), (2, until), (1, until)]);
    assert_eq!(std::fs::read(keys.join(pii_keys::file_name(REGION, 1))).unwrap(), secret);
    let loaded = PiiKeys::open(&f.db, &vault, REGION, at(20)).unwrap();
    assert_eq!(loaded.current(), 5);
    // After the overlap only the current version is used.
    let later = PiiKeys::open(&f.db, &vault, REGION, at(10_000)).unwrap();
    assert_eq!(format!("{later:?}"), format!("PiiKeys({REGION}, versions [5])"));
}

/// A keys directory of its own (a replica's), in `f`'s directory.
fn replica_keys(f: &Features, name: &str) -> (PathBuf, Arc<Vault>) {
    let keys = f.dir.path().join(name);
    std::fs::create_dir(&keys).unwrap();
    let vault = Arc::new(Vault::open(&keys, None).unwrap());
    (keys, vault)
}

/// The PII key versions as recorded, with their fingerprints.
fn recorded_pii_keys(f: &Features) -> Vec<(i64, Option<i64>, Option<String>)> {
    f.db.run_sync(|sql| {
        sql.query_map(
            "SELECT version, overlap_until, fingerprint FROM pii_keys ORDER BY version",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
    })
    .unwrap()
}

fn pii_key_files_other_than_the_regions_are_refused(db: &Db) {
    let f = Features::new(db);
    let v1 = pii_keys::file_name(REGION, 1);
    // The first replica makes version 1 and records its fingerprint; opening it again (or
    // its one process on SQLite, restarted) is never in the way.
    let (a_dir, a) = replica_keys(&f, "a");
    let made = PiiKeys::open(&f.db, &a, REGION, at(0)).unwrap();
    assert!(made.is_current(&f.db, at(1)).unwrap());
    PiiKeys::open(&f.db, &a, REGION, at(1)).unwrap();
    let secret = hex::decode(std::fs::read_to_string(a_dir.join(&v1)).unwrap().trim()).unwrap();
    let record = recorded_pii_keys(&f);
    assert_eq!(record, [(1, None, Some(pii_keys::fingerprint(&secret)))]);
    // A replica given a copy of the region's files opens them.
    let (b_dir, b) = replica_keys(&f, "b");
    std::fs::copy(a_dir.join(&v1), b_dir.join(&v1)).unwrap();
    PiiKeys::open(&f.db, &b, REGION, at(2)).unwrap();
    // One without the file is refused, naming it, and makes none of its own.
    let (c_dir, c) = replica_keys(&f, "c");
    let err = PiiKeys::open(&f.db, &c, REGION, at(2)).unwrap_err();
    assert!(
        matches!(&err, OpenError::KeyMissing { path, version: 1 } if *path == c_dir.join(&v1)),
        "{err:?}"
    );
    assert!(err.to_string().contains(&*c_dir.join(&v1).to_string_lossy()), "{err}");
    assert!(!c_dir.join(&v1).exists());
    // One with another key in the file is refused, naming the file and the problem.
    std::fs::write(c_dir.join(&v1), hex::encode([9u8; 32])).unwrap();
    let err = PiiKeys::open(&f.db, &c, REGION, at(2)).unwrap_err();
    assert!(
        matches!(&err, OpenError::KeyMismatch { path, version: 1, .. } if *path == c_dir.join(&v1)),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains(&*c_dir.join(&v1).to_string_lossy()), "{text}");
    assert!(text.contains("is not the region's version 1"), "{text}");
    assert!(text.contains(&pii_keys::fingerprint(&[9u8; 32])), "{text}");
    // The refusals changed nothing.
    assert_eq!(recorded_pii_keys(&f), record);
    // A version recorded before fingerprints were takes the first file opened for it,
    // and from then on a different one is refused.
    f.db.run_sync(|sql| sql.execute("UPDATE pii_keys SET fingerprint = NULL", params![])).unwrap();
    PiiKeys::open(&f.db, &b, REGION, at(3)).unwrap();
    assert_eq!(recorded_pii_keys(&f), record);
    let err = PiiKeys::open(&f.db, &c, REGION, at(3)).unwrap_err();
    assert!(matches!(err, OpenError::KeyMismatch { version: 1, .. }), "{err:?}");
}

fn a_replica_takes_another_ones_pii_key_rotation_only_with_its_file(db: &Db) {
    let f = Features::new(db);
    let (a_dir, a) = replica_keys(&f, "a");
    let (b_dir, b) = replica_keys(&f, "b");
    // Two replicas' stores on the region's database (on SQLite, two stores on one
    // `features.db`, as one daemon after another would open it).
    let open = |dir: &str, keys: &Arc<Vault>| {
        let data = f.dir.path().join(dir);
        std::fs::create_dir(&data).unwrap();
        match db.backend() {
            Backend::Sqlite => FeatureStore::open(f.dir.path(), Arc::clone(keys), REGION),
            Backend::Postgres => {
                FeatureStore::open_postgres(db.clone(), &data, Arc::clone(keys), REGION)
            }
        }
    };
    let first = open("data-a", &a).unwrap();
    let v1 = pii_keys::file_name(REGION, 1);
    std::fs::copy(a_dir.join(&v1), b_dir.join(&v1)).unwrap();
    let second = open("data-b", &b).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let now = Timestamp::from_system(std::time::SystemTime::now());
    let current = |store: &FeatureStore| {
        runtime.block_on(store.keyring(now)).map(|ring| ring.current_version())
    };
    assert_eq!(current(&second).unwrap(), 1);
    // The first rotates: the second, which lacks the new file, refuses to pseudonymise
    // rather than go on with version 1 alone.
    let rotated = runtime.block_on(first.rotate_pii_key(Duration::from_secs(3600), now)).unwrap();
    assert_eq!(rotated.version, 2);
    assert_eq!(current(&first).unwrap(), 2);
    let v2 = pii_keys::file_name(REGION, 2);
    let err = current(&second).unwrap_err();
    assert!(
        matches!(&err, OpenError::KeyMissing { path, version: 2 } if *path == b_dir.join(&v2)),
        "{err:?}"
    );
    // Given the file, it takes version 2, and carries version 1 beside it in the overlap.
    std::fs::copy(a_dir.join(&v2), b_dir.join(&v2)).unwrap();
    let ring = runtime.block_on(second.keyring(now)).unwrap();
    assert_eq!((ring.current_version(), ring.overlapping_versions()), (2, vec![1]));
}

fn the_feature_schema_is_the_same_on_both_and_migrates_once(db: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let sqlite =
        Db::open_with(&dir.path().join(store::FEATURES_DB_FILE), store::MIGRATIONS).unwrap();
    let sqlite_columns = crate::sqlite_columns(&sqlite);
    assert_eq!(sqlite_columns.len(), 25, "{sqlite_columns:?}");
    if db.backend() == Backend::Sqlite {
        // Nothing to do there: `features.db` is migrated when opened.
        store::migrate_postgres(db).unwrap();
        return;
    }
    // Replicas starting together migrate once.
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..3).map(|_| s.spawn(|| store::migrate_postgres(db))).collect();
        for run in runs {
            run.join().unwrap().unwrap();
        }
    });
    let tables: Vec<String> = sqlite_columns.iter().map(|(t, _)| t.clone()).collect();
    let pg_columns: BTreeSet<(String, String)> = db
        .run_sync(|sql| {
            sql.query_map(
                "SELECT table_name::TEXT, column_name::TEXT FROM information_schema.columns
                 WHERE table_schema = 'public'",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .unwrap()
        .into_iter()
        .filter(|(t, _): &(String, String)| tables.contains(t))
        .collect();
    assert_eq!(sqlite_columns, pg_columns);
    // The control plane's schema history is its own, untouched.
    let versions = db
        .run_sync(|sql| {
            Ok((
                sql.query_row("SELECT version FROM feature_schema_version", params![], |r| {
                    r.get::<i64>(0)
                })?,
                sql.query_row("SELECT version FROM schema_version", params![], |r| {
                    r.get::<i64>(0)
                })?,
            ))
        })
        .unwrap();
    assert_eq!(versions.0, store::PG_MIGRATIONS.len() as i64);
    assert!(versions.1 >= 1);
    db.run_sync(|sql| sql.execute("UPDATE feature_schema_version SET version = 99", params![]))
        .unwrap();
    let err = store::migrate_postgres(db).unwrap_err();
    assert!(matches!(err, MigrateError::TooNew { found: 99, .. }), "{err}");
    assert!(err.to_string().contains("supports up to"), "{err}");
}
