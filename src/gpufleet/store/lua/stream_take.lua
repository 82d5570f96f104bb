-- Take a place for an open event stream, expired leases dropped first.
-- KEYS: the bucket's zset. ARGV: now ms, deadline ms, token, max, ttl ms.
-- Returns 1 if a place was taken, 0 if the bucket is full.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
