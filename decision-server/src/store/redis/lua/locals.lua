-- Part `locals.lua` of the script: mirrors `Ledger::record_local` (decision-server/src/core/ledger.rs) with the batch decision-server/src/store/redis/wire.rs `LocalBatch` packs: records of decisions made inside leases.

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
