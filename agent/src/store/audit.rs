//! The agent's own audit log: every local security event the store records (the trust
//! root installed, enrollment, each install, activation and removal, a derived model,
//! a rollback) is appended to a hash chain ([`falaj_common::audit`]) in the same
//! transaction as the change, as the `events` row is. The agent's audit key
//! (`audit.key` in the data directory, made on first use; its public half `audit.pub`)
//! signs a checkpoint of the head at each export, so `falaj-agent audit verify` checks an
//! export offline as the control plane's is checked.

use falaj_common::audit::{Chain, Checkpoint, GENESIS, Outcome};
use falaj_common::keys::SigningKey;
use falaj_common::time::Timestamp;
use rusqlite::{Connection, OptionalExtension, params};

use super::{Result, Store, StoreError};

/// The agent's audit key file in the data directory (PKCS#8, 0600).
pub const KEY_FILE: &str = "audit.key";
/// Its public half (hex), for whoever verifies the agent's exports.
pub const PUBLIC_FILE: &str = "audit.pub";

/// Records an event: its `events` row and its audit entry, in the caller's transaction.
pub(crate) fn event(
    conn: &Connection,
    at: i64,
    kind: &str,
    model: Option<(&str, u64)>,
    detail: &str,
) -> rusqlite::Result<()> {
    let (name, version) = model.map_or((None, None), |(n, v)| (Some(n), Some(v as i64)));
    conn.execute(
        "INSERT INTO events (at, kind, name, version, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![at, kind, name, version, detail],
    )?;
    let target = model.map_or_else(String::new, |(n, v)| format!("{n}@{v}"));
    let mut chain = head(conn)?;
    let details = serde_json::json!({ "detail": detail });
    let (entry, line) = chain.append(
        Timestamp::from_unix(at as u64),
        "agent",
        None,
        kind,
        &target,
        Outcome::Success,
        details,
    );
    conn.execute(
        "INSERT INTO audit (seq, at, action, line, hash) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![entry.seq as i64, at, kind, line, chain.head.to_string()],
    )
    .map(drop)
}

fn head(conn: &Connection) -> rusqlite::Result<Chain> {
    let last: Option<(i64, String)> = conn
        .query_row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    Ok(match last {
        None => Chain::at(0, GENESIS),
        Some((seq, hash)) => Chain::at(
            seq as u64,
            hash.parse().map_err(|e: falaj_common::keys::KeyError| {
                rusqlite::Error::FromSqlConversionFailure(
                    4,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?,
        ),
    })
}

/// The `settings` key of the last entry the control plane acknowledged.
const SHIPPED: &str = "audit_shipped";

impl Store {
    /// Entries after the last one the control plane acknowledged, oldest first, at most
    /// `limit`: (sequence number, line).
    pub fn audit_unshipped(&self, limit: usize) -> Result<Vec<(u64, String)>> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT seq, line FROM audit
                 WHERE seq > COALESCE((SELECT CAST(value AS INTEGER) FROM settings WHERE key = ?1), 0)
                 ORDER BY seq LIMIT ?2",
            )
            .map_err(self.db())?;
        let rows = stmt
            .query_map(params![SHIPPED, limit as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?))
            })
            .map_err(self.db())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.db())
    }

    /// The control plane stored the chain up to `seq`.
    pub fn audit_shipped(&mut self, seq: u64) -> Result<()> {
        self.write_tx(|tx| {
            tx.execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value
                 WHERE CAST(settings.value AS INTEGER) < CAST(excluded.value AS INTEGER)",
                params![SHIPPED, seq.to_string()],
            )
            .map(drop)
        })
    }

    /// The agent's audit key, made (with its public file) on first use.
    pub fn audit_key(&self) -> Result<SigningKey> {
        let path = self.dir.join(KEY_FILE);
        let io = |op: &'static str| {
            let path = path.clone();
            move |source| StoreError::Io { op, path, source }
        };
        let key = match std::fs::read(&path) {
            Ok(pkcs8) => SigningKey::from_pkcs8(&pkcs8)
                .map_err(|e| StoreError::Refused(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (key, pkcs8) = SigningKey::generate(&ring::rand::SystemRandom::new())
                    .map_err(|e| StoreError::Refused(format!("making the audit key: {e}")))?;
                falaj_shell::fs::write_atomic(&path, &pkcs8, 0o600).map_err(io("writing"))?;
                key
            }
            Err(e) => return Err(io("reading")(e)),
        };
        let public = self.dir.join(PUBLIC_FILE);
        let text = format!("{}\n", key.public());
        if std::fs::read_to_string(&public).ok().as_deref() != Some(text.as_str()) {
            falaj_shell::fs::write_atomic(&public, text.as_bytes(), 0o644)
                .map_err(|source| StoreError::Io { op: "writing", path: public.clone(), source })?;
        }
        Ok(key)
    }

    /// The audit log's lines, after a checkpoint of the head signed with `key` at `now`
    /// (when the head moved since the last one).
    pub fn audit_export(&mut self, key: &SigningKey, now: Timestamp) -> Result<Vec<String>> {
        self.write_tx(|tx| {
            let chain = head(tx)?;
            let last: Option<i64> =
                tx.query_row("SELECT MAX(seq) FROM audit_checkpoints", [], |r| r.get(0))?;
            if chain.seq > 0 && last.is_none_or(|l| (l as u64) < chain.seq) {
                let signed = Checkpoint::sign(chain.seq, chain.head, now, key);
                tx.execute(
                    "INSERT INTO audit_checkpoints (seq, line) VALUES (?1, ?2)",
                    params![signed.seq as i64, signed.line()],
                )?;
            }
            let read = |sql: &str| -> rusqlite::Result<Vec<(u64, String)>> {
                let mut stmt = tx.prepare(sql)?;
                let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))?;
                rows.collect()
            };
            let checkpoints = read("SELECT seq, line FROM audit_checkpoints")?;
            let entries = read("SELECT seq, line FROM audit ORDER BY seq")?;
            Ok(falaj_common::audit::assemble(entries, checkpoints))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::store::tests::store;

    #[test]
    fn the_stores_events_form_a_chain_that_exports_and_verifies() {
        let (_dir, mut store) = store();
        let identity = crate::store::Identity {
            agent_id: "agent-1".into(),
            group: "edge".into(),
            control_plane: "127.0.0.1:7443".into(),
        };
        store.set_identity(&identity, SystemTime::now()).unwrap();
        store.record_event(SystemTime::now(), "trust", "root version 2").unwrap();
        let key = store.audit_key().unwrap();
        assert_eq!(store.audit_key().unwrap().public(), key.public(), "made once");
        let lines = store.audit_export(&key, Timestamp::from_unix(1_800_000_000)).unwrap();
        // init, enroll, trust, then the checkpoint.
        assert_eq!(lines.len(), 4, "{lines:#?}");
        let verified =
            falaj_common::audit::verify(lines.iter().map(String::as_str), &[key.public()]).unwrap();
        assert_eq!(verified.entries, 3);
        assert!(lines[1].contains("\"action\":\"enroll\""), "{}", lines[1]);
        let public = std::fs::read_to_string(store.dir().join(PUBLIC_FILE)).unwrap();
        assert_eq!(public.trim(), key.public().to_string());
        // Shipping: what the control plane has not acknowledged, in order.
        assert_eq!(
            store.audit_unshipped(2).unwrap().iter().map(|e| e.0).collect::<Vec<_>>(),
            [1, 2]
        );
        store.audit_shipped(2).unwrap();
        store.audit_shipped(1).unwrap();
        assert_eq!(store.audit_unshipped(10).unwrap().iter().map(|e| e.0).collect::<Vec<_>>(), [3]);
    }
}
