//! The pure decision core: model, hierarchy resolution and limit arithmetic. Nothing here does I/O.

pub mod alerts;
pub mod counter;
pub mod credits;
pub mod decision;
pub mod lease;
pub mod ledger;
pub mod model;
pub mod period;
pub mod plan;
pub mod rollup;
pub mod symbols;
pub mod target;
pub mod usage;
pub mod usage_query;
pub mod window;

pub use decision::{ChainEntry, Decision, Denial, HoldId, ParseHoldIdError};
pub use model::{
    Attribution, CustomerModel, EntityNode, EntityType, Feature, Limit, LimitKind, LimitTarget,
    Mode, Model, OnUnknown,
};
pub use plan::{Plan, PlanError};
pub use symbols::{Name, Sym, Symbols};
pub use usage::{TokenCounts, Usage};

use std::fmt;

/// Milliseconds since the Unix epoch, UTC. The core's only notion of time.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }

    pub const fn millis(self) -> i64 {
        self.0
    }

    pub fn from_datetime(dt: chrono::DateTime<chrono::Utc>) -> Self {
        Self(dt.timestamp_millis())
    }

    /// The same instant as a chrono UTC time; instants chrono cannot hold clamp to its range.
    pub fn to_datetime(self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::from_timestamp_millis(self.0).unwrap_or(if self.0 < 0 {
            chrono::DateTime::<chrono::Utc>::MIN_UTC
        } else {
            chrono::DateTime::<chrono::Utc>::MAX_UTC
        })
    }

    pub fn plus_millis(self, ms: i64) -> Self {
        Self(self.0.saturating_add(ms))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            self.to_datetime()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        )
    }
}
