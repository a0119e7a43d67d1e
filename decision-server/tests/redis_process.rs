//! The real binary on the Redis store: three replicas sharing one cap through one Redis and
//! through a 3-master Redis Cluster, Redis stopped and frozen mid-load (every decision answers
//! within the timeout, unavailable; decisions recover once it is back, with no restart), a
//! replica killed mid-load (no granted usage lost from the counters), admin changes made on
//! one replica reaching every replica, an unreachable Redis refused at start, and the portal
//! answering 503 while Redis is down.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::ext_authz::{check, metric, org_counter, race_one_cap};
use common::service::ACME_ORG_CAP;
use common::{LOOPBACK_PORT_0, Sidecar};
use common::{RedisCluster, RedisServer};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tonic::Code;

const SIZES: [u64; 4] = [1, 3, 7, 13];
const USERS: [&str; 3] = ["alice", "bob", "carol"];

fn config(storage: &str) -> String {
    common::service::config_with(&format!("{LOOPBACK_PORT_0}\n  storage: {storage}"))
}

/// A Redis node's storage section. The timeout is generous: these tests are about sharing
/// caps, not about slow calls, and a loaded test machine can stall one past 100 ms.
fn node(redis: &RedisServer, extra: &str) -> String {
    format!(
        "{{ kind: redis, url: \"{}\", prefix: tg{extra}, timeoutMs: 5000 }}",
        redis.url()
    )
}

async fn replicas_share_one_cap(storage: &str) -> Vec<Sidecar> {
    let replicas: Vec<Sidecar> = (0..3)
        .map(|_| Sidecar::start(&config(storage)).unwrap())
        .collect();
    let addrs: Vec<String> = replicas.iter().map(|r| r.ext_authz.clone()).collect();
    let total = race_one_cap(&addrs).await;
    assert!(
        total <= ACME_ORG_CAP,
        "three replicas granted {total}, past the shared cap {ACME_ORG_CAP}"
    );
    assert!(
        ACME_ORG_CAP - total < 13,
        "the cap was not used up: {total} of {ACME_ORG_CAP}"
    );
    for r in &replicas {
        assert_eq!(
            org_counter(r).await,
            total,
            "every replica reads the shared counter as exactly what was granted"
        );
        // The script decided every check; the core read each answer the same way.
        assert_eq!(
            metric(r, "tollgate_store_script_disagreements_total").await,
            0
        );
    }
    replicas
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_one_redis_never_overspend_a_shared_cap() {
    let redis = RedisServer::start();
    replicas_share_one_cap(&node(&redis, "")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_on_a_redis_cluster_never_overspend_a_shared_cap() {
    let cluster = RedisCluster::start();
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let storage = format!(
        "{{ kind: redis, cluster: [{}], timeoutMs: 5000 }}",
        urls.join(", ")
    );
    let _replicas = replicas_share_one_cap(&storage).await;
    // Every key of acme carries its hash tag, so one node holds them all.
    let keys: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| {
            n.cli(&["KEYS", "*{acme}*"])
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count()
        })
        .collect();
    assert_eq!(
        keys.iter().filter(|n| **n > 0).count(),
        1,
        "acme's keys spread over nodes: {keys:?}"
    );
}

/// Runs `clients` loops of checks against `sidecar` until `stop`, recording how long each
/// answer took and how it went.
struct Probe {
    slowest_ms: AtomicU64,
    unavailable: AtomicU64,
    granted: AtomicU64,
    other: AtomicU64,
}

async fn probe_while(
    sidecar: &Sidecar,
    stop: Arc<AtomicBool>,
    probe: Arc<Probe>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for client in 0..16usize {
        let addr = format!("http://{}", sidecar.ext_authz);
        let stop = Arc::clone(&stop);
        let probe = Arc::clone(&probe);
        tasks.push(tokio::spawn(async move {
            let mut c = AuthorizationClient::connect(addr).await.unwrap();
            // Bounded in count as well as by `stop`.
            for i in 0..100_000usize {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let started = Instant::now();
                let r = c.check(check(USERS[(client + i) % USERS.len()], 1)).await;
                let took = started.elapsed().as_millis() as u64;
                probe.slowest_ms.fetch_max(took, Ordering::Relaxed);
                match r {
                    Ok(r) if r.get_ref().status.as_ref().unwrap().code == 0 => {
                        probe.granted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) if s.code() == Code::Unavailable => {
                        probe.unavailable.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        probe.other.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tasks
}

fn fresh_probe() -> Arc<Probe> {
    Arc::new(Probe {
        slowest_ms: AtomicU64::new(0),
        unavailable: AtomicU64::new(0),
        granted: AtomicU64::new(0),
        other: AtomicU64::new(0),
    })
}

/// Load while `fault` is in force for a second: every answer is an unavailable status, and
/// none takes more than `bound` (the store's 200 ms timeout plus slack for a loaded machine;
/// a call that hung would take the whole second or more).
async fn under_fault(sidecar: &Sidecar, bound_ms: u64) -> Arc<Probe> {
    let stop = Arc::new(AtomicBool::new(false));
    let probe = fresh_probe();
    let tasks = probe_while(sidecar, Arc::clone(&stop), Arc::clone(&probe)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        probe.unavailable.load(Ordering::Relaxed) > 16,
        "decisions were made while Redis was down"
    );
    assert_eq!(probe.granted.load(Ordering::Relaxed), 0);
    assert_eq!(probe.other.load(Ordering::Relaxed), 0);
    let slowest = probe.slowest_ms.load(Ordering::Relaxed);
    assert!(
        slowest < bound_ms,
        "a decision took {slowest} ms with Redis down; the timeout is 200 ms"
    );
    probe
}

/// Checks until one is granted, at most 15 s; returns how many tries it took.
async fn recovers(sidecar: &Sidecar) -> usize {
    let mut c = AuthorizationClient::connect(format!("http://{}", sidecar.ext_authz))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    for tries in 1.. {
        if let Ok(r) = c.check(check("alice", 1)).await
            && r.get_ref().status.as_ref().unwrap().code == 0
        {
            return tries;
        }
        assert!(
            Instant::now() < deadline,
            "decisions did not recover within 15 s of Redis coming back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_dropping_or_frozen_mid_load_answers_within_the_timeout_then_recovers() {
    let mut redis = RedisServer::start();
    let storage = format!(
        "{{ kind: redis, url: \"{}\", timeoutMs: 200, breakerFailures: 5, breakerOpenMs: 300 }}",
        redis.url()
    );
    let sidecar = Sidecar::start(&config(&storage)).unwrap();
    recovers(&sidecar).await;

    // Killed: connections drop, the port refuses.
    redis.stop();
    under_fault(&sidecar, 1_000).await;
    redis.restart();
    recovers(&sidecar).await;

    // Connections dropped by the server (Redis up throughout): re-made on their own.
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "normal"]).unwrap();
    assert!(
        killed.trim().parse::<u64>().unwrap() >= 1,
        "no client was connected"
    );
    recovers(&sidecar).await;

    // Frozen: connections stay open and nothing answers; only the timeout ends a call.
    redis.pause();
    under_fault(&sidecar, 1_000).await;
    redis.resume();
    recovers(&sidecar).await;

    assert!(metric(&sidecar, "tollgate_store_failures_total").await > 0);
    assert!(
        metric(&sidecar, "tollgate_store_breaker_rejections_total").await > 0,
        "the breaker never opened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_load_loses_no_granted_usage() {
    let redis = RedisServer::start();
    let text = config(&node(&redis, "")).replace(
        &format!("limit: {ACME_ORG_CAP}, period: P1D"),
        "limit: 1000000000, period: P1D",
    );
    let mut replicas: Vec<Sidecar> = (0..3).map(|_| Sidecar::start(&text).unwrap()).collect();
    let granted = Arc::new(AtomicU64::new(0));
    // Units of calls that failed, whose outcome the client never learned.
    let unknown = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..48usize {
        let addr = format!("http://{}", replicas[client % 3].ext_authz);
        let (granted, unknown, stop) = (
            Arc::clone(&granted),
            Arc::clone(&unknown),
            Arc::clone(&stop),
        );
        tasks.push(tokio::spawn(async move {
            let mut c = AuthorizationClient::connect(addr).await.unwrap();
            for i in 0..100_000usize {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let size = SIZES[(client + i) % SIZES.len()];
                match c
                    .check(check(USERS[(client + i) % USERS.len()], size))
                    .await
                {
                    Ok(r) if r.get_ref().status.as_ref().unwrap().code == 0 => {
                        granted.fetch_add(size, Ordering::Relaxed);
                    }
                    Ok(r) => panic!("denied under a cap of 1e9: {r:?}"),
                    Err(_) => {
                        // The replica is gone; this client's last call may or may not have
                        // been counted. It stops here.
                        unknown.fetch_add(size, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    replicas[0].signal("KILL").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    replicas[0].proc.kill();
    replicas.remove(0);
    let granted = granted.load(Ordering::Relaxed);
    let unknown = unknown.load(Ordering::Relaxed);
    assert!(granted > 0);
    assert!(unknown > 0, "no client saw the replica die");
    for r in &replicas {
        let counted = org_counter(r).await;
        assert!(
            counted >= granted,
            "granted usage lost: {counted} counted, {granted} granted"
        );
        assert!(
            counted <= granted + unknown,
            "{counted} counted, more than {granted} granted plus {unknown} in flight at the kill"
        );
    }
}

/// An operator API call on a replica: the status and the JSON body.
async fn admin(
    s: &Sidecar,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut r = reqwest::Client::new()
        .request(method, format!("http://{}{path}", s.http))
        .bearer_auth(common::service::OPERATOR);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

/// Waits (at most 10 s) until `path` on `s` mentions `needle`.
async fn until_listed(s: &Sidecar, path: &str, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = admin(s, reqwest::Method::GET, path, None).await;
        if v.to_string().contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle} never reached the replica at {}: {v}",
            s.http
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_changes_on_one_replica_reach_every_replica() {
    use reqwest::Method;
    use serde_json::json;
    let redis = RedisServer::start();
    let text = config(&node(&redis, ""));
    let a = Sidecar::start(&text).unwrap();
    let b = Sidecar::start(&text).unwrap();

    // A limit and a grant made at the same moment on two replicas: the second to save finds
    // the first's change saved, takes it in and saves both; neither is lost.
    let limit =
        json!({"id": "org-credits", "entity": "acme", "feature": "ai-requests", "kind": "credits"});
    let team = json!({"id": "ml-requests", "entity": "ml", "feature": "ai-requests", "kind": "quota", "limit": 1000, "period": "P1D"});
    let (on_a, on_b) = tokio::join!(
        admin(&a, Method::POST, "/v1/customers/acme/limits", Some(limit)),
        admin(&b, Method::POST, "/v1/customers/acme/limits", Some(team)),
    );
    assert_eq!(on_a.0, 201, "{}", on_a.1);
    assert_eq!(on_b.0, 201, "{}", on_b.1);
    for s in [&a, &b] {
        until_listed(s, "/v1/customers/acme/limits", "org-credits").await;
        until_listed(s, "/v1/customers/acme/limits", "ml-requests").await;
    }
    let grant = json!({"id": "g1", "entity": "acme", "feature": "ai-requests", "amount": 10, "category": "paid"});
    let (status, r) = admin(&b, Method::POST, "/v1/customers/acme/grants", Some(grant)).await;
    assert_eq!(status, 201, "{r}");
    until_listed(&a, "/v1/customers/acme/grants", "\"g1\"").await;

    // One pool of 10 credits, spent 3 at a time through both replicas: three fit, a fourth
    // does not, wherever it is asked.
    let spend =
        json!({"featureId": "ai-requests", "requestedUsage": 3, "dimensions": {"userId": "alice"}});
    for (s, expected) in [(&a, true), (&b, true), (&a, true), (&b, false), (&a, false)] {
        let (_, r) = admin(
            s,
            Method::POST,
            "/v1/customers/acme/entitlements/check",
            Some(spend.clone()),
        )
        .await;
        assert_eq!(r["isGranted"], expected, "{r}");
    }

    // A replica started later has them from the start.
    let c = Sidecar::start(&text).unwrap();
    let (_, limits) = admin(&c, Method::GET, "/v1/customers/acme/limits", None).await;
    assert!(limits.to_string().contains("org-credits"), "{limits}");
    assert!(limits.to_string().contains("ml-requests"), "{limits}");
}

#[test]
fn an_unreachable_redis_at_start_is_refused_with_the_address() {
    // A port nothing listens on: taken and released.
    let port = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.yaml");
    let url = format!("redis://127.0.0.1:{port}/");
    std::fs::write(
        &config,
        self::config(&format!(
            "{{ kind: redis, url: \"{url}\", timeoutMs: 200 }}"
        )),
    )
    .unwrap();
    // Refused with the reason, having served nothing (no ready line).
    let err = Sidecar::refused_start(&config).unwrap();
    assert!(
        err.contains(&format!("redis storage: cannot connect to {url}")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_from_the_environment_connects_and_never_shows_in_errors() {
    let redis = RedisServer::start();
    let storage = "{ kind: redis, urlEnv: TOLLGATE_REDIS_URL, prefix: tgenv, timeoutMs: 5000 }";
    let s =
        Sidecar::start_with_env(&config(storage), &[("TOLLGATE_REDIS_URL", &redis.url())]).unwrap();
    let mut client = AuthorizationClient::connect(format!("http://{}", s.ext_authz))
        .await
        .unwrap();
    let answer = client.check(check("alice", 5)).await.unwrap();
    assert_eq!(answer.get_ref().status.as_ref().unwrap().code, 0);
    assert_eq!(
        org_counter(&s).await,
        5,
        "the decision was counted in Redis"
    );

    // A URL with a password to a port nothing listens on: the error names the variable.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.yaml");
    std::fs::write(&path, config(storage)).unwrap();
    let url = format!("redis://:s3cret-pass@127.0.0.1:{}/", common::free_port());
    let err = Sidecar::refused_start_with_env(&path, &[("TOLLGATE_REDIS_URL", &url)]).unwrap();
    assert!(
        err.contains("cannot connect to the URL in $TOLLGATE_REDIS_URL"),
        "{err}"
    );
    assert!(!err.contains("s3cret-pass"), "the password leaked: {err}");
    // Unset: refused, saying which variable.
    let err = Sidecar::refused_start_with_env(&path, &[]).unwrap();
    assert!(
        err.contains("`server.storage.urlEnv` names `TOLLGATE_REDIS_URL`, which is not set"),
        "{err}"
    );
}

/// The portal's overview and the poll that refreshes its bars answer 503 while Redis is down,
/// as the API does (not 400: nothing was wrong with the request), and answer again once
/// Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_answers_unavailable_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let sidecar = Sidecar::start(&config(&node(&redis, "portal"))).unwrap();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("http://{}", sidecar.http);
    let signed_in = http
        .post(format!("{base}/portal/login"))
        .form(&[("token", common::service::ACME_ADMIN)])
        .send()
        .await
        .unwrap();
    let cookie = signed_in
        .headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let status = |path: &'static str| {
        let req = http.get(format!("{base}{path}")).header("cookie", &cookie);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    const OVERVIEW: &str = "/portal/c/acme/";
    const BARS: &str = "/portal/c/acme/budgets?ids=acme";
    assert_eq!((status(OVERVIEW).await, status(BARS).await), (200, 200));
    redis.stop();
    assert_eq!((status(OVERVIEW).await, status(BARS).await), (503, 503));
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while (status(OVERVIEW).await, status(BARS).await) != (200, 200) {
        assert!(Instant::now() < deadline, "the portal did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
