//! Closes of escrow-lease holds posted for the replica that granted them, in their own small
//! script: a hash per customer and replica on the customer's slot (first close per hold
//! wins), and a per-replica index of the customers that have some.

use std::sync::atomic::AtomicBool;

use redis::{Script, Value};

use super::call::{Call, Code};

use super::RedisStore;
use super::wire::bad_reply;
use crate::core::Name;
use crate::store::{HoldRelay, PostedClose, StoreError};

/// `post`: KEYS[1] the customer's relay hash for one replica; ARGV field, close, keep ms.
/// `HSETNX`, so a repeated close changes nothing. `index`: KEYS[1] a replica's index of
/// customers; ARGV the customer, keep ms. `take`: the index's members, removed in the same
/// step (a close posted after it names its customer again). `read`: the hash's fields and
/// values. `forget`: `HDEL` of the fields in ARGV.
const RELAY_LUA: &str = r"
local op = ARGV[1]
if op == 'post' then
  local added = redis.call('HSETNX', KEYS[1], ARGV[2], ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {added}
elseif op == 'index' then
  redis.call('SADD', KEYS[1], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {1}
elseif op == 'take' then
  local members = redis.call('SMEMBERS', KEYS[1])
  redis.call('DEL', KEYS[1])
  return {0, members}
elseif op == 'read' then
  return {0, redis.call('HGETALL', KEYS[1])}
end
for i = 2, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
return {0}
";

pub fn script() -> Code {
    Code::Script(Script::new(RELAY_LUA))
}

/// A hold's field in the relay hash.
fn field(close: &PostedClose) -> String {
    format!("{}:{:032x}", close.seq, close.tag)
}

fn strings(v: Option<&Value>) -> Result<Vec<Vec<u8>>, StoreError> {
    match v {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::BulkString(b) => Ok(b.clone()),
                _ => Err(bad_reply("relay: an item that is not bytes")),
            })
            .collect(),
        _ => Err(bad_reply("relay: a list expected")),
    }
}

impl RedisStore {
    /// A customer's relay hash for `replica`: on the customer's slot.
    fn relay_key(&self, customer: Name, replica: u32) -> String {
        format!("{}:{{{customer}}}:p:{replica}", self.settings.prefix)
    }

    /// A replica's index of customers with posted closes: on a slot of its own.
    fn relay_index(&self, replica: u32) -> String {
        format!("{}:{{relay-{replica}}}:i", self.settings.prefix)
    }

    async fn relay_call(
        &self,
        key: String,
        op: &str,
        args: &[&[u8]],
    ) -> Result<Vec<Value>, StoreError> {
        let mut inv: Call<'_> = self.relay_script.call();
        inv.key(key).arg(op);
        for a in args {
            inv.arg(*a);
        }
        self.link.call(&inv, &AtomicBool::new(false)).await
    }
}

#[async_trait::async_trait]
impl HoldRelay for RedisStore {
    async fn post(
        &self,
        customer: Name,
        replica: u32,
        close: PostedClose,
        keep_ms: i64,
    ) -> Result<bool, StoreError> {
        let value = serde_json::to_vec(&close)
            .map_err(|e| StoreError::Unavailable(format!("relay: cannot encode a close: {e}")))?;
        let keep = keep_ms.max(1).to_string();
        let reply = self
            .relay_call(
                self.relay_key(customer, replica),
                "post",
                &[field(&close).as_bytes(), &value, keep.as_bytes()],
            )
            .await?;
        let added = matches!(reply.first(), Some(Value::Int(1)));
        // After the close, so the granting replica that takes the index before this finds the
        // close itself when it reads the hash, and one that takes it after finds it here.
        self.relay_call(
            self.relay_index(replica),
            "index",
            &[customer.as_str().as_bytes(), keep.as_bytes()],
        )
        .await?;
        Ok(added)
    }

    async fn customers(&self, replica: u32) -> Result<Vec<Name>, StoreError> {
        let reply = self
            .relay_call(self.relay_index(replica), "take", &[])
            .await?;
        Ok(strings(reply.get(1))?
            .into_iter()
            .filter_map(|b| String::from_utf8(b).ok())
            .map(|c| Name::from(c.as_str()))
            .collect())
    }

    async fn posted(&self, customer: Name, replica: u32) -> Result<Vec<PostedClose>, StoreError> {
        let reply = self
            .relay_call(self.relay_key(customer, replica), "read", &[])
            .await?;
        let items = strings(reply.get(1))?;
        Ok(items
            .chunks(2)
            .filter_map(|pair| pair.get(1))
            .filter_map(|v| serde_json::from_slice::<PostedClose>(v).ok())
            .collect())
    }

    async fn forget(
        &self,
        customer: Name,
        replica: u32,
        applied: &[PostedClose],
    ) -> Result<(), StoreError> {
        if applied.is_empty() {
            return Ok(());
        }
        let fields: Vec<String> = applied.iter().map(field).collect();
        let args: Vec<&[u8]> = fields.iter().map(|f| f.as_bytes()).collect();
        self.relay_call(self.relay_key(customer, replica), "forget", &args)
            .await?;
        Ok(())
    }
}
