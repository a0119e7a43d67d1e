//! Envoy's `envoy.service.auth.v3.Authorization/Check`: the request's customer, feature, usage
//! and dimensions from `context_extensions` or mapped headers, a decision, and the answer in
//! the shape Envoy's `ext_authz` filter (or Tollgate's WASM filter) applies.
//!
//! `context_extensions` keys (set per route in Envoy, or by the WASM filter):
//! `tollgate.customer`, `tollgate.feature`, `tollgate.usage`, `tollgate.dim.<dimension>`.
//! They win over headers: they come from the operator's route config, headers from the client.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderValue, HeaderValueOption,
    HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use crate::auth::{Listener, Principal};
use crate::config::server::{ExtAuthzSettings, Source};
use crate::core::model::KindName;
use crate::core::usage::Usage;
use crate::core::{Decision, Timestamp};
use crate::engine::{CheckRequest as Check, DecisionError};
use crate::metrics::Api;
use crate::service::Service;

/// The dynamic metadata key of the units a grant held, when the access log settles.
pub const METADATA_HELD: &str = "heldUsage";

pub use tollgate_proto::ext_authz::{
    HEADER_HOLD_ID, HEADER_NO_LIMIT, HEADER_REMAINING, HEADER_UNCHECKED, KEY_BUDGET, KEY_COMMIT,
    KEY_CUSTOMER, KEY_DEADLINE, KEY_DIMENSION_PREFIX, KEY_EXTENDS, KEY_FEATURE, KEY_USAGE,
    METADATA_HOLD_ID,
};

/// What the ext_authz request asks, after extraction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub customer: String,
    pub feature: String,
    pub usage: u64,
    pub dimensions: HashMap<String, String>,
    /// `tollgate.deadline`: when the caller stops waiting, in ms since the epoch.
    pub deadline: Option<Timestamp>,
    /// `tollgate.commit`: the usage is final; count it at once and hold nothing.
    pub commit: bool,
    /// `tollgate.extends`: the streamed call whose hold this check extends by `usage`.
    pub extends: Option<crate::core::HoldId>,
    /// `tollgate.budget`: this is the first hold of a call streamed in slices that may grow
    /// to this many units.
    pub budget: Option<u64>,
}

/// What an ext_authz request offers besides its context extensions: its headers, and the
/// claims of the JWT Envoy's `jwt_authn` verified (from the request's metadata context).
pub trait RequestFacts<'a> {
    fn header(&self, name: &str) -> Option<&'a str>;
    /// Claim `claim` (a name, or a JSON pointer) of the payload jwt_authn stored under `key`.
    fn jwt_claim(&self, key: &str, claim: &str) -> Option<String>;
}

/// Reads one attribute: the context extension, then the mapped constant, header or claim,
/// then the default.
fn lookup<'a>(
    extensions: &'a HashMap<String, String>,
    key: &str,
    source: &'a Source,
    facts: &impl RequestFacts<'a>,
) -> Option<std::borrow::Cow<'a, str>> {
    use std::borrow::Cow;
    extensions
        .get(key)
        .map(|s| Cow::Borrowed(s.as_str()))
        .or_else(|| source.constant.as_deref().map(Cow::Borrowed))
        .or_else(|| {
            source
                .header
                .as_deref()
                .and_then(|h| facts.header(h))
                .map(Cow::Borrowed)
        })
        .or_else(|| {
            source
                .jwt_claim
                .as_ref()
                .and_then(|(claim, key)| facts.jwt_claim(key, claim))
                .map(Cow::Owned)
        })
        .or_else(|| source.default.as_deref().map(Cow::Borrowed))
}

/// Pulls the decision's input out of an ext_authz request. Errors say which input is wrong.
pub fn extract<'a>(
    settings: &'a ExtAuthzSettings,
    extensions: &'a HashMap<String, String>,
    facts: impl RequestFacts<'a>,
) -> Result<Extracted, String> {
    let describe = |key: &str, s: &Source| match (&s.header, &s.jwt_claim) {
        (Some(h), _) => format!("context extension `{key}` or header `{h}`"),
        (_, Some((claim, _))) => {
            format!("context extension `{key}` or the verified JWT claim `{claim}`")
        }
        _ => format!("context extension `{key}`"),
    };
    let customer = lookup(extensions, KEY_CUSTOMER, &settings.customer, &facts)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            format!(
                "no customer: set {}",
                describe(KEY_CUSTOMER, &settings.customer)
            )
        })?;
    let feature = lookup(extensions, KEY_FEATURE, &settings.feature, &facts)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            format!(
                "no feature: set {}",
                describe(KEY_FEATURE, &settings.feature)
            )
        })?;
    let usage_text = lookup(extensions, KEY_USAGE, &settings.usage, &facts).ok_or_else(|| {
        format!(
            "no requested usage: set {}",
            describe(KEY_USAGE, &settings.usage)
        )
    })?;
    let usage = usage_text.trim().parse::<u64>().map_err(|_| {
        format!(
            "requested usage `{}` is not a whole number of units",
            usage_text.chars().take(64).collect::<String>()
        )
    })?;
    let mut dimensions = HashMap::new();
    for (name, source) in &settings.dimensions {
        let key = format!("{KEY_DIMENSION_PREFIX}{name}");
        if let Some(v) = lookup(extensions, &key, source, &facts) {
            dimensions.insert(name.clone(), v.to_string());
        }
    }
    for (k, v) in extensions {
        if let Some(name) = k.strip_prefix(KEY_DIMENSION_PREFIX) {
            dimensions.insert(name.to_string(), v.clone());
        }
    }
    let deadline = match extensions.get(KEY_DEADLINE) {
        None => None,
        Some(text) => Some(Timestamp::from_millis(text.trim().parse::<i64>().map_err(
            |_| {
                format!(
                    "context extension `{KEY_DEADLINE}` `{}` is not a time in ms since the epoch",
                    text.chars().take(32).collect::<String>()
                )
            },
        )?)),
    };
    let commit = match extensions.get(KEY_COMMIT).map(|t| t.trim()) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(format!(
                "context extension `{KEY_COMMIT}` is `{}`; `true` or `false` expected",
                other.chars().take(32).collect::<String>()
            ));
        }
    };
    let extends = match extensions.get(KEY_EXTENDS) {
        None => None,
        Some(text) => {
            let hold = text
                .trim()
                .parse::<crate::core::HoldId>()
                .map_err(|e| format!("context extension `{KEY_EXTENDS}` is not a hold id: {e}"))?;
            // A slice is charged to the call it extends: never across customers.
            if hold.customer != *customer {
                return Err(format!(
                    "context extension `{KEY_EXTENDS}` names a hold of another customer"
                ));
            }
            if commit {
                return Err(format!(
                    "`{KEY_EXTENDS}` and `{KEY_COMMIT}` together: a slice is always held"
                ));
            }
            Some(hold)
        }
    };
    let budget = match extensions.get(KEY_BUDGET) {
        None => None,
        Some(text) => {
            let budget = text.trim().parse::<u64>().map_err(|_| {
                format!(
                    "context extension `{KEY_BUDGET}` is `{}`; a whole number of units expected",
                    text.chars().take(32).collect::<String>()
                )
            })?;
            if extends.is_some() || commit {
                return Err(format!(
                    "`{KEY_BUDGET}` is for a stream's first hold: not with `{KEY_EXTENDS}` or `{KEY_COMMIT}`"
                ));
            }
            Some(budget)
        }
    };
    Ok(Extracted {
        customer: customer.to_string(),
        feature: feature.to_string(),
        usage,
        dimensions,
        deadline,
        commit,
        extends,
        budget,
    })
}

fn header(key: &str, value: impl Into<String>) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: value.into(),
            raw_value: Vec::new(),
        }),
        ..HeaderValueOption::default()
    }
}

fn seconds_until(at: Option<Timestamp>, now: Timestamp) -> Option<u64> {
    at.map(|t| {
        let ms = t.millis().saturating_sub(now.millis()).max(0);
        u64::try_from(ms).unwrap_or(0).div_ceil(1000)
    })
}

/// `RateLimit-*` headers for the tightest limit of a decision.
fn rate_limit_headers(d: &Decision, now: Timestamp) -> Vec<HeaderValueOption> {
    let Some(e) = d.tightest_metered() else {
        return Vec::new();
    };
    let mut out = vec![
        header("ratelimit-limit", e.usage_limit.to_string()),
        header("ratelimit-remaining", e.remaining.to_string()),
    ];
    if let Some(s) = seconds_until(e.reset_at, now) {
        out.push(header("ratelimit-reset", s.to_string()));
    }
    out
}

/// A header for the upstream request: it replaces one of the same name the client sent.
fn upstream_header(key: &str, value: impl Into<String>) -> HeaderValueOption {
    use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
    HeaderValueOption {
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
        ..header(key, value)
    }
}

/// Tollgate's names for the upstream: only Tollgate sets them, so a client's are forged.
const UPSTREAM_NAMES: [&str; 4] = [
    HEADER_HOLD_ID,
    HEADER_REMAINING,
    HEADER_NO_LIMIT,
    HEADER_UNCHECKED,
];

fn ok_status() -> Option<rpc::Status> {
    Some(rpc::Status {
        code: tonic::Code::Ok.into(),
        ..rpc::Status::default()
    })
}

fn denied(code: u16, reason: &str, headers: Vec<HeaderValueOption>, body: String) -> CheckResponse {
    let mut headers = headers;
    headers.push(header("content-type", "application/json"));
    CheckResponse {
        status: Some(rpc::Status {
            code: tonic::Code::PermissionDenied.into(),
            message: reason.to_string(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: code.into() }),
            headers,
            body,
        })),
        dynamic_metadata: None,
    }
}

fn string_value(s: impl Into<String>) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

/// The answer for a bad request: a denial with `status`, or (when configured) a pass marked
/// as unchecked.
pub fn bad_input_response(settings: &ExtAuthzSettings, reason: &str) -> CheckResponse {
    if settings.allow_bad_input {
        return CheckResponse {
            status: ok_status(),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![header(HEADER_UNCHECKED, "bad-input")],
                ..OkHttpResponse::default()
            })),
            dynamic_metadata: None,
        };
    }
    let body = serde_json::json!({
        "error": "bad_request",
        "message": reason,
    });
    denied(
        settings.bad_input_status,
        reason,
        Vec::new(),
        body.to_string(),
    )
}

/// The answer for a decision.
pub fn decision_response(
    settings: &ExtAuthzSettings,
    d: &Decision,
    now: Timestamp,
) -> CheckResponse {
    let rl = rate_limit_headers(d, now);
    if let Some(denial) = &d.denial {
        let retry_after = seconds_until(denial.retry_at, now);
        let mut headers = rl;
        if let Some(s) = retry_after {
            headers.push(header("retry-after", s.to_string()));
        }
        let entry = d.tightest();
        let body = serde_json::json!({
            "error": "usage_limit_exceeded",
            "message": denial.reason,
            "level": denial.level,
            "entityId": denial.entity_id.as_str(),
            "entityType": entry.map(|e| e.entity_type.as_str()),
            "limitId": denial.limit_id.as_str(),
            "kind": denial.kind,
            "usageLimit": entry.map(|e| e.usage_limit),
            "currentUsage": entry.map(|e| e.current_usage),
            "remaining": entry.map(|e| e.remaining),
            "retryAfterSeconds": retry_after,
            // Larger than the whole limit: no amount of waiting lets it through.
            "neverFits": entry.is_some_and(|e| e.kind != KindName::Credits && e.requested > e.usage_limit),
        });
        return denied(
            settings.deny_status,
            &denial.reason,
            headers,
            body.to_string(),
        );
    }
    let remaining = d.tightest_metered().map(|e| e.remaining);
    let mut upstream = Vec::new();
    let mut meta = HashMap::new();
    if let Some(h) = &d.hold_id {
        let h = h.to_string();
        if settings.upstream_hold_id {
            upstream.push(upstream_header(HEADER_HOLD_ID, h.clone()));
        }
        meta.insert(METADATA_HOLD_ID.to_string(), string_value(h));
    }
    if let Some(r) = remaining {
        if settings.upstream_headers {
            upstream.push(upstream_header(HEADER_REMAINING, r.to_string()));
        }
        meta.insert("remaining".to_string(), string_value(r.to_string()));
    }
    if d.no_matching_limit {
        if settings.upstream_headers {
            upstream.push(upstream_header(HEADER_NO_LIMIT, "true"));
        }
        meta.insert("noMatchingLimit".to_string(), string_value("true"));
    }
    // Where the upstream settles holds by `x-tollgate-hold-id`, a client's copy of a name
    // this answer does not set is removed (Envoy's own ext_authz filter applies it). Only
    // then: these strings cost every grant, and `envoy/native-ext-authz.yaml` drops the
    // client's copies at the route anyway; the names this answer sets replace the client's.
    let mut headers_to_remove: Vec<String> = if settings.upstream_hold_id {
        UPSTREAM_NAMES
            .iter()
            .filter(|n| {
                !upstream
                    .iter()
                    .any(|h| h.header.as_ref().is_some_and(|h| h.key == **n))
            })
            .map(|n| (*n).to_string())
            .collect()
    } else {
        Vec::new()
    };
    // The caller's credential, where the proxy forwarded it only for this check to read.
    headers_to_remove.extend(settings.remove_upstream.iter().cloned());
    CheckResponse {
        status: ok_status(),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: upstream,
            headers_to_remove,
            response_headers_to_add: rl,
            ..OkHttpResponse::default()
        })),
        dynamic_metadata: (!meta.is_empty()).then_some(Struct { fields: meta }),
    }
}

/// An Envoy `CheckRequest`'s headers and metadata context, and the payload of the caller's
/// bearer JWT when the sidecar verified it itself.
struct EnvoyFacts<'a> {
    http: Option<&'a envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest>,
    metadata: Option<&'a envoy_types::pb::envoy::config::core::v3::Metadata>,
    bearer: Option<&'a serde_json::Value>,
}

/// Claim `claim` (a name, or a JSON pointer) of a verified JSON payload, as text.
fn json_claim(payload: &serde_json::Value, claim: &str) -> Option<String> {
    let v = if claim.starts_with('/') {
        payload.pointer(claim)?
    } else {
        payload.get(claim)?
    };
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) if n.is_u64() || n.is_i64() => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// jwt_authn's metadata namespace.
const JWT_AUTHN: &str = "envoy.filters.http.jwt_authn";

impl<'a> RequestFacts<'a> for EnvoyFacts<'a> {
    fn header(&self, name: &str) -> Option<&'a str> {
        let http = self.http?;
        // Envoy sends `headers`, or `header_map` when `encode_raw_headers` is on.
        http.headers.get(name).map(String::as_str).or_else(|| {
            http.header_map
                .as_ref()?
                .headers
                .iter()
                .find(|h| h.key == name)
                .map(|h| {
                    if h.value.is_empty() {
                        std::str::from_utf8(&h.raw_value).unwrap_or("")
                    } else {
                        h.value.as_str()
                    }
                })
        })
    }

    fn jwt_claim(&self, key: &str, claim: &str) -> Option<String> {
        self.metadata_claim(key, claim)
            .or_else(|| json_claim(self.bearer?, claim))
    }
}

impl EnvoyFacts<'_> {
    /// A claim of the payload jwt_authn verified and sent in the metadata context.
    fn metadata_claim(&self, key: &str, claim: &str) -> Option<String> {
        let payload = self
            .metadata?
            .filter_metadata
            .get(JWT_AUTHN)?
            .fields
            .get(key)?;
        let mut v = payload;
        if let Some(pointer) = claim.strip_prefix('/') {
            for part in pointer.split('/') {
                let part = part.replace("~1", "/").replace("~0", "~");
                match &v.kind {
                    Some(Kind::StructValue(s)) => v = s.fields.get(&part)?,
                    _ => return None,
                }
            }
        } else {
            match &v.kind {
                Some(Kind::StructValue(s)) => v = s.fields.get(claim)?,
                _ => return None,
            }
        }
        match &v.kind {
            Some(Kind::StringValue(s)) => Some(s.clone()),
            // JSON numbers arrive as doubles; whole ones read as integers.
            Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
                Some(format!("{}", *n as i64))
            }
            Some(Kind::BoolValue(b)) => Some(b.to_string()),
            _ => None,
        }
    }
}

/// The ext_authz gRPC service.
#[derive(Debug, Clone)]
pub struct ExtAuthzService {
    service: Arc<Service>,
}

impl ExtAuthzService {
    pub fn new(service: Arc<Service>) -> Self {
        Self { service }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        // The credential comes first: a call without one changes nothing and learns nothing.
        let principal = super::tollgate::principal_of(&self.service, &request, Listener::ExtAuthz)?;
        let request = request.into_inner();
        let reloadable = self.service.settings();
        let settings = &reloadable.ext_authz;
        let empty = HashMap::new();
        let attributes = request.attributes.as_ref();
        let extensions = attributes.map_or(&empty, |a| &a.context_extensions);
        let http = attributes
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        // With `bearerJwt`, the caller's own token is verified here; a request whose token
        // fails is refused whole rather than charged to whatever the rest of it says.
        let verified = match &settings.bearer_jwt {
            None => None,
            Some(v) => {
                let header = http
                    .and_then(|h| h.headers.get("authorization"))
                    .map(String::as_str);
                match v.verify(header) {
                    Ok(payload) => Some(payload),
                    Err(reason) => {
                        self.service.bad_input(Api::ExtAuthz);
                        let reason = format!(
                            "the caller's bearer token (issuer `{}`) is not accepted: {reason}",
                            v.issuer()
                        );
                        return Ok(Response::new(bad_input_response(settings, &reason)));
                    }
                }
            }
        };
        let facts = EnvoyFacts {
            http,
            metadata: attributes.and_then(|a| a.metadata_context.as_ref()),
            bearer: verified.as_ref(),
        };
        let input = match extract(settings, extensions, facts) {
            Ok(i) => i,
            Err(reason) => {
                self.service.bad_input(Api::ExtAuthz);
                return Ok(Response::new(bad_input_response(settings, &reason)));
            }
        };
        if !principal.may_decide(&input.customer) {
            return Err(Status::permission_denied(format!(
                "these credentials do not reach customer `{}`",
                input.customer
            )));
        }
        // A slice holds units without a concurrency slot: only the gateway that holds the
        // stream asks for one. A customer's own key could otherwise hold around its
        // concurrency limit.
        if input.extends.is_some() && matches!(principal, Principal::Customer(..)) {
            return Err(Status::permission_denied(format!(
                "`{KEY_EXTENDS}` is for the gateway's streams: a customer's API key cannot extend holds"
            )));
        }
        // The settlement ceiling guards a customer against absurd reports; only the gateway
        // that counts the stream may widen it to the stream's budget.
        if input.budget.is_some() && matches!(principal, Principal::Customer(..)) {
            return Err(Status::permission_denied(format!(
                "`{KEY_BUDGET}` is for the gateway's streams: a customer's API key cannot set a hold's ceiling"
            )));
        }
        let check = Check {
            deadline: input.deadline,
            customer: &input.customer,
            feature: &input.feature,
            usage: Usage::units(input.usage),
            dimensions: &input.dimensions,
            dry_run: false,
            commit: input.commit,
        };
        let decided = match (&input.extends, input.budget) {
            (Some(_), _) => self.service.extend(Api::ExtAuthz, &check).await,
            (None, Some(budget)) => {
                self.service
                    .start_stream(Api::ExtAuthz, &check, budget)
                    .await
            }
            (None, None) => self.service.check(Api::ExtAuthz, &check).await,
        };
        match decided {
            Ok(d) => {
                let mut response = decision_response(settings, &d, self.service.now());
                // Settling from the access log needs what was held, for the `held` policy;
                // Envoy keeps it in the request's metadata, out of the client's reach.
                if settings.settlement.is_some() && d.hold_id.is_some() {
                    response
                        .dynamic_metadata
                        .get_or_insert_with(Struct::default)
                        .fields
                        .insert(
                            METADATA_HELD.to_string(),
                            string_value(input.usage.to_string()),
                        );
                }
                Ok(Response::new(response))
            }
            Err(DecisionError::Plan(e)) => {
                Ok(Response::new(bad_input_response(settings, &e.to_string())))
            }
            // The store failed: an error status lets Envoy apply the route's fail mode.
            Err(DecisionError::Store(e)) => Err(Status::unavailable(e.to_string())),
            Err(e @ DecisionError::DeadlineExceeded) => {
                Err(Status::deadline_exceeded(e.to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ExtAuthzSettings {
        ExtAuthzSettings {
            dimensions: vec![(
                "teamId".into(),
                Source {
                    header: Some("x-team-id".into()),
                    ..Source::default()
                },
            )],
            ..ExtAuthzSettings::default()
        }
    }

    /// Headers from a closure, and no JWT.
    struct Headers<F>(F);

    impl<'a, F: Fn(&str) -> Option<&'a str>> RequestFacts<'a> for Headers<F> {
        fn header(&self, name: &str) -> Option<&'a str> {
            (self.0)(name)
        }

        fn jwt_claim(&self, _key: &str, _claim: &str) -> Option<String> {
            None
        }
    }

    #[test]
    fn a_verified_jwt_claim_names_the_customer() {
        use envoy_types::pb::envoy::config::core::v3::Metadata;
        let mut s = settings();
        s.customer = Source {
            jwt_claim: Some(("/org/id".into(), "jwt_payload".into())),
            ..Source::default()
        };
        let payload = Struct {
            fields: [(
                "org".to_string(),
                Value {
                    kind: Some(Kind::StructValue(Struct {
                        fields: [("id".to_string(), string_value("acme"))].into(),
                    })),
                },
            )]
            .into(),
        };
        let meta = Metadata {
            filter_metadata: [(
                JWT_AUTHN.to_string(),
                Struct {
                    fields: [(
                        "jwt_payload".to_string(),
                        Value {
                            kind: Some(Kind::StructValue(payload)),
                        },
                    )]
                    .into(),
                },
            )]
            .into(),
            ..Metadata::default()
        };
        let ext: HashMap<String, String> = [(KEY_USAGE.to_string(), "1".to_string())].into();
        let facts = EnvoyFacts {
            http: None,
            metadata: Some(&meta),
            bearer: None,
        };
        let mut with_feature = s.clone();
        with_feature.feature.constant = Some("ai-tokens".into());
        assert_eq!(
            extract(&with_feature, &ext, facts).unwrap().customer,
            "acme"
        );
        let err = extract(
            &with_feature,
            &ext,
            EnvoyFacts {
                http: None,
                metadata: None,
                bearer: None,
            },
        )
        .unwrap_err();
        assert!(err.contains("verified JWT claim `/org/id`"), "{err}");
        // The payload the sidecar verified itself serves the same claims.
        let bearer = serde_json::json!({"org": {"id": "globex"}, "n": 7});
        let facts = EnvoyFacts {
            http: None,
            metadata: None,
            bearer: Some(&bearer),
        };
        assert_eq!(
            extract(&with_feature, &ext, facts).unwrap().customer,
            "globex"
        );
        assert_eq!(json_claim(&bearer, "n").as_deref(), Some("7"));
        assert_eq!(json_claim(&bearer, "org"), None);
    }

    #[test]
    fn context_extensions_win_over_headers() {
        let s = settings();
        let ext: HashMap<String, String> = [
            (KEY_CUSTOMER, "acme"),
            (KEY_USAGE, "7"),
            ("tollgate.dim.userId", "alice"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let headers: HashMap<&str, &str> = [
            ("x-tollgate-customer", "evil"),
            ("x-tollgate-feature", "ai-tokens"),
            ("x-team-id", "ml"),
        ]
        .into_iter()
        .collect();
        let got = extract(&s, &ext, Headers(|h: &str| headers.get(h).copied())).unwrap();
        assert_eq!(got.customer, "acme");
        assert_eq!(got.feature, "ai-tokens");
        assert_eq!(got.usage, 7);
        assert_eq!(got.dimensions.get("teamId").map(String::as_str), Some("ml"));
        assert_eq!(
            got.dimensions.get("userId").map(String::as_str),
            Some("alice")
        );
    }

    #[test]
    fn missing_and_malformed_input_is_named() {
        let mut s = settings();
        let ext = HashMap::new();
        let err = extract(&s, &ext, Headers(|_: &str| None)).unwrap_err();
        assert!(err.contains("no customer"), "{err}");
        assert!(
            err.contains("context extension `tollgate.customer`"),
            "{err}"
        );
        // By default a client's own header never names the customer.
        let err = extract(
            &s,
            &ext,
            Headers(|h: &str| (h == "x-tollgate-customer").then_some("acme")),
        )
        .unwrap_err();
        assert!(err.contains("no customer"), "{err}");
        s.customer = Source {
            header: Some("x-tollgate-customer".into()),
            ..Source::default()
        };
        let err = extract(
            &s,
            &ext,
            Headers(|h: &str| match h {
                "x-tollgate-customer" => Some("acme"),
                "x-tollgate-feature" => Some("ai-tokens"),
                "x-tollgate-usage" => Some("12abc"),
                _ => None,
            }),
        )
        .unwrap_err();
        assert!(err.contains("`12abc` is not a whole number"), "{err}");
    }

    #[test]
    fn bad_input_can_be_allowed_and_marked() {
        let mut s = settings();
        s.allow_bad_input = true;
        let r = bad_input_response(&s, "no customer");
        assert_eq!(r.status.unwrap().code, 0);
        let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
            panic!("not ok")
        };
        assert_eq!(ok.headers[0].header.as_ref().unwrap().key, HEADER_UNCHECKED);
    }
}
