//! Decisions through the engine, limit kind by limit kind, run against every counter store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use std::sync::Arc;

use common::*;
use tollgate::core::model::Mode;
use tollgate::core::plan::PlanError;
use tollgate::core::usage::Usage;
use tollgate::core::{HoldId, Timestamp};
use tollgate::store::{CloseOutcome, CounterStore, StoreError};
use tollgate::{CheckRequest, DecisionError};

type Store = Arc<dyn CounterStore>;

test_with_all_stores! {
    rate_has_no_burst_at_the_window_edge,
    quota_rolls_over_at_month_end,
    quota_rolls_over_across_a_leap_day,
    a_late_clock_never_reopens_a_closed_period,
    concurrency_counts_requests_in_flight,
    credits_spend_soonest_expiring_grant_first,
    credits_isolated_pools,
    shadow_and_soft_never_deny_and_record_would_deny,
    a_denial_holds_nothing_and_names_the_blocking_level,
    chain_reports_every_level_leaf_to_root,
    no_matching_limit_is_allowed_and_says_so,
    dry_run_holds_nothing,
    settle_corrects_and_is_idempotent,
    release_undoes_a_hold,
    expiry_commits_the_held_amount,
    dimension_scoped_limits,
    bad_dimensions_are_errors_and_change_nothing,
    auto_created_entities_are_bounded,
    derived_features_count_requests_and_price_credits,
    a_hold_id_with_another_tag_reaches_nothing,
    a_settlement_over_the_maximum_is_refused_and_changes_nothing,
    a_call_to_a_model_may_settle_up_to_what_the_model_can_use,
    a_feature_sets_its_own_settlement_maximum,
    a_dry_run_creates_nothing,
    replicas_share_auto_entities_their_parents_and_the_cap,
    auto_created_ids_obey_the_config_rules,
    ingest_keys_are_idempotent_kept_for_their_retention_and_evicted_oldest_first,
    a_commit_counts_at_once_and_holds_nothing,
    a_feature_that_commits_at_check_never_holds,
    racing_commits_count_exactly_up_to_the_cap,
    a_streams_slice_is_checked_like_a_call_but_takes_no_second_slot,
    a_streams_first_hold_settles_up_to_its_budget_where_a_call_is_capped,
}

test_with_all_store_factories! {
    ids_from_before_a_restart_never_close_a_later_hold,
}

const USER_RATE: &str = r#"
limits:
  - { id: user-rate, entityType: user, feature: tokens, kind: rate, limit: 100, window: PT1M }
"#;

fn rate_has_no_burst_at_the_window_edge(store: Store) {
    let h = harness(&tree_with(USER_RATE), store, "2026-03-10T10:00:59.900Z");
    let d = h.check("acme", "tokens", 100, &[("userId", "u1")]);
    assert!(d.granted);
    // A fixed one-minute window would reset at 10:01:00. A rolling one does not.
    h.clock.set(at("2026-03-10T10:01:00.100Z"));
    let d = h.check("acme", "tokens", 1, &[("userId", "u1")]);
    assert!(!d.granted);
    let denial = d.denial.unwrap();
    assert_eq!(
        (
            denial.limit_id.as_str(),
            denial.kind.as_str(),
            denial.entity_id.as_str()
        ),
        ("user-rate", "rate", "u1")
    );
    let retry = denial.retry_at.unwrap();
    assert!(
        retry >= at("2026-03-10T10:01:59.900Z"),
        "retry {retry} is less than a window after the spend"
    );
    h.clock.set(Timestamp::from_millis(retry.millis() - 1));
    assert!(!h.check("acme", "tokens", 1, &[("userId", "u1")]).granted);
    h.clock.set(retry);
    assert!(h.check("acme", "tokens", 1, &[("userId", "u1")]).granted);
    // Another user has a counter of its own.
    assert!(h.check("acme", "tokens", 100, &[("userId", "u2")]).granted);
}

fn quota_rolls_over_at_month_end(store: Store) {
    let limits = r#"
limits:
  - { id: org-month, entity: acme, feature: tokens, kind: quota, limit: 1000, period: P1M, anchor: "2026-01-31T00:00:00Z" }
"#;
    let h = harness(&tree_with(limits), store, "2026-02-27T12:00:00Z");
    assert!(h.check("acme", "tokens", 1000, &[("userId", "u1")]).granted);
    let d = h.check("acme", "tokens", 1, &[("userId", "u1")]);
    assert!(!d.granted);
    // Anchored on the 31st: in February the period turns on the last day, the 28th.
    assert_eq!(d.denial.unwrap().retry_at, Some(at("2026-02-28T00:00:00Z")));
    h.clock.set(at("2026-02-27T23:59:59.999Z"));
    assert!(!h.check("acme", "tokens", 1, &[("userId", "u1")]).granted);
    h.clock.set(at("2026-02-28T00:00:00Z"));
    let d = h.check("acme", "tokens", 1, &[("userId", "u1")]);
    assert!(d.granted);
    assert_eq!(d.chain[0].reset_at, Some(at("2026-03-31T00:00:00Z")));
    assert_eq!(d.chain[0].current_usage, 1);
}

/// Two engines on one store (two replicas on one Redis), one clock 50 ms behind the other,
/// around the turn of a daily quota: the late one counts in the new period too, and never
/// resets it to spend the old period's remainder again.
fn a_late_clock_never_reopens_a_closed_period(store: Store) {
    let limits = r#"
limits:
  - { id: team-day, entity: t1, feature: tokens, kind: quota, limit: 100, period: P1D }
"#;
    let yaml = tree_with(limits);
    let ahead = harness(&yaml, Arc::clone(&store), "2026-03-10T00:00:00.020Z");
    let late = harness_on(
        Arc::clone(&ahead.rt),
        &yaml,
        store,
        "2026-03-09T23:59:59.970Z",
    );
    assert!(
        ahead
            .check("acme", "tokens", 80, &[("userId", "u1")])
            .granted
    );
    // Still the 9th by its clock: it sees the 10th's 80, not an empty 9th.
    let d = late.check("acme", "tokens", 30, &[("userId", "u2")]);
    assert!(
        !d.granted,
        "the late replica spent past the new period's cap"
    );
    assert!(
        late.check("acme", "tokens", 20, &[("userId", "u2")])
            .granted
    );
    assert_eq!(ahead.counted("acme", "t1", "team-day"), 100);
    assert!(
        !ahead
            .check("acme", "tokens", 1, &[("userId", "u1")])
            .granted
    );
}

fn quota_rolls_over_across_a_leap_day(store: Store) {
    let limits = r#"
limits:
  - { id: team-day, entityType: team, feature: tokens, kind: quota, limit: 500, period: P1D }
"#;
    let h = harness(&tree_with(limits), store, "2028-02-28T23:00:00Z");
    assert!(h.check("acme", "tokens", 500, &[("userId", "u1")]).granted);
    let d = h.check("acme", "tokens", 1, &[("userId", "u2")]);
    assert_eq!(d.denial.unwrap().retry_at, Some(at("2028-02-29T00:00:00Z")));
    h.clock.set(at("2028-02-29T00:00:00Z"));
    let d = h.check("acme", "tokens", 500, &[("userId", "u2")]);
    assert!(d.granted);
    assert_eq!(d.chain[0].reset_at, Some(at("2028-03-01T00:00:00Z")));
    assert!(!h.check("acme", "tokens", 1, &[("userId", "u1")]).granted);
    h.clock.set(at("2028-03-01T00:00:00Z"));
    assert!(h.check("acme", "tokens", 500, &[("userId", "u1")]).granted);
}

fn concurrency_counts_requests_in_flight(store: Store) {
    let limits = r#"
limits:
  - { id: user-slots, entityType: user, feature: tokens, kind: concurrency, limit: 2 }
"#;
    let h = harness(&tree_with(limits), store, "2026-03-10T10:00:00Z");
    let a = h.check("acme", "tokens", 5_000, &[("userId", "u1")]);
    let b = h.check("acme", "tokens", 5_000, &[("userId", "u1")]);
    assert!(a.granted && b.granted);
    let c = h.check("acme", "tokens", 1, &[("userId", "u1")]);
    assert!(!c.granted);
    assert_eq!(c.denial.as_ref().unwrap().kind.as_str(), "concurrency");
    assert_eq!(c.denial.unwrap().retry_at, None);
    assert_eq!(h.counted("acme", "u1", "user-slots"), 2);
    h.settle(a.hold_id.as_ref().unwrap(), 4_000);
    assert_eq!(h.counted("acme", "u1", "user-slots"), 1);
    let c = h.check("acme", "tokens", 1, &[("userId", "u1")]);
    assert!(c.granted);
    h.run(h.engine.release(c.hold_id.as_ref().unwrap()))
        .unwrap();
    // Expiry frees the slot too.
    h.advance_secs(301);
    h.run(h.engine.expire_due()).unwrap();
    assert_eq!(h.counted("acme", "u1", "user-slots"), 0);
}

const CREDITS: &str = r#"
limits:
  - { id: org-credits, entity: acme, feature: credits, kind: credits }
grants:
  - { id: late, entity: acme, feature: credits, amount: 100, priority: 1, category: paid }
  - { id: soon, entity: acme, feature: credits, amount: 100, priority: 1, category: paid, expiresAt: "2026-04-01T00:00:00Z" }
  - { id: low, entity: acme, feature: credits, amount: 1000, priority: 5, category: promo }
"#;

fn credits_spend_soonest_expiring_grant_first(store: Store) {
    let h = harness(&tree_with(CREDITS), store, "2026-03-10T10:00:00Z");
    // Priced at 1 credit per token for model "small": 150 credits span two grants.
    let d = h.check_usage(
        "acme",
        "tokens",
        tokens(150, 0, 0),
        &[("userId", "u1"), ("model", "small")],
    );
    assert!(d.granted);
    let entry = &d.chain[0];
    assert_eq!(
        (entry.limit_id.as_str(), entry.requested, entry.remaining),
        ("org-credits", 150, 1050)
    );
    // The soonest-expiring grant went first and is spent in full: no usable grant expires now.
    assert_eq!(entry.reset_at, None);
    h.settle(d.hold_id.as_ref().unwrap(), 150);
    // Had the never-expiring grant been spent first, 50 of `soon` would now expire unused.
    h.clock.set(at("2026-04-01T00:00:00Z"));
    let d = h.dry_run("acme", "credits", 0, &[("userId", "u1")]);
    assert_eq!(
        d.chain[0].remaining, 1050,
        "`soon` was spent in full before `late`"
    );
    // Priority 5 is spent only after both priority-1 grants.
    let d = h.check("acme", "credits", 60, &[("userId", "u1")]);
    assert!(d.granted);
    let d = h.check("acme", "credits", 990, &[("userId", "u1")]);
    assert!(d.granted);
    assert!(!h.check("acme", "credits", 1, &[("userId", "u1")]).granted);
}

fn credits_isolated_pools(store: Store) {
    let limits = r#"
limits:
  - { id: key-credits, entity: acme, feature: credits, kind: credits, poolBy: apiKey }
grants:
  - { id: a, entity: acme, feature: credits, pool: key-a, amount: 100, category: paid }
  - { id: b, entity: acme, feature: credits, pool: key-b, amount: 10, category: promo }
"#;
    let h = harness(&tree_with(limits), store, "2026-03-10T10:00:00Z");
    let b = [("userId", "u1"), ("apiKey", "key-b")];
    assert!(h.check("acme", "credits", 10, &b).granted);
    let d = h.check("acme", "credits", 1, &b);
    assert!(
        !d.granted,
        "key-b's pool is empty even though key-a's is not"
    );
    assert!(
        h.check(
            "acme",
            "credits",
            100,
            &[("userId", "u1"), ("apiKey", "key-a")]
        )
        .granted
    );
    // A pool never granted, or no pool named, holds nothing: never silently unlimited.
    assert!(
        !h.check(
            "acme",
            "credits",
            1,
            &[("userId", "u1"), ("apiKey", "key-zzz")]
        )
        .granted
    );
    assert!(!h.check("acme", "credits", 1, &[("userId", "u1")]).granted);
    assert_eq!(
        h.run(
            h.engine
                .counted("acme", "acme", "key-credits", Some("key-b"))
        )
        .unwrap(),
        Some(10)
    );
}

fn shadow_and_soft_never_deny_and_record_would_deny(store: Store) {
    let limits = r#"
limits:
  - { id: team-shadow, entityType: team, feature: tokens, kind: quota, limit: 10, period: P1D, mode: shadow }
  - { id: dept-soft, entityType: dept, feature: tokens, kind: rate, limit: 15, window: PT1H, mode: soft }
"#;
    let h = harness(&tree_with(limits), store, "2026-03-10T10:00:00Z");
    let d = h.check("acme", "tokens", 20, &[("userId", "u1")]);
    assert!(d.granted);
    assert!(d.denial.is_none());
    let would: Vec<(&str, Mode)> = d
        .would_deny()
        .map(|e| (e.limit_id.as_str(), e.mode))
        .collect();
    assert_eq!(
        would,
        [("team-shadow", Mode::Shadow), ("dept-soft", Mode::Soft)]
    );
    // The usage is counted all the same, past the limit.
    assert_eq!(h.counted("acme", "t1", "team-shadow"), 20);
    assert_eq!(h.counted("acme", "d1", "dept-soft"), 20);
    let d = h.check("acme", "tokens", 1, &[("userId", "u2")]);
    assert!(d.granted);
    assert_eq!(d.chain[0].remaining, 0);
    assert!(d.chain[0].exceeded);
}

fn a_denial_holds_nothing_and_names_the_blocking_level(store: Store) {
    let limits = r#"
limits:
  - { id: user-rate, entityType: user, feature: tokens, kind: rate, limit: 1000, window: PT1M }
  - { id: team-day, entityType: team, feature: tokens, kind: quota, limit: 1000, period: P1D }
  - { id: org-day, entity: acme, feature: tokens, kind: quota, limit: 100, period: P1D }
"#;
    let h = harness(&tree_with(limits), store, "2026-03-10T10:00:00Z");
    assert!(h.check("acme", "tokens", 90, &[("userId", "u1")]).granted);
    let d = h.check("acme", "tokens", 20, &[("userId", "u3")]);
    assert!(!d.granted);
    assert_eq!(d.hold_id, None);
    let denial = d.denial.unwrap();
    assert_eq!(denial.level, 3);
    assert_eq!(
        (denial.entity_id.as_str(), denial.limit_id.as_str()),
        ("acme", "org-day")
    );
    assert_eq!(
        denial.reason,
        "quota limit `org-day` on org `acme` (chain level 3): 90 of 100 used, 20 requested"
    );
    assert_eq!(denial.retry_at, Some(at("2026-03-11T00:00:00Z")));
    // Levels that passed were not touched.
    assert_eq!(
        h.run(h.engine.counted("acme", "u3", "user-rate", None))
            .unwrap(),
        None
    );
    assert_eq!(h.counted("acme", "t2", "team-day"), 0);
    assert_eq!(h.counted("acme", "acme", "org-day"), 90);
    assert_eq!(h.engine.store().stats().holds_open, 1);
}

fn chain_reports_every_level_leaf_to_root(store: Store) {
    let limits = r#"
limits:
  - { id: user-rate, entityType: user, feature: tokens, kind: rate, limit: 1000, window: PT1M }
  - { id: team-day, entityType: team, feature: tokens, kind: quota, limit: 5000, period: P1D }
  - { id: dept-slots, entityType: dept, feature: tokens, kind: concurrency, limit: 3 }
  - { id: org-month, entity: acme, feature: tokens, kind: quota, limit: 100000, period: P1M }
"#;
    let h = harness(&tree_with(limits), store, "2026-03-10T10:00:00Z");
    let d = h.check("acme", "tokens", 250, &[("userId", "u1")]);
    assert!(d.granted && !d.no_matching_limit);
    let got: Vec<(usize, &str, &str, &str, u64, u64, u64)> = d
        .chain
        .iter()
        .map(|e| {
            (
                e.level,
                e.entity_id.as_str(),
                e.entity_type.as_str(),
                e.limit_id.as_str(),
                e.usage_limit,
                e.current_usage,
                e.remaining,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (0, "u1", "user", "user-rate", 1000, 250, 750),
            (1, "t1", "team", "team-day", 5000, 250, 4750),
            (2, "d1", "dept", "dept-slots", 3, 1, 2),
            (3, "acme", "org", "org-month", 100000, 250, 99750),
        ]
    );
    assert_eq!(d.chain[3].reset_at, Some(at("2026-04-01T00:00:00Z")));
    assert_eq!(d.tightest().unwrap().limit_id, "dept-slots");
    assert!(d.hold_id.is_some());
}

fn no_matching_limit_is_allowed_and_says_so(store: Store) {
    let limits = r#"
limits:
  - { id: gpt4-only, entityType: team, feature: tokens, kind: quota, limit: 1, period: P1D, scope: { model: "gpt-4*" } }
"#;
    let h = harness(&tree_with(limits), store, "2026-03-10T10:00:00Z");
    let d = h.check(
        "acme",
        "tokens",
        1_000_000,
        &[("userId", "u1"), ("model", "small")],
    );
    assert!(d.granted);
    assert!(d.no_matching_limit);
    assert!(d.chain.is_empty());
    assert_eq!(d.hold_id, None);
}

fn dry_run_holds_nothing(store: Store) {
    let h = harness(&tree_with(USER_RATE), store, "2026-03-10T10:00:00Z");
    let d = h.dry_run("acme", "tokens", 60, &[("userId", "u1")]);
    assert!(d.granted && d.dry_run);
    assert_eq!(d.hold_id, None);
    assert_eq!(d.chain[0].current_usage, 0);
    assert!(h.check("acme", "tokens", 60, &[("userId", "u1")]).granted);
    let d = h.dry_run("acme", "tokens", 60, &[("userId", "u1")]);
    assert!(!d.granted);
    assert_eq!(d.denial.unwrap().limit_id, "user-rate");
    assert_eq!(h.counted("acme", "u1", "user-rate"), 60);
}

fn settle_corrects_and_is_idempotent(store: Store) {
    let h = harness(&tree_with(USER_RATE), store, "2026-03-10T10:00:00Z");
    let d = h.check("acme", "tokens", 80, &[("userId", "u1")]);
    let hold = d.hold_id.unwrap();
    assert_eq!(
        h.run(h.engine.settle(&hold, Usage::units(30))).unwrap(),
        CloseOutcome::Closed
    );
    assert_eq!(h.counted("acme", "u1", "user-rate"), 30);
    assert_eq!(
        h.run(h.engine.settle(&hold, Usage::units(90))).unwrap(),
        CloseOutcome::AlreadyClosed
    );
    assert_eq!(
        h.run(h.engine.release(&hold)).unwrap(),
        CloseOutcome::AlreadyClosed
    );
    assert_eq!(h.counted("acme", "u1", "user-rate"), 30);
    // Actual usage above the hold is recorded too: it happened.
    let hold = h
        .check("acme", "tokens", 10, &[("userId", "u1")])
        .hold_id
        .unwrap();
    h.settle(&hold, 95);
    assert_eq!(h.counted("acme", "u1", "user-rate"), 125);
    assert!(!h.check("acme", "tokens", 1, &[("userId", "u1")]).granted);
    let unknown = HoldId {
        customer: "acme".into(),
        seq: 999,
        tag: 7,
    };
    assert_eq!(
        h.run(h.engine.settle(&unknown, Usage::units(1))),
        Err(DecisionError::Store(StoreError::UnknownHold(
            "acme:999:00000000000000000000000000000007".into()
        )))
    );
}

fn a_hold_id_with_another_tag_reaches_nothing(store: Store) {
    let h = harness(&tree_with(USER_RATE), store, "2026-03-10T10:00:00Z");
    let a = h.check("acme", "tokens", 40, &[("userId", "u1")]);
    let b = h.check("acme", "tokens", 20, &[("userId", "u1")]);
    let (a, b) = (a.hold_id.unwrap(), b.hold_id.unwrap());
    assert_ne!(a.tag, b.tag, "every hold draws its own tag");
    assert_ne!(a.tag, 0);
    assert_eq!(a.to_string().rsplit(':').next().unwrap().len(), 32);
    // The right number with a guessed tag reaches no open hold: nothing moves.
    for guess in [0, 1, a.tag ^ 1, b.tag] {
        let forged = HoldId {
            tag: guess,
            ..a.clone()
        };
        assert_eq!(
            h.run(h.engine.settle(&forged, Usage::units(0))),
            Ok(CloseOutcome::AlreadyClosed)
        );
        assert_eq!(
            h.run(h.engine.release(&forged)),
            Ok(CloseOutcome::AlreadyClosed)
        );
    }
    assert_eq!(h.counted("acme", "u1", "user-rate"), 60);
    h.settle(&a, 10);
    h.release(&b);
    assert_eq!(h.counted("acme", "u1", "user-rate"), 10);
}

fn a_settlement_over_the_maximum_is_refused_and_changes_nothing(store: Store) {
    let limits = r#"
limits:
  - { id: user-day, entityType: user, feature: tokens, kind: quota, limit: 100000, period: P1D }
  - { id: team-day, entityType: team, feature: tokens, kind: quota, limit: 100000, period: P1D }
"#;
    let h = harness(&tree_with(limits), store, "2026-03-10T10:00:00Z");
    let hold = h
        .check("acme", "tokens", 50, &[("userId", "u1")])
        .hold_id
        .unwrap();
    // Ten times the request is the default bound: 500 may settle, 501 may not.
    for too_much in [
        Usage::units(501),
        Usage::units(u64::MAX),
        tokens(400, 101, 0),
        Usage {
            units: 10,
            tokens: Some(tollgate::core::usage::TokenCounts {
                input: u64::MAX,
                output: u64::MAX,
                ..Default::default()
            }),
        },
    ] {
        match h.run(h.engine.settle(&hold, too_much)) {
            Err(DecisionError::Store(StoreError::SettleTooLarge { max, .. })) => {
                assert_eq!(max, 500)
            }
            other => panic!("{too_much:?} settled: {other:?}"),
        }
        assert_eq!(
            h.counted("acme", "u1", "user-day"),
            50,
            "the hold is untouched"
        );
        assert_eq!(h.counted("acme", "t1", "team-day"), 50);
    }
    // The largest legitimate over-settlement still works, once.
    assert_eq!(
        h.run(h.engine.settle(&hold, Usage::units(500))).unwrap(),
        CloseOutcome::Closed
    );
    assert_eq!(h.counted("acme", "u1", "user-day"), 500);
    assert_eq!(h.counted("acme", "t1", "team-day"), 500);
    // A release has no usage to bound.
    let hold = h
        .check("acme", "tokens", 0, &[("userId", "u1")])
        .hold_id
        .unwrap();
    assert!(matches!(
        h.run(h.engine.settle(&hold, Usage::units(11))),
        Err(DecisionError::Store(StoreError::SettleTooLarge {
            max: 10,
            ..
        }))
    ));
    h.release(&hold);
    assert_eq!(h.counted("acme", "u1", "user-day"), 500);
}

/// A stored conversation, a file or an image makes a call use many times what its request
/// looked like: for a call to a model the bound is what that model can use, not ten times the
/// hold.
fn a_call_to_a_model_may_settle_up_to_what_the_model_can_use(store: Store) {
    let limits = r#"
limits:
  - { id: user-day, entityType: user, feature: tokens, kind: quota, limit: 100000000, period: P1D }
"#;
    let yaml = tree_with(limits).replace(
        "cacheWritePerMillion: 2500000 }",
        "cacheWritePerMillion: 2500000, contextWindow: 128000, maxOutput: 16384 }",
    );
    assert!(yaml.contains("contextWindow"));
    let h = harness(&yaml, store, "2026-03-10T10:00:00Z");
    // A hold of `units` for a call to `model` (none: no model dimension), whose settlement
    // may report at most `max`: one more is refused, then `charged` settles it.
    let call = |model: Option<&str>, units: u64, max: u64, charged: Option<u64>| {
        let mut dims = vec![("userId", "u1")];
        dims.extend(model.map(|m| ("model", m)));
        let hold = h.check("acme", "tokens", units, &dims).hold_id.unwrap();
        assert!(
            matches!(
                h.run(h.engine.settle(&hold, Usage::units(max + 1))),
                Err(DecisionError::Store(StoreError::SettleTooLarge { max: m, .. })) if m == max
            ),
            "{model:?}: more than {max}"
        );
        match charged {
            Some(c) => h.settle(&hold, c),
            None => h.release(&hold),
        }
    };
    // A Responses call with `previous_response_id`: held 76, reported 8,020, under the price
    // table's window and output (144,384).
    call(Some("big-4"), 76, 144_384, Some(8_020));
    call(Some("big-4"), 76, 144_384, Some(144_384));
    // A model the table gives no window for: the default ceiling.
    call(Some("small"), 98, 2_000_000, Some(1_230));
    assert_eq!(h.counted("acme", "u1", "user-day"), 8_020 + 144_384 + 1_230);
    // No model: ten times the request, as before.
    call(None, 5, 50, None);
}

fn a_feature_sets_its_own_settlement_maximum(store: Store) {
    let yaml = tree_with(
        r#"
limits:
  - { id: user-day, entityType: user, feature: tokens, kind: quota, limit: 1000000, period: P1D }
"#,
    )
    .replace(
        "  - id: tokens\n",
        "  - id: tokens\n    maxSettleUsage: 200000\n",
    );
    assert!(yaml.contains("maxSettleUsage"));
    let h = harness(&yaml, store, "2026-03-10T10:00:00Z");
    let hold = h
        .check("acme", "tokens", 10, &[("userId", "u1")])
        .hold_id
        .unwrap();
    assert!(matches!(
        h.run(h.engine.settle(&hold, Usage::units(200_001))),
        Err(DecisionError::Store(StoreError::SettleTooLarge {
            max: 200_000,
            ..
        }))
    ));
    h.settle(&hold, 150_000);
    assert_eq!(h.counted("acme", "u1", "user-day"), 150_000);
}

/// A store that lost its state (a restart of the in-memory store, a crash inside the durable
/// store's commit window, a Redis without persistence) numbers holds from where it stands; an
/// id from before must never close the new hold that got its number.
fn ids_from_before_a_restart_never_close_a_later_hold(stores: &dyn Fn() -> Store) {
    let before = harness(&tree_with(USER_RATE), stores(), "2026-03-10T10:00:00Z");
    let old = before
        .check("acme", "tokens", 30, &[("userId", "u1")])
        .hold_id
        .unwrap();
    let after = harness(&tree_with(USER_RATE), stores(), "2026-03-10T10:00:00Z");
    let new = after
        .check("acme", "tokens", 70, &[("userId", "u1")])
        .hold_id
        .unwrap();
    assert_eq!(
        new.seq, old.seq,
        "the lost state numbers from the same place"
    );
    assert_ne!(new.to_string(), old.to_string(), "ids never repeat");
    assert_eq!(
        after.run(after.engine.settle(&old, Usage::units(1))),
        Ok(CloseOutcome::AlreadyClosed),
        "the old id reaches nothing"
    );
    assert_eq!(
        after.counted("acme", "u1", "user-rate"),
        70,
        "the new hold is untouched"
    );
    after.settle(&new, 5);
    assert_eq!(after.counted("acme", "u1", "user-rate"), 5);
}

fn release_undoes_a_hold(store: Store) {
    let h = harness(&tree_with(USER_RATE), store, "2026-03-10T10:00:00Z");
    let hold = h
        .check("acme", "tokens", 100, &[("userId", "u1")])
        .hold_id
        .unwrap();
    assert!(!h.check("acme", "tokens", 1, &[("userId", "u1")]).granted);
    assert_eq!(
        h.run(h.engine.release(&hold)).unwrap(),
        CloseOutcome::Closed
    );
    assert_eq!(h.counted("acme", "u1", "user-rate"), 0);
    assert!(h.check("acme", "tokens", 100, &[("userId", "u1")]).granted);
}

fn expiry_commits_the_held_amount(store: Store) {
    let limits = r#"
limits:
  - { id: team-day, entityType: team, feature: tokens, kind: quota, limit: 1000, period: P1D }
  - { id: user-slots, entityType: user, feature: tokens, kind: concurrency, limit: 1 }
"#;
    let h = harness(&tree_with(limits), store, "2026-03-10T10:00:00Z");
    let hold = h
        .check("acme", "tokens", 400, &[("userId", "u1")])
        .hold_id
        .unwrap();
    h.advance_secs(299);
    assert_eq!(h.run(h.engine.expire_due()).unwrap(), 0);
    h.advance_secs(1);
    assert_eq!(h.run(h.engine.expire_due()).unwrap(), 1);
    assert_eq!(h.counted("acme", "t1", "team-day"), 400);
    assert_eq!(h.counted("acme", "u1", "user-slots"), 0);
    assert_eq!(
        h.run(h.engine.settle(&hold, Usage::units(10))).unwrap(),
        CloseOutcome::AlreadyClosed
    );
    assert_eq!(h.counted("acme", "t1", "team-day"), 400);
    assert_eq!(h.engine.store().stats().holds_open, 0);
}

fn dimension_scoped_limits(store: Store) {
    let limits = r#"
limits:
  - { id: gpt4, entityType: team, feature: tokens, kind: quota, limit: 100, period: P1D, scope: { model: "gpt-4*" } }
"#;
    let h = harness(&tree_with(limits), store, "2026-03-10T10:00:00Z");
    assert!(
        h.check(
            "acme",
            "tokens",
            100,
            &[("userId", "u1"), ("model", "gpt-4o")]
        )
        .granted
    );
    let d = h.check(
        "acme",
        "tokens",
        1,
        &[("userId", "u1"), ("model", "gpt-4.1-mini")],
    );
    assert_eq!(d.denial.unwrap().limit_id, "gpt4");
    assert!(
        h.check(
            "acme",
            "tokens",
            1_000,
            &[("userId", "u1"), ("model", "o3")]
        )
        .granted
    );
    assert!(
        h.check("acme", "tokens", 1_000, &[("userId", "u1")])
            .granted
    );
    // Another team has its own gpt-4 counter.
    assert!(
        h.check(
            "acme",
            "tokens",
            100,
            &[("userId", "u3"), ("model", "gpt-4o")]
        )
        .granted
    );
}

fn bad_dimensions_are_errors_and_change_nothing(store: Store) {
    let h = harness(&tree_with(USER_RATE), store, "2026-03-10T10:00:00Z");
    let run = |customer: &str, feature: &str, d: &[(&str, &str)]| {
        let dimensions = dims(d);
        h.run(h.engine.check(&CheckRequest {
            deadline: None,
            customer,
            feature,
            usage: Usage::units(1),
            dimensions: &dimensions,
            dry_run: false,
            commit: false,
        }))
        .unwrap_err()
    };
    assert_eq!(
        run("nobody", "tokens", &[]),
        DecisionError::Plan(PlanError::UnknownCustomer("nobody".into()))
    );
    assert_eq!(
        run("acme", "gold", &[]),
        DecisionError::Plan(PlanError::UnknownFeature("gold".into()))
    );
    assert_eq!(
        run("acme", "tokens", &[("userId", "mallory")]).to_string(),
        "dimension `userId` names entity `mallory`, which customer `acme` does not have"
    );
    assert_eq!(
        run("acme", "tokens", &[("userId", "t1")]).to_string(),
        "dimension `userId` names entity `t1`, which is a `team`, not a `user`"
    );
    assert_eq!(
        run("acme", "tokens", &[("userId", "u1"), ("teamId", "t3")]).to_string(),
        "dimensions disagree: `u1` is not under `t3` in customer `acme`'s tree"
    );
    let long = "x".repeat(300);
    assert_eq!(
        run("acme", "tokens", &[("userId", &long)]).to_string(),
        "dimension `userId` is longer than 256 bytes"
    );
    assert_eq!(h.engine.store().stats().counters, 0);
    assert_eq!(h.engine.store().stats().holds_open, 0);
}

fn auto_created_entities_are_bounded(store: Store) {
    let yaml = tree_with(
        r#"
maxAutoEntities: 2
autoCreateParents:
  user: t3
limits:
  - { id: team-day, entityType: team, feature: tokens, kind: quota, limit: 1000, period: P1D }
"#,
    )
    .replace(
        "  - dimension: userId\n    entityType: user\n",
        "  - dimension: userId\n    entityType: user\n    onUnknown: create\n",
    );
    let h = harness(&yaml, store, "2026-03-10T10:00:00Z");
    // Under the given team when one is named, else under the default parent.
    let d = h.check(
        "acme",
        "tokens",
        5,
        &[("userId", "new-1"), ("teamId", "t1")],
    );
    assert_eq!(d.chain[0].entity_id, "t1");
    let d = h.check("acme", "tokens", 5, &[("userId", "new-2")]);
    assert_eq!(d.chain[0].entity_id, "t3");
    // Known now: no new entity, same parent as before.
    let d = h.check("acme", "tokens", 5, &[("userId", "new-1")]);
    assert_eq!(d.chain[0].entity_id, "t1");
    let err = h.check_err("acme", "tokens", 1, &[("userId", "new-3")]);
    assert_eq!(
        err.to_string(),
        "cannot create entity `new-3`: customer `acme` already has 2 auto-created entities, the configured maximum"
    );
    assert_eq!(h.run(h.engine.auto_created("acme")).unwrap(), 2);
}

const AUTO: &str = r#"
maxAutoEntities: 3
autoCreateParents:
  user: t3
limits:
  - { id: team-day, entityType: team, feature: tokens, kind: quota, limit: 1000, period: P1D }
  - { id: user-day, entityType: user, feature: tokens, kind: quota, limit: 100, period: P1D }
"#;

fn auto_yaml() -> String {
    tree_with(AUTO).replace(
        "  - dimension: userId\n    entityType: user\n",
        "  - dimension: userId\n    entityType: user\n    onUnknown: create\n",
    )
}

fn a_dry_run_creates_nothing(store: Store) {
    let h = harness(&auto_yaml(), store, "2026-03-10T10:00:00Z");
    for i in 0..5 {
        // Answered as a real check would be, with the would-be entity in its place.
        let d = h.dry_run("acme", "tokens", 150, &[("userId", &format!("ghost-{i}"))]);
        assert!(!d.granted, "the user's own limit would deny");
        assert_eq!(d.chain[0].entity_id, "(new entity)");
        assert_eq!(d.chain[0].limit_id, "user-day");
        assert_eq!(d.chain[1].entity_id, "t3");
        let d = h.dry_run("acme", "tokens", 50, &[("userId", &format!("ghost-{i}"))]);
        assert!(d.granted);
    }
    assert_eq!(h.run(h.engine.auto_created("acme")).unwrap(), 0);
    // Real checks still have the whole cap.
    for i in 0..3 {
        assert!(
            h.check("acme", "tokens", 1, &[("userId", &format!("real-{i}"))])
                .granted
        );
    }
    assert_eq!(h.run(h.engine.auto_created("acme")).unwrap(), 3);
    // A dry run of an entity that exists reads its counters.
    let d = h.dry_run("acme", "tokens", 0, &[("userId", "real-0")]);
    assert_eq!(d.chain[0].entity_id, "real-0");
    assert_eq!(d.chain[0].current_usage, 1);
}

/// Two engines on one store are two replicas on one Redis (or two front ends of one process):
/// the entities created on the fly, their parents and the cap are the store's, not an engine's.
fn replicas_share_auto_entities_their_parents_and_the_cap(store: Store) {
    let a = harness(&auto_yaml(), Arc::clone(&store), "2026-03-10T10:00:00Z");
    let b = harness(&auto_yaml(), store, "2026-03-10T10:00:00Z");
    // First seen on A with a team: under t1.
    let d = a.check(
        "acme",
        "tokens",
        5,
        &[("userId", "agent-x"), ("teamId", "t1")],
    );
    assert_eq!(d.chain[1].entity_id, "t1");
    // Then on B without one: still under t1, not the default parent t3.
    let d = b.check("acme", "tokens", 5, &[("userId", "agent-x")]);
    let levels: Vec<&str> = d.chain.iter().map(|e| e.entity_id.as_str()).collect();
    assert_eq!(levels, ["agent-x", "t1"]);
    assert_eq!(b.counted("acme", "agent-x", "user-day"), 10);
    // One cap for both: two more on B, then neither may create.
    assert!(
        b.check("acme", "tokens", 1, &[("userId", "agent-y")])
            .granted
    );
    assert!(
        a.check("acme", "tokens", 1, &[("userId", "agent-z")])
            .granted
    );
    for h in [&a, &b] {
        let err = h.check_err("acme", "tokens", 1, &[("userId", "agent-w")]);
        assert!(
            matches!(
                err,
                DecisionError::Plan(PlanError::AutoEntityLimit { max: 3, .. })
            ),
            "{err}"
        );
        assert_eq!(h.run(h.engine.auto_created("acme")).unwrap(), 3);
    }
    // Entities the other replica created are known here too, with their parents.
    let d = a.check("acme", "tokens", 1, &[("userId", "agent-y")]);
    assert_eq!(d.chain[1].entity_id, "t3");
}

fn auto_created_ids_obey_the_config_rules(store: Store) {
    let h = harness(&auto_yaml(), store, "2026-03-10T10:00:00Z");
    let long = "x".repeat(129);
    for bad in [
        "line\nbreak",
        "nul\0",
        "rtl\u{202e}txt",
        "{acme}",
        "with space",
        "tab\t",
        "caf\u{e9}",
        long.as_str(),
    ] {
        let err = h.check_err("acme", "tokens", 1, &[("userId", bad)]);
        assert!(
            matches!(err, DecisionError::Plan(PlanError::BadEntityId { .. })),
            "{bad:?}: {err}"
        );
    }
    assert_eq!(h.run(h.engine.auto_created("acme")).unwrap(), 0);
    assert_eq!(h.engine.store().stats().holds_open, 0);
}

fn derived_features_count_requests_and_price_credits(store: Store) {
    let limits = r#"
limits:
  - { id: user-requests, entityType: user, feature: requests, kind: rate, limit: 2, window: PT1M }
  - { id: org-credits, entity: acme, feature: credits, kind: credits }
grants:
  - { id: g, entity: acme, feature: credits, amount: 1000000, category: paid }
"#;
    let h = harness(&tree_with(limits), store, "2026-03-10T10:00:00Z");
    let ctx = [("userId", "u1"), ("model", "big-1")];
    // No breakdown yet: 1000 tokens priced at the dearest rate, 8 credits per 1000 tokens... per
    // million: 1000 * 8_000_000 / 1_000_000 = 8000.
    let d = h.check_usage("acme", "tokens", Usage::units(1000), &ctx);
    let got: Vec<(&str, u64)> = d
        .chain
        .iter()
        .map(|e| (e.limit_id.as_str(), e.requested))
        .collect();
    assert_eq!(got, [("user-requests", 1), ("org-credits", 8000)]);
    // Settled with the real breakdown: 600 in, 300 out, 100 cached = 1200 + 2400 + 100.
    h.run(
        h.engine
            .settle(d.hold_id.as_ref().unwrap(), tokens(600, 300, 100)),
    )
    .unwrap();
    assert_eq!(h.counted("acme", "acme", "org-credits"), 3700);
    // Cache writes are priced at their own rate (2.5 per token), reasoning is part of output.
    let d2 = h.check_usage(
        "acme",
        "tokens",
        Usage::units(1000),
        &[("userId", "u2"), ("model", "big-1")],
    );
    let written = Usage {
        units: 700,
        tokens: Some(tollgate::core::usage::TokenCounts {
            input: 100,
            output: 200,
            cached: 0,
            cache_write: 400,
            reasoning: 50,
        }),
    };
    h.run(h.engine.settle(d2.hold_id.as_ref().unwrap(), written))
        .unwrap();
    assert_eq!(
        h.counted("acme", "acme", "org-credits"),
        3700 + 200 + 1600 + 1000
    );
    assert_eq!(h.counted("acme", "u1", "user-requests"), 1);
    assert!(
        h.check_usage("acme", "tokens", Usage::units(1), &ctx)
            .granted
    );
    let d = h.check_usage("acme", "tokens", Usage::units(1), &ctx);
    assert_eq!(d.denial.unwrap().limit_id, "user-requests");
}

const ORG_QUOTA: &str = r#"
limits:
  - { id: org-day, entity: acme, feature: tokens, kind: quota, limit: 1000, period: P1D }
"#;

/// Ingest through the engine as `POST /v1/usage` does: the key is remembered per customer for
/// `KEY_RETENTION` (one hour, four keys), oldest evicted first, and keys of the same
/// millisecond evicted in key order, which every backend can keep (a Redis sorted set breaks
/// score ties by member; the durable file restores by key).
fn ingest_keys_are_idempotent_kept_for_their_retention_and_evicted_oldest_first(store: Store) {
    let h = harness(&tree_with(ORG_QUOTA), store, "2026-03-10T10:00:00Z");
    let ingest = |customer: &str, key: &str, units: u64| {
        h.ingest(
            customer,
            "tokens",
            Usage::units(units),
            &[("userId", "u1")],
            key,
        )
    };
    assert!(ingest("acme", "b", 10));
    assert!(!ingest("acme", "b", 10), "a repeated key changes nothing");
    assert_eq!(h.counted("acme", "acme", "org-day"), 10);
    // Usage already happened: it is recorded past the cap.
    assert!(ingest("acme", "a", 2000));
    assert_eq!(h.counted("acme", "acme", "org-day"), 2010);

    // Four keys are kept. "a" and "b" share a millisecond: "a" sorts first, so it goes first.
    h.clock.advance_millis(1);
    assert!(ingest("acme", "c", 1));
    assert!(ingest("acme", "d", 1));
    assert!(ingest("acme", "e", 1), "a fifth key evicts the oldest");
    assert!(
        ingest("acme", "a", 1),
        "`a` was evicted, so it counts again"
    );
    assert!(!ingest("acme", "d", 1), "`d` is still remembered");
    assert_eq!(h.counted("acme", "acme", "org-day"), 2014);

    // An hour to the millisecond is still within the retention; past it, a key counts again.
    h.clock.advance_millis(3_600_000);
    assert!(!ingest("acme", "e", 1), "`e` is exactly an hour old");
    h.clock.advance_millis(1);
    assert!(ingest("acme", "e", 1), "`e` is past its hour");
    assert_eq!(h.counted("acme", "acme", "org-day"), 2015);
}

const COMMITS: &str = r#"
limits:
  - { id: team-day, entityType: team, feature: tokens, kind: quota, limit: 1000, period: P1D }
  - { id: user-slots, entityType: user, feature: tokens, kind: concurrency, limit: 1 }
  - { id: org-credits, entity: acme, feature: credits, kind: credits }
grants:
  - { id: g, entity: acme, feature: credits, amount: 1000000, category: paid }
"#;

fn a_commit_counts_at_once_and_holds_nothing(store: Store) {
    let h = harness(&tree_with(COMMITS), store, "2026-03-10T10:00:00Z");
    let u1 = [("userId", "u1"), ("model", "small")];
    let d = h.commit("acme", "tokens", Usage::units(400), &u1);
    assert!(d.granted);
    assert_eq!(d.hold_id, None);
    let team = d.chain.iter().find(|e| e.limit_id == "team-day").unwrap();
    assert_eq!((team.current_usage, team.remaining), (400, 600));
    // The slot was taken and given back; the credits were drawn.
    assert_eq!(h.counted("acme", "t1", "team-day"), 400);
    assert_eq!(h.counted("acme", "u1", "user-slots"), 0);
    assert_eq!(h.counted("acme", "acme", "org-credits"), 400);
    assert_eq!(h.engine.store().stats().holds_open, 0);
    // A concurrency limit is still checked: with the slot held, a commit is refused.
    let held = h.check_usage("acme", "tokens", Usage::units(100), &u1);
    let d = h.commit("acme", "tokens", Usage::units(1), &u1);
    assert_eq!(d.denial.unwrap().limit_id, "user-slots");
    h.release(held.hold_id.as_ref().unwrap());
    // Past the cap, refused, and nothing changes.
    assert!(h.commit("acme", "tokens", Usage::units(500), &u1).granted);
    let d = h.commit("acme", "tokens", Usage::units(101), &u1);
    assert_eq!(d.denial.unwrap().limit_id, "team-day");
    assert_eq!(h.counted("acme", "t1", "team-day"), 900);
    // Nothing expires later: it was counted once, at the decision.
    h.advance_secs(3600);
    assert_eq!(h.expire_due(), 0);
    assert_eq!(h.counted("acme", "t1", "team-day"), 900);
}

fn a_feature_that_commits_at_check_never_holds(store: Store) {
    let yaml = tree_with(
        "limits:\n  - { id: user-requests, entityType: user, feature: requests, kind: quota, limit: 3, period: P1D }\n",
    )
    .replace("  - id: requests\n", "  - id: requests\n    commitAtCheck: true\n");
    let h = harness(&yaml, store, "2026-03-10T10:00:00Z");
    for _ in 0..3 {
        let d = h.check("acme", "requests", 1, &[("userId", "u2")]);
        assert!(d.granted && d.hold_id.is_none(), "{d:?}");
    }
    assert!(!h.check("acme", "requests", 1, &[("userId", "u2")]).granted);
    assert_eq!(h.counted("acme", "u2", "user-requests"), 3);
    assert_eq!(h.engine.store().stats().holds_open, 0);
    // A dry run of it still holds and counts nothing.
    let d = h.dry_run("acme", "requests", 1, &[("userId", "u3")]);
    assert!(d.granted && d.hold_id.is_none());
    assert_eq!(h.counted("acme", "u3", "user-requests"), 0);
}

/// Eight tasks commit 1 to 7 units at a time against one 1,000-unit cap until refused: the
/// granted amounts sum to what the store counted, never past the cap, and the cap is filled
/// to within the largest request.
fn racing_commits_count_exactly_up_to_the_cap(store: Store) {
    let h = Arc::new(harness(&tree_with(COMMITS), store, "2026-03-10T10:00:00Z"));
    let granted: u64 = std::thread::scope(|s| {
        let tasks: Vec<_> = (0..8u64)
            .map(|t| {
                let h = Arc::clone(&h);
                s.spawn(move || {
                    let mut sum = 0;
                    let mut refused = 0;
                    for i in 0..400u64 {
                        let units = 1 + (t + i) % 7;
                        let user = ["u1", "u2"][usize::from(i % 2 == 0)];
                        let d =
                            h.commit("acme", "tokens", Usage::units(units), &[("userId", user)]);
                        if d.granted {
                            sum += units;
                        } else {
                            refused += 1;
                            if refused > 20 {
                                break;
                            }
                        }
                    }
                    sum
                })
            })
            .collect();
        tasks.into_iter().map(|t| t.join().unwrap()).sum()
    });
    let counted = h.counted("acme", "t1", "team-day");
    assert_eq!(granted, counted, "every granted unit counted once");
    assert!(counted <= 1000 && counted > 1000 - 7, "{counted}");
    assert_eq!(h.engine.store().stats().holds_open, 0);
}

/// A streamed call's next slice (`Engine::extend`): checked on every level like a call, held on
/// the unit limits, but it takes no concurrency slot (the call has one); the call then settles
/// its first hold at the whole usage and releases its slices.
fn a_streams_slice_is_checked_like_a_call_but_takes_no_second_slot(store: Store) {
    let limits = r#"
limits:
  - { id: user-slots, entityType: user, feature: tokens, kind: concurrency, limit: 1 }
  - { id: org-day, entity: acme, feature: tokens, kind: quota, limit: 1000, period: P1D }
"#;
    let h = harness(&tree_with(limits), store, "2026-03-10T10:00:00Z");
    let first = h.check("acme", "tokens", 300, &[("userId", "u1")]);
    assert!(first.granted);
    assert_eq!(h.counted("acme", "u1", "user-slots"), 1);
    let dimensions = dims(&[("userId", "u1")]);
    let slice = |units: u64| {
        h.run(h.engine.extend(&CheckRequest {
            deadline: None,
            customer: "acme",
            feature: "tokens",
            usage: Usage::units(units),
            dimensions: &dimensions,
            dry_run: false,
            commit: false,
        }))
        .unwrap()
    };
    // The slot is taken, yet the slice is granted: it asks for none.
    let s1 = slice(400);
    assert!(s1.granted, "{s1:?}");
    assert!(s1.chain.iter().all(|e| e.kind.as_str() != "concurrency"));
    assert_eq!(h.counted("acme", "u1", "user-slots"), 1);
    assert_eq!(h.counted("acme", "acme", "org-day"), 700);
    // The next one does not fit the quota: refused, naming it, holding nothing.
    let s2 = slice(400);
    assert!(!s2.granted);
    assert_eq!(s2.denial.as_ref().unwrap().limit_id.as_str(), "org-day");
    assert_eq!(h.counted("acme", "acme", "org-day"), 700);
    // The call used 650: its first hold settles at the whole, its slice is released.
    h.settle(first.hold_id.as_ref().unwrap(), 650);
    h.release(s1.hold_id.as_ref().unwrap());
    assert_eq!(h.counted("acme", "acme", "org-day"), 650);
    assert_eq!(h.counted("acme", "u1", "user-slots"), 0);
}

/// The first hold of a stream held in slices settles the whole stream: its settlement ceiling
/// is what the declared budget may report (`Engine::start_stream`), where a call's is ten
/// times what it held (no `model` dimension here). A long stream is charged its usage, not
/// the first slice's ceiling.
fn a_streams_first_hold_settles_up_to_its_budget_where_a_call_is_capped(store: Store) {
    let limits = r#"
limits:
  - { id: org-day, entity: acme, feature: tokens, kind: quota, limit: 100000, period: P1D }
"#;
    let h = harness(&tree_with(limits), store, "2026-03-10T10:00:00Z");
    let dimensions = dims(&[("userId", "u1")]);
    let req = CheckRequest {
        deadline: None,
        customer: "acme",
        feature: "tokens",
        usage: Usage::units(100),
        dimensions: &dimensions,
        dry_run: false,
        commit: false,
    };
    let stream = h.run(h.engine.start_stream(&req, 4_000)).unwrap();
    let call = h.run(h.engine.check(&req)).unwrap();
    assert!(stream.granted && call.granted);
    assert_eq!(h.counted("acme", "acme", "org-day"), 200);
    // 3,000 used: the stream settles at it; the call's 100 allow at most 1,000.
    let settled = h.run(
        h.engine
            .settle(stream.hold_id.as_ref().unwrap(), Usage::units(3_000)),
    );
    assert_eq!(settled, Ok(CloseOutcome::Closed));
    let capped = h.run(
        h.engine
            .settle(call.hold_id.as_ref().unwrap(), Usage::units(3_000)),
    );
    assert!(
        matches!(
            capped,
            Err(DecisionError::Store(StoreError::SettleTooLarge {
                max: 1_000,
                ..
            }))
        ),
        "{capped:?}"
    );
    assert_eq!(h.counted("acme", "acme", "org-day"), 3_000 + 100);
    // Past the budget's own ceiling (ten times 4,000), the stream is refused too.
    let again = h.run(h.engine.start_stream(&req, 4_000)).unwrap();
    let over = h.run(
        h.engine
            .settle(again.hold_id.as_ref().unwrap(), Usage::units(40_001)),
    );
    assert!(
        matches!(
            over,
            Err(DecisionError::Store(StoreError::SettleTooLarge {
                max: 40_000,
                ..
            }))
        ),
        "{over:?}"
    );
}
