//! Usage queries of one customer (history, top spenders, an entity's budget state): their
//! keys checked against the customer's model, the rollups read from the store, and the
//! arithmetic left to `core::usage_query`. Every front end (HTTP, the portal) calls these.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono_tz::Tz;
use rustc_hash::FxHashMap;

use crate::core::Name;
use crate::core::model::{CustomerModel, LimitKind, Model};
use crate::core::rollup::{DENIED_BY, Granularity, ScanNeeds};
use crate::core::usage::{CUT_BY, FINISHED_PAST};
use crate::core::usage_query::{
    self, FEATURE_KEY, HistoryQuery, HistorySeries, QueryError, SeriesFilter, TopRow,
};
use crate::engine::Engine;
use crate::store::events::{EventPage, StreamEvent};
use crate::store::{CounterStore, StoreError, StoredEntity};

/// Why a usage query was not answered.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error("no customer `{0}`")]
    UnknownCustomer(String),
    #[error("customer `{customer}` has no entity `{entity}`")]
    UnknownEntity { customer: String, entity: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The usage range a query reads when it names none: the last day.
pub const DEFAULT_RANGE_MILLIS: i64 = 86_400_000;

/// How far back the burn rate of a budget projection looks.
pub const BURN_WINDOW_MILLIS: i64 = 15 * 60_000;

/// A history request as the front ends parse it.
#[derive(Debug, Clone)]
pub struct HistoryRequest {
    pub feature: Option<String>,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub window: Granularity,
    pub group_by: Vec<String>,
    pub filters: Vec<(String, String)>,
    pub tz: Tz,
}

impl HistoryRequest {
    /// Every feature over `[from, to)` in UTC windows of `window`, grouped by `group_by` and
    /// filtered on `filters` (attribute, value).
    pub fn utc(
        from: i64,
        to: i64,
        window: Granularity,
        group_by: &[&str],
        filters: &[(&str, &str)],
    ) -> Self {
        Self {
            feature: None,
            from: Some(from),
            to: Some(to),
            window,
            group_by: group_by.iter().map(|s| (*s).to_string()).collect(),
            filters: filters
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            tz: chrono_tz::UTC,
        }
    }
}

/// A history answer: the range it covers (whole windows) and its series.
#[derive(Debug, Clone)]
pub struct History {
    pub from: i64,
    pub to: i64,
    pub window: Granularity,
    pub tz: Tz,
    pub series: Vec<HistorySeries>,
}

/// A top-spenders request.
#[derive(Debug, Clone)]
pub struct TopRequest {
    pub by: String,
    pub feature: Option<String>,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub filters: Vec<(String, String)>,
    pub limit: usize,
}

/// A top-spenders answer and the range it read (widened to whole buckets).
#[derive(Debug, Clone)]
pub struct Top {
    pub by: String,
    pub from: i64,
    pub to: i64,
    pub rows: Vec<TopRow>,
}

/// Most rows one top-spenders answer holds.
pub const MAX_TOP: usize = 1_000;

/// One limit on an entity, as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitState {
    pub limit_id: String,
    pub feature: String,
    pub kind: crate::core::model::KindName,
    pub mode: &'static str,
    /// Where the limit is set: on the entity itself, or on its type.
    pub inherited_from_type: bool,
    pub used: u64,
    /// For a credit pool, what its unexpired grants gave.
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// When a calendar quota starts over.
    pub resets_at: Option<i64>,
    /// When the remaining units run out at the last 15 minutes' burn rate, if before the reset.
    pub projected_exhaustion: Option<i64>,
    /// Units spent in the burn-rate window, and its length.
    pub recent_units: u64,
    pub recent_millis: i64,
}

/// An entity's budget: its type and every limit on it.
#[derive(Debug, Clone)]
pub struct Budget {
    pub entity: String,
    pub entity_type: String,
    pub at: i64,
    pub limits: Vec<LimitState>,
}

fn customer<'a>(model: &'a Model, id: &str) -> Result<&'a CustomerModel, UsageError> {
    model
        .customer(id)
        .ok_or_else(|| UsageError::UnknownCustomer(id.to_string()))
}

/// Keys every record may carry besides the model's: the limit that denied a call, and how a
/// streamed call the gateway stepped into ended.
const RECORD_KEYS: [&str; 3] = [DENIED_BY, CUT_BY, FINISHED_PAST];

/// Whether `key` names something a record carries: the feature, an entity type's level
/// (`<type>Id`), a recorded dimension, the limit that denied, or how a stream ended.
fn known_key(model: &Model, key: &str) -> bool {
    key == FEATURE_KEY
        || RECORD_KEYS.contains(&key)
        || model.chain_keys.iter().any(|k| k.as_str() == key)
        || model.recorded_dimensions.iter().any(|k| k.as_str() == key)
}

fn keys_hint(model: &Model) -> String {
    let mut keys: Vec<&str> = vec![FEATURE_KEY];
    keys.extend(RECORD_KEYS);
    keys.extend(model.chain_keys.iter().map(Name::as_str));
    keys.extend(model.recorded_dimensions.iter().map(Name::as_str));
    keys.join(", ")
}

fn check_keys<'a>(
    model: &Model,
    param: &'static str,
    keys: impl IntoIterator<Item = &'a str>,
) -> Result<(), QueryError> {
    for k in keys {
        if !known_key(model, k) {
            return Err(QueryError::new(
                param,
                format!(
                    "`{k}` is not a key usage is recorded by; known: {}",
                    keys_hint(model)
                ),
            ));
        }
    }
    Ok(())
}

fn filter(
    model: &Model,
    feature: Option<&String>,
    filters: &[(String, String)],
) -> Result<SeriesFilter, QueryError> {
    if let Some(f) = feature
        && model.feature(f).is_none()
    {
        return Err(QueryError::new("featureId", format!("no feature `{f}`")));
    }
    check_keys(model, "filter", filters.iter().map(|(k, _)| k.as_str()))?;
    Ok(SeriesFilter {
        feature: feature.cloned(),
        equals: filters.to_vec(),
    })
}

fn range(from: Option<i64>, to: Option<i64>, now: i64) -> (i64, i64) {
    let to = to.unwrap_or(now);
    (from.unwrap_or(to - DEFAULT_RANGE_MILLIS), to)
}

/// Usage of `customer_id` over time, in windows, grouped and filtered.
pub async fn history(
    engine: &Engine,
    customer_id: &str,
    req: HistoryRequest,
) -> Result<History, UsageError> {
    let model = engine.model();
    let c = customer(&model, customer_id)?;
    check_keys(&model, "groupBy", req.group_by.iter().map(String::as_str))?;
    let filter = filter(&model, req.feature.as_ref(), &req.filters)?;
    let now = engine.now().millis();
    let (from, to) = range(req.from, req.to, now);
    let q = HistoryQuery {
        from,
        to,
        window: req.window,
        group_by: req.group_by,
        filter,
        tz: req.tz,
    };
    let max_points = model.records.max_query_points;
    let plan = usage_query::plan_history(&q, now, &model.records, max_points)?;
    let (read_from, read_to) = plan.range();
    let needs = q.filter.needs(q.group_by.iter().map(String::as_str), now);
    let rows = engine
        .store()
        .usage()
        .usage_buckets(c.id, plan.granularity, read_from, read_to, &needs)
        .await?;
    let series = usage_query::group_history(&q, &plan, &rows, max_points)?;
    Ok(History {
        from: read_from,
        to: read_to,
        window: q.window,
        tz: q.tz,
        series,
    })
}

/// The values of one key that spent the most.
pub async fn top(engine: &Engine, customer_id: &str, req: TopRequest) -> Result<Top, UsageError> {
    let model = engine.model();
    let c = customer(&model, customer_id)?;
    check_keys(&model, "by", [req.by.as_str()])?;
    if !(1..=MAX_TOP).contains(&req.limit) {
        return Err(QueryError::new("limit", format!("must be from 1 to {MAX_TOP}")).into());
    }
    let filter = filter(&model, req.feature.as_ref(), &req.filters)?;
    let now = engine.now().millis();
    let (from, to) = range(req.from, req.to, now);
    let (from, to, segments) = usage_query::plan_segments(from, to, now, &model.records)?;
    let needs = filter.needs([req.by.as_str()], now);
    let scans = read_segments(engine, c.id, segments, &needs).await?;
    Ok(Top {
        rows: usage_query::top(&scans, &req.by, &filter, req.limit),
        by: req.by,
        from,
        to,
    })
}

/// The buckets of `segments` of `customer`, one store read each, in order.
async fn read_segments(
    engine: &Engine,
    customer: Name,
    segments: Vec<usage_query::Segment>,
    needs: &ScanNeeds,
) -> Result<Vec<crate::core::rollup::BucketScan>, UsageError> {
    let mut scans = Vec::with_capacity(segments.len());
    for (g, a, b) in segments {
        scans.push(
            engine
                .store()
                .usage()
                .usage_buckets(customer, g, a, b, needs)
                .await?,
        );
    }
    Ok(scans)
}

/// The periods a spend query compares: the last day (in hours), week or month (in days).
pub const SPEND_DAYS: [u32; 3] = [1, 7, 30];

/// A spend request: the last `days` against the `days` before, by one key.
#[derive(Debug, Clone)]
pub struct SpendRequest {
    pub by: String,
    pub days: u32,
    pub feature: Option<String>,
    pub filters: Vec<(String, String)>,
}

/// A spend answer: the periods it compared and what they added up to, with the operator's
/// currency when one is set.
#[derive(Debug, Clone)]
pub struct Spend {
    pub by: String,
    pub days: u32,
    pub previous_from: i64,
    pub from: i64,
    pub to: i64,
    pub window: Granularity,
    pub report: usage_query::SpendReport,
    pub currency: Option<crate::core::model::Currency>,
}

/// What `customer_id` spent in the last `days` against the `days` before, by `by`: credits
/// (charged, or its calls' tokens priced with the price table in force when they were
/// recorded), units, calls and denials, over time and by value, and what refused the denials.
pub async fn spend(
    engine: &Engine,
    customer_id: &str,
    req: SpendRequest,
) -> Result<Spend, UsageError> {
    let model = engine.model();
    let c = customer(&model, customer_id)?;
    check_keys(&model, "by", [req.by.as_str()])?;
    if !SPEND_DAYS.contains(&req.days) {
        return Err(QueryError::new("days", "must be 1, 7 or 30").into());
    }
    let filter = filter(&model, req.feature.as_ref(), &req.filters)?;
    let now = engine.now().millis();
    let window = if req.days == 1 {
        Granularity::Hour
    } else {
        Granularity::Day
    };
    let w = window.millis();
    // Whole windows, the current one last: the last 24 hours, or the last 7 or 30 days.
    let to = now - now.rem_euclid(w) + w;
    let span = i64::from(req.days) * Granularity::Day.millis();
    let (from, previous_from) = (to - span, to - 2 * span);
    // Whole windows only, to the end of the current one: today's day bucket is kept current
    // with every record, so day windows read day buckets alone (no hour or minute buckets at
    // the edge).
    let (_, _, segments) =
        usage_query::plan_segments(previous_from.max(0), to, now, &model.records)?;
    let needs = filter.needs([req.by.as_str(), "model", DENIED_BY], now);
    let scans = read_segments(engine, c.id, segments, &needs).await?;
    let q = usage_query::SpendQuery {
        by: req.by.clone(),
        filter,
        previous_from,
        from,
        to,
        window_millis: w,
    };
    // One price lookup per table and model, however many buckets (looked up by the borrowed
    // name: a row costs no allocation once its model was priced).
    let mut prices: FxHashMap<i64, FxHashMap<String, Option<crate::core::plan::PriceSnapshot>>> =
        FxHashMap::default();
    let report = usage_query::spend(&scans, &q, |at, name| {
        let table = model.price_table_at(crate::core::Timestamp::from_millis(at))?;
        let known = prices.entry(table.effective_from.millis()).or_default();
        if let Some(p) = known.get(name) {
            return *p;
        }
        let p = table
            .models
            .iter()
            .find(|p| p.pattern.matches(name))
            .map(crate::core::plan::PriceSnapshot::from);
        known.insert(name.to_string(), p);
        p
    });
    Ok(Spend {
        by: req.by,
        days: req.days,
        previous_from,
        from,
        to,
        window,
        report,
        currency: model.currency.clone(),
    })
}

/// Every limit on entity `entity_id` of `customer_id`: usage, remaining, reset and the
/// projected exhaustion from the recent burn rate.
pub async fn budget(
    engine: &Engine,
    customer_id: &str,
    entity_id: &str,
) -> Result<Budget, UsageError> {
    let mut all = budgets(engine, customer_id, &[entity_id]).await?;
    all.pop().ok_or_else(|| UsageError::UnknownEntity {
        customer: customer_id.to_string(),
        entity: entity_id.to_string(),
    })
}

/// [`budget`] for several entities of one customer, reading the burn-rate buckets once (the
/// portal's overview shows a page of entities at a time).
pub async fn budgets(
    engine: &Engine,
    customer_id: &str,
    entity_ids: &[&str],
) -> Result<Vec<Budget>, UsageError> {
    let model = engine.model();
    let c = customer(&model, customer_id)?;
    let now = engine.now();
    // The burn rate: each entity's units per feature over the last minutes, from minute
    // buckets (or the coarsest still kept, if minutes are configured shorter).
    let (g, from, to) = usage_query::plan_range(
        now.millis() - BURN_WINDOW_MILLIS,
        now.millis(),
        now.millis(),
        &model.records,
    )?;
    let rows = engine
        .store()
        .usage()
        .usage_buckets(c.id, g, from, to, &ScanNeeds::all(now.millis()))
        .await?;
    let recent_millis = (now.millis() - from).max(1);
    let mut out = Vec::with_capacity(entity_ids.len());
    for entity_id in entity_ids {
        let unknown = || UsageError::UnknownEntity {
            customer: customer_id.to_string(),
            entity: (*entity_id).to_string(),
        };
        let (sym, entity_type) = match model
            .symbols
            .get(entity_id)
            .and_then(|s| c.entities.get(&s).map(|n| (s, n.entity_type)))
        {
            Some(found) => found,
            None => created_on_the_fly(engine, &model, c, entity_id)
                .await?
                .ok_or_else(unknown)?,
        };
        let type_key = model
            .chain_keys
            .get(entity_type)
            .map(Name::as_str)
            .unwrap_or_default();
        let on_entity = c.limits_by_entity.get(&sym).into_iter().flatten();
        let on_type = c.limits_by_type.get(&entity_type).into_iter().flatten();
        let mut limits = Vec::new();
        for (i, inherited) in on_entity
            .map(|i| (*i, false))
            .chain(on_type.map(|i| (*i, true)))
        {
            let Some(limit) = c.limits.get(i) else {
                continue;
            };
            let feature = model
                .features
                .get(limit.feature)
                .map(|f| f.id.to_string())
                .unwrap_or_default();
            let inspected = engine
                .inspect(customer_id, entity_id, limit.id.as_str(), None)
                .await?
                .unwrap_or_default();
            let used = inspected.used;
            let recent_units: u64 = rows
                .rows()
                .filter(|(_, k, _)| {
                    k.feature.as_ref() == feature && k.get(type_key) == Some(*entity_id)
                })
                .map(|(_, _, m)| m.units)
                .sum();
            let (cap, resets_at) = match &limit.kind {
                LimitKind::Rate { limit, .. } => (Some(*limit), None),
                LimitKind::Quota { limit, period } => {
                    (Some(*limit), Some(period.period_at(now).1.millis()))
                }
                LimitKind::Concurrency { limit } => (Some(u64::from(*limit)), None),
                // What the unexpired grants gave (0 before the first grant).
                LimitKind::Credits { .. } => (Some(inspected.granted.unwrap_or(0)), None),
            };
            let remaining = match inspected.available {
                Some(left) => Some(left),
                None => cap.map(|l| l.saturating_sub(used)),
            };
            // A projection means something only for what runs out and stays out until a
            // calendar reset or a new grant: quotas and credit pools. A rolling rate limit
            // recovers on its own within its window, and a concurrency slot frees at once.
            let projected = match (&limit.kind, remaining) {
                (LimitKind::Rate { .. } | LimitKind::Concurrency { .. }, _) | (_, None) => None,
                (_, Some(r)) => usage_query::projected_exhaustion(
                    now.millis(),
                    r,
                    recent_units,
                    recent_millis,
                    resets_at,
                ),
            };
            limits.push(LimitState {
                limit_id: limit.id.to_string(),
                feature,
                kind: limit.kind.name(),
                mode: limit.mode.as_str(),
                inherited_from_type: inherited,
                used,
                limit: cap,
                remaining,
                resets_at,
                projected_exhaustion: projected,
                recent_units,
                recent_millis,
            });
        }
        out.push(Budget {
            entity: (*entity_id).to_string(),
            entity_type: model
                .entity_types
                .get(entity_type)
                .map(|t| t.name.to_string())
                .unwrap_or_default(),
            at: now.millis(),
            limits,
        });
    }
    Ok(out)
}

/// Entity `id` of `c` as the store created it on the fly: its symbol (interned here, since the
/// store holds it and the customer's cap bounds how many there are) and its type.
async fn created_on_the_fly(
    engine: &Engine,
    model: &Model,
    c: &CustomerModel,
    id: &str,
) -> Result<Option<(crate::core::Sym, usize)>, UsageError> {
    let probe = StoredEntity {
        entity_type: String::new(),
        parent: String::new(),
    };
    let found = engine
        .store()
        .auto_entity(c.id, id, &probe, 0, false)
        .await?;
    let crate::store::AutoEntityOutcome::Found(e) = found else {
        return Ok(None);
    };
    let Some(t) = model
        .entity_types
        .iter()
        .position(|t| t.name.as_str() == e.entity_type)
    else {
        return Ok(None);
    };
    Ok(Some((model.symbols.intern(id), t)))
}

/// One entity in a page of the tree: its id, type and how many children it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityRow {
    pub id: String,
    pub entity_type: String,
    pub children: usize,
}

/// A page of entities and how many there are in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityPage {
    pub rows: Vec<EntityRow>,
    pub total: usize,
}

/// A page of `customer_id`'s tree, sorted by id: the children of `parent` (the top level when
/// `None`), or, with a `query`, every entity whose id contains it (case-insensitive). One pass
/// over the customer's entities, those created on the fly included, so a customer with
/// 100,000 users is paged, never listed.
pub async fn entity_page(
    engine: &Engine,
    customer_id: &str,
    parent: Option<&str>,
    query: Option<&str>,
    offset: usize,
    limit: usize,
) -> Result<EntityPage, UsageError> {
    let model = engine.model();
    let c = customer(&model, customer_id)?;
    let stored = engine.store().auto_entities(c.id).await?;
    // An id in the model wins over a stored one of the same name (an entity added to the
    // configuration after it was created on the fly).
    let auto: Vec<&(String, StoredEntity)> = stored
        .iter()
        .filter(|(id, _)| {
            model
                .symbols
                .get(id)
                .is_none_or(|s| !c.entities.contains_key(&s))
        })
        .collect();
    let type_name = |t: usize| model.entity_types.get(t).map_or("", |t| t.name.as_str());
    // Children by parent: the model's entities by symbol (no string work for the 100,000),
    // those created on the fly by the parent's id.
    let mut children: FxHashMap<crate::core::Sym, usize> = FxHashMap::default();
    for node in c.entities.values() {
        if let Some(p) = node.parent {
            *children.entry(p).or_default() += 1;
        }
    }
    let mut auto_children: FxHashMap<&str, usize> = FxHashMap::default();
    for (_, e) in &auto {
        *auto_children.entry(e.parent.as_str()).or_default() += 1;
    }
    let parent_sym = match parent {
        None => None,
        Some(p) => {
            let known = model.symbols.get(p).filter(|s| c.entities.contains_key(s));
            if known.is_none() && !auto.iter().any(|(id, _)| id == p) {
                return Err(UsageError::UnknownEntity {
                    customer: customer_id.to_string(),
                    entity: p.to_string(),
                });
            }
            known
        }
    };
    let query = query.map(str::to_lowercase).filter(|q| !q.is_empty());
    let hit = |id: &str| {
        query
            .as_ref()
            .is_some_and(|q| id.to_lowercase().contains(q.as_str()))
    };
    // (id, type name, symbol when the model has it)
    let mut matching: Vec<(&str, &str, Option<crate::core::Sym>)> = c
        .entities
        .iter()
        .filter(|(_, node)| match &query {
            Some(_) => hit(node.id.as_str()),
            // A parent only an entity created on the fly has: no model entity under it.
            None => parent.is_some() == node.parent.is_some() && node.parent == parent_sym,
        })
        .map(|(sym, node)| (node.id.as_str(), type_name(node.entity_type), Some(*sym)))
        .collect();
    matching.extend(
        auto.iter()
            .filter(|(id, e)| match &query {
                Some(_) => hit(id),
                None => Some(e.parent.as_str()) == parent,
            })
            .map(|(id, e)| (id.as_str(), e.entity_type.as_str(), None)),
    );
    matching.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let total = matching.len();
    let rows = matching
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|(id, t, sym)| EntityRow {
            id: id.to_string(),
            entity_type: t.to_string(),
            children: sym.and_then(|s| children.get(&s)).copied().unwrap_or(0)
                + auto_children.get(id).copied().unwrap_or(0),
        })
        .collect();
    Ok(EntityPage { rows, total })
}

/// What a follower of the usage stream receives.
#[derive(Debug, Clone)]
pub enum Followed {
    Event(StreamEvent),
    /// The cursor was older than what is kept: events may have been missed before the next.
    Gap,
    /// The store could not be read; the follower tries again.
    Unavailable(String),
}

/// Events read per store call while following.
const FOLLOW_PAGE: usize = 256;

struct Follower {
    store: Arc<dyn CounterStore>,
    customer: Option<Name>,
    cursor: Option<String>,
    buffer: VecDeque<Followed>,
    signal: tokio::sync::watch::Receiver<u64>,
    poll: Duration,
    stopping: tokio::sync::watch::Receiver<bool>,
    /// The cursor a gap was last reported at: the same gap on an empty page is not news, and
    /// reporting it again would spin (the cursor cannot move without an event).
    gap_at: Option<Option<String>>,
}

impl Follower {
    /// Whether `page` brings anything to hand on.
    fn news(&self, page: &EventPage) -> bool {
        !page.events.is_empty() || (page.gap && self.gap_at.as_ref() != Some(&self.cursor))
    }

    fn take(&mut self, page: EventPage) {
        if page.gap && self.gap_at.as_ref() != Some(&self.cursor) {
            self.buffer.push_back(Followed::Gap);
            self.gap_at = Some(self.cursor.clone());
        }
        if let Some(last) = page.events.last() {
            self.cursor = Some(last.id.clone());
        }
        self.buffer
            .extend(page.events.into_iter().map(Followed::Event));
    }
}

/// Follows the usage stream of `customer` (every customer when `None`) from after `after`:
/// the first page is read now, so a bad cursor or an unreachable store is an error to answer
/// with; then events as they come, woken by this process's events and polled every `poll`
/// for other replicas'. Ends when `stopping` turns true.
pub async fn follow(
    store: Arc<dyn CounterStore>,
    customer: Option<Name>,
    after: Option<String>,
    poll: Duration,
    stopping: tokio::sync::watch::Receiver<bool>,
) -> Result<impl futures_util::Stream<Item = Followed> + Send + 'static, StoreError> {
    let signal = store.usage().event_signal();
    let first = store
        .usage()
        .read_events(customer, after.as_deref(), FOLLOW_PAGE)
        .await?;
    let mut f = Follower {
        store,
        customer,
        cursor: after,
        buffer: VecDeque::new(),
        signal,
        poll,
        stopping,
        gap_at: None,
    };
    f.take(first);
    Ok(futures_util::stream::unfold(f, |mut f| async move {
        loop {
            if *f.stopping.borrow() {
                return None;
            }
            if let Some(item) = f.buffer.pop_front() {
                return Some((item, f));
            }
            // Marked seen before reading, so an event added during the read still wakes.
            f.signal.borrow_and_update();
            match f
                .store
                .usage()
                .read_events(f.customer, f.cursor.as_deref(), FOLLOW_PAGE)
                .await
            {
                Ok(page) if f.news(&page) => f.take(page),
                Ok(_) => {
                    tokio::select! {
                        _ = f.signal.changed() => {}
                        _ = tokio::time::sleep(f.poll) => {}
                        _ = f.stopping.changed() => {}
                    }
                }
                Err(e) => {
                    tokio::select! {
                        _ = tokio::time::sleep(f.poll) => {}
                        _ = f.stopping.changed() => {}
                    }
                    return Some((Followed::Unavailable(e.to_string()), f));
                }
            }
        }
    }))
}
