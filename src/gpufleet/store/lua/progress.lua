-- Append a progress note (node, step/max, output copied …) to a running task's events.
-- Only the current lease holder may write, so a late note from a run that lost its lease
-- or was cancelled never lands after the task's final event.
-- ARGV: prefix, now, id, token, detail. Returns 1 if recorded, 0 otherwise.
local id, token, detail = ARGV[3], ARGV[4], ARGV[5]
local t = load(id, {'status', 'token'})
if t.status ~= 'running' or t.token ~= token then return 0 end
emit(id, 'running', detail)
return 1
