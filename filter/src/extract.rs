//! Extraction: the customer, feature, usage and dimensions of one request, by the config's
//! rules, from a [`RequestView`] (headers, path, jwt_authn metadata) and the parsed body.

use std::cell::OnceCell;
use std::fmt;

use base64::Engine as _;
use serde_json::Value;

use crate::api::Api;
use crate::config::{Effective, FilterConfig, Rule, Source};

/// What the rules read from the request. The host module implements it over proxy-wasm calls;
/// tests implement it over maps.
pub trait RequestView {
    /// A request header by lower-case name.
    fn header(&self, name: &str) -> Option<String>;
    /// `:path`, query included.
    fn path(&self) -> Option<String>;
    /// The JWT payload `jwt_authn` stored under `payload_in_metadata` key `key`.
    fn jwt_metadata(&self, key: &str) -> Option<Value>;
}

/// Why a request's input is unusable. No sidecar call is made for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadInput {
    /// A required value is absent and has no default.
    Missing { what: String, source: String },
    /// The usage is not a whole number.
    NotANumber { what: String, value: String },
    /// A value is an object or array where text or a number was expected.
    NotAScalar { what: String },
    /// The bearer token is not a readable JWT.
    BadJwt(String),
    /// The body is not JSON though a rule reads it.
    BodyNotJson(String),
    /// The body is over the configured cap.
    BodyTooLarge { limit: usize },
}

impl fmt::Display for BadInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing { what, source } => {
                write!(f, "`{what}` is required: {source} is missing")
            }
            Self::NotANumber { what, value } => {
                write!(f, "`{what}` must be a whole number, not `{value}`")
            }
            Self::NotAScalar { what } => {
                write!(
                    f,
                    "`{what}` must be text or a number, not an object or array"
                )
            }
            Self::BadJwt(why) => write!(f, "the bearer token is not a readable JWT: {why}"),
            Self::BodyNotJson(why) => write!(f, "the request body is not valid JSON: {why}"),
            Self::BodyTooLarge { limit } => {
                write!(f, "the request body is over the {limit}-byte limit")
            }
        }
    }
}

impl BadInput {
    /// A short machine-readable code for the JSON body and the unchecked header.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing { .. } => "missing_value",
            Self::NotANumber { .. } => "not_a_number",
            Self::NotAScalar { .. } => "not_a_scalar",
            Self::BadJwt(_) => "bad_jwt",
            Self::BodyNotJson(_) => "body_not_json",
            Self::BodyTooLarge { .. } => "body_too_large",
        }
    }
}

/// The values one request carries to the sidecar.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub customer: Option<String>,
    pub feature: Option<String>,
    pub usage: Option<u64>,
    pub dimensions: Vec<(String, String)>,
    /// The prompt's estimated tokens (from the body's size), for a response without usage.
    pub prompt: u64,
}

/// Parses a buffered request body for the body rules. An empty body reads as no body.
pub fn parse_body(bytes: &[u8]) -> Result<Option<Value>, BadInput> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(bytes)
        .map(Some)
        .map_err(|e| BadInput::BodyNotJson(e.to_string()))
}

/// The request body as the rules read it: parsed, and its size.
#[derive(Debug, Clone, Copy)]
pub struct Body<'a> {
    pub json: Option<&'a Value>,
    pub len: usize,
}

/// Applies every rule of `config`, as `e` (the route's settings) says: the route's usage rule
/// wins over the filter's, which wins over the preset's estimate.
pub fn extract(
    config: &FilterConfig,
    e: &Effective,
    view: &dyn RequestView,
    body: Body<'_>,
) -> Result<Extracted, BadInput> {
    let estimate = &e.settlement.estimate;
    let body_json = body.json;
    let cx = Cx {
        view,
        body: body_json,
        path: OnceCell::new(),
        bearer: OnceCell::new(),
    };
    let mut out = Extracted {
        customer: config
            .customer
            .as_ref()
            .map(|r| cx.value(r))
            .transpose()?
            .flatten(),
        feature: config
            .feature
            .as_ref()
            .map(|r| cx.value(r))
            .transpose()?
            .flatten(),
        usage: None,
        dimensions: Vec::with_capacity(config.dimensions.len()),
        prompt: e.api.prompt_estimate(body.len, estimate),
    };
    match e.usage.as_deref().or(config.usage.as_ref()) {
        Some(rule) => {
            if let Some(v) = cx.value(rule)? {
                out.usage = Some(v.trim().parse::<u64>().map_err(|_| BadInput::NotANumber {
                    what: rule.name.clone(),
                    value: v,
                })?);
            }
        }
        None if e.api != Api::Custom => {
            let empty = Value::Null;
            let json = body_json.unwrap_or(&empty);
            e.api.check_budget(json).map_err(|b| BadInput::NotANumber {
                what: b.field.to_string(),
                value: b.value,
            })?;
            out.usage = Some(e.api.hold(json, body.len, estimate));
        }
        None => {}
    }
    for rule in &config.dimensions {
        if let Some(v) = cx.value(rule)? {
            let name = rule.name.strip_prefix("dimensions.").unwrap_or(&rule.name);
            out.dimensions.push((name.to_string(), v));
        }
    }
    Ok(out)
}

/// One request's lookups, each computed at most once.
struct Cx<'a> {
    view: &'a dyn RequestView,
    body: Option<&'a Value>,
    path: OnceCell<Option<String>>,
    bearer: OnceCell<Result<Option<Value>, BadInput>>,
}

impl Cx<'_> {
    fn path(&self) -> Option<&str> {
        self.path.get_or_init(|| self.view.path()).as_deref()
    }

    /// The rule's value, its default, or an error if it is required.
    fn value(&self, rule: &Rule) -> Result<Option<String>, BadInput> {
        let found = self.lookup(rule)?.filter(|v| !v.is_empty());
        match (found, &rule.default) {
            (Some(v), _) => Ok(Some(v)),
            (None, Some(d)) => Ok(Some(d.clone())),
            (None, None) if rule.required => Err(BadInput::Missing {
                what: rule.name.clone(),
                source: describe(&rule.source),
            }),
            (None, None) => Ok(None),
        }
    }

    fn lookup(&self, rule: &Rule) -> Result<Option<String>, BadInput> {
        match &rule.source {
            Source::Header(h) => Ok(self.view.header(h)),
            Source::Constant(c) => Ok(Some(c.clone())),
            Source::Query(q) => Ok(self.path().and_then(|p| query_param(p, q))),
            Source::Path { regex, group } => Ok(self.path().and_then(|p| {
                let p = p.split_once('?').map_or(p, |(p, _)| p);
                regex
                    .captures(p)
                    .and_then(|c| c.name(group))
                    .map(|m| m.as_str().to_string())
            })),
            Source::Body(ptr) => scalar(&rule.name, self.body.and_then(|b| b.pointer(ptr))),
            Source::JwtClaim { claim, metadata } => {
                let payload = match metadata {
                    Some(key) => self.view.jwt_metadata(key),
                    None => self
                        .bearer
                        .get_or_init(|| bearer_payload(self.view.header("authorization")))
                        .clone()?,
                };
                let value = payload.as_ref().and_then(|p| claim_of(p, claim));
                scalar(&rule.name, value)
            }
        }
    }
}

fn describe(s: &Source) -> String {
    match s {
        Source::Header(h) => format!("header `{h}`"),
        Source::Query(q) => format!("query parameter `{q}`"),
        Source::Path { group, .. } => format!("path capture `{group}`"),
        Source::JwtClaim { claim, .. } => format!("JWT claim `{claim}`"),
        Source::Body(p) => format!("body field `{p}`"),
        Source::Constant(_) => "the constant".to_string(),
    }
}

fn query_param(path: &str, name: &str) -> Option<String> {
    let (_, query) = path.split_once('?')?;
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn scalar(what: &str, v: Option<&Value>) -> Result<Option<String>, BadInput> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(Value::Array(_) | Value::Object(_)) => Err(BadInput::NotAScalar {
            what: what.to_string(),
        }),
    }
}

fn claim_of<'v>(payload: &'v Value, claim: &str) -> Option<&'v Value> {
    if claim.starts_with('/') {
        payload.pointer(claim)
    } else {
        payload.get(claim)
    }
}

/// The payload of `Authorization: Bearer <jwt>`, unverified: signatures are `jwt_authn`'s job,
/// which should run before this filter when claims decide who pays.
fn bearer_payload(authorization: Option<String>) -> Result<Option<Value>, BadInput> {
    let Some(auth) = authorization else {
        return Ok(None);
    };
    let Some((scheme, token)) = auth.trim().split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let parts: Vec<&str> = token.trim().split('.').collect();
    if parts.len() != 3 {
        return Err(BadInput::BadJwt(format!(
            "it has {} dot-separated parts, not 3",
            parts.len()
        )));
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[1].trim_end_matches('='))
        .map_err(|e| BadInput::BadJwt(format!("the payload is not base64url: {e}")))?;
    let payload: Value = serde_json::from_slice(&raw)
        .map_err(|e| BadInput::BadJwt(format!("the payload is not JSON: {e}")))?;
    if !payload.is_object() {
        return Err(BadInput::BadJwt("the payload is not a JSON object".into()));
    }
    Ok(Some(payload))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[derive(Default)]
    struct View {
        headers: HashMap<String, String>,
        path: Option<String>,
        meta: HashMap<String, Value>,
    }

    impl RequestView for View {
        fn header(&self, name: &str) -> Option<String> {
            self.headers.get(name).cloned()
        }
        fn path(&self) -> Option<String> {
            self.path.clone()
        }
        fn jwt_metadata(&self, key: &str) -> Option<Value> {
            self.meta.get(key).cloned()
        }
    }

    fn config(rules: &str) -> FilterConfig {
        FilterConfig::parse(
            format!(r#"{{"sidecar": {{"cluster": "t", "token": "x"}}, {rules}}}"#).as_bytes(),
            |_| None,
        )
        .unwrap()
    }

    fn jwt(payload: &str) -> String {
        let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload);
        format!("Bearer eyJhbGciOiJSUzI1NiJ9.{p}.c2ln")
    }

    #[test]
    fn every_source_reads_its_value() {
        let c = config(
            r#""customer": {"header": "x-customer", "required": true},
               "feature": {"constant": "ai-tokens"},
               "usage": {"body": "/max_tokens"},
               "dimensions": {
                 "teamId": {"path": "^/teams/(?P<team>[^/]+)/", "group": "team"},
                 "userId": {"jwtClaim": "sub"},
                 "org": {"jwtClaim": "/org/id"},
                 "model": {"body": "/model"},
                 "region": {"query": "region"},
                 "tier": {"jwtClaim": "tier", "jwtMetadata": "jwt_payload"}
               }"#,
        );
        let mut v = View::default();
        v.headers.insert("x-customer".into(), "acme".into());
        v.headers.insert(
            "authorization".into(),
            jwt(r#"{"sub":"alice","org":{"id":"o1"}}"#),
        );
        v.path = Some("/teams/research/chat?region=eu%20west&x=1".into());
        v.meta
            .insert("jwt_payload".into(), serde_json::json!({"tier": "gold"}));
        let body = serde_json::json!({"model": "gpt-4o", "max_tokens": 512});
        let x = extract(
            &c,
            &c.plain(),
            &v,
            Body {
                json: Some(&body),
                len: 0,
            },
        )
        .unwrap();
        assert_eq!(x.customer.as_deref(), Some("acme"));
        assert_eq!(x.feature.as_deref(), Some("ai-tokens"));
        assert_eq!(x.usage, Some(512));
        let dims: HashMap<_, _> = x.dimensions.into_iter().collect();
        assert_eq!(dims["teamId"], "research");
        assert_eq!(dims["userId"], "alice");
        assert_eq!(dims["org"], "o1");
        assert_eq!(dims["model"], "gpt-4o");
        assert_eq!(dims["region"], "eu west");
        assert_eq!(dims["tier"], "gold");
    }

    #[test]
    fn defaults_fill_in_and_required_values_are_named() {
        let c = config(
            r#""customer": {"header": "x-customer", "required": true},
               "usage": {"body": "/max_tokens", "default": "256"},
               "dimensions": {"teamId": {"header": "x-team", "default": "none"}, "x": {"query": "x"}}"#,
        );
        let mut v = View::default();
        let e = extract(&c, &c.plain(), &v, Body { json: None, len: 0 }).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`customer` is required: header `x-customer` is missing"
        );
        v.headers.insert("x-customer".into(), "acme".into());
        let x = extract(&c, &c.plain(), &v, Body { json: None, len: 0 }).unwrap();
        assert_eq!(x.usage, Some(256));
        assert_eq!(
            x.dimensions,
            vec![("teamId".to_string(), "none".to_string())]
        );
        // An empty header counts as absent.
        v.headers.insert("x-customer".into(), String::new());
        assert!(matches!(
            extract(&c, &c.plain(), &v, Body { json: None, len: 0 }),
            Err(BadInput::Missing { .. })
        ));
    }

    #[test]
    fn malformed_values_are_refused_with_a_reason() {
        let c = config(
            r#""customer": {"jwtClaim": "sub"}, "usage": {"body": "/max_tokens"},
               "dimensions": {"model": {"body": "/model"}}"#,
        );
        let v = View::default();
        for (body, code) in [
            (serde_json::json!({"max_tokens": "lots"}), "not_a_number"),
            (serde_json::json!({"max_tokens": -3}), "not_a_number"),
            (serde_json::json!({"max_tokens": 1.5}), "not_a_number"),
            (
                serde_json::json!({"max_tokens": 1, "model": {"a": 1}}),
                "not_a_scalar",
            ),
        ] {
            assert_eq!(
                extract(
                    &c,
                    &c.plain(),
                    &v,
                    Body {
                        json: Some(&body),
                        len: 0
                    }
                )
                .unwrap_err()
                .code(),
                code,
                "{body}"
            );
        }
        assert_eq!(
            parse_body(b"{not json").unwrap_err().code(),
            "body_not_json"
        );
        assert_eq!(parse_body(b"  ").unwrap(), None);

        for token in [
            "Bearer abc",
            "Bearer a.!!!.c",
            "Bearer a.bm90IGpzb24.c",
            "Bearer a.WzEsMl0.c",
        ] {
            let mut v = View::default();
            v.headers.insert("authorization".into(), token.into());
            let e = extract(&c, &c.plain(), &v, Body { json: None, len: 0 }).unwrap_err();
            assert_eq!(e.code(), "bad_jwt", "{token}: {e}");
        }
        // No bearer token at all: the claim is simply absent.
        let mut v = View::default();
        v.headers
            .insert("authorization".into(), "Basic dXNlcjpwdw==".into());
        assert_eq!(
            extract(&c, &c.plain(), &v, Body { json: None, len: 0 })
                .unwrap()
                .customer,
            None
        );
    }
}
