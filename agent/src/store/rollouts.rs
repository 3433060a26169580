//! The rollouts of the accepted desired-state document, kept so that a restarted agent
//! resumes each at the same step (steps are absolute times), with the same assignments
//! (they depend only on the rollout's id and each key), the figures its variants served
//! so far, and any rollback it decided, with its reason.

use falaj_common::metrics::Counts;
use falaj_common::rollout::RolloutSpec;
use falaj_common::time::Timestamp;
use rusqlite::params;

use super::{Result, Store, StoreError};

/// A rollout as the agent holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRollout {
    /// The rollout, as the last document gave it.
    pub spec: RolloutSpec,
    /// What the baseline served since the rollout began here.
    pub baseline: Counts,
    /// What the candidate served.
    pub candidate: Counts,
    /// When and why this agent rolled it back.
    pub rolled_back: Option<(Timestamp, String)>,
}

fn encode(counts: &Counts) -> Vec<u8> {
    postcard::to_stdvec(counts).expect("counts always encode")
}

impl Store {
    /// Makes `specs` the rollouts held, in one transaction: a rollout still listed keeps
    /// its figures and its rollback (its spec is updated: a pause or resume re-times the
    /// steps), a new one starts from nothing, one no longer listed is forgotten.
    pub fn set_rollouts(&mut self, specs: &[RolloutSpec]) -> Result<()> {
        let ids: Vec<&str> = specs.iter().map(|s| s.id.as_str()).collect();
        let empty = encode(&Counts::default());
        self.write_tx(|tx| {
            let held: Vec<String> = {
                let mut stmt = tx.prepare("SELECT id FROM rollouts")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for id in held.iter().filter(|id| !ids.contains(&id.as_str())) {
                tx.execute("DELETE FROM rollouts WHERE id = ?1", [id])?;
            }
            for spec in specs {
                let json = serde_json::to_string(spec).expect("rollouts serialise");
                tx.execute(
                    "INSERT INTO rollouts (id, spec, baseline, candidate) VALUES (?1, ?2, ?3, ?3)
                     ON CONFLICT (id) DO UPDATE SET spec = excluded.spec",
                    params![spec.id, json, empty],
                )?;
            }
            Ok(())
        })
    }

    /// The rollouts held.
    pub fn rollouts(&self) -> Result<Vec<StoredRollout>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, spec, baseline, candidate, rolled_back_at, reason FROM rollouts ORDER BY id")
            .map_err(self.db())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })
            .map_err(self.db())?;
        let mut out = Vec::new();
        for row in rows {
            let (id, spec, baseline, candidate, at, reason) = row.map_err(self.db())?;
            let damaged = |what: &str, e: &dyn std::fmt::Display| {
                StoreError::Refused(format!("stored rollout {id}: its {what} does not decode: {e}"))
            };
            let counts = |bytes: &[u8], what| {
                postcard::from_bytes::<Counts>(bytes).map_err(|e| damaged(what, &e))
            };
            out.push(StoredRollout {
                spec: serde_json::from_str(&spec).map_err(|e| damaged("spec", &e))?,
                baseline: counts(&baseline, "baseline figures")?,
                candidate: counts(&candidate, "candidate figures")?,
                rolled_back: at.map(|at| {
                    (Timestamp::from_unix(at as u64), reason.clone().unwrap_or_default())
                }),
            });
        }
        Ok(out)
    }

    /// Records a rollout's figures and, the first time, its rollback, in one transaction
    /// with an event. False if the rollout is no longer held.
    pub fn update_rollout(
        &mut self,
        id: &str,
        baseline: &Counts,
        candidate: &Counts,
        rolled_back: Option<(Timestamp, &str)>,
    ) -> Result<bool> {
        self.write_tx(|tx| {
            let updated = tx.execute(
                "UPDATE rollouts SET baseline = ?2, candidate = ?3 WHERE id = ?1",
                params![id, encode(baseline), encode(candidate)],
            )?;
            if let Some((at, reason)) = rolled_back.filter(|_| updated == 1) {
                let first = tx.execute(
                    "UPDATE rollouts SET rolled_back_at = ?2, reason = ?3
                     WHERE id = ?1 AND rolled_back_at IS NULL",
                    params![id, at.unix() as i64, reason],
                )?;
                if first == 1 {
                    super::audit::event(
                        tx,
                        at.unix() as i64,
                        "rollout.rollback",
                        None,
                        &format!("{id}: {reason}"),
                    )?;
                }
            }
            Ok(updated == 1)
        })
    }
}

#[cfg(test)]
mod tests {
    use falaj_common::rollout::{Share, Step, Strategy};

    use super::*;
    use crate::store::tests::store;

    fn spec(id: &str, at: u64) -> RolloutSpec {
        RolloutSpec {
            id: id.into(),
            model: "fault".into(),
            baseline: 1,
            candidate: 2,
            strategy: Strategy::Canary,
            steps: vec![Step { at: Timestamp::from_unix(at), share: Share::ALL }],
            mirror: Share::NONE,
            guards: vec!["error_rate<0.1".parse().unwrap()],
            min_requests: 5,
        }
    }

    #[test]
    fn rollouts_keep_figures_and_rollbacks_until_their_document_drops_them() {
        let (_dir, mut store) = store();
        store.set_rollouts(&[spec("ro-1", 10)]).unwrap();
        let served = Counts { requests: 7, errors: 3, ..Counts::default() };
        let at = Timestamp::from_unix(99);
        assert!(
            store.update_rollout("ro-1", &Counts::default(), &served, Some((at, "why"))).unwrap()
        );
        // A second rollback keeps the first reason.
        store.update_rollout("ro-1", &Counts::default(), &served, Some((at, "later"))).unwrap();
        // The next document re-times the steps: figures and rollback stay.
        store.set_rollouts(&[spec("ro-1", 20), spec("ro-2", 5)]).unwrap();
        let held = store.rollouts().unwrap();
        assert_eq!(held.len(), 2);
        assert_eq!(held[0].spec, spec("ro-1", 20));
        assert_eq!(held[0].candidate, served);
        assert_eq!(held[0].rolled_back, Some((at, "why".into())));
        assert_eq!((held[1].rolled_back.clone(), held[1].candidate.requests), (None, 0));
        store.set_rollouts(&[spec("ro-2", 5)]).unwrap();
        assert_eq!(store.rollouts().unwrap().len(), 1);
        assert!(!store.update_rollout("ro-1", &served, &served, None).unwrap());
    }
}
