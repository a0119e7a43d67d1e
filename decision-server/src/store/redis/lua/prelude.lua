-- Tollgate's Redis counter store: every call on one customer's counters, atomic on its hash
-- slot. This prelude (the keys, the call's settings, loading and saving packed states) and the
-- other parts in this folder are joined into one function library by store/redis/script.rs,
-- after the constants it shares with Rust, written from their Rust definitions. Each part names
-- the Rust module it mirrors: a change there is made here too, and the shared store test
-- suite runs both.
--
-- KEYS[1] the customer's meta hash (`seq`: next hold number, `n`: counters), KEYS[2] its open
-- holds (hash: tag -> hold), KEYS[3] their expiry (zset: tag by expiry), KEYS[4] its ingest
-- idempotency keys (zset: key by time), KEYS[5] its entities created on the fly (hash: id ->
-- {type, parent}), KEYS[6] the tags of cancelled decisions (zset: tag by when it is
-- forgotten), KEYS[7..] the entity hashes (field -> counter state) the call names. Holds are
-- keyed by their tag, the random part of the hold id, so that a decision whose answer was lost
-- can be cancelled by the tag its caller drew. Every key carries the `{customerId}` hash tag, so a hold's entity keys,
-- read back at settlement or expiry, are on the same slot as the declared ones.
--
-- ARGV[1] is the operation, ARGV[2] now (ms since the epoch). Every reply starts with
-- {result, holds open (-1: unchanged by this call), counters (-1: none added by this call),
-- earliest hold expiry (-1: not looked up; false: no hold), holds version (-1: unchanged)}.
-- Looking the expiry up costs a call, so only the sweep does; the caller keeps a lower bound
-- from the holds it placed. The holds version counts the calls that opened or closed a hold,
-- in the order Redis ran them, so a caller whose replies arrive out of order keeps the
-- newest count.
--
-- Counter states are msgpack arrays tagged by kind:
--   {1, head, c0..c7}                rolling window ring (slot = bucket mod 8)
--   {2, period index, used}          calendar quota
--   {3, in flight}                   concurrency
--   {4, debt, order, grants}         credit pool; order: positions (0-based) in spending
--                                    order; grants: {id, priority, expires|false, category,
--                                    amount, remaining} in the order they were added
-- A hold is {expires, parts, tag, max settle, seq}: tag is the hold id's random part (32 hex
-- digits), max settle the most usage a settlement may report, seq its number; a part is
-- {entity key, field, mark, held, rule, p_in, p_out, p_cached, p_cache_write}; marks are {1, bucket},
-- {2, period index}, {3}, {4, draws (pos, amount, ...)}; rules are 0 units, 1 one per request,
-- 2 priced (by the snapshot's per-million prices).
--
-- Usage records (core/rollup.rs): the calls that may make one (reserve, close, record,
-- expire, cancel) end with the record settings, REC_ARGS values: enabled (1/0), the minute,
-- hour and day retention (ms), the most values of one dimension, the stream's retention (ms)
-- and most events. A record adds its measures {units, input, output, cached, cache write,
-- reasoning, credits, requests, denied} to its series' field of the minute, hour and day
-- bucket hashes (`r<1|2|3>:<start>`, expiring with their retention) and appends an event to
-- the customer's stream (`s`), in the same call that changed the counters. A series is
-- msgpack {feature, name, value, ...} with the names in byte order; dimension values past
-- the customer's most fold into `__other__` (the distinct values kept in the hash `d`). A
-- hold keeps its series and held measures (h[6], h[7]) for its settle, release or expiry.

-- A call's state. The library's functions are defined once, when Redis loads it, and read
-- these as upvalues; `begin` sets them at the start of every call (Redis runs one call at a
-- time). Trade-off: as a plain script (`EVALSHA`) the ~50 functions were defined again on
-- every call, about 6 µs of Redis's time each; a function library (`FCALL`) needs Redis 7.
local KEYS, ARGV
local META, HOLDS, EXPIRY, SEEN, AUTO, CANCELLED
local op, now

-- The customer's key prefix (`<prefix>:{<customer>}:`): the record keys derive from it.
local BASE

-- The record settings at the end of ARGV, on the calls that carry them; false when off.
local REC

-- States read or written by this call, so a counter named twice is one state.
local cache

local function load(key, field)
  local id = key .. '\0' .. field
  local entry = cache[id]
  if entry == nil then
    local raw = redis.call('HGET', key, field)
    entry = { raw = raw, st = raw and cmsgpack.unpack(raw) or false }
    cache[id] = entry
  end
  return entry
end

-- The customer's counter count once this call added one; -1 while it has not.
local counters
-- Whether this call opened or closed a hold.
local holds_changed

-- Starts a call: its keys and arguments, and a fresh state.
local function begin(keys, args)
  KEYS, ARGV = keys, args
  META, HOLDS, EXPIRY, SEEN, AUTO, CANCELLED = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
  op = ARGV[1]
  now = tonumber(ARGV[2])
  BASE = string.sub(META, 1, #META - 1)
  REC = false
  if op == 'reserve' or op == 'close' or op == 'record' or op == 'expire' or op == 'cancel'
    or op == 'alert' or op == 'locals' or op == 'renew' then
    local b = #ARGV - REC_ARGS
    if ARGV[b + 1] == '1' then
      REC = {
        ret = { tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]) },
        max_values = tonumber(ARGV[b + 5]),
        stream_ms = tonumber(ARGV[b + 6]),
        stream_max = tonumber(ARGV[b + 7]),
      }
    end
  end
  cache = {}
  counters = -1
  holds_changed = false
end

-- Writes a loaded state back; later readers in this call see the new bytes.
local function save(key, field, entry)
  entry.raw = cmsgpack.pack(entry.st)
  if redis.call('HSET', key, field, entry.raw) == 1 then
    counters = redis.call('HINCRBY', META, 'n', 1)
  end
end
