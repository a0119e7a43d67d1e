//! The counter store in front of another: a decision held inside this replica's slices where
//! they have room, the rest in the inner store.

use super::*;

/// A counter of a decision held inside a slice, with its reading there.
pub(super) type HeldHere = Option<(LocalPart, Reading)>;

impl Shared {
    /// Writes the customer's pending local records on a task of their own, once a batch has
    /// gathered (a failure keeps them for the sweep's next try).
    pub(super) fn flush_records(self: Arc<Self>, customer: Name, now: Timestamp) {
        tokio::spawn(async move {
            let _ = self.write_records(customer, now).await;
        });
    }

    /// Turns the local hold `hold_in_slices` entered for a committed decision into spending:
    /// its parts settle at once at their held amounts, so the slices count them as spent (and
    /// are renewed by them, as by settled holds). With `record`, the call's usage record is
    /// kept for the store as a committed record; without, the store wrote it with its part.
    pub(super) fn commit_local(&self, b: &mut Book, plan: &Plan, record: bool, now: Timestamp) {
        let Some(h) = b.holds.remove(&plan.hold_tag) else {
            return;
        };
        // Settled at the held usage, each part spends exactly what it held: nothing is over.
        b.close_parts(&h.parts, Some(&plan.usage));
        if record && plan.record {
            b.push_record(
                LocalRecord {
                    kind: RecordKind::Committed,
                    at: now,
                    series: h.series,
                    measures: Measures::of_call(plan.usage.units, plan.usage.tokens, 0),
                    seq: 0,
                    tag: plan.hold_tag,
                },
                &self.counters.dropped,
            );
        }
    }

    /// Holds each of `plan`'s leasable counters inside this replica's slice where one has
    /// room, and enters the local hold (`seq`) before any store call, so a cancel that
    /// overtakes the call finds it. Per counter, its part and reading where held; and the
    /// slots that need a slice (each marked as acquiring), with the counter's index.
    pub(super) fn hold_in_slices(
        &self,
        b: &mut Book,
        plan: &Plan,
        seq: u64,
        now: Timestamp,
    ) -> (Vec<HeldHere>, Vec<(SlotKey, usize)>) {
        let until = now.millis().saturating_add(plan.hold_ttl_millis);
        let mut local: Vec<HeldHere> = vec![None; plan.counters.len()];
        let mut want = Vec::new();
        for (i, c) in plan.counters.iter().enumerate() {
            let Some(lease) = leasable(c) else {
                continue;
            };
            let slot = lease.0;
            let s = self.want_slice(b, c, lease, now.millis(), plan.hold_ttl_millis);
            let granted = match s.usable(now.millis(), until) {
                Some(g) => {
                    if g.lease.hold(c.amount, now.millis()) {
                        Some(g.store.seq)
                    } else {
                        // Too little room for this request: the slice goes back (once its
                        // holds close) so that what it holds is the store's again.
                        g.retired = true;
                        None
                    }
                }
                None => None,
            };
            match granted {
                Some(slice) => {
                    local[i] = Some((
                        LocalPart {
                            slot,
                            slice,
                            held: c.amount,
                            rule: c.rule.clone(),
                        },
                        s.reading(),
                    ));
                }
                None if !s.acquiring => {
                    s.acquiring = true;
                    want.push((slot, i));
                }
                None => {}
            }
        }
        let parts: Vec<LocalPart> = local.iter().flatten().map(|(p, _)| p.clone()).collect();
        if !parts.is_empty() {
            b.holds.insert(
                plan.hold_tag,
                LocalHold {
                    seq,
                    tag: plan.hold_tag,
                    expires_at: now.plus_millis(plan.hold_ttl_millis),
                    parts,
                    store: None,
                    series: plan.series.clone(),
                    usage: plan.usage,
                    max_settle: plan.max_settle,
                    record: plan.record,
                },
            );
        }
        (local, want)
    }
}

/// `plan` cut to the counters at `rest_index`, for the store part of a hold held partly here.
/// Its close may come through another replica, posted before the hold's TTL and applied here
/// at a later sweep: the store part waits that long for it (a hold never closed is committed
/// at its held amount that much later).
pub(super) fn rest_of(plan: &Plan, rest_index: &[usize]) -> Plan {
    let mut p = plan.clone();
    p.counters = rest_index
        .iter()
        .filter_map(|i| plan.counters.get(*i).cloned())
        .collect();
    p.hold_ttl_millis = p.hold_ttl_millis.saturating_add(RELAY_MARGIN_MS);
    p
}

/// The store counts this replica's slices whole; what they have not spent yet is not usage,
/// so the store's `readings` (of the counters at `rest_index`) leave it out, for answers and
/// alerts alike.
pub(super) fn leave_out_unspent(
    b: &Book,
    plan: &Plan,
    rest_index: &[usize],
    readings: &mut [Reading],
) {
    for (k, reading) in readings.iter_mut().enumerate() {
        let slot = rest_index
            .get(k)
            .and_then(|i| plan.counters.get(*i))
            .and_then(leasable)
            .and_then(|(slot, _, _)| b.slots.get(&slot));
        if let Some(s) = slot {
            let unspent: u64 = s.gens.iter().map(|g| g.lease.room()).sum();
            reading.current_usage = reading.current_usage.saturating_sub(unspent);
            reading.remaining = reading.usage_limit.saturating_sub(reading.current_usage);
        }
    }
}

/// The `n` readings in the plan's order: each counter's from its slice where it was held
/// here, else the store's next.
pub(super) fn merged(local: Vec<HeldHere>, store: Vec<Reading>, n: usize) -> Vec<Reading> {
    let mut readings = Vec::with_capacity(n);
    let mut store = store.into_iter();
    for here in local.into_iter().take(n) {
        match here {
            Some((_, reading)) => readings.push(reading),
            None => readings.push(store.next().unwrap_or(Reading {
                usage_limit: 0,
                current_usage: 0,
                remaining: 0,
                reset_at: None,
                fits: false,
                retry_at: None,
            })),
        }
    }
    readings
}

#[async_trait::async_trait]
impl CounterStore for LeasedStore {
    async fn reserve(
        &self,
        plan: &Plan,
        mode: ReserveMode,
        now: Timestamp,
    ) -> Result<Reservation, StoreError> {
        let shared = &self.shared;
        if mode == ReserveMode::DryRun || plan.counters.is_empty() {
            return shared.inner.reserve(plan, mode, now).await;
        }
        let n = plan.counters.len();
        let book = shared.book(plan.customer);
        let seq = LOCAL_BIT
            | (u64::from(shared.replica) << REPLICA_SHIFT)
            | (shared.next_seq.fetch_add(1, Ordering::Relaxed) & 0xFFFF_FFFF);
        let (local, want) = shared.hold_in_slices(&mut book.lock(), plan, seq, now);
        let covered = local.iter().filter(|l| l.is_some()).count();
        let held_here = covered > 0;
        let local_hold_id = || HoldId {
            customer: plan.customer.to_string(),
            seq,
            tag: plan.hold_tag,
        };
        if covered == n {
            shared.counters.local.fetch_add(1, Ordering::Relaxed);
            let hold = if mode == ReserveMode::Commit {
                let pending = {
                    let mut b = book.lock();
                    shared.commit_local(&mut b, plan, true, now);
                    b.records.len()
                };
                if pending >= FLUSH_AT {
                    Arc::clone(shared).flush_records(plan.customer, now);
                }
                None
            } else {
                Some(local_hold_id())
            };
            return Ok(Reservation {
                readings: local.into_iter().flatten().map(|(_, r)| r).collect(),
                blocking: None,
                hold,
            });
        }
        // The rest goes to the store, as a plan of the uncovered counters only.
        let rest_index: Vec<usize> = (0..n).filter(|i| local[*i].is_none()).collect();
        let rest;
        let store_plan = if held_here {
            rest = rest_of(plan, &rest_index);
            &rest
        } else {
            plan
        };
        // Should the store call fail or this call be dropped, the slots marked as acquiring
        // are unmarked, so a later decision asks for their slices again.
        let mut pending = Unmark {
            book: Arc::clone(&book),
            slots: want.iter().map(|(slot, _)| *slot).collect(),
        };
        let answer = shared.inner.reserve(store_plan, mode, now).await;
        let rollback = |b: &mut Book| {
            if let Some(h) = b.holds.remove(&plan.hold_tag) {
                b.close_parts(&h.parts, None);
            }
        };
        let mut r = match answer {
            Ok(r) => r,
            Err(e) => {
                if held_here {
                    rollback(&mut book.lock());
                }
                return Err(e);
            }
        };
        // Slices for the counters that had none, sized from what the store has left.
        pending.slots.clear();
        for (slot, i) in want {
            let remaining = rest_index
                .iter()
                .position(|j| *j == i)
                .and_then(|k| r.readings.get(k))
                .map_or(0, |r| r.remaining);
            tokio::spawn(Arc::clone(shared).acquire(plan.customer, slot, remaining));
        }
        leave_out_unspent(&book.lock(), plan, &rest_index, &mut r.readings);
        if !held_here {
            shared.counters.store.fetch_add(1, Ordering::Relaxed);
            return Ok(r);
        }
        let readings = merged(local, r.readings, n);
        let blocking = r.blocking.and_then(|k| rest_index.get(k).copied());
        let mut b = book.lock();
        match (blocking, r.hold) {
            (None, None) if mode == ReserveMode::Commit => {
                // The store counted its part and wrote the call's record.
                shared.commit_local(&mut b, plan, false, now);
                shared.counters.partial.fetch_add(1, Ordering::Relaxed);
                Ok(Reservation {
                    readings,
                    blocking: None,
                    hold: None,
                })
            }
            (None, Some(store)) => {
                if let Some(h) = b.holds.get_mut(&plan.hold_tag) {
                    h.store = Some(HoldKey {
                        customer: plan.customer,
                        seq: store.seq,
                        tag: store.tag,
                    });
                }
                shared.counters.partial.fetch_add(1, Ordering::Relaxed);
                Ok(Reservation {
                    readings,
                    blocking: None,
                    hold: Some(local_hold_id()),
                })
            }
            _ => {
                rollback(&mut b);
                Ok(Reservation {
                    readings,
                    blocking,
                    hold: None,
                })
            }
        }
    }

    async fn settle_ended(
        &self,
        hold: HoldKey,
        actual: &Usage,
        end: Option<StreamEnd>,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        if hold.seq & LOCAL_BIT == 0 {
            return self.shared.inner.settle_ended(hold, actual, end, now).await;
        }
        if let Some(posted) = self.relay_close(hold, Some(*actual), end, now).await {
            return posted;
        }
        self.close_local(hold, Some(actual), end, now).await
    }

    async fn renew(
        &self,
        old: HoldKey,
        spent: u64,
        next: &Plan,
        now: Timestamp,
    ) -> Result<(CloseOutcome, Reservation), StoreError> {
        self.shared.inner.renew(old, spent, next, now).await
    }

    async fn release(&self, hold: HoldKey, now: Timestamp) -> Result<CloseOutcome, StoreError> {
        if hold.seq & LOCAL_BIT == 0 {
            return self.shared.inner.release(hold, now).await;
        }
        if let Some(posted) = self.relay_close(hold, None, None, now).await {
            return posted;
        }
        self.close_local(hold, None, None, now).await
    }

    async fn cancel(&self, customer: Name, tag: u128, now: Timestamp) -> Result<bool, StoreError> {
        let shared = &self.shared;
        let local = {
            let book = shared.book(customer);
            let mut b = book.lock();
            b.holds.remove(&tag).map(|h| {
                b.close_parts(&h.parts, None);
            })
        };
        // The store part (or a whole store decision) under the same tag.
        let in_store = shared.inner.cancel(customer, tag, now).await?;
        Ok(local.is_some() || in_store)
    }

    async fn expire_due(&self, now: Timestamp) -> Result<usize, StoreError> {
        let expired = self.maintain(now).await;
        let in_store = self.shared.inner.expire_due(now).await?;
        Ok(expired + in_store)
    }

    async fn add_grant(
        &self,
        customer: Name,
        pool: CounterKey,
        grant: GrantBalance,
    ) -> Result<bool, StoreError> {
        self.shared.inner.add_grant(customer, pool, grant).await
    }

    async fn inspect(
        &self,
        customer: Name,
        key: CounterKey,
        spec: &CounterSpec,
        now: Timestamp,
    ) -> Result<Option<crate::core::counter::Inspection>, StoreError> {
        let inspected = self.shared.inner.inspect(customer, key, spec, now).await?;
        let CounterSpec::Quota { index, .. } = spec else {
            return Ok(inspected);
        };
        // The store counts this replica's slices whole; what they have not spent is not
        // usage (as in a decision's readings). Other replicas' unspent slices still count
        // until they come back.
        let slot = SlotKey {
            key,
            period: *index,
        };
        let unspent: u64 = self
            .shared
            .books
            .get(&customer)
            .map(|b| {
                b.value()
                    .lock()
                    .slots
                    .get(&slot)
                    .map_or(0, |s| s.gens.iter().map(|g| g.lease.room()).sum::<u64>())
            })
            .unwrap_or(0);
        Ok(inspected.map(|r| crate::core::counter::Inspection {
            used: r.used.saturating_sub(unspent),
            ..r
        }))
    }

    async fn record(
        &self,
        plan: &Plan,
        idempotency_key: &str,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        self.shared.inner.record(plan, idempotency_key, now).await
    }

    async fn auto_entity(
        &self,
        customer: Name,
        id: &str,
        proposed: &StoredEntity,
        max: u32,
        create: bool,
    ) -> Result<AutoEntityOutcome, StoreError> {
        self.shared
            .inner
            .auto_entity(customer, id, proposed, max, create)
            .await
    }

    async fn auto_entity_count(&self, customer: Name) -> Result<usize, StoreError> {
        self.shared.inner.auto_entity_count(customer).await
    }

    async fn auto_entities(
        &self,
        customer: Name,
    ) -> Result<Vec<(String, StoredEntity)>, StoreError> {
        self.shared.inner.auto_entities(customer).await
    }

    fn stats(&self) -> StoreStats {
        self.shared.inner.stats()
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.shared.inner.flush()
    }

    fn admin_log(&self) -> &dyn AdminLog {
        self.shared.inner.admin_log()
    }

    fn hold_relay(&self) -> &dyn HoldRelay {
        self.shared.inner.hold_relay()
    }

    fn usage(&self) -> &dyn UsageStore {
        self.shared.inner.usage()
    }

    fn alerts(&self) -> &dyn AlertStore {
        self.shared.inner.alerts()
    }
}
