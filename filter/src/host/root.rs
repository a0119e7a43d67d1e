//! The per-VM (per worker) root context: reads the config, defines the stats, and sends the
//! close queue's batches to the sidecar on each tick.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

use super::http::Http;
use super::{Shared, Stats, log};
use crate::close_queue::{CloseJob, CloseQueue, Fate};
use crate::config::FilterConfig;
use crate::settle;

/// The per-VM (per worker) root context: the config, the stats and the close queue.
#[derive(Debug, Default)]
pub(super) struct Root {
    shared: Option<Rc<Shared>>,
    /// Batches sent and not yet answered, by call token.
    inflight: HashMap<u32, Vec<CloseJob>>,
}

fn now() -> SystemTime {
    hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Counts and logs what became of each close.
fn report(shared: &Shared, fates: Vec<Fate>) {
    let mut retried = false;
    for fate in fates {
        match fate {
            Fate::Settled => Stats::bump(shared.stats.settled),
            Fate::Released => Stats::bump(shared.stats.released),
            Fate::Rejected { job, message } => {
                Stats::bump(shared.stats.close_failed);
                log(
                    LogLevel::Warn,
                    &format!("{} refused: {message}", job.what()),
                );
            }
            Fate::Retried => {
                Stats::bump(shared.stats.close_retried);
                retried = true;
            }
            Fate::GaveUp { job, why } => {
                Stats::bump(shared.stats.close_failed);
                log(
                    LogLevel::Error,
                    &format!(
                        "{} of hold {} failed {} times ({why}); the hold stays open until it expires",
                        job.what(),
                        job.hold.hold_id,
                        job.attempt
                    ),
                );
            }
        }
    }
    if retried {
        shared.keep_ticking();
    }
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, size: usize) {
        if let Some(shared) = self.shared.clone() {
            let n = shared.unreported.borrow().in_flight(token_id);
            if let Some(n) = n {
                let done = (status_code == 0)
                    .then(|| {
                        self.get_grpc_call_response_body(0, size)
                            .unwrap_or_default()
                    })
                    .and_then(|body| crate::bounded::ingest_done(&body, n));
                let answered = shared.unreported.borrow_mut().answered(token_id, done);
                for _ in 0..answered.map_or(0, |a| a.reported) {
                    Stats::bump(shared.stats.bounded_reported);
                }
                if !shared.unreported.borrow().is_idle() {
                    shared.keep_ticking();
                }
                return;
            }
        }
        let (Some(shared), Some(jobs)) = (self.shared.clone(), self.inflight.remove(&token_id))
        else {
            return;
        };
        let answer = if status_code == 0 {
            let body = self
                .get_grpc_call_response_body(0, size)
                .unwrap_or_default();
            settle::close_results(&body, jobs.len())
                .ok_or_else(|| "an unreadable CloseHolds answer".to_string())
        } else {
            let (code, message) = hostcalls::get_grpc_status().unwrap_or((status_code, None));
            Err(format!(
                "gRPC status {code}: {}",
                message.unwrap_or_default()
            ))
        };
        let fates = shared.queue.borrow_mut().answered(jobs, answer, now());
        report(&shared, fates);
    }
}

/// 64 random bits for this VM's configuration (the host's WASI `random_get`), so that ids this
/// VM makes up never meet another VM's, or its own after a reload; the clock's nanoseconds if
/// the host has no randomness.
fn vm_nonce() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_ok() {
        return u64::from_le_bytes(b);
    }
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| {
            u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(0)
        })
}

impl RootContext for Root {
    fn on_configure(&mut self, size: usize) -> bool {
        let bytes =
            hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, size)
                .ok()
                .flatten()
                .unwrap_or_default();
        match FilterConfig::parse(&bytes, |name| std::env::var(name).ok()) {
            Ok(config) => {
                for w in config.warnings() {
                    log(LogLevel::Warn, &w);
                }
                self.shared = Some(Rc::new(Shared {
                    config,
                    stats: Stats::define(),
                    queue: RefCell::new(CloseQueue::default()),
                    ticking: Cell::new(false),
                    serial: Cell::new(0),
                    nonce: vm_nonce(),
                    passes: RefCell::new(HashMap::new()),
                    unreported: RefCell::new(crate::report_queue::ReportQueue::default()),
                    overrides: RefCell::new(HashMap::new()),
                }));
                true
            }
            Err(e) => {
                // Returning false makes Envoy refuse the config: a bad filter config fails at
                // load time, not on the first request.
                log(LogLevel::Critical, &e.to_string());
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let now = now();
        let batches = shared.queue.borrow_mut().take_due(now);
        for batch in batches {
            let request =
                settle::close_holds_request(batch.iter().map(|j| j.hold.clone()).collect());
            match hostcalls::dispatch_grpc_call(
                &shared.config.grpc_upstream,
                settle::TOLLGATE_SERVICE,
                settle::CLOSE_HOLDS,
                vec![("authorization", shared.config.authorization.as_bytes())],
                Some(&request),
                shared.config.settlement.timeout,
            ) {
                Ok(token) => {
                    self.inflight.insert(token, batch);
                }
                Err(e) => {
                    let fates = shared.queue.borrow_mut().answered(
                        batch,
                        Err(format!("dispatch: {e:?}")),
                        now,
                    );
                    report(&shared, fates);
                }
            }
        }
        // Bounded passes' usage, one batch at a time (a sidecar that is still down answers
        // with an error, and the batch waits for the next tick).
        let batch = shared.unreported.borrow_mut().take_batch();
        if let Some(batch) = batch {
            match hostcalls::dispatch_grpc_call(
                &shared.config.grpc_upstream,
                settle::TOLLGATE_SERVICE,
                "IngestUsage",
                vec![("authorization", shared.config.authorization.as_bytes())],
                Some(&crate::bounded::ingest_request(batch.clone())),
                shared.config.settlement.timeout,
            ) {
                Ok(token) => shared.unreported.borrow_mut().sent(token, batch),
                Err(_) => shared.unreported.borrow_mut().unsent(batch),
            }
        }
        if shared.queue.borrow().is_empty()
            && shared.unreported.borrow().is_idle()
            && hostcalls::set_tick_period(Duration::ZERO).is_ok()
        {
            shared.ticking.set(false);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(Http::new(shared)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
