//! Usage records on every store: each settle, release, expiry, ingest and denial attributed
//! once to its chain and dimensions, in minute, hour and day rollups that always equal what
//! the counters counted, and in a stream a reader resumes by cursor.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::{Harness, harness, tokens, tree_with};
use tollgate::api::dto::UsageRecordEvent;
use tollgate::core::Name;
use tollgate::core::rollup::{Granularity, Measures, OTHER, RecordKind, ScanNeeds, SeriesKey};
use tollgate::core::usage::{CUT_BY, FINISHED_PAST, SIDECAR_UNREACHABLE, Usage};
use tollgate::store::CounterStore;
use tollgate::store::events::EventBody;

type Store = Arc<dyn CounterStore>;

test_with_all_stores!(
    every_unit_is_attributed_once_and_equals_what_was_counted,
    a_streams_end_is_on_its_settle_record_with_bounded_values,
    distinct_dimension_values_fold_past_the_customers_most,
    local_record_batches_read_back_by_cursor_and_add_up,
);

test_with_redis_stores!(
    a_long_usage_read_lets_decisions_through,
    the_operators_stream_merges_every_customer,
);

/// `n` settled records of one unit each for `user` at `at`, numbered from `first`.
fn settled_records(
    at: tollgate::core::Timestamp,
    user: &str,
    first: usize,
    n: usize,
) -> Vec<tollgate::core::rollup::LocalRecord> {
    (first..first + n)
        .map(|i| tollgate::core::rollup::LocalRecord {
            kind: RecordKind::Settled,
            at,
            series: tollgate::core::rollup::SeriesDraft {
                feature: Name::from("tokens"),
                chain: vec![(Name::from("userId"), Name::from(user))],
                dimensions: Vec::new(),
            },
            measures: Measures {
                units: 1,
                requests: 1,
                ..Measures::default()
            },
            seq: (1 << 52) | i as u64,
            tag: i as u128 + 1,
        })
        .collect()
}

const LIMITS: &str = r#"
limits:
  - { id: team-day, entityType: team, feature: tokens, kind: quota, limit: 1000, period: P1D }
  - { id: user-slots, entityType: user, feature: tokens, kind: concurrency, limit: 5 }
"#;

fn config(max_values: usize) -> String {
    format!(
        "usageRecords:\n  dimensions: [region]\n  maxValuesPerDimension: {max_values}\n{}",
        tree_with(LIMITS)
    )
}

fn buckets(h: &Harness, g: Granularity) -> Vec<(i64, SeriesKey, Measures)> {
    use tollgate::clock::Clock;
    // Every bucket of the last days (the test's clock starts on 2026-03-10).
    let to = h.clock.now().millis() + 86_400_000;
    let from = g.start(tollgate::core::Timestamp::from_millis(to - 5 * 86_400_000));
    h.run(h.engine.store().usage().usage_buckets(
        Name::from("acme"),
        g,
        from,
        to,
        &ScanNeeds::all(0),
    ))
    .unwrap()
    .rows()
    .map(|(start, key, m)| (start, key.clone(), *m))
    .collect()
}

/// Sums of the buckets whose series has `key` = `value` (every series when `key` is empty).
fn sum(rows: &[(i64, SeriesKey, Measures)], key: &str, value: &str) -> Measures {
    let mut m = Measures::default();
    for (_, s, x) in rows {
        if key.is_empty() || s.get(key) == Some(value) {
            m.add(x);
        }
    }
    m
}

/// A streamed call the gateway cut (or let finish past a refusal) settles with how it ended:
/// its record carries `cutBy` / `finishedPast`, the rollups group by it, the units are the
/// same as any settle's, and a value that is not the customer's limit (or
/// `sidecar-unreachable`) is recorded as `__other__`, never as sent.
fn a_streams_end_is_on_its_settle_record_with_bounded_values(store: Store) {
    let h = harness(&config(100), store, "2026-03-10T10:00:00Z");
    let u1 = [("userId", "u1")];
    let ended = |by: &str, cut: bool, units: u64| {
        let hold = h.check("acme", "tokens", 50, &u1).hold_id.unwrap();
        let end = h.engine.stream_end("acme", cut, by);
        assert!(end.is_some(), "acme is in the model");
        h.run(h.engine.settle_ended(&hold, Usage::units(units), end))
            .unwrap();
        hold.to_string()
    };
    let cut = ended("team-day", true, 40);
    let past = ended(SIDECAR_UNREACHABLE, false, 70);
    let forged = ended("made-up-by-a-caller-1234", true, 5);
    let plain = h.check("acme", "tokens", 50, &u1).hold_id.unwrap();
    h.settle(&plain, 3);
    assert_eq!(h.counted("acme", "t1", "team-day"), 40 + 70 + 5 + 3);

    let acme = Name::from("acme");
    let page = h
        .run(h.engine.store().usage().read_events(Some(acme), None, 100))
        .unwrap();
    let attrs = |hold: &str| -> Vec<(String, String)> {
        let found: Vec<_> = page
            .events
            .iter()
            .filter_map(|e| match &*e.body {
                EventBody::Record(r) if r.kind == RecordKind::Settled => {
                    let id = UsageRecordEvent::new(&e.id, "acme", r).hold_id?;
                    (id == hold).then(|| {
                        r.series
                            .attrs
                            .iter()
                            .filter(|(k, _)| [CUT_BY, FINISHED_PAST].contains(&k.as_ref()))
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect()
                    })
                }
                _ => None,
            })
            .collect();
        assert_eq!(found.len(), 1, "one settle record for {hold}");
        found.into_iter().next().unwrap_or_default()
    };
    let pair = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    assert_eq!(attrs(&cut), pair(CUT_BY, "team-day"));
    assert_eq!(attrs(&past), pair(FINISHED_PAST, SIDECAR_UNREACHABLE));
    assert_eq!(attrs(&forged), pair(CUT_BY, OTHER));
    assert_eq!(attrs(&plain.to_string()), Vec::new());

    // The rollups keep them apart and add up to what was counted.
    let rows = buckets(&h, Granularity::Minute);
    assert_eq!(sum(&rows, CUT_BY, "team-day").units, 40);
    assert_eq!(sum(&rows, CUT_BY, OTHER).units, 5);
    assert_eq!(sum(&rows, FINISHED_PAST, SIDECAR_UNREACHABLE).units, 70);
    assert_eq!(sum(&rows, "", "").units, 40 + 70 + 5 + 3);
    assert_eq!(sum(&rows, "", "").requests, 4);
}

fn every_unit_is_attributed_once_and_equals_what_was_counted(store: Store) {
    let h = harness(&config(100), store, "2026-03-10T10:00:00Z");
    let eu = [("userId", "u1"), ("region", "eu")];
    // Settled with a token split; a second settle adds nothing.
    let a = h.check("acme", "tokens", 100, &eu).hold_id.unwrap();
    h.run(h.engine.settle(&a, tokens(50, 30, 0))).unwrap();
    h.run(h.engine.settle(&a, tokens(500, 300, 0))).unwrap();
    // Released: a request, no units.
    let b = h.check("acme", "tokens", 100, &[("userId", "u2"), ("region", "us")]);
    h.release(b.hold_id.as_ref().unwrap());
    // Left to expire: committed at the held amount.
    let c = h.check("acme", "tokens", 200, &[("userId", "u3"), ("region", "us")]);
    assert!(c.granted);
    // Denied by team t1's day quota.
    assert!(!h.check("acme", "tokens", 5_000, &eu).granted);
    // A dry run is an answer, not usage: no record.
    assert!(!h.dry_run("acme", "tokens", 5_000, &eu).granted);
    // Ingested once under its key.
    let u4 = [("userId", "u4"), ("region", "eu")];
    assert!(h.ingest("acme", "tokens", tokens(40, 30, 0), &u4, "k1"));
    assert!(!h.ingest("acme", "tokens", tokens(40, 30, 0), &u4, "k1"));
    h.advance_secs(301);
    assert_eq!(h.expire_due(), 1);

    for g in Granularity::ALL {
        let rows = buckets(&h, g);
        let all = sum(&rows, "", "");
        assert_eq!(
            (all.units, all.input, all.output, all.requests, all.denied),
            (80 + 200 + 70, 50 + 40, 30 + 30, 4, 1),
            "{g:?}: {rows:?}"
        );
        // What each team's rollups hold is what its counter counted.
        for team in ["t1", "t2", "t3"] {
            assert_eq!(
                sum(&rows, "teamId", team).units,
                h.counted("acme", team, "team-day"),
                "{g:?} {team}"
            );
        }
        let denied = sum(&rows, "deniedBy", "team-day");
        assert_eq!((denied.denied, denied.units), (1, 0), "{g:?}");
        assert_eq!(sum(&rows, "region", "us").units, 200);
        assert_eq!(sum(&rows, "orgId", "acme").units, 350);
        assert_eq!(sum(&rows, "deptId", "d1").units, 280);
    }
    // Minute buckets start on the minute the record was made.
    let minutes: Vec<i64> = buckets(&h, Granularity::Minute)
        .iter()
        .map(|(s, _, _)| *s)
        .collect();
    assert!(minutes.iter().all(|s| s % 60_000 == 0), "{minutes:?}");

    // The stream: every record once, in order, resumable after any event.
    let store = h.engine.store();
    let acme = Name::from("acme");
    let page = h
        .run(store.usage().read_events(Some(acme), None, 100))
        .unwrap();
    let kinds: Vec<RecordKind> = page
        .events
        .iter()
        .map(|e| match &*e.body {
            EventBody::Record(r) => r.kind,
            EventBody::Alert(_) => panic!("no alert was set"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            RecordKind::Settled,
            RecordKind::Released,
            RecordKind::Denied,
            RecordKind::Ingested,
            RecordKind::Expired
        ]
    );
    assert!(!page.gap);
    let after = &page.events[1].id;
    let rest = h
        .run(store.usage().read_events(Some(acme), Some(after), 100))
        .unwrap();
    let ids: Vec<&str> = rest.events.iter().map(|e| e.id.as_str()).collect();
    let expected: Vec<&str> = page.events[2..].iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, expected);
    let last = &page.events[4].id;
    let none = h
        .run(store.usage().read_events(Some(acme), Some(last), 100))
        .unwrap();
    assert!(none.events.is_empty() && !none.gap);
    assert!(
        h.run(
            store
                .usage()
                .read_events(Some(acme), Some("not a cursor"), 10)
        )
        .is_err()
    );
    // Another customer's stream has none of it.
    let other = h
        .run(
            store
                .usage()
                .read_events(Some(Name::from("globex")), None, 10),
        )
        .unwrap();
    assert!(other.events.is_empty());
}

fn distinct_dimension_values_fold_past_the_customers_most(store: Store) {
    let h = harness(&config(2), store, "2026-03-10T10:00:00Z");
    for (i, region) in ["eu", "us", "ap", "sa", "eu"].iter().enumerate() {
        let key = format!("k{i}");
        assert!(h.ingest(
            "acme",
            "tokens",
            tokens(1, 0, 0),
            &[("userId", "u1"), ("region", region)],
            &key
        ));
    }
    let rows = buckets(&h, Granularity::Hour);
    assert_eq!(sum(&rows, "region", "eu").units, 2);
    assert_eq!(sum(&rows, "region", "us").units, 1);
    assert_eq!(sum(&rows, "region", OTHER).units, 2, "{rows:?}");
    assert_eq!(sum(&rows, "region", "ap").units, 0);
    // Entity ids are never folded: they are bounded by the model already.
    assert_eq!(sum(&rows, "userId", "u1").units, 5);
}

/// Batch `seq` of writer 7.
fn batch(seq: u64) -> tollgate::store::BatchId {
    tollgate::store::BatchId { writer: 7, seq }
}

/// A replica's local records (written in batches by a leased store, `record_local`): each
/// attributed at its own time, folded as any record, and in the stream once each, in order,
/// between the events around them; a reader resumes after any one of them, also inside a
/// batch (on Redis a batch of 1,100 is three stream entries), and pages never hold more
/// than asked.
fn local_record_batches_read_back_by_cursor_and_add_up(store: Store) {
    use tollgate::core::rollup::{LocalRecord, SeriesDraft};
    let h = harness(&config(2), store, "2026-03-10T10:00:00Z");
    let store = h.engine.store();
    let acme = Name::from("acme");
    let t0 = {
        use tollgate::clock::Clock;
        h.clock.now().millis()
    };
    let users = ["u1", "u2", "u3"];
    let regions = ["eu", "us", "ap"];
    let record = |i: usize| LocalRecord {
        kind: if i.is_multiple_of(10) {
            RecordKind::Released
        } else {
            RecordKind::Settled
        },
        // Two minutes and more: 100 ms apart.
        at: tollgate::core::Timestamp::from_millis(t0 + i as i64 * 100),
        series: SeriesDraft {
            feature: Name::from("tokens"),
            chain: vec![
                (Name::from("orgId"), Name::from("acme")),
                (Name::from("userId"), Name::from(users[i % 3])),
            ],
            dimensions: vec![(Name::from("region"), regions[i % 3].into())],
        },
        measures: Measures {
            units: (i % 7 + 1) as u64,
            requests: 1,
            ..Measures::default()
        },
        seq: (1 << 52) | i as u64,
        tag: i as u128 + 1,
    };
    let all: Vec<LocalRecord> = (0..1_100).map(record).collect();
    let now = tollgate::core::Timestamp::from_millis(t0);
    assert!(h.ingest("acme", "tokens", tokens(1, 0, 0), &[("userId", "u1")], "k0"));
    h.run(store.usage().record_local(acme, batch(1), &all[..600], now))
        .unwrap();
    assert!(h.ingest("acme", "tokens", tokens(1, 0, 0), &[("userId", "u1")], "k1"));
    h.run(store.usage().record_local(acme, batch(2), &all[600..], now))
        .unwrap();
    // Sent again (its answer was lost, so the replica sends it once more), and an older
    // batch late: each applies once.
    h.run(store.usage().record_local(acme, batch(2), &all[600..], now))
        .unwrap();
    h.run(store.usage().record_local(acme, batch(1), &all[..600], now))
        .unwrap();

    // Read in pages of 7: every event once, in order.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1_000 {
        let page = h
            .run(store.usage().read_events(Some(acme), cursor.as_deref(), 7))
            .unwrap();
        assert!(!page.gap);
        assert!(page.events.len() <= 7);
        let Some(last) = page.events.last() else {
            break;
        };
        cursor = Some(last.id.clone());
        seen.extend(page.events);
    }
    let refs: Vec<String> = seen
        .iter()
        .map(|e| match &*e.body {
            EventBody::Record(r) => match &r.reference {
                tollgate::core::rollup::RecordRef::Hold { seq, tag } => {
                    assert_eq!(*tag, u128::from(*seq & ((1 << 52) - 1)) + 1);
                    format!("{}", seq & ((1 << 52) - 1))
                }
                tollgate::core::rollup::RecordRef::Key(k) => k.to_string(),
                other => panic!("unexpected reference {other:?}"),
            },
            EventBody::Alert(_) => panic!("no alert was set"),
        })
        .collect();
    let expected: Vec<String> = std::iter::once("k0".to_string())
        .chain((0..600).map(|i| i.to_string()))
        .chain(std::iter::once("k1".to_string()))
        .chain((600..1_100).map(|i| i.to_string()))
        .collect();
    assert_eq!(refs, expected);
    let ids: std::collections::HashSet<&str> = seen.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids.len(), seen.len(), "event ids are distinct");
    // Each local record as it was made: its time, kind, measures and folded series.
    for (e, i) in seen
        .iter()
        .filter(|e| !matches!(&*e.body, EventBody::Record(r) if r.kind == RecordKind::Ingested))
        .zip(0..)
    {
        let EventBody::Record(r) = &*e.body else {
            panic!("a record")
        };
        let want = record(i);
        assert_eq!(
            (r.kind, r.at, r.measures),
            (want.kind, want.at, want.measures),
            "record {i}"
        );
        assert_eq!(r.series.get("userId"), Some(users[i % 3]));
        assert_eq!(
            r.series.get("region"),
            Some(if i % 3 == 2 { OTHER } else { regions[i % 3] })
        );
    }
    // Resuming after any event gives exactly the events after it.
    for at in [0, 1, 5, 511, 512, 513, 600, 601, 1_000, 1_101] {
        let page = h
            .run(
                store
                    .usage()
                    .read_events(Some(acme), Some(&seen[at].id), 2_000),
            )
            .unwrap();
        let ids: Vec<&str> = page.events.iter().map(|e| e.id.as_str()).collect();
        let want: Vec<&str> = seen[at + 1..].iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, want, "after event {at}");
    }
    let page = h
        .run(store.usage().read_events(Some(acme), None, 1_000))
        .unwrap();
    assert_eq!(page.events.len(), 1_000);

    // The rollups: every unit once, each minute's records in that minute.
    let units: u64 = all.iter().map(|r| r.measures.units).sum::<u64>() + 2;
    for g in [Granularity::Minute, Granularity::Hour, Granularity::Day] {
        let rows = buckets(&h, g);
        assert_eq!(sum(&rows, "", "").units, units, "{g:?}");
        assert_eq!(sum(&rows, "region", OTHER).requests, 1_100 / 3, "{g:?}");
    }
    let minutes = buckets(&h, Granularity::Minute);
    for (start, _, _) in &minutes {
        let want: u64 = all
            .iter()
            .filter(|r| Granularity::Minute.start(r.at) == *start)
            .map(|r| r.measures.units)
            .sum();
        let ingested = u64::from(*start == Granularity::Minute.start(now));
        let got: u64 = minutes
            .iter()
            .filter(|(s, _, _)| s == start)
            .map(|(_, _, m)| m.units)
            .sum();
        assert_eq!(got, want + 2 * ingested, "minute {start}");
    }

    // A batch with more series than one script step writes to a bucket (2,500 users).
    let wide: Vec<LocalRecord> = (0..2_500)
        .map(|i| LocalRecord {
            series: SeriesDraft {
                chain: vec![(Name::from("userId"), Name::from(format!("w{i}").as_str()))],
                ..record(1).series
            },
            at: now,
            ..record(1)
        })
        .collect();
    h.run(store.usage().record_local(acme, batch(3), &wide, now))
        .unwrap();
    let rows = buckets(&h, Granularity::Hour);
    let per_unit = record(1).measures.units;
    for i in [0, 999, 1_000, 1_001, 2_499] {
        assert_eq!(
            sum(&rows, "userId", &format!("w{i}")).units,
            per_unit,
            "w{i}"
        );
    }
    assert_eq!(sum(&rows, "", "").units, units + 2_500 * per_unit);

    // A draft with nothing to fold (no dimensions) lands in the very series field the store
    // makes for the same chain: the ingest's, one field, not two that read alike.
    let EventBody::Record(first) = &*seen[0].body else {
        panic!("the first event is the ingest")
    };
    let key = first.series.clone();
    let chain_only = LocalRecord {
        series: SeriesDraft {
            feature: Name::from(&*key.feature),
            chain: key
                .attrs
                .iter()
                .map(|(k, v)| (Name::from(&**k), Name::from(&**v)))
                .collect(),
            dimensions: Vec::new(),
        },
        at: now,
        ..record(1)
    };
    h.run(
        store
            .usage()
            .record_local(acme, batch(4), &[chain_only], now),
    )
    .unwrap();
    let same: Vec<Measures> = buckets(&h, Granularity::Hour)
        .into_iter()
        .filter(|(_, s, _)| *s == *key)
        .map(|(_, _, m)| m)
        .collect();
    assert_eq!(same.len(), 1, "{same:?}");
    assert_eq!(
        same[0].units,
        2 + per_unit,
        "the two ingests and the local record"
    );
}

/// A long usage read on Redis (2,000 series in each of 48 hour buckets) never holds
/// decisions back: decisions sent while it runs are answered before it ends, because the read
/// goes to Redis in small steps between them (a read inside one script would hold Redis for
/// its whole run, and every decision would wait behind it).
fn a_long_usage_read_lets_decisions_through(store: Store) {
    use tollgate::store::BatchId;
    let h = harness(&config(2), store, "2026-03-10T10:00:00Z");
    let store = h.engine.store();
    let acme = Name::from("acme");
    let now = {
        use tollgate::clock::Clock;
        h.clock.now()
    };
    const SERIES: usize = 2_000;
    const HOURS: i64 = 48;
    for hour in 0..HOURS {
        let at = tollgate::core::Timestamp::from_millis(now.millis() - hour * 3_600_000);
        let batch: Vec<_> = (0..SERIES)
            .flat_map(|i| settled_records(at, &format!("w{i}"), i, 1))
            .collect();
        let id = BatchId {
            writer: 9,
            seq: hour as u64 + 1,
        };
        h.run(store.usage().record_local(acme, id, &batch, now))
            .unwrap();
    }
    let from = now.millis() - HOURS * 3_600_000;
    let to = now.millis() + 3_600_000;
    let done = std::sync::atomic::AtomicBool::new(false);
    let (scan, during) = h.rt.block_on(async {
        let read = async {
            let scan = store
                .usage()
                .usage_buckets(acme, Granularity::Hour, from, to, &ScanNeeds::all(0))
                .await
                .unwrap();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            scan
        };
        let decide = async {
            let dims = common::dims(&[("userId", "u1")]);
            let mut during = 0;
            for _ in 0..100_000 {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let d = h
                    .engine
                    .check(&tollgate::CheckRequest {
                        customer: "acme",
                        feature: "tokens",
                        usage: tollgate::core::usage::Usage::units(1),
                        dimensions: &dims,
                        dry_run: false,
                        deadline: None,
                        commit: false,
                    })
                    .await
                    .unwrap();
                if let Some(hold) = d.hold_id {
                    h.engine.release(&hold).await.unwrap();
                }
                if !done.load(std::sync::atomic::Ordering::SeqCst) {
                    during += 1;
                }
            }
            during
        };
        tokio::join!(read, decide)
    });
    let units: u64 = scan.rows().map(|(_, _, m)| m.units).sum();
    assert_eq!(
        units,
        SERIES as u64 * HOURS as u64,
        "every bucket read whole"
    );
    assert!(
        during >= 10,
        "only {during} decisions were answered while the read ran"
    );
}

/// The operator's stream on Redis, where each customer's events are a stream of its own:
/// one page has every customer's events in one order, and resuming after any of them gives
/// exactly the rest.
fn the_operators_stream_merges_every_customer(store: Store) {
    use tollgate::store::BatchId;
    let h = harness(&config(2), store, "2026-03-10T10:00:00Z");
    let store = h.engine.store();
    let now = {
        use tollgate::clock::Clock;
        h.clock.now()
    };
    let records = |n: usize| settled_records(now, "u1", 0, n);
    let mut written = 0;
    for (i, (customer, n)) in [("acme", 3), ("globex", 4), ("acme", 2), ("globex", 1)]
        .into_iter()
        .enumerate()
    {
        let id = BatchId {
            writer: 5,
            seq: i as u64 + 1,
        };
        h.run(
            store
                .usage()
                .record_local(Name::from(customer), id, &records(n), now),
        )
        .unwrap();
        written += n;
        std::thread::sleep(std::time::Duration::from_millis(3));
    }
    assert!(h.ingest("acme", "tokens", tokens(1, 0, 0), &[("userId", "u1")], "k0"));
    written += 1;
    // A merged page stops a second short of now.
    std::thread::sleep(std::time::Duration::from_millis(1_200));
    let page = h.run(store.usage().read_events(None, None, 100)).unwrap();
    let ids: Vec<String> = page.events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), written, "{ids:?}");
    let customers: std::collections::HashSet<&str> =
        page.events.iter().map(|e| e.customer.as_str()).collect();
    assert_eq!(customers.len(), 2);
    for (k, id) in ids.iter().enumerate() {
        let rest = h
            .run(store.usage().read_events(None, Some(id), 100))
            .unwrap();
        let got: Vec<&String> = rest.events.iter().map(|e| &e.id).collect();
        let want: Vec<&String> = ids[k + 1..].iter().collect();
        assert_eq!(got, want, "after {id}");
    }
    // Pages of 2 read the same events.
    let mut cursor: Option<String> = None;
    let mut paged = Vec::new();
    for _ in 0..100 {
        let p = h
            .run(store.usage().read_events(None, cursor.as_deref(), 2))
            .unwrap();
        if p.events.is_empty() {
            break;
        }
        cursor = p.events.last().map(|e| e.id.clone());
        paged.extend(p.events.into_iter().map(|e| e.id));
    }
    assert_eq!(paged, ids);
    assert!(matches!(
        h.run(store.usage().read_events(None, Some("nonsense"), 10)),
        Err(tollgate::store::StoreError::BadCursor(_))
    ));
}

/// Every usage bucket a Redis store writes expires: the call that creates a bucket sets its
/// expiry (fixed by the bucket's start and its granularity's retention), and the calls that
/// add to it later leave it as it is, so none is kept forever.
#[test]
fn every_redis_bucket_expires_after_its_retention() {
    let server = common::RedisServer::start();
    let store =
        common::redis_store_prefixed(tollgate::store::RedisTarget::Node(server.url()), "kept");
    let h = harness(&config(100), store, "2026-03-10T10:00:00Z");
    for (i, user) in ["u1", "u1", "u2", "u1", "u3"].into_iter().enumerate() {
        let d = h.check("acme", "tokens", 10, &[("userId", user), ("region", "eu")]);
        h.run(
            h.engine
                .settle(d.hold_id.as_ref().unwrap(), tokens(5, 5, 0)),
        )
        .unwrap();
        if i == 2 {
            h.advance_secs(61);
        }
    }
    let keys = server
        .cli(&["--scan", "--pattern", "kept:{acme}:r[123]:*"])
        .unwrap();
    let keys: Vec<&str> = keys.lines().filter(|k| !k.contains(":z")).collect();
    // Two minute buckets, one hour bucket, one day bucket.
    assert_eq!(keys.len(), 4, "{keys:?}");
    for key in keys {
        let ttl: i64 = server.cli(&["PTTL", key]).unwrap().trim().parse().unwrap();
        // Day buckets are kept about two years by default; none without an expiry (-1).
        assert!(
            ttl > 0 && ttl <= 800 * 86_400_000,
            "bucket {key} kept for {ttl} ms"
        );
    }
}

/// A Redis node that lost the function library (a restart without persistence, a failover to
/// an empty node, `FUNCTION FLUSH`) gets it again on the next call, which then runs: decisions
/// and their records go on with nothing lost or counted twice.
#[test]
fn a_redis_node_that_lost_the_library_gets_it_again() {
    let server = common::RedisServer::start();
    let store =
        common::redis_store_prefixed(tollgate::store::RedisTarget::Node(server.url()), "lib");
    let h = harness(&config(100), store, "2026-03-10T10:00:00Z");
    let dims = [("userId", "u1"), ("region", "eu")];
    let a = h.check("acme", "tokens", 10, &dims);
    let libraries = server.cli(&["FUNCTION", "LIST"]).unwrap();
    assert!(libraries.contains("tollgate_"), "{libraries}");
    assert_eq!(server.cli(&["FUNCTION", "FLUSH"]).unwrap().trim(), "OK");
    let b = h.check("acme", "tokens", 20, &dims);
    assert!(a.granted && b.granted);
    assert_eq!(
        h.counted("acme", "t1", "team-day"),
        30,
        "both held, once each"
    );
    assert!(
        server
            .cli(&["FUNCTION", "LIST"])
            .unwrap()
            .contains("tollgate_")
    );
    for d in [a, b] {
        h.run(
            h.engine
                .settle(d.hold_id.as_ref().unwrap(), tokens(5, 0, 0)),
        )
        .unwrap();
    }
    let events = h
        .run(
            h.engine
                .store()
                .usage()
                .read_events(Some(Name::from("acme")), None, 100),
        )
        .unwrap()
        .events;
    assert_eq!(events.len(), 2, "one record per settle");
    assert_eq!(h.counted("acme", "t1", "team-day"), 10);
}
