//! The real binary with escrow leases on a Redis store: three replicas racing one cap on a
//! node and on a 3-master Cluster (never over it, run to within one request of it, the
//! counter converging to exactly what was granted), Redis frozen and then killed and restarted mid-race (replicas keep granting inside
//! their leases, then follow the fail mode; the counters converge), and a replica killed while
//! it holds leases (its slices expire in Redis and are committed: nothing lost, the overcount
//! bounded by what it held).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::ext_authz::{check, metric, org_counter};
use common::webhooks::{Receiver, WHSEC};
use common::{LOOPBACK_PORT_0, RedisCluster, RedisServer, Sidecar};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;

const SIZES: [u64; 4] = [1, 3, 7, 13];
const USERS: [&str; 3] = ["alice", "bob", "carol"];
const LARGEST: u64 = 13;

/// One test at a time: each runs three sidecars, Redis and 24 to 64 clients, and on a
/// two-core machine three at once starve the replicas' sweeps, whose timing is part of what
/// these tests check (a slice must go back before Redis expires it).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The fixture config on Redis with leases on, holds of 5 s (a decision is made inside a
/// lease only if its hold ends 1.5 s before the lease's 15 s less 1 s of skew), and acme's org cap
/// at `cap`.
fn config(redis: &RedisServer, timeout_ms: u64, cap: u64) -> String {
    config_on(&format!("url: \"{}\"", redis.url()), timeout_ms, cap)
}

/// The same on the Redis `target` (`url: …` or `cluster: [...]`).
fn config_on(target: &str, timeout_ms: u64, cap: u64) -> String {
    let storage = format!(
        "{{ kind: redis, {target}, prefix: tg, timeoutMs: {timeout_ms}, breakerFailures: 1000, leases: {{ enabled: true, ttl: PT15S, skew: PT1S }} }}"
    );
    let text = common::service::config_with(&format!("{LOOPBACK_PORT_0}\n  storage: {storage}"));
    format!("holdTtl: PT5S\n{text}").replace(
        &format!("limit: {}, period: P1D", common::service::ACME_ORG_CAP),
        &format!("limit: {cap}, period: P1D"),
    )
}

/// Waits until the store's org counter reads `expected` (slices and holds end on their own:
/// local holds after 5 s, idle slices a second or two after their last decision), at most 30 s.
async fn converges(replicas: &[Sidecar], expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counted = org_counter(&replicas[0]).await;
        if counted == expected {
            return;
        }
        if Instant::now() > deadline {
            let mut leases = Vec::new();
            for r in replicas {
                let mut m = Vec::new();
                for name in [
                    "local_decisions_total",
                    "slices_placed_total",
                    "slices_returned_total",
                    "stranded_units_total",
                    "outstanding_units",
                ] {
                    m.push((name, metric(r, &format!("tollgate_lease_{name}")).await));
                }
                leases.push(m);
            }
            panic!(
                "the org counter reads {counted}, not the {expected} granted, 30 s after the load; leases: {leases:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    granted: AtomicU64,
    refused: AtomicU64,
    /// Units of calls whose outcome the client never learned (its replica died).
    unknown: AtomicU64,
    /// Units granted while `outage` was set.
    granted_in_outage: AtomicU64,
    outage: AtomicBool,
    stop: AtomicBool,
}

/// `clients` ext_authz clients over `addrs` until `stop`, or until each has been refused 200
/// times in a row, 50 ms apart (the budget is spent: a slice still out comes back once its
/// open holds end, and ext_authz holds end only at their 5 s TTL, so each keeps asking for
/// 10 s), at most 3,000 checks and 90 s each.
fn load(addrs: &[String], clients: usize, tally: &Arc<Tally>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|client| {
            let addr = format!("http://{}", addrs[client % addrs.len()]);
            let tally = Arc::clone(tally);
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(90);
                let mut c = AuthorizationClient::connect(addr).await.unwrap();
                let mut refused_in_a_row = 0;
                for i in 0..3_000usize {
                    if tally.stop.load(Ordering::Relaxed)
                        || Instant::now() > deadline
                        || refused_in_a_row > 200
                    {
                        break;
                    }
                    let size = SIZES[(client + i) % SIZES.len()];
                    match c
                        .check(check(USERS[(client + i) % USERS.len()], size))
                        .await
                    {
                        Ok(r) if r.get_ref().status.as_ref().unwrap().code == 0 => {
                            refused_in_a_row = 0;
                            tally.granted.fetch_add(size, Ordering::Relaxed);
                            if tally.outage.load(Ordering::Relaxed) {
                                tally.granted_in_outage.fetch_add(size, Ordering::Relaxed);
                            }
                        }
                        // Denied, or the store unreachable (Envoy then applies the route's
                        // fail mode; these tests' routes fail closed).
                        Ok(_) => {
                            refused_in_a_row += 1;
                            tally.refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) if e.message().contains("counter store") => {
                            refused_in_a_row += 1;
                            tally.refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(_) => {
                            tally.unknown.fetch_add(size, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_with_leases_race_a_cap_to_its_end_and_the_counter_converges() {
    let _one_at_a_time = SERIAL.lock().await;
    let redis = RedisServer::start();
    race_to_the_end(&config(&redis, 5_000, 3_000), 3_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_with_leases_on_a_redis_cluster_race_a_cap_to_its_end() {
    let _one_at_a_time = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let target = format!("cluster: [{}]", urls.join(", "));
    race_to_the_end(&config_on(&target, 5_000, 3_000), 3_000).await;
}

/// Three replicas of `text`, 64 clients racing acme's org cap of `cap` to its end: never
/// over, less than one request left, some decisions inside leases, and the counter
/// converging to exactly what was granted with nothing stranded.
async fn race_to_the_end(text: &str, cap: u64) {
    let replicas: Vec<Sidecar> = (0..3).map(|_| Sidecar::start(text).unwrap()).collect();
    let addrs: Vec<String> = replicas.iter().map(|r| r.ext_authz.clone()).collect();
    let tally = Arc::new(Tally::default());
    for t in load(&addrs, 64, &tally) {
        t.await.unwrap();
    }
    let granted = tally.granted.load(Ordering::Relaxed);
    assert!(granted <= cap, "granted {granted}, past the cap {cap}");
    assert!(
        cap - granted < LARGEST,
        "budget stranded at the end: {granted} of {cap} granted"
    );
    let mut local = 0;
    for r in &replicas {
        local += metric(r, "tollgate_lease_local_decisions_total").await;
    }
    assert!(local > 0, "no decision was made inside a lease");
    converges(&replicas, granted).await;
    for r in &replicas {
        assert_eq!(metric(r, "tollgate_lease_stranded_units_total").await, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_then_killed_mid_race_grants_only_inside_leases_and_converges() {
    let _one_at_a_time = SERIAL.lock().await;
    // Persisted on every write, so a Redis killed and restarted keeps what it acknowledged.
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let cap = 400_000;
    let text = config(&redis, 200, cap);
    let replicas: Vec<Sidecar> = (0..3).map(|_| Sidecar::start(&text).unwrap()).collect();
    let addrs: Vec<String> = replicas.iter().map(|r| r.ext_authz.clone()).collect();
    let tally = Arc::new(Tally::default());
    let tasks = load(&addrs, 24, &tally);
    // Freeze Redis once every replica decides inside slices (at most 20 s of load).
    let ramp = Instant::now() + Duration::from_secs(20);
    let placed_before: u64 = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut held = Vec::new();
        for r in &replicas {
            held.push(metric(r, "tollgate_lease_outstanding_units").await);
        }
        if held.iter().all(|h| *h > 0) {
            break held.iter().sum();
        }
        assert!(
            Instant::now() < ramp,
            "the replicas hold no slices under load: {held:?}"
        );
    };
    redis.pause();
    tally.outage.store(true, Ordering::Relaxed);
    // Frozen 1.5 s, longer (up to 5 s, well inside the slices' 15 s) until some decision found
    // no room in its replica's slices and met the fail mode: how long the slices last depends
    // on how much each replica took just before, which varies from run to run.
    let frozen = Instant::now();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    while tally.refused.load(Ordering::Relaxed) == 0 && frozen.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    redis.stop();
    redis.restart();
    tally.outage.store(false, Ordering::Relaxed);
    // Decisions go on against the restarted Redis a while (the race to a cap's end is the
    // first test's).
    tokio::time::sleep(Duration::from_secs(3)).await;
    tally.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let granted = tally.granted.load(Ordering::Relaxed);
    let in_outage = tally.granted_in_outage.load(Ordering::Relaxed);
    assert!(granted <= cap, "granted {granted}, past the cap {cap}");
    assert!(
        in_outage > 0,
        "nothing was granted inside the leases while Redis was frozen"
    );
    // Every unit granted in the outage lay inside a slice the replicas held before it (a
    // decision without room in a lease needed Redis, and got the fail mode).
    assert!(
        in_outage <= placed_before + LARGEST * 64,
        "{in_outage} granted while Redis was frozen, past the {placed_before} units the leases held"
    );
    assert!(
        tally.refused.load(Ordering::Relaxed) > 0,
        "no call met the fail mode"
    );
    converges(&replicas, granted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_holding_leases_loses_nothing_and_overcounts_at_most_its_slices() {
    let _one_at_a_time = SERIAL.lock().await;
    let redis = RedisServer::start();
    let text = config(&redis, 5_000, 1_000_000_000);
    let mut replicas: Vec<Sidecar> = (0..3).map(|_| Sidecar::start(&text).unwrap()).collect();
    let addrs: Vec<String> = replicas.iter().map(|r| r.ext_authz.clone()).collect();
    let tally = Arc::new(Tally::default());
    let tasks = load(&addrs, 48, &tally);
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let held_by_victim = metric(&replicas[0], "tollgate_lease_outstanding_units").await;
    replicas[0].signal("KILL").unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    tally.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    replicas[0].proc.kill();
    replicas.remove(0);
    let granted = tally.granted.load(Ordering::Relaxed);
    let unknown = tally.unknown.load(Ordering::Relaxed);
    assert!(unknown > 0, "no client saw the replica die");
    assert!(held_by_victim > 0, "the killed replica held no lease");
    // Its slices expire in Redis after their 15 s TTL and are committed whole; the survivors'
    // idle slices come back. Then the counter stays put.
    tokio::time::sleep(Duration::from_secs(17)).await;
    let counted = org_counter(&replicas[0]).await;
    assert!(
        counted >= granted,
        "granted usage lost: {counted} counted, {granted} granted"
    );
    // A renewal holds the next slice before the last one is returned: at most two slices of
    // a counter at once, each no larger than the last reading.
    let bound = granted + unknown + 2 * held_by_victim;
    assert!(
        counted <= bound,
        "{counted} counted: past {granted} granted, {unknown} in flight at the kill and twice the {held_by_victim} units the replica held"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        org_counter(&replicas[1]).await,
        counted,
        "the counter moved after every slice had ended"
    );
}

// ---------------------------------------------------------------------------------------------
// Behind one Service: a check on one replica, its settlement on another.

/// An API call with acme's key on `replica`: the status and the JSON body.
async fn api(
    http: &reqwest::Client,
    replica: &Sidecar,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    try_api(http, &replica.http, path, body)
        .await
        .unwrap_or_else(|| panic!("no answer from {}", replica.http))
}

/// The same on the HTTP address `addr`; `None` when nothing answered (the replica is gone).
async fn try_api(
    http: &reqwest::Client,
    addr: &str,
    path: &str,
    body: serde_json::Value,
) -> Option<(u16, serde_json::Value)> {
    let r = http
        .post(format!("http://{addr}{path}"))
        .bearer_auth(common::service::ACME_KEY)
        .json(&body)
        .send()
        .await
        .ok()?;
    Some((r.status().as_u16(), r.json().await.unwrap_or_default()))
}

/// Behind one Service with leases on Redis, a replica SIGKILLed mid-load while checks on one
/// replica are settled on another (a settlement the dead replica should take goes to the
/// next one). Nothing settled is lost: holds it granted lie inside its slices, which Redis
/// commits whole when their TTL ends, whether or not their closes reached it; the overcount
/// is at most what was in flight at the kill and two slices' worth of what it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_on_another_replica_with_one_killed_mid_load() {
    let _one_at_a_time = SERIAL.lock().await;
    let redis = RedisServer::start();
    one_killed_mid_load(&config(&redis, 5_000, 1_000_000_000), true).await;
}

/// The same with leases off: every hold lies in Redis, and any replica closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_on_another_replica_with_one_killed_mid_load_without_leases() {
    let _one_at_a_time = SERIAL.lock().await;
    let redis = RedisServer::start();
    let text = config(&redis, 5_000, 1_000_000_000)
        .replace(", leases: { enabled: true, ttl: PT15S, skew: PT1S }", "");
    assert!(!text.contains("leases"));
    one_killed_mid_load(&text, false).await;
}

/// The same on a 3-master Cluster with leases on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_on_another_replica_with_one_killed_mid_load_on_a_redis_cluster() {
    let _one_at_a_time = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let target = format!("cluster: [{}]", urls.join(", "));
    one_killed_mid_load(&config_on(&target, 5_000, 1_000_000_000), true).await;
}

/// Three replicas of `text`, the first SIGKILLed mid-load; with `leases`, it held slices.
async fn one_killed_mid_load(text: &str, leases: bool) {
    let mut replicas: Vec<Sidecar> = (0..3).map(|_| Sidecar::start(text).unwrap()).collect();
    let addrs: Arc<Vec<String>> = Arc::new(replicas.iter().map(|r| r.http.clone()).collect());
    let (settled, unknown, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let clients: Vec<_> = (0..24usize)
        .map(|client| {
            let (addrs, settled, unknown, stop) = (
                Arc::clone(&addrs),
                Arc::clone(&settled),
                Arc::clone(&unknown),
                Arc::clone(&stop),
            );
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                for i in 0..2_000usize {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let size = SIZES[(client + i) % SIZES.len()];
                    let check = serde_json::json!({
                        "featureId": "ai-tokens",
                        "requestedUsage": size,
                        "dimensions": { "userId": USERS[(client + i) % USERS.len()] },
                    });
                    let path = "/v1/customers/acme/entitlements/check";
                    let Some((200, d)) =
                        try_api(&http, &addrs[(client + i) % 3], path, check).await
                    else {
                        // No answer: the replica died with the call (held at most `size`).
                        unknown.fetch_add(size, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    };
                    if d["isGranted"] != true {
                        continue;
                    }
                    let hold = d["holdId"].as_str().unwrap().to_string();
                    let actual = if i % 5 == 0 {
                        0
                    } else {
                        size - (i as u64 % size)
                    };
                    let body = serde_json::json!({ "actualUsage": actual });
                    let settle = format!("/v1/holds/{hold}/settle");
                    // The next replica, or the one after it when the next is gone.
                    let mut answered = None;
                    for k in 1..3 {
                        let on = &addrs[(client + i + k) % 3];
                        if let Some(a) = try_api(&http, on, &settle, body.clone()).await {
                            answered = Some(a);
                            break;
                        }
                    }
                    let (status, s) = answered.expect("a surviving replica answers");
                    assert_eq!(status, 200, "settle of {hold}: {s}");
                    settled.fetch_add(actual, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let held_by_victim = metric(&replicas[0], "tollgate_lease_outstanding_units").await;
    replicas[0].signal("KILL").unwrap();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    replicas[0].proc.kill();
    replicas.remove(0);
    let (settled, unknown) = (
        settled.load(Ordering::Relaxed),
        unknown.load(Ordering::Relaxed),
    );
    assert_eq!(
        held_by_victim > 0,
        leases,
        "the killed replica held {held_by_victim} units in slices"
    );
    // Its slices (15 s TTL) and holds (5 s) end in Redis, and are committed.
    tokio::time::sleep(Duration::from_secs(17)).await;
    let counted = org_counter(&replicas[0]).await;
    assert!(
        counted >= settled,
        "settled usage lost: {counted} counted, {settled} settled"
    );
    let bound = settled + unknown + 2 * held_by_victim;
    assert!(
        counted <= bound,
        "{counted} counted: past {settled} settled, {unknown} in flight at the kill and twice the {held_by_victim} units the replica held"
    );
    assert_eq!(
        org_counter(&replicas[1]).await,
        counted,
        "replicas disagree"
    );
}

/// Units of acme's `ai-tokens` in the usage history `replica` answers (hour windows over the
/// last day).
async fn history_units(http: &reqwest::Client, replica: &Sidecar) -> u64 {
    let url = format!(
        "http://{}/v1/customers/acme/usage/history?windowSize=HOUR&featureId=ai-tokens",
        replica.http
    );
    let h = common::service::get_json(http, &url, common::service::ACME_KEY).await;
    h["series"]
        .as_array()
        .unwrap_or_else(|| panic!("no series in {h}"))
        .iter()
        .flat_map(|s| s["points"].as_array().cloned().unwrap_or_default())
        .map(|p| p["units"].as_u64().unwrap_or(0))
        .sum()
}

/// What happens to Redis while the load runs.
enum Disturb<'a> {
    Nothing,
    /// These servers are frozen four times for 0.3 s.
    Stall(&'a [&'a RedisServer]),
    /// This server (persisting every write before it answers) is killed with SIGKILL a
    /// second into the load and started again a second later.
    Restart(&'a mut RedisServer),
}

/// The thresholds of the alert rule `settled_on_another_replica` adds, in percent of the cap.
const THRESHOLDS: [u64; 5] = [10, 30, 50, 70, 90];

/// `text` with an alert rule on acme's org cap at [`THRESHOLDS`], delivered to `url`.
fn with_alert(text: &str, url: &str) -> String {
    let percents: Vec<String> = THRESHOLDS.iter().map(u64::to_string).collect();
    let text = text.replacen(
        "  - id: globex\n",
        &format!(
            "    webhooks:\n      - {{ id: ops, url: \"{url}\", secrets: [{WHSEC}] }}\n    alerts:\n      - {{ id: org, entity: acme, limit: org-daily, percent: [{}], webhooks: [ops] }}\n  - id: globex\n",
            percents.join(", ")
        ),
        1,
    );
    format!("alerting: {{ allowTargets: [127.0.0.0/8] }}\n{text}")
}

/// Three replicas of `text` behind one "Service": 24 clients check on one replica and settle
/// (at part of what they held), or release, on the next one, sending a refused settlement
/// again as the filter's close queue does. Meanwhile Redis is disturbed as `disturb` says.
/// Never over the cap; once the load stops every counter reads exactly what was settled, on
/// every replica; the usage history every replica answers says the same; nothing is
/// stranded; each threshold of an alert rule on the cap was delivered once if usage reached
/// it (counted with open holds, so one above what was settled may have fired too), and never
/// twice.
async fn settled_on_another_replica(text: &str, cap: u64, disturb: Disturb<'_>) {
    let receiver = Receiver::start(0, 0).await;
    let text = with_alert(text, &receiver.url);
    assert!(
        text.contains("percent: [10,"),
        "no alert rule added: {text}"
    );
    let replicas: Arc<Vec<Sidecar>> =
        Arc::new((0..3).map(|_| Sidecar::start(&text).unwrap()).collect());
    let settled = Arc::new(AtomicU64::new(0));
    let granted_open = Arc::new(AtomicU64::new(0));
    // Calls answered 503 (the store out of reach), checks and settlements alike.
    let unavailable = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..24usize)
        .map(|client| {
            let (replicas, settled, open, unavailable) = (
                Arc::clone(&replicas),
                Arc::clone(&settled),
                Arc::clone(&granted_open),
                Arc::clone(&unavailable),
            );
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut refused_in_a_row = 0;
                for i in 0..400usize {
                    if Instant::now() > deadline || refused_in_a_row > 60 {
                        break;
                    }
                    let size = SIZES[(client + i) % SIZES.len()];
                    let on = &replicas[(client + i) % 3];
                    let elsewhere = &replicas[(client + i + 1) % 3];
                    let (status, d) = api(
                        &http,
                        on,
                        "/v1/customers/acme/entitlements/check",
                        serde_json::json!({
                            "featureId": "ai-tokens",
                            "requestedUsage": size,
                            "dimensions": { "userId": USERS[(client + i) % USERS.len()] },
                        }),
                    )
                    .await;
                    if status == 503 {
                        unavailable.fetch_add(1, Ordering::Relaxed);
                    }
                    if status != 200 || d["isGranted"] != true {
                        refused_in_a_row += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    refused_in_a_row = 0;
                    open.fetch_add(size, Ordering::Relaxed);
                    let hold = d["holdId"].as_str().unwrap().to_string();
                    // A release, or a settlement at part of the hold (never over it, so the
                    // cap bounds what is settled).
                    let actual = if i % 5 == 0 {
                        0
                    } else {
                        size - (i as u64 % size)
                    };
                    let mut tries = 0;
                    let (status, s) = loop {
                        let (status, s) = api(
                            &http,
                            elsewhere,
                            &format!("/v1/holds/{hold}/settle"),
                            serde_json::json!({ "actualUsage": actual }),
                        )
                        .await;
                        tries += 1;
                        if status != 503 || tries > 100 {
                            break (status, s);
                        }
                        unavailable.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    };
                    assert_eq!(status, 200, "settle of {hold} on another replica: {s}");
                    // A settlement sent again after one that was applied but not answered
                    // finds the hold closed: once either way.
                    assert!(
                        s["closed"] == true || tries > 1,
                        "settle of {hold} on another replica: {s}"
                    );
                    open.fetch_sub(size, Ordering::Relaxed);
                    settled.fetch_add(actual, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let restarted = matches!(disturb, Disturb::Restart(_));
    match disturb {
        Disturb::Nothing => {}
        Disturb::Stall(stall) => {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                for r in stall {
                    r.pause();
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                for r in stall {
                    r.resume();
                }
            }
        }
        Disturb::Restart(redis) => {
            tokio::time::sleep(Duration::from_secs(1)).await;
            redis.stop();
            tokio::time::sleep(Duration::from_secs(1)).await;
            tokio::task::block_in_place(|| redis.restart());
        }
    }
    for c in clients {
        c.await.unwrap();
    }
    if restarted {
        assert!(
            unavailable.load(Ordering::Relaxed) > 0,
            "no call met Redis down: the load ended before the restart"
        );
    }
    let settled = settled.load(Ordering::Relaxed);
    assert!(settled <= cap, "settled {settled}, past the cap {cap}");
    assert_eq!(granted_open.load(Ordering::Relaxed), 0);
    // Relayed closes are applied at the granting replica's next sweep and idle slices go
    // back within about two seconds: every replica then reads exactly what was settled.
    for r in replicas.iter() {
        converges(std::slice::from_ref(r), settled).await;
    }
    let http = reqwest::Client::new();
    for r in replicas.iter() {
        // Records of local decisions reach Redis with the next sweep's batch.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let units = history_units(&http, r).await;
            if units == settled {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the history on {} says {units}, the counters {settled}",
                r.http
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(metric(r, "tollgate_lease_stranded_units_total").await, 0);
        // Idle slices go back at the sweeps after a second without a decision.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = metric(r, "tollgate_lease_outstanding_units").await;
            if out == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{out} units still in slices on {} 5 s after the load",
                r.http
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    thresholds_delivered_once(&receiver, &replicas[0], settled, cap).await;
}

/// Each threshold at or under `settled` of `cap` was delivered, and none twice (by its
/// crossing: one `webhook-id` per threshold, one call per `webhook-id`).
async fn thresholds_delivered_once(receiver: &Receiver, replica: &Sidecar, settled: u64, cap: u64) {
    let reached: Vec<u64> = THRESHOLDS
        .iter()
        .copied()
        .filter(|p| settled * 100 >= p * cap)
        .collect();
    let percents = |calls: &[(axum::http::HeaderMap, String)]| -> Vec<(u64, String)> {
        calls
            .iter()
            .map(|(headers, body)| {
                let alert: serde_json::Value = serde_json::from_str(body).unwrap();
                let id = headers["webhook-id"].to_str().unwrap().to_string();
                (alert["data"]["trigger"]["percent"].as_u64().unwrap(), id)
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let seen = percents(&receiver.calls());
        if reached.iter().all(|p| seen.iter().any(|(q, _)| q == p)) {
            break;
        }
        if Instant::now() > deadline {
            let http = reqwest::Client::new();
            let url = format!(
                "http://{}/v1/customers/acme/alerts/deliveries",
                replica.http
            );
            let log = common::service::get_json(&http, &url, common::service::ACME_KEY).await;
            panic!(
                "thresholds reached {reached:?} (settled {settled} of {cap}), delivered {seen:?}; the delivery log: {log}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A second delivery would follow within a delivery pass or two.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = percents(&receiver.calls());
    for p in THRESHOLDS {
        let calls = seen.iter().filter(|(q, _)| *q == p).count();
        assert!(
            calls <= 1,
            "threshold {p}% delivered {calls} times: {seen:?}"
        );
    }
    for (headers, body) in receiver.calls() {
        standardwebhooks::Webhook::new(WHSEC)
            .unwrap()
            .verify(body.as_bytes(), &headers)
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_on_another_replica_with_leases_on_redis() {
    let _one_at_a_time = SERIAL.lock().await;
    let redis = RedisServer::start();
    settled_on_another_replica(&config(&redis, 5_000, 3_000), 3_000, Disturb::Nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_on_another_replica_with_leases_on_a_redis_cluster() {
    let _one_at_a_time = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let target = format!("cluster: [{}]", urls.join(", "));
    settled_on_another_replica(&config_on(&target, 5_000, 3_000), 3_000, Disturb::Nothing).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_on_another_replica_without_leases_on_redis() {
    let _one_at_a_time = SERIAL.lock().await;
    let redis = RedisServer::start();
    let text = config(&redis, 5_000, 3_000)
        .replace(", leases: { enabled: true, ttl: PT15S, skew: PT1S }", "");
    assert!(!text.contains("leases"));
    settled_on_another_replica(&text, 3_000, Disturb::Nothing).await;
}

/// The same with calls timing out at 100 ms while Redis stalls: checks and settlements that
/// ran in Redis unanswered are neither lost nor counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_on_another_replica_through_redis_stalls_with_leases() {
    let _one_at_a_time = SERIAL.lock().await;
    let redis = RedisServer::start();
    settled_on_another_replica(
        &config(&redis, 100, 3_000),
        3_000,
        Disturb::Stall(&[&redis]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_on_another_replica_through_cluster_stalls_with_leases() {
    let _one_at_a_time = SERIAL.lock().await;
    let cluster = RedisCluster::start();
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let target = format!("cluster: [{}]", urls.join(", "));
    let stall: Vec<&RedisServer> = cluster.nodes.iter().collect();
    settled_on_another_replica(
        &config_on(&target, 100, 3_000),
        3_000,
        Disturb::Stall(&stall),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_on_another_replica_through_redis_stalls_without_leases() {
    let _one_at_a_time = SERIAL.lock().await;
    let redis = RedisServer::start();
    let text = config(&redis, 100, 3_000)
        .replace(", leases: { enabled: true, ttl: PT15S, skew: PT1S }", "");
    settled_on_another_replica(&text, 3_000, Disturb::Stall(&[&redis])).await;
}

/// The same while Redis is killed and started again: checks and settlements refused while it
/// is down are sent again, and once it is back every counter, history and slice converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_on_another_replica_through_a_redis_restart_with_leases() {
    let _one_at_a_time = SERIAL.lock().await;
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let text = config(&redis, 100, 3_000);
    settled_on_another_replica(&text, 3_000, Disturb::Restart(&mut redis)).await;
}

/// The same on a 3-master Cluster whose master for acme's slot is killed and started again
/// (its slots stay its own: the outage is shorter than the node timeout). Each client retries
/// a settlement for up to 5 s: a replica whose Cluster connection stays broken after the
/// master is back (seen in about one run in ten before such connections were replaced after
/// 2 s of failures, `redis/link.rs`) fails it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_on_another_replica_through_a_cluster_master_restart_with_leases() {
    let _one_at_a_time = SERIAL.lock().await;
    let mut cluster = RedisCluster::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let target = format!("cluster: [{}]", urls.join(", "));
    let owner = cluster.owner_of("acme");
    settled_on_another_replica(
        &config_on(&target, 100, 3_000),
        3_000,
        Disturb::Restart(&mut cluster.nodes[owner]),
    )
    .await;
    // The master restarted was acme's: it holds acme's keys.
    let keys = cluster.keys_per_node();
    assert_eq!(
        keys.iter().max(),
        keys.get(owner),
        "keys per node {keys:?}, restarted {owner}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_on_another_replica_through_a_redis_restart_without_leases() {
    let _one_at_a_time = SERIAL.lock().await;
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let text = config(&redis, 100, 3_000)
        .replace(", leases: { enabled: true, ttl: PT15S, skew: PT1S }", "");
    settled_on_another_replica(&text, 3_000, Disturb::Restart(&mut redis)).await;
}
