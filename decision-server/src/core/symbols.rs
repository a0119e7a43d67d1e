//! Interned identifiers: entity, limit and pool ids become 4-byte symbols so counters stay small.

use lasso::{Spur, ThreadedRodeo};

/// An interned string. Stable for the life of the process, across model reloads.
pub type Sym = Spur;

/// The process-wide interner. Only grows; callers bound what untrusted input may add to it.
#[derive(Debug, Default)]
pub struct Symbols {
    rodeo: ThreadedRodeo<Spur>,
}

impl Symbols {
    pub fn new() -> Self {
        Self::default()
    }

    /// Interns `s`, adding it if unseen.
    pub fn intern(&self, s: &str) -> Sym {
        self.rodeo.get_or_intern(s)
    }

    /// Looks `s` up without adding it; used on request paths so unknown input allocates nothing.
    pub fn get(&self, s: &str) -> Option<Sym> {
        self.rodeo.get(s)
    }

    /// The string behind `sym`. Symbols only come from this interner, so the fallback is for
    /// a symbol from another interner, which is a bug, reported in the text rather than a panic.
    pub fn resolve(&self, sym: Sym) -> &str {
        self.rodeo.try_resolve(&sym).unwrap_or("<unknown-symbol>")
    }

    pub fn len(&self) -> usize {
        self.rodeo.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rodeo.is_empty()
    }
}
