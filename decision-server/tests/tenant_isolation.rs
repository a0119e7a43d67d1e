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

use common::service::{ACME_ADMIN, ACME_KEY, GLOBEX_ADMIN, GLOBEX_KEY, call, config_with};
use common::webhooks::Receiver;

/// The fixture with `alerting` settings `alerting` (YAML flow mapping).
async fn router_with(alerting: &str) -> (Arc<tollgate::service::Service>, axum::Router) {
    let config = format!(
        "alerting: {alerting}\n{}",
        config_with("  logging: { level: warn }\n  storage: { kind: memory }")
    );
    let service = common::service::service_from(&config).await;
    let router = tollgate::api::router(Arc::clone(&service), 65536);
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
    let (s, body) = call(
        router,
        Method::POST,
        &format!("/v1/customers/{customer}/webhooks"),
        admin,
        Some(json!({"id": "ops", "url": url})),
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
        let (s, body) = call(
            &router,
            Method::POST,
            "/v1/customers/acme/webhooks",
            ACME_ADMIN,
            Some(json!({"id": "ops", "url": url})),
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
#[tokio::test]
async fn stored_text_is_bounded_and_clean() {
    let (_service, router) = router_with("{ timeoutMs: 2000 }").await;
    let long = format!("https://hooks.example.com/{}", "a".repeat(900_000));
    let (s, _) = call(
        &router,
        Method::POST,
        "/v1/customers/acme/webhooks",
        ACME_ADMIN,
        Some(json!({"id": "ops", "url": long})),
    )
    .await;
    assert!(s.is_client_error(), "{s}");
    for label in [
        "x".repeat(900_000),
        "nul\u{0}".into(),
        "rtl\u{202e}txt".into(),
    ] {
        let (s, body): (StatusCode, Value) = call(
            &router,
            Method::POST,
            "/v1/customers/acme/keys",
            ACME_ADMIN,
            Some(json!({"role": "viewer", "label": label})),
        )
        .await;
        assert!(s.is_client_error(), "{s}: {body}");
    }
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
            call(
                &router,
                Method::POST,
                "/v1/customers/acme/alerts",
                ACME_ADMIN,
                Some(body),
            )
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
    let (s, body) = call(
        &router,
        Method::POST,
        "/v1/customers/globex/alerts",
        GLOBEX_ADMIN,
        Some(json!({"id": "g", "entity": "globex", "limit": "org-daily", "percent": [50]})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{body}");
    for i in 0..10 {
        let url = format!("https://hooks.example.com/{i}");
        let (s, _) = call(
            &router,
            Method::POST,
            "/v1/customers/acme/webhooks",
            ACME_ADMIN,
            Some(json!({"id": format!("w{i}"), "url": url})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let (s, body) = call(
        &router,
        Method::POST,
        "/v1/customers/acme/webhooks",
        ACME_ADMIN,
        Some(json!({"id": "w10", "url": "https://hooks.example.com/10"})),
    )
    .await;
    assert!(s.is_client_error(), "{s}");
    assert!(
        body.to_string().contains("maxWebhooksPerCustomer"),
        "{body}"
    );
}
