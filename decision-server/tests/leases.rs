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
use tollgate::core::plan::Usage;
use tollgate::core::rollup::{Granularity, Measures};
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

async fn replicas(stores: Vec<Arc<dyn CounterStore>>, cap: u64) -> Vec<Replica> {
    let mut out = Vec::new();
    for inner in stores {
        let leases = LeasedStore::new(inner, terms());
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

/// What one client got: units settled, grants made.
async fn client(engine: Arc<Engine>, who: usize) -> (u64, u64) {
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
            })
            .await
            .unwrap();
        if decision.granted {
            denied_in_a_row = 0;
            grants += 1;
            let hold = decision.hold_id.unwrap();
            if n % 7 == 3 {
                engine.release(&hold).await.unwrap();
            } else {
                engine.settle(&hold, Usage::units(size)).await.unwrap();
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

/// 3 replicas × 64 clients race one cap with leases on: never over the cap, run to within
/// one request of it, the counter ends at exactly what was settled, and no slice is left.
async fn race_with_leases(stores: Vec<Arc<dyn CounterStore>>, cap: u64) {
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
        for c in 0..CLIENTS {
            clients.push(tokio::spawn(client(Arc::clone(&r.engine), i * CLIENTS + c)));
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
        .usage_buckets(Name::from("acme"), day, from, to)
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
    runtime().block_on(race_with_leases(stores, 20_000));
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
    runtime().block_on(race_with_leases(stores, 20_000));
}

#[test]
fn replicas_racing_a_cap_through_leases_in_one_process_never_overspend() {
    let inner: Arc<dyn CounterStore> = common::memory();
    let stores = (0..REPLICAS).map(|_| Arc::clone(&inner)).collect();
    runtime().block_on(race_with_leases(stores, 20_000));
}
