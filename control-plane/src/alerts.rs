//! Alerts: the rules of the configuration evaluated against the stored metric windows,
//! each firing or resolution recorded as an event (`falaj-control alerts`), POSTed as
//! JSON to the configured webhooks, and, for a rule with a retraining hook, handed to
//! that hook when it fires.
//!
//! What fires is decided by [`falaj_common::alerting`]; this module reads the windows,
//! keeps the firing set in the database (so a restart neither repeats nor forgets an
//! alert) and records each webhook notification in the outbox in the same transaction as
//! its event ([`crate::outbox`] sends them, through restarts). A retraining command runs
//! once, when the alert fires.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use falaj_common::alerting::{AlertRule, RetrainHook, Transition, VersionWindow, transitions};
use falaj_common::time::{Timestamp, human_duration};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::db::{DbError, from_ts, ts};
use crate::monitoring::{self, MetricsQuery};
use crate::outbox::{self, Webhooks};
use crate::sql::{AsSql, Sql, SqlError, params};
use crate::state::Shared;

/// `[alerts]` of the configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// How often the rules are evaluated.
    #[serde(with = "human_duration")]
    pub evaluate_every: Duration,
    /// URLs every firing and resolution is POSTed to.
    pub webhooks: Vec<String>,
    pub rules: Vec<AlertRule>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self { evaluate_every: Duration::from_secs(30), webhooks: Vec::new(), rules: Vec::new() }
    }
}

/// A recorded firing or resolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// Its number.
    pub id: u64,
    /// When.
    pub at: Timestamp,
    pub rule: String,
    /// What it is about: `model@version` or `model@version/column`.
    pub subject: String,
    /// `firing` or `resolved`.
    pub state: String,
    /// The metric measured.
    pub metric: String,
    /// The value observed.
    pub value: f64,
    /// The rule's threshold.
    pub threshold: f64,
}

/// What a webhook receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    #[serde(flatten)]
    pub event: AlertEvent,
    pub model: String,
    pub version: u64,
    /// The column, for drift rules.
    pub column: Option<String>,
    /// The group the rule watches, if one.
    pub group: Option<String>,
    /// The trailing window, in seconds.
    pub window_seconds: u64,
    /// The control plane's region.
    pub region: String,
}

fn metric_name(rule: &AlertRule) -> String {
    serde_json::to_value(rule.metric)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Evaluates `rule` at `now` and records its transitions and their notifications to
/// `webhooks` (and to the rule's retraining webhook, for a firing), in one transaction.
fn evaluate_rule(
    sql: Sql<'_>,
    rule: &AlertRule,
    webhooks: Webhooks<'_>,
    now: Timestamp,
) -> Result<Vec<Notification>, SqlError> {
    let query = MetricsQuery {
        model: rule.model.clone(),
        version: None,
        group: rule.group.clone(),
        agent: None,
        since: Timestamp::from_unix(now.unix().saturating_sub(rule.window.as_secs())),
    };
    let tx = sql.transaction()?;
    let mut observations = Vec::new();
    for (version, v) in monitoring::rollups(&tx, &query)? {
        let reference = if rule.metric.is_drift() {
            monitoring::reference(&tx, &rule.model, version)?
        } else {
            None
        };
        observations.extend(rule.observe(&VersionWindow {
            version,
            rollup: &v.rollup,
            span_seconds: v.span_seconds(),
            reference: reference.as_ref(),
        }));
    }
    let firing: BTreeMap<String, f64> = tx
        .query_map(
            "SELECT subject, value FROM alerts_firing WHERE rule = $1",
            params![rule.name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?
        .into_iter()
        .collect();
    let mut notifications = Vec::new();
    for Transition { observation: o, firing } in transitions(&firing, &observations, rule.threshold)
    {
        if firing {
            tx.execute(
                "INSERT INTO alerts_firing (rule, subject, since, value) VALUES ($1, $2, $3, $4)",
                params![rule.name, o.subject, ts(now), o.value],
            )?;
        } else {
            tx.execute(
                "DELETE FROM alerts_firing WHERE rule = $1 AND subject = $2",
                params![rule.name, o.subject],
            )?;
        }
        let state = if firing { "firing" } else { "resolved" };
        let metric = metric_name(rule);
        let id: i64 = tx.query_row(
            "INSERT INTO alert_events (at, rule, subject, state, metric, value, threshold)
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            params![ts(now), rule.name, o.subject, state, metric, o.value, rule.threshold],
            |r| r.get(0),
        )?;
        let notification = Notification {
            event: AlertEvent {
                id: id as u64,
                at: now,
                rule: rule.name.clone(),
                subject: o.subject,
                state: state.into(),
                metric,
                value: o.value,
                threshold: rule.threshold,
            },
            model: rule.model.clone(),
            version: o.version,
            column: o.column,
            group: rule.group.clone(),
            window_seconds: rule.window.as_secs(),
            region: webhooks.region.to_owned(),
        };
        let body = serde_json::to_vec(&notification).map_err(|e| SqlError::Encode {
            what: "an alert notification",
            message: e.to_string(),
        })?;
        let retrain = match &rule.retrain {
            Some(RetrainHook::Webhook(url)) if firing => Some(url.as_str()),
            _ => None,
        };
        let urls = webhooks.urls.iter().map(String::as_str).chain(retrain);
        let e = &notification.event;
        let what = format!("alert {} {} {}", e.rule, e.subject, e.state);
        outbox::enqueue(&tx, urls, &body, &what, now)?;
        notifications.push(notification);
    }
    tx.commit()?;
    Ok(notifications)
}

/// Evaluates every rule once at `now`, each in its own transaction with the notifications
/// to `webhooks` it records; returns what changed, with the rule that changed it.
pub fn evaluate_rules<C: AsSql + ?Sized>(
    conn: &C,
    rules: &[AlertRule],
    webhooks: Webhooks<'_>,
    now: Timestamp,
) -> Result<Vec<(AlertRule, Notification)>, C::Error> {
    let mut out = Vec::new();
    for rule in rules {
        for n in evaluate_rule(conn.sql(), rule, webhooks, now)? {
            out.push((rule.clone(), n));
        }
    }
    Ok(out)
}

/// Evaluates every rule once, recording notifications to `webhooks`; returns what
/// changed, with the rule that changed it.
pub async fn evaluate(
    shared: &Shared,
    rules: &[AlertRule],
    webhooks: &[String],
    now: SystemTime,
) -> Result<Vec<(AlertRule, Notification)>, DbError> {
    let (rules, urls, region) = (rules.to_vec(), webhooks.to_vec(), shared.region.clone());
    let now = Timestamp::from_system(now);
    let changed = shared
        .db
        .run(move |sql| {
            let webhooks = Webhooks { urls: &urls, region: &region };
            evaluate_rules(&sql, &rules, webhooks, now)
        })
        .await?;
    if !changed.is_empty() {
        shared.outbox.queued.notify_one();
    }
    Ok(changed)
}

/// The latest `limit` events, newest first.
pub fn events<C: AsSql + ?Sized>(conn: &C, limit: u64) -> Result<Vec<AlertEvent>, C::Error> {
    Ok(conn.sql().query_map(
        "SELECT id, at, rule, subject, state, metric, value, threshold FROM alert_events
         ORDER BY id DESC LIMIT $1",
        params![limit.min(i64::MAX as u64) as i64],
        |r| {
            Ok(AlertEvent {
                id: r.get::<i64>(0)? as u64,
                at: from_ts(r.get(1)?),
                rule: r.get(2)?,
                subject: r.get(3)?,
                state: r.get(4)?,
                metric: r.get(5)?,
                value: r.get(6)?,
                threshold: r.get(7)?,
            })
        },
    )?)
}

/// An alert firing: `(rule, subject, since, value)`.
pub type Firing = (String, String, Timestamp, f64);

/// Alerts firing now.
pub fn firing<C: AsSql + ?Sized>(conn: &C) -> Result<Vec<Firing>, C::Error> {
    Ok(conn.sql().query_map(
        "SELECT rule, subject, since, value FROM alerts_firing ORDER BY rule, subject",
        params![],
        |r| Ok((r.get(0)?, r.get(1)?, from_ts(r.get(2)?), r.get(3)?)),
    )?)
}

/// Evaluates the rules every `config.evaluate_every`, and runs the retraining commands of
/// those that fire, until `stop`.
pub async fn run(
    shared: Arc<Shared>,
    config: AlertsConfig,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if config.rules.is_empty() {
        return;
    }
    let mut ticks = tokio::time::interval(config.evaluate_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = ticks.tick() => {}
        }
        let changed =
            match evaluate(&shared, &config.rules, &config.webhooks, SystemTime::now()).await {
                Ok(changed) => changed,
                Err(err) => {
                    tracing::error!(error = %err, "evaluating alert rules failed");
                    continue;
                }
            };
        for (rule, notification) in changed {
            let e = &notification.event;
            tracing::warn!(rule = %e.rule, subject = %e.subject, state = %e.state, value = e.value, threshold = e.threshold, "alert");
            if let Some(RetrainHook::Command(argv)) = rule.retrain
                && e.state == "firing"
            {
                tokio::spawn(run_command(argv, Arc::new(notification)));
            }
        }
    }
}

/// Runs a retraining command with the alert as JSON on its standard input and in
/// `FALAJ_ALERT_*` variables.
async fn run_command(argv: Vec<String>, body: Arc<Notification>) {
    let Some((program, arguments)) = argv.split_first() else { return };
    let json = serde_json::to_vec(&*body).unwrap_or_default();
    let spawned = tokio::process::Command::new(program)
        .args(arguments)
        .env("FALAJ_ALERT_RULE", &body.event.rule)
        .env("FALAJ_ALERT_MODEL", &body.model)
        .env("FALAJ_ALERT_VERSION", body.version.to_string())
        .env("FALAJ_ALERT_COLUMN", body.column.as_deref().unwrap_or(""))
        .env("FALAJ_ALERT_VALUE", body.event.value.to_string())
        .stdin(std::process::Stdio::piped())
        .kill_on_drop(false)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            tracing::error!(program, error = %err, "starting the retraining command failed");
            return;
        }
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&json).await;
    }
    match child.wait().await {
        Ok(status) if status.success() => {
            tracing::info!(program, rule = %body.event.rule, "retraining command ran");
        }
        Ok(status) => tracing::error!(program, %status, "retraining command failed"),
        Err(err) => {
            tracing::error!(program, error = %err, "waiting for the retraining command failed");
        }
    }
}
