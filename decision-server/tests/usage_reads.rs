//! Usage reads on Redis answer exactly as the in-process store does, whichever way a bucket is
//! read: scanned field by field, from its sealed copies (totals, sums per attribute, rows), or
//! only the series the index names for a filter; and a record written into a bucket after it
//! was sealed is never hidden by the old copy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{Harness, harness, tree_with};
use tollgate::core::Name;
use tollgate::core::Timestamp;
use tollgate::core::rollup::{Granularity, LocalRecord, Measures, RecordKind, SeriesDraft};
use tollgate::store::{BucketReads, CounterStore, RedisStore};
use tollgate::usage::{HistoryRequest, TopRequest};

test_with_redis_stores!(reads_answer_as_in_process_whichever_way_a_bucket_is_read);

/// Two customers on one store whose reads may take 1,000 rows a second (10,000 at once).
const BUDGET_CONFIG: &str = r#"
entityTypes:
  - name: org
features:
  - id: tokens
usageRecords: { dimensions: [model], maxValuesPerDimension: 20000, maxQueryPoints: 1000000 }
customers:
  - id: acme
    entities: [{ id: acme, type: org }]
    limits: [{ id: org-day, entity: acme, feature: tokens, kind: quota, limit: 1000000000, period: P1D }]
  - id: globex
    entities: [{ id: globex, type: org }]
    limits: [{ id: org-day, entity: globex, feature: tokens, kind: quota, limit: 1000000000, period: P1D }]
"#;

/// `n` settled records of customer `customer` at `at`, each its own model (its own series),
/// written as a leased replica's batches.
fn records(h: &Harness, customer: &str, n: usize, at: Timestamp, batch: &mut u64) {
    let all: Vec<LocalRecord> = (0..n)
        .map(|i| LocalRecord {
            kind: RecordKind::Settled,
            at,
            series: SeriesDraft {
                feature: Name::from("tokens"),
                chain: vec![(Name::from("orgId"), Name::from(customer))],
                dimensions: vec![(Name::from("model"), format!("m{i}").into())],
            },
            measures: Measures {
                units: 1,
                requests: 1,
                ..Measures::default()
            },
            seq: i as u64 + 1,
            tag: i as u128 + 1,
        })
        .collect();
    for chunk in all.chunks(1000) {
        *batch += 1;
        h.run(h.engine.store().usage().record_local(
            Name::from(customer),
            tollgate::store::BatchId {
                writer: 1,
                seq: *batch,
            },
            chunk,
            at,
        ))
        .unwrap();
    }
}

#[test]
fn a_customer_past_its_read_budget_is_refused_and_another_is_not() {
    let server = common::RedisServer::start();
    let store = common::redis_store_with(tollgate::store::RedisSettings {
        target: tollgate::store::RedisTarget::Node(server.url()),
        prefix: "budget".into(),
        timeout: std::time::Duration::from_secs(5),
        breaker_failures: 5,
        breaker_open: std::time::Duration::from_millis(500),
        read_rows_per_second: 1_000,
    });
    let h = harness(BUDGET_CONFIG, store, "2026-03-10T10:00:00Z");
    let at = Timestamp::from_millis(1_773_136_800_000); // 2026-03-10T10:00:00Z
    let mut batch = 0;
    // acme: 15,000 series in one minute, more than its 10,000 rows at once; globex: 50.
    records(&h, "acme", 15_000, at, &mut batch);
    records(&h, "globex", 50, at, &mut batch);
    h.clock.set(Timestamp::from_millis(at.millis() + 30_000));
    let read = |customer: &str| {
        h.run(tollgate::usage::history(
            &h.engine,
            customer,
            HistoryRequest::utc(
                at.millis(),
                at.millis() + 60_000,
                Granularity::Minute,
                &["model"],
                &[],
            ),
        ))
    };
    let refused = read("acme").expect_err("15,000 rows at once are past the budget");
    let text = refused.to_string();
    assert!(
        text.contains("over their budget of 1000 rows a second") && text.contains("try again in"),
        "{text}"
    );
    // Refused again at once: the budget is spent, not reset by the refusal.
    assert!(read("acme").is_err());
    // Another customer's read on the same replica is answered in full.
    let globex = read("globex").unwrap();
    assert_eq!(globex.series.len(), 50);
}

const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;

fn config() -> String {
    format!(
        "usageRecords:\n  dimensions: [model]\n  maxQueryPoints: 100000\n{}",
        tree_with(
            "limits:\n  - { id: org-day, entity: acme, feature: tokens, kind: quota, limit: 100000000, period: P1D }\n  - { id: u4-day, entity: u4, feature: tokens, kind: quota, limit: 300, period: P1D }\n"
        )
    )
}

/// The same calls on both harnesses at time `at`: every user on two of three models, some
/// denied by u4's day quota, one released.
fn calls(stores: &[&Harness], at: i64, round: u64) {
    for h in stores {
        h.clock.set(Timestamp::from_millis(at));
    }
    for (i, user) in ["u1", "u2", "u3", "u4"].iter().enumerate() {
        for (j, model) in ["m1", "m2", "m3"].iter().enumerate() {
            if (i + j + round as usize).is_multiple_of(3) {
                continue;
            }
            let units = 10 + (i as u64 * 7 + j as u64 * 3 + round) % 40;
            for h in stores {
                let d = h.check(
                    "acme",
                    "tokens",
                    units,
                    &[("userId", user), ("model", model)],
                );
                match d.hold_id {
                    Some(hold) if (i + j) % 5 == 4 => h.release(&hold),
                    Some(hold) => h.settle(&hold, units - 3),
                    None => {}
                }
            }
        }
    }
}

/// A query's `groupBy` and filters.
type Shape<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);

/// Every query of the test on `h`, each answer as text.
fn answers(h: &Harness, start: i64, now: i64) -> Vec<String> {
    let shapes: &[Shape] = &[
        (&[], &[]),
        (&["teamId"], &[]),
        (&["model"], &[]),
        (&["teamId", "model"], &[]),
        (&["userId", "deniedBy"], &[]),
        (&["featureId"], &[]),
        (&["model"], &[("teamId", "t1")]),
        (&["teamId", "userId"], &[("model", "m2")]),
        (&[], &[("userId", "u4")]),
        (&["model", "userId"], &[("teamId", "t1"), ("model", "m1")]),
        (
            &["model", "teamId"],
            &[("featureId", "tokens"), ("deptId", "d1")],
        ),
        (&["userId", "model"], &[("teamId", "t9")]),
    ];
    let mut out = Vec::new();
    for (window, from) in [
        (Granularity::Day, start),
        (Granularity::Hour, start),
        (Granularity::Minute, now - 2 * HOUR),
    ] {
        for (group_by, filters) in shapes {
            let req = HistoryRequest::utc(from, now, window, group_by, filters);
            let h = h
                .run(tollgate::usage::history(&h.engine, "acme", req))
                .unwrap();
            out.push(format!(
                "{window:?} {group_by:?} {filters:?}: {:?}",
                h.series
            ));
        }
    }
    for (by, filters) in [
        ("teamId", vec![]),
        ("model", vec![]),
        ("userId", vec![("teamId".to_string(), "t1".to_string())]),
        ("deptId", vec![("model".to_string(), "m3".to_string())]),
    ] {
        let req = TopRequest {
            by: by.into(),
            feature: None,
            from: Some(start),
            to: Some(now),
            filters: filters.clone(),
            limit: 10,
        };
        let top = h.run(tollgate::usage::top(&h.engine, "acme", req)).unwrap();
        out.push(format!("top {by} {filters:?}: {:?}", top.rows));
    }
    out
}

fn reads(store: &RedisStore) -> BucketReads {
    store.stats().bucket_reads
}

fn compare(redis: &Harness, memory: &Harness, start: i64, now: i64, what: &str) {
    for h in [redis, memory] {
        h.clock.set(Timestamp::from_millis(now));
    }
    let (a, b) = (answers(redis, start, now), answers(memory, start, now));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "{what}: Redis and in process differ");
    }
}

fn reads_answer_as_in_process_whichever_way_a_bucket_is_read(store: Arc<RedisStore>) {
    let start = Timestamp::from_millis(1_773_100_800_000).millis(); // 2026-03-10T00:00:00Z
    let redis = harness(&config(), store.clone(), "2026-03-10T00:00:00Z");
    let memory = harness(&config(), common::memory(), "2026-03-10T00:00:00Z");
    // Three days of calls, every five hours and a few minutes, then some in the last hours.
    let mut round = 0;
    let mut at = start + 7 * 60_000;
    while at < start + 3 * DAY {
        calls(&[&redis, &memory], at, round);
        round += 1;
        at += 5 * HOUR + 13 * 60_000;
    }
    let now = start + 3 * DAY + 12 * HOUR;
    for minutes in [20, 75, 110] {
        calls(&[&redis, &memory], now - minutes * 60_000, round);
        round += 1;
    }

    // First reads scan every bucket (and seal the closed ones), then the same reads take the
    // seals and the index.
    compare(&redis, &memory, start, now, "first reads");
    let first = reads(&store);
    assert!(first.scanned > 0, "{first:?}");
    compare(&redis, &memory, start, now, "reads of sealed buckets");
    let second = reads(&store);
    assert!(
        second.sealed > first.sealed,
        "no bucket was read from a seal: {second:?}"
    );
    assert!(
        second.indexed > first.indexed,
        "no read used the index: {second:?}"
    );
    assert!(
        second.scanned - first.scanned < first.scanned,
        "the second reads scanned as much as the first: {first:?} then {second:?}"
    );

    // Records written into buckets already sealed, as a leased replica's batch that reaches
    // the store late does (a past minute, hour and day, and new series in them): the next
    // reads see them.
    let late = Timestamp::from_millis(start + DAY + 3 * HOUR + 60_000);
    let batch: Vec<LocalRecord> = [("u1", "m1"), ("u2", "m9"), ("u4", "m2")]
        .iter()
        .enumerate()
        .map(|(i, (user, model))| LocalRecord {
            kind: RecordKind::Settled,
            at: late,
            series: SeriesDraft {
                feature: Name::from("tokens"),
                chain: vec![(Name::from("userId"), Name::from(*user))],
                dimensions: vec![(Name::from("model"), (*model).into())],
            },
            measures: Measures {
                units: 11 + i as u64,
                requests: 1,
                ..Measures::default()
            },
            seq: (1 << 52) | i as u64,
            tag: i as u128 + 1,
        })
        .collect();
    for h in [&redis, &memory] {
        h.clock.set(Timestamp::from_millis(now));
        h.run(h.engine.store().usage().record_local(
            Name::from("acme"),
            tollgate::store::BatchId { writer: 9, seq: 1 },
            &batch,
            Timestamp::from_millis(now),
        ))
        .unwrap();
    }
    compare(
        &redis,
        &memory,
        start,
        now,
        "reads after writes into sealed buckets",
    );
    compare(
        &redis,
        &memory,
        start,
        now,
        "reads of the buckets sealed again",
    );
    let third = reads(&store);
    assert!(third.sealed > second.sealed, "{third:?}");
}
