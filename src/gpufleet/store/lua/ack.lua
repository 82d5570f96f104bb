-- Finish a leased task as succeeded. ARGV: prefix, now, id, token, result_json, result_ttl.
-- A late ack from the previous holder of a lease that expired is still taken while the task
-- waits in its queue (nobody re-leased it yet): the work is done, so it is not run twice.
-- Returns 'ok', 'cancelled' or 'lost'.
local id, token, result, ttl = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local t = load(id, {'kind', 'pool', 'fit', 'model', 'owner', 'status', 'seq', 'token', 'last_token', 'idem'})
if t.status == 'running' and t.token == token then
  unlease(id, t)
elseif t.status == 'queued' and t.last_token == token then
  unqueue(id, t)
elseif t.status == 'cancelled' then
  return 'cancelled'
else
  return 'lost'
end
redis.call('HSET', k_task(id), 'result', result)
finish(id, t, t.status, 'succeeded', ttl, '')
reap(2)
return 'ok'
