//! People and credentials: `/users` (admins: users with their roles and live sessions,
//! as `GET /v1/users` lists them; add one, shown its one-time password once; change a
//! role; disable, enable again or remove one) and `/tokens` (operators: a one-time enrollment token
//! for a group, shown once with the `falaj-agent enroll` line to run on the agent's
//! host, from the same service as `POST /v1/tokens`). Each change calls the service the
//! JSON route calls (`auth::api::add_user_as`, `set_role_as`, `set_disabled`,
//! `remove`), so it is
//! audited the same way, under the person's name. API tokens are on their own page
//! ([`super::apitokens`]): operators manage theirs too.

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;

use crate::admin::{Api, ApiError, NewEnrollmentToken};
use crate::auth::store::{self, UserRow};
use crate::auth::{Permission as P, Role, api as service};
use crate::console::gate::Ctx;
use crate::console::layout::{self, PageError, PageResult, badge, csrf, page, time};
use crate::service::fleet::enrollment_token;

/// What a change on the users page leaves to show above it.
#[derive(Debug, Default)]
struct Outcome {
    /// A refusal or a confirmation.
    notice: Option<String>,
    /// A user just added and its one-time password.
    created: Option<(String, Role, String)>,
}

/// `GET /users`.
pub(crate) async fn list(State(api): State<Api>, Extension(ctx): Extension<Ctx>) -> PageResult {
    users_page(&api, &ctx, &Outcome::default()).await
}

async fn users_page(api: &Api, ctx: &Ctx, outcome: &Outcome) -> PageResult {
    let users = api.shared.db.run(|sql| store::users(&sql)).await?;
    Ok(page(ctx, "Users", "/users", None, &render_users(ctx, &users, outcome)))
}

/// The users page: the one-time password of a user just added, the users with the
/// buttons an admin may press (never on its own user), and the form that adds one.
fn render_users(ctx: &Ctx, users: &[UserRow], outcome: &Outcome) -> Markup {
    let me = ctx.principal.actor.strip_prefix("user:");
    html! {
        @if let Some(n) = &outcome.notice { (layout::notice(n)) }
        @if let Some((name, role, password)) = &outcome.created {
            div.secret role="status" {
                p { strong { "User " (name) " (" (role.name()) ") added." }
                    " Its generated password is shown this once: hand it over privately. A lost one is replaced with "
                    code { "falaj-control user reset-password" } "." }
                pre #one-time-password { code { (password) } }
                button.plain type="button" data-copy="one-time-password" hidden { "Copy" }
            }
        }
        div.table { table #users {
            thead { tr { th { "User" } th { "Role" } th { "Added" } th { "Status" } th.num { "Live sessions" }
                @if ctx.may(P::ManageUsers) { th { "Actions" } } } }
            tbody { @for u in users { tr {
                td { (u.name) } td { (u.role.name()) } td { (time(u.created_at)) }
                td { @match u.disabled_at { Some(at) => { (badge("disabled")) " " (time(at)) }, None => (badge("active")) } }
                td.num { (u.sessions) }
                @if ctx.may(P::ManageUsers) { td.actions {
                    @if me == Some(u.name.as_str()) { span.muted { "you" } } @else {
                        form.inline method="post" action={ "/users/" (u.name) "/role" } {
                            (csrf(ctx))
                            label.sr for={ "role-" (u.name) } { "Role of " (u.name) }
                            select id={ "role-" (u.name) } name="role" {
                                @for r in Role::ALL { option value=(r.name()) selected[r == u.role] { (r.name()) } }
                            }
                            button.plain type="submit" aria-label={ "set the role of " (u.name) } { "Set role" }
                        }
                        " "
                        @let action = if u.disabled_at.is_some() { "enable" } else { "disable" };
                        form.inline method="post" action={ "/users/" (u.name) "/" (action) } {
                            (csrf(ctx))
                            button.plain type="submit" aria-label={ (action) " " (u.name) } {
                                @if u.disabled_at.is_some() { "Enable" } @else { "Disable" }
                            }
                        }
                        " "
                        form.inline method="post" action={ "/users/" (u.name) "/remove" } {
                            (csrf(ctx))
                            button.danger type="submit" aria-label={ "remove " (u.name) } { "Remove" }
                        }
                    }
                } }
            } } }
        } }
        @if ctx.may(P::ManageUsers) {
            h2 { "Add a user" }
            form.stack #add-user method="post" action="/users" {
                (csrf(ctx))
                label for="u-name" { "User name" }
                input #u-name name="name" required maxlength="64" pattern="[a-z0-9][a-z0-9._-]*"
                    title="lower-case letters, digits, '.', '_' and '-'" autocomplete="off";
                label for="u-role" { "Role" }
                select #u-role name="role" { @for r in Role::ALL { option value=(r.name()) selected[r == Role::Viewer] { (r.name()) } } }
                button type="submit" { "Add user" }
            }
            p.hint { "A one-time password is generated and shown once. Disabling a user ends its sessions; removing one keeps its audit entries." }
        }
        @if ctx.may(P::ManageApiTokens) {
            p { a href="/apitokens" { "API tokens" } " for programs are on their own page." }
        }
    }
}

/// The add-user form as posted.
#[derive(Debug, Deserialize)]
pub(crate) struct UserForm {
    name: String,
    role: String,
}

/// The page again with `e` above it when it is the caller's mistake, or the error page.
async fn refused(api: &Api, ctx: &Ctx, e: ApiError) -> Result<Response, PageError> {
    if !e.status().is_client_error() {
        return Err(e.into());
    }
    let outcome = Outcome { notice: Some(e.message().to_owned()), created: None };
    Ok((e.status(), users_page(api, ctx, &outcome).await?).into_response())
}

/// `POST /users`: the user added, its one-time password shown once.
pub(crate) async fn add(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    axum::Form(form): axum::Form<UserForm>,
) -> Result<Response, PageError> {
    let name = form.name.trim();
    match service::add_user_as(&api, name, form.role.trim(), None).await {
        Ok((role, Some(password))) => {
            let outcome =
                Outcome { notice: None, created: Some((name.to_owned(), role, password)) };
            Ok((StatusCode::CREATED, users_page(&api, &ctx, &outcome).await?).into_response())
        }
        Ok((_, None)) => Err(ApiError::internal("no password was generated").into()),
        Err(e) => refused(&api, &ctx, e).await,
    }
}

/// The fields of a user's buttons: the role chosen (for `role`).
#[derive(Debug, Deserialize)]
pub(crate) struct ActForm {
    #[serde(default)]
    role: String,
}

/// `POST /users/{name}/{action}`: `role` (the form's role), `disable`, `enable` or `remove`.
pub(crate) async fn act(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    Path((name, action)): Path<(String, String)>,
    axum::Form(form): axum::Form<ActForm>,
) -> Result<Response, PageError> {
    let role = form.role.trim().to_owned();
    let done = match action.as_str() {
        "role" => match role.parse::<Role>() {
            Ok(r) => service::set_role_as(&api, &name, r)
                .await
                .map(|before| format!("is now {r} (was {before})")),
            Err(e) => Err(ApiError::bad_request(e.to_string())),
        },
        "disable" => service::set_disabled(&api, &name, true).await.map(|()| "disabled".into()),
        "enable" => {
            service::set_disabled(&api, &name, false).await.map(|()| "enabled again".into())
        }
        "remove" => service::remove(&api, &name).await.map(|()| "removed".into()),
        other => {
            return Err(ApiError::not_found(format!(
                "no user action {other:?}: role, disable, enable or remove"
            ))
            .into());
        }
    };
    match done {
        Ok(what) => {
            let outcome = Outcome { notice: Some(format!("User {name} {what}.")), created: None };
            Ok(users_page(&api, &ctx, &outcome).await?.into_response())
        }
        Err(e) => refused(&api, &ctx, e).await,
    }
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
    match enrollment_token(&api.shared, form.group.trim(), ttl).await.map_err(ApiError::from) {
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
