//! Prometheus metrics: decisions by outcome and API, decision latency, active counters, open
//! holds, settlements, ingested usage and config reloads.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::store::StoreStats;

/// Which interface a call came through.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Api {
    ExtAuthz,
    Grpc,
    Http,
}

impl Api {
    pub const ALL: [Api; 3] = [Api::ExtAuthz, Api::Grpc, Api::Http];

    pub fn as_str(self) -> &'static str {
        match self {
            Api::ExtAuthz => "ext_authz",
            Api::Grpc => "grpc",
            Api::Http => "http",
        }
    }
}

/// How a decision ended. `ShadowDenied` was granted but exceeded a soft or shadow limit;
/// `BadInput` is a request the model could not place (unknown customer, feature, entity);
/// `Error` is a store failure.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    Granted,
    Denied,
    ShadowDenied,
    BadInput,
    Error,
    /// Decided (or about to be) after the caller's deadline: nothing held.
    Late,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Granted,
        Outcome::Denied,
        Outcome::ShadowDenied,
        Outcome::BadInput,
        Outcome::Error,
        Outcome::Late,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Granted => "granted",
            Outcome::Denied => "denied",
            Outcome::ShadowDenied => "shadow_denied",
            Outcome::BadInput => "bad_input",
            Outcome::Error => "error",
            Outcome::Late => "deadline_exceeded",
        }
    }
}

/// How a settle or release call ended.
pub const CLOSE_RESULTS: [&str; 6] = [
    "settled",
    "released",
    "already_closed",
    "unknown_hold",
    "too_large",
    "error",
];
/// How an ingested usage event ended.
pub const INGEST_RESULTS: [&str; 3] = ["recorded", "duplicate", "rejected"];
/// What a request Envoy's access log reported did to its hold.
pub const ACCESS_LOG_RESULTS: [&str; 5] = ["settled", "held", "released", "no_hold", "unreadable"];
/// How a config reload ended.
pub const RELOAD_RESULTS: [&str; 2] = ["applied", "rejected"];
/// The listeners that count their connections.
pub const LISTENERS: [&str; 3] = ["ext_authz", "grpc", "http"];

/// Label values in snake_case, as Prometheus labels usually are.
macro_rules! label_value {
    ($t:ty) => {
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
                std::fmt::Write::write_str(encoder, self.as_str())
            }
        }
    };
}
label_value!(Api);
label_value!(Outcome);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    api: Api,
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    api: Api,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HowLabels {
    how: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    listener: &'static str,
    reason: &'static str,
}

/// Connection counts by listener, for `net::incoming`.
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    open: Family<ListenerLabels, Gauge>,
    closed: Family<ClosedLabels, Counter>,
}

impl crate::net::ConnectionEvents for ConnectionMetrics {
    fn opened(&self, listener: &'static str) {
        self.open.get_or_create(&ListenerLabels { listener }).inc();
    }

    fn closed(&self, listener: &'static str, reason: Option<crate::net::CloseReason>) {
        // A refused connection was never counted open.
        if reason != Some(crate::net::CloseReason::Full) {
            self.open.get_or_create(&ListenerLabels { listener }).dec();
        }
        if let Some(r) = reason {
            self.closed
                .get_or_create(&ClosedLabels {
                    listener,
                    reason: r.as_str(),
                })
                .inc();
        }
    }
}

fn latency_histogram() -> Histogram {
    // 5 µs to ~80 ms: the decision itself is microseconds; the tail shows lock waits.
    Histogram::new(exponential_buckets(0.000_005, 2.0, 15))
}

/// The sidecar's metrics registry.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    latency: Family<ApiLabels, Histogram, fn() -> Histogram>,
    counters_active: Gauge,
    holds_open: Gauge,
    customers_active: Gauge,
    closes: Family<ResultLabels, Counter>,
    bucket_reads: Family<HowLabels, Counter>,
    settle_excess: Counter,
    settles_capped: Counter,
    ingested: Family<ResultLabels, Counter>,
    access_log: Family<ResultLabels, Counter>,
    slices: Family<ResultLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    store_failures: Counter,
    breaker_rejections: Counter,
    connections_replaced: Counter,
    script_disagreements: Counter,
    values_folded: Counter,
    usage_series: Gauge,
    connections: ConnectionMetrics,
    leases: LeaseMetrics,
}

/// The escrow leases' metrics (all zero while leases are off).
#[derive(Debug, Default)]
struct LeaseMetrics {
    local: Counter,
    partial: Counter,
    store: Counter,
    placed: Counter,
    returned: Counter,
    saved: Counter,
    stranded: Counter,
    outstanding: Gauge,
    dropped: Counter,
}

impl LeaseMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("lease");
        let counters = [
            (
                "local_decisions",
                "Decisions made entirely inside this replica's leases",
                &m.local,
            ),
            (
                "partial_decisions",
                "Decisions held partly inside leases and partly in the store",
                &m.partial,
            ),
            (
                "store_decisions",
                "Holds placed in the store for every counter (leases on)",
                &m.store,
            ),
            (
                "slices_placed",
                "Slices placed in the store (first leases and renewals)",
                &m.placed,
            ),
            (
                "slices_returned",
                "Slices settled back: spent committed, the rest returned",
                &m.returned,
            ),
            (
                "store_calls_saved",
                "Store calls not made thanks to local decisions",
                &m.saved,
            ),
            (
                "stranded_units",
                "Units of slices the store expired before their return (overcounted)",
                &m.stranded,
            ),
            (
                "records_dropped",
                "Usage records of local decisions dropped while the store was unreachable",
                &m.dropped,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        r.register(
            "outstanding_units",
            "Units held in the store by this replica's slices now",
            m.outstanding.clone(),
        );
        m
    }

    fn update(&self, s: &crate::store::LeaseStats) {
        let catch_up = |c: &Counter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        catch_up(&self.local, s.local_decisions);
        catch_up(&self.partial, s.partial_decisions);
        catch_up(&self.store, s.store_decisions);
        catch_up(&self.placed, s.slices_placed);
        catch_up(&self.returned, s.slices_returned);
        catch_up(&self.saved, s.store_calls_saved);
        catch_up(&self.stranded, s.stranded_units);
        catch_up(&self.dropped, s.records_dropped);
        self.outstanding
            .set(i64::try_from(s.outstanding_units).unwrap_or(i64::MAX));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let leases = LeaseMetrics::register(&mut registry);
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Decisions by interface and outcome",
            decisions.clone(),
        );
        let latency = Family::<ApiLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "decision_duration_seconds",
            "Time to decide, inside the sidecar",
            latency.clone(),
        );
        let counters_active = Gauge::default();
        registry.register(
            "counters_active",
            "Counters held in the store",
            counters_active.clone(),
        );
        let holds_open = Gauge::default();
        registry.register("holds_open", "Holds not yet settled", holds_open.clone());
        let customers_active = Gauge::default();
        registry.register(
            "customers_active",
            "Customers with state in the store",
            customers_active.clone(),
        );
        let values_folded = Counter::default();
        registry.register(
            "usage_values_folded",
            "Dimension values recorded as __other__ because their customer had the most distinct values",
            values_folded.clone(),
        );
        let usage_series = Gauge::default();
        registry.register(
            "usage_series",
            "Usage series kept (distinct feature, entity chain and dimension values)",
            usage_series.clone(),
        );
        let closes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "hold_closes",
            "Settle and release calls by result",
            closes.clone(),
        );
        let bucket_reads = Family::<HowLabels, Counter>::default();
        registry.register(
            "usage_bucket_reads",
            "Usage buckets a networked store read: from a sealed copy, scanned whole, or only the series an index named",
            bucket_reads.clone(),
        );
        let settle_excess = Counter::default();
        registry.register(
            "settle_excess_units",
            "Usage reported by settlements above their hold's ceiling and not charged (a forged or broken report, or a model missing from the price table's context windows)",
            settle_excess.clone(),
        );
        let settles_capped = Counter::default();
        registry.register(
            "settles_capped",
            "Settlements that reported more than their hold's ceiling and were charged the ceiling",
            settles_capped.clone(),
        );
        let ingested = Family::<ResultLabels, Counter>::default();
        registry.register(
            "usage_events",
            "Ingested usage events by result",
            ingested.clone(),
        );
        let access_log = Family::<ResultLabels, Counter>::default();
        registry.register(
            "access_log_reports",
            "Finished requests Envoy's access log reported, by what closed their hold: settled at the reported usage, held (charged what was held) or released by policy, no hold to close, or unreadable",
            access_log.clone(),
        );
        let slices = Family::<ResultLabels, Counter>::default();
        registry.register(
            "stream_slices",
            "Slices streamed calls asked for to extend their holds (`tollgate.extends`), by outcome (also counted in tollgate_decisions_total)",
            slices.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads by result",
            reloads.clone(),
        );
        let store_failures = Counter::default();
        registry.register(
            "store_failures",
            "Calls to a networked store (Redis) that failed or timed out",
            store_failures.clone(),
        );
        let breaker_rejections = Counter::default();
        registry.register(
            "store_breaker_rejections",
            "Store calls refused at once because the circuit breaker was open",
            breaker_rejections.clone(),
        );
        let connections_replaced = Counter::default();
        registry.register(
            "store_connections_replaced",
            "Redis Cluster connections replaced by new ones after every call failed for 2 s",
            connections_replaced.clone(),
        );
        let script_disagreements = Counter::default();
        registry.register(
            "store_script_disagreements",
            "Decisions where the Redis script and the decision core disagreed (a bug if not 0)",
            script_disagreements.clone(),
        );
        let connections = ConnectionMetrics::default();
        registry.register(
            "connections_open",
            "Open client connections by listener",
            connections.open.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections the sidecar refused (listener full) or closed (idle, no credential in time)",
            connections.closed.clone(),
        );
        // Every series a dashboard or alert rule names exists from the start, at zero: a rate
        // over a series that appears only at its first event reads as "no data", not 0.
        for api in Api::ALL {
            let _ = latency.get_or_create(&ApiLabels { api });
            for outcome in Outcome::ALL {
                let _ = decisions.get_or_create(&DecisionLabels { api, outcome });
            }
        }
        for result in CLOSE_RESULTS {
            let _ = closes.get_or_create(&ResultLabels { result });
        }
        for result in INGEST_RESULTS {
            let _ = ingested.get_or_create(&ResultLabels { result });
        }
        for result in RELOAD_RESULTS {
            let _ = reloads.get_or_create(&ResultLabels { result });
        }
        for result in ACCESS_LOG_RESULTS {
            let _ = access_log.get_or_create(&ResultLabels { result });
        }
        for outcome in Outcome::ALL {
            let _ = slices.get_or_create(&ResultLabels {
                result: outcome.as_str(),
            });
        }
        for how in ["sealed", "scanned", "indexed"] {
            let _ = bucket_reads.get_or_create(&HowLabels { how });
        }
        for listener in LISTENERS {
            let _ = connections.open.get_or_create(&ListenerLabels { listener });
            for reason in crate::net::CloseReason::ALL {
                let _ = connections.closed.get_or_create(&ClosedLabels {
                    listener,
                    reason: reason.as_str(),
                });
            }
        }
        Self {
            bucket_reads,
            connections,
            script_disagreements,
            values_folded,
            usage_series,
            store_failures,
            breaker_rejections,
            connections_replaced,
            registry,
            decisions,
            latency,
            counters_active,
            holds_open,
            customers_active,
            closes,
            settle_excess,
            settles_capped,
            ingested,
            access_log,
            slices,
            reloads,
            leases,
        }
    }

    /// The connection counters, for the listeners.
    pub fn connections(&self) -> ConnectionMetrics {
        self.connections.clone()
    }

    pub fn decision(&self, api: Api, outcome: Outcome, took: Duration) {
        self.decisions
            .get_or_create(&DecisionLabels { api, outcome })
            .inc();
        self.latency
            .get_or_create(&ApiLabels { api })
            .observe(took.as_secs_f64());
    }

    /// `result`: one of [`CLOSE_RESULTS`].
    pub fn close(&self, result: &'static str) {
        debug_assert!(CLOSE_RESULTS.contains(&result), "close result {result}");
        self.closes.get_or_create(&ResultLabels { result }).inc();
    }

    /// A settlement charged at its hold's ceiling: `excess` units reported above it.
    pub fn settle_capped(&self, excess: u64) {
        self.settles_capped.inc();
        self.settle_excess.inc_by(excess);
    }

    /// `result`: one of [`INGEST_RESULTS`].
    pub fn ingest(&self, result: &'static str) {
        debug_assert!(INGEST_RESULTS.contains(&result), "ingest result {result}");
        self.ingested.get_or_create(&ResultLabels { result }).inc();
    }

    /// A streamed call's slice, by how it was decided.
    pub fn slice(&self, outcome: Outcome) {
        self.slices
            .get_or_create(&ResultLabels {
                result: outcome.as_str(),
            })
            .inc();
    }

    /// `result`: one of [`ACCESS_LOG_RESULTS`].
    pub fn access_log(&self, result: &'static str) {
        debug_assert!(
            ACCESS_LOG_RESULTS.contains(&result),
            "access log result {result}"
        );
        self.access_log
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// `result`: one of [`RELOAD_RESULTS`].
    pub fn reload(&self, result: &'static str) {
        debug_assert!(RELOAD_RESULTS.contains(&result), "reload result {result}");
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// The text exposition, with the store's sizes as they are now.
    pub fn render(&self, stats: StoreStats, leases: Option<crate::store::LeaseStats>) -> String {
        if let Some(l) = leases {
            self.leases.update(&l);
        }
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.counters_active.set(gauge(stats.counters));
        self.holds_open.set(gauge(stats.holds_open));
        self.customers_active.set(gauge(stats.customers));
        // The store keeps the running totals; the counters catch up to them.
        let catch_up = |c: &Counter, total: u64| c.inc_by(total.saturating_sub(c.get()));
        catch_up(&self.store_failures, stats.backend_failures);
        catch_up(&self.breaker_rejections, stats.breaker_rejections);
        catch_up(&self.connections_replaced, stats.connections_replaced);
        catch_up(&self.script_disagreements, stats.script_disagreements);
        catch_up(&self.values_folded, stats.values_folded);
        self.usage_series.set(gauge(stats.usage_series));
        let r = stats.bucket_reads;
        for (how, total) in [
            ("sealed", r.sealed),
            ("scanned", r.scanned),
            ("indexed", r.indexed),
        ] {
            catch_up(&self.bucket_reads.get_or_create(&HowLabels { how }), total);
        }
        let mut out = String::new();
        // Writing into a String cannot fail; an error would leave a partial page, not a panic.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
