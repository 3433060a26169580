//! `/audit?actor=&action=&since=&limit=` (auditors and admins): the log's entries, as
//! `GET /v1/audit` filters them, the chain's verification status (every stored entry and
//! checkpoint checked against the audit key, read-only: no checkpoint is signed to look),
//! and `/audit/export`, the same export as `GET /v1/audit/export` (itself audited, with a
//! fresh signed checkpoint), for `falaj-control audit verify`.

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use falaj_common::audit::{Entry, Verified, VerifyError, assemble, verify};
use falaj_common::keys::PublicKey;
use falaj_common::time::Timestamp;
use maud::{Markup, html};
use serde::Deserialize;

use super::given;
use crate::admin::{Api, ApiError};
use crate::audit::{AuditQuery, outcome_name};
use crate::console::gate::Ctx;
use crate::console::layout::{PageError, PageResult, badge, empty, page, time};
use crate::sql::{AsSql, params};

/// The page's query string.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AuditFilter {
    /// Only this actor (`user:alice`, `agent:ID`, `system`).
    pub actor: Option<String>,
    /// Only actions starting with this (`rollout`, `auth.login`).
    pub action: Option<String>,
    /// Entries at or after this time (RFC 3339).
    pub since: Option<String>,
    /// The latest this many (default 100).
    pub limit: Option<u64>,
}

/// Verifies the stored chain and its checkpoints against `key`, as an export would be
/// verified offline, without signing a new checkpoint. The entries are read before the
/// checkpoints, so that whatever is appended, signed or pruned in between (on PostgreSQL,
/// by another connection) still assembles into a chain that verifies.
pub fn chain_status<C: AsSql + ?Sized>(
    conn: &C,
    key: &PublicKey,
) -> Result<Result<Verified, VerifyError>, C::Error> {
    let sql = conn.sql();
    let read = |query: &str| {
        sql.query_map(query, params![], |r| Ok((r.get::<i64>(0)?.max(0) as u64, r.get(1)?)))
    };
    let entries = read("SELECT seq, line FROM audit ORDER BY seq")?;
    let checkpoints = read("SELECT seq, line FROM audit_checkpoints")?;
    let lines = assemble(entries, checkpoints);
    Ok(verify(lines.iter().map(String::as_str), std::slice::from_ref(key)))
}

/// `GET /audit`.
pub(crate) async fn log(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    Query(filter): Query<AuditFilter>,
) -> PageResult {
    let since = match given(filter.since.as_ref()) {
        None => None,
        Some(s) => Some(Timestamp::parse(s).map_err(|e| {
            ApiError::bad_request(format!("since {s:?}: {e} (write it as 2026-12-04T16:00:00Z)"))
        })?),
    };
    let query = AuditQuery {
        since,
        actor: given(filter.actor.as_ref()).map(str::to_owned),
        action: given(filter.action.as_ref()).map(str::to_owned),
        limit: Some(filter.limit.unwrap_or(100).clamp(1, 10_000)),
    };
    let key = api.shared.audit_key.public();
    let (entries, status) = api
        .shared
        .db
        .run(move |sql| Ok((crate::audit::list(&sql, &query)?, chain_status(&sql, &key)?)))
        .await?;
    Ok(render(&ctx, &filter, &entries, &status))
}

fn status_line(status: &Result<Verified, VerifyError>) -> Markup {
    match status {
        Ok(v) => html! {
            p { (badge("verified")) " The chain verifies: " (v.entries) " entries ("
                (v.first.unwrap_or_default()) " to " (v.last.unwrap_or_default()) "), " (v.checkpoints) " signed checkpoints." }
        },
        Err(VerifyError::Unsigned { first, last }) => html! {
            p { (badge("verified")) " Every link verifies; entries " (first) " to " (last)
                " are not yet covered by a signed checkpoint (one is signed periodically and at each export)." }
        },
        Err(VerifyError::Empty) => html! { p.muted { "The log is empty." } },
        Err(e) => {
            html! { p.notice role="alert" { (badge("failed")) " The chain does not verify: " (e.to_string()) } }
        }
    }
}

fn render(
    ctx: &Ctx,
    f: &AuditFilter,
    entries: &[Entry],
    status: &Result<Verified, VerifyError>,
) -> Markup {
    let body = html! {
        (status_line(status))
        div.actions {
            a href="/audit/export" download="falaj-audit.jsonl" { "Export the log (JSON lines, verify with " code { "falaj-control audit verify" } ")" }
        }
        form.filters method="get" action="/audit" {
            div { label for="a-actor" { "Actor" } input #a-actor name="actor" value=[f.actor.as_deref()] placeholder="user:alice"; }
            div { label for="a-action" { "Action starts with" } input #a-action name="action" value=[f.action.as_deref()] placeholder="rollout"; }
            div { label for="a-since" { "Since (UTC)" } input #a-since name="since" value=[f.since.as_deref()] placeholder="2026-12-04T00:00:00Z"; }
            button type="submit" { "Filter" }
        }
        @if entries.is_empty() {
            (empty("No entry matches.", &html! { a href="/audit" { "Clear the filters" } }))
        } @else {
            div.table { table {
                thead { tr { th { "#" } th { "Time" } th { "Actor" } th { "From" } th { "Action" } th { "Target" } th { "Outcome" } th { "Details" } } }
                tbody { @for e in entries.iter().rev() { tr {
                    td { (e.seq) }
                    td { (time(e.at)) }
                    td { a href={ "/audit?actor=" (e.actor) } { (e.actor) } }
                    td { (e.source.as_deref().unwrap_or("")) }
                    td { (e.action) }
                    td { (e.target) }
                    td { (badge(outcome_name(e.outcome))) }
                    td { @if !e.details.is_null() { code { (e.details.to_string()) } } }
                } } }
            } }
        }
    };
    page(ctx, "Audit log", "/audit", Some(30), &body)
}

/// `GET /audit/export`: the API's export, offered as a file.
pub(crate) async fn export(State(api): State<Api>) -> Result<Response, PageError> {
    let mut response = crate::audit::api::export(State(api)).await?;
    response.headers_mut().insert(
        header::CONTENT_DISPOSITION,
        header::HeaderValue::from_static("attachment; filename=\"falaj-audit.jsonl\""),
    );
    Ok(response.into_response())
}
