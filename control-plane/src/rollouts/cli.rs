//! `falaj-control rollout ...`: start a canary, A/B or shadow rollout of NAME@VERSION in a
//! group with its guards, show its status (figures per variant, guards, agents), promote,
//! abort, pause or resume it, and list rollouts. Guards and shares are checked here before
//! any request, so a typo fails with exit code 64 naming the text.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use falaj_common::rollout::{Share, Strategy, Verdict};
use falaj_common::time::Timestamp;

use super::{Action, Rollout, RolloutView, StartRequest, VariantView};
use crate::cli::{ApiArgs, Failure, online};

/// `rollout` subcommands.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a rollout of NAME@VERSION in a group; the baseline is the group's deployed
    /// version.
    Start(StartArgs),
    /// Show the latest rollout of a model in a group: step, share, figures per variant,
    /// guards, agents, and why it was rolled back.
    Status(StatusArgs),
    /// Make the candidate the group's deployment.
    Promote(TargetArgs),
    /// Stop the rollout; the baseline stays.
    Abort(TargetArgs),
    /// Hold the current share until resumed.
    Pause(TargetArgs),
    /// Continue the remaining steps from now.
    Resume(TargetArgs),
    /// List rollouts, newest first.
    List(ListArgs),
}

/// Arguments of `rollout start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The candidate, as NAME@VERSION (pushed already).
    pub target: String,
    #[arg(long)]
    pub group: String,
    /// canary (a share that grows by steps; the last promotes), ab (a split held until
    /// promoted or aborted) or shadow (mirrored requests; answers compared, discarded).
    #[arg(long, value_parser = parse_strategy)]
    pub strategy: Strategy,
    /// Canary: the candidate's percent of requests at each step [default: 5,25,50,100].
    #[arg(long)]
    pub steps: Option<String>,
    /// Canary: the time between steps [default: 10m].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub step_interval: Option<Duration>,
    /// A/B: the candidate's percent of requests [default: 50].
    #[arg(long)]
    pub split: Option<String>,
    /// Percent of requests also run on the candidate [default: 100 for shadow, else 0].
    #[arg(long)]
    pub mirror: Option<String>,
    /// A condition the candidate must hold to (repeatable): error_rate<0.02, p99_ms<40,
    /// psi<0.25, agreement>0.9, accuracy>=baseline-0.02, mae<=baseline+0.5.
    #[arg(long = "guard", value_name = "EXPR")]
    pub guards: Vec<String>,
    /// Requests (or labelled or compared rows) each variant needs before a guard is
    /// judged [default: 200].
    #[arg(long)]
    pub min_requests: Option<u64>,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `rollout status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    pub model: String,
    #[arg(long)]
    pub group: String,
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `rollout promote|abort|pause|resume`.
#[derive(Debug, Args)]
pub struct TargetArgs {
    pub model: String,
    #[arg(long)]
    pub group: String,
    #[command(flatten)]
    api: ApiArgs,
}

/// Arguments of `rollout list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this group.
    #[arg(long)]
    pub group: Option<String>,
    #[command(flatten)]
    api: ApiArgs,
}

fn parse_strategy(text: &str) -> Result<Strategy, String> {
    [Strategy::Canary, Strategy::Ab, Strategy::Shadow]
        .into_iter()
        .find(|s| s.name() == text)
        .ok_or_else(|| format!("{text:?} is not a strategy: canary, ab or shadow"))
}

fn usage(message: String) -> Failure {
    Failure::usage(anyhow::anyhow!(message))
}

/// A percentage as written on the command line (`12.5`, `12.5%`).
fn percent(option: &str, text: &str) -> Result<f64, Failure> {
    text.parse::<Share>().map(Share::percent).map_err(|e| usage(format!("--{option}: {e}")))
}

/// The request `rollout start` sends, checked as the control plane would check it before
/// looking at its database: a bad guard, share or step list fails with exit code 64.
pub fn start_request(args: &StartArgs) -> Result<StartRequest, Failure> {
    let (model, version) = args
        .target
        .split_once('@')
        .and_then(|(n, v)| Some((n.to_owned(), v.parse::<u64>().ok()?)))
        .ok_or_else(|| usage(format!("expected NAME@VERSION, got {:?}", args.target)))?;
    let steps = args
        .steps
        .as_deref()
        .map(|s| s.split(',').map(|p| percent("steps", p)).collect::<Result<Vec<_>, _>>())
        .transpose()?;
    let request = StartRequest {
        group: args.group.clone(),
        model,
        candidate: version,
        strategy: args.strategy,
        steps,
        step_interval_seconds: args.step_interval.map(|d| d.as_secs()),
        split: args.split.as_deref().map(|s| percent("split", s)).transpose()?,
        mirror: args.mirror.as_deref().map(|s| percent("mirror", s)).transpose()?,
        guards: args.guards.clone(),
        min_requests: args.min_requests,
    };
    request.plan().map_err(|e| usage(e.to_string()))?;
    Ok(request)
}

/// Runs a `rollout` command.
pub fn run(command: RolloutCommand) -> Result<(), Failure> {
    match command {
        RolloutCommand::Start(args) => {
            let request = start_request(&args)?;
            online(&args.api, |c| async move {
                let view = c.start_rollout(&request).await?;
                let r = &view.rollout;
                println!(
                    "started {} ({}): {} {} -> {} in group {}, candidate share {} now",
                    r.id,
                    r.strategy.name(),
                    r.model,
                    r.baseline,
                    r.candidate,
                    r.group,
                    view.share
                );
                Ok(())
            })
        }
        RolloutCommand::Status(args) => online(&args.api, |c| async move {
            let view = c.rollout(&args.group, &args.model).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&view).expect("views serialise"));
            } else {
                print!("{}", render_status(&view));
            }
            Ok(())
        }),
        RolloutCommand::Promote(args) => act(args, Action::Promote),
        RolloutCommand::Abort(args) => act(args, Action::Abort),
        RolloutCommand::Pause(args) => act(args, Action::Pause),
        RolloutCommand::Resume(args) => act(args, Action::Resume),
        RolloutCommand::List(args) => online(&args.api, |c| async move {
            print!("{}", render_list(&c.rollouts(args.group.as_deref(), None).await?));
            Ok(())
        }),
    }
}

fn act(args: TargetArgs, action: Action) -> Result<(), Failure> {
    online(&args.api, |c| async move {
        let view = c.rollout_action(&args.group, &args.model, action).await?;
        let r = &view.rollout;
        println!(
            "{} of {} in group {}: {} (candidate {}, share {})",
            r.id,
            r.model,
            r.group,
            r.state.name(),
            r.candidate,
            view.share
        );
        Ok(())
    })
}

/// What `rollout list` prints.
pub fn render_list(rollouts: &[Rollout]) -> String {
    let now = Timestamp::from_system(SystemTime::now());
    let mut out = format!(
        "{:<8} {:<12} {:<20} {:>8} {:>9} {:<8} {:<12} {:>7} {:<21}\n",
        "ROLLOUT",
        "GROUP",
        "MODEL",
        "BASELINE",
        "CANDIDATE",
        "STRATEGY",
        "STATE",
        "SHARE",
        "STARTED"
    );
    for r in rollouts {
        let _ = writeln!(
            out,
            "{:<8} {:<12} {:<20} {:>8} {:>9} {:<8} {:<12} {:>7} {:<21}",
            r.id,
            r.group,
            r.model,
            r.baseline,
            r.candidate,
            r.strategy.name(),
            r.state.name(),
            r.share_at(now).to_string(),
            r.created_at.to_string()
        );
    }
    out
}

fn num(x: Option<f64>) -> String {
    x.map_or_else(|| "-".to_owned(), |x| format!("{x:.4}"))
}

fn variant_row(out: &mut String, name: &str, v: &VariantView) {
    let f = &v.figures;
    let ms = |x: Option<f64>| x.map_or_else(|| "-".to_owned(), |x| format!("{x:.3}"));
    let _ = writeln!(
        out,
        "{:<10} {:>7} {:>9} {:>7} {:>8.2}% {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>7}",
        name,
        v.version,
        f.requests,
        f.errors,
        f.error_rate * 100.0,
        ms(f.p50_ms),
        ms(f.p99_ms),
        num(v.agreement),
        num(v.accuracy),
        num(v.mae),
        f.labelled,
        num(f.psi),
    );
}

/// What `rollout status` prints: the rollout, its step and share, a row per variant, the
/// guards with their values and verdicts, and the group's agents.
pub fn render_status(view: &RolloutView) -> String {
    let r = &view.rollout;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rollout {}: {} {} -> {} in group {} ({}), {}",
        r.id,
        r.model,
        r.baseline,
        r.candidate,
        r.group,
        r.strategy.name(),
        r.state.name()
    );
    if let Some(reason) = &r.reason {
        // Agents' words, escaped: they reach an operator's terminal.
        let _ = writeln!(out, "  reason: {}", falaj_common::text::printable(reason));
    }
    let step = view.step.map_or_else(|| "-".to_owned(), |i| (i + 1).to_string());
    let _ = write!(out, "  step {step}/{}, candidate share {}", r.plan.shares.len(), view.share);
    if r.mirror != Share::NONE {
        let _ = write!(out, ", mirroring {} to the candidate", r.mirror);
    }
    out.push('\n');
    if let Some(next) = r.steps.iter().find(|s| s.at > view.at).filter(|_| r.state.under_way()) {
        let _ = writeln!(out, "  next step: {} at {}", next.share, next.at);
    }
    let ended = r.ended_at.map(|t| format!(", ended {t}")).unwrap_or_default();
    let _ = writeln!(
        out,
        "  started {}{ended}; guards judged after {} observations per variant",
        r.created_at, r.min_requests
    );
    let _ = writeln!(
        out,
        "\n{:<10} {:>7} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>7}",
        "VARIANT",
        "VERSION",
        "REQUESTS",
        "ERRORS",
        "ERROR %",
        "P50 ms",
        "P99 ms",
        "AGREEMENT",
        "ACCURACY",
        "MAE",
        "LABELLED",
        "PSI"
    );
    variant_row(&mut out, "baseline", &view.variants.baseline);
    variant_row(&mut out, "candidate", &view.variants.candidate);
    if let Some(p) = view.accuracy_p_value {
        let _ = writeln!(out, "accuracy difference p-value (two-proportion z-test): {p:.4}");
    }
    let dropped = view.variants.candidate.figures.shadow_dropped;
    if dropped > 0 {
        let _ = writeln!(out, "mirrored requests dropped (candidate queue full): {dropped}");
    }
    render_guards(&mut out, view);
    render_agents(&mut out, view);
    out
}

fn render_guards(out: &mut String, view: &RolloutView) {
    if view.guard_results.is_empty() {
        out.push_str("\nno guards\n");
    } else {
        let _ = writeln!(
            out,
            "\n{:<28} {:>10} {:>10} {:>8} {:<8}",
            "GUARD", "VALUE", "BOUND", "OVER", "VERDICT"
        );
        for g in &view.guard_results {
            let verdict = match g.verdict {
                Verdict::Pending => "pending",
                Verdict::Holds => "holds",
                Verdict::Fails => "FAILS",
            };
            let _ = writeln!(
                out,
                "{:<28} {:>10} {:>10} {:>8} {:<8}",
                g.guard.to_string(),
                num(g.value),
                num(g.bound),
                g.observed,
                verdict
            );
        }
    }
}

fn render_agents(out: &mut String, view: &RolloutView) {
    let r = &view.rollout;
    if view.agents.is_empty() {
        out.push_str("\nno agents in the group\n");
        return;
    }
    let _ = writeln!(
        out,
        "\n{:<24} {:<10} {:>8} {:>6} {:<}",
        "AGENT", "SESSION", "DOCUMENT", "STEP", "ROLLOUT"
    );
    for a in &view.agents {
        let (step, state) = match &a.report {
            None => ("-".to_owned(), "not reported".to_owned()),
            Some(rep) => (
                rep.step.map_or_else(
                    || "-".to_owned(),
                    |i| format!("{}/{}", i + 1, r.plan.shares.len()),
                ),
                if rep.rolled_back {
                    format!(
                        "rolled back: {}",
                        falaj_common::text::printable(
                            rep.reason.as_deref().unwrap_or("no reason given")
                        )
                    )
                } else {
                    "following".to_owned()
                },
            ),
        };
        let _ = writeln!(
            out,
            "{:<24} {:<10} {:>8} {:>6} {}",
            a.id,
            if a.connected { "connected" } else { "offline" },
            a.applied_version.map_or_else(|| "-".to_owned(), |v| format!("v{v}")),
            step,
            state
        );
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use falaj_common::rollout::{Figures, GuardResult, RolloutReport, judge};

    use super::*;
    use crate::cli::{Cli, Command};
    use crate::rollouts::view::{AgentRollout, Variants};

    fn args(extra: &[&str]) -> StartArgs {
        let mut line = vec!["falaj-control", "rollout", "start", "pumps@2", "--group", "plant-a"];
        line.extend(extra);
        match Cli::try_parse_from(line).unwrap().command {
            Command::Rollout(RolloutCommand::Start(args)) => args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn start_arguments_become_the_request() {
        let request = start_request(&args(&[
            "--strategy",
            "canary",
            "--steps",
            "10,50%,100",
            "--step-interval",
            "2m",
            "--guard",
            "error_rate<0.02",
            "--guard",
            "accuracy >= baseline-0.02",
            "--min-requests",
            "50",
        ]))
        .unwrap();
        assert_eq!((request.model.as_str(), request.candidate), ("pumps", 2));
        assert_eq!(request.steps, Some(vec![10.0, 50.0, 100.0]));
        assert_eq!((request.step_interval_seconds, request.min_requests), (Some(120), Some(50)));
        let shadow = start_request(&args(&["--strategy", "shadow", "--mirror", "25"])).unwrap();
        assert_eq!((shadow.mirror, shadow.steps), (Some(25.0), None));
    }

    #[test]
    fn bad_guards_and_shares_exit_64_naming_the_text() {
        let cases: [(&[&str], &str); 6] = [
            (
                &["--strategy", "canary", "--guard", "latency<40"],
                "guard \"latency<40\": unknown metric",
            ),
            (&["--strategy", "canary", "--guard", "p99_ms<fast"], "\"fast\" is not a number"),
            (
                &["--strategy", "canary", "--steps", "5,120,100"],
                "--steps: share \"120\" is not a percentage",
            ),
            (
                &["--strategy", "ab", "--split", "half"],
                "--split: share \"half\" is not a percentage",
            ),
            (&["--strategy", "canary", "--steps", "50,25,100"], "must increase strictly"),
            (
                &["--strategy", "shadow", "--split", "10"],
                "a split applies to ab rollouts, not shadow",
            ),
        ];
        for (extra, needle) in cases {
            let failure = start_request(&args(extra)).unwrap_err();
            assert_eq!(failure.code(), crate::cli::EXIT_USAGE, "{extra:?}");
            assert!(failure.message().contains(needle), "{extra:?}: {}", failure.message());
        }
        let mut bad = args(&["--strategy", "ab"]);
        bad.target = "pumps".into();
        assert!(start_request(&bad).unwrap_err().message().contains("NAME@VERSION"));
        assert!(
            Cli::try_parse_from([
                "falaj-control",
                "rollout",
                "start",
                "p@2",
                "--group",
                "g",
                "--strategy",
                "blue"
            ])
            .unwrap_err()
            .to_string()
            .contains("not a strategy")
        );
    }

    #[test]
    fn status_shows_variants_guards_agents_and_the_reason() {
        let planned = start_request(&args(&["--strategy", "ab", "--guard", "error_rate<0.02"]))
            .unwrap()
            .plan()
            .unwrap();
        let now = Timestamp::from_unix(1_800_000_000);
        let baseline = Figures {
            requests: 500,
            errors: 1,
            error_rate: 0.002,
            labelled: 100,
            correct: 90,
            ..Figures::default()
        };
        let candidate = Figures {
            requests: 480,
            errors: 24,
            error_rate: 0.05,
            labelled: 100,
            correct: 70,
            ..Figures::default()
        };
        let guard_results: Vec<GuardResult> = judge(&planned.guards, 200, &baseline, &candidate);
        let rollout = Rollout {
            id: "ro-1".into(),
            group: "plant-a".into(),
            model: "pumps".into(),
            baseline: 1,
            candidate: 2,
            strategy: planned.strategy,
            steps: planned.steps(now),
            plan: planned.plan,
            mirror: planned.mirror,
            guards: planned.guards,
            min_requests: 200,
            state: crate::rollouts::RolloutState::RolledBack,
            reason: Some("agent a-1: error_rate<0.02 failed".into()),
            created_at: now,
            updated_at: now,
            ended_at: Some(now),
        };
        let view = RolloutView {
            at: now,
            step: None,
            share: Share::NONE,
            variants: Variants {
                baseline: VariantView {
                    version: 1,
                    figures: baseline,
                    agreement: None,
                    accuracy: Some(0.9),
                    mae: None,
                },
                candidate: VariantView {
                    version: 2,
                    figures: candidate,
                    agreement: None,
                    accuracy: Some(0.7),
                    mae: None,
                },
            },
            guard_results,
            accuracy_p_value: Some(0.0012),
            agents: vec![AgentRollout {
                id: "a-1".into(),
                connected: true,
                last_seen: Some(now),
                applied_version: Some(7),
                report: Some(RolloutReport {
                    id: "ro-1".into(),
                    step: Some(0),
                    rolled_back: true,
                    reason: Some("error_rate<0.02 failed".into()),
                    at: Some(now),
                }),
            }],
            rollout,
        };
        let text = render_status(&view);
        for needle in [
            "rollout ro-1: pumps 1 -> 2 in group plant-a (ab), rolled_back",
            "reason: agent a-1: error_rate<0.02 failed",
            "candidate        2       480      24     5.00%",
            "p-value (two-proportion z-test): 0.0012",
            "error_rate<0.02                  0.0500     0.0200      480 FAILS",
            "a-1                      connected        v7    1/1 rolled back: error_rate<0.02 failed",
        ] {
            assert!(text.contains(needle), "{needle:?} not in\n{text}");
        }
        let json = serde_json::to_string(&view).unwrap();
        assert_eq!(serde_json::from_str::<RolloutView>(&json).unwrap(), view);
    }
}
