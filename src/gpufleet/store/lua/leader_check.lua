-- The fencing check before acting on the lock's behalf.
-- KEYS: lock hash. ARGV: replica id, epoch. Returns 1 if both still match.
local h = redis.call('HMGET', KEYS[1], 'holder', 'epoch')
if h[1] == ARGV[1] and h[2] == ARGV[2] then return 1 end
return 0
