//! The admin changes every replica shares, with a revision, in their own small script.

use std::sync::atomic::AtomicBool;

use redis::{Script, Value};

use super::call::{Call, Code};

use super::RedisStore;
use super::wire::{bad_reply, int};
use crate::store::{AdminChanges, AdminLog, StoreError};

/// KEYS[1] the revision, KEYS[2] the list of entries. `save` replaces the list only if the
/// revision is still ARGV[2], then counts it up: two replicas changing at once cannot drop
/// each other's change.
const ADMIN_LUA: &str = r"
if ARGV[1] == 'save' then
  local rev = tonumber(redis.call('GET', KEYS[1]) or 0)
  if rev ~= tonumber(ARGV[2]) then return {0, rev} end
  redis.call('DEL', KEYS[2])
  for i = 3, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
  return {1, redis.call('INCR', KEYS[1])}
end
return {tonumber(redis.call('GET', KEYS[1]) or 0), redis.call('LRANGE', KEYS[2], 0, -1)}
";

pub fn script() -> Code {
    Code::Script(Script::new(ADMIN_LUA))
}

impl RedisStore {
    /// The shared admin changes' keys: one hash tag, so the save script is atomic on a Cluster
    /// too. The suffixes differ from every customer key's, whatever the customer's id.
    fn admin_invocation(&self, op: &str) -> Call<'_> {
        let mut inv = self.admin_script.call();
        inv.key(format!("{}:{{admin}}:rev", self.settings.prefix))
            .key(format!("{}:{{admin}}:ops", self.settings.prefix))
            .arg(op);
        inv
    }

    async fn admin_call(&self, inv: &Call<'_>) -> Result<Vec<Value>, StoreError> {
        self.link.call(inv, &AtomicBool::new(false)).await
    }
}

#[async_trait::async_trait]
impl AdminLog for RedisStore {
    async fn save(&self, entries: &[Vec<u8>], base: u64) -> Result<u64, StoreError> {
        let mut inv = self.admin_invocation("save");
        inv.arg(base);
        for e in entries {
            inv.arg(e.as_slice());
        }
        let reply = self.admin_call(&inv).await?;
        let revision = reply
            .get(1)
            .and_then(int)
            .ok_or_else(|| bad_reply("admin save"))?;
        let revision = revision.max(0) as u64;
        match reply.first().and_then(int) {
            Some(1) => Ok(revision),
            _ => Err(StoreError::AdminMoved(revision)),
        }
    }

    async fn load(&self) -> Result<AdminChanges, StoreError> {
        let reply = self.admin_call(&self.admin_invocation("load")).await?;
        let revision = reply
            .first()
            .and_then(int)
            .ok_or_else(|| bad_reply("admin load"))?;
        let entries = match reply.get(1) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::BulkString(b) => Ok(b.clone()),
                    _ => Err(bad_reply("an admin change that is not bytes")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            _ => Vec::new(),
        };
        Ok(AdminChanges {
            revision: revision.max(0) as u64,
            entries,
        })
    }

    async fn revision(&self) -> Result<Option<u64>, StoreError> {
        let reply = self.admin_call(&self.admin_invocation("load")).await?;
        Ok(reply.first().and_then(int).map(|r| r.max(0) as u64))
    }
}
