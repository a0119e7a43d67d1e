//! Tollgate's proxy-wasm HTTP filter: extraction rules, the ext_authz call to the sidecar, fail
//! modes and settlement from the response. Everything but `host` is plain Rust, tested natively;
//! `host` is built for wasm only, where the proxy-wasm host functions exist.

pub mod api;
pub mod batch;
pub mod bounded;
pub mod close_queue;
pub mod config;
pub mod decision;
pub mod endpoint;
pub mod extract;
pub mod lines;
pub mod pbjson;
pub mod report_queue;
pub mod settle;
pub mod stream;

#[cfg(target_arch = "wasm32")]
mod host;
