//! Webhook delivery from the store's outbox: due deliveries are leased (so one replica sends
//! each), signed per Standard Webhooks, sent, and stored back with the attempt, the next time
//! by the retry schedule, or delivered.
//!
//! Trade-off: a replica killed after a receiver answered but before the attempt was stored
//! leaves the delivery leased; when the lease ends another replica sends it again, under the
//! same `webhook-id`, which receivers use to drop repeats (as the spec asks them to).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use parking_lot::{Mutex, RwLock};

use crate::clock::Clock;
use crate::core::Timestamp;
use crate::core::alerts::{Attempt, Delivery, next_attempt};
use crate::core::model::{AlertDelivery, Webhook};
use crate::core::symbols::Name;
use crate::engine::Engine;
use crate::store::{CounterStore, StoreError};

use super::target::{Resolver, TargetPolicy};

/// Deliveries one customer's pass leases at most.
const PASS: usize = 64;
/// Deliveries of one customer in flight at once: a customer's slow receiver holds at most this
/// many of its own calls, and never another customer's.
const IN_FLIGHT_PER_CUSTOMER: usize = 4;
/// Times an attempt's outcome is stored again when the store is out of reach (waiting 50 ms,
/// then twice as long each time): storing it twice changes nothing, and one not stored is
/// sent again by this replica's next pass (the lease stays its own), a second call to the
/// receiver under the same `webhook-id`.
const FINISH_TRIES: u32 = 4;
/// The longest answer of a receiver's error body kept in the log.
const MAX_ERROR_CHARS: usize = 200;

/// Sends webhooks; one per process.
#[derive(Debug, Clone)]
pub struct Deliverer {
    http: reqwest::Client,
    /// Where webhooks may go (the model's `alerting.allowTargets`), read by the resolver on
    /// every connection.
    targets: Arc<RwLock<TargetPolicy>>,
    /// Customers whose deliveries are being sent: one pass each at a time, each on a task of
    /// its own.
    busy: Arc<Mutex<HashSet<Name>>>,
    /// This deliverer's name as a lessee (128 random bits): a lease whose answer was lost is
    /// taken again by its next pass, not left until the lease ends.
    lessee: Arc<str>,
}

impl Deliverer {
    pub fn new() -> Result<Self, reqwest::Error> {
        let targets = Arc::new(RwLock::new(TargetPolicy::default()));
        Ok(Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                // Every host name is resolved through the target policy: a name that resolves
                // to loopback or a private address is refused at connection time.
                .dns_resolver(Arc::new(Resolver::new(Arc::clone(&targets))))
                .build()?,
            targets,
            busy: Arc::new(Mutex::new(HashSet::new())),
            lessee: super::random_id().into(),
        })
    }

    /// The model in force, its target policy made the resolver's (a reload may change it).
    fn model_in_force(&self, engine: &Engine) -> Arc<crate::core::model::Model> {
        let model = engine.model();
        *self.targets.write() = model.alerting.targets.clone();
        model
    }

    /// Starts sending every customer's due deliveries, each customer on its own task (one at
    /// a time per customer), so one customer's slow or silent receiver never delays another's;
    /// how many customers' passes were started. Must run inside a Tokio runtime.
    ///
    /// Trade-off: the pass returns before the calls end, so a store failure is logged by the
    /// customer's task rather than returned.
    pub fn pass(&self, engine: &Engine) -> usize {
        let model = self.model_in_force(engine);
        let mut started = 0;
        for c in model.customers.values().filter(|c| !c.webhooks.is_empty()) {
            if !self.busy.lock().insert(c.id) {
                continue;
            }
            started += 1;
            let this = self.clone();
            let store = Arc::clone(engine.store());
            let clock = engine.clock();
            let customer = c.id;
            let webhooks = c.webhooks.clone();
            let settings = model.alerting.clone();
            tokio::spawn(async move {
                let r = this
                    .customer_pass(&customer, &webhooks, &settings, store, clock)
                    .await;
                this.busy.lock().remove(&customer);
                match r {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::debug!(customer = %customer, attempts = n, "webhook deliveries attempted")
                    }
                    Err(e) => {
                        tracing::warn!(customer = %customer, error = %e, "webhook delivery pass failed")
                    }
                }
            });
        }
        started
    }

    /// Sends every customer's due deliveries now, customers side by side, and waits for all
    /// of them; how many attempts were made. For a caller that needs the outcome (tests, a
    /// one-off run); the server's loop uses [`Deliverer::pass`].
    pub async fn pass_and_wait(&self, engine: &Engine) -> Result<usize, StoreError> {
        let model = self.model_in_force(engine);
        let passes = model
            .customers
            .values()
            .filter(|c| !c.webhooks.is_empty())
            .map(|c| {
                self.customer_pass(
                    &c.id,
                    &c.webhooks,
                    &model.alerting,
                    Arc::clone(engine.store()),
                    engine.clock(),
                )
            });
        let mut attempts = 0;
        for r in futures_util::future::join_all(passes).await {
            attempts += r?;
        }
        Ok(attempts)
    }

    /// One customer's due deliveries, at most [`IN_FLIGHT_PER_CUSTOMER`] at once; how many
    /// attempts were made.
    async fn customer_pass(
        &self,
        customer: &Name,
        webhooks: &[Webhook],
        settings: &AlertDelivery,
        store: Arc<dyn CounterStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<usize, StoreError> {
        let lease = settings.timeout_millis + 30_000;
        let due = store
            .alerts()
            .lease_deliveries(*customer, &self.lessee, clock.now(), lease, PASS)
            .await?;
        let results: Vec<Result<(), StoreError>> = futures_util::stream::iter(due)
            .map(|mut d| {
                let store = Arc::clone(&store);
                let clock = Arc::clone(&clock);
                async move {
                    let attempt = match webhooks.iter().find(|w| w.id == d.webhook.as_str()) {
                        Some(w) => self.send(w, &d, settings.timeout_millis, clock.now()).await,
                        None => Attempt {
                            at: clock.now().millis(),
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
                            clock.now().millis(),
                        )
                    };
                    let mut wait = Duration::from_millis(50);
                    let mut tries = 1;
                    loop {
                        match store
                            .alerts()
                            .finish_delivery(*customer, &self.lessee, &d)
                            .await
                        {
                            Err(StoreError::Unavailable(_)) if tries < FINISH_TRIES => {
                                tries += 1;
                                tokio::time::sleep(wait).await;
                                wait *= 2;
                            }
                            r => break r,
                        }
                    }
                }
            })
            .buffer_unordered(IN_FLIGHT_PER_CUSTOMER)
            .collect()
            .await;
        let attempts = results.len();
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(attempts)
    }

    /// One signed POST.
    async fn send(&self, w: &Webhook, d: &Delivery, timeout_ms: i64, now: Timestamp) -> Attempt {
        let failed = |error: String| Attempt {
            at: now.millis(),
            status: None,
            error: Some(error),
        };
        // An address in the URL is never resolved: checked here (a name is checked on every
        // connection by the resolver). A webhook configured before the policy changed is
        // refused too.
        if let Err(why) = self.targets.read().check_url(&w.url) {
            return failed(format!("not sent: {why}"));
        }
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
