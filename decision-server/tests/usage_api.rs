//! The usage attribution API in process: history grouped and filtered by every kind of key,
//! top spenders, an entity's budget state, the 400s that name their parameter, and tenancy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use common::service::{ACME_KEY, Api, Calls, GLOBEX_KEY, OPERATOR};

/// An open event stream, read frame by frame.
struct Sse {
    body: Body,
    text: String,
}

/// One server-sent event: its `event:`, `id:` and `data:` fields.
#[derive(Debug)]
struct Frame {
    event: String,
    id: Option<String>,
    data: String,
}

impl Sse {
    /// The next event (heartbeat comments are skipped), within 10 s.
    async fn next(&mut self) -> Frame {
        self.next_raw(true).await
    }

    async fn next_raw(&mut self, skip_comments: bool) -> Frame {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            while let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                let mut f = Frame {
                    event: "message".into(),
                    id: None,
                    data: String::new(),
                };
                let mut comment = true;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        f.event = v.trim().into();
                        comment = false;
                    } else if let Some(v) = line.strip_prefix("id:") {
                        f.id = Some(v.trim().into());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        f.data.push_str(v.trim_start());
                        comment = false;
                    } else if let Some(v) = line.strip_prefix(':') {
                        f.event = format!(":{}", v.trim());
                    }
                }
                if !(comment && skip_comments) {
                    return f;
                }
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .expect("an event within 10 s")
                .expect("the stream is open")
                .unwrap();
            if let Ok(bytes) = frame.into_data() {
                self.text.push_str(std::str::from_utf8(&bytes).unwrap());
            }
        }
    }
}

impl Api {
    /// The fixture, recording the `model` dimension too, and at most `max_points` per query.
    async fn new(max_points: usize) -> Self {
        Self::on(max_points, "{ kind: memory }").await
    }

    /// The fixture on the given `storage:` section.
    async fn on(max_points: usize, storage: &str) -> Self {
        Self::with(max_points, storage, "").await
    }

    /// As [`Api::on`], with `acme_extra` YAML (already indented) added to customer acme and
    /// `top` added at the top level.
    ///
    /// The service's clock starts at [`common::service::PINNED_START`] unless `acme_extra`
    /// declares webhooks: a receiver checks a delivery's signed timestamp against its own
    /// clock, so those run on the system clock.
    async fn with(max_points: usize, storage: &str, acme_extra: &str) -> Self {
        Self::edited(max_points, storage, acme_extra, |c| c).await
    }

    /// As [`Api::with`], with users created on first sight (under team ml unless a team is
    /// named).
    async fn creating_users(storage: &str, acme_extra: &str) -> Self {
        let extra = format!("    autoCreateParents:\n      user: ml\n{acme_extra}");
        Self::edited(10_000, storage, &extra, |c| {
            let from = "  - dimension: userId\n    entityType: user\n";
            assert!(c.contains(from), "the fixture attributes userId");
            c.replacen(
                from,
                "  - dimension: userId\n    entityType: user\n    onUnknown: create\n",
                1,
            )
        })
        .await
    }

    /// As [`Api::with`], with `edit` applied to the whole configuration.
    async fn edited(
        max_points: usize,
        storage: &str,
        acme_extra: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Self {
        let pinned = !acme_extra.contains("webhooks:");
        let day = if pinned {
            common::service::PINNED_DAY_ANCHOR.to_string()
        } else {
            common::service::daily_anchor()
        };
        let config = format!(
            "usageRecords:\n  dimensions: [model]\n  maxQueryPoints: {max_points}\nalerting: {{ retrySchedule: [PT1S], timeoutMs: 2000, allowTargets: [127.0.0.0/8] }}\n{}",
            common::service::config_with_anchor(
                &format!("  logging: {{ level: warn }}\n  storage: {storage}"),
                &day
            )
        );
        let config = edit(config.replacen(
            "  - id: globex\n",
            &format!("{acme_extra}  - id: globex\n"),
            1,
        ));
        let service = if pinned {
            common::service::service_from_pinned(&config).await
        } else {
            common::service::service_from(&config).await
        };
        Self::over(service)
    }

    /// Opens an event stream; the status, and the stream when it is 200.
    async fn open(
        &self,
        path: &str,
        token: &str,
        last_id: Option<&str>,
    ) -> (StatusCode, Option<Sse>, Value) {
        let mut req = Request::builder()
            .uri(path)
            .header("authorization", format!("Bearer {token}"));
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        let resp = self
            .router
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        if status != StatusCode::OK {
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            return (
                status,
                None,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            );
        }
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        (
            status,
            Some(Sse {
                body: resp.into_body(),
                text: String::new(),
            }),
            Value::Null,
        )
    }

    async fn read(&self, path: &str) -> (StatusCode, Value) {
        Calls::get(self, path, ACME_KEY).await
    }

    /// A check for `user` with `model`; settled at `settle` units, or released when `None`.
    /// Returns whether it was granted.
    async fn spend(&self, user: &str, model: &str, requested: u64, settle: Option<u64>) -> bool {
        let (status, d) = self
            .post(
                "/v1/customers/acme/entitlements/check",
                ACME_KEY,
                json!({"featureId": "ai-tokens", "requestedUsage": requested,
                    "dimensions": {"userId": user, "model": model}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{d}");
        let Some(hold) = d["holdId"].as_str() else {
            return false;
        };
        let (path, body) = match settle {
            Some(u) => (
                format!("/v1/holds/{hold}/settle"),
                Some(json!({"actualUsage": u})),
            ),
            None => (format!("/v1/holds/{hold}/release"), None),
        };
        let (status, r) = self.send(Method::POST, &path, Some(ACME_KEY), body).await;
        assert_eq!(status, StatusCode::OK, "{r}");
        true
    }

    /// The usage made by every test: alice (team ml) 80 on gpt-4o, bob (ml) 50 on claude,
    /// carol (web) a released call on gpt-4o and one denied by the org cap.
    async fn spend_fixture(&self) {
        assert!(self.spend("alice", "gpt-4o", 100, Some(80)).await);
        assert!(self.spend("bob", "claude", 60, Some(50)).await);
        assert!(self.spend("carol", "gpt-4o", 30, None).await);
        assert!(!self.spend("carol", "gpt-4o", 5000, Some(1)).await);
    }
}

/// Sums of one series' points: (units, requests, denied).
fn totals(series: &Value) -> (u64, u64, u64) {
    let mut t = (0, 0, 0);
    for p in series["points"].as_array().unwrap() {
        t.0 += p["units"].as_u64().unwrap();
        t.1 += p["requests"].as_u64().unwrap();
        t.2 += p["denied"].as_u64().unwrap();
    }
    t
}

/// The series whose `groupBy[key]` is `value`.
fn series<'a>(h: &'a Value, key: &str, value: Option<&str>) -> &'a Value {
    h["series"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["groupBy"][key].as_str() == value)
        .unwrap_or_else(|| panic!("no series with {key}={value:?} in {h}"))
}

#[tokio::test]
async fn history_attributes_every_unit_by_team_model_and_denying_limit() {
    let api = Api::new(10_000).await;
    api.spend_fixture().await;

    let (status, h) = api
        .read("/v1/customers/acme/usage/history?groupBy=teamId&windowSize=HOUR")
        .await;
    assert_eq!(status, StatusCode::OK, "{h}");
    assert_eq!(h["windowSize"], "HOUR");
    assert_eq!(h["series"].as_array().unwrap().len(), 2, "{h}");
    assert_eq!(totals(series(&h, "teamId", Some("ml"))), (130, 2, 0));
    // carol: one released call (a request, no units) and one denial.
    assert_eq!(totals(series(&h, "teamId", Some("web"))), (0, 1, 1));
    // A point for every hour of the default day, dense, in order.
    let points = series(&h, "teamId", Some("ml"))["points"]
        .as_array()
        .unwrap();
    assert!(points.len() >= 24, "{}", points.len());
    for w in points.windows(2) {
        assert_eq!(w[0]["windowEnd"], w[1]["windowStart"]);
    }

    let (_, h) = api
        .read("/v1/customers/acme/usage/history?groupBy=model&filter%5BteamId%5D=ml&featureId=ai-tokens")
        .await;
    assert_eq!(h["series"].as_array().unwrap().len(), 2, "{h}");
    assert_eq!(totals(series(&h, "model", Some("gpt-4o"))).0, 80);
    assert_eq!(totals(series(&h, "model", Some("claude"))).0, 50);

    let (_, h) = api
        .read("/v1/customers/acme/usage/history?groupBy=deniedBy&groupBy=userId")
        .await;
    let denied = series(&h, "deniedBy", Some("org-daily"));
    assert_eq!(denied["groupBy"]["userId"], "carol");
    assert_eq!(totals(denied), (0, 0, 1));

    // No groupBy: one series with everything.
    let (_, h) = api
        .read("/v1/customers/acme/usage/history?windowSize=DAY")
        .await;
    assert_eq!(h["series"].as_array().unwrap().len(), 1, "{h}");
    assert_eq!(totals(&h["series"][0]), (130, 3, 1));

    // Four series (alice, bob, carol's release, carol's denial), nothing folded.
    let req = Request::builder()
        .uri("/metrics")
        .body(Body::empty())
        .unwrap();
    let resp = api.router.clone().oneshot(req).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let metrics = String::from_utf8_lossy(&bytes);
    assert!(metrics.contains("\ntollgate_usage_series 4\n"), "{metrics}");
    assert!(
        metrics.contains("\ntollgate_usage_values_folded_total 0\n"),
        "{metrics}"
    );

    // Globex spent nothing, and sees none of acme's usage.
    let (status, h) = api
        .get("/v1/customers/globex/usage/history", GLOBEX_KEY)
        .await;
    assert_eq!(status, StatusCode::OK, "{h}");
    assert!(
        h["series"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| totals(s) == (0, 0, 0)),
        "{h}"
    );
}

#[tokio::test]
async fn day_windows_align_to_the_asked_time_zone() {
    let api = Api::new(10_000).await;
    api.spend_fixture().await;
    let (status, h) = api
        .read("/v1/customers/acme/usage/history?windowSize=DAY&timeZone=Europe/Berlin")
        .await;
    assert_eq!(status, StatusCode::OK, "{h}");
    assert_eq!(h["timeZone"], "Europe/Berlin");
    let points = h["series"][0]["points"].as_array().unwrap();
    // The last day spans two Berlin days; each window runs midnight to midnight there.
    assert_eq!(points.len(), 2, "{h}");
    for p in points {
        for edge in ["windowStart", "windowEnd"] {
            let t = chrono::DateTime::parse_from_rfc3339(p[edge].as_str().unwrap())
                .unwrap()
                .with_timezone(&chrono_tz::Europe::Berlin);
            assert_eq!(
                t.format("%H:%M:%S").to_string(),
                "00:00:00",
                "{edge} of {p}"
            );
        }
    }
    assert_eq!(totals(&h["series"][0]).0, 130);
    // Day buckets are whole UTC days: a range past the hours' retention (90 days before the
    // pinned clock) cannot be cut at Berlin's midnight, and the answer says so instead of
    // shifting the windows.
    let (status, e) = api
        .read("/v1/customers/acme/usage/history?windowSize=DAY&timeZone=Europe/Berlin&from=2025-10-10T00:00:00Z&to=2025-10-12T00:00:00Z")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["parameter"], "timeZone", "{e}");
    let (status, h) = api
        .read("/v1/customers/acme/usage/history?windowSize=DAY&from=2025-10-10T00:00:00Z&to=2025-10-12T00:00:00Z")
        .await;
    assert_eq!(status, StatusCode::OK, "{h}");
    // Past every retention (days are kept two years).
    let (status, e) = api
        .read("/v1/customers/acme/usage/history?windowSize=DAY&from=2020-01-10T00:00:00Z&to=2020-01-12T00:00:00Z")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["parameter"], "from", "{e}");
}

#[tokio::test]
async fn top_spenders_and_budget_state() {
    let api = Api::new(10_000).await;
    api.spend_fixture().await;

    let (status, t) = api
        .read("/v1/customers/acme/usage/top?by=userId&limit=2")
        .await;
    assert_eq!(status, StatusCode::OK, "{t}");
    let rows = t["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0]["value"].as_str(), rows[0]["units"].as_u64()),
        (Some("alice"), Some(80))
    );
    assert_eq!(
        (rows[1]["value"].as_str(), rows[1]["units"].as_u64()),
        (Some("bob"), Some(50))
    );
    let (_, t) = api
        .read("/v1/customers/acme/usage/top?by=model&filter%5BuserId%5D=bob")
        .await;
    assert_eq!(t["rows"].as_array().unwrap().len(), 1, "{t}");
    assert_eq!(t["rows"][0]["value"], "claude");

    let (status, b) = api.read("/v1/customers/acme/entities/ml/budget").await;
    assert_eq!(status, StatusCode::OK, "{b}");
    assert_eq!(b["entityType"], "team");
    let team = &b["limits"][0];
    assert_eq!(team["limitId"], "team-daily");
    assert_eq!(team["inheritedFromType"], true);
    assert_eq!(team["used"], 130);
    assert_eq!(team["limit"], 100_000);
    assert_eq!(team["remaining"], 100_000 - 130);
    assert!(team["resetsAt"].is_string(), "{b}");
    assert_eq!(team["recentUnits"], 130);
    // 130 units in the last minutes will not spend 99,870 before the day ends.
    assert_eq!(team["projectedExhaustion"], Value::Null, "{b}");

    let (_, b) = api.read("/v1/customers/acme/entities/acme/budget").await;
    let org = &b["limits"][0];
    assert_eq!(
        (org["limitId"].as_str(), org["used"].as_u64()),
        (Some("org-daily"), Some(130))
    );
    assert_eq!(org["inheritedFromType"], false);
    // 870 left at 130 units per 15 minutes runs out within the day: a projection exists and
    // lies between now and the reset.
    let at = b["at"].as_str().unwrap();
    let exhaustion = org["projectedExhaustion"]
        .as_str()
        .unwrap_or_else(|| panic!("{b}"));
    assert!(
        exhaustion > at && exhaustion <= org["resetsAt"].as_str().unwrap(),
        "{b}"
    );

    let (status, e) = api.read("/v1/customers/acme/entities/nobody/budget").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{e}");
}

/// Users created on first sight are in the tree, in search and in budgets, on every replica
/// sharing the store (`on` is one storage section, `second` a replica on the same store or
/// the same replica).
async fn created_users_are_listed_searched_and_budgeted(a: &Api, b: &Api) {
    assert!(a.spend("zed", "gpt-4o", 100, Some(70)).await);
    assert!(a.spend("zoe", "gpt-4o", 10, Some(5)).await);
    for api in [a, b] {
        let page = api
            .service
            .entity_page("acme", Some("ml"), None, 0, 25)
            .await
            .unwrap();
        let ids: Vec<&str> = page.rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["alice", "bob", "zed", "zoe"], "ml's children");
        assert_eq!(page.total, 4);
        let top = api
            .service
            .entity_page("acme", None, None, 0, 25)
            .await
            .unwrap();
        assert_eq!(top.rows[0].id, "acme");
        assert_eq!(top.rows[0].children, 2);
        let ml = api
            .service
            .entity_page("acme", Some("acme"), None, 0, 25)
            .await
            .unwrap();
        let ml = ml.rows.iter().find(|r| r.id == "ml").unwrap();
        assert_eq!(ml.children, 4, "created users count under their team");
        // Paged like the model's entities.
        let second = api
            .service
            .entity_page("acme", Some("ml"), None, 2, 1)
            .await
            .unwrap();
        assert_eq!(
            (second.rows[0].id.as_str(), second.total),
            ("zed", 4),
            "page 3 of 1"
        );
        let found = api
            .service
            .entity_page("acme", None, Some("ZE"), 0, 25)
            .await
            .unwrap();
        let ids: Vec<&str> = found.rows.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            ["zed"],
            "search is case-insensitive and finds created users"
        );
        assert_eq!(found.rows[0].entity_type, "user");

        let (status, budget) = api.read("/v1/customers/acme/entities/zed/budget").await;
        assert_eq!(status, StatusCode::OK, "{budget}");
        assert_eq!(budget["entityType"], "user");
        let user = &budget["limits"][0];
        assert_eq!(user["limitId"], "user-daily");
        assert_eq!(user["inheritedFromType"], true);
        assert_eq!(user["used"], 70, "{budget}");
        assert_eq!(user["remaining"], 100_000 - 70);
    }
    // Another customer's created users are not this one's, and an id never seen is still 404.
    let (status, e) = a.read("/v1/customers/acme/entities/nobody/budget").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{e}");
    let (status, e) = Calls::get(a, "/v1/customers/globex/entities/zed/budget", GLOBEX_KEY).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{e}");
}

#[tokio::test]
async fn created_users_are_in_the_tree_search_and_budgets_in_memory() {
    let api = Api::creating_users("{ kind: memory }", "").await;
    created_users_are_listed_searched_and_budgeted(&api, &api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_users_are_in_the_tree_search_and_budgets_of_every_redis_replica() {
    let redis = tokio::task::spawn_blocking(common::RedisServer::start)
        .await
        .unwrap();
    let storage = format!("{{ kind: redis, url: \"{}\" }}", redis.url());
    let a = Api::creating_users(&storage, "").await;
    let b = Api::creating_users(&storage, "").await;
    // B never decided for zed or zoe: it learns them from Redis.
    created_users_are_listed_searched_and_budgeted(&a, &b).await;
}

/// A credit pool's budget states what its grants gave and what is left; rate limits, which
/// recover on their own, never show a projected exhaustion, while quotas may.
#[tokio::test]
async fn credit_pools_show_their_grants_and_rate_limits_never_run_out() {
    let extra = "      - { id: org-credits, entity: acme, feature: ai-requests, kind: credits }\n      - { id: user-minute, entityType: user, feature: ai-tokens, kind: rate, limit: 1000, window: PT1M }\n    grants:\n      - { id: g1, entity: acme, feature: ai-requests, amount: 500, category: paid }\n      - { id: g2, entity: acme, feature: ai-requests, amount: 300, category: promo }\n";
    let api = Api::with(10_000, "{ kind: memory }", extra).await;
    for _ in 0..3 {
        let (status, d) = api
            .post(
                "/v1/customers/acme/entitlements/check",
                ACME_KEY,
                json!({"featureId": "ai-requests", "requestedUsage": 100,
                    "dimensions": {"userId": "alice"}, "commit": true}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{d}");
        assert_eq!(d["isGranted"], true, "{d}");
    }
    let (status, b) = api.read("/v1/customers/acme/entities/acme/budget").await;
    assert_eq!(status, StatusCode::OK, "{b}");
    let limits = b["limits"].as_array().unwrap();
    let pool = limits
        .iter()
        .find(|l| l["limitId"] == "org-credits")
        .unwrap_or_else(|| panic!("{b}"));
    assert_eq!(pool["kind"], "credits");
    assert_eq!(pool["used"], 300, "{b}");
    assert_eq!(pool["limit"], 800, "what the grants gave: {b}");
    assert_eq!(pool["remaining"], 500, "{b}");
    assert_eq!(pool["resetsAt"], Value::Null);

    // 80 tokens in the last minutes against a 1,000-a-minute rate: nothing runs out.
    assert!(api.spend("alice", "gpt-4o", 100, Some(80)).await);
    let (_, b) = api.read("/v1/customers/acme/entities/alice/budget").await;
    let rate = b["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["limitId"] == "user-minute")
        .unwrap_or_else(|| panic!("{b}"));
    assert_eq!(rate["kind"], "rate");
    assert_eq!(rate["recentUnits"], 80, "{b}");
    assert_eq!(rate["projectedExhaustion"], Value::Null, "{b}");
}

/// Spend in credits and money: tokens priced per model with the price table in force, by team
/// and by model, with the denials by the limit that refused them; the numbers add up to what
/// was settled, and a customer without a currency gets credits only.
#[tokio::test]
async fn spend_prices_tokens_per_model_in_credits_and_money() {
    let prices = "prices:\n  - version: v1\n    effectiveFrom: 2026-01-01T00:00:00Z\n    models:\n      - { match: \"gpt-4*\", inputPerMillion: 250, outputPerMillion: 1000 }\n      - { match: \"claude*\", inputPerMillion: 300, outputPerMillion: 1500 }\ncurrency: { code: USD, perCredit: 0.01 }\n";
    // The org's cap raised to a million tokens a day, so the calls below fit.
    let org = |c: String| {
        let from = "id: org-daily, entity: acme, feature: ai-tokens, kind: quota, limit: 1000,";
        assert!(c.contains(from), "the fixture's org cap");
        c.replacen(
            from,
            "id: org-daily, entity: acme, feature: ai-tokens, kind: quota, limit: 1000000,",
            1,
        )
    };
    let api = Api::edited(10_000, "{ kind: memory }", "", |c| {
        format!("{prices}{}", org(c))
    })
    .await;
    // Each call: a hold, settled with its token split.
    let call = |user: &'static str, model: &'static str, input: u64, output: u64| {
        let api = &api;
        async move {
            let (_, d) = api
                .post(
                    "/v1/customers/acme/entitlements/check",
                    ACME_KEY,
                    json!({"featureId": "ai-tokens", "requestedUsage": input + output,
                        "dimensions": {"userId": user, "model": model}}),
                )
                .await;
            let hold = d["holdId"]
                .as_str()
                .unwrap_or_else(|| panic!("{d}"))
                .to_string();
            let (s, r) = api
                .post(
                    &format!("/v1/holds/{hold}/settle"),
                    ACME_KEY,
                    json!({"actualUsage": input + output, "tokens": {"input": input, "output": output}}),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{r}");
        }
    };
    // Per million: gpt-4o 250 in, 1,000 out; claude 300 in, 1,500 out.
    call("alice", "gpt-4o", 20_000, 10_000).await; // 5 + 10 = 15 credits (team ml)
    call("bob", "claude-3", 40_000, 6_000).await; // 12 + 9 = 21 credits (team ml)
    call("carol", "gpt-4o", 4_000, 0).await; // 1 credit (team web)
    assert!(
        !api.spend("carol", "gpt-4o", 2_000_000, Some(1)).await,
        "refused by her own cap"
    );

    let (status, s) = api
        .read("/v1/customers/acme/usage/spend?by=teamId&days=1")
        .await;
    assert_eq!(status, StatusCode::OK, "{s}");
    assert_eq!(s["currency"], "USD");
    assert_eq!(s["windowSize"], "HOUR");
    assert_eq!(s["total"]["credits"], 37, "{s}");
    assert_eq!(s["total"]["amount"], "0.37");
    assert_eq!(s["total"]["units"], 30_000 + 46_000 + 4_000);
    assert_eq!(s["total"]["requests"], 3);
    assert_eq!(s["total"]["denied"], 1);
    assert_eq!(s["previous"]["credits"], 0);
    assert_eq!(s["change"], Value::Null, "nothing before to compare with");
    let rows = s["rows"].as_array().unwrap();
    let team = |name: &str| {
        rows.iter()
            .find(|r| r["value"] == name)
            .unwrap_or_else(|| panic!("no {name} in {s}"))
    };
    assert_eq!(
        (
            team("ml")["credits"].as_u64(),
            team("ml")["amount"].as_str()
        ),
        (Some(36), Some("0.36"))
    );
    assert_eq!(team("web")["credits"], 1);
    assert_eq!(rows[0]["value"], "ml", "the most credits first");
    let points: u64 = s["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["credits"].as_u64().unwrap())
        .sum();
    assert_eq!(points, 37, "the windows add up to the total");
    assert_eq!(s["points"].as_array().unwrap().len(), 24);
    assert_eq!(
        s["denials"],
        json!([{"limitId": "user-daily", "denied": 1}])
    );
    assert_eq!(s["movers"][0]["value"], "ml", "moved most from nothing");

    let (_, m) = api
        .read("/v1/customers/acme/usage/spend?by=model&days=7")
        .await;
    assert_eq!(m["windowSize"], "DAY");
    assert_eq!(m["points"].as_array().unwrap().len(), 7);
    let by_model: Vec<(Option<&str>, Option<u64>)> = m["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["value"].as_str(), r["credits"].as_u64()))
        .collect();
    assert_eq!(
        by_model,
        [(Some("claude-3"), Some(21)), (Some("gpt-4o"), Some(16))]
    );

    for (query, parameter) in [
        ("days=1", "by"),
        ("by=teamId&days=2", "days"),
        ("by=nope", "by"),
        ("by=teamId&limit=0", "limit"),
    ] {
        let (status, e) = api
            .read(&format!("/v1/customers/acme/usage/spend?{query}"))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {e}");
        assert_eq!(e["error"]["parameter"], parameter, "{query}: {e}");
    }
    let (status, _) =
        Calls::get(&api, "/v1/customers/acme/usage/spend?by=teamId", GLOBEX_KEY).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Without a currency: credits, no amounts.
    let plain = Api::edited(10_000, "{ kind: memory }", "", |c| {
        let prices = prices.replace("currency: { code: USD, perCredit: 0.01 }\n", "");
        format!("{prices}{}", org(c))
    })
    .await;
    assert!(plain.spend("alice", "gpt-4o", 10, Some(10)).await);
    let (_, p) = plain
        .read("/v1/customers/acme/usage/spend?by=teamId&days=1")
        .await;
    assert_eq!(
        (p["currency"].clone(), p["total"]["amount"].clone()),
        (Value::Null, Value::Null)
    );
}

#[tokio::test]
async fn bad_parameters_get_a_400_that_names_them() {
    let api = Api::new(60).await;
    let cases = [
        ("usage/history?groupBy=department", "groupBy"),
        ("usage/history?filter%5Bcolour%5D=red", "filter"),
        ("usage/history?featureId=nope", "featureId"),
        (
            "usage/history?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z",
            "from",
        ),
        ("usage/history?from=yesterday", "from"),
        ("usage/history?windowSize=WEEK", "windowSize"),
        ("usage/history?timeZone=Mars/Olympus", "timeZone"),
        ("usage/history?windowSize=HOUR&from=a&from=b", "from"),
        // Minute buckets are kept 48 hours.
        (
            "usage/history?windowSize=MINUTE&from=2020-01-01T00:00:00Z&to=2020-01-01T01:00:00Z",
            "windowSize",
        ),
        // 120 hourly windows, over the 60 points this sidecar returns.
        (
            "usage/history?windowSize=HOUR&from=2026-01-01T00:00:00Z&to=2026-01-06T00:00:00Z",
            "from",
        ),
        ("usage/top", "by"),
        ("usage/top?by=shoeSize", "by"),
        ("usage/top?by=userId&limit=0", "limit"),
        ("usage/top?by=userId&limit=ten", "limit"),
    ];
    for (query, param) in cases {
        let (status, e) = api.read(&format!("/v1/customers/acme/{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {e}");
        assert_eq!(e["error"]["code"], "bad_parameter", "{query}: {e}");
        assert_eq!(e["error"]["parameter"], param, "{query}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(param),
            "{query}: {e}"
        );
    }
    // Groups × windows over the cap: 25 hours × 3 (user, model) pairs.
    api.spend_fixture().await;
    let (status, e) = api
        .read("/v1/customers/acme/usage/history?windowSize=HOUR&groupBy=userId&groupBy=model")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["parameter"], "groupBy", "{e}");
    let (status, e) = api
        .read("/v1/customers/acme/usage/history?colour=red")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("`colour`"),
        "{e}"
    );
}

#[tokio::test]
async fn a_customer_key_reads_only_its_own_usage() {
    let api = Api::new(10_000).await;
    api.spend_fixture().await;
    for path in [
        "/v1/customers/acme/usage/history",
        "/v1/customers/acme/usage/top?by=userId",
        "/v1/customers/acme/entities/acme/budget",
    ] {
        let (status, e) = api.get(path, GLOBEX_KEY).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {e}");
        let (status, _) = api.get(path, "globex-key.wrong").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        let (status, b) = api.get(path, OPERATOR).await;
        assert_eq!(status, StatusCode::OK, "{path}: {b}");
    }
}

#[tokio::test]
async fn the_push_stream_delivers_records_live_and_resumes_without_repeats() {
    let api = Api::new(10_000).await;
    let (status, sse, _) = api
        .open(
            "/v1/customers/acme/usage/stream?heartbeatSeconds=1",
            ACME_KEY,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut sse = sse.unwrap();
    // Live: made after the stream opened.
    api.spend_fixture().await;
    let mut seen = Vec::new();
    for expected in ["settled", "settled", "released", "denied"] {
        let f = sse.next().await;
        assert_eq!(f.event, "usage", "{f:?}");
        let e: Value = serde_json::from_str(&f.data).unwrap();
        assert_eq!(e["kind"], expected, "{e}");
        assert_eq!(e["customerId"], "acme");
        assert_eq!(Some(e["id"].as_str().unwrap()), f.id.as_deref());
        seen.push((f.id.unwrap(), e));
    }
    assert_eq!(seen[0].1["units"], 80);
    assert_eq!(seen[0].1["attributes"]["teamId"], "ml");
    assert_eq!(seen[0].1["attributes"]["model"], "gpt-4o");
    assert!(seen[0].1["holdId"].as_str().unwrap().starts_with("acme:"));
    assert_eq!(seen[3].1["attributes"]["deniedBy"], "org-daily");
    // A denial spent nothing, and says what it asked for.
    assert_eq!(
        (seen[3].1["units"].as_u64(), seen[3].1["asked"].as_u64()),
        (Some(0), Some(5000)),
        "{}",
        seen[3].1
    );
    assert_eq!(seen[0].1.get("asked"), None, "only denials carry `asked`");
    // A heartbeat comes while nothing happens.
    let beat = sse.next_raw(false).await;
    assert_eq!(beat.event, ":heartbeat", "{beat:?}");

    // Reconnecting after the second event gets the third and fourth, once each.
    let (_, sse, _) = api
        .open(
            "/v1/customers/acme/usage/stream",
            ACME_KEY,
            Some(&seen[1].0),
        )
        .await;
    let mut sse = sse.unwrap();
    for (id, _) in &seen[2..] {
        assert_eq!(sse.next().await.id.as_ref(), Some(id));
    }
    assert!(api.spend("bob", "claude", 10, Some(10)).await);
    let f = sse.next().await;
    let e: Value = serde_json::from_str(&f.data).unwrap();
    assert_eq!(
        (e["kind"].as_str(), e["units"].as_u64()),
        (Some("settled"), Some(10))
    );
    assert!(!seen.iter().any(|(id, _)| Some(id) == f.id.as_ref()));

    // From the start of what is kept, with `after` empty: everything, in order.
    let (_, sse, _) = api
        .open("/v1/customers/acme/usage/stream", ACME_KEY, None)
        .await;
    let mut sse = sse.unwrap();
    for (id, _) in &seen {
        assert_eq!(sse.next().await.id.as_ref(), Some(id));
    }
}

#[tokio::test]
async fn the_push_stream_is_scoped_to_the_callers_customer() {
    let api = Api::new(10_000).await;
    let (status, _, e) = api
        .open("/v1/customers/acme/usage/stream", GLOBEX_KEY, None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{e}");
    let (status, _, e) = api.open("/v1/usage/stream", ACME_KEY, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{e}");
    let (status, _, e) = api
        .open(
            "/v1/customers/acme/usage/stream",
            ACME_KEY,
            Some("yesterday"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["parameter"], "after", "{e}");
    let (status, _, e) = api
        .open(
            "/v1/customers/acme/usage/stream?heartbeatSeconds=0",
            ACME_KEY,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    let (status, _, e) = api
        .open("/v1/customers/nobody/usage/stream", OPERATOR, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{e}");

    // Globex's stream never carries acme's usage; the operator's carries both.
    let (_, globex, _) = api
        .open("/v1/customers/globex/usage/stream", GLOBEX_KEY, None)
        .await;
    let (_, all, _) = api.open("/v1/usage/stream", OPERATOR, None).await;
    let (mut globex, mut all) = (globex.unwrap(), all.unwrap());
    assert!(api.spend("alice", "gpt-4o", 10, Some(10)).await);
    let (status, d) = api.post("/v1/customers/globex/entitlements/check", GLOBEX_KEY, json!({"featureId": "ai-tokens", "requestedUsage": 5, "dimensions": {"userId": "dave"}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{d}");
    let hold = d["holdId"].as_str().unwrap();
    let (status, _) = api
        .send(
            Method::POST,
            &format!("/v1/holds/{hold}/release"),
            Some(GLOBEX_KEY),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let g: Value = serde_json::from_str(&globex.next().await.data).unwrap();
    assert_eq!(
        (g["customerId"].as_str(), g["kind"].as_str()),
        (Some("globex"), Some("released"))
    );
    let customers: Vec<String> = [all.next().await, all.next().await]
        .iter()
        .map(|f| {
            serde_json::from_str::<Value>(&f.data).unwrap()["customerId"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(customers, ["acme", "globex"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_redis_see_each_others_usage_live() {
    let redis = tokio::task::spawn_blocking(common::RedisServer::start)
        .await
        .unwrap();
    let storage = format!("{{ kind: redis, url: \"{}\" }}", redis.url());
    let (a, b) = (
        Api::on(10_000, &storage).await,
        Api::on(10_000, &storage).await,
    );
    let (_, sse, _) = b
        .open("/v1/customers/acme/usage/stream", ACME_KEY, None)
        .await;
    let mut sse = sse.unwrap();
    // Spent through replica A; B's subscriber gets it (B polls Redis every 500 ms).
    assert!(a.spend("alice", "gpt-4o", 100, Some(80)).await);
    let f = sse.next().await;
    let e: Value = serde_json::from_str(&f.data).unwrap();
    assert_eq!(
        (e["kind"].as_str(), e["units"].as_u64()),
        (Some("settled"), Some(80)),
        "{e}"
    );
    // And B's queries read A's rollups: one store, one truth.
    let (status, t) = b.read("/v1/customers/acme/usage/top?by=userId").await;
    assert_eq!(status, StatusCode::OK, "{t}");
    assert_eq!(t["rows"][0]["value"], "alice");
    assert_eq!(t["rows"][0]["units"], 80);
    // Resuming on A after B's last id: the same ids on every replica.
    assert!(b.spend("bob", "claude", 10, Some(10)).await);
    let (_, sse_a, _) = a
        .open("/v1/customers/acme/usage/stream", ACME_KEY, f.id.as_deref())
        .await;
    let g: Value = serde_json::from_str(&sse_a.unwrap().next().await.data).unwrap();
    assert_eq!(
        (g["kind"].as_str(), g["units"].as_u64()),
        (Some("settled"), Some(10)),
        "{g}"
    );
    // The operator's stream of every customer merges their streams on Redis (it answered
    // 503 before): from the start, acme's settlements in order, with merged ids a reader
    // resumes after.
    let (status, all, e) = a.open("/v1/usage/stream", OPERATOR, None).await;
    assert_eq!(status, StatusCode::OK, "{e:?}");
    let mut all = all.unwrap();
    let mut settled = Vec::new();
    while settled.len() < 2 {
        let f = all.next().await;
        let v: Value = serde_json::from_str(&f.data).unwrap();
        assert_eq!(v["customerId"], "acme", "{v}");
        assert!(
            f.id.as_deref().is_some_and(|id| id.ends_with("@acme")),
            "{f:?}"
        );
        if v["kind"] == "settled" {
            settled.push(v["units"].as_u64());
        }
    }
    assert_eq!(settled, [Some(80), Some(10)]);
    // A denial written by the script says what it asked for.
    assert!(!a.spend("carol", "gpt-4o", 5000, Some(1)).await);
    let d = loop {
        let v: Value = serde_json::from_str(&sse.next().await.data).unwrap();
        if v["kind"] == "denied" {
            break v;
        }
    };
    assert_eq!(
        (
            d["units"].as_u64(),
            d["asked"].as_u64(),
            d["deniedAtLevel"].as_u64()
        ),
        (Some(0), Some(5000), Some(2)),
        "the org's limit refused 5,000 asked: {d}"
    );
}

use common::webhooks::{Receiver, WHSEC};

#[tokio::test]
async fn a_crossed_threshold_is_delivered_signed_retried_and_logged() {
    let receiver = Receiver::start(1, 0).await;
    let acme = format!(
        "    webhooks:\n      - {{ id: ops, url: \"{}\", secrets: [{WHSEC}] }}\n    alerts:\n      - {{ id: org-half, entity: acme, limit: org-daily, percent: [50], webhooks: [ops] }}\n",
        receiver.url
    );
    let api = Api::with(10_000, "{ kind: memory }", &acme).await;
    // The schedule: one retry, a second after the first attempt.
    assert!(api.spend("alice", "gpt-4o", 600, Some(600)).await);
    let (_, sse, _) = api
        .open("/v1/customers/acme/usage/stream", ACME_KEY, None)
        .await;
    let mut sse = sse.unwrap();
    let alert = loop {
        let f = sse.next().await;
        if f.event == "alert" {
            break f;
        }
    };
    let a: Value = serde_json::from_str(&alert.data).unwrap();
    assert_eq!(
        (a["type"].as_str(), a["data"]["used"].as_u64()),
        (Some("limit.threshold_crossed"), Some(600))
    );

    // First attempt: the receiver fails it.
    assert_eq!(api.service.deliver_due_and_wait().await.unwrap(), 1);
    let (_, log) = api.read("/v1/customers/acme/alerts/deliveries").await;
    let d = &log["deliveries"][0];
    assert_eq!(
        (d["status"].as_str(), d["attempts"][0]["status"].as_u64()),
        (Some("pending"), Some(500)),
        "{log}"
    );
    // Not due again before the schedule says.
    assert_eq!(api.service.deliver_due_and_wait().await.unwrap(), 0);
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    assert_eq!(api.service.deliver_due_and_wait().await.unwrap(), 1);
    let (_, log) = api.read("/v1/customers/acme/alerts/deliveries").await;
    let d = &log["deliveries"][0];
    assert_eq!(d["status"], "delivered", "{log}");
    assert_eq!(d["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(d["attempts"][1]["status"], 204);
    assert_eq!(d["eventType"], "limit.threshold_crossed");
    assert_eq!(d["payload"]["data"]["alertId"], a["data"]["alertId"]);

    // Both attempts: the same webhook-id, each signed for its own timestamp.
    let calls = receiver.calls();
    assert_eq!(calls.len(), 2);
    let wh = standardwebhooks::Webhook::new(WHSEC).unwrap();
    for (headers, body) in &calls {
        assert_eq!(headers["webhook-id"], d["id"].as_str().unwrap());
        wh.verify(body.as_bytes(), headers).unwrap();
        assert_eq!(serde_json::from_str::<Value>(body).unwrap(), a);
    }
    // A forged body fails the receiver's check.
    let (headers, _) = &calls[1];
    assert!(wh.verify(br#"{"type":"forged"}"#, headers).is_err());

    // A test delivery goes the same way and shows first in the log.
    let (status, t) = api
        .send(
            Method::POST,
            "/v1/customers/acme/webhooks/ops/test",
            Some(ACME_KEY),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{t}");
    assert_eq!(api.service.deliver_due_and_wait().await.unwrap(), 1);
    let calls = receiver.calls();
    let (headers, body) = calls.last().unwrap();
    wh.verify(body.as_bytes(), headers).unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(body).unwrap()["type"],
        "webhook.test"
    );
    let (_, log) = api
        .read("/v1/customers/acme/alerts/deliveries?limit=1")
        .await;
    assert_eq!(log["deliveries"].as_array().unwrap().len(), 1);
    assert_eq!(log["deliveries"][0]["id"], t["deliveryId"]);
    assert_eq!(log["deliveries"][0]["status"], "delivered");

    // Tenancy and unknown webhooks.
    for (method, path, key, expected) in [
        (
            Method::GET,
            "/v1/customers/acme/alerts/deliveries",
            GLOBEX_KEY,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::POST,
            "/v1/customers/acme/webhooks/ops/test",
            GLOBEX_KEY,
            StatusCode::FORBIDDEN,
        ),
        (
            Method::POST,
            "/v1/customers/acme/webhooks/nope/test",
            ACME_KEY,
            StatusCode::NOT_FOUND,
        ),
    ] {
        let (status, _) = api.send(method, path, Some(key), None).await;
        assert_eq!(status, expected, "{path}");
    }
    // The crossing does not fire again within the day.
    assert!(api.spend("bob", "claude", 100, Some(100)).await);
    assert_eq!(api.service.deliver_due_and_wait().await.unwrap(), 0);
}
