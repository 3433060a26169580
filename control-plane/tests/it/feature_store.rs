//! The offline store on real SQLite files: views and their versions, all-or-nothing ingest
//! of CSV and Parquet, snapshots (scope, as-of, personal data), and the point-in-time join.

// Stored values must come back exactly.
#![allow(clippy::float_cmp)]

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{
    Array, ArrayRef, Float32Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use falaj_common::features::value::parse_time;
use falaj_common::features::view::PiiPolicy;
use falaj_common::features::{FeatureView, OnlineTable, Value};
use falaj_common::time::Timestamp;
use falaj_control::db::Db;
use falaj_control::features::export::{self, ExportError};
use falaj_control::features::ingest::{self, IngestError};
use falaj_control::features::snapshot::{self, BuildError, SnapshotOptions};
use falaj_control::features::store;
use falaj_tables::Format;
use rusqlite::Connection;

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
name = "mode"
type = "category"
values = ["auto", "manual"]
description = "Control mode"
owner = "ops"

[[features]]
name = "operator"
type = "string"
nullable = true
pii = true
description = "Operator on shift"
owner = "ops"
"#;

const NOW: Timestamp = Timestamp::from_unix(1_800_000_000);

struct Store {
    dir: tempfile::TempDir,
    db: Db,
}

impl Store {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_with(&dir.path().join("features.db"), store::MIGRATIONS).unwrap();
        let s = Self { dir, db };
        s.with(|c| store::apply(c, &FeatureView::from_toml(VIEW).unwrap(), NOW).map(drop));
        s
    }

    fn with<R>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<R>) -> R {
        self.db.call_sync(f).unwrap()
    }

    fn file(&self, name: &str, text: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn ingest(&self, path: &Path) -> Result<ingest::Ingested, IngestError> {
        self.with(|c| Ok(ingest::ingest(c, "pumps", path, "file.csv", NOW)))
    }

    fn rows(&self) -> u64 {
        let stored = self.with(|c| store::current(c, "pumps")).unwrap();
        self.with(|c| store::counts(c, &stored)).0
    }

    fn snapshot(&self, options: &SnapshotOptions) -> Result<OnlineTable, BuildError> {
        let (spec, bytes) = self.with(|c| {
            Ok(snapshot::build(
                c,
                "pumps",
                options,
                &falaj_common::features::Keyring::new(1, &[7; 32]),
                micros("2030-01-01T00:00:00Z"),
                Vec::new(),
            ))
        })?;
        Ok(OnlineTable::load(spec, &bytes).unwrap())
    }
}

fn micros(t: &str) -> i64 {
    parse_time(t).unwrap()
}

const HISTORY: &str = "pump_id,event_time,temperature,mode,operator
p1,2026-01-01T00:00:00Z,50.0,auto,ann
p1,2026-01-03T00:00:00Z,70.0,manual,bob
p2,2026-01-02T00:00:00Z,40.0,auto,
p3,2026-01-05T00:00:00Z,90.0,auto,cyd
";

#[test]
fn a_file_with_one_bad_row_is_refused_whole_with_a_report() {
    let store = Store::new();
    let good = store.ingest(&store.file("good.csv", HISTORY)).unwrap();
    assert_eq!(good.rows, 4);
    // 1,000 good rows, then two bad ones near the end: nothing of it is kept.
    let mut text = String::from("pump_id,event_time,temperature,mode,operator\n");
    for i in 0..1000 {
        let _ = writeln!(text, "q{i},2026-02-01T00:00:00Z,{i}.5,auto,");
    }
    text += "q1000,2026-02-01T00:00:00Z,hot,auto,\n";
    text += "q1001,not a time,1.0,remote,\n";
    let err = store.ingest(&store.file("bad.csv", &text)).unwrap_err();
    let IngestError::Rows { report, .. } = &err else { panic!("{err}") };
    assert_eq!((report.rows, report.bad_rows, report.errors), (1002, 2, 3));
    let first = &report.first[0];
    assert_eq!(
        (first.row, first.column.as_str(), first.value.as_str()),
        (1001, "temperature", "\"hot\"")
    );
    assert_eq!(first.rule, "must be f32");
    let rules: Vec<_> = report.first.iter().map(|e| (e.column.as_str(), e.rule.as_str())).collect();
    assert!(rules.contains(&("mode", "must be one of the category's 2 values")), "{rules:?}");
    assert!(err.to_string().contains("nothing was ingested"), "{err}");
    assert_eq!(store.rows(), 4, "the refused file left rows behind");
    // A header that does not fit is refused before any row.
    let err = store
        .ingest(&store.file("h.csv", "pump_id,event_time,temperature\np,2026-01-01T00:00:00Z,1\n"))
        .unwrap_err();
    assert!(err.to_string().contains("column \"mode\" is missing"), "{err}");
    // A ragged CSV row is a file error, also leaving nothing.
    let err = store
        .ingest(
            &store.file("r.csv", "pump_id,event_time,temperature,mode\np,2026-01-01T00:00:00Z,1\n"),
        )
        .unwrap_err();
    assert!(matches!(err, IngestError::Source(_)), "{err}");
    assert_eq!(store.rows(), 4);
}

#[test]
fn parquet_ingests_like_csv_with_typed_columns_checked() {
    let store = Store::new();
    let schema = Arc::new(Schema::new(vec![
        Field::new("pump_id", DataType::Utf8, false),
        Field::new("event_time", DataType::Timestamp(TimeUnit::Millisecond, None), false),
        Field::new("temperature", DataType::Float32, true),
        Field::new("mode", DataType::Utf8, false),
    ]));
    let write = |name: &str, temps: Vec<Option<f32>>| {
        let n = temps.len();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values((0..n).map(|i| format!("p{i}")))),
            Arc::new(TimestampMillisecondArray::from_iter_values(
                (0..n).map(|i| 1_767_225_600_000 + i as i64),
            )),
            Arc::new(Float32Array::from(temps)),
            Arc::new(StringArray::from_iter_values((0..n).map(|_| "auto"))),
        ];
        let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
        let path = store.dir.path().join(name);
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&path).unwrap(),
            schema.clone(),
            None,
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        path
    };
    let ok = write("ok.parquet", (0..500).map(|i| Some(i as f32)).collect());
    assert_eq!(store.ingest(&ok).unwrap().rows, 500);
    // A null in a non-nullable feature, at row 300.
    let bad = write("bad.parquet", (0..500).map(|i| (i != 299).then_some(1.0)).collect());
    let IngestError::Rows { report, .. } = store.ingest(&bad).unwrap_err() else { panic!() };
    assert_eq!(
        (report.bad_rows, report.first[0].row, report.first[0].rule.as_str()),
        (1, 300, "must not be null")
    );
    assert_eq!(store.rows(), 500);
    let table = store
        .snapshot(&SnapshotOptions { pii: Some(PiiPolicy::Drop), ..Default::default() })
        .unwrap();
    assert_eq!(table.get("p42").unwrap().unwrap().values[0], Value::F32(42.0));
    assert_eq!(
        table.get("p42").unwrap().unwrap().time,
        Some(1_767_225_600_042_000),
        "milliseconds became microseconds"
    );
}

#[test]
fn snapshots_carry_the_latest_values_of_the_entities_asked_for() {
    let store = Store::new();
    store.ingest(&store.file("h.csv", HISTORY)).unwrap();
    let all = store
        .snapshot(&SnapshotOptions { pii: Some(PiiPolicy::Drop), ..Default::default() })
        .unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(
        all.get("p1").unwrap().unwrap().values[..2],
        [Value::F32(70.0), Value::Str("manual".into())]
    );
    // As of Jan 2: p1's first row, p2; p3 did not exist yet.
    let early = store
        .snapshot(&SnapshotOptions {
            as_of: Some(micros("2026-01-02T12:00:00Z")),
            pii: Some(PiiPolicy::Drop),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(early.len(), 2);
    assert_eq!(early.get("p1").unwrap().unwrap().values[0], Value::F32(50.0));
    assert!(early.get("p3").unwrap().is_none());
    // A site's list, with an id that has no rows: only what was asked for and exists.
    let listed = store
        .snapshot(&SnapshotOptions {
            entities: Some(vec!["p3".into(), "p2".into(), "p9".into()]),
            pii: Some(PiiPolicy::Drop),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.get("p1").unwrap().is_none());
    // A filter on the latest values.
    let hot = store
        .snapshot(&SnapshotOptions {
            filter: Some("temperature >= 70 and mode == \"auto\"".into()),
            pii: Some(PiiPolicy::Drop),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(hot.len(), 1);
    assert!(hot.get("p3").unwrap().is_some());
    assert_eq!(hot.spec().scope, "filter temperature >= 70 and mode == \"auto\"");
    let err = store
        .snapshot(&SnapshotOptions {
            filter: Some("colour == 1".into()),
            pii: Some(PiiPolicy::Drop),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(err, BuildError::Filter(_)), "{err}");
    let err = store
        .snapshot(&SnapshotOptions {
            filter: Some("temperature > 1000".into()),
            pii: Some(PiiPolicy::Drop),
            ..Default::default()
        })
        .unwrap_err();
    assert!(matches!(err, BuildError::Empty(_)), "{err}");
}

#[test]
fn personal_data_leaves_hashed_or_not_at_all() {
    let store = Store::new();
    store.ingest(&store.file("h.csv", HISTORY)).unwrap();
    let err = store.snapshot(&SnapshotOptions::default()).unwrap_err();
    assert!(matches!(err, BuildError::Pii(_)), "{err}");
    assert!(err.to_string().contains("\"operator\""), "{err}");
    let hashed = store
        .snapshot(&SnapshotOptions { pii: Some(PiiPolicy::Hash), ..Default::default() })
        .unwrap();
    let p1 = hashed.get("p1").unwrap().unwrap();
    let Value::Str(pseudonym) = &p1.values[2] else { panic!("{p1:?}") };
    assert!(pseudonym.starts_with("p:") && pseudonym != "bob", "{pseudonym}");
    assert_eq!(hashed.get("p2").unwrap().unwrap().values[2], Value::Null, "null stays null");
    // The same value hashes the same way in the next snapshot, so joins still work.
    let again = store
        .snapshot(&SnapshotOptions { pii: Some(PiiPolicy::Hash), ..Default::default() })
        .unwrap();
    assert_eq!(again.get("p1").unwrap().unwrap().values[2], p1.values[2]);
    let dropped = store
        .snapshot(&SnapshotOptions { pii: Some(PiiPolicy::Drop), ..Default::default() })
        .unwrap();
    assert_eq!(dropped.spec().features.len(), 2);
}

#[test]
fn the_training_export_never_joins_a_label_to_later_features() {
    let store = Store::new();
    store.ingest(&store.file("h.csv", HISTORY)).unwrap();
    // p1's label on Jan 2 must see Jan 1's 50.0; a latest-value join would give Jan 3's
    // 70.0 (leaking the future). p3's label predates every p3 row: no features.
    let labels = store.file(
        "labels.csv",
        "pump_id,event_time,failed\np1,2026-01-02T00:00:00Z,0\np1,2026-01-04T00:00:00Z,1\np3,2026-01-01T00:00:00Z,0\np2,2026-01-02T00:00:00Z,1\n",
    );
    let out = store.dir.path().join("train.csv");
    let exported = store
        .with(|c| Ok(export::export(c, "pumps", &labels, "labels.csv", &out, Format::Csv)))
        .unwrap();
    assert_eq!((exported.rows, exported.matched), (4, 3));
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines[0], "pump_id,event_time,failed,feature_time,temperature,mode,operator");
    assert_eq!(lines[1], "p1,2026-01-02T00:00:00Z,0,2026-01-01T00:00:00Z,50,auto,ann");
    assert_eq!(lines[2], "p1,2026-01-04T00:00:00Z,1,2026-01-03T00:00:00Z,70,manual,bob");
    assert_eq!(lines[3], "p3,2026-01-01T00:00:00Z,0,,,,");
    // Exactly at the feature's own time is "at or before".
    assert_eq!(lines[4], "p2,2026-01-02T00:00:00Z,1,2026-01-02T00:00:00Z,40,auto,");

    // The same as Parquet, with the label typed as a number.
    let out = store.dir.path().join("train.parquet");
    store
        .with(|c| Ok(export::export(c, "pumps", &labels, "labels.csv", &out, Format::Parquet)))
        .unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(&out).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    let batch = reader.into_iter().next().unwrap().unwrap();
    assert_eq!(batch.num_rows(), 4);
    assert_eq!(batch.schema().field(2).data_type(), &DataType::Float64);
    let temps = batch.column(4).as_any().downcast_ref::<Float32Array>().unwrap();
    assert_eq!(temps.value(0), 50.0);
    assert!(temps.is_null(2));

    let err = store
        .with(|c| {
            Ok(export::export(
                c,
                "pumps",
                &store.file("l2.csv", "pump_id,failed\np1,0\n"),
                "l2.csv",
                &out,
                Format::Csv,
            ))
        })
        .unwrap_err();
    assert!(matches!(err, ExportError::Header { .. }), "{err}");
    let err = store
        .with(|c| {
            Ok(export::export(
                c,
                "pumps",
                &store.file("l3.csv", "pump_id,event_time,failed\np1,yesterday,0\n"),
                "l3.csv",
                &out,
                Format::Csv,
            ))
        })
        .unwrap_err();
    assert!(matches!(err, ExportError::Rows { .. }), "{err}");
}

#[test]
fn views_version_on_breaking_changes_and_keep_their_rows_on_compatible_ones() {
    let store = Store::new();
    store.ingest(&store.file("h.csv", HISTORY)).unwrap();
    let added = format!(
        "{VIEW}\n[[features]]\nname = \"vibration\"\ntype = \"f64\"\nnullable = true\ndescription = \"mm/s\"\nowner = \"ops\"\n"
    );
    let applied = store.with(|c| store::apply(c, &FeatureView::from_toml(&added).unwrap(), NOW));
    assert_eq!(
        (applied.outcome.as_str(), applied.stored.version, applied.stored.revision),
        ("compatible", 1, 2)
    );
    assert_eq!(store.rows(), 4, "a compatible change keeps the rows");
    // The new column is ingestible right away.
    store
        .ingest(&store.file(
            "v.csv",
            "pump_id,event_time,temperature,mode,vibration\np9,2026-03-01T00:00:00Z,1,auto,0.25\n",
        ))
        .unwrap();
    let unchanged = store.with(|c| store::apply(c, &FeatureView::from_toml(&added).unwrap(), NOW));
    assert_eq!(unchanged.outcome, "unchanged");
    let retyped = added.replace("type = \"f32\"", "type = \"f64\"");
    let applied = store.with(|c| store::apply(c, &FeatureView::from_toml(&retyped).unwrap(), NOW));
    assert_eq!(
        (applied.outcome.as_str(), applied.stored.version, applied.stored.revision),
        ("breaking", 2, 1)
    );
    assert_eq!(applied.stored.changes, ["feature temperature: type f32 became f64"]);
    assert_eq!(store.rows(), 0, "version 2 starts empty");
    let history = store.with(|c| store::history(c, "pumps"));
    let versions: Vec<_> = history.iter().map(|h| (h.version, h.revision)).collect();
    assert_eq!(versions, [(1, 1), (1, 2), (2, 1)]);
    // Version 1's rows are still there, under their own definition.
    let v1 = store.with(|c| store::at_version(c, "pumps", 1)).unwrap();
    assert_eq!(store.with(|c| store::counts(c, &v1)).0, 5);
}
