-- Renew a held stream place.
-- KEYS: the bucket's zset. ARGV: deadline ms, token, ttl ms. Renews a held place only.
if not redis.call('ZSCORE', KEYS[1], ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
