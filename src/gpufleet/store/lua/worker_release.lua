-- Give a slot back; the worker (if it still exists) was busy until now.
-- KEYS: worker hash, slot zset. ARGV: now, token. Returns 1 if the token held a slot.
local removed = redis.call('ZREM', KEYS[2], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'last_busy_at', ARGV[1])
end
return removed
