-- Take one slot of a worker: only if it is `ready` and fewer than `slots` live holders exist,
-- so one slot is never given twice, across processes and replicas. Expired holders go first.
-- KEYS: worker hash, slot zset. ARGV: now, deadline, token[, ephemeral].
-- ARGV[4] = '1': an ephemeral hold (a proxied request): its writes go neither to the AOF nor
-- to replicas, so `appendfsync always` costs it no fsync. A Redis restart forgets such holds
-- (their requests end on their own; a hold an AOF rewrite kept expires at its deadline).
-- Returns 1 if a slot was taken, 0 if the worker is full or not ready.
if ARGV[4] == '1' and redis.set_repl then
  redis.replicate_commands()
  redis.set_repl(redis.REPL_NONE)
end
if redis.call('HGET', KEYS[1], 'state') ~= 'ready' then return 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local slots = tonumber(redis.call('HGET', KEYS[1], 'slots') or '0')
if redis.call('ZCARD', KEYS[2]) >= slots then return 0 end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('HSET', KEYS[1], 'last_busy_at', ARGV[1])
return 1
