//! Per-key request rates and counts. A key may carry a rate (`apikey create --rate 100/s`,
//! or `/min`, `/h`): its requests are admitted up to that many at once and that many per
//! period on average, and refused past it (429 with `Retry-After` over REST,
//! RESOURCE_EXHAUSTED over gRPC) until the period lets another through. The limiter is
//! `governor`'s (GCRA), one per key in the serving process, kept while the key and its
//! rate stay as they are. Every key's requests are counted by outcome, for `/metrics`.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use falaj_common::time::Timestamp;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::KeyInfo;

/// A rate a key's requests may not exceed: `count` per `per` on average, up to `count`
/// at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per period.
    pub count: NonZeroU32,
    /// The period.
    pub per: Per,
}

/// The period of a [`Rate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Per {
    /// A second (`/s`).
    Second,
    /// A minute (`/min`).
    Minute,
    /// An hour (`/h`).
    Hour,
}

impl Per {
    fn unit(self) -> &'static str {
        match self {
            Self::Second => "s",
            Self::Minute => "min",
            Self::Hour => "h",
        }
    }
}

impl Rate {
    fn quota(self) -> Quota {
        match self.per {
            Per::Second => Quota::per_second(self.count),
            Per::Minute => Quota::per_minute(self.count),
            Per::Hour => Quota::per_hour(self.count),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.per.unit())
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let refuse = || {
            format!(
                "rate {text:?} must be COUNT/s, COUNT/min or COUNT/h, COUNT a whole number \
                 from 1 to {}",
                u32::MAX
            )
        };
        let (count, unit) = text.split_once('/').ok_or_else(refuse)?;
        let count = count.trim().parse().map_err(|_| refuse())?;
        let per = match unit.trim() {
            "s" => Per::Second,
            "min" => Per::Minute,
            "h" => Per::Hour,
            _ => return Err(refuse()),
        };
        Ok(Self { count, per })
    }
}

/// A key's requests since the server started, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Let through.
    pub(crate) admitted: u64,
    /// Refused: over the key's rate.
    pub(crate) throttled: u64,
    /// Refused: for a model (or an endpoint) the key does not cover.
    pub(crate) forbidden: u64,
}

/// One key's limiter, for the key (made at `created`) and rate it was set up for.
struct Limiter {
    created: Timestamp,
    rate: Rate,
    gcra: DefaultDirectRateLimiter,
}

/// What the gate keeps per key name across reloads of the keys: a limiter while the key
/// has a rate, and the counts (which go on through revocations and re-creations, as
/// Prometheus counters do).
#[derive(Default)]
pub(crate) struct PerKey {
    limiters: HashMap<String, Limiter>,
    counts: HashMap<String, Counts>,
}

impl fmt::Debug for PerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerKey")
            .field("limited", &self.limiters.keys().collect::<Vec<_>>())
            .field("counts", &self.counts)
            .finish()
    }
}

impl PerKey {
    /// Takes the keys as just read: a key made again under its name, or given another
    /// rate, gets a fresh limiter; one without a rate (or gone) loses its limiter.
    pub(crate) fn update<'k>(&mut self, keys: impl IntoIterator<Item = &'k KeyInfo>) {
        let mut limiters = std::mem::take(&mut self.limiters);
        for key in keys {
            if !self.counts.contains_key(&key.name) {
                self.counts.insert(key.name.clone(), Counts::default());
            }
            let Some(rate) = key.rate else { continue };
            let kept = limiters
                .remove(&key.name)
                .filter(|l| (l.created, l.rate) == (key.created, rate))
                .unwrap_or_else(|| Limiter {
                    created: key.created,
                    rate,
                    gcra: RateLimiter::direct(rate.quota()),
                });
            self.limiters.insert(key.name.clone(), kept);
        }
    }

    /// Counts a request of key `name` refused as not covered.
    pub(crate) fn forbidden(&mut self, name: &str) {
        if let Some(counts) = self.counts.get_mut(name) {
            counts.forbidden += 1;
        }
    }

    /// Admits a request of key `name` within its rate, or says how long until one would
    /// be, with the rate; counted either way.
    pub(crate) fn admit(&mut self, name: &str) -> Result<(), (Rate, Duration)> {
        let verdict = match self.limiters.get(name) {
            None => Ok(()),
            Some(l) => l.gcra.check().map_err(|not_until| {
                (l.rate, not_until.wait_time_from(DefaultClock::default().now()))
            }),
        };
        if let Some(counts) = self.counts.get_mut(name) {
            match verdict {
                Ok(()) => counts.admitted += 1,
                Err(_) => counts.throttled += 1,
            }
        }
        verdict
    }

    /// Each key's counts, by name.
    pub(crate) fn counts(&self) -> Vec<(String, Counts)> {
        let mut all: Vec<_> = self.counts.iter().map(|(n, c)| (n.clone(), *c)).collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::apikeys::Scope;

    #[test]
    fn rates_read_and_write_as_count_per_unit() {
        for text in ["1/s", "600/min", "10/h", "4294967295/s"] {
            assert_eq!(text.parse::<Rate>().unwrap().to_string(), text);
        }
        assert_eq!(" 5 / min ".parse::<Rate>().unwrap().to_string(), "5/min");
        for bad in ["", "5", "0/s", "-1/s", "5/day", "5/", "/s", "4294967296/s", "1.5/s"] {
            let err = bad.parse::<Rate>().unwrap_err();
            assert!(err.contains("must be COUNT/s, COUNT/min or COUNT/h"), "{bad}: {err}");
        }
    }

    fn key(name: &str, created: u64, rate: Option<&str>) -> KeyInfo {
        KeyInfo {
            name: name.into(),
            scope: Scope::Models(BTreeSet::new()),
            created: Timestamp::from_unix(created),
            expires: None,
            revoked: None,
            rate: rate.map(|r| r.parse().unwrap()),
        }
    }

    #[test]
    fn a_key_is_held_to_its_rate_through_reloads_and_counted() {
        let mut per_key = PerKey::default();
        per_key.update(&[key("slow", 1, Some("2/h")), key("free", 1, None)]);
        // Two at once, then none for half an hour (an hour's rate of two).
        assert_eq!(per_key.admit("slow"), Ok(()));
        per_key.update(&[key("slow", 1, Some("2/h")), key("free", 1, None)]);
        assert_eq!(per_key.admit("slow"), Ok(()));
        let (rate, wait) = per_key.admit("slow").unwrap_err();
        assert_eq!(rate.to_string(), "2/h");
        assert!(wait > Duration::from_secs(29 * 60) && wait <= Duration::from_secs(30 * 60));
        // A key without a rate is never held back.
        for _ in 0..100 {
            assert_eq!(per_key.admit("free"), Ok(()));
        }
        per_key.forbidden("free");
        // The key made again under its name, or given another rate, starts afresh.
        per_key.update(&[key("slow", 2, Some("2/h"))]);
        assert_eq!(per_key.admit("slow"), Ok(()));
        per_key.update(&[key("slow", 2, Some("3/h"))]);
        assert_eq!(per_key.admit("slow"), Ok(()));
        assert_eq!(
            per_key.counts(),
            [
                ("free".to_owned(), Counts { admitted: 100, throttled: 0, forbidden: 1 }),
                ("slow".to_owned(), Counts { admitted: 4, throttled: 1, forbidden: 0 }),
            ]
        );
        // A name no key has is not counted.
        assert!(per_key.admit("ghost").is_ok());
        assert_eq!(per_key.counts().len(), 2);
    }
}
