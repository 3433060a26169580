//! Metric windows on the control plane: stored once per (agent, sequence) whatever the
//! agent resends, queried as rollups per version by model, version, group, agent and time
//! range, and summarised with drift against each bundle's reference profile.
//!
//! Like [`crate::db`], every function takes a connection (`C: AsSql`, either database)
//! and runs one statement or one transaction; the daemon calls them through
//! [`crate::db::Db::run`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use falaj_common::exposition::VersionFigures;
use falaj_common::metrics::{MetricsWindow, Rollup, VersionSummary};
use falaj_common::profile::DataProfile;
use falaj_common::protocol::SequencedWindow;
use falaj_common::time::Timestamp;
use serde::{Deserialize, Serialize};

use crate::db::{from_ts, ts};
use crate::sql::{Array, AsSql, Backend, OptionalExt, Sql, SqlError, params};

/// Ingest figures since start, for `/metrics`.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Windows stored.
    pub stored: AtomicU64,
    /// Windows received again and skipped.
    pub duplicates: AtomicU64,
    /// Windows refused as implausible.
    pub rejected: AtomicU64,
    /// Windows agents reported dropping from full outboxes.
    pub dropped: AtomicU64,
    /// Bytes of chunks and recipes sent to agents.
    pub transfer_bytes: AtomicU64,
    /// Fleet-wide figures per model version, from the windows stored.
    versions: Mutex<BTreeMap<(String, u64), VersionFigures>>,
    /// Fault injection for tests of the delivery guarantee: while above zero, each
    /// committed batch closes the connection instead of being acknowledged.
    pub close_before_ack: AtomicU32,
}

impl IngestStats {
    /// Counts what a batch did.
    pub fn record(&self, batch: &[SequencedWindow], ingested: &Ingested) {
        self.stored.fetch_add(ingested.stored.len() as u64, Ordering::Relaxed);
        self.duplicates.fetch_add(ingested.duplicates, Ordering::Relaxed);
        self.rejected.fetch_add(ingested.rejected, Ordering::Relaxed);
        let mut versions = self.versions.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for w in ingested.stored.iter().filter_map(|&i| batch.get(i)).map(|s| &s.window) {
            self.dropped.fetch_add(w.counts.dropped_windows, Ordering::Relaxed);
            let f =
                versions.entry((w.model.clone(), w.version)).or_insert_with(|| VersionFigures {
                    model: w.model.clone(),
                    version: w.version,
                    ..VersionFigures::default()
                });
            f.requests += w.counts.requests;
            f.errors += w.counts.errors;
            f.latency.merge(&w.counts.latency);
            f.latency_sum_seconds = f.latency.approximate_sum() / 1e6;
        }
    }

    /// Fleet-wide figures per model version since start.
    pub fn versions(&self) -> Vec<VersionFigures> {
        self.versions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }
}

/// What one batch did to the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Indices (into the batch) of windows stored now.
    pub stored: Vec<usize>,
    /// Windows stored before (a resend after a lost acknowledgement).
    pub duplicates: u64,
    /// Windows refused as implausible (acknowledged all the same, so never resent).
    pub rejected: u64,
}

/// How far past the control plane's clock a window may end. Agents' clocks drift; a
/// window dated further ahead would never be pruned and would count in every query.
pub const MAX_CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

/// Most windows stored for one agent, model and version whose starts fall in one hour (an
/// agent closing a window every second sends this many): what an agent reports cannot
/// grow the store faster than that, whatever it sends.
pub const MAX_WINDOWS_PER_HOUR: u64 = 3600;

/// The model versions an agent reported holding during its session, as (name, version):
/// windows for any other are refused, so an agent cannot report traffic, and fake drift,
/// for a model it does not serve.
pub type Held = BTreeSet<(String, u64)>;

/// Stores a batch from `agent`, which reported holding `held`, in one transaction.
/// Windows already stored are skipped; windows that fail their check, concern a version
/// not in `held`, end more than [`MAX_CLOCK_SKEW`] ahead of `now`, or exceed
/// [`MAX_WINDOWS_PER_HOUR`] are refused (counted, and acknowledged all the same).
///
/// On PostgreSQL a window another replica stored meanwhile (the agent reconnected there
/// and resent it) is skipped by the insert itself (`ON CONFLICT DO NOTHING`) and counted
/// as a duplicate.
pub fn insert_windows<C: AsSql + ?Sized>(
    conn: &C,
    agent: &str,
    held: &Held,
    batch: &[SequencedWindow],
    now: Timestamp,
) -> Result<Ingested, C::Error> {
    let one = Batch { agent, held, windows: batch };
    let mut ingested = store(conn.sql(), &[one], now)?;
    Ok(ingested.pop().unwrap_or_default())
}

/// One agent's batch of windows, as [`insert_deliveries`] takes them.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The agent that sent it.
    pub agent: String,
    /// The versions it reported holding in its session.
    pub held: Held,
    /// The windows.
    pub windows: Vec<SequencedWindow>,
}

/// Stores the batches of several agents in one transaction, each answered as
/// [`insert_windows`] would answer it alone, the batches taken in order: one commit, and
/// one sync to disk, for all of them.
pub fn insert_deliveries<C: AsSql + ?Sized>(
    conn: &C,
    deliveries: &[Delivery],
    now: Timestamp,
) -> Result<Vec<Ingested>, C::Error> {
    let batches: Vec<Batch<'_>> = deliveries
        .iter()
        .map(|d| Batch { agent: &d.agent, held: &d.held, windows: &d.windows })
        .collect();
    Ok(store(conn.sql(), &batches, now)?)
}

/// One agent's windows, borrowed.
struct Batch<'a> {
    agent: &'a str,
    held: &'a Held,
    windows: &'a [SequencedWindow],
}

/// Stores `batches` in one transaction. On SQLite each window is its own statements (a
/// function call each), in a transaction that takes the write lock first. On PostgreSQL,
/// where each statement is a round trip, the whole group is two ([`store_group`]), and
/// the caller's transaction (every [`crate::db::Db::run`] is one) is enough: only the
/// last of them writes.
fn store(sql: Sql<'_>, batches: &[Batch<'_>], now: Timestamp) -> Result<Vec<Ingested>, SqlError> {
    match sql.backend() {
        Backend::Sqlite => {
            let tx = sql.transaction_immediate()?;
            let ingested =
                batches.iter().map(|b| store_batch(&tx, b, now)).collect::<Result<_, _>>()?;
            tx.commit()?;
            Ok(ingested)
        }
        Backend::Postgres => store_group(&sql, batches, now),
    }
}

/// One batch within the caller's transaction, a window at a time.
fn store_batch(tx: &Sql<'_>, batch: &Batch<'_>, now: Timestamp) -> Result<Ingested, SqlError> {
    let agent = batch.agent;
    let mut ingested = Ingested::default();
    for (i, SequencedWindow { seq, window: w }) in batch.windows.iter().enumerate() {
        let stored = tx
            .query_row(
                "SELECT seq FROM windows WHERE agent_id = $1 AND seq = $2",
                params![agent, *seq as i64],
                |_| Ok(()),
            )
            .optional()?;
        if stored.is_some() {
            ingested.duplicates += 1;
            continue;
        }
        let mut refusal = refusal(w, batch.held, now);
        if refusal.is_none() {
            let (from, to) = hour_of(w);
            let count: i64 = tx.query_row(
                "SELECT COUNT(*) FROM windows
                 WHERE agent_id = $1 AND model = $2 AND version = $3 AND start >= $4 AND start < $5",
                params![agent, w.model, w.version as i64, from, to],
                |r| r.get(0),
            )?;
            if u64::try_from(count).unwrap_or(0) >= MAX_WINDOWS_PER_HOUR {
                refusal = Some(over_the_hour());
            }
        }
        if let Some(reason) = refusal {
            refused(agent, *seq, w, &reason);
            ingested.rejected += 1;
            continue;
        }
        let inserted = tx.execute(
            r#"INSERT INTO windows
                 (agent_id, seq, model, version, start, seconds, requests, errors, "window", received_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (agent_id, seq) DO NOTHING"#,
            params![
                agent,
                *seq as i64,
                w.model,
                w.version as i64,
                ts(w.start),
                i64::from(w.seconds),
                w.counts.requests as i64,
                w.counts.errors as i64,
                encode(w)?,
                ts(now),
            ],
        )?;
        if inserted == 0 {
            ingested.duplicates += 1;
        } else {
            ingested.stored.push(i);
        }
    }
    Ok(ingested)
}

/// Several batches within the caller's transaction on PostgreSQL, in two statements
/// whatever their number of windows: one read of which windows are stored already and of
/// how many windows each (agent, model, version, hour) they fall in holds
/// ([`Stored::read`]), and one insert of those kept, which returns the ones it stored.
/// The answers are those of [`store_batch`] run batch after batch: a window seen earlier
/// in the group is a duplicate, and the hourly counts run on through the group.
fn store_group(
    tx: &Sql<'_>,
    batches: &[Batch<'_>],
    now: Timestamp,
) -> Result<Vec<Ingested>, SqlError> {
    let windows: Vec<(usize, usize, &Batch<'_>, &SequencedWindow)> = batches
        .iter()
        .enumerate()
        .flat_map(|(b, batch)| batch.windows.iter().enumerate().map(move |(i, w)| (b, i, batch, w)))
        .collect();
    // Each window's refusal, if any, and the hour of each one not refused.
    let mut hours: HashMap<(&str, &str, u64, i64), usize> = HashMap::new();
    let checked: Vec<Result<usize, String>> = windows
        .iter()
        .map(|&(_, _, batch, SequencedWindow { window: w, .. })| {
            refusal(w, batch.held, now).map_or_else(
                || {
                    let next = hours.len();
                    Ok(*hours
                        .entry((batch.agent, &w.model, w.version, hour_of(w).0))
                        .or_insert(next))
                },
                Err,
            )
        })
        .collect();
    let mut stored = Stored::read(tx, &windows, hours)?;

    let mut out = vec![Ingested::default(); batches.len()];
    let mut seen = HashSet::new();
    let mut rows = Rows::default();
    let mut kept = Vec::new();
    for (n, (&(b, i, batch, SequencedWindow { seq, window: w }), checked)) in
        windows.iter().zip(checked).enumerate()
    {
        if stored.windows.contains(&n) || !seen.insert((batch.agent, *seq)) {
            out[b].duplicates += 1;
            continue;
        }
        let refusal = checked.and_then(|hour| match stored.hours.get_mut(hour) {
            Some(count) if *count < MAX_WINDOWS_PER_HOUR => {
                *count += 1;
                Ok(())
            }
            _ => Err(over_the_hour()),
        });
        if let Err(reason) = refusal {
            // Sent again later in the group, it is refused again, not a duplicate.
            seen.remove(&(batch.agent, *seq));
            refused(batch.agent, *seq, w, &reason);
            out[b].rejected += 1;
            continue;
        }
        rows.push(batch.agent, *seq, w)?;
        kept.push((batch.agent, *seq as i64, b, i));
    }
    if !kept.is_empty() {
        let inserted = rows.insert(tx, now)?;
        for (agent, seq, b, i) in kept {
            if inserted.contains(&(agent.to_owned(), seq)) {
                out[b].stored.push(i);
            } else {
                // Stored by another replica since the read (the agent resent it there).
                out[b].duplicates += 1;
            }
        }
    }
    Ok(out)
}

/// What the store holds already for a group of windows.
struct Stored {
    /// The indices of the windows stored already.
    windows: HashSet<usize>,
    /// The windows stored in each hour, by the hour's index.
    hours: Vec<u64>,
}

impl Stored {
    /// Reads, in one statement, which of `windows` are stored already and how many
    /// windows each of `hours` (agent, model, version and the hour's start, each with its
    /// index) holds.
    fn read(
        tx: &Sql<'_>,
        windows: &[(usize, usize, &Batch<'_>, &SequencedWindow)],
        hours: HashMap<(&str, &str, u64, i64), usize>,
    ) -> Result<Self, SqlError> {
        let mut keys: Vec<_> = hours.into_iter().collect();
        keys.sort_unstable_by_key(|&(_, i)| i);
        let mut stored = Self { windows: HashSet::new(), hours: vec![0; keys.len()] };
        let rows: Vec<(bool, i64, i64)> = tx.query_map(
            "SELECT TRUE, k.i, 0 FROM unnest($1::TEXT[], $2::BIGINT[]) WITH ORDINALITY
               AS k(agent, seq, i)
             WHERE EXISTS (SELECT 1 FROM windows w WHERE w.agent_id = k.agent AND w.seq = k.seq)
             UNION ALL
             SELECT FALSE, h.i, (SELECT COUNT(*) FROM windows w
                 WHERE w.agent_id = h.agent AND w.model = h.model AND w.version = h.version
                   AND w.start >= h.hour AND w.start < h.hour + 3600)
             FROM unnest($3::TEXT[], $4::TEXT[], $5::BIGINT[], $6::BIGINT[]) WITH ORDINALITY
               AS h(agent, model, version, hour, i)",
            params![
                Array(windows.iter().map(|(.., batch, _)| batch.agent).collect()),
                Array(windows.iter().map(|(.., w)| w.seq as i64).collect()),
                Array(keys.iter().map(|((agent, ..), _)| *agent).collect()),
                Array(keys.iter().map(|((_, model, ..), _)| *model).collect()),
                Array(keys.iter().map(|((.., version, _), _)| *version as i64).collect()),
                Array(keys.iter().map(|((.., hour), _)| *hour).collect())
            ],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        for (window, i, count) in rows {
            // Ordinalities count from 1.
            let i = usize::try_from(i - 1).unwrap_or(usize::MAX);
            if window {
                stored.windows.insert(i);
            } else if let Some(slot) = stored.hours.get_mut(i) {
                *slot = u64::try_from(count).unwrap_or(0);
            }
        }
        Ok(stored)
    }
}

/// The columns of the windows one [`store_group`] inserts, as PostgreSQL arrays.
#[derive(Default)]
struct Rows<'a> {
    agents: Array<&'a str>,
    seqs: Array<i64>,
    models: Array<&'a str>,
    versions: Array<i64>,
    starts: Array<i64>,
    seconds: Array<i64>,
    requests: Array<i64>,
    errors: Array<i64>,
    windows: Array<Vec<u8>>,
}

impl<'a> Rows<'a> {
    fn push(&mut self, agent: &'a str, seq: u64, w: &'a MetricsWindow) -> Result<(), SqlError> {
        self.agents.0.push(agent);
        self.seqs.0.push(seq as i64);
        self.models.0.push(&w.model);
        self.versions.0.push(w.version as i64);
        self.starts.0.push(ts(w.start));
        self.seconds.0.push(i64::from(w.seconds));
        self.requests.0.push(w.counts.requests as i64);
        self.errors.0.push(w.counts.errors as i64);
        self.windows.0.push(encode(w)?);
        Ok(())
    }

    /// Inserts the rows in one statement; returns the (agent, sequence) of those stored
    /// (not stored by another replica meanwhile).
    fn insert(&self, tx: &Sql<'_>, now: Timestamp) -> Result<HashSet<(String, i64)>, SqlError> {
        tx.query_map(
            r#"INSERT INTO windows (agent_id, seq, model, version, start, seconds, requests,
               errors, "window", received_at)
             SELECT *, CAST($10 AS BIGINT) FROM unnest($1::TEXT[], $2::BIGINT[], $3::TEXT[],
               $4::BIGINT[], $5::BIGINT[], $6::BIGINT[], $7::BIGINT[], $8::BIGINT[],
               $9::BYTEA[])
             ON CONFLICT (agent_id, seq) DO NOTHING
             RETURNING agent_id, seq"#,
            params![
                self.agents,
                self.seqs,
                self.models,
                self.versions,
                self.starts,
                self.seconds,
                self.requests,
                self.errors,
                self.windows,
                ts(now)
            ],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map(|stored| stored.into_iter().collect())
    }
}

/// The bounds of the hour `w` starts in, as stored.
fn hour_of(w: &MetricsWindow) -> (i64, i64) {
    let hour = w.start.unix() - w.start.unix() % 3600;
    (ts(Timestamp::from_unix(hour)), ts(Timestamp::from_unix(hour + 3600)))
}

/// Why a window over [`MAX_WINDOWS_PER_HOUR`] is refused.
fn over_the_hour() -> String {
    format!("over {MAX_WINDOWS_PER_HOUR} windows in one hour")
}

/// Logs a refused window.
fn refused(agent: &str, seq: u64, w: &MetricsWindow, reason: &str) {
    tracing::warn!(agent, seq, model = %w.model, version = w.version, start = %w.start, reason, "refused a metric window");
}

/// A window as its column holds it.
fn encode(w: &MetricsWindow) -> Result<Vec<u8>, SqlError> {
    postcard::to_stdvec(w)
        .map_err(|e| SqlError::Encode { what: "a metric window", message: e.to_string() })
}

/// Why a window an agent sent is refused, if it is, before the store is asked.
fn refusal(w: &MetricsWindow, held: &Held, now: Timestamp) -> Option<String> {
    if let Err(e) = w.check() {
        return Some(e.to_string());
    }
    if !held.contains(&(w.model.clone(), w.version)) {
        return Some("the agent does not hold this version".to_owned());
    }
    let ends = w.start.unix().saturating_add(u64::from(w.seconds));
    if ends > now.unix().saturating_add(MAX_CLOCK_SKEW.as_secs()) {
        return Some(format!("dated {} s ahead of the control plane's clock", ends - now.unix()));
    }
    None
}

/// Which windows to roll up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsQuery {
    pub model: String,
    /// Only this version.
    pub version: Option<u64>,
    /// Only agents of this group.
    pub group: Option<String>,
    /// Only this agent.
    pub agent: Option<String>,
    /// Windows starting at or after this time.
    pub since: Timestamp,
}

/// One version's windows, merged.
#[derive(Debug, Clone, Default)]
pub struct VersionRollup {
    /// The merged windows.
    pub rollup: Rollup,
    /// The agents that reported.
    pub agents: BTreeSet<String>,
    /// First window's start.
    pub first: u64,
    /// Last window's end.
    pub last: u64,
}

impl VersionRollup {
    /// Seconds from the first window's start to the last one's end.
    pub fn span_seconds(&self) -> u64 {
        self.last.saturating_sub(self.first)
    }
}

/// The rollup of each version matching `query`, by version.
pub fn rollups<C: AsSql + ?Sized>(
    conn: &C,
    query: &MetricsQuery,
) -> Result<BTreeMap<u64, VersionRollup>, C::Error> {
    rollups_between(conn, query, None)
}

/// [`rollups`] of the windows that also started at or before `until`, when given (a
/// finished rollout's figures stop at its end).
pub fn rollups_between<C: AsSql + ?Sized>(
    conn: &C,
    query: &MetricsQuery,
    until: Option<Timestamp>,
) -> Result<BTreeMap<u64, VersionRollup>, C::Error> {
    let rows = conn.sql().query_map(
        r#"SELECT w.version, w.agent_id, w."window" FROM windows w JOIN agents a ON a.id = w.agent_id
         WHERE w.model = $1 AND w.start >= $2 AND (CAST($3 AS BIGINT) IS NULL OR w.version = $3)
           AND (CAST($4 AS TEXT) IS NULL OR a.grp = $4) AND (CAST($5 AS TEXT) IS NULL OR w.agent_id = $5)
           AND (CAST($6 AS BIGINT) IS NULL OR w.start <= $6)"#,
        params![
            query.model,
            ts(query.since),
            query.version.map(|v| v as i64),
            query.group,
            query.agent,
            until.map(ts)
        ],
        |r| Ok((r.get::<i64>(0)? as u64, r.get::<String>(1)?, r.get::<Vec<u8>>(2)?)),
    )?;
    let mut out: BTreeMap<u64, VersionRollup> = BTreeMap::new();
    for (version, agent, bytes) in rows {
        let window: MetricsWindow = postcard::from_bytes(&bytes)
            .map_err(|e| SqlError::Conversion { column: 2, message: e.to_string() })?;
        let entry = out.entry(version).or_default();
        let (start, end) = (window.start.unix(), window.start.unix() + u64::from(window.seconds));
        entry.first = if entry.rollup.windows == 0 { start } else { entry.first.min(start) };
        entry.last = entry.last.max(end);
        entry.rollup.add(&window);
        entry.agents.insert(agent);
    }
    Ok(out)
}

/// The summary of each version matching `query`, with drift where the bundle has a
/// reference profile.
pub fn summaries<C: AsSql + ?Sized>(
    conn: &C,
    query: &MetricsQuery,
) -> Result<Vec<VersionSummary>, C::Error> {
    rollups(conn, query)?
        .into_iter()
        .map(|(version, v)| {
            let reference = reference(conn, &query.model, version)?;
            Ok(v.rollup.summary(
                version,
                v.agents.len() as u64,
                v.span_seconds(),
                reference.as_ref(),
            ))
        })
        .collect()
}

/// Records the reference profile of a pushed bundle.
pub fn set_reference<C: AsSql + ?Sized>(
    conn: &C,
    name: &str,
    version: u64,
    profile: &DataProfile,
) -> Result<(), C::Error> {
    let json = serde_json::to_string(profile)
        .map_err(|e| SqlError::Encode { what: "a reference profile", message: e.to_string() })?;
    conn.sql().execute(
        "UPDATE bundles SET reference = $3 WHERE name = $1 AND version = $2",
        params![name, version as i64, json],
    )?;
    Ok(())
}

/// The reference profile of a bundle, if it has one.
pub fn reference<C: AsSql + ?Sized>(
    conn: &C,
    name: &str,
    version: u64,
) -> Result<Option<DataProfile>, C::Error> {
    let json: Option<String> = conn
        .sql()
        .query_row(
            "SELECT reference FROM bundles WHERE name = $1 AND version = $2",
            params![name, version as i64],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    Ok(json
        .map(|j| {
            serde_json::from_str(&j)
                .map_err(|e| SqlError::Conversion { column: 0, message: e.to_string() })
        })
        .transpose()?)
}

/// Deletes windows that started before `before`; returns how many.
pub fn prune<C: AsSql + ?Sized>(conn: &C, before: Timestamp) -> Result<usize, C::Error> {
    Ok(conn.sql().execute("DELETE FROM windows WHERE start < $1", params![ts(before)])?)
}

/// Windows stored, and the time of the last one received.
pub fn stored<C: AsSql + ?Sized>(conn: &C) -> Result<(u64, Option<Timestamp>), C::Error> {
    Ok(conn.sql().query_row("SELECT COUNT(*), MAX(received_at) FROM windows", params![], |r| {
        Ok((r.get::<i64>(0)? as u64, r.get::<Option<i64>>(1)?.map(from_ts)))
    })?)
}

#[cfg(test)]
mod tests {
    use falaj_common::metrics::{Counts, MetricsWindow};

    use super::*;
    use crate::db::Db;

    fn window(seq: u64, model: &str, version: u64, start: u64) -> SequencedWindow {
        SequencedWindow {
            seq,
            window: MetricsWindow {
                model: model.into(),
                version,
                start: Timestamp::from_unix(start),
                seconds: 1,
                counts: Counts { requests: 3, ..Counts::default() },
            },
        }
    }

    fn store() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("control.db")).unwrap();
        db.call_sync(|c| crate::db::tests::add_agent(c, "agent-1")).unwrap();
        (dir, db)
    }

    fn held(versions: &[(&str, u64)]) -> Held {
        versions.iter().map(|&(m, v)| (m.to_owned(), v)).collect()
    }

    #[test]
    fn windows_from_an_agent_clock_ahead_are_refused() {
        let (_dir, db) = store();
        let now = Timestamp::from_unix(1_800_000_000);
        let batch = [
            window(1, "fault", 1, now.unix() - 3600),
            window(2, "fault", 1, now.unix() + 200),
            window(3, "fault", 1, now.unix() + 86_400),
        ];
        let held = held(&[("fault", 1)]);
        let ingested = db.call_sync(|c| insert_windows(c, "agent-1", &held, &batch, now)).unwrap();
        assert_eq!((ingested.stored, ingested.rejected), (vec![0, 1], 1));
    }

    #[test]
    fn windows_for_versions_the_agent_does_not_hold_are_refused() {
        let (_dir, db) = store();
        let now = Timestamp::from_unix(1_800_000_000);
        let batch = [
            window(1, "fault", 1, now.unix() - 60),
            window(2, "fault", 2, now.unix() - 60),
            window(3, "churn", 1, now.unix() - 60),
        ];
        let held = held(&[("fault", 1)]);
        let ingested = db.call_sync(|c| insert_windows(c, "agent-1", &held, &batch, now)).unwrap();
        assert_eq!((ingested.stored, ingested.rejected), (vec![0], 2));
        let stored = db
            .call_sync(|c| {
                c.query_row("SELECT COUNT(*), MAX(version) FROM windows", [], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })
            })
            .unwrap();
        assert_eq!(stored, (1, 1));
    }
}
