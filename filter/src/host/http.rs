//! The per-request context: reads the request, asks the sidecar, applies the verdict, and
//! follows the response to settle the hold.

use std::rc::Rc;
use std::time::SystemTime;

use prost::Message;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel};
use serde_json::Value;
use tollgate_proto::envoywire as wire;

use super::{MAX_OVERRIDES, Resolved, Shared, Stats, log};
use crate::api::{Api, ask_for_usage};
use crate::batch::BatchScan;
use crate::config::{Effective, RouteOverride, StreamUsage, UnknownEndpoints};
use crate::decision::{self, FailAction, Failure, Reply, Verdict};
use crate::endpoint::{self, Endpoint};
use crate::extract::{self, BadInput, Body, RequestView};
use crate::pbjson::struct_to_json;
use crate::settle::{self, Held, Tracker};

/// One request.
#[derive(Debug)]
pub(super) struct Http {
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
    /// Under `failMode: bounded`: whom a pass would charge, and its hold id (`bounded:` and
    /// the request id), known once the decision is asked for.
    pass: Option<(String, crate::bounded::Pass)>,
    /// The preset of this request's endpoint, when a whole-API preset picked one.
    api: Option<Api>,
    /// What the request holds whatever its body says (a gate holds one unit).
    fixed_usage: Option<u64>,
    /// An unknown endpoint held by policy: a body that is not JSON is read as no body, and
    /// the hold is the default output budget plus the body's estimate.
    default_hold: bool,
    /// The gate's hold is released when the answer starts.
    release_at_answer: bool,
    /// A batch's results being read, and whom their usage is charged to.
    batch: Option<(BatchScan, crate::bounded::Pass)>,
    /// A stream held in slices: what its extension calls carry (the first call's values and
    /// request facts), and the token of the one in flight.
    slicing: Option<(extract::Extracted, decision::RequestInfo)>,
    slice_call: Option<(u32, u64)>,
    /// When a slice was refused, for the time to the stream's end.
    refused_at: Option<SystemTime>,
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
    pub(super) fn new(shared: Rc<Shared>) -> Self {
        Self {
            shared,
            effective: None,
            awaiting_body: false,
            deciding: false,
            view: HostView::default(),
            response_headers: Vec::new(),
            tracker: None,
            pending: None,
            pass: None,
            api: None,
            fixed_usage: None,
            default_hold: false,
            release_at_answer: false,
            batch: None,
            slicing: None,
            slice_call: None,
            refused_at: None,
        }
    }

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
        let mut x = match extract::extract(
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
        if let Some(units) = self.fixed_usage {
            x.usage = Some(units);
        } else if self.default_hold && x.usage.is_none() {
            // The body's size when it was read, else what the request says it is.
            let len = if body_len > 0 {
                body_len
            } else {
                view.header("content-length")
                    .and_then(|l| l.trim().parse::<usize>().ok())
                    .unwrap_or(0)
            };
            let estimate = &e.settlement.estimate;
            x.prompt = e.api.prompt_estimate(len, estimate);
            x.usage = Some(x.prompt.saturating_add(estimate.default_max_tokens));
        }
        let info = decision::RequestInfo {
            id: view.header("x-request-id").unwrap_or_default(),
            method: view.header(":method").unwrap_or_default(),
            path: view.path().unwrap_or_default(),
            host: view.header(":authority").unwrap_or_default(),
        };
        // Pay as you stream: a streamed call holds its prompt and a first slice, not its whole
        // output budget; the rest is asked for slice by slice as it runs.
        let worst = x.usage.unwrap_or(0);
        let streaming = (e.settlement.enabled
            && e.settlement.streaming.mode != crate::config::StreamMode::Off
            && self.fixed_usage.is_none()
            && matches!(
                e.api,
                Api::OpenaiChat | Api::OpenaiResponses | Api::AnthropicMessages
            )
            && body.is_some_and(|b| b["stream"].as_bool() == Some(true)))
        .then_some(e.settlement.streaming);
        if let Some(policy) = streaming {
            let first = x.prompt.saturating_add(policy.first_slice);
            x.usage = Some(worst.min(first));
            self.slicing = Some((x.clone(), info.clone()));
        }
        let timeout = e.timeout;
        let part = match streaming {
            // Its first hold settles the whole stream: the sidecar bounds that settlement by
            // what the call may use, not by ten times the first slice.
            Some(_) => decision::Part::StreamStart { budget: worst },
            None => decision::Part::Call,
        };
        let message = decision::check_request_for(&x, &info, deadline_for(timeout), part);
        if e.fail_mode == crate::config::FailMode::Bounded
            && let (Some(customer), Some(feature)) = (&x.customer, &x.feature)
        {
            // Never the client's `x-request-id`: apps that propagate a trace id send the same
            // one on many calls, and each pass that reached the upstream must count once.
            self.pass = Some((
                format!("{}{}", crate::bounded::PREFIX, self.shared.unique_id()),
                crate::bounded::Pass {
                    customer: customer.clone(),
                    feature: feature.clone(),
                    dimensions: x.dimensions.clone(),
                },
            ));
        }
        self.pending = Some(Held {
            api: e.api,
            units: x.usage.unwrap_or(0),
            prompt: x.prompt,
            strip_usage,
            release: self.release_at_answer,
            streaming,
            worst,
        });
        match self.dispatch_check(&message, timeout) {
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
        let mut e = self
            .effective
            .as_ref()
            .map_or_else(|| self.shared.config.plain(), |r| r.effective.clone());
        if let Some(api) = self.api {
            e.api = api;
        }
        e
    }

    /// Sorts the request by endpoint (whole-API presets). `Some` when that already decides
    /// what to do with it; `None` to go on to a decision.
    fn route_endpoint(&mut self, e: &Effective) -> Option<Action> {
        let method = self.view.header(":method").unwrap_or_default();
        let path = self.view.path().unwrap_or_default();
        match endpoint::classify(e.api, &method, &path) {
            Endpoint::Metered(api) => {
                self.api = Some(api);
                None
            }
            Endpoint::Free => {
                Stats::bump(self.shared.stats.free_passed);
                Some(Action::Continue)
            }
            Endpoint::Gate(api) => {
                self.api = Some(api);
                self.fixed_usage = Some(1);
                self.release_at_answer = true;
                Some(self.decide(None, 0, false))
            }
            Endpoint::BatchResults(kind, id) => Some(self.follow_batch(kind, id)),
            Endpoint::Unknown => match e.unknown_endpoints {
                UnknownEndpoints::Deny => {
                    Stats::bump(self.shared.stats.unknown_denied);
                    let family = if e.api == Api::Anthropic {
                        Api::AnthropicMessages
                    } else {
                        Api::OpenaiChat
                    };
                    self.reply(&decision::unknown_endpoint_reply(family, &method, &path));
                    Some(Action::Pause)
                }
                UnknownEndpoints::Pass => {
                    Stats::bump(self.shared.stats.unknown_passed);
                    self.set_http_request_header(
                        decision::HEADER_UNCHECKED,
                        Some("unknown-endpoint"),
                    );
                    Some(Action::Continue)
                }
                UnknownEndpoints::Hold => {
                    self.api = Some(Api::Custom);
                    self.default_hold = true;
                    None
                }
            },
        }
    }

    /// A batch's results: no decision (the work is done and billed); whom it charges comes
    /// from the rules, and the usage from the lines, reported once the results end.
    fn follow_batch(&mut self, kind: endpoint::BatchKind, id: String) -> Action {
        let view = std::mem::take(&mut self.view);
        let e = self.effective();
        let x = match extract::extract(&self.shared.config, &e, &view, Body { json: None, len: 0 })
        {
            Ok(x) => x,
            Err(bad) => return self.bad_input(&bad),
        };
        if let (Some(customer), Some(feature)) = (x.customer, x.feature) {
            let pass = crate::bounded::Pass {
                customer,
                feature,
                dimensions: x.dimensions,
            };
            let max_line = e.settlement.max_response_bytes;
            self.batch = Some((BatchScan::new(kind, id, max_line), pass));
        }
        Action::Continue
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
            FailAction::Bounded(reply) => {
                let e = self.effective();
                let units = self.pending.as_ref().map_or(0, |h| h.units);
                match self.pass.take() {
                    Some((hold, pass))
                        if take_allowance(&pass.customer, units, e.bounded_per_minute) =>
                    {
                        Stats::bump(self.shared.stats.bounded_passed);
                        self.set_http_request_header(
                            decision::HEADER_UNCHECKED,
                            Some(crate::bounded::MARK),
                        );
                        match self.pending.take() {
                            // Settled from the answer like a hold, then reported as usage.
                            Some(held) if e.settlement.enabled => {
                                self.shared.passes.borrow_mut().insert(hold.clone(), pass);
                                self.tracker = Some(Tracker::new(hold, held));
                            }
                            // No settlement: the requested amount is what passed.
                            _ => self
                                .shared
                                .report_pass(crate::bounded::record(&hold, &pass, units, None)),
                        }
                        Action::Continue
                    }
                    _ => {
                        Stats::bump(self.shared.stats.bounded_refused);
                        Stats::bump(self.shared.stats.fail_closed);
                        self.reply(&reply);
                        Action::Pause
                    }
                }
            }
        }
    }

    /// The batch's results ended: their usage goes to the sidecar, once per batch and model.
    fn report_batch(&mut self) {
        if let Some((mut scan, pass)) = self.batch.take() {
            scan.finish();
            for record in scan.records(&pass) {
                Stats::bump(self.shared.stats.batch_reported);
                self.shared.report_pass(record);
            }
        }
    }

    /// Sends an ext_authz `Check` to the sidecar, with the gateway token; the call's token.
    fn dispatch_check(
        &self,
        message: &[u8],
        timeout: std::time::Duration,
    ) -> Result<u32, proxy_wasm::types::Status> {
        hostcalls::dispatch_grpc_call(
            &self.shared.config.grpc_upstream,
            decision::AUTHZ_SERVICE,
            decision::AUTHZ_METHOD,
            vec![("authorization", self.shared.config.authorization.as_bytes())],
            Some(message),
            timeout,
        )
    }

    /// What a `Check` call answered: its verdict, or the failure its gRPC status means.
    fn answer(&self, status_code: u32, size: usize, upstream_headers: bool) -> Verdict {
        if status_code != 0 {
            let (code, message) = hostcalls::get_grpc_status().unwrap_or((status_code, None));
            return Verdict::Fail(Failure::from_grpc(code, message));
        }
        let body = self
            .get_grpc_call_response_body(0, size)
            .unwrap_or_default();
        decision::verdict(&body, upstream_headers)
    }

    fn close(&mut self, outcome: Option<settle::Outcome>) {
        if let (Some((close, why)), Some(t)) = (outcome, self.tracker.as_mut()) {
            if let (settle::Close::Settle(reading), Some(slices)) = (&close, t.slices_mut()) {
                Stats::add(
                    self.shared.stats.stream_overshoot_units,
                    reading.total.saturating_sub(slices.covered()),
                );
            }
            self.shared.close(t.hold_id(), &close, why, t.ending());
            // The first hold carries the whole usage; the slices it grew by go.
            for slice in t.take_extensions() {
                self.shared
                    .close(&slice, &settle::Close::Release, None, None);
            }
        }
    }

    /// Asks the sidecar for the stream's next slice of `units`, ahead of need.
    fn ask_slice(&mut self, units: u64) {
        let (Some((base, info)), Some(t)) = (self.slicing.as_ref(), self.tracker.as_ref()) else {
            return;
        };
        let mut x = base.clone();
        x.usage = Some(units);
        let timeout = self.effective().timeout;
        let message = decision::check_request_for(
            &x,
            info,
            deadline_for(timeout),
            decision::Part::Slice {
                extends: t.hold_id(),
            },
        );
        match self.dispatch_check(&message, timeout) {
            Ok(token) => {
                self.slice_call = Some((token, units));
                if let Some(slices) = self.tracker.as_mut().and_then(Tracker::slices_mut) {
                    slices.asked();
                }
            }
            Err(e) => self.slice_answered(Verdict::Fail(Failure::Dispatch(format!("{e:?}")))),
        }
    }

    /// The answer to a slice: more held, the stream's end (in the API's shape), or, with the
    /// sidecar unreachable, `onSidecarDown`.
    fn slice_answered(&mut self, verdict: Verdict) {
        let units = self.slice_call.take().map_or(0, |(_, u)| u);
        let e = self.effective();
        let (api, per_minute) = (e.api, e.bounded_per_minute);
        let customer = self.slicing.as_ref().and_then(|(x, _)| x.customer.clone());
        let Some(slices) = self.tracker.as_mut().and_then(Tracker::slices_mut) else {
            return;
        };
        match verdict {
            Verdict::Grant(g) => {
                Stats::bump(self.shared.stats.stream_extended);
                slices.granted(g.hold_id, units);
            }
            Verdict::Deny(reply) => {
                Stats::bump(self.shared.stats.stream_refused);
                self.refused_at = hostcalls::get_current_time().ok();
                let by = decision::limit_of(&reply.body);
                let shaped = decision::shape_denial(api, reply);
                slices.refused(crate::stream::cut_event(api, &shaped.body), &by);
            }
            Verdict::Fail(f) => {
                Stats::bump(self.shared.stats.stream_unreachable);
                log(
                    LogLevel::Warn,
                    &format!("a stream's next slice could not be asked for: {f:?}"),
                );
                // `onSidecarDown: bounded`: the slice from the customer's allowance, if it
                // has room; the next one asks the sidecar again.
                if slices.draws_on_allowance()
                    && let Some(customer) = customer
                    && take_allowance(&customer, units, per_minute)
                {
                    Stats::bump(self.shared.stats.stream_bounded);
                    Stats::add(self.shared.stats.stream_bounded_units, units);
                    slices.granted_on_allowance(units);
                    return;
                }
                let reply = decision::Reply {
                    status: 503,
                    headers: Vec::new(),
                    body: serde_json::json!({"error": "unavailable",
                        "message": "the usage service could not be reached mid-stream"})
                    .to_string()
                    .into_bytes(),
                };
                let shaped = decision::shape_denial(api, reply);
                slices.unreachable(crate::stream::cut_event(api, &shaped.body));
            }
        }
    }
}

impl Context for Http {
    fn on_grpc_call_response(&mut self, token_id: u32, status_code: u32, size: usize) {
        if self.slice_call.is_some_and(|(t, _)| t == token_id) {
            // A slice's answer: no upstream headers to add, the request went long ago.
            let verdict = self.answer(status_code, size, false);
            self.slice_answered(verdict);
            return;
        }
        self.deciding = false;
        let verdict = self.answer(status_code, size, self.shared.config.upstream_headers);
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
        // Only this filter marks a request unchecked: a client's own mark never reaches the
        // upstream, on any route, whatever becomes of the request.
        if self
            .get_http_request_header(decision::HEADER_UNCHECKED)
            .is_some()
        {
            self.set_http_request_header(decision::HEADER_UNCHECKED, None);
        }
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
        if let Some(action) = self.route_endpoint(&e) {
            return action;
        }
        let e = self.effective();
        let config = &self.shared.config;
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
            // An endpoint held by policy may carry any body (a file upload): it is only sized.
            Err(_) if self.default_hold => self.decide(None, bytes.len(), false),
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
                Err(_) if self.default_hold => self.decide(None, bytes.len(), false),
                Err(bad) => self.bad_input(&bad),
            };
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        for (k, v) in std::mem::take(&mut self.response_headers) {
            self.set_http_response_header(&k, Some(&v));
        }
        if self.batch.is_some() {
            // Only a whole, readable answer counts: its results are reported once, and a
            // partial read would stand for the batch.
            let status: Option<u32> =
                HostViewResponse::header(":status").and_then(|v| v.parse().ok());
            let encoded = HostViewResponse::header("content-encoding").is_some_and(|v| {
                !v.trim().is_empty() && !v.trim().eq_ignore_ascii_case("identity")
            });
            if !status.is_some_and(|s| (200..300).contains(&s)) || encoded {
                self.batch = None;
            } else if end_of_stream {
                self.report_batch();
            }
            return Action::Continue;
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
        if self.batch.is_some() {
            let chunk = if size > 0 {
                self.get_http_response_body(0, size).unwrap_or_default()
            } else {
                Vec::new()
            };
            if let Some((scan, _)) = self.batch.as_mut() {
                scan.feed(&chunk);
            }
            if end_of_stream {
                self.report_batch();
            }
            return Action::Continue;
        }
        if self.tracker.is_none() {
            return Action::Continue;
        }
        let chunk = if size > 0 {
            self.get_http_response_body(0, size).unwrap_or_default()
        } else {
            Vec::new()
        };
        let e = self.effective();
        let was_cut = self
            .tracker
            .as_mut()
            .and_then(Tracker::slices_mut)
            .is_some_and(|x| x.is_cut());
        let Some((outcome, replaced)) = self
            .tracker
            .as_mut()
            .map(|t| t.on_body(&e.settlement, &chunk, end_of_stream))
        else {
            return Action::Continue;
        };
        let cut_now = !was_cut
            && self
                .tracker
                .as_mut()
                .and_then(Tracker::slices_mut)
                .is_some_and(|x| x.is_cut());
        if cut_now {
            Stats::bump(self.shared.stats.stream_cut);
            if let (Some(at), Ok(now)) = (self.refused_at, hostcalls::get_current_time()) {
                let us = now.duration_since(at).map_or(0, |d| d.as_micros());
                Stats::record(
                    self.shared.stats.stream_cut_delay_us,
                    u64::try_from(us).unwrap_or(u64::MAX),
                );
            }
        }
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
        if was_cut && !end_of_stream {
            // The client has its error event and the stream's end; the upstream is still
            // generating. Resetting closes it, so the provider stops.
            let _ = hostcalls::reset_http_response();
            return Action::Continue;
        }
        if let Some(units) = self
            .tracker
            .as_ref()
            .and_then(|t| t.next_slice(&e.settlement))
        {
            self.ask_slice(units);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        if self.batch.take().is_some() {
            // The client left before the results' end: nothing is reported, so a full read
            // later still counts the whole batch.
            Stats::bump(self.shared.stats.batch_partial);
        }
        let e = self.effective();
        let outcome = self.tracker.as_mut().and_then(|t| t.on_end(&e.settlement));
        self.close(outcome);
    }
}

/// When the sidecar should stop deciding a call made now with `timeout` (ms since the epoch).
fn deadline_for(timeout: std::time::Duration) -> Option<u64> {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .and_then(|d| u64::try_from(d.as_millis()).ok())
        .map(|n| decision::deadline_millis(n, timeout))
}

/// Takes `units` from `customer`'s allowance of this minute in Envoy's shared data, with
/// compare-and-swap against the other worker threads; whether it fit.
fn take_allowance(customer: &str, units: u64, per_minute: u64) -> bool {
    let minute = hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() / 60);
    let key = crate::bounded::key(customer);
    // A lost race is tried again; a bounded number of times, as every loop here is.
    for _ in 0..16 {
        let (current, cas) = hostcalls::get_shared_data(&key).unwrap_or((None, None));
        let Some(next) = crate::bounded::take(current.as_deref(), minute, units, per_minute) else {
            return false;
        };
        match hostcalls::set_shared_data(&key, Some(&next), cas) {
            Ok(()) => return true,
            Err(proxy_wasm::types::Status::CasMismatch) => continue,
            Err(_) => return false,
        }
    }
    false
}

struct HostViewResponse;

impl HostViewResponse {
    fn header(name: &str) -> Option<String> {
        hostcalls::get_map_value(proxy_wasm::types::MapType::HttpResponseHeaders, name)
            .ok()
            .flatten()
    }
}
