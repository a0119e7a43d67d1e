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

/// The tonic client of `tollgate.v1` (feature `client`): what a program that calls the sidecar
/// needs, without building the sidecar.
#[cfg(feature = "client")]
pub mod client {
    include!(concat!(env!("OUT_DIR"), "/client/tollgate.v1.rs"));
    pub use tollgate_client::TollgateClient;
}

/// The subset of Envoy's ext_authz v3 (and route metadata) messages the WASM filter uses, with
/// Envoy's field numbers; see `proto/tollgate/envoywire/v1/ext_authz.proto`.
pub mod envoywire {
    include!(concat!(env!("OUT_DIR"), "/tollgate.envoywire.v1.rs"));
}

/// The ext_authz contract between the sidecar and whoever calls it (the WASM filter, or Envoy's
/// own filter with per-route `context_extensions`): one definition for both sides.
pub mod ext_authz {
    /// `context_extensions` keys.
    pub const KEY_CUSTOMER: &str = "tollgate.customer";
    pub const KEY_FEATURE: &str = "tollgate.feature";
    pub const KEY_USAGE: &str = "tollgate.usage";
    /// When the caller stops waiting, in milliseconds since the Unix epoch: past it the sidecar
    /// decides nothing, and releases a hold it placed too late.
    pub const KEY_DEADLINE: &str = "tollgate.deadline";
    /// `"true"`: the requested usage is final; a grant counts it at once and holds nothing
    /// (set per route in Envoy for routes whose holds nobody settles).
    pub const KEY_COMMIT: &str = "tollgate.commit";
    /// The hold id of a streamed call this check extends by its usage (the next slice): the
    /// same atomic check of every level, without another concurrency slot or request count,
    /// and without a usage record of its own (the call's first hold records the whole).
    pub const KEY_EXTENDS: &str = "tollgate.extends";
    /// A streamed call's declared budget (what a non-streamed call would hold), on its first
    /// hold when it is held in slices: that hold settles the whole stream, so its settlement
    /// ceiling covers the budget rather than ten times the first slice.
    pub const KEY_BUDGET: &str = "tollgate.budget";
    /// Followed by the dimension name: `tollgate.dim.teamId`.
    pub const KEY_DIMENSION_PREFIX: &str = "tollgate.dim.";

    /// The hold id, for settlement by the WASM filter or the upstream.
    pub const HEADER_HOLD_ID: &str = "x-tollgate-hold-id";
    /// Remaining budget of the tightest enforcing limit.
    pub const HEADER_REMAINING: &str = "x-tollgate-remaining";
    /// Set on requests let through without a decision.
    pub const HEADER_UNCHECKED: &str = "x-tollgate-unchecked";
    /// Set when no limit applied to the request.
    pub const HEADER_NO_LIMIT: &str = "x-tollgate-no-matching-limit";
    /// The dynamic metadata key of the hold id.
    pub const METADATA_HOLD_ID: &str = "holdId";
}
