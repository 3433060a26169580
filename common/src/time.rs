//! Timestamps as they appear in signed documents: whole seconds, written as RFC 3339 UTC.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in time with one-second resolution, serialised as `2026-11-26T13:00:00Z`.
///
/// Signed documents carry these rather than `SystemTime` so that their canonical bytes
/// do not depend on the sub-second precision of the clock that made them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The timestamp `secs` seconds after the Unix epoch.
    pub const fn from_unix(secs: u64) -> Self {
        Self(secs)
    }

    /// Truncates `time` to whole seconds; times before the epoch become the epoch.
    pub fn from_system(time: SystemTime) -> Self {
        Self(time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
    }

    /// Seconds since the Unix epoch.
    pub const fn unix(self) -> u64 {
        self.0
    }

    /// The same instant as a `SystemTime`.
    pub fn to_system(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.0)
    }

    /// This timestamp moved `by` later, saturating at the end of representable time.
    #[must_use]
    pub fn saturating_add(self, by: Duration) -> Self {
        Self(self.0.saturating_add(by.as_secs()))
    }

    /// Parses an RFC 3339 timestamp in UTC (`...Z`).
    pub fn parse(text: &str) -> Result<Self, humantime::TimestampError> {
        humantime::parse_rfc3339(text).map(Self::from_system)
    }
}

/// Days before an expiry at which operators are warned, widest first.
pub const EXPIRY_WARNINGS_DAYS: [u64; 3] = [90, 30, 7];

/// The narrowest warning band of [`EXPIRY_WARNINGS_DAYS`] that `expires` falls in at
/// `now` (7 within a week, 30 within a month...), or `None` while it is further off.
/// Something already expired is in the narrowest band.
pub fn expiry_warning(now: Timestamp, expires: Timestamp) -> Option<u64> {
    let left = expires.unix().saturating_sub(now.unix());
    EXPIRY_WARNINGS_DAYS.into_iter().rev().find(|days| left < days * 86_400)
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // humantime refuses years past 9999; such a time is only ever an absurd expiry.
        if self.0 >= 253_402_300_800 {
            return write!(f, "9999-12-31T23:59:59Z");
        }
        write!(f, "{}", humantime::format_rfc3339_seconds(self.to_system()))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(|err| {
            serde::de::Error::custom(format_args!("invalid RFC 3339 timestamp {text:?}: {err}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_rfc3339() {
        let t = Timestamp::from_unix(1_795_000_000);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2026-11-18T11:06:40Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
    }

    #[test]
    fn refuses_garbage_and_names_it() {
        let err = serde_json::from_str::<Timestamp>("\"yesterday\"").unwrap_err();
        assert!(err.to_string().contains("yesterday"), "{err}");
    }

    #[test]
    fn expiry_warnings_narrow_as_the_day_nears() {
        let now = Timestamp::from_unix(1_800_000_000);
        let in_days = |d: u64| Timestamp::from_unix(now.unix() + d * 86_400);
        assert_eq!(expiry_warning(now, in_days(91)), None);
        assert_eq!(expiry_warning(now, in_days(89)), Some(90));
        assert_eq!(expiry_warning(now, in_days(30)), Some(90));
        assert_eq!(expiry_warning(now, in_days(29)), Some(30));
        assert_eq!(expiry_warning(now, in_days(6)), Some(7));
        assert_eq!(expiry_warning(now, Timestamp::from_unix(1)), Some(7), "already expired");
    }

    #[test]
    fn truncates_sub_second_precision() {
        let t = UNIX_EPOCH + Duration::from_millis(1_500);
        assert_eq!(Timestamp::from_system(t).unix(), 1);
    }
}

/// Durations written for people in configuration files (`500ms`, `10s`, `1h`, `30d`), for
/// `#[serde(with = "falaj_common::time::human_duration")]`.
pub mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `10s`, `1h 30m`...
    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*value))
    }

    /// Reads `10s`, `1h 30m`...
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format_args!(
                "{text:?} is not a duration like 500ms, 10s or 1h: {e}"
            ))
        })
    }

    #[cfg(test)]
    mod tests {
        use std::time::Duration;

        #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
        struct Holder {
            #[serde(with = "super")]
            every: Duration,
        }

        #[test]
        fn round_trips_and_names_bad_values() {
            let h: Holder = serde_json::from_str(r#"{"every": "1m 30s"}"#).unwrap();
            assert_eq!(h.every, Duration::from_secs(90));
            assert_eq!(serde_json::to_string(&h).unwrap(), r#"{"every":"1m 30s"}"#);
            let err = serde_json::from_str::<Holder>(r#"{"every": "soon"}"#).unwrap_err();
            assert!(err.to_string().contains("\"soon\" is not a duration"), "{err}");
        }
    }
}
