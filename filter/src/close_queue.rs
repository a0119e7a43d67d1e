//! The close queue's policy: which settles and releases go to the sidecar on a tick, in
//! batches of how many, and what becomes of each after the sidecar answers (done, refused for
//! good, or retried with backoff until the attempts run out). Plain Rust; `host` runs it.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use tollgate_proto::v1 as pb;

use crate::settle::CloseResult;

/// Attempts per close before it is given up (the hold then stays open until its TTL).
pub const CLOSE_ATTEMPTS: u32 = 4;
/// Closes wait up to this long and go to the sidecar as one `CloseHolds` call. Trade-off: a
/// settle lands a few ms after the response, and in exchange Envoy's worker makes one call per
/// tick instead of one per request (one per request cost the next requests' latency).
pub const TICK: Duration = Duration::from_millis(5);
/// The most closes in one call (the sidecar takes up to 1,000).
pub const MAX_BATCH: usize = 500;
/// The first retry waits this long; each later one twice as long as the one before.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// A hold to close. Closes are sent from the root context, not from the request's context:
/// Envoy cancels a context's calls when its stream ends, and the response's end is exactly
/// when the usage is known.
#[derive(Debug, Clone, PartialEq)]
pub struct CloseJob {
    pub hold: pb::HoldClose,
    /// Attempts made so far.
    pub attempt: u32,
    /// Not sent before this time (a retry's backoff).
    pub not_before: SystemTime,
}

impl CloseJob {
    /// A first attempt, due at once.
    pub fn new(hold: pb::HoldClose) -> Self {
        Self {
            hold,
            attempt: 0,
            not_before: SystemTime::UNIX_EPOCH,
        }
    }

    /// `settle` or `release`, for logs.
    pub fn what(&self) -> &'static str {
        if self.hold.actual_usage.is_some() {
            "settle"
        } else {
            "release"
        }
    }
}

/// What became of one close after the sidecar answered, or failed to.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    Settled,
    Released,
    /// Refused for good (unknown hold, another customer's): counted, not retried.
    Rejected {
        job: CloseJob,
        message: String,
    },
    /// Queued again, to be sent after its backoff.
    Retried,
    /// Failed on its last attempt: the hold stays open until its TTL commits it.
    GaveUp {
        job: CloseJob,
        why: String,
    },
}

/// The closes waiting to be sent.
#[derive(Debug, Default)]
pub struct CloseQueue {
    jobs: VecDeque<CloseJob>,
}

impl CloseQueue {
    pub fn push(&mut self, job: CloseJob) {
        self.jobs.push_back(job);
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Takes every close due at `now`, in queue order, in batches of at most [`MAX_BATCH`];
    /// those still backing off stay queued.
    pub fn take_due(&mut self, now: SystemTime) -> Vec<Vec<CloseJob>> {
        let (due, later): (VecDeque<_>, VecDeque<_>) =
            self.jobs.drain(..).partition(|j| j.not_before <= now);
        self.jobs = later;
        let mut batches = Vec::new();
        let mut due = due.into_iter().peekable();
        while due.peek().is_some() {
            batches.push(due.by_ref().take(MAX_BATCH).collect());
        }
        batches
    }

    /// One more failed attempt of `job` at `now`, because of `why`: queued again after a
    /// doubling backoff, or given up after [`CLOSE_ATTEMPTS`].
    pub fn retry(&mut self, mut job: CloseJob, why: &str, now: SystemTime) -> Fate {
        job.attempt += 1;
        if job.attempt >= CLOSE_ATTEMPTS {
            return Fate::GaveUp {
                job,
                why: why.to_string(),
            };
        }
        job.not_before = now + FIRST_BACKOFF * (1 << (job.attempt - 1));
        self.push(job);
        Fate::Retried
    }

    /// Applies the sidecar's answer to a batch: `Ok` with one result per close, in order, or
    /// `Err` when the whole call failed (or its answer was unreadable), in which case every
    /// close is retried: closes are idempotent on the sidecar.
    pub fn answered(
        &mut self,
        batch: Vec<CloseJob>,
        answer: Result<Vec<(CloseResult, String)>, String>,
        now: SystemTime,
    ) -> Vec<Fate> {
        match answer {
            Err(why) => batch
                .into_iter()
                .map(|job| self.retry(job, &why, now))
                .collect(),
            Ok(results) => batch
                .into_iter()
                .zip(results)
                .map(|(job, (result, message))| match result {
                    CloseResult::Done if job.hold.actual_usage.is_some() => Fate::Settled,
                    CloseResult::Done => Fate::Released,
                    CloseResult::Rejected => Fate::Rejected { job, message },
                    CloseResult::Retry => self.retry(job, &message, now),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settle(id: &str) -> CloseJob {
        CloseJob::new(pb::HoldClose {
            hold_id: id.into(),
            actual_usage: Some(5),
            ..Default::default()
        })
    }

    fn release(id: &str) -> CloseJob {
        CloseJob::new(pb::HoldClose {
            hold_id: id.into(),
            ..Default::default()
        })
    }

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn ids(batch: &[CloseJob]) -> Vec<&str> {
        batch.iter().map(|j| j.hold.hold_id.as_str()).collect()
    }

    #[test]
    fn due_closes_go_in_batches_of_at_most_the_maximum_in_order() {
        let mut q = CloseQueue::default();
        for i in 0..(2 * MAX_BATCH + 3) {
            q.push(settle(&format!("h{i}")));
        }
        let batches = q.take_due(at(1_000));
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            [MAX_BATCH, MAX_BATCH, 3]
        );
        assert_eq!(batches[0][0].hold.hold_id, "h0");
        assert_eq!(
            batches[2][2].hold.hold_id,
            format!("h{}", 2 * MAX_BATCH + 2)
        );
        assert!(q.is_empty());
        assert!(q.take_due(at(2_000)).is_empty());
    }

    #[test]
    fn a_failed_call_retries_every_close_with_doubling_backoff_then_gives_up() {
        let mut q = CloseQueue::default();
        q.push(settle("a"));
        q.push(release("b"));
        let mut now = at(10_000);
        let mut waits = Vec::new();
        for attempt in 1..CLOSE_ATTEMPTS {
            let batch = q.take_due(now).pop().unwrap_or_default();
            assert_eq!(ids(&batch), ["a", "b"], "attempt {attempt}");
            let fates = q.answered(batch, Err("gRPC status 14".into()), now);
            assert_eq!(fates, [Fate::Retried, Fate::Retried]);
            let next = q.jobs[0].not_before;
            waits.push(next.duration_since(now).unwrap_or_default());
            // Not due a millisecond early.
            assert!(
                q.take_due(next - Duration::from_millis(1)).is_empty(),
                "attempt {attempt}"
            );
            assert_eq!(q.len(), 2);
            now = next;
        }
        assert_eq!(
            waits,
            [
                Duration::from_millis(200),
                Duration::from_millis(400),
                Duration::from_millis(800)
            ]
        );
        let batch = q.take_due(now).pop().unwrap_or_default();
        let fates = q.answered(batch, Err("gRPC status 14".into()), now);
        assert!(
            matches!(&fates[..], [Fate::GaveUp { job, why }, Fate::GaveUp { .. }]
                if job.attempt == CLOSE_ATTEMPTS && why == "gRPC status 14"),
            "{fates:?}"
        );
        assert!(q.is_empty());
    }

    #[test]
    fn each_answer_decides_its_own_close() {
        let mut q = CloseQueue::default();
        let batch = vec![settle("s"), release("r"), settle("x"), settle("later")];
        let now = at(5_000);
        let fates = q.answered(
            batch,
            Ok(vec![
                (CloseResult::Done, String::new()),
                (CloseResult::Done, String::new()),
                (CloseResult::Rejected, "unknown hold".into()),
                (CloseResult::Retry, "store unavailable".into()),
            ]),
            now,
        );
        assert_eq!(fates[0], Fate::Settled);
        assert_eq!(fates[1], Fate::Released);
        assert!(
            matches!(&fates[2], Fate::Rejected { job, message } if job.hold.hold_id == "x" && message == "unknown hold")
        );
        assert_eq!(fates[3], Fate::Retried);
        // Only the store failure is tried again, after its backoff.
        assert!(q.take_due(now).is_empty());
        let again = q.take_due(now + Duration::from_millis(200));
        assert_eq!(ids(&again[0]), ["later"]);
        assert_eq!(again[0][0].attempt, 1);
    }

    #[test]
    fn closes_still_backing_off_wait_while_new_ones_go() {
        let mut q = CloseQueue::default();
        let now = at(1_000);
        assert_eq!(q.retry(settle("old"), "timeout", now), Fate::Retried);
        q.push(release("new"));
        assert_eq!(ids(&q.take_due(now)[0]), ["new"]);
        assert_eq!(q.len(), 1);
        assert_eq!(ids(&q.take_due(at(1_200))[0]), ["old"]);
    }
}
