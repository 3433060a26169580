//! The event poll of replicas on one PostgreSQL database (`falaj_control::event_poll`,
//! and the daemon's poll over it): a replica tells the events it recorded itself, whose
//! changes it sent its agents when it made them, from another replica's, which it must
//! send them; so its own changes are sent once, not again when its poll reads them back.
//! And an event whose transaction commits after a newer event was read is still found.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use falaj_control::daemon::{ControlPlane, ServeConfig};
use falaj_control::db::{self, Db};
use falaj_control::event_poll::{EventPoll, EventsSince};
use falaj_control::sql::{PgOptions, params};
use falaj_control::state::Shared;

use crate::postgres::Cluster;
use crate::{REGION, at};

fn record(db: &Db, subject: &str) -> i64 {
    db.run_sync(|sql| {
        db::event(&sql, at(0), "deploy", subject, "fraud@2")?;
        db::latest_event(&sql)
    })
    .unwrap()
}

/// A poll of `db` starting after event `seen`.
fn poll_from(seen: i64) -> EventPoll {
    let mut poll = EventPoll::default();
    poll.start(seen);
    poll
}

fn since(db: &Db, poll: &mut EventPoll) -> EventsSince {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(poll.poll(db, Instant::now())).unwrap()
}

/// Two `Db`s on one database, as two replicas' pools.
pub(crate) fn a_replica_tells_its_own_events_from_another_ones(cluster: &Cluster) {
    let url = cluster.database("");
    let a = Db::open_postgres(&PgOptions::new(&url)).unwrap();
    let b = Db::open_postgres(&PgOptions::new(&url)).unwrap();
    let (mut poll_a, mut poll_b) = (poll_from(0), poll_from(0));
    let first = record(&a, "edge");
    assert_eq!(since(&a, &mut poll_a), EventsSince { latest: first, others: 0, own: 1 });
    assert_eq!(since(&b, &mut poll_b), EventsSince { latest: first, others: 1, own: 0 });
    // A transaction rolled back leaves no event to read; both record one after.
    a.run_sync(|sql| {
        let tx = sql.transaction()?;
        db::event(&*tx, at(1), "undeploy", "edge", "fraud")
    })
    .unwrap();
    let (from_b, from_a) = (record(&b, "edge"), record(&a, "lab"));
    assert!(first < from_b && from_b < from_a);
    assert_eq!(since(&a, &mut poll_a), EventsSince { latest: from_a, others: 1, own: 1 });
    assert_eq!(since(&b, &mut poll_b), EventsSince { latest: from_a, others: 1, own: 1 });
    // Nothing new: nothing to send.
    assert_eq!(since(&a, &mut poll_a), EventsSince { latest: from_a, others: 0, own: 0 });
}

/// An event whose transaction took its id first but commits after a newer event was
/// read: the next poll finds it.
pub(crate) fn an_event_committed_after_a_newer_one_is_not_skipped(cluster: &Cluster) {
    let url = cluster.database("");
    let open = || Db::open_postgres(&PgOptions::new(&url)).unwrap();
    let (a, b, c) = (open(), open(), open());
    let mut poll = poll_from(record(&c, "before"));
    let (inserted, was_inserted) = std::sync::mpsc::channel();
    let (go, to_go) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let a = &a;
        let slow = s.spawn(move || {
            a.run_sync(|sql| {
                let tx = sql.transaction()?;
                // The event's row alone: `db::event` would then take the audit chain's
                // lock, which `b`'s event below would wait for. Between the two, a real
                // change is in the same place: its id taken, not yet committed.
                tx.execute(
                    "INSERT INTO events (at, kind, subject, detail) VALUES (1, 'deploy', 'edge', '')",
                    params![],
                )?;
                inserted.send(()).unwrap();
                to_go.recv().unwrap();
                tx.commit()
            })
            .unwrap();
        });
        was_inserted.recv().unwrap();
        let newer = record(&b, "edge");
        assert_eq!(since(&c, &mut poll), EventsSince { latest: newer, others: 1, own: 0 });
        go.send(()).unwrap();
        slow.join().unwrap();
        assert_eq!(since(&c, &mut poll), EventsSince { latest: newer, others: 1, own: 0 });
    });
    assert_eq!(since(&c, &mut poll).others, 0);
}

/// Waits (up to a minute) for `shared`'s event poll to have read event `id`.
fn polled(runtime: &tokio::runtime::Runtime, shared: &Shared, id: i64) {
    let mut seen = shared.events_seen.subscribe();
    runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), seen.wait_for(|s| *s >= id as u64))
            .await
            .unwrap_or_else(|_| panic!("the event poll never read event {id}"))
            .map(|_| ())
            .expect("the replica keeps its event poll's figures");
    });
}

/// Two running replicas: a change made through one (its event, then its own push) makes
/// the other's poll push once, and its own poll none.
pub(crate) fn a_replica_sends_its_own_changes_once(cluster: &Cluster) {
    let url = cluster.database("");
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let start = |name: &str| {
        let data = dir.path().join(name);
        if name != "a" {
            // The region's keys directory, copied from the first replica.
            crate::starts::copy_dir(&dir.path().join("a").join("keys"), &data.join("keys"));
        }
        let mut config = ServeConfig::new(&data);
        config.quic = "127.0.0.1:0".parse().unwrap();
        config.admin = "127.0.0.1:0".parse().unwrap();
        config.region = Some(REGION.into());
        config.database = Some(PgOptions::new(&url));
        let control = runtime.block_on(ControlPlane::start(config)).unwrap();
        let shared = control.shared();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = runtime.spawn(control.run(async move {
            let _ = stopped.await;
        }));
        (shared, stop, running)
    };
    // An event from before, which each poll's first read takes as its starting point.
    let before = record(&Db::open_postgres(&PgOptions::new(&url)).unwrap(), "before");
    let (a, stop_a, running_a) = start("a");
    let (b, stop_b, running_b) = start("b");
    polled(&runtime, &a, before);
    polled(&runtime, &b, before);
    // A change through `a`, as its deploy makes one: the event, then its own push.
    let id = record(&a.db, "edge");
    runtime.block_on(a.push_desired(None, SystemTime::now())).unwrap();
    polled(&runtime, &a, id);
    polled(&runtime, &b, id);
    assert_eq!(b.event_pushes.load(Ordering::Relaxed), 1, "the other replica sends it");
    assert_eq!(a.event_pushes.load(Ordering::Relaxed), 0, "its maker sent it already");
    for (stop, running) in [(stop_a, running_a), (stop_b, running_b)] {
        stop.send(()).unwrap();
        runtime.block_on(running).unwrap().unwrap();
    }
}
