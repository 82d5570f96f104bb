-- Give the lease up (graceful shutdown).
-- KEYS: lock hash. ARGV: replica id, epoch. Deletes the lock only if we hold it.
local h = redis.call('HMGET', KEYS[1], 'holder', 'epoch')
if h[1] == ARGV[1] and h[2] == ARGV[2] then return redis.call('DEL', KEYS[1]) end
return 0
