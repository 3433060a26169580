//! The admin console in a real browser: Debian's Chromium driven over WebDriver
//! (chromedriver on loopback) against a real control plane on 127.0.0.1:0 with its
//! SQLite file, users of every role, an agent recorded as enrolled, a deployed model with
//! a reference profile and an hour of metric windows (one feature shifted). An operator
//! starts and aborts a rollout and creates an enrollment token, with which a real agent
//! enrolls over QUIC and shows up connected in the fleet; a viewer finds no button
//! and is refused when posting anyway; an auditor reads every one of those actions in
//! the audit log; an admin opens every page (a screenshot of each goes to
//! `target/console-screenshots/`). One test needs no browser: the HTTP-level promises
//! (redirects, cookies, CSRF, CSP) checked with plain requests.
//!
//! The binary has its own harness (libtest-mimic, `main` at the end): without chromium and
//! chromedriver the browser tests are reported as ignored, with the reason, unless
//! `FALAJ_REQUIRE_BROWSER` is set (as `.ci/run` does): then they fail.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use falaj_common::keys::Sha256;
use falaj_common::metrics::{Counts, MetricsWindow};
use falaj_common::profile::{ColumnProfile, DataProfile};
use falaj_common::protocol::SequencedWindow;
use falaj_common::sketch::LatencySketch;
use falaj_common::time::Timestamp;
use falaj_control::daemon::{ControlPlane, ServeConfig};
use falaj_control::db::{self, BundleRow, NewAgent, TokenRow};
use falaj_control::monitoring;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const GROUP: &str = "plant-a";
/// The group of the agent enrolled with the token the console shows.
const NEW_GROUP: &str = "plant-b";
const MODEL: &str = "pumps";
const AGENT: &str = "agent-7f3a";
const REGION: &str = "eu-west-1";
const PASSWORD: &str = "correct horse battery staple";
const FEATURES: [&str; 3] = ["temperature", "vibration", "pressure"];
/// How long any one thing may take to appear.
const DEADLINE: Duration = Duration::from_secs(20);

/// A control plane with data and a user of each role.
struct Plane {
    url: String,
    admin_token: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Values of feature `k` for the reference profile (and, shifted, for live traffic).
fn values(k: usize, shift: f64) -> Vec<f64> {
    (0..500u32).map(|i| f64::from(i % 50) * (k + 1) as f64 + shift).collect()
}

fn reference() -> DataProfile {
    let inputs = FEATURES
        .iter()
        .enumerate()
        .map(|(k, name)| ColumnProfile::of("sensors", k as u32, name, &values(k, 0.0), 10))
        .collect();
    DataProfile { rows: 500, inputs, outputs: vec![] }
}

/// A minute's window of `version` whose `vibration` reads 20 high.
fn window(version: u64, start: Timestamp, profile: &DataProfile) -> MetricsWindow {
    let mut latency = LatencySketch::default();
    for i in 0..120 {
        latency.record(800.0 + f64::from(i % 40) * 50.0);
    }
    let inputs = profile
        .inputs
        .iter()
        .enumerate()
        .map(|(k, column)| {
            let shift = if FEATURES[k] == "vibration" { 20.0 } else { 0.0 };
            let mut counts = vec![0u64; column.histogram.bin_count()];
            for v in values(k, shift) {
                if let Some(b) = column.histogram.bin(v) {
                    counts[b] += 1;
                }
            }
            counts
        })
        .collect();
    MetricsWindow {
        model: MODEL.into(),
        version,
        start,
        seconds: 60,
        counts: Counts {
            requests: 120,
            errors: 2,
            latency,
            rows: 120,
            inputs,
            ..Counts::default()
        },
    }
}

fn seed(conn: &mut rusqlite::Connection, now: Timestamp) -> rusqlite::Result<()> {
    let profile = reference();
    for v in 1..=2u64 {
        let hash = |what: &str| Sha256::of(format!("{what} {v}").as_bytes());
        db::insert_bundle(
            conn,
            &BundleRow {
                name: MODEL.into(),
                version: v,
                manifest_sha256: hash("manifest"),
                bundle_sha256: hash("bundle"),
                recipe_sha256: hash("recipe"),
                size: 180_000 * v,
                chunks: 3,
                pushed_at: now,
            },
        )?;
        monitoring::set_reference(conn, MODEL, v, &profile)?;
    }
    let (token, secret) = ("token-1".to_owned(), Sha256::of(b"agent secret"));
    let expires = now.saturating_add(Duration::from_secs(3600));
    db::insert_token(
        conn,
        &TokenRow { id: token.clone(), group: GROUP.into(), region: REGION.into(), expires },
        secret,
        now,
    )?;
    let agent = NewAgent {
        id: AGENT.into(),
        hostname: "pump-station-3".into(),
        agent_version: "0.1.0".into(),
        serial: "serial-1".into(),
        cert_expires: expires,
    };
    let used = db::TokenUse { token_id: token, secret_sha256: secret, csr_sha256: secret };
    db::enroll(conn, &used, REGION, &agent, now)?.expect("the token enrolls the agent");
    db::deploy(conn, GROUP, MODEL, 1, now)?;
    finetuned(conn, now)?;
    let held = monitoring::Held::from([(MODEL.to_owned(), 1)]);
    for i in 0..60u64 {
        let start = Timestamp::from_unix(now.unix() - 3600 + i * 60);
        let batch = [SequencedWindow { seq: i + 1, window: window(1, start, &profile) }];
        monitoring::insert_windows(conn, AGENT, &held, &batch, start)?;
    }
    Ok(())
}

/// The derived model the agent reports from its fine-tune job.
const DERIVED: &str = "pumps.site-tuned";

/// A fine-tune job ordered on the agent and its report: the lineage of a derived model.
fn finetuned(conn: &mut rusqlite::Connection, now: Timestamp) -> rusqlite::Result<()> {
    use falaj_common::finetune::{
        DataSource, DesiredJob, EpochStats, Gate, Hyperparameters, Job, JobReport, JobState,
        Lineage, Metrics, Objective, TrainEngine,
    };
    let job = DesiredJob {
        id: "ft-1".into(),
        job: Job {
            model: MODEL.into(),
            version: Some(1),
            data: DataSource {
                file: "/var/lib/site/pumps.csv".into(),
                label: "fault".into(),
                features: None,
                entity: None,
            },
            hyperparameters: Hyperparameters::default(),
            gate: Gate::default(),
            engine: TrainEngine::Cpu,
        },
        share_weights: false,
    };
    falaj_control::finetune::order(conn, AGENT, &job, now)?;
    let (before, after) =
        (Metrics { loss: 0.61, accuracy: Some(0.81) }, Metrics { loss: 0.42, accuracy: Some(0.9) });
    let report = JobReport {
        id: job.id.clone(),
        state: JobState::Succeeded,
        detail: None,
        derived: Some(DERIVED.into()),
        lineage: Some(Lineage {
            parent: MODEL.into(),
            parent_version: 1,
            parent_manifest_sha256: Sha256::of(b"manifest 1"),
            data_sha256: Sha256::of(b"the site's rows"),
            train_rows: 800,
            held_out_rows: 200,
            objective: Objective::CrossEntropy,
            hyperparameters: Hyperparameters::default(),
            engine: "cpu".into(),
            before,
            after,
            best_epoch: 3,
            epochs: (1..=4)
                .map(|e| EpochStats { epoch: e, train_loss: 1.0 / f64::from(e), validation: after })
                .collect(),
            gate: Gate::default().judge(&before, &after),
        }),
        weights: None,
    };
    falaj_control::finetune::record_reports(conn, AGENT, &[report], now)
}

async fn plane() -> Plane {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::new(dir.path());
    config.quic = "127.0.0.1:0".parse().unwrap();
    config.admin = "127.0.0.1:0".parse().unwrap();
    config.region = Some(REGION.into());
    let control = ControlPlane::start(config).await.unwrap();
    let url = format!("http://{}", control.admin_addr());
    let (admin_token, shared) = (control.admin_token().to_owned(), control.shared());
    let now = Timestamp::from_system(SystemTime::now());
    shared.db.call(move |c| seed(c, now)).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(control.run(async { drop(stopped.await) }));
    let plane = Plane { url, admin_token, http: reqwest::Client::new(), _dir: dir, _stop: stop };
    for (name, role) in
        [("ada", "admin"), ("otto", "operator"), ("vera", "viewer"), ("aude", "auditor")]
    {
        let added = plane
            .api(
                reqwest::Method::POST,
                "/v1/users",
                json!({"name": name, "role": role, "password": PASSWORD}),
            )
            .await;
        assert_eq!(added.0, 201, "adding {name}: {}", added.1);
    }
    plane
}

impl Plane {
    /// A call of the JSON API with the admin token: status and body.
    async fn api(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let mut request =
            self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.admin_token);
        if !body.is_null() {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Audit entries of `actor` (newest last).
    async fn audit_of(&self, actor: &str) -> Vec<Value> {
        let (status, body) = self
            .api(reqwest::Method::GET, &format!("/v1/audit?actor={actor}&limit=1000"), Value::Null)
            .await;
        assert_eq!(status, 200);
        body.as_array().cloned().unwrap_or_default()
    }

    async fn start_rollout(&self) {
        let body = json!({"group": GROUP, "model": MODEL, "candidate": 2, "strategy": "canary",
            "steps": [10.0, 50.0, 100.0], "step_interval_seconds": 3600, "guards": ["error_rate<0.5"]});
        let (status, answer) = self.api(reqwest::Method::POST, "/v1/rollouts", body).await;
        assert_eq!(status, 201, "{answer}");
    }

    async fn rollout_state(&self) -> String {
        let path = format!("/v1/groups/{GROUP}/rollouts/{MODEL}");
        let (_, body) = self.api(reqwest::Method::GET, &path, Value::Null).await;
        body["state"].as_str().unwrap_or_default().to_owned()
    }
}

// ---- the browser ----

/// Chromium under chromedriver, stopped when dropped.
struct Browser {
    client: Client,
    _driver: tokio::process::Child,
}

fn find(candidates: &[&str]) -> Option<PathBuf> {
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// The browser, or `None` (the test then reported as ignored, with the reason) when
/// Chromium or chromedriver is missing and `FALAJ_REQUIRE_BROWSER` is not set.
async fn browser() -> Option<Browser> {
    let driver = find(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]);
    let chromium = find(&["/usr/bin/chromium", "/usr/lib/chromium/chromium"]);
    let (Some(driver), Some(chromium)) = (driver, chromium) else {
        skip(
            "FALAJ_REQUIRE_BROWSER",
            "chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)",
        );
        return None;
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = tokio::process::Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver starts");
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({"binary": chromium, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--window-size=1280,1000", "--lang=en-GB"]}),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let started = Instant::now();
    let client = loop {
        // chromedriver takes a moment to listen: poll its port until the deadline.
        match ClientBuilder::new(connector.clone())
            .capabilities(capabilities.clone())
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
        {
            Ok(client) => break client,
            Err(e) if started.elapsed() < DEADLINE => {
                let _ = e;
                tokio::task::yield_now().await;
            }
            Err(e) => panic!("chromedriver did not answer within {DEADLINE:?}: {e}"),
        }
    };
    Some(Browser { client, _driver: child })
}

/// A real agent, enrolled over QUIC with `token` and syncing, stopped when dropped.
struct RunningAgent {
    id: String,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn enroll_agent(quic: &str, token: &str) -> RunningAgent {
    use falaj_agent::enroll::{EnrollOptions, enroll};
    let dir = tempfile::tempdir().unwrap();
    let options = EnrollOptions {
        control_plane: quic.to_owned(),
        token: token.to_owned(),
        hostname: "pump-station-9".into(),
        region: Some(REGION.into()),
    };
    let identity =
        enroll(dir.path(), &options, SystemTime::now()).await.expect("the token enrolls");
    let serve = falaj_agent::server::ServeConfig {
        http: "127.0.0.1:0".parse().unwrap(),
        ..falaj_agent::server::ServeConfig::default()
    };
    let sync = falaj_agent::sync::SyncConfig {
        heartbeat: Duration::from_secs(1),
        ..falaj_agent::sync::SyncConfig::default()
    };
    let agent =
        falaj_agent::daemon::Agent::start(dir.path().to_owned(), serve, sync).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(agent.run(async { drop(stopped.await) }));
    RunningAgent { id: identity.agent_id, _stop: stop, _dir: dir }
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl Browser {
    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    /// Waits (polling, with a deadline) for an element matching `css` whose text holds `needle`.
    async fn wait_text(&self, css: &str, needle: &str) -> String {
        let started = Instant::now();
        loop {
            if let Ok(elements) = self.client.find_all(Locator::Css(css)).await {
                for e in elements {
                    if let Ok(text) = e.text().await
                        && text.contains(needle)
                    {
                        return text;
                    }
                }
            }
            if started.elapsed() > DEADLINE {
                let url =
                    self.client.current_url().await.map(|u| u.to_string()).unwrap_or_default();
                let page = self.client.source().await.unwrap_or_default();
                panic!(
                    "no {css:?} with text {needle:?} on {url} within {DEADLINE:?}; the page:\n{page}"
                );
            }
            tokio::task::yield_now().await;
        }
    }

    /// Opens `url` again and again (the agent's state arrives with its reports) until an
    /// element matching `css` holds `needle`, within the deadline.
    async fn reload_until(&self, url: &str, css: &str, needle: &str) {
        let started = Instant::now();
        loop {
            self.goto(url).await;
            if let Ok(elements) = self.client.find_all(Locator::Css(css)).await {
                for e in elements {
                    if e.text().await.is_ok_and(|t| t.contains(needle)) {
                        return;
                    }
                }
            }
            let page = self.client.source().await.unwrap_or_default();
            assert!(started.elapsed() < DEADLINE, "no {css:?} with {needle:?} on {url}:\n{page}");
        }
    }

    async fn count(&self, css: &str) -> usize {
        self.client.find_all(Locator::Css(css)).await.map_or(0, |v| v.len())
    }

    async fn fill(&self, css: &str, text: &str) {
        let field =
            self.client.wait().at_most(DEADLINE).for_element(Locator::Css(css)).await.unwrap();
        field.clear().await.unwrap();
        field.send_keys(text).await.unwrap();
    }

    async fn click(&self, css: &str) {
        let e = self
            .client
            .wait()
            .at_most(DEADLINE)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css:?} to click: {e}"));
        e.click().await.unwrap();
    }

    async fn select(&self, css: &str, value: &str) {
        let field =
            self.client.wait().at_most(DEADLINE).for_element(Locator::Css(css)).await.unwrap();
        field.select_by_value(value).await.unwrap_or_else(|e| panic!("{css} = {value}: {e}"));
    }

    async fn login(&self, plane: &Plane, user: &str) {
        self.login_with(plane, user, PASSWORD).await;
    }

    async fn login_with(&self, plane: &Plane, user: &str, password: &str) {
        self.goto(&format!("{}/login", plane.url)).await;
        self.fill("#user", user).await;
        self.fill("#password", password).await;
        self.click("main.login button[type=submit]").await;
        self.wait_text("form.logout .who", &format!("user:{user}")).await;
    }

    async fn logout(&self) {
        self.click("form.logout button").await;
        self.wait_text("main.login p.notice", "logged out").await;
    }

    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(screenshots().join(format!("{name}.png")), png).unwrap();
    }

    async fn session_cookie(&self) -> String {
        self.client.get_named_cookie("falaj_session").await.unwrap().value().to_owned()
    }
}

/// `request` with an URL-encoded form body.
fn form<K: serde::Serialize, V: serde::Serialize>(
    request: reqwest::RequestBuilder,
    pairs: &[(K, V)],
) -> reqwest::RequestBuilder {
    request
        .header("content-type", "application/x-www-form-urlencoded")
        .body(serde_urlencoded::to_string(pairs).unwrap())
}

fn actions(entries: &[Value]) -> Vec<String> {
    entries.iter().filter_map(|e| e["action"].as_str().map(str::to_owned)).collect()
}

/// An operator sees the fleet, starts a canary from the form and aborts it with the
/// button, creates an enrollment token and sees it once with its `falaj-agent enroll`
/// line, with which a real agent enrolls and appears connected in the fleet; an auditor
/// then finds each of those actions in the audit log, under the operator's name (and
/// the enrollment), and the chain verifies.
async fn an_operator_rolls_out_aborts_and_enrolls_and_the_auditor_sees_each_action() {
    let Some(b) = browser().await else { return };
    let plane = plane().await;
    b.login(&plane, "otto").await;
    b.goto(&format!("{}/fleet", plane.url)).await;
    b.wait_text("table td", AGENT).await;
    b.wait_text("table td", "pump-station-3").await;
    b.goto(&format!("{}/fleet?status=revoked", plane.url)).await;
    b.wait_text(".empty", "No agent matches these filters").await;

    b.goto(&format!("{}/rollouts", plane.url)).await;
    b.fill("#r-group", GROUP).await;
    b.fill("#r-model", MODEL).await;
    b.fill("#r-candidate", "2").await;
    b.fill("#r-steps", "10,50,100").await;
    b.click("#start button[type=submit]").await;
    b.wait_text("dl.facts .badge", "running").await;
    b.wait_text("dl.facts", "v1 → v2").await;
    assert_eq!(plane.rollout_state().await, "running");
    b.screenshot("rollout-running").await;
    b.click("form[action$='/abort'] button").await;
    b.wait_text("dl.facts .badge", "aborted").await;
    assert_eq!(plane.rollout_state().await, "aborted");
    assert_eq!(b.count("form[action$='/abort']").await, 0, "no abort button once aborted");

    b.goto(&format!("{}/rollouts", plane.url)).await;
    b.wait_text("#deployments td.version", "1").await;
    b.fill("#d-group", GROUP).await;
    b.fill("#d-model", MODEL).await;
    b.fill("#d-version", "2").await;
    b.click("#deploy button[type=submit]").await;
    b.wait_text("#deployments td.version", "2").await;
    let (_, deployed) = plane.api(reqwest::Method::GET, "/v1/deployments", Value::Null).await;
    assert!(deployed.to_string().contains("\"version\":2"), "{deployed}");

    b.goto(&format!("{}/tokens", plane.url)).await;
    b.fill("#t-group", NEW_GROUP).await;
    b.click("form.stack button[type=submit]").await;
    let line = b.wait_text("#enroll-line", "falaj-agent enroll --control-plane 127.0.0.1:").await;
    b.screenshot("enrollment-token").await;
    let token = line.split_whitespace().skip_while(|w| *w != "--token").nth(1).unwrap().to_owned();
    let parsed: falaj_common::enrollment::EnrollmentToken =
        token.parse().expect("the shown token parses");
    assert_eq!((parsed.group.as_str(), parsed.region.as_str()), (NEW_GROUP, REGION));
    let quic = line.split_whitespace().skip_while(|w| *w != "--control-plane").nth(1).unwrap();
    let agent = enroll_agent(quic, &token).await;
    b.reload_until(
        &format!("{}/fleet?group={NEW_GROUP}", plane.url),
        "table tbody tr",
        "connected",
    )
    .await;
    b.wait_text("table td", &agent.id).await;
    b.reload_until(&format!("{}/fleet?group={NEW_GROUP}", plane.url), "table tbody tr", "cpu")
        .await;
    b.screenshot("fleet-enrolled").await;
    b.logout().await;

    let by_operator = actions(&plane.audit_of("user:otto").await);
    for action in
        ["auth.login", "rollout.start", "rollout.abort", "deploy", "token.create", "auth.logout"]
    {
        assert!(by_operator.iter().any(|a| a == action), "{action} missing from {by_operator:?}");
    }
    b.login(&plane, "aude").await;
    b.goto(&format!("{}/audit?actor=user:otto", plane.url)).await;
    for action in ["rollout.start", "rollout.abort", "token.create", "auth.logout"] {
        b.wait_text("table td", action).await;
    }
    b.goto(&format!("{}/audit?action=enroll", plane.url)).await;
    b.wait_text("table td", &agent.id).await;
    b.wait_text("main p", "verifies").await;
    assert_eq!(b.count("nav a[href='/users']").await, 0, "an auditor manages no users");
    b.screenshot("audit").await;
}

/// A viewer reads the rollout but finds no button to change it and no form to start
/// one; posting the abort anyway with its own session is refused with the permission
/// named, audited, and the rollout runs on.
async fn a_viewer_finds_no_controls_and_is_refused_when_posting_anyway() {
    let Some(b) = browser().await else { return };
    let plane = plane().await;
    plane.start_rollout().await;
    b.login(&plane, "vera").await;
    b.goto(&format!("{}/rollouts/{GROUP}/{MODEL}", plane.url)).await;
    b.wait_text("dl.facts .badge", "running").await;
    assert_eq!(b.count("form[action$='/abort']").await, 0, "no abort button for a viewer");
    assert_eq!(b.count("form[action$='/promote']").await, 0);
    b.goto(&format!("{}/rollouts", plane.url)).await;
    b.wait_text("h2", "Rollouts").await;
    assert_eq!(b.count("form#start").await, 0, "no start form for a viewer");
    assert_eq!(b.count("form#deploy").await, 0, "no deploy form for a viewer");
    for hidden in ["/audit", "/users", "/tokens", "/apitokens"] {
        assert_eq!(
            b.count(&format!("nav a[href='{hidden}']")).await,
            0,
            "{hidden} in a viewer's navigation"
        );
    }
    let cookie = b.session_cookie().await;
    let refused = form(
        plane
            .http
            .post(format!("{}/rollouts/{GROUP}/{MODEL}/abort", plane.url))
            .header("cookie", format!("falaj_session={cookie}")),
        &[("csrf", "anything")],
    )
    .send()
    .await
    .unwrap();
    assert_eq!(refused.status(), 403);
    let text = refused.text().await.unwrap();
    assert!(text.contains("lacks permission manage_rollouts"), "{text}");
    assert_eq!(plane.rollout_state().await, "running");
    let entries = plane.audit_of("user:vera").await;
    assert!(
        entries.iter().any(|e| e["action"] == "manage_rollouts" && e["outcome"] == "refused"),
        "the refusal is audited: {entries:?}"
    );
    b.goto(&format!("{}/audit", plane.url)).await;
    b.wait_text("p.notice", "lacks permission read_audit").await;

    // The forms a viewer is not shown, posted anyway with this session's own CSRF token.
    let with = |r: reqwest::RequestBuilder| r.header("cookie", format!("falaj_session={cookie}"));
    let page = with(plane.http.get(format!("{}/fleet", plane.url))).send().await.unwrap();
    let token = csrf_in(&page.text().await.unwrap());
    let forged: [Forged; 7] = [
        ("/users", vec![("name", "mallory"), ("role", "admin")], "manage_users"),
        ("/users/ada/disable", vec![], "manage_users"),
        ("/users/vera/role", vec![("role", "admin")], "manage_users"),
        ("/users/ada/remove", vec![], "manage_users"),
        (
            "/apitokens",
            vec![("name", "mine"), ("role", "viewer"), ("ttl_seconds", "86400")],
            "manage_api_tokens",
        ),
        ("/apitokens/ci/revoke", vec![], "manage_api_tokens"),
        ("/deployments", vec![("group", GROUP), ("model", MODEL), ("version", "2")], "deploy"),
    ];
    for (path, fields, permission) in forged {
        let mut pairs = vec![("csrf", token.as_str())];
        pairs.extend(fields);
        let refused = form(with(plane.http.post(format!("{}{path}", plane.url))), &pairs)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 403, "{path}");
        let text = refused.text().await.unwrap();
        assert!(text.contains(&format!("lacks permission {permission}")), "{path}: {text}");
    }
    let (_, users) = plane.api(reqwest::Method::GET, "/v1/users", Value::Null).await;
    let users = users.to_string();
    assert!(!users.contains("mallory") && !users.contains("\"disabled_at\":\""), "{users}");
    assert!(users.contains("\"name\":\"vera\",\"role\":\"viewer\""), "{users}");
    let (_, tokens) = plane.api(reqwest::Method::GET, "/v1/apitokens", Value::Null).await;
    assert_eq!(tokens, json!([]), "no token was created");
    let (_, deployed) = plane.api(reqwest::Method::GET, "/v1/deployments", Value::Null).await;
    assert!(!deployed.to_string().contains("\"version\":2"), "{deployed}");
    let entries = plane.audit_of("user:vera").await;
    for permission in ["manage_users", "manage_api_tokens", "deploy"] {
        assert!(
            entries.iter().any(|e| e["action"] == permission && e["outcome"] == "refused"),
            "the refused {permission} is audited: {entries:?}"
        );
    }
}

/// A form posted where it is refused: path, fields, the permission named.
type Forged = (&'static str, Vec<(&'static str, &'static str)>, &'static str);

/// An admin adds a user from the console and sees its one-time password once; the user
/// logs in with it; the admin disables it (its login is then refused), enables it again,
/// changes its role and removes it; creates an API token, shown once, that opens the JSON API until the
/// admin revokes it from the console; each of those actions is in the audit log under
/// the admin's name, and an operator manages API tokens but not users.
async fn an_admin_manages_users_and_api_tokens_and_each_action_is_audited() {
    let Some(b) = browser().await else { return };
    let plane = plane().await;
    let users = format!("{}/users", plane.url);
    b.login(&plane, "ada").await;
    b.goto(&users).await;
    b.fill("#u-name", "nina").await;
    b.select("#u-role", "operator").await;
    b.click("#add-user button[type=submit]").await;
    let password = b.wait_text("#one-time-password", "").await.trim().to_owned();
    assert!(password.len() >= 12, "a generated password: {password:?}");
    b.wait_text("#users td", "nina").await;
    b.screenshot("user-added").await;
    b.goto(&users).await;
    b.wait_text("#users td", "nina").await;
    assert_eq!(b.count("#one-time-password").await, 0, "the password is shown once");
    b.logout().await;
    b.login_with(&plane, "nina", &password).await;
    b.wait_text("form.logout .who", "operator").await;
    b.logout().await;

    b.login(&plane, "ada").await;
    b.goto(&users).await;
    assert_eq!(b.count("form[action='/users/ada/remove']").await, 0, "no removing oneself");
    b.click("form[action='/users/nina/disable'] button").await;
    b.wait_text("p.notice", "User nina disabled.").await;
    let (status, _, text) = login(&no_redirects(), &plane.url, "nina", &password, false).await;
    assert_eq!(status, 401, "a disabled user cannot log in");
    assert!(text.contains("disabled"), "{text}");
    b.click("form[action='/users/nina/enable'] button").await;
    b.wait_text("p.notice", "User nina enabled again.").await;
    let (status, _, _) = login(&no_redirects(), &plane.url, "nina", &password, false).await;
    assert_eq!(status, 303, "enabled again, the user logs in");
    b.select("#role-nina", "viewer").await;
    b.click("form[action='/users/nina/role'] button").await;
    b.wait_text("p.notice", "User nina is now viewer (was operator).").await;
    let (_, listed) = plane.api(reqwest::Method::GET, "/v1/users", Value::Null).await;
    let nina = listed.as_array().unwrap().iter().find(|u| u["name"] == "nina").cloned();
    assert_eq!(nina.unwrap()["role"], "viewer", "{listed}");
    b.click("form[action='/users/nina/remove'] button").await;
    b.wait_text("p.notice", "User nina removed.").await;
    let (_, listed) = plane.api(reqwest::Method::GET, "/v1/users", Value::Null).await;
    assert!(!listed.to_string().contains("nina"), "{listed}");

    b.goto(&format!("{}/apitokens", plane.url)).await;
    b.wait_text(".empty", "No API token").await;
    b.fill("#k-name", "ci").await;
    b.select("#k-role", "operator").await;
    b.click("#create-token button[type=submit]").await;
    let secret = b.wait_text("#api-token", "").await.trim().to_owned();
    b.wait_text("#tokens td", "user:ada").await;
    b.screenshot("api-token-created").await;
    let whoami = || plane.http.get(format!("{}/v1/whoami", plane.url)).bearer_auth(&secret).send();
    let me = whoami().await.unwrap();
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.unwrap();
    assert_eq!((me["actor"].as_str(), me["role"].as_str()), (Some("token:ci"), Some("operator")));
    b.click("form[action='/apitokens/ci/revoke'] button").await;
    b.wait_text("p.notice", "API token ci revoked.").await;
    b.wait_text("#tokens td", "revoked").await;
    assert_eq!(whoami().await.unwrap().status(), 401, "the revoked token opens nothing");

    let by_admin = actions(&plane.audit_of("user:ada").await);
    let done = [
        "user.add",
        "user.set_role",
        "user.disable",
        "user.enable",
        "user.remove",
        "apitoken.create",
        "apitoken.revoke",
    ];
    for action in done {
        assert!(by_admin.iter().any(|a| a == action), "{action} missing from {by_admin:?}");
    }
    b.goto(&format!("{}/audit?actor=user:ada", plane.url)).await;
    for action in done {
        b.wait_text("table td", action).await;
    }
    b.logout().await;

    b.login(&plane, "otto").await;
    b.goto(&format!("{}/apitokens", plane.url)).await;
    b.wait_text("h2", "Create an API token").await;
    let roles = b.wait_text("#k-role", "operator").await;
    assert!(!roles.contains("admin") && !roles.contains("auditor"), "at most its own: {roles}");
    assert_eq!(b.count("nav a[href='/users']").await, 0, "an operator manages no users");
}

/// An admin opens every page; each has its data (the drift chart ranks the shifted
/// feature first) and a screenshot of each is kept for review.
async fn an_admin_opens_every_page_with_its_data() {
    let Some(b) = browser().await else { return };
    let plane = plane().await;
    plane.start_rollout().await;
    b.login(&plane, "ada").await;
    let pages = [
        ("overview", "/".to_owned(), ".cards", "agents connected"),
        ("fleet", "/fleet".to_owned(), "table", AGENT),
        ("agent", format!("/fleet/{AGENT}"), "dl.facts", "pump-station-3"),
        ("models", "/models".to_owned(), "main table", DERIVED),
        ("deployments", "/rollouts".to_owned(), "table", "v1 → v2"),
        ("rollout", format!("/rollouts/{GROUP}/{MODEL}"), "h2", "Guards"),
        ("metrics", format!("/monitoring?model={MODEL}"), "table", "vibration"),
        ("alerts", "/alerts".to_owned(), "h2", "Firing now"),
        ("features", "/features".to_owned(), ".empty", "features apply"),
        ("finetune", "/finetune".to_owned(), "table", DERIVED),
        ("audit-admin", "/audit".to_owned(), "table", "rollout.start"),
        ("users", "/users".to_owned(), "table", "vera"),
        ("api-tokens", "/apitokens".to_owned(), "form", "Create API token"),
        ("enroll", "/tokens".to_owned(), "form", "Create enrollment token"),
    ];
    for (name, path, css, needle) in pages {
        b.goto(&format!("{}{path}", plane.url)).await;
        b.wait_text(css, needle).await;
        b.screenshot(name).await;
    }
    b.goto(&format!("{}/monitoring?model={MODEL}", plane.url)).await;
    let first = b.wait_text("main table tbody tr", "histogram").await;
    assert!(first.starts_with("vibration"), "the shifted feature ranks first: {first}");
    assert!(
        b.count("figure svg[role=img]").await >= 4,
        "rate, errors, latency, drift and histogram charts"
    );
    b.click("main form.filters select#m-since option[value='24h']").await;
    b.click("main form.filters button").await;
    b.wait_text("main form.filters", "last 24h").await;
    assert!(
        b.client.current_url().await.unwrap().as_str().contains("since=24h"),
        "the span is in the URL"
    );

    // A tablet's width: the page itself never scrolls sideways (wide tables scroll in
    // their own box), and the keyboard reaches the skip link first.
    b.client.set_window_size(768, 1024).await.unwrap();
    for path in ["/fleet", "/rollouts", "/models", "/users", "/apitokens"] {
        b.goto(&format!("{}{path}", plane.url)).await;
        b.wait_text("main h1", "").await;
        let fits = b
            .client
            .execute(
                "return document.documentElement.scrollWidth <= document.documentElement.clientWidth",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(fits, json!(true), "{path} scrolls sideways at 768 px");
    }
    b.screenshot("api-tokens-tablet").await;
    let body = b.client.find(Locator::Css("body")).await.unwrap();
    body.send_keys("\u{e004}").await.unwrap();
    let first = b.client.active_element().await.unwrap();
    assert_eq!(first.text().await.unwrap(), "Skip to content", "Tab reaches the skip link first");
}

// ---- without a browser ----

fn cookie_value(response: &reqwest::Response, name: &str) -> Option<(String, String)> {
    response
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|line| {
            let value = line[name.len() + 1..].split(';').next().unwrap_or_default().to_owned();
            (value, line.to_owned())
        })
}

/// Logs `user` in with plain requests: the session cookie's value and its whole line.
async fn login(
    http: &reqwest::Client,
    url: &str,
    user: &str,
    password: &str,
    https: bool,
) -> (u16, Option<(String, String)>, String) {
    let page = http.get(format!("{url}/login")).send().await.unwrap();
    let (csrf, line) = cookie_value(&page, "falaj_login").expect("the login form sets its cookie");
    assert!(line.contains("HttpOnly") && line.contains("SameSite=Strict"), "{line}");
    let html = page.text().await.unwrap();
    assert!(
        html.contains(&format!("name=\"csrf\" value=\"{csrf}\"")),
        "the form carries the cookie's token"
    );
    let mut request = form(
        http.post(format!("{url}/login")).header("cookie", format!("falaj_login={csrf}")),
        &[("csrf", csrf.as_str()), ("user", user), ("password", password), ("next", "/fleet")],
    );
    if https {
        request = request.header("x-forwarded-proto", "https");
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let cookie = cookie_value(&response, "falaj_session").filter(|(v, _)| !v.is_empty());
    (status, cookie, response.text().await.unwrap())
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap()
}

/// The first CSRF token in a page.
fn csrf_in(html: &str) -> String {
    html.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned()
}

/// Logging in without a browser: a page asked for while logged out sends to the login
/// with the page to return to; a wrong password is refused; the session cookie is
/// HttpOnly and SameSite=Strict (and Secure behind TLS); pages carry the strict CSP and
/// no inline script, style or handler; the script is served from the binary.
async fn logging_in_sets_a_strict_cookie_and_pages_carry_a_strict_csp() {
    let plane = plane().await;
    plane.start_rollout().await;
    let (http, url) = (no_redirects(), &plane.url);
    let away = http.get(format!("{url}/fleet?group={GROUP}")).send().await.unwrap();
    assert_eq!(away.status(), 303);
    assert_eq!(away.headers()["location"], "/login?next=%2Ffleet%3Fgroup%3Dplant-a");

    let (status, cookie, text) = login(&http, url, "otto", "not the password at all", false).await;
    assert_eq!((status, cookie.is_none()), (401, true));
    assert!(text.contains("wrong user name or password"), "{text}");
    let (_, cookie, _) = login(&http, url, "otto", PASSWORD, true).await;
    assert!(cookie.unwrap().1.ends_with("HttpOnly; SameSite=Strict; Secure"), "Secure behind TLS");
    let (status, cookie, _) = login(&http, url, "otto", PASSWORD, false).await;
    assert_eq!(status, 303);
    let (session, line) = cookie.expect("a session cookie");
    assert!(line.ends_with("; HttpOnly; SameSite=Strict"), "{line}");

    let get = |path: String| {
        http.get(format!("{url}{path}")).header("cookie", format!("falaj_session={session}")).send()
    };
    let page = get("/fleet".into()).await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.starts_with("default-src 'self'") && !csp.contains("unsafe-inline"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let pages = [
        "/".into(),
        "/fleet".into(),
        format!("/rollouts/{GROUP}/{MODEL}"),
        format!("/monitoring?model={MODEL}"),
        "/tokens".into(),
    ];
    for path in pages {
        let html = get(path.clone()).await.unwrap().text().await.unwrap();
        let scripts = html.matches("<script").count();
        assert_eq!(scripts, html.matches("<script src=\"/assets/console.js\"").count(), "{path}");
        assert!(
            !html.contains(" style=") && !html.contains("<style") && !html.contains(" onclick="),
            "inline style or handler on {path}"
        );
    }
    let js = http.get(format!("{url}/assets/console.js")).send().await.unwrap();
    assert_eq!(js.headers()["content-type"], "text/javascript; charset=utf-8");
}

/// Forms without a browser: a form without this session's CSRF token, or posted from
/// another origin, is refused and changes nothing, while the same form with the token
/// from this origin works; an API token is no console session; logout ends the session
/// and clears the cookie.
async fn forms_need_the_sessions_token_from_this_origin_and_logout_ends_the_session() {
    let plane = plane().await;
    plane.start_rollout().await;
    let (http, url) = (no_redirects(), &plane.url);
    let (_, cookie, _) = login(&http, url, "otto", PASSWORD, false).await;
    let (session, _) = cookie.expect("a session cookie");
    let with = |r: reqwest::RequestBuilder| r.header("cookie", format!("falaj_session={session}"));
    let abort = format!("{url}/rollouts/{GROUP}/{MODEL}/abort");
    let post = |pairs: Vec<(&'static str, String)>, origin: Option<String>| {
        let mut r = form(with(http.post(&abort)), &pairs);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    let forged = post(vec![("csrf", "0".repeat(64))], None).await.unwrap();
    assert_eq!(forged.status(), 403);
    assert!(forged.text().await.unwrap().contains("CSRF token"));
    assert_eq!(post(vec![], None).await.unwrap().status(), 403, "a form without a token");
    let page = with(http.get(format!("{url}/rollouts/{GROUP}/{MODEL}"))).send().await.unwrap();
    let token = csrf_in(&page.text().await.unwrap());
    let elsewhere = post(vec![("csrf", token.clone())], Some("http://evil.example".into())).await;
    assert_eq!(elsewhere.unwrap().status(), 403, "a form posted from another site");
    assert_eq!(plane.rollout_state().await, "running", "no refused form changed anything");
    let done = post(vec![("csrf", token.clone())], Some(url.clone())).await.unwrap();
    assert_eq!(done.status(), 303, "this session's token from this origin");
    assert_eq!(plane.rollout_state().await, "aborted");

    let body = json!({"name": "ci", "role": "operator", "ttl_seconds": 3600});
    let (_, created) = plane.api(reqwest::Method::POST, "/v1/apitokens", body).await;
    let api_token = created["token"].as_str().expect("an API token").to_owned();
    let not_a_session = http
        .get(format!("{url}/fleet"))
        .header("cookie", format!("falaj_session={api_token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(not_a_session.status(), 303, "an API token is not a console session");
    assert!(not_a_session.headers()["location"].to_str().unwrap().contains("reason="));

    let out = form(with(http.post(format!("{url}/logout"))), &[("csrf", token)]).send().await;
    let out = out.unwrap();
    assert_eq!(out.status(), 303);
    assert!(cookie_value(&out, "falaj_session").unwrap().1.contains("Max-Age=0"));
    let after = with(http.get(format!("{url}/fleet"))).send().await.unwrap();
    assert_eq!(after.status(), 303, "the ended session opens nothing");
    let location = after.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.contains("session+was+ended"), "{location}");
}

// ---- the harness ----

thread_local! {
    /// Why the test running on this thread skipped itself, if it did.
    static SKIPPED: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Records that the running test cannot run here, and why; the test then returns. With
/// `require` set in the environment it fails instead.
fn skip(require: &str, why: &str) {
    assert!(std::env::var_os(require).is_none(), "{require} is set but {why}");
    SKIPPED.with(|s| *s.borrow_mut() = Some(why.to_owned()));
}

/// A test of the harness: `test` runs on a two-worker runtime whose main future is polled
/// on the trial's thread (where [`skip`] records); ignored (with the reason) when it called
/// [`skip`], failed when it panicked (libtest-mimic catches the panic).
fn trial<F: Future<Output = ()> + 'static>(name: &str, test: fn() -> F) -> libtest_mimic::Trial {
    libtest_mimic::Trial::ignorable_test(name, move || {
        SKIPPED.with(|s| s.borrow_mut().take());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("the test's runtime starts")
            .block_on(test());
        Ok(match SKIPPED.with(|s| s.borrow_mut().take()) {
            Some(why) => libtest_mimic::Completion::ignored_with(why),
            None => libtest_mimic::Completion::Completed,
        })
    })
}

fn main() {
    let arguments = libtest_mimic::Arguments::from_args();
    let trials = vec![
        trial(
            "an_operator_rolls_out_aborts_and_enrolls_and_the_auditor_sees_each_action",
            an_operator_rolls_out_aborts_and_enrolls_and_the_auditor_sees_each_action,
        ),
        trial(
            "a_viewer_finds_no_controls_and_is_refused_when_posting_anyway",
            a_viewer_finds_no_controls_and_is_refused_when_posting_anyway,
        ),
        trial(
            "an_admin_manages_users_and_api_tokens_and_each_action_is_audited",
            an_admin_manages_users_and_api_tokens_and_each_action_is_audited,
        ),
        trial("an_admin_opens_every_page_with_its_data", an_admin_opens_every_page_with_its_data),
        trial(
            "logging_in_sets_a_strict_cookie_and_pages_carry_a_strict_csp",
            logging_in_sets_a_strict_cookie_and_pages_carry_a_strict_csp,
        ),
        trial(
            "forms_need_the_sessions_token_from_this_origin_and_logout_ends_the_session",
            forms_need_the_sessions_token_from_this_origin_and_logout_ends_the_session,
        ),
    ];
    libtest_mimic::run(&arguments, trials).exit();
}
