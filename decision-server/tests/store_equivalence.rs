//! Differential test: random sequences of checks (tokens priced into credits, requests, dry
//! runs), settlements, releases, ingested usage (idempotency keys repeated, kept past their
//! retention and evicted by count), grants added at run time (equal priorities and expiries
//! among them), clock moves and expiry run on the in-memory store and on the Redis store
//! (a single node, and a 3-master Cluster) side by side must give identical decisions (every
//! chain entry: usage, limit, remaining, reset time, exceeded; denials and retry times; hold
//! ids), identical close and ingest outcomes and identical counters, and the Redis store must
//! count no disagreement between its script and the core. Alert claims, re-arms and outbox
//! passes (lessees leasing, finishing and retrying deliveries) run beside them, and at the end
//! the usage buckets of every size, the usage stream and the delivery log must be identical
//! too. The Redis script re-implements the core's arithmetic; this is where a divergence would
//! show first.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tollgate::CheckRequest;
use tollgate::clock::Clock as _;
use tollgate::core::alerts::{Attempt, Delivery};
use tollgate::core::rollup::{Granularity, RecordRef, ScanNeeds};
use tollgate::core::usage::Usage;
use tollgate::core::{HoldId, Name};
use tollgate::store::CounterStore;
use tollgate::store::events::EventBody;

/// Every limit kind on every level, soft and shadow ones, and a credit pool of four grants that
/// differ in priority, expiry and category, drawn by price from token usage.
const LIMITS: &str = r#"
limits:
  - { id: user-rate, entityType: user, feature: tokens, kind: rate, limit: 400, window: PT10M }
  - { id: user-slots, entityType: user, feature: tokens, kind: concurrency, limit: 2 }
  - { id: team-day, entityType: team, feature: tokens, kind: quota, limit: 900, period: P1D }
  - { id: team-soft, entityType: team, feature: requests, kind: quota, limit: 5, period: PT1H, mode: soft }
  - { id: dept-shadow, entityType: dept, feature: tokens, kind: rate, limit: 300, window: PT1H, mode: shadow }
  - { id: org-month, entity: acme, feature: tokens, kind: quota, limit: 2500, period: P1M }
  - { id: org-credits, entity: acme, feature: credits, kind: credits }
grants:
  - { id: late, entity: acme, feature: credits, amount: 700, priority: 1, category: paid }
  - { id: late-promo, entity: acme, feature: credits, amount: 200, priority: 1, category: promo }
  - { id: soon, entity: acme, feature: credits, amount: 300, priority: 1, category: promo, expiresAt: "2026-03-10T12:00:00Z" }
  - { id: low, entity: acme, feature: credits, amount: 900, priority: 5, category: paid }
"#;

const USERS: [&str; 4] = ["u1", "u2", "u3", "u4"];
const MODELS: [&str; 2] = ["small", "big-1"];

#[derive(Debug, Clone)]
enum Op {
    Check {
        user: usize,
        model: usize,
        input: u64,
        output: u64,
        /// 0: a hold, 1: a dry run, 2: a commit.
        how: u8,
    },
    CheckCredits {
        user: usize,
        amount: u64,
    },
    Settle {
        hold: usize,
        input: u64,
        output: u64,
        cached: u64,
    },
    Release {
        hold: usize,
    },
    Advance {
        secs: i64,
    },
    /// Usage recorded under idempotency key `k<key>`; few keys, so they repeat.
    Ingest {
        user: usize,
        key: usize,
        units: u64,
    },
    /// A grant added by a config change, its priority and expiry drawn from few values so
    /// they tie with each other and with the file's grants.
    Grant {
        amount: u64,
        priority: usize,
        expiry: usize,
        paid: bool,
    },
    /// An alert claim on one of few keys, held for a while or until re-armed, with one
    /// webhook delivery.
    Claim {
        key: usize,
        hold_secs: Option<i64>,
    },
    Rearm {
        key: usize,
    },
    /// A lessee's pass over the outbox; each delivery leased is then finished as delivered,
    /// left unfinished (its lease runs out), or tried again a minute later.
    Lease {
        lessee: usize,
        max: usize,
        finish: u8,
    },
}

const PRIORITIES: [u32; 2] = [1, 5];
/// No expiry, the file's `soon` grant's expiry, and a later one.
const EXPIRIES: [Option<&str>; 3] = [
    None,
    Some("2026-03-10T12:00:00Z"),
    Some("2026-03-11T10:00:00Z"),
];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..4usize, 0..2usize, 0..120u64, 0..120u64, prop::sample::select(vec![0u8, 0, 0, 0, 1, 2, 2])).prop_map(
            |(user, model, input, output, how)| Op::Check { user, model, input, output, how }
        ),
        1 => (0..4usize, 0..400u64).prop_map(|(user, amount)| Op::CheckCredits { user, amount }),
        3 => (any::<prop::sample::Index>(), 0..150u64, 0..150u64, 0..40u64).prop_map(
            |(i, input, output, cached)| Op::Settle { hold: i.index(1 << 16), input, output, cached }
        ),
        1 => any::<prop::sample::Index>().prop_map(|i| Op::Release { hold: i.index(1 << 16) }),
        2 => prop_oneof![0..90i64, 0..4_000i64, Just(86_400i64)].prop_map(|secs| Op::Advance { secs }),
        2 => (0..4usize, 0..8usize, 0..200u64).prop_map(|(user, key, units)| Op::Ingest { user, key, units }),
        1 => (1..400u64, 0..2usize, 0..3usize, any::<bool>()).prop_map(
            |(amount, priority, expiry, paid)| Op::Grant { amount, priority, expiry, paid }
        ),
        2 => (0..3usize, prop::option::of(prop_oneof![Just(30i64), Just(7_200i64)]))
            .prop_map(|(key, hold_secs)| Op::Claim { key, hold_secs }),
        1 => (0..3usize).prop_map(|key| Op::Rearm { key }),
        2 => (0..2usize, 1..4usize, 0..3u8).prop_map(|(lessee, max, finish)| Op::Lease { lessee, max, finish }),
    ]
}

fn run(redis: Arc<dyn CounterStore>, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut limits = LIMITS.to_string();
    let start = "2026-03-10T10:00:00Z";
    let mem = harness(&tree_with(&limits), memory(), start);
    let red = harness_on(Arc::clone(&mem.rt), &tree_with(&limits), redis, start);
    let mut holds: Vec<(HoldId, HoldId)> = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Check {
                user,
                model,
                input,
                output,
                how,
            } => {
                let usage = tokens(*input, *output, 0);
                let dims = [("userId", USERS[*user]), ("model", MODELS[*model])];
                let (m, r) = match how {
                    1 => {
                        let units = input + output;
                        (
                            mem.dry_run("acme", "tokens", units, &dims),
                            red.dry_run("acme", "tokens", units, &dims),
                        )
                    }
                    2 => (
                        mem.commit("acme", "tokens", usage, &dims),
                        red.commit("acme", "tokens", usage, &dims),
                    ),
                    _ => (
                        mem.check_usage("acme", "tokens", usage, &dims),
                        red.check_usage("acme", "tokens", usage, &dims),
                    ),
                };
                prop_assert_eq!(untagged(&m), untagged(&r), "step {}: {:?}", step, op);
                holds.extend(m.hold_id.zip(r.hold_id));
            }
            Op::CheckCredits { user, amount } => {
                let dims = [("userId", USERS[*user])];
                let m = mem.check("acme", "credits", *amount, &dims);
                let r = red.check("acme", "credits", *amount, &dims);
                prop_assert_eq!(untagged(&m), untagged(&r), "step {}: {:?}", step, op);
                holds.extend(m.hold_id.zip(r.hold_id));
            }
            Op::Settle {
                hold,
                input,
                output,
                cached,
            } => {
                if holds.is_empty() {
                    continue;
                }
                let (mid, rid) = &holds[hold % holds.len()];
                let usage: Usage = tokens(*input, *output, *cached);
                let m = mem
                    .run(mem.engine.settle(mid, usage))
                    .map_err(|e| e.to_string().replace(&mid.to_string(), "<hold>"));
                let r = red
                    .run(red.engine.settle(rid, usage))
                    .map_err(|e| e.to_string().replace(&rid.to_string(), "<hold>"));
                prop_assert_eq!(m, r, "step {}: {:?}", step, op);
            }
            Op::Release { hold } => {
                if holds.is_empty() {
                    continue;
                }
                let (mid, rid) = &holds[hold % holds.len()];
                let m = mem
                    .run(mem.engine.release(mid))
                    .map_err(|e| e.to_string().replace(&mid.to_string(), "<hold>"));
                let r = red
                    .run(red.engine.release(rid))
                    .map_err(|e| e.to_string().replace(&rid.to_string(), "<hold>"));
                prop_assert_eq!(m, r, "step {}: {:?}", step, op);
            }
            Op::Advance { secs } => {
                mem.advance_secs(*secs);
                red.advance_secs(*secs);
                prop_assert_eq!(mem.expire_due(), red.expire_due(), "step {}", step);
            }
            Op::Ingest { user, key, units } => {
                let dims = dims(&[("userId", USERS[*user]), ("model", MODELS[0])]);
                let req = CheckRequest {
                    deadline: None,
                    customer: "acme",
                    feature: "tokens",
                    usage: Usage::units(*units),
                    dimensions: &dims,
                    dry_run: false,
                    commit: false,
                };
                let key = format!("k{key}");
                let m = mem
                    .run(mem.engine.ingest(&req, &key))
                    .map_err(|e| e.to_string());
                let r = red
                    .run(red.engine.ingest(&req, &key))
                    .map_err(|e| e.to_string());
                prop_assert_eq!(m, r, "step {}: {:?}", step, op);
            }
            Op::Grant {
                amount,
                priority,
                expiry,
                paid,
            } => {
                let expires = EXPIRIES[*expiry]
                    .map(|e| format!(", expiresAt: \"{e}\""))
                    .unwrap_or_default();
                limits.push_str(&format!(
                    "  - {{ id: g{step}, entity: acme, feature: credits, amount: {amount}, priority: {}, category: {}{expires} }}\n",
                    PRIORITIES[*priority],
                    if *paid { "paid" } else { "promo" },
                ));
                let yaml = tree_with(&limits);
                let m = mem.run(mem.engine.replace_model(common::model(&yaml)));
                let r = red.run(red.engine.replace_model(common::model(&yaml)));
                prop_assert!(m.is_ok() && r.is_ok(), "step {}: {:?} {:?}", step, m, r);
            }
            Op::Claim { key, hold_secs } => {
                let now = mem.clock.now();
                let until = hold_secs.map(|s| now.millis() + s * 1_000);
                let body = format!(r#"{{"type":"limit.threshold","step":{step}}}"#);
                let d = delivery(&format!("msg_{step}"), &body, now.millis());
                let key = format!("alert-{key}");
                let [m, r] = [&mem, &red].map(|h| {
                    h.run(h.engine.store().alerts().claim_alert(
                        acme(),
                        &key,
                        until,
                        &body,
                        std::slice::from_ref(&d),
                        now,
                    ))
                    .map_err(|e| e.to_string())
                });
                prop_assert_eq!(m, r, "step {}: {:?}", step, op);
            }
            Op::Rearm { key } => {
                let key = format!("alert-{key}");
                let [m, r] = [&mem, &red].map(|h| {
                    h.run(h.engine.store().alerts().rearm_alert(acme(), &key))
                        .map_err(|e| e.to_string())
                });
                prop_assert_eq!(m, r, "step {}: {:?}", step, op);
            }
            Op::Lease {
                lessee,
                max,
                finish,
            } => {
                let now = mem.clock.now();
                let lessee = ["a", "b"][*lessee];
                let [m, r] = [&mem, &red].map(|h| {
                    h.run(h.engine.store().alerts().lease_deliveries(
                        acme(),
                        lessee,
                        now,
                        60_000,
                        *max,
                    ))
                    .map_err(|e| e.to_string())
                });
                prop_assert_eq!(&m, &r, "step {}: {:?}", step, op);
                for mut d in m.unwrap_or_default() {
                    let status = match finish {
                        0 => continue,
                        1 => 204,
                        _ => 503,
                    };
                    d.attempts.push(Attempt {
                        at: now.millis(),
                        status: Some(status),
                        error: None,
                    });
                    d.delivered = status == 204;
                    d.next_at = (!d.delivered).then_some(now.millis() + 60_000);
                    for h in [&mem, &red] {
                        h.run(
                            h.engine
                                .store()
                                .alerts()
                                .finish_delivery(acme(), lessee, &d),
                        )
                        .unwrap();
                    }
                }
            }
        }
    }
    let now = mem.clock.now().millis();
    // Buckets past their retention are left out: the memory store drops them when it next
    // writes, Redis when their keys expire by Redis's own clock, which this test's clock has
    // run ahead of.
    let records = mem.engine.model().records;
    // Every bucket size over what each keeps (minutes a day, hours a month).
    for (g, back) in [
        (Granularity::Minute, 86_400_000),
        (Granularity::Hour, 30 * 86_400_000),
        (Granularity::Day, 400 * 86_400_000),
    ] {
        let [m, r] = [&mem, &red].map(|h| {
            let scan = h
                .run(h.engine.store().usage().usage_buckets(
                    acme(),
                    g,
                    now - back,
                    now + 86_400_000,
                    &ScanNeeds::all(now),
                ))
                .unwrap();
            let mut rows: Vec<String> = scan
                .rows()
                .filter(|(start, _, _)| !records.expired(g, *start, mem.clock.now()))
                .map(|(start, k, m)| format!("{start} {k:?} {m:?}"))
                .collect();
            rows.sort();
            rows
        });
        prop_assert_eq!(m, r, "{:?} buckets", g);
    }
    // The stream, within the retention of its last hour (each store trims by its own clock).
    let [m, r] = [&mem, &red].map(|h| {
        let page = h
            .run(
                h.engine
                    .store()
                    .usage()
                    .read_events(Some(acme()), None, 100_000),
            )
            .unwrap();
        page.events
            .into_iter()
            .filter(|e| e.at.millis() > now - 3_600_000)
            .map(|e| match &*e.body {
                EventBody::Record(rec) => {
                    let mut rec = rec.clone();
                    if let RecordRef::Hold { tag, .. } = &mut rec.reference {
                        *tag = 0;
                    }
                    format!("{} {rec:?}", e.at.millis())
                }
                EventBody::Alert(body) => format!("{} alert {body}", e.at.millis()),
            })
            .collect::<Vec<_>>()
    });
    prop_assert_eq!(m, r, "the usage streams");
    let [m, r] = [&mem, &red].map(|h| {
        h.run(h.engine.store().alerts().deliveries(acme(), 1_000))
            .unwrap()
    });
    prop_assert_eq!(m, r, "the delivery logs");
    for (entity, limit) in [
        ("u1", "user-rate"),
        ("u2", "user-slots"),
        ("u3", "user-rate"),
        ("t1", "team-day"),
        ("t2", "team-soft"),
        ("d1", "dept-shadow"),
        ("acme", "org-month"),
        ("acme", "org-credits"),
    ] {
        prop_assert_eq!(
            mem.counted("acme", entity, limit),
            red.counted("acme", entity, limit),
            "{} {}",
            entity,
            limit
        );
    }
    prop_assert_eq!(
        mem.engine.store().stats().holds_open,
        red.engine.store().stats().holds_open
    );
    prop_assert_eq!(red.engine.store().stats().script_disagreements, 0);
    Ok(())
}

fn acme() -> Name {
    Name::from("acme")
}

fn delivery(id: &str, body: &str, now: i64) -> Delivery {
    Delivery {
        id: id.into(),
        webhook: "ops".into(),
        body: body.into(),
        created: now,
        next_at: Some(now),
        delivered: false,
        attempts: Vec::new(),
    }
}

/// A decision with its hold's random tag taken out: each store draws its own.
fn untagged(d: &tollgate::core::Decision) -> tollgate::core::Decision {
    let mut d = d.clone();
    if let Some(h) = d.hold_id.as_mut() {
        h.tag = 0;
    }
    d
}

fn differential(cases: u32, redis: &dyn Fn() -> Arc<dyn CounterStore>) {
    let mut runner = TestRunner::new(Config {
        cases,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(op(), 1..80), |ops| {
        run(redis(), &ops)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn redis_decides_exactly_as_the_in_memory_store() {
    let server = RedisServer::start();
    differential(64, &|| redis_store(&server));
}

/// On a Cluster each customer's keys share one hash slot, so the script runs on one master;
/// fewer cases, since every call crosses a redirect-aware client.
#[test]
fn a_redis_cluster_decides_exactly_as_the_in_memory_store() {
    let cluster = RedisCluster::start();
    differential(24, &|| redis_cluster_store(&cluster));
}
