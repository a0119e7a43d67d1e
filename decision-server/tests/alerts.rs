//! Threshold alerts on every store: each crossing fires once per limit period however many
//! replicas see it, fires again in the next period or after usage falls back under the
//! hysteresis margin, and reaches the usage stream with its Standard Webhooks body.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{Harness, harness, tree_with};
use serde_json::Value;
use tollgate::alerts::{Claims, after_decision};
use tollgate::core::alerts::{Attempt, Delivery};
use tollgate::core::{Name, Timestamp};
use tollgate::store::CounterStore;
use tollgate::store::events::EventBody;

type Store = Arc<dyn CounterStore>;

test_with_all_stores!(
    a_crossing_fires_once_per_period_across_replicas,
    limits_without_periods_rearm_by_hysteresis,
    the_outbox_leases_each_delivery_to_one_caller_and_keeps_the_log,
    a_lessee_whose_leases_ran_out_still_gets_a_full_pass,
    denial_bursts_and_projected_exhaustion_fire_once,
    ingested_usage_crosses_thresholds_too,
    a_reading_that_jumps_past_a_threshold_fires_it_once,
    one_decision_claims_a_bounded_number_of_crossings_and_the_rest_follow,
);

/// Thirty thresholds crossed by one check: that decision claims eight (eight store calls,
/// eight events), the customer's next decisions the rest, each exactly once.
fn one_decision_claims_a_bounded_number_of_crossings_and_the_rest_follow(store: Store) {
    let rules = r#"
limits:
  - { id: team-day, entityType: team, feature: tokens, kind: quota, limit: 100000, period: P1D }
alerts:
  - { id: a, entityType: team, limit: team-day, absolute: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] }
  - { id: b, entityType: team, limit: team-day, absolute: [11, 12, 13, 14, 15, 16, 17, 18, 19, 20] }
  - { id: c, entityType: team, limit: team-day, absolute: [21, 22, 23, 24, 25, 26, 27, 28, 29, 30] }
"#;
    let h = harness(&tree_with(rules), store, START);
    let claims = Claims::default();
    let (granted, fired) = spend(&h, &claims, "u1", 50);
    assert!(granted);
    assert_eq!(fired, tollgate::alerts::MAX_CLAIMS_PER_DECISION);
    let mut total = fired;
    for _ in 0..10 {
        total += spend(&h, &claims, "u1", 1).1;
    }
    assert_eq!(total, 30, "every crossing fired, once");
    assert_eq!(alerts_on_stream(&h).len(), 30);
}

const START: &str = "2026-03-10T10:00:00Z";

const LIMITS: &str = r#"
limits:
  - { id: team-day, entityType: team, feature: tokens, kind: quota, limit: 1000, period: P1D }
  - { id: user-hour, entityType: user, feature: requests, kind: rate, limit: 100, window: PT1H }
webhooks:
  - { id: ops, url: "https://hooks.example.com/hook", secrets: [whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw] }
alerts:
  - { id: team-budget, entityType: team, limit: team-day, percent: [50, 80, 100], absolute: [900], webhooks: [ops] }
  - { id: user-pace, entity: u2, feature: requests, percent: [80] }
  - { id: burst, entityType: user, feature: tokens, denials: { count: 3, within: PT5M } }
  - { id: runway, entityType: team, limit: team-day, exhaustionWithin: PT2H }
"#;

/// A check for `user`, then the alerts it fires through replica `claims`.
fn spend(h: &Harness, claims: &Claims, user: &str, units: u64) -> (bool, usize) {
    let d = h.check("acme", "tokens", units, &[("userId", user)]);
    let fired = h
        .run(after_decision(&h.engine, claims, "acme", &d))
        .unwrap();
    (d.granted, fired)
}

/// The alert bodies on acme's stream, in order.
fn alerts_on_stream(h: &Harness) -> Vec<Value> {
    h.run(
        h.engine
            .store()
            .usage()
            .read_events(Some(Name::from("acme")), None, 1000),
    )
    .unwrap()
    .events
    .iter()
    .filter_map(|e| match &*e.body {
        EventBody::Alert(a) => Some(serde_json::from_str(a).unwrap()),
        EventBody::Record(_) => None,
    })
    .collect()
}

fn a_crossing_fires_once_per_period_across_replicas(store: Store) {
    let h = harness(&tree_with(LIMITS), Arc::clone(&store), START);
    // A second replica on the same store, with its own process state.
    let h2 = harness(&tree_with(LIMITS), store, START);
    let (claims, claims2) = (Claims::default(), Claims::default());

    assert_eq!(spend(&h, &claims, "u1", 400), (true, 0));
    let d = h.check("acme", "tokens", 150, &[("userId", "u1")]);
    // Both replicas see the decision that crossed 50 %: one alert.
    let a = h
        .run(after_decision(&h.engine, &claims, "acme", &d))
        .unwrap();
    let b = h2
        .run(after_decision(&h2.engine, &claims2, "acme", &d))
        .unwrap();
    assert_eq!((a, b), (1, 0));
    assert_eq!(spend(&h2, &claims2, "u2", 300), (true, 1), "80 % at 850");
    assert_eq!(
        spend(&h, &claims, "u1", 100),
        (true, 1),
        "900 absolute at 950"
    );
    assert_eq!(
        spend(&h, &claims, "u1", 100),
        (false, 0),
        "denied: nothing crossed"
    );
    assert_eq!(spend(&h, &claims, "u1", 50), (true, 1), "100 % at 1000");

    let alerts = alerts_on_stream(&h);
    let triggers: Vec<String> = alerts
        .iter()
        .map(|a| a["data"]["trigger"].to_string())
        .collect();
    assert_eq!(
        triggers,
        [
            r#"{"percent":50}"#,
            r#"{"percent":80}"#,
            r#"{"absolute":900}"#,
            r#"{"percent":100}"#
        ]
    );
    let first = &alerts[0];
    assert_eq!(first["type"], "limit.threshold_crossed");
    assert_eq!(first["data"]["entityId"], "t1");
    assert_eq!(first["data"]["limitId"], "team-day");
    assert_eq!(first["data"]["used"], 550);
    assert_eq!(first["data"]["threshold"], 500);
    assert_eq!(first["data"]["resetsAt"], "2026-03-11T00:00:00.000Z");
    let id = first["data"]["alertId"].as_str().unwrap();
    assert!(id.starts_with("alert_") && id.len() == 6 + 32, "{id}");

    // Usage falls and rises again within the day: the period's claims hold, nothing fires.
    let t2 = h.check("acme", "tokens", 100, &[("userId", "u3")]);
    assert!(t2.granted, "team t2 has its own counter");
    assert_eq!(
        h.run(after_decision(&h.engine, &claims, "acme", &t2))
            .unwrap(),
        0
    );

    // The next day is a new period: 50 % fires again.
    h.advance_secs(86_400);
    assert_eq!(spend(&h, &claims, "u1", 600), (true, 1));
    // One alert for the new period. (The stream keeps the last hour: in process, by the
    // records' clock, the first day's alerts are gone; Redis trims by its own clock.)
    let alerts = alerts_on_stream(&h);
    let new_day: Vec<&Value> = alerts
        .iter()
        .filter(|a| a["data"]["resetsAt"] == "2026-03-12T00:00:00.000Z")
        .collect();
    assert_eq!(new_day.len(), 1, "{alerts:?}");
    assert_eq!(new_day[0]["data"]["trigger"]["percent"], 50);
    assert_eq!(alerts.last(), Some(new_day[0]));
}

fn limits_without_periods_rearm_by_hysteresis(store: Store) {
    let h = harness(&tree_with(LIMITS), store, START);
    let claims = Claims::default();
    let u2 = [("userId", "u2")];
    let mut holds = Vec::new();
    // Every token check also counts a request on `user-hour` (100 per rolling hour).
    for _ in 0..79 {
        let d = h.check("acme", "tokens", 1, &u2);
        assert_eq!(
            h.run(after_decision(&h.engine, &claims, "acme", &d))
                .unwrap(),
            0
        );
        holds.push(d.hold_id.unwrap());
    }
    let d = h.check("acme", "tokens", 1, &u2);
    assert_eq!(
        h.run(after_decision(&h.engine, &claims, "acme", &d))
            .unwrap(),
        1,
        "80 %"
    );
    holds.push(d.hold_id.unwrap());
    // Released back down to 75: still within 10 % of the threshold; crossing again is the
    // same excursion and does not fire.
    for hold in holds.drain(..5) {
        h.release(&hold);
    }
    let d = h.check("acme", "tokens", 1, &u2);
    h.run(after_decision(&h.engine, &claims, "acme", &d))
        .unwrap();
    for _ in 0..4 {
        let d = h.check("acme", "tokens", 1, &u2);
        assert_eq!(
            h.run(after_decision(&h.engine, &claims, "acme", &d))
                .unwrap(),
            0
        );
    }
    // Down to 10, under 72 (80 less 10 %): re-armed; the next crossing fires.
    for hold in holds.drain(..) {
        h.release(&hold);
    }
    let mut fired = 0;
    for _ in 0..80 {
        let d = h.check("acme", "tokens", 1, &u2);
        fired += h
            .run(after_decision(&h.engine, &claims, "acme", &d))
            .unwrap();
    }
    assert_eq!(fired, 1);
    let bodies = alerts_on_stream(&h);
    assert_eq!(bodies.len(), 2);
    assert!(bodies.iter().all(|b| b["data"]["limitId"] == "user-hour"));
    assert!(
        bodies
            .iter()
            .all(|b| b["data"]["resetsAt"].is_string() || b["data"]["resetsAt"].is_null())
    );
}

fn delivery(id: &str, created: i64) -> Delivery {
    Delivery {
        id: id.into(),
        webhook: "ops".into(),
        body: format!(r#"{{"type":"webhook.test","n":{created}}}"#),
        created,
        next_at: Some(created),
        delivered: false,
        attempts: Vec::new(),
    }
}

fn the_outbox_leases_each_delivery_to_one_caller_and_keeps_the_log(store: Store) {
    let h = harness(&tree_with(LIMITS), store, START);
    let s = h.engine.store();
    let acme = Name::from("acme");
    let at = |ms: i64| Timestamp::from_millis(ms);
    h.run(
        s.alerts()
            .enqueue_deliveries(acme, &[delivery("msg_a", 1_000), delivery("msg_b", 2_000)]),
    )
    .unwrap();
    // Only what is due, oldest due first; a leased delivery is no other lessee's until the
    // lease ends.
    let first = h
        .run(
            s.alerts()
                .lease_deliveries(acme, "a", at(1_500), 60_000, 10),
        )
        .unwrap();
    assert_eq!(
        first.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["msg_a"]
    );
    let second = h
        .run(
            s.alerts()
                .lease_deliveries(acme, "b", at(2_500), 60_000, 10),
        )
        .unwrap();
    assert_eq!(
        second.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["msg_b"]
    );
    assert!(
        h.run(
            s.alerts()
                .lease_deliveries(acme, "c", at(3_000), 60_000, 10)
        )
        .unwrap()
        .is_empty()
    );
    // A lessee that asks again gets back what it leased and has not finished (a lease whose
    // answer it never heard), and nothing of another lessee's.
    let lost = h
        .run(
            s.alerts()
                .lease_deliveries(acme, "b", at(3_000), 60_000, 10),
        )
        .unwrap();
    assert_eq!(
        lost.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["msg_b"]
    );
    let mut b = lost[0].clone();
    b.attempts.push(Attempt {
        at: 3_000,
        status: Some(204),
        error: None,
    });
    b.delivered = true;
    b.next_at = None;
    h.run(s.alerts().finish_delivery(acme, "b", &b)).unwrap();
    assert!(
        h.run(
            s.alerts()
                .lease_deliveries(acme, "b", at(3_500), 60_000, 10)
        )
        .unwrap()
        .is_empty()
    );
    // A lease that ends unfinished (its replica died) is taken again.
    let again = h
        .run(
            s.alerts()
                .lease_deliveries(acme, "c", at(61_500), 60_000, 10),
        )
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].id, "msg_a");
    // Finished: delivered, never due again; the log keeps it, newest first.
    let mut done = again[0].clone();
    done.attempts.push(Attempt {
        at: 61_500,
        status: Some(200),
        error: None,
    });
    done.delivered = true;
    done.next_at = None;
    h.run(s.alerts().finish_delivery(acme, "c", &done)).unwrap();
    // The first lessee's lease of it ended when it was finished, by whoever finished it.
    for lessee in ["a", "c"] {
        assert!(
            h.run(
                s.alerts()
                    .lease_deliveries(acme, lessee, at(500_000), 60_000, 10)
            )
            .unwrap()
            .iter()
            .all(|d| d.id != "msg_a")
        );
    }
    let log = h.run(s.alerts().deliveries(acme, 10)).unwrap();
    assert_eq!(
        log.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["msg_b", "msg_a"]
    );
    assert_eq!(log[1], done);
    assert!(
        h.run(s.alerts().deliveries(Name::from("globex"), 10))
            .unwrap()
            .is_empty()
    );
}

fn a_lessee_whose_leases_ran_out_still_gets_a_full_pass(store: Store) {
    let h = harness(&tree_with(LIMITS), store, START);
    let s = h.engine.store();
    let acme = Name::from("acme");
    let at = |ms: i64| Timestamp::from_millis(ms);
    // Two due at once; three due later than the first two's lease will end.
    let queued: Vec<Delivery> = (0..5)
        .map(|i| {
            delivery(
                &format!("msg_{i}"),
                if i < 2 { 1_000 + i } else { 3_000 + i },
            )
        })
        .collect();
    h.run(s.alerts().enqueue_deliveries(acme, &queued)).unwrap();
    let ids = |ds: Vec<Delivery>| ds.into_iter().map(|d| d.id).collect::<Vec<_>>();
    let first = ids(h
        .run(s.alerts().lease_deliveries(acme, "a", at(2_000), 100, 2))
        .unwrap());
    assert_eq!(first, ["msg_0", "msg_1"]);
    // Its answer lost and its lease run out (at 2,100): the two are due again, before all
    // others, and are taken back first; the pass is still filled to its size with others due.
    let again = ids(h
        .run(s.alerts().lease_deliveries(acme, "a", at(5_000), 100, 3))
        .unwrap());
    assert_eq!(again, ["msg_0", "msg_1", "msg_2"]);
    let other = ids(h
        .run(s.alerts().lease_deliveries(acme, "b", at(5_000), 100, 10))
        .unwrap());
    assert_eq!(other, ["msg_3", "msg_4"]);
}

fn denial_bursts_and_projected_exhaustion_fire_once(store: Store) {
    let h = harness(&tree_with(LIMITS), store, START);
    let pass = || h.run(tollgate::alerts::background_pass(&h.engine)).unwrap();
    assert_eq!(pass(), 0, "nothing spent yet");
    // Team t1 spends 990 of its 1000 within minutes; u2 stays idle.
    let spent = h.check("acme", "tokens", 990, &[("userId", "u1")]);
    h.settle(spent.hold_id.as_ref().unwrap(), 990);
    h.advance_secs(60);
    // Two denials: under the burst's count.
    for _ in 0..2 {
        assert!(!h.check("acme", "tokens", 100, &[("userId", "u1")]).granted);
    }
    assert_eq!(pass(), 1, "the runway: 10 left at 990 per 15 minutes");
    assert!(!h.check("acme", "tokens", 100, &[("userId", "u1")]).granted);
    assert_eq!(pass(), 1, "the third denial within 5 minutes: a burst");
    assert_eq!(pass(), 0, "each fires once");
    let bodies = alerts_on_stream(&h);
    let types: Vec<&str> = bodies.iter().map(|b| b["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["limit.exhaustion_projected", "limit.denial_burst"]);
    assert_eq!(bodies[0]["data"]["entityId"], "t1");
    assert_eq!(bodies[0]["data"]["remaining"], 10);
    assert_eq!(bodies[1]["data"]["entityId"], "u1");
    assert_eq!(bodies[1]["data"]["denied"], 3);
    // Past the burst's window the denials age out; new ones start a new count.
    h.advance_secs(301);
    assert_eq!(pass(), 0);
}

fn ingested_usage_crosses_thresholds_too(store: Store) {
    let h = harness(&tree_with(LIMITS), store, START);
    let claims = Claims::default();
    let dimensions = common::dims(&[("userId", "u1")]);
    let ingest = |units: u64, key: &str| {
        let req = tollgate::CheckRequest {
            deadline: None,
            customer: "acme",
            feature: "tokens",
            usage: tollgate::core::usage::Usage::units(units),
            dimensions: &dimensions,
            dry_run: false,
            commit: false,
        };
        assert!(h.run(h.engine.ingest(&req, key)).unwrap());
        h.run(tollgate::alerts::after_ingest(&h.engine, &claims, &req))
            .unwrap()
    };
    assert_eq!(ingest(400, "e1"), 0);
    assert_eq!(ingest(200, "e2"), 1, "600 of 1000 crosses 50 %");
    // Ingest counts past a cap (the usage happened): 80 %, 900 and 100 % at once.
    assert_eq!(ingest(500, "e3"), 3);
    assert_eq!(h.counted("acme", "t1", "team-day"), 1100);
    let triggers: Vec<String> = alerts_on_stream(&h)
        .iter()
        .map(|a| a["data"]["trigger"].to_string())
        .collect();
    assert_eq!(triggers.len(), 4, "{triggers:?}");
}

/// With escrow leases a replica's reading of a quota jumps when a slice placement brings in
/// what other replicas spent: no single decision goes from under a threshold to over it. A
/// quota's threshold fires once per period at the first decision that reads usage at or over
/// it, here from two replicas, and never again that period.
fn a_reading_that_jumps_past_a_threshold_fires_it_once(store: Store) {
    let h = harness(&tree_with(LIMITS), Arc::clone(&store), START);
    let h2 = harness(&tree_with(LIMITS), store, START);
    let (claims, claims2) = (Claims::default(), Claims::default());
    let jumped = |h: &Harness, units: u64, reads: u64| {
        let mut d = h.check("acme", "tokens", units, &[("userId", "u1")]);
        for e in &mut d.chain {
            if e.limit_id == "team-day" {
                e.current_usage = reads;
            }
        }
        d
    };
    // Read at 620 after a 10-unit decision: the 50 % mark (500) lies before it.
    let d = jumped(&h, 10, 620);
    assert_eq!(
        h.run(after_decision(&h.engine, &claims, "acme", &d))
            .unwrap(),
        1
    );
    // The next decisions, on this replica and the other, read over it too: nothing more.
    let d = jumped(&h, 10, 630);
    assert_eq!(
        h.run(after_decision(&h.engine, &claims, "acme", &d))
            .unwrap(),
        0
    );
    let d = jumped(&h2, 10, 640);
    assert_eq!(
        h2.run(after_decision(&h2.engine, &claims2, "acme", &d))
            .unwrap(),
        0
    );
    let triggers: Vec<String> = alerts_on_stream(&h)
        .iter()
        .map(|a| a["data"]["trigger"].to_string())
        .collect();
    assert_eq!(triggers.len(), 1, "{triggers:?}");
}
