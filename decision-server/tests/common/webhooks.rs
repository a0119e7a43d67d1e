//! A webhook receiver for the alert tests, and the secret they sign with.

use std::sync::Arc;

use axum::http::StatusCode;

/// The Standard Webhooks libraries' test secret.
pub const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A webhook receiver on loopback: answers 500 to the first `fail_first` calls, then 200, and
/// keeps every call's headers and body.
pub struct Receiver {
    pub url: String,
    calls: Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, String)>>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// On `port` (0: any free one).
    pub async fn start(fail_first: usize, port: u16) -> Self {
        let calls: Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, String)>>> = Arc::default();
        let seen = Arc::clone(&calls);
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let seen = Arc::clone(&seen);
                async move {
                    let mut calls = seen.lock().unwrap();
                    calls.push((headers, body));
                    if calls.len() <= fail_first {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::NO_CONTENT
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url,
            calls,
            _task: task,
        }
    }

    pub fn calls(&self) -> Vec<(axum::http::HeaderMap, String)> {
        self.calls.lock().unwrap().clone()
    }
}
