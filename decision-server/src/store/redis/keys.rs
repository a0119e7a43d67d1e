//! The key layout: every key of a customer carries its `{customerId}` hash tag, so one script
//! call touches one slot of one node (`lua/prelude.lua` header, KEYS). Keys are
//! `<prefix>:{<customer>}:<suffix>`: a meta hash (next hold number, counter count), the open
//! holds (hash, by tag) and their expiry (zset), the ingest keys (zset), the entities created
//! on the fly (hash: id → type and parent; its length is the cap's count), the cancelled tags
//! (zset), and one hash per entity with a field per limit, whose value is the counter state
//! packed with msgpack. Keys a hold names are read back at settlement and expiry without being
//! declared, which Redis allows because they are on the slot of the declared keys.

use crate::core::Sym;
use crate::core::counter::CounterKey;
use crate::core::symbols::Symbols;

/// The fixed keys of a customer, in the order the script reads them (`lua/prelude.lua`: `META,
/// HOLDS, EXPIRY, SEEN, AUTO, CANCELLED`); entity hashes follow from `KEYS[7]`.
const FIXED: [&str; 6] = ["m", "h", "x", "k", "a", "c"];

/// The keys of one customer: the fixed ones first, then entity hashes as added.
#[derive(Debug)]
pub struct CallKeys {
    base: String,
    pub keys: Vec<String>,
}

impl CallKeys {
    pub fn new(prefix: &str, customer: &str) -> Self {
        let base = format!("{prefix}:{{{customer}}}:");
        let keys = FIXED.iter().map(|s| format!("{base}{s}")).collect();
        Self { base, keys }
    }

    /// The open holds' hash (`HOLDS`, `KEYS[2]`).
    pub fn holds(prefix: &str, customer: &str) -> String {
        format!("{prefix}:{{{customer}}}:h")
    }

    /// The 1-based index of entity `entity`'s hash among the keys, adding it if new.
    pub fn entity(&mut self, entity: Sym) -> usize {
        let key = format!("{}e:{}", self.base, Symbols.resolve(entity));
        match self.keys.iter().position(|k| *k == key) {
            Some(i) => i + 1,
            None => {
                self.keys.push(key);
                self.keys.len()
            }
        }
    }
}

/// A counter's field in its entity hash: the limit, and the pool for isolated credit pools.
pub fn field(key: CounterKey) -> String {
    let limit = Symbols.resolve(key.limit);
    match key.partition {
        None => limit.to_string(),
        // The unit separator cannot appear in a config id.
        Some(p) => format!("{limit}\u{1f}{}", Symbols.resolve(p)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_customer_share_its_hash_tag() {
        let mut keys = CallKeys::new("tg", "acme");
        let e = keys.entity(Symbols.intern("team-1"));
        assert_eq!(keys.entity(Symbols.intern("team-1")), e, "added once");
        for k in &keys.keys {
            assert!(k.starts_with("tg:{acme}:"), "{k}");
        }
        assert_eq!(keys.keys.len(), FIXED.len() + 1);
        assert_eq!(keys.keys[1], CallKeys::holds("tg", "acme"));
    }
}
