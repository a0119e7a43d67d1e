//! Usage reads on Redis: bucket hashes read in bounded steps outside any script, the series
//! index that a filtered read asks, and the seals that make a closed bucket one small read.
//!
//! Reads never run inside a script: a script holds Redis for every other client until it
//! ends, so a month of buckets read in one would stall every replica's decisions. A bucket is
//! read in `HSCAN` steps of [`READ_PAGE`] fields, a few buckets at a time, at most
//! [`READS_PER_CUSTOMER`] reads of one customer at once on a replica.
//!
//! Seals: once a reader has scanned a closed bucket (ended [`SEAL_GRACE_MS`] before the
//! reader's now), it stores read copies of it
//! next to the hash: `:zt` the totals per feature, `:za` the sums per feature and value of
//! each attribute (then the totals), and for a day bucket `:z` its rows. A read that needs no attribute, one
//! attribute, or every row of a day takes the copy in one `MGET` with other buckets' instead
//! of scanning thousands of fields. Invariant: a seal that exists equals its bucket. Every
//! write to a bucket that has ended by the writer's clock deletes its seals and any reader's
//! claim (`lua/rollup.lua` `bucket_add`; one that has not ended cannot have any while the
//! replicas' clocks agree within the grace); a
//! reader claims the bucket (`:zp`, its random token) before it scans, and the script stores
//! the copies only if the claim is still there (`lua/seal.lua` `seal`). Trade-off: a sealed day
//! bucket's rows are kept twice (hash and copy) for the bucket's retention; hour buckets keep
//! only their sums (their rows are what a month of hour windows would read, and those queries
//! ask for sums).
//!
//! The series index: a filtered read (an attribute equal to a value) with more than one
//! attribute to keep asks the index sets (`lua/rollup.lua` `index`) which series can match and reads
//! only their fields (`HMGET`), from the first day the index is complete (`xs`); a read that
//! starts earlier scans.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{StreamExt as _, TryStreamExt as _};
use redis::Value;
use rustc_hash::{FxHashMap, FxHashSet};

use super::RedisStore;
use super::wire::{SEAL_GRACE_MS, bad_reply, decode_series, measures_of};
use crate::core::rollup::{BucketScan, Granularity, Measures, ScanNeeds, SeriesKey};
use crate::core::{Name, Timestamp};
use crate::store::{BucketReads, StoreError};

/// A bucket hash's fields and values, as read.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Buckets scanned at once by one read.
const BUCKETS_AT_ONCE: usize = 4;

/// Seals (or bucket hashes asked for a filter's series) fetched in one command.
const KEYS_AT_ONCE: usize = 64;

/// Fields one `HSCAN` or `HMGET` step reads: a step holds Redis for well under a millisecond,
/// so decisions wait behind a read at most that long.
const READ_PAGE: usize = 500;

/// Usage reads of one customer in flight at once on this replica; more wait their turn.
const READS_PER_CUSTOMER: usize = 2;

/// How long a read waits for its turn before it is refused.
const READ_TURN_WAIT: Duration = Duration::from_secs(10);

/// How long a reader's claim on a bucket lasts: far longer than scanning one bucket takes;
/// a claim whose reader died lapses, and the next reader claims the bucket again.
const CLAIM_MS: u64 = 30_000;

/// The seals' layout version, their first value: a copy of another layout is read as absent.
const SEAL_VERSION: u8 = 1;

/// The index's period (`INDEX_PERIOD` in the script, written from this): one set per attribute value per period.
pub const INDEX_PERIOD: i64 = 2_592_000_000;

/// How long one read step waits for its customer's budget; a step that would wait longer is
/// refused (429, with when to retry), so a read over budget fails at once rather than holding
/// its customer's read turn while it trickles.
const BUDGET_WAIT: Duration = Duration::from_millis(100);

/// Each customer's budget of rows read (bucket fields and sealed rows), per replica.
pub(super) type ReadBudget = governor::DefaultKeyedRateLimiter<crate::core::Sym>;

/// A budget of `per_second` rows a second for each customer, ten seconds' worth at once.
pub(super) fn read_budget(per_second: u32) -> ReadBudget {
    let rate = std::num::NonZeroU32::new(per_second).unwrap_or(std::num::NonZeroU32::MIN);
    let burst = std::num::NonZeroU32::new(per_second.saturating_mul(10)).unwrap_or(rate);
    governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst))
}

/// Buckets read since start, by how (`tollgate_usage_bucket_reads_total`).
#[derive(Debug, Default)]
pub(super) struct ReadCounts {
    sealed: AtomicU64,
    scanned: AtomicU64,
    indexed: AtomicU64,
}

impl ReadCounts {
    pub(super) fn snapshot(&self) -> BucketReads {
        BucketReads {
            sealed: self.sealed.load(Ordering::Relaxed),
            scanned: self.scanned.load(Ordering::Relaxed),
            indexed: self.indexed.load(Ordering::Relaxed),
        }
    }
}

/// Which copy of a bucket a read can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copy {
    /// `:zt`: the totals per feature.
    Totals,
    /// `:za`: the sums per feature and value of each attribute.
    Sums,
    /// `:z`: every row (day buckets only).
    Rows,
}

impl Copy {
    fn suffix(self) -> &'static str {
        match self {
            Copy::Totals => ":zt",
            Copy::Sums => ":za",
            Copy::Rows => ":z",
        }
    }

    /// The copy that answers `needs` at size `g`, if any does.
    fn for_needs(needs: &ScanNeeds, g: Granularity) -> Option<Copy> {
        match (needs.keys.as_deref().map(<[String]>::len), g) {
            (Some(0), _) => Some(Copy::Totals),
            (Some(1), _) => Some(Copy::Sums),
            (_, Granularity::Day) => Some(Copy::Rows),
            _ => None,
        }
    }
}

/// Rows read so far, by bucket, with each distinct packed series decoded once.
#[derive(Default)]
struct Rows {
    ids: FxHashMap<Vec<u8>, u32>,
    series: Vec<Arc<SeriesKey>>,
    buckets: BTreeMap<i64, crate::core::rollup::Bucket>,
}

impl Rows {
    fn add(&mut self, start: i64, series: &[u8], m: &Measures) -> Result<(), StoreError> {
        let id = match self.ids.get(series) {
            Some(id) => *id,
            None => {
                let key = decode_series(series)
                    .ok_or_else(|| bad_reply("buckets: a series that does not decode"))?;
                let id = u32::try_from(self.series.len()).unwrap_or(u32::MAX);
                self.series.push(Arc::new(key));
                self.ids.insert(series.to_vec(), id);
                id
            }
        };
        self.buckets
            .entry(start)
            .or_default()
            .entry(id)
            .or_default()
            .add(m);
        Ok(())
    }

    fn finish(self) -> BucketScan {
        BucketScan {
            series: self.series,
            buckets: self
                .buckets
                .into_iter()
                .map(|(s, b)| (s, Arc::new(b)))
                .collect(),
        }
    }
}

/// Packed measures (a bucket field's value): nine integers, read without building a value
/// tree; anything else (a float from a script's arithmetic) through the general decoder.
fn measures(bytes: &[u8]) -> Option<Measures> {
    let mut rd = bytes;
    let fast = (|| {
        let n = rmp::decode::read_array_len(&mut rd).ok()?;
        let mut v = [0u64; 9];
        for slot in v.iter_mut().take(n as usize) {
            *slot = rmp::decode::read_int(&mut rd).ok()?;
        }
        Some(Measures::from_slice(&v))
    })();
    fast.or_else(|| measures_of(bytes))
}

/// A packed series of only `feature` and, when given, one attribute: what the sums and
/// totals are kept under.
fn packed_series(feature: &str, attr: Option<(&str, &str)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(feature.len() + 16);
    let n = if attr.is_some() { 3 } else { 1 };
    // Writing to a Vec cannot fail.
    let _ = rmp::encode::write_array_len(&mut out, n);
    let _ = rmp::encode::write_str(&mut out, feature);
    if let Some((k, v)) = attr {
        let _ = rmp::encode::write_str(&mut out, k);
        let _ = rmp::encode::write_str(&mut out, v);
    }
    out
}

/// Appends rows `(packed series, measures)` to a seal.
fn push_rows<'a>(out: &mut Vec<u8>, rows: impl ExactSizeIterator<Item = (&'a [u8], &'a Measures)>) {
    let _ = rmp::encode::write_array_len(out, u32::try_from(rows.len()).unwrap_or(u32::MAX));
    for (series, m) in rows {
        let _ = rmp::encode::write_bin(out, series);
        let a = m.to_array();
        let _ = rmp::encode::write_array_len(out, a.len() as u32);
        for x in a {
            let _ = rmp::encode::write_uint(out, x);
        }
    }
}

/// The rows of a seal at `rd`, which moves past them.
fn read_rows<'a>(rd: &mut &'a [u8]) -> Option<Vec<(&'a [u8], Measures)>> {
    let n = rmp::decode::read_array_len(rd).ok()?;
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let len = rmp::decode::read_bin_len(rd).ok()? as usize;
        let series = rd.get(..len)?;
        *rd = rd.get(len..)?;
        let k = rmp::decode::read_array_len(rd).ok()?;
        let mut v = [0u64; 9];
        for i in 0..k as usize {
            let x: u64 = rmp::decode::read_int(rd).ok()?;
            if let Some(slot) = v.get_mut(i) {
                *slot = x;
            }
        }
        out.push((series, Measures::from_slice(&v)));
    }
    Some(out)
}

/// The three copies of one scanned bucket: rows (day buckets only), sums per attribute value,
/// totals. Each starts with [`SEAL_VERSION`].
fn seal_copies(fields: &[(Vec<u8>, Vec<u8>)], keep_rows: bool) -> Option<[Vec<u8>; 3]> {
    let mut decoded = Vec::with_capacity(fields.len());
    for (s, m) in fields {
        decoded.push((s.as_slice(), decode_series(s)?, measures(m)?));
    }
    let rows = if keep_rows {
        let mut rows = vec![SEAL_VERSION];
        push_rows(&mut rows, decoded.iter().map(|(s, _, m)| (*s, m)));
        rows
    } else {
        Vec::new()
    };
    // Totals per feature, and per attribute name the sums per (feature, value), a series
    // without the attribute under its feature alone.
    let mut totals: BTreeMap<&str, Measures> = BTreeMap::new();
    let names: std::collections::BTreeSet<&str> = decoded
        .iter()
        .flat_map(|(_, k, _)| k.attrs.iter().map(|(n, _)| n.as_ref()))
        .collect();
    let mut sums: BTreeMap<&str, BTreeMap<Vec<u8>, Measures>> = BTreeMap::new();
    for (_, key, m) in &decoded {
        totals.entry(key.feature.as_ref()).or_default().add(m);
        for name in &names {
            let packed = packed_series(&key.feature, key.get(name).map(|v| (*name, v)));
            sums.entry(name)
                .or_default()
                .entry(packed)
                .or_default()
                .add(m);
        }
    }
    let packed_totals: Vec<(Vec<u8>, Measures)> = totals
        .into_iter()
        .map(|(f, m)| (packed_series(f, None), m))
        .collect();
    let mut za = vec![SEAL_VERSION];
    let _ = rmp::encode::write_array_len(&mut za, u32::try_from(sums.len()).unwrap_or(u32::MAX));
    for (name, rows) in &sums {
        let _ = rmp::encode::write_str(&mut za, name);
        push_rows(&mut za, rows.iter().map(|(s, m)| (s.as_slice(), m)));
    }
    push_rows(
        &mut za,
        packed_totals.iter().map(|(s, m)| (s.as_slice(), m)),
    );
    let mut zt = vec![SEAL_VERSION];
    push_rows(
        &mut zt,
        packed_totals.iter().map(|(s, m)| (s.as_slice(), m)),
    );
    Some([rows, za, zt])
}

/// The rows of a seal of kind `copy` (for [`Copy::Sums`], those of attribute `key`); `None`
/// if it does not decode (another layout), and the bucket is then scanned.
fn read_seal<'a>(
    copy: Copy,
    bytes: &'a [u8],
    key: Option<&str>,
) -> Option<Vec<(&'a [u8], Measures)>> {
    let (version, mut rd) = bytes.split_first()?;
    if *version != SEAL_VERSION {
        return None;
    }
    match copy {
        Copy::Rows | Copy::Totals => read_rows(&mut rd),
        Copy::Sums => {
            let key = key?;
            let sections = rmp::decode::read_array_len(&mut rd).ok()?;
            for _ in 0..sections {
                let len = rmp::decode::read_str_len(&mut rd).ok()? as usize;
                let name = rd.get(..len)?;
                rd = rd.get(len..)?;
                let rows = read_rows(&mut rd)?;
                if name == key.as_bytes() {
                    return Some(rows);
                }
            }
            // No series in the bucket has the attribute: each is under its feature alone,
            // the totals that end the copy.
            read_rows(&mut rd)
        }
    }
}

impl RedisStore {
    /// A turn to read `customer`'s usage: at most [`READS_PER_CUSTOMER`] at once.
    async fn read_turn(
        &self,
        customer: Name,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, StoreError> {
        let turns = Arc::clone(
            self.reads
                .entry(customer.sym())
                .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(READS_PER_CUSTOMER)))
                .value(),
        );
        match tokio::time::timeout(READ_TURN_WAIT, turns.acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(StoreError::Unavailable(format!(
                "usage of customer `{customer}` is being read by {READS_PER_CUSTOMER} queries already; try again shortly"
            ))),
        }
    }

    /// Takes `rows` from `customer`'s read budget, waiting for it up to [`BUDGET_WAIT`]. A
    /// step larger than the whole burst (one sealed bucket of a huge customer) takes the burst.
    async fn spend(&self, customer: Name, rows: usize) -> Result<(), StoreError> {
        use governor::clock::{Clock as _, DefaultClock};
        let most = self.settings.read_rows_per_second.saturating_mul(10);
        let Some(n) = std::num::NonZeroU32::new(u32::try_from(rows).unwrap_or(u32::MAX).min(most))
        else {
            return Ok(());
        };
        loop {
            let wait = match self.read_budget.check_key_n(&customer.sym(), n) {
                Ok(Ok(())) | Err(_) => return Ok(()),
                Ok(Err(not_until)) => not_until.wait_time_from(DefaultClock::default().now()),
            };
            if wait > BUDGET_WAIT {
                return Err(StoreError::ReadBudget(format!(
                    "usage reads of customer `{customer}` are over their budget of {} rows a second on this replica; try again in {} s",
                    self.settings.read_rows_per_second,
                    wait.as_secs() + 1
                )));
            }
            tokio::time::sleep(wait).await;
        }
    }

    fn bucket_base(&self, customer: Name, g: Granularity) -> String {
        format!(
            "{}:{{{customer}}}:r{}:",
            self.settings.prefix,
            g.index() + 1
        )
    }

    /// The buckets of size `g` of `customer` from `from` to before `to`, read as
    /// `needs` allows (see the module doc).
    pub(super) async fn read_buckets(
        &self,
        customer: Name,
        g: Granularity,
        from: i64,
        to: i64,
        needs: &ScanNeeds,
    ) -> Result<BucketScan, StoreError> {
        let _turn = self.read_turn(customer).await?;
        // The first bucket that starts at or after `from`, as the trait says (and the
        // in-process stores read).
        let from = -((-from).div_euclid(g.millis())) * g.millis();
        let starts: Vec<i64> = std::iter::successors(Some(from), |s| Some(s + g.millis()))
            .take_while(|s| *s < to)
            .collect();
        let mut rows = Rows::default();
        if let Some(candidates) = self.indexed(customer, from, to, needs).await? {
            self.read_fields(customer, g, &starts, &candidates, &mut rows)
                .await?;
            self.read_counts
                .indexed
                .fetch_add(starts.len() as u64, Ordering::Relaxed);
            return Ok(rows.finish());
        }
        let copy = Copy::for_needs(needs, g);
        let key = needs
            .keys
            .as_ref()
            .and_then(|k| k.first())
            .map(String::as_str);
        let mut missing = Vec::new();
        match copy {
            Some(copy) => {
                let base = self.bucket_base(customer, g);
                let mut taken = 0;
                for chunk in starts.chunks(KEYS_AT_ONCE) {
                    let mut cmd = redis::cmd("MGET");
                    for start in chunk {
                        cmd.arg(format!("{base}{start}{}", copy.suffix()));
                    }
                    let Value::Array(found) = self.link.command(&cmd).await? else {
                        return Err(bad_reply("MGET: not a list"));
                    };
                    for (i, start) in chunk.iter().enumerate() {
                        let sealed = match found.get(i) {
                            Some(Value::BulkString(b)) => read_seal(copy, b, key),
                            _ => None,
                        };
                        match sealed {
                            Some(sealed) => {
                                for (series, m) in &sealed {
                                    rows.add(*start, series, m)?;
                                }
                                taken += sealed.len();
                                self.read_counts.sealed.fetch_add(1, Ordering::Relaxed);
                            }
                            None => missing.push(*start),
                        }
                    }
                    self.spend(customer, std::mem::take(&mut taken)).await?;
                }
            }
            None => missing = starts,
        }
        let scanned: Vec<(i64, Fields)> = futures_util::stream::iter(missing)
            .map(|start| async move {
                self.scan_bucket(customer, g, start, needs.now)
                    .await
                    .map(|fields| (start, fields))
            })
            .buffered(BUCKETS_AT_ONCE)
            .try_collect()
            .await?;
        for (start, fields) in &scanned {
            for (series, m) in fields {
                let m = measures(m).ok_or_else(|| bad_reply("buckets: bad measures"))?;
                rows.add(*start, series, &m)?;
            }
        }
        Ok(rows.finish())
    }

    /// Every field of bucket `start`; a closed bucket is claimed first and sealed
    /// after (see the module doc).
    async fn scan_bucket(
        &self,
        customer: Name,
        g: Granularity,
        start: i64,
        now: i64,
    ) -> Result<Fields, StoreError> {
        let key = format!("{}{start}", self.bucket_base(customer, g));
        let closed = start + g.millis() + SEAL_GRACE_MS <= now;
        let token = format!("{:032x}", rand::random::<u128>());
        let claimed = closed && {
            let mut cmd = redis::cmd("SET");
            cmd.arg(format!("{key}:zp"))
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(CLAIM_MS);
            matches!(self.link.command(&cmd).await?, Value::Okay)
        };
        let fields = self.scan_hash(customer, &key).await?;
        self.read_counts.scanned.fetch_add(1, Ordering::Relaxed);
        if claimed && !fields.is_empty() {
            let copies = seal_copies(&fields, g == Granularity::Day)
                .ok_or_else(|| bad_reply("buckets: a field that does not decode"))?;
            let keys = self.keys(customer);
            let mut inv = self.invocation(&keys, "seal", Timestamp::from_millis(now));
            inv.arg(format!("r{}:{start}", g.index() + 1)).arg(&token);
            for c in &copies {
                inv.arg(c.as_slice());
            }
            // A seal that is not stored costs the next reader a scan, nothing more.
            let _ = self.run(customer.sym(), &inv).await;
        }
        Ok(fields)
    }

    /// The series a filtered read can match, from the index, when the index answers `needs`
    /// over `[from, to)`: it has a filter on an attribute, more than one attribute to keep
    /// (with one or none the seals answer), and the index is complete from `from`.
    async fn indexed(
        &self,
        customer: Name,
        from: i64,
        to: i64,
        needs: &ScanNeeds,
    ) -> Result<Option<FxHashSet<Vec<u8>>>, StoreError> {
        if needs.equals.is_empty() || needs.keys.as_ref().is_some_and(|k| k.len() <= 1) {
            return Ok(None);
        }
        let base = format!("{}:{{{customer}}}:", self.settings.prefix);
        let mut cmd = redis::cmd("GET");
        cmd.arg(format!("{base}xs"));
        let complete_from = match self.link.command(&cmd).await? {
            Value::BulkString(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.parse::<i64>().ok()),
            _ => None,
        };
        if complete_from.is_none_or(|day| day > from) {
            return Ok(None);
        }
        let mut out = FxHashSet::default();
        let first = from.div_euclid(INDEX_PERIOD) * INDEX_PERIOD;
        for period in
            std::iter::successors(Some(first), |p| Some(p + INDEX_PERIOD)).take_while(|p| *p < to)
        {
            let mut cmd = redis::cmd("SINTER");
            for (k, v) in &needs.equals {
                let mut key = format!("{base}x{period}:{k}").into_bytes();
                key.push(0);
                key.extend_from_slice(v.as_bytes());
                cmd.arg(key);
            }
            let Value::Array(members) = self.link.command(&cmd).await? else {
                return Err(bad_reply("SINTER: not a list"));
            };
            for m in members {
                if let Value::BulkString(b) = m {
                    out.insert(b);
                }
            }
        }
        Ok(Some(out))
    }

    /// The fields `series` of each bucket in `starts`, in `HMGET` steps.
    async fn read_fields(
        &self,
        customer: Name,
        g: Granularity,
        starts: &[i64],
        series: &FxHashSet<Vec<u8>>,
        into: &mut Rows,
    ) -> Result<(), StoreError> {
        if series.is_empty() {
            return Ok(());
        }
        let base = self.bucket_base(customer, g);
        let names: Vec<&[u8]> = series.iter().map(Vec::as_slice).collect();
        let chunks: Vec<&[&[u8]]> = names.chunks(READ_PAGE).collect();
        // Steps as plain numbers (bucket start, chunk index): the stream's items borrow nothing.
        let steps: Vec<(i64, usize)> = starts
            .iter()
            .flat_map(|s| (0..chunks.len()).map(move |c| (*s, c)))
            .collect();
        let (base, chunks) = (&base, &chunks);
        let replies: Vec<(i64, usize, Vec<Value>)> = futures_util::stream::iter(steps)
            .map(|(start, c)| async move {
                let chunk = chunks.get(c).copied().unwrap_or_default();
                self.spend(customer, chunk.len()).await?;
                let mut cmd = redis::cmd("HMGET");
                cmd.arg(format!("{base}{start}"));
                for s in chunk {
                    cmd.arg(*s);
                }
                match self.link.command(&cmd).await? {
                    Value::Array(v) => Ok((start, c, v)),
                    _ => Err(bad_reply("HMGET: not a list")),
                }
            })
            .buffered(KEYS_AT_ONCE / 4)
            .try_collect()
            .await?;
        for (start, c, values) in replies {
            let chunk = chunks.get(c).copied().unwrap_or_default();
            for (s, v) in chunk.iter().zip(values) {
                if let Value::BulkString(m) = v {
                    let m = measures(&m).ok_or_else(|| bad_reply("buckets: bad measures"))?;
                    into.add(start, s, &m)?;
                }
            }
        }
        Ok(())
    }

    /// Every field of hash `key` of `customer` with its value, read in `HSCAN` steps outside
    /// any script (a script would hold Redis for the whole read), each step taken from the
    /// customer's read budget; a field seen twice (a step during a rehash) is kept once.
    pub(super) async fn scan_hash(&self, customer: Name, key: &str) -> Result<Fields, StoreError> {
        let mut out: FxHashMap<Vec<u8>, Vec<u8>> = FxHashMap::default();
        let mut cursor = b"0".to_vec();
        loop {
            let mut cmd = redis::cmd("HSCAN");
            cmd.arg(key)
                .arg(cursor.as_slice())
                .arg("COUNT")
                .arg(READ_PAGE);
            let Value::Array(reply) = self.link.command(&cmd).await? else {
                return Err(bad_reply("HSCAN: not a list"));
            };
            let mut reply = reply.into_iter();
            let (Some(Value::BulkString(next)), Some(Value::Array(items)), None) =
                (reply.next(), reply.next(), reply.next())
            else {
                return Err(bad_reply("HSCAN: not (cursor, fields)"));
            };
            self.spend(customer, items.len() / 2).await?;
            let mut items = items.into_iter();
            while let (Some(Value::BulkString(f)), Some(Value::BulkString(v))) =
                (items.next(), items.next())
            {
                out.insert(f, v);
            }
            if next.as_slice() == b"0" {
                return Ok(out.into_iter().collect());
            }
            cursor = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(feature: &str, attrs: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        rmp::encode::write_array_len(&mut out, 1 + 2 * attrs.len() as u32).unwrap();
        rmp::encode::write_str(&mut out, feature).unwrap();
        for (k, v) in attrs {
            rmp::encode::write_str(&mut out, k).unwrap();
            rmp::encode::write_str(&mut out, v).unwrap();
        }
        out
    }

    fn packed(m: [u64; 9]) -> Vec<u8> {
        let mut out = Vec::new();
        rmp::encode::write_array_len(&mut out, 9).unwrap();
        for x in m {
            rmp::encode::write_uint(&mut out, x).unwrap();
        }
        out
    }

    fn fields() -> Vec<(Vec<u8>, Vec<u8>)> {
        vec![
            (
                series("tokens", &[("model", "a"), ("teamId", "t1")]),
                packed([10, 1, 2, 3, 4, 5, 6, 1, 0]),
            ),
            (
                series("tokens", &[("model", "b"), ("teamId", "t1")]),
                packed([20, 0, 0, 0, 0, 0, 0, 2, 1]),
            ),
            (
                series("tokens", &[("model", "b")]),
                packed([5, 0, 0, 0, 0, 0, 0, 1, 0]),
            ),
            (
                series("calls", &[("teamId", "t2")]),
                packed([7, 0, 0, 0, 0, 0, 0, 7, 0]),
            ),
        ]
    }

    fn scan(copy: Copy, bytes: &[u8], key: Option<&str>) -> BucketScan {
        let mut rows = Rows::default();
        for (s, m) in read_seal(copy, bytes, key).unwrap() {
            rows.add(1000, s, &m).unwrap();
        }
        rows.finish()
    }

    fn sums(scan: &BucketScan, key: &str) -> BTreeMap<(String, Option<String>), u64> {
        scan.rows()
            .map(|(_, k, m)| {
                (
                    (k.feature.to_string(), k.get(key).map(str::to_string)),
                    m.units,
                )
            })
            .fold(BTreeMap::new(), |mut acc, (k, u)| {
                *acc.entry(k).or_default() += u;
                acc
            })
    }

    #[test]
    fn seals_answer_as_the_rows_they_were_made_of() {
        let f = fields();
        let [rows, za, zt] = seal_copies(&f, true).unwrap();
        let full = scan(Copy::Rows, &rows, None);
        assert_eq!(full.len(), 4);
        for key in ["teamId", "model"] {
            let by_key = scan(Copy::Sums, &za, Some(key));
            assert_eq!(sums(&by_key, key), sums(&full, key), "sums by {key}");
        }
        let totals = scan(Copy::Totals, &zt, None);
        assert_eq!(
            sums(&totals, "none"),
            BTreeMap::from([
                (("calls".to_string(), None), 7),
                (("tokens".to_string(), None), 35)
            ])
        );
        let first = full
            .rows()
            .map(|(_, _, m)| *m)
            .find(|m| m.units == 10)
            .unwrap();
        assert_eq!(first.to_array(), [10, 1, 2, 3, 4, 5, 6, 1, 0]);
    }

    #[test]
    fn a_seal_of_another_layout_or_cut_short_is_not_read_and_an_absent_attribute_reads_the_totals()
    {
        let [rows, za, _] = seal_copies(&fields(), true).unwrap();
        let mut other = rows.clone();
        other[0] = SEAL_VERSION + 1;
        assert!(read_seal(Copy::Rows, &other, None).is_none());
        assert!(read_seal(Copy::Rows, &rows[..rows.len() - 3], None).is_none());
        assert!(read_seal(Copy::Sums, &za[..za.len() - 3], Some("userId")).is_none());
        // An attribute no series has: every series under its feature alone.
        let none = scan(Copy::Sums, &za, Some("userId"));
        assert_eq!(
            sums(&none, "userId"),
            BTreeMap::from([
                (("calls".to_string(), None), 7),
                (("tokens".to_string(), None), 35)
            ])
        );
        let [no_rows, _, _] = seal_copies(&fields(), false).unwrap();
        assert!(no_rows.is_empty());
    }
}
