//! The deciding desk: checks, settlements, releases, close batches and ingest, each counted
//! in the metrics by interface and outcome and announced to usage watchers.

use super::*;
use crate::engine::Purpose;

/// One close of a batch: the hold, the usage to settle at (`None` releases it) and, for a
/// streamed call the gateway stepped into, how it ended.
type Closing = (HoldId, Option<Usage>, Option<crate::core::usage::StreamEnd>);

impl Service {
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
        let parsed: Vec<Result<Closing, CloseError>> = items
            .iter()
            .map(|item| {
                let hold: HoldId = item.hold_id.parse().map_err(
                    |e: crate::core::decision::ParseHoldIdError| refused(item, e.to_string()),
                )?;
                if !principal.may_decide(&hold.customer) {
                    let reason = BatchError::Foreign(hold.customer.clone()).to_string();
                    return Err(refused(item, reason));
                }
                let end = item
                    .end
                    .filter(|_| item.usage.is_some())
                    .and_then(|e| self.engine.stream_end(&hold.customer, e.cut, e.by));
                Ok((hold, item.usage, end))
            })
            .collect();
        let closes: Vec<Closing> = parsed
            .iter()
            .filter_map(|p| p.as_ref().ok().cloned())
            .collect();
        let mut outcomes = self.close_many(&closes).await.into_iter();
        Ok(parsed
            .into_iter()
            .map(|p| {
                let (hold, _, _) = p?;
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
    async fn close_many(&self, closes: &[Closing]) -> Vec<Result<CloseOutcome, DecisionError>> {
        // Joined rather than awaited one by one: every close does its store work on the first
        // poll, so in sync mode they all share one commit.
        let results = join_all(closes.iter().map(|(hold, usage, end)| async move {
            match usage {
                Some(u) => self.engine.settle_ended(hold, *u, *end).await,
                None => self.engine.release(hold).await,
            }
        }))
        .await;
        closes
            .iter()
            .zip(results)
            .map(|((hold, usage, _), r)| match usage {
                Some(u) => self.closed(hold, u.units, EventKind::Settled, r),
                None => self.closed(hold, 0, EventKind::Released, r),
            })
            .collect()
    }

    /// Commits every hold past its TTL at its held amount.
    pub async fn expire_due(&self) -> Result<usize, DecisionError> {
        self.engine.expire_due().await
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
        self.decide(api, req, Purpose::Call).await
    }

    /// The first hold of a call streamed in slices (see
    /// [`crate::engine::Engine::start_stream`]): decided, counted, alerted and streamed as a
    /// check is.
    pub async fn start_stream(
        &self,
        api: Api,
        req: &CheckRequest<'_>,
        budget: u64,
    ) -> Result<Decision, DecisionError> {
        self.decide(api, req, Purpose::StreamStart { budget }).await
    }

    /// A streamed call's next slice (see [`crate::engine::Engine::extend`]): decided, counted,
    /// alerted and streamed as a check is.
    pub async fn extend(
        &self,
        api: Api,
        req: &CheckRequest<'_>,
    ) -> Result<Decision, DecisionError> {
        self.decide(api, req, Purpose::Slice).await
    }

    async fn decide(
        &self,
        api: Api,
        req: &CheckRequest<'_>,
        purpose: Purpose,
    ) -> Result<Decision, DecisionError> {
        let started = Instant::now();
        let extension = purpose == Purpose::Slice;
        let result = match bounded_dimensions(req.dimensions, &self.settings().limits) {
            Ok(()) => self.engine.decide(req, purpose).await,
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
        if extension {
            self.metrics.slice(outcome);
        }
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
        self.settle_ended(hold, actual, None).await
    }

    /// [`Service::settle`], and how a streamed call ended, for its record.
    pub async fn settle_ended(
        &self,
        hold: &HoldId,
        actual: Usage,
        end: Option<ReportedEnd<'_>>,
    ) -> Result<CloseOutcome, DecisionError> {
        let end = end.and_then(|e| self.engine.stream_end(&hold.customer, e.cut, e.by));
        let mut result = self.engine.settle_ended(hold, actual, end).await;
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
            result = self.engine.settle_ended(hold, charged, end).await;
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
            commit: false,
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
}
