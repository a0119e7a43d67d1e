//! The credentials the test processes are configured with: the gateway token Envoy presents
//! to the sidecar, and the JWTs a platform's identity provider would sign.

/// The gateway token Envoy presents to the sidecar in the tests and the demo (loopback only,
/// processes that live as long as one run). Its SHA-256 goes in the sidecar's
/// `server.credentials.gatewayTokens`.
pub const GATEWAY_TOKEN: &str = "envoy.loopback-gateway-token";

/// The issuer and HS256 key of the JWTs the tests and the demo sign, as a platform's identity
/// provider would; Envoy's `jwt_authn` verifies them with [`jwks`].
pub const JWT_ISSUER: &str = "tollgate-gateway";
pub const JWT_KEY: &[u8] = b"tollgate-e2e-shared-secret-32-bytes!";

/// The sidecar config lines that accept [`GATEWAY_TOKEN`].
pub fn gateway_token_config() -> String {
    format!(
        "    gatewayTokens:\n      - {{ id: envoy, sha256: {} }}\n",
        crate::fixtures::sha256_hex(GATEWAY_TOKEN)
    )
}

/// The JWKS holding [`JWT_KEY`], for `jwt_authn`'s `local_jwks`.
pub fn jwks() -> String {
    use base64::Engine as _;
    serde_json::json!({"keys": [{"kty": "oct", "alg": "HS256", "kid": "k1",
        "k": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(JWT_KEY)}]})
    .to_string()
}

/// An HS256 JWT with `claims`, signed with `key`.
pub fn signed_jwt(claims: &serde_json::Value, key: &[u8]) -> String {
    use base64::Engine as _;
    use hmac::Mac as _;
    let b = |s: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    // An hour from now unless the claims say (as identity providers issue them): verifiers
    // refuse a token that never expires.
    let mut claims = claims.clone();
    if let Some(map) = claims.as_object_mut()
        && !map.contains_key("exp")
    {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        map.insert("exp".into(), (now + 3600).into());
    }
    let signing_input = format!(
        "{}.{}",
        b(br#"{"alg":"HS256","typ":"JWT","kid":"k1"}"#),
        b(claims.to_string().as_bytes())
    );
    // An HMAC takes a key of any length; this cannot fail.
    let tag = hmac::Hmac::<sha2::Sha256>::new_from_slice(key)
        .map(|mut mac| {
            mac.update(signing_input.as_bytes());
            mac.finalize().into_bytes().to_vec()
        })
        .unwrap_or_default();
    format!("{signing_input}.{}", b(&tag))
}

/// `Bearer <jwt>` for a caller of `customer` (claim `org`) with the other `claims` (such as
/// `sub`), issued by [`JWT_ISSUER`] and signed with [`JWT_KEY`].
pub fn bearer_for(customer: &str, claims: serde_json::Value) -> String {
    let mut c = claims;
    if let Some(map) = c.as_object_mut() {
        map.insert("iss".into(), JWT_ISSUER.into());
        map.insert("org".into(), customer.into());
    }
    format!("Bearer {}", signed_jwt(&c, JWT_KEY))
}

/// `Bearer <jwt>` with these claims and no real signature. The filter reads claims without
/// verifying them (that is `jwt_authn`'s job), so tests, the demo and the load generator can
/// name any user.
pub fn unsigned_bearer(claims: &serde_json::Value) -> String {
    use base64::Engine as _;
    let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "Bearer {}.{}.{}",
        b(r#"{"alg":"none"}"#),
        b(&claims.to_string()),
        b("unsigned")
    )
}
