//! The counter-store trait: where counters, holds and credit pools live. One implementation
//! per backend; every one runs the same arithmetic from `core::counter`.

pub mod durable;
pub mod events;
pub mod leased;
pub mod memory;
pub mod redis;

pub use self::redis::{RedisSettings, RedisStore, RedisTarget};
pub use durable::{Durability, DurableStore};
pub use leased::{LeaseStats, LeasedStore};
pub use memory::MemoryStore;

pub use crate::core::ledger::{AutoEntityOutcome, Reservation, ReserveMode, StoredEntity};

use crate::core::alerts::Delivery;
use crate::core::counter::CounterKey;
use crate::core::credits::GrantBalance;
use crate::core::plan::Plan;
use crate::core::rollup::{BucketScan, Granularity, LocalRecord, RecordSettings, ScanNeeds};
use crate::core::usage::{StreamEnd, Usage};
use crate::core::{Name, Timestamp};
use events::EventPage;

/// A hold as stores see it: its customer (interned, so its symbol keys in-process maps and its
/// text a Redis `{customerId}` hash tag), its number and its tag. Written as the hold id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldKey {
    pub customer: Name,
    pub seq: u64,
    pub tag: u128,
}

impl std::fmt::Display for HoldKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{:032x}", self.customer, self.seq, self.tag)
    }
}

/// A batch of local records: its writer (a leased store's replica number) and its number,
/// counting up per writer and customer. A writer sends one batch of a customer at a time and
/// sends a batch again, unchanged, until it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchId {
    pub writer: u32,
    pub seq: u64,
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
    /// Connections to a Redis Cluster replaced after every call failed for a while, since start.
    pub connections_replaced: u64,
    /// Holds released because their decision's caller was gone (or the store's answer was
    /// lost), since start.
    pub abandoned_released: u64,
    /// Decisions where a store's second arithmetic (the Redis script) and the core disagreed,
    /// since start. Always 0 unless there is a bug.
    pub script_disagreements: u64,
    /// Dimension values recorded as `__other__` because their customer had the most distinct
    /// values, since start (in-process stores).
    pub values_folded: u64,
    /// Usage series (distinct feature, chain and dimension values) kept (in-process stores).
    pub usage_series: usize,
    /// Usage buckets a networked store read, by how, since start.
    pub bucket_reads: BucketReads,
}

/// How a networked store read usage buckets (store/redis/scan.rs), since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BucketReads {
    /// Answered from a sealed copy in one fetch.
    pub sealed: u64,
    /// Read whole, field by field.
    pub scanned: u64,
    /// Only the fields of the series the index named for a filter.
    pub indexed: u64,
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
    #[error("bad stream cursor: {0}")]
    BadCursor(String),
    /// A customer's usage reads took more than their budget; the message says when to retry.
    #[error("{0}")]
    ReadBudget(String),
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
/// slot (`{customerId}` key tags) in Redis, a transaction in an embedded database. The customer
/// reaches a store once per call: in the plan, in the hold, or as the `customer` argument.
///
/// Trade-off: the calls are async (boxed futures, one allocation each) so that a networked
/// store never parks a runtime thread; the in-process stores finish their work on the first
/// poll and only a durable store in sync mode awaits anything (its commit).
#[async_trait::async_trait]
pub trait CounterStore: Send + Sync + std::fmt::Debug {
    /// Reads every counter of `plan` (of `plan.customer`); if every enforcing one fits, holds
    /// `amount` on all of them, in one atomic step. A denial or a dry run changes nothing.
    async fn reserve(
        &self,
        plan: &Plan,
        mode: ReserveMode,
        now: Timestamp,
    ) -> Result<Reservation, StoreError>;

    /// Corrects every counter of a hold by `actual - held` and closes it. Idempotent.
    async fn settle(
        &self,
        hold: HoldKey,
        actual: &Usage,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        self.settle_ended(hold, actual, None, now).await
    }

    /// [`CounterStore::settle`], and a streamed call's `end` (when the gateway cut it or let
    /// it run past a refusal) set on its usage record as [`StreamEnd::attribute`] names.
    async fn settle_ended(
        &self,
        hold: HoldKey,
        actual: &Usage,
        end: Option<StreamEnd>,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError>;

    /// Settles hold `old` at `spent` units and, in the same atomic step, reserves `next` (of
    /// the same customer): a replica's lease renewal, which commits what a slice spent,
    /// returns the rest and takes the next slice with nothing in between. The settlement
    /// happens whatever the reservation answers.
    async fn renew(
        &self,
        old: HoldKey,
        spent: u64,
        next: &Plan,
        now: Timestamp,
    ) -> Result<(CloseOutcome, Reservation), StoreError>;

    /// Undoes a hold entirely. Idempotent.
    async fn release(&self, hold: HoldKey, now: Timestamp) -> Result<CloseOutcome, StoreError>;

    /// Releases the hold a `reserve` with this tag placed, or (a store whose calls can arrive
    /// late: Redis) makes sure one arriving later places nothing. For decisions whose caller
    /// gave up (timed out, went away) before the answer: an abandoned call is never charged.
    /// Returns whether a hold was released.
    async fn cancel(&self, customer: Name, tag: u128, now: Timestamp) -> Result<bool, StoreError>;

    /// Commits every hold whose TTL has passed at its held amount. Returns how many.
    async fn expire_due(&self, now: Timestamp) -> Result<usize, StoreError>;

    /// Adds a grant to a credit pool, creating the pool. Idempotent by grant id: returns
    /// `false` if the grant was already there.
    async fn add_grant(
        &self,
        customer: Name,
        pool: CounterKey,
        grant: GrantBalance,
    ) -> Result<bool, StoreError>;

    /// A counter as it reads now (see `core::counter::inspect`), or `None` if it has no state.
    /// For inspection and invariants, not for decisions.
    async fn inspect(
        &self,
        customer: Name,
        key: CounterKey,
        spec: &crate::core::counter::CounterSpec,
        now: Timestamp,
    ) -> Result<Option<crate::core::counter::Inspection>, StoreError>;

    /// The units a counter counts now (see `core::counter::counted`), or `None` if it has no
    /// state. For inspection and invariants, not for decisions.
    async fn counted(
        &self,
        customer: Name,
        key: CounterKey,
        spec: &crate::core::counter::CounterSpec,
        now: Timestamp,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self
            .inspect(customer, key, spec, now)
            .await?
            .map(|r| r.used))
    }

    /// Records usage that was never gated on every counter of `plan`, unless `idempotency_key`
    /// was already recorded for this customer (see `KeyRetention`). Returns whether it was.
    async fn record(
        &self,
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
        customer: Name,
        id: &str,
        proposed: &StoredEntity,
        max: u32,
        create: bool,
    ) -> Result<AutoEntityOutcome, StoreError>;

    /// How many entities were created on the fly for this customer.
    async fn auto_entity_count(&self, customer: Name) -> Result<usize, StoreError>;

    /// Every entity created on the fly for this customer, in no order: at most the customer's
    /// `maxAutoEntities`, so the list is bounded. The portal's tree, search and budgets read
    /// them here, where every replica sharing the store sees the same set.
    async fn auto_entities(
        &self,
        customer: Name,
    ) -> Result<Vec<(String, StoredEntity)>, StoreError>;

    /// Sizes as this process knows them (a shared store reports what this replica last saw).
    fn stats(&self) -> StoreStats;

    /// Returns once every change made so far is stored (a no-op for stores that keep nothing).
    fn flush(&self) -> Result<(), StoreError>;

    /// Where this store keeps the admin changes made through the API.
    fn admin_log(&self) -> &dyn AdminLog;

    /// Where closes of escrow-lease holds wait for the replica that granted them.
    fn hold_relay(&self) -> &dyn HoldRelay;

    /// Where this store keeps usage records and the usage stream, and reads them.
    fn usage(&self) -> &dyn UsageStore;

    /// Where this store keeps alert claims and the webhook outbox.
    fn alerts(&self) -> &dyn AlertStore;
}

/// Usage records and their reads: what a replica decided inside its leases, the rollup
/// buckets, the usage stream. Reached through [`CounterStore::usage`].
#[async_trait::async_trait]
pub trait UsageStore: Send + Sync {
    /// Writes the usage records of decisions a replica made inside its leases, in one call per
    /// customer: each as the store would have recorded it at its own time. No counter changes
    /// (the leases' holds carry the units). A batch is written once: a store that may run a
    /// call whose answer was lost (Redis) skips a batch at or below the last one `batch`'s
    /// writer had applied for this customer.
    async fn record_local(
        &self,
        customer: Name,
        batch: BatchId,
        records: &[LocalRecord],
        now: Timestamp,
    ) -> Result<(), StoreError>;

    /// Sets how usage records are kept (the engine calls it with each model in force).
    fn configure_records(&self, settings: RecordSettings);

    /// `customer`'s rollup buckets of size `g` starting in `[from, to)` (ms), with at least
    /// what `needs` asks (see [`ScanNeeds`]).
    async fn usage_buckets(
        &self,
        customer: Name,
        g: Granularity,
        from: i64,
        to: i64,
        needs: &ScanNeeds,
    ) -> Result<BucketScan, StoreError>;

    /// Up to `max` events of the usage stream after cursor `after` (an event id this store
    /// gave), of `customer` only or of every customer, oldest first.
    async fn read_events(
        &self,
        customer: Option<Name>,
        after: Option<&str>,
        max: usize,
    ) -> Result<EventPage, StoreError>;

    /// Changes whenever this process adds events (a shared store's other replicas add events
    /// too: readers also poll).
    fn event_signal(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// Alert claims and the webhook outbox: one firing per crossing, one delivery per lease.
/// Reached through [`CounterStore::alerts`].
#[async_trait::async_trait]
pub trait AlertStore: Send + Sync {
    /// Claims alert threshold `key` of `customer` until `until` (ms; `None`: until re-armed)
    /// and appends `body` to the customer's usage stream, in one atomic step; whether this
    /// call claimed it (`false`: claimed already and still held, nothing appended). One
    /// crossing therefore fires once, whichever replica sees it first.
    /// The alert's webhook `deliveries` join the outbox in the same step.
    async fn claim_alert(
        &self,
        customer: Name,
        key: &str,
        until: Option<i64>,
        body: &str,
        deliveries: &[Delivery],
        now: Timestamp,
    ) -> Result<bool, StoreError>;

    /// Adds webhook deliveries to `customer`'s outbox (a test delivery).
    async fn enqueue_deliveries(
        &self,
        customer: Name,
        deliveries: &[Delivery],
    ) -> Result<(), StoreError>;

    /// Up to `max` of `customer`'s deliveries for `lessee` at `now`, each leased for
    /// `lease_ms` (its next attempt moved past the lease, so no other lessee takes it
    /// meanwhile): first those `lessee` leased and has not finished, then those due
    /// ([`crate::core::alerts::AlertBook::lease`]). A lessee is one process's deliverer.
    async fn lease_deliveries(
        &self,
        customer: Name,
        lessee: &str,
        now: Timestamp,
        lease_ms: i64,
        max: usize,
    ) -> Result<Vec<Delivery>, StoreError>;

    /// Stores a delivery after an attempt: its attempts, its next time (`None`: finished),
    /// and ends `lessee`'s lease of it.
    async fn finish_delivery(
        &self,
        customer: Name,
        lessee: &str,
        delivery: &Delivery,
    ) -> Result<(), StoreError>;

    /// `customer`'s delivery log, newest first, at most `max`.
    async fn deliveries(&self, customer: Name, max: usize) -> Result<Vec<Delivery>, StoreError>;

    /// Drops the claim on alert threshold `key`, so it can fire again; whether there was one.
    async fn rearm_alert(&self, customer: Name, key: &str) -> Result<bool, StoreError>;
}

/// The admin changes made through the API, kept with a revision. A job of its own: a store
/// that keeps counters keeps these too, and must say how.
#[async_trait::async_trait]
pub trait AdminLog: Send + Sync {
    /// Replaces the kept list if it is still at revision `base`, and returns the new revision;
    /// [`StoreError::AdminMoved`] if another replica saved since.
    async fn save(&self, entries: &[Vec<u8>], base: u64) -> Result<u64, StoreError>;

    /// The kept list and its revision.
    async fn load(&self) -> Result<AdminChanges, StoreError>;

    /// For a log several replicas share: its revision, which moves when any replica saves.
    /// `None` when only this process changes it.
    async fn revision(&self) -> Result<Option<u64>, StoreError>;
}

/// The admin log of a store that keeps nothing across restarts (the in-memory store): every
/// save succeeds and nothing is ever read back. Written out, not defaulted, so that a new
/// backend has to decide.
#[derive(Debug, Default, Clone, Copy)]
pub struct NothingKept;

#[async_trait::async_trait]
impl AdminLog for NothingKept {
    async fn save(&self, _entries: &[Vec<u8>], base: u64) -> Result<u64, StoreError> {
        Ok(base + 1)
    }

    async fn load(&self) -> Result<AdminChanges, StoreError> {
        Ok(AdminChanges::default())
    }

    async fn revision(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
}

/// A close of a hold that reached another replica than the one that granted it: the hold, the
/// usage it is settled at (`None`: released), and when the close arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PostedClose {
    pub seq: u64,
    pub tag: u128,
    pub actual: Option<Usage>,
    pub at: i64,
    /// How a streamed call ended, for its record. Absent in closes posted before it existed.
    #[serde(default)]
    pub end: Option<StreamEnd>,
}

/// Closes waiting for the replica that granted their holds (escrow leases decide inside a
/// replica's own slices, so only that replica's book holds a local hold). A job of its own,
/// reached as [`AdminLog`] is: a store several replicas share keeps them where every replica
/// reaches them.
///
/// Invariant: a hold has at most one posted close, the first: a retried or repeated close
/// posts nothing new, so a close is applied once however often it is sent.
#[async_trait::async_trait]
pub trait HoldRelay: Send + Sync {
    /// Posts `close` of a hold of `customer` for replica `replica`, kept `keep_ms` (past it
    /// the hold has expired anyway). False when one was posted for that hold already.
    async fn post(
        &self,
        customer: Name,
        replica: u32,
        close: PostedClose,
        keep_ms: i64,
    ) -> Result<bool, StoreError>;

    /// The customers with closes posted for `replica`; each is read with
    /// [`HoldRelay::posted`] next. A shared store may forget the list as it answers (a close
    /// posted after that names its customer again); one that keeps it answers it again.
    async fn customers(&self, replica: u32) -> Result<Vec<Name>, StoreError>;

    /// The closes posted for `replica` on `customer`'s holds.
    async fn posted(&self, customer: Name, replica: u32) -> Result<Vec<PostedClose>, StoreError>;

    /// Forgets closes that were applied (by their holds' numbers and tags).
    async fn forget(
        &self,
        customer: Name,
        replica: u32,
        applied: &[PostedClose],
    ) -> Result<(), StoreError>;
}

/// The hold relay of a store that lives in one process: replicas are leased stores over the
/// same store object (tests, simulations), so a map is where they all look.
#[derive(Debug, Default)]
pub struct InProcessRelay {
    posted: dashmap::DashMap<(Name, u32), Vec<PostedClose>>,
}

#[async_trait::async_trait]
impl HoldRelay for InProcessRelay {
    async fn post(
        &self,
        customer: Name,
        replica: u32,
        close: PostedClose,
        _keep_ms: i64,
    ) -> Result<bool, StoreError> {
        let mut list = self.posted.entry((customer, replica)).or_default();
        if list
            .iter()
            .any(|c| c.seq == close.seq && c.tag == close.tag)
        {
            return Ok(false);
        }
        list.push(close);
        Ok(true)
    }

    async fn customers(&self, replica: u32) -> Result<Vec<Name>, StoreError> {
        Ok(self
            .posted
            .iter()
            .filter(|e| e.key().1 == replica && !e.value().is_empty())
            .map(|e| e.key().0)
            .collect())
    }

    async fn posted(&self, customer: Name, replica: u32) -> Result<Vec<PostedClose>, StoreError> {
        Ok(self
            .posted
            .get(&(customer, replica))
            .map(|l| l.clone())
            .unwrap_or_default())
    }

    async fn forget(
        &self,
        customer: Name,
        replica: u32,
        applied: &[PostedClose],
    ) -> Result<(), StoreError> {
        if let Some(mut list) = self.posted.get_mut(&(customer, replica)) {
            list.retain(|c| !applied.iter().any(|a| a.seq == c.seq && a.tag == c.tag));
        }
        self.posted
            .remove_if(&(customer, replica), |_, l| l.is_empty());
        Ok(())
    }
}
