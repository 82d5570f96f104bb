-- Record a failed attempt of a leased task.
-- ARGV: prefix, now, id, token, error_json, retryable (1/0), result_ttl, backoff_s,
--       backoff_max_s, jitter (0..1).
-- A retryable failure with attempts left waits backoff_s * 2^(attempt-1) (capped, times
-- 0.5..1.0 by jitter) in the delayed set; otherwise the task fails with every attempt's
-- error kept. Returns 'retry', 'failed', 'cancelled' or 'lost'.
local id, token, err = ARGV[3], ARGV[4], ARGV[5]
local retryable, ttl = ARGV[6] == '1', tonumber(ARGV[7])
local base, cap, jitter = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local t = load(id, RUN_FIELDS)
if t.status == 'cancelled' then return 'cancelled' end
if t.status ~= 'running' or t.token ~= token then return 'lost' end
unlease(id, t)
local attempt = tonumber(t.attempts)
add_error(id, t, err, attempt)
redis.call('HSET', k_task(id), 'last_token', token, 'token', '', 'lease_deadline', '')
if retryable and attempt < tonumber(t.max_attempts) then
  local delay = math.min(cap, base * 2 ^ (attempt - 1)) * (0.5 + 0.5 * jitter)
  set_status(id, 'running', 'queued', t.seq)
  redis.call('HSET', k_task(id), 'queued_at', ts(NOW), 'next_attempt_at', ts(NOW + delay))
  place(id, t, NOW + delay)
  count(k_depth, t, 1)
  emit(id, 'queued', 'retry in ' .. string.format('%.3f', delay) .. ' s')
  return 'retry'
end
local why = 'attempts exhausted'
if not retryable then why = 'not retryable' end
finish(id, t, 'running', 'failed', ttl, why)
reap(2)
return 'failed'
