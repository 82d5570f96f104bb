-- Take a place among a key's and its team's requests in flight.
-- KEYS: the key's holder zset, the team's holder zset.
-- ARGV: now, deadline, token, key max, team max (0 = none), ttl ms.
-- Returns 0 when a place was taken in both, 1|2 when the key|team is full.
local places = {KEYS[1], KEYS[2]}
for i = 1, 2 do
  local limit = tonumber(ARGV[3 + i])
  if limit > 0 then
    redis.call('ZREMRANGEBYSCORE', places[i], '-inf', ARGV[1])
    if redis.call('ZCARD', places[i]) >= limit then return i end
  end
end
for i = 1, 2 do
  if tonumber(ARGV[3 + i]) > 0 then
    redis.call('ZADD', places[i], ARGV[2], ARGV[3])
    redis.call('PEXPIRE', places[i], ARGV[6])
  end
end
return 0
