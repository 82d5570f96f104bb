-- Shared helpers, prepended to every queue script (see gpufleet.store.scripts.source).
-- Every script gets ARGV[1] = key prefix and ARGV[2] = now (epoch seconds, the caller's clock).
-- Key names mirror gpufleet/store/keys.py; a test checks that they agree.
local P = ARGV[1]
local NOW = tonumber(ARGV[2])
local EVENTS_MAXLEN = 64
local BAND = 1e13

local function k_task(id) return P .. ':task:' .. id end
local function k_events(id) return P .. ':task:' .. id .. ':events' end
local function k_pool_queues(pool) return P .. ':qs:pool:' .. pool end
local function k_kind_queues(kind) return P .. ':qs:kind:' .. kind end
-- Tasks whose GPU requirement only some pools fit wait in their "fit set"'s queues (the pool
-- names joined by '+'); P:fits:{kind} lists the fit sets that have (or had) such queues.
local function k_fit_queues(set) return P .. ':qs:fit:' .. set end
local function k_fits(kind) return P .. ':fits:' .. kind end
local k_delayed = P .. ':delayed'
local k_leases = P .. ':leases'
local k_tasks = P .. ':tasks'
local function k_status(status) return P .. ':tasks:' .. status end
local k_expiry = P .. ':expiry'
local k_deadlines = P .. ':deadlines'
local k_depth = P .. ':depth'
local k_inflight = P .. ':inflight'
local k_seq = P .. ':seq'
local c_wake = P .. ':wake'
local c_task = P .. ':task-events'
local c_cancel = P .. ':cancel'

local function num(x)
  -- Integers as plain digits: tostring() would print 9e+13 style and lose digits.
  return string.format('%.0f', x)
end

local function ts(x)
  return string.format('%.6f', x)
end

-- The queue a waiting task lives in, and the set that lists it for its pool or kind.
local function queue_of(t)
  local model = t.model
  if model == nil or model == '' then model = '*' end
  if t.pool ~= nil and t.pool ~= '' then
    return P .. ':q:pool:' .. t.pool .. ':' .. model, k_pool_queues(t.pool)
  end
  if t.fit ~= nil and t.fit ~= '' then
    return P .. ':q:fit:' .. t.fit .. ':' .. model, k_fit_queues(t.fit)
  end
  return P .. ':q:kind:' .. t.kind .. ':' .. model, k_kind_queues(t.kind)
end

local function load(id, fields)
  local values = redis.call('HMGET', k_task(id), unpack(fields))
  local t = {}
  for i, f in ipairs(fields) do
    local v = values[i]
    if v == false then v = nil end
    t[f] = v
  end
  return t
end

-- Counters of queued (k_depth) or running (k_inflight) tasks; zero fields are deleted.
local function hincr(h, field, delta)
  local v = redis.call('HINCRBY', h, field, delta)
  if v == 0 then redis.call('HDEL', h, field) end
end

local function count(h, t, delta)
  hincr(h, 'all', delta)
  hincr(h, 'kind:' .. t.kind, delta)
  if t.pool ~= nil and t.pool ~= '' then
    hincr(h, 'pool:' .. t.pool, delta)
  else
    hincr(h, 'nopool:' .. t.kind, delta)
    if t.fit ~= nil and t.fit ~= '' then hincr(h, 'fit:' .. t.fit, delta) end
  end
  if t.model ~= nil and t.model ~= '' then hincr(h, 'model:' .. t.model, delta) end
  if t.owner ~= nil and t.owner ~= '' then hincr(h, 'owner:' .. t.owner, delta) end
end

local function emit(id, status, detail)
  local entry = {'status', status, 'ts', ts(NOW)}
  if detail ~= nil and detail ~= '' then
    entry[#entry + 1] = 'detail'
    entry[#entry + 1] = detail
  end
  redis.call('XADD', k_events(id), 'MAXLEN', '~', EVENTS_MAXLEN, '*', unpack(entry))
  redis.call('PUBLISH', c_task, id .. ' ' .. status)
end

local function set_status(id, old, new, seq)
  redis.call('ZREM', k_status(old), id)
  redis.call('ZADD', k_status(new), seq, id)
  redis.call('HSET', k_task(id), 'status', new)
end

-- Put a waiting task into its queue (now, or at due_at when due_at > NOW).
local function place(id, t, due_at)
  if due_at ~= nil and due_at > NOW then
    redis.call('ZADD', k_delayed, ts(due_at), id)
    return
  end
  local q, qs = queue_of(t)
  redis.call('ZADD', q, t.score, id)
  redis.call('SADD', qs, q)
  if (t.pool == nil or t.pool == '') and t.fit ~= nil and t.fit ~= '' then
    redis.call('SADD', k_fits(t.kind), t.fit)
  end
end

local function add_error(id, t, err_json, attempt)
  local errors = {}
  if t.errors ~= nil and t.errors ~= '' then errors = cjson.decode(t.errors) end
  local ok, err = pcall(cjson.decode, err_json)
  if not ok then err = {message = err_json} end
  err.attempt = tonumber(attempt)
  err.at = NOW
  if t.worker ~= nil then err.worker = t.worker end
  errors[#errors + 1] = err
  redis.call('HSET', k_task(id), 'error', cjson.encode(err), 'errors', cjson.encode(errors))
end

-- Move a task to a terminal status; its records expire ttl seconds from now.
local function finish(id, t, old, status, ttl, detail)
  set_status(id, old, status, t.seq)
  redis.call('HSET', k_task(id), 'finished_at', ts(NOW), 'token', '', 'lease_deadline', '')
  redis.call('ZREM', k_deadlines, id)
  local ttl_i = math.floor(ttl)
  redis.call('ZADD', k_expiry, ts(NOW + ttl), id)
  emit(id, status, detail)
  redis.call('EXPIRE', k_task(id), ttl_i)
  redis.call('EXPIRE', k_events(id), ttl_i)
  if t.idem ~= nil and t.idem ~= '' then redis.call('EXPIRE', t.idem, ttl_i) end
end

-- Take a running task off its lease (counters and leases ZSET).
local function unlease(id, t)
  redis.call('ZREM', k_leases, id)
  count(k_inflight, t, -1)
end

-- Take a queued task out of its queue or the delayed set (counters too).
local function unqueue(id, t)
  local q, qs = queue_of(t)
  if redis.call('ZREM', q, id) == 1 then
    if redis.call('ZCARD', q) == 0 then redis.call('SREM', qs, q) end
  else
    redis.call('ZREM', k_delayed, id)
  end
  count(k_depth, t, -1)
end

local RUN_FIELDS = {'kind', 'pool', 'fit', 'model', 'owner', 'status', 'seq', 'score', 'attempts',
                    'max_attempts', 'errors', 'worker', 'token', 'idem'}

-- Expired leases go back to their queue (or to failed after max_attempts).
local function requeue_expired(limit, ttl)
  local ids = redis.call('ZRANGEBYSCORE', k_leases, '-inf', ts(NOW), 'LIMIT', 0, limit)
  local requeued, dead = 0, 0
  for _, id in ipairs(ids) do
    local t = load(id, RUN_FIELDS)
    if t.status ~= 'running' then
      redis.call('ZREM', k_leases, id)
    else
      unlease(id, t)
      local msg = cjson.encode({code = 'lease_expired',
        message = 'lease expired: the worker stopped heartbeating'})
      add_error(id, t, msg, t.attempts)
      redis.call('HSET', k_task(id), 'last_token', t.token, 'token', '', 'lease_deadline', '')
      if tonumber(t.attempts) >= tonumber(t.max_attempts) then
        finish(id, t, 'running', 'failed', ttl, 'lease expired, no attempts left')
        dead = dead + 1
      else
        set_status(id, 'running', 'queued', t.seq)
        redis.call('HSET', k_task(id), 'queued_at', ts(NOW))
        place(id, t, nil)
        count(k_depth, t, 1)
        emit(id, 'queued', 'lease expired')
        requeued = requeued + 1
      end
    end
  end
  return requeued, dead
end

-- Due retries go back to their queue, keeping their original priority and place.
local function promote_delayed(limit)
  local ids = redis.call('ZRANGEBYSCORE', k_delayed, '-inf', ts(NOW), 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    redis.call('ZREM', k_delayed, id)
    local t = load(id, {'kind', 'pool', 'fit', 'model', 'score', 'status'})
    if t.status == 'queued' then
      redis.call('HSET', k_task(id), 'queued_at', ts(NOW), 'next_attempt_at', '')
      place(id, t, nil)
    end
  end
  if #ids > 0 then redis.call('PUBLISH', c_wake, 'retry') end
  return #ids
end

-- Delete finished tasks whose retention has passed (their keys also carry a TTL).
local function reap(limit)
  local ids = redis.call('ZRANGEBYSCORE', k_expiry, '-inf', ts(NOW), 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local idem = redis.call('HGET', k_task(id), 'idem')
    if idem then redis.call('DEL', idem) end
    redis.call('DEL', k_task(id), k_events(id))
    redis.call('ZREM', k_tasks, id)
    redis.call('ZREM', k_status('succeeded'), id)
    redis.call('ZREM', k_status('failed'), id)
    redis.call('ZREM', k_status('cancelled'), id)
    redis.call('ZREM', k_expiry, id)
  end
  return #ids
end

-- How long a running task past its queue deadline waits before it is looked at again.
local DEADLINE_RECHECK_S = 60

-- Waiting tasks (queued, or delayed for a retry) past their `expires_at` (submission +
-- max queue age) fail with code 'expired'. A running attempt is never cut short: the
-- task is looked at again later, and fails then if it is waiting again.
local function expire_queued(limit, ttl)
  local ids = redis.call('ZRANGEBYSCORE', k_deadlines, '-inf', ts(NOW), 'LIMIT', 0, limit)
  local expired = 0
  for _, id in ipairs(ids) do
    local t = load(id, RUN_FIELDS)
    if t.status == 'queued' then
      unqueue(id, t)
      local age = NOW - tonumber(redis.call('HGET', k_task(id), 'created_at') or NOW)
      local msg = cjson.encode({code = 'expired', message = string.format(
        'waited %.0f s in the queue without a worker to run it (the task\'s maximum queue ' ..
        'age); no worker of a pool that serves it became free in time', age)})
      add_error(id, t, msg, t.attempts)
      finish(id, t, 'queued', 'failed', ttl, 'expired: maximum queue age reached')
      expired = expired + 1
    elseif t.status == 'running' then
      redis.call('ZADD', k_deadlines, ts(NOW + DEADLINE_RECHECK_S), id)
    else
      redis.call('ZREM', k_deadlines, id)
    end
  end
  return expired
end
