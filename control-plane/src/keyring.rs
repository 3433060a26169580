//! The keys a running control plane signs and verifies with: the trust root, the chain of
//! its versions that agents are sent, and the signing keys. Read from the keys directory
//! at start, and again on SIGHUP after a rotation (`keys rotate-root`, `rotate-signing`),
//! when a newer root is taken only if every version from the one in force to it follows
//! the one before (TUF's rule, [`TrustRoot::follow`]).

use std::time::SystemTime;

use falaj_common::keys::{Context, SignatureEntry, SigningKey};
use falaj_common::trust::{TrustError, TrustRoot};

use crate::keys::{self, KeysError};
use crate::vault::Vault;

/// The trust root in force, its chain and the signing keys it lists.
#[derive(Debug)]
pub struct Keyring {
    /// The newest trust root: given to enrolling agents, checks bundles pushed here.
    pub trust: TrustRoot,
    /// Every version of the trust root after the first, oldest first, as JSON: sent to
    /// each agent as its session starts (and to every connected agent when a newer root
    /// is taken), so agents enrolled under an older version follow.
    pub chain: Vec<String>,
    /// Keys that sign desired-state documents and snapshot bundles.
    pub signers: Vec<SigningKey>,
}

impl Keyring {
    /// The keys of the vault's directory: its `root.json` (unexpired at `now`), the
    /// versions kept beside it and enough signing keys to meet the root's threshold.
    pub fn load(vault: &Vault, now: SystemTime) -> Result<Self, KeysError> {
        let trust = keys::load_trust(vault.dir(), now)?;
        let signers = keys::load_signing_keys(vault, &trust)?;
        let chain = keys::chain_after(vault.dir(), 1)?;
        Ok(Self { trust, chain, signers })
    }

    /// The keys of the vault's directory if its trust root is newer than this one and
    /// follows it (every version in between present and verified in order, the newest
    /// unexpired at `now`); `None` when the directory still holds this root. A root that
    /// goes back, or one of the same version that differs, is refused.
    pub fn successor(&self, vault: &Vault, now: SystemTime) -> Result<Option<Self>, KeysError> {
        let trust = keys::load_trust(vault.dir(), now)?;
        let (held, offered) = (self.trust.version(), trust.version());
        let refused = |source: TrustError| KeysError::Trust {
            path: vault.dir().join(keys::ROOT_FILE),
            source,
        };
        let not_next = || refused(TrustError::NotSuccessor { current: held, got: offered });
        if offered == held {
            return if trust.to_json() == self.trust.to_json() {
                Ok(None)
            } else {
                Err(not_next())
            };
        }
        if offered < held {
            return Err(not_next());
        }
        let between: Vec<Vec<u8>> = keys::versions(vault.dir())?
            .into_iter()
            .filter(|root| root.version() > held)
            .map(|root| root.to_json())
            .collect();
        let followed = self.trust.follow(&between, now).map_err(refused)?;
        if followed.last().map(TrustRoot::to_json) != Some(trust.to_json()) {
            return Err(not_next());
        }
        let signers = keys::load_signing_keys(vault, &trust)?;
        let chain = keys::chain_after(vault.dir(), 1)?;
        Ok(Some(Self { trust, chain, signers }))
    }

    /// Whether `signatures` over a desired-state `document` meet this root's signing
    /// role: a document signed before a signing-key rotation no longer does.
    pub fn signed_now(&self, document: &[u8], signatures: &[SignatureEntry]) -> bool {
        self.trust.check_signing(Context::DesiredState, document, signatures).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{InitOptions, RotateOptions, init, rotate};
    use falaj_common::time::Timestamp;

    fn now() -> SystemTime {
        Timestamp::from_unix(1_800_000_000).to_system()
    }

    fn refused(err: &KeysError) -> String {
        assert!(matches!(err, KeysError::Trust { .. }), "{err}");
        err.to_string()
    }

    #[test]
    fn a_running_keyring_takes_only_roots_that_follow_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        init(&dir, &InitOptions::new("eu-west-1"), now()).unwrap();
        let vault = Vault::open(&dir, None).unwrap();
        let held = Keyring::load(&vault, now()).unwrap();
        assert!(held.successor(&vault, now()).unwrap().is_none(), "nothing rotated");

        // Two rotations at once (new root keys, then new signing keys): both followed.
        let new_root = RotateOptions { root_keys: Some(2), ..RotateOptions::default() };
        rotate(&dir, &new_root, None, now()).unwrap();
        let new_signer = RotateOptions { signing_keys: Some(1), ..RotateOptions::default() };
        rotate(&dir, &new_signer, None, now()).unwrap();
        let next = held.successor(&vault, now()).unwrap().expect("version 3 is taken");
        assert_eq!(next.trust.version(), 3);
        assert_eq!(next.chain.len(), 2, "versions 2 and 3 for agents");
        let old_signer: Vec<_> = held.signers.iter().map(|k| k.public().id()).collect();
        assert!(next.signers.iter().all(|k| !old_signer.contains(&k.public().id())));
        let document = b"a document";
        let signature = SignatureEntry::sign(&held.signers[0], Context::DesiredState, document);
        assert!(held.signed_now(document, std::slice::from_ref(&signature)));
        assert!(!next.signed_now(document, &[signature]), "signed by a retired key");

        // A root from another keys directory (same region, same version) is refused, as
        // is a root that goes back; the keys in force are what the caller keeps.
        let other = tmp.path().join("other");
        init(&other, &InitOptions::new("eu-west-1"), now()).unwrap();
        rotate(&other, &new_root, None, now()).unwrap();
        rotate(&other, &new_root, None, now()).unwrap();
        std::fs::copy(other.join(keys::ROOT_FILE), dir.join(keys::ROOT_FILE)).unwrap();
        std::fs::copy(other.join("root.3.json"), dir.join("root.3.json")).unwrap();
        let err = refused(&next.successor(&vault, now()).unwrap_err());
        assert!(err.contains("cannot follow version 3"), "{err}");
        let err = refused(&held.successor(&vault, now()).unwrap_err());
        assert!(err.contains("signed") || err.contains("threshold"), "{err}");
        std::fs::copy(dir.join("root.1.json"), dir.join(keys::ROOT_FILE)).unwrap();
        let err = refused(&next.successor(&vault, now()).unwrap_err());
        assert!(err.contains("cannot follow version 3"), "{err}");
    }
}
