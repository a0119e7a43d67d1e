//! The HTTP/JSON API (axum): decisions, holds, usage ingest, the admin resources, `/metrics`,
//! `/healthz` and `/openapi.json`, generated from the handlers and types with utoipa.

mod admin;
mod decisions;
pub mod dto;
mod manage;
mod usage;

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Principal;
use crate::catalog::AdminError;
use crate::engine::DecisionError;
use crate::service::Service;
use crate::store::StoreError;
use dto::{ErrorBody, ErrorDetail, Health};

pub type AppState = Arc<Service>;

/// An error answer: status, stable code and a message saying what was wrong.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub problems: Vec<String>,
    pub parameter: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            problems: Vec::new(),
            parameter: None,
        }
    }

    /// A 400 for query parameter `param`.
    pub fn bad_parameter(param: &'static str, message: impl std::fmt::Display) -> Self {
        Self {
            parameter: Some(param),
            ..Self::new(
                StatusCode::BAD_REQUEST,
                "bad_parameter",
                format!("`{param}`: {message}"),
            )
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn forbidden(customer: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("these credentials do not reach customer `{customer}`"),
        )
    }

    pub fn read_only() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this API key is read-only (role `viewer`)",
        )
    }

    pub fn operator_only() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this needs the operator token",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
                problems: self.problems,
                parameter: self.parameter.map(str::to_string),
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = r.status();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
            _ => "malformed_body",
        };
        Self::new(status, code, r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_path", r.body_text())
    }
}

impl From<DecisionError> for ApiError {
    fn from(e: DecisionError) -> Self {
        match e {
            DecisionError::Plan(e) => {
                Self::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string())
            }
            DecisionError::Store(e) => e.into(),
            e @ DecisionError::DeadlineExceeded => Self::new(
                StatusCode::GATEWAY_TIMEOUT,
                "deadline_exceeded",
                e.to_string(),
            ),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownHold(_) => {
                Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            StoreError::SettleTooLarge { .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "settle_too_large",
                e.to_string(),
            ),
            StoreError::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
            StoreError::AdminMoved(_) => Self::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            StoreError::BadCursor(_) => Self::bad_request(e.to_string()),
            StoreError::ReadBudget(_) => {
                Self::new(StatusCode::TOO_MANY_REQUESTS, "read_budget", e.to_string())
            }
        }
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::NotFound(_) => Self::new(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            AdminError::Conflict(_) => Self::new(StatusCode::CONFLICT, "conflict", e.to_string()),
            AdminError::Refused(_) => Self::new(StatusCode::FORBIDDEN, "refused", e.to_string()),
            AdminError::Invalid(errors) => Self {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                code: "invalid_change",
                message: "the change would make the model invalid; nothing was changed".into(),
                problems: errors.0.iter().map(ToString::to_string).collect(),
                parameter: None,
            },
            AdminError::Store(e) => e.into(),
        }
    }
}

/// A JSON body whose rejections answer as `ApiError`s.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

impl<T: serde::Serialize> IntoResponse for ApiJson<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Path parameters whose rejections answer as `ApiError`s.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// The authenticated caller.
#[derive(Debug)]
pub struct Caller(pub Principal, pub Option<String>);

/// The id of the API key a customer's caller presented (`<keyId>.<secret>`), for the audit
/// log; `None` for the operator and gateways.
fn key_id(principal: &Principal, token: Option<&str>) -> Option<String> {
    match principal {
        Principal::Customer(..) => token
            .and_then(|t| crate::auth::bearer_token(Some(t)).ok())
            .and_then(|t| t.split_once('.'))
            .map(|(id, _)| id.chars().take(128).collect()),
        _ => None,
    }
}

impl Caller {
    pub fn for_customer(&self, customer: &str) -> Result<(), ApiError> {
        if self.0.may_access(customer) {
            Ok(())
        } else {
            Err(ApiError::forbidden(customer))
        }
    }

    pub fn operator(&self) -> Result<(), ApiError> {
        if self.0.is_operator() {
            Ok(())
        } else {
            Err(ApiError::operator_only())
        }
    }
}

/// The customer a request's path names: `customerId`, or the customer part of `holdId`.
async fn path_customer(parts: &mut Parts, state: &AppState) -> Result<String, ApiError> {
    let ApiPath(params) =
        ApiPath::<std::collections::HashMap<String, String>>::from_request_parts(parts, state)
            .await?;
    match (params.get("customerId"), params.get("holdId")) {
        (Some(c), _) => Ok(c.clone()),
        (None, Some(h)) => Ok(h
            .parse::<crate::core::HoldId>()
            .map_err(|e| ApiError::bad_request(e.to_string()))?
            .customer),
        (None, None) => Err(ApiError::bad_request("no customer in the path")),
    }
}

/// A caller allowed to read for the customer named by the path (`customerId`, or the
/// customer part of `holdId`). Checked before the body is read, so a foreign customer gets 403
/// whatever it sends.
#[derive(Debug)]
pub struct ScopedCaller {
    pub customer: String,
}

impl FromRequestParts<AppState> for ScopedCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        let customer = path_customer(parts, state).await?;
        caller.for_customer(&customer)?;
        Ok(Self { customer })
    }
}

/// A caller allowed to place and close holds for the path's customer (not a `viewer` key).
#[derive(Debug)]
pub struct DecidingCaller {
    pub customer: String,
}

impl FromRequestParts<AppState> for DecidingCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        let customer = path_customer(parts, state).await?;
        caller.for_customer(&customer)?;
        if !caller.0.may_decide(&customer) {
            return Err(ApiError::read_only());
        }
        Ok(Self { customer })
    }
}

/// A caller allowed to manage the path's customer: the operator, or that customer's `admin`
/// key (whose changes the catalog also holds to the operator's ceilings).
#[derive(Debug)]
pub struct ManagingCaller {
    pub customer: String,
    pub principal: Principal,
    /// The API key it presented (an admin key), for the audit log.
    pub key: Option<String>,
}

impl FromRequestParts<AppState> for ManagingCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        let customer = path_customer(parts, state).await?;
        caller.for_customer(&customer)?;
        if !caller.0.may_manage(&customer) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "changing this needs the operator token or an `admin` key of the customer",
            ));
        }
        Ok(Self {
            customer,
            principal: caller.0,
            key: caller.1,
        })
    }
}

/// The operator, checked before the body is read.
#[derive(Debug)]
pub struct Operator;

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Caller::from_request_parts(parts, state).await?.operator()?;
        Ok(Operator)
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // The portal's pages call the API with their session cookie instead of a token: the
        // same handlers and checks, plus the session's CSRF token on anything that changes.
        if !parts.headers.contains_key(header::AUTHORIZATION)
            && let Some(id) = crate::session::cookie_in(&parts.headers)
        {
            return session_caller(parts, state, &id);
        }
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| {
                v.to_str().map_err(|_| {
                    ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "the `authorization` header is not text",
                    )
                })
            })
            .transpose()?;
        state
            .authenticate(header, crate::auth::Listener::Api)
            .map(|p| {
                let key = key_id(&p, header);
                Caller(p, key)
            })
            .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()))
    }
}

/// The caller a portal session stands for; a state-changing method must echo its CSRF token.
fn session_caller(parts: &Parts, state: &AppState, id: &str) -> Result<Caller, ApiError> {
    use crate::session;
    let signed = state
        .sessions()
        .get(&state.token_check(), id, state.now().millis())
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()))?;
    let safe = matches!(
        parts.method,
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    let presented = parts
        .headers
        .get(session::CSRF_HEADER)
        .and_then(|v| v.to_str().ok());
    if !safe && !session::csrf_ok(&signed, presented) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "csrf",
            format!(
                "a change made with a session cookie needs the session's `{}` header",
                session::CSRF_HEADER
            ),
        ));
    }
    let key = key_id(&signed.principal, Some(&format!("Bearer {}", signed.key)));
    Ok(Caller(signed.principal, key))
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tollgate",
        description = "Usage governance for AI traffic: decisions, holds, usage and the entity model."
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "decisions", description = "Checks, holds and usage"),
        (name = "usage", description = "Usage attribution: history, top spenders, budget state"),
        (name = "admin", description = "Customers, entities, limits, grants and prices (operator token)"),
        (name = "operations", description = "Health, metrics and this document")
    )
)]
struct ApiDoc;

#[derive(Debug)]
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The operator token, or a customer's API key `<keyId>.<secret>`",
                    ))
                    .build(),
            ),
        );
    }
}

/// Health: the process is up and serving.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, body = Health)))]
async fn healthz() -> ApiJson<Health> {
    ApiJson(Health {
        status: "ok".into(),
    })
}

/// Prometheus metrics, text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> Response {
    let body = state.render_metrics();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json")))]
async fn openapi_json(axum::Extension(doc): axum::Extension<OpenApiJson>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.0.to_string(),
    )
        .into_response()
}

/// The rendered document, handed to its own route as an extension (it is built from the
/// router, so it cannot be in the router's state).
#[derive(Debug, Clone)]
struct OpenApiJson(Arc<str>);

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        "no such route; see /openapi.json",
    )
}

/// The router and the OpenAPI document, both built from the same route list.
pub fn router_and_doc(
    state: AppState,
    max_body_bytes: usize,
) -> (axum::Router, utoipa::openapi::OpenApi) {
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .routes(routes!(decisions::check))
        .routes(routes!(decisions::settle))
        .routes(routes!(decisions::release))
        .routes(routes!(decisions::ingest))
        .routes(routes!(admin::list_customers, admin::create_customer))
        .routes(routes!(
            admin::get_customer,
            admin::put_customer,
            admin::delete_customer
        ))
        .routes(routes!(admin::list_entities, admin::create_entity))
        .routes(routes!(admin::put_entity, admin::delete_entity))
        .routes(routes!(admin::list_limits, admin::create_limit))
        .routes(routes!(admin::put_limit, admin::delete_limit))
        .routes(routes!(admin::list_overrides))
        .routes(routes!(admin::drop_override))
        .routes(routes!(admin::list_grants, admin::create_grant))
        .routes(routes!(admin::list_prices, admin::create_prices))
        .routes(routes!(admin::put_prices, admin::delete_prices))
        .routes(routes!(usage::history))
        .routes(routes!(usage::top))
        .routes(routes!(usage::spend))
        .routes(routes!(usage::budget))
        .routes(routes!(usage::stream))
        .routes(routes!(usage::stream_all))
        .routes(routes!(usage::deliveries))
        .routes(routes!(usage::test_webhook))
        .routes(routes!(manage::list_alerts, manage::create_alert))
        .routes(routes!(manage::put_alert, manage::delete_alert))
        .routes(routes!(manage::list_webhooks, manage::create_webhook))
        .routes(routes!(manage::delete_webhook))
        .routes(routes!(manage::rotate_webhook))
        .routes(routes!(manage::drop_previous_secret))
        .routes(routes!(manage::list_keys, manage::create_key))
        .routes(routes!(manage::delete_key))
        .routes(routes!(manage::customer_audit))
        .routes(routes!(manage::audit))
        .with_state(state)
        .split_for_parts();
    let json = doc.to_json().unwrap_or_else(|_| "{}".to_string());
    let router = router
        .layer(axum::Extension(OpenApiJson(json.into())))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes));
    (router, doc)
}

/// Usage history exactly as `GET /v1/customers/{customerId}/usage/history` answers it for
/// `raw` (its query string), for a caller already allowed to read `customer`: the portal's
/// CSV download is the chart's own data.
pub async fn usage_history(
    state: AppState,
    customer: String,
    raw: Option<String>,
) -> Result<dto::UsageHistory, ApiError> {
    usage::history(
        State(state),
        ScopedCaller { customer },
        axum::extract::RawQuery(raw),
    )
    .await
    .map(|ApiJson(h)| h)
}
