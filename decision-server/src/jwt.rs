//! Verifies a caller's bearer JWT against a pinned issuer and its key set, for the ext_authz
//! path where no verified payload arrives in the request's metadata (Istio's CUSTOM provider).

use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};

/// Seconds of clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 60;

/// One usable key of the set: its id, the one algorithm it verifies, the key.
struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// An issuer, its audiences and keys. Compared by what it was built from.
pub struct BearerJwt {
    issuer: String,
    audiences: Vec<String>,
    keys: Vec<Key>,
    /// The key set as given, for equality (a reload that changes nothing changes nothing).
    source: String,
}

impl std::fmt::Debug for BearerJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerJwt")
            .field("issuer", &self.issuer)
            .field("audiences", &self.audiences)
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl PartialEq for BearerJwt {
    fn eq(&self, other: &Self) -> bool {
        self.issuer == other.issuer
            && self.audiences == other.audiences
            && self.source == other.source
    }
}

impl Eq for BearerJwt {}

/// The algorithm a key without `alg` verifies: the usual one of its type. A key never
/// verifies more than one algorithm, so a token cannot pick a weaker one for it.
fn default_alg(params: &AlgorithmParameters) -> Option<Algorithm> {
    use jsonwebtoken::jwk::EllipticCurve;
    Some(match params {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => Algorithm::ES384,
        AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
        AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
        AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
        _ => return None,
    })
}

fn family_of(params: &AlgorithmParameters) -> Option<AlgorithmFamily> {
    Some(match params {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
        AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
        AlgorithmParameters::OctetKey(_) => AlgorithmFamily::Hmac,
        AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
        _ => return None,
    })
}

impl BearerJwt {
    /// From the issuer, the accepted audiences (empty: a token's `aud` is refused) and a JWKS
    /// document. Errors say which key is unusable and why.
    pub fn new(issuer: &str, audiences: &[String], jwks: &str) -> Result<Arc<Self>, String> {
        let set: JwkSet =
            serde_json::from_str(jwks).map_err(|e| format!("not a JWKS document: {e}"))?;
        if set.keys.is_empty() {
            return Err("the key set has no keys".into());
        }
        let mut keys = Vec::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let alg = match jwk.common.key_algorithm {
                Some(a) => Algorithm::try_from(a)
                    .map_err(|e| format!("keys[{i}]: `alg` {a} does not sign tokens: {e}"))?,
                None => default_alg(&jwk.algorithm)
                    .ok_or_else(|| format!("keys[{i}]: a key type this server cannot verify"))?,
            };
            if Some(alg.family()) != family_of(&jwk.algorithm) {
                return Err(format!(
                    "keys[{i}]: `alg` {alg:?} does not fit the key's type"
                ));
            }
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("keys[{i}]: {e}"))?;
            keys.push(Key {
                kid: jwk.common.key_id.clone(),
                alg,
                key,
            });
        }
        Ok(Arc::new(Self {
            issuer: issuer.to_string(),
            audiences: audiences.to_vec(),
            keys,
            source: jwks.to_string(),
        }))
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// The verified payload of the token in `authorization` (`Bearer <jwt>`), or why not.
    pub fn verify(&self, authorization: Option<&str>) -> Result<serde_json::Value, String> {
        let header = authorization.ok_or("no `authorization` header")?;
        let token = header
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("bearer "))
            .map(|_| header[7..].trim())
            .filter(|t| !t.is_empty())
            .ok_or("the `authorization` header is not `Bearer <token>`")?;
        let head = jsonwebtoken::decode_header(token).map_err(|e| format!("not a JWT: {e}"))?;
        let candidates = self.keys.iter().filter(|k| {
            k.alg == head.alg && (head.kid.is_none() || k.kid.is_none() || k.kid == head.kid)
        });
        let mut validation = Validation::new(head.alg);
        // A token without `exp` would be good forever once lifted from a log: refused.
        validation.required_spec_claims =
            ["iss".to_string(), "exp".to_string()].into_iter().collect();
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
            validation.required_spec_claims.insert("aud".to_string());
        }
        let mut last = format!(
            "no key of the issuer's set verifies {:?}{}",
            head.alg,
            head.kid
                .as_deref()
                .map(|k| format!(" with kid `{k}`"))
                .unwrap_or_default()
        );
        for k in candidates {
            match jsonwebtoken::decode::<serde_json::Value>(token, &k.key, &validation) {
                Ok(data) => {
                    // `aud` is checked only when audiences are configured; a token meant for
                    // someone else is still refused then.
                    if self.audiences.is_empty() && data.claims.get("aud").is_some() {
                        return Err("the token names an audience and none is accepted".into());
                    }
                    return Ok(data.claims);
                }
                Err(e) => last = format!("refused: {e}"),
            }
        }
        Err(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"a shared secret of thirty-two bytes";

    fn jwks() -> String {
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(SECRET);
        json!({"keys": [{"kty": "oct", "kid": "k1", "k": k}]}).to_string()
    }

    /// A token with `claims`, and an `exp` an hour ahead unless they carry one (`"exp": null`
    /// for none).
    fn token(mut claims: serde_json::Value, key: &[u8]) -> String {
        if let Some(map) = claims.as_object_mut() {
            match map.get("exp") {
                None => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    map.insert("exp".into(), (now + 3600).into());
                }
                Some(serde_json::Value::Null) => {
                    map.remove("exp");
                }
                Some(_) => {}
            }
        }
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        format!(
            "Bearer {}",
            encode(&h, &claims, &EncodingKey::from_secret(key).unwrap()).unwrap()
        )
    }

    #[test]
    fn a_token_of_the_issuer_verifies_and_others_do_not() {
        let v = BearerJwt::new("https://auth.example.com", &[], &jwks()).unwrap();
        let ok = token(
            json!({"iss": "https://auth.example.com", "org": "acme"}),
            SECRET,
        );
        assert_eq!(v.verify(Some(&ok)).unwrap()["org"], "acme");
        let forged = token(
            json!({"iss": "https://auth.example.com", "org": "acme"}),
            b"guess",
        );
        assert!(
            v.verify(Some(&forged))
                .unwrap_err()
                .contains("InvalidSignature")
        );
        let other = token(
            json!({"iss": "https://evil.example", "org": "acme"}),
            SECRET,
        );
        assert!(
            v.verify(Some(&other))
                .unwrap_err()
                .contains("InvalidIssuer")
        );
        let expired = token(
            json!({"iss": "https://auth.example.com", "exp": 1_000_000_000u64}),
            SECRET,
        );
        assert!(
            v.verify(Some(&expired))
                .unwrap_err()
                .contains("ExpiredSignature")
        );
        let forever = token(
            json!({"iss": "https://auth.example.com", "org": "acme", "exp": null}),
            SECRET,
        );
        assert!(
            v.verify(Some(&forever)).unwrap_err().contains("exp"),
            "a token that never expires is refused"
        );
        let aimed = token(
            json!({"iss": "https://auth.example.com", "aud": "billing"}),
            SECRET,
        );
        assert!(v.verify(Some(&aimed)).unwrap_err().contains("audience"));
        assert_eq!(v.verify(None).unwrap_err(), "no `authorization` header");
        assert!(
            v.verify(Some("Basic YWxpY2U="))
                .unwrap_err()
                .contains("Bearer")
        );
        assert!(
            v.verify(Some("Bearer not-a-jwt"))
                .unwrap_err()
                .contains("not a JWT")
        );
        // `alg: none` and a swapped algorithm find no key.
        let none = format!(
            "Bearer {}.{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(r#"{"iss":"https://auth.example.com"}"#)
        );
        assert!(v.verify(Some(&none)).is_err());
    }

    #[test]
    fn audiences_are_checked_when_given() {
        let v = BearerJwt::new("i", &["models".into()], &jwks()).unwrap();
        assert!(
            v.verify(Some(&token(json!({"iss": "i", "aud": "models"}), SECRET)))
                .is_ok()
        );
        assert!(
            v.verify(Some(&token(json!({"iss": "i", "aud": "billing"}), SECRET)))
                .is_err()
        );
        assert!(v.verify(Some(&token(json!({"iss": "i"}), SECRET))).is_err());
    }

    #[test]
    fn unusable_key_sets_are_named() {
        assert!(
            BearerJwt::new("i", &[], "{")
                .unwrap_err()
                .contains("not a JWKS")
        );
        assert!(
            BearerJwt::new("i", &[], r#"{"keys": []}"#)
                .unwrap_err()
                .contains("no keys")
        );
        let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(SECRET);
        let wrong = json!({"keys": [{"kty": "oct", "alg": "RS256", "k": k}]}).to_string();
        assert!(
            BearerJwt::new("i", &[], &wrong)
                .unwrap_err()
                .contains("keys[0]")
        );
    }
}
