//! People and credentials: `/users` (admins: users with their roles and live sessions,
//! API tokens with their creators and expiry, as `GET /v1/users` and
//! `GET /v1/apitokens` list them) and `/tokens` (operators: a one-time enrollment token
//! for a group, shown once with the `falaj-agent enroll` line to run on the agent's
//! host, from the same service as `POST /v1/tokens`).

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;

use crate::admin::{Api, NewEnrollmentToken, enrollment_token};
use crate::auth::store;
use crate::console::gate::Ctx;
use crate::console::layout::{
    self, PageError, PageResult, badge, csrf, empty, page, time, time_or_dash,
};

/// `GET /users`.
pub(crate) async fn list(State(api): State<Api>, Extension(ctx): Extension<Ctx>) -> PageResult {
    let (users, tokens) =
        api.shared.db.call(|c| Ok((store::users(c)?, store::api_tokens(c)?))).await?;
    let body = html! {
        h2 { "Users" }
        div.table { table {
            thead { tr { th { "User" } th { "Role" } th { "Added" } th { "Status" } th { "Live sessions" } } }
            tbody { @for u in &users { tr {
                td { (u.name) } td { (u.role.name()) } td { (time(u.created_at)) }
                td { @match u.disabled_at { Some(at) => { (badge("disabled")) " " (time(at)) }, None => (badge("active")) } }
                td.num { (u.sessions) }
            } } }
        } }
        p.hint { "Add, change and disable users with " code { "falaj-control user add|set-role|disable" } "." }
        h2 { "API tokens" }
        @if tokens.is_empty() {
            (empty("No API token.", &html! { "Automation gets one with " code { "falaj-control apitoken create --name ci --role operator --ttl 30d" } "." }))
        } @else {
            div.table { table {
                thead { tr { th { "Token" } th { "Role" } th { "Created by" } th { "Created" } th { "Expires" } th { "Last used" } th { "Revoked" } } }
                tbody { @for t in &tokens { tr {
                    td { (t.name) } td { (t.role.name()) } td { (t.created_by) } td { (time(t.created_at)) }
                    td { (time(t.expires_at)) } td { (time_or_dash(t.last_used)) } td { (time_or_dash(t.revoked_at)) }
                } } }
            } }
        }
    };
    Ok(page(&ctx, "Users and API tokens", "/users", None, &body))
}

/// The lifetimes offered for an enrollment token.
const TTLS: [(&str, u64); 4] =
    [("1 hour", 3600), ("1 day", 86_400), ("7 days", 604_800), ("30 days", 2_592_000)];

fn tokens_body(
    ctx: &Ctx,
    created: Option<(&NewEnrollmentToken, String)>,
    notice: Option<&str>,
) -> Markup {
    html! {
        @if let Some(n) = notice { (layout::notice(n)) }
        @if let Some((t, line)) = created {
            div.secret role="status" {
                p { strong { "Enrollment token for group " (t.group) " created." }
                    " It is shown once and works once, until " (layout::time_text(Some(&t.expires))) ". Run this on the agent's host:" }
                pre #enroll-line { code { (line) } }
                button.plain type="button" data-copy="enroll-line" hidden { "Copy" }
            }
        }
        form.stack method="post" action="/tokens" {
            (csrf(ctx))
            label for="t-group" { "Group the agent joins" }
            input #t-group name="group" required pattern="[a-z0-9][a-z0-9._-]*" title="lower-case letters, digits, '.', '_' and '-'";
            label for="t-ttl" { "Valid for" }
            select #t-ttl name="ttl_seconds" { @for (label, secs) in TTLS { option value=(secs) selected[secs == 86_400] { (label) } } }
            button type="submit" { "Create enrollment token" }
        }
        p.hint { "A token is bound to this control plane's region and CA; an agent enrolled with it gets its own certificate." }
    }
}

/// `GET /tokens`.
pub(crate) async fn tokens_page(Extension(ctx): Extension<Ctx>) -> PageResult {
    Ok(page(&ctx, "Enroll an agent", "/tokens", None, &tokens_body(&ctx, None, None)))
}

/// The token form as posted.
#[derive(Debug, Deserialize)]
pub(crate) struct TokenForm {
    group: String,
    ttl_seconds: String,
}

/// `POST /tokens`: the token, shown once (the page is never cached).
pub(crate) async fn create_token(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    axum::Form(form): axum::Form<TokenForm>,
) -> Result<Response, PageError> {
    let refuse = |status: StatusCode, message: &str| {
        let body = tokens_body(&ctx, None, Some(message));
        (status, page(&ctx, "Enroll an agent", "/tokens", None, &body)).into_response()
    };
    let Ok(ttl) = form.ttl_seconds.trim().parse::<u64>() else {
        return Ok(refuse(StatusCode::UNPROCESSABLE_ENTITY, "valid for: choose a lifetime"));
    };
    match enrollment_token(&api, form.group.trim(), ttl).await {
        Ok(token) => {
            let line = format!(
                "falaj-agent enroll --control-plane {} --token {} --data-dir /var/lib/falaj-agent",
                api.console.quic, token.token
            );
            let body = tokens_body(&ctx, Some((&token, line)), None);
            Ok((StatusCode::CREATED, page(&ctx, "Enroll an agent", "/tokens", None, &body))
                .into_response())
        }
        Err(e) if e.status().is_client_error() => Ok(refuse(e.status(), e.message())),
        Err(e) => Err(e.into()),
    }
}
