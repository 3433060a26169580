//! The middleware in front of every admin route: it finds the route's declared access in
//! the table [`Routes`](super::Routes) built, authenticates the bearer token (the admin
//! token, a session or an API token), checks the caller's role, and runs the request as
//! that caller ([`crate::audit::acting`]) so every change it makes is recorded under its
//! name and address. 401 without a good credential, 403 naming the role and the
//! permission; refusals of a presented credential or of a role are audited, each in its
//! own small transaction.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use falaj_common::audit::Outcome;
use falaj_common::keys::Sha256;
use falaj_common::time::Timestamp;
use serde_json::json;

use super::routes::{Lookup, Table};
use super::store::{self, Resolved};
use super::{Access, Permission, Principal};
use crate::admin::{Api, ApiError};
use crate::audit::{self, Actor};

/// The gate's state: the API and the table of declared routes.
#[derive(Debug, Clone)]
pub(crate) struct Gate {
    pub(crate) api: Api,
    pub(crate) table: Arc<Table>,
}

/// The caller's address, as handlers see it (absent when not served over TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source(pub Option<IpAddr>);

impl Source {
    /// The address as audit entries and lockouts name it.
    pub fn name(self) -> Option<String> {
        self.0.map(|ip| ip.to_string())
    }
}

fn unauthorized(message: impl Into<String>) -> Response {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response()
}

pub(crate) async fn check(State(gate): State<Gate>, mut request: Request, next: Next) -> Response {
    let source = Source(request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()));
    request.extensions_mut().insert(source);
    // No matched path: the fallback (a 404), which is open.
    let Some(path) = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned())
    else {
        return next.run(request).await;
    };
    let permission = match gate.table.lookup(request.method(), &path) {
        Lookup::Declared(Access::Public) => return next.run(request).await,
        Lookup::Declared(Access::Requires(permission)) => permission,
        Lookup::OtherMethods => {
            return ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed on {path}", request.method()),
            )
            .into_response();
        }
        Lookup::Undeclared => {
            tracing::error!(method = %request.method(), %path, "route has no declared access; refused");
            return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error")
                .into_response();
        }
    };
    let principal = match authenticate(&gate.api, request.headers()).await {
        Ok(principal) => principal,
        Err(Unauthenticated::Missing) => {
            return unauthorized(
                "a bearer token is required: log in (falaj-control login), or use an API token or the admin token",
            );
        }
        Err(Unauthenticated::Refused { actor, reason }) => {
            let actor = Actor::new(actor, source.name());
            refuse(&gate.api, actor, permission, &path, 401, &reason).await;
            return unauthorized(reason);
        }
        Err(Unauthenticated::Failed(response)) => return response,
    };
    let actor = Actor::new(principal.actor.clone(), source.name());
    if !principal.role.allows(permission) {
        let message = format!(
            "{} has role {}, which lacks permission {permission} needed for {} {path}",
            principal.actor,
            principal.role,
            request.method()
        );
        refuse(&gate.api, actor, permission, &path, 403, &message).await;
        return ApiError::new(StatusCode::FORBIDDEN, "forbidden", message).into_response();
    }
    tracing::debug!(actor = %principal.actor, role = %principal.role, %path, "authorised");
    request.extensions_mut().insert(principal);
    audit::acting(actor, next.run(request)).await
}

enum Unauthenticated {
    /// No bearer token.
    Missing,
    /// A credential that is unknown, ended or expired.
    Refused { actor: String, reason: String },
    /// The lookup itself failed.
    Failed(Response),
}

async fn authenticate(api: &Api, headers: &HeaderMap) -> Result<Principal, Unauthenticated> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(Unauthenticated::Missing)?;
    // Comparing digests rather than the tokens keeps the comparison's timing meaningless.
    if Sha256::of(presented.as_bytes()) == Sha256::of(api.token.as_bytes()) {
        return Ok(Principal::admin_token());
    }
    let presented = presented.to_owned();
    let policy = api.auth.sessions;
    let now = Timestamp::from_system(SystemTime::now());
    let resolved = api
        .shared
        .db
        .run(move |sql| store::resolve(&sql, &presented, &policy, now))
        .await
        .map_err(|e| Unauthenticated::Failed(ApiError::from(e).into_response()))?;
    match resolved {
        Resolved::Valid(principal) => Ok(principal),
        Resolved::Refused { actor, reason } => Err(Unauthenticated::Refused { actor, reason }),
        Resolved::Unknown => Err(Unauthenticated::Refused {
            actor: "anonymous".into(),
            reason: "the bearer token is not a known session, API token or admin token".into(),
        }),
    }
}

/// Records a refused request (`status` 401 or 403) by `actor` in its own transaction.
pub(crate) async fn refuse(
    api: &Api,
    actor: Actor,
    permission: Permission,
    path: &str,
    status: u16,
    reason: &str,
) {
    tracing::info!(actor = %actor.name, %permission, %path, status, "request refused");
    let (path, details) = (path.to_owned(), json!({"status": status, "reason": reason}));
    let now = Timestamp::from_system(SystemTime::now());
    let recorded = audit::acting(
        actor,
        api.shared.db.run(move |sql| {
            let tx = sql.transaction()?;
            audit::record(&tx, now, permission.name(), &path, Outcome::Refused, details)?;
            tx.commit()
        }),
    )
    .await;
    if let Err(err) = recorded {
        tracing::error!(error = %err, "recording a refused request in the audit log failed");
    }
}
