//! Hierarchy resolution: from a request's customer, feature and dimensions to the chain of
//! entities (leaf to root) and every counter the decision must check and hold.

use std::collections::HashMap;

use dashmap::DashMap;

use super::Timestamp;
use super::counter::{CounterKey, CounterSpec};
use super::model::{CustomerModel, DrawRule, Limit, LimitKind, Mode, Model, ModelPrice, OnUnknown};
use super::rollup::SeriesDraft;
use super::symbols::{Name, Sym};
use super::usage::Usage;

/// How many times the requested usage a settlement may report when the feature sets no
/// `maxSettleUsage`. Trade-off: generous, because a hold is an estimate (a prompt's size, an
/// output budget) and a real call may exceed it a few times over; bounded, because without a
/// bound one settlement of 2^64-1 units fills every quota of a chain and drains its credits.
pub const DEFAULT_SETTLE_FACTOR: u64 = 10;

/// The most one settlement of a call to a model may report when the price table gives no
/// context window for it: above today's largest context windows (about a million tokens) and
/// their output. A stored conversation, a file or an image can make a call use many times
/// what its request looked like; only a report no call could make is cut.
pub const DEFAULT_MODEL_CEILING: u64 = 2_000_000;

/// 2^53: the largest whole number every store keeps exactly (a Lua number is a double).
pub const MAX_EXACT: u64 = 1 << 53;

/// How a counter's amount follows the usage, so settlement can recompute it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum AmountRule {
    /// The feature's own units.
    Units,
    /// One per request (also every concurrency slot), whatever the usage.
    PerRequest,
    /// Usage priced by this model price, in the credit feature's units.
    Priced(PriceSnapshot),
}

/// The per-million prices a hold was priced with; kept so settlement uses the same version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PriceSnapshot {
    pub input_per_million: u64,
    pub output_per_million: u64,
    pub cached_per_million: u64,
    pub cache_write_per_million: u64,
}

impl From<&ModelPrice> for PriceSnapshot {
    fn from(p: &ModelPrice) -> Self {
        Self {
            input_per_million: p.input_per_million,
            output_per_million: p.output_per_million,
            cached_per_million: p.cached_per_million,
            cache_write_per_million: p.cache_write_per_million,
        }
    }
}

impl PriceSnapshot {
    /// Credits for `usage`, rounded up. Without a token breakdown every unit is priced at the
    /// dearest rate: a hold must not under-reserve, and settlement corrects it.
    pub fn price(&self, usage: &Usage) -> u64 {
        let micro = match usage.tokens {
            Some(t) => {
                u128::from(t.input) * u128::from(self.input_per_million)
                    + u128::from(t.output) * u128::from(self.output_per_million)
                    + u128::from(t.cached) * u128::from(self.cached_per_million)
                    + u128::from(t.cache_write) * u128::from(self.cache_write_per_million)
            }
            None => {
                let dearest = self
                    .input_per_million
                    .max(self.output_per_million)
                    .max(self.cached_per_million)
                    .max(self.cache_write_per_million);
                u128::from(usage.units) * u128::from(dearest)
            }
        };
        u64::try_from(micro.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
}

impl AmountRule {
    pub fn amount(&self, usage: &Usage) -> u64 {
        match self {
            AmountRule::Units => usage.units,
            AmountRule::PerRequest => 1,
            AmountRule::Priced(p) => p.price(usage),
        }
    }
}

/// One level of the resolved chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLevel {
    pub entity: Sym,
    pub entity_id: Name,
    pub entity_type: Name,
}

/// One counter a decision checks and holds.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedCounter {
    pub level: usize,
    pub key: CounterKey,
    pub spec: CounterSpec,
    pub mode: Mode,
    pub amount: u64,
    pub rule: AmountRule,
    pub limit_id: Name,
    pub feature_id: Name,
    pub kind: super::model::KindName,
}

/// Everything a store needs to decide one request atomically.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The customer; its symbol keys in-process maps, its text keys anything textual.
    pub customer: Name,
    pub chain: Vec<ChainLevel>,
    pub counters: Vec<PlannedCounter>,
    pub usage: Usage,
    pub hold_ttl_millis: i64,
    /// The most usage a settlement of this decision's hold may report (see
    /// [`Usage::largest_figure`]).
    pub max_settle: u64,
    /// The random tag of the hold this decision places; the engine draws it (the core reads
    /// no randomness) and it becomes part of the hold id.
    pub hold_tag: u128,
    /// What the decision's usage record is attributed to.
    pub series: SeriesDraft,
    /// Whether the store writes usage records for this plan's hold and denial. Off for a
    /// replica's lease (`store::leased`): its hold stands for many decisions, each recorded
    /// with its own series when it is settled.
    pub record: bool,
}

impl Plan {
    /// The credits `usage` is priced at: the amount of the plan's priced draw (every priced
    /// counter of one plan prices the same call), 0 if no limit prices it.
    pub fn credits(&self, usage: &Usage) -> u64 {
        priced_credits(self.counters.iter().map(|c| &c.rule), usage)
    }
}

/// The largest amount any priced rule gives `usage`: the call's credits.
pub fn priced_credits<'a>(rules: impl Iterator<Item = &'a AmountRule>, usage: &Usage) -> u64 {
    rules
        .filter(|r| matches!(r, AmountRule::Priced(_)))
        .map(|r| r.amount(usage))
        .max()
        .unwrap_or(0)
}

/// Why a request could not be resolved to a chain. None of these changes any counter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("unknown customer `{0}`")]
    UnknownCustomer(String),
    #[error("unknown feature `{0}`")]
    UnknownFeature(String),
    #[error(
        "dimension `{dimension}` names entity `{value}`, which customer `{customer}` does not have"
    )]
    UnknownEntity {
        customer: String,
        dimension: String,
        value: String,
    },
    #[error(
        "the event records {usage} units, more than one event may ({max}: the feature's `maxSettleUsage`, else what one call to its model can use); split it, or raise the feature's `maxSettleUsage`"
    )]
    IngestTooLarge { usage: u64, max: u64 },
    #[error(
        "the request carries no `{dimension}`, which every request must (its `{entity_type}` level has limits that must not be skipped: attribution `required`)"
    )]
    MissingDimension {
        dimension: String,
        entity_type: String,
    },
    #[error(
        "dimension `{dimension}` names entity `{value}`, which is a `{actual}`, not a `{expected}`"
    )]
    WrongEntityType {
        dimension: String,
        value: String,
        expected: String,
        actual: String,
    },
    #[error("dimensions disagree: `{a}` is not under `{b}` in customer `{customer}`'s tree")]
    InconsistentDimensions {
        customer: String,
        a: String,
        b: String,
    },
    #[error(
        "cannot create entity `{value}` (dimension `{dimension}`): customer `{customer}` has no default parent for type `{entity_type}` and no ancestor was given"
    )]
    NoDefaultParent {
        customer: String,
        dimension: String,
        value: String,
        entity_type: String,
    },
    #[error(
        "cannot create entity `{value}`: customer `{customer}` already has {max} auto-created entities, the configured maximum"
    )]
    AutoEntityLimit {
        customer: String,
        value: String,
        max: u32,
    },
    #[error(
        "more than one dimension names an unknown entity ({0}); at most one entity is created per request"
    )]
    SeveralUnknown(String),
    #[error("no price for model `{model}` in the price table in force, needed by limit `{limit}`")]
    NoPrice { model: String, limit: String },
    #[error("dimension `{0}` is longer than 256 bytes")]
    ValueTooLong(String),
    #[error(
        "dimension `{dimension}` names entity `{value}`, which cannot be created: its id {problem}"
    )]
    BadEntityId {
        dimension: String,
        value: String,
        problem: String,
    },
    #[error("customer `{customer}`'s stored entity `{entity}` cannot be used: {problem}")]
    BadStoredEntity {
        customer: String,
        entity: String,
        problem: String,
    },
    #[error("{count} dimensions in one request; at most {max}")]
    TooManyDimensions { count: usize, max: usize },
    #[error("the dimensions' names and values take {bytes} bytes; at most {max}")]
    DimensionsTooLarge { bytes: usize, max: usize },
}

/// What `planned` reads of the request.
struct RequestCtx<'a> {
    usage: &'a Usage,
    dimensions: &'a HashMap<String, String>,
    now: Timestamp,
}

/// This process's copy of the entities created on the fly (`onUnknown: create`), per customer.
/// The store holds the entities and their cap (see `CounterStore::auto_entity`); this copy
/// only holds entities the store has, so it is bounded by the cap too.
#[derive(Debug, Default)]
pub struct AutoEntities {
    by_customer: DashMap<Sym, HashMap<Sym, AutoEntity>>,
}

/// An entity created on the fly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoEntity {
    pub entity_type: usize,
    pub parent: Sym,
}

impl AutoEntities {
    /// How many this process knows of (the store's count may be higher).
    pub fn count(&self, customer: Sym) -> usize {
        self.by_customer.get(&customer).map_or(0, |m| m.len())
    }

    /// Notes an entity the store has.
    pub fn insert(&self, customer: Sym, entity: Sym, node: AutoEntity) {
        self.by_customer
            .entry(customer)
            .or_default()
            .insert(entity, node);
    }

    pub fn get(&self, customer: Sym, entity: Sym) -> Option<AutoEntity> {
        self.by_customer
            .get(&customer)
            .and_then(|m| m.get(&entity).copied())
    }
}

/// The auto-created entities a plan may see: this process's copy, and for a dry run the one
/// entity the request would create, assumed without being created.
#[derive(Debug, Clone, Copy)]
pub struct Registry<'a> {
    pub auto: &'a AutoEntities,
    pub assumed: Option<&'a Assumed>,
}

impl<'a> Registry<'a> {
    pub fn new(auto: &'a AutoEntities) -> Self {
        Self {
            auto,
            assumed: None,
        }
    }
}

/// An entity a dry run would create: planned as if it existed, under the placeholder symbol
/// [`ASSUMED_ID`] (an id no configured entity can have), so that nothing untrusted is interned.
#[derive(Debug, Clone)]
pub struct Assumed {
    pub value: String,
    pub sym: Sym,
    pub node: AutoEntity,
}

/// The id a dry run's would-be entity reads as in its answer.
pub const ASSUMED_ID: &str = "(new entity)";

/// An entity a request names that neither the model nor this process knows, with the parent
/// the request gives it: the store must find or create it before the request can be planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntity {
    pub dimension: String,
    pub value: String,
    pub entity_type: usize,
    pub parent: Sym,
}

/// What resolving a request gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Planned {
    Ready(Plan),
    /// Ask the store for this entity first, then plan again.
    Create(NewEntity),
}

const MAX_VALUE_LEN: usize = 256;

/// A resolved dimension: a known entity or one to create.
enum Resolved {
    Known(Sym),
    Unknown {
        dimension: String,
        value: String,
        entity_type: usize,
    },
}

impl Model {
    /// Resolves a request to its plan. Reads the model and writes nothing: an entity to create
    /// is handed back ([`Planned::Create`]) for the caller to create in the store.
    pub fn plan(
        &self,
        auto: &Registry<'_>,
        customer_id: &str,
        feature_id: &str,
        usage: Usage,
        dimensions: &HashMap<String, String>,
        now: Timestamp,
    ) -> Result<Planned, PlanError> {
        let customer = self
            .customer(customer_id)
            .ok_or_else(|| PlanError::UnknownCustomer(truncate(customer_id)))?;
        let feature = self
            .feature(feature_id)
            .ok_or_else(|| PlanError::UnknownFeature(truncate(feature_id)))?;
        if let Some((k, _)) = dimensions.iter().find(|(_, v)| v.len() > MAX_VALUE_LEN) {
            return Err(PlanError::ValueTooLong(truncate(k)));
        }
        let chain = match self.resolve_chain(auto, customer, dimensions)? {
            Ok(chain) => chain,
            Err(new) => return Ok(Planned::Create(new)),
        };
        let req = RequestCtx {
            usage: &usage,
            dimensions,
            now,
        };
        // Three limits a level is typical; sizing up front spares regrowing (and moving) the list.
        let mut counters = Vec::with_capacity(chain.len() * 3);
        for (level, node) in chain.iter().enumerate() {
            let entity_type = self.entity_type_of(customer, auto, node.entity);
            let by_entity = customer
                .limits_by_entity
                .get(&node.entity)
                .into_iter()
                .flatten();
            let by_type = entity_type
                .and_then(|t| customer.limits_by_type.get(&t))
                .into_iter()
                .flatten();
            for li in by_entity.chain(by_type) {
                let Some(limit) = customer.limits.get(*li) else {
                    continue;
                };
                if !limit.in_scope(dimensions) {
                    continue;
                }
                // How this check reaches the limit's feature: directly, or through `alsoDraws`.
                let via = if limit.feature == feature {
                    None
                } else {
                    match self.draw_rule(feature, limit.feature) {
                        Some(draw) => Some(draw),
                        None => continue,
                    }
                };
                let rule = match (&limit.kind, via) {
                    // A concurrency limit counts requests whatever the feature's units or price.
                    (LimitKind::Concurrency { .. }, _) => AmountRule::PerRequest,
                    (_, None) => AmountRule::Units,
                    (_, Some(DrawRule::PerRequest)) => AmountRule::PerRequest,
                    (_, Some(DrawRule::Priced)) => {
                        AmountRule::Priced(self.price_for(limit, dimensions, now)?)
                    }
                };
                counters.push(self.planned(level, node.entity, limit, rule, &req));
            }
        }
        let max_settle = self.settle_bound(feature, &usage, dimensions, now);
        let series = self.series_draft(feature, &chain, dimensions);
        Ok(Planned::Ready(Plan {
            customer: customer.id,
            chain,
            counters,
            usage,
            hold_ttl_millis: self.hold_ttl_millis,
            max_settle,
            hold_tag: 0,
            series,
            record: true,
        }))
    }

    /// What a record of this request is attributed to: the feature, each level of the chain
    /// (`<type>Id`), and the recorded dimensions the request carries.
    fn series_draft(
        &self,
        feature: usize,
        chain: &[ChainLevel],
        dimensions: &HashMap<String, String>,
    ) -> SeriesDraft {
        if !self.records.enabled {
            return SeriesDraft::default();
        }
        let chain_attrs = chain
            .iter()
            .filter_map(|level| {
                let t = self
                    .entity_types
                    .iter()
                    .position(|t| t.name == level.entity_type)?;
                Some((*self.chain_keys.get(t)?, level.entity_id))
            })
            .collect();
        let dims = self
            .recorded_dimensions
            .iter()
            .filter_map(|k| {
                dimensions
                    .get(k.as_str())
                    .map(|v| (*k, Box::from(v.as_str())))
            })
            .collect();
        SeriesDraft {
            feature: self.features.get(feature).map(|f| f.id).unwrap_or_default(),
            chain: chain_attrs,
            dimensions: dims,
        }
    }

    fn planned(
        &self,
        level: usize,
        entity: Sym,
        limit: &Limit,
        rule: AmountRule,
        req: &RequestCtx<'_>,
    ) -> PlannedCounter {
        let mut partition = None;
        if let LimitKind::Credits { pool_by: Some(dim) } = &limit.kind {
            // Pool names are interned only when a grant creates the pool, so a request naming
            // an unheard-of pool allocates nothing and finds an empty balance.
            partition = req.dimensions.get(dim).and_then(|v| self.symbols.get(v));
        }
        let spec = CounterSpec::of(&limit.kind, partition.is_some(), req.now);
        PlannedCounter {
            level,
            key: CounterKey {
                entity,
                limit: limit.id.sym(),
                partition,
            },
            spec,
            mode: limit.mode,
            amount: rule.amount(req.usage),
            rule,
            limit_id: limit.id,
            feature_id: self
                .features
                .get(limit.feature)
                .map(|f| f.id)
                .unwrap_or_default(),
            kind: limit.kind.name(),
        }
    }

    /// The most one ingested event may record: the feature's `maxSettleUsage`, else what one
    /// call to the event's model can use (a `model` dimension), else
    /// [`DEFAULT_MODEL_CEILING`]. Usage that already happened is not checked against limits,
    /// so without this bound one event of 2^64-1 units would fill every quota of its chain.
    pub fn ingest_bound(
        &self,
        feature_id: &str,
        dimensions: &HashMap<String, String>,
        now: Timestamp,
    ) -> u64 {
        let own = self
            .feature(feature_id)
            .and_then(|f| self.features.get(f))
            .and_then(|f| f.max_settle);
        own.unwrap_or_else(|| {
            dimensions
                .get("model")
                .and_then(|model| {
                    self.price_table_at(now)
                        .and_then(|t| t.models.iter().find(|p| p.pattern.matches(model)))
                        .and_then(ModelPrice::call_ceiling)
                })
                .unwrap_or(DEFAULT_MODEL_CEILING)
        })
        .min(MAX_EXACT)
    }

    /// Refuses a request that lacks a `required` attribution dimension, so it cannot be
    /// charged to the levels above alone. Real checks and ingested usage only: a dry run (the
    /// usage of a team, read without naming a user) skips it.
    pub fn check_required(&self, dimensions: &HashMap<String, String>) -> Result<(), PlanError> {
        match self
            .attribution
            .iter()
            .find(|a| a.required && !dimensions.contains_key(&a.dimension))
        {
            Some(a) => Err(PlanError::MissingDimension {
                dimension: a.dimension.clone(),
                entity_type: self.type_name(a.entity_type).to_string(),
            }),
            None => Ok(()),
        }
    }

    /// How much a settlement of a hold of `usage` of feature `feature` may report: the
    /// feature's `maxSettleUsage`, else the default bound below.
    pub fn settle_bound(
        &self,
        feature: usize,
        usage: &Usage,
        dimensions: &HashMap<String, String>,
        now: Timestamp,
    ) -> u64 {
        self.features
            .get(feature)
            .and_then(|f| f.max_settle)
            .unwrap_or_else(|| self.default_settle_bound(usage, dimensions, now))
            // Exact in a double (Redis scripts count in Lua numbers); far above any real usage.
            .min(MAX_EXACT)
    }

    /// How much a settlement may report when the feature sets no `maxSettleUsage`: ten times
    /// what was requested, and for a call to a model (a `model` dimension) at least what one
    /// call to that model can use ([`ModelPrice::call_ceiling`], else
    /// [`DEFAULT_MODEL_CEILING`]). A settlement above it is charged at it, the excess counted.
    fn default_settle_bound(
        &self,
        usage: &Usage,
        dimensions: &HashMap<String, String>,
        now: Timestamp,
    ) -> u64 {
        let requested = usage.units.max(1).saturating_mul(DEFAULT_SETTLE_FACTOR);
        let Some(model) = dimensions.get("model") else {
            return requested;
        };
        let ceiling = self
            .price_table_at(now)
            .and_then(|t| t.models.iter().find(|p| p.pattern.matches(model)))
            .and_then(ModelPrice::call_ceiling)
            .unwrap_or(DEFAULT_MODEL_CEILING);
        requested.max(ceiling)
    }

    /// How a check of `feature` also draws on `other`, if it does.
    fn draw_rule(&self, feature: usize, other: usize) -> Option<DrawRule> {
        self.features
            .get(feature)
            .and_then(|f| f.also_draws.iter().find(|(f2, _)| *f2 == other))
            .map(|(_, draw)| *draw)
    }

    fn price_for(
        &self,
        limit: &Limit,
        dimensions: &HashMap<String, String>,
        now: Timestamp,
    ) -> Result<PriceSnapshot, PlanError> {
        let model = dimensions.get("model").map(String::as_str).unwrap_or("");
        self.price_table_at(now)
            .and_then(|t| t.models.iter().find(|p| p.pattern.matches(model)))
            .map(PriceSnapshot::from)
            .ok_or_else(|| PlanError::NoPrice {
                model: truncate(model),
                limit: limit.id.to_string(),
            })
    }

    /// An entity's type and parent: declared in the tree, else created on the fly.
    fn node(
        &self,
        customer: &CustomerModel,
        auto: &Registry<'_>,
        e: Sym,
    ) -> Option<(usize, Option<Sym>)> {
        if let Some(n) = customer.entities.get(&e) {
            return Some((n.entity_type, n.parent));
        }
        if let Some(a) = auto.assumed.filter(|a| a.sym == e) {
            return Some((a.node.entity_type, Some(a.node.parent)));
        }
        auto.auto
            .get(customer.id.sym(), e)
            .map(|a| (a.entity_type, Some(a.parent)))
    }

    fn entity_type_of(
        &self,
        customer: &CustomerModel,
        auto: &Registry<'_>,
        e: Sym,
    ) -> Option<usize> {
        self.node(customer, auto, e).map(|(t, _)| t)
    }

    fn parent_of(&self, customer: &CustomerModel, auto: &Registry<'_>, e: Sym) -> Option<Sym> {
        self.node(customer, auto, e).and_then(|(_, p)| p)
    }

    /// Ancestors of `leaf`, leaf first. Bounded by the tree size (and as many auto-created
    /// levels as there are entity types), so a cycle (which validation rules out) cannot loop
    /// forever.
    fn ancestors(&self, customer: &CustomerModel, auto: &Registry<'_>, leaf: Sym) -> Vec<Sym> {
        let mut out = vec![leaf];
        let mut cur = leaf;
        while let Some(p) = self.parent_of(customer, auto, cur) {
            if out.len() > customer.entities.len() + self.entity_types.len() + 1 {
                break;
            }
            out.push(p);
            cur = p;
        }
        out
    }

    /// The chain of the deepest entity `resolved` knows (`None`: it knows none); every other
    /// known one must be its ancestor, or the dimensions contradict each other.
    fn deepest_known(
        &self,
        auto: &Registry<'_>,
        customer: &CustomerModel,
        resolved: &[Resolved],
    ) -> Result<Option<Vec<Sym>>, PlanError> {
        let known: Vec<Sym> = resolved
            .iter()
            .filter_map(|r| match r {
                Resolved::Known(s) => Some(*s),
                Resolved::Unknown { .. } => None,
            })
            .collect();
        let mut leaf_chain: Option<Vec<Sym>> = None;
        for s in &known {
            let chain = self.ancestors(customer, auto, *s);
            if leaf_chain.as_ref().is_none_or(|c| chain.len() > c.len()) {
                leaf_chain = Some(chain);
            }
        }
        if let Some(chain) = &leaf_chain
            && let Some(s) = known.iter().find(|s| !chain.contains(s))
        {
            let leaf = chain.first().copied().unwrap_or(*s);
            return Err(PlanError::InconsistentDimensions {
                customer: customer.id.to_string(),
                a: self.symbols.resolve(leaf).to_string(),
                b: self.symbols.resolve(*s).to_string(),
            });
        }
        Ok(leaf_chain)
    }

    fn resolve_chain(
        &self,
        auto: &Registry<'_>,
        customer: &CustomerModel,
        dimensions: &HashMap<String, String>,
    ) -> Result<Result<Vec<ChainLevel>, NewEntity>, PlanError> {
        let mut resolved = Vec::new();
        for rule in &self.attribution {
            let Some(value) = dimensions.get(&rule.dimension) else {
                continue;
            };
            let sym = auto
                .assumed
                .filter(|a| a.value == *value)
                .map(|a| a.sym)
                .or_else(|| self.symbols.get(value));
            let known_type = sym.and_then(|s| self.entity_type_of(customer, auto, s));
            match (sym, known_type) {
                (Some(s), Some(t)) if t == rule.entity_type => resolved.push(Resolved::Known(s)),
                (Some(_), Some(t)) => {
                    return Err(PlanError::WrongEntityType {
                        dimension: rule.dimension.clone(),
                        value: truncate(value),
                        expected: self.type_name(rule.entity_type).to_string(),
                        actual: self.type_name(t).to_string(),
                    });
                }
                _ if rule.on_unknown == OnUnknown::Reject => {
                    return Err(PlanError::UnknownEntity {
                        customer: customer.id.to_string(),
                        dimension: rule.dimension.clone(),
                        value: truncate(value),
                    });
                }
                _ => resolved.push(Resolved::Unknown {
                    dimension: rule.dimension.clone(),
                    value: value.clone(),
                    entity_type: rule.entity_type,
                }),
            }
        }

        let leaf_chain = self.deepest_known(auto, customer, &resolved)?;

        let unknown: Vec<(String, String, usize)> = resolved
            .into_iter()
            .filter_map(|r| match r {
                Resolved::Unknown {
                    dimension,
                    value,
                    entity_type,
                } => Some((dimension, value, entity_type)),
                Resolved::Known(_) => None,
            })
            .collect();
        let chain = match (unknown.as_slice(), leaf_chain) {
            ([], Some(chain)) => chain,
            ([], None) => customer.root.into_iter().collect(),
            ([(dimension, value, entity_type)], known_chain) => {
                let parent = self.new_parent(
                    auto,
                    customer,
                    dimension,
                    value,
                    *entity_type,
                    known_chain.as_deref(),
                )?;
                return Ok(Err(NewEntity {
                    dimension: dimension.clone(),
                    value: value.clone(),
                    entity_type: *entity_type,
                    parent,
                }));
            }
            (many, _) => {
                let names: Vec<&str> = many.iter().map(|(d, _, _)| d.as_str()).collect();
                return Err(PlanError::SeveralUnknown(names.join(", ")));
            }
        };
        Ok(Ok(chain
            .into_iter()
            .map(|e| ChainLevel {
                entity: e,
                // Entity ids are interned, so the symbol is the name.
                entity_id: Name::from(e),
                entity_type: self
                    .entity_type_of(customer, auto, e)
                    .map(|t| self.type_name(t))
                    .unwrap_or_default(),
            })
            .collect()))
    }

    /// The parent an entity created for an unknown id gets: the deepest entity the request
    /// names that may be its parent, else the customer's default parent for its type. The id
    /// must be one a config could declare.
    fn new_parent(
        &self,
        auto: &Registry<'_>,
        customer: &CustomerModel,
        dimension: &str,
        value: &str,
        entity_type: usize,
        known_chain: Option<&[Sym]>,
    ) -> Result<Sym, PlanError> {
        if let Err(problem) = super::model::valid_id(value) {
            return Err(PlanError::BadEntityId {
                dimension: dimension.to_string(),
                value: truncate(&value.escape_debug().to_string()),
                problem,
            });
        }
        let allowed = self
            .entity_types
            .get(entity_type)
            .map(|t| t.parents.as_slice())
            .unwrap_or(&[]);
        known_chain
            .and_then(|c| {
                c.iter().copied().find(|s| {
                    self.entity_type_of(customer, auto, *s)
                        .is_some_and(|t| allowed.contains(&t))
                })
            })
            .or_else(|| customer.auto_parents.get(&entity_type).copied())
            .ok_or_else(|| PlanError::NoDefaultParent {
                customer: customer.id.to_string(),
                dimension: dimension.to_string(),
                value: truncate(value),
                entity_type: self.type_name(entity_type).to_string(),
            })
    }

    fn type_name(&self, t: usize) -> Name {
        self.entity_types.get(t).map(|t| t.name).unwrap_or_default()
    }
}

/// Untrusted values go into error messages at a bounded length.
fn truncate(s: &str) -> String {
    if s.len() <= 64 {
        return s.to_string();
    }
    let mut end = 64;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
