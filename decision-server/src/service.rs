//! The sidecar's operations, shared by the ext_authz, gRPC and HTTP front ends: decisions,
//! settlement, ingest and admin changes, with their metrics and usage events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::broadcast;

use crate::auth::{Credentials, Principal};
use crate::catalog::{AdminError, AdminOp, Catalog};
use crate::config::Loaded;
use crate::config::dto::ConfigDoc;
use crate::config::server::{ExtAuthzSettings, RequestLimits, ServerSettings};
use crate::core::plan::{PlanError, Usage};
use crate::core::{Decision, HoldId, Timestamp};
use crate::engine::{CheckRequest, DecisionError, Engine};
use crate::metrics::{Api, Metrics, Outcome};
use crate::store::{CloseOutcome, StoreError};
use futures_util::future::join_all;

/// How many usage events a slow watcher may fall behind before it misses some.
const EVENT_BUFFER: usize = 4096;

/// The settings a reload can change while running.
#[derive(Debug)]
pub struct Runtime {
    pub credentials: Credentials,
    pub ext_authz: ExtAuthzSettings,
    pub limits: RequestLimits,
}

impl From<&ServerSettings> for Runtime {
    fn from(s: &ServerSettings) -> Self {
        Self {
            credentials: Credentials::new(s.operator_sha256, &s.api_keys, &s.gateway_tokens),
            ext_authz: s.ext_authz.clone(),
            limits: s.limits,
        }
    }
}

/// Refuses a request whose dimensions are over the configured bounds, on every front end:
/// they are copied into events and records, so their size is memory any caller could grow.
pub fn bounded_dimensions(
    dimensions: &HashMap<String, String>,
    limits: &RequestLimits,
) -> Result<(), PlanError> {
    if dimensions.len() > limits.max_dimensions {
        return Err(PlanError::TooManyDimensions {
            count: dimensions.len(),
            max: limits.max_dimensions,
        });
    }
    let bytes: usize = dimensions.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > limits.max_dimension_bytes {
        return Err(PlanError::DimensionsTooLarge {
            bytes,
            max: limits.max_dimension_bytes,
        });
    }
    Ok(())
}

/// What happened, for `WatchUsage` and the push stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Granted,
    Denied,
    Settled,
    Released,
    Ingested,
}

/// One decision or usage record, as streamed to watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageEvent {
    pub kind: EventKind,
    pub at: Timestamp,
    pub customer: String,
    pub feature: String,
    pub hold_id: Option<String>,
    pub usage: u64,
    pub dimensions: HashMap<String, String>,
    /// For a denial: the blocking limit and its entity.
    pub limit_id: Option<String>,
    pub entity_id: Option<String>,
}

/// One usage event to ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestItem {
    pub idempotency_key: String,
    pub customer: String,
    pub feature: String,
    pub usage: Usage,
    pub dimensions: HashMap<String, String>,
}

/// How ingesting one event went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestStatus {
    Recorded,
    /// Its idempotency key was already recorded: nothing changed.
    Duplicate,
    Rejected(String),
}

/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// Everything the front ends share.
#[derive(Debug)]
pub struct Service {
    pub engine: Engine,
    pub catalog: Catalog,
    pub metrics: Metrics,
    runtime: ArcSwap<Runtime>,
    events: broadcast::Sender<UsageEvent>,
}

impl Service {
    /// A service over `engine`, whose model was built from `doc`.
    pub fn new(engine: Engine, doc: ConfigDoc, server: &ServerSettings) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Self {
            engine,
            catalog: Catalog::new(doc),
            metrics: Metrics::new(),
            runtime: ArcSwap::from_pointee(Runtime::from(server)),
            events,
        }
    }

    /// Settles (`Some(usage)`) or releases (`None`) many holds, a result each, in order.
    pub async fn close_many(
        &self,
        closes: &[(HoldId, Option<Usage>)],
    ) -> Vec<Result<CloseOutcome, DecisionError>> {
        // Joined rather than awaited one by one: every close does its store work on the first
        // poll, so in sync mode they all share one commit.
        let results = join_all(closes.iter().map(|(hold, usage)| async move {
            match usage {
                Some(u) => self.engine.settle(hold, *u).await,
                None => self.engine.release(hold).await,
            }
        }))
        .await;
        closes
            .iter()
            .zip(results)
            .map(|((hold, usage), r)| match usage {
                Some(u) => self.closed(hold, u.units, EventKind::Settled, r),
                None => self.closed(hold, 0, EventKind::Released, r),
            })
            .collect()
    }

    /// Commits every hold past its TTL at its held amount.
    pub async fn expire_due(&self) -> Result<usize, DecisionError> {
        self.engine.expire_due().await
    }

    pub fn runtime(&self) -> arc_swap::Guard<Arc<Runtime>> {
        self.runtime.load()
    }

    /// Puts a reloaded config in force: the model (admin changes replayed on it), the
    /// credentials and the ext_authz mapping. On error nothing changes.
    pub async fn reload(&self, loaded: Loaded) -> Result<Vec<String>, AdminError> {
        let dropped = self.catalog.rebase(&self.engine, loaded.doc).await?;
        self.runtime.store(Arc::new(Runtime::from(&loaded.server)));
        Ok(dropped)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<UsageEvent> {
        self.events.subscribe()
    }

    /// The dimensions the model reads: all an event keeps of a request's dimensions.
    fn declared(&self, dimensions: &HashMap<String, String>) -> HashMap<String, String> {
        let model = self.engine.model();
        dimensions
            .iter()
            .filter(|(k, _)| model.dimensions.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn emit(&self, make: impl FnOnce() -> UsageEvent) {
        // Building an event copies the dimensions; skip it when nobody is watching.
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(make());
        }
    }

    /// A decision, counted in metrics by `api` and outcome, and streamed to watchers.
    pub async fn check(&self, api: Api, req: &CheckRequest<'_>) -> Result<Decision, DecisionError> {
        let started = Instant::now();
        let result = match bounded_dimensions(req.dimensions, &self.runtime().limits) {
            Ok(()) => self.engine.check(req).await,
            Err(e) => Err(e.into()),
        };
        let outcome = match &result {
            Ok(d) if !d.granted => Outcome::Denied,
            Ok(d) if d.would_deny().next().is_some() => Outcome::ShadowDenied,
            Ok(_) => Outcome::Granted,
            Err(DecisionError::Plan(_)) => Outcome::BadInput,
            Err(DecisionError::Store(_)) => Outcome::Error,
            Err(DecisionError::DeadlineExceeded) => Outcome::Late,
        };
        self.metrics.decision(api, outcome, started.elapsed());
        match &result {
            Err(e) => {
                tracing::debug!(customer = req.customer, feature = req.feature, error = %e, "decision failed")
            }
            Ok(d) if !d.granted => {
                tracing::debug!(customer = req.customer, feature = req.feature, reason = ?d.denial.as_ref().map(|x| &x.reason), "denied")
            }
            Ok(_) => {}
        }
        if let Ok(d) = &result
            && !d.dry_run
        {
            self.emit(|| UsageEvent {
                kind: if d.granted {
                    EventKind::Granted
                } else {
                    EventKind::Denied
                },
                at: self.engine.now(),
                customer: req.customer.to_string(),
                feature: req.feature.to_string(),
                hold_id: d.hold_id.as_ref().map(ToString::to_string),
                usage: req.usage.units,
                dimensions: self.declared(req.dimensions),
                limit_id: d.denial.as_ref().map(|x| x.limit_id.to_string()),
                entity_id: d.denial.as_ref().map(|x| x.entity_id.to_string()),
            });
        }
        result
    }

    fn closed(
        &self,
        hold: &HoldId,
        usage: u64,
        kind: EventKind,
        result: Result<CloseOutcome, DecisionError>,
    ) -> Result<CloseOutcome, DecisionError> {
        self.metrics.close(match (&result, kind) {
            (Ok(CloseOutcome::Closed), EventKind::Settled) => "settled",
            (Ok(CloseOutcome::Closed), _) => "released",
            (Ok(CloseOutcome::AlreadyClosed), _) => "already_closed",
            (Err(DecisionError::Store(StoreError::UnknownHold(_))), _) => "unknown_hold",
            (Err(DecisionError::Store(StoreError::SettleTooLarge { .. })), _) => "too_large",
            (Err(_), _) => "error",
        });
        if let Ok(CloseOutcome::Closed) = result {
            self.emit(|| UsageEvent {
                kind,
                at: self.engine.now(),
                customer: hold.customer.clone(),
                feature: String::new(),
                hold_id: Some(hold.to_string()),
                usage,
                dimensions: HashMap::new(),
                limit_id: None,
                entity_id: None,
            });
        }
        result
    }

    /// Corrects every counter of `hold` to the actual usage. Idempotent.
    pub async fn settle(
        &self,
        hold: &HoldId,
        actual: Usage,
    ) -> Result<CloseOutcome, DecisionError> {
        let result = self.engine.settle(hold, actual).await;
        self.closed(hold, actual.units, EventKind::Settled, result)
    }

    /// Undoes `hold`. Idempotent.
    pub async fn release(&self, hold: &HoldId) -> Result<CloseOutcome, DecisionError> {
        let result = self.engine.release(hold).await;
        self.closed(hold, 0, EventKind::Released, result)
    }

    /// Records one event of usage that was never gated.
    pub async fn ingest(&self, item: &IngestItem) -> IngestStatus {
        self.ingest_all(std::slice::from_ref(item))
            .await
            .pop()
            .unwrap_or(IngestStatus::Rejected("nothing to record".into()))
    }

    /// Records events, a status each, in order (joined, so in sync mode they share a commit).
    async fn ingest_all(&self, items: &[IngestItem]) -> Vec<IngestStatus> {
        let results = join_all(items.iter().map(|i| self.ingest_now(i))).await;
        items
            .iter()
            .zip(results)
            .map(|(item, r)| self.ingested(item, r))
            .collect()
    }

    /// The store call of one ingest; `Ok(None)` for an event refused before any store call.
    async fn ingest_now(&self, item: &IngestItem) -> Result<Option<bool>, DecisionError> {
        if item.idempotency_key.is_empty() || item.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
            return Ok(None);
        }
        bounded_dimensions(&item.dimensions, &self.runtime().limits)?;
        let req = CheckRequest {
            deadline: None,
            customer: &item.customer,
            feature: &item.feature,
            usage: item.usage,
            dimensions: &item.dimensions,
            dry_run: false,
        };
        self.engine
            .ingest(&req, &item.idempotency_key)
            .await
            .map(Some)
    }

    /// Metrics and events for one ingest outcome.
    fn ingested(&self, item: &IngestItem, r: Result<Option<bool>, DecisionError>) -> IngestStatus {
        let status = match r {
            Ok(None) => IngestStatus::Rejected(format!(
                "idempotencyKey must be 1 to {MAX_IDEMPOTENCY_KEY} bytes"
            )),
            Ok(Some(true)) => IngestStatus::Recorded,
            Ok(Some(false)) => IngestStatus::Duplicate,
            Err(e) => IngestStatus::Rejected(e.to_string()),
        };
        self.metrics.ingest(match status {
            IngestStatus::Recorded => "recorded",
            IngestStatus::Duplicate => "duplicate",
            IngestStatus::Rejected(_) => "rejected",
        });
        if status == IngestStatus::Recorded {
            self.emit(|| UsageEvent {
                kind: EventKind::Ingested,
                at: self.engine.now(),
                customer: item.customer.clone(),
                feature: item.feature.clone(),
                hold_id: None,
                usage: item.usage.units,
                dimensions: self.declared(&item.dimensions),
                limit_id: None,
                entity_id: None,
            });
        }
        status
    }

    /// Records a batch of events for `principal`. If any event belongs to a customer the
    /// principal does not reach, nothing is recorded and that customer is returned.
    pub async fn ingest_batch(
        &self,
        principal: &Principal,
        items: &[IngestItem],
    ) -> Result<Vec<IngestStatus>, String> {
        if let Some(foreign) = items.iter().find(|i| !principal.may_access(&i.customer)) {
            return Err(foreign.customer.clone());
        }
        Ok(self.ingest_all(items).await)
    }

    /// Applies an admin change; it is in force for the next decision.
    pub async fn admin(&self, op: AdminOp) -> Result<(), AdminError> {
        let what = format!("{op:?}");
        let result = self.catalog.apply(&self.engine, op).await;
        match &result {
            Ok(()) => {
                tracing::info!(change = %what.chars().take(200).collect::<String>(), "admin change applied")
            }
            Err(e) => tracing::info!(error = %e, "admin change refused"),
        }
        result
    }
}
