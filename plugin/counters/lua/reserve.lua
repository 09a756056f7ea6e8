-- Admit one request, atomically: the rate limit (plugin.ratelimit.admits), then the reservation
-- (plugin.policy.grant), in Lua.
-- KEYS[1] counters hash (used, reserved)
-- KEYS[2] reservations hash (id -> µcr)
-- KEYS[3] expiries sorted set (id scored by expiry, Unix ms)
-- KEYS[4] requests in the current rate window (string)
-- KEYS[5] requests in the previous rate window (string)
-- ARGV[1] reservation id
-- ARGV[2] full ask, µcr ("" = reserve nothing: the customer has no ceiling)
-- ARGV[3] minimum ask, µcr
-- ARGV[4] ceiling, µcr ("" = none)
-- ARGV[5] expiry of this reservation, Unix ms
-- ARGV[6] now, Unix ms
-- ARGV[7] seconds to keep the account's keys (past the period's end)
-- ARGV[8] requests allowed per rate window ("" = no rate limit)
-- ARGV[9] rate window, ms
-- ARGV[10] spare, µcr: held besides for the process's next requests, from at most a quarter of
--          what is left (plugin.policy.SPARE_SHARE), and only if it covers one more full ask
-- Returns {granted µcr or -1 (refused or nothing asked), µcr left before this reservation or -1
-- (no ceiling), rate verdict (1 allowed, 0 refused, -1 no limit), requests in the current window,
-- requests in the previous window} (the counts are from before this request),
-- or {-2, ...} when the account has no `used` yet, or had a reservation that ran out: the caller
-- seeds it from the ledger and calls again (checked first, so a request is never counted twice
-- against the rate limit).

local reserving = ARGV[2] ~= ''
if reserving then
  if redis.call('HEXISTS', KEYS[1], 'used') == 0 then
    return {-2, -1, -1, 0, 0}
  end
  -- A reservation that ran out was never settled: its proxy died, perhaps after writing the bill it
  -- held for to the ledger (a bill the reservation covered is written before it is settled). The
  -- reservation is dropped and `used` starts again from the ledger, which has every such bill.
  local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
  if #expired > 0 then
    local freed = 0
    for _, id in ipairs(expired) do
      freed = freed + tonumber(redis.call('HGET', KEYS[2], id) or '0')
      redis.call('HDEL', KEYS[2], id)
      redis.call('ZREM', KEYS[3], id)
    end
    redis.call('HINCRBY', KEYS[1], 'reserved', -freed)
    redis.call('HDEL', KEYS[1], 'used')
    return {-2, -1, -1, 0, 0}
  end
end

local verdict, current, previous = -1, 0, 0
if ARGV[8] ~= '' then
  local allowed, window = tonumber(ARGV[8]), tonumber(ARGV[9])
  current = tonumber(redis.call('GET', KEYS[4]) or '0')
  previous = tonumber(redis.call('GET', KEYS[5]) or '0')
  local elapsed = tonumber(ARGV[6]) % window
  if previous * (window - elapsed) + current * window + window <= allowed * window then
    verdict = 1
    redis.call('INCR', KEYS[4])
    redis.call('PEXPIRE', KEYS[4], 2 * window)
  else
    return {-1, -1, 0, current, previous}
  end
end

if not reserving then
  return {-1, -1, verdict, current, previous}
end

local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
local full = tonumber(ARGV[2])
local minimum = tonumber(ARGV[3])

local granted = -1
local available = -1
local spare = tonumber(ARGV[10])
if ARGV[4] == '' then
  granted = full + spare
else
  available = tonumber(ARGV[4]) - used - reserved
  if full <= available then
    spare = math.min(spare, math.floor(available / 4) - full)
    granted = full
    if spare >= full then granted = full + spare end
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
return {granted, available, verdict, current, previous}
