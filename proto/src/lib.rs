//! Tollgate's own gRPC messages (`tollgate.v1`), generated from `proto/tollgate/v1/tollgate.proto`.
//!
//! Only prost messages live here, no transport, so that the WASM filter (`wasm32-wasip1`) and
//! the sidecar share one definition. The sidecar generates its tonic service against these
//! types with `extern_path`.

#![allow(missing_docs, clippy::all)]

/// `tollgate.v1`.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/tollgate.v1.rs"));
}

/// The subset of Envoy's ext_authz v3 (and route metadata) messages the WASM filter uses, with
/// Envoy's field numbers; see `proto/tollgate/envoywire/v1/ext_authz.proto`.
pub mod envoywire {
    include!(concat!(env!("OUT_DIR"), "/tollgate.envoywire.v1.rs"));
}
