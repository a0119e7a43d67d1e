//! Time for the decision core: a `Clock` trait, the system clock and a manual clock for tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::core::Timestamp;

/// Where the engine reads "now" from. Injected so that tests cross windows and periods without
/// sleeping.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Timestamp;
}

/// Wall-clock UTC time.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(chrono::Utc::now().timestamp_millis())
    }
}

/// A clock that only moves when told to. Cloning shares the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    millis: Arc<AtomicI64>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self {
            millis: Arc::new(AtomicI64::new(start.millis())),
        }
    }

    pub fn set(&self, to: Timestamp) {
        self.millis.store(to.millis(), Ordering::SeqCst);
    }

    pub fn advance_millis(&self, by: i64) {
        self.millis.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_millis(self.millis.load(Ordering::SeqCst))
    }
}

/// The system clock moved to read `start` at the moment it is made; from there time passes
/// as it does. For tests and benchmarks whose outcome would otherwise depend on the time of
/// day or the date they run at (daily quotas near midnight, projections before a reset).
#[derive(Debug, Clone, Copy)]
pub struct ShiftedClock {
    offset_ms: i64,
}

impl ShiftedClock {
    pub fn starting_at(start: Timestamp) -> Self {
        Self {
            offset_ms: start.millis() - SystemClock.now().millis(),
        }
    }
}

impl Clock for ShiftedClock {
    fn now(&self) -> Timestamp {
        SystemClock.now().plus_millis(self.offset_ms)
    }
}
