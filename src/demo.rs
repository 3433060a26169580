//! `falaj demo`: a control plane and two agents on this machine. Keys, the sample model,
//! a signed bundle pushed to the control plane, two agents enrolled with one-time tokens,
//! the model deployed to them over QUIC, requests to both, the metrics they report, then
//! a phase of shifted sensor readings that the control plane flags as drift, a feature
//! view with a snapshot shipped beside the model and predictions asked for by pump id, a
//! fine-tune job ordered for the site whose sensors read high, a canary of a worse version
//! that the agents roll back by themselves on the ground truth fed back to them, a
//! canary of a good version promoted step by step, the audit log of all of it exported and
//! verified against the audit key, an admin for the console (its URL and a one-time
//! password printed) and an API token for its tokens page, and serving until Ctrl-C.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use falaj_agent::daemon::Agent;
use falaj_agent::enroll::{self, EnrollOptions};
use falaj_agent::reporting::ReportConfig;
use falaj_agent::server::ServeConfig as AgentConfig;
use falaj_agent::sync::SyncConfig;
use falaj_common::alerting::{AlertMetric, AlertRule, DriftScope};
use falaj_common::bundle::{FeatureInput, RuntimeHint};
use falaj_common::finetune::{JobReport, JobState, Metrics};
use falaj_common::rollout::Strategy;
use falaj_common::sample::{CLASSES, FEATURES, Shift, generate};
use falaj_control::admin::{AlertsView, MetricsView};
use falaj_control::alerts::AlertsConfig;
use falaj_control::bundle::{self, BuildOptions};
use falaj_control::cli::{render_alerts, render_metrics};
use falaj_control::client::AdminClient;
use falaj_control::daemon::{ControlPlane, ServeConfig};
use falaj_control::rollouts::StartRequest;
use falaj_control::rollouts::cli::render_status;
use falaj_control::rollouts::view::RolloutView;
use falaj_control::sample::{self, INPUT, SampleOptions};
use serde_json::{Value, json};
use tokio::sync::watch;

const MODEL: &str = "sensor-fault";
const VIEW: &str = "pump-sensors";
const FEATURE_MODEL: &str = "sensor-fault-by-pump";
const REGION: &str = "local-1";
const GROUP: &str = "demo";
const AGENTS: usize = 2;
/// The demo's admin in the console.
const CONSOLE_ADMIN: &str = "demo-admin";

/// Arguments of `falaj demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Directory for the demo's state (default: a fresh temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Address of the first agent's inference API (the second takes any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    http: SocketAddr,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let temp;
    let dir: &Path = if let Some(dir) = &args.dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        dir
    } else {
        temp = tempfile::Builder::new()
            .prefix("falaj-demo-")
            .tempdir()
            .context("creating a temporary directory")?;
        temp.path()
    };
    println!("Falaj demo in {}", dir.display());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(demo(dir, args.http))
}

async fn demo(dir: &Path, http: SocketAddr) -> Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop = falaj_shell::daemon::shutdown_signal();
    tokio::spawn(async move {
        stop.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // 1. The control plane.
    let mut config = ServeConfig::new(&dir.join("control"));
    // Agents remember the address they enrolled with: a demo run again in the same
    // directory puts the control plane back on the same port.
    let quic_file = dir.join("control-plane.addr");
    config.quic = match std::fs::read_to_string(&quic_file) {
        Ok(addr) => addr.trim().parse().context("reading control-plane.addr")?,
        Err(_) => "127.0.0.1:0".parse()?,
    };
    config.admin = "127.0.0.1:0".parse()?;
    config.region = Some(REGION.into());
    config.policy.heartbeat = Duration::from_secs(2);
    config.rollouts.evaluate_every = Duration::from_secs(1);
    config.alerts = AlertsConfig {
        evaluate_every: Duration::from_secs(1),
        webhooks: Vec::new(),
        rules: vec![AlertRule {
            name: "input-drift".into(),
            model: MODEL.into(),
            metric: AlertMetric::Psi,
            column: None,
            scope: DriftScope::Inputs,
            group: Some(GROUP.into()),
            threshold: 0.25,
            window: Duration::from_secs(600),
            min_count: 500,
            retrain: None,
        }],
    };
    let control = ControlPlane::start(config).await.context("starting the control plane")?;
    let (quic, admin, token) =
        (control.quic_addr(), control.admin_addr(), control.admin_token().to_owned());
    std::fs::write(&quic_file, quic.to_string()).context("writing control-plane.addr")?;
    let client = AdminClient::new(&format!("http://{admin}"), &token);
    let control_task = tokio::spawn(control.run(stopped(stop_rx.clone())));
    println!(
        "  1. control plane  region {REGION}; agents connect to {quic} (QUIC, mutual TLS); admin API on http://{admin}"
    );

    let (made, version) = publish_sample(dir, &client).await?;

    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let (id, addr, agent) = start_agent(dir, i, quic, &client, http).await?;
        agents.push((id, addr, tokio::spawn(agent.run(stopped(stop_rx.clone())))));
    }
    let http_client = reqwest::Client::new();
    for (id, addr, _) in &agents {
        let ready = format!("http://{addr}/v2/models/{MODEL}/versions/{version}/ready");
        let deadline = Instant::now() + Duration::from_secs(120);
        while !http_client.get(&ready).send().await.is_ok_and(|r| r.status().is_success()) {
            anyhow::ensure!(Instant::now() < deadline, "{id} did not install the model in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    println!(
        "  6. deployed       both agents fetched, verified and activated {MODEL} v{version} over QUIC"
    );
    println!();

    let targets: Vec<_> = agents.iter().map(|(id, a, _)| (id.as_str(), *a)).collect();
    let sent = show_traffic(&http_client, &targets, &made.holdout).await?;
    show_monitoring(&client, &http_client, &targets, &made.holdout, version, sent).await?;
    show_features(dir, &client, &http_client, &targets, &made).await?;
    show_finetune(dir, &client, &http_client, targets[AGENTS - 1], version).await?;
    show_rollouts(dir, &client, &http_client, &targets, &made.holdout).await?;
    show_audit(dir, &client).await?;
    let password = console_admin(&client).await?;
    println!();
    println!(
        " 14. console        http://{admin}/  (user {CONSOLE_ADMIN}, one-time password {password}); every page above has data"
    );

    let url = format!("http://{}/v2/models/{MODEL}/infer", agents[0].1);
    println!();
    println!("Try it:");
    println!("  curl -s http://{}/v2/models/{MODEL}", agents[0].1);
    let example =
        read_holdout(&made.holdout, 1)?.first().map(|(f, _)| f.clone()).unwrap_or_default();
    println!(
        "  curl -s -X POST {url} -H 'Content-Type: application/json' -d '{}'",
        json!({"inputs": [{"name": INPUT, "shape": [1, FEATURES.len()], "datatype": "FP32", "data": example}]})
    );
    println!("  falaj control agents --control-plane http://{admin} --token {token}");
    println!("  open http://{admin}/ and log in as {CONSOLE_ADMIN} with {password}");
    println!("Serving until Ctrl-C.");
    for (_, _, task) in agents {
        task.await??;
    }
    control_task.await??;
    Ok(())
}

/// Trains the sample model, signs it into a bundle, pushes it and deploys it to the group.
async fn publish_sample(dir: &Path, client: &AdminClient) -> Result<(sample::Sample, u64)> {
    let made = sample::write(&dir.join("sample"), &SampleOptions::default())
        .context("training the sample model")?;
    println!(
        "  2. model          a pump-fault classifier: hold-out accuracy {:.1}% (majority class {:.1}%)",
        made.holdout_accuracy * 100.0,
        made.majority_share * 100.0
    );
    let version = client.bundles().await?.iter().filter(|b| b.name == MODEL).count() as u64 + 1;
    let bundle_path = dir.join(format!("{MODEL}-{version}.falaj"));
    bundle::build(
        &BuildOptions {
            keys: dir.join("control/keys"),
            model: made.model.clone(),
            name: MODEL.into(),
            version,
            reference: Some(made.reference.clone()),
            runtime: RuntimeHint::Auto,
            lifetime: bundle::DEFAULT_LIFETIME,
            out: bundle_path.clone(),
            features: None,
            shapes: std::collections::BTreeMap::new(),
        },
        SystemTime::now(),
    )
    .context("building the bundle")?;
    let pushed = client.push_bundle(&bundle_path).await?;
    client.deploy(GROUP, MODEL, version).await?;
    println!(
        "  3. bundle         {MODEL} v{version} signed with its reference profile, pushed ({} bytes, {} chunk(s)) and deployed to group {GROUP}",
        pushed.bundle.size, pushed.bundle.chunks
    );

    Ok((made, version))
}

/// Starts agent `i` of the demo, enrolling it first if it is new.
async fn start_agent(
    dir: &Path,
    i: usize,
    quic: SocketAddr,
    client: &AdminClient,
    http: SocketAddr,
) -> Result<(String, SocketAddr, Agent)> {
    let agent_dir = dir.join(format!("agent-{}", i + 1));
    if !agent_dir.join(falaj_agent::store::DB_FILE).exists() {
        let token = client.create_token(GROUP, 600).await?.token;
        let options = EnrollOptions {
            control_plane: quic.to_string(),
            token,
            hostname: format!("demo-agent-{}", i + 1),
            region: Some(REGION.into()),
        };
        enroll::enroll(&agent_dir, &options, SystemTime::now())
            .await
            .context("enrolling an agent")?;
    }
    let serve = AgentConfig {
        http: if i == 0 { http } else { "127.0.0.1:0".parse()? },
        ..AgentConfig::default()
    };
    let sync = SyncConfig {
        heartbeat: Duration::from_secs(2),
        report: Some(ReportConfig { window: Duration::from_secs(1), ..ReportConfig::default() }),
        ..SyncConfig::default()
    };
    let agent = Agent::start(agent_dir, serve, sync).await.context("starting an agent")?;
    let id = agent.identity().map(|i| i.agent_id.clone()).unwrap_or_default();
    let addr = agent.local_addr();
    println!("  {}. agent {}        {id} enrolled; inference API on http://{addr}", i + 4, i + 1);
    Ok((id, addr, agent))
}

/// A few predictions next to the truth, then a batch per agent; returns the requests sent.
async fn show_traffic(
    client: &reqwest::Client,
    agents: &[(&str, SocketAddr)],
    holdout: &Path,
) -> Result<u64> {
    let rows = read_holdout(holdout, 6)?;
    println!(
        "  {:<20} {:>7} {:>7} {:>6}   {:<9} {:<24} {:<9} {:>9}",
        "agent",
        "temp°C",
        "vib",
        "bar",
        "predicted",
        "p(normal/degraded/fault)",
        "actual",
        "latency"
    );
    for (i, (features, label)) in rows.iter().enumerate() {
        let (id, addr) = agents[i % agents.len()];
        let body = json!({"inputs": [{"name": INPUT, "shape": [1, FEATURES.len()], "datatype": "FP32", "data": features}]});
        let started = Instant::now();
        let url = format!("http://{addr}/v2/models/{MODEL}/infer");
        let response: Value =
            client.post(&url).json(&body).send().await?.error_for_status()?.json().await?;
        let latency = started.elapsed();
        let probabilities = output(&response, "probabilities")?;
        let predicted = output(&response, "label")?.first().copied().unwrap_or(-1.0) as usize;
        println!(
            "  {:<20} {:>7.1} {:>7.2} {:>6.2}   {:<9} {:<24} {:<9} {:>6.2} ms",
            id,
            features[0],
            features[1],
            features[2],
            CLASSES.get(predicted).unwrap_or(&"?"),
            probabilities.iter().map(|p| format!("{p:.2}")).collect::<Vec<_>>().join(" / "),
            CLASSES.get(*label).unwrap_or(&"?"),
            latency.as_secs_f64() * 1e3
        );
    }
    let batch = read_holdout(holdout, 256)?;
    let flat: Vec<f32> = batch.iter().flat_map(|(f, _)| f.iter().copied()).collect();
    let body = json!({"inputs": [{"name": INPUT, "shape": [batch.len(), FEATURES.len()], "datatype": "FP32", "data": flat}]});
    println!();
    for (id, addr) in agents {
        let started = Instant::now();
        let url = format!("http://{addr}/v2/models/{MODEL}/infer");
        let response: Value =
            client.post(&url).json(&body).send().await?.error_for_status()?.json().await?;
        let latency = started.elapsed();
        let labels = output(&response, "label")?;
        let right = labels.iter().zip(&batch).filter(|(p, (_, l))| **p as usize == *l).count();
        println!(
            "  {id}: one request with {} rows in {:.2} ms, {right}/{} predicted right",
            batch.len(),
            latency.as_secs_f64() * 1e3,
            batch.len()
        );
    }
    Ok((rows.len() + agents.len()) as u64)
}

/// Sends `rows` to the agents in requests of 20 rows, in turn; returns the requests sent.
async fn send_rows(
    client: &reqwest::Client,
    agents: &[(&str, SocketAddr)],
    rows: &[f32],
) -> Result<u64> {
    let mut sent = 0;
    for (i, chunk) in rows.chunks(20 * FEATURES.len()).enumerate() {
        let (_, addr) = agents[i % agents.len()];
        let body = json!({"inputs": [{"name": INPUT, "shape": [chunk.len() / FEATURES.len(), FEATURES.len()], "datatype": "FP32", "data": chunk}]});
        let url = format!("http://{addr}/v2/models/{MODEL}/infer");
        client.post(&url).json(&body).send().await?.error_for_status()?;
        sent += 1;
    }
    Ok(sent)
}

/// Waits until the control plane has counted `requests` requests to `version` and
/// `done` holds for its alerts; returns the metrics of the last ten minutes.
async fn counted(
    client: &AdminClient,
    version: u64,
    requests: u64,
    done: impl Fn(&AlertsView) -> bool,
) -> Result<MetricsView> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view =
            client.metrics(MODEL, Some(version), None, None, Duration::from_secs(600)).await?;
        let seen = view.versions.first().map_or(0, |v| v.requests);
        if seen >= requests && done(&client.alerts(1).await?) {
            return Ok(view);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the control plane counted {seen} of {requests} requests in a minute"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Steady traffic and the control plane's view of it; then shifted vibration readings,
/// the drift they show and the alert they fire.
async fn show_monitoring(
    client: &AdminClient,
    http: &reqwest::Client,
    agents: &[(&str, SocketAddr)],
    holdout: &Path,
    version: u64,
    mut sent: u64,
) -> Result<()> {
    let steady: Vec<f32> = read_holdout(holdout, 2000)?.into_iter().flat_map(|(f, _)| f).collect();
    sent += send_rows(http, agents, &steady).await?;
    let view = counted(client, version, sent, |_| true).await?;
    println!();
    println!(
        "  7. metrics        agents report 1 s windows over QUIC; `falaj control metrics {MODEL}`:"
    );
    print_indented(&render_metrics(&view));

    let vibration = FEATURES.iter().position(|f| *f == "vibration_mm_s").unwrap_or(1);
    let shifted = generate(2000, 4242, &[Shift { feature: vibration, offset: 3.0 }]);
    sent += send_rows(http, agents, &shifted.features).await?;
    let view = counted(client, version, sent, |alerts| !alerts.firing.is_empty()).await?;
    println!();
    println!("  8. drift          vibration sensors now read 3 mm/s high; the same table:");
    print_indented(&render_metrics(&view));
    println!("     and `falaj control alerts`:");
    print_indented(&render_alerts(&client.alerts(5).await?));
    Ok(())
}

/// The feature store: a view declared, generated readings ingested, a snapshot and the
/// sample model (fed from the view) shipped to the group, predictions by pump id.
async fn show_features(
    dir: &Path,
    client: &AdminClient,
    http: &reqwest::Client,
    agents: &[(&str, SocketAddr)],
    made: &sample::Sample,
) -> Result<()> {
    const PUMPS: usize = 1000;
    println!();
    let applied = client.apply_view(sample::pump_view()).await?;
    let view_version = applied.stored.version;
    let readings = dir.join("pump-readings.csv");
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_micros() as i64;
    sample::write_pump_readings(&readings, PUMPS, 3, now - 3 * 3_600_000_000, 99)?;
    let ingested = client.ingest(VIEW, &readings).await?;
    println!(
        "  9. features       view {VIEW} v{view_version} applied; {} hourly readings of {PUMPS} pumps ingested, every row checked",
        ingested.rows
    );
    let built = client.snapshot(VIEW, &json!({})).await?;
    let snapshot = built.bundle.version;
    let model_version =
        client.bundles().await?.iter().filter(|b| b.name == FEATURE_MODEL).count() as u64 + 1;
    let bundle_path = dir.join(format!("{FEATURE_MODEL}-{model_version}.falaj"));
    bundle::build(
        &BuildOptions {
            keys: dir.join("control/keys"),
            model: made.model.clone(),
            name: FEATURE_MODEL.into(),
            version: model_version,
            reference: Some(made.reference.clone()),
            runtime: RuntimeHint::Auto,
            lifetime: bundle::DEFAULT_LIFETIME,
            out: bundle_path.clone(),
            features: Some(FeatureInput {
                view: VIEW.into(),
                version: view_version,
                names: FEATURES.iter().map(|f| (*f).to_owned()).collect(),
            }),
            shapes: std::collections::BTreeMap::new(),
        },
        SystemTime::now(),
    )
    .context("building the bundle")?;
    client.push_bundle(&bundle_path).await?;
    client.deploy(GROUP, VIEW, snapshot).await?;
    client.deploy(GROUP, FEATURE_MODEL, model_version).await?;
    println!(
        "     snapshot       {VIEW} v{snapshot}: {} pumps, {} bytes, technician names hashed with the region's key; deployed with {FEATURE_MODEL} v{model_version}",
        built.snapshot.entities, built.bundle.size
    );
    let (_, addr) = agents[0];
    let ready = format!("http://{addr}/v2/models/{FEATURE_MODEL}/versions/{model_version}/ready");
    let lookup = format!("http://{addr}/v1/features/{VIEW}/{}", sample::pump_id(7));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let served = http.get(&lookup).send().await?.json::<Value>().await?;
        let model_ready = http.get(&ready).send().await.is_ok_and(|r| r.status().is_success());
        if model_ready && served["version"] == snapshot {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the agent did not install the snapshot in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("     lookups        GET {lookup}");
    let found: Value = http.get(&lookup).send().await?.json().await?;
    println!(
        "                    site {}, technician {}, temperature {:.1} °C, vibration {:.2} mm/s ({})",
        found["features"]["site"],
        found["features"]["technician"],
        found["features"]["temperature_c"].as_f64().unwrap_or_default(),
        found["features"]["vibration_mm_s"].as_f64().unwrap_or_default(),
        found["event_time"].as_str().unwrap_or("?")
    );
    let url = format!("http://{addr}/v2/models/{FEATURE_MODEL}/infer");
    for pump in [7, 8, 9] {
        let id = sample::pump_id(pump);
        let response: Value = http
            .post(&url)
            .json(&json!({"parameters": {"entity_id": id}}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let probabilities = output(&response, "probabilities")?;
        let predicted = output(&response, "label")?.first().copied().unwrap_or(-1.0) as usize;
        println!(
            "     by entity id   {id}: {:<9} ({})",
            CLASSES.get(predicted).unwrap_or(&"?"),
            probabilities.iter().map(|p| format!("{p:.2}")).collect::<Vec<_>>().join(" / ")
        );
    }
    println!(
        "     try it         curl -s -X POST {url} -H 'Content-Type: application/json' -d '{}'",
        json!({"parameters": {"entity_id": sample::pump_id(7)}})
    );
    Ok(())
}

/// The second agent's site reads vibration 3 mm/s high and has labelled its own rows: a
/// fine-tune job, ordered through its desired state, retrains the model's head there; the
/// rows never leave the agent, the figures come back.
async fn show_finetune(
    dir: &Path,
    client: &AdminClient,
    http: &reqwest::Client,
    (agent, addr): (&str, SocketAddr),
    version: u64,
) -> Result<()> {
    println!();
    let site = generate(4000, 77, &[Shift { feature: 1, offset: 3.0 }]);
    // Ordered jobs read only from the agent's site data directory.
    let site_data = dir.join(format!("agent-{AGENTS}")).join(falaj_agent::sync::SITE_DATA);
    std::fs::create_dir_all(&site_data)
        .with_context(|| format!("creating {}", site_data.display()))?;
    let data = site_data.join("site-labels.csv");
    std::fs::write(&data, falaj_common::sample::csv(&site.features, Some(&site.labels)))
        .with_context(|| format!("writing {}", data.display()))?;
    let order = json!({"agent": agent, "job": {"model": MODEL, "version": version,
        "data": {"file": data, "label": "label"}, "hyperparameters": {"max_epochs": 20}}});
    let placed = client.order_finetune(&order).await?;
    let id = placed.id;
    println!(
        " 10. fine-tune      job {id} ordered for {agent}, whose vibration sensors read 3 mm/s high: \
         retrain {MODEL}'s head on its {} labelled rows, which stay there",
        site.len()
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    let job = loop {
        let job = client.finetune_job(&id).await?;
        if matches!(job.state.as_str(), "succeeded" | "failed") {
            break job;
        }
        anyhow::ensure!(Instant::now() < deadline, "the agent did not report job {id} in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let report = job.report.unwrap_or_else(|| JobReport::state(&id, JobState::Failed));
    let detail = report.detail.as_deref().unwrap_or("no report");
    anyhow::ensure!(job.state == "succeeded", "job {id} failed: {detail}");
    let lineage = report.lineage.context("a succeeded job reports its lineage")?;
    let accuracy = |m: &Metrics| m.accuracy.unwrap_or_default() * 100.0;
    println!(
        "     reported       held-out accuracy {:.1}% -> {:.1}% after {} epochs ({} rows, on the {})",
        accuracy(&lineage.before),
        accuracy(&lineage.after),
        lineage.epochs.len(),
        lineage.train_rows,
        lineage.engine
    );
    let derived = report.derived.as_deref().unwrap_or("?");
    if lineage.gate.activate {
        let meta = format!("http://{addr}/v2/models/{MODEL}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while http.get(&meta).send().await?.json::<Value>().await?["parameters"]["served_by"]
            != derived
        {
            anyhow::ensure!(Instant::now() < deadline, "{derived} did not start serving in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!(
            "     gate           passed: {derived} now answers requests for {MODEL} on {agent}"
        );
    } else {
        println!("     gate           kept {MODEL}: {}", lineage.gate.reason);
    }
    Ok(())
}

/// Builds and pushes `model` as the next version of the sample model; returns the version.
async fn push_version(dir: &Path, client: &AdminClient, model: &Path) -> Result<u64> {
    let version = client.bundles().await?.iter().filter(|b| b.name == MODEL).count() as u64 + 1;
    let out = dir.join(format!("{MODEL}-{version}.falaj"));
    bundle::build(
        &BuildOptions {
            keys: dir.join("control/keys"),
            model: model.to_owned(),
            name: MODEL.into(),
            version,
            reference: None,
            runtime: RuntimeHint::Auto,
            lifetime: bundle::DEFAULT_LIFETIME,
            out: out.clone(),
            features: None,
            shapes: std::collections::BTreeMap::new(),
        },
        SystemTime::now(),
    )
    .context("building the bundle")?;
    client.push_bundle(&out).await?;
    Ok(version)
}

/// A classifier trained on labels shifted by one class: confidently wrong.
fn mislabelled_model(dir: &Path) -> Result<PathBuf> {
    let data = generate(4000, 21, &[]);
    let wrong: Vec<u32> = data.labels.iter().map(|l| (l + 1) % CLASSES.len() as u32).collect();
    let config = falaj_common::train::TrainConfig { seed: 21, ..Default::default() };
    let (mlp, _) = falaj_common::train::train_classifier(
        &data.features,
        FEATURES.len(),
        &wrong,
        CLASSES.len(),
        &config,
    );
    let path = dir.join("mislabelled.onnx");
    std::fs::write(&path, falaj_common::onnx::mlp_classifier(&mlp, INPUT, "falaj demo"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Starts a canary of `candidate` judged on feedback accuracy and errors, sends labelled
/// traffic (each request with an id and a routing key, its ground truth posted back)
/// to one agent until the rollout ends; returns its last status.
async fn canary(
    client: &AdminClient,
    http: &reqwest::Client,
    addr: SocketAddr,
    rows: &[(Vec<f32>, usize)],
    candidate: u64,
    step_interval: Duration,
) -> Result<RolloutView> {
    let request = StartRequest {
        group: GROUP.into(),
        model: MODEL.into(),
        candidate,
        strategy: Strategy::Canary,
        steps: Some(vec![10.0, 50.0, 100.0]),
        step_interval_seconds: Some(step_interval.as_secs()),
        split: None,
        mirror: None,
        guards: vec!["accuracy>=baseline-0.05".into(), "error_rate<0.01".into()],
        min_requests: Some(100),
    };
    let started = client.start_rollout(&request).await?;
    println!(
        "     started        {} with steps 10% -> 50% -> 100% every {}s, guards accuracy>=baseline-0.05 and error_rate<0.01 over 100 labelled rows",
        started.rollout.id,
        step_interval.as_secs()
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    for (n, chunk) in rows.chunks(5).cycle().enumerate() {
        let id = format!("{}-{n}", started.rollout.id);
        let flat: Vec<f32> = chunk.iter().flat_map(|(f, _)| f.iter().copied()).collect();
        let body = json!({"id": id, "parameters": {"routing_key": format!("customer-{n}")},
            "inputs": [{"name": INPUT, "shape": [chunk.len(), FEATURES.len()], "datatype": "FP32", "data": flat}]});
        http.post(format!("http://{addr}/v2/models/{MODEL}/infer"))
            .json(&body)
            .send()
            .await?
            .error_for_status()?;
        let labels: Vec<usize> = chunk.iter().map(|(_, l)| *l).collect();
        http.post(format!("http://{addr}/v2/models/{MODEL}/feedback"))
            .json(&json!({"id": id, "label": labels}))
            .send()
            .await?
            .error_for_status()?;
        if n % 25 == 0 {
            let view = client.rollout(GROUP, MODEL).await?;
            if !view.rollout.state.under_way() {
                return Ok(view);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "rollout {} did not end in time",
                view.rollout.id
            );
        }
    }
    unreachable!("the rows cycle")
}

/// Two canaries: a version trained on wrong labels, which the agents roll back on their
/// own when the ground truth fed back shows it, and a good one, promoted step by step.
async fn show_rollouts(
    dir: &Path,
    client: &AdminClient,
    http: &reqwest::Client,
    agents: &[(&str, SocketAddr)],
    holdout: &Path,
) -> Result<()> {
    let rows = read_holdout(holdout, 1000)?;
    println!();
    let bad = push_version(dir, client, &mislabelled_model(dir)?).await?;
    println!(
        " 11. canary         {MODEL} v{bad}, trained on labels shifted by one class, pushed and canaried"
    );
    let (agent, addr) = agents[0];
    println!(
        "     traffic        5-row requests to {agent}, each with an id and a customer routing key; \
         the ground truth of each answer is POSTed back to /v2/models/{MODEL}/feedback"
    );
    let view = canary(client, http, addr, &rows, bad, Duration::from_secs(30)).await?;
    println!(
        "     rolled back    {}",
        view.rollout.reason.as_deref().unwrap_or("(no reason recorded)")
    );
    print_indented(&render_status(&view));

    let good = sample::write(
        &dir.join("sample-retrained"),
        &SampleOptions { seed: 11, ..SampleOptions::default() },
    )
    .context("training the retrained model")?;
    let good = push_version(dir, client, &good.model).await?;
    println!();
    println!(" 12. canary         {MODEL} v{good}, retrained on fresh data, pushed and canaried");
    let view = canary(client, http, addr, &rows, good, Duration::from_secs(3)).await?;
    anyhow::ensure!(
        view.rollout.state.name() == "promoted",
        "the good canary ended {}: {}",
        view.rollout.state.name(),
        view.rollout.reason.as_deref().unwrap_or("")
    );
    println!("     promoted       every guard held at every step; group {GROUP} now runs v{good}");
    print_indented(&render_status(&view));
    Ok(())
}

/// Exports the control plane's audit log and verifies it as an auditor would, offline,
/// against the audit key's public half.
async fn show_audit(dir: &Path, client: &AdminClient) -> Result<()> {
    let text = client.audit_export().await?;
    let file = dir.join("audit.jsonl");
    std::fs::write(&file, &text).with_context(|| format!("writing {}", file.display()))?;
    let key_file = dir.join("control/keys").join(falaj_control::audit::key::PUBLIC_FILE);
    let key = falaj_control::audit::key::read_public(&key_file)?;
    let verified = falaj_common::audit::verify(text.lines(), &[key])
        .with_context(|| format!("the demo's own audit log {} does not verify", file.display()))?;
    let mut actions: Vec<&str> =
        text.lines().filter_map(|l| l.split("\"action\":\"").nth(1)?.split('"').next()).collect();
    actions.sort_unstable();
    actions.dedup();
    println!();
    println!(
        " 13. audit          {} entries (every change above: {}) and {} signed checkpoints exported to {}; verified against {}",
        verified.entries,
        actions.join(", "),
        verified.checkpoints,
        file.display(),
        key_file.display()
    );
    println!(
        "     verify it      falaj control audit verify {} --key {}",
        file.display(),
        key_file.display()
    );
    Ok(())
}

/// The API token the demo makes for its console's API-tokens page.
const DEMO_API_TOKEN: &str = "demo-ci";

/// An admin for the console with a generated password, shown once: a new one when the
/// demo runs again in the same directory (the user is kept, its password reset).
async fn console_admin(client: &AdminClient) -> Result<String> {
    use falaj_control::auth::Role;
    let password = match client.add_user(CONSOLE_ADMIN, Role::Admin, None).await {
        Ok(added) => added.password,
        Err(_) => client.reset_password(CONSOLE_ADMIN, None).await?.password,
    };
    // The API-tokens page shows one: a read-only token for automation, as CI would hold.
    if !client.api_tokens().await?.iter().any(|t| t.name == DEMO_API_TOKEN) {
        let month = Duration::from_secs(30 * 86_400);
        client.create_api_token(DEMO_API_TOKEN, Role::Viewer, month).await?;
    }
    password.context("the control plane gave the console's admin no password")
}

fn print_indented(text: &str) {
    for line in text.lines() {
        println!("     {line}");
    }
}

fn output(response: &Value, name: &str) -> Result<Vec<f64>> {
    let outputs = response["outputs"].as_array().context("response has no outputs")?;
    let found = outputs
        .iter()
        .find(|o| o["name"] == name)
        .with_context(|| format!("response lacks output {name}"))?;
    Ok(found["data"]
        .as_array()
        .context("output has no data")?
        .iter()
        .filter_map(Value::as_f64)
        .collect())
}

fn read_holdout(path: &Path, rows: usize) -> Result<Vec<(Vec<f32>, usize)>> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::with_capacity(rows);
    for record in reader.records().take(rows) {
        let record = record?;
        let values: Vec<f32> = record.iter().map(str::parse).collect::<Result<_, _>>()?;
        let (label, features) = values.split_last().context("empty row")?;
        out.push((features.to_vec(), *label as usize));
    }
    Ok(out)
}
