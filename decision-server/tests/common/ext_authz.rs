//! Driving a sidecar process of the fixture config: ext_authz checks as Envoy sends them,
//! the hold they answer, a race of 64 clients on acme's org cap, and reading that cap.

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use serde_json::json;

use tollgate_testkit::Sidecar;

use super::service::{GATEWAY, OPERATOR};

/// The org counter of acme, read through `sidecar`'s HTTP API with a dry-run check that holds
/// nothing.
pub async fn org_usage(sidecar: &Sidecar, http: &reqwest::Client, usage: u64) -> serde_json::Value {
    http.post(format!(
        "http://{}/v1/customers/acme/entitlements/check",
        sidecar.http
    ))
    .bearer_auth(OPERATOR)
    .json(&json!({"featureId": "ai-tokens", "requestedUsage": usage, "dimensions": {"userId": "alice"}, "dryRun": true}))
    .send()
    .await
    .unwrap()
    .json()
    .await
    .unwrap()
}

/// acme's org counter (`org-daily`) as `sidecar` reads it, with a dry run.
pub async fn org_counter(sidecar: &Sidecar) -> u64 {
    let v = org_usage(sidecar, &reqwest::Client::new(), 0).await;
    v["chain"]
        .as_array()
        .unwrap_or_else(|| panic!("no chain in {v}"))
        .iter()
        .find(|e| e["limitId"] == "org-daily")
        .unwrap_or_else(|| panic!("no org-daily in {v}"))["currentUsage"]
        .as_u64()
        .unwrap_or_else(|| panic!("no currentUsage in {v}"))
}

/// A metric without labels from `sidecar`'s `/metrics`.
pub async fn metric(sidecar: &Sidecar, name: &str) -> u64 {
    let m = sidecar
        .metrics()
        .await
        .unwrap_or_else(|e| panic!("no /metrics: {e}"));
    m.get(name, &[])
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{m}")) as u64
}

/// An ext_authz check for acme's `ai-tokens` by `user`, with the gateway token Envoy sends.
pub fn check(user: &str, usage: u64) -> tonic::Request<CheckRequest> {
    let ext = [
        ("tollgate.customer", "acme".to_string()),
        ("tollgate.feature", "ai-tokens".to_string()),
        ("tollgate.usage", usage.to_string()),
        ("tollgate.dim.userId", user.to_string()),
    ];
    let mut r = tonic::Request::new(CheckRequest {
        attributes: Some(AttributeContext {
            context_extensions: ext.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            ..AttributeContext::default()
        }),
    });
    if let Ok(v) = format!("Bearer {GATEWAY}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

/// The hold id of a granted ext_authz answer, from its dynamic metadata.
pub fn hold_of(r: &envoy_types::ext_authz::v3::pb::CheckResponse) -> Option<String> {
    use envoy_types::pb::google::protobuf::value::Kind;
    match &r.dynamic_metadata.as_ref()?.fields.get("holdId")?.kind {
        Some(Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

/// 64 clients, each on its own connection (64 real HTTP/2 clients, not 64 streams on one) to
/// one of `ext_authz` in turn, race acme's org cap with checks of 1, 3, 7 and 13 units by
/// three users, until each has seen 5 denials (at most 400 checks each, 60 s). Returns the
/// units granted.
pub async fn race_one_cap(ext_authz: &[String]) -> u64 {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;

    const USERS: [&str; 3] = ["alice", "bob", "carol"];
    const SIZES: [u64; 4] = [1, 3, 7, 13];
    let granted = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tasks = Vec::new();
    for client in 0..64usize {
        let addr = format!("http://{}", ext_authz[client % ext_authz.len()]);
        let granted = Arc::clone(&granted);
        tasks.push(tokio::spawn(async move {
            let mut c = AuthorizationClient::connect(addr).await.unwrap();
            let mut denials = 0;
            for i in 0..400usize {
                if Instant::now() > deadline || denials >= 5 {
                    break;
                }
                let size = SIZES[(client + i) % SIZES.len()];
                let r = c
                    .check(check(USERS[(client + i) % USERS.len()], size))
                    .await
                    .unwrap()
                    .into_inner();
                if r.status.unwrap().code == 0 {
                    granted.fetch_add(size, Ordering::Relaxed);
                } else {
                    denials += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    granted.load(Ordering::Relaxed)
}
