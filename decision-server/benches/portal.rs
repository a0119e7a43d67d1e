//! The portal's server time for a customer with 100,000 users and 30 days of history: the
//! overview (its page, a team's page of users with their bars, a search over every entity, the
//! bars' refresh) and the usage explorer's data (30 days by team, top users). Requests go
//! through the real router with a session cookie, in process, on the in-memory store.
//! Run: `cargo bench -p tollgate --bench portal` (`make bench-portal`).
//!
//! - `USERS` (100000) in `TEAMS` (100) teams; `DAYS` (30) of history, one settled call per
//!   team every hour, each by the next user of the team, on one of two priced models with its
//!   token split (so the first screen's spend prices every bucket).
//! - `RUNS` (50): timed runs of each request, after three untimed ones.
//! - `REDIS_URL`: run on that Redis instead of the in-memory store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // benchmark harness code

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use hdrhistogram::Histogram;
use http_body_util::BodyExt;
use tollgate::clock::ManualClock;
use tollgate::core::Timestamp;
use tollgate::core::usage::Usage;
use tollgate::service::Service;
use tollgate::{CheckRequest, Engine};
use tower::ServiceExt;

const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;
/// The end of the history: the clock stands here for the requests.
const END_MS: i64 = 1_780_000_000_000;
const OPERATOR: &str = "bench-operator";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(teams: usize, users: usize, storage: &str) -> String {
    let mut s = String::from(
        "entityTypes:\n  - name: organization\n  - name: team\n    parents: [organization]\n  - name: user\n    parents: [team]\n\
         attribution:\n  - { dimension: userId, entityType: user, onUnknown: reject }\n\
         features:\n  - id: ai-tokens\n\
         usageRecords: { maxValuesPerDimension: 200000, dimensions: [model] }\n\
         prices:\n  - version: v1\n    effectiveFrom: 2020-01-01T00:00:00Z\n    models:\n\
         \x20     - { match: \"gpt-4*\", inputPerMillion: 2500, outputPerMillion: 10000 }\n\
         \x20     - { match: \"claude*\", inputPerMillion: 3000, outputPerMillion: 15000 }\n\
         currency: { code: USD, perCredit: 0.01 }\n\
         customers:\n  - id: c0\n    entities:\n      - { id: c0, type: organization }\n",
    );
    for t in 0..teams {
        s.push_str(&format!(
            "      - {{ id: team-{t:03}, type: team, parent: c0 }}\n"
        ));
    }
    for u in 0..users {
        s.push_str(&format!(
            "      - {{ id: user-{u:06}, type: user, parent: team-{:03} }}\n",
            u % teams
        ));
    }
    s.push_str(
        "    limits:\n\
         \x20     - { id: org-monthly, entity: c0, feature: ai-tokens, kind: quota, limit: 1000000000000, period: P1M }\n\
         \x20     - { id: team-daily, entityType: team, feature: ai-tokens, kind: quota, limit: 100000000, period: P1D }\n\
         \x20     - { id: user-daily, entityType: user, feature: ai-tokens, kind: quota, limit: 1000000, period: P1D }\n",
    );
    s.push_str(&format!(
        "server:\n  storage: {storage}\n  credentials:\n    operatorTokenSha256: {}\n",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(OPERATOR.as_bytes()))
    ));
    s
}

async fn get(router: &axum::Router, cookie: &str, uri: &str) -> usize {
    let req = Request::builder()
        .uri(uri)
        .header("cookie", cookie)
        .body(Body::empty())
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    assert!(resp.status().is_success(), "{uri}: {}", resp.status());
    resp.into_body().collect().await.unwrap().to_bytes().len()
}

async fn main_async() {
    let (teams, users, days, runs) = (
        env("TEAMS", 100),
        env("USERS", 100_000),
        env("DAYS", 30),
        env("RUNS", 50),
    );
    let t0 = Instant::now();
    let storage = match std::env::var("REDIS_URL") {
        Ok(url) => format!("{{ kind: redis, url: \"{url}\" }}"),
        Err(_) => "{ kind: memory }".to_string(),
    };
    println!("# storage: {storage}");
    let loaded =
        tollgate::config::load(&config(teams, users, &storage), "portal-bench.yaml").unwrap();
    let store = tollgate::server::open_store(&loaded.server.storage)
        .await
        .unwrap();
    let start = END_MS - days as i64 * DAY_MS;
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(start)));
    let engine = Engine::new(loaded.model, store, clock.clone())
        .await
        .unwrap();
    println!(
        "# {users} users in {teams} teams; model built in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // History: every hour, one settled call per team, each by the team's next user.
    let t0 = Instant::now();
    let mut calls = 0usize;
    let mut next_user = vec![0usize; teams];
    let mut at = start;
    while at < END_MS {
        clock.set(Timestamp::from_millis(at));
        for (t, n) in next_user.iter_mut().enumerate() {
            let user = t + (*n % (users / teams)) * teams;
            *n += 1;
            let model = if calls.is_multiple_of(3) {
                "claude-3"
            } else {
                "gpt-4o"
            };
            let dims: HashMap<String, String> = [
                ("userId".to_string(), format!("user-{user:06}")),
                ("model".to_string(), model.to_string()),
            ]
            .into();
            let d = engine
                .check(&CheckRequest {
                    deadline: None,
                    customer: "c0",
                    feature: "ai-tokens",
                    usage: Usage::units(1000),
                    dimensions: &dims,
                    dry_run: false,
                    commit: false,
                })
                .await
                .unwrap();
            assert!(d.granted);
            let (input, output) = (60 + calls as u64 % 600, 40 + calls as u64 % 300);
            engine
                .settle(
                    d.hold_id.as_ref().unwrap(),
                    Usage {
                        units: input + output,
                        tokens: Some(tollgate::core::usage::TokenCounts {
                            input,
                            output,
                            ..Default::default()
                        }),
                    },
                )
                .await
                .unwrap();
            calls += 1;
        }
        at += HOUR_MS;
    }
    clock.set(Timestamp::from_millis(END_MS));
    println!(
        "# {days} days of history: {calls} settled calls in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    let service = Arc::new(Service::new(engine, loaded.doc, &loaded.server));
    let router = tollgate::http::router(Arc::clone(&service), 1 << 20);
    let (id, _) = service
        .sessions()
        .create(&service.token_check(), OPERATOR, END_MS)
        .unwrap();
    let cookie = format!("tollgate_session={id}");
    let from = chrono::DateTime::from_timestamp_millis(END_MS - days as i64 * DAY_MS)
        .unwrap()
        .to_rfc3339();
    let to = chrono::DateTime::from_timestamp_millis(END_MS)
        .unwrap()
        .to_rfc3339();
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let team = 42 % teams;
    let last_page = (users / teams).div_ceil(25).saturating_sub(1);
    let page_ids: Vec<String> = (0..25)
        .map(|i| format!("user-{:06}", team + i * teams))
        .collect();
    let requests = [
        ("overview page", "/portal/c/c0/".to_string()),
        (
            "overview: a team's first 25 users",
            format!("/portal/c/c0/tree?parent=team-{team:03}"),
        ),
        (
            "overview: a team's last page",
            format!("/portal/c/c0/tree?parent=team-{team:03}&page={last_page}"),
        ),
        (
            "overview: search all 100k entities",
            "/portal/c/c0/tree?q=user-0999".to_string(),
        ),
        (
            "overview: bars refresh (25 users)",
            format!("/portal/c/c0/budgets?ids={}", page_ids.join(",")),
        ),
        (
            "explorer: 30 days by team, daily",
            format!(
                "/v1/customers/c0/usage/history?from={}&to={}&windowSize=DAY&groupBy=teamId",
                enc(&from),
                enc(&to)
            ),
        ),
        (
            "explorer: top 10 users, 30 days",
            format!(
                "/v1/customers/c0/usage/top?by=userId&limit=10&from={}&to={}",
                enc(&from),
                enc(&to)
            ),
        ),
        (
            "first screen: spend by team, 30 days",
            "/v1/customers/c0/usage/spend?by=teamId&days=30&limit=10".to_string(),
        ),
        (
            "first screen: spend by team, 7 days",
            "/v1/customers/c0/usage/spend?by=teamId&days=7&limit=10".to_string(),
        ),
        (
            "first screen: spend by user, 7 days",
            "/v1/customers/c0/usage/spend?by=userId&days=7&limit=10".to_string(),
        ),
        (
            "first screen: spend by model, 24 hours",
            "/v1/customers/c0/usage/spend?by=model&days=1&limit=10".to_string(),
        ),
        (
            "explorer: CSV, 30 days by team",
            format!(
                "/portal/c/c0/usage.csv?from={}&to={}&windowSize=DAY&groupBy=teamId",
                enc(&from),
                enc(&to)
            ),
        ),
    ];
    for (label, uri) in &requests {
        for _ in 0..3 {
            get(&router, &cookie, uri).await;
        }
        let mut hist = Histogram::<u64>::new(3).unwrap();
        let mut bytes = 0;
        for _ in 0..runs {
            let t = Instant::now();
            bytes = get(&router, &cookie, uri).await;
            hist.record(t.elapsed().as_micros() as u64).unwrap();
        }
        println!(
            "{label:<40} {bytes:>9} B  p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  ({} runs)",
            hist.value_at_quantile(0.50) as f64 / 1000.0,
            hist.value_at_quantile(0.99) as f64 / 1000.0,
            hist.max() as f64 / 1000.0,
            hist.len()
        );
    }
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
        .block_on(main_async());
}
