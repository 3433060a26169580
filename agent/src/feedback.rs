//! Ground-truth feedback: what each identified request was answered (by which model
//! version) is kept for a horizon, bounded in entries, so that a label arriving later
//! (`POST /v2/models/{name}/feedback`) is joined to the version and the answer it judges,
//! and counted in that version's metric windows as accuracy or absolute error.
//!
//! The predictions live in memory only: a restart forgets them, and labels for them are
//! then counted as unknown ids, as are labels that arrive after the horizon.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use falaj_common::metrics::Feedback;
use falaj_common::outcomes::{self, Answer, Label};
use serde::Deserialize;
use thiserror::Error;

/// What a kept prediction says.
#[derive(Debug, Clone)]
struct Kept {
    model: String,
    version: u64,
    answers: Vec<Answer>,
    at: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    by_id: HashMap<String, Kept>,
    /// Ids in the order they were recorded, with when: the oldest are forgotten first.
    order: VecDeque<(Instant, String)>,
}

/// Predictions waiting for their ground truth.
#[derive(Debug)]
pub struct Predictions {
    inner: Mutex<Inner>,
    horizon: Duration,
    capacity: usize,
}

/// One label, or one per row of the request it judges.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Labels {
    /// For a request of one row.
    One(Label),
    /// One per row.
    Rows(Vec<Label>),
}

/// Ground truth for one request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// The inference request's id.
    pub id: String,
    /// Its label(s).
    pub label: Labels,
}

/// A feedback body: one item or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Body {
    /// One request's ground truth.
    One(Item),
    /// Several.
    Many(Vec<Item>),
}

/// Feedback joined: per version, what it adds; and the ids not found.
#[derive(Debug, Default, PartialEq)]
pub struct Joined {
    /// (model, version, feedback) for each version judged.
    pub versions: Vec<(String, u64, Feedback)>,
    /// Requests joined.
    pub joined: u64,
    /// Ids no prediction is kept for (unknown, expired, or of another model).
    pub unknown: u64,
}

/// Why feedback was refused (nothing of it is counted).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FeedbackError {
    /// The labels do not match the request's rows.
    #[error("feedback for request {id:?}: {labels} labels for {rows} rows")]
    Rows {
        id: String,
        /// Labels given.
        labels: usize,
        /// Rows answered.
        rows: usize,
    },
    /// A label that cannot judge the answer.
    #[error("feedback for request {id:?}: {source}")]
    Unscorable {
        id: String,
        /// Why.
        source: outcomes::Unscorable,
    },
}

impl Predictions {
    /// Keeps predictions for `horizon`, at most `capacity` of them (the oldest go first).
    pub fn new(horizon: Duration, capacity: usize) -> Self {
        Self { inner: Mutex::default(), horizon, capacity: capacity.max(1) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps what request `id` was answered by `model@version` (a later request with the
    /// same id replaces it).
    pub fn record(&self, id: &str, model: &str, version: u64, answers: Vec<Answer>, now: Instant) {
        let mut inner = self.lock();
        inner.forget(now.checked_sub(self.horizon), self.capacity - 1);
        let kept = Kept { model: model.to_owned(), version, answers, at: now };
        inner.by_id.insert(id.to_owned(), kept);
        inner.order.push_back((now, id.to_owned()));
    }

    /// Predictions kept.
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Joins `items` for `model` to their predictions: all of them or, when one is
    /// refused, none. A joined prediction is forgotten, so a label counts once.
    pub fn join(&self, model: &str, items: &[Item], now: Instant) -> Result<Joined, FeedbackError> {
        let mut inner = self.lock();
        inner.forget(now.checked_sub(self.horizon), usize::MAX);
        let mut joined = Joined::default();
        let mut matched = Vec::new();
        for item in items {
            let Some(kept) = inner.by_id.get(&item.id).filter(|k| k.model == model) else {
                joined.unknown += 1;
                continue;
            };
            let labels = match &item.label {
                Labels::One(label) => std::slice::from_ref(label),
                Labels::Rows(labels) => labels.as_slice(),
            };
            if labels.len() != kept.answers.len() {
                return Err(FeedbackError::Rows {
                    id: item.id.clone(),
                    labels: labels.len(),
                    rows: kept.answers.len(),
                });
            }
            let feedback = outcomes::score(&kept.answers, labels)
                .map_err(|source| FeedbackError::Unscorable { id: item.id.clone(), source })?;
            matched.push((item.id.as_str(), kept.version, feedback));
        }
        for (id, version, feedback) in matched {
            inner.by_id.remove(id);
            joined.joined += 1;
            match joined.versions.iter_mut().find(|(_, v, _)| *v == version) {
                Some((_, _, total)) => total.add(&feedback),
                None => joined.versions.push((model.to_owned(), version, feedback)),
            }
        }
        Ok(joined)
    }
}

impl Inner {
    /// Forgets predictions recorded before `before` and the oldest beyond `keep`.
    fn forget(&mut self, before: Option<Instant>, keep: usize) {
        while let Some((at, id)) = self.order.front() {
            let expired = before.is_some_and(|b| *at < b);
            if !expired && self.by_id.len() <= keep && self.order.len() <= keep.saturating_mul(2) {
                break;
            }
            // An id recorded again later, or already joined, has a newer entry or none.
            if self.by_id.get(id).is_some_and(|k| k.at == *at) {
                self.by_id.remove(id);
            }
            self.order.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(json: &str) -> Vec<Item> {
        match serde_json::from_str::<Body>(json).unwrap() {
            Body::One(item) => vec![item],
            Body::Many(items) => items,
        }
    }

    fn label(text: &str) -> Vec<Answer> {
        vec![Answer::Label(text.into())]
    }

    #[test]
    fn labels_join_once_to_the_version_that_answered() {
        let p = Predictions::new(Duration::from_secs(60), 100);
        let now = Instant::now();
        p.record("a", "fault", 1, label("1"), now);
        p.record("b", "fault", 2, label("0"), now);
        p.record("c", "fault", 2, vec![Answer::Label("1".into()), Answer::Label("1".into())], now);
        p.record("d", "other", 2, label("1"), now);
        let got = p
            .join("fault", &items(r#"[{"id":"a","label":1},{"id":"b","label":1},{"id":"c","label":[1,0]},{"id":"d","label":1},{"id":"zz","label":1}]"#), now)
            .unwrap();
        assert_eq!((got.joined, got.unknown), (3, 2));
        assert_eq!(
            got.versions,
            [
                ("fault".into(), 1, Feedback { labelled: 1, correct: 1, abs_error: 0.0 }),
                ("fault".into(), 2, Feedback { labelled: 3, correct: 1, abs_error: 0.0 }),
            ]
        );
        let again = p.join("fault", &items(r#"{"id":"a","label":1}"#), now).unwrap();
        assert_eq!((again.joined, again.unknown), (0, 1), "a label counts once");
    }

    #[test]
    fn refused_feedback_counts_nothing() {
        let p = Predictions::new(Duration::from_secs(60), 100);
        let now = Instant::now();
        p.record("a", "fault", 1, label("1"), now);
        p.record("b", "fault", 1, label("1"), now);
        let err =
            p.join("fault", &items(r#"[{"id":"a","label":1},{"id":"b","label":[1,1]}]"#), now);
        assert_eq!(err, Err(FeedbackError::Rows { id: "b".into(), labels: 2, rows: 1 }));
        assert_eq!(p.len(), 2, "nothing joined");
        p.record("v", "fault", 1, vec![Answer::Value(2.0)], now);
        let err = p.join("fault", &items(r#"{"id":"v","label":"x"}"#), now).unwrap_err();
        assert!(err.to_string().contains("cannot be scored"), "{err}");
    }

    #[test]
    fn predictions_expire_and_stay_within_capacity() {
        let p = Predictions::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            p.record(id, "m", 1, label("1"), t0 + Duration::from_secs(i as u64));
        }
        assert_eq!(p.len(), 3, "the oldest went first");
        let late = p
            .join(
                "m",
                &items(r#"[{"id":"a","label":1},{"id":"d","label":1}]"#),
                t0 + Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!((late.joined, late.unknown), (1, 1));
        let expired =
            p.join("m", &items(r#"{"id":"b","label":1}"#), t0 + Duration::from_secs(13)).unwrap();
        assert_eq!((expired.joined, expired.unknown), (0, 1));
        assert!(p.is_empty(), "c expired too");
        // The same id recorded twice keeps the latest answer.
        p.record("x", "m", 1, label("0"), t0 + Duration::from_secs(20));
        p.record("x", "m", 2, label("1"), t0 + Duration::from_secs(21));
        let got =
            p.join("m", &items(r#"{"id":"x","label":1}"#), t0 + Duration::from_secs(22)).unwrap();
        assert_eq!(got.versions[0].1, 2);
    }
}
