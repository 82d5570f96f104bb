-- Keep the slots a replica's live proxied requests hold on one worker, and say the worker is
-- busy now. Written to the AOF (once per worker per renewal interval, not per request): the
-- holds themselves are ephemeral (worker_acquire.lua), so after a Redis restart this is what
-- keeps a worker serving long requests from looking idle since its last written release.
-- KEYS: worker hash, slot zset. ARGV: now, deadline, token, ... Returns how many were renewed.
local renewed = 0
for i = 3, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[2], 'XX', 'CH', ARGV[2], ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'last_busy_at', ARGV[1])
end
return renewed
