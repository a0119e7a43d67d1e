//! Alerts: after a granted decision, the thresholds its chain crossed are claimed in the
//! store (once per crossing, across replicas) and put on the customer's usage stream; limits
//! without periods re-arm when usage falls back under the hysteresis margin.

pub mod deliver;
pub mod payload;
pub mod sign;
pub mod target;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashSet;
use rand::RngCore;

use crate::core::alerts::{self, Crossing, Delivery, Trigger};
use crate::core::decision::Decision;
use crate::core::model::KindName;
use crate::core::model::{AlertRule, CustomerModel, LimitTarget};
use crate::core::rollup::{DENIED_BY, Granularity, ScanNeeds, SeriesKey};
use crate::core::{Name, Timestamp};
use crate::engine::Engine;
use crate::store::StoreError;
use payload::{DenialBurstData, Envelope, ExhaustionData, TestData, ThresholdData, TriggerData};

/// The Standard Webhooks event type of a crossed threshold.
pub const THRESHOLD_CROSSED: &str = "limit.threshold_crossed";
/// The event type of an exceeded soft limit.
pub const SOFT_LIMIT_EXCEEDED: &str = "limit.soft_exceeded";
/// The event type of a budget projected to run out soon.
pub const EXHAUSTION_PROJECTED: &str = "limit.exhaustion_projected";
/// The event type of a burst of denials.
pub const DENIAL_BURST: &str = "limit.denial_burst";
/// The `type` of a test call (`POST .../webhooks/{id}/test`).
pub const WEBHOOK_TEST: &str = "webhook.test";

/// Claim keys this replica holds, so it asks the store to re-arm only those it knows of
/// (a check that stays under a threshold costs no store call), and the period claims it has
/// seen made (by it or another replica), so a decision over a quota's threshold asks the
/// store once per period and replica, not once per decision.
#[derive(Debug, Default)]
pub struct Claims {
    held: DashSet<(String, String)>,
    claimed: DashSet<(String, String)>,
    /// Claims whose store call failed, being sent again in the background.
    retrying: Arc<AtomicUsize>,
}

/// How long a claim whose store call failed is sent again before it is given up (logged).
const CLAIM_PATIENCE: Duration = Duration::from_secs(600);
/// The most claims sent again at once; past it a failed claim is logged and dropped.
const MAX_CLAIMS_RETRYING: usize = 10_000;

/// One threshold claim as the store takes it: the claim key, the alert's body and its
/// deliveries, all made once so that sending it again changes nothing.
struct Claim {
    customer: Name,
    key: String,
    until: Option<i64>,
    body: String,
    deliveries: Vec<Delivery>,
    now: Timestamp,
}

impl Claim {
    async fn send(&self, store: &dyn crate::store::CounterStore) -> Result<bool, StoreError> {
        store
            .alerts()
            .claim_alert(
                self.customer,
                &self.key,
                self.until,
                &self.body,
                &self.deliveries,
                self.now,
            )
            .await
    }
}

impl Claims {
    /// Sends `claim` again in the background until the store answers (backing off to 2 s).
    ///
    /// Why this is safe: a claim runs in one store step that claims its key only if no claim
    /// on it still holds, so a call that ran although its answer was lost makes the next one
    /// a no-op; the crossing fires once either way. Without it a crossing whose claim failed
    /// (the store stalled just then) would never fire: later decisions start over the
    /// threshold, so none crosses it again.
    fn retry_later(&self, store: &Arc<dyn crate::store::CounterStore>, claim: Claim) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.retrying.fetch_add(1, Ordering::AcqRel) >= MAX_CLAIMS_RETRYING {
            self.retrying.fetch_sub(1, Ordering::AcqRel);
            tracing::error!(
                key = claim.key,
                "too many alert claims waiting for the store; this one is dropped"
            );
            return;
        }
        let (store, retrying) = (Arc::clone(store), Arc::clone(&self.retrying));
        runtime.spawn(async move {
            let started = Instant::now();
            let mut wait = Duration::from_millis(50);
            loop {
                tokio::time::sleep(wait).await;
                match claim.send(store.as_ref()).await {
                    Ok(fired) => {
                        tracing::debug!(key = claim.key, fired, "alert claim sent again");
                        break;
                    }
                    Err(e) if started.elapsed() > CLAIM_PATIENCE => {
                        tracing::error!(key = claim.key, error = %e, "cannot claim an alert; given up");
                        break;
                    }
                    Err(_) => wait = (wait * 2).min(Duration::from_secs(2)),
                }
            }
            retrying.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Period claims a replica remembers; past this many it forgets them all (the store still
/// answers each claim once: a forgotten one costs one store call, never a second alert).
const MAX_CLAIMS_SEEN: usize = 100_000;

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
        Trigger::Percent(percent) => (THRESHOLD_CROSSED, TriggerData::Percent { percent }),
        Trigger::Absolute(absolute) => (THRESHOLD_CROSSED, TriggerData::Absolute { absolute }),
        Trigger::SoftLimit => (
            SOFT_LIMIT_EXCEEDED,
            TriggerData::SoftLimit { soft_limit: true },
        ),
    };
    let e = &c.entry;
    Envelope {
        kind,
        timestamp: rfc3339(now),
        data: ThresholdData {
            alert_id: format!("alert_{id}"),
            rule_id: c.rule.as_str(),
            customer_id: customer,
            entity_id: e.entity_id.as_str(),
            entity_type: e.entity_type.as_str(),
            limit_id: e.limit_id.as_str(),
            feature_id: e.feature_id.as_str(),
            limit_kind: e.kind,
            trigger,
            threshold: c.threshold,
            used: e.current_usage,
            limit: e.usage_limit,
            remaining: e.remaining,
            resets_at: e.reset_at.map(rfc3339),
        },
    }
    .text()
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
    let body = Envelope {
        kind: WEBHOOK_TEST,
        timestamp: rfc3339(now),
        data: TestData {
            customer_id: customer,
            webhook_id: webhook,
            test_id: format!("test_{id}"),
        },
    }
    .text();
    let d = new_delivery(&format!("test_{id}"), webhook, &body, now);
    engine
        .store()
        .alerts()
        .enqueue_deliveries(c.id, std::slice::from_ref(&d))
        .await?;
    Ok(Some(d.id))
}

/// The claim of `key` for rule `rule`: sent, it claims the key and, if that call claimed it,
/// puts `body` on the stream and in the outbox for the rule's webhooks, in one store step.
fn claim_of(
    engine: &Engine,
    c: &CustomerModel,
    rule: Name,
    key: &str,
    until: Option<i64>,
    id: &str,
    body: &str,
) -> Claim {
    let now = engine.now();
    let webhooks = c
        .alerts
        .iter()
        .find(|r| r.id == rule)
        .map(|r| r.webhooks.as_slice())
        .unwrap_or_default();
    let deliveries: Vec<Delivery> = webhooks
        .iter()
        .filter_map(|w| c.webhooks.get(*w))
        .map(|w| new_delivery(id, w.id.as_str(), body, now))
        .collect();
    Claim {
        customer: c.id,
        key: key.to_string(),
        until,
        body: body.to_string(),
        deliveries,
        now,
    }
}

/// Most entities one background pass projects per customer: a pass stays bounded whatever
/// the tree's size (the busiest ones by recent units come first).
const MAX_PROJECTED_PER_PASS: usize = 1_000;

/// The triggers that read recent usage rather than one decision: projected exhaustion and
/// denial bursts. Reads each customer's minute rollups once; run every minute by the server.
/// Returns how many alerts fired.
pub async fn background_pass(engine: &Engine) -> Result<usize, StoreError> {
    let model = engine.model();
    let now = engine.now();
    let mut fired = 0;
    for c in model.customers.values() {
        let rules: Vec<&AlertRule> = c
            .alerts
            .iter()
            .filter(|r| r.exhaustion_within.is_some() || r.denials.is_some())
            .collect();
        if rules.is_empty() {
            continue;
        }
        let longest = rules
            .iter()
            .filter_map(|r| r.denials.map(|d| d.1))
            .max()
            .unwrap_or(0)
            .max(crate::usage::BURN_WINDOW_MILLIS);
        let g = Granularity::Minute;
        let from = g.start(Timestamp::from_millis(now.millis() - longest));
        let rows = engine
            .store()
            .usage()
            .usage_buckets(
                c.id,
                g,
                from,
                now.millis() + g.millis(),
                &ScanNeeds::all(now.millis()),
            )
            .await?;
        for rule in rules {
            let (type_index, only) = match rule.target {
                LimitTarget::Entity(sym) => (
                    c.entities.get(&sym).map(|e| e.entity_type),
                    Some(model.symbols.resolve(sym)),
                ),
                LimitTarget::EntityType(t) => (Some(t), None),
            };
            let Some(key_name) = type_index.and_then(|t| model.chain_keys.get(t)) else {
                continue;
            };
            let feature = rule
                .feature
                .and_then(|f| model.features.get(f))
                .map(|f| f.id.to_string());
            let matches = |k: &SeriesKey| {
                feature.as_deref().is_none_or(|f| &*k.feature == f)
                    && only.is_none_or(|e| k.get(key_name.as_str()) == Some(e))
            };
            if let Some((count, within)) = rule.denials {
                // Whole minutes: the buckets that start within the window.
                let since = now.millis() - within;
                let mut by_entity: BTreeMap<&str, u64> = BTreeMap::new();
                for (start, k, m) in rows.rows() {
                    let limit_ok = rule
                        .limit
                        .is_none_or(|l| k.get(DENIED_BY) == Some(l.as_str()));
                    if start >= since
                        && m.denied > 0
                        && matches(k)
                        && limit_ok
                        && let Some(e) = k.get(key_name.as_str())
                    {
                        *by_entity.entry(e).or_default() += m.denied;
                    }
                }
                for (entity, n) in by_entity
                    .into_iter()
                    .filter(|(_, n)| *n >= u64::from(count))
                {
                    let window = now.millis().div_euclid(within);
                    let key = format!("{}\u{1f}{entity}\u{1f}denials\u{1f}{window}", rule.id);
                    let id = random_id();
                    let body = Envelope {
                        kind: DENIAL_BURST,
                        timestamp: rfc3339(now),
                        data: DenialBurstData {
                            alert_id: format!("alert_{id}"),
                            rule_id: rule.id.as_str(),
                            customer_id: c.id.as_str(),
                            entity_id: entity,
                            limit_id: rule.limit.map(|l| l.to_string()),
                            denied: n,
                            count,
                            within_seconds: within / 1000,
                        },
                    }
                    .text();
                    let until = Some((window + 1) * within);
                    fired += usize::from(
                        claim_of(engine, c, rule.id, &key, until, &id, &body)
                            .send(engine.store().as_ref())
                            .await?,
                    );
                }
            }
            if let Some(horizon) = rule.exhaustion_within {
                let mut spent: BTreeMap<&str, u64> = BTreeMap::new();
                for (_, k, m) in rows.rows() {
                    if m.units > 0
                        && matches(k)
                        && let Some(e) = k.get(key_name.as_str())
                    {
                        *spent.entry(e).or_default() += m.units;
                    }
                }
                let mut busiest: Vec<(&str, u64)> = spent.into_iter().collect();
                busiest.sort_by_key(|e| std::cmp::Reverse(e.1));
                for (entity, _) in busiest.into_iter().take(MAX_PROJECTED_PER_PASS) {
                    let budget = match crate::usage::budget(engine, c.id.as_str(), entity).await {
                        Ok(b) => b,
                        Err(crate::usage::UsageError::Store(e)) => return Err(e),
                        Err(_) => continue,
                    };
                    for l in budget.limits.iter().filter(|l| {
                        rule.limit.is_none_or(|x| x.as_str() == l.limit_id)
                            && feature.as_deref().is_none_or(|f| f == l.feature)
                    }) {
                        let Some(at) = l
                            .projected_exhaustion
                            .filter(|at| *at - now.millis() <= horizon)
                        else {
                            continue;
                        };
                        let key = format!(
                            "{}\u{1f}{entity}\u{1f}{}\u{1f}exhaustion\u{1f}{}",
                            rule.id,
                            l.limit_id,
                            l.resets_at
                                .map_or_else(|| "-".to_string(), |r| r.to_string())
                        );
                        let id = random_id();
                        let body = Envelope {
                            kind: EXHAUSTION_PROJECTED,
                            timestamp: rfc3339(now),
                            data: ExhaustionData {
                                alert_id: format!("alert_{id}"),
                                rule_id: rule.id.as_str(),
                                customer_id: c.id.as_str(),
                                entity_id: entity,
                                limit_id: &l.limit_id,
                                feature_id: &l.feature,
                                used: l.used,
                                limit: l.limit,
                                remaining: l.remaining,
                                projected_exhaustion: rfc3339(Timestamp::from_millis(at)),
                                resets_at: l.resets_at.map(|r| rfc3339(Timestamp::from_millis(r))),
                                recent_units: l.recent_units,
                            },
                        }
                        .text();
                        // Once per period; without one, once per horizon.
                        let until = l.resets_at.or(Some(now.millis() + horizon));
                        fired += usize::from(
                            claim_of(engine, c, rule.id, &key, until, &id, &body)
                                .send(engine.store().as_ref())
                                .await?,
                        );
                    }
                }
            }
        }
    }
    Ok(fired)
}

/// The thresholds an ingested event crossed: its usage is already counted, so the chain is
/// read with a dry run of the same request (no hold, no record), whose usage counted now
/// includes the event and whose `requested` is what the event added. Costs one store read per event, and only for
/// customers with alert rules. Concurrency limits are left out: an ingest holds no slot.
pub async fn after_ingest(
    engine: &Engine,
    claims: &Claims,
    req: &crate::engine::CheckRequest<'_>,
) -> Result<usize, StoreError> {
    let has_rules = engine.model().customer(req.customer).is_some_and(|c| {
        c.alerts
            .iter()
            .any(|r| !r.percent.is_empty() || !r.absolute.is_empty())
    });
    if !has_rules {
        return Ok(0);
    }
    let dry = crate::engine::CheckRequest {
        dry_run: true,
        ..*req
    };
    let mut d = match engine.check(&dry).await {
        Ok(d) => d,
        Err(crate::engine::DecisionError::Store(e)) => return Err(e),
        // The event was recorded; a request the model cannot plan has no chain to watch.
        Err(_) => return Ok(0),
    };
    // A dry run counts without this request: `current_usage` already holds the event, and
    // `requested` is what it added, so the crossing test reads before and after as for a
    // granted check.
    d.chain.retain(|e| e.kind != KindName::Concurrency);
    d.granted = true;
    d.dry_run = false;
    after_decision(engine, claims, req.customer, &d).await
}

/// Claims every threshold `decision` crossed and re-arms the claims this replica holds that
/// usage fell back under. Returns how many alerts fired. Alerts are a side effect of an
/// answered decision: the caller logs a failure, the decision stands.
/// Threshold crossings one decision claims at most (each is one store call and one event).
pub const MAX_CLAIMS_PER_DECISION: usize = 8;

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
    let mut claimed_now = 0;
    for x in &crossed {
        let seen = (customer.to_string(), x.key.clone());
        if x.until.is_some() && claims.claimed.contains(&seen) {
            continue;
        }
        // A per-decision budget: a crossing past it is claimed by one of the customer's next
        // decisions (usage stays over the threshold), so no single decision waits on many
        // store calls, and no burst of events comes from one call.
        if claimed_now == MAX_CLAIMS_PER_DECISION {
            break;
        }
        claimed_now += 1;
        let id = random_id();
        let body = body(customer, x, &id, now);
        let claim = claim_of(engine, c, x.rule, &x.key, x.until, &id, &body);
        match claim.send(store.as_ref()).await {
            Ok(f) => fired += usize::from(f),
            // Out of reach (it may even have run): sent again until the store answers.
            Err(StoreError::Unavailable(e)) => {
                tracing::warn!(customer, key = x.key, error = %e, "an alert claim failed; it is sent again in the background");
                claims.retry_later(store, claim);
            }
            Err(e) => return Err(e),
        }
        if x.until.is_none() {
            claims.held.insert(seen);
        } else {
            if claims.claimed.len() >= MAX_CLAIMS_SEEN {
                claims.claimed.clear();
            }
            claims.claimed.insert(seen);
        }
    }
    for r in rearm {
        if claims
            .held
            .remove(&(customer.to_string(), r.key.clone()))
            .is_some()
        {
            store.alerts().rearm_alert(c.id, &r.key).await?;
        }
    }
    Ok(fired)
}
