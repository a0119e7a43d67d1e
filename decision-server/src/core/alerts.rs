//! Alert thresholds: which of a customer's rules a decision's chain crossed (pure), and the
//! key that makes each crossing fire once per limit period.

use rustc_hash::{FxHashMap, FxHashSet};

use super::decision::ChainEntry;
use super::model::{AlertRule, CustomerModel, KindName, LimitTarget, Mode, Model};
use super::{Name, Timestamp};

/// What a rule watches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Percent(u32),
    Absolute(u64),
    SoftLimit,
}

impl Trigger {
    fn tag(self) -> String {
        match self {
            Trigger::Percent(p) => format!("p{p}"),
            Trigger::Absolute(a) => format!("a{a}"),
            Trigger::SoftLimit => "soft".into(),
        }
    }
}

/// A threshold one decision crossed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub rule: Name,
    pub trigger: Trigger,
    /// The usage amount the trigger stands for.
    pub threshold: u64,
    pub entry: ChainEntry,
    /// Fires once per this key: the rule, entity, limit, trigger and, for a limit with
    /// periods, the period's end.
    pub key: String,
    /// When the claim lapses (the period's end), or `None`: until usage falls back under the
    /// threshold by the hysteresis margin.
    pub until: Option<i64>,
}

/// A claim to drop: usage fell far enough under its threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rearm {
    pub key: String,
}

fn applies(model: &Model, rule: &AlertRule, e: &ChainEntry) -> bool {
    let target = match rule.target {
        LimitTarget::Entity(sym) => model.symbols.get(e.entity_id.as_str()) == Some(sym),
        LimitTarget::EntityType(t) => model
            .entity_types
            .get(t)
            .is_some_and(|et| et.name == e.entity_type.as_str()),
    };
    let limit = match (&rule.limit, rule.feature) {
        (Some(l), _) => *l == e.limit_id,
        (None, Some(f)) => model.feature(e.feature_id.as_str()) == Some(f),
        (None, None) => false,
    };
    target && limit
}

/// `percent` of `limit`, rounded up: the least usage at or over the percentage.
fn percent_of(limit: u64, percent: u32) -> u64 {
    let v = (u128::from(limit) * u128::from(percent)).div_ceil(100);
    u64::try_from(v).unwrap_or(u64::MAX)
}

fn key(rule: &AlertRule, e: &ChainEntry, trigger: Trigger, until: Option<i64>) -> String {
    // The unit separator cannot appear in a config id.
    format!(
        "{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
        rule.id,
        e.entity_id,
        e.limit_id,
        trigger.tag(),
        until.map_or_else(|| "-".to_string(), |u| u.to_string())
    )
}

/// The thresholds `chain` (a granted decision's, usage counted after its hold) crossed, and
/// the claims of limits without periods that usage has fallen back under.
///
/// A quota's threshold is crossed when the usage is at or over it: its claim lasts the
/// period, so it fires once whichever decision (on whichever replica) first reads it there,
/// even when a replica's reading jumps past it between decisions (escrow leases, where a
/// slice placement brings in what other replicas spent). Other kinds cross when the usage
/// before this decision was under the threshold and is at or over it now. Credits are not
/// watched: their size is what was granted, not a limit.
pub fn evaluate(
    model: &Model,
    customer: &CustomerModel,
    chain: &[ChainEntry],
) -> (Vec<Crossing>, Vec<Rearm>) {
    let mut crossed = Vec::new();
    let mut rearm = Vec::new();
    if customer.alerts.is_empty() {
        return (crossed, rearm);
    }
    for e in chain.iter().filter(|e| e.kind != KindName::Credits) {
        let after = e.current_usage;
        let before = after.saturating_sub(e.requested);
        // A quota's claim lasts its period; other kinds re-arm by hysteresis.
        let until = (e.kind == KindName::Quota)
            .then(|| e.reset_at.map(Timestamp::millis))
            .flatten();
        for rule in customer.alerts.iter().filter(|r| applies(model, r, e)) {
            let thresholds = rule
                .percent
                .iter()
                .map(|p| (Trigger::Percent(*p), percent_of(e.usage_limit, *p)))
                .chain(rule.absolute.iter().map(|a| (Trigger::Absolute(*a), *a)));
            for (trigger, t) in thresholds {
                // The claim key is made only for a threshold that crossed or re-arms: most of
                // a rule's thresholds do neither on a given decision, and a decision must not
                // pay for each of them.
                let crossed_now = if until.is_some() {
                    t <= after
                } else {
                    before < t && t <= after
                };
                if crossed_now {
                    crossed.push(Crossing {
                        rule: rule.id,
                        trigger,
                        threshold: t,
                        entry: e.clone(),
                        key: key(rule, e, trigger, until),
                        until,
                    });
                } else if until.is_none() {
                    let margin = u128::from(t) * u128::from(model.alert_hysteresis_percent) / 100;
                    if u128::from(after) + margin < u128::from(t) {
                        rearm.push(Rearm {
                            key: key(rule, e, trigger, until),
                        });
                    }
                }
            }
            if rule.soft_limit && e.mode == Mode::Soft && e.exceeded {
                let trigger = Trigger::SoftLimit;
                crossed.push(Crossing {
                    rule: rule.id,
                    trigger,
                    threshold: e.usage_limit,
                    entry: e.clone(),
                    key: key(rule, e, trigger, until),
                    until,
                });
            }
        }
    }
    (crossed, rearm)
}

/// One customer's alert claims and webhook outbox: the part of its ledger alerts own, with
/// what changed since it was last taken (for a persisting store).
#[derive(Debug, Default, Clone)]
pub struct AlertBook {
    /// Thresholds claimed: key → until when (ms; `None`: until re-armed).
    claims: FxHashMap<Box<str>, Option<i64>>,
    /// Webhook deliveries: the outbox (those with `next_at`) and the log, by id.
    deliveries: FxHashMap<Box<str>, Delivery>,
    /// Leased deliveries not finished yet, by id: their lessee (not persisted: a lessee is a
    /// running process, and its leases end on their own).
    leased: FxHashMap<Box<str>, Box<str>>,
    /// Claim keys and delivery ids changed since the last take; `None` unless tracked.
    dirty: Option<Box<AlertDirty>>,
}

#[derive(Debug, Default, Clone)]
struct AlertDirty {
    claims: FxHashSet<Box<str>>,
    deliveries: FxHashSet<Box<str>>,
}

/// Claims made (`Some(until)`) or dropped (`None`), and deliveries added or changed (`Some`)
/// or dropped from the log (`None`).
pub type AlertChanges = (
    Vec<(Box<str>, Option<Option<i64>>)>,
    Vec<(Box<str>, Option<Delivery>)>,
);

impl AlertBook {
    /// An empty book that records its changes for [`AlertBook::take_changes`].
    pub fn tracked() -> Self {
        Self {
            dirty: Some(Box::default()),
            ..Self::default()
        }
    }

    /// Claims threshold `key` until `until`, and queues its `deliveries`, unless the key is
    /// claimed already and its claim still holds at `now`. Whether this call claimed it.
    pub fn claim(
        &mut self,
        key: &str,
        until: Option<i64>,
        deliveries: Vec<Delivery>,
        now: Timestamp,
    ) -> bool {
        if let Some(held) = self.claims.get(key)
            && held.is_none_or(|u| u > now.millis())
        {
            return false;
        }
        self.enqueue(deliveries);
        self.claims.insert(key.into(), until);
        self.touch_claim(key);
        true
    }

    /// Re-arms threshold `key`; whether it was claimed.
    pub fn rearm(&mut self, key: &str) -> bool {
        let was = self.claims.remove(key).is_some();
        if was {
            self.touch_claim(key);
        }
        was
    }

    /// Puts back claims a persisting store kept.
    pub fn restore_claims(&mut self, claims: impl IntoIterator<Item = (Box<str>, Option<i64>)>) {
        self.claims.extend(claims);
    }

    /// What changed since the last call (empty for an untracked book).
    pub fn take_changes(&mut self) -> AlertChanges {
        let Some(dirty) = self.dirty.as_mut() else {
            return AlertChanges::default();
        };
        let d = std::mem::take(dirty.as_mut());
        (
            d.claims
                .into_iter()
                .map(|k| {
                    let v = self.claims.get(&k).copied();
                    (k, v)
                })
                .collect(),
            d.deliveries
                .into_iter()
                .map(|k| {
                    let v = self.deliveries.get(&k).cloned();
                    (k, v)
                })
                .collect(),
        )
    }

    /// Whether a tracked book has changes not yet taken.
    pub fn has_changes(&self) -> bool {
        self.dirty
            .as_ref()
            .is_some_and(|d| !(d.claims.is_empty() && d.deliveries.is_empty()))
    }

    fn touch_delivery(&mut self, id: &str) {
        if let Some(d) = self.dirty.as_mut() {
            d.deliveries.insert(id.into());
        }
    }

    fn touch_claim(&mut self, key: &str) {
        if let Some(d) = self.dirty.as_mut() {
            d.claims.insert(key.into());
        }
    }

    /// Adds deliveries to the outbox; the log keeps the newest [`MAX_DELIVERIES_KEPT`],
    /// dropping finished ones first.
    pub fn enqueue(&mut self, new: Vec<Delivery>) {
        for d in new {
            self.touch_delivery(&d.id);
            self.deliveries.insert(d.id.as_str().into(), d);
        }
        let over = self.deliveries.len().saturating_sub(MAX_DELIVERIES_KEPT);
        if over > 0 {
            let mut finished: Vec<(i64, Box<str>)> = self
                .deliveries
                .iter()
                .filter(|(_, d)| d.next_at.is_none())
                .map(|(k, d)| (d.created, k.clone()))
                .collect();
            finished.sort();
            for (_, k) in finished.into_iter().take(over) {
                self.deliveries.remove(&k);
                self.leased.remove(&k);
                self.touch_delivery(&k);
            }
        }
    }

    /// Up to `max` deliveries for `lessee` at `now`, each leased until `now + lease_ms` (its
    /// next attempt moved there, so no other lessee takes it meanwhile): first those `lessee`
    /// leased and has not finished (a lease whose answer it never heard, on a networked
    /// store; a lessee runs one pass per customer at a time, so none of them is being sent),
    /// then those due, oldest due first.
    pub fn lease(
        &mut self,
        lessee: &str,
        now: Timestamp,
        lease_ms: i64,
        max: usize,
    ) -> Vec<Delivery> {
        let mut mine: Vec<Box<str>> = self
            .leased
            .iter()
            .filter(|(_, by)| by.as_ref() == lessee)
            .map(|(id, _)| id.clone())
            .collect();
        // As Redis returns a set's members: in no order that matters; sorted here for one.
        mine.sort();
        let mut ids: Vec<Box<str>> = Vec::new();
        for id in mine {
            let open = self
                .deliveries
                .get(&id)
                .is_some_and(|d| d.next_at.is_some());
            if open && ids.len() < max {
                ids.push(id);
            } else {
                self.leased.remove(&id);
            }
        }
        let mut due: Vec<(i64, Box<str>)> = self
            .deliveries
            .iter()
            .filter(|(k, _)| !ids.contains(k))
            .filter_map(|(k, d)| {
                d.next_at
                    .filter(|at| *at <= now.millis())
                    .map(|at| (at, k.clone()))
            })
            .collect();
        due.sort();
        ids.extend(due.into_iter().map(|(_, k)| k).take(max - ids.len()));
        let mut out = Vec::new();
        for k in ids {
            if let Some(d) = self.deliveries.get_mut(&k) {
                d.next_at = Some(now.millis() + lease_ms);
                out.push(d.clone());
            }
            self.leased.insert(k.clone(), lessee.into());
            self.touch_delivery(&k);
        }
        out
    }

    /// Replaces a delivery after an attempt (its attempts, next time, delivered).
    pub fn finish(&mut self, d: Delivery) {
        self.leased.remove(d.id.as_str());
        if self.deliveries.contains_key(d.id.as_str()) {
            self.touch_delivery(&d.id);
            self.deliveries.insert(d.id.as_str().into(), d);
        }
    }

    /// Up to `max` deliveries, newest first.
    pub fn deliveries(&self, max: usize) -> Vec<Delivery> {
        let mut all: Vec<&Delivery> = self.deliveries.values().collect();
        all.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
        all.into_iter().take(max).cloned().collect()
    }

    /// Puts back deliveries a persisting store kept.
    pub fn restore_deliveries(&mut self, rows: impl IntoIterator<Item = Delivery>) {
        self.deliveries
            .extend(rows.into_iter().map(|d| (d.id.as_str().into(), d)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_thresholds_round_up() {
        assert_eq!(percent_of(1000, 80), 800);
        assert_eq!(percent_of(999, 50), 500);
        assert_eq!(percent_of(u64::MAX, 1000), u64::MAX);
    }
}

/// One webhook call to make (an alert, or a test), and what became of it: the outbox row and
/// the delivery log entry at once.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    /// The `webhook-id`: the same on every attempt, so receivers can drop repeats.
    pub id: String,
    pub webhook: String,
    /// The JSON body sent.
    pub body: String,
    pub created: i64,
    /// When the next attempt is due; `None` once delivered or given up.
    pub next_at: Option<i64>,
    pub delivered: bool,
    pub attempts: Vec<Attempt>,
}

/// One attempt to deliver.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attempt {
    pub at: i64,
    /// The receiver's HTTP status, if it answered.
    pub status: Option<u16>,
    /// Why the attempt failed, when it did.
    pub error: Option<String>,
}

/// Most deliveries one customer's log keeps; the oldest finished ones go first.
pub const MAX_DELIVERIES_KEPT: usize = 1_000;

/// When the attempt after `attempts` is due, by `schedule` (delays after the first attempt;
/// the first is due at once): `None` when the schedule is used up.
pub fn next_attempt(schedule: &[i64], attempts: usize, now: i64) -> Option<i64> {
    schedule.get(attempts.checked_sub(1)?).map(|d| now + d)
}
