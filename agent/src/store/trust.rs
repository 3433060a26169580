//! Trust-root rotation on the agent: successors of the pinned root, verified in order
//! against the version held (TUF's rules, [`TrustRoot::follow`]) and kept, every
//! version, in one transaction with its audit event, before anything is verified under
//! them. They come from the control plane with the session, or from files on air-gapped
//! sites (`falaj-agent trust update`).

use std::time::SystemTime;

use falaj_common::time::Timestamp;
use falaj_common::trust::{TrustError, TrustRoot};
use rusqlite::{OptionalExtension, params};

use super::{Result, Store, audit};

impl Store {
    /// Takes the trust roots in `offered` (any order) that follow the one pinned: each
    /// must be the next version of the one before, signed by a threshold of its root keys
    /// and of its own, for this region; the newest must not have expired at `now`.
    /// Versions already held are skipped when they are the same document, and refused
    /// otherwise. Nothing is kept unless the whole chain holds. Returns the versions
    /// taken, oldest first.
    pub fn update_trust<B: AsRef<[u8]>>(
        &mut self,
        offered: &[B],
        now: SystemTime,
    ) -> Result<Vec<u64>> {
        let pinned = self.trust_root()?;
        let mut roots = offered
            .iter()
            .map(|bytes| TrustRoot::from_json_unexpired(bytes.as_ref()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        roots.sort_by_key(TrustRoot::version);
        let mut newer = Vec::new();
        for root in roots {
            if root.version() > pinned.version() {
                newer.push(root.to_json());
            } else if self.trust_document(root.version())?.as_deref() != Some(&root.to_json()) {
                return Err(TrustError::NotSuccessor {
                    current: pinned.version(),
                    got: root.version(),
                }
                .into());
            }
        }
        let taken = pinned.follow(&newer, now)?;
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let at = Timestamp::from_system(now).unix() as i64;
        // A concurrent update of the same version fails on the primary key: nothing kept.
        self.write_tx(|tx| {
            for root in &taken {
                tx.execute(
                    "INSERT INTO trust_roots (version, document, installed_at) VALUES (?1, ?2, ?3)",
                    params![root.version() as i64, root.to_json(), at],
                )?;
                let detail =
                    format!("trust root version {} (expires {})", root.version(), root.expires());
                audit::event(tx, at, "trust-update", None, &detail)?;
            }
            Ok(())
        })?;
        Ok(taken.iter().map(TrustRoot::version).collect())
    }

    /// The version of the pinned trust root, read without parsing or verifying it (what
    /// the agent reports with every heartbeat).
    pub fn trust_version(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT MAX(version) FROM trust_roots", [], |r| r.get::<_, Option<i64>>(0))
            .map(|v| v.unwrap_or(0) as u64)
            .map_err(self.db())
    }

    /// The document of trust-root version `version`, if held.
    fn trust_document(&self, version: u64) -> Result<Option<Vec<u8>>> {
        self.conn
            .query_row(
                "SELECT document FROM trust_roots WHERE version = ?1",
                [version as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.db())
    }
}
