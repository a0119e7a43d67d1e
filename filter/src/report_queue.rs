//! The report queue's policy: the usage of bounded passes waiting for the sidecar, sent one
//! `IngestUsage` batch at a time, and what becomes of a batch after the sidecar answers (each
//! record counted as reported, or put back first, in order). Plain Rust; `host` runs it.
//!
//! Trade-off: one batch in flight, not one per tick. A sidecar that is still down answers every
//! batch with an error; sending more while one waits would only send the same records twice
//! (harmless, they carry idempotency keys, but every copy is a call an outage does not need).

use std::collections::{HashMap, VecDeque};

use tollgate_proto::v1 as pb;

use crate::bounded::{BATCH, MAX_PENDING};

/// Bounded passes' usage waiting to be reported, oldest first, and the batch in flight.
#[derive(Debug, Default)]
pub struct ReportQueue {
    waiting: VecDeque<pb::UsageRecord>,
    /// The batch sent and not yet answered, by the call's token.
    sent: HashMap<u32, Vec<pb::UsageRecord>>,
}

/// What a sidecar's answer to a report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    /// Records the sidecar took (newly or as duplicates of ones it had).
    pub reported: usize,
    /// Records put back, to be sent again.
    pub returned: usize,
}

impl ReportQueue {
    /// Keeps `record` for the sidecar; past `MAX_PENDING` waiting, the oldest is let go.
    /// Whether one was let go.
    pub fn push(&mut self, record: pb::UsageRecord) -> bool {
        let dropped = self.waiting.len() >= MAX_PENDING;
        if dropped {
            self.waiting.pop_front();
        }
        self.waiting.push_back(record);
        dropped
    }

    /// The next batch to send, oldest first: none while one is in flight or none waits.
    pub fn take_batch(&mut self) -> Option<Vec<pb::UsageRecord>> {
        if !self.sent.is_empty() || self.waiting.is_empty() {
            return None;
        }
        let n = self.waiting.len().min(BATCH);
        Some(self.waiting.drain(..n).collect())
    }

    /// `batch` went out as call `token`.
    pub fn sent(&mut self, token: u32, batch: Vec<pb::UsageRecord>) {
        self.sent.insert(token, batch);
    }

    /// `batch` could not be sent: it goes back first, in order.
    pub fn unsent(&mut self, batch: Vec<pb::UsageRecord>) {
        batch
            .into_iter()
            .rev()
            .for_each(|r| self.waiting.push_front(r));
    }

    /// How many records call `token` carries, when it is this queue's batch in flight.
    pub fn in_flight(&self, token: u32) -> Option<usize> {
        self.sent.get(&token).map(Vec::len)
    }

    /// The answer to call `token`: for each record of its batch whether the sidecar took it,
    /// or `None` when the call failed or its answer was unreadable (the whole batch goes
    /// back). `None` when `token` is no report of this queue's.
    pub fn answered(&mut self, token: u32, done: Option<Vec<bool>>) -> Option<Answered> {
        let batch = self.sent.remove(&token)?;
        let n = batch.len();
        let back: Vec<pb::UsageRecord> = match done {
            Some(done) if done.len() == n => batch
                .into_iter()
                .zip(done)
                .filter(|(_, ok)| !ok)
                .map(|(r, _)| r)
                .collect(),
            _ => batch,
        };
        let returned = back.len();
        self.unsent(back);
        Some(Answered {
            reported: n - returned,
            returned,
        })
    }

    /// Records waiting (not counting the batch in flight).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Nothing waits and nothing is in flight: the root context may stop ticking for it.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.sent.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn record(i: usize) -> pb::UsageRecord {
        pb::UsageRecord {
            idempotency_key: format!("bounded:{i}"),
            customer_id: "acme".into(),
            ..Default::default()
        }
    }

    fn keys(batch: &[pb::UsageRecord]) -> Vec<String> {
        batch.iter().map(|r| r.idempotency_key.clone()).collect()
    }

    #[test]
    fn batches_go_oldest_first_one_at_a_time() {
        let mut q = ReportQueue::default();
        assert!(q.take_batch().is_none());
        for i in 0..BATCH + 3 {
            assert!(!q.push(record(i)));
        }
        let first = q.take_batch().unwrap();
        assert_eq!(first.len(), BATCH);
        assert_eq!(first[0].idempotency_key, "bounded:0");
        q.sent(7, first);
        assert!(q.take_batch().is_none(), "one batch in flight at a time");
        let a = q.answered(7, Some(vec![true; BATCH])).unwrap();
        assert_eq!(
            a,
            Answered {
                reported: BATCH,
                returned: 0
            }
        );
        let rest = q.take_batch().unwrap();
        assert_eq!(
            keys(&rest),
            (BATCH..BATCH + 3)
                .map(|i| format!("bounded:{i}"))
                .collect::<Vec<_>>()
        );
        q.sent(8, rest);
        assert!(!q.is_idle());
        q.answered(8, Some(vec![true; 3])).unwrap();
        assert!(q.is_idle());
    }

    #[test]
    fn refused_and_failed_records_go_back_first_in_order() {
        let mut q = ReportQueue::default();
        for i in 0..4 {
            q.push(record(i));
        }
        let batch = q.take_batch().unwrap();
        q.sent(1, batch);
        q.push(record(4));
        // The sidecar took 0 and 2; 1 and 3 come back ahead of the newer 4.
        let a = q.answered(1, Some(vec![true, false, true, false])).unwrap();
        assert_eq!(a.reported, 2);
        assert_eq!(a.returned, 2);
        let again = q.take_batch().unwrap();
        assert_eq!(keys(&again), ["bounded:1", "bounded:3", "bounded:4"]);
        // A failed call, or an answer of the wrong length, puts the whole batch back.
        q.sent(2, again);
        assert_eq!(q.answered(2, None).unwrap().returned, 3);
        let again = q.take_batch().unwrap();
        q.sent(3, again);
        assert_eq!(q.answered(3, Some(vec![true])).unwrap().returned, 3);
        // A batch that could not be sent goes back too.
        let again = q.take_batch().unwrap();
        q.unsent(again);
        assert_eq!(
            keys(&q.take_batch().unwrap()),
            ["bounded:1", "bounded:3", "bounded:4"]
        );
    }

    #[test]
    fn an_unknown_token_is_not_a_report() {
        let mut q = ReportQueue::default();
        q.push(record(0));
        assert!(q.in_flight(99).is_none());
        assert!(q.answered(99, Some(vec![true])).is_none());
        assert_eq!(q.waiting(), 1);
        let batch = q.take_batch().unwrap();
        q.sent(5, batch);
        assert_eq!(q.in_flight(5), Some(1));
        q.answered(5, None).unwrap();
        assert_eq!(q.waiting(), 1);
    }

    #[test]
    fn past_the_bound_the_oldest_are_let_go() {
        let mut q = ReportQueue::default();
        for i in 0..MAX_PENDING {
            assert!(!q.push(record(i)));
        }
        assert!(q.push(record(MAX_PENDING)));
        assert_eq!(q.waiting(), MAX_PENDING);
        assert_eq!(q.take_batch().unwrap()[0].idempotency_key, "bounded:1");
    }
}
