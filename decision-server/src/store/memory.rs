//! The in-memory counter store: one ledger per customer, each behind its own lock, optionally
//! journaled (the durable store is this store with a journal: see `durable.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use parking_lot::{Mutex, RwLock};
use rustc_hash::FxBuildHasher;

use super::events::{EventBody, EventLog, EventPage};
use super::{
    AdminLog, AlertStore, AutoEntityOutcome, CloseOutcome, CounterStore, HoldKey, NothingKept,
    Reservation, ReserveMode, StoreError, StoreStats, StoredEntity, UsageStore,
};
use crate::clock::Clock as _;
use crate::core::alerts::Delivery;
use crate::core::counter::{CounterKey, CounterSpec, Inspection};
use crate::core::credits::GrantBalance;
use crate::core::ledger::{CloseResult, Closing, KeyRetention, Ledger};
use crate::core::plan::Plan;
use crate::core::rollup::{BucketScan, Granularity, LocalRecord, RecordSettings, ScanNeeds};
use crate::core::usage::{StreamEnd, Usage};
use crate::core::{Name, Sym, Timestamp};

/// One customer's ledger and, in a journaled store, the commit it waits in.
#[derive(Debug, Default)]
pub(crate) struct Book {
    pub(crate) ledger: Ledger,
    /// The journal commit that will store this ledger's pending changes, once queued.
    pub(crate) queued: Option<u64>,
}

pub(crate) type SharedBook = Arc<Mutex<Book>>;

/// Where a journaled store reports each ledger change: the durable store's writer.
#[async_trait::async_trait]
pub(crate) trait Journal: Send + Sync + std::fmt::Debug {
    /// Called under the customer's lock after a call changed its ledger. Queues the customer
    /// for the next commit unless it already waits in one (`queued`), and returns the commit
    /// that will hold the change. The writer reads the ledger's changes itself, at commit time,
    /// under the same lock.
    fn changed(
        &self,
        customer: Sym,
        book: &SharedBook,
        queued: &mut Option<u64>,
    ) -> Result<u64, StoreError>;

    /// Whether a call must wait for its commit before it answers (sync durability).
    fn waits(&self) -> bool;

    /// Returns once commit `ticket` is stored (or the store has failed).
    async fn committed(&self, ticket: u64) -> Result<(), StoreError>;

    /// Returns once every change queued so far is stored.
    fn flush(&self) -> Result<(), StoreError>;

    /// Where the journal keeps the admin changes.
    fn admin_log(&self) -> &dyn AdminLog;

    /// Called under the customer's lock with the stream events a call made, numbered; they
    /// are stored with the customer's next commit.
    fn events(&self, customer: Sym, events: Vec<(u64, (Timestamp, Arc<EventBody>))>);
}

/// Counters in process memory. Lost on restart unless journaled; the default for tests and
/// the base the durable store builds on.
///
/// Trade-off: the map hands out an `Arc` per customer and the decision runs under that
/// customer's own mutex, so the map's shard lock is held only for the lookup. Two customers
/// never wait on each other; one hot customer serialises on its own lock, which is the
/// atomicity a decision needs anyway.
#[derive(Debug)]
pub struct MemoryStore {
    customers: DashMap<Sym, SharedBook, FxBuildHasher>,
    retention: KeyRetention,
    /// How usage records are kept; set by the engine with each model.
    records: RwLock<RecordSettings>,
    /// The usage stream: every record, numbered.
    events: EventLog,
    /// Where every ledger change goes, when the store is durable.
    journal: Option<Arc<dyn Journal>>,
    /// Holds released by `cancel`, since start.
    abandoned: AtomicU64,
    /// Closes of leased holds waiting for the leased store that granted them.
    relay: super::InProcessRelay,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            customers: DashMap::default(),
            retention: KeyRetention::default(),
            records: RwLock::new(RecordSettings::default()),
            events: EventLog::new(0, crate::clock::SystemClock.now()),
            journal: None,
            abandoned: AtomicU64::new(0),
            relay: super::InProcessRelay::default(),
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The usage stream's log.
    pub(crate) fn events(&self) -> &EventLog {
        &self.events
    }

    /// This store, remembering ingest idempotency keys as `retention` says (durable stores
    /// too: `DurableStore::open(..)?.with_key_retention(..)`).
    #[must_use]
    pub fn with_key_retention(mut self, retention: KeyRetention) -> Self {
        self.retention = retention;
        self
    }

    /// A journaled store over restored ledgers: each change is reported to `journal` under
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
            journal: Some(journal),
            ..Self::default()
        }
    }

    /// The customer's book, made if it has none yet.
    fn book(&self, customer: Sym) -> SharedBook {
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
    /// customer for the next commit. Returns the commit to await, if any (see
    /// [`MemoryStore::committed`]); the lock is released before anyone waits, so other
    /// decisions of this customer join the same commit.
    fn write_now<R>(
        &self,
        customer: Sym,
        book: &SharedBook,
        f: impl FnOnce(&mut Ledger) -> R,
    ) -> Result<(R, Option<u64>), StoreError> {
        let records = *self.records.read();
        let mut b = book.lock();
        b.ledger.configure(records);
        let out = f(&mut b.ledger);
        let made = b.ledger.take_records();
        let alerts = b.ledger.take_alerts();
        if !made.is_empty() || !alerts.is_empty() {
            // Numbered under the customer's lock, so one customer's events are in the order
            // its calls ran.
            let bodies: Vec<_> = made
                .into_iter()
                .map(|r| (r.at, Arc::new(EventBody::Record(r))))
                .chain(
                    alerts
                        .into_iter()
                        .map(|(at, a)| (at, Arc::new(EventBody::Alert(a)))),
                )
                .collect();
            let last = bodies.iter().map(|(at, _)| *at).max().unwrap_or_default();
            // The journal shares the bodies (a copy of the Arcs, only when there is one).
            let journaled = self.journal.as_ref().map(|j| (j, bodies.clone()));
            let ids = self.events.push(Name::from(customer), bodies, last);
            if let Some((journal, bodies)) = journaled {
                journal.events(customer, ids.into_iter().zip(bodies).collect());
            }
        }
        let Some(journal) = &self.journal else {
            return Ok((out, None));
        };
        let ticket = if b.ledger.has_changes() {
            Some(journal.changed(customer, book, &mut b.queued)?)
        } else {
            None
        };
        Ok((out, ticket))
    }

    /// Returns once commit `ticket` is as durable as the store promises: at once unless the
    /// store is durable in sync mode.
    async fn committed(&self, ticket: Option<u64>) -> Result<(), StoreError> {
        match (ticket, &self.journal) {
            (Some(t), Some(journal)) if journal.waits() => journal.committed(t).await,
            _ => Ok(()),
        }
    }

    /// [`MemoryStore::write_now`], then waits for its commit.
    async fn write<R>(
        &self,
        customer: Sym,
        book: &SharedBook,
        f: impl FnOnce(&mut Ledger) -> R,
    ) -> Result<R, StoreError> {
        let (out, ticket) = self.write_now(customer, book, f)?;
        self.committed(ticket).await?;
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

    async fn close(
        &self,
        hold: HoldKey,
        how: Closing<'_>,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        let unknown = || StoreError::UnknownHold(hold.to_string());
        let sym = hold.customer.sym();
        let book = self.existing(sym).ok_or_else(unknown)?;
        let result = self
            .write(sym, &book, |l| l.close(hold.seq, hold.tag, how, now))
            .await?;
        close_outcome(hold, how, result)
    }
}

/// A ledger's close result as the store trait answers it.
pub(crate) fn close_outcome(
    hold: HoldKey,
    how: Closing<'_>,
    result: CloseResult,
) -> Result<CloseOutcome, StoreError> {
    match result {
        CloseResult::Closed => Ok(CloseOutcome::Closed),
        CloseResult::AlreadyClosed => Ok(CloseOutcome::AlreadyClosed),
        CloseResult::Unknown => Err(StoreError::UnknownHold(hold.to_string())),
        CloseResult::TooLarge { max } => Err(StoreError::SettleTooLarge {
            hold: hold.to_string(),
            actual: match how {
                Closing::Settle(u, _) => u.largest_figure(),
                Closing::Release => 0,
            },
            max,
        }),
    }
}

#[async_trait::async_trait]
impl CounterStore for MemoryStore {
    async fn reserve(
        &self,
        plan: &Plan,
        mode: ReserveMode,
        now: Timestamp,
    ) -> Result<Reservation, StoreError> {
        let sym = plan.customer.sym();
        let book = self.book(sym);
        self.write(sym, &book, |l| l.reserve(plan, mode, now)).await
    }

    async fn settle_ended(
        &self,
        hold: HoldKey,
        actual: &Usage,
        end: Option<StreamEnd>,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        self.close(hold, Closing::Settle(actual, end), now).await
    }

    async fn renew(
        &self,
        old: HoldKey,
        spent: u64,
        next: &Plan,
        now: Timestamp,
    ) -> Result<(CloseOutcome, Reservation), StoreError> {
        let sym = next.customer.sym();
        let book = self.book(sym);
        let spent = Usage::units(spent);
        let how = Closing::Settle(&spent, None);
        let (closed, reservation) = self
            .write(sym, &book, |l| {
                let closed = l.close(old.seq, old.tag, how, now);
                (closed, l.reserve(next, ReserveMode::Hold, now))
            })
            .await?;
        // The old slice gone already (expired, or a store that lost it) is no reason to lose
        // the new one, which is placed either way.
        let outcome = match closed {
            CloseResult::Unknown => CloseOutcome::AlreadyClosed,
            other => close_outcome(old, how, other)?,
        };
        Ok((outcome, reservation))
    }

    async fn release(&self, hold: HoldKey, now: Timestamp) -> Result<CloseOutcome, StoreError> {
        self.close(hold, Closing::Release, now).await
    }

    async fn cancel(&self, customer: Name, tag: u128, now: Timestamp) -> Result<bool, StoreError> {
        // A reserve here is done by the time its call returns, so there is nothing that could
        // arrive later: only the hold itself needs releasing.
        let sym = customer.sym();
        let Some(book) = self.existing(sym) else {
            return Ok(false);
        };
        let released = self.write(sym, &book, |l| l.cancel(tag, now)).await?;
        if released {
            self.abandoned.fetch_add(1, Ordering::Relaxed);
        }
        Ok(released)
    }

    async fn expire_due(&self, now: Timestamp) -> Result<usize, StoreError> {
        // Every customer's expiry first, then one wait for the newest commit they joined.
        let mut expired = 0;
        let mut last = None;
        for (sym, book) in self.all_entries() {
            if book.lock().ledger.next_expiry().is_none_or(|at| at > now) {
                continue;
            }
            let (n, ticket) = self.write_now(sym, &book, |l| l.expire_due(now))?;
            expired += n;
            last = last.max(ticket);
        }
        self.committed(last).await?;
        Ok(expired)
    }

    async fn add_grant(
        &self,
        customer: Name,
        pool: CounterKey,
        grant: GrantBalance,
    ) -> Result<bool, StoreError> {
        let sym = customer.sym();
        let book = self.book(sym);
        self.write(sym, &book, |l| l.add_grant(pool, grant)).await
    }

    async fn inspect(
        &self,
        customer: Name,
        key: CounterKey,
        spec: &CounterSpec,
        now: Timestamp,
    ) -> Result<Option<Inspection>, StoreError> {
        Ok(self
            .existing(customer.sym())
            .and_then(|l| l.lock().ledger.inspect(key, spec, now)))
    }

    async fn record(
        &self,
        plan: &Plan,
        idempotency_key: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let sym = plan.customer.sym();
        let book = self.book(sym);
        let retention = self.retention;
        self.write(sym, &book, |l| {
            l.record(plan, idempotency_key, retention, now)
        })
        .await
    }

    async fn auto_entity(
        &self,
        customer: Name,
        id: &str,
        proposed: &StoredEntity,
        max: u32,
        create: bool,
    ) -> Result<AutoEntityOutcome, StoreError> {
        let sym = customer.sym();
        let book = self.book(sym);
        self.write(sym, &book, |l| l.auto_entity(id, proposed, max, create))
            .await
    }

    async fn auto_entity_count(&self, customer: Name) -> Result<usize, StoreError> {
        Ok(self
            .existing(customer.sym())
            .map_or(0, |l| l.lock().ledger.auto_entity_count()))
    }

    async fn auto_entities(
        &self,
        customer: Name,
    ) -> Result<Vec<(String, StoredEntity)>, StoreError> {
        Ok(self
            .existing(customer.sym())
            .map(|l| l.lock().ledger.auto_entities())
            .unwrap_or_default())
    }

    fn stats(&self) -> StoreStats {
        let mut stats = StoreStats {
            customers: self.customers.len(),
            abandoned_released: self.abandoned.load(Ordering::Relaxed),
            ..StoreStats::default()
        };
        for (_, l) in self.all_entries() {
            let b = l.lock();
            stats.counters += b.ledger.counter_count();
            stats.holds_open += b.ledger.open_holds();
            let (folded, series) = b.ledger.rollups().counts();
            stats.values_folded += folded;
            stats.usage_series += series;
        }
        stats
    }

    fn flush(&self) -> Result<(), StoreError> {
        match &self.journal {
            Some(j) => j.flush(),
            None => Ok(()),
        }
    }

    fn admin_log(&self) -> &dyn AdminLog {
        match &self.journal {
            Some(j) => j.admin_log(),
            None => &NothingKept,
        }
    }

    fn hold_relay(&self) -> &dyn super::HoldRelay {
        &self.relay
    }

    fn usage(&self) -> &dyn UsageStore {
        self
    }

    fn alerts(&self) -> &dyn AlertStore {
        self
    }
}

#[async_trait::async_trait]
impl UsageStore for MemoryStore {
    async fn record_local(
        &self,
        customer: Name,
        batch: super::BatchId,
        records: &[LocalRecord],
        _now: Timestamp,
    ) -> Result<(), StoreError> {
        let sym = customer.sym();
        let book = self.book(sym);
        self.write(sym, &book, |l| {
            l.record_local(batch.writer, batch.seq, records)
        })
        .await
    }

    fn configure_records(&self, settings: RecordSettings) {
        *self.records.write() = settings;
    }

    async fn usage_buckets(
        &self,
        customer: Name,
        g: Granularity,
        from: i64,
        to: i64,
        _needs: &ScanNeeds,
    ) -> Result<BucketScan, StoreError> {
        Ok(self
            .existing(customer.sym())
            .map(|b| b.lock().ledger.rollups().scan(g, from, to))
            .unwrap_or_default())
    }

    async fn read_events(
        &self,
        customer: Option<Name>,
        after: Option<&str>,
        max: usize,
    ) -> Result<EventPage, StoreError> {
        let after = match after {
            Some(text) => Some(text.parse::<u64>().map_err(|_| {
                StoreError::BadCursor(format!("`{text}` is not an event id of this stream"))
            })?),
            None => None,
        };
        Ok(self.events.read(customer, after, max))
    }

    fn event_signal(&self) -> tokio::sync::watch::Receiver<u64> {
        self.events.subscribe()
    }
}

#[async_trait::async_trait]
impl AlertStore for MemoryStore {
    async fn claim_alert(
        &self,
        customer: Name,
        key: &str,
        until: Option<i64>,
        body: &str,
        deliveries: &[Delivery],
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let sym = customer.sym();
        let book = self.book(sym);
        self.write(sym, &book, |l| {
            l.claim_alert(key, until, body.to_string(), deliveries.to_vec(), now)
        })
        .await
    }

    async fn enqueue_deliveries(
        &self,
        customer: Name,
        deliveries: &[Delivery],
    ) -> Result<(), StoreError> {
        let sym = customer.sym();
        let book = self.book(sym);
        self.write(sym, &book, |l| l.alerts_mut().enqueue(deliveries.to_vec()))
            .await
    }

    async fn lease_deliveries(
        &self,
        customer: Name,
        lessee: &str,
        now: Timestamp,
        lease_ms: i64,
        max: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        let sym = customer.sym();
        let book = self.book(sym);
        self.write(sym, &book, |l| {
            l.alerts_mut().lease(lessee, now, lease_ms, max)
        })
        .await
    }

    async fn finish_delivery(
        &self,
        customer: Name,
        _lessee: &str,
        delivery: &Delivery,
    ) -> Result<(), StoreError> {
        let sym = customer.sym();
        let book = self.book(sym);
        self.write(sym, &book, |l| l.alerts_mut().finish(delivery.clone()))
            .await
    }

    async fn deliveries(&self, customer: Name, max: usize) -> Result<Vec<Delivery>, StoreError> {
        Ok(self
            .existing(customer.sym())
            .map(|b| b.lock().ledger.alerts().deliveries(max))
            .unwrap_or_default())
    }

    async fn rearm_alert(&self, customer: Name, key: &str) -> Result<bool, StoreError> {
        let sym = customer.sym();
        let book = self.book(sym);
        self.write(sym, &book, |l| l.alerts_mut().rearm(key)).await
    }
}
