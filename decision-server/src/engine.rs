//! The decision engine: the current model, the counter store and the clock, put together into
//! `check`, `settle`, `release` and hold expiry.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::clock::Clock;
use crate::core::counter::{CounterKey, CounterSpec};
use crate::core::credits::GrantBalance;
use crate::core::model::CustomerModel;
use crate::core::plan::{
    ASSUMED_ID, Assumed, AutoEntities, AutoEntity, Plan, PlanError, Planned, Registry,
};
use crate::core::usage::{StreamEnd, Usage};
use crate::core::{ChainEntry, Decision, Denial, HoldId, Model, Symbols};
use crate::store::{
    AutoEntityOutcome, CloseOutcome, CounterStore, HoldKey, ReserveMode, StoreError, StoredEntity,
};

/// The most entities one request may have to fetch from the store before it can be planned:
/// the one it names, and the auto-created parents above it this process has not seen yet.
const MAX_LEARN: usize = 16;

/// One check request.
#[derive(Debug, Clone, Copy)]
pub struct CheckRequest<'a> {
    pub customer: &'a str,
    pub feature: &'a str,
    pub usage: Usage,
    pub dimensions: &'a HashMap<String, String>,
    /// Answer as a real check would, and hold nothing.
    pub dry_run: bool,
    /// The usage is final: a grant counts it at once and places no hold (as does every check
    /// of a feature with `commitAtCheck`).
    pub commit: bool,
    /// When the caller stops waiting for the answer (Envoy's filter sends it). Past it nothing
    /// is decided, and a hold placed too late for the caller is released at once.
    pub deadline: Option<crate::core::Timestamp>,
}

/// What a check is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A whole call: held at its requested usage, recorded when it closes.
    Call,
    /// The first hold of a call streamed in slices, which may grow to `budget` units; it
    /// settles the whole stream.
    StreamStart { budget: u64 },
    /// A streamed call's next slice (see [`Engine::extend`]).
    Slice,
}

/// Why a call failed. A failed call changes no counter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The caller's deadline passed before the decision was made; nothing is held.
    #[error("the caller's deadline passed before the decision was made; nothing was held")]
    DeadlineExceeded,
}

/// Releases a decision's hold if the decision is dropped while its store call is in flight:
/// the caller went away (Envoy reset the stream on its timeout), so nobody will ever settle or
/// release what the store places. The release runs on its own task, since a drop cannot wait.
struct CancelOnDrop {
    store: Arc<dyn CounterStore>,
    customer: crate::core::Name,
    tag: u128,
    now: crate::core::Timestamp,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, customer, tag, now) =
            (Arc::clone(&self.store), self.customer, self.tag, self.now);
        runtime.spawn(async move {
            match store.cancel(customer, tag, now).await {
                Ok(released) => tracing::debug!(customer = customer.as_str(), released, "abandoned decision cancelled"),
                Err(e) => tracing::warn!(customer = customer.as_str(), error = %e, "cannot cancel an abandoned decision yet"),
            }
        });
    }
}

/// Decisions over one model and one store.
#[derive(Debug)]
pub struct Engine {
    model: ArcSwap<Model>,
    store: Arc<dyn CounterStore>,
    clock: Arc<dyn Clock>,
    auto: AutoEntities,
}

impl Engine {
    /// An engine over `store`, with the model's grants added to it (idempotently).
    pub async fn new(
        model: Model,
        store: Arc<dyn CounterStore>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let engine = Self {
            model: ArcSwap::from_pointee(model),
            store,
            clock,
            auto: AutoEntities::default(),
        };
        engine
            .store
            .usage()
            .configure_records(engine.model().records);
        engine.seed_grants(&engine.model()).await?;
        Ok(engine)
    }

    pub fn model(&self) -> Arc<Model> {
        self.model.load_full()
    }

    pub fn store(&self) -> &Arc<dyn CounterStore> {
        &self.store
    }

    pub fn now(&self) -> crate::core::Timestamp {
        self.clock.now()
    }

    /// The clock decisions run on.
    pub fn clock(&self) -> Arc<dyn Clock> {
        Arc::clone(&self.clock)
    }

    /// Puts a new model in force for the next decision. Counters carry over: they are keyed
    /// by interned ids, which the new model shares.
    pub async fn replace_model(&self, model: Model) -> Result<(), StoreError> {
        self.seed_grants(&model).await?;
        self.store.usage().configure_records(model.records);
        self.model.store(Arc::new(model));
        Ok(())
    }

    async fn seed_grants(&self, model: &Model) -> Result<(), StoreError> {
        for customer in model.customers.values() {
            for g in &customer.grants {
                let Some(limit) = customer.credits_limit_for(g.entity, g.feature) else {
                    continue;
                };
                let partition = g.pool.as_deref().map(|p| model.symbols.intern(p));
                let key = CounterKey {
                    entity: g.entity,
                    limit: limit.id.sym(),
                    partition,
                };
                let balance = GrantBalance {
                    id: g.id.clone(),
                    priority: g.priority,
                    expires_at: g.expires_at,
                    category: g.category,
                    amount: g.amount,
                    remaining: g.amount,
                };
                self.store.add_grant(customer.id, key, balance).await?;
            }
        }
        Ok(())
    }

    /// Checks every limit on every level of the chain and, if all pass, holds the requested
    /// usage on all of them in one atomic step.
    pub async fn check(&self, req: &CheckRequest<'_>) -> Result<Decision, DecisionError> {
        self.decide(req, Purpose::Call).await
    }

    /// [`Engine::check`] for the first hold of a call streamed in slices that may grow to
    /// `budget` units: that hold settles the whole stream, so its settlement ceiling is what
    /// `budget` may report, not ten times the first slice (a long stream would otherwise be
    /// charged the ceiling, not its usage).
    pub async fn start_stream(
        &self,
        req: &CheckRequest<'_>,
        budget: u64,
    ) -> Result<Decision, DecisionError> {
        self.decide(req, Purpose::StreamStart { budget }).await
    }

    /// Extends a streamed call's hold by `req.usage` (its next slice) as a hold of its own: the
    /// same atomic check of every level and limit kind, credits and prices, leases and
    /// replicas, but without another concurrency slot or per-request count (the call already
    /// holds those) and without a usage record (the call's first hold records its whole usage
    /// when it settles; the filter releases the slices then).
    pub async fn extend(&self, req: &CheckRequest<'_>) -> Result<Decision, DecisionError> {
        self.decide(req, Purpose::Slice).await
    }

    /// A check of `req` for `purpose` (see [`Purpose`]).
    pub async fn decide(
        &self,
        req: &CheckRequest<'_>,
        purpose: Purpose,
    ) -> Result<Decision, DecisionError> {
        let now = self.clock.now();
        let past = |deadline: Option<crate::core::Timestamp>| {
            deadline.is_some_and(|d| self.clock.now() > d)
        };
        if past(req.deadline) {
            return Err(DecisionError::DeadlineExceeded);
        }
        let mut plan = self.plan(req, now, !req.dry_run).await?;
        match purpose {
            Purpose::Call => {}
            Purpose::Slice => {
                plan.counters
                    .retain(|c| !matches!(c.rule, crate::core::plan::AmountRule::PerRequest));
                plan.record = false;
            }
            Purpose::StreamStart { budget } => {
                let model = self.model.load();
                if let Some(feature) = model.feature(req.feature) {
                    let whole =
                        model.settle_bound(feature, &Usage::units(budget), req.dimensions, now);
                    plan.max_settle = plan.max_settle.max(whole);
                }
            }
        }
        if !req.dry_run {
            // From the thread's CSPRNG (ChaCha, seeded by the OS): the tag is what makes a hold
            // id unguessable.
            plan.hold_tag = rand::random::<u128>();
        }
        let mode = if req.dry_run {
            ReserveMode::DryRun
        } else if req.commit || self.model.load().commits_at_check(req.feature) {
            ReserveMode::Commit
        } else {
            ReserveMode::Hold
        };
        // A commit is not taken back when its caller goes away: what it counted stays counted
        // (at most once), as a request the caller gave up on after it was let through would.
        let mut guard = CancelOnDrop {
            store: Arc::clone(&self.store),
            customer: plan.customer,
            tag: plan.hold_tag,
            now,
            armed: mode == ReserveMode::Hold,
        };
        let reservation = self.store.reserve(&plan, mode, now).await;
        guard.armed = false;
        let reservation = reservation?;
        if let Some(hold) = &reservation.hold
            && past(req.deadline)
        {
            // Decided after the caller stopped waiting (a stalled sidecar or store): the answer
            // would reach nobody, so the hold goes now rather than at its TTL, charged.
            let key = HoldKey {
                customer: plan.customer,
                seq: hold.seq,
                tag: hold.tag,
            };
            self.store.release(key, self.clock.now()).await?;
            return Err(DecisionError::DeadlineExceeded);
        }

        let chain: Vec<ChainEntry> = plan
            .counters
            .iter()
            .zip(&reservation.readings)
            .map(|(c, r)| {
                let level = plan.chain.get(c.level);
                ChainEntry {
                    level: c.level,
                    entity_id: level.map(|l| l.entity_id).unwrap_or_default(),
                    entity_type: level.map(|l| l.entity_type).unwrap_or_default(),
                    limit_id: c.limit_id,
                    feature_id: c.feature_id,
                    kind: c.kind,
                    mode: c.mode,
                    requested: c.amount,
                    usage_limit: r.usage_limit,
                    current_usage: r.current_usage,
                    remaining: r.remaining,
                    reset_at: r.reset_at,
                    exceeded: !r.fits,
                }
            })
            .collect();
        let denial = reservation.blocking.and_then(|i| {
            let c = plan.counters.get(i)?;
            let r = reservation.readings.get(i)?;
            let entry = chain.get(i)?;
            Some(Denial {
                level: c.level,
                entity_id: entry.entity_id,
                limit_id: c.limit_id,
                kind: c.kind,
                reason: format!(
                    "{} limit `{}` on {} `{}` (chain level {}): {} of {} used, {} requested",
                    c.kind,
                    c.limit_id,
                    entry.entity_type,
                    entry.entity_id,
                    c.level,
                    r.current_usage,
                    r.usage_limit,
                    c.amount
                ),
                retry_at: r.retry_at,
            })
        });
        Ok(Decision {
            granted: denial.is_none(),
            hold_id: reservation.hold,
            dry_run: req.dry_run,
            no_matching_limit: plan.counters.is_empty(),
            chain,
            denial,
        })
    }

    /// Resolves a request to its plan. An entity the request names that this process does not
    /// know is looked up in the store, and created there when `create` is set (within the
    /// customer's cap); without `create` (a dry run) one that does not exist is assumed, under
    /// a placeholder, and nothing is created. A request that counts (`create`: a real check or
    /// an ingested event) must carry every `required` dimension; a dry run need not.
    async fn plan(
        &self,
        req: &CheckRequest<'_>,
        now: crate::core::Timestamp,
        create: bool,
    ) -> Result<Plan, DecisionError> {
        let model = self.model.load_full();
        if create {
            model.check_required(req.dimensions)?;
        }
        let mut assumed: Option<Assumed> = None;
        for _ in 0..MAX_LEARN {
            let registry = Registry {
                auto: &self.auto,
                assumed: assumed.as_ref(),
            };
            let new = match model.plan(
                &registry,
                req.customer,
                req.feature,
                req.usage,
                req.dimensions,
                now,
            )? {
                Planned::Ready(plan) => return Ok(plan),
                Planned::Create(new) => new,
            };
            let customer = model
                .customer(req.customer)
                .ok_or_else(|| PlanError::UnknownCustomer(req.customer.to_string()))?;
            let proposed = StoredEntity {
                entity_type: type_name(&model, new.entity_type),
                parent: model.symbols.resolve(new.parent).to_string(),
            };
            match self
                .store
                .auto_entity(
                    customer.id,
                    &new.value,
                    &proposed,
                    customer.max_auto_entities,
                    create,
                )
                .await?
            {
                AutoEntityOutcome::Found(e) | AutoEntityOutcome::Created(e) => {
                    self.learn(&model, customer, &new.value, e).await?;
                }
                AutoEntityOutcome::Full => {
                    return Err(PlanError::AutoEntityLimit {
                        customer: customer.id.to_string(),
                        value: new.value.chars().take(64).collect(),
                        max: customer.max_auto_entities,
                    }
                    .into());
                }
                AutoEntityOutcome::Absent => {
                    assumed = Some(Assumed {
                        value: new.value,
                        sym: model.symbols.intern(ASSUMED_ID),
                        node: AutoEntity {
                            entity_type: new.entity_type,
                            parent: new.parent,
                        },
                    });
                }
            }
        }
        Err(PlanError::BadStoredEntity {
            customer: req.customer.to_string(),
            entity: String::new(),
            problem: format!("more than {MAX_LEARN} levels of entities created on the fly"),
        }
        .into())
    }

    /// Notes a stored entity in this process's copy, after the auto-created parents above it
    /// that this process has not seen (fetched from the store), so its chain is whole.
    async fn learn(
        &self,
        model: &Model,
        customer: &CustomerModel,
        id: &str,
        entity: StoredEntity,
    ) -> Result<(), DecisionError> {
        let bad = |entity: &str, problem: String| PlanError::BadStoredEntity {
            customer: customer.id.to_string(),
            entity: entity.to_string(),
            problem,
        };
        let known = |parent: &str| {
            model.symbols.get(parent).is_some_and(|p| {
                customer.entities.contains_key(&p) || self.auto.get(customer.id.sym(), p).is_some()
            })
        };
        let mut pending = vec![(id.to_string(), entity)];
        while let Some((top, e)) = pending.last() {
            if known(&e.parent) {
                break;
            }
            if pending.len() >= MAX_LEARN {
                return Err(bad(top, "its chain of created parents is too deep".into()).into());
            }
            let parent = e.parent.clone();
            match self
                .store
                .auto_entity(customer.id, &parent, e, 0, false)
                .await?
            {
                AutoEntityOutcome::Found(pe) => pending.push((parent, pe)),
                _ => {
                    return Err(bad(
                        top,
                        format!("its parent `{parent}` is neither in the model nor stored"),
                    )
                    .into());
                }
            }
        }
        for (id, e) in pending.into_iter().rev() {
            let entity_type = model
                .entity_types
                .iter()
                .position(|t| t.name == e.entity_type.as_str())
                .ok_or_else(|| {
                    bad(
                        &id,
                        format!("its type `{}` is not in the model", e.entity_type),
                    )
                })?;
            let parent = model
                .symbols
                .get(&e.parent)
                .ok_or_else(|| bad(&id, format!("its parent `{}` is unknown", e.parent)))?;
            // Interned only once the store holds it: bounded by the customer's cap.
            let sym = model.symbols.intern(&id);
            self.auto.insert(
                customer.id.sym(),
                sym,
                AutoEntity {
                    entity_type,
                    parent,
                },
            );
        }
        Ok(())
    }

    /// Records usage that was never gated (it already happened) on every counter the same
    /// request would have been checked against. Returns `false`, changing nothing, if
    /// `idempotency_key` was already recorded for the customer.
    pub async fn ingest(
        &self,
        req: &CheckRequest<'_>,
        idempotency_key: &str,
    ) -> Result<bool, DecisionError> {
        let now = self.clock.now();
        let model = self.model.load();
        let max = model.ingest_bound(req.feature, req.dimensions, now);
        if req.usage.largest_figure() > max {
            return Err(PlanError::IngestTooLarge {
                usage: req.usage.largest_figure(),
                max,
            }
            .into());
        }
        drop(model);
        let plan = self.plan(req, now, true).await?;
        Ok(self.store.record(&plan, idempotency_key, now).await?)
    }

    /// The store's key of a hold id: its customer interned (a customer the process never saw
    /// has no hold).
    fn hold_key(&self, hold: &HoldId) -> Result<HoldKey, StoreError> {
        let sym = Symbols
            .get(&hold.customer)
            .ok_or_else(|| StoreError::UnknownHold(hold.to_string()))?;
        Ok(HoldKey {
            customer: crate::core::Name::from(sym),
            seq: hold.seq,
            tag: hold.tag,
        })
    }

    /// Corrects every counter of the hold by `actual - held`. Idempotent.
    pub async fn settle(
        &self,
        hold: &HoldId,
        actual: Usage,
    ) -> Result<CloseOutcome, DecisionError> {
        self.settle_ended(hold, actual, None).await
    }

    /// [`Engine::settle`], and a streamed call's `end` on its record.
    pub async fn settle_ended(
        &self,
        hold: &HoldId,
        actual: Usage,
        end: Option<StreamEnd>,
    ) -> Result<CloseOutcome, DecisionError> {
        let key = self.hold_key(hold)?;
        Ok(self
            .store
            .settle_ended(key, &actual, end, self.clock.now())
            .await?)
    }

    /// A streamed call's end as a gateway reports it, checked against `customer`'s limits
    /// (see [`CustomerModel::stream_end`]); `None` for a customer the model no longer has.
    pub fn stream_end(&self, customer: &str, cut: bool, by: &str) -> Option<StreamEnd> {
        self.model
            .load()
            .customer(customer)
            .map(|c| c.stream_end(cut, by))
    }

    /// Undoes the hold. Idempotent.
    pub async fn release(&self, hold: &HoldId) -> Result<CloseOutcome, DecisionError> {
        let key = self.hold_key(hold)?;
        Ok(self.store.release(key, self.clock.now()).await?)
    }

    /// Commits every hold past its TTL at its held amount.
    pub async fn expire_due(&self) -> Result<usize, DecisionError> {
        Ok(self.store.expire_due(self.clock.now()).await?)
    }

    /// The units counted now by limit `limit_id` for entity `entity_id` of `customer` (in pool
    /// `pool` for isolated credit pools). `None` if the limit or entity is unknown or the counter
    /// has no state yet. For inspection and tests, not for decisions.
    pub async fn counted(
        &self,
        customer: &str,
        entity_id: &str,
        limit_id: &str,
        pool: Option<&str>,
    ) -> Result<Option<u64>, StoreError> {
        Ok(self
            .inspect(customer, entity_id, limit_id, pool)
            .await?
            .map(|r| r.used))
    }

    /// [`Engine::counted`], with a credit pool's grants and balance.
    pub async fn inspect(
        &self,
        customer: &str,
        entity_id: &str,
        limit_id: &str,
        pool: Option<&str>,
    ) -> Result<Option<crate::core::counter::Inspection>, StoreError> {
        let model = self.model.load_full();
        let Some(c) = model.customer(customer) else {
            return Ok(None);
        };
        let Some(limit) = c.limits.iter().find(|l| l.id == limit_id) else {
            return Ok(None);
        };
        let Some(entity) = model.symbols.get(entity_id) else {
            return Ok(None);
        };
        let partition = pool.and_then(|p| model.symbols.get(p));
        let key = CounterKey {
            entity,
            limit: limit.id.sym(),
            partition,
        };
        let now = self.clock.now();
        let spec = CounterSpec::of(&limit.kind, partition.is_some(), now);
        self.store.inspect(c.id, key, &spec, now).await
    }

    /// How many entities `customer` has had created on the fly, as the store counts them.
    pub async fn auto_created(&self, customer: &str) -> Result<usize, StoreError> {
        let model = self.model.load_full();
        match model.customer(customer) {
            Some(c) => self.store.auto_entity_count(c.id).await,
            None => Ok(0),
        }
    }
}

fn type_name(model: &Model, t: usize) -> String {
    model
        .entity_types
        .get(t)
        .map(|t| t.name.to_string())
        .unwrap_or_default()
}
