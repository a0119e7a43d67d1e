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
use crate::config::server::{ExtAuthzSettings, ServerSettings};
use crate::core::plan::Usage;
use crate::core::{Decision, HoldId, Timestamp};
use crate::engine::{CheckRequest, DecisionError, Engine};
use crate::metrics::{Api, Metrics, Outcome};
use crate::store::{CloseOutcome, StoreError};

/// How many usage events a slow watcher may fall behind before it misses some.
const EVENT_BUFFER: usize = 4096;

/// The settings a reload can change while running.
#[derive(Debug)]
pub struct Runtime {
    pub credentials: Credentials,
    pub ext_authz: ExtAuthzSettings,
}

impl From<&ServerSettings> for Runtime {
    fn from(s: &ServerSettings) -> Self {
        Self {
            credentials: Credentials::new(s.operator_sha256, &s.api_keys),
            ext_authz: s.ext_authz.clone(),
        }
    }
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

    /// Runs a store call. A store that waits for the disk (the durable store in sync mode)
    /// would otherwise park a runtime worker per waiting decision; `block_in_place` hands the
    /// worker's other tasks to another thread first, so every in-flight decision can wait on
    /// the same group commit. Trade-off: a thread hand-off per decision, paid only by stores
    /// that block.
    fn storing<R>(&self, f: impl FnOnce() -> R) -> R {
        use tokio::runtime::{Handle, RuntimeFlavor};
        let multi_thread =
            Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        if multi_thread && self.engine.store().blocks() {
            tokio::task::block_in_place(f)
        } else {
            f()
        }
    }

    pub fn runtime(&self) -> arc_swap::Guard<Arc<Runtime>> {
        self.runtime.load()
    }

    /// Puts a reloaded config in force: the model (admin changes replayed on it), the
    /// credentials and the ext_authz mapping. On error nothing changes.
    pub fn reload(&self, loaded: Loaded) -> Result<Vec<String>, AdminError> {
        let dropped = self.catalog.rebase(&self.engine, loaded.doc)?;
        self.runtime.store(Arc::new(Runtime::from(&loaded.server)));
        Ok(dropped)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<UsageEvent> {
        self.events.subscribe()
    }

    fn emit(&self, make: impl FnOnce() -> UsageEvent) {
        // Building an event copies the dimensions; skip it when nobody is watching.
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(make());
        }
    }

    /// A decision, counted in metrics by `api` and outcome, and streamed to watchers.
    pub fn check(&self, api: Api, req: &CheckRequest<'_>) -> Result<Decision, DecisionError> {
        let started = Instant::now();
        let result = self.storing(|| self.engine.check(req));
        let outcome = match &result {
            Ok(d) if !d.granted => Outcome::Denied,
            Ok(d) if d.would_deny().next().is_some() => Outcome::ShadowDenied,
            Ok(_) => Outcome::Granted,
            Err(DecisionError::Plan(_)) => Outcome::BadInput,
            Err(DecisionError::Store(_)) => Outcome::Error,
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
                dimensions: req.dimensions.clone(),
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
    pub fn settle(&self, hold: &HoldId, actual: Usage) -> Result<CloseOutcome, DecisionError> {
        let result = self.storing(|| self.engine.settle(hold, actual));
        self.closed(hold, actual.units, EventKind::Settled, result)
    }

    /// Undoes `hold`. Idempotent.
    pub fn release(&self, hold: &HoldId) -> Result<CloseOutcome, DecisionError> {
        let result = self.storing(|| self.engine.release(hold));
        self.closed(hold, 0, EventKind::Released, result)
    }

    /// Records one event of usage that was never gated.
    pub fn ingest(&self, item: &IngestItem) -> IngestStatus {
        let status = if item.idempotency_key.is_empty()
            || item.idempotency_key.len() > MAX_IDEMPOTENCY_KEY
        {
            IngestStatus::Rejected(format!(
                "idempotencyKey must be 1 to {MAX_IDEMPOTENCY_KEY} bytes"
            ))
        } else {
            let req = CheckRequest {
                customer: &item.customer,
                feature: &item.feature,
                usage: item.usage,
                dimensions: &item.dimensions,
                dry_run: false,
            };
            match self.storing(|| self.engine.ingest(&req, &item.idempotency_key)) {
                Ok(true) => IngestStatus::Recorded,
                Ok(false) => IngestStatus::Duplicate,
                Err(e) => IngestStatus::Rejected(e.to_string()),
            }
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
                dimensions: item.dimensions.clone(),
                limit_id: None,
                entity_id: None,
            });
        }
        status
    }

    /// Records a batch of events for `principal`. If any event belongs to a customer the
    /// principal does not reach, nothing is recorded and that customer is returned.
    pub fn ingest_batch(
        &self,
        principal: &Principal,
        items: &[IngestItem],
    ) -> Result<Vec<IngestStatus>, String> {
        if let Some(foreign) = items.iter().find(|i| !principal.may_access(&i.customer)) {
            return Err(foreign.customer.clone());
        }
        Ok(items.iter().map(|i| self.ingest(i)).collect())
    }

    /// Applies an admin change; it is in force for the next decision.
    pub fn admin(&self, op: AdminOp) -> Result<(), AdminError> {
        let what = format!("{op:?}");
        let result = self.catalog.apply(&self.engine, op);
        match &result {
            Ok(()) => {
                tracing::info!(change = %what.chars().take(200).collect::<String>(), "admin change applied")
            }
            Err(e) => tracing::info!(error = %e, "admin change refused"),
        }
        result
    }
}
