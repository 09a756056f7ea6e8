-- Used and live-reserved µcr of one account (expired reservations not counted; nothing changed).
-- KEYS[1] counters hash (used, reserved)
-- KEYS[2] reservations hash (id -> µcr)
-- KEYS[3] expiries sorted set
-- ARGV[1] now, Unix ms
-- Returns {used, reserved}

local live = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. ARGV[1], '+inf')) do
  live = live + tonumber(redis.call('HGET', KEYS[2], id) or '0')
end
return {tonumber(redis.call('HGET', KEYS[1], 'used') or '0'), live}
