//! Two tenants side by side on one server, one of them hostile with its own keys: what it can
//! make the server do or keep is bounded per tenant, and the other tenant's deliveries,
//! sessions and events are unaffected. Webhook targets never point inside the pod.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::{Method, StatusCode};
use serde_json::{Value, json};

use common::service::{ACME_ADMIN, ACME_KEY, Calls, GLOBEX_ADMIN, GLOBEX_KEY, call, config_with};
use common::webhooks::Receiver;

/// The fixture with `alerting` settings `alerting` (YAML flow mapping).
async fn router_with(alerting: &str) -> (Arc<tollgate::service::Service>, axum::Router) {
    let config = format!(
        "alerting: {alerting}\n{}",
        config_with("  logging: { level: warn }\n  storage: { kind: memory }")
    );
    let service = common::service::service_from(&config).await;
    let router = tollgate::http::router(Arc::clone(&service), 65536);
    (service, router)
}

/// A receiver that takes connections and never answers: how many it took, and how many of
/// those the caller has since closed.
struct Silent {
    url: String,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl Silent {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (a, c) = (Arc::clone(&accepted), Arc::clone(&closed));
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let c = Arc::clone(&c);
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt as _;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            url,
            accepted,
            closed,
        }
    }
}

async fn add_webhook(router: &axum::Router, customer: &str, admin: &str, url: &str) -> StatusCode {
    let (s, body) = router
        .post(
            &format!("/v1/customers/{customer}/webhooks"),
            admin,
            json!({"id": "ops", "url": url}),
        )
        .await;
    assert!(
        s == StatusCode::CREATED || s.is_client_error(),
        "{s}: {body}"
    );
    s
}

async fn test_delivery(router: &axum::Router, customer: &str, key: &str) {
    let (s, body) = call(
        router,
        Method::POST,
        &format!("/v1/customers/{customer}/webhooks/ops/test"),
        key,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_silent_receiver_never_delays_another_tenants_webhooks() {
    let (service, router) =
        router_with("{ timeoutMs: 5000, retrySchedule: [PT1S], allowTargets: [127.0.0.0/8] }")
            .await;
    let silent = Silent::start().await;
    let receiver = Receiver::start(0, 0).await;
    assert_eq!(
        add_webhook(&router, "acme", ACME_ADMIN, &silent.url).await,
        StatusCode::CREATED
    );
    assert_eq!(
        add_webhook(&router, "globex", GLOBEX_ADMIN, &receiver.url).await,
        StatusCode::CREATED
    );
    // The hostile tenant queues eight test deliveries to a receiver that never answers.
    for _ in 0..8 {
        test_delivery(&router, "acme", ACME_KEY).await;
    }
    // The server's loop: a pass every 100 ms here (250 ms in the server).
    let ticking = {
        let service = Arc::clone(&service);
        tokio::spawn(async move {
            for _ in 0..300 {
                service.deliver_due();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while silent.accepted.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "acme's delivery was never sent");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Now, with acme's calls hanging, globex's delivery goes out before any of them ends.
    test_delivery(&router, "globex", GLOBEX_KEY).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.calls().is_empty() {
        assert_eq!(
            silent.closed.load(Ordering::SeqCst),
            0,
            "globex's delivery waited for acme's silent receiver to time out"
        );
        assert!(Instant::now() < deadline, "globex's delivery never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // acme's calls are bounded per tenant: a few in flight at once, not all eight.
    let in_flight = silent.accepted.load(Ordering::SeqCst);
    assert!(
        (1..=4).contains(&in_flight),
        "{in_flight} of acme's calls in flight at once"
    );
    ticking.abort();
}

#[tokio::test]
async fn webhooks_to_the_pods_own_services_are_refused() {
    let (_service, router) = router_with("{ timeoutMs: 2000 }").await;
    for url in [
        // Envoy's admin port on loopback would stop Envoy.
        "http://127.0.0.1:9901/quitquitquit",
        "https://127.0.0.1:8443/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://10.0.0.12/hook",
        "https://[::ffff:127.0.0.1]/hook",
        "https://localhost/hook",
    ] {
        let (s, body) = router
            .post(
                "/v1/customers/acme/webhooks",
                ACME_ADMIN,
                json!({"id": "ops", "url": url}),
            )
            .await;
        assert!(s.is_client_error(), "{url}: {s} {body}");
        assert!(
            body["error"]["problems"][0]
                .as_str()
                .unwrap_or_default()
                .contains("allowTargets"),
            "{url}: {body}"
        );
    }
    // A public name is taken; it is resolved and checked on every delivery.
    assert_eq!(
        add_webhook(&router, "acme", ACME_ADMIN, "https://hooks.example.com/t").await,
        StatusCode::CREATED
    );
}

/// What one tenant reads back never holds another's or the server's secrets.
/// Text a tenant stores is bounded per field well under the request's body limit (so the
/// field's own bound refuses it, named in the error) and kept free of control characters.
#[tokio::test]
async fn stored_text_is_bounded_and_clean() {
    let (_service, router) = router_with("{ timeoutMs: 2000 }").await;
    let long = format!("https://hooks.example.com/{}", "a".repeat(40_000));
    let (s, body) = router
        .post(
            "/v1/customers/acme/webhooks",
            ACME_ADMIN,
            json!({"id": "ops", "url": long}),
        )
        .await;
    assert!(s.is_client_error(), "{s}: {body}");
    assert!(body.to_string().contains("over 2048"), "{body}");
    for (label, why) in [
        ("x".repeat(40_000), "over 200"),
        ("nul\u{0}".into(), "U+0000"),
        ("rtl\u{202e}txt".into(), "U+202E"),
    ] {
        let (s, body): (StatusCode, Value) = router
            .post(
                "/v1/customers/acme/keys",
                ACME_ADMIN,
                json!({"role": "viewer", "label": label}),
            )
            .await;
        assert!(s.is_client_error(), "{s}: {body}");
        assert!(body.to_string().contains(why), "{why}: {body}");
    }
    let (s, body): (StatusCode, Value) = router
        .post(
            "/v1/customers/acme/keys",
            ACME_ADMIN,
            json!({"role": "viewer", "label": "y".repeat(200)}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "the bound itself is kept: {body}");
}

/// A portal sign-in through the router with `token`: the session cookie, or the status.
async fn sign_in(router: &axum::Router, token: &str) -> Result<String, StatusCode> {
    use axum::body::Body;
    use tower::ServiceExt as _;
    let req = axum::http::Request::builder()
        .method(Method::POST)
        .uri("/portal/login")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", "http://localhost")
        .header("host", "localhost")
        .header("sec-fetch-site", "same-origin")
        .body(Body::from(format!("token={token}")))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    if !resp.status().is_redirection() {
        return Err(resp.status());
    }
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_string)
        .ok_or(resp.status())?;
    Ok(cookie)
}

/// Whether the portal answers `cookie`'s session with a signed-in page.
async fn signed_in(router: &axum::Router, cookie: &str, page: &str) -> bool {
    use axum::body::Body;
    use tower::ServiceExt as _;
    let req = axum::http::Request::builder()
        .uri(page)
        .header("cookie", cookie)
        .body(Body::empty())
        .unwrap();
    router.clone().oneshot(req).await.unwrap().status() == StatusCode::OK
}

/// A tenant that signs in with its keys in a loop churns only its own sessions: the other
/// tenant's open session stays, and it and the operator can still sign in.
#[tokio::test]
async fn a_sign_in_loop_churns_only_its_own_tenants_sessions() {
    use common::service::{ACME_VIEWER, OPERATOR};
    use tollgate::session::{MAX_PER_CUSTOMER, MAX_PER_KEY};
    let (_service, router) = router_with("{ timeoutMs: 2000 }").await;
    let globex = sign_in(&router, GLOBEX_ADMIN).await.unwrap();
    assert!(signed_in(&router, &globex, "/portal/c/globex/").await);
    let first = sign_in(&router, ACME_VIEWER).await.unwrap();
    // Enough keys of its own to pass the customer's budget as well as each key's.
    let mut keys = vec![ACME_VIEWER.to_string(), ACME_ADMIN.to_string()];
    while keys.len() * MAX_PER_KEY <= MAX_PER_CUSTOMER + MAX_PER_KEY {
        let (s, made) = router
            .post(
                "/v1/customers/acme/keys",
                ACME_ADMIN,
                json!({"role": "viewer"}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{made}");
        keys.push(made["key"].as_str().unwrap().to_string());
    }
    // Far past both budgets, and past the server's cap of 10,000 were they shared.
    let mut last = String::new();
    for i in 0..10_500 {
        let key = &keys[i % keys.len()];
        last = sign_in(&router, key)
            .await
            .unwrap_or_else(|s| panic!("sign-in {i}: {s}"));
    }
    assert!(
        !signed_in(&router, &first, "/portal/c/acme/").await,
        "a key past its {MAX_PER_KEY} sessions ends its oldest"
    );
    assert!(signed_in(&router, &last, "/portal/c/acme/").await);
    assert!(
        signed_in(&router, &globex, "/portal/c/globex/").await,
        "the other tenant's session was kept"
    );
    let again = sign_in(&router, GLOBEX_ADMIN).await.unwrap();
    assert!(signed_in(&router, &again, "/portal/c/globex/").await);
    let op = sign_in(&router, OPERATOR).await.unwrap();
    assert!(signed_in(&router, &op, "/portal/customers").await);
}

/// `n` usage events for `customer` through `POST /v1/usage`, in batches under the body limit.
async fn ingest(router: &axum::Router, customer: &str, key: &str, from: usize, n: usize) {
    let user = if customer == "acme" { "alice" } else { "dave" };
    for start in (from..from + n).step_by(250) {
        let events: Vec<Value> = (start..(start + 250).min(from + n))
            .map(|i| {
                json!({"idempotencyKey": format!("{customer}-{i}"), "customerId": customer,
                       "featureId": "ai-tokens", "usage": 1, "dimensions": {"userId": user}})
            })
            .collect();
        let (s, body) = router
            .post("/v1/usage", key, json!({ "events": events }))
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert!(
            body["results"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["status"] == "recorded"),
            "{body}"
        );
    }
}

/// The ids and kinds (`usage`, `gap`) of the first `n` events a customer's usage stream
/// sends after `after`.
async fn stream_head(
    router: &axum::Router,
    customer: &str,
    key: &str,
    after: Option<&str>,
    n: usize,
) -> Vec<(String, String)> {
    use axum::body::Body;
    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;
    let query = after.map_or(String::new(), |a| format!("?after={a}"));
    let req = axum::http::Request::builder()
        .uri(format!("/v1/customers/{customer}/usage/stream{query}"))
        .header("authorization", format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while out.len() < n && Instant::now() < deadline {
        let Ok(Some(Ok(frame))) = tokio::time::timeout(Duration::from_secs(2), body.frame()).await
        else {
            break;
        };
        if let Ok(data) = frame.into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let field = |name: &str| {
                block
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
            };
            if let Some(kind) = field("event:") {
                out.push((field("id:").unwrap_or_default(), kind));
            }
        }
    }
    out
}

/// One tenant's flood of usage events only pushes out its own older ones: the other tenant
/// resumes its stream where it was, with no gap, after far more events than are kept.
#[tokio::test]
async fn a_tenants_event_flood_never_evicts_another_tenants_stream() {
    let (service, router) = router_with("{ timeoutMs: 2000 }").await;
    let kept = tollgate::store::events::StreamRetention::default().max_events;
    ingest(&router, "globex", GLOBEX_KEY, 0, 1).await;
    let head = stream_head(&router, "globex", GLOBEX_KEY, None, 1).await;
    assert_eq!(head.len(), 1);
    assert_eq!(head[0].1, "usage");
    let cursor = head[0].0.clone();
    // One event the follower has not read yet when the other tenant floods, one after.
    ingest(&router, "globex", GLOBEX_KEY, 1, 1).await;
    ingest(&router, "acme", ACME_KEY, 0, kept + 500).await;
    ingest(&router, "globex", GLOBEX_KEY, 2, 1).await;
    let next = stream_head(&router, "globex", GLOBEX_KEY, Some(&cursor), 2).await;
    assert_eq!(
        next.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(),
        ["usage", "usage"],
        "resumed without a gap: {next:?}"
    );
    // The flooding tenant lost its own oldest events, and is told so.
    let acme = stream_head(&router, "acme", ACME_KEY, None, 2).await;
    assert!(!acme.is_empty());
    let _ = service;
}

/// Every decision of a customer evaluates its alert rules: a tenant gets a bounded number of
/// rules, thresholds per rule and webhooks, so its rules cannot slow its own decisions down to
/// where they crowd everyone else's.
#[tokio::test]
async fn alert_rules_thresholds_and_webhooks_have_a_budget_per_tenant() {
    let (_service, router) = router_with("{ timeoutMs: 2000 }").await;
    let rule = |id: &str, thresholds: usize| {
        json!({"id": id, "entity": "acme", "limit": "org-daily",
               "absolute": (1..=thresholds as u64).collect::<Vec<_>>()})
    };
    let post = |body: Value| {
        let router = router.clone();
        async move {
            router
                .post("/v1/customers/acme/alerts", ACME_ADMIN, body)
                .await
        }
    };
    let (s, body) = post(rule("many", 1_000)).await;
    assert!(s.is_client_error(), "{s}");
    assert!(body.to_string().contains("maxThresholdsPerRule"), "{body}");
    let (s, body) = post(rule("ten", 10)).await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    for i in 1..50 {
        let (s, body) = post(rule(&format!("r{i}"), 1)).await;
        assert_eq!(s, StatusCode::CREATED, "rule {i}: {body}");
    }
    let (s, body) = post(rule("one-too-many", 1)).await;
    assert!(s.is_client_error(), "{s}");
    assert!(body.to_string().contains("maxRulesPerCustomer"), "{body}");
    // The other tenant's budget is its own.
    let (s, body) = router
        .post(
            "/v1/customers/globex/alerts",
            GLOBEX_ADMIN,
            json!({"id": "g", "entity": "globex", "limit": "org-daily", "percent": [50]}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    for i in 0..10 {
        let url = format!("https://hooks.example.com/{i}");
        let (s, _) = router
            .post(
                "/v1/customers/acme/webhooks",
                ACME_ADMIN,
                json!({"id": format!("w{i}"), "url": url}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let (s, body) = router
        .post(
            "/v1/customers/acme/webhooks",
            ACME_ADMIN,
            json!({"id": "w10", "url": "https://hooks.example.com/10"}),
        )
        .await;
    assert!(s.is_client_error(), "{s}");
    assert!(
        body.to_string().contains("maxWebhooksPerCustomer"),
        "{body}"
    );
}
