//! End to end with the official SDKs as clients (PyPI `openai` and `anthropic`, driven by
//! `tests/sdk/client.py`) through real Envoy, the WASM filter and the sidecar, against the mock
//! upstream: every API streamed or not settles at the usage the model reported, whatever the
//! client does (leaves at `[DONE]` while the upstream lingers, leaves before the usage, asks for
//! compression, streams without asking for usage); denials read well in the SDK and a request
//! that can never fit is not retried; SDK clients racing one cap never overspend it; a
//! stalled sidecar or Redis charges nothing for calls that timed out; the race again on
//! Redis with escrow leases, decisions made inside slices; and through a bounded
//! outage the SDK's calls and retries pass only within the allowance, counted once after.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{GLOBEX, INITECH, Stack, caller, chat_body, true_usage};
use tollgate_tests::sdk::sdk;

const FILTER: &str = "wasm-filter.yaml";
const T: Duration = Duration::from_secs(60);

/// What the mock reports for the SDK client's prompt (8 words) and its default budget (20).
const SDK_USAGE: u64 = 8 + 20;

fn ops() -> Value {
    json!({"teamId": "ops"})
}

async fn initech(s: &Stack) -> u64 {
    s.usage("initech", ops(), "initech-daily").await
}

/// Waits (bounded) until the initech counter has moved by `delta` from `from`.
async fn moved_by(s: &Stack, from: u64, delta: u64) {
    s.usage_settles_at("initech", ops(), "initech-daily", from + delta)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_streamed_or_not_settles_at_the_reported_usage() {
    let s = Stack::start(FILTER);
    let url = s.envoy.url.clone();
    let token = INITECH.trim_start_matches("Bearer ").to_string();
    for (scenario, delta, client_sees_usage) in [
        ("chat-json", SDK_USAGE, true),
        ("chat-stream", SDK_USAGE, true),
        // The filter asks for usage the client did not, and hides the extra event from it.
        ("chat-stream-no-usage", SDK_USAGE, false),
        // The SDK closes at `[DONE]`; the upstream ends its response 800 ms later.
        ("chat-stream-leave-at-done", SDK_USAGE, true),
        ("responses-json", SDK_USAGE, true),
        ("responses-stream", SDK_USAGE, true),
        ("messages-json", SDK_USAGE, true),
        ("messages-stream", SDK_USAGE, true),
        // 100 input tokens written to the cache and 50 read from it count too.
        ("messages-cache", SDK_USAGE + 150, true),
    ] {
        let before = initech(&s).await;
        let (u, t) = (url.clone(), token.clone());
        let out = tokio::task::spawn_blocking(move || sdk(&u, &t, scenario, &[], T))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            out["text"].as_str().unwrap(),
            "tok ".repeat(20),
            "{scenario}: {out}"
        );
        assert_eq!(
            out["usage"].is_object(),
            client_sees_usage,
            "{scenario}: {out}"
        );
        moved_by(&s, before, delta).await;
    }
    // Nothing left open: every hold was closed by a settlement.
    assert_eq!(s.envoy.filter_stat("released").unwrap(), 0);
    assert_eq!(s.envoy.filter_stat("usage_unknown").unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_early_and_asking_for_compression_are_charged_right() {
    let s = Stack::start(FILTER);
    let url = s.envoy.url.clone();
    let token = INITECH.trim_start_matches("Bearer ").to_string();
    // The client reads to the chunk with `finish_reason` and closes, before any usage: the
    // output was delivered, so it is charged the reported usage (if the filter saw it first)
    // or the documented estimate; never nothing, never more than the hold.
    let before = initech(&s).await;
    let out = tokio::task::spawn_blocking(move || {
        sdk(&url, &token, "chat-stream-leave-at-finish", &[], T)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(out["left"], true, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let charged = loop {
        let now = initech(&s).await;
        if now > before {
            break now - before;
        }
        assert!(
            Instant::now() < deadline,
            "the early leaver was never charged"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        (SDK_USAGE..=SDK_USAGE + 100).contains(&charged),
        "charged {charged} for an answer of {SDK_USAGE}"
    );

    // A client that asks for gzip gets gzip (Envoy's compressor), the upstream is not asked
    // for it (the filter took `accept-encoding` off), and the usage is read.
    let before = initech(&s).await;
    let r = s
        .http
        .post(format!("{}/v1/chat/completions", s.envoy.url))
        .header("authorization", INITECH.as_str())
        .header("x-team-id", "ops")
        .header("accept-encoding", "gzip, deflate")
        .header("content-type", "application/json")
        .body(chat_body(3, 10).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("gzip"),
        "{:?}",
        r.headers()
    );
    assert!(
        r.headers().get("x-echo-accept-encoding").is_none(),
        "the upstream was asked to compress: {:?}",
        r.headers()
    );
    moved_by(&s, before, true_usage(3, 10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_errors_name_the_limit_and_a_never_fitting_request_is_not_retried() {
    let s = Stack::start(FILTER);
    let carol = caller("acme", Some("carol"));
    let token = carol.trim_start_matches("Bearer ").to_string();
    for api in ["openai", "anthropic"] {
        let before = s.sidecar_decisions().await;
        let (u, t) = (s.envoy.url.clone(), token.clone());
        // 1,000 tokens of output against research's whole cap of 300: it can never fit.
        let out = tokio::task::spawn_blocking(move || {
            sdk(
                &u,
                &t,
                "denied",
                &["--api", api, "--max-tokens", "1000", "--team", "research"],
                T,
            )
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(out["status"], 429, "{api}: {out}");
        let message = out["message"].as_str().unwrap();
        assert!(
            message.contains("research-daily") && message.contains("can never fit"),
            "{api}: the SDK's message does not name the limit: {message}"
        );
        assert_eq!(out["should_retry"], "false", "{api}: {out}");
        // The SDK retries 429s twice by default; this one it did not retry.
        assert_eq!(s.sidecar_decisions().await - before, 1, "{api}: retried");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_clients_racing_one_cap_never_overspend_it() {
    let s = Stack::start(FILTER);
    sdk_race_to_the_globex_cap(&s, 0, None).await;
    let metrics = s.sidecar_metrics().await;
    assert!(
        metrics.get("tollgate_holds_open", &[]) == Some(0.0),
        "a hold is left open"
    );
}

/// The same race with the sidecar on Redis and escrow leases on: most decisions are made
/// inside slices of the cap held in Redis, and still nothing is granted past it, and the
/// counter read through the sidecar is exactly what the answers reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_clients_racing_one_cap_through_leases_never_overspend_it() {
    let redis = tollgate_testkit::RedisServer::start();
    let sidecar = support::sidecar_with(&format!(
        "  storage: {{ kind: redis, url: \"{}\", timeoutMs: 5000, leases: {{ enabled: true, ttl: PT6M, skew: PT2S }} }}",
        redis.url()
    ));
    assert!(sidecar.contains("leases"));
    let s = Stack::start_full(FILTER, &sidecar, |c| c);
    // A few calls one after another first: the first asks for a slice, the next are made
    // inside it (a race alone may reach the cap before any slice is placed).
    let labs = [("authorization", GLOBEX.as_str()), ("x-team-id", "labs")];
    let local = |m: &tollgate_testkit::Metrics| {
        m.get("tollgate_lease_local_decisions_total", &[])
            .unwrap_or(0.0)
    };
    let mut before = 0;
    // Bounded: 60 calls, 100 ms apart. Close together on purpose: a counter nobody asked for
    // in a second is idle and its slices go back at the next sweep, so on a loaded machine
    // calls 300 ms apart (plus their own time) could each find the slice returned.
    for _ in 0..60 {
        let r = s
            .chat("/v1/chat/completions", &labs, &chat_body(1, 5))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        before += r.total_tokens();
        if local(&s.sidecar_metrics().await) > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = s.sidecar_metrics().await;
    assert!(
        local(&metrics) > 0.0,
        "no decision was made inside a lease:\n{metrics}"
    );
    sdk_race_to_the_globex_cap(&s, before, None).await;
}

/// The race through leases again, with Redis calls timing out at 100 ms and Redis frozen
/// four times for 0.3 s during it: calls refused while Redis is away fail closed (503) and
/// are charged nothing, and every call that got through is charged exactly what it reported,
/// although decisions, settlements and batches of records met timeouts whose calls ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_clients_racing_through_leases_while_redis_stalls_are_charged_exactly() {
    let redis = Arc::new(tollgate_testkit::RedisServer::start());
    let sidecar = support::sidecar_with(&format!(
        "  storage: {{ kind: redis, url: \"{}\", timeoutMs: 100, breakerFailures: 1000, leases: {{ enabled: true, ttl: PT6M, skew: PT2S }} }}",
        redis.url()
    ));
    let s = Stack::start_full(FILTER, &sidecar, |c| c);
    sdk_race_to_the_globex_cap(&s, 0, Some(Arc::clone(&redis))).await;
}

/// 24 asynchronous SDK clients race globex's cap of 2,000, `before` of it used already (8
/// requests each, random prompts of 1-60 words and budgets of 1-40, half of them streamed):
/// nothing past the cap, the cap reached, and once everything settled the counter is exactly
/// the reported usage. With `stall`, that Redis is frozen four times for 0.3 s during the
/// race, and calls refused for it (503, fail closed) are allowed.
async fn sdk_race_to_the_globex_cap(
    s: &Stack,
    before: u64,
    stall: Option<Arc<tollgate_testkit::RedisServer>>,
) {
    let stalls = stall.map(|redis| {
        std::thread::spawn(move || {
            for _ in 0..4 {
                std::thread::sleep(Duration::from_millis(500));
                redis.pause();
                std::thread::sleep(Duration::from_millis(300));
                redis.resume();
            }
        })
    });
    let may_fail = stalls.is_some();
    let globex = caller("globex", None);
    let token = globex.trim_start_matches("Bearer ").to_string();
    let url = s.envoy.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        sdk(
            &url,
            &token,
            "race",
            &[
                "--team",
                "labs",
                "--agents",
                "24",
                "--requests",
                "8",
                "--seed",
                "11",
            ],
            Duration::from_secs(120),
        )
    })
    .await
    .unwrap()
    .unwrap();
    if let Some(t) = stalls {
        t.join().unwrap();
    }
    let errors = out["errors"].as_array().unwrap();
    assert!(
        errors.is_empty()
            || (may_fail
                && errors
                    .iter()
                    .all(|e| e.as_str().unwrap_or("").starts_with("503"))),
        "{out}"
    );
    let granted = out["granted"].as_u64().unwrap();
    assert!(
        before + granted <= support::GLOBEX_CAP,
        "granted {granted} past the cap ({before} used before): {out}"
    );
    assert!(
        out["denied"].as_u64().unwrap() > 0,
        "the cap was never reached: {out}"
    );
    s.usage_settles_at(
        "globex",
        json!({"teamId": "labs"}),
        "globex-daily",
        before + granted,
    )
    .await;
}

/// Requests through Envoy while the sidecar is stopped: every one that timed out is charged
/// nothing once the sidecar runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sidecar_charges_nothing_for_calls_that_timed_out() {
    let s = Arc::new(Stack::start(FILTER));
    let before = initech(&s).await;
    let pid = s.sidecar.proc.pid().unwrap();
    kill("STOP", pid);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let s = Arc::clone(&s);
        tasks.spawn(async move {
            s.chat(
                "/v1/chat/completions",
                &[("authorization", INITECH.as_str()), ("x-team-id", "ops")],
                &chat_body(2, 10),
            )
            .await
        });
    }
    let mut timed_out = 0;
    while let Some(r) = tasks.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status, 503, "{}", r.text);
        assert_eq!(r.tollgate()["reason"], "timeout", "{}", r.text);
        timed_out += 1;
    }
    assert_eq!(timed_out, 12);
    // The checks are still queued at the stopped sidecar; it runs them now, late.
    kill("CONT", pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        initech(&s).await,
        before,
        "a call that timed out was charged"
    );
    let metrics = s.sidecar_metrics().await;
    assert!(
        metrics.get("tollgate_holds_open", &[]) == Some(0.0),
        "a hold is left open:\n{metrics}"
    );
    // And it decides again as usual.
    let r = s
        .chat(
            "/v1/chat/completions",
            &[("authorization", INITECH.as_str()), ("x-team-id", "ops")],
            &chat_body(2, 10),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    moved_by(&s, before, true_usage(2, 10)).await;
}

/// The official SDK through a route that fails `bounded`, with the sidecar killed: calls pass
/// marked while the allowance lasts, then are refused, and the SDK's own retries of a refused
/// call pass nothing more; when the sidecar is back, what passed is counted exactly once, at
/// the usage each answer reported (streamed or not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_calls_through_a_bounded_outage_pass_within_the_allowance_and_are_counted_once() {
    // The SDK's request (a prompt of 8 words, 20 tokens of output) holds about 48 units, 63
    // streamed: room for two calls, not three.
    let (mut s, path, _dir) = support::Stack::bounded(150);
    let before = s.usage("initech", json!({}), "initech-daily").await;
    s.kill_sidecar_early_in_a_minute().await;
    let url = format!("{}/open", s.envoy.url);
    let token = INITECH.trim_start_matches("Bearer ").to_string();
    // Every call carries the same `x-request-id`, as apps that propagate a trace id send:
    // each pass is still counted once.
    let out = tokio::task::spawn_blocking(move || {
        sdk(
            &url,
            &token,
            "sequence",
            &["--requests", "6", "--header", "x-request-id: trace-1"],
            T,
        )
    })
    .await
    .unwrap()
    .unwrap();
    let calls = out.as_array().unwrap();
    let passed: Vec<&Value> = calls.iter().take_while(|c| c["status"] == 200).collect();
    assert_eq!(
        passed.len(),
        2,
        "one call non-streamed and one streamed fit: {out}"
    );
    for c in &passed {
        assert_eq!(c["unchecked"], "bounded", "a pass not marked: {out}");
        assert_eq!(c["usage"], SDK_USAGE, "{out}");
    }
    for c in &calls[passed.len()..] {
        assert_eq!(
            c["status"], 503,
            "after the allowance, only refusals: {out}"
        );
        assert_eq!(
            c["body"]["tollgate"]["error"], "usage_check_unavailable",
            "{out}"
        );
    }
    let refused = (calls.len() - passed.len()) as u64;
    assert_eq!(
        s.envoy.filter_stat("bounded_passed").unwrap(),
        passed.len() as u64,
        "the SDK's retries passed more: {out}"
    );
    // The SDK retries a 503 twice: every attempt was refused.
    assert_eq!(
        s.envoy.filter_stat("bounded_refused").unwrap(),
        3 * refused,
        "{out}"
    );
    s.sidecar = tollgate_testkit::Sidecar::start_at(&path).unwrap();
    let want = before + passed.len() as u64 * SDK_USAGE;
    s.usage_settles_at("initech", json!({}), "initech-daily", want)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        s.usage("initech", json!({}), "initech-daily").await,
        want,
        "reported more than once"
    );
}

/// The same one layer down: the sidecar on Redis, Redis stopped under load for 2 s. Checks
/// answered unavailable while it was stopped leave no hold once it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_leaves_no_hold_for_checks_answered_unavailable() {
    let redis = tollgate_testkit::RedisServer::start();
    let sidecar = support::sidecar_with(&format!(
        "  storage: {{ kind: redis, url: \"{}\", timeoutMs: 100, breakerFailures: 1000 }}",
        redis.url()
    ));
    let s = Arc::new(Stack::start_full(FILTER, &sidecar, |c| c));
    let granted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let unavailable = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let stop_at = Instant::now() + Duration::from_millis(500);
    for _ in 0..8 {
        let (s, granted, unavailable) = (Arc::clone(&s), granted.clone(), unavailable.clone());
        tasks.spawn(async move {
            // Until a second after Redis runs again (so the load spans the stall however fast
            // the machine is), bounded at 2,000 requests per client.
            let end = Instant::now() + Duration::from_millis(3500);
            for _ in 0..2000 {
                if Instant::now() > end {
                    break;
                }
                let r = s
                    .chat(
                        "/v1/chat/completions",
                        &[("authorization", INITECH.as_str()), ("x-team-id", "ops")],
                        &chat_body(2, 10),
                    )
                    .await;
                match r.status {
                    200 => {
                        granted.fetch_add(r.total_tokens(), std::sync::atomic::Ordering::Relaxed);
                    }
                    503 => {
                        unavailable.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    other => panic!("unexpected {other}: {}", r.text),
                }
            }
        });
    }
    tokio::time::sleep_until(stop_at.into()).await;
    redis.pause();
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.resume();
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    assert!(
        unavailable.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no check was answered unavailable"
    );
    // Once the late calls have run and been cancelled, the counter is what the clients were
    // granted and no hold is open in Redis.
    let want = granted.load(std::sync::atomic::Ordering::Relaxed);
    s.usage_settles_at("initech", ops(), "initech-daily", want)
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = redis
            .cli(&["HLEN", "tollgate:{initech}:h"])
            .unwrap_or_default();
        if open.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} holds left open in Redis",
            open.trim()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kill(signal: &str, pid: u32) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid}");
}
