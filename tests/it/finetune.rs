//! Fine-tune jobs ordered from the control plane: a job file ordered through the CLI
//! travels in the agent's desired state; the agent trains on its own data (a site whose
//! sensors read offset), installs the derived model that then serves the parent's name,
//! and reports the figures back; the head's weights come back only when the order allows,
//! and every order, end and weights received is an event.

// One story, told in order.
#![allow(clippy::too_many_lines)]

use crate::fleet;
use crate::support;

use std::path::Path;
use std::time::Duration;

use falaj_common::onnx::head;
use falaj_common::sample::{self, Shift};
use falaj_control::finetune::JobRow;
use falaj_control::sql::params;
use fleet::{Control, RunningAgent, eventually};
use serde_json::{Value, json};

const GROUP: &str = "plant-a";
const SHIFT: [Shift; 2] = [Shift { feature: 1, offset: 2.5 }, Shift { feature: 0, offset: 9.0 }];

fn write_site_data(path: &Path) {
    let data = sample::generate(4_000, 31, &SHIFT);
    std::fs::write(path, sample::csv(&data.features, Some(&data.labels))).unwrap();
}

/// The model that answers an unversioned request for `model`.
async fn served_by(agent: &RunningAgent, model: &str) -> Option<String> {
    let body = json!({"inputs": [{"name": "sensors", "shape": [1, 8], "datatype": "FP32",
        "data": [74.0, 5.5, 6.0, 12.0, 1500.0, 50.0, 400.0, 70.0]}]});
    let response = reqwest::Client::new()
        .post(agent.url(&format!("/v2/models/{model}/infer")))
        .json(&body)
        .send()
        .await
        .ok()?;
    let body: Value = response.json().await.ok()?;
    body["model_name"].as_str().map(str::to_owned)
}

async fn finished(control: &Control, id: &str) -> JobRow {
    eventually(Duration::from_secs(120), &format!("the agent reports {id} finished"), || async {
        let job = control.client.finetune_job(id).await.unwrap();
        matches!(job.state.as_str(), "succeeded" | "failed")
    })
    .await;
    control.client.finetune_job(id).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_ordered_in_the_desired_state_trains_on_site_and_reports_back() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let control = Control::start(&work.join("control")).await;
    control.push_sample(work, "pumps", 1).await;
    control.client.deploy(GROUP, "pumps", 1).await.unwrap();
    let agent = control.agent(work, "site", GROUP).await;
    eventually(Duration::from_secs(60), "pumps is served", || async {
        agent.active_version("pumps").await.is_some()
    })
    .await;

    // The site's labelled data stays on the agent's machine, in its site data directory;
    // the job names its path there.
    let site_data = agent.dir.join(falaj_agent::sync::SITE_DATA);
    std::fs::create_dir_all(&site_data).unwrap();
    let data = site_data.join("site.csv");
    write_site_data(&data);
    let job_file = work.join("job.toml");
    std::fs::write(
        &job_file,
        format!(
            "model = \"pumps\"\n[data]\nfile = {:?}\nlabel = \"label\"\n[hyperparameters]\nmax_epochs = 15\n",
            data.to_str().unwrap()
        ),
    )
    .unwrap();
    let api = [
        "--control-plane".to_owned(),
        control.client.base().to_owned(),
        "--data-dir".to_owned(),
        control.dir.display().to_string(),
    ];
    let command = |args: &[&str]| {
        args.iter().map(|a| (*a).to_owned()).chain(api.iter().cloned()).collect::<Vec<_>>()
    };
    let agent_id = agent.identity.agent_id.clone();
    let out = support::falaj_async(command(&[
        "control",
        "finetune",
        "order",
        "--agent",
        &agent_id,
        "--job",
        job_file.to_str().unwrap(),
        "--id",
        "tune-1",
    ]))
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("ordered tune-1 for agent {agent_id}")), "{stdout}");

    let job = finished(&control, "tune-1").await;
    assert_eq!(job.state, "succeeded", "{job:?}");
    let report = job.report.unwrap();
    assert_eq!(report.derived.as_deref(), Some("pumps.ft1"));
    let lineage = report.lineage.unwrap();
    let (before, after) = (lineage.before.accuracy.unwrap(), lineage.after.accuracy.unwrap());
    assert!(after > before + 0.01, "held out on the site: {before:.3} -> {after:.3}");
    assert!(lineage.gate.activate);
    assert!(!lineage.epochs.is_empty(), "the loss curve");
    assert!(report.weights.is_none(), "the order kept the weights on the site");
    eventually(Duration::from_secs(30), "the derived model serves pumps", || async {
        served_by(&agent, "pumps").await.as_deref() == Some("pumps.ft1")
    })
    .await;
    let out = support::falaj_async(command(&["control", "finetune", "show", "tune-1"])).await;
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(shown.contains("EPOCH") && shown.contains("pumps.ft1"), "{shown}");
    assert!(shown.contains("weights stay on the site"), "{shown}");

    // A second order may take the weights: they are the derived model's head.
    let order = json!({"agent": agent_id, "id": "tune-2", "share_weights": true,
        "job": {"model": "pumps", "data": {"file": data, "label": "label"},
                "hyperparameters": {"max_epochs": 3}}});
    control.client.order_finetune(&order).await.unwrap();
    let job = finished(&control, "tune-2").await;
    assert_eq!(job.state, "succeeded", "{job:?}");
    let weights = job.report.and_then(|r| r.weights).unwrap();
    let store = falaj_agent::store::Store::open(&agent.dir).unwrap();
    let derived = store.installed().unwrap().into_iter().find(|i| i.manifest.name == "pumps.ft2");
    let trained = head::find(&store.read_content(&derived.unwrap()).unwrap()).unwrap();
    assert_eq!(weights.weights, trained.weights);
    assert_eq!(weights.bias, trained.bias);
    // Kept with the job only, not again in the agent's last reported state (listing the
    // agents writes the pending reports first).
    control.client.agents().await.unwrap();
    let id = agent_id.clone();
    let actual: String = control
        .shared
        .db
        .run(move |sql| {
            sql.query_row("SELECT actual FROM agents WHERE id = $1", params![id], |r| r.get(0))
        })
        .await
        .unwrap();
    assert!(actual.contains("\"jobs\":["), "{actual}");
    assert!(!actual.contains("\"weights\":{"), "{actual}");

    // Refusals: a job for no agent, a job that breaks the rules, an id taken.
    let refused = |order: Value| {
        let client = control.client.clone();
        async move { client.order_finetune(&order).await.unwrap_err().to_string() }
    };
    let mut bad = order.clone();
    bad["agent"] = json!("nobody");
    assert!(refused(bad).await.contains("no agent \"nobody\""));
    let mut bad = order.clone();
    bad["id"] = json!("tune-3");
    bad["job"]["hyperparameters"]["learning_rate"] = json!(-1.0);
    assert!(refused(bad).await.contains("learning_rate must be above 0"));
    assert!(refused(order.clone()).await.contains("job tune-2 exists"));

    // What was asked of the site and what left it is on record.
    let events: Vec<(String, String)> = control
        .shared
        .db
        .run(|sql| {
            sql.query_map(
                "SELECT kind, subject FROM events WHERE kind LIKE 'finetune.%' ORDER BY id",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .await
        .unwrap();
    let expected = [
        ("finetune.order", "tune-1"),
        ("finetune.finished", "tune-1"),
        ("finetune.order", "tune-2"),
        ("finetune.finished", "tune-2"),
        ("finetune.weights", "tune-2"),
    ];
    let events: Vec<(&str, &str)> = events.iter().map(|(k, s)| (k.as_str(), s.as_str())).collect();
    assert_eq!(events, expected);

    // Hostile orders: a file outside the site data directory (directly, by `..` or through
    // a symbolic link) is refused without a hint of whether it exists, and a file inside
    // it whose content does not fit never has that content echoed in the report.
    std::fs::write(site_data.join("secret.csv"), "TOP-SECRET-LINE,x\n1,2\n").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", site_data.join("passwd.csv")).unwrap();
    let hostile = [
        ("tune-4", "/etc/passwd".to_owned()),
        ("tune-5", format!("{}/../../../../etc/passwd", site_data.display())),
        ("tune-6", "passwd.csv".to_owned()),
        ("tune-7", "secret.csv".to_owned()),
    ];
    for (id, file) in &hostile {
        let order = json!({"agent": agent_id, "id": id,
            "job": {"model": "pumps", "data": {"file": file, "label": "label"}}});
        control.client.order_finetune(&order).await.unwrap();
    }
    for (id, file) in &hostile {
        let job = finished(&control, id).await;
        assert_eq!(job.state, "failed", "{job:?}");
        let detail = job.report.and_then(|r| r.detail).unwrap_or_default();
        assert!(!detail.contains("root:") && !detail.contains("TOP-SECRET"), "{id}: {detail}");
        if *id == "tune-7" {
            assert!(detail.contains("no column \"label\""), "{detail}");
        } else {
            assert!(detail.contains("must be inside the site data directory"), "{file}: {detail}");
        }
    }
    agent.stop().await;
    control.stop().await;
}
