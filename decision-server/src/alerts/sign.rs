//! Standard Webhooks signing: the `webhook-id`, `webhook-timestamp` and `webhook-signature`
//! headers, with one `v1,<base64 HMAC-SHA256>` signature per secret so a rotation can overlap.

/// Why a webhook secret or payload cannot be signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("a webhook secret must start with `whsec_` followed by base64")]
    NotWhsec,
    #[error("the webhook secret does not decode: {0}")]
    Secret(String),
    #[error("the payload cannot be signed: {0}")]
    Payload(String),
}

/// Checks that `secret` is a `whsec_` secret that decodes.
pub fn check_secret(secret: &str) -> Result<(), SignError> {
    if !secret.starts_with("whsec_") {
        return Err(SignError::NotWhsec);
    }
    standardwebhooks::Webhook::new(secret)
        .map(|_| ())
        .map_err(|e| SignError::Secret(e.to_string()))
}

/// The `webhook-signature` value for `body` sent as message `msg_id` at `timestamp` (seconds):
/// every secret's signature, space-separated, in the order given.
pub fn signature(
    secrets: &[String],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, SignError> {
    let mut out = Vec::with_capacity(secrets.len());
    for secret in secrets {
        check_secret(secret)?;
        let wh =
            standardwebhooks::Webhook::new(secret).map_err(|e| SignError::Secret(e.to_string()))?;
        out.push(
            wh.sign(msg_id, timestamp, body)
                .map_err(|e| SignError::Payload(e.to_string()))?,
        );
    }
    Ok(out.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector the Standard Webhooks libraries share (`test_sign_function`).
    #[test]
    fn signs_the_specs_test_vector() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string();
        let sig = signature(
            std::slice::from_ref(&secret),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_rotation_sends_one_signature_per_secret() {
        let old = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string();
        let new = "whsec_dGhpcyBpcyBhIG5ldyBzZWNyZXQgb2YgMzIgYnl0ZXM=".to_string();
        let sig = signature(&[old, new], "msg_1", 1_614_265_330, b"{}").unwrap();
        let parts: Vec<&str> = sig.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.starts_with("v1,")) && parts[0] != parts[1]);
    }

    #[test]
    fn secrets_must_be_whsec() {
        assert_eq!(
            check_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            Err(SignError::NotWhsec)
        );
        assert!(matches!(
            check_secret("whsec_!!!"),
            Err(SignError::Secret(_))
        ));
    }
}
