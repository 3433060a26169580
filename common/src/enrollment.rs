//! One-time enrollment tokens.
//!
//! A token binds a region and a group and carries the SHA-256 of the control plane's CA
//! certificate, as `kubeadm join` carries `--discovery-token-ca-cert-hash`: on first contact
//! the agent accepts only a control plane whose certificate chains to that CA, so nothing
//! is trusted on first use. The control plane stores only the secret's hash and marks the
//! token used when an agent enrolls with it.
//!
//! Text form: `falaj-enroll-v1.` followed by the URL-safe base64 of the token's encoding.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::keys::Sha256;
use crate::time::Timestamp;

const PREFIX: &str = "falaj-enroll-v1.";

/// An enrollment token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    /// Public identifier, the key the control plane looks it up by.
    pub id: [u8; 16],
    /// The secret; the control plane keeps only its hash.
    pub secret: [u8; 32],
    /// The region the agent will belong to.
    pub region: String,
    /// The group the agent will join.
    pub group: String,
    /// SHA-256 of the control plane's CA certificate (DER).
    pub ca_sha256: Sha256,
    /// After this the token is refused.
    pub expires: Timestamp,
}

impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollmentToken")
            .field("id", &self.id_hex())
            .field("region", &self.region)
            .field("group", &self.group)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

/// Why a token's text was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenError {
    /// The text does not start with the token prefix.
    #[error("not a Falaj enrollment token (it should start with {PREFIX:?})")]
    Prefix,
    /// The rest does not decode.
    #[error("enrollment token is damaged: {0}")]
    Malformed(String),
}

impl EnrollmentToken {
    /// The id as hex, for display and lookup.
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }

    /// The secret's hash, as the control plane stores it.
    pub fn secret_sha256(&self) -> Sha256 {
        Sha256::of(&self.secret)
    }
}

impl fmt::Display for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes = postcard::to_stdvec(self).map_err(|_| fmt::Error)?;
        write!(f, "{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }
}

impl FromStr for EnrollmentToken {
    type Err = TokenError;
    fn from_str(text: &str) -> Result<Self, TokenError> {
        let body = text.trim().strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let bytes =
            URL_SAFE_NO_PAD.decode(body).map_err(|e| TokenError::Malformed(e.to_string()))?;
        postcard::from_bytes(&bytes).map_err(|e| TokenError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> EnrollmentToken {
        EnrollmentToken {
            id: [7; 16],
            secret: [9; 32],
            region: "eu-west-1".into(),
            group: "edge".into(),
            ca_sha256: Sha256([3; 32]),
            expires: Timestamp::from_unix(1_800_000_000),
        }
    }

    #[test]
    fn round_trips_through_text_without_showing_the_secret_in_debug() {
        let text = token().to_string();
        assert!(text.starts_with(PREFIX));
        assert_eq!(text.parse::<EnrollmentToken>().unwrap(), token());
        assert!(!format!("{:?}", token()).contains("secret"));
    }

    #[test]
    fn damaged_text_is_refused() {
        assert_eq!("hello".parse::<EnrollmentToken>().unwrap_err(), TokenError::Prefix);
        let mut text = token().to_string();
        text.truncate(text.len() - 10);
        assert!(matches!(text.parse::<EnrollmentToken>(), Err(TokenError::Malformed(_))));
    }
}
