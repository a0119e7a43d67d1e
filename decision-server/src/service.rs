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
use crate::core::plan::PlanError;
use crate::core::usage::Usage;
use crate::core::{Decision, HoldId, Timestamp};
use crate::engine::{CheckRequest, DecisionError, Engine};
use crate::metrics::{Api, Metrics, Outcome};
use crate::store::{CloseOutcome, StoreError};
use futures_util::future::join_all;

/// How many usage events a slow watcher may fall behind before it misses some.
const EVENT_BUFFER: usize = 4096;

/// The settings a reload can change while running.
#[derive(Debug)]
pub struct Reloadable {
    pub credentials: Credentials,
    pub ext_authz: ExtAuthzSettings,
    pub limits: RequestLimits,
}

impl From<&ServerSettings> for Reloadable {
    fn from(s: &ServerSettings) -> Self {
        Self {
            credentials: Credentials::new(s.operator_sha256, &s.api_keys, &s.gateway_tokens)
                .with_mesh_peers(&s.mesh_peers),
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

/// The most events one ingest call, or holds one close call, may carry, on every front end:
/// one call's work is joined into one commit, so its size is latency every other caller waits.
pub const MAX_BATCH: usize = 1000;

/// Why a whole batch was refused, before any of it reached the store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("{count} {what} in one batch; at most {max}")]
    TooLarge {
        what: &'static str,
        count: usize,
        max: usize,
    },
    /// An event of a customer the caller does not reach.
    #[error("these credentials do not reach customer `{0}`")]
    Foreign(String),
}

/// One hold of a close batch: its id as the caller sent it, and the usage to settle at
/// (`None` releases it).
#[derive(Debug, Clone, Copy)]
pub struct CloseItem<'a> {
    pub hold_id: &'a str,
    pub usage: Option<Usage>,
}

/// Why one hold of a close batch was not closed.
#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    /// Its id does not parse, or it belongs to a customer the caller does not reach: it never
    /// reached the store.
    #[error("hold `{hold}`: {reason}")]
    Refused { hold: String, reason: String },
    #[error("hold `{hold}`: {error}")]
    Failed {
        hold: String,
        error: Box<DecisionError>,
    },
}

fn within_batch(what: &'static str, count: usize) -> Result<(), BatchError> {
    if count > MAX_BATCH {
        return Err(BatchError::TooLarge {
            what,
            count,
            max: MAX_BATCH,
        });
    }
    Ok(())
}

/// Everything the front ends share.
#[derive(Debug)]
pub struct Service {
    engine: Engine,
    catalog: Catalog,
    metrics: Metrics,
    settings: ArcSwap<Reloadable>,
    events: broadcast::Sender<UsageEvent>,
    /// Turns true when the server stops: long-lived responses (the usage stream) end on it.
    stopping: tokio::sync::watch::Sender<bool>,
    alert_claims: crate::alerts::Claims,
    deliverer: Option<crate::alerts::deliver::Deliverer>,
    sessions: crate::session::Sessions,
    /// The escrow leases in front of the store, when enabled: their metrics, and their
    /// return at a graceful stop.
    leases: Option<crate::store::LeasedStore>,
}

impl Service {
    /// A service over `engine`, whose model was built from `doc`.
    pub fn new(engine: Engine, doc: ConfigDoc, server: &ServerSettings) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Self {
            engine,
            catalog: Catalog::new(doc),
            metrics: Metrics::new(),
            settings: ArcSwap::from_pointee(Reloadable::from(server)),
            events,
            stopping: tokio::sync::watch::Sender::new(false),
            alert_claims: crate::alerts::Claims::default(),
            sessions: crate::session::Sessions::default(),
            leases: None,
            deliverer: match crate::alerts::deliver::Deliverer::new() {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::error!(error = %e, "no HTTP client for webhooks: alerts reach the usage stream only");
                    None
                }
            },
        }
    }

    /// Notes the leases in front of the engine's store (see [`Service::return_leases`]).
    #[must_use]
    pub fn with_leases(mut self, leases: Option<crate::store::LeasedStore>) -> Self {
        self.leases = leases;
        self
    }

    /// Gives every lease back to the store (what was spent committed, the rest returned) and
    /// writes the records of local decisions: at a graceful stop, so a replica that leaves
    /// strands nothing until its slices' TTL.
    pub async fn return_leases(&self) -> Result<(), StoreError> {
        match &self.leases {
            Some(l) => l.return_all(self.engine.now()).await,
            None => Ok(()),
        }
    }

    /// Starts sending the webhook deliveries due now, each customer's on its own task; how
    /// many customers' passes were started.
    pub fn deliver_due(&self) -> usize {
        match &self.deliverer {
            Some(d) => d.pass(&self.engine),
            None => 0,
        }
    }

    /// Sends the webhook deliveries due now and waits for them; how many attempts were made.
    pub async fn deliver_due_and_wait(&self) -> Result<usize, StoreError> {
        match &self.deliverer {
            Some(d) => d.pass_and_wait(&self.engine).await,
            None => Ok(0),
        }
    }

    /// Ends the long-lived responses (usage streams), so that a graceful stop can drain.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Turns true when [`Service::stop`] is called.
    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// The engine, for the read-only queries (usage, budgets) that go to it directly.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Closes a batch of holds for `principal`, a result each, in order. A hold whose id does
    /// not parse or whose customer the principal does not reach is refused on its own; the
    /// rest reach the store together.
    pub async fn close_batch(
        &self,
        principal: &Principal,
        items: &[CloseItem<'_>],
    ) -> Result<Vec<Result<CloseOutcome, CloseError>>, BatchError> {
        within_batch("holds", items.len())?;
        let refused = |item: &CloseItem<'_>, reason: String| CloseError::Refused {
            hold: item.hold_id.to_string(),
            reason,
        };
        let parsed: Vec<Result<(HoldId, Option<Usage>), CloseError>> = items
            .iter()
            .map(|item| {
                let hold: HoldId = item.hold_id.parse().map_err(
                    |e: crate::core::decision::ParseHoldIdError| refused(item, e.to_string()),
                )?;
                if !principal.may_decide(&hold.customer) {
                    let reason = BatchError::Foreign(hold.customer.clone()).to_string();
                    return Err(refused(item, reason));
                }
                Ok((hold, item.usage))
            })
            .collect();
        let closes: Vec<(HoldId, Option<Usage>)> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok().cloned())
            .collect();
        let mut outcomes = self.close_many(&closes).await.into_iter();
        Ok(parsed
            .into_iter()
            .map(|p| {
                let (hold, _) = p?;
                match outcomes.next() {
                    Some(Ok(outcome)) => Ok(outcome),
                    Some(Err(error)) => Err(CloseError::Failed {
                        hold: hold.to_string(),
                        error: Box::new(error),
                    }),
                    // One outcome per close reaches here by construction; kept total anyway.
                    None => Err(CloseError::Refused {
                        hold: hold.to_string(),
                        reason: "no outcome".into(),
                    }),
                }
            })
            .collect())
    }

    /// Settles (`Some(usage)`) or releases (`None`) many holds, a result each, in order.
    async fn close_many(
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

    /// The settings in force (credentials, ext_authz mapping, request bounds).
    pub fn settings(&self) -> arc_swap::Guard<Arc<Reloadable>> {
        self.settings.load()
    }

    /// The time decisions are made at.
    pub fn now(&self) -> Timestamp {
        self.engine.now()
    }

    /// Counts a request refused before it reached a decision (its input could not be read).
    pub fn bad_input(&self, api: Api) {
        self.metrics
            .decision(api, Outcome::BadInput, std::time::Duration::ZERO);
    }

    /// Counts a config reload attempt by how it ended (`applied`, `rejected`).
    pub fn reload_counted(&self, result: &'static str) {
        self.metrics.reload(result);
    }

    /// The connection counters the listeners report to.
    pub fn connection_events(&self) -> crate::metrics::ConnectionMetrics {
        self.metrics.connections()
    }

    /// The Prometheus exposition of every metric, the store's included.
    pub fn render_metrics(&self) -> String {
        self.metrics.render(
            self.engine.store().stats(),
            self.leases
                .as_ref()
                .map(crate::store::LeasedStore::lease_stats),
        )
    }

    /// The store's figures (open holds, counters, ...).
    pub fn store_stats(&self) -> crate::store::StoreStats {
        self.engine.store().stats()
    }

    /// The units counted now by a limit for an entity (see [`Engine::counted`]). For
    /// inspection and tests, not for decisions.
    pub async fn counted(
        &self,
        customer: &str,
        entity_id: &str,
        limit_id: &str,
        pool: Option<&str>,
    ) -> Result<Option<u64>, StoreError> {
        self.engine
            .counted(customer, entity_id, limit_id, pool)
            .await
    }

    /// Makes every change so far durable (a clean stop calls it whatever the mode).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.engine.store().flush()
    }

    /// Reads the config in force (file plus admin changes).
    pub fn read_config<R>(&self, f: impl FnOnce(&ConfigDoc) -> R) -> R {
        self.catalog.read(f)
    }

    /// Identifies a caller on `listener`: the configured credentials (and, on the ext_authz
    /// listener, mesh peers), then the API keys customers' admins made (kept in the model).
    pub fn authenticate_request(
        &self,
        header: Option<&str>,
        client_cert: Option<&str>,
        listener: crate::auth::Listener,
    ) -> Result<Principal, crate::auth::AuthError> {
        let result =
            self.settings()
                .credentials
                .authenticate_request(header, client_cert, listener);
        match result {
            Err(crate::auth::AuthError::Invalid) => {
                let token = crate::auth::bearer_token(header)?;
                self.catalog
                    .customer_key(token)
                    .ok_or(crate::auth::AuthError::Invalid)
            }
            other => other,
        }
    }

    /// [`Service::authenticate_request`] from an `authorization` header alone.
    pub fn authenticate(
        &self,
        header: Option<&str>,
        listener: crate::auth::Listener,
    ) -> Result<Principal, crate::auth::AuthError> {
        self.authenticate_request(header, None, listener)
    }

    /// Checks a bare token as the HTTP API would (for the portal's sessions).
    pub fn token_check(&self) -> impl Fn(&str) -> Result<Principal, crate::auth::AuthError> + '_ {
        move |token| self.authenticate(Some(&format!("Bearer {token}")), crate::auth::Listener::Api)
    }

    /// The portal's sessions.
    pub fn sessions(&self) -> &crate::session::Sessions {
        &self.sessions
    }

    /// The audit log of admin changes, for one customer or all.
    pub fn audit(&self, customer: Option<&str>) -> Vec<crate::catalog::Logged> {
        self.catalog.audit(customer)
    }

    /// How many admin changes are in force on top of the file.
    pub fn admin_changes(&self) -> usize {
        self.catalog.admin_changes()
    }

    /// Puts back the admin changes the store kept (from before a restart, or saved by another
    /// replica). Returns how many were restored; logs those that no longer apply.
    pub async fn restore_admin_changes(&self) -> Result<usize, AdminError> {
        let kept = crate::catalog::load(&self.engine).await?;
        for s in &kept.skipped {
            tracing::warn!("{s}");
        }
        if kept.ops.is_empty() && kept.revision == 0 {
            return Ok(0);
        }
        let n = kept.ops.len();
        let dropped = self.catalog.replay(&self.engine, kept).await?;
        for d in &dropped {
            tracing::warn!("{d}");
        }
        Ok(n - dropped.len())
    }

    /// Takes in admin changes another replica saved to a shared store; `true` if any were.
    pub async fn follow_admin_changes(&self) -> Result<bool, AdminError> {
        self.catalog.follow(&self.engine).await
    }

    /// Puts a reloaded config in force: the model (admin changes replayed on it), the
    /// credentials and the ext_authz mapping. On error nothing changes.
    pub async fn reload(&self, loaded: Loaded) -> Result<Vec<String>, AdminError> {
        let dropped = self.catalog.rebase(&self.engine, loaded.doc).await?;
        self.settings
            .store(Arc::new(Reloadable::from(&loaded.server)));
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
        let result = match bounded_dimensions(req.dimensions, &self.settings().limits) {
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
        // Alerts inline: evaluating is pure and costs nothing; only a decision that crosses a
        // threshold (rare) or falls back under a held one calls the store, once per crossing.
        if let Ok(d) = &result
            && let Err(e) =
                crate::alerts::after_decision(&self.engine, &self.alert_claims, req.customer, d)
                    .await
        {
            tracing::warn!(customer = req.customer, error = %e, "an alert could not be claimed");
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
        let mut result = self.engine.settle(hold, actual).await;
        if let Err(DecisionError::Store(StoreError::SettleTooLarge {
            actual: reported,
            max,
            ..
        })) = result
        {
            // Real usage is never turned into free usage: a report above the hold's ceiling
            // (a stored conversation, a file, or a forged report, which only a credential
            // holder can send) is charged at the ceiling, and the rest is counted for an alert.
            // The store refused the first try whole, so the second is the only one applied.
            let excess = reported.saturating_sub(max);
            self.metrics.settle_capped(excess);
            tracing::warn!(
                hold = %hold,
                reported,
                charged = max,
                "a settlement reported more than its hold's ceiling; charged the ceiling (set the feature's maxSettleUsage or the model's contextWindow for more)"
            );
            let charged = actual.capped_at(max);
            result = self.engine.settle(hold, charged).await;
            return self.closed(hold, charged.units, EventKind::Settled, result);
        }
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
        bounded_dimensions(&item.dimensions, &self.settings().limits)?;
        let req = CheckRequest {
            deadline: None,
            customer: &item.customer,
            feature: &item.feature,
            usage: item.usage,
            dimensions: &item.dimensions,
            dry_run: false,
        };
        let recorded = self.engine.ingest(&req, &item.idempotency_key).await?;
        if recorded
            && let Err(e) =
                crate::alerts::after_ingest(&self.engine, &self.alert_claims, &req).await
        {
            tracing::warn!(customer = req.customer, error = %e, "an alert could not be claimed");
        }
        Ok(Some(recorded))
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
    ) -> Result<Vec<IngestStatus>, BatchError> {
        within_batch("events", items.len())?;
        if let Some(foreign) = items.iter().find(|i| !principal.may_decide(&i.customer)) {
            return Err(BatchError::Foreign(foreign.customer.clone()));
        }
        Ok(self.ingest_all(items).await)
    }

    /// Applies an admin change; it is in force for the next decision.
    pub async fn admin(&self, op: AdminOp) -> Result<(), AdminError> {
        self.admin_as(&Principal::Operator, op).await
    }

    /// An admin change made by `by`: a customer admin's is held to the ceiling guard; every
    /// change is logged with who made it (the audit log).
    /// A change by `by`.
    pub async fn admin_as(&self, by: &Principal, op: AdminOp) -> Result<(), AdminError> {
        self.admin_by_key(by, None, op).await
    }

    /// A change by `by`, who presented API key `key` (if a customer's key): the audit log
    /// names both.
    pub async fn admin_by_key(
        &self,
        by: &Principal,
        key: Option<&str>,
        op: AdminOp,
    ) -> Result<(), AdminError> {
        let (kind, id) = op.target();
        let who = match key {
            Some(k) => format!("{} (key {k})", by.describe()),
            None => by.describe(),
        };
        let what = format!(
            "{} {kind} `{id}` of `{}` by {who}",
            op.action(),
            op.customer().unwrap_or("-"),
        );
        let result = self
            .catalog
            .apply_as(&self.engine, op, by, &who, self.now().millis())
            .await;
        match &result {
            Ok(()) => {
                tracing::info!(change = %what.chars().take(200).collect::<String>(), "admin change applied")
            }
            Err(e) => tracing::info!(error = %e, "admin change refused"),
        }
        result
    }
}
