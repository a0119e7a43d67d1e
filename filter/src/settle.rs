//! Settlement: the actual usage read from the upstream's response (a header, a JSON body, or
//! an SSE stream scanned incrementally), and the `Settle`/`Release` call that closes the hold.

use prost::Message;
use serde_json::Value;
use tollgate_proto::v1 as pb;

use crate::config::{OnUnknownUsage, Settlement};

pub const TOLLGATE_SERVICE: &str = "tollgate.v1.Tollgate";
pub const CLOSE_HOLDS: &str = "CloseHolds";

/// Usage read from a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    pub total: u64,
    /// Set when the OpenAI `usage` object gave the split.
    pub tokens: Option<pb::Tokens>,
}

/// Reads usage from a JSON document: the number at `pointer`, or the OpenAI `usage` object.
pub fn reading_from_json(doc: &Value, pointer: Option<&str>) -> Option<Reading> {
    if let Some(p) = pointer {
        return doc.pointer(p).and_then(Value::as_u64).map(|total| Reading {
            total,
            tokens: None,
        });
    }
    let usage = doc.get("usage").filter(|u| u.is_object())?;
    let n = |k: &str| usage.get(k).and_then(Value::as_u64);
    let input = n("prompt_tokens").or_else(|| n("input_tokens"));
    let output = n("completion_tokens").or_else(|| n("output_tokens"));
    let total = n("total_tokens").or(match (input, output) {
        (Some(i), Some(o)) => i.checked_add(o),
        _ => None,
    })?;
    let cached = usage
        .pointer("/prompt_tokens_details/cached_tokens")
        .or_else(|| usage.pointer("/input_tokens_details/cached_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Some(Reading {
        total,
        tokens: Some(pb::Tokens {
            input: input.unwrap_or(0),
            output: output.unwrap_or(0),
            cached,
        }),
    })
}

/// Scans an SSE stream chunk by chunk for the last event that carries usage, keeping only the
/// unfinished line between chunks.
#[derive(Debug, Default)]
pub struct SseScanner {
    partial: Vec<u8>,
    /// The partial line grew past the cap and is being skipped to its end.
    skipping: bool,
    last: Option<Reading>,
    saw_done: bool,
}

/// A line longer than this is no usage event; it is skipped, not buffered.
const MAX_SSE_LINE: usize = 256 * 1024;

impl SseScanner {
    pub fn feed(&mut self, chunk: &[u8], pointer: Option<&str>) {
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(i);
            rest = &tail[1..];
            if self.skipping {
                self.skipping = false;
                self.partial.clear();
                continue;
            }
            if self.partial.is_empty() {
                self.line(head, pointer);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(head);
                self.line(&line, pointer);
            }
        }
        if !self.skipping {
            self.partial.extend_from_slice(rest);
            if self.partial.len() > MAX_SSE_LINE {
                self.partial.clear();
                self.skipping = true;
            }
        }
    }

    fn line(&mut self, line: &[u8], pointer: Option<&str>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            self.saw_done = true;
            return;
        }
        // Most events are content deltas; parse only those that can carry usage.
        let key: &[u8] = match pointer {
            None => b"usage",
            Some(p) => p.rsplit('/').next().unwrap_or(p).as_bytes(),
        };
        if !data.windows(key.len().max(1)).any(|w| w == key) {
            return;
        }
        if let Ok(doc) = serde_json::from_slice::<Value>(data)
            && let Some(r) = reading_from_json(&doc, pointer)
        {
            self.last = Some(r);
        }
    }

    /// The usage seen, once the stream has ended.
    pub fn finish(&mut self, pointer: Option<&str>) -> Option<Reading> {
        if !self.partial.is_empty() && !self.skipping {
            let line = std::mem::take(&mut self.partial);
            self.line(&line, pointer);
        }
        self.last
    }

    pub fn saw_done(&self) -> bool {
        self.saw_done
    }
}

/// How a hold ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    Settle(Reading),
    Release,
    /// Left open: it expires on the sidecar with the estimate charged.
    Keep,
}

/// Why the usage could not be read, for stats and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// The upstream answered an error status.
    UpstreamError,
    /// The response ended (or broke off) without usage.
    NoUsage,
    /// The response was never completed: the client or upstream reset the stream.
    Broken,
    /// The JSON body was over the kept size.
    TooLarge,
}

#[derive(Debug, PartialEq, Eq)]
enum Mode {
    Waiting,
    Json,
    Sse,
    Done,
}

/// Follows one granted request's response to its usage.
#[derive(Debug)]
pub struct Tracker {
    hold_id: String,
    mode: Mode,
    body: Vec<u8>,
    too_large: bool,
    sse: SseScanner,
}

impl Tracker {
    pub fn new(hold_id: String) -> Self {
        Self {
            hold_id,
            mode: Mode::Waiting,
            body: Vec::new(),
            too_large: false,
            sse: SseScanner::default(),
        }
    }

    pub fn hold_id(&self) -> &str {
        &self.hold_id
    }

    /// The response headers. Returns the close when they already decide it.
    pub fn on_headers(
        &mut self,
        s: &Settlement,
        status: Option<u32>,
        content_type: Option<&str>,
        usage_header: Option<&str>,
        end_of_stream: bool,
    ) -> Option<(Close, Option<Unknown>)> {
        if !status.is_some_and(|s| (200..300).contains(&s)) {
            self.mode = Mode::Done;
            return Some(unknown(s, Unknown::UpstreamError));
        }
        if let Some(total) = usage_header.and_then(|h| h.trim().parse::<u64>().ok()) {
            self.mode = Mode::Done;
            return Some((
                Close::Settle(Reading {
                    total,
                    tokens: None,
                }),
                None,
            ));
        }
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        self.mode = if ct.starts_with("text/event-stream") {
            Mode::Sse
        } else {
            Mode::Json
        };
        if end_of_stream {
            self.mode = Mode::Done;
            return Some(unknown(s, Unknown::NoUsage));
        }
        None
    }

    /// A response body chunk. Returns the close at the end of the stream.
    pub fn on_body(
        &mut self,
        s: &Settlement,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> Option<(Close, Option<Unknown>)> {
        let pointer = s.usage_pointer.as_deref();
        match self.mode {
            Mode::Sse => self.sse.feed(chunk, pointer),
            Mode::Json if !self.too_large => {
                if self.body.len() + chunk.len() > s.max_response_bytes {
                    self.too_large = true;
                    self.body = Vec::new();
                } else {
                    self.body.extend_from_slice(chunk);
                }
            }
            _ => {}
        }
        if !end_of_stream {
            return None;
        }
        let reading = match self.mode {
            Mode::Sse => self.sse.finish(pointer),
            Mode::Json if self.too_large => {
                self.mode = Mode::Done;
                return Some(unknown(s, Unknown::TooLarge));
            }
            Mode::Json => serde_json::from_slice::<Value>(&self.body)
                .ok()
                .and_then(|doc| reading_from_json(&doc, pointer)),
            _ => return None,
        };
        self.mode = Mode::Done;
        Some(match reading {
            Some(r) => (Close::Settle(r), None),
            None => unknown(s, Unknown::NoUsage),
        })
    }

    /// The request is over; if the response never completed, the hold closes by policy.
    pub fn on_end(&mut self, s: &Settlement) -> Option<(Close, Option<Unknown>)> {
        if self.mode == Mode::Done {
            return None;
        }
        self.mode = Mode::Done;
        Some(unknown(s, Unknown::Broken))
    }
}

fn unknown(s: &Settlement, why: Unknown) -> (Close, Option<Unknown>) {
    let close = match s.on_unknown_usage {
        OnUnknownUsage::Release => Close::Release,
        OnUnknownUsage::Keep => Close::Keep,
    };
    (close, Some(why))
}

/// The `CloseHolds` item that carries a close, or `None` for [`Close::Keep`].
pub fn hold_close(hold_id: &str, close: &Close) -> Option<pb::HoldClose> {
    match close {
        Close::Settle(r) => Some(pb::HoldClose {
            hold_id: hold_id.to_string(),
            actual_usage: Some(r.total),
            tokens: r.tokens,
        }),
        Close::Release => Some(pb::HoldClose {
            hold_id: hold_id.to_string(),
            actual_usage: None,
            tokens: None,
        }),
        Close::Keep => None,
    }
}

/// One `CloseHolds` call for a batch of closes, encoded.
pub fn close_holds_request(holds: Vec<pb::HoldClose>) -> Vec<u8> {
    pb::CloseHoldsRequest { holds }.encode_to_vec()
}

/// What became of each close of a batch, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseResult {
    /// Closed now, or already closed: done either way.
    Done,
    /// Refused for good (unknown hold, another customer's): counted, not retried.
    Rejected,
    /// The sidecar's store failed: retry.
    Retry,
}

/// Reads a `CloseHoldsResponse` for a batch of `n` closes. `None` when it is unreadable or
/// does not answer every close, so the caller retries the whole batch (closes are idempotent).
pub fn close_results(body: &[u8], n: usize) -> Option<Vec<(CloseResult, String)>> {
    use pb::hold_close_result::Status;
    let r = pb::CloseHoldsResponse::decode(body).ok()?;
    if r.results.len() != n {
        return None;
    }
    Some(
        r.results
            .into_iter()
            .map(|x| {
                let kind = match x.status() {
                    Status::Closed | Status::AlreadyClosed => CloseResult::Done,
                    Status::Rejected => CloseResult::Rejected,
                    Status::Failed => CloseResult::Retry,
                };
                (kind, x.message)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn settlement(on_unknown: OnUnknownUsage) -> Settlement {
        Settlement {
            enabled: true,
            usage_pointer: None,
            header: None,
            on_unknown_usage: on_unknown,
            timeout: Duration::from_secs(1),
            max_response_bytes: 1024,
        }
    }

    #[test]
    fn openai_usage_reads_with_its_split() {
        let doc = serde_json::json!({"usage": {"prompt_tokens": 12, "completion_tokens": 30,
            "total_tokens": 42, "prompt_tokens_details": {"cached_tokens": 4}}});
        let r = reading_from_json(&doc, None).unwrap();
        assert_eq!(r.total, 42);
        assert_eq!(
            r.tokens,
            Some(pb::Tokens {
                input: 12,
                output: 30,
                cached: 4
            })
        );
        let no_total = serde_json::json!({"usage": {"prompt_tokens": 2, "completion_tokens": 3}});
        assert_eq!(reading_from_json(&no_total, None).unwrap().total, 5);
        assert_eq!(
            reading_from_json(&serde_json::json!({"usage": null}), None),
            None
        );
        let custom = serde_json::json!({"meta": {"units": 9}});
        assert_eq!(
            reading_from_json(&custom, Some("/meta/units"))
                .unwrap()
                .total,
            9
        );
    }

    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\" there\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn sse_usage_is_found_whatever_the_chunking() {
        let bytes = STREAM.as_bytes();
        for size in [1, 2, 3, 7, 16, 64, bytes.len()] {
            let mut s = SseScanner::default();
            for chunk in bytes.chunks(size) {
                s.feed(chunk, None);
            }
            assert_eq!(
                s.finish(None).map(|r| r.total),
                Some(12),
                "chunk size {size}"
            );
            assert!(s.saw_done());
        }
        // CRLF line ends and a last line with no newline.
        let crlf = STREAM.replace('\n', "\r\n");
        let mut s = SseScanner::default();
        s.feed(crlf.trim_end().as_bytes(), None);
        assert_eq!(s.finish(None).map(|r| r.total), Some(12));
    }

    #[test]
    fn a_huge_line_is_skipped_not_buffered() {
        let mut s = SseScanner::default();
        s.feed(b"data: ", None);
        for _ in 0..100 {
            s.feed(&[b'x'; 8192], None);
        }
        assert!(s.partial.len() <= MAX_SSE_LINE);
        s.feed(b"\ndata: {\"usage\":{\"total_tokens\":3}}\n", None);
        assert_eq!(s.finish(None).map(|r| r.total), Some(3));
    }

    #[test]
    fn the_tracker_settles_or_applies_the_policy() {
        let s = settlement(OnUnknownUsage::Release);
        // JSON over two chunks.
        let mut t = Tracker::new("h".into());
        assert_eq!(
            t.on_headers(&s, Some(200), Some("application/json"), None, false),
            None
        );
        assert_eq!(t.on_body(&s, b"{\"usage\":{\"total_tokens\"", false), None);
        let (close, why) = t.on_body(&s, b":9}}", true).unwrap();
        assert_eq!(
            close,
            Close::Settle(Reading {
                total: 9,
                tokens: close_tokens(&close)
            })
        );
        assert_eq!(why, None);
        assert_eq!(t.on_end(&s), None, "closed once");

        // Upstream error: released, counted.
        let mut t = Tracker::new("h".into());
        assert_eq!(
            t.on_headers(&s, Some(502), None, None, false),
            Some((Close::Release, Some(Unknown::UpstreamError)))
        );
        // A header wins.
        let mut t = Tracker::new("h".into());
        assert_eq!(
            t.on_headers(&s, Some(200), None, Some("41"), false)
                .unwrap()
                .0,
            Close::Settle(Reading {
                total: 41,
                tokens: None
            })
        );
        // A stream broken before usage: the policy, here keep.
        let keep = settlement(OnUnknownUsage::Keep);
        let mut t = Tracker::new("h".into());
        t.on_headers(&keep, Some(200), Some("text/event-stream"), None, false);
        t.on_body(&keep, b"data: {\"usage\":null}\n", false);
        assert_eq!(t.on_end(&keep), Some((Close::Keep, Some(Unknown::Broken))));
        // A body over the kept size.
        let mut t = Tracker::new("h".into());
        t.on_headers(&s, Some(200), Some("application/json"), None, false);
        assert_eq!(
            t.on_body(&s, &[b' '; 2048], true),
            Some((Close::Release, Some(Unknown::TooLarge)))
        );
        assert_eq!(hold_close("h", &Close::Keep), None);
        let release = hold_close("h", &Close::Release).unwrap();
        assert_eq!(
            (release.hold_id.as_str(), release.actual_usage),
            ("h", None)
        );
        let settle = hold_close(
            "h",
            &Close::Settle(Reading {
                total: 5,
                tokens: None,
            }),
        )
        .unwrap();
        assert_eq!(settle.actual_usage, Some(5));
        let bytes = close_holds_request(vec![release, settle]);
        assert_eq!(
            pb::CloseHoldsRequest::decode(bytes.as_slice())
                .unwrap()
                .holds
                .len(),
            2
        );
    }

    #[test]
    fn close_results_map_each_status_and_refuse_short_answers() {
        use pb::hold_close_result::Status;
        let answer = |statuses: &[Status]| {
            pb::CloseHoldsResponse {
                results: statuses
                    .iter()
                    .map(|s| pb::HoldCloseResult {
                        status: *s as i32,
                        message: String::new(),
                    })
                    .collect(),
            }
            .encode_to_vec()
        };
        let all = [
            Status::Closed,
            Status::AlreadyClosed,
            Status::Rejected,
            Status::Failed,
        ];
        let got: Vec<CloseResult> = close_results(&answer(&all), 4)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            got,
            [
                CloseResult::Done,
                CloseResult::Done,
                CloseResult::Rejected,
                CloseResult::Retry
            ]
        );
        assert_eq!(close_results(&answer(&all[..3]), 4), None);
        assert_eq!(close_results(b"\xff\xff", 1), None);
    }

    fn close_tokens(c: &Close) -> Option<pb::Tokens> {
        match c {
            Close::Settle(r) => r.tokens,
            _ => None,
        }
    }
}
