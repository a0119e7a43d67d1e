//! Counter state and the arithmetic of one limit: read, hold, correct, release. Pure functions
//! that every store runs under its per-customer atomicity.

use super::Timestamp;
use super::credits::{CreditPool, Draw};
use super::model::LimitKind;
use super::symbols::Sym;
use super::window::{RollingWindow, WindowState};

/// Identifies one counter within one customer: the entity, the limit and, for isolated credit
/// pools, the resource. 12 bytes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct CounterKey {
    #[serde(with = "super::symbols::as_text")]
    pub entity: Sym,
    #[serde(with = "super::symbols::as_text")]
    pub limit: Sym,
    #[serde(with = "super::symbols::option_as_text")]
    pub partition: Option<Sym>,
}

/// The limit arithmetic a counter follows, copied out of the model so that a hold can be
/// settled even after the model was reloaded.
#[derive(Debug, Clone, PartialEq)]
pub enum CounterSpec {
    Rate {
        limit: u64,
        window: RollingWindow,
    },
    /// `index` and `reset_at` are the period in force at the decision's time, worked out once
    /// when the spec is made: calendar arithmetic is the costliest part of a quota check.
    Quota {
        limit: u64,
        index: i64,
        reset_at: Timestamp,
    },
    Concurrency {
        limit: u32,
    },
    /// `pool_known` is false when the request names a pool that has never had a grant (or
    /// names none): such a pool holds nothing, and no state is created for it.
    Credits {
        pool_known: bool,
    },
}

impl CounterSpec {
    /// The arithmetic of a limit of `kind` at `now`. `pool_known` matters only for isolated
    /// credit pools: whether the request's pool has ever had a grant.
    pub fn of(kind: &LimitKind, pool_known: bool, now: Timestamp) -> Self {
        match kind {
            LimitKind::Rate { limit, window } => Self::Rate {
                limit: *limit,
                window: *window,
            },
            LimitKind::Quota { limit, period } => {
                let (index, reset_at) = period.period_at(now);
                Self::Quota {
                    limit: *limit,
                    index,
                    reset_at,
                }
            }
            LimitKind::Concurrency { limit } => Self::Concurrency { limit: *limit },
            LimitKind::Credits { pool_by: None } => Self::Credits { pool_known: true },
            LimitKind::Credits { pool_by: Some(_) } => Self::Credits { pool_known },
        }
    }
}

/// The mutable state of one counter.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum CounterState {
    Window(WindowState),
    /// Usage (settled and held) in calendar period `index`.
    Period {
        index: i64,
        used: u64,
    },
    InFlight(u32),
    /// Boxed: pools are few and large; the common counters stay small.
    Credits(Box<CreditPool>),
}

impl CounterState {
    /// A fresh state for `spec`, or `None` for a credit pool (pools come only from grants).
    pub fn fresh(spec: &CounterSpec, now: Timestamp) -> Option<Self> {
        match spec {
            CounterSpec::Rate { window, .. } => Some(Self::Window(WindowState::new(window, now))),
            CounterSpec::Quota { index, .. } => Some(Self::Period {
                index: *index,
                used: 0,
            }),
            CounterSpec::Concurrency { .. } => Some(Self::InFlight(0)),
            CounterSpec::Credits { .. } => None,
        }
    }
}

/// What a hold left on one counter, so that settlement and release can undo exactly that.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HoldMark {
    Window {
        bucket: i64,
    },
    Period {
        index: i64,
    },
    InFlight,
    Credits {
        draws: Vec<Draw>,
    },
    /// Nothing was placed (a credit pool with no state never grants, so this only appears for
    /// non-enforcing limits that were exceeded on an empty pool).
    Nothing,
}

/// A counter as seen by one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    pub usage_limit: u64,
    pub current_usage: u64,
    pub remaining: u64,
    pub reset_at: Option<Timestamp>,
    /// Whether `amount` more fits.
    pub fits: bool,
    pub retry_at: Option<Timestamp>,
}

fn reading(limit: u64, used: u64, amount: u64, reset_at: Option<Timestamp>) -> Reading {
    Reading {
        usage_limit: limit,
        current_usage: used,
        remaining: limit.saturating_sub(used),
        reset_at,
        fits: used.saturating_add(amount) <= limit,
        retry_at: None,
    }
}

/// Reads `state` against `spec` for a request of `amount`.
pub fn read(
    spec: &CounterSpec,
    state: Option<&CounterState>,
    amount: u64,
    now: Timestamp,
) -> Reading {
    match (spec, state) {
        (CounterSpec::Rate { limit, window }, Some(CounterState::Window(w))) => {
            let mut r = reading(
                *limit,
                w.used(window, now),
                amount,
                w.next_release(window, now),
            );
            if !r.fits {
                r.retry_at = w.retry_at(window, now, *limit, amount);
            }
            r
        }
        (CounterSpec::Rate { limit, .. }, _) => reading(*limit, 0, amount, None),
        (
            CounterSpec::Quota {
                limit,
                index,
                reset_at,
                ..
            },
            state,
        ) => {
            // A state already in a later period (written by a replica whose clock is ahead, or
            // before this clock stepped back) is the period in force: counting it as empty
            // would let a late clock spend the new period's cap again.
            let used = match state {
                Some(CounterState::Period { index: i, used }) if i >= index => *used,
                _ => 0,
            };
            let mut r = reading(*limit, used, amount, Some(*reset_at));
            if !r.fits && amount <= *limit {
                r.retry_at = r.reset_at;
            }
            r
        }
        (CounterSpec::Concurrency { limit }, state) => {
            let used = match state {
                Some(CounterState::InFlight(n)) => u64::from(*n),
                _ => 0,
            };
            reading(u64::from(*limit), used, 1, None)
        }
        (CounterSpec::Credits { .. }, Some(CounterState::Credits(pool))) => {
            let granted = pool.granted(now);
            let available = pool.available(now);
            Reading {
                usage_limit: granted,
                current_usage: granted.saturating_sub(available),
                remaining: available,
                reset_at: pool.next_expiry(now),
                fits: available >= amount,
                retry_at: None,
            }
        }
        (CounterSpec::Credits { .. }, _) => reading(0, 0, amount, None),
    }
}

/// The reading of a counter just after `hold` placed `amount` on it, derived from the reading
/// before rather than read again: the hold added exactly `amount` (one slot for concurrency).
pub fn after_hold(
    spec: &CounterSpec,
    state: &CounterState,
    before: &Reading,
    amount: u64,
    now: Timestamp,
) -> Reading {
    if let CounterSpec::Credits { .. } = spec {
        // Which grants a draw emptied decides the pool's next expiry: read it again. Pools are
        // few, so this costs little overall.
        let after = read(spec, Some(state), 0, now);
        return Reading {
            fits: before.fits,
            retry_at: before.retry_at,
            ..after
        };
    }
    let added = if matches!(spec, CounterSpec::Concurrency { .. }) {
        1
    } else {
        amount
    };
    let reset_at = match (spec, before.reset_at) {
        // The first units in an empty window set when it starts to drain.
        (CounterSpec::Rate { window, .. }, None) => match state {
            CounterState::Window(w) => w.next_release(window, now),
            _ => None,
        },
        (_, reset_at) => reset_at,
    };
    Reading {
        current_usage: before.current_usage.saturating_add(added),
        remaining: before.remaining.saturating_sub(added),
        reset_at,
        ..*before
    }
}

/// Places `amount` on the counter. The caller has already decided the request passes; for
/// non-enforcing limits this may take the counter past its limit, which is the point.
pub fn hold(spec: &CounterSpec, state: &mut CounterState, amount: u64, now: Timestamp) -> HoldMark {
    match (spec, state) {
        (CounterSpec::Rate { window, .. }, CounterState::Window(w)) => HoldMark::Window {
            bucket: w.add(window, now, amount),
        },
        (CounterSpec::Quota { index: current, .. }, CounterState::Period { index, used }) => {
            // Only a later period starts afresh; an earlier one (a late clock) counts in the
            // period already in force, never resetting it.
            if *index < *current {
                *index = *current;
                *used = 0;
            }
            *used = used.saturating_add(amount);
            HoldMark::Period { index: *index }
        }
        (CounterSpec::Concurrency { .. }, CounterState::InFlight(n)) => {
            *n = n.saturating_add(1);
            HoldMark::InFlight
        }
        (CounterSpec::Credits { .. }, CounterState::Credits(pool)) => {
            // A shadow or soft credit limit may be short; record what it could not cover as debt.
            HoldMark::Credits {
                draws: pool.draw_forced(amount, now),
            }
        }
        _ => HoldMark::Nothing,
    }
}

/// Corrects a hold of `held` to the `actual` usage and closes it (frees a concurrency slot).
pub fn settle(state: &mut CounterState, mark: &HoldMark, held: u64, actual: u64, now: Timestamp) {
    let delta = i128::from(actual) - i128::from(held);
    match (state, mark) {
        (CounterState::Window(w), HoldMark::Window { bucket }) => {
            w.adjust(
                *bucket,
                i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX }),
            );
        }
        // A correction for a period that has closed is dropped: that quota has reset.
        (CounterState::Period { index, used }, HoldMark::Period { index: held_in })
            if index == held_in =>
        {
            *used = if delta < 0 {
                used.saturating_sub(u64::try_from(-delta).unwrap_or(u64::MAX))
            } else {
                used.saturating_add(u64::try_from(delta).unwrap_or(u64::MAX))
            };
        }
        (CounterState::InFlight(n), HoldMark::InFlight) => *n = n.saturating_sub(1),
        (CounterState::Credits(pool), HoldMark::Credits { draws }) => {
            if actual < held {
                pool.refund(draws, held - actual);
            } else if actual > held {
                pool.draw_forced(actual - held, now);
            }
        }
        _ => {}
    }
}

/// Undoes a hold entirely.
pub fn release(state: &mut CounterState, mark: &HoldMark, held: u64, now: Timestamp) {
    settle(state, mark, held, 0, now);
}

/// Commits an expired hold at its held amount: counters keep it, a concurrency slot is freed.
pub fn expire(state: &mut CounterState, mark: &HoldMark) {
    if let (CounterState::InFlight(n), HoldMark::InFlight) = (state, mark) {
        *n = n.saturating_sub(1);
    }
}

/// A counter as inspection reads it: the units it counts and, for a credit pool, what its
/// unexpired grants gave in all (the pool's "limit") and what is left to spend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inspection {
    pub used: u64,
    pub granted: Option<u64>,
    pub available: Option<u64>,
}

/// [`counted`], with a credit pool's grants and balance.
pub fn inspect(spec: &CounterSpec, state: &CounterState, now: Timestamp) -> Inspection {
    let (granted, available) = match state {
        CounterState::Credits(pool) => (Some(pool.granted(now)), Some(pool.available(now))),
        _ => (None, None),
    };
    Inspection {
        used: counted(spec, state, now),
        granted,
        available,
    }
}

/// The units a counter currently counts, for invariants and inspection: window usage, period
/// usage, slots in flight, or credits spent from the pool's grants plus debt.
pub fn counted(spec: &CounterSpec, state: &CounterState, now: Timestamp) -> u64 {
    match (spec, state) {
        (CounterSpec::Rate { window, .. }, CounterState::Window(w)) => w.used(window, now),
        (CounterSpec::Quota { index: current, .. }, CounterState::Period { index, used })
            if index >= current =>
        {
            *used
        }
        (_, CounterState::InFlight(n)) => u64::from(*n),
        (_, CounterState::Credits(pool)) => {
            pool.grants()
                .map(|g| g.amount - g.remaining.min(g.amount))
                .sum::<u64>()
                + pool.debt()
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::credits::GrantBalance;
    use crate::core::model::GrantCategory;
    use crate::core::period::CalendarPeriod;

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn quota_hold_settle_and_rollover() {
        let period = CalendarPeriod::parse("P1D", "2026-01-01T00:00:00Z".parse().unwrap()).unwrap();
        let day0 = period.start_of(0);
        let kind = LimitKind::Quota {
            limit: 100,
            period: period.clone(),
        };
        let spec = CounterSpec::of(&kind, true, day0);
        let mut s = CounterState::fresh(&spec, day0).unwrap();
        let mark = hold(&spec, &mut s, 60, day0);
        let r = read(&spec, Some(&s), 50, day0);
        assert!(!r.fits);
        assert_eq!(r.retry_at, Some(period.start_of(1)));
        settle(&mut s, &mark, 60, 20, day0);
        assert_eq!(read(&spec, Some(&s), 0, day0).current_usage, 20);
        // Next day the quota has reset; a late settlement of yesterday's hold is dropped.
        let day1 = period.start_of(1);
        let spec = CounterSpec::of(&kind, true, day1);
        assert_eq!(read(&spec, Some(&s), 0, day1).current_usage, 0);
        let m2 = hold(&spec, &mut s, 10, day1);
        settle(&mut s, &mark, 60, 90, day1);
        assert_eq!(read(&spec, Some(&s), 0, day1).current_usage, 10);
        release(&mut s, &m2, 10, day1);
        assert_eq!(read(&spec, Some(&s), 0, day1).current_usage, 0);
    }

    #[test]
    fn a_late_clock_counts_in_the_period_in_force_and_never_resets_it() {
        let period = CalendarPeriod::parse("P1D", "2026-01-01T00:00:00Z".parse().unwrap()).unwrap();
        let kind = LimitKind::Quota {
            limit: 100,
            period: period.clone(),
        };
        let day1 = period.start_of(1);
        let ahead = CounterSpec::of(&kind, true, day1);
        let mut s = CounterState::fresh(&ahead, day1).unwrap();
        hold(&ahead, &mut s, 70, day1);
        // A replica whose clock still says day 0 reads day 1's usage, and adds to it.
        let late = CounterSpec::of(&kind, true, day1.plus_millis(-5));
        assert_eq!(read(&late, Some(&s), 0, day1).current_usage, 70);
        assert!(!read(&late, Some(&s), 40, day1).fits);
        let m = hold(&late, &mut s, 20, day1);
        assert_eq!(m, HoldMark::Period { index: 1 });
        assert_eq!(counted(&ahead, &s, day1), 90);
        settle(&mut s, &m, 20, 5, day1);
        assert_eq!(counted(&ahead, &s, day1), 75);
    }

    #[test]
    fn a_request_larger_than_the_quota_has_no_retry_time() {
        let period = CalendarPeriod::parse("P1M", "2026-01-01T00:00:00Z".parse().unwrap()).unwrap();
        let spec = CounterSpec::of(&LimitKind::Quota { limit: 100, period }, true, t(0));
        let r = read(&spec, None, 101, t(0));
        assert!(!r.fits);
        assert_eq!(r.retry_at, None);
    }

    #[test]
    fn concurrency_counts_slots_not_units() {
        let spec = CounterSpec::Concurrency { limit: 2 };
        let mut s = CounterState::fresh(&spec, t(0)).unwrap();
        let a = hold(&spec, &mut s, 5_000, t(0));
        let b = hold(&spec, &mut s, 5_000, t(0));
        assert!(!read(&spec, Some(&s), 5_000, t(0)).fits);
        settle(&mut s, &a, 1, 1, t(0));
        assert!(read(&spec, Some(&s), 5_000, t(0)).fits);
        expire(&mut s, &b);
        assert_eq!(read(&spec, Some(&s), 1, t(0)).current_usage, 0);
    }

    #[test]
    fn credits_without_a_pool_never_fit() {
        let spec = CounterSpec::Credits { pool_known: false };
        let r = read(&spec, None, 1, t(0));
        assert!(!r.fits);
        assert_eq!(r.remaining, 0);
        assert!(CounterState::fresh(&spec, t(0)).is_none());
    }

    #[test]
    fn credits_settle_refunds_and_overdraws() {
        let spec = CounterSpec::Credits { pool_known: true };
        let mut pool = CreditPool::default();
        pool.add_grant(GrantBalance {
            id: "g".into(),
            priority: 0,
            expires_at: None,
            category: GrantCategory::Paid,
            amount: 100,
            remaining: 100,
        });
        let mut s = CounterState::Credits(Box::new(pool));
        let m = hold(&spec, &mut s, 40, t(0));
        assert_eq!(read(&spec, Some(&s), 0, t(0)).remaining, 60);
        settle(&mut s, &m, 40, 10, t(0));
        assert_eq!(read(&spec, Some(&s), 0, t(0)).remaining, 90);
        let m = hold(&spec, &mut s, 90, t(0));
        settle(&mut s, &m, 90, 120, t(0));
        assert_eq!(counted(&spec, &s, t(0)), 130);
        assert_eq!(read(&spec, Some(&s), 0, t(0)).remaining, 0);
    }
}
