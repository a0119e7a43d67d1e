-- Part `outbox.lua` of the script: mirrors decision-server/src/core/alerts.rs (`AlertBook`: `claim`, `rearm`, `enqueue`, `lease`, `finish`, `deliveries`; the webhook outbox).

-- ARGV: 'alert', now, key, until (ms, '' for "until re-armed"), body, the deliveries (see
-- `enqueue_at`), then the record settings. Claims alert threshold `key` (the hash `al`: key -> until, -1 for none) unless
-- it is claimed and the claim still holds, and appends {ALERT, now, body} to the stream.
-- Result: 1 claimed, 0 claimed already.
-- Webhook deliveries: the hash `ob` (id -> the delivery as the caller encoded it), the
-- outbox `oq` (id by when its next attempt is due) and the log `ol` (id by creation), kept
-- to MAX_DELIVERIES; the oldest leave the log first.

-- Enqueues the deliveries at ARGV[p..]: a count, then (id, created, due, encoded) each.
local function enqueue_at(p)
  local n = tonumber(ARGV[p])
  for i = 0, n - 1 do
    local q = p + 1 + i * 4
    local id = ARGV[q]
    redis.call('HSET', BASE .. 'ob', id, ARGV[q + 3])
    redis.call('ZADD', BASE .. 'ol', tonumber(ARGV[q + 1]), id)
    redis.call('ZADD', BASE .. 'oq', tonumber(ARGV[q + 2]), id)
  end
  -- Past the most, the oldest finished deliveries leave first (as `AlertBook::enqueue`).
  local over = redis.call('ZCARD', BASE .. 'ol') - MAX_DELIVERIES
  if over > 0 then
    for _, id in ipairs(redis.call('ZRANGE', BASE .. 'ol', 0, -1)) do
      if over == 0 then break end
      if not redis.call('ZSCORE', BASE .. 'oq', id) then
        redis.call('HDEL', BASE .. 'ob', id)
        redis.call('ZREM', BASE .. 'ol', id)
        over = over - 1
      end
    end
  end
end

local function alert()
  local key, till, body = ARGV[3], ARGV[4], ARGV[5]
  local claims = BASE .. 'al'
  local held = redis.call('HGET', claims, key)
  if held then
    local u = tonumber(held)
    if u < 0 or u > now then return reply(0) end
  end
  redis.call('HSET', claims, key, till == '' and -1 or tonumber(till))
  enqueue_at(6)
  local b = #ARGV - REC_ARGS
  append(cmsgpack.pack({ ALERT, now, body }), tonumber(ARGV[b + 7]), tonumber(ARGV[b + 6]))
  return reply(1)
end

-- ARGV: 'rearm', now, key. Result: 1 a claim was dropped, 0 there was none.
local function rearm()
  return reply(redis.call('HDEL', BASE .. 'al', ARGV[3]))
end

-- ARGV: 'enqueue', now, the deliveries. Result: 0.
local function enqueue()
  enqueue_at(3)
  return reply(0)
end

-- ARGV: 'lease', now, lease ms, most, lessee. Result: 0, then the encoded deliveries (each
-- followed by the lease's end, its next due time now), first those `lessee` leased and has
-- not finished (a lease whose answer it never heard: one replica's passes for a customer run
-- one at a time, so none of them is being sent), then those due. `oo` names each unfinished
-- lease's lessee (a lease that ran out and was taken by another lessee is that one's now);
-- `om:<lessee>` lists a lessee's, checked against `oo`, and expires with its last lease.
local function lease()
  local until_ms, most, lessee = now + tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
  local mine = BASE .. 'om:' .. lessee
  local owner = BASE .. 'oo'
  local out = {}
  local ids = {}
  local members = redis.call('SMEMBERS', mine)
  table.sort(members)
  for _, id in ipairs(members) do
    if #ids < most and redis.call('HGET', owner, id) == lessee
      and redis.call('ZSCORE', BASE .. 'oq', id) then
      ids[#ids + 1] = id
    else
      redis.call('SREM', mine, id)
    end
  end
  local taken = {}
  for _, id in ipairs(ids) do taken[id] = true end
  if #ids < most then
    -- `most`, not `most - #ids`: the lessee's own ids, due again once their lease ran out,
    -- are among those returned and skipped, and must not take the places of others.
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', BASE .. 'oq', '-inf', now, 'LIMIT', 0, most)) do
      if #ids >= most then break end
      if not taken[id] then ids[#ids + 1] = id end
    end
  end
  for _, id in ipairs(ids) do
    redis.call('ZADD', BASE .. 'oq', until_ms, id)
    redis.call('SADD', mine, id)
    redis.call('HSET', owner, id, lessee)
    local d = redis.call('HGET', BASE .. 'ob', id)
    if d then
      out[#out + 1] = d
      out[#out + 1] = until_ms
    end
  end
  if #ids > 0 then redis.call('PEXPIRE', mine, tonumber(ARGV[3])) end
  return reply(0, out)
end

-- ARGV: 'finish', now, id, due ('' when finished), encoded, lessee. Stores the delivery if it
-- is still in the log, and ends the lessee's lease of it. Result: 0.
local function finish()
  local id, due, encoded = ARGV[3], ARGV[4], ARGV[5]
  redis.call('SREM', BASE .. 'om:' .. ARGV[6], id)
  redis.call('HDEL', BASE .. 'oo', id)
  if redis.call('HEXISTS', BASE .. 'ob', id) == 0 then return reply(0) end
  redis.call('HSET', BASE .. 'ob', id, encoded)
  if due == '' then
    redis.call('ZREM', BASE .. 'oq', id)
  else
    redis.call('ZADD', BASE .. 'oq', tonumber(due), id)
  end
  return reply(0)
end

-- ARGV: 'deliveries', now, most. Result: 0, then the encoded deliveries, newest first, each
-- followed by when it is next due (the queue's score, which a lease moves) or false when done.
local function deliveries()
  local ids = redis.call('ZREVRANGE', BASE .. 'ol', 0, tonumber(ARGV[3]) - 1)
  local out = {}
  for _, id in ipairs(ids) do
    local d = redis.call('HGET', BASE .. 'ob', id)
    if d then
      out[#out + 1] = d
      out[#out + 1] = redis.call('ZSCORE', BASE .. 'oq', id) or false
    end
  end
  return reply(0, out)
end
