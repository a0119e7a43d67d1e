//! Interned identifiers: every entity, limit, feature, type and pool id becomes a 4-byte symbol,
//! so counters stay small and a decision copies ids instead of allocating or counting them.

use std::sync::LazyLock;

use lasso::{Spur, ThreadedRodeo};

/// An interned string. Stable for the life of the process, across model reloads.
pub type Sym = Spur;

/// The process-wide table behind every [`Sym`] and [`Name`].
///
/// Trade-off: one global table means a `Name` can turn back into text anywhere without carrying
/// a reference to the table, and is `Copy`. The cost is that interned strings live until the
/// process ends, so code paths fed by untrusted input look up (`get`) rather than intern, and
/// whatever they may intern is bounded (see `max_auto_entities`).
static TABLE: LazyLock<ThreadedRodeo<Spur>> = LazyLock::new(ThreadedRodeo::new);

/// A handle to the process-wide symbol table.
#[derive(Debug, Default, Clone, Copy)]
pub struct Symbols;

impl Symbols {
    pub fn new() -> Self {
        Self
    }

    /// Interns `s`, adding it if unseen.
    pub fn intern(&self, s: &str) -> Sym {
        TABLE.get_or_intern(s)
    }

    /// Looks `s` up without adding it; used on request paths so unknown input allocates nothing.
    pub fn get(&self, s: &str) -> Option<Sym> {
        TABLE.get(s)
    }

    /// The string behind `sym`. Every `Sym` comes from this one table, so the fallback cannot
    /// be reached; it is there so that a bug shows as text rather than a panic.
    pub fn resolve(&self, sym: Sym) -> &'static str {
        TABLE.try_resolve(&sym).unwrap_or("<unknown-symbol>")
    }

    /// Strings interned so far, process-wide.
    pub fn len(&self) -> usize {
        TABLE.len()
    }

    pub fn is_empty(&self) -> bool {
        TABLE.is_empty()
    }
}

/// Serde for a [`Sym`] as its text, so persisted state survives a restart (symbols are numbered
/// per process).
pub mod as_text {
    use super::{Sym, Symbols};

    pub fn serialize<S: serde::Serializer>(sym: &Sym, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(Symbols.resolve(*sym))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Sym, D::Error> {
        let text: std::borrow::Cow<'de, str> = serde::Deserialize::deserialize(d)?;
        Ok(Symbols.intern(&text))
    }
}

/// Serde for an `Option<Sym>` as optional text.
pub mod option_as_text {
    use super::{Sym, Symbols};

    pub fn serialize<S: serde::Serializer>(sym: &Option<Sym>, s: S) -> Result<S::Ok, S::Error> {
        match sym {
            Some(sym) => s.serialize_some(Symbols.resolve(*sym)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Sym>, D::Error> {
        let text: Option<std::borrow::Cow<'de, str>> = serde::Deserialize::deserialize(d)?;
        Ok(text.map(|t| Symbols.intern(&t)))
    }
}

/// An id as a name: a symbol that reads as its string. `Copy`, 4 bytes. Serialized as its
/// text (deserializing interns it: for data the servers wrote, never for a caller's input).
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Name(#[serde(with = "as_text")] Sym);

impl Name {
    pub fn sym(self) -> Sym {
        self.0
    }

    pub fn as_str(&self) -> &'static str {
        Symbols.resolve(self.0)
    }
}

impl From<Sym> for Name {
    fn from(sym: Sym) -> Self {
        Self(sym)
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Self(Symbols.intern(s))
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Self {
        Self::from(s.as_str())
    }
}

impl Default for Name {
    fn default() -> Self {
        Self::from("")
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    /// By text, so sorted names read alphabetically.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}
