//! A mock model upstream for the demo, the end-to-end tests and the Envoy benchmarks, speaking
//! the APIs Tollgate has presets for, JSON or SSE (`"stream": true`), with usage:
//! OpenAI's `POST /v1/chat/completions` and `POST /v1/responses`, and Anthropic's
//! `POST /v1/messages`, in the shapes their official SDKs parse; and the endpoints around them
//! that the SDKs call: embeddings, moderations, models, files (multipart uploads; the content
//! of a batch's output file), batches, Anthropic's `count_tokens` and message batches.
//!
//! Batches are done at once. An OpenAI batch's output file (`file-out-…`) holds three answers
//! of `gpt-4o-mini` with 10 prompt and 5 completion tokens each, and one failed request; an
//! Anthropic batch's results hold two succeeded `claude-sonnet-4` messages of 12 input and 8
//! output tokens, and one errored request. Embeddings report the input's words as tokens.
//!
//! Usage is deterministic, so callers can compute the true usage: prompt tokens are the
//! whitespace-separated words of every message's (or `input`'s) text (at least 1), output
//! tokens are the output budget (`max_tokens`, `max_completion_tokens`, `max_output_tokens`)
//! capped at 24 (16 without one), times `n`; the content is one `"tok "` per output token.
//! Answers are gzip-compressed when the request accepts it.
//!
//! Test controls, by request header: `x-mock-status: 500` answers that status;
//! `x-mock-break: 1` ends a stream before its usage by resetting the connection;
//! `x-mock-usage-header: 1` reports the total usage in an `x-usage-total-tokens` response header
//! and leaves `usage` out of the body; `x-mock-linger-ms: N` keeps a stream open N ms after its
//! last event (`[DONE]`) before ending it; `x-mock-cache: <write>,<read>` reports that many
//! cache-written and cache-read input tokens (Anthropic) or cached tokens (OpenAI, the read);
//! `x-mock-extra-prompt: N` adds N prompt tokens the request body does not show (a stored
//! conversation, a file or an image); `x-mock-pace-ms: N` sends a stream's events N ms apart;
//! `x-mock-output-tokens: N` answers N output tokens whatever the request's budget;
//! `x-mock-report-usage: <name>` also reports a JSON answer's total usage in response header
//! `<name>`, as a service on Envoy's native ext_authz path does for its access log.
//!
//! As a stand-in for a real provider (`--tls-cert`, `--tls-key`, `--require-key`): HTTPS only,
//! every request must carry the provider's key (`authorization: Bearer <key>` or
//! `x-api-key: <key>`) or gets the provider's 401, and each answer carries
//! `x-echo-request`: every request header it received and the TLS server name (SNI) the
//! client asked for, as JSON, so a test sees exactly what reached the provider.

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
#[command(
    about = "A mock model upstream: OpenAI chat completions and responses, Anthropic messages"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Serve HTTPS with this PEM certificate chain (with `--tls-key`).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Refuse (401, in the provider's error shape) every request that does not carry this key.
    #[arg(long)]
    require_key: Option<String>,
}

/// The provider's key, if one is required.
#[derive(Clone)]
struct Provider {
    key: Option<std::sync::Arc<str>>,
}

/// The TLS server name a connection asked for, put on each of its requests.
#[derive(Clone)]
struct ServerName(Option<String>);

/// Checks the provider's key and echoes what arrived, as a provider stand-in.
async fn provider_gate(
    axum::extract::State(provider): axum::extract::State<Provider>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(key) = provider.key else {
        return next.run(request).await;
    };
    let headers = request.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let mut seen = serde_json::Map::new();
    for (name, value) in headers {
        seen.insert(
            name.as_str().to_string(),
            String::from_utf8_lossy(value.as_bytes())
                .into_owned()
                .into(),
        );
    }
    let sni = request
        .extensions()
        .get::<ServerName>()
        .and_then(|s| s.0.clone());
    let echo = json!({"headers": seen, "sni": sni}).to_string();
    let mut response = if bearer == Some(&*key) || api_key == Some(&*key) {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"message": "Incorrect API key provided.",
                "type": "invalid_request_error", "code": "invalid_api_key"}})),
        )
            .into_response()
    };
    if let Ok(v) = axum::http::HeaderValue::from_str(&echo) {
        response.headers_mut().insert("x-echo-request", v);
    }
    response
}

/// Serves `app` over TLS with the certificate chain and key in `cert` and `key` (PEM).
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: Router,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    let private = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{} is not a PEM private key", key.display()))?;
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .context("the certificate does not fit the key")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => accepted.context("accept")?,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            // A client that fails the handshake (wrong name, no trust) is simply dropped.
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let name = ServerName(tls.get_ref().1.server_name().map(str::to_string));
            let service = hyper::service::service_fn(
                move |mut request: axum::extract::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(name.clone());
                    let app = app.clone();
                    async move {
                        use tower::ServiceExt as _;
                        app.oneshot(request.map(Body::new)).await
                    }
                },
            );
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

const MAX_COMPLETION: u64 = 24;

/// Which API a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    Chat,
    Responses,
    Messages,
}

fn words(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(items) => items.iter().map(words).sum(),
        Value::Object(o) => ["content", "text", "input"]
            .iter()
            .filter_map(|k| o.get(*k))
            .map(words)
            .sum(),
        _ => 0,
    }
}

/// The usage the mock reports for a request body: (prompt, completion).
fn usage_of(api: Api, body: &Value) -> (u64, u64) {
    let prompt = match api {
        Api::Responses => words(&body["input"]) + words(&body["instructions"]),
        Api::Chat | Api::Messages => words(&body["messages"]) + words(&body["system"]),
    }
    .max(1);
    let budget = match api {
        Api::Chat => body["max_completion_tokens"]
            .as_u64()
            .or(body["max_tokens"].as_u64()),
        Api::Responses => body["max_output_tokens"].as_u64(),
        Api::Messages => body["max_tokens"].as_u64(),
    };
    let n = if api == Api::Chat {
        body["n"].as_u64().unwrap_or(1).max(1)
    } else {
        1
    };
    (prompt, budget.map_or(16, |m| m.min(MAX_COMPLETION)) * n)
}

/// Cache-written and cache-read input tokens asked for with `x-mock-cache: <write>,<read>`.
fn cache_of(headers: &HeaderMap) -> (u64, u64) {
    headers
        .get("x-mock-cache")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(','))
        .map_or((0, 0), |(w, r)| {
            (w.trim().parse().unwrap_or(0), r.trim().parse().unwrap_or(0))
        })
}

/// Request headers echoed back as `x-echo-<name>`, so a test can see what reached the upstream.
const ECHOED: [&str; 7] = [
    "authorization",
    "x-envoy-auth-failure-mode-allowed",
    "x-tollgate-hold-id",
    "x-tollgate-remaining",
    "x-tollgate-unchecked",
    "x-tollgate-no-matching-limit",
    "accept-encoding",
];

async fn chat(headers: HeaderMap, Json(body): Json<Value>) -> Response {
    respond(Api::Chat, headers, body).await
}

async fn responses(headers: HeaderMap, Json(body): Json<Value>) -> Response {
    respond(Api::Responses, headers, body).await
}

async fn messages(headers: HeaderMap, Json(body): Json<Value>) -> Response {
    respond(Api::Messages, headers, body).await
}

async fn respond(api: Api, headers: HeaderMap, body: Value) -> Response {
    let mut response = answer(api, &headers, body);
    for name in ECHOED {
        if let Some(v) = headers.get(name)
            && let Ok(echo) = axum::http::HeaderName::try_from(format!("x-echo-{name}"))
        {
            response.headers_mut().insert(echo, v.clone());
        }
    }
    response
}

fn usage_json(api: Api, prompt: u64, completion: u64, cache: (u64, u64)) -> Value {
    let (write, read) = cache;
    match api {
        Api::Chat => json!({"prompt_tokens": prompt + read, "completion_tokens": completion,
            "total_tokens": prompt + read + completion,
            "prompt_tokens_details": {"cached_tokens": read},
            "completion_tokens_details": {"reasoning_tokens": 0}}),
        Api::Responses => json!({"input_tokens": prompt + read,
            "input_tokens_details": {"cached_tokens": read}, "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + read + completion}),
        Api::Messages => json!({"input_tokens": prompt, "output_tokens": completion,
            "cache_creation_input_tokens": write, "cache_read_input_tokens": read}),
    }
}

fn answer(api: Api, headers: &HeaderMap, body: Value) -> Response {
    if let Some(s) = headers
        .get("x-mock-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
    {
        let error = match api {
            Api::Messages => {
                json!({"type": "error", "error": {"type": "api_error", "message": "mock failure"}})
            }
            _ => json!({"error": {"message": "mock failure", "type": "server_error"}}),
        };
        return (s, Json(error)).into_response();
    }
    let (prompt, completion) = usage_of(api, &body);
    // A long answer on demand, whatever the request's budget says.
    let completion = header_number(headers, "x-mock-output-tokens").unwrap_or(completion);
    let prompt = prompt + header_number(headers, "x-mock-extra-prompt").unwrap_or(0);
    let cache = cache_of(headers);
    let model = body["model"].as_str().unwrap_or("mock-1").to_string();
    let text = "tok ".repeat(usize::try_from(completion).unwrap_or(0));
    if headers.contains_key("x-mock-usage-header") {
        let mut response = Json(whole(api, &model, &text, None)).into_response();
        response.headers_mut().insert(
            "x-usage-total-tokens",
            axum::http::HeaderValue::from(prompt + completion),
        );
        return response;
    }
    if body["stream"].as_bool() != Some(true) {
        let usage = usage_json(api, prompt, completion, cache);
        let mut response = Json(whole(api, &model, &text, Some(usage))).into_response();
        if let Some(name) = headers
            .get("x-mock-report-usage")
            .and_then(|v| axum::http::HeaderName::try_from(v.as_bytes()).ok())
        {
            let (write, read) = cache;
            response.headers_mut().insert(
                name,
                axum::http::HeaderValue::from(prompt + completion + write + read),
            );
        }
        return response;
    }
    let broken = headers.contains_key("x-mock-break");
    let linger = header_number(headers, "x-mock-linger-ms").map(Duration::from_millis);
    let pace = header_number(headers, "x-mock-pace-ms")
        .map_or(Duration::from_micros(200), Duration::from_millis);
    let include_usage =
        api != Api::Chat || body["stream_options"]["include_usage"].as_bool() == Some(true);
    let usage = include_usage.then(|| usage_json(api, prompt, completion, cache));
    let events = stream_events(api, &model, completion, usage, cache, broken);
    let stream = async_stream::stream(events, pace, linger);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A whole number in the request header `name`.
fn header_number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// A whole (non-streamed) answer.
fn whole(api: Api, model: &str, text: &str, usage: Option<Value>) -> Value {
    let mut v = match api {
        Api::Chat => json!({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
        }),
        Api::Responses => response_object(model, text, "completed"),
        Api::Messages => json!({
            "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": null,
        }),
    };
    if let Some(u) = usage {
        v["usage"] = u;
    }
    v
}

fn response_object(model: &str, text: &str, status: &str) -> Value {
    json!({
        "id": "resp_mock", "object": "response", "created_at": 0, "status": status,
        "model": model, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
        "output": [{"type": "message", "id": "msg_mock", "role": "assistant", "status": status,
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}],
    })
}

fn sse(event: Option<&str>, data: &Value) -> Result<Bytes, std::io::Error> {
    Ok(Bytes::from(match event {
        Some(e) => format!("event: {e}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }))
}

/// The events of a stream: one content delta per output token, then the usage the API
/// reports at its end, in the API's own events.
fn stream_events(
    api: Api,
    model: &str,
    completion: u64,
    usage: Option<Value>,
    cache: (u64, u64),
    broken: bool,
) -> Vec<Result<Bytes, std::io::Error>> {
    let mut events = Vec::new();
    let broke = || Err(std::io::Error::other("mock stream broken on purpose"));
    match api {
        Api::Chat => {
            events.push(sse(None, &json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                "created": 0, "model": model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": null})));
            for _ in 0..completion {
                events.push(sse(
                    None,
                    &json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                    "created": 0, "model": model,
                    "choices": [{"index": 0, "delta": {"content": "tok "}}], "usage": null}),
                ));
            }
            events.push(sse(
                None,
                &json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                "created": 0, "model": model,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": null}),
            ));
            if broken {
                events.push(broke());
                return events;
            }
            if let Some(u) = usage {
                events.push(sse(
                    None,
                    &json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                    "created": 0, "model": model, "choices": [], "usage": u}),
                ));
            }
            events.push(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
        }
        Api::Responses => {
            let mut seq = 0u64;
            let mut next = || {
                seq += 1;
                seq
            };
            let mut created = response_object(model, "", "in_progress");
            created["output"] = json!([]);
            events.push(sse(Some("response.created"),
                &json!({"type": "response.created", "sequence_number": next(), "response": created})));
            for _ in 0..completion {
                events.push(sse(
                    Some("response.output_text.delta"),
                    &json!({"type": "response.output_text.delta", "sequence_number": next(),
                        "item_id": "msg_mock", "output_index": 0, "content_index": 0,
                        "delta": "tok ", "logprobs": []}),
                ));
            }
            if broken {
                events.push(broke());
                return events;
            }
            let mut done = response_object(
                model,
                &"tok ".repeat(usize::try_from(completion).unwrap_or(0)),
                "completed",
            );
            if let Some(u) = usage {
                done["usage"] = u;
            }
            events.push(sse(
                Some("response.completed"),
                &json!({"type": "response.completed", "sequence_number": next(), "response": done}),
            ));
        }
        Api::Messages => {
            let (write, read) = cache;
            let prompt = usage
                .as_ref()
                .and_then(|u| u["input_tokens"].as_u64())
                .unwrap_or(0);
            events.push(sse(
                Some("message_start"),
                &json!({"type": "message_start", "message": {
                "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": prompt, "output_tokens": 1,
                          "cache_creation_input_tokens": write, "cache_read_input_tokens": read}}}),
            ));
            events.push(sse(
                Some("content_block_start"),
                &json!({"type": "content_block_start",
                "index": 0, "content_block": {"type": "text", "text": ""}}),
            ));
            for _ in 0..completion {
                events.push(sse(
                    Some("content_block_delta"),
                    &json!({"type": "content_block_delta",
                    "index": 0, "delta": {"type": "text_delta", "text": "tok "}}),
                ));
            }
            events.push(sse(
                Some("content_block_stop"),
                &json!({"type": "content_block_stop", "index": 0}),
            ));
            if broken {
                events.push(broke());
                return events;
            }
            events.push(sse(
                Some("message_delta"),
                &json!({"type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"output_tokens": completion}}),
            ));
            events.push(sse(Some("message_stop"), &json!({"type": "message_stop"})));
        }
    }
    events
}

/// The events as a body stream, `pace` apart, then (with `linger`) an open wait before the end:
/// an upstream that finishes its response a little after its last event (`[DONE]`).
mod async_stream {
    use std::time::Duration;

    use axum::body::Bytes;
    use futures_core::Stream;
    use futures_util::StreamExt as _;

    pub fn stream(
        events: Vec<Result<Bytes, std::io::Error>>,
        pace: Duration,
        linger: Option<Duration>,
    ) -> impl Stream<Item = Result<Bytes, std::io::Error>> {
        let paced = tokio_stream::StreamExt::throttle(tokio_stream::iter(events), pace);
        let tail = futures_util::stream::once(async move {
            if let Some(d) = linger {
                tokio::time::sleep(d).await;
            }
        })
        .filter_map(|()| async { None::<Result<Bytes, std::io::Error>> });
        paced.chain(tail)
    }
}

/// OpenAI `POST /v1/embeddings`: one vector per input, base64 when asked (the SDK asks).
async fn embeddings(Json(body): Json<Value>) -> Response {
    let inputs = match &body["input"] {
        Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    };
    let tokens = words(&body["input"]).max(1);
    // [0.0, 0.5, 1.0] as little-endian float32s.
    let vector = if body["encoding_format"] == "base64" {
        json!("AAAAAAAAAD8AAIA/")
    } else {
        json!([0.0, 0.5, 1.0])
    };
    let data: Vec<Value> = (0..inputs.len())
        .map(|i| json!({"object": "embedding", "index": i, "embedding": vector}))
        .collect();
    Json(
        json!({"object": "list", "data": data, "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
    .into_response()
}

/// OpenAI `POST /v1/moderations`.
async fn moderations() -> Response {
    Json(json!({"id": "modr-mock", "model": "omni-moderation-latest",
        "results": [{"flagged": false, "categories": {}, "category_scores": {},
                     "category_applied_input_types": {}}]}))
    .into_response()
}

/// `GET /v1/models`, in Anthropic's shape when the request carries `anthropic-version`.
async fn models(headers: HeaderMap) -> Response {
    if headers.contains_key("anthropic-version") {
        return Json(json!({"data": [{"type": "model", "id": "claude-sonnet-4",
            "display_name": "Claude Sonnet 4", "created_at": "2025-05-22T00:00:00Z"}],
            "has_more": false, "first_id": "claude-sonnet-4", "last_id": "claude-sonnet-4"}))
        .into_response();
    }
    Json(
        json!({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model",
        "created": 0, "owned_by": "mock"}]}),
    )
    .into_response()
}

/// OpenAI `POST /v1/files` (multipart): the file is not kept, only its size told.
async fn upload(body: Bytes) -> Response {
    Json(
        json!({"id": "file-in-mock", "object": "file", "bytes": body.len(), "created_at": 0,
        "filename": "input.jsonl", "purpose": "batch", "status": "processed"}),
    )
    .into_response()
}

fn batch_object(id: &str) -> Value {
    json!({"id": id, "object": "batch", "endpoint": "/v1/chat/completions",
        "input_file_id": "file-in-mock", "completion_window": "24h", "status": "completed",
        "output_file_id": format!("file-out-{id}"), "error_file_id": null, "created_at": 0,
        "request_counts": {"total": 4, "completed": 3, "failed": 1}})
}

/// OpenAI `POST /v1/batches`: done at once.
async fn create_batch() -> Response {
    Json(batch_object("batch_mock")).into_response()
}

/// OpenAI `GET /v1/batches/{id}`.
async fn get_batch(axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    Json(batch_object(&id)).into_response()
}

/// OpenAI `GET /v1/files/{id}/content`: an output file's answers, or an input file's requests.
async fn file_content(axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    let mut lines = Vec::new();
    if id.starts_with("file-out-") {
        for i in 0..3 {
            lines.push(
                json!({"id": format!("batch_req_{i}"), "custom_id": format!("r-{i}"),
                "response": {"status_code": 200, "request_id": format!("req_{i}"),
                    "body": whole(Api::Chat, "gpt-4o-mini", "tok tok tok tok tok ",
                        Some(usage_json(Api::Chat, 10, 5, (0, 0))))},
                "error": null}),
            );
        }
        lines.push(json!({"id": "batch_req_x", "custom_id": "r-x",
            "response": {"status_code": 500, "request_id": "req_x",
                "body": {"error": {"message": "mock failure"},
                         "usage": {"prompt_tokens": 99, "total_tokens": 99}}},
            "error": null}));
    } else {
        lines.push(
            json!({"custom_id": "r-0", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}}),
        );
    }
    jsonl(&lines)
}

fn jsonl(lines: &[Value]) -> Response {
    let mut text = String::new();
    for l in lines {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(Body::from(text))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Anthropic `POST /v1/messages/count_tokens`.
async fn count_tokens(Json(body): Json<Value>) -> Response {
    let tokens = (words(&body["messages"]) + words(&body["system"])).max(1);
    Json(json!({"input_tokens": tokens})).into_response()
}

fn message_batch(headers: &HeaderMap, id: &str) -> Value {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    json!({"id": id, "type": "message_batch", "processing_status": "ended",
        "request_counts": {"processing": 0, "succeeded": 2, "errored": 1, "canceled": 0,
                           "expired": 0},
        "created_at": "2026-01-01T00:00:00Z", "ended_at": "2026-01-01T00:00:01Z",
        "expires_at": "2026-01-02T00:00:00Z", "archived_at": null, "cancel_initiated_at": null,
        // Where the SDK fetches the results: back through whatever the client called.
        "results_url": format!("http://{host}/v1/messages/batches/{id}/results")})
}

/// Anthropic `POST /v1/messages/batches`: done at once.
async fn create_message_batch(headers: HeaderMap) -> Response {
    Json(message_batch(&headers, "msgbatch_mock")).into_response()
}

/// Anthropic `GET /v1/messages/batches/{id}`.
async fn get_message_batch(
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    Json(message_batch(&headers, &id)).into_response()
}

/// Anthropic `GET /v1/messages/batches/{id}/results`.
async fn message_batch_results() -> Response {
    let mut lines = Vec::new();
    for i in 0..2 {
        let mut message = whole(
            Api::Messages,
            "claude-sonnet-4",
            "tok tok tok tok tok tok tok tok ",
            Some(usage_json(Api::Messages, 12, 8, (0, 0))),
        );
        message["id"] = json!(format!("msg_{i}"));
        lines.push(json!({"custom_id": format!("r-{i}"),
            "result": {"type": "succeeded", "message": message}}));
    }
    lines.push(json!({"custom_id": "r-x", "result": {"type": "errored",
        "error": {"type": "error", "error": {"type": "api_error", "message": "mock failure"}}}}));
    jsonl(&lines)
}

async fn health() -> Result<&'static str, Infallible> {
    Ok("ok")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/responses", post(responses))
        .route("/v1/messages", post(messages))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/moderations", post(moderations))
        .route("/v1/models", get(models))
        .route("/v1/files", post(upload))
        .route("/v1/files/{id}/content", get(file_content))
        .route("/v1/batches", post(create_batch))
        .route("/v1/batches/{id}", get(get_batch))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/messages/batches", post(create_message_batch))
        .route("/v1/messages/batches/{id}", get(get_message_batch))
        .route(
            "/v1/messages/batches/{id}/results",
            get(message_batch_results),
        )
        .route("/healthz", get(health))
        .layer(axum::middleware::from_fn_with_state(
            Provider {
                key: args.require_key.as_deref().map(std::sync::Arc::from),
            },
            provider_gate,
        ))
        // Like the providers: compressed when the request accepts it (streams too).
        .layer(
            tower_http::compression::CompressionLayer::new()
                .gzip(true)
                .compress_when(tower_http::compression::predicate::SizeAbove::new(0)),
        );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    println!("mock-llm ready addr={addr}");
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        return serve_tls(listener, app, cert, key).await;
    }
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
    fn usage_is_words_and_capped_output() {
        let body =
            json!({"messages": [{"role": "user", "content": "one two three"}], "max_tokens": 100});
        assert_eq!(usage_of(Api::Chat, &body), (3, MAX_COMPLETION));
        assert_eq!(usage_of(Api::Chat, &json!({})), (1, 16));
        let n = json!({"messages": [], "max_completion_tokens": 5, "n": 3});
        assert_eq!(usage_of(Api::Chat, &n), (1, 15));
        let r = json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": "a b"}]}],
            "instructions": "c", "max_output_tokens": 7});
        assert_eq!(usage_of(Api::Responses, &r), (3, 7));
        let m = json!({"system": "s", "messages": [{"role": "user", "content": "x y"}], "max_tokens": 2});
        assert_eq!(usage_of(Api::Messages, &m), (3, 2));
    }
}
