-- Cancel a task. ARGV: prefix, now, id, result_ttl, reason.
-- A queued (or delayed) task leaves its queue and never starts; a running task is
-- finished as cancelled at once and its holder is told on the cancel channel (its next
-- heartbeat/ack also answers 'cancelled').
-- Returns {'cancelled', previous_status} | {'conflict', status} | {'missing', ''}.
local id, ttl, reason = ARGV[3], tonumber(ARGV[4]), ARGV[5]
local t = load(id, RUN_FIELDS)
if t.status == nil then return {'missing', ''} end
if t.status == 'queued' then
  unqueue(id, t)
elseif t.status == 'running' then
  unlease(id, t)
  redis.call('PUBLISH', c_cancel, id)
else
  return {'conflict', t.status}
end
redis.call('HSET', k_task(id), 'next_attempt_at', '')
finish(id, t, t.status, 'cancelled', ttl, reason)
reap(2)
return {'cancelled', t.status}
