//! The counter-store trait: where counters, holds and credit pools live. One implementation
//! per backend; every one runs the same arithmetic from `core::counter`.

pub mod durable;
pub mod memory;
pub mod redis;

pub use self::redis::{RedisSettings, RedisStore, RedisTarget};
pub use durable::{Durability, DurableStore};
pub use memory::MemoryStore;

pub use crate::core::ledger::{AutoEntityOutcome, Reservation, StoredEntity};

use crate::core::counter::CounterKey;
use crate::core::credits::GrantBalance;
use crate::core::plan::{Plan, Usage};
use crate::core::{HoldId, Sym, Timestamp};

/// A customer as stores see it: the interned symbol for in-process maps and the id for
/// anything keyed by text (a Redis `{customerId}` hash tag, a log line).
#[derive(Debug, Clone, Copy)]
pub struct CustomerRef<'a> {
    pub sym: Sym,
    pub id: &'a str,
}

/// Whether `reserve` places holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveMode {
    Hold,
    /// Read every counter and answer as a real check would; change nothing.
    DryRun,
}

/// How an attempt to close a hold went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseOutcome {
    /// This call closed it.
    Closed,
    /// It had already been settled, released or expired; nothing changed.
    AlreadyClosed,
}

/// Sizes, for metrics and memory accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    pub customers: usize,
    pub counters: usize,
    pub holds_open: usize,
    /// Calls to a networked store that failed (unreachable, timed out), since start.
    pub backend_failures: u64,
    /// Calls refused at once because the circuit breaker was open, since start.
    pub breaker_rejections: u64,
    /// Holds released because their decision's caller was gone (or the store's answer was
    /// lost), since start.
    pub abandoned_released: u64,
}

/// What can go wrong in a store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("hold `{0}` does not exist")]
    UnknownHold(String),
    #[error(
        "hold `{hold}` cannot be settled at {actual} units: a settlement of this hold may report at most {max} (set the feature's `maxSettleUsage` for more); nothing changed"
    )]
    SettleTooLarge { hold: String, actual: u64, max: u64 },
    #[error("counter store unavailable: {0}")]
    Unavailable(String),
    #[error("the admin changes were changed by another replica (now at revision {0})")]
    AdminMoved(u64),
}

/// The admin changes a store keeps: opaque encoded entries, in order, and the revision they
/// are at (a store shared by replicas counts every save; others may start from 0).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminChanges {
    pub revision: u64,
    pub entries: Vec<Vec<u8>>,
}

/// Counters, holds and credit pools, atomic per customer.
///
/// Invariant: every counter one call touches belongs to one customer, so an implementation
/// needs atomicity per customer only: a lock per customer in memory, a Lua script on one hash
/// slot (`{customerId}` key tags) in Redis, a transaction in an embedded database.
///
/// Trade-off: the calls are async (boxed futures, one allocation each) so that a networked
/// store never parks a runtime thread; the in-process stores finish their work on the first
/// poll and only a durable store in sync mode awaits anything (its commit).
#[async_trait::async_trait]
pub trait CounterStore: Send + Sync + std::fmt::Debug {
    /// Reads every counter of `plan`; if every enforcing one fits, holds `amount` on all of
    /// them, in one atomic step. A denial or a dry run changes nothing.
    async fn reserve(
        &self,
        customer: CustomerRef<'_>,
        plan: &Plan,
        mode: ReserveMode,
        now: Timestamp,
    ) -> Result<Reservation, StoreError>;

    /// Corrects every counter of a hold by `actual - held` and closes it. Idempotent.
    async fn settle(
        &self,
        customer: CustomerRef<'_>,
        hold: &HoldId,
        actual: &Usage,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError>;

    /// Undoes a hold entirely. Idempotent.
    async fn release(
        &self,
        customer: CustomerRef<'_>,
        hold: &HoldId,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError>;

    /// Releases the hold a `reserve` with this tag placed, or (a store whose calls can arrive
    /// late: Redis) makes sure one arriving later places nothing. For decisions whose caller
    /// gave up (timed out, went away) before the answer: an abandoned call is never charged.
    /// Returns whether a hold was released.
    async fn cancel(
        &self,
        customer: CustomerRef<'_>,
        tag: u128,
        now: Timestamp,
    ) -> Result<bool, StoreError>;

    /// Commits every hold whose TTL has passed at its held amount. Returns how many.
    async fn expire_due(&self, now: Timestamp) -> Result<usize, StoreError>;

    /// Adds a grant to a credit pool, creating the pool. Idempotent by grant id: returns
    /// `false` if the grant was already there.
    async fn add_grant(
        &self,
        customer: CustomerRef<'_>,
        pool: CounterKey,
        grant: GrantBalance,
    ) -> Result<bool, StoreError>;

    /// The units a counter counts now (see `core::counter::counted`), or `None` if it has no
    /// state. For inspection and invariants, not for decisions.
    async fn counted(
        &self,
        customer: CustomerRef<'_>,
        key: CounterKey,
        spec: &crate::core::counter::CounterSpec,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError>;

    /// Records usage that was never gated on every counter of `plan`, unless `idempotency_key`
    /// was already recorded for this customer (see `KeyRetention`). Returns whether it was.
    async fn record(
        &self,
        customer: CustomerRef<'_>,
        plan: &Plan,
        idempotency_key: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError>;

    /// Finds the entity `id` created on the fly for this customer, or (if `create` is set and
    /// the customer has fewer than `max`) creates it as `proposed`, in one atomic step: the
    /// entities and their cap live where the counters do, so they survive restarts with them
    /// and replicas sharing a store share one set.
    async fn auto_entity(
        &self,
        customer: CustomerRef<'_>,
        id: &str,
        proposed: &StoredEntity,
        max: u32,
        create: bool,
    ) -> Result<AutoEntityOutcome, StoreError>;

    /// How many entities were created on the fly for this customer.
    async fn auto_entity_count(&self, customer: CustomerRef<'_>) -> Result<usize, StoreError>;

    /// Sizes as this process knows them (a shared store reports what this replica last saw).
    fn stats(&self) -> StoreStats;

    /// Returns once every change made so far is stored (a no-op for stores that keep nothing).
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Replaces the kept list of admin changes if it is still at revision `base`, and returns
    /// the new revision; [`StoreError::AdminMoved`] if another replica saved since. Stores that
    /// keep nothing across restarts keep nothing.
    async fn save_admin_changes(&self, _entries: &[Vec<u8>], base: u64) -> Result<u64, StoreError> {
        Ok(base + 1)
    }

    /// The admin changes kept by [`CounterStore::save_admin_changes`].
    async fn admin_changes(&self) -> Result<AdminChanges, StoreError> {
        Ok(AdminChanges::default())
    }

    /// For a store that several replicas share: the kept admin changes' revision, which moves
    /// when any replica saves. `None` when only this process changes them.
    async fn admin_revision(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
}

/// How far a store's commits have got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commit {
    /// Every commit up to this number is stored.
    pub upto: u64,
    /// Set once a commit failed; nothing is stored after it.
    pub failed: Option<String>,
}

impl Commit {
    /// Waits until commit `ticket` is stored.
    pub async fn reached(
        rx: &mut tokio::sync::watch::Receiver<Commit>,
        ticket: u64,
    ) -> Result<(), StoreError> {
        let c = rx
            .wait_for(|c| c.upto >= ticket || c.failed.is_some())
            .await
            .map_err(|_| StoreError::Unavailable("the store's writer has stopped".into()))?;
        match &c.failed {
            Some(why) => Err(StoreError::Unavailable(why.clone())),
            None => Ok(()),
        }
    }
}

/// Where a journaled store reports each ledger change: the durable store's writer.
pub(crate) trait Journal: Send + Sync + std::fmt::Debug {
    /// Called under the customer's lock after a call changed its ledger. Queues the customer
    /// for the next commit unless it already waits in one (`queued`), and returns the commit
    /// to wait for (see [`Journal::sync_commits`]). The writer reads the ledger's changes itself, at
    /// commit time, under the same lock.
    fn changed(
        &self,
        customer: crate::core::Sym,
        book: &memory::SharedBook,
        queued: &mut Option<u64>,
    ) -> Result<u64, StoreError>;
    /// In sync mode, the committed mark to await a commit on; `None` when calls need not
    /// wait for their commit (batched mode).
    fn sync_commits(&self) -> Option<tokio::sync::watch::Receiver<Commit>>;
}
