//! The HTTP/JSON API's request and response bodies (camelCase), with `From` conversions from
//! the domain types. The admin resources reuse the config document's DTOs.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::core::usage::{TokenCounts, Usage};
use crate::core::{ChainEntry, Decision, Timestamp};
use crate::service::IngestStatus;

fn time(t: Option<Timestamp>) -> Option<DateTime<Utc>> {
    t.and_then(|t| DateTime::from_timestamp_millis(t.millis()))
}

/// Token counts of one model call; they price credits precisely.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokensDto {
    #[serde(default)]
    pub input: u64,
    #[serde(default)]
    pub output: u64,
    #[serde(default)]
    pub cached: u64,
    /// Input written to the provider's prompt cache.
    #[serde(default)]
    pub cache_write: u64,
    /// Part of `output`: recorded, not priced apart.
    #[serde(default)]
    pub reasoning: u64,
}

pub fn usage(units: u64, tokens: Option<TokensDto>) -> Usage {
    Usage {
        units,
        tokens: tokens.map(|t| TokenCounts {
            input: t.input,
            output: t.output,
            cached: t.cached,
            cache_write: t.cache_write,
            reasoning: t.reasoning,
        }),
    }
}

/// `POST /v1/customers/{customerId}/entitlements/check`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CheckBody {
    pub feature_id: String,
    /// Units of the feature asked for (tokens, requests, credits...).
    pub requested_usage: u64,
    /// Request attributes such as `userId`, `teamId`, `model`.
    #[serde(default)]
    pub dimensions: HashMap<String, String>,
    /// Answer as a real check would and hold nothing.
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub tokens: Option<TokensDto>,
    /// The requested usage is final: a grant counts it at once and holds nothing (no hold id,
    /// nothing to settle). A feature's `commitAtCheck` does the same for every check.
    #[serde(default)]
    pub commit: bool,
}

/// One limit on one level of the chain, as it stood for this decision.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChainEntryDto {
    /// 0 is the leaf; the last level is the root.
    pub level: usize,
    pub entity_id: String,
    pub entity_type: String,
    pub limit_id: String,
    pub feature_id: String,
    /// `rate`, `quota`, `concurrency` or `credits`.
    pub kind: String,
    /// `enforce`, `soft` or `shadow`.
    pub mode: String,
    pub requested: u64,
    pub usage_limit: u64,
    pub current_usage: u64,
    pub remaining: u64,
    pub reset_at: Option<DateTime<Utc>>,
    pub exceeded: bool,
}

impl From<&ChainEntry> for ChainEntryDto {
    fn from(e: &ChainEntry) -> Self {
        Self {
            level: e.level,
            entity_id: e.entity_id.to_string(),
            entity_type: e.entity_type.to_string(),
            limit_id: e.limit_id.to_string(),
            feature_id: e.feature_id.to_string(),
            kind: e.kind.to_string(),
            mode: e.mode.as_str().to_string(),
            requested: e.requested,
            usage_limit: e.usage_limit,
            current_usage: e.current_usage,
            remaining: e.remaining,
            reset_at: time(e.reset_at),
            exceeded: e.exceeded,
        }
    }
}

/// The answer to a check. The top-level figures are those of the tightest enforcing limit
/// (the blocking one on a denial).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckResult {
    pub is_granted: bool,
    /// Settle or release it when the call is done. Absent when nothing was held.
    pub hold_id: Option<String>,
    pub access_denied_reason: Option<String>,
    pub usage_limit: Option<u64>,
    pub current_usage: Option<u64>,
    pub remaining: Option<u64>,
    pub reset_at: Option<DateTime<Utc>>,
    /// When the same request could pass, if known.
    pub retry_at: Option<DateTime<Utc>>,
    /// The blocking level, entity and limit of a denial.
    pub denied_by: Option<DeniedBy>,
    /// No limit applied: the request is allowed.
    pub no_matching_limit: bool,
    pub dry_run: bool,
    /// Soft or shadow limits exceeded without denying.
    pub would_deny: Vec<String>,
    pub chain: Vec<ChainEntryDto>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeniedBy {
    pub level: usize,
    pub entity_id: String,
    pub limit_id: String,
    pub kind: String,
}

impl From<&Decision> for CheckResult {
    fn from(d: &Decision) -> Self {
        let tight = d.tightest();
        Self {
            is_granted: d.granted,
            hold_id: d.hold_id.as_ref().map(ToString::to_string),
            access_denied_reason: d.denial.as_ref().map(|x| x.reason.clone()),
            usage_limit: tight.map(|e| e.usage_limit),
            current_usage: tight.map(|e| e.current_usage),
            remaining: tight.map(|e| e.remaining),
            reset_at: time(tight.and_then(|e| e.reset_at)),
            retry_at: time(d.denial.as_ref().and_then(|x| x.retry_at)),
            denied_by: d.denial.as_ref().map(|x| DeniedBy {
                level: x.level,
                entity_id: x.entity_id.to_string(),
                limit_id: x.limit_id.to_string(),
                kind: x.kind.to_string(),
            }),
            no_matching_limit: d.no_matching_limit,
            dry_run: d.dry_run,
            would_deny: d.would_deny().map(|e| e.limit_id.to_string()).collect(),
            chain: d.chain.iter().map(Into::into).collect(),
        }
    }
}

/// `POST /v1/holds/{holdId}/settle`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SettleBody {
    pub actual_usage: u64,
    #[serde(default)]
    pub tokens: Option<TokensDto>,
    /// A streamed call the caller ended for its client, or let finish, when its next slice
    /// was refused or could not be asked for: recorded on the settle record (`cutBy` or
    /// `finishedPast`).
    #[serde(default)]
    pub stream_end: Option<StreamEndDto>,
}

/// How a streamed call held in slices ended.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StreamEndDto {
    pub how: StreamEndHow,
    /// The id of the limit that refused the slice, or `sidecar-unreachable`; anything else is
    /// recorded as `__other__`.
    pub by: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum StreamEndHow {
    /// Ended for the client before the model's end.
    Cut,
    /// Let run to its declared output budget.
    FinishedPast,
}

impl<'a> From<&'a StreamEndDto> for crate::service::ReportedEnd<'a> {
    fn from(d: &'a StreamEndDto) -> Self {
        Self {
            cut: d.how == StreamEndHow::Cut,
            by: &d.by,
        }
    }
}

/// How a settle or release went.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloseResult {
    pub hold_id: String,
    /// False when the hold had already been settled, released or expired: nothing changed.
    pub closed: bool,
}

/// One usage event that was never gated.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UsageEventDto {
    /// Retries with the same key are recorded once.
    pub idempotency_key: String,
    pub customer_id: String,
    pub feature_id: String,
    pub usage: u64,
    #[serde(default)]
    pub dimensions: HashMap<String, String>,
    #[serde(default)]
    pub tokens: Option<TokensDto>,
}

/// `POST /v1/usage`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UsageBatch {
    pub events: Vec<UsageEventDto>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum UsageStatus {
    Recorded,
    Duplicate,
    Rejected,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageEventResult {
    pub idempotency_key: String,
    pub status: UsageStatus,
    pub error: Option<String>,
}

impl UsageEventResult {
    pub fn new(idempotency_key: String, status: IngestStatus) -> Self {
        let (status, error) = match status {
            IngestStatus::Recorded => (UsageStatus::Recorded, None),
            IngestStatus::Duplicate => (UsageStatus::Duplicate, None),
            IngestStatus::Rejected(m) => (UsageStatus::Rejected, Some(m)),
        };
        Self {
            idempotency_key,
            status,
            error,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageBatchResult {
    pub results: Vec<UsageEventResult>,
}

/// An error answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetail {
    /// A stable code such as `bad_request`, `unauthorized`, `forbidden`, `not_found`.
    pub code: String,
    pub message: String,
    /// Every problem, for a refused admin change.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
    /// The query parameter that was wrong, for a refused query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CustomerList {
    pub customers: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub status: String,
}

/// What one window (or one top-spenders row) adds up to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeasuresDto {
    /// Units of the feature (tokens, requests, credits...).
    pub units: u64,
    /// Token split, where the calls reported one.
    pub tokens: TokensDto,
    pub credits: u64,
    /// Calls recorded (settled, released, expired or ingested).
    pub requests: u64,
    /// Calls denied.
    pub denied: u64,
}

impl From<&crate::core::rollup::Measures> for MeasuresDto {
    fn from(m: &crate::core::rollup::Measures) -> Self {
        Self {
            units: m.units,
            tokens: TokensDto {
                input: m.input,
                output: m.output,
                cached: m.cached,
                cache_write: m.cache_write,
                reasoning: m.reasoning,
            },
            credits: m.credits,
            requests: m.requests,
            denied: m.denied,
        }
    }
}

fn ms_time(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// One window of a series.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsagePoint {
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    #[serde(flatten)]
    pub measures: MeasuresDto,
}

/// One series: its `groupBy` values (`null` where its records carry no such key) and a point
/// for every window of the range, zero where nothing was recorded.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageSeries {
    pub group_by: std::collections::BTreeMap<String, Option<String>>,
    pub points: Vec<UsagePoint>,
}

/// `GET /v1/customers/{customerId}/usage/history`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageHistory {
    /// The range covered: whole windows, from the window holding `from`.
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// `MINUTE`, `HOUR` or `DAY`.
    pub window_size: String,
    pub time_zone: String,
    pub series: Vec<UsageSeries>,
}

impl From<&crate::usage::History> for UsageHistory {
    fn from(h: &crate::usage::History) -> Self {
        Self {
            from: ms_time(h.from),
            to: ms_time(h.to),
            window_size: h.window.name().to_string(),
            time_zone: h.tz.name().to_string(),
            series: h
                .series
                .iter()
                .map(|s| UsageSeries {
                    group_by: s.group.iter().cloned().collect(),
                    points: s
                        .points
                        .iter()
                        .map(|(start, end, m)| UsagePoint {
                            window_start: ms_time(*start),
                            window_end: ms_time(*end),
                            measures: m.into(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// One row of the top spenders.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopSpender {
    /// The value of `by` (`null` for records without it).
    pub value: Option<String>,
    #[serde(flatten)]
    pub measures: MeasuresDto,
}

/// `GET /v1/customers/{customerId}/usage/top`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageTop {
    pub by: String,
    /// The range read, widened to whole buckets.
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub rows: Vec<TopSpender>,
}

impl From<&crate::usage::Top> for UsageTop {
    fn from(t: &crate::usage::Top) -> Self {
        Self {
            by: t.by.clone(),
            from: ms_time(t.from),
            to: ms_time(t.to),
            rows: t
                .rows
                .iter()
                .map(|r| TopSpender {
                    value: r.value.clone(),
                    measures: (&r.measures).into(),
                })
                .collect(),
        }
    }
}

/// One limit on an entity, as it stands.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitStateDto {
    pub limit_id: String,
    pub feature_id: String,
    pub kind: String,
    pub mode: String,
    /// Set on the entity's type rather than on the entity itself.
    pub inherited_from_type: bool,
    pub used: u64,
    /// `null` for credits, whose size is what was granted.
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    pub resets_at: Option<DateTime<Utc>>,
    /// When the remaining units run out at the recent burn rate, if before the reset.
    pub projected_exhaustion: Option<DateTime<Utc>>,
    /// Units spent in the burn-rate window (`recentSeconds` long).
    pub recent_units: u64,
    pub recent_seconds: i64,
}

/// `GET /v1/customers/{customerId}/entities/{entityId}/budget`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BudgetDto {
    pub entity_id: String,
    pub entity_type: String,
    pub at: DateTime<Utc>,
    pub limits: Vec<LimitStateDto>,
}

impl From<&crate::usage::Budget> for BudgetDto {
    fn from(b: &crate::usage::Budget) -> Self {
        Self {
            entity_id: b.entity.clone(),
            entity_type: b.entity_type.clone(),
            at: ms_time(b.at),
            limits: b
                .limits
                .iter()
                .map(|l| LimitStateDto {
                    limit_id: l.limit_id.clone(),
                    feature_id: l.feature.clone(),
                    kind: l.kind.to_string(),
                    mode: l.mode.to_string(),
                    inherited_from_type: l.inherited_from_type,
                    used: l.used,
                    limit: l.limit,
                    remaining: l.remaining,
                    resets_at: l.resets_at.map(ms_time),
                    projected_exhaustion: l.projected_exhaustion.map(ms_time),
                    recent_units: l.recent_units,
                    recent_seconds: l.recent_millis / 1000,
                })
                .collect(),
        }
    }
}

/// One usage record on the push stream (`event: usage`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageRecordEvent {
    /// The event's id: resume after it with `Last-Event-ID`.
    pub id: String,
    pub customer_id: String,
    /// `settled`, `released`, `expired`, `ingested` or `denied`.
    pub kind: String,
    pub at: DateTime<Utc>,
    pub feature_id: String,
    /// The entity chain (`<type>Id`) and the recorded dimensions; `deniedBy` on a denial;
    /// on a streamed call's settle, `cutBy` (ended for the client when the limit named refused
    /// its next slice, or `sidecar-unreachable`) or `finishedPast` (let run to its declared
    /// budget past that).
    pub attributes: std::collections::BTreeMap<String, String>,
    #[serde(flatten)]
    pub measures: MeasuresDto,
    /// The hold a settle, release or expiry closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_id: Option<String>,
    /// The ingested event's idempotency key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// For a denial: the chain level (0 is the leaf) of the limit that blocked it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_at_level: Option<usize>,
    /// For a denial: the units of the feature the call asked for (`units` is 0: nothing was
    /// spent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asked: Option<u64>,
}

impl UsageRecordEvent {
    pub fn new(id: &str, customer: &str, r: &crate::core::rollup::UsageRecord) -> Self {
        use crate::core::rollup::RecordRef;
        let asked = match &r.reference {
            RecordRef::Denial { asked, .. } => Some(*asked),
            _ => None,
        };
        let (hold_id, idempotency_key, denied_at_level) = match &r.reference {
            RecordRef::Hold { seq, tag } => (
                Some(
                    crate::core::HoldId {
                        customer: customer.to_string(),
                        seq: *seq,
                        tag: *tag,
                    }
                    .to_string(),
                ),
                None,
                None,
            ),
            RecordRef::Key(k) => (None, Some(k.to_string()), None),
            RecordRef::Level(l) | RecordRef::Denial { level: l, .. } => (None, None, Some(*l)),
        };
        Self {
            id: id.to_string(),
            customer_id: customer.to_string(),
            kind: r.kind.as_str().to_string(),
            at: ms_time(r.at.millis()),
            feature_id: r.series.feature.to_string(),
            attributes: r
                .series
                .attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            measures: (&r.measures).into(),
            hold_id,
            idempotency_key,
            denied_at_level,
            asked,
        }
    }
}

/// One webhook delivery and its attempts (`GET .../alerts/deliveries`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryDto {
    /// The `webhook-id` header: the same on every attempt.
    pub id: String,
    pub webhook_id: String,
    /// The payload's `type` (`limit.threshold_crossed`, `webhook.test`...).
    pub event_type: String,
    pub created_at: DateTime<Utc>,
    /// `delivered`, `pending` (an attempt is due at `nextAttemptAt`) or `failed` (the retry
    /// schedule is used up).
    pub status: String,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub attempts: Vec<AttemptDto>,
    /// The JSON body sent.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttemptDto {
    pub at: DateTime<Utc>,
    /// The receiver's HTTP status, if it answered.
    pub status: Option<u16>,
    pub error: Option<String>,
}

impl From<&crate::core::alerts::Delivery> for DeliveryDto {
    fn from(d: &crate::core::alerts::Delivery) -> Self {
        let payload: serde_json::Value =
            serde_json::from_str(&d.body).unwrap_or(serde_json::Value::Null);
        Self {
            id: d.id.clone(),
            webhook_id: d.webhook.clone(),
            event_type: payload["type"].as_str().unwrap_or_default().to_string(),
            created_at: ms_time(d.created),
            status: match (d.delivered, d.next_at) {
                (true, _) => "delivered",
                (false, Some(_)) => "pending",
                (false, None) => "failed",
            }
            .to_string(),
            next_attempt_at: d.next_at.map(ms_time),
            attempts: d
                .attempts
                .iter()
                .map(|a| AttemptDto {
                    at: ms_time(a.at),
                    status: a.status,
                    error: a.error.clone(),
                })
                .collect(),
            payload,
        }
    }
}

/// `GET /v1/customers/{customerId}/alerts/deliveries`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryLog {
    pub deliveries: Vec<DeliveryDto>,
}

/// `POST /v1/customers/{customerId}/webhooks/{webhookId}/test`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TestDelivery {
    pub delivery_id: String,
}

/// A webhook as read back: its address and how many secrets sign its calls, never the
/// secrets themselves.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookView {
    pub id: String,
    pub url: String,
    /// 2 while a rotation is under way (the new and the previous secret both sign).
    pub secrets: usize,
}

impl From<&crate::config::dto::WebhookDto> for WebhookView {
    fn from(w: &crate::config::dto::WebhookDto) -> Self {
        Self {
            id: w.id.clone(),
            url: w.url.clone(),
            secrets: w.secrets.len(),
        }
    }
}

/// A new webhook: its id and address; the server makes its secret.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewWebhookDto {
    pub id: String,
    pub url: String,
}

/// A webhook's new signing secret, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSecretDto {
    pub id: String,
    pub url: String,
    pub secret: String,
}

/// One change in the audit log.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditEntryDto {
    pub at: Option<DateTime<Utc>>,
    /// `operator`, or `<customer>:<role>` for a customer's key.
    pub by: String,
    /// `create`, `update` or `delete`.
    pub action: String,
    /// `limit`, `alert`, `webhook`, `customer`, `entity`, `grant` or `prices`.
    pub kind: String,
    pub id: String,
    pub customer: Option<String>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
}

impl From<&crate::catalog::Logged> for AuditEntryDto {
    fn from(l: &crate::catalog::Logged) -> Self {
        let (kind, id) = l.op.target();
        Self {
            at: (l.at > 0)
                .then(|| DateTime::from_timestamp_millis(l.at))
                .flatten(),
            by: l.by.clone(),
            action: l.op.action().to_string(),
            kind: kind.to_string(),
            id: id.to_string(),
            customer: l.op.customer().map(str::to_string),
            before: l.before.clone(),
            after: l.after.clone(),
        }
    }
}

/// Audit entries, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditLog {
    pub entries: Vec<AuditEntryDto>,
}

/// A customer-made API key as read back: never the key or its digest.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyView {
    pub id: String,
    pub role: String,
    pub label: Option<String>,
}

impl From<&crate::config::dto::CustomerKeyDto> for ApiKeyView {
    fn from(k: &crate::config::dto::CustomerKeyDto) -> Self {
        Self {
            id: k.id.clone(),
            role: k.role.as_str().to_string(),
            label: k.label.clone(),
        }
    }
}

/// A new API key: its role and what it is for.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewApiKeyDto {
    /// `app`, `viewer` or `admin`.
    #[schema(value_type = String)]
    pub role: crate::auth::Role,
    #[serde(default)]
    pub label: Option<String>,
}

/// A new API key, shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeySecretDto {
    pub id: String,
    pub role: String,
    pub label: Option<String>,
    /// `<id>.<secret>`: send it as `authorization: Bearer <key>`.
    pub key: String,
}

/// An object admin changes hold over the config file (`GET .../overrides`): while they stand,
/// they win over the file's version, including edits made to the file later.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OverrideDto {
    /// `limit`, `entity`, `alert` or `webhook`.
    pub kind: String,
    pub id: String,
    /// The file's version; `null` when a change added it.
    #[schema(value_type = Object)]
    pub file: Option<serde_json::Value>,
    /// The version in force; `null` when a change deleted it.
    #[schema(value_type = Object)]
    pub in_force: Option<serde_json::Value>,
    /// How many admin changes made it what it is.
    pub changes: usize,
    pub last_changed_by: String,
    pub last_changed_at: DateTime<Utc>,
}

impl From<&crate::catalog::Override> for OverrideDto {
    fn from(o: &crate::catalog::Override) -> Self {
        Self {
            kind: o.kind.to_string(),
            id: o.id.clone(),
            file: o.file.clone(),
            in_force: o.in_force.clone(),
            changes: o.changes,
            last_changed_by: o.last_by.clone(),
            last_changed_at: ms_time(o.last_at),
        }
    }
}

/// Money for `credits` at the operator's `currency`: a decimal with two places, rounded half
/// up from exact millionths.
pub fn money(currency: Option<&crate::core::model::Currency>, credits: u64) -> Option<String> {
    let micros = currency?.micros(credits);
    let cents = (micros + 5_000) / 10_000;
    Some(format!("{}.{:02}", cents / 100, cents % 100))
}

/// One period's figures (`GET .../usage/spend`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpendFigures {
    /// Credits: charged, or the calls' tokens priced with the price table in force then.
    pub credits: u64,
    /// The credits in the operator's currency (`currency`), when one is set.
    pub amount: Option<String>,
    /// Units of the feature (summed across features unless `featureId` names one).
    pub units: u64,
    pub requests: u64,
    pub denied: u64,
}

/// Credits in one window of the period.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpendPoint {
    pub window_start: DateTime<Utc>,
    pub credits: u64,
    pub amount: Option<String>,
}

/// One value of the key, this period and the one before.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpendRowDto {
    /// `null` for records without the key.
    pub value: Option<String>,
    #[serde(flatten)]
    pub figures: SpendFigures,
    pub previous_credits: u64,
    /// Credits over the previous period's, minus one (`0.25` is 25 % more); `null` when the
    /// previous period spent nothing.
    pub change: Option<f64>,
}

/// Denials of the period by the limit that refused them.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DenialCount {
    pub limit_id: Option<String>,
    pub denied: u64,
}

/// `GET /v1/customers/{id}/usage/spend`: the last day, week or month against the one before.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SpendDto {
    pub by: String,
    pub days: u32,
    pub window_size: String,
    pub previous_from: DateTime<Utc>,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The ISO 4217 code of every `amount`; `null` (and no amounts) when the operator set none.
    pub currency: Option<String>,
    pub total: SpendFigures,
    pub previous: SpendFigures,
    pub change: Option<f64>,
    pub points: Vec<SpendPoint>,
    /// The values that spent the most credits (then units) first, at most `limit`.
    pub rows: Vec<SpendRowDto>,
    /// The values whose credits moved the most against the previous period, up or down.
    pub movers: Vec<SpendRowDto>,
    pub denials: Vec<DenialCount>,
}

fn change(now: u64, before: u64) -> Option<f64> {
    // Precision is not at stake in a ratio shown as a percentage.
    #[allow(clippy::cast_precision_loss)]
    (before > 0).then(|| now as f64 / before as f64 - 1.0)
}

impl SpendDto {
    /// The answer for `s`, with at most `limit` rows and `movers` movers.
    pub fn new(s: &crate::usage::Spend, limit: usize, movers: usize) -> Self {
        let cur = s.currency.as_ref();
        let figures = |m: &crate::core::rollup::Measures, credits: u64| SpendFigures {
            credits,
            amount: money(cur, credits),
            units: m.units,
            requests: m.requests,
            denied: m.denied,
        };
        let row = |r: &crate::core::usage_query::SpendRow| SpendRowDto {
            value: r.value.clone(),
            figures: figures(&r.measures, r.credits),
            previous_credits: r.previous_credits,
            change: change(r.credits, r.previous_credits),
        };
        let r = &s.report;
        let mut moved: Vec<&crate::core::usage_query::SpendRow> = r
            .rows
            .iter()
            .filter(|x| x.credits != x.previous_credits)
            .collect();
        moved.sort_by(|a, b| {
            b.credits
                .abs_diff(b.previous_credits)
                .cmp(&a.credits.abs_diff(a.previous_credits))
                .then(a.value.cmp(&b.value))
        });
        Self {
            by: s.by.clone(),
            days: s.days,
            window_size: s.window.name().to_string(),
            previous_from: ms_time(s.previous_from),
            from: ms_time(s.from),
            to: ms_time(s.to),
            currency: cur.map(|c| c.code.clone()),
            total: figures(&r.measures, r.credits),
            previous: figures(&r.previous, r.previous_credits),
            change: change(r.credits, r.previous_credits),
            points: r
                .points
                .iter()
                .map(|(at, credits)| SpendPoint {
                    window_start: ms_time(*at),
                    credits: *credits,
                    amount: money(cur, *credits),
                })
                .collect(),
            rows: r.rows.iter().take(limit).map(row).collect(),
            movers: moved.into_iter().take(movers).map(row).collect(),
            denials: r
                .denials
                .iter()
                .map(|(l, n)| DenialCount {
                    limit_id: l.clone(),
                    denied: *n,
                })
                .collect(),
        }
    }
}
