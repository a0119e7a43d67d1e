//! Tollgate's own gRPC service (`tollgate.v1.Tollgate`): check, settle, release, usage ingest
//! and the `WatchUsage` stream, with the same credentials as the HTTP API.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tollgate_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::auth::{Listener, Principal};
use crate::core::rollup::{RecordKind, RecordRef};
use crate::core::usage::{TokenCounts, Usage};
use crate::core::{ChainEntry, Decision, HoldId};
use crate::engine::{CheckRequest, DecisionError};
use crate::metrics::Api;
use crate::service::{
    BatchError, CloseError, CloseItem, EventKind, IngestItem, IngestStatus, ReportedEnd, Service,
    UsageEvent,
};
use crate::store::events::EventBody;
use crate::store::{CloseOutcome, StoreError};
use crate::usage::Followed;
use crate::usage::UsageError;

use super::generated::tollgate_server::Tollgate;

fn usage(units: u64, tokens: Option<pb::Tokens>) -> Usage {
    Usage {
        units,
        tokens: tokens.map(|t| TokenCounts {
            input: t.input,
            output: t.output,
            cached: t.cached,
            cache_write: t.cache_write,
            reasoning: t.reasoning,
        }),
    }
}

fn millis(t: Option<crate::core::Timestamp>) -> i64 {
    t.map_or(0, |t| t.millis())
}

impl From<&ChainEntry> for pb::ChainEntry {
    fn from(e: &ChainEntry) -> Self {
        Self {
            level: u32::try_from(e.level).unwrap_or(u32::MAX),
            entity_id: e.entity_id.to_string(),
            entity_type: e.entity_type.to_string(),
            limit_id: e.limit_id.to_string(),
            feature_id: e.feature_id.to_string(),
            kind: e.kind.to_string(),
            mode: e.mode.as_str().to_string(),
            requested: e.requested,
            usage_limit: e.usage_limit,
            current_usage: e.current_usage,
            remaining: e.remaining,
            reset_at_ms: millis(e.reset_at),
            exceeded: e.exceeded,
        }
    }
}

impl From<&Decision> for pb::CheckResponse {
    fn from(d: &Decision) -> Self {
        let tight = d.tightest();
        Self {
            is_granted: d.granted,
            hold_id: d
                .hold_id
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            access_denied_reason: d
                .denial
                .as_ref()
                .map(|x| x.reason.clone())
                .unwrap_or_default(),
            usage_limit: tight.map_or(0, |e| e.usage_limit),
            current_usage: tight.map_or(0, |e| e.current_usage),
            remaining: tight.map_or(0, |e| e.remaining),
            reset_at_ms: millis(tight.and_then(|e| e.reset_at)),
            retry_at_ms: millis(d.denial.as_ref().and_then(|x| x.retry_at)),
            no_matching_limit: d.no_matching_limit,
            chain: d.chain.iter().map(Into::into).collect(),
            would_deny: d.would_deny().map(|e| e.limit_id.to_string()).collect(),
        }
    }
}

/// A store event (usage record or alert) as the resumable `WatchUsage` sends it.
fn stream_event(f: Followed) -> pb::UsageEvent {
    use pb::usage_event::Kind;
    let e = match f {
        Followed::Event(e) => e,
        Followed::Gap => {
            return pb::UsageEvent {
                kind: Kind::Gap.into(),
                ..pb::UsageEvent::default()
            };
        }
        Followed::Unavailable(m) => {
            // Not an event of the stream: the watcher is told through the alert text field,
            // with no id, and the stream goes on.
            return pb::UsageEvent {
                kind: Kind::Unspecified.into(),
                alert_json: serde_json::json!({ "unavailable": m }).to_string(),
                ..pb::UsageEvent::default()
            };
        }
    };
    let base = pb::UsageEvent {
        event_id: e.id.clone(),
        at_ms: e.at.millis(),
        customer_id: e.customer.to_string(),
        ..pb::UsageEvent::default()
    };
    match &*e.body {
        EventBody::Alert(a) => pb::UsageEvent {
            kind: Kind::Alert.into(),
            alert_json: a.clone(),
            ..base
        },
        EventBody::Record(r) => {
            let kind = match r.kind {
                RecordKind::Settled => Kind::Settled,
                RecordKind::Released => Kind::Released,
                RecordKind::Expired => Kind::Expired,
                RecordKind::Ingested => Kind::Ingested,
                RecordKind::Denied => Kind::Denied,
                RecordKind::Committed => Kind::Committed,
            };
            let hold_id = match r.reference {
                RecordRef::Hold { seq, tag } => HoldId {
                    customer: e.customer.to_string(),
                    seq,
                    tag,
                }
                .to_string(),
                _ => String::new(),
            };
            pb::UsageEvent {
                kind: kind.into(),
                feature_id: r.series.feature.to_string(),
                usage: r.measures.units,
                hold_id,
                limit_id: r
                    .series
                    .get(crate::core::rollup::DENIED_BY)
                    .unwrap_or_default()
                    .to_string(),
                attributes: r
                    .series
                    .attrs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..base
            }
        }
    }
}

impl TollgateService {
    /// `WatchUsage` in resumable mode: the store's events after `after`.
    async fn watch_resumable(
        &self,
        customer: Option<String>,
        after: String,
    ) -> Result<Response<EventStream>, Status> {
        let follow = self
            .service
            .follow_usage(customer.as_deref(), Some(after))
            .await
            .map_err(|e| match e {
                UsageError::UnknownCustomer(c) => Status::not_found(format!("no customer `{c}`")),
                UsageError::Store(StoreError::BadCursor(c)) => {
                    Status::invalid_argument(format!("`{c}` is not an event id of this stream"))
                }
                e => Status::unavailable(e.to_string()),
            })?;
        let mut shutdown = self.shutdown.clone();
        let stream = follow.map(|f| Ok(stream_event(f))).take_until(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

impl From<&UsageEvent> for pb::UsageEvent {
    fn from(e: &UsageEvent) -> Self {
        let kind = match e.kind {
            EventKind::Granted => pb::usage_event::Kind::Granted,
            EventKind::Denied => pb::usage_event::Kind::Denied,
            EventKind::Settled => pb::usage_event::Kind::Settled,
            EventKind::Released => pb::usage_event::Kind::Released,
            EventKind::Ingested => pb::usage_event::Kind::Ingested,
        };
        Self {
            kind: kind.into(),
            at_ms: e.at.millis(),
            customer_id: e.customer.clone(),
            feature_id: e.feature.clone(),
            hold_id: e.hold_id.clone().unwrap_or_default(),
            usage: e.usage,
            dimensions: e.dimensions.clone(),
            limit_id: e.limit_id.clone().unwrap_or_default(),
            entity_id: e.entity_id.clone().unwrap_or_default(),
            ..Self::default()
        }
    }
}

fn decision_status(e: DecisionError) -> Status {
    match e {
        DecisionError::Plan(e) => Status::invalid_argument(e.to_string()),
        DecisionError::Store(e @ StoreError::UnknownHold(_)) => Status::not_found(e.to_string()),
        DecisionError::Store(e @ StoreError::SettleTooLarge { .. }) => {
            Status::invalid_argument(e.to_string())
        }
        DecisionError::Store(e) => Status::unavailable(e.to_string()),
        e @ DecisionError::DeadlineExceeded => Status::deadline_exceeded(e.to_string()),
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct TollgateService {
    service: Arc<Service>,
    shutdown: watch::Receiver<bool>,
    /// The listener it serves: on the ext_authz listener, where the WASM filter settles and
    /// releases the holds its checks opened, gateway tokens are accepted too.
    listener: Listener,
}

/// The caller of a gRPC request, from its `authorization` metadata, as presented on
/// `listener`; every front end on gRPC asks this one function.
pub fn principal_of<T>(
    service: &Service,
    request: &Request<T>,
    listener: Listener,
) -> Result<Principal, Status> {
    let header = request
        .metadata()
        .get("authorization")
        .map(|v| {
            v.to_str()
                .map_err(|_| Status::unauthenticated("the `authorization` metadata is not text"))
        })
        .transpose()?;
    let client_cert = request
        .metadata()
        .get("x-forwarded-client-cert")
        .and_then(|v| v.to_str().ok());
    let principal = service
        .authenticate_request(header, client_cert, listener)
        .map_err(|e| Status::unauthenticated(e.message_on(listener)))?;
    crate::net::mark_authenticated(request);
    Ok(principal)
}

impl TollgateService {
    /// `shutdown` turning true ends open `WatchUsage` streams, so shutdown can drain.
    pub fn new(service: Arc<Service>, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            service,
            shutdown,
            listener: Listener::Api,
        }
    }

    /// The same service for the ext_authz listener: the filter closes its holds there with the
    /// gateway token it decides with.
    pub fn ext_authz(service: Arc<Service>, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            service,
            shutdown,
            listener: Listener::ExtAuthz,
        }
    }

    fn principal<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        principal_of(&self.service, request, self.listener)
    }

    /// The caller, for a method a gateway token may not call (ingest, watch).
    fn principal_not_gateway<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        match self.principal(request)? {
            Principal::Gateway(_) => Err(Status::permission_denied(
                "a gateway token decides and closes holds; this method needs an API key or the operator token",
            )),
            p => Ok(p),
        }
    }

    fn hold<T>(&self, request: &Request<T>, hold_id: &str) -> Result<HoldId, Status> {
        let principal = self.principal(request)?;
        let hold: HoldId =
            hold_id
                .parse()
                .map_err(|e: crate::core::decision::ParseHoldIdError| {
                    Status::invalid_argument(e.to_string())
                })?;
        if !principal.may_decide(&hold.customer) {
            return Err(forbidden(&hold.customer));
        }
        Ok(hold)
    }
}

/// A stream's end as the wire carries it.
fn reported_end(e: &pb::StreamEnd) -> ReportedEnd<'_> {
    ReportedEnd {
        cut: e.how() == pb::stream_end::How::Cut,
        by: &e.by,
    }
}

impl TollgateService {
    /// Closes every hold it may (one commit wait for all), a result each, in order.
    async fn close_all(
        &self,
        principal: &Principal,
        holds: &[pb::HoldClose],
    ) -> Result<Vec<pb::HoldCloseResult>, Status> {
        use pb::hold_close_result::Status as S;
        let items: Vec<CloseItem<'_>> = holds
            .iter()
            .map(|h| CloseItem {
                hold_id: &h.hold_id,
                usage: h.actual_usage.map(|u| usage(u, h.tokens)),
                end: h.stream_end.as_ref().map(reported_end),
            })
            .collect();
        let results = self
            .service
            .close_batch(principal, &items)
            .await
            .map_err(batch_status)?;
        let result = |status: S, message: String| pb::HoldCloseResult {
            status: status as i32,
            message,
        };
        Ok(results
            .into_iter()
            .map(|r| match r {
                Ok(CloseOutcome::Closed) => result(S::Closed, String::new()),
                Ok(CloseOutcome::AlreadyClosed) => result(S::AlreadyClosed, String::new()),
                Err(e @ CloseError::Refused { .. }) => result(S::Rejected, e.to_string()),
                Err(CloseError::Failed { hold, error }) => {
                    let status = decision_status(*error);
                    let s = if status.code() == tonic::Code::Unavailable {
                        S::Failed
                    } else {
                        S::Rejected
                    };
                    result(s, format!("hold `{hold}`: {}", status.message()))
                }
            })
            .collect())
    }
}

/// A refused batch: too large is the caller's argument, a foreign customer its permission.
fn batch_status(e: BatchError) -> Status {
    match e {
        e @ BatchError::TooLarge { .. } => Status::invalid_argument(e.to_string()),
        e @ BatchError::Foreign(_) => Status::permission_denied(e.to_string()),
    }
}

fn forbidden(customer: &str) -> Status {
    Status::permission_denied(format!(
        "these credentials do not reach customer `{customer}`"
    ))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::UsageEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Tollgate for TollgateService {
    async fn check(
        &self,
        request: Request<pb::CheckRequest>,
    ) -> Result<Response<pb::CheckResponse>, Status> {
        let principal = self.principal(&request)?;
        let r = request.into_inner();
        if !principal.may_decide(&r.customer_id) {
            return Err(forbidden(&r.customer_id));
        }
        let req = CheckRequest {
            deadline: None,
            customer: &r.customer_id,
            feature: &r.feature_id,
            usage: usage(r.requested_usage, r.tokens),
            dimensions: &r.dimensions,
            dry_run: r.dry_run,
            commit: r.commit,
        };
        let d = self
            .service
            .check(Api::Grpc, &req)
            .await
            .map_err(decision_status)?;
        Ok(Response::new((&d).into()))
    }

    async fn settle(
        &self,
        request: Request<pb::SettleRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let hold = self.hold(&request, &request.get_ref().hold_id)?;
        let r = request.into_inner();
        let outcome = self
            .service
            .settle_ended(
                &hold,
                usage(r.actual_usage, r.tokens),
                r.stream_end.as_ref().map(reported_end),
            )
            .await
            .map_err(decision_status)?;
        Ok(Response::new(pb::SettleResponse {
            closed: outcome == CloseOutcome::Closed,
        }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let hold = self.hold(&request, &request.get_ref().hold_id)?;
        let outcome = self.service.release(&hold).await.map_err(decision_status)?;
        Ok(Response::new(pb::ReleaseResponse {
            closed: outcome == CloseOutcome::Closed,
        }))
    }

    async fn close_holds(
        &self,
        request: Request<pb::CloseHoldsRequest>,
    ) -> Result<Response<pb::CloseHoldsResponse>, Status> {
        let principal = self.principal(&request)?;
        let holds = request.into_inner().holds;
        let results = self.close_all(&principal, &holds).await?;
        Ok(Response::new(pb::CloseHoldsResponse { results }))
    }

    async fn ingest_usage(
        &self,
        request: Request<pb::IngestUsageRequest>,
    ) -> Result<Response<pb::IngestUsageResponse>, Status> {
        // A gateway reports here what it let through while the sidecar was unreachable
        // (the filter's bounded fail mode), for the customers it reaches.
        let principal = self.principal(&request)?;
        let items: Vec<IngestItem> = request
            .into_inner()
            .events
            .into_iter()
            .map(|e| IngestItem {
                idempotency_key: e.idempotency_key,
                customer: e.customer_id,
                feature: e.feature_id,
                usage: usage(e.usage, e.tokens),
                dimensions: e.dimensions,
            })
            .collect();
        let statuses = self
            .service
            .ingest_batch(&principal, &items)
            .await
            .map_err(batch_status)?;
        let results = items
            .into_iter()
            .zip(statuses)
            .map(|(item, status)| {
                let (status, error) = match status {
                    IngestStatus::Recorded => (pb::ingest_result::Status::Recorded, String::new()),
                    IngestStatus::Duplicate => {
                        (pb::ingest_result::Status::Duplicate, String::new())
                    }
                    IngestStatus::Rejected(m) => (pb::ingest_result::Status::Rejected, m),
                };
                pb::IngestResult {
                    idempotency_key: item.idempotency_key,
                    status: status.into(),
                    error,
                }
            })
            .collect();
        Ok(Response::new(pb::IngestUsageResponse { results }))
    }

    type WatchUsageStream = EventStream;

    async fn watch_usage(
        &self,
        request: Request<pb::WatchUsageRequest>,
    ) -> Result<Response<Self::WatchUsageStream>, Status> {
        let principal = self.principal_not_gateway(&request)?;
        let req = request.into_inner();
        let customer = req.customer_id;
        let filter = match (&principal, customer.is_empty()) {
            (Principal::Operator, true) => None,
            (Principal::Customer(..) | Principal::Gateway(_), true) => {
                return Err(Status::invalid_argument(
                    "customer_id is required with a customer API key",
                ));
            }
            (p, false) if !p.may_access(&customer) => return Err(forbidden(&customer)),
            (_, false) => Some(customer),
        };
        if req.resumable {
            return self.watch_resumable(filter, req.after).await;
        }
        let mut events = self.service.subscribe();
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    _ = shutdown.changed() => break,
                    e = events.recv() => e,
                };
                let out = match item {
                    Ok(e) if filter.as_ref().is_none_or(|c| *c == e.customer) => {
                        pb::UsageEvent::from(&e)
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => pb::UsageEvent {
                        kind: pb::usage_event::Kind::Lagged.into(),
                        skipped: n,
                        dimensions: HashMap::new(),
                        ..pb::UsageEvent::default()
                    },
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                if tx.send(Ok(out)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
