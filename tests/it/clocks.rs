//! Agents whose clocks are days off (issue 17): the real agent process runs under Debian's
//! libfaketime (`LD_PRELOAD`, the wall clock moved, the monotonic clock left alone so
//! tokio's timers run true) against a control plane on the true time.
//!
//! Days ahead: every desired-state document arrives expired and is refused with the
//! agent's own time in the error it reports; its metric windows are dated past the
//! control plane's skew bound and refused (counted, and logged with the skew); its
//! certificate looks two thirds spent, so it renews early and goes on connecting; a
//! rollout never reaches it (its document is refused like the others), so it serves the
//! baseline and counts in neither variant of the rollout's guards. Days
//! behind: the control plane's certificate is not yet valid to it, so it cannot connect,
//! and its log says so with its own time; it serves what it holds meanwhile.

use crate::fleet;
use crate::support;

use std::path::Path;
use std::time::Duration;

use falaj_agent::identity::IdentityFiles;
use falaj_common::rollout::Strategy;
use falaj_control::rollouts::StartRequest;
use fleet::{Control, eventually};
use support::{Process, infer, ok, s};

const MODEL: &str = "sensor-fault";
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// `falaj agent serve` on `dir` with its wall clock moved by `offset` (`+25d`, `-3d`).
fn serve_at(dir: &Path, offset: &str) -> Process {
    assert!(
        Path::new(FAKETIME).exists(),
        "{FAKETIME} is missing: install Debian's faketime package (.ci/run does)"
    );
    let args =
        ["agent", "serve", "--data-dir", s(dir), "--http", "127.0.0.1:0", "--heartbeat", "200ms"];
    Process::start_logging(
        &args,
        &[
            ("LD_PRELOAD", FAKETIME),
            ("FAKETIME", offset),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ("RUST_LOG", "warn"),
        ],
    )
}

/// Enrolls an agent in `work/NAME` (on the true time) and imports `bundle` into it, as an
/// air-gapped site would; returns its id.
async fn enrolled(control: &Control, dir: &Path, bundle: &Path) -> String {
    let token = control.token("edge").await;
    let quic = control.quic.to_string();
    let args =
        ["agent", "enroll", "--control-plane", &quic, "--token", &token, "--data-dir", s(dir)];
    let out = support::falaj_async(args.iter().map(|a| (*a).to_owned()).collect()).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8_lossy(&out.stdout).split_whitespace().nth(2).unwrap().to_owned();
    ok(&["agent", "import", s(bundle), "--data-dir", s(dir)]);
    id
}

/// The version named by a refusal of an expired document (`desired state version N ...`).
fn document_version(error: &str) -> Option<u64> {
    let rest = &error[error.find("desired state version ")? + "desired state version ".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// The control plane's count of refused metric windows (its Prometheus endpoint).
async fn refused_windows(control: &Control) -> f64 {
    let url = format!("{}/metrics", control.client.base());
    let text = reqwest::get(url).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("falaj_metric_windows_rejected"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_days_ahead_refuses_documents_naming_its_clock_and_its_windows_are_refused() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let control = Control::start(&work.join("control")).await;
    let bundle = control.push_sample(work, MODEL, 1).await;
    control.client.deploy("edge", MODEL, 1).await.unwrap();
    let dir = work.join("agent");
    let id = enrolled(&control, &dir, &bundle).await;
    let files = IdentityFiles::new(&dir);
    let (_, first_expiry) = files.validity().unwrap();

    // 25 days ahead: the 30-day certificate has less than a third of its life left.
    let mut agent = serve_at(&dir, "+25d");
    let http = agent.wait_for_addr("serving the Open Inference Protocol");
    let refused = tokio::task::block_in_place(|| agent.saw_or_wait_for("desired state refused"));
    assert!(
        refused.contains("expired") && refused.contains("this agent's clock reads"),
        "{refused}"
    );
    // The control plane hears it too, in the agent's report.
    eventually(Duration::from_secs(60), "the agent reports its clock", || async {
        let agents = control.client.agents().await.unwrap();
        agents
            .iter()
            .any(|a| a.id == id && a.errors.iter().any(|e| e.contains("this agent's clock reads")))
    })
    .await;

    // It serves what it holds; its windows, dated 25 days ahead, are refused and counted.
    let before = refused_windows(&control).await;
    for _ in 0..5 {
        assert_eq!(infer(http, MODEL).await, Some(1));
    }
    eventually(Duration::from_secs(60), "its windows are refused", || async {
        refused_windows(&control).await > before
    })
    .await;
    let view = control.client.metrics(MODEL, None, None, None, Duration::from_secs(3600));
    let counted = view.await.unwrap().versions.iter().map(|v| v.requests).sum::<u64>();
    assert_eq!(counted, 0, "no window dated in the future is stored");

    // Renewed early, on the control plane's time, and still connecting.
    eventually(Duration::from_secs(60), "the certificate is renewed", || async {
        files.validity().is_ok_and(|(_, expiry)| expiry > first_expiry)
    })
    .await;

    // A rollout: the document that carries it is refused too (a later version than the
    // first refused), so the agent goes on serving the baseline, reports no step, and
    // nothing it serves counts in the rollout's guards.
    let first_refused = document_version(&refused).expect("the refusal names the version");
    control.push_sample(work, MODEL, 2).await;
    let start = StartRequest {
        group: "edge".into(),
        model: MODEL.into(),
        candidate: 2,
        strategy: Strategy::Ab,
        steps: None,
        step_interval_seconds: None,
        split: Some(50.0),
        mirror: None,
        guards: vec!["error_rate<0.02".into()],
        min_requests: Some(1),
    };
    control.client.start_rollout(&start).await.unwrap();
    eventually(Duration::from_secs(60), "the rollout's document is refused", || async {
        let agents = control.client.agents().await.unwrap();
        agents.iter().filter(|a| a.id == id).any(|a| {
            a.errors.iter().any(|e| {
                e.contains("this agent's clock reads")
                    && document_version(e).is_some_and(|v| v > first_refused)
            })
        })
    })
    .await;
    for _ in 0..20 {
        assert_eq!(infer(http, MODEL).await, Some(1), "only the baseline answers");
    }
    let view = control.client.rollout("edge", MODEL).await.unwrap();
    let me = view.agents.iter().find(|a| a.id == id).expect("the agent is in the group");
    assert!(me.report.is_none(), "it took no step: {:?}", me.report);
    let counted =
        view.variants.baseline.figures.requests + view.variants.candidate.figures.requests;
    assert_eq!(counted, 0, "its windows count in neither variant");
    assert_eq!(tokio::task::block_in_place(|| agent.terminate()), Some(0));
    control.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_days_behind_cannot_connect_says_why_with_its_clock_and_serves_what_it_holds() {
    let work = tempfile::tempdir().unwrap();
    let work = work.path();
    let control = Control::start(&work.join("control")).await;
    let bundle = control.push_sample(work, MODEL, 1).await;
    let dir = work.join("agent");
    let id = enrolled(&control, &dir, &bundle).await;

    let mut agent = serve_at(&dir, "-3d");
    let http = agent.wait_for_addr("serving the Open Inference Protocol");
    let ended =
        tokio::task::block_in_place(|| agent.saw_or_wait_for("control plane session ended"));
    assert!(ended.contains("this agent's clock reads"), "{ended}");
    assert!(!control.shared.connected(&id), "no session");
    assert_eq!(infer(http, MODEL).await, Some(1), "it serves what it holds");
    assert_eq!(tokio::task::block_in_place(|| agent.terminate()), Some(0));
    control.stop().await;
}
