-- One key's per-minute rate window.
-- KEYS: the window counter. ARGV: limit, window seconds.
-- Returns 0 if allowed, else the seconds to wait.
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) * 2) end
if n > tonumber(ARGV[1]) then
  local ttl = redis.call('TTL', KEYS[1]) - tonumber(ARGV[2])
  if ttl < 1 then ttl = 1 end
  return ttl
end
return 0
