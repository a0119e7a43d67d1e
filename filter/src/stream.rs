//! Pay-as-you-stream: a streamed call's output held in slices. The call holds its prompt and a
//! first slice; as the output it delivers nears what is held, the filter asks the sidecar for
//! the next slice (one call per slice, never per chunk), and ends the stream in the API's own
//! error shape when one is refused. Pure: the host module dispatches the calls and rewrites the
//! chunks.

use crate::api::Api;
use crate::config::{MidStreamDown, StreamMode, Streaming};

/// Where a sliced stream stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Slices are asked for as the output grows.
    Open,
    /// No more slices: it runs to its end within its declared budget (`extend-finish` after a
    /// refusal, or an unreachable sidecar under `onSidecarDown: finish`).
    Finishing,
    /// Refused: the next chunk the client gets is this, the end of the stream.
    CutPending(Vec<u8>),
    /// Ended for the client; whatever the upstream still sends is dropped.
    Cut,
}

/// Why the stream stopped asking for slices, for stats and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Refused,
    Unreachable,
}

/// The value a stream's record names when the sidecar could not be asked for a slice (the
/// sidecar's `SIDECAR_UNREACHABLE`).
pub const SIDECAR_UNREACHABLE: &str = "sidecar-unreachable";

/// How a stream ended once a slice was refused or unanswered, for its settle record: cut for
/// the client, or let run on; `by` the limit that refused, or [`SIDECAR_UNREACHABLE`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub cut: bool,
    pub by: String,
}

/// One streamed call's slices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slices {
    policy: Streaming,
    /// Units held in all: the first hold and every granted slice.
    covered: u64,
    /// The most the call may use: its prompt and its declared output budget, what a
    /// non-streamed call holds.
    worst: u64,
    /// A slice has been asked for and not answered.
    asking: bool,
    /// The granted slices' hold ids, released when the call settles (its first hold then
    /// carries the whole usage).
    extensions: Vec<String>,
    state: State,
    stopped: Option<Stopped>,
    /// The limit that refused a slice, when one was refused.
    refused_by: String,
    /// Units covered by the bounded allowance while the sidecar was unreachable
    /// (`onSidecarDown: bounded`), not held by the sidecar.
    on_allowance: u64,
}

impl Slices {
    pub fn new(policy: Streaming, covered: u64, worst: u64) -> Self {
        Self {
            policy,
            covered,
            worst: worst.max(covered),
            asking: false,
            extensions: Vec::new(),
            state: State::Open,
            stopped: None,
            refused_by: String::new(),
            on_allowance: 0,
        }
    }

    /// The units of the next slice to ask for now that `used` units are used: when fewer than
    /// `askAhead` of the held ones are left, none is being asked for, and the declared budget
    /// is not yet held.
    pub fn next_ask(&self, used: u64) -> Option<u64> {
        if self.asking || self.state != State::Open || self.covered >= self.worst {
            return None;
        }
        (used.saturating_add(self.policy.ask_ahead) >= self.covered)
            .then(|| self.policy.slice.min(self.worst - self.covered))
    }

    pub fn asked(&mut self) {
        self.asking = true;
    }

    /// A slice granted: held under `hold_id`, or under none when no limit applies any more
    /// (a reload): covered either way, released only when held.
    pub fn granted(&mut self, hold_id: Option<String>, units: u64) {
        self.asking = false;
        self.covered = self.covered.saturating_add(units);
        self.extensions.extend(hold_id);
    }

    /// A slice refused by limit `by`: under `extend`, the stream ends with `cut` (the API's
    /// error event); under `extend-finish`, it runs on without more slices.
    pub fn refused(&mut self, cut: Vec<u8>, by: &str) {
        self.asking = false;
        self.stopped = Some(Stopped::Refused);
        self.refused_by = by.to_string();
        self.state = match self.policy.mode {
            StreamMode::ExtendFinish => State::Finishing,
            StreamMode::Extend | StreamMode::Off => State::CutPending(cut),
        };
    }

    /// The sidecar could not answer, and (under `onSidecarDown: bounded`) the allowance had
    /// no room for the slice: `onSidecarDown` decides.
    pub fn unreachable(&mut self, cut: Vec<u8>) {
        self.asking = false;
        self.stopped = Some(Stopped::Unreachable);
        self.state = match self.policy.on_sidecar_down {
            MidStreamDown::Finish => State::Finishing,
            MidStreamDown::Cut | MidStreamDown::Bounded => State::CutPending(cut),
        };
    }

    /// The sidecar could not answer and the slice was taken from the customer's bounded
    /// allowance instead: covered, held by nobody; the next slice asks the sidecar again.
    pub fn granted_on_allowance(&mut self, units: u64) {
        self.granted(None, units);
        self.on_allowance = self.on_allowance.saturating_add(units);
    }

    /// Whether an unanswered slice may be taken from the bounded allowance.
    pub fn draws_on_allowance(&self) -> bool {
        self.policy.on_sidecar_down == MidStreamDown::Bounded
    }

    /// The end of the stream for the client, once, when a refusal asked for it.
    pub fn take_cut(&mut self) -> Option<Vec<u8>> {
        match std::mem::replace(&mut self.state, State::Cut) {
            State::CutPending(bytes) => Some(bytes),
            other => {
                self.state = other;
                None
            }
        }
    }

    /// Ended for the client: later chunks are dropped.
    pub fn is_cut(&self) -> bool {
        self.state == State::Cut
    }

    pub fn covered(&self) -> u64 {
        self.covered
    }

    pub fn stopped(&self) -> Option<Stopped> {
        self.stopped
    }

    /// How the stream ended, once a slice was refused or unanswered: what its settle record
    /// says.
    pub fn ending(&self) -> Option<Ending> {
        let by = match self.stopped {
            Some(Stopped::Refused) => self.refused_by.clone(),
            Some(Stopped::Unreachable) => SIDECAR_UNREACHABLE.to_string(),
            // It ran on the bounded allowance for a while: past what the sidecar granted.
            None if self.on_allowance > 0 => SIDECAR_UNREACHABLE.to_string(),
            None => return None,
        };
        let cut = matches!(self.state, State::CutPending(_) | State::Cut);
        Some(Ending { cut, by })
    }

    /// The granted slices' hold ids, handed over once to be released.
    pub fn take_extensions(&mut self) -> Vec<String> {
        std::mem::take(&mut self.extensions)
    }

    pub fn extended(&self) -> usize {
        self.extensions.len()
    }
}

/// The end of a stream refused mid-way, in the API's streaming error shape, from the denial's
/// body already in the API's error shape (`shape_denial`): what the official SDKs raise from.
/// OpenAI chat: a `data:` event whose JSON has `error`, then `[DONE]`. OpenAI Responses: an
/// `error` event (`type`, `code`, `message`, `param`, `sequence_number`, and the `error` object
/// the SDK raises from). Anthropic: `event: error` with `{"type":"error","error":{...}}`.
pub fn cut_event(api: Api, denial_body: &[u8]) -> Vec<u8> {
    let body: serde_json::Value = serde_json::from_slice(denial_body).unwrap_or_else(|_| {
        serde_json::json!({"error": {"message": "Tollgate: the stream's budget is spent",
            "type": "insufficient_quota", "code": "usage_limit_exceeded"}})
    });
    match api {
        Api::AnthropicMessages | Api::Anthropic => {
            format!("event: error\ndata: {body}\n\n").into_bytes()
        }
        Api::OpenaiResponses => {
            let error = &body["error"];
            let event = serde_json::json!({
                "type": "error",
                "code": error["code"],
                "message": error["message"],
                "param": null,
                "sequence_number": 0,
                "error": error,
            });
            format!("event: error\ndata: {event}\n\n").into_bytes()
        }
        _ => format!("data: {body}\n\ndata: [DONE]\n\n").into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: StreamMode) -> Streaming {
        Streaming {
            mode,
            first_slice: 100,
            slice: 200,
            ask_ahead: 50,
            on_sidecar_down: MidStreamDown::Finish,
        }
    }

    #[test]
    fn a_slice_is_asked_ahead_of_need_once_at_a_time_and_never_past_the_declared_budget() {
        let mut s = Slices::new(policy(StreamMode::Extend), 120, 450);
        assert_eq!(s.next_ask(60), None, "70 left of 120: not yet");
        assert_eq!(s.next_ask(70), Some(200), "50 left: ask now");
        s.asked();
        assert_eq!(s.next_ask(119), None, "one at a time");
        s.granted(Some("h-1".into()), 200);
        assert_eq!(s.covered(), 320);
        assert_eq!(s.next_ask(200), None);
        // The last slice is what is left of the declared budget.
        assert_eq!(s.next_ask(280), Some(130));
        s.asked();
        s.granted(Some("h-2".into()), 130);
        assert_eq!(s.next_ask(449), None, "the whole budget is held");
        assert_eq!(s.extended(), 2);
        assert_eq!(
            s.take_extensions(),
            vec!["h-1".to_string(), "h-2".to_string()]
        );
        assert!(s.take_extensions().is_empty(), "handed over once");
    }

    #[test]
    fn a_refusal_cuts_under_extend_and_lets_it_finish_under_extend_finish() {
        let mut cut = Slices::new(policy(StreamMode::Extend), 100, 1000);
        cut.asked();
        cut.refused(b"bye".to_vec(), "team-daily");
        assert_eq!(cut.next_ask(99), None);
        assert!(!cut.is_cut());
        assert_eq!(cut.take_cut(), Some(b"bye".to_vec()));
        assert!(cut.is_cut());
        assert_eq!(cut.take_cut(), None, "the end goes out once");
        assert_eq!(cut.stopped(), Some(Stopped::Refused));
        let ending = |cut: bool, by: &str| {
            Some(Ending {
                cut,
                by: by.to_string(),
            })
        };
        assert_eq!(cut.ending(), ending(true, "team-daily"));

        let mut finish = Slices::new(policy(StreamMode::ExtendFinish), 100, 1000);
        assert_eq!(finish.ending(), None, "nothing refused yet");
        finish.asked();
        finish.refused(b"bye".to_vec(), "org-monthly");
        assert_eq!(finish.take_cut(), None);
        assert!(!finish.is_cut());
        assert_eq!(finish.next_ask(99), None, "no more slices");
        assert_eq!(finish.ending(), ending(false, "org-monthly"));
    }

    #[test]
    fn an_unreachable_sidecar_follows_on_sidecar_down() {
        let mut finish = Slices::new(policy(StreamMode::Extend), 100, 1000);
        finish.asked();
        finish.unreachable(b"bye".to_vec());
        assert_eq!(finish.take_cut(), None);
        assert_eq!(finish.stopped(), Some(Stopped::Unreachable));
        assert_eq!(
            finish.ending().map(|e| (e.cut, e.by)),
            Some((false, SIDECAR_UNREACHABLE.to_string()))
        );
        let mut p = policy(StreamMode::Extend);
        p.on_sidecar_down = MidStreamDown::Cut;
        let mut cut = Slices::new(p, 100, 1000);
        cut.asked();
        cut.unreachable(b"bye".to_vec());
        assert_eq!(
            cut.ending().map(|e| e.cut),
            Some(true),
            "cut before its end went out"
        );
        assert_eq!(cut.take_cut(), Some(b"bye".to_vec()));
        assert_eq!(
            cut.ending().map(|e| (e.cut, e.by)),
            Some((true, SIDECAR_UNREACHABLE.to_string()))
        );
    }

    #[test]
    fn on_the_bounded_allowance_a_stream_goes_on_a_slice_at_a_time_then_is_cut() {
        let mut p = policy(StreamMode::Extend);
        p.on_sidecar_down = MidStreamDown::Bounded;
        let mut s = Slices::new(p, 100, 1000);
        assert!(s.draws_on_allowance());
        s.asked();
        // Unanswered, taken from the allowance: covered, no hold to release, asks again.
        s.granted_on_allowance(64);
        assert_eq!(s.covered(), 164);
        assert!(s.take_extensions().is_empty());
        assert_eq!(
            s.next_ask(140),
            Some(200),
            "the next slice asks the sidecar again"
        );
        assert_eq!(
            s.ending().map(|e| (e.cut, e.by)),
            Some((false, SIDECAR_UNREACHABLE.to_string())),
            "ran past what the sidecar granted"
        );
        // The allowance is spent: cut as a refusal would.
        s.asked();
        s.unreachable(b"bye".to_vec());
        assert_eq!(s.take_cut(), Some(b"bye".to_vec()));
        assert_eq!(
            s.ending().map(|e| (e.cut, e.by)),
            Some((true, SIDECAR_UNREACHABLE.to_string()))
        );
        assert!(!Slices::new(policy(StreamMode::Extend), 1, 2).draws_on_allowance());
    }

    #[test]
    fn the_cut_is_each_apis_streaming_error() {
        let openai = br#"{"error":{"message":"Tollgate: quota limit `team-daily` ...","type":"insufficient_quota","code":"usage_limit_exceeded","tollgate":{"limitId":"team-daily"}}}"#;
        let chat = String::from_utf8(cut_event(Api::OpenaiChat, openai)).unwrap();
        assert!(chat.starts_with("data: {\"error\":"), "{chat}");
        assert!(chat.ends_with("data: [DONE]\n\n"), "{chat}");
        let responses = String::from_utf8(cut_event(Api::OpenaiResponses, openai)).unwrap();
        assert!(responses.starts_with("event: error\ndata: "), "{responses}");
        let data: serde_json::Value =
            serde_json::from_str(responses.trim_start_matches("event: error\ndata: ").trim())
                .unwrap();
        assert_eq!(data["type"], "error");
        assert_eq!(data["code"], "usage_limit_exceeded");
        assert!(data["message"].as_str().unwrap().contains("team-daily"));
        assert_eq!(data["error"]["tollgate"]["limitId"], "team-daily");
        let anthropic = br#"{"type":"error","error":{"type":"rate_limit_error","message":"Tollgate: quota limit `team-daily`"}}"#;
        let messages = String::from_utf8(cut_event(Api::AnthropicMessages, anthropic)).unwrap();
        assert!(
            messages.starts_with("event: error\ndata: {\"error\":"),
            "{messages}"
        );
        assert!(messages.contains("team-daily"), "{messages}");
        assert!(messages.ends_with("\n\n"));
        // An unreadable denial still ends the stream in the API's shape.
        let fallback = String::from_utf8(cut_event(Api::OpenaiChat, b"not json")).unwrap();
        assert!(fallback.contains("usage_limit_exceeded"), "{fallback}");
    }
}
