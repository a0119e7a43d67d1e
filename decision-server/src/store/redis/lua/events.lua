-- Part `events.lua` of the script: mirrors decision-server/src/store/events.rs (reads after a cursor, gaps).

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
