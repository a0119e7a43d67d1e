//! End to end through Envoy's own ext_authz filter (no WASM) and the real sidecar: the
//! customer and user from the claims jwt_authn verified, the team from a header, feature and
//! usage from per-route `context_extensions`, the gateway token in the call's metadata; grant,
//! denial at the team cap, and both fail modes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::json;
use support::{INITECH, RESEARCH_CAP, Stack, caller, chat_body};

const NATIVE: &str = "native-ext-authz.yaml";
const COMPLETIONS: &str = "/v1/chat/completions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_ext_authz_grants_then_denies_at_the_team_cap() {
    let s = Stack::start(NATIVE);
    let carol = caller("acme", Some("carol"));
    let h = [("authorization", carol.as_str())];
    // Each request commits the route's 256 tokens at the grant (`tollgate.commit`: nothing
    // settles on this path): one fits under research's 300, the second does not.
    let r = s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.header("x-echo-x-tollgate-hold-id").is_none(),
        "the hold id goes upstream only when asked for: {:?}",
        r.headers
    );
    assert!(r.header("ratelimit-remaining").is_some(), "{:?}", r.headers);
    assert_eq!(
        s.usage("acme", json!({"userId": "carol"}), "research-daily")
            .await,
        256
    );
    let m = s.sidecar_metrics().await;
    assert_eq!(
        m.get("tollgate_holds_open", &[]),
        Some(0.0),
        "a commit holds nothing"
    );
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
