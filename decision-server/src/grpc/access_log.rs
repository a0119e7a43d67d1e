//! Envoy's access log service (`envoy.service.accesslog.v3.AccessLogService`) as the
//! settlement of the native ext_authz path: Envoy streams each finished request here, with the
//! hold id the grant left in the request's dynamic metadata and the usage the upstream
//! reported in a response header; the hold settles at that usage, or by the configured policy
//! when none is reported (`server.extAuthz.settlement`).
//!
//! What it can read: the request's dynamic metadata (hold id, units held), the response code,
//! and the response headers and trailers Envoy is told to log. What it cannot: response
//! bodies (a model's `usage` object) — Envoy's access log never carries them; an upstream that
//! reports usage only in its body needs the WASM filter.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogService;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use futures_util::future::join_all;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

pub use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogServiceServer;

use crate::auth::{Listener, Principal};
use crate::config::server::{ClosePolicy, Settlement};
use crate::core::HoldId;
use crate::core::usage::Usage;
use crate::service::Service;

use super::ext_authz::{METADATA_HELD, METADATA_HOLD_ID};

/// How one reported request closes its hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    /// At the usage the upstream reported.
    Settle(HoldId, u64),
    /// At what was held.
    Held(HoldId, u64),
    Release(HoldId),
    /// The request held nothing (denied, committed, let through unchecked).
    NoHold,
    /// A hold id or usage that does not read; the hold is left to its TTL.
    Unreadable(String),
}

impl Close {
    /// The hold it closes.
    pub fn hold(&self) -> Option<&HoldId> {
        match self {
            Close::Settle(h, _) | Close::Held(h, _) | Close::Release(h) => Some(h),
            Close::NoHold | Close::Unreadable(_) => None,
        }
    }
}

/// A string field of any namespace of `metadata`: Envoy's ext_authz filter files its check
/// response's metadata under its own name, which differs between versions and instances.
fn metadata_string<'a>(metadata: Option<&'a Metadata>, key: &str) -> Option<&'a str> {
    metadata?.filter_metadata.values().find_map(|s| {
        match s.fields.get(key).and_then(|v| v.kind.as_ref()) {
            Some(Kind::StringValue(v)) => Some(v.as_str()),
            _ => None,
        }
    })
}

/// What a finished request's access log entry does to its hold. Pure: no I/O.
pub fn close_of(entry: &HttpAccessLogEntry, policy: &Settlement) -> Close {
    let metadata = entry
        .common_properties
        .as_ref()
        .and_then(|c| c.metadata.as_ref());
    let Some(text) = metadata_string(metadata, METADATA_HOLD_ID) else {
        return Close::NoHold;
    };
    let hold = match text.parse::<HoldId>() {
        Ok(h) => h,
        Err(e) => return Close::Unreadable(format!("hold id: {e}")),
    };
    let response = entry.response.as_ref();
    if let Some(text) = response.and_then(|r| {
        r.response_headers
            .get(&policy.usage_header)
            .or_else(|| r.response_trailers.get(&policy.usage_header))
    }) {
        return match text.trim().parse::<u64>() {
            Ok(units) => Close::Settle(hold, units),
            Err(_) => Close::Unreadable(format!(
                "`{}: {}` is not a whole number of units",
                policy.usage_header,
                text.chars().take(32).collect::<String>()
            )),
        };
    }
    // No usage reported: an upstream that failed (5xx, or never answered: code 0) follows
    // `onUpstreamError`, anything else `onMissing`.
    let code = response
        .and_then(|r| r.response_code)
        .map_or(0, |c| c.value);
    let failed = code == 0 || code >= 500;
    let policy = if failed {
        policy.on_upstream_error
    } else {
        policy.on_missing
    };
    match policy {
        ClosePolicy::Release => Close::Release(hold),
        ClosePolicy::Held => {
            match metadata_string(metadata, METADATA_HELD).and_then(|t| t.parse::<u64>().ok()) {
                Some(held) => Close::Held(hold, held),
                // A grant made before settlement was configured: its TTL charges what it held.
                None => Close::Unreadable("no units held in the metadata".into()),
            }
        }
    }
}

/// `close`, if `principal` may close holds of its customer (a gateway token limited to some
/// customers closes only theirs).
fn reachable(principal: &Principal, close: Close) -> Close {
    match close.hold() {
        Some(h) if !principal.may_decide(&h.customer) => Close::Unreadable(format!(
            "these credentials do not reach customer `{}`",
            h.customer
        )),
        _ => close,
    }
}

/// The service: each stream is one Envoy's reports.
#[derive(Debug, Clone)]
pub struct AccessLogSettlement {
    service: Arc<Service>,
    shutdown: watch::Receiver<bool>,
}

impl AccessLogSettlement {
    /// `shutdown` turning true ends the open streams (Envoy reconnects, to another replica if
    /// this one is going), so shutdown can drain.
    pub fn new(service: Arc<Service>, shutdown: watch::Receiver<bool>) -> Self {
        Self { service, shutdown }
    }

    /// Closes one reported request's hold.
    async fn apply(&self, close: Close) {
        let (hold, result) = match close {
            Close::NoHold => return self.service.access_log_counted("no_hold"),
            Close::Unreadable(why) => {
                tracing::warn!(reason = %why, "an access log report does not read; its hold waits for its TTL");
                return self.service.access_log_counted("unreadable");
            }
            Close::Settle(hold, units) => {
                let r = self.service.settle(&hold, Usage::units(units)).await;
                (hold, r.map(|_| "settled"))
            }
            Close::Held(hold, units) => {
                let r = self.service.settle(&hold, Usage::units(units)).await;
                (hold, r.map(|_| "held"))
            }
            Close::Release(hold) => {
                let r = self.service.release(&hold).await;
                (hold, r.map(|_| "released"))
            }
        };
        match result {
            Ok(counted) => self.service.access_log_counted(counted),
            Err(e) => {
                tracing::warn!(hold = %hold, error = %e, "an access log report could not close its hold");
                self.service.access_log_counted("unreadable");
            }
        }
    }
}

#[tonic::async_trait]
impl AccessLogService for AccessLogSettlement {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        // The gateway's credential, as for a check: closing holds changes counters.
        let principal = super::tollgate::principal_of(&self.service, &request, Listener::ExtAuthz)?;
        let mut stream = request.into_inner();
        let mut shutdown = self.shutdown.clone();
        loop {
            let message = tokio::select! {
                m = stream.message() => match m? {
                    Some(m) => m,
                    None => break,
                },
                _ = shutdown.wait_for(|stop| *stop) => break,
            };
            let settings = self.service.settings();
            let Some(policy) = settings.ext_authz.settlement.as_ref() else {
                // Not configured: the reports are read and dropped, so Envoy's stream stays
                // up and a reload that turns settlement on takes effect at once.
                continue;
            };
            let Some(LogEntries::HttpLogs(batch)) = message.log_entries else {
                continue;
            };
            // One batch is one flush of Envoy's buffer (16 KiB by default): closed together.
            let closes = batch
                .log_entry
                .iter()
                .map(|e| reachable(&principal, close_of(e, policy)));
            join_all(closes.map(|c| self.apply(c))).await;
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogCommon, HttpResponseProperties};
    use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value};

    use super::*;

    const HOLD: &str = "acme:7:0123456789abcdef0123456789abcdef";

    fn policy() -> Settlement {
        Settlement {
            usage_header: "x-tollgate-actual-usage".into(),
            on_missing: ClosePolicy::Held,
            on_upstream_error: ClosePolicy::Release,
        }
    }

    fn entry(meta: &[(&str, &str)], code: u32, headers: &[(&str, &str)]) -> HttpAccessLogEntry {
        let fields = meta
            .iter()
            .map(|(k, v)| {
                (
                    (*k).to_string(),
                    Value {
                        kind: Some(Kind::StringValue((*v).to_string())),
                    },
                )
            })
            .collect();
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                metadata: Some(Metadata {
                    filter_metadata: HashMap::from([(
                        "envoy.filters.http.ext_authz".to_string(),
                        Struct { fields },
                    )]),
                    ..Metadata::default()
                }),
                ..AccessLogCommon::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: Some(UInt32Value { value: code }),
                response_headers: headers
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                    .collect(),
                ..HttpResponseProperties::default()
            }),
            ..HttpAccessLogEntry::default()
        }
    }

    fn hold() -> HoldId {
        HOLD.parse().unwrap()
    }

    #[test]
    fn a_reported_usage_settles_and_a_silent_request_follows_its_policy() {
        let held = [("holdId", HOLD), ("heldUsage", "256")];
        let p = policy();
        let usage = [("x-tollgate-actual-usage", " 42 ")];
        assert_eq!(
            close_of(&entry(&held, 200, &usage), &p),
            Close::Settle(hold(), 42)
        );
        // A failed upstream that still reports usage is charged it.
        assert_eq!(
            close_of(&entry(&held, 502, &usage), &p),
            Close::Settle(hold(), 42)
        );
        assert_eq!(
            close_of(&entry(&held, 200, &[]), &p),
            Close::Held(hold(), 256)
        );
        assert_eq!(
            close_of(&entry(&held, 503, &[]), &p),
            Close::Release(hold())
        );
        // Code 0: the upstream never answered (reset, timeout).
        assert_eq!(close_of(&entry(&held, 0, &[]), &p), Close::Release(hold()));
        let lenient = Settlement {
            on_missing: ClosePolicy::Release,
            on_upstream_error: ClosePolicy::Held,
            ..policy()
        };
        assert_eq!(
            close_of(&entry(&held, 200, &[]), &lenient),
            Close::Release(hold())
        );
        assert_eq!(
            close_of(&entry(&held, 504, &[]), &lenient),
            Close::Held(hold(), 256)
        );
    }

    #[test]
    fn what_does_not_read_is_named_and_closes_nothing() {
        let p = policy();
        assert_eq!(close_of(&entry(&[], 200, &[]), &p), Close::NoHold);
        assert_eq!(close_of(&HttpAccessLogEntry::default(), &p), Close::NoHold);
        let bad_id = close_of(&entry(&[("holdId", "acme:x")], 200, &[]), &p);
        assert!(
            matches!(bad_id, Close::Unreadable(ref m) if m.contains("hold id")),
            "{bad_id:?}"
        );
        let bad_usage = close_of(
            &entry(
                &[("holdId", HOLD)],
                200,
                &[("x-tollgate-actual-usage", "-3")],
            ),
            &p,
        );
        assert!(
            matches!(bad_usage, Close::Unreadable(ref m) if m.contains("x-tollgate-actual-usage: -3")),
            "{bad_usage:?}"
        );
        // `held` without the units in the metadata: left to the TTL, said so.
        let no_units = close_of(&entry(&[("holdId", HOLD)], 200, &[]), &p);
        assert!(matches!(no_units, Close::Unreadable(_)), "{no_units:?}");
    }

    #[test]
    fn a_gateway_closes_only_the_holds_of_customers_it_reaches() {
        let close = Close::Settle(hold(), 1);
        let globex_only =
            Principal::Gateway(Some(std::sync::Arc::from(vec!["globex".to_string()])));
        assert!(
            matches!(reachable(&globex_only, close.clone()), Close::Unreadable(ref m) if m.contains("`acme`"))
        );
        assert_eq!(reachable(&Principal::Gateway(None), close.clone()), close);
    }
}
