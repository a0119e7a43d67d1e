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
/// The most sessions kept at once; past it, expired ones are dropped, then sign-in refused
/// (but for the operator).
const MAX_SESSIONS: usize = 10_000;
/// The most sessions one credential keeps: a new sign-in past it ends that credential's
/// oldest session, so a loop of sign-ins with one key churns only its own sessions.
pub const MAX_PER_KEY: usize = 10;
/// The most sessions one customer's keys keep together, likewise: one tenant never fills the
/// server's sessions, so another tenant (and the operator) can always sign in.
pub const MAX_PER_CUSTOMER: usize = 100;

#[derive(Debug, Clone)]
struct Session {
    /// The credential signed in with, checked again on every request, so a key removed from
    /// the config (and reloaded) ends its sessions at once.
    token: String,
    /// A digest of the credential, for its budget.
    key: [u8; 32],
    /// The customer the credential belongs to (none for the operator), for its budget.
    customer: Option<String>,
    csrf: String,
    created_at: i64,
    expires_at: i64,
}

/// What a request's session resolves to.
#[derive(Debug, Clone)]
pub struct Signed {
    pub principal: Principal,
    pub csrf: String,
    /// The key id part of the credential (`<keyId>.<secret>`), for the audit log.
    pub key: String,
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
        let key = crate::auth::sha256(token);
        let customer = match &principal {
            Principal::Customer(c, _) => Some(c.clone()),
            _ => None,
        };
        self.map.retain(|_, s| s.expires_at > now);
        self.make_room(|s| s.key == key, MAX_PER_KEY);
        if let Some(c) = &customer {
            self.make_room(|s| s.customer.as_ref() == Some(c), MAX_PER_CUSTOMER);
        }
        if self.map.len() >= MAX_SESSIONS && customer.is_some() {
            return Err(SessionError::Full);
        }
        let id = crate::auth::random_secret();
        self.map.insert(
            id.clone(),
            Session {
                token: token.to_string(),
                key,
                customer,
                csrf: crate::auth::random_secret(),
                created_at: now,
                expires_at: now + TTL_MILLIS,
            },
        );
        Ok((id, principal))
    }

    /// Ends the oldest sessions matching `mine` until fewer than `max` are left.
    fn make_room(&self, mine: impl Fn(&Session) -> bool, max: usize) {
        let mut own: Vec<(i64, String)> = self
            .map
            .iter()
            .filter(|e| mine(e.value()))
            .map(|e| (e.value().created_at, e.key().clone()))
            .collect();
        if own.len() < max {
            return;
        }
        own.sort();
        for (_, id) in own.iter().take(own.len() + 1 - max) {
            self.map.remove(id);
        }
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
            key: session
                .token
                .split_once('.')
                .map(|(id, _)| id.to_string())
                .unwrap_or_default(),
        })
    }

    /// Signs out.
    pub fn remove(&self, id: &str) {
        self.map.remove(id);
    }
}

/// Whether a form post comes from the portal's own pages: a browser's `Sec-Fetch-Site` says
/// `same-origin` (or `none`, typed by the user), else its `Origin` names this host. Sign-in
/// has no session yet, hence no CSRF token: this keeps another site from posting a key.
pub fn same_origin(headers: &axum::http::HeaderMap) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        return matches!(site, "same-origin" | "none");
    }
    match (header("origin"), header("host")) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.trim_end_matches('/') == host),
        (Some(_), None) => false,
        // No browser fetch metadata at all: not a cross-site browser post.
        (None, _) => true,
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
    use crate::auth::ApiKeySpec;
    use crate::auth::{Credentials, Listener, Role, sha256};

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
    fn one_key_signing_in_in_a_loop_churns_only_its_own_sessions() {
        let keys = vec![
            ApiKeySpec {
                id: "acme-viewer".into(),
                customer: "acme".into(),
                sha256: sha256("acme-viewer.s3cret"),
                role: Role::Viewer,
            },
            ApiKeySpec {
                id: "globex-admin".into(),
                customer: "globex".into(),
                sha256: sha256("globex-admin.s3cret"),
                role: Role::Admin,
            },
        ];
        let c = Credentials::new(Some(sha256("operator-token")), &keys, &[]);
        let s = Sessions::default();
        let (first, _) = s.create(&check(&c), "acme-viewer.s3cret", 0).unwrap();
        for i in 1..20_000 {
            s.create(&check(&c), "acme-viewer.s3cret", i).unwrap();
        }
        assert_eq!(s.map.len(), MAX_PER_KEY, "one key keeps its own few");
        assert!(
            s.get(&check(&c), &first, 20_000).is_err(),
            "the oldest was ended"
        );
        // Another tenant and the operator sign in as ever.
        let (g, _) = s.create(&check(&c), "globex-admin.s3cret", 20_000).unwrap();
        assert!(s.get(&check(&c), &g, 20_001).is_ok());
        let (o, p) = s.create(&check(&c), "operator-token", 20_000).unwrap();
        assert_eq!(p, Principal::Operator);
        assert!(s.get(&check(&c), &o, 20_001).is_ok());
    }

    #[test]
    fn sign_in_is_posted_from_the_portal_only() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = axum::http::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(
                    axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            m
        };
        assert!(same_origin(&h(&[("sec-fetch-site", "same-origin")])));
        assert!(!same_origin(&h(&[("sec-fetch-site", "cross-site")])));
        assert!(!same_origin(&h(&[("sec-fetch-site", "same-site")])));
        assert!(same_origin(&h(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(!same_origin(&h(&[
            ("origin", "https://evil.example"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(same_origin(&h(&[])), "curl and other non-browser clients");
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
