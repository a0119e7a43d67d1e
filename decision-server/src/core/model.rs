//! The domain model: customers, entity types and trees, attribution, features, limits, grants
//! and prices. Built once from config (see `crate::config`) and shared immutably.

use std::collections::HashMap;

use super::Timestamp;
use super::period::CalendarPeriod;
use rustc_hash::FxHashMap;

use super::symbols::{Name, Sym, Symbols};
use super::usage::{SIDECAR_UNREACHABLE, StreamEnd};
use super::window::RollingWindow;

/// Whether a limit may deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Denies when exceeded.
    Enforce,
    /// Never denies; an exceeded limit raises an alert.
    Soft,
    /// Never denies; an exceeded limit is logged as a would-deny.
    Shadow,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Soft => "soft",
            Mode::Shadow => "shadow",
        }
    }
}

/// What a limit bounds, and how.
#[derive(Debug, Clone, PartialEq)]
pub enum LimitKind {
    /// At most `limit` units in any rolling window.
    Rate { limit: u64, window: RollingWindow },
    /// At most `limit` units per calendar period; resets at the period boundary.
    Quota { limit: u64, period: CalendarPeriod },
    /// At most `limit` requests in flight.
    Concurrency { limit: u32 },
    /// A balance fed by grants. `pool_by` names the dimension whose value selects an isolated
    /// pool (for example `apiKey`); without it the holder has one pool.
    Credits { pool_by: Option<String> },
}

impl LimitKind {
    pub fn name(&self) -> KindName {
        match self {
            LimitKind::Rate { .. } => KindName::Rate,
            LimitKind::Quota { .. } => KindName::Quota,
            LimitKind::Concurrency { .. } => KindName::Concurrency,
            LimitKind::Credits { .. } => KindName::Credits,
        }
    }
}

/// A limit's kind without its settings: what a decision's chain entry and a denial name, and
/// what code compares (never the kind's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KindName {
    Rate,
    Quota,
    Concurrency,
    Credits,
}

impl KindName {
    /// The kind as the config and the APIs spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            KindName::Rate => "rate",
            KindName::Quota => "quota",
            KindName::Concurrency => "concurrency",
            KindName::Credits => "credits",
        }
    }
}

impl std::fmt::Display for KindName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for KindName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Which entities a limit applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitTarget {
    /// One entity of the customer's tree.
    Entity(Sym),
    /// Every entity of this type, each with its own counter.
    EntityType(usize),
}

/// A limit (assignment) of one customer.
#[derive(Debug, Clone)]
pub struct Limit {
    pub id: Name,
    pub feature: usize,
    pub target: LimitTarget,
    /// Dimension filters: the limit applies only when every named dimension matches its pattern.
    pub scope: Vec<(String, glob::Pattern)>,
    pub kind: LimitKind,
    pub mode: Mode,
}

impl Limit {
    /// Whether the request's dimensions fall inside this limit's scope. A scoped dimension that
    /// the request does not carry does not match.
    pub fn in_scope(&self, dimensions: &HashMap<String, String>) -> bool {
        self.scope.iter().all(|(dim, pattern)| {
            dimensions
                .get(dim)
                .is_some_and(|value| pattern.matches(value))
        })
    }
}

/// A declared entity type.
#[derive(Debug, Clone)]
pub struct EntityType {
    pub name: Name,
    /// Types an entity of this type may hang under. Empty for a root type.
    pub parents: Vec<usize>,
    /// Dimensional types (model, endpoint, region...) are not in the tree; they scope limits.
    pub dimensional: bool,
    /// For a dimensional type: the request dimension that carries its value.
    pub dimension: Option<String>,
}

/// What to do with a dimension value naming an entity that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnknown {
    Reject,
    /// Create it under the nearest resolved ancestor, or under the customer's default parent
    /// for its type. Bounded per customer by `max_auto_entities`.
    Create,
}

/// Maps one request dimension to entities of one type.
#[derive(Debug, Clone)]
pub struct Attribution {
    pub dimension: String,
    pub entity_type: usize,
    pub on_unknown: OnUnknown,
    /// A request without this dimension is refused, not charged to the levels above alone.
    pub required: bool,
}

/// How a check of one feature also draws on another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrawRule {
    /// One unit per request, whatever the usage.
    PerRequest,
    /// The usage priced through the price table.
    Priced,
}

/// A metered capability.
#[derive(Debug, Clone)]
pub struct Feature {
    pub id: Name,
    /// Other features a check of this one draws on, and how.
    pub also_draws: Vec<(usize, DrawRule)>,
    /// The most usage one settlement of this feature may report; unset, a multiple of the
    /// requested usage (`plan::DEFAULT_SETTLE_FACTOR`).
    pub max_settle: Option<u64>,
    /// Every check's usage is final: a grant counts it at once and places no hold.
    pub commit_at_check: bool,
}

/// Paid credits are spent after promotional ones of the same priority and expiry.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum GrantCategory {
    Promo,
    Paid,
}

/// A credit grant as declared.
#[derive(Debug, Clone)]
pub struct GrantSpec {
    pub id: String,
    pub entity: Sym,
    pub feature: usize,
    pub pool: Option<String>,
    pub amount: u64,
    pub priority: u32,
    pub expires_at: Option<Timestamp>,
    pub category: GrantCategory,
}

/// Prices of one model pattern, in the credit feature's units per million tokens.
#[derive(Debug, Clone)]
pub struct ModelPrice {
    pub pattern: glob::Pattern,
    pub input_per_million: u64,
    pub output_per_million: u64,
    pub cached_per_million: u64,
    pub cache_write_per_million: u64,
    /// Tokens of context (input and output together), when the table says.
    pub context_window: Option<u64>,
    /// The most output tokens of one call, when the table says.
    pub max_output: Option<u64>,
}

impl ModelPrice {
    /// The most one call to this model can really report, when the table says: its context
    /// window plus its maximum output. Trade-off: generous (providers differ on whether the
    /// window counts the output), since the ceiling only stops a report no call could make.
    pub fn call_ceiling(&self) -> Option<u64> {
        self.context_window
            .map(|w| w.saturating_add(self.max_output.unwrap_or(0)))
    }
}

impl Model {
    /// Whether entity type `t` is `ancestor` or lies below it (through any of its parents).
    fn is_at_or_below(&self, t: usize, ancestor: usize) -> bool {
        let mut seen = vec![false; self.entity_types.len()];
        let mut todo = vec![t];
        while let Some(x) = todo.pop() {
            if x == ancestor {
                return true;
            }
            if let Some(s) = seen.get_mut(x)
                && !*s
            {
                *s = true;
                todo.extend(
                    self.entity_types
                        .get(x)
                        .into_iter()
                        .flat_map(|e| &e.parents),
                );
            }
        }
        false
    }

    /// Limits a request can skip by leaving dimensions out: a limit on a level below the root
    /// applies only when some attribution dimension names that level or one below it (the
    /// chain takes in every ancestor), so it can be skipped unless one of those is
    /// `required`. One line per set of such dimensions, for `tollgate validate` and the log at
    /// start.
    pub fn skippable_limits(&self) -> Vec<String> {
        let mut by_dims: std::collections::BTreeMap<Vec<String>, Vec<String>> =
            std::collections::BTreeMap::new();
        let mut customers = self.customers.values().collect::<Vec<_>>();
        customers.sort_by(|x, y| x.id.as_str().cmp(y.id.as_str()));
        for c in customers {
            for l in &c.limits {
                let level = match l.target {
                    LimitTarget::EntityType(t) => Some(t),
                    LimitTarget::Entity(e) => c.entities.get(&e).map(|n| n.entity_type),
                };
                let Some(level) = level.filter(|t| {
                    self.entity_types
                        .get(*t)
                        .is_some_and(|e| !e.dimensional && !e.parents.is_empty())
                }) else {
                    continue;
                };
                let covering: Vec<&Attribution> = self
                    .attribution
                    .iter()
                    .filter(|a| self.is_at_or_below(a.entity_type, level))
                    .collect();
                if covering.iter().any(|a| a.required) {
                    continue;
                }
                let dims = covering.iter().map(|a| a.dimension.clone()).collect();
                by_dims.entry(dims).or_default().push(format!(
                    "{}/{}",
                    c.id.as_str(),
                    l.id.as_str()
                ));
            }
        }
        by_dims
            .into_iter()
            .map(|(dims, ids)| {
                let shown = ids.len().min(5);
                let more = if ids.len() > shown {
                    format!(" and {} more", ids.len() - shown)
                } else {
                    String::new()
                };
                let names = dims
                    .iter()
                    .map(|d| format!("`{d}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!(
                    "attribution: a request that carries none of {names} is charged to the levels above alone, skipping {}{more}; set `required: true` on one of them (and on the filter's rule for it) if every request must be charged there",
                    ids[..shown].join(", "),
                )
            })
            .collect()
    }
}

/// One version of the price table.
#[derive(Debug, Clone)]
pub struct PriceTable {
    pub version: String,
    pub effective_from: Timestamp,
    pub models: Vec<ModelPrice>,
}

/// A node of a customer's entity tree.
#[derive(Debug, Clone)]
pub struct EntityNode {
    pub id: Name,
    pub entity_type: usize,
    pub parent: Option<Sym>,
}

/// One customer: its tree, its limits and its grants.
#[derive(Debug, Clone)]
pub struct CustomerModel {
    pub id: Name,
    pub entities: FxHashMap<Sym, EntityNode>,
    /// The single root of the tree; a request that names no entity is charged here.
    pub root: Option<Sym>,
    pub limits: Vec<Limit>,
    pub limits_by_entity: FxHashMap<Sym, Vec<usize>>,
    pub limits_by_type: FxHashMap<usize, Vec<usize>>,
    pub grants: Vec<GrantSpec>,
    /// Default parent entity, per entity type, for auto-created entities.
    pub auto_parents: FxHashMap<usize, Sym>,
    pub max_auto_entities: u32,
    pub alerts: Vec<AlertRule>,
    pub webhooks: Vec<Webhook>,
}

/// A threshold alert on a customer's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRule {
    pub id: Name,
    pub target: LimitTarget,
    /// One limit, or every limit of one feature (by index), on the target.
    pub limit: Option<Name>,
    pub feature: Option<usize>,
    /// Percent thresholds, ascending.
    pub percent: Vec<u32>,
    /// Absolute thresholds, ascending.
    pub absolute: Vec<u64>,
    pub soft_limit: bool,
    /// Fire when the remaining units run out within this many ms at the recent burn rate.
    pub exhaustion_within: Option<i64>,
    /// Fire on this many denials within this many ms.
    pub denials: Option<(u32, i64)>,
    /// Indices into the customer's webhooks.
    pub webhooks: Vec<usize>,
}

/// A webhook endpoint and its signing secrets (`whsec_...`, each signs every call).
#[derive(Clone, PartialEq, Eq)]
pub struct Webhook {
    pub id: Name,
    pub url: String,
    pub secrets: Vec<String>,
}

impl std::fmt::Debug for Webhook {
    /// Without the secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

/// Longest id accepted anywhere: in the config, and for entities created on the fly.
pub const MAX_ID_LEN: usize = 128;

/// Whether `id` may name a customer, entity, limit or feature: 1 to [`MAX_ID_LEN`] bytes of
/// printable ASCII without spaces, `{` or `}` (which would make Redis hash tags). The same rule
/// holds for configured ids and for ids a request creates.
pub fn valid_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!("is longer than {MAX_ID_LEN} bytes"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '{' | '}'))
    {
        return Err(format!(
            "`{}` contains {c:?}; ids are printable ASCII without spaces, `{{` or `}}`",
            id.escape_debug()
        ));
    }
    Ok(())
}

/// Everything a decision reads. Immutable; a reload builds a new one.
#[derive(Debug)]
pub struct Model {
    /// A handle to the process-wide symbol table (see `core::symbols`).
    pub symbols: Symbols,
    pub entity_types: Vec<EntityType>,
    pub attribution: Vec<Attribution>,
    pub features: Vec<Feature>,
    pub feature_index: FxHashMap<String, usize>,
    pub prices: Vec<PriceTable>,
    pub customers: FxHashMap<String, CustomerModel>,
    /// How long a hold lives before it is committed at its held amount.
    pub hold_ttl_millis: i64,
    /// The request dimensions the model reads (attribution, dimensional types, `model`), and
    /// those `usageRecords.dimensions` adds: what usage records and events keep of a request's
    /// dimensions.
    pub dimensions: std::collections::HashSet<String>,
    /// The dimensions a usage record keeps as values of their own (every declared one but the
    /// attribution dimensions, whose values are entity ids and appear in the chain), sorted.
    pub recorded_dimensions: Vec<Name>,
    /// The attribute name each entity type's level carries in a record (`<type>Id`), by type.
    pub chain_keys: Vec<Name>,
    /// Retention of usage rollups and the fold cap.
    pub records: crate::core::rollup::RecordSettings,
    /// How far under a threshold usage must fall before an alert on a limit without periods
    /// fires again, in percent of the threshold.
    pub alert_hysteresis_percent: u32,
    /// How webhooks are retried and timed out.
    pub alerting: AlertDelivery,
    /// What a credit is worth in money, when the operator said.
    pub currency: Option<Currency>,
}

/// What one credit is worth in a currency, in millionths of its unit (exact for the six
/// decimals a price needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Currency {
    pub code: String,
    pub micros_per_credit: u64,
}

impl Currency {
    /// `credits` in millionths of the currency's unit.
    pub fn micros(&self, credits: u64) -> u128 {
        u128::from(credits) * u128::from(self.micros_per_credit)
    }
}

/// Webhook delivery settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertDelivery {
    /// Delays after the first attempt (which is made at once) before each retry, in ms.
    pub retry_millis: Vec<i64>,
    /// How long one attempt may take.
    pub timeout_millis: i64,
    /// Where webhooks may go.
    pub targets: super::target::TargetPolicy,
    /// Per-customer budgets: what one tenant's rules can make every decision of its own
    /// evaluate, and the server keep (alert rules, thresholds per rule, webhooks).
    pub max_rules: usize,
    pub max_thresholds: usize,
    pub max_webhooks: usize,
}

impl Model {
    pub fn customer(&self, id: &str) -> Option<&CustomerModel> {
        self.customers.get(id)
    }

    /// Whether checks of feature `id` count at once instead of holding (`commitAtCheck`).
    pub fn commits_at_check(&self, id: &str) -> bool {
        self.feature(id)
            .and_then(|i| self.features.get(i))
            .is_some_and(|f| f.commit_at_check)
    }

    pub fn feature(&self, id: &str) -> Option<usize> {
        self.feature_index.get(id).copied()
    }

    /// The price table in force at `now`: the latest whose `effective_from` has passed.
    pub fn price_table_at(&self, now: Timestamp) -> Option<&PriceTable> {
        self.prices
            .iter()
            .filter(|t| t.effective_from <= now)
            .max_by_key(|t| t.effective_from)
    }
}

impl CustomerModel {
    /// A streamed call's end as a gateway reports it (`cut`, or finished past a refusal, by
    /// `by`), its value checked: one of this customer's limit ids, or `sidecar-unreachable`;
    /// anything else reads as `__other__`, so a caller cannot add distinct values to the
    /// records (or strings to the symbol table).
    pub fn stream_end(&self, cut: bool, by: &str) -> StreamEnd {
        let by = self
            .limits
            .iter()
            .map(|l| l.id)
            .find(|id| id.as_str() == by)
            .unwrap_or_else(|| {
                Name::from(if by == SIDECAR_UNREACHABLE {
                    SIDECAR_UNREACHABLE
                } else {
                    super::rollup::OTHER
                })
            });
        if cut {
            StreamEnd::Cut(by)
        } else {
            StreamEnd::FinishedPast(by)
        }
    }

    /// The credits limit that holds `entity`'s balance of `feature`: one on the entity itself,
    /// else one on its type.
    pub fn credits_limit_for(&self, entity: Sym, feature: usize) -> Option<&Limit> {
        let entity_type = self.entities.get(&entity).map(|n| n.entity_type);
        let on_entity = self.limits_by_entity.get(&entity).into_iter().flatten();
        let on_type = entity_type
            .and_then(|t| self.limits_by_type.get(&t))
            .into_iter()
            .flatten();
        on_entity
            .chain(on_type)
            .filter_map(|i| self.limits.get(*i))
            .find(|l| l.feature == feature && matches!(l.kind, LimitKind::Credits { .. }))
    }
}
