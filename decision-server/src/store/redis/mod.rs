//! The Redis counter store: each customer's counters, holds and grants under one
//! `{customerId}` hash tag, every call one Lua script (joined from `lua/` by `script.rs`) run atomically on that
//! slot, against one node or a Redis Cluster; with timeouts and a circuit breaker.
//!
//! Design decision: the decision runs inside a Lua script, not as `WATCH`/`MULTI` around the
//! core's arithmetic in Rust. A script is one atomic step on the customer's slot and one round
//! trip, whatever the contention: with `WATCH`, every concurrent decision on a hot customer
//! (many agents on one cap) would abort and retry, each retry a round trip, so the busiest caps
//! would be the slowest. The price is a second implementation of the arithmetic, in Lua. What
//! keeps the two in step: the script only decides what fits and applies holds; the readings a
//! decision reports are worked out by the core from the states the script hands back
//! (`core::ledger::readings_from`); the shared store suite runs every decision test on Redis;
//! the differential test (`tests/store_equivalence.rs`) runs random sequences on both; and a
//! decision where the script and the core disagree is counted
//! (`tollgate_store_script_disagreements_total`) and fails the test harness.
//!
//! Modules: `link` (connection and breaker), `wire` (the script's numbers and packed states),
//! `keys` (the key layout), `cancel` (lost decisions), `admin` (the shared admin changes),
//! `scan` (usage reads: bounded steps, the series index, seals), `stream` (the operator's
//! stream), `relay` (closes through another replica).

mod admin;
mod call;
mod cancel;
mod keys;
mod link;
mod relay;
mod scan;
mod script;
mod stream;
mod wire;

use super::events::{EventPage, StreamEvent, StreamRetention};
use crate::core::alerts::Delivery;
use crate::core::rollup::{
    BucketScan, Granularity, LocalRecord, Measures, RecordSettings, ScanNeeds,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use redis::Value;

use self::call::{Call, Code};
use rustc_hash::FxBuildHasher;

pub use link::ConnectError;

use self::cancel::Canceller;
use self::keys::{CallKeys, field};
use self::link::Link;
use self::wire::{
    CLOSE_ALREADY_CLOSED, CLOSE_CLOSED, CLOSE_NEEDS_PRICES, CLOSE_NO_SUCH_HOLD, CLOSE_TOO_LARGE,
    CounterArgs, DONE, ENTITY_ABSENT, ENTITY_CREATED, ENTITY_FOUND, ENTITY_FULL, ENTITY_PAGE,
    HEADER, LocalBatch, PRICES_PER_PART, RESERVE_REPLAYED, SLOT_COUNTERS, SLOT_HOLDS_OPEN,
    SLOT_HOLDS_VERSION, SLOT_NEXT_EXPIRY, bad_reply, category_code, decode_event, int, kind_code,
    push_record_draft, push_record_settings, result, rule_code, state_of, tag_text,
};
use super::{
    AdminLog, AlertStore, AutoEntityOutcome, CloseOutcome, CounterStore, HoldKey, Reservation,
    ReserveMode, StoreError, StoreStats, StoredEntity, UsageStore,
};
use crate::core::counter::{CounterKey, CounterSpec};
use crate::core::credits::GrantBalance;
use crate::core::ledger::{KeyRetention, readings_from};
use crate::core::model::Mode;
use crate::core::plan::{Plan, PriceSnapshot};
use crate::core::usage::{StreamEnd, Usage};
use crate::core::{HoldId, Name, Sym, Timestamp};

/// Where the Redis store connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One node (or a proxy in front of several), by URL: `redis://127.0.0.1:6379/0`.
    Node(String),
    /// One node, by the URL in this environment variable (a URL with a password, from a
    /// Kubernetes Secret), read when the store connects.
    NodeFromEnv(String),
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
    /// Rows (bucket fields and sealed rows) one customer's usage reads may take a second on
    /// this replica, with ten seconds' worth at once.
    pub read_rows_per_second: u32,
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

/// Counters in Redis, shared by every sidecar replica that points at the same Redis.
///
/// Trade-off: the script does the check-and-hold arithmetic itself (so a decision is one
/// round trip and atomic on the customer's slot) and hands back the states it read; the
/// readings a decision reports are then worked out here by the same core functions the
/// in-process stores use, so the Lua only has to agree with them on what fits and on what a
/// hold changes.
pub struct RedisStore {
    link: Link,
    script: Code,
    admin_script: Code,
    relay_script: Code,
    settings: RedisSettings,
    retention: KeyRetention,
    known: DashMap<Sym, Known, FxBuildHasher>,
    canceller: Canceller,
    /// Decisions where the script's verdict and the core's reading of its states differ.
    disagreements: AtomicU64,
    /// How usage records are kept (sent with every script call).
    records: Arc<parking_lot::RwLock<RecordSettings>>,
    /// Changes when this replica adds stream events.
    event_signal: tokio::sync::watch::Sender<u64>,
    /// Turns for usage reads, per customer.
    reads: DashMap<Sym, Arc<tokio::sync::Semaphore>, FxBuildHasher>,
    /// Buckets read, by how.
    read_counts: scan::ReadCounts,
    /// Each customer's budget of rows read.
    read_budget: scan::ReadBudget,
    /// Customers this process has added to the registry the operator's stream reads.
    registered: dashmap::DashSet<Sym, FxBuildHasher>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("settings", &self.settings)
            .field("customers", &self.known.len())
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects (the first connection is made now, so a wrong address fails at start) and
    /// loads nothing else: the script is sent on first use.
    pub async fn connect(
        settings: RedisSettings,
        retention: KeyRetention,
    ) -> Result<Self, ConnectError> {
        let link = Link::connect(&settings).await?;
        let script = Code::Library {
            function: &script::LIBRARY.function,
            source: &script::LIBRARY.source,
        };
        let records = Arc::new(parking_lot::RwLock::new(RecordSettings::default()));
        let canceller = Canceller {
            records: Arc::clone(&records),
            conn: link.conn.clone(),
            script: script.clone(),
            prefix: settings.prefix.clone(),
            timeout: settings.timeout,
            pending: Arc::new(AtomicUsize::new(0)),
            released: Arc::new(AtomicU64::new(0)),
        };
        let read_budget = scan::read_budget(settings.read_rows_per_second);
        Ok(Self {
            link,
            script,
            admin_script: admin::script(),
            relay_script: relay::script(),
            settings,
            retention,
            known: DashMap::default(),
            canceller,
            disagreements: AtomicU64::new(0),
            records,
            event_signal: tokio::sync::watch::Sender::new(0),
            reads: DashMap::default(),
            read_counts: scan::ReadCounts::default(),
            read_budget,
            registered: dashmap::DashSet::default(),
        })
    }

    /// The key of a customer's open holds, for inspection (`HLEN`).
    pub fn holds_key(&self, customer: &str) -> String {
        CallKeys::holds(&self.settings.prefix, customer)
    }

    /// Runs one call of the customer script and notes what its header says of the customer.
    async fn run(&self, customer: Sym, invocation: &Call<'_>) -> Result<Vec<Value>, StoreError> {
        self.run_noting(customer, invocation, &AtomicBool::new(false))
            .await
    }

    /// [`RedisStore::run`], noting in `sent` whether the call went to Redis.
    async fn run_noting(
        &self,
        customer: Sym,
        invocation: &Call<'_>,
        sent: &AtomicBool,
    ) -> Result<Vec<Value>, StoreError> {
        let reply = self.link.call(invocation, sent).await?;
        if reply.len() < HEADER {
            return Err(bad_reply("a reply without its header"));
        }
        if self.registered.insert(customer) {
            self.register(Name::from(customer)).await;
        }
        let slot = |i: usize| reply.get(i).and_then(int);
        let mut known = self.known.entry(customer).or_default();
        if let (Some(version), Some(holds)) = (slot(SLOT_HOLDS_VERSION), slot(SLOT_HOLDS_OPEN))
            && version > known.holds_version
            && holds >= 0
        {
            known.holds_version = version;
            known.holds_open = holds as usize;
        }
        if let Some(n) = slot(SLOT_COUNTERS).filter(|n| *n >= 0) {
            known.counters = n as usize;
        }
        match reply.get(SLOT_NEXT_EXPIRY) {
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

    /// An invocation of `op` on `keys`, with `now` as the second argument.
    fn invocation<'a>(&'a self, keys: &CallKeys, op: &str, now: Timestamp) -> Call<'a> {
        let mut inv = self.script.call();
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
    /// count of counters and a group each follow, then the record draft, then `tail`'s
    /// arguments, then the record settings.
    async fn run_plan(
        &self,
        plan: &Plan,
        op: &str,
        now: Timestamp,
        head: impl FnOnce(&mut Call<'_>),
        tail: impl FnOnce(&mut Call<'_>),
        sent: &AtomicBool,
    ) -> Result<Vec<Value>, StoreError> {
        let mut keys = self.keys(plan.customer);
        let counters = self.counters(plan, &mut keys, now);
        let mut inv = self.invocation(&keys, op, now);
        head(&mut inv);
        inv.arg(counters.len());
        for c in &counters {
            c.push(&mut inv);
        }
        // What the call records: the plan's series and the measures of its usage (what a
        // hold's expiry commits, or what an ingest adds).
        let usage = &plan.usage;
        let measures = Measures::of_call(usage.units, usage.tokens, plan.credits(usage));
        push_record_draft(&mut inv, plan, &measures);
        tail(&mut inv);
        if plan.record {
            self.push_record_settings(&mut inv);
        } else {
            let off = RecordSettings {
                enabled: false,
                ..*self.records.read()
            };
            push_record_settings(&mut inv, &off, &StreamRetention::default());
        }
        self.run_noting(plan.customer.sym(), &inv, sent).await
    }

    /// A reservation (`reserve`), or with `renew` a hold settled at `spent` units first in
    /// the same script call (`renew`). Returns the reservation and, for a renewal, the last
    /// reply entry (the old hold's fate).
    async fn reserve_op(
        &self,
        plan: &Plan,
        mode: ReserveMode,
        now: Timestamp,
        renew: Option<(HoldKey, u64)>,
    ) -> Result<(Reservation, Option<i64>), StoreError> {
        let sent = AtomicBool::new(false);
        let reply = self
            .run_plan(
                plan,
                if renew.is_some() { "renew" } else { "reserve" },
                now,
                |inv| {
                    inv.arg(match mode {
                        ReserveMode::DryRun => 0u8,
                        ReserveMode::Hold => 1,
                        ReserveMode::Commit => 2,
                    })
                    .arg(match mode {
                        ReserveMode::Commit => commit_replay_window(self.link.timeout()),
                        _ => plan.hold_ttl_millis,
                    })
                    .arg(tag_text(plan.hold_tag))
                    .arg(plan.max_settle);
                },
                |inv| {
                    if let Some((old, spent)) = renew {
                        inv.arg(old.seq).arg(tag_text(old.tag)).arg(spent);
                    }
                },
                &sent,
            )
            .await;
        let mut reply = match reply {
            Ok(r) => r,
            Err(e) => {
                // The call may still run in Redis, late (a timeout, a connection lost after
                // sending): the caller hears "unavailable", so whatever it holds must go.
                if mode == ReserveMode::Hold && sent.load(Ordering::Relaxed) {
                    self.canceller
                        .cancel_soon(plan.customer.as_str(), plan.hold_tag, now);
                }
                return Err(e);
            }
        };
        let renewed = match renew {
            Some(_) => Some(
                reply
                    .pop()
                    .as_ref()
                    .and_then(int)
                    .ok_or_else(|| bad_reply("renew"))?,
            ),
            None => None,
        };
        // `reserve()`: the blocking counter (1-based, 0 if none), the hold number (0 if none),
        // then each counter's state before the call.
        let blocking = result(&reply).ok_or_else(|| bad_reply("reserve"))?;
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
        // A replay's states already hold its amount: read as they are, with no verdict to
        // compare (the first run decided).
        let replayed = blocking == RESERVE_REPLAYED;
        if placed {
            let expires = now.plus_millis(plan.hold_ttl_millis).millis();
            if let Some(mut k) = self.known.get_mut(&plan.customer.sym()) {
                k.next_expiry = Some(k.next_expiry.map_or(expires, |at| at.min(expires)));
            }
        }
        let applied = match mode {
            _ if replayed => ReserveMode::DryRun,
            ReserveMode::Hold if placed => ReserveMode::Hold,
            ReserveMode::Commit => ReserveMode::Commit,
            _ => ReserveMode::DryRun,
        };
        let (readings, computed) = readings_from(plan, before, applied, now);
        let blocking = usize::try_from(blocking)
            .ok()
            .and_then(|b| b.checked_sub(1));
        if !replayed && blocking != computed {
            // The script decided; a disagreement means it and the core differ somewhere.
            self.disagreements.fetch_add(1, Ordering::Relaxed);
            tracing::error!(customer = plan.customer.as_str(), script = ?blocking, core = ?computed, "redis script and core disagree on a decision");
        }
        let reservation = Reservation {
            readings,
            blocking,
            hold: placed.then(|| HoldId {
                customer: plan.customer.to_string(),
                seq: seq as u64,
                tag: plan.hold_tag,
            }),
        };
        Ok((reservation, renewed))
    }

    fn push_record_settings(&self, inv: &mut Call<'_>) {
        push_record_settings(inv, &self.records.read(), &StreamRetention::default());
    }

    fn keys(&self, customer: Name) -> CallKeys {
        CallKeys::new(&self.settings.prefix, customer.as_str())
    }

    async fn close(
        &self,
        hold: HoldKey,
        actual: Option<&Usage>,
        end: Option<StreamEnd>,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        let keys = self.keys(hold.customer);
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
            let t = actual.and_then(|u| u.tokens).unwrap_or_default();
            inv.arg(t.input)
                .arg(t.output)
                .arg(t.cached)
                .arg(t.cache_write)
                .arg(t.reasoning);
            let (name, value) = end.map_or(("", ""), |e| {
                let (name, value) = e.attribute();
                (name, value.as_str())
            });
            inv.arg(name).arg(value);
            self.push_record_settings(&mut inv);
            inv
        };
        let sym = hold.customer.sym();
        let mut reply = self.run(sym, &base(None)).await?;
        if result(&reply) == Some(CLOSE_NEEDS_PRICES) {
            // Priced parts: the script sent back their prices; price the usage the way the
            // hold was priced and settle with those amounts (the hold cannot change between).
            // Trade-off: a second round trip for token-priced settlements, so that pricing
            // stays in the core's integers and never runs in Lua's doubles.
            let usage = actual.copied().unwrap_or_default();
            let amounts: Vec<u64> = reply
                .get(HEADER..)
                .unwrap_or(&[])
                .chunks(PRICES_PER_PART)
                .map(|p| {
                    let n = |i: usize| p.get(i).and_then(int).unwrap_or(0).max(0) as u64;
                    PriceSnapshot {
                        input_per_million: n(0),
                        output_per_million: n(1),
                        cached_per_million: n(2),
                        cache_write_per_million: n(3),
                    }
                    .price(&usage)
                })
                .collect();
            reply = self.run(sym, &base(Some(&amounts))).await?;
        }
        match result(&reply) {
            Some(CLOSE_CLOSED) => Ok(CloseOutcome::Closed),
            Some(CLOSE_ALREADY_CLOSED) => Ok(CloseOutcome::AlreadyClosed),
            Some(CLOSE_NO_SUCH_HOLD) => Err(StoreError::UnknownHold(hold.to_string())),
            Some(CLOSE_TOO_LARGE) => Err(StoreError::SettleTooLarge {
                hold: hold.to_string(),
                actual: actual.map_or(0, Usage::largest_figure),
                max: reply.get(HEADER).and_then(int).unwrap_or(0).max(0) as u64,
            }),
            _ => Err(bad_reply("close")),
        }
    }
}

/// A delivery as the script stores it: its JSON (the script only moves it around).
/// How long a commit's tag stays among the decided ones (`lua/ledger.lua` `reserve()`), so
/// that the same script call resent by the client (a lost answer, a Cluster redirect) counts
/// nothing more. Trade-off: the hold TTL (five minutes by default) would keep every commit's
/// tag that long, millions of entries at production rates; a resend is sent within one
/// `timeoutMs` of the first, and both carry the same `now`, so a window of several timeouts,
/// never under ten seconds, covers it unless Redis stalls longer than that between the two.
pub(crate) fn commit_replay_window(timeout: std::time::Duration) -> i64 {
    let four = i64::try_from(timeout.as_millis().saturating_mul(4)).unwrap_or(i64::MAX);
    four.max(10_000)
}

fn encode_delivery(d: &Delivery) -> Result<String, StoreError> {
    serde_json::to_string(d).map_err(|e| StoreError::Unavailable(format!("a delivery: {e}")))
}

/// Deliveries as the script's `enqueue_at` takes them: a count, then (id, created, due,
/// encoded) each.
fn push_deliveries(inv: &mut Call<'_>, deliveries: &[Delivery]) -> Result<(), StoreError> {
    inv.arg(deliveries.len());
    for d in deliveries {
        inv.arg(&d.id)
            .arg(d.created)
            .arg(d.next_at.unwrap_or(d.created))
            .arg(encode_delivery(d)?);
    }
    Ok(())
}

/// The deliveries after a reply's header, each encoded and followed by when it is next due:
/// the queue's score, which a lease moves, so it wins over the encoded `next_at` (`false`:
/// finished, as encoded).
fn decode_deliveries(reply: &[Value]) -> Result<Vec<Delivery>, StoreError> {
    reply
        .get(HEADER..)
        .unwrap_or(&[])
        .chunks(2)
        .map(|pair| {
            let Some(Value::BulkString(b)) = pair.first() else {
                return Err(bad_reply("a delivery that is not bytes"));
            };
            let mut d: Delivery = serde_json::from_slice(b)
                .map_err(|e| bad_reply(&format!("a delivery that does not decode: {e}")))?;
            match pair.get(1) {
                Some(Value::Int(due)) => d.next_at = Some(*due),
                Some(Value::BulkString(due)) => {
                    d.next_at = std::str::from_utf8(due)
                        .ok()
                        .and_then(|s| s.parse::<f64>().ok())
                        .map(|f| f as i64)
                        .or(d.next_at);
                }
                _ => {}
            }
            Ok(d)
        })
        .collect()
}

/// Whether `s` is an event id as the script makes them: a stream id (`<ms>-<seq>`), or one
/// inside a batch entry (`<ms>-<seq>.<index>`).
fn is_event_id(s: &str) -> bool {
    let digits = |x: &str| !x.is_empty() && x.len() <= 20 && x.bytes().all(|b| b.is_ascii_digit());
    let (id, index) = s.split_once('.').unwrap_or((s, "0"));
    digits(index)
        && id
            .split_once('-')
            .is_some_and(|(ms, seq)| digits(ms) && digits(seq))
}

/// Most `entitypage()` calls one listing makes: enough for 32 million entities, far past any
/// customer's cap; a scan that runs longer is a bad reply, not a loop.
const MAX_ENTITY_PAGES: usize = (1 << 25) / ENTITY_PAGE;

#[async_trait::async_trait]
impl CounterStore for RedisStore {
    async fn reserve(
        &self,
        plan: &Plan,
        mode: ReserveMode,
        now: Timestamp,
    ) -> Result<Reservation, StoreError> {
        let (reservation, _) = self.reserve_op(plan, mode, now, None).await?;
        Ok(reservation)
    }

    async fn renew(
        &self,
        old: HoldKey,
        spent: u64,
        next: &Plan,
        now: Timestamp,
    ) -> Result<(CloseOutcome, Reservation), StoreError> {
        let (reservation, closed) = self
            .reserve_op(next, ReserveMode::Hold, now, Some((old, spent)))
            .await?;
        // `renew()` ends its reply with 0 when it closed the old hold, 1 when it was gone.
        let outcome = if closed == Some(0) {
            CloseOutcome::Closed
        } else {
            CloseOutcome::AlreadyClosed
        };
        Ok((outcome, reservation))
    }

    async fn settle_ended(
        &self,
        hold: HoldKey,
        actual: &Usage,
        end: Option<StreamEnd>,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        self.close(hold, Some(actual), end, now).await
    }

    async fn release(&self, hold: HoldKey, now: Timestamp) -> Result<CloseOutcome, StoreError> {
        self.close(hold, None, None, now).await
    }

    async fn cancel(&self, customer: Name, tag: u128, now: Timestamp) -> Result<bool, StoreError> {
        let keys = self.keys(customer);
        let inv = self.canceller.invocation(&keys, tag, now);
        match self.run(customer.sym(), &inv).await {
            Ok(reply) => Ok(self.canceller.released(&reply)),
            Err(e) => {
                // Not answered now: keep trying in the background.
                self.canceller.cancel_soon(customer.as_str(), tag, now);
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
            let keys = self.keys(Name::from(sym));
            let mut inv = self.invocation(&keys, "expire", now);
            self.push_record_settings(&mut inv);
            match self.run(sym, &inv).await {
                Ok(reply) => expired += result(&reply).unwrap_or(0).max(0) as usize,
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
        customer: Name,
        pool: CounterKey,
        grant: GrantBalance,
    ) -> Result<bool, StoreError> {
        let mut keys = self.keys(customer);
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
        let reply = self.run(customer.sym(), &inv).await?;
        Ok(result(&reply) == Some(DONE))
    }

    async fn inspect(
        &self,
        customer: Name,
        key: CounterKey,
        spec: &CounterSpec,
        now: Timestamp,
    ) -> Result<Option<crate::core::counter::Inspection>, StoreError> {
        let mut keys = self.keys(customer);
        let index = keys.entity(key.entity);
        let mut inv = self.invocation(&keys, "counted", now);
        inv.arg(index).arg(field(key));
        let reply = self.run(customer.sym(), &inv).await?;
        let value = reply.get(HEADER).unwrap_or(&Value::Nil);
        Ok(state_of(value)?.map(|s| crate::core::counter::inspect(spec, &s, now)))
    }

    async fn record(
        &self,
        plan: &Plan,
        idempotency_key: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let reply = self
            .run_plan(
                plan,
                "record",
                now,
                |inv| {
                    inv.arg(idempotency_key)
                        .arg(self.retention.millis)
                        .arg(self.retention.max_keys);
                },
                |_| {},
                &AtomicBool::new(false),
            )
            .await?;
        Ok(result(&reply) == Some(DONE))
    }

    async fn auto_entity(
        &self,
        customer: Name,
        id: &str,
        proposed: &StoredEntity,
        max: u32,
        create: bool,
    ) -> Result<AutoEntityOutcome, StoreError> {
        let keys = self.keys(customer);
        let mut inv = self.invocation(&keys, "entity", Timestamp::default());
        inv.arg(id)
            .arg(&proposed.entity_type)
            .arg(&proposed.parent)
            .arg(max)
            .arg(u8::from(create));
        let reply = self.run(customer.sym(), &inv).await?;
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
        match result(&reply) {
            Some(ENTITY_FOUND) => Ok(AutoEntityOutcome::Found(stored()?)),
            Some(ENTITY_CREATED) => Ok(AutoEntityOutcome::Created(stored()?)),
            Some(ENTITY_FULL) => Ok(AutoEntityOutcome::Full),
            Some(ENTITY_ABSENT) => Ok(AutoEntityOutcome::Absent),
            _ => Err(bad_reply("entity")),
        }
    }

    async fn auto_entity_count(&self, customer: Name) -> Result<usize, StoreError> {
        let keys = self.keys(customer);
        let reply = self
            .run(
                customer.sym(),
                &self.invocation(&keys, "entities", Timestamp::default()),
            )
            .await?;
        Ok(result(&reply).unwrap_or(0).max(0) as usize)
    }

    async fn auto_entities(
        &self,
        customer: Name,
    ) -> Result<Vec<(String, StoredEntity)>, StoreError> {
        let keys = self.keys(customer);
        let mut out = Vec::new();
        let mut cursor = "0".to_string();
        // Read a page per call, so no call holds Redis for long however many there are; the
        // hash is bounded by the customer's cap, and a scan that never ends is a bad reply.
        for _ in 0..MAX_ENTITY_PAGES {
            let mut inv = self.invocation(&keys, "entitypage", Timestamp::default());
            inv.arg(&cursor);
            let reply = self.run(customer.sym(), &inv).await?;
            let text = |v: &Value| match v {
                Value::BulkString(b) => String::from_utf8(b.clone())
                    .map_err(|_| bad_reply("an entity field that is not text")),
                _ => Err(bad_reply("an entity page item that is not a string")),
            };
            let items = reply.get(HEADER..).unwrap_or_default();
            let (next, rest) = items
                .split_first()
                .ok_or_else(|| bad_reply("an entity page without its cursor"))?;
            for e in rest.chunks(3) {
                let [id, entity_type, parent] = e else {
                    return Err(bad_reply("an entity page with a partial entity"));
                };
                out.push((
                    text(id)?,
                    StoredEntity {
                        entity_type: text(entity_type)?,
                        parent: text(parent)?,
                    },
                ));
            }
            cursor = text(next)?;
            if cursor == "0" {
                return Ok(out);
            }
        }
        Err(bad_reply("an entity scan that did not end"))
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
        stats.backend_failures = self.link.failures.load(Ordering::Relaxed);
        stats.breaker_rejections = self.link.rejected.load(Ordering::Relaxed);
        stats.connections_replaced = self.link.conn.replaced();
        stats.abandoned_released = self.canceller.released.load(Ordering::Relaxed);
        stats.script_disagreements = self.disagreements.load(Ordering::Relaxed);
        stats.bucket_reads = self.read_counts.snapshot();
        stats
    }

    /// Every call is answered once Redis has run it: nothing waits here.
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn admin_log(&self) -> &dyn AdminLog {
        self
    }

    fn hold_relay(&self) -> &dyn super::HoldRelay {
        self
    }

    fn usage(&self) -> &dyn UsageStore {
        self
    }

    fn alerts(&self) -> &dyn AlertStore {
        self
    }
}

#[async_trait::async_trait]
impl UsageStore for RedisStore {
    fn configure_records(&self, settings: RecordSettings) {
        *self.records.write() = settings;
    }

    async fn usage_buckets(
        &self,
        customer: Name,
        g: Granularity,
        from: i64,
        to: i64,
        needs: &ScanNeeds,
    ) -> Result<BucketScan, StoreError> {
        self.read_buckets(customer, g, from, to, needs).await
    }

    /// Per customer only: each customer's events are a Redis stream on its slot, and their
    /// ids are the stream's. Following every customer is left to the caller, which knows the
    /// customers (a stream across slots could not be written in the call that counts).
    async fn read_events(
        &self,
        customer: Option<Name>,
        after: Option<&str>,
        max: usize,
    ) -> Result<EventPage, StoreError> {
        match customer {
            Some(customer) => self.customer_events(customer, after, max).await,
            None => self.all_events(after, max).await,
        }
    }

    fn event_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.event_signal.subscribe()
    }

    async fn record_local(
        &self,
        customer: Name,
        id: super::BatchId,
        records: &[LocalRecord],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let batch = LocalBatch::pack(records).await?;
        let keys = self.keys(customer);
        let mut inv = self.invocation(&keys, "locals", now);
        inv.arg(id.writer).arg(id.seq);
        batch.push(&mut inv);
        self.push_record_settings(&mut inv);
        self.run(customer.sym(), &inv).await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl AlertStore for RedisStore {
    async fn claim_alert(
        &self,
        customer: Name,
        key: &str,
        until: Option<i64>,
        body: &str,
        deliveries: &[Delivery],
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let keys = self.keys(customer);
        let mut inv = self.invocation(&keys, "alert", now);
        inv.arg(key)
            .arg(until.map_or_else(String::new, |u| u.to_string()))
            .arg(body);
        push_deliveries(&mut inv, deliveries)?;
        self.push_record_settings(&mut inv);
        let reply = self.run(customer.sym(), &inv).await?;
        Ok(result(&reply) == Some(DONE))
    }

    async fn enqueue_deliveries(
        &self,
        customer: Name,
        deliveries: &[Delivery],
    ) -> Result<(), StoreError> {
        let keys = self.keys(customer);
        let mut inv = self.invocation(&keys, "enqueue", Timestamp::default());
        push_deliveries(&mut inv, deliveries)?;
        self.run(customer.sym(), &inv).await?;
        Ok(())
    }

    async fn lease_deliveries(
        &self,
        customer: Name,
        lessee: &str,
        now: Timestamp,
        lease_ms: i64,
        max: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        let keys = self.keys(customer);
        let mut inv = self.invocation(&keys, "lease", now);
        inv.arg(lease_ms).arg(max).arg(lessee);
        let reply = self.run(customer.sym(), &inv).await?;
        decode_deliveries(&reply)
    }

    async fn finish_delivery(
        &self,
        customer: Name,
        lessee: &str,
        delivery: &Delivery,
    ) -> Result<(), StoreError> {
        let keys = self.keys(customer);
        let mut inv = self.invocation(&keys, "finish", Timestamp::default());
        inv.arg(&delivery.id)
            .arg(delivery.next_at.map_or_else(String::new, |t| t.to_string()))
            .arg(encode_delivery(delivery)?)
            .arg(lessee);
        self.run(customer.sym(), &inv).await?;
        Ok(())
    }

    async fn deliveries(&self, customer: Name, max: usize) -> Result<Vec<Delivery>, StoreError> {
        let keys = self.keys(customer);
        let mut inv = self.invocation(&keys, "deliveries", Timestamp::default());
        inv.arg(max.max(1));
        let reply = self.run(customer.sym(), &inv).await?;
        decode_deliveries(&reply)
    }

    async fn rearm_alert(&self, customer: Name, key: &str) -> Result<bool, StoreError> {
        let keys = self.keys(customer);
        let mut inv = self.invocation(&keys, "rearm", Timestamp::default());
        inv.arg(key);
        let reply = self.run(customer.sym(), &inv).await?;
        Ok(result(&reply) == Some(DONE))
    }
}

impl RedisStore {
    /// One customer's events after `after`, at most `max`.
    async fn customer_events(
        &self,
        customer: Name,
        after: Option<&str>,
        max: usize,
    ) -> Result<EventPage, StoreError> {
        if let Some(a) = after
            && !is_event_id(a)
        {
            return Err(StoreError::BadCursor(a.to_string()));
        }
        let keys = self.keys(customer);

        let mut inv = self.invocation(&keys, "events", Timestamp::default());
        inv.arg(after.unwrap_or("")).arg(max);
        let reply = self.run(customer.sym(), &inv).await?;
        let gap = result(&reply) == Some(1);
        let events = reply
            .get(HEADER..)
            .unwrap_or(&[])
            .chunks(2)
            .map(|e| match e {
                [id, Value::BulkString(body)] => {
                    let id = match id {
                        Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
                        Value::SimpleString(s) => s.clone(),
                        _ => return None,
                    };
                    let (at, body) = decode_event(body)?;
                    Some(StreamEvent {
                        id,
                        customer,
                        at,
                        body: Arc::new(body),
                    })
                }
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad_reply("events: an event that does not decode"))?;
        Ok(EventPage { events, gap })
    }
}

/// The timeout a call runs under, for tests that reason about it.
impl RedisStore {
    pub fn call_timeout(&self) -> Duration {
        self.link.timeout()
    }
}
