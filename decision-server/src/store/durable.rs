//! The durable embedded store: the in-memory ledgers, with every change written to a redb file
//! by one group-committing writer thread, and the ledgers rebuilt from that file on open.
//!
//! A decision only marks its customer as changed (under the customer's lock, as part of the
//! decision); the writer takes each marked ledger's changes itself at commit time. Trade-off:
//! the decision path does no encoding and no copying, and a customer decided on a thousand
//! times between commits is read once; the cost is that the writer briefly takes each changed
//! customer's lock once per commit.
//!
//! The file holds the ledgers' rows, updated in place: one row per counter, per open hold, per
//! remembered idempotency key, and a next-hold-number per customer. Trade-off: rows updated in
//! place rather than an event log with snapshots, because redb is already a copy-on-write
//! B-tree with atomic commits, so its file is the snapshot and a restart reads only live rows;
//! the cost is a rewrite of each touched counter per commit, which group commit amortises
//! (a hot counter touched a thousand times between commits is written once).
//!
//! Under the customer's lock, a call that changed something queues the customer for the open
//! commit (once per commit) and gets that commit's number. The writer waits for a queued
//! customer (then for `commitIntervalMs` in batched mode), closes the open commit, takes each
//! queued ledger's changes under its lock, keeps only the last write of each row and commits
//! one redb transaction. In sync mode a call is answered only after its commit: it awaits the
//! commit number on a watch channel, so no runtime thread is held and every decision in flight
//! shares the next commit; batches (`CloseHolds`, ingest) join their calls' futures, so they
//! share one commit too. Invariant: a change is in the commit whose number its call got, because
//! the writer clears a ledger's "queued" mark under the same lock it takes the changes under.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::{Condvar, Mutex};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::events::{EventBody, StreamRetention};
use super::memory::{Journal, MemoryStore, SharedBook};
use super::{AdminChanges, AdminLog, StoreError, StoredEntity};
use crate::core::alerts::Delivery;
use crate::core::counter::{CounterKey, CounterState};
use crate::core::ledger::{Changes, Hold, HoldRecord, Ledger};
use crate::core::rollup::{BucketKey, Granularity, Measures, Rollups, SeriesKey};
use crate::core::symbols::Symbols;
use crate::core::{Sym, Timestamp};

/// Counter rows: (customer, counter key) → counter state.
const COUNTERS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("counters");
/// Open holds: (customer, hold number) → hold.
const HOLDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("holds");
/// Per customer: the next hold number.
const NEXT_SEQ: TableDefinition<&str, u64> = TableDefinition::new("next_seq");
/// Remembered idempotency keys: (customer, key) → when it was seen.
const KEYS: TableDefinition<&[u8], i64> = TableDefinition::new("idempotency_keys");
/// Alert claims: (customer, key) → until when (ms; -1 until re-armed).
const ALERT_CLAIMS: TableDefinition<&[u8], i64> = TableDefinition::new("alert_claims");
/// Webhook deliveries (outbox and log): (customer, id) → the delivery, postcard.
const DELIVERIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("deliveries");
/// Entities created on the fly: (customer, entity id) → type and parent.
const ENTITIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("auto_entities");
/// Admin changes made through the API, in order: position → encoded change.
const ADMIN: TableDefinition<u64, &[u8]> = TableDefinition::new("admin_changes");
/// Usage series: (customer, series id) → series key.
const SERIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("usage_series");
/// Usage rollups: (customer, bucket size, bucket start, series id) → measures.
const BUCKETS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("usage_buckets");
/// The attribution of open holds: (customer, hold number) → series and held usage. Apart
/// from the holds so that files written before usage records existed still read.
const HOLD_RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("hold_records");
/// The usage stream: event id → (customer, time, body).
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("usage_events");

/// A stream event waiting for the next commit: id, customer, time, body.
type JournalEvent = (u64, Sym, Timestamp, Arc<EventBody>);
/// A stream event read back from the file.
type KeptEvent = (u64, crate::core::Name, Timestamp, Arc<EventBody>);

/// A bucket row's key after the customer: size, start, series id, in an order that sorts by
/// size then time.
fn bucket_key(customer: &str, g: Granularity, start: i64, id: u32) -> Vec<u8> {
    let mut rest = Vec::with_capacity(13);
    rest.push(g as u8);
    rest.extend_from_slice(&(start ^ i64::MIN).to_be_bytes());
    rest.extend_from_slice(&id.to_be_bytes());
    row_key(customer, &rest)
}

/// What [`bucket_key`] wrote after the customer, read back.
fn read_bucket_key(k: &[u8]) -> Option<BucketKey> {
    let g = k.first().and_then(|b| granularity_of(*b))?;
    let start = k
        .get(1..9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|b| i64::from_be_bytes(b) ^ i64::MIN)?;
    let id = k
        .get(9..13)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)?;
    Some((g, start, id))
}

fn granularity_of(b: u8) -> Option<Granularity> {
    Granularity::ALL.into_iter().find(|g| *g as u8 == b)
}

/// When a decision counts as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Changes are committed together every `interval`; a crash loses at most that window.
    Batched { interval: Duration },
    /// A call returns only after its change is committed. Calls that arrive while a commit
    /// runs share the next one.
    Sync,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open the store file {path}: {source}")]
    Open {
        path: PathBuf,
        source: Box<redb::Error>,
    },
    #[error("the store file {path} is unreadable: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("cannot start the store's writer thread: {0}")]
    Thread(std::io::Error),
}

/// The durable store: the in-memory store with this module's journal. `DurableStore::open`
/// returns that [`MemoryStore`]; dropping it commits what is queued and stops the writer.
#[derive(Debug, Clone, Copy)]
pub struct DurableStore;

/// The journal behind a durable store: the file, the commit log and the writer thread.
#[derive(Debug)]
struct FileJournal {
    /// Shared with the writer thread; admin changes are written directly (they are rare).
    db: Arc<Database>,
    log: Arc<Log>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// A key prefixed by its customer's id (length-prefixed, so any id is safe).
fn row_key(customer: &str, rest: &[u8]) -> Vec<u8> {
    let id = customer.as_bytes();
    let len = u16::try_from(id.len()).unwrap_or(u16::MAX);
    let mut k = Vec::with_capacity(2 + id.len() + rest.len());
    k.extend_from_slice(&len.to_be_bytes());
    k.extend_from_slice(&id[..usize::from(len)]);
    k.extend_from_slice(rest);
    k
}

fn split_key(k: &[u8]) -> Option<(&str, &[u8])> {
    let len = usize::from(u16::from_be_bytes([*k.first()?, *k.get(1)?]));
    let id = std::str::from_utf8(k.get(2..2 + len)?).ok()?;
    Some((id, k.get(2 + len..)?))
}

/// One customer's changes, taken by the writer.
#[derive(Debug)]
struct Entry {
    customer: String,
    changes: Changes,
}

/// How far the commits have got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Commit {
    /// Every commit up to this one is stored.
    upto: u64,
    /// Set when a commit failed: the store refuses work from then on.
    failed: Option<String>,
}

impl Commit {
    /// Whether commit `ticket` is settled: stored (`Ok`), or never will be (`Err`).
    fn outcome(&self, ticket: u64) -> Option<Result<(), StoreError>> {
        match &self.failed {
            Some(why) => Some(Err(StoreError::Unavailable(why.clone()))),
            None => (self.upto >= ticket).then_some(Ok(())),
        }
    }
}

/// Customers with changes waiting for the next commit.
#[derive(Debug)]
struct Pending {
    /// The commit that customers queued now will be stored in.
    open: u64,
    list: Vec<(Sym, SharedBook)>,
    closed: bool,
}

#[derive(Debug)]
struct Log {
    durability: Durability,
    /// The committed mark for async waiters ([`Journal::committed`]).
    watch: tokio::sync::watch::Sender<Commit>,
    pending: Mutex<Pending>,
    /// Wakes the writer when the first customer is queued.
    wake: Condvar,
    failed: AtomicBool,
    /// The committed mark for blocking waiters ([`Journal::flush`]).
    committed: Mutex<Commit>,
    done: Condvar,
    /// Stream events waiting for the next commit. Taken after the ledgers' changes, so a
    /// commit holds the events of every change it holds (and perhaps a few of the next).
    events: Mutex<Vec<JournalEvent>>,
    retention: StreamRetention,
}

#[async_trait::async_trait]
impl Journal for FileJournal {
    fn changed(
        &self,
        customer: Sym,
        book: &SharedBook,
        queued: &mut Option<u64>,
    ) -> Result<u64, StoreError> {
        self.log.changed(customer, book, queued)
    }

    fn waits(&self) -> bool {
        self.log.durability == Durability::Sync
    }

    async fn committed(&self, ticket: u64) -> Result<(), StoreError> {
        let mut rx = self.log.watch.subscribe();
        let c = rx
            .wait_for(|c| c.outcome(ticket).is_some())
            .await
            .map_err(|_| StoreError::Unavailable("the store's writer has stopped".into()))?;
        c.outcome(ticket).unwrap_or(Ok(()))
    }

    fn flush(&self) -> Result<(), StoreError> {
        let last = {
            let p = self.log.pending.lock();
            if p.list.is_empty() {
                p.open - 1
            } else {
                p.open
            }
        };
        self.log.wait_committed(last)
    }

    fn admin_log(&self) -> &dyn AdminLog {
        self
    }

    fn events(&self, customer: Sym, events: Vec<(u64, (Timestamp, Arc<EventBody>))>) {
        let mut pending = self.log.events.lock();
        pending.extend(
            events
                .into_iter()
                .map(|(id, (at, body))| (id, customer, at, body)),
        );
    }
}

impl Log {
    fn changed(
        &self,
        customer: Sym,
        book: &SharedBook,
        queued: &mut Option<u64>,
    ) -> Result<u64, StoreError> {
        if self.failed.load(Ordering::Acquire) {
            let why = self.committed.lock().failed.clone().unwrap_or_default();
            return Err(StoreError::Unavailable(why));
        }
        // Already queued: the writer has not taken this ledger's changes yet (it clears
        // `queued` when it does, under the same lock), so this call's change goes with them.
        if let Some(commit) = *queued {
            return Ok(commit);
        }
        let mut p = self.pending.lock();
        if p.closed {
            return Err(StoreError::Unavailable("the store is closed".into()));
        }
        p.list.push((customer, Arc::clone(book)));
        *queued = Some(p.open);
        if p.list.len() == 1 {
            self.wake.notify_one();
        }
        Ok(p.open)
    }

    fn wait_committed(&self, ticket: u64) -> Result<(), StoreError> {
        let mut c = self.committed.lock();
        loop {
            if let Some(outcome) = c.outcome(ticket) {
                return outcome;
            }
            self.done.wait(&mut c);
        }
    }
}

/// A batch's rows with only the last write of each kept, and nothing encoded until then: a
/// counter touched a thousand times between commits is encoded and written once, and a hold
/// opened and closed in between not at all.
#[derive(Debug, Default)]
struct Batch<'a> {
    counters: HashMap<(&'a str, CounterKey), &'a CounterState>,
    /// `None`: delete.
    holds: HashMap<(&'a str, u64), Option<&'a Hold>>,
    keys: HashMap<(&'a str, &'a str), Option<Timestamp>>,
    /// `None`: delete.
    alerts: HashMap<(&'a str, &'a str), Option<Option<i64>>>,
    /// `None`: delete.
    deliveries: HashMap<(&'a str, &'a str), Option<&'a Delivery>>,
    next_seq: HashMap<&'a str, u64>,
    entities: HashMap<(&'a str, &'a str), &'a StoredEntity>,
    series: HashMap<(&'a str, u32), &'a SeriesKey>,
    buckets: HashMap<(&'a str, BucketKey), Measures>,
    dropped: Vec<(&'a str, Granularity, i64)>,
}

impl<'a> Batch<'a> {
    fn add(&mut self, e: &'a Entry) {
        let c = &e.changes;
        let customer = e.customer.as_str();
        // Closes first, then opens: a hold number is never reused, so a hold in both lists was
        // opened and closed between two commits (it is not in `opened`, which lists open ones).
        for seq in &c.closed {
            self.holds.insert((customer, *seq), None);
        }

        for (key, state) in &c.counters {
            self.counters.insert((customer, *key), state);
        }
        for (seq, hold) in &c.opened {
            self.holds.insert((customer, *seq), Some(hold));
        }
        for (k, at) in &c.keys {
            self.keys.insert((customer, k), *at);
        }
        for (k, until) in &c.alerts {
            self.alerts.insert((customer, k), *until);
        }
        for (k, d) in &c.deliveries {
            self.deliveries.insert((customer, k), d.as_ref());
        }
        for (id, e) in &c.entities {
            self.entities.insert((customer, id), e);
        }
        self.next_seq.insert(customer, c.next_seq);
        for (id, key) in &c.rollups.series {
            self.series.insert((customer, *id), key);
        }
        for (g, start) in &c.rollups.dropped {
            self.buckets
                .retain(|(cu, (bg, bs, _)), _| !(*cu == customer && bg == g && bs == start));
            self.dropped.push((customer, *g, *start));
        }
        for (key, m) in &c.rollups.buckets {
            self.buckets.insert((customer, *key), *m);
        }
    }
}

/// Writes one batch of entries, and the stream events taken with them, in one transaction.
fn commit(
    db: &Database,
    batch: &[Entry],
    events: &[JournalEvent],
    retention: StreamRetention,
) -> Result<(), redb::Error> {
    let mut rows = Batch::default();
    for e in batch {
        rows.add(e);
    }
    let txn = db.begin_write()?;
    {
        write_usage(&txn, &rows, events, retention)?;
        let mut counters = txn.open_table(COUNTERS)?;
        for ((customer, key), state) in &rows.counters {
            let k = row_key(customer, &postcard::to_stdvec(key).map_err(to_redb)?);
            let v = postcard::to_stdvec(state).map_err(to_redb)?;
            counters.insert(k.as_slice(), v.as_slice())?;
        }
        let mut holds = txn.open_table(HOLDS)?;
        let mut hold_records = txn.open_table(HOLD_RECORDS)?;
        for ((customer, seq), hold) in &rows.holds {
            let k = row_key(customer, &seq.to_be_bytes());
            match hold {
                Some(h) => {
                    let v = postcard::to_stdvec(h).map_err(to_redb)?;
                    holds.insert(k.as_slice(), v.as_slice())?;
                    if let Some(r) = &h.record {
                        let v = postcard::to_stdvec(r).map_err(to_redb)?;
                        hold_records.insert(k.as_slice(), v.as_slice())?;
                    }
                }
                None => {
                    holds.remove(k.as_slice())?;
                    hold_records.remove(k.as_slice())?;
                }
            }
        }
        let mut keys = txn.open_table(KEYS)?;
        for ((customer, key), at) in &rows.keys {
            let k = row_key(customer, key.as_bytes());
            match at {
                Some(at) => {
                    keys.insert(k.as_slice(), at.millis())?;
                }
                None => {
                    keys.remove(k.as_slice())?;
                }
            }
        }
        let mut alerts = txn.open_table(ALERT_CLAIMS)?;
        for ((customer, key), until) in &rows.alerts {
            let k = row_key(customer, key.as_bytes());
            match until {
                Some(until) => {
                    alerts.insert(k.as_slice(), until.unwrap_or(-1))?;
                }
                None => {
                    alerts.remove(k.as_slice())?;
                }
            }
        }
        let mut deliveries = txn.open_table(DELIVERIES)?;
        for ((customer, id), d) in &rows.deliveries {
            let k = row_key(customer, id.as_bytes());
            match d {
                Some(d) => {
                    let v = postcard::to_allocvec(d).map_err(|e| {
                        redb::Error::Corrupted(format!("a delivery does not encode: {e}"))
                    })?;
                    deliveries.insert(k.as_slice(), v.as_slice())?;
                }
                None => {
                    deliveries.remove(k.as_slice())?;
                }
            }
        }
        let mut next = txn.open_table(NEXT_SEQ)?;
        for (customer, seq) in &rows.next_seq {
            next.insert(*customer, *seq)?;
        }
        let mut entities = txn.open_table(ENTITIES)?;
        for ((customer, id), e) in &rows.entities {
            let k = row_key(customer, id.as_bytes());
            let v = postcard::to_stdvec(e).map_err(to_redb)?;
            entities.insert(k.as_slice(), v.as_slice())?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// The usage rows of a batch: new series, changed buckets, buckets past their retention, and
/// the stream events (trimmed to the stream's retention).
fn write_usage(
    txn: &redb::WriteTransaction,
    rows: &Batch<'_>,
    events: &[JournalEvent],
    retention: StreamRetention,
) -> Result<(), redb::Error> {
    let mut series = txn.open_table(SERIES)?;
    for ((customer, id), key) in &rows.series {
        let k = row_key(customer, &id.to_be_bytes());
        let v = postcard::to_stdvec(key).map_err(to_redb)?;
        series.insert(k.as_slice(), v.as_slice())?;
    }
    let mut buckets = txn.open_table(BUCKETS)?;
    for (customer, g, start) in &rows.dropped {
        let from = bucket_key(customer, *g, *start, 0);
        let to = bucket_key(customer, *g, *start, u32::MAX);
        buckets.retain_in(from.as_slice()..=to.as_slice(), |_, _| false)?;
    }
    for ((customer, (g, start, id)), m) in &rows.buckets {
        let k = bucket_key(customer, *g, *start, *id);
        let v = postcard::to_stdvec(m).map_err(to_redb)?;
        buckets.insert(k.as_slice(), v.as_slice())?;
    }
    let mut table = txn.open_table(EVENTS)?;
    let mut newest = None;
    for (id, customer, at, body) in events {
        let v = postcard::to_stdvec(&(Symbols.resolve(*customer), at.millis(), body))
            .map_err(to_redb)?;
        table.insert(*id, v.as_slice())?;
        newest = newest.max(Some(at.millis()));
    }
    if let Some(newest) = newest {
        let mut len = table.len()?;
        let cutoff = newest.saturating_sub(retention.millis);
        loop {
            let first = table.first()?.map(|(id, v)| {
                (
                    id.value(),
                    decode_event(v.value()).map_or(i64::MIN, |e| e.1),
                )
            });
            let Some((id, at)) = first else { break };
            if len as usize <= retention.max_events && at >= cutoff {
                break;
            }
            table.remove(id)?;
            len -= 1;
        }
    }
    Ok(())
}

/// A stored stream event: its customer, time and body.
fn decode_event(v: &[u8]) -> Option<(String, i64, EventBody)> {
    postcard::from_bytes(v).ok()
}

fn to_redb(e: postcard::Error) -> redb::Error {
    redb::Error::Corrupted(format!("cannot encode a row: {e}"))
}

/// The writer thread: waits for a queued customer (in batched mode, then for the interval),
/// closes the open commit, takes each queued ledger's changes under its lock, and stores them
/// in one transaction.
fn writer(db: Arc<Database>, log: Arc<Log>) {
    loop {
        {
            let mut p = log.pending.lock();
            while p.list.is_empty() && !p.closed {
                log.wake.wait(&mut p);
            }
            if p.list.is_empty() && p.closed {
                return;
            }
        }
        // Sync mode commits at once: waiting for more decisions to join (300 µs was tried)
        // made fewer commits but lower throughput here.
        if let Durability::Batched { interval } = log.durability {
            std::thread::sleep(interval);
        }
        let (commit_no, queued) = {
            let mut p = log.pending.lock();
            let no = p.open;
            p.open += 1;
            (no, std::mem::take(&mut p.list))
        };
        let batch: Vec<Entry> = queued
            .into_iter()
            .map(|(sym, book)| {
                let mut b = book.lock();
                b.queued = None;
                Entry {
                    customer: Symbols.resolve(sym).to_string(),
                    changes: b.ledger.take_changes(),
                }
            })
            .collect();
        let events = std::mem::take(&mut *log.events.lock());
        let t0 = std::time::Instant::now();
        let result = commit(&db, &batch, &events, log.retention);
        tracing::trace!(commit = commit_no, customers = batch.len(), took = ?t0.elapsed(), "store commit");
        let mut c = log.committed.lock();
        match result {
            Ok(()) => c.upto = commit_no,
            Err(e) => {
                let why = format!("the store could not commit: {e}");
                tracing::error!(error = %e, "durable store commit failed; refusing decisions from now on");
                c.failed = Some(why);
                log.failed.store(true, Ordering::Release);
            }
        }
        log.watch.send_replace(c.clone());
        drop(c);
        log.done.notify_all();
    }
}

/// Reads a store file's tables back, customer by customer, naming the file, the table's rows
/// and the customer in every error.
struct Rows<'a> {
    txn: redb::ReadTransaction,
    path: &'a Path,
    by_customer: HashMap<String, Restored>,
}

fn open_error(path: &Path, e: redb::Error) -> OpenError {
    OpenError::Open {
        path: path.to_path_buf(),
        source: Box::new(e),
    }
}

fn corrupt_error(path: &Path, message: String) -> OpenError {
    OpenError::Corrupt {
        path: path.to_path_buf(),
        message,
    }
}

impl<'a> Rows<'a> {
    fn new(db: &Database, path: &'a Path) -> Result<Self, OpenError> {
        let txn = db.begin_read().map_err(|e| open_error(path, e.into()))?;
        Ok(Self {
            txn,
            path,
            by_customer: HashMap::new(),
        })
    }

    /// Every row of a `customer ‖ key → value` table, handed to `each` with what the file holds
    /// of that customer; `each` says in its error what of the row was wrong.
    fn raw<V: redb::Value + 'static>(
        &mut self,
        table: TableDefinition<&[u8], V>,
        what: &str,
        mut each: impl FnMut(&mut Restored, &[u8], V::SelfType<'_>) -> Result<(), String>,
    ) -> Result<(), OpenError> {
        let path = self.path;
        let t = self
            .txn
            .open_table(table)
            .map_err(|e| open_error(path, e.into()))?;
        for row in t.iter().map_err(|e| open_error(path, e.into()))? {
            let (k, v) = row.map_err(|e| open_error(path, e.into()))?;
            let (customer, key) = split_key(k.value())
                .ok_or_else(|| corrupt_error(path, format!("{what} row key")))?;
            let r = self.by_customer.entry(customer.to_string()).or_default();
            each(r, key, v.value())
                .map_err(|e| corrupt_error(path, format!("{what} of `{customer}`: {e}")))?;
        }
        Ok(())
    }

    /// Every row of a table whose values are postcard, decoded.
    fn decoded<K: RowKey, V: serde::de::DeserializeOwned>(
        &mut self,
        table: TableDefinition<&[u8], &[u8]>,
        what: &str,
        mut each: impl FnMut(&mut Restored, K, V),
    ) -> Result<(), OpenError> {
        self.raw(table, what, |r, k, v| {
            let key = K::read(k).ok_or("its key")?;
            let value = postcard::from_bytes(v).map_err(|e| e.to_string())?;
            each(r, key, value);
            Ok(())
        })
    }

    /// Each customer's next hold sequence number (a table keyed by the customer alone).
    fn next_seqs(&mut self) -> Result<(), OpenError> {
        let path = self.path;
        let t = self
            .txn
            .open_table(NEXT_SEQ)
            .map_err(|e| open_error(path, e.into()))?;
        for row in t.iter().map_err(|e| open_error(path, e.into()))? {
            let (k, v) = row.map_err(|e| open_error(path, e.into()))?;
            let r = self.by_customer.entry(k.value().to_string()).or_default();
            r.next_seq = v.value();
        }
        Ok(())
    }

    fn into_ledgers(self) -> Vec<(String, Ledger)> {
        self.by_customer
            .into_iter()
            .map(|(c, r)| (c, r.into_ledger()))
            .collect()
    }
}

/// The part of a row's key after the customer, as a table keys its rows.
trait RowKey: Sized {
    fn read(bytes: &[u8]) -> Option<Self>;
}

impl RowKey for u64 {
    fn read(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(u64::from_be_bytes)
    }
}

impl RowKey for u32 {
    fn read(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(u32::from_be_bytes)
    }
}

impl RowKey for Box<str> {
    fn read(bytes: &[u8]) -> Option<Self> {
        std::str::from_utf8(bytes).ok().map(Into::into)
    }
}

/// A key the rows do not need (the value names itself).
impl RowKey for () {
    fn read(_: &[u8]) -> Option<Self> {
        Some(())
    }
}

/// What the file holds of one customer.
#[derive(Default)]
struct Restored {
    counters: Vec<(CounterKey, CounterState)>,
    holds: Vec<(u64, Hold)>,
    next_seq: u64,
    keys: Vec<(Timestamp, Box<str>)>,
    entities: Vec<(Box<str>, StoredEntity)>,
    alerts: Vec<(Box<str>, Option<i64>)>,
    deliveries: Vec<Delivery>,
    hold_records: HashMap<u64, HoldRecord>,
    series: Vec<(u32, SeriesKey)>,
    buckets: Vec<(BucketKey, Measures)>,
}

/// Reads every row back into ledgers.
fn restore(db: &Database, path: &Path) -> Result<Vec<(String, Ledger)>, OpenError> {
    let mut rows = Rows::new(db, path)?;
    rows.raw(COUNTERS, "a counter", |r, key, v| {
        let key: CounterKey = postcard::from_bytes(key).map_err(|e| format!("its key: {e}"))?;
        let state: CounterState = postcard::from_bytes(v).map_err(|e| e.to_string())?;
        r.counters.push((key, state));
        Ok(())
    })?;
    rows.decoded(HOLDS, "a hold", |r, seq, hold: Hold| {
        r.holds.push((seq, hold))
    })?;
    rows.decoded(ENTITIES, "an entity", |r, id, e: StoredEntity| {
        r.entities.push((id, e));
    })?;
    rows.next_seqs()?;
    rows.decoded(HOLD_RECORDS, "a hold record", |r, seq, rec: HoldRecord| {
        r.hold_records.insert(seq, rec);
    })?;
    rows.decoded(SERIES, "a usage series", |r, id, key: SeriesKey| {
        r.series.push((id, key));
    })?;
    rows.raw(BUCKETS, "a usage bucket", |r, k, v| {
        let key = read_bucket_key(k).ok_or("its key")?;
        let m: Measures = postcard::from_bytes(v).map_err(|e| e.to_string())?;
        r.buckets.push((key, m));
        Ok(())
    })?;
    rows.raw(KEYS, "an idempotency key", |r, key, at| {
        let key = std::str::from_utf8(key).map_err(|e| e.to_string())?;
        r.keys.push((Timestamp::from_millis(at), key.into()));
        Ok(())
    })?;
    rows.raw(ALERT_CLAIMS, "an alert claim", |r, key, until| {
        let key = std::str::from_utf8(key).map_err(|e| e.to_string())?;
        r.alerts.push((key.into(), (until >= 0).then_some(until)));
        Ok(())
    })?;
    rows.decoded(DELIVERIES, "a delivery", |r, (): (), d: Delivery| {
        r.deliveries.push(d);
    })?;
    Ok(rows.into_ledgers())
}

impl Restored {
    /// The ledger these rows make.
    fn into_ledger(mut self) -> Ledger {
        for (seq, hold) in &mut self.holds {
            hold.record = self.hold_records.remove(seq);
        }
        let rollups = Rollups::restore(self.series, self.buckets);
        let mut ledger = Ledger::restore(
            self.counters,
            self.holds,
            self.next_seq,
            self.keys,
            self.entities,
            rollups,
        );
        ledger.alerts_mut().restore_claims(self.alerts);
        ledger.alerts_mut().restore_deliveries(self.deliveries);
        ledger
    }
}

/// The stream events kept, oldest first.
fn restore_events(db: &Database, path: &Path) -> Result<Vec<KeptEvent>, OpenError> {
    let open = |e: redb::Error| open_error(path, e);
    let txn = db.begin_read().map_err(|e| open(e.into()))?;
    let table = txn.open_table(EVENTS).map_err(|e| open(e.into()))?;
    let mut out = Vec::new();
    for row in table.iter().map_err(|e| open(e.into()))? {
        let (k, v) = row.map_err(|e| open(e.into()))?;
        let (customer, at, body) = decode_event(v.value())
            .ok_or_else(|| corrupt_error(path, format!("stream event {}", k.value())))?;
        out.push((
            k.value(),
            crate::core::Name::from(customer.as_str()),
            Timestamp::from_millis(at),
            Arc::new(body),
        ));
    }
    Ok(out)
}

impl DurableStore {
    /// Opens (or creates) the store file at `path`, rebuilds every ledger from it, and returns
    /// the in-memory store that journals every change to it.
    pub fn open(path: &Path, durability: Durability) -> Result<MemoryStore, OpenError> {
        let open = |e: redb::Error| open_error(path, e);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| open(e.into()))?;
        }
        let db = Database::create(path).map_err(|e| open(e.into()))?;
        // Create the tables, so a fresh file reads as empty.
        let txn = db.begin_write().map_err(|e| open(e.into()))?;
        {
            txn.open_table(COUNTERS).map_err(|e| open(e.into()))?;
            txn.open_table(HOLDS).map_err(|e| open(e.into()))?;
            txn.open_table(NEXT_SEQ).map_err(|e| open(e.into()))?;
            txn.open_table(KEYS).map_err(|e| open(e.into()))?;
            txn.open_table(ALERT_CLAIMS).map_err(|e| open(e.into()))?;
            txn.open_table(DELIVERIES).map_err(|e| open(e.into()))?;
            txn.open_table(ADMIN).map_err(|e| open(e.into()))?;
            txn.open_table(ENTITIES).map_err(|e| open(e.into()))?;
            txn.open_table(SERIES).map_err(|e| open(e.into()))?;
            txn.open_table(BUCKETS).map_err(|e| open(e.into()))?;
            txn.open_table(HOLD_RECORDS).map_err(|e| open(e.into()))?;
            txn.open_table(EVENTS).map_err(|e| open(e.into()))?;
        }
        txn.commit().map_err(|e| open(e.into()))?;
        let ledgers = restore(&db, path)?;
        let events = restore_events(&db, path)?;
        let db = Arc::new(db);
        let log = Arc::new(Log {
            durability,
            watch: tokio::sync::watch::Sender::new(Commit::default()),
            pending: Mutex::new(Pending {
                open: 1,
                list: Vec::new(),
                closed: false,
            }),
            wake: Condvar::new(),
            failed: AtomicBool::new(false),
            committed: Mutex::new(Commit::default()),
            done: Condvar::new(),
            events: Mutex::new(Vec::new()),
            retention: StreamRetention::default(),
        });
        let writer = std::thread::Builder::new()
            .name("tollgate-store-writer".into())
            .spawn({
                let log = Arc::clone(&log);
                let db = Arc::clone(&db);
                move || writer(db, log)
            })
            .map_err(OpenError::Thread)?;
        let journal = FileJournal {
            db,
            log,
            writer: Mutex::new(Some(writer)),
        };
        let store = MemoryStore::journaled(
            Arc::new(journal),
            ledgers.into_iter().map(|(c, l)| (Symbols.intern(&c), l)),
        );
        store.events().restore(events);
        Ok(store)
    }
}

impl FileJournal {
    /// Commits what is queued and stops the writer. Later calls fail as unavailable.
    fn close(&self) {
        self.log.pending.lock().closed = true;
        self.log.wake.notify_one();
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
    }
}

impl Drop for FileJournal {
    fn drop(&mut self) {
        self.close();
    }
}

#[async_trait::async_trait]
impl AdminLog for FileJournal {
    /// One process owns the file, and the catalog saves one change at a time: the revision is
    /// only counted, never contested.
    async fn save(&self, entries: &[Vec<u8>], base: u64) -> Result<u64, StoreError> {
        let fail =
            |e: redb::Error| StoreError::Unavailable(format!("cannot store admin changes: {e}"));
        let txn = self.db.begin_write().map_err(|e| fail(e.into()))?;
        {
            let mut t = txn.open_table(ADMIN).map_err(|e| fail(e.into()))?;
            t.retain(|_, _| false).map_err(|e| fail(e.into()))?;
            for (i, c) in (0u64..).zip(entries) {
                t.insert(i, c.as_slice()).map_err(|e| fail(e.into()))?;
            }
        }
        txn.commit().map_err(|e| fail(e.into()))?;
        Ok(base + 1)
    }

    async fn load(&self) -> Result<AdminChanges, StoreError> {
        let fail =
            |e: redb::Error| StoreError::Unavailable(format!("cannot read admin changes: {e}"));
        let txn = self.db.begin_read().map_err(|e| fail(e.into()))?;
        let t = txn.open_table(ADMIN).map_err(|e| fail(e.into()))?;
        let mut entries = Vec::new();
        for row in t.iter().map_err(|e| fail(e.into()))? {
            let (_, v) = row.map_err(|e| fail(e.into()))?;
            entries.push(v.value().to_vec());
        }
        Ok(AdminChanges {
            revision: 0,
            entries,
        })
    }

    async fn revision(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_keys_split_back_whatever_the_id() {
        for id in ["acme", "", "a\0b", "ünïcode"] {
            let k = row_key(id, b"rest");
            assert_eq!(split_key(&k), Some((id, &b"rest"[..])));
        }
        assert_eq!(split_key(&[0]), None);
        assert_eq!(split_key(&[0, 9, b'a']), None);
    }

    /// A row that does not decode stops the open with an error that names the file, the
    /// table's rows and the customer, instead of starting with part of the state.
    #[test]
    fn a_corrupt_row_names_the_file_the_rows_and_the_customer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.redb");
        drop(DurableStore::open(&path, Durability::Sync).unwrap());
        for (table, rest, value, says) in [
            (
                HOLDS,
                &8u64.to_be_bytes()[..],
                &[0xff, 0xff][..],
                "a hold of `acme`",
            ),
            (HOLDS, &b"x"[..], &[][..], "a hold of `acme`: its key"),
            (
                SERIES,
                &7u32.to_be_bytes()[..],
                &[0xff][..],
                "a usage series of `acme`",
            ),
        ] {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(table)
                .unwrap()
                .insert(&row_key("acme", rest)[..], value)
                .unwrap();
            txn.commit().unwrap();
            drop(db);
            let e = DurableStore::open(&path, Durability::Sync)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains(says) && e.contains("tollgate.redb"), "{e}");
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(table)
                .unwrap()
                .remove(&row_key("acme", rest)[..])
                .unwrap();
            txn.commit().unwrap();
        }
        assert!(DurableStore::open(&path, Durability::Sync).is_ok());
    }
}
