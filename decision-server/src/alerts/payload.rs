//! The webhook payloads, typed: the Standard Webhooks shape (`type`, `timestamp`, `data`) with
//! one `data` struct per event type, as `docs/alerts.md` documents them. Serialized once, when
//! the alert is made; the outbox and the stream carry the text.

use serde::Serialize;

use crate::core::model::KindName;

/// One webhook call's body.
#[derive(Debug, Serialize)]
pub struct Envelope<D: Serialize> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// RFC 3339, in ms.
    pub timestamp: String,
    pub data: D,
}

impl<D: Serialize> Envelope<D> {
    /// The body as JSON text (the fields are all plain data: it cannot fail to encode, and an
    /// empty object stands in if it ever did).
    pub fn text(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }
}

/// What crossed a threshold: a percent of the limit, an absolute usage, or a soft limit.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum TriggerData {
    Percent {
        percent: u32,
    },
    Absolute {
        absolute: u64,
    },
    SoftLimit {
        #[serde(rename = "softLimit")]
        soft_limit: bool,
    },
}

/// `limit.threshold_crossed` and `limit.soft_exceeded`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ThresholdData<'a> {
    pub alert_id: String,
    pub rule_id: &'a str,
    pub customer_id: &'a str,
    pub entity_id: &'a str,
    pub entity_type: &'a str,
    pub limit_id: &'a str,
    pub feature_id: &'a str,
    pub limit_kind: KindName,
    pub trigger: TriggerData,
    pub threshold: u64,
    pub used: u64,
    pub limit: u64,
    pub remaining: u64,
    pub resets_at: Option<String>,
}

/// `limit.denial_burst`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DenialBurstData<'a> {
    pub alert_id: String,
    pub rule_id: &'a str,
    pub customer_id: &'a str,
    pub entity_id: &'a str,
    pub limit_id: Option<String>,
    pub denied: u64,
    pub count: u32,
    pub within_seconds: i64,
}

/// `limit.exhaustion_projected`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExhaustionData<'a> {
    pub alert_id: String,
    pub rule_id: &'a str,
    pub customer_id: &'a str,
    pub entity_id: &'a str,
    pub limit_id: &'a str,
    pub feature_id: &'a str,
    pub used: u64,
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub projected_exhaustion: String,
    pub resets_at: Option<String>,
    pub recent_units: u64,
}

/// `webhook.test`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TestData<'a> {
    pub customer_id: &'a str,
    pub webhook_id: &'a str,
    pub test_id: String,
}
