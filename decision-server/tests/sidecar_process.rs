//! The real binary on free loopback ports: 64 concurrent gRPC clients racing one cap through a
//! 3-level chain, config reload (file change and SIGHUP, a bad file kept out), graceful
//! shutdown on SIGTERM, and a bad config refused at start.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use serde_json::json;

use support::{ACME_ORG_CAP, OPERATOR};

struct Sidecar {
    child: Child,
    ext_authz: String,
    http: String,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

impl Sidecar {
    fn start(text: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tollgate.yaml");
        std::fs::write(&config, text).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--workers", "2"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert!(
            line.starts_with("tollgate ready "),
            "unexpected first line: {line:?}"
        );
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .unwrap()
                .to_string()
        };
        Self {
            ext_authz: field("ext_authz"),
            http: field("http"),
            child,
            _dir: dir,
            config,
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }

    /// The org counter, read with a dry-run check that holds nothing.
    async fn org_usage(&self, http: &reqwest::Client, usage: u64) -> serde_json::Value {
        http.post(format!("http://{}/v1/customers/acme/entitlements/check", self.http))
            .bearer_auth(OPERATOR)
            .json(&json!({"featureId": "ai-tokens", "requestedUsage": usage, "dimensions": {"userId": "alice"}, "dryRun": true}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const LOOPBACK_PORT_0: &str = "  listeners: { extAuthz: \"127.0.0.1:0\", grpc: \"127.0.0.1:0\", http: \"127.0.0.1:0\" }\n  logging: { level: warn }";

fn check(user: &str, usage: u64) -> CheckRequest {
    let ext = [
        ("tollgate.customer", "acme".to_string()),
        ("tollgate.feature", "ai-tokens".to_string()),
        ("tollgate.usage", usage.to_string()),
        ("tollgate.dim.userId", user.to_string()),
    ];
    CheckRequest {
        attributes: Some(AttributeContext {
            context_extensions: ext.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            ..AttributeContext::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_grpc_clients_never_overspend_one_cap() {
    let sidecar = Sidecar::start(&support::config_with(LOOPBACK_PORT_0));
    let granted = Arc::new(AtomicU64::new(0));
    let denials = Arc::new(AtomicU64::new(0));
    let users = ["alice", "bob", "carol"];
    let sizes = [1u64, 3, 7, 13];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tasks = Vec::new();
    for client in 0..64usize {
        let addr = format!("http://{}", sidecar.ext_authz);
        let granted = Arc::clone(&granted);
        let denials = Arc::clone(&denials);
        tasks.push(tokio::spawn(async move {
            // One connection per client: 64 real HTTP/2 clients, not 64 streams on one.
            let mut c = AuthorizationClient::connect(addr).await.unwrap();
            let mut my_denials = 0;
            // Bounded in count and time.
            for i in 0..400usize {
                if Instant::now() > deadline || my_denials >= 5 {
                    break;
                }
                let size = sizes[(client + i) % sizes.len()];
                let r = c
                    .check(check(users[(client + i) % users.len()], size))
                    .await
                    .unwrap()
                    .into_inner();
                if r.status.unwrap().code == 0 {
                    granted.fetch_add(size, Ordering::Relaxed);
                } else {
                    my_denials += 1;
                    denials.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = granted.load(Ordering::Relaxed);
    assert!(
        total <= ACME_ORG_CAP,
        "granted {total} past the cap {ACME_ORG_CAP}"
    );
    assert!(
        ACME_ORG_CAP - total < 13,
        "the cap was not used up: {total} of {ACME_ORG_CAP} with {} denials",
        denials.load(Ordering::Relaxed)
    );
    // The sidecar's own counter agrees with what the clients were granted.
    let http = reqwest::Client::new();
    let view = sidecar.org_usage(&http, 1).await;
    let org = view["chain"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["limitId"] == "org-daily")
        .unwrap();
    assert_eq!(org["currentUsage"], total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_valid_files_keeps_bad_ones_out_and_sigterm_drains() {
    let text = support::config_with(LOOPBACK_PORT_0);
    let mut sidecar = Sidecar::start(&text);
    let http = reqwest::Client::new();
    let cap_seen = |v: &serde_json::Value| {
        v["chain"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["limitId"] == "org-daily")
            .unwrap()["usageLimit"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(cap_seen(&sidecar.org_usage(&http, 1).await), ACME_ORG_CAP);

    // A file change with a new cap takes effect without a restart.
    let raised = text.replace("limit: 1000, period: P1D", "limit: 2000, period: P1D");
    assert_ne!(raised, text);
    std::fs::write(&sidecar.config, &raised).unwrap();
    // Inotify usually reports it at once; the 5 s poll is the backstop.
    let until = Instant::now() + Duration::from_secs(20);
    while cap_seen(&sidecar.org_usage(&http, 1).await) != 2000 {
        assert!(Instant::now() < until, "the file change was not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A bad file is refused; the running config stays.
    std::fs::write(
        &sidecar.config,
        raised.replace("period: P1D", "period: P1Q"),
    )
    .unwrap();
    sidecar.signal("HUP");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(cap_seen(&sidecar.org_usage(&http, 1).await), 2000);
    let metrics = http
        .get(format!("http://{}/metrics", sidecar.http))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"tollgate_config_reloads_total{result="rejected"}"#),
        "{metrics}"
    );

    // SIGHUP with a good file again.
    std::fs::write(
        &sidecar.config,
        text.replace("limit: 1000, period: P1D", "limit: 3000, period: P1D"),
    )
    .unwrap();
    sidecar.signal("HUP");
    let until = Instant::now() + Duration::from_secs(10);
    while cap_seen(&sidecar.org_usage(&http, 1).await) != 3000 {
        assert!(Instant::now() < until, "SIGHUP reload was not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGTERM: the process drains and exits cleanly.
    sidecar.signal("TERM");
    let until = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = sidecar.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < until, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
}

#[test]
fn an_invalid_config_is_refused_at_start_with_file_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.yaml");
    let text = support::config_with("  listeners: { http: \"not-an-address\" }")
        .replace("limit: 1000, period: P1D", "limit: 1000, period: P1Q");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let file = config.display().to_string();
    assert!(
        err.contains(&format!("{file}: customers[0].limits[0].period:")),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{file}: server.listeners.http: `not-an-address` is not an address"
        )),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "nothing was served");
}
