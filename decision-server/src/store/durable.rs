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
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::memory::{Journal, MemoryStore, SharedBook};
use super::{AdminChanges, AdminLog, StoreError, StoredEntity};
use crate::core::counter::{CounterKey, CounterState};
use crate::core::ledger::{Changes, Hold, Ledger};
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
/// Entities created on the fly: (customer, entity id) → type and parent.
const ENTITIES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("auto_entities");
/// Admin changes made through the API, in order: position → encoded change.
const ADMIN: TableDefinition<u64, &[u8]> = TableDefinition::new("admin_changes");

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
    next_seq: HashMap<&'a str, u64>,
    entities: HashMap<(&'a str, &'a str), &'a StoredEntity>,
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
        for (id, e) in &c.entities {
            self.entities.insert((customer, id), e);
        }
        self.next_seq.insert(customer, c.next_seq);
    }
}

/// Writes one batch of entries in one transaction.
fn commit(db: &Database, batch: &[Entry]) -> Result<(), redb::Error> {
    let mut rows = Batch::default();
    for e in batch {
        rows.add(e);
    }
    let txn = db.begin_write()?;
    {
        let mut counters = txn.open_table(COUNTERS)?;
        for ((customer, key), state) in &rows.counters {
            let k = row_key(customer, &postcard::to_stdvec(key).map_err(to_redb)?);
            let v = postcard::to_stdvec(state).map_err(to_redb)?;
            counters.insert(k.as_slice(), v.as_slice())?;
        }
        let mut holds = txn.open_table(HOLDS)?;
        for ((customer, seq), hold) in &rows.holds {
            let k = row_key(customer, &seq.to_be_bytes());
            match hold {
                Some(h) => {
                    let v = postcard::to_stdvec(h).map_err(to_redb)?;
                    holds.insert(k.as_slice(), v.as_slice())?;
                }
                None => {
                    holds.remove(k.as_slice())?;
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
        let t0 = std::time::Instant::now();
        let result = commit(&db, &batch);
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

/// Every row of a `customer ‖ key → value` table, handed to `each` as (customer, key, value).
fn customer_rows<V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    table: TableDefinition<&[u8], V>,
    what: &str,
    open: &dyn Fn(redb::Error) -> OpenError,
    corrupt: &dyn Fn(String) -> OpenError,
    mut each: impl FnMut(&str, &[u8], V::SelfType<'_>) -> Result<(), OpenError>,
) -> Result<(), OpenError> {
    let t = txn.open_table(table).map_err(|e| open(e.into()))?;
    for row in t.iter().map_err(|e| open(e.into()))? {
        let (k, v) = row.map_err(|e| open(e.into()))?;
        let (customer, key) =
            split_key(k.value()).ok_or_else(|| corrupt(format!("{what} row key")))?;
        each(customer, key, v.value())?;
    }
    Ok(())
}

/// What the file holds of one customer.
#[derive(Default)]
struct Restored {
    counters: Vec<(CounterKey, CounterState)>,
    holds: Vec<(u64, Hold)>,
    next_seq: u64,
    keys: Vec<(Timestamp, Box<str>)>,
    entities: Vec<(Box<str>, StoredEntity)>,
}

/// Reads every row back into ledgers.
fn restore(db: &Database, path: &Path) -> Result<Vec<(String, Ledger)>, OpenError> {
    let corrupt = |message: String| OpenError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    let open = |e: redb::Error| OpenError::Open {
        path: path.to_path_buf(),
        source: Box::new(e),
    };
    let mut by_customer: HashMap<String, Restored> = HashMap::new();
    let txn = db.begin_read().map_err(|e| open(e.into()))?;
    customer_rows(
        &txn,
        COUNTERS,
        "a counter",
        &open,
        &corrupt,
        |customer, key, v| {
            let key: CounterKey =
                postcard::from_bytes(key).map_err(|e| corrupt(format!("a counter key: {e}")))?;
            let state: CounterState = postcard::from_bytes(v)
                .map_err(|e| corrupt(format!("counter state of `{customer}`: {e}")))?;
            let r = by_customer.entry(customer.to_string()).or_default();
            r.counters.push((key, state));
            Ok(())
        },
    )?;
    customer_rows(
        &txn,
        HOLDS,
        "a hold",
        &open,
        &corrupt,
        |customer, seq, v| {
            let seq = u64::from_be_bytes(
                seq.try_into()
                    .map_err(|_| corrupt(format!("a hold number of `{customer}`")))?,
            );
            let hold: Hold = postcard::from_bytes(v)
                .map_err(|e| corrupt(format!("hold {customer}:{seq}: {e}")))?;
            let r = by_customer.entry(customer.to_string()).or_default();
            r.holds.push((seq, hold));
            Ok(())
        },
    )?;
    customer_rows(
        &txn,
        ENTITIES,
        "an entity",
        &open,
        &corrupt,
        |customer, id, v| {
            let id = std::str::from_utf8(id).map_err(|e| corrupt(format!("an entity id: {e}")))?;
            let e: StoredEntity = postcard::from_bytes(v)
                .map_err(|e| corrupt(format!("entity `{id}` of `{customer}`: {e}")))?;
            let r = by_customer.entry(customer.to_string()).or_default();
            r.entities.push((id.into(), e));
            Ok(())
        },
    )?;
    let next = txn.open_table(NEXT_SEQ).map_err(|e| open(e.into()))?;
    for row in next.iter().map_err(|e| open(e.into()))? {
        let (k, v) = row.map_err(|e| open(e.into()))?;
        by_customer
            .entry(k.value().to_string())
            .or_default()
            .next_seq = v.value();
    }
    customer_rows(
        &txn,
        KEYS,
        "an idempotency key",
        &open,
        &corrupt,
        |customer, key, at| {
            let key = std::str::from_utf8(key).map_err(|e| corrupt(format!("a key: {e}")))?;
            let r = by_customer.entry(customer.to_string()).or_default();
            r.keys.push((Timestamp::from_millis(at), key.into()));
            Ok(())
        },
    )?;
    Ok(by_customer
        .into_iter()
        .map(|(c, r)| {
            let ledger = Ledger::restore(r.counters, r.holds, r.next_seq, r.keys, r.entities);
            (c, ledger)
        })
        .collect())
}

impl DurableStore {
    /// Opens (or creates) the store file at `path`, rebuilds every ledger from it, and returns
    /// the in-memory store that journals every change to it.
    pub fn open(path: &Path, durability: Durability) -> Result<MemoryStore, OpenError> {
        let open = |e: redb::Error| OpenError::Open {
            path: path.to_path_buf(),
            source: Box::new(e),
        };
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
            txn.open_table(ADMIN).map_err(|e| open(e.into()))?;
            txn.open_table(ENTITIES).map_err(|e| open(e.into()))?;
        }
        txn.commit().map_err(|e| open(e.into()))?;
        let ledgers = restore(&db, path)?;
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
        Ok(MemoryStore::journaled(
            Arc::new(journal),
            ledgers.into_iter().map(|(c, l)| (Symbols.intern(&c), l)),
        ))
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
}
