//! The auth module's storage (users, sessions, API tokens, failed logins) and the audit
//! log's (list, checkpoints, export, prune) on both databases (cases listed in [`CASES`],
//! run by `main` as `NAME::sqlite` and `NAME::postgres`), with the races SQLite's single
//! writer hides played at once through several connections.

use std::time::Duration;

use falaj_common::audit::{Entry, VerifyError, verify};
use falaj_common::keys::SigningKey;
use falaj_common::time::Timestamp;
use falaj_control::audit::{self, Actor, AuditQuery};
use falaj_control::auth::store::{self, Lock, NotOpened, Refusal, Resolved};
use falaj_control::auth::{LoginPolicy, Principal, Role, SessionPolicy, Via};
use falaj_control::console::pages::audit::chain_status;
use falaj_control::db::{self, Db};
use falaj_control::sql::params;

use crate::{Body, at, count};

/// This module's cases: each body runs once on SQLite and once on PostgreSQL.
pub(crate) const CASES: &[(&str, Body)] = &[
    ("users_and_their_sessions_round_trip", users_and_their_sessions_round_trip),
    (
        "api_tokens_never_outrank_or_outlive_their_creator",
        api_tokens_never_outrank_or_outlive_their_creator,
    ),
    ("failed_logins_lock_the_user_then_the_address", failed_logins_lock_the_user_then_the_address),
    (
        "failed_logins_at_once_start_exactly_one_lockout",
        failed_logins_at_once_start_exactly_one_lockout,
    ),
    ("a_name_taken_at_once_is_taken_once", a_name_taken_at_once_is_taken_once),
    ("a_session_used_at_once_keeps_its_latest_use", a_session_used_at_once_keeps_its_latest_use),
    ("the_audit_log_lists_exports_and_prunes", the_audit_log_lists_exports_and_prunes),
    (
        "a_user_disabled_or_removed_while_logging_in_keeps_no_session",
        a_user_disabled_or_removed_while_logging_in_keeps_no_session,
    ),
    (
        "a_user_removed_while_creating_api_tokens_leaves_none_live",
        a_user_removed_while_creating_api_tokens_leaves_none_live,
    ),
    (
        "checkpoints_and_prunes_at_once_sign_and_delete_once",
        checkpoints_and_prunes_at_once_sign_and_delete_once,
    ),
];

const PHC: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA";

fn policy() -> LoginPolicy {
    LoginPolicy {
        failures: 3,
        address_failures: 5,
        window: Duration::from_secs(60),
        lockout: Duration::from_secs(300),
    }
}

fn sessions() -> SessionPolicy {
    SessionPolicy { idle: Duration::from_secs(600), max: Duration::from_secs(3600) }
}

fn add(db: &Db, name: &str, role: Role) {
    db.run_sync(|sql| store::add_user(&sql, name, role, PHC, at(0))).unwrap().unwrap();
}

fn login(db: &Db, user: &str, now: Timestamp) -> store::NewSession {
    let checked = db
        .run_sync(|sql| store::attempt(&sql, user, None, &policy(), now))
        .unwrap()
        .user
        .expect("the user exists")
        .password;
    db.run_sync(|sql| {
        store::login_succeeded(&sql, user, &checked, Some("192.0.2.1"), &policy(), now)
    })
    .unwrap()
    .expect("not locked")
}

fn resolve(db: &Db, token: &str, now: Timestamp) -> Resolved {
    db.run_sync(|sql| store::resolve(&sql, token, &sessions(), now)).unwrap()
}

fn refused(resolved: &Resolved, why: &str) {
    match resolved {
        Resolved::Refused { reason, .. } => assert!(reason.contains(why), "{reason}"),
        other => panic!("expected a refusal for {why:?}, got {other:?}"),
    }
}

/// The actions recorded that start with `prefix`, oldest first.
fn actions(db: &Db, prefix: &str) -> Vec<(String, String)> {
    let query =
        AuditQuery { action: Some(prefix.into()), limit: Some(10_000), ..AuditQuery::default() };
    let entries: Vec<Entry> = db.run_sync(|sql| audit::list(&sql, &query)).unwrap();
    entries.into_iter().map(|e| (e.action, e.target)).collect()
}

fn users_and_their_sessions_round_trip(db: &Db) {
    add(db, "alice", Role::Admin);
    add(db, "bob", Role::Viewer);
    add(db, "Carl", Role::Auditor);
    let again = db.run_sync(|sql| store::add_user(&sql, "bob", Role::Admin, PHC, at(1))).unwrap();
    assert_eq!(again, Err(Refusal::UserExists("bob".into())));

    let before =
        db.run_sync(|sql| store::set_role(&sql, "bob", Role::Operator, at(2))).unwrap().unwrap();
    assert_eq!(before, Role::Viewer);
    let nobody = db.run_sync(|sql| store::set_role(&sql, "nobody", Role::Admin, at(2))).unwrap();
    assert_eq!(nobody, Err(Refusal::NoUser("nobody".into())));

    let session = login(db, "bob", at(10));
    match resolve(db, &session.token, at(20)) {
        Resolved::Valid(Principal { actor, role, via: Via::Session { id, user } }) => {
            assert_eq!((actor.as_str(), role, user.as_str()), ("user:bob", Role::Operator, "bob"));
            assert_eq!(id, session.id);
        }
        other => panic!("bob's session: {other:?}"),
    }
    assert_eq!(resolve(db, "falaj_s_unknown", at(20)), Resolved::Unknown);
    assert_eq!(resolve(db, "neither", at(20)), Resolved::Unknown);
    // By bytes, whatever the database's collation: upper case first.
    let users = db.run_sync(|sql| store::users(&sql)).unwrap();
    let listed: Vec<(&str, Role, u64)> =
        users.iter().map(|u| (u.name.as_str(), u.role, u.sessions)).collect();
    assert_eq!(
        listed,
        [("Carl", Role::Auditor, 0), ("alice", Role::Admin, 0), ("bob", Role::Operator, 1)]
    );
    let stored = db
        .run_sync(|sql| store::attempt(&sql, "bob", None, &policy(), at(20)))
        .unwrap()
        .user
        .unwrap();
    assert_eq!(
        (stored.role, stored.password.as_str(), stored.disabled),
        (Role::Operator, PHC, false)
    );

    // Idle past the policy: refused; disabled: refused, and its sessions ended.
    refused(&resolve(db, &session.token, at(10 + 600)), "without use");
    db.run_sync(|sql| store::set_disabled(&sql, "bob", true, at(30))).unwrap().unwrap();
    refused(&resolve(db, &session.token, at(31)), "disabled");
    db.run_sync(|sql| store::set_disabled(&sql, "bob", false, at(32))).unwrap().unwrap();
    refused(&resolve(db, &session.token, at(33)), "ended");

    // A new password ends the sessions; a logout ends one, once.
    let second = login(db, "bob", at(40));
    db.run_sync(|sql| store::set_password(&sql, "bob", "$argon2id$other", at(41)))
        .unwrap()
        .unwrap();
    refused(&resolve(db, &second.token, at(42)), "ended");
    // Changed since its password was checked: another password, disabled.
    let stale = |now| {
        db.run_sync(|sql| store::login_succeeded(&sql, "bob", PHC, None, &policy(), now)).unwrap()
    };
    assert_eq!(stale(at(43)).unwrap_err(), NotOpened::Changed);
    let third = login(db, "bob", at(50));
    assert!(db.run_sync(|sql| store::end_session(&sql, &third.id, at(51))).unwrap());
    assert!(!db.run_sync(|sql| store::end_session(&sql, &third.id, at(52))).unwrap());
    refused(&resolve(db, &third.token, at(53)), "ended");

    let fourth = login(db, "bob", at(60));
    db.run_sync(|sql| store::remove_user(&sql, "bob", at(61))).unwrap().unwrap();
    assert_eq!(resolve(db, &fourth.token, at(62)), Resolved::Unknown);
    let removed = db.run_sync(|sql| {
        store::login_succeeded(&sql, "bob", "$argon2id$other", None, &policy(), at(62))
    });
    assert_eq!(removed.unwrap().unwrap_err(), NotOpened::Changed);
    let gone = db.run_sync(|sql| store::remove_user(&sql, "bob", at(63))).unwrap();
    assert_eq!(gone, Err(Refusal::NoUser("bob".into())));
    assert_eq!(count(db, "sessions"), 0);
    assert_eq!(
        actions(db, "user").iter().map(|(a, t)| format!("{a} {t}")).collect::<Vec<_>>(),
        [
            "user.add user:alice",
            "user.add user:bob",
            "user.add user:Carl",
            "user.set_role user:bob",
            "user.disable user:bob",
            "user.enable user:bob",
            "user.reset_password user:bob",
            "user.remove user:bob",
        ]
    );
    assert_eq!(actions(db, "auth.logout").len(), 1);
}

fn api_tokens_never_outrank_or_outlive_their_creator(db: &Db) {
    add(db, "carol", Role::Operator);
    let carol = Principal {
        actor: "user:carol".into(),
        role: Role::Operator,
        via: Via::Session { id: "s".into(), user: "carol".into() },
    };
    let dan = Principal { actor: "user:dan".into(), role: Role::Operator, ..carol.clone() };
    let create = |name: &str, role: Role, ttl: u64, now: Timestamp| {
        let (secret, sha) = store::new_secret(store::TOKEN_PREFIX);
        let created = db
            .run_sync(|sql| {
                store::create_api_token(
                    &sql,
                    name,
                    role,
                    "user:carol",
                    sha,
                    Duration::from_secs(ttl),
                    now,
                )
            })
            .unwrap();
        created.map(|expires| (secret, expires))
    };
    let (ci, expires) = create("ci", Role::Viewer, 3600, at(0)).unwrap();
    assert_eq!(expires, at(3600));
    assert_eq!(create("ci", Role::Viewer, 3600, at(1)), Err(Refusal::TokenExists("ci".into())));
    match resolve(db, &ci, at(100)) {
        Resolved::Valid(p) => {
            assert_eq!((p.actor.as_str(), p.role), ("token:ci", Role::Viewer));
            assert_eq!(p.via, Via::ApiToken { name: "ci".into() });
        }
        other => panic!("the token: {other:?}"),
    }
    let revoke = |name: &str, by: &Principal, now| {
        db.run_sync(|sql| store::revoke_api_token(&sql, name, by, now)).unwrap()
    };
    assert!(matches!(revoke("ci", &dan, at(2)), Err(Refusal::NotYours { .. })));
    assert_eq!(revoke("ci", &carol, at(3)), Ok(()));
    assert_eq!(revoke("ci", &carol, at(4)), Err(Refusal::NoToken("ci".into())));
    refused(&resolve(db, &ci, at(5)), "revoked");
    // A revoked name, and an expired one, may be taken again: the old secret is gone.
    let (ci2, _) = create("ci", Role::Viewer, 3600, at(6)).unwrap();
    assert_eq!(resolve(db, &ci, at(7)), Resolved::Unknown);
    assert!(matches!(resolve(db, &ci2, at(7)), Resolved::Valid(_)));
    let (short, _) = create("short", Role::Viewer, 10, at(0)).unwrap();
    refused(&resolve(db, &short, at(10)), "expired");
    assert!(create("short", Role::Viewer, 10, at(10)).is_ok());

    // Never above its creator now: demoted, disabled, removed.
    let (ops, _) = create("ops", Role::Operator, 3600, at(20)).unwrap();
    assert!(matches!(resolve(db, &ops, at(21)), Resolved::Valid(_)));
    db.run_sync(|sql| store::set_role(&sql, "carol", Role::Viewer, at(22))).unwrap().unwrap();
    refused(&resolve(db, &ops, at(23)), "above its creator");
    db.run_sync(|sql| store::set_disabled(&sql, "carol", true, at(24))).unwrap().unwrap();
    refused(&resolve(db, &ci2, at(25)), "is disabled");
    db.run_sync(|sql| store::remove_user(&sql, "carol", at(26))).unwrap().unwrap();
    refused(&resolve(db, &ci2, at(27)), "revoked");

    let tokens = db.run_sync(|sql| store::api_tokens(&sql)).unwrap();
    let listed: Vec<(&str, bool)> =
        tokens.iter().map(|t| (t.name.as_str(), t.revoked_at.is_some())).collect();
    assert_eq!(listed, [("ci", true), ("ops", true), ("short", true)]);
    assert_eq!(tokens[0].last_used, Some(at(7)), "the first use is recorded");
    assert_eq!(actions(db, "apitoken.create").len(), 5);
}

fn failed_logins_lock_the_user_then_the_address(db: &Db) {
    add(db, "dave", Role::Viewer);
    let (address, policy) = (Some("10.0.0.1"), policy());
    let fail = |user: &str, counts: bool, now| {
        db.run_sync(|sql| {
            store::login_failed(&sql, user, address, "wrong password", counts, &policy, now)
        })
        .unwrap()
    };
    assert_eq!(fail("dave", true, at(0)), None);
    assert_eq!(fail("dave", true, at(1)), None);
    let lock = Lock { scope: "user", until: at(302) };
    assert_eq!(fail("dave", true, at(2)), Some(lock));
    // Refused while locked: recorded, not counted.
    assert_eq!(fail("dave", false, at(3)), Some(lock));
    assert_eq!(count(db, "login_failures"), 3);
    let attempt = db.run_sync(|sql| store::attempt(&sql, "dave", address, &policy, at(4))).unwrap();
    assert_eq!(attempt.lock, Some(lock));
    let opened =
        db.run_sync(|sql| store::login_succeeded(&sql, "dave", PHC, address, &policy, at(4)));
    assert_eq!(opened.unwrap().unwrap_err(), NotOpened::Locked(lock));

    // Two more from the address, for unknown users: the address is locked for everyone.
    assert_eq!(fail("x", true, at(5)), None);
    let by_address = Lock { scope: "address", until: at(306) };
    assert_eq!(fail("y", true, at(6)), Some(by_address));
    let lock_of = |user: &str, address, now| {
        db.run_sync(|sql| store::lock(&sql, user, address, &policy, now)).unwrap()
    };
    assert_eq!(lock_of("z", Some("10.0.0.1"), at(7)), Some(by_address));
    assert_eq!(lock_of("z", Some("10.0.0.2"), at(7)), None);
    assert_eq!(lock_of("dave", Some("10.0.0.2"), at(303)), None, "the lock ended");

    // A successful login: the user's earlier failures no longer count.
    let opened =
        db.run_sync(|sql| store::login_succeeded(&sql, "dave", PHC, None, &policy, at(400)));
    assert!(opened.unwrap().is_ok());
    for i in 0..2 {
        let failed = db.run_sync(|sql| {
            store::login_failed(&sql, "dave", None, "wrong password", true, &policy, at(401 + i))
        });
        assert_eq!(failed.unwrap(), None);
    }
    let lockouts = actions(db, "auth.lockout");
    assert_eq!(
        lockouts,
        [
            ("auth.lockout".to_owned(), "user:dave".to_owned()),
            ("auth.lockout".to_owned(), "address:10.0.0.1".to_owned())
        ]
    );
}

fn failed_logins_at_once_start_exactly_one_lockout(db: &Db) {
    let policy = LoginPolicy { failures: 4, address_failures: 6, ..policy() };
    // One user failing from many places at once, then many users from one address.
    let failed: Vec<Option<Lock>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..10)
            .map(|i| {
                s.spawn(move || {
                    let address = format!("10.1.0.{i}");
                    db.run_sync(|sql| {
                        let a = Some(address.as_str());
                        store::login_failed(&sql, "erin", a, "wrong password", true, &policy, at(5))
                    })
                    .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(failed.iter().filter(|l| l.is_some()).count(), 7, "{failed:?}");
    std::thread::scope(|s| {
        for i in 0..10 {
            s.spawn(move || {
                let user = format!("user-{i}");
                db.run_sync(|sql| {
                    let a = Some("10.2.0.1");
                    store::login_failed(&sql, &user, a, "unknown user", true, &policy, at(6))
                })
                .unwrap()
            });
        }
    });
    assert_eq!(count(db, "login_failures"), 20);
    assert_eq!(
        actions(db, "auth.lockout"),
        [
            ("auth.lockout".to_owned(), "user:erin".to_owned()),
            ("auth.lockout".to_owned(), "address:10.2.0.1".to_owned())
        ]
    );
    assert_eq!(actions(db, "auth.login").len(), 20);
}

fn a_name_taken_at_once_is_taken_once(db: &Db) {
    let added: Vec<Result<(), Refusal>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    db.run_sync(|sql| store::add_user(&sql, "frank", Role::Admin, PHC, at(0)))
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(added.iter().filter(|a| a.is_ok()).count(), 1, "{added:?}");
    assert!(added.iter().all(|a| a.is_ok() || *a == Err(Refusal::UserExists("frank".into()))));

    let created: Vec<Result<Timestamp, Refusal>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(|| {
                    let (_, sha) = store::new_secret(store::TOKEN_PREFIX);
                    let ttl = Duration::from_secs(3600);
                    db.run_sync(|sql| {
                        store::create_api_token(
                            &sql,
                            "ci",
                            Role::Viewer,
                            "user:frank",
                            sha,
                            ttl,
                            at(1),
                        )
                    })
                    .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(created.iter().filter(|c| c.is_ok()).count(), 1, "{created:?}");
    assert_eq!(count(db, "api_tokens"), 1);

    // Ended at once: one logout, one revocation.
    let session = login(db, "frank", at(2));
    let frank = Principal::admin_token();
    let (ended, revoked): (Vec<bool>, Vec<Result<(), Refusal>>) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let (id, frank) = (&session.id, &frank);
                s.spawn(move || {
                    let ended = db.run_sync(|sql| store::end_session(&sql, id, at(3))).unwrap();
                    let revoked =
                        db.run_sync(|sql| store::revoke_api_token(&sql, "ci", frank, at(3)));
                    (ended, revoked.unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).unzip()
    });
    assert_eq!(ended.iter().filter(|e| **e).count(), 1, "{ended:?}");
    assert_eq!(revoked.iter().filter(|r| r.is_ok()).count(), 1, "{revoked:?}");
    assert_eq!(actions(db, "user.add").len(), 1);
    assert_eq!(actions(db, "apitoken").len(), 2);
    assert_eq!(actions(db, "auth.logout").len(), 1);
}

fn a_user_disabled_or_removed_while_logging_in_keeps_no_session(db: &Db) {
    add(db, "kim", Role::Viewer);
    add(db, "lee", Role::Viewer);
    // Logins whose password was checked, at once with the user's disabling or removal:
    // each comes before (and its session is ended) or after (and is refused), none fails.
    for (user, change) in [("kim", "disable"), ("lee", "remove")] {
        let opened: Vec<Result<store::NewSession, NotOpened>> = std::thread::scope(|s| {
            let logins: Vec<_> = (0..6)
                .map(|i| {
                    s.spawn(move || {
                        let address = format!("10.3.0.{i}");
                        db.run_sync(|sql| {
                            let a = Some(address.as_str());
                            store::login_succeeded(&sql, user, PHC, a, &policy(), at(10))
                        })
                        .unwrap()
                    })
                })
                .collect();
            s.spawn(move || {
                if change == "disable" {
                    db.run_sync(|sql| store::set_disabled(&sql, user, true, at(10)))
                } else {
                    db.run_sync(|sql| store::remove_user(&sql, user, at(10)))
                }
                .unwrap()
                .unwrap();
            });
            logins.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(opened.iter().all(|o| o.is_ok() || matches!(o, Err(NotOpened::Changed))));
        let live: i64 = db
            .run_sync(|sql| {
                sql.query_row(
                    r#"SELECT COUNT(*) FROM sessions WHERE "user" = $1 AND revoked_at IS NULL"#,
                    params![user],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(live, 0, "{user} after its {change}: {opened:?}");
        for session in opened.iter().flatten() {
            let resolved = resolve(db, &session.token, at(11));
            assert!(!matches!(resolved, Resolved::Valid(_)), "{user} after its {change}");
        }
    }
}

fn a_user_removed_while_creating_api_tokens_leaves_none_live(db: &Db) {
    add(db, "mia", Role::Operator);
    let created: Vec<Result<Timestamp, Refusal>> = std::thread::scope(|s| {
        let creations: Vec<_> = (0..6)
            .map(|i| {
                s.spawn(move || {
                    let (_, sha) = store::new_secret(store::TOKEN_PREFIX);
                    let (name, ttl) = (format!("mia-{i}"), Duration::from_secs(3600));
                    db.run_sync(|sql| {
                        store::create_api_token(
                            &sql,
                            &name,
                            Role::Viewer,
                            "user:mia",
                            sha,
                            ttl,
                            at(1),
                        )
                    })
                    .unwrap()
                })
            })
            .collect();
        s.spawn(|| db.run_sync(|sql| store::remove_user(&sql, "mia", at(1))).unwrap().unwrap());
        creations.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        created.iter().all(|c| c.is_ok() || *c == Err(Refusal::NoUser("mia".into()))),
        "{created:?}"
    );
    let tokens = db.run_sync(|sql| store::api_tokens(&sql)).unwrap();
    assert_eq!(tokens.len(), created.iter().filter(|c| c.is_ok()).count());
    // None live, so a later user of the same name inherits none.
    assert!(tokens.iter().all(|t| t.revoked_at.is_some()), "{tokens:?}");
}

fn a_session_used_at_once_keeps_its_latest_use(db: &Db) {
    add(db, "gina", Role::Viewer);
    let session = login(db, "gina", at(0));
    // Uses a minute or more apart, at once: each that finds the last use a minute old or
    // more writes its own time, and the latest stays whatever order they commit in.
    let resolved: Vec<Resolved> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let token = &session.token;
                s.spawn(move || resolve(db, token, at(100 + 60 * i)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(resolved.iter().all(|r| matches!(r, Resolved::Valid(_))), "{resolved:?}");
    let last_used: i64 = db
        .run_sync(|sql| {
            sql.query_row(
                "SELECT last_used FROM sessions WHERE id = $1",
                params![session.id],
                |r| r.get(0),
            )
        })
        .unwrap();
    assert_eq!(Timestamp::from_unix(last_used as u64), at(520), "never backwards");
}

/// Records `kind` by `actor` at `now` (an event: one audit entry).
fn event(db: &Db, runtime: &tokio::runtime::Runtime, actor: &str, kind: &str, now: Timestamp) {
    let (db, kind) = (db.clone(), kind.to_owned());
    let run = db.run(move |sql| db::event(&sql, now, &kind, "edge", "detail"));
    runtime.block_on(audit::acting(Actor::new(actor, None), run)).unwrap();
}

fn the_audit_log_lists_exports_and_prunes(db: &Db) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for (i, kind) in ["deploy", "undeploy", "deploy"].into_iter().enumerate() {
        event(db, &runtime, "system", kind, at(i as u64));
    }
    event(db, &runtime, "user:ivy", "rollout.start", at(10));
    event(db, &runtime, "user:ivy", "rollout.pause", at(11));
    let list = |query: AuditQuery| -> Vec<u64> {
        db.run_sync(|sql| audit::list(&sql, &query)).unwrap().iter().map(|e| e.seq).collect()
    };
    assert_eq!(list(AuditQuery::default()), [1, 2, 3, 4, 5]);
    let by = |actor: &str| AuditQuery { actor: Some(actor.into()), ..AuditQuery::default() };
    assert_eq!(list(by("user:ivy")), [4, 5]);
    assert_eq!(list(by("user")), [0u64; 0]);
    let doing = |action: &str| AuditQuery { action: Some(action.into()), ..AuditQuery::default() };
    assert_eq!(list(doing("rollout")), [4, 5]);
    assert_eq!(list(doing("ROLLOUT.")), [4, 5], "ASCII case aside, on both");
    assert_eq!(list(doing("deploy")), [1, 3]);
    assert_eq!(list(doing("rollout_")), [4, 5], "a wildcard");
    assert_eq!(list(doing("rollout\\.")), [0u64; 0], "a backslash is itself");
    assert_eq!(list(AuditQuery { since: Some(at(2)), ..AuditQuery::default() }), [3, 4, 5]);
    assert_eq!(list(AuditQuery { limit: Some(2), ..AuditQuery::default() }), [4, 5]);

    let key = SigningKey::from_seed(&[7; 32]);
    let first = db.run_sync(|sql| audit::checkpoint(&sql, &key, at(12))).unwrap().unwrap();
    assert_eq!(first.seq, 5);
    assert_eq!(db.run_sync(|sql| audit::checkpoint(&sql, &key, at(12))).unwrap(), None);
    let latest = db.run_sync(|sql| audit::last_checkpoint(&sql)).unwrap().unwrap();
    assert_eq!((latest.seq, latest.head), (first.seq, first.head));

    let lines = db.run_sync(|sql| audit::export(&sql, &key, at(20))).unwrap();
    // Five entries, their checkpoint, the export, its checkpoint.
    assert_eq!(lines.len(), 8, "{lines:#?}");
    let verified = verify(lines.iter().map(String::as_str), &[key.public()]).unwrap();
    assert_eq!((verified.entries, verified.checkpoints, verified.last), (6, 2, Some(6)));

    // Before at(10): the three first go, and what is left verifies from its anchor.
    assert_eq!(db.run_sync(|sql| audit::prune(&sql, &key, at(10), at(30))).unwrap(), 3);
    assert_eq!(db.run_sync(|sql| audit::prune(&sql, &key, at(10), at(31))).unwrap(), 0);
    let lines = db.run_sync(|sql| audit::export(&sql, &key, at(40))).unwrap();
    assert!(lines[0].starts_with("{\"checkpoint\""), "the anchor first: {lines:#?}");
    let verified = verify(lines.iter().map(String::as_str), &[key.public()]).unwrap();
    // Rollout start and pause, the first export, the prune, this export.
    assert_eq!((verified.first, verified.last, verified.entries), (Some(4), Some(8), 5));
    let status = db.run_sync(|sql| chain_status(&sql, &key.public())).unwrap().unwrap();
    assert_eq!((status.first, status.last), (Some(4), Some(8)));
    assert_eq!(list(doing("audit")), [6, 7, 8]);
}

fn checkpoints_and_prunes_at_once_sign_and_delete_once(db: &Db) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for i in 0..12 {
        event(db, &runtime, "system", "deploy", at(i));
    }
    let key = SigningKey::from_seed(&[9; 32]);
    let signed: Vec<Option<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let key = &key;
                s.spawn(move || {
                    db.run_sync(|sql| audit::checkpoint(&sql, key, at(20))).unwrap().map(|c| c.seq)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(signed.iter().flatten().collect::<Vec<_>>(), [&12], "{signed:?}");
    assert_eq!(count(db, "audit_checkpoints"), 1);

    // Prunes (replicas' retention) at once with appends and exports: each export is one
    // verifiable chain, the entries go once, and the chain stays whole.
    let (pruned, exports): (Vec<u64>, Vec<Vec<String>>) = std::thread::scope(|s| {
        let prunes: Vec<_> = (0..4)
            .map(|_| {
                let key = &key;
                s.spawn(move || db.run_sync(|sql| audit::prune(&sql, key, at(6), at(30))).unwrap())
            })
            .collect();
        let exports: Vec<_> = (0..3)
            .map(|_| {
                let key = &key;
                s.spawn(move || db.run_sync(|sql| audit::export(&sql, key, at(40))).unwrap())
            })
            .collect();
        s.spawn(|| {
            for i in 0..5 {
                db.run_sync(|sql| db::event(&sql, at(50 + i), "deploy", "edge", "later")).unwrap();
            }
        });
        // The console's status meanwhile: whole, or with a tail not yet signed.
        for _ in 0..3 {
            s.spawn(|| {
                let status = db.run_sync(|sql| chain_status(&sql, &key.public())).unwrap();
                assert!(matches!(status, Ok(_) | Err(VerifyError::Unsigned { .. })), "{status:?}");
            });
        }
        (
            prunes.into_iter().map(|h| h.join().unwrap()).collect(),
            exports.into_iter().map(|h| h.join().unwrap()).collect(),
        )
    });
    assert_eq!(pruned.iter().sum::<u64>(), 6, "{pruned:?}");
    assert_eq!(pruned.iter().filter(|p| **p > 0).count(), 1, "{pruned:?}");
    for lines in &exports {
        verify(lines.iter().map(String::as_str), &[key.public()]).unwrap();
    }
    // 12 events, 3 exports, 5 later events, 1 prune; the first 6 gone.
    db.run_sync(|sql| audit::checkpoint(&sql, &key, at(60))).unwrap();
    let status = db.run_sync(|sql| chain_status(&sql, &key.public())).unwrap();
    let status = status.unwrap_or_else(|e| panic!("the chain does not verify: {e}"));
    assert_eq!((status.first, status.last, status.entries), (Some(7), Some(21), 15));
    assert_eq!(actions(db, "audit.prune").len(), 1);
}
