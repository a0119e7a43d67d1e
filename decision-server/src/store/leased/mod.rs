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
use crate::core::usage::{StreamEnd, Usage};
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

mod book;
mod store;
mod sweep;

use book::*;

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
