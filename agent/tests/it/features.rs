//! Feature snapshot bundles on the agent over real HTTP on 127.0.0.1:0: import and lookups
//! (values as written, personal data pseudonymised or dropped, defaults), a new snapshot
//! replacing the old, inference by entity equal to the same inference with the features
//! given, every refusal with its status, and import refusals leaving the state untouched.

use crate::support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use falaj_agent::import::{ImportError, ImportOptions, ImportOutcome};
use falaj_common::bundle::{
    BundleBuilder, Content, FeatureInput, ModelFormat, ModelSpec, RuntimeHint,
};
use falaj_common::features::value::format_time;
use falaj_common::features::{
    FeatureView, Key, Pseudonymiser, SnapshotSpec, SnapshotWriter, Value, pii,
};
use falaj_common::onnx::{OnnxModel, zoo};
use falaj_common::time::Timestamp;
use serde_json::{Value as Json, json};
use support::{REGION, Site, now, serve, test_config};

const PUMPS: &str = r#"
name = "pumps"
timestamp = "event_time"

[entity]
name = "pump_id"
type = "string"

[[features]]
name = "temperature"
type = "f32"
default = 20.0
description = "Bearing temperature, degrees C"
owner = "reliability"

[[features]]
name = "pressure"
type = "f64"
nullable = true
description = "Outlet pressure, bar"
owner = "reliability"

[[features]]
name = "starts"
type = "i64"
nullable = true
default = 0
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
pii_policy = "hash"
description = "Operator on shift"
owner = "ops"

[[features]]
name = "serial"
type = "string"
pii = true
pii_policy = "drop"
description = "Serial number of the operator's badge"
owner = "ops"
"#;

/// Every feature has a default, so an entity not held is served its defaults.
const SITES: &str = r#"
name = "sites"
timestamp = "event_time"

[entity]
name = "site_id"
type = "i64"

[[features]]
name = "load"
type = "f32"
default = 0.5
description = "Load, fraction of capacity"
owner = "ops"

[[features]]
name = "alarms"
type = "i64"
default = 0
description = "Alarms in the hour"
owner = "ops"
"#;

/// The features the pump model reads, in input order.
const PUMP_INPUT: [&str; 4] = ["temperature", "pressure", "starts", "running"];

/// Base of the rows' event times, µs since the epoch.
const T0: i64 = 1_799_000_000_000_000;

/// One pump row: temperature, pressure, starts, running, mode, operator, serial.
type PumpRow = (&'static str, f32, Option<f64>, Option<i64>, bool, &'static str, &'static str);

fn pump_rows() -> Vec<PumpRow> {
    vec![
        ("pump-001", 71.5, Some(2.25), Some(3), true, "auto", "ann"),
        ("pump-002", 64.0, None, Some(1), true, "manual", "bob"),
        ("pump-003", 80.25, Some(1.5), None, false, "manual", "cy"),
    ]
}

/// A signed snapshot bundle of the pumps view (definition version `view_version`) as
/// snapshot number `version`, with the rows given.
fn pumps_bundle(site: &Site, version: u64, view_version: u64, rows: &[PumpRow]) -> Vec<u8> {
    let view = FeatureView::from_toml(PUMPS).unwrap();
    let (spec, payload) = write(&view, view_version, |w| {
        for (i, (key, t, p, s, r, mode, operator)) in rows.iter().enumerate() {
            let values = vec![
                Value::F32(*t),
                p.map_or(Value::Null, Value::F64),
                s.map_or(Value::Null, Value::I64),
                Value::Bool(*r),
                Value::Str((*mode).into()),
                Value::Str((*operator).into()),
                Value::Str(format!("SN-{i}")),
            ];
            w.push(Key::Str((*key).into()), T0 + i as i64, values).unwrap();
        }
    });
    snapshot_bundle(site, "pumps", version, spec, payload)
}

/// A signed snapshot bundle of the sites view: site 1 (load 0.75, 2 alarms), site 2.
fn sites_bundle(site: &Site) -> Vec<u8> {
    let view = FeatureView::from_toml(SITES).unwrap();
    let (spec, payload) = write(&view, 1, |w| {
        w.push(Key::Int(1), T0, vec![Value::F32(0.75), Value::I64(2)]).unwrap();
        w.push(Key::Int(2), T0, vec![Value::F32(0.25), Value::I64(0)]).unwrap();
    });
    snapshot_bundle(site, "sites", 1, spec, payload)
}

fn write(
    view: &FeatureView,
    view_version: u64,
    rows: impl FnOnce(&mut SnapshotWriter<Vec<u8>>),
) -> (SnapshotSpec, Vec<u8>) {
    let plan = pii::plan(view, None).unwrap();
    let spec =
        SnapshotSpec::new(view, view_version, &plan, Timestamp::from_unix(1_800_000_000), "all");
    let mut writer =
        SnapshotWriter::new(view, spec, plan, Some(Pseudonymiser::new(b"region key")), Vec::new())
            .unwrap();
    rows(&mut writer);
    writer.finish()
}

fn snapshot_bundle(
    site: &Site,
    name: &str,
    version: u64,
    spec: SnapshotSpec,
    payload: Vec<u8>,
) -> Vec<u8> {
    let created = Timestamp::from_system(now());
    let file = spec.file.clone();
    BundleBuilder::new(
        name,
        version,
        REGION,
        created,
        created.saturating_add(Duration::from_secs(3600)),
        Content::Features(spec),
    )
    .file(&file, payload)
    .build(&[&site.signer])
    .unwrap()
    .1
}

/// A random-weight MLP over `width` FP32 features, 3 classes.
fn model(width: usize) -> Vec<u8> {
    zoo::mlp(&[width, 3], 7)
}

/// A signed model bundle whose input comes from `view` (trained on `view_version`).
fn model_bundle(
    site: &Site,
    name: &str,
    model: &[u8],
    view: &str,
    view_version: u64,
    names: &[&str],
) -> Vec<u8> {
    let signature = OnnxModel::load(model).unwrap().signature().clone();
    let created = Timestamp::from_system(now());
    BundleBuilder::new(
        name,
        1,
        REGION,
        created,
        created.saturating_add(Duration::from_secs(3600)),
        Content::Model(ModelSpec {
            file: "model.onnx".into(),
            format: ModelFormat::Onnx,
            runtime: RuntimeHint::Cpu,
            signature,
            reference: None,
            features: Some(FeatureInput {
                view: view.into(),
                version: view_version,
                names: names.iter().map(|&n| n.to_owned()).collect(),
            }),
            lineage: None,
            shapes: BTreeMap::new(),
        }),
    )
    .file("model.onnx", model.to_vec())
    .build(&[&site.signer])
    .unwrap()
    .1
}

fn install(site: &Site, bundle: &[u8]) {
    let outcome = site.import_bytes(bundle, &ImportOptions::new(now())).unwrap();
    assert!(matches!(outcome, ImportOutcome::Installed { .. }), "{outcome:?}");
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, Json) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn post(client: &reqwest::Client, url: &str, body: &Json) -> (u16, Json) {
    let response = client.post(url).json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// The error message of a refused request, checked to have `status`.
fn error(answer: &(u16, Json), status: u16) -> String {
    assert_eq!(answer.0, status, "{}", answer.1);
    answer.1["error"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_snapshot_is_imported_and_looked_up() {
    let site = Site::new();
    install(&site, &pumps_bundle(&site, 1, 2, &pump_rows()));
    install(&site, &sites_bundle(&site));
    // Encryption at rest: the snapshots' tables lie on disk only sealed.
    let store = site.store();
    for installed in store.installed().unwrap() {
        let table = store.read_content(&installed).unwrap();
        let found = support::holding_a_window(&site.data_dir(), &table);
        assert!(found.is_empty(), "{} in plaintext in {found:?}", installed.manifest.name);
    }
    drop(store);
    let server = serve(&site, test_config()).await;
    let client = reqwest::Client::new();

    let (status, views) = get(&client, &server.url("/v1/features")).await;
    assert_eq!(status, 200, "{views}");
    let pumps = &views["views"][0];
    assert_eq!(pumps["name"], "pumps");
    assert_eq!(pumps["view_version"], 2);
    assert_eq!(pumps["version"], 1);
    assert_eq!(pumps["entities"], 3);
    assert_eq!(pumps["scope"], "all");
    assert_eq!(pumps["as_of"], Timestamp::from_unix(1_800_000_000).to_string());
    let names: Vec<&str> =
        pumps["features"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["temperature", "pressure", "starts", "running", "mode", "operator"]);
    assert_eq!(
        pumps["features"][5],
        json!({"name": "operator", "type": "string", "nullable": true, "pseudonymised": true})
    );
    assert_eq!(
        pumps["features"][0],
        json!({"name": "temperature", "type": "f32", "nullable": false, "pseudonymised": false})
    );
    assert_eq!(views["views"][1]["name"], "sites");

    let (status, one) = get(&client, &server.url("/v1/features/pumps/pump-001")).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["view"], "pumps");
    assert_eq!(one["view_version"], 2);
    assert_eq!(one["version"], 1);
    assert_eq!(one["entity"], "pump-001");
    assert_eq!(one["event_time"], format_time(T0));
    assert_eq!(one["defaulted"], false);
    let features = one["features"].as_object().unwrap();
    assert_eq!(features["temperature"], json!(71.5));
    assert_eq!(features["pressure"], json!(2.25));
    assert_eq!(features["starts"], json!(3));
    assert_eq!(features["running"], json!(true));
    assert_eq!(features["mode"], json!("auto"));
    let operator = features["operator"].as_str().unwrap();
    assert_ne!(operator, "ann", "personal data never leaves raw");
    assert!(operator.starts_with("p:") && operator.len() == 34, "{operator}");
    assert!(!features.contains_key("serial"), "a dropped feature is not served");

    // A null with a default is served the default; a null without one stays null.
    let (status, three) = get(&client, &server.url("/v1/features/pumps/pump-003")).await;
    assert_eq!(status, 200, "{three}");
    assert_eq!(three["features"]["starts"], json!(0));
    assert_eq!(three["features"]["temperature"], json!(80.25));
    assert_eq!(three["event_time"], format_time(T0 + 2));
    let (_, two) = get(&client, &server.url("/v1/features/pumps/pump-002")).await;
    assert_eq!(two["features"]["pressure"], Json::Null);
    assert_eq!(two["defaulted"], false);

    // An entity not held, where some feature has no default: 404 naming both.
    let message = error(&get(&client, &server.url("/v1/features/pumps/pump-999")).await, 404);
    assert!(message.contains("\"pump-999\"") && message.contains("\"pumps\""), "{message}");
    // An unknown view: 404 naming it.
    let message = error(&get(&client, &server.url("/v1/features/valves/v-1")).await, 404);
    assert!(message.contains("\"valves\""), "{message}");

    // Integer keys: held, missing (every feature has a default), and not an integer.
    let (status, site_one) = get(&client, &server.url("/v1/features/sites/1")).await;
    assert_eq!(status, 200, "{site_one}");
    assert_eq!(site_one["features"], json!({"load": 0.75, "alarms": 2}));
    let (status, missing) = get(&client, &server.url("/v1/features/sites/999")).await;
    assert_eq!(status, 200, "{missing}");
    assert_eq!(missing["defaulted"], true);
    assert_eq!(missing["event_time"], Json::Null);
    assert_eq!(missing["features"], json!({"load": 0.5, "alarms": 0}));
    let message = error(&get(&client, &server.url("/v1/features/sites/north")).await, 400);
    assert!(message.contains("must be i64") && message.contains("\"north\""), "{message}");

    server.stop().await;
}

#[tokio::test]
async fn a_new_snapshot_version_replaces_lookups() {
    let site = Site::new();
    install(&site, &pumps_bundle(&site, 1, 2, &pump_rows()));
    let server = serve(&site, test_config()).await;
    let client = reqwest::Client::new();
    let url = server.url("/v1/features/pumps/pump-001");
    let (_, before) = get(&client, &url).await;
    assert_eq!(before["features"]["temperature"], json!(71.5));

    let mut rows = pump_rows();
    rows[0].1 = 90.5;
    rows.remove(1);
    install(&site, &pumps_bundle(&site, 2, 2, &rows));
    server
        .reloaded("snapshot 2 of pumps", |c| {
            c.features.get("pumps").is_some_and(|v| v.version == 2)
        })
        .await;
    let (status, after) = get(&client, &url).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["version"], 2);
    assert_eq!(after["features"]["temperature"], json!(90.5));
    let (_, views) = get(&client, &server.url("/v1/features")).await;
    assert_eq!(views["views"][0]["version"], 2);
    assert_eq!(views["views"][0]["entities"], 2);
    let message = error(&get(&client, &server.url("/v1/features/pumps/pump-002")).await, 404);
    assert!(message.contains("pump-002"), "{message}");
    server.stop().await;
}

#[tokio::test]
async fn inference_by_entity_equals_inference_with_the_features_given() {
    let site = Site::new();
    let bytes = model(4);
    install(&site, &model_bundle(&site, "pump-fault", &bytes, "pumps", 2, &PUMP_INPUT));
    install(&site, &pumps_bundle(&site, 1, 2, &pump_rows()));
    let server = serve(&site, test_config()).await;
    let client = reqwest::Client::new();
    let url = server.url("/v2/models/pump-fault/infer");

    // pump-001 as stored; pump-003 with `starts` null, served its default 0.
    let rows: [[f32; 4]; 2] = [[71.5, 2.25, 3.0, 1.0], [80.25, 1.5, 0.0, 0.0]];
    let explicit = |rows: &[[f32; 4]]| {
        json!({"inputs": [{
            "name": zoo::INPUT, "shape": [rows.len(), 4], "datatype": "FP32",
            "data": rows.iter().flatten().copied().collect::<Vec<f32>>(),
        }]})
    };
    let (status, given) = post(&client, &url, &explicit(&rows[..1])).await;
    assert_eq!(status, 200, "{given}");
    let (status, by_entity) =
        post(&client, &url, &json!({"parameters": {"entity_id": "pump-001"}})).await;
    assert_eq!(status, 200, "{by_entity}");
    assert_eq!(by_entity["outputs"], given["outputs"], "the same input, the same answer");
    assert_eq!(by_entity["model_name"], "pump-fault");

    let (_, given) = post(&client, &url, &explicit(&rows)).await;
    let batch =
        json!({"id": "b", "inputs": [], "parameters": {"entity_ids": ["pump-001", "pump-003"]}});
    let (status, by_entities) =
        post(&client, &server.url("/v2/models/pump-fault/versions/1/infer"), &batch).await;
    assert_eq!(status, 200, "{by_entities}");
    assert_eq!(by_entities["id"], "b");
    assert_eq!(by_entities["parameters"]["entity_ids"], json!(["pump-001", "pump-003"]));
    assert_eq!(by_entities["outputs"][0]["shape"], json!([2, 3]));
    assert_eq!(by_entities["outputs"], given["outputs"]);

    // An explicit reference: tract on the same input.
    let direct = OnnxModel::load(&bytes)
        .unwrap()
        .run(vec![falaj_common::tensor::Tensor {
            shape: vec![2, 4],
            data: falaj_common::tensor::TensorData::Fp32(rows.iter().flatten().copied().collect()),
        }])
        .unwrap();
    let falaj_common::tensor::TensorData::Fp32(expected) = &direct[0].data else { panic!() };
    let got: Vec<f32> = by_entities["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(&got, expected);
    server.stop().await;
}

#[tokio::test]
async fn inference_by_entity_refusals_say_why() {
    let site = Site::new();
    // Installed before any snapshot of its view: 409.
    install(&site, &model_bundle(&site, "sites-model", &model(2), "sites", 1, &["load", "alarms"]));
    let server = serve(&site, test_config()).await;
    let client = reqwest::Client::new();
    let infer = |model: &str| server.url(&format!("/v2/models/{model}/infer"));
    let by = |id: Json| json!({"parameters": {"entity_id": id}});

    let message = error(&post(&client, &infer("sites-model"), &by(json!(1))).await, 409);
    assert!(message.contains("no snapshot of feature view \"sites\""), "{message}");

    install(&site, &sites_bundle(&site));
    install(&site, &pumps_bundle(&site, 1, 2, &pump_rows()));
    install(&site, &model_bundle(&site, "pump-fault", &model(4), "pumps", 2, &PUMP_INPUT));
    install(&site, &model_bundle(&site, "pump-old", &model(4), "pumps", 1, &PUMP_INPUT));
    let with_serial = ["temperature", "pressure", "serial"];
    install(&site, &model_bundle(&site, "pump-serial", &model(3), "pumps", 2, &with_serial));
    let with_mode = ["temperature", "mode"];
    install(&site, &model_bundle(&site, "pump-mode", &model(2), "pumps", 2, &with_mode));
    site.install("plain", 1, &model(4));
    server
        .reloaded("both views and the plain model", |c| {
            c.features.len() == 2 && c.models.contains_key("plain")
        })
        .await;

    // Integer entity ids, held and defaulted, are served.
    let (status, answer) = post(&client, &infer("sites-model"), &by(json!(1))).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = post(&client, &infer("sites-model"), &by(json!(999))).await;
    assert_eq!(status, 200, "{answer}");

    let message = error(&post(&client, &infer("plain"), &by(json!("pump-001"))).await, 400);
    assert!(message.contains("does not take its input from a feature view"), "{message}");

    let both = json!({
        "inputs": [{"name": zoo::INPUT, "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}],
        "parameters": {"entity_id": "pump-001"},
    });
    let message = error(&post(&client, &infer("pump-fault"), &both).await, 400);
    assert!(message.contains("not both"), "{message}");

    let message = error(&post(&client, &infer("pump-old"), &by(json!("pump-001"))).await, 409);
    assert!(
        message.contains("version 1") && message.contains("version 2") && message.contains("skew"),
        "{message}"
    );

    let message = error(&post(&client, &infer("pump-serial"), &by(json!("pump-001"))).await, 409);
    assert!(message.contains("\"serial\"") && message.contains("not in the snapshot"), "{message}");

    let message = error(&post(&client, &infer("pump-mode"), &by(json!("pump-001"))).await, 409);
    assert!(message.contains("\"mode\"") && message.contains("text"), "{message}");

    let message = error(&post(&client, &infer("pump-fault"), &by(json!("pump-999"))).await, 404);
    assert!(message.contains("\"pump-999\"") && message.contains("\"pumps\""), "{message}");

    let message = error(&post(&client, &infer("pump-fault"), &by(json!("pump-002"))).await, 422);
    assert!(message.contains("\"pressure\"") && message.contains("no default"), "{message}");

    let message = error(&post(&client, &infer("sites-model"), &by(json!("north"))).await, 400);
    assert!(message.contains("must be i64"), "{message}");

    let message = error(&post(&client, &infer("pump-fault"), &by(json!(1.5))).await, 400);
    assert!(message.contains("entity id"), "{message}");

    // Refusals are counted like any other refused request; the server still answers.
    let (status, _) = post(&client, &infer("pump-fault"), &by(json!("pump-001"))).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn a_damaged_snapshot_is_reported_and_not_served() {
    let site = Site::new();
    install(&site, &pumps_bundle(&site, 1, 2, &pump_rows()));
    let path = site.store().installed().unwrap()[0].path.clone();
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let server = serve(&site, test_config()).await;
    let client = reqwest::Client::new();
    let (status, views) = get(&client, &server.url("/v1/features")).await;
    assert_eq!(status, 200);
    let error_text = views["views"][0]["error"].as_str().unwrap();
    assert!(error_text.contains("damaged"), "{views}");
    let message = error(&get(&client, &server.url("/v1/features/pumps/pump-001")).await, 503);
    assert!(message.contains("not loaded"), "{message}");
    let status = client.get(server.url("/v2/health/ready")).send().await.unwrap().status();
    assert_eq!(status, 503, "not ready while an active snapshot is not served");
    server.stop().await;
}

/// Installed rows (name, version, active) and every file under the data directory except
/// the database, with its content.
type State = (Vec<(String, u64, bool)>, BTreeMap<String, Vec<u8>>);

/// Everything an import could change.
fn state(site: &Site) -> State {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                walk(&path, root, out);
            } else if !rel.starts_with("agent.db") {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let rows = site
        .store()
        .installed()
        .unwrap()
        .into_iter()
        .map(|i| (i.manifest.name, i.manifest.version, i.active))
        .collect();
    let mut files = BTreeMap::new();
    walk(&site.data_dir(), &site.data_dir(), &mut files);
    (rows, files)
}

fn refused_untouched(site: &Site, bundle: &[u8]) -> ImportError {
    let before = state(site);
    let err = site.import_bytes(bundle, &ImportOptions::new(now())).unwrap_err();
    assert_eq!(state(site), before, "refused import changed state: {err}");
    assert!(err.is_refusal(), "{err}");
    err
}

#[test]
fn a_snapshot_that_does_not_fit_its_manifest_is_refused() {
    let site = Site::new();
    install(&site, &pumps_bundle(&site, 1, 2, &pump_rows()));
    let view = FeatureView::from_toml(PUMPS).unwrap();
    let rows = |w: &mut SnapshotWriter<Vec<u8>>| {
        let values = vec![
            Value::F32(1.0),
            Value::Null,
            Value::Null,
            Value::Bool(true),
            Value::Str("auto".into()),
            Value::Null,
            Value::Str("SN".into()),
        ];
        w.push(Key::Str("pump-001".into()), T0, values).unwrap();
    };

    // More entities claimed than the payload holds.
    let (mut spec, payload) = write(&view, 2, rows);
    spec.entities = 5;
    let err = refused_untouched(&site, &snapshot_bundle(&site, "pumps", 2, spec, payload));
    assert!(matches!(err, ImportError::BadSnapshot { version: 2, .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("feature snapshot pumps version 2"), "{message}");
    assert!(message.contains("1 rows, the manifest says 5"), "{message}");

    // A manifest claiming a feature the payload does not carry.
    let (mut spec, payload) = write(&view, 2, rows);
    spec.features[0].name = "humidity".into();
    let err = refused_untouched(&site, &snapshot_bundle(&site, "pumps", 2, spec, payload));
    assert!(err.to_string().contains("differ from the manifest"), "{err}");

    // Not a snapshot payload at all.
    let (spec, _) = write(&view, 2, rows);
    let err = refused_untouched(&site, &snapshot_bundle(&site, "pumps", 2, spec, vec![7; 64]));
    assert!(err.to_string().contains("does not decode"), "{err}");

    // A snapshot bundle named other than its view.
    let (spec, payload) = write(&view, 2, rows);
    let err = refused_untouched(&site, &snapshot_bundle(&site, "valves", 1, spec, payload));
    assert!(err.to_string().contains("named after its view"), "{err}");

    // The good one still installs after all that.
    let (spec, payload) = write(&view, 2, rows);
    install(&site, &snapshot_bundle(&site, "pumps", 2, spec, payload));
}

#[test]
fn a_name_keeps_its_kind() {
    let site = Site::new();
    install(&site, &pumps_bundle(&site, 1, 2, &pump_rows()));
    let model_named_pumps = site.bundle("pumps", 2, &model(4));
    let err = refused_untouched(&site, &model_named_pumps);
    assert!(matches!(&err, ImportError::KindChange { version: 2, .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("pumps version 2 is a model bundle")
            && message.contains("are features bundles"),
        "{message}"
    );

    site.install("fault", 1, &model(4));
    let view = FeatureView::from_toml(PUMPS).unwrap();
    let (mut spec, payload) = write(&view, 2, |_| {});
    spec.view = "fault".into();
    let err = refused_untouched(&site, &snapshot_bundle(&site, "fault", 2, spec, payload));
    assert!(err.to_string().contains("is a features bundle"), "{err}");
}

/// Fine-tuning data given as entity ids is joined to the snapshot exactly as inference by
/// entity assembles inputs: the same rows as a file with the features written out.
#[test]
fn fine_tuning_data_by_entity_id_is_joined_to_the_snapshot() {
    use falaj_agent::finetune::{self, DataSource, Job, Quiet};
    let site = Site::new();
    install(&site, &model_bundle(&site, "pump-fault", &model(4), "pumps", 2, &PUMP_INPUT));
    install(&site, &pumps_bundle(&site, 1, 2, &pump_rows()));
    let dir = site.dir.path();
    let (mut by_entity, mut explicit) =
        ("pump_id,label\n".to_owned(), PUMP_INPUT.join(",") + ",label\n");
    for _ in 0..10 {
        // pump-003's `starts` is null: its default, 0.
        by_entity += "pump-001,0\npump-003,2\n";
        explicit += "71.5,2.25,3,1,0\n80.25,1.5,0,0,2\n";
    }
    std::fs::write(dir.join("entity.csv"), &by_entity).unwrap();
    std::fs::write(dir.join("explicit.csv"), &explicit).unwrap();
    let job = |file: &str, entity: Option<&str>| Job {
        model: "pump-fault".into(),
        version: None,
        data: DataSource {
            file: dir.join(file),
            label: "label".into(),
            features: None,
            entity: entity.map(str::to_owned),
        },
        hyperparameters: falaj_common::finetune::Hyperparameters {
            max_epochs: 2,
            ..Default::default()
        },
        gate: falaj_common::finetune::Gate::default(),
        engine: finetune::TrainEngine::Cpu,
    };
    let mut store = site.store();
    let gpu = falaj_gpu::GpuOptions::default();
    let joined =
        finetune::run(&mut store, &job("entity.csv", Some("pump_id")), gpu, now(), &mut Quiet)
            .unwrap();
    let written =
        finetune::run(&mut store, &job("explicit.csv", None), gpu, now(), &mut Quiet).unwrap();
    assert_eq!(joined.lineage.data_sha256, written.lineage.data_sha256);
    assert_eq!((joined.name.as_str(), written.name.as_str()), ("pump-fault.ft1", "pump-fault.ft2"));

    // pump-002's pressure is null without a default; pump-009 is not held.
    for (row, why) in [("pump-002,1", "pump-002"), ("pump-009,1", "pump-009")] {
        std::fs::write(dir.join("entity.csv"), format!("{by_entity}{row}\n")).unwrap();
        let err =
            finetune::run(&mut store, &job("entity.csv", Some("pump_id")), gpu, now(), &mut Quiet)
                .unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
    }
    assert_eq!(store.installed().unwrap().len(), 4, "two models, a snapshot, no more");
}

/// A snapshot file tampered with on disk is refused at load by its GCM tags, reported as
/// unreadable (so a managed one is fetched again at the next sync, as a model is), read
/// again at the next reload rather than kept refused, and its lookups are refused.
#[tokio::test]
async fn a_tampered_snapshot_is_refused_and_marked_unreadable() {
    let site = Site::new();
    install(&site, &pumps_bundle(&site, 1, 2, &pump_rows()));
    let store = site.store();
    let path = store.installed().unwrap()[0].path.clone();
    drop(store);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();

    let server = serve(&site, test_config()).await;
    server
        .reloaded("the snapshot marked unreadable", |c| {
            c.unreadable().iter().any(|(name, version, reason)| {
                name == "pumps" && *version == 1 && reason.contains("failed authentication")
            })
        })
        .await;
    let client = reqwest::Client::new();
    let refused = get(&client, &server.url("/v1/features/pumps/pump-001")).await;
    assert_ne!(refused.0, 200, "{}", refused.1);
    assert!(refused.1.to_string().contains("failed authentication"), "{}", refused.1);
    server.stop().await;
}
