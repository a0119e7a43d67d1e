//! Usage attribution's costs: bytes per active series (in process memory, in the durable file,
//! in Redis) and history-query latency over 30 days of rollups for 1,000 teams × 10 models.
//! Run: `bench/usage.sh`, or `cargo bench -p tollgate --bench usage` with the environment below.
//!
//! - `STORE`: `memory` (default), `durable` (a file under `$TMPDIR`) or `redis` (`REDIS_URL`).
//! - `PHASES`: `series,history` (default both).
//! - `TEAMS` (1000), `MODELS` (10), `DAYS` (30), `STEP_MIN` (60): the history is one settled
//!   call per (team, model) series every `STEP_MIN` minutes over `DAYS` days.
//! - `FILL` (`calls`): how the month of history is written after the first two rounds:
//!   `calls` (a check and a settle per record) or `local` (the batches of records a replica
//!   with escrow leases writes, 1,000 records a call: the same buckets, far sooner).
//! - `QUERIES` (20): timed runs of each query, after two untimed ones.
//! - `LOOP_SECS` (0): afterwards, run the history queries over and over for this long, two at
//!   once (a customer's most on one replica), printing `loop: start` first, so that a
//!   decision load on the same store can be measured beside them (`bench/usage-redis.sh`).
//! - `READ_BUDGET` (Redis only): `usageReadRowsPerSecond` (the store's default when unset); a
//!   read refused past it is counted in the loop, and fails the timed queries.
//! - `FILLED=1` (Redis only): the history is already in `REDIS_URL` from an earlier run with
//!   the same sizes; only the queries run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // benchmark harness code

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use tollgate::clock::ManualClock;
use tollgate::config::server::Storage;
use tollgate::core::Timestamp;
use tollgate::core::rollup::Granularity;
use tollgate::core::usage::Usage;
use tollgate::usage::{HistoryRequest, TopRequest};
use tollgate::{CheckRequest, Engine};

const DAY_MS: i64 = 86_400_000;
/// The end of the history (2026-05-28T20:26:40Z): the clock stands here for the queries.
const END_MS: i64 = 1_780_000_000_000;
/// Calls in flight at once while filling (only a networked store overlaps them).
const IN_FLIGHT: usize = 64;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(teams: usize, storage: &str) -> String {
    let mut s = String::from(
        "entityTypes:\n  - name: org\n  - name: team\n    parents: [org]\n\
         attribution:\n  - { dimension: teamId, entityType: team, onUnknown: reject }\n\
         features:\n  - id: tokens\n\
         usageRecords: { dimensions: [model], maxQueryPoints: 400000 }\n\
         customers:\n  - id: c0\n    entities:\n      - { id: c0, type: org }\n",
    );
    for t in 0..teams {
        s.push_str(&format!(
            "      - {{ id: t{t:04}, type: team, parent: c0 }}\n"
        ));
    }
    s.push_str(
        "    limits:\n      - { id: org-monthly, entity: c0, feature: tokens, kind: quota, limit: 1000000000000000, period: P1M }\n",
    );
    s.push_str(&format!("server:\n  storage: {{ {storage} }}\n"));
    s
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// What the store occupies, as the bench can see it: the process's resident set, the durable
/// file's size, or Redis's `used_memory`.
struct Meter {
    kind: String,
    file: Option<std::path::PathBuf>,
    redis_port: Option<String>,
}

impl Meter {
    fn read(&self, engine: &Engine) -> u64 {
        match self.kind.as_str() {
            "durable" => {
                engine.store().flush().unwrap();
                std::fs::metadata(self.file.as_ref().unwrap())
                    .unwrap()
                    .len()
            }
            "redis" => {
                let out = std::process::Command::new("redis-cli")
                    .args(["-p", self.redis_port.as_ref().unwrap(), "info", "memory"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .find_map(|l| l.strip_prefix("used_memory:"))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap()
            }
            _ => rss_bytes(),
        }
    }

    fn what(&self) -> &'static str {
        match self.kind.as_str() {
            "durable" => "file size",
            "redis" => "Redis used_memory",
            _ => "RSS",
        }
    }
}

/// One settled call for every (team, model) series at the clock's time.
async fn fill(engine: &Engine, teams: usize, models: usize, round: u64) {
    let calls = (0..teams).flat_map(|t| (0..models).map(move |m| (t, m)));
    futures_util::stream::iter(calls)
        .map(|(t, m)| async move {
            let dims: HashMap<String, String> = [
                ("teamId".to_string(), format!("t{t:04}")),
                ("model".to_string(), format!("model-{m}")),
            ]
            .into();
            let d = engine
                .check(&CheckRequest {
                    deadline: None,
                    customer: "c0",
                    feature: "tokens",
                    usage: Usage::units(1000),
                    dimensions: &dims,
                    dry_run: false,
                    commit: false,
                })
                .await
                .unwrap();
            assert!(d.granted, "the bench's budget is never reached");
            let spent = 100 + (t as u64 * 7 + m as u64 * 13 + round) % 900;
            engine
                .settle(d.hold_id.as_ref().unwrap(), Usage::units(spent))
                .await
                .unwrap();
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<()>()
        .await;
}

/// One settled record for every (team, model) series at `at`, written as a leased replica's
/// batches of local records; `batch` numbers the batches.
async fn fill_local(
    engine: &Engine,
    teams: usize,
    models: usize,
    round: u64,
    at: Timestamp,
    batch: &mut u64,
) {
    use tollgate::core::Name;
    use tollgate::core::rollup::{LocalRecord, Measures, RecordKind, SeriesDraft};
    let records: Vec<LocalRecord> = (0..teams)
        .flat_map(|t| (0..models).map(move |m| (t, m)))
        .map(|(t, m)| LocalRecord {
            kind: RecordKind::Settled,
            at,
            series: SeriesDraft {
                feature: Name::from("tokens"),
                chain: vec![
                    (Name::from("orgId"), Name::from("c0")),
                    (
                        Name::from("teamId"),
                        Name::from(format!("t{t:04}").as_str()),
                    ),
                ],
                dimensions: vec![(Name::from("model"), format!("model-{m}").into())],
            },
            measures: Measures {
                units: 100 + (t as u64 * 7 + m as u64 * 13 + round) % 900,
                requests: 1,
                ..Measures::default()
            },
            seq: (round << 32) | (t * models + m) as u64,
            tag: (u128::from(round) << 64) | (t * models + m) as u128,
        })
        .collect();
    for chunk in records.chunks(1000) {
        *batch += 1;
        engine
            .store()
            .usage()
            .record_local(
                Name::from("c0"),
                tollgate::store::BatchId {
                    writer: 7,
                    seq: *batch,
                },
                chunk,
                at,
            )
            .await
            .unwrap();
    }
}

fn history(
    from: i64,
    window: Granularity,
    group_by: &[&str],
    filters: &[(&str, &str)],
) -> HistoryRequest {
    HistoryRequest::utc(from, END_MS, window, group_by, filters)
}

fn report(label: &str, hist: &Histogram<u64>, points: usize) {
    println!(
        "query {label:<44} points {points:>7}  p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  ({} runs)",
        hist.value_at_quantile(0.50) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
        hist.len()
    );
}

/// The durable file's tables that attribution writes, after the store is closed: bytes the
/// rows hold (keys and values) and the B-tree pages around them.
fn durable_tables(file: &std::path::Path, series: usize) {
    use redb::{ReadableDatabase, ReadableTableMetadata, TableDefinition};
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let db = loop {
        match redb::Database::open(file) {
            Ok(db) => break db,
            // The store's writer thread lets go of the file as it shuts down.
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("cannot reopen {}: {e}", file.display()),
        }
    };
    let txn = db.begin_read().unwrap();
    let stats = |name: &str| {
        let t = txn
            .open_table(TableDefinition::<&[u8], &[u8]>::new(name))
            .unwrap();
        let s = t.stats().unwrap();
        (
            t.len().unwrap(),
            s.stored_bytes(),
            s.metadata_bytes() + s.fragmented_bytes(),
        )
    };
    let events = txn
        .open_table(TableDefinition::<u64, &[u8]>::new("usage_events"))
        .unwrap();
    let ev = events.stats().unwrap();
    let (n_series, s_stored, s_pages) = stats("usage_series");
    let (n_buckets, b_stored, b_pages) = stats("usage_buckets");
    println!(
        "durable tables: usage_series {n_series} rows {s_stored} B (+{s_pages} B pages), usage_buckets {n_buckets} rows {b_stored} B (+{b_pages} B pages): {:.0} B per active series in rows, {:.0} B with pages; usage_events {} rows {} B (+{} B pages): {:.0} B per record",
        (s_stored + b_stored) as f64 / series as f64,
        (s_stored + b_stored + s_pages + b_pages) as f64 / series as f64,
        events.len().unwrap(),
        ev.stored_bytes(),
        ev.metadata_bytes() + ev.fragmented_bytes(),
        ev.stored_bytes() as f64 / events.len().unwrap().max(1) as f64,
    );
}

async fn main_async() {
    let kind = std::env::var("STORE").unwrap_or_else(|_| "memory".into());
    let phases = std::env::var("PHASES").unwrap_or_else(|_| "series,history".into());
    let (teams, models, days, step_min, queries) = (
        env("TEAMS", 1000),
        env("MODELS", 10),
        env("DAYS", 30),
        env("STEP_MIN", 60),
        env("QUERIES", 20),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("usage.redb");
    let redis_url = std::env::var("REDIS_URL").unwrap_or_default();
    let storage = match kind.as_str() {
        "durable" => format!(
            "kind: durable, path: {}, durability: batched",
            file.display()
        ),
        "redis" => format!(
            "kind: redis, url: \"{redis_url}\", timeoutMs: 5000{}",
            std::env::var("READ_BUDGET")
                .map(|b| format!(", usageReadRowsPerSecond: {b}"))
                .unwrap_or_default()
        ),
        _ => "kind: memory".to_string(),
    };
    let loaded = tollgate::config::load(&config(teams, &storage), "usage-bench.yaml").unwrap();
    if let Storage::Redis(_) = loaded.server.storage {
        assert!(!redis_url.is_empty(), "STORE=redis needs REDIS_URL");
    }
    let store = tollgate::server::open_store(&loaded.server.storage)
        .await
        .unwrap();
    let start = END_MS - days as i64 * DAY_MS;
    let clock = Arc::new(ManualClock::new(Timestamp::from_millis(start)));
    let engine = Engine::new(loaded.model, store, clock.clone())
        .await
        .unwrap();
    let meter = Meter {
        kind: kind.clone(),
        file: Some(file.clone()),
        redis_port: redis_url
            .rsplit(':')
            .next()
            .map(|p| p.trim_end_matches('/').to_string()),
    };
    let series = teams * models;
    println!(
        "# store {kind}; {teams} teams x {models} models = {series} series; {days} days, one call per series every {step_min} min"
    );

    // Round 0 makes every series; round 1, in the same minute, adds the same records into the
    // existing series and buckets, so it costs only what every record costs (its event on the
    // usage stream). The difference is the series' own cost.
    let filled = kind == "redis" && std::env::var("FILLED").is_ok_and(|v| v == "1");
    let m0 = meter.read(&engine);
    if filled {
        clock.set(Timestamp::from_millis(END_MS));
    } else {
        fill(&engine, teams, models, 0).await;
    }
    let m1 = meter.read(&engine);
    if !filled {
        fill(&engine, teams, models, 1).await;
    }
    let m2 = meter.read(&engine);
    let (first, second) = (m1.saturating_sub(m0), m2.saturating_sub(m1));
    println!(
        "series: {} grew {} B for {series} new series (one minute, hour and day bucket each) and {} B for {series} more records into them: {:.0} B per active series, {:.0} B per record (its stream event)",
        meter.what(),
        first,
        second,
        first.saturating_sub(second) as f64 / series as f64,
        second as f64 / series as f64,
    );
    if kind == "durable" {
        // The file grows in whole regions and rewrites pages copy-on-write, so its size says
        // little about what the rows take: read the tables' own accounting instead.
        drop(engine);
        durable_tables(&file, series);
        return;
    }
    if !phases.contains("history") {
        return;
    }

    let steps = (days as i64 * DAY_MS) / (step_min as i64 * 60_000);
    let before = meter.read(&engine);
    let filling = Instant::now();
    let local = std::env::var("FILL").is_ok_and(|v| v == "local");
    let mut batch = 0;
    for s in (1..steps).filter(|_| !filled) {
        let at = Timestamp::from_millis(start + s * step_min as i64 * 60_000);
        clock.set(at);
        if local {
            fill_local(&engine, teams, models, s as u64, at, &mut batch).await;
        } else {
            fill(&engine, teams, models, s as u64).await;
        }
    }
    clock.set(Timestamp::from_millis(END_MS));
    let calls = steps as usize * series * if local { 1 } else { 2 };
    println!(
        "history: {} {} ({} per series) in {:.1} s; {} grew {:.1} MiB",
        calls,
        if local {
            "records in local batches"
        } else {
            "calls"
        },
        steps,
        filling.elapsed().as_secs_f64(),
        meter.what(),
        meter.read(&engine).saturating_sub(before) as f64 / 1048576.0
    );

    let month = END_MS - days as i64 * DAY_MS;
    let d = format!("{days} d");
    let cases: Vec<(String, HistoryRequest)> = vec![
        (
            format!("{d} by DAY, groupBy teamId"),
            history(month, Granularity::Day, &["teamId"], &[]),
        ),
        (
            format!("{d} by DAY, groupBy teamId, model"),
            history(month, Granularity::Day, &["teamId", "model"], &[]),
        ),
        (
            format!("{d} by HOUR, filter teamId, groupBy model"),
            history(month, Granularity::Hour, &["model"], &[("teamId", "t0001")]),
        ),
        (
            format!("{d} by HOUR, no groupBy"),
            history(month, Granularity::Hour, &[], &[]),
        ),
        (
            "24 h by MINUTE, groupBy model".to_string(),
            history(END_MS - DAY_MS, Granularity::Minute, &["model"], &[]),
        ),
    ];
    for (label, req) in cases.clone() {
        let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
        let mut points = 0;
        for i in 0..queries + 2 {
            let t0 = Instant::now();
            let h = tollgate::usage::history(&engine, "c0", req.clone())
                .await
                .unwrap();
            let us = t0.elapsed().as_micros() as u64;
            points = h.series.iter().map(|s| s.points.len()).sum();
            if i >= 2 {
                hist.record(us.max(1)).unwrap();
            }
        }
        report(&label, &hist, points);
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
    for i in 0..queries + 2 {
        let t0 = Instant::now();
        let top = tollgate::usage::top(
            &engine,
            "c0",
            TopRequest {
                by: "teamId".into(),
                feature: None,
                from: Some(month),
                to: Some(END_MS),
                filters: Vec::new(),
                limit: 10,
            },
        )
        .await
        .unwrap();
        assert_eq!(top.rows.len(), 10);
        if i >= 2 {
            hist.record((t0.elapsed().as_micros() as u64).max(1))
                .unwrap();
        }
    }
    report(&format!("top 10 teamId over {d}"), &hist, 10);

    let loop_secs = env("LOOP_SECS", 0);
    if loop_secs > 0 {
        println!("loop: start");
        let deadline = Instant::now() + std::time::Duration::from_secs(loop_secs as u64);
        let one = |offset: usize| {
            let (engine, cases) = (&engine, &cases);
            async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap();
                let (mut i, mut refused) = (offset, 0u64);
                while Instant::now() < deadline {
                    let (_, req) = &cases[i % cases.len()];
                    let t0 = Instant::now();
                    match tollgate::usage::history(engine, "c0", req.clone()).await {
                        Ok(_) => hist
                            .record((t0.elapsed().as_micros() as u64).max(1))
                            .unwrap(),
                        // Over the customer's read budget: as a dashboard would, wait a little.
                        Err(tollgate::usage::UsageError::Store(
                            tollgate::store::StoreError::ReadBudget(_),
                        )) => {
                            refused += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("{e}"),
                    }
                    i += 1;
                }
                (hist, refused)
            }
        };
        let ((mut a, ra), (b, rb)) = tokio::join!(one(0), one(2));
        a.add(b).unwrap();
        report(
            &format!(
                "loop of every query above for {loop_secs} s ({} refused over the read budget)",
                ra + rb
            ),
            &a,
            0,
        );
    }
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(main_async());
}
