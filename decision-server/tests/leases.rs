//! Escrow leases under races: replicas deciding inside slices of one cap held in a shared
//! store (a Redis node, a Redis Cluster, the in-memory store), with every grant checked
//! against the cap and the counters against what was settled.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{RedisCluster, RedisServer, dims, model, redis_store_prefixed, runtime};
use tollgate::clock::{Clock, SystemClock};
use tollgate::core::lease::LeaseTerms;
use tollgate::core::rollup::{Granularity, Measures, RecordKind, ScanNeeds};
use tollgate::core::usage::Usage;
use tollgate::core::{Name, Timestamp};
use tollgate::store::{CounterStore, LeasedStore, RedisTarget};
use tollgate::{CheckRequest, Engine};

const REPLICAS: usize = 3;
const CLIENTS: usize = 64;
const USERS: usize = 16;
/// The largest request: a run to the end of the budget leaves less than this unspent.
const LARGEST: u64 = 5;

/// A three-level chain (org → team → user) with a quota at every level; the org's is the cap.
fn config(cap: u64) -> String {
    let mut s = String::from(
        "holdTtl: PT3S\n\
         entityTypes:\n  - name: org\n  - name: team\n    parents: [org]\n  - name: user\n    parents: [team]\n\
         attribution:\n  - dimension: userId\n    entityType: user\n\
         features:\n  - id: tokens\n\
         customers:\n  - id: acme\n    entities:\n      - { id: acme, type: org }\n      - { id: t0, type: team, parent: acme }\n      - { id: t1, type: team, parent: acme }\n",
    );
    for i in 0..USERS {
        s.push_str(&format!(
            "      - {{ id: u{i}, type: user, parent: t{} }}\n",
            i % 2
        ));
    }
    s.push_str(&format!(
        "    limits:\n\
         \x20     - {{ id: user-day, entityType: user, feature: tokens, kind: quota, limit: 1000000000, period: P1D }}\n\
         \x20     - {{ id: team-day, entityType: team, feature: tokens, kind: quota, limit: 1000000000, period: P1D }}\n\
         \x20     - {{ id: cap, entity: acme, feature: tokens, kind: quota, limit: {cap}, period: P1M }}\n"
    ));
    s
}

fn terms() -> LeaseTerms {
    LeaseTerms {
        ttl_ms: 8_000,
        skew_ms: 1_000,
        max_share_permille: 100,
        min_slice: 1,
    }
}

struct Replica {
    engine: Arc<Engine>,
    leases: LeasedStore,
}

/// One replica with leases on a fresh in-memory store, on a manual clock: its engine, its
/// leases, the store behind them and the clock. On a current-thread runtime, slice placements
/// run when the test yields.
async fn one_leased_replica(
    yaml: &str,
    terms: LeaseTerms,
) -> (
    Engine,
    LeasedStore,
    Arc<dyn CounterStore>,
    tollgate::clock::ManualClock,
) {
    let clock = tollgate::clock::ManualClock::new(common::at("2026-03-10T10:00:00Z"));
    let inner: Arc<dyn CounterStore> = common::memory();
    let l = LeasedStore::new(Arc::clone(&inner), terms, Arc::new(clock.clone()));
    let e = Engine::new(model(yaml), Arc::new(l.clone()), Arc::new(clock.clone()))
        .await
        .unwrap();
    (e, l, inner, clock)
}

/// Runs `f` to completion on a current-thread runtime.
fn on_one_thread<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

async fn replicas(stores: Vec<Arc<dyn CounterStore>>, cap: u64) -> Vec<Replica> {
    let mut out = Vec::new();
    for inner in stores {
        let leases = LeasedStore::new(inner, terms(), Arc::new(SystemClock));
        let engine = Engine::new(
            model(&config(cap)),
            Arc::new(leases.clone()),
            Arc::new(SystemClock),
        )
        .await
        .unwrap();
        out.push(Replica {
            engine: Arc::new(engine),
            leases,
        });
    }
    out
}

/// What one client got: units settled, grants made. Every other hold is closed through
/// `elsewhere`, another replica, as a Service in front of replicas sends a settlement to
/// whichever it picks. With `commit`, every check's usage is final: nothing is held or closed.
async fn client(
    engine: Arc<Engine>,
    elsewhere: Arc<Engine>,
    who: usize,
    commit: bool,
) -> (u64, u64) {
    // Skewed: a quarter of the clients share two hot users, the rest spread over all.
    let user = if who.is_multiple_of(4) {
        format!("u{}", who % 2)
    } else {
        format!("u{}", who % USERS)
    };
    let d = dims(&[("userId", &user)]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut settled, mut grants, mut denied_in_a_row) = (0u64, 0u64, 0u32);
    for n in 0..4_000u64 {
        if Instant::now() > deadline {
            break;
        }
        // A request arrives from the network: other tasks (a replica's slice placements) run
        // between, as they do in the server; the in-process store never suspends on its own.
        tokio::task::yield_now().await;
        let size = 1 + (n + who as u64) % LARGEST;
        let decision = engine
            .check(&CheckRequest {
                customer: "acme",
                feature: "tokens",
                usage: Usage::units(size),
                dimensions: &d,
                dry_run: false,
                deadline: None,
                commit,
            })
            .await
            .unwrap();
        if decision.granted && commit {
            assert_eq!(decision.hold_id, None, "a commit holds nothing");
            denied_in_a_row = 0;
            grants += 1;
            settled += size;
        } else if decision.granted {
            denied_in_a_row = 0;
            grants += 1;
            let hold = decision.hold_id.unwrap();
            let closer = if n % 2 == 0 { &engine } else { &elsewhere };
            if n % 7 == 3 {
                let r = closer.release(&hold).await.unwrap();
                if r != tollgate::store::CloseOutcome::Closed {
                    eprintln!("DEBUG release {hold:?} {r:?} local={}", hold.seq >= 1 << 52);
                }
            } else {
                let r = closer.settle(&hold, Usage::units(size)).await.unwrap();
                if r != tollgate::store::CloseOutcome::Closed {
                    eprintln!("DEBUG settle {hold:?} {r:?}");
                }
                settled += size;
            }
        } else {
            // At the end of the budget: slices still out come back at the sweeps, so keep
            // asking a while before giving up.
            denied_in_a_row += 1;
            if denied_in_a_row > 60 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    (settled, grants)
}

/// 3 replicas × 64 clients race one cap with leases on, half of the holds closed through
/// another replica than the one that granted them: never over the cap, run to within one
/// request of it, the counter ends at exactly what was settled, and no slice is left. With
/// `commit`, the checks commit instead, and the slices are renewed by what they committed.
async fn race_with_leases(stores: Vec<Arc<dyn CounterStore>>, cap: u64, commit: bool) {
    let replicas = replicas(stores, cap).await;
    let stop = Arc::new(AtomicBool::new(false));
    // Each replica's sweep, as the server runs it (faster, so the test is short).
    let sweeps: Vec<_> = replicas
        .iter()
        .map(|r| {
            let (engine, stop) = (Arc::clone(&r.engine), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let _ = engine.expire_due().await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();
    let mut clients = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        let elsewhere = &replicas[(i + 1) % replicas.len()].engine;
        for c in 0..CLIENTS {
            clients.push(tokio::spawn(client(
                Arc::clone(&r.engine),
                Arc::clone(elsewhere),
                i * CLIENTS + c,
                commit,
            )));
        }
    }
    let mut settled = 0;
    let mut grants = 0;
    for c in clients {
        let (s, g) = c.await.unwrap();
        settled += s;
        grants += g;
    }
    stop.store(true, Ordering::Relaxed);
    for s in sweeps {
        s.await.unwrap();
    }
    let now = SystemClock.now();
    for r in &replicas {
        r.leases.return_all(now).await.unwrap();
    }
    let stats: Vec<_> = replicas.iter().map(|r| r.leases.lease_stats()).collect();
    let local: u64 = stats.iter().map(|s| s.local_decisions).sum();
    let label = format!("cap {cap}: {grants} grants, {local} local, settled {settled}; {stats:?}");
    eprintln!("{label}");
    let counted_now = replicas[0]
        .engine
        .counted("acme", "acme", "cap", None)
        .await
        .unwrap();
    let label = format!("{label}; the cap counted {counted_now:?}");
    assert!(settled <= cap, "{label}: over the cap");
    assert!(
        cap - settled < LARGEST,
        "{label}: budget stranded at the end"
    );
    assert!(local > grants / 4, "{label}: leases were hardly used");
    let counted = replicas[0]
        .engine
        .counted("acme", "acme", "cap", None)
        .await
        .unwrap();
    assert_eq!(counted, Some(settled), "{label}: the counter disagrees");
    // Every decision made in a lease was recorded once, with its own series, as the store
    // records the others: the usage records add up to what was settled and granted.
    let day = Granularity::Day;
    let to = now.millis() + 86_400_000;
    let from = day.start(Timestamp::from_millis(to - 3 * 86_400_000));
    let scan = replicas[0]
        .engine
        .store()
        .usage()
        .usage_buckets(Name::from("acme"), day, from, to, &ScanNeeds::all(0))
        .await
        .unwrap();
    let mut recorded = Measures::default();
    let mut users = std::collections::HashSet::new();
    for (_, series, m) in scan.rows() {
        recorded.add(m);
        users.insert(series.get("userId").map(str::to_string));
    }
    assert_eq!(recorded.units, settled, "{label}: usage records disagree");
    assert_eq!(
        recorded.requests, grants,
        "{label}: a grant's record is missing"
    );
    assert!(
        users.len() > 1 && !users.contains(&None),
        "{label}: records lost their user: {users:?}"
    );
    for s in &stats {
        assert_eq!(s.outstanding_units, 0, "{label}: a slice is still out");
        assert_eq!(s.stranded_units, 0, "{label}: a slice expired unreturned");
    }
}

#[test]
fn replicas_racing_a_cap_through_leases_on_redis_never_overspend() {
    let server = RedisServer::start();
    let prefix = "leases-node";
    let stores = (0..REPLICAS)
        .map(|_| {
            redis_store_prefixed(RedisTarget::Node(server.url()), prefix) as Arc<dyn CounterStore>
        })
        .collect();
    runtime().block_on(race_with_leases(stores, 20_000, false));
}

#[test]
fn replicas_racing_a_cap_through_leases_on_a_redis_cluster_never_overspend() {
    let cluster = RedisCluster::start();
    let prefix = "leases-cluster";
    let stores = (0..REPLICAS)
        .map(|_| {
            redis_store_prefixed(RedisTarget::Cluster(cluster.urls()), prefix)
                as Arc<dyn CounterStore>
        })
        .collect();
    runtime().block_on(race_with_leases(stores, 20_000, false));
}

#[test]
fn replicas_racing_a_cap_through_leases_in_one_process_never_overspend() {
    let inner: Arc<dyn CounterStore> = common::memory();
    let stores = (0..REPLICAS).map(|_| Arc::clone(&inner)).collect();
    runtime().block_on(race_with_leases(stores, 20_000, false));
}

#[test]
fn replicas_committing_against_a_cap_through_leases_on_redis_count_exactly() {
    let server = RedisServer::start();
    let stores = (0..REPLICAS)
        .map(|_| {
            redis_store_prefixed(RedisTarget::Node(server.url()), "commits-node")
                as Arc<dyn CounterStore>
        })
        .collect();
    runtime().block_on(race_with_leases(stores, 20_000, true));
}

#[test]
fn replicas_committing_against_a_cap_through_leases_in_one_process_count_exactly() {
    let inner: Arc<dyn CounterStore> = common::memory();
    let stores = (0..REPLICAS).map(|_| Arc::clone(&inner)).collect();
    runtime().block_on(race_with_leases(stores, 20_000, true));
}

// ---------------------------------------------------------------------------------------------
// Closes through another replica.

/// Whether a hold id names a hold decided inside a lease (its number carries bit 52).
fn is_local(hold: &tollgate::core::HoldId) -> bool {
    hold.seq >= 1 << 52
}

/// Two replicas on `stores`: holds granted inside one replica's slices are settled, settled
/// over their hold, and released through the other, each exactly once (a repeat changes
/// nothing), and the counter ends at exactly what was settled once both have swept.
async fn closes_through_another_replica(stores: Vec<Arc<dyn CounterStore>>) {
    use tollgate::store::CloseOutcome;
    let store = Arc::clone(&stores[0]);
    let replicas = replicas(stores, 1_000_000).await;
    let (a, b) = (&replicas[0].engine, &replicas[1].engine);
    let d = dims(&[("userId", "u1")]);
    let req = CheckRequest {
        customer: "acme",
        feature: "tokens",
        usage: Usage::units(100),
        dimensions: &d,
        dry_run: false,
        deadline: None,
        commit: false,
    };
    let check = |units: u64| {
        let req = CheckRequest {
            usage: Usage::units(units),
            ..req
        };
        async move { a.check(&req).await.unwrap().hold_id.unwrap() }
    };
    // Busy enough on replica a that its decisions are made inside slices.
    let mut settled = 0;
    let mut warm = 0;
    let hold = loop {
        let h = check(100).await;
        if is_local(&h) {
            break h;
        }
        a.settle(&h, Usage::units(100)).await.unwrap();
        settled += 100;
        warm += 1;
        assert!(warm < 200, "no decision was made inside a slice");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let over = check(100).await;
    let released = check(100).await;
    assert!(is_local(&over) && is_local(&released));
    // A streamed call's slice, decided inside a slice too: released through b, it makes no
    // record (the call's first hold records the whole).
    let slice = a.extend(&req).await.unwrap().hold_id.unwrap();
    assert!(is_local(&slice));
    b.release(&slice).await.unwrap();

    // Settled through b, at less than held, as a stream cut by the cap (the end travels with
    // the posted close); a repeat through b is already closed.
    let cut = a.stream_end("acme", true, "cap");
    assert!(cut.is_some());
    assert_eq!(
        b.settle_ended(&hold, Usage::units(10), cut).await.unwrap(),
        CloseOutcome::Closed
    );
    assert_eq!(
        b.settle(&hold, Usage::units(10)).await.unwrap(),
        CloseOutcome::AlreadyClosed
    );
    settled += 10;
    // Over its hold, and released, through b.
    b.settle(&over, Usage::units(150)).await.unwrap();
    settled += 150;
    b.release(&released).await.unwrap();
    // a's sweep applies them; afterwards a close through a finds them closed.
    a.expire_due().await.unwrap();
    for h in [&hold, &over, &released] {
        assert_eq!(
            a.settle(h, Usage::units(999)).await.unwrap(),
            CloseOutcome::AlreadyClosed,
            "{h:?} still open on the replica that granted it"
        );
    }
    let now = SystemClock.now();
    for r in &replicas {
        r.leases.return_all(now).await.unwrap();
    }
    let counted = a.counted("acme", "acme", "cap", None).await.unwrap();
    assert_eq!(counted, Some(settled), "settled {settled}");
    let user = a.counted("acme", "u1", "user-day", None).await.unwrap();
    assert_eq!(user, Some(settled));
    // One record per call: the warm-up's, the three above (one released), none for the slice;
    // the cut one says so.
    let acme = tollgate::core::Name::from("acme");
    let page = store
        .usage()
        .read_events(Some(acme), None, 1_000)
        .await
        .unwrap();
    let records: Vec<_> = page
        .events
        .iter()
        .filter_map(|e| match &*e.body {
            tollgate::store::events::EventBody::Record(r) => Some(r),
            _ => None,
        })
        .collect();
    let kinds = |k: RecordKind| records.iter().filter(|r| r.kind == k).count();
    assert_eq!(kinds(RecordKind::Released), 1, "{records:#?}");
    assert_eq!(kinds(RecordKind::Settled), warm + 2, "{records:#?}");
    let cut_by: Vec<_> = records
        .iter()
        .filter_map(|r| r.series.get(tollgate::core::usage::CUT_BY))
        .collect();
    assert_eq!(cut_by, ["cap"]);
}

#[test]
fn a_hold_closes_through_another_replica_in_one_process() {
    let inner: Arc<dyn CounterStore> = common::memory();
    runtime().block_on(closes_through_another_replica(vec![
        Arc::clone(&inner),
        inner,
    ]));
}

#[test]
fn a_hold_closes_through_another_replica_on_redis() {
    let server = RedisServer::start();
    let stores = (0..2)
        .map(|_| {
            redis_store_prefixed(RedisTarget::Node(server.url()), "relay-node")
                as Arc<dyn CounterStore>
        })
        .collect();
    runtime().block_on(closes_through_another_replica(stores));
}

#[test]
fn a_hold_closes_through_another_replica_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let stores = (0..2)
        .map(|_| {
            redis_store_prefixed(RedisTarget::Cluster(cluster.urls()), "relay-cluster")
                as Arc<dyn CounterStore>
        })
        .collect();
    runtime().block_on(closes_through_another_replica(stores));
}

// ---------------------------------------------------------------------------------------------
// Property: leases never grant what the exact store would refuse.

mod exactness {
    use super::*;
    use proptest::prelude::*;
    use tollgate::clock::ManualClock;
    use tollgate::core::HoldId;

    /// Every limit kind on one chain: quotas (leased) at the org and the user, a rolling rate
    /// window and a concurrency limit (never leased) on the team, and a per-request quota.
    const MODEL: &str = "holdTtl: PT2S\n\
        entityTypes:\n  - name: org\n  - name: team\n    parents: [org]\n  - name: user\n    parents: [team]\n\
        attribution:\n  - dimension: userId\n    entityType: user\n\
        features:\n  - id: tokens\n    alsoDraws:\n      - { feature: calls, per: request }\n  - id: calls\n\
        customers:\n  - id: acme\n    entities:\n      - { id: acme, type: org }\n      - { id: t, type: team, parent: acme }\n      - { id: u0, type: user, parent: t }\n      - { id: u1, type: user, parent: t }\n\
        \x20   limits:\n\
        \x20     - { id: cap, entity: acme, feature: tokens, kind: quota, limit: 400, period: P1M }\n\
        \x20     - { id: user-day, entityType: user, feature: tokens, kind: quota, limit: 250, period: P1D }\n\
        \x20     - { id: calls-day, entity: acme, feature: calls, kind: quota, limit: 90, period: P1D }\n\
        \x20     - { id: team-rate, entity: t, feature: tokens, kind: rate, limit: 300, window: PT10S }\n\
        \x20     - { id: team-slots, entity: t, feature: tokens, kind: concurrency, limit: 6 }\n";

    #[derive(Debug, Clone)]
    enum Op {
        Check {
            replica: usize,
            user: usize,
            size: u64,
        },
        /// Settles at `percent` of the hold: never over it here. A settlement over its hold is
        /// charged ungated, with or without leases; a slice already held keeps its room, so
        /// after one a replica may grant inside its slice what the exact store, which the
        /// excess has filled, now refuses (both stay within the cap plus the excess).
        /// `an_over_hold_settlement_reaches_the_store_at_once` covers it.
        Settle {
            pick: usize,
            percent: u64,
        },
        Release {
            pick: usize,
        },
        Sweep {
            replica: usize,
        },
        /// Lets the replicas' slice placements run.
        Yield,
        Advance {
            ms: i64,
        },
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                6 => (0usize..2, 0usize..2, 1u64..30).prop_map(|(replica, user, size)| Op::Check { replica, user, size }),
                3 => (0usize..16, 0u64..=100).prop_map(|(pick, percent)| Op::Settle { pick, percent }),
                1 => (0usize..16).prop_map(|pick| Op::Release { pick }),
                1 => (0usize..2).prop_map(|replica| Op::Sweep { replica }),
                2 => Just(Op::Yield),
                1 => (1i64..3_000).prop_map(|ms| Op::Advance { ms }),
            ],
            1..120,
        )
    }

    fn terms() -> LeaseTerms {
        LeaseTerms {
            ttl_ms: 6_000,
            skew_ms: 500,
            max_share_permille: 300,
            min_slice: 1,
        }
    }

    async fn decide(e: &Engine, user: usize, size: u64, dry_run: bool) -> tollgate::core::Decision {
        let d = dims(&[("userId", &format!("u{user}"))]);
        e.check(&CheckRequest {
            customer: "acme",
            feature: "tokens",
            usage: Usage::units(size),
            dimensions: &d,
            dry_run,
            deadline: None,
            commit: false,
        })
        .await
        .unwrap()
    }

    /// Runs `ops` on two leased replicas sharing one in-memory store and on an exact store
    /// that sees only what the replicas granted, in the same order.
    async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
        let clock = ManualClock::new(common::at("2026-03-10T10:00:00Z"));
        let shared: Arc<dyn CounterStore> = common::memory();
        let mut leased = Vec::new();
        for _ in 0..2 {
            let l = LeasedStore::new(Arc::clone(&shared), terms(), Arc::new(clock.clone()));
            let e = Engine::new(model(MODEL), Arc::new(l.clone()), Arc::new(clock.clone()))
                .await
                .unwrap();
            leased.push((e, l));
        }
        let exact = Engine::new(model(MODEL), common::memory(), Arc::new(clock.clone()))
            .await
            .unwrap();
        // Open grants: the replica's hold, the exact store's twin.
        let mut open: Vec<(usize, HoldId, HoldId, u64, usize)> = Vec::new();
        // Every grant's time, and whether it was closed before its TTL (PT2S).
        const TTL: i64 = 2_000;
        let mut grants: Vec<(i64, bool)> = Vec::new();
        for op in ops {
            match op {
                Op::Check {
                    replica,
                    user,
                    size,
                } => {
                    let (e, _) = &leased[replica];
                    let d = decide(e, user, size, false).await;
                    if d.granted {
                        let twin = decide(&exact, user, size, false).await;
                        prop_assert!(
                            twin.granted,
                            "a lease granted {size} to u{user} that the exact store refuses: {:?}",
                            twin.denial
                        );
                        grants.push((clock.now().millis(), false));
                        let g = grants.len() - 1;
                        open.push((replica, d.hold_id.unwrap(), twin.hold_id.unwrap(), size, g));
                    } else if decide(&exact, user, size, true).await.granted {
                        // A denial the exact store would not make: only budget held in
                        // slices can explain it (out now, or expired before its return and
                        // counted whole).
                        let held: u64 = leased
                            .iter()
                            .map(|(_, l)| {
                                let s = l.lease_stats();
                                s.outstanding_units + s.stranded_units
                            })
                            .sum();
                        // Or the store part of a partly covered hold not closed within its
                        // TTL: it waits a relay margin longer for a close posted through
                        // another replica.
                        let now = clock.now().millis();
                        let lingering = grants.iter().any(|(at, closed)| {
                            !closed
                                && now >= at + TTL
                                && now < at + TTL + tollgate::store::leased::RELAY_MARGIN_MS
                        });
                        prop_assert!(
                            held > 0 || lingering,
                            "denied {size} to u{user} with no slice out: {:?}",
                            d.denial
                        );
                    }
                }
                Op::Settle { pick, percent } if !open.is_empty() => {
                    let (r, h, twin, held, g) = open.remove(pick % open.len());
                    if clock.now().millis() < grants[g].0 + TTL {
                        grants[g].1 = true;
                    }
                    let actual = held * percent / 100;
                    let a = leased[r].0.settle(&h, Usage::units(actual)).await;
                    let b = exact.settle(&twin, Usage::units(actual)).await;
                    prop_assert_eq!(a.is_ok(), b.is_ok(), "settle: {:?} vs {:?}", a, b);
                    if let (Ok(a), Ok(b)) = (a, b) {
                        prop_assert_eq!(a, b, "a settlement's outcome differs");
                    }
                }
                Op::Release { pick } if !open.is_empty() => {
                    let (r, h, twin, _, g) = open.remove(pick % open.len());
                    if clock.now().millis() < grants[g].0 + TTL {
                        grants[g].1 = true;
                    }
                    let a = leased[r].0.release(&h).await.unwrap();
                    let b = exact.release(&twin).await.unwrap();
                    prop_assert_eq!(a, b, "a release's outcome differs");
                }
                Op::Sweep { replica } => {
                    leased[replica].0.expire_due().await.unwrap();
                }
                Op::Yield => {
                    for _ in 0..8 {
                        tokio::task::yield_now().await;
                    }
                }
                Op::Advance { ms } => clock.advance_millis(ms),
                _ => {}
            }
            // The shared store counts every slice whole until it comes back, so it never
            // reads less than the exact store.
            for (entity, limit) in [("acme", "cap"), ("u0", "user-day"), ("u1", "user-day")] {
                let a = leased[0]
                    .0
                    .counted("acme", entity, limit, None)
                    .await
                    .unwrap();
                let b = exact.counted("acme", entity, limit, None).await.unwrap();
                prop_assert!(
                    a.unwrap_or(0) >= b.unwrap_or(0),
                    "{} {}: {:?} in the shared store, {:?} exact",
                    entity,
                    limit,
                    a,
                    b
                );
            }
        }
        // Everything returned: the shared counters equal the exact store's, but for slices
        // the store expired before their replica gave them back (a replica that did not
        // sweep within the TTL is one that died): those count whole, so the shared counters
        // may be over by their unused part, never under.
        let now = clock.now();
        for (_, l) in &leased {
            l.return_all(now).await.unwrap();
        }
        exact.expire_due().await.unwrap();
        let stranded: u64 = leased
            .iter()
            .map(|(_, l)| l.lease_stats().stranded_units)
            .sum();
        for (entity, limit) in [
            ("acme", "cap"),
            ("u0", "user-day"),
            ("u1", "user-day"),
            ("acme", "calls-day"),
        ] {
            let a = leased[0]
                .0
                .counted("acme", entity, limit, None)
                .await
                .unwrap();
            let b = exact.counted("acme", entity, limit, None).await.unwrap();
            let (a, b) = (a.unwrap_or(0), b.unwrap_or(0));
            prop_assert!(
                a >= b && a - b <= stranded,
                "{} {}: {} counted with leases, {} exact, {} stranded",
                entity,
                limit,
                a,
                b,
                stranded
            );
        }
        Ok(())
    }

    /// A decision held partly in slices, settled over its hold: the excess past the slices
    /// reaches the store's counters at once, so a decision the store makes next sees it.
    #[test]
    fn an_over_hold_settlement_reaches_the_store_at_once() {
        on_one_thread(async {
            // Slices of 30 % of what is left: both quotas of the decision below fit in one.
            let (e, l, inner, clock) = one_leased_replica(MODEL, terms()).await;
            // What the store counts, read without leases.
            let store = Engine::new(model(MODEL), inner, Arc::new(clock.clone()))
                .await
                .unwrap();
            let counted = |limit: &'static str, entity: &'static str| {
                let store = &store;
                async move {
                    store
                        .counted("acme", entity, limit, None)
                        .await
                        .unwrap()
                        .unwrap()
                }
            };
            // The first decision goes to the store and asks for slices; the next holds its
            // quotas in them (the team's rate and slots are never leased: the store).
            let first = decide(&e, 0, 5, false).await;
            e.settle(first.hold_id.as_ref().unwrap(), Usage::units(5))
                .await
                .unwrap();
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
            let d = decide(&e, 0, 30, false).await;
            assert!(d.granted);
            assert_eq!(
                l.lease_stats().partial_decisions,
                1,
                "{:?}",
                l.lease_stats()
            );
            let slice = counted("cap", "acme").await - 5;
            assert!((30..300).contains(&slice), "a slice of {slice}");
            // 30 held, 300 settled: the slice is spent whole, the rest charged now.
            e.settle(d.hold_id.as_ref().unwrap(), Usage::units(300))
                .await
                .unwrap();
            assert_eq!(counted("cap", "acme").await, 305);
            assert_eq!(counted("user-day", "u0").await, 305);
            l.return_all(clock.now()).await.unwrap();
            assert_eq!(counted("cap", "acme").await, 305);
            assert_eq!(counted("user-day", "u0").await, 305);
        });
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
        #[test]
        fn leases_grant_nothing_the_exact_store_refuses(ops in ops()) {
            on_one_thread(run(ops))?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Alerts from decisions made inside leases.

mod alerting {
    use super::*;
    use serde_json::Value;
    use tollgate::alerts::{Claims, after_decision};
    use tollgate::store::events::EventBody;

    const MODEL: &str = "holdTtl: PT2S\n\
        entityTypes:\n  - name: org\n  - name: team\n    parents: [org]\n  - name: user\n    parents: [team]\n\
        attribution:\n  - dimension: userId\n    entityType: user\n\
        features:\n  - id: tokens\n\
        customers:\n  - id: acme\n    entities:\n      - { id: acme, type: org }\n      - { id: t, type: team, parent: acme }\n      - { id: u0, type: user, parent: t }\n\
        \x20   limits:\n\
        \x20     - { id: team-day, entityType: team, feature: tokens, kind: quota, limit: 1000, period: P1D }\n\
        \x20   alerts:\n\
        \x20     - { id: team-budget, entityType: team, limit: team-day, percent: [50, 80, 100] }\n";

    /// One replica deciding inside its slices sees each crossing of its own spending when
    /// it happens: every threshold fires once, at the decision that crossed it.
    #[test]
    fn thresholds_crossed_inside_a_lease_fire_once_each() {
        on_one_thread(async {
            let (e, l, inner, clock) = one_leased_replica(MODEL, super::terms()).await;
            let claims = Claims::default();
            let d = dims(&[("userId", "u0")]);
            let mut fired_at = Vec::new();
            let mut spent = 0;
            for _ in 0..40 {
                let decision = e
                    .check(&CheckRequest {
                        customer: "acme",
                        feature: "tokens",
                        usage: Usage::units(30),
                        dimensions: &d,
                        dry_run: false,
                        deadline: None,
                        commit: false,
                    })
                    .await
                    .unwrap();
                let fired = after_decision(&e, &claims, "acme", &decision)
                    .await
                    .unwrap();
                if decision.granted {
                    spent += 30;
                    e.settle(decision.hold_id.as_ref().unwrap(), Usage::units(30))
                        .await
                        .unwrap();
                }
                if fired > 0 {
                    fired_at.push((spent, fired));
                }
                for _ in 0..8 {
                    tokio::task::yield_now().await;
                }
                let _ = e.expire_due().await;
            }
            let stats = l.lease_stats();
            assert!(stats.local_decisions > 10, "{stats:?}");
            // 30 units a call: 50 % crossed at 510, 80 % at 810, 100 % never (990 + 30 > 1000).
            assert_eq!(fired_at, [(510, 1), (810, 1)], "{stats:?}");
            l.return_all(clock.now()).await.unwrap();
            let events = inner
                .usage()
                .read_events(Some(Name::from("acme")), None, 1000)
                .await
                .unwrap()
                .events;
            let alerts: Vec<Value> = events
                .iter()
                .filter_map(|e| match &*e.body {
                    EventBody::Alert(a) => Some(serde_json::from_str(a).unwrap()),
                    EventBody::Record(_) => None,
                })
                .collect();
            let used: Vec<&Value> = alerts.iter().map(|a| &a["data"]["used"]).collect();
            assert_eq!(used, [510, 810], "{alerts:?}");
        });
    }
}

/// A check of one unit for user `u1` of acme.
async fn one_unit_for_u1(
    engine: &Engine,
) -> Result<tollgate::core::Decision, tollgate::engine::DecisionError> {
    engine
        .check(&CheckRequest {
            customer: "acme",
            feature: "tokens",
            usage: Usage::units(1),
            dimensions: &dims(&[("userId", "u1")]),
            dry_run: false,
            deadline: None,
            commit: false,
        })
        .await
}

/// A decision that asked for slices while the store was down asks again once it is back: the
/// replica goes on deciding inside leases after an outage.
#[test]
fn slices_are_asked_for_again_after_the_store_failed() {
    let mut server = RedisServer::start();
    let store = redis_store_prefixed(RedisTarget::Node(server.url()), "leases-outage");
    runtime().block_on(async {
        let mut replicas = replicas(vec![store as Arc<dyn CounterStore>], 1_000_000).await;
        let r = replicas.remove(0);
        let check = || one_unit_for_u1(&r.engine);
        server.stop();
        assert!(check().await.is_err(), "answered with Redis down");
        server.restart();
        // Redis is back (empty: no persistence); decisions reconnect and slices follow.
        let deadline = Instant::now() + Duration::from_secs(20);
        while r.leases.lease_stats().local_decisions == 0 {
            assert!(
                Instant::now() < deadline,
                "no decision inside a lease after the outage: {:?}",
                r.leases.lease_stats()
            );
            if let Ok(dec) = check().await
                && let Some(h) = dec.hold_id
            {
                r.engine.settle(&h, Usage::units(1)).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// Settlements past their slices while Redis is down: the excess is kept and charged once
/// Redis is back, so the counters end at exactly what was settled (never under).
#[test]
fn usage_past_a_slice_during_an_outage_is_charged_once_the_store_is_back() {
    // Kept on disk at every write, so a restart loses nothing.
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let store = redis_store_prefixed(RedisTarget::Node(server.url()), "leases-over-outage");
    runtime().block_on(async {
        let inner: Arc<dyn CounterStore> = store;
        let mut replicas = replicas(vec![Arc::clone(&inner)], 1_000_000).await;
        let r = replicas.remove(0);
        // A decision of one unit, and whether it was made inside leases.
        let check = || async {
            let before = r.leases.lease_stats().local_decisions;
            let dec = one_unit_for_u1(&r.engine).await.unwrap();
            let local = r.leases.lease_stats().local_decisions > before;
            (dec.hold_id.expect("granted"), local)
        };
        // Until slices are placed, decisions go to Redis (settled at 1).
        let mut settled = 0u64;
        let deadline = Instant::now() + Duration::from_secs(20);
        let first = loop {
            assert!(Instant::now() < deadline, "{:?}", r.leases.lease_stats());
            let (hold, local) = check().await;
            if local {
                break hold;
            }
            r.engine.settle(&hold, Usage::units(1)).await.unwrap();
            settled += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Then local holds, kept open, until the slices' room is gone.
        let mut locals = vec![first];
        for _ in 0..10_000 {
            let (hold, local) = check().await;
            if !local {
                r.engine.release(&hold).await.unwrap();
                break;
            }
            locals.push(hold);
        }
        server.stop();
        // Each settled at ten times its hold: past the slices' room, so most of it must reach
        // Redis as an excess, which it cannot now.
        for hold in &locals {
            r.engine
                .settle(hold, Usage::units(10))
                .await
                .expect("a local settlement stands while the store is away");
            settled += 10;
        }
        server.restart();
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = r.leases.return_all(SystemClock.now()).await {
            assert!(Instant::now() < deadline, "Redis did not come back: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(r.leases.lease_stats().outstanding_units, 0);
        let exact = Engine::new(model(&config(1_000_000)), inner, Arc::new(SystemClock))
            .await
            .unwrap();
        for (entity, limit) in [("acme", "cap"), ("t1", "team-day"), ("u1", "user-day")] {
            let counted = exact
                .counted("acme", entity, limit, None)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                counted,
                settled,
                "{limit} of {entity} ({} local)",
                locals.len()
            );
        }
    });
}

/// A partly covered decision (its quotas inside slices, its concurrency slot in the store)
/// settled while Redis does not answer: the settlement stands, and once Redis is back the
/// store part is settled at the reported usage (slot freed, record at the usage), not left
/// to expire at its held amount; a second close answers already closed and changes nothing.
#[test]
fn a_store_part_refused_during_an_outage_is_closed_once_the_store_is_back() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let store = redis_store_prefixed(RedisTarget::Node(server.url()), "leases-part-outage");
    runtime().block_on(async {
        let inner: Arc<dyn CounterStore> = store;
        let leases = LeasedStore::new(Arc::clone(&inner), terms(), Arc::new(SystemClock));
        let yaml = config(1_000_000).replace(
            "    limits:\n",
            "    limits:\n      - { id: user-slots, entityType: user, feature: tokens, kind: concurrency, limit: 1000 }\n",
        );
        let engine = Engine::new(model(&yaml), Arc::new(leases.clone()), Arc::new(SystemClock))
            .await
            .unwrap();
        // Until slices are placed, decisions go to Redis whole (settled at 1).
        let mut settled = 0u64;
        let deadline = Instant::now() + Duration::from_secs(20);
        let partial = loop {
            assert!(Instant::now() < deadline, "{:?}", leases.lease_stats());
            let before = leases.lease_stats().partial_decisions;
            let hold = one_unit_for_u1(&engine).await.unwrap().hold_id.unwrap();
            if leases.lease_stats().partial_decisions > before {
                break hold;
            }
            engine.settle(&hold, Usage::units(1)).await.unwrap();
            settled += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        server.stop();
        let at = Instant::now();
        engine
            .settle(&partial, Usage::units(7))
            .await
            .expect("the settlement stands while the store is away");
        settled += 7;
        assert_eq!(
            engine.settle(&partial, Usage::units(7)).await.unwrap(),
            tollgate::store::CloseOutcome::AlreadyClosed
        );
        server.restart();
        let deadline = Instant::now() + Duration::from_secs(20);
        while let Err(e) = leases.return_all(SystemClock.now()).await {
            assert!(Instant::now() < deadline, "Redis did not come back: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Within the hold's TTL (PT3S), so nothing here is the expiry's doing.
        assert!(at.elapsed() < Duration::from_millis(2_500), "{:?}", at.elapsed());
        let exact = Engine::new(model(&yaml), Arc::clone(&inner), Arc::new(SystemClock))
            .await
            .unwrap();
        let slots = exact.counted("acme", "u1", "user-slots", None).await.unwrap();
        assert_eq!(slots.unwrap_or(0), 0, "the slot is free");
        let user = exact.counted("acme", "u1", "user-day", None).await.unwrap();
        assert_eq!(user, Some(settled));
        // The store part's record says settled at 7, as the counters do.
        let now = SystemClock.now();
        let scan = inner
            .usage().usage_buckets(
                Name::from("acme"),
                Granularity::Day,
                Granularity::Day.start(Timestamp::from_millis(now.millis() - 86_400_000)),
                now.millis() + 86_400_000,
                &ScanNeeds::all(0),
            )
            .await
            .unwrap();
        let mut recorded = Measures::default();
        for (_, _, m) in scan.rows() {
            recorded.add(m);
        }
        assert_eq!(recorded.units, settled, "usage records against the counter");
    });
}

/// Once the load stops, a replica's slices are back in the store within about two seconds
/// (the next sweeps after a second without a decision), and none is placed for nobody.
#[test]
fn idle_slices_come_back_within_seconds_and_none_is_placed_for_nobody() {
    let inner: Arc<dyn CounterStore> = common::memory();
    runtime().block_on(async {
        let r = replicas(vec![inner], 1_000_000).await.remove(0);
        let stop = Arc::new(AtomicBool::new(false));
        // The server sweeps every second.
        let sweep = {
            let (engine, stop) = (Arc::clone(&r.engine), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let _ = engine.expire_due().await;
                    tokio::time::sleep(Duration::from_millis(1_000)).await;
                }
            })
        };
        let busy_until = Instant::now() + Duration::from_millis(2_500);
        while Instant::now() < busy_until {
            let hold = one_unit_for_u1(&r.engine).await.unwrap().hold_id.unwrap();
            r.engine.settle(&hold, Usage::units(1)).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let during = r.leases.lease_stats();
        assert!(
            during.local_decisions > 0 && during.outstanding_units > 0,
            "{during:?}"
        );
        tokio::time::sleep(Duration::from_millis(3_200)).await;
        let after = r.leases.lease_stats();
        stop.store(true, Ordering::Relaxed);
        sweep.await.unwrap();
        assert_eq!(after.outstanding_units, 0, "slices still out: {after:?}");
        assert!(
            after.slices_placed <= during.slices_placed + 1,
            "slices placed with nobody asking: {during:?} then {after:?}"
        );
    });
}

/// What a replica reports as a quota's usage (budgets, `counted`) leaves out what its slices
/// hold and have not spent: after calls settled inside slices, the usage is what they spent.
#[test]
fn a_quota_read_through_a_leased_replica_is_its_usage_not_its_slices() {
    let inner: Arc<dyn CounterStore> = common::memory();
    runtime().block_on(async {
        let r = replicas(vec![inner], 1_000_000).await.remove(0);
        let mut settled = 0;
        let mut local = 0;
        for _ in 0..200 {
            let before = r.leases.lease_stats().local_decisions;
            let hold = one_unit_for_u1(&r.engine).await.unwrap().hold_id.unwrap();
            local += u64::from(r.leases.lease_stats().local_decisions > before);
            r.engine.settle(&hold, Usage::units(1)).await.unwrap();
            settled += 1;
            if local >= 6 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let out = r.leases.lease_stats().outstanding_units;
        assert!(local >= 6 && out > 0, "{:?}", r.leases.lease_stats());
        for (entity, limit) in [("acme", "cap"), ("u1", "user-day"), ("t1", "team-day")] {
            let used = r.engine.counted("acme", entity, limit, None).await.unwrap();
            assert_eq!(
                used,
                Some(settled),
                "{limit} of {entity} with {out} units in slices"
            );
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The store step a renewal takes, on every store.

test_with_all_stores!(a_renewal_settles_the_old_slice_and_takes_the_next_in_one_step);

const CAP_MODEL: &str = "entityTypes:\n  - name: org\n  - name: team\n    parents: [org]\n  - name: user\n    parents: [team]\n\
    attribution:\n  - dimension: userId\n    entityType: user\n\
    features:\n  - id: tokens\n\
    customers:\n  - id: acme\n    entities:\n      - { id: acme, type: org }\n      - { id: t, type: team, parent: acme }\n      - { id: u1, type: user, parent: t }\n\
    \x20   limits:\n\
    \x20     - { id: cap, entity: acme, feature: tokens, kind: quota, limit: 100, period: P1M }\n";

/// With the cap full (a slice of 60 and a decision of 40), a renewal that spent 10 of its
/// slice takes a next slice of 50: the 50 it returns is there for the next one in the same
/// step (placing the next slice before returning the old could not). A renewal of a slice
/// already gone says so, and still answers the reservation.
fn a_renewal_settles_the_old_slice_and_takes_the_next_in_one_step(store: Arc<dyn CounterStore>) {
    use tollgate::core::plan::{AutoEntities, Planned, Registry};
    use tollgate::store::{CloseOutcome, HoldKey, ReserveMode};
    let h = common::harness(CAP_MODEL, store, "2026-03-10T10:00:00Z");
    let model = h.engine.model();
    let auto = AutoEntities::default();
    let d = dims(&[("userId", "u1")]);
    let plan_of = |units: u64, tag: u128| {
        let Planned::Ready(mut p) = model
            .plan(
                &Registry::new(&auto),
                "acme",
                "tokens",
                Usage::units(units),
                &d,
                h.engine.now(),
            )
            .unwrap()
        else {
            panic!("u1 is in the tree")
        };
        p.hold_tag = tag;
        p.record = false;
        p.max_settle = 1 << 53;
        p
    };
    let store = h.engine.store();
    let now = h.engine.now();
    let slice = h
        .run(store.reserve(&plan_of(60, 1), ReserveMode::Hold, now))
        .unwrap()
        .hold
        .unwrap();
    let exact = h
        .run(store.reserve(&plan_of(40, 2), ReserveMode::Hold, now))
        .unwrap();
    assert!(exact.hold.is_some(), "{exact:?}");
    let old = HoldKey {
        customer: Name::from("acme"),
        seq: slice.seq,
        tag: slice.tag,
    };
    let (outcome, next) = h.run(store.renew(old, 10, &plan_of(50, 3), now)).unwrap();
    assert_eq!(outcome, CloseOutcome::Closed);
    assert!(
        next.hold.is_some(),
        "the returned 50 was not there: {next:?}"
    );
    assert_eq!(h.counted("acme", "acme", "cap"), 100);
    // The old slice is gone: said so, and the next reservation is answered (denied: full).
    let (outcome, denied) = h.run(store.renew(old, 10, &plan_of(1, 4), now)).unwrap();
    assert_eq!(outcome, CloseOutcome::AlreadyClosed);
    assert_eq!(denied.blocking, Some(0));
    assert!(denied.hold.is_none());
    assert_eq!(h.counted("acme", "acme", "cap"), 100);
}
