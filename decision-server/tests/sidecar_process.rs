//! The real binary on free loopback ports: 64 concurrent gRPC clients racing one cap through a
//! 3-level chain, config reload (file change and SIGHUP, a bad file kept out), graceful
//! shutdown on SIGTERM, and a bad config refused at start.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::ACME_ORG_CAP;
use support::sidecar::{LOOPBACK_PORT_0, Sidecar, race_one_cap};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_grpc_clients_never_overspend_one_cap() {
    let sidecar = Sidecar::start(&support::config_with(LOOPBACK_PORT_0));
    let total = race_one_cap(std::slice::from_ref(&sidecar.ext_authz)).await;
    assert!(
        total <= ACME_ORG_CAP,
        "granted {total} past the cap {ACME_ORG_CAP}"
    );
    assert!(
        ACME_ORG_CAP - total < 13,
        "the cap was not used up: {total} of {ACME_ORG_CAP}"
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
