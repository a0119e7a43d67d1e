//! Listener bounds through real Envoy: a sidecar with 128 file descriptors, flooded with idle
//! and half-sent connections on its HTTP and gRPC listeners, still answers Envoy's checks on
//! its ext_authz listener, and closes what it keeps once its timeouts pass.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{INITECH, chat_body};
use tollgate_testkit::{Envoy, MockLlm, Sidecar, envoy_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_idle_connections_cannot_starve_envoys_checks() {
    let config = support::sidecar_with(
        "  connections: { idleTimeout: PT4S, authTimeout: PT2S, headerTimeout: PT2S }",
    );
    let sidecar = Sidecar::start_with_fd_limit(&config, 128).unwrap();
    // 300 connections to the HTTP listener (250 idle, 50 stopped half-way through a request's
    // headers) and 250 idle ones to the gRPC listener: more than the process has descriptors.
    let mut held = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(&sidecar.http).unwrap();
        if i % 6 == 0 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\nX-Slow: ")
                .unwrap();
        }
        held.push(s);
    }
    for _ in 0..250 {
        held.push(TcpStream::connect(&sidecar.grpc).unwrap());
    }
    // Envoy connects to the ext_authz listener in the middle of the flood.
    let mock = MockLlm::start().unwrap();
    let envoy = Envoy::start(
        &envoy_config(
            "wasm-filter.yaml",
            sidecar.ext_authz_port().unwrap(),
            mock.port().unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for i in 0..10 {
        let r = http
            .post(format!("{}/v1/chat/completions", envoy.url))
            .header("authorization", INITECH.as_str())
            .header("x-team-id", "ops")
            .header("content-type", "application/json")
            .body(chat_body(1, 5).to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        assert_eq!(status, 200, "request {i} during the flood: {text}");
    }
    assert_eq!(envoy.filter_stat("granted").unwrap(), 10);
    assert_eq!(envoy.filter_stat("fail_closed").unwrap(), 0);

    // The connections the sidecar kept are closed once their timeouts pass: every held
    // connection reads end-of-stream (or a reset) within a bounded time.
    let deadline = Instant::now() + Duration::from_secs(20);
    for (i, s) in held.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "connection {i} is still open after 20 s");
        s.set_read_timeout(Some(left)).unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                // A 408 or an HTTP/2 GOAWAY may come first; read on to the end.
                Ok(_) => continue,
            }
        }
    }
    drop(held);
    // And the listeners counted what they refused and closed.
    let metrics = sidecar.metrics().await.unwrap();
    let value = |listener: &str, reason: &str| {
        metrics.sum(
            "tollgate_connections_closed_total",
            &[("listener", listener), ("reason", reason)],
        )
    };
    assert!(value("http", "full") > 0.0, "{metrics}");
    assert!(value("grpc", "full") > 0.0, "{metrics}");
    assert!(value("grpc", "unauthenticated") > 0.0, "{metrics}");
}
