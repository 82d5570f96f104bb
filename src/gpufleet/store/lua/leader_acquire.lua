-- Take or renew the leader lease; a new holder gets the next fencing epoch.
-- KEYS: lock hash, epoch counter. ARGV: replica id, ttl ms. Returns epoch, or 0 if held by another.
local holder = redis.call('HGET', KEYS[1], 'holder')
if not holder then
  local epoch = redis.call('INCR', KEYS[2])
  redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'epoch', epoch)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return epoch
elseif holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return tonumber(redis.call('HGET', KEYS[1], 'epoch'))
end
return 0
