//! Portal sessions: a random id in an `HttpOnly`, `SameSite=Strict` cookie standing for the
//! credential that signed in, an expiry, and a CSRF token every state-changing request echoes.
//!
//! Trade-off: sessions live in this process's memory, bounded in number. A restart signs
//! everyone out, and replicas behind one address need sticky sessions; keeping them in the
//! counter store would cost a store call on every portal request for little gain.

use dashmap::DashMap;
use subtle::ConstantTimeEq;

use crate::auth::{AuthError, Principal};

/// The session cookie.
pub const COOKIE: &str = "tollgate_session";
/// The header (or form field) carrying the session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lasts after sign-in, in ms (8 hours: a working day).
pub const TTL_MILLIS: i64 = 8 * 3600 * 1000;
/// The most sessions kept at once; past it, expired ones are dropped, then sign-in refused.
const MAX_SESSIONS: usize = 10_000;

#[derive(Debug, Clone)]
struct Session {
    /// The credential signed in with, checked again on every request, so a key removed from
    /// the config (and reloaded) ends its sessions at once.
    token: String,
    csrf: String,
    expires_at: i64,
}

/// What a request's session resolves to.
#[derive(Debug, Clone)]
pub struct Signed {
    pub principal: Principal,
    pub csrf: String,
}

/// Why a session is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("not signed in, or the session expired: sign in again")]
    Unknown,
    #[error("the credential this session signed in with is no longer valid: {0}")]
    Revoked(AuthError),
    #[error("too many sessions are open; try again later")]
    Full,
}

/// The open sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    map: DashMap<String, Session>,
}

impl Sessions {
    /// Signs in with `token` (checked as on the API) at `now`: the session id and its CSRF
    /// token.
    pub fn create(
        &self,
        check: &dyn Fn(&str) -> Result<Principal, AuthError>,
        token: &str,
        now: i64,
    ) -> Result<(String, Principal), SessionError> {
        let principal = check(token).map_err(SessionError::Revoked)?;
        if self.map.len() >= MAX_SESSIONS {
            self.map.retain(|_, s| s.expires_at > now);
            if self.map.len() >= MAX_SESSIONS {
                return Err(SessionError::Full);
            }
        }
        let id = crate::auth::random_secret();
        self.map.insert(
            id.clone(),
            Session {
                token: token.to_string(),
                csrf: crate::auth::random_secret(),
                expires_at: now + TTL_MILLIS,
            },
        );
        Ok((id, principal))
    }

    /// The session `id` stands for at `now`, with its credential checked again.
    pub fn get(
        &self,
        check: &dyn Fn(&str) -> Result<Principal, AuthError>,
        id: &str,
        now: i64,
    ) -> Result<Signed, SessionError> {
        let session = self
            .map
            .get(id)
            .map(|s| s.clone())
            .ok_or(SessionError::Unknown)?;
        if session.expires_at <= now {
            self.map.remove(id);
            return Err(SessionError::Unknown);
        }
        let principal = check(&session.token).map_err(|e| {
            self.map.remove(id);
            SessionError::Revoked(e)
        })?;
        Ok(Signed {
            principal,
            csrf: session.csrf,
        })
    }

    /// Signs out.
    pub fn remove(&self, id: &str) {
        self.map.remove(id);
    }
}

/// Whether `presented` is the session's CSRF token (constant time).
pub fn csrf_ok(signed: &Signed, presented: Option<&str>) -> bool {
    presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(signed.csrf.as_bytes())))
}

/// The session id in a `Cookie` header, if any.
pub fn cookie_in(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// Whether the browser reached us over TLS (through a proxy that says so): then the cookie
/// is `Secure`.
pub fn behind_tls(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// The `Set-Cookie` value for session `id` (empty and expired: signed out).
pub fn set_cookie(id: Option<&str>, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    match id {
        Some(id) => format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            TTL_MILLIS / 1000
        ),
        None => format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Credentials, Listener, Role, sha256};
    use crate::config::server::ApiKeySpec;

    /// A token check over `credentials`, as the service makes one.
    fn check(c: &Credentials) -> impl Fn(&str) -> Result<Principal, AuthError> + '_ {
        move |t| c.authenticate_header(Some(&format!("Bearer {t}")), Listener::Api)
    }

    fn creds(with_key: bool) -> Credentials {
        let keys = if with_key {
            vec![ApiKeySpec {
                id: "acme-admin".into(),
                customer: "acme".into(),
                sha256: sha256("acme-admin.s3cret"),
                role: Role::Admin,
            }]
        } else {
            Vec::new()
        };
        Credentials::new(None, &keys, &[])
    }

    #[test]
    fn a_session_stands_for_its_key_until_expiry_sign_out_or_revocation() {
        let s = Sessions::default();
        let c = creds(true);
        assert!(matches!(
            s.create(&check(&c), "acme-admin.wrong", 0),
            Err(SessionError::Revoked(_))
        ));
        let (id, p) = s.create(&check(&c), "acme-admin.s3cret", 0).unwrap();
        assert_eq!(p, Principal::Customer("acme".into(), Role::Admin));
        let signed = s.get(&check(&c), &id, 1000).unwrap();
        assert!(csrf_ok(&signed, Some(&signed.csrf)));
        assert!(!csrf_ok(&signed, Some("guess")));
        assert!(!csrf_ok(&signed, None));
        assert!(matches!(
            s.get(&check(&c), &id, TTL_MILLIS + 1),
            Err(SessionError::Unknown)
        ));
        let (id, _) = s.create(&check(&c), "acme-admin.s3cret", 0).unwrap();
        // The key is gone from the (reloaded) config: the session ends.
        assert!(matches!(
            s.get(&check(&creds(false)), &id, 1),
            Err(SessionError::Revoked(_))
        ));
        assert!(matches!(
            s.get(&check(&c), &id, 1),
            Err(SessionError::Unknown)
        ));
        let (id, _) = s.create(&check(&c), "acme-admin.s3cret", 0).unwrap();
        s.remove(&id);
        assert!(s.get(&check(&c), &id, 1).is_err());
    }

    #[test]
    fn cookies_are_http_only_strict_and_secure_behind_tls() {
        let c = set_cookie(Some("abc"), true);
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.ends_with("Secure"));
        assert!(!set_cookie(Some("abc"), false).contains("Secure"));
        let mut h = axum::http::HeaderMap::new();
        h.insert("cookie", "a=1; tollgate_session=xyz; b=2".parse().unwrap());
        assert_eq!(cookie_in(&h).as_deref(), Some("xyz"));
    }
}
