//! Decisions whose caller gave up are never charged, on every store: a check that passes its
//! deadline before deciding holds nothing; a hold placed after the deadline is released at once;
//! a check dropped while its store call is in flight (Envoy reset the stream) has its hold
//! released; and a cancel that overtakes its reserve (Redis) makes the reserve hold nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tollgate::clock::ManualClock;
use tollgate::core::counter::{CounterKey, CounterSpec};
use tollgate::core::credits::GrantBalance;
use tollgate::core::plan::{AutoEntities, Plan, Planned, Registry};
use tollgate::core::usage::{StreamEnd, Usage};
use tollgate::core::{Name, Timestamp};
use tollgate::store::{
    AdminLog, AutoEntityOutcome, CloseOutcome, CounterStore, HoldKey, Reservation, ReserveMode,
    StoreError, StoreStats, StoredEntity,
};
use tollgate::{CheckRequest, DecisionError};

type Store = Arc<dyn CounterStore>;

test_with_all_stores! {
    a_check_past_its_deadline_decides_nothing,
    a_hold_placed_after_the_deadline_is_released_at_once,
    a_check_dropped_during_its_store_call_releases_its_hold,
    a_cancel_that_overtakes_its_reserve_makes_it_hold_nothing,
}

test_with_redis_stores!(
    a_reserve_run_twice_holds_once,
    a_commit_run_twice_counts_once,
    a_commit_is_guarded_against_a_resend_for_seconds_not_the_hold_ttl
);

const LIMITS: &str = r#"
limits:
  - { id: user-day, entityType: user, feature: tokens, kind: quota, limit: 1000, period: P1D }
  - { id: user-slots, entityType: user, feature: tokens, kind: concurrency, limit: 1 }
"#;

/// What a store does after a reserve has placed its hold, before it answers: a stalled store.
#[derive(Debug, Clone)]
enum After {
    /// Answer at once.
    Answer,
    /// Time passes (the store or the sidecar stalled) before the answer.
    Stall(ManualClock, i64),
    /// Never answer: the answer is lost.
    Hang,
}

/// A store that runs `inner` and then does as `after` says.
#[derive(Debug)]
struct Hooked {
    inner: Store,
    after: parking_lot::Mutex<After>,
    /// Notified when a reserve has placed its hold and started to hang.
    hung: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl CounterStore for Hooked {
    async fn reserve(
        &self,
        plan: &Plan,
        mode: ReserveMode,
        now: Timestamp,
    ) -> Result<Reservation, StoreError> {
        let r = self.inner.reserve(plan, mode, now).await;
        let after = self.after.lock().clone();
        match after {
            After::Answer => {}
            After::Stall(clock, ms) => clock.advance_millis(ms),
            After::Hang => {
                self.hung.notify_one();
                std::future::pending::<()>().await
            }
        }
        r
    }
    async fn settle_ended(
        &self,
        h: HoldKey,
        u: &Usage,
        end: Option<StreamEnd>,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        self.inner.settle_ended(h, u, end, now).await
    }
    async fn renew(
        &self,
        old: HoldKey,
        spent: u64,
        next: &Plan,
        now: Timestamp,
    ) -> Result<(CloseOutcome, Reservation), StoreError> {
        self.inner.renew(old, spent, next, now).await
    }
    async fn release(&self, h: HoldKey, now: Timestamp) -> Result<CloseOutcome, StoreError> {
        self.inner.release(h, now).await
    }
    async fn cancel(&self, c: Name, tag: u128, now: Timestamp) -> Result<bool, StoreError> {
        self.inner.cancel(c, tag, now).await
    }
    async fn expire_due(&self, now: Timestamp) -> Result<usize, StoreError> {
        self.inner.expire_due(now).await
    }
    async fn add_grant(&self, c: Name, k: CounterKey, g: GrantBalance) -> Result<bool, StoreError> {
        self.inner.add_grant(c, k, g).await
    }
    async fn inspect(
        &self,
        c: Name,
        k: CounterKey,
        s: &CounterSpec,
        now: Timestamp,
    ) -> Result<Option<tollgate::core::counter::Inspection>, StoreError> {
        self.inner.inspect(c, k, s, now).await
    }
    async fn record(&self, p: &Plan, key: &str, now: Timestamp) -> Result<bool, StoreError> {
        self.inner.record(p, key, now).await
    }
    async fn auto_entity(
        &self,
        c: Name,
        id: &str,
        e: &StoredEntity,
        max: u32,
        create: bool,
    ) -> Result<AutoEntityOutcome, StoreError> {
        self.inner.auto_entity(c, id, e, max, create).await
    }
    async fn auto_entity_count(&self, c: Name) -> Result<usize, StoreError> {
        self.inner.auto_entity_count(c).await
    }
    async fn auto_entities(
        &self,
        c: Name,
    ) -> Result<Vec<(String, tollgate::store::StoredEntity)>, StoreError> {
        self.inner.auto_entities(c).await
    }
    fn stats(&self) -> StoreStats {
        self.inner.stats()
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
    fn admin_log(&self) -> &dyn AdminLog {
        self.inner.admin_log()
    }
    fn hold_relay(&self) -> &dyn tollgate::store::HoldRelay {
        self.inner.hold_relay()
    }
    fn usage(&self) -> &dyn tollgate::store::UsageStore {
        self.inner.usage()
    }
    fn alerts(&self) -> &dyn tollgate::store::AlertStore {
        self.inner.alerts()
    }
}

fn hooked(store: Store) -> (Harness, Arc<Hooked>) {
    let hooked = Arc::new(Hooked {
        inner: store,
        after: parking_lot::Mutex::new(After::Answer),
        hung: tokio::sync::Notify::new(),
    });
    let h = harness(
        &tree_with(LIMITS),
        Arc::clone(&hooked) as Store,
        "2026-03-10T10:00:00Z",
    );
    (h, hooked)
}

fn check_by(
    h: &Harness,
    units: u64,
    deadline: Option<Timestamp>,
) -> Result<tollgate::core::Decision, DecisionError> {
    let dimensions = dims(&[("userId", "u1")]);
    h.run(h.engine.check(&CheckRequest {
        deadline,
        customer: "acme",
        feature: "tokens",
        usage: Usage::units(units),
        dimensions: &dimensions,
        dry_run: false,
        commit: false,
    }))
}

/// Nothing counted on either limit, no hold open: nobody pays for the abandoned call.
fn nothing_held(h: &Harness) {
    assert_eq!(h.counted("acme", "u1", "user-day"), 0);
    assert_eq!(h.counted("acme", "u1", "user-slots"), 0);
    assert_eq!(
        h.engine.store().stats().holds_open,
        0,
        "a hold is left open"
    );
}

fn a_check_past_its_deadline_decides_nothing(store: Store) {
    let (h, _) = hooked(store);
    let past = h.engine.now().plus_millis(-1);
    assert_eq!(
        check_by(&h, 100, Some(past)),
        Err(DecisionError::DeadlineExceeded)
    );
    nothing_held(&h);
    // In time, it is decided as usual.
    let d = check_by(&h, 100, Some(h.engine.now().plus_millis(250))).unwrap();
    assert!(d.granted);
}

fn a_hold_placed_after_the_deadline_is_released_at_once(store: Store) {
    let (h, hooked) = hooked(store);
    // The store answers 2 s after the call, past the caller's 250 ms.
    *hooked.after.lock() = After::Stall(h.clock.clone(), 2_000);
    let deadline = h.engine.now().plus_millis(250);
    assert_eq!(
        check_by(&h, 100, Some(deadline)),
        Err(DecisionError::DeadlineExceeded)
    );
    nothing_held(&h);
    // The concurrency slot is free again: the next call gets it.
    *hooked.after.lock() = After::Answer;
    assert!(check_by(&h, 100, None).unwrap().granted);
}

fn a_check_dropped_during_its_store_call_releases_its_hold(store: Store) {
    let (h, hooked) = hooked(store);
    *hooked.after.lock() = After::Hang;
    let dimensions = dims(&[("userId", "u1")]);
    let request = CheckRequest {
        deadline: None,
        customer: "acme",
        feature: "tokens",
        usage: Usage::units(100),
        dimensions: &dimensions,
        dry_run: false,
        commit: false,
    };
    // The caller gives up (Envoy resets the stream): the decision future is dropped while the
    // store has placed the hold and not yet answered.
    // It gives up only once the store has placed the hold (a fixed timeout could fire before
    // a slow commit placed it, which is the other test's case).
    let gave_up = h.run(async {
        tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                d = h.engine.check(&request) => Err(d),
                () = hooked.hung.notified() => Ok(()),
            }
        })
        .await
    });
    assert!(
        matches!(gave_up, Ok(Ok(()))),
        "the hung store answered, or never placed the hold: {gave_up:?}"
    );
    // The release runs on its own task; wait for it (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    // The release is counted once its change is stored (after the commit, on a durable store
    // in sync mode), so that is waited for too.
    while h.engine.store().stats().holds_open > 0
        || h.counted("acme", "u1", "user-day") > 0
        || h.engine.store().stats().abandoned_released == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned hold was not released"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    nothing_held(&h);
    assert!(h.engine.store().stats().abandoned_released >= 1);
}

/// The plan of a 100-unit check for u1, as the engine would hand it to the store.
fn plan_for_u1(h: &Harness) -> Plan {
    let model = h.engine.model();
    let auto = AutoEntities::default();
    let dimensions = dims(&[("userId", "u1")]);
    let Planned::Ready(plan) = model
        .plan(
            &Registry::new(&auto),
            "acme",
            "tokens",
            Usage::units(100),
            &dimensions,
            h.engine.now(),
        )
        .unwrap()
    else {
        panic!("u1 is in the tree")
    };
    plan
}

fn a_cancel_that_overtakes_its_reserve_makes_it_hold_nothing(store: Store) {
    let (h, _) = hooked(store);
    let mut plan = plan_for_u1(&h);
    plan.hold_tag = 0x5eed;
    let customer = plan.customer;
    let store = h.engine.store();
    // The cancel runs first (nothing to release yet)...
    assert!(
        !h.run(store.cancel(customer, plan.hold_tag, h.engine.now()))
            .unwrap()
    );
    let r = h
        .run(store.reserve(&plan, ReserveMode::Hold, h.engine.now()))
        .unwrap();
    // ...then a store that can run a call late (Redis) holds nothing for it; the in-process
    // stores cannot run a reserve after its caller's cancel, and they hold as asked.
    let redis = format!("{:?}", h.engine.store()).contains("RedisStore");
    if redis {
        assert_eq!(r.hold, None);
        nothing_held(&h);
    } else {
        let hold = r.hold.unwrap();
        assert!(
            h.run(store.cancel(customer, hold.tag, h.engine.now()))
                .unwrap()
        );
        nothing_held(&h);
    }
    // A cancel after the reserve releases it, on every store.
    plan.hold_tag = 0xbeef;
    let r = h
        .run(store.reserve(&plan, ReserveMode::Hold, h.engine.now()))
        .unwrap();
    assert!(r.hold.is_some());
    assert_eq!(h.counted("acme", "u1", "user-day"), 100);
    assert!(
        h.run(store.cancel(customer, 0xbeef, h.engine.now()))
            .unwrap()
    );
    nothing_held(&h);
    assert!(
        !h.run(store.cancel(customer, 0xbeef, h.engine.now()))
            .unwrap(),
        "once"
    );
}

/// A reserve that Redis runs twice (a Cluster client resends a script whose answer it lost)
/// holds once: the second run answers with the first run's hold, and a cancel of the tag
/// (what the caller does when it heard nothing) then leaves nothing behind.
fn a_reserve_run_twice_holds_once(store: Store) {
    let (h, _) = hooked(store);
    let mut plan = plan_for_u1(&h);
    plan.hold_tag = 0x7e7e;
    let store = h.engine.store();
    let first = h
        .run(store.reserve(&plan, ReserveMode::Hold, h.engine.now()))
        .unwrap();
    let again = h
        .run(store.reserve(&plan, ReserveMode::Hold, h.engine.now()))
        .unwrap();
    assert_eq!(again.hold, first.hold, "the same hold, not a second one");
    assert_eq!(h.counted("acme", "u1", "user-day"), 100, "held once");
    assert_eq!(h.counted("acme", "u1", "user-slots"), 1, "one slot");
    assert_eq!(
        again.readings[0].current_usage, 100,
        "the replay reads the counter as it is"
    );
    assert!(
        h.run(store.cancel(plan.customer, plan.hold_tag, h.engine.now()))
            .unwrap()
    );
    nothing_held(&h);
    assert_eq!(h.engine.store().stats().script_disagreements, 0);
}

/// A commit whose answer was lost and that the Cluster client runs again counts once: the
/// second run answers as the first decided, with no hold, and changes nothing.
fn a_commit_run_twice_counts_once(store: Store) {
    let (h, _) = hooked(store);
    let mut plan = plan_for_u1(&h);
    plan.hold_tag = 0xc0c0;
    let store = h.engine.store();
    let first = h
        .run(store.reserve(&plan, ReserveMode::Commit, h.engine.now()))
        .unwrap();
    assert_eq!((first.blocking, &first.hold), (None, &None));
    let again = h
        .run(store.reserve(&plan, ReserveMode::Commit, h.engine.now()))
        .unwrap();
    assert_eq!((again.blocking, &again.hold), (None, &None));
    assert_eq!(h.counted("acme", "u1", "user-day"), 100, "counted once");
    assert_eq!(h.counted("acme", "u1", "user-slots"), 0, "no slot kept");
    assert_eq!(again.readings[0].current_usage, 100);
    // Another decision (another tag) counts as usual.
    plan.hold_tag = 0xc0c1;
    h.run(store.reserve(&plan, ReserveMode::Commit, h.engine.now()))
        .unwrap();
    assert_eq!(h.counted("acme", "u1", "user-day"), 200);
    assert_eq!(h.engine.store().stats().holds_open, 0);
    assert_eq!(h.engine.store().stats().script_disagreements, 0);
}

/// A commit's tag guards against a resend of its script call for a few store timeouts (the
/// tests' stores wait 5 s, so 20 s), not for the hold TTL (five minutes here): at production
/// rates the TTL would keep millions of tags in Redis. Seen from outside: the same call resent
/// within the window counts nothing more; once a later commit that prunes has passed the
/// window, its tag is gone and a resend (which no client sends that late) would count again.
fn a_commit_is_guarded_against_a_resend_for_seconds_not_the_hold_ttl(store: Store) {
    let (h, _) = hooked(store);
    let mut plan = plan_for_u1(&h);
    plan.hold_tag = 0xd0d0;
    let store = h.engine.store();
    let at = h.engine.now();
    h.run(store.reserve(&plan, ReserveMode::Commit, at))
        .unwrap();
    assert_eq!(plan.hold_ttl_millis, 300_000, "holds live five minutes");
    // Another commit now (one whose tag ends in hex 0 drops past guards, as one random tag in
    // 16 does), then the first call resent as it was: what is counted after.
    let another_then_resend = |tag: u128| {
        let mut other = plan_for_u1(&h);
        other.hold_tag = tag;
        h.run(store.reserve(&other, ReserveMode::Commit, h.engine.now()))
            .unwrap();
        h.run(store.reserve(&plan, ReserveMode::Commit, at))
            .unwrap();
        h.counted("acme", "u1", "user-day")
    };
    h.advance_secs(19);
    assert_eq!(
        another_then_resend(0xd0d1),
        200,
        "resent inside the window: once"
    );
    h.advance_secs(2);
    assert_eq!(
        another_then_resend(0xd0e0),
        400,
        "21 s later the tag is no longer kept, though holds live five minutes"
    );
}
