//! Memory per active counter: drives checks for N/3 distinct users (three limits each: rate,
//! quota, concurrency), settles every hold, and reports the growth of the process's resident
//! set divided by the counters created. Run: `cargo bench -p tollgate --bench memory [N ...]`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // benchmark harness code

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

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

const CUSTOMERS: usize = 100;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn config(max_users: usize) -> String {
    let mut s = String::from(
        "entityTypes:\n  - name: org\n  - name: team\n    parents: [org]\n  - name: user\n    parents: [team]\n\
         attribution:\n  - dimension: userId\n    entityType: user\n    onUnknown: create\n\
         features:\n  - id: tokens\ncustomers:\n",
    );
    for c in 0..CUSTOMERS {
        s.push_str(&format!(
            "  - id: c{c}\n    maxAutoEntities: {max_users}\n    entities:\n      - {{ id: c{c}, type: org }}\n      - {{ id: c{c}-t, type: team, parent: c{c} }}\n\
             \x20   autoCreateParents:\n      user: c{c}-t\n\
             \x20   limits:\n\
             \x20     - {{ id: rate, entityType: user, feature: tokens, kind: rate, limit: 40000, window: PT1M }}\n\
             \x20     - {{ id: quota, entityType: user, feature: tokens, kind: quota, limit: 1000000, period: P1M }}\n\
             \x20     - {{ id: slots, entityType: user, feature: tokens, kind: concurrency, limit: 8 }}\n"
        ));
    }
    s
}

fn measure(counters_wanted: usize) {
    let users = counters_wanted / 3;
    let per_customer = users.div_ceil(CUSTOMERS);
    let model = tollgate::config::parse(&config(per_customer), "bench.yaml").unwrap();
    let clock = ManualClock::new(Timestamp::from_millis(1_780_000_000_000));
    let engine = ready(Engine::new(
        model,
        Arc::new(MemoryStore::new()),
        Arc::new(clock),
    ))
    .unwrap();
    let before = rss_bytes();
    let start = Instant::now();
    let mut dims = HashMap::new();
    for u in 0..users {
        let customer = format!("c{}", u % CUSTOMERS);
        dims.insert("userId".to_string(), format!("user-{u:08}"));
        let d = ready(engine.check(&CheckRequest {
            deadline: None,
            customer: &customer,
            feature: "tokens",
            usage: Usage::units(10),
            dimensions: &dims,
            dry_run: false,
            commit: false,
        }))
        .unwrap();
        assert!(d.granted);
        ready(engine.settle(d.hold_id.as_ref().unwrap(), Usage::units(7))).unwrap();
    }
    let elapsed = start.elapsed();
    let after = rss_bytes();
    let stats = engine.store().stats();
    let grown = after.saturating_sub(before);
    println!(
        "{:>10} counters ({} users over {} customers): RSS {:.1} MiB -> {:.1} MiB, +{:.1} MiB = {:.0} B per counter; {} open holds; built in {:.1} s",
        stats.counters,
        users,
        CUSTOMERS,
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        grown as f64 / 1048576.0,
        grown as f64 / stats.counters as f64,
        stats.holds_open,
        elapsed.as_secs_f64()
    );
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if args.is_empty() {
        vec![1_000_000, 10_000_000]
    } else {
        args
    };
    for n in sizes {
        // Each size in a fresh process would be cleaner; one process is simpler and the larger
        // run comes last, so the smaller one's freed memory cannot flatter it by much.
        measure(n);
    }
}
