//! The control plane's PostgreSQL advisory lock keys, in one place so that no two share
//! one. The fixed keys are `"Falaj"` (`0x46616c616a`) followed by a number; a lock per
//! feature view ([`feature_view`]) or per user or address logging in ([`logins`]) takes the
//! first 8 bytes of a SHA-256 of what it guards and its name. Each lock's user says why it
//! holds it.

use falaj_common::keys::Sha256;

/// Migrations of the control schema (`sql::postgres::migrate`): replicas starting together
/// migrate once.
pub const MIGRATIONS: i64 = 0x4661_6c61_6a00_0001;
/// Appends to the audit chain (`audit`), one at a time across connections.
pub const AUDIT_CHAIN: i64 = 0x4661_6c61_6a00_0002;
/// The region's lease (`lease`; 0x4c for "L"), a session-level lock: one database serves
/// one region, so one key serves every replica of it.
pub const LEASE: i64 = 0x4661_6c61_6a00_004c;
/// Migrations of the feature schema (`features::store`), whose history is apart from the
/// control schema's.
pub const FEATURE_SCHEMA: i64 = 0x4661_6c61_6a00_0101;
/// New PII key versions (`features::pii_keys`), one at a time.
pub const PII_KEY_VERSIONS: i64 = 0x4661_6c61_6a00_0102;
/// Starts of rollouts and changes of the deployments a rollout freezes (`rollouts`).
pub const ROLLOUTS: i64 = 0x4661_6c61_6a00_0201;
/// Registering a bundle (`service::bundles`).
pub const BUNDLE_REGISTER: i64 = 0x4661_6c61_6a00_0202;

/// Every fixed key, for the test that they differ.
#[cfg(test)]
const FIXED: [i64; 7] =
    [MIGRATIONS, AUDIT_CHAIN, LEASE, FEATURE_SCHEMA, PII_KEY_VERSIONS, ROLLOUTS, BUNDLE_REGISTER];

/// The key of feature view `name`'s lock of kind `what` (`view`: its rows, `snapshot`: its
/// snapshot versions): the first 8 bytes of a SHA-256 of both.
pub fn feature_view(what: &str, name: &str) -> i64 {
    let digest = Sha256::of(format!("falaj.features.{what}\0{name}").as_bytes());
    i64::from_be_bytes(digest.0[..8].try_into().expect("8 of 32 bytes"))
}

/// The key of the lock on the logins of one user (`scope` `user`) or from one address
/// (`address`).
pub fn logins(scope: &str, name: &str) -> i64 {
    let digest = Sha256::of(format!("falaj login {scope} {name}").as_bytes());
    i64::from_be_bytes(digest.0[..8].try_into().expect("8 of 32 bytes"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn no_two_locks_share_a_key() {
        let fixed: BTreeSet<i64> = FIXED.into_iter().collect();
        assert_eq!(fixed.len(), FIXED.len(), "{FIXED:x?}");
        let views: Vec<i64> = ["pump-sensors", "fraud", "a"]
            .into_iter()
            .flat_map(|v| {
                let (view, snapshot) = (feature_view("view", v), feature_view("snapshot", v));
                [view, snapshot, logins("user", v), logins("address", v)]
            })
            .collect();
        let all: BTreeSet<i64> = fixed.iter().copied().chain(views.iter().copied()).collect();
        assert_eq!(all.len(), FIXED.len() + views.len(), "{views:x?}");
    }
}
