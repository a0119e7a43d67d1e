//! Lines of a body that arrives in chunks (SSE events, JSON lines): each complete line handed
//! on once, only the unfinished last one kept between chunks, and a line longer than a cap
//! passed by, never buffered.

/// What [`Lines::feed`] hands on.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A whole line, without its newline.
    Line(&'a [u8]),
    /// Bytes of a line over the cap, as they pass (its newline included, when it comes).
    Skipped(&'a [u8]),
}

/// The unfinished line between chunks.
#[derive(Debug, Default)]
pub struct Lines {
    partial: Vec<u8>,
    /// The unfinished line grew past the cap and is being passed by to its end.
    skipping: bool,
}

impl Lines {
    /// Takes in `chunk`, handing each complete line (or the bytes of an over-long one) to `on`.
    pub fn feed(&mut self, chunk: &[u8], max: usize, mut on: impl FnMut(Piece<'_>)) {
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(i + 1);
            rest = tail;
            let head_line = &head[..i];
            if self.skipping {
                self.skipping = false;
                on(Piece::Skipped(head));
            } else if self.partial.is_empty() {
                on(Piece::Line(head_line));
            } else {
                let mut l = std::mem::take(&mut self.partial);
                l.extend_from_slice(head_line);
                on(Piece::Line(&l));
            }
        }
        if self.skipping {
            if !rest.is_empty() {
                on(Piece::Skipped(rest));
            }
            return;
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > max {
            let passed = std::mem::take(&mut self.partial);
            on(Piece::Skipped(&passed));
            self.skipping = true;
        }
    }

    /// The unfinished last line at the end of the body, if any (not one being passed by).
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        if self.skipping || self.partial.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut self.partial))
    }

    /// Bytes kept now.
    pub fn kept(&self) -> usize {
        self.partial.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(chunks: &[&[u8]], max: usize) -> (Vec<String>, Option<Vec<u8>>) {
        let mut l = Lines::default();
        let mut out = Vec::new();
        for c in chunks {
            l.feed(c, max, |p| {
                out.push(match p {
                    Piece::Line(b) => format!("L:{}", String::from_utf8_lossy(b)),
                    Piece::Skipped(b) => format!("S:{}", String::from_utf8_lossy(b)),
                });
            });
        }
        (out, l.finish())
    }

    #[test]
    fn lines_cross_chunks_and_long_ones_pass_by() {
        let (out, tail) = pieces(&[b"ab", b"c\nde\nf"], 100);
        assert_eq!(out, ["L:abc", "L:de"]);
        assert_eq!(tail.as_deref(), Some(&b"f"[..]));
        let (out, tail) = pieces(&[b"0123456789", b"0123", b"45\nok\n"], 8);
        assert_eq!(out, ["S:0123456789", "S:0123", "S:45\n", "L:ok"]);
        assert_eq!(tail, None);
    }
}
