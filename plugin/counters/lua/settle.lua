-- End a reservation and bill the real usage, never past the ceiling (plugin.policy.settle, in Lua),
-- and add the bill to the customer's spend in the current clock hour (the breaker's input).
-- KEYS[1] counters hash (used, reserved)
-- KEYS[2] reservations hash (id -> µcr)
-- KEYS[3] expiries sorted set
-- KEYS[4] µcr billed in the current clock hour (string)
-- KEYS[5] µcr billed in the previous clock hour (string)
-- ARGV[1] reservation id
-- ARGV[2] real usage, µcr (0 to release without billing)
-- ARGV[3] ceiling, µcr ("" = none)
-- ARGV[4] seconds to keep the account's keys
-- ARGV[5] portion, µcr: take at most this much of a reservation several requests share and keep
--         the rest held ("" = end the reservation)
-- Returns {µcr billed, used, reserved (by others), this hour's µcr, the previous hour's µcr},
-- or {-2, ...} when the account has no `used` (new, Redis was flushed, or a reservation ran out:
-- reserve.lua): seed, call again.

if redis.call('HEXISTS', KEYS[1], 'used') == 0 then
  return {-2, 0, 0, 0, 0}
end

local held = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if ARGV[5] == '' then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
else
  held = math.min(held, tonumber(ARGV[5]))
  if held > 0 then redis.call('HINCRBY', KEYS[2], ARGV[1], -held) end
end

local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0') - held
local bill = tonumber(ARGV[2])
if ARGV[3] ~= '' then
  local room = tonumber(ARGV[3]) - used - reserved
  if room < 0 then room = 0 end
  if bill > room then bill = room end
end
used = used + bill
redis.call('HSET', KEYS[1], 'used', used, 'reserved', reserved)
redis.call('EXPIRE', KEYS[1], ARGV[4])

local hour = tonumber(redis.call('GET', KEYS[4]) or '0')
if bill > 0 then
  hour = redis.call('INCRBY', KEYS[4], bill)
  redis.call('EXPIRE', KEYS[4], 10800)
end
return {bill, used, reserved, hour, tonumber(redis.call('GET', KEYS[5]) or '0')}
