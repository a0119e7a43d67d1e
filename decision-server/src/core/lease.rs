//! Escrow leases, as arithmetic: a replica's slice of a chain's budget, already held in the
//! shared store (one hold on every counter of the chain), spent by decisions made in memory,
//! and the renewal that commits what was spent and returns the rest. No I/O: a store
//! integration places, renews and lets expire the store-side holds this describes.
//!
//! What leasing means per limit kind (and why only some are leased):
//! - **Calendar quota:** exact. A slice held in the store is budget no other replica can
//!   spend; local grants stay inside it; renewal commits the spent units to the same period. A
//!   lease never spans a period boundary (its validity ends at the reset).
//! - **Rolling-window rate:** not leased. A store-side hold counts in the window when it is
//!   placed, while the units it stands for are spent later, so the window would age them out
//!   at the wrong time: the answer would differ from the exact one.
//! - **Concurrency:** not leased. A slot is held for a call's whole life and released by it; a
//!   slice of slots would keep other replicas' calls out for the lease's TTL.
//! - **Credits:** not leased. Grants are spent in grant order (soonest expiry first) across
//!   pools; a slice would pin amounts to grants that later expire or are reordered.
//!
//! A decision whose every counter is a leasable one covered by a lease is made locally; any
//! other goes to the store exactly, as without leases.
//!
//! Invariant: what all replicas can grant is at most the cap, because every locally granted
//! unit lies inside a slice already held in the store.

/// How long before a slice's local end its last local hold must end: the slice goes back at
/// the first sweep after its holds close (the server sweeps every second), and must reach the
/// store before the store's TTL (`skew` later), even if that sweep runs late.
pub const RETURN_MARGIN_MS: i64 = 1_500;

/// How leases are sized and how long they live (`leases:` of a store's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTerms {
    /// The store-side hold's lifetime, in ms: a replica that dies leaves its slice for at most
    /// this long, then the store commits it whole (overcounting by the unused part, never
    /// losing usage).
    pub ttl_ms: i64,
    /// How much sooner than the store's TTL the replica stops using a lease, in ms: the clock
    /// skew the two may have.
    pub skew_ms: i64,
    /// The most of what remains on a counter one slice may take, in thousandths.
    pub max_share_permille: u32,
    /// Below this, a slice is not worth a store call: the replica decides exactly instead.
    pub min_slice: u64,
}

impl Default for LeaseTerms {
    fn default() -> Self {
        Self {
            ttl_ms: 10_000,
            skew_ms: 2_000,
            max_share_permille: 100,
            min_slice: 1,
        }
    }
}

/// The slice to ask for on a chain: enough for the recent rate over the lease's life, never
/// more than `max_share` of what remains on the tightest counter, and nothing (exact
/// decisions) when that share cannot hold even one request of `largest_request` units: so
/// near the cap slices shrink to nothing and the last units are granted one decision at a
/// time.
pub fn slice_size(
    terms: &LeaseTerms,
    remaining_tightest: u64,
    recent_units_per_ttl: u64,
    largest_request: u64,
) -> u64 {
    let share =
        u64::try_from(u128::from(remaining_tightest) * u128::from(terms.max_share_permille) / 1000)
            .unwrap_or(u64::MAX);
    // At least one request's worth of demand, so a quiet chain still gets a usable slice.
    let wanted = recent_units_per_ttl.max(largest_request);
    let slice = wanted.min(share);
    if slice < terms.min_slice.max(largest_request).max(1) {
        0
    } else {
        slice
    }
}

/// One lease as the replica keeps it: its slice, what local decisions hold and have spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub slice: u64,
    /// Units of local holds still open.
    pub held: u64,
    /// Units settled by local decisions.
    pub spent: u64,
    /// The replica uses it until then (ms): the store's expiry minus the skew margin.
    pub usable_until: i64,
}

/// A lease's renewal (or final return): commit `commit` units to the counters, give back
/// the rest of the slice; open local holds carry over into the next slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    pub commit: u64,
    pub returned: u64,
    pub carried: u64,
}

impl Lease {
    /// A lease on a slice placed at `placed_at` (ms) on these terms.
    pub fn new(slice: u64, placed_at: i64, terms: &LeaseTerms) -> Self {
        Self {
            slice,
            held: 0,
            spent: 0,
            usable_until: placed_at + terms.ttl_ms - terms.skew_ms,
        }
    }

    /// What the slice still has room for.
    pub fn room(&self) -> u64 {
        self.slice.saturating_sub(self.held + self.spent)
    }

    /// Holds `units` locally at `now`, if the lease is still usable and has room.
    pub fn hold(&mut self, units: u64, now: i64) -> bool {
        if now >= self.usable_until || units > self.room() {
            return false;
        }
        self.held += units;
        true
    }

    /// Settles a local hold of `held_units` at `actual` units. A settlement over the hold
    /// (allowed up to the feature's `maxSettleUsage`, as in the store) is spent from the slice
    /// as far as it goes; the returned excess must be charged to the store directly, exactly
    /// as an over-hold settlement is without leases.
    pub fn settle(&mut self, held_units: u64, actual: u64) -> u64 {
        self.held = self.held.saturating_sub(held_units);
        let fits = actual.min(self.slice.saturating_sub(self.held + self.spent));
        self.spent += fits;
        actual - fits
    }

    /// Releases a local hold of `units`: nothing was spent.
    pub fn release(&mut self, units: u64) {
        self.held = self.held.saturating_sub(units);
    }

    /// Renewal now: commit what was spent, keep what open holds need, return the rest.
    pub fn renewal(&self) -> Renewal {
        Renewal {
            commit: self.spent,
            carried: self.held,
            returned: self.slice.saturating_sub(self.spent + self.held),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn slices_follow_the_rate_and_shrink_to_nothing_near_the_cap() {
        let t = LeaseTerms::default();
        // 10 % of what remains at most; the rate asks for less here.
        assert_eq!(slice_size(&t, 1_000_000, 5_000, 100), 5_000);
        assert_eq!(slice_size(&t, 1_000_000, 500_000, 100), 100_000);
        // A quiet chain still gets one request's worth.
        assert_eq!(slice_size(&t, 1_000_000, 0, 100), 100);
        // Near the cap 10 % cannot hold one request: exact decisions.
        assert_eq!(slice_size(&t, 999, 5_000, 100), 0);
        assert_eq!(slice_size(&t, 0, 5_000, 1), 0);
    }

    #[test]
    fn a_lease_is_used_inside_its_slice_and_its_time() {
        let t = LeaseTerms::default();
        let mut l = Lease::new(100, 0, &t);
        assert!(l.hold(60, 0));
        assert!(!l.hold(41, 0));
        assert!(l.hold(40, 0));
        assert_eq!(l.settle(60, 50), 0);
        l.release(40);
        assert_eq!(l.room(), 50);
        assert!(!l.hold(1, t.ttl_ms - t.skew_ms), "past its usable time");
        assert_eq!(
            l.renewal(),
            Renewal {
                commit: 50,
                returned: 50,
                carried: 0
            }
        );
        // A settlement over the hold spends what the slice has and hands back the rest.
        let mut l = Lease::new(10, 0, &t);
        assert!(l.hold(8, 0));
        assert_eq!(l.settle(8, 15), 5);
        assert_eq!(l.renewal().commit, 10);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Hold(u64),
        Settle(usize, u64),
        Release(usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                (1u64..50).prop_map(Op::Hold),
                (0usize..8, 0u64..60).prop_map(|(i, a)| Op::Settle(i, a)),
                (0usize..8).prop_map(Op::Release),
            ],
            0..200,
        )
    }

    /// The shared store of the simulation: one quota counter with a cap, what is committed,
    /// and what slices and exact holds hold on it.
    #[derive(Debug)]
    struct Store {
        cap: u64,
        committed: u64,
        held: u64,
    }

    impl Store {
        fn remaining(&self) -> u64 {
            self.cap - self.committed - self.held
        }

        /// An atomic hold of `units`, as a decision script places it.
        fn hold(&mut self, units: u64) -> bool {
            let fits = units <= self.remaining();
            if fits {
                self.held += units;
            }
            fits
        }

        /// Closes a hold of `held` at `spent` units.
        fn close(&mut self, held: u64, spent: u64) {
            self.held -= held;
            self.committed += spent;
        }
    }

    /// A replica: its lease on the counter (if any), and its recent demand.
    #[derive(Debug, Default)]
    struct Replica {
        lease: Option<Lease>,
        recent: u64,
    }

    impl Replica {
        /// Commits the lease's spending and gives the rest back (no local holds are open
        /// between the simulation's decisions: each is settled at once).
        fn renew(&mut self, store: &mut Store) {
            if let Some(l) = self.lease.take() {
                let r = l.renewal();
                assert_eq!(r.carried, 0);
                store.close(l.slice, r.commit);
            }
        }

        /// One decision of `units`, settled at once at `actual`: from the lease if it has room,
        /// else after a renewal with a new slice, else exactly. Whether it was granted.
        fn decide(
            &mut self,
            store: &mut Store,
            terms: &LeaseTerms,
            units: u64,
            actual: u64,
            largest: u64,
            now: i64,
        ) -> bool {
            self.recent += units;
            if let Some(l) = self.lease.as_mut()
                && l.hold(units, now)
            {
                let over = l.settle(units, actual);
                store.committed += over;
                return true;
            }
            self.renew(store);
            let slice = slice_size(terms, store.remaining(), self.recent, largest);
            if slice > 0 && store.hold(slice) {
                let mut l = Lease::new(slice, now, terms);
                if l.hold(units, now) {
                    let over = l.settle(units, actual);
                    store.committed += over;
                    self.lease = Some(l);
                    return true;
                }
                self.lease = Some(l);
                self.renew(store);
            }
            // Exact, as without leases.
            if store.hold(units) {
                store.close(units, actual);
                true
            } else {
                false
            }
        }
    }

    proptest! {
        /// Replicas racing one cap through leases, run to the end of the budget: nothing is
        /// granted past the cap, the store ends holding nothing and counting exactly what was
        /// spent, and the budget is used up to less than one request (no slice strands it).
        #[test]
        fn replicas_racing_a_cap_through_leases_never_overspend_and_use_it_up(
            cap in 1u64..20_000,
            replicas in 1usize..4,
            requests in prop::collection::vec((0usize..4, 1u64..60, 0u64..60), 1..400),
        ) {
            let terms = LeaseTerms { max_share_permille: 250, ..LeaseTerms::default() };
            let largest = 60;
            let mut store = Store { cap, committed: 0, held: 0 };
            let mut rs: Vec<Replica> = (0..replicas).map(|_| Replica::default()).collect();
            let mut spent = 0u64;
            // The race: the generated requests (any replica, any order), then every replica
            // in turn asking until each has been refused twice in a row: the end of the budget
            // with every replica still active (an idle one's slice would come back by renewal
            // or expiry, which this does not model).
            let decide = |rs: &mut Vec<Replica>, store: &mut Store, r: usize, units: u64, actual: u64| {
                let actual = if actual == 0 { units } else { actual.min(units) };
                let granted = rs[r].decide(store, &terms, units, actual, largest, 0);
                (granted, actual)
            };
            for &(r, units, actual) in &requests {
                let (granted, actual) = decide(&mut rs, &mut store, r % replicas, units, actual);
                if granted {
                    spent += actual;
                }
                prop_assert!(store.committed + store.held <= cap, "over the cap");
            }
            let (mut i, mut refused_in_a_row) = (0usize, 0usize);
            while refused_in_a_row < replicas * 2 && i < 100_000 {
                let units = 1 + (i as u64 * 7) % 59;
                let (granted, actual) = decide(&mut rs, &mut store, i % replicas, units, 0);
                if granted {
                    spent += actual;
                    refused_in_a_row = 0;
                } else {
                    refused_in_a_row += 1;
                }
                prop_assert!(store.committed + store.held <= cap, "over the cap");
                i += 1;
            }
            for r in &mut rs {
                r.renew(&mut store);
            }
            prop_assert_eq!(store.held, 0, "a slice is still out");
            prop_assert_eq!(store.committed, spent, "the counter is not what was spent");
            prop_assert!(store.committed <= cap);
            if i < 100_000 {
                prop_assert!(cap - store.committed < largest, "budget stranded: {} of {}", store.committed, cap);
            }
        }

        /// Against the exact answer (a store that holds `slice` units for this replica):
        /// every local grant is one the exact store would make within the slice; the only
        /// difference is denials; and the renewal accounts for every unit once.
        #[test]
        fn local_decisions_never_grant_what_the_slice_does_not_hold(slice in 0u64..500, ops in ops()) {
            let t = LeaseTerms::default();
            let mut lease = Lease::new(slice, 0, &t);
            let mut open: Vec<u64> = Vec::new();
            let mut exact_spent = 0u64;
            for op in ops {
                match op {
                    Op::Hold(u) => {
                        let room = slice - exact_spent - open.iter().sum::<u64>();
                        let granted = lease.hold(u, 0);
                        prop_assert_eq!(granted, u <= room, "a local grant differs from the exact store's");
                        if granted { open.push(u); }
                    }
                    Op::Settle(i, actual) if i < open.len() => {
                        let held = open.remove(i);
                        let over = lease.settle(held, actual);
                        let room = slice - exact_spent - open.iter().sum::<u64>();
                        prop_assert_eq!(over, actual.saturating_sub(room));
                        exact_spent += actual - over;
                    }
                    Op::Release(i) if i < open.len() => {
                        lease.release(open.remove(i));
                    }
                    _ => {}
                }
                prop_assert!(lease.held + lease.spent <= slice);
            }
            let r = lease.renewal();
            prop_assert_eq!(r.commit, exact_spent);
            prop_assert_eq!(r.carried, open.iter().sum::<u64>());
            prop_assert_eq!(r.commit + r.carried + r.returned, slice);
        }
    }
}
