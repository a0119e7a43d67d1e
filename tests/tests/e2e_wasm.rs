//! End to end through real Envoy with the release WASM filter, the real sidecar binary and the
//! mock OpenAI upstream, all on loopback: decisions, the hierarchy, racing agents, settlement,
//! fail modes (sidecar killed, hung, its Redis down, missing HTTP/2, unknown cluster) and
//! malformed input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{GLOBEX, INITECH, RESEARCH_CAP, Stack, caller, chat_body, hold_for, true_usage};

const FILTER: &str = "wasm-filter.yaml";
const COMPLETIONS: &str = "/v1/chat/completions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_then_denies_at_the_team_cap_though_the_user_has_budget() {
    let s = Stack::start(FILTER);
    let alice = caller("acme", Some("alice"));
    let headers = [("authorization", alice.as_str())];
    // Each request holds its output budget (100) plus its prompt's size in tokens, and settles
    // to its true usage (1 + 24).
    let hold = hold_for(&chat_body(1, 100));
    let mut spent = 0;
    let mut denial = None;
    for _ in 0..40 {
        let r = s.chat(COMPLETIONS, &headers, &chat_body(1, 100)).await;
        match r.status {
            200 => {
                assert!(r.header("ratelimit-remaining").is_some(), "{:?}", r.headers);
                assert!(
                    r.header("x-echo-x-tollgate-hold-id").is_none(),
                    "a hold id is a capability; it goes upstream only when asked for: {:?}",
                    r.headers
                );
                spent += r.total_tokens();
                s.usage_settles_at("acme", json!({"userId": "alice"}), "research-daily", spent)
                    .await;
            }
            429 => {
                denial = Some(r);
                break;
            }
            other => panic!("unexpected {other}: {}", r.text),
        }
    }
    let denial = denial.expect("the team cap never denied");
    assert!(
        spent + hold > RESEARCH_CAP && spent <= RESEARCH_CAP,
        "spent {spent}, hold {hold}"
    );
    let body = denial.tollgate();
    assert_eq!(body["error"], "usage_limit_exceeded");
    // In OpenAI's error shape, so the SDKs show the message.
    let message = denial.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.contains("research-daily"), "{message}");
    assert_eq!(body["entityType"], "team");
    assert_eq!(body["entityId"], "research");
    assert_eq!(body["limitId"], "research-daily");
    for h in [
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "retry-after",
    ] {
        assert!(
            denial.header(h).is_some(),
            "denial lacks {h}: {:?}",
            denial.headers
        );
    }
    // Alice's own budget is far from used: the team is what blocked.
    let user = s
        .usage("acme", json!({"userId": "alice"}), "user-daily")
        .await;
    assert_eq!(user, spent);
    assert!(user < 10_000);
    // Another team of the same customer still gets through.
    let bob = caller("acme", Some("bob"));
    let r = s
        .chat(
            COMPLETIONS,
            &[("authorization", bob.as_str())],
            &chat_body(1, 100),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(s.envoy.filter_stat("denied").unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_agents_racing_one_cap_never_overspend_it() {
    let s = Arc::new(Stack::start(FILTER));
    let granted = Arc::new(AtomicU64::new(0));
    let denied = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for agent in 0..40 {
        let (s, granted, denied) = (s.clone(), granted.clone(), denied.clone());
        tasks.spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            // Bounded: at most 30 requests per agent, stop after 3 denials.
            let mut denials = 0;
            for _ in 0..30 {
                if denials >= 3 || Instant::now() > deadline {
                    break;
                }
                let words = 1 + agent % 5;
                let r = s
                    .chat(
                        COMPLETIONS,
                        &[("authorization", GLOBEX.as_str()), ("x-team-id", "labs")],
                        &chat_body(words, 40),
                    )
                    .await;
                match r.status {
                    200 => {
                        granted.fetch_add(r.total_tokens(), Ordering::Relaxed);
                    }
                    429 => {
                        denials += 1;
                        denied.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("agent {agent}: unexpected {other}: {}", r.text),
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let total = granted.load(Ordering::Relaxed);
    assert!(
        total <= support::GLOBEX_CAP,
        "granted {total} tokens past the cap"
    );
    assert!(
        denied.load(Ordering::Relaxed) > 0,
        "the cap was never reached"
    );
    // Every grant settled: the counter is exactly the usage the upstream reported.
    s.usage_settles_at("globex", json!({"teamId": "labs"}), "globex-daily", total)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_sse_responses_settle_to_the_true_usage() {
    let s = Stack::start(FILTER);
    let h = [("authorization", INITECH.as_str()), ("x-team-id", "ops")];
    let dims = json!({"teamId": "ops"});
    // JSON: holds 500, settles to 3 + 24.
    let r = s.chat(COMPLETIONS, &h, &chat_body(3, 500)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.total_tokens(), true_usage(3, 500));
    let mut want = true_usage(3, 500);
    s.usage_settles_at("initech", dims.clone(), "initech-daily", want)
        .await;

    // SSE with include_usage: the last chunk's usage.
    let mut body = chat_body(4, 10);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = s.chat(COMPLETIONS, &h, &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.text.contains("data: [DONE]"));
    want += true_usage(4, 10);
    s.usage_settles_at("initech", dims.clone(), "initech-daily", want)
        .await;

    // A stream that did not ask for usage: the filter asks for it (`include_usage`), settles
    // at it, and takes the extra event out of what the client sees.
    body["stream_options"] = json!({"include_usage": false});
    let r = s.chat(COMPLETIONS, &h, &body).await;
    assert_eq!(r.status, 200);
    assert!(r.text.contains("data: [DONE]"), "{}", r.text);
    assert!(
        !r.text.contains("\"usage\":{"),
        "the client got a usage event it did not ask for: {}",
        r.text
    );
    want += true_usage(4, 10);
    s.usage_settles_at("initech", dims.clone(), "initech-daily", want)
        .await;
    // An upstream error: released, nothing charged.
    let r = s
        .chat(
            COMPLETIONS,
            &[h[0], h[1], ("x-mock-status", "500")],
            &chat_body(1, 50),
        )
        .await;
    assert_eq!(r.status, 500);
    // A stream that breaks after its content, before its usage: the documented estimate, the
    // prompt from the request's size and the output from the content delivered (10 "tok ").
    body["stream_options"] = json!({"include_usage": true});
    let _ = s
        .chat(COMPLETIONS, &[h[0], h[1], ("x-mock-break", "1")], &body)
        .await;
    want += (body.to_string().len() as u64).div_ceil(4) + 10;
    s.usage_settles_at("initech", dims, "initech-daily", want)
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.envoy.filter_stat("released").unwrap() < 1 {
        assert!(
            Instant::now() < deadline,
            "the error's hold was not released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.envoy.filter_stat("usage_unknown").unwrap(), 2);
    assert_eq!(s.envoy.filter_stat("usage_estimated").unwrap(), 1);
    assert_eq!(s.envoy.filter_stat("usage_requested").unwrap(), 1);
    assert_eq!(s.envoy.filter_stat("settled").unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_header_settles_when_configured() {
    let s = Stack::start_with(FILTER, |c| {
        c.replace(
            r#""settlement": { "onMissingUsage": "estimate", "timeoutMs": 1000 }"#,
            r#""settlement": { "header": "X-Usage-Total-Tokens", "onUpstreamError": "hold" }"#,
        )
    });
    let h = [
        ("authorization", INITECH.as_str()),
        ("x-team-id", "ops"),
        ("x-mock-usage-header", "1"),
    ];
    let r = s.chat(COMPLETIONS, &h, &chat_body(5, 300)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-usage-total-tokens"), Some("29"));
    s.usage_settles_at(
        "initech",
        json!({"teamId": "ops"}),
        "initech-daily",
        true_usage(5, 300),
    )
    .await;
    // Without the header, the JSON body's usage settles; an upstream error under
    // `onUpstreamError: hold` is charged its hold.
    let small = json!({"model": "m", "max_tokens": 40});
    let r = s.chat(COMPLETIONS, &h[..2], &small).await;
    assert_eq!(r.status, 200);
    let r = s
        .chat(COMPLETIONS, &[h[0], h[1], ("x-mock-status", "502")], &small)
        .await;
    assert_eq!(r.status, 502);
    s.usage_settles_at(
        "initech",
        json!({"teamId": "ops"}),
        "initech-daily",
        true_usage(5, 300) + true_usage(1, 40) + hold_for(&small),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_sidecar_fails_closed_with_503_and_open_marked() {
    let mut s = Stack::start(FILTER);
    let h = [("authorization", INITECH.as_str()), ("x-team-id", "ops")];
    assert_eq!(s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await.status, 200);
    s.sidecar.proc.signal("KILL").unwrap();
    s.sidecar.proc.kill();

    let closed = s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await;
    assert_eq!(closed.status, 503, "{}", closed.text);
    assert_eq!(closed.tollgate()["error"], "usage_check_unavailable");
    assert_eq!(closed.tollgate()["reason"], "unavailable");

    let open = s
        .chat("/open/v1/chat/completions", &h, &chat_body(1, 5))
        .await;
    assert_eq!(open.status, 200, "{}", open.text);
    assert_eq!(
        open.header("x-echo-x-tollgate-unchecked"),
        Some("sidecar-unavailable"),
        "the upstream did not see the request marked: {:?}",
        open.headers
    );
    assert_eq!(s.envoy.filter_stat("fail_closed").unwrap(), 1);
    assert_eq!(s.envoy.filter_stat("fail_open").unwrap(), 1);
    assert_eq!(s.envoy.filter_stat("denied").unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_follows_each_route_fail_mode_then_decisions_recover() {
    let mut redis = tollgate_testkit::RedisServer::start();
    let sidecar = support::sidecar_with(&format!(
        "  storage: {{ kind: redis, url: \"{}\", timeoutMs: 100 }}",
        redis.url()
    ));
    let s = Stack::start_full(FILTER, &sidecar, |c| c);
    let h = [("authorization", INITECH.as_str()), ("x-team-id", "ops")];
    assert_eq!(s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await.status, 200);
    assert!(s.usage("initech", json!({}), "initech-daily").await > 0);

    redis.stop();
    for _ in 0..5 {
        let started = Instant::now();
        let closed = s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await;
        assert_eq!(closed.status, 503, "{}", closed.text);
        assert_eq!(
            closed.tollgate()["reason"],
            "unavailable",
            "{}",
            closed.text
        );
        let open = s
            .chat("/open/v1/chat/completions", &h, &chat_body(1, 5))
            .await;
        assert_eq!(open.status, 200, "{}", open.text);
        assert_eq!(
            open.header("x-echo-x-tollgate-unchecked"),
            Some("sidecar-unavailable")
        );
        // Answered by the store's 100 ms timeout or at once (refused, or the breaker open),
        // never left to the client's 30 s: a generous bound for a loaded machine.
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    assert_eq!(s.envoy.filter_stat("fail_closed").unwrap(), 5);
    assert_eq!(s.envoy.filter_stat("denied").unwrap(), 0);

    // Back (empty: this Redis keeps nothing), with no sidecar or Envoy restart.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await;
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{}", r.text);
        assert!(Instant::now() < deadline, "no recovery within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The recovered decision is counted in the new Redis.
    assert!(s.usage("initech", json!({}), "initech-daily").await > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_sidecar_is_timed_out_per_route_fail_mode() {
    let port = tollgate_testkit::hung_listener().unwrap();
    // Point the sidecar cluster at the silent socket.
    let s = Stack::start_with(FILTER, |c| sidecar_port(&c, port));
    let h = [("authorization", INITECH.as_str()), ("x-team-id", "ops")];
    let started = Instant::now();
    let closed = s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await;
    let waited = started.elapsed();
    assert_eq!(closed.status, 503, "{}", closed.text);
    assert_eq!(closed.tollgate()["reason"], "timeout", "{}", closed.text);
    // The 250 ms filter timeout applied, not the route's 300 s nor the client's 30 s.
    assert!(waited >= Duration::from_millis(200), "{waited:?}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    let open = s
        .chat("/open/v1/chat/completions", &h, &chat_body(1, 5))
        .await;
    assert_eq!(open.status, 200);
    assert_eq!(
        open.header("x-echo-x-tollgate-unchecked"),
        Some("sidecar-timeout")
    );
}

/// Points the sidecar cluster of a rendered config at `port`.
fn sidecar_port(c: &str, port: u16) -> String {
    let marker = "port_value: ";
    let cluster = c.find("name: tollgate\n").unwrap();
    let at = cluster + c[cluster..].find(marker).unwrap() + marker.len();
    let end = at + c[at..].find(' ').unwrap();
    format!("{}{port}{}", &c[..at], &c[end..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_no_rule_reads_still_waits_for_the_decision() {
    // With no body rule the filter decides on the headers; the body that follows must be held
    // until the answer, not let through with it.
    let port = tollgate_testkit::hung_listener().unwrap();
    let s = Stack::start_with(FILTER, |c| {
        sidecar_port(
            &c.replace(
                r#""api": "openai-chat","#,
                r#""api": "custom", "usage": { "constant": "16" },"#,
            )
            .replace(
                r#""model": { "body": "/model" }"#,
                r#""model": { "header": "x-model" }"#,
            ),
            port,
        )
    });
    let h = [("authorization", INITECH.as_str()), ("x-team-id", "ops")];
    let r = s.chat(COMPLETIONS, &h, &chat_body(3, 5)).await;
    assert_eq!(
        r.status, 503,
        "the request went upstream before the decision: {}",
        r.text
    );
    assert_eq!(r.tollgate()["reason"], "timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_http2_and_an_unknown_cluster_follow_the_fail_mode() {
    // Without HTTP/2 on the sidecar cluster, every gRPC call fails.
    let s = Stack::start_with(FILTER, |c| {
        c.replace(
            "http2_protocol_options: { connection_keepalive: { interval: 30s, timeout: 5s } }",
            "http_protocol_options: {}",
        )
    });
    let h = [("authorization", INITECH.as_str()), ("x-team-id", "ops")];
    let r = s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await;
    assert_eq!(r.status, 503, "{}", r.text);
    let r = s
        .chat("/open/v1/chat/completions", &h, &chat_body(1, 5))
        .await;
    assert_eq!(r.status, 200);
    assert!(r.header("x-echo-x-tollgate-unchecked").is_some());
    drop(s);

    // A filter pointed at a cluster that does not exist fails at dispatch.
    let s = Stack::start_with(FILTER, |c| {
        c.replace(
            r#""cluster": "tollgate""#,
            r#""cluster": "no-such-cluster""#,
        )
    });
    let r = s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.tollgate()["reason"], "dispatch_failed");
    let r = s
        .chat("/open/v1/chat/completions", &h, &chat_body(1, 5))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-echo-x-tollgate-unchecked"),
        Some("sidecar-dispatch-failed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_refused_before_any_decision() {
    let s = Stack::start(FILTER);
    let ok = [("authorization", INITECH.as_str()), ("x-team-id", "ops")];
    let before = s.sidecar_decisions().await;

    // A verified token that names no customer.
    let no_org = format!(
        "Bearer {}",
        tollgate_testkit::signed_jwt(
            &json!({"iss": tollgate_testkit::JWT_ISSUER, "sub": "someone"}),
            tollgate_testkit::JWT_KEY
        )
    );
    let r = s
        .chat(
            COMPLETIONS,
            &[("authorization", no_org.as_str()), ("x-team-id", "ops")],
            &chat_body(1, 5),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.tollgate()["reason"], "missing_value");
    assert!(
        r.tollgate()["message"].as_str().unwrap().contains("org"),
        "{}",
        r.text
    );

    let r = s
        .chat(
            COMPLETIONS,
            &ok,
            &json!({"model": "m", "max_tokens": "lots"}),
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.tollgate()["reason"], "not_a_number");

    let big = json!({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x".repeat(300_000)}]});
    let r = s.chat(COMPLETIONS, &ok, &big).await;
    assert_eq!(r.status, 413, "{}", r.text);
    assert_eq!(r.tollgate()["reason"], "body_too_large");

    let r = s
        .http
        .post(format!("{}{COMPLETIONS}", s.envoy.url))
        .header("authorization", INITECH.as_str())
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["tollgate"]["reason"], "body_not_json");

    // Tokens that are not JWTs, or not signed by the platform, never reach the filter:
    // jwt_authn answers 401. (The filter's own reading of malformed tokens is unit-tested.)
    let forged = format!(
        "Bearer {}",
        tollgate_testkit::signed_jwt(
            &json!({"iss": tollgate_testkit::JWT_ISSUER, "org": "initech"}),
            b"not the platform's key"
        )
    );
    for token in [
        "Bearer not-a-jwt",
        "Bearer a.%%%.c",
        "Bearer a.bm90LWpzb24.c",
        forged.as_str(),
    ] {
        let r = s
            .chat(
                COMPLETIONS,
                &[("authorization", token), ok[1]],
                &chat_body(1, 5),
            )
            .await;
        assert_eq!(r.status, 401, "{token}: {}", r.text);
    }
    let r = s
        .chat(COMPLETIONS, &[("x-team-id", "ops")], &chat_body(1, 5))
        .await;
    assert_eq!(r.status, 401, "no token at all: {}", r.text);
    assert_eq!(
        s.sidecar_decisions().await,
        before,
        "the sidecar was called"
    );
    assert_eq!(s.envoy.filter_stat("bad_input").unwrap(), 4);
    // The same stack still serves good requests.
    assert_eq!(s.chat(COMPLETIONS, &ok, &chat_body(1, 5)).await.status, 200);
}

#[test]
fn a_bad_filter_config_stops_envoy_at_load_with_the_reason() {
    let mock = tollgate_testkit::MockLlm::start().unwrap();
    let config = tollgate_testkit::envoy_config(FILTER, 9, mock.port().unwrap())
        .unwrap()
        .replace(r#""failMode": "closed""#, r#""failMode": "sometimes""#);
    let e = tollgate_testkit::Envoy::start(&config).unwrap_err();
    let text = format!("{e:#}");
    assert!(
        text.contains("tollgate filter config: at `failMode`"),
        "Envoy's log does not name the problem:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_customer_is_the_verified_claim_never_a_client_header() {
    let s = Stack::start(FILTER);
    let carol = caller("acme", Some("carol"));
    // A client header naming another customer is not read: acme pays, as its token says.
    let h = [
        ("authorization", carol.as_str()),
        ("x-tollgate-customer", "globex"),
    ];
    let r = s.chat(COMPLETIONS, &h, &chat_body(2, 10)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.usage_settles_at(
        "acme",
        json!({"userId": "carol"}),
        "user-daily",
        true_usage(2, 10),
    )
    .await;
    assert_eq!(
        s.usage("globex", json!({"teamId": "labs"}), "globex-daily")
            .await,
        0
    );
    // A token for another customer signed with another key never reaches the filter.
    let forged = format!(
        "Bearer {}",
        tollgate_testkit::signed_jwt(
            &json!({"iss": tollgate_testkit::JWT_ISSUER, "org": "globex", "sub": "carol"}),
            b"another key entirely"
        )
    );
    let r = s
        .chat(
            COMPLETIONS,
            &[("authorization", forged.as_str())],
            &chat_body(2, 10),
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(s.envoy.filter_stat("granted").unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_gateway_token_fails_like_an_outage_and_holds_nothing() {
    // The filter presents a token the sidecar does not accept: every decision is refused
    // (gRPC UNAUTHENTICATED), told apart from an outage by its reason, and nothing is held.
    let s = Stack::start_with(FILTER, |c| {
        c.replace(
            r#""tokenEnv": "TOLLGATE_GATEWAY_TOKEN""#,
            r#""token": "envoy.not-the-token""#,
        )
    });
    let h = [("authorization", INITECH.as_str()), ("x-team-id", "ops")];
    let closed = s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await;
    assert_eq!(closed.status, 503, "{}", closed.text);
    assert_eq!(
        closed.tollgate()["reason"],
        "unauthenticated",
        "{}",
        closed.text
    );
    let open = s
        .chat("/open/v1/chat/completions", &h, &chat_body(1, 5))
        .await;
    assert_eq!(open.status, 200, "{}", open.text);
    assert_eq!(
        open.header("x-echo-x-tollgate-unchecked"),
        Some("sidecar-unauthenticated")
    );
    assert_eq!(s.usage("initech", json!({}), "initech-daily").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_answer_and_an_error_status_follow_the_fail_mode() {
    use tollgate_testkit::{FakeAnswer, fake_authz};
    let h = [("authorization", INITECH.as_str()), ("x-team-id", "ops")];
    for (answer, reason) in [
        (FakeAnswer::Garbage, "bad_response"),
        (FakeAnswer::Internal, "grpc_error"),
    ] {
        let port = fake_authz(answer).await.unwrap();
        let s = Stack::start_with(FILTER, |c| sidecar_port(&c, port));
        let closed = s.chat(COMPLETIONS, &h, &chat_body(1, 5)).await;
        assert_eq!(closed.status, 503, "{answer:?}: {}", closed.text);
        assert_eq!(
            closed.tollgate()["reason"],
            reason,
            "{answer:?}: {}",
            closed.text
        );
        let open = s
            .chat("/open/v1/chat/completions", &h, &chat_body(1, 5))
            .await;
        assert_eq!(open.status, 200, "{answer:?}: {}", open.text);
        assert_eq!(
            open.header("x-echo-x-tollgate-unchecked"),
            Some(format!("sidecar-{}", reason.replace('_', "-")).as_str()),
            "{answer:?}"
        );
        assert_eq!(s.envoy.filter_stat("granted").unwrap(), 0);
    }
}

/// `failMode: bounded`: with the sidecar killed, a customer's calls pass (marked) while its
/// allowance lasts and the next is refused; when the sidecar is back (same port, same durable
/// store), what passed is in the counters exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_mode_passes_within_the_allowance_and_reports_it_once_the_sidecar_is_back() {
    let hold = hold_for(&chat_body(1, 5));
    // Room for two calls' holds, not three.
    let allowance = 2 * hold + hold / 2;
    let (mut s, path, _dir) = Stack::bounded(allowance);
    let h = [("authorization", INITECH.as_str()), ("x-team-id", "ops")];
    const ROUTE: &str = "/open/v1/chat/completions";
    let first = s.chat(ROUTE, &h, &chat_body(1, 5)).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let before = first.total_tokens();
    s.usage_settles_at("initech", json!({}), "initech-daily", before)
        .await;

    s.kill_sidecar_early_in_a_minute().await;
    let mut passed = 0;
    for _ in 0..2 {
        let r = s.chat(ROUTE, &h, &chat_body(1, 5)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            r.header("x-echo-x-tollgate-unchecked"),
            Some("bounded"),
            "{:?}",
            r.headers
        );
        passed += r.total_tokens();
    }
    let refused = s.chat(ROUTE, &h, &chat_body(1, 5)).await;
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(refused.tollgate()["error"], "usage_check_unavailable");
    assert_eq!(passed, 2 * true_usage(1, 5));

    // Back on the same port and store: the passes are reported and counted once.
    s.sidecar = tollgate_testkit::Sidecar::start_at(&path).unwrap();
    s.usage_settles_at("initech", json!({}), "initech-daily", before + passed)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.usage("initech", json!({}), "initech-daily").await,
        before + passed,
        "reported more than once"
    );
    assert_eq!(s.envoy.filter_stat("bounded_passed").unwrap(), 2);
    assert_eq!(s.envoy.filter_stat("bounded_refused").unwrap(), 1);
    assert_eq!(s.envoy.filter_stat("bounded_reported").unwrap(), 2);
}
