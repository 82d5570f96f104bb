-- Enqueue one task, or return the task an idempotency key already maps to.
-- ARGV: prefix, now, id, idem_key ('' = none), fingerprint, kind, pool, model, priority,
--       owner, max_queued (0 = no limit: the owner's queued tasks, running ones excluded),
--       then field/value pairs of the task hash (payload, timeouts, ...).
-- Returns {'created', id} | {'existing', id} | {'conflict', id} | {'limited', n queued}.
local id, idem, fp = ARGV[3], ARGV[4], ARGV[5]
local t = {kind = ARGV[6], pool = ARGV[7], model = ARGV[8], owner = ARGV[10]}
local priority = tonumber(ARGV[9])
local max_queued = tonumber(ARGV[11])

if idem ~= '' then
  local existing = redis.call('GET', idem)
  if existing then
    local other = redis.call('HGET', k_task(existing), 'fp')
    if other == fp then return {'existing', existing} end
    if other then return {'conflict', existing} end
    -- The task it named is gone (retention passed): the key is free again.
  end
end

if max_queued > 0 and t.owner ~= '' then
  local queued = tonumber(redis.call('HGET', k_depth, 'owner:' .. t.owner) or '0')
  if queued >= max_queued then return {'limited', tostring(queued)} end
end

local seq = redis.call('INCR', k_seq)
t.score = num((9 - priority) * BAND + seq)
local fields = {'id', id, 'kind', t.kind, 'pool', t.pool, 'model', t.model,
                'priority', priority, 'status', 'queued', 'attempts', 0, 'seq', seq,
                'score', t.score, 'fp', fp, 'idem', idem,
                'owner', t.owner, 'created_at', ts(NOW), 'queued_at', ts(NOW)}
for i = 12, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
redis.call('HSET', k_task(id), unpack(fields))
t.fit = redis.call('HGET', k_task(id), 'fit') or ''
local expires_at = tonumber(redis.call('HGET', k_task(id), 'expires_at') or '')
if expires_at ~= nil then redis.call('ZADD', k_deadlines, ts(expires_at), id) end
place(id, t, nil)
redis.call('ZADD', k_tasks, seq, id)
redis.call('ZADD', k_status('queued'), seq, id)
count(k_depth, t, 1)
if idem ~= '' then redis.call('SET', idem, id) end
emit(id, 'queued', '')
redis.call('PUBLISH', c_wake, t.kind .. ' ' .. t.pool .. ' ' .. t.model)
return {'created', id}
