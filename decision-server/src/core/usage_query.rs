//! Usage queries over rollup buckets, as pure arithmetic: which bucket size answers a history
//! query (windows in a time zone, retention, the points cap), grouping and filtering series
//! into points, top spenders, and exhaustion projected from the recent burn rate.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

use rustc_hash::FxHashMap;

use super::rollup::{BucketScan, Granularity, Measures, RecordSettings, ScanNeeds, SeriesKey};

/// The attribute name a query uses for the feature (series carry it apart from attributes).
pub const FEATURE_KEY: &str = "featureId";

/// A query parameter that cannot be answered: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{param}`: {message}")]
pub struct QueryError {
    pub param: &'static str,
    pub message: String,
}

impl QueryError {
    pub fn new(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param,
            message: message.into(),
        }
    }
}

/// Which series a query reads: a feature, and attribute values that must match exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeriesFilter {
    pub feature: Option<String>,
    pub equals: Vec<(String, String)>,
}

impl SeriesFilter {
    pub fn matches(&self, key: &SeriesKey) -> bool {
        self.feature
            .as_deref()
            .is_none_or(|f| f == key.feature.as_ref())
            && self
                .equals
                .iter()
                .all(|(k, v)| attribute(key, k) == Some(v.as_str()))
    }
}

impl SeriesFilter {
    /// What a read for this filter needs of the store, when the caller looks at attributes
    /// `keys` too: those and the filtered ones (the feature is always kept).
    pub fn needs<'a>(&self, keys: impl IntoIterator<Item = &'a str>, now: i64) -> ScanNeeds {
        let mut all: Vec<String> = keys
            .into_iter()
            .map(str::to_string)
            .chain(self.equals.iter().map(|(k, _)| k.clone()))
            .filter(|k| k != FEATURE_KEY)
            .collect();
        all.sort();
        all.dedup();
        ScanNeeds {
            keys: Some(all),
            equals: self
                .equals
                .iter()
                .filter(|(k, _)| k != FEATURE_KEY)
                .cloned()
                .collect(),
            now,
        }
    }
}

/// The value of `name` in a series: the feature for [`FEATURE_KEY`], else the attribute.
pub fn attribute<'a>(key: &'a SeriesKey, name: &str) -> Option<&'a str> {
    if name == FEATURE_KEY {
        Some(key.feature.as_ref())
    } else {
        key.get(name)
    }
}

/// A history query, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryQuery {
    pub from: i64,
    pub to: i64,
    pub window: Granularity,
    pub group_by: Vec<String>,
    pub filter: SeriesFilter,
    pub tz: Tz,
}

/// How a history query is answered: its windows (absolute ms, `[start, end)`) and the bucket
/// size whose buckets tile every one of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPlan {
    pub windows: Vec<(i64, i64)>,
    pub granularity: Granularity,
}

impl HistoryPlan {
    /// The range of bucket starts to read.
    pub fn range(&self) -> (i64, i64) {
        let from = self.windows.first().map_or(0, |w| w.0);
        let to = self.windows.last().map_or(0, |w| w.1);
        (from, to)
    }
}

/// One series of an answer: its `groupBy` values (in the query's order; `None` where a series
/// has no such attribute) and a point per window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistorySeries {
    pub group: Vec<(String, Option<String>)>,
    pub points: Vec<(i64, i64, Measures)>,
}

/// Plans `q` at `now`: the windows cover `[from, to)` whole (the first starts at or before
/// `from`, at a window boundary in the query's zone), and the bucket size is the coarsest that
/// is still kept for the first window and whose buckets fit the window boundaries.
pub fn plan_history(
    q: &HistoryQuery,
    now: i64,
    settings: &RecordSettings,
    max_points: usize,
) -> Result<HistoryPlan, QueryError> {
    if q.from >= q.to {
        return Err(QueryError::new("from", "must be before `to`"));
    }
    let windows = windows(q.from, q.to, q.window, q.tz, max_points)?;
    let first = windows.first().map_or(q.from, |w| w.0);
    let kept = |g: Granularity| !expired_at(settings, g, first, now);
    if !kept(q.window) && q.window != Granularity::Day {
        return Err(QueryError::new(
            "windowSize",
            format!(
                "{} buckets are kept for {}; `from` is older. Use a larger windowSize or a later `from`",
                q.window.name(),
                human(settings.retention(q.window))
            ),
        ));
    }
    if !kept(Granularity::Day) {
        return Err(QueryError::new(
            "from",
            format!(
                "is older than any usage kept (DAY buckets are kept for {})",
                human(settings.retention(Granularity::Day))
            ),
        ));
    }
    let aligned = |g: Granularity| {
        windows
            .iter()
            .all(|(s, e)| s.rem_euclid(g.millis()) == 0 && e.rem_euclid(g.millis()) == 0)
    };
    let granularity = Granularity::ALL
        .into_iter()
        .rev()
        .filter(|g| *g <= q.window)
        .find(|g| kept(*g) && aligned(*g))
        .ok_or_else(|| {
            QueryError::new(
                "timeZone",
                format!(
                    "{} windows in {} do not start on a bucket still kept for that range; \
                     use a later `from` or another timeZone",
                    q.window.name(),
                    q.tz.name()
                ),
            )
        })?;
    Ok(HistoryPlan {
        windows,
        granularity,
    })
}

fn expired_at(settings: &RecordSettings, g: Granularity, start: i64, now: i64) -> bool {
    start + g.millis() + settings.retention(g) <= now
}

/// The windows of size `g` in zone `tz` that cover `[from, to)`.
fn windows(
    from: i64,
    to: i64,
    g: Granularity,
    tz: Tz,
    max_points: usize,
) -> Result<Vec<(i64, i64)>, QueryError> {
    let mut out = Vec::new();
    let mut start = window_start(from, g, tz)?;
    while start < to {
        let end = next_start(start, g, tz)?;
        out.push((start, end));
        if out.len() > max_points {
            return Err(QueryError::new(
                "from",
                format!(
                    "the range holds more than {max_points} {} windows (the most one query \
                     returns); narrow it or use a larger windowSize",
                    g.name()
                ),
            ));
        }
        start = end;
    }
    Ok(out)
}

fn local(ms: i64, tz: Tz) -> Result<NaiveDateTime, QueryError> {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.with_timezone(&tz).naive_local())
        .ok_or_else(|| QueryError::new("from", format!("{ms} ms is out of range")))
}

/// The absolute time of local time `t`; a local time skipped by a clock change maps to the
/// first instant after the gap, an ambiguous one to its first occurrence.
fn absolute(mut t: NaiveDateTime, tz: Tz) -> Result<i64, QueryError> {
    for _ in 0..48 {
        if let Some(at) = tz.from_local_datetime(&t).earliest() {
            return Ok(at.timestamp_millis());
        }
        t += Duration::minutes(30);
    }
    Err(QueryError::new(
        "timeZone",
        format!("no instant in {} matches local time {t}", tz.name()),
    ))
}

fn window_start(ms: i64, g: Granularity, tz: Tz) -> Result<i64, QueryError> {
    if g == Granularity::Minute {
        return Ok(ms.div_euclid(g.millis()) * g.millis());
    }
    let t = local(ms, tz)?;
    let floored = match g {
        Granularity::Hour => t.date().and_hms_opt(t.hour(), 0, 0),
        _ => t.date().and_hms_opt(0, 0, 0),
    }
    .ok_or_else(|| QueryError::new("from", "cannot floor to a window"))?;
    let start = absolute(floored, tz)?;
    // A window start pushed past a clock change can land after `ms`; step back one unit.
    if start > ms {
        let back = match g {
            Granularity::Hour => floored - Duration::hours(1),
            _ => floored - Duration::days(1),
        };
        return absolute(back, tz);
    }
    Ok(start)
}

fn next_start(start: i64, g: Granularity, tz: Tz) -> Result<i64, QueryError> {
    match g {
        Granularity::Minute => Ok(start + g.millis()),
        // Hours are absolute: a zone's clock change moves local hours, not their length.
        Granularity::Hour => Ok(start + g.millis()),
        Granularity::Day => {
            let t = local(start, tz)?;
            let next = (t.date() + Duration::days(1))
                .and_hms_opt(0, 0, 0)
                .ok_or_else(|| QueryError::new("to", "date out of range"))?;
            let at = absolute(next, tz)?;
            Ok(at.max(start + 1))
        }
    }
}

/// Sums the buckets of `scan` whose series pass the filter into one series per distinct
/// `groupBy` tuple, with a point for every window (zero where nothing was recorded).
pub fn group_history(
    q: &HistoryQuery,
    plan: &HistoryPlan,
    scan: &BucketScan,
    max_points: usize,
) -> Result<Vec<HistorySeries>, QueryError> {
    let starts: Vec<i64> = plan.windows.iter().map(|w| w.0).collect();
    // Each series' group is worked out once (its filter and its groupBy values), then every
    // row costs an index and an addition: a month of hour buckets is millions of rows.
    let mut group_of: Vec<Option<Option<usize>>> = vec![None; scan.series.len()];
    let mut groups = Groups::default();
    for (start, bucket) in &scan.buckets {
        let i = starts.partition_point(|s| s <= start);
        let Some(slot) = i.checked_sub(1) else {
            continue;
        };
        if plan.windows.get(slot).is_none_or(|w| *start >= w.1) {
            continue;
        }
        for (id, m) in bucket.iter() {
            let (Some(cached), Some(key)) = (
                group_of.get_mut(*id as usize),
                scan.series.get(*id as usize),
            ) else {
                continue;
            };
            let g = match cached {
                Some(g) => *g,
                None => *cached.insert(groups.of(q, key, plan.windows.len(), max_points)?),
            };
            if let Some(p) = g
                .and_then(|g| groups.rows.get_mut(g))
                .and_then(|(_, points)| points.get_mut(slot))
            {
                p.add(m);
            }
        }
    }
    let mut groups = groups.rows;
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(groups
        .into_iter()
        .map(|(values, points)| HistorySeries {
            group: q
                .group_by
                .iter()
                .cloned()
                .zip(values.into_iter().map(|v| v.map(str::to_string)))
                .collect(),
            points: plan
                .windows
                .iter()
                .zip(points)
                .map(|((s, e), m)| (*s, *e, m))
                .collect(),
        })
        .collect())
}

/// The groups of a history answer: each distinct `groupBy` tuple and its points.
#[derive(Default)]
struct Groups<'k> {
    index: FxHashMap<Vec<Option<&'k str>>, usize>,
    rows: Vec<(Vec<Option<&'k str>>, Vec<Measures>)>,
}

impl<'k> Groups<'k> {
    /// The group series `key` adds to (`None` when the filter leaves it out), made if new;
    /// an error if one more group would take the answer past `max_points`.
    fn of(
        &mut self,
        q: &HistoryQuery,
        key: &'k SeriesKey,
        windows: usize,
        max_points: usize,
    ) -> Result<Option<usize>, QueryError> {
        if !q.filter.matches(key) {
            return Ok(None);
        }
        let values: Vec<Option<&str>> = q.group_by.iter().map(|k| attribute(key, k)).collect();
        if let Some(g) = self.index.get(&values) {
            return Ok(Some(*g));
        }
        let next = self.rows.len();
        if (next + 1).saturating_mul(windows) > max_points {
            return Err(QueryError::new(
                "groupBy",
                format!(
                    "the answer would hold more than {max_points} points ({windows} windows per \
                     series); group by fewer keys, filter, or narrow the range"
                ),
            ));
        }
        self.index.insert(values.clone(), next);
        self.rows.push((values, vec![Measures::default(); windows]));
        Ok(Some(next))
    }
}

/// The bucket size and range that read `[from, to)` whole: `from` floored and `to` ceiled to
/// the minute, then the coarsest size still kept at `from` whose buckets tile the range.
pub fn plan_range(
    from: i64,
    to: i64,
    now: i64,
    settings: &RecordSettings,
) -> Result<(Granularity, i64, i64), QueryError> {
    if from >= to {
        return Err(QueryError::new("from", "must be before `to`"));
    }
    let minute = Granularity::Minute.millis();
    let (from, to) = widen(from, to, minute);
    let kept = |g: Granularity| !expired_at(settings, g, from, now);
    if let Some(g) = Granularity::ALL
        .into_iter()
        .rev()
        .find(|g| kept(*g) && from.rem_euclid(g.millis()) == 0 && to.rem_euclid(g.millis()) == 0)
    {
        return Ok((g, from, to));
    }
    // No size still kept tiles the range: widen it to the finest size still kept.
    let g = Granularity::ALL
        .into_iter()
        .find(|g| kept(*g))
        .ok_or_else(|| QueryError::new("from", "is older than any usage kept"))?;
    let (from, to) = widen(from, to, g.millis());
    Ok((g, from, to))
}

/// A read of one bucket size over `[from, to)`.
pub type Segment = (Granularity, i64, i64);

/// [`plan_range`]'s range cut into the fewest reads: the whole days in it from day buckets,
/// the whole hours left at either end from hour buckets, and the rest from the size
/// `plan_range` chose; each coarser size only where it is still kept. A month's top spenders
/// then read about 30 day buckets and a few dozen hour buckets rather than 720 hour buckets.
pub fn plan_segments(
    from: i64,
    to: i64,
    now: i64,
    settings: &RecordSettings,
) -> Result<(i64, i64, Vec<Segment>), QueryError> {
    let (finest, from, to) = plan_range(from, to, now, settings)?;
    let mut out = Vec::new();
    tile(from, to, finest, now, settings, &mut out);
    Ok((from, to, out))
}

fn tile(
    from: i64,
    to: i64,
    finest: Granularity,
    now: i64,
    settings: &RecordSettings,
    out: &mut Vec<Segment>,
) {
    if from >= to {
        return;
    }
    for g in [Granularity::Day, Granularity::Hour] {
        if g <= finest {
            continue;
        }
        let unit = g.millis();
        let (a, b) = (from.div_euclid(unit) * unit, to.div_euclid(unit) * unit);
        let a = if a < from { a + unit } else { a };
        if a < b && !expired_at(settings, g, a, now) {
            tile(from, a, finest, now, settings, out);
            out.push((g, a, b));
            tile(b, to, finest, now, settings, out);
            return;
        }
    }
    out.push((finest, from, to));
}

/// `[from, to)` widened to whole units of `unit` ms.
fn widen(from: i64, to: i64, unit: i64) -> (i64, i64) {
    (
        from.div_euclid(unit) * unit,
        (to.saturating_add(unit - 1)).div_euclid(unit) * unit,
    )
}

/// One row of a top-spenders answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopRow {
    pub value: Option<String>,
    pub measures: Measures,
}

/// The `limit` values of `by` that spent the most units (then the most requests, then by
/// value), from rows that pass `filter`.
pub fn top(scans: &[BucketScan], by: &str, filter: &SeriesFilter, limit: usize) -> Vec<TopRow> {
    let mut sums: BTreeMap<Option<&str>, Measures> = BTreeMap::new();
    for scan in scans {
        // Each series' own total first (one pass over the rows), then one filter and lookup
        // per series.
        let mut per_series = vec![Measures::default(); scan.series.len()];
        for (_, bucket) in &scan.buckets {
            for (id, m) in bucket.iter() {
                if let Some(total) = per_series.get_mut(*id as usize) {
                    total.add(m);
                }
            }
        }
        for (key, m) in scan.series.iter().zip(&per_series) {
            if *m != Measures::default() && filter.matches(key) {
                sums.entry(attribute(key, by)).or_default().add(m);
            }
        }
    }
    let mut out: Vec<TopRow> = sums
        .into_iter()
        .map(|(v, measures)| TopRow {
            value: v.map(str::to_string),
            measures,
        })
        .collect();
    out.sort_by(|a, b| {
        b.measures
            .units
            .cmp(&a.measures.units)
            .then(b.measures.requests.cmp(&a.measures.requests))
            .then(a.value.cmp(&b.value))
    });
    out.truncate(limit);
    out
}

/// When `remaining` units run out at the rate of `recent_units` per `recent_millis`, if that
/// is before `reset_at` (when the budget comes back anyway). `None` when nothing is burning.
pub fn projected_exhaustion(
    now: i64,
    remaining: u64,
    recent_units: u64,
    recent_millis: i64,
    reset_at: Option<i64>,
) -> Option<i64> {
    if recent_units == 0 || recent_millis <= 0 {
        return None;
    }
    if remaining == 0 {
        return Some(now);
    }
    let ms = (u128::from(remaining) * recent_millis as u128).div_ceil(u128::from(recent_units));
    let at = now.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX));
    match reset_at {
        Some(r) if at >= r => None,
        _ => Some(at),
    }
}

fn human(ms: i64) -> String {
    let h = ms / 3_600_000;
    if h >= 48 && h % 24 == 0 {
        format!("{} days", h / 24)
    } else if h >= 1 {
        format!("{h} hours")
    } else {
        format!("{} minutes", ms / 60_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;
    const D: i64 = 24 * H;

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_millis())
            .unwrap_or(0)
    }

    fn q(from: &str, to: &str, window: Granularity, tz: Tz) -> HistoryQuery {
        HistoryQuery {
            from: ms(from),
            to: ms(to),
            window,
            group_by: vec!["userId".into()],
            filter: SeriesFilter::default(),
            tz,
        }
    }

    fn series(user: &str) -> SeriesKey {
        SeriesKey {
            feature: "tokens".into(),
            attrs: vec![
                ("orgId".into(), "acme".into()),
                ("userId".into(), user.into()),
            ],
        }
    }

    fn units(n: u64) -> Measures {
        Measures {
            units: n,
            requests: 1,
            ..Measures::default()
        }
    }

    #[test]
    fn berlin_days_follow_the_clock_change_and_read_hour_buckets() {
        let now = ms("2026-04-01T00:00:00Z");
        let query = q(
            "2026-03-28T12:00:00Z",
            "2026-03-30T12:00:00Z",
            Granularity::Day,
            chrono_tz::Europe::Berlin,
        );
        let plan = plan_history(&query, now, &RecordSettings::default(), 100).unwrap();
        // 28 March at midnight in Berlin is 23:00 UTC the day before; 29 March is 23 hours long.
        assert_eq!(plan.windows[0].0, ms("2026-03-27T23:00:00Z"));
        assert_eq!(plan.windows[1].0, ms("2026-03-28T23:00:00Z"));
        assert_eq!(plan.windows[1].1 - plan.windows[1].0, 23 * H);
        assert_eq!(plan.windows.len(), 3);
        assert_eq!(plan.granularity, Granularity::Hour);
        // In UTC the same days read day buckets.
        let utc = HistoryQuery {
            tz: chrono_tz::UTC,
            ..query
        };
        let plan = plan_history(&utc, now, &RecordSettings::default(), 100).unwrap();
        assert_eq!(plan.granularity, Granularity::Day);
    }

    #[test]
    fn a_half_hour_zone_needs_minutes_and_fails_once_they_are_gone() {
        let query = q(
            "2026-03-01T00:00:00Z",
            "2026-03-02T00:00:00Z",
            Granularity::Hour,
            chrono_tz::Asia::Kolkata,
        );
        let recent = plan_history(
            &query,
            ms("2026-03-02T01:00:00Z"),
            &RecordSettings::default(),
            100,
        )
        .unwrap();
        assert_eq!(recent.granularity, Granularity::Minute);
        let late = plan_history(
            &query,
            ms("2026-03-10T00:00:00Z"),
            &RecordSettings::default(),
            100,
        )
        .unwrap_err();
        assert_eq!(late.param, "timeZone");
    }

    #[test]
    fn bad_ranges_name_their_parameter() {
        let now = ms("2026-03-10T00:00:00Z");
        let s = RecordSettings::default();
        let backwards = q(
            "2026-03-02T00:00:00Z",
            "2026-03-01T00:00:00Z",
            Granularity::Hour,
            chrono_tz::UTC,
        );
        assert_eq!(
            plan_history(&backwards, now, &s, 100).unwrap_err().param,
            "from"
        );
        let too_fine = q(
            "2026-03-01T00:00:00Z",
            "2026-03-01T01:00:00Z",
            Granularity::Minute,
            chrono_tz::UTC,
        );
        assert_eq!(
            plan_history(&too_fine, now, &s, 100).unwrap_err().param,
            "windowSize"
        );
        let too_many = q(
            "2026-03-01T00:00:00Z",
            "2026-03-09T00:00:00Z",
            Granularity::Hour,
            chrono_tz::UTC,
        );
        assert_eq!(
            plan_history(&too_many, now, &s, 100).unwrap_err().param,
            "from"
        );
    }

    #[test]
    fn rows_group_into_dense_points_and_the_group_cap_holds() {
        let query = q(
            "2026-03-01T00:00:00Z",
            "2026-03-01T03:00:00Z",
            Granularity::Hour,
            chrono_tz::UTC,
        );
        let plan = plan_history(
            &query,
            ms("2026-03-01T04:00:00Z"),
            &RecordSettings::default(),
            100,
        )
        .unwrap();
        let t0 = ms("2026-03-01T00:00:00Z");
        let rows = vec![
            (t0, series("u1"), units(5)),
            (t0 + 60_000, series("u1"), units(7)),
            (t0 + 2 * H, series("u2"), units(3)),
            (t0 + 3 * H, series("u2"), units(100)),
        ];
        let plan_min = HistoryPlan {
            granularity: Granularity::Minute,
            ..plan
        };
        let rows = BucketScan::from_rows(rows);
        let out = group_history(&query, &plan_min, &rows, 100).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].group, vec![("userId".into(), Some("u1".into()))]);
        let u1: Vec<u64> = out[0].points.iter().map(|p| p.2.units).collect();
        assert_eq!(u1, vec![12, 0, 0]);
        let u2: Vec<u64> = out[1].points.iter().map(|p| p.2.units).collect();
        assert_eq!(u2, vec![0, 0, 3], "the row past `to` is left out");
        let capped = group_history(&query, &plan_min, &rows, 5).unwrap_err();
        assert_eq!(capped.param, "groupBy");
    }

    #[test]
    fn top_ranks_by_units_and_filters() {
        let rows = vec![
            (0, series("u1"), units(5)),
            (0, series("u2"), units(9)),
            (60_000, series("u1"), units(7)),
        ];
        let rows = [BucketScan::from_rows(rows)];
        let out = top(&rows, "userId", &SeriesFilter::default(), 10);
        assert_eq!(out[0].value.as_deref(), Some("u1"));
        assert_eq!(out[0].measures.units, 12);
        assert_eq!(top(&rows, "userId", &SeriesFilter::default(), 1).len(), 1);
        let only_u2 = SeriesFilter {
            feature: Some("tokens".into()),
            equals: vec![("userId".into(), "u2".into())],
        };
        assert_eq!(top(&rows, "userId", &only_u2, 10).len(), 1);
    }

    #[test]
    fn ranges_read_the_coarsest_aligned_buckets_still_kept() {
        let s = RecordSettings::default();
        let now = ms("2026-03-10T00:00:00Z");
        let (g, _, _) = plan_range(
            ms("2026-03-01T00:00:00Z"),
            ms("2026-03-03T00:00:00Z"),
            now,
            &s,
        )
        .unwrap();
        assert_eq!(g, Granularity::Day);
        let (g, from, _) = plan_range(
            ms("2026-03-09T10:00:30Z"),
            ms("2026-03-09T10:30:00Z"),
            now,
            &s,
        )
        .unwrap();
        assert_eq!((g, from), (Granularity::Minute, ms("2026-03-09T10:00:00Z")));
        // Widened to the minute, the range tiles into hours: read the hours.
        let (g, _, _) = plan_range(
            ms("2026-03-09T10:00:30Z"),
            ms("2026-03-09T11:00:00Z"),
            now,
            &s,
        )
        .unwrap();
        assert_eq!(g, Granularity::Hour);
        // Unaligned and past the minute retention: widened to hours.
        let (g, from, _) = plan_range(
            ms("2026-03-01T10:10:00Z"),
            ms("2026-03-01T11:00:00Z"),
            now,
            &s,
        )
        .unwrap();
        assert_eq!((g, from), (Granularity::Hour, ms("2026-03-01T10:00:00Z")));
        let _ = D;
    }

    #[test]
    fn segments_read_whole_days_and_hours_from_the_coarsest_buckets() {
        let week = RecordSettings {
            retention_millis: [7 * D, 90 * D, 730 * D],
            ..RecordSettings::default()
        };
        let now = ms("2026-03-10T12:00:00Z");
        let (from, to, segs) = plan_segments(
            ms("2026-03-07T22:30:00Z"),
            ms("2026-03-10T11:45:10Z"),
            now,
            &week,
        )
        .unwrap();
        assert_eq!(
            (from, to),
            (ms("2026-03-07T22:30:00Z"), ms("2026-03-10T11:46:00Z"))
        );
        assert_eq!(
            segs,
            vec![
                (
                    Granularity::Minute,
                    ms("2026-03-07T22:30:00Z"),
                    ms("2026-03-07T23:00:00Z")
                ),
                (
                    Granularity::Hour,
                    ms("2026-03-07T23:00:00Z"),
                    ms("2026-03-08T00:00:00Z")
                ),
                (
                    Granularity::Day,
                    ms("2026-03-08T00:00:00Z"),
                    ms("2026-03-10T00:00:00Z")
                ),
                (
                    Granularity::Hour,
                    ms("2026-03-10T00:00:00Z"),
                    ms("2026-03-10T11:00:00Z")
                ),
                (
                    Granularity::Minute,
                    ms("2026-03-10T11:00:00Z"),
                    ms("2026-03-10T11:46:00Z")
                ),
            ]
        );
        // Segments tile the range exactly, without gaps or overlaps.
        assert!(segs.windows(2).all(|w| w[0].2 == w[1].1));
        // Past the minute retention, the ends are widened to hours and only hours and days
        // are read.
        let s = RecordSettings::default();
        let (from, _, segs) = plan_segments(
            ms("2026-02-01T10:10:00Z"),
            ms("2026-03-01T00:00:00Z"),
            now,
            &s,
        )
        .unwrap();
        assert_eq!(from, ms("2026-02-01T10:00:00Z"));
        assert_eq!(segs.len(), 2);
        assert_eq!(segs[0].0, Granularity::Hour);
        assert_eq!(
            segs[1],
            (
                Granularity::Day,
                ms("2026-02-02T00:00:00Z"),
                ms("2026-03-01T00:00:00Z")
            )
        );
    }

    #[test]
    fn exhaustion_projects_from_the_burn_rate_unless_the_reset_comes_first() {
        // 100 units in 10 minutes, 600 left: an hour.
        assert_eq!(
            projected_exhaustion(0, 600, 100, 600_000, None),
            Some(3_600_000)
        );
        assert_eq!(
            projected_exhaustion(0, 600, 100, 600_000, Some(1_000)),
            None
        );
        assert_eq!(projected_exhaustion(0, 600, 0, 600_000, None), None);
        assert_eq!(projected_exhaustion(5, 0, 1, 1, None), Some(5));
    }
}

/// The credits a bucket's measures stand for: what its calls were charged when their feature
/// is priced (`credits`), else its token split priced at `price` (its model's price in force
/// then), else none: units that are not tokens (requests, a feature of its own unit) have no
/// price. Trade-off: a bucket's tokens are priced together, rounded up once, not call by call.
pub fn spend_credits(m: &Measures, price: Option<&super::plan::PriceSnapshot>) -> u64 {
    if m.credits > 0 {
        return m.credits;
    }
    let tokens = m
        .input
        .saturating_add(m.output)
        .saturating_add(m.cached)
        .saturating_add(m.cache_write);
    match price {
        Some(p) if tokens > 0 => p.price(&super::usage::Usage {
            units: m.units,
            tokens: Some(super::usage::TokenCounts {
                input: m.input,
                output: m.output,
                cached: m.cached,
                cache_write: m.cache_write,
                reasoning: m.reasoning,
            }),
        }),
        _ => 0,
    }
}

/// A spend query over bucket scans: the period `[from, to)` against `[previous_from, from)`,
/// by one key, the period's credits in windows of `window_millis`.
#[derive(Debug, Clone)]
pub struct SpendQuery {
    pub by: String,
    pub filter: SeriesFilter,
    pub previous_from: i64,
    pub from: i64,
    pub to: i64,
    pub window_millis: i64,
}

/// One value of the key: its measures and credits in the period and the one before.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpendRow {
    pub value: Option<String>,
    pub measures: Measures,
    pub credits: u64,
    pub previous: Measures,
    pub previous_credits: u64,
}

/// What [`spend`] adds up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpendReport {
    pub measures: Measures,
    pub credits: u64,
    pub previous: Measures,
    pub previous_credits: u64,
    /// The period's credits by window start (every window, zero included).
    pub points: Vec<(i64, u64)>,
    /// Every value of the key, the most credits first (then the most units).
    pub rows: Vec<SpendRow>,
    /// Denials in the period by the limit that refused them, the most first.
    pub denials: Vec<(Option<String>, u64)>,
}

/// Adds up `scans` for `q`: each bucket row's credits ([`spend_credits`], priced by
/// `price_of(bucket start, model)`), into the period or the one before by its start.
pub fn spend(
    scans: &[BucketScan],
    q: &SpendQuery,
    mut price_of: impl FnMut(i64, &str) -> Option<super::plan::PriceSnapshot>,
) -> SpendReport {
    let mut report = SpendReport::default();
    let mut rows: BTreeMap<Option<&str>, SpendRow> = BTreeMap::new();
    let mut denials: BTreeMap<Option<&str>, u64> = BTreeMap::new();
    let window = q.window_millis.max(1);
    let mut points: BTreeMap<i64, u64> = BTreeMap::new();
    let mut w = q.from - q.from.rem_euclid(window);
    while w < q.to {
        points.insert(w, 0);
        w += window;
    }
    for scan in scans {
        for (start, key, m) in scan.rows() {
            if start < q.previous_from || start >= q.to || !q.filter.matches(key) {
                continue;
            }
            let price = key.get("model").and_then(|model| price_of(start, model));
            let credits = spend_credits(m, price.as_ref());
            let row = rows.entry(attribute(key, &q.by)).or_default();
            if start >= q.from {
                report.measures.add(m);
                report.credits = report.credits.saturating_add(credits);
                row.measures.add(m);
                row.credits = row.credits.saturating_add(credits);
                let at = start - start.rem_euclid(window);
                *points.entry(at).or_default() += credits;
                if m.denied > 0 {
                    *denials
                        .entry(key.get(super::rollup::DENIED_BY))
                        .or_default() += m.denied;
                }
            } else {
                report.previous.add(m);
                report.previous_credits = report.previous_credits.saturating_add(credits);
                row.previous.add(m);
                row.previous_credits = row.previous_credits.saturating_add(credits);
            }
        }
    }
    report.points = points.into_iter().collect();
    report.rows = rows
        .into_iter()
        .map(|(v, mut row)| {
            row.value = v.map(str::to_string);
            row
        })
        .collect();
    report.rows.sort_by(|a, b| {
        b.credits
            .cmp(&a.credits)
            .then(b.measures.units.cmp(&a.measures.units))
            .then(a.value.cmp(&b.value))
    });
    let mut denials: Vec<(Option<String>, u64)> = denials
        .into_iter()
        .map(|(k, n)| (k.map(str::to_string), n))
        .collect();
    denials.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    report.denials = denials;
    report
}

#[cfg(test)]
mod spend_tests {
    use super::*;
    use crate::core::plan::PriceSnapshot;

    const GPT: PriceSnapshot = PriceSnapshot {
        input_per_million: 250,
        output_per_million: 1_000,
        cached_per_million: 125,
        cache_write_per_million: 250,
    };

    fn key(team: &str, model: &str) -> SeriesKey {
        // Attributes sorted by name, as records keep them.
        SeriesKey {
            feature: "ai-tokens".into(),
            attrs: vec![
                ("model".into(), model.into()),
                ("teamId".into(), team.into()),
            ],
        }
    }

    fn tokens(input: u64, output: u64) -> Measures {
        Measures {
            units: input + output,
            input,
            output,
            requests: 1,
            ..Measures::default()
        }
    }

    #[test]
    fn spend_splits_the_periods_prices_each_model_and_counts_denials() {
        const H: i64 = 3_600_000;
        let denied = SeriesKey {
            feature: "ai-tokens".into(),
            attrs: vec![
                ("deniedBy".into(), "team-daily".into()),
                ("model".into(), "gpt-4o".into()),
                ("teamId".into(), "web".into()),
            ],
        };
        let scan = BucketScan::from_rows([
            // The previous period: ml spent 1 M input on gpt.
            (H, key("ml", "gpt-4o"), tokens(1_000_000, 0)),
            // This period: ml 2 M output on gpt, web 1 M input on an unpriced model, a denial.
            (5 * H, key("ml", "gpt-4o"), tokens(0, 2_000_000)),
            (6 * H, key("web", "llama"), tokens(1_000_000, 0)),
            (
                6 * H,
                denied,
                Measures {
                    denied: 1,
                    ..Measures::default()
                },
            ),
            // Outside both periods.
            (20 * H, key("ml", "gpt-4o"), tokens(9, 9)),
        ]);
        let q = SpendQuery {
            by: "teamId".into(),
            filter: SeriesFilter::default(),
            previous_from: 0,
            from: 4 * H,
            to: 8 * H,
            window_millis: H,
        };
        let r = spend(&[scan], &q, |_, model| (model == "gpt-4o").then_some(GPT));
        assert_eq!((r.credits, r.previous_credits), (2_000, 250));
        assert_eq!(r.measures.denied, 1);
        assert_eq!(
            r.points,
            vec![(4 * H, 0), (5 * H, 2_000), (6 * H, 0), (7 * H, 0)],
            "every window of the period, zero included"
        );
        let ml = &r.rows[0];
        assert_eq!(
            (ml.value.as_deref(), ml.credits, ml.previous_credits),
            (Some("ml"), 2_000, 250)
        );
        let web = &r.rows[1];
        assert_eq!((web.value.as_deref(), web.credits), (Some("web"), 0));
        assert_eq!(
            web.measures.units, 1_000_000,
            "unpriced tokens still count as units"
        );
        assert_eq!(r.denials, vec![(Some("team-daily".to_string()), 1)]);
    }

    #[test]
    fn charged_credits_win_then_tokens_are_priced_and_plain_units_are_not() {
        let charged = Measures {
            units: 1_000,
            input: 1_000,
            credits: 7,
            ..Measures::default()
        };
        assert_eq!(spend_credits(&charged, Some(&GPT)), 7);
        let tokens = Measures {
            units: 3_000_000,
            input: 2_000_000,
            output: 1_000_000,
            ..Measures::default()
        };
        // 2 M input at 250 and 1 M output at 1,000 per million.
        assert_eq!(spend_credits(&tokens, Some(&GPT)), 1_500);
        assert_eq!(spend_credits(&tokens, None), 0, "no price for the model");
        let requests = Measures {
            units: 40,
            requests: 40,
            ..Measures::default()
        };
        assert_eq!(spend_credits(&requests, Some(&GPT)), 0);
        // Rounded up once for the bucket.
        let one = Measures {
            units: 1,
            input: 1,
            ..Measures::default()
        };
        assert_eq!(spend_credits(&one, Some(&GPT)), 1);
    }
}
