//! The sidecar crate's test support: config from YAML text, an engine over a given store
//! with a manual clock, the macro that runs one test body against every store
//! implementation, the in-process service fixture ([`service`]) and the ext_authz helpers
//! for sidecar processes ([`ext_authz`]). Processes themselves (the sidecar, Redis) come
//! from the workspace's test kit.
#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

pub mod ext_authz;
pub mod service;
pub mod webhooks;

use std::collections::HashMap;
use std::sync::Arc;

use tollgate::clock::ManualClock;
use tollgate::core::usage::{TokenCounts, Usage};
use tollgate::core::{Decision, HoldId, Model, Timestamp};
use tollgate::store::{CounterStore, ReserveMode as Mode};
use tollgate::{CheckRequest, Engine};

/// Runs each named test function `f(store)` once per counter-store implementation, each as its own test, in the
/// manner of Limitador's `test_with_all_storage_impls!`.
#[macro_export]
macro_rules! test_with_all_stores {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn memory() {
                    super::$name($crate::common::memory());
                }
                #[test]
                fn durable_batched() {
                    super::$name($crate::common::durable(tollgate::store::Durability::Batched {
                        interval: std::time::Duration::from_millis(20),
                    }));
                }
                #[test]
                fn durable_sync() {
                    super::$name($crate::common::durable(tollgate::store::Durability::Sync));
                }
                #[test]
                fn redis() {
                    let server = $crate::common::RedisServer::start();
                    super::$name($crate::common::redis_store(&server));
                }
                #[test]
                fn redis_cluster() {
                    let cluster = $crate::common::RedisCluster::start();
                    super::$name($crate::common::redis_cluster_store(&cluster));
                }
            }
        )+
    };
}

/// Runs each named test function `f(store)` on the Redis stores only (one node, a 3-master
/// Cluster): for what only a networked store can do (run a call twice, read outside a script).
#[macro_export]
macro_rules! test_with_redis_stores {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn redis() {
                    let server = $crate::common::RedisServer::start();
                    super::$name($crate::common::redis_store(&server));
                }
                #[test]
                fn redis_cluster() {
                    let cluster = $crate::common::RedisCluster::start();
                    super::$name($crate::common::redis_cluster_store(&cluster));
                }
            }
        )+
    };
}

/// Like `test_with_all_stores!`, for tests that need a fresh store per case: each named
/// function gets a factory, `f(&dyn Fn() -> Arc<dyn CounterStore>)`.
#[macro_export]
macro_rules! test_with_all_store_factories {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn memory() {
                    super::$name(&|| -> std::sync::Arc<dyn tollgate::store::CounterStore> {
                        $crate::common::memory()
                    });
                }
                #[test]
                fn durable_batched() {
                    super::$name(&|| -> std::sync::Arc<dyn tollgate::store::CounterStore> {
                        $crate::common::durable(tollgate::store::Durability::Batched {
                            interval: std::time::Duration::from_millis(20),
                        })
                    });
                }
                #[test]
                fn durable_sync() {
                    super::$name(&|| -> std::sync::Arc<dyn tollgate::store::CounterStore> {
                        $crate::common::durable(tollgate::store::Durability::Sync)
                    });
                }
                #[test]
                fn redis() {
                    let server = $crate::common::RedisServer::start();
                    super::$name(&|| -> std::sync::Arc<dyn tollgate::store::CounterStore> {
                        $crate::common::redis_store(&server)
                    });
                }
                #[test]
                fn redis_cluster() {
                    let cluster = $crate::common::RedisCluster::start();
                    super::$name(&|| -> std::sync::Arc<dyn tollgate::store::CounterStore> {
                        $crate::common::redis_cluster_store(&cluster)
                    });
                }
            }
        )+
    };
}

pub use tollgate_testkit::sidecar::LOOPBACK_PORT_0;

/// How long, and how many, ingest idempotency keys the test stores remember: few, so a test
/// can reach eviction by count as well as by age.
pub const KEY_RETENTION: tollgate::core::ledger::KeyRetention =
    tollgate::core::ledger::KeyRetention {
        millis: 3_600_000,
        max_keys: 4,
    };

/// An in-memory store keeping [`KEY_RETENTION`].
pub fn memory() -> Arc<tollgate::store::MemoryStore> {
    Arc::new(tollgate::store::MemoryStore::new().with_key_retention(KEY_RETENTION))
}
pub use tollgate_testkit::{RedisCluster, RedisServer, Sidecar, free_port};

/// A Redis store on `server` under a key prefix no other store of this process uses, so the
/// cases of one test can share a server. Connected on the shared runtime, which keeps
/// driving its connection.
pub fn redis_store(server: &RedisServer) -> Arc<tollgate::store::RedisStore> {
    redis_store_on(tollgate::store::RedisTarget::Node(server.url()))
}

/// A Redis store on a 3-master Cluster, under its own key prefix.
pub fn redis_cluster_store(cluster: &RedisCluster) -> Arc<tollgate::store::RedisStore> {
    redis_store_on(tollgate::store::RedisTarget::Cluster(cluster.urls()))
}

pub fn redis_store_on(target: tollgate::store::RedisTarget) -> Arc<tollgate::store::RedisStore> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    redis_store_prefixed(target, &format!("t{n}"))
}

/// A Redis store under key prefix `prefix`: stores with one prefix are replicas sharing
/// counters.
pub fn redis_store_prefixed(
    target: tollgate::store::RedisTarget,
    prefix: &str,
) -> Arc<tollgate::store::RedisStore> {
    redis_store_with(tollgate::store::RedisSettings {
        target,
        prefix: prefix.to_string(),
        timeout: std::time::Duration::from_secs(5),
        breaker_failures: 5,
        breaker_open: std::time::Duration::from_millis(500),
        read_rows_per_second: 1_000_000,
    })
}

/// A Redis store with these settings, connected on the shared runtime.
pub fn redis_store_with(
    settings: tollgate::store::RedisSettings,
) -> Arc<tollgate::store::RedisStore> {
    Arc::new(
        runtime()
            .block_on(tollgate::store::RedisStore::connect(
                settings,
                KEY_RETENTION,
            ))
            .unwrap(),
    )
}

/// A durable store in a fresh file under the target directory's test scratch space (kept, so a
/// failing test's file can be looked at).
pub fn durable(
    durability: tollgate::store::Durability,
) -> std::sync::Arc<tollgate::store::MemoryStore> {
    let dir = tempfile::Builder::new()
        .prefix("store-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
        .keep();
    std::sync::Arc::new(
        tollgate::store::DurableStore::open(&dir.join("tollgate.redb"), durability)
            .unwrap()
            .with_key_retention(KEY_RETENTION),
    )
}

pub fn model(yaml: &str) -> Model {
    match tollgate::config::parse(yaml, "test.yaml") {
        Ok(m) => m,
        Err(e) => panic!("test config is invalid:\n{e}"),
    }
}

pub fn at(s: &str) -> Timestamp {
    Timestamp::from_datetime(s.parse().unwrap())
}

/// An engine with a manual clock, driven synchronously: each call runs on the harness's own
/// runtime (multi-threaded, so threads may call at once, and a networked store's connection
/// keeps being driven between calls).
pub struct Harness {
    pub engine: Engine,
    pub clock: ManualClock,
    pub rt: Arc<tokio::runtime::Runtime>,
}

/// The runtime every plain test of this process drives async store and engine calls on.
/// Shared, because a networked store's connection lives on the runtime it was opened on.
pub fn runtime() -> Arc<tokio::runtime::Runtime> {
    static RT: std::sync::OnceLock<Arc<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    Arc::clone(RT.get_or_init(|| {
        Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        )
    }))
}

pub fn harness(yaml: &str, store: Arc<dyn CounterStore>, start: &str) -> Harness {
    harness_on(runtime(), yaml, store, start)
}

/// A harness on a given runtime (the one a store was opened on).
pub fn harness_on(
    rt: Arc<tokio::runtime::Runtime>,
    yaml: &str,
    store: Arc<dyn CounterStore>,
    start: &str,
) -> Harness {
    let clock = ManualClock::new(at(start));
    let engine = rt
        .block_on(Engine::new(model(yaml), store, Arc::new(clock.clone())))
        .unwrap();
    Harness { engine, clock, rt }
}

pub fn dims(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every test on a store ends with no decision where a store's second arithmetic (the Redis
/// script) disagreed with the core: the store counts them, and the harness fails on any.
impl Drop for Harness {
    fn drop(&mut self) {
        let n = self.engine.store().stats().script_disagreements;
        if n > 0 && !std::thread::panicking() {
            panic!("{n} decision(s) where the Redis script and the core disagreed");
        }
    }
}

impl Harness {
    pub fn check(&self, customer: &str, feature: &str, units: u64, d: &[(&str, &str)]) -> Decision {
        self.check_usage(customer, feature, Usage::units(units), d)
    }

    pub fn check_usage(
        &self,
        customer: &str,
        feature: &str,
        usage: Usage,
        d: &[(&str, &str)],
    ) -> Decision {
        self.decide(customer, feature, usage, d, Mode::Hold)
    }

    /// A check whose usage is final: counted at once, no hold (`commit` on the API).
    pub fn commit(
        &self,
        customer: &str,
        feature: &str,
        usage: Usage,
        d: &[(&str, &str)],
    ) -> Decision {
        self.decide(customer, feature, usage, d, Mode::Commit)
    }

    /// Records usage under idempotency `key` as `POST /v1/usage` does; whether it was recorded.
    pub fn ingest(
        &self,
        customer: &str,
        feature: &str,
        usage: Usage,
        d: &[(&str, &str)],
        key: &str,
    ) -> bool {
        let dimensions = dims(d);
        let req = CheckRequest {
            deadline: None,
            customer,
            feature,
            usage,
            dimensions: &dimensions,
            dry_run: false,
            commit: false,
        };
        self.run(self.engine.ingest(&req, key)).unwrap()
    }

    pub fn dry_run(
        &self,
        customer: &str,
        feature: &str,
        units: u64,
        d: &[(&str, &str)],
    ) -> Decision {
        self.decide(customer, feature, Usage::units(units), d, Mode::DryRun)
    }

    fn decide(
        &self,
        customer: &str,
        feature: &str,
        usage: Usage,
        d: &[(&str, &str)],
        mode: Mode,
    ) -> Decision {
        let dimensions = dims(d);
        self.rt
            .block_on(self.engine.check(&CheckRequest {
                deadline: None,
                customer,
                feature,
                usage,
                dimensions: &dimensions,
                dry_run: mode == Mode::DryRun,
                commit: mode == Mode::Commit,
            }))
            .unwrap()
    }

    /// A check that is expected to fail: the engine's error.
    pub fn check_err(
        &self,
        customer: &str,
        feature: &str,
        units: u64,
        d: &[(&str, &str)],
    ) -> tollgate::DecisionError {
        let dimensions = dims(d);
        match self.rt.block_on(self.engine.check(&CheckRequest {
            deadline: None,
            customer,
            feature,
            usage: Usage::units(units),
            dimensions: &dimensions,
            dry_run: false,
            commit: false,
        })) {
            Ok(d) => panic!("the check was answered: {d:?}"),
            Err(e) => e,
        }
    }

    /// Runs an engine call to completion.
    pub fn run<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn counted(&self, customer: &str, entity: &str, limit: &str) -> u64 {
        self.counted_in(customer, entity, limit, None)
    }

    pub fn counted_in(&self, customer: &str, entity: &str, limit: &str, pool: Option<&str>) -> u64 {
        self.run(self.engine.counted(customer, entity, limit, pool))
            .unwrap()
            .unwrap_or(0)
    }

    pub fn settle(&self, hold: &HoldId, units: u64) {
        self.run(self.engine.settle(hold, Usage::units(units)))
            .unwrap();
    }

    pub fn release(&self, hold: &HoldId) {
        self.run(self.engine.release(hold)).unwrap();
    }

    pub fn expire_due(&self) -> usize {
        self.run(self.engine.expire_due()).unwrap()
    }

    pub fn advance_secs(&self, secs: i64) {
        self.clock.advance_millis(secs * 1_000);
    }
}

pub fn tokens(input: u64, output: u64, cached: u64) -> Usage {
    Usage {
        units: input + output + cached,
        tokens: Some(TokenCounts {
            input,
            output,
            cached,
            ..TokenCounts::default()
        }),
    }
}

/// A four-level tree (org → dept → team → user) with room for limits appended per test.
pub const TREE: &str = r#"
entityTypes:
  - name: org
  - name: dept
    parents: [org]
  - name: team
    parents: [dept]
  - name: user
    parents: [team]
  - name: model
    dimensional: true
    dimension: model
  - name: key
    dimensional: true
    dimension: apiKey
attribution:
  - dimension: userId
    entityType: user
  - dimension: teamId
    entityType: team
features:
  - id: tokens
    alsoDraws:
      - { feature: requests, per: request }
      - { feature: credits, per: price }
  - id: requests
  - id: credits
prices:
  - version: v1
    effectiveFrom: 2020-01-01T00:00:00Z
    models:
      - { match: "big*", inputPerMillion: 2000000, outputPerMillion: 8000000, cachedPerMillion: 1000000, cacheWritePerMillion: 2500000 }
      - { match: "*", inputPerMillion: 1000000, outputPerMillion: 1000000 }
customers:
  - id: acme
    entities:
      - { id: acme, type: org }
      - { id: d1, type: dept, parent: acme }
      - { id: d2, type: dept, parent: acme }
      - { id: t1, type: team, parent: d1 }
      - { id: t2, type: team, parent: d1 }
      - { id: t3, type: team, parent: d2 }
      - { id: u1, type: user, parent: t1 }
      - { id: u2, type: user, parent: t1 }
      - { id: u3, type: user, parent: t2 }
      - { id: u4, type: user, parent: t3 }
"#;

/// `TREE` with `limits` (and optionally more customer keys) appended to customer `acme`.
pub fn tree_with(customer_extra: &str) -> String {
    let mut s = TREE.to_string();
    for line in customer_extra.lines() {
        s.push_str("    ");
        s.push_str(line);
        s.push('\n');
    }
    s
}
