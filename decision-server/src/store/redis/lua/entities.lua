-- Part `entities.lua` of the script: mirrors decision-server/src/core/ledger.rs (`Ledger::add_grant`, `counted`, `auto_entity`) and the sweep.

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

-- ARGV: 'entitypage', now, cursor. Result: 0, then the next cursor ('0' at the end) and
-- each entity of this page as id, type, parent. A page per call, so none holds Redis for long.
local function entitypage()
  local page = redis.call('HSCAN', AUTO, ARGV[3], 'COUNT', ENTITY_PAGE)
  local out = { page[1] }
  local pairs = page[2]
  for i = 1, #pairs, 2 do
    local e = cmsgpack.unpack(pairs[i + 1])
    out[#out + 1] = pairs[i]
    out[#out + 1] = e[1]
    out[#out + 1] = e[2]
  end
  return reply(0, out)
end

-- ARGV: 'expire', now. Result: how many holds expired; the header has the next expiry.
local function sweep()
  local n = expire_due()
  local first = redis.call('ZRANGE', EXPIRY, 0, 0, 'WITHSCORES')
  return reply(n, nil, first[2] and tonumber(first[2]) or false)
end
