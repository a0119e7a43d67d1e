//! Alerts: after a granted decision, the thresholds its chain crossed are claimed in the
//! store (once per crossing, across replicas) and put on the customer's usage stream; limits
//! without periods re-arm when usage falls back under the hysteresis margin.

pub mod sign;

use dashmap::DashSet;
use rand::RngCore;
use serde_json::json;

use crate::core::Timestamp;
use crate::core::alerts::{self, Crossing, Trigger};
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

/// The alert body, in the Standard Webhooks payload shape: `type`, `timestamp`, `data`.
fn body(customer: &str, c: &Crossing, now: Timestamp) -> String {
    let mut id = [0u8; 16];
    rand::rng().fill_bytes(&mut id);
    let (kind, trigger) = match c.trigger {
        Trigger::Percent(p) => (THRESHOLD_CROSSED, json!({"percent": p})),
        Trigger::Absolute(a) => (THRESHOLD_CROSSED, json!({"absolute": a})),
        Trigger::SoftLimit => (SOFT_LIMIT_EXCEEDED, json!({"softLimit": true})),
    };
    let time = |t: Timestamp| {
        chrono::DateTime::from_timestamp_millis(t.millis())
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    let e = &c.entry;
    json!({
        "type": kind,
        "timestamp": time(now),
        "data": {
            "alertId": format!("alert_{}", hex::encode(id)),
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
        let claimed = store
            .claim_alert(c.id, &x.key, x.until, &body(customer, x, now), now)
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
