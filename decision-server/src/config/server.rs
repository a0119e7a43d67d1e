//! The `server:` section of the config: listeners, storage, credentials, the ext_authz input
//! mapping and logging, as DTOs and as validated settings.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, ConfigErrors};
use crate::auth::{ApiKeySpec, GatewayTokenSpec, MeshPeerSpec};
use crate::core::period::parse_fixed_millis;

/// Where the ext_authz service listens unless configured: loopback, for the local Envoy.
pub const DEFAULT_EXT_AUTHZ_LISTEN: &str = "127.0.0.1:9191";
/// Where Tollgate's own gRPC API listens unless configured.
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:9192";
/// Where the HTTP/JSON API, `/metrics` and `/openapi.json` listen unless configured.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9190";
/// Largest HTTP request body accepted unless configured.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// The durable store's file when the config names none, relative to the config file's folder.
/// In a folder of its own: the config folder is watched for changes, and every commit would
/// otherwise wake the watcher (measured: 9 % of the sidecar's CPU in sync mode).
pub const DEFAULT_STORE_FILE: &str = "tollgate-data/tollgate.redb";
/// How long shutdown waits for in-flight calls unless configured.
pub const DEFAULT_SHUTDOWN_GRACE: &str = "PT10S";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServerDto {
    #[serde(default)]
    pub listeners: ListenersDto,
    #[serde(default)]
    pub storage: StorageDto,
    #[serde(default)]
    pub credentials: CredentialsDto,
    #[serde(default)]
    pub ext_authz: ExtAuthzDto,
    #[serde(default)]
    pub logging: LoggingDto,
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// ISO-8601 duration shutdown waits for in-flight calls before it gives up.
    #[serde(default)]
    pub shutdown_grace: Option<String>,
    #[serde(default)]
    pub connections: ConnectionsDto,
    #[serde(default)]
    pub limits: RequestLimitsDto,
}

/// Bounds on connections, so that idle, slow or abandoned clients cannot take the file
/// descriptors Envoy's connection needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionsDto {
    /// Most open connections on the ext_authz listener. Default: half of what the process's
    /// file-descriptor limit leaves after a reserve, at most 4096.
    #[serde(default)]
    pub max_ext_authz: Option<usize>,
    /// Most open connections on the gRPC listener. Default: a quarter, at most 1024.
    #[serde(default)]
    pub max_grpc: Option<usize>,
    /// Most open connections on the HTTP listener. Default: a quarter, at most 1024.
    #[serde(default)]
    pub max_http: Option<usize>,
    /// A connection that sends and receives nothing for this long is closed. Default `PT5M`.
    #[serde(default)]
    pub idle_timeout: Option<String>,
    /// A gRPC connection that has carried no call with a valid credential this long after it
    /// opened is closed. Default `PT10S`.
    #[serde(default)]
    pub auth_timeout: Option<String>,
    /// HTTP: the most a request's headers (and an idle keep-alive wait) may take. Default `PT10S`.
    #[serde(default)]
    pub header_timeout: Option<String>,
    /// HTTP: the most a whole request, body included, may take. Default `PT30S`.
    #[serde(default)]
    pub request_timeout: Option<String>,
}

/// Bounds on what one request may carry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestLimitsDto {
    /// Most dimensions one request may carry. Default 32.
    #[serde(default)]
    pub max_dimensions: Option<usize>,
    /// Most bytes of dimension names and values together. Default 8192.
    #[serde(default)]
    pub max_dimension_bytes: Option<usize>,
    /// Largest gRPC message accepted, in bytes. Default 1 MiB.
    #[serde(default)]
    pub max_grpc_message_bytes: Option<usize>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenersDto {
    /// `host:port` or `unix:/path`. Default loopback.
    #[serde(default)]
    pub ext_authz: Option<String>,
    #[serde(default)]
    pub grpc: Option<String>,
    #[serde(default)]
    pub http: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StorageKindDto {
    /// Counters in process memory only: lost on restart.
    Memory,
    /// The embedded durable store (redb), at `path`: the default.
    #[default]
    Durable,
    /// Redis, one node (`url`) or a Cluster (`cluster`), shared by several replicas.
    Redis,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DurabilityDto {
    /// Group commit every `commitIntervalMs` (default 100): a crash loses at most that window.
    #[default]
    Batched,
    /// A decision returns only once its change is committed.
    Sync,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageDto {
    #[serde(default)]
    pub kind: StorageKindDto,
    /// The store file (`kind: durable`); relative to the config file's folder. Default
    /// `tollgate-data/tollgate.redb`.
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub durability: DurabilityDto,
    /// Milliseconds between group commits in `batched` mode (default 100, at most 10,000).
    #[serde(default)]
    pub commit_interval_ms: Option<u64>,
    /// `kind: redis`: the node's URL, `redis://host:port/db` (or `rediss://` for TLS).
    #[serde(default)]
    pub url: Option<String>,
    /// `kind: redis`: the environment variable holding the node's URL (instead of `url`), for
    /// a URL with a password kept in a Secret; read when the store connects.
    #[serde(default)]
    pub url_env: Option<String>,
    /// `kind: redis`: URLs of some nodes of a Redis Cluster (instead of `url`).
    #[serde(default)]
    pub cluster: Vec<String>,
    /// `kind: redis`: prefix of every key (default `tollgate`), no `{` or `}`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// `kind: redis`: the most one call may take, in ms (default 100); past it the decision
    /// fails as unavailable and the route's fail mode applies.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// `kind: redis`: consecutive failed calls that open the circuit breaker (default 5).
    #[serde(default)]
    pub breaker_failures: Option<u32>,
    /// `kind: redis`: how long an open breaker fails calls at once, in ms (default 1000).
    #[serde(default)]
    pub breaker_open_ms: Option<u64>,
    /// `kind: redis`: bucket rows one customer's usage reads may take a second on a replica
    /// (default 1,000,000, with ten seconds' worth at once); a read past it answers 429.
    #[serde(default)]
    pub usage_read_rows_per_second: Option<u32>,
    /// Escrow leases: this replica decides inside slices of hot quota counters held in the
    /// store, so most decisions make no store call. Off unless `enabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leases: Option<LeasesDto>,
}

/// `server.storage.leases`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeasesDto {
    #[serde(default)]
    pub enabled: bool,
    /// ISO-8601 duration a slice lives in the store unrenewed: a replica that dies
    /// overcounts by at most its unused slices, for this long. Must exceed the document's
    /// `holdTtl` plus `skew` plus 1.5 s: a decision is made inside a lease only if its hold
    /// ends before the lease does. Default: exactly that, plus 30 s in which a slice takes
    /// new decisions (with the default `holdTtl` of 5 minutes, about 5.6 minutes).
    #[serde(default)]
    pub ttl: Option<String>,
    /// ISO-8601 duration by which the replica stops using a slice before the store's TTL
    /// ends (default `PT2S`): the clock skew between the replica and the store's clock.
    #[serde(default)]
    pub skew: Option<String>,
    /// The most of what a counter has left that one slice may take, from 0 to 1 (default
    /// 0.1).
    #[serde(default)]
    pub max_share: Option<f64>,
    /// Below this many units a slice is not worth a store call (default 1).
    #[serde(default)]
    pub min_slice: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CredentialsDto {
    /// Hex SHA-256 of the operator token (`tollgate keygen --operator` prints both).
    #[serde(default)]
    pub operator_token_sha256: Option<String>,
    #[serde(default)]
    pub api_keys: Vec<ApiKeyDto>,
    /// Tokens Envoy presents on the ext_authz listener (`tollgate keygen --gateway`).
    #[serde(default)]
    pub gateway_tokens: Vec<GatewayTokenDto>,
    /// Mesh identities (SPIFFE ids) let in on the ext_authz listener as gateways, read from the
    /// `x-forwarded-client-cert` header the pod's Istio proxy sets after it verified the
    /// caller's mTLS certificate: for Istio's own ext_authz filter, which cannot send a token.
    #[serde(default)]
    pub mesh_peers: Vec<MeshPeerDto>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshPeerDto {
    /// The peer's SPIFFE id, such as
    /// `spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account`.
    pub spiffe_id: String,
    /// The customers this peer decides for; unset, every customer.
    #[serde(default)]
    pub customers: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayTokenDto {
    /// The token's public id: the part of the token before the `.`.
    pub id: String,
    /// Hex SHA-256 of the whole token.
    pub sha256: String,
    /// The customers this gateway decides for; unset, every customer.
    #[serde(default)]
    pub customers: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiKeyDto {
    /// The key's public id: the part of the key before the `.`.
    pub id: String,
    pub customer: String,
    /// Hex SHA-256 of the whole key.
    pub sha256: String,
    /// `app` (default: reads and decisions), `viewer` (reads only) or `admin` (also the
    /// customer's own limits within its ceilings, alert rules and webhooks).
    #[serde(default)]
    pub role: crate::auth::Role,
}

/// Where one request attribute comes from when the ext_authz request does not carry it in
/// `context_extensions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceDto {
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub constant: Option<String>,
    /// A claim (a name, or a JSON pointer such as `/org/id`) of the JWT payload Envoy's
    /// `jwt_authn` verified and stored (`payload_in_metadata`), sent to the sidecar with
    /// `metadata_context_namespaces: [envoy.filters.http.jwt_authn]`.
    #[serde(default)]
    pub jwt_claim: Option<String>,
    /// The `payload_in_metadata` key jwt_authn stored the payload under. Default `jwt_payload`.
    #[serde(default)]
    pub jwt_metadata: Option<String>,
    /// Used when the header is absent.
    #[serde(default)]
    pub default: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BadInputDto {
    #[default]
    Deny,
    Allow,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtAuthzDto {
    #[serde(default)]
    pub customer: Option<SourceDto>,
    #[serde(default)]
    pub feature: Option<SourceDto>,
    #[serde(default)]
    pub usage: Option<SourceDto>,
    /// Dimension name → source.
    #[serde(default)]
    pub dimensions: BTreeMap<String, SourceDto>,
    /// HTTP status of a denial. Default 429.
    #[serde(default)]
    pub deny_status: Option<u16>,
    /// What to do with a request whose input is missing or wrong. Default `deny`.
    #[serde(default)]
    pub on_bad_input: BadInputDto,
    /// HTTP status of a bad-input denial. Default 400.
    #[serde(default)]
    pub bad_input_status: Option<u16>,
    /// Add `x-tollgate-remaining` (and `x-tollgate-no-matching-limit`) to the request sent
    /// upstream. Default true.
    #[serde(default)]
    pub upstream_headers: Option<bool>,
    /// Also send the hold id upstream in `x-tollgate-hold-id`, for an application that settles
    /// its own holds. Default false: a hold id is a capability to close the hold, and the
    /// upstream (or whatever it logs to) has no use for it otherwise.
    #[serde(default)]
    pub upstream_hold_id: Option<bool>,
    /// Request headers Envoy removes before the upstream on every grant: the caller's
    /// credential where the proxy must forward it for this check to read (Istio's CUSTOM
    /// provider with `forwardOriginalToken`), so the model service never sees it. At most 16
    /// names; `host` and pseudo-headers are refused.
    #[serde(default)]
    pub remove_upstream_headers: Vec<String>,
    /// Verify the caller's own `authorization: Bearer <jwt>` here, for `jwtClaim` sources,
    /// when the proxy sends no verified payload in the request's metadata (Istio's CUSTOM
    /// provider cannot).
    #[serde(default)]
    pub bearer_jwt: Option<BearerJwtDto>,
    /// Settle the native path's holds from Envoy's access log (its gRPC access log service
    /// sends each finished request to this listener). Absent: holds wait for the route's
    /// `tollgate.commit`, the API, or their TTL.
    #[serde(default)]
    pub settlement: Option<SettlementDto>,
}

/// `server.extAuthz.settlement`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SettlementDto {
    /// The response header that carries the request's actual usage in whole units (Envoy
    /// must log it: `additional_response_headers_to_log`). Default `x-tollgate-actual-usage`.
    #[serde(default)]
    pub usage_header: Option<String>,
    /// A finished request that reports no usage: `held` charges what it held (the default),
    /// `release` charges nothing.
    #[serde(default)]
    pub on_missing: Option<ClosePolicyDto>,
    /// A request whose upstream failed (a 5xx, or no response at all) and reports no usage.
    /// Default `release`.
    #[serde(default)]
    pub on_upstream_error: Option<ClosePolicyDto>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ClosePolicyDto {
    Held,
    Release,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BearerJwtDto {
    /// The one issuer (`iss`) accepted.
    pub issuer: String,
    /// Accepted `aud` values; empty, a token that names an audience is refused.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The issuer's JWKS document, inline.
    #[serde(default)]
    pub jwks: Option<serde_json::Value>,
    /// Or a file holding it (relative to this config file), read at start and reload.
    #[serde(default)]
    pub jwks_file: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LogFormatDto {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoggingDto {
    #[serde(default)]
    pub format: LogFormatDto,
    /// A `tracing` filter such as `info` or `tollgate=debug,info`. Default `info`;
    /// `RUST_LOG` overrides it.
    #[serde(default)]
    pub level: Option<String>,
}

/// A listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs a socket path".into());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>().map(Self::Tcp).map_err(|_| {
            format!("`{s}` is not an address; expected `host:port` (an IP) or `unix:/path`")
        })
    }

    /// Whether only this machine can reach it.
    pub fn is_local(&self) -> bool {
        match self {
            Self::Tcp(a) => a.ip().is_loopback(),
            Self::Unix(_) => true,
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl ServerSettings {
    /// What is valid but unwise, for `tollgate validate` and the log at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(h) = &self.ext_authz.customer.header {
            out.push(format!(
                "server.extAuthz.customer: the customer comes from the client's own `{h}` header, so any client can charge any customer unless your proxy overwrites that header from a verified token on every checked request (Istio: `outputClaimToHeaders`, with the CUSTOM policy limited to requests with a `requestPrincipal`); otherwise take it from the route's context extension `tollgate.customer`, or from a verified JWT claim through the WASM filter"
            ));
        }
        if self.gateway_tokens.is_empty() && self.mesh_peers.is_empty() {
            out.push(
                "server.credentials.gatewayTokens: none configured; Envoy's calls to the ext_authz listener will be refused unless it presents an API key or the operator token (`tollgate keygen --gateway envoy` makes one)".to_string(),
            );
        }
        if !self.mesh_peers.is_empty() {
            out.push(
                "server.credentials.meshPeers: the ext_authz listener trusts the `x-forwarded-client-cert` header of each call; only the pod's own Istio proxy may reach that port (STRICT mTLS for the pod, no other container in it), or any neighbour can claim a mesh identity".to_string(),
            );
        }
        out
    }
}

/// Where the ext_authz service reads one attribute after `context_extensions`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Source {
    /// Lower-case header name (Envoy sends header names lower-cased).
    pub header: Option<String>,
    pub constant: Option<String>,
    /// A verified JWT claim: the claim, and jwt_authn's `payload_in_metadata` key.
    pub jwt_claim: Option<(String, String)>,
    pub default: Option<String>,
}

impl Source {
    fn header(name: &str) -> Self {
        Self {
            header: Some(name.to_string()),
            ..Self::default()
        }
    }
}

/// The ext_authz input mapping and answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtAuthzSettings {
    pub customer: Source,
    pub feature: Source,
    pub usage: Source,
    pub dimensions: Vec<(String, Source)>,
    pub deny_status: u16,
    pub allow_bad_input: bool,
    pub bad_input_status: u16,
    pub upstream_headers: bool,
    pub upstream_hold_id: bool,
    /// Lower-case names removed from the request before the upstream on every grant.
    pub remove_upstream: Vec<String>,
    /// Verifies the caller's bearer JWT for `jwtClaim` sources (see [`BearerJwtDto`]).
    pub bearer_jwt: Option<std::sync::Arc<crate::jwt::BearerJwt>>,
    /// Settling holds from Envoy's access log; `None`: its reports are not read.
    pub settlement: Option<Settlement>,
}

/// How a finished request reported in Envoy's access log closes its hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// Lower-case response header with the actual usage.
    pub usage_header: String,
    pub on_missing: ClosePolicy,
    pub on_upstream_error: ClosePolicy,
}

/// What closes a hold whose request reported no usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClosePolicy {
    /// Charge what was held.
    Held,
    /// Charge nothing.
    Release,
}

impl From<ClosePolicyDto> for ClosePolicy {
    fn from(d: ClosePolicyDto) -> Self {
        match d {
            ClosePolicyDto::Held => ClosePolicy::Held,
            ClosePolicyDto::Release => ClosePolicy::Release,
        }
    }
}

/// The default `server.extAuthz.settlement.usageHeader`.
pub const DEFAULT_USAGE_HEADER: &str = "x-tollgate-actual-usage";

impl Default for ExtAuthzSettings {
    /// The customer has no header by default: a header is whatever the client sends, and the
    /// customer decides who pays. It comes from the route's context extensions (or a verified
    /// JWT through the WASM filter) unless the config names a header on purpose.
    fn default() -> Self {
        Self {
            customer: Source::default(),
            feature: Source::header("x-tollgate-feature"),
            usage: Source::header("x-tollgate-usage"),
            dimensions: Vec::new(),
            deny_status: 429,
            allow_bad_input: false,
            bad_input_status: 400,
            upstream_headers: true,
            upstream_hold_id: false,
            remove_upstream: Vec::new(),
            bearer_jwt: None,
            settlement: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Connection bounds, validated; `None` maxima are worked out from the descriptor limit at
/// start (see `net::ConnectionBudget`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connections {
    pub max_ext_authz: Option<usize>,
    pub max_grpc: Option<usize>,
    pub max_http: Option<usize>,
    pub idle_timeout: std::time::Duration,
    pub auth_timeout: std::time::Duration,
    pub header_timeout: std::time::Duration,
    pub request_timeout: std::time::Duration,
}

/// Per-request bounds, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_dimensions: usize,
    pub max_dimension_bytes: usize,
    pub max_grpc_message_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_dimensions: 32,
            max_dimension_bytes: 8192,
            max_grpc_message_bytes: 1024 * 1024,
        }
    }
}

/// The validated `server:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    pub ext_authz_listen: ListenAddr,
    pub grpc_listen: ListenAddr,
    pub http_listen: ListenAddr,
    pub operator_sha256: Option<[u8; 32]>,
    pub api_keys: Vec<ApiKeySpec>,
    pub gateway_tokens: Vec<GatewayTokenSpec>,
    pub mesh_peers: Vec<MeshPeerSpec>,
    pub ext_authz: ExtAuthzSettings,
    pub log_format: LogFormat,
    pub log_level: String,
    pub max_body_bytes: usize,
    pub shutdown_grace_millis: i64,
    pub storage: Storage,
    /// Escrow leases in front of the store, when enabled.
    pub leases: Option<crate::core::lease::LeaseTerms>,
    pub connections: Connections,
    pub limits: RequestLimits,
}

/// Where counters live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Storage {
    Memory,
    Durable {
        path: std::path::PathBuf,
        durability: crate::store::Durability,
    },
    Redis(crate::store::RedisSettings),
}

/// The Redis settings of `kind: redis`, every problem pushed to `errors`.
fn redis_settings(dto: &StorageDto, errors: &mut Errors<'_>) -> crate::store::RedisSettings {
    use crate::store::RedisTarget;
    let given = [
        dto.url.is_some(),
        dto.url_env.is_some(),
        !dto.cluster.is_empty(),
    ];
    let target = match (&dto.url, &dto.url_env) {
        _ if given.iter().filter(|g| **g).count() > 1 => {
            errors.push(
                "server.storage.url",
                "give one of `url` (one node), `urlEnv` (one node, URL from the environment) or `cluster` (node URLs)",
            );
            RedisTarget::Node(String::new())
        }
        (Some(url), _) => RedisTarget::Node(url.clone()),
        (_, Some(var)) => {
            if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                errors.push(
                    "server.storage.urlEnv",
                    format!("`{var}` is not an environment variable name (letters, digits, `_`)"),
                );
            }
            RedisTarget::NodeFromEnv(var.clone())
        }
        _ if !dto.cluster.is_empty() => RedisTarget::Cluster(dto.cluster.clone()),
        _ => {
            errors.push(
                "server.storage.url",
                "`kind: redis` needs `url` (one node), `urlEnv` or `cluster` (node URLs)",
            );
            RedisTarget::Node(String::new())
        }
    };
    let urls = match &target {
        RedisTarget::Node(u) => std::slice::from_ref(u),
        RedisTarget::Cluster(us) => us.as_slice(),
        RedisTarget::NodeFromEnv(_) => &[],
    };
    for u in urls.iter().filter(|u| !u.is_empty()) {
        if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
            errors.push(
                "server.storage.url",
                format!("`{u}` is not a redis:// or rediss:// URL"),
            );
        }
    }
    let prefix = dto.prefix.clone().unwrap_or_else(|| "tollgate".into());
    if prefix.is_empty() || prefix.contains(['{', '}']) {
        errors.push(
            "server.storage.prefix",
            format!("`{prefix}` must be non-empty and have no `{{` or `}}` (they make hash tags)"),
        );
    }
    let timeout_ms = dto.timeout_ms.unwrap_or(100);
    if !(1..=60_000).contains(&timeout_ms) {
        errors.push(
            "server.storage.timeoutMs",
            format!("{timeout_ms} is not from 1 to 60000"),
        );
    }
    let breaker_failures = dto.breaker_failures.unwrap_or(5);
    if breaker_failures == 0 {
        errors.push("server.storage.breakerFailures", "must be at least 1");
    }
    let breaker_open_ms = dto.breaker_open_ms.unwrap_or(1_000);
    if !(1..=600_000).contains(&breaker_open_ms) {
        errors.push(
            "server.storage.breakerOpenMs",
            format!("{breaker_open_ms} is not from 1 to 600000"),
        );
    }
    let read_rows_per_second = dto.usage_read_rows_per_second.unwrap_or(1_000_000);
    if !(1_000..=100_000_000).contains(&read_rows_per_second) {
        errors.push(
            "server.storage.usageReadRowsPerSecond",
            format!("{read_rows_per_second} is not from 1000 to 100000000"),
        );
    }
    crate::store::RedisSettings {
        target,
        prefix,
        timeout: std::time::Duration::from_millis(timeout_ms),
        breaker_failures,
        breaker_open: std::time::Duration::from_millis(breaker_open_ms),
        read_rows_per_second: read_rows_per_second.max(1),
    }
}

struct Errors<'f> {
    file: &'f str,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.list.push(ConfigError {
            file: self.file.to_string(),
            path: path.into(),
            message: message.into(),
        });
    }
}

fn digest(hex_text: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut out)
        .map_err(|e| format!("not a hex SHA-256 digest (64 hex digits): {e}"))?;
    Ok(out)
}

fn source(dto: &SourceDto, path: &str, errors: &mut Errors<'_>) -> Source {
    let given = [
        dto.header.is_some(),
        dto.constant.is_some(),
        dto.jwt_claim.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    match given {
        0 => errors.push(path, "give a `header`, a `constant` or a `jwtClaim`"),
        1 => {}
        _ => errors.push(path, "give one of `header`, `constant` and `jwtClaim`"),
    }
    if dto.jwt_metadata.is_some() && dto.jwt_claim.is_none() {
        errors.push(
            format!("{path}.jwtMetadata"),
            "only a `jwtClaim` source reads jwt_authn's metadata",
        );
    }
    if dto.jwt_claim.as_deref() == Some("") {
        errors.push(format!("{path}.jwtClaim"), "is empty");
    }
    if let Some(h) = &dto.header
        && (h.is_empty()
            || !h
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        errors.push(
            format!("{path}.header"),
            format!("`{h}` is not a header name"),
        );
    }
    Source {
        header: dto.header.as_ref().map(|h| h.to_ascii_lowercase()),
        constant: dto.constant.clone(),
        jwt_claim: dto.jwt_claim.clone().map(|c| {
            (
                c,
                dto.jwt_metadata
                    .clone()
                    .unwrap_or_else(|| "jwt_payload".to_string()),
            )
        }),
        default: dto.default.clone(),
    }
}

fn status(code: Option<u16>, default: u16, path: &str, errors: &mut Errors<'_>) -> u16 {
    let code = code.unwrap_or(default);
    if !(400..=599).contains(&code) {
        errors.push(
            path,
            format!("{code} is not an error status; use 400 to 599"),
        );
    }
    code
}

fn key_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl ServerSettings {
    /// Validates the section; every error names `file` and its path under `server`.
    /// `customers` are the customers the file declares: a credential may only name those.
    pub fn from_dto(
        dto: &ServerDto,
        file: &str,
        customers: &std::collections::HashSet<&str>,
    ) -> Result<Self, ConfigErrors> {
        let mut errors = Errors {
            file,
            list: Vec::new(),
        };
        let (ext_authz_listen, grpc_listen, http_listen) = listeners(dto, &mut errors);
        let CredentialSpecs {
            operator_sha256,
            api_keys,
            gateway_tokens,
            mesh_peers,
        } = credentials(&dto.credentials, customers, &mut errors);
        let ext_authz = ext_authz(&dto.ext_authz, file, &mut errors);
        let shutdown_grace_millis = shutdown_grace(dto, &mut errors);
        let storage = storage(&dto.storage, file, &mut errors);
        let leases = dto
            .storage
            .leases
            .as_ref()
            .and_then(|l| leases(l, &mut errors));
        let connections = connections(&dto.connections, &mut errors);
        let limits = request_limits(&dto.limits, &mut errors);
        let max_body_bytes = dto.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            errors.push("server.maxBodyBytes", "must be at least 1");
        }
        let (log_format, log_level) = logging(dto, &mut errors);
        if !errors.list.is_empty() {
            return Err(ConfigErrors(errors.list));
        }
        Ok(Self {
            ext_authz_listen,
            grpc_listen,
            http_listen,
            operator_sha256,
            api_keys,
            gateway_tokens,
            mesh_peers,
            ext_authz,
            log_format,
            log_level,
            max_body_bytes,
            shutdown_grace_millis,
            storage,
            leases,
            connections,
            limits,
        })
    }
}

/// `server.listeners`: the ext_authz, gRPC and HTTP addresses.
fn listeners(dto: &ServerDto, errors: &mut Errors<'_>) -> (ListenAddr, ListenAddr, ListenAddr) {
    let mut listen = |value: &Option<String>, default: &str, name: &str| {
        ListenAddr::parse(value.as_deref().unwrap_or(default)).unwrap_or_else(|m| {
            errors.push(format!("server.listeners.{name}"), m);
            ListenAddr::Unix(PathBuf::new())
        })
    };
    let ext_authz_listen = listen(
        &dto.listeners.ext_authz,
        DEFAULT_EXT_AUTHZ_LISTEN,
        "extAuthz",
    );
    let grpc_listen = listen(&dto.listeners.grpc, DEFAULT_GRPC_LISTEN, "grpc");
    let http_listen = listen(&dto.listeners.http, DEFAULT_HTTP_LISTEN, "http");

    (ext_authz_listen, grpc_listen, http_listen)
}

/// The operator token's digest, the API keys, the gateway tokens and the mesh peers.
struct CredentialSpecs {
    operator_sha256: Option<[u8; 32]>,
    api_keys: Vec<ApiKeySpec>,
    gateway_tokens: Vec<GatewayTokenSpec>,
    mesh_peers: Vec<MeshPeerSpec>,
}

/// Checks a customer list of a credential at `path`: every name is the file's, and the list,
/// when given, is not empty.
fn credential_customers(
    list: Option<&Vec<String>>,
    path: &str,
    customers: &std::collections::HashSet<&str>,
    errors: &mut Errors<'_>,
) {
    for (j, c) in list.into_iter().flatten().enumerate() {
        if !customers.contains(c.as_str()) {
            errors.push(
                format!("{path}.customers[{j}]"),
                format!("unknown customer `{c}`"),
            );
        }
    }
    if list.is_some_and(Vec::is_empty) {
        errors.push(
            format!("{path}.customers"),
            "an empty list reaches no customer; leave it out for every customer",
        );
    }
}

/// Whether `id` is a SPIFFE id as Envoy writes it into `x-forwarded-client-cert`: `spiffe://`,
/// a trust domain, a path, and none of the characters that header uses as separators.
fn spiffe_id_ok(id: &str) -> bool {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(domain, path)| {
            !domain.is_empty()
                && !path.is_empty()
                && id.bytes().all(|b| {
                    b.is_ascii_graphic() && !matches!(b, b',' | b';' | b'"' | b'=' | b'\\')
                })
        })
}

/// `server.credentials`: the operator token, API keys and gateway tokens (ids unique across
/// both; every customer named is one of the file's).
fn credentials(
    dto: &CredentialsDto,
    customers: &std::collections::HashSet<&str>,
    errors: &mut Errors<'_>,
) -> CredentialSpecs {
    let operator_sha256 = dto.operator_token_sha256.as_deref().and_then(|h| {
        digest(h)
            .map_err(|m| errors.push("server.credentials.operatorTokenSha256", m))
            .ok()
    });
    let mut api_keys = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, k) in dto.api_keys.iter().enumerate() {
        let path = format!("server.credentials.apiKeys[{i}]");
        if !key_id_ok(&k.id) {
            errors.push(
                format!("{path}.id"),
                format!(
                    "`{}` is not a key id; use letters, digits, `-` and `_`",
                    k.id
                ),
            );
        }
        if !seen.insert(k.id.clone()) {
            errors.push(format!("{path}.id"), format!("duplicate key id `{}`", k.id));
        }
        // A key for a customer the file does not declare would reach whichever customer
        // is later created with that id.
        if !customers.contains(k.customer.as_str()) {
            errors.push(
                format!("{path}.customer"),
                format!(
                    "unknown customer `{}`; an API key must name a customer of this file",
                    k.customer
                ),
            );
        }
        match digest(&k.sha256) {
            Ok(sha256) => api_keys.push(ApiKeySpec {
                id: k.id.clone(),
                customer: k.customer.clone(),
                sha256,
                role: k.role,
            }),
            Err(m) => errors.push(format!("{path}.sha256"), m),
        }
    }
    let mut gateway_tokens = Vec::new();
    for (i, g) in dto.gateway_tokens.iter().enumerate() {
        let path = format!("server.credentials.gatewayTokens[{i}]");
        if !key_id_ok(&g.id) {
            errors.push(
                format!("{path}.id"),
                format!(
                    "`{}` is not a token id; use letters, digits, `-` and `_`",
                    g.id
                ),
            );
        }
        if !seen.insert(g.id.clone()) {
            errors.push(
                format!("{path}.id"),
                format!(
                    "duplicate key id `{}` (API keys and gateway tokens share ids)",
                    g.id
                ),
            );
        }
        credential_customers(g.customers.as_ref(), &path, customers, errors);
        match digest(&g.sha256) {
            Ok(sha256) => gateway_tokens.push(GatewayTokenSpec {
                id: g.id.clone(),
                sha256,
                customers: g.customers.clone(),
            }),
            Err(m) => errors.push(format!("{path}.sha256"), m),
        }
    }

    let mut mesh_peers = Vec::new();
    let mut peers_seen = std::collections::HashSet::new();
    for (i, p) in dto.mesh_peers.iter().enumerate() {
        let path = format!("server.credentials.meshPeers[{i}]");
        if !spiffe_id_ok(&p.spiffe_id) {
            errors.push(
                format!("{path}.spiffeId"),
                format!(
                    "`{}` is not a SPIFFE id such as `spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account`",
                    p.spiffe_id
                ),
            );
        }
        if !peers_seen.insert(p.spiffe_id.as_str()) {
            errors.push(
                format!("{path}.spiffeId"),
                format!("duplicate mesh peer `{}`", p.spiffe_id),
            );
        }
        credential_customers(p.customers.as_ref(), &path, customers, errors);
        mesh_peers.push(MeshPeerSpec {
            spiffe_id: p.spiffe_id.clone(),
            customers: p.customers.clone(),
        });
    }
    CredentialSpecs {
        operator_sha256,
        api_keys,
        gateway_tokens,
        mesh_peers,
    }
}

/// `server.extAuthz`: where each input is read from, and the answers' statuses.
/// `server.extAuthz.bearerJwt`: the issuer and its keys, inline or from a file next to the
/// config.
fn bearer_jwt(
    dto: &BearerJwtDto,
    file: &str,
    errors: &mut Errors<'_>,
) -> Option<std::sync::Arc<crate::jwt::BearerJwt>> {
    let path = "server.extAuthz.bearerJwt";
    if dto.issuer.trim().is_empty() {
        errors.push(format!("{path}.issuer"), "is empty");
        return None;
    }
    let (text, at) = match (&dto.jwks, &dto.jwks_file) {
        (Some(v), None) => (v.to_string(), format!("{path}.jwks")),
        (None, Some(f)) => {
            let full = std::path::Path::new(file)
                .parent()
                .map_or_else(|| std::path::PathBuf::from(f), |dir| dir.join(f));
            match std::fs::read_to_string(&full) {
                Ok(t) => (t, format!("{path}.jwksFile")),
                Err(e) => {
                    errors.push(
                        format!("{path}.jwksFile"),
                        format!("cannot read `{}`: {e}", full.display()),
                    );
                    return None;
                }
            }
        }
        _ => {
            errors.push(path, "give one of `jwks` and `jwksFile`");
            return None;
        }
    };
    crate::jwt::BearerJwt::new(&dto.issuer, &dto.audiences, &text)
        .map_err(|m| errors.push(at, m))
        .ok()
}

fn ext_authz(e: &ExtAuthzDto, file: &str, errors: &mut Errors<'_>) -> ExtAuthzSettings {
    let defaults = ExtAuthzSettings::default();
    let pick = |d: &Option<SourceDto>, fallback: Source, name: &str, errors: &mut Errors<'_>| {
        d.as_ref().map_or(fallback, |d| {
            source(d, &format!("server.extAuthz.{name}"), errors)
        })
    };
    let customer = pick(&e.customer, defaults.customer, "customer", errors);
    let feature = pick(&e.feature, defaults.feature, "feature", errors);
    let usage = pick(&e.usage, defaults.usage, "usage", errors);
    if let Some(c) = &usage.constant
        && c.parse::<u64>().is_err()
    {
        errors.push(
            "server.extAuthz.usage.constant",
            format!("`{c}` is not a whole number of units"),
        );
    }
    let dimensions = e
        .dimensions
        .iter()
        .map(|(name, d)| {
            let s = source(d, &format!("server.extAuthz.dimensions.{name}"), errors);
            (name.clone(), s)
        })
        .collect();
    let deny_status = status(e.deny_status, 429, "server.extAuthz.denyStatus", errors);
    let bad_input_status = status(
        e.bad_input_status,
        400,
        "server.extAuthz.badInputStatus",
        errors,
    );

    ExtAuthzSettings {
        customer,
        feature,
        usage,
        dimensions,
        deny_status,
        allow_bad_input: e.on_bad_input == BadInputDto::Allow,
        bad_input_status,
        upstream_headers: e.upstream_headers.unwrap_or(true),
        upstream_hold_id: e.upstream_hold_id.unwrap_or(false),
        remove_upstream: remove_upstream(&e.remove_upstream_headers, errors),
        bearer_jwt: e
            .bearer_jwt
            .as_ref()
            .and_then(|b| bearer_jwt(b, file, errors)),
        settlement: e.settlement.as_ref().map(|s| settlement(s, errors)),
    }
}

/// The most names `server.extAuthz.removeUpstreamHeaders` may list: each one is a string on
/// every grant's answer.
const MAX_REMOVED_HEADERS: usize = 16;

/// `server.extAuthz.removeUpstreamHeaders`: header names Envoy may remove (not `host` or a
/// pseudo-header, which Envoy refuses to mutate), lower-cased, each once.
fn remove_upstream(names: &[String], errors: &mut Errors<'_>) -> Vec<String> {
    const PATH: &str = "server.extAuthz.removeUpstreamHeaders";
    if names.len() > MAX_REMOVED_HEADERS {
        errors.push(
            PATH,
            format!("{} names, at most {MAX_REMOVED_HEADERS}", names.len()),
        );
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let lower = name.to_ascii_lowercase();
        if lower == "host" || lower.starts_with(':') {
            errors.push(
                format!("{PATH}[{i}]"),
                format!("`{name}`: Envoy does not remove `host` or pseudo-headers"),
            );
        } else if axum::http::HeaderName::from_bytes(lower.as_bytes()).is_err() {
            errors.push(
                format!("{PATH}[{i}]"),
                format!("`{name}` is not a header name"),
            );
        } else if !out.contains(&lower) {
            out.push(lower);
        }
    }
    out
}

/// `server.extAuthz.settlement`: the header name must be one Envoy can log.
fn settlement(dto: &SettlementDto, errors: &mut Errors<'_>) -> Settlement {
    let usage_header = dto
        .usage_header
        .as_deref()
        .unwrap_or(DEFAULT_USAGE_HEADER)
        .to_ascii_lowercase();
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if usage_header.is_empty() || !usage_header.chars().all(token) {
        errors.push(
            "server.extAuthz.settlement.usageHeader",
            format!("`{usage_header}` is not an HTTP header name"),
        );
    }
    Settlement {
        usage_header,
        on_missing: dto.on_missing.map_or(ClosePolicy::Held, Into::into),
        on_upstream_error: dto
            .on_upstream_error
            .map_or(ClosePolicy::Release, Into::into),
    }
}

/// `server.shutdownGrace`, in milliseconds.
fn shutdown_grace(dto: &ServerDto, errors: &mut Errors<'_>) -> i64 {
    let grace = dto
        .shutdown_grace
        .as_deref()
        .unwrap_or(DEFAULT_SHUTDOWN_GRACE);
    parse_fixed_millis(grace).unwrap_or_else(|m| {
        errors.push("server.shutdownGrace", m.to_string());
        0
    })
}

/// `server.storage`: where counters live. A durable store's path is relative to the config
/// file.
fn storage(dto: &StorageDto, file: &str, errors: &mut Errors<'_>) -> Storage {
    match dto.kind {
        StorageKindDto::Memory => Storage::Memory,
        StorageKindDto::Durable => {
            let path = dto
                .path
                .clone()
                .unwrap_or_else(|| DEFAULT_STORE_FILE.to_string());
            if path.trim().is_empty() {
                errors.push(
                    "server.storage.path",
                    "a durable store needs the path of its file",
                );
            }
            // Relative to the config file, so the store stays with the config that made it
            // whatever folder the process starts in.
            let path = std::path::Path::new(file)
                .parent()
                .map_or_else(|| std::path::PathBuf::from(&path), |dir| dir.join(&path));
            let durability = match dto.durability {
                DurabilityDto::Sync => crate::store::Durability::Sync,
                DurabilityDto::Batched => {
                    let millis = dto.commit_interval_ms.unwrap_or(100);
                    if !(1..=10_000).contains(&millis) {
                        errors.push(
                            "server.storage.commitIntervalMs",
                            format!("{millis} is not from 1 to 10000"),
                        );
                    }
                    crate::store::Durability::Batched {
                        interval: std::time::Duration::from_millis(millis),
                    }
                }
            };
            Storage::Durable { path, durability }
        }
        StorageKindDto::Redis => Storage::Redis(redis_settings(dto, errors)),
    }
}

/// `server.storage.leases`: the lease terms when enabled.
fn leases(dto: &LeasesDto, errors: &mut Errors<'_>) -> Option<crate::core::lease::LeaseTerms> {
    let mut millis = |v: &Option<String>, default: &str, name: &str| {
        parse_fixed_millis(v.as_deref().unwrap_or(default)).unwrap_or_else(|m| {
            errors.push(format!("server.storage.leases.{name}"), m.to_string());
            0
        })
    };
    let ttl_ms = millis(&dto.ttl, "PT30S", "ttl");
    let skew_ms = millis(&dto.skew, "PT2S", "skew");
    if ttl_ms <= skew_ms {
        errors.push(
            "server.storage.leases.ttl",
            format!("{ttl_ms} ms must be longer than the skew margin ({skew_ms} ms)"),
        );
    }
    let share = dto.max_share.unwrap_or(0.1);
    if !(share > 0.0 && share <= 1.0) {
        errors.push(
            "server.storage.leases.maxShare",
            format!("{share} is not a fraction above 0 and at most 1"),
        );
    }
    // Whole thousandths: a share finer than that buys nothing.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let max_share_permille = (share.clamp(0.001, 1.0) * 1000.0).round() as u32;
    dto.enabled.then_some(crate::core::lease::LeaseTerms {
        ttl_ms,
        skew_ms,
        max_share_permille,
        min_slice: dto.min_slice.unwrap_or(1),
    })
}

/// `server.connections`: per-listener caps and timeouts.
fn connections(c: &ConnectionsDto, errors: &mut Errors<'_>) -> Connections {
    let mut duration = |v: &Option<String>, default: &str, name: &str| {
        let text = v.as_deref().unwrap_or(default);
        match parse_fixed_millis(text) {
            Ok(ms) if ms > 0 => std::time::Duration::from_millis(ms.unsigned_abs()),
            Ok(_) => {
                errors.push(format!("server.connections.{name}"), "must be above zero");
                std::time::Duration::ZERO
            }
            Err(m) => {
                errors.push(format!("server.connections.{name}"), m.to_string());
                std::time::Duration::ZERO
            }
        }
    };
    let idle_timeout = duration(&c.idle_timeout, "PT5M", "idleTimeout");
    let auth_timeout = duration(&c.auth_timeout, "PT10S", "authTimeout");
    let header_timeout = duration(&c.header_timeout, "PT10S", "headerTimeout");
    let request_timeout = duration(&c.request_timeout, "PT30S", "requestTimeout");
    for (v, name) in [
        (c.max_ext_authz, "maxExtAuthz"),
        (c.max_grpc, "maxGrpc"),
        (c.max_http, "maxHttp"),
    ] {
        if v == Some(0) {
            errors.push(format!("server.connections.{name}"), "must be at least 1");
        }
    }
    Connections {
        max_ext_authz: c.max_ext_authz,
        max_grpc: c.max_grpc,
        max_http: c.max_http,
        idle_timeout,
        auth_timeout,
        header_timeout,
        request_timeout,
    }
}

/// `server.limits`: bounds on what one request may carry.
fn request_limits(dto: &RequestLimitsDto, errors: &mut Errors<'_>) -> RequestLimits {
    let d = RequestLimits::default();
    let limits = RequestLimits {
        max_dimensions: dto.max_dimensions.unwrap_or(d.max_dimensions),
        max_dimension_bytes: dto.max_dimension_bytes.unwrap_or(d.max_dimension_bytes),
        max_grpc_message_bytes: dto
            .max_grpc_message_bytes
            .unwrap_or(d.max_grpc_message_bytes),
    };
    if !(1..=1024).contains(&limits.max_dimensions) {
        errors.push("server.limits.maxDimensions", "must be from 1 to 1024");
    }
    if !(64..=1024 * 1024).contains(&limits.max_dimension_bytes) {
        errors.push(
            "server.limits.maxDimensionBytes",
            "must be from 64 to 1048576",
        );
    }
    if !(4096..=64 * 1024 * 1024).contains(&limits.max_grpc_message_bytes) {
        errors.push(
            "server.limits.maxGrpcMessageBytes",
            "must be from 4096 to 67108864",
        );
    }
    limits
}

/// `server.logging`: the format and the level filter.
fn logging(dto: &ServerDto, errors: &mut Errors<'_>) -> (LogFormat, String) {
    let log_level = dto.logging.level.clone().unwrap_or_else(|| "info".into());
    if let Err(m) = log_level.parse::<tracing_subscriber::EnvFilter>() {
        errors.push("server.logging.level", format!("`{log_level}`: {m}"));
    }
    let format = match dto.logging.format {
        LogFormatDto::Pretty => LogFormat::Pretty,
        LogFormatDto::Json => LogFormat::Json,
    };
    (format, log_level)
}
