//! End to end through Envoy's own ext_authz filter (no WASM) and the real sidecar: the
//! customer and dimensions from headers, feature and usage from per-route
//! `context_extensions`, grant, denial at the team cap, and both fail modes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use serde_json::json;
use support::{RESEARCH_CAP, Stack, chat_body};

const NATIVE: &str = "native-ext-authz.yaml";
const COMPLETIONS: &str = "/v1/chat/completions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_ext_authz_grants_then_denies_at_the_team_cap() {
    let s = Stack::start(NATIVE);
    let h = [("x-tollgate-customer", "acme"), ("x-user-id", "carol")];
    // Each request holds the route's 256 tokens (no settlement on this path): one fits under
    // research's 300, the second does not.
    let r = s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.header("x-echo-x-tollgate-hold-id").is_some(),
        "{:?}",
        r.headers
    );
    assert!(r.header("ratelimit-remaining").is_some(), "{:?}", r.headers);
    assert_eq!(
        s.usage("acme", json!({"userId": "carol"}), "research-daily")
            .await,
        256
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
    // Bad input from headers: no customer.
    let r = s
        .chat(COMPLETIONS, &[("x-user-id", "carol")], &chat_body(1, 5))
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_ext_authz_fails_closed_or_open_by_route_when_the_sidecar_dies() {
    let mut s = Stack::start(NATIVE);
    let h = [("x-tollgate-customer", "initech"), ("x-team-id", "ops")];
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
