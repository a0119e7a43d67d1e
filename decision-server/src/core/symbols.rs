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

/// A shared, immutable name (an entity, limit, feature or type id). Cloning it is a reference
/// count, not an allocation, which keeps building a decision's chain cheap.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Name(std::sync::Arc<str>);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Self {
        Self(s.as_str().into())
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}
