//! HTTP handlers a customer's admins use on their own customer (and the operator on any):
//! alert rules, webhooks with secrets shown once and rotation, API keys for their own people
//! and applications, and the audit log of changes.

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use base64::Engine as _;

use super::admin::{change_by, customer_doc, delete_by};
use super::dto::{
    ApiKeySecretDto, ApiKeyView, AuditEntryDto, AuditLog, ErrorBody, NewApiKeyDto, NewWebhookDto,
    WebhookSecretDto, WebhookView,
};
use super::usage::limit_param;
use super::{ApiError, ApiJson, ApiPath, AppState, ManagingCaller, Operator, ScopedCaller};
use crate::catalog::AdminOp;
use crate::config::dto::{AlertRuleDto, CustomerKeyDto, WebhookDto};

/// A customer's alert rules.
#[utoipa::path(get, path = "/v1/customers/{customerId}/alerts", tag = "admin",
    params(("customerId" = String, Path)),
    responses((status = 200, body = Vec<AlertRuleDto>), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_alerts(
    State(state): State<AppState>,
    ScopedCaller { customer }: ScopedCaller,
) -> Result<ApiJson<Vec<AlertRuleDto>>, ApiError> {
    customer_doc(&state, &customer, |c| c.alerts.clone()).map(ApiJson)
}

/// Adds an alert rule (operator, or the customer's admin key).
#[utoipa::path(post, path = "/v1/customers/{customerId}/alerts", tag = "admin",
    params(("customerId" = String, Path)), request_body = AlertRuleDto,
    responses((status = 201, body = AlertRuleDto), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_alert(
    State(state): State<AppState>,
    caller: ManagingCaller,
    ApiJson(body): ApiJson<AlertRuleDto>,
) -> Result<(StatusCode, ApiJson<AlertRuleDto>), ApiError> {
    let op = AdminOp::PutAlertRule {
        customer: caller.customer.clone(),
        rule: body.clone(),
        create: true,
    };
    change_by(&state, &caller, op, StatusCode::CREATED, body).await
}

/// Creates or replaces an alert rule.
#[utoipa::path(put, path = "/v1/customers/{customerId}/alerts/{alertId}", tag = "admin",
    params(("customerId" = String, Path), ("alertId" = String, Path)), request_body = AlertRuleDto,
    responses((status = 200, body = AlertRuleDto), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_alert(
    State(state): State<AppState>,
    caller: ManagingCaller,
    ApiPath((_customer, id)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<AlertRuleDto>,
) -> Result<(StatusCode, ApiJson<AlertRuleDto>), ApiError> {
    if body.id != id {
        return Err(ApiError::bad_request(format!(
            "the body's id `{}` differs from the path's `{id}`",
            body.id
        )));
    }
    let op = AdminOp::PutAlertRule {
        customer: caller.customer.clone(),
        rule: body.clone(),
        create: false,
    };
    change_by(&state, &caller, op, StatusCode::OK, body).await
}

/// Removes an alert rule.
#[utoipa::path(delete, path = "/v1/customers/{customerId}/alerts/{alertId}", tag = "admin",
    params(("customerId" = String, Path), ("alertId" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_alert(
    State(state): State<AppState>,
    caller: ManagingCaller,
    ApiPath((_customer, id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let op = AdminOp::DeleteAlertRule {
        customer: caller.customer.clone(),
        id,
    };
    delete_by(&state, &caller, op).await
}

/// A customer's webhooks, without their secrets.
#[utoipa::path(get, path = "/v1/customers/{customerId}/webhooks", tag = "admin",
    params(("customerId" = String, Path)),
    responses((status = 200, body = Vec<WebhookView>), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_webhooks(
    State(state): State<AppState>,
    ScopedCaller { customer }: ScopedCaller,
) -> Result<ApiJson<Vec<WebhookView>>, ApiError> {
    customer_doc(&state, &customer, |c| {
        c.webhooks.iter().map(WebhookView::from).collect()
    })
    .map(ApiJson)
}

/// A new `whsec_` secret: 24 random bytes, base64.
fn new_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Adds a webhook; the answer holds its signing secret, shown this once.
#[utoipa::path(post, path = "/v1/customers/{customerId}/webhooks", tag = "admin",
    params(("customerId" = String, Path)), request_body = NewWebhookDto,
    responses((status = 201, body = WebhookSecretDto), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_webhook(
    State(state): State<AppState>,
    caller: ManagingCaller,
    ApiJson(body): ApiJson<NewWebhookDto>,
) -> Result<(StatusCode, ApiJson<WebhookSecretDto>), ApiError> {
    let secret = new_secret();
    let op = AdminOp::PutWebhook {
        customer: caller.customer.clone(),
        webhook: WebhookDto {
            id: body.id.clone(),
            url: body.url.clone(),
            secrets: vec![secret.clone()],
        },
        create: true,
    };
    let shown = WebhookSecretDto {
        id: body.id,
        url: body.url,
        secret,
    };
    change_by(&state, &caller, op, StatusCode::CREATED, shown).await
}

/// Rotates a webhook's secret: a new one (in the answer, shown this once) signs every call
/// from now on, beside the previous one until that is dropped, so receivers can switch.
/// Secrets older than the previous one are dropped now.
#[utoipa::path(post, path = "/v1/customers/{customerId}/webhooks/{webhookId}/secrets", tag = "admin",
    params(("customerId" = String, Path), ("webhookId" = String, Path)),
    responses((status = 201, body = WebhookSecretDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn rotate_webhook(
    State(state): State<AppState>,
    caller: ManagingCaller,
    ApiPath((_customer, id)): ApiPath<(String, String)>,
) -> Result<(StatusCode, ApiJson<WebhookSecretDto>), ApiError> {
    let mut webhook = find_webhook(&state, &caller.customer, &id)?;
    let secret = new_secret();
    webhook.secrets.truncate(1);
    webhook.secrets.insert(0, secret.clone());
    let shown = WebhookSecretDto {
        id: webhook.id.clone(),
        url: webhook.url.clone(),
        secret,
    };
    let op = AdminOp::PutWebhook {
        customer: caller.customer.clone(),
        webhook,
        create: false,
    };
    change_by(&state, &caller, op, StatusCode::CREATED, shown).await
}

/// Ends a rotation: only the newest secret signs from now on.
#[utoipa::path(delete, path = "/v1/customers/{customerId}/webhooks/{webhookId}/secrets/previous", tag = "admin",
    params(("customerId" = String, Path), ("webhookId" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn drop_previous_secret(
    State(state): State<AppState>,
    caller: ManagingCaller,
    ApiPath((_customer, id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let mut webhook = find_webhook(&state, &caller.customer, &id)?;
    webhook.secrets.truncate(1);
    let op = AdminOp::PutWebhook {
        customer: caller.customer.clone(),
        webhook,
        create: false,
    };
    delete_by(&state, &caller, op).await
}

fn find_webhook(state: &AppState, customer: &str, id: &str) -> Result<WebhookDto, ApiError> {
    customer_doc(state, customer, |c| {
        c.webhooks.iter().find(|w| w.id == id).cloned()
    })?
    .ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("customer `{customer}` has no webhook `{id}`"),
        )
    })
}

/// Removes a webhook.
#[utoipa::path(delete, path = "/v1/customers/{customerId}/webhooks/{webhookId}", tag = "admin",
    params(("customerId" = String, Path), ("webhookId" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_webhook(
    State(state): State<AppState>,
    caller: ManagingCaller,
    ApiPath((_customer, id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let op = AdminOp::DeleteWebhook {
        customer: caller.customer.clone(),
        id,
    };
    delete_by(&state, &caller, op).await
}

fn audit_log(state: &AppState, customer: Option<&str>, limit: usize) -> AuditLog {
    let entries = state.audit(customer);
    AuditLog {
        entries: entries
            .iter()
            .rev()
            .take(limit)
            .map(AuditEntryDto::from)
            .collect(),
    }
}

/// The changes made to a customer through the API or the portal, newest first: who, when,
/// and the object before and after (secrets hidden).
#[utoipa::path(get, path = "/v1/customers/{customerId}/audit", tag = "admin",
    params(("customerId" = String, Path),
        ("limit" = Option<usize>, Query, description = "Most entries, 1 to 1000 (default 100)")),
    responses((status = 200, body = AuditLog), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn customer_audit(
    State(state): State<AppState>,
    ScopedCaller { customer }: ScopedCaller,
    RawQuery(raw): RawQuery,
) -> Result<ApiJson<AuditLog>, ApiError> {
    let limit = limit_param(raw.as_deref())?;
    Ok(ApiJson(audit_log(&state, Some(&customer), limit)))
}

/// Every change made through the API or the portal, newest first (operator).
#[utoipa::path(get, path = "/v1/audit", tag = "admin",
    params(("limit" = Option<usize>, Query, description = "Most entries, 1 to 1000 (default 100)")),
    responses((status = 200, body = AuditLog), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn audit(
    State(state): State<AppState>,
    _op: Operator,
    RawQuery(raw): RawQuery,
) -> Result<ApiJson<AuditLog>, ApiError> {
    let limit = limit_param(raw.as_deref())?;
    Ok(ApiJson(audit_log(&state, None, limit)))
}

/// The API keys a customer's admins made (ids and roles; never the keys).
#[utoipa::path(get, path = "/v1/customers/{customerId}/keys", tag = "admin",
    params(("customerId" = String, Path)),
    responses((status = 200, body = Vec<ApiKeyView>), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_keys(
    State(state): State<AppState>,
    ScopedCaller { customer }: ScopedCaller,
) -> Result<ApiJson<Vec<ApiKeyView>>, ApiError> {
    customer_doc(&state, &customer, |c| {
        c.api_keys.iter().map(ApiKeyView::from).collect()
    })
    .map(ApiJson)
}

/// Makes an API key for the customer (operator, or the customer's admin): the answer holds the
/// key, shown this once; only its digest is kept.
#[utoipa::path(post, path = "/v1/customers/{customerId}/keys", tag = "admin",
    params(("customerId" = String, Path)), request_body = NewApiKeyDto,
    responses((status = 201, body = ApiKeySecretDto), (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_key(
    State(state): State<AppState>,
    caller: ManagingCaller,
    ApiJson(body): ApiJson<NewApiKeyDto>,
) -> Result<(StatusCode, ApiJson<ApiKeySecretDto>), ApiError> {
    // A random id (nobody picks one that collides with another customer's) and secret.
    let id = format!("k{}", &crate::auth::random_secret()[..16]);
    let key = format!("{id}.{}", crate::auth::random_secret());
    let op = AdminOp::AddApiKey {
        customer: caller.customer.clone(),
        key: CustomerKeyDto {
            id: id.clone(),
            sha256: hex::encode(crate::auth::sha256(&key)),
            role: body.role,
            label: body.label.clone(),
        },
    };
    let shown = ApiKeySecretDto {
        id,
        role: body.role.as_str().to_string(),
        label: body.label,
        key,
    };
    change_by(&state, &caller, op, StatusCode::CREATED, shown).await
}

/// Revokes a key the customer's admins made: it stops working at once (sessions included).
#[utoipa::path(delete, path = "/v1/customers/{customerId}/keys/{keyId}", tag = "admin",
    params(("customerId" = String, Path), ("keyId" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_key(
    State(state): State<AppState>,
    caller: ManagingCaller,
    ApiPath((_customer, id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let op = AdminOp::DeleteApiKey {
        customer: caller.customer.clone(),
        id,
    };
    delete_by(&state, &caller, op).await
}
