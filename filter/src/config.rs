//! The filter's plugin configuration: the JSON DTO Envoy hands to `on_configure`, its validated
//! form, and the per-route overrides read from route metadata.

use std::collections::BTreeMap;
use std::time::Duration;

use std::rc::Rc;

use regex_lite::Regex;
use serde::Deserialize;

use crate::api::{Api, Estimate};

/// A config problem, with the JSON path it is at.
#[derive(Debug, thiserror::Error)]
#[error("tollgate filter config: at `{path}`: {message}")]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

fn err(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        path: path.into(),
        message: message.into(),
    }
}

/// What happens when the sidecar cannot give an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FailMode {
    /// Pass the request, marked `x-tollgate-unchecked`.
    Open,
    /// Answer `failStatus` with a JSON body.
    Closed,
    /// Pass the request while the customer's allowance (`boundedPerMinute` units a minute,
    /// shared by Envoy's worker threads) lasts, marked `x-tollgate-unchecked: bounded`, and
    /// report what passed to the sidecar when it is back; past it, answer as `closed`.
    Bounded,
}

/// What a hold is charged when content was delivered and the usage never came (a stream
/// without usage, a client that left before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum OnMissingUsage {
    /// The documented estimate: the prompt from the request's size, the output from the
    /// content delivered (falls back to the hold when the content cannot be counted).
    #[default]
    Estimate,
    /// The hold's full amount.
    Hold,
    /// Nothing. Lets delivered output go uncharged: for routes where that is acceptable.
    Release,
}

/// What a hold is charged when the upstream answers an error status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum OnUpstreamError {
    /// Nothing: the providers do not bill errors.
    #[default]
    Release,
    /// The hold's full amount.
    Hold,
}

/// Whether the filter asks a streamed chat for usage the client did not ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum StreamUsage {
    /// Add `stream_options.include_usage` and take the extra event out of the client's stream.
    #[default]
    Inject,
    Off,
}

/// How a streamed call holds its output (`settlement.streaming.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StreamMode {
    /// The whole worst case up front, as a non-streamed call.
    #[default]
    Off,
    /// A first slice, extended slice by slice as the output grows; cut when refused.
    Extend,
    /// Slices, but once admitted the stream may finish up to its declared output budget past
    /// a refused extension; the overshoot is counted.
    ExtendFinish,
}

/// What a stream does when an extension cannot reach the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub enum MidStreamDown {
    /// Finish, up to its declared output budget (the worst case a non-streamed call holds).
    #[default]
    Finish,
    /// End it as a refusal would.
    Cut,
    /// Go on a slice at a time within the customer's bounded allowance (`boundedPerMinute`,
    /// the one `failMode: bounded` draws from), asking the sidecar again for each next slice;
    /// past the allowance, end it as a refusal would.
    Bounded,
}

/// The error for a stream policy that draws on an allowance the settings do not give.
fn bounded_needs_allowance(path: &str) -> ConfigError {
    err(
        format!("{path}.streaming.onSidecarDown"),
        "`bounded` needs `boundedPerMinute` (at least 1): the units a customer may pass per minute while the sidecar is unreachable",
    )
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StreamingDto {
    #[serde(default)]
    mode: Option<StreamMode>,
    #[serde(default)]
    first_slice: Option<u64>,
    #[serde(default)]
    slice: Option<u64>,
    #[serde(default)]
    ask_ahead: Option<u64>,
    #[serde(default)]
    on_sidecar_down: Option<MidStreamDown>,
}

/// Pay-as-you-stream: how a streamed call holds its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streaming {
    pub mode: StreamMode,
    /// Output tokens the first hold covers, beside the prompt's estimate.
    pub first_slice: u64,
    /// Output tokens each extension adds.
    pub slice: u64,
    /// Ask for the next slice when fewer than this many tokens of the held ones are left, so
    /// the stream never waits on the answer.
    pub ask_ahead: u64,
    pub on_sidecar_down: MidStreamDown,
}

impl Default for Streaming {
    fn default() -> Self {
        Self {
            mode: StreamMode::Off,
            first_slice: 256,
            slice: 512,
            ask_ahead: 256,
            on_sidecar_down: MidStreamDown::Finish,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigDto {
    sidecar: SidecarDto,
    #[serde(default)]
    fail_mode: Option<FailMode>,
    /// `failMode: bounded`: units a customer may pass per minute per Envoy while the sidecar
    /// cannot answer.
    #[serde(default)]
    bounded_per_minute: Option<u64>,
    #[serde(default)]
    fail_status: Option<u16>,
    #[serde(default)]
    bad_input_status: Option<u16>,
    #[serde(default)]
    max_body_bytes: Option<usize>,
    #[serde(default)]
    customer: Option<RuleDto>,
    #[serde(default)]
    feature: Option<RuleDto>,
    #[serde(default)]
    usage: Option<RuleDto>,
    #[serde(default)]
    dimensions: BTreeMap<String, RuleDto>,
    #[serde(default)]
    upstream_headers: Option<bool>,
    #[serde(default)]
    settlement: Option<SettlementDto>,
    /// An API preset: `openai` or `anthropic` (the whole API, by endpoint), `openai-chat`,
    /// `openai-responses`, `openai-embeddings`, `anthropic-messages`, or `custom`.
    #[serde(default)]
    api: Option<Api>,
    /// What a whole-API preset does with an endpoint it does not know (default `deny`).
    #[serde(default)]
    unknown_endpoints: Option<UnknownEndpoints>,
    #[serde(default)]
    estimate: Option<EstimateDto>,
    /// Remove `accept-encoding` from governed requests, so the usage can be read from the
    /// answer (default true).
    #[serde(default)]
    strip_accept_encoding: Option<bool>,
    /// This filter instance's name, for per-instance route overrides.
    #[serde(default)]
    instance: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EstimateDto {
    #[serde(default)]
    default_max_tokens: Option<u64>,
    #[serde(default)]
    bytes_per_token: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SidecarDto {
    cluster: String,
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// The gateway token, inline. Prefer `tokenEnv`: an inline token is in Envoy's config,
    /// which its admin interface (`/config_dump`) shows to whoever reaches it.
    #[serde(default)]
    token: Option<String>,
    /// The environment variable that holds the gateway token, as the Wasm VM sees it (Envoy's
    /// `vm_config.environment_variables`, Istio's `vmConfig.env`).
    #[serde(default)]
    token_env: Option<String>,
}

/// One extraction rule as written: exactly one source, then `default` and `required`.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleDto {
    header: Option<String>,
    query: Option<String>,
    path: Option<String>,
    group: Option<String>,
    jwt_claim: Option<String>,
    jwt_metadata: Option<String>,
    body: Option<String>,
    constant: Option<String>,
    default: Option<String>,
    #[serde(default)]
    required: bool,
}

#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SettlementDto {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    usage_pointer: Option<String>,
    #[serde(default)]
    header: Option<String>,
    #[serde(default)]
    on_missing_usage: Option<OnMissingUsage>,
    #[serde(default)]
    on_upstream_error: Option<OnUpstreamError>,
    #[serde(default)]
    stream_usage: Option<StreamUsage>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    max_response_bytes: Option<usize>,
    #[serde(default)]
    streaming: Option<StreamingDto>,
    /// The output budget held for a request that names none, lower than
    /// `estimate.defaultMaxTokens` (a route of short answers).
    #[serde(default)]
    default_max_tokens: Option<u64>,
}

/// Where a value comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A request header (lower-case name).
    Header(String),
    /// A query parameter.
    Query(String),
    /// A named capture group of a regex over the path (query excluded).
    Path { regex: Regex, group: String },
    /// A claim (a name, or a JSON pointer starting with `/`) of the JWT payload: from the
    /// bearer token (`metadata: None`), or from `jwt_authn`'s `payload_in_metadata` key.
    JwtClaim {
        claim: String,
        metadata: Option<String>,
    },
    /// A JSON pointer into the request body.
    Body(String),
    /// A fixed value.
    Constant(String),
}

/// A validated extraction rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// What the rule fills, for error messages: `customer`, `usage`, `dimensions.teamId`.
    pub name: String,
    pub source: Source,
    pub default: Option<String>,
    pub required: bool,
}

/// How the actual usage is read from the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub enabled: bool,
    /// A JSON pointer to a whole number in the JSON body or in an SSE event; `None` reads the
    /// API's own usage (the preset's, or an OpenAI-style `usage` object).
    pub usage_pointer: Option<String>,
    /// A response header holding the usage; it wins over the body when present.
    pub header: Option<String>,
    pub on_missing_usage: OnMissingUsage,
    pub on_upstream_error: OnUpstreamError,
    pub stream_usage: StreamUsage,
    pub estimate: Estimate,
    pub timeout: Duration,
    /// The most of a JSON response body kept to read usage from.
    pub max_response_bytes: usize,
    pub streaming: Streaming,
}

impl Settlement {
    /// These settings with `o`'s fields over them; `path` names where `o` is, for errors.
    fn with(&self, o: &SettlementDto, path: &str) -> Result<Self, ConfigError> {
        let mut s = self.clone();
        if let Some(v) = o.enabled {
            s.enabled = v;
        }
        if let Some(p) = &o.usage_pointer {
            pointer(p, &format!("{path}.usagePointer"))?;
            s.usage_pointer = Some(p.clone());
        }
        if let Some(h) = &o.header {
            s.header = Some(h.to_ascii_lowercase());
        }
        if let Some(v) = o.on_missing_usage {
            s.on_missing_usage = v;
        }
        if let Some(v) = o.on_upstream_error {
            s.on_upstream_error = v;
        }
        if let Some(v) = o.stream_usage {
            s.stream_usage = v;
        }
        if let Some(ms) = o.timeout_ms {
            s.timeout = timeout_ms(Some(ms), 1000, &format!("{path}.timeoutMs"))?;
        }
        if let Some(b) = o.max_response_bytes {
            s.max_response_bytes = b;
        }
        if let Some(n) = o.default_max_tokens {
            if n == 0 || n > s.estimate.default_max_tokens {
                return Err(err(
                    format!("{path}.defaultMaxTokens"),
                    format!(
                        "{n}: a route may lower the default output budget (1 to {}), not raise it",
                        s.estimate.default_max_tokens
                    ),
                ));
            }
            s.estimate.default_max_tokens = n;
        }
        if let Some(st) = &o.streaming {
            let mut v = s.streaming;
            if let Some(m) = st.mode {
                v.mode = m;
            }
            for (given, field, name) in [
                (st.first_slice, &mut v.first_slice, "firstSlice"),
                (st.slice, &mut v.slice, "slice"),
            ] {
                if let Some(n) = given {
                    if n == 0 {
                        return Err(err(format!("{path}.streaming.{name}"), "must be above 0"));
                    }
                    *field = n;
                }
            }
            if let Some(a) = st.ask_ahead {
                v.ask_ahead = a;
            }
            if let Some(d) = st.on_sidecar_down {
                v.on_sidecar_down = d;
            }
            s.streaming = v;
        }
        Ok(s)
    }
}

/// The validated filter config.
#[derive(Clone)]
pub struct FilterConfig {
    pub cluster: String,
    /// The upstream of every gRPC call to the sidecar: see [`grpc_upstream`].
    pub grpc_upstream: String,
    /// `Bearer <gateway token>`: the `authorization` metadata of every call to the sidecar.
    pub authorization: String,
    pub timeout: Duration,
    pub fail_mode: FailMode,
    /// `failMode: bounded`: units per customer per minute per Envoy.
    pub bounded_per_minute: u64,
    pub fail_status: u16,
    pub bad_input_status: u16,
    pub max_body_bytes: usize,
    pub customer: Option<Rule>,
    pub feature: Option<Rule>,
    pub usage: Option<Rule>,
    pub dimensions: Vec<Rule>,
    pub upstream_headers: bool,
    pub settlement: Rc<Settlement>,
    pub api: Api,
    pub unknown_endpoints: UnknownEndpoints,
    pub strip_accept_encoding: bool,
    pub instance: Option<String>,
}

/// What the `openai` and `anthropic` presets do with an endpoint they have no entry for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UnknownEndpoints {
    /// Refuse it (403 in the API's error shape): nothing a route governs passes unmetered.
    #[default]
    Deny,
    /// Pass it ungoverned, marked `x-tollgate-unchecked: unknown-endpoint`.
    Pass,
    /// Hold `estimate.defaultMaxTokens` plus the body's estimate, and settle from an
    /// OpenAI-style `usage` in the answer, else by `onMissingUsage`.
    Hold,
}

/// Everything but the credential, which must never reach a log line.
impl std::fmt::Debug for FilterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterConfig")
            .field("cluster", &self.cluster)
            .field("authorization", &"<redacted>")
            .field("timeout", &self.timeout)
            .field("fail_mode", &self.fail_mode)
            .finish_non_exhaustive()
    }
}

pub const DEFAULT_TIMEOUT_MS: u64 = 200;
pub const DEFAULT_MAX_BODY_BYTES: usize = 256 * 1024;

impl FilterConfig {
    /// Parses and validates the plugin configuration bytes; `env` reads the VM's environment
    /// (for `sidecar.tokenEnv`).
    pub fn parse(bytes: &[u8], env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let dto: ConfigDto = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            err(path, e.into_inner().to_string())
        })?;
        Self::from_dto(dto, env)
    }

    fn from_dto(dto: ConfigDto, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        if dto.sidecar.cluster.trim().is_empty() {
            return Err(err(
                "sidecar.cluster",
                "must name the sidecar's Envoy cluster",
            ));
        }
        let token = match (&dto.sidecar.token, &dto.sidecar.token_env) {
            (Some(t), None) => t.clone(),
            (None, Some(name)) => env(name).ok_or_else(|| {
                err(
                    "sidecar.tokenEnv",
                    format!(
                        "the environment variable `{name}` is not set in the Wasm VM (give it in vm_config.environment_variables)"
                    ),
                )
            })?,
            (Some(_), Some(_)) => {
                return Err(err("sidecar", "give either `token` or `tokenEnv`, not both"));
            }
            (None, None) => {
                return Err(err(
                    "sidecar",
                    "set `tokenEnv` (or `token`): the sidecar's ext_authz listener refuses calls without a gateway token (`tollgate keygen --gateway`)",
                ));
            }
        };
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(err(
                "sidecar.token",
                "the gateway token is empty or not printable ASCII",
            ));
        }
        let authorization = format!("Bearer {token}");
        let timeout = timeout_ms(
            dto.sidecar.timeout_ms,
            DEFAULT_TIMEOUT_MS,
            "sidecar.timeoutMs",
        )?;
        let fail_status = status(dto.fail_status, 503, "failStatus")?;
        if dto.fail_mode == Some(FailMode::Bounded) && dto.bounded_per_minute.unwrap_or(0) == 0 {
            return Err(err(
                "boundedPerMinute",
                "`failMode: bounded` needs the units a customer may pass per minute while the sidecar is unreachable (at least 1)",
            ));
        }
        let bad_input_status = status(dto.bad_input_status, 400, "badInputStatus")?;
        let max_body_bytes = dto.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            return Err(err("maxBodyBytes", "must be above 0"));
        }
        let customer = dto.customer.map(|r| rule("customer", r)).transpose()?;
        let feature = dto.feature.map(|r| rule("feature", r)).transpose()?;
        let usage = dto.usage.map(|r| rule("usage", r)).transpose()?;
        if let Some(d) = usage.as_ref().and_then(|u| u.default.as_deref())
            && d.trim().parse::<u64>().is_err()
        {
            return Err(err("usage.default", format!("`{d}` is not a whole number")));
        }
        let mut dimensions = Vec::with_capacity(dto.dimensions.len());
        for (name, r) in dto.dimensions {
            if name.is_empty() {
                return Err(err("dimensions", "a dimension name is empty"));
            }
            dimensions.push(rule(&format!("dimensions.{name}"), r)?);
        }
        let e = dto.estimate.unwrap_or_default();
        let defaults = Estimate::default();
        let estimate = Estimate {
            default_max_tokens: e.default_max_tokens.unwrap_or(defaults.default_max_tokens),
            bytes_per_token: e.bytes_per_token.unwrap_or(defaults.bytes_per_token),
        };
        if estimate.bytes_per_token == 0 {
            return Err(err("estimate.bytesPerToken", "must be above 0"));
        }
        let base = Settlement {
            enabled: true,
            usage_pointer: None,
            header: None,
            on_missing_usage: OnMissingUsage::default(),
            on_upstream_error: OnUpstreamError::default(),
            stream_usage: StreamUsage::default(),
            estimate,
            timeout: Duration::from_millis(1000),
            max_response_bytes: 4 * 1024 * 1024,
            streaming: Streaming::default(),
        };
        let settlement = base.with(&dto.settlement.unwrap_or_default(), "settlement")?;
        if settlement.streaming.on_sidecar_down == MidStreamDown::Bounded
            && dto.bounded_per_minute.unwrap_or(0) == 0
        {
            return Err(bounded_needs_allowance("settlement"));
        }
        Ok(Self {
            grpc_upstream: grpc_upstream(&dto.sidecar.cluster),
            cluster: dto.sidecar.cluster,
            authorization,
            timeout,
            fail_mode: dto.fail_mode.unwrap_or(FailMode::Closed),
            bounded_per_minute: dto.bounded_per_minute.unwrap_or(0),
            fail_status,
            bad_input_status,
            max_body_bytes,
            customer,
            feature,
            usage,
            dimensions,
            upstream_headers: dto.upstream_headers.unwrap_or(true),
            settlement: Rc::new(settlement),
            api: dto.api.unwrap_or_default(),
            unknown_endpoints: dto.unknown_endpoints.unwrap_or_default(),
            strip_accept_encoding: dto.strip_accept_encoding.unwrap_or(true),
            instance: dto.instance,
        })
    }

    /// Every rule, in the order they are applied.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.customer
            .iter()
            .chain(&self.feature)
            .chain(&self.usage)
            .chain(&self.dimensions)
    }

    /// What is valid but unwise, logged when Envoy loads the config.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(Rule {
            source: Source::Header(h),
            ..
        }) = &self.customer
        {
            out.push(format!(
                "tollgate filter config: `customer` comes from the client's own `{h}` header, so any client can charge any customer; read it from a verified JWT (`jwtClaim` with `jwtMetadata`) or set it per route"
            ));
        }
        out
    }

    /// Whether any rule reads the request body.
    fn rules_read_body(&self) -> bool {
        self.rules().any(|r| matches!(r.source, Source::Body(_)))
    }
}

fn timeout_ms(v: Option<u64>, default: u64, path: &str) -> Result<Duration, ConfigError> {
    match v.unwrap_or(default) {
        0 => Err(err(path, "must be above 0")),
        ms if ms > 60_000 => Err(err(path, "must be at most 60000 (one minute)")),
        ms => Ok(Duration::from_millis(ms)),
    }
}

fn status(v: Option<u16>, default: u16, path: &str) -> Result<u16, ConfigError> {
    let s = v.unwrap_or(default);
    if !(200..=599).contains(&s) {
        return Err(err(
            path,
            format!("{s} is not an HTTP status from 200 to 599"),
        ));
    }
    Ok(s)
}

fn pointer(p: &str, path: &str) -> Result<(), ConfigError> {
    if !p.starts_with('/') {
        return Err(err(
            path,
            format!("`{p}` is not a JSON pointer: it must start with `/`"),
        ));
    }
    Ok(())
}

fn rule(name: &str, r: RuleDto) -> Result<Rule, ConfigError> {
    let set: Vec<&str> = [
        ("header", r.header.is_some()),
        ("query", r.query.is_some()),
        ("path", r.path.is_some()),
        ("jwtClaim", r.jwt_claim.is_some()),
        ("body", r.body.is_some()),
        ("constant", r.constant.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, on)| on.then_some(k))
    .collect();
    if set.len() != 1 {
        return Err(err(
            name,
            format!(
                "set exactly one of header, query, path, jwtClaim, body, constant (found {})",
                if set.is_empty() {
                    "none".to_string()
                } else {
                    set.join(", ")
                }
            ),
        ));
    }
    if r.group.is_some() && r.path.is_none() {
        return Err(err(
            format!("{name}.group"),
            "only a `path` rule has a group",
        ));
    }
    if r.jwt_metadata.is_some() && r.jwt_claim.is_none() {
        return Err(err(
            format!("{name}.jwtMetadata"),
            "only a `jwtClaim` rule reads jwt_authn metadata",
        ));
    }
    let source = if let Some(h) = r.header {
        if h.is_empty() {
            return Err(err(format!("{name}.header"), "is empty"));
        }
        Source::Header(h.to_ascii_lowercase())
    } else if let Some(q) = r.query {
        Source::Query(q)
    } else if let Some(p) = r.path {
        let regex = Regex::new(&p)
            .map_err(|e| err(format!("{name}.path"), format!("not a valid regex: {e}")))?;
        let group = r.group.ok_or_else(|| {
            err(
                format!("{name}.group"),
                "a `path` rule names the capture group that holds the value",
            )
        })?;
        if !regex.capture_names().flatten().any(|n| n == group) {
            return Err(err(
                format!("{name}.group"),
                format!("the regex has no capture group named `{group}`"),
            ));
        }
        Source::Path { regex, group }
    } else if let Some(claim) = r.jwt_claim {
        if claim.is_empty() {
            return Err(err(format!("{name}.jwtClaim"), "is empty"));
        }
        Source::JwtClaim {
            claim,
            metadata: r.jwt_metadata,
        }
    } else if let Some(b) = r.body {
        pointer(&b, &format!("{name}.body"))?;
        Source::Body(b)
    } else if let Some(c) = r.constant {
        Source::Constant(c)
    } else {
        return Err(err(name, "no source"));
    };
    Ok(Rule {
        name: name.to_string(),
        source,
        default: r.default,
        required: r.required,
    })
}

/// Per-route settings from the route's metadata, `filter_metadata["tollgate"]`, as written:
/// every field optional; `instances` holds the same fields for one filter instance by name.
#[derive(Debug, Default, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OverrideDto {
    #[serde(default)]
    fail_mode: Option<FailMode>,
    #[serde(default)]
    bounded_per_minute: Option<u64>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    fail_status: Option<u16>,
    /// Skip the filter on this route.
    #[serde(default)]
    disabled: Option<bool>,
    #[serde(default)]
    api: Option<Api>,
    #[serde(default)]
    unknown_endpoints: Option<UnknownEndpoints>,
    #[serde(default)]
    usage: Option<RuleDto>,
    #[serde(default)]
    settlement: Option<SettlementDto>,
    #[serde(default)]
    instances: BTreeMap<String, OverrideDto>,
}

/// A route's override, validated: what it changes for this filter instance.
#[derive(Debug, Clone)]
pub struct RouteOverride {
    pub fail_mode: Option<FailMode>,
    pub bounded_per_minute: Option<u64>,
    pub timeout: Option<Duration>,
    pub fail_status: Option<u16>,
    pub disabled: bool,
    pub api: Option<Api>,
    pub unknown_endpoints: Option<UnknownEndpoints>,
    pub usage: Option<Rc<Rule>>,
    pub settlement: Option<SettlementDto>,
}

impl RouteOverride {
    /// Reads the override from route metadata converted to JSON, for the filter instance named
    /// `instance` (its `instances` entry wins over the shared fields).
    pub fn from_json(v: serde_json::Value, instance: Option<&str>) -> Result<Self, ConfigError> {
        let o: OverrideDto = serde_path_to_error::deserialize(v).map_err(|e| {
            let path = format!("route metadata tollgate.{}", e.path());
            err(path, e.into_inner().to_string())
        })?;
        let mut out = Self::one(&o, "route metadata tollgate")?;
        if let Some(name) = instance
            && let Some(i) = o.instances.get(name)
        {
            let path = format!("route metadata tollgate.instances.{name}");
            let mine = Self::one(i, &path)?;
            out = Self {
                fail_mode: mine.fail_mode.or(out.fail_mode),
                bounded_per_minute: mine.bounded_per_minute.or(out.bounded_per_minute),
                timeout: mine.timeout.or(out.timeout),
                fail_status: mine.fail_status.or(out.fail_status),
                disabled: i.disabled.unwrap_or(out.disabled),
                api: mine.api.or(out.api),
                unknown_endpoints: mine.unknown_endpoints.or(out.unknown_endpoints),
                usage: mine.usage.or(out.usage),
                settlement: match (out.settlement, mine.settlement) {
                    (Some(a), Some(b)) => Some(merge_settlement(a, b)),
                    (a, b) => b.or(a),
                },
            };
        }
        Ok(out)
    }

    fn one(o: &OverrideDto, path: &str) -> Result<Self, ConfigError> {
        let timeout = o
            .timeout_ms
            .map(|ms| timeout_ms(Some(ms), DEFAULT_TIMEOUT_MS, &format!("{path}.timeoutMs")))
            .transpose()?;
        if let Some(s) = o.fail_status {
            status(Some(s), 503, &format!("{path}.failStatus"))?;
        }
        let usage = o
            .usage
            .clone()
            .map(|r| rule(&format!("{path}.usage"), r).map(Rc::new))
            .transpose()?;
        if let Some(p) = o
            .settlement
            .as_ref()
            .and_then(|s| s.usage_pointer.as_deref())
        {
            pointer(p, &format!("{path}.settlement.usagePointer"))?;
        }
        Ok(Self {
            fail_mode: o.fail_mode,
            bounded_per_minute: o.bounded_per_minute,
            timeout,
            fail_status: o.fail_status,
            disabled: o.disabled.unwrap_or(false),
            api: o.api,
            unknown_endpoints: o.unknown_endpoints,
            usage,
            settlement: o.settlement.clone(),
        })
    }
}

/// `b`'s settlement fields over `a`'s.
fn merge_settlement(a: SettlementDto, b: SettlementDto) -> SettlementDto {
    SettlementDto {
        enabled: b.enabled.or(a.enabled),
        usage_pointer: b.usage_pointer.or(a.usage_pointer),
        header: b.header.or(a.header),
        on_missing_usage: b.on_missing_usage.or(a.on_missing_usage),
        on_upstream_error: b.on_upstream_error.or(a.on_upstream_error),
        stream_usage: b.stream_usage.or(a.stream_usage),
        timeout_ms: b.timeout_ms.or(a.timeout_ms),
        max_response_bytes: b.max_response_bytes.or(a.max_response_bytes),
        default_max_tokens: b.default_max_tokens.or(a.default_max_tokens),
        streaming: match (a.streaming, b.streaming) {
            (Some(a), Some(b)) => Some(StreamingDto {
                mode: b.mode.or(a.mode),
                first_slice: b.first_slice.or(a.first_slice),
                slice: b.slice.or(a.slice),
                ask_ahead: b.ask_ahead.or(a.ask_ahead),
                on_sidecar_down: b.on_sidecar_down.or(a.on_sidecar_down),
            }),
            (a, b) => b.or(a),
        },
    }
}

/// The settings one request runs with: the filter's, with the route's override applied.
#[derive(Debug, Clone)]
pub struct Effective {
    pub fail_mode: FailMode,
    /// `failMode: bounded`: units per customer per minute (0: none, so nothing passes).
    pub bounded_per_minute: u64,
    pub fail_status: u16,
    pub timeout: Duration,
    pub api: Api,
    pub unknown_endpoints: UnknownEndpoints,
    /// The route's own usage rule, over the filter's (and over the preset's estimate).
    pub usage: Option<Rc<Rule>>,
    pub settlement: Rc<Settlement>,
}

impl FilterConfig {
    /// The settings for a route with override `o`. A bad settlement override is logged by the
    /// caller and the filter's settlement applies.
    pub fn effective(&self, o: Option<&RouteOverride>) -> Result<Effective, ConfigError> {
        let settlement = match o.and_then(|o| o.settlement.as_ref()) {
            Some(dto) => Rc::new(
                self.settlement
                    .with(dto, "route metadata tollgate.settlement")?,
            ),
            None => Rc::clone(&self.settlement),
        };
        let bounded_per_minute = o
            .and_then(|o| o.bounded_per_minute)
            .unwrap_or(self.bounded_per_minute);
        if settlement.streaming.on_sidecar_down == MidStreamDown::Bounded && bounded_per_minute == 0
        {
            return Err(bounded_needs_allowance(
                "route metadata tollgate.settlement",
            ));
        }
        Ok(Effective {
            fail_mode: o.and_then(|o| o.fail_mode).unwrap_or(self.fail_mode),
            bounded_per_minute,
            fail_status: o.and_then(|o| o.fail_status).unwrap_or(self.fail_status),
            timeout: o.and_then(|o| o.timeout).unwrap_or(self.timeout),
            api: o.and_then(|o| o.api).unwrap_or(self.api),
            unknown_endpoints: o
                .and_then(|o| o.unknown_endpoints)
                .unwrap_or(self.unknown_endpoints),
            usage: o.and_then(|o| o.usage.clone()),
            settlement,
        })
    }

    /// The filter's own settings, for a route without an override.
    pub fn plain(&self) -> Effective {
        Effective {
            fail_mode: self.fail_mode,
            bounded_per_minute: self.bounded_per_minute,
            fail_status: self.fail_status,
            timeout: self.timeout,
            api: self.api,
            unknown_endpoints: self.unknown_endpoints,
            usage: None,
            settlement: Rc::clone(&self.settlement),
        }
    }
}

impl Effective {
    /// Whether the request body must be buffered: a rule reads it, or a preset estimates from
    /// it.
    pub fn needs_body(&self, config: &FilterConfig) -> bool {
        self.api != Api::Custom
            || config.rules_read_body()
            || self
                .usage
                .as_ref()
                .is_some_and(|r| matches!(r.source, Source::Body(_)))
    }
}

/// Envoy's `GrpcService`, the two fields of it a gRPC call's upstream needs.
#[derive(Clone, PartialEq, prost::Message)]
struct GrpcServiceDto {
    #[prost(message, optional, tag = "1")]
    envoy_grpc: Option<EnvoyGrpcDto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EnvoyGrpcDto {
    #[prost(string, tag = "1")]
    cluster_name: String,
    #[prost(string, tag = "2")]
    authority: String,
}

/// What the filter hands Envoy as a gRPC call's upstream: the cluster's name, or, when that
/// name cannot be an HTTP/2 `:authority` (Istio's `outbound|9191||host` names hold `|`, and
/// the decision server refuses such a request as a protocol error), a serialized
/// `GrpcService` naming the cluster with a valid authority (`|` becomes `_.`, as Istio does
/// for its own ext_authz). Envoy reads the upstream as a `GrpcService` when it parses as one.
fn grpc_upstream(cluster: &str) -> String {
    if cluster
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~:".contains(&b))
    {
        return cluster.to_string();
    }
    let service = GrpcServiceDto {
        envoy_grpc: Some(EnvoyGrpcDto {
            cluster_name: cluster.to_string(),
            authority: cluster.replace('|', "_."),
        }),
    };
    // The SDK takes the upstream as a `&str`: the encoding is ASCII while the name is shorter
    // than 128 bytes (one-byte lengths). A longer name is passed as it is.
    String::from_utf8(prost::Message::encode_to_vec(&service))
        .unwrap_or_else(|_| cluster.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_istio_cluster_name_goes_to_envoy_as_a_grpc_service_with_a_valid_authority() {
        assert_eq!(grpc_upstream("tollgate"), "tollgate");
        let upstream = grpc_upstream("outbound|9191||tollgate.local");
        let decoded: GrpcServiceDto = prost::Message::decode(upstream.as_bytes()).unwrap();
        let g = decoded.envoy_grpc.unwrap();
        assert_eq!(g.cluster_name, "outbound|9191||tollgate.local");
        assert_eq!(g.authority, "outbound_.9191_._.tollgate.local");
    }

    fn parse(s: &str) -> Result<FilterConfig, ConfigError> {
        FilterConfig::parse(s.as_bytes(), |name| {
            (name == "GATEWAY_TOKEN").then(|| "envoy.secret".to_string())
        })
    }

    #[test]
    fn the_gateway_token_is_required_inline_or_from_the_environment() {
        let c = parse(r#"{"sidecar": {"cluster": "t", "tokenEnv": "GATEWAY_TOKEN"}}"#).unwrap();
        assert_eq!(c.authorization, "Bearer envoy.secret");
        assert!(
            !format!("{c:?}").contains("secret"),
            "never in a debug line"
        );
        let c = parse(r#"{"sidecar": {"cluster": "t", "token": "a.b"}}"#).unwrap();
        assert_eq!(c.authorization, "Bearer a.b");
        for (text, want) in [
            (r#"{"sidecar": {"cluster": "t"}}"#, "set `tokenEnv`"),
            (
                r#"{"sidecar": {"cluster": "t", "tokenEnv": "NOPE"}}"#,
                "`NOPE` is not set",
            ),
            (
                r#"{"sidecar": {"cluster": "t", "token": "a", "tokenEnv": "GATEWAY_TOKEN"}}"#,
                "not both",
            ),
            (
                r#"{"sidecar": {"cluster": "t", "token": "a b"}}"#,
                "not printable",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn a_full_config_parses() {
        let c = parse(
            r#"{
              "sidecar": {"cluster": "tollgate", "timeoutMs": 150, "token": "envoy.x"},
              "failMode": "open",
              "customer": {"header": "X-Tollgate-Customer", "required": true},
              "feature": {"constant": "ai-tokens"},
              "usage": {"body": "/max_tokens", "default": "256"},
              "dimensions": {
                "teamId": {"path": "^/teams/(?P<team>[^/]+)/", "group": "team"},
                "userId": {"jwtClaim": "sub"},
                "model": {"body": "/model"},
                "region": {"query": "region", "default": "eu"}
              },
              "settlement": {"onMissingUsage": "hold"}
            }"#,
        )
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(150));
        assert_eq!(c.fail_mode, FailMode::Open);
        assert!(
            matches!(c.customer.as_ref().unwrap().source, Source::Header(ref h) if h == "x-tollgate-customer")
        );
        assert!(c.plain().needs_body(&c));
        assert_eq!(c.dimensions.len(), 4);
        assert_eq!(c.settlement.on_missing_usage, OnMissingUsage::Hold);
        assert_eq!(c.api, Api::Custom);
        assert_eq!(c.fail_status, 503);
    }

    #[test]
    fn bounded_mode_needs_an_allowance_and_routes_may_set_their_own() {
        let e = FilterConfig::parse(
            br#"{"sidecar": {"cluster": "t", "token": "x"}, "failMode": "bounded"}"#,
            |_| None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("boundedPerMinute"), "{e}");
        let c = FilterConfig::parse(
            br#"{"sidecar": {"cluster": "t", "token": "x"}, "failMode": "bounded", "boundedPerMinute": 5000}"#,
            |_| None,
        )
        .unwrap();
        assert_eq!(c.plain().fail_mode, FailMode::Bounded);
        assert_eq!(c.plain().bounded_per_minute, 5000);
        let o = RouteOverride::from_json(
            serde_json::json!({"failMode": "bounded", "boundedPerMinute": 40}),
            None,
        )
        .unwrap();
        let e = c.effective(Some(&o)).unwrap();
        assert_eq!((e.fail_mode, e.bounded_per_minute), (FailMode::Bounded, 40));
    }

    #[test]
    fn errors_name_the_place() {
        let cases = [
            (r#"{}"#, "missing field `sidecar`"),
            (r#"{"sidecar": {"cluster": ""}}"#, "sidecar.cluster"),
            (
                r#"{"sidecar": {"cluster": "t", "token": "x"}, "failMode": "maybe"}"#,
                "failMode",
            ),
            (
                r#"{"sidecar": {"cluster": "t", "token": "x"}, "customer": {}}"#,
                "found none",
            ),
            (
                r#"{"sidecar": {"cluster": "t", "token": "x"}, "customer": {"header": "a", "query": "b"}}"#,
                "found header, query",
            ),
            (
                r#"{"sidecar": {"cluster": "t", "token": "x"}, "dimensions": {"t": {"path": "(", "group": "x"}}}"#,
                "dimensions.t.path",
            ),
            (
                r#"{"sidecar": {"cluster": "t", "token": "x"}, "dimensions": {"t": {"path": "^/(?P<a>x)", "group": "b"}}}"#,
                "no capture group named `b`",
            ),
            (
                r#"{"sidecar": {"cluster": "t", "token": "x"}, "usage": {"body": "max_tokens"}}"#,
                "JSON pointer",
            ),
            (
                r#"{"sidecar": {"cluster": "t", "token": "x"}, "usage": {"constant": "1", "default": "x"}}"#,
                "usage.default",
            ),
            (
                r#"{"sidecar": {"cluster": "t", "token": "x"}, "failStatus": 99}"#,
                "failStatus",
            ),
            (
                r#"{"sidecar": {"cluster": "t", "timeoutMs": 0, "token": "x"}}"#,
                "sidecar.timeoutMs",
            ),
            (
                r#"{"sidecar": {"cluster": "t", "token": "x"}, "bogus": 1}"#,
                "unknown field `bogus`",
            ),
            (r#"not json"#, "expected"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn route_overrides_apply_over_the_filter() {
        let c = parse(r#"{"sidecar": {"cluster": "t", "token": "x"}, "instance": "a"}"#).unwrap();
        let o = RouteOverride::from_json(
            serde_json::json!({"failMode": "open", "timeoutMs": 50}),
            c.instance.as_deref(),
        )
        .unwrap();
        let e = c.effective(Some(&o)).unwrap();
        assert_eq!(e.fail_mode, FailMode::Open);
        assert_eq!(e.timeout, Duration::from_millis(50));
        assert_eq!(e.fail_status, 503);
        assert_eq!(c.plain().fail_mode, FailMode::Closed);
        let bad = RouteOverride::from_json(serde_json::json!({"failMode": 3}), None).unwrap_err();
        assert!(bad.to_string().contains("tollgate.failMode"), "{bad}");
    }

    #[test]
    fn unknown_endpoints_are_denied_unless_the_filter_or_the_route_says_otherwise() {
        let c = parse(r#"{"sidecar": {"cluster": "t", "token": "x"}, "api": "openai"}"#).unwrap();
        assert_eq!(c.api, Api::Openai);
        assert_eq!(c.plain().unknown_endpoints, UnknownEndpoints::Deny);
        let c = parse(
            r#"{"sidecar": {"cluster": "t", "token": "x"}, "api": "anthropic", "unknownEndpoints": "pass"}"#,
        )
        .unwrap();
        assert_eq!(c.plain().unknown_endpoints, UnknownEndpoints::Pass);
        let o = RouteOverride::from_json(serde_json::json!({"unknownEndpoints": "hold"}), None)
            .unwrap();
        assert_eq!(
            c.effective(Some(&o)).unwrap().unknown_endpoints,
            UnknownEndpoints::Hold
        );
        let bad = RouteOverride::from_json(serde_json::json!({"unknownEndpoints": "maybe"}), None)
            .unwrap_err();
        assert!(bad.to_string().contains("unknownEndpoints"), "{bad}");
    }

    #[test]
    fn a_route_lowers_the_default_output_budget_and_sets_its_streaming() {
        let c = parse(
            r#"{"sidecar": {"cluster": "t", "token": "x"}, "estimate": {"defaultMaxTokens": 2048}}"#,
        )
        .unwrap();
        let o = RouteOverride::from_json(
            serde_json::json!({"settlement": {"defaultMaxTokens": 256,
                "streaming": {"mode": "extend-finish", "slice": 128}}}),
            None,
        )
        .unwrap();
        let e = c.effective(Some(&o)).unwrap();
        assert_eq!(e.settlement.estimate.default_max_tokens, 256);
        assert_eq!(e.settlement.streaming.mode, StreamMode::ExtendFinish);
        assert_eq!(e.settlement.streaming.slice, 128);
        assert_eq!(e.settlement.streaming.first_slice, 256, "default kept");
        assert_eq!(c.plain().settlement.estimate.default_max_tokens, 2048);
        // Mid-stream on the bounded allowance: only with one, on the route or the filter.
        let bounded = RouteOverride::from_json(
            serde_json::json!({"boundedPerMinute": 500,
                "settlement": {"streaming": {"onSidecarDown": "bounded"}}}),
            None,
        )
        .unwrap();
        let e = c.effective(Some(&bounded)).unwrap();
        assert_eq!(
            e.settlement.streaming.on_sidecar_down,
            MidStreamDown::Bounded
        );
        let no_allowance = parse(
            r#"{"sidecar": {"cluster": "t", "token": "x"},
                "settlement": {"streaming": {"mode": "extend", "onSidecarDown": "bounded"}}}"#,
        )
        .unwrap_err();
        assert!(
            no_allowance.to_string().contains("boundedPerMinute"),
            "{no_allowance}"
        );
        for (meta, says) in [
            (
                serde_json::json!({"settlement": {"defaultMaxTokens": 4096}}),
                "not raise it",
            ),
            (
                serde_json::json!({"settlement": {"streaming": {"slice": 0}}}),
                "streaming.slice",
            ),
            (
                serde_json::json!({"settlement": {"streaming": {"mode": "sometimes"}}}),
                "mode",
            ),
            (
                serde_json::json!({"settlement": {"streaming": {"onSidecarDown": "bounded"}}}),
                "boundedPerMinute",
            ),
        ] {
            let err = RouteOverride::from_json(meta, None)
                .and_then(|o| c.effective(Some(&o)).map(|_| ()))
                .unwrap_err();
            assert!(err.to_string().contains(says), "{err}");
        }
    }

    #[test]
    fn a_route_sets_the_preset_usage_and_settlement_per_instance() {
        let c =
            parse(r#"{"sidecar": {"cluster": "t", "token": "x"}, "instance": "billing"}"#).unwrap();
        let meta = serde_json::json!({
            "api": "openai-chat",
            "settlement": {"onMissingUsage": "hold"},
            "instances": {
                "billing": {"api": "anthropic-messages", "settlement": {"streamUsage": "off"},
                            "usage": {"header": "x-units"}},
                "other": {"disabled": true}
            }
        });
        let o = RouteOverride::from_json(meta.clone(), c.instance.as_deref()).unwrap();
        assert!(!o.disabled, "only the instance named `other` is off");
        let e = c.effective(Some(&o)).unwrap();
        assert_eq!(e.api, Api::AnthropicMessages);
        assert_eq!(
            e.settlement.on_missing_usage,
            OnMissingUsage::Hold,
            "shared field kept"
        );
        assert_eq!(
            e.settlement.stream_usage,
            StreamUsage::Off,
            "instance field"
        );
        assert!(
            matches!(e.usage.as_deref().unwrap().source, Source::Header(ref h) if h == "x-units")
        );
        assert!(e.needs_body(&c), "a preset reads the body");
        let other = RouteOverride::from_json(meta, Some("other")).unwrap();
        assert!(other.disabled);
        assert_eq!(c.effective(Some(&other)).unwrap().api, Api::OpenaiChat);
        let bad = RouteOverride::from_json(
            serde_json::json!({"instances": {"billing": {"api": "gemini"}}}),
            Some("billing"),
        )
        .unwrap_err();
        assert!(bad.to_string().contains("instances.billing.api"), "{bad}");
        let bad = RouteOverride::from_json(
            serde_json::json!({"settlement": {"usagePointer": "usage"}}),
            None,
        )
        .unwrap_err();
        assert!(bad.to_string().contains("JSON pointer"), "{bad}");
    }
}
