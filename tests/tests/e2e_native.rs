//! End to end through Envoy's own ext_authz filter (no WASM) and the real sidecar: the
//! customer and user from the claims jwt_authn verified, the team from a header, feature and
//! usage from per-route `context_extensions`, the gateway token in the call's metadata; holds
//! settled from Envoy's gRPC access log, denial at the team cap, and both fail modes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::json;
use std::time::Duration;

use support::{INITECH, RESEARCH_CAP, SIDECAR, Stack, caller, chat_body, initech_ops};

const NATIVE: &str = "native-ext-authz.yaml";
const COMPLETIONS: &str = "/v1/chat/completions";

/// [`SIDECAR`] settling the native path's holds from Envoy's access log.
fn settling_sidecar() -> String {
    const USAGE: &str = "    usage: { header: x-tollgate-usage }\n";
    assert!(SIDECAR.contains(USAGE), "the sidecar config changed shape");
    SIDECAR.replace(
        USAGE,
        &format!("{USAGE}    settlement: {{ onMissing: held }}\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_ext_authz_settles_from_envoys_access_log_then_denies_at_the_team_cap() {
    let s = Stack::start_full(NATIVE, &settling_sidecar(), |c| c);
    let carol = caller("acme", Some("carol"));
    let report = ("x-mock-report-usage", "x-tollgate-actual-usage");
    // A client's copies of Tollgate's upstream headers are forged: Envoy drops them.
    let h = [
        ("authorization", carol.as_str()),
        report,
        ("x-tollgate-hold-id", "forged"),
        ("x-tollgate-unchecked", "forged"),
        ("x-tollgate-remaining", "999999"),
    ];
    // The route holds 256 (research's cap is 300); the upstream reports 1 + 5 = 6 in its
    // response header, Envoy's access log brings it to the sidecar, the hold settles at 6
    // long before its five-minute TTL.
    let r = s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    for forged in ["x-echo-x-tollgate-hold-id", "x-echo-x-tollgate-unchecked"] {
        assert!(
            r.header(forged).is_none(),
            "{forged} reached the upstream: {:?}",
            r.headers
        );
    }
    // The real one, from the sidecar's answer, replaces the client's.
    assert_ne!(
        r.header("x-echo-x-tollgate-remaining"),
        Some("999999"),
        "{:?}",
        r.headers
    );
    assert!(
        r.header("x-echo-x-tollgate-remaining").is_some(),
        "{:?}",
        r.headers
    );
    assert_eq!(r.header("x-tollgate-actual-usage"), Some("6"));
    assert!(r.header("ratelimit-remaining").is_some(), "{:?}", r.headers);
    s.usage_settles_at("acme", json!({"userId": "carol"}), "research-daily", 6)
        .await;
    s.holds_closed().await;
    // An upstream that fails and reports nothing: released (`onUpstreamError`, default).
    let failing = [("authorization", carol.as_str()), ("x-mock-status", "500")];
    let r = s.chat(COMPLETIONS, &failing, &chat_body(1, 5)).await;
    assert_eq!(r.status, 500, "{}", r.text);
    s.holds_closed().await;
    assert_eq!(
        s.usage("acme", json!({"userId": "carol"}), "research-daily")
            .await,
        6
    );
    // A success that reports nothing: charged what it held (`onMissing: held`).
    let silent = [("authorization", carol.as_str())];
    let r = s.chat(COMPLETIONS, &silent, &chat_body(1, 5)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.usage_settles_at("acme", json!({"userId": "carol"}), "research-daily", 262)
        .await;
    s.holds_closed().await;
    let m = s.sidecar_metrics().await;
    for (result, n) in [("settled", 1.0), ("released", 1.0), ("held", 1.0)] {
        assert_eq!(
            m.get("tollgate_access_log_reports_total", &[("result", result)]),
            Some(n),
            "{result}"
        );
    }
    // 262 + 256 does not fit under 300.
    let r = s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await;
    assert_eq!(r.status, 429, "{}", r.text);
    let body = r.json();
    assert_eq!(body["entityId"], "research");
    assert_eq!(body["usageLimit"], RESEARCH_CAP);
    for h in [
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "retry-after",
    ] {
        assert!(r.header(h).is_some(), "denial lacks {h}: {:?}", r.headers);
    }
    // A denial holds nothing, so Envoy reports nothing for it.
    let m = s.sidecar_metrics().await;
    assert_eq!(
        m.get(
            "tollgate_access_log_reports_total",
            &[("result", "no_hold")]
        ),
        Some(0.0)
    );
    // A verified token that names no customer: bad input, nothing held.
    let no_org = format!(
        "Bearer {}",
        tollgate_testkit::signed_jwt(
            &json!({"iss": tollgate_testkit::JWT_ISSUER, "sub": "carol"}),
            tollgate_testkit::JWT_KEY
        )
    );
    let r = s
        .chat(
            COMPLETIONS,
            &[
                ("authorization", no_org.as_str()),
                ("x-tollgate-customer", "acme"),
            ],
            &chat_body(1, 5),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("no customer"), "{}", r.text);
    // No token: jwt_authn refuses before any decision.
    let r = s.chat(COMPLETIONS, &[], &chat_body(1, 5)).await;
    assert_eq!(r.status, 401, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_settlement_configured_the_native_path_holds_until_the_ttl_and_a_commit_route_counts_at_once()
 {
    let s = Stack::start(NATIVE);
    let h = [("authorization", INITECH.as_str()), ("x-team-id", "ops")];
    let report = ("x-mock-report-usage", "x-tollgate-actual-usage");
    // The fail-open route commits its fixed price: nothing held.
    let r = s
        .chat(
            "/open/v1/chat/completions",
            &[h[0], h[1], report],
            &chat_body(1, 5),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(initech_ops(&s).await, 256);
    // The settled route without `server.extAuthz.settlement`: the report is read and dropped,
    // the hold stays open at 256 until its TTL.
    let r = s
        .chat(COMPLETIONS, &[h[0], h[1], report], &chat_body(1, 5))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(initech_ops(&s).await, 512);
    let m = s.sidecar_metrics().await;
    assert_eq!(m.get("tollgate_holds_open", &[]), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_ext_authz_fails_closed_or_open_by_route_when_the_sidecar_dies() {
    let mut s = Stack::start(NATIVE);
    let h = [("authorization", INITECH.as_str()), ("x-team-id", "ops")];
    assert_eq!(s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await.status, 200);
    s.sidecar.proc.signal("KILL").unwrap();
    s.sidecar.proc.kill();
    let r = s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await;
    assert_eq!(r.status, 503, "{}", r.text);
    let r = s
        .chat("/open/v1/chat/completions", &h, &chat_body(1, 5))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.header("x-echo-x-envoy-auth-failure-mode-allowed"),
        Some("true"),
        "the upstream did not see the request marked: {:?}",
        r.headers
    );
}
