//! HTTP handlers for the admin resources: customers, entities, limits, grants and prices.
//! Changes need the operator token (limits: or the customer's admin key, within its ceilings)
//! and take effect on the next decision; a customer's API key may read its own customer.

use axum::extract::State;
use axum::http::StatusCode;

use super::dto::{CustomerList, ErrorBody, OverrideDto};
use super::{ApiError, ApiJson, ApiPath, AppState, Caller, ManagingCaller, Operator};
use crate::auth::Principal;
use crate::catalog::AdminOp;
use crate::config::dto::{CustomerDto, EntityDto, GrantDto, LimitDto, PriceTableDto};

/// Reads one customer of the current document (404 if it is not there), for a caller already
/// allowed to read it.
pub(super) fn customer_doc<R>(
    state: &AppState,
    id: &str,
    f: impl FnOnce(&CustomerDto) -> R,
) -> Result<R, ApiError> {
    state
        .read_config(|doc| doc.customers.iter().find(|c| c.id == id).map(f))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("customer `{id}` not found"),
            )
        })
}

/// Reads one customer of the current document, if `caller` reaches it.
fn read_customer<R>(
    state: &AppState,
    caller: &Caller,
    id: &str,
    f: impl FnOnce(&CustomerDto) -> R,
) -> Result<R, ApiError> {
    caller.for_customer(id)?;
    customer_doc(state, id, f)
}

/// Applies a change by `by` and answers with `body` and `status`.
pub(super) async fn change<T>(
    state: &AppState,
    by: &Principal,
    op: AdminOp,
    status: StatusCode,
    body: T,
) -> Result<(StatusCode, ApiJson<T>), ApiError> {
    state.admin_as(by, op).await?;
    Ok((status, ApiJson(body)))
}

/// The same for a customer's manager, whose key the audit log names.
pub(super) async fn change_by<T>(
    state: &AppState,
    by: &crate::api::ManagingCaller,
    op: AdminOp,
    status: StatusCode,
    body: T,
) -> Result<(StatusCode, ApiJson<T>), ApiError> {
    state
        .admin_by_key(&by.principal, by.key.as_deref(), op)
        .await?;
    Ok((status, ApiJson(body)))
}

pub(super) async fn delete(
    state: &AppState,
    by: &Principal,
    op: AdminOp,
) -> Result<StatusCode, ApiError> {
    state.admin_as(by, op).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The same for a customer's manager, whose key the audit log names.
pub(super) async fn delete_by(
    state: &AppState,
    by: &crate::api::ManagingCaller,
    op: AdminOp,
) -> Result<StatusCode, ApiError> {
    state
        .admin_by_key(&by.principal, by.key.as_deref(), op)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn same_id(path: &str, body: &str) -> Result<(), ApiError> {
    if path == body {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "the body's id `{body}` differs from the path's `{path}`"
        )))
    }
}

/// Lists customer ids (operator), or the caller's own customer (API key).
#[utoipa::path(get, path = "/v1/customers", tag = "admin",
    responses((status = 200, body = CustomerList), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_customers(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiJson<CustomerList> {
    let customers = state.read_config(|doc| {
        doc.customers
            .iter()
            .filter(|c| caller.0.may_access(&c.id))
            .map(|c| c.id.clone())
            .collect()
    });
    ApiJson(CustomerList { customers })
}

/// Creates a customer with its entities, limits and grants.
#[utoipa::path(post, path = "/v1/customers", tag = "admin", request_body = CustomerDto,
    responses((status = 201, body = CustomerDto), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_customer(
    State(state): State<AppState>,
    _op: Operator,
    ApiJson(body): ApiJson<CustomerDto>,
) -> Result<(StatusCode, ApiJson<CustomerDto>), ApiError> {
    let op = AdminOp::PutCustomer {
        customer: body.clone(),
        create: true,
    };
    change(&state, &Principal::Operator, op, StatusCode::CREATED, body).await
}

/// One customer, whole.
#[utoipa::path(get, path = "/v1/customers/{customerId}", tag = "admin",
    params(("customerId" = String, Path)),
    responses((status = 200, body = CustomerDto), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn get_customer(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<CustomerDto>, ApiError> {
    // Webhook secrets are shown once, when made; nobody reads them back, the operator
    // included (a customer written back whole keeps the secrets its redacted ones stand for).
    read_customer(&state, &caller, &id, |c| {
        let mut c = c.clone();
        c.webhooks = c
            .webhooks
            .iter()
            .map(crate::catalog::redacted_webhook)
            .collect();
        c
    })
    .map(ApiJson)
}

/// Creates or replaces a customer, whole.
#[utoipa::path(put, path = "/v1/customers/{customerId}", tag = "admin",
    params(("customerId" = String, Path)), request_body = CustomerDto,
    responses((status = 200, body = CustomerDto), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_customer(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<CustomerDto>,
) -> Result<(StatusCode, ApiJson<CustomerDto>), ApiError> {
    same_id(&id, &body.id)?;
    let op = AdminOp::PutCustomer {
        customer: body.clone(),
        create: false,
    };
    change(&state, &Principal::Operator, op, StatusCode::OK, body).await
}

/// Deletes a customer. Its counters stay in the store until it is created again.
#[utoipa::path(delete, path = "/v1/customers/{customerId}", tag = "admin",
    params(("customerId" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_customer(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    delete(&state, &Principal::Operator, AdminOp::DeleteCustomer { id }).await
}

/// A customer's entities.
#[utoipa::path(get, path = "/v1/customers/{customerId}/entities", tag = "admin",
    params(("customerId" = String, Path)),
    responses((status = 200, body = Vec<EntityDto>), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_entities(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Vec<EntityDto>>, ApiError> {
    read_customer(&state, &caller, &id, |c| c.entities.clone()).map(ApiJson)
}

/// Adds an entity to a customer's tree.
#[utoipa::path(post, path = "/v1/customers/{customerId}/entities", tag = "admin",
    params(("customerId" = String, Path)), request_body = EntityDto,
    responses((status = 201, body = EntityDto), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_entity(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(customer): ApiPath<String>,
    ApiJson(body): ApiJson<EntityDto>,
) -> Result<(StatusCode, ApiJson<EntityDto>), ApiError> {
    let op = AdminOp::PutEntity {
        customer,
        entity: body.clone(),
        create: true,
    };
    change(&state, &Principal::Operator, op, StatusCode::CREATED, body).await
}

/// Creates or replaces an entity (moving it to another parent, for instance).
#[utoipa::path(put, path = "/v1/customers/{customerId}/entities/{entityId}", tag = "admin",
    params(("customerId" = String, Path), ("entityId" = String, Path)), request_body = EntityDto,
    responses((status = 200, body = EntityDto), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_entity(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((customer, id)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<EntityDto>,
) -> Result<(StatusCode, ApiJson<EntityDto>), ApiError> {
    same_id(&id, &body.id)?;
    let op = AdminOp::PutEntity {
        customer,
        entity: body.clone(),
        create: false,
    };
    change(&state, &Principal::Operator, op, StatusCode::OK, body).await
}

/// Removes an entity. Refused while children or limits still name it.
#[utoipa::path(delete, path = "/v1/customers/{customerId}/entities/{entityId}", tag = "admin",
    params(("customerId" = String, Path), ("entityId" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_entity(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath((customer, id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    delete(
        &state,
        &Principal::Operator,
        AdminOp::DeleteEntity { customer, id },
    )
    .await
}

/// A customer's limits.
#[utoipa::path(get, path = "/v1/customers/{customerId}/limits", tag = "admin",
    params(("customerId" = String, Path)),
    responses((status = 200, body = Vec<LimitDto>), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_limits(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Vec<LimitDto>>, ApiError> {
    read_customer(&state, &caller, &id, |c| c.limits.clone()).map(ApiJson)
}

/// Adds a limit; it applies from the next decision.
#[utoipa::path(post, path = "/v1/customers/{customerId}/limits", tag = "admin",
    params(("customerId" = String, Path)), request_body = LimitDto,
    responses((status = 201, body = LimitDto), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_limit(
    State(state): State<AppState>,
    caller: ManagingCaller,
    ApiJson(body): ApiJson<LimitDto>,
) -> Result<(StatusCode, ApiJson<LimitDto>), ApiError> {
    let op = AdminOp::PutLimit {
        customer: caller.customer.clone(),
        limit: body.clone(),
        create: true,
    };
    change_by(&state, &caller, op, StatusCode::CREATED, body).await
}

/// Creates or replaces a limit. Its counter carries over when the kind stays the same.
#[utoipa::path(put, path = "/v1/customers/{customerId}/limits/{limitId}", tag = "admin",
    params(("customerId" = String, Path), ("limitId" = String, Path)), request_body = LimitDto,
    responses((status = 200, body = LimitDto), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_limit(
    State(state): State<AppState>,
    caller: ManagingCaller,
    ApiPath((_customer, id)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<LimitDto>,
) -> Result<(StatusCode, ApiJson<LimitDto>), ApiError> {
    same_id(&id, &body.id)?;
    let op = AdminOp::PutLimit {
        customer: caller.customer.clone(),
        limit: body.clone(),
        create: false,
    };
    change_by(&state, &caller, op, StatusCode::OK, body).await
}

/// Removes a limit.
#[utoipa::path(delete, path = "/v1/customers/{customerId}/limits/{limitId}", tag = "admin",
    params(("customerId" = String, Path), ("limitId" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_limit(
    State(state): State<AppState>,
    caller: ManagingCaller,
    ApiPath((_customer, id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let op = AdminOp::DeleteLimit {
        customer: caller.customer.clone(),
        id,
    };
    delete_by(&state, &caller, op).await
}

/// A customer's credit grants, as granted.
#[utoipa::path(get, path = "/v1/customers/{customerId}/grants", tag = "admin",
    params(("customerId" = String, Path)),
    responses((status = 200, body = Vec<GrantDto>), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_grants(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Vec<GrantDto>>, ApiError> {
    read_customer(&state, &caller, &id, |c| c.grants.clone()).map(ApiJson)
}

/// Adds credits to a pool. Grants are never replaced or removed: their credits may be spent.
#[utoipa::path(post, path = "/v1/customers/{customerId}/grants", tag = "admin",
    params(("customerId" = String, Path)), request_body = GrantDto,
    responses((status = 201, body = GrantDto), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_grant(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(customer): ApiPath<String>,
    ApiJson(body): ApiJson<GrantDto>,
) -> Result<(StatusCode, ApiJson<GrantDto>), ApiError> {
    let op = AdminOp::AddGrant {
        customer,
        grant: body.clone(),
    };
    change(&state, &Principal::Operator, op, StatusCode::CREATED, body).await
}

/// The price tables, every version.
#[utoipa::path(get, path = "/v1/prices", tag = "admin",
    responses((status = 200, body = Vec<PriceTableDto>), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_prices(
    State(state): State<AppState>,
    _caller: Caller,
) -> ApiJson<Vec<PriceTableDto>> {
    ApiJson(state.read_config(|doc| doc.prices.clone()))
}

/// Adds a price table version.
#[utoipa::path(post, path = "/v1/prices", tag = "admin", request_body = PriceTableDto,
    responses((status = 201, body = PriceTableDto), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn create_prices(
    State(state): State<AppState>,
    _op: Operator,
    ApiJson(body): ApiJson<PriceTableDto>,
) -> Result<(StatusCode, ApiJson<PriceTableDto>), ApiError> {
    let op = AdminOp::PutPrices {
        table: body.clone(),
        create: true,
    };
    change(&state, &Principal::Operator, op, StatusCode::CREATED, body).await
}

/// Creates or replaces a price table version.
#[utoipa::path(put, path = "/v1/prices/{version}", tag = "admin",
    params(("version" = String, Path)), request_body = PriceTableDto,
    responses((status = 200, body = PriceTableDto), (status = 400, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn put_prices(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(version): ApiPath<String>,
    ApiJson(body): ApiJson<PriceTableDto>,
) -> Result<(StatusCode, ApiJson<PriceTableDto>), ApiError> {
    same_id(&version, &body.version)?;
    let op = AdminOp::PutPrices {
        table: body.clone(),
        create: false,
    };
    change(&state, &Principal::Operator, op, StatusCode::OK, body).await
}

/// Removes a price table version. Open holds keep the prices they were priced with.
#[utoipa::path(delete, path = "/v1/prices/{version}", tag = "admin",
    params(("version" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn delete_prices(
    State(state): State<AppState>,
    _op: Operator,
    ApiPath(version): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    delete(
        &state,
        &Principal::Operator,
        AdminOp::DeletePrices { version },
    )
    .await
}

/// What admin changes hold over the config file for a customer: each limit, entity, alert rule
/// or webhook changed, added or deleted through the API or the portal, with the file's version
/// and the one in force. They win over the file, later edits of it included, until dropped.
#[utoipa::path(get, path = "/v1/customers/{customerId}/overrides", tag = "admin",
    params(("customerId" = String, Path)),
    responses((status = 200, body = Vec<OverrideDto>), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn list_overrides(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<ApiJson<Vec<OverrideDto>>, ApiError> {
    read_customer(&state, &caller, &id, |_| ())?;
    Ok(ApiJson(
        state
            .overrides(Some(&id))
            .iter()
            .map(OverrideDto::from)
            .collect(),
    ))
}

/// Drops the admin changes to one object, so the file's version applies again (an object they
/// added goes, one they deleted comes back). A customer's admin may drop only changes made
/// with its own customer's keys; the operator's stand until the operator drops them.
#[utoipa::path(delete, path = "/v1/customers/{customerId}/overrides/{kind}/{id}", tag = "admin",
    params(("customerId" = String, Path), ("kind" = String, Path, description = "`limit`, `entity`, `alert` or `webhook`"), ("id" = String, Path)),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)),
    security(("bearer" = [])))]
pub async fn drop_override(
    State(state): State<AppState>,
    caller: ManagingCaller,
    ApiPath((_customer, kind, id)): ApiPath<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    state
        .restore(
            &caller.principal,
            caller.key.as_deref(),
            &caller.customer,
            &kind,
            &id,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
