-- Tollgate's Redis counter store: every call on one customer's counters, atomic on its hash
-- slot. It mirrors decision-server/src/core/{window,counter,credits,ledger}.rs: a change there
-- is made here too, and the shared store test suite runs both.
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

local META, HOLDS, EXPIRY, SEEN, AUTO, CANCELLED = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local op = ARGV[1]
local now = tonumber(ARGV[2])

local RING = 8
local U32 = 4294967295
local RATE, QUOTA, CONC, CRED = 1, 2, 3, 4

-- The customer's key prefix (`<prefix>:{<customer>}:`): the record keys derive from it.
local BASE = string.sub(META, 1, #META - 1)

-- The record settings at the end of ARGV, on the calls that carry them; false when off.
local REC_ARGS = 7
local REC = false
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

-- States read or written by this call, so a counter named twice is one state.
local cache = {}

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
local counters = -1
-- Whether this call opened or closed a hold.
local holds_changed = false

-- Writes a loaded state back; later readers in this call see the new bytes.
local function save(key, field, entry)
  entry.raw = cmsgpack.pack(entry.st)
  if redis.call('HSET', key, field, entry.raw) == 1 then
    counters = redis.call('HINCRBY', META, 'n', 1)
  end
end

-- Rolling window (core/window.rs) --------------------------------------------------------

local function count_of(st, b)
  local head = st[2]
  if b > head or b <= head - RING then return 0 end
  return st[3 + (b % RING)]
end

local function window_used(st, bucket)
  local current = math.max(bucket, st[2])
  local used = 0
  for b = current - RING + 1, current do used = used + count_of(st, b) end
  return used
end

local function roll(st, bucket)
  local current = math.max(bucket, st[2])
  if current - st[2] >= RING then
    for i = 3, 2 + RING do st[i] = 0 end
  else
    for b = st[2] + 1, current do st[3 + (b % RING)] = 0 end
  end
  st[2] = current
  return current
end

-- Credit pools (core/credits.rs) ----------------------------------------------------------

local function usable(g)
  return g[6] > 0 and (g[3] == false or now < g[3])
end

local function available(st)
  local total = 0
  for _, g in ipairs(st[4]) do
    if usable(g) then total = total + g[6] end
  end
  return math.max(0, total - st[2])
end

local function draw_forced(st, amount)
  local left = amount
  local draws = {}
  for _, pos in ipairs(st[3]) do
    if left == 0 then break end
    local g = st[4][pos + 1]
    if g and usable(g) then
      local take = math.min(g[6], left)
      g[6] = g[6] - take
      left = left - take
      draws[#draws + 1] = pos
      draws[#draws + 1] = take
    end
  end
  st[2] = st[2] + left
  return draws
end

local function refund(st, draws, amount)
  local drawn = 0
  for i = 2, #draws, 2 do drawn = drawn + draws[i] end
  st[2] = math.max(0, st[2] - math.max(0, amount - drawn))
  local left = amount
  for i = #draws - 1, 1, -2 do
    if left == 0 then break end
    local give = math.min(draws[i + 1], left)
    local g = st[4][draws[i] + 1]
    if g then g[6] = math.min(g[6] + give, g[5]) end
    left = left - give
  end
end

-- Byte order, as Rust compares strings (Lua's `<` follows the server's locale).
local function bytes_less(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- Spending order: priority, soonest expiry (none last), promotional first, then id.
local function grant_less(a, b)
  if a[2] ~= b[2] then return a[2] < b[2] end
  local ea = a[3] or math.huge
  local eb = b[3] or math.huge
  if ea ~= eb then return ea < eb end
  if a[4] ~= b[4] then return a[4] < b[4] end
  return bytes_less(a[1], b[1])
end

local function add_grant(st, grant)
  for _, g in ipairs(st[4]) do
    if g[1] == grant[1] then return 0 end
  end
  local paid = math.min(st[2], grant[6])
  grant[6] = grant[6] - paid
  st[2] = st[2] - paid
  local pos = #st[4]
  local at = #st[3] + 1
  for i, p in ipairs(st[3]) do
    if grant_less(grant, st[4][p + 1]) then
      at = i
      break
    end
  end
  table.insert(st[3], at, pos)
  st[4][pos + 1] = grant
  return 1
end

-- One counter (core/counter.rs) -----------------------------------------------------------

-- A planned counter from ARGV[i..i+11]: entity key index, field, kind, limit, bucket or
-- period index, enforcing, amount, rule, and the rule's four prices.
local GROUP = 12
local function planned(i)
  return {
    key = KEYS[tonumber(ARGV[i])], field = ARGV[i + 1], kind = tonumber(ARGV[i + 2]),
    limit = tonumber(ARGV[i + 3]), at = tonumber(ARGV[i + 4]),
    enforce = ARGV[i + 5] == '1', amount = tonumber(ARGV[i + 6]), rule = tonumber(ARGV[i + 7]),
    p_in = tonumber(ARGV[i + 8]), p_out = tonumber(ARGV[i + 9]), p_cached = tonumber(ARGV[i + 10]),
    p_cache_write = tonumber(ARGV[i + 11]),
  }
end

local function fits(c, st)
  if c.kind == RATE then
    local used = (st and st[1] == RATE) and window_used(st, c.at) or 0
    return used + c.amount <= c.limit
  elseif c.kind == QUOTA then
    local used = (st and st[1] == QUOTA and st[2] >= c.at) and st[3] or 0
    return used + c.amount <= c.limit
  elseif c.kind == CONC then
    local used = (st and st[1] == CONC) and st[2] or 0
    return used + 1 <= c.limit
  elseif st and st[1] == CRED then
    return available(st) >= c.amount
  end
  return c.amount <= 0
end

local function fresh(c)
  if c.kind == RATE then return { RATE, c.at, 0, 0, 0, 0, 0, 0, 0, 0 }
  elseif c.kind == QUOTA then return { QUOTA, c.at, 0 }
  elseif c.kind == CONC then return { CONC, 0 }
  end
  return false
end

local function hold(c, st)
  if c.kind == RATE and st[1] == RATE then
    local bucket = roll(st, c.at)
    local i = 3 + (bucket % RING)
    st[i] = math.min(st[i] + c.amount, U32)
    return { RATE, bucket }
  elseif c.kind == QUOTA and st[1] == QUOTA then
    -- Only a later period starts afresh: a replica whose clock is behind counts in the
    -- period in force (core/counter.rs `hold`).
    if st[2] < c.at then
      st[2] = c.at
      st[3] = 0
    end
    st[3] = st[3] + c.amount
    return { QUOTA, st[2] }
  elseif c.kind == CONC and st[1] == CONC then
    st[2] = math.min(st[2] + 1, U32)
    return { CONC }
  elseif c.kind == CRED and st[1] == CRED then
    return { CRED, draw_forced(st, c.amount) }
  end
  return false
end

local function settle(st, mark, held, actual)
  local delta = actual - held
  if st[1] == RATE and mark[1] == RATE then
    local b = mark[2]
    if not (b > st[2] or b <= st[2] - RING) then
      local i = 3 + (b % RING)
      st[i] = math.min(math.max(0, st[i] + delta), U32)
    end
  elseif st[1] == QUOTA and mark[1] == QUOTA then
    if st[2] == mark[2] then st[3] = math.max(0, st[3] + delta) end
  elseif st[1] == CONC and mark[1] == CONC then
    st[2] = math.max(0, st[2] - 1)
  elseif st[1] == CRED and mark[1] == CRED then
    if actual < held then
      refund(st, mark[2], held - actual)
    elseif actual > held then
      draw_forced(st, actual - held)
    end
  end
end

local function expire(st, mark)
  if st[1] == CONC and mark[1] == CONC then st[2] = math.max(0, st[2] - 1) end
end

-- Usage records (core/rollup.rs) ---------------------------------------------------------

local GRAIN = { 60000, 3600000, 86400000 }

-- Appends a packed event to the customer's stream, trimmed to `most` events and `keep_ms`.
local function trim_stream(keep_ms)
  -- Stream ids carry Redis's clock, so the retention is measured on it.
  local t = redis.call('TIME')
  local server_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('XTRIM', BASE .. 's', 'MINID', '~', server_ms - keep_ms)
end

local function append(event, most, keep_ms)
  redis.call('XADD', BASE .. 's', 'MAXLEN', '~', most, '*', 'e', event)
  trim_stream(keep_ms)
end
local MEASURES = 9
local SETTLED, RELEASED, EXPIRED, INGESTED, DENIED, ALERT = 1, 2, 3, 4, 5, 6

-- Series index (store/redis/scan.rs): for each 30-day period, a set per attribute
-- (`x<period start>:<name>\0<value>`) of the series that recorded in a day of it, added when
-- a series first appears in a day bucket; `xs` is the first day from which the index is
-- complete (the day this script first indexed, or the next if that day had records already).
-- A filtered usage read asks these sets which series to read, not every bucket field.
local INDEX_PERIOD = 2592000000
local DAY = 86400000
local function index(series, day)
  local period = day - (day % INDEX_PERIOD)
  local keep = period + INDEX_PERIOD + REC.ret[3] - now
  if keep <= 0 then return end
  local s = cmsgpack.unpack(series)
  for i = 2, #s - 1, 2 do
    local k = BASE .. 'x' .. period .. ':' .. s[i] .. '\0' .. s[i + 1]
    -- Already a member: the set is there with its expiry (the period's, fixed).
    if redis.call('SADD', k, series) == 1 then redis.call('PEXPIRE', k, keep) end
  end
end

-- Adds measures to fields of bucket hash `key` (size `gi`, starting at `start`), kept
-- `keep_ms` from now: `by` maps each series to what it adds. One read and one write per
-- 1,000 series (`unpack` takes a few thousand values at most), one expiry. The bucket's seals (`:z` rows, `:za` per-attribute sums, `:zt` totals, `:zp` a reader's claim;
-- store/redis/scan.rs) are deleted: a seal that exists is the bucket as it stands.
local function bucket_add(key, by, keep_ms, gi, start)
  local names = {}
  for series in pairs(by) do names[#names + 1] = series end
  local fresh = nil
  local indexed = false
  for first = 1, #names, 1000 do
    local last = math.min(first + 999, #names)
    local raw = redis.call('HMGET', key, unpack(names, first, last))
    local set = {}
    for i = first, last do
      local series = names[i]
      local r = raw[i - first + 1]
      if not r and gi == 3 then
        if fresh == nil then fresh = redis.call('EXISTS', key) == 0 end
        index(series, start)
        indexed = true
      end
      local cur = r and cmsgpack.unpack(r) or { 0, 0, 0, 0, 0, 0, 0, 0, 0 }
      local add = by[series]
      for j = 1, MEASURES do cur[j] = cur[j] + add[j] end
      set[#set + 1] = series
      set[#set + 1] = cmsgpack.pack(cur)
    end
    redis.call('HSET', key, unpack(set))
  end
  redis.call('PEXPIRE', key, keep_ms)
  if indexed then
    redis.call('SET', BASE .. 'xs', fresh and start or start + DAY, 'NX')
  end
  -- A reader seals only buckets that ended SEAL_GRACE before its own now, so a bucket that
  -- has not ended by this call's clock has no seal while the replicas' clocks agree within
  -- that: a call recording now (nearly every call) deletes nothing.
  if start + GRAIN[gi] <= now then
    redis.call('DEL', key .. ':z', key .. ':za', key .. ':zt', key .. ':zp')
  end
end

-- Adds measures `m` to `series` in the buckets holding now, and appends the event: kind,
-- time, series, measures, and the reference (hold number and tag, an idempotency key, or the
-- denying level).
local function attribute(kind, series, m, a, b)
  for gi, g in ipairs(GRAIN) do
    local start = now - (now % g)
    local keep_until = start + g + REC.ret[gi]
    if keep_until > now then
      -- Relative to this call's clock, not Redis's: the replicas' clock is the one counters
      -- and retention follow.
      bucket_add(BASE .. 'r' .. gi .. ':' .. start, { [series] = m }, keep_until - now, gi, start)
    end
  end
  append(cmsgpack.pack({ kind, now, series, m, a or false, b or false }), REC.stream_max, REC.stream_ms)
end

-- A dimension value as recorded: itself while the customer has fewer than its most distinct
-- values of that dimension (or has seen it), `__other__` past that.
local function fold(dim, v)
  local seen = BASE .. 'd'
  local f = dim .. '\0' .. v
  if redis.call('HEXISTS', seen, f) == 1 then return v end
  if tonumber(redis.call('HGET', seen, dim) or 0) >= REC.max_values then
    redis.call('HINCRBY', seen, '\0folded', 1)
    return '__other__'
  end
  redis.call('HSET', seen, f, 1)
  redis.call('HINCRBY', seen, dim, 1)
  return v
end

-- The series draft at ARGV[p..]: feature, attribute count, then (name, value, foldable 1/0)
-- with the names in byte order. Returns the draft and the index after it.
local function draft_at(p)
  local d = { feature = ARGV[p], attrs = {} }
  local n = tonumber(ARGV[p + 1])
  p = p + 2
  for _ = 1, n do
    d.attrs[#d.attrs + 1] = { ARGV[p], ARGV[p + 1], ARGV[p + 2] == '1' }
    p = p + 3
  end
  return d, p
end

-- The series of draft `d` (its dimension values folded), with `deniedBy` = `limit` in its
-- place when given.
local function series_of(d, limit)
  local out = { d.feature }
  local pending = limit
  for _, a in ipairs(d.attrs) do
    if pending and bytes_less('deniedBy', a[1]) then
      out[#out + 1] = 'deniedBy'
      out[#out + 1] = pending
      pending = nil
    end
    if not (limit and a[1] == 'deniedBy') then
      out[#out + 1] = a[1]
      out[#out + 1] = a[3] and fold(a[1], a[2]) or a[2]
    end
  end
  if pending then
    out[#out + 1] = 'deniedBy'
    out[#out + 1] = pending
  end
  return cmsgpack.pack(out)
end

-- Nine measures at ARGV[p..].
local function measures_at(p)
  local m = {}
  for i = 1, MEASURES do m[i] = tonumber(ARGV[p + i - 1]) end
  return m
end

-- The ledger (core/ledger.rs) -------------------------------------------------------------

local function expire_due()
  local due = redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', now)
  for _, tag in ipairs(due) do
    local raw = redis.call('HGET', HOLDS, tag)
    if raw then
      local h = cmsgpack.unpack(raw)
      for _, part in ipairs(h[2]) do
        if part[3][1] == CONC then
          local e = load(part[1], part[2])
          if e.st then
            expire(e.st, part[3])
            save(part[1], part[2], e)
          end
        end
      end
      -- Expired at the held amount, as counted.
      if REC and h[6] then attribute(EXPIRED, h[6], h[7], h[5], h[3]) end
      redis.call('HDEL', HOLDS, tag)
      holds_changed = true
    end
  end
  if #due > 0 then redis.call('ZREMRANGEBYSCORE', EXPIRY, '-inf', now) end
  return #due
end

local function reply(result, extra, next_expiry)
  local holds, version = -1, -1
  if holds_changed then
    holds = redis.call('HLEN', HOLDS)
    version = redis.call('HINCRBY', META, 'v', 1)
  end
  local out = { result, holds, counters, next_expiry or -1, version }
  -- `false` entries (no state) stay in place and reach the caller as nil replies.
  for _, v in ipairs(extra or {}) do out[#out + 1] = v end
  return out
end

-- ARGV: 'reserve', now, hold (1/0), ttl ms, tag, max settle, counters, then a group per
-- counter, then the series draft, each counter's (limit id, chain level), the held measures
-- (what an expiry records), and the record settings. Result: the blocking counter (1-based, 0 if none), then the hold number (0 if
-- none), then each counter's state before the call (false if it had none).
local function reserve()
  local place, ttl, tag, max_settle = ARGV[3] == '1', tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
  local n = tonumber(ARGV[7])
  expire_due()
  if place then
    -- The same call again (a Cluster client resends a script whose answer it lost): the hold
    -- that call placed stands and nothing is held or recorded twice. Answered as REPLAYED
    -- with that hold's number and the states as they are now (wire.rs RESERVE_REPLAYED).
    local raw = redis.call('HGET', HOLDS, tag)
    if raw then
      local now_states = {}
      for i = 1, n do
        local c = planned(8 + (i - 1) * GROUP)
        now_states[i] = load(c.key, c.field).raw
      end
      return reply(-1, { cmsgpack.unpack(raw)[5], unpack(now_states, 1, n) })
    end
  end
  -- Cancelled before it ran (its caller gave up and the cancel overtook it): hold nothing.
  if place and redis.call('ZSCORE', CANCELLED, tag) then place = false end
  local counters, before = {}, {}
  local blocking = 0
  for i = 1, n do
    local c = planned(8 + (i - 1) * GROUP)
    counters[i] = c
    local e = load(c.key, c.field)
    before[i] = e.raw
    if blocking == 0 and c.enforce and not fits(c, e.st) then blocking = i end
  end
  local draft, limits_at
  if REC and place then draft, limits_at = draft_at(8 + n * GROUP) end
  if blocking > 0 and draft then
    local limit, level = ARGV[limits_at + 2 * (blocking - 1)], tonumber(ARGV[limits_at + 2 * blocking - 1])
    local m = { 0, 0, 0, 0, 0, 0, 0, 0, 1 }
    attribute(DENIED, series_of(draft, limit), m, level, false)
  end
  if blocking > 0 or not place or n == 0 then
    return reply(blocking, { 0, unpack(before, 1, n) })
  end
  local seq = math.max(tonumber(redis.call('HGET', META, 'seq') or 0), 1)
  redis.call('HSET', META, 'seq', seq + 1)
  local parts = {}
  for i = 1, n do
    local c = counters[i]
    local e = load(c.key, c.field)
    if not e.st then e.st = fresh(c) end
    if e.st then
      local mark = hold(c, e.st)
      save(c.key, c.field, e)
      if mark then
        parts[#parts + 1] = { c.key, c.field, mark, c.amount, c.rule, c.p_in, c.p_out, c.p_cached, c.p_cache_write }
      end
    end
  end
  local expires = now + ttl
  local h = { expires, parts, tag, max_settle, seq }
  if draft then
    h[6] = series_of(draft, nil)
    h[7] = measures_at(limits_at + 2 * n)
  end
  redis.call('HSET', HOLDS, tag, cmsgpack.pack(h))
  redis.call('ZADD', EXPIRY, expires, tag)
  holds_changed = true
  return reply(0, { seq, unpack(before, 1, n) })
end

-- Settles (`how` 's', at `units`, priced parts from ARGV[first_priced..], the token split
-- `tokens`) or releases (anything else) the open hold `h` under `tag`, and forgets it.
local function close_hold(tag, h, how, units, first_priced, tokens)
  local p = first_priced
  local credits = 0
  for _, part in ipairs(h[2]) do
    local actual = 0
    if how == 's' then
      if part[5] == 0 then
        actual = units
      elseif part[5] == 1 then
        actual = 1
      else
        actual = tonumber(ARGV[p])
        credits = math.max(credits, actual)
        p = p + 1
      end
    end
    local e = load(part[1], part[2])
    if e.st then
      settle(e.st, part[3], part[4], actual)
      save(part[1], part[2], e)
    end
  end
  if REC and h[6] then
    if how == 's' then
      local t = tokens or { 0, 0, 0, 0, 0 }
      attribute(SETTLED, h[6], { units, t[1], t[2], t[3], t[4], t[5], credits, 1, 0 }, h[5], h[3])
    else
      attribute(RELEASED, h[6], { 0, 0, 0, 0, 0, 0, 0, 1, 0 }, h[5], h[3])
    end
  end
  redis.call('HDEL', HOLDS, tag)
  redis.call('ZREM', EXPIRY, tag)
  holds_changed = true
end

-- ARGV: 'close', now, hold number, 's' (settle) or 'r' (release), actual units, tag, the
-- largest figure the usage reports, then the amounts of the hold's priced parts in order, if
-- the caller has priced them, then the token split (input, output, cached, cache write,
-- reasoning), and the record settings.
-- Result: 0 closed, 1 already closed, 2 no such hold (or another tag), 3 the priced parts'
-- prices are needed first (then their per-million prices follow, four per part; nothing
-- changed), 4 the usage is over the hold's max settle (which follows; nothing changed).
local CLOSE_TAIL = 5 + REC_ARGS
local function close()
  local seq, how, units = tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
  local tag, figure = ARGV[6], tonumber(ARGV[7])
  expire_due()
  local raw = redis.call('HGET', HOLDS, tag)
  local h = raw and cmsgpack.unpack(raw)
  -- An open hold is reached by its number and tag together; any other id names no open hold.
  if not h or h[5] ~= seq then
    local next_seq = tonumber(redis.call('HGET', META, 'seq') or 0)
    return reply((seq > 0 and seq < next_seq) and 1 or 2)
  end
  if how == 's' and figure > h[4] then return reply(4, { h[4] }) end
  local priced = {}
  if how == 's' then
    for _, part in ipairs(h[2]) do
      if part[5] == 2 then
        priced[#priced + 1] = part[6]
        priced[#priced + 1] = part[7]
        priced[#priced + 1] = part[8]
        priced[#priced + 1] = part[9] or part[6]
      end
    end
    if #priced > 0 and #ARGV < 8 + CLOSE_TAIL then return reply(3, priced) end
  end
  local t = #ARGV - CLOSE_TAIL
  local tokens = { tonumber(ARGV[t + 1]), tonumber(ARGV[t + 2]), tonumber(ARGV[t + 3]),
    tonumber(ARGV[t + 4]), tonumber(ARGV[t + 5]) }
  close_hold(tag, h, how, units, 8, tokens)
  return reply(0)
end

-- ARGV: 'cancel', now, tag, how long to remember it (ms). Releases the open hold under `tag`
-- (1), or remembers the tag so that a reserve carrying it, arriving later, holds nothing (0).
local function cancel()
  local tag, keep = ARGV[3], tonumber(ARGV[4])
  redis.call('ZREMRANGEBYSCORE', CANCELLED, '-inf', now)
  expire_due()
  local raw = redis.call('HGET', HOLDS, tag)
  if raw then
    close_hold(tag, cmsgpack.unpack(raw), 'r', 0, 0, nil)
    return reply(1)
  end
  redis.call('ZADD', CANCELLED, now + keep, tag)
  return reply(0)
end

-- ARGV: 'record', now, idempotency key, retention ms, most keys kept, counters, groups, then
-- the series draft, each counter's (limit id, level), the measures, and the record settings.
-- Result: 1 recorded, 0 the key was already recorded. Keys are evicted oldest first, keys of
-- one millisecond in member order (the sorted set's tie-break), as `Ledger::record` does.
local function record()
  local key, keep_ms, keep_max, n = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
  redis.call('ZREMRANGEBYSCORE', SEEN, '-inf', string.format('(%d', now - keep_ms))
  local over = redis.call('ZCARD', SEEN) - math.max(keep_max, 1) + 1
  if over > 0 then redis.call('ZPOPMIN', SEEN, over) end
  if redis.call('ZSCORE', SEEN, key) then return reply(0) end
  redis.call('ZADD', SEEN, now, key)
  for i = 1, n do
    local c = planned(7 + (i - 1) * GROUP)
    local e = load(c.key, c.field)
    if not e.st then e.st = fresh(c) end
    if e.st then
      local mark = hold(c, e.st)
      if mark then expire(e.st, mark) end
      save(c.key, c.field, e)
    end
  end
  if REC then
    local draft, limits_at = draft_at(7 + n * GROUP)
    attribute(INGESTED, series_of(draft, nil), measures_at(limits_at + 2 * n), key, false)
  end
  return reply(1)
end

-- ARGV: as 'reserve', then before the record settings the old hold's number, tag and the
-- units it spent. A replica's lease renewal in one step: the old hold settled at those units
-- (if it is still open), then the reservation. Result: as `reserve()`, then 0 if the old hold
-- was closed here, 1 if it was gone.
local function renew()
  local b = #ARGV - REC_ARGS
  local seq, tag, spent = tonumber(ARGV[b - 2]), ARGV[b - 1], tonumber(ARGV[b])
  expire_due()
  local raw = redis.call('HGET', HOLDS, tag)
  local h = raw and cmsgpack.unpack(raw)
  local gone = 1
  if h and h[5] == seq then
    -- A slice's hold counts its units (rule 0) and keeps no record: nothing priced to read.
    close_hold(tag, h, 's', spent, 0, nil)
    gone = 0
  end
  local out = reserve()
  out[#out + 1] = gone
  return out
end

-- ARGV: 'locals', now, the writer (a replica's number) and the batch's number, the draft count and drafts (each 0 and its series packed, when
-- nothing in it folds, else 1 and the draft as `draft_at`), the sum count and per sum
-- (draft number, minute start, nine measures), the entry count and per entry (packed events,
-- their count), then the record settings (wire.rs `LocalBatch`). The records of
-- decisions a replica made inside its leases, attributed at their own times; no counter
-- changes. Each draft's series is made once (folding its values), each sum is added to its
-- minute, hour and day buckets, and each entry is appended to the stream as it came, with
-- the series list its events' draft numbers point into: `l` the events, `s` the series
-- (read back by `entry_events`). The caller packed the events, so this call never touches
-- one record: a batch costs Redis per distinct series and bucket, not per decision.
local function locals()
  if not REC then return reply(0) end
  -- A batch applies once: its writer numbers its batches of this customer and sends one at a
  -- time, the same one again until answered, so a number at or below the last applied is a
  -- batch that ran already (its answer was lost). The mark outlives any retry by far.
  local mark = BASE .. 'lb:' .. ARGV[3]
  local batch = tonumber(ARGV[4])
  if batch <= tonumber(redis.call('GET', mark) or 0) then return reply(0) end
  redis.call('SET', mark, batch, 'PX', 86400000)
  local p = 6
  local series = {}
  for i = 1, tonumber(ARGV[5]) do
    if ARGV[p] == '0' then
      -- Nothing in it folds: the caller packed the series as `series_of` would.
      series[i] = ARGV[p + 1]
      p = p + 2
    else
      local draft, after = draft_at(p + 1)
      series[i] = series_of(draft, nil)
      p = after
    end
  end
  local sums, kept_by_minute = {}, {}
  local n = tonumber(ARGV[p])
  p = p + 1
  for _ = 1, n do
    local s, minute = series[tonumber(ARGV[p])], ARGV[p + 1]
    local m = measures_at(p + 2)
    -- A minute's three buckets, found once per minute in the batch.
    local kept = kept_by_minute[minute]
    if not kept then
      kept = {}
      local ms = tonumber(minute)
      for gi, g in ipairs(GRAIN) do
        local start = ms - (ms % g)
        local keep_until = start + g + REC.ret[gi]
        if keep_until > now then
          local key = BASE .. 'r' .. gi .. ':' .. start
          local b = sums[key]
          if not b then
            b = { keep = keep_until, by = {}, gi = gi, start = start }
            sums[key] = b
          end
          kept[#kept + 1] = b
        end
      end
      kept_by_minute[minute] = kept
    end
    for _, b in ipairs(kept) do
      local cur = b.by[s]
      if not cur then
        cur = { 0, 0, 0, 0, 0, 0, 0, 0, 0 }
        b.by[s] = cur
      end
      for i = 1, MEASURES do cur[i] = cur[i] + m[i] end
    end
    p = p + 2 + MEASURES
  end
  for key, b in pairs(sums) do
    bucket_add(key, b.by, b.keep - now, b.gi, b.start)
  end
  local stream, packed = BASE .. 's', cmsgpack.pack(series)
  local entries = tonumber(ARGV[p])
  local extra = 0
  for i = 1, entries do
    local q = p + 1 + (i - 1) * 2
    redis.call('XADD', stream, '*', 'l', ARGV[q], 's', packed)
    extra = extra + tonumber(ARGV[q + 1]) - 1
  end
  -- MAXLEN counts entries and an entry here holds many events: the stream is trimmed to as
  -- many entries as make its most events at the events per entry it has had (`sx` counts
  -- the events beyond one per entry ever added, XINFO the entries ever added). XINFO also
  -- returns the first and last entries, batches of tens of kilobytes, so the entry count
  -- to keep (`sk`) is worked out again every 16th batch only.
  local beyond = redis.call('HINCRBY', META, 'sx', extra)
  local keep = tonumber(redis.call('HGET', META, 'sk') or 0)
  if redis.call('HINCRBY', META, 'sb', 1) % 16 == 1 or keep == 0 then
    -- Without `entries-added` (Redis before 7.0): as many entries as events, as before.
    keep = REC.stream_max
    local info = redis.call('XINFO', 'STREAM', stream)
    for i = 1, #info, 2 do
      if info[i] == 'entries-added' then
        local added = tonumber(info[i + 1])
        keep = math.max(1, math.floor(REC.stream_max * added / (added + beyond)))
      end
    end
    redis.call('HSET', META, 'sk', keep)
  end
  redis.call('XTRIM', stream, 'MAXLEN', '~', keep)
  trim_stream(REC.stream_ms)
  return reply(0)
end

-- ARGV: 'grant', now, entity key index, field, id, priority, expires ('' for never),
-- category (0 promotional, 1 paid), amount. Result: 1 added, 0 already there.
local function grant()
  local key, field = KEYS[tonumber(ARGV[3])], ARGV[4]
  local expires = false
  if ARGV[7] ~= '' then expires = tonumber(ARGV[7]) end
  local g = { ARGV[5], tonumber(ARGV[6]), expires, tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[9]) }
  local e = load(key, field)
  local created = not e.st
  if created then e.st = { CRED, 0, {}, {} } end
  if e.st[1] ~= CRED then return reply(0) end
  local added = add_grant(e.st, g)
  if added == 1 or created then save(key, field, e) end
  return reply(added)
end

-- ARGV: 'counted', now, entity key index, field. Result: 0, then the counter's state (false
-- for none). Reads only; due holds are not expired (as a ledger's `counted`).
local function counted()
  return reply(0, { load(KEYS[tonumber(ARGV[3])], ARGV[4]).raw })
end

-- ARGV: 'entity', now, id, type, parent, most entities, create (1/0). Result: 0 found, 1
-- created, 2 the customer has its most (nothing created), 3 absent (not created); found and
-- created are followed by the entity's type and parent.
local function entity()
  local id, etype, parent, most, create = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7] == '1'
  local raw = redis.call('HGET', AUTO, id)
  if raw then
    local e = cmsgpack.unpack(raw)
    return reply(0, { e[1], e[2] })
  end
  if not create then return reply(3) end
  if redis.call('HLEN', AUTO) >= most then return reply(2) end
  redis.call('HSET', AUTO, id, cmsgpack.pack({ etype, parent }))
  return reply(1, { etype, parent })
end

-- ARGV: 'entities', now. Result: how many entities were created on the fly.
local function entities()
  return reply(redis.call('HLEN', AUTO))
end

-- ARGV: 'expire', now. Result: how many holds expired; the header has the next expiry.
local function sweep()
  local n = expire_due()
  local first = redis.call('ZRANGE', EXPIRY, 0, 0, 'WITHSCORES')
  return reply(n, nil, first[2] and tonumber(first[2]) or false)
end

-- The events of stream entry `e`, packed: an `e` entry is one; an `l` entry (a batch of local
-- records, see `locals`) is unpacked, each event given its series back.
local function entry_events(e)
  local f = e[2]
  if f[1] ~= 'l' then return { f[2] } end
  local evs, series = cmsgpack.unpack(f[2]), cmsgpack.unpack(f[4])
  local out = {}
  for i, ev in ipairs(evs) do
    out[i] = cmsgpack.pack({ ev[1], ev[2], series[ev[3]], ev[4], ev[5], ev[6] })
  end
  return out
end

-- Whether stream id `a` (ms, seq) is before `b`.
local function id_before(am, as, bm, bs)
  return am < bm or (am == bm and as < bs)
end

-- ARGV: 'events', now, after ('' for the start), most. Result: whether events after `after`
-- were trimmed away (1/0), then (id, packed event) oldest first. An event's id is its
-- entry's; inside a batch entry every event but the last is `<entry>.<index>`, so a cursor
-- resumes inside an entry, and the last one's is the entry's own.
local function events()
  local stream, after, most = BASE .. 's', ARGV[3], tonumber(ARGV[4])
  if redis.call('EXISTS', stream) == 0 then return reply(0, {}) end
  local gap = 0
  local start, within, skip = '-', nil, 0
  if after ~= '' then
    local am, as, ai = string.match(after, '^(%d+)-(%d+)%.(%d+)$')
    if am then
      within = am .. '-' .. as
      start, skip = within, tonumber(ai) + 1
    else
      am, as = string.match(after, '^(%d+)-(%d+)$')
      start = '(' .. after
    end
    local info = redis.call('XINFO', 'STREAM', stream)
    for i = 1, #info, 2 do
      if info[i] == 'max-deleted-entry-id' and am then
        local dm, ds = string.match(info[i + 1], '^(%d+)-(%d+)$')
        if dm then
          dm, ds = tonumber(dm), tonumber(ds)
          local cm, cs = tonumber(am), tonumber(as)
          -- A cursor inside an entry that was deleted missed the rest of that entry.
          if id_before(cm, cs, dm, ds) or (within and cm == dm and cs == ds) then gap = 1 end
        end
      end
    end
  end
  local out, n = {}, 0
  -- Entries a few at a time: one may hold hundreds of events.
  while n < most do
    local page = redis.call('XRANGE', stream, start, '+', 'COUNT', math.min(most - n, 16))
    if #page == 0 then break end
    for _, e in ipairs(page) do
      local evs = entry_events(e)
      local first = 1
      if within and e[1] == within then first = skip + 1 end
      for i = first, #evs do
        if n >= most then return reply(gap, out) end
        out[#out + 1] = (i == #evs) and e[1] or (e[1] .. '.' .. (i - 1))
        out[#out + 1] = evs[i]
        n = n + 1
      end
      start = '(' .. e[1]
    end
  end
  return reply(gap, out)
end

-- ARGV: 'alert', now, key, until (ms, '' for "until re-armed"), body, the deliveries (see
-- `enqueue_at`), then the record settings. Claims alert threshold `key` (the hash `al`: key -> until, -1 for none) unless
-- it is claimed and the claim still holds, and appends {ALERT, now, body} to the stream.
-- Result: 1 claimed, 0 claimed already.
-- Webhook deliveries: the hash `ob` (id -> the delivery as the caller encoded it), the
-- outbox `oq` (id by when its next attempt is due) and the log `ol` (id by creation), kept
-- to MAX_DELIVERIES; the oldest leave the log first.
local MAX_DELIVERIES = 1000

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
  -- Past the most, the oldest finished deliveries leave first (as `Ledger::enqueue`).
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

-- ARGV: 'lease', now, lease ms, most, lessee. Result: 0, then the encoded deliveries due,
-- each now due again after the lease, first those `lessee` leased and has not finished (a
-- lease whose answer it never heard: one replica's passes for a customer run one at a time,
-- so none of them is being sent). `om:<lessee>` holds a lessee's unfinished leases and
-- expires with its last lease, so a lessee that is gone leaves its deliveries to the next
-- lease after theirs ends.
local function lease()
  local until_ms, most = now + tonumber(ARGV[3]), tonumber(ARGV[4])
  local mine = BASE .. 'om:' .. ARGV[5]
  local out = {}
  local ids = {}
  local members = redis.call('SMEMBERS', mine)
  table.sort(members)
  for _, id in ipairs(members) do
    if #ids < most and redis.call('ZSCORE', BASE .. 'oq', id) then
      ids[#ids + 1] = id
    else
      redis.call('SREM', mine, id)
    end
  end
  if #ids < most then
    -- `most`, not `most - #ids`: the lessee's own ids, due again once their lease ran out,
    -- are among those returned and skipped, and must not take the places of others.
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', BASE .. 'oq', '-inf', now, 'LIMIT', 0, most)) do
      if #ids >= most then break end
      if redis.call('SISMEMBER', mine, id) == 0 then ids[#ids + 1] = id end
    end
  end
  for _, id in ipairs(ids) do
    redis.call('ZADD', BASE .. 'oq', until_ms, id)
    redis.call('SADD', mine, id)
    local d = redis.call('HGET', BASE .. 'ob', id)
    if d then out[#out + 1] = d end
  end
  if #ids > 0 then redis.call('PEXPIRE', mine, tonumber(ARGV[3])) end
  return reply(0, out)
end

-- ARGV: 'finish', now, id, due ('' when finished), encoded, lessee. Stores the delivery if it
-- is still in the log, and ends the lessee's lease of it. Result: 0.
local function finish()
  local id, due, encoded = ARGV[3], ARGV[4], ARGV[5]
  redis.call('SREM', BASE .. 'om:' .. ARGV[6], id)
  if redis.call('HEXISTS', BASE .. 'ob', id) == 0 then return reply(0) end
  redis.call('HSET', BASE .. 'ob', id, encoded)
  if due == '' then
    redis.call('ZREM', BASE .. 'oq', id)
  else
    redis.call('ZADD', BASE .. 'oq', tonumber(due), id)
  end
  return reply(0)
end

-- ARGV: 'deliveries', now, most. Result: 0, then the encoded deliveries, newest first.
local function deliveries()
  local ids = redis.call('ZREVRANGE', BASE .. 'ol', 0, tonumber(ARGV[3]) - 1)
  if #ids == 0 then return reply(0, {}) end
  return reply(0, redis.call('HMGET', BASE .. 'ob', unpack(ids)))
end

-- ARGV: 'seal', now, a bucket's key suffix (`r<g>:<start>`), the reader's claim token, then
-- the bucket's rows (or '' when not kept), per-attribute sums and totals as the reader packed
-- them (store/redis/scan.rs). Stored, expiring with the bucket, only if the claim (`:zp`) is
-- still the reader's: any write to the bucket since it was claimed deleted the claim, and the
-- copies would be stale. Result: 1 stored, 0 not.
local function seal()
  local key = BASE .. ARGV[3]
  if redis.call('GET', key .. ':zp') ~= ARGV[4] then return reply(0) end
  redis.call('DEL', key .. ':zp')
  local ttl = redis.call('PTTL', key)
  if ttl <= 0 then return reply(0) end
  if ARGV[5] ~= '' then redis.call('SET', key .. ':z', ARGV[5], 'PX', ttl) end
  redis.call('SET', key .. ':za', ARGV[6], 'PX', ttl)
  redis.call('SET', key .. ':zt', ARGV[7], 'PX', ttl)
  return reply(1)
end

if op == 'reserve' then return reserve()
elseif op == 'seal' then return seal()
elseif op == 'renew' then return renew()
elseif op == 'enqueue' then return enqueue()
elseif op == 'lease' then return lease()
elseif op == 'finish' then return finish()
elseif op == 'deliveries' then return deliveries()
elseif op == 'alert' then return alert()
elseif op == 'rearm' then return rearm()
elseif op == 'events' then return events()
elseif op == 'close' then return close()
elseif op == 'record' then return record()
elseif op == 'locals' then return locals()
elseif op == 'grant' then return grant()
elseif op == 'expire' then return sweep()
elseif op == 'counted' then return counted()
elseif op == 'cancel' then return cancel()
elseif op == 'entity' then return entity()
elseif op == 'entities' then return entities()
end
return redis.error_reply('tollgate: unknown operation ' .. tostring(op))
