//! The AI APIs the filter knows by name (OpenAI chat completions and responses, Anthropic
//! messages): what a request may spend, where a response reports its usage and carries its
//! content, and the API's own error shape for answers the filter writes.

use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_proto::v1 as pb;

/// Usage read from a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageReading {
    pub total: u64,
    /// The token split, when the response gave it (or the estimate made one).
    pub tokens: Option<pb::Tokens>,
}

impl UsageReading {
    /// This reading with its output raised to at least `output` tokens (the total follows).
    pub fn with_output_at_least(mut self, output: u64) -> Self {
        if let Some(t) = self.tokens.as_mut()
            && t.output < output
        {
            self.total = self.total.saturating_add(output - t.output);
            t.output = output;
        }
        self
    }
}

/// An API preset, chosen per filter or per route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Api {
    /// No preset: the `usage` rule and `settlement.usagePointer` say everything.
    #[default]
    Custom,
    /// `POST /v1/chat/completions`.
    OpenaiChat,
    /// `POST /v1/responses`.
    OpenaiResponses,
    /// `POST /v1/messages`.
    AnthropicMessages,
    /// `POST /v1/embeddings`: the input is held, and `usage.prompt_tokens` settles it.
    OpenaiEmbeddings,
    /// The whole OpenAI API: each request's endpoint picks its preset (`endpoint::classify`).
    Openai,
    /// The whole Anthropic API, likewise.
    Anthropic,
}

/// How a preset estimates what a request may spend, and what a response spent when it never
/// says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// The output budget of a request that names none.
    pub default_max_tokens: u64,
    /// Bytes per token when counting tokens from text: 4 is the usual figure for English
    /// (OpenAI's and Anthropic's own rule of thumb); JSON syntax makes a body count high, which
    /// errs on the side of holding enough.
    pub bytes_per_token: u64,
}

impl Default for Estimate {
    fn default() -> Self {
        Self {
            default_max_tokens: 4096,
            bytes_per_token: 4,
        }
    }
}

impl Estimate {
    /// Tokens in `bytes` of text, rounded up.
    pub fn tokens(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.bytes_per_token.max(1))
    }
}

fn number(body: &Value, key: &str) -> Option<u64> {
    body.get(key).and_then(Value::as_u64)
}

/// A budget field that is there but is not a whole number: the request is malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotABudget {
    pub field: &'static str,
    pub value: String,
}

impl Api {
    /// What to hold for a request: the prompt (estimated from the body's size) plus the
    /// output budget times the number of choices.
    pub fn hold(self, body: &Value, body_len: usize, e: &Estimate) -> u64 {
        let prompt = e.tokens(u64::try_from(body_len).unwrap_or(u64::MAX));
        let output = self.output_budget(body).unwrap_or(e.default_max_tokens);
        prompt.saturating_add(output.saturating_mul(self.choices(body)))
    }

    /// The prompt's estimated tokens, from the request body's size.
    pub fn prompt_estimate(self, body_len: usize, e: &Estimate) -> u64 {
        e.tokens(u64::try_from(body_len).unwrap_or(u64::MAX))
    }

    /// Checks that the request's budget fields (`max_tokens`, `n`...) are whole numbers.
    pub fn check_budget(self, body: &Value) -> Result<(), NotABudget> {
        let fields: &[&'static str] = match self {
            Api::Custom | Api::OpenaiEmbeddings => &[],
            Api::OpenaiChat | Api::Openai => &["max_completion_tokens", "max_tokens", "n"],
            Api::OpenaiResponses => &["max_output_tokens"],
            Api::AnthropicMessages | Api::Anthropic => &["max_tokens"],
        };
        for field in fields {
            if let Some(v) = body.get(*field)
                && !v.is_null()
                && v.as_u64().is_none()
            {
                return Err(NotABudget {
                    field,
                    value: v.to_string().chars().take(64).collect(),
                });
            }
        }
        Ok(())
    }

    /// The most output the request allows, if it says.
    pub fn output_budget(self, body: &Value) -> Option<u64> {
        match self {
            Api::OpenaiChat | Api::Openai | Api::Custom => {
                number(body, "max_completion_tokens").or_else(|| number(body, "max_tokens"))
            }
            Api::OpenaiResponses => number(body, "max_output_tokens"),
            Api::AnthropicMessages | Api::Anthropic => number(body, "max_tokens"),
            // An embedding has no output tokens.
            Api::OpenaiEmbeddings => Some(0),
        }
    }

    /// Whether answers come in OpenAI's shapes (usage, errors), as opposed to Anthropic's.
    fn is_openai(self) -> bool {
        matches!(
            self,
            Api::OpenaiChat | Api::OpenaiResponses | Api::OpenaiEmbeddings | Api::Openai
        )
    }

    /// How many answers the request asks for (OpenAI chat's `n`).
    pub fn choices(self, body: &Value) -> u64 {
        match self {
            Api::OpenaiChat | Api::Openai => number(body, "n").unwrap_or(1).max(1),
            _ => 1,
        }
    }

    /// Whether a chat request streams without asking for usage: the filter can add
    /// `stream_options.include_usage` (and take the extra event out of what the client sees).
    pub fn streams_without_usage(self, body: &Value) -> bool {
        self == Api::OpenaiChat
            && body.get("stream").and_then(Value::as_bool) == Some(true)
            && body
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                != Some(true)
    }
}

/// Adds `stream_options.include_usage: true` to a chat request body.
pub fn ask_for_usage(body: &mut Value) {
    if let Some(obj) = body.as_object_mut() {
        let options = obj
            .entry("stream_options")
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
        if let Some(o) = options.as_object_mut() {
            o.insert("include_usage".into(), Value::Bool(true));
        } else {
            *options = json!({"include_usage": true});
        }
    }
}

/// Whether an SSE event is the usage-only chunk OpenAI sends for `include_usage`.
pub fn is_usage_chunk(doc: &Value) -> bool {
    doc.get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty)
        && doc.get("usage").is_some_and(Value::is_object)
}

/// Usage a response reports, taken in event by event (one JSON document, or each SSE event).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UsageAcc {
    input: Option<u64>,
    output: Option<u64>,
    cached: Option<u64>,
    cache_write: Option<u64>,
    reasoning: Option<u64>,
    total: Option<u64>,
    /// The output figure is only what an Anthropic stream's `message_start` said (1 or so,
    /// before anything was generated): not final until a `message_delta` or a whole answer
    /// reports it.
    output_provisional: bool,
}

fn field(u: &Value, pointer: &str) -> Option<u64> {
    u.pointer(pointer).and_then(Value::as_u64)
}

impl UsageAcc {
    /// Takes in whatever usage `doc` carries for `api`. Returns whether it carried any.
    pub fn absorb(&mut self, api: Api, doc: &Value) -> bool {
        match api {
            Api::OpenaiChat | Api::Openai | Api::OpenaiEmbeddings | Api::Custom => {
                let Some(u) = doc.get("usage").filter(|u| u.is_object()) else {
                    return false;
                };
                // `prompt_tokens` counts the cached ones too; input is what was not cached.
                let prompt = field(u, "/prompt_tokens").or_else(|| field(u, "/input_tokens"));
                let cached = field(u, "/prompt_tokens_details/cached_tokens")
                    .or_else(|| field(u, "/input_tokens_details/cached_tokens"));
                *self = Self {
                    input: prompt.map(|p| p.saturating_sub(cached.unwrap_or(0))),
                    output: field(u, "/completion_tokens").or_else(|| field(u, "/output_tokens")),
                    cached,
                    cache_write: None,
                    reasoning: field(u, "/completion_tokens_details/reasoning_tokens"),
                    total: field(u, "/total_tokens"),
                    output_provisional: false,
                };
                true
            }
            Api::OpenaiResponses => {
                let Some(u) = doc
                    .get("usage")
                    .filter(|u| u.is_object())
                    .or_else(|| doc.pointer("/response/usage").filter(|u| u.is_object()))
                else {
                    return false;
                };
                let prompt = field(u, "/input_tokens");
                let cached = field(u, "/input_tokens_details/cached_tokens");
                *self = Self {
                    input: prompt.map(|p| p.saturating_sub(cached.unwrap_or(0))),
                    output: field(u, "/output_tokens"),
                    cached,
                    cache_write: None,
                    reasoning: field(u, "/output_tokens_details/reasoning_tokens"),
                    total: field(u, "/total_tokens"),
                    output_provisional: false,
                };
                true
            }
            Api::AnthropicMessages | Api::Anthropic => {
                // A stream's `message_start` carries the input side, each `message_delta` the
                // output so far; a JSON answer carries all of it. Every field present wins.
                let start = doc.get("type").and_then(Value::as_str) == Some("message_start");
                let u = if start {
                    doc.pointer("/message/usage")
                } else {
                    doc.get("usage")
                };
                let Some(u) = u.filter(|u| u.is_object()) else {
                    return false;
                };
                let take = |slot: &mut Option<u64>, key: &str| {
                    if let Some(v) = field(u, key) {
                        *slot = Some(v);
                    }
                };
                take(&mut self.input, "/input_tokens");
                if field(u, "/output_tokens").is_some() {
                    self.output_provisional = start;
                }
                take(&mut self.output, "/output_tokens");
                take(&mut self.cached, "/cache_read_input_tokens");
                take(&mut self.cache_write, "/cache_creation_input_tokens");
                true
            }
        }
    }

    /// Whether the output figure is still only the stream's opening one (see
    /// `output_provisional`): a stream that ends here was left before its output was counted.
    pub fn output_provisional(&self) -> bool {
        self.output_provisional
    }

    /// The usage as the sidecar takes it, once any was reported.
    pub fn reading(&self) -> Option<UsageReading> {
        if self.input.is_none() && self.output.is_none() && self.total.is_none() {
            return None;
        }
        let tokens = pb::Tokens {
            input: self.input.unwrap_or(0),
            output: self.output.unwrap_or(0),
            cached: self.cached.unwrap_or(0),
            cache_write: self.cache_write.unwrap_or(0),
            reasoning: self.reasoning.unwrap_or(0),
        };
        let sum = tokens
            .input
            .saturating_add(tokens.output)
            .saturating_add(tokens.cached)
            .saturating_add(tokens.cache_write);
        Some(UsageReading {
            total: self.total.unwrap_or(sum).max(sum),
            tokens: Some(tokens),
        })
    }
}

fn text_len(v: Option<&Value>) -> u64 {
    v.and_then(Value::as_str)
        .map_or(0, |s| u64::try_from(s.len()).unwrap_or(u64::MAX))
}

/// Bytes of generated content in a document of `api`: an SSE event, or a whole JSON answer.
/// What the output estimate counts when usage never arrives.
pub fn content_bytes(api: Api, doc: &Value) -> u64 {
    let mut n = 0u64;
    match api {
        // Vectors are not generated text: an embedding without usage is its input alone.
        Api::OpenaiEmbeddings => {}
        Api::OpenaiChat | Api::Openai | Api::Custom => {
            for c in doc
                .get("choices")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for m in [c.get("delta"), c.get("message")].into_iter().flatten() {
                    n += text_len(m.get("content")) + text_len(m.get("refusal"));
                    for t in m
                        .get("tool_calls")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        n += text_len(t.pointer("/function/arguments"));
                    }
                }
            }
        }
        Api::OpenaiResponses => {
            // Stream events `response.*.delta`; a JSON answer's `output[].content[].text`.
            if doc
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with(".delta"))
            {
                n += text_len(doc.get("delta"));
            }
            for o in doc
                .get("output")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                n += text_len(o.get("arguments"));
                for c in o
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    n += text_len(c.get("text"));
                }
            }
        }
        Api::AnthropicMessages | Api::Anthropic => {
            if let Some(d) = doc.get("delta") {
                n += text_len(d.get("text"))
                    + text_len(d.get("partial_json"))
                    + text_len(d.get("thinking"));
            }
            for c in doc
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                n += text_len(c.get("text")) + text_len(c.get("thinking"));
                if let Some(input) = c.get("input") {
                    n += u64::try_from(input.to_string().len()).unwrap_or(0);
                }
            }
        }
    }
    n
}

/// What kind of answer the filter writes, for the API's error type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A limit denied the request (`kind` says which: rate, quota, concurrency, credits).
    Limit(LimitKind),
    /// The request could not be read.
    BadRequest,
    /// The usage check could not be made (the route fails closed).
    Unavailable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Rate,
    Quota,
    Other,
}

impl LimitKind {
    pub fn of(kind: &str) -> Self {
        match kind {
            "rate" | "concurrency" => LimitKind::Rate,
            "quota" | "credits" => LimitKind::Quota,
            _ => LimitKind::Other,
        }
    }
}

/// An error body in the API's own shape, so its SDKs show `message`; `details` (Tollgate's
/// own fields) ride along under `tollgate`. `None` for [`Api::Custom`]: the body stays as
/// Tollgate writes it.
pub fn error_body(api: Api, kind: ErrorKind, message: &str, details: &Value) -> Option<Value> {
    match api {
        Api::Custom => None,
        openai if openai.is_openai() => {
            let (r#type, code) = match kind {
                ErrorKind::Limit(LimitKind::Quota) => {
                    ("insufficient_quota", "usage_limit_exceeded")
                }
                ErrorKind::Limit(_) => ("rate_limit_exceeded", "usage_limit_exceeded"),
                ErrorKind::BadRequest => ("invalid_request_error", "bad_request_input"),
                ErrorKind::Unavailable => ("server_error", "usage_check_unavailable"),
            };
            Some(json!({
                "error": {"message": message, "type": r#type, "code": code, "param": null,
                          "tollgate": details}
            }))
        }
        _ => {
            let r#type = match kind {
                ErrorKind::Limit(_) => "rate_limit_error",
                ErrorKind::BadRequest => "invalid_request_error",
                ErrorKind::Unavailable => "api_error",
            };
            Some(json!({
                "type": "error",
                "error": {"type": r#type, "message": message},
                "tollgate": details,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_cover_the_prompt_and_every_choice() {
        let e = Estimate::default();
        let chat = json!({"model": "m", "max_tokens": 100, "n": 3, "messages": []});
        assert_eq!(Api::OpenaiChat.hold(&chat, 400, &e), 100 + 300);
        let newer = json!({"max_completion_tokens": 50, "max_tokens": 9});
        assert_eq!(Api::OpenaiChat.output_budget(&newer), Some(50));
        assert_eq!(Api::OpenaiChat.hold(&json!({}), 8, &e), 2 + 4096);
        let responses = json!({"max_output_tokens": 70, "n": 5});
        assert_eq!(Api::OpenaiResponses.hold(&responses, 40, &e), 10 + 70);
        let messages = json!({"max_tokens": 1024});
        assert_eq!(
            Api::AnthropicMessages.hold(&messages, 4000, &e),
            1000 + 1024
        );
    }

    #[test]
    fn an_embedding_holds_its_input_and_settles_at_its_prompt_tokens() {
        let e = Estimate::default();
        let body = json!({"model": "text-embedding-3-small", "input": "a b c", "max_tokens": 9});
        assert_eq!(
            Api::OpenaiEmbeddings.hold(&body, 80, &e),
            20,
            "no output budget"
        );
        let mut a = UsageAcc::default();
        assert!(a.absorb(
            Api::OpenaiEmbeddings,
            &json!({"data": [{"embedding": "AAAA"}], "usage": {"prompt_tokens": 3, "total_tokens": 3}})
        ));
        assert_eq!(a.reading().unwrap().total, 3);
        assert_eq!(
            content_bytes(
                Api::OpenaiEmbeddings,
                &json!({"data": [{"embedding": "AAAA"}]})
            ),
            0,
            "vectors are not generated text"
        );
    }

    #[test]
    fn usage_is_asked_for_only_when_a_chat_streams_without_it() {
        let mut b = json!({"stream": true, "messages": []});
        assert!(Api::OpenaiChat.streams_without_usage(&b));
        ask_for_usage(&mut b);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert!(!Api::OpenaiChat.streams_without_usage(&b));
        assert!(!Api::OpenaiChat.streams_without_usage(&json!({"stream": false})));
        assert!(!Api::AnthropicMessages.streams_without_usage(&json!({"stream": true})));
        let mut keep = json!({"stream": true, "stream_options": {"other": 1}});
        ask_for_usage(&mut keep);
        assert_eq!(
            keep["stream_options"],
            json!({"other": 1, "include_usage": true})
        );
    }

    #[test]
    fn each_api_reports_usage_its_own_way() {
        let mut a = UsageAcc::default();
        assert!(a.absorb(
            Api::OpenaiChat,
            &json!({"usage": {"prompt_tokens": 100, "completion_tokens": 30, "total_tokens": 130,
                "prompt_tokens_details": {"cached_tokens": 40},
                "completion_tokens_details": {"reasoning_tokens": 10}}})
        ));
        let r = a.reading().unwrap();
        assert_eq!(r.total, 130);
        let t = r.tokens.unwrap();
        assert_eq!((t.input, t.cached, t.output, t.reasoning), (60, 40, 30, 10));

        let mut a = UsageAcc::default();
        assert!(!a.absorb(
            Api::OpenaiResponses,
            &json!({"type": "response.output_text.delta"})
        ));
        assert!(a.absorb(
            Api::OpenaiResponses,
            &json!({"type": "response.completed", "response": {"usage": {"input_tokens": 20,
                "input_tokens_details": {"cached_tokens": 5}, "output_tokens": 7,
                "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 27}}})
        ));
        let t = a.reading().unwrap().tokens.unwrap();
        assert_eq!((t.input, t.cached, t.output, t.reasoning), (15, 5, 7, 3));

        // Anthropic: input at message_start, output growing in message_delta.
        let mut a = UsageAcc::default();
        a.absorb(
            Api::AnthropicMessages,
            &json!({"type": "message_start", "message": {"usage": {"input_tokens": 12,
                "cache_creation_input_tokens": 100, "cache_read_input_tokens": 50,
                "output_tokens": 1}}}),
        );
        assert_eq!(a.reading().unwrap().total, 163);
        assert!(
            a.output_provisional(),
            "message_start's output is not final"
        );
        a.absorb(
            Api::AnthropicMessages,
            &json!({"type": "message_delta", "usage": {"output_tokens": 40}}),
        );
        let r = a.reading().unwrap();
        assert_eq!(r.total, 12 + 100 + 50 + 40);
        let t = r.tokens.unwrap();
        assert_eq!(
            (t.input, t.cache_write, t.cached, t.output),
            (12, 100, 50, 40)
        );
        assert!(!a.output_provisional());
        assert_eq!(UsageAcc::default().reading(), None);
    }

    #[test]
    fn content_is_counted_where_each_api_puts_it() {
        let chat = json!({"choices": [{"delta": {"content": "hello", "tool_calls": [
            {"function": {"arguments": "{\"a\":1}"}}]}}]});
        assert_eq!(content_bytes(Api::OpenaiChat, &chat), 5 + 7);
        let resp = json!({"type": "response.output_text.delta", "delta": "abc"});
        assert_eq!(content_bytes(Api::OpenaiResponses, &resp), 3);
        let anth =
            json!({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "xyz!"}});
        assert_eq!(content_bytes(Api::AnthropicMessages, &anth), 4);
        let whole = json!({"content": [{"type": "text", "text": "12345678"}]});
        assert_eq!(content_bytes(Api::AnthropicMessages, &whole), 8);
        assert!(is_usage_chunk(
            &json!({"choices": [], "usage": {"total_tokens": 1}})
        ));
        assert!(!is_usage_chunk(&json!({"choices": [{}], "usage": null})));
    }

    #[test]
    fn errors_take_each_apis_shape() {
        let d = json!({"limitId": "team-day"});
        let o = error_body(
            Api::OpenaiChat,
            ErrorKind::Limit(LimitKind::Quota),
            "no",
            &d,
        )
        .unwrap();
        assert_eq!(o["error"]["type"], "insufficient_quota");
        assert_eq!(o["error"]["message"], "no");
        assert_eq!(o["error"]["tollgate"]["limitId"], "team-day");
        let a = error_body(Api::AnthropicMessages, ErrorKind::BadRequest, "bad", &d).unwrap();
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "invalid_request_error");
        assert!(error_body(Api::Custom, ErrorKind::Unavailable, "x", &d).is_none());
    }
}
