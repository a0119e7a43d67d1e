//! Escrow leases in front of a shared store: a replica holds slices of its hot quota counters
//! in the store (each slice a hold of its own there) and decides inside them in memory.
//!
//! What is leased: enforcing calendar quotas counted in the feature's units or per request
//! (see `core::lease` for why rate windows, concurrency and credits are not). A decision whose
//! every counter is covered by a usable lease with room is made here without a store call; one
//! partly covered holds the covered part here and the rest in the store, and gives the local
//! part back if the store denies; any other goes to the store exactly. A lease is usable for a
//! decision only if the decision's hold would end before the lease's local validity does, so
//! every local hold is closed (settled, released or expired at its held amount) inside the
//! slice it was granted from.
//!
//! Invariant: what all replicas can grant is at most the cap, because every locally granted
//! unit lies inside a slice already held in the store.
//!
//! A renewal is one store step (`CounterStore::renew`): the current slice settled at what it
//! spent and the next one reserved, atomically, so what it returns is there for the next.
//! Trade-off: a slice with local holds still open cannot be settled yet; its successor is
//! placed first and it goes back once they close. While both are held the replica holds more
//! than it needs, which can only deny sooner, never overspend.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use futures_util::StreamExt;
use parking_lot::Mutex;

use super::{
    AdminLog, AlertStore, AutoEntityOutcome, BatchId, CloseOutcome, CounterStore, HoldKey,
    HoldRelay, PostedClose, Reservation, ReserveMode, StoreError, StoreStats, StoredEntity,
    UsageStore,
};
use crate::core::counter::{CounterKey, CounterSpec, Reading};
use crate::core::credits::GrantBalance;
use crate::core::lease::{Lease, LeaseTerms, RETURN_MARGIN_MS, slice_size};
use crate::core::model::Mode;
use crate::core::plan::{AmountRule, Plan, PlannedCounter};
use crate::core::rollup::{LocalRecord, Measures, RecordKind, SeriesDraft};
use crate::core::usage::Usage;
use crate::core::{HoldId, Name, Timestamp};

/// Local hold numbers carry this bit, so a settlement finds its hold here and not in the
/// store (whose numbers count up from 1 and never reach it). Below 2^53, so a number is exact
/// wherever it is written (a Redis script's doubles).
const LOCAL_BIT: u64 = 1 << 52;

/// Below [`LOCAL_BIT`], a local hold number carries the replica that granted it in these 20
/// bits (from bit 32), so a close that reaches another replica is posted for that one.
const REPLICA_SHIFT: u32 = 32;
const REPLICA_MASK: u64 = 0xF_FFFF;

/// The replica a local hold number names.
fn replica_of(seq: u64) -> u32 {
    ((seq >> REPLICA_SHIFT) & REPLICA_MASK) as u32
}

/// Records waiting for their batch; past this many a customer's oldest are dropped (and
/// counted) while the store is unreachable, so an outage cannot grow memory without bound.
const MAX_PENDING_RECORDS: usize = 100_000;

/// The most slice placements or returns one sweep has in flight at once.
const STORE_CALLS_AT_ONCE: usize = 32;

/// A batch is written at once when it reaches this many records (else at the next sweep).
const FLUSH_AT: usize = 1024;

/// How much longer than its hold the store part of a partly covered decision lives in the
/// store: a close posted through another replica just before the hold's TTL is applied here
/// up to a sweep (a second) and its store calls later.
pub const RELAY_MARGIN_MS: i64 = 2_000;

/// A counter nobody asked for this long is idle: its slices go back at the sweep (every
/// second in the server), and none is placed for it, so what a replica holds is back in the
/// store within about two seconds of its last decision on it.
const IDLE_MS: i64 = 1_000;

/// Counts since start, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LeaseStats {
    /// Decisions made entirely inside leases.
    pub local_decisions: u64,
    /// Decisions that held part of their counters inside leases and the rest in the store.
    pub partial_decisions: u64,
    /// Decisions (holds) that went to the store for every counter.
    pub store_decisions: u64,
    /// Slices placed in the store (first leases and renewals).
    pub slices_placed: u64,
    /// Slices settled back (what was spent committed, the rest returned).
    pub slices_returned: u64,
    /// Store calls not made: a local decision's reserve and close.
    pub store_calls_saved: u64,
    /// Units of slices the store expired before they were returned (committed whole: the
    /// overcount a lost replica or a long outage leaves).
    pub stranded_units: u64,
    /// Units held in the store by this replica's slices now.
    pub outstanding_units: u64,
    /// Records of local decisions dropped because the store stayed unreachable.
    pub records_dropped: u64,
}

/// A lease's place: the counter and the period it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SlotKey {
    key: CounterKey,
    period: i64,
}

/// One slice as placed in the store.
#[derive(Debug)]
struct Gen {
    lease: Lease,
    store: HoldKey,
    /// No new local holds; returned once its open holds close.
    retired: bool,
}

/// This replica's leases on one counter and what it knows of the counter.
#[derive(Debug)]
struct Slot {
    limit: u64,
    reset_at: Timestamp,
    /// The counter as the last decision planned it: the template of the next slice.
    template: PlannedCounter,
    /// Slices, the newest last.
    gens: Vec<Gen>,
    acquiring: bool,
    /// Units asked of the counter since `window_start`, and in the window before.
    recent: u64,
    previous: u64,
    window_start: i64,
    last_asked: i64,
    /// What the store counted, less this replica's slices, at the last placement.
    others_used: u64,
    /// What the store had left at the last placement (after the slice).
    store_remaining: u64,
    /// The hold TTL of the decisions on this counter (the model's `holdTtl`).
    hold_ttl_ms: i64,
}

impl Slot {
    /// The current slice, if a decision holding until `until` may use it now.
    fn usable(&mut self, now: i64, until: i64) -> Option<&mut Gen> {
        self.gens.last_mut().filter(|g| {
            !g.retired
                && until + RETURN_MARGIN_MS < g.lease.usable_until
                && now < g.lease.usable_until
        })
    }

    fn note_demand(&mut self, amount: u64, now: i64, ttl: i64) {
        if now - self.window_start >= ttl {
            self.previous = if now - self.window_start >= 2 * ttl {
                0
            } else {
                self.recent
            };
            self.recent = 0;
            self.window_start = now;
        }
        self.recent = self.recent.saturating_add(amount);
        self.last_asked = now;
    }

    /// Units wanted over one lease lifetime at the recent rate: the last whole window, or
    /// the current one extrapolated (from at least a tenth of a second, so a counter that
    /// just got busy gets a useful slice at once rather than after a window).
    fn rate_per_ttl(&self, now: i64, ttl: i64) -> u64 {
        let elapsed = (now - self.window_start).clamp(100, ttl.max(100));
        let current = u128::from(self.recent) * u128::from(ttl.unsigned_abs())
            / u128::from(elapsed.unsigned_abs());
        u64::try_from(current)
            .unwrap_or(u64::MAX)
            .max(self.previous)
    }

    fn reading(&self) -> Reading {
        let mine: u64 = self.gens.iter().map(|g| g.lease.held + g.lease.spent).sum();
        let used = self.others_used.saturating_add(mine);
        Reading {
            usage_limit: self.limit,
            current_usage: used,
            remaining: self.limit.saturating_sub(used),
            reset_at: Some(self.reset_at),
            fits: true,
            retry_at: None,
        }
    }
}

/// One part of a local hold: its slice and what it holds there.
#[derive(Debug, Clone)]
struct LocalPart {
    slot: SlotKey,
    slice: u64,
    held: u64,
    rule: AmountRule,
}

#[derive(Debug)]
struct LocalHold {
    seq: u64,
    tag: u128,
    expires_at: Timestamp,
    parts: Vec<LocalPart>,
    /// The store's part of a partly covered decision (it records the decision).
    store: Option<HoldKey>,
    series: SeriesDraft,
    usage: Usage,
    max_settle: u64,
}

/// One customer's leases, local holds and unwritten records.
#[derive(Debug, Default)]
struct Book {
    slots: HashMap<SlotKey, Slot>,
    holds: HashMap<u128, LocalHold>,
    records: VecDeque<LocalRecord>,
    /// Slices the store could not take back yet (unreachable): tried again at each sweep.
    unreturned: Vec<(HoldKey, Lease)>,
    /// What settlements spent past their slices that the store could not be charged yet
    /// (unreachable), by local hold: charged at each sweep (idempotent by the hold).
    overs: VecDeque<(HoldKey, Vec<PlannedCounter>)>,
    /// Store parts of partly covered holds whose close the store did not answer: closed at
    /// each sweep until it does (a close of a closed hold changes nothing).
    unclosed: Vec<(HoldKey, Option<Usage>, Timestamp)>,
    /// The number of the last batch of records made for this customer.
    batches: u64,
    /// A batch sent and not answered: sent again, unchanged, before any newer record.
    unsent: Option<(BatchId, Vec<LocalRecord>)>,
    /// A batch is in flight.
    writing: bool,
}

impl Book {
    fn gen_mut(&mut self, slot: &SlotKey, slice: u64) -> Option<&mut Gen> {
        self.slots
            .get_mut(slot)?
            .gens
            .iter_mut()
            .find(|g| g.store.seq == slice)
    }

    /// Closes a local hold's parts: settled at `actual` (`None`: released). Returns what a
    /// settlement over the hold spent past its slice, per counter: that must reach the store
    /// at once (see [`Shared::charge_over`]), or a decision the store makes meanwhile would
    /// not see it.
    fn close_parts(&mut self, parts: &[LocalPart], actual: Option<&Usage>) -> Vec<PlannedCounter> {
        let mut over = Vec::new();
        for p in parts {
            let Some(slot) = self.slots.get_mut(&p.slot) else {
                continue;
            };
            let template = &slot.template;
            let Some(g) = slot.gens.iter_mut().find(|g| g.store.seq == p.slice) else {
                continue;
            };
            match actual {
                Some(u) => {
                    let excess = g.lease.settle(p.held, p.rule.amount(u));
                    if excess > 0 {
                        over.push(PlannedCounter {
                            amount: excess,
                            rule: AmountRule::Units,
                            ..template.clone()
                        });
                    }
                }
                None => g.lease.release(p.held),
            }
        }
        over
    }

    /// Ends a local hold at its held amount, as a store's expiry does (at `at`).
    fn expire_hold(&mut self, h: &LocalHold, at: Timestamp, dropped: &AtomicU64) {
        for p in &h.parts {
            if let Some(g) = self.gen_mut(&p.slot, p.slice) {
                // Spending what it held always fits the room it held: nothing past the slice.
                g.lease.settle(p.held, p.held);
            }
        }
        if h.store.is_none() {
            self.push_record(expired_record(h, at), dropped);
        }
    }

    /// Keeps an excess for the next sweep; past [`MAX_PENDING_RECORDS`] the oldest is dropped
    /// (usage then undercounted by it, said in the log).
    fn keep_over(&mut self, hold: HoldKey, over: Vec<PlannedCounter>) {
        if self.overs.len() >= MAX_PENDING_RECORDS
            && let Some((h, o)) = self.overs.pop_front()
        {
            let units: u64 = o.iter().map(|c| c.amount).max().unwrap_or(0);
            tracing::error!(hold = %h, units, "usage past a slice dropped: the store was unreachable too long");
        }
        self.overs.push_back((hold, over));
    }

    fn push_record(&mut self, r: LocalRecord, dropped: &AtomicU64) {
        if self.records.len() >= MAX_PENDING_RECORDS {
            self.records.pop_front();
            dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.records.push_back(r);
    }
}

#[derive(Debug, Default)]
struct Counters {
    local: AtomicU64,
    partial: AtomicU64,
    store: AtomicU64,
    placed: AtomicU64,
    returned: AtomicU64,
    stranded: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    inner: Arc<dyn CounterStore>,
    /// The replica's clock: a slice is placed at the time it is placed, not at the time of
    /// the decision that asked for it (a late placement would otherwise start its TTL in
    /// the past).
    clock: Arc<dyn crate::clock::Clock>,
    terms: LeaseTerms,
    books: DashMap<Name, Arc<Mutex<Book>>>,
    next_seq: AtomicU64,
    /// This replica's number in its local hold numbers (random per process, never 0).
    replica: u32,
    /// Customers whose posted closes could not be read or applied: tried again next sweep.
    relay_retry: Mutex<Vec<Name>>,
    counters: Counters,
}

/// A counter store that decides inside escrow leases where it can, and in `inner` otherwise.
#[derive(Debug, Clone)]
pub struct LeasedStore {
    shared: Arc<Shared>,
}

/// Whether a planned counter may be decided inside a lease, and where that lease lives.
fn leasable(c: &PlannedCounter) -> Option<(SlotKey, u64, Timestamp)> {
    match (&c.spec, c.mode, &c.rule) {
        (
            CounterSpec::Quota {
                limit,
                index,
                reset_at,
            },
            Mode::Enforce,
            AmountRule::Units | AmountRule::PerRequest,
        ) => Some((
            SlotKey {
                key: c.key,
                period: *index,
            },
            *limit,
            *reset_at,
        )),
        _ => None,
    }
}

impl LeasedStore {
    pub fn new(
        inner: Arc<dyn CounterStore>,
        terms: LeaseTerms,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                inner,
                clock,
                terms,
                books: DashMap::new(),
                next_seq: AtomicU64::new(1),
                // Trade-off: random rather than handed out by the store, so starting needs no
                // store call; two replicas of one Service draw the same number about once in a
                // million pairs, and then a close sent to the wrong one of them is lost to its
                // hold's expiry (charged at the held amount).
                replica: (rand::random::<u32>() % REPLICA_MASK as u32) + 1,
                relay_retry: Mutex::new(Vec::new()),
                counters: Counters::default(),
            }),
        }
    }

    /// Counts since start, and the units this replica's slices hold now.
    pub fn lease_stats(&self) -> LeaseStats {
        let c = &self.shared.counters;
        let outstanding = self
            .shared
            .books
            .iter()
            .map(|b| {
                b.value()
                    .lock()
                    .slots
                    .values()
                    .flat_map(|s| s.gens.iter())
                    .map(|g| g.lease.slice)
                    .sum::<u64>()
            })
            .sum();
        LeaseStats {
            local_decisions: c.local.load(Ordering::Relaxed),
            partial_decisions: c.partial.load(Ordering::Relaxed),
            store_decisions: c.store.load(Ordering::Relaxed),
            slices_placed: c.placed.load(Ordering::Relaxed),
            slices_returned: c.returned.load(Ordering::Relaxed),
            // A local decision's reserve and close.
            store_calls_saved: 2 * c.local.load(Ordering::Relaxed),
            stranded_units: c.stranded.load(Ordering::Relaxed),
            outstanding_units: outstanding,
            records_dropped: c.dropped.load(Ordering::Relaxed),
        }
    }

    /// Returns every slice (what was spent committed, the rest given back) and writes every
    /// pending record: for a replica that stops, and for checking the store once everything
    /// is quiet. Open local holds are committed at their held amount, as their expiry would.
    pub async fn return_all(&self, now: Timestamp) -> Result<(), StoreError> {
        let shared = &self.shared;
        self.apply_relayed().await;
        let mut first = None;
        for (customer, book) in shared.all_books() {
            let settles = {
                let mut b = book.lock();
                let holds: Vec<LocalHold> = b.holds.drain().map(|(_, h)| h).collect();
                for h in &holds {
                    b.expire_hold(h, now, &shared.counters.dropped);
                }
                let mut settles = std::mem::take(&mut b.unreturned);
                for slot in b.slots.values_mut() {
                    for g in slot.gens.drain(..) {
                        settles.push((g.store, g.lease));
                    }
                }
                settles
            };
            let charged = shared
                .charge_kept(&book, now)
                .await
                .and(shared.close_kept(&book).await);
            // A batch that was waiting to be sent again, then the rest.
            let mut written = Ok(());
            for _ in 0..2 {
                written = written.and(shared.write_records(customer, now).await);
            }
            let returned = shared.settle_all(&book, settles, now).await;
            // Every customer is tried; the first failure is the answer.
            if let Err(e) = charged.and(written).and(returned) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Ends a customer's batch write: a batch not known to be written is kept to be sent again.
struct Unsent {
    book: Arc<Mutex<Book>>,
    batch: Option<(BatchId, Vec<LocalRecord>)>,
}

impl Drop for Unsent {
    fn drop(&mut self) {
        let mut b = self.book.lock();
        b.writing = false;
        if let Some(batch) = self.batch.take() {
            b.unsent = Some(batch);
        }
    }
}

/// Unmarks slots as acquiring when dropped, unless their placements were started.
struct Unmark {
    book: Arc<Mutex<Book>>,
    slots: Vec<SlotKey>,
}

impl Drop for Unmark {
    fn drop(&mut self) {
        if self.slots.is_empty() {
            return;
        }
        let mut b = self.book.lock();
        for slot in &self.slots {
            if let Some(s) = b.slots.get_mut(slot) {
                s.acquiring = false;
            }
        }
    }
}

fn expired_record(h: &LocalHold, at: Timestamp) -> LocalRecord {
    LocalRecord {
        kind: RecordKind::Expired,
        at,
        series: h.series.clone(),
        measures: Measures::of_call(h.usage.units, h.usage.tokens, 0),
        seq: h.seq,
        tag: h.tag,
    }
}

impl Shared {
    fn book(&self, customer: Name) -> Arc<Mutex<Book>> {
        Arc::clone(self.books.entry(customer).or_default().value())
    }

    fn all_books(&self) -> Vec<(Name, Arc<Mutex<Book>>)> {
        self.books
            .iter()
            .map(|e| (*e.key(), Arc::clone(e.value())))
            .collect()
    }

    /// Settles a slice in the store at what was spent in it (returning the rest).
    async fn settle_slice(
        &self,
        key: HoldKey,
        lease: &Lease,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let spent = lease.spent + lease.held;
        let outcome = self.inner.settle(key, &Usage::units(spent), now).await?;
        self.note_return(outcome, lease, now);
        Ok(())
    }

    /// Counts a slice's return: settled, or found closed. Found closed before the store's
    /// TTL for it could have run out, an earlier attempt whose answer was lost returned it;
    /// after, the store expired it and committed it whole (stranded).
    fn note_return(&self, outcome: CloseOutcome, lease: &Lease, now: Timestamp) {
        let expired = now.millis() >= lease.usable_until + self.terms.skew_ms;
        match outcome {
            CloseOutcome::AlreadyClosed if expired => {
                let unused = lease.slice.saturating_sub(lease.spent + lease.held);
                self.counters.stranded.fetch_add(unused, Ordering::Relaxed);
            }
            CloseOutcome::Closed | CloseOutcome::AlreadyClosed => {
                self.counters.returned.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Charges what local settlements spent past their slices straight to the store's
    /// counters, as an over-hold settlement is charged without leases (whether or not it
    /// fits: the usage happened). Idempotent by the local hold's id.
    async fn charge_over(
        &self,
        hold: HoldKey,
        over: &[PlannedCounter],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        if over.is_empty() {
            return Ok(());
        }
        let units = over.iter().map(|c| c.amount).max().unwrap_or(0);
        let plan = Plan {
            customer: hold.customer,
            chain: Vec::new(),
            counters: over.to_vec(),
            usage: Usage::units(units),
            hold_ttl_millis: 0,
            max_settle: units,
            hold_tag: 0,
            series: SeriesDraft::default(),
            // The decision's own record (at its full amount) is the local one.
            record: false,
        };
        self.inner
            .record(&plan, &format!("lease-over:{hold}"), now)
            .await?;
        Ok(())
    }

    /// Closes the store part of a partly covered hold: settled at `actual`, or released.
    async fn close_store_part(
        &self,
        store: HoldKey,
        actual: Option<Usage>,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        match actual {
            Some(u) => self.inner.settle(store, &u, now).await,
            None => self.inner.release(store, now).await,
        }
    }

    /// Closes the store parts `book` kept while the store did not answer, each as of when
    /// its close arrived; one still refused is kept for the next sweep.
    async fn close_kept(&self, book: &Mutex<Book>) -> Result<(), StoreError> {
        let kept = std::mem::take(&mut book.lock().unclosed);
        let mut first = None;
        for (store, actual, at) in kept {
            if let Err(e) = self.close_store_part(store, actual, at).await {
                book.lock().unclosed.push((store, actual, at));
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Charges the excesses `book` kept while the store was unreachable, oldest first; one the
    /// store still refuses is kept again, with those after it.
    async fn charge_kept(&self, book: &Mutex<Book>, now: Timestamp) -> Result<(), StoreError> {
        let kept = std::mem::take(&mut book.lock().overs);
        let mut kept = kept.into_iter();
        while let Some((hold, over)) = kept.next() {
            if let Err(e) = self.charge_over(hold, &over, now).await {
                let mut b = book.lock();
                let newer = std::mem::take(&mut b.overs);
                for (h, o) in std::iter::once((hold, over)).chain(kept).chain(newer) {
                    b.keep_over(h, o);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Settles `slices` back, at most [`STORE_CALLS_AT_ONCE`] at a time; one the store could
    /// not take is kept in `book` for the next sweep. Returns the first error.
    async fn settle_all(
        &self,
        book: &Mutex<Book>,
        slices: Vec<(HoldKey, Lease)>,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let failed: Vec<(HoldKey, Lease, StoreError)> = futures_util::stream::iter(slices)
            .map(|(key, lease)| async move {
                match self.settle_slice(key, &lease, now).await {
                    Ok(()) => None,
                    Err(e) => Some((key, lease, e)),
                }
            })
            .buffer_unordered(STORE_CALLS_AT_ONCE)
            .filter_map(std::future::ready)
            .collect()
            .await;
        let mut first = None;
        let mut b = book.lock();
        for (key, lease, e) in failed {
            b.unreturned.push((key, lease));
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }

    /// Writes `customer`'s next batch of local records: the one sent before and not
    /// answered, unchanged and under the same number (the store applies a batch once), or
    /// else the records waiting, as a new batch. One batch of a customer is in flight at a
    /// time, so batches reach the store in their order; a call while one is in flight writes
    /// nothing (its records wait for the next).
    async fn write_records(&self, customer: Name, now: Timestamp) -> Result<(), StoreError> {
        let book = self.book(customer);
        let batch = {
            let mut b = book.lock();
            if b.writing {
                return Ok(());
            }
            let batch = match b.unsent.take() {
                Some(batch) => batch,
                None if b.records.is_empty() => return Ok(()),
                None => {
                    b.batches += 1;
                    let id = BatchId {
                        writer: self.replica,
                        seq: b.batches,
                    };
                    (id, Vec::from(std::mem::take(&mut b.records)))
                }
            };
            b.writing = true;
            batch
        };
        // Should this call be dropped mid-way, the batch is kept to be sent again.
        let mut pending = Unsent {
            book: Arc::clone(&book),
            batch: Some(batch),
        };
        let Some((id, records)) = pending.batch.as_ref() else {
            return Ok(());
        };
        let written = self
            .inner
            .usage()
            .record_local(customer, *id, records, now)
            .await;
        if written.is_ok() {
            pending.batch = None;
        }
        written
    }

    /// Places a new slice on `slot` of `customer`, sized from the slot's rate and what the
    /// store had left; the slot's older slices retire.
    async fn acquire(self: Arc<Self>, customer: Name, slot: SlotKey, remaining: u64) {
        let now = self.clock.now();
        let (template, size, old) = {
            let book = self.book(customer);
            let mut b = book.lock();
            let Some(s) = b.slots.get_mut(&slot) else {
                return;
            };
            let largest = s.template.amount.max(1);
            let size = slice_size(
                &self.terms,
                remaining,
                s.rate_per_ttl(now.millis(), self.terms.ttl_ms),
                largest,
            );
            if size == 0 {
                s.acquiring = false;
                return;
            }
            // A current slice with nothing open in it is renewed in one store step: what it
            // spent committed, the rest returned, the next one taken.
            let old = match s.gens.last() {
                Some(g) if !g.retired && g.lease.held == 0 => s.gens.pop(),
                _ => None,
            };
            (s.template.clone(), size, old)
        };
        let plan = Plan {
            customer,
            chain: Vec::new(),
            counters: vec![PlannedCounter {
                amount: size,
                rule: AmountRule::Units,
                ..template
            }],
            usage: Usage::units(size),
            hold_ttl_millis: self.terms.ttl_ms,
            max_settle: crate::core::plan::MAX_EXACT,
            hold_tag: rand::random::<u128>(),
            series: SeriesDraft::default(),
            record: false,
        };
        let placed = match &old {
            Some(g) => match self.inner.renew(g.store, g.lease.spent, &plan, now).await {
                Ok((outcome, r)) => {
                    self.note_return(outcome, &g.lease, now);
                    Ok(r)
                }
                Err(e) => Err(e),
            },
            None => self.inner.reserve(&plan, ReserveMode::Hold, now).await,
        };
        let book = self.book(customer);
        let mut b = book.lock();
        if let (Err(_), Some(g)) = (&placed, old) {
            // Unknown whether the store took it back: tried again (settling a closed hold
            // changes nothing) at the next sweep.
            b.unreturned.push((g.store, g.lease));
        }
        let Some(s) = b.slots.get_mut(&slot) else {
            return;
        };
        s.acquiring = false;
        let Ok(r) = placed else {
            return;
        };
        let (Some(hold), Some(reading)) = (r.hold, r.readings.first()) else {
            return;
        };
        for g in &mut s.gens {
            g.retired = true;
        }
        let mine: u64 = s.gens.iter().map(|g| g.lease.slice).sum::<u64>() + size;
        s.others_used = reading.current_usage.saturating_sub(mine);
        s.store_remaining = reading.remaining;
        let mut lease = Lease::new(size, now.millis(), &self.terms);
        lease.usable_until = lease
            .usable_until
            .min(s.reset_at.millis() - self.terms.skew_ms);
        s.gens.push(Gen {
            lease,
            store: HoldKey {
                customer,
                seq: hold.seq,
                tag: hold.tag,
            },
            retired: false,
        });
        self.counters.placed.fetch_add(1, Ordering::Relaxed);
    }

    /// Notes demand on a leasable counter and returns its slot, created or refreshed (a
    /// changed limit retires the slot's slices).
    fn want_slice<'b>(
        &self,
        b: &'b mut Book,
        c: &PlannedCounter,
        (slot, limit, reset_at): (SlotKey, u64, Timestamp),
        now: i64,
        hold_ttl_ms: i64,
    ) -> &'b mut Slot {
        let ttl = self.terms.ttl_ms;
        let s = b.slots.entry(slot).or_insert_with(|| Slot {
            limit,
            reset_at,
            template: c.clone(),
            gens: Vec::new(),
            acquiring: false,
            recent: 0,
            previous: 0,
            window_start: now,
            last_asked: now,
            others_used: 0,
            store_remaining: limit,
            hold_ttl_ms,
        });
        s.hold_ttl_ms = hold_ttl_ms;
        if s.limit != limit {
            // The limit changed: slices sized for the old one are given back.
            for g in &mut s.gens {
                g.retired = true;
            }
            s.limit = limit;
        }
        s.template = c.clone();
        s.note_demand(c.amount, now, ttl);
        s
    }
}

/// A counter of a decision held inside a slice, with its reading there.
type HeldHere = Option<(LocalPart, Reading)>;

impl Shared {
    /// Holds each of `plan`'s leasable counters inside this replica's slice where one has
    /// room, and enters the local hold (`seq`) before any store call, so a cancel that
    /// overtakes the call finds it. Per counter, its part and reading where held; and the
    /// slots that need a slice (each marked as acquiring), with the counter's index.
    fn hold_in_slices(
        &self,
        b: &mut Book,
        plan: &Plan,
        seq: u64,
        now: Timestamp,
    ) -> (Vec<HeldHere>, Vec<(SlotKey, usize)>) {
        let until = now.millis().saturating_add(plan.hold_ttl_millis);
        let mut local: Vec<HeldHere> = vec![None; plan.counters.len()];
        let mut want = Vec::new();
        for (i, c) in plan.counters.iter().enumerate() {
            let Some(lease) = leasable(c) else {
                continue;
            };
            let slot = lease.0;
            let s = self.want_slice(b, c, lease, now.millis(), plan.hold_ttl_millis);
            let granted = match s.usable(now.millis(), until) {
                Some(g) => {
                    if g.lease.hold(c.amount, now.millis()) {
                        Some(g.store.seq)
                    } else {
                        // Too little room for this request: the slice goes back (once its
                        // holds close) so that what it holds is the store's again.
                        g.retired = true;
                        None
                    }
                }
                None => None,
            };
            match granted {
                Some(slice) => {
                    local[i] = Some((
                        LocalPart {
                            slot,
                            slice,
                            held: c.amount,
                            rule: c.rule.clone(),
                        },
                        s.reading(),
                    ));
                }
                None if !s.acquiring => {
                    s.acquiring = true;
                    want.push((slot, i));
                }
                None => {}
            }
        }
        let parts: Vec<LocalPart> = local.iter().flatten().map(|(p, _)| p.clone()).collect();
        if !parts.is_empty() {
            b.holds.insert(
                plan.hold_tag,
                LocalHold {
                    seq,
                    tag: plan.hold_tag,
                    expires_at: now.plus_millis(plan.hold_ttl_millis),
                    parts,
                    store: None,
                    series: plan.series.clone(),
                    usage: plan.usage,
                    max_settle: plan.max_settle,
                },
            );
        }
        (local, want)
    }
}

/// `plan` cut to the counters at `rest_index`, for the store part of a hold held partly here.
/// Its close may come through another replica, posted before the hold's TTL and applied here
/// at a later sweep: the store part waits that long for it (a hold never closed is committed
/// at its held amount that much later).
fn rest_of(plan: &Plan, rest_index: &[usize]) -> Plan {
    let mut p = plan.clone();
    p.counters = rest_index
        .iter()
        .filter_map(|i| plan.counters.get(*i).cloned())
        .collect();
    p.hold_ttl_millis = p.hold_ttl_millis.saturating_add(RELAY_MARGIN_MS);
    p
}

/// The store counts this replica's slices whole; what they have not spent yet is not usage,
/// so the store's `readings` (of the counters at `rest_index`) leave it out, for answers and
/// alerts alike.
fn leave_out_unspent(b: &Book, plan: &Plan, rest_index: &[usize], readings: &mut [Reading]) {
    for (k, reading) in readings.iter_mut().enumerate() {
        let slot = rest_index
            .get(k)
            .and_then(|i| plan.counters.get(*i))
            .and_then(leasable)
            .and_then(|(slot, _, _)| b.slots.get(&slot));
        if let Some(s) = slot {
            let unspent: u64 = s.gens.iter().map(|g| g.lease.room()).sum();
            reading.current_usage = reading.current_usage.saturating_sub(unspent);
            reading.remaining = reading.usage_limit.saturating_sub(reading.current_usage);
        }
    }
}

/// The `n` readings in the plan's order: each counter's from its slice where it was held
/// here, else the store's next.
fn merged(local: Vec<HeldHere>, store: Vec<Reading>, n: usize) -> Vec<Reading> {
    let mut readings = Vec::with_capacity(n);
    let mut store = store.into_iter();
    for here in local.into_iter().take(n) {
        match here {
            Some((_, reading)) => readings.push(reading),
            None => readings.push(store.next().unwrap_or(Reading {
                usage_limit: 0,
                current_usage: 0,
                remaining: 0,
                reset_at: None,
                fits: false,
                retry_at: None,
            })),
        }
    }
    readings
}

#[async_trait::async_trait]
impl CounterStore for LeasedStore {
    async fn reserve(
        &self,
        plan: &Plan,
        mode: ReserveMode,
        now: Timestamp,
    ) -> Result<Reservation, StoreError> {
        let shared = &self.shared;
        if mode == ReserveMode::DryRun || plan.counters.is_empty() {
            return shared.inner.reserve(plan, mode, now).await;
        }
        let n = plan.counters.len();
        let book = shared.book(plan.customer);
        let seq = LOCAL_BIT
            | (u64::from(shared.replica) << REPLICA_SHIFT)
            | (shared.next_seq.fetch_add(1, Ordering::Relaxed) & 0xFFFF_FFFF);
        let (local, want) = shared.hold_in_slices(&mut book.lock(), plan, seq, now);
        let covered = local.iter().filter(|l| l.is_some()).count();
        let held_here = covered > 0;
        let local_hold_id = || HoldId {
            customer: plan.customer.to_string(),
            seq,
            tag: plan.hold_tag,
        };
        if covered == n {
            shared.counters.local.fetch_add(1, Ordering::Relaxed);
            return Ok(Reservation {
                readings: local.into_iter().flatten().map(|(_, r)| r).collect(),
                blocking: None,
                hold: Some(local_hold_id()),
            });
        }
        // The rest goes to the store, as a plan of the uncovered counters only.
        let rest_index: Vec<usize> = (0..n).filter(|i| local[*i].is_none()).collect();
        let rest;
        let store_plan = if held_here {
            rest = rest_of(plan, &rest_index);
            &rest
        } else {
            plan
        };
        // Should the store call fail or this call be dropped, the slots marked as acquiring
        // are unmarked, so a later decision asks for their slices again.
        let mut pending = Unmark {
            book: Arc::clone(&book),
            slots: want.iter().map(|(slot, _)| *slot).collect(),
        };
        let answer = shared.inner.reserve(store_plan, mode, now).await;
        let rollback = |b: &mut Book| {
            if let Some(h) = b.holds.remove(&plan.hold_tag) {
                b.close_parts(&h.parts, None);
            }
        };
        let mut r = match answer {
            Ok(r) => r,
            Err(e) => {
                if held_here {
                    rollback(&mut book.lock());
                }
                return Err(e);
            }
        };
        // Slices for the counters that had none, sized from what the store has left.
        pending.slots.clear();
        for (slot, i) in want {
            let remaining = rest_index
                .iter()
                .position(|j| *j == i)
                .and_then(|k| r.readings.get(k))
                .map_or(0, |r| r.remaining);
            tokio::spawn(Arc::clone(shared).acquire(plan.customer, slot, remaining));
        }
        leave_out_unspent(&book.lock(), plan, &rest_index, &mut r.readings);
        if !held_here {
            shared.counters.store.fetch_add(1, Ordering::Relaxed);
            return Ok(r);
        }
        let readings = merged(local, r.readings, n);
        let blocking = r.blocking.and_then(|k| rest_index.get(k).copied());
        let mut b = book.lock();
        match (blocking, r.hold) {
            (None, Some(store)) => {
                if let Some(h) = b.holds.get_mut(&plan.hold_tag) {
                    h.store = Some(HoldKey {
                        customer: plan.customer,
                        seq: store.seq,
                        tag: store.tag,
                    });
                }
                shared.counters.partial.fetch_add(1, Ordering::Relaxed);
                Ok(Reservation {
                    readings,
                    blocking: None,
                    hold: Some(local_hold_id()),
                })
            }
            _ => {
                rollback(&mut b);
                Ok(Reservation {
                    readings,
                    blocking,
                    hold: None,
                })
            }
        }
    }

    async fn settle(
        &self,
        hold: HoldKey,
        actual: &Usage,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        if hold.seq & LOCAL_BIT == 0 {
            return self.shared.inner.settle(hold, actual, now).await;
        }
        if let Some(posted) = self.relay_close(hold, Some(*actual), now).await {
            return posted;
        }
        self.close_local(hold, Some(actual), now).await
    }

    async fn renew(
        &self,
        old: HoldKey,
        spent: u64,
        next: &Plan,
        now: Timestamp,
    ) -> Result<(CloseOutcome, Reservation), StoreError> {
        self.shared.inner.renew(old, spent, next, now).await
    }

    async fn release(&self, hold: HoldKey, now: Timestamp) -> Result<CloseOutcome, StoreError> {
        if hold.seq & LOCAL_BIT == 0 {
            return self.shared.inner.release(hold, now).await;
        }
        if let Some(posted) = self.relay_close(hold, None, now).await {
            return posted;
        }
        self.close_local(hold, None, now).await
    }

    async fn cancel(&self, customer: Name, tag: u128, now: Timestamp) -> Result<bool, StoreError> {
        let shared = &self.shared;
        let local = {
            let book = shared.book(customer);
            let mut b = book.lock();
            b.holds.remove(&tag).map(|h| {
                b.close_parts(&h.parts, None);
            })
        };
        // The store part (or a whole store decision) under the same tag.
        let in_store = shared.inner.cancel(customer, tag, now).await?;
        Ok(local.is_some() || in_store)
    }

    async fn expire_due(&self, now: Timestamp) -> Result<usize, StoreError> {
        let expired = self.maintain(now).await;
        let in_store = self.shared.inner.expire_due(now).await?;
        Ok(expired + in_store)
    }

    async fn add_grant(
        &self,
        customer: Name,
        pool: CounterKey,
        grant: GrantBalance,
    ) -> Result<bool, StoreError> {
        self.shared.inner.add_grant(customer, pool, grant).await
    }

    async fn counted(
        &self,
        customer: Name,
        key: CounterKey,
        spec: &CounterSpec,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        let counted = self.shared.inner.counted(customer, key, spec, now).await?;
        let CounterSpec::Quota { index, .. } = spec else {
            return Ok(counted);
        };
        // The store counts this replica's slices whole; what they have not spent is not
        // usage (as in a decision's readings). Other replicas' unspent slices still count
        // until they come back.
        let slot = SlotKey {
            key,
            period: *index,
        };
        let unspent: u64 = self
            .shared
            .books
            .get(&customer)
            .map(|b| {
                b.value()
                    .lock()
                    .slots
                    .get(&slot)
                    .map_or(0, |s| s.gens.iter().map(|g| g.lease.room()).sum::<u64>())
            })
            .unwrap_or(0);
        Ok(counted.map(|c| c.saturating_sub(unspent)))
    }

    async fn record(
        &self,
        plan: &Plan,
        idempotency_key: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.shared.inner.record(plan, idempotency_key, now).await
    }

    async fn auto_entity(
        &self,
        customer: Name,
        id: &str,
        proposed: &StoredEntity,
        max: u32,
        create: bool,
    ) -> Result<AutoEntityOutcome, StoreError> {
        self.shared
            .inner
            .auto_entity(customer, id, proposed, max, create)
            .await
    }

    async fn auto_entity_count(&self, customer: Name) -> Result<usize, StoreError> {
        self.shared.inner.auto_entity_count(customer).await
    }

    fn stats(&self) -> StoreStats {
        self.shared.inner.stats()
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.shared.inner.flush()
    }

    fn admin_log(&self) -> &dyn AdminLog {
        self.shared.inner.admin_log()
    }

    fn hold_relay(&self) -> &dyn HoldRelay {
        self.shared.inner.hold_relay()
    }

    fn usage(&self) -> &dyn UsageStore {
        self.shared.inner.usage()
    }

    fn alerts(&self) -> &dyn AlertStore {
        self.shared.inner.alerts()
    }
}

impl LeasedStore {
    /// Settles or releases a local hold, and the store part of a partly covered one.
    async fn close_local(
        &self,
        hold: HoldKey,
        actual: Option<&Usage>,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        let shared = &self.shared;
        let (store, flush, over) = {
            let book = shared.book(hold.customer);
            let mut b = book.lock();
            let Some(h) = b.holds.get(&hold.tag).filter(|h| h.seq == hold.seq) else {
                return Ok(CloseOutcome::AlreadyClosed);
            };
            if h.expires_at <= now {
                // Past its TTL: expired at its held amount whether or not a sweep ran yet,
                // as the store's own holds are.
                if let Some(h) = b.holds.remove(&hold.tag) {
                    b.expire_hold(&h, h.expires_at, &shared.counters.dropped);
                }
                return Ok(CloseOutcome::AlreadyClosed);
            }
            if let Some(u) = actual
                && u.largest_figure() > h.max_settle
            {
                return Err(StoreError::SettleTooLarge {
                    hold: hold.to_string(),
                    actual: u.largest_figure(),
                    max: h.max_settle,
                });
            }
            let Some(h) = b.holds.remove(&hold.tag) else {
                return Ok(CloseOutcome::AlreadyClosed);
            };
            let over = b.close_parts(&h.parts, actual);
            if h.store.is_none() {
                let (kind, measures) = match actual {
                    Some(u) => (RecordKind::Settled, Measures::of_call(u.units, u.tokens, 0)),
                    None => (RecordKind::Released, Measures::of_call(0, None, 0)),
                };
                b.push_record(
                    LocalRecord {
                        kind,
                        at: now,
                        series: h.series,
                        measures,
                        seq: h.seq,
                        tag: hold.tag,
                    },
                    &shared.counters.dropped,
                );
            }
            let flush = b.records.len() >= FLUSH_AT;
            (h.store, flush, over)
        };
        if let Err(e) = shared.charge_over(hold, &over, now).await {
            // The usage happened and the local hold is closed: what it spent past its slice
            // waits for the store rather than being lost (the settlement itself stands).
            tracing::warn!(%hold, error = %e, "usage past a slice kept until the store answers");
            shared.book(hold.customer).lock().keep_over(hold, over);
        }
        if flush {
            let shared = Arc::clone(shared);
            let customer = hold.customer;
            tokio::spawn(async move {
                // A failure keeps them for the sweep's next try.
                let _ = shared.write_records(customer, now).await;
            });
        }
        if let Some(store) = store
            && let Err(e) = shared.close_store_part(store, actual.copied(), now).await
        {
            // The local part is closed and the settlement stands: the store part is closed
            // at a later sweep, at this usage and as of now.
            tracing::warn!(%hold, error = %e, "store part of a hold closed once the store answers");
            shared
                .book(hold.customer)
                .lock()
                .unclosed
                .push((store, actual.copied(), now));
        }
        Ok(CloseOutcome::Closed)
    }

    /// Posts the close of a local hold another replica granted for that replica, which
    /// applies it at its next sweep; `None` when the hold is this replica's own.
    async fn relay_close(
        &self,
        hold: HoldKey,
        actual: Option<Usage>,
        now: Timestamp,
    ) -> Option<Result<CloseOutcome, StoreError>> {
        let shared = &self.shared;
        let replica = replica_of(hold.seq);
        if replica == shared.replica {
            return None;
        }
        let close = PostedClose {
            seq: hold.seq,
            tag: hold.tag,
            actual,
            at: now.millis(),
        };
        // A local hold ends before its slice's TTL does, so past that nothing can apply it.
        let posted = shared
            .inner
            .hold_relay()
            .post(hold.customer, replica, close, shared.terms.ttl_ms)
            .await;
        Some(posted.map(|added| {
            if added {
                CloseOutcome::Closed
            } else {
                CloseOutcome::AlreadyClosed
            }
        }))
    }

    /// Applies the closes other replicas posted for this one (at the time each arrived), then
    /// forgets them. A customer whose closes could not be read or forgotten is tried again at
    /// the next sweep; applying one twice changes nothing (the hold is gone after the first).
    async fn apply_relayed(&self) {
        let shared = &self.shared;
        let relay = shared.inner.hold_relay();
        let mut customers = std::mem::take(&mut *shared.relay_retry.lock());
        match relay.customers(shared.replica).await {
            Ok(more) => customers.extend(more),
            Err(e) => {
                // The index may have been taken by a call that ran unanswered: every customer
                // with a local hold open (the only ones a close can be posted for) is read.
                tracing::debug!(error = %e, "the relay's index not read: reading every customer with open holds");
                customers.extend(
                    shared
                        .all_books()
                        .into_iter()
                        .filter(|(_, b)| !b.lock().holds.is_empty())
                        .map(|(c, _)| c),
                );
            }
        }
        customers.sort_unstable_by_key(|c| c.as_str().to_string());
        customers.dedup();
        for customer in customers {
            let applied = match relay.posted(customer, shared.replica).await {
                Ok(closes) => closes,
                Err(_) => {
                    shared.relay_retry.lock().push(customer);
                    continue;
                }
            };
            futures_util::stream::iter(&applied)
                .for_each_concurrent(STORE_CALLS_AT_ONCE, |c| async move {
                    let hold = HoldKey {
                        customer,
                        seq: c.seq,
                        tag: c.tag,
                    };
                    let at = Timestamp::from_millis(c.at);
                    if let Err(e) = self.close_local(hold, c.actual.as_ref(), at).await {
                        // A settlement over the hold's bound: refused as it would have been
                        // here.
                        tracing::warn!(%hold, error = %e, "a close posted by another replica was refused");
                    }
                })
                .await;
            if relay
                .forget(customer, shared.replica, &applied)
                .await
                .is_err()
            {
                shared.relay_retry.lock().push(customer);
            }
        }
    }

    /// The sweep's part: expires local holds at their held amount, returns slices that are
    /// retired, idle or near their end, places the next slice of busy counters, and writes
    /// pending records. Returns how many local holds expired. Failures are left for the next
    /// sweep (a slice the store could not take back stays held there until its TTL).
    async fn maintain(&self, now: Timestamp) -> usize {
        let shared = &self.shared;
        let t = shared.terms;
        let mut expired = 0;
        // Before expiring anything: a close that arrived elsewhere before its hold's TTL
        // closes the hold, however late this sweep reads it.
        self.apply_relayed().await;
        for (customer, book) in shared.all_books() {
            let mut renew = Vec::new();
            let settles = {
                let mut b = book.lock();
                let mut settles = std::mem::take(&mut b.unreturned);
                let due: Vec<u128> = b
                    .holds
                    .iter()
                    .filter(|(_, h)| h.expires_at <= now)
                    .map(|(tag, _)| *tag)
                    .collect();
                for tag in due {
                    if let Some(h) = b.holds.remove(&tag) {
                        b.expire_hold(&h, h.expires_at, &shared.counters.dropped);
                        expired += 1;
                    }
                }
                let ms = now.millis();
                for (key, s) in &mut b.slots {
                    let idle = ms - s.last_asked > IDLE_MS;
                    for g in &mut s.gens {
                        // Past the last moment a hold can start in it (one that would end
                        // before its return margin): it takes nothing more, so it goes back
                        // as soon as its holds close rather than at its end.
                        if idle || ms + RETURN_MARGIN_MS + s.hold_ttl_ms >= g.lease.usable_until {
                            g.retired = true;
                        }
                    }
                    // Busy, and its current slice low or past half of the window in which it
                    // takes new holds (holds that end before its return margin): the next one.
                    let current = s.gens.iter().rev().find(|g| !g.retired);
                    let window = t.ttl_ms - t.skew_ms - RETURN_MARGIN_MS - s.hold_ttl_ms;
                    let due_next = match current {
                        Some(g) => {
                            g.lease.usable_until - RETURN_MARGIN_MS - s.hold_ttl_ms - ms
                                < window / 2
                                || g.lease.room() < s.rate_per_ttl(ms, t.ttl_ms) / 4
                        }
                        None => true,
                    };
                    if !idle && due_next && !s.acquiring && s.recent > 0 {
                        s.acquiring = true;
                        let returning: u64 = current.map_or(0, |g| g.lease.room());
                        renew.push((*key, s.store_remaining.saturating_add(returning)));
                    }
                    let (done, keep): (Vec<Gen>, Vec<Gen>) = s
                        .gens
                        .drain(..)
                        .partition(|g| g.retired && g.lease.held == 0);
                    s.gens = keep;
                    // What they spent is the store's committed usage from now on.
                    s.others_used += done.iter().map(|g| g.lease.spent).sum::<u64>();
                    settles.extend(done.into_iter().map(|g| (g.store, g.lease)));
                }
                // A slot whose placement is in flight stays, or the slice would be placed for
                // nobody.
                b.slots.retain(|_, s| {
                    s.acquiring || !s.gens.is_empty() || ms - s.last_asked <= t.ttl_ms
                });
                settles
            };
            // Spent-out and idle slices go back first, so a placement's reading counts what
            // they spent rather than their whole size. (A busy counter's current slice goes
            // back in its successor's placement when nothing is open in it, else at a later
            // sweep: never a moment without one.) A failure is kept for the next sweep.
            let _ = shared.charge_kept(&book, now).await;
            let _ = shared.close_kept(&book).await;
            let _ = shared.settle_all(&book, settles, now).await;
            futures_util::stream::iter(renew)
                .for_each_concurrent(STORE_CALLS_AT_ONCE, |(slot, remaining)| {
                    Arc::clone(shared).acquire(customer, slot, remaining)
                })
                .await;
            let _ = shared.write_records(customer, now).await;
        }
        expired
    }
}
