//! The console's gate, in front of every page: it finds the page's declared access,
//! authenticates the session cookie (sessions only: API tokens and the admin token are
//! for programs, not browsers), refuses a role without the permission (403, audited as
//! the API's gate does), checks the CSRF token of every POST before the handler sees
//! it, and runs the handler as the caller. A page with no declared access answers 500,
//! never open. `headers` puts the security headers on every answer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use falaj_common::keys::Sha256;
use falaj_common::time::Timestamp;
use falaj_shell::http::Scheme;

use super::layout;
use super::session::{self, SESSION_COOKIE};
use crate::admin::Api;
use crate::audit::{self, Actor};
use crate::auth::gate::{Source, refuse};
use crate::auth::store::{self, Resolved};
use crate::auth::{Access, Principal, Via};

/// Largest form body read (forms carry a few short fields).
const MAX_FORM: usize = 64 * 1024;

/// The gate's state.
#[derive(Debug, Clone)]
pub(crate) struct Gate {
    pub(crate) api: Api,
    pub(crate) table: Arc<BTreeMap<&'static str, BTreeMap<String, Access>>>,
}

/// What a page's handler knows of the request beyond its arguments.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Who is calling.
    pub principal: Principal,
    /// The token every form of this session carries.
    pub csrf: String,
    /// The request's path and query (for links back).
    pub path: String,
}

impl Ctx {
    /// Whether the caller may do what `permission` allows.
    pub fn may(&self, permission: crate::auth::Permission) -> bool {
        self.principal.role.allows(permission)
    }
}

/// The CSRF token of a session: a digest of its secret under a label of its own, so it
/// is fixed for the session, unknowable without the cookie, and needs no storage.
pub fn csrf_token(session_secret: &str) -> String {
    Sha256::of(format!("falaj-console-csrf\0{session_secret}").as_bytes()).to_string()
}

/// Whether the request came over TLS, served by the control plane itself
/// ([`falaj_shell::http::Scheme`], which [`check`] turns into this header) or through a
/// proxy that says so: the cookie is then marked `Secure`.
pub(crate) fn is_secure(headers: &HeaderMap) -> bool {
    let proto = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok());
    let forwarded = headers.get(header::FORWARDED).and_then(|v| v.to_str().ok());
    proto.is_some_and(|p| p.eq_ignore_ascii_case("https"))
        || forwarded.is_some_and(|f| f.to_ascii_lowercase().contains("proto=https"))
}

/// A cookie's value from the `Cookie` headers.
pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Whether a POST's `Origin` (when the browser sends one) is this host: a form posted
/// from another site is refused even before its token is looked at.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|o| o == host)
}

/// Equal digests of both tokens (the comparison's timing says nothing of the token).
fn tokens_match(presented: &str, expected: &str) -> bool {
    Sha256::of(presented.as_bytes()) == Sha256::of(expected.as_bytes())
}

/// The `csrf` field of an URL-encoded form.
pub(crate) fn form_field(body: &[u8], name: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).ok()?;
    pairs.into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

pub(crate) async fn check(State(gate): State<Gate>, mut request: Request, next: Next) -> Response {
    let source = Source(request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()));
    request.extensions_mut().insert(source);
    // Served over the control plane's own TLS: said the way a proxy says it, so one check
    // (`is_secure`) serves both.
    if request.extensions().get::<Scheme>() == Some(&Scheme::Https) {
        request.headers_mut().insert("x-forwarded-proto", HeaderValue::from_static("https"));
    }
    let Some(path) = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned())
    else {
        return next.run(request).await;
    };
    let method =
        if request.method() == Method::HEAD { Method::GET } else { request.method().clone() };
    let access = gate.table.get(path.as_str()).and_then(|m| m.get(method.as_str())).copied();
    let Some(access) = access else {
        tracing::error!(%method, %path, "console page has no declared access; refused");
        return layout::error_page(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
    };
    if method == Method::POST && !same_origin(request.headers()) {
        return layout::error_page(StatusCode::FORBIDDEN, "this form was posted from another site");
    }
    let permission = match access {
        Access::Public => return next.run(request).await,
        Access::Requires(permission) => permission,
    };
    let wanted = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let (principal, secret) = match authenticate(&gate.api, request.headers()).await {
        Ok(found) => found,
        Err(Unauthenticated::Missing) if method == Method::GET => {
            return Redirect::to(&session::login_url(&wanted, None)).into_response();
        }
        Err(Unauthenticated::Missing) => {
            return layout::error_page(StatusCode::UNAUTHORIZED, "log in first");
        }
        Err(Unauthenticated::Refused { actor, reason }) => {
            refuse(&gate.api, Actor::new(actor, source.name()), permission, &path, 401, &reason)
                .await;
            let response = if method == Method::GET {
                Redirect::to(&session::login_url(&wanted, Some(&reason))).into_response()
            } else {
                layout::error_page(StatusCode::UNAUTHORIZED, &reason)
            };
            return session::clear_session(response, request.headers());
        }
        Err(Unauthenticated::Failed(e)) => {
            return layout::api_error_page(&e);
        }
    };
    let actor = Actor::new(principal.actor.clone(), source.name());
    if !principal.role.allows(permission) {
        let message = format!(
            "{} has role {}, which lacks permission {permission} needed for {method} {path}",
            principal.actor, principal.role
        );
        refuse(&gate.api, actor, permission, &path, 403, &message).await;
        return layout::error_page(StatusCode::FORBIDDEN, &message);
    }
    let csrf = csrf_token(&secret);
    if method == Method::POST {
        let (parts, body) = request.into_parts();
        let Ok(bytes) = axum::body::to_bytes(body, MAX_FORM).await else {
            return layout::error_page(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large");
        };
        let presented = form_field(&bytes, "csrf").unwrap_or_default();
        if !tokens_match(&presented, &csrf) {
            let reason = "the form's CSRF token is missing or not this session's; reload the page";
            refuse(&gate.api, actor, permission, &path, 403, reason).await;
            return layout::error_page(StatusCode::FORBIDDEN, reason);
        }
        request = Request::from_parts(parts, Body::from(bytes));
    }
    request.extensions_mut().insert(Ctx { principal, csrf, path: wanted });
    audit::acting(actor, next.run(request)).await
}

enum Unauthenticated {
    Missing,
    Refused { actor: String, reason: String },
    Failed(crate::admin::ApiError),
}

/// The session the cookie names, and its secret.
async fn authenticate(
    api: &Api,
    headers: &HeaderMap,
) -> Result<(Principal, String), Unauthenticated> {
    let presented = cookie(headers, SESSION_COOKIE)
        .filter(|t| !t.is_empty())
        .ok_or(Unauthenticated::Missing)?;
    let policy = api.auth.sessions;
    let now = Timestamp::from_system(SystemTime::now());
    let token = presented.clone();
    let resolved = api
        .shared
        .db
        .run(move |sql| store::resolve(&sql, &token, &policy, now))
        .await
        .map_err(|e| Unauthenticated::Failed(e.into()))?;
    match resolved {
        Resolved::Valid(principal) if matches!(principal.via, Via::Session { .. }) => {
            Ok((principal, presented))
        }
        Resolved::Valid(principal) => Err(Unauthenticated::Refused {
            actor: principal.actor,
            reason: "the console takes a login session, not an API token".into(),
        }),
        Resolved::Refused { actor, reason } => Err(Unauthenticated::Refused { actor, reason }),
        Resolved::Unknown => Err(Unauthenticated::Refused {
            actor: "anonymous".into(),
            reason: "the session is not known; log in again".into(),
        }),
    }
}

/// The security headers of every console answer: a strict Content-Security-Policy (only
/// this origin's stylesheet and script, no inline script or style, no framing), no
/// sniffing, no referrer to other sites (same-origin: a form's `Origin` is still sent, which
/// `no-referrer` would turn into `null`), and pages never cached.
pub(crate) async fn headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; \
             form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_name_among_others() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1; falaj_session=fs-x"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&h, "falaj_session").as_deref(), Some("fs-x"));
        assert_eq!(cookie(&h, "b").as_deref(), Some("2"));
        assert_eq!(cookie(&h, "falaj"), None);
    }

    #[test]
    fn csrf_tokens_differ_per_session_and_match_only_themselves() {
        let (a, b) = (csrf_token("fs-one"), csrf_token("fs-two"));
        assert_ne!(a, b);
        assert!(tokens_match(&a, &csrf_token("fs-one")));
        assert!(!tokens_match(&a, &b));
        assert!(!tokens_match("", &a));
    }

    #[test]
    fn forms_from_other_origins_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:7080"));
        assert!(same_origin(&h), "no Origin header: older browsers, the token still holds");
        h.insert(header::ORIGIN, HeaderValue::from_static("http://127.0.0.1:7080"));
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("http://evil.example"));
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h));
    }

    #[test]
    fn form_fields_are_decoded() {
        assert_eq!(form_field(b"a=1&csrf=x%2By", "csrf").as_deref(), Some("x+y"));
        assert_eq!(form_field(b"a=1", "csrf"), None);
        assert_eq!(form_field(&[0xff, 0xfe], "csrf"), None);
    }

    #[test]
    fn tls_is_recognised_from_the_proxy_headers() {
        let mut h = HeaderMap::new();
        assert!(!is_secure(&h));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(is_secure(&h));
        let mut h = HeaderMap::new();
        h.insert(header::FORWARDED, HeaderValue::from_static("for=1.2.3.4;proto=https"));
        assert!(is_secure(&h));
    }
}
