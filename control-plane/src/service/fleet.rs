//! The fleet: agents as the fleet view shows them, enrollment tokens, revocation, and the
//! daemon's status.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use falaj_common::enrollment::EnrollmentToken;
use falaj_common::names;
use falaj_common::protocol::EngineReport;
use falaj_common::time::Timestamp;
use serde::{Deserialize, Serialize};

use super::{ServiceError, ServiceResult};
use crate::db::{self, AgentRow, TokenRow};
use crate::state::Shared;

/// What `GET /v1/status` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    /// The control plane's region.
    pub region: String,
    /// Its software version.
    pub version: String,
    /// The agents' CA certificate's SHA-256 fingerprint.
    pub ca_sha256: String,
    /// Agents enrolled (revoked ones included).
    pub agents: u64,
    /// Agents with a session open now.
    pub connected: u64,
    /// Bundles registered.
    pub bundles: u64,
}

/// The daemon's status: its region and CA, how many agents and bundles it has.
pub(crate) async fn status(shared: &Shared) -> ServiceResult<StatusView> {
    let (agents, bundles) =
        shared.db.run(|sql| Ok((db::agents(&sql)?, db::bundles(&sql)?))).await?;
    let connected = shared.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len();
    Ok(StatusView {
        region: shared.region.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ca_sha256: shared.ca.fingerprint().to_string(),
        agents: agents.len() as u64,
        connected: connected as u64,
        bundles: bundles.len() as u64,
    })
}

/// A new enrollment token, shown once: what `POST /v1/tokens` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewEnrollmentToken {
    /// The token as `falaj-agent enroll --token` takes it.
    pub token: String,
    /// Its public id.
    pub id: String,
    /// The group agents enrolled with it join.
    pub group: String,
    pub region: String,
    /// When it expires.
    pub expires: String,
}

/// Creates a one-time enrollment token for `group`, valid `ttl_seconds` .
pub(crate) async fn enrollment_token(
    shared: &Shared,
    group: &str,
    ttl_seconds: u64,
) -> ServiceResult<NewEnrollmentToken> {
    names::check_model_name(group).map_err(|e| ServiceError::Invalid(format!("group: {e}")))?;
    if ttl_seconds == 0 || ttl_seconds > 30 * 24 * 3600 {
        return Err(ServiceError::Invalid(
            "ttl_seconds must be between 1 and 2592000 (30 days)".into(),
        ));
    }
    let (id, secret) = (crate::secrets::random::<16>(), crate::secrets::random::<32>());
    let now = Timestamp::from_system(SystemTime::now());
    let token = EnrollmentToken {
        id,
        secret,
        region: shared.region.clone(),
        group: group.to_owned(),
        ca_sha256: shared.ca.fingerprint(),
        expires: now.saturating_add(Duration::from_secs(ttl_seconds)),
    };
    let row = TokenRow {
        id: token.id_hex(),
        group: token.group.clone(),
        region: token.region.clone(),
        expires: token.expires,
    };
    let secret_sha = token.secret_sha256();
    shared.db.run(move |sql| db::insert_token(&sql, &row, secret_sha, now)).await?;
    Ok(NewEnrollmentToken {
        token: token.to_string(),
        id: token.id_hex(),
        group: token.group,
        region: token.region,
        expires: token.expires.to_string(),
    })
}

/// An agent as the fleet view shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentView {
    /// Id.
    pub id: String,
    /// Host name.
    pub hostname: String,
    /// Group.
    pub group: String,
    /// Region.
    pub region: String,
    /// `connected`, `offline` or `revoked`.
    pub status: String,
    /// Last report.
    pub last_seen: Option<String>,
    /// Software version.
    pub agent_version: String,
    /// Version of the last desired-state document it applied.
    pub applied_version: Option<u64>,
    /// Held bundles as `name@version`.
    pub held: Vec<String>,
    /// Active bundles as `name@version`.
    pub active: Vec<String>,
    /// Reconciliation errors.
    pub errors: Vec<String>,
    /// Whether every active model is loaded and serving, as last reported.
    pub ready: bool,
    /// The engines it can serve on, as last reported.
    #[serde(default)]
    pub engines: Vec<EngineReport>,
    /// The engine serving each loaded active version, by `name@version`.
    #[serde(default)]
    pub serving: BTreeMap<String, String>,
    /// The trust-root version it verifies against (0 before its first report).
    #[serde(default)]
    pub trust_version: u64,
}

fn agent_view(row: AgentRow, connected: bool, now: Timestamp, heartbeat: Duration) -> AgentView {
    // Three missed reports make an agent offline; timestamps have whole seconds, so the
    // window is rounded up to at least two of them.
    let window = (heartbeat * 3).max(Duration::from_secs(2)) + Duration::from_millis(999);
    let fresh = row.last_seen.is_some_and(|t| t.saturating_add(window) > now);
    let status = if row.revoked_at.is_some() {
        "revoked"
    } else if connected && fresh {
        "connected"
    } else {
        "offline"
    };
    let actual = row.actual.unwrap_or_default();
    AgentView {
        id: row.id,
        hostname: row.hostname,
        group: row.group,
        region: row.region,
        status: status.into(),
        last_seen: row.last_seen.map(|t| t.to_string()),
        agent_version: row.agent_version,
        applied_version: actual.desired_version,
        held: actual.bundles.iter().map(|b| format!("{}@{}", b.name, b.version)).collect(),
        active: actual
            .bundles
            .iter()
            .filter(|b| b.active)
            .map(|b| format!("{}@{}", b.name, b.version))
            .collect(),
        serving: actual
            .bundles
            .iter()
            .filter(|b| b.active)
            .filter_map(|b| Some((format!("{}@{}", b.name, b.version), b.engine.clone()?)))
            .collect(),
        errors: actual.errors,
        ready: actual.ready,
        engines: actual.engines,
        trust_version: actual.trust_version,
    }
}

/// Every agent as the fleet view shows it.
pub(crate) async fn agent_views(shared: &Shared) -> ServiceResult<Vec<AgentView>> {
    shared.flush_seen().await?;
    let rows = shared.db.run(|sql| db::agents(&sql)).await?;
    let now = Timestamp::from_system(SystemTime::now());
    // On PostgreSQL an agent may hold its session with another replica, whose reports
    // keep its last contact fresh: that counts as connected here too.
    let replicas = shared.db.backend() == crate::sql::Backend::Postgres;
    Ok(rows
        .into_iter()
        .map(|row| {
            let connected = replicas || shared.connected(&row.id);
            agent_view(row, connected, now, shared.policy.heartbeat)
        })
        .collect())
}

/// What `POST /v1/agents/{id}/revoke` answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokedView {
    pub id: String,
    /// Always true: a refusal is an error.
    pub revoked: bool,
}

/// Revokes agent `id`: its certificate is refused from now on and its session closed.
pub(crate) async fn revoke(shared: &Shared, id: &str) -> ServiceResult<RevokedView> {
    let now = Timestamp::from_system(SystemTime::now());
    let agent = id.to_owned();
    if !shared.db.run(move |sql| db::revoke(&sql, &agent, now)).await? {
        return Err(ServiceError::NotFound(format!("no agent {id:?}")));
    }
    shared.disconnect(id, crate::quic::CLOSE_REFUSED, "agent revoked");
    tracing::warn!(agent = %id, "agent revoked");
    Ok(RevokedView { id: id.to_owned(), revoked: true })
}
