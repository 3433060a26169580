//! Agents' audit chains, as they ship them: each agent's entries are stored in order,
//! each checked on arrival against the one before it (sequence number and hash), so the
//! control plane holds an intact copy of every agent's record however often a batch is
//! sent again. A batch that breaks the chain is refused whole and the refusal recorded
//! in the control plane's own log.

use crate::sql::{AsSql, Backend, OptionalExt, Sql, SqlError, params};
use falaj_common::audit::{self, Entry, GENESIS, Outcome};
use falaj_common::time::Timestamp;

use crate::db::ts;

/// Stores `lines` of `agent`'s chain; the last entry now stored, or why the batch was
/// refused (recorded as a refused `agent.audit` entry). On PostgreSQL the agent's row is
/// locked first, so batches of one chain stored at once through several connections
/// (replicas) are appended one after the other.
pub fn store<C: AsSql + ?Sized>(
    conn: &C,
    agent: &str,
    lines: &[String],
    now: Timestamp,
) -> Result<Result<u64, String>, C::Error> {
    let sql = conn.sql();
    let tx = sql.transaction()?;
    if sql.backend() == Backend::Postgres {
        tx.query_row("SELECT id FROM agents WHERE id = $1 FOR UPDATE", params![agent], |_| Ok(()))
            .optional()?;
    }
    let stored = append(&tx, agent, lines, now)?;
    match stored {
        Ok(last) => {
            tx.commit()?;
            Ok(Ok(last))
        }
        Err(reason) => {
            tx.rollback()?;
            let details = serde_json::json!({ "reason": reason });
            super::record(&sql, now, "agent.audit", agent, Outcome::Refused, details)?;
            Ok(Err(reason))
        }
    }
}

fn append(
    sql: &Sql<'_>,
    agent: &str,
    lines: &[String],
    now: Timestamp,
) -> Result<Result<u64, String>, SqlError> {
    let last: Option<(i64, String)> = sql
        .query_row(
            "SELECT seq, hash FROM agent_audit WHERE agent_id = $1 ORDER BY seq DESC LIMIT 1",
            params![agent],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (mut seq, mut head) = match last {
        Some((seq, hash)) => (
            seq as u64,
            hash.parse().map_err(|e: falaj_common::keys::KeyError| SqlError::Conversion {
                column: 1,
                message: e.to_string(),
            })?,
        ),
        None => (0, GENESIS),
    };
    for line in lines {
        let entry: Entry = match serde_json::from_str(line) {
            Ok(entry) => entry,
            Err(e) => return Ok(Err(format!("an entry of agent {agent} does not parse: {e}"))),
        };
        let hash = audit::hash(line);
        if entry.seq <= seq {
            // Sent again: it must be the entry already held.
            let stored_hash: Option<String> = sql
                .query_row(
                    "SELECT hash FROM agent_audit WHERE agent_id = $1 AND seq = $2",
                    params![agent, entry.seq as i64],
                    |r| r.get(0),
                )
                .optional()?;
            if stored_hash.is_some_and(|h| h != hash.to_string()) {
                return Ok(Err(format!(
                    "entry {} of agent {agent} differs from the one stored",
                    entry.seq
                )));
            }
            continue;
        }
        if entry.seq != seq + 1 {
            return Ok(Err(format!(
                "entry {} of agent {agent} follows entry {seq}: entries are missing",
                entry.seq
            )));
        }
        if entry.prev != head {
            return Ok(Err(format!(
                "entry {} of agent {agent} does not chain to entry {seq} (another hash before it)",
                entry.seq
            )));
        }
        sql.execute(
            "INSERT INTO agent_audit (agent_id, seq, line, hash, received_at) VALUES ($1, $2, $3, $4, $5)",
            params![agent, entry.seq as i64, line, hash.to_string(), ts(now)],
        )?;
        (seq, head) = (entry.seq, hash);
    }
    Ok(Ok(seq))
}

/// `agent`'s chain as stored, in order.
pub fn lines<C: AsSql + ?Sized>(conn: &C, agent: &str) -> Result<Vec<String>, C::Error> {
    Ok(conn.sql().query_map(
        "SELECT line FROM agent_audit WHERE agent_id = $1 ORDER BY seq",
        params![agent],
        |r| r.get(0),
    )?)
}

#[cfg(test)]
mod tests {
    use falaj_common::audit::Chain;

    use super::*;
    use crate::db::Db;

    fn chain(n: u64) -> Vec<String> {
        let mut chain = Chain::at(0, GENESIS);
        (0..n)
            .map(|i| {
                let at = Timestamp::from_unix(1_800_000_000 + i);
                chain
                    .append(
                        at,
                        "agent",
                        None,
                        "install",
                        "fault@1",
                        Outcome::Success,
                        serde_json::Value::Null,
                    )
                    .1
            })
            .collect()
    }

    #[test]
    fn chains_arrive_in_order_once_and_breaks_are_refused_and_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("control.db")).unwrap();
        db.call_sync(|c| crate::db::tests::add_agent(c, "agent-1")).unwrap();
        let now = Timestamp::from_unix(1_800_000_100);
        let lines = chain(6);
        let put = |batch: &[String]| db.call_sync(|c| store(c, "agent-1", batch, now)).unwrap();
        assert_eq!(put(&lines[..3]), Ok(3));
        assert_eq!(put(&lines[1..5]), Ok(5), "a batch sent again overlaps");
        assert_eq!(put(&lines[..1]), Ok(5));
        let err = put(&lines[5..6].iter().map(|l| l.replace("fault", "fauLt")).collect::<Vec<_>>());
        assert_eq!(err, Ok(6), "the last entry's content is only checked by its successor");
        let other = chain(8);
        let mut forked = other[6..8].to_vec();
        forked[0] = forked[0].replace("install", "remove");
        let refused = put(&forked).unwrap_err();
        assert!(
            refused.contains("entry 7 of agent agent-1 does not chain to entry 6"),
            "{refused}"
        );
        assert!(put(&lines[..2].iter().rev().cloned().collect::<Vec<_>>()).is_ok());
        let gap = put(&chain(9)[8..]).unwrap_err();
        assert!(gap.contains("entries are missing"), "{gap}");
        let stored = db.call_sync(|c| super::lines(c, "agent-1")).unwrap();
        assert_eq!(stored.len(), 6);
        let refusals: i64 = db
            .call_sync(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM audit WHERE action = 'agent.audit' AND outcome = 'refused'",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(refusals, 2);
    }
}
