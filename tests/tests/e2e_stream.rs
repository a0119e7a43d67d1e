//! Pay as you stream, through real Envoy with the WASM filter and the official SDKs: a streamed
//! call holds its prompt and a first slice, asks for the next slice ahead of need, and is ended
//! in the API's own error shape when a slice is refused; the hold settles at what was
//! delivered.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use support::{INITECH, RESEARCH_CAP, Stack, caller, initech_ops, run_sdk};

/// The shipped WASM config with streams held in slices: 64 output tokens first, 64 more per
/// slice, asked for when fewer than 32 held ones are left.
fn sliced(config: String) -> String {
    tollgate_testkit::with_streaming(
        &config,
        r#"{ "mode": "extend", "firstSlice": 64, "slice": 64, "askAhead": 32 }"#,
    )
    .unwrap()
}

fn start() -> Stack {
    Stack::start_with("wasm-filter.yaml", sliced)
}

/// Words of text, at the filter's 4 bytes a token.
fn tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

/// What a scenario of the SDKs' client printed, run as `bearer` with a long answer.
async fn sdk(s: &Stack, bearer: &str, scenario: &'static str, extra: &[&str]) -> Value {
    let mut args = vec![
        "--max-tokens",
        "4000",
        "--header",
        "x-mock-output-tokens: 1000",
    ];
    args.extend_from_slice(extra);
    run_sdk(s, bearer, scenario, &args, Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_what_the_budget_has_left_is_cut_in_each_apis_shape_and_charged_what_it_delivered()
 {
    let carol = caller("acme", Some("carol"));
    for (scenario, extra) in [
        ("chat-stream-cut", &[][..]),
        ("responses-stream-cut", &[][..]),
        ("messages-stream-cut", &["--api", "anthropic"][..]),
    ] {
        // A fresh sidecar each: research's 300 tokens a day, all left.
        let s = start();
        let mut args = vec!["--team", "research"];
        args.extend_from_slice(extra);
        // 4,000 tokens would never fit research's 300: a worst-case hold is refused outright.
        let out = sdk(&s, &carol, scenario, &args).await;
        let error = &out["error"];
        assert!(
            error["message"]
                .as_str()
                .is_some_and(|m| m.contains("research-daily")),
            "{scenario}: the SDK did not raise an error naming the limit: {out}"
        );
        let text = out["text"].as_str().unwrap();
        assert!(
            tokens(text) > 64,
            "{scenario}: the stream was not extended before the cut: {out}"
        );
        s.holds_closed().await;
        let charged = s
            .usage("acme", json!({"userId": "carol"}), "research-daily")
            .await;
        // What it delivered and its prompt's estimate: within the cap, never the 1,000 tokens
        // it would have run to.
        assert!(
            charged >= tokens(text) && charged <= tokens(text) + 64,
            "{scenario}: charged {charged} for {} delivered tokens",
            tokens(text)
        );
        assert!(
            charged <= RESEARCH_CAP,
            "{scenario}: {charged} over the cap"
        );
        // Its usage record says it was cut, and by which limit.
        let cut = top_by(&s, "acme", "cutBy").await;
        assert_eq!(
            cut.get("research-daily"),
            Some(&(charged, 1)),
            "{scenario}: {cut:?}"
        );
        let stat = |name| s.envoy.filter_stat(name).unwrap();
        assert_eq!(stat("stream_cut"), 1, "{scenario}");
        assert_eq!(stat("stream_refused"), 1, "{scenario}");
        assert!(stat("stream_extended") >= 1, "{scenario}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_budget_left_runs_to_its_end_with_a_handful_of_slices() {
    let s = start();
    let mut slices = 0;
    for (scenario, extra) in [
        ("chat-stream-cut", &[][..]),
        ("responses-stream-cut", &[][..]),
        ("messages-stream-cut", &["--api", "anthropic"][..]),
    ] {
        let before = initech_ops(&s).await;
        let out = sdk(&s, &INITECH, scenario, extra).await;
        assert!(out.get("error").is_none(), "{scenario}: {out}");
        assert_eq!(
            tokens(out["text"].as_str().unwrap()),
            1000,
            "{scenario}: {out}"
        );
        let usage = &out["usage"];
        let reported = usage["total_tokens"].as_u64().unwrap_or_else(|| {
            usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap()
        });
        s.holds_closed().await;
        assert_eq!(initech_ops(&s).await - before, reported, "{scenario}");
        // 1,000 tokens from a first slice of 64 in slices of 64: about 15 extensions, one
        // call each, for 1,000 content chunks.
        let now = s.envoy.filter_stat("stream_extended").unwrap();
        let extended = now - slices;
        slices = now;
        assert!(
            (10..=20).contains(&extended),
            "{scenario}: {extended} extensions for 1,000 chunks"
        );
    }
    assert_eq!(s.envoy.filter_stat("stream_cut").unwrap(), 0);
    // The sidecar decided each slice as one: the same count on both sides.
    let m = s.sidecar_metrics().await;
    assert_eq!(
        m.get("tollgate_stream_slices_total", &[("result", "granted")]),
        Some(slices as f64)
    );
}

/// One streamed chat of `output` tokens (asking for up to 500), read to its end: its status,
/// the content tokens it delivered, and whether it ended with the error event.
async fn stream_chat(s: &Stack, bearer: &str, output: u64) -> (u16, u64, bool) {
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 500, "stream": true,
        "messages": [{"role": "user", "content": "go"}]});
    let mut r = s
        .http
        .post(format!("{}/v1/chat/completions", s.envoy.url))
        .header("authorization", bearer)
        .header("content-type", "application/json")
        .header("x-mock-output-tokens", output.to_string())
        .header("x-mock-pace-ms", "2")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let mut text = Vec::new();
    // A reset after the error event ends the read with an error: what arrived counts.
    while let Ok(Some(chunk)) = r.chunk().await {
        text.extend_from_slice(&chunk);
    }
    let text = String::from_utf8_lossy(&text);
    let delivered = text.matches("tok ").count() as u64;
    (status, delivered, text.contains("usage_limit_exceeded"))
}

/// 16 streams at once as `bearer`, each asking for up to 500 tokens and answering 300:
/// (calls admitted, content tokens delivered, streams cut, limit `limit`'s counter as read
/// for `dims` of `customer`).
async fn sixteen_streams(
    s: &Stack,
    bearer: &str,
    customer: &str,
    dims: Value,
    limit: &str,
) -> (usize, u64, usize, u64) {
    let calls = (0..16).map(|_| stream_chat(s, bearer, 300));
    let results = futures_util::future::join_all(calls).await;
    s.holds_closed().await;
    let counted = s.usage(customer, dims, limit).await;
    (
        results.iter().filter(|r| r.0 == 200).count(),
        results.iter().map(|r| r.1).sum(),
        results.iter().filter(|r| r.2).count(),
        counted,
    )
}

async fn globex(s: &Stack) -> (usize, u64, usize, u64) {
    sixteen_streams(s, &support::GLOBEX, "globex", json!({}), "globex-daily").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_parallel_streams_never_overspend_by_more_than_a_slice_each_and_twice_as_many_get_in()
 {
    // Worst-case holds: each call holds its 500 tokens and prompt, so about four fit at once.
    let whole = Stack::start("wasm-filter.yaml");
    let (admitted_whole, delivered_whole, _, counted_whole) = globex(&whole).await;
    assert!(counted_whole <= support::GLOBEX_CAP);
    assert!(delivered_whole <= counted_whole);
    drop(whole);

    let sliced = start();
    let (admitted, delivered, cut, counted) = globex(&sliced).await;
    assert!(
        admitted >= 2 * admitted_whole,
        "sliced holds admitted {admitted}, worst-case holds {admitted_whole}"
    );
    // What the streams delivered is what was counted (prompts aside), and the counter never
    // passes the cap by more than one slice per stream in flight.
    assert!(
        delivered <= counted,
        "delivered {delivered}, counted {counted}"
    );
    assert!(
        counted <= support::GLOBEX_CAP + 16 * 64,
        "counted {counted} past the cap and a slice per stream"
    );
    assert!(cut >= 1, "no stream was cut at the cap");
    eprintln!(
        "16 streams at a 2,000 cap: worst-case holds admitted {admitted_whole} (counted {counted_whole}); slices admitted {admitted}, cut {cut}, delivered {delivered} content tokens, counted {counted}"
    );
}

/// The usage `customer` recorded today by the value of record key `by` (`cutBy`,
/// `finishedPast`, `featureId`): value → (units, calls); records without the key under "".
async fn top_by(s: &Stack, customer: &str, by: &str) -> BTreeMap<String, (u64, u64)> {
    let v = s
        .operator_api(&format!("/v1/customers/{customer}/usage/top?by={by}"), None)
        .await;
    v["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|r| {
            (
                r["value"].as_str().unwrap_or_default().to_string(),
                (
                    r["units"].as_u64().unwrap(),
                    r["requests"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// The units the usage records of `customer` add up to today (settled calls; a stream's
/// slices write none).
async fn recorded(s: &Stack, customer: &str) -> u64 {
    top_by(s, customer, "featureId")
        .await
        .values()
        .map(|(units, _)| units)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_across_two_replicas_on_redis_with_leases_survive_one_killed_mid_stream_and_never_count_twice()
 {
    let redis = tollgate_testkit::RedisServer::start();
    let sidecar = support::sidecar_with(&format!(
        "  storage: {{ kind: redis, url: \"{}\", timeoutMs: 5000, leases: {{ enabled: true, ttl: PT6M, skew: PT2S }} }}",
        redis.url()
    ));
    let a = tollgate_testkit::Sidecar::start(&sidecar).unwrap();
    let b = tollgate_testkit::Sidecar::start(&sidecar).unwrap();
    let (port_a, port_b) = (a.ext_authz_port().unwrap(), b.ext_authz_port().unwrap());
    let mock = tollgate_testkit::MockLlm::start().unwrap();
    // Envoy's sidecar cluster with both replicas, round robin: a call's first hold, its
    // slices and its closes land on either.
    let one = format!(
        "              - endpoint:\n                  address:\n                    socket_address: {{ address: 127.0.0.1, port_value: {port_a} }}\n"
    );
    let config = sliced(
        tollgate_testkit::envoy_config("wasm-filter.yaml", port_a, mock.port().unwrap()).unwrap(),
    );
    assert!(config.contains(&one), "the sidecar endpoint changed shape");
    let config = config.replace(
        &one,
        &format!(
            "{one}{}",
            one.replace(&port_a.to_string(), &port_b.to_string())
        ),
    );
    let envoy = tollgate_testkit::Envoy::start(&config).unwrap();
    let s = Stack::from_parts(a, mock, envoy);
    let mut b = b;
    // 8 streams of 400 tokens (slices of 64), 2 ms apart a token: under a second each. One
    // replica is killed a quarter of the way in; the route's `onSidecarDown: finish` lets
    // every stream that loses a slice to it run on.
    let bearer = support::INITECH.clone();
    let calls = (0..8).map(|_| stream_chat(&s, &bearer, 400));
    let kill = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        b.proc.signal("KILL").unwrap();
        b.proc.kill();
    };
    let (results, ()) = tokio::join!(futures_util::future::join_all(calls), kill);
    for (status, delivered, cut) in &results {
        assert_eq!(*status, 200);
        assert!(!cut, "a stream was cut though the cap is far");
        assert_eq!(*delivered, 400, "a stream did not run to its end");
    }
    // Each call's usage is recorded at most once, by its first hold, whichever replica closed
    // it, at the 401 tokens it used (400 output, 1 prompt: the mock's count). The exception is
    // the documented bound of a dead replica: a call whose first hold was a local lease hold
    // of the killed replica has its close posted for that replica, which never applies it; the
    // hold counts at its slice's size when the slice expires, and no record is made
    // (decision-server/docs/leases.md, "A replica that dies"). Whether the killed replica had
    // taken a lease by then depends on the machine's pace. (Read from the records: a replica's
    // open-holds gauge learns of closes made on another one only at its next lease sync.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut last = (0, 0);
    let mut steady = 0;
    let (units, calls) = loop {
        let now = top_by(&s, "initech", "featureId")
            .await
            .values()
            .fold((0, 0), |(u, c), (units, calls)| (u + units, c + calls));
        steady = if now == last { steady + 1 } else { 0 };
        last = now;
        if now.1 >= 8 || steady >= 20 || std::time::Instant::now() > deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        (1..=8).contains(&calls),
        "{calls} calls recorded for 8 streams"
    );
    assert_eq!(
        units,
        401 * calls,
        "a call was recorded at other than its usage, or twice"
    );
    let extended = s.envoy.filter_stat("stream_extended").unwrap();
    let unreachable = s.envoy.filter_stat("stream_unreachable").unwrap();
    // Every stream outgrows its first slice, so each asked at least once; one that could not
    // reach a replica stops asking (and runs on), so at most one unreachable slice each. How
    // many were granted before the kill depends on the machine's pace.
    assert!(
        extended >= 1 && extended + unreachable >= 8 && unreachable <= 8,
        "{extended} slices granted and {unreachable} unreachable for 8 streams of 400 tokens"
    );
    // Each stream that lost a slice to the killed replica ran on, and its record says so
    // (whichever replica settled it, its first hold in a lease or in Redis).
    let ran_past = top_by(&s, "initech", "finishedPast").await;
    let past = ran_past
        .get("sidecar-unreachable")
        .copied()
        .unwrap_or((0, 0));
    assert!(
        past.0 == 401 * past.1 && past.1 <= unreachable,
        "{ran_past:?} for {unreachable} unreachable slices"
    );
    if calls == 8 {
        // Nothing stranded on the killed replica: every stream that lost a slice says so.
        assert_eq!(past.1, unreachable, "{ran_past:?}");
    }
    assert_eq!(
        top_by(&s, "initech", "cutBy")
            .await
            .keys()
            .collect::<Vec<_>>(),
        vec![""],
        "nothing was cut"
    );
    eprintln!(
        "two replicas, one killed: {extended} slices granted, {unreachable} could not reach a replica, {calls} of 8 calls recorded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_streams_of_a_roomy_team_stop_at_the_org_cap_that_binds_first() {
    // acme's organization at 1,500 a day, research (its team) at 100,000: the org binds.
    let sidecar = support::SIDECAR
        .replace(
            "kind: quota, limit: 1000000, period: P1D }\n      - { id: research-daily",
            "kind: quota, limit: 1500, period: P1D }\n      - { id: research-daily",
        )
        .replace(
            "kind: quota, limit: 300, period: P1D",
            "kind: quota, limit: 100000, period: P1D",
        );
    assert!(sidecar.contains("limit: 1500") && sidecar.contains("limit: 100000"));
    let s = Stack::start_full("wasm-filter.yaml", &sidecar, sliced);
    let carol = caller("acme", Some("carol"));
    let (admitted, delivered, cut, org) =
        sixteen_streams(&s, &carol, "acme", json!({"userId": "carol"}), "org-daily").await;
    let team = s
        .usage("acme", json!({"userId": "carol"}), "research-daily")
        .await;
    assert_eq!(admitted, 16, "every stream's first slice fits");
    assert!(cut >= 1, "none was cut at the org's cap");
    assert!(
        delivered <= org && org <= 1500 + 16 * 64,
        "org {org}, delivered {delivered}"
    );
    assert_eq!(team, org, "the team counts what the org does");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_extend_finish_a_refused_stream_runs_to_its_budget_and_its_overshoot_is_counted() {
    let s = Stack::start_with("wasm-filter.yaml", |c| {
        sliced(c).replace(r#""mode": "extend""#, r#""mode": "extend-finish""#)
    });
    let carol = caller("acme", Some("carol"));
    let out = sdk(&s, &carol, "chat-stream-cut", &["--team", "research"]).await;
    assert!(out.get("error").is_none(), "{out}");
    assert_eq!(tokens(out["text"].as_str().unwrap()), 1000, "{out}");
    let reported = out["usage"]["total_tokens"].as_u64().unwrap();
    s.holds_closed().await;
    // Charged what it used, past research's 300: the admitted stream finished.
    let counted = s
        .usage("acme", json!({"userId": "carol"}), "research-daily")
        .await;
    assert_eq!(counted, reported);
    assert!(counted > RESEARCH_CAP);
    let stat = |name| s.envoy.filter_stat(name).unwrap();
    assert_eq!(stat("stream_refused"), 1);
    assert_eq!(stat("stream_cut"), 0);
    // Its record says it ran past the limit that refused it.
    let past = top_by(&s, "acme", "finishedPast").await;
    assert_eq!(past.get("research-daily"), Some(&(counted, 1)), "{past:?}");
    let over = stat("stream_overshoot_units");
    assert!(
        over > 0 && over < reported,
        "overshoot {over} of {reported} reported"
    );
    // The next call of the team is refused: the cap is spent.
    let again = sdk(&s, &carol, "chat-stream-cut", &["--team", "research"]).await;
    assert!(
        again["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("research-daily")),
        "{again}"
    );
}

/// `onSidecarDown: bounded`: with the sidecar killed mid-stream, the stream goes on a slice at
/// a time on the customer's bounded allowance (192 units a minute: three slices of 64), asking
/// the sidecar again for each, and is cut in the API's shape once the allowance is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_bounded_allowance_a_stream_outlives_its_sidecar_by_the_allowance_then_is_cut() {
    let s = Stack::start_with("wasm-filter.yaml", |c| {
        let c = sliced(c);
        let streaming = r#""streaming": { "mode": "extend","#;
        assert!(c.contains(streaming) && c.contains(r#""settlement": {"#));
        c.replace(
            streaming,
            r#""streaming": { "onSidecarDown": "bounded", "mode": "extend","#,
        )
        .replacen(
            r#""settlement": {"#,
            r#""boundedPerMinute": 192, "settlement": {"#,
            1,
        )
    });
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 2000, "stream": true,
        "messages": [{"role": "user", "content": "go"}]});
    let call = s
        .http
        .post(format!("{}/v1/chat/completions", s.envoy.url))
        .header("authorization", INITECH.as_str())
        .header("content-type", "application/json")
        .header("x-mock-output-tokens", "1000")
        .header("x-mock-pace-ms", "2")
        .body(body.to_string())
        .send();
    let mut r = call.await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut text = Vec::new();
    let mut killed = false;
    // Killed once the first slice is in use; the read stops at the reset after the cut.
    while let Ok(Some(chunk)) = r.chunk().await {
        text.extend_from_slice(&chunk);
        if !killed && String::from_utf8_lossy(&text).matches("tok ").count() >= 40 {
            s.sidecar.signal("KILL").unwrap();
            killed = true;
        }
    }
    assert!(killed, "the stream ended before the sidecar was killed");
    let text = String::from_utf8_lossy(&text);
    let delivered = text.matches("tok ").count() as u64;
    assert!(
        text.contains("could not be reached mid-stream"),
        "not ended with the error event: {text}"
    );
    let stat = |name| s.envoy.filter_stat(name).unwrap();
    assert_eq!(stat("stream_bounded"), 3, "three slices fit 192 units");
    assert_eq!(stat("stream_bounded_units"), 192);
    assert_eq!(
        stat("stream_unreachable"),
        4,
        "three on the allowance, one past it"
    );
    assert_eq!(stat("stream_cut"), 1);
    // At least the first slice and the allowance, and never the 1,000 it would have run to.
    let held = 64 + 64 * stat("stream_extended") + 192;
    assert!(
        delivered >= 64 + 192 && delivered <= held + 32,
        "{delivered} delivered with {held} covered"
    );
}

/// A stream held in slices settles its whole usage on its first hold, whose ceiling without a
/// `model` dimension would be ten times that first hold (64 tokens and the prompt): the filter
/// declares the stream's budget with it (`tollgate.budget`), so a stream of 1,000 tokens is
/// charged 1,000 tokens, not the first hold's ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_stream_without_a_model_dimension_is_charged_its_whole_usage() {
    const MODEL: &str = r#",
                                "model": { "body": "/model" }"#;
    let s = Stack::start_with("wasm-filter.yaml", |c| {
        assert!(c.contains(MODEL), "the WASM config changed shape");
        sliced(c.replace(MODEL, ""))
    });
    let (status, delivered, cut) = stream_chat(&s, &INITECH, 1000).await;
    assert_eq!((status, delivered, cut), (200, 1000, false));
    s.holds_closed().await;
    // 1,000 output tokens and 1 prompt token (the mock's count), recorded and counted once.
    assert_eq!(recorded(&s, "initech").await, 1001);
    let m = s.sidecar_metrics().await;
    assert_eq!(
        m.sum("tollgate_settles_capped_total", &[]),
        0.0,
        "a settlement was charged a ceiling instead of its usage"
    );
}
