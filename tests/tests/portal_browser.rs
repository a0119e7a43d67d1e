//! The portal in a real browser: Debian's Chromium, headless, driven by Playwright
//! (`tests/portal/portal.py`), against a sidecar process on loopback. Each scenario gets a
//! fresh sidecar; screenshots of every page land in `target/portal-screenshots/`. One scenario
//! uses the keyboard alone (Tab, Shift+Tab, Enter), with the focus visible at every stop.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use tollgate_testkit::{Sidecar, root, sha256_hex};

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
    drive(name, sidecar)
}

/// Runs `name` with the sidecar on the durable store and a fixed HTTP port; when the script
/// prints `restart`, the sidecar is killed and started again on the same file and port (its
/// sessions, kept in memory, are gone), and the script is told `restarted` on its stdin.
fn drive(name: &str, sidecar: Sidecar) -> serde_json::Value {
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
        .args(["--portal", &format!("http://{}", sidecar.http)])
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
    let mut sidecar = Some(sidecar);
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
    let out = drive("live", Sidecar::start_at(&path).unwrap());
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
