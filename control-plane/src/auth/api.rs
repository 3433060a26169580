//! The routes of people and credentials: `POST /v1/login` (public) and `/v1/logout`,
//! `GET /v1/whoami`, users under `/v1/users` (admins), API tokens under `/v1/apitokens`.
//! Passwords are hashed and checked on the blocking pool; each change is one transaction
//! with its audit entry ([`super::store`]).

use std::time::{Duration, SystemTime};

use axum::Extension;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use falaj_common::time::Timestamp;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::gate::{self, Source};
use super::rules::{self, Access, Permission as P, Role, TOKEN_TTL};
use super::store::{self, Lock, NotOpened, Refusal};
use super::{Principal, Routes, Via, WhoAmI, password};
use crate::admin::{Api, ApiError, ApiResult, json_response};
use crate::audit::{self, Actor};

pub fn routes() -> Routes {
    Routes::new()
        .post("/v1/login", Access::Public, login)
        .post("/v1/logout", P::OwnSession, logout)
        .get("/v1/whoami", P::OwnSession, whoami)
        .get("/v1/users", P::ManageUsers, list_users)
        .post("/v1/users", P::ManageUsers, add_user)
        .delete("/v1/users/{name}", P::ManageUsers, remove_user)
        .put("/v1/users/{name}/role", P::ManageUsers, set_role)
        .post("/v1/users/{name}/disable", P::ManageUsers, disable_user)
        .post("/v1/users/{name}/enable", P::ManageUsers, enable_user)
        .post("/v1/users/{name}/password", P::ManageUsers, reset_password)
        .get("/v1/apitokens", P::ManageApiTokens, list_tokens)
        .post("/v1/apitokens", P::ManageApiTokens, create_token)
        .delete("/v1/apitokens/{name}", P::ManageApiTokens, revoke_token)
}

fn now() -> Timestamp {
    Timestamp::from_system(SystemTime::now())
}

fn parse<T: DeserializeOwned>(body: &str) -> ApiResult<T> {
    serde_json::from_str(body).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

fn parse_role(text: &str) -> ApiResult<Role> {
    text.parse().map_err(|e: rules::UnknownRole| ApiError::bad_request(e.to_string()))
}

fn refusal(r: &Refusal) -> ApiError {
    let status = match r {
        Refusal::NoUser(_) | Refusal::NoToken(_) => StatusCode::NOT_FOUND,
        Refusal::UserExists(_) | Refusal::TokenExists(_) => StatusCode::CONFLICT,
        Refusal::NotYours { .. } => StatusCode::FORBIDDEN,
    };
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::CONFLICT => "conflict",
        _ => "forbidden",
    };
    ApiError::new(status, code, r.to_string())
}

/// Hashes `password` on the blocking pool.
async fn hash(password: String) -> ApiResult<String> {
    tokio::task::spawn_blocking(move || password::hash(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)
}

// ---- sessions ----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    user: String,
    password: String,
}

/// What `POST /v1/login` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoginView {
    /// The session's bearer token (shown once).
    pub token: String,
    pub user: String,
    /// Its role.
    pub role: String,
    /// The session ends after this many seconds unused.
    pub idle_seconds: u64,
    /// And at this time at the latest.
    pub expires_at: Timestamp,
}

fn locked(lock: Lock) -> ApiError {
    let whom = if lock.scope == "address" { "from this address" } else { "for this user" };
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "locked",
        format!("too many failed logins {whom}; try again after {}", lock.until),
    )
}

async fn login(
    State(api): State<Api>,
    Extension(source): Extension<Source>,
    body: String,
) -> ApiResult<Response> {
    let request: LoginRequest = parse(&body)?;
    // The user as claimed is the actor of the attempt, whether or not it exists.
    let user: String = request.user.chars().take(64).collect();
    let actor = Actor::new(format!("user:{user}"), source.name());
    let view = audit::acting(actor, login_as(api, user, request.password, source.name())).await?;
    Ok(json_response(StatusCode::OK, &view))
}

/// Checks `user`'s `password` from `address` and opens a session: lockouts, the
/// password on the blocking pool, every failure audited (the API's and the console's
/// service; call it acting as the user claimed).
pub(crate) async fn login_as(
    api: Api,
    user: String,
    password: String,
    address: Option<String>,
) -> ApiResult<LoginView> {
    let policy = api.auth.logins;
    let at = now();
    let attempt = {
        let (u, a) = (user.clone(), address.clone());
        api.shared.db.run(move |sql| store::attempt(&sql, &u, a.as_deref(), &policy, at)).await?
    };
    let failed = |reason: String, counts: bool| {
        let (api, u, a) = (api.clone(), user.clone(), address.clone());
        async move {
            api.shared
                .db
                .run(move |sql| {
                    store::login_failed(&sql, &u, a.as_deref(), &reason, counts, &policy, at)
                })
                .await
        }
    };
    if let Some(lock) = attempt.lock {
        failed(format!("locked ({}) until {}", lock.scope, lock.until), false).await?;
        return Err(locked(lock));
    }
    let stored = attempt.user.as_ref().map(|s| s.password.clone());
    let matches = tokio::task::spawn_blocking(move || {
        password::verify(&password, stored.as_deref().unwrap_or_else(|| password::decoy()))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    let wrong =
        || ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "wrong user name or password");
    let found = match attempt.user {
        Some(found) if matches => found,
        other => {
            let reason = if other.is_none() { "unknown user" } else { "wrong password" };
            if let Some(lock) = failed(reason.into(), true).await? {
                return Err(locked(lock));
            }
            return Err(wrong());
        }
    };
    if found.disabled {
        failed("user disabled".into(), false).await?;
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "disabled",
            format!("user {user} is disabled"),
        ));
    }
    let (u, a, checked) = (user.clone(), address.clone(), found.password.clone());
    let opened = match api
        .shared
        .db
        .run(move |sql| store::login_succeeded(&sql, &u, &checked, a.as_deref(), &policy, at))
        .await?
    {
        Ok(opened) => opened,
        Err(NotOpened::Locked(lock)) => return Err(locked(lock)),
        Err(NotOpened::Changed) => {
            failed("user changed during the login".into(), false).await?;
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                format!(
                    "user {user} was removed, disabled or given another password while logging in; try again"
                ),
            ));
        }
    };
    tracing::info!(%user, session = %opened.id, "logged in");
    let sessions = api.auth.sessions;
    Ok(LoginView {
        token: opened.token,
        user,
        role: found.role.name().into(),
        idle_seconds: sessions.idle.as_secs(),
        expires_at: at.saturating_add(sessions.max),
    })
}

async fn logout(
    State(api): State<Api>,
    Extension(principal): Extension<Principal>,
) -> ApiResult<Response> {
    let Via::Session { id, .. } = principal.via else {
        return Err(ApiError::bad_request(format!(
            "logout ends a session, and {} is not one (revoke API tokens with `falaj-control apitoken revoke`)",
            principal.actor
        )));
    };
    let at = now();
    let session = id.clone();
    api.shared.db.run(move |sql| store::end_session(&sql, &session, at)).await?;
    Ok(json_response(StatusCode::OK, &LoggedOut { ended: id }))
}

async fn whoami(Extension(principal): Extension<Principal>) -> Response {
    json_response(
        StatusCode::OK,
        &WhoAmI {
            actor: principal.actor,
            role: principal.role.name().into(),
            permissions: principal.role.permissions().map(|p| p.name().to_owned()).collect(),
        },
    )
}

// ---- users ----

/// A user as `GET /v1/users` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserView {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: String,
    /// When added.
    pub created_at: Timestamp,
    /// When disabled.
    pub disabled_at: Option<Timestamp>,
    /// Sessions not ended.
    pub sessions: u64,
}

async fn list_users(State(api): State<Api>) -> ApiResult<Response> {
    let users = api.shared.db.run(|sql| store::users(&sql)).await?;
    let views: Vec<UserView> = users
        .into_iter()
        .map(|u| UserView {
            name: u.name,
            role: u.role.name().into(),
            created_at: u.created_at,
            disabled_at: u.disabled_at,
            sessions: u.sessions,
        })
        .collect();
    Ok(json_response(StatusCode::OK, &views))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddUser {
    name: String,
    role: String,
    /// None: one is generated and returned once.
    #[serde(default)]
    password: Option<String>,
}

/// A new password to set: the given one (checked), or a generated one to return.
fn new_password(given: Option<String>) -> ApiResult<(String, Option<String>)> {
    if let Some(p) = given {
        rules::check_password(&p).map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok((p, None))
    } else {
        let p = password::generate();
        Ok((p.clone(), Some(p)))
    }
}

async fn add_user(State(api): State<Api>, body: String) -> ApiResult<Response> {
    let request: AddUser = parse(&body)?;
    let (role, generated) =
        add_user_as(&api, &request.name, &request.role, request.password).await?;
    Ok(json_response(
        StatusCode::CREATED,
        &AddedUser { name: request.name, role: role.name().to_owned(), password: generated },
    ))
}

/// What `POST /v1/users` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddedUser {
    pub name: String,
    /// Its role.
    pub role: String,
    /// The generated password, shown once (none when the request gave one).
    pub password: Option<String>,
}

/// What `PUT /v1/users/{name}/role` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoleChanged {
    pub name: String,
    /// Its role now.
    pub role: String,
    /// Its role before.
    pub previous: String,
}

/// What `POST /v1/users/{name}/disable` and `.../enable` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserDisabled {
    pub name: String,
    /// Whether it is disabled now.
    pub disabled: bool,
}

/// What `DELETE /v1/users/{name}` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserRemoved {
    pub name: String,
    /// Always true: a user that was not there is a 404.
    pub removed: bool,
}

/// What `DELETE /v1/apitokens/{name}` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRevoked {
    pub name: String,
    /// Always true: a token that was not there is a 404.
    pub revoked: bool,
}

/// What `POST /v1/logout` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoggedOut {
    /// The session's id.
    pub ended: String,
}

/// What `POST /v1/users/{name}/password` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PasswordReset {
    pub name: String,
    /// The generated password, shown once (none when the request gave one).
    pub password: Option<String>,
}

/// Adds user `name` with role `role` and `password` (None: one is generated and
/// returned once), audited as the current actor (the API's and the console's service).
pub(crate) async fn add_user_as(
    api: &Api,
    name: &str,
    role: &str,
    password: Option<String>,
) -> ApiResult<(Role, Option<String>)> {
    rules::check_name("user name", name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let role = parse_role(role)?;
    let (password, generated) = new_password(password)?;
    let phc = hash(password).await?;
    let (n, at) = (name.to_owned(), now());
    api.shared
        .db
        .run(move |sql| store::add_user(&sql, &n, role, &phc, at))
        .await?
        .map_err(|r| refusal(&r))?;
    tracing::info!(user = %name, %role, "user added");
    Ok((role, generated))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetRole {
    role: String,
}

async fn set_role(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: String,
) -> ApiResult<Response> {
    let role = parse_role(&parse::<SetRole>(&body)?.role)?;
    let before = set_role_as(&api, &name, role).await?;
    Ok(json_response(
        StatusCode::OK,
        &RoleChanged { name, role: role.name().to_owned(), previous: before.name().to_owned() },
    ))
}

/// Gives user `name` role `role` and answers its previous one, audited as the current
/// actor (the API's and the console's service).
pub(crate) async fn set_role_as(api: &Api, name: &str, role: Role) -> ApiResult<Role> {
    let (n, at) = (name.to_owned(), now());
    api.shared
        .db
        .run(move |sql| store::set_role(&sql, &n, role, at))
        .await?
        .map_err(|r| refusal(&r))
}

/// Disables (or enables again) user `name`, audited as the current actor (the API's and
/// the console's service).
pub(crate) async fn set_disabled(api: &Api, name: &str, disabled: bool) -> ApiResult<()> {
    let (n, at) = (name.to_owned(), now());
    api.shared
        .db
        .run(move |sql| store::set_disabled(&sql, &n, disabled, at))
        .await?
        .map_err(|r| refusal(&r))
}

async fn disable_user(State(api): State<Api>, Path(name): Path<String>) -> ApiResult<Response> {
    set_disabled(&api, &name, true).await?;
    Ok(json_response(StatusCode::OK, &UserDisabled { name, disabled: true }))
}

async fn enable_user(State(api): State<Api>, Path(name): Path<String>) -> ApiResult<Response> {
    set_disabled(&api, &name, false).await?;
    Ok(json_response(StatusCode::OK, &UserDisabled { name, disabled: false }))
}

/// Removes user `name`, audited as the current actor (the API's and the console's service).
pub(crate) async fn remove(api: &Api, name: &str) -> ApiResult<()> {
    let (n, at) = (name.to_owned(), now());
    api.shared.db.run(move |sql| store::remove_user(&sql, &n, at)).await?.map_err(|r| refusal(&r))
}

async fn remove_user(State(api): State<Api>, Path(name): Path<String>) -> ApiResult<Response> {
    remove(&api, &name).await?;
    Ok(json_response(StatusCode::OK, &UserRemoved { name, removed: true }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResetPassword {
    #[serde(default)]
    password: Option<String>,
}

async fn reset_password(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: String,
) -> ApiResult<Response> {
    let request: ResetPassword =
        if body.trim().is_empty() { ResetPassword::default() } else { parse(&body)? };
    let (password, generated) = new_password(request.password)?;
    let phc = hash(password).await?;
    let (n, at) = (name.clone(), now());
    api.shared
        .db
        .run(move |sql| store::set_password(&sql, &n, &phc, at))
        .await?
        .map_err(|r| refusal(&r))?;
    Ok(json_response(StatusCode::OK, &PasswordReset { name, password: generated }))
}

// ---- API tokens ----

/// An API token as `GET /v1/apitokens` lists it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenView {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: String,
    /// Who created it.
    pub created_by: String,
    /// When.
    pub created_at: Timestamp,
    /// When it expires.
    pub expires_at: Timestamp,
    /// When last used (to the minute).
    pub last_used: Option<Timestamp>,
    /// When revoked.
    pub revoked_at: Option<Timestamp>,
}

async fn list_tokens(State(api): State<Api>) -> ApiResult<Response> {
    let rows = api.shared.db.run(|sql| store::api_tokens(&sql)).await?;
    let views: Vec<ApiTokenView> = rows
        .into_iter()
        .map(|t| ApiTokenView {
            name: t.name,
            role: t.role.name().into(),
            created_by: t.created_by,
            created_at: t.created_at,
            expires_at: t.expires_at,
            last_used: t.last_used,
            revoked_at: t.revoked_at,
        })
        .collect();
    Ok(json_response(StatusCode::OK, &views))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    name: String,
    role: String,
    ttl_seconds: u64,
}

/// A refusal by the rules of API tokens (not by the route's permission): 403, audited.
async fn forbidden(api: &Api, principal: &Principal, path: &str, message: String) -> ApiError {
    let actor = audit::current();
    gate::refuse(api, actor, P::ManageApiTokens, path, 403, &message).await;
    tracing::info!(actor = %principal.actor, %message, "API token change refused");
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

async fn create_token(
    State(api): State<Api>,
    Extension(principal): Extension<Principal>,
    body: String,
) -> ApiResult<Response> {
    let request: CreateToken = parse(&body)?;
    let created =
        create_token_as(&api, &principal, &request.name, &request.role, request.ttl_seconds)
            .await?;
    Ok(json_response(StatusCode::CREATED, &created))
}

/// A new API token, its secret shown once: what `POST /v1/apitokens` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewApiToken {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: String,
    /// The bearer secret.
    pub token: String,
    /// When it expires.
    pub expires_at: Timestamp,
}

/// Creates API token `name` of `role` for `ttl_seconds` on behalf of `principal`, by the
/// rules of API tokens (no token creates one; never more powerful than its creator),
/// audited as the current actor (the API's and the console's service).
pub(crate) async fn create_token_as(
    api: &Api,
    principal: &Principal,
    name: &str,
    role: &str,
    ttl_seconds: u64,
) -> ApiResult<NewApiToken> {
    rules::check_name("token name", name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let role = parse_role(role)?;
    let ttl = Duration::from_secs(ttl_seconds);
    if ttl < TOKEN_TTL.0 || ttl > TOKEN_TTL.1 {
        return Err(ApiError::bad_request(format!(
            "ttl_seconds must be between {} and {} (366 days)",
            TOKEN_TTL.0.as_secs(),
            TOKEN_TTL.1.as_secs()
        )));
    }
    if matches!(principal.via, Via::ApiToken { .. }) {
        let message =
            format!("{} is an API token; API tokens cannot create API tokens", principal.actor);
        return Err(forbidden(api, principal, "/v1/apitokens", message).await);
    }
    if !principal.role.covers(role) {
        let message = format!(
            "{} has role {}, which cannot create an API token of role {role}: a token is never more powerful than its creator",
            principal.actor, principal.role
        );
        return Err(forbidden(api, principal, "/v1/apitokens", message).await);
    }
    let (secret, sha) = store::new_secret(store::TOKEN_PREFIX);
    let (n, creator, at) = (name.to_owned(), principal.actor.clone(), now());
    let expires = api
        .shared
        .db
        .run(move |sql| store::create_api_token(&sql, &n, role, &creator, sha, ttl, at))
        .await?
        .map_err(|r| refusal(&r))?;
    tracing::info!(token = %name, %role, by = %principal.actor, "API token created");
    Ok(NewApiToken {
        name: name.to_owned(),
        role: role.name().into(),
        token: secret,
        expires_at: expires,
    })
}

async fn revoke_token(
    State(api): State<Api>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    revoke_token_as(&api, &principal, &name).await?;
    Ok(json_response(StatusCode::OK, &TokenRevoked { name, revoked: true }))
}

/// Revokes API token `name` on behalf of `principal` (a token revokes only itself),
/// audited as the current actor (the API's and the console's service).
pub(crate) async fn revoke_token_as(api: &Api, principal: &Principal, name: &str) -> ApiResult<()> {
    let (n, by, at) = (name.to_owned(), principal.clone(), now());
    match api.shared.db.run(move |sql| store::revoke_api_token(&sql, &n, &by, at)).await? {
        Ok(()) => Ok(()),
        Err(r @ Refusal::NotYours { .. }) => {
            Err(forbidden(api, principal, &format!("/v1/apitokens/{name}"), r.to_string()).await)
        }
        Err(r) => Err(refusal(&r)),
    }
}
