//! The webhook outbox (`falaj_control::outbox`) on both databases (cases listed in
//! [`CASES`]): notifications recorded with the transaction that tells of them, due in
//! order, tried again on the schedule after a failure, gone once delivered or given up.

use falaj_common::delivery;
use falaj_control::db::Db;
use falaj_control::outbox::{self, Outcome, Pending};
use falaj_control::sql::SqlError;

use crate::{Body, at};

pub(crate) const CASES: &[(&str, Body)] = &[(
    "outbox::notifications_are_due_in_order_retried_on_schedule_and_removed_when_done",
    notifications_are_due_in_order_retried_on_schedule_and_removed_when_done,
)];

const HOOKS: [&str; 2] = ["https://chat.example/hook", "http://pager.example/"];

fn urls(pending: &[Pending]) -> Vec<(&str, &[u8])> {
    pending.iter().map(|p| (p.url.as_str(), p.body.as_slice())).collect()
}

fn notifications_are_due_in_order_retried_on_schedule_and_removed_when_done(db: &Db) {
    // A transaction rolled back records no notification.
    let undone = db.run_sync(|sql| {
        let tx = sql.transaction()?;
        outbox::enqueue(&tx, HOOKS, b"{\"n\":0}", "never", at(10))?;
        tx.rollback()?;
        Ok::<_, SqlError>(())
    });
    undone.unwrap();
    assert_eq!(db.run_sync(|sql| outbox::pending(&sql, 100)).unwrap(), []);

    // Two notifications, each to both webhooks; the second recorded later.
    db.run_sync(|sql| {
        let tx = sql.transaction()?;
        outbox::enqueue(&tx, HOOKS, b"{\"n\":1}", "first", at(100))?;
        tx.commit()?;
        outbox::enqueue(&sql, HOOKS[..1].iter().copied(), b"{\"n\":2}", "second", at(105))
    })
    .unwrap();
    let due = |now| db.run_sync(|sql| outbox::due(&sql, now, 10)).unwrap();
    assert_eq!(due(at(99)), []);
    let first = due(at(100));
    assert_eq!(urls(&first), [(HOOKS[0], &b"{\"n\":1}"[..]), (HOOKS[1], b"{\"n\":1}")]);
    assert_eq!(db.run_sync(|sql| outbox::due(&sql, at(200), 1)).unwrap(), first[..1]);
    let oldest = db.run_sync(|sql| outbox::pending(&sql, 1)).unwrap();
    assert_eq!(oldest, first[..1], "the first recorded");

    // The first webhook fails: it is due again a second later, its error kept.
    let attempted = |p: &Pending, error: Option<&str>, now| {
        db.run_sync(|sql| outbox::attempted(&sql, p, error, now)).unwrap()
    };
    assert_eq!(attempted(&first[0], Some("answered 503"), at(101)), Outcome::Retry(at(102)));
    let all = due(at(200));
    assert_eq!(
        urls(&all),
        [(HOOKS[1], &b"{\"n\":1}"[..]), (HOOKS[0], b"{\"n\":1}"), (HOOKS[0], b"{\"n\":2}")],
        "by when each is due: {all:?}"
    );
    let retried = &all[1];
    assert_eq!((retried.attempts, retried.next_at), (1, at(102)));
    assert_eq!(retried.last_error.as_deref(), Some("answered 503"));
    assert_eq!((&retried.delivery, retried.recorded), (&first[0].delivery, at(100)));
    assert_eq!(urls(&due(at(101))), [(HOOKS[1], &b"{\"n\":1}"[..])]);

    // The second attempt fails too: the wait doubles.
    assert_eq!(attempted(retried, Some("no answer"), at(102)), Outcome::Retry(at(104)));

    // Delivered: gone. Failing past the hour: given up, gone.
    assert_eq!(attempted(&all[0], None, at(101)), Outcome::Delivered);
    let late = at(100).saturating_add(delivery::GIVE_UP_AFTER);
    let again = due(at(104));
    assert_eq!(again[0].attempts, 2);
    assert_eq!(attempted(&again[0], Some("no answer"), late), Outcome::GivenUp);
    let left = db.run_sync(|sql| outbox::pending(&sql, 100)).unwrap();
    assert_eq!(urls(&left), [(HOOKS[0], &b"{\"n\":2}"[..])]);
    assert_eq!(left[0].what, "second");
}
