-- Compare-and-set a worker's state against the allowed old states (``gpufleet.domain``).
-- KEYS: worker hash. ARGV: new state, now, reason, allowed old states...
-- Returns the old state on success, or false (nil) if the current state is not allowed.
local old = redis.call('HGET', KEYS[1], 'state')
if not old then return false end
local ok = false
for i = 4, #ARGV do if ARGV[i] == old then ok = true end end
if not ok then return false end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'state_since', ARGV[2], 'last_error', ARGV[3])
if ARGV[1] == 'ready' and old ~= 'ready' then
  redis.call('HSET', KEYS[1], 'ready_since', ARGV[2], 'last_busy_at', ARGV[2],
             'health_failures', 0)
end
return old
