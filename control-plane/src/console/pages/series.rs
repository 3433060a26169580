//! Metrics over time for the charts: a span cut into equal buckets, each rolled up by
//! the monitoring service's own [`monitoring::rollups_between`] (the windows that
//! started in the bucket), and the summaries of the whole span merged from the buckets,
//! so one pass over the windows serves the table and every chart.

use std::collections::BTreeMap;

use falaj_common::metrics::VersionSummary;
use falaj_common::time::Timestamp;
use rusqlite::Connection;

use super::super::charts::Series;
use crate::monitoring::{self, MetricsQuery, VersionRollup};

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

/// The windows `query` selects from `query.since` to `until`, cut into `count` buckets.
pub fn buckets(
    conn: &Connection,
    query: &MetricsQuery,
    until: Timestamp,
    count: usize,
) -> rusqlite::Result<Buckets> {
    let (from, to) = (query.since.unix(), until.unix().max(query.since.unix() + 1));
    // Whole minutes per bucket (agents' windows are about a minute), so no bucket holds
    // one window more than its neighbour and rates do not saw-tooth.
    let step = (to - from).div_ceil(count.max(1) as u64).div_ceil(60).max(1) * 60;
    let count = (to - from).div_ceil(step);
    let mut out = Buckets { step, ..Buckets::default() };
    for i in 0..count {
        let start = from + i * step;
        if start > to {
            break;
        }
        let mut q = query.clone();
        q.since = Timestamp::from_unix(start);
        let last = Timestamp::from_unix(start + step - 1);
        let rollups = monitoring::rollups_between(conn, &q, Some(last))?;
        let index = out.starts.len();
        out.starts.push(start);
        for (version, rollup) in rollups {
            let slots = out.versions.entry(version).or_default();
            slots.resize(index, None);
            slots.push(Some(rollup));
        }
    }
    let n = out.starts.len();
    for slots in out.versions.values_mut() {
        slots.resize(n, None);
    }
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
    pub fn summaries(
        &self,
        conn: &Connection,
        model: &str,
    ) -> rusqlite::Result<Vec<VersionSummary>> {
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
