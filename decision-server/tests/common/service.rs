//! The sidecar fixture for the API and process tests: a 3-level tree (organization → team →
//! user) for two customers, an operator token, one API key per customer and gateway tokens;
//! and one call through the HTTP router.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use tollgate::service::Service;

pub const OPERATOR: &str = "op-token";
pub const ACME_KEY: &str = "acme-key.acme-secret";
pub const GLOBEX_KEY: &str = "globex-key.globex-secret";
/// acme's admin key: also acme's limits (within its ceilings), alert rules and webhooks.
pub const ACME_ADMIN: &str = "acme-admin.admin-secret";
/// acme's read-only key.
pub const ACME_VIEWER: &str = "acme-viewer.viewer-secret";
/// globex's admin key.
pub const GLOBEX_ADMIN: &str = "globex-admin.globex-admin-secret";
/// What Envoy presents on the ext_authz listener: every customer.
pub const GATEWAY: &str = "envoy.gateway-secret";
/// A gateway token for acme only.
pub const ACME_GATEWAY: &str = "edge-acme.edge-secret";

/// Org cap shared by every acme user.
pub const ACME_ORG_CAP: u64 = 1000;

/// The fixture config with `listeners` spliced into its `server:` section.
/// An anchor for the fixture's daily quotas twelve hours from now, on the hour: their day
/// starts and ends at least eleven hours away from any test run on the fixture, whatever the
/// time of day it runs at (a day ending mid-test would reset the counters it checks).
pub fn daily_anchor() -> String {
    (chrono::Utc::now() + chrono::Duration::hours(12))
        .format("%Y-%m-%dT%H:00:00Z")
        .to_string()
}

pub fn config_with(listeners: &str) -> String {
    config_with_anchor(listeners, &daily_anchor())
}

/// The fixture with `listeners` (the `server:` section's other lines), its daily quotas
/// anchored at `day` (RFC 3339).
pub fn config_with_anchor(listeners: &str, day: &str) -> String {
    let sha = tollgate_testkit::sha256_hex;
    format!(
        r#"
{types}attribution:
  - dimension: userId
    entityType: user
features:
  - id: ai-tokens
  - id: ai-requests
customers:
  - id: acme
    entities:
      - {{ id: acme, type: organization }}
      - {{ id: ml, type: team, parent: acme }}
      - {{ id: web, type: team, parent: acme }}
      - {{ id: alice, type: user, parent: ml }}
      - {{ id: bob, type: user, parent: ml }}
      - {{ id: carol, type: user, parent: web }}
    limits:
      - {{ id: org-daily, entity: acme, feature: ai-tokens, kind: quota, limit: {ACME_ORG_CAP}, period: P1D, anchor: {day} }}
      - {{ id: team-daily, entityType: team, feature: ai-tokens, kind: quota, limit: 100000, period: P1D, anchor: {day} }}
      - {{ id: user-daily, entityType: user, feature: ai-tokens, kind: quota, limit: 100000, period: P1D, anchor: {day} }}
  - id: globex
    entities:
      - {{ id: globex, type: organization }}
      - {{ id: ops, type: team, parent: globex }}
      - {{ id: dave, type: user, parent: ops }}
    limits:
      - {{ id: org-daily, entity: globex, feature: ai-tokens, kind: quota, limit: 500, period: P1D, anchor: {day} }}
server:
{listeners}
  credentials:
    operatorTokenSha256: {op}
    apiKeys:
      - {{ id: acme-key, customer: acme, sha256: {acme} }}
      - {{ id: globex-key, customer: globex, sha256: {globex} }}
      - {{ id: acme-admin, customer: acme, sha256: {acme_admin}, role: admin }}
      - {{ id: acme-viewer, customer: acme, sha256: {acme_viewer}, role: viewer }}
      - {{ id: globex-admin, customer: globex, sha256: {globex_admin}, role: admin }}
    gatewayTokens:
      - {{ id: envoy, sha256: {gateway} }}
      - {{ id: edge-acme, sha256: {edge}, customers: [acme] }}
  extAuthz:
    customer: {{ header: x-tollgate-customer }}
    dimensions:
      userId: {{ header: x-user-id }}
  maxBodyBytes: 65536
"#,
        types = tollgate_testkit::ORG_TEAM_USER,
        day = day,
        op = sha(OPERATOR),
        acme = sha(ACME_KEY),
        globex = sha(GLOBEX_KEY),
        acme_admin = sha(ACME_ADMIN),
        acme_viewer = sha(ACME_VIEWER),
        globex_admin = sha(GLOBEX_ADMIN),
        gateway = sha(GATEWAY),
        edge = sha(ACME_GATEWAY),
    )
}

pub fn config() -> String {
    // In process: counters in memory, no store file next to a config that has no folder.
    config_with("  logging: { level: warn }\n  storage: { kind: memory }")
}

/// A service over the fixture config, in memory.
pub async fn service() -> Arc<Service> {
    service_from(&config()).await
}

pub async fn service_from(text: &str) -> Arc<Service> {
    let loaded = tollgate::config::load(text, "fixture.yaml").expect("fixture config is valid");
    tollgate::server::build_service(loaded)
        .await
        .expect("service")
}

/// A mid-morning on a Wednesday in the middle of a month: far from every daily, weekly and
/// monthly reset, so a test that reads projections, resets or period boundaries gets the same
/// answer whatever time of day it runs at.
pub const PINNED_START: &str = "2026-03-11T10:00:00Z";

/// The fixture's daily anchor on the pinned clock: days end at 22:00, twelve hours after it.
pub const PINNED_DAY_ANCHOR: &str = "2026-03-11T22:00:00Z";

/// As [`service_from`], on a clock that starts at [`PINNED_START`] and runs from there.
pub async fn service_from_pinned(text: &str) -> Arc<Service> {
    let loaded = tollgate::config::load(text, "fixture.yaml").expect("fixture config is valid");
    let start = super::at(PINNED_START);
    tollgate::server::build_service_with_clock(
        loaded,
        Arc::new(tollgate::clock::ShiftedClock::starting_at(start)),
    )
    .await
    .expect("service")
}

/// A GET of `url` with `token`: its JSON body.
pub async fn get_json(http: &reqwest::Client, url: &str, token: &str) -> Value {
    http.get(url)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// What acme's org counter counts now.
pub async fn org_counted(service: &Service, customer: &str) -> u64 {
    service
        .counted(customer, customer, "org-daily", None)
        .await
        .unwrap()
        .unwrap_or(0)
}

/// One call through `router` with `authorization: Bearer <token>`: the status and the JSON
/// body (`null` when there is none).
pub async fn call(
    router: &axum::Router,
    method: Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    router.send(method, path, Some(token), body).await
}

/// The HTTP verbs a test speaks, over whatever sends one request (`send`): one line a call.
// The provided methods are only called from tests on one task, so `Send` bounds do not matter.
#[allow(async_fn_in_trait)]
pub trait Calls {
    /// One request with an optional bearer token and JSON body: the status and the JSON body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value);

    async fn get(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.send(Method::GET, path, Some(token), None).await
    }

    async fn delete(&self, path: &str, token: &str) -> (StatusCode, Value) {
        self.send(Method::DELETE, path, Some(token), None).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.send(Method::POST, path, Some(token), Some(body)).await
    }

    async fn put(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.send(Method::PUT, path, Some(token), Some(body)).await
    }

    async fn patch(&self, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
        self.send(Method::PATCH, path, Some(token), Some(body))
            .await
    }
}

/// The sidecar's HTTP front end over a service, in process.
pub struct Api {
    pub service: Arc<Service>,
    pub router: axum::Router,
}

impl Api {
    /// The router over `service`, with the default 64 KiB body limit.
    pub fn over(service: Arc<Service>) -> Self {
        Self {
            router: tollgate::http::router(Arc::clone(&service), 65536),
            service,
        }
    }
}

impl Calls for Api {
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.router.send(method, path, token, body).await
    }
}

/// One request through `router` with any body: the status and the body as JSON, as a string
/// when it is not JSON, or `null` when it is empty.
pub async fn send_body(
    router: &axum::Router,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Body,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = router
        .clone()
        .oneshot(req.body(body).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (status, value)
}

impl Calls for axum::Router {
    async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map_or(Body::empty(), |b| Body::from(b.to_string()));
        send_body(self, method, path, token, body).await
    }
}
