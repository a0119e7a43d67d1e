//! What a decision answers: granted or not, the hold, the per-level chain and the denial.

use std::fmt;
use std::str::FromStr;

use super::Timestamp;
use super::model::Mode;
use super::symbols::Name;

/// A hold (reservation) id: the customer, a per-customer sequence number and a 128-bit random
/// tag, written `<customer>:<seq>:<32 hex digits>`. Carrying the customer lets any store find
/// the hold's shard (or Redis hash slot) without a global index; the sequence number keys the
/// hold and makes closes idempotent; the tag, drawn when the hold is placed and kept with it,
/// makes the id impossible to guess or enumerate, and keeps an id from before a restart (when
/// sequence numbers may start again) from ever naming a later hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HoldId {
    pub customer: String,
    pub seq: u64,
    pub tag: u128,
}

impl fmt::Display for HoldId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{:032x}", self.customer, self.seq, self.tag)
    }
}

/// Why a string is not a hold id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a hold id; expected `<customerId>:<number>:<32 hex digits>`")]
pub struct ParseHoldIdError(pub String);

impl FromStr for HoldId {
    type Err = ParseHoldIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseHoldIdError(s.chars().take(200).collect());
        let (rest, tag) = s.rsplit_once(':').ok_or_else(err)?;
        let (customer, seq) = rest.rsplit_once(':').ok_or_else(err)?;
        if customer.is_empty() || tag.len() != 32 || !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err());
        }
        let seq = seq.parse::<u64>().map_err(|_| err())?;
        let tag = u128::from_str_radix(tag, 16).map_err(|_| err())?;
        Ok(Self {
            customer: customer.to_string(),
            seq,
            tag,
        })
    }
}

/// One limit on one level of the chain, as it stood for this decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainEntry {
    /// 0 is the leaf (the most specific entity); the last level is the root.
    pub level: usize,
    pub entity_id: Name,
    pub entity_type: Name,
    pub limit_id: Name,
    pub feature_id: Name,
    pub kind: crate::core::model::KindName,
    pub mode: Mode,
    /// What this decision asked of the limit (units, or 1 for a concurrency slot).
    pub requested: u64,
    pub usage_limit: u64,
    /// Usage counted, including open holds; after this decision's hold when it was granted.
    pub current_usage: u64,
    pub remaining: u64,
    /// When `remaining` next grows: the period end, the oldest units leaving a rolling
    /// window, or the soonest grant expiry for credits. `None` when nothing is scheduled.
    pub reset_at: Option<Timestamp>,
    /// The request did not fit this limit. On an `enforce` limit that denies; on `soft` and
    /// `shadow` it is recorded and the request goes on.
    pub exceeded: bool,
}

/// Which limit blocked a denied decision, and when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub level: usize,
    pub entity_id: Name,
    pub limit_id: Name,
    pub kind: crate::core::model::KindName,
    pub reason: String,
    /// The earliest time the same request could pass, if known. `None` when it depends on
    /// something else (a slot freed, a grant added) or can never pass.
    pub retry_at: Option<Timestamp>,
}

/// The answer to `check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub granted: bool,
    /// Present when granted and not a dry run, and some limit applied.
    pub hold_id: Option<HoldId>,
    pub dry_run: bool,
    /// No limit applied to this request: it is allowed, and says so.
    pub no_matching_limit: bool,
    pub chain: Vec<ChainEntry>,
    pub denial: Option<Denial>,
}

impl Decision {
    /// Soft or shadow limits this request exceeded without being denied.
    pub fn would_deny(&self) -> impl Iterator<Item = &ChainEntry> {
        self.chain
            .iter()
            .filter(|e| e.exceeded && e.mode != Mode::Enforce)
    }

    /// The enforcing entry with the smallest share left (the blocking one on denial): the
    /// figure to put in `RateLimit-*` headers.
    pub fn tightest(&self) -> Option<&ChainEntry> {
        if let Some(d) = &self.denial {
            return self
                .chain
                .iter()
                .find(|e| e.level == d.level && e.limit_id == d.limit_id);
        }
        least_left(self.chain.iter().filter(|e| e.mode == Mode::Enforce))
    }

    /// The limit the `RateLimit-*` headers describe: [`Self::tightest`] among the limits that
    /// count the request's units (rate, quota, credits). A concurrency limit counts calls in
    /// flight, not units: `RateLimit-Limit: 8` for eight slots reads as eight tokens to a
    /// client, so a decision bound only by slots gets no such headers.
    pub fn tightest_metered(&self) -> Option<&ChainEntry> {
        use crate::core::model::KindName;
        if let Some(d) = &self.denial {
            return (d.kind != KindName::Concurrency)
                .then(|| self.tightest())
                .flatten();
        }
        least_left(
            self.chain
                .iter()
                .filter(|e| e.mode == Mode::Enforce && e.kind != KindName::Concurrency),
        )
    }
}

/// The entry with the smallest share left. By share, not by units: the limits of one chain
/// count different things (tokens, requests, slots, credits).
fn least_left<'a>(entries: impl Iterator<Item = &'a ChainEntry>) -> Option<&'a ChainEntry> {
    entries.min_by(|a, b| {
        let left_a = u128::from(a.remaining) * u128::from(b.usage_limit.max(1));
        let left_b = u128::from(b.remaining) * u128::from(a.usage_limit.max(1));
        left_a.cmp(&left_b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_ids_round_trip_and_reject_garbage() {
        let id = HoldId {
            customer: "acme:eu".into(),
            seq: 42,
            tag: 0xabc,
        };
        let text = "acme:eu:42:00000000000000000000000000000abc";
        assert_eq!(id.to_string(), text);
        assert_eq!(text.parse::<HoldId>().unwrap(), id);
        let tag = "0123456789abcdef0123456789ABCDEF";
        for bad in [
            "",
            "acme",
            ":1",
            "acme:x",
            "acme:-1",
            "acme:42",
            &format!(":1:{tag}"),
            &format!("acme:x:{tag}"),
            &format!("acme:1:{}", &tag[1..]),
            &format!("acme:1:{tag}0"),
            "acme:1:0123456789abcdef0123456789abcdeg",
            "acme:1:+123456789abcdef0123456789abcdef",
        ] {
            assert!(bad.parse::<HoldId>().is_err(), "{bad} parsed");
        }
    }

    fn entry(
        limit: &str,
        kind: crate::core::model::KindName,
        limit_of: u64,
        left: u64,
    ) -> ChainEntry {
        ChainEntry {
            level: 0,
            entity_id: "research".into(),
            entity_type: "team".into(),
            limit_id: limit.into(),
            feature_id: "ai-tokens".into(),
            kind,
            mode: Mode::Enforce,
            requested: 1,
            usage_limit: limit_of,
            current_usage: limit_of - left,
            remaining: left,
            reset_at: None,
            exceeded: false,
        }
    }

    #[test]
    fn rate_limit_headers_describe_units_never_concurrency_slots() {
        use crate::core::model::KindName;
        // Two of eight slots left is a smaller share than 500 of 1,000 tokens.
        let d = Decision {
            granted: true,
            hold_id: None,
            dry_run: false,
            no_matching_limit: false,
            chain: vec![
                entry("slots", KindName::Concurrency, 8, 2),
                entry("daily", KindName::Quota, 1000, 500),
            ],
            denial: None,
        };
        assert_eq!(d.tightest().map(|e| e.limit_id.as_str()), Some("slots"));
        assert_eq!(
            d.tightest_metered().map(|e| e.limit_id.as_str()),
            Some("daily")
        );
        let only_slots = Decision {
            chain: vec![entry("slots", KindName::Concurrency, 8, 2)],
            ..d.clone()
        };
        assert!(only_slots.tightest_metered().is_none());
        let denied = Decision {
            granted: false,
            denial: Some(Denial {
                level: 0,
                entity_id: "research".into(),
                limit_id: "slots".into(),
                kind: KindName::Concurrency,
                reason: "no slot".into(),
                retry_at: None,
            }),
            ..d
        };
        assert!(denied.tightest_metered().is_none());
    }
}
