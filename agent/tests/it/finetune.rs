//! Fine-tuning through `falaj-agent finetune` (the real binary) on a site's CSV: a site whose
//! sensors read offset gets a derived model that beats its parent there and serves in its
//! place, through the same API, on tract and on the GPU engine; at a site like the
//! parent's, the gate keeps the parent; bad jobs are refused with the reason and change
//! nothing.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use falaj_agent::engine::EngineConfig;
use falaj_agent::server::ServeConfig;
use falaj_common::bundle::{Policy, verify};
use falaj_common::finetune::Objective;
use falaj_common::onnx::{head, mlp_classifier};
use falaj_common::sample::{self, CLASSES, Dataset, FEATURE_COUNT, Shift};
use falaj_common::train::{TrainConfig, train_classifier};
use serde_json::{Value, json};
use support::{Site, datatypes_model, now, serve, test_config};

const SHIFT: [Shift; 2] = [Shift { feature: 1, offset: 2.5 }, Shift { feature: 0, offset: 9.0 }];

/// The parent: an MLP (8 → 16 → 3) trained at a site without offsets.
fn parent_model() -> Vec<u8> {
    let data = sample::generate(6_000, 21, &[]);
    let config = TrainConfig { hidden: vec![16], max_epochs: 20, ..TrainConfig::default() };
    let (mlp, _) = train_classifier(&data.features, FEATURE_COUNT, &data.labels, 3, &config);
    mlp_classifier(&mlp, "sensors", "test")
}

fn write_csv(path: &Path, data: &Dataset) {
    std::fs::write(path, sample::csv(&data.features, Some(&data.labels))).unwrap();
}

fn finetune(site: &Site, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_falaj-agent"))
        .arg("finetune")
        .args(args)
        .arg("--data-dir")
        .arg(site.data_dir())
        .env_remove("FALAJ_AGENT_CONFIG")
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Accuracy of the served labels for `data`, and the model that answered.
async fn served_accuracy(server: &support::Running, path: &str, data: &Dataset) -> (f64, String) {
    let body = json!({"inputs": [{
        "name": "sensors", "shape": [data.len(), FEATURE_COUNT], "datatype": "FP32",
        "data": data.features,
    }]});
    let response: Value = reqwest::Client::new()
        .post(server.url(path))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let outputs = response["outputs"].as_array().unwrap_or_else(|| panic!("{response}"));
    let labels = outputs.iter().find(|o| o["name"] == "label").unwrap()["data"].as_array().unwrap();
    let right = labels
        .iter()
        .zip(&data.labels)
        .filter(|(l, want)| l.as_u64() == Some(u64::from(**want)))
        .count();
    (right as f64 / data.len() as f64, response["model_name"].as_str().unwrap().to_owned())
}

fn staging_is_empty(site: &Site) -> bool {
    let staging: PathBuf = site.data_dir().join("staging");
    std::fs::read_dir(staging).map_or(true, |mut d| d.next().is_none())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shifted_site_gets_a_derived_model_that_beats_its_parent_and_serves_in_its_place() {
    let site = Site::new();
    site.install("pumps", 1, &parent_model());
    let mut data = sample::generate(8_000, 22, &SHIFT);
    let unseen = data.split_off(2_000);
    let csv = site.dir.path().join("site.csv");
    write_csv(&csv, &data);

    let out =
        finetune(&site, &["--model", "pumps", "--data", csv.to_str().unwrap(), "--label", "label"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("EPOCH") && text.contains("ACCURACY"), "the epoch table: {text}");
    assert!(text.contains("activated: pumps.ft1 now serves requests for pumps"), "{text}");

    // The derived bundle: unmanaged, unsigned, with its lineage.
    let store = site.store();
    let installed = store.installed().unwrap();
    let parent = installed.iter().find(|i| i.manifest.name == "pumps").unwrap();
    let derived = installed.iter().find(|i| i.manifest.name == "pumps.ft1").unwrap();
    assert!(derived.active && !derived.managed);
    assert_eq!(derived.manifest.version, 1, "at its parent's version");
    let lineage = derived.manifest.model().unwrap().lineage.clone().unwrap();
    assert_eq!((lineage.parent.as_str(), lineage.parent_version), ("pumps", 1));
    assert_eq!(lineage.parent_manifest_sha256, parent.manifest_sha256);
    assert_eq!(lineage.objective, Objective::CrossEntropy);
    assert_eq!((lineage.train_rows, lineage.held_out_rows), (4_800, 1_200));
    assert_eq!(lineage.engine, "cpu");
    let (before, after) = (lineage.before.accuracy.unwrap(), lineage.after.accuracy.unwrap());
    assert!(after > before + 0.05, "held out: {before:.3} -> {after:.3}");
    assert!(lineage.gate.activate && lineage.epochs.len() as u32 >= lineage.best_epoch);
    let bytes = store.open_bundle(derived).unwrap();
    let refused = verify(&bytes, &site.trust, &Policy::new(support::REGION, now())).unwrap_err();
    assert!(refused.to_string().contains("signature"), "{refused}");
    // Encryption at rest: the derived model lies on disk only sealed.
    let weights = store.read_content(derived).unwrap();
    let found = support::holding_a_window(&site.data_dir(), &weights);
    assert!(found.is_empty(), "the derived model in plaintext in {found:?}");
    assert!(staging_is_empty(&site));
    let list = Command::new(env!("CARGO_BIN_EXE_falaj-agent"))
        .args(["list", "--data-dir"])
        .arg(site.data_dir())
        .output()
        .unwrap();
    assert!(
        stdout(&list).contains(
            "pumps.ft1@1: derived on this site from pumps@1 (unsigned); serves requests for pumps"
        ),
        "{}",
        stdout(&list)
    );

    // Served through the same API: the parent's name answers with the derived model, which
    // beats the parent on rows neither saw; the parent still answers by version. The GPU
    // engine (lavapipe here) loads the derived model too.
    let config = ServeConfig {
        engine: EngineConfig { allow_software_gpu: true, ..EngineConfig::default() },
        ..test_config()
    };
    let server = serve(&site, config).await;
    let (tuned, by) = served_accuracy(&server, "/v2/models/pumps/infer", &unseen).await;
    assert_eq!(by, "pumps.ft1");
    let (parent, by) = served_accuracy(&server, "/v2/models/pumps/versions/1/infer", &unseen).await;
    assert_eq!(by, "pumps");
    assert!(tuned > parent + 0.05, "unseen shifted rows: parent {parent:.3}, derived {tuned:.3}");
    let parent_meta: Value =
        reqwest::get(server.url("/v2/models/pumps")).await.unwrap().json().await.unwrap();
    assert_eq!(parent_meta["parameters"]["served_by"], "pumps.ft1", "{parent_meta}");
    let meta: Value =
        reqwest::get(server.url("/v2/models/pumps.ft1")).await.unwrap().json().await.unwrap();
    assert_eq!(meta["parameters"]["derived_from"], "pumps@1", "{meta}");
    let engine = meta["parameters"]["engines"]["1"].as_str().unwrap().to_owned();
    if std::env::var_os("FALAJ_REQUIRE_GPU").is_some() {
        assert_eq!(engine, "wgpu-gpu", "{meta}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn at_a_site_like_the_parents_the_gate_keeps_the_parent() {
    let site = Site::new();
    site.install("pumps", 1, &parent_model());
    let mut data = sample::generate(6_000, 23, &[]);
    let unseen = data.split_off(1_000);
    let csv = site.dir.path().join("site.csv");
    write_csv(&csv, &data);
    // Given as a job file, as an air-gapped site would be.
    let job = site.dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "model = \"pumps\"\nversion = 1\n[data]\nfile = {:?}\nlabel = \"label\"\n\
             [hyperparameters]\nmax_epochs = 10\nseed = 5\n[gate]\nmin_improvement = 0.02\n",
            csv.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = finetune(&site, &["--job", job.to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("installed pumps.ft1 inactive"), "{text}");
    assert!(text.contains("less than the 0.02 required; the parent stays"), "{text}");
    let store = site.store();
    assert!(store.overlays().unwrap().is_empty());
    let derived =
        store.installed().unwrap().into_iter().find(|i| i.manifest.name == "pumps.ft1").unwrap();
    let lineage = derived.manifest.model().unwrap().lineage.clone().unwrap();
    assert_eq!(lineage.hyperparameters.seed, 5);
    assert!(!lineage.gate.activate);

    let server = serve(&site, test_config()).await;
    let (_, by) = served_accuracy(&server, "/v2/models/pumps/infer", &unseen).await;
    assert_eq!(by, "pumps", "the parent keeps serving its name");
    let meta: Value =
        reqwest::get(server.url("/v2/models/pumps")).await.unwrap().json().await.unwrap();
    assert!(meta["parameters"]["served_by"].is_null(), "{meta}");
    let (_, by) = served_accuracy(&server, "/v2/models/pumps.ft1/infer", &unseen).await;
    assert_eq!(by, "pumps.ft1", "the derived model answers by its own name");
    server.stop().await;
}

#[test]
fn bad_jobs_are_refused_with_the_reason_and_change_nothing() {
    let site = Site::new();
    site.install("pumps", 1, &parent_model());
    site.install("types", 1, &datatypes_model());
    let data = sample::generate(200, 24, &[]);
    let csv = site.dir.path().join("site.csv");
    write_csv(&csv, &data);
    let path = csv.to_str().unwrap();
    let before = site.store().installed().unwrap().len();

    let refused = |args: &[&str], why: &str| {
        let out = finetune(&site, args);
        assert_eq!(out.status.code(), Some(65), "{args:?}: {}{}", stdout(&out), stderr(&out));
        assert!(stderr(&out).contains(why), "{args:?}: {}", stderr(&out));
    };
    refused(&["--model", "types", "--data", path, "--label", "label"], "no final dense layer");
    refused(
        &["--model", "pumps@7", "--data", path, "--label", "label"],
        "version 7 is not installed",
    );
    refused(&["--model", "pumps", "--data", path, "--label", "class"], "no column \"class\"");
    refused(
        &["--model", "pumps", "--data", path, "--label", "label", "--features", "temperature_c"],
        "1 feature columns, but the model takes 8 features per row",
    );
    // One bad cell, and a label that is no class.
    let mut text = std::fs::read_to_string(&csv).unwrap();
    text = text.replacen('\n', "\nx", 2).replacen("\nx", "\n", 1);
    std::fs::write(&csv, &text).unwrap();
    refused(&["--model", "pumps", "--data", path, "--label", "label"], "row 2, column");
    let mut bad_label = sample::generate(20, 25, &[]);
    bad_label.labels[3] = CLASSES.len() as u32;
    write_csv(&csv, &bad_label);
    refused(
        &["--model", "pumps", "--data", path, "--label", "label"],
        "row 4: label 3 is not a class index below 3",
    );

    let out = finetune(
        &site,
        &["--model", "pumps", "--data", path, "--label", "label", "--learning-rate", "0"],
    );
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("learning_rate must be above 0"), "{}", stderr(&out));

    assert_eq!(site.store().installed().unwrap().len(), before);
    assert!(staging_is_empty(&site));
}

/// The same job on the GPU engine (lavapipe here) gives the CPU's head to float32
/// tolerance: the two derived models agree.
#[test]
fn the_gpu_trains_the_same_head_as_the_cpu() {
    let site = Site::new();
    site.install("pumps", 1, &parent_model());
    let data = sample::generate(3_000, 26, &SHIFT);
    let csv = site.dir.path().join("site.csv");
    write_csv(&csv, &data);
    let config = site.dir.path().join("agent.toml");
    std::fs::write(&config, "[engine]\nallow_software_gpu = true\n").unwrap();
    let job = ["--model", "pumps", "--data", csv.to_str().unwrap(), "--label", "label"];
    let epochs = ["--epochs", "5", "--patience", "5", "--config", config.to_str().unwrap()];
    let cpu = finetune(&site, &[&job[..], &epochs, &["--engine", "cpu"]].concat());
    assert!(cpu.status.success(), "{}", stderr(&cpu));
    let gpu = finetune(&site, &[&job[..], &epochs, &["--engine", "gpu"]].concat());
    if !gpu.status.success() && std::env::var_os("FALAJ_REQUIRE_GPU").is_none() {
        assert!(stderr(&gpu).contains("no GPU"), "{}", stderr(&gpu));
        return;
    }
    assert!(gpu.status.success(), "{}", stderr(&gpu));

    let store = site.store();
    let derived = |name: &str| {
        let installed = store.installed().unwrap().into_iter().find(|i| i.manifest.name == name);
        let installed = installed.unwrap();
        let lineage = installed.manifest.model().unwrap().lineage.clone().unwrap();
        let head = head::find(&store.read_content(&installed).unwrap()).unwrap();
        (lineage, head)
    };
    let (cpu, cpu_head) = derived("pumps.ft1");
    let (gpu, gpu_head) = derived("pumps.ft2");
    assert_eq!((cpu.engine.as_str(), gpu.engine.as_str()), ("cpu", "gpu"));
    assert_eq!(cpu.data_sha256, gpu.data_sha256);
    assert_eq!(cpu.best_epoch, gpu.best_epoch);
    for (a, b) in cpu_head
        .weights
        .iter()
        .chain(&cpu_head.bias)
        .zip(gpu_head.weights.iter().chain(&gpu_head.bias))
    {
        assert!((a - b).abs() <= 1e-4 + 1e-3 * a.abs(), "cpu {a} vs gpu {b}");
    }
    for (c, g) in cpu.epochs.iter().zip(&gpu.epochs) {
        assert!((c.train_loss - g.train_loss).abs() <= 1e-4 * c.train_loss, "{c:?} vs {g:?}");
    }
}

/// A regressor (its head feeds the output directly) trains against squared error: the
/// site's targets follow another relation than the parent's, and the derived model
/// learns it.
#[test]
fn a_regressor_is_fine_tuned_against_squared_error() {
    use falaj_common::onnx::{Attr, GraphBuilder};
    use falaj_common::random::SeededRng;
    use falaj_common::tensor::{DataType, Dim};
    let n = || Dim::Symbol("N".into());
    let mut g = GraphBuilder::new("regressor");
    g.input("x", DataType::Fp32, &[n(), Dim::Fixed(2)]);
    // A backbone that passes |x| on: relu(x), relu(-x); a head that adds them up.
    g.weights("w0", &[4, 2], &[1.0, 0.0, 0.0, 1.0, -1.0, 0.0, 0.0, -1.0]);
    g.weights("b0", &[4], &[0.0; 4]);
    g.weights("w1", &[1, 4], &[1.0, 1.0, 1.0, 1.0]);
    g.weights("b1", &[1], &[0.0]);
    g.node("Gemm", &["x", "w0", "b0"], &["h"], vec![Attr::Int("transB", 1)]);
    g.node("Relu", &["h"], &["r"], vec![]);
    g.node("Gemm", &["r", "w1", "b1"], &["y"], vec![Attr::Int("transB", 1)]);
    g.output("y", DataType::Fp32, &[n(), Dim::Fixed(1)]);
    let site = Site::new();
    site.install("wear", 1, &g.encode("test"));

    // At this site the target is 2|x0| - |x1| + 1.
    let mut rng = SeededRng::new(8);
    let mut csv = "a,b,target\n".to_owned();
    for _ in 0..2_000 {
        let (a, b) = (rng.normal(0.0, 1.0) as f32, rng.normal(0.0, 1.0) as f32);
        let target = 2.0 * a.abs() - b.abs() + 1.0;
        csv += &[a.to_string(), b.to_string(), target.to_string()].join(",");
        csv.push('\n');
    }
    let data = site.dir.path().join("wear.csv");
    std::fs::write(&data, csv).unwrap();
    let out = finetune(
        &site,
        &[
            "--model",
            "wear",
            "--data",
            data.to_str().unwrap(),
            "--label",
            "target",
            "--epochs",
            "40",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stdout(&out).contains("ACCURACY"), "no accuracy column for a regressor");
    let store = site.store();
    let derived = store.installed().unwrap().into_iter().find(|i| i.manifest.name == "wear.ft1");
    let derived = derived.unwrap();
    let lineage = derived.manifest.model().unwrap().lineage.clone().unwrap();
    assert_eq!(lineage.objective, Objective::MeanSquaredError);
    assert_eq!(lineage.before.accuracy, None);
    assert!(
        lineage.after.loss < 0.01 * lineage.before.loss,
        "{:?} -> {:?}",
        lineage.before,
        lineage.after
    );
    assert!(lineage.gate.activate, "{:?}", lineage.gate);
    let trained = head::find(&store.read_content(&derived).unwrap()).unwrap();
    for (got, want) in trained.weights.iter().zip([2.0, -1.0, 2.0, -1.0]) {
        assert!((got - want).abs() < 0.05, "{:?}", trained.weights);
    }
    assert!((trained.bias[0] - 1.0).abs() < 0.05, "{:?}", trained.bias);
}
