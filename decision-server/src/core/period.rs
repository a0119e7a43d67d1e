//! Calendar periods for `quota` limits: an ISO-8601 duration plus an anchor, in UTC.

use std::sync::Arc;

use chrono::{DateTime, Datelike, Months, Utc};
use crossbeam_utils::atomic::AtomicCell;

use super::Timestamp;

/// The unit of a calendar period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeriodUnit {
    Hours,
    Days,
    Weeks,
    /// Months and years: calendar lengths. An anchor on the 31st falls back to the last day of
    /// shorter months, and is measured from the anchor every time, so it returns to the 31st.
    Months,
}

/// A repeating calendar period such as `P1M` anchored at `2026-01-01T00:00:00Z`.
#[derive(Debug, Clone)]
pub struct CalendarPeriod {
    unit: PeriodUnit,
    /// How many units per period (12 for `P1Y`).
    count: u32,
    anchor: DateTime<Utc>,
    /// The last period looked up, shared by every clone of this period.
    ///
    /// Trade-off: calendar arithmetic (month lengths, the anchor's day) costs tens of
    /// nanoseconds a call and a quota check needs the period's number and end. Periods change
    /// rarely, so the last answer is kept; a lookup inside it is a lock-free read.
    last: Arc<AtomicCell<Bounds>>,
}

/// One period: its number and its span `[start, end)` in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bounds {
    index: i64,
    start: i64,
    end: i64,
}

impl PartialEq for CalendarPeriod {
    fn eq(&self, other: &Self) -> bool {
        (self.unit, self.count, self.anchor) == (other.unit, other.count, other.anchor)
    }
}

impl Eq for CalendarPeriod {}

/// Why a duration is not a usable period or window.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{0}` is not an ISO-8601 duration such as PT1M, P1D, P1W or P1M")]
    Syntax(String),
    #[error("`{0}` mixes units; a period takes one unit, for example P1M or P7D")]
    Mixed(String),
    #[error("`{0}` is zero; it must be positive")]
    Zero(String),
    #[error(
        "`{0}` has a unit shorter than an hour; a calendar period is counted in hours, days, weeks, months or years"
    )]
    TooFine(String),
    #[error(
        "`{0}` uses months or years, which have no fixed length; give a fixed one, such as PT1M, PT1H or P1D"
    )]
    NotFixed(String),
}

/// The components of a parsed duration; exactly one form (weeks, or the rest) is non-zero.
#[derive(Debug, Default)]
struct Parts {
    years: u32,
    months: u32,
    weeks: u32,
    days: u32,
    hours: u32,
    minutes: u32,
    seconds: u32,
    millis: u32,
}

fn parse_iso(text: &str) -> Result<Parts, DurationError> {
    let parsed = iso8601::duration(text).map_err(|_| DurationError::Syntax(text.to_string()))?;
    // The parser accepts trailing garbage; the canonical rendering tells whether it was all used.
    if parsed.to_string() != text {
        return Err(DurationError::Syntax(text.to_string()));
    }
    if parsed.is_zero() {
        return Err(DurationError::Zero(text.to_string()));
    }
    Ok(match parsed {
        iso8601::Duration::Weeks(weeks) => Parts {
            weeks,
            ..Parts::default()
        },
        iso8601::Duration::YMDHMS {
            year,
            month,
            day,
            hour,
            minute,
            second,
            millisecond,
        } => Parts {
            years: year,
            months: month,
            weeks: 0,
            days: day,
            hours: hour,
            minutes: minute,
            seconds: second,
            millis: millisecond,
        },
    })
}

/// Parses a fixed-length ISO-8601 duration (weeks, days, hours, minutes, seconds) to
/// milliseconds, for rolling windows and hold TTLs.
pub fn parse_fixed_millis(text: &str) -> Result<i64, DurationError> {
    let p = parse_iso(text)?;
    if p.years != 0 || p.months != 0 {
        return Err(DurationError::NotFixed(text.to_string()));
    }
    Ok(i64::from(p.weeks) * 7 * 86_400_000
        + i64::from(p.days) * 86_400_000
        + i64::from(p.hours) * 3_600_000
        + i64::from(p.minutes) * 60_000
        + i64::from(p.seconds) * 1_000
        + i64::from(p.millis))
}

impl CalendarPeriod {
    /// Parses `text` (one unit: `PnY`, `PnM`, `PnW`, `PnD` or `PTnH`) anchored at `anchor`.
    pub fn parse(text: &str, anchor: DateTime<Utc>) -> Result<Self, DurationError> {
        let p = parse_iso(text)?;
        let all = [
            p.years, p.months, p.weeks, p.days, p.hours, p.minutes, p.seconds, p.millis,
        ];
        if all.iter().filter(|n| **n != 0).count() > 1 {
            return Err(DurationError::Mixed(text.to_string()));
        }
        if p.minutes != 0 || p.seconds != 0 || p.millis != 0 {
            return Err(DurationError::TooFine(text.to_string()));
        }
        let (unit, count) = if p.years != 0 {
            (PeriodUnit::Months, p.years.saturating_mul(12))
        } else if p.months != 0 {
            (PeriodUnit::Months, p.months)
        } else if p.weeks != 0 {
            (PeriodUnit::Weeks, p.weeks)
        } else if p.days != 0 {
            (PeriodUnit::Days, p.days)
        } else {
            (PeriodUnit::Hours, p.hours)
        };
        let empty = Bounds {
            index: 0,
            start: i64::MIN,
            end: i64::MIN,
        };
        Ok(Self {
            unit,
            count,
            anchor,
            last: Arc::new(AtomicCell::new(empty)),
        })
    }

    fn fixed_millis(&self) -> Option<i64> {
        let unit = match self.unit {
            PeriodUnit::Hours => 3_600_000,
            PeriodUnit::Days => 86_400_000,
            PeriodUnit::Weeks => 7 * 86_400_000,
            PeriodUnit::Months => return None,
        };
        Some(unit * i64::from(self.count))
    }

    /// The start of period number `index` (0 starts at the anchor; negative is before it).
    pub fn start_of(&self, index: i64) -> Timestamp {
        match self.fixed_millis() {
            Some(len) => Timestamp::from_millis(
                self.anchor
                    .timestamp_millis()
                    .saturating_add(index.saturating_mul(len)),
            ),
            None => {
                let months = index.saturating_mul(i64::from(self.count));
                let magnitude =
                    Months::new(u32::try_from(months.unsigned_abs()).unwrap_or(u32::MAX));
                let shifted = if months >= 0 {
                    self.anchor.checked_add_months(magnitude)
                } else {
                    self.anchor.checked_sub_months(magnitude)
                };
                shifted
                    .map(Timestamp::from_datetime)
                    .unwrap_or(if months >= 0 {
                        Timestamp::from_millis(i64::MAX)
                    } else {
                        Timestamp::from_millis(i64::MIN)
                    })
            }
        }
    }

    /// The number of the period that contains `now`, and when it ends (the quota's reset).
    pub fn period_at(&self, now: Timestamp) -> (i64, Timestamp) {
        let last = self.last.load();
        if last.start <= now.millis() && now.millis() < last.end {
            return (last.index, Timestamp::from_millis(last.end));
        }
        let index = self.index_at(now);
        let start = self.start_of(index).millis();
        let end = self.start_of(index + 1).millis();
        self.last.store(Bounds { index, start, end });
        (index, Timestamp::from_millis(end))
    }

    /// The number of the period that contains `now`.
    pub fn index_at(&self, now: Timestamp) -> i64 {
        if let Some(len) = self.fixed_millis() {
            return (now.millis() - self.anchor.timestamp_millis()).div_euclid(len);
        }
        let dt = now.to_datetime();
        let month_of = |d: &DateTime<Utc>| i64::from(d.year()) * 12 + i64::from(d.month0());
        let mut index = (month_of(&dt) - month_of(&self.anchor)).div_euclid(i64::from(self.count));
        // The month arithmetic is a first guess: the anchor's day and time decide the boundary.
        while self.start_of(index) > now {
            index -= 1;
        }
        while self.start_of(index + 1) <= now {
            index += 1;
        }
        index
    }

    /// The end (exclusive) of the period that contains `now`: when the quota resets.
    pub fn reset_at(&self, index: i64) -> Timestamp {
        self.start_of(index + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        Timestamp::from_datetime(s.parse::<DateTime<Utc>>().unwrap())
    }

    fn monthly(anchor: &str) -> CalendarPeriod {
        CalendarPeriod::parse("P1M", anchor.parse().unwrap()).unwrap()
    }

    #[test]
    fn month_end_anchor_clamps_and_returns_to_the_31st() {
        let p = monthly("2024-01-31T00:00:00Z");
        assert_eq!(p.start_of(1), at("2024-02-29T00:00:00Z")); // leap year
        assert_eq!(p.start_of(2), at("2024-03-31T00:00:00Z"));
        assert_eq!(p.start_of(13), at("2025-02-28T00:00:00Z"));
        let i = p.index_at(at("2024-02-29T00:00:00Z"));
        assert_eq!(i, 1);
        assert_eq!(p.index_at(at("2024-02-28T23:59:59.999Z")), 0);
        assert_eq!(p.index_at(at("2024-03-30T12:00:00Z")), 1);
        assert_eq!(p.index_at(at("2024-03-31T00:00:00Z")), 2);
        assert_eq!(p.reset_at(1), at("2024-03-31T00:00:00Z"));
    }

    #[test]
    fn monthly_rollover_at_month_end() {
        let p = monthly("2026-01-01T00:00:00Z");
        let last = at("2026-01-31T23:59:59.999Z");
        let first = at("2026-02-01T00:00:00Z");
        assert_eq!(p.index_at(last), 0);
        assert_eq!(p.index_at(first), 1);
        assert_eq!(p.reset_at(0), first);
        assert_eq!(p.index_at(at("2025-12-31T23:00:00Z")), -1);
    }

    #[test]
    fn daily_periods_across_a_leap_day() {
        let p = CalendarPeriod::parse("P1D", "2024-01-01T00:00:00Z".parse().unwrap()).unwrap();
        let feb28 = p.index_at(at("2024-02-28T12:00:00Z"));
        let feb29 = p.index_at(at("2024-02-29T00:00:00Z"));
        let mar1 = p.index_at(at("2024-03-01T00:00:00Z"));
        assert_eq!(feb29, feb28 + 1);
        assert_eq!(mar1, feb29 + 1);
        assert_eq!(p.reset_at(feb29), at("2024-03-01T00:00:00Z"));
    }

    #[test]
    fn yearly_anchor_on_a_leap_day() {
        let p = CalendarPeriod::parse("P1Y", "2024-02-29T00:00:00Z".parse().unwrap()).unwrap();
        assert_eq!(p.start_of(1), at("2025-02-28T00:00:00Z"));
        assert_eq!(p.start_of(4), at("2028-02-29T00:00:00Z"));
        assert_eq!(p.index_at(at("2025-02-27T23:59:59Z")), 0);
        assert_eq!(p.index_at(at("2025-02-28T00:00:00Z")), 1);
    }

    #[test]
    fn weekly_and_anchor_time_of_day() {
        let p = CalendarPeriod::parse("P1W", "2026-11-02T09:30:00Z".parse().unwrap()).unwrap();
        assert_eq!(p.index_at(at("2026-11-09T09:29:59Z")), 0);
        assert_eq!(p.index_at(at("2026-11-09T09:30:00Z")), 1);
    }

    #[test]
    fn bad_durations_are_refused_with_a_reason() {
        let a: DateTime<Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(
            CalendarPeriod::parse("monthly", a).unwrap_err(),
            DurationError::Syntax("monthly".into())
        );
        assert_eq!(
            CalendarPeriod::parse("P1M2D", a).unwrap_err(),
            DurationError::Mixed("P1M2D".into())
        );
        assert_eq!(
            CalendarPeriod::parse("PT5M", a).unwrap_err(),
            DurationError::TooFine("PT5M".into())
        );
        assert_eq!(
            CalendarPeriod::parse("P0D", a).unwrap_err(),
            DurationError::Zero("P0D".into())
        );
        assert_eq!(
            parse_fixed_millis("P1M").unwrap_err(),
            DurationError::NotFixed("P1M".into())
        );
        assert_eq!(parse_fixed_millis("PT1M").unwrap(), 60_000);
        assert_eq!(parse_fixed_millis("P1W").unwrap(), 7 * 86_400_000);
    }
}

#[cfg(test)]
mod cache_tests {
    use super::*;

    #[test]
    fn the_cached_period_follows_time_both_ways() {
        let p = CalendarPeriod::parse("P1M", "2026-01-31T00:00:00Z".parse().unwrap()).unwrap();
        let at = |s: &str| Timestamp::from_datetime(s.parse::<DateTime<Utc>>().unwrap());
        let clone = p.clone();
        for (now, index, end) in [
            ("2026-02-27T23:59:59.999Z", 0, "2026-02-28T00:00:00Z"),
            ("2026-02-28T00:00:00Z", 1, "2026-03-31T00:00:00Z"),
            ("2026-03-30T00:00:00Z", 1, "2026-03-31T00:00:00Z"),
            ("2026-01-31T00:00:00Z", 0, "2026-02-28T00:00:00Z"),
            ("2026-03-31T00:00:00Z", 2, "2026-04-30T00:00:00Z"),
        ] {
            assert_eq!(p.period_at(at(now)), (index, at(end)), "at {now}");
            assert_eq!(
                clone.period_at(at(now)),
                (p.index_at(at(now)), at(end)),
                "clone at {now}"
            );
        }
    }
}
