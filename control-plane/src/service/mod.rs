//! The control plane's services: what it does for an admin, whoever asks. The admin API's
//! handlers ([`crate::admin`] and each area's `api` module) and the console's pages
//! ([`crate::console`]) call the same functions here and only translate: HTTP or a form
//! in, a view type or a [`ServiceError`] out (an HTTP status and JSON body, or a page).
//! The CLI reaches them through the admin API ([`crate::client`]), decoding the same view
//! types.
//!
//! - [`bundles`]: verifying and registering a bundle (a push or a built snapshot).
//! - [`fleet`]: the fleet view, enrollment tokens, revocation, the daemon's status.
//! - [`deploy`]: which version of a model each group runs.
//! - [`resign`]: re-signing stored bundles under the keys in force after a rotation.
//!
//! Services take the daemon's state ([`Shared`](crate::state::Shared)), not a request.

pub mod bundles;
pub mod deploy;
pub mod fleet;
pub mod resign;

use thiserror::Error;

/// Why a service did not do what it was asked: the caller's mistake (each variant says
/// which), or the control plane's own trouble ([`ServiceError::Internal`]).
#[derive(Debug, Error)]
pub enum ServiceError {
    /// The request is not valid (a bad name, a lifetime out of range).
    #[error("{0}")]
    Invalid(String),
    /// What it names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It conflicts with what is there: `code` says how (`conflict`, `rollout_under_way`).
    #[error("{message}")]
    Conflict {
        /// The API's error code.
        code: &'static str,
        /// What conflicts.
        message: String,
    },
    /// A bundle that fails verification (recorded in the audit log).
    #[error("{0}")]
    Refused(String),
    /// The control plane failed (a database or file error); the caller sees only that.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    /// An internal error; the transport that reports it logs it in full and tells the
    /// caller only that it happened.
    pub(crate) fn internal(err: impl std::fmt::Display) -> Self {
        Self::Internal(err.to_string())
    }
}

impl From<crate::db::DbError> for ServiceError {
    fn from(err: crate::db::DbError) -> Self {
        Self::internal(err)
    }
}

/// What a service returns.
pub type ServiceResult<T> = Result<T, ServiceError>;
