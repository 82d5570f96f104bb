-- Take a place among one key's requests in flight, expired ones dropped first.
-- KEYS: the key's holder zset. ARGV: now, deadline, token, max, ttl ms.
-- Returns 1 if a place was taken, 0 if the key is full.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
