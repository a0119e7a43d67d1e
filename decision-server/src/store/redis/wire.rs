//! The script's wire format, named once on the Rust side: its numbers for counter kinds,
//! amount rules, grant categories and results, the slots of its reply header, the counter
//! states it packs with msgpack, and the argument group of one planned counter. Each name
//! says which part of the script (`lua/`) it mirrors; change both together. The numbers the
//! script needs too are written into it from here (`script.rs`).

use std::sync::Arc;

use redis::Value;

use super::call::Call;
use rustc_hash::FxHashMap;

use crate::core::Timestamp;
use crate::core::counter::{CounterSpec, CounterState};
use crate::core::credits::{CreditPool, GrantBalance};
use crate::core::model::GrantCategory;
use crate::core::plan::{AmountRule, Plan};
use crate::core::rollup::{
    Granularity, LocalRecord, Measures, RecordKind, RecordRef, RecordSettings, SeriesDraft,
    SeriesKey, UsageRecord,
};
use crate::core::window::{RING, WindowState};
use crate::store::StoreError;
use crate::store::events::{EventBody, StreamRetention};

/// How long after a bucket ends a reader may seal it (`lua/rollup.lua` `bucket_add`: "A reader
/// seals only buckets that ended SEAL_GRACE before its own now"): a write into a bucket that
/// has not ended by the writer's clock does not look for seals, which is right while the
/// replicas' clocks agree within this.
pub const SEAL_GRACE_MS: i64 = 300_000;

/// Counter kinds (`RATE, QUOTA, CONC, CRED` in the script, written from these), the tag of each
/// packed state.
pub const KIND_RATE: u8 = 1;
pub const KIND_QUOTA: u8 = 2;
pub const KIND_CONCURRENCY: u8 = 3;
pub const KIND_CREDITS: u8 = 4;

/// Amount rules (`lua/prelude.lua` header: "rules are 0 units, 1 one per request, 2 priced").
pub const RULE_UNITS: u8 = 0;
pub const RULE_PER_REQUEST: u8 = 1;
pub const RULE_PRICED: u8 = 2;

/// Grant categories (`lua/entities.lua` `grant()`: "category (0 promotional, 1 paid)").
pub const CATEGORY_PROMO: i64 = 0;
pub const CATEGORY_PAID: i64 = 1;

/// The reply header every call starts with (`lua/ledger.lua` `reply()`: `{result, holds open,
/// counters, earliest hold expiry, holds version}`); the operation's own items follow.
pub const SLOT_RESULT: usize = 0;
pub const SLOT_HOLDS_OPEN: usize = 1;
pub const SLOT_COUNTERS: usize = 2;
pub const SLOT_NEXT_EXPIRY: usize = 3;
pub const SLOT_HOLDS_VERSION: usize = 4;
pub const HEADER: usize = 5;

/// `reserve()`'s result when a hold under the call's tag is already open: the call ran
/// before (its answer was lost and the client sent it again). The hold's number and the
/// counters' states now (that hold included) follow, as for a placed hold.
pub const RESERVE_REPLAYED: i64 = -1;

/// `close()`'s results.
pub const CLOSE_CLOSED: i64 = 0;
pub const CLOSE_ALREADY_CLOSED: i64 = 1;
pub const CLOSE_NO_SUCH_HOLD: i64 = 2;
/// The hold has priced parts: their four per-million prices follow; price and call again.
pub const CLOSE_NEEDS_PRICES: i64 = 3;
/// The usage is over the hold's max settle, which follows.
pub const CLOSE_TOO_LARGE: i64 = 4;
/// Prices per priced part in `close()`'s `CLOSE_NEEDS_PRICES` reply.
pub const PRICES_PER_PART: usize = 4;

/// `entity()`'s results; found and created are followed by the type and parent.
pub const ENTITY_FOUND: i64 = 0;
pub const ENTITY_CREATED: i64 = 1;
pub const ENTITY_FULL: i64 = 2;
pub const ENTITY_ABSENT: i64 = 3;

/// Entities one `entitypage()` call scans (`lua/entities.lua`: `HSCAN ... COUNT ENTITY_PAGE`).
pub const ENTITY_PAGE: usize = 512;

/// `record()`'s and `grant()`'s "done" (1) against "already there" (0); `cancel()`'s
/// "released" (1) against "remembered" (0).
pub const DONE: i64 = 1;

/// A planned counter's kind, limit and bucket (or period index), as the script numbers them.
pub fn kind_code(spec: &CounterSpec, now: Timestamp) -> (u8, u64, i64) {
    match spec {
        CounterSpec::Rate { limit, window } => (KIND_RATE, *limit, window.bucket_at(now)),
        CounterSpec::Quota { limit, index, .. } => (KIND_QUOTA, *limit, *index),
        CounterSpec::Concurrency { limit } => (KIND_CONCURRENCY, u64::from(*limit), 0),
        CounterSpec::Credits { .. } => (KIND_CREDITS, 0, 0),
    }
}

/// An amount rule and its four per-million prices (zero unless priced).
pub fn rule_code(rule: &AmountRule) -> (u8, [u64; 4]) {
    match rule {
        AmountRule::Units => (RULE_UNITS, [0; 4]),
        AmountRule::PerRequest => (RULE_PER_REQUEST, [0; 4]),
        AmountRule::Priced(p) => (
            RULE_PRICED,
            [
                p.input_per_million,
                p.output_per_million,
                p.cached_per_million,
                p.cache_write_per_million,
            ],
        ),
    }
}

pub fn category_code(c: GrantCategory) -> i64 {
    match c {
        GrantCategory::Promo => CATEGORY_PROMO,
        GrantCategory::Paid => CATEGORY_PAID,
    }
}

fn category_of(code: i64) -> GrantCategory {
    if code == CATEGORY_PROMO {
        GrantCategory::Promo
    } else {
        GrantCategory::Paid
    }
}

/// A hold tag as the script keeps it: 32 hex digits (a Lua number could not hold 128 bits).
pub fn tag_text(tag: u128) -> String {
    format!("{tag:032x}")
}

pub fn bad_reply(what: &str) -> StoreError {
    StoreError::Unavailable(format!("redis: unexpected script reply: {what}"))
}

pub fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    }
}

/// The operation's result (the header's first slot).
pub fn result(reply: &[Value]) -> Option<i64> {
    reply.get(SLOT_RESULT).and_then(int)
}

fn mp_int(v: &rmpv::Value) -> Option<i64> {
    match v {
        rmpv::Value::Integer(i) => i.as_i64().or_else(|| i.as_u64().map(|u| u as i64)),
        // Lua numbers are doubles; the script only stores whole ones.
        rmpv::Value::F64(f) => Some(*f as i64),
        rmpv::Value::F32(f) => Some(*f as i64),
        _ => None,
    }
}

fn mp_u64(v: &rmpv::Value) -> Option<u64> {
    mp_int(v).map(|i| u64::try_from(i).unwrap_or(0))
}

/// An array, or an empty map (which is how an empty Lua table may come back).
fn mp_array(v: &rmpv::Value) -> Option<&[rmpv::Value]> {
    match v {
        rmpv::Value::Array(a) => Some(a),
        rmpv::Value::Map(m) if m.is_empty() => Some(&[]),
        _ => None,
    }
}

/// A counter state as the script packs it (`lua/prelude.lua` header, "Counter states are msgpack
/// arrays tagged by kind").
fn decode_state(bytes: &[u8]) -> Option<CounterState> {
    let value = rmpv::decode::read_value(&mut &bytes[..]).ok()?;
    let a = mp_array(&value)?;
    let kind = u8::try_from(mp_int(a.first()?)?).ok()?;
    match kind {
        KIND_RATE => {
            let mut counts = [0u32; RING];
            for (c, v) in counts.iter_mut().zip(a.get(2..)?) {
                *c = u32::try_from(mp_u64(v)?).unwrap_or(u32::MAX);
            }
            Some(CounterState::Window(WindowState::from_parts(
                mp_int(a.get(1)?)?,
                counts,
            )))
        }
        KIND_QUOTA => Some(CounterState::Period {
            index: mp_int(a.get(1)?)?,
            used: mp_u64(a.get(2)?)?,
        }),
        KIND_CONCURRENCY => Some(CounterState::InFlight(
            u32::try_from(mp_u64(a.get(1)?)?).unwrap_or(u32::MAX),
        )),
        KIND_CREDITS => {
            let debt = mp_u64(a.get(1)?)?;
            let order = mp_array(a.get(2)?)?
                .iter()
                .map(|p| mp_u64(p).and_then(|p| u32::try_from(p).ok()))
                .collect::<Option<Vec<u32>>>()?;
            let grants = mp_array(a.get(3)?)?
                .iter()
                .map(|g| {
                    let g = mp_array(g)?;
                    Some(GrantBalance {
                        id: g.first()?.as_str()?.to_string(),
                        priority: u32::try_from(mp_u64(g.get(1)?)?).unwrap_or(u32::MAX),
                        expires_at: match g.get(2)? {
                            rmpv::Value::Boolean(false) | rmpv::Value::Nil => None,
                            v => Some(Timestamp::from_millis(mp_int(v)?)),
                        },
                        category: category_of(mp_int(g.get(3)?)?),
                        amount: mp_u64(g.get(4)?)?,
                        remaining: mp_u64(g.get(5)?)?,
                    })
                })
                .collect::<Option<Vec<_>>>()?;
            Some(CounterState::Credits(Box::new(CreditPool::from_parts(
                grants, order, debt,
            ))))
        }
        _ => None,
    }
}

/// A state read back from Redis: `None` for no state; undecodable bytes are an error, never
/// a silently empty counter.
pub fn state_of(v: &Value) -> Result<Option<CounterState>, StoreError> {
    match v {
        Value::Nil => Ok(None),
        Value::BulkString(b) => decode_state(b)
            .map(Some)
            .ok_or_else(|| bad_reply("a counter state that does not decode")),
        _ => Err(bad_reply("a counter state that is not bytes")),
    }
}

/// How many record settings a recording call ends with (`REC_ARGS` in the script):
/// [`push_record_settings`] pushes exactly these.
pub const REC_ARGS: usize = 7;

/// The record settings every recording call ends with (`REC_ARGS`): enabled, the three
/// retentions, the most values of one dimension, the stream's retention and most events.
pub fn push_record_settings(inv: &mut Call<'_>, s: &RecordSettings, stream: &StreamRetention) {
    inv.arg(u8::from(s.enabled));
    for ms in s.retention_millis {
        inv.arg(ms);
    }
    inv.arg(s.max_values_per_dimension)
        .arg(stream.millis)
        .arg(stream.max_events);
}

/// A plan's record arguments (`lua/rollup.lua` `draft_at`, then each counter's limit id and level,
/// then `measures`): the series draft with its attributes in byte order, each marked
/// foldable when it is a dimension rather than a chain level.
pub fn push_record_draft(inv: &mut Call<'_>, plan: &Plan, measures: &Measures) {
    push_series_draft(inv, &plan.series);
    for c in &plan.counters {
        inv.arg(c.limit_id.as_str()).arg(c.level);
    }
    for m in measures.to_array() {
        inv.arg(m);
    }
}

/// A draft's attributes in byte order, one value per name, each marked foldable when it is a
/// dimension rather than a chain level (as `SeriesDraft::key_with` orders them).
fn draft_attrs(d: &SeriesDraft) -> Vec<(&str, &str, bool)> {
    let mut attrs: Vec<(&str, &str, bool)> = d
        .chain
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str(), false))
        .chain(d.dimensions.iter().map(|(k, v)| (k.as_str(), &**v, true)))
        .collect();
    attrs.sort();
    attrs.dedup_by(|a, b| a.0 == b.0);
    attrs
}

/// A series draft (`lua/rollup.lua` `draft_at`): the feature, the attribute count, then each
/// attribute in byte order, marked foldable when it is a dimension rather than a chain level.
pub fn push_series_draft(inv: &mut Call<'_>, d: &SeriesDraft) {
    let attrs = draft_attrs(d);
    inv.arg(d.feature.as_str()).arg(attrs.len());
    for (k, v, fold) in attrs {
        inv.arg(k).arg(v).arg(u8::from(fold));
    }
}

/// The series a draft with nothing to fold makes, packed as the script's `series_of` packs
/// it (msgpack `{feature, name, value, ...}`, strings as str, the shortest headers); `None`
/// when a dimension value may fold, which only the script can tell.
fn packed_series(d: &SeriesDraft) -> Result<Option<Vec<u8>>, StoreError> {
    let attrs = draft_attrs(d);
    if attrs.iter().any(|a| a.2) {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(16 + attrs.len() * 24);
    let len = u32::try_from(1 + 2 * attrs.len()).map_err(packed)?;
    rmp::encode::write_array_len(&mut out, len).map_err(packed)?;
    rmp::encode::write_str(&mut out, d.feature.as_str()).map_err(packed)?;
    for (k, v, _) in attrs {
        rmp::encode::write_str(&mut out, k).map_err(packed)?;
        rmp::encode::write_str(&mut out, v).map_err(packed)?;
    }
    Ok(Some(out))
}

/// The most local records one stream entry holds (`lua/locals.lua` `locals`): a batch longer than
/// this is written as several entries, so reading one never unpacks more than this many.
pub const LOCALS_PER_ENTRY: usize = 512;

/// A local record batch that could not be packed (writing to memory: never in practice).
fn packed(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("redis: packing local records: {e}"))
}

/// A batch of one customer's local records as `lua/locals.lua` `locals` takes it, after the
/// invocation's `now`: the distinct series drafts once each; the measures summed per draft
/// and minute (the script adds each sum to its minute, hour and day buckets); then the events
/// in entries of at most [`LOCALS_PER_ENTRY`], each packed here as msgpack
/// `[{kind, time, draft number, measures, hold number, tag}, ...]` with its event count.
///
/// Trade-off: the script stores each entry's bytes as they come and never builds or packs a
/// record itself. Built there, a record's `XADD` and `cmsgpack.pack` alone cost Redis about
/// 2.5 µs (measured in a script), and records were 14 µs of Redis per local decision in all
/// (`bench/README.md`); a reader now unpacks an entry instead (see `events`), far less often.
pub struct LocalBatch<'a> {
    /// The distinct series, in the order their numbers count from 1.
    series: Vec<SeriesArg<'a>>,
    sums: std::collections::BTreeMap<(usize, i64), [u64; 9]>,
    entries: Vec<(Vec<u8>, usize)>,
}

/// A batch's series as the script takes it: packed here when nothing in it folds (see
/// [`packed_series`]), else the draft for the script to fold.
enum SeriesArg<'a> {
    Packed(Vec<u8>),
    Draft(&'a SeriesDraft),
}

impl<'a> LocalBatch<'a> {
    /// Packs `records`, yielding to the runtime after each entry: the work grows with the
    /// batch, and between entries the worker serves the decisions waiting on it.
    pub async fn pack(records: &'a [LocalRecord]) -> Result<Self, StoreError> {
        let mut batch = LocalBatch {
            series: Vec::new(),
            sums: std::collections::BTreeMap::new(),
            entries: Vec::new(),
        };
        let mut numbers: FxHashMap<&SeriesDraft, usize> = FxHashMap::default();
        for chunk in records.chunks(LOCALS_PER_ENTRY) {
            // Written straight into the entry's bytes: no value tree per record.
            let mut bytes = Vec::with_capacity(chunk.len() * 96);
            let len = u32::try_from(chunk.len()).map_err(packed)?;
            rmp::encode::write_array_len(&mut bytes, len).map_err(packed)?;
            for r in chunk {
                let n = match numbers.get(&r.series) {
                    Some(n) => *n,
                    None => {
                        batch.series.push(match packed_series(&r.series)? {
                            Some(bytes) => SeriesArg::Packed(bytes),
                            None => SeriesArg::Draft(&r.series),
                        });
                        numbers.insert(&r.series, batch.series.len());
                        batch.series.len()
                    }
                };
                let m = r.measures.to_array();
                let sum = batch
                    .sums
                    .entry((n, Granularity::Minute.start(r.at)))
                    .or_insert([0; 9]);
                for (s, x) in sum.iter_mut().zip(m) {
                    *s = s.saturating_add(x);
                }
                let mut tag = [0u8; 32];
                hex::encode_to_slice(r.tag.to_be_bytes(), &mut tag).map_err(packed)?;
                let w = &mut bytes;
                rmp::encode::write_array_len(w, 6).map_err(packed)?;
                rmp::encode::write_sint(w, record_kind_code(r.kind)).map_err(packed)?;
                rmp::encode::write_sint(w, r.at.millis()).map_err(packed)?;
                rmp::encode::write_uint(w, n as u64).map_err(packed)?;
                rmp::encode::write_array_len(w, 9).map_err(packed)?;
                for x in m {
                    rmp::encode::write_uint(w, x).map_err(packed)?;
                }
                rmp::encode::write_uint(w, r.seq).map_err(packed)?;
                // The tag's 32 hex digits, as `tag_text` writes them.
                rmp::encode::write_str_len(w, 32).map_err(packed)?;
                w.extend_from_slice(&tag);
            }
            batch.entries.push((bytes, chunk.len()));
            tokio::task::yield_now().await;
        }
        Ok(batch)
    }

    /// The batch's arguments, in the script's order.
    pub fn push(self, inv: &mut Call<'_>) {
        inv.arg(self.series.len());
        for series in self.series {
            match series {
                SeriesArg::Packed(bytes) => {
                    inv.arg(0).arg(bytes);
                }
                SeriesArg::Draft(d) => {
                    inv.arg(1);
                    push_series_draft(inv, d);
                }
            }
        }
        inv.arg(self.sums.len());
        for ((n, minute), m) in self.sums {
            inv.arg(n).arg(minute);
            for x in m {
                inv.arg(x);
            }
        }
        inv.arg(self.entries.len());
        for (bytes, count) in self.entries {
            inv.arg(bytes).arg(count);
        }
    }
}

/// Record kinds and their codes in the script (`SETTLED, RELEASED, EXPIRED,
/// INGESTED, DENIED, COMMITTED` in the script, written from these; 6 is [`KIND_ALERT`]).
const RECORD_KINDS: [(i64, RecordKind); 6] = [
    (1, RecordKind::Settled),
    (2, RecordKind::Released),
    (3, RecordKind::Expired),
    (4, RecordKind::Ingested),
    (5, RecordKind::Denied),
    (7, RecordKind::Committed),
];

/// The script's code for a record kind.
pub fn record_kind_code(kind: RecordKind) -> i64 {
    RECORD_KINDS
        .iter()
        .find_map(|(c, k)| (*k == kind).then_some(*c))
        .unwrap_or(0)
}

/// A series as the script packs it: {feature, name, value, ...}.
pub fn decode_series(bytes: &[u8]) -> Option<SeriesKey> {
    let value = rmpv::decode::read_value(&mut &bytes[..]).ok()?;
    let a = mp_array(&value)?;
    let feature: Box<str> = a.first()?.as_str()?.into();
    let mut attrs = a
        .get(1..)?
        .chunks(2)
        .map(|kv| Some((kv.first()?.as_str()?.into(), kv.get(1)?.as_str()?.into())))
        .collect::<Option<Vec<(Box<str>, Box<str>)>>>()?;
    attrs.sort();
    Some(SeriesKey { feature, attrs })
}

fn decode_measures(v: &rmpv::Value) -> Option<Measures> {
    let a = mp_array(v)?;
    let n = a.iter().map(mp_u64).collect::<Option<Vec<u64>>>()?;
    Some(Measures::from_slice(&n))
}

/// Packed measures (a bucket field's value).
pub fn measures_of(bytes: &[u8]) -> Option<Measures> {
    decode_measures(&rmpv::decode::read_value(&mut &bytes[..]).ok()?)
}

/// The record kind of a script's code.
fn record_kind(code: i64) -> Option<RecordKind> {
    RECORD_KINDS
        .iter()
        .find_map(|(c, k)| (*c == code).then_some(*k))
}

/// The alert kind on the stream (`ALERT` in the script, written from this): {6, time, body}.
pub const KIND_ALERT: i64 = 6;

/// A stream event as the script packs it: a record, or an alert.
pub fn decode_event(bytes: &[u8]) -> Option<(Timestamp, EventBody)> {
    let value = rmpv::decode::read_value(&mut &bytes[..]).ok()?;
    let a = mp_array(&value)?;
    if mp_int(a.first()?)? == KIND_ALERT {
        let at = Timestamp::from_millis(mp_int(a.get(1)?)?);
        let body = match a.get(2)? {
            rmpv::Value::String(s) => s.as_str()?.to_string(),
            rmpv::Value::Binary(b) => String::from_utf8(b.clone()).ok()?,
            _ => return None,
        };
        return Some((at, EventBody::Alert(body)));
    }
    let r = decode_record(a)?;
    Some((r.at, EventBody::Record(r)))
}

/// A usage record as the script packs it: {kind, time, series, measures, a, b}, where (a, b)
/// is (hold number, tag), (idempotency key, false) or (denying level, units asked).
fn decode_record(a: &[rmpv::Value]) -> Option<UsageRecord> {
    let kind = record_kind(mp_int(a.first()?)?)?;
    let series = match a.get(2)? {
        rmpv::Value::Binary(b) => decode_series(b)?,
        rmpv::Value::String(s) => decode_series(s.as_bytes())?,
        _ => return None,
    };
    let reference = match kind {
        RecordKind::Ingested => RecordRef::Key(a.get(4)?.as_str()?.into()),
        // An entry written before denials kept what they asked for has `false` there: 0.
        RecordKind::Denied => RecordRef::Denial {
            level: usize::try_from(mp_u64(a.get(4)?)?).ok()?,
            asked: a.get(5).and_then(mp_u64).unwrap_or(0),
        },
        _ => RecordRef::Hold {
            seq: mp_u64(a.get(4)?)?,
            tag: u128::from_str_radix(a.get(5)?.as_str()?, 16).ok()?,
        },
    };
    Some(UsageRecord {
        kind,
        at: Timestamp::from_millis(mp_int(a.get(1)?)?),
        series: Arc::new(series),
        measures: decode_measures(a.get(3)?)?,
        reference,
    })
}

/// One planned counter, as the script's group of arguments (`lua/counter.lua` `planned()`: entity
/// key index, field, kind, limit, bucket or period index, enforcing, amount, rule, four prices).
#[derive(Debug)]
pub struct CounterArgs {
    pub key: usize,
    pub field: String,
    pub kind: u8,
    pub limit: u64,
    pub at: i64,
    pub enforce: bool,
    pub amount: u64,
    pub rule: u8,
    pub prices: [u64; 4],
}

impl CounterArgs {
    pub fn push(&self, inv: &mut Call<'_>) {
        inv.arg(self.key)
            .arg(&self.field)
            .arg(self.kind)
            .arg(self.limit)
            .arg(self.at)
            .arg(u8::from(self.enforce))
            .arg(self.amount)
            .arg(self.rule)
            .arg(self.prices[0])
            .arg(self.prices[1])
            .arg(self.prices[2])
            .arg(self.prices[3]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undecodable_states_are_errors() {
        assert!(state_of(&Value::BulkString(vec![0xc1])).is_err());
        assert!(state_of(&Value::Int(3)).is_err());
        assert_eq!(state_of(&Value::Nil).unwrap(), None);
    }
}
