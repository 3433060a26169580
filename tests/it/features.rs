//! The feature store end to end: a view applied, readings ingested through the CLI, a
//! snapshot built, signed and deployed with a model that names the view, and an agent that
//! serves lookups and predictions by entity id; then a small update whose snapshot moves
//! few chunks, and a training export.

// One story, told in order; the values must round-trip exactly.
#![allow(clippy::too_many_lines, clippy::float_cmp)]

use crate::fleet;
use crate::support;

use std::time::{Duration, SystemTime};

use falaj_common::bundle::{FeatureInput, RuntimeHint};
use falaj_common::sample::FEATURES;
use falaj_control::bundle::{self, BuildOptions};
use falaj_control::sample::{INPUT, pump_id, pump_view, write_pump_readings};
use fleet::{Control, eventually};
use serde_json::{Value, json};

const GROUP: &str = "plant-a";
const VIEW: &str = "pump-sensors";
const MODEL: &str = "pump-fault";
const PUMPS: usize = 3000;
const START: i64 = 1_790_000_000_000_000;

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshots_reach_agents_and_serve_predictions_by_entity() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let control = Control::start(&work.join("control")).await;
    let api = |mut args: Vec<String>| {
        args.extend([
            "--control-plane".into(),
            control.client.base().to_owned(),
            "--data-dir".into(),
            control.dir.display().to_string(),
        ]);
        args
    };
    let args = |s: &[&str]| api(s.iter().map(|a| (*a).to_owned()).collect());

    // The view, through the CLI.
    let view_file = work.join("pump-sensors.toml");
    std::fs::write(&view_file, pump_view()).unwrap();
    let out =
        support::falaj_async(args(&["control", "features", "apply", view_file.to_str().unwrap()]))
            .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("created pump-sensors: version 1, revision 1"), "{stdout}");

    // Three hourly readings per pump, and a file with one bad row refused whole.
    let readings = work.join("readings.csv");
    write_pump_readings(&readings, PUMPS, 3, START, 11).unwrap();
    let out = support::falaj_async(args(&[
        "control",
        "features",
        "ingest",
        VIEW,
        readings.to_str().unwrap(),
    ]))
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains(&format!("ingested {} rows", 3 * PUMPS)), "{stdout}");
    let bad = work.join("bad.csv");
    let mut body = std::fs::read_to_string(&readings).unwrap();
    body.push_str("pump-9,2026-01-01T00:00:00Z,plant-z,,1,1,1,1,1,1,1,1\n");
    std::fs::write(&bad, body).unwrap();
    let out =
        support::falaj_async(args(&["control", "features", "ingest", VIEW, bad.to_str().unwrap()]))
            .await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains(&format!("1 of {} rows are invalid", 3 * PUMPS + 1)), "{stderr}");
    assert!(stderr.contains("site") && stderr.contains("\"plant-z\""), "{stderr}");
    let shown = control.client.view(VIEW).await.unwrap();
    assert_eq!(shown.rows, 3 * PUMPS as u64, "the refused file added nothing");

    // Snapshot 1: the technician is hashed by the view's policy.
    let built = control.client.snapshot(VIEW, &json!({})).await.unwrap();
    assert_eq!(built.bundle.version, 1);
    assert_eq!(built.snapshot.entities, PUMPS as u64);
    assert_eq!(built.snapshot.pseudonymised, ["technician"]);

    // The sample model, fed from the view's sensor features.
    let model = fleet::sample_model(work);
    let model_bundle = work.join("pump-fault-1.falaj");
    bundle::build(
        &BuildOptions {
            keys: control.dir.join("keys"),
            model: model.clone(),
            name: MODEL.into(),
            version: 1,
            reference: None,
            runtime: RuntimeHint::Cpu,
            lifetime: bundle::DEFAULT_LIFETIME,
            out: model_bundle.clone(),
            features: Some(FeatureInput {
                view: VIEW.into(),
                version: 1,
                names: FEATURES.iter().map(|f| (*f).to_owned()).collect(),
            }),
            shapes: std::collections::BTreeMap::new(),
        },
        SystemTime::now(),
    )
    .unwrap();
    control.client.push_bundle(&model_bundle).await.unwrap();
    control.client.deploy(GROUP, VIEW, 1).await.unwrap();
    control.client.deploy(GROUP, MODEL, 1).await.unwrap();
    let agent = control.agent(work, "site", GROUP).await;
    let http = reqwest::Client::new();
    let lookup = |id: String| {
        let (http, url) = (http.clone(), agent.url(&format!("/v1/features/{VIEW}/{id}")));
        async move {
            let response = http.get(url).send().await.ok()?;
            response.status().is_success().then_some(())?;
            response.json::<Value>().await.ok()
        }
    };
    eventually(Duration::from_secs(60), "the snapshot is served", || async {
        lookup(pump_id(7)).await.is_some() && agent.active_version(MODEL).await.is_some()
    })
    .await;

    // Pump 7's values are its latest readings (the third hour).
    let readings_of = |pump: usize, hour: usize| -> Vec<f32> {
        let data = falaj_common::sample::generate(PUMPS * 3, 11, &[]);
        data.row(hour * PUMPS + pump).to_vec()
    };
    let found = lookup(pump_id(7)).await.unwrap();
    let latest = readings_of(7, 2);
    for (name, value) in FEATURES.iter().zip(&latest) {
        assert_eq!(found["features"][name].as_f64().unwrap() as f32, *value, "{name}");
    }
    let technician = found["features"]["technician"].as_str().unwrap();
    assert!(technician.starts_with("p:"), "raw personal data on the agent: {technician}");
    // A pump the update below leaves alone, to follow its pseudonym across a key rotation.
    let quiet = pump_id(PUMPS - 1);
    let before_rotation = lookup(quiet.clone()).await.unwrap()["features"]["technician"].clone();
    assert!(found["features"].get("technician__pii_v1").is_none(), "no rotation yet: {found}");

    // A prediction by entity id equals one given the same values.
    let infer = |body: Value| {
        let (http, url) = (http.clone(), agent.url(&format!("/v2/models/{MODEL}/infer")));
        async move {
            let response = http.post(url).json(&body).send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let (status, by_id) = infer(json!({"parameters": {"entity_id": pump_id(7)}})).await;
    assert_eq!(status, 200, "{by_id}");
    let (_, given) = infer(
        json!({"inputs": [{"name": INPUT, "shape": [1, 8], "datatype": "FP32", "data": latest}]}),
    )
    .await;
    assert_eq!(by_id["outputs"], given["outputs"]);
    let (status, missing) = infer(json!({"parameters": {"entity_id": "pump-999999"}})).await;
    assert_eq!(status, 404, "{missing}");

    // An hour later, a tenth of the pumps report again: the next snapshot reuses most
    // chunks of the last.
    let update = work.join("update.csv");
    write_pump_readings(&update, PUMPS / 10, 1, START + 3 * 3_600_000_000, 12).unwrap();
    control.client.ingest(VIEW, &update).await.unwrap();
    let second = control.client.snapshot(VIEW, &json!({})).await.unwrap();
    let (chunks, new) = (second.bundle.chunks, second.new_chunks);
    assert!(new < chunks, "every chunk of the snapshot is new ({new} of {chunks})");
    control.client.deploy(GROUP, VIEW, 2).await.unwrap();
    let updated = falaj_common::sample::generate(PUMPS / 10, 12, &[]).row(7).to_vec();
    eventually(Duration::from_secs(60), "the new snapshot is served", || async {
        lookup(pump_id(7)).await.is_some_and(|f| f["version"] == 2)
    })
    .await;
    let found = lookup(pump_id(7)).await.unwrap();
    assert_eq!(found["features"][FEATURES[0]].as_f64().unwrap() as f32, updated[0]);

    // A training export: labels between the first and the second hour get the first
    // hour's readings, never later ones.
    let labels = work.join("labels.csv");
    let at = falaj_common::features::value::format_time(START + 5_400_000_000);
    std::fs::write(&labels, format!("pump_id,event_time,failed\n{},{at},1\n", pump_id(7))).unwrap();
    let out_file = work.join("train.csv");
    let out = support::falaj_async(args(&[
        "control",
        "features",
        "export",
        VIEW,
        "--labels",
        labels.to_str().unwrap(),
        "--out",
        out_file.to_str().unwrap(),
    ]))
    .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("wrote 1 rows"), "{stdout}");
    let exported = std::fs::read_to_string(&out_file).unwrap();
    let row: Vec<&str> = exported.lines().nth(1).unwrap().split(',').collect();
    let header: Vec<&str> = exported.lines().next().unwrap().split(',').collect();
    let column = header.iter().position(|h| *h == FEATURES[0]).unwrap();
    assert_eq!(row[column].parse::<f32>().unwrap(), readings_of(7, 1)[0]);

    // The record of what left: both snapshots, with what was pseudonymised.
    let shown = control.client.view(VIEW).await.unwrap();
    assert_eq!(shown.snapshots.len(), 2);
    let out = support::falaj_async(args(&["control", "features", "show", VIEW])).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("view pump-sensors version 1 revision 1"), "{stdout}");
    let snapshot_lines: Vec<&str> =
        stdout.lines().filter(|l| l.trim_start().starts_with('v')).collect();
    assert!(
        snapshot_lines
            .iter()
            .any(|l| l.contains(&format!("{PUMPS} entities"))
                && l.contains("pseudonymised: technician")),
        "{stdout}"
    );

    // Meanwhile the PII key is rotated, with a week's overlap.
    let out =
        support::falaj_async(args(&["control", "features", "rotate-pii-key", "--overlap", "7d"]))
            .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.starts_with("PII key version 2 is current"), "{stdout}");
    assert!(stdout.contains("version 1's pseudonyms beside it until"), "{stdout}");
    let out = support::falaj_async(args(&["control", "features", "pii-keys"])).await;
    let (stdout, _) = text(&out);
    let key_states: Vec<&str> =
        stdout.lines().skip(1).map(|l| l.split_whitespace().nth(2).unwrap_or("")).collect();
    assert_eq!(key_states, ["current", "in"], "{stdout}");
    // Two snapshots asked at once, of every pump and of two: each gets its own version,
    // and the record of each says what its bundle carries.
    let (all, two) = (json!({}), json!({"entities": [pump_id(1), pump_id(2)]}));
    let (every, some) =
        tokio::join!(control.client.snapshot(VIEW, &all), control.client.snapshot(VIEW, &two));
    let (every, some) = (every.unwrap(), some.unwrap());
    let mut versions = [&every, &some].map(|b| b.bundle.version).to_vec();
    versions.sort_unstable();
    assert_eq!(versions, [3, 4], "{every:?} {some:?}");
    assert_eq!((every.snapshot.entities, some.snapshot.entities), (PUMPS as u64, 2));
    let shown = control.client.view(VIEW).await.unwrap();
    for built in [&every, &some] {
        let version = built.bundle.version;
        let carried = &built.snapshot;
        let record = shown
            .snapshots
            .iter()
            .find(|r| r.version == version)
            .unwrap_or_else(|| panic!("no record of snapshot {version}: {shown:?}"));
        assert_eq!(
            (record.entities, &record.scope, &record.pseudonymised),
            (carried.entities, &carried.scope, &carried.pseudonymised),
            "{shown:?}"
        );
    }

    // Both were made after the rotation: each pseudonym under the new key, and under the
    // old one beside it, so data pseudonymised before still joins.
    assert_eq!(every.snapshot.pseudonymised, ["technician", "technician__pii_v1"], "{every:?}");
    assert_eq!(every.snapshot.pii_keys, [1, 2].into(), "{every:?}");
    let version = every.bundle.version;
    control.client.deploy(GROUP, VIEW, version).await.unwrap();
    eventually(Duration::from_secs(60), "the snapshot after the rotation is served", || async {
        lookup(quiet.clone()).await.is_some_and(|f| f["version"] == version)
    })
    .await;
    let rotated = lookup(quiet).await.unwrap();
    assert_ne!(rotated["features"]["technician"], before_rotation, "{rotated}");
    assert_eq!(rotated["features"]["technician__pii_v1"], before_rotation, "{rotated}");
}
