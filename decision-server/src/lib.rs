//! Tollgate's decision sidecar: the decision core, the counter stores, config and the engine.

pub mod alerts;
pub mod api;
pub mod auth;
pub mod catalog;
pub mod clock;
pub mod config;
pub mod core;
pub mod engine;
pub mod grpc;
pub mod http;
pub mod jwt;
pub mod metrics;
pub mod net;
pub mod portal;
pub mod server;
pub mod service;
pub mod session;
pub mod store;
pub mod trial;
pub mod usage;

pub use engine::{CheckRequest, DecisionError, Engine};
