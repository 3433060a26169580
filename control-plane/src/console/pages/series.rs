//! Metrics over time for the charts: a span cut into equal buckets, each the rollup of
//! the windows that started in it, and the summaries of the whole span merged from the
//! buckets, so one pass over the windows serves the table and every chart. The windows
//! are selected as [`monitoring::rollups_between`] selects them and merged with the same
//! [`falaj_common::metrics::Rollup`] (a test holds the two equal); one query rather than
//! one per bucket, since the service's optional upper bound cannot narrow its index scan.

use std::collections::BTreeMap;

use falaj_common::metrics::{MetricsWindow, VersionSummary};
use falaj_common::time::Timestamp;

use super::super::charts::Series;
use crate::db::ts;
use crate::monitoring::{self, MetricsQuery, VersionRollup};
use crate::sql::{AsSql, SqlError, params};

/// One version's rollups per bucket.
#[derive(Debug, Clone, Default)]
pub struct Buckets {
    /// Each bucket's start (unix seconds).
    pub starts: Vec<u64>,
    /// The bucket's length in seconds.
    pub step: u64,
    /// Per version, the rollup of each bucket (`None` where it reported nothing).
    pub versions: BTreeMap<u64, Vec<Option<VersionRollup>>>,
}

/// The windows `query` selects that started from `query.since` to `until`, cut into at
/// most `count` buckets of whole minutes.
pub fn buckets<C: AsSql + ?Sized>(
    conn: &C,
    query: &MetricsQuery,
    until: Timestamp,
    count: usize,
) -> Result<Buckets, C::Error> {
    let (from, to) = (query.since.unix(), until.unix().max(query.since.unix() + 1));
    // Whole minutes per bucket (agents' windows are about a minute), so no bucket holds
    // one window more than its neighbour and rates do not saw-tooth.
    let step = (to - from).div_ceil(count.max(1) as u64).div_ceil(60).max(1) * 60;
    let n = (to - from).div_ceil(step) as usize;
    let mut out = Buckets {
        step,
        starts: (0..n as u64).map(|i| from + i * step).collect(),
        ..Buckets::default()
    };
    // Each row goes into its bucket as it is read (nothing is collected).
    conn.sql().query_map(
        r#"SELECT w.version, w.agent_id, w."window" FROM windows w JOIN agents a ON a.id = w.agent_id
         WHERE w.model = $1 AND w.start >= $2 AND w.start <= $3
           AND (CAST($4 AS BIGINT) IS NULL OR w.version = $4)
           AND (CAST($5 AS TEXT) IS NULL OR a.grp = $5) AND (CAST($6 AS TEXT) IS NULL OR w.agent_id = $6)"#,
        params![
            query.model,
            ts(query.since),
            ts(Timestamp::from_unix(to)),
            query.version.map(|v| v as i64),
            query.group,
            query.agent
        ],
        |r| {
            let (version, agent) = (r.get::<i64>(0)? as u64, r.get::<String>(1)?);
            let window: MetricsWindow = postcard::from_bytes(&r.get::<Vec<u8>>(2)?)
                .map_err(|e| SqlError::Conversion { column: 2, message: e.to_string() })?;
            let start = window.start.unix();
            let index =
                (start.saturating_sub(from) / step).min(n.saturating_sub(1) as u64) as usize;
            let slots = out.versions.entry(version).or_insert_with(|| vec![None; n]);
            let Some(slot) = slots.get_mut(index) else { return Ok(()) };
            let entry = slot.get_or_insert_with(VersionRollup::default);
            let end = start + u64::from(window.seconds);
            entry.first = if entry.rollup.windows == 0 { start } else { entry.first.min(start) };
            entry.last = entry.last.max(end);
            entry.rollup.add(&window);
            entry.agents.insert(agent);
            Ok(())
        },
    )?;
    Ok(out)
}

impl Buckets {
    /// The time the buckets cover (unix seconds), for the charts' axes.
    pub fn span(&self) -> (f64, f64) {
        let from = self.starts.first().copied().unwrap_or_default();
        let to = self.starts.last().map_or(from, |s| s + self.step);
        (from as f64, to as f64)
    }

    /// Each version's buckets merged: what [`monitoring::rollups`] gives for the span.
    pub fn merged(&self) -> BTreeMap<u64, VersionRollup> {
        self.versions
            .iter()
            .map(|(version, slots)| {
                let mut all = VersionRollup::default();
                for r in slots.iter().flatten() {
                    all.first =
                        if all.rollup.windows == 0 { r.first } else { all.first.min(r.first) };
                    all.last = all.last.max(r.last);
                    all.rollup.windows += r.rollup.windows;
                    all.rollup.counts.add(&r.rollup.counts);
                    all.agents.extend(r.agents.iter().cloned());
                }
                (*version, all)
            })
            .collect()
    }

    /// The summary of each version over the span, with drift against its reference (as
    /// [`monitoring::summaries`] computes it).
    pub fn summaries<C: AsSql + ?Sized>(
        &self,
        conn: &C,
        model: &str,
    ) -> Result<Vec<VersionSummary>, C::Error> {
        self.merged()
            .into_iter()
            .map(|(version, v)| {
                let reference = monitoring::reference(conn, model, version)?;
                Ok(v.rollup.summary(
                    version,
                    v.agents.len() as u64,
                    v.span_seconds(),
                    reference.as_ref(),
                ))
            })
            .collect()
    }

    /// One line per version of `value` of each bucket's summary (buckets without
    /// data are left out of the line, not drawn as zero unless `zero_when_empty`).
    pub fn lines(
        &self,
        name: impl Fn(u64) -> String,
        value: impl Fn(&VersionSummary) -> Option<f64>,
        zero_when_empty: bool,
    ) -> Vec<Series> {
        self.versions
            .iter()
            .map(|(version, slots)| Series {
                name: name(*version),
                points: self
                    .starts
                    .iter()
                    .zip(slots)
                    .filter_map(|(start, slot)| {
                        let mid = (*start + self.step / 2) as f64;
                        match slot {
                            Some(r) => {
                                let s = r.rollup.summary(*version, 0, self.step, None);
                                value(&s).map(|v| (mid, v))
                            }
                            None => zero_when_empty.then_some((mid, 0.0)),
                        }
                    })
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use falaj_common::keys::Sha256;
    use falaj_common::metrics::Counts;
    use falaj_common::protocol::SequencedWindow;
    use falaj_common::sketch::LatencySketch;
    use rusqlite::Connection;

    use super::*;
    use crate::db::{self, Db, NewAgent, TokenRow, TokenUse};

    const T0: u64 = 1_800_000_000;

    fn enroll(c: &mut Connection, agent: &str, group: &str) -> rusqlite::Result<()> {
        let now = Timestamp::from_unix(T0);
        let secret = Sha256::of(agent.as_bytes());
        let expires = now.saturating_add(Duration::from_secs(86_400));
        let token =
            TokenRow { id: format!("t-{agent}"), group: group.into(), region: "r".into(), expires };
        db::insert_token(c, &token, secret, now)?;
        let new = NewAgent {
            id: agent.into(),
            hostname: agent.into(),
            agent_version: "test".into(),
            serial: format!("s-{agent}"),
            cert_expires: expires,
        };
        let used = TokenUse { token_id: token.id, secret_sha256: secret, csr_sha256: secret };
        db::enroll(c, &used, "r", &new, now)?.expect("enrolled");
        Ok(())
    }

    fn window(version: u64, start: u64, requests: u64) -> MetricsWindow {
        let mut latency = LatencySketch::default();
        for i in 0..requests {
            latency.record(100.0 + (i * 37 % 900) as f64);
        }
        MetricsWindow {
            model: "m".into(),
            version,
            start: Timestamp::from_unix(start),
            seconds: 60,
            counts: Counts {
                requests,
                errors: requests % 3,
                latency,
                rows: requests,
                ..Counts::default()
            },
        }
    }

    /// The buckets hold each window in the bucket it started in, and merged they equal
    /// what the monitoring service rolls up over the same span, with or without a group.
    #[test]
    fn buckets_merge_to_the_services_rollups() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join(db::DB_FILE)).unwrap();
        db.call_sync(|c| {
            enroll(c, "a1", "g1")?;
            enroll(c, "a2", "g2")?;
            for (agent, versions) in [("a1", [1u64, 2]), ("a2", [1, 1])] {
                let held = monitoring::Held::from(versions.map(|v| ("m".to_owned(), v)));
                let batch: Vec<SequencedWindow> = (0..180u64)
                    .map(|i| SequencedWindow {
                        seq: i + 1,
                        window: window(versions[(i % 2) as usize], T0 + i * 60 + 7, 10 + i % 13),
                    })
                    .collect();
                let now = Timestamp::from_unix(T0 + 180 * 60);
                monitoring::insert_windows(c, agent, &held, &batch, now)?;
            }
            Ok(())
        })
        .unwrap();
        for group in [None, Some("g1")] {
            let query = MetricsQuery {
                model: "m".into(),
                version: None,
                group: group.map(str::to_owned),
                agent: None,
                since: Timestamp::from_unix(T0),
            };
            let until = Timestamp::from_unix(T0 + 3 * 3600);
            let (b, service) = db
                .call_sync(|c| {
                    Ok((buckets(c, &query, until, 48)?, monitoring::rollups(c, &query)?))
                })
                .unwrap();
            assert_eq!(b.step, 240, "three hours in buckets of whole minutes");
            let merged = b.merged();
            assert_eq!(merged.keys().collect::<Vec<_>>(), service.keys().collect::<Vec<_>>());
            for (version, v) in &service {
                let m = &merged[version];
                assert_eq!(m.rollup, v.rollup, "version {version}, group {group:?}");
                assert_eq!((m.first, m.last, &m.agents), (v.first, v.last, &v.agents));
            }
            // Each bucket holds the windows that started in it: 4 minutes, a window a
            // minute from each agent, alternating versions for a1.
            let windows: u64 =
                b.versions.values().map(|s| s[0].as_ref().map_or(0, |r| r.rollup.windows)).sum();
            assert_eq!(windows, if group.is_none() { 8 } else { 4 });
        }
    }
}
