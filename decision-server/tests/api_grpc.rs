//! The gRPC services in process: Envoy's ext_authz `Check` (grant, denial body and headers,
//! bad input both ways) and `tollgate.v1` (check, settle, release, ingest, watch, credentials).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest, Request as AttrRequest,
};
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tollgate::grpc::generated::tollgate_server::Tollgate;
use tollgate::grpc::{ExtAuthzService, TollgateService};
use tollgate::service::Service;
use tollgate_proto::v1 as pb;
use tonic::{Code, Request};

use common::service::{
    ACME_GATEWAY, ACME_KEY, ACME_ORG_CAP, GATEWAY, GLOBEX_KEY, OPERATOR, org_counted,
};

fn authz_request(headers: &[(&str, &str)], extensions: &[(&str, &str)]) -> Request<CheckRequest> {
    let to_map = |kv: &[(&str, &str)]| -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    Request::new(CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    headers: to_map(headers),
                    ..HttpRequest::default()
                }),
                ..AttrRequest::default()
            }),
            context_extensions: to_map(extensions),
            ..AttributeContext::default()
        }),
    })
}

fn headers_of(
    list: &[envoy_types::ext_authz::v3::pb::HeaderValueOption],
) -> HashMap<String, String> {
    list.iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect()
}

/// An ext_authz `Check` as Envoy sends it, with the gateway token.
async fn authz(
    service: &Arc<Service>,
    headers: &[(&str, &str)],
    ext: &[(&str, &str)],
) -> CheckResponse {
    authz_as(service, Some(GATEWAY), headers, ext)
        .await
        .unwrap()
        .into_inner()
}

async fn authz_as(
    service: &Arc<Service>,
    token: Option<&str>,
    headers: &[(&str, &str)],
    ext: &[(&str, &str)],
) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
    let mut request = authz_request(headers, ext);
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    ExtAuthzService::new(Arc::clone(service))
        .check(request)
        .await
}

#[tokio::test]
async fn ext_authz_needs_a_credential_that_reaches_the_customer() {
    let service = common::service::service().await;
    let ext = [
        ("tollgate.customer", "globex"),
        ("tollgate.feature", "ai-tokens"),
        ("tollgate.usage", "10"),
    ];
    for (token, code) in [
        (None, Code::Unauthenticated),
        (Some("envoy.wrong-secret"), Code::Unauthenticated),
        (Some("not-even-a-key"), Code::Unauthenticated),
        (Some(ACME_KEY), Code::PermissionDenied),
        (Some(ACME_GATEWAY), Code::PermissionDenied),
    ] {
        let err = authz_as(&service, token, &[], &ext).await.unwrap_err();
        assert_eq!(err.code(), code, "{token:?}: {err:?}");
    }
    assert_eq!(org_counted(&service, "globex").await, 0, "nothing was held");
    // The customer's own key, the operator and the gateway token reach it.
    for token in [GLOBEX_KEY, OPERATOR, GATEWAY] {
        let r = authz_as(&service, Some(token), &[], &ext)
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status.unwrap().code, Code::Ok as i32, "{token}");
    }
    assert_eq!(org_counted(&service, "globex").await, 30);
    // A gateway token is for the ext_authz listener only: the API listener refuses it, and
    // on the ext_authz listener it decides and closes holds, nothing else.
    let (api, _tx) = tollgate(&service);
    let err = api
        .check(authed(check_msg("acme", "alice", 1), GATEWAY))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("ext_authz listener only"), "{err:?}");
    // On the ext_authz listener a gateway also reports usage it let through while the
    // sidecar was unreachable, for the customers it reaches only.
    let (rx_tx, rx) = watch::channel(false);
    let local = TollgateService::ext_authz(Arc::clone(&service), rx);
    let event = |customer: &str| pb::UsageRecord {
        idempotency_key: format!("bounded:{customer}-1"),
        customer_id: customer.into(),
        feature_id: "ai-tokens".into(),
        usage: 5,
        dimensions: [("userId".to_string(), "alice".to_string())].into(),
        tokens: None,
    };
    local
        .ingest_usage(authed(
            pb::IngestUsageRequest {
                events: vec![event("acme")],
            },
            GATEWAY,
        ))
        .await
        .unwrap();
    let err = local
        .ingest_usage(authed(
            pb::IngestUsageRequest {
                events: vec![event("globex")],
            },
            ACME_GATEWAY,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    drop(rx_tx);
}

#[tokio::test]
async fn ext_authz_grant_returns_ok_with_hold_for_the_filter_and_upstream() {
    let service = common::service::service().await;
    let r = authz(
        &service,
        &[
            ("x-tollgate-customer", "acme"),
            ("x-tollgate-feature", "ai-tokens"),
            ("x-tollgate-usage", "40"),
            ("x-user-id", "alice"),
        ],
        &[],
    )
    .await;
    assert_eq!(r.status.unwrap().code, Code::Ok as i32);
    let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
        panic!("not an OK response")
    };
    let upstream = headers_of(&ok.headers);
    assert!(
        !upstream.contains_key("x-tollgate-hold-id"),
        "the hold id goes upstream only when asked for: {upstream:?}"
    );
    assert_eq!(
        upstream["x-tollgate-remaining"],
        (ACME_ORG_CAP - 40).to_string()
    );
    let client = headers_of(&ok.response_headers_to_add);
    assert_eq!(client["ratelimit-limit"], ACME_ORG_CAP.to_string());
    assert!(client.contains_key("ratelimit-reset"));
    let meta = r.dynamic_metadata.unwrap();
    let hold = format!("{:?}", meta.fields["holdId"]);
    assert!(hold.contains("acme:1:"), "{hold}");
    // Asked for, it goes upstream too.
    let service = common::service::service_from(
        &common::service::config()
            .replace("  extAuthz:\n", "  extAuthz:\n    upstreamHoldId: true\n"),
    )
    .await;
    let r = authz(
        &service,
        &[
            ("x-tollgate-customer", "acme"),
            ("x-tollgate-feature", "ai-tokens"),
            ("x-tollgate-usage", "40"),
        ],
        &[],
    )
    .await;
    let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
        panic!("not an OK response")
    };
    let hold = &headers_of(&ok.headers)["x-tollgate-hold-id"];
    assert!(
        hold.starts_with("acme:1:") && hold.len() == "acme:1:".len() + 32,
        "{hold}"
    );
    assert_eq!(org_counted(&service, "acme").await, 40);
}

#[tokio::test]
async fn ext_authz_context_extensions_carry_the_request_without_headers() {
    let service = common::service::service().await;
    let ext = [
        ("tollgate.customer", "acme"),
        ("tollgate.feature", "ai-tokens"),
        ("tollgate.usage", "5"),
        ("tollgate.dim.userId", "carol"),
    ];
    let r = authz(&service, &[], &ext).await;
    assert_eq!(r.status.unwrap().code, 0);
    assert_eq!(org_counted(&service, "acme").await, 5);
    assert_eq!(
        service
            .counted("acme", "web", "team-daily", None)
            .await
            .unwrap(),
        Some(5)
    );
}

/// A route that sets `tollgate.commit: "true"` (as a per-route context extension in Envoy)
/// counts each grant at once: no hold id for anyone, nothing open to expire; any other value
/// is bad input, not a silent hold.
#[tokio::test]
async fn ext_authz_commit_counts_at_once_with_no_hold() {
    let service = common::service::service().await;
    let ext = [
        ("tollgate.customer", "acme"),
        ("tollgate.feature", "ai-tokens"),
        ("tollgate.usage", "7"),
        ("tollgate.dim.userId", "carol"),
        ("tollgate.commit", "true"),
    ];
    for _ in 0..3 {
        let r = authz(&service, &[], &ext).await;
        assert_eq!(r.status.unwrap().code, Code::Ok as i32);
        let meta = r.dynamic_metadata.unwrap_or_default();
        assert!(!meta.fields.contains_key("holdId"), "{meta:?}");
    }
    assert_eq!(org_counted(&service, "acme").await, 21);
    assert_eq!(service.store_stats().holds_open, 0);
    let mut bad = ext;
    bad[4] = ("tollgate.commit", "yes");
    let r = authz(&service, &[], &bad).await;
    assert_ne!(r.status.unwrap().code, Code::Ok as i32);
    assert_eq!(org_counted(&service, "acme").await, 21);
}

#[tokio::test]
async fn ext_authz_denial_carries_status_json_body_and_rate_limit_headers() {
    let service = common::service::service().await;
    let h = |usage: &'static str| {
        [
            ("x-tollgate-customer", "acme"),
            ("x-tollgate-feature", "ai-tokens"),
            ("x-tollgate-usage", usage),
            ("x-user-id", "bob"),
        ]
    };
    authz(&service, &h("990"), &[]).await;
    let r = authz(&service, &h("20"), &[]).await;
    assert_eq!(
        r.status.as_ref().unwrap().code,
        Code::PermissionDenied as i32
    );
    let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
        panic!("not a denial")
    };
    assert_eq!(d.status.unwrap().code, 429);
    let headers = headers_of(&d.headers);
    assert_eq!(headers["ratelimit-limit"], ACME_ORG_CAP.to_string());
    assert_eq!(headers["ratelimit-remaining"], "10");
    let reset: u64 = headers["ratelimit-reset"].parse().unwrap();
    let retry: u64 = headers["retry-after"].parse().unwrap();
    assert!(
        reset > 0 && reset <= 86_400 && retry == reset,
        "{reset} {retry}"
    );
    assert_eq!(headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
    assert_eq!(body["error"], "usage_limit_exceeded");
    assert_eq!(body["limitId"], "org-daily");
    assert_eq!(body["entityId"], "acme");
    assert_eq!(body["entityType"], "organization");
    assert_eq!(body["level"], 2);
    assert_eq!(org_counted(&service, "acme").await, 990);
}

#[tokio::test]
async fn ext_authz_bad_input_denies_with_reason_or_passes_marked_as_configured() {
    let service = common::service::service().await;
    let cases: [(&[(&str, &str)], &str); 4] = [
        (&[("x-tollgate-usage", "1")], "no customer"),
        (
            &[
                ("x-tollgate-customer", "acme"),
                ("x-tollgate-feature", "ai-tokens"),
                ("x-tollgate-usage", "ten"),
                ("x-user-id", "alice"),
            ],
            "`ten` is not a whole number",
        ),
        (
            &[
                ("x-tollgate-customer", "acme"),
                ("x-tollgate-feature", "nope"),
                ("x-tollgate-usage", "1"),
                ("x-user-id", "alice"),
            ],
            "nope",
        ),
        (
            &[
                ("x-tollgate-customer", "acme"),
                ("x-tollgate-feature", "ai-tokens"),
                ("x-user-id", "alice"),
            ],
            "no requested usage",
        ),
    ];
    for (headers, reason) in cases {
        let r = authz(&service, headers, &[]).await;
        let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
            panic!("{reason}: not denied")
        };
        assert_eq!(d.status.unwrap().code, 400, "{reason}");
        let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
        assert_eq!(body["error"], "bad_request");
        assert!(
            body["message"].as_str().unwrap().contains(reason),
            "{reason}: {body}"
        );
    }
    assert_eq!(org_counted(&service, "acme").await, 0);
    assert_eq!(service.store_stats().holds_open, 0);

    let allow = common::service::config().replace(
        "  extAuthz:\n",
        "  extAuthz:\n    onBadInput: allow\n    badInputStatus: 422\n",
    );
    let service = common::service::service_from(&allow).await;
    let r = authz(&service, &[("x-tollgate-usage", "1")], &[]).await;
    assert_eq!(r.status.unwrap().code, 0);
    let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
        panic!("not allowed")
    };
    assert_eq!(headers_of(&ok.headers)["x-tollgate-unchecked"], "bad-input");
    assert_eq!(org_counted(&service, "acme").await, 0);
}

/// Istio's own ext_authz filter: no token, only the gateway's identity in the
/// `x-forwarded-client-cert` the decision server's pod proxy wrote, and the caller's own bearer
/// JWT among the request's headers, which the decision server verifies itself.
#[tokio::test]
async fn a_mesh_peer_with_the_callers_verified_jwt_is_checked_and_anything_less_is_not() {
    const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway";
    let issuer = "https://auth.example.com";
    let config = common::service::config()
        .replace(
            "    gatewayTokens:\n",
            &format!("    meshPeers:\n      - {{ spiffeId: \"{GATEWAY_ID}\" }}\n    gatewayTokens:\n"),
        )
        .replace(
            "  extAuthz:\n    customer: { header: x-tollgate-customer }\n    dimensions:\n      userId: { header: x-user-id }\n",
            &format!(
                "  extAuthz:\n    bearerJwt: {{ issuer: \"{issuer}\", jwks: {} }}\n    badInputStatus: 401\n    customer: {{ jwtClaim: org }}\n    feature: {{ constant: ai-tokens }}\n    usage: {{ constant: \"100\" }}\n    dimensions:\n      userId: {{ jwtClaim: sub }}\n",
                tollgate_testkit::jwks()
            ),
        );
    assert!(config.contains("meshPeers") && config.contains("bearerJwt"));
    let service = common::service::service_from(&config).await;
    let jwt = |claims: serde_json::Value, key: &[u8]| {
        format!("Bearer {}", tollgate_testkit::signed_jwt(&claims, key))
    };
    let alice = jwt(
        serde_json::json!({"iss": issuer, "org": "acme", "sub": "alice"}),
        tollgate_testkit::JWT_KEY,
    );
    let check = |xfcc: Option<String>, bearer: Option<String>| {
        let service = Arc::clone(&service);
        async move {
            let headers: Vec<(&str, &str)> = bearer
                .as_deref()
                .map(|b| vec![("authorization", b)])
                .unwrap_or_default();
            let mut request = authz_request(&headers, &[]);
            if let Some(x) = xfcc {
                request
                    .metadata_mut()
                    .insert("x-forwarded-client-cert", x.parse().unwrap());
            }
            ExtAuthzService::new(service).check(request).await
        }
    };
    let own = format!(
        "By=spiffe://cluster.local/ns/tollgate/sa/tollgate;Hash=00ff;Subject=\"\";URI={GATEWAY_ID}"
    );
    // The gateway's identity and a caller's valid token: checked, charged to the token's org.
    let r = check(Some(own.clone()), Some(alice.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.unwrap().code, Code::Ok as i32);
    assert_eq!(org_counted(&service, "acme").await, 100);
    // No credential, another workload's identity, or the gateway's id in an element the caller
    // wrote (not the last): refused before anything is read.
    for xfcc in [
        None,
        Some("By=x;URI=spiffe://cluster.local/ns/apps/sa/default".to_string()),
        Some(format!(
            "URI={GATEWAY_ID},By=x;URI=spiffe://cluster.local/ns/apps/sa/default"
        )),
    ] {
        let err = check(xfcc.clone(), Some(alice.clone())).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{xfcc:?}: {err:?}");
    }
    // The gateway's identity with no token, a token signed by someone else, or one of another
    // issuer: refused with 401 and charged to nobody, whatever the token claims.
    let forged = jwt(
        serde_json::json!({"iss": issuer, "org": "globex", "sub": "dave"}),
        b"not the identity provider's key",
    );
    let foreign = jwt(
        serde_json::json!({"iss": "https://evil.example", "org": "globex"}),
        tollgate_testkit::JWT_KEY,
    );
    for (bearer, reason) in [
        (None, "no `authorization` header"),
        (Some(forged), "InvalidSignature"),
        (Some(foreign), "InvalidIssuer"),
    ] {
        let r = check(Some(own.clone()), bearer).await.unwrap().into_inner();
        let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
            panic!("{reason}: not denied")
        };
        assert_eq!(d.status.unwrap().code, 401, "{reason}");
        assert!(d.body.contains(reason), "{reason}: {}", d.body);
    }
    assert_eq!(org_counted(&service, "globex").await, 0);
    assert_eq!(org_counted(&service, "acme").await, 100);
}

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn tollgate(service: &Arc<Service>) -> (TollgateService, watch::Sender<bool>) {
    let (tx, rx) = watch::channel(false);
    (TollgateService::new(Arc::clone(service), rx), tx)
}

fn check_msg(customer: &str, user: &str, usage: u64) -> pb::CheckRequest {
    pb::CheckRequest {
        customer_id: customer.into(),
        feature_id: "ai-tokens".into(),
        requested_usage: usage,
        dimensions: [("userId".to_string(), user.to_string())].into(),
        ..pb::CheckRequest::default()
    }
}

#[tokio::test]
async fn tollgate_check_settle_release_round_trip() {
    let service = common::service::service().await;
    let (svc, _tx) = tollgate(&service);
    let r = svc
        .check(authed(check_msg("acme", "alice", 300), ACME_KEY))
        .await
        .unwrap()
        .into_inner();
    assert!(r.is_granted);
    assert_eq!(r.chain.len(), 3);
    assert_eq!(r.chain[2].limit_id, "org-daily");
    let settle = |hold: &str, actual| {
        authed(
            pb::SettleRequest {
                hold_id: hold.into(),
                actual_usage: actual,
                ..pb::SettleRequest::default()
            },
            ACME_KEY,
        )
    };
    let s = svc
        .settle(settle(&r.hold_id, 100))
        .await
        .unwrap()
        .into_inner();
    assert!(s.closed);
    assert_eq!(org_counted(&service, "acme").await, 100);
    let s = svc
        .settle(settle(&r.hold_id, 999))
        .await
        .unwrap()
        .into_inner();
    assert!(!s.closed, "idempotent");
    assert_eq!(org_counted(&service, "acme").await, 100);

    let r2 = svc
        .check(authed(check_msg("acme", "bob", 200), OPERATOR))
        .await
        .unwrap()
        .into_inner();
    let rel = svc
        .release(authed(
            pb::ReleaseRequest {
                hold_id: r2.hold_id.clone(),
            },
            OPERATOR,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(rel.closed);
    assert_eq!(org_counted(&service, "acme").await, 100);

    let denied = svc
        .check(authed(check_msg("acme", "bob", 901), ACME_KEY))
        .await
        .unwrap()
        .into_inner();
    assert!(!denied.is_granted);
    assert!(denied.access_denied_reason.contains("org-daily"));
    assert!(denied.retry_at_ms > 0);

    let missing = svc
        .settle(settle("acme:424242:0123456789abcdef0123456789abcdef", 1))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let garbage = svc.settle(settle("garbage", 1)).await.unwrap_err();
    assert_eq!(garbage.code(), Code::InvalidArgument);
    let bad = svc
        .check(authed(check_msg("acme", "mallory", 1), ACME_KEY))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn tollgate_ingest_skips_duplicate_keys() {
    let service = common::service::service().await;
    let (svc, _tx) = tollgate(&service);
    let event = |key: &str| pb::UsageRecord {
        idempotency_key: key.into(),
        customer_id: "acme".into(),
        feature_id: "ai-tokens".into(),
        usage: 30,
        dimensions: [("userId".to_string(), "alice".to_string())].into(),
        tokens: None,
    };
    let r = svc
        .ingest_usage(authed(
            pb::IngestUsageRequest {
                events: vec![event("k1"), event("k1"), event("")],
            },
            ACME_KEY,
        ))
        .await
        .unwrap()
        .into_inner();
    let statuses: Vec<_> = r.results.iter().map(|r| r.status()).collect();
    use pb::ingest_result::Status as S;
    assert_eq!(statuses, [S::Recorded, S::Duplicate, S::Rejected]);
    assert!(r.results[2].error.contains("idempotencyKey"));
    assert_eq!(org_counted(&service, "acme").await, 30);

    // The batch cap is the service's, so gRPC refuses the batch HTTP refuses: whole, unrecorded.
    let too_many = svc
        .ingest_usage(authed(
            pb::IngestUsageRequest {
                events: (0..1001).map(|i| event(&format!("big-{i}"))).collect(),
            },
            ACME_KEY,
        ))
        .await
        .unwrap_err();
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert!(too_many.message().contains("at most 1000"), "{too_many:?}");
    assert_eq!(org_counted(&service, "acme").await, 30);
}

#[tokio::test]
async fn tollgate_credentials_and_cross_customer_refusals() {
    let service = common::service::service().await;
    let (svc, _tx) = tollgate(&service);
    let no_auth = svc
        .check(Request::new(check_msg("acme", "alice", 1)))
        .await
        .unwrap_err();
    assert_eq!(no_auth.code(), Code::Unauthenticated);
    let wrong = svc
        .check(authed(check_msg("acme", "alice", 1), "nope"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let cross = svc
        .check(authed(check_msg("acme", "alice", 1), GLOBEX_KEY))
        .await
        .unwrap_err();
    assert_eq!(cross.code(), Code::PermissionDenied);
    let hold = svc
        .check(authed(check_msg("acme", "alice", 10), ACME_KEY))
        .await
        .unwrap()
        .into_inner()
        .hold_id;
    let cross = svc
        .settle(authed(
            pb::SettleRequest {
                hold_id: hold.clone(),
                actual_usage: 0,
                ..pb::SettleRequest::default()
            },
            GLOBEX_KEY,
        ))
        .await
        .unwrap_err();
    assert_eq!(cross.code(), Code::PermissionDenied);
    let cross = svc
        .release(authed(pb::ReleaseRequest { hold_id: hold }, GLOBEX_KEY))
        .await
        .unwrap_err();
    assert_eq!(cross.code(), Code::PermissionDenied);
    let cross = svc
        .ingest_usage(authed(
            pb::IngestUsageRequest {
                events: vec![pb::UsageRecord {
                    idempotency_key: "x".into(),
                    customer_id: "acme".into(),
                    feature_id: "ai-tokens".into(),
                    usage: 5,
                    ..Default::default()
                }],
            },
            GLOBEX_KEY,
        ))
        .await
        .unwrap_err();
    assert_eq!(cross.code(), Code::PermissionDenied);
    let cross = svc
        .watch_usage(authed(
            pb::WatchUsageRequest {
                customer_id: "acme".into(),
                ..pb::WatchUsageRequest::default()
            },
            GLOBEX_KEY,
        ))
        .await
        .err()
        .unwrap();
    assert_eq!(cross.code(), Code::PermissionDenied);
    let all = svc
        .watch_usage(authed(
            pb::WatchUsageRequest {
                customer_id: String::new(),
                ..pb::WatchUsageRequest::default()
            },
            GLOBEX_KEY,
        ))
        .await
        .err()
        .unwrap();
    assert_eq!(all.code(), Code::InvalidArgument);
    assert_eq!(org_counted(&service, "acme").await, 10);
}

#[tokio::test]
async fn watch_usage_streams_a_customers_decisions_and_settlements() {
    let service = common::service::service().await;
    let (svc, shutdown) = tollgate(&service);
    let mut stream = svc
        .watch_usage(authed(
            pb::WatchUsageRequest {
                customer_id: "acme".into(),
                ..pb::WatchUsageRequest::default()
            },
            ACME_KEY,
        ))
        .await
        .unwrap()
        .into_inner();
    let hold = svc
        .check(authed(check_msg("acme", "alice", 700), OPERATOR))
        .await
        .unwrap()
        .into_inner()
        .hold_id;
    svc.check(authed(check_msg("globex", "dave", 1), OPERATOR))
        .await
        .unwrap();
    svc.check(authed(check_msg("acme", "bob", 700), OPERATOR))
        .await
        .unwrap();
    svc.settle(authed(
        pb::SettleRequest {
            hold_id: hold.clone(),
            actual_usage: 650,
            ..pb::SettleRequest::default()
        },
        OPERATOR,
    ))
    .await
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let e = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        got.push(e);
    }
    use pb::usage_event::Kind;
    assert_eq!(
        got.iter().map(|e| e.kind()).collect::<Vec<_>>(),
        [Kind::Granted, Kind::Denied, Kind::Settled]
    );
    assert!(
        got.iter().all(|e| e.customer_id == "acme"),
        "globex's event is filtered out"
    );
    assert_eq!(got[0].hold_id, hold);
    assert_eq!(got[0].dimensions["userId"], "alice");
    assert_eq!(got[1].limit_id, "org-daily");
    assert_eq!(got[2].usage, 650);
    // Shutdown ends the stream, so a draining server is not held open by watchers.
    shutdown.send(true).unwrap();
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
        .await
        .unwrap();
    assert!(end.is_none());
}

#[tokio::test]
async fn close_holds_settles_and_releases_many_with_a_result_each() {
    use pb::hold_close_result::Status as S;
    let service = common::service::service().await;
    let (svc, _tx) = tollgate(&service);
    let mut holds = Vec::new();
    for (user, usage) in [("alice", 100), ("bob", 200), ("alice", 50)] {
        let r = svc
            .check(authed(check_msg("acme", user, usage), OPERATOR))
            .await
            .unwrap()
            .into_inner();
        assert!(r.is_granted);
        holds.push(r.hold_id);
    }
    let globex = svc
        .check(authed(check_msg("globex", "dave", 10), OPERATOR))
        .await
        .unwrap()
        .into_inner()
        .hold_id;
    let close = |id: &str, actual: Option<u64>| pb::HoldClose {
        hold_id: id.into(),
        actual_usage: actual,
        ..Default::default()
    };
    let request = pb::CloseHoldsRequest {
        holds: vec![
            close(&holds[0], Some(40)),
            close(&holds[1], None),
            close(&holds[0], Some(999)),
            close("acme:999999:0123456789abcdef0123456789abcdef", Some(1)),
            close("not a hold", None),
            close(&globex, Some(1)),
            close(&holds[2], Some(50)),
        ],
    };
    let results = svc
        .close_holds(authed(request.clone(), ACME_KEY))
        .await
        .unwrap()
        .into_inner()
        .results;
    let statuses: Vec<S> = results.iter().map(|r| r.status()).collect();
    assert_eq!(
        statuses,
        [
            S::Closed,
            S::Closed,
            S::AlreadyClosed,
            S::Rejected,
            S::Rejected,
            S::Rejected,
            S::Closed
        ]
    );
    assert!(results[5].message.contains("globex"), "{:?}", results[5]);
    // 40 settled + 50 settled; bob's 200 released; the second settle changed nothing.
    assert_eq!(org_counted(&service, "acme").await, 90);

    // No listener closes holds without credentials; on the ext_authz listener the gateway
    // token closes them, and a customer key only its own customer's.
    let err = svc
        .close_holds(Request::new(request.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let (rx_tx, rx) = watch::channel(false);
    let local = TollgateService::ext_authz(Arc::clone(&service), rx);
    let err = local
        .close_holds(Request::new(pb::CloseHoldsRequest {
            holds: vec![close(&globex, Some(0))],
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let results = local
        .close_holds(authed(
            pb::CloseHoldsRequest {
                holds: vec![close(&globex, Some(0))],
            },
            ACME_KEY,
        ))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(
        results[0].status(),
        S::Rejected,
        "acme's key, globex's hold"
    );
    // Enumerating globex's hold numbers reaches nothing: an id needs the hold's tag.
    let guesses = pb::CloseHoldsRequest {
        holds: (1..=800)
            .map(|n| close(&format!("globex:{n}"), Some(0)))
            .chain((1..=200).map(|n| close(&format!("globex:{n}:{:032x}", n * 7919), Some(0))))
            .collect(),
    };
    let results = local
        .close_holds(authed(guesses, GATEWAY))
        .await
        .unwrap()
        .into_inner()
        .results;
    // Ids without a tag are refused; with a wrong tag they name no open hold (answered like a
    // closed one): nothing is closed either way.
    assert!(
        results.iter().all(|r| r.status() != S::Closed),
        "{:?}",
        results.iter().find(|r| r.status() == S::Closed)
    );
    assert_eq!(
        org_counted(&service, "globex").await,
        10,
        "globex's hold is still open"
    );
    let results = local
        .close_holds(authed(
            pb::CloseHoldsRequest {
                holds: vec![close(&globex, Some(7))],
            },
            GATEWAY,
        ))
        .await
        .unwrap()
        .into_inner()
        .results;
    assert_eq!(results[0].status(), S::Closed);
    assert_eq!(org_counted(&service, "globex").await, 7);
    drop(rx_tx);

    let too_many = pb::CloseHoldsRequest {
        holds: (0..1001).map(|_| close("acme:1", None)).collect(),
    };
    let err = svc
        .close_holds(authed(too_many, OPERATOR))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn resumable_watch_usage_streams_records_with_ids_and_resumes() {
    let service = common::service::service().await;
    let (svc, shutdown) = tollgate(&service);
    let watch = |after: &str| {
        authed(
            pb::WatchUsageRequest {
                customer_id: "acme".into(),
                resumable: true,
                after: after.into(),
            },
            ACME_KEY,
        )
    };
    let mut stream = svc.watch_usage(watch("")).await.unwrap().into_inner();
    let hold = svc
        .check(authed(check_msg("acme", "alice", 700), OPERATOR))
        .await
        .unwrap()
        .into_inner()
        .hold_id;
    svc.check(authed(check_msg("acme", "bob", 700), OPERATOR))
        .await
        .unwrap();
    svc.settle(authed(
        pb::SettleRequest {
            hold_id: hold.clone(),
            actual_usage: 650,
            ..pb::SettleRequest::default()
        },
        OPERATOR,
    ))
    .await
    .unwrap();
    use pb::usage_event::Kind;
    let denied = next(&mut stream).await;
    let settled = next(&mut stream).await;
    assert_eq!(
        (denied.kind(), settled.kind()),
        (Kind::Denied, Kind::Settled)
    );
    assert_eq!(denied.limit_id, "org-daily");
    assert_eq!(denied.attributes["userId"], "bob");
    assert_eq!(
        (settled.usage, settled.hold_id.as_str()),
        (650, hold.as_str())
    );
    assert_eq!(settled.attributes["teamId"], "ml");
    assert!(!denied.event_id.is_empty() && denied.event_id != settled.event_id);
    // Resuming after the denial gets the settlement, and nothing twice.
    let mut resumed = svc
        .watch_usage(watch(&denied.event_id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut resumed).await.event_id, settled.event_id);
    // A streamed call cut when its next slice was refused says so on its record, by limit.
    let cut = svc
        .check(authed(check_msg("acme", "alice", 10), OPERATOR))
        .await
        .unwrap()
        .into_inner()
        .hold_id;
    svc.settle(authed(
        pb::SettleRequest {
            hold_id: cut.clone(),
            actual_usage: 7,
            stream_end: Some(pb::StreamEnd {
                how: pb::stream_end::How::Cut as i32,
                by: "org-daily".into(),
            }),
            ..pb::SettleRequest::default()
        },
        OPERATOR,
    ))
    .await
    .unwrap();
    let e = next(&mut stream).await;
    assert_eq!(
        (
            e.kind(),
            e.hold_id.as_str(),
            e.attributes.get("cutBy").map(String::as_str)
        ),
        (Kind::Settled, cut.as_str(), Some("org-daily"))
    );
    // A bad cursor and a foreign customer are refused.
    let Err(bad) = svc.watch_usage(watch("not-an-id")).await else {
        panic!("a bad cursor was accepted");
    };
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let Err(foreign) = svc
        .watch_usage(authed(
            pb::WatchUsageRequest {
                customer_id: "acme".into(),
                resumable: true,
                after: String::new(),
            },
            GLOBEX_KEY,
        ))
        .await
    else {
        panic!("another customer's key was accepted");
    };
    assert_eq!(foreign.code(), tonic::Code::PermissionDenied);
    shutdown.send(true).unwrap();
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
        .await
        .unwrap();
    assert!(end.is_none());
}

type EventStream = <TollgateService as Tollgate>::WatchUsageStream;

/// The next event of a watch, within 5 s.
async fn next(s: &mut EventStream) -> pb::UsageEvent {
    tokio::time::timeout(std::time::Duration::from_secs(5), s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

/// `tollgate.extends` (a stream's next slice) is for the gateway's streams: a customer's own
/// key cannot use it to hold around its concurrency limit, nor may a slice name another
/// customer's hold or be a commit.
#[tokio::test]
async fn only_the_gateway_extends_a_streams_hold_and_only_its_customers_own() {
    let service = common::service::service().await;
    let slice = |parent: &'static str| {
        [
            ("tollgate.customer", "globex"),
            ("tollgate.feature", "ai-tokens"),
            ("tollgate.usage", "10"),
            ("tollgate.extends", parent),
        ]
    };
    let own = "globex:1:0123456789abcdef0123456789abcdef";
    let err = authz_as(&service, Some(GLOBEX_KEY), &[], &slice(own))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("tollgate.extends"), "{err:?}");
    assert_eq!(org_counted(&service, "globex").await, 0, "nothing was held");
    let r = authz(&service, &[], &slice(own)).await;
    assert_eq!(r.status.unwrap().code, Code::Ok as i32);
    assert_eq!(org_counted(&service, "globex").await, 10);
    // Another customer's hold, a malformed id, a commit: bad input, nothing held.
    for (parent, says) in [
        (
            "acme:1:0123456789abcdef0123456789abcdef",
            "another customer",
        ),
        ("globex:x", "not a hold id"),
    ] {
        let r = authz(&service, &[], &slice(parent)).await;
        assert_ne!(r.status.as_ref().unwrap().code, Code::Ok as i32, "{parent}");
        assert!(format!("{r:?}").contains(says), "{parent}: {r:?}");
    }
    let mut commit = slice(own).to_vec();
    commit.push(("tollgate.commit", "true"));
    let r = authz(&service, &[], &commit).await;
    assert!(format!("{r:?}").contains("a slice is always held"), "{r:?}");
    assert_eq!(org_counted(&service, "globex").await, 10);

    // A stream's first hold with its budget: the gateway's only, a number, never on a slice.
    let start = |budget: &'static str| {
        [
            ("tollgate.customer", "globex"),
            ("tollgate.feature", "ai-tokens"),
            ("tollgate.usage", "10"),
            ("tollgate.budget", budget),
        ]
    };
    let err = authz_as(&service, Some(GLOBEX_KEY), &[], &start("4000"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("tollgate.budget"), "{err:?}");
    let r = authz(&service, &[], &start("4000")).await;
    assert_eq!(r.status.unwrap().code, Code::Ok as i32);
    assert_eq!(org_counted(&service, "globex").await, 20);
    let r = authz(&service, &[], &start("lots")).await;
    assert!(
        format!("{r:?}").contains("a whole number of units"),
        "{r:?}"
    );
    let mut both = slice(own).to_vec();
    both.push(("tollgate.budget", "4000"));
    let r = authz(&service, &[], &both).await;
    assert!(
        format!("{r:?}").contains("for a stream's first hold"),
        "{r:?}"
    );
    assert_eq!(org_counted(&service, "globex").await, 20);
}
