//! Settlement: the actual usage read from the upstream's response (a header, a JSON body, or
//! an SSE stream scanned incrementally), the estimate when it never comes, and the
//! `CloseHolds` call that closes the hold.

use prost::Message;
use serde_json::Value;
use tollgate_proto::v1 as pb;

use crate::api::{Api, UsageAcc, UsageReading, content_bytes};
use crate::config::{OnMissingUsage, OnUpstreamError, Settlement};
use crate::lines::{Lines, Piece};
use crate::stream::Ending;

pub const TOLLGATE_SERVICE: &str = "tollgate.v1.Tollgate";
pub const CLOSE_HOLDS: &str = "CloseHolds";

/// Reads usage for the plain form (no preset): the number at `pointer`, or an OpenAI-style
/// `usage` object.
pub fn reading_from_json(doc: &Value, pointer: Option<&str>) -> Option<UsageReading> {
    if let Some(p) = pointer {
        return doc
            .pointer(p)
            .and_then(Value::as_u64)
            .map(|total| UsageReading {
                total,
                tokens: None,
            });
    }
    let mut acc = UsageAcc::default();
    acc.absorb(Api::Custom, doc);
    acc.reading()
}

/// What one response has shown so far: its usage, and how much content it delivered.
#[derive(Debug, Default)]
struct Seen {
    usage: UsageAcc,
    /// Set when a usage pointer (the plain form) found a number.
    pointed: Option<UsageReading>,
    /// Bytes of generated content.
    content: u64,
}

impl Seen {
    fn take(&mut self, api: Api, pointer: Option<&str>, doc: &Value) {
        match pointer {
            Some(p) => {
                if let Some(r) = reading_from_json(doc, Some(p)) {
                    self.pointed = Some(r);
                }
            }
            None => {
                self.usage.absorb(api, doc);
            }
        }
        self.content = self.content.saturating_add(content_bytes(api, doc));
    }

    fn reading(&self) -> Option<UsageReading> {
        self.pointed.or_else(|| self.usage.reading())
    }

    /// Usage was reported, but not its output yet (an Anthropic stream left before its
    /// `message_delta`).
    fn partial(&self) -> bool {
        self.pointed.is_none() && self.usage.output_provisional()
    }
}

/// Scans an SSE stream chunk by chunk: every event's usage and content, keeping only the
/// unfinished line between chunks. With `strip`, it also hands back the chunk without the
/// usage-only events the filter asked for on the client's behalf.
#[derive(Debug, Default)]
pub struct SseScanner {
    lines: Lines,
    seen: Seen,
    saw_done: bool,
    strip: bool,
}

/// A line longer than this is no usage event; it is skipped, not buffered.
const MAX_SSE_LINE: usize = 256 * 1024;

impl SseScanner {
    /// A scanner that takes out the usage-only events (`include_usage` added by the filter).
    pub fn stripping() -> Self {
        Self {
            strip: true,
            ..Self::default()
        }
    }

    /// Takes in one chunk. When stripping, returns what the client gets of it: its complete
    /// lines but the stripped events (the unfinished last line waits for the next chunk).
    pub fn feed(&mut self, api: Api, chunk: &[u8], pointer: Option<&str>) -> Option<Vec<u8>> {
        let mut out = self.strip.then(|| Vec::with_capacity(chunk.len()));
        // Out of `self` while it hands lines to `self.line`.
        let mut lines = std::mem::take(&mut self.lines);
        lines.feed(chunk, MAX_SSE_LINE, |piece| match piece {
            // An over-long line: passed on as it came, never read.
            Piece::Skipped(bytes) => {
                if let Some(o) = out.as_mut() {
                    o.extend_from_slice(bytes);
                }
            }
            Piece::Line(line) => {
                let keep = self.line(api, line, pointer);
                if let Some(o) = out.as_mut()
                    && keep
                {
                    o.extend_from_slice(line);
                    o.push(b'\n');
                }
            }
        });
        self.lines = lines;
        out
    }

    /// Reads one line; returns whether the client should get it.
    fn line(&mut self, api: Api, line: &[u8], pointer: Option<&str>) -> bool {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return true;
        };
        let data = data.trim_ascii();
        if data == b"[DONE]" {
            self.saw_done = true;
            return true;
        }
        if !data.starts_with(b"{") {
            return true;
        }
        let Ok(doc) = serde_json::from_slice::<Value>(data) else {
            return true;
        };
        self.seen.take(api, pointer, &doc);
        !(self.strip && crate::api::is_usage_chunk(&doc))
    }

    /// The end of the stream: the unfinished last line is read (and, when stripping, handed
    /// back if the client should get it).
    pub fn finish(&mut self, api: Api, pointer: Option<&str>) -> Option<Vec<u8>> {
        let line = self.lines.finish()?;
        let keep = self.line(api, &line, pointer);
        (self.strip && keep).then_some(line)
    }

    pub fn reading(&self) -> Option<UsageReading> {
        self.seen.reading()
    }

    /// See [`Seen::partial`].
    pub fn partial(&self) -> bool {
        self.seen.partial()
    }

    pub fn content(&self) -> u64 {
        self.seen.content
    }

    pub fn saw_done(&self) -> bool {
        self.saw_done
    }
}

/// How a hold ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Close {
    Settle(UsageReading),
    Release,
}

/// Why the usage was not read from the response, for stats and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unknown {
    /// The upstream answered an error status.
    UpstreamError,
    /// Content was delivered and no usage came with it (a stream without usage, a client that
    /// left before it, a JSON answer without it).
    NoUsage,
    /// Nothing was delivered before the response ended or broke off.
    NothingDelivered,
    /// The JSON body was over the kept size.
    TooLarge,
    /// The answer was compressed, so it could not be read.
    Encoded,
}

/// What the tracker decided, and why the usage was not read (when it was not).
pub type Outcome = (Close, Option<Unknown>);

#[derive(Debug, PartialEq, Eq)]
enum Mode {
    Waiting,
    Json,
    Sse,
    /// Delivered, but not readable (compressed): only its size is known.
    Opaque,
    Done,
}

/// What the tracker knows of its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub api: Api,
    /// The units the hold asked for: what `hold` charges.
    pub units: u64,
    /// The prompt's estimated tokens, for the estimate of a response without usage.
    pub prompt: u64,
    /// The filter added `include_usage`: take the usage-only event out of the client's stream.
    pub strip_usage: bool,
    /// A gate (creating a batch, billed when its results are read): released as soon as the
    /// answer starts, whatever it says.
    pub release: bool,
    /// A stream held in slices (`settlement.streaming`): `units` is its first hold, and it may
    /// grow to `worst`, what a non-streamed call holds.
    pub streaming: Option<crate::config::Streaming>,
    pub worst: u64,
}

/// Follows one granted request's response to its usage.
#[derive(Debug)]
pub struct Tracker {
    hold_id: String,
    held: Held,
    mode: Mode,
    body: Vec<u8>,
    too_large: bool,
    /// Response body bytes delivered.
    delivered: u64,
    sse: SseScanner,
    /// The slices of a stream held in slices, once its answer turned out to be a stream.
    slices: Option<crate::stream::Slices>,
}

impl Tracker {
    pub fn new(hold_id: String, held: Held) -> Self {
        Self {
            hold_id,
            held,
            mode: Mode::Waiting,
            body: Vec::new(),
            too_large: false,
            delivered: 0,
            sse: if held.strip_usage {
                SseScanner::stripping()
            } else {
                SseScanner::default()
            },
            slices: None,
        }
    }

    /// The slices of this call, when it is a stream held in slices.
    pub fn slices_mut(&mut self) -> Option<&mut crate::stream::Slices> {
        self.slices.as_mut()
    }

    /// Units the stream has used so far: its usage where the stream reported some (Anthropic
    /// reports the output as it goes), else the prompt's estimate and the content delivered
    /// at the documented bytes per token (text, tool-call arguments and thinking alike).
    pub fn used(&self, s: &Settlement) -> u64 {
        let estimated = self
            .held
            .prompt
            .saturating_add(s.estimate.tokens(self.sse.content()));
        self.sse
            .reading()
            .map_or(estimated, |r| r.total.max(estimated))
    }

    /// The next slice to ask for, if it is time.
    pub fn next_slice(&self, s: &Settlement) -> Option<u64> {
        self.slices.as_ref()?.next_ask(self.used(s))
    }

    pub fn hold_id(&self) -> &str {
        &self.hold_id
    }

    /// Whether the client's stream loses the usage-only events (see [`Held::strip_usage`]).
    pub fn strips_usage(&self) -> bool {
        self.held.strip_usage && self.mode == Mode::Sse
    }

    /// The response headers. Returns the outcome when they already decide it.
    pub fn on_headers(
        &mut self,
        s: &Settlement,
        status: Option<u32>,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        usage_header: Option<&str>,
        end_of_stream: bool,
    ) -> Option<Outcome> {
        if self.held.release {
            self.mode = Mode::Done;
            return Some((Close::Release, None));
        }
        if !status.is_some_and(|s| (200..300).contains(&s)) {
            self.mode = Mode::Done;
            return Some(match s.on_upstream_error {
                OnUpstreamError::Release => (Close::Release, Some(Unknown::UpstreamError)),
                OnUpstreamError::Hold => (self.at_hold(), Some(Unknown::UpstreamError)),
            });
        }
        if let Some(total) = usage_header.and_then(|h| h.trim().parse::<u64>().ok()) {
            self.mode = Mode::Done;
            return Some((
                Close::Settle(UsageReading {
                    total,
                    tokens: None,
                }),
                None,
            ));
        }
        let encoded = content_encoding
            .map(str::trim)
            .is_some_and(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"));
        let ct = content_type.unwrap_or("").to_ascii_lowercase();
        self.mode = if encoded {
            Mode::Opaque
        } else if ct.starts_with("text/event-stream") {
            Mode::Sse
        } else {
            Mode::Json
        };
        if self.mode == Mode::Sse
            && let Some(policy) = self.held.streaming
        {
            self.slices = Some(crate::stream::Slices::new(
                policy,
                self.held.units,
                self.held.worst,
            ));
        }
        if end_of_stream {
            return Some(self.end(s));
        }
        None
    }

    /// A response body chunk. Returns the outcome at the end of the stream, and the chunk to
    /// hand on instead of this one, if it changed.
    pub fn on_body(
        &mut self,
        s: &Settlement,
        chunk: &[u8],
        end_of_stream: bool,
    ) -> (Option<Outcome>, Option<Vec<u8>>) {
        if let Some(slices) = self.slices.as_mut() {
            if slices.is_cut() {
                // Ended for the client: what the upstream still sends goes nowhere.
                return (None, Some(Vec::new()));
            }
            if let Some(end) = slices.take_cut() {
                // Refused: this chunk becomes the API's error event and the stream's end; the
                // hold settles at what was delivered before it.
                let outcome = (self.mode != Mode::Done).then(|| self.end(s));
                return (outcome, Some(end));
            }
        }
        let pointer = s.usage_pointer.as_deref();
        self.delivered = self
            .delivered
            .saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
        let mut replaced = None;
        match self.mode {
            Mode::Sse => {
                replaced = self.sse.feed(self.held.api, chunk, pointer);
                if end_of_stream && let Some(tail) = self.sse.finish(self.held.api, pointer) {
                    replaced
                        .get_or_insert_with(Vec::new)
                        .extend_from_slice(&tail);
                }
            }
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
        if !end_of_stream || self.mode == Mode::Done || self.mode == Mode::Waiting {
            return (None, replaced);
        }
        (Some(self.end(s)), replaced)
    }

    /// The request is over (the response may not have completed: the client or the upstream
    /// went away). Closes the hold if nothing did yet.
    pub fn on_end(&mut self, s: &Settlement) -> Option<Outcome> {
        if self.mode == Mode::Done {
            return None;
        }
        Some(self.end(s))
    }

    /// Decides the close from what the response showed: its usage whenever some was seen, in
    /// whatever order the ends arrived; else the policy for delivered content without usage;
    /// else a release (nothing was delivered).
    fn end(&mut self, s: &Settlement) -> Outcome {
        let mode = std::mem::replace(&mut self.mode, Mode::Done);
        let pointer = s.usage_pointer.as_deref();
        let partial = mode == Mode::Sse && self.sse.partial();
        let (reading, content, unreadable) = match mode {
            Mode::Sse => (self.sse.reading(), Some(self.sse.content()), None),
            Mode::Json if self.too_large => (None, None, Some(Unknown::TooLarge)),
            Mode::Json => {
                let doc = serde_json::from_slice::<Value>(&self.body).ok();
                let mut seen = Seen::default();
                if let Some(d) = &doc {
                    seen.take(self.held.api, pointer, d);
                }
                self.body = Vec::new();
                (seen.reading(), doc.map(|_| seen.content), None)
            }
            Mode::Opaque => (None, None, Some(Unknown::Encoded)),
            Mode::Waiting | Mode::Done => (None, Some(0), None),
        };
        if let Some(r) = reading {
            if !partial {
                return (Close::Settle(r), None);
            }
            // The input side was reported, the output never was: the client left before the
            // stream's end. The output is what the delivered content amounts to (the missing-
            // usage policy decides, as for a stream without any usage).
            return (self.by_policy(s, content, Some(r)), Some(Unknown::NoUsage));
        }
        let delivered = match (mode, content) {
            (Mode::Sse, Some(c)) => c > 0,
            _ => self.delivered > 0,
        };
        if !delivered {
            return (Close::Release, Some(Unknown::NothingDelivered));
        }
        let why = unreadable.unwrap_or(Unknown::NoUsage);
        (self.by_policy(s, content, None), Some(why))
    }

    /// The close for delivered content whose output was never reported, by
    /// `onMissingUsage`: the estimate counts the output from the `content` bytes delivered,
    /// over the `reported` input when the answer gave it, else over the prompt's estimate.
    fn by_policy(
        &self,
        s: &Settlement,
        content: Option<u64>,
        reported: Option<UsageReading>,
    ) -> Close {
        match (s.on_missing_usage, content) {
            (OnMissingUsage::Release, _) => Close::Release,
            (OnMissingUsage::Estimate, Some(bytes)) => Close::Settle(match reported {
                Some(r) => r.with_output_at_least(s.estimate.tokens(bytes)),
                None => self.estimate(s, bytes),
            }),
            // Nothing to count from (compressed, or too large to keep): charge the hold.
            (OnMissingUsage::Estimate | OnMissingUsage::Hold, _) => self.at_hold(),
        }
    }

    /// The documented estimate: the prompt's tokens from the request body's size, plus the
    /// output's from the content delivered, both at `bytesPerToken`.
    fn estimate(&self, s: &Settlement, content_bytes: u64) -> UsageReading {
        let output = s.estimate.tokens(content_bytes);
        UsageReading {
            total: self.held.prompt.saturating_add(output),
            tokens: Some(pb::Tokens {
                input: self.held.prompt,
                output,
                ..pb::Tokens::default()
            }),
        }
    }

    fn at_hold(&self) -> Close {
        Close::Settle(UsageReading {
            total: self
                .slices
                .as_ref()
                .map_or(self.held.units, |x| x.covered()),
            tokens: None,
        })
    }

    /// How the stream ended, if a slice was refused or unanswered.
    pub fn ending(&self) -> Option<Ending> {
        self.slices.as_ref().and_then(crate::stream::Slices::ending)
    }

    /// The granted slices' holds, to release once the call's first hold settles the whole.
    pub fn take_extensions(&mut self) -> Vec<String> {
        self.slices
            .as_mut()
            .map(crate::stream::Slices::take_extensions)
            .unwrap_or_default()
    }
}

/// The `CloseHolds` item that carries a close, and how a streamed call ended when a slice was
/// refused or unanswered (for its settle record).
pub fn hold_close(hold_id: &str, close: &Close, ending: Option<Ending>) -> pb::HoldClose {
    match close {
        Close::Settle(r) => pb::HoldClose {
            hold_id: hold_id.to_string(),
            actual_usage: Some(r.total),
            tokens: r.tokens,
            stream_end: ending.map(|e| pb::StreamEnd {
                how: if e.cut {
                    pb::stream_end::How::Cut
                } else {
                    pb::stream_end::How::FinishedPast
                } as i32,
                by: e.by,
            }),
        },
        Close::Release => pb::HoldClose {
            hold_id: hold_id.to_string(),
            actual_usage: None,
            tokens: None,
            stream_end: None,
        },
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
    use crate::api::Estimate;
    use crate::config::StreamUsage;

    fn settlement(missing: OnMissingUsage) -> Settlement {
        Settlement {
            enabled: true,
            usage_pointer: None,
            header: None,
            on_missing_usage: missing,
            on_upstream_error: OnUpstreamError::Release,
            stream_usage: StreamUsage::Inject,
            estimate: Estimate::default(),
            timeout: Duration::from_secs(1),
            max_response_bytes: 1024,
            streaming: crate::config::Streaming::default(),
        }
    }

    /// A chat stream's content chunk of `n` tokens of "tok ".
    fn chunk(n: usize) -> Vec<u8> {
        let text = "tok ".repeat(n);
        format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n")
            .into_bytes()
    }

    #[test]
    fn a_sliced_stream_asks_ahead_and_a_refusal_ends_it_with_the_error_then_drops_the_rest() {
        let s = settlement(OnMissingUsage::Estimate);
        let policy = crate::config::Streaming {
            mode: crate::config::StreamMode::Extend,
            first_slice: 64,
            slice: 64,
            ask_ahead: 32,
            on_sidecar_down: crate::config::MidStreamDown::Finish,
        };
        let mut t = Tracker::new(
            "h-0".into(),
            Held {
                streaming: Some(policy),
                worst: 4010,
                units: 74,
                prompt: 10,
                ..held(Api::OpenaiChat)
            },
        );
        assert_eq!(
            t.on_headers(&s, Some(200), Some("text/event-stream"), None, None, false),
            None
        );
        let (out, replaced) = t.on_body(&s, &chunk(20), false);
        assert_eq!((out, replaced), (None, None));
        assert_eq!(t.used(&s), 30);
        assert_eq!(t.next_slice(&s), None, "44 of 74 left: not yet");
        t.on_body(&s, &chunk(20), false);
        assert_eq!(t.next_slice(&s), Some(64), "24 left: ask");
        t.slices_mut().unwrap().asked();
        t.slices_mut().unwrap().granted(Some("h-1".into()), 64);
        t.on_body(&s, &chunk(60), false);
        assert_eq!(t.next_slice(&s), Some(64), "110 used of 138: ask");
        t.slices_mut().unwrap().asked();
        t.slices_mut()
            .unwrap()
            .refused(b"data: {\"error\":{}}\n\n".to_vec(), "team-daily");
        // The next chunk becomes the end; the hold settles at what was delivered (10 + 100).
        let (out, replaced) = t.on_body(&s, &chunk(5), false);
        assert_eq!(replaced.as_deref(), Some(&b"data: {\"error\":{}}\n\n"[..]));
        let (close, why) = out.unwrap();
        assert_eq!(why, Some(Unknown::NoUsage));
        assert!(
            matches!(close, Close::Settle(ref r) if r.total == 110),
            "{close:?}"
        );
        // Whatever the upstream still sends is dropped, and nothing closes twice.
        assert_eq!(t.on_body(&s, &chunk(5), false), (None, Some(Vec::new())));
        assert_eq!(t.on_end(&s), None);
        assert_eq!(t.take_extensions(), vec!["h-1".to_string()]);
        // The settle says it was cut, and by what.
        let item = hold_close("h-0", &close, t.ending());
        let end = item.stream_end.unwrap();
        assert_eq!(
            (end.how(), end.by.as_str()),
            (pb::stream_end::How::Cut, "team-daily")
        );
    }

    fn held(api: Api) -> Held {
        Held {
            streaming: None,
            worst: 0,
            api,
            units: 500,
            prompt: 40,
            strip_usage: false,
            release: false,
        }
    }

    const STREAM: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[{\"delta\":{\"content\":\" there\"}}],\"usage\":null}\n\n\
        data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn sse_usage_and_content_are_found_whatever_the_chunking() {
        let bytes = STREAM.as_bytes();
        for size in [1, 2, 3, 7, 16, 64, bytes.len()] {
            let mut s = SseScanner::default();
            for chunk in bytes.chunks(size) {
                assert_eq!(
                    s.feed(Api::OpenaiChat, chunk, None),
                    None,
                    "passed on as is"
                );
            }
            s.finish(Api::OpenaiChat, None);
            assert_eq!(s.reading().map(|r| r.total), Some(12), "chunk size {size}");
            assert_eq!(s.content(), 8);
            assert!(s.saw_done());
        }
        // CRLF line ends and a last line with no newline.
        let crlf = STREAM.replace('\n', "\r\n");
        let mut s = SseScanner::default();
        s.feed(Api::OpenaiChat, crlf.trim_end().as_bytes(), None);
        s.finish(Api::OpenaiChat, None);
        assert_eq!(s.reading().map(|r| r.total), Some(12));
    }

    #[test]
    fn the_usage_chunk_the_filter_asked_for_is_taken_out_of_the_clients_stream() {
        let bytes = STREAM.as_bytes();
        for size in [1, 5, 33, bytes.len()] {
            let mut s = SseScanner::stripping();
            let mut client = Vec::new();
            for chunk in bytes.chunks(size) {
                client.extend(s.feed(Api::OpenaiChat, chunk, None).unwrap());
            }
            client.extend(s.finish(Api::OpenaiChat, None).unwrap_or_default());
            let client = String::from_utf8(client).unwrap();
            assert!(!client.contains("\"usage\":{"), "{client}");
            assert!(client.contains("\" there\"") && client.ends_with("data: [DONE]\n\n"));
            assert_eq!(s.reading().map(|r| r.total), Some(12), "read all the same");
        }
    }

    #[test]
    fn a_huge_line_is_passed_on_not_buffered() {
        let mut s = SseScanner::stripping();
        let mut out = s.feed(Api::OpenaiChat, b"data: ", None).unwrap();
        for _ in 0..100 {
            out.extend(s.feed(Api::OpenaiChat, &[b'x'; 8192], None).unwrap());
        }
        assert!(s.lines.kept() <= MAX_SSE_LINE);
        out.extend(
            s.feed(
                Api::OpenaiChat,
                b"\ndata: {\"usage\":{\"total_tokens\":3}}\n",
                None,
            )
            .unwrap(),
        );
        assert_eq!(out.len(), 6 + 100 * 8192 + 1 + 35, "every byte passed on");
        assert_eq!(s.reading().map(|r| r.total), Some(3));
    }

    #[test]
    fn usage_seen_settles_however_the_response_ends() {
        let s = settlement(OnMissingUsage::Estimate);
        // The client leaves after [DONE], before the upstream's end: the usage it saw counts.
        let mut t = Tracker::new("h".into(), held(Api::OpenaiChat));
        t.on_headers(&s, Some(200), Some("text/event-stream"), None, None, false);
        let (done, _) = t.on_body(&s, STREAM.as_bytes(), false);
        assert_eq!(done, None);
        let (close, why) = t.on_end(&s).unwrap();
        assert!(
            matches!(close, Close::Settle(r) if r.total == 12),
            "{close:?}"
        );
        assert_eq!(why, None);
        assert_eq!(t.on_end(&s), None, "closed once");
    }

    #[test]
    fn delivered_output_without_usage_is_charged_by_policy_and_nothing_delivered_is_free() {
        let words = "data: {\"choices\":[{\"delta\":{\"content\":\"0123456789abcdef\"}}]}\n\n";
        for (policy, want) in [
            (OnMissingUsage::Estimate, Some(40 + 4)),
            (OnMissingUsage::Hold, Some(500)),
            (OnMissingUsage::Release, None),
        ] {
            let s = settlement(policy);
            let mut t = Tracker::new("h".into(), held(Api::OpenaiChat));
            t.on_headers(&s, Some(200), Some("text/event-stream"), None, None, false);
            t.on_body(&s, words.as_bytes(), false);
            let (close, why) = t.on_end(&s).unwrap();
            match want {
                Some(total) => {
                    assert!(
                        matches!(close, Close::Settle(r) if r.total == total),
                        "{close:?}"
                    )
                }
                None => assert_eq!(close, Close::Release),
            }
            assert_eq!(why, Some(Unknown::NoUsage));
        }
        // The stream ended (upstream finished) without usage: the same.
        let s = settlement(OnMissingUsage::Estimate);
        let mut t = Tracker::new("h".into(), held(Api::OpenaiChat));
        t.on_headers(&s, Some(200), Some("text/event-stream"), None, None, false);
        let (done, _) = t.on_body(&s, words.as_bytes(), true);
        assert!(matches!(done, Some((Close::Settle(r), _)) if r.total == 44));
        // Only a role chunk, then the client left: nothing delivered, nothing charged.
        let mut t = Tracker::new("h".into(), held(Api::OpenaiChat));
        t.on_headers(&s, Some(200), Some("text/event-stream"), None, None, false);
        t.on_body(
            &s,
            b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            false,
        );
        assert_eq!(
            t.on_end(&s),
            Some((Close::Release, Some(Unknown::NothingDelivered)))
        );
    }

    #[test]
    fn anthropic_and_responses_streams_settle_at_their_usage() {
        let s = settlement(OnMissingUsage::Estimate);
        let anthropic = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
            event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n\
            event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n\
            event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let mut t = Tracker::new("h".into(), held(Api::AnthropicMessages));
        t.on_headers(
            &s,
            Some(200),
            Some("text/event-stream; charset=utf-8"),
            None,
            None,
            false,
        );
        let (done, _) = t.on_body(&s, anthropic.as_bytes(), true);
        let Some((Close::Settle(r), None)) = done else {
            panic!("{done:?}")
        };
        assert_eq!(r.total, 40);
        let responses = "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n\
            event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"output_tokens\":3,\"total_tokens\":12}}}\n\n";
        let mut t = Tracker::new("h".into(), held(Api::OpenaiResponses));
        t.on_headers(&s, Some(200), Some("text/event-stream"), None, None, false);
        let (done, _) = t.on_body(&s, responses.as_bytes(), true);
        assert!(
            matches!(done, Some((Close::Settle(r), None)) if r.total == 12),
            "{done:?}"
        );
    }

    #[test]
    fn an_anthropic_stream_left_before_message_delta_is_charged_its_delivered_output() {
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":17,\"cache_read_input_tokens\":3,\"output_tokens\":1}}}\n\n";
        let delta = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"type\":\"text_delta\",\"text\":\"0123456789abcdef\"}}\n\n";
        for (policy, want) in [
            // The input as reported, the output from the 32 bytes delivered (8 tokens).
            (OnMissingUsage::Estimate, Some(17 + 3 + 8)),
            (OnMissingUsage::Hold, Some(500)),
            (OnMissingUsage::Release, None),
        ] {
            let s = settlement(policy);
            let mut t = Tracker::new("h".into(), held(Api::AnthropicMessages));
            t.on_headers(&s, Some(200), Some("text/event-stream"), None, None, false);
            t.on_body(&s, start.as_bytes(), false);
            t.on_body(&s, delta.as_bytes(), false);
            t.on_body(&s, delta.as_bytes(), false);
            let (close, why) = t.on_end(&s).unwrap();
            assert_eq!(why, Some(Unknown::NoUsage), "{policy:?}");
            match want {
                Some(total) => assert!(
                    matches!(close, Close::Settle(r) if r.total == total),
                    "{policy:?}: {close:?}"
                ),
                None => assert_eq!(close, Close::Release),
            }
        }
        // The estimate never lowers an output already reported as larger.
        let r = UsageReading {
            total: 30,
            tokens: Some(pb::Tokens {
                input: 10,
                output: 20,
                ..pb::Tokens::default()
            }),
        };
        assert_eq!(r.with_output_at_least(5), r);
        assert_eq!(r.with_output_at_least(25).total, 35);
    }

    #[test]
    fn json_answers_errors_headers_and_compressed_answers() {
        let s = settlement(OnMissingUsage::Estimate);
        // JSON over two chunks.
        let mut t = Tracker::new("h".into(), held(Api::OpenaiChat));
        assert_eq!(
            t.on_headers(&s, Some(200), Some("application/json"), None, None, false),
            None
        );
        assert_eq!(
            t.on_body(&s, b"{\"usage\":{\"total_tokens\"", false).0,
            None
        );
        let (close, why) = t.on_body(&s, b":9}}", true).0.unwrap();
        assert!(matches!(close, Close::Settle(r) if r.total == 9));
        assert_eq!(why, None);
        assert_eq!(t.on_end(&s), None, "closed once");
        // Upstream error: released by default, or charged at the hold.
        let mut t = Tracker::new("h".into(), held(Api::OpenaiChat));
        assert_eq!(
            t.on_headers(&s, Some(502), None, None, None, false),
            Some((Close::Release, Some(Unknown::UpstreamError)))
        );
        let mut hold = settlement(OnMissingUsage::Estimate);
        hold.on_upstream_error = OnUpstreamError::Hold;
        let mut t = Tracker::new("h".into(), held(Api::OpenaiChat));
        assert!(matches!(
            t.on_headers(&hold, Some(500), None, None, None, false),
            Some((Close::Settle(r), _)) if r.total == 500
        ));
        // A usage header wins.
        let mut t = Tracker::new("h".into(), held(Api::Custom));
        assert!(matches!(
            t.on_headers(&s, Some(200), None, None, Some("41"), false),
            Some((Close::Settle(r), None)) if r.total == 41
        ));
        // A JSON answer without usage: its content is counted.
        let mut t = Tracker::new("h".into(), held(Api::OpenaiChat));
        t.on_headers(&s, Some(200), Some("application/json"), None, None, false);
        let (done, _) = t.on_body(
            &s,
            b"{\"choices\":[{\"message\":{\"content\":\"twelve bytes\"}}]}",
            true,
        );
        assert!(matches!(done, Some((Close::Settle(r), Some(Unknown::NoUsage))) if r.total == 43));
        // Compressed: unreadable, so the hold is charged (nothing to count from).
        let mut t = Tracker::new("h".into(), held(Api::OpenaiChat));
        t.on_headers(
            &s,
            Some(200),
            Some("application/json"),
            Some("gzip"),
            None,
            false,
        );
        let (done, _) = t.on_body(&s, &[0x1f, 0x8b, 8, 0], true);
        assert!(matches!(done, Some((Close::Settle(r), Some(Unknown::Encoded))) if r.total == 500));
        // A body over the kept size: the hold.
        let mut t = Tracker::new("h".into(), held(Api::OpenaiChat));
        t.on_headers(&s, Some(200), Some("application/json"), None, None, false);
        assert!(matches!(
            t.on_body(&s, &[b' '; 2048], true).0,
            Some((Close::Settle(r), Some(Unknown::TooLarge))) if r.total == 500
        ));
        // The close messages.
        let release = hold_close("h", &Close::Release, None);
        assert_eq!(
            (release.hold_id.as_str(), release.actual_usage),
            ("h", None)
        );
        let settle = hold_close(
            "h",
            &Close::Settle(UsageReading {
                total: 5,
                tokens: None,
            }),
            None,
        );
        assert_eq!(settle.actual_usage, Some(5));
        assert_eq!(settle.stream_end, None);
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
    fn the_plain_form_reads_a_pointer() {
        let custom = serde_json::json!({"meta": {"units": 9}});
        assert_eq!(
            reading_from_json(&custom, Some("/meta/units"))
                .unwrap()
                .total,
            9
        );
        let no_total = serde_json::json!({"usage": {"prompt_tokens": 2, "completion_tokens": 3}});
        assert_eq!(reading_from_json(&no_total, None).unwrap().total, 5);
        assert_eq!(
            reading_from_json(&serde_json::json!({"usage": null}), None),
            None
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
}
