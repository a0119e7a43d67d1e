//! The only module that calls the proxy-wasm host: contexts, headers, bodies, properties, the
//! gRPC calls, local replies and stats. It moves data between Envoy and the plain modules.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use prost::Message;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use serde_json::Value;
use tollgate_proto::envoywire as wire;

use crate::api::ask_for_usage;
use crate::config::{Effective, FilterConfig, RouteOverride, StreamUsage};
use crate::decision::{self, FailAction, Failure, Reply, Verdict};
use crate::extract::{self, BadInput, Body, RequestView};
use crate::pbjson::struct_to_json;
use crate::settle::{self, Close, CloseResult, Held, Tracker, Unknown};
use tollgate_proto::v1 as pb;

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// The filter's counters, as Envoy stats (`wasmcustom.tollgate.*`).
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
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
}

impl Stats {
    fn define() -> Self {
        let d = |name: &str| hostcalls::define_metric(MetricType::Counter, name).unwrap_or(0);
        Self {
            granted: d("tollgate.granted"),
            denied: d("tollgate.denied"),
            bad_input: d("tollgate.bad_input"),
            fail_open: d("tollgate.fail_open"),
            fail_closed: d("tollgate.fail_closed"),
            settled: d("tollgate.settled"),
            released: d("tollgate.released"),
            usage_unknown: d("tollgate.usage_unknown"),
            usage_estimated: d("tollgate.usage_estimated"),
            usage_requested: d("tollgate.usage_requested"),
            close_retried: d("tollgate.close_retried"),
            close_failed: d("tollgate.close_failed"),
        }
    }

    fn bump(id: u32) {
        if id != 0 {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }
}

/// A hold to close, queued for the root context. Closes are sent from the root, not from the
/// request's context: Envoy cancels a context's calls when its stream ends, and the response's
/// end is exactly when the usage is known.
#[derive(Debug, Clone)]
struct CloseJob {
    hold: pb::HoldClose,
    attempt: u32,
    not_before: SystemTime,
}

impl CloseJob {
    fn what(&self) -> &'static str {
        if self.hold.actual_usage.is_some() {
            "settle"
        } else {
            "release"
        }
    }
}

const CLOSE_ATTEMPTS: u32 = 4;
/// Closes wait up to this long and go to the sidecar as one `CloseHolds` call. Trade-off: a
/// settle lands a few ms after the response, and in exchange Envoy's worker makes one call per
/// tick instead of one per request (one per request cost the next requests' latency).
const TICK: Duration = Duration::from_millis(5);
/// The most closes in one call (the sidecar takes up to 1,000).
const MAX_BATCH: usize = 500;

/// The most route overrides kept parsed; past it the cache starts over.
const MAX_OVERRIDES: usize = 256;

#[derive(Debug)]
struct Shared {
    config: FilterConfig,
    stats: Stats,
    queue: RefCell<VecDeque<CloseJob>>,
    ticking: Cell<bool>,
    /// Route overrides by the route metadata bytes they were read from: parsed (regexes
    /// compiled) once per route, not once per request.
    overrides: RefCell<HashMap<Vec<u8>, Option<Rc<Resolved>>>>,
}

/// A route's settings, resolved once.
#[derive(Debug)]
struct Resolved {
    disabled: bool,
    effective: Effective,
}

impl Shared {
    fn enqueue(&self, job: CloseJob) {
        self.queue.borrow_mut().push_back(job);
        // Sets the tick of this VM's root context, whichever context calls it.
        if !self.ticking.get() && hostcalls::set_tick_period(TICK).is_ok() {
            self.ticking.set(true);
        }
    }

    fn close(&self, hold_id: &str, close: &Close, why: Option<Unknown>) {
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
        self.enqueue(CloseJob {
            hold: settle::hold_close(hold_id, close),
            attempt: 0,
            not_before: SystemTime::UNIX_EPOCH,
        });
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Root { shared: None, inflight: HashMap::new() })
    });
}}

/// The per-VM (per worker) root context: the config, the stats and the close queue.
#[derive(Debug)]
struct Root {
    shared: Option<Rc<Shared>>,
    inflight: HashMap<u32, Vec<CloseJob>>,
}

impl Root {
    fn retry_or_fail(&mut self, shared: &Shared, mut job: CloseJob, why: &str) {
        job.attempt += 1;
        if job.attempt >= CLOSE_ATTEMPTS {
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
            return;
        }
        Stats::bump(shared.stats.close_retried);
        let now = hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH);
        job.not_before = now + Duration::from_millis(100 << job.attempt);
        shared.enqueue(job);
    }
}

impl Context for Root {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, size: usize) {
        let (Some(shared), Some(jobs)) = (self.shared.clone(), self.inflight.remove(&token_id))
        else {
            return;
        };
        let results = if status_code == 0 {
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
        let results = match results {
            Ok(r) => r,
            Err(why) => {
                // Closes are idempotent on the sidecar: the whole batch is sent again.
                for job in jobs {
                    self.retry_or_fail(&shared, job, &why);
                }
                return;
            }
        };
        for (job, (result, message)) in jobs.into_iter().zip(results) {
            match result {
                CloseResult::Done => Stats::bump(if job.hold.actual_usage.is_some() {
                    shared.stats.settled
                } else {
                    shared.stats.released
                }),
                CloseResult::Rejected => {
                    Stats::bump(shared.stats.close_failed);
                    log(
                        LogLevel::Warn,
                        &format!("{} refused: {message}", job.what()),
                    );
                }
                CloseResult::Retry => self.retry_or_fail(&shared, job, &message),
            }
        }
    }
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
                    queue: RefCell::new(VecDeque::new()),
                    ticking: Cell::new(false),
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
        let now = hostcalls::get_current_time().unwrap_or(SystemTime::UNIX_EPOCH);
        let due: Vec<CloseJob> = {
            let mut q = shared.queue.borrow_mut();
            let (due, later): (VecDeque<_>, VecDeque<_>) =
                q.drain(..).partition(|j| j.not_before <= now);
            *q = later;
            due.into()
        };
        let mut due = due.into_iter().peekable();
        while due.peek().is_some() {
            let batch: Vec<CloseJob> = due.by_ref().take(MAX_BATCH).collect();
            let request =
                settle::close_holds_request(batch.iter().map(|j| j.hold.clone()).collect());
            match hostcalls::dispatch_grpc_call(
                &shared.config.cluster,
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
                    for job in batch {
                        self.retry_or_fail(&shared, job, &format!("dispatch: {e:?}"));
                    }
                }
            }
        }
        if shared.queue.borrow().is_empty() && hostcalls::set_tick_period(Duration::ZERO).is_ok() {
            shared.ticking.set(false);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let shared = self.shared.clone()?;
        Some(Box::new(Http {
            shared,
            effective: None,
            awaiting_body: false,
            deciding: false,
            view: HostView::default(),
            response_headers: Vec::new(),
            tracker: None,
            pending: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request.
#[derive(Debug)]
struct Http {
    shared: Rc<Shared>,
    effective: Option<Rc<Resolved>>,
    awaiting_body: bool,
    /// A decision call is in flight. Body and trailer callbacks must then pause: returning
    /// Continue from them would let the request upstream before the answer.
    deciding: bool,
    /// The request headers, until the decision call is built.
    view: HostView,
    response_headers: Vec<(String, String)>,
    tracker: Option<Tracker>,
    /// What the tracker of a granted request will need, known once the decision is asked for.
    pending: Option<Held>,
}

/// The request's headers, read from the host in one call when the request starts: one host
/// call (and one copy) instead of one per rule, which is most of the filter's per-request cost.
#[derive(Debug, Default)]
struct HostView {
    headers: Vec<(String, String)>,
    /// `jwt_authn`'s metadata, read once however many rules use it.
    jwt: std::cell::OnceCell<Option<serde_json::Map<String, Value>>>,
}

impl HostView {
    fn read() -> Self {
        Self {
            headers: hostcalls::get_map(proxy_wasm::types::MapType::HttpRequestHeaders)
                .unwrap_or_default(),
            jwt: std::cell::OnceCell::new(),
        }
    }

    /// The whole dynamic metadata, as an `envoy.config.core.v3.Metadata` message (a path into
    /// a Struct would come back in the host's pairs format, which holds strings only), and in
    /// it `jwt_authn`'s namespace.
    fn read_jwt_namespace() -> Option<serde_json::Map<String, Value>> {
        let bytes = hostcalls::get_property(vec!["metadata"]).ok().flatten()?;
        let meta = wire::Metadata::decode(bytes.as_slice()).ok()?;
        let ns = meta.filter_metadata.get("envoy.filters.http.jwt_authn")?;
        match struct_to_json(ns) {
            Value::Object(fields) => Some(fields),
            _ => None,
        }
    }
}

impl RequestView for HostView {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    fn path(&self) -> Option<String> {
        self.header(":path")
    }

    fn jwt_metadata(&self, key: &str) -> Option<Value> {
        self.jwt
            .get_or_init(Self::read_jwt_namespace)
            .as_ref()?
            .get(key)
            .cloned()
    }
}

impl Http {
    fn reply(&self, r: &Reply) {
        let headers: Vec<(&str, &str)> = r
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if let Err(e) = hostcalls::send_http_response(r.status, headers, Some(&r.body)) {
            log(
                LogLevel::Error,
                &format!("cannot send the local reply: {e:?}"),
            );
        }
    }

    fn bad_input(&self, bad: &BadInput) -> Action {
        Stats::bump(self.shared.stats.bad_input);
        self.reply(&decision::bad_input_reply(
            self.effective().api,
            self.shared.config.bad_input_status,
            bad,
        ));
        Action::Pause
    }

    /// The route's settings: the filter's, with the route's `filter_metadata["tollgate"]`
    /// over them (read once per route, then from the cache).
    fn route_settings(&self) -> Option<Rc<Resolved>> {
        let bytes = hostcalls::get_property(vec!["xds", "route_metadata"])
            .ok()
            .flatten()
            .unwrap_or_default();
        if let Some(hit) = self.shared.overrides.borrow().get(&bytes) {
            return hit.clone();
        }
        let resolved = self.resolve(&bytes);
        let mut cache = self.shared.overrides.borrow_mut();
        if cache.len() >= MAX_OVERRIDES {
            cache.clear();
        }
        cache.insert(bytes, resolved.clone());
        resolved
    }

    fn resolve(&self, bytes: &[u8]) -> Option<Rc<Resolved>> {
        let config = &self.shared.config;
        let meta = wire::Metadata::decode(bytes).ok()?;
        let s = meta.filter_metadata.get("tollgate")?;
        let resolved = RouteOverride::from_json(struct_to_json(s), config.instance.as_deref())
            .and_then(|o| {
                Ok(Resolved {
                    disabled: o.disabled,
                    effective: config.effective(Some(&o))?,
                })
            });
        match resolved {
            Ok(r) => Some(Rc::new(r)),
            Err(e) => {
                log(
                    LogLevel::Error,
                    &format!("{e}; the filter's own settings apply"),
                );
                None
            }
        }
    }

    /// Adds `include_usage` to a streamed chat request that did not ask for it, so its usage can
    /// be read; the tracker then takes the extra event out of the client's stream. Returns
    /// whether it did.
    fn ask_for_usage(&self, body: &mut Value, size: usize) -> bool {
        let e = self.effective();
        if !e.settlement.enabled
            || e.settlement.stream_usage != StreamUsage::Inject
            || !e.api.streams_without_usage(body)
        {
            return false;
        }
        ask_for_usage(body);
        let Ok(bytes) = serde_json::to_vec(body) else {
            return false;
        };
        if hostcalls::set_buffer(
            proxy_wasm::types::BufferType::HttpRequestBody,
            0,
            size,
            &bytes,
        )
        .is_err()
        {
            return false;
        }
        // The length changed; the upstream must not read the old one.
        self.set_http_request_header("content-length", Some(&bytes.len().to_string()));
        Stats::bump(self.shared.stats.usage_requested);
        true
    }

    fn decide(&mut self, body: Option<&Value>, body_len: usize, strip_usage: bool) -> Action {
        let view = std::mem::take(&mut self.view);
        let e = self.effective();
        let x = match extract::extract(
            &self.shared.config,
            &e,
            &view,
            Body {
                json: body,
                len: body_len,
            },
        ) {
            Ok(x) => x,
            Err(bad) => return self.bad_input(&bad),
        };
        let info = decision::RequestInfo {
            id: view.header("x-request-id").unwrap_or_default(),
            method: view.header(":method").unwrap_or_default(),
            path: view.path().unwrap_or_default(),
            host: view.header(":authority").unwrap_or_default(),
        };
        let timeout = e.timeout;
        let now = hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .and_then(|d| u64::try_from(d.as_millis()).ok());
        let deadline = now.map(|n| decision::deadline_millis(n, timeout));
        let message = decision::check_request(&x, &info, deadline);
        self.pending = Some(Held {
            api: e.api,
            units: x.usage.unwrap_or(0),
            prompt: x.prompt,
            strip_usage,
        });
        match hostcalls::dispatch_grpc_call(
            &self.shared.config.cluster,
            decision::AUTHZ_SERVICE,
            decision::AUTHZ_METHOD,
            vec![("authorization", self.shared.config.authorization.as_bytes())],
            Some(&message),
            timeout,
        ) {
            Ok(_) => {
                self.deciding = true;
                Action::Pause
            }
            // An unknown cluster fails here, synchronously.
            Err(e) => self.fail(&Failure::Dispatch(format!(
                "{e:?} (is cluster `{}` defined?)",
                self.shared.config.cluster
            ))),
        }
    }

    fn effective(&self) -> Effective {
        self.effective
            .as_ref()
            .map_or_else(|| self.shared.config.plain(), |r| r.effective.clone())
    }

    /// Applies the fail mode; returns the action for a callback that can still return one.
    fn fail(&mut self, failure: &Failure) -> Action {
        log(LogLevel::Warn, &format!("{failure}"));
        match decision::on_failure(&self.effective(), failure) {
            FailAction::Open(mark) => {
                Stats::bump(self.shared.stats.fail_open);
                self.set_http_request_header(decision::HEADER_UNCHECKED, Some(&mark));
                Action::Continue
            }
            FailAction::Closed(reply) => {
                Stats::bump(self.shared.stats.fail_closed);
                self.reply(&reply);
                Action::Pause
            }
        }
    }

    fn close(&mut self, outcome: Option<settle::Outcome>) {
        if let (Some((close, why)), Some(t)) = (outcome, self.tracker.as_ref()) {
            self.shared.close(t.hold_id(), &close, why);
        }
    }
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, _token_id: u32, status_code: u32, size: usize) {
        self.deciding = false;
        let verdict = if status_code != 0 {
            let (code, message) = hostcalls::get_grpc_status().unwrap_or((status_code, None));
            Verdict::Fail(Failure::from_grpc(code, message))
        } else {
            let body = self
                .get_grpc_call_response_body(0, size)
                .unwrap_or_default();
            decision::verdict(&body, self.shared.config.upstream_headers)
        };
        match verdict {
            Verdict::Grant(g) => {
                Stats::bump(self.shared.stats.granted);
                for name in &g.remove_headers {
                    self.set_http_request_header(name, None);
                }
                for (k, v) in &g.upstream_headers {
                    self.set_http_request_header(k, Some(v));
                }
                self.response_headers = g.response_headers;
                if self.effective().settlement.enabled
                    && let (Some(hold), Some(held)) = (g.hold_id, self.pending.take())
                {
                    self.tracker = Some(Tracker::new(hold, held));
                }
                self.resume_http_request();
            }
            Verdict::Deny(reply) => {
                Stats::bump(self.shared.stats.denied);
                self.reply(&decision::shape_denial(self.effective().api, reply));
            }
            Verdict::Fail(f) => {
                if self.fail(&f) == Action::Continue {
                    self.resume_http_request();
                }
            }
        }
    }
}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let resolved = self.route_settings();
        if resolved.as_ref().is_some_and(|r| r.disabled) {
            return Action::Continue;
        }
        self.effective = resolved;
        self.view = HostView::read();
        let config = &self.shared.config;
        let e = self.effective();
        if e.settlement.enabled && config.strip_accept_encoding {
            // The answer must be readable for its usage; a compressor filter placed before this
            // one still compresses it for the client.
            self.set_http_request_header("accept-encoding", None);
        }
        if e.needs_body(config) && !end_of_stream {
            let limit = config.max_body_bytes;
            if let Some(len) = self
                .view
                .header("content-length")
                .and_then(|l| l.trim().parse::<usize>().ok())
                && len > limit
            {
                return self.bad_input(&BadInput::BodyTooLarge { limit });
            }
            self.awaiting_body = true;
            return Action::Pause;
        }
        self.decide(None, 0, false)
    }

    fn on_http_request_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.deciding {
            // Envoy buffers it until the decision resumes the request.
            return Action::Pause;
        }
        if !self.awaiting_body {
            return Action::Continue;
        }
        let limit = self.shared.config.max_body_bytes;
        if size > limit {
            self.awaiting_body = false;
            return self.bad_input(&BadInput::BodyTooLarge { limit });
        }
        if !end_of_stream {
            // Envoy keeps buffering; the whole body arrives with end_of_stream.
            return Action::Pause;
        }
        self.awaiting_body = false;
        let bytes = self.get_http_request_body(0, size).unwrap_or_default();
        match extract::parse_body(&bytes) {
            Ok(Some(mut body)) => {
                let strip = self.ask_for_usage(&mut body, size);
                self.decide(Some(&body), bytes.len(), strip)
            }
            Ok(None) => self.decide(None, bytes.len(), false),
            Err(bad) => self.bad_input(&bad),
        }
    }

    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        if self.deciding {
            return Action::Pause;
        }
        if self.awaiting_body {
            self.awaiting_body = false;
            let bytes = self
                .get_http_request_body(0, usize::MAX)
                .unwrap_or_default();
            return match extract::parse_body(&bytes) {
                Ok(body) => self.decide(body.as_ref(), bytes.len(), false),
                Err(bad) => self.bad_input(&bad),
            };
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        for (k, v) in std::mem::take(&mut self.response_headers) {
            self.set_http_response_header(&k, Some(&v));
        }
        let e = self.effective();
        let Some(t) = self.tracker.as_mut() else {
            return Action::Continue;
        };
        let s = &e.settlement;
        let status = HostViewResponse::header(":status").and_then(|v| v.parse().ok());
        let ct = HostViewResponse::header("content-type");
        let encoding = HostViewResponse::header("content-encoding");
        let usage = s.header.as_deref().and_then(HostViewResponse::header);
        let outcome = t.on_headers(
            s,
            status,
            ct.as_deref(),
            encoding.as_deref(),
            usage.as_deref(),
            end_of_stream,
        );
        if t.strips_usage() {
            // Events are taken out of the stream: its length changes.
            self.set_http_response_header("content-length", None);
        }
        self.close(outcome);
        Action::Continue
    }

    fn on_http_response_body(&mut self, size: usize, end_of_stream: bool) -> Action {
        if self.tracker.is_none() {
            return Action::Continue;
        }
        let chunk = if size > 0 {
            self.get_http_response_body(0, size).unwrap_or_default()
        } else {
            Vec::new()
        };
        let e = self.effective();
        let Some((outcome, replaced)) = self
            .tracker
            .as_mut()
            .map(|t| t.on_body(&e.settlement, &chunk, end_of_stream))
        else {
            return Action::Continue;
        };
        if let Some(bytes) = replaced
            && hostcalls::set_buffer(
                proxy_wasm::types::BufferType::HttpResponseBody,
                0,
                size,
                &bytes,
            )
            .is_err()
        {
            log(LogLevel::Warn, "cannot rewrite a response chunk");
        }
        self.close(outcome);
        Action::Continue
    }

    fn on_log(&mut self) {
        let e = self.effective();
        let outcome = self.tracker.as_mut().and_then(|t| t.on_end(&e.settlement));
        self.close(outcome);
    }
}

struct HostViewResponse;

impl HostViewResponse {
    fn header(name: &str) -> Option<String> {
        hostcalls::get_map_value(proxy_wasm::types::MapType::HttpResponseHeaders, name)
            .ok()
            .flatten()
    }
}
