//! The usage stream's log in process: every usage record a store makes (and every alert),
//! numbered in the order they happened, kept for a retention, read by cursor. In-process
//! stores keep one; the durable store also writes it to its file.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::core::rollup::UsageRecord;
use crate::core::{Name, Timestamp};

/// How long, and how many, stream events are kept for clients that reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamRetention {
    pub millis: i64,
    /// Per customer: one tenant's events only ever push out its own older ones.
    pub max_events: usize,
}

impl Default for StreamRetention {
    /// An hour, and at most 50,000 events per customer.
    fn default() -> Self {
        Self {
            millis: 3_600_000,
            max_events: 50_000,
        }
    }
}

/// What an event carries.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum EventBody {
    Record(UsageRecord),
    /// An alert that fired: its encoded body, as the channels deliver it.
    Alert(String),
}

/// One event of the usage stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEvent {
    /// Unique and increasing in the order events happened; a client resumes after it.
    pub id: String,
    pub customer: Name,
    pub at: Timestamp,
    pub body: Arc<EventBody>,
}

/// Events after a cursor.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventPage {
    pub events: Vec<StreamEvent>,
    /// The cursor is older than what is kept: events between it and the first one returned
    /// may be missing.
    pub gap: bool,
}

#[derive(Debug)]
struct Entry {
    id: u64,
    customer: Name,
    at: Timestamp,
    body: Arc<EventBody>,
}

/// One customer's events, oldest first.
#[derive(Debug, Default)]
struct CustomerLog {
    entries: VecDeque<Entry>,
    /// The newest id of this customer's events that were let go (0: none).
    dropped_through: u64,
}

impl CustomerLog {
    /// Lets go of events past the retention at `now`.
    fn trim(&mut self, r: StreamRetention, now: Timestamp) {
        while self.entries.len() > r.max_events
            || self
                .entries
                .front()
                .is_some_and(|e| e.at.millis().saturating_add(r.millis) < now.millis())
        {
            if let Some(e) = self.entries.pop_front() {
                self.dropped_through = self.dropped_through.max(e.id);
            }
        }
    }
}

#[derive(Debug)]
struct Inner {
    /// Per customer, so one tenant's flood never pushes out another's events.
    by_customer: std::collections::HashMap<Name, CustomerLog>,
    next: u64,
    /// The first id this log numbered or was given back: a cursor from before it may have
    /// missed events.
    floor: u64,
    retention: StreamRetention,
}

/// The in-process event log.
#[derive(Debug)]
pub struct EventLog {
    inner: Mutex<Inner>,
    signal: watch::Sender<u64>,
}

impl EventLog {
    /// An empty log whose ids start above `first` (a durable store passes the last id it
    /// kept; ids also start above the clock's milliseconds times 2^16, so a restarted
    /// in-memory store never reuses an id a client may hold).
    pub fn new(first: u64, now: Timestamp) -> Self {
        let clock_floor = u64::try_from(now.millis()).unwrap_or(0) << 16;
        let next = first.max(clock_floor) + 1;
        Self {
            inner: Mutex::new(Inner {
                by_customer: std::collections::HashMap::new(),
                next,
                floor: next,
                retention: StreamRetention::default(),
            }),
            signal: watch::Sender::new(0),
        }
    }

    pub fn set_retention(&self, retention: StreamRetention) {
        self.inner.lock().retention = retention;
    }

    /// Puts back events a durable store kept, oldest first.
    pub fn restore(
        &self,
        events: impl IntoIterator<Item = (u64, Name, Timestamp, Arc<EventBody>)>,
    ) {
        let mut inner = self.inner.lock();
        for (id, customer, at, body) in events {
            inner.next = inner.next.max(id + 1);
            inner.floor = inner.floor.min(id);
            inner
                .by_customer
                .entry(customer)
                .or_default()
                .entries
                .push_back(Entry {
                    id,
                    customer,
                    at,
                    body,
                });
        }
    }

    /// Appends events of `customer` made at `now` or before; returns their ids, in order.
    pub fn push(
        &self,
        customer: Name,
        bodies: Vec<(Timestamp, Arc<EventBody>)>,
        now: Timestamp,
    ) -> Vec<u64> {
        if bodies.is_empty() {
            return Vec::new();
        }
        let mut inner = self.inner.lock();
        let mut ids = Vec::with_capacity(bodies.len());
        let mut next = inner.next;
        let r = inner.retention;
        let log = inner.by_customer.entry(customer).or_default();
        for (at, body) in bodies {
            let id = next;
            next += 1;
            log.entries.push_back(Entry {
                id,
                customer,
                at,
                body,
            });
            ids.push(id);
        }
        log.trim(r, now);
        inner.next = next;
        let last = inner.next - 1;
        drop(inner);
        self.signal.send_replace(last);
        ids
    }

    /// Up to `max` events after `after` (of `customer` only, when given), oldest first.
    pub fn read(&self, customer: Option<Name>, after: Option<u64>, max: usize) -> EventPage {
        let inner = self.inner.lock();
        let logs: Vec<&CustomerLog> = match customer {
            Some(c) => inner.by_customer.get(&c).into_iter().collect(),
            None => inner.by_customer.values().collect(),
        };
        // Events of the customers read that were let go after the cursor may be missed; so may
        // any from before this log's numbering (another process).
        let gap = after
            .is_some_and(|a| a + 1 < inner.floor || logs.iter().any(|l| l.dropped_through > a));
        let mut events: Vec<StreamEvent> = Vec::new();
        for l in logs {
            let start = after.map_or(0, |a| l.entries.partition_point(|e| e.id <= a));
            events.extend(l.entries.range(start..).take(max).map(|e| StreamEvent {
                id: e.id.to_string(),
                customer: e.customer,
                at: e.at,
                body: Arc::clone(&e.body),
            }));
        }
        if customer.is_none() {
            // Every customer's log is in id order; together, in the order events happened.
            events.sort_by_key(|e| e.id.parse::<u64>().unwrap_or(u64::MAX));
            events.truncate(max);
        }
        EventPage { events, gap }
    }

    /// A receiver that changes whenever events are added.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.signal.subscribe()
    }

    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .by_customer
            .values()
            .map(|l| l.entries.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(n: u32) -> (Timestamp, Arc<EventBody>) {
        (
            Timestamp::from_millis(1_000),
            Arc::new(EventBody::Alert(n.to_string())),
        )
    }

    #[test]
    fn reads_resume_after_a_cursor_per_customer_and_report_gaps() {
        let log = EventLog::new(0, Timestamp::from_millis(0));
        let acme: Name = "acme".into();
        let globex: Name = "globex".into();
        let now = Timestamp::from_millis(1_000);
        let a = log.push(acme, vec![alert(1), alert(2)], now);
        let g = log.push(globex, vec![alert(3)], now);
        assert!(a[0] < a[1] && a[1] < g[0]);
        let all = log.read(None, None, 10);
        assert_eq!(all.events.len(), 3);
        let after = log.read(Some(acme), Some(a[0]), 10);
        assert_eq!(after.events.len(), 1);
        assert_eq!(after.events[0].id, a[1].to_string());
        assert!(!after.gap);
        log.set_retention(StreamRetention {
            millis: i64::MAX / 2,
            max_events: 2,
        });
        log.push(acme, vec![alert(4), alert(5)], now);
        let late = log.read(None, Some(a[0]), 10);
        assert!(late.gap, "the event after the cursor was dropped");
        assert_eq!(late.events.len(), 3, "acme's two newest and globex's");
        // acme's flood pushed out only acme's own events: globex's one is still there, with
        // no gap for a globex reader.
        log.push(acme, (10..1000).map(alert).collect(), now);
        let g_page = log.read(Some(globex), Some(a[1]), 10);
        assert_eq!(g_page.events.len(), 1);
        assert!(!g_page.gap);
        assert_eq!(log.len(), 3);
    }
}
