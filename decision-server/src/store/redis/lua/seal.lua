-- Part `seal.lua` of the script: mirrors decision-server/src/store/redis/scan.rs (sealed copies of closed buckets).

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
