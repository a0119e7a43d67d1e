-- Part `rollup.lua` of the script: mirrors decision-server/src/core/rollup.rs (series, measures, minute/hour/day buckets, folding) and the stream's appends of decision-server/src/store/events.rs.

-- Usage records (core/rollup.rs) ---------------------------------------------------------


-- Trims the customer's stream to `keep_ms` before `server_ms` (Redis's clock: stream ids
-- carry it, so the retention is measured on it; Redis's own TIME when not given).
local function trim_stream(keep_ms, server_ms)
  if not server_ms then
    local t = redis.call('TIME')
    server_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  redis.call('XTRIM', BASE .. 's', 'MINID', '~', server_ms - keep_ms)
end

-- Appends a packed event to the customer's stream, trimmed to `most` events and `keep_ms`.
-- The new entry's id starts with Redis's clock in milliseconds, which the trim reads instead
-- of asking for TIME again. The count is trimmed on every append; the age on about one in 16
-- (the new id's millisecond), so an event may outlive `keep_ms` until a few more appends.
local function append(event, most, keep_ms)
  local id = redis.call('XADD', BASE .. 's', 'MAXLEN', '~', most, '*', 'e', event)
  local server_ms = tonumber(string.match(id, '^(%d+)'))
  if server_ms % 16 == 0 then trim_stream(keep_ms, server_ms) end
end

-- Series index (store/redis/scan.rs): for each 30-day period, a set per attribute
-- (`x<period start>:<name>\0<value>`) of the series that recorded in a day of it, added when
-- a series first appears in a day bucket; `xs` is the first day from which the index is
-- complete (the day this script first indexed, or the next if that day had records already).
-- A filtered usage read asks these sets which series to read, not every bucket field.
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

-- Bucket hash `key` (size `gi`, starting at `start`) holds packed measures per series, kept
-- `keep_ms` from now. The expiry is set by the call that creates the bucket: a bucket's end of
-- retention is fixed by its start, so a call that finds every series it adds to already there
-- (nearly every call) leaves it as it is. Its seals (`:z` rows, `:za` per-attribute sums, `:zt`
-- totals, `:zp` a reader's claim; store/redis/scan.rs) are deleted by any write: a seal that
-- exists is the bucket as it stands.

-- The packed measures of `series` in bucket `key` once `add` is added to `r` (what it held;
-- false: the series is new to the bucket, which `st` notes, with whether the bucket is new).
local function merged(key, series, r, add, gi, start, st)
  if not r then
    if st.fresh == nil then st.fresh = redis.call('EXISTS', key) == 0 end
    if gi == 3 then
      index(series, start)
      st.indexed = true
    end
  end
  local cur = r and cmsgpack.unpack(r) or { 0, 0, 0, 0, 0, 0, 0, 0, 0 }
  for j = 1, MEASURES do cur[j] = cur[j] + add[j] end
  return cmsgpack.pack(cur)
end

-- After a write to bucket `key`: its expiry if the write made it, the index's start, seals.
local function bucket_done(key, keep_ms, gi, start, st)
  if st.fresh then redis.call('PEXPIRE', key, keep_ms) end
  if st.indexed then
    redis.call('SET', BASE .. 'xs', st.fresh and start or start + DAY, 'NX')
  end
  -- A reader seals only buckets that ended SEAL_GRACE before its own now, so a bucket that
  -- has not ended by this call's clock has no seal while the replicas' clocks agree within
  -- that: a call recording now (nearly every call) deletes nothing.
  if start + GRAIN[gi] <= now then
    redis.call('DEL', key .. ':z', key .. ':za', key .. ':zt', key .. ':zp')
  end
end

-- Adds measures to bucket `key`: `by` maps each series to what it adds. One read and one write
-- per 1,000 series (`unpack` takes a few thousand values at most).
local function bucket_add(key, by, keep_ms, gi, start)
  local names = {}
  for series in pairs(by) do names[#names + 1] = series end
  local st = {}
  for first = 1, #names, 1000 do
    local last = math.min(first + 999, #names)
    local raw = redis.call('HMGET', key, unpack(names, first, last))
    local set = {}
    for i = first, last do
      local series = names[i]
      set[#set + 1] = series
      set[#set + 1] = merged(key, series, raw[i - first + 1], by[series], gi, start, st)
    end
    redis.call('HSET', key, unpack(set))
  end
  bucket_done(key, keep_ms, gi, start, st)
end

-- Adds measures `m` of one series to bucket `key` (what a decision, settle or expiry adds):
-- as `bucket_add`, with a plain read and no lists.
local function bucket_add_one(key, series, m, keep_ms, gi, start)
  local st = {}
  local r = redis.call('HGET', key, series)
  redis.call('HSET', key, series, merged(key, series, r, m, gi, start, st))
  bucket_done(key, keep_ms, gi, start, st)
end

-- Adds measures `m` to `series` in the buckets holding now, and appends the event: kind,
-- time, series, measures, and the reference (hold number and tag, an idempotency key, or the
-- denying level).
local function attribute(kind, series, m, a, b, at)
  -- When it happened: now, but for an expiry, when the hold expired (as `Ledger::expire_due`).
  at = at or now
  for gi, g in ipairs(GRAIN) do
    local start = at - (at % g)
    local keep_until = start + g + REC.ret[gi]
    if keep_until > now then
      -- Relative to this call's clock, not Redis's: the replicas' clock is the one counters
      -- and retention follow.
      bucket_add_one(BASE .. 'r' .. gi .. ':' .. start, series, m, keep_until - now, gi, start)
    end
  end
  append(cmsgpack.pack({ kind, at, series, m, a or false, b or false }), REC.stream_max, REC.stream_ms)
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

-- Packed series `packed` with attribute `name` = `value` in its byte-order place (replacing
-- one of that name): a settle record that says how its stream ended (`Rollups::series_with`).
local function series_with(packed, name, value)
  local s = cmsgpack.unpack(packed)
  local out = { s[1] }
  local pending = true
  for i = 2, #s - 1, 2 do
    if pending and bytes_less(name, s[i]) then
      out[#out + 1] = name
      out[#out + 1] = value
      pending = false
    end
    if s[i] ~= name then
      out[#out + 1] = s[i]
      out[#out + 1] = s[i + 1]
    end
  end
  if pending then
    out[#out + 1] = name
    out[#out + 1] = value
  end
  return cmsgpack.pack(out)
end

-- Nine measures at ARGV[p..].
local function measures_at(p)
  local m = {}
  for i = 1, MEASURES do m[i] = tonumber(ARGV[p + i - 1]) end
  return m
end
