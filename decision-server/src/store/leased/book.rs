//! A replica's book of one customer: its slots (each counter's slices, generation by
//! generation), its local holds, and the usage records of its local decisions waiting to be
//! written.

use super::*;

/// A lease's place: the counter and the period it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct SlotKey {
    pub(super) key: CounterKey,
    pub(super) period: i64,
}

/// One slice as placed in the store.
#[derive(Debug)]
pub(super) struct Gen {
    pub(super) lease: Lease,
    pub(super) store: HoldKey,
    /// No new local holds; returned once its open holds close.
    pub(super) retired: bool,
}

/// This replica's leases on one counter and what it knows of the counter.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) limit: u64,
    pub(super) reset_at: Timestamp,
    /// The counter as the last decision planned it: the template of the next slice.
    pub(super) template: PlannedCounter,
    /// Slices, the newest last.
    pub(super) gens: Vec<Gen>,
    pub(super) acquiring: bool,
    /// Units asked of the counter since `window_start`, and in the window before.
    pub(super) recent: u64,
    pub(super) previous: u64,
    pub(super) window_start: i64,
    pub(super) last_asked: i64,
    /// What the store counted, less this replica's slices, at the last placement.
    pub(super) others_used: u64,
    /// What the store had left at the last placement (after the slice).
    pub(super) store_remaining: u64,
    /// The hold TTL of the decisions on this counter (the model's `holdTtl`).
    pub(super) hold_ttl_ms: i64,
}

impl Slot {
    /// The current slice, if a decision holding until `until` may use it now.
    pub(super) fn usable(&mut self, now: i64, until: i64) -> Option<&mut Gen> {
        self.gens.last_mut().filter(|g| {
            !g.retired
                && until + RETURN_MARGIN_MS < g.lease.usable_until
                && now < g.lease.usable_until
        })
    }

    pub(super) fn note_demand(&mut self, amount: u64, now: i64, ttl: i64) {
        if now - self.window_start >= ttl {
            self.previous = if now - self.window_start >= 2 * ttl {
                0
            } else {
                self.recent
            };
            self.recent = 0;
            self.window_start = now;
        }
        self.recent = self.recent.saturating_add(amount);
        self.last_asked = now;
    }

    /// Units wanted over one lease lifetime at the recent rate: the last whole window, or
    /// the current one extrapolated (from at least a tenth of a second, so a counter that
    /// just got busy gets a useful slice at once rather than after a window).
    pub(super) fn rate_per_ttl(&self, now: i64, ttl: i64) -> u64 {
        let elapsed = (now - self.window_start).clamp(100, ttl.max(100));
        let current = u128::from(self.recent) * u128::from(ttl.unsigned_abs())
            / u128::from(elapsed.unsigned_abs());
        u64::try_from(current)
            .unwrap_or(u64::MAX)
            .max(self.previous)
    }

    pub(super) fn reading(&self) -> Reading {
        let mine: u64 = self.gens.iter().map(|g| g.lease.held + g.lease.spent).sum();
        let used = self.others_used.saturating_add(mine);
        Reading {
            usage_limit: self.limit,
            current_usage: used,
            remaining: self.limit.saturating_sub(used),
            reset_at: Some(self.reset_at),
            fits: true,
            retry_at: None,
        }
    }
}

/// One part of a local hold: its slice and what it holds there.
#[derive(Debug, Clone)]
pub(super) struct LocalPart {
    pub(super) slot: SlotKey,
    pub(super) slice: u64,
    pub(super) held: u64,
    pub(super) rule: AmountRule,
}

#[derive(Debug)]
pub(super) struct LocalHold {
    pub(super) seq: u64,
    pub(super) tag: u128,
    pub(super) expires_at: Timestamp,
    pub(super) parts: Vec<LocalPart>,
    /// The store's part of a partly covered decision (it records the decision).
    pub(super) store: Option<HoldKey>,
    pub(super) series: SeriesDraft,
    pub(super) usage: Usage,
    pub(super) max_settle: u64,
    /// Whether its close or expiry makes a usage record (`Plan::record`: not for a stream's
    /// slice, whose call's first hold records the whole).
    pub(super) record: bool,
}

/// One customer's leases, local holds and unwritten records.
#[derive(Debug, Default)]
pub(super) struct Book {
    pub(super) slots: HashMap<SlotKey, Slot>,
    pub(super) holds: HashMap<u128, LocalHold>,
    pub(super) records: VecDeque<LocalRecord>,
    /// Slices the store could not take back yet (unreachable): tried again at each sweep.
    pub(super) unreturned: Vec<(HoldKey, Lease)>,
    /// What settlements spent past their slices that the store could not be charged yet
    /// (unreachable), by local hold: charged at each sweep (idempotent by the hold).
    pub(super) overs: VecDeque<(HoldKey, Vec<PlannedCounter>)>,
    /// Store parts of partly covered holds whose close the store did not answer: closed at
    /// each sweep until it does (a close of a closed hold changes nothing).
    pub(super) unclosed: Vec<(HoldKey, Option<Usage>, Option<StreamEnd>, Timestamp)>,
    /// The number of the last batch of records made for this customer.
    pub(super) batches: u64,
    /// A batch sent and not answered: sent again, unchanged, before any newer record.
    pub(super) unsent: Option<(BatchId, Vec<LocalRecord>)>,
    /// A batch is in flight.
    pub(super) writing: bool,
}

impl Book {
    pub(super) fn gen_mut(&mut self, slot: &SlotKey, slice: u64) -> Option<&mut Gen> {
        self.slots
            .get_mut(slot)?
            .gens
            .iter_mut()
            .find(|g| g.store.seq == slice)
    }

    /// Closes a local hold's parts: settled at `actual` (`None`: released). Returns what a
    /// settlement over the hold spent past its slice, per counter: that must reach the store
    /// at once (see [`Shared::charge_over`]), or a decision the store makes meanwhile would
    /// not see it.
    pub(super) fn close_parts(
        &mut self,
        parts: &[LocalPart],
        actual: Option<&Usage>,
    ) -> Vec<PlannedCounter> {
        let mut over = Vec::new();
        for p in parts {
            let Some(slot) = self.slots.get_mut(&p.slot) else {
                continue;
            };
            let template = &slot.template;
            let Some(g) = slot.gens.iter_mut().find(|g| g.store.seq == p.slice) else {
                continue;
            };
            match actual {
                Some(u) => {
                    let excess = g.lease.settle(p.held, p.rule.amount(u));
                    if excess > 0 {
                        over.push(PlannedCounter {
                            amount: excess,
                            rule: AmountRule::Units,
                            ..template.clone()
                        });
                    }
                }
                None => g.lease.release(p.held),
            }
        }
        over
    }

    /// Ends a local hold at its held amount, as a store's expiry does (at `at`).
    pub(super) fn expire_hold(&mut self, h: &LocalHold, at: Timestamp, dropped: &AtomicU64) {
        for p in &h.parts {
            if let Some(g) = self.gen_mut(&p.slot, p.slice) {
                // Spending what it held always fits the room it held: nothing past the slice.
                g.lease.settle(p.held, p.held);
            }
        }
        if h.store.is_none() && h.record {
            self.push_record(expired_record(h, at), dropped);
        }
    }

    /// Keeps an excess for the next sweep; past [`MAX_PENDING_RECORDS`] the oldest is dropped
    /// (usage then undercounted by it, said in the log).
    pub(super) fn keep_over(&mut self, hold: HoldKey, over: Vec<PlannedCounter>) {
        if self.overs.len() >= MAX_PENDING_RECORDS
            && let Some((h, o)) = self.overs.pop_front()
        {
            let units: u64 = o.iter().map(|c| c.amount).max().unwrap_or(0);
            tracing::error!(hold = %h, units, "usage past a slice dropped: the store was unreachable too long");
        }
        self.overs.push_back((hold, over));
    }

    pub(super) fn push_record(&mut self, r: LocalRecord, dropped: &AtomicU64) {
        if self.records.len() >= MAX_PENDING_RECORDS {
            self.records.pop_front();
            dropped.fetch_add(1, Ordering::Relaxed);
        }
        self.records.push_back(r);
    }
}
