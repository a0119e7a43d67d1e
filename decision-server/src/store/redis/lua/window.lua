-- Part `window.lua` of the script: mirrors decision-server/src/core/window.rs (`WindowState`: roll, used).

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
