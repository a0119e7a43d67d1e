//! Tollgate's proxy-wasm HTTP filter: registers the root and per-request contexts with the host.
//!
//! At this stage the filter loads in Envoy and lets every request through unchanged; the
//! extraction, decision and settlement logic are built on top of this entry point.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(TollgateRoot) });
}}

/// The per-VM root context; it creates one [`TollgateHttp`] per request.
#[derive(Debug)]
struct TollgateRoot;

impl Context for TollgateRoot {}

impl RootContext for TollgateRoot {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(TollgateHttp))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// The per-request context.
#[derive(Debug)]
struct TollgateHttp;

impl Context for TollgateHttp {}

impl HttpContext for TollgateHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        Action::Continue
    }
}
