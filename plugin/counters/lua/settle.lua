-- End a reservation and bill the real usage, never past the ceiling (plugin.policy.settle, in Lua).
-- KEYS[1] counters hash (used, reserved)
-- KEYS[2] reservations hash (id -> µcr)
-- KEYS[3] expiries sorted set
-- ARGV[1] reservation id
-- ARGV[2] real usage, µcr (0 to release without billing)
-- ARGV[3] ceiling, µcr ("" = none)
-- Returns the µcr billed, or -2 when the account has no `used` (Redis was flushed): seed, call again.

if redis.call('HEXISTS', KEYS[1], 'used') == 0 then
  return -2
end

local held = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])

local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
local bill = tonumber(ARGV[2])
if ARGV[3] ~= '' then
  local room = tonumber(ARGV[3]) - used - (reserved - held)
  if room < 0 then room = 0 end
  if bill > room then bill = room end
end
redis.call('HSET', KEYS[1], 'used', used + bill, 'reserved', reserved - held)
return bill
