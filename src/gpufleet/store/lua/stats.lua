-- Numbers for the scaler, touching no task but the heads of non-empty queues.
-- ARGV: prefix, now.
-- Returns {depth hash, inflight hash, delayed count, oldest} where oldest is a flat list of
-- 'pool:P' / 'nopool:K' and queued_at of the oldest runnable waiting task of that group.
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
  end
  if at then oldest[#oldest + 1] = field; oldest[#oldest + 1] = ts(at) end
end
return {depth, redis.call('HGETALL', k_inflight), redis.call('ZCARD', k_delayed), oldest}
