//! The sidecar call and its answer: the ext_authz `CheckRequest` built from extracted values,
//! the `CheckResponse` read into a grant or a denial, and every way the call can fail mapped
//! to the fail mode.

use prost::Message;
use prost_types::value::Kind;
use tollgate_proto::envoywire as wire;

use crate::api::{Api, ErrorKind, LimitKind, error_body};
use crate::config::{Effective, FailMode};
use crate::extract::{BadInput, Extracted};

/// The sidecar's ext_authz service and method.
pub const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";
pub const AUTHZ_METHOD: &str = "Check";

pub use tollgate_proto::ext_authz::HEADER_UNCHECKED;
use tollgate_proto::ext_authz::{
    HEADER_HOLD_ID, KEY_BUDGET, KEY_CUSTOMER, KEY_DEADLINE, KEY_DIMENSION_PREFIX, KEY_EXTENDS,
    KEY_FEATURE, KEY_USAGE, METADATA_HOLD_ID,
};

/// Request facts sent along for the sidecar's logs.
#[derive(Debug, Default, Clone)]
pub struct RequestInfo {
    pub id: String,
    pub method: String,
    pub path: String,
    pub host: String,
}

/// When the sidecar should stop deciding, in ms since the epoch: the call's timeout less a
/// margin for the answer's way back (a quarter of it, at most 50 ms), so that a decision made in
/// time reaches the filter before it gives up.
pub fn deadline_millis(now_millis: u64, timeout: std::time::Duration) -> u64 {
    let timeout = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let margin = (timeout / 4).min(50);
    now_millis.saturating_add(timeout - margin)
}

/// The ext_authz `CheckRequest` for one request, encoded. `deadline` (ms since the epoch) tells
/// the sidecar when the filter stops waiting.
pub fn check_request(x: &Extracted, info: &RequestInfo, deadline: Option<u64>) -> Vec<u8> {
    check_request_for(x, info, deadline, Part::Call)
}

/// What part of a call a check asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part<'a> {
    /// The whole call.
    Call,
    /// The first hold of a call streamed in slices, which may grow to `budget` units
    /// (`tollgate.budget`: its settlement ceiling covers the whole stream).
    StreamStart { budget: u64 },
    /// A streamed call's next slice: `x.usage` is the slice, `extends` the call's first hold
    /// id (`tollgate.extends`).
    Slice { extends: &'a str },
}

/// [`check_request`] for a `part` of a streamed call.
pub fn check_request_for(
    x: &Extracted,
    info: &RequestInfo,
    deadline: Option<u64>,
    part: Part<'_>,
) -> Vec<u8> {
    let mut ext = std::collections::HashMap::with_capacity(5 + x.dimensions.len());
    match part {
        Part::Call => {}
        Part::StreamStart { budget } => {
            ext.insert(KEY_BUDGET.to_string(), budget.to_string());
        }
        Part::Slice { extends } => {
            ext.insert(KEY_EXTENDS.to_string(), extends.to_string());
        }
    }
    if let Some(d) = deadline {
        ext.insert(KEY_DEADLINE.to_string(), d.to_string());
    }
    if let Some(c) = &x.customer {
        ext.insert(KEY_CUSTOMER.to_string(), c.clone());
    }
    if let Some(f) = &x.feature {
        ext.insert(KEY_FEATURE.to_string(), f.clone());
    }
    if let Some(u) = x.usage {
        ext.insert(KEY_USAGE.to_string(), u.to_string());
    }
    for (k, v) in &x.dimensions {
        ext.insert(format!("{KEY_DIMENSION_PREFIX}{k}"), v.clone());
    }
    wire::CheckRequest {
        attributes: Some(wire::AttributeContext {
            request: Some(wire::attribute_context::Request {
                http: Some(wire::attribute_context::HttpRequest {
                    id: info.id.clone(),
                    method: info.method.clone(),
                    path: info.path.clone(),
                    host: info.host.clone(),
                    ..Default::default()
                }),
            }),
            context_extensions: ext,
        }),
    }
    .encode_to_vec()
}

/// A local reply: status, headers and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What a grant changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// Headers for the upstream request.
    pub upstream_headers: Vec<(String, String)>,
    pub remove_headers: Vec<String>,
    /// Headers for the client's response (`RateLimit-*`).
    pub response_headers: Vec<(String, String)>,
    /// The hold to settle, when the decision opened one.
    pub hold_id: Option<String>,
}

/// Why the sidecar gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The call could not start: no such cluster, or the host refused it.
    Dispatch(String),
    /// The call timed out.
    Timeout,
    /// A non-OK gRPC status: connection refused, HTTP/2 missing, sidecar errors.
    Status { code: u32, message: String },
    /// An OK gRPC status whose body is not a `CheckResponse`.
    Undecodable(String),
    /// The sidecar answered with an `error_response`.
    ErrorResponse(u32),
}

impl Failure {
    /// A short code for the unchecked header, the JSON body and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Dispatch(_) => "dispatch_failed",
            Self::Timeout => "timeout",
            Self::Status { code: 14, .. } => "unavailable",
            // The gateway token is missing, wrong, or does not reach the customer: a
            // configuration problem, told apart from an outage.
            Self::Status { code: 16, .. } => "unauthenticated",
            Self::Status { code: 7, .. } => "permission_denied",
            Self::Status { .. } => "grpc_error",
            Self::Undecodable(_) => "bad_response",
            Self::ErrorResponse(_) => "error_response",
        }
    }

    /// Maps a failed gRPC call. Envoy reports timeouts as status 14 (UNAVAILABLE) too; only the
    /// message tells them apart.
    pub fn from_grpc(code: u32, message: Option<String>) -> Self {
        // A gRPC status message travels percent-encoded (`grpc-message`), and the host hands
        // it on as it came: decode it once, here, so every answer and log reads as written.
        let message = message
            .map(|m| {
                let m = percent_encoding::percent_decode_str(&m).decode_utf8_lossy();
                // Envoy tells where the status came from after the message; the reader needs
                // only the message.
                m.strip_suffix("{via_upstream}").unwrap_or(&m).to_string()
            })
            .unwrap_or_default();
        if code == 4 || (code == 14 && message.contains("timeout")) {
            Self::Timeout
        } else {
            Self::Status { code, message }
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dispatch(why) => write!(f, "the sidecar call could not start: {why}"),
            Self::Timeout => write!(f, "the sidecar did not answer in time"),
            Self::Status { code, message } => {
                write!(
                    f,
                    "the sidecar call failed with gRPC status {code}: {message}"
                )
            }
            Self::Undecodable(why) => write!(f, "the sidecar's answer is unreadable: {why}"),
            Self::ErrorResponse(s) => write!(f, "the sidecar answered an error ({s})"),
        }
    }
}

/// The sidecar's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Grant(Grant),
    Deny(Reply),
    Fail(Failure),
}

fn pairs(headers: &[wire::HeaderValueOption]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| {
            let value = if h.value.is_empty() && !h.raw_value.is_empty() {
                String::from_utf8_lossy(&h.raw_value).into_owned()
            } else {
                h.value.clone()
            };
            (h.key.to_ascii_lowercase(), value)
        })
        .collect()
}

/// Reads an encoded `CheckResponse`.
pub fn verdict(body: &[u8], upstream_headers: bool) -> Verdict {
    let r = match wire::CheckResponse::decode(body) {
        Ok(r) => r,
        Err(e) => return Verdict::Fail(Failure::Undecodable(e.to_string())),
    };
    let code = r.status.as_ref().map_or(0, |s| s.code);
    use wire::check_response::HttpResponse;
    match (code, r.http_response) {
        (_, Some(HttpResponse::ErrorResponse(e))) => Verdict::Fail(Failure::ErrorResponse(
            e.status.map_or(0, |s| u32::try_from(s.code).unwrap_or(0)),
        )),
        (0, ok) => {
            let ok = match ok {
                Some(HttpResponse::OkResponse(o)) => o,
                _ => wire::OkHttpResponse::default(),
            };
            let mut grant = Grant {
                upstream_headers: if upstream_headers {
                    pairs(&ok.headers)
                } else {
                    Vec::new()
                },
                remove_headers: ok.headers_to_remove,
                response_headers: pairs(&ok.response_headers_to_add),
                hold_id: None,
            };
            grant.hold_id = r
                .dynamic_metadata
                .as_ref()
                .and_then(|m| m.fields.get(METADATA_HOLD_ID))
                .and_then(|v| match &v.kind {
                    Some(Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .or_else(|| {
                    pairs(&ok.headers)
                        .into_iter()
                        .find(|(k, _)| k == HEADER_HOLD_ID)
                        .map(|(_, v)| v)
                });
            Verdict::Grant(grant)
        }
        (_, denied) => {
            let (status, headers, body) = match denied {
                Some(HttpResponse::DeniedResponse(d)) => (
                    d.status
                        .map_or(403, |s| u32::try_from(s.code).unwrap_or(403)),
                    pairs(&d.headers),
                    d.body.into_bytes(),
                ),
                _ => (403, Vec::new(), Vec::new()),
            };
            // Envoy's own filter answers 403 for a status it does not know; keep that.
            let status = if (200..=599).contains(&status) {
                status
            } else {
                403
            };
            Verdict::Deny(Reply {
                status,
                headers,
                body,
            })
        }
    }
}

/// A denial in the API's own error shape (OpenAI's or Anthropic's), so that its SDKs show which
/// level and limit blocked and when to retry; `x-should-retry: false` when retrying cannot help
/// soon: the request is larger than the whole limit, or the limit resets after more than a
/// minute (the SDKs would otherwise retry within seconds, pointlessly).
pub fn shape_denial(api: Api, mut reply: Reply) -> Reply {
    let Ok(details) = serde_json::from_slice::<serde_json::Value>(&reply.body) else {
        return reply;
    };
    if details["error"].as_str() == Some("bad_request") {
        // The sidecar could not use the request (an unknown customer or team, a value too
        // long): an invalid request for the SDKs, never a limit they would wait out.
        let message = format!(
            "Tollgate cannot use this request: {}",
            details["message"].as_str().unwrap_or("bad request")
        );
        if let Some(body) = error_body(api, ErrorKind::BadRequest, &message, &details) {
            reply.body = body.to_string().into_bytes();
        }
        reply
            .headers
            .push(("x-should-retry".into(), "false".into()));
        return reply;
    }
    let never_fits = details["neverFits"].as_bool() == Some(true);
    let retry_after = details["retryAfterSeconds"].as_u64();
    let mut message = format!(
        "Tollgate: {}",
        details["message"]
            .as_str()
            .unwrap_or("a usage limit denied this request")
    );
    if never_fits {
        message.push_str("; this request is larger than the whole limit and can never fit it");
    } else if let Some(s) = retry_after {
        message.push_str(&format!("; it resets in {s} s"));
    }
    let kind = LimitKind::of(details["kind"].as_str().unwrap_or(""));
    if let Some(body) = error_body(api, ErrorKind::Limit(kind), &message, &details) {
        reply.body = body.to_string().into_bytes();
    }
    if never_fits || retry_after.is_some_and(|s| s > 60) {
        reply
            .headers
            .push(("x-should-retry".into(), "false".into()));
    }
    reply
}

/// The id of the limit a denial names (its body's `limitId`), empty when it names none.
pub fn limit_of(denial_body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(denial_body)
        .ok()
        .and_then(|d| d["limitId"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// What to do when the sidecar gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailAction {
    /// Let the request through with this `x-tollgate-unchecked` value.
    Open(String),
    /// Answer this.
    Closed(Reply),
    /// Pass within the customer's bounded allowance; past it, answer this.
    Bounded(Reply),
}

fn json_reply(status: u32, body: serde_json::Value) -> Reply {
    Reply {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
    }
}

/// Applies the fail mode. A fail-closed answer takes the API's error shape; it says
/// `x-should-retry: false` when the sidecar refused the gateway's credential (a retry cannot
/// help until the configuration is fixed).
pub fn on_failure(e: &Effective, failure: &Failure) -> FailAction {
    match e.fail_mode {
        FailMode::Open => FailAction::Open(format!("sidecar-{}", failure.code().replace('_', "-"))),
        FailMode::Closed => FailAction::Closed(unavailable_reply(e, failure)),
        FailMode::Bounded => FailAction::Bounded(unavailable_reply(e, failure)),
    }
}

/// The fail-closed answer, in the API's error shape.
fn unavailable_reply(e: &Effective, failure: &Failure) -> Reply {
    let details = serde_json::json!({
        "error": "usage_check_unavailable",
        "reason": failure.code(),
        "message": failure.to_string(),
    });
    let message = format!("Tollgate could not check this request's usage: {failure}");
    let body = error_body(e.api, ErrorKind::Unavailable, &message, &details).unwrap_or(details);
    let mut reply = json_reply(u32::from(e.fail_status), body);
    if matches!(failure.code(), "unauthenticated" | "permission_denied") {
        reply
            .headers
            .push(("x-should-retry".into(), "false".into()));
    }
    reply
}

/// The answer to an endpoint a whole-API preset has no entry for, on a route whose
/// `unknownEndpoints` is `deny`: 403, in the API's error shape, not to be retried.
pub fn unknown_endpoint_reply(api: Api, method: &str, path: &str) -> Reply {
    let path: String = path
        .split('?')
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    let details = serde_json::json!({
        "error": "endpoint_not_governed",
        "message": format!("{method} {path} is not an endpoint Tollgate meters"),
    });
    let message = format!(
        "Tollgate does not meter {method} {path}, so this route refuses it (set the filter's or the route's `unknownEndpoints` to `pass` or `hold` to let it through)"
    );
    let body = error_body(api, ErrorKind::BadRequest, &message, &details).unwrap_or(details);
    let mut reply = json_reply(403, body);
    reply
        .headers
        .push(("x-should-retry".into(), "false".into()));
    reply
}

/// The answer to unusable input, in the API's error shape.
pub fn bad_input_reply(api: Api, status: u16, bad: &BadInput) -> Reply {
    let status = match bad {
        BadInput::BodyTooLarge { .. } => 413,
        _ => u32::from(status),
    };
    let details = serde_json::json!({
        "error": "bad_request_input",
        "reason": bad.code(),
        "message": bad.to_string(),
    });
    let message = format!("Tollgate cannot read this request: {bad}");
    let body = error_body(api, ErrorKind::BadRequest, &message, &details).unwrap_or(details);
    json_reply(status, body)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn hv(k: &str, v: &str) -> wire::HeaderValueOption {
        wire::HeaderValueOption {
            header: Some(wire::HeaderValue {
                key: k.into(),
                value: v.into(),
                raw_value: vec![],
            }),
            append_action: 0,
        }
    }

    #[test]
    fn a_check_request_carries_every_value_in_context_extensions() {
        let x = Extracted {
            customer: Some("acme".into()),
            feature: Some("ai-tokens".into()),
            usage: Some(300),
            dimensions: vec![("teamId".into(), "research".into())],
            prompt: 0,
        };
        let info = RequestInfo {
            id: "r1".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            host: "api".into(),
        };
        let r =
            wire::CheckRequest::decode(check_request(&x, &info, Some(1234)).as_slice()).unwrap();
        let a = r.attributes.unwrap();
        assert_eq!(a.context_extensions["tollgate.customer"], "acme");
        assert_eq!(a.context_extensions["tollgate.feature"], "ai-tokens");
        assert_eq!(a.context_extensions["tollgate.usage"], "300");
        assert_eq!(a.context_extensions["tollgate.dim.teamId"], "research");
        assert_eq!(a.context_extensions["tollgate.deadline"], "1234");
        assert_eq!(
            deadline_millis(1_000, Duration::from_millis(250)),
            1_000 + 200,
            "a quarter of margin, at most 50 ms"
        );
        assert_eq!(deadline_millis(1_000, Duration::from_millis(100)), 1_075);
        assert_eq!(a.request.unwrap().http.unwrap().method, "POST");
        assert!(!a.context_extensions.contains_key("tollgate.budget"));
        assert!(!a.context_extensions.contains_key("tollgate.extends"));
        // A stream's first hold carries its budget; a slice, the hold it extends.
        let ext = |part| {
            wire::CheckRequest::decode(check_request_for(&x, &info, None, part).as_slice())
                .unwrap()
                .attributes
                .unwrap()
                .context_extensions
        };
        let start = ext(Part::StreamStart { budget: 4_096 });
        assert_eq!(start["tollgate.budget"], "4096");
        assert!(!start.contains_key("tollgate.extends"));
        let slice = ext(Part::Slice {
            extends: "acme:7:ab",
        });
        assert_eq!(slice["tollgate.extends"], "acme:7:ab");
        assert!(!slice.contains_key("tollgate.budget"));
    }

    #[test]
    fn grants_denials_and_garbage_are_told_apart() {
        let ok = wire::CheckResponse {
            status: Some(wire::RpcStatus::default()),
            http_response: Some(wire::check_response::HttpResponse::OkResponse(
                wire::OkHttpResponse {
                    headers: vec![
                        hv("x-tollgate-hold-id", "h-1"),
                        hv("X-Tollgate-Remaining", "7"),
                    ],
                    headers_to_remove: vec![],
                    response_headers_to_add: vec![hv("RateLimit-Remaining", "7")],
                },
            )),
            dynamic_metadata: None,
        };
        let Verdict::Grant(g) = verdict(&ok.encode_to_vec(), true) else {
            panic!()
        };
        assert_eq!(g.hold_id.as_deref(), Some("h-1"));
        assert_eq!(
            g.upstream_headers[1],
            ("x-tollgate-remaining".into(), "7".into())
        );
        assert_eq!(g.response_headers[0].0, "ratelimit-remaining");
        let Verdict::Grant(g) = verdict(&ok.encode_to_vec(), false) else {
            panic!()
        };
        assert!(g.upstream_headers.is_empty());
        assert_eq!(g.hold_id.as_deref(), Some("h-1"), "hold id still read");

        let deny = wire::CheckResponse {
            status: Some(wire::RpcStatus {
                code: 7,
                message: "cap".into(),
            }),
            http_response: Some(wire::check_response::HttpResponse::DeniedResponse(
                wire::DeniedHttpResponse {
                    status: Some(wire::HttpStatus { code: 429 }),
                    headers: vec![hv("retry-after", "30")],
                    body: "{\"error\":\"usage_limit_exceeded\"}".into(),
                },
            )),
            dynamic_metadata: None,
        };
        let Verdict::Deny(r) = verdict(&deny.encode_to_vec(), true) else {
            panic!()
        };
        assert_eq!(r.status, 429);
        assert_eq!(r.headers, vec![("retry-after".into(), "30".into())]);
        assert!(r.body.starts_with(b"{\"error\""));

        assert!(matches!(
            verdict(b"\xff\xff\xff", true),
            Verdict::Fail(Failure::Undecodable(_))
        ));
    }

    #[test]
    fn denials_take_the_apis_shape_and_say_when_not_to_retry() {
        let sidecar = Reply {
            status: 429,
            headers: vec![("retry-after".into(), "30".into())],
            body: serde_json::json!({"error": "usage_limit_exceeded", "message": "quota limit `team-day` on team `research` (chain level 1): 380 of 400 used, 500 requested",
                "level": 1, "entityId": "research", "limitId": "team-day", "kind": "quota",
                "usageLimit": 400, "retryAfterSeconds": 30, "neverFits": true})
            .to_string()
            .into_bytes(),
        };
        let r = shape_denial(Api::OpenaiChat, sidecar.clone());
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("team-day") && message.contains("can never fit"),
            "{message}"
        );
        assert_eq!(body["error"]["type"], "insufficient_quota");
        assert_eq!(body["error"]["tollgate"]["entityId"], "research");
        assert!(
            r.headers
                .contains(&("x-should-retry".into(), "false".into()))
        );
        let r = shape_denial(Api::AnthropicMessages, sidecar.clone());
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "rate_limit_error");
        // It fits later: no advice against retrying, and the reset is in the message.
        let mut later = sidecar.clone();
        later.body =
            serde_json::json!({"message": "rate limit", "kind": "rate", "retryAfterSeconds": 7})
                .to_string()
                .into_bytes();
        let r = shape_denial(Api::OpenaiResponses, later);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("resets in 7 s")
        );
        assert_eq!(body["error"]["type"], "rate_limit_exceeded");
        assert!(!r.headers.iter().any(|(k, _)| k == "x-should-retry"));
        // The plain form keeps the sidecar's body.
        assert_eq!(
            shape_denial(Api::Custom, sidecar.clone()).body,
            {
                let mut s = sidecar;
                s.headers.push(("x-should-retry".into(), "false".into()));
                s
            }
            .body
        );
    }

    #[test]
    fn input_the_sidecar_cannot_use_is_an_invalid_request_not_a_limit() {
        let sidecar = Reply {
            status: 400,
            headers: vec![],
            body: serde_json::json!({"error": "bad_request", "message": "customer `acme` has no entity `nope`"})
                .to_string()
                .into_bytes(),
        };
        let r = shape_denial(Api::OpenaiChat, sidecar.clone());
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "bad_request_input");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("no entity `nope`")
        );
        let r = shape_denial(Api::AnthropicMessages, sidecar);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(
            r.headers
                .contains(&("x-should-retry".into(), "false".into()))
        );
    }

    #[test]
    fn a_grpc_message_reads_as_written() {
        let f = Failure::from_grpc(
            14,
            Some("counter%20store%20unavailable:%20redis%3A timed out{via_upstream}".into()),
        );
        assert_eq!(
            f.to_string(),
            "the sidecar call failed with gRPC status 14: counter store unavailable: redis: timed out"
        );
    }

    #[test]
    fn failures_follow_the_fail_mode() {
        let config = crate::config::FilterConfig::parse(
            br#"{"sidecar": {"cluster": "t", "token": "x"}}"#,
            |_| None,
        )
        .unwrap();
        let closed = config.plain();
        let open = Effective {
            fail_mode: FailMode::Open,
            ..closed.clone()
        };
        let t = Failure::from_grpc(14, Some("upstream request timeout".into()));
        assert_eq!(t, Failure::Timeout);
        let refused = Failure::from_grpc(14, Some("upstream connect error".into()));
        assert_eq!(refused.code(), "unavailable");
        assert_eq!(
            on_failure(&open, &t),
            FailAction::Open("sidecar-timeout".into())
        );
        let FailAction::Closed(r) = on_failure(&closed, &refused) else {
            panic!()
        };
        assert_eq!(r.status, 503);
        let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["reason"], "unavailable");
        assert_eq!(
            on_failure(&open, &Failure::Dispatch("no cluster".into())),
            FailAction::Open("sidecar-dispatch-failed".into())
        );
    }
}
