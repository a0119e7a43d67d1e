//! Tollgate's decision sidecar: the decision core, the counter stores, config and the engine.

pub mod clock;
pub mod config;
pub mod core;
pub mod engine;
pub mod store;

pub use engine::{CheckRequest, DecisionError, Engine};
