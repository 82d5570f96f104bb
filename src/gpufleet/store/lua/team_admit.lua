-- A team key's request: budgets (read only), then the key's and the team's rate windows.
-- KEYS: key window, team window, team day spend, team month spend.
-- ARGV: key limit, team limit (0 = none), window seconds, day budget, month budget ('' = none).
-- Returns {0, '0'} allowed, {1|2, wait s} over the key's|team's rate, {3|4, spent} over the
-- day's|month's budget (a refused budget check counts no request).
local checks = {{3, KEYS[3], ARGV[4]}, {4, KEYS[4], ARGV[5]}}
for _, c in ipairs(checks) do
  if c[3] ~= '' then
    local spent = tonumber(redis.call('GET', c[2]) or '0')
    if spent >= tonumber(c[3]) then return {c[1], tostring(spent)} end
  end
end
local window = tonumber(ARGV[3])
local windows = {KEYS[1], KEYS[2]}
for i = 1, 2 do
  local limit = tonumber(ARGV[i])
  if limit > 0 then
    local n = redis.call('INCR', windows[i])
    if n == 1 then redis.call('EXPIRE', windows[i], window * 2) end
    if n > limit then
      local ttl = redis.call('TTL', windows[i]) - window
      if ttl < 1 then ttl = 1 end
      return {i, tostring(ttl)}
    end
  end
end
return {0, '0'}
