-- Extend a lease. ARGV: prefix, now, id, token, new deadline.
-- Returns 'ok', 'cancelled' (stop the work) or 'lost' (the lease is someone else's now).
local id, token, deadline = ARGV[3], ARGV[4], ARGV[5]
local t = load(id, {'status', 'token'})
if t.status == 'running' and t.token == token then
  redis.call('ZADD', k_leases, ts(tonumber(deadline)), id)
  redis.call('HSET', k_task(id), 'lease_deadline', ts(tonumber(deadline)))
  return 'ok'
end
if t.status == 'cancelled' then return 'cancelled' end
return 'lost'
