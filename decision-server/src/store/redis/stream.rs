//! The operator's stream of every customer's events on Redis, where each customer's events
//! are a stream on its own hash slot: the customers that ever had a call are kept in a set,
//! and a page merges their streams in the order of their entry ids.
//!
//! An event's id here is its own stream id and its customer, `<ms>-<seq>[.<i>]@<customer>`,
//! and the merged order is (ms, customer, position in its stream): every event past a cursor
//! in that order is found from the cursor alone (a customer before the cursor's, at a later
//! millisecond; the cursor's own, after its id; a customer after it, from its millisecond).
//! Trade-off: entry ids come from Redis's clock when an entry is appended, so an event
//! appended late could carry a millisecond a reader has already passed; a page therefore
//! stops [`SETTLE_MS`] short of now, and the stream is that much behind the per-customer one.

use std::collections::HashSet;

use futures_util::StreamExt as _;
use redis::Value;

use super::RedisStore;
use crate::clock::Clock as _;
use crate::core::Name;
use crate::store::StoreError;
use crate::store::events::{EventPage, StreamEvent};

/// How far behind now a merged page stops (see the module doc).
pub const SETTLE_MS: i64 = 1_000;

/// Customers' streams read at once for one page.
const STREAMS_AT_ONCE: usize = 8;

/// The largest sequence number of a stream id: `<ms>-MAX_SEQ` is the last id of a millisecond.
const MAX_SEQ: u64 = u64::MAX;

/// A stream id's millisecond, sequence and index inside its entry. An entry's last event
/// carries the entry's bare id (`lua/events.lua` `events()`), so it sorts after the indexed ones.
fn position(id: &str) -> Option<(u64, u64, u64)> {
    let (entry, index) = match id.split_once('.') {
        Some((entry, index)) => (entry, index.parse().ok()?),
        None => (id, u64::MAX),
    };
    let (ms, seq) = entry.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?, index))
}

/// A merged cursor: the event's stream id and its customer.
fn parse_cursor(cursor: &str) -> Option<(u64, &str, &str)> {
    let (id, customer) = cursor.split_once('@')?;
    let (ms, _, _) = position(id)?;
    (!customer.is_empty()).then_some((ms, id, customer))
}

impl RedisStore {
    /// The set of customers that ever had a call: on a slot of its own.
    fn registry_key(&self) -> String {
        format!("{}:{{registry}}:customers", self.settings.prefix)
    }

    /// Adds `customer` to the registry, once per process (the first call on a customer).
    pub(super) async fn register(&self, customer: Name) {
        let mut cmd = redis::cmd("SADD");
        cmd.arg(self.registry_key()).arg(customer.as_str());
        if let Err(e) = self.link.command(&cmd).await {
            // Tried again at this customer's next first call in a process; its own stream
            // is complete either way.
            tracing::debug!(%customer, error = %e, "customer not registered for the operator's stream");
            self.registered.remove(&customer.sym());
        }
    }

    /// Every customer's events after merged cursor `after`, at most `max`, in merged order.
    pub(super) async fn all_events(
        &self,
        after: Option<&str>,
        max: usize,
    ) -> Result<EventPage, StoreError> {
        let cursor = match after {
            Some(a) => Some(parse_cursor(a).ok_or_else(|| StoreError::BadCursor(a.to_string()))?),
            None => None,
        };
        let mut cmd = redis::cmd("SMEMBERS");
        cmd.arg(self.registry_key());
        let Value::Array(members) = self.link.command(&cmd).await? else {
            return Err(super::wire::bad_reply("SMEMBERS: not a list"));
        };
        let mut customers: Vec<String> = members
            .iter()
            .filter_map(|m| match m {
                Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
                _ => None,
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        customers.sort();
        let pages: Vec<Result<EventPage, StoreError>> = futures_util::stream::iter(customers)
            .map(|c| {
                let start = cursor.map(|(ms, id, at)| match c.as_str().cmp(at) {
                    std::cmp::Ordering::Less => format!("{ms}-{MAX_SEQ}"),
                    std::cmp::Ordering::Equal => id.to_string(),
                    std::cmp::Ordering::Greater if ms == 0 => String::new(),
                    std::cmp::Ordering::Greater => format!("{}-{MAX_SEQ}", ms - 1),
                });
                async move {
                    let name = Name::from(c.as_str());
                    let after = start.as_deref().filter(|s| !s.is_empty());
                    self.customer_events(name, after, max).await
                }
            })
            .buffered(STREAMS_AT_ONCE)
            .collect()
            .await;
        let settled =
            u64::try_from(crate::clock::SystemClock.now().millis() - SETTLE_MS).unwrap_or(0);
        let mut gap = false;
        let mut merged: Vec<((u64, String, u64, u64), StreamEvent)> = Vec::new();
        for page in pages {
            let page = page?;
            gap |= page.gap;
            for e in page.events {
                let Some((ms, seq, index)) = position(&e.id) else {
                    continue;
                };
                if ms > settled {
                    break;
                }
                merged.push(((ms, e.customer.as_str().to_string(), seq, index), e));
            }
        }
        merged.sort_by(|a, b| a.0.cmp(&b.0));
        let events = merged
            .into_iter()
            .take(max)
            .map(|(_, mut e)| {
                e.id = format!("{}@{}", e.id, e.customer);
                e
            })
            .collect();
        Ok(EventPage { events, gap })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_name_an_id_and_a_customer() {
        assert_eq!(
            parse_cursor("1700-3.2@acme"),
            Some((1700, "1700-3.2", "acme"))
        );
        assert_eq!(parse_cursor("1700-3@a@b"), Some((1700, "1700-3", "a@b")));
        assert_eq!(parse_cursor("1700-3"), None);
        assert_eq!(parse_cursor("x-3@acme"), None);
        assert_eq!(parse_cursor("1700-3@"), None);
        assert_eq!(position("5-6.7"), Some((5, 6, 7)));
        assert_eq!(position("5-6"), Some((5, 6, u64::MAX)));
    }
}
