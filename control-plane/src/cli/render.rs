//! What the commands print: the tables and reports, as strings, apart from fetching them.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use falaj_common::drift::DriftScores;
use falaj_common::metrics::ColumnDrift;
use falaj_common::text::printable;
use falaj_common::time::Timestamp;
use falaj_common::trust::{Role, TrustRoot};

use crate::admin::{
    AgentView, AlertsView, BundleView, MetricsView, NewEnrollmentToken, PushedView, ReSignedView,
};
use crate::sql::copy::TableCopy;

/// The table of `keys status`: every version of the trust root, then warnings for what
/// expires within 90 days.
pub fn render_keys_status(versions: &[TrustRoot], held: &[String], now: Timestamp) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<22} {:<10} {:<34} SIGNING KEYS",
        "VERSION", "EXPIRES", "STATE", "ROOT KEYS"
    );
    let role = |role: &Role| {
        let ids: Vec<String> = role
            .keyids
            .iter()
            .map(|id| {
                format!("{}{}", id.short(), if held.contains(&id.short()) { "*" } else { "" })
            })
            .collect();
        format!("{} of {}", role.threshold, ids.join(","))
    };
    for (i, root) in versions.iter().enumerate() {
        let state = if i + 1 < versions.len() {
            "previous"
        } else if root.expires() <= now {
            "EXPIRED"
        } else {
            "current"
        };
        let roles = &root.metadata().roles;
        let _ = writeln!(
            out,
            "{:<8} {:<22} {:<10} {:<34} {}",
            root.version(),
            root.expires().to_string(),
            state,
            role(&roles.root),
            role(&roles.signing)
        );
    }
    let _ = writeln!(out, "(* = private key in this directory)");
    if let Some(current) = versions.last()
        && let Some(days) = falaj_common::time::expiry_warning(now, current.expires())
    {
        let _ = writeln!(
            out,
            "WARNING: trust root version {} expires within {days} days ({}): rotate it with \
                 `falaj-control keys rotate-root`",
            current.version(),
            current.expires()
        );
    }
    out
}

/// The fleet table of `agents`. What agents report is printed escaped
/// ([`printable`]): a hostile agent cannot drive the terminal of whoever reads it.
pub fn render_agents(agents: &[AgentView]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<12} {:<10} {:<10} {:<6} {:<18} {:<22} {:<24} {:<24} ERRORS",
        "AGENT", "GROUP", "REGION", "STATUS", "READY", "ENGINES", "LAST SEEN", "ACTIVE", "HELD"
    );
    let list = |items: &[String]| {
        if items.is_empty() { "-".to_owned() } else { printable(&items.join(",")).into_owned() }
    };
    for a in agents {
        let engines: Vec<String> = a.engines.iter().map(|e| e.name.clone()).collect();
        let _ = writeln!(
            out,
            "{:<20} {:<12} {:<10} {:<10} {:<6} {:<18} {:<22} {:<24} {:<24} {}",
            printable(&a.id),
            printable(&a.group),
            printable(&a.region),
            printable(&a.status),
            if a.ready { "yes" } else { "no" },
            list(&engines),
            printable(a.last_seen.as_deref().unwrap_or("never")),
            list(&a.active),
            list(&a.held),
            list(&a.errors),
        );
    }
    out
}

/// The table of `bundle list`.
pub fn render_bundles(bundles: &[BundleView]) -> String {
    let mut out =
        format!("{:<24} {:>8} {:>12} {:>7} {}\n", "NAME", "VERSION", "BYTES", "CHUNKS", "PUSHED");
    for b in bundles {
        let _ = writeln!(
            out,
            "{:<24} {:>8} {:>12} {:>7} {}",
            printable(&b.name),
            b.version,
            b.size,
            b.chunks,
            printable(&b.pushed_at)
        );
    }
    out
}

/// The lines of `bundle re-sign`: each bundle, whether it was signed again, and by whom.
pub fn render_re_signed(views: &[ReSignedView]) -> String {
    let mut out = String::new();
    for v in views {
        let bundle = printable(&v.bundle);
        if let Some(reason) = &v.refused {
            let _ = writeln!(out, "{bundle}: not re-signed: {}", printable(reason));
            continue;
        }
        let what = if v.re_signed { "re-signed by" } else { "already signed by" };
        let _ = writeln!(out, "{bundle}: {what} {}", v.signed_by.join(", "));
    }
    out
}

/// The report of `migrate --from-sqlite`: each table's rows and digest (the same on both
/// sides, or nothing was committed), then the totals.
pub fn render_copied(copied: &[TableCopy], from: &str, to: &str) -> String {
    let mut out = format!("{:<20} {:>10}  {}\n", "TABLE", "ROWS", "DIGEST (SQLITE = POSTGRESQL)");
    for t in copied {
        let _ = writeln!(out, "{:<20} {:>10}  {}", t.table, t.rows, t.digest);
    }
    let rows: u64 = copied.iter().map(|t| t.rows).sum();
    let _ = writeln!(
        out,
        "copied {rows} rows in {} tables from {} into {}; every table's count and digest match",
        copied.len(),
        printable(from),
        printable(to)
    );
    out
}

/// The line of `bundle push`: registered, or already registered, and how much was new.
pub fn render_pushed(pushed: &PushedView) -> String {
    let b = &pushed.bundle;
    let verb = if pushed.created { "registered" } else { "already registered:" };
    format!(
        "{verb} {}@{} ({} bytes, {} chunks, {} new)\n",
        printable(&b.name),
        b.version,
        b.size,
        b.chunks,
        pushed.new_chunks
    )
}

/// What `token create` says of the token on stderr (the token alone goes to stdout).
pub fn render_token_header(token: &NewEnrollmentToken) -> String {
    format!(
        "enrollment token for group {} in region {}, valid until {}:\n",
        printable(&token.group),
        printable(&token.region),
        printable(&token.expires)
    )
}

/// The table `falaj-control metrics` prints: one row per version (rate, error rate,
/// latency quantiles, the largest drift scores), then each version's top drifting
/// features and its prediction drift.
pub fn render_metrics(view: &MetricsView) -> String {
    render_metrics_marked(view, &BTreeMap::new())
}

/// [`render_metrics`] with a VARIANT column naming each version's part in a rollout
/// (`baseline`, `candidate`), when `variants` names any.
pub fn render_metrics_marked(view: &MetricsView, variants: &BTreeMap<u64, &str>) -> String {
    let mut out = format!("{} since {}\n", view.model, view.since);
    if view.versions.is_empty() {
        out.push_str("no metric windows in that range\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<8} {:>6} {:>10} {:>9} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7}{}",
        "VERSION",
        "AGENTS",
        "REQUESTS",
        "RATE/S",
        "ERRORS",
        "P50 ms",
        "P95 ms",
        "P99 ms",
        "PSI max",
        "KS max",
        "JS max",
        if variants.is_empty() { "" } else { " VARIANT" }
    );
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
    for v in &view.versions {
        let columns: Vec<_> =
            v.drift.iter().flat_map(|d| d.inputs.iter().chain(&d.outputs)).collect();
        let max = |pick: fn(&DriftScores) -> f64| {
            columns
                .iter()
                .map(|c| pick(&c.scores))
                .reduce(f64::max)
                .map_or_else(|| "-".to_owned(), |m| format!("{m:.3}"))
        };
        let variant = if variants.is_empty() {
            String::new()
        } else {
            format!(" {}", variants.get(&v.version).copied().unwrap_or("-"))
        };
        let _ = writeln!(
            out,
            "{:<8} {:>6} {:>10} {:>9.1} {:>6.2}% {:>8} {:>8} {:>8} {:>8} {:>7} {:>7}{variant}",
            v.version,
            v.agents,
            v.requests,
            v.rate,
            v.error_rate * 100.0,
            ms(v.p50_ms),
            ms(v.p95_ms),
            ms(v.p99_ms),
            max(|s| s.psi),
            max(|s| s.ks),
            max(|s| s.js),
        );
    }
    for v in &view.versions {
        let Some(drift) = &v.drift else {
            let _ = writeln!(
                out,
                "version {}: no reference profile in the bundle, so no drift",
                v.version
            );
            continue;
        };
        let scores = |c: &ColumnDrift| {
            format!(
                "{} (psi {:.3}, ks {:.3}, js {:.3})",
                c.column, c.scores.psi, c.scores.ks, c.scores.js
            )
        };
        let top: Vec<String> = drift.top_inputs(3).into_iter().map(scores).collect();
        if !top.is_empty() {
            let _ =
                writeln!(out, "version {} top drifting features: {}", v.version, top.join(", "));
        }
        let predictions: Vec<String> = drift.outputs.iter().map(scores).collect();
        if !predictions.is_empty() {
            let _ =
                writeln!(out, "version {} prediction drift: {}", v.version, predictions.join(", "));
        }
        if v.dropped_windows > 0 {
            let _ = writeln!(
                out,
                "version {}: agents dropped {} windows ({} requests) from full outboxes",
                v.version, v.dropped_windows, v.dropped_requests
            );
        }
    }
    out
}

/// What `falaj-control alerts` prints.
pub fn render_alerts(view: &AlertsView) -> String {
    let mut out = String::new();
    if view.firing.is_empty() {
        out.push_str("no alerts firing\n");
    } else {
        let _ = writeln!(out, "{:<20} {:<40} {:<22} {:>10}", "FIRING", "SUBJECT", "SINCE", "VALUE");
        for f in &view.firing {
            let _ = writeln!(
                out,
                "{:<20} {:<40} {:<22} {:>10.4}",
                f.rule,
                f.subject,
                f.since.to_string(),
                f.value
            );
        }
    }
    if !view.events.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<22} {:<9} {:<20} {:<40} {:<14} {:>10} {:>10}",
            "AT", "STATE", "RULE", "SUBJECT", "METRIC", "VALUE", "THRESHOLD"
        );
        for e in &view.events {
            let _ = writeln!(
                out,
                "{:<22} {:<9} {:<20} {:<40} {:<14} {:>10.4} {:>10.4}",
                e.at.to_string(),
                e.state,
                e.rule,
                e.subject,
                e.metric,
                e.value,
                e.threshold
            );
        }
    }
    if !view.notifications.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<44} {:<32} {:<22} {:>8} {:<22} LAST ERROR",
            "NOTIFICATION WAITING", "TO", "RECORDED", "ATTEMPTS", "NEXT"
        );
        for n in &view.notifications {
            let _ = writeln!(
                out,
                "{:<44} {:<32} {:<22} {:>8} {:<22} {}",
                printable(&n.what),
                printable(&n.to),
                n.recorded.to_string(),
                n.attempts,
                n.next_at.to_string(),
                printable(n.last_error.as_deref().unwrap_or("-"))
            );
        }
    }
    out
}

#[cfg(test)]
// expect-test writes its snapshots as `r#"..."#` whether or not they need the hashes.
#[allow(clippy::needless_raw_string_hashes)]
mod tests {
    use falaj_common::metrics::Rollup;
    use falaj_common::time::Timestamp;

    use super::*;

    #[test]
    fn what_agents_report_cannot_drive_the_terminal() {
        let agents: Vec<AgentView> = serde_json::from_value(serde_json::json!([{
            "id": "agent-1", "hostname": "pump-7", "group": "edge", "region": "eu-west-1",
            "status": "connected", "ready": true, "last_seen": "2026-12-04T10:00:00Z",
            "agent_version": "0.1.0", "applied_version": 3, "active": ["fault@1"],
            "held": ["fault@1"], "errors": ["disk full\u{1b}[2J\u{1b}]0;pwned\u{7}"],
            "engines": [{"name": "tract-cpu\u{1b}[2J", "device": "x86_64 CPU, 2 cores"}],
        }]))
        .unwrap();
        let table = render_agents(&agents);
        assert!(!table.contains('\u{1b}') && !table.contains('\u{7}'), "{table:?}");
        assert!(table.contains("tract-cpu\\u{1b}[2J"), "{table}");
        assert!(table.contains("disk full\\u{1b}[2J"), "{table}");
    }

    #[test]
    fn metrics_mark_the_variants_of_a_rollout_and_only_then() {
        let summary = |v| Rollup::default().summary(v, 1, 60, None);
        let view = MetricsView {
            model: "pumps".into(),
            since: Timestamp::from_unix(1_800_000_000),
            versions: vec![summary(1), summary(2), summary(3)],
        };
        assert!(!render_metrics(&view).contains("VARIANT"));
        let marked = render_metrics_marked(&view, &[(1, "baseline"), (2, "candidate")].into());
        let lines: Vec<&str> = marked.lines().collect();
        assert!(lines[1].ends_with(" VARIANT"), "{marked}");
        assert!(lines[2].starts_with("1 ") && lines[2].ends_with(" baseline"), "{marked}");
        assert!(lines[3].starts_with("2 ") && lines[3].ends_with(" candidate"), "{marked}");
        assert!(lines[4].starts_with("3 ") && lines[4].ends_with(" -"), "{marked}");
    }

    // Snapshots of what the commands print, as expect-test inline snapshots: after a
    // deliberate change of a table, bless them with
    // `UPDATE_EXPECT=1 cargo test -p falaj-control --lib cli::render` and review the diff.

    fn fleet() -> Vec<AgentView> {
        serde_json::from_value(serde_json::json!([
            {
                "id": "3f9a1c2e7b4d", "hostname": "pump-7", "group": "edge",
                "region": "eu-west-1", "status": "connected", "ready": true,
                "last_seen": "2026-12-04T10:00:00Z", "agent_version": "0.1.0",
                "applied_version": 4, "active": ["fault@2"], "held": ["fault@1", "fault@2"],
                "errors": [], "trust_version": 2,
                "engines": [
                    {"name": "tract-cpu", "device": "x86_64 CPU, 2 cores"},
                    {"name": "wgpu-gpu", "device": "llvmpipe"}
                ],
                "serving": {"fault@2": "tract-cpu"}
            },
            {
                "id": "8c01d5e6f2a9", "hostname": "pump-9", "group": "edge",
                "region": "eu-west-1", "status": "offline", "ready": false,
                "last_seen": null, "agent_version": "0.1.0", "applied_version": null,
                "active": [], "held": [], "errors": ["fault@2: disk full", "not newer"]
            }
        ]))
        .unwrap()
    }

    #[test]
    fn agents_table() {
        expect_test::expect![[r#"
            AGENT                GROUP        REGION     STATUS     READY  ENGINES            LAST SEEN              ACTIVE                   HELD                     ERRORS
            3f9a1c2e7b4d         edge         eu-west-1  connected  yes    tract-cpu,wgpu-gpu 2026-12-04T10:00:00Z   fault@2                  fault@1,fault@2          -
            8c01d5e6f2a9         edge         eu-west-1  offline    no     -                  never                  -                        -                        fault@2: disk full,not newer
        "#]].assert_eq(&render_agents(&fleet()));
    }

    #[test]
    fn bundles_table_and_push_lines() {
        let bundle = |version, size, chunks| BundleView {
            name: "fault".into(),
            version,
            size,
            chunks,
            manifest_sha256: "ab".repeat(32),
            pushed_at: format!("2026-12-0{version}T09:30:00Z"),
        };
        expect_test::expect![[r#"
            NAME                      VERSION        BYTES  CHUNKS PUSHED
            fault                           1        18204       1 2026-12-01T09:30:00Z
            fault                           2      4194912       3 2026-12-02T09:30:00Z
        "#]]
        .assert_eq(&render_bundles(&[bundle(1, 18_204, 1), bundle(2, 4_194_912, 3)]));
        let pushed = |created, new_chunks| PushedView {
            bundle: bundle(2, 4_194_912, 3),
            new_chunks,
            created,
        };
        expect_test::expect![[r#"
            registered fault@2 (4194912 bytes, 3 chunks, 2 new)
            already registered: fault@2 (4194912 bytes, 3 chunks, 0 new)
        "#]]
        .assert_eq(&[render_pushed(&pushed(true, 2)), render_pushed(&pushed(false, 0))].concat());
        expect_test::expect![[r#"
            NAME                      VERSION        BYTES  CHUNKS PUSHED
        "#]]
        .assert_eq(&render_bundles(&[]));
    }

    #[test]
    fn token_header() {
        let token = NewEnrollmentToken {
            token: "falaj-enroll-v1.secret".into(),
            id: "0a1b2c".into(),
            group: "edge".into(),
            region: "eu-west-1".into(),
            expires: "2026-12-04T11:00:00Z".into(),
        };
        expect_test::expect![[r#"
            enrollment token for group edge in region eu-west-1, valid until 2026-12-04T11:00:00Z:
        "#]]
        .assert_eq(&render_token_header(&token));
    }

    fn metrics_view() -> MetricsView {
        let scores = |column: &str, psi: f64| serde_json::json!({"column": column, "scores": {"psi": psi, "ks": psi / 2.0, "js": psi / 4.0}});
        let version = |version: u64, drift: serde_json::Value| {
            serde_json::json!({
                "version": version, "agents": 3, "windows": 12, "requests": 7_200 * version,
                "errors": 18, "rows": 7_200 * version, "span_seconds": 3_600,
                "rate": 2.0 * version as f64, "error_rate": 0.0025, "p50_ms": 0.84,
                "p95_ms": 2.31, "p99_ms": null, "dropped_windows": version - 1,
                "dropped_requests": 40 * (version - 1), "drift": drift,
            })
        };
        serde_json::from_value(serde_json::json!({
            "model": "fault",
            "since": Timestamp::from_unix(1_800_000_000),
            "versions": [
                version(1, serde_json::Value::Null),
                version(2, serde_json::json!({
                    "inputs": [scores("temperature", 0.42), scores("vibration", 0.08),
                               scores("pressure", 0.15), scores("flow", 0.01)],
                    "outputs": [scores("label", 0.11)],
                })),
            ],
        }))
        .unwrap()
    }

    #[test]
    fn metrics_table() {
        expect_test::expect![[r#"
            fault since 2027-01-15T08:00:00Z
            VERSION  AGENTS   REQUESTS    RATE/S  ERRORS   P50 ms   P95 ms   P99 ms  PSI max  KS max  JS max
            1             3       7200       2.0   0.25%    0.840    2.310        -        -       -       -
            2             3      14400       4.0   0.25%    0.840    2.310        -    0.420   0.210   0.105
            version 1: no reference profile in the bundle, so no drift
            version 2 top drifting features: temperature (psi 0.420, ks 0.210, js 0.105), pressure (psi 0.150, ks 0.075, js 0.037), vibration (psi 0.080, ks 0.040, js 0.020)
            version 2 prediction drift: label (psi 0.110, ks 0.055, js 0.028)
            version 2: agents dropped 1 windows (40 requests) from full outboxes
        "#]].assert_eq(&render_metrics(&metrics_view()));
        expect_test::expect![[r#"
            fault since 2027-01-15T08:00:00Z
            VERSION  AGENTS   REQUESTS    RATE/S  ERRORS   P50 ms   P95 ms   P99 ms  PSI max  KS max  JS max VARIANT
            1             3       7200       2.0   0.25%    0.840    2.310        -        -       -       - -
            2             3      14400       4.0   0.25%    0.840    2.310        -    0.420   0.210   0.105 candidate
            version 1: no reference profile in the bundle, so no drift
            version 2 top drifting features: temperature (psi 0.420, ks 0.210, js 0.105), pressure (psi 0.150, ks 0.075, js 0.037), vibration (psi 0.080, ks 0.040, js 0.020)
            version 2 prediction drift: label (psi 0.110, ks 0.055, js 0.028)
            version 2: agents dropped 1 windows (40 requests) from full outboxes
        "#]]
            .assert_eq(&render_metrics_marked(&metrics_view(), &[(2, "candidate")].into()));
        let empty = MetricsView { versions: Vec::new(), ..metrics_view() };
        expect_test::expect![[r#"
            fault since 2027-01-15T08:00:00Z
            no metric windows in that range
        "#]]
        .assert_eq(&render_metrics(&empty));
    }

    #[test]
    fn alerts_table() {
        let view: AlertsView = serde_json::from_value(serde_json::json!({
            "firing": [{"rule": "pump-drift", "subject": "fault@2 temperature",
                        "since": Timestamp::from_unix(1_800_000_000), "value": 0.4213}],
            "events": [
                {"id": 2, "at": Timestamp::from_unix(1_800_000_000), "rule": "pump-drift",
                 "subject": "fault@2 temperature", "state": "firing", "metric": "psi",
                 "value": 0.4213, "threshold": 0.25},
                {"id": 1, "at": Timestamp::from_unix(1_799_990_000), "rule": "errors",
                 "subject": "fault@1", "state": "resolved", "metric": "error_rate",
                 "value": 0.001, "threshold": 0.05}
            ],
            "notifications": [
                {"what": "alert pump-drift fault@2 temperature firing",
                 "to": "https://hooks.example.com", "recorded": Timestamp::from_unix(1_800_000_000),
                 "attempts": 3, "next_at": Timestamp::from_unix(1_800_000_007),
                 "last_error": "answered 503 Service Unavailable"}
            ],
        }))
        .unwrap();
        expect_test::expect![[r#"
            FIRING               SUBJECT                                  SINCE                       VALUE
            pump-drift           fault@2 temperature                      2027-01-15T08:00:00Z       0.4213

            AT                     STATE     RULE                 SUBJECT                                  METRIC              VALUE  THRESHOLD
            2027-01-15T08:00:00Z   firing    pump-drift           fault@2 temperature                      psi                0.4213     0.2500
            2027-01-15T05:13:20Z   resolved  errors               fault@1                                  error_rate         0.0010     0.0500

            NOTIFICATION WAITING                         TO                               RECORDED               ATTEMPTS NEXT                   LAST ERROR
            alert pump-drift fault@2 temperature firing  https://hooks.example.com        2027-01-15T08:00:00Z          3 2027-01-15T08:00:07Z   answered 503 Service Unavailable
        "#]].assert_eq(&render_alerts(&view));
        let quiet =
            AlertsView { firing: Vec::new(), events: Vec::new(), notifications: Vec::new() };
        expect_test::expect![[r#"
            no alerts firing
        "#]]
        .assert_eq(&render_alerts(&quiet));
    }
}
