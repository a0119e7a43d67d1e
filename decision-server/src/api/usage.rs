//! HTTP handlers for usage attribution: history, top spenders and an entity's budget state,
//! with their query strings parsed strictly (an unknown or repeated parameter is a 400 naming it).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use chrono::DateTime;
use chrono_tz::Tz;
use futures_util::StreamExt;

use super::dto::{
    BudgetDto, DeliveryDto, DeliveryLog, ErrorBody, SpendDto, TestDelivery, UsageHistory,
    UsageRecordEvent, UsageTop,
};
use super::{ApiError, ApiJson, ApiPath, AppState, DecidingCaller, Operator, ScopedCaller};
use crate::core::rollup::Granularity;
use crate::store::StoreError;
use crate::store::events::EventBody;
use crate::usage::{Followed, HistoryRequest, TopRequest, UsageError};

impl From<UsageError> for ApiError {
    fn from(e: UsageError) -> Self {
        match e {
            UsageError::Query(q) => ApiError::bad_parameter(q.param, q.message),
            UsageError::UnknownCustomer(_) | UsageError::UnknownEntity { .. } => ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found",
                e.to_string(),
            ),
            UsageError::Store(e) => e.into(),
        }
    }
}

/// A query string's only parameter `limit`: 1 to 1000, default 100.
pub(super) fn limit_param(raw: Option<&str>) -> Result<usize, ApiError> {
    let p = Params::parse(raw, &["limit"], false)?;
    match p.get("limit") {
        None => Ok(100),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ApiError::bad_parameter("limit", format!("`{v}` is not from 1 to 1000"))
            }),
    }
}

/// A query string taken apart: single-valued parameters, repeated `groupBy`, and `filter[key]`.
#[derive(Debug, Default)]
struct Params {
    single: Vec<(&'static str, String)>,
    group_by: Vec<String>,
    filters: Vec<(String, String)>,
}

impl Params {
    /// Parses `raw`, accepting `single` names once each, `groupBy` repeated when `group_by`
    /// is allowed, and `filter[<key>]` once per key.
    fn parse(raw: Option<&str>, single: &[&'static str], group_by: bool) -> Result<Self, ApiError> {
        let mut p = Params::default();
        for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            if group_by && k == "groupBy" {
                if p.group_by.iter().any(|g| *g == v) {
                    return Err(ApiError::bad_parameter(
                        "groupBy",
                        format!("`{v}` is given twice"),
                    ));
                }
                p.group_by.push(v.into_owned());
            } else if let Some(key) = k.strip_prefix("filter[").and_then(|r| r.strip_suffix(']')) {
                if key.is_empty() {
                    return Err(ApiError::bad_parameter(
                        "filter",
                        "a filter needs a key: `filter[<key>]=<value>`",
                    ));
                }
                if p.filters.iter().any(|(f, _)| f == key) {
                    return Err(ApiError::bad_parameter(
                        "filter",
                        format!("`filter[{key}]` is given twice"),
                    ));
                }
                p.filters.push((key.to_string(), v.into_owned()));
            } else if let Some(name) = single.iter().find(|n| **n == k) {
                if p.single.iter().any(|(n, _)| n == name) {
                    return Err(ApiError::bad_parameter(name, "is given twice"));
                }
                p.single.push((name, v.into_owned()));
            } else {
                let mut known: Vec<&str> = single.to_vec();
                if group_by {
                    known.push("groupBy");
                }
                known.push("filter[<key>]");
                return Err(ApiError {
                    parameter: None,
                    ..ApiError::bad_request(format!(
                        "unknown query parameter `{k}`; known: {}",
                        known.join(", ")
                    ))
                });
            }
        }
        Ok(p)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.single
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// An RFC 3339 instant, in ms.
    fn time(&self, name: &'static str) -> Result<Option<i64>, ApiError> {
        self.get(name)
            .map(|v| {
                DateTime::parse_from_rfc3339(v)
                    .map(|t| t.timestamp_millis())
                    .map_err(|e| {
                        ApiError::bad_parameter(
                            name,
                            format!(
                                "`{v}` is not an RFC 3339 time (like 2026-05-01T00:00:00Z): {e}"
                            ),
                        )
                    })
            })
            .transpose()
    }
}

fn window(v: Option<&str>) -> Result<Granularity, ApiError> {
    match v {
        None => Ok(Granularity::Hour),
        Some(v) => Granularity::ALL
            .into_iter()
            .find(|g| g.name().eq_ignore_ascii_case(v))
            .ok_or_else(|| {
                ApiError::bad_parameter("windowSize", format!("`{v}` is not MINUTE, HOUR or DAY"))
            }),
    }
}

fn time_zone(v: Option<&str>) -> Result<Tz, ApiError> {
    match v {
        None => Ok(Tz::UTC),
        Some(v) => v.parse::<Tz>().map_err(|_| {
            ApiError::bad_parameter("timeZone", format!("`{v}` is not an IANA time zone"))
        }),
    }
}

/// Usage over time, in windows, grouped by any recorded key and filtered by exact values.
///
/// Every series has a point for every window of the range (zero where nothing was recorded),
/// so a chart can draw it directly. Windows are aligned in `timeZone` (default UTC).
#[utoipa::path(get, path = "/v1/customers/{customerId}/usage/history", tag = "usage",
    params(
        ("customerId" = String, Path, description = "The customer"),
        ("featureId" = Option<String>, Query, description = "Only this feature"),
        ("from" = Option<String>, Query, description = "RFC 3339 start (default: a day before `to`)"),
        ("to" = Option<String>, Query, description = "RFC 3339 end, exclusive (default: now)"),
        ("windowSize" = Option<String>, Query, description = "MINUTE, HOUR (default) or DAY"),
        ("groupBy" = Option<Vec<String>>, Query, description = "Repeatable: featureId, an entity level (`teamId`), a recorded dimension (`model`), `deniedBy`, `cutBy` or `finishedPast`"),
        ("filter[key]" = Option<String>, Query, description = "Only records whose `key` equals the value; repeatable with distinct keys"),
        ("timeZone" = Option<String>, Query, description = "IANA zone windows align to (default UTC)"),
    ),
    responses(
        (status = 200, body = UsageHistory),
        (status = 400, body = ErrorBody, description = "A bad parameter; `error.parameter` names it"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn history(
    State(state): State<AppState>,
    ScopedCaller { customer }: ScopedCaller,
    RawQuery(raw): RawQuery,
) -> Result<ApiJson<UsageHistory>, ApiError> {
    let p = Params::parse(
        raw.as_deref(),
        &["featureId", "from", "to", "windowSize", "timeZone"],
        true,
    )?;
    let req = HistoryRequest {
        feature: p.get("featureId").map(str::to_string),
        from: p.time("from")?,
        to: p.time("to")?,
        window: window(p.get("windowSize"))?,
        tz: time_zone(p.get("timeZone"))?,
        group_by: p.group_by,
        filters: p.filters,
    };
    let h = state.usage_history(&customer, req).await?;
    Ok(ApiJson((&h).into()))
}

/// The values of one key (a user, a team, a model...) that spent the most units in a range.
#[utoipa::path(get, path = "/v1/customers/{customerId}/usage/top", tag = "usage",
    params(
        ("customerId" = String, Path, description = "The customer"),
        ("by" = String, Query, description = "The key to rank: an entity level (`userId`), a recorded dimension or featureId"),
        ("featureId" = Option<String>, Query, description = "Only this feature"),
        ("from" = Option<String>, Query, description = "RFC 3339 start (default: a day before `to`)"),
        ("to" = Option<String>, Query, description = "RFC 3339 end, exclusive (default: now)"),
        ("limit" = Option<usize>, Query, description = "Rows, 1 to 1000 (default 10)"),
        ("filter[key]" = Option<String>, Query, description = "Only records whose `key` equals the value"),
    ),
    responses(
        (status = 200, body = UsageTop),
        (status = 400, body = ErrorBody, description = "A bad parameter; `error.parameter` names it"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn top(
    State(state): State<AppState>,
    ScopedCaller { customer }: ScopedCaller,
    RawQuery(raw): RawQuery,
) -> Result<ApiJson<UsageTop>, ApiError> {
    let p = Params::parse(
        raw.as_deref(),
        &["by", "featureId", "from", "to", "limit"],
        false,
    )?;
    let by = p
        .get("by")
        .ok_or_else(|| ApiError::bad_parameter("by", "is required (for example `by=userId`)"))?;
    let limit = match p.get("limit") {
        None => 10,
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::bad_parameter("limit", format!("`{v}` is not a number")))?,
    };
    let req = TopRequest {
        by: by.to_string(),
        feature: p.get("featureId").map(str::to_string),
        from: p.time("from")?,
        to: p.time("to")?,
        filters: p.filters,
        limit,
    };
    let t = state.usage_top(&customer, req).await?;
    Ok(ApiJson((&t).into()))
}

/// What the customer spent in the last day, week or month against the one before, by a key:
/// credits (charged, or the calls' tokens priced with the price table in force when they were
/// recorded) and, with the operator's `currency`, money; over time, by value with each value's
/// change, the values that moved most, and the denials by the limit that refused them.
#[utoipa::path(get, path = "/v1/customers/{customerId}/usage/spend", tag = "usage",
    params(
        ("customerId" = String, Path, description = "The customer"),
        ("by" = String, Query, description = "The key to break spend down by: an entity level (`teamId`), a recorded dimension (`model`) or featureId"),
        ("days" = Option<u32>, Query, description = "1 (in hours), 7 or 30 (in days); default 7"),
        ("featureId" = Option<String>, Query, description = "Only this feature"),
        ("limit" = Option<usize>, Query, description = "Rows, 1 to 1000 (default 20)"),
        ("filter[key]" = Option<String>, Query, description = "Only records whose `key` equals the value"),
    ),
    responses(
        (status = 200, body = SpendDto),
        (status = 400, body = ErrorBody, description = "A bad parameter; `error.parameter` names it"),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn spend(
    State(state): State<AppState>,
    ScopedCaller { customer }: ScopedCaller,
    RawQuery(raw): RawQuery,
) -> Result<ApiJson<SpendDto>, ApiError> {
    let p = Params::parse(raw.as_deref(), &["by", "days", "featureId", "limit"], false)?;
    let by = p
        .get("by")
        .ok_or_else(|| ApiError::bad_parameter("by", "is required (for example `by=teamId`)"))?;
    let number = |name: &'static str, default: usize| -> Result<usize, ApiError> {
        match p.get(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| ApiError::bad_parameter(name, format!("`{v}` is not a number"))),
        }
    };
    let limit = number("limit", 20)?;
    if !(1..=crate::usage::MAX_TOP).contains(&limit) {
        return Err(ApiError::bad_parameter("limit", "must be from 1 to 1000"));
    }
    let days = u32::try_from(number("days", 7)?).unwrap_or(0);
    let req = crate::usage::SpendRequest {
        by: by.to_string(),
        days,
        feature: p.get("featureId").map(str::to_string),
        filters: p.filters,
    };
    let s = state.usage_spend(&customer, req).await?;
    Ok(ApiJson(SpendDto::new(&s, limit, 5)))
}

/// Every limit on an entity (set on it or on its type): usage, limit, remaining, reset time
/// and the projected exhaustion from the last 15 minutes' burn rate.
#[utoipa::path(get, path = "/v1/customers/{customerId}/entities/{entityId}/budget", tag = "usage",
    params(
        ("customerId" = String, Path, description = "The customer"),
        ("entityId" = String, Path, description = "The entity"),
    ),
    responses(
        (status = 200, body = BudgetDto),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn budget(
    State(state): State<AppState>,
    ScopedCaller { customer }: ScopedCaller,
    ApiPath((_customer, entity)): ApiPath<(String, String)>,
) -> Result<ApiJson<BudgetDto>, ApiError> {
    let b = state.budget(&customer, &entity).await?;
    Ok(ApiJson((&b).into()))
}

/// The usage stream as server-sent events: `event: usage` with the record as JSON and its id,
/// `event: gap` when the cursor was older than what is kept, `event: unavailable` while the
/// store cannot be read (the stream goes on), and a comment line as heartbeat.
async fn sse(
    state: &AppState,
    customer: Option<String>,
    headers: &HeaderMap,
    raw: Option<&str>,
) -> Result<Response, ApiError> {
    let p = Params::parse(raw, &["after", "heartbeatSeconds"], false)?;
    // A reconnecting EventSource sends the last id it saw; it wins over the URL's `after`.
    let after = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::bad_request("`Last-Event-ID` is not text"))?
                .to_string(),
        ),
        None => p.get("after").map(str::to_string),
    }
    .filter(|a| !a.is_empty());
    let heartbeat = match p.get("heartbeatSeconds") {
        None => 15,
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|s| (1..=300).contains(s))
            .ok_or_else(|| {
                ApiError::bad_parameter("heartbeatSeconds", format!("`{v}` is not from 1 to 300"))
            })?,
    };
    let follow = state
        .follow_usage(customer.as_deref(), after)
        .await
        .map_err(|e| match e {
            UsageError::Store(StoreError::BadCursor(c)) => ApiError::bad_parameter(
                "after",
                format!(
                    "`{c}` is not an event id of this stream (send the `id` of an event received)"
                ),
            ),
            e => e.into(),
        })?;
    let events = follow.map(|f| {
        let event = match f {
            Followed::Event(e) => match &*e.body {
                EventBody::Record(r) => Event::default()
                    .id(e.id.as_str())
                    .event("usage")
                    .json_data(UsageRecordEvent::new(&e.id, e.customer.as_str(), r)),
                EventBody::Alert(body) => Ok(Event::default()
                    .id(e.id.as_str())
                    .event("alert")
                    .data(body.as_str())),
            },
            Followed::Gap => Ok(Event::default().event("gap").data(
                r#"{"message":"events between the cursor and the next event are no longer kept"}"#,
            )),
            Followed::Unavailable(m) => Event::default()
                .event("unavailable")
                .json_data(serde_json::json!({ "message": m })),
        };
        Ok::<_, Infallible>(event.unwrap_or_else(|e| {
            Event::default()
                .event("unavailable")
                .data(format!("an event could not be encoded: {e}"))
        }))
    });
    Ok(Sse::new(events)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(heartbeat))
                .text("heartbeat"),
        )
        .into_response())
}

/// The customer's usage as it happens, as server-sent events; resumable with `Last-Event-ID`
/// (or `after`) within the stream's retention, nothing sent twice.
#[utoipa::path(get, path = "/v1/customers/{customerId}/usage/stream", tag = "usage",
    params(
        ("customerId" = String, Path, description = "The customer"),
        ("after" = Option<String>, Query, description = "Resume after this event id (the `Last-Event-ID` header wins)"),
        ("heartbeatSeconds" = Option<u64>, Query, description = "Seconds between heartbeats, 1 to 300 (default 15)"),
    ),
    responses(
        (status = 200, description = "`event: usage` (UsageRecordEvent), `alert`, `gap`, `unavailable`", content_type = "text/event-stream", body = UsageRecordEvent),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn stream(
    State(state): State<AppState>,
    ScopedCaller { customer }: ScopedCaller,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    sse(&state, Some(customer), &headers, raw.as_deref()).await
}

/// Every customer's usage as it happens (operator token), as `/usage/stream` of one customer.
#[utoipa::path(get, path = "/v1/usage/stream", tag = "usage",
    params(
        ("after" = Option<String>, Query, description = "Resume after this event id (the `Last-Event-ID` header wins)"),
        ("heartbeatSeconds" = Option<u64>, Query, description = "Seconds between heartbeats, 1 to 300 (default 15)"),
    ),
    responses(
        (status = 200, description = "As the customer stream, for every customer", content_type = "text/event-stream", body = UsageRecordEvent),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 503, body = ErrorBody, description = "The store keeps events per customer only (Redis)"),
    ),
    security(("bearer" = [])))]
pub async fn stream_all(
    State(state): State<AppState>,
    _op: Operator,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    sse(&state, None, &headers, raw.as_deref()).await
}

/// The customer's webhook deliveries, newest first: alerts and tests, each with its attempts
/// and status.
#[utoipa::path(get, path = "/v1/customers/{customerId}/alerts/deliveries", tag = "usage",
    params(
        ("customerId" = String, Path, description = "The customer"),
        ("limit" = Option<usize>, Query, description = "Most entries, 1 to 1000 (default 100)"),
    ),
    responses(
        (status = 200, body = DeliveryLog),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn deliveries(
    State(state): State<AppState>,
    ScopedCaller { customer }: ScopedCaller,
    RawQuery(raw): RawQuery,
) -> Result<ApiJson<DeliveryLog>, ApiError> {
    let limit = limit_param(raw.as_deref())?;
    let Some(log) = state.deliveries(&customer, limit).await? else {
        return Err(UsageError::UnknownCustomer(customer).into());
    };
    Ok(ApiJson(DeliveryLog {
        deliveries: log.iter().map(DeliveryDto::from).collect(),
    }))
}

/// Sends a signed `webhook.test` call to one of the customer's webhooks, through the same
/// outbox, signing and retries as alerts; its delivery shows in the delivery log.
#[utoipa::path(post, path = "/v1/customers/{customerId}/webhooks/{webhookId}/test", tag = "usage",
    params(
        ("customerId" = String, Path, description = "The customer"),
        ("webhookId" = String, Path, description = "The webhook"),
    ),
    responses(
        (status = 202, body = TestDelivery),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    ),
    security(("bearer" = [])))]
pub async fn test_webhook(
    State(state): State<AppState>,
    DecidingCaller { customer }: DecidingCaller,
    ApiPath((_customer, webhook)): ApiPath<(String, String)>,
) -> Result<(axum::http::StatusCode, ApiJson<TestDelivery>), ApiError> {
    match state.test_delivery(&customer, &webhook).await? {
        Some(id) => Ok((
            axum::http::StatusCode::ACCEPTED,
            ApiJson(TestDelivery { delivery_id: id }),
        )),
        None => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found",
            format!("customer `{customer}` has no webhook `{webhook}`"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_parsed_strictly() {
        let p = Params::parse(
            Some("from=2026-01-01T00:00:00Z&groupBy=teamId&groupBy=model&filter%5Bmodel%5D=gpt-4o"),
            &["from", "to"],
            true,
        )
        .unwrap();
        assert_eq!(p.group_by, ["teamId", "model"]);
        assert_eq!(p.filters, [("model".to_string(), "gpt-4o".to_string())]);
        assert_eq!(p.time("from").unwrap(), Some(1_767_225_600_000));
        let e = Params::parse(Some("from=a&from=b"), &["from"], true).unwrap_err();
        assert_eq!(e.parameter, Some("from"));
        let e = Params::parse(Some("group=teamId"), &["from"], true).unwrap_err();
        assert!(
            e.message.contains("unknown query parameter `group`"),
            "{}",
            e.message
        );
        let e = Params::parse(Some("groupBy=a"), &["from"], false).unwrap_err();
        assert!(e.message.contains("`groupBy`"), "{}", e.message);
        let e = Params::parse(Some("filter[]=x"), &[], true).unwrap_err();
        assert_eq!(e.parameter, Some("filter"));
        let p = Params::parse(Some("from=yesterday"), &["from"], true).unwrap();
        assert_eq!(p.time("from").unwrap_err().parameter, Some("from"));
        assert_eq!(
            window(Some("week")).unwrap_err().parameter,
            Some("windowSize")
        );
        assert_eq!(window(Some("minute")).unwrap(), Granularity::Minute);
        assert_eq!(
            time_zone(Some("Mars/Olympus")).unwrap_err().parameter,
            Some("timeZone")
        );
        assert_eq!(
            time_zone(Some("Europe/Berlin")).unwrap(),
            Tz::Europe__Berlin
        );
    }
}
