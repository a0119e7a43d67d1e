//! The in-memory counter store: one ledger per customer, each behind its own lock.

use std::sync::Arc;

use dashmap::DashMap;
use parking_lot::Mutex;
use rustc_hash::FxBuildHasher;

use super::{
    CloseOutcome, CounterStore, CustomerRef, Reservation, ReserveMode, StoreError, StoreStats,
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
#[derive(Debug, Default)]
pub struct MemoryStore {
    customers: DashMap<Sym, Arc<Mutex<Ledger>>, FxBuildHasher>,
    retention: KeyRetention,
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

    fn ledger(&self, customer: Sym) -> Arc<Mutex<Ledger>> {
        if let Some(l) = self.customers.get(&customer) {
            return Arc::clone(l.value());
        }
        Arc::clone(self.customers.entry(customer).or_default().value())
    }

    /// Every customer's ledger, collected first so that no customer lock is ever awaited while
    /// a map shard is held.
    fn all_ledgers(&self) -> Vec<Arc<Mutex<Ledger>>> {
        self.customers
            .iter()
            .map(|e| Arc::clone(e.value()))
            .collect()
    }

    fn existing(&self, customer: Sym) -> Option<Arc<Mutex<Ledger>>> {
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
        let mut ledger = ledger.lock();
        match ledger.close(hold.seq, how, now) {
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
        let mut ledger = ledger.lock();
        Ok(ledger.reserve(plan, mode == ReserveMode::Hold, now))
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
        let ledgers = self.all_ledgers();
        Ok(ledgers
            .iter()
            .map(|l| {
                let mut l = l.lock();
                if l.next_expiry().is_some_and(|at| at <= now) {
                    l.expire_due(now)
                } else {
                    0
                }
            })
            .sum())
    }

    fn add_grant(
        &self,
        customer: CustomerRef<'_>,
        pool: CounterKey,
        grant: GrantBalance,
    ) -> Result<bool, StoreError> {
        Ok(self.ledger(customer.sym).lock().add_grant(pool, grant))
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
            .and_then(|l| l.lock().counted(key, spec, now)))
    }

    fn record(
        &self,
        customer: CustomerRef<'_>,
        plan: &Plan,
        idempotency_key: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let ledger = self.ledger(customer.sym);
        let mut ledger = ledger.lock();
        Ok(ledger.record(plan, idempotency_key, self.retention, now))
    }

    fn stats(&self) -> StoreStats {
        let mut stats = StoreStats {
            customers: self.customers.len(),
            ..StoreStats::default()
        };
        let ledgers = self.all_ledgers();
        for l in ledgers {
            let l = l.lock();
            stats.counters += l.counter_count();
            stats.holds_open += l.open_holds();
        }
        stats
    }
}
