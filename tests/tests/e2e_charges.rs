//! End to end with the official SDKs (PyPI `openai` and `anthropic`, driven by
//! `tests/sdk/client.py`) through real Envoy, the WASM filter and the sidecar, against the mock
//! upstream: the settlement holes and error texts a new user meets. An Anthropic stream left
//! before its `message_delta` is charged what it delivered; usage far above the hold (a stored
//! conversation) is charged, not dropped; a bounded outage counts calls that share a client's
//! `x-request-id` each once; a client's own `x-tollgate-unchecked` never reaches the upstream;
//! errors read as written and say what is wrong (a wrong gateway token, an unknown team);
//! a token without the claim a governed level needs is refused with a clear message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{INITECH, SIDECAR, Stack, caller};

const FILTER: &str = "wasm-filter.yaml";
const T: Duration = Duration::from_secs(60);

/// What the mock reports for the SDK client's prompt: 8 words.
const PROMPT: u64 = 8;

async fn initech(s: &Stack) -> u64 {
    support::initech_ops(s).await
}

async fn run(s: &Stack, bearer: &str, scenario: &'static str, extra: &[&str]) -> Value {
    support::run_sdk(s, bearer, scenario, extra, T).await
}

/// Waits (bounded) until initech's counter stops at a value above `before` for a second, and
/// returns how far it moved.
async fn charged_since(s: &Stack, before: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = initech(s).await;
    let mut still_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = initech(s).await;
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if now > before && still_since.elapsed() > Duration::from_secs(1) {
            return now - before;
        }
        assert!(
            Instant::now() < deadline,
            "initech's counter never settled above {before} (at {now})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_stream_left_before_its_message_delta_is_charged_what_it_delivered() {
    let s = Stack::start(FILTER);
    let before = initech(&s).await;
    // 24 text deltas 25 ms apart; the client reads 12 and closes, long before the usage.
    let out = run(
        &s,
        &INITECH,
        "messages-stream-leave-early",
        &[
            "--max-tokens",
            "24",
            "--leave-after",
            "12",
            "--header",
            "x-mock-pace-ms: 25",
        ],
    )
    .await;
    assert_eq!(out["read"], 12, "{out}");
    let charged = charged_since(&s, before).await;
    // The input as `message_start` reported it (8), and the output at the documented estimate
    // of what the filter passed on (one token per 4-byte "tok "): at least the 12 read, at most
    // the 24 the stream would have made. Not `message_start`'s provisional output of 1.
    assert!(
        (PROMPT + 12..=PROMPT + 24).contains(&charged),
        "charged {charged}: input {PROMPT} and an output of 12 to 24 delivered tokens"
    );
    assert_eq!(
        s.envoy.filter_stat("usage_unknown").unwrap(),
        1,
        "the output was estimated, and said so"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_far_above_the_hold_is_charged_not_dropped() {
    let s = Stack::start(FILTER);
    // A stored conversation, a file or an image: the request body shows a few dozen tokens,
    // the provider reports 8,000 more. Chat and Responses, the SDK's own calls.
    for scenario in ["chat-json", "responses-json"] {
        let before = initech(&s).await;
        let out = run(
            &s,
            &INITECH,
            scenario,
            &["--header", "x-mock-extra-prompt: 8000"],
        )
        .await;
        let reported = out["usage"]["total_tokens"].as_u64().unwrap();
        assert_eq!(reported, PROMPT + 8_000 + 20, "{scenario}: {out}");
        s.usage_settles_at(
            "initech",
            json!({"teamId": "ops"}),
            "initech-daily",
            before + reported,
        )
        .await;
    }
    let m = s.sidecar_metrics().await;
    assert_eq!(
        m.get("tollgate_settles_capped_total", &[]),
        Some(0.0),
        "charged whole, under the model's ceiling"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_own_unchecked_mark_never_reaches_the_upstream() {
    let s = Stack::start(FILTER);
    for forged in ["bounded", "sidecar-timeout"] {
        let header = format!("x-tollgate-unchecked: {forged}");
        let out = run(&s, &INITECH, "chat-echo", &["--header", &header]).await;
        assert_eq!(out["status"], 200, "{out}");
        assert_eq!(
            out["echo"].get("x-tollgate-unchecked"),
            None,
            "the upstream read the client's mark as Tollgate's: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_reads_as_an_invalid_request_not_a_limit() {
    let s = Stack::start(FILTER);
    let before = s.sidecar_decisions().await;
    for api in ["openai", "anthropic"] {
        let out = run(
            &s,
            &caller("acme", Some("carol")),
            "denied",
            &["--api", api, "--team", "no-such-team"],
        )
        .await;
        assert_eq!(out["status"], 400, "{api}: {out}");
        let message = out["message"].as_str().unwrap();
        assert_eq!(out["type"], "invalid_request_error", "{api}: {out}");
        assert!(message.contains("no-such-team"), "{api}: {message}");
        assert!(
            !message.contains("usage_limit_exceeded") && !message.contains("rate_limit"),
            "{api}: read as a limit: {message}"
        );
    }
    assert_eq!(
        s.sidecar_decisions().await - before,
        2,
        "one call each, none retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_gateway_token_says_so_in_words() {
    let s = Stack::start_with(FILTER, |c| {
        let wrong = c.replace(
            r#""tokenEnv": "TOLLGATE_GATEWAY_TOKEN""#,
            r#""token": "envoy.not-the-gateway-token""#,
        );
        assert_ne!(wrong, c, "the filter config changed shape");
        wrong
    });
    for api in ["openai", "anthropic"] {
        let out = run(&s, &INITECH, "denied", &["--api", api]).await;
        assert_eq!(out["status"], 503, "{api}: {out}");
        let message = out["message"].as_str().unwrap();
        assert!(
            message.contains("invalid gateway token") && message.contains("sidecar.token"),
            "{api}: {message}"
        );
        assert!(
            !message.contains('%'),
            "{api}: still percent-encoded: {message}"
        );
        assert!(!message.contains("{via_upstream}"), "{api}: {message}");
        assert!(
            !message.contains("operator token"),
            "{api}: names the wrong credential: {message}"
        );
        assert_eq!(out["should_retry"], "false", "{api}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_the_claim_a_governed_level_needs_is_refused() {
    // The users' level must never be skipped: the sidecar requires `userId`, and one route's
    // filter requires its claim too (refused there, before any sidecar call).
    let required = SIDECAR.replace(
        "  - dimension: userId\n    entityType: user\n",
        "  - dimension: userId\n    entityType: user\n    required: true\n",
    );
    assert_ne!(required, *SIDECAR, "the sidecar config changed shape");
    let s = Stack::start_full(FILTER, &required, |c| c);
    let no_sub = caller("acme", None);
    let before = s.sidecar_decisions().await;
    let out = run(&s, &no_sub, "denied", &["--team", "research"]).await;
    assert_eq!(out["status"], 400, "{out}");
    assert_eq!(out["type"], "invalid_request_error", "{out}");
    let message = out["message"].as_str().unwrap();
    assert!(
        message.contains("`userId`") && message.contains("required"),
        "{message}"
    );
    assert_eq!(s.sidecar_decisions().await - before, 1);
    // With the claim, the same call goes through.
    let out = run(
        &s,
        &caller("acme", Some("alice")),
        "denied",
        &["--team", "research"],
    )
    .await;
    assert_eq!(out["status"], 200, "{out}");
    drop(s);

    let s = Stack::start_full(FILTER, &required, |c| {
        let strict = c.replace(
            r#""userId": { "jwtClaim": "sub", "jwtMetadata": "jwt_payload" }"#,
            r#""userId": { "jwtClaim": "sub", "jwtMetadata": "jwt_payload", "required": true }"#,
        );
        assert_ne!(strict, c, "the filter config changed shape");
        strict
    });
    let before = s.sidecar_decisions().await;
    let out = run(
        &s,
        &no_sub,
        "denied",
        &["--api", "anthropic", "--team", "research"],
    )
    .await;
    assert_eq!(out["status"], 400, "{out}");
    let message = out["message"].as_str().unwrap();
    assert!(
        message.contains("userId` is required") && message.contains("`sub`"),
        "{message}"
    );
    assert_eq!(out["type"], "invalid_request_error", "{out}");
    assert_eq!(
        s.sidecar_decisions().await,
        before,
        "refused in the filter, no sidecar call"
    );
}
