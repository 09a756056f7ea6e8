-- Reserve credits for one request, atomically (plugin.policy.grant, in Lua).
-- KEYS[1] counters hash (used, reserved)
-- KEYS[2] reservations hash (id -> µcr)
-- KEYS[3] expiries sorted set (id scored by expiry, Unix ms)
-- ARGV[1] reservation id
-- ARGV[2] full ask, µcr
-- ARGV[3] minimum ask, µcr
-- ARGV[4] ceiling, µcr ("" = none)
-- ARGV[5] expiry of this reservation, Unix ms
-- ARGV[6] now, Unix ms
-- ARGV[7] seconds to keep the keys (past the period's end)
-- Returns {granted µcr or -1 (refused), µcr left before this reservation or -1 (no ceiling)},
-- or {-2, -1} when the account has no `used` yet: the caller seeds it from the ledger and calls again.

if redis.call('HEXISTS', KEYS[1], 'used') == 0 then
  return {-2, -1}
end

local freed = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])) do
  freed = freed + tonumber(redis.call('HGET', KEYS[2], id) or '0')
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
end

local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0') - freed
local full = tonumber(ARGV[2])
local minimum = tonumber(ARGV[3])

local granted = -1
local available = -1
if ARGV[4] == '' then
  granted = full
else
  available = tonumber(ARGV[4]) - used - reserved
  if full <= available then
    granted = full
  elseif minimum <= available and available > 0 then
    granted = available
  end
end

if granted >= 0 then
  redis.call('HSET', KEYS[2], ARGV[1], granted)
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[1])
  reserved = reserved + granted
end
redis.call('HSET', KEYS[1], 'reserved', reserved)
for i = 1, 3 do
  redis.call('EXPIRE', KEYS[i], ARGV[7])
end
return {granted, available}
