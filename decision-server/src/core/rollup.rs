//! Usage attribution: the record every settle, release, expiry, ingest and denial produces,
//! the series it is attributed to (the feature, every level of the entity chain, the declared
//! dimensions), and the per-customer rollups of records in minute, hour and day buckets.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use super::Timestamp;
use super::symbols::Name;
use super::usage::TokenCounts;

/// What a folded dimension value reads as, once a customer has the most distinct values of
/// that dimension its settings allow.
pub const OTHER: &str = "__other__";

/// The attribute a denial's series carries: the limit that blocked it.
pub const DENIED_BY: &str = "deniedBy";

/// A bucket size.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub const ALL: [Granularity; 3] = [Granularity::Minute, Granularity::Hour, Granularity::Day];

    pub fn millis(self) -> i64 {
        match self {
            Granularity::Minute => 60_000,
            Granularity::Hour => 3_600_000,
            Granularity::Day => 86_400_000,
        }
    }

    /// The start of the bucket holding `at` (buckets are aligned to UTC).
    pub fn start(self, at: Timestamp) -> i64 {
        at.millis().div_euclid(self.millis()) * self.millis()
    }

    pub fn index(self) -> usize {
        match self {
            Granularity::Minute => 0,
            Granularity::Hour => 1,
            Granularity::Day => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Granularity::Minute => "MINUTE",
            Granularity::Hour => "HOUR",
            Granularity::Day => "DAY",
        }
    }
}

/// How long each bucket size is kept, and how many distinct values of one dimension a
/// customer's series may carry before further values fold into [`OTHER`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordSettings {
    pub enabled: bool,
    /// Retention in ms by [`Granularity::index`].
    pub retention_millis: [i64; 3],
    pub max_values_per_dimension: usize,
    /// The most points (windows × series) one history query returns.
    pub max_query_points: usize,
}

impl Default for RecordSettings {
    /// Minute buckets for 48 hours, hour buckets for 90 days, day buckets for two years; a
    /// thousand distinct values per dimension and customer.
    fn default() -> Self {
        Self {
            enabled: true,
            retention_millis: [48 * 3_600_000, 90 * 86_400_000, 730 * 86_400_000],
            max_values_per_dimension: 1_000,
            max_query_points: 10_000,
        }
    }
}

impl RecordSettings {
    pub fn retention(&self, g: Granularity) -> i64 {
        self.retention_millis[g.index()]
    }

    /// Whether a bucket of `g` starting at `start` is past its retention at `now`.
    pub fn expired(&self, g: Granularity, start: i64, now: Timestamp) -> bool {
        start + g.millis() + self.retention(g) <= now.millis()
    }
}

/// What one record adds to its series' bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Measures {
    pub units: u64,
    pub input: u64,
    pub output: u64,
    pub cached: u64,
    pub cache_write: u64,
    pub reasoning: u64,
    pub credits: u64,
    /// Records of calls (settled, released, expired or ingested).
    pub requests: u64,
    pub denied: u64,
}

impl Measures {
    pub fn add(&mut self, o: &Measures) {
        self.units = self.units.saturating_add(o.units);
        self.input = self.input.saturating_add(o.input);
        self.output = self.output.saturating_add(o.output);
        self.cached = self.cached.saturating_add(o.cached);
        self.cache_write = self.cache_write.saturating_add(o.cache_write);
        self.reasoning = self.reasoning.saturating_add(o.reasoning);
        self.credits = self.credits.saturating_add(o.credits);
        self.requests = self.requests.saturating_add(o.requests);
        self.denied = self.denied.saturating_add(o.denied);
    }

    /// One call's measures: its units, its token split when known, the credits it was
    /// priced at.
    pub fn of_call(units: u64, tokens: Option<TokenCounts>, credits: u64) -> Self {
        let t = tokens.unwrap_or_default();
        Self {
            units,
            input: t.input,
            output: t.output,
            cached: t.cached,
            cache_write: t.cache_write,
            reasoning: t.reasoning,
            credits,
            requests: 1,
            denied: 0,
        }
    }

    pub fn denial() -> Self {
        Self {
            denied: 1,
            ..Self::default()
        }
    }

    /// The measures in the order a store packs them (the Redis script keeps the same order).
    pub fn to_array(&self) -> [u64; 9] {
        [
            self.units,
            self.input,
            self.output,
            self.cached,
            self.cache_write,
            self.reasoning,
            self.credits,
            self.requests,
            self.denied,
        ]
    }

    pub fn from_slice(v: &[u64]) -> Self {
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        Self {
            units: at(0),
            input: at(1),
            output: at(2),
            cached: at(3),
            cache_write: at(4),
            reasoning: at(5),
            credits: at(6),
            requests: at(7),
            denied: at(8),
        }
    }
}

/// What a series is: the feature and its attributes, sorted by name. The attributes are the
/// entity chain (`<type>Id` → entity id) and the declared dimensions (name → value, folded).
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct SeriesKey {
    pub feature: Box<str>,
    pub attrs: Vec<(Box<str>, Box<str>)>,
}

impl SeriesKey {
    /// The value of attribute `name`, if the series has it.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.attrs
            .binary_search_by(|(k, _)| k.as_ref().cmp(name))
            .ok()
            .and_then(|i| self.attrs.get(i))
            .map(|(_, v)| v.as_ref())
    }
}

/// A decision's series before its dimension values are folded: known when the plan is made,
/// folded by the store that keeps the customer's distinct values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct SeriesDraft {
    pub feature: Name,
    /// The chain, as `<type>Id` → entity id; never folded (entities are bounded already).
    pub chain: Vec<(Name, Name)>,
    /// Declared dimensions that are not entity ids; folded past the customer's cap.
    pub dimensions: Vec<(Name, Box<str>)>,
}

impl SeriesDraft {
    /// Whether `key` is exactly the key this draft makes unfolded (with `denied_by`): every
    /// chain level and dimension with its own value, and nothing else.
    fn made(&self, key: &SeriesKey, denied_by: Option<Name>) -> bool {
        let expected = self.chain.len() + self.dimensions.len() + usize::from(denied_by.is_some());
        key.attrs.len() == expected
            && *key.feature == *self.feature.as_str()
            && self
                .chain
                .iter()
                .all(|(k, v)| key.get(k.as_str()) == Some(v.as_str()))
            && self
                .dimensions
                .iter()
                .all(|(k, v)| key.get(k.as_str()) == Some(&**v))
            && denied_by.is_none_or(|l| key.get(DENIED_BY) == Some(l.as_str()))
    }

    /// The series key, dimension values passed through `fold`, sorted; for a denial, with the
    /// blocking limit as [`DENIED_BY`].
    pub fn key_with(
        &self,
        denied_by: Option<Name>,
        mut fold: impl FnMut(&str, &str) -> Box<str>,
    ) -> SeriesKey {
        let mut attrs: Vec<(Box<str>, Box<str>)> =
            Vec::with_capacity(self.chain.len() + self.dimensions.len() + 1);
        attrs.extend(
            self.chain
                .iter()
                .map(|(k, v)| (Box::from(k.as_str()), Box::from(v.as_str()))),
        );
        attrs.extend(
            self.dimensions
                .iter()
                .map(|(k, v)| (Box::from(k.as_str()), fold(k.as_str(), v))),
        );
        if let Some(limit) = denied_by {
            attrs.push((DENIED_BY.into(), limit.as_str().into()));
        }
        attrs.sort();
        attrs.dedup_by(|a, b| a.0 == b.0);
        SeriesKey {
            feature: self.feature.as_str().into(),
            attrs,
        }
    }
}

/// One usage record, as the push stream carries it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UsageRecord {
    pub kind: RecordKind,
    pub at: Timestamp,
    /// Shared with the rollups (and every other record of the series).
    pub series: Arc<SeriesKey>,
    pub measures: Measures,
    pub reference: RecordRef,
}

/// What a record came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RecordRef {
    /// A hold (settle, release, expiry): its number and tag; with the customer, its id.
    Hold { seq: u64, tag: u128 },
    /// An ingested event's idempotency key.
    Key(Box<str>),
    /// A denial recorded before denials kept what they asked for: the chain level of the limit
    /// that blocked it (0 is the leaf). Still read from older durable files.
    Level(usize),
    /// A denial: the chain level of the limit that blocked it (0 is the leaf) and the units of
    /// the feature the call asked for (nothing was spent: its measures count the denial only).
    /// Last among the variants, so older durable files still decode.
    Denial { level: usize, asked: u64 },
}

/// The usage record of a decision a replica made inside its lease, without the store: written
/// to the store later, in a batch, as the store would have written it at `at`.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalRecord {
    /// Settled, released or expired (a local decision is never denied: without room in its
    /// lease it goes to the store).
    pub kind: RecordKind,
    pub at: Timestamp,
    pub series: SeriesDraft,
    pub measures: Measures,
    /// The local hold's number and tag.
    pub seq: u64,
    pub tag: u128,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RecordKind {
    Settled,
    Released,
    Expired,
    Ingested,
    Denied,
    /// A granted decision whose usage was final when it was made (`ReserveMode::Commit`):
    /// counted at once, with no hold. Referenced as a hold numbered 0 with the decision's tag.
    Committed,
}

impl RecordKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Settled => "settled",
            RecordKind::Released => "released",
            RecordKind::Expired => "expired",
            RecordKind::Ingested => "ingested",
            RecordKind::Denied => "denied",
            RecordKind::Committed => "committed",
        }
    }
}

/// Bucket `start` of size `g`, for one series.
pub type BucketKey = (Granularity, i64, u32);

/// One bucket: the measures of every series that recorded in it, by series id.
pub type Bucket = FxHashMap<u32, Measures>;

/// What a usage read needs of the buckets, so that a store can read less than every series:
/// the attributes the caller looks at (`None`: every one; the feature is always kept) and the
/// values it filters on exactly. A store may answer with series that carry only `keys`,
/// summed over the rest (rows must still pass `equals` when the caller filters them); an
/// answer with every series whole is always right.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanNeeds {
    pub keys: Option<Vec<String>>,
    pub equals: Vec<(String, String)>,
    /// The reader's time: buckets that ended before it are closed.
    pub now: i64,
}

impl ScanNeeds {
    /// Every series whole.
    pub fn all(now: i64) -> Self {
        Self {
            keys: None,
            equals: Vec::new(),
            now,
        }
    }
}

/// Buckets of one size read for a query: each bucket's start and contents, and the keys of
/// the series their ids name. Grouping reads each series' key once, not once per bucket.
#[derive(Debug, Clone, Default)]
pub struct BucketScan {
    pub series: Vec<Arc<SeriesKey>>,
    pub buckets: Vec<(i64, Arc<Bucket>)>,
}

impl BucketScan {
    /// A scan of `rows` (bucket start, series, measures), as a networked store reads them.
    pub fn from_rows(rows: impl IntoIterator<Item = (i64, SeriesKey, Measures)>) -> Self {
        let mut ids: FxHashMap<SeriesKey, u32> = FxHashMap::default();
        let mut by_start: BTreeMap<i64, Bucket> = BTreeMap::new();
        let mut series = Vec::new();
        for (start, key, m) in rows {
            let next = u32::try_from(series.len()).unwrap_or(u32::MAX);
            let id = *ids.entry(key).or_insert_with_key(|k| {
                series.push(Arc::new(k.clone()));
                next
            });
            by_start
                .entry(start)
                .or_default()
                .entry(id)
                .or_default()
                .add(&m);
        }
        Self {
            series,
            buckets: by_start
                .into_iter()
                .map(|(s, b)| (s, Arc::new(b)))
                .collect(),
        }
    }

    /// Every row: (bucket start, series, measures), bucket by bucket.
    pub fn rows(&self) -> impl Iterator<Item = (i64, &SeriesKey, &Measures)> {
        self.buckets.iter().flat_map(move |(start, bucket)| {
            bucket.iter().filter_map(move |(id, m)| {
                self.series
                    .get(*id as usize)
                    .map(|k| (*start, k.as_ref(), m))
            })
        })
    }

    /// How many rows the scan holds.
    pub fn len(&self) -> usize {
        self.buckets.iter().map(|(_, b)| b.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.iter().all(|(_, b)| b.is_empty())
    }
}

/// One customer's rollups: its series (by id), the distinct values of its folded dimensions,
/// and the buckets. In-process stores keep one per ledger, under the customer's lock.
#[derive(Debug, Default, Clone)]
pub struct Rollups {
    ids: FxHashMap<Arc<SeriesKey>, u32>,
    series: Vec<Arc<SeriesKey>>,
    /// A draft's hash (with its blocking limit) → the series it made: a known series is found
    /// without building its key (which allocates every string). Verified against the key, so
    /// a collision costs only the slow path.
    drafts: FxHashMap<u64, u32>,
    values: FxHashMap<Box<str>, FxHashSet<Box<str>>>,
    /// Shared with readers: a query takes the buckets it reads by reference count under the
    /// customer's lock and sums them after releasing it, so a long query never stalls that
    /// customer's decisions; a bucket still held by a reader is copied when it next changes
    /// (only the current minute, hour and day buckets change).
    buckets: BTreeMap<(Granularity, i64), Arc<Bucket>>,
    /// Dimension values folded into [`OTHER`], since start.
    folded: u64,
    dirty: Option<Box<RollupDirty>>,
}

#[derive(Debug, Default, Clone)]
struct RollupDirty {
    series: Vec<u32>,
    buckets: FxHashSet<BucketKey>,
    dropped: Vec<(Granularity, i64)>,
}

/// What changed in the rollups since the last take: rows a persisting store writes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RollupChanges {
    pub series: Vec<(u32, SeriesKey)>,
    pub buckets: Vec<(BucketKey, Measures)>,
    /// Whole buckets past their retention.
    pub dropped: Vec<(Granularity, i64)>,
}

impl Rollups {
    /// Empty rollups that record their changes.
    pub fn tracked() -> Self {
        Self {
            dirty: Some(Box::default()),
            ..Self::default()
        }
    }

    /// Tracked rollups rebuilt from persisted rows.
    pub fn restore(
        series: impl IntoIterator<Item = (u32, SeriesKey)>,
        buckets: impl IntoIterator<Item = (BucketKey, Measures)>,
    ) -> Self {
        let mut r = Self::tracked();
        let mut series: Vec<(u32, SeriesKey)> = series.into_iter().collect();
        series.sort_by_key(|(id, _)| *id);
        for (id, key) in series {
            // Ids are dense from 0; a gap (a row lost) is filled so later ids still line up.
            while r.series.len() < id as usize {
                r.series.push(Arc::new(SeriesKey {
                    feature: "".into(),
                    attrs: Vec::new(),
                }));
            }
            r.note_values(&key);
            let key = Arc::new(key);
            r.ids.insert(Arc::clone(&key), id);
            r.series.push(key);
        }
        let mut by_bucket: BTreeMap<(Granularity, i64), Bucket> = BTreeMap::new();
        for ((g, start, id), m) in buckets {
            by_bucket.entry((g, start)).or_default().insert(id, m);
        }
        r.buckets = by_bucket
            .into_iter()
            .map(|(k, b)| (k, Arc::new(b)))
            .collect();
        r
    }

    fn note_values(&mut self, key: &SeriesKey) {
        for (k, v) in &key.attrs {
            if v.as_ref() != OTHER {
                self.values.entry(k.clone()).or_default().insert(v.clone());
            }
        }
    }

    /// The id of `draft`'s series (for a denial: by `denied_by`), made if new; dimension
    /// values past the customer's cap of distinct values fold into [`OTHER`].
    pub fn series_id(
        &mut self,
        draft: &SeriesDraft,
        denied_by: Option<Name>,
        max_values: usize,
    ) -> u32 {
        let hash = {
            let mut h = rustc_hash::FxHasher::default();
            (draft, denied_by).hash(&mut h);
            h.finish()
        };
        if let Some(id) = self.drafts.get(&hash)
            && self
                .series
                .get(*id as usize)
                .is_some_and(|k| draft.made(k, denied_by))
        {
            return *id;
        }
        let mut folded = 0;
        let values = &mut self.values;
        let key = draft.key_with(denied_by, |k, v| {
            let seen = values.entry(k.into()).or_default();
            if seen.contains(v) {
                v.into()
            } else if seen.len() < max_values {
                seen.insert(v.into());
                v.into()
            } else {
                folded += 1;
                OTHER.into()
            }
        });
        self.folded += folded;
        let id = self.intern(key);
        self.drafts.entry(hash).or_insert(id);
        id
    }

    /// The id of series `id` with attribute `name` set to `value` (a settle record that says
    /// how its stream ended), made if new. The value is not folded: callers pass only bounded
    /// values (a customer's limit ids).
    pub fn series_with(&mut self, id: u32, name: &str, value: &str) -> u32 {
        let Some(base) = self.series.get(id as usize) else {
            return id;
        };
        let mut key = SeriesKey::clone(base);
        key.attrs.retain(|(k, _)| k.as_ref() != name);
        key.attrs.push((name.into(), value.into()));
        key.attrs.sort();
        self.intern(key)
    }

    /// The id of `key`, made if new.
    fn intern(&mut self, key: SeriesKey) -> u32 {
        if let Some(id) = self.ids.get(&key) {
            return *id;
        }
        let id = u32::try_from(self.series.len()).unwrap_or(u32::MAX);
        let key = Arc::new(key);
        self.ids.insert(Arc::clone(&key), id);
        self.series.push(key);
        if let Some(d) = self.dirty.as_mut() {
            d.series.push(id);
        }
        id
    }

    /// Adds `m` to series `id`'s buckets at `at`; buckets past their retention are dropped.
    pub fn add(&mut self, id: u32, at: Timestamp, m: &Measures, settings: &RecordSettings) {
        for g in Granularity::ALL {
            let start = g.start(at);
            if settings.expired(g, start, at) {
                continue;
            }
            Arc::make_mut(self.buckets.entry((g, start)).or_default())
                .entry(id)
                .or_default()
                .add(m);
            if let Some(d) = self.dirty.as_mut() {
                d.buckets.insert((g, start, id));
            }
        }
    }

    /// Dimension values folded into [`OTHER`] since start, and the series kept.
    pub fn counts(&self) -> (u64, usize) {
        (self.folded, self.series.len())
    }

    /// Drops every bucket past its retention at `now`.
    pub fn prune(&mut self, now: Timestamp, settings: &RecordSettings) {
        for g in Granularity::ALL {
            while let Some((&(bg, start), _)) = self.buckets.range((g, i64::MIN)..).next() {
                if bg != g || !settings.expired(g, start, now) {
                    break;
                }
                self.buckets.remove(&(g, start));
                if let Some(d) = self.dirty.as_mut() {
                    d.dropped.push((g, start));
                }
            }
        }
    }

    /// Every bucket of size `g` whose start is in `[from, to)`, shared (no bucket is copied).
    pub fn scan(&self, g: Granularity, from: i64, to: i64) -> BucketScan {
        BucketScan {
            series: self.series.clone(),
            buckets: self
                .buckets
                .range((g, from)..(g, to))
                .map(|(&(_, start), b)| (start, Arc::clone(b)))
                .collect(),
        }
    }

    /// The key of series `id`.
    pub fn key(&self, id: u32) -> Option<&Arc<SeriesKey>> {
        self.series.get(id as usize)
    }

    pub fn series_count(&self) -> usize {
        self.series.len()
    }

    pub fn bucket_entries(&self) -> usize {
        self.buckets.values().map(|b| b.len()).sum()
    }

    pub fn folded(&self) -> u64 {
        self.folded
    }

    pub fn has_changes(&self) -> bool {
        self.dirty
            .as_ref()
            .is_some_and(|d| !(d.series.is_empty() && d.buckets.is_empty() && d.dropped.is_empty()))
    }

    /// Everything that changed since the last take (empty when untracked).
    pub fn take_changes(&mut self) -> RollupChanges {
        let Some(dirty) = self.dirty.as_mut() else {
            return RollupChanges::default();
        };
        let d = std::mem::take(dirty.as_mut());
        RollupChanges {
            series: d
                .series
                .into_iter()
                .filter_map(|id| {
                    self.series
                        .get(id as usize)
                        .map(|k| (id, SeriesKey::clone(k)))
                })
                .collect(),
            buckets: d
                .buckets
                .into_iter()
                .filter_map(|(g, start, id)| {
                    let m = self.buckets.get(&(g, start))?.get(&id)?;
                    Some(((g, start, id), *m))
                })
                .collect(),
            dropped: d.dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(user: &str, model: &str) -> SeriesDraft {
        SeriesDraft {
            feature: "tokens".into(),
            chain: vec![
                ("orgId".into(), "acme".into()),
                ("userId".into(), user.into()),
            ],
            dimensions: vec![("model".into(), model.into())],
        }
    }

    fn id(r: &mut Rollups, d: &SeriesDraft, max: usize) -> u32 {
        r.series_id(d, None, max)
    }

    #[test]
    fn values_past_the_cap_fold_into_other_and_entities_never_fold() {
        let mut r = Rollups::default();
        let a = id(&mut r, &draft("u1", "m1"), 2);
        let b = id(&mut r, &draft("u2", "m2"), 2);
        let c = id(&mut r, &draft("u3", "m3"), 2);
        let again = id(&mut r, &draft("u1", "m1"), 2);
        assert_eq!(a, again);
        assert_ne!(a, b);
        assert_eq!(r.series[c as usize].get("model"), Some(OTHER));
        assert_eq!(r.series[c as usize].get("userId"), Some("u3"));
        assert_eq!(r.folded(), 1);
        // A value seen before the cap keeps its name afterwards.
        let d = id(&mut r, &draft("u3", "m2"), 2);
        assert_eq!(r.series[d as usize].get("model"), Some("m2"));
    }

    #[test]
    fn buckets_sum_per_size_and_age_out_by_retention() {
        let settings = RecordSettings {
            enabled: true,
            retention_millis: [3_600_000, 86_400_000, 30 * 86_400_000],
            max_values_per_dimension: 10,
            max_query_points: 100,
        };
        let mut r = Rollups::tracked();
        let id = r.series_id(&draft("u1", "m1"), None, 10);
        let t0 = Timestamp::from_millis(1_700_000_000_000);
        r.add(id, t0, &Measures::of_call(5, None, 0), &settings);
        r.add(
            id,
            t0.plus_millis(30_000),
            &Measures::of_call(7, None, 0),
            &settings,
        );
        let hour = Granularity::Hour.start(t0);
        let scan = r.scan(Granularity::Hour, hour, hour + 3_600_000);
        let rows: Vec<_> = scan.rows().collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].2.units, 12);
        assert_eq!(rows[0].2.requests, 2);
        let changes = r.take_changes();
        assert_eq!(changes.series.len(), 1);
        assert!(changes.buckets.len() >= 3);
        // Two hours later the minute buckets are gone, the hour and day ones stay.
        r.prune(t0.plus_millis(2 * 3_600_000 + 120_000), &settings);
        assert!(r.scan(Granularity::Minute, i64::MIN, i64::MAX).is_empty());
        assert_eq!(r.scan(Granularity::Hour, i64::MIN, i64::MAX).len(), 1);
        assert!(!r.take_changes().dropped.is_empty());
    }
}
