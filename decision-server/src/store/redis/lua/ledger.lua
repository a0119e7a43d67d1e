-- Part `ledger.lua` of the script: mirrors decision-server/src/core/ledger.rs (`Ledger::reserve`, `close`, `cancel`, `record`, `renew`, `expire_due`, `count_at_once`).

-- The ledger (core/ledger.rs) -------------------------------------------------------------

local function expire_due()
  local due = redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', now)
  -- In the order they expired, ties by hold number (as `Ledger::expire_due`), not by tag.
  local holds = {}
  for _, tag in ipairs(due) do
    local raw = redis.call('HGET', HOLDS, tag)
    if raw then holds[#holds + 1] = { tag, cmsgpack.unpack(raw) } end
  end
  table.sort(holds, function(a, b)
    if a[2][1] ~= b[2][1] then return a[2][1] < b[2][1] end
    return a[2][5] < b[2][5]
  end)
  for _, th in ipairs(holds) do
    local tag, h = th[1], th[2]
    for _, part in ipairs(h[2]) do
      if part[3][1] == CONC then
        local e = load(part[1], part[2])
        if e.st then
          expire(e.st, part[3])
          save(part[1], part[2], e)
        end
      end
    end
    -- Expired at the held amount, as counted, at the time it expired.
    if REC and h[6] then attribute(EXPIRED, h[6], h[7], h[5], h[3], h[1]) end
    redis.call('HDEL', HOLDS, tag)
    holds_changed = true
  end
  if #due > 0 then redis.call('ZREMRANGEBYSCORE', EXPIRY, '-inf', now) end
  return #due
end

-- Counts counter `c`'s amount at once, as an expired hold is (`Ledger::count_at_once`): a
-- concurrency slot is taken and given back, every other counter keeps the amount.
local function count_at_once(c)
  local e = load(c.key, c.field)
  if not e.st then e.st = fresh(c) end
  if e.st then
    local mark = hold(c, e.st)
    if mark then expire(e.st, mark) end
    save(c.key, c.field, e)
  end
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

-- ARGV: 'reserve', now, mode (1 hold, 2 commit, 0 dry run), ttl ms (a hold's; for a commit, how
-- long its tag guards against a resend: mod.rs `commit_replay_window`), tag, max settle, counters, then a group per
-- counter, then the series draft, each counter's (limit id, chain level), the held measures
-- (what an expiry records), and the record settings. Result: the blocking counter (1-based, 0 if none), then the hold number (0 if
-- none), then each counter's state before the call (false if it had none).
local function reserve()
  local place, ttl, tag, max_settle = ARGV[3] ~= '0', tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
  local commit = ARGV[3] == '2'
  local n = tonumber(ARGV[7])
  expire_due()
  if commit and redis.call('ZSCORE', CANCELLED, tag) then
    -- The same commit again (a resent script): it counted once; answered as REPLAYED with no
    -- hold number and the states as they are now.
    local now_states = {}
    for i = 1, n do
      local c = planned(8 + (i - 1) * GROUP)
      now_states[i] = load(c.key, c.field).raw
    end
    return reply(-1, { 0, unpack(now_states, 1, n) })
  end
  if place and not commit then
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
  -- (A commit asked this above: its tag there is a replay.)
  if place and not commit and redis.call('ZSCORE', CANCELLED, tag) then place = false end
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
    -- What the call asked for: the units of the held measures (`RecordRef::Denial`'s `asked`).
    attribute(DENIED, series_of(draft, limit), m, level, measures_at(limits_at + 2 * n)[1])
  end
  if blocking > 0 or not place or n == 0 then
    return reply(blocking, { 0, unpack(before, 1, n) })
  end
  if commit then
    -- Counted at once as `record()` counts, and no hold (`Ledger::reserve`, `ReserveMode::Commit`).
    -- The tag joins the decided ones, so a resent call counts nothing more.
    for i = 1, n do count_at_once(counters[i]) end
    -- Past guards are dropped on about one commit in 16 (tags are random hex): one that stays
    -- a while longer costs only its bytes, since tags never repeat.
    if string.byte(tag, -1) == 48 then redis.call('ZREMRANGEBYSCORE', CANCELLED, '-inf', now) end
    redis.call('ZADD', CANCELLED, now + ttl, tag)
    if draft then attribute(COMMITTED, series_of(draft, nil), measures_at(limits_at + 2 * n), 0, tag) end
    return reply(0, { 0, unpack(before, 1, n) })
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
-- `tokens`, and `ended` = {attribute, value} on the record for a streamed call the gateway
-- cut or let finish past a refusal) or releases (anything else) the open hold `h` under
-- `tag`, and forgets it.
local function close_hold(tag, h, how, units, first_priced, tokens, ended)
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
      local series = ended and series_with(h[6], ended[1], ended[2]) or h[6]
      attribute(SETTLED, series, { units, t[1], t[2], t[3], t[4], t[5], credits, 1, 0 }, h[5], h[3])
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
-- reasoning), how a streamed call ended (its record's attribute and value, '' '' for none),
-- and the record settings.
-- Result: 0 closed, 1 already closed, 2 no such hold (or another tag), 3 the priced parts'
-- prices are needed first (then their per-million prices follow, four per part; nothing
-- changed), 4 the usage is over the hold's max settle (which follows; nothing changed).
local CLOSE_TAIL = 7 + REC_ARGS
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
  local ended = ARGV[t + 6] ~= '' and { ARGV[t + 6], ARGV[t + 7] } or nil
  close_hold(tag, h, how, units, 8, tokens, ended)
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
  for i = 1, n do count_at_once(planned(7 + (i - 1) * GROUP)) end
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
