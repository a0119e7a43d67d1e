//! Credit balances: grants drawn down in order (priority, then soonest expiry, then promo
//! before paid), refunds, and debt from usage that outran every grant.

use super::Timestamp;
use super::model::GrantCategory;

/// One grant's balance inside a pool.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GrantBalance {
    pub id: String,
    pub priority: u32,
    pub expires_at: Option<Timestamp>,
    pub category: GrantCategory,
    pub amount: u64,
    pub remaining: u64,
}

impl GrantBalance {
    fn usable(&self, now: Timestamp) -> bool {
        self.remaining > 0 && self.expires_at.is_none_or(|e| now < e)
    }

    /// The spending order: lower priority number first, then soonest expiry (never-expiring
    /// last), then promotional before paid, then id for a stable tie-break.
    fn order_key(&self) -> (u32, i64, GrantCategory, &str) {
        (
            self.priority,
            self.expires_at.map_or(i64::MAX, Timestamp::millis),
            self.category,
            &self.id,
        )
    }
}

/// Units taken from one grant by one hold, kept so a release or a smaller settlement can give
/// them back to the grants they came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Draw {
    pub grant: u32,
    pub amount: u64,
}

/// The grants of one holder (entity, feature and, for isolated pools, resource).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CreditPool {
    /// Append-only, so that a hold's draws can name grants by position.
    grants: Vec<GrantBalance>,
    /// Positions in `grants`, in spending order.
    order: Vec<u32>,
    /// Usage settled beyond every grant. Paid off first by the next grant added.
    debt: u64,
}

impl CreditPool {
    /// A pool from its parts, as a store that keeps them elsewhere hands them back: the grants
    /// in the order they were added, their spending order as positions, and the debt.
    pub fn from_parts(grants: Vec<GrantBalance>, order: Vec<u32>, debt: u64) -> Self {
        Self {
            grants,
            order,
            debt,
        }
    }

    /// The grants, in spending order.
    pub fn grants(&self) -> impl Iterator<Item = &GrantBalance> {
        self.order
            .iter()
            .filter_map(|i| self.grants.get(*i as usize))
    }

    pub fn debt(&self) -> u64 {
        self.debt
    }

    /// Adds a grant. A grant whose id is already present is left as it is (idempotent), and
    /// `false` is returned. Outstanding debt is paid from the new grant first.
    pub fn add_grant(&mut self, mut grant: GrantBalance) -> bool {
        if self.grants.iter().any(|g| g.id == grant.id) {
            return false;
        }
        let paid = self.debt.min(grant.remaining);
        grant.remaining -= paid;
        self.debt -= paid;
        let position = u32::try_from(self.grants.len()).unwrap_or(u32::MAX);
        let grants = &self.grants;
        let at = self.order.partition_point(|i| {
            grants
                .get(*i as usize)
                .is_some_and(|g| g.order_key() <= grant.order_key())
        });
        self.order.insert(at, position);
        self.grants.push(grant);
        true
    }

    /// Units available at `now`.
    pub fn available(&self, now: Timestamp) -> u64 {
        let total: u64 = self
            .grants
            .iter()
            .filter(|g| g.usable(now))
            .map(|g| g.remaining)
            .sum();
        total.saturating_sub(self.debt)
    }

    /// Units granted in unexpired grants at `now` (the pool's "limit").
    pub fn granted(&self, now: Timestamp) -> u64 {
        self.grants
            .iter()
            .filter(|g| g.expires_at.is_none_or(|e| now < e))
            .map(|g| g.amount)
            .sum()
    }

    /// The soonest expiry among usable grants: when `available` next drops on its own.
    pub fn next_expiry(&self, now: Timestamp) -> Option<Timestamp> {
        self.grants
            .iter()
            .filter(|g| g.usable(now))
            .filter_map(|g| g.expires_at)
            .min()
    }

    /// Takes `amount` in spending order. Returns the draws, or `None` (taking nothing) if the
    /// usable balance is short.
    pub fn draw(&mut self, amount: u64, now: Timestamp) -> Option<Vec<Draw>> {
        if self.available(now) < amount {
            return None;
        }
        Some(self.draw_up_to(amount, now).0)
    }

    /// Takes as much of `amount` as the grants hold, in order; the rest becomes debt. Used
    /// for usage that already happened and must be recorded whatever the balance.
    pub fn draw_forced(&mut self, amount: u64, now: Timestamp) -> Vec<Draw> {
        let (draws, short) = self.draw_up_to(amount, now);
        self.debt = self.debt.saturating_add(short);
        draws
    }

    fn draw_up_to(&mut self, amount: u64, now: Timestamp) -> (Vec<Draw>, u64) {
        let mut left = amount;
        let mut draws = Vec::new();
        for i in &self.order {
            if left == 0 {
                break;
            }
            let Some(g) = self.grants.get_mut(*i as usize) else {
                continue;
            };
            if !g.usable(now) {
                continue;
            }
            let take = g.remaining.min(left);
            g.remaining -= take;
            left -= take;
            draws.push(Draw {
                grant: *i,
                amount: take,
            });
        }
        (draws, left)
    }

    /// Gives back `amount` of `draws`, newest draw first (those would have been spent last).
    /// What the draws cannot cover was debt (a hold that outran the grants) and is forgiven.
    /// Returns the draws that remain after the refund.
    pub fn refund(&mut self, draws: &[Draw], amount: u64) -> Vec<Draw> {
        let drawn: u64 = draws.iter().map(|d| d.amount).sum();
        self.debt = self.debt.saturating_sub(amount.saturating_sub(drawn));
        let mut left = amount;
        let mut kept: Vec<Draw> = draws.to_vec();
        for d in kept.iter_mut().rev() {
            if left == 0 {
                break;
            }
            let give = d.amount.min(left);
            if let Some(g) = self.grants.get_mut(d.grant as usize) {
                g.remaining = g.remaining.saturating_add(give).min(g.amount);
            }
            d.amount -= give;
            left -= give;
        }
        kept.retain(|d| d.amount > 0);
        kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(
        id: &str,
        priority: u32,
        expires: Option<i64>,
        cat: GrantCategory,
        amount: u64,
    ) -> GrantBalance {
        GrantBalance {
            id: id.into(),
            priority,
            expires_at: expires.map(Timestamp::from_millis),
            category: cat,
            amount,
            remaining: amount,
        }
    }

    fn remaining(p: &CreditPool) -> Vec<(&str, u64)> {
        p.grants().map(|g| (g.id.as_str(), g.remaining)).collect()
    }

    const NOW: Timestamp = Timestamp::from_millis(1_000);

    #[test]
    fn spends_by_priority_then_expiry_then_promo_before_paid() {
        let mut p = CreditPool::default();
        p.add_grant(grant("paid-late", 1, Some(9_000), GrantCategory::Paid, 10));
        p.add_grant(grant(
            "promo-late",
            1,
            Some(9_000),
            GrantCategory::Promo,
            10,
        ));
        p.add_grant(grant("paid-soon", 1, Some(5_000), GrantCategory::Paid, 10));
        p.add_grant(grant("never", 1, None, GrantCategory::Promo, 10));
        p.add_grant(grant("prio0", 0, None, GrantCategory::Paid, 10));
        let order: Vec<&str> = p.grants().map(|g| g.id.as_str()).collect();
        assert_eq!(
            order,
            ["prio0", "paid-soon", "promo-late", "paid-late", "never"]
        );
        p.draw(25, NOW).unwrap();
        assert_eq!(
            remaining(&p),
            [
                ("prio0", 0),
                ("paid-soon", 0),
                ("promo-late", 5),
                ("paid-late", 10),
                ("never", 10)
            ]
        );
    }

    #[test]
    fn a_spend_spans_grants_and_a_refund_returns_newest_first() {
        let mut p = CreditPool::default();
        p.add_grant(grant("a", 0, None, GrantCategory::Paid, 30));
        p.add_grant(grant("b", 1, None, GrantCategory::Paid, 30));
        let draws = p.draw(50, NOW).unwrap();
        assert_eq!(
            draws,
            [
                Draw {
                    grant: 0,
                    amount: 30
                },
                Draw {
                    grant: 1,
                    amount: 20
                }
            ]
        );
        // A grant added while the hold is open sorts first but must not move the draws.
        p.add_grant(grant("c", 0, Some(2_000), GrantCategory::Promo, 1));
        p.draw(1, NOW).unwrap();
        let kept = p.refund(&draws, 25);
        assert_eq!(remaining(&p), [("c", 0), ("a", 5), ("b", 30)]);
        assert_eq!(
            kept,
            [Draw {
                grant: 0,
                amount: 25
            }]
        );
        assert_eq!(p.available(NOW), 35);
    }

    #[test]
    fn expired_grants_are_not_spent_and_a_short_balance_takes_nothing() {
        let mut p = CreditPool::default();
        p.add_grant(grant("old", 0, Some(500), GrantCategory::Promo, 100));
        p.add_grant(grant("cur", 1, None, GrantCategory::Paid, 10));
        assert_eq!(p.available(NOW), 10);
        assert_eq!(p.draw(11, NOW), None);
        assert_eq!(remaining(&p), [("old", 100), ("cur", 10)]);
        assert_eq!(p.granted(NOW), 10);
    }

    #[test]
    fn forced_overage_becomes_debt_paid_by_the_next_grant() {
        let mut p = CreditPool::default();
        p.add_grant(grant("a", 0, None, GrantCategory::Paid, 10));
        p.draw_forced(15, NOW);
        assert_eq!(p.debt(), 5);
        assert_eq!(p.available(NOW), 0);
        assert!(p.add_grant(grant("b", 0, None, GrantCategory::Paid, 20)));
        assert_eq!(p.debt(), 0);
        assert_eq!(p.available(NOW), 15);
        assert!(
            !p.add_grant(grant("b", 0, None, GrantCategory::Paid, 20)),
            "idempotent"
        );
    }
}
