//! Releases, in the background and until Redis answers, the holds of decisions whose answer
//! was lost (a reserve sent and then timed out, or whose connection broke).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use redis::Value;

use super::call::{Call, Code};

use super::keys::CallKeys;
use super::link::Conn;
use super::wire::{DONE, push_record_settings, result, tag_text};
use crate::core::Timestamp;
use crate::core::rollup::RecordSettings;
use crate::store::events::StreamRetention;

/// How long a cancelled decision's tag is remembered (`lua/ledger.lua` `cancel()`), so that its
/// reserve, if it runs later still, holds nothing. Far longer than any call can be delayed in a
/// live connection.
const CANCEL_MEMORY_MS: i64 = 3_600_000;
/// How long the canceller keeps trying to reach Redis for one cancel.
const CANCEL_PATIENCE: Duration = Duration::from_secs(3_600);
/// The most cancels waiting to reach Redis at once; past it a cancel is dropped and logged
/// (its hold, if one was placed, expires at the held amount).
const MAX_PENDING_CANCELS: usize = 100_000;

/// Shares the store's connection: a cancel sent after its reserve on one connection runs
/// after it in Redis, and the remembered tag covers a reserve resent on a new connection.
#[derive(Clone)]
pub struct Canceller {
    pub conn: Conn,
    pub script: Code,
    /// How usage records are kept: a cancel releases (a record) and expires due holds.
    pub records: Arc<parking_lot::RwLock<RecordSettings>>,
    pub prefix: String,
    pub timeout: Duration,
    pub pending: Arc<AtomicUsize>,
    pub released: Arc<AtomicU64>,
}

impl Canceller {
    /// The cancel call for `tag` on `keys`.
    pub fn invocation(&self, keys: &CallKeys, tag: u128, now: Timestamp) -> Call<'_> {
        let mut inv = self.script.call();
        for k in &keys.keys {
            inv.key(k);
        }
        inv.arg("cancel")
            .arg(now.millis())
            .arg(tag_text(tag))
            .arg(CANCEL_MEMORY_MS);
        push_record_settings(&mut inv, &self.records.read(), &StreamRetention::default());
        inv
    }

    /// Whether a cancel's reply says it released a hold (and counts it).
    pub fn released(&self, reply: &[Value]) -> bool {
        let released = result(reply) == Some(DONE);
        if released {
            self.released.fetch_add(1, Ordering::Relaxed);
        }
        released
    }

    /// Cancels in the background, retrying with backoff until Redis answers.
    pub fn cancel_soon(&self, customer: &str, tag: u128, now: Timestamp) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.pending.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING_CANCELS {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            tracing::error!(customer, tag = %tag_text(tag), "too many cancels waiting for Redis; this decision's hold, if placed, will expire charged");
            return;
        }
        let me = self.clone();
        let customer = customer.to_string();
        runtime.spawn(async move {
            let started = std::time::Instant::now();
            let mut wait = Duration::from_millis(50);
            loop {
                let elapsed = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
                let keys = CallKeys::new(&me.prefix, &customer);
                let inv = me.invocation(&keys, tag, now.plus_millis(elapsed));
                match me.conn.invoke(&inv, me.timeout).await {
                    Ok(reply) => {
                        let released = me.released(&reply);
                        tracing::debug!(customer, released, "lost decision cancelled");
                        break;
                    }
                    Err(e) if started.elapsed() > CANCEL_PATIENCE => {
                        let e = crate::store::StoreError::from(e);
                        tracing::error!(customer, error = %e, "cannot cancel a lost decision; its hold, if placed, will expire charged");
                        break;
                    }
                    Err(_) => {
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(2));
                    }
                }
            }
            me.pending.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

impl std::fmt::Debug for Canceller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canceller")
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}
