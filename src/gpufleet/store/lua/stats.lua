-- Numbers for the scaler, touching no task but the heads of non-empty queues.
-- ARGV: prefix, now.
-- Returns {depth hash, inflight hash, delayed count, oldest, by_model} where oldest is a flat
-- list of 'pool:P' / 'nopool:K' / 'fit:S' and queued_at of the oldest runnable waiting task of that
-- group, and by_model a flat list of ('pool' | 'kind' | 'fit', P, K or S, model or '*', runnable
-- waiting tasks) per non-empty queue (what the scaler needs to know who can serve them).
local depth = redis.call('HGETALL', k_depth)

-- Within a priority band ids are FIFO, so a queue's oldest task is one of its ten band heads.
local function oldest_in(set_key)
  local best = nil
  for _, q in ipairs(redis.call('SMEMBERS', set_key)) do
    for band = 0, 9 do
      local h = redis.call('ZRANGEBYSCORE', q, num(band * BAND), '(' .. num((band + 1) * BAND),
                           'LIMIT', 0, 1)
      if #h > 0 then
        local at = tonumber(redis.call('HGET', k_task(h[1]), 'queued_at'))
        if at ~= nil and (best == nil or at < best) then best = at end
      end
    end
  end
  return best
end

local oldest = {}
for j = 1, #depth, 2 do
  local field = depth[j]
  local at = nil
  if string.sub(field, 1, 5) == 'pool:' then
    at = oldest_in(k_pool_queues(string.sub(field, 6)))
  elseif string.sub(field, 1, 7) == 'nopool:' then
    at = oldest_in(k_kind_queues(string.sub(field, 8)))
  elseif string.sub(field, 1, 4) == 'fit:' then
    at = oldest_in(k_fit_queues(string.sub(field, 5)))
  end
  if at then oldest[#oldest + 1] = field; oldest[#oldest + 1] = ts(at) end
end
local by_model = {}
local function count_queues(group, name, set_key, base)
  for _, q in ipairs(redis.call('SMEMBERS', set_key)) do
    local n = redis.call('ZCARD', q)
    if n > 0 then
      by_model[#by_model + 1] = group
      by_model[#by_model + 1] = name
      by_model[#by_model + 1] = string.sub(q, #base + 1)
      by_model[#by_model + 1] = n
    end
  end
end
for j = 1, #depth, 2 do
  local field = depth[j]
  if string.sub(field, 1, 5) == 'pool:' then
    local pool = string.sub(field, 6)
    count_queues('pool', pool, k_pool_queues(pool), P .. ':q:pool:' .. pool .. ':')
  elseif string.sub(field, 1, 7) == 'nopool:' then
    local kind = string.sub(field, 8)
    count_queues('kind', kind, k_kind_queues(kind), P .. ':q:kind:' .. kind .. ':')
  elseif string.sub(field, 1, 4) == 'fit:' then
    local set = string.sub(field, 5)
    count_queues('fit', set, k_fit_queues(set), P .. ':q:fit:' .. set .. ':')
  end
end
return {depth, redis.call('HGETALL', k_inflight), redis.call('ZCARD', k_delayed), oldest,
        by_model}
