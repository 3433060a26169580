//! Monitoring end to end on loopback: agents measure what they serve, keep closed
//! windows in their SQLite outbox through outages, restarts and lost acknowledgements, and
//! the control plane counts every request exactly once, scores drift against the bundle's
//! reference profile and alerts a webhook.

use crate::fleet;
use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use falaj_agent::reporting::ReportConfig;
use falaj_common::alerting::{AlertMetric, AlertRule, DriftScope, RetrainHook};
use falaj_common::metrics::VersionSummary;
use falaj_common::sample::{self, FEATURE_COUNT, FEATURES, Shift};
use falaj_control::alerts::AlertsConfig;
use fleet::{Control, RunningAgent, eventually};
use serde_json::Value;
use support::{Process, ok, s};

const MODEL: &str = "pump";
const GROUP: &str = "site";

/// A control plane with the sample model (and its reference profile) deployed to GROUP.
async fn control_with_model(
    work: &std::path::Path,
    config: Option<falaj_control::daemon::ServeConfig>,
) -> Control {
    let config = config
        .unwrap_or_else(|| fleet::config(&work.join("control"), "127.0.0.1:0".parse().unwrap()));
    let control = Control::start_with(config, None).await;
    control.push_sample(work, MODEL, 1).await;
    control.client.deploy(GROUP, MODEL, 1).await.unwrap();
    control
}

/// `rows` rows of sensor readings as one inference request body.
fn rows_body(data: &[f32]) -> Value {
    let rows = data.len() / FEATURE_COUNT;
    serde_json::json!({"inputs": [{"name": "sensors", "shape": [rows, FEATURE_COUNT], "datatype": "FP32", "data": data}]})
}

/// Sends `requests` single-row inferences to the agent at `http`, `parallel` at a time;
/// panics unless every one succeeds.
async fn send_requests(http: std::net::SocketAddr, requests: usize, parallel: usize) {
    let data = sample::generate(64, 11, &[]).features;
    let client = reqwest::Client::new();
    let url = format!("http://{http}/v2/models/{MODEL}/infer");
    let tasks: Vec<_> = (0..parallel)
        .map(|t| {
            let (client, url, data) = (client.clone(), url.clone(), data.clone());
            let share = requests / parallel + usize::from(t < requests % parallel);
            tokio::spawn(async move {
                for i in 0..share {
                    let row = (i + t) % 64;
                    let body = rows_body(&data[row * FEATURE_COUNT..(row + 1) * FEATURE_COUNT]);
                    let response = client.post(&url).json(&body).send().await.unwrap();
                    assert!(response.status().is_success(), "{}", response.text().await.unwrap());
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

/// Sends `data` in requests of 50 rows.
async fn send_rows(http: std::net::SocketAddr, data: &[f32]) {
    let client = reqwest::Client::new();
    for batch in data.chunks(50 * FEATURE_COUNT) {
        let response = client
            .post(format!("http://{http}/v2/models/{MODEL}/infer"))
            .json(&rows_body(batch))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.text().await.unwrap());
    }
}

/// A figure from a Prometheus text exposition, by its full sample name.
async fn prometheus(url: &str, sample: &str) -> Option<f64> {
    let text = reqwest::get(url).await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

/// The control plane's summary of version 1 over the last hour.
async fn summary(control: &Control) -> Option<VersionSummary> {
    let view =
        control.client.metrics(MODEL, None, None, None, Duration::from_secs(3600)).await.ok()?;
    view.versions.into_iter().find(|v| v.version == 1)
}

async fn requests_counted(control: &Control) -> u64 {
    summary(control).await.map_or(0, |v| v.requests)
}

/// Waits until the agent at `http` serves version 1.
async fn served(http: std::net::SocketAddr) {
    eventually(Duration::from_secs(120), "the model is served", || async {
        let Ok(response) = reqwest::get(format!("http://{http}/v2/models/{MODEL}")).await else {
            return false;
        };
        let meta: Value = response.json().await.unwrap_or_default();
        meta["parameters"]["active_version"] == "1"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_served_while_the_control_plane_is_down_are_counted_exactly_once() {
    let work = tempfile::tempdir().unwrap();
    let control = control_with_model(work.path(), None).await;
    let (dir, quic) = (control.dir.clone(), control.quic);
    let agent = control.agent(work.path(), "agent", GROUP).await;
    served(agent.http).await;
    control.stop().await;

    send_requests(agent.http, 10_000, 8).await;
    let agent_metrics = agent.url("/metrics");
    eventually(Duration::from_secs(30), "every request is in a closed window", || async {
        prometheus(&agent_metrics, "falaj_outbox_requests").await == Some(10_000.0)
    })
    .await;
    assert_eq!(
        prometheus(&agent_metrics, r#"falaj_inference_requests_total{model="pump",version="1"}"#)
            .await,
        Some(10_000.0)
    );

    let control = Control::start_with(fleet::config(&dir, quic), None).await;
    eventually(Duration::from_secs(60), "the outbox is delivered", || async {
        prometheus(&agent_metrics, "falaj_outbox_windows").await == Some(0.0)
    })
    .await;
    let summary = summary(&control).await.unwrap();
    assert_eq!((summary.requests, summary.errors, summary.agents), (10_000, 0, 1));
    assert!(summary.p50_ms.is_some() && summary.p99_ms >= summary.p50_ms, "{summary:?}");
    assert_eq!(summary.dropped_windows, 0);
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn windows_survive_an_agent_killed_between_windows() {
    let work = tempfile::tempdir().unwrap();
    let control = control_with_model(work.path(), None).await;
    let (dir, quic) = (control.dir.clone(), control.quic);
    let agent_dir = work.path().join("agent");
    let token = control.token(GROUP).await;
    ok(&[
        "agent",
        "enroll",
        "--control-plane",
        &quic.to_string(),
        "--token",
        &token,
        "--data-dir",
        s(&agent_dir),
    ]);
    let config = work.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {agent_dir:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[control_plane]\nheartbeat = \"300ms\"\nmax_backoff = \"1s\"\n[metrics]\nwindow = \"300ms\"\n"
        ),
    )
    .unwrap();
    let serve = ["agent", "serve", "--config", s(&config)];
    let mut process = Process::start(&serve);
    let http = process.wait_for_addr("serving the Open Inference Protocol");
    let agent_metrics = format!("http://{http}/metrics");
    served(http).await;
    control.stop().await;

    send_requests(http, 10_000, 8).await;
    eventually(Duration::from_secs(30), "every request is in a closed window", || async {
        prometheus(&agent_metrics, "falaj_outbox_requests").await == Some(10_000.0)
    })
    .await;
    drop(process); // SIGKILL, between windows: nothing served since the last one closed.

    let control = Control::start_with(fleet::config(&dir, quic), None).await;
    let mut process = Process::start(&serve);
    let http = process.wait_for_addr("serving the Open Inference Protocol");
    let agent_metrics = format!("http://{http}/metrics");
    eventually(Duration::from_secs(60), "the outbox is delivered", || async {
        prometheus(&agent_metrics, "falaj_outbox_windows").await == Some(0.0)
            && prometheus(&agent_metrics, "falaj_outbox_delivered_windows_total").await > Some(0.0)
    })
    .await;
    assert_eq!(requests_counted(&control).await, 10_000);
    // The operator's view, through the command line.
    let api = ["--control-plane", control.client.base(), "--data-dir", s(&dir)];
    let table = ok(&[&["control", "metrics", MODEL, "--since", "1h"][..], &api].concat());
    let row = table.lines().find(|l| l.starts_with("1 ")).unwrap_or_else(|| panic!("{table}"));
    assert_eq!(row.split_whitespace().take(3).collect::<Vec<_>>(), ["1", "1", "10000"], "{table}");
    let alerts = ok(&[&["control", "alerts"][..], &api].concat());
    assert!(alerts.contains("no alerts firing"), "{alerts}");
    assert_eq!(process.terminate(), Some(0));
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_lost_after_the_commit_does_not_count_twice() {
    let work = tempfile::tempdir().unwrap();
    let control = control_with_model(work.path(), None).await;
    let agent = control.agent(work.path(), "agent", GROUP).await;
    served(agent.http).await;
    // The next committed batch closes the connection instead of being acknowledged.
    control.shared.ingest.close_before_ack.store(1, std::sync::atomic::Ordering::SeqCst);

    send_requests(agent.http, 500, 4).await;
    let admin = format!("{}/metrics", control_admin_url(&control));
    eventually(Duration::from_secs(60), "the resent windows are acknowledged", || async {
        prometheus(&agent.url("/metrics"), "falaj_outbox_windows").await == Some(0.0)
            && requests_counted(&control).await == 500
    })
    .await;
    assert_eq!(control.shared.ingest.close_before_ack.load(std::sync::atomic::Ordering::SeqCst), 0);
    let duplicates = prometheus(&admin, "falaj_metric_windows_duplicate_total").await.unwrap();
    assert!(duplicates >= 1.0, "the unacknowledged batch was sent again ({duplicates})");
    assert_eq!(requests_counted(&control).await, 500, "and counted once");
    let fleet_requests =
        prometheus(&admin, r#"falaj_inference_requests_total{model="pump",version="1"}"#).await;
    assert_eq!(fleet_requests, Some(500.0));
    control.stop().await;
}

fn control_admin_url(control: &Control) -> String {
    control.client.base().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_outbox_drops_the_oldest_windows_and_reports_exactly_what_it_dropped() {
    let work = tempfile::tempdir().unwrap();
    let control = control_with_model(work.path(), None).await;
    let (dir, quic) = (control.dir.clone(), control.quic);
    let token = control.token(GROUP).await;
    let agent_dir = work.path().join("agent");
    let options = falaj_agent::enroll::EnrollOptions {
        control_plane: quic.to_string(),
        token,
        hostname: "test-host".into(),
        region: None,
    };
    falaj_agent::enroll::enroll(&agent_dir, &options, SystemTime::now()).await.unwrap();
    // Windows close only when the test says (the timer would take an hour).
    let sync = falaj_agent::sync::SyncConfig {
        report: Some(ReportConfig { window: Duration::from_secs(3600), outbox_cap: 3 }),
        ..fleet::sync_config()
    };
    let agent = RunningAgent::start_with(&agent_dir, sync).await;
    served(agent.http).await;
    control.stop().await;

    // Ten windows of 1, 2, ... 10 requests into an outbox that keeps three.
    for requests in 1..=10 {
        send_requests(agent.http, requests, 1).await;
        let reporter = Arc::clone(&agent.reporter);
        let closed = tokio::task::spawn_blocking(move || reporter.close_windows(SystemTime::now()));
        assert_eq!(closed.await.unwrap().unwrap(), 1);
    }
    let agent_metrics = agent.url("/metrics");
    assert_eq!(prometheus(&agent_metrics, "falaj_outbox_windows").await, Some(3.0));
    assert_eq!(prometheus(&agent_metrics, "falaj_outbox_dropped_windows_total").await, Some(7.0));

    let control = Control::start_with(fleet::config(&dir, quic), None).await;
    eventually(Duration::from_secs(60), "the kept windows arrive", || async {
        requests_counted(&control).await == 8 + 9 + 10
    })
    .await;
    let summary = summary(&control).await.unwrap();
    assert_eq!((summary.windows, summary.dropped_windows, summary.dropped_requests), (3, 7, 28));
    let report = falaj_control::cli::render_metrics(
        &control.client.metrics(MODEL, None, None, None, Duration::from_secs(3600)).await.unwrap(),
    );
    assert!(report.contains("agents dropped 7 windows (28 requests)"), "{report}");
    control.stop().await;
}

/// A test HTTP server that keeps the JSON bodies POSTed to it, by path.
#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Receiver {
    async fn start(&self) -> std::net::SocketAddr {
        let received = Arc::clone(&self.received);
        let app = axum::Router::new().route(
            "/{hook}",
            axum::routing::post(
                move |axum::extract::Path(hook): axum::extract::Path<String>,
                      axum::Json(body): axum::Json<Value>| {
                    let received = Arc::clone(&received);
                    async move {
                        received.lock().unwrap().push((hook, body));
                        "ok"
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    fn bodies(&self, hook: &str) -> Vec<Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|(h, _)| h == hook)
            .map(|(_, b)| b.clone())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shifted_feature_and_only_it_fires_a_drift_alert_that_reaches_the_webhook() {
    let work = tempfile::tempdir().unwrap();
    let receiver = Receiver::default();
    let hooks = receiver.start().await;
    let rule = AlertRule {
        name: "pump-drift".into(),
        model: MODEL.into(),
        metric: AlertMetric::Psi,
        column: None,
        scope: DriftScope::Inputs,
        group: Some(GROUP.into()),
        threshold: 0.25,
        window: Duration::from_secs(3600),
        min_count: 100,
        retrain: Some(RetrainHook::Webhook(format!("http://{hooks}/retrain"))),
    };
    let mut config = fleet::config(&work.path().join("control"), "127.0.0.1:0".parse().unwrap());
    config.alerts = AlertsConfig {
        evaluate_every: Duration::from_millis(100),
        webhooks: vec![format!("http://{hooks}/alerts")],
        rules: vec![rule.clone()],
    };
    let control = control_with_model(work.path(), Some(config)).await;
    let agent = control.agent(work.path(), "agent", GROUP).await;
    served(agent.http).await;

    // Data from the reference distribution scores low: nothing fires.
    send_rows(agent.http, &sample::generate(400, 99, &[]).features).await;
    eventually(Duration::from_secs(30), "the first rows arrive", || async {
        summary(&control).await.is_some_and(|s| s.rows == 400)
    })
    .await;
    let calm = summary(&control).await.unwrap().drift.unwrap();
    assert_eq!(calm.inputs.len(), FEATURE_COUNT);
    assert!(calm.inputs.iter().all(|c| c.scores.psi < 0.1), "{calm:?}");
    let changed = falaj_control::alerts::evaluate(
        &control.shared,
        std::slice::from_ref(&rule),
        &[],
        SystemTime::now(),
    )
    .await
    .unwrap();
    assert!(changed.is_empty(), "{changed:?}");

    // Vibration reads 3 mm/s high from now on: it fires, and no other feature does.
    let vibration = FEATURES.iter().position(|f| *f == "vibration_mm_s").unwrap();
    let shifted = sample::generate(1600, 100, &[Shift { feature: vibration, offset: 3.0 }]);
    send_rows(agent.http, &shifted.features).await;
    eventually(Duration::from_secs(60), "the webhook hears the alert", || async {
        !receiver.bodies("alerts").is_empty() && !receiver.bodies("retrain").is_empty()
    })
    .await;
    eventually(Duration::from_secs(30), "all rows arrive", || async {
        summary(&control).await.is_some_and(|s| s.rows == 2000)
    })
    .await;
    let changed = falaj_control::alerts::evaluate(&control.shared, &[rule], &[], SystemTime::now())
        .await
        .unwrap();
    assert!(changed.is_empty(), "with all the data in, nothing else fires: {changed:?}");
    for body in receiver.bodies("alerts").iter().chain(&receiver.bodies("retrain")) {
        assert_eq!(body["rule"], "pump-drift");
        assert_eq!(body["state"], "firing");
        assert_eq!(body["subject"], "pump@1/vibration_mm_s");
        assert_eq!(body["column"], "vibration_mm_s");
        assert!(body["value"].as_f64().unwrap() > 0.25, "{body}");
    }
    let alerts = control.client.alerts(10).await.unwrap();
    let firing: Vec<_> = alerts.firing.iter().map(|f| f.subject.as_str()).collect();
    assert_eq!(firing, ["pump@1/vibration_mm_s"]);
    assert!(falaj_control::cli::render_alerts(&alerts).contains("pump-drift"));
    let table = falaj_control::cli::render_metrics(
        &control
            .client
            .metrics(MODEL, None, Some(GROUP), None, Duration::from_secs(3600))
            .await
            .unwrap(),
    );
    assert!(table.contains("top drifting features: vibration_mm_s"), "{table}");
    control.stop().await;
}
