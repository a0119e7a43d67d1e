//! The real binary on free loopback ports: 64 concurrent gRPC clients racing one cap through a
//! 3-level chain, config reload (file change and SIGHUP, a bad file kept out), graceful
//! shutdown on SIGTERM, and a bad config refused at start.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::ext_authz::{org_usage, race_one_cap};
use common::service::ACME_ORG_CAP;
use common::{LOOPBACK_PORT_0, Sidecar};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_grpc_clients_never_overspend_one_cap() {
    let sidecar = Sidecar::start(&common::service::config_with(LOOPBACK_PORT_0)).unwrap();
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
    let view = org_usage(&sidecar, &http, 1).await;
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
    let text = common::service::config_with(LOOPBACK_PORT_0);
    let mut sidecar = Sidecar::start(&text).unwrap();
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
    assert_eq!(cap_seen(&org_usage(&sidecar, &http, 1).await), ACME_ORG_CAP);

    // A file change with a new cap takes effect without a restart.
    let raised = text.replace("limit: 1000, period: P1D", "limit: 2000, period: P1D");
    assert_ne!(raised, text);
    std::fs::write(&sidecar.config, &raised).unwrap();
    // Inotify usually reports it at once; the 5 s poll is the backstop.
    let until = Instant::now() + Duration::from_secs(20);
    while cap_seen(&org_usage(&sidecar, &http, 1).await) != 2000 {
        assert!(Instant::now() < until, "the file change was not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A bad file is refused; the running config stays.
    std::fs::write(
        &sidecar.config,
        raised.replace("period: P1D", "period: P1Q"),
    )
    .unwrap();
    sidecar.signal("HUP").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(cap_seen(&org_usage(&sidecar, &http, 1).await), 2000);
    let metrics = sidecar.metrics().await.unwrap();
    assert!(
        metrics.get("tollgate_config_reloads_total", &[("result", "rejected")]) >= Some(1.0),
        "{metrics}"
    );

    // SIGHUP with a good file again.
    std::fs::write(
        &sidecar.config,
        text.replace("limit: 1000, period: P1D", "limit: 3000, period: P1D"),
    )
    .unwrap();
    sidecar.signal("HUP").unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while cap_seen(&org_usage(&sidecar, &http, 1).await) != 3000 {
        assert!(Instant::now() < until, "SIGHUP reload was not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGTERM: the process drains and exits cleanly.
    sidecar.signal("TERM").unwrap();
    let until = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = sidecar.proc.try_wait() {
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
    let text = common::service::config_with("  listeners: { http: \"not-an-address\" }")
        .replace("limit: 1000, period: P1D", "limit: 1000, period: P1Q");
    std::fs::write(&config, text).unwrap();
    let err = Sidecar::refused_start(&config).unwrap();
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
}

/// Field `name` of a process's `/proc/<pid>/status`, trimmed.
fn status_field(pid: u32, name: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// Resident memory of a process, from `/proc`.
fn rss_bytes(pid: u32) -> u64 {
    status_field(pid, "VmRSS")
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// `serve` turns transparent huge pages off for its own process (a growing heap would zero
/// 2 MiB on a request's thread at each first touch; bench/README.md).
#[test]
fn the_sidecar_turns_transparent_huge_pages_off_for_itself() {
    let sidecar = Sidecar::start(&common::service::config_with(LOOPBACK_PORT_0)).unwrap();
    let pid = sidecar.proc.pid().unwrap();
    assert_eq!(
        status_field(pid, "THP_enabled").as_deref(),
        Some("0"),
        "THP_enabled in /proc/{pid}/status"
    );
}

/// An ext_authz check for alice with `dims` extra dimensions of `len`-byte values.
fn check_with_dims(
    dims: usize,
    len: usize,
) -> tonic::Request<envoy_types::ext_authz::v3::pb::CheckRequest> {
    let mut r = common::ext_authz::check("alice", 1);
    if let Some(a) = r.get_mut().attributes.as_mut() {
        for i in 0..dims {
            a.context_extensions
                .insert(format!("tollgate.dim.d{i}"), "v".repeat(len));
        }
    }
    r
}

/// A watcher that never reads, and requests with huge dimension maps: the requests over the
/// bounds are refused and count nothing, and memory stays bounded (events keep only the
/// dimensions the model declares; the stream's buffers are bounded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_watcher_and_huge_dimension_maps_cannot_grow_memory() {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use tollgate::grpc::TollgateClient;

    let text = common::service::config_with(LOOPBACK_PORT_0)
        .replace("limit: 1000, period: P1D", "limit: 1000000000, period: P1D");
    let sidecar = Sidecar::start(&text).unwrap();
    let pid = sidecar.proc.pid().unwrap();
    let mut watch_client = TollgateClient::connect(format!("http://{}", sidecar.grpc))
        .await
        .unwrap();
    let mut watch = tonic::Request::new(tollgate_proto::v1::WatchUsageRequest::default());
    watch.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", common::service::OPERATOR)
            .parse()
            .unwrap(),
    );
    // Opened and never polled again: a stuck watcher.
    let _stuck = watch_client.watch_usage(watch).await.unwrap().into_inner();

    let mut c = AuthorizationClient::connect(format!("http://{}", sidecar.ext_authz))
        .await
        .unwrap()
        .max_encoding_message_size(64 * 1024 * 1024);
    // Warm up, then measure.
    for _ in 0..200 {
        c.check(check_with_dims(31, 250)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(pid);

    // 100,000 dimensions: over the gRPC message bound, refused before any decision.
    let err = c.check(check_with_dims(100_000, 20)).await.unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{err:?}"
    );
    // 10,000 small dimensions (a 300 KB message): refused as bad input, nothing counted.
    let http = reqwest::Client::new();
    let counted = |v: serde_json::Value| v["chain"][0]["currentUsage"].as_u64().unwrap();
    let used = counted(org_usage(&sidecar, &http, 0).await);
    for _ in 0..20 {
        let r = c
            .check(check_with_dims(10_000, 20))
            .await
            .unwrap()
            .into_inner();
        let denied = format!("{:?}", r.http_response);
        assert!(
            denied.contains("10001 dimensions in one request; at most 32"),
            "{denied}"
        );
    }
    // 33 dimensions, or 32 whose values add up past 8 KiB: refused too.
    let r = c.check(check_with_dims(32, 10)).await.unwrap().into_inner();
    assert!(format!("{:?}", r.http_response).contains("33 dimensions"));
    let r = c
        .check(check_with_dims(31, 300))
        .await
        .unwrap()
        .into_inner();
    assert!(format!("{:?}", r.http_response).contains("at most 8192"));
    assert_eq!(counted(org_usage(&sidecar, &http, 0).await), used);

    // 3,000 granted checks carrying as much as the bounds allow, with the watcher stuck.
    for _ in 0..3_000 {
        let r = c
            .check(check_with_dims(31, 250))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status.unwrap().code, 0);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_bytes(pid);
    let grown = after.saturating_sub(before);
    eprintln!(
        "sidecar RSS {} MiB before, {} MiB after 3,000 checks with a stuck watcher (+{} KiB)",
        before >> 20,
        after >> 20,
        grown >> 10
    );
    // Measured: about 1 MiB; with whole dimension maps in the events, 35 MiB.
    assert!(grown < 16 << 20, "memory grew by {} MiB", grown >> 20);
}
