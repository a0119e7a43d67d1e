//! Alerts: after a granted decision, the thresholds its chain crossed are claimed in the
//! store (once per crossing, across replicas) and put on the customer's usage stream; limits
//! without periods re-arm when usage falls back under the hysteresis margin.

pub mod deliver;
pub mod sign;

use dashmap::DashSet;
use rand::RngCore;
use serde_json::json;

use crate::core::Timestamp;
use crate::core::alerts::{self, Crossing, Delivery, Trigger};
use crate::core::decision::Decision;
use crate::engine::Engine;
use crate::store::StoreError;

/// The Standard Webhooks event type of a crossed threshold.
pub const THRESHOLD_CROSSED: &str = "limit.threshold_crossed";
/// The event type of an exceeded soft limit.
pub const SOFT_LIMIT_EXCEEDED: &str = "limit.soft_exceeded";

/// Claim keys this replica holds, so it asks the store to re-arm only those it knows of
/// (a check that stays under a threshold costs no store call).
#[derive(Debug, Default)]
pub struct Claims {
    held: DashSet<(String, String)>,
}

/// 128 random bits in hex: alert and delivery ids are unguessable.
fn random_id() -> String {
    let mut id = [0u8; 16];
    rand::rng().fill_bytes(&mut id);
    hex::encode(id)
}

fn rfc3339(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(t.millis())
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The alert body, in the Standard Webhooks payload shape: `type`, `timestamp`, `data`.
fn body(customer: &str, c: &Crossing, id: &str, now: Timestamp) -> String {
    let (kind, trigger) = match c.trigger {
        Trigger::Percent(p) => (THRESHOLD_CROSSED, json!({"percent": p})),
        Trigger::Absolute(a) => (THRESHOLD_CROSSED, json!({"absolute": a})),
        Trigger::SoftLimit => (SOFT_LIMIT_EXCEEDED, json!({"softLimit": true})),
    };
    let time = rfc3339;
    let e = &c.entry;
    json!({
        "type": kind,
        "timestamp": time(now),
        "data": {
            "alertId": format!("alert_{id}"),
            "ruleId": c.rule.as_str(),
            "customerId": customer,
            "entityId": e.entity_id.as_str(),
            "entityType": e.entity_type.as_str(),
            "limitId": e.limit_id.as_str(),
            "featureId": e.feature_id.as_str(),
            "limitKind": e.kind,
            "trigger": trigger,
            "threshold": c.threshold,
            "used": e.current_usage,
            "limit": e.usage_limit,
            "remaining": e.remaining,
            "resetsAt": e.reset_at.map(time),
        }
    })
    .to_string()
}

/// A delivery of `body` to webhook `webhook`, due at once. One alert's deliveries to several
/// endpoints share the alert's id, each under its own `webhook-id`.
fn new_delivery(alert: &str, webhook: &str, body: &str, now: Timestamp) -> Delivery {
    Delivery {
        id: format!("msg_{alert}_{webhook}"),
        webhook: webhook.to_string(),
        body: body.to_string(),
        created: now.millis(),
        next_at: Some(now.millis()),
        delivered: false,
        attempts: Vec::new(),
    }
}

/// Enqueues a `webhook.test` call to `webhook` of `customer`; its delivery id.
pub async fn test_delivery(
    engine: &Engine,
    customer: &str,
    webhook: &str,
) -> Result<Option<String>, StoreError> {
    let model = engine.model();
    let Some(c) = model.customer(customer) else {
        return Ok(None);
    };
    if !c.webhooks.iter().any(|w| w.id == webhook) {
        return Ok(None);
    }
    let now = engine.now();
    let id = random_id();
    let body = json!({
        "type": "webhook.test",
        "timestamp": rfc3339(now),
        "data": { "customerId": customer, "webhookId": webhook, "testId": format!("test_{id}") }
    })
    .to_string();
    let d = new_delivery(&format!("test_{id}"), webhook, &body, now);
    engine
        .store()
        .enqueue_deliveries(c.id, std::slice::from_ref(&d))
        .await?;
    Ok(Some(d.id))
}

/// Claims every threshold `decision` crossed and re-arms the claims this replica holds that
/// usage fell back under. Returns how many alerts fired. Alerts are a side effect of an
/// answered decision: the caller logs a failure, the decision stands.
pub async fn after_decision(
    engine: &Engine,
    claims: &Claims,
    customer: &str,
    decision: &Decision,
) -> Result<usize, StoreError> {
    if !decision.granted || decision.dry_run {
        return Ok(0);
    }
    let model = engine.model();
    let Some(c) = model.customer(customer) else {
        return Ok(0);
    };
    let (crossed, rearm) = alerts::evaluate(&model, c, &decision.chain);
    let now = engine.now();
    let store = engine.store();
    let mut fired = 0;
    for x in &crossed {
        let id = random_id();
        let body = body(customer, x, &id, now);
        let webhooks = c
            .alerts
            .iter()
            .find(|r| r.id == x.rule)
            .map(|r| r.webhooks.as_slice())
            .unwrap_or_default();
        let deliveries: Vec<Delivery> = webhooks
            .iter()
            .filter_map(|w| c.webhooks.get(*w))
            .map(|w| new_delivery(&id, w.id.as_str(), &body, now))
            .collect();
        let claimed = store
            .claim_alert(c.id, &x.key, x.until, &body, &deliveries, now)
            .await?;
        fired += usize::from(claimed);
        if x.until.is_none() {
            claims.held.insert((customer.to_string(), x.key.clone()));
        }
    }
    for r in rearm {
        if claims
            .held
            .remove(&(customer.to_string(), r.key.clone()))
            .is_some()
        {
            store.rearm_alert(c.id, &r.key).await?;
        }
    }
    Ok(fired)
}
