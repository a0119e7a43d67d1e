//! Webhook delivery from the store's outbox: due deliveries are leased (so one replica sends
//! each), signed per Standard Webhooks, sent, and stored back with the attempt, the next time
//! by the retry schedule, or delivered.
//!
//! Trade-off: a replica killed after a receiver answered but before the attempt was stored
//! leaves the delivery leased; when the lease ends another replica sends it again, under the
//! same `webhook-id`, which receivers use to drop repeats (as the spec asks them to).

use std::time::Duration;

use crate::core::Timestamp;
use crate::core::alerts::{Attempt, Delivery, next_attempt};
use crate::core::model::Webhook;
use crate::engine::Engine;
use crate::store::StoreError;

/// Deliveries one customer's pass leases at most.
const PASS: usize = 64;
/// The longest answer of a receiver's error body kept in the log.
const MAX_ERROR_CHARS: usize = 200;

/// Sends webhooks; one per process.
#[derive(Debug, Clone)]
pub struct Deliverer {
    http: reqwest::Client,
}

impl Deliverer {
    pub fn new() -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
        })
    }

    /// Sends every delivery due now, for every customer with webhooks; how many attempts
    /// were made. A store that cannot be reached ends the pass; the next one tries again.
    pub async fn pass(&self, engine: &Engine) -> Result<usize, StoreError> {
        let model = engine.model();
        let settings = &model.alerting;
        let lease = settings.timeout_millis + 30_000;
        let mut attempts = 0;
        for c in model.customers.values().filter(|c| !c.webhooks.is_empty()) {
            let now = engine.now();
            let due = engine
                .store()
                .lease_deliveries(c.id, now, lease, PASS)
                .await?;
            for mut d in due {
                let attempt = match c.webhooks.iter().find(|w| w.id == d.webhook.as_str()) {
                    Some(w) => {
                        self.send(w, &d, settings.timeout_millis, engine.now())
                            .await
                    }
                    None => Attempt {
                        at: engine.now().millis(),
                        status: None,
                        error: Some(format!("webhook `{}` no longer exists", d.webhook)),
                    },
                };
                let ok = attempt.status.is_some_and(|s| (200..300).contains(&s));
                d.attempts.push(attempt);
                d.delivered = ok;
                d.next_at = if ok {
                    None
                } else {
                    next_attempt(
                        &settings.retry_millis,
                        d.attempts.len(),
                        engine.now().millis(),
                    )
                };
                engine.store().finish_delivery(c.id, &d).await?;
                attempts += 1;
            }
        }
        Ok(attempts)
    }

    /// One signed POST.
    async fn send(&self, w: &Webhook, d: &Delivery, timeout_ms: i64, now: Timestamp) -> Attempt {
        let failed = |error: String| Attempt {
            at: now.millis(),
            status: None,
            error: Some(error),
        };
        let ts = now.millis().div_euclid(1000);
        let signature = match super::sign::signature(&w.secrets, &d.id, ts, d.body.as_bytes()) {
            Ok(s) => s,
            Err(e) => return failed(e.to_string()),
        };
        let sent = self
            .http
            .post(&w.url)
            .timeout(Duration::from_millis(
                u64::try_from(timeout_ms).unwrap_or(10_000),
            ))
            .header("content-type", "application/json")
            .header("webhook-id", &d.id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(d.body.clone())
            .send()
            .await;
        match sent {
            Ok(r) => {
                let status = r.status();
                let error = (!status.is_success()).then(|| {
                    format!("the receiver answered {status}")
                        .chars()
                        .take(MAX_ERROR_CHARS)
                        .collect()
                });
                Attempt {
                    at: now.millis(),
                    status: Some(status.as_u16()),
                    error,
                }
            }
            Err(e) => failed(format!("not delivered: {e}")),
        }
    }
}
