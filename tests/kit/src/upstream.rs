//! Stand-ins for what the sidecar and Envoy talk to: the mock OpenAI-compatible upstream (a
//! process), an ext_authz server that answers wrongly, and a socket that never answers.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use crate::proc::{Proc, field, port_of, ready_line, workspace_bin};

/// The mock OpenAI-compatible upstream.
#[derive(Debug)]
pub struct MockLlm {
    pub proc: Proc,
    pub addr: String,
}

impl MockLlm {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// Starts it with more command-line arguments (`--tls-cert`, `--require-key`, …).
    pub fn start_with(args: &[&str]) -> anyhow::Result<Self> {
        let bin = workspace_bin("tollgate-mock-llm", "TOLLGATE_MOCK_BIN")?;
        let mut child = Command::new(&bin)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let line = ready_line(&mut child, "the mock upstream", Duration::from_secs(30))?;
        Ok(Self {
            addr: field(&line, "addr")?,
            proc: Proc::new(child, "mock upstream"),
        })
    }

    pub fn port(&self) -> anyhow::Result<u16> {
        port_of(&self.addr)
    }
}

/// A loopback socket that accepts connections and never answers: a hung sidecar. Returns its
/// port; it holds up to 64 connections open for as long as the process runs.
pub fn hung_listener() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a hung listener")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming().take(64).flatten() {
            held.push(c);
        }
        // Keep them open until the process ends.
        std::thread::park();
        drop(held);
    });
    Ok(port)
}

/// What a [`fake_authz`] server answers to every ext_authz `Check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeAnswer {
    /// gRPC status OK with a body that is not a `CheckResponse`.
    Garbage,
    /// gRPC status 13 (INTERNAL), no body.
    Internal,
}

#[derive(Debug, Clone, Copy)]
struct Fake(FakeAnswer);

impl tonic::server::NamedService for Fake {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

impl tower::Service<axum::http::Request<tonic::body::Body>> for Fake {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: axum::http::Request<tonic::body::Body>) -> Self::Future {
        use axum::body::Bytes;
        use http_body::Frame;
        let mut trailers = axum::http::HeaderMap::new();
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = match self.0 {
            FakeAnswer::Garbage => {
                trailers.insert("grpc-status", axum::http::HeaderValue::from_static("0"));
                // A gRPC frame (uncompressed, 2 bytes) whose payload is no protobuf message.
                vec![
                    Ok(Frame::data(Bytes::from_static(&[
                        0, 0, 0, 0, 2, 0xff, 0xff,
                    ]))),
                    Ok(Frame::trailers(trailers)),
                ]
            }
            FakeAnswer::Internal => {
                trailers.insert("grpc-status", axum::http::HeaderValue::from_static("13"));
                trailers.insert(
                    "grpc-message",
                    axum::http::HeaderValue::from_static("fake failure"),
                );
                vec![Ok(Frame::trailers(trailers))]
            }
        };
        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
        let response = axum::http::Response::builder()
            .status(200)
            .header("content-type", "application/grpc")
            .body(axum::body::Body::new(body))
            .unwrap_or_default();
        std::future::ready(Ok(response))
    }
}

/// An ext_authz gRPC server on a free loopback port that answers every `Check` as `answer`
/// says: a sidecar gone wrong. Runs until the test's runtime ends; returns the port.
pub async fn fake_authz(answer: FakeAnswer) -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind the fake ext_authz server")?;
    let port = listener.local_addr()?.port();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Fake(answer))
            .serve_with_incoming(incoming),
    );
    Ok(port)
}
