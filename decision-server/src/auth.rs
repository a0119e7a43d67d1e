//! Credentials: the operator token, per-customer API keys and gateway tokens (what Envoy
//! presents on the ext_authz listener), stored as SHA-256 digests and compared in constant
//! time.
//!
//! Trade-off: keys and tokens are 256-bit random secrets, not passwords, so a fast hash is
//! enough: nobody can search a 2^256 space, and a slow KDF (argon2) would cost every API call
//! tens of milliseconds.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::server::{ApiKeySpec, GatewayTokenSpec};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The operator token: every customer, the admin API.
    Operator,
    /// A customer's API key: that customer's data and decisions only.
    Customer(String),
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
            Principal::Customer(c) => c == customer,
            Principal::Gateway(None) => true,
            Principal::Gateway(Some(list)) => list.iter().any(|c| c == customer),
        }
    }

    pub fn is_operator(&self) -> bool {
        matches!(self, Principal::Operator)
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
}

/// The configured credentials.
#[derive(Debug, Default, Clone)]
pub struct Credentials {
    operator: Option<[u8; 32]>,
    /// Key id (the part before the `.`) → who the key is and the digest of the whole key.
    /// API keys and gateway tokens share one id space (validation refuses a duplicate id).
    keys: HashMap<String, (Principal, [u8; 32])>,
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
                (Principal::Customer(k.customer.clone()), k.sha256),
            )
        });
        let gateway = gateways.iter().map(|g| {
            let scope = g.customers.as_ref().map(|c| Arc::from(c.as_slice()));
            (g.id.clone(), (Principal::Gateway(scope), g.sha256))
        });
        Self {
            operator,
            keys: api.chain(gateway).collect(),
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
        let header = header.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
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
            Ok(Principal::Customer("acme".into()))
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

    #[test]
    fn access_is_per_customer() {
        assert!(Principal::Operator.may_access("x"));
        let p = Principal::Customer("a".into());
        assert!(p.may_access("a"));
        assert!(!p.may_access("b"));
    }
}
