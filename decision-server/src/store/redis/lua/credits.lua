-- Part `credits.lua` of the script: mirrors decision-server/src/core/credits.rs (`CreditPool`: available, draw, refund, grants in spending order).

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
