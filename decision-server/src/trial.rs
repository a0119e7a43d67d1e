//! A trial identity provider: an Ed25519 signing key, the JWKS that verifies it, and tokens
//! for a customer and a user. For trying Tollgate before the company's identity provider is
//! wired in (`tollgate trial-key`, `tollgate trial-token`); production verifies the tokens of
//! that provider (`remote_jwks` in Envoy, `server.bearerJwt` in the sidecar).

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, spki::der::pem::LineEnding};
use sha2::Digest as _;

/// The issuer trial tokens carry unless told otherwise.
pub const TRIAL_ISSUER: &str = "tollgate-trial";

/// What went wrong making a key or a token.
#[derive(Debug, thiserror::Error)]
pub enum TrialError {
    #[error("the signing key is not an Ed25519 PKCS#8 PEM (`tollgate trial-key` makes one): {0}")]
    Key(String),
    #[error("cannot sign the token: {0}")]
    Sign(String),
    #[error("claim `{0}` is set by a flag of its own; use that flag")]
    Reserved(String),
}

/// A new signing key: its PKCS#8 PEM (secret) and the one-line JWKS that verifies its tokens.
pub fn new_key() -> Result<(String, String), TrialError> {
    use rand::RngCore;
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let key = SigningKey::from_bytes(&secret);
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| TrialError::Key(e.to_string()))?;
    Ok((pem.to_string(), jwks(&key)))
}

/// The key id: the first 8 bytes of the public key's SHA-256, so a token names its key.
fn kid(key: &SigningKey) -> String {
    hex::encode(&sha2::Sha256::digest(key.verifying_key().as_bytes())[..8])
}

/// The JWKS of `key` on one line (`jwt_authn`'s `local_jwks.inline_string` and a `sed`
/// substitution take it as it is).
fn jwks(key: &SigningKey) -> String {
    use base64::Engine as _;
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
    serde_json::json!({"keys": [{
        "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid(key), "x": x,
    }]})
    .to_string()
}

/// The JWKS of the key in `pem`.
pub fn jwks_of(pem: &str) -> Result<String, TrialError> {
    Ok(jwks(&parse(pem)?))
}

fn parse(pem: &str) -> Result<SigningKey, TrialError> {
    SigningKey::from_pkcs8_pem(pem).map_err(|e| TrialError::Key(e.to_string()))
}

/// What a trial token says.
#[derive(Debug, Clone)]
pub struct TokenClaims {
    pub issuer: String,
    /// Claim `org`: the customer who pays.
    pub customer: String,
    /// Claim `sub`, when given.
    pub user: Option<String>,
    pub audience: Option<String>,
    /// Seconds from `now` to `exp`.
    pub ttl_seconds: u64,
    /// More string claims (`team=research`).
    pub extra: BTreeMap<String, String>,
}

/// A signed EdDSA JWT with `claims`, issued at `now` (seconds since the epoch).
pub fn token(pem: &str, claims: &TokenClaims, now: u64) -> Result<String, TrialError> {
    let key = parse(pem)?;
    let mut body = serde_json::Map::new();
    for (k, v) in &claims.extra {
        if ["iss", "org", "sub", "aud", "iat", "exp"].contains(&k.as_str()) {
            return Err(TrialError::Reserved(k.clone()));
        }
        body.insert(k.clone(), v.clone().into());
    }
    body.insert("iss".into(), claims.issuer.clone().into());
    body.insert("org".into(), claims.customer.clone().into());
    if let Some(u) = &claims.user {
        body.insert("sub".into(), u.clone().into());
    }
    if let Some(a) = &claims.audience {
        body.insert("aud".into(), a.clone().into());
    }
    body.insert("iat".into(), now.into());
    body.insert("exp".into(), now.saturating_add(claims.ttl_seconds).into());
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some(kid(&key));
    let der = key
        .to_pkcs8_der()
        .map_err(|e| TrialError::Key(e.to_string()))?;
    jsonwebtoken::encode(
        &header,
        &serde_json::Value::Object(body),
        &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()),
    )
    .map_err(|e| TrialError::Sign(e.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn claims() -> TokenClaims {
        TokenClaims {
            issuer: TRIAL_ISSUER.into(),
            customer: "acme".into(),
            user: Some("alice".into()),
            audience: None,
            ttl_seconds: 3600,
            extra: BTreeMap::from([("team".into(), "research".into())]),
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn a_trial_token_verifies_with_its_jwks_and_with_no_other() {
        let (pem, jwks) = new_key().unwrap();
        assert!(!jwks.contains('\n'), "the JWKS is one line: {jwks}");
        assert_eq!(jwks_of(&pem).unwrap(), jwks);
        let t = token(&pem, &claims(), now()).unwrap();
        let verifier = crate::jwt::BearerJwt::new(TRIAL_ISSUER, &[], &jwks).unwrap();
        let payload = verifier.verify(Some(&format!("Bearer {t}"))).unwrap();
        assert_eq!(payload["org"], "acme");
        assert_eq!(payload["sub"], "alice");
        assert_eq!(payload["team"], "research");
        // Another key's set, another issuer, an expired token: refused.
        let (_, other) = new_key().unwrap();
        let stranger = crate::jwt::BearerJwt::new(TRIAL_ISSUER, &[], &other).unwrap();
        assert!(stranger.verify(Some(&format!("Bearer {t}"))).is_err());
        let elsewhere = crate::jwt::BearerJwt::new("someone-else", &[], &jwks).unwrap();
        assert!(elsewhere.verify(Some(&format!("Bearer {t}"))).is_err());
        let old = token(&pem, &claims(), now() - 7200).unwrap();
        assert!(verifier.verify(Some(&format!("Bearer {old}"))).is_err());
    }

    #[test]
    fn bad_keys_and_reserved_claims_are_refused_by_name() {
        let e = token("not a key", &claims(), 0).unwrap_err();
        assert!(e.to_string().contains("Ed25519 PKCS#8"), "{e}");
        let (pem, _) = new_key().unwrap();
        let mut c = claims();
        c.extra.insert("org".into(), "globex".into());
        let e = token(&pem, &c, 0).unwrap_err();
        assert!(e.to_string().contains("claim `org`"), "{e}");
    }
}
