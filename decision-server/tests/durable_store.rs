//! The durable store across a restart in process: counters of every kind, open holds, credit
//! grants and ingest keys come back from the file, and holds opened before it close after.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Harness, harness, tokens, tree_with};
use tollgate::clock::Clock;
use tollgate::core::rollup::{Granularity, ScanNeeds};
use tollgate::store::events::EventBody;
use tollgate::store::{CloseOutcome, CounterStore, Durability, DurableStore};

const LIMITS: &str = r#"
limits:
  - { id: org-month, entity: acme, feature: tokens, kind: quota, limit: 100000, period: P1M }
  - { id: user-rate, entityType: user, feature: tokens, kind: rate, limit: 50000, window: PT1H }
  - { id: team-slots, entityType: team, feature: requests, kind: concurrency, limit: 10 }
  - { id: org-credits, entity: acme, feature: credits, kind: credits }
grants:
  - { id: g1, entity: acme, feature: credits, amount: 1000000, category: paid }
"#;

const START: &str = "2026-03-10T10:00:00Z";

fn open(path: &Path, durability: Durability) -> Harness {
    let store: Arc<dyn CounterStore> = Arc::new(DurableStore::open(path, durability).unwrap());
    harness(&tree_with(LIMITS), store, START)
}

/// The usage attribution a restart must keep: the hour rollups (sorted) and the stream's
/// events (id, kind, units).
fn attribution(h: &Harness) -> (Vec<String>, Vec<(String, String, u64)>) {
    let store = h.engine.store();
    let acme = tollgate::core::Name::from("acme");
    let to = h.clock.now().millis() + 3_600_000;
    let mut rows: Vec<String> = h
        .run(store.usage().usage_buckets(
            acme,
            Granularity::Hour,
            to - 86_400_000 * 2,
            to,
            &ScanNeeds::all(0),
        ))
        .unwrap()
        .rows()
        .map(|r| format!("{r:?}"))
        .collect();
    rows.sort();
    let events = h
        .run(store.usage().read_events(Some(acme), None, 1_000))
        .unwrap()
        .events
        .into_iter()
        .map(|e| match &*e.body {
            EventBody::Record(r) => (e.id, format!("{:?}", r.kind), r.measures.units),
            EventBody::Alert(a) => (e.id, a.clone(), 0),
        })
        .collect();
    (rows, events)
}

/// Everything a restart must keep, read through the engine.
fn snapshot(h: &Harness) -> Vec<u64> {
    vec![
        h.counted("acme", "acme", "org-month"),
        h.counted("acme", "u1", "user-rate"),
        h.counted("acme", "u2", "user-rate"),
        h.counted("acme", "t1", "team-slots"),
        h.counted("acme", "acme", "org-credits"),
        h.engine.store().stats().holds_open as u64,
        h.engine.store().stats().counters as u64,
    ]
}

fn restart_keeps_everything(durability: Durability) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.redb");
    let (open_hold, settled_hold, before) = {
        let h = open(&path, durability);
        let u1 = [("userId", "u1"), ("model", "small")];
        let open_hold = h
            .check_usage("acme", "tokens", tokens(300, 200, 0), &u1)
            .hold_id
            .unwrap();
        let settled = h
            .check_usage("acme", "tokens", tokens(100, 100, 0), &[("userId", "u2")])
            .hold_id
            .unwrap();
        h.settle(&settled, 150);
        let released = h.check("acme", "tokens", 40, &u1).hold_id.unwrap();
        h.run(h.engine.release(&released)).unwrap();
        let u2 = [("userId", "u2")];
        assert!(h.ingest("acme", "tokens", tokens(10, 10, 0), &u2, "evt-1"));
        let before = snapshot(&h);
        assert_eq!(before[5], 1, "one hold open");
        assert!(before[0] > 0 && before[4] > 0, "{before:?}");
        (open_hold, settled, (before, attribution(&h)))
        // The harness and its store drop here: the writer commits what is queued.
    };

    let (before, (rollups, events)) = before;
    let h = open(&path, durability);
    assert_eq!(snapshot(&h), before, "state after the restart");
    // Attribution too: the settle, the release and the ingest, in rollups and in the stream.
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(
        attribution(&h),
        (rollups, events.clone()),
        "attribution after the restart"
    );
    // The hold opened before the restart settles after it, once.
    assert_eq!(
        h.run(h.engine.settle(&open_hold, tokens(100, 50, 0)))
            .unwrap(),
        CloseOutcome::Closed
    );
    assert_eq!(
        h.run(h.engine.settle(&settled_hold, tokens(1, 1, 0)))
            .unwrap(),
        CloseOutcome::AlreadyClosed,
        "a hold settled before the restart stays settled"
    );
    assert_eq!(
        h.counted("acme", "t1", "team-slots"),
        0,
        "its slot came back"
    );
    // The ingest key is remembered.
    let u2 = [("userId", "u2")];
    assert!(!h.ingest("acme", "tokens", tokens(10, 10, 0), &u2, "evt-1"));
    // New holds number on from the old ones.
    let next = h
        .check("acme", "tokens", 1, &[("userId", "u1")])
        .hold_id
        .unwrap();
    assert!(next.seq > open_hold.seq, "{next} after {open_hold}");
    // The hold opened before the restart is attributed to its series, once, and the stream's
    // ids go on rising from the ones kept.
    let (_, now_events) = attribution(&h);
    assert_eq!(now_events.len(), 4, "{now_events:?}");
    let (last_id, kind, units) = &now_events[3];
    assert_eq!((kind.as_str(), *units), ("Settled", 150));
    let id = |s: &str| s.parse::<u64>().unwrap();
    assert!(
        id(last_id) > id(&events[2].0),
        "{last_id} after {}",
        events[2].0
    );
    let after = snapshot(&h);
    drop(h);
    let h = open(&path, durability);
    assert_eq!(snapshot(&h), after, "state after a second restart");
}

/// Decisions committed at once (no hold) survive a restart as counted usage and as their
/// records, once: nothing is open to expire or settle afterwards, and nothing counts twice.
fn commits_survive_a_restart_counted_once(durability: Durability) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.redb");
    let (before, records) = {
        let h = open(&path, durability);
        for (user, units) in [("u1", 30), ("u2", 20), ("u1", 5)] {
            let d = h.commit("acme", "tokens", tokens(units, 0, 0), &[("userId", user)]);
            assert!(d.granted && d.hold_id.is_none(), "{d:?}");
        }
        let before = snapshot(&h);
        assert_eq!(before[5], 0, "no hold open");
        assert_eq!(before[0], 55, "counted at once: {before:?}");
        (before, attribution(&h))
    };
    let h = open(&path, durability);
    assert_eq!(snapshot(&h), before, "state after the restart");
    let (rollups, events) = attribution(&h);
    assert_eq!(
        (rollups, events.clone()),
        records,
        "records after the restart"
    );
    let kinds: Vec<_> = events.iter().map(|(_, k, u)| (k.as_str(), *u)).collect();
    assert_eq!(
        kinds,
        [("Committed", 30), ("Committed", 20), ("Committed", 5)]
    );
    // Past every hold TTL: nothing expires, so nothing more is counted or recorded.
    h.advance_secs(3_600);
    h.expire_due();
    assert_eq!(h.counted("acme", "acme", "org-month"), 55);
    assert_eq!(attribution(&h).1.len(), 3);
}

#[test]
fn commits_survive_a_restart_counted_once_sync() {
    commits_survive_a_restart_counted_once(Durability::Sync);
}

#[test]
fn commits_survive_a_restart_counted_once_batched() {
    commits_survive_a_restart_counted_once(Durability::Batched {
        interval: Duration::from_millis(50),
    });
}

#[test]
fn restart_keeps_everything_sync() {
    restart_keeps_everything(Durability::Sync);
}

#[test]
fn restart_keeps_everything_batched() {
    restart_keeps_everything(Durability::Batched {
        interval: Duration::from_millis(50),
    });
}

#[test]
fn holds_open_at_the_restart_expire_at_their_held_amount() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.redb");
    let hold = {
        let h = open(&path, Durability::Sync);
        h.check("acme", "tokens", 700, &[("userId", "u1")])
            .hold_id
            .unwrap()
    };
    let h = open(&path, Durability::Sync);
    assert_eq!(h.engine.store().stats().holds_open, 1);
    // Past the default hold TTL the sweep commits it as held.
    h.advance_secs(3_600);
    h.run(h.engine.store().expire_due(h.clock.now())).unwrap();
    assert_eq!(h.engine.store().stats().holds_open, 0);
    assert_eq!(h.counted("acme", "acme", "org-month"), 700);
    assert_eq!(
        h.run(h.engine.release(&hold)).unwrap(),
        CloseOutcome::AlreadyClosed
    );
    drop(h);
    let h = open(&path, Durability::Sync);
    assert_eq!(
        h.engine.store().stats().holds_open,
        0,
        "the expiry was stored"
    );
    assert_eq!(h.counted("acme", "acme", "org-month"), 700);
}

#[test]
fn a_file_that_is_not_a_store_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-store.redb");
    std::fs::write(&path, b"this is not a redb file, just text").unwrap();
    let e = DurableStore::open(&path, Durability::Sync).unwrap_err();
    assert!(e.to_string().contains("not-a-store.redb"), "{e}");
}

/// Entities created on the fly, their parents and the customer's cap are in the file: a
/// restart neither forgets them (which let another `maxAutoEntities` in after each restart)
/// nor moves one under another parent.
#[test]
fn auto_created_entities_and_their_cap_survive_a_restart() {
    let yaml = tree_with(
        r#"
maxAutoEntities: 2
autoCreateParents:
  user: t3
limits:
  - { id: user-day, entityType: user, feature: tokens, kind: quota, limit: 100, period: P1D }
"#,
    )
    .replace(
        "  - dimension: userId\n    entityType: user\n",
        "  - dimension: userId\n    entityType: user\n    onUnknown: create\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.redb");
    let start = |path: &Path| {
        let store: Arc<dyn CounterStore> =
            Arc::new(DurableStore::open(path, Durability::Sync).unwrap());
        harness(&yaml, store, START)
    };
    {
        let h = start(&path);
        let d = h.check(
            "acme",
            "tokens",
            7,
            &[("userId", "new-1"), ("teamId", "t1")],
        );
        assert_eq!(d.chain[0].entity_id, "new-1");
        assert!(h.check("acme", "tokens", 7, &[("userId", "new-2")]).granted);
    }
    let h = start(&path);
    assert_eq!(h.run(h.engine.auto_created("acme")).unwrap(), 2);
    let refused = h.check_err("acme", "tokens", 1, &[("userId", "new-3")]);
    assert!(
        refused
            .to_string()
            .contains("already has 2 auto-created entities"),
        "the cap outlives the restart: {refused}"
    );
    // new-1 keeps the parent it was created under, though this request names no team.
    let d = h.check("acme", "tokens", 1, &[("userId", "new-1")]);
    assert!(d.granted);
    assert_eq!(h.counted("acme", "new-1", "user-day"), 8);
    let d = h.dry_run(
        "acme",
        "tokens",
        0,
        &[("userId", "new-1"), ("teamId", "t1")],
    );
    assert!(d.granted, "new-1 is under t1: {:?}", d.denial);
}

#[test]
fn alert_claims_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.redb");
    let acme = tollgate::core::Name::from("acme");
    let now = tollgate::core::Timestamp::from_millis(1_000);
    let outbox = tollgate::core::alerts::Delivery {
        id: "msg_1".into(),
        webhook: "ops".into(),
        body: "{}".into(),
        created: 1_000,
        next_at: Some(1_000),
        delivered: false,
        attempts: Vec::new(),
    };
    {
        let h = open(&path, Durability::Sync);
        let store = h.engine.store();
        assert!(
            h.run(store.alerts().claim_alert(
                acme,
                "k-period",
                Some(5_000),
                "{}",
                std::slice::from_ref(&outbox),
                now
            ))
            .unwrap()
        );
        assert!(
            h.run(
                store
                    .alerts()
                    .claim_alert(acme, "k-hyst", None, "{}", &[], now)
            )
            .unwrap()
        );
    }
    let h = open(&path, Durability::Sync);
    let store = h.engine.store();
    // The claim's delivery waits in the outbox after the restart.
    assert_eq!(
        h.run(store.alerts().deliveries(acme, 10)).unwrap(),
        std::slice::from_ref(&outbox)
    );
    let leased = h
        .run(store.alerts().lease_deliveries(acme, "a", now, 60_000, 10))
        .unwrap();
    assert_eq!(leased.len(), 1);
    // Still claimed: a restart does not fire a crossing twice.
    assert!(
        !h.run(
            store
                .alerts()
                .claim_alert(acme, "k-period", Some(5_000), "{}", &[], now)
        )
        .unwrap()
    );
    assert!(
        !h.run(
            store
                .alerts()
                .claim_alert(acme, "k-hyst", None, "{}", &[], now)
        )
        .unwrap()
    );
    // A period's claim lapses at its end; a re-armed claim can fire again.
    let later = tollgate::core::Timestamp::from_millis(5_000);
    assert!(
        h.run(
            store
                .alerts()
                .claim_alert(acme, "k-period", Some(9_000), "{}", &[], later)
        )
        .unwrap()
    );
    assert!(h.run(store.alerts().rearm_alert(acme, "k-hyst")).unwrap());
    drop(h);
    let h = open(&path, Durability::Sync);
    let store = h.engine.store();
    assert!(
        h.run(
            store
                .alerts()
                .claim_alert(acme, "k-hyst", None, "{}", &[], later)
        )
        .unwrap()
    );
    assert!(
        !h.run(
            store
                .alerts()
                .claim_alert(acme, "k-period", Some(9_000), "{}", &[], later)
        )
        .unwrap()
    );
}
