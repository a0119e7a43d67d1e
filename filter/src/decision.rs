//! The sidecar call and its answer: the ext_authz `CheckRequest` built from extracted values,
//! the `CheckResponse` read into a grant or a denial, and every way the call can fail mapped
//! to the fail mode.

use prost::Message;
use prost_types::value::Kind;
use tollgate_proto::envoywire as wire;

use crate::config::{Effective, FailMode};
use crate::extract::{BadInput, Extracted};

/// The sidecar's ext_authz service and method.
pub const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";
pub const AUTHZ_METHOD: &str = "Check";

pub use tollgate_proto::ext_authz::HEADER_UNCHECKED;
use tollgate_proto::ext_authz::{
    HEADER_HOLD_ID, KEY_CUSTOMER, KEY_DIMENSION_PREFIX, KEY_FEATURE, KEY_USAGE, METADATA_HOLD_ID,
};

/// Request facts sent along for the sidecar's logs.
#[derive(Debug, Default, Clone)]
pub struct RequestInfo {
    pub id: String,
    pub method: String,
    pub path: String,
    pub host: String,
}

/// The ext_authz `CheckRequest` for one request, encoded.
pub fn check_request(x: &Extracted, info: &RequestInfo) -> Vec<u8> {
    let mut ext = std::collections::HashMap::with_capacity(3 + x.dimensions.len());
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
        let message = message.unwrap_or_default();
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

/// What to do when the sidecar gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailAction {
    /// Let the request through with this `x-tollgate-unchecked` value.
    Open(String),
    /// Answer this.
    Closed(Reply),
}

fn json_reply(status: u32, body: serde_json::Value) -> Reply {
    Reply {
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
    }
}

/// Applies the fail mode.
pub fn on_failure(e: &Effective, failure: &Failure) -> FailAction {
    match e.fail_mode {
        FailMode::Open => FailAction::Open(format!("sidecar-{}", failure.code().replace('_', "-"))),
        FailMode::Closed => FailAction::Closed(json_reply(
            u32::from(e.fail_status),
            serde_json::json!({
                "error": "usage_check_unavailable",
                "reason": failure.code(),
                "message": failure.to_string(),
            }),
        )),
    }
}

/// The answer to unusable input.
pub fn bad_input_reply(status: u16, bad: &BadInput) -> Reply {
    let status = match bad {
        BadInput::BodyTooLarge { .. } => 413,
        _ => u32::from(status),
    };
    json_reply(
        status,
        serde_json::json!({
            "error": "bad_request_input",
            "reason": bad.code(),
            "message": bad.to_string(),
        }),
    )
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
        };
        let info = RequestInfo {
            id: "r1".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            host: "api".into(),
        };
        let r = wire::CheckRequest::decode(check_request(&x, &info).as_slice()).unwrap();
        let a = r.attributes.unwrap();
        assert_eq!(a.context_extensions["tollgate.customer"], "acme");
        assert_eq!(a.context_extensions["tollgate.feature"], "ai-tokens");
        assert_eq!(a.context_extensions["tollgate.usage"], "300");
        assert_eq!(a.context_extensions["tollgate.dim.teamId"], "research");
        assert_eq!(a.request.unwrap().http.unwrap().method, "POST");
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
    fn failures_follow_the_fail_mode() {
        let closed = Effective {
            fail_mode: FailMode::Closed,
            fail_status: 503,
            timeout: Duration::from_millis(100),
        };
        let open = Effective {
            fail_mode: FailMode::Open,
            ..closed
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
