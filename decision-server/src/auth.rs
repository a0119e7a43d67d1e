//! Credentials: the operator token and per-customer API keys, stored as SHA-256 digests and
//! compared in constant time.
//!
//! Trade-off: keys and tokens are 256-bit random secrets, not passwords, so a fast hash is
//! enough: nobody can search a 2^256 space, and a slow KDF (argon2) would cost every API call
//! tens of milliseconds.

use std::collections::HashMap;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::server::ApiKeySpec;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The operator token: every customer, the admin API.
    Operator,
    /// A customer's API key: that customer's data and decisions only.
    Customer(String),
}

impl Principal {
    /// Whether this caller may read or act for `customer`.
    pub fn may_access(&self, customer: &str) -> bool {
        match self {
            Principal::Operator => true,
            Principal::Customer(c) => c == customer,
        }
    }

    pub fn is_operator(&self) -> bool {
        matches!(self, Principal::Operator)
    }
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
}

/// The configured credentials.
#[derive(Debug, Default, Clone)]
pub struct Credentials {
    operator: Option<[u8; 32]>,
    /// Key id (the part before the `.`) → customer and digest of the whole key.
    keys: HashMap<String, (String, [u8; 32])>,
}

/// SHA-256 of `secret`, as stored in the config.
pub fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Credentials {
    pub fn new(operator: Option<[u8; 32]>, keys: &[ApiKeySpec]) -> Self {
        Self {
            operator,
            keys: keys
                .iter()
                .map(|k| (k.id.clone(), (k.customer.clone(), k.sha256)))
                .collect(),
        }
    }

    /// Identifies the caller from an `authorization` header value.
    pub fn authenticate_header(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
        self.authenticate(token)
    }

    /// Identifies the caller from a bearer token. An API key is `<keyId>.<secret>`; the key id
    /// only selects which digest to compare against, the comparison is over the whole key.
    pub fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let presented = sha256(token);
        if let Some((id, _)) = token.split_once('.')
            && let Some((customer, stored)) = self.keys.get(id)
            && bool::from(presented.ct_eq(stored))
        {
            return Ok(Principal::Customer(customer.clone()));
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
        )
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
            c.authenticate_header(Some("Bearer op-secret")),
            Ok(Principal::Operator)
        );
        assert_eq!(c.authenticate_header(None), Err(AuthError::Missing));
        assert_eq!(
            c.authenticate_header(Some("Basic abc")),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            c.authenticate_header(Some("Bearer ")),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn without_an_operator_token_nothing_is_operator() {
        let c = Credentials::new(None, &[]);
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
