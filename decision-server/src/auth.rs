//! Credentials: the operator token, per-customer API keys and gateway tokens (what Envoy
//! presents on the ext_authz listener), stored as SHA-256 digests and compared in constant
//! time; and mesh peers, Istio workloads whose verified identity the pod's proxy forwards.
//!
//! Trade-off: keys and tokens are 256-bit random secrets, not passwords, so a fast hash is
//! enough: nobody can search a 2^256 space, and a slow KDF (argon2) would cost every API call
//! tens of milliseconds.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// One configured API key: its customer and the SHA-256 of the whole key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeySpec {
    pub id: String,
    pub customer: String,
    pub sha256: [u8; 32],
    pub role: Role,
}

/// One configured gateway token: the SHA-256 of the whole token, and the customers it reaches
/// (`None`: all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayTokenSpec {
    pub id: String,
    pub sha256: [u8; 32],
    pub customers: Option<Vec<String>>,
}

/// One configured mesh peer: the SPIFFE id its verified certificate carries, and the customers
/// it reaches (`None`: all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshPeerSpec {
    pub spiffe_id: String,
    pub customers: Option<Vec<String>>,
}

/// What a customer's API key may do for its customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// Reads and decisions (an application's key): what every key could do before roles.
    #[default]
    App,
    /// Reads only (dashboards, the portal's read-only users).
    Viewer,
    /// Reads, decisions, and the customer's own limits (within the operator's ceilings),
    /// alert rules and webhooks.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::App => "app",
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The operator token: every customer, the admin API.
    Operator,
    /// A customer's API key: that customer's data only, as far as its role goes.
    Customer(String, Role),
    /// A gateway token: the Envoy in front of the sidecar, which decides and closes holds for
    /// the customers it serves (all of them, or the listed ones) on the ext_authz listener,
    /// and nothing else.
    Gateway(Option<Arc<[String]>>),
}

impl Principal {
    /// Whether this caller may read or act for `customer`.
    pub fn may_access(&self, customer: &str) -> bool {
        match self {
            Principal::Operator => true,
            Principal::Customer(c, _) => c == customer,
            Principal::Gateway(None) => true,
            Principal::Gateway(Some(list)) => list.iter().any(|c| c == customer),
        }
    }

    pub fn is_operator(&self) -> bool {
        matches!(self, Principal::Operator)
    }

    /// Whether this caller may place or close holds and report usage for `customer`: a
    /// viewer key only reads.
    pub fn may_decide(&self, customer: &str) -> bool {
        self.may_access(customer) && !matches!(self, Principal::Customer(_, Role::Viewer))
    }

    /// Whether this caller may change `customer`'s limits, alert rules and webhooks: the
    /// operator, or the customer's admin key (within the operator's ceilings).
    pub fn may_manage(&self, customer: &str) -> bool {
        match self {
            Principal::Operator => true,
            Principal::Customer(c, Role::Admin) => c == customer,
            _ => false,
        }
    }

    /// Who this is, for the audit log: `operator`, `<customer>:<role>` or `gateway`.
    pub fn describe(&self) -> String {
        match self {
            Principal::Operator => "operator".to_string(),
            Principal::Customer(c, role) => format!("{c}:{}", role.as_str()),
            Principal::Gateway(_) => "gateway".to_string(),
        }
    }
}

/// Which listener a credential is presented on: gateway tokens are good on the ext_authz
/// listener only, so a token lifted from an Envoy config reaches no API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    ExtAuthz,
    Api,
}

/// Why a caller was not identified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials: send `authorization: Bearer <operator token or API key>`")]
    Missing,
    #[error("the `authorization` header is not `Bearer <token>`")]
    Malformed,
    #[error("invalid credentials: the token is not the operator token or a known API key")]
    Invalid,
    #[error(
        "a gateway token is accepted on the ext_authz listener only; use an API key or the operator token here"
    )]
    GatewayOnly,
    #[error(
        "the mesh peer `{0}` (from `x-forwarded-client-cert`) is not one of server.credentials.meshPeers"
    )]
    UnknownPeer(String),
}

impl AuthError {
    /// What to tell a caller on `listener`. On the ext_authz listener the caller is Envoy (the
    /// WASM filter's `sidecar.token`, or the `authorization` header of the ext_authz filter's
    /// gRPC service), whose credential is a gateway token: the message names that, not the API
    /// keys and operator token of the API listeners.
    pub fn message_on(&self, listener: Listener) -> String {
        match (self, listener) {
            (Self::Missing, Listener::ExtAuthz) => "missing gateway token: Envoy must send `authorization: Bearer <gateway token>` (the WASM filter's `sidecar.token`, or the ext_authz gRPC service's `initial_metadata`)".into(),
            (Self::Invalid, Listener::ExtAuthz) => "invalid gateway token: the token Envoy sent is none of `server.credentials.gatewayTokens` (check the WASM filter's `sidecar.token`, or the ext_authz gRPC service's `initial_metadata`)".into(),
            _ => self.to_string(),
        }
    }
}

/// The configured credentials.
#[derive(Debug, Default, Clone)]
pub struct Credentials {
    operator: Option<[u8; 32]>,
    /// Key id (the part before the `.`) → who the key is and the digest of the whole key.
    /// API keys and gateway tokens share one id space (validation refuses a duplicate id).
    keys: HashMap<String, (Principal, [u8; 32])>,
    /// SPIFFE id → the gateway principal it stands for.
    mesh_peers: HashMap<String, Principal>,
}

/// SHA-256 of `secret`, as stored in the config.
pub fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Credentials {
    pub fn new(
        operator: Option<[u8; 32]>,
        keys: &[ApiKeySpec],
        gateways: &[GatewayTokenSpec],
    ) -> Self {
        let api = keys.iter().map(|k| {
            (
                k.id.clone(),
                (Principal::Customer(k.customer.clone(), k.role), k.sha256),
            )
        });
        let gateway = gateways.iter().map(|g| {
            let scope = g.customers.as_ref().map(|c| Arc::from(c.as_slice()));
            (g.id.clone(), (Principal::Gateway(scope), g.sha256))
        });
        Self {
            operator,
            keys: api.chain(gateway).collect(),
            mesh_peers: HashMap::new(),
        }
    }

    /// The same credentials, also letting in `peers` on the ext_authz listener.
    pub fn with_mesh_peers(mut self, peers: &[MeshPeerSpec]) -> Self {
        self.mesh_peers = peers
            .iter()
            .map(|p| {
                let scope = p.customers.as_ref().map(|c| Arc::from(c.as_slice()));
                (p.spiffe_id.clone(), Principal::Gateway(scope))
            })
            .collect();
        self
    }

    /// Identifies the caller of a call on `listener` from its `authorization` header or, on
    /// the ext_authz listener with mesh peers configured and no `authorization`, from the
    /// `x-forwarded-client-cert` header the pod's Istio proxy set.
    ///
    /// Trade-off: the header is only as good as the path to the port. Istio's inbound proxy
    /// appends the element of the certificate it verified last (`APPEND_FORWARD`), so the
    /// last element is the proxy's word and earlier ones are the caller's; only the last is
    /// read. Anything that reaches the port without that proxy could write the header itself,
    /// which is why mesh peers are opt-in and `tollgate validate` warns about them.
    pub fn authenticate_request(
        &self,
        authorization: Option<&str>,
        client_cert: Option<&str>,
        listener: Listener,
    ) -> Result<Principal, AuthError> {
        match (authorization, client_cert) {
            (None, Some(xfcc)) if listener == Listener::ExtAuthz && !self.mesh_peers.is_empty() => {
                let uris = xfcc_last_uris(xfcc);
                uris.iter()
                    .find_map(|u| self.mesh_peers.get(*u))
                    .cloned()
                    .ok_or_else(|| {
                        AuthError::UnknownPeer(
                            uris.first()
                                .map_or("(no URI)", |u| u)
                                .chars()
                                .take(200)
                                .collect(),
                        )
                    })
            }
            _ => self.authenticate_header(authorization, listener),
        }
    }

    /// Whether any gateway token is configured (without one, Envoy cannot be let in).
    pub fn has_gateway_tokens(&self) -> bool {
        self.keys
            .values()
            .any(|(p, _)| matches!(p, Principal::Gateway(_)))
    }

    /// Identifies the caller from an `authorization` header value presented on `listener`.
    pub fn authenticate_header(
        &self,
        header: Option<&str>,
        listener: Listener,
    ) -> Result<Principal, AuthError> {
        let token = bearer_token(header)?;
        match self.authenticate(token)? {
            Principal::Gateway(_) if listener == Listener::Api => Err(AuthError::GatewayOnly),
            p => Ok(p),
        }
    }

    /// Identifies the caller from a bearer token. An API key or gateway token is
    /// `<keyId>.<secret>`; the key id only selects which digest to compare against, the
    /// comparison is over the whole key.
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let presented = sha256(token);
        if let Some((id, _)) = token.split_once('.')
            && let Some((principal, stored)) = self.keys.get(id)
            && bool::from(presented.ct_eq(stored))
        {
            return Ok(principal.clone());
        }
        match &self.operator {
            Some(op) if bool::from(presented.ct_eq(op)) => Ok(Principal::Operator),
            _ => Err(AuthError::Invalid),
        }
    }
}

/// Splits `text` at `sep` where it is outside a double-quoted value (XFCC quotes `Subject`,
/// which holds commas and semicolons, and escapes `"` inside quotes with `\`).
fn split_unquoted(text: &str, sep: u8) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut quoted, mut escaped, mut start) = (false, false, 0);
    for (i, b) in text.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            _ if b == sep && !quoted => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// The `URI` values of the last element of an `x-forwarded-client-cert` header: the
/// certificate the nearest proxy verified (a certificate may carry several URI SANs).
pub fn xfcc_last_uris(xfcc: &str) -> Vec<&str> {
    let Some(last) = split_unquoted(xfcc, b',').pop() else {
        return Vec::new();
    };
    split_unquoted(last, b';')
        .into_iter()
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("uri"))
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|v| !v.is_empty())
        .collect()
}

/// The token of an `authorization: Bearer <token>` header.
pub fn bearer_token(header: Option<&str>) -> Result<&str, AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Malformed)
}

/// Whether `token` is the key whose hex digest is `sha256_hex` (constant time over the digest).
pub fn key_matches(token: &str, sha256_hex: &str) -> bool {
    let mut stored = [0u8; 32];
    hex::decode_to_slice(sha256_hex, &mut stored).is_ok()
        && bool::from(sha256(token).ct_eq(&stored))
}

/// A new random secret: 32 bytes, hex.
pub fn random_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials::new(
            Some(sha256("op-secret")),
            &[ApiKeySpec {
                id: "acme-app".into(),
                customer: "acme".into(),
                sha256: sha256("acme-app.s3cret"),
                role: Role::App,
            }],
            &[
                GatewayTokenSpec {
                    id: "envoy".into(),
                    sha256: sha256("envoy.gw"),
                    customers: None,
                },
                GatewayTokenSpec {
                    id: "edge-eu".into(),
                    sha256: sha256("edge-eu.gw"),
                    customers: Some(vec!["acme".into()]),
                },
            ],
        )
    }

    #[test]
    fn gateway_tokens_work_on_the_ext_authz_listener_only() {
        let c = creds();
        assert!(c.has_gateway_tokens());
        let all = c
            .authenticate_header(Some("Bearer envoy.gw"), Listener::ExtAuthz)
            .unwrap();
        assert!(all.may_access("acme") && all.may_access("globex"));
        assert!(!all.is_operator());
        assert_eq!(
            c.authenticate_header(Some("Bearer envoy.gw"), Listener::Api),
            Err(AuthError::GatewayOnly)
        );
        let eu = c
            .authenticate_header(Some("Bearer edge-eu.gw"), Listener::ExtAuthz)
            .unwrap();
        assert!(eu.may_access("acme") && !eu.may_access("globex"));
        assert_eq!(c.authenticate("envoy.wrong"), Err(AuthError::Invalid));
        assert!(!Credentials::new(None, &[], &[]).has_gateway_tokens());
    }

    #[test]
    fn operator_and_customer_keys_are_told_apart() {
        let c = creds();
        assert_eq!(c.authenticate("op-secret"), Ok(Principal::Operator));
        assert_eq!(
            c.authenticate("acme-app.s3cret"),
            Ok(Principal::Customer("acme".into(), Role::App))
        );
        assert_eq!(c.authenticate("acme-app.wrong"), Err(AuthError::Invalid));
        assert_eq!(c.authenticate("other.s3cret"), Err(AuthError::Invalid));
        assert_eq!(
            c.authenticate_header(Some("Bearer op-secret"), Listener::Api),
            Ok(Principal::Operator)
        );
        assert_eq!(
            c.authenticate_header(None, Listener::Api),
            Err(AuthError::Missing)
        );
        assert_eq!(
            c.authenticate_header(Some("Basic abc"), Listener::ExtAuthz),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            c.authenticate_header(Some("Bearer "), Listener::Api),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn without_an_operator_token_nothing_is_operator() {
        let c = Credentials::new(None, &[], &[]);
        assert_eq!(c.authenticate(""), Err(AuthError::Invalid));
        assert_eq!(c.authenticate("anything"), Err(AuthError::Invalid));
    }

    const GATEWAY_ID: &str = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway";

    fn meshed() -> Credentials {
        creds().with_mesh_peers(&[
            MeshPeerSpec {
                spiffe_id: GATEWAY_ID.into(),
                customers: None,
            },
            MeshPeerSpec {
                spiffe_id: "spiffe://cluster.local/ns/eu/sa/edge".into(),
                customers: Some(vec!["acme".into()]),
            },
        ])
    }

    #[test]
    fn xfcc_is_read_from_its_last_element_only() {
        let own = format!(
            "By=spiffe://cluster.local/ns/tollgate/sa/tollgate;Hash=ab12;Subject=\"\";URI={GATEWAY_ID}"
        );
        assert_eq!(xfcc_last_uris(&own), vec![GATEWAY_ID]);
        // A caller's own element comes first; the proxy's verified one is appended last.
        let forged =
            format!("By=x;URI={GATEWAY_ID},By=y;Hash=cd;URI=spiffe://cluster.local/ns/apps/sa/app");
        assert_eq!(
            xfcc_last_uris(&forged),
            vec!["spiffe://cluster.local/ns/apps/sa/app"]
        );
        // Quoted subjects hold commas, semicolons and escaped quotes.
        let quoted = format!(
            "By=a;Subject=\"CN=x,O=\\\"evil;URI={GATEWAY_ID}\\\",C=US\";URI=spiffe://td/ns/a/sa/b;URI=spiffe://td/ns/a/sa/c"
        );
        assert_eq!(
            xfcc_last_uris(&quoted),
            vec!["spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/c"]
        );
        assert!(xfcc_last_uris("By=a;Hash=b;DNS=x.example").is_empty());
        assert!(xfcc_last_uris("").is_empty());
    }

    #[test]
    fn mesh_peers_are_gateways_on_the_ext_authz_listener_only() {
        let c = meshed();
        let xfcc = format!("By=spiffe://cluster.local/ns/tollgate/sa/tollgate;URI={GATEWAY_ID}");
        let gw = c
            .authenticate_request(None, Some(&xfcc), Listener::ExtAuthz)
            .unwrap();
        assert_eq!(gw, Principal::Gateway(None));
        let eu = c
            .authenticate_request(
                None,
                Some("By=x;URI=spiffe://cluster.local/ns/eu/sa/edge"),
                Listener::ExtAuthz,
            )
            .unwrap();
        assert!(eu.may_access("acme") && !eu.may_access("globex"));
        // Not on the API listener, where only tokens count.
        assert_eq!(
            c.authenticate_request(None, Some(&xfcc), Listener::Api),
            Err(AuthError::Missing)
        );
        // Another workload of the mesh, or the gateway's id in an earlier element, is not let in.
        let other = c
            .authenticate_request(
                None,
                Some(&format!(
                    "URI={GATEWAY_ID},By=y;URI=spiffe://cluster.local/ns/apps/sa/app"
                )),
                Listener::ExtAuthz,
            )
            .unwrap_err();
        assert_eq!(
            other,
            AuthError::UnknownPeer("spiffe://cluster.local/ns/apps/sa/app".into())
        );
        // A presented token is judged as a token, whatever the header says.
        assert_eq!(
            c.authenticate_request(Some("Bearer envoy.wrong"), Some(&xfcc), Listener::ExtAuthz),
            Err(AuthError::Invalid)
        );
        // Without configured peers the header is ignored.
        assert_eq!(
            creds().authenticate_request(None, Some(&xfcc), Listener::ExtAuthz),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn roles_bound_what_a_customer_key_does() {
        let viewer = Principal::Customer("a".into(), Role::Viewer);
        let app = Principal::Customer("a".into(), Role::App);
        let admin = Principal::Customer("a".into(), Role::Admin);
        assert!(viewer.may_access("a") && !viewer.may_decide("a") && !viewer.may_manage("a"));
        assert!(app.may_decide("a") && !app.may_manage("a"));
        assert!(admin.may_decide("a") && admin.may_manage("a"));
        assert!(!admin.may_manage("b") && !admin.may_decide("b"));
        assert!(Principal::Operator.may_manage("b"));
        assert!(!Principal::Gateway(None).may_manage("a"));
        assert_eq!(admin.describe(), "a:admin");
    }

    #[test]
    fn access_is_per_customer() {
        assert!(Principal::Operator.may_access("x"));
        let p = Principal::Customer("a".into(), Role::App);
        assert!(p.may_access("a"));
        assert!(!p.may_access("b"));
    }
}
