//! One customer's counters, open holds and hold expiry: the "check all, then hold all" step
//! and settlement, as plain data, beside its rollups and its alert book (`core::alerts`).
//! In-process stores wrap one ledger per customer in a lock.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, BinaryHeap};
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::alerts::{AlertBook, Delivery};
use super::counter::{self, CounterKey, CounterSpec, CounterState, HoldMark, Reading};
use super::credits::GrantBalance;
use super::model::Mode;
use super::plan::{AmountRule, Plan, PlannedCounter, priced_credits};
use super::rollup::{
    LocalRecord, Measures, RecordKind, RecordRef, RecordSettings, RollupChanges, Rollups,
    UsageRecord,
};
use super::usage::{StreamEnd, Usage};
use super::{HoldId, Timestamp};

/// What one hold placed on one counter.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HoldPart {
    pub key: CounterKey,
    pub mark: HoldMark,
    pub held: u64,
    pub rule: AmountRule,
}

/// An open hold.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hold {
    pub expires_at: Timestamp,
    pub parts: Vec<HoldPart>,
    /// The random part of the hold's id; a close naming another tag does not reach it.
    pub tag: u128,
    /// The most usage a settlement may report.
    pub max_settle: u64,
    /// What the hold's usage record is attributed to. Trade-off: kept out of the hold's own
    /// encoding (a persisting store writes it beside the hold), so that files written before
    /// records existed still read.
    #[serde(skip)]
    pub record: Option<HoldRecord>,
}

/// A hold's attribution: its series, and the usage and credits it held (what an expiry
/// commits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HoldRecord {
    pub series: u32,
    pub held: Usage,
    pub credits: u64,
}

/// An entity created on the fly, as a store keeps it: by type name and parent id, so that it
/// means the same after a reload and on every replica.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredEntity {
    pub entity_type: String,
    pub parent: String,
}

/// How a store answered for an entity created on the fly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoEntityOutcome {
    /// It existed already (perhaps under another parent than proposed: the first one wins).
    Found(StoredEntity),
    /// This call created it as proposed.
    Created(StoredEntity),
    /// The customer has its maximum of entities created on the fly; nothing was created.
    Full,
    /// It does not exist, and the call asked not to create it (a dry run).
    Absent,
}

/// How an attempt to close a hold went, in a ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseResult {
    /// This call closed it.
    Closed,
    /// It had been closed before; nothing changed.
    AlreadyClosed,
    /// No open or closed hold has this number and tag.
    Unknown,
    /// The settlement reports more than the hold allows (`max`); nothing changed.
    TooLarge { max: u64 },
}

/// What a reservation does once every counter has room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveMode {
    /// Hold the amount on every counter until the hold is settled, released or expires.
    Hold,
    /// Count the amount at once, as a hold settled at its held amount would be, and place no
    /// hold: for usage that is final when it is decided (a request count, a fixed cost, a
    /// route nobody settles). A concurrency limit is checked but keeps no slot, since nothing
    /// would give it back.
    Commit,
    /// Read every counter and answer as a real check would; change nothing.
    DryRun,
}

/// The outcome of the atomic "check every counter, then hold every counter" step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// One reading per planned counter, in plan order. After the hold when granted.
    pub readings: Vec<Reading>,
    /// The first enforcing counter that did not fit, if any.
    pub blocking: Option<usize>,
    pub hold: Option<HoldId>,
}

/// How a hold was closed, for callers that record events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing<'a> {
    /// At this usage; a streamed call's end, if the gateway stepped in, goes on its record.
    Settle(&'a Usage, Option<StreamEnd>),
    Release,
}

/// How long ingested usage's idempotency keys are remembered, per customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRetention {
    pub millis: i64,
    pub max_keys: usize,
}

impl Default for KeyRetention {
    /// A day, and at most 100,000 keys per customer: a flood of fresh keys cannot grow memory
    /// past that; a retry older than both is counted again.
    fn default() -> Self {
        Self {
            millis: 24 * 3_600_000,
            max_keys: 100_000,
        }
    }
}

/// A counter's reading after a reservation applied `mode` to it: what a hold added, or what a
/// commit counted (a concurrency slot taken and given back reads as before).
fn after_reserve(
    c: &PlannedCounter,
    state: &CounterState,
    before: &Reading,
    mode: ReserveMode,
    now: Timestamp,
) -> Reading {
    if mode == ReserveMode::Commit && matches!(c.spec, CounterSpec::Concurrency { .. }) {
        return *before;
    }
    counter::after_hold(&c.spec, state, before, c.amount, now)
}

/// The first enforcing counter of `plan` whose reading does not fit: the one that denies.
fn first_blocking(plan: &Plan, readings: &[Reading]) -> Option<usize> {
    plan.counters
        .iter()
        .zip(readings)
        .position(|(c, r)| c.mode == Mode::Enforce && !r.fits)
}

/// A reservation's readings and blocking counter worked out from the states its counters had
/// before it, as [`Ledger::reserve`] works them out in place: for a store that decides and
/// holds elsewhere (a Redis script) and hands back the states it read. `before[i]` is the
/// state of `plan.counters[i]`; `applied` says what was done once every counter had room
/// (`DryRun`: nothing, as when a replay or a cancel placed nothing).
pub fn readings_from(
    plan: &Plan,
    before: Vec<Option<CounterState>>,
    applied: ReserveMode,
    now: Timestamp,
) -> (Vec<Reading>, Option<usize>) {
    // A counter named twice in one plan is one state, as in a ledger.
    let mut states: FxHashMap<CounterKey, Option<CounterState>> = FxHashMap::default();
    for (c, s) in plan.counters.iter().zip(before) {
        states.entry(c.key).or_insert(s);
    }
    let mut readings: Vec<Reading> = plan
        .counters
        .iter()
        .map(|c| {
            let state = states.get(&c.key).and_then(Option::as_ref);
            counter::read(&c.spec, state, c.amount, now)
        })
        .collect();
    let blocking = first_blocking(plan, &readings);
    if applied != ReserveMode::DryRun && blocking.is_none() {
        for (c, reading) in plan.counters.iter().zip(readings.iter_mut()) {
            let slot = states.entry(c.key).or_insert(None);
            if slot.is_none() {
                *slot = CounterState::fresh(&c.spec, now);
            }
            if let Some(state) = slot {
                let mark = counter::hold(&c.spec, state, c.amount, now);
                if applied == ReserveMode::Commit {
                    counter::expire(state, &mark);
                }
                *reading = after_reserve(c, state, reading, applied, now);
            }
        }
    }
    (readings, blocking)
}

/// One customer's state, as an in-process store keeps it under the customer's lock: its
/// counters, open holds and their expiry queue, hold numbers, ingest idempotency keys,
/// entities created on the fly, usage rollups and the records made since they were last
/// taken, and its [`AlertBook`] (alert claims and the webhook outbox); with what changed, for
/// a persisting store.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    counters: FxHashMap<CounterKey, CounterState>,
    holds: FxHashMap<u64, Hold>,
    /// Expiry times of holds; entries of holds closed earlier are skipped when they surface.
    expiry: BinaryHeap<Reverse<(Timestamp, u64)>>,
    /// Idempotency keys of ingested usage still remembered, and their order for eviction:
    /// oldest first, keys of the same millisecond by key. Trade-off: a sorted set (log n per
    /// key) rather than an insertion-ordered queue, because the order must be one every
    /// backend can keep: a file restored by key, and a Redis sorted set, which breaks score
    /// ties by member.
    seen_keys: rustc_hash::FxHashSet<Box<str>>,
    seen_order: BTreeSet<(Timestamp, Box<str>)>,
    /// The next hold number. Hold numbers only grow, so any number below this one that is not
    /// open was closed: that is what makes settlement idempotent without remembering it.
    next_seq: u64,
    /// The last batch of local records applied, by writer (not persisted: a batch is resent
    /// only by a writer whose call may have run unanswered, on a networked store).
    local_batches: FxHashMap<u32, u64>,
    /// Entities created on the fly, by id; their count is the customer's cap.
    entities: FxHashMap<Box<str>, StoredEntity>,
    /// What changed since the last [`Ledger::take_changes`]; `None` unless a store persists
    /// the ledger, so the in-memory store pays one branch per change and nothing more.
    dirty: Option<Box<Dirty>>,
    /// Usage attributed to series, in time buckets.
    rollups: Rollups,
    /// How records are kept; the store sets it before each call ([`Ledger::configure`]).
    records: RecordSettings,
    /// Records made since the last [`Ledger::take_records`], for the usage stream.
    emitted: Vec<UsageRecord>,
    /// Alert claims and the webhook outbox.
    alerts: AlertBook,
    /// Alerts claimed since the last [`Ledger::take_alerts`]: when, and the encoded alert.
    emitted_alerts: Vec<(Timestamp, String)>,
}

#[derive(Debug, Default, Clone)]
struct Dirty {
    counters: rustc_hash::FxHashSet<CounterKey>,
    opened: Vec<u64>,
    closed: Vec<u64>,
    /// Each idempotency key's latest fate: remembered since (`Some`), or forgotten (`None`).
    /// One entry per key, so a key forgotten and seen again (or the reverse) between two
    /// takes ends up as it is now.
    keys: FxHashMap<Box<str>, Option<Timestamp>>,
    entities: Vec<Box<str>>,
}

/// What changed in a ledger since the last [`Ledger::take_changes`]: the rows a persisting
/// store writes. Applying every `Changes` in order to an empty ledger's rows gives the ledger.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Changes {
    /// The current state of every counter touched.
    pub counters: Vec<(CounterKey, CounterState)>,
    /// Series and buckets of the rollups changed.
    pub rollups: RollupChanges,
    /// Holds opened and still open.
    pub opened: Vec<(u64, Hold)>,
    /// Holds closed (settled, released, expired); some may have been opened in this batch.
    pub closed: Vec<u64>,
    pub next_seq: u64,
    /// Idempotency keys remembered since (`Some`), or forgotten (`None`).
    pub keys: Vec<(Box<str>, Option<Timestamp>)>,
    /// Entities created on the fly (they are never removed).
    pub entities: Vec<(Box<str>, StoredEntity)>,
    /// Alert claims made (`Some(until)`, `until` in ms or `None` for "until re-armed") or
    /// dropped (`None`).
    pub alerts: Vec<(Box<str>, Option<Option<i64>>)>,
    /// Deliveries added or changed (`Some`) or dropped from the log (`None`).
    pub deliveries: Vec<(Box<str>, Option<Delivery>)>,
}

impl Ledger {
    /// An empty ledger that records its changes for [`Ledger::take_changes`].
    pub fn tracked() -> Self {
        Self {
            dirty: Some(Box::default()),
            rollups: Rollups::tracked(),
            alerts: AlertBook::tracked(),
            ..Self::default()
        }
    }

    /// Sets how records are kept from now on.
    pub fn configure(&mut self, records: RecordSettings) {
        self.records = records;
    }

    /// The records made since the last call, oldest first.
    pub fn take_records(&mut self) -> Vec<UsageRecord> {
        std::mem::take(&mut self.emitted)
    }

    /// The rollups, for queries.
    pub fn rollups(&self) -> &Rollups {
        &self.rollups
    }

    /// Attributes `measures` to series `series` at `at`, and emits the record.
    fn attribute(
        &mut self,
        kind: RecordKind,
        series: u32,
        at: Timestamp,
        measures: Measures,
        reference: RecordRef,
    ) {
        if !self.records.enabled {
            return;
        }
        self.rollups.add(series, at, &measures, &self.records);
        if let Some(key) = self.rollups.key(series) {
            self.emitted.push(UsageRecord {
                kind,
                at,
                series: Arc::clone(key),
                measures,
                reference,
            });
        }
    }

    /// Writes the records of decisions a replica made inside its leases (no counter changes:
    /// the lease's own hold carries their units), unless batch `seq` of `writer` is at or
    /// below the last one applied (the same batch sent again; `lua/locals.lua` `locals()`).
    pub fn record_local(&mut self, writer: u32, seq: u64, records: &[LocalRecord]) {
        if !self.records.enabled {
            return;
        }
        let last = self.local_batches.entry(writer).or_insert(0);
        if seq <= *last {
            return;
        }
        *last = seq;
        for r in records {
            let series =
                self.rollups
                    .series_id(&r.series, None, self.records.max_values_per_dimension);
            let reference = RecordRef::Hold {
                seq: r.seq,
                tag: r.tag,
            };
            self.attribute(r.kind, series, r.at, r.measures, reference);
        }
    }

    /// A tracked ledger rebuilt from persisted rows.
    pub fn restore(
        counters: impl IntoIterator<Item = (CounterKey, CounterState)>,
        holds: impl IntoIterator<Item = (u64, Hold)>,
        next_seq: u64,
        keys: impl IntoIterator<Item = (Timestamp, Box<str>)>,
        entities: impl IntoIterator<Item = (Box<str>, StoredEntity)>,
        rollups: Rollups,
    ) -> Self {
        let mut l = Self::tracked();
        l.rollups = rollups;
        l.counters = counters.into_iter().collect();
        l.entities = entities.into_iter().collect();
        for (seq, hold) in holds {
            l.expiry.push(Reverse((hold.expires_at, seq)));
            l.next_seq = l.next_seq.max(seq + 1);
            l.holds.insert(seq, hold);
        }
        l.next_seq = l.next_seq.max(next_seq);
        for (at, k) in keys {
            l.seen_keys.insert(k.clone());
            l.seen_order.insert((at, k));
        }
        l
    }

    /// Everything that changed since the last call (empty for an untracked ledger).
    pub fn take_changes(&mut self) -> Changes {
        let Some(dirty) = self.dirty.as_mut() else {
            return Changes::default();
        };
        let d = std::mem::take(dirty.as_mut());
        let (alerts, deliveries) = self.alerts.take_changes();
        Changes {
            counters: d
                .counters
                .into_iter()
                .filter_map(|k| self.counters.get(&k).map(|s| (k, s.clone())))
                .collect(),
            rollups: self.rollups.take_changes(),
            opened: d
                .opened
                .into_iter()
                .filter_map(|seq| self.holds.get(&seq).map(|h| (seq, h.clone())))
                .collect(),
            closed: d.closed,
            next_seq: self.next_seq,
            keys: d.keys.into_iter().collect(),
            entities: d
                .entities
                .into_iter()
                .filter_map(|id| self.entities.get(&id).map(|e| (id, e.clone())))
                .collect(),
            alerts,
            deliveries,
        }
    }

    /// The customer's alert claims and webhook outbox.
    pub fn alerts(&self) -> &AlertBook {
        &self.alerts
    }

    /// The customer's alert claims and webhook outbox, to change them.
    pub fn alerts_mut(&mut self) -> &mut AlertBook {
        &mut self.alerts
    }

    /// Claims alert threshold `key` until `until` (ms; `None`: until re-armed) and emits
    /// `body`, unless the key is claimed already and its claim still holds at `now`. Whether
    /// this call claimed it: one crossing fires once.
    pub fn claim_alert(
        &mut self,
        key: &str,
        until: Option<i64>,
        body: String,
        deliveries: Vec<Delivery>,
        now: Timestamp,
    ) -> bool {
        if !self.alerts.claim(key, until, deliveries, now) {
            return false;
        }
        self.emitted_alerts.push((now, body));
        true
    }

    /// The alerts claimed since the last call, oldest first.
    pub fn take_alerts(&mut self) -> Vec<(Timestamp, String)> {
        std::mem::take(&mut self.emitted_alerts)
    }

    /// Whether a tracked ledger has changes not yet taken.
    pub fn has_changes(&self) -> bool {
        self.rollups.has_changes()
            || self.dirty.as_ref().is_some_and(|d| {
                !(d.counters.is_empty()
                    && d.opened.is_empty()
                    && d.closed.is_empty()
                    && d.keys.is_empty()
                    && d.entities.is_empty())
            })
            || self.alerts.has_changes()
    }

    fn touch(&mut self, key: CounterKey) {
        if let Some(d) = self.dirty.as_mut() {
            d.counters.insert(key);
        }
    }

    fn touch_hold(&mut self, hold: &Hold, seq: u64) {
        if let Some(d) = self.dirty.as_mut() {
            d.counters.extend(hold.parts.iter().map(|p| p.key));
            d.closed.push(seq);
        }
    }

    /// Finds entity `id`, or (when `create` is set and the customer has fewer than `max`)
    /// creates it as `proposed`. One atomic step per customer: two calls for one new id
    /// create it once, and both see the first one's parent.
    pub fn auto_entity(
        &mut self,
        id: &str,
        proposed: &StoredEntity,
        max: u32,
        create: bool,
    ) -> AutoEntityOutcome {
        if let Some(e) = self.entities.get(id) {
            return AutoEntityOutcome::Found(e.clone());
        }
        if !create {
            return AutoEntityOutcome::Absent;
        }
        if self.entities.len() >= max as usize {
            return AutoEntityOutcome::Full;
        }
        self.entities.insert(id.into(), proposed.clone());
        if let Some(d) = self.dirty.as_mut() {
            d.entities.push(id.into());
        }
        AutoEntityOutcome::Created(proposed.clone())
    }

    /// How many entities were created on the fly.
    pub fn auto_entity_count(&self) -> usize {
        self.entities.len()
    }

    /// The entities created on the fly, in no order.
    pub fn auto_entities(&self) -> Vec<(String, StoredEntity)> {
        self.entities
            .iter()
            .map(|(id, e)| (id.to_string(), e.clone()))
            .collect()
    }

    pub fn counter_count(&self) -> usize {
        self.counters.len()
    }

    pub fn open_holds(&self) -> usize {
        self.holds.len()
    }

    /// Checks every counter of `plan` and, if every enforcing one fits and `hold` is set,
    /// holds on all of them. Due holds are expired first so the readings are current.
    pub fn reserve(&mut self, plan: &Plan, mode: ReserveMode, now: Timestamp) -> Reservation {
        self.expire_due(now);
        let hold = mode != ReserveMode::DryRun;
        let mut readings: Vec<_> = plan
            .counters
            .iter()
            .map(|c| counter::read(&c.spec, self.counters.get(&c.key), c.amount, now))
            .collect();
        let blocking = first_blocking(plan, &readings);
        if let (Some(b), true) = (blocking, hold && self.records.enabled && plan.record)
            && let Some(c) = plan.counters.get(b)
        {
            let series = self.rollups.series_id(
                &plan.series,
                Some(c.limit_id),
                self.records.max_values_per_dimension,
            );
            let reference = RecordRef::Denial {
                level: c.level,
                asked: plan.usage.units,
            };
            self.attribute(
                RecordKind::Denied,
                series,
                now,
                Measures::denial(),
                reference,
            );
        }
        if blocking.is_some() || !hold || plan.counters.is_empty() {
            return Reservation {
                readings,
                blocking,
                hold: None,
            };
        }
        if mode == ReserveMode::Commit {
            for (c, reading) in plan.counters.iter().zip(readings.iter_mut()) {
                if let Some(state) = self.count_at_once(c, now) {
                    *reading = after_reserve(c, state, reading, mode, now);
                }
            }
            if self.records.enabled && plan.record {
                let series = self.rollups.series_id(
                    &plan.series,
                    None,
                    self.records.max_values_per_dimension,
                );
                let measures = Measures::of_call(
                    plan.usage.units,
                    plan.usage.tokens,
                    plan.credits(&plan.usage),
                );
                let reference = RecordRef::Hold {
                    seq: 0,
                    tag: plan.hold_tag,
                };
                self.attribute(RecordKind::Committed, series, now, measures, reference);
            }
            return Reservation {
                readings,
                blocking: None,
                hold: None,
            };
        }
        let seq = self.next_seq.max(1);
        self.next_seq = seq + 1;
        let mut parts = Vec::with_capacity(plan.counters.len());
        for (c, reading) in plan.counters.iter().zip(readings.iter_mut()) {
            let state = match self.counters.entry(c.key) {
                Entry::Occupied(o) => Some(o.into_mut()),
                Entry::Vacant(v) => CounterState::fresh(&c.spec, now).map(|s| v.insert(s)),
            };
            let mark = match state {
                Some(state) => {
                    let mark = counter::hold(&c.spec, state, c.amount, now);
                    *reading = counter::after_hold(&c.spec, state, reading, c.amount, now);
                    mark
                }
                None => HoldMark::Nothing,
            };
            parts.push(HoldPart {
                key: c.key,
                mark,
                held: c.amount,
                rule: c.rule.clone(),
            });
        }
        let expires_at = now.plus_millis(plan.hold_ttl_millis);
        if let Some(d) = self.dirty.as_mut() {
            d.counters.extend(parts.iter().map(|p| p.key));
            d.opened.push(seq);
        }
        let record = (self.records.enabled && plan.record).then(|| HoldRecord {
            series: self.rollups.series_id(
                &plan.series,
                None,
                self.records.max_values_per_dimension,
            ),
            held: plan.usage,
            credits: plan.credits(&plan.usage),
        });
        self.holds.insert(
            seq,
            Hold {
                expires_at,
                parts,
                tag: plan.hold_tag,
                max_settle: plan.max_settle,
                record,
            },
        );
        self.expiry.push(Reverse((expires_at, seq)));
        Reservation {
            readings,
            blocking: None,
            hold: Some(HoldId {
                customer: plan.customer.to_string(),
                seq,
                tag: plan.hold_tag,
            }),
        }
    }

    /// Settles or releases hold `seq` if its tag is `tag`.
    ///
    /// A number below the next one with no open hold under this tag is `AlreadyClosed` (closed
    /// holds are not remembered, so their tags cannot be checked; nothing changes either way);
    /// a number never given is `Unknown`.
    pub fn close(&mut self, seq: u64, tag: u128, how: Closing<'_>, now: Timestamp) -> CloseResult {
        // A hold past its TTL is expired (committed as held) even if no sweep has run yet, so the
        // outcome never depends on when the sweeper last ran.
        self.expire_due(now);
        // An open hold is reached by its number and its tag together; with another tag the id
        // names no open hold, and is answered as any number that is not open.
        let Some(open) = self.holds.get(&seq).filter(|h| h.tag == tag) else {
            return if seq > 0 && seq < self.next_seq {
                CloseResult::AlreadyClosed
            } else {
                CloseResult::Unknown
            };
        };
        if let Closing::Settle(actual, _) = how
            && actual.largest_figure() > open.max_settle
        {
            return CloseResult::TooLarge {
                max: open.max_settle,
            };
        }
        let Some(hold) = self.holds.remove(&seq) else {
            return CloseResult::Unknown;
        };
        self.touch_hold(&hold, seq);
        for part in &hold.parts {
            let Some(state) = self.counters.get_mut(&part.key) else {
                continue;
            };
            match how {
                Closing::Settle(actual, _) => {
                    counter::settle(state, &part.mark, part.held, part.rule.amount(actual), now)
                }
                Closing::Release => counter::release(state, &part.mark, part.held, now),
            }
        }
        if let Some(r) = hold.record {
            let mut series = r.series;
            if let Closing::Settle(_, Some(end)) = how {
                let (name, value) = end.attribute();
                series = self.rollups.series_with(series, name, value.as_str());
            }
            let (kind, measures) = match how {
                Closing::Settle(actual, _) => (
                    RecordKind::Settled,
                    Measures::of_call(
                        actual.units,
                        actual.tokens,
                        priced_credits(hold.parts.iter().map(|p| &p.rule), actual),
                    ),
                ),
                Closing::Release => (RecordKind::Released, Measures::of_call(0, None, 0)),
            };
            self.attribute(kind, series, now, measures, RecordRef::Hold { seq, tag });
        }
        CloseResult::Closed
    }

    /// Releases the open hold whose tag is `tag`, if there is one: the hold of a decision whose
    /// caller gave up before it got the answer. Returns whether one was released.
    ///
    /// Trade-off: a scan of the open holds rather than an index by tag, because this runs only
    /// for abandoned decisions, and an index would cost every decision a map entry.
    pub fn cancel(&mut self, tag: u128, now: Timestamp) -> bool {
        let Some(seq) = self
            .holds
            .iter()
            .find_map(|(seq, h)| (h.tag == tag).then_some(*seq))
        else {
            return false;
        };
        self.close(seq, tag, Closing::Release, now) == CloseResult::Closed
    }

    /// Records usage that was never gated, on every counter of `plan`, whether or not it fits:
    /// it already happened. Skipped if `key` was seen within the last `retention_millis` or the
    /// last `max_keys` keys; returns whether it was recorded.
    pub fn record(
        &mut self,
        plan: &Plan,
        key: &str,
        retention: KeyRetention,
        now: Timestamp,
    ) -> bool {
        while let Some((at, _)) = self.seen_order.first() {
            let stale = now.millis().saturating_sub(at.millis()) > retention.millis;
            if !stale && self.seen_order.len() < retention.max_keys.max(1) {
                break;
            }
            if let Some((_, k)) = self.seen_order.pop_first() {
                self.seen_keys.remove(&k);
                if let Some(d) = self.dirty.as_mut() {
                    d.keys.insert(k, None);
                }
            }
        }
        if self.seen_keys.contains(key) {
            return false;
        }
        self.seen_keys.insert(key.into());
        self.seen_order.insert((now, key.into()));
        if let Some(d) = self.dirty.as_mut() {
            d.keys.insert(key.into(), Some(now));
        }
        for c in &plan.counters {
            self.count_at_once(c, now);
        }
        if self.records.enabled && plan.record {
            let series =
                self.rollups
                    .series_id(&plan.series, None, self.records.max_values_per_dimension);
            let usage = plan.usage;
            let measures = Measures::of_call(usage.units, usage.tokens, plan.credits(&usage));
            self.attribute(
                RecordKind::Ingested,
                series,
                now,
                measures,
                RecordRef::Key(key.into()),
            );
        }
        true
    }

    /// Counts `c`'s amount at once (ingested usage, a committed decision): held and committed
    /// as an expired hold is, so a concurrency slot is taken and given back and every other
    /// counter keeps the amount. The counter's state after, if it has one.
    fn count_at_once(&mut self, c: &PlannedCounter, now: Timestamp) -> Option<&CounterState> {
        if let Some(d) = self.dirty.as_mut() {
            d.counters.insert(c.key);
        }
        let state = match self.counters.entry(c.key) {
            Entry::Occupied(o) => Some(o.into_mut()),
            Entry::Vacant(v) => CounterState::fresh(&c.spec, now).map(|s| v.insert(s)),
        }?;
        let mark = counter::hold(&c.spec, state, c.amount, now);
        counter::expire(state, &mark);
        Some(state)
    }

    /// Commits every hold whose TTL has passed at its held amount. Returns how many.
    pub fn expire_due(&mut self, now: Timestamp) -> usize {
        let mut expired = 0;
        while let Some(Reverse((at, seq))) = self.expiry.peek().copied() {
            if at > now {
                break;
            }
            self.expiry.pop();
            let Some(hold) = self.holds.remove(&seq) else {
                continue;
            };
            self.touch_hold(&hold, seq);
            for part in &hold.parts {
                if let Some(state) = self.counters.get_mut(&part.key) {
                    counter::expire(state, &part.mark);
                }
            }
            if let Some(r) = hold.record {
                let measures = Measures::of_call(r.held.units, r.held.tokens, r.credits);
                let reference = RecordRef::Hold { seq, tag: hold.tag };
                self.attribute(RecordKind::Expired, r.series, at, measures, reference);
            }
            expired += 1;
        }
        if self.records.enabled {
            self.rollups.prune(now, &self.records);
        }
        expired
    }

    /// The earliest expiry still pending, if any (a hint for sweepers).
    pub fn next_expiry(&self) -> Option<Timestamp> {
        self.expiry.peek().map(|Reverse((at, _))| *at)
    }

    pub fn add_grant(&mut self, pool: CounterKey, grant: GrantBalance) -> bool {
        self.touch(pool);
        let state = self
            .counters
            .entry(pool)
            .or_insert_with(|| CounterState::Credits(Box::default()));
        match state {
            CounterState::Credits(p) => p.add_grant(grant),
            _ => false,
        }
    }

    pub fn inspect(
        &self,
        key: CounterKey,
        spec: &CounterSpec,
        now: Timestamp,
    ) -> Option<counter::Inspection> {
        self.counters
            .get(&key)
            .map(|s| counter::inspect(spec, s, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_plan() -> Plan {
        Plan {
            customer: "acme".into(),
            chain: Vec::new(),
            counters: Vec::new(),
            usage: Usage::units(1),
            hold_ttl_millis: 1_000,
            max_settle: 10,
            hold_tag: 0,
            series: Default::default(),
            record: true,
        }
    }

    #[test]
    fn changes_give_each_idempotency_key_its_latest_fate() {
        let keep_one = KeyRetention {
            millis: i64::MAX,
            max_keys: 1,
        };
        let at = Timestamp::from_millis;
        let mut l = Ledger::tracked();
        let plan = empty_plan();
        assert!(l.record(&plan, "a", keep_one, at(1)));
        assert!(l.record(&plan, "b", keep_one, at(2)), "evicts a");
        assert!(l.record(&plan, "a", keep_one, at(3)), "a again, evicts b");
        let mut keys = l.take_changes().keys;
        keys.sort();
        assert_eq!(
            keys,
            vec![("a".into(), Some(at(3))), ("b".into(), None)],
            "a is remembered (seen at 3), b forgotten"
        );
        assert!(!l.has_changes());
        let untracked = Ledger::default().take_changes();
        assert_eq!(untracked, Changes::default());
    }
}
