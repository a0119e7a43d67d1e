//! The demo: real Envoy with Tollgate's WASM filter, the sidecar on the example config and a
//! mock OpenAI upstream, all on loopback ports the OS picks. It sends requests for two teams of
//! one customer until a team cap denies (and the budget alerts reach an ops webhook receiver,
//! signed), shows a hold settled down to the true usage and a stream held slice by slice and
//! cut when its team's budget runs out, where
//! the tokens went (the usage API the portal reads) and the portal's address (waiting for
//! Enter when it runs in a terminal, so the portal can be opened), then stops the sidecar and
//! shows a fail-closed and a fail-open request, and ends with the next step. Everything it
//! started is stopped on exit, on error and on Ctrl-C.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tollgate_testkit::{
    Envoy, MockLlm, Sidecar, bearer_for, envoy_config, gateway_token_config, root, with_streaming,
};

const OPERATOR: &str = "demo-operator-token";
/// DEMO ONLY: the secret the demo's alert webhook is signed with.
const WEBHOOK_SECRET: &str = "whsec_dG9sbGdhdGUtZGVtby13ZWJob29rLXNlY3JldCEhISE=";

struct Demo {
    sidecar: Sidecar,
    _mock: MockLlm,
    envoy: Envoy,
    hooks: Receiver,
    http: reqwest::Client,
}

/// A webhook receiver on loopback, as a team's ops endpoint: it keeps every call's headers and
/// body for the demo to show.
struct Receiver {
    url: String,
    calls: Arc<Mutex<Vec<(axum::http::HeaderMap, axum::body::Bytes)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hooks/tollgate", listener.local_addr()?);
        let calls: Arc<Mutex<Vec<_>>> = Arc::default();
        let kept = Arc::clone(&calls);
        let app = axum::Router::new().route(
            "/hooks/tollgate",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
                    if let Ok(mut calls) = kept.lock() {
                        calls.push((headers, body));
                    }
                    axum::http::StatusCode::NO_CONTENT
                },
            ),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, calls, task })
    }

    /// The calls received so far, each verified against the secret (Standard Webhooks).
    fn received(&self) -> Vec<(bool, Value)> {
        let verifier = standardwebhooks::Webhook::new(WEBHOOK_SECRET).ok();
        self.calls
            .lock()
            .map(|calls| {
                calls
                    .iter()
                    .map(|(headers, body)| {
                        let signed = verifier
                            .as_ref()
                            .is_some_and(|v| v.verify(body, headers).is_ok());
                        (signed, serde_json::from_slice(body).unwrap_or(Value::Null))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The example config with its listeners moved to free ports, the gateway token the demo's
/// Envoy presents, and an alert on research's budget (50 % and 80 %) sent to `hook`, a
/// receiver on loopback (which `alerting.allowTargets` lets in; webhooks never go to loopback
/// otherwise).
fn sidecar_config(hook: &str) -> anyhow::Result<String> {
    let path = root().join("decision-server/examples/gateway-demo.yaml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{} is not YAML", path.display()))?;
    let listeners = doc
        .get_mut("server")
        .and_then(|s| s.get_mut("listeners"))
        .context("the example config has no server.listeners")?;
    for name in ["extAuthz", "grpc", "http"] {
        listeners[name] = serde_yaml_ng::Value::from("127.0.0.1:0");
    }
    let gateway: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&format!("credentials:\n{}", gateway_token_config()))?;
    let credentials = doc
        .get_mut("server")
        .and_then(|s| s.get_mut("credentials"))
        .context("the example config has no server.credentials")?;
    credentials["gatewayTokens"] = gateway["credentials"]["gatewayTokens"].clone();
    let alerting: serde_yaml_ng::Value = serde_yaml_ng::from_str(&format!(
        "webhooks:\n  - {{ id: ops, url: \"{hook}\", secrets: [\"{WEBHOOK_SECRET}\"] }}\n\
         alerts:\n  - {{ id: research-budget, entity: research, limit: research-daily-tokens, percent: [50, 80], webhooks: [ops] }}\n\
         allowTargets: [127.0.0.1/32]\n"
    ))?;
    let acme = doc
        .get_mut("customers")
        .and_then(|c| c.get_mut(0))
        .context("the example config has no customer")?;
    acme["webhooks"] = alerting["webhooks"].clone();
    acme["alerts"] = alerting["alerts"].clone();
    doc["alerting"] = serde_yaml_ng::from_str("{}")?;
    doc["alerting"]["allowTargets"] = alerting["allowTargets"].clone();
    Ok(serde_yaml_ng::to_string(&doc)?)
}

/// A JWT for `sub` of acme, signed as the platform's identity provider would.
fn jwt(sub: &str) -> String {
    bearer_for("acme", json!({ "sub": sub }))
}

impl Demo {
    async fn start() -> anyhow::Result<Self> {
        let mock = MockLlm::start()?;
        println!("  mock OpenAI upstream     http://{}", mock.addr);
        let hooks = Receiver::start().await?;
        println!("  ops webhook receiver     {}", hooks.url);
        let sidecar = Sidecar::start(&sidecar_config(&hooks.url)?)?;
        println!(
            "  tollgate sidecar         ext_authz {}  http {}",
            sidecar.ext_authz, sidecar.http
        );
        // Pay as you stream on: a streamed call holds its prompt and 128 output tokens, then
        // 256 more at a time, asked for when fewer than 128 held ones are left.
        let envoy = Envoy::start(&with_streaming(
            &envoy_config("wasm-filter.yaml", sidecar.ext_authz_port()?, mock.port()?)?,
            r#"{ "mode": "extend", "firstSlice": 128, "slice": 256, "askAhead": 128 }"#,
        )?)?;
        println!(
            "  envoy + WASM filter      {}  (admin {})",
            envoy.url, envoy.admin
        );
        Ok(Self {
            sidecar,
            _mock: mock,
            envoy,
            hooks,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        })
    }

    async fn chat(
        &self,
        path: &str,
        team: &str,
        user: &str,
        max_tokens: u64,
        stream: bool,
    ) -> anyhow::Result<(u16, reqwest::header::HeaderMap, String)> {
        self.chat_with(path, team, user, max_tokens, stream, &[])
            .await
    }

    /// [`Demo::chat`] with more request headers (the mock upstream's `x-mock-*` knobs).
    async fn chat_with(
        &self,
        path: &str,
        team: &str,
        user: &str,
        max_tokens: u64,
        stream: bool,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<(u16, reqwest::header::HeaderMap, String)> {
        let mut body = json!({
            "model": "gpt-4o-mini",
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "Summarise the quarterly report in three bullet points"}],
        });
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        let mut req = self
            .http
            .post(format!("{}{path}", self.envoy.url))
            .header("content-type", "application/json")
            .header("x-team-id", team)
            .header("authorization", jwt(user));
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        if stream {
            // A long stream paced by the mock runs for seconds, more on a loaded machine.
            req = req.timeout(Duration::from_secs(60));
        }
        let r = req
            .body(body.to_string())
            .send()
            .await
            .context("the request through Envoy failed")?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        // A stream cut mid-way ends with a reset after its error event: what arrived counts.
        let mut text = Vec::new();
        let mut r = r;
        while let Ok(Some(chunk)) = r.chunk().await {
            text.extend_from_slice(&chunk);
        }
        Ok((status, headers, String::from_utf8_lossy(&text).into_owned()))
    }

    async fn team_usage(&self, team: &str, limit: &str) -> anyhow::Result<u64> {
        let v: Value = self
            .http
            .post(format!(
                "http://{}/v1/customers/acme/entitlements/check",
                self.sidecar.http
            ))
            .bearer_auth(OPERATOR)
            .json(&json!({"featureId": "ai-tokens", "requestedUsage": 0,
                "dimensions": {"teamId": team}, "dryRun": true}))
            .send()
            .await?
            .json()
            .await?;
        v["chain"]
            .as_array()
            .and_then(|c| c.iter().find(|e| e["limitId"] == limit))
            .and_then(|e| e["currentUsage"].as_u64())
            .with_context(|| format!("no {limit} in {v}"))
    }

    /// Waits for the settle the filter sends after a response.
    async fn usage_becomes(&self, team: &str, limit: &str, want: u64) -> anyhow::Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = self.team_usage(team, limit).await?;
            if got == want || Instant::now() > deadline {
                return Ok(got);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// acme's usage today by record key `by` (`teamId`, `cutBy`...), as the portal reads it.
    async fn usage_top(&self, by: &str) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!(
                "http://{}/v1/customers/acme/usage/top?by={by}",
                self.sidecar.http
            ))
            .bearer_auth(OPERATOR)
            .send()
            .await?
            .json()
            .await?)
    }

    /// A stream longer than what sales has left: extended slice by slice while it runs, then
    /// cut in OpenAI's streaming error shape when a slice is refused; charged what it
    /// delivered, and its usage record says it was cut and by which limit.
    async fn cut_stream(&self) -> anyhow::Result<()> {
        let before = self.team_usage("sales", "sales-daily-tokens").await?;
        println!(
            "\n   A long stream for sales (max_tokens 8,000; the model would write 6,000 tokens) with\n   {} of its 5,000 left:",
            5_000u64.saturating_sub(before)
        );
        let (status, _, text) = self
            .chat_with(
                "/v1/chat/completions",
                "sales",
                "bob",
                8_000,
                true,
                &[("x-mock-output-tokens", "6000"), ("x-mock-pace-ms", "1")],
            )
            .await?;
        if status != 200 {
            bail!("the long stream was not admitted ({status}): {text}");
        }
        let delivered = text.matches("tok ").count();
        let error = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find_map(|v| v["error"]["message"].as_str().map(str::to_string))
            .context("the stream was not ended with an error event")?;
        println!(
            "   admitted on its first slice, extended {} times while it ran, cut after {delivered} tokens:",
            self.envoy.filter_stat("stream_extended").unwrap_or(0)
        );
        println!("   data: {{\"error\": {{\"message\": \"{error}\", ...}}}}  then data: [DONE]");
        let deadline = Instant::now() + Duration::from_secs(5);
        let cut_by = loop {
            let v = self.usage_top("cutBy").await?;
            let row = v["rows"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["value"].is_string()))
                .cloned();
            match row {
                Some(row) => break row,
                None if Instant::now() > deadline => bail!("no record of the cut: {v}"),
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let after = self.team_usage("sales", "sales-daily-tokens").await?;
        println!(
            "   sales counter now {after} (+{}); its usage record: cutBy {} ({} tokens)",
            after.saturating_sub(before),
            cut_by["value"].as_str().unwrap_or("?"),
            cut_by["units"]
        );
        Ok(())
    }

    /// The alerts research's spending set off, as the ops receiver got them: signed, once
    /// each.
    async fn alerts(&self) -> anyhow::Result<()> {
        println!("\n   The ops team's webhook receiver got research's budget alerts, signed:");
        let deadline = Instant::now() + Duration::from_secs(10);
        let received = loop {
            let received = self.hooks.received();
            if received.len() >= 2 || Instant::now() > deadline {
                break received;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if received.is_empty() {
            bail!("no alert reached the webhook receiver");
        }
        for (signed, body) in &received {
            let d = &body["data"];
            println!(
                "   {} {}% of {}: {} of {} used  (signature {})",
                body["type"].as_str().unwrap_or("?"),
                d["trigger"]["percent"],
                d["limitId"].as_str().unwrap_or("?"),
                d["used"],
                d["limit"],
                if *signed { "verified" } else { "INVALID" }
            );
            if !signed {
                bail!("an alert's signature did not verify");
            }
        }
        Ok(())
    }

    /// Step 3: the usage by team and user, as the portal shows it, and the portal's address.
    async fn history(&self) -> anyhow::Result<()> {
        println!(
            "\n3. Where the tokens went: the usage API the portal reads, by team and by user."
        );
        for by in ["teamId", "userId"] {
            let v = self.usage_top(by).await?;
            for row in v["rows"].as_array().context("no usage rows")? {
                println!(
                    "   {by:<7} {:<9} {:>5} tokens in {:>2} calls, {} denied",
                    row["value"].as_str().unwrap_or("?"),
                    row["units"],
                    row["requests"],
                    row["denied"]
                );
            }
        }
        println!(
            "   The portal: http://{}/portal/  (sign in with the operator token `{OPERATOR}`)",
            self.sidecar.http
        );
        // In a terminal, a pause to look; piped (a test, CI), straight on.
        if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            println!(
                "   Press Enter to go on: the next step kills the sidecar, and the portal with it."
            );
            let mut line = String::new();
            tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut line)).await??;
        }
        Ok(())
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        println!(
            "\n1. Two teams of acme spend tokens; research's daily cap is 400, sales' is 5,000."
        );
        println!(
            "   Each call holds its max_tokens (120) plus its prompt's size in tokens, and settles\n   to what the model reported.\n"
        );
        let (mut research, mut sales) = (0, 0);
        let mut denied = false;
        // Bounded: stop one sales call after research's first denial, or after 30 calls.
        for i in 1..=30 {
            if denied && i % 3 != 0 {
                continue;
            }
            let (team, user, limit) = if i % 3 == 0 {
                ("sales", "bob", "sales-daily-tokens")
            } else {
                ("research", "alice", "research-daily-tokens")
            };
            let (status, headers, text) = self
                .chat("/v1/chat/completions", team, user, 120, false)
                .await?;
            if status == 200 {
                let used = serde_json::from_str::<Value>(&text)?["usage"]["total_tokens"]
                    .as_u64()
                    .unwrap_or(0);
                let remaining = headers
                    .get("ratelimit-remaining")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?");
                let spent = if team == "research" {
                    &mut research
                } else {
                    &mut sales
                };
                *spent += used;
                self.usage_becomes(team, limit, *spent).await?;
                println!(
                    "   #{i:<2} {team:<8} {user:<6} GRANTED  used {used:>3} tokens   remaining after hold {remaining:>5}"
                );
                if denied {
                    println!("        (sales is under its own cap: still granted)");
                    break;
                }
            } else if status == 429 {
                // OpenAI's error shape, as the SDKs show it; Tollgate's fields ride along.
                let body: Value = serde_json::from_str(&text)?;
                let details = &body["error"]["tollgate"];
                println!(
                    "   #{i:<2} {team:<8} {user:<6} DENIED   {status}: {}",
                    body["error"]["message"].as_str().unwrap_or(&text)
                );
                println!(
                    "        retry-after {}s, blocked at level {} ({} `{}`)",
                    headers
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("?"),
                    details["level"],
                    details["entityType"].as_str().unwrap_or("?"),
                    details["entityId"].as_str().unwrap_or("?")
                );
                denied = true;
            } else {
                bail!("unexpected status {status}: {text}");
            }
        }
        if !denied {
            bail!("the research cap never denied");
        }
        self.alerts().await?;

        println!(
            "\n2. A settled hold: a streamed call for sales (max_tokens 500) holds its prompt and a\n   first slice of 128 tokens, asks for more while it runs, then settles."
        );
        let before = self.team_usage("sales", "sales-daily-tokens").await?;
        let (status, _, text) = self
            .chat("/v1/chat/completions", "sales", "bob", 500, true)
            .await?;
        if status != 200 {
            bail!("the streamed call was not granted ({status}): {text}");
        }
        let reported = text
            .lines()
            .rev()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .find_map(|v| v["usage"]["total_tokens"].as_u64())
            .context("the stream carried no usage")?;
        let after = self
            .usage_becomes("sales", "sales-daily-tokens", before + reported)
            .await?;
        println!(
            "   sales counter before {before}, the call held its prompt and 128 tokens while it ran,"
        );
        println!(
            "   the stream's final chunk reported {reported} tokens: counter now {after} (+{})",
            after.saturating_sub(before)
        );
        if after != before + reported {
            bail!("the hold did not settle to the true usage");
        }
        self.cut_stream().await?;

        self.history().await?;

        println!("\n4. The sidecar stops (SIGKILL).");
        self.sidecar.proc.kill();
        let (status, _, text) = self
            .chat("/v1/chat/completions", "sales", "bob", 50, false)
            .await?;
        let reason = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| {
                v["error"]["tollgate"]["reason"]
                    .as_str()
                    .map(str::to_string)
            })
            .unwrap_or_default();
        println!("   fail-closed route /v1/...      -> {status} ({reason})");
        let (status, headers, _) = self
            .chat("/open/v1/chat/completions", "sales", "bob", 50, false)
            .await?;
        let mark = headers
            .get("x-echo-x-tollgate-unchecked")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        println!(
            "   fail-open route   /open/v1/... -> {status}, upstream saw x-tollgate-unchecked: {mark}"
        );
        for stat in ["granted", "denied", "settled", "fail_closed", "fail_open"] {
            println!(
                "   envoy stat {:<48} {}",
                format!("wasmcustom.tollgate_filter.{stat}_total"),
                self.envoy.filter_stat(stat).unwrap_or(0)
            );
        }
        Ok(())
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    println!("Tollgate demo: starting processes on loopback");
    let mut demo = Demo::start().await?;
    let outcome = tokio::select! {
        r = demo.run() => r,
        _ = tokio::signal::ctrl_c() => {
            println!("\ninterrupted");
            Ok(())
        }
    };
    drop(demo);
    println!("\nstopped Envoy, the sidecar and the mock upstream");
    if outcome.is_ok() {
        println!(
            "\nNext: README.md, \"Your first governed call\": the same by hand, with your own keys,\n\
             leaving the sidecar, its portal and Envoy running; envoy/README.md, \"A real provider\",\n\
             to put a real OpenAI or Anthropic key behind it."
        );
    }
    outcome
}
