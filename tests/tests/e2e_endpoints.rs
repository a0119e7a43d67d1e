//! End to end with the official SDKs through real Envoy, the WASM filter (`api: openai` on the
//! catch-all route, `api: anthropic` under `/v1/messages`) and the sidecar: the endpoints
//! people call through a model gateway besides chat. Embeddings are metered at their reported
//! input; models, moderation and `count_tokens` are free (no sidecar call, nothing charged);
//! a file upload (multipart) passes; creating a batch is gated and charges nothing; a batch's
//! results are charged when read, once however often they are read; an endpoint without a
//! preset is refused; and SDK agents racing with a mix of endpoints are charged exactly what
//! the answers reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{INITECH, Stack, caller};
use tollgate_tests::sdk::sdk;

const FILTER: &str = "wasm-filter.yaml";
const T: Duration = Duration::from_secs(90);

fn ops() -> Value {
    json!({"teamId": "ops"})
}

async fn initech(s: &Stack) -> u64 {
    support::initech_ops(s).await
}

async fn run(s: &Stack, bearer: &str, scenario: &'static str, extra: &[&str]) -> Value {
    support::run_sdk(s, bearer, scenario, extra, T).await
}

/// Waits a little and checks initech's counter stayed at `want`.
async fn stays_at(s: &Stack, want: u64, what: &str) {
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(initech(s).await, want, "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn free_endpoints_pass_without_a_decision_and_embeddings_are_metered() {
    let s = Stack::start(FILTER);
    let before = initech(&s).await;
    let decisions = s.sidecar_decisions().await;
    let out = run(&s, &INITECH, "free-calls", &[]).await;
    assert_eq!(out["openai_models"], json!(["gpt-4o-mini"]), "{out}");
    assert_eq!(out["anthropic_models"], json!(["claude-sonnet-4"]), "{out}");
    assert_eq!(out["flagged"], false, "{out}");
    assert_eq!(out["counted"], 8, "{out}");
    assert_eq!(
        s.sidecar_decisions().await,
        decisions,
        "a free call was checked"
    );
    assert_eq!(s.envoy.filter_stat("free_passed").unwrap(), 4);
    stays_at(&s, before, "a free call was charged").await;

    // Embeddings: held for the input, settled at the reported prompt tokens (8 words).
    let out = run(&s, &INITECH, "embeddings", &[]).await;
    assert_eq!(out["dims"], 3, "the SDK decoded the base64 vector: {out}");
    assert_eq!(out["usage"]["total_tokens"], 8, "{out}");
    s.usage_settles_at("initech", ops(), "initech-daily", before + 8)
        .await;
    assert_eq!(s.sidecar_decisions().await, decisions + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_gated_when_created_and_charged_once_when_its_results_are_read() {
    let s = Stack::start(FILTER);
    let before = initech(&s).await;
    let decisions = s.sidecar_decisions().await;
    // OpenAI: the upload is multipart (passes), creating the batch is one decision that
    // charges nothing, and its output file, read twice, is charged once: three answers of
    // 10 + 5 tokens (the failed request is not).
    let out = run(&s, &INITECH, "openai-batch", &["--reads", "2"]).await;
    assert!(out["uploaded"].as_u64().unwrap() > 100, "{out}");
    assert_eq!(out["status"], "completed", "{out}");
    assert_eq!(out["answers"], json!([3, 3]), "{out}");
    assert_eq!(s.sidecar_decisions().await, decisions + 1, "{out}");
    s.usage_settles_at("initech", ops(), "initech-daily", before + 45)
        .await;
    stays_at(&s, before + 45, "the results were charged twice").await;
    assert_eq!(
        s.envoy.filter_stat("released").unwrap(),
        1,
        "the gate's hold was released"
    );

    // Anthropic: the same; two succeeded messages of 12 + 8 tokens, read twice.
    let out = run(&s, &INITECH, "anthropic-batch", &["--reads", "2"]).await;
    assert_eq!(out["status"], "ended", "{out}");
    assert_eq!(out["succeeded"], json!([2, 2]), "{out}");
    assert_eq!(s.sidecar_decisions().await, decisions + 2, "{out}");
    s.usage_settles_at("initech", ops(), "initech-daily", before + 45 + 40)
        .await;
    stays_at(&s, before + 85, "the results were charged twice").await;
    // The usage records name the batches' models.
    let m = s.sidecar_metrics().await;
    assert_eq!(
        m.sum("tollgate_usage_events_total", &[("result", "recorded")]),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_with_nothing_left_cannot_create_a_batch() {
    let s = Stack::start(FILTER);
    // research's cap is 300: spend it whole, then creating a batch is refused.
    let carol = caller("acme", Some("carol"));
    let spent = run(
        &s,
        &carol,
        "chat-json",
        &["--team", "research", "--header", "x-mock-extra-prompt: 400"],
    )
    .await;
    assert!(
        spent["usage"]["total_tokens"].as_u64().unwrap() > 300,
        "{spent}"
    );
    s.usage_settles_at(
        "acme",
        json!({"teamId": "research"}),
        "research-daily",
        spent["usage"]["total_tokens"].as_u64().unwrap(),
    )
    .await;
    let decisions = s.sidecar_decisions().await;
    for scenario in ["openai-batch", "anthropic-batch"] {
        let err = tokio::task::spawn_blocking({
            let url = s.envoy.url.clone();
            let token = carol.trim_start_matches("Bearer ").to_string();
            move || sdk(&url, &token, scenario, &["--team", "research"], T)
        })
        .await
        .unwrap()
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("RateLimitError") && err.contains("research-daily"),
            "{scenario}: {err}"
        );
    }
    // One refused decision each (the quota resets tomorrow: the SDKs were told not to retry).
    assert_eq!(s.sidecar_decisions().await, decisions + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_without_a_preset_is_refused_by_default() {
    let s = Stack::start(FILTER);
    let before = initech(&s).await;
    let decisions = s.sidecar_decisions().await;
    let out = run(&s, &INITECH, "unknown-endpoint", &[]).await;
    assert_eq!(out["status"], 403, "{out}");
    let message = out["message"].as_str().unwrap();
    assert!(
        message.contains("/v1/images/generations") && message.contains("unknownEndpoints"),
        "{message}"
    );
    assert_eq!(out["should_retry"], "false", "{out}");
    assert_eq!(s.sidecar_decisions().await, decisions);
    assert_eq!(s.envoy.filter_stat("unknown_denied").unwrap(), 1);
    stays_at(&s, before, "a refused call was charged").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_agents_racing_with_mixed_endpoints_are_charged_exactly_what_was_reported() {
    let s = Stack::start(FILTER);
    let before = initech(&s).await;
    let out = run(
        &s,
        &INITECH,
        "race",
        &[
            "--mixed",
            "--agents",
            "16",
            "--requests",
            "6",
            "--seed",
            "11",
        ],
    )
    .await;
    assert_eq!(out["errors"], json!([]), "{out}");
    assert_eq!(out["denied"], 0, "initech's cap is roomy: {out}");
    let granted = out["granted"].as_u64().unwrap();
    assert!(granted > 0, "{out}");
    s.usage_settles_at("initech", ops(), "initech-daily", before + granted)
        .await;
    stays_at(&s, before + granted, "charged more than reported").await;
    assert_eq!(
        s.envoy.filter_stat("usage_unknown").unwrap(),
        0,
        "every answer's usage was read"
    );
}
