//! The sidecar's operations, shared by the ext_authz, gRPC and HTTP front ends: decisions,
//! settlement, ingest and admin changes, with their metrics and usage events; what they read
//! goes through the reading desk (`read.rs`). No front end reaches the engine or the store.

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

mod admin;
mod decide;
mod read;

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
    /// A streamed call the gateway cut or let finish past a refusal (ignored on a release).
    pub end: Option<ReportedEnd<'a>>,
}

/// How a streamed call ended, as the gateway reports it: cut (`true`) or finished past a
/// refusal, and by what (a limit id, or `sidecar-unreachable`); checked before it is recorded.
#[derive(Debug, Clone, Copy)]
pub struct ReportedEnd<'a> {
    pub cut: bool,
    pub by: &'a str,
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

    /// Counts a request Envoy's access log reported, by what it did to its hold.
    pub fn access_log_counted(&self, result: &'static str) {
        self.metrics.access_log(result);
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
}
