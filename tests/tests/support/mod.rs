//! Shared set-up for the end-to-end tests: the sidecar config, the process trio, requests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tollgate_testkit::{Envoy, Metrics, MockLlm, Sidecar, envoy_config, gateway_token_config};

pub const OPERATOR: &str = "demo-operator-token";
pub const RESEARCH_CAP: u64 = 300;
pub const GLOBEX_CAP: u64 = 2000;

/// acme: org → research/sales → users; globex: one org cap raced by agents; initech: roomy.
const SIDECAR_TEMPLATE: &str = r#"
holdTtl: PT5M
{{TYPES}}attribution:
  - dimension: userId
    entityType: user
  - dimension: teamId
    entityType: team
features:
  - id: ai-tokens
customers:
  - id: acme
    entities:
      - { id: acme, type: organization }
      - { id: research, type: team, parent: acme }
      - { id: sales, type: team, parent: acme }
      - { id: alice, type: user, parent: research }
      - { id: carol, type: user, parent: research }
      - { id: bob, type: user, parent: sales }
    limits:
      - { id: org-daily, entity: acme, feature: ai-tokens, kind: quota, limit: 1000000, period: P1D }
      - { id: research-daily, entity: research, feature: ai-tokens, kind: quota, limit: 300, period: P1D }
      - { id: user-daily, entityType: user, feature: ai-tokens, kind: quota, limit: 10000, period: P1D }
  - id: globex
    entities:
      - { id: globex, type: organization }
      - { id: labs, type: team, parent: globex }
    limits:
      - { id: globex-daily, entity: globex, feature: ai-tokens, kind: quota, limit: 2000, period: P1D }
  - id: initech
    entities:
      - { id: initech, type: organization }
      - { id: ops, type: team, parent: initech }
    limits:
      - { id: initech-daily, entity: initech, feature: ai-tokens, kind: quota, limit: 1000000, period: P1D }
server:
  listeners: { extAuthz: "127.0.0.1:0", grpc: "127.0.0.1:0", http: "127.0.0.1:0" }
  credentials:
    operatorTokenSha256: 61112491d046c3f6f8ab801f170d9b2d0c734a17ceff60dee92123fb507cfc3f
{{GATEWAY}}  extAuthz:
    customer: { jwtClaim: org }
    usage: { header: x-tollgate-usage }
    dimensions:
      userId: { jwtClaim: sub }
      teamId: { header: x-team-id }
  logging: { level: warn }
"#;

/// [`SIDECAR_TEMPLATE`] with the entity types and the gateway token Envoy presents.
pub static SIDECAR: LazyLock<String> = LazyLock::new(|| {
    SIDECAR_TEMPLATE
        .replace("{{TYPES}}", tollgate_testkit::ORG_TEAM_USER)
        .replace("{{GATEWAY}}", &gateway_token_config())
});

/// [`SIDECAR`] with `lines` added to its `server` section (each indented two spaces, for
/// example `  storage: { kind: redis, url: ... }`).
pub fn sidecar_with(lines: &str) -> String {
    const LAST: &str = "  logging: { level: warn }";
    assert!(SIDECAR.contains(LAST), "the sidecar config changed shape");
    SIDECAR.replace(LAST, &format!("{LAST}\n{lines}"))
}

/// A caller of `customer` (claim `org`), as user `sub` if given: `Bearer <signed JWT>`.
pub fn caller(customer: &str, sub: Option<&str>) -> String {
    let claims = match sub {
        Some(s) => json!({ "sub": s }),
        None => json!({}),
    };
    tollgate_testkit::bearer_for(customer, claims)
}

pub static INITECH: LazyLock<String> = LazyLock::new(|| caller("initech", None));
pub static GLOBEX: LazyLock<String> = LazyLock::new(|| caller("globex", None));

/// The sidecar, the mock upstream and Envoy on `envoy/<file>`.
pub struct Stack {
    pub sidecar: Sidecar,
    pub mock: MockLlm,
    pub envoy: Envoy,
    pub http: reqwest::Client,
}

impl Stack {
    pub fn start(file: &str) -> Self {
        Self::start_with(file, |c| c)
    }

    /// Starts with the rendered Envoy config changed by `edit`.
    pub fn start_with(file: &str, edit: impl FnOnce(String) -> String) -> Self {
        Self::start_full(file, &SIDECAR, edit)
    }

    /// Starts with the sidecar's config `sidecar` (for example [`SIDECAR`] on another store).
    pub fn start_full(file: &str, sidecar: &str, edit: impl FnOnce(String) -> String) -> Self {
        Self::start_built(sidecar, |sidecar_port, upstream_port| {
            edit(envoy_config(file, sidecar_port, upstream_port).unwrap())
        })
    }

    /// Starts Envoy on the config `build` makes from the sidecar's ext_authz port and the
    /// mock upstream's port.
    pub fn start_built(sidecar: &str, build: impl FnOnce(u16, u16) -> String) -> Self {
        let sidecar = Sidecar::start(sidecar).unwrap();
        let mock = MockLlm::start().unwrap();
        let config = build(sidecar.ext_authz_port().unwrap(), mock.port().unwrap());
        let envoy = Envoy::start(&config).unwrap();
        Self::from_parts(sidecar, mock, envoy)
    }

    /// A stack of processes started by the caller.
    pub fn from_parts(sidecar: Sidecar, mock: MockLlm, envoy: Envoy) -> Self {
        Self {
            sidecar,
            mock,
            envoy,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    /// A stack whose sidecar keeps its counters in a durable file and listens on a fixed
    /// port, so it can be killed and started again on the same port and store (from the
    /// returned config file), and whose `/open/` route fails `bounded` with `allowance` units
    /// per minute. The folder holds the config and the store.
    pub fn bounded(allowance: u64) -> (Self, std::path::PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let port = tollgate_testkit::free_port();
        let text =
            sidecar_with("  storage: { kind: durable, path: counters.redb, durability: sync }")
                .replace(
                    "extAuthz: \"127.0.0.1:0\"",
                    &format!("extAuthz: \"127.0.0.1:{port}\""),
                );
        assert!(text.contains(&format!("127.0.0.1:{port}")) && text.contains("durable"));
        let path = dir.path().join("tollgate.yaml");
        std::fs::write(&path, &text).unwrap();
        let sidecar = Sidecar::start_at(&path).unwrap();
        let mock = MockLlm::start().unwrap();
        let config = envoy_config("wasm-filter.yaml", port, mock.port().unwrap())
            .unwrap()
            .replace(
                "tollgate: { failMode: open }",
                &format!("tollgate: {{ failMode: bounded, boundedPerMinute: {allowance} }}"),
            );
        assert!(config.contains("failMode: bounded"));
        let envoy = Envoy::start(&config).unwrap();
        (Self::from_parts(sidecar, mock, envoy), path, dir)
    }

    /// Kills the sidecar (SIGKILL) and, the bounded allowance being per minute, waits if
    /// needed so that what follows starts well inside one.
    pub async fn kill_sidecar_early_in_a_minute(&mut self) {
        self.sidecar.proc.signal("KILL").unwrap();
        self.sidecar.proc.kill();
        let in_minute = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            % 60;
        if in_minute > 40 {
            tokio::time::sleep(Duration::from_secs(61 - in_minute)).await;
        }
    }

    /// A chat completion through Envoy.
    pub async fn chat(&self, path: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
        let mut req = self
            .http
            .post(format!("{}{path}", self.envoy.url))
            .header("content-type", "application/json")
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Reply::from(req.send().await.unwrap()).await
    }

    /// The sidecar's HTTP API answer to `path` (a GET, or a POST of `body`) as the operator.
    pub async fn operator_api(&self, path: &str, body: Option<Value>) -> Value {
        let url = format!("http://{}{path}", self.sidecar.http);
        let req = match body {
            Some(b) => self.http.post(url).json(&b),
            None => self.http.get(url),
        };
        req.bearer_auth(OPERATOR)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// A limit's current usage, by a dry-run check that holds nothing.
    pub async fn usage(&self, customer: &str, dims: Value, limit_id: &str) -> u64 {
        let v = self
            .operator_api(
                &format!("/v1/customers/{customer}/entitlements/check"),
                Some(json!({"featureId": "ai-tokens", "requestedUsage": 0, "dimensions": dims, "dryRun": true})),
            )
            .await;
        v["chain"]
            .as_array()
            .unwrap_or_else(|| panic!("no chain in {v}"))
            .iter()
            .find(|e| e["limitId"] == limit_id)
            .unwrap_or_else(|| panic!("no {limit_id} in {v}"))["currentUsage"]
            .as_u64()
            .unwrap()
    }

    /// Waits (bounded) until the limit's usage is `want`; settles arrive shortly after responses.
    pub async fn usage_settles_at(&self, customer: &str, dims: Value, limit_id: &str, want: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.usage(customer, dims.clone(), limit_id).await;
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{limit_id} usage is {got}, expected {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) until no hold is open: the last ones settled, released or expired.
    pub async fn holds_closed(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let open = self.sidecar_metrics().await.get("tollgate_holds_open", &[]);
            if open == Some(0.0) {
                return;
            }
            assert!(Instant::now() < deadline, "{open:?} holds still open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The sidecar's `/metrics` page.
    pub async fn sidecar_metrics(&self) -> Metrics {
        self.sidecar.metrics().await.unwrap()
    }

    /// The sidecar's decision counters, summed over outcomes.
    /// Decisions Envoy asked for (ext_authz `Check`s), not the tests' own dry runs.
    pub async fn sidecar_decisions(&self) -> u64 {
        self.sidecar_metrics()
            .await
            .sum("tollgate_decisions_total", &[("api", "ext_authz")]) as u64
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    async fn from(r: reqwest::Response) -> Self {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap_or_default();
        Self {
            status,
            headers,
            text,
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Tollgate's own fields of an answer the filter wrote: under `error.tollgate` in an
    /// OpenAI-shaped error, `tollgate` in an Anthropic one, or the body itself.
    pub fn tollgate(&self) -> Value {
        let v = self.json();
        if v["error"]["tollgate"].is_object() {
            return v["error"]["tollgate"].clone();
        }
        if v["tollgate"].is_object() {
            return v["tollgate"].clone();
        }
        v
    }

    /// `usage.total_tokens` of a JSON completion.
    pub fn total_tokens(&self) -> u64 {
        self.json()["usage"]["total_tokens"].as_u64().unwrap()
    }
}

/// A chat body: `words` words of prompt, `max_tokens`.
pub fn chat_body(words: usize, max_tokens: u64) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": vec!["word"; words].join(" ")}],
    })
}

/// The usage the mock reports for [`chat_body`].
pub fn true_usage(words: usize, max_tokens: u64) -> u64 {
    words.max(1) as u64 + max_tokens.min(24)
}

/// What the `openai-chat` preset holds for `body`: its output budget plus its size in tokens
/// (4 bytes each, rounded up).
pub fn hold_for(body: &Value) -> u64 {
    let budget = body["max_completion_tokens"]
        .as_u64()
        .or(body["max_tokens"].as_u64())
        .unwrap_or(4096);
    budget * body["n"].as_u64().unwrap_or(1) + (body.to_string().len() as u64).div_ceil(4)
}

/// Runs `scenario` of the official SDKs' client (`tests/sdk/client.py`) against `s`'s Envoy as
/// `bearer` (`Bearer <jwt>`), with `extra` arguments, bounded by `timeout`: what it printed.
pub async fn run_sdk(
    s: &Stack,
    bearer: &str,
    scenario: &'static str,
    extra: &[&str],
    timeout: Duration,
) -> Value {
    let (url, token) = (
        s.envoy.url.clone(),
        bearer.trim_start_matches("Bearer ").to_string(),
    );
    let extra: Vec<String> = extra.iter().map(ToString::to_string).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = extra.iter().map(String::as_str).collect();
        tollgate_tests::sdk::sdk(&url, &token, scenario, &args, timeout)
    })
    .await
    .unwrap()
    .unwrap()
}

/// initech's daily counter for team `ops`.
pub async fn initech_ops(s: &Stack) -> u64 {
    s.usage("initech", json!({"teamId": "ops"}), "initech-daily")
        .await
}
