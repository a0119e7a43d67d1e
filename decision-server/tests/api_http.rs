//! The HTTP/JSON API in process: every route, every credential case, bad input, and the
//! OpenAPI document against the router.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use common::service::{ACME_KEY, ACME_ORG_CAP, Api, Calls, GLOBEX_KEY, OPERATOR, org_counted};

impl Api {
    async fn new() -> Self {
        Self::over(common::service::service().await)
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Body,
    ) -> (StatusCode, Value) {
        common::service::send_body(&self.router, method, path, token, body).await
    }

    async fn check(
        &self,
        token: &str,
        customer: &str,
        user: &str,
        usage: u64,
    ) -> (StatusCode, Value) {
        self.post(&format!("/v1/customers/{customer}/entitlements/check"), token, json!({"featureId": "ai-tokens", "requestedUsage": usage, "dimensions": {"userId": user}}))
        .await
    }

    async fn acme_org(&self) -> u64 {
        org_counted(&self.service, "acme").await
    }
}

#[tokio::test]
async fn grant_carries_hold_and_three_level_chain() {
    let api = Api::new().await;
    let (status, body) = api.check(ACME_KEY, "acme", "alice", 100).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["isGranted"], true);
    assert!(body["holdId"].as_str().unwrap().starts_with("acme:"));
    assert_eq!(body["accessDeniedReason"], Value::Null);
    let chain = body["chain"].as_array().unwrap();
    let entities: Vec<_> = chain
        .iter()
        .map(|e| e["entityId"].as_str().unwrap())
        .collect();
    assert_eq!(entities, ["alice", "ml", "acme"]);
    assert_eq!(chain[2]["limitId"], "org-daily");
    assert_eq!(chain[2]["currentUsage"], 100);
    assert_eq!(chain[2]["remaining"], ACME_ORG_CAP - 100);
    assert!(chain[2]["resetAt"].is_string());
    // The tightest limit is the org's: 90 % left against 99.9 %.
    assert_eq!(body["usageLimit"], ACME_ORG_CAP);
    assert_eq!(body["remaining"], ACME_ORG_CAP - 100);
    assert_eq!(api.acme_org().await, 100);
}

#[tokio::test]
async fn denial_names_the_blocking_level_and_changes_nothing() {
    let api = Api::new().await;
    let (_, first) = api.check(ACME_KEY, "acme", "alice", 900).await;
    assert_eq!(first["isGranted"], true);
    let (status, body) = api.check(ACME_KEY, "acme", "carol", 200).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["isGranted"], false);
    assert_eq!(body["holdId"], Value::Null);
    assert_eq!(body["deniedBy"]["limitId"], "org-daily");
    assert_eq!(body["deniedBy"]["entityId"], "acme");
    assert_eq!(body["deniedBy"]["level"], 2);
    let reason = body["accessDeniedReason"].as_str().unwrap();
    assert!(
        reason.contains("org-daily") && reason.contains("900 of 1000"),
        "{reason}"
    );
    assert!(body["retryAt"].is_string(), "a quota says when it resets");
    assert_eq!(api.acme_org().await, 900);
}

#[tokio::test]
async fn settle_corrects_to_actual_and_is_idempotent() {
    let api = Api::new().await;
    let (_, body) = api.check(ACME_KEY, "acme", "alice", 300).await;
    let hold = body["holdId"].as_str().unwrap().to_string();
    let path = format!("/v1/holds/{hold}/settle");
    assert_eq!(api.acme_org().await, 300);
    let (status, r) = api.post(&path, ACME_KEY, json!({"actualUsage": 120})).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["closed"], true);
    assert_eq!(api.acme_org().await, 120);
    let (status, r) = api.post(&path, ACME_KEY, json!({"actualUsage": 999})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(r["closed"], false, "a second settle changes nothing");
    assert_eq!(api.acme_org().await, 120);
    let (status, r) = api
        .post(
            "/v1/holds/acme:999999:0123456789abcdef0123456789abcdef/settle",
            ACME_KEY,
            json!({"actualUsage": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{r}");
    let (status, r) = api
        .post(
            "/v1/holds/not-a-hold/settle",
            OPERATOR,
            json!({"actualUsage": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{r}");
}

#[tokio::test]
async fn a_settlement_above_the_ceiling_is_charged_the_ceiling_and_the_excess_counted() {
    let api = Api::new().await;
    let (_, body) = api.check(ACME_KEY, "acme", "alice", 30).await;
    let hold = body["holdId"].as_str().unwrap().to_string();
    // Without a model, ten times the request is the ceiling: 301 is charged 300, not dropped.
    let (status, r) = api
        .post(
            &format!("/v1/holds/{hold}/settle"),
            ACME_KEY,
            json!({"actualUsage": 301}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["closed"], true);
    assert_eq!(api.acme_org().await, 300);
    let (_, text) = api.send(Method::GET, "/metrics", None, None).await;
    let text = text.as_str().unwrap();
    for line in [
        "tollgate_settles_capped_total 1",
        "tollgate_settle_excess_units_total 1",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
}

#[tokio::test]
async fn release_undoes_the_hold() {
    let api = Api::new().await;
    let (_, body) = api.check(OPERATOR, "acme", "bob", 250).await;
    let hold = body["holdId"].as_str().unwrap().to_string();
    assert_eq!(api.acme_org().await, 250);
    let (status, r) = api
        .send(
            Method::POST,
            &format!("/v1/holds/{hold}/release"),
            Some(OPERATOR),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["closed"], true);
    assert_eq!(api.acme_org().await, 0);
    let (_, r) = api
        .send(
            Method::POST,
            &format!("/v1/holds/{hold}/release"),
            Some(OPERATOR),
            None,
        )
        .await;
    assert_eq!(r["closed"], false);
}

#[tokio::test]
async fn ingest_counts_once_per_idempotency_key() {
    let api = Api::new().await;
    let event = json!({"idempotencyKey": "evt-1", "customerId": "acme", "featureId": "ai-tokens", "usage": 70, "dimensions": {"userId": "alice"}});
    let batch = json!({"events": [event.clone(), {"idempotencyKey": "evt-2", "customerId": "acme", "featureId": "nope", "usage": 1}]});
    let (status, r) = api.post("/v1/usage", ACME_KEY, batch).await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["results"][0]["status"], "recorded");
    assert_eq!(r["results"][1]["status"], "rejected");
    assert!(r["results"][1]["error"].as_str().unwrap().contains("nope"));
    assert_eq!(api.acme_org().await, 70);
    let (_, r) = api
        .post("/v1/usage", ACME_KEY, json!({"events": [event]}))
        .await;
    assert_eq!(r["results"][0]["status"], "duplicate");
    assert_eq!(api.acme_org().await, 70, "a duplicate key counts nothing");
    // Ingested usage counts even past the cap: it already happened.
    let big = json!({"events": [{"idempotencyKey": "evt-3", "customerId": "acme", "featureId": "ai-tokens", "usage": 5000, "dimensions": {"userId": "alice"}}]});
    let (_, r) = api.post("/v1/usage", ACME_KEY, big).await;
    assert_eq!(r["results"][0]["status"], "recorded");
    assert_eq!(api.acme_org().await, 5070);
    let (_, body) = api.check(ACME_KEY, "acme", "alice", 1).await;
    assert_eq!(body["isGranted"], false);
    // But one event is bounded like a settlement: 2^64-1 units would fill every quota of the
    // chain until the period resets. Refused, nothing recorded.
    for usage in [u64::MAX, 2_000_001] {
        let absurd = json!({"events": [{"idempotencyKey": format!("evt-{usage}"), "customerId": "acme", "featureId": "ai-tokens", "usage": usage, "dimensions": {"userId": "alice"}}]});
        let (_, r) = api.post("/v1/usage", ACME_KEY, absurd).await;
        assert_eq!(r["results"][0]["status"], "rejected", "{r}");
        assert!(
            r["results"][0]["error"]
                .as_str()
                .unwrap()
                .contains("more than one event may (2000000"),
            "{r}"
        );
    }
    assert_eq!(api.acme_org().await, 5070);
}

#[tokio::test]
async fn admin_changes_apply_to_the_next_decision() {
    let api = Api::new().await;
    // A new, tighter limit on team `ml`.
    let limit = json!({"id": "ml-small", "entity": "ml", "feature": "ai-tokens", "kind": "quota", "limit": 50, "period": "P1D"});
    let (status, r) = api
        .post("/v1/customers/acme/limits", OPERATOR, limit.clone())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    let (_, body) = api.check(ACME_KEY, "acme", "alice", 60).await;
    assert_eq!(body["isGranted"], false);
    assert_eq!(body["deniedBy"]["limitId"], "ml-small");
    let (status, _) = api.post("/v1/customers/acme/limits", OPERATOR, limit).await;
    assert_eq!(status, StatusCode::CONFLICT);
    // Raised with PUT.
    let raised = json!({"id": "ml-small", "entity": "ml", "feature": "ai-tokens", "kind": "quota", "limit": 80, "period": "P1D"});
    let (status, _) = api
        .put("/v1/customers/acme/limits/ml-small", OPERATOR, raised)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = api.check(ACME_KEY, "acme", "alice", 60).await;
    assert_eq!(body["isGranted"], true);
    let (_, limits) = api.get("/v1/customers/acme/limits", ACME_KEY).await;
    assert!(
        limits
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["id"] == "ml-small" && l["limit"] == 80)
    );
    // Removed.
    let (status, _) = api
        .delete("/v1/customers/acme/limits/ml-small", OPERATOR)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, body) = api.check(ACME_KEY, "acme", "alice", 60).await;
    assert_eq!(body["isGranted"], true);
    let (status, _) = api
        .delete("/v1/customers/acme/limits/ml-small", OPERATOR)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A new entity is usable at once; one with an unknown parent is refused whole.
    let (status, r) = api
        .post(
            "/v1/customers/acme/entities",
            OPERATOR,
            json!({"id": "erin", "type": "user", "parent": "web"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    let (_, body) = api.check(ACME_KEY, "acme", "erin", 5).await;
    assert_eq!(body["isGranted"], true, "{body}");
    let (status, r) = api
        .post(
            "/v1/customers/acme/entities",
            OPERATOR,
            json!({"id": "frank", "type": "user", "parent": "nowhere"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{r}");
    assert!(
        r["error"]["problems"][0]
            .as_str()
            .unwrap()
            .contains("nowhere"),
        "{r}"
    );
    let (_, entities) = api.get("/v1/customers/acme/entities", OPERATOR).await;
    assert!(
        !entities
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == "frank")
    );

    // A customer created, read, used and deleted.
    let customer = json!({"id": "initech", "entities": [{"id": "initech", "type": "organization"}, {"id": "t", "type": "team", "parent": "initech"}, {"id": "u", "type": "user", "parent": "t"}],
        "limits": [{"id": "cap", "entity": "initech", "feature": "ai-tokens", "kind": "quota", "limit": 10, "period": "P1D"}]});
    let (status, r) = api.post("/v1/customers", OPERATOR, customer).await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    let (_, body) = api.check(OPERATOR, "initech", "u", 11).await;
    assert_eq!(body["isGranted"], false);
    let (status, r) = api.get("/v1/customers/initech", OPERATOR).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(r["limits"][0]["id"], "cap");
    let (_, list) = api.get("/v1/customers", OPERATOR).await;
    assert_eq!(list["customers"], json!(["acme", "globex", "initech"]));
    let (status, _) = api.delete("/v1/customers/initech", OPERATOR).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = api.check(OPERATOR, "initech", "u", 1).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn grants_and_prices_through_the_api() {
    let api = Api::new().await;
    // A credits limit needs grants: add the limit, then a grant, then spend.
    let limit =
        json!({"id": "org-credits", "entity": "acme", "feature": "ai-requests", "kind": "credits"});
    let (status, r) = api.post("/v1/customers/acme/limits", OPERATOR, limit).await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    let check =
        json!({"featureId": "ai-requests", "requestedUsage": 5, "dimensions": {"userId": "alice"}});
    let (_, body) = api
        .post(
            "/v1/customers/acme/entitlements/check",
            ACME_KEY,
            check.clone(),
        )
        .await;
    assert_eq!(body["isGranted"], false, "no grant yet: {body}");
    let grant = json!({"id": "g1", "entity": "acme", "feature": "ai-requests", "amount": 8, "category": "paid"});
    let (status, r) = api
        .post("/v1/customers/acme/grants", OPERATOR, grant.clone())
        .await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    let (_, body) = api
        .post(
            "/v1/customers/acme/entitlements/check",
            ACME_KEY,
            check.clone(),
        )
        .await;
    assert_eq!(body["isGranted"], true, "{body}");
    let (_, body) = api
        .post("/v1/customers/acme/entitlements/check", ACME_KEY, check)
        .await;
    assert_eq!(
        body["isGranted"], false,
        "8 credits cannot cover 10: {body}"
    );
    let (status, _) = api.post("/v1/customers/acme/grants", OPERATOR, grant).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (_, grants) = api.get("/v1/customers/acme/grants", ACME_KEY).await;
    assert_eq!(grants[0]["id"], "g1");

    let table = json!({"version": "v1", "effectiveFrom": "2026-01-01T00:00:00Z", "models": [{"match": "*", "inputPerMillion": 1, "outputPerMillion": 2}]});
    let (status, r) = api.post("/v1/prices", OPERATOR, table.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    let (_, prices) = api.get("/v1/prices", ACME_KEY).await;
    assert_eq!(prices[0]["version"], "v1");
    let (status, _) = api.put("/v1/prices/v2", OPERATOR, table).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "path and body versions differ"
    );
    let (status, _) = api.delete("/v1/prices/v1", OPERATOR).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn credentials_are_checked_and_cross_customer_calls_change_nothing() {
    let api = Api::new().await;
    let body =
        json!({"featureId": "ai-tokens", "requestedUsage": 10, "dimensions": {"userId": "dave"}});
    let path = "/v1/customers/globex/entitlements/check";
    let (status, r) = api.send(Method::POST, path, None, Some(body.clone())).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{r}");
    assert_eq!(r["error"]["code"], "unauthorized");
    let (status, _) = api.post(path, "wrong", body.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = api.post(path, "acme-key.wrong-secret", body.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // acme's key for globex: 403, even with a malformed body, and nothing counted.
    let (status, r) = api.post(path, ACME_KEY, body.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{r}");
    let (status, _) = api
        .raw(Method::POST, path, Some(ACME_KEY), Body::from("{not json"))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(org_counted(&api.service, "globex").await, 0);
    // globex's own hold cannot be settled or released by acme.
    let (_, r) = api.post(path, GLOBEX_KEY, body).await;
    let hold = r["holdId"].as_str().unwrap().to_string();
    for action in ["settle", "release"] {
        let (status, _) = api
            .post(
                &format!("/v1/holds/{hold}/{action}"),
                ACME_KEY,
                json!({"actualUsage": 0}),
            )
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{action}");
    }
    assert_eq!(org_counted(&api.service, "globex").await, 10);
    // Ingest for another customer refuses the whole batch.
    let batch = json!({"events": [
        {"idempotencyKey": "a", "customerId": "acme", "featureId": "ai-tokens", "usage": 1, "dimensions": {"userId": "alice"}},
        {"idempotencyKey": "b", "customerId": "globex", "featureId": "ai-tokens", "usage": 1, "dimensions": {"userId": "dave"}}]});
    let (status, _) = api.post("/v1/usage", ACME_KEY, batch).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(api.acme_org().await, 0);
    // Admin: a customer key reads its own customer only and writes nothing.
    let (status, _) = api.get("/v1/customers/acme", ACME_KEY).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api.get("/v1/customers/globex", ACME_KEY).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, list) = api.get("/v1/customers", ACME_KEY).await;
    assert_eq!(list["customers"], json!(["acme"]));
    let limit = json!({"id": "x", "entity": "acme", "feature": "ai-tokens", "kind": "quota", "limit": 1, "period": "P1D"});
    let (status, r) = api.post("/v1/customers/acme/limits", ACME_KEY, limit).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{r}");
    let (status, _) = api.delete("/v1/customers/acme", ACME_KEY).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(api.service.admin_changes(), 0);
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let api = Api::new().await;
    let path = "/v1/customers/acme/entitlements/check";
    let (status, r) = api
        .raw(
            Method::POST,
            path,
            Some(OPERATOR),
            Body::from("{\"featureId\": "),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{r}");
    assert_eq!(r["error"]["code"], "malformed_body");
    let (status, r) = api
        .post(
            path,
            OPERATOR,
            json!({"featureId": "ai-tokens", "requestedUsage": "ten"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requestedUsage"),
        "{r}"
    );
    let (status, r) = api
        .post(
            path,
            OPERATOR,
            json!({"featureId": "ai-tokens", "requestedUsage": -5}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{r}");
    let (status, r) = api
        .post(
            path,
            OPERATOR,
            json!({"featureId": "ai-tokens", "requestedUsage": 1, "surprise": 1}),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown fields are refused: {r}"
    );
    let huge = format!(
        "{{\"featureId\": \"ai-tokens\", \"requestedUsage\": 1, \"dimensions\": {{\"userId\": \"{}\"}}}}",
        "a".repeat(70_000)
    );
    let (status, r) = api
        .raw(Method::POST, path, Some(OPERATOR), Body::from(huge))
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{r}");
    let (status, r) = api
        .post(
            path,
            OPERATOR,
            json!({"featureId": "nope", "requestedUsage": 1, "dimensions": {"userId": "alice"}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("nope"),
        "{r}"
    );
    let (status, r) = api.post(path, OPERATOR, json!({"featureId": "ai-tokens", "requestedUsage": 1, "dimensions": {"userId": "mallory"}})).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "unknown entity is rejected: {r}"
    );
    // More dimensions than a request may carry: refused before any decision, on check and
    // on ingest alike.
    let many: serde_json::Map<String, Value> =
        (0..40).map(|i| (format!("d{i}"), json!("x"))).collect();
    let (status, r) = api
        .post(
            path,
            OPERATOR,
            json!({"featureId": "ai-tokens", "requestedUsage": 1, "dimensions": many}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("40 dimensions in one request; at most 32"),
        "{r}"
    );
    let (status, r) = api.post("/v1/usage", OPERATOR, json!({"events": [{"idempotencyKey": "k-many", "customerId": "acme", "featureId": "ai-tokens", "usage": 1, "dimensions": many}]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    assert_eq!(r["results"][0]["status"], "rejected", "{r}");
    assert_eq!(api.acme_org().await, 0);
    let (status, r) = api.get("/v2/nothing", OPERATOR).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(r["error"]["code"], "no_route");
    let events: Vec<Value> = (0..1001).map(|i| json!({"idempotencyKey": format!("k{i}"), "customerId": "acme", "featureId": "ai-tokens", "usage": 1})).collect();
    let (status, r) = api
        .post("/v1/usage", OPERATOR, json!({"events": events}))
        .await;
    assert!(
        status == StatusCode::BAD_REQUEST || status == StatusCode::PAYLOAD_TOO_LARGE,
        "{status} {r}"
    );
    assert_eq!(api.acme_org().await, 0);
    assert_eq!(api.service.store_stats().holds_open, 0);
}

#[tokio::test]
async fn metrics_count_decisions_by_outcome() {
    let api = Api::new().await;
    api.check(OPERATOR, "acme", "alice", 600).await;
    api.check(OPERATOR, "acme", "alice", 600).await;
    api.check(OPERATOR, "acme", "nobody", 1).await;
    let (status, text) = api.send(Method::GET, "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().unwrap();
    for line in [
        r#"tollgate_decisions_total{api="http",outcome="granted"} 1"#,
        r#"tollgate_decisions_total{api="http",outcome="denied"} 1"#,
        r#"tollgate_decisions_total{api="http",outcome="bad_input"} 1"#,
        "tollgate_holds_open 1",
        r#"tollgate_decision_duration_seconds_count{api="http"} 3"#,
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
    let (status, h) = api.send(Method::GET, "/healthz", None, None).await;
    assert_eq!((status, h["status"].as_str()), (StatusCode::OK, Some("ok")));
}

/// The files a reader follows: every Markdown file of the repository and the portal's pages and
/// script (the browser calls the API too), outside build output and installed packages.
fn documents(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if !name.starts_with('.') && !["target", "node_modules"].contains(&name.as_str()) {
                documents(&path, out);
            }
        } else if name.ends_with(".md") || name.ends_with(".html") || name == "portal.js" {
            out.push(path);
        }
    }
}

/// Every sidecar API path a README, doc or portal page names is one the server answers
/// (`{id}` and `<id>` stand for any segment, and a concrete id fills a route's placeholder),
/// so no walkthrough sends a reader to a 404.
#[tokio::test]
async fn every_api_path_the_docs_name_exists() {
    let api = Api::new().await;
    let (_, doc) = api.send(Method::GET, "/openapi.json", None, None).await;
    let shape = |p: &str| -> String {
        p.split('/')
            .map(|seg| {
                if seg.starts_with('{') || seg.starts_with('<') {
                    "*"
                } else {
                    seg
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    };
    let served: Vec<String> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(|p| shape(p))
        .collect();
    let named = regex_lite::Regex::new(
        r"/v1/(?:customers|holds|usage|prices|audit)(?:/(?:\{[A-Za-z]+\}|<[A-Za-z-]+>|[A-Za-z0-9_-]+))*",
    )
    .unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    documents(&root, &mut files);
    assert!(files.len() > 5, "found the docs: {files:?}");
    let mut missing = Vec::new();
    let mut seen = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for m in named.find_iter(&text) {
            seen += 1;
            // A concrete example (`/v1/customers/acme/usage/top`) matches the route's
            // placeholder segment.
            let named: Vec<String> = shape(m.as_str()).split('/').map(String::from).collect();
            let matches = |route: &String| {
                let route: Vec<&str> = route.split('/').collect();
                route.len() == named.len()
                    && route
                        .iter()
                        .zip(&named)
                        .all(|(r, n)| *r == "*" || r == n || n == "*")
            };
            if !served.iter().any(matches) {
                missing.push(format!("{}: {}", file.display(), m.as_str()));
            }
        }
    }
    assert!(seen > 20, "the docs name the API ({seen} paths)");
    assert!(
        missing.is_empty(),
        "paths no route serves:\n{}",
        missing.join("\n")
    );
}

#[tokio::test]
async fn openapi_document_covers_every_route_of_the_router() {
    let api = Api::new().await;
    let (status, doc) = api.send(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let mut documented = Vec::new();
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            documented.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    documented.sort();
    let expected = [
        "DELETE /v1/customers/{customerId}",
        "DELETE /v1/customers/{customerId}/alerts/{alertId}",
        "DELETE /v1/customers/{customerId}/entities/{entityId}",
        "DELETE /v1/customers/{customerId}/keys/{keyId}",
        "DELETE /v1/customers/{customerId}/limits/{limitId}",
        "DELETE /v1/customers/{customerId}/overrides/{kind}/{id}",
        "DELETE /v1/customers/{customerId}/webhooks/{webhookId}",
        "DELETE /v1/customers/{customerId}/webhooks/{webhookId}/secrets/previous",
        "DELETE /v1/prices/{version}",
        "GET /healthz",
        "GET /metrics",
        "GET /openapi.json",
        "GET /v1/audit",
        "GET /v1/customers",
        "GET /v1/customers/{customerId}",
        "GET /v1/customers/{customerId}/alerts",
        "GET /v1/customers/{customerId}/alerts/deliveries",
        "GET /v1/customers/{customerId}/audit",
        "GET /v1/customers/{customerId}/entities",
        "GET /v1/customers/{customerId}/entities/{entityId}/budget",
        "GET /v1/customers/{customerId}/grants",
        "GET /v1/customers/{customerId}/keys",
        "GET /v1/customers/{customerId}/limits",
        "GET /v1/customers/{customerId}/overrides",
        "GET /v1/customers/{customerId}/usage/history",
        "GET /v1/customers/{customerId}/usage/spend",
        "GET /v1/customers/{customerId}/usage/stream",
        "GET /v1/customers/{customerId}/usage/top",
        "GET /v1/customers/{customerId}/webhooks",
        "GET /v1/prices",
        "GET /v1/usage/stream",
        "POST /v1/customers",
        "POST /v1/customers/{customerId}/alerts",
        "POST /v1/customers/{customerId}/entities",
        "POST /v1/customers/{customerId}/entitlements/check",
        "POST /v1/customers/{customerId}/grants",
        "POST /v1/customers/{customerId}/keys",
        "POST /v1/customers/{customerId}/limits",
        "POST /v1/customers/{customerId}/webhooks",
        "POST /v1/customers/{customerId}/webhooks/{webhookId}/secrets",
        "POST /v1/customers/{customerId}/webhooks/{webhookId}/test",
        "POST /v1/holds/{holdId}/release",
        "POST /v1/holds/{holdId}/settle",
        "POST /v1/prices",
        "POST /v1/usage",
        "PUT /v1/customers/{customerId}",
        "PUT /v1/customers/{customerId}/alerts/{alertId}",
        "PUT /v1/customers/{customerId}/entities/{entityId}",
        "PUT /v1/customers/{customerId}/limits/{limitId}",
        "PUT /v1/prices/{version}",
    ];
    assert_eq!(documented, expected);
    // Every documented operation is served by the router (not the fallback, not 405), and
    // every schema reference resolves.
    for op in &documented {
        let (method, path) = op.split_once(' ').unwrap();
        let concrete = path
            .replace("{customerId}", "acme")
            .replace("{entityId}", "alice")
            .replace("{limitId}", "org-daily")
            .replace("{holdId}", "acme:1")
            .replace("{version}", "v0")
            .replace("{alertId}", "a1")
            .replace("{webhookId}", "w1")
            .replace("{keyId}", "k1");
        let (status, body) = api
            .send(
                method.parse().unwrap(),
                &concrete,
                Some("not-a-token"),
                Some(json!({})),
            )
            .await;
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{op}");
        assert_ne!(
            body["error"]["code"], "no_route",
            "{op} is documented but not routed"
        );
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    let text = doc.to_string();
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = r.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "dangling $ref {name}");
    }
    // A route the router does not have is not in the document either.
    let (status, _) = api
        .send(Method::PATCH, "/v1/customers/acme", Some(OPERATOR), None)
        .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}
