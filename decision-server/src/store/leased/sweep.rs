//! The sweep's side of escrow leases: placing, renewing and returning slices, writing the
//! records of local decisions, applying closes posted through other replicas, and closing a
//! local hold with the store part of a partly covered one.

use super::*;

impl Shared {
    pub(super) fn book(&self, customer: Name) -> Arc<Mutex<Book>> {
        Arc::clone(self.books.entry(customer).or_default().value())
    }

    pub(super) fn all_books(&self) -> Vec<(Name, Arc<Mutex<Book>>)> {
        self.books
            .iter()
            .map(|e| (*e.key(), Arc::clone(e.value())))
            .collect()
    }

    /// Settles a slice in the store at what was spent in it (returning the rest).
    pub(super) async fn settle_slice(
        &self,
        key: HoldKey,
        lease: &Lease,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let spent = lease.spent + lease.held;
        let outcome = self.inner.settle(key, &Usage::units(spent), now).await?;
        self.note_return(outcome, lease, now);
        Ok(())
    }

    /// Counts a slice's return: settled, or found closed. Found closed before the store's
    /// TTL for it could have run out, an earlier attempt whose answer was lost returned it;
    /// after, the store expired it and committed it whole (stranded).
    pub(super) fn note_return(&self, outcome: CloseOutcome, lease: &Lease, now: Timestamp) {
        let expired = now.millis() >= lease.usable_until + self.terms.skew_ms;
        match outcome {
            CloseOutcome::AlreadyClosed if expired => {
                let unused = lease.slice.saturating_sub(lease.spent + lease.held);
                self.counters.stranded.fetch_add(unused, Ordering::Relaxed);
            }
            CloseOutcome::Closed | CloseOutcome::AlreadyClosed => {
                self.counters.returned.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Charges what local settlements spent past their slices straight to the store's
    /// counters, as an over-hold settlement is charged without leases (whether or not it
    /// fits: the usage happened). Idempotent by the local hold's id.
    pub(super) async fn charge_over(
        &self,
        hold: HoldKey,
        over: &[PlannedCounter],
        now: Timestamp,
    ) -> Result<(), StoreError> {
        if over.is_empty() {
            return Ok(());
        }
        let units = over.iter().map(|c| c.amount).max().unwrap_or(0);
        let plan = Plan {
            customer: hold.customer,
            chain: Vec::new(),
            counters: over.to_vec(),
            usage: Usage::units(units),
            hold_ttl_millis: 0,
            max_settle: units,
            hold_tag: 0,
            series: SeriesDraft::default(),
            // The decision's own record (at its full amount) is the local one.
            record: false,
        };
        self.inner
            .record(&plan, &format!("lease-over:{hold}"), now)
            .await?;
        Ok(())
    }

    /// Closes the store part of a partly covered hold: settled at `actual`, or released.
    pub(super) async fn close_store_part(
        &self,
        store: HoldKey,
        actual: Option<Usage>,
        end: Option<StreamEnd>,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        match actual {
            Some(u) => self.inner.settle_ended(store, &u, end, now).await,
            None => self.inner.release(store, now).await,
        }
    }

    /// Closes the store parts `book` kept while the store did not answer, each as of when
    /// its close arrived; one still refused is kept for the next sweep.
    pub(super) async fn close_kept(&self, book: &Mutex<Book>) -> Result<(), StoreError> {
        let kept = std::mem::take(&mut book.lock().unclosed);
        let mut first = None;
        for (store, actual, end, at) in kept {
            if let Err(e) = self.close_store_part(store, actual, end, at).await {
                book.lock().unclosed.push((store, actual, end, at));
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Charges the excesses `book` kept while the store was unreachable, oldest first; one the
    /// store still refuses is kept again, with those after it.
    pub(super) async fn charge_kept(
        &self,
        book: &Mutex<Book>,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let kept = std::mem::take(&mut book.lock().overs);
        let mut kept = kept.into_iter();
        while let Some((hold, over)) = kept.next() {
            if let Err(e) = self.charge_over(hold, &over, now).await {
                let mut b = book.lock();
                let newer = std::mem::take(&mut b.overs);
                for (h, o) in std::iter::once((hold, over)).chain(kept).chain(newer) {
                    b.keep_over(h, o);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Settles `slices` back, at most [`STORE_CALLS_AT_ONCE`] at a time; one the store could
    /// not take is kept in `book` for the next sweep. Returns the first error.
    pub(super) async fn settle_all(
        &self,
        book: &Mutex<Book>,
        slices: Vec<(HoldKey, Lease)>,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let failed: Vec<(HoldKey, Lease, StoreError)> = futures_util::stream::iter(slices)
            .map(|(key, lease)| async move {
                match self.settle_slice(key, &lease, now).await {
                    Ok(()) => None,
                    Err(e) => Some((key, lease, e)),
                }
            })
            .buffer_unordered(STORE_CALLS_AT_ONCE)
            .filter_map(std::future::ready)
            .collect()
            .await;
        let mut first = None;
        let mut b = book.lock();
        for (key, lease, e) in failed {
            b.unreturned.push((key, lease));
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }

    /// Writes `customer`'s next batch of local records: the one sent before and not
    /// answered, unchanged and under the same number (the store applies a batch once), or
    /// else the records waiting, as a new batch. One batch of a customer is in flight at a
    /// time, so batches reach the store in their order; a call while one is in flight writes
    /// nothing (its records wait for the next).
    pub(super) async fn write_records(
        &self,
        customer: Name,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let book = self.book(customer);
        let batch = {
            let mut b = book.lock();
            if b.writing {
                return Ok(());
            }
            let batch = match b.unsent.take() {
                Some(batch) => batch,
                None if b.records.is_empty() => return Ok(()),
                None => {
                    b.batches += 1;
                    let id = BatchId {
                        writer: self.replica,
                        seq: b.batches,
                    };
                    (id, Vec::from(std::mem::take(&mut b.records)))
                }
            };
            b.writing = true;
            batch
        };
        // Should this call be dropped mid-way, the batch is kept to be sent again.
        let mut pending = Unsent {
            book: Arc::clone(&book),
            batch: Some(batch),
        };
        let Some((id, records)) = pending.batch.as_ref() else {
            return Ok(());
        };
        let written = self
            .inner
            .usage()
            .record_local(customer, *id, records, now)
            .await;
        if written.is_ok() {
            pending.batch = None;
        }
        written
    }

    /// Places a new slice on `slot` of `customer`, sized from the slot's rate and what the
    /// store had left; the slot's older slices retire.
    pub(super) async fn acquire(self: Arc<Self>, customer: Name, slot: SlotKey, remaining: u64) {
        let now = self.clock.now();
        let (template, size, old) = {
            let book = self.book(customer);
            let mut b = book.lock();
            let Some(s) = b.slots.get_mut(&slot) else {
                return;
            };
            let largest = s.template.amount.max(1);
            let size = slice_size(
                &self.terms,
                remaining,
                s.rate_per_ttl(now.millis(), self.terms.ttl_ms),
                largest,
            );
            if size == 0 {
                s.acquiring = false;
                return;
            }
            // A current slice with nothing open in it is renewed in one store step: what it
            // spent committed, the rest returned, the next one taken.
            let old = match s.gens.last() {
                Some(g) if !g.retired && g.lease.held == 0 => s.gens.pop(),
                _ => None,
            };
            (s.template.clone(), size, old)
        };
        let plan = Plan {
            customer,
            chain: Vec::new(),
            counters: vec![PlannedCounter {
                amount: size,
                rule: AmountRule::Units,
                ..template
            }],
            usage: Usage::units(size),
            hold_ttl_millis: self.terms.ttl_ms,
            max_settle: crate::core::plan::MAX_EXACT,
            hold_tag: rand::random::<u128>(),
            series: SeriesDraft::default(),
            record: false,
        };
        let placed = match &old {
            Some(g) => match self.inner.renew(g.store, g.lease.spent, &plan, now).await {
                Ok((outcome, r)) => {
                    self.note_return(outcome, &g.lease, now);
                    Ok(r)
                }
                Err(e) => Err(e),
            },
            None => self.inner.reserve(&plan, ReserveMode::Hold, now).await,
        };
        let book = self.book(customer);
        let mut b = book.lock();
        if let (Err(_), Some(g)) = (&placed, old) {
            // Unknown whether the store took it back: tried again (settling a closed hold
            // changes nothing) at the next sweep.
            b.unreturned.push((g.store, g.lease));
        }
        let Some(s) = b.slots.get_mut(&slot) else {
            return;
        };
        s.acquiring = false;
        let Ok(r) = placed else {
            return;
        };
        let (Some(hold), Some(reading)) = (r.hold, r.readings.first()) else {
            return;
        };
        for g in &mut s.gens {
            g.retired = true;
        }
        let mine: u64 = s.gens.iter().map(|g| g.lease.slice).sum::<u64>() + size;
        s.others_used = reading.current_usage.saturating_sub(mine);
        s.store_remaining = reading.remaining;
        let mut lease = Lease::new(size, now.millis(), &self.terms);
        lease.usable_until = lease
            .usable_until
            .min(s.reset_at.millis() - self.terms.skew_ms);
        s.gens.push(Gen {
            lease,
            store: HoldKey {
                customer,
                seq: hold.seq,
                tag: hold.tag,
            },
            retired: false,
        });
        self.counters.placed.fetch_add(1, Ordering::Relaxed);
    }

    /// Notes demand on a leasable counter and returns its slot, created or refreshed (a
    /// changed limit retires the slot's slices).
    pub(super) fn want_slice<'b>(
        &self,
        b: &'b mut Book,
        c: &PlannedCounter,
        (slot, limit, reset_at): (SlotKey, u64, Timestamp),
        now: i64,
        hold_ttl_ms: i64,
    ) -> &'b mut Slot {
        let ttl = self.terms.ttl_ms;
        let s = b.slots.entry(slot).or_insert_with(|| Slot {
            limit,
            reset_at,
            template: c.clone(),
            gens: Vec::new(),
            acquiring: false,
            recent: 0,
            previous: 0,
            window_start: now,
            last_asked: now,
            others_used: 0,
            store_remaining: limit,
            hold_ttl_ms,
        });
        s.hold_ttl_ms = hold_ttl_ms;
        if s.limit != limit {
            // The limit changed: slices sized for the old one are given back.
            for g in &mut s.gens {
                g.retired = true;
            }
            s.limit = limit;
        }
        s.template = c.clone();
        s.note_demand(c.amount, now, ttl);
        s
    }
}

impl LeasedStore {
    /// Settles or releases a local hold, and the store part of a partly covered one.
    pub(super) async fn close_local(
        &self,
        hold: HoldKey,
        actual: Option<&Usage>,
        end: Option<StreamEnd>,
        now: Timestamp,
    ) -> Result<CloseOutcome, StoreError> {
        let shared = &self.shared;
        let (store, flush, over) = {
            let book = shared.book(hold.customer);
            let mut b = book.lock();
            let Some(h) = b.holds.get(&hold.tag).filter(|h| h.seq == hold.seq) else {
                return Ok(CloseOutcome::AlreadyClosed);
            };
            if h.expires_at <= now {
                // Past its TTL: expired at its held amount whether or not a sweep ran yet,
                // as the store's own holds are.
                if let Some(h) = b.holds.remove(&hold.tag) {
                    b.expire_hold(&h, h.expires_at, &shared.counters.dropped);
                }
                return Ok(CloseOutcome::AlreadyClosed);
            }
            if let Some(u) = actual
                && u.largest_figure() > h.max_settle
            {
                return Err(StoreError::SettleTooLarge {
                    hold: hold.to_string(),
                    actual: u.largest_figure(),
                    max: h.max_settle,
                });
            }
            let Some(h) = b.holds.remove(&hold.tag) else {
                return Ok(CloseOutcome::AlreadyClosed);
            };
            let over = b.close_parts(&h.parts, actual);
            if h.store.is_none() && h.record {
                let (kind, measures) = match actual {
                    Some(u) => (RecordKind::Settled, Measures::of_call(u.units, u.tokens, 0)),
                    None => (RecordKind::Released, Measures::of_call(0, None, 0)),
                };
                let mut series = h.series;
                if let (Some(end), Some(_)) = (end, actual) {
                    // Never folded, as a chain level is not: its values are the customer's
                    // limit ids.
                    let (name, value) = end.attribute();
                    series.chain.push((Name::from(name), value));
                }
                b.push_record(
                    LocalRecord {
                        kind,
                        at: now,
                        series,
                        measures,
                        seq: h.seq,
                        tag: hold.tag,
                    },
                    &shared.counters.dropped,
                );
            }
            let flush = b.records.len() >= FLUSH_AT;
            (h.store, flush, over)
        };
        if let Err(e) = shared.charge_over(hold, &over, now).await {
            // The usage happened and the local hold is closed: what it spent past its slice
            // waits for the store rather than being lost (the settlement itself stands).
            tracing::warn!(%hold, error = %e, "usage past a slice kept until the store answers");
            shared.book(hold.customer).lock().keep_over(hold, over);
        }
        if flush {
            Arc::clone(shared).flush_records(hold.customer, now);
        }
        if let Some(store) = store
            && let Err(e) = shared
                .close_store_part(store, actual.copied(), end, now)
                .await
        {
            // The local part is closed and the settlement stands: the store part is closed
            // at a later sweep, at this usage and as of now.
            tracing::warn!(%hold, error = %e, "store part of a hold closed once the store answers");
            shared
                .book(hold.customer)
                .lock()
                .unclosed
                .push((store, actual.copied(), end, now));
        }
        Ok(CloseOutcome::Closed)
    }

    /// Posts the close of a local hold another replica granted for that replica, which
    /// applies it at its next sweep; `None` when the hold is this replica's own.
    pub(super) async fn relay_close(
        &self,
        hold: HoldKey,
        actual: Option<Usage>,
        end: Option<StreamEnd>,
        now: Timestamp,
    ) -> Option<Result<CloseOutcome, StoreError>> {
        let shared = &self.shared;
        let replica = replica_of(hold.seq);
        if replica == shared.replica {
            return None;
        }
        let close = PostedClose {
            seq: hold.seq,
            tag: hold.tag,
            actual,
            at: now.millis(),
            end,
        };
        // A local hold ends before its slice's TTL does, so past that nothing can apply it.
        let posted = shared
            .inner
            .hold_relay()
            .post(hold.customer, replica, close, shared.terms.ttl_ms)
            .await;
        Some(posted.map(|added| {
            if added {
                CloseOutcome::Closed
            } else {
                CloseOutcome::AlreadyClosed
            }
        }))
    }

    /// Applies the closes other replicas posted for this one (at the time each arrived), then
    /// forgets them. A customer whose closes could not be read or forgotten is tried again at
    /// the next sweep; applying one twice changes nothing (the hold is gone after the first).
    pub(super) async fn apply_relayed(&self) {
        let shared = &self.shared;
        let relay = shared.inner.hold_relay();
        let mut customers = std::mem::take(&mut *shared.relay_retry.lock());
        match relay.customers(shared.replica).await {
            Ok(more) => customers.extend(more),
            Err(e) => {
                // The index may have been taken by a call that ran unanswered: every customer
                // with a local hold open (the only ones a close can be posted for) is read.
                tracing::debug!(error = %e, "the relay's index not read: reading every customer with open holds");
                customers.extend(
                    shared
                        .all_books()
                        .into_iter()
                        .filter(|(_, b)| !b.lock().holds.is_empty())
                        .map(|(c, _)| c),
                );
            }
        }
        customers.sort_unstable_by_key(|c| c.as_str().to_string());
        customers.dedup();
        for customer in customers {
            let applied = match relay.posted(customer, shared.replica).await {
                Ok(closes) => closes,
                Err(_) => {
                    shared.relay_retry.lock().push(customer);
                    continue;
                }
            };
            futures_util::stream::iter(&applied)
                .for_each_concurrent(STORE_CALLS_AT_ONCE, |c| async move {
                    let hold = HoldKey {
                        customer,
                        seq: c.seq,
                        tag: c.tag,
                    };
                    let at = Timestamp::from_millis(c.at);
                    if let Err(e) = self.close_local(hold, c.actual.as_ref(), c.end, at).await {
                        // A settlement over the hold's bound: refused as it would have been
                        // here.
                        tracing::warn!(%hold, error = %e, "a close posted by another replica was refused");
                    }
                })
                .await;
            if relay
                .forget(customer, shared.replica, &applied)
                .await
                .is_err()
            {
                shared.relay_retry.lock().push(customer);
            }
        }
    }

    /// The sweep's part: expires local holds at their held amount, returns slices that are
    /// retired, idle or near their end, places the next slice of busy counters, and writes
    /// pending records. Returns how many local holds expired. Failures are left for the next
    /// sweep (a slice the store could not take back stays held there until its TTL).
    pub(super) async fn maintain(&self, now: Timestamp) -> usize {
        let shared = &self.shared;
        let t = shared.terms;
        let mut expired = 0;
        // Before expiring anything: a close that arrived elsewhere before its hold's TTL
        // closes the hold, however late this sweep reads it.
        self.apply_relayed().await;
        for (customer, book) in shared.all_books() {
            let mut renew = Vec::new();
            let settles = {
                let mut b = book.lock();
                let mut settles = std::mem::take(&mut b.unreturned);
                let due: Vec<u128> = b
                    .holds
                    .iter()
                    .filter(|(_, h)| h.expires_at <= now)
                    .map(|(tag, _)| *tag)
                    .collect();
                for tag in due {
                    if let Some(h) = b.holds.remove(&tag) {
                        b.expire_hold(&h, h.expires_at, &shared.counters.dropped);
                        expired += 1;
                    }
                }
                let ms = now.millis();
                for (key, s) in &mut b.slots {
                    let idle = ms - s.last_asked > IDLE_MS;
                    for g in &mut s.gens {
                        // Past the last moment a hold can start in it (one that would end
                        // before its return margin): it takes nothing more, so it goes back
                        // as soon as its holds close rather than at its end.
                        if idle || ms + RETURN_MARGIN_MS + s.hold_ttl_ms >= g.lease.usable_until {
                            g.retired = true;
                        }
                    }
                    // Busy, and its current slice low or past half of the window in which it
                    // takes new holds (holds that end before its return margin): the next one.
                    let current = s.gens.iter().rev().find(|g| !g.retired);
                    let window = t.ttl_ms - t.skew_ms - RETURN_MARGIN_MS - s.hold_ttl_ms;
                    let due_next = match current {
                        Some(g) => {
                            g.lease.usable_until - RETURN_MARGIN_MS - s.hold_ttl_ms - ms
                                < window / 2
                                || g.lease.room() < s.rate_per_ttl(ms, t.ttl_ms) / 4
                        }
                        None => true,
                    };
                    if !idle && due_next && !s.acquiring && s.recent > 0 {
                        s.acquiring = true;
                        let returning: u64 = current.map_or(0, |g| g.lease.room());
                        renew.push((*key, s.store_remaining.saturating_add(returning)));
                    }
                    let (done, keep): (Vec<Gen>, Vec<Gen>) = s
                        .gens
                        .drain(..)
                        .partition(|g| g.retired && g.lease.held == 0);
                    s.gens = keep;
                    // What they spent is the store's committed usage from now on.
                    s.others_used += done.iter().map(|g| g.lease.spent).sum::<u64>();
                    settles.extend(done.into_iter().map(|g| (g.store, g.lease)));
                }
                // A slot whose placement is in flight stays, or the slice would be placed for
                // nobody.
                b.slots.retain(|_, s| {
                    s.acquiring || !s.gens.is_empty() || ms - s.last_asked <= t.ttl_ms
                });
                settles
            };
            // Spent-out and idle slices go back first, so a placement's reading counts what
            // they spent rather than their whole size. (A busy counter's current slice goes
            // back in its successor's placement when nothing is open in it, else at a later
            // sweep: never a moment without one.) A failure is kept for the next sweep.
            let _ = shared.charge_kept(&book, now).await;
            let _ = shared.close_kept(&book).await;
            let _ = shared.settle_all(&book, settles, now).await;
            futures_util::stream::iter(renew)
                .for_each_concurrent(STORE_CALLS_AT_ONCE, |(slot, remaining)| {
                    Arc::clone(shared).acquire(customer, slot, remaining)
                })
                .await;
            let _ = shared.write_records(customer, now).await;
        }
        expired
    }
}
