-- Lease up to `limit` of the best waiting tasks a worker can serve, in one atomic step:
-- each leaves its queue, becomes `running` with a lease deadline, and enters the leases
-- ZSET together. Also requeues a few expired leases and promotes due retries first, so
-- leasing alone keeps the queue live.
-- ARGV: prefix, now, worker_id, deadline, limit, result_ttl, any_model (1/0),
--       n_pools, pools..., n_kinds, kinds..., n_models, models...
-- A task matches when its pool is one of `pools` (or it names no pool and its kind is one
-- of `kinds`, and its fit set, if it has one, names one of `pools`) and its model is one of `models` (or it names none, or any_model = 1).
-- Returns a flat list: id, token, then the task hash as field/value pairs, per task,
-- each task prefixed by its number of hash values.
local worker, deadline, limit, ttl = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local any_model = ARGV[7] == '1'
local i = 8
local function take_list()
  local n = tonumber(ARGV[i]); local out = {}
  for j = 1, n do out[j] = ARGV[i + j] end
  i = i + n + 1
  return out
end
local pools, kinds, models = take_list(), take_list(), take_list()

requeue_expired(20, ttl)
promote_delayed(100)

-- Candidate queues: one per (pool or kind) × (no model, each model the worker serves).
local queues = {}
local function add_candidates(set_key, base)
  if any_model then
    for _, q in ipairs(redis.call('SMEMBERS', set_key)) do queues[#queues + 1] = q end
  else
    queues[#queues + 1] = base .. '*'
    for _, m in ipairs(models) do queues[#queues + 1] = base .. m end
  end
end
for _, pool in ipairs(pools) do add_candidates(k_pool_queues(pool), P .. ':q:pool:' .. pool .. ':') end
for _, kind in ipairs(kinds) do add_candidates(k_kind_queues(kind), P .. ':q:kind:' .. kind .. ':') end
-- Fit sets (tasks with a GPU requirement only some pools fit) that name one of `pools`.
local mine = {}
for _, pool in ipairs(pools) do mine[pool] = true end
for _, kind in ipairs(kinds) do
  for _, set in ipairs(redis.call('SMEMBERS', k_fits(kind))) do
    local ours = false
    for name in string.gmatch(set, '[^+]+') do
      if mine[name] then ours = true end
    end
    if ours then add_candidates(k_fit_queues(set), P .. ':q:fit:' .. set .. ':') end
  end
end

local heads = {}
local function refresh(q)
  local h = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
  if #h == 0 then heads[q] = nil else heads[q] = {h[1], tonumber(h[2])} end
end
for _, q in ipairs(queues) do refresh(q) end

local out = {}
for _ = 1, limit do
  local best_q, best = nil, nil
  for q, h in pairs(heads) do
    if best == nil or h[2] < best[2] then best_q, best = q, h end
  end
  if best_q == nil then break end
  local id = best[1]
  redis.call('ZREM', best_q, id)
  refresh(best_q)
  if heads[best_q] == nil then
    local t0 = load(id, {'kind', 'pool', 'fit', 'model'})
    local _, qs = queue_of(t0)
    redis.call('SREM', qs, best_q)
  end
  local t = load(id, {'kind', 'pool', 'fit', 'model', 'owner', 'seq', 'attempts'})
  local attempt = tonumber(t.attempts) + 1
  local token = worker .. ':' .. attempt
  set_status(id, 'queued', 'running', t.seq)
  redis.call('HSET', k_task(id), 'attempts', attempt, 'worker', worker, 'token', token,
             'started_at', ts(NOW), 'lease_deadline', ts(deadline))
  redis.call('ZADD', k_leases, ts(deadline), id)
  count(k_depth, t, -1)
  count(k_inflight, t, 1)
  emit(id, 'running', worker)
  local h = redis.call('HGETALL', k_task(id))
  out[#out + 1] = #h
  out[#out + 1] = token
  for _, v in ipairs(h) do out[#out + 1] = v end
end
return out
