//! The region's lease (`falaj_control::lease`) between two replicas on one PostgreSQL
//! database: one holds it at a time, a replica whose connection is cut loses it and the
//! other takes it over, and a replica that stops hands it on.

use std::time::Duration;

use falaj_control::db::Db;
use falaj_control::lease::{self, LEASE_KEY, Lease};
use falaj_control::sql::{PgOptions, params};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use crate::postgres::Cluster;

/// How often the replicas check their lease in this test.
const EVERY: Duration = Duration::from_millis(50);

/// A bound on any wait below: reaching it fails the test.
const DEADLINE: Duration = Duration::from_secs(20);

/// Waits until `lease` is `held` or not.
fn until(rt: &Runtime, lease: &Lease, held: bool) {
    let mut watch = lease.watch();
    rt.block_on(async {
        tokio::time::timeout(DEADLINE, watch.wait_for(|h| *h == held))
            .await
            .unwrap_or_else(|_| panic!("the lease did not become held={held}"))
            .expect("the lease's task is running");
    });
}

/// The backends holding the lease's lock in `admin`'s database, as PostgreSQL sees them.
/// An advisory lock belongs to one database, and `pg_locks` shows the whole cluster's:
/// tests running beside this one hold their own regions' leases, under the same key, in
/// their own databases.
fn holders(admin: &Db) -> Vec<i64> {
    admin
        .run_sync(|sql| {
            sql.query_map(
                "SELECT CAST(pid AS BIGINT) FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND objsubid = 1
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND CAST(classid AS BIGINT) = $1 AND CAST(objid AS BIGINT) = $2",
                params![LEASE_KEY >> 32, LEASE_KEY & 0xffff_ffff],
                |r| r.get(0),
            )
        })
        .unwrap()
}

pub(crate) fn replicas_hold_the_region_lease_one_at_a_time(cluster: &Cluster) {
    let url = cluster.database("");
    let open = || Db::open_postgres(&PgOptions::new(url.clone())).unwrap();
    let (a, b, admin) = (open(), open(), open());
    let rt = Runtime::new().unwrap();
    let (stop_a, stopped_a) = watch::channel(false);
    let (stop_b, stopped_b) = watch::channel(false);
    let (la, lb) = {
        let _runtime = rt.enter();
        (lease::keep(&a, EVERY, stopped_a), lease::keep(&b, EVERY, stopped_b))
    };

    // One of the two takes it; PostgreSQL shows one holder.
    let mut either = (la.watch(), lb.watch());
    rt.block_on(async {
        tokio::time::timeout(DEADLINE, async {
            tokio::select! {
                r = either.0.wait_for(|h| *h) => { r.unwrap(); }
                r = either.1.wait_for(|h| *h) => { r.unwrap(); }
            }
        })
        .await
        .expect("neither replica took the lease");
    });
    let a_first = la.is_held();
    let (holder, follower) = if a_first { (&la, &lb) } else { (&lb, &la) };
    let first = holders(&admin);
    assert_eq!(first.len(), 1, "{first:?}");

    // The holder's connection is cut (as when its host's network goes): it steps down at
    // its next check and stands aside (`lease::STAND_ASIDE` checks), and the other replica
    // takes the lease over (before the stand-aside, the one cut could win it back first).
    let cut: bool = admin
        .run_sync(|sql| {
            sql.query_row(
                "SELECT pg_terminate_backend(CAST(CAST($1 AS BIGINT) AS INTEGER))",
                params![first[0]],
                |r| r.get(0),
            )
        })
        .unwrap();
    assert!(cut);
    until(&rt, holder, false);
    until(&rt, follower, true);
    let second = holders(&admin);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second, first);

    // The new holder stops (a replica shut down): the first, reconnected, takes it back.
    let stop_holder = if a_first { &stop_b } else { &stop_a };
    stop_holder.send_replace(true);
    until(&rt, follower, false);
    until(&rt, holder, true);
    let third = holders(&admin);
    assert_eq!(third.len(), 1, "{third:?}");
    assert!(!third.contains(&second[0]), "{third:?} {second:?}");
    drop((stop_a, stop_b));
}
