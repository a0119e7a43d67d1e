//! Rolling-window arithmetic for `rate` limits: a ring of sub-buckets that never lets more than
//! the limit through in any window, at any alignment.

use super::Timestamp;

/// Buckets in the ring. The window spans `RING - 1` buckets; the extra one makes the count
/// conservative: every unit spent in `(now - window, now]` is always counted.
///
/// Trade-off: a unit stays counted for between one window and `RING / (RING - 1)` windows
/// (here at most 1/7 longer). In exchange a counter is 8 small integers instead of a log of
/// timestamps, and there is no burst at any window edge, unlike a fixed window or GCRA's
/// burst allowance.
pub const RING: usize = 8;

/// A rolling window of fixed length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollingWindow {
    window_millis: i64,
    bucket_millis: i64,
}

impl RollingWindow {
    /// A window of `window_millis`; `None` if shorter than one millisecond per bucket.
    pub fn new(window_millis: i64) -> Option<Self> {
        let spans = (RING - 1) as i64;
        if window_millis < spans {
            return None;
        }
        // Round the bucket up so that `spans` buckets always cover the whole window.
        let bucket_millis = (window_millis + spans - 1) / spans;
        Some(Self {
            window_millis,
            bucket_millis,
        })
    }

    pub fn window_millis(&self) -> i64 {
        self.window_millis
    }

    pub fn bucket_millis(&self) -> i64 {
        self.bucket_millis
    }

    pub fn bucket_at(&self, now: Timestamp) -> i64 {
        now.millis().div_euclid(self.bucket_millis)
    }

    /// When the given bucket stops being counted.
    fn bucket_expiry(&self, bucket: i64) -> Timestamp {
        Timestamp::from_millis(
            bucket
                .saturating_add(RING as i64)
                .saturating_mul(self.bucket_millis),
        )
    }
}

/// The counts of one rate counter. `head` is the newest bucket written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct WindowState {
    head: i64,
    counts: [u32; RING],
}

fn slot(bucket: i64) -> usize {
    bucket.rem_euclid(RING as i64) as usize
}

impl WindowState {
    /// A state from its parts, as a store that keeps them elsewhere hands them back.
    pub fn from_parts(head: i64, counts: [u32; RING]) -> Self {
        Self { head, counts }
    }

    /// The newest bucket written and the ring's counts (slot `bucket mod RING`).
    pub fn parts(&self) -> (i64, [u32; RING]) {
        (self.head, self.counts)
    }

    pub fn new(window: &RollingWindow, now: Timestamp) -> Self {
        Self {
            head: window.bucket_at(now),
            counts: [0; RING],
        }
    }

    /// The bucket that `now` writes to. A clock that stepped backwards writes to the head.
    fn current_bucket(&self, window: &RollingWindow, now: Timestamp) -> i64 {
        window.bucket_at(now).max(self.head)
    }

    fn count_of(&self, bucket: i64) -> u32 {
        if bucket > self.head || bucket <= self.head - RING as i64 {
            return 0;
        }
        self.counts.get(slot(bucket)).copied().unwrap_or(0)
    }

    /// Buckets still counted at `now`, oldest first.
    fn live_buckets(&self, window: &RollingWindow, now: Timestamp) -> impl Iterator<Item = i64> {
        let current = self.current_bucket(window, now);
        (current - RING as i64 + 1)..=current
    }

    /// Units counted in the window ending at `now`.
    pub fn used(&self, window: &RollingWindow, now: Timestamp) -> u64 {
        self.live_buckets(window, now)
            .map(|b| u64::from(self.count_of(b)))
            .sum()
    }

    /// Moves the head to `now`'s bucket, clearing buckets that fell out of the ring.
    fn roll(&mut self, window: &RollingWindow, now: Timestamp) -> i64 {
        let current = self.current_bucket(window, now);
        let gap = current - self.head;
        if gap >= RING as i64 {
            self.counts = [0; RING];
        } else {
            for b in (self.head + 1)..=current {
                if let Some(c) = self.counts.get_mut(slot(b)) {
                    *c = 0;
                }
            }
        }
        self.head = current;
        current
    }

    /// Counts `amount` at `now`; returns the bucket written, which a hold keeps for settlement.
    pub fn add(&mut self, window: &RollingWindow, now: Timestamp, amount: u64) -> i64 {
        let bucket = self.roll(window, now);
        if let Some(c) = self.counts.get_mut(slot(bucket)) {
            *c = saturating_u32(u64::from(*c).saturating_add(amount));
        }
        bucket
    }

    /// Corrects the count of `bucket` by `delta`, if that bucket is still in the ring. A bucket
    /// that already left the window no longer limits anything, so its correction is moot.
    pub fn adjust(&mut self, bucket: i64, delta: i64) {
        if bucket > self.head || bucket <= self.head - RING as i64 {
            return;
        }
        if let Some(c) = self.counts.get_mut(slot(bucket)) {
            let next = i64::from(*c).saturating_add(delta).max(0);
            *c = saturating_u32(next.unsigned_abs());
        }
    }

    /// The earliest time at which `amount` more units fit under `limit`, or `None` if they
    /// never can (the request is larger than the limit).
    pub fn retry_at(
        &self,
        window: &RollingWindow,
        now: Timestamp,
        limit: u64,
        amount: u64,
    ) -> Option<Timestamp> {
        if amount > limit {
            return None;
        }
        let mut used = self.used(window, now);
        if used.saturating_add(amount) <= limit {
            return Some(now);
        }
        for b in self.live_buckets(window, now) {
            used = used.saturating_sub(u64::from(self.count_of(b)));
            if used.saturating_add(amount) <= limit {
                return Some(window.bucket_expiry(b));
            }
        }
        Some(window.bucket_expiry(self.current_bucket(window, now)))
    }

    /// When the oldest counted units stop counting: the next time `remaining` grows.
    pub fn next_release(&self, window: &RollingWindow, now: Timestamp) -> Option<Timestamp> {
        self.live_buckets(window, now)
            .find(|b| self.count_of(*b) > 0)
            .map(|b| window.bucket_expiry(b))
    }
}

fn saturating_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn t(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    #[test]
    fn no_burst_at_a_fixed_window_edge() {
        let w = RollingWindow::new(MIN).unwrap();
        let mut s = WindowState::new(&w, t(0));
        // Spend the whole limit just before a minute boundary...
        s.add(&w, t(MIN - 1), 100);
        // ...and just after it, a fixed window would reset. A rolling one does not.
        assert_eq!(s.used(&w, t(MIN + 1)), 100);
        assert_eq!(s.used(&w, t(2 * MIN - 2)), 100);
    }

    #[test]
    fn units_leave_after_one_window_and_at_most_one_bucket_more() {
        let w = RollingWindow::new(MIN).unwrap();
        let mut s = WindowState::new(&w, t(0));
        let spent_at = 10 * MIN + 123;
        s.add(&w, t(spent_at), 5);
        // Still counted a full window later, less a millisecond.
        assert_eq!(s.used(&w, t(spent_at + MIN - 1)), 5);
        // Gone after the window plus one bucket.
        assert_eq!(s.used(&w, t(spent_at + MIN + w.bucket_millis())), 0);
        let release = s.next_release(&w, t(spent_at)).unwrap();
        assert!(release.millis() >= spent_at + MIN);
        assert!(release.millis() <= spent_at + MIN + w.bucket_millis());
        assert_eq!(s.used(&w, release), 0);
        assert_eq!(s.used(&w, t(release.millis() - 1)), 5);
    }

    #[test]
    fn never_more_than_the_limit_in_any_window_alignment() {
        // Spend greedily every 250 ms for 5 minutes, then check every window of length 1 min.
        let w = RollingWindow::new(MIN).unwrap();
        let limit = 50;
        let mut s = WindowState::new(&w, t(0));
        let mut grants = Vec::new();
        let mut now = 0;
        while now < 5 * MIN {
            if s.used(&w, t(now)) < limit {
                s.add(&w, t(now), 1);
                grants.push(now);
            }
            now += 250;
        }
        for (i, start) in grants.iter().enumerate() {
            let in_window = grants[i..].iter().take_while(|g| **g < start + MIN).count();
            assert!(
                in_window as u64 <= limit,
                "{in_window} grants in the window from {start}"
            );
        }
        // And it is not starved either: over 5 minutes it grants at least 4 windows' worth.
        assert!(
            grants.len() as u64 >= 4 * limit,
            "only {} granted",
            grants.len()
        );
    }

    #[test]
    fn retry_at_is_when_enough_units_have_left() {
        let w = RollingWindow::new(MIN).unwrap();
        let mut s = WindowState::new(&w, t(0));
        s.add(&w, t(1_000), 60);
        s.add(&w, t(30_000), 40);
        let retry = s.retry_at(&w, t(31_000), 100, 50).unwrap();
        // The 60 units from t=1s must leave first; the 40 from t=30s are enough to stay.
        assert_eq!(s.used(&w, retry), 40);
        assert!(s.used(&w, t(retry.millis() - 1)) == 100);
        assert_eq!(s.retry_at(&w, t(31_000), 100, 101), None);
        assert_eq!(s.retry_at(&w, t(31_000), 200, 10), Some(t(31_000)));
    }

    #[test]
    fn adjust_corrects_a_live_bucket_and_ignores_a_dead_one() {
        let w = RollingWindow::new(MIN).unwrap();
        let mut s = WindowState::new(&w, t(0));
        let b = s.add(&w, t(0), 100);
        s.adjust(b, -70);
        assert_eq!(s.used(&w, t(1)), 30);
        s.adjust(b, -1_000);
        assert_eq!(s.used(&w, t(1)), 0);
        s.add(&w, t(3 * MIN), 5);
        s.adjust(b, 1_000);
        assert_eq!(s.used(&w, t(3 * MIN)), 5);
    }

    #[test]
    fn too_short_a_window_is_refused() {
        assert!(RollingWindow::new(6).is_none());
        assert!(RollingWindow::new(7).is_some());
    }
}
