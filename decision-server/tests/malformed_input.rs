//! Malformed input never panics and never changes a counter: random config text, mutated
//! configs, and random request dimensions.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use common::*;
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use tollgate::CheckRequest;
use tollgate::core::usage::Usage;
use tollgate::store::MemoryStore;

const LIMITS: &str = r#"
limits:
  - { id: user-rate, entityType: user, feature: tokens, kind: rate, limit: 100, window: PT1M }
  - { id: team-day, entityType: team, feature: tokens, kind: quota, limit: 1000, period: P1D }
"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary text is either a valid config or a list of errors that each name the file.
    #[test]
    fn random_text_is_rejected_cleanly(text in "\\PC{0,400}") {
        if let Err(errors) = tollgate::config::parse(&text, "fuzz.yaml") {
            prop_assert!(!errors.0.is_empty());
            for e in &errors.0 {
                prop_assert!(e.to_string().starts_with("fuzz.yaml: "));
            }
        }
    }

    /// A valid config with one line cut out or one character replaced parses or fails cleanly.
    #[test]
    fn mutated_configs_fail_cleanly(cut in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), ch in any::<char>()) {
        let base = tree_with(LIMITS);
        let lines: Vec<&str> = base.lines().collect();
        let i = cut.index(lines.len());
        let without: String = lines.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, l)| format!("{l}\n")).collect();
        let _ = tollgate::config::parse(&without, "cut.yaml");
        let mut chars: Vec<char> = base.chars().collect();
        let k = at.index(chars.len());
        chars[k] = ch;
        let replaced: String = chars.into_iter().collect();
        let _ = tollgate::config::parse(&replaced, "replaced.yaml");
    }

    /// Random dimensions either decide or fail; a failure leaves no counter and no hold behind.
    #[test]
    fn random_dimensions_change_nothing_on_error(
        dims in prop::collection::hash_map("(userId|teamId|model|apiKey|[a-z]{1,8})", "\\PC{0,300}", 0..5),
        customer in "(acme|\\PC{0,20})",
        feature in "(tokens|credits|\\PC{0,10})",
        units in any::<u64>(),
    ) {
        let h = harness(&tree_with(LIMITS), Arc::new(MemoryStore::new()), "2026-03-10T10:00:00Z");
        let dims: HashMap<String, String> = dims;
        let result = h.run(h.engine.check(&CheckRequest {
            deadline: None,
            customer: &customer,
            feature: &feature,
            usage: Usage::units(units),
            dimensions: &dims,
            dry_run: false,
            commit: false,
        }));
        let stats = h.engine.store().stats();
        match result {
            Ok(d) => prop_assert_eq!(stats.holds_open, usize::from(d.hold_id.is_some())),
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                prop_assert_eq!(stats.counters, 0);
                prop_assert_eq!(stats.holds_open, 0);
            }
        }
    }
}
