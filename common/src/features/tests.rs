//! The feature store's rules, one test per rule.

use super::*;

const VIEW: &str = r#"
name = "pumps"
description = "Hourly pump statistics"
timestamp = "event_time"

[entity]
name = "pump_id"
type = "string"

[[features]]
name = "temperature"
type = "f32"
description = "Bearing temperature, degrees C"
owner = "reliability"
default = 20.0

[[features]]
name = "starts"
type = "i64"
nullable = true
description = "Motor starts in the hour"
owner = "reliability"

[[features]]
name = "running"
type = "bool"
description = "Running at the hour's end"
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
pii = true
description = "Operator on shift"
owner = "ops"
"#;

fn view() -> FeatureView {
    FeatureView::from_toml(VIEW).unwrap()
}

fn header() -> Vec<&'static str> {
    vec!["pump_id", "event_time", "temperature", "starts", "running", "mode", "operator"]
}

/// Checks one CSV-like row and returns the rules it broke, by column.
fn broken(cells: &[&str]) -> Vec<(String, String)> {
    let schema = RowSchema::new(&view(), &header()).unwrap();
    let cells: Vec<Cell<'_>> =
        cells.iter().map(|c| if c.is_empty() { Cell::Null } else { Cell::Text(c) }).collect();
    match schema.check(7, &cells) {
        Ok(_) => Vec::new(),
        Err(errors) => {
            assert!(errors.iter().all(|e| e.row == 7));
            errors.into_iter().map(|e| (e.column, e.rule)).collect()
        }
    }
}

#[test]
fn a_good_row_becomes_typed_values() {
    let schema = RowSchema::new(&view(), &header()).unwrap();
    let cells = ["p-1", "2026-11-26T13:00:00+01:00", "71.5", "", "true", "auto", "ann"]
        .map(|c| if c.is_empty() { Cell::Null } else { Cell::Text(c) });
    let row = schema.check(1, &cells).unwrap();
    assert_eq!(row.key, Key::Str("p-1".into()));
    assert_eq!(row.time, value::parse_time("2026-11-26T12:00:00Z").unwrap());
    assert_eq!(
        row.values,
        vec![
            Value::F32(71.5),
            Value::Null,
            Value::Bool(true),
            Value::Str("auto".into()),
            Value::Str("ann".into())
        ]
    );
}

#[test]
fn each_rule_is_reported_with_its_column() {
    let t = "2026-11-26T13:00:00Z";
    let cases: [(&[&str], &str, &str); 9] = [
        (&["p", t, "", "1", "true", "auto", ""], "temperature", "must not be null"),
        (&["p", t, "warm", "1", "true", "auto", ""], "temperature", "must be f32"),
        (&["p", t, "NaN", "1", "true", "auto", ""], "temperature", "must be finite"),
        (&["p", t, "1e39", "1", "true", "auto", ""], "temperature", "out of range for f32"),
        (&["p", t, "1", "1.5", "true", "auto", ""], "starts", "must be i64"),
        (&["p", t, "1", "1", "yes", "auto", ""], "running", "must be bool"),
        (
            &["p", t, "1", "1", "true", "remote", ""],
            "mode",
            "must be one of the category's 2 values",
        ),
        (
            &["p", "yesterday", "1", "1", "true", "auto", ""],
            "event_time",
            "must be an RFC 3339 time such as 2026-11-26T13:00:00Z",
        ),
        (&["", t, "1", "1", "true", "auto", ""], "pump_id", "must not be null"),
    ];
    for (cells, column, rule) in cases {
        assert_eq!(broken(cells), vec![(column.to_owned(), rule.to_owned())], "{cells:?}");
    }
    // Every broken rule of a row is reported, not only the first.
    assert_eq!(broken(&["p", t, "", "x", "maybe", "auto", ""]).len(), 3);
}

#[test]
fn headers_must_fit_the_view() {
    let v = view();
    let check = |h: &[&str]| RowSchema::new(&v, h).map(|_| ()).map_err(|e| e.to_string());
    assert_eq!(check(&header()), Ok(()));
    // A nullable feature may be left out; a required one may not.
    assert_eq!(check(&["pump_id", "event_time", "temperature", "running", "mode"]), Ok(()));
    assert_eq!(
        check(&["pump_id", "event_time", "temperature", "running"]),
        Err("column \"mode\" is missing".into())
    );
    assert_eq!(
        check(&["pump_id", "event_time", "temperature", "running", "mode", "colour"]),
        Err("column \"colour\" is not in the view".into())
    );
    assert_eq!(
        check(&["pump_id", "event_time", "temperature", "running", "mode", "mode"]),
        Err("column \"mode\" appears twice".into())
    );
    assert_eq!(
        check(&["event_time", "temperature", "running", "mode"]),
        Err("column \"pump_id\" is missing".into())
    );
}

#[test]
fn reports_keep_the_first_errors_and_count_all() {
    let mut report = Report::default();
    for row in 1..=30 {
        let error = RowError { row, column: "c".into(), value: "v".into(), rule: "r".into() };
        report.add(vec![error.clone(), error]);
    }
    report.add(Vec::new());
    assert_eq!((report.bad_rows, report.errors, report.first.len()), (30, 60, rows::MAX_REPORTED));
    assert_eq!(report.first[0].row, 1);
}

#[test]
fn bad_declarations_are_refused_with_the_reason() {
    let cases = [
        (VIEW.replace("name = \"pumps\"", "name = \"Pumps\""), "model name \"Pumps\""),
        (VIEW.replace("name = \"starts\"", "name = \"Starts\""), "column name \"Starts\""),
        (VIEW.replace("name = \"starts\"", "name = \"mode\""), "column \"mode\" is declared twice"),
        (VIEW.replace("[\"auto\", \"manual\"]", "[]"), "category \"mode\" needs distinct values"),
        (VIEW.replace("default = 20.0", "default = \"hot\""), "default \"hot\": must be f32"),
        (VIEW.replace("type = \"bool\"", "type = \"boolean\""), "unknown variant"),
        (
            VIEW.replace(
                "owner = \"ops\"\n\n[[features]]\nname = \"mode\"",
                "owner = \"ops\"\npii_policy = \"hash\"\n\n[[features]]\nname = \"mode\"",
            ),
            "pii_policy is set but pii is not",
        ),
    ];
    for (text, expected) in cases {
        let err = FeatureView::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains(expected), "{err} lacks {expected}");
    }
}

#[test]
fn compatible_changes_keep_the_version_and_breaking_ones_do_not() {
    let old = view();
    assert_eq!(view::compare(&old, &old), Change::Same);
    let compatible = [
        VIEW.replace("Bearing temperature", "Bearing temperature (mean)"),
        VIEW.replace("[\"auto\", \"manual\"]", "[\"auto\", \"manual\", \"remote\"]"),
        VIEW.replace("type = \"bool\"", "type = \"bool\"\nnullable = true"),
        format!(
            "{VIEW}\n[[features]]\nname = \"vibration\"\ntype = \"f64\"\nnullable = true\ndescription = \"mm/s\"\nowner = \"ops\"\n"
        ),
    ];
    for text in compatible {
        let new = FeatureView::from_toml(&text).unwrap();
        assert!(matches!(view::compare(&old, &new), Change::Compatible(_)), "{text}");
    }
    let breaking = [
        (VIEW.replace("type = \"i64\"", "type = \"f64\""), "type i64 became f64"),
        (
            VIEW.replace("[\"auto\", \"manual\"]", "[\"auto\"]"),
            "category values [\"manual\"] removed",
        ),
        (
            VIEW.replace("type = \"i64\"\nnullable = true", "type = \"i64\""),
            "starts is no longer nullable",
        ),
        (
            VIEW.replace("type = \"string\"\n\n[[features]]", "type = \"i64\"\n\n[[features]]"),
            "entity pump_id string became pump_id i64",
        ),
        (
            format!(
                "{VIEW}\n[[features]]\nname = \"flow\"\ntype = \"f64\"\ndescription = \"l/s\"\nowner = \"ops\"\n"
            ),
            "feature flow added but not nullable",
        ),
    ];
    for (text, reason) in breaking {
        let new = FeatureView::from_toml(&text).unwrap();
        match view::compare(&old, &new) {
            Change::Breaking(reasons) => {
                assert!(reasons.iter().any(|r| r.contains(reason)), "{reasons:?}");
            }
            other => panic!("{reason}: {other:?}"),
        }
    }
    let mut removed = old.clone();
    removed.features.remove(1);
    assert_eq!(
        view::compare(&old, &removed),
        Change::Breaking(vec!["feature starts removed".into()])
    );
}

#[test]
fn filters_select_entities_and_refuse_bad_expressions() {
    let v = view();
    let values = |t: f32, mode: &str| {
        vec![Value::F32(t), Value::Null, Value::Bool(true), Value::Str(mode.into()), Value::Null]
    };
    let key = Key::Str("p-7".into());
    let check = |expr: &str, t: f32, mode: &str| {
        Filter::parse(&v, expr).unwrap().matches(&key, &values(t, mode))
    };
    assert!(check("temperature > 50 and mode == \"auto\"", 60.0, "auto"));
    assert!(!check("temperature > 50 and mode == \"auto\"", 40.0, "auto"));
    assert!(check("mode in (\"manual\", \"auto\")", 1.0, "auto"));
    assert!(!check("mode != \"auto\"", 1.0, "auto"));
    assert!(check("pump_id == \"p-7\"", 1.0, "auto"));
    assert!(check("running == true and temperature <= 1", 1.0, "auto"));
    // A null fails every comparison, even !=.
    assert!(!check("starts != 3", 1.0, "auto"));
    let refuse = |expr: &str| Filter::parse(&v, expr).unwrap_err().to_string();
    assert!(refuse("colour == 1").contains("no column \"colour\""));
    assert!(refuse("mode == 1").contains("column \"mode\" is category"));
    assert!(refuse("temperature ~ 1").contains("expected =="));
    assert!(refuse("temperature > 1 or mode == \"auto\"").contains("expected `and`"));
    assert!(refuse("mode == \"auto").contains("unterminated"));
}

#[test]
fn personal_data_needs_a_policy_before_it_leaves() {
    let v = view();
    let err = pii::plan(&v, None).unwrap_err().to_string();
    assert!(err.contains("[\"operator\"]") && err.contains("--pii"), "{err}");
    let hash = pii::plan(&v, Some(PiiPolicy::Hash)).unwrap();
    assert_eq!(hash[4], Treatment::Hash);
    assert!(hash[..4].iter().all(|t| *t == Treatment::Raw));
    let mut declared = v.clone();
    declared.features[4].pii_policy = Some(PiiPolicy::Drop);
    assert_eq!(pii::plan(&declared, Some(PiiPolicy::Hash)).unwrap()[4], Treatment::Drop);
}

#[test]
fn names_of_older_pii_key_columns_are_reserved() {
    let mut v = view();
    v.features[0].name = "temperature__pii_v1".into();
    let err = v.check().unwrap_err();
    assert!(err.to_string().contains("kept for pseudonyms under older PII keys"), "{err}");
    let mut v = view();
    v.features[4].name = "o".repeat(pii::MAX_PII_NAME_LEN + 1);
    let err = v.check().unwrap_err();
    assert!(err.to_string().contains("personal data needs a name of at most 47"), "{err}");
    v.features[4].name = "o".repeat(pii::MAX_PII_NAME_LEN);
    v.check().unwrap();
    assert!(view::is_column_name(&companion_name(&v.features[4].name, u32::MAX)));
}

#[test]
fn pseudonyms_are_keyed_stable_and_per_feature() {
    let a = Pseudonymiser::new(b"region key one");
    let b = Pseudonymiser::new(b"region key two");
    let ann = Value::Str("ann".into());
    let p = a.pseudonym("operator", &ann);
    assert_eq!(p, a.pseudonym("operator", &ann));
    assert_ne!(p, b.pseudonym("operator", &ann));
    assert_ne!(p, a.pseudonym("owner", &ann));
    assert_ne!(p, ann);
    assert_eq!(a.pseudonym("operator", &Value::Null), Value::Null);
    let Value::Str(text) = p else { panic!("{p:?}") };
    assert_eq!(text.len(), 2 + 32);
}

#[cfg(feature = "snapshots")]
mod payload {
    use super::*;
    use crate::time::Timestamp;

    fn snapshot(rows: &[(&str, f32, Option<i64>)], plan: &[Treatment]) -> (SnapshotSpec, Vec<u8>) {
        let v = view();
        let spec = SnapshotSpec::new(&v, 3, plan, Timestamp::from_unix(1_800_000_000), "all");
        let mut writer = SnapshotWriter::new(
            &v,
            spec,
            plan.to_vec(),
            Some(Pseudonymiser::new(b"k")),
            Vec::new(),
        )
        .unwrap();
        for (i, (key, t, starts)) in rows.iter().enumerate() {
            let values = vec![
                Value::F32(*t),
                starts.map_or(Value::Null, Value::I64),
                Value::Bool(i % 2 == 0),
                Value::Str("auto".into()),
                Value::Str(format!("operator {i}")),
            ];
            writer.push(Key::Str((*key).into()), i as i64 * 1_000_000, values).unwrap();
        }
        writer.finish()
    }

    #[test]
    fn a_snapshot_round_trips_with_pii_treated() {
        let plan = pii::plan(&view(), Some(PiiPolicy::Hash)).unwrap();
        let (spec, bytes) = snapshot(&[("a", 1.5, Some(3)), ("b", 2.5, None)], &plan);
        assert_eq!(spec.entities, 2);
        assert!(spec.features[4].pseudonymised);
        let table = OnlineTable::load(spec, &bytes).unwrap();
        let a = table.get("a").unwrap().unwrap();
        assert_eq!(a.time, Some(0));
        assert_eq!(&a.values[..3], &[Value::F32(1.5), Value::I64(3), Value::Bool(true)]);
        let Value::Str(pseudonym) = &a.values[4] else { panic!() };
        assert!(pseudonym.starts_with("p:"), "{pseudonym}");
        assert_eq!(table.get("b").unwrap().unwrap().values[1], Value::Null);
        // "zz" is not held and "starts" has no default: no answer.
        assert_eq!(table.get("zz").unwrap(), None);
    }

    #[test]
    fn after_a_key_rotation_the_overlap_carries_pseudonyms_under_both_versions() {
        let v = view();
        let plan = pii::plan(&v, Some(PiiPolicy::Hash)).unwrap();
        let keyring = Keyring::new(3, b"key three").with_overlapping(2, b"key two");
        let spec =
            SnapshotSpec::new(&v, 1, &plan, Timestamp::from_unix(0), "all").with_keyring(&keyring);
        let names: Vec<&str> = spec.features.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            ["temperature", "starts", "running", "mode", "operator", "operator__pii_v2"]
        );
        assert_eq!(spec.features[4].pii_key, Some(3));
        assert_eq!(spec.features[5].pii_key, Some(2));
        assert_eq!(spec.features[3].pii_key, None, "not personal data");

        let mut writer =
            SnapshotWriter::with_keyring(&v, spec.clone(), plan.clone(), &keyring, Vec::new())
                .unwrap();
        let operator = Value::Str("operator 0".into());
        let values = vec![
            Value::F32(1.0),
            Value::Null,
            Value::Bool(true),
            Value::Str("auto".into()),
            operator.clone(),
        ];
        writer.push(Key::Str("a".into()), 0, values).unwrap();
        let (spec, bytes) = writer.finish();
        let row = OnlineTable::load(spec, &bytes).unwrap().get("a").unwrap().unwrap();
        // The new pseudonym in the feature's column, the old one (as snapshots before the
        // rotation carried it) beside it.
        assert_eq!(
            row.values[4],
            Pseudonymiser::new(b"key three").pseudonym("operator", &operator)
        );
        assert_eq!(row.values[5], Pseudonymiser::new(b"key two").pseudonym("operator", &operator));
        assert_ne!(row.values[4], row.values[5]);

        // A spec that does not match the keyring is refused before anything is written.
        let err = SnapshotWriter::with_keyring(
            &v,
            spec_of(&v, &plan),
            plan.clone(),
            &keyring,
            Vec::new(),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("lists 5 features but the plan carries 6"), "{err}");
        let err =
            SnapshotWriter::new(&v, spec_of(&v, &plan), plan, None, Vec::new()).err().unwrap();
        assert!(err.to_string().contains("no key"), "{err}");
    }

    fn spec_of(v: &FeatureView, plan: &[Treatment]) -> SnapshotSpec {
        SnapshotSpec::new(v, 1, plan, Timestamp::from_unix(0), "all")
    }

    #[test]
    fn dropped_features_are_not_in_the_payload() {
        let plan = pii::plan(&view(), Some(PiiPolicy::Drop)).unwrap();
        let (spec, bytes) = snapshot(&[("a", 1.0, None)], &plan);
        assert_eq!(spec.features.len(), 4);
        assert!(spec.position("operator").is_none());
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains("operator 0"), "raw value in the payload");
        assert_eq!(OnlineTable::load(spec, &bytes).unwrap().len(), 1);
    }

    #[test]
    fn assembling_inputs_uses_defaults_and_names_what_is_missing() {
        let plan = pii::plan(&view(), Some(PiiPolicy::Drop)).unwrap();
        let (spec, bytes) = snapshot(&[("a", 7.0, Some(2)), ("b", 8.0, None)], &plan);
        let table = OnlineTable::load(spec, &bytes).unwrap();
        let mut out = Vec::new();
        table.assemble("a", &[1, 0, 2], &mut out).unwrap();
        assert_eq!(out, [2.0, 7.0, 1.0]);
        let err = table.assemble("b", &[1], &mut Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "feature \"starts\" of entity \"b\" is null and has no default"
        );
        let err = table.assemble("nobody", &[1], &mut Vec::new()).unwrap_err();
        assert_eq!(err.to_string(), "entity \"nobody\" is not in the snapshot of view \"pumps\"");
        // temperature declares a default, so a missing entity still gets it.
        let mut out = Vec::new();
        table.assemble("nobody", &[0], &mut out).unwrap();
        assert_eq!(out, [20.0]);
        let err = table.assemble("a", &[3], &mut Vec::new()).unwrap_err();
        assert!(matches!(err, AssembleError::NotNumeric { .. }));
    }

    #[test]
    fn keys_out_of_order_and_foreign_payloads_are_refused() {
        let v = view();
        let plan = pii::plan(&v, Some(PiiPolicy::Drop)).unwrap();
        let spec = SnapshotSpec::new(&v, 1, &plan, Timestamp::from_unix(0), "all");
        let mut w = SnapshotWriter::new(&v, spec.clone(), plan.clone(), None, Vec::new()).unwrap();
        let row = || {
            vec![
                Value::F32(1.0),
                Value::Null,
                Value::Bool(true),
                Value::Str("auto".into()),
                Value::Null,
            ]
        };
        w.push(Key::Str("b".into()), 0, row()).unwrap();
        assert!(matches!(w.push(Key::Str("a".into()), 0, row()), Err(SnapshotError::Order { .. })));
        assert!(matches!(w.push(Key::Str("b".into()), 0, row()), Err(SnapshotError::Order { .. })));
        // A payload whose columns differ from the manifest's.
        let (_, bytes) =
            snapshot(&[("a", 1.0, None)], &pii::plan(&v, Some(PiiPolicy::Hash)).unwrap());
        let mut claimed = spec;
        claimed.entities = 1;
        let err = OnlineTable::load(claimed.clone(), &bytes).unwrap_err().to_string();
        assert!(err.contains("differ from the manifest's"), "{err}");
        let err = OnlineTable::load(claimed.clone(), b"\x01\xff").unwrap_err().to_string();
        assert!(err.starts_with("snapshot pumps: row 0: the header does not decode"), "{err}");
        // The writer's rows, but the manifest claims two.
        let (_, bytes) = w.finish();
        let mut two = claimed.clone();
        two.entities = 2;
        let err = OnlineTable::load(two, &bytes).unwrap_err().to_string();
        assert_eq!(err, "snapshot pumps: 1 rows, the manifest says 2");
        // Rows out of order, a null where none may be, a category value not declared.
        let header = SnapshotWriter::new(&v, claimed.clone(), plan.clone(), None, Vec::new())
            .unwrap()
            .finish()
            .1
            .len();
        let twice = [&bytes[..], &bytes[header..]].concat();
        let mut both = claimed.clone();
        both.entities = 2;
        let err = OnlineTable::load(both, &twice).unwrap_err().to_string();
        assert_eq!(err, "snapshot pumps: row 2: entity b is out of order or repeated");
        let mut strict = claimed.clone();
        strict.features[1].nullable = false;
        let err = OnlineTable::load(strict, &bytes).unwrap_err().to_string();
        assert_eq!(err, "snapshot pumps: row 1: starts: null, and it is not nullable");
        let mut narrow = claimed;
        narrow.features[3].kind = FeatureType::Category { values: vec!["manual".into()] };
        let err = OnlineTable::load(narrow, &bytes).unwrap_err().to_string();
        assert!(err.contains("mode: \"auto\" is not a value of the category"), "{err}");
    }
}
