//! The control plane's storage (`falaj_control::db` through `falaj_control::sql`) on both
//! databases: each test body runs once on SQLite and once on a real PostgreSQL (a cluster
//! made for this run by [`postgres::Cluster`], one database per test), as `NAME::sqlite`
//! and `NAME::postgres`.
//!
//! The binary has its own harness (libtest-mimic, `main` at the end): without PostgreSQL's
//! server programs the PostgreSQL cases are reported as ignored, with the reason, unless
//! `FALAJ_REQUIRE_POSTGRES` is set (as `.ci/run` does): then they fail.

mod auth;
mod events;
mod features;
mod lease;
mod migrate;
mod outbox;
mod postgres;
mod rollouts;
mod starts;

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use falaj_common::alerting::{AlertMetric, AlertRule, DriftScope};
use falaj_common::audit::{Chain, GENESIS, Outcome};
use falaj_common::finetune::{
    DataSource, DesiredJob, Gate, HeadWeights, Hyperparameters, Job, JobReport, JobState,
    TrainEngine,
};
use falaj_common::keys::{Sha256, SigningKey};
use falaj_common::metrics::{Counts, MetricsWindow};
use falaj_common::profile::{ColumnProfile, DataProfile};
use falaj_common::protocol::{ActualState, SequencedWindow};
use falaj_common::time::Timestamp;
use falaj_control::alerts;
use falaj_control::audit::{self, Actor};
use falaj_control::db::{
    self, BundleRow, Db, DbError, IssuedDesired, NewAgent, TokenRefusal, TokenRow, TokenUse,
};
use falaj_control::finetune;
use falaj_control::monitoring::{self, Held, Ingested, MAX_WINDOWS_PER_HOUR, MetricsQuery};
use falaj_control::outbox::{self as notifications, Webhooks};
use falaj_control::sql::{PgOptions, Sql, SqlError, params};
use libtest_mimic::{Completion, Trial};

const REGION: &str = "eu-west-1";

/// Notifications recorded nowhere.
const NO_WEBHOOKS: Webhooks<'static> = Webhooks { urls: &[], region: REGION };

fn at(secs: u64) -> Timestamp {
    Timestamp::from_unix(1_800_000_000 + secs)
}

/// Stores token `id` (group `edge`) and enrolls agent `agent` with it.
fn enrolled(sql: Sql<'_>, id: &str, agent: &str) -> Result<(), SqlError> {
    let secret = Sha256::of(id.as_bytes());
    let token =
        TokenRow { id: id.into(), group: "edge".into(), region: REGION.into(), expires: at(3600) };
    db::insert_token(&sql, &token, secret, at(0))?;
    let used = TokenUse { token_id: id.into(), secret_sha256: secret, csr_sha256: secret };
    let new = new_agent(agent, &format!("serial-{agent}"));
    db::enroll(&mut { sql }, &used, REGION, &new, at(1))?.expect("the token enrolls");
    Ok(())
}

fn new_agent(id: &str, serial: &str) -> NewAgent {
    NewAgent {
        id: id.into(),
        hostname: format!("host-{id}"),
        agent_version: "1.0.0".into(),
        serial: serial.into(),
        cert_expires: at(86_400),
    }
}

fn bundle(name: &str, version: u64) -> BundleRow {
    let hash = |what: &str| Sha256::of(format!("{what} {name} {version}").as_bytes());
    BundleRow {
        name: name.into(),
        version,
        manifest_sha256: hash("manifest"),
        bundle_sha256: hash("bundle"),
        recipe_sha256: hash("recipe"),
        size: 1 << 40,
        chunks: 3,
        pushed_at: at(version),
    }
}

fn issued(version: u64) -> IssuedDesired {
    IssuedDesired {
        version,
        content_sha256: Sha256::of(&version.to_be_bytes()),
        expires: at(version + 600),
        // Not text: bytes as they are.
        signed: vec![0, 0xff, 0xfe, version as u8, 0x80],
    }
}

fn count(db: &Db, table: &'static str) -> i64 {
    db.run_sync(|sql| {
        sql.query_row(&format!("SELECT COUNT(*) FROM {table}"), params![], |r| r.get(0))
    })
    .unwrap()
}

fn a_token_enrolls_exactly_one_agent(db: &Db) {
    let secret = Sha256::of(b"secret");
    let token = |id: &str, region: &str, expires| TokenRow {
        id: id.into(),
        group: "edge".into(),
        region: region.into(),
        expires,
    };
    let used = |id: &str, secret, csr: &str| TokenUse {
        token_id: id.into(),
        secret_sha256: secret,
        csr_sha256: Sha256::of(csr.as_bytes()),
    };
    db.run_sync(|sql| {
        db::insert_token(&sql, &token("t1", REGION, at(100)), secret, at(0))?;
        db::insert_token(&sql, &token("t2", "us-east-1", at(100)), secret, at(0))?;
        db::insert_token(&sql, &token("t3", REGION, at(10)), secret, at(0))
    })
    .unwrap();
    let enroll = |token: TokenUse, agent: &str, serial: &str, now| {
        let new = new_agent(agent, serial);
        db.run_sync(move |mut sql| db::enroll(&mut sql, &token, REGION, &new, now)).unwrap()
    };
    assert_eq!(
        enroll(used("t1", Sha256::of(b"wrong"), "csr-a"), "a", "s0", at(5)),
        Err(TokenRefusal::Unknown)
    );
    assert_eq!(enroll(used("nope", secret, "csr-a"), "a", "s0", at(5)), Err(TokenRefusal::Unknown));
    assert_eq!(enroll(used("t1", secret, "csr-a"), "a", "s1", at(5)), Ok("edge".to_owned()));
    assert_eq!(enroll(used("t1", secret, "csr-b"), "b", "s2", at(6)), Err(TokenRefusal::Used));
    // The same agent with the same request: an interrupted enrollment, finished again.
    assert_eq!(enroll(used("t1", secret, "csr-a"), "a", "s3", at(7)), Ok("edge".to_owned()));
    assert!(matches!(
        enroll(used("t2", secret, "csr-c"), "c", "s4", at(5)),
        Err(TokenRefusal::WrongRegion { .. })
    ));
    assert_eq!(
        enroll(used("t3", secret, "csr-d"), "d", "s5", at(10)),
        Err(TokenRefusal::Expired(at(10)))
    );

    let (by, agents, valid, stale) = db
        .run_sync(|sql| {
            Ok((
                db::enrolled_by(&sql, &used("t1", secret, "csr-a"))?,
                db::agents(&sql)?,
                db::certificate_valid(&sql, "a", "s3")?,
                db::certificate_valid(&sql, "a", "s2")?,
            ))
        })
        .unwrap();
    assert_eq!(by.as_deref(), Some("a"));
    assert_eq!(agents.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["a"]);
    let a = &agents[0];
    assert_eq!(
        (a.hostname.as_str(), a.group.as_str(), a.region.as_str()),
        ("host-a", "edge", REGION)
    );
    assert_eq!((a.enrolled_at, a.last_seen, a.revoked_at), (at(5), None, None));
    assert!(valid && !stale);
    assert_eq!(count(db, "certificates"), 2);

    assert!(db.run_sync(|sql| db::revoke(&sql, "a", at(20))).unwrap());
    assert!(!db.run_sync(|sql| db::revoke(&sql, "nobody", at(20))).unwrap());
    let (agent, valid, by, group) = db
        .run_sync(|sql| {
            Ok((
                db::agent(&sql, "a")?.unwrap(),
                db::certificate_valid(&sql, "a", "s3")?,
                db::enrolled_by(&sql, &used("t1", secret, "csr-a"))?,
                db::group_agents(&sql, "edge")?,
            ))
        })
        .unwrap();
    assert_eq!(agent.revoked_at, Some(at(20)));
    assert!(!valid);
    assert_eq!(by, None);
    assert!(group.is_empty());
}

fn concurrent_enrollments_with_one_token_enroll_one_agent(db: &Db) {
    let secret = Sha256::of(b"secret");
    let token =
        TokenRow { id: "t".into(), group: "edge".into(), region: REGION.into(), expires: at(100) };
    db.run_sync(|sql| db::insert_token(&sql, &token, secret, at(0))).unwrap();
    let outcomes: Vec<Result<String, TokenRefusal>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|i| {
                s.spawn(move || {
                    let used = TokenUse {
                        token_id: "t".into(),
                        secret_sha256: secret,
                        csr_sha256: Sha256::of(format!("csr {i}").as_bytes()),
                    };
                    let new = new_agent(&format!("agent-{i}"), &format!("serial-{i}"));
                    db.run_sync(move |mut sql| db::enroll(&mut sql, &used, REGION, &new, at(1)))
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "{outcomes:?}");
    assert!(outcomes.iter().all(|o| matches!(o, Ok(_) | Err(TokenRefusal::Used))), "{outcomes:?}");
    assert_eq!(count(db, "agents"), 1);
}

fn bundles_and_deployments_round_trip(db: &Db) {
    let (one, two, other) = (bundle("fraud", 1), bundle("fraud", 2), bundle("churn", 7));
    db.run_sync(|sql| {
        for b in [&one, &two, &other] {
            db::insert_bundle(&sql, b)?;
        }
        db::deploy(&sql, "edge", "fraud", 1, at(10))?;
        db::deploy(&sql, "edge", "churn", 7, at(10))?;
        db::deploy(&sql, "core", "fraud", 1, at(10))?;
        // Deploying again replaces the version.
        db::deploy(&sql, "edge", "fraud", 2, at(11))
    })
    .unwrap();
    let (fetched, missing, all, edge, every, version) = db
        .run_sync(|sql| {
            Ok((
                db::bundle(&sql, "fraud", 2)?,
                db::bundle(&sql, "fraud", 3)?,
                db::bundles(&sql)?,
                db::deployments(&sql, "edge")?,
                db::all_deployments(&sql)?,
                db::deployment(&sql, "edge", "fraud")?,
            ))
        })
        .unwrap();
    assert_eq!(fetched.as_ref(), Some(&two));
    assert_eq!(missing, None);
    assert_eq!(all, [other.clone(), one.clone(), two.clone()]);
    assert_eq!(edge, [other.clone(), two.clone()]);
    assert_eq!(
        every,
        [
            ("core".to_owned(), "fraud".to_owned(), 1),
            ("edge".to_owned(), "churn".to_owned(), 7),
            ("edge".to_owned(), "fraud".to_owned(), 2),
        ]
    );
    assert_eq!(version, Some(2));

    let resigned = BundleRow { bundle_sha256: Sha256::of(b"re-signed"), size: 99, ..two.clone() };
    let (removed, again, left, stored) = db
        .run_sync(|sql| {
            db::re_sign_bundle(&sql, &two, &resigned)?;
            Ok((
                db::undeploy(&sql, "edge", "fraud", at(12))?,
                db::undeploy(&sql, "edge", "fraud", at(13))?,
                db::deployment(&sql, "edge", "fraud")?,
                db::bundle(&sql, "fraud", 2)?,
            ))
        })
        .unwrap();
    assert!(removed && !again);
    assert_eq!(left, None);
    assert_eq!(stored, Some(resigned));
    // A deployment names a bundle that exists.
    let err = db.run_sync(|sql| db::deploy(&sql, "edge", "fraud", 9, at(14))).unwrap_err();
    assert!(matches!(err, DbError::Sql { .. }), "{err}");
}

fn desired_versions_only_go_up(db: &Db) {
    db.run_sync(|sql| enrolled(sql, "t", "a")).unwrap();
    let put = |v| db.run_sync(move |sql| db::put_desired(&sql, "a", &issued(v))).unwrap();
    assert_eq!(db.run_sync(|sql| db::desired(&sql, "a")).unwrap().map(|d| d.version), None);
    assert!(put(1));
    assert!(!put(1));
    assert!(put(3));
    assert!(!put(2));
    let stored = db.run_sync(|sql| db::desired(&sql, "a")).unwrap().unwrap();
    let want = issued(3);
    assert_eq!(
        (stored.version, stored.content_sha256, stored.expires, stored.signed),
        (want.version, want.content_sha256, want.expires, want.signed)
    );
}

fn concurrent_issuers_never_reuse_a_desired_version(db: &Db) {
    db.run_sync(|sql| enrolled(sql, "t", "a")).unwrap();
    let issue = || {
        db.run_sync(|sql| {
            let tx = sql.transaction_immediate()?;
            let previous = db::desired_for_update(&*tx, "a")?;
            let version = previous.map_or(1, |p| p.version + 1);
            let stored = db::put_desired(&*tx, "a", &issued(version))?;
            tx.commit()?;
            Ok((version, stored))
        })
        .unwrap()
    };
    let issued: Vec<(u64, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..4).map(|_| s.spawn(move || (0..10).map(|_| issue()).collect::<Vec<_>>())).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert!(issued.iter().all(|(_, stored)| *stored), "a document was not stored: {issued:?}");
    let versions: BTreeSet<u64> = issued.iter().map(|(v, _)| *v).collect();
    assert_eq!(versions, (1..=40).collect(), "a version was issued twice");
    assert_eq!(db.run_sync(|sql| db::desired(&sql, "a")).unwrap().unwrap().version, 40);
}

fn settings_and_what_agents_report_are_kept(db: &Db) {
    db.run_sync(|sql| {
        db::set_setting(&sql, "ca", "one")?;
        db::set_setting(&sql, "ca", "two")?;
        enrolled(sql, "t1", "a")?;
        enrolled(sql, "t2", "b")
    })
    .unwrap();
    let actual = ActualState {
        desired_version: Some(4),
        agent_version: "1.2.3".into(),
        ready: true,
        ..ActualState::default()
    };
    let seen = vec![("a".to_owned(), at(50), Some(actual.clone())), ("b".to_owned(), at(60), None)];
    db.run_sync(move |mut sql| db::record_seen(&mut sql, &seen)).unwrap();
    let (setting, none, a, b) = db
        .run_sync(|sql| {
            Ok((
                db::setting(&sql, "ca")?,
                db::setting(&sql, "nope")?,
                db::agent(&sql, "a")?.unwrap(),
                db::agent(&sql, "b")?.unwrap(),
            ))
        })
        .unwrap();
    assert_eq!((setting.as_deref(), none), (Some("two"), None));
    assert_eq!(
        (a.last_seen, a.agent_version.as_str(), a.actual),
        (Some(at(50)), "1.2.3", Some(actual))
    );
    assert_eq!((b.last_seen, b.agent_version.as_str(), b.actual), (Some(at(60)), "1.0.0", None));
}

fn a_transaction_not_committed_leaves_nothing(db: &Db) {
    let token = |id: &str| TokenRow {
        id: id.into(),
        group: "g".into(),
        region: REGION.into(),
        expires: at(9),
    };
    let secret = Sha256::of(b"s");
    db.run_sync(|sql| {
        let outer = sql.transaction()?;
        db::insert_token(&*outer, &token("kept"), secret, at(0))?;
        {
            let inner = outer.transaction()?;
            db::insert_token(&*inner, &token("inner, rolled back"), secret, at(0))?;
        }
        let inner = outer.transaction()?;
        db::insert_token(&*inner, &token("inner, committed"), secret, at(0))?;
        inner.commit()?;
        outer.commit()?;
        let dropped = sql.transaction()?;
        db::insert_token(&*dropped, &token("dropped"), secret, at(0))?;
        Ok(())
    })
    .unwrap();
    let ids = db
        .run_sync(|sql| {
            sql.query_map("SELECT id FROM tokens ORDER BY id", params![], |r| r.get::<String>(0))
        })
        .unwrap();
    assert_eq!(ids, ["inner, committed", "kept"]);
    // Each change and its audit entry commit together.
    assert_eq!(count(db, "events"), 2);
    assert_eq!(count(db, "audit"), 2);
}

fn every_change_lands_in_one_unbroken_audit_chain(db: &Db) {
    for b in 1..=3 {
        db.run_sync(move |sql| db::insert_bundle(&sql, &bundle("m", b))).unwrap();
    }
    // Writers at once: the chain stays one line of entries.
    std::thread::scope(|s| {
        for t in 0..4 {
            s.spawn(move || {
                for i in 0..5 {
                    let group = format!("g{t}");
                    db.run_sync(move |sql| db::deploy(&sql, &group, "m", 1 + (i % 3), at(i)))
                        .unwrap();
                }
            });
        }
    });
    let rows: Vec<(i64, String)> = db
        .run_sync(|sql| {
            sql.query_map("SELECT seq, line FROM audit ORDER BY seq", params![], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
        })
        .unwrap();
    assert_eq!(rows.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=23).collect::<Vec<_>>());
    let head = db.run_sync(|sql| audit::head(&sql)).unwrap();
    let (key, _) = SigningKey::generate(&ring::rand::SystemRandom::new()).unwrap();
    let checkpoint = falaj_common::audit::Checkpoint::sign(head.seq, head.head, at(99), &key);
    let mut lines: Vec<String> = rows.into_iter().map(|(_, line)| line).collect();
    lines.push(checkpoint.line());
    let verified =
        falaj_common::audit::verify(lines.iter().map(String::as_str), &[key.public()]).unwrap();
    assert_eq!(verified.entries, 23);
    assert_eq!(count(db, "events"), 23);
}

fn a_request_runs_on_the_blocking_pool_with_its_actor_in_the_audit_entry(db: &Db) {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let actor = Actor::new("user:alice", Some("192.0.2.7:4711".into()));
    let (db, also) = (db.clone(), db.clone());
    let set = async move {
        db.run(|sql| db::set_setting(&sql, "k", "v")).await?;
        db.run(|sql| db::insert_bundle(&sql, &bundle("m", 1))).await
    };
    runtime.block_on(audit::acting(actor, set)).unwrap();
    // Without an actor: the control plane itself.
    runtime.block_on(also.run(|sql| db::deploy(&sql, "edge", "m", 1, at(5)))).unwrap();
    let actors = also
        .run_sync(|sql| {
            sql.query_map("SELECT actor, action FROM audit ORDER BY seq", params![], |r| {
                Ok((r.get::<String>(0)?, r.get::<String>(1)?))
            })
        })
        .unwrap();
    assert_eq!(
        actors,
        [("user:alice".to_owned(), "push".to_owned()), ("system".to_owned(), "deploy".to_owned())]
    );
    assert_eq!(
        runtime.block_on(also.run(|sql| db::setting(&sql, "k"))).unwrap().as_deref(),
        Some("v")
    );
}

// ---- monitoring ----

fn profile() -> DataProfile {
    let values: Vec<f64> = (0..100).map(f64::from).collect();
    DataProfile {
        rows: 100,
        inputs: vec![ColumnProfile::of("x", 0, "temperature", &values, 4)],
        outputs: vec![],
    }
}

fn window(seq: u64, model: &str, version: u64, start: Timestamp, requests: u64) -> SequencedWindow {
    SequencedWindow {
        seq,
        window: MetricsWindow {
            model: model.into(),
            version,
            start,
            seconds: 60,
            counts: Counts { requests, errors: 1, ..Counts::default() },
        },
    }
}

fn held(versions: &[(&str, u64)]) -> Held {
    versions.iter().map(|&(m, v)| (m.to_owned(), v)).collect()
}

/// Several agents' batches in one transaction (the daemon's group commit): each is answered
/// as it would be on its own, and a failure stores none of them.
fn batches_of_several_agents_commit_together_each_answered_as_alone(db: &Db) {
    let now = at(10_000);
    db.run_sync(|sql| {
        enrolled(sql, "t1", "a")?;
        enrolled(sql, "t2", "b")?;
        db::insert_bundle(&sql, &bundle("fraud", 1))
    })
    .unwrap();
    let held = held(&[("fraud", 1)]);
    let delivery = |agent: &str, windows: &[SequencedWindow]| monitoring::Delivery {
        agent: agent.into(),
        held: held.clone(),
        windows: windows.to_vec(),
    };
    let first = [window(1, "fraud", 1, at(1000), 10), window(2, "fraud", 1, at(1060), 20)];
    db.run_sync(|sql| monitoring::insert_windows(&sql, "a", &held, &first[..1], now)).unwrap();
    let grouped = [
        // One stored before, one new.
        delivery("a", &first),
        // Not held: refused; then one stored.
        delivery("b", &[window(1, "fraud", 2, at(1000), 5), window(2, "fraud", 1, at(1000), 7)]),
    ];
    let answers = db.run_sync(|sql| monitoring::insert_deliveries(&sql, &grouped, now)).unwrap();
    assert_eq!(
        answers,
        vec![
            Ingested { stored: vec![1], duplicates: 1, rejected: 0 },
            Ingested { stored: vec![1], duplicates: 0, rejected: 1 },
        ]
    );
    assert_eq!(db.run_sync(|sql| monitoring::stored(&sql)).unwrap().0, 3);

    // A batch of an agent the database does not know fails the transaction (its foreign
    // key): nothing of the group stays.
    let failing = [
        delivery("b", &[window(3, "fraud", 1, at(1120), 9)]),
        delivery("ghost", &[window(1, "fraud", 1, at(1120), 1)]),
    ];
    let failed = db.run_sync(|sql| monitoring::insert_deliveries(&sql, &failing, now));
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(db.run_sync(|sql| monitoring::stored(&sql)).unwrap().0, 3);
}

/// An agent stores at most [`MAX_WINDOWS_PER_HOUR`] windows per model, version and hour;
/// within a group commit the counts run on from batch to batch, and a window sent twice
/// is stored once.
fn an_agent_stores_at_most_an_hour_of_windows_per_hour_and_resends_are_duplicates(db: &Db) {
    let now = at(7200);
    db.run_sync(|sql| enrolled(sql, "t1", "a")).unwrap();
    let held = held(&[("fault", 1), ("churn", 1)]);
    let limit = MAX_WINDOWS_PER_HOUR;
    // The first hour full; the second one window short of full.
    let first: Vec<_> = (0..limit).map(|i| window(i + 1, "fault", 1, at(i), 1)).collect();
    let second: Vec<_> =
        (0..limit - 1).map(|i| window(10_001 + i, "fault", 1, at(3600 + i), 1)).collect();
    let (first, second) = db
        .run_sync(|sql| {
            Ok((
                monitoring::insert_windows(&sql, "a", &held, &first, now)?,
                monitoring::insert_windows(&sql, "a", &held, &second, now)?,
            ))
        })
        .unwrap();
    assert_eq!((first.stored.len() as u64, first.rejected), (limit, 0));
    assert_eq!((second.stored.len() as u64, second.rejected), (limit - 1, 0));

    let delivery = |windows: Vec<SequencedWindow>| monitoring::Delivery {
        agent: "a".into(),
        held: held.clone(),
        windows,
    };
    let group = [
        delivery(vec![
            // The first hour is full.
            window(20_001, "fault", 1, at(10), 1),
            // The second hour's last place.
            window(20_002, "fault", 1, at(3600), 1),
            // Another model's hour is its own.
            window(20_003, "churn", 1, at(10), 1),
            // Stored before.
            window(1, "fault", 1, at(0), 1),
        ]),
        delivery(vec![
            // Sent again in the same group.
            window(20_002, "fault", 1, at(3600), 1),
            // The second hour is now full.
            window(20_004, "fault", 1, at(3601), 1),
            window(20_005, "churn", 1, at(11), 1),
        ]),
    ];
    let answers = db.run_sync(|sql| monitoring::insert_deliveries(&sql, &group, now)).unwrap();
    assert_eq!(
        answers,
        vec![
            Ingested { stored: vec![1, 2], duplicates: 1, rejected: 1 },
            Ingested { stored: vec![2], duplicates: 1, rejected: 1 },
        ]
    );
    assert_eq!(db.run_sync(|sql| monitoring::stored(&sql)).unwrap().0, 2 * limit + 2);
}

fn metric_windows_are_stored_once_and_rolled_up_by_version(db: &Db) {
    let now = at(10_000);
    db.run_sync(|sql| {
        enrolled(sql, "t1", "a")?;
        enrolled(sql, "t2", "b")?;
        for b in [bundle("fraud", 1), bundle("fraud", 2)] {
            db::insert_bundle(&sql, &b)?;
        }
        monitoring::set_reference(&sql, "fraud", 1, &profile())
    })
    .unwrap();
    let batch = [
        window(1, "fraud", 1, at(1000), 10),
        window(2, "fraud", 2, at(1060), 20),
        // Not held.
        window(3, "fraud", 3, at(1060), 30),
        // An hour ahead of the control plane's clock.
        window(4, "fraud", 1, at(13_600), 40),
    ];
    let held = held(&[("fraud", 1), ("fraud", 2)]);
    let (a, again, b) = db
        .run_sync(|sql| {
            Ok((
                monitoring::insert_windows(&sql, "a", &held, &batch, now)?,
                // Resent after a lost acknowledgement.
                monitoring::insert_windows(&sql, "a", &held, &batch[..2], now)?,
                // Another agent's sequence numbers are its own.
                monitoring::insert_windows(&sql, "b", &held, &batch[..1], at(10_001))?,
            ))
        })
        .unwrap();
    assert_eq!(a, Ingested { stored: vec![0, 1], duplicates: 0, rejected: 2 });
    assert_eq!(again, Ingested { stored: vec![], duplicates: 2, rejected: 0 });
    assert_eq!(b, Ingested { stored: vec![0], duplicates: 0, rejected: 0 });
    assert_eq!(db.run_sync(|sql| monitoring::stored(&sql)).unwrap(), (3, Some(at(10_001))));

    let query = |version, group: Option<&str>, agent: Option<&str>| MetricsQuery {
        model: "fraud".into(),
        version,
        group: group.map(str::to_owned),
        agent: agent.map(str::to_owned),
        since: at(0),
    };
    let all = db.run_sync(move |sql| monitoring::rollups(&sql, &query(None, None, None))).unwrap();
    assert_eq!(all.keys().copied().collect::<Vec<_>>(), [1, 2]);
    let one = &all[&1];
    assert_eq!(one.agents.iter().map(String::as_str).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!((one.rollup.windows, one.rollup.counts.requests), (2, 20));
    assert_eq!((one.first, one.last, one.span_seconds()), (at(1000).unix(), at(1060).unix(), 60));
    assert_eq!(all[&2].rollup.counts.requests, 20);
    let versions = |q: MetricsQuery, until: Option<Timestamp>| {
        db.run_sync(move |sql| monitoring::rollups_between(&sql, &q, until))
            .unwrap()
            .into_iter()
            .map(|(v, r)| (v, r.rollup.windows))
            .collect::<Vec<_>>()
    };
    assert_eq!(versions(query(Some(2), None, None), None), [(2, 1)]);
    assert_eq!(versions(query(None, None, Some("b")), None), [(1, 1)]);
    assert_eq!(versions(query(None, Some("edge"), None), None), [(1, 2), (2, 1)]);
    assert_eq!(versions(query(None, Some("core"), None), None), []);
    assert_eq!(versions(query(None, None, None), Some(at(1059))), [(1, 2)]);
    assert_eq!(
        versions(MetricsQuery { since: at(1001), ..query(None, None, None) }, None),
        [(2, 1)]
    );

    let (summaries, reference, none) = db
        .run_sync(move |sql| {
            Ok((
                monitoring::summaries(&sql, &query(None, None, None))?,
                monitoring::reference(&sql, "fraud", 1)?,
                monitoring::reference(&sql, "fraud", 2)?,
            ))
        })
        .unwrap();
    assert_eq!(reference, Some(profile()));
    assert_eq!(none, None);
    let brief: Vec<_> =
        summaries.iter().map(|s| (s.version, s.agents, s.requests, s.drift.is_some())).collect();
    assert_eq!(brief, [(1, 2, 20, true), (2, 1, 20, false)]);

    assert_eq!(db.run_sync(|sql| monitoring::prune(&sql, at(1060))).unwrap(), 2);
    assert_eq!(db.run_sync(|sql| monitoring::stored(&sql)).unwrap(), (1, Some(at(10_000))));
}

fn a_batch_sent_twice_at_once_is_stored_once(db: &Db) {
    db.run_sync(|sql| {
        enrolled(sql, "t1", "a")?;
        db::insert_bundle(&sql, &bundle("fraud", 1))
    })
    .unwrap();
    let batch: Vec<_> = (1..=20).map(|i| window(i, "fraud", 1, at(i * 60), 1)).collect();
    let held = held(&[("fraud", 1)]);
    // As from an agent that reconnected to another replica and resent its outbox.
    let outcomes: Vec<Ingested> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    db.run_sync(|sql| {
                        monitoring::insert_windows(&sql, "a", &held, &batch, at(2000))
                    })
                    .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let stored: usize = outcomes.iter().map(|o| o.stored.len()).sum();
    let duplicates: u64 = outcomes.iter().map(|o| o.duplicates).sum();
    assert_eq!((stored, duplicates), (20, 60), "{outcomes:?}");
    assert_eq!(count(db, "windows"), 20);
}

// ---- alerts ----

fn rule(name: &str, metric: AlertMetric, threshold: f64) -> AlertRule {
    AlertRule {
        name: name.into(),
        model: "fraud".into(),
        metric,
        column: None,
        scope: DriftScope::All,
        group: Some("edge".into()),
        threshold,
        window: std::time::Duration::from_secs(600),
        min_count: 1,
        retrain: None,
    }
}

fn an_alert_fires_once_and_resolves_with_its_events_recorded(db: &Db) {
    db.run_sync(|sql| {
        enrolled(sql, "t1", "a")?;
        db::insert_bundle(&sql, &bundle("fraud", 1))?;
        monitoring::set_reference(&sql, "fraud", 1, &profile())
    })
    .unwrap();
    let held = held(&[("fraud", 1)]);
    // Half the requests fail.
    let failing = [window(1, "fraud", 1, at(1000), 2)];
    db.run_sync(|sql| monitoring::insert_windows(&sql, "a", &held, &failing, at(1060))).unwrap();
    let rules = [
        rule("errors", AlertMetric::ErrorRate, 0.1),
        // Reads the reference profile; never fires.
        rule("drift", AlertMetric::Psi, 1e12),
    ];
    let hooks = ["https://chat.example/hook".to_owned(), "http://pager.example/".to_owned()];
    let webhooks = Webhooks { urls: &hooks, region: REGION };
    let evaluate = |now| {
        db.run_sync(|sql| alerts::evaluate_rules(&sql, &rules, webhooks, now))
            .unwrap()
            .into_iter()
            .map(|(rule, n)| (rule.name, n.event.id, n.event.subject, n.event.state, n.region))
            .collect::<Vec<_>>()
    };
    let fired = evaluate(at(1100));
    assert_eq!(fired.len(), 1, "{fired:?}");
    let (name, fired_id, subject, state, region) = fired[0].clone();
    assert_eq!((name.as_str(), subject.as_str(), state.as_str()), ("errors", "fraud@1", "firing"));
    assert_eq!(region, REGION);
    // Its notification waits in the outbox for each webhook, due at once.
    let pending = db.run_sync(|sql| notifications::pending(&sql, 100)).unwrap();
    let told = |p: &notifications::Pending| {
        let body: serde_json::Value = serde_json::from_slice(&p.body).unwrap();
        (p.url.clone(), body["id"].as_u64().unwrap(), body["state"].as_str().unwrap().to_owned())
    };
    let fired_told = |url: &str| (url.to_owned(), fired_id, "firing".to_owned());
    let expected: Vec<_> = hooks.iter().map(|h| fired_told(h)).collect();
    assert_eq!(pending.iter().map(told).collect::<Vec<_>>(), expected);
    assert!(pending.iter().all(|p| (p.next_at, p.attempts) == (at(1100), 0)), "{pending:?}");
    assert_ne!(pending[0].delivery, pending[1].delivery);
    let firing = db.run_sync(|sql| alerts::firing(&sql)).unwrap();
    assert_eq!(firing, [("errors".to_owned(), "fraud@1".to_owned(), at(1100), 0.5)]);
    // Still failing: nothing new.
    assert_eq!(evaluate(at(1200)), []);

    // Later, one failure in a hundred, and the failing window out of the rule's window.
    let better = [window(2, "fraud", 1, at(2000), 100)];
    db.run_sync(|sql| monitoring::insert_windows(&sql, "a", &held, &better, at(2060))).unwrap();
    let resolved = evaluate(at(2100));
    assert_eq!(resolved.len(), 1, "{resolved:?}");
    assert_eq!(resolved[0].3, "resolved");
    assert!(resolved[0].1 > fired_id);
    let pending = db.run_sync(|sql| notifications::pending(&sql, 100)).unwrap();
    let resolved_told = |url: &str| (url.to_owned(), resolved[0].1, "resolved".to_owned());
    let expected: Vec<_> =
        hooks.iter().map(|h| fired_told(h)).chain(hooks.iter().map(|h| resolved_told(h))).collect();
    assert_eq!(pending.iter().map(told).collect::<Vec<_>>(), expected);
    let (firing, events) =
        db.run_sync(|sql| Ok((alerts::firing(&sql)?, alerts::events(&sql, 10)?))).unwrap();
    assert_eq!(firing, []);
    let brief: Vec<_> =
        events.iter().map(|e| (e.id, e.at, e.state.as_str(), e.metric.as_str(), e.value)).collect();
    assert_eq!(
        brief,
        [
            (resolved[0].1, at(2100), "resolved", "error_rate", 0.01),
            (fired_id, at(1100), "firing", "error_rate", 0.5)
        ]
    );
    assert_eq!(db.run_sync(|sql| alerts::events(&sql, 1)).unwrap().len(), 1);
}

// ---- fine-tune jobs ----

fn job(id: &str, share_weights: bool) -> DesiredJob {
    DesiredJob {
        id: id.into(),
        job: Job {
            model: "fraud".into(),
            version: Some(1),
            data: DataSource {
                file: "/var/lib/site/rows.csv".into(),
                label: "fraud".into(),
                features: None,
                entity: None,
            },
            hyperparameters: Hyperparameters::default(),
            gate: Gate::default(),
            engine: TrainEngine::Cpu,
        },
        share_weights,
    }
}

fn report(id: &str, state: JobState, weights: bool) -> JobReport {
    JobReport {
        weights: weights.then(|| HeadWeights {
            inputs: 2,
            outputs: 1,
            weights: vec![0.5, -0.25],
            bias: vec![0.125],
        }),
        ..JobReport::state(id, state)
    }
}

fn finetune_jobs_travel_until_reported_finished_and_keep_only_allowed_weights(db: &Db) {
    let (first, placed_again, second, next) = db
        .run_sync(|sql| {
            enrolled(sql, "t1", "a")?;
            enrolled(sql, "t2", "b")?;
            let id = finetune::next_id(&sql)?;
            let first = finetune::order(&sql, "a", &job(&id, false), at(10))?;
            let again = finetune::order(&sql, "b", &job(&id, true), at(11))?;
            let second = finetune::order(&sql, "a", &job("ft-2", true), at(20))?;
            Ok(((id, first), again, second, finetune::next_id(&sql)?))
        })
        .unwrap();
    assert_eq!((first, placed_again, second), (("ft-1".to_owned(), true), false, true));
    assert_eq!(next, "ft-3");
    let open = |agent: &'static str| {
        db.run_sync(move |sql| finetune::open_jobs(&sql, agent))
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(open("a"), ["ft-1", "ft-2"]);
    assert_eq!(open("b"), Vec::<String>::new());

    // Reports ride on what agents say of themselves; another agent's report of a job is
    // not taken.
    let state =
        |jobs| ActualState { agent_version: "1.0.0".into(), jobs, ..ActualState::default() };
    let seen = vec![
        (
            "a".to_owned(),
            at(30),
            Some(state(vec![
                report("ft-1", JobState::Running, false),
                report("ft-2", JobState::Succeeded, true),
            ])),
        ),
        ("b".to_owned(), at(30), Some(state(vec![report("ft-1", JobState::Failed, false)]))),
    ];
    db.run_sync(move |mut sql| db::record_seen(&mut sql, &seen)).unwrap();
    let (one, two, agent) = db
        .run_sync(|sql| {
            Ok((
                finetune::get(&sql, "ft-1")?.unwrap(),
                finetune::get(&sql, "ft-2")?.unwrap(),
                db::agent(&sql, "a")?.unwrap(),
            ))
        })
        .unwrap();
    assert_eq!((one.state.as_str(), one.updated_at, one.created_at), ("running", at(30), at(10)));
    assert_eq!(two.state, "succeeded");
    assert!(two.report.unwrap().weights.is_some(), "its order allowed the weights");
    // Not again in the agent's last state.
    assert!(agent.actual.unwrap().jobs.iter().all(|j| j.weights.is_none()));
    assert_eq!(open("a"), ["ft-1"]);

    db.run_sync(|sql| {
        finetune::record_reports(&sql, "a", &[report("ft-1", JobState::Succeeded, true)], at(40))?;
        // Finished: no longer changes.
        finetune::record_reports(&sql, "a", &[report("ft-1", JobState::Failed, false)], at(50))
    })
    .unwrap();
    let (one, list, kinds) = db
        .run_sync(|sql| {
            Ok((
                finetune::get(&sql, "ft-1")?.unwrap(),
                finetune::list(&sql)?,
                sql.query_map(
                    "SELECT kind, subject FROM events WHERE kind LIKE 'finetune.%' ORDER BY id",
                    params![],
                    |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)),
                )?,
            ))
        })
        .unwrap();
    assert_eq!((one.state.as_str(), one.updated_at), ("succeeded", at(40)));
    assert_eq!(one.report.unwrap().weights, None, "weights its order did not allow");
    assert_eq!(open("a"), Vec::<String>::new());
    assert_eq!(list.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["ft-2", "ft-1"]);
    assert_eq!(list[1].order, job("ft-1", false));
    let kinds: Vec<_> = kinds.iter().map(|(k, s)| format!("{k} {s}")).collect();
    assert_eq!(
        kinds,
        [
            "finetune.order ft-1",
            "finetune.order ft-2",
            "finetune.finished ft-2",
            "finetune.weights ft-2",
            "finetune.finished ft-1"
        ]
    );
}

// ---- agents' audit chains ----

fn agent_chain(n: u64) -> Vec<String> {
    let mut chain = Chain::at(0, GENESIS);
    (0..n)
        .map(|i| {
            chain
                .append(
                    at(i),
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

fn an_agents_chain_is_stored_in_order_once_and_breaks_are_refused_and_recorded(db: &Db) {
    db.run_sync(|sql| enrolled(sql, "t1", "a")).unwrap();
    let lines = agent_chain(6);
    let put = |batch: &[String]| {
        let batch = batch.to_vec();
        db.run_sync(move |sql| audit::agents::store(&sql, "a", &batch, at(100))).unwrap()
    };
    assert_eq!(put(&lines[..3]), Ok(3));
    assert_eq!(put(&lines[1..5]), Ok(5), "a batch sent again overlaps");
    assert_eq!(put(&lines[..1]), Ok(5));
    let changed = put(&[lines[2].replace("fault", "fauLt")]).unwrap_err();
    assert!(changed.contains("entry 3 of agent a differs"), "{changed}");
    // Another entry 6, new and stored... until entry 7 does not chain to it: the batch is
    // refused whole (the real entry 6 is taken below).
    let seven = agent_chain(7);
    let forked = [seven[5].replace("install", "remove"), seven[6].clone()];
    let refused = put(&forked).unwrap_err();
    assert!(refused.contains("entry 7 of agent a does not chain to entry 6"), "{refused}");
    let gap = put(&agent_chain(9)[7..]).unwrap_err();
    assert!(gap.contains("entry 8 of agent a follows entry 5"), "{gap}");
    assert_eq!(put(&lines[5..]), Ok(6));
    let (stored, refusals) = db
        .run_sync(|sql| {
            Ok((
                audit::agents::lines(&sql, "a")?,
                sql.query_map(
                    "SELECT target, outcome FROM audit WHERE action = 'agent.audit' ORDER BY seq",
                    params![],
                    |r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)),
                )?,
            ))
        })
        .unwrap();
    assert_eq!(stored, lines);
    assert_eq!(refusals, vec![("a".to_owned(), "refused".to_owned()); 3]);
    assert_eq!(
        db.run_sync(|sql| audit::agents::lines(&sql, "nobody")).unwrap(),
        Vec::<String>::new()
    );
}

fn one_chain_sent_at_once_through_several_connections_is_stored_once(db: &Db) {
    db.run_sync(|sql| enrolled(sql, "t1", "a")).unwrap();
    let lines = agent_chain(30);
    let outcomes: Vec<Result<u64, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let batch = lines[..10 * (i % 3 + 1)].to_vec();
                s.spawn(move || {
                    db.run_sync(move |sql| audit::agents::store(&sql, "a", &batch, at(100)))
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_eq!(db.run_sync(|sql| audit::agents::lines(&sql, "a")).unwrap(), lines);
}

// ---- PostgreSQL only ----

/// Every (table, column) of a SQLite database.
fn sqlite_columns(sqlite: &Db) -> BTreeSet<(String, String)> {
    sqlite
        .run_sync(|sql| {
            sql.query_map(
                "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
                 WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%'",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .unwrap()
        .into_iter()
        .collect()
}

fn both_backends_have_the_same_tables_and_columns(pg: &Db) {
    let dir = tempfile::tempdir().unwrap();
    let sqlite_columns = sqlite_columns(&Db::open(&dir.path().join(db::DB_FILE)).unwrap());
    let pg_columns: BTreeSet<(String, String)> = pg
        .run_sync(|sql| {
            sql.query_map(
                "SELECT table_name::TEXT, column_name::TEXT FROM information_schema.columns
                 WHERE table_schema = 'public' AND table_name <> 'schema_version'",
                params![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
        .unwrap()
        .into_iter()
        .collect();
    assert!(sqlite_columns.len() > 100, "{sqlite_columns:?}");
    assert_eq!(
        sqlite_columns.symmetric_difference(&pg_columns).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "columns only on one side"
    );
}

fn migrations_are_versioned_and_a_newer_schema_is_refused(url: &str) {
    let options = PgOptions::new(url);
    let two = ["CREATE TABLE a (x BIGINT)", "CREATE TABLE b (x BIGINT)"];
    Db::open_postgres_with(&options, &two).unwrap();
    // Again: nothing to do.
    let db = Db::open_postgres_with(&options, &two).unwrap();
    let version = |db: &Db| {
        db.run_sync(|sql| {
            sql.query_row("SELECT version FROM schema_version", params![], |r| r.get::<i64>(0))
        })
        .unwrap()
    };
    assert_eq!(version(&db), 2);
    let err = Db::open_postgres_with(&options, &two[..1]).unwrap_err();
    assert!(matches!(err, DbError::SchemaTooNew { found: 2, supported: 1, .. }), "{err}");
    // A migration that fails leaves the schema as it was.
    let broken = [two[0], two[1], "CREATE TABLE c (x BIGINT); SELECT no_such_function()"];
    let err = Db::open_postgres_with(&options, &broken).unwrap_err();
    assert!(err.to_string().contains("no_such_function"), "{err}");
    assert_eq!(version(&db), 2);
    let c = db
        .run_sync(|sql| {
            sql.query_row("SELECT to_regclass('c')::TEXT", params![], |r| {
                r.get::<Option<String>>(0)
            })
        })
        .unwrap();
    assert_eq!(c, None);
}

fn sqlite_only_code_is_refused_on_postgres(db: &Db) {
    let err = db.call_sync(|c| db::agents(c)).unwrap_err();
    assert!(matches!(err, DbError::SqliteOnly { .. }));
    assert!(err.to_string().contains("not yet ported to PostgreSQL"), "{err}");
    assert!(!err.to_string().contains('@'), "no credentials in errors: {err}");
}

fn the_database_is_reached_over_verified_tls(cluster: &postgres::Cluster) {
    let ssl = |db: &Db| {
        db.run_sync(|sql| {
            sql.query_row(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                params![],
                |r| r.get::<bool>(0),
            )
        })
        .unwrap()
    };
    let ca = cluster.ca_file().display().to_string();
    let url = cluster.database(&format!("sslmode=verify-full&sslrootcert={ca}"));
    assert!(ssl(&Db::open_postgres(&PgOptions::new(&url)).unwrap()));
    let plain = url.replace(&format!("sslmode=verify-full&sslrootcert={ca}"), "sslmode=disable");
    assert!(!ssl(&Db::open_postgres(&PgOptions::new(&plain)).unwrap()));
    // Another CA: the server is not trusted.
    let other = tempfile::NamedTempFile::new().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(other.path(), params.self_signed(&key).unwrap().pem()).unwrap();
    let untrusted = url.replace(&ca, &other.path().display().to_string());
    let err = Db::open_postgres(&PgOptions::new(&untrusted)).unwrap_err();
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");
}

fn a_password_is_read_from_its_file(cluster: &postgres::Cluster) {
    let admin = Db::open_postgres(&PgOptions::new(cluster.database(""))).unwrap();
    let role = postgres::PASSWORD_ROLE;
    admin
        .run_sync(|sql| {
            sql.execute_batch(&format!("CREATE ROLE {role} LOGIN PASSWORD 'correct horse'"))
        })
        .unwrap();
    // CREATE DATABASE cannot run in a transaction, which every Db::run is.
    let owned = format!("owned_by_{role}");
    cluster.create_database(&owned, role);
    let url =
        cluster.url(&owned, "").replace("postgres://postgres@", &format!("postgres://{role}@"));
    let dir = tempfile::tempdir().unwrap();
    let with = |text: Option<&str>| {
        let file = dir.path().join("password");
        if let Some(text) = text {
            std::fs::write(&file, text).unwrap();
        }
        Db::open_postgres(&PgOptions { password_file: Some(file), ..PgOptions::new(&url) })
    };
    // The first line is the password; the connection works and the schema is made.
    let db = with(Some("correct horse\n")).unwrap();
    let user: String =
        db.run_sync(|sql| sql.query_row("SELECT current_user", params![], |r| r.get(0))).unwrap();
    assert_eq!(user, role);
    let err = with(Some("wrong horse")).unwrap_err().to_string();
    assert!(err.contains("password"), "{err}");
    std::fs::remove_file(dir.path().join("password")).unwrap();
    let err = with(None).unwrap_err().to_string();
    assert!(err.contains("reading the password file") && err.contains("password"), "{err}");
    // Without a password the role is refused.
    assert!(Db::open_postgres(&PgOptions::new(&url)).is_err());
}

fn text_sorts_byte_by_byte_whatever_the_databases_collation(cluster: &postgres::Cluster) {
    // A database whose own collation sorts as English does ('a1' before 'B1').
    cluster.create_database_with(
        "english",
        "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C'",
    );
    let db = Db::open_postgres(&PgOptions::new(cluster.url("english", ""))).unwrap();
    db.run_sync(|sql| {
        for (token, agent) in [("t1", "a1"), ("t2", "B1"), ("t3", "a-2")] {
            enrolled(sql, token, agent)?;
        }
        for name in ["fraud", "Churn", "fraud-2"] {
            db::insert_bundle(&sql, &bundle(name, 1))?;
        }
        Ok(())
    })
    .unwrap();
    let (agents, bundles) =
        db.run_sync(|sql| Ok((db::group_agents(&sql, "edge")?, db::bundles(&sql)?))).unwrap();
    // As SQLite orders them: by bytes.
    assert_eq!(agents, ["B1", "a-2", "a1"]);
    let names: Vec<&str> = bundles.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["Churn", "fraud", "fraud-2"]);
}

// ---- the harness ----

type Body = fn(&Db);

/// The cluster, made by the first PostgreSQL case that needs it, stopped when the last
/// holder (`main`) drops it.
#[derive(Default)]
struct Shared {
    cluster: OnceLock<Result<Arc<postgres::Cluster>, String>>,
}

impl Shared {
    fn cluster(&self, bin: &std::path::Path) -> Arc<postgres::Cluster> {
        let cluster = self.cluster.get_or_init(|| postgres::Cluster::start(bin).map(Arc::new));
        match cluster {
            Ok(c) => Arc::clone(c),
            Err(e) => panic!("the test PostgreSQL did not start: {e}"),
        }
    }
}

/// How a PostgreSQL case ends without PostgreSQL: ignored, or failed when it is required.
fn without_postgres(why: &str) -> Result<Completion, libtest_mimic::Failed> {
    if std::env::var_os("FALAJ_REQUIRE_POSTGRES").is_some() {
        return Err(format!("FALAJ_REQUIRE_POSTGRES is set, but {why}").into());
    }
    eprintln!("skipped: {why}");
    Ok(Completion::ignored_with(why))
}

/// The cases run on both databases.
const BOTH: &[(&str, Body)] = &[
    (
        "batches_of_several_agents_commit_together_each_answered_as_alone",
        batches_of_several_agents_commit_together_each_answered_as_alone,
    ),
    ("a_token_enrolls_exactly_one_agent", a_token_enrolls_exactly_one_agent),
    (
        "concurrent_enrollments_with_one_token_enroll_one_agent",
        concurrent_enrollments_with_one_token_enroll_one_agent,
    ),
    ("bundles_and_deployments_round_trip", bundles_and_deployments_round_trip),
    ("desired_versions_only_go_up", desired_versions_only_go_up),
    (
        "concurrent_issuers_never_reuse_a_desired_version",
        concurrent_issuers_never_reuse_a_desired_version,
    ),
    ("settings_and_what_agents_report_are_kept", settings_and_what_agents_report_are_kept),
    ("a_transaction_not_committed_leaves_nothing", a_transaction_not_committed_leaves_nothing),
    (
        "every_change_lands_in_one_unbroken_audit_chain",
        every_change_lands_in_one_unbroken_audit_chain,
    ),
    (
        "a_request_runs_on_the_blocking_pool_with_its_actor_in_the_audit_entry",
        a_request_runs_on_the_blocking_pool_with_its_actor_in_the_audit_entry,
    ),
    (
        "an_agent_stores_at_most_an_hour_of_windows_per_hour_and_resends_are_duplicates",
        an_agent_stores_at_most_an_hour_of_windows_per_hour_and_resends_are_duplicates,
    ),
    (
        "metric_windows_are_stored_once_and_rolled_up_by_version",
        metric_windows_are_stored_once_and_rolled_up_by_version,
    ),
    ("a_batch_sent_twice_at_once_is_stored_once", a_batch_sent_twice_at_once_is_stored_once),
    (
        "an_alert_fires_once_and_resolves_with_its_events_recorded",
        an_alert_fires_once_and_resolves_with_its_events_recorded,
    ),
    (
        "finetune_jobs_travel_until_reported_finished_and_keep_only_allowed_weights",
        finetune_jobs_travel_until_reported_finished_and_keep_only_allowed_weights,
    ),
    (
        "an_agents_chain_is_stored_in_order_once_and_breaks_are_refused_and_recorded",
        an_agents_chain_is_stored_in_order_once_and_breaks_are_refused_and_recorded,
    ),
    (
        "one_chain_sent_at_once_through_several_connections_is_stored_once",
        one_chain_sent_at_once_through_several_connections_is_stored_once,
    ),
];

/// The cases run on PostgreSQL only, on a database of their own.
const POSTGRES_ONLY: &[(&str, Body)] = &[
    (
        "both_backends_have_the_same_tables_and_columns",
        both_backends_have_the_same_tables_and_columns,
    ),
    ("sqlite_only_code_is_refused_on_postgres", sqlite_only_code_is_refused_on_postgres),
];

/// A case given the cluster itself.
type WithCluster = fn(&postgres::Cluster);

/// Cases that start a control plane: on SQLite (`None`) and on a database of the cluster.
type Start = fn(Option<&postgres::Cluster>);

const STARTS: &[(&str, Start)] = &[(
    "starts::a_control_plane_on_other_pii_key_files_does_not_start",
    starts::a_control_plane_on_other_pii_key_files_does_not_start,
)];

/// The cases run on PostgreSQL only, given the cluster.
const WITH_CLUSTER: &[(&str, WithCluster)] = &[
    (
        "events::a_replica_tells_its_own_events_from_another_ones",
        events::a_replica_tells_its_own_events_from_another_ones,
    ),
    ("events::a_replica_sends_its_own_changes_once", events::a_replica_sends_its_own_changes_once),
    (
        "events::an_event_committed_after_a_newer_one_is_not_skipped",
        events::an_event_committed_after_a_newer_one_is_not_skipped,
    ),
    (
        "a_sqlite_control_plane_copies_into_postgres",
        migrate::a_sqlite_control_plane_copies_into_postgres,
    ),
    (
        "a_value_postgres_cannot_hold_refuses_the_whole_copy",
        migrate::a_value_postgres_cannot_hold_refuses_the_whole_copy,
    ),
    (
        "the_migrate_command_copies_and_then_refuses",
        migrate::the_migrate_command_copies_and_then_refuses,
    ),
    (
        "replicas_hold_the_region_lease_one_at_a_time",
        lease::replicas_hold_the_region_lease_one_at_a_time,
    ),
    ("migrations_are_versioned_and_a_newer_schema_is_refused", |cluster| {
        migrations_are_versioned_and_a_newer_schema_is_refused(&cluster.database(""));
    }),
    ("the_database_is_reached_over_verified_tls", the_database_is_reached_over_verified_tls),
    ("a_password_is_read_from_its_file", a_password_is_read_from_its_file),
    (
        "text_sorts_byte_by_byte_whatever_the_databases_collation",
        text_sorts_byte_by_byte_whatever_the_databases_collation,
    ),
];

fn main() {
    let arguments = libtest_mimic::Arguments::from_args();
    let shared = Arc::new(Shared::default());
    let bin = postgres::binaries();
    let mut trials = Vec::new();
    let both: Vec<(&str, Body)> =
        [BOTH, auth::CASES, features::CASES, outbox::CASES, rollouts::CASES].concat();
    for &(name, body) in &both {
        trials.push(Trial::test(format!("{name}::sqlite"), move || {
            let dir = tempfile::tempdir().unwrap();
            body(&Db::open(&dir.path().join(db::DB_FILE)).unwrap());
            Ok(())
        }));
    }
    let on_postgres = |name: String, f: Box<dyn FnOnce(&postgres::Cluster) + Send>| {
        let (shared, bin) = (Arc::clone(&shared), bin.clone());
        Trial::ignorable_test(name, move || match &bin {
            Err(why) => without_postgres(why),
            Ok(bin) => {
                f(&shared.cluster(bin));
                Ok(Completion::Completed)
            }
        })
    };
    for &(name, body) in both.iter().chain(POSTGRES_ONLY) {
        trials.push(on_postgres(
            format!("{name}::postgres"),
            Box::new(move |cluster| {
                body(&Db::open_postgres(&PgOptions::new(cluster.database(""))).unwrap());
            }),
        ));
    }
    for &(name, body) in WITH_CLUSTER {
        trials.push(on_postgres(format!("{name}::postgres"), Box::new(body)));
    }
    for &(name, body) in STARTS {
        trials.push(Trial::test(format!("{name}::sqlite"), move || {
            body(None);
            Ok(())
        }));
        trials.push(on_postgres(format!("{name}::postgres"), Box::new(move |c| body(Some(c)))));
    }
    let conclusion = libtest_mimic::run(&arguments, trials);
    // Stop the cluster before exiting (the trials, which held it too, are gone).
    drop(shared);
    conclusion.exit();
}
