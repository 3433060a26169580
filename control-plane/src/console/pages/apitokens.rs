//! `/apitokens`: API tokens for programs (as `GET /v1/apitokens` lists them), a form
//! that creates one (name, role, lifetime) and shows its secret once, and a revoke
//! button on each live token the caller may revoke. Creating and revoking call the
//! services `POST /v1/apitokens` and `DELETE /v1/apitokens/{name}` call
//! (`auth::api::create_token_as`, `revoke_token_as`), with the same rules: a token is
//! never more powerful than its creator, and only its creator or an admin revokes it;
//! both audited under the person's name.

use std::time::SystemTime;

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use falaj_common::time::Timestamp;
use maud::{Markup, html};
use serde::Deserialize;

use crate::admin::{Api, ApiError};
use crate::auth::api::{self as service, NewApiToken};
use crate::auth::store::{self, ApiTokenRow};
use crate::auth::{Role, Via};
use crate::console::gate::Ctx;
use crate::console::layout::{
    self, PageError, PageResult, badge, csrf, empty, page, time, time_or_dash,
};

/// The lifetimes offered for an API token (within `auth::rules::TOKEN_TTL`).
const TTLS: [(&str, u64); 5] = [
    ("1 day", 86_400),
    ("7 days", 604_800),
    ("30 days", 2_592_000),
    ("90 days", 7_776_000),
    ("366 days", 31_622_400),
];

/// `GET /apitokens`.
pub(crate) async fn list(State(api): State<Api>, Extension(ctx): Extension<Ctx>) -> PageResult {
    tokens_page(&api, &ctx, None, None).await
}

async fn tokens_page(
    api: &Api,
    ctx: &Ctx,
    created: Option<&NewApiToken>,
    notice: Option<&str>,
) -> PageResult {
    let tokens = api.shared.db.run(|sql| store::api_tokens(&sql)).await?;
    let now = Timestamp::from_system(SystemTime::now());
    let body = render(ctx, &tokens, created, notice, now);
    Ok(page(ctx, "API tokens", "/apitokens", None, &body))
}

/// Whether the caller may revoke `t` (as `store::revoke_api_token` decides).
fn may_revoke(ctx: &Ctx, t: &ApiTokenRow) -> bool {
    ctx.principal.role == Role::Admin || t.created_by == ctx.principal.actor
}

/// The page: a token just created with its secret, the tokens, the form.
pub(crate) fn render(
    ctx: &Ctx,
    tokens: &[ApiTokenRow],
    created: Option<&NewApiToken>,
    notice: Option<&str>,
    now: Timestamp,
) -> Markup {
    let roles: Vec<Role> =
        Role::ALL.into_iter().filter(|r| ctx.principal.role.covers(*r)).collect();
    html! {
        @if let Some(n) = notice { (layout::notice(n)) }
        @if let Some(t) = created {
            div.secret role="status" {
                p { strong { "API token " (t.name) " (" (t.role) ") created." }
                    " Its secret is shown once; it works until " (time(t.expires_at))
                    ". Programs send it as " code { "Authorization: Bearer …" } "." }
                pre #api-token { code { (t.token) } }
                button.plain type="button" data-copy="api-token" hidden { "Copy" }
            }
        }
        @if tokens.is_empty() {
            (empty("No API token.", &html! { "Create one below for a program (CI, a script) that calls the JSON API under " code { "/v1" } "." }))
        } @else {
            div.table { table #tokens {
                thead { tr { th { "Token" } th { "Role" } th { "Created by" } th { "Created" } th { "Expires" } th { "Last used" } th { "Status" } th { "Actions" } } }
                tbody { @for t in tokens { tr {
                    td { (t.name) } td { (t.role.name()) } td { (t.created_by) } td { (time(t.created_at)) }
                    td { (time(t.expires_at)) } td { (time_or_dash(t.last_used)) }
                    td { @match t.revoked_at {
                        Some(at) => { (badge("revoked")) " " (time(at)) },
                        None if t.expires_at <= now => (badge("expired")),
                        None => (badge("live")),
                    } }
                    td.actions { @if t.revoked_at.is_none() && t.expires_at > now && may_revoke(ctx, t) {
                        form.inline method="post" action={ "/apitokens/" (t.name) "/revoke" } {
                            (csrf(ctx))
                            button.danger type="submit" aria-label={ "revoke " (t.name) } { "Revoke" }
                        }
                    } }
                } } }
            } }
        }
        h2 { "Create an API token" }
        @if matches!(ctx.principal.via, Via::ApiToken { .. }) {
            p.muted { "API tokens cannot create API tokens." }
        } @else {
            form.stack #create-token method="post" action="/apitokens" {
                (csrf(ctx))
                label for="k-name" { "Token name" }
                input #k-name name="name" required maxlength="64" pattern="[a-z0-9][a-z0-9._-]*"
                    title="lower-case letters, digits, '.', '_' and '-'" autocomplete="off";
                label for="k-role" { "Role (at most your own)" }
                select #k-role name="role" { @for r in &roles { option value=(r.name()) selected[*r == Role::Viewer] { (r.name()) } } }
                label for="k-ttl" { "Valid for" }
                select #k-ttl name="ttl_seconds" { @for (label, secs) in TTLS { option value=(secs) selected[secs == 2_592_000] { (label) } } }
                button type="submit" { "Create API token" }
            }
        }
    }
}

/// The create form as posted.
#[derive(Debug, Deserialize)]
pub(crate) struct TokenForm {
    name: String,
    role: String,
    ttl_seconds: String,
}

/// The page with `e` above it when it is the caller's mistake, or the error page.
async fn refused(api: &Api, ctx: &Ctx, e: ApiError) -> Result<Response, PageError> {
    if !e.status().is_client_error() {
        return Err(e.into());
    }
    Ok((e.status(), tokens_page(api, ctx, None, Some(e.message())).await?).into_response())
}

/// `POST /apitokens`: the token, its secret shown once (the page is never cached).
pub(crate) async fn create(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    axum::Form(form): axum::Form<TokenForm>,
) -> Result<Response, PageError> {
    let Ok(ttl) = form.ttl_seconds.trim().parse::<u64>() else {
        let e = ApiError::bad_request("valid for: choose a lifetime");
        return refused(&api, &ctx, e).await;
    };
    match service::create_token_as(&api, &ctx.principal, form.name.trim(), form.role.trim(), ttl)
        .await
    {
        Ok(token) => Ok((StatusCode::CREATED, tokens_page(&api, &ctx, Some(&token), None).await?)
            .into_response()),
        Err(e) => refused(&api, &ctx, e).await,
    }
}

/// `POST /apitokens/{name}/revoke`.
pub(crate) async fn revoke(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    Path(name): Path<String>,
) -> Result<Response, PageError> {
    match service::revoke_token_as(&api, &ctx.principal, &name).await {
        Ok(()) => {
            let notice = format!("API token {name} revoked.");
            Ok(tokens_page(&api, &ctx, None, Some(&notice)).await?.into_response())
        }
        Err(e) => refused(&api, &ctx, e).await,
    }
}
