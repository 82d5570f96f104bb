-- Hand a leased task back to its queue now: its worker left `ready` (health failures) or
-- its dispatcher is shutting down. Unlike `fail` there is no backoff, and the task goes
-- back at its original place. The attempt stays counted unless `refund` is 1 (a
-- shutdown is not the task's fault; a dead worker might be), so a task that kills every
-- worker it touches still ends `failed` after max_attempts.
-- ARGV: prefix, now, id, token, error_json, refund (1/0), result_ttl.
-- Returns 'requeued', 'failed' (no attempts left), 'cancelled' or 'lost'.
local id, token, err, refund, ttl = ARGV[3], ARGV[4], ARGV[5], ARGV[6] == '1', tonumber(ARGV[7])
local t = load(id, RUN_FIELDS)
if t.status == 'cancelled' then return 'cancelled' end
if t.status ~= 'running' or t.token ~= token then return 'lost' end
unlease(id, t)
local attempt = tonumber(t.attempts)
add_error(id, t, err, attempt)
redis.call('HSET', k_task(id), 'last_token', token, 'token', '', 'lease_deadline', '')
if refund and attempt > 0 then
  attempt = attempt - 1
  redis.call('HSET', k_task(id), 'attempts', attempt)
end
if attempt >= tonumber(t.max_attempts) then
  finish(id, t, 'running', 'failed', ttl, 'handed back, no attempts left')
  reap(2)
  return 'failed'
end
set_status(id, 'running', 'queued', t.seq)
redis.call('HSET', k_task(id), 'queued_at', ts(NOW), 'next_attempt_at', '')
place(id, t, nil)
count(k_depth, t, 1)
local detail = cjson.decode(err).message or 'handed back'
emit(id, 'queued', detail)
redis.call('PUBLISH', c_wake, t.kind .. ' ' .. (t.pool or '') .. ' ' .. (t.model or ''))
return 'requeued'
