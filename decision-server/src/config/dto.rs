//! The YAML document's shape: serde DTOs, kept apart from the domain model they convert into.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigDoc {
    /// ISO-8601 duration; how long a hold lives unsettled. Default `PT5M`.
    #[serde(default)]
    pub hold_ttl: Option<String>,
    pub entity_types: Vec<EntityTypeDto>,
    #[serde(default)]
    pub attribution: Vec<AttributionDto>,
    pub features: Vec<FeatureDto>,
    #[serde(default)]
    pub prices: Vec<PriceTableDto>,
    #[serde(default)]
    pub customers: Vec<CustomerDto>,
    /// Usage records: which dimensions they keep, and how long their rollups are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_records: Option<UsageRecordsDto>,
    /// How alerts re-arm and are delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerting: Option<AlertingDto>,
    /// What one credit is worth in money, for the portal and the spend API. Unset: spend is
    /// shown in credits only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<CurrencyDto>,
    /// Listeners, storage, credentials, the ext_authz mapping and logging (`tollgate serve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub server: Option<super::server::ServerDto>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntityTypeDto {
    pub name: String,
    #[serde(default)]
    pub parents: Vec<String>,
    #[serde(default)]
    pub dimensional: bool,
    #[serde(default)]
    pub dimension: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum OnUnknownDto {
    #[default]
    Reject,
    Create,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttributionDto {
    pub dimension: String,
    pub entity_type: String,
    #[serde(default)]
    pub on_unknown: OnUnknownDto,
    /// Refuse (400) a request that does not carry this dimension, instead of charging it to
    /// the levels above alone: set it where limits on this level must never be skipped (a
    /// token without `sub`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum PerDto {
    Request,
    Price,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AlsoDrawDto {
    pub feature: String,
    pub per: PerDto,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FeatureDto {
    pub id: String,
    #[serde(default)]
    pub also_draws: Vec<AlsoDrawDto>,
    /// The most usage one settlement may report, in the feature's units. Unset: ten times
    /// the requested usage of the hold being settled. A larger settlement is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_settle_usage: Option<u64>,
    /// Every check's requested usage is final (a request count, a fixed cost, a route whose
    /// holds nobody settles): a grant counts it at once and places no hold, so there is
    /// nothing to settle, release or expire. Default false: a grant holds until settled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub commit_at_check: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelPriceDto {
    #[serde(rename = "match")]
    pub pattern: String,
    pub input_per_million: u64,
    pub output_per_million: u64,
    #[serde(default)]
    pub cached_per_million: u64,
    /// Price of input written to the prompt cache; unset, the input price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_per_million: Option<u64>,
    /// The model's context window in tokens (input and output together). With `maxOutput`,
    /// it sets how much one settlement of a call to this model may report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<u64>,
    /// The most output tokens one call to this model can produce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PriceTableDto {
    pub version: String,
    pub effective_from: DateTime<Utc>,
    pub models: Vec<ModelPriceDto>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EntityDto {
    pub id: String,
    #[serde(rename = "type")]
    pub entity_type: String,
    #[serde(default)]
    pub parent: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum KindDto {
    Rate,
    Quota,
    Concurrency,
    Credits,
}

impl KindDto {
    pub fn as_str(self) -> &'static str {
        match self {
            KindDto::Rate => "rate",
            KindDto::Quota => "quota",
            KindDto::Concurrency => "concurrency",
            KindDto::Credits => "credits",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum ModeDto {
    #[default]
    Enforce,
    Soft,
    Shadow,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitDto {
    pub id: String,
    #[serde(default)]
    pub entity: Option<String>,
    #[serde(default)]
    pub entity_type: Option<String>,
    pub feature: String,
    pub kind: KindDto,
    #[serde(default)]
    pub limit: Option<u64>,
    #[serde(default)]
    pub window: Option<String>,
    #[serde(default)]
    pub period: Option<String>,
    #[serde(default)]
    pub anchor: Option<DateTime<Utc>>,
    #[serde(default)]
    pub pool_by: Option<String>,
    #[serde(default)]
    pub scope: BTreeMap<String, String>,
    #[serde(default)]
    pub mode: ModeDto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum CategoryDto {
    Paid,
    Promo,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrantDto {
    pub id: String,
    pub entity: String,
    pub feature: String,
    #[serde(default)]
    pub pool: Option<String>,
    pub amount: u64,
    #[serde(default)]
    pub priority: u32,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    pub category: CategoryDto,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomerDto {
    pub id: String,
    #[serde(default)]
    pub max_auto_entities: Option<u32>,
    #[serde(default)]
    pub entities: Vec<EntityDto>,
    #[serde(default)]
    pub auto_create_parents: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: Vec<LimitDto>,
    #[serde(default)]
    pub grants: Vec<GrantDto>,
    /// Where alerts are delivered besides the usage stream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<WebhookDto>,
    /// Threshold alerts on the customer's limits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<AlertRuleDto>,
    /// What the customer bought: no limit of the customer may be set above a ceiling that
    /// matches it (same feature, kind, period and window), by anyone. The customer's admins
    /// split and lower budgets under these; only the operator changes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ceilings: Vec<CeilingDto>,
    /// API keys the customer's admins made for their own people and applications (the
    /// server's `credentials.apiKeys` are the operator's): digests only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<CustomerKeyDto>,
}

/// A customer-made API key: its public id, the SHA-256 of the whole key, and its role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CustomerKeyDto {
    pub id: String,
    pub sha256: String,
    /// `app`, `viewer` or `admin`.
    #[schema(value_type = String)]
    pub role: crate::auth::Role,
    /// What it is for, as its maker wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// A ceiling: the most any matching limit of the customer may allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CeilingDto {
    pub feature: String,
    pub kind: KindDto,
    /// The `period` of the limits it covers (quota), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period: Option<String>,
    /// The `window` of the limits it covers (rate), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    pub max: u64,
}

impl CeilingDto {
    /// Whether this ceiling covers `limit`.
    pub fn covers(&self, limit: &LimitDto) -> bool {
        self.feature == limit.feature
            && self.kind == limit.kind
            && self.period == limit.period
            && self.window == limit.window
    }

    /// `ai-tokens quota P1D`, for messages.
    pub fn describe(&self) -> String {
        let mut out = format!("{} {}", self.feature, self.kind.as_str());
        for p in [&self.period, &self.window].into_iter().flatten() {
            out.push(' ');
            out.push_str(p);
        }
        out
    }
}

/// A webhook endpoint, signed per the Standard Webhooks spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookDto {
    pub id: String,
    /// `https://` (or `http://` for a receiver on loopback).
    pub url: String,
    /// `whsec_<base64>` secrets; every one signs each call (one `v1,` signature each), so a
    /// rotation adds the new secret, waits for receivers to switch, then drops the old one.
    pub secrets: Vec<String>,
}

/// An alert rule: which limits it watches and when it fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AlertRuleDto {
    pub id: String,
    /// One entity, or every entity of `entityType`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity_type: Option<String>,
    /// One limit, or every limit of `feature` on the entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    /// Percentages of the limit (for example `[50, 80, 100]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub percent: Vec<u32>,
    /// Absolute amounts of usage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub absolute: Vec<u64>,
    /// Fire when a `soft` limit is exceeded.
    #[serde(default)]
    pub soft_limit: bool,
    /// Fire when the remaining units run out within this ISO-8601 duration at the last 15
    /// minutes' burn rate (checked every minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exhaustion_within: Option<String>,
    /// Fire when the entity's requests were denied at least `count` times `within` a
    /// duration (checked every minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denials: Option<DenialBurstDto>,
    /// Webhook ids to deliver to; every alert is also on the usage stream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<String>,
}

/// A denial burst: `count` denials within `within` (ISO-8601, at most the minute buckets'
/// retention).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DenialBurstDto {
    pub count: u32,
    pub within: String,
}

/// `usageRecords`: attribution of every unit to its entity chain and dimensions.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UsageRecordsDto {
    /// Default true. Off: no records, rollups or usage stream.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Request dimensions recorded besides the ones the model reads (`model`, dimensional
    /// types, attribution), for example `endpoint` or `region`.
    #[serde(default)]
    pub dimensions: Vec<String>,
    /// ISO-8601 durations; defaults `PT48H`, `P90D`, `P730D`.
    #[serde(default)]
    pub retention: RetentionDto,
    /// Distinct values of one dimension kept per customer before more fold into
    /// `__other__`. Default 1000.
    #[serde(default)]
    pub max_values_per_dimension: Option<usize>,
    /// The most points (windows × series) one history query returns; a query over it gets a
    /// 400. Default 10000.
    #[serde(default)]
    pub max_query_points: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetentionDto {
    #[serde(default)]
    pub minute: Option<String>,
    #[serde(default)]
    pub hour: Option<String>,
    #[serde(default)]
    pub day: Option<String>,
}

/// `currency`: what one credit (the unit prices are given in) is worth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CurrencyDto {
    /// ISO 4217 code: `USD`, `EUR`.
    pub code: String,
    /// What one credit is worth in that currency (at most six decimals): `0.01` when prices
    /// are in cents.
    pub per_credit: f64,
}

/// `alerting`: how alerts re-arm and how webhooks are retried.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AlertingDto {
    /// A threshold on a limit without periods (rate, concurrency, credits) fires again once
    /// usage has fallen this many percent of the threshold under it. Default 10.
    #[serde(default)]
    pub hysteresis_percent: Option<u32>,
    /// ISO-8601 delays before each retry of a failed webhook call (the first call is made at
    /// once). Default `[PT5S, PT5M, PT30M, PT2H, PT5H, PT10H, PT10H]`.
    #[serde(default)]
    pub retry_schedule: Option<Vec<String>>,
    /// How long one webhook call may take, in ms. Default 10000.
    #[serde(default)]
    pub timeout_ms: Option<u32>,
    /// Address ranges (CIDR) webhooks may reach although they are loopback, private or
    /// link-local, for receivers inside the operator's network. Default none: webhooks go to
    /// public addresses only, over https (plain http only inside an allowed range).
    #[serde(default)]
    pub allow_targets: Option<Vec<String>>,
    /// Alert rules one customer may have. Default 50.
    #[serde(default)]
    pub max_rules_per_customer: Option<u32>,
    /// Thresholds (`percent` and `absolute` together) one rule may have. Default 10.
    #[serde(default)]
    pub max_thresholds_per_rule: Option<u32>,
    /// Webhooks one customer may have. Default 10.
    #[serde(default)]
    pub max_webhooks_per_customer: Option<u32>,
}
