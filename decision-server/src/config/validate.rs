//! The model validator: checks a parsed document (ids, references, the entity hierarchy,
//! limits, grants, prices) and builds the decision model from it, collecting every problem
//! with its path instead of stopping at the first.

use crate::core::model::Currency;
use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use rustc_hash::FxHashMap;

use super::dto::*;
use super::{ConfigError, ConfigErrors, DEFAULT_HOLD_TTL, DEFAULT_MAX_AUTO_ENTITIES};
use crate::core::model::{
    AlertDelivery, AlertRule, Attribution, CustomerModel, DrawRule, EntityNode, EntityType,
    Feature, GrantCategory, GrantSpec, Limit, LimitKind, LimitTarget, Mode, Model, ModelPrice,
    OnUnknown, PriceTable, Webhook, valid_id,
};
use crate::core::period::{CalendarPeriod, parse_fixed_millis};

/// How far under a threshold (percent of it) usage falls before the alert re-arms.
const DEFAULT_ALERT_HYSTERESIS: u32 = 10;
use crate::core::rollup::{Granularity, RecordSettings};
use crate::core::window::RollingWindow;
use crate::core::{Name, Symbols, Timestamp};

/// Validates a model document and builds the decision model from it.
pub fn build_model(doc: &ConfigDoc, file: &str) -> Result<Model, ConfigErrors> {
    let mut v = Validator {
        file,
        errors: Vec::new(),
    };
    let model = v.build(doc);
    if v.errors.is_empty() {
        Ok(model)
    } else {
        Err(ConfigErrors(v.errors))
    }
}

struct Validator<'f> {
    file: &'f str,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            path: path.into(),
            message: message.into(),
        });
    }

    fn check_id(&mut self, path: String, id: &str) {
        if let Err(m) = valid_id(id) {
            self.err(path, m);
        }
    }

    /// Records `id` as seen at `path`; reports a duplicate naming the first place, and returns
    /// whether `id` was new.
    fn unique(
        &mut self,
        seen: &mut HashMap<String, String>,
        what: &str,
        id: &str,
        path: String,
    ) -> bool {
        if let Some(first) = seen.get(id) {
            let msg = format!("duplicate {what} `{id}` (first defined at {first})");
            self.err(path, msg);
            false
        } else {
            seen.insert(id.to_string(), path);
            true
        }
    }

    fn build(&mut self, doc: &ConfigDoc) -> Model {
        let symbols = Symbols::new();
        let hold_ttl = doc.hold_ttl.as_deref().unwrap_or(DEFAULT_HOLD_TTL);
        let hold_ttl_millis = match parse_fixed_millis(hold_ttl) {
            Ok(ms) => ms,
            Err(e) => {
                self.err("holdTtl", e.to_string());
                0
            }
        };
        let entity_types = self.entity_types(&doc.entity_types);
        let type_index: HashMap<&str, usize> = entity_types
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let attribution = self.attribution(&doc.attribution, &entity_types, &type_index);
        let (features, feature_index) = self.features(&doc.features);
        let prices = self.prices(&doc.prices);

        let mut dimensions: HashSet<String> =
            attribution.iter().map(|a| a.dimension.clone()).collect();
        dimensions.extend(entity_types.iter().filter_map(|t| t.dimension.clone()));
        dimensions.insert("model".to_string());
        let records_dto = doc.usage_records.clone().unwrap_or_default();
        let records = self.record_settings(&records_dto);
        for (i, d) in records_dto.dimensions.iter().enumerate() {
            self.check_id(format!("usageRecords.dimensions[{i}]"), d);
            dimensions.insert(d.clone());
        }
        let mut recorded_dimensions: Vec<Name> = dimensions
            .iter()
            .filter(|d| !attribution.iter().any(|a| &a.dimension == *d))
            .map(|d| Name::from(symbols.intern(d)))
            .collect();
        recorded_dimensions.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        let chain_keys = entity_types
            .iter()
            .map(|t| Name::from(symbols.intern(&format!("{}Id", t.name))))
            .collect();

        let alerting = self.alert_delivery(doc.alerting.as_ref());
        let ctx = Ctx {
            alerting: &alerting,
            entity_types: &entity_types,
            type_index: &type_index,
            feature_index: &feature_index,
            dimensions: &dimensions,
            symbols: &symbols,
            minute_retention: records.retention(Granularity::Minute),
        };
        let mut customers = FxHashMap::default();
        let mut seen = HashMap::new();
        let mut key_ids = HashMap::new();
        for (ci, c) in doc.customers.iter().enumerate() {
            let path = format!("customers[{ci}]");
            self.check_id(format!("{path}.id"), &c.id);
            self.unique(&mut seen, "customer", &c.id, format!("{path}.id"));
            for (ki, k) in c.api_keys.iter().enumerate() {
                let kpath = format!("{path}.apiKeys[{ki}]");
                self.check_id(format!("{kpath}.id"), &k.id);
                self.unique(&mut key_ids, "API key", &k.id, format!("{kpath}.id"));
                if let Some(label) = &k.label
                    && let Err(why) = check_text(label, MAX_LABEL)
                {
                    self.err(format!("{kpath}.label"), why);
                }
                if k.sha256.len() != 64 || !k.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    self.err(
                        format!("{kpath}.sha256"),
                        "not a hex SHA-256 digest (64 hex digits)",
                    );
                }
            }
            let model = self.customer(&ctx, &path, c);
            customers.insert(c.id.clone(), model);
        }
        Model {
            symbols,
            entity_types,
            attribution,
            features,
            feature_index,
            prices,
            customers,
            hold_ttl_millis,
            dimensions,
            recorded_dimensions,
            chain_keys,
            records,
            alert_hysteresis_percent: self.hysteresis(doc.alerting.as_ref()),
            alerting,
            currency: doc.currency.as_ref().and_then(|c| self.currency(c)),
        }
    }

    /// `currency`: an ISO 4217 code and a positive worth per credit of at most six decimals.
    fn currency(&mut self, dto: &CurrencyDto) -> Option<Currency> {
        let code_ok = dto.code.len() == 3 && dto.code.bytes().all(|b| b.is_ascii_uppercase());
        if !code_ok {
            self.err(
                "currency.code",
                format!(
                    "`{}` is not an ISO 4217 code (three capital letters)",
                    dto.code.chars().take(16).collect::<String>()
                ),
            );
        }
        let micros = dto.per_credit * 1_000_000.0;
        let exact = (micros - micros.round()).abs() < 1e-6;
        if !(dto.per_credit.is_finite() && dto.per_credit > 0.0 && micros <= 1e15 && exact) {
            self.err(
                "currency.perCredit",
                format!(
                    "{} is not a positive amount of at most six decimals",
                    dto.per_credit
                ),
            );
            return None;
        }
        // Checked finite, positive and under 1e15 above: the cast keeps it whole.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let micros_per_credit = micros.round() as u64;
        code_ok.then(|| Currency {
            code: dto.code.clone(),
            micros_per_credit,
        })
    }

    fn alert_delivery(&mut self, dto: Option<&AlertingDto>) -> AlertDelivery {
        const DEFAULT_RETRIES: [&str; 7] =
            ["PT5S", "PT5M", "PT30M", "PT2H", "PT5H", "PT10H", "PT10H"];
        let given = dto.and_then(|a| a.retry_schedule.clone());
        let texts: Vec<String> =
            given.unwrap_or_else(|| DEFAULT_RETRIES.iter().map(ToString::to_string).collect());
        let mut retry_millis = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            match parse_fixed_millis(t) {
                Ok(ms) => retry_millis.push(ms),
                Err(e) => self.err(format!("alerting.retrySchedule[{i}]"), e.to_string()),
            }
        }
        let timeout_millis = match dto.and_then(|a| a.timeout_ms) {
            None => 10_000,
            Some(ms) if (1..=60_000).contains(&ms) => i64::from(ms),
            Some(ms) => {
                self.err("alerting.timeoutMs", format!("{ms} is not from 1 to 60000"));
                10_000
            }
        };
        let mut allow = Vec::new();
        for (i, t) in dto
            .and_then(|a| a.allow_targets.as_ref())
            .into_iter()
            .flatten()
            .enumerate()
        {
            match t.parse::<ipnet::IpNet>() {
                Ok(n) => allow.push(n),
                Err(e) => self.err(
                    format!("alerting.allowTargets[{i}]"),
                    format!("`{t}` is not an address range like 10.0.0.0/8: {e}"),
                ),
            }
        }
        let budget = |v: Option<u32>, default: usize| v.map_or(default, |n| n as usize);
        AlertDelivery {
            retry_millis,
            timeout_millis,
            targets: crate::alerts::target::TargetPolicy::new(allow),
            max_rules: budget(dto.and_then(|a| a.max_rules_per_customer), 50),
            max_thresholds: budget(dto.and_then(|a| a.max_thresholds_per_rule), 10),
            max_webhooks: budget(dto.and_then(|a| a.max_webhooks_per_customer), 10),
        }
    }

    fn hysteresis(&mut self, dto: Option<&AlertingDto>) -> u32 {
        match dto.and_then(|a| a.hysteresis_percent) {
            None => DEFAULT_ALERT_HYSTERESIS,
            Some(p) if p <= 100 => p,
            Some(p) => {
                self.err("alerting.hysteresisPercent", format!("{p} is over 100"));
                DEFAULT_ALERT_HYSTERESIS
            }
        }
    }

    /// `usageRecords`: retention by bucket size (each at least its bucket, hour at least as
    /// long as minute, day at least as long as hour) and the fold cap.
    fn record_settings(&mut self, dto: &UsageRecordsDto) -> RecordSettings {
        let mut settings = RecordSettings {
            enabled: dto.enabled.unwrap_or(true),
            ..RecordSettings::default()
        };
        let given = [
            (&dto.retention.minute, Granularity::Minute, "minute"),
            (&dto.retention.hour, Granularity::Hour, "hour"),
            (&dto.retention.day, Granularity::Day, "day"),
        ];
        for (value, g, name) in given {
            let Some(text) = value else { continue };
            let path = format!("usageRecords.retention.{name}");
            match parse_fixed_millis(text) {
                Ok(ms) if ms >= g.millis() => settings.retention_millis[g.index()] = ms,
                Ok(_) => self.err(path, format!("`{text}` is shorter than one {name} bucket")),
                Err(e) => self.err(path, e.to_string()),
            }
        }
        let [m, h, d] = settings.retention_millis;
        if h < m || d < h {
            self.err(
                "usageRecords.retention",
                "a coarser bucket must be kept at least as long as a finer one (minute ≤ hour ≤ day)",
            );
        }
        if let Some(n) = dto.max_values_per_dimension {
            if !(1..=1_000_000).contains(&n) {
                self.err(
                    "usageRecords.maxValuesPerDimension",
                    format!("{n} is not from 1 to 1000000"),
                );
            }
            settings.max_values_per_dimension = n;
        }
        if let Some(n) = dto.max_query_points {
            if !(10..=1_000_000).contains(&n) {
                self.err(
                    "usageRecords.maxQueryPoints",
                    format!("{n} is not from 10 to 1000000"),
                );
            }
            settings.max_query_points = n;
        }
        settings
    }

    fn entity_types(&mut self, dtos: &[EntityTypeDto]) -> Vec<EntityType> {
        let mut seen = HashMap::new();
        for (i, t) in dtos.iter().enumerate() {
            self.check_id(format!("entityTypes[{i}].name"), &t.name);
            self.unique(
                &mut seen,
                "entity type",
                &t.name,
                format!("entityTypes[{i}].name"),
            );
        }
        let index: HashMap<&str, usize> = dtos
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let mut out = Vec::with_capacity(dtos.len());
        for (i, t) in dtos.iter().enumerate() {
            let path = format!("entityTypes[{i}]");
            let mut parents = Vec::new();
            for (pi, p) in t.parents.iter().enumerate() {
                match index.get(p.as_str()) {
                    Some(&j) if dtos.get(j).is_some_and(|d| d.dimensional) => self.err(
                        format!("{path}.parents[{pi}]"),
                        format!(
                            "`{p}` is a dimensional type; dimensional types are not in the tree"
                        ),
                    ),
                    Some(&j) => parents.push(j),
                    None => self.err(
                        format!("{path}.parents[{pi}]"),
                        format!("unknown entity type `{p}`"),
                    ),
                }
            }
            if t.dimensional {
                if !t.parents.is_empty() {
                    self.err(
                        format!("{path}.parents"),
                        "a dimensional type has no parents; it is not in the tree",
                    );
                }
                if t.dimension.is_none() {
                    self.err(
                        format!("{path}.dimension"),
                        "a dimensional type must name the request dimension that carries it",
                    );
                }
            } else if t.dimension.is_some() {
                self.err(format!("{path}.dimension"), "only a dimensional type names a dimension; attribute tree types with `attribution`");
            }
            out.push(EntityType {
                name: Name::from(&t.name),
                parents,
                dimensional: t.dimensional,
                dimension: t.dimension.clone(),
            });
        }
        // The parent relation between types must be acyclic, or a tree could loop.
        for start in 0..out.len() {
            let mut stack: Vec<usize> = out
                .get(start)
                .map(|t| t.parents.clone())
                .unwrap_or_default();
            let mut visited = HashSet::new();
            while let Some(t) = stack.pop() {
                if t == start {
                    let name = out.get(start).map(|t| t.name).unwrap_or_default();
                    self.err(
                        format!("entityTypes[{start}].parents"),
                        format!("entity type `{name}` is its own ancestor"),
                    );
                    break;
                }
                if visited.insert(t) {
                    stack.extend(out.get(t).map(|t| t.parents.clone()).unwrap_or_default());
                }
            }
        }
        out
    }

    fn attribution(
        &mut self,
        dtos: &[AttributionDto],
        types: &[EntityType],
        type_index: &HashMap<&str, usize>,
    ) -> Vec<Attribution> {
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        for (i, a) in dtos.iter().enumerate() {
            let path = format!("attribution[{i}]");
            self.unique(
                &mut seen,
                "attribution for dimension",
                &a.dimension,
                format!("{path}.dimension"),
            );
            match type_index.get(a.entity_type.as_str()) {
                Some(&t) if types.get(t).is_some_and(|t| t.dimensional) => self.err(
                    format!("{path}.entityType"),
                    format!(
                        "`{}` is a dimensional type; attribution maps dimensions to tree entities",
                        a.entity_type
                    ),
                ),
                Some(&t) => out.push(Attribution {
                    dimension: a.dimension.clone(),
                    entity_type: t,
                    on_unknown: match a.on_unknown {
                        OnUnknownDto::Reject => OnUnknown::Reject,
                        OnUnknownDto::Create => OnUnknown::Create,
                    },
                    required: a.required,
                }),
                None => self.err(
                    format!("{path}.entityType"),
                    format!("unknown entity type `{}`", a.entity_type),
                ),
            }
        }
        out
    }

    fn features(&mut self, dtos: &[FeatureDto]) -> (Vec<Feature>, FxHashMap<String, usize>) {
        let mut seen = HashMap::new();
        for (i, f) in dtos.iter().enumerate() {
            self.check_id(format!("features[{i}].id"), &f.id);
            self.unique(&mut seen, "feature", &f.id, format!("features[{i}].id"));
        }
        let index: FxHashMap<String, usize> = dtos
            .iter()
            .enumerate()
            .map(|(i, f)| (f.id.clone(), i))
            .collect();
        let mut out = Vec::new();
        for (i, f) in dtos.iter().enumerate() {
            let mut also = Vec::new();
            for (j, d) in f.also_draws.iter().enumerate() {
                let path = format!("features[{i}].alsoDraws[{j}].feature");
                match index.get(&d.feature) {
                    Some(&k) if k == i => {
                        self.err(path, format!("feature `{}` cannot draw on itself", f.id))
                    }
                    Some(&k) => also.push((
                        k,
                        match d.per {
                            PerDto::Request => DrawRule::PerRequest,
                            PerDto::Price => DrawRule::Priced,
                        },
                    )),
                    None => self.err(path, format!("unknown feature `{}`", d.feature)),
                }
            }
            if f.max_settle_usage == Some(0) {
                self.err(
                    format!("features[{i}].maxSettleUsage"),
                    "must be at least 1; leave it out for ten times the requested usage",
                );
            }
            out.push(Feature {
                id: Name::from(&f.id),
                also_draws: also,
                max_settle: f.max_settle_usage,
                commit_at_check: f.commit_at_check,
            });
        }
        (out, index)
    }

    fn prices(&mut self, dtos: &[PriceTableDto]) -> Vec<PriceTable> {
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        for (i, t) in dtos.iter().enumerate() {
            self.unique(
                &mut seen,
                "price table version",
                &t.version,
                format!("prices[{i}].version"),
            );
            let mut models = Vec::new();
            for (j, m) in t.models.iter().enumerate() {
                match glob::Pattern::new(&m.pattern) {
                    Ok(pattern) => models.push(ModelPrice {
                        pattern,
                        input_per_million: m.input_per_million,
                        output_per_million: m.output_per_million,
                        cached_per_million: m.cached_per_million,
                        cache_write_per_million: m
                            .cache_write_per_million
                            .unwrap_or(m.input_per_million),
                        context_window: m.context_window,
                        max_output: m.max_output,
                    }),
                    Err(e) => self.err(
                        format!("prices[{i}].models[{j}].match"),
                        format!("`{}` is not a valid pattern: {e}", m.pattern),
                    ),
                }
            }
            out.push(PriceTable {
                version: t.version.clone(),
                effective_from: Timestamp::from_datetime(t.effective_from),
                models,
            });
        }
        out
    }

    fn customer(&mut self, ctx: &Ctx<'_>, path: &str, c: &CustomerDto) -> CustomerModel {
        let syms = ctx.symbols;
        let mut entities: FxHashMap<crate::core::Sym, EntityNode> = FxHashMap::default();
        let mut seen = HashMap::new();
        // The first declaration of an id wins; later ones are reported as duplicates.
        let mut by_id: HashMap<&str, &EntityDto> = HashMap::new();
        for e in c.entities.iter().rev() {
            by_id.insert(e.id.as_str(), e);
        }
        let mut roots = Vec::new();
        for (i, e) in c.entities.iter().enumerate() {
            let epath = format!("{path}.entities[{i}]");
            self.check_id(format!("{epath}.id"), &e.id);
            if !self.unique(&mut seen, "entity", &e.id, format!("{epath}.id")) {
                continue;
            }
            let Some(&t) = ctx.type_index.get(e.entity_type.as_str()) else {
                self.err(
                    format!("{epath}.type"),
                    format!("unknown entity type `{}`", e.entity_type),
                );
                continue;
            };
            let Some(ty) = ctx.entity_types.get(t) else {
                continue;
            };
            if ty.dimensional {
                self.err(format!("{epath}.type"), format!("`{}` is a dimensional type; its values scope limits and are not tree entities", ty.name));
                continue;
            }
            let parent = match &e.parent {
                None if ty.parents.is_empty() => {
                    roots.push(e.id.clone());
                    None
                }
                None => {
                    let names = self.type_names(ctx, &ty.parents);
                    self.err(
                        format!("{epath}.parent"),
                        format!(
                            "entity `{}` of type `{}` needs a parent of type {names}",
                            e.id, ty.name
                        ),
                    );
                    continue;
                }
                Some(p) => match by_id.get(p.as_str()) {
                    None => {
                        self.err(format!("{epath}.parent"), format!("unknown entity `{p}`"));
                        continue;
                    }
                    Some(pd) => {
                        let pt = ctx.type_index.get(pd.entity_type.as_str()).copied();
                        if !pt.is_some_and(|pt| ty.parents.contains(&pt)) {
                            let allowed = if ty.parents.is_empty() {
                                "none (it is a root type)".to_string()
                            } else {
                                self.type_names(ctx, &ty.parents)
                            };
                            self.err(format!("{epath}.parent"), format!("entity `{}` of type `{}` cannot hang under `{p}` of type `{}`; allowed parent types: {allowed}", e.id, ty.name, pd.entity_type));
                            continue;
                        }
                        Some(syms.intern(p))
                    }
                },
            };
            entities.insert(
                syms.intern(&e.id),
                EntityNode {
                    id: Name::from(&e.id),
                    entity_type: t,
                    parent,
                },
            );
        }
        if roots.len() > 1 {
            self.err(
                format!("{path}.entities"),
                format!(
                    "customer `{}` has {} root entities ({}); a tree has exactly one",
                    c.id,
                    roots.len(),
                    roots
                        .iter()
                        .map(|r| format!("`{r}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }

        let mut auto_parents = FxHashMap::default();
        for (tname, parent) in &c.auto_create_parents {
            let apath = format!("{path}.autoCreateParents.{tname}");
            let Some(&t) = ctx.type_index.get(tname.as_str()) else {
                self.err(apath, format!("unknown entity type `{tname}`"));
                continue;
            };
            let allowed = ctx
                .entity_types
                .get(t)
                .map(|t| t.parents.clone())
                .unwrap_or_default();
            match syms
                .get(parent)
                .and_then(|s| entities.get(&s).map(|n| (s, n.entity_type)))
            {
                Some((s, pt)) if allowed.contains(&pt) => {
                    auto_parents.insert(t, s);
                }
                Some(_) => self.err(
                    apath,
                    format!("entity `{parent}` cannot be the parent of a `{tname}`"),
                ),
                None => self.err(apath, format!("unknown entity `{parent}`")),
            }
        }

        // An entity that was declared but failed validation has been reported already; a limit
        // or grant naming it is skipped quietly rather than reported as naming an unknown one.
        let declared: HashSet<&str> = c.entities.iter().map(|e| e.id.as_str()).collect();
        let errors_before_limits = self.errors.len();
        let limits = self.limits(ctx, path, c, &entities, &declared);
        self.ceilings(ctx, path, c);
        let limits_failed = self.errors.len() > errors_before_limits;
        let mut limits_by_entity: FxHashMap<crate::core::Sym, Vec<usize>> = FxHashMap::default();
        let mut limits_by_type: FxHashMap<usize, Vec<usize>> = FxHashMap::default();
        for (i, l) in limits.iter().enumerate() {
            match l.target {
                LimitTarget::Entity(e) => limits_by_entity.entry(e).or_default().push(i),
                LimitTarget::EntityType(t) => limits_by_type.entry(t).or_default().push(i),
            }
        }
        let mut model = CustomerModel {
            id: Name::from(&c.id),
            root: if roots.len() == 1 {
                roots.first().map(|r| syms.intern(r))
            } else {
                None
            },
            entities,
            limits,
            limits_by_entity,
            limits_by_type,
            grants: Vec::new(),
            auto_parents,
            max_auto_entities: c.max_auto_entities.unwrap_or(DEFAULT_MAX_AUTO_ENTITIES),
            alerts: Vec::new(),
            webhooks: self.webhooks(path, c, ctx.alerting),
        };
        model.grants = self.grants(ctx, path, c, &model, &declared, limits_failed);
        model.alerts = self.alerts(ctx, path, c, &model, &declared);
        model
    }

    /// A customer's webhook endpoints: unique ids, an http(s) URL (plain http only to a
    /// loopback host), and at least one `whsec_` secret that decodes.
    fn webhooks(&mut self, path: &str, c: &CustomerDto, alerting: &AlertDelivery) -> Vec<Webhook> {
        let targets = &alerting.targets;
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        if c.webhooks.len() > alerting.max_webhooks {
            self.err(
                format!("{path}.webhooks"),
                format!(
                    "{} webhooks, over the {} a customer may have (alerting.maxWebhooksPerCustomer)",
                    c.webhooks.len(),
                    alerting.max_webhooks
                ),
            );
        }
        for (i, w) in c.webhooks.iter().enumerate() {
            let wpath = format!("{path}.webhooks[{i}]");
            self.check_id(format!("{wpath}.id"), &w.id);
            self.unique(&mut seen, "webhook", &w.id, format!("{wpath}.id"));
            if w.url.len() > MAX_WEBHOOK_URL {
                self.err(
                    format!("{wpath}.url"),
                    format!("is {} bytes, over {MAX_WEBHOOK_URL}", w.url.len()),
                );
            } else if let Err(e) = targets.check_url(&w.url) {
                self.err(format!("{wpath}.url"), e);
            }
            if w.secrets.is_empty() {
                self.err(
                    format!("{wpath}.secrets"),
                    "at least one `whsec_` secret is needed",
                );
            }
            for (j, secret) in w.secrets.iter().enumerate() {
                if let Err(e) = crate::alerts::sign::check_secret(secret) {
                    self.err(format!("{wpath}.secrets[{j}]"), e.to_string());
                }
            }
            out.push(Webhook {
                id: Name::from(&w.id),
                url: w.url.clone(),
                secrets: w.secrets.clone(),
            });
        }
        out
    }

    /// A customer's alert rules: a target entity or type, a limit of the customer or a
    /// feature, at least one trigger, and webhooks the customer declares.
    fn alerts(
        &mut self,
        ctx: &Ctx<'_>,
        path: &str,
        c: &CustomerDto,
        model: &CustomerModel,
        declared: &HashSet<&str>,
    ) -> Vec<AlertRule> {
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        if c.alerts.len() > ctx.alerting.max_rules {
            self.err(
                format!("{path}.alerts"),
                format!(
                    "{} alert rules, over the {} a customer may have (alerting.maxRulesPerCustomer): every decision of the customer evaluates them",
                    c.alerts.len(),
                    ctx.alerting.max_rules
                ),
            );
        }
        for (i, a) in c.alerts.iter().enumerate() {
            let apath = format!("{path}.alerts[{i}]");
            let errors_before = self.errors.len();
            self.check_id(format!("{apath}.id"), &a.id);
            self.unique(&mut seen, "alert", &a.id, format!("{apath}.id"));
            let target = match (&a.entity, &a.entity_type) {
                (Some(e), None) => {
                    match ctx
                        .symbols
                        .get(e)
                        .filter(|s| model.entities.contains_key(s))
                    {
                        Some(s) => Some(LimitTarget::Entity(s)),
                        None if declared.contains(e.as_str()) => None,
                        None => {
                            self.err(format!("{apath}.entity"), format!("unknown entity `{e}`"));
                            None
                        }
                    }
                }
                (None, Some(t)) => match ctx.type_index.get(t.as_str()) {
                    Some(&ti) => Some(LimitTarget::EntityType(ti)),
                    None => {
                        self.err(
                            format!("{apath}.entityType"),
                            format!("unknown entity type `{t}`"),
                        );
                        None
                    }
                },
                _ => {
                    self.err(apath.clone(), "give one of `entity` or `entityType`");
                    None
                }
            };
            let (limit, feature) = match (&a.limit, &a.feature) {
                (Some(l), None) => {
                    if !c.limits.iter().any(|x| x.id == *l) {
                        self.err(
                            format!("{apath}.limit"),
                            format!("customer `{}` has no limit `{l}`", c.id),
                        );
                    }
                    (Some(Name::from(l)), None)
                }
                (None, Some(f)) => match ctx.feature_index.get(f) {
                    Some(fi) => (None, Some(*fi)),
                    None => {
                        self.err(format!("{apath}.feature"), format!("unknown feature `{f}`"));
                        (None, None)
                    }
                },
                _ => {
                    self.err(apath.clone(), "give one of `limit` or `feature`");
                    (None, None)
                }
            };
            if a.percent.is_empty()
                && a.absolute.is_empty()
                && !a.soft_limit
                && a.exhaustion_within.is_none()
                && a.denials.is_none()
            {
                self.err(
                    apath.clone(),
                    "no trigger: give `percent`, `absolute`, `softLimit: true`, `exhaustionWithin` or `denials`",
                );
            }
            let exhaustion_within = a.exhaustion_within.as_ref().and_then(|t| {
                parse_fixed_millis(t)
                    .map_err(|e| self.err(format!("{apath}.exhaustionWithin"), e.to_string()))
                    .ok()
            });
            let denials = a.denials.as_ref().and_then(|d| {
                let within = parse_fixed_millis(&d.within)
                    .map_err(|e| self.err(format!("{apath}.denials.within"), e.to_string()))
                    .ok()?;
                if d.count == 0 {
                    self.err(format!("{apath}.denials.count"), "must be at least 1");
                }
                if within < 60_000 || within > ctx.minute_retention {
                    self.err(
                        format!("{apath}.denials.within"),
                        "must be from one minute to the minute buckets' retention",
                    );
                }
                Some((d.count, within))
            });
            if let Some(p) = a.percent.iter().find(|p| !(1..=1000).contains(*p)) {
                self.err(
                    format!("{apath}.percent"),
                    format!("{p} is not from 1 to 1000"),
                );
            }
            let thresholds = a.percent.len() + a.absolute.len();
            if thresholds > ctx.alerting.max_thresholds {
                self.err(
                    apath.clone(),
                    format!(
                        "{thresholds} thresholds, over the {} a rule may have (alerting.maxThresholdsPerRule): every decision of the customer evaluates them",
                        ctx.alerting.max_thresholds
                    ),
                );
            }
            if a.absolute.contains(&0) {
                self.err(
                    format!("{apath}.absolute"),
                    "a threshold of 0 would fire on nothing spent",
                );
            }
            let mut webhooks = Vec::new();
            for (j, w) in a.webhooks.iter().enumerate() {
                match c.webhooks.iter().position(|x| x.id == *w) {
                    Some(k) => webhooks.push(k),
                    None => self.err(
                        format!("{apath}.webhooks[{j}]"),
                        format!("customer `{}` has no webhook `{w}`", c.id),
                    ),
                }
            }
            if self.errors.len() > errors_before {
                continue;
            }
            let (Some(target), true) = (target, limit.is_some() || feature.is_some()) else {
                continue;
            };
            let mut percent = a.percent.clone();
            percent.sort_unstable();
            percent.dedup();
            let mut absolute = a.absolute.clone();
            absolute.sort_unstable();
            absolute.dedup();
            out.push(AlertRule {
                id: Name::from(&a.id),
                target,
                limit,
                feature,
                percent,
                absolute,
                soft_limit: a.soft_limit,
                exhaustion_within,
                denials,
                webhooks,
            });
        }
        out
    }

    fn type_names(&self, ctx: &Ctx<'_>, types: &[usize]) -> String {
        types
            .iter()
            .filter_map(|t| ctx.entity_types.get(*t))
            .map(|t| format!("`{}`", t.name))
            .collect::<Vec<_>>()
            .join(" or ")
    }

    fn limits(
        &mut self,
        ctx: &Ctx<'_>,
        path: &str,
        c: &CustomerDto,
        entities: &FxHashMap<crate::core::Sym, EntityNode>,
        declared: &HashSet<&str>,
    ) -> Vec<Limit> {
        let mut seen = HashMap::new();
        let mut credits_holders: HashMap<(String, usize), String> = HashMap::new();
        let mut out = Vec::new();
        for (i, l) in c.limits.iter().enumerate() {
            let lpath = format!("{path}.limits[{i}]");
            let errors_before = self.errors.len();
            self.check_id(format!("{lpath}.id"), &l.id);
            self.unique(&mut seen, "limit", &l.id, format!("{lpath}.id"));
            let target = match (&l.entity, &l.entity_type) {
                (Some(e), None) => match ctx.symbols.get(e).filter(|s| entities.contains_key(s)) {
                    Some(s) => Some(LimitTarget::Entity(s)),
                    None if declared.contains(e.as_str()) => None,
                    None => {
                        self.err(format!("{lpath}.entity"), format!("unknown entity `{e}`"));
                        None
                    }
                },
                (None, Some(t)) => {
                    match ctx.type_index.get(t.as_str()) {
                        Some(&ti) if ctx.entity_types.get(ti).is_some_and(|t| t.dimensional) => {
                            self.err(format!("{lpath}.entityType"), format!("`{t}` is a dimensional type; scope the limit with `scope` instead"));
                            None
                        }
                        Some(&ti) => Some(LimitTarget::EntityType(ti)),
                        None => {
                            self.err(
                                format!("{lpath}.entityType"),
                                format!("unknown entity type `{t}`"),
                            );
                            None
                        }
                    }
                }
                (Some(_), Some(_)) => {
                    self.err(
                        lpath.clone(),
                        "give either `entity` or `entityType`, not both",
                    );
                    None
                }
                (None, None) => {
                    self.err(lpath.clone(), "missing `entity` or `entityType`: a limit applies to an entity or to every entity of a type");
                    None
                }
            };
            let feature = ctx.feature_index.get(&l.feature).copied();
            if feature.is_none() {
                self.err(
                    format!("{lpath}.feature"),
                    format!("unknown feature `{}`", l.feature),
                );
            }
            let kind = self.limit_kind(ctx, &lpath, l);
            let mut scope = Vec::new();
            for (dim, pattern) in &l.scope {
                if !ctx.dimensions.contains(dim) {
                    let mut known: Vec<&String> = ctx.dimensions.iter().collect();
                    known.sort();
                    let known = known
                        .iter()
                        .map(|d| format!("`{d}`"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    self.err(
                        format!("{lpath}.scope.{dim}"),
                        format!("unknown dimension `{dim}`; known dimensions: {known}"),
                    );
                    continue;
                }
                match glob::Pattern::new(pattern) {
                    Ok(p) => scope.push((dim.clone(), p)),
                    Err(e) => self.err(
                        format!("{lpath}.scope.{dim}"),
                        format!("`{pattern}` is not a valid pattern: {e}"),
                    ),
                }
            }
            if let (Some(LimitKind::Credits { .. }), Some(f)) = (&kind, feature) {
                let holder = l
                    .entity
                    .clone()
                    .or_else(|| l.entity_type.as_ref().map(|t| format!("type:{t}")))
                    .unwrap_or_default();
                if let Some(first) = credits_holders.get(&(holder.clone(), f)) {
                    self.err(format!("{lpath}.kind"), format!("a second credits limit for feature `{}` on the same holder (first at {first}); one balance per holder and feature", l.feature));
                } else {
                    credits_holders.insert((holder, f), lpath.clone());
                }
            }
            if self.errors.len() > errors_before {
                continue;
            }
            if let (Some(target), Some(feature), Some(kind)) = (target, feature, kind) {
                out.push(Limit {
                    id: Name::from(&l.id),
                    feature,
                    target,
                    scope,
                    kind,
                    mode: match l.mode {
                        ModeDto::Enforce => Mode::Enforce,
                        ModeDto::Soft => Mode::Soft,
                        ModeDto::Shadow => Mode::Shadow,
                    },
                });
            }
        }
        out
    }

    /// `ceilings`: each names a known feature, no two cover the same limits, and no limit of
    /// the customer is above a ceiling that covers it.
    fn ceilings(&mut self, ctx: &Ctx<'_>, path: &str, c: &CustomerDto) {
        for (i, ceiling) in c.ceilings.iter().enumerate() {
            let cpath = format!("{path}.ceilings[{i}]");
            if !ctx.feature_index.contains_key(&ceiling.feature) {
                self.err(
                    format!("{cpath}.feature"),
                    format!("unknown feature `{}`", ceiling.feature),
                );
            }
            if c.ceilings[..i].iter().any(|o| {
                o.feature == ceiling.feature
                    && o.kind == ceiling.kind
                    && o.period == ceiling.period
                    && o.window == ceiling.window
            }) {
                self.err(
                    cpath.clone(),
                    format!("a second ceiling for {}", ceiling.describe()),
                );
            }
        }
        for (i, l) in c.limits.iter().enumerate() {
            let Some(value) = l.limit else { continue };
            for ceiling in c.ceilings.iter().filter(|x| x.covers(l)) {
                if value > ceiling.max {
                    self.err(
                        format!("{path}.limits[{i}].limit"),
                        format!(
                            "{value} is above the customer's ceiling of {} for {} (what it bought; only the operator raises a ceiling)",
                            ceiling.max,
                            ceiling.describe()
                        ),
                    );
                }
            }
        }
    }

    fn limit_kind(&mut self, ctx: &Ctx<'_>, lpath: &str, l: &LimitDto) -> Option<LimitKind> {
        let given: [(&str, bool, &[KindDto]); 5] = [
            (
                "limit",
                l.limit.is_some(),
                &[KindDto::Rate, KindDto::Quota, KindDto::Concurrency],
            ),
            ("window", l.window.is_some(), &[KindDto::Rate]),
            ("period", l.period.is_some(), &[KindDto::Quota]),
            ("anchor", l.anchor.is_some(), &[KindDto::Quota]),
            ("poolBy", l.pool_by.is_some(), &[KindDto::Credits]),
        ];
        let kind_name = match l.kind {
            KindDto::Rate => "rate",
            KindDto::Quota => "quota",
            KindDto::Concurrency => "concurrency",
            KindDto::Credits => "credits",
        };
        let mut ok = true;
        for (field, present, kinds) in given {
            if present && !kinds.contains(&l.kind) {
                self.err(
                    format!("{lpath}.{field}"),
                    format!("`{field}` does not apply to a {kind_name} limit"),
                );
                ok = false;
            }
        }
        let need = |v: &mut Self, field: &str, present: bool| {
            if !present {
                v.err(
                    format!("{lpath}.{field}"),
                    format!("a {kind_name} limit needs `{field}`"),
                );
            }
            present
        };
        let limit = l.limit.unwrap_or(0);
        if l.limit == Some(0) {
            self.err(format!("{lpath}.limit"), "must be greater than zero");
            ok = false;
        }
        match l.kind {
            KindDto::Rate => {
                ok &= need(self, "limit", l.limit.is_some());
                ok &= need(self, "window", l.window.is_some());
                if limit > u64::from(u32::MAX) {
                    self.err(
                        format!("{lpath}.limit"),
                        format!("a rate limit counts at most {} units per window", u32::MAX),
                    );
                    ok = false;
                }
                let window = l.window.as_deref().map(|w| {
                    parse_fixed_millis(w)
                        .map_err(|e| e.to_string())
                        .and_then(|ms| {
                            RollingWindow::new(ms).ok_or_else(|| {
                                format!("`{w}` is too short; a window is at least 7 ms")
                            })
                        })
                });
                match window {
                    Some(Ok(window)) if ok => Some(LimitKind::Rate { limit, window }),
                    Some(Err(e)) => {
                        self.err(format!("{lpath}.window"), e);
                        None
                    }
                    _ => None,
                }
            }
            KindDto::Quota => {
                ok &= need(self, "limit", l.limit.is_some());
                ok &= need(self, "period", l.period.is_some());
                let period = l.period.as_deref()?;
                // Weeks start on Monday: the Unix epoch was a Thursday, so it anchors weeks at
                // the first Monday after it. Every other unit anchors at the epoch itself.
                let default_anchor = if period.ends_with('W') { 4 * 86_400 } else { 0 };
                let anchor = l.anchor.unwrap_or_else(|| {
                    DateTime::<Utc>::from_timestamp(default_anchor, 0).unwrap_or_default()
                });
                match CalendarPeriod::parse(period, anchor) {
                    Ok(period) if ok => Some(LimitKind::Quota { limit, period }),
                    Ok(_) => None,
                    Err(e) => {
                        self.err(format!("{lpath}.period"), e.to_string());
                        None
                    }
                }
            }
            KindDto::Concurrency => {
                ok &= need(self, "limit", l.limit.is_some());
                match u32::try_from(limit) {
                    Ok(limit) if ok => Some(LimitKind::Concurrency { limit }),
                    Ok(_) => None,
                    Err(_) => {
                        self.err(
                            format!("{lpath}.limit"),
                            format!("a concurrency limit is at most {}", u32::MAX),
                        );
                        None
                    }
                }
            }
            KindDto::Credits => {
                if let Some(dim) = l.pool_by.as_ref().filter(|d| !ctx.dimensions.contains(*d)) {
                    self.err(
                        format!("{lpath}.poolBy"),
                        format!("unknown dimension `{dim}`"),
                    );
                    return None;
                }
                ok.then(|| LimitKind::Credits {
                    pool_by: l.pool_by.clone(),
                })
            }
        }
    }

    fn grants(
        &mut self,
        ctx: &Ctx<'_>,
        path: &str,
        c: &CustomerDto,
        model: &CustomerModel,
        declared: &HashSet<&str>,
        limits_failed: bool,
    ) -> Vec<GrantSpec> {
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        for (i, g) in c.grants.iter().enumerate() {
            let gpath = format!("{path}.grants[{i}]");
            self.check_id(format!("{gpath}.id"), &g.id);
            self.unique(&mut seen, "grant", &g.id, format!("{gpath}.id"));
            let Some(entity) = ctx
                .symbols
                .get(&g.entity)
                .filter(|s| model.entities.contains_key(s))
            else {
                if !declared.contains(g.entity.as_str()) {
                    self.err(
                        format!("{gpath}.entity"),
                        format!("unknown entity `{}`", g.entity),
                    );
                }
                continue;
            };
            let Some(&feature) = ctx.feature_index.get(&g.feature) else {
                self.err(
                    format!("{gpath}.feature"),
                    format!("unknown feature `{}`", g.feature),
                );
                continue;
            };
            let Some(limit) = model.credits_limit_for(entity, feature) else {
                if limits_failed {
                    // The limit meant to hold it may be the one that failed; already reported.
                    continue;
                }
                self.err(gpath.clone(), format!("no credits limit for feature `{}` on entity `{}` or its type to hold this grant", g.feature, g.entity));
                continue;
            };
            let pooled = matches!(limit.kind, LimitKind::Credits { pool_by: Some(_) });
            match (&g.pool, pooled) {
                (None, true) => {
                    self.err(
                        format!("{gpath}.pool"),
                        format!(
                            "limit `{}` keeps isolated pools; name the pool this grant feeds",
                            limit.id
                        ),
                    );
                    continue;
                }
                (Some(_), false) => {
                    self.err(
                        format!("{gpath}.pool"),
                        format!("limit `{}` keeps one balance, not isolated pools", limit.id),
                    );
                    continue;
                }
                _ => {}
            }
            if g.amount == 0 {
                self.err(format!("{gpath}.amount"), "must be greater than zero");
                continue;
            }
            out.push(GrantSpec {
                id: g.id.clone(),
                entity,
                feature,
                pool: g.pool.clone(),
                amount: g.amount,
                priority: g.priority,
                expires_at: g.expires_at.map(Timestamp::from_datetime),
                category: match g.category {
                    CategoryDto::Paid => GrantCategory::Paid,
                    CategoryDto::Promo => GrantCategory::Promo,
                },
            });
        }
        out
    }
}

/// What customer validation reads of the document's global parts.
/// The longest webhook URL kept (a customer's admin key writes it).
const MAX_WEBHOOK_URL: usize = 2048;
/// The longest API key label kept.
const MAX_LABEL: usize = 200;

/// Free text a customer writes and others read (a key's label): at most `max` bytes, and no
/// control or bidirectional-override characters (a label shown in a log or a page must read
/// as what it says).
fn check_text(text: &str, max: usize) -> Result<(), String> {
    if text.len() > max {
        return Err(format!("is {} bytes, over {max}", text.len()));
    }
    match text.chars().find(|c| {
        c.is_control()
            || ('\u{202a}'..='\u{202e}').contains(c)
            || ('\u{2066}'..='\u{2069}').contains(c)
    }) {
        Some(c) => Err(format!(
            "holds the control or direction character U+{:04X}",
            u32::from(c)
        )),
        None => Ok(()),
    }
}

struct Ctx<'a> {
    /// Where webhooks may go, and the per-customer alerting budgets.
    alerting: &'a AlertDelivery,
    entity_types: &'a [EntityType],
    type_index: &'a HashMap<&'a str, usize>,
    feature_index: &'a FxHashMap<String, usize>,
    dimensions: &'a HashSet<String>,
    symbols: &'a Symbols,
    /// How long minute buckets are kept (a denial burst's window fits in it).
    minute_retention: i64,
}
