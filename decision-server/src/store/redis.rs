//! The Redis counter store: each customer's counters, holds and grants under one
//! `{customerId}` hash tag, every call one Lua script (`redis.lua`) run atomically on that
//! slot, against one node or a Redis Cluster; with timeouts and a circuit breaker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use failsafe::StateMachine;
use failsafe::backoff::Constant;
use failsafe::failure_policy::ConsecutiveFailures;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Script, ScriptInvocation, Value};
use rustc_hash::FxBuildHasher;

use super::{
    AdminChanges, AutoEntityOutcome, CloseOutcome, CounterStore, CustomerRef, Reservation,
    ReserveMode, StoreError, StoreStats, StoredEntity,
};
use crate::core::counter::{CounterKey, CounterSpec, CounterState};
use crate::core::credits::{CreditPool, GrantBalance};
use crate::core::ledger::{KeyRetention, readings_from};
use crate::core::model::{GrantCategory, Mode};
use crate::core::plan::{AmountRule, Plan, Usage};
use crate::core::symbols::Symbols;
use crate::core::window::{RING, WindowState};
use crate::core::{HoldId, Sym, Timestamp};

/// The script every call runs; see its header for the key layout and the state encoding.
const LUA: &str = include_str!("redis.lua");

/// The admin changes every replica shares: KEYS[1] their revision, KEYS[2] the list of
/// entries. `save` replaces the list only if the revision is still ARGV[2], then counts it up:
/// two replicas changing at once cannot drop each other's change.
const ADMIN_LUA: &str = r"
if ARGV[1] == 'save' then
  local rev = tonumber(redis.call('GET', KEYS[1]) or 0)
  if rev ~= tonumber(ARGV[2]) then return {0, rev} end
  redis.call('DEL', KEYS[2])
  for i = 3, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
  return {1, redis.call('INCR', KEYS[1])}
end
return {tonumber(redis.call('GET', KEYS[1]) or 0), redis.call('LRANGE', KEYS[2], 0, -1)}
";

/// Items every reply of the customer script starts with (see `redis.lua`).
const HEADER: usize = 5;

/// Where the Redis store connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One node (or a proxy in front of several), by URL: `redis://127.0.0.1:6379/0`.
    Node(String),
    /// A Redis Cluster, by the URLs of some of its nodes; the rest are discovered.
    Cluster(Vec<String>),
}

/// How the Redis store connects and when it gives up on a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    pub target: RedisTarget,
    /// Prefixes every key, so several deployments can share one Redis.
    pub prefix: String,
    /// The most a call may take, connecting included; past it the call fails as unavailable.
    pub timeout: Duration,
    /// Consecutive failed calls that open the circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker fails calls at once before letting calls try again.
    pub breaker_open: Duration,
}

#[derive(Clone)]
enum Conn {
    Node(ConnectionManager),
    Cluster(ClusterConnection),
}

/// What this replica last saw of a customer, for metrics and the expiry sweep.
#[derive(Debug, Clone, Copy, Default)]
struct Known {
    holds_open: usize,
    counters: usize,
    /// No open hold expires before this (a lower bound: holds placed here lower it, the sweep
    /// sets it exactly), when any may be open.
    next_expiry: Option<i64>,
    /// The customer's holds version `holds_open` was read at (replies can arrive out of the
    /// order Redis ran them in; the newest count wins).
    holds_version: i64,
}

type Breaker = StateMachine<ConsecutiveFailures<Constant>, ()>;

/// Counters in Redis, shared by every sidecar replica that points at the same Redis.
///
/// Trade-off: the script does the check-and-hold arithmetic itself (so a decision is one
/// round trip and atomic on the customer's slot) and hands back the states it read; the
/// readings a decision reports are then worked out here by the same core functions the
/// in-process stores use, so the Lua only has to agree with them on what fits and on what a
/// hold changes, which the shared store test suite checks.
pub struct RedisStore {
    conn: Conn,
    script: Script,
    admin_script: Script,
    settings: RedisSettings,
    retention: KeyRetention,
    breaker: Breaker,
    known: DashMap<Sym, Known, FxBuildHasher>,
    failures: AtomicU64,
    rejected: AtomicU64,
    canceller: Canceller,
}

/// How long a cancelled decision's tag is remembered, so that its reserve, if it runs later
/// still, holds nothing. Far longer than any call can be delayed in a live connection.
const CANCEL_MEMORY_MS: i64 = 3_600_000;
/// How long the canceller keeps trying to reach Redis for one cancel.
const CANCEL_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3_600);
/// The most cancels waiting to reach Redis at once; past it a cancel is dropped and logged
/// (its hold, if one was placed, expires at the held amount).
const MAX_PENDING_CANCELS: usize = 100_000;

/// Releases, in the background and until Redis answers, the holds of decisions whose answer
/// was lost. Shares the store's connection: a cancel sent after its reserve on one connection
/// runs after it in Redis, and the remembered tag covers a reserve resent on a new connection.
#[derive(Clone)]
struct Canceller {
    conn: Conn,
    script: Script,
    prefix: String,
    timeout: std::time::Duration,
    pending: Arc<AtomicUsize>,
    released: Arc<AtomicU64>,
}

impl Canceller {
    /// The cancel call for `tag` of `customer`.
    fn invocation(&self, keys: &CallKeys, tag: u128, now: Timestamp) -> ScriptInvocation<'_> {
        let mut inv = self.script.prepare_invoke();
        for k in &keys.keys {
            inv.key(k);
        }
        inv.arg("cancel")
            .arg(now.millis())
            .arg(tag_text(tag))
            .arg(CANCEL_MEMORY_MS);
        inv
    }

    /// One attempt from the background: releases the hold with `tag`, or remembers the tag.
    /// `Ok(true)` if a hold was released.
    async fn cancel(&self, customer: &str, tag: u128, now: Timestamp) -> Result<bool, StoreError> {
        let keys = CallKeys::new(&self.prefix, customer);
        let inv = self.invocation(&keys, tag, now);
        let mut conn = self.conn.clone();
        let call = async {
            match &mut conn {
                Conn::Node(c) => inv.invoke_async::<Value>(c).await,
                Conn::Cluster(c) => inv.invoke_async::<Value>(c).await,
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(Value::Array(items))) => Ok(self.released(&items)),
            Ok(Ok(other)) => Err(bad_reply(
                &format!("{other:?}").chars().take(200).collect::<String>(),
            )),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("redis: {e}"))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "redis: no answer within {} ms",
                self.timeout.as_millis()
            ))),
        }
    }

    /// Whether a cancel's reply says it released a hold (and counts it).
    fn released(&self, reply: &[Value]) -> bool {
        let released = reply.first().and_then(int) == Some(1);
        if released {
            self.released.fetch_add(1, Ordering::Relaxed);
        }
        released
    }

    /// Cancels in the background, retrying with backoff until Redis answers.
    fn cancel_soon(&self, customer: &str, tag: u128, now: Timestamp) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.pending.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING_CANCELS {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            tracing::error!(customer, tag = %tag_text(tag), "too many cancels waiting for Redis; this decision's hold, if placed, will expire charged");
            return;
        }
        let me = self.clone();
        let customer = customer.to_string();
        runtime.spawn(async move {
            let started = std::time::Instant::now();
            let mut wait = std::time::Duration::from_millis(50);
            loop {
                let elapsed = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
                match me.cancel(&customer, tag, now.plus_millis(elapsed)).await {
                    Ok(released) => {
                        tracing::debug!(customer, released, "lost decision cancelled");
                        break;
                    }
                    Err(e) if started.elapsed() > CANCEL_PATIENCE => {
                        tracing::error!(customer, error = %e, "cannot cancel a lost decision; its hold, if placed, will expire charged");
                        break;
                    }
                    Err(_) => {
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(std::time::Duration::from_secs(2));
                    }
                }
            }
            me.pending.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("settings", &self.settings)
            .field("customers", &self.known.len())
            .finish_non_exhaustive()
    }
}

/// Why the Redis store could not start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("redis storage: bad target `{target}`: {source}")]
    Target {
        target: String,
        source: redis::RedisError,
    },
    #[error("redis storage: cannot connect to {target}: {source}")]
    Connect {
        target: String,
        source: redis::RedisError,
    },
}

/// A planned counter's kind, as the script numbers them.
fn kind_code(spec: &CounterSpec, now: Timestamp) -> (u8, u64, i64) {
    match spec {
        CounterSpec::Rate { limit, window } => (1, *limit, window.bucket_at(now)),
        CounterSpec::Quota { limit, index, .. } => (2, *limit, *index),
        CounterSpec::Concurrency { limit } => (3, u64::from(*limit), 0),
        CounterSpec::Credits { .. } => (4, 0, 0),
    }
}

fn rule_code(rule: &AmountRule) -> (u8, [u64; 4]) {
    match rule {
        AmountRule::Units => (0, [0; 4]),
        AmountRule::PerRequest => (1, [0; 4]),
        AmountRule::Priced(p) => (
            2,
            [
                p.input_per_million,
                p.output_per_million,
                p.cached_per_million,
                p.cache_write_per_million,
            ],
        ),
    }
}

fn category_code(c: GrantCategory) -> u8 {
    match c {
        GrantCategory::Promo => 0,
        GrantCategory::Paid => 1,
    }
}

fn category_of(code: i64) -> GrantCategory {
    if code == 0 {
        GrantCategory::Promo
    } else {
        GrantCategory::Paid
    }
}

/// A counter's field in its entity hash: the limit, and the pool for isolated credit pools.
fn field(key: CounterKey) -> String {
    let limit = Symbols.resolve(key.limit);
    match key.partition {
        None => limit.to_string(),
        // The unit separator cannot appear in a config id.
        Some(p) => format!("{limit}\u{1f}{}", Symbols.resolve(p)),
    }
}

/// A hold tag as the script keeps it: 32 hex digits (a Lua number could not hold 128 bits).
fn tag_text(tag: u128) -> String {
    format!("{tag:032x}")
}

fn bad_reply(what: &str) -> StoreError {
    StoreError::Unavailable(format!("redis: unexpected script reply: {what}"))
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

fn mp_int(v: &rmpv::Value) -> Option<i64> {
    match v {
        rmpv::Value::Integer(i) => i.as_i64().or_else(|| i.as_u64().map(|u| u as i64)),
        // Lua numbers are doubles; the script only stores whole ones.
        rmpv::Value::F64(f) => Some(*f as i64),
        rmpv::Value::F32(f) => Some(*f as i64),
        _ => None,
    }
}

fn mp_u64(v: &rmpv::Value) -> Option<u64> {
    mp_int(v).map(|i| u64::try_from(i).unwrap_or(0))
}

/// An array, or an empty map (which is how an empty Lua table may come back).
fn mp_array(v: &rmpv::Value) -> Option<&[rmpv::Value]> {
    match v {
        rmpv::Value::Array(a) => Some(a),
        rmpv::Value::Map(m) if m.is_empty() => Some(&[]),
        _ => None,
    }
}

/// A counter state as the script encodes it (see `redis.lua`).
fn decode_state(bytes: &[u8]) -> Option<CounterState> {
    let value = rmpv::decode::read_value(&mut &bytes[..]).ok()?;
    let a = mp_array(&value)?;
    match mp_int(a.first()?)? {
        1 => {
            let mut counts = [0u32; RING];
            for (c, v) in counts.iter_mut().zip(a.get(2..)?) {
                *c = u32::try_from(mp_u64(v)?).unwrap_or(u32::MAX);
            }
            Some(CounterState::Window(WindowState::from_parts(
                mp_int(a.get(1)?)?,
                counts,
            )))
        }
        2 => Some(CounterState::Period {
            index: mp_int(a.get(1)?)?,
            used: mp_u64(a.get(2)?)?,
        }),
        3 => Some(CounterState::InFlight(
            u32::try_from(mp_u64(a.get(1)?)?).unwrap_or(u32::MAX),
        )),
        4 => {
            let debt = mp_u64(a.get(1)?)?;
            let order = mp_array(a.get(2)?)?
                .iter()
                .map(|p| mp_u64(p).and_then(|p| u32::try_from(p).ok()))
                .collect::<Option<Vec<u32>>>()?;
            let grants = mp_array(a.get(3)?)?
                .iter()
                .map(|g| {
                    let g = mp_array(g)?;
                    Some(GrantBalance {
                        id: g.first()?.as_str()?.to_string(),
                        priority: u32::try_from(mp_u64(g.get(1)?)?).unwrap_or(u32::MAX),
                        expires_at: match g.get(2)? {
                            rmpv::Value::Boolean(false) | rmpv::Value::Nil => None,
                            v => Some(Timestamp::from_millis(mp_int(v)?)),
                        },
                        category: category_of(mp_int(g.get(3)?)?),
                        amount: mp_u64(g.get(4)?)?,
                        remaining: mp_u64(g.get(5)?)?,
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            Some(CounterState::Credits(Box::new(CreditPool::from_parts(
                grants, order, debt,
            ))))
        }
        _ => None,
    }
}

/// A state read back from Redis: `None` for no state; undecodable bytes are an error, never
/// a silently empty counter.
fn state_of(v: &Value) -> Result<Option<CounterState>, StoreError> {
    match v {
        Value::Nil => Ok(None),
        Value::BulkString(b) => decode_state(b)
            .map(Some)
            .ok_or_else(|| bad_reply("a counter state that does not decode")),
        _ => Err(bad_reply("a counter state that is not bytes")),
    }
}

/// The keys of one customer: the six fixed ones first, then entity hashes as added.
struct CallKeys {
    base: String,
    keys: Vec<String>,
}

impl CallKeys {
    fn new(prefix: &str, customer: &str) -> Self {
        let base = format!("{prefix}:{{{customer}}}:");
        let keys = ["m", "h", "x", "k", "a", "c"]
            .iter()
            .map(|s| format!("{base}{s}"))
            .collect();
        Self { base, keys }
    }

    /// The 1-based index of entity `entity`'s hash among the keys, adding it if new.
    fn entity(&mut self, entity: Sym) -> usize {
        let key = format!("{}e:{}", self.base, Symbols.resolve(entity));
        match self.keys.iter().position(|k| *k == key) {
            Some(i) => i + 1,
            None => {
                self.keys.push(key);
                self.keys.len()
            }
        }
    }
}

impl RedisStore {
    /// Connects (the first connection is made now, so a wrong address fails at start) and
    /// loads nothing else: the script is sent on first use.
    pub async fn connect(
        settings: RedisSettings,
        retention: KeyRetention,
    ) -> Result<Self, ConnectError> {
        let conn = match &settings.target {
            RedisTarget::Node(url) => {
                let client =
                    redis::Client::open(url.as_str()).map_err(|e| ConnectError::Target {
                        target: url.clone(),
                        source: e,
                    })?;
                // Reconnects on its own after a connection loss or a Redis restart; a call
                // made while it is down fails at once and the breaker counts it.
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(settings.timeout))
                    .set_response_timeout(Some(settings.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let manager = ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(|e| ConnectError::Connect {
                        target: url.clone(),
                        source: e,
                    })?;
                Conn::Node(manager)
            }
            RedisTarget::Cluster(urls) => {
                let target = urls.join(",");
                let client = redis::cluster::ClusterClientBuilder::new(urls.clone())
                    .connection_timeout(settings.timeout)
                    .response_timeout(settings.timeout)
                    .retries(2)
                    .min_retry_wait(5)
                    .max_retry_wait(50)
                    .build()
                    .map_err(|e| ConnectError::Target {
                        target: target.clone(),
                        source: e,
                    })?;
                let conn = client
                    .get_async_connection()
                    .await
                    .map_err(|e| ConnectError::Connect { target, source: e })?;
                Conn::Cluster(conn)
            }
        };
        let breaker = failsafe::Config::new()
            .failure_policy(failsafe::failure_policy::consecutive_failures(
                settings.breaker_failures.max(1),
                failsafe::backoff::constant(settings.breaker_open),
            ))
            .build();
        let script = Script::new(LUA);
        let canceller = Canceller {
            conn: conn.clone(),
            script: script.clone(),
            prefix: settings.prefix.clone(),
            timeout: settings.timeout,
            pending: Arc::new(AtomicUsize::new(0)),
            released: Arc::new(AtomicU64::new(0)),
        };
        Ok(Self {
            conn,
            script,
            admin_script: Script::new(ADMIN_LUA),
            settings,
            retention,
            breaker,
            known: DashMap::default(),
            failures: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            canceller,
        })
    }

    /// Runs one script call within the timeout, through the circuit breaker; the reply's
    /// items.
    async fn call(&self, invocation: &ScriptInvocation<'_>) -> Result<Vec<Value>, StoreError> {
        self.call_noting(invocation, &AtomicBool::new(false)).await
    }

    /// [`RedisStore::call`], setting `sent` once the call has gone to Redis (so a failure after
    /// it may still have run there, late).
    async fn call_noting(
        &self,
        invocation: &ScriptInvocation<'_>,
        sent: &AtomicBool,
    ) -> Result<Vec<Value>, StoreError> {
        if !self.breaker.is_call_permitted() {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(StoreError::Unavailable(format!(
                "redis: circuit breaker open after {} consecutive failed calls; calls are tried again after {} ms",
                self.settings.breaker_failures,
                self.settings.breaker_open.as_millis()
            )));
        }
        let mut conn = self.conn.clone();
        sent.store(true, Ordering::Relaxed);
        let call = async {
            match &mut conn {
                Conn::Node(c) => invocation.invoke_async::<Value>(c).await,
                Conn::Cluster(c) => invocation.invoke_async::<Value>(c).await,
            }
        };
        let reply = match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok(Value::Array(items))) => items,
            Ok(Ok(other)) => {
                return Err(bad_reply(
                    &format!("{other:?}").chars().take(200).collect::<String>(),
                ));
            }
            Ok(Err(e)) => {
                self.failed();
                return Err(StoreError::Unavailable(format!("redis: {e}")));
            }
            Err(_) => {
                self.failed();
                return Err(StoreError::Unavailable(format!(
                    "redis: no answer within {} ms",
                    self.settings.timeout.as_millis()
                )));
            }
        };
        self.breaker.on_success();
        Ok(reply)
    }

    /// Runs one call of the customer script ([`RedisStore::call`]) and notes what its header
    /// says of the customer (the first [`HEADER`] items).
    async fn run(
        &self,
        customer: Sym,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<Vec<Value>, StoreError> {
        self.run_noting(customer, invocation, &AtomicBool::new(false))
            .await
    }

    /// [`RedisStore::run`], noting in `sent` whether the call went to Redis.
    async fn run_noting(
        &self,
        customer: Sym,
        invocation: &ScriptInvocation<'_>,
        sent: &AtomicBool,
    ) -> Result<Vec<Value>, StoreError> {
        let reply = self.call_noting(invocation, sent).await?;
        if reply.len() < HEADER {
            return Err(bad_reply("a reply without its header"));
        }
        let mut known = self.known.entry(customer).or_default();
        if let (Some(version), Some(holds)) =
            (reply.get(4).and_then(int), reply.get(1).and_then(int))
            && version > known.holds_version
            && holds >= 0
        {
            known.holds_version = version;
            known.holds_open = holds as usize;
        }
        if let Some(n) = reply.get(2).and_then(int).filter(|n| *n >= 0) {
            known.counters = n as usize;
        }
        match reply.get(3) {
            Some(Value::Nil) => known.next_expiry = None,
            Some(v) => {
                if let Some(at) = int(v).filter(|at| *at >= 0) {
                    known.next_expiry = Some(at);
                }
            }
            None => {}
        }
        Ok(reply)
    }

    fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.breaker.on_error();
    }

    /// An invocation of `op` on `keys`, with `now` as the second argument.
    fn invocation<'a>(&'a self, keys: &CallKeys, op: &str, now: Timestamp) -> ScriptInvocation<'a> {
        let mut inv = self.script.prepare_invoke();
        for k in &keys.keys {
            inv.key(k);
        }
        inv.arg(op).arg(now.millis());
        inv
    }

    /// `plan`'s counters as the script's counter groups (their entity hashes added to `keys`).
    fn counters(&self, plan: &Plan, keys: &mut CallKeys, now: Timestamp) -> Vec<CounterArgs> {
        plan.counters
            .iter()
            .map(|c| {
                let (kind, limit, at) = kind_code(&c.spec, now);
                let (rule, prices) = rule_code(&c.rule);
                CounterArgs {
                    key: keys.entity(c.key.entity),
                    field: field(c.key),
                    kind,
                    limit,
                    at,
                    enforce: c.mode == Mode::Enforce,
                    amount: c.amount,
                    rule,
                    prices,
                }
            })
            .collect()
    }

    /// Runs `op` on `plan`'s counters: `head` adds the operation's own arguments, then the
    /// count of counters and a group each follow.
    async fn run_plan(
        &self,
        customer: CustomerRef<'_>,
        plan: &Plan,
        op: &str,
        now: Timestamp,
        head: impl FnOnce(&mut ScriptInvocation<'_>),
        sent: &AtomicBool,
    ) -> Result<Vec<Value>, StoreError> {
        let mut keys = self.keys(customer.id);
        let counters = self.counters(plan, &mut keys, now);
        let mut inv = self.invocation(&keys, op, now);
        head(&mut inv);
        inv.arg(counters.len());
        for c in &counters {
            c.push(&mut inv);
        }
        self.run_noting(customer.sym, &inv, sent).await
    }

    fn keys(&self, customer: &str) -> CallKeys {
        CallKeys::new(&self.settings.prefix, customer)
    }

    /// The shared admin changes' keys: one hash tag, so the save script is atomic on a Cluster
    /// too. The suffixes differ from every customer key's, whatever the customer's id.
    fn admin_invocation(&self, op: &str) -> ScriptInvocation<'_> {
        let mut inv = self.admin_script.prepare_invoke();
        inv.key(format!("{}:{{admin}}:rev", self.settings.prefix))
            .key(format!("{}:{{admin}}:ops", self.settings.prefix))
            .arg(op);
        inv
    }

    async fn load_admin(&self) -> Result<AdminChanges, StoreError> {
        let reply = self.call(&self.admin_invocation("load")).await?;
        let revision = reply
            .first()
            .and_then(int)
            .ok_or_else(|| bad_reply("admin load"))?;
        let entries = match reply.get(1) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::BulkString(b) => Ok(b.clone()),
                    _ => Err(bad_reply("an admin change that is not bytes")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => Vec::new(),
        };
        Ok(AdminChanges {
            revision: revision.max(0) as u64,
            entries,
        })
    }

    async fn close(
        &self,
        customer: CustomerRef<'_>,
        hold: &HoldId,
        actual: Option<&Usage>,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        let keys = self.keys(customer.id);
        let base = |prices: Option<&[u64]>| {
            let mut inv = self.invocation(&keys, "close", now);
            inv.arg(hold.seq)
                .arg(if actual.is_some() { "s" } else { "r" })
                .arg(actual.map_or(0, |u| u.units))
                .arg(tag_text(hold.tag))
                .arg(actual.map_or(0, Usage::largest_figure));
            for p in prices.unwrap_or(&[]) {
                inv.arg(*p);
            }
            inv
        };
        let mut reply = self.run(customer.sym, &base(None)).await?;
        if reply.first().and_then(int) == Some(3) {
            // Priced parts: the script sent back their prices; price the usage the way the
            // hold was priced and settle with those amounts (the hold cannot change between).
            let usage = actual.copied().unwrap_or_default();
            let amounts: Vec<u64> = reply
                .get(HEADER..)
                .unwrap_or(&[])
                .chunks(4)
                .map(|p| {
                    let n = |i: usize| p.get(i).and_then(int).unwrap_or(0).max(0) as u64;
                    crate::core::plan::PriceSnapshot {
                        input_per_million: n(0),
                        output_per_million: n(1),
                        cached_per_million: n(2),
                        cache_write_per_million: n(3),
                    }
                    .price(&usage)
                })
                .collect();
            reply = self.run(customer.sym, &base(Some(&amounts))).await?;
        }
        match reply.first().and_then(int) {
            Some(0) => Ok(CloseOutcome::Closed),
            Some(1) => Ok(CloseOutcome::AlreadyClosed),
            Some(2) => Err(StoreError::UnknownHold(hold.to_string())),
            Some(4) => Err(StoreError::SettleTooLarge {
                hold: hold.to_string(),
                actual: actual.map_or(0, Usage::largest_figure),
                max: reply.get(HEADER).and_then(int).unwrap_or(0).max(0) as u64,
            }),
            _ => Err(bad_reply("close")),
        }
    }
}

/// One planned counter, as the script's group of arguments.
struct CounterArgs {
    key: usize,
    field: String,
    kind: u8,
    limit: u64,
    at: i64,
    enforce: bool,
    amount: u64,
    rule: u8,
    prices: [u64; 4],
}

impl CounterArgs {
    fn push(&self, inv: &mut ScriptInvocation<'_>) {
        inv.arg(self.key)
            .arg(&self.field)
            .arg(self.kind)
            .arg(self.limit)
            .arg(self.at)
            .arg(u8::from(self.enforce))
            .arg(self.amount)
            .arg(self.rule)
            .arg(self.prices[0])
            .arg(self.prices[1])
            .arg(self.prices[2])
            .arg(self.prices[3]);
    }
}

#[async_trait::async_trait]
impl CounterStore for RedisStore {
    async fn reserve(
        &self,
        customer: CustomerRef<'_>,
        plan: &Plan,
        mode: ReserveMode,
        now: Timestamp,
    ) -> Result<Reservation, StoreError> {
        let sent = AtomicBool::new(false);
        let reply = self
            .run_plan(
                customer,
                plan,
                "reserve",
                now,
                |inv| {
                    inv.arg(u8::from(mode == ReserveMode::Hold))
                        .arg(plan.hold_ttl_millis)
                        .arg(tag_text(plan.hold_tag))
                        .arg(plan.max_settle);
                },
                &sent,
            )
            .await;
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                // The call may still run in Redis, late (a timeout, a connection lost after
                // sending): the caller hears "unavailable", so whatever it holds must go.
                if mode == ReserveMode::Hold && sent.load(Ordering::Relaxed) {
                    self.canceller.cancel_soon(customer.id, plan.hold_tag, now);
                }
                return Err(e);
            }
        };
        let blocking = reply
            .first()
            .and_then(int)
            .ok_or_else(|| bad_reply("reserve"))?;
        let seq = reply
            .get(HEADER)
            .and_then(int)
            .ok_or_else(|| bad_reply("reserve"))?;
        let before = reply
            .get(HEADER + 1..)
            .filter(|b| b.len() == plan.counters.len())
            .ok_or_else(|| bad_reply("reserve: one state per counter expected"))?
            .iter()
            .map(state_of)
            .collect::<Result<Vec<_>, _>>()?;
        let placed = seq > 0;
        if placed {
            let expires = now.plus_millis(plan.hold_ttl_millis).millis();
            if let Some(mut k) = self.known.get_mut(&customer.sym) {
                k.next_expiry = Some(k.next_expiry.map_or(expires, |at| at.min(expires)));
            }
        }
        let (readings, computed) = readings_from(plan, before, placed, now);
        let blocking = usize::try_from(blocking)
            .ok()
            .and_then(|b| b.checked_sub(1));
        if blocking != computed {
            // The script decided; a disagreement means it and the core differ somewhere.
            tracing::error!(customer = customer.id, script = ?blocking, core = ?computed, "redis script and core disagree on a decision");
        }
        Ok(Reservation {
            readings,
            blocking,
            hold: placed.then(|| HoldId {
                customer: plan.customer.to_string(),
                seq: seq as u64,
                tag: plan.hold_tag,
            }),
        })
    }

    async fn settle(
        &self,
        customer: CustomerRef<'_>,
        hold: &HoldId,
        actual: &Usage,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        self.close(customer, hold, Some(actual), now).await
    }

    async fn release(
        &self,
        customer: CustomerRef<'_>,
        hold: &HoldId,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        self.close(customer, hold, None, now).await
    }

    async fn cancel(
        &self,
        customer: CustomerRef<'_>,
        tag: u128,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let keys = self.keys(customer.id);
        let inv = self.canceller.invocation(&keys, tag, now);
        match self.run(customer.sym, &inv).await {
            Ok(reply) => Ok(self.canceller.released(&reply)),
            Err(e) => {
                // Not answered now: keep trying in the background.
                self.canceller.cancel_soon(customer.id, tag, now);
                Err(e)
            }
        }
    }

    /// Sweeps the customers this replica has seen with holds due. A hold placed by a replica
    /// that is gone is expired by the next call of any replica on that customer (every script
    /// expires due holds first), so no decision ever counts it late.
    async fn expire_due(&self, now: Timestamp) -> Result<usize, StoreError> {
        let due: Vec<Sym> = self
            .known
            .iter()
            .filter(|e| e.next_expiry.is_some_and(|at| at <= now.millis()))
            .map(|e| *e.key())
            .collect();
        // One customer's failure does not hold up the others; the first error is returned
        // once all were tried, and the next sweep tries it again.
        let mut expired = 0;
        let mut first_error = None;
        for sym in due {
            let keys = self.keys(Symbols.resolve(sym));
            match self.run(sym, &self.invocation(&keys, "expire", now)).await {
                Ok(reply) => expired += reply.first().and_then(int).unwrap_or(0).max(0) as usize,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if expired == 0 => Err(e),
            Some(e) => {
                tracing::warn!(error = %e, expired, "some customers' holds could not be expired");
                Ok(expired)
            }
            None => Ok(expired),
        }
    }

    async fn add_grant(
        &self,
        customer: CustomerRef<'_>,
        pool: CounterKey,
        grant: GrantBalance,
    ) -> Result<bool, StoreError> {
        let mut keys = self.keys(customer.id);
        let key = keys.entity(pool.entity);
        let mut inv = self.invocation(&keys, "grant", Timestamp::default());
        inv.arg(key)
            .arg(field(pool))
            .arg(&grant.id)
            .arg(grant.priority)
            .arg(
                grant
                    .expires_at
                    .map_or(String::new(), |t| t.millis().to_string()),
            )
            .arg(category_code(grant.category))
            .arg(grant.amount);
        let reply = self.run(customer.sym, &inv).await?;
        Ok(reply.first().and_then(int) == Some(1))
    }

    async fn counted(
        &self,
        customer: CustomerRef<'_>,
        key: CounterKey,
        spec: &CounterSpec,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        let mut keys = self.keys(customer.id);
        let index = keys.entity(key.entity);
        let mut inv = self.invocation(&keys, "counted", now);
        inv.arg(index).arg(field(key));
        let reply = self.run(customer.sym, &inv).await?;
        let value = reply.get(HEADER).unwrap_or(&Value::Nil);
        Ok(state_of(value)?.map(|s| crate::core::counter::counted(spec, &s, now)))
    }

    async fn record(
        &self,
        customer: CustomerRef<'_>,
        plan: &Plan,
        idempotency_key: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let reply = self
            .run_plan(
                customer,
                plan,
                "record",
                now,
                |inv| {
                    inv.arg(idempotency_key)
                        .arg(self.retention.millis)
                        .arg(self.retention.max_keys);
                },
                &AtomicBool::new(false),
            )
            .await?;
        Ok(reply.first().and_then(int) == Some(1))
    }

    async fn auto_entity(
        &self,
        customer: CustomerRef<'_>,
        id: &str,
        proposed: &StoredEntity,
        max: u32,
        create: bool,
    ) -> Result<AutoEntityOutcome, StoreError> {
        let keys = self.keys(customer.id);
        let mut inv = self.invocation(&keys, "entity", Timestamp::default());
        inv.arg(id)
            .arg(&proposed.entity_type)
            .arg(&proposed.parent)
            .arg(max)
            .arg(u8::from(create));
        let reply = self.run(customer.sym, &inv).await?;
        let text = |i: usize| match reply.get(HEADER + i) {
            Some(Value::BulkString(b)) => String::from_utf8(b.clone())
                .map_err(|_| bad_reply("an entity field that is not text")),
            _ => Err(bad_reply("an entity without its type and parent")),
        };
        let stored = || -> Result<StoredEntity, StoreError> {
            Ok(StoredEntity {
                entity_type: text(0)?,
                parent: text(1)?,
            })
        };
        match reply.first().and_then(int) {
            Some(0) => Ok(AutoEntityOutcome::Found(stored()?)),
            Some(1) => Ok(AutoEntityOutcome::Created(stored()?)),
            Some(2) => Ok(AutoEntityOutcome::Full),
            Some(3) => Ok(AutoEntityOutcome::Absent),
            _ => Err(bad_reply("entity")),
        }
    }

    async fn auto_entity_count(&self, customer: CustomerRef<'_>) -> Result<usize, StoreError> {
        let keys = self.keys(customer.id);
        let reply = self
            .run(
                customer.sym,
                &self.invocation(&keys, "entities", Timestamp::default()),
            )
            .await?;
        Ok(reply.first().and_then(int).unwrap_or(0).max(0) as usize)
    }

    async fn save_admin_changes(&self, entries: &[Vec<u8>], base: u64) -> Result<u64, StoreError> {
        let mut inv = self.admin_invocation("save");
        inv.arg(base);
        for e in entries {
            inv.arg(e.as_slice());
        }
        let reply = self.call(&inv).await?;
        let revision = reply
            .get(1)
            .and_then(int)
            .ok_or_else(|| bad_reply("admin save"))?;
        let revision = revision.max(0) as u64;
        match reply.first().and_then(int) {
            Some(1) => Ok(revision),
            _ => Err(StoreError::AdminMoved(revision)),
        }
    }

    async fn admin_changes(&self) -> Result<AdminChanges, StoreError> {
        self.load_admin().await
    }

    async fn admin_revision(&self) -> Result<Option<u64>, StoreError> {
        let reply = self.call(&self.admin_invocation("load")).await?;
        Ok(reply.first().and_then(int).map(|r| r.max(0) as u64))
    }

    fn stats(&self) -> StoreStats {
        let mut stats = StoreStats {
            customers: self.known.len(),
            ..StoreStats::default()
        };
        for e in self.known.iter() {
            stats.counters += e.counters;
            stats.holds_open += e.holds_open;
        }
        stats.backend_failures = self.failures.load(Ordering::Relaxed);
        stats.abandoned_released = self.canceller.released.load(Ordering::Relaxed);
        stats.breaker_rejections = self.rejected.load(Ordering::Relaxed);
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_customer_share_its_hash_tag() {
        let mut keys = CallKeys::new("tg", "acme");
        let e = keys.entity(Symbols.intern("team-1"));
        assert_eq!(keys.entity(Symbols.intern("team-1")), e, "added once");
        for k in &keys.keys {
            assert!(k.starts_with("tg:{acme}:"), "{k}");
        }
        assert_eq!(keys.keys.len(), 7);
    }

    #[test]
    fn undecodable_states_are_errors() {
        assert!(state_of(&Value::BulkString(vec![0xc1])).is_err());
        assert!(state_of(&Value::Int(3)).is_err());
        assert_eq!(state_of(&Value::Nil).unwrap(), None);
    }
}
