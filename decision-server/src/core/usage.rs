//! What a call uses: its units and, for model calls, its token breakdown. A leaf of the core:
//! planning prices it, rollups add it up, and neither needs the other for it.

use super::symbols::Name;

/// Token counts of one call, for pricing. `input` excludes the cached and cache-written
/// tokens; `reasoning` is part of `output` (recorded, not priced apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct TokenCounts {
    pub input: u64,
    pub output: u64,
    /// Read from the provider's prompt cache.
    pub cached: u64,
    /// Written to the provider's prompt cache.
    pub cache_write: u64,
    pub reasoning: u64,
}

/// Usage asked for at check time, or reported at settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    /// Units of the checked feature.
    pub units: u64,
    /// The token breakdown, when known; it prices credits precisely.
    pub tokens: Option<TokenCounts>,
}

/// How a streamed call held in slices ended when the gateway stepped in: recorded on its
/// settle record as the attribute [`StreamEnd::attribute`] names, so that history and the live
/// view tell a cut call from one that ran to its end. The value is the limit that refused the
/// next slice, or [`SIDECAR_UNREACHABLE`] (a bounded set: the customer's limit ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum StreamEnd {
    /// Ended for the client before the model's end.
    Cut(Name),
    /// Refused (or not answered) but let run to its declared output budget.
    FinishedPast(Name),
}

/// A [`StreamEnd`]'s value when the sidecar could not be asked for the next slice.
pub const SIDECAR_UNREACHABLE: &str = "sidecar-unreachable";
/// The record attribute of a cut stream.
pub const CUT_BY: &str = "cutBy";
/// The record attribute of a stream that ran past a refusal.
pub const FINISHED_PAST: &str = "finishedPast";

impl StreamEnd {
    /// The record attribute and its value.
    pub fn attribute(self) -> (&'static str, Name) {
        match self {
            StreamEnd::Cut(by) => (CUT_BY, by),
            StreamEnd::FinishedPast(by) => (FINISHED_PAST, by),
        }
    }
}

impl Usage {
    pub fn units(units: u64) -> Self {
        Self {
            units,
            tokens: None,
        }
    }

    /// This usage cut down so that its largest figure is at most `max`: units to `max`,
    /// and every token figure scaled by the same ratio (rounded down), so the split between
    /// input, output and cache keeps its shape.
    pub fn capped_at(&self, max: u64) -> Self {
        let mut out = *self;
        out.units = out.units.min(max);
        if let Some(t) = out.tokens.as_mut() {
            let sum = u128::from(t.input)
                + u128::from(t.output)
                + u128::from(t.cached)
                + u128::from(t.cache_write);
            if sum > u128::from(max) {
                let scale =
                    |v: u64| u64::try_from(u128::from(v) * u128::from(max) / sum).unwrap_or(max);
                t.input = scale(t.input);
                t.output = scale(t.output);
                t.cached = scale(t.cached);
                t.cache_write = scale(t.cache_write);
                t.reasoning = t.reasoning.min(t.output);
            }
        }
        out
    }

    /// The largest figure this usage reports: its units, or its tokens added up. A settlement
    /// is bounded by this, so neither figure can carry an absurd amount past the bound.
    pub fn largest_figure(&self) -> u64 {
        let tokens = self.tokens.map_or(0, |t| {
            t.input
                .saturating_add(t.output)
                .saturating_add(t.cached)
                .saturating_add(t.cache_write)
        });
        self.units.max(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::plan::MAX_EXACT;

    #[test]
    fn a_capped_usage_keeps_its_shape_and_never_passes_the_cap() {
        let u = Usage {
            units: 10_000,
            tokens: Some(TokenCounts {
                input: 6_000,
                output: 3_000,
                cached: 1_000,
                cache_write: 0,
                reasoning: 2_500,
            }),
        };
        let c = u.capped_at(1_000);
        assert_eq!(c.units, 1_000);
        let t = c.tokens.unwrap_or_default();
        assert_eq!((t.input, t.output, t.cached), (600, 300, 100));
        assert_eq!(t.reasoning, 300, "never more reasoning than output");
        assert!(c.largest_figure() <= 1_000);
        assert_eq!(u.capped_at(20_000), u, "under the cap: unchanged");
        let huge = Usage {
            units: 1,
            tokens: Some(TokenCounts {
                input: u64::MAX,
                output: u64::MAX,
                ..TokenCounts::default()
            }),
        };
        assert!(huge.capped_at(MAX_EXACT).largest_figure() <= MAX_EXACT);
    }
}
