//! Which endpoint of a whole API a request calls, for the `openai` and `anthropic` presets:
//! whether it is metered (and by which preset), free, a gate for work billed later, the
//! results of such work, or unknown. Pure: the method and the path in, the answer out.

use crate::api::Api;

/// What the filter does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Held and settled by this preset.
    Metered(Api),
    /// Costs no tokens at the provider (listing models, counting tokens, moderation, file
    /// storage calls): passed without a sidecar call.
    Free,
    /// Creates work the provider bills later (a batch): checked for one unit, so a customer
    /// with nothing left is refused, and released when the answer comes. `Api` gives the
    /// error shape.
    Gate(Api),
    /// A batch's results: not checked (the work is done and billed); the usage in each line
    /// is reported once per batch, when the results were read to their end.
    BatchResults(BatchKind, String),
    /// None of these: the route's `unknownEndpoints` policy.
    Unknown,
}

/// Where a batch's results come from, and so how their lines read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// `GET /v1/files/{id}/content`: lines of `{"response": {"body": <chat answer>}}`. Any
    /// file's content is read this way; a file with no such lines reports nothing.
    OpenaiFile,
    /// `GET /v1/messages/batches/{id}/results`: lines of `{"result": {"message": ...}}`.
    AnthropicResults,
}

impl BatchKind {
    /// The preset whose usage shape each line's answer has.
    pub fn api(self) -> Api {
        match self {
            Self::OpenaiFile => Api::OpenaiChat,
            Self::AnthropicResults => Api::AnthropicMessages,
        }
    }
}

/// The endpoint of a request to a route whose preset is `api`. A preset of one endpoint
/// (`openai-chat`...) meters every request as that endpoint, as before; the whole-API presets
/// look at the method and the path. The path is matched on its tail, after any prefix a
/// provider or a route puts before `/v1` (`/openai/v1/...`), without the query.
pub fn classify(api: Api, method: &str, path: &str) -> Endpoint {
    if !matches!(api, Api::Openai | Api::Anthropic) {
        return Endpoint::Metered(api);
    }
    let path = path.split(['?', '#']).next().unwrap_or("");
    let Some(start) = path.find("/v1/") else {
        return Endpoint::Unknown;
    };
    let parts: Vec<&str> = path[start..]
        .trim_end_matches('/')
        .split('/')
        .skip(2)
        .collect();
    let post = method.eq_ignore_ascii_case("POST");
    let get = method.eq_ignore_ascii_case("GET");
    match api {
        Api::Openai => match parts.as_slice() {
            ["chat", "completions"] if post => Endpoint::Metered(Api::OpenaiChat),
            ["responses"] if post => Endpoint::Metered(Api::OpenaiResponses),
            // Stored answers and conversations: read, listed, updated, deleted; counting a
            // prompt's tokens. No generation.
            ["chat", "completions"] if get => Endpoint::Free,
            ["chat", "completions", _] | ["chat", "completions", _, "messages"] => Endpoint::Free,
            ["responses", "input_tokens"] if post => Endpoint::Free,
            ["responses", _] | ["responses", _, "input_items"] => Endpoint::Free,
            ["responses", _, "cancel"] if post => Endpoint::Free,
            ["conversations", ..] => Endpoint::Free,
            ["embeddings"] if post => Endpoint::Metered(Api::OpenaiEmbeddings),
            // Moderation is free at OpenAI.
            ["moderations"] if post => Endpoint::Free,
            ["models"] | ["models", _] if get => Endpoint::Free,
            // A batch's output file is its results.
            ["files", id, "content"] if get => {
                Endpoint::BatchResults(BatchKind::OpenaiFile, (*id).to_string())
            }
            // Uploads (multipart), listings and deletions: storage, not tokens.
            ["files"] | ["files", _] => Endpoint::Free,
            ["batches"] if post => Endpoint::Gate(Api::OpenaiChat),
            ["batches"] | ["batches", _] | ["batches", _, "cancel"] => Endpoint::Free,
            _ => Endpoint::Unknown,
        },
        Api::Anthropic => match parts.as_slice() {
            ["messages"] if post => Endpoint::Metered(Api::AnthropicMessages),
            // Counting tokens is free at Anthropic.
            ["messages", "count_tokens"] if post => Endpoint::Free,
            ["messages", "batches"] if post => Endpoint::Gate(Api::AnthropicMessages),
            ["messages", "batches", id, "results"] if get => {
                Endpoint::BatchResults(BatchKind::AnthropicResults, (*id).to_string())
            }
            ["messages", "batches"] | ["messages", "batches", _] => Endpoint::Free,
            ["messages", "batches", _, "cancel"] if post => Endpoint::Free,
            ["models"] | ["models", _] if get => Endpoint::Free,
            ["files"] | ["files", _] | ["files", _, "content"] => Endpoint::Free,
            _ => Endpoint::Unknown,
        },
        one => Endpoint::Metered(one),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_api_presets_tell_endpoints_apart() {
        let o = |m, p| classify(Api::Openai, m, p);
        assert_eq!(
            o("POST", "/v1/chat/completions"),
            Endpoint::Metered(Api::OpenaiChat)
        );
        assert_eq!(
            o("POST", "/openai/v1/responses?x=1"),
            Endpoint::Metered(Api::OpenaiResponses)
        );
        assert_eq!(
            o("POST", "/v1/embeddings"),
            Endpoint::Metered(Api::OpenaiEmbeddings)
        );
        assert_eq!(o("POST", "/v1/moderations"), Endpoint::Free);
        assert_eq!(o("GET", "/v1/models"), Endpoint::Free);
        assert_eq!(o("GET", "/v1/models/gpt-4o"), Endpoint::Free);
        assert_eq!(o("POST", "/v1/files"), Endpoint::Free);
        assert_eq!(o("DELETE", "/v1/files/file-1"), Endpoint::Free);
        assert_eq!(
            o("GET", "/v1/files/file-9/content"),
            Endpoint::BatchResults(BatchKind::OpenaiFile, "file-9".into())
        );
        assert_eq!(o("POST", "/v1/batches"), Endpoint::Gate(Api::OpenaiChat));
        assert_eq!(o("GET", "/v1/batches/b1"), Endpoint::Free);
        assert_eq!(o("POST", "/v1/batches/b1/cancel"), Endpoint::Free);
        assert_eq!(o("GET", "/v1/responses/resp_1"), Endpoint::Free);
        assert_eq!(o("GET", "/v1/responses/resp_1/input_items"), Endpoint::Free);
        assert_eq!(o("DELETE", "/v1/responses/resp_1"), Endpoint::Free);
        assert_eq!(o("POST", "/v1/responses/input_tokens"), Endpoint::Free);
        assert_eq!(o("GET", "/v1/chat/completions"), Endpoint::Free);
        assert_eq!(o("GET", "/v1/chat/completions/c1/messages"), Endpoint::Free);
        assert_eq!(o("POST", "/v1/conversations/c1/items"), Endpoint::Free);
        assert_eq!(o("POST", "/v1/images/generations"), Endpoint::Unknown);
        assert_eq!(o("POST", "/v1/audio/speech"), Endpoint::Unknown);
        assert_eq!(o("POST", "/v2/chat/completions"), Endpoint::Unknown);

        let a = |m, p| classify(Api::Anthropic, m, p);
        assert_eq!(
            a("POST", "/v1/messages"),
            Endpoint::Metered(Api::AnthropicMessages)
        );
        assert_eq!(a("POST", "/v1/messages/count_tokens"), Endpoint::Free);
        assert_eq!(
            a("POST", "/v1/messages/batches"),
            Endpoint::Gate(Api::AnthropicMessages)
        );
        assert_eq!(
            a("GET", "/v1/messages/batches/mb_1/results"),
            Endpoint::BatchResults(BatchKind::AnthropicResults, "mb_1".into())
        );
        assert_eq!(a("GET", "/v1/messages/batches/mb_1"), Endpoint::Free);
        assert_eq!(a("GET", "/v1/models"), Endpoint::Free);
        assert_eq!(a("POST", "/v1/complete"), Endpoint::Unknown);
    }

    #[test]
    fn a_preset_of_one_endpoint_meters_every_request_as_it() {
        assert_eq!(
            classify(Api::OpenaiChat, "GET", "/v1/models"),
            Endpoint::Metered(Api::OpenaiChat)
        );
        assert_eq!(
            classify(Api::Custom, "POST", "/anything"),
            Endpoint::Metered(Api::Custom)
        );
    }
}
