//! Where webhooks may go, as a rule: never to loopback, private, link-local, multicast,
//! reserved or cloud metadata addresses (a customer's webhook must not make the sidecar call
//! the pod's own services, Envoy's admin port among them), unless the operator allows a range
//! (`alerting.allowTargets`). Pure: `alerts::target` applies it again to every address a host
//! name resolves to when a webhook is sent.

use std::net::IpAddr;

use ipnet::IpNet;

/// Addresses no webhook goes to unless allowed: everything that is not a public unicast
/// address (IANA's special-purpose registries).
const BLOCKED: [&str; 24] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "64:ff9b:1::/48",
    "100::/64",
    "2001::/23",
    "2001:db8::/32",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// Host names that name the machine itself or a cloud's metadata service.
fn internal_name(host: &str) -> bool {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    h == "localhost"
        || h.ends_with(".localhost")
        || h == "metadata"
        || h.ends_with(".internal")
        || h.ends_with(".local")
}

/// The operator's exceptions, and the rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetPolicy {
    allow: Vec<IpNet>,
}

impl TargetPolicy {
    pub fn new(allow: Vec<IpNet>) -> Self {
        Self { allow }
    }

    /// Whether a webhook may be sent to `ip`. An IPv4 address inside IPv6 (mapped, or the
    /// NAT64 prefix) is judged as the IPv4 address it carries.
    pub fn allows_ip(&self, ip: IpAddr) -> bool {
        let ip = embedded_v4(ip).map_or(ip, IpAddr::V4);
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        !BLOCKED
            .iter()
            .filter_map(|b| b.parse::<IpNet>().ok())
            .any(|n| n.contains(&ip))
    }

    /// Whether `url` may be a webhook target, before any name is resolved: `https`, or plain
    /// `http` only to an address the operator allowed; never an address or a name that is
    /// inside. `Err` says why.
    pub fn check_url(&self, url: &str) -> Result<(), String> {
        let u = url::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
        let ip = match u.host() {
            Some(url::Host::Ipv4(a)) => Some(IpAddr::V4(a)),
            Some(url::Host::Ipv6(a)) => Some(IpAddr::V6(a)),
            Some(url::Host::Domain(d)) => {
                if internal_name(d) {
                    return Err(format!(
                        "`{url}`: `{d}` names this machine or an internal service; a webhook goes to a public receiver (the operator can allow an address range with `alerting.allowTargets`)"
                    ));
                }
                None
            }
            None => return Err(format!("`{url}` has no host")),
        };
        if let Some(ip) = ip
            && !self.allows_ip(ip)
        {
            return Err(format!(
                "`{url}`: {ip} is a loopback, private, link-local, multicast or reserved address; a webhook goes to a public receiver (the operator can allow a range with `alerting.allowTargets`)"
            ));
        }
        match u.scheme() {
            "https" => Ok(()),
            "http" if ip.is_some_and(|ip| self.allow.iter().any(|n| n.contains(&ip))) => Ok(()),
            _ => Err(format!(
                "`{url}` must be https (plain http only to an address in `alerting.allowTargets`)"
            )),
        }
    }
}

/// The IPv4 address an IPv6 address carries, if it is IPv4-mapped, IPv4-compatible or in the
/// NAT64 well-known prefix.
fn embedded_v4(ip: IpAddr) -> Option<std::net::Ipv4Addr> {
    let IpAddr::V6(v6) = ip else {
        return None;
    };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    let tail = std::net::Ipv4Addr::new(
        (s[6] >> 8) as u8,
        (s[6] & 0xff) as u8,
        (s[7] >> 8) as u8,
        (s[7] & 0xff) as u8,
    );
    let nat64 = s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0];
    let compatible = s[..6] == [0, 0, 0, 0, 0, 0] && !v6.is_loopback() && !v6.is_unspecified();
    (nat64 || compatible).then_some(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_addresses_and_names_are_refused_unless_allowed() {
        let p = TargetPolicy::default();
        for url in [
            "http://127.0.0.1:9901/quitquitquit",
            "https://127.0.0.1/",
            "https://10.1.2.3/",
            "https://192.168.0.1/",
            "https://172.16.5.4/",
            "https://169.254.169.254/latest/meta-data/",
            "https://[fd00::1]/",
            "https://[fe80::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:a9fe:a9fe]/",
            "https://[64:ff9b::a00:1]/",
            "https://0.0.0.0/",
            "https://[::]/",
            "https://224.0.0.1/",
            "https://localhost/",
            "https://metadata.google.internal/",
            "https://printer.local/",
        ] {
            assert!(p.check_url(url).is_err(), "{url} accepted");
        }
        assert!(p.check_url("https://hooks.example.com/t").is_ok());
        assert!(p.check_url("https://93.184.216.34/t").is_ok());
        assert!(
            p.check_url("http://hooks.example.com/t")
                .unwrap_err()
                .contains("must be https")
        );
        let loopback = TargetPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(loopback.check_url("http://127.0.0.1:9/hook").is_ok());
        assert!(loopback.check_url("https://10.0.0.1/").is_err());
        assert!(loopback.allows_ip("::ffff:127.0.0.1".parse().unwrap()));
    }
}
