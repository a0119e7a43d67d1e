//! The one function library every customer call runs, built from its parts: first the
//! constants it shares with Rust, written here from their Rust definitions (so the two cannot
//! drift apart), then the Lua parts in `lua/`, each headed by the Rust module it mirrors,
//! joined in one order; the last registers the one function calls name (`FCALL`).
//!
//! Trade-offs: one function, not one per part: a call must be one atomic step on the
//! customer's slot, and every part needs the prelude's helpers anyway. A function library,
//! not a plain script (`EVALSHA`): Redis runs a script's whole text on every call, defining
//! its ~50 functions again each time (about 6 µs of Redis's time a call, bench/README.md),
//! while a library is run once when loaded; it needs Redis 7.0 or later. The library and its
//! function are named after a hash of the text, so two versions of the sidecar sharing one
//! Redis (a rolling upgrade) each call their own.

use std::fmt::Write as _;

use sha2::Digest as _;
use std::sync::LazyLock;

use super::scan::INDEX_PERIOD;
use super::wire;
use crate::core::alerts::MAX_DELIVERIES_KEPT;
use crate::core::rollup::{Granularity, Measures, RecordKind};
use crate::core::window::RING;

/// The parts, in the order they are joined: each defines what the later ones call.
const PARTS: [(&str, &str); 12] = [
    ("prelude", include_str!("lua/prelude.lua")),
    ("window", include_str!("lua/window.lua")),
    ("credits", include_str!("lua/credits.lua")),
    ("counter", include_str!("lua/counter.lua")),
    ("rollup", include_str!("lua/rollup.lua")),
    ("ledger", include_str!("lua/ledger.lua")),
    ("locals", include_str!("lua/locals.lua")),
    ("entities", include_str!("lua/entities.lua")),
    ("events", include_str!("lua/events.lua")),
    ("outbox", include_str!("lua/outbox.lua")),
    ("seal", include_str!("lua/seal.lua")),
    ("dispatch", include_str!("lua/dispatch.lua")),
];

/// The script's source: the shared constants, then the parts.
/// The library: its source (`FUNCTION LOAD`) and the name of the function it registers.
pub struct Library {
    pub source: String,
    pub function: String,
}

pub static LIBRARY: LazyLock<Library> = LazyLock::new(|| {
    let mut body = constants();
    for (_, text) in PARTS {
        body.push('\n');
        body.push_str(text);
    }
    let digest = sha2::Sha256::digest(body.as_bytes());
    let hash: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let function = format!("tollgate_{hash}");
    let source = format!("#!lua name={function}\nlocal FUNCTION_NAME = '{function}'\n{body}");
    Library { source, function }
});

fn constants() -> String {
    let grain: Vec<String> = Granularity::ALL
        .iter()
        .map(|g| g.millis().to_string())
        .collect();
    let kind = |k| wire::record_kind_code(k);
    let mut s = String::from(
        "-- Constants shared with Rust, written from their Rust definitions\n\
         -- (decision-server/src/store/redis/script.rs); do not edit them here.\n",
    );
    // Writing to a String cannot fail.
    let _ = writeln!(s, "local RING = {RING}");
    let _ = writeln!(s, "local U32 = {}", u32::MAX);
    let _ = writeln!(
        s,
        "local RATE, QUOTA, CONC, CRED = {}, {}, {}, {}",
        wire::KIND_RATE,
        wire::KIND_QUOTA,
        wire::KIND_CONCURRENCY,
        wire::KIND_CREDITS
    );
    let _ = writeln!(s, "local REC_ARGS = {}", wire::REC_ARGS);
    let _ = writeln!(s, "local GRAIN = {{ {} }}", grain.join(", "));
    let _ = writeln!(
        s,
        "local MEASURES = {}",
        Measures::default().to_array().len()
    );
    let _ = writeln!(
        s,
        "local SETTLED, RELEASED, EXPIRED, INGESTED, DENIED, COMMITTED, ALERT = {}, {}, {}, {}, {}, {}, {}",
        kind(RecordKind::Settled),
        kind(RecordKind::Released),
        kind(RecordKind::Expired),
        kind(RecordKind::Ingested),
        kind(RecordKind::Denied),
        kind(RecordKind::Committed),
        wire::KIND_ALERT
    );
    let _ = writeln!(s, "local INDEX_PERIOD = {INDEX_PERIOD}");
    let _ = writeln!(s, "local DAY = {}", Granularity::Day.millis());
    let _ = writeln!(s, "local MAX_DELIVERIES = {MAX_DELIVERIES_KEPT}");
    let _ = writeln!(s, "local ENTITY_PAGE = {}", wire::ENTITY_PAGE);
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn every_part_is_headed_by_what_it_mirrors_and_no_shared_constant_is_typed_twice() {
        for (name, text) in PARTS.iter().skip(1) {
            let head = text.lines().next().unwrap_or_default();
            assert!(
                head.starts_with(&format!("-- Part `{name}.lua` of the script: ")),
                "{name}.lua: {head}"
            );
        }
        let generated: Vec<String> = constants()
            .lines()
            .filter_map(|l| l.strip_prefix("local "))
            .filter_map(|l| l.split(" = ").next())
            .flat_map(|names| names.split(", ").map(str::to_string).collect::<Vec<_>>())
            .collect();
        assert!(generated.contains(&"MAX_DELIVERIES".to_string()));
        for (name, text) in PARTS {
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("local ")
                    && let Some(names) = rest.split(" = ").next()
                {
                    for n in names.split(", ") {
                        assert!(
                            !generated.iter().any(|g| g == n),
                            "{name}.lua defines `{n}`, which is written from Rust"
                        );
                    }
                }
            }
        }
        let lib = &*LIBRARY;
        assert!(lib.source.starts_with(&format!(
            "#!lua name={}\nlocal FUNCTION_NAME = '{}'\n-- Constants shared with Rust",
            lib.function, lib.function
        )));
        assert!(lib.source.contains("local MAX_DELIVERIES = 1000\n"));
    }
}
