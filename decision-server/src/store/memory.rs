//! The in-memory counter store: one ledger per customer, each behind its own lock, optionally
//! journaled (the durable store is this store plus a journal).

use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;
use rustc_hash::FxBuildHasher;

use super::{
    CloseOutcome, CounterStore, CustomerRef, Journal, Reservation, ReserveMode, StoreError,
    StoreStats,
};
use crate::core::counter::{CounterKey, CounterSpec};
use crate::core::credits::GrantBalance;
use crate::core::ledger::{Closing, KeyRetention, Ledger};
use crate::core::plan::{Plan, Usage};
use crate::core::{HoldId, Sym, Timestamp};

/// Counters in process memory. Lost on restart; the default for tests and the base the
/// durable store builds on.
///
/// Trade-off: the map hands out an `Arc` per customer and the decision runs under that
/// customer's own mutex, so the map's shard lock is held only for the lookup. Two customers
/// never wait on each other; one hot customer serialises on its own lock, which is the
/// atomicity a decision needs anyway.
/// One customer's ledger and, in a journaled store, the commit it waits in.
#[derive(Debug, Default)]
pub(crate) struct Book {
    pub(crate) ledger: Ledger,
    /// The journal commit that will store this ledger's pending changes, once queued.
    pub(crate) queued: Option<u64>,
}

pub(crate) type SharedBook = Arc<Mutex<Book>>;

#[derive(Debug, Default)]
pub struct MemoryStore {
    customers: DashMap<Sym, SharedBook, FxBuildHasher>,
    retention: KeyRetention,
    /// Where every ledger change goes, when the store is durable.
    journal: Option<Arc<dyn Journal>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that remembers ingest idempotency keys as `retention` says.
    pub fn with_key_retention(retention: KeyRetention) -> Self {
        Self {
            retention,
            ..Self::default()
        }
    }

    /// A journaled store over restored ledgers: each change is appended to `journal` under
    /// its customer's lock (so the journal sees one customer's changes in order), and the call
    /// returns once the journal says it may.
    pub(crate) fn journaled(
        journal: Arc<dyn Journal>,
        ledgers: impl IntoIterator<Item = (Sym, Ledger)>,
    ) -> Self {
        Self {
            customers: ledgers
                .into_iter()
                .map(|(sym, ledger)| {
                    (
                        sym,
                        Arc::new(Mutex::new(Book {
                            ledger,
                            queued: None,
                        })),
                    )
                })
                .collect(),
            retention: KeyRetention::default(),
            journal: Some(journal),
        }
    }

    fn ledger(&self, customer: Sym) -> SharedBook {
        if let Some(l) = self.customers.get(&customer) {
            return Arc::clone(l.value());
        }
        let fresh = || {
            Arc::new(Mutex::new(Book {
                ledger: if self.journal.is_some() {
                    Ledger::tracked()
                } else {
                    Ledger::default()
                },
                queued: None,
            }))
        };
        Arc::clone(self.customers.entry(customer).or_insert_with(fresh).value())
    }

    /// Runs `f` on the customer's ledger under its lock; a journaled store then queues the
    /// customer for the next commit and, if the journal says so, waits for that commit.
    fn write<R>(
        &self,
        customer: CustomerRef<'_>,
        book: &SharedBook,
        f: impl FnOnce(&mut Ledger) -> R,
    ) -> Result<R, StoreError> {
        let Some(journal) = &self.journal else {
            return Ok(f(&mut book.lock().ledger));
        };
        let (out, ticket) = {
            let mut b = book.lock();
            let out = f(&mut b.ledger);
            let ticket = if b.ledger.has_changes() {
                Some(journal.changed(customer.sym, book, &mut b.queued)?)
            } else {
                None
            };
            (out, ticket)
        };
        // Waited for outside the lock: other decisions of this customer join the same commit.
        // An async caller defers the wait and awaits the commit itself.
        if let Some(t) = ticket
            && !super::defer(t)
        {
            journal.wait(t)?;
        }
        Ok(out)
    }

    /// Every customer with its ledger, collected first so that no customer lock is ever
    /// awaited while a map shard is held.
    fn all_entries(&self) -> Vec<(Sym, SharedBook)> {
        self.customers
            .iter()
            .map(|e| (*e.key(), Arc::clone(e.value())))
            .collect()
    }

    fn existing(&self, customer: Sym) -> Option<SharedBook> {
        self.customers.get(&customer).map(|l| Arc::clone(l.value()))
    }

    fn close(
        &self,
        customer: CustomerRef<'_>,
        hold: &HoldId,
        how: Closing<'_>,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        let unknown = || StoreError::UnknownHold(hold.to_string());
        let ledger = self.existing(customer.sym).ok_or_else(unknown)?;
        match self.write(customer, &ledger, |l| l.close(hold.seq, how, now))? {
            Some(true) => Ok(CloseOutcome::Closed),
            Some(false) => Ok(CloseOutcome::AlreadyClosed),
            None => Err(unknown()),
        }
    }
}

impl CounterStore for MemoryStore {
    fn reserve(
        &self,
        customer: CustomerRef<'_>,
        plan: &Plan,
        mode: ReserveMode,
        now: Timestamp,
    ) -> Result<Reservation, StoreError> {
        let ledger = self.ledger(customer.sym);
        self.write(customer, &ledger, |l| {
            l.reserve(plan, mode == ReserveMode::Hold, now)
        })
    }

    fn settle(
        &self,
        customer: CustomerRef<'_>,
        hold: &HoldId,
        actual: &Usage,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        self.close(customer, hold, Closing::Settle(actual), now)
    }

    fn release(
        &self,
        customer: CustomerRef<'_>,
        hold: &HoldId,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        self.close(customer, hold, Closing::Release, now)
    }

    fn expire_due(&self, now: Timestamp) -> Result<usize, StoreError> {
        let mut expired = 0;
        for entry in self.all_entries() {
            let (sym, ledger) = entry;
            if ledger.lock().ledger.next_expiry().is_none_or(|at| at > now) {
                continue;
            }
            let id = crate::core::symbols::Symbols.resolve(sym);
            let customer = CustomerRef { sym, id };
            expired += self.write(customer, &ledger, |l| l.expire_due(now))?;
        }
        Ok(expired)
    }

    fn add_grant(
        &self,
        customer: CustomerRef<'_>,
        pool: CounterKey,
        grant: GrantBalance,
    ) -> Result<bool, StoreError> {
        let ledger = self.ledger(customer.sym);
        self.write(customer, &ledger, |l| l.add_grant(pool, grant))
    }

    fn counted(
        &self,
        customer: CustomerRef<'_>,
        key: CounterKey,
        spec: &CounterSpec,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self
            .existing(customer.sym)
            .and_then(|l| l.lock().ledger.counted(key, spec, now)))
    }

    fn record(
        &self,
        customer: CustomerRef<'_>,
        plan: &Plan,
        idempotency_key: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let ledger = self.ledger(customer.sym);
        let retention = self.retention;
        self.write(customer, &ledger, |l| {
            l.record(plan, idempotency_key, retention, now)
        })
    }

    fn stats(&self) -> StoreStats {
        let mut stats = StoreStats {
            customers: self.customers.len(),
            ..StoreStats::default()
        };
        for (_, l) in self.all_entries() {
            let b = l.lock();
            stats.counters += b.ledger.counter_count();
            stats.holds_open += b.ledger.open_holds();
        }
        stats
    }
}
