//! The gRPC front ends: Envoy's ext_authz v3 and access log service, and Tollgate's own
//! `tollgate.v1` service.

pub mod access_log;
pub mod ext_authz;
pub mod tollgate;

/// The tonic client and server for `tollgate.v1`, generated against `tollgate-proto`'s
/// messages.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod generated {
    include!(concat!(env!("OUT_DIR"), "/tollgate.v1.rs"));
}

pub use ext_authz::ExtAuthzService;
pub use generated::tollgate_client::TollgateClient;
pub use generated::tollgate_server::TollgateServer;
pub use tollgate::TollgateService;
