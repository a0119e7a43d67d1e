//! The portal in a real browser: Debian's Chromium, headless, driven by Playwright
//! (`tests/portal/portal.py`), against a sidecar process on loopback. Each scenario gets a
//! fresh sidecar; screenshots of every page land in `target/portal-screenshots/`. One scenario
//! uses the keyboard alone (Tab, Shift+Tab, Enter), with the focus visible at every stop.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use tollgate_testkit::{Sidecar, root, sha256_hex};

mod support;

const ADMIN: &str = "acme-admin.portal-admin-secret";
const VIEWER: &str = "acme-viewer.portal-viewer-secret";
const APP: &str = "acme-app.portal-app-secret";
const GLOBEX_ADMIN: &str = "globex-admin.portal-globex-secret";
const OPERATOR: &str = "portal-operator-token";

/// acme: an org, three teams (one of 60 users), a daily team limit under a ceiling; globex
/// apart. Keys: acme's admin, viewer and application, globex's admin.
fn config() -> String {
    let mut crowd = String::new();
    for i in 1..=60 {
        writeln!(
            crowd,
            "      - {{ id: user-{i:03}, type: user, parent: crowd }}"
        )
        .unwrap();
    }
    format!(
        r#"
holdTtl: PT5M
{types}attribution:
  - dimension: userId
    entityType: user
features:
  - id: ai-tokens
usageRecords:
  dimensions: [model]
prices:
  - version: v1
    effectiveFrom: 2026-01-01T00:00:00Z
    models:
      - {{ match: "gpt-4*", inputPerMillion: 2500, outputPerMillion: 10000 }}
      - {{ match: "claude*", inputPerMillion: 3000, outputPerMillion: 15000 }}
currency: {{ code: USD, perCredit: 0.01 }}
alerting:
  retrySchedule: [PT1S, PT2S]
  timeoutMs: 2000
  # The page's webhook goes to the test's receiver on loopback.
  allowTargets: [127.0.0.0/8]
customers:
  - id: acme
    entities:
      - {{ id: acme, type: organization }}
      - {{ id: research, type: team, parent: acme }}
      - {{ id: sales, type: team, parent: acme }}
      - {{ id: crowd, type: team, parent: acme }}
      - {{ id: alice, type: user, parent: research }}
      - {{ id: bob, type: user, parent: sales }}
{crowd}    limits:
      - {{ id: org-daily, entity: acme, feature: ai-tokens, kind: quota, limit: 100000, period: P1D }}
      - {{ id: team-daily, entityType: team, feature: ai-tokens, kind: quota, limit: 10000, period: P1D }}
      # No ceiling covers a per-minute rate: a customer's admin can lower it, not raise it back.
      - {{ id: user-minute, entityType: user, feature: ai-tokens, kind: rate, limit: 100000, window: PT1M }}
    ceilings:
      - {{ feature: ai-tokens, kind: quota, period: P1D, max: 200000 }}
  - id: globex
    entities:
      - {{ id: globex, type: organization }}
    limits:
      - {{ id: org-daily, entity: globex, feature: ai-tokens, kind: quota, limit: 1000, period: P1D }}
server:
  listeners: {{ extAuthz: "127.0.0.1:0", grpc: "127.0.0.1:0", http: "127.0.0.1:0" }}
  storage: {{ kind: memory }}
  credentials:
    operatorTokenSha256: {op}
    apiKeys:
      - {{ id: acme-admin, customer: acme, sha256: {admin}, role: admin }}
      - {{ id: acme-viewer, customer: acme, sha256: {viewer}, role: viewer }}
      - {{ id: acme-app, customer: acme, sha256: {app} }}
      - {{ id: globex-admin, customer: globex, sha256: {globex}, role: admin }}
  logging: {{ level: warn }}
"#,
        types = tollgate_testkit::ORG_TEAM_USER,
        op = sha256_hex(OPERATOR),
        admin = sha256_hex(ADMIN),
        viewer = sha256_hex(VIEWER),
        app = sha256_hex(APP),
        globex = sha256_hex(GLOBEX_ADMIN),
    )
}

/// Runs one scenario of `tests/portal/portal.py` against a fresh sidecar, bounded in time.
fn scenario(name: &str) -> serde_json::Value {
    let sidecar = Sidecar::start(&config()).unwrap();
    let http = sidecar.http.clone();
    drive(name, &http, Some(sidecar))
}

/// Runs scenario `name` against the sidecar whose HTTP listener is `http`. When the script
/// prints `restart`, `sidecar` (which must then be given, on a fixed port) is killed and
/// started again on the same file (its sessions, kept in memory, are gone), and the script is
/// told `restarted` on its stdin.
fn drive(name: &str, http: &str, sidecar: Option<Sidecar>) -> serde_json::Value {
    let python = tollgate_tests::sdk::sdk_python().unwrap();
    let chromium =
        std::env::var("TOLLGATE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&chromium).exists(),
        "Chromium is not at {chromium}: run `make setup-browser` (or `make test`)"
    );
    let artifacts = root().join("target/portal-screenshots");
    let mut child = Command::new(python)
        .arg(root().join("tests/portal/portal.py"))
        .arg(name)
        .args(["--portal", &format!("http://{http}")])
        .args(["--chromium", &chromium])
        .arg("--artifacts")
        .arg(&artifacts)
        .env("PORTAL_ACME_ADMIN", ADMIN)
        .env("PORTAL_ACME_VIEWER", VIEWER)
        .env("PORTAL_ACME_APP", APP)
        .env("PORTAL_GLOBEX_ADMIN", GLOBEX_ADMIN)
        .env("PORTAL_OPERATOR", OPERATOR)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The script's lines, read as they come, so a `restart` can be answered while it waits.
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut sidecar = sidecar;
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        while let Ok(line) = lines.try_recv() {
            if line == "restart" {
                let old = sidecar.take().unwrap();
                let config = old.config.clone();
                old.proc.signal("KILL").unwrap();
                drop(old);
                sidecar = Some(Sidecar::start_at(&config).unwrap());
                let stdin = child.stdin.as_mut().unwrap();
                std::io::Write::write_all(stdin, b"restarted\n").unwrap();
                std::io::Write::flush(stdin).unwrap();
            }
            printed.push(line);
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the `{name}` browser scenario ran over 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    reader.join().unwrap();
    printed.extend(lines.try_iter());
    let stdout = printed.join("\n");
    assert!(
        out.status.success(),
        "the `{name}` browser scenario failed (screenshot in {}):\n{stdout}\n{}",
        artifacts.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("{}")).unwrap()
}

#[test]
fn an_admin_sees_the_tree_and_usage_move_without_a_reload() {
    let out = scenario("overview");
    assert_eq!(out["overview"], "ok");
}

#[test]
fn an_alert_made_in_the_portal_reaches_a_receiver_signed_and_is_logged() {
    let out = scenario("alerts");
    assert_eq!(out["alerts"], "ok");
}

#[test]
fn a_lowered_limit_denies_the_next_decision_and_a_raise_past_the_ceiling_is_refused() {
    let out = scenario("limits");
    assert_eq!(out["limits"], "ok");
}

#[test]
fn a_viewer_has_no_controls_and_a_forged_change_is_refused() {
    let out = scenario("viewer");
    assert_eq!(out["viewer"], "ok");
}

#[test]
fn another_customer_gets_403_and_a_change_without_the_csrf_token_is_refused() {
    let out = scenario("tenancy");
    assert_eq!(out["tenancy"], "ok");
}

#[test]
fn a_customer_admin_does_it_all_with_the_keyboard() {
    let out = scenario("keyboard");
    assert_eq!(out["keyboard"], "ok");
}

/// The live page: paged, filtered, in hierarchy order, denials with what they asked for; after
/// the server restarts (on the durable store, the same port), it offers the sign-in instead of
/// reconnecting forever, and follows usage again after it.
#[test]
fn the_live_page_pages_filters_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = tollgate_testkit::free_port();
    let text = config()
        .replace(
            "http: \"127.0.0.1:0\"",
            &format!("http: \"127.0.0.1:{port}\""),
        )
        .replace(
            "storage: { kind: memory }",
            "storage: { kind: durable, path: counters.redb, durability: sync }",
        );
    assert!(text.contains(&format!("127.0.0.1:{port}")) && text.contains("durable"));
    let path = dir.path().join("tollgate.yaml");
    std::fs::write(&path, &text).unwrap();
    let sidecar = Sidecar::start_at(&path).unwrap();
    let http = sidecar.http.clone();
    let out = drive("live", &http, Some(sidecar));
    assert_eq!(out["live"], "ok");
}

/// The first screen in money: calls with token splits on two models, priced per model; every
/// figure the page shows equals the spend API's, by team and by model; a denial is shown with
/// the limit that refused it; a team drills down to the tree.
#[test]
fn the_first_screen_shows_spend_in_money_as_the_api_counts_it() {
    let out = scenario("spend");
    assert_eq!(out["spend"], "ok");
}

/// The sidecar of the end-to-end stack made a priced, self-service one: users created on first
/// sight (under `research`), every call also drawing priced credits from acme's pool (a grant
/// of 1,000,000), the model recorded, a currency, acme's admin and viewer keys, and this file's
/// operator token.
fn tour_sidecar() -> String {
    let mut text = support::SIDECAR.clone();
    let edits = [
        (
            "  - dimension: userId\n    entityType: user\n",
            "  - dimension: userId\n    entityType: user\n    onUnknown: create\n",
        ),
        (
            "features:\n  - id: ai-tokens\n",
            "features:\n  - id: ai-tokens\n    alsoDraws:\n      - { feature: credits, per: price }\n  - id: credits\nusageRecords:\n  dimensions: [model]\nprices:\n  - version: v1\n    effectiveFrom: 2026-01-01T00:00:00Z\n    models:\n      - { match: \"gpt-4o*\", inputPerMillion: 1000000, outputPerMillion: 4000000 }\ncurrency: { code: USD, perCredit: 0.01 }\n",
        ),
        (
            "      - { id: user-daily, entityType: user, feature: ai-tokens, kind: quota, limit: 10000, period: P1D }\n",
            "      - { id: user-daily, entityType: user, feature: ai-tokens, kind: quota, limit: 10000, period: P1D }\n      - { id: acme-credits, entity: acme, feature: credits, kind: credits }\n    grants:\n      - { id: g1, entity: acme, feature: credits, amount: 1000000, category: paid }\n    autoCreateParents:\n      user: research\n",
        ),
        (
            "    operatorTokenSha256: 61112491d046c3f6f8ab801f170d9b2d0c734a17ceff60dee92123fb507cfc3f\n",
            &format!(
                "    operatorTokenSha256: {}\n    apiKeys:\n      - {{ id: acme-admin, customer: acme, sha256: {}, role: admin }}\n      - {{ id: acme-viewer, customer: acme, sha256: {}, role: viewer }}\n      - {{ id: acme-app, customer: acme, sha256: {} }}\n      - {{ id: globex-admin, customer: globex, sha256: {}, role: admin }}\n",
                sha256_hex(OPERATOR),
                sha256_hex(ADMIN),
                sha256_hex(VIEWER),
                sha256_hex(APP),
                sha256_hex(GLOBEX_ADMIN)
            ),
        ),
    ];
    for (from, to) in edits {
        assert!(
            text.contains(from),
            "the stack's sidecar config changed: {from}"
        );
        text = text.replacen(from, to, 1);
    }
    text
}

/// The tour after real traffic through Envoy with the filter: chats by configured users and
/// by users created on first sight, their usage settled from the mock provider's answers and
/// charged to acme's credit pool. As the customer's admin, its viewer and the operator, the
/// first screen's every figure is the spend API's and the pool's counter; the created users are
/// in the tree and their budgets answer; the pool shows its grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tour_after_traffic_through_envoy_shows_every_number_as_the_api_and_counters_do() {
    let s = support::Stack::start_full("wasm-filter.yaml", &tour_sidecar(), |c| c);
    for (user, team, words, max) in [
        ("alice", "research", 30, 20),
        ("zed", "research", 12, 10),
        ("zoe", "research", 8, 24),
        ("bob", "sales", 20, 16),
        ("zed", "research", 5, 5),
    ] {
        let bearer = support::caller("acme", Some(user));
        let r = s
            .chat(
                "/v1/chat/completions",
                &[("authorization", bearer.as_str()), ("x-team-id", team)],
                &support::chat_body(words, max),
            )
            .await;
        assert_eq!(r.status, 200, "{user}: {}", r.text);
    }
    // One over research's 300 a day: refused by it.
    let bearer = support::caller("acme", Some("alice"));
    let r = s
        .chat(
            "/v1/chat/completions",
            &[
                ("authorization", bearer.as_str()),
                ("x-team-id", "research"),
            ],
            &support::chat_body(10, 400),
        )
        .await;
    assert_eq!(r.status, 429, "{}", r.text);
    // Settlement is batched by the filter: wait until the pool's counter stops moving.
    let http = format!("http://{}", s.sidecar.http);
    let mut last = None;
    for _ in 0..100 {
        let (_, b) = get_json(&http, "/v1/customers/acme/entities/acme/budget", ADMIN).await;
        let used = b["limits"]
            .as_array()
            .and_then(|l| l.iter().find(|x| x["limitId"] == "acme-credits"))
            .map(|x| x["used"].clone());
        if used.is_some() && used == last {
            break;
        }
        last = used;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let http = s.sidecar.http.clone();
    let out = tokio::task::spawn_blocking(move || drive("tour", &http, None))
        .await
        .unwrap();
    assert_eq!(out["tour"], "ok", "{out}");
    drop(s);
}

async fn get_json(base: &str, path: &str, token: &str) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}
