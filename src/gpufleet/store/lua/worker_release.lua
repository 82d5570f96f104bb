-- Give a slot back; the worker (if it still exists) was busy until now.
-- KEYS: worker hash, slot zset. ARGV: now, token[, ephemeral]. Returns 1 if the token held a slot.
-- ARGV[3] = '1': the hold was ephemeral (see worker_acquire.lua): nothing goes to the AOF.
if ARGV[3] == '1' and redis.set_repl then
  redis.replicate_commands()
  redis.set_repl(redis.REPL_NONE)
end
local removed = redis.call('ZREM', KEYS[2], ARGV[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'last_busy_at', ARGV[1])
end
return removed
