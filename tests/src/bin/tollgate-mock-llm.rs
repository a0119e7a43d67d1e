//! A mock OpenAI-compatible upstream for the demo, the end-to-end tests and the Envoy
//! benchmarks: `POST /v1/chat/completions`, JSON or SSE (`"stream": true`), with `usage`.
//!
//! Usage is deterministic, so callers can compute the true usage: prompt tokens are the
//! whitespace-separated words of every message's content (at least 1), completion tokens are
//! `max_tokens` capped at 24 (16 without `max_tokens`). Test controls, by request header:
//! `x-mock-status: 500` answers that status; `x-mock-break: 1` ends an SSE stream before its
//! usage chunk by resetting the connection; `x-mock-usage-header: 1` reports the total usage in
//! an `x-usage-total-tokens` response header and leaves `usage` out of the body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use serde_json::{Value, json};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "A mock OpenAI-compatible chat completions server")]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
}

const MAX_COMPLETION: u64 = 24;

/// The usage the mock reports for a request body.
fn usage_of(body: &Value) -> (u64, u64) {
    let prompt = body["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|m| m["content"].as_str())
                .map(|c| c.split_whitespace().count() as u64)
                .sum::<u64>()
        })
        .unwrap_or(0)
        .max(1);
    let completion = body["max_tokens"]
        .as_u64()
        .map_or(16, |m| m.min(MAX_COMPLETION));
    (prompt, completion)
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Request headers echoed back as `x-echo-<name>`, so a test can see what reached the upstream.
const ECHOED: [&str; 5] = [
    "x-envoy-auth-failure-mode-allowed",
    "x-tollgate-hold-id",
    "x-tollgate-remaining",
    "x-tollgate-unchecked",
    "x-tollgate-no-matching-limit",
];

async fn completions(headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if headers.contains_key("x-mock-usage-header") {
        let (prompt, completion) = usage_of(&body);
        let mut response = Json(json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        }))
        .into_response();
        response.headers_mut().insert(
            "x-usage-total-tokens",
            axum::http::HeaderValue::from(prompt + completion),
        );
        return response;
    }
    let mut response = answer(&headers, Json(body)).await;
    for name in ECHOED {
        if let Some(v) = headers.get(name)
            && let Ok(echo) = axum::http::HeaderName::try_from(format!("x-echo-{name}"))
        {
            response.headers_mut().insert(echo, v.clone());
        }
    }
    response
}

async fn answer(headers: &HeaderMap, Json(body): Json<Value>) -> Response {
    if let Some(s) = headers
        .get("x-mock-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
    {
        return (s, Json(json!({"error": {"message": "mock failure"}}))).into_response();
    }
    let (prompt, completion) = usage_of(&body);
    let model = body["model"].as_str().unwrap_or("mock-1").to_string();
    if body["stream"].as_bool() != Some(true) {
        let text = vec!["tok"; usize::try_from(completion).unwrap_or(0)].join(" ");
        return Json(json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage_json(prompt, completion),
        }))
        .into_response();
    }
    let broken = headers.contains_key("x-mock-break");
    let include_usage = body["stream_options"]["include_usage"].as_bool() == Some(true);
    let stream = async_stream(model, prompt, completion, include_usage, broken);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The SSE events: one delta per completion token, then the usage chunk, then `[DONE]`.
fn async_stream(
    model: String,
    prompt: u64,
    completion: u64,
    include_usage: bool,
    broken: bool,
) -> impl futures_core::Stream<Item = Result<Bytes, std::io::Error>> {
    let mut events: Vec<Result<Bytes, std::io::Error>> = (0..completion)
        .map(|_| {
            let chunk = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"content": "tok "}}], "usage": null});
            Ok(Bytes::from(format!("data: {chunk}\n\n")))
        })
        .collect();
    if broken {
        events.push(Err(std::io::Error::other("mock stream broken on purpose")));
    } else {
        if include_usage {
            let chunk = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model,
                "choices": [], "usage": usage_json(prompt, completion)});
            events.push(Ok(Bytes::from(format!("data: {chunk}\n\n"))));
        }
        events.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    }
    tokio_stream::StreamExt::throttle(tokio_stream::iter(events), Duration::from_micros(200))
}

async fn health() -> Result<&'static str, Infallible> {
    Ok("ok")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/healthz", get(health));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("mock-llm ready addr={addr}");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("mock server")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_words_and_capped_completion() {
        let body =
            json!({"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 100});
        assert_eq!(usage_of(&body), (3, MAX_COMPLETION));
        assert_eq!(usage_of(&json!({})), (1, 16));
    }
}
