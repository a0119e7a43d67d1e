//! The only module that calls the proxy-wasm host: contexts, headers, bodies, properties, the
//! gRPC calls, local replies and stats. It moves data between Envoy and the plain modules:
//! `root` is the per-worker context (config, stats, the close queue's calls), `http` the
//! per-request one.

mod http;
mod root;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::RootContext;
use proxy_wasm::types::{LogLevel, MetricType};

use crate::close_queue::{CloseJob, CloseQueue, TICK};
use crate::config::{Effective, FilterConfig};
use crate::settle::{self, Close, Unknown};

pub(super) fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// The filter's counters, as Envoy stats (`wasmcustom.tollgate_filter.*_total`; Prometheus
/// `tollgate_filter_*_total`).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Stats {
    granted: u32,
    denied: u32,
    bad_input: u32,
    fail_open: u32,
    fail_closed: u32,
    settled: u32,
    released: u32,
    usage_unknown: u32,
    usage_estimated: u32,
    usage_requested: u32,
    close_retried: u32,
    close_failed: u32,
    bounded_passed: u32,
    bounded_refused: u32,
    bounded_reported: u32,
    bounded_dropped: u32,
    free_passed: u32,
    unknown_denied: u32,
    unknown_passed: u32,
    batch_reported: u32,
    batch_partial: u32,
    stream_extended: u32,
    stream_refused: u32,
    stream_unreachable: u32,
    stream_cut: u32,
    /// Slices taken from the bounded allowance with the sidecar unreachable, and their units.
    stream_bounded: u32,
    pub(super) stream_bounded_units: u32,
    /// Units streams delivered past what they held (`extend-finish`, or `onSidecarDown:
    /// finish`).
    pub(super) stream_overshoot_units: u32,
    /// Histogram: µs from a refused slice's answer to the chunk that ends the stream.
    pub(super) stream_cut_delay_us: u32,
}

impl Stats {
    pub(super) fn define() -> Self {
        let d = |name: &str| hostcalls::define_metric(MetricType::Counter, name).unwrap_or(0);
        Self {
            granted: d("tollgate_filter.granted_total"),
            denied: d("tollgate_filter.denied_total"),
            bad_input: d("tollgate_filter.bad_input_total"),
            fail_open: d("tollgate_filter.fail_open_total"),
            fail_closed: d("tollgate_filter.fail_closed_total"),
            settled: d("tollgate_filter.settled_total"),
            released: d("tollgate_filter.released_total"),
            usage_unknown: d("tollgate_filter.usage_unknown_total"),
            usage_estimated: d("tollgate_filter.usage_estimated_total"),
            usage_requested: d("tollgate_filter.usage_requested_total"),
            close_retried: d("tollgate_filter.close_retried_total"),
            close_failed: d("tollgate_filter.close_failed_total"),
            bounded_passed: d("tollgate_filter.bounded_passed_total"),
            bounded_refused: d("tollgate_filter.bounded_refused_total"),
            bounded_reported: d("tollgate_filter.bounded_reported_total"),
            bounded_dropped: d("tollgate_filter.bounded_dropped_total"),
            free_passed: d("tollgate_filter.free_passed_total"),
            unknown_denied: d("tollgate_filter.unknown_denied_total"),
            unknown_passed: d("tollgate_filter.unknown_passed_total"),
            batch_reported: d("tollgate_filter.batch_reported_total"),
            batch_partial: d("tollgate_filter.batch_partial_total"),
            stream_extended: d("tollgate_filter.stream_extended_total"),
            stream_refused: d("tollgate_filter.stream_refused_total"),
            stream_unreachable: d("tollgate_filter.stream_unreachable_total"),
            stream_cut: d("tollgate_filter.stream_cut_total"),
            stream_bounded: d("tollgate_filter.stream_bounded_total"),
            stream_bounded_units: d("tollgate_filter.stream_bounded_units_total"),
            stream_overshoot_units: d("tollgate_filter.stream_overshoot_units_total"),
            stream_cut_delay_us: hostcalls::define_metric(
                MetricType::Histogram,
                "tollgate_filter.stream_cut_delay_us",
            )
            .unwrap_or(0),
        }
    }

    pub(super) fn add(id: u32, n: u64) {
        if id != 0 && n > 0 {
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub(super) fn record(id: u32, value: u64) {
        if id != 0 {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    pub(super) fn bump(id: u32) {
        if id != 0 {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }
}

/// The most route overrides kept parsed; past it the cache starts over.
const MAX_OVERRIDES: usize = 256;

#[derive(Debug)]
pub(super) struct Shared {
    config: FilterConfig,
    stats: Stats,
    queue: RefCell<CloseQueue>,
    ticking: Cell<bool>,
    /// A per-VM serial: with `nonce`, the id of each bounded pass.
    serial: Cell<u64>,
    /// Random per VM configuration (see `root::vm_nonce`).
    nonce: u64,
    /// Bounded passes whose usage is not known yet, by hold id.
    passes: RefCell<HashMap<String, crate::bounded::Pass>>,
    /// Usage of bounded passes to report to the sidecar (oldest first).
    unreported: RefCell<crate::report_queue::ReportQueue>,
    /// Route overrides by the route metadata bytes they were read from: parsed (regexes
    /// compiled) once per route, not once per request.
    overrides: RefCell<HashMap<Vec<u8>, Option<Rc<Resolved>>>>,
}

/// A route's settings, resolved once.
#[derive(Debug)]
pub(super) struct Resolved {
    disabled: bool,
    effective: Effective,
}

impl Shared {
    pub(super) fn enqueue(&self, job: CloseJob) {
        self.queue.borrow_mut().push(job);
        self.keep_ticking();
    }

    /// Makes sure the root context ticks while closes wait. Sets the tick of this VM's root
    /// context, whichever context calls it.
    pub(super) fn keep_ticking(&self) {
        if !self.ticking.get() && hostcalls::set_tick_period(TICK).is_ok() {
            self.ticking.set(true);
        }
    }

    /// A new id, unique across VMs and reloads: `<nonce>-<serial>` in hex.
    pub(super) fn unique_id(&self) -> String {
        let n = self.serial.get() + 1;
        self.serial.set(n);
        format!("{:016x}-{n:x}", self.nonce)
    }

    /// Keeps the usage of a bounded pass for the sidecar (bounded: the oldest go first).
    pub(super) fn report_pass(&self, record: tollgate_proto::v1::UsageRecord) {
        if self.unreported.borrow_mut().push(record) {
            Stats::bump(self.stats.bounded_dropped);
        }
        self.keep_ticking();
    }

    /// Queues the close of `hold_id`; `ending` says how a streamed call ended when a slice was
    /// refused or unanswered.
    pub(super) fn close(
        &self,
        hold_id: &str,
        close: &Close,
        why: Option<Unknown>,
        ending: Option<crate::stream::Ending>,
    ) {
        // A bounded pass has no hold: its usage is reported as an ingested record instead.
        if hold_id.starts_with(crate::bounded::PREFIX) {
            if let Some(pass) = self.passes.borrow_mut().remove(hold_id)
                && let Close::Settle(reading) = close
            {
                self.report_pass(crate::bounded::record(
                    hold_id,
                    &pass,
                    reading.total,
                    reading.tokens,
                ));
            }
            return;
        }
        if let Some(why) = why {
            Stats::bump(self.stats.usage_unknown);
            if matches!(close, Close::Settle(_)) {
                Stats::bump(self.stats.usage_estimated);
            }
            // Debug, not info: a burst of upstream errors would otherwise log a line each; the
            // `usage_unknown` stat counts them.
            log(
                LogLevel::Debug,
                &format!("hold {hold_id}: usage unknown ({why:?}); closing by policy: {close:?}"),
            );
        }
        self.enqueue(CloseJob::new(settle::hold_close(hold_id, close, ending)));
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(root::Root::default())
    });
}}
