//! Where webhooks may go, when they are sent: every address a webhook's host name resolves to
//! is checked against the operator's `core::target::TargetPolicy` (`Resolver`), so a name
//! that points inside is refused too.

use std::net::SocketAddr;
use std::sync::Arc;

pub use crate::core::target::TargetPolicy;

/// Resolves webhook hosts and keeps only the addresses the policy allows, so the check holds
/// for the address actually connected to (and a name that changes its answer later is checked
/// again on every connection).
#[derive(Debug, Clone)]
pub struct Resolver {
    policy: Arc<parking_lot::RwLock<TargetPolicy>>,
}

impl Resolver {
    pub fn new(policy: Arc<parking_lot::RwLock<TargetPolicy>>) -> Self {
        Self { policy }
    }
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = Arc::clone(&self.policy);
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = {
                let p = policy.read();
                found
                    .iter()
                    .copied()
                    .filter(|a| p.allows_ip(a.ip()))
                    .collect()
            };
            if allowed.is_empty() {
                let shown: Vec<String> = found.iter().map(|a| a.ip().to_string()).collect();
                return Err(format!(
                    "`{host}` resolves only to addresses a webhook may not reach ({}): loopback, private, link-local, multicast or reserved",
                    shown.join(", ")
                )
                .into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_that_resolves_inside_is_refused_when_sent() {
        use reqwest::dns::Resolve as _;
        let r = Resolver::new(Arc::new(parking_lot::RwLock::new(TargetPolicy::default())));
        let err = match r.resolve("localhost".parse().unwrap()).await {
            Ok(_) => panic!("localhost resolved to an allowed address"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("resolves only to addresses"), "{err}");
        let allowing = Resolver::new(Arc::new(parking_lot::RwLock::new(TargetPolicy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]))));
        assert!(allowing.resolve("localhost".parse().unwrap()).await.is_ok());
    }
}
