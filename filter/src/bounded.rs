//! The bounded fail mode's arithmetic: a customer's allowance of units per minute while the
//! sidecar is unreachable, as a counter in Envoy's shared data (one per customer, for the
//! current minute, shared by the worker threads), and the record of each call that passed,
//! reported to the sidecar with an idempotency key when it is back.
//!
//! The bound: at most `boundedPerMinute` units per customer per minute of outage, per Envoy
//! (each Envoy has its own shared data).

use tollgate_proto::v1 as pb;

use prost::Message;

/// Hold ids of bounded passes start with this, so their closes are reported as usage.
pub const PREFIX: &str = "bounded:";
/// The `x-tollgate-unchecked` value of a bounded pass.
pub const MARK: &str = "bounded";
/// Passes waiting to be reported, at most; past it the oldest are dropped (and counted).
pub const MAX_PENDING: usize = 10_000;
/// Passes per `IngestUsage` call.
pub const BATCH: usize = 500;

/// The shared-data key of `customer`'s allowance. One per customer, holding the minute it
/// counts and what was taken in it: proxy-wasm cannot delete shared data, so a key per minute
/// would leave one behind for every customer and minute of every outage.
pub fn key(customer: &str) -> String {
    format!("tollgate.bounded.{customer}")
}

/// The value after taking `units` in `minute` (since the epoch) from an allowance of
/// `per_minute`, given what the shared data holds now (16 bytes: the minute, then what was
/// taken in it; `None`, unreadable or an earlier minute: nothing taken yet); `None` when it
/// does not fit.
pub fn take(current: Option<&[u8]>, minute: u64, units: u64, per_minute: u64) -> Option<Vec<u8>> {
    let used = current
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .filter(|b| b[..8] == minute.to_le_bytes())
        .map_or(0, |b| {
            let mut u = [0u8; 8];
            u.copy_from_slice(&b[8..]);
            u64::from_le_bytes(u)
        });
    let next = used.checked_add(units).filter(|n| *n <= per_minute)?;
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(&minute.to_le_bytes());
    out.extend_from_slice(&next.to_le_bytes());
    Some(out)
}

/// What a bounded pass charged to, kept until its usage is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pass {
    pub customer: String,
    pub feature: String,
    pub dimensions: Vec<(String, String)>,
}

/// The usage record of a pass, keyed by its hold id (unique per request), so a report sent
/// twice (a retry after a lost answer) counts once.
pub fn record(key: &str, pass: &Pass, units: u64, tokens: Option<pb::Tokens>) -> pb::UsageRecord {
    pb::UsageRecord {
        idempotency_key: key.to_string(),
        customer_id: pass.customer.clone(),
        feature_id: pass.feature.clone(),
        usage: units,
        dimensions: pass.dimensions.iter().cloned().collect(),
        tokens,
    }
}

pub fn ingest_request(records: Vec<pb::UsageRecord>) -> Vec<u8> {
    pb::IngestUsageRequest { events: records }.encode_to_vec()
}

/// Which records of a batch are done (recorded, duplicate or refused for good); `None` when
/// the answer is unreadable or incomplete, so the whole batch is sent again.
pub fn ingest_done(body: &[u8], n: usize) -> Option<Vec<bool>> {
    let r = pb::IngestUsageResponse::decode(body).ok()?;
    (r.results.len() == n).then(|| {
        r.results
            .iter()
            .map(|x| x.status != pb::ingest_result::Status::Unspecified as i32)
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allowance_is_taken_until_it_is_used_up() {
        let a = take(None, 7, 400, 1000).unwrap();
        let b = take(Some(&a), 7, 600, 1000).unwrap();
        assert_eq!(b[..8], 7u64.to_le_bytes());
        assert_eq!(b[8..], 1000u64.to_le_bytes());
        assert!(take(Some(&b), 7, 1, 1000).is_none());
        assert!(take(None, 7, 1001, 1000).is_none());
        let full = [7u64.to_le_bytes(), u64::MAX.to_le_bytes()].concat();
        assert!(take(Some(&full), 7, 1, u64::MAX).is_none());
        // The next minute starts from nothing, in the same key.
        let c = take(Some(&b), 8, 1000, 1000).unwrap();
        assert_eq!(c[8..], 1000u64.to_le_bytes());
        // An unreadable value counts as nothing taken; a zero allowance passes nothing.
        assert!(take(Some(b"junk"), 7, 10, 10).is_some());
        assert!(take(None, 7, 1, 0).is_none());
        assert_eq!(key("acme"), "tollgate.bounded.acme");
    }

    #[test]
    fn a_report_carries_its_key_and_reads_back_done() {
        let pass = Pass {
            customer: "acme".into(),
            feature: "ai-tokens".into(),
            dimensions: vec![("userId".into(), "alice".into())],
        };
        let r = record("bounded:req-1", &pass, 42, None);
        assert_eq!(r.idempotency_key, "bounded:req-1");
        assert_eq!(r.usage, 42);
        let req = pb::IngestUsageRequest::decode(ingest_request(vec![r]).as_slice()).unwrap();
        assert_eq!(req.events.len(), 1);
        let ok = pb::IngestUsageResponse {
            results: vec![pb::IngestResult {
                idempotency_key: "bounded:req-1".into(),
                status: pb::ingest_result::Status::Duplicate as i32,
                error: String::new(),
            }],
        };
        assert_eq!(ingest_done(&ok.encode_to_vec(), 1), Some(vec![true]));
        assert_eq!(ingest_done(&ok.encode_to_vec(), 2), None);
        assert_eq!(ingest_done(b"\\xff", 1), None);
    }
}
