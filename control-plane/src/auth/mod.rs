//! People and their access to the admin API: users with roles, sessions from a login,
//! API tokens for automation, and the permission every route declares.
//!
//! - [`rules`]: roles, permissions, lockouts and expiry, without I/O;
//! - [`password`]: Argon2id hashes (OWASP parameters), run on the blocking pool;
//! - [`store`]: users, sessions, API tokens and failed logins in the control plane's
//!   database (SQLite or PostgreSQL), each change with its audit entry in the same
//!   transaction;
//! - [`routes`]: [`routes::Routes`], the only way routes are added, each with its
//!   [`rules::Access`], and the table the middleware ([`gate`]) and the tests read;
//! - [`api`]: `/v1/login`, `/v1/logout`, `/v1/whoami`, `/v1/users`, `/v1/apitokens`;
//! - [`cli`]: `falaj-control user|login|logout|whoami|apitoken`, and the stored session.
//!
//! Three kinds of caller: a user's session (`user:NAME`), an API token (`token:NAME`),
//! and the bootstrap token in `DATA_DIR/admin.token` (`admin-token`, an admin: break-glass
//! access for the host's root user, audited like the others).

pub mod api;
pub mod cli;
pub mod gate;
pub mod password;
pub mod routes;
pub mod rules;
pub mod store;

use serde::{Deserialize, Serialize};

pub use routes::{Routes, Rule};
pub use rules::{Access, LoginPolicy, Permission, Role, SessionPolicy};

/// The actor name of the bootstrap admin token.
pub const ADMIN_TOKEN_ACTOR: &str = "admin-token";

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The actor name audit entries carry: `user:alice`, `token:ci`, `admin-token`.
    pub actor: String,
    /// The role its requests run with.
    pub role: Role,
    /// The credential it presented.
    pub via: Via,
}

/// The credential a caller presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// `DATA_DIR/admin.token`.
    AdminToken,
    /// A session from `POST /v1/login`.
    Session {
        /// The session's id.
        id: String,
        /// Its user.
        user: String,
    },
    /// An API token.
    ApiToken {
        /// Its name.
        name: String,
    },
}

impl Principal {
    /// The admin token's caller.
    pub fn admin_token() -> Self {
        Self { actor: ADMIN_TOKEN_ACTOR.into(), role: Role::Admin, via: Via::AdminToken }
    }
}

/// How sessions live and when logins lock out (`[admin]` in the configuration).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// Session lifetimes.
    pub sessions: SessionPolicy,
    /// Login lockouts.
    pub logins: LoginPolicy,
}

/// What `GET /v1/whoami` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    /// The actor name.
    pub actor: String,
    pub role: String,
    /// Its permissions.
    pub permissions: Vec<String>,
}
