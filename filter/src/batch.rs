//! A batch's results as they stream by (JSON lines): the usage of every answer in them, added
//! up per model, and the usage records that report it once per batch and model.

use std::collections::BTreeMap;

use serde_json::Value;
use tollgate_proto::v1 as pb;

use crate::api::UsageAcc;
use crate::bounded::Pass;
use crate::endpoint::BatchKind;
use crate::lines::{Lines, Piece};

/// Idempotency keys of batch usage start with this: `batch:<batch or file id>:<model>:<n>`,
/// so results read twice, or through another Envoy, count once.
pub const PREFIX: &str = "batch:";

/// The most units one record carries: a model's answers are cut into records of at most this
/// (whole answers each, in the order the results list them, so every read cuts them alike),
/// well under what the sidecar takes in one ingested event (what one call can use, by
/// default 2,000,000).
pub const CHUNK: u64 = 1_000_000;

/// Usage added up over answers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sum {
    pub total: u64,
    pub tokens: pb::Tokens,
    pub answers: u64,
}

/// Reads a batch's results chunk by chunk, keeping only the unfinished line between chunks.
#[derive(Debug)]
pub struct BatchScan {
    kind: BatchKind,
    id: String,
    lines: Lines,
    max_line: usize,
    /// Per model, its answers cut into records of at most [`CHUNK`] units.
    by_model: BTreeMap<String, Vec<Sum>>,
    /// Lines too long to read, so their usage is not counted.
    pub skipped: u64,
    /// A line too long to read is passing by (its end not seen yet).
    passing_long_line: bool,
}

impl BatchScan {
    pub fn new(kind: BatchKind, id: String, max_line: usize) -> Self {
        Self {
            kind,
            id,
            lines: Lines::default(),
            max_line,
            by_model: BTreeMap::new(),
            skipped: 0,
            passing_long_line: false,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        // Out of `self` while it hands lines to `self.line`.
        let mut lines = std::mem::take(&mut self.lines);
        lines.feed(chunk, self.max_line, |piece| match piece {
            Piece::Line(line) => self.line(line),
            Piece::Skipped(bytes) => {
                // A line too long to read: counted once, when it starts to pass by.
                if !self.passing_long_line {
                    self.skipped += 1;
                }
                self.passing_long_line = !bytes.ends_with(b"\n");
            }
        });
        self.lines = lines;
    }

    /// The end of the results: the last line, if it had no newline.
    pub fn finish(&mut self) {
        if let Some(l) = self.lines.finish() {
            self.line(&l);
        }
    }

    fn line(&mut self, line: &[u8]) {
        let Ok(doc) = serde_json::from_slice::<Value>(line.trim_ascii()) else {
            return;
        };
        let answer = match self.kind {
            BatchKind::OpenaiFile => doc.pointer("/response/body").filter(|_| {
                doc.pointer("/response/status_code").and_then(Value::as_u64) == Some(200)
            }),
            BatchKind::AnthropicResults => doc.pointer("/result/message").filter(|_| {
                doc.pointer("/result/type").and_then(Value::as_str) == Some("succeeded")
            }),
        };
        let Some(answer) = answer else {
            return;
        };
        let mut acc = UsageAcc::default();
        acc.absorb(self.kind.api(), answer);
        let Some(r) = acc.reading() else {
            return;
        };
        let model = answer
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("")
            .chars()
            .take(128)
            .collect::<String>();
        let chunks = self.by_model.entry(model).or_default();
        if chunks
            .last()
            .is_none_or(|c| c.answers > 0 && c.total.saturating_add(r.total) > CHUNK)
        {
            chunks.push(Sum::default());
        }
        let Some(sum) = chunks.last_mut() else {
            return;
        };
        sum.total = sum.total.saturating_add(r.total);
        sum.answers += 1;
        if let Some(t) = r.tokens {
            let s = &mut sum.tokens;
            s.input = s.input.saturating_add(t.input);
            s.output = s.output.saturating_add(t.output);
            s.cached = s.cached.saturating_add(t.cached);
            s.cache_write = s.cache_write.saturating_add(t.cache_write);
            s.reasoning = s.reasoning.saturating_add(t.reasoning);
        }
    }

    /// The usage seen of `model`, all its records together.
    pub fn total(&self, model: &str) -> Sum {
        let mut out = Sum::default();
        for c in self.by_model.get(model).into_iter().flatten() {
            out.total += c.total;
            out.answers += c.answers;
            out.tokens.input += c.tokens.input;
            out.tokens.output += c.tokens.output;
            out.tokens.cached += c.tokens.cached;
            out.tokens.cache_write += c.tokens.cache_write;
            out.tokens.reasoning += c.tokens.reasoning;
        }
        out
    }

    /// The usage records for `pass`: per model (its `model` dimension set to the answers'),
    /// one per [`CHUNK`].
    pub fn records(&self, pass: &Pass) -> Vec<pb::UsageRecord> {
        self.by_model
            .iter()
            .flat_map(|(model, chunks)| chunks.iter().enumerate().map(move |(i, s)| (model, i, s)))
            .filter(|(_, _, s)| s.total > 0)
            .map(|(model, i, s)| {
                let mut dimensions: std::collections::HashMap<String, String> =
                    pass.dimensions.iter().cloned().collect();
                if !model.is_empty() {
                    dimensions.insert("model".into(), model.clone());
                }
                pb::UsageRecord {
                    idempotency_key: format!("{PREFIX}{}:{model}:{i}", self.id)
                        .chars()
                        .take(256)
                        .collect(),
                    customer_id: pass.customer.clone(),
                    feature_id: pass.feature.clone(),
                    usage: s.total,
                    dimensions,
                    tokens: Some(s.tokens),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass() -> Pass {
        Pass {
            customer: "acme".into(),
            feature: "ai-tokens".into(),
            dimensions: vec![
                ("teamId".into(), "ops".into()),
                ("model".into(), "x".into()),
            ],
        }
    }

    #[test]
    fn an_openai_output_file_is_added_up_per_model_across_chunks() {
        let line = |model: &str, p: u64, c: u64| {
            format!(
                "{{\"id\":\"r\",\"custom_id\":\"c\",\"response\":{{\"status_code\":200,\"body\":{{\"model\":\"{model}\",\"usage\":{{\"prompt_tokens\":{p},\"completion_tokens\":{c},\"total_tokens\":{}}}}}}},\"error\":null}}\n",
                p + c
            )
        };
        let failed = "{\"id\":\"r\",\"response\":{\"status_code\":500,\"body\":{\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":9,\"total_tokens\":18}}}}\n";
        let text = format!(
            "{}{}{failed}not json\n{}",
            line("m1", 10, 5),
            line("m2", 3, 1),
            line("m1", 10, 5).trim_end()
        );
        let mut s = BatchScan::new(BatchKind::OpenaiFile, "file-out".into(), 1 << 20);
        // Split anywhere, even inside a line.
        for chunk in text.as_bytes().chunks(7) {
            s.feed(chunk);
        }
        s.finish();
        assert_eq!(s.total("m1").total, 30);
        assert_eq!(s.total("m1").answers, 2);
        assert_eq!(s.total("m2").tokens.output, 1);
        let r = s.records(&pass());
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].idempotency_key, "batch:file-out:m1:0");
        assert_eq!(r[0].usage, 30);
        assert_eq!(r[0].dimensions["model"], "m1");
        assert_eq!(r[0].dimensions["teamId"], "ops");
    }

    #[test]
    fn a_large_batch_is_cut_into_records_of_whole_answers() {
        let line = format!(
            "{{\"response\":{{\"status_code\":200,\"body\":{{\"model\":\"m\",\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":0,\"total_tokens\":{}}}}}}}}}\n",
            CHUNK / 2 + 1,
            CHUNK / 2 + 1
        );
        let mut s = BatchScan::new(BatchKind::OpenaiFile, "f".into(), 1 << 20);
        s.feed(line.repeat(5).as_bytes());
        let r = s.records(&pass());
        assert_eq!(r.len(), 5, "two answers never fit one record");
        assert!(r.iter().all(|x| x.usage <= CHUNK));
        assert_eq!(r[4].idempotency_key, "batch:f:m:4");
        assert_eq!(s.total("m").total, 5 * (CHUNK / 2 + 1));
    }

    #[test]
    fn anthropic_results_count_succeeded_messages_only_and_long_lines_are_skipped() {
        let ok = "{\"custom_id\":\"a\",\"result\":{\"type\":\"succeeded\",\"message\":{\"model\":\"claude\",\"usage\":{\"input_tokens\":7,\"output_tokens\":3,\"cache_read_input_tokens\":2}}}}\n";
        let errored = "{\"custom_id\":\"b\",\"result\":{\"type\":\"errored\",\"error\":{}}}\n";
        let long = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(100));
        let mut s = BatchScan::new(BatchKind::AnthropicResults, "mb".into(), 64);
        s.feed(format!("{ok}{errored}{long}{ok}").as_bytes());
        s.finish();
        assert_eq!(s.total("claude").total, 24);
        assert_eq!(s.total("claude").tokens.cached, 4);
        assert_eq!(s.skipped, 0, "a long line within one chunk is read whole");
        let mut s = BatchScan::new(BatchKind::AnthropicResults, "mb".into(), 64);
        for chunk in long.as_bytes().chunks(16) {
            s.feed(chunk);
        }
        s.feed(ok.as_bytes());
        assert_eq!(s.skipped, 1);
        assert_eq!(s.total("claude").total, 12);
    }
}
