//! The rollouts module's storage on both databases (cases listed in [`CASES`], run by
//! `main` as `NAME::sqlite` and `NAME::postgres`): starts refused and numbered, "latest"
//! by order of creation (no `rowid` on PostgreSQL), every step and its event, and
//! replicas stepping or starting at once (one step wins, ids stay apart); and what was
//! ported with them, on several connections at once where it decides a write from a
//! read: a deployment changed as a rollout starts, a bundle pushed twice, a certificate
//! renewed as its agent is revoked, the desired-state documents that carry rollouts
//! (`Shared::desired_for`, never one version for two documents); and the figures the
//! console reads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use falaj_common::desired::DesiredState;
use falaj_common::rollout::Strategy;
use falaj_common::time::Timestamp;
use falaj_control::console::pages::{metrics, series};
use falaj_control::db::{self, Db};
use falaj_control::monitoring::{self, MetricsQuery};
use falaj_control::rollouts::{
    self, ActError, Action, Rollout, RolloutState, StartError, StartRequest,
};
use falaj_control::service::ServiceError;
use falaj_control::service::{bundles, deploy};
use falaj_control::sql::params;
use falaj_control::state::{Policy, Shared};
use falaj_control::{audit, blobs, ca, keyring, keys, quic, vault};

use crate::{Body, REGION, at, bundle, enrolled, held, window};

/// This module's cases: each body runs once on SQLite and once on PostgreSQL.
pub(crate) const CASES: &[(&str, Body)] = &[
    (
        "rollouts_are_refused_numbered_stepped_and_latest_by_creation",
        rollouts_are_refused_numbered_stepped_and_latest_by_creation,
    ),
    ("concurrent_steps_of_one_rollout_end_it_once", concurrent_steps_of_one_rollout_end_it_once),
    (
        "concurrent_starts_get_their_own_ids_and_one_per_group",
        concurrent_starts_get_their_own_ids_and_one_per_group,
    ),
    (
        "a_deployment_changed_as_a_rollout_starts_is_its_baseline_or_refused",
        a_deployment_changed_as_a_rollout_starts_is_its_baseline_or_refused,
    ),
    (
        "a_bundle_pushed_through_several_connections_at_once_is_registered_once",
        a_bundle_pushed_through_several_connections_at_once_is_registered_once,
    ),
    (
        "a_renewal_and_a_revocation_at_once_never_leave_a_renewal_after_the_revocation",
        a_renewal_and_a_revocation_at_once_never_leave_a_renewal_after_the_revocation,
    ),
    (
        "a_rollouts_figures_and_the_consoles_charts_count_the_same_windows",
        a_rollouts_figures_and_the_consoles_charts_count_the_same_windows,
    ),
    (
        "documents_issued_at_once_through_several_connections_never_share_a_version",
        documents_issued_at_once_through_several_connections_never_share_a_version,
    ),
];

const MODEL: &str = "fraud";

/// Versions 1 to 3 of the model, version 1 deployed to each of `groups`.
fn seed(db: &Db, groups: &[&str]) {
    let groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
    db.run_sync(move |sql| {
        for v in 1..=3 {
            db::insert_bundle(&sql, &bundle(MODEL, v))?;
        }
        for g in &groups {
            db::deploy(&sql, g, MODEL, 1, at(0))?;
        }
        Ok(())
    })
    .unwrap();
}

fn request(group: &str, strategy: Strategy, candidate: u64) -> StartRequest {
    StartRequest {
        group: group.into(),
        model: MODEL.into(),
        candidate,
        strategy,
        steps: None,
        step_interval_seconds: None,
        split: None,
        mirror: None,
        guards: Vec::new(),
        min_requests: None,
    }
}

/// Starts a rollout as the API does: one immediate transaction, committed if started.
fn start(db: &Db, request: &StartRequest, now: Timestamp) -> Result<Rollout, StartError> {
    let planned = request.plan().unwrap();
    db.run_sync(move |sql| {
        let tx = sql.transaction_immediate()?;
        let started = rollouts::start(&*tx, &planned, now)?;
        if started.is_ok() {
            tx.commit()?;
        }
        Ok(started)
    })
    .unwrap()
}

/// Acts on `group`'s rollout as the API does.
fn act(db: &Db, group: &str, action: Action, now: Timestamp) -> Result<Rollout, ActError> {
    let group = group.to_owned();
    db.run_sync(move |sql| {
        let tx = sql.transaction_immediate()?;
        let done = rollouts::act(&*tx, &group, MODEL, action, rollouts::OPERATOR, now)?;
        if done.is_ok() {
            tx.commit()?;
        }
        Ok(done)
    })
    .unwrap()
}

fn ids(rollouts: &[Rollout]) -> Vec<&str> {
    rollouts.iter().map(|r| r.id.as_str()).collect()
}

/// The kinds of the events about `subject`, in order.
fn events(db: &Db, subject: &str) -> Vec<String> {
    let subject = subject.to_owned();
    db.run_sync(move |sql| {
        sql.query_map(
            "SELECT kind FROM events WHERE subject = $1 ORDER BY id",
            params![subject],
            |r| r.get(0),
        )
    })
    .unwrap()
}

fn rollouts_are_refused_numbered_stepped_and_latest_by_creation(db: &Db) {
    seed(db, &["edge", "lab"]);
    let first = start(db, &request("edge", Strategy::Ab, 2), at(10)).unwrap();
    assert_eq!(
        (first.id.as_str(), first.baseline, first.state),
        ("ro-1", 1, RolloutState::Running)
    );
    assert_eq!(
        start(db, &request("edge", Strategy::Canary, 3), at(11)),
        Err(StartError::Exists {
            id: "ro-1".into(),
            group: "edge".into(),
            model: MODEL.into(),
            state: RolloutState::Running
        })
    );
    assert!(matches!(
        start(db, &request("lab", Strategy::Ab, 1), at(11)),
        Err(StartError::CandidateIsBaseline { version: 1, .. })
    ));
    assert!(matches!(
        start(db, &request("nowhere", Strategy::Ab, 2), at(11)),
        Err(StartError::NoDeployment { .. })
    ));
    assert!(matches!(
        start(db, &request("lab", Strategy::Ab, 9), at(11)),
        Err(StartError::NoBundle { version: 9, .. })
    ));
    let shadow = start(db, &request("lab", Strategy::Shadow, 3), at(10)).unwrap();
    assert_eq!(shadow.id, "ro-2", "refusals wrote nothing");

    let paused = act(db, "edge", Action::Pause, at(20)).unwrap();
    assert_eq!(paused.state, RolloutState::Paused);
    assert_eq!(
        act(db, "edge", Action::Pause, at(21)),
        Err(ActError::NotAllowed {
            id: "ro-1".into(),
            state: RolloutState::Paused,
            action: Action::Pause
        })
    );
    let aborted = act(db, "edge", Action::Abort, at(30)).unwrap();
    assert_eq!((aborted.state, aborted.ended_at), (RolloutState::Aborted, Some(at(30))));
    // Created in the same second as the first: "latest" is still the one stored last.
    let third = start(db, &request("edge", Strategy::Canary, 3), at(10)).unwrap();
    assert_eq!(third.id, "ro-3");

    let (latest, under_way, all, edge, lab, none, each) = db
        .run_sync(|sql| {
            Ok((
                rollouts::latest(&sql, "edge", MODEL)?,
                rollouts::under_way(&sql, "edge", MODEL)?,
                rollouts::list(&sql, None, None)?,
                rollouts::list(&sql, Some("edge"), None)?,
                rollouts::all_under_way(&sql, Some("lab"))?,
                rollouts::list(&sql, None, Some("other"))?,
                rollouts::latest_each(&sql)?,
            ))
        })
        .unwrap();
    assert_eq!(latest.as_ref(), Some(&third));
    assert_eq!(under_way.as_ref(), Some(&third));
    assert_eq!(ids(&all), ["ro-3", "ro-2", "ro-1"]);
    assert_eq!(ids(&edge), ["ro-3", "ro-1"]);
    assert_eq!(ids(&lab), ["ro-2"]);
    assert!(none.is_empty());
    assert_eq!(ids(&each), ["ro-3", "ro-2"]);
    // Everything round trips: plan, steps, mirror, guards, times.
    assert_eq!(all[2], aborted);
    assert_eq!(all[1], shadow);

    let promoted = act(db, "lab", Action::Promote, at(40)).unwrap();
    assert_eq!(promoted.state, RolloutState::Promoted);
    let (deployed, under_way) = db
        .run_sync(|sql| {
            Ok((db::deployment(&sql, "lab", MODEL)?, rollouts::all_under_way(&sql, None)?))
        })
        .unwrap();
    assert_eq!(deployed, Some(3));
    assert_eq!(ids(&under_way), ["ro-3"]);
    assert!(matches!(act(db, "edge", Action::Resume, at(41)), Err(ActError::NotAllowed { .. })));
    assert!(matches!(act(db, "nowhere", Action::Abort, at(41)), Err(ActError::NoRollout { .. })));
    assert_eq!(events(db, "ro-1"), ["rollout.start", "rollout.pause", "rollout.abort"]);
    assert_eq!(events(db, "ro-2"), ["rollout.start", "rollout.promote"]);
}

/// Operators' actions and the control plane's judgement, on several connections at once
/// (replicas), all deciding to end one rollout: it ends once, with one event. Ten rounds,
/// the deciders let go together each time.
fn concurrent_steps_of_one_rollout_end_it_once(db: &Db) {
    let groups: Vec<String> = (0..10).map(|i| format!("g{i}")).collect();
    seed(db, &groups.iter().map(String::as_str).collect::<Vec<_>>());
    for group in &groups {
        let started = start(db, &request(group, Strategy::Canary, 2), at(0)).unwrap();
        // Past the last step (a canary of 4 steps 10 minutes apart), no guards: the
        // judgement promotes it, as an operator's promote or abort would end it.
        let now = at(4000);
        let together = std::sync::Barrier::new(8);
        let ended: Vec<Option<RolloutState>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (together, id) = (&together, started.id.as_str());
                    s.spawn(move || {
                        together.wait();
                        match i % 3 {
                            0 => db
                                .run_sync(|sql| {
                                    rollouts::judge::judge_one(&sql, id, crate::NO_WEBHOOKS, now)
                                })
                                .unwrap()
                                .and_then(|(_, change)| change)
                                .map(|c| c.rollout.state),
                            1 => act(db, group, Action::Promote, now).ok().map(|r| r.state),
                            _ => act(db, group, Action::Abort, now).ok().map(|r| r.state),
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<RolloutState> = ended.iter().flatten().copied().collect();
        assert_eq!(winners.len(), 1, "one step ends it: {ended:?}");
        let stored = db.run_sync(|sql| rollouts::get(&sql, &started.id)).unwrap().unwrap();
        assert_eq!(stored.state, winners[0]);
        let kinds = events(db, &started.id);
        assert_eq!(kinds.len(), 2, "one start, one end: {kinds:?}");
        let deployed = db.run_sync(|sql| db::deployment(&sql, group, MODEL)).unwrap();
        assert_eq!(deployed, Some(if winners[0] == RolloutState::Promoted { 2 } else { 1 }));
    }
}

/// Starts on several connections at once: two for each group, each pair racing for one
/// group. Every group gets one rollout, each with its own id and place in the order.
fn concurrent_starts_get_their_own_ids_and_one_per_group(db: &Db) {
    let groups = ["g0", "g1", "g2", "g3", "g4", "g5"];
    seed(db, &groups);
    let outcomes: Vec<Result<Rollout, StartError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|i| s.spawn(move || start(db, &request(groups[i / 2], Strategy::Ab, 2), at(5))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let started: BTreeSet<(String, String)> =
        outcomes.iter().flatten().map(|r| (r.group.clone(), r.id.clone())).collect();
    assert_eq!(started.len(), groups.len(), "{outcomes:?}");
    let refused = outcomes.iter().filter(|o| matches!(o, Err(StartError::Exists { .. }))).count();
    assert_eq!(refused, groups.len(), "{outcomes:?}");
    let stored: Vec<(String, i64)> = db
        .run_sync(|sql| {
            sql.query_map("SELECT id, seq FROM rollouts ORDER BY seq", params![], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
        })
        .unwrap();
    assert_eq!(stored.iter().map(|(_, seq)| *seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    let ids: BTreeSet<&str> = stored.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["ro-1", "ro-2", "ro-3", "ro-4", "ro-5", "ro-6"].into_iter().collect());
    let each = db.run_sync(|sql| rollouts::latest_each(&sql)).unwrap();
    assert_eq!(each.iter().map(|r| r.group.as_str()).collect::<Vec<_>>(), groups);
}

/// A deployment changed on one connection while a rollout of the model starts on another
/// (two replicas), eight times, both let go together: either the start comes first and
/// the change is refused (the rollout owns the deployment), or the change comes first and
/// the rollout takes the new version as its baseline. Never a rollout under way whose
/// baseline is not what the group runs.
fn a_deployment_changed_as_a_rollout_starts_is_its_baseline_or_refused(db: &Db) {
    let groups: Vec<String> = (0..8).map(|i| format!("g{i}")).collect();
    seed(db, &groups.iter().map(String::as_str).collect::<Vec<_>>());
    for group in &groups {
        let together = std::sync::Barrier::new(2);
        let (started, changed) = std::thread::scope(|s| {
            let starting = s.spawn(|| {
                together.wait();
                start(db, &request(group, Strategy::Ab, 2), at(5))
            });
            let changing = s.spawn(|| {
                together.wait();
                db.run_sync(|sql| deploy::change(&sql, group, MODEL, Some(3), at(5))).unwrap()
            });
            (starting.join().unwrap(), changing.join().unwrap())
        });
        let rollout = started.unwrap();
        let deployed = db.run_sync(|sql| db::deployment(&sql, group, MODEL)).unwrap();
        match changed {
            Ok(()) => assert_eq!((rollout.baseline, deployed), (3, Some(3)), "{group}"),
            Err(ServiceError::Conflict { code: "rollout_under_way", .. }) => {
                assert_eq!((rollout.baseline, deployed), (1, Some(1)), "{group}");
            }
            Err(e) => panic!("{group}: {e}"),
        }
    }
    // Undeploying is refused while the rollout is under way, as deploying is.
    let refused = db.run_sync(|sql| deploy::change(&sql, "g0", MODEL, None, at(6))).unwrap();
    assert!(matches!(refused, Err(ServiceError::Conflict { code: "rollout_under_way", .. })));
}

/// One bundle pushed through six connections at once (replicas): it is registered once
/// with its reference profile, the others find it, and no push fails.
fn a_bundle_pushed_through_several_connections_at_once_is_registered_once(db: &Db) {
    let row = bundle(MODEL, 7);
    let profile = crate::profile();
    let together = std::sync::Barrier::new(6);
    let found: Vec<Option<db::BundleRow>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    together.wait();
                    db.run_sync(|sql| bundles::record(&sql, &row, Some(&profile))).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(found.iter().filter(|f| f.is_none()).count(), 1, "registered once");
    for existing in found.iter().flatten() {
        assert_eq!(existing.manifest_sha256, row.manifest_sha256);
    }
    let (stored, reference) = db
        .run_sync(|sql| {
            Ok((db::bundles(&sql)?.len(), monitoring::reference(&sql, MODEL, 7)?.is_some()))
        })
        .unwrap();
    assert_eq!((stored, reference), (1, true));
}

/// An agent's certificate renewed on one connection while the agent is revoked on another
/// (two replicas), eight times, both let go together: the renewal is refused, or it is
/// recorded before the revocation, never after it.
fn a_renewal_and_a_revocation_at_once_never_leave_a_renewal_after_the_revocation(db: &Db) {
    for i in 0..8 {
        let agent = format!("agent-{i}");
        db.run_sync(|sql| enrolled(sql, &format!("t{i}"), &agent)).unwrap();
        let together = std::sync::Barrier::new(2);
        let (renewed, revoked) = std::thread::scope(|s| {
            let renewing = s.spawn(|| {
                together.wait();
                let (current, serial) = (format!("serial-{agent}"), format!("renewed-{agent}"));
                db.run_sync(|sql| {
                    quic::record_renewal(&sql, &agent, &current, &serial, at(9000), at(20))
                })
                .unwrap()
            });
            let revoking = s.spawn(|| {
                together.wait();
                db.run_sync(|sql| db::revoke(&sql, &agent, at(20))).unwrap()
            });
            (renewing.join().unwrap(), revoking.join().unwrap())
        });
        assert!(revoked);
        let kinds = events(db, &agent);
        let after = kinds.iter().skip_while(|k| *k != "revoke").any(|k| k == "renew");
        assert!(!after, "{agent}: a renewal recorded after the revocation: {kinds:?}");
        assert_eq!(renewed, kinds.iter().any(|k| k == "renew"), "{agent}: {kinds:?}");
    }
}

/// A rollout's status (`rollouts::view::build`), the console's buckets
/// (`series::buckets`) and its monitoring page (`metrics::read`) over the same windows,
/// with their filters, count the same requests per version.
fn a_rollouts_figures_and_the_consoles_charts_count_the_same_windows(db: &Db) {
    seed(db, &["edge"]);
    let started = start(db, &request("edge", Strategy::Ab, 2), at(0)).unwrap();
    db.run_sync(|sql| {
        enrolled(sql, "t", "a")?;
        // Three windows of version 1 (10 requests each), two of version 2 (7 each).
        let batch: Vec<_> = (1..=5u64)
            .map(|seq| {
                let (version, requests) = if seq <= 3 { (1, 10) } else { (2, 7) };
                window(seq, MODEL, version, at(60 * seq), requests)
            })
            .collect();
        monitoring::insert_windows(&sql, "a", &held(&[(MODEL, 1), (MODEL, 2)]), &batch, at(400))
    })
    .unwrap();
    let query = |group: &str, agent: Option<&str>| MetricsQuery {
        model: MODEL.into(),
        version: None,
        group: Some(group.into()),
        agent: agent.map(str::to_owned),
        since: at(0),
    };
    let (view, edge, of_a, elsewhere, page) = db
        .run_sync(|sql| {
            let filter = metrics::MetricsFilter {
                model: Some(MODEL.into()),
                group: Some("edge".into()),
                ..Default::default()
            };
            Ok((
                rollouts::view::build(&sql, started.clone(), at(600))?,
                series::buckets(&sql, &query("edge", None), at(600), 10)?,
                series::buckets(&sql, &query("edge", Some("a")), at(600), 10)?,
                series::buckets(&sql, &query("other", None), at(600), 10)?,
                metrics::read(&sql, &filter, None, Duration::from_secs(3600), at(600))?,
            ))
        })
        .unwrap();
    let variants = &view.variants;
    assert_eq!((variants.baseline.figures.requests, variants.candidate.figures.requests), (30, 14));
    assert_eq!(view.agents.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["a"]);
    for buckets in [&edge, &of_a] {
        let merged = buckets.merged();
        let requests: Vec<(u64, u64)> =
            merged.iter().map(|(v, r)| (*v, r.rollup.counts.requests)).collect();
        assert_eq!(requests, [(1, 30), (2, 14)]);
    }
    assert!(elsewhere.versions.is_empty());
    let summaries: Vec<(u64, u64)> =
        page.summaries.iter().map(|s| (s.version, s.requests)).collect();
    assert_eq!(summaries, [(1, 30), (2, 14)]);
    assert_eq!((page.models, page.groups), (vec![MODEL.to_owned()], vec!["edge".to_owned()]));
}

/// The daemon's shared state over `db`, with keys, CA and blobs made in `dir`.
fn shared(db: &Db, dir: &std::path::Path) -> Arc<Shared> {
    let now = SystemTime::now();
    let keys_dir = dir.join("keys");
    keys::init(&keys_dir, &keys::InitOptions::new(REGION), now).unwrap();
    let vault = Arc::new(vault::Vault::open_from(&keys_dir, None).unwrap());
    let ca = ca::Ca::load_or_create(&vault, REGION, now).unwrap();
    let keyring = keyring::Keyring::load(&vault, now).unwrap();
    let audit_key = audit::key::load_or_create(&vault).unwrap();
    let blobs = Arc::new(blobs::FsBlobStore::open(&dir.join("blobs")).unwrap());
    Arc::new(Shared::new(db.clone(), blobs, ca, (keyring, vault), audit_key, Policy::default()))
}

/// Documents for one agent (whose group has a rollout under way) asked for at once, as
/// replicas would, each at a time past the last one's half-life, so that each may issue
/// a new version: a version is never given to two different documents, and the stored
/// one is the highest.
fn documents_issued_at_once_through_several_connections_never_share_a_version(db: &Db) {
    seed(db, &["edge"]);
    db.run_sync(|sql| enrolled(sql, "t", "a")).unwrap();
    start(db, &request("edge", Strategy::Canary, 2), at(0)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let shared = shared(db, dir.path());
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
    let base = SystemTime::now();
    let ttl = Policy::default().desired_ttl;
    let documents: Vec<(u64, Vec<u8>)> = runtime.block_on(async {
        let tasks: Vec<_> = (0..24u32)
            .map(|i| {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let signed = shared.desired_for("a", base + ttl * i).await.unwrap();
                    let document: DesiredState = serde_json::from_slice(&signed.document).unwrap();
                    assert_eq!(document.rollouts.len(), 1, "the rollout travels");
                    (document.version, signed.document)
                })
            })
            .collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.unwrap());
        }
        out
    });
    let mut by_version: BTreeMap<u64, BTreeSet<Vec<u8>>> = BTreeMap::new();
    for (version, document) in documents {
        by_version.entry(version).or_default().insert(document);
    }
    let shared_versions: Vec<u64> =
        by_version.iter().filter(|(_, d)| d.len() > 1).map(|(v, _)| *v).collect();
    assert_eq!(shared_versions, Vec::<u64>::new(), "versions given to two documents");
    let stored = db.run_sync(|sql| db::desired(&sql, "a")).unwrap().unwrap();
    assert_eq!(Some(&stored.version), by_version.keys().last());
}
