//! Logging in and out of the console. The login checks the password through the same
//! service as `POST /v1/login` (lockouts, Argon2id, every failure audited) and keeps the
//! session's secret in a cookie that scripts cannot read (`HttpOnly`), that no other
//! site's request carries (`SameSite=Strict`), and that travels only over TLS when the
//! console is served over TLS (`Secure`). The login form has a CSRF token of its own (a
//! random value in a short cookie), so no other site can log a browser in as someone
//! else. Sessions end when idle as the API's do (`[admin] session_idle`).

use std::time::SystemTime;

use axum::Extension;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use falaj_common::time::Timestamp;
use maud::html;
use serde::Deserialize;

use super::gate::{Ctx, cookie, form_field, is_secure};
use super::layout;
use crate::admin::Api;
use crate::audit::{self, Actor};
use crate::auth::gate::Source;
use crate::auth::{Via, store};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "falaj_session";
/// The login form's CSRF cookie.
const LOGIN_COOKIE: &str = "falaj_login";

/// `/login?next=...&reason=...`, with `next` only if it is a path of this site.
pub(crate) fn login_url(next: &str, reason: Option<&str>) -> String {
    let mut pairs = vec![("next", next)];
    if let Some(reason) = reason {
        pairs.push(("reason", reason));
    }
    format!("/login?{}", serde_urlencoded::to_string(pairs).unwrap_or_default())
}

/// Where to go after logging in: a local path only (never `//host` or a URL).
fn local_path(next: Option<&str>) -> &str {
    next.filter(|n| n.starts_with('/') && !n.starts_with("//") && !n.contains('\\')).unwrap_or("/")
}

fn set_cookie(response: &mut Response, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn cookie_line(name: &str, value: &str, path: &str, max_age: u64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}")
}

/// `response` with the session cookie removed.
pub(crate) fn clear_session(mut response: Response, headers: &HeaderMap) -> Response {
    set_cookie(&mut response, &cookie_line(SESSION_COOKIE, "", "/", 0, is_secure(headers)));
    response
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginQuery {
    next: Option<String>,
    reason: Option<String>,
}

/// `GET /login`.
pub(crate) async fn login_page(headers: HeaderMap, Query(q): Query<LoginQuery>) -> Response {
    form(&headers, q.next.as_deref(), q.reason.as_deref(), StatusCode::OK)
}

fn form(
    headers: &HeaderMap,
    next: Option<&str>,
    message: Option<&str>,
    status: StatusCode,
) -> Response {
    let csrf = crate::secrets::random_hex::<16>();
    let body = html! {
        main.login {
            h1 { "Falaj control plane" }
            @if let Some(message) = message {
                p.notice role="alert" { (message) }
            }
            form method="post" action="/login" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="next" value=(local_path(next));
                label for="user" { "User" }
                input #user type="text" name="user" autocomplete="username" required autofocus;
                label for="password" { "Password" }
                input #password type="password" name="password" autocomplete="current-password" required;
                button type="submit" { "Log in" }
            }
            p.hint { "Ask an admin for an account: " code { "falaj-control user add NAME --role viewer" } }
        }
    };
    let mut response = (status, layout::bare("Log in", &body)).into_response();
    set_cookie(
        &mut response,
        &cookie_line(LOGIN_COOKIE, &csrf, "/login", 3600, is_secure(headers)),
    );
    response
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    user: String,
    password: String,
    next: Option<String>,
}

/// `POST /login`: the password checked as `POST /v1/login` checks it; the session's
/// secret goes into the cookie, never into the page.
pub(crate) async fn login(
    State(api): State<Api>,
    Extension(source): Extension<Source>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let presented = form_field(&body, "csrf").unwrap_or_default();
    let expected = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if expected.is_empty() || presented != expected {
        let message = "the login form expired; please try again";
        return form(&headers, None, Some(message), StatusCode::FORBIDDEN);
    }
    let Ok(f) = serde_urlencoded::from_bytes::<LoginForm>(&body) else {
        return form(
            &headers,
            None,
            Some("enter a user name and a password"),
            StatusCode::BAD_REQUEST,
        );
    };
    let user: String = f.user.trim().chars().take(64).collect();
    let actor = Actor::new(format!("user:{user}"), source.name());
    let login = crate::auth::api::login_as(api, user, f.password, source.name());
    match audit::acting(actor, login).await {
        Ok(view) => {
            let mut response = Redirect::to(local_path(f.next.as_deref())).into_response();
            let secure = is_secure(&headers);
            let max = view
                .expires_at
                .unix()
                .saturating_sub(Timestamp::from_system(SystemTime::now()).unix());
            set_cookie(&mut response, &cookie_line(SESSION_COOKIE, &view.token, "/", max, secure));
            set_cookie(&mut response, &cookie_line(LOGIN_COOKIE, "", "/login", 0, secure));
            response
        }
        Err(e) => form(&headers, f.next.as_deref(), Some(e.message()), e.status()),
    }
}

/// `POST /logout`: the session ends (audited) and the cookie goes.
pub(crate) async fn logout(
    State(api): State<Api>,
    Extension(ctx): Extension<Ctx>,
    headers: HeaderMap,
) -> Response {
    if let Via::Session { id, .. } = ctx.principal.via {
        let now = Timestamp::from_system(SystemTime::now());
        if let Err(e) = api.shared.db.run(move |sql| store::end_session(&sql, &id, now)).await {
            return layout::api_error_page(&e.into());
        }
    }
    let response = Redirect::to(&login_url("/", Some("You are logged out."))).into_response();
    clear_session(response, &headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_followed_after_login() {
        assert_eq!(local_path(Some("/fleet?group=a")), "/fleet?group=a");
        assert_eq!(local_path(Some("//evil.example/")), "/");
        assert_eq!(local_path(Some("https://evil.example/")), "/");
        assert_eq!(local_path(Some("/\\evil.example")), "/");
        assert_eq!(local_path(None), "/");
    }

    #[test]
    fn session_cookies_are_http_only_strict_and_secure_over_tls() {
        let plain = cookie_line(SESSION_COOKIE, "fs-x", "/", 60, false);
        assert_eq!(plain, "falaj_session=fs-x; Path=/; Max-Age=60; HttpOnly; SameSite=Strict");
        assert!(cookie_line(SESSION_COOKIE, "fs-x", "/", 60, true).ends_with("; Secure"));
    }

    #[test]
    fn login_urls_carry_the_page_asked_for() {
        assert_eq!(
            login_url("/fleet?status=offline", None),
            "/login?next=%2Ffleet%3Fstatus%3Doffline"
        );
        assert!(login_url("/", Some("expired")).ends_with("&reason=expired"));
    }
}
