//! Tollgate's test kit, shared by every test crate, the demo and the load generator: real
//! processes (the sidecar, Envoy, the mock upstream, Redis) started on free loopback ports
//! and stopped on drop, the credentials they are configured with, and `/metrics` scraping.

pub mod credentials;
pub mod envoy;
pub mod fixtures;
pub mod metrics;
pub mod proc;
pub mod redis;
pub mod sidecar;
pub mod upstream;

pub use credentials::{
    GATEWAY_TOKEN, JWT_ISSUER, JWT_KEY, bearer_for, gateway_token_config, jwks, signed_jwt,
    unsigned_bearer,
};
pub use envoy::{
    Envoy, ProviderTarget, envoy_binary, envoy_config, provider_config, render, wasm_module,
    with_streaming,
};
pub use fixtures::{ORG_TEAM_USER, sha256_hex};
pub use metrics::Metrics;
pub use proc::{Proc, root};
pub use redis::{RedisCluster, RedisServer, free_port};
pub use sidecar::Sidecar;
pub use upstream::{FakeAnswer, MockLlm, fake_authz, hung_listener};
