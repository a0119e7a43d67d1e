//! HTTP handlers for decisions: check, settle, release and usage ingest.

use axum::extract::State;

use super::dto::{
    CheckBody, CheckResult, CloseResult, ErrorBody, SettleBody, UsageBatch, UsageBatchResult,
    UsageEventResult, usage,
};
use super::{ApiError, ApiJson, ApiPath, AppState, Caller, DecidingCaller};
use crate::core::HoldId;
use crate::engine::CheckRequest;
use crate::metrics::Api;
use crate::service::{BatchError, IngestItem};
use crate::store::CloseOutcome;

/// Checks every limit on every level of the chain and, if all pass, holds the usage.
///
/// A denial is an answer, not an error: it comes back with status 200 and `isGranted: false`.
#[utoipa::path(post, path = "/v1/customers/{customerId}/entitlements/check", tag = "decisions",
    params(("customerId" = String, Path, description = "The customer")),
    request_body = CheckBody,
    responses(
        (status = 200, body = CheckResult, description = "The decision"),
        (status = 400, body = ErrorBody, description = "Unknown customer, feature or entity, or a malformed body"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn check(
    State(state): State<AppState>,
    DecidingCaller { customer }: DecidingCaller,
    ApiJson(body): ApiJson<CheckBody>,
) -> Result<ApiJson<CheckResult>, ApiError> {
    let req = CheckRequest {
        deadline: None,
        customer: &customer,
        feature: &body.feature_id,
        usage: usage(body.requested_usage, body.tokens),
        dimensions: &body.dimensions,
        dry_run: body.dry_run,
        commit: body.commit,
    };
    let d = state.check(Api::Http, &req).await?;
    Ok(ApiJson((&d).into()))
}

fn parse_hold(hold_id: &str) -> Result<HoldId, ApiError> {
    hold_id
        .parse()
        .map_err(|e: crate::core::decision::ParseHoldIdError| ApiError::bad_request(e.to_string()))
}

fn close_result(hold: &HoldId, outcome: CloseOutcome) -> ApiJson<CloseResult> {
    ApiJson(CloseResult {
        hold_id: hold.to_string(),
        closed: outcome == CloseOutcome::Closed,
    })
}

/// Corrects every counter of the hold to the actual usage. Idempotent: a second call changes
/// nothing and answers `closed: false`.
#[utoipa::path(post, path = "/v1/holds/{holdId}/settle", tag = "decisions",
    params(("holdId" = String, Path, description = "`<customerId>:<number>:<tag>`, from the check")),
    request_body = SettleBody,
    responses(
        (status = 200, body = CloseResult),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody, description = "No such hold"),
        (status = 422, body = ErrorBody, description = "The usage is over the hold's settlement maximum; nothing changed"),
    ),
    security(("bearer" = [])))]
pub async fn settle(
    State(state): State<AppState>,
    _scope: DecidingCaller,
    ApiPath(hold_id): ApiPath<String>,
    ApiJson(body): ApiJson<SettleBody>,
) -> Result<ApiJson<CloseResult>, ApiError> {
    let hold = parse_hold(&hold_id)?;
    let outcome = state
        .settle_ended(
            &hold,
            usage(body.actual_usage, body.tokens),
            body.stream_end.as_ref().map(Into::into),
        )
        .await?;
    Ok(close_result(&hold, outcome))
}

/// Undoes the hold on every counter. Idempotent.
#[utoipa::path(post, path = "/v1/holds/{holdId}/release", tag = "decisions",
    params(("holdId" = String, Path, description = "`<customerId>:<number>:<tag>`, from the check")),
    responses(
        (status = 200, body = CloseResult),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody, description = "No such hold"),
    ),
    security(("bearer" = [])))]
pub async fn release(
    State(state): State<AppState>,
    _scope: DecidingCaller,
    ApiPath(hold_id): ApiPath<String>,
) -> Result<ApiJson<CloseResult>, ApiError> {
    let hold = parse_hold(&hold_id)?;
    let outcome = state.release(&hold).await?;
    Ok(close_result(&hold, outcome))
}

/// Records usage that was never gated. An event whose idempotency key was already recorded
/// is answered `duplicate` and changes nothing. Every event must belong to a customer the
/// credentials reach, or the whole batch is refused.
#[utoipa::path(post, path = "/v1/usage", tag = "decisions",
    request_body = UsageBatch,
    responses(
        (status = 200, body = UsageBatchResult, description = "One result per event, in order"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 413, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn ingest(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(batch): ApiJson<UsageBatch>,
) -> Result<ApiJson<UsageBatchResult>, ApiError> {
    let items: Vec<IngestItem> = batch
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
    let statuses = state
        .ingest_batch(&caller.0, &items)
        .await
        .map_err(|e| match e {
            e @ BatchError::TooLarge { .. } => ApiError::bad_request(e.to_string()),
            BatchError::Foreign(customer) => ApiError::forbidden(&customer),
        })?;
    let results = items
        .into_iter()
        .zip(statuses)
        .map(|(item, status)| UsageEventResult::new(item.idempotency_key, status))
        .collect();
    Ok(ApiJson(UsageBatchResult { results }))
}
