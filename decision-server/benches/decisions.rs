//! Criterion benchmarks of the decision path: check + hold (+ settle) through a four-level
//! chain with three limits per level, on one thread and on two (different customers, and one
//! hot customer).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // benchmark harness code

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use tollgate::clock::ManualClock;
use tollgate::core::Timestamp;
use tollgate::core::usage::Usage;
use tollgate::store::MemoryStore;
use tollgate::{CheckRequest, Engine};

/// Runs an engine call over the in-memory store, which finishes on its first poll.
fn ready<T>(f: impl std::future::Future<Output = T>) -> T {
    f.now_or_never()
        .expect("an in-memory store call finishes at once")
}

/// `customers` customers, each org → dept → team → 16 users, three limits on every level.
fn config(customers: usize) -> String {
    let mut s = String::from(
        "entityTypes:\n  - name: org\n  - name: dept\n    parents: [org]\n  - name: team\n    parents: [dept]\n  - name: user\n    parents: [team]\n\
         attribution:\n  - dimension: userId\n    entityType: user\n\
         features:\n  - id: tokens\ncustomers:\n",
    );
    for c in 0..customers {
        s.push_str(&format!(
            "  - id: c{c}\n    entities:\n      - {{ id: c{c}, type: org }}\n      - {{ id: c{c}-d, type: dept, parent: c{c} }}\n      - {{ id: c{c}-t, type: team, parent: c{c}-d }}\n"
        ));
        for u in 0..16 {
            s.push_str(&format!(
                "      - {{ id: c{c}-u{u}, type: user, parent: c{c}-t }}\n"
            ));
        }
        s.push_str("    limits:\n");
        for (level, target) in [
            ("u", "entityType: user"),
            ("t", "entityType: team"),
            ("d", "entityType: dept"),
            ("o", "entityType: org"),
        ] {
            s.push_str(&format!(
                "      - {{ id: {level}-rate, {target}, feature: tokens, kind: rate, limit: 4000000000, window: PT1M }}\n\
                 \x20     - {{ id: {level}-quota, {target}, feature: tokens, kind: quota, limit: 1000000000000, period: P1M }}\n\
                 \x20     - {{ id: {level}-slots, {target}, feature: tokens, kind: concurrency, limit: 100000 }}\n"
            ));
        }
    }
    s
}

fn engine(customers: usize) -> (Engine, ManualClock) {
    let model = tollgate::config::parse(&config(customers), "bench.yaml").unwrap();
    let clock = ManualClock::new(Timestamp::from_millis(1_780_000_000_000));
    let engine = ready(Engine::new(
        model,
        Arc::new(MemoryStore::new()),
        Arc::new(clock.clone()),
    ))
    .unwrap();
    (engine, clock)
}

fn dims(customer: usize, user: usize) -> HashMap<String, String> {
    HashMap::from([("userId".to_string(), format!("c{customer}-u{user}"))])
}

fn check_hold_settle(engine: &Engine, customer: &str, dims: &HashMap<String, String>) {
    let d = ready(engine.check(&CheckRequest {
        deadline: None,
        customer,
        feature: "tokens",
        usage: Usage::units(100),
        dimensions: dims,
        dry_run: false,
        commit: false,
    }))
    .unwrap();
    assert!(d.granted && d.chain.len() == 12);
    ready(engine.settle(d.hold_id.as_ref().unwrap(), Usage::units(80))).unwrap();
}

fn single_thread(c: &mut Criterion) {
    let (engine, clock) = engine(4);
    let d = dims(0, 0);
    let mut g = c.benchmark_group("single-thread");
    g.bench_function("check+hold (4 levels x 3 limits), then release", |b| {
        // Only the check is timed; the release that keeps counters steady is not.
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let d = ready(engine.check(&CheckRequest {
                    deadline: None,
                    customer: "c0",
                    feature: "tokens",
                    usage: Usage::units(100),
                    dimensions: &d,
                    dry_run: false,
                    commit: false,
                }))
                .unwrap();
                total += start.elapsed();
                ready(engine.release(d.hold_id.as_ref().unwrap())).unwrap();
            }
            total
        })
    });
    g.bench_function("check+hold+settle (4 levels x 3 limits)", |b| {
        b.iter(|| {
            clock.advance_millis(1);
            check_hold_settle(black_box(&engine), "c0", &d)
        })
    });
    g.bench_function("dry-run check (4 levels x 3 limits)", |b| {
        b.iter(|| {
            ready(engine.check(&CheckRequest {
                deadline: None,
                customer: "c0",
                feature: "tokens",
                usage: Usage::units(100),
                dimensions: &d,
                dry_run: true,
                commit: false,
            }))
            .unwrap()
        })
    });
    g.finish();
}

/// Time for each of two threads to do `iters` check+hold+settle cycles side by side.
fn two_threads(engine: &Engine, customers: [usize; 2], iters: u64) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for (t, customer) in customers.into_iter().enumerate() {
            s.spawn(move || {
                let id = format!("c{customer}");
                let d = dims(customer, t);
                for _ in 0..iters {
                    check_hold_settle(engine, &id, &d);
                }
            });
        }
    });
    start.elapsed()
}

fn contention(c: &mut Criterion) {
    let (engine, _clock) = engine(4);
    let mut g = c.benchmark_group("two-threads");
    g.bench_function("different customers (time per pair of cycles)", |b| {
        b.iter_custom(|iters| two_threads(&engine, [1, 2], iters))
    });
    g.bench_function("one hot customer (time per pair of cycles)", |b| {
        b.iter_custom(|iters| two_threads(&engine, [3, 3], iters))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = single_thread, contention
}
criterion_main!(benches);
