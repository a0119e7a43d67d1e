-- Part `counter.lua` of the script: mirrors decision-server/src/core/counter.rs (`CounterState`: fits, hold, settle, expire) and the argument group of one planned counter.

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
