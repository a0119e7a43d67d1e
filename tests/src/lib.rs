//! Support for Tollgate's end-to-end tests and demo: real processes (Envoy, the sidecar, the
//! mock upstream) started on free loopback ports and stopped on drop.

pub mod harness;
pub mod redis;
